r"""An optax wrapper that computes Cockpit's instruments while training.

``monitor(inner, apply_fn, loss, instruments="economy", every=1)`` behaves like
``inner`` (its updates are returned unchanged; see "Updates" below) and, on tracked steps, computes
the chosen instruments at ``theta_t`` on ``batch`` and stores them in its state
(Dangel, thesis, Ch. 7 and App. C; spec diagnostics.md). Untracked steps take the
``lax.cond`` branch that copies the previous values: they cost nothing beyond
``inner``'s own update (plus one JVP on the step right after a tracked one when
Alpha is requested, which needs the loss and slope at the step's end point).
Tracking every step (``every=1``), there is no ``lax.cond``: the per-example pass
shares its forward and backward pass with the training step's gradient under
``jit`` (see `curvax.curvature.flax_layers`), and Alpha's end point comes with
it as one more projection instead of a JVP (without per-example instruments,
as a second tangent of the start point's JVP). One caveat on XLA:CPU: a step's
scratch buffer is sized for its largest branch (here the tracked one) and
allocated on every execution; glibc maps blocks of hundreds of MB afresh each
time, so untracked steps then page-fault their working memory (a raw
mnist_mlp-shaped MLP on the ``vmap`` path: 788 MB, untracked steps ~1.8x SGD;
3c3d on the fast path: ~1.0x). An allocator that caches large blocks avoids it
(e.g. tcmalloc; see benchmarks/_allocator.py).

Host-side schedule: a GPU runtime waits for the host at every ``lax.cond``, so
on a small model the untracked steps' conds cost more than the step. A loop
that knows the step number passes ``update(..., scheduled=False)`` (a Python
bool, static under ``jax.jit``) on the steps where `is_scheduled` is False:
that variant is compiled without the instruments and without any cond (and
its scratch is the plain step's, so the CPU caveat above goes too: on the
``vmap`` path, 1.3-1.65x SGD with the cond and 0.9-1.2x without, undonated,
benchmarks/monitor_untracked.py). Other
steps pass ``True`` (or nothing): the results are those of the device-side
schedule. A step passed ``False`` computes nothing even if the schedule
tracks it (and Alpha's pending end point, if any, is dropped)::

    @functools.partial(jax.jit, static_argnames="scheduled")
    def step(params, state, batch, scheduled): ...
    step(params, state, batch, scheduled=is_scheduled(t, every=64, instruments=names))

``scheduled`` is the monitor's own; an optimizer inside it that has a host
schedule of its own (`curvax.transforms.curvature_step_size`'s
`computes_curvature`, `probabilistic_preconditioning`'s `estimation_phase`)
gets its value as ``update(..., inner_scheduled=...)``, which the monitor
passes on to it as ``scheduled=`` (``None``, the default: not passed).

Per-example quantities come from one `curvax.curvature.per_example_statistics`
call per tracked step (the BackPACK-style fast path for Flax Dense/Conv models,
else chunked ``vmap``), which never holds all ``B x D`` per-example gradients:
the gradient tests use the squared norms ``||g_i||^2`` and projections
``g_i'g``, Alpha the slopes ``s'g_i`` (its ``dot_with``), and the histograms,
the only instruments that need gradient elements, are counted one layer (fast
path) or one chunk (``vmap``) at a time (its ``reduce_gradients``); Dense
kernels' from the factors of ``a_n b_n'`` (`counts_1d_outer`, `counts_2d_outer`).

Conventions:

* ``updates`` passed to ``update`` is the mini-batch gradient ``g`` (as for any
  optax optimizer); GradNorm is its norm. The other instruments use the data
  term ``(1/B) sum_i l_i`` only: a regularizer is not part of them.
* The step ``s = theta_{t+1} - theta_t`` is the update the monitor returns, so
  the monitor should be the last transformation of the chain (wrap the whole
  optimizer), and the caller must apply it (``optax.apply_updates``). Put it
  outside ``optax.MultiSteps`` and ``optax.apply_if_finite`` too:
  ``monitor(MultiSteps(...))``. Inside them it would see only the steps they
  let through, count its ``step`` by those, and a skipped step would leave its
  previous record in the state for `record` to read again.
* Alpha of step ``t`` needs observations at ``theta_{t+1}`` on the next batch, so
  it appears one update later, in ``state.alpha`` with ``state.alpha_step = t``.

Updates: for the same gradients, state and parameters, a jitted monitored step
returns exactly (bitwise) the updates and inner state of ``inner``'s jitted
step, tracked or not (tested for SGD with momentum, Adam and
``inject_hyperparams(adamw)``). A whole monitored run under ``jit`` follows the
bare optimizer's trajectory to round-off only, not bitwise: compiled together
with the caller's ``params + updates``, the bare step's update may be fused
into that sum without being rounded on its own (e.g. a multiply-add), while the
monitor's update passes `ordered_after` (a multiplication by one that orders it
after the instruments) and is rounded before it is added. The monitored run is
the one whose parameters are exactly ``params + returned updates``; the two
runs drift apart by an ulp here and there (``inject_hyperparams(adamw)`` on an
MLP: 1 ulp after a step).

Logging contract (for `curvax.problems` or any training loop): after each
update, ``curvax.diagnostics.record(opt_state)`` finds the monitor's state
anywhere inside ``opt_state`` (``optax.chain``, ``inject_hyperparams``) and
returns a JSON-ready dict of what was computed at this update (``{}`` on other
steps); the list of those dicts is what `curvax.diagnostics.dashboard` plots.
The raw values live in the state's fields ``diagnostics`` (a dict of arrays),
``tracked``, ``tracked_step``, ``alpha``, ``alpha_step``, ``alpha_fresh``.
"""

from __future__ import annotations

from typing import Any, Callable, Dict, NamedTuple, Optional, Sequence, Union

import jax
import jax.numpy as jnp
import optax
import optax.tree_utils as otu

from curvax import _checks
from curvax._buffers import ordered_after, own_buffers
from curvax._packed import PackedDict, PackedTree, install_packed_fields
from curvax.diagnostics import step_quality as alpha_lib
from curvax.diagnostics import curvature as curv_lib
from curvax.diagnostics import gradient_tests
from curvax.diagnostics import histograms
from curvax.diagnostics import noise
from curvax.diagnostics import norms
from curvax.diagnostics import schedules
from curvax.losses import as_loss

Array = jax.Array

ECONOMY = ("loss", "distance", "update_size", "grad_norm", "alpha", "norm_test",
           "inner_test", "ortho_test", "grad_hist_1d")
BUSINESS = ECONOMY + ("tic_diag", "hess_trace")
FULL = BUSINESS + ("hess_max_ev", "grad_hist_2d")
PRESETS = {"economy": ECONOMY, "business": BUSINESS, "full": FULL}

_PER_EXAMPLE = {"norm_test", "inner_test", "ortho_test", "grad_hist_1d", "grad_hist_2d",
                "tic_diag", "tic_trace", "mean_gsnr", "cabs", "early_stopping",
                "layer_grad_hist_1d"}
_DIAG = {"tic_diag", "tic_trace", "hess_trace"}
INSTRUMENTS = frozenset(set(FULL) | _PER_EXAMPLE | _DIAG)


class MonitorState(NamedTuple):
  """State of `monitor`.

  The scalars are packed in two arrays, ``counts`` (int32: ``count``,
  ``tracked``, ``tracked_step``, ``alpha_step``, ``alpha_fresh``) and
  ``alpha_values`` (``alpha``, then ``alpha_start``), and read (and
  ``_replace``d) by name, ``state.count``, ``state.alpha``, ...: each array of a
  state costs host time per jitted call, and the untracked steps pass the
  state through (docs/performance.md).

  Attributes:
    inner_state: the wrapped optimizer's state.
    counts: the int32 scalars below (the flags as 0 / 1).
    diagnostics: the values of the last tracked step, read like a dict
      ``name -> array``: scalars, per-layer trees (``*_layers``), histograms.
      Stored as a `curvax._packed.PackedDict` (one array per dtype instead of
      one per value: each array of a state costs host time per jitted call).
    alpha_values: ``alpha`` and ``alpha_start``, in the parameters' dtype.
    init_params: ``theta_0`` for Distance (``()`` if not tracked), as a
      `curvax._packed.PackedTree` (``state.init_params.unpack()``: one array
      per dtype instead of one per parameter tensor, like the three below).
    last_update: the previous update ``s`` for Alpha (``()`` if not tracked),
      a ``PackedTree``.
    key: PRNG key (Lanczos start vectors, Monte-Carlo curvature), from
      ``seed``; step ``t`` draws from ``fold_in(key, t)`` (it does not change).
    eigenvector: HessMaxEV's last top Ritz vector, its next start's warm part
      (zeros before any; ``()`` if not tracked), a ``PackedTree``.

  Scalars (properties):
    count: number of updates so far (the step index ``t`` of the next update).
    tracked: whether the last update computed the instruments.
    tracked_step: the step of the values in ``diagnostics`` (-1 before any).
    alpha: Alpha of step ``alpha_step`` (NaN before any).
    alpha_step: the step ``alpha`` refers to (-1 before any).
    alpha_fresh: whether the last update completed an Alpha.
    alpha_start: ``(f_0, var f_0, mean s'g_i, var s'g_i, ||s||)`` at the start
      point (``alpha_values[..., 1:]``; read only).
  """
  inner_state: Any
  counts: Array
  diagnostics: Dict[str, Any]
  alpha_values: Array
  init_params: Any
  last_update: Any
  key: Array
  eigenvector: Any = ()

  @property
  def alpha_start(self) -> Array:
    """``(f_0, var f_0, mean s'g_i, var s'g_i, ||s||)``: ``alpha_values[..., 1:]``."""
    return self.alpha_values[..., 1:]


_COUNT_FIELDS = ("count", "tracked", "tracked_step", "alpha_step", "alpha_fresh")
install_packed_fields(MonitorState, {"counts": _COUNT_FIELDS, "alpha_values": ("alpha",)},
                      casts={"tracked": bool, "alpha_fresh": bool})


def _state(*, inner_state, count, tracked, tracked_step, diagnostics, alpha, alpha_step,
           alpha_fresh, alpha_start, init_params, last_update, key, eigenvector) -> MonitorState:
  """A `MonitorState` from its scalars by name (packed here)."""
  dtype = jnp.result_type(alpha_start)
  scalars = dict(count=count, tracked=tracked, tracked_step=tracked_step,
                 alpha_step=alpha_step, alpha_fresh=alpha_fresh)
  return MonitorState(
      inner_state=inner_state,
      counts=jnp.stack([jnp.asarray(scalars[f]).astype(jnp.int32) for f in _COUNT_FIELDS]),
      diagnostics=diagnostics,
      alpha_values=jnp.concatenate([jnp.asarray(alpha, dtype)[None], alpha_start]),
      init_params=init_params, last_update=last_update, key=key, eigenvector=eigenvector)


def _resolve_instruments(instruments) -> tuple:
  if isinstance(instruments, str):
    if instruments not in PRESETS:
      raise ValueError(f"unknown preset {instruments!r}; use one of {sorted(PRESETS)} "
                       "or a sequence of instrument names.")
    return PRESETS[instruments]
  names = tuple(dict.fromkeys(instruments))
  unknown = [n for n in names if n not in INSTRUMENTS]
  if unknown:
    raise ValueError(f"unknown instruments {unknown}; available: {sorted(INSTRUMENTS)}.")
  return names


def is_scheduled(step: int, *, every: Optional[int] = None,
                 schedule: Union[None, str, Callable] = None,
                 instruments: Union[str, Sequence[str]] = "economy") -> bool:
  """Whether `monitor` with these settings has work at update ``step`` (from 0).

  On the host, for ``update(..., scheduled=...)`` (see the module docstring):
  True on tracked steps and, when the instruments include Alpha, on the step
  after each (its end point). ``every``, ``schedule`` and ``instruments`` are
  the monitor's.
  """
  step = int(step)
  track = _resolve_schedule(_check_schedule_args(every, schedule), 1 if every is None else every)
  busy = bool(track(step))
  if "alpha" in _resolve_instruments(instruments) and step > 0:
    busy = busy or bool(track(step - 1))
  return busy


def _check_schedule_args(every, schedule):
  if every is not None and schedule not in (None, "linear"):
    raise ValueError(f"`every={every!r}` is the interval of the linear schedule; it "
                     f"conflicts with `schedule={schedule!r}`. Pass one of them (e.g. "
                     "schedule=linear_schedule(every, offset)).")
  return schedule


def _resolve_schedule(schedule, every):
  if callable(schedule):
    return schedule
  if schedule in (None, "linear"):
    return schedules.linear_schedule(every)
  if schedule in ("log", "logarithmic"):
    return schedules.log_schedule()
  raise ValueError(f"`schedule` must be 'linear', 'log' or a callable step -> bool; "
                   f"got {schedule!r}.")


_HISTOGRAMS = ("grad_hist_1d", "layer_grad_hist_1d", "grad_hist_2d")


class _Counts(NamedTuple):
  """Histogram counts of one parameter tensor's per-example gradients (None: not asked)."""
  hist_1d: Optional[Array]
  hist_2d: Optional[Array]


def _per_example(apply_fn, loss, params, batch, chunk_size, refs, want, hist_bins,
                 hist_range):
  """Per-example statistics of one tracked step, without per-example gradients.

  Returns ``(losses, mean g, second moment, ||g_i||^2, g_i'g, (r'g_i for r in
  refs), histograms)``: the gradient tests need only the squared norms and the
  projections ``g_i'g``, Alpha only slopes ``s'g_i`` along steps ``s`` in
  ``refs`` (`per_example_statistics`'s ``dot_with``); the histograms are the
  only instruments that need gradient *elements*, and they are counted layer by
  layer / chunk by chunk through ``reduce_gradients``, Dense kernels from their
  factors through ``reduce_outer_products`` (dict name -> counts; per tensor
  for ``layer_grad_hist_1d``). Counts are float32, summed over tensors in
  float32: exact while a bin holds fewer than 2^24 entries, never wrapping
  (`curvax.diagnostics.histograms`).
  """
  from curvax import curvature  # pylint: disable=g-import-not-at-top
  hists = [n for n in _HISTOGRAMS if n in want]
  reduce_fn = reduce_outer = None
  if hists:
    one, two = any(n in hists for n in _HISTOGRAMS[:2]), "grad_hist_2d" in hists

    def reduce_fn(g, theta):
      return _Counts(histograms.counts_1d(g, hist_bins, hist_range) if one else None,
                     histograms.counts_2d(g, theta) if two else None)

    # Dense kernels' a_n b_n': only the entries away from 0 are binned one by one.
    def reduce_outer(a, b, theta):
      return _Counts(histograms.counts_1d_outer(a, b, hist_bins, hist_range) if one else None,
                     histograms.counts_2d_outer(a, b, theta) if two else None)
  dot_with = ("mean",) + tuple(refs)
  s = curvature.per_example_statistics(apply_fn, loss, params, batch, dot_with=dot_with,
                                       reduce_gradients=reduce_fn,
                                       reduce_outer_products=reduce_outer,
                                       chunk_size=chunk_size)
  counts = {}
  if hists:
    is_leaf = lambda t: isinstance(t, _Counts)
    per_tensor = jax.tree_util.tree_leaves(s.reduced, is_leaf=is_leaf)
    if "grad_hist_1d" in hists:
      counts["grad_hist_1d"] = sum(t.hist_1d for t in per_tensor)
    if "layer_grad_hist_1d" in hists:
      counts["layer_grad_hist_1d"] = jax.tree_util.tree_map(
          lambda t: t.hist_1d, s.reduced, is_leaf=is_leaf)
    if "grad_hist_2d" in hists:
      counts["grad_hist_2d"] = sum(t.hist_2d for t in per_tensor)
  return (s.losses, s.mean_gradient, s.second_moment, jnp.square(s.gradient_norms),
          s.dots[0], s.dots[1:], counts)


def _diag_curvature(method, apply_fn, loss, params, batch, key, chunk_size):
  """Diagonal curvature for HessTrace / TIC, from `curvax.curvature`."""
  from curvax import curvature  # pylint: disable=g-import-not-at-top
  if method == "diag_ggn_mc":
    return curvature.diag_ggn_mc(apply_fn, loss, params, batch, key, chunk_size=chunk_size)
  return curvature.diag_ggn(apply_fn, loss, params, batch, chunk_size=chunk_size)


def _top_eigenpair(matvec, params, previous, key, iterations, rtol):
  """``(λ_max, Ritz vector)`` by Lanczos, stopping once the Ritz value is within
  ``1e-6 + rtol |λ|`` of an eigenvalue (the spec's power iteration stops on
  Rayleigh quotients agreeing to rtol 1e-3, atol 1e-6), warm-started from the
  previous tracked step's top Ritz vector (`curvax.curvature.top_eigenpairs`:
  on 3c3d, SGD, batch 128, 7-12 products instead of 11-17 from a Gaussian
  start, the same values within the tolerance)."""
  from curvax import curvature  # pylint: disable=g-import-not-at-top
  values, vectors = curvature.top_eigenpairs(matvec, params, key, 1, iterations, rtol=rtol,
                                             atol=1e-6, warm_start=previous)
  return values[0], jax.tree_util.tree_map(lambda v: v[0], vectors)


def _losses_and_slopes(apply_fn, loss, params, batch, direction, *more):
  """Per-example losses and slopes ``d' g_i`` from one JVP of the per-example loss;
  with ``more`` directions, the slopes along each (a tuple) from one
  linearisation: the forward pass once, the tangent pass batched."""
  inputs, targets = batch
  f = lambda p: loss(apply_fn(p, inputs), targets)
  if not more:
    return jax.jvp(f, (params,), (direction,))
  losses, lin = jax.linearize(f, params)
  # In the parameters' dtypes, as linearisation requires of its tangents.
  directions = [otu.tree_cast_like(d, params) for d in (direction,) + more]
  slopes = jax.vmap(lin)(jax.tree_util.tree_map(lambda *d: jnp.stack(d), *directions))
  return losses, tuple(slopes)


def monitor(inner: optax.GradientTransformation,
            apply_fn: Callable[[Any, Any], Array],
            loss: Any,
            instruments: Union[str, Sequence[str]] = "economy",
            every: Optional[int] = None,
            schedule: Union[None, str, Callable[[Array], Array]] = None,
            *,
            curvature: str = "diag_ggn",
            learning_rate: Optional[float] = None,
            chunk_size: Optional[int] = None,
            hist_bins: int = 100,
            hist_range: tuple = (-2.0, 2.0),
            eigen_iterations: int = 20,
            eigen_rtol: Optional[float] = 1e-3,
            seed: int = 0) -> optax.GradientTransformationExtraArgs:
  """Wraps ``inner``; computes Cockpit instruments on tracked steps.

  Args:
    inner: the optimizer being monitored; its updates pass through unchanged
      (bitwise per step; a jitted run equals the bare one's to round-off, see
      the module docstring).
    apply_fn: ``apply_fn(params, inputs) -> outputs``.
    loss: a `curvax.losses.Loss` or per-example callable.
    instruments: a preset (``"economy"``, ``"business"``, ``"full"``, Cockpit's
      configurations) or a sequence of names from `INSTRUMENTS`: ``loss,
      grad_norm, update_size, distance, alpha, norm_test, inner_test, ortho_test,
      grad_hist_1d, layer_grad_hist_1d, grad_hist_2d, mean_gsnr, cabs,
      early_stopping, tic_diag, tic_trace, hess_trace, hess_max_ev``.
    every: tracking interval of the linear schedule (None: 1, every step).
    schedule: ``"linear"`` (default; every ``every`` steps), ``"log"`` (Cockpit's
      logarithmic schedule, `log_schedule()` defaults) or a callable
      ``step -> bool`` (e.g. `linear_schedule` / `log_schedule`); with any but
      ``"linear"``, ``every`` must be left out (a ValueError otherwise).
    curvature: diagonal curvature standing in for ``diag(H_B)`` in HessTrace and
      TIC: ``"diag_ggn"`` (exact diagonal GGN, ~C extra backward passes) or
      ``"diag_ggn_mc"`` (one Monte-Carlo sample, cheapest). Cockpit's default,
      the exact Hessian diagonal, has no matrix-free counterpart here. Where
      the loss is linear in the model's output (``curvax.problems``' 2-D test
      functions, whose model outputs the loss value: ``value_loss``) the GGN is
      zero, and so are HessTrace and TIC's curvature; HessMaxEV uses Hessian
      products and is unaffected.
    learning_rate: SGD learning rate, required by ``cabs``.
    chunk_size: examples per vmap chunk for per-example gradients (None: all).
    hist_bins, hist_range: GradHist1d layout (Cockpit: 100 bins on (-2, 2)).
    eigen_iterations: at most this many Hessian-vector products for HessMaxEV
      (Lanczos iterations, `curvax.curvature.lanczos`; Cockpit uses up to 100
      power iterations, Lanczos needs far fewer for the top eigenvalue).
    eigen_rtol: HessMaxEV stops once its residual bound ``beta |y_j|`` is below
      ``1e-6 + eigen_rtol |λ|``; each start is warm, the previous tracked
      step's top Ritz vector plus as much Gaussian noise (on 3c3d, SGD, batch
      128, the first 80 steps: 7-12 products, against 11-17 from a Gaussian
      start); None runs all ``eigen_iterations``.
    seed: PRNG seed for the Lanczos start vectors / Monte-Carlo curvature.

  Returns:
    An ``optax.GradientTransformationExtraArgs``; ``update(updates, state,
    params, *, batch, scheduled=None, inner_scheduled=None, **extra_args)``
    needs ``params`` and ``batch`` and forwards ``extra_args`` to ``inner``;
    ``scheduled=False`` (static) skips the step's work and its conds (module
    docstring, `is_scheduled`); ``inner_scheduled``, unless None, goes to
    ``inner`` as its ``scheduled``.
  """
  names = _resolve_instruments(instruments)
  _check_schedule_args(every, schedule)
  every = 1 if every is None else every
  track = _resolve_schedule(schedule, every)
  always_tracked = schedule in (None, "linear") and every == 1
  loss = as_loss(loss)
  if "cabs" in names and learning_rate is None:
    raise ValueError("instrument 'cabs' needs `learning_rate` (SGD's step size).")
  if curvature not in ("diag_ggn", "diag_ggn_mc"):
    raise ValueError(f"`curvature` must be 'diag_ggn' or 'diag_ggn_mc'; got {curvature!r}.")
  inner = optax.with_extra_args_support(inner)
  want = set(names)
  need_pe = bool(want & _PER_EXAMPLE)
  need_diag = bool(want & _DIAG)
  need_alpha = "alpha" in want
  # Tracking every step, Alpha's end point (losses and slopes s_{t-1}'g_i at
  # theta_t on this batch) comes with this step's start point: one more
  # ``dot_with`` reference of the per-example statistics, or (without them)
  # a second tangent of the start point's JVP, instead of a JVP of its own.
  shared_end = always_tracked and need_alpha

  def empty_diagnostics(params):
    dtype = jnp.result_type(*jax.tree_util.tree_leaves(params))
    z = jnp.zeros((), dtype)
    layers = jax.tree_util.tree_map(lambda _: z, params)
    out = {}
    for n in names:
      if n == "alpha":
        continue
      # float32 counts (`curvax.diagnostics.histograms`: int32 partials never wrap)
      if n == "grad_hist_1d":
        out[n] = jnp.zeros((hist_bins,), jnp.float32)
      elif n == "layer_grad_hist_1d":
        out[n] = jax.tree_util.tree_map(lambda _: jnp.zeros((hist_bins,), jnp.float32), params)
      elif n == "grad_hist_2d":
        out[n] = jnp.zeros(histograms.HIST_2D_BINS, jnp.float32)
      else:
        out[n] = z
      if n in ("grad_norm", "update_size", "distance", "hess_trace"):
        out[n + "_layers"] = layers
    return PackedDict.pack(out)

  def init_fn(params):
    _checks.check_params(params, "monitor")
    dtype = jnp.result_type(*jax.tree_util.tree_leaves(params))
    return own_buffers(_state(
        inner_state=inner.init(params),
        count=jnp.zeros((), jnp.int32),
        tracked=jnp.zeros((), bool),
        tracked_step=jnp.full((), -1, jnp.int32),
        diagnostics=empty_diagnostics(params),
        alpha=jnp.full((), jnp.nan, dtype),
        alpha_step=jnp.full((), -1, jnp.int32),
        alpha_fresh=jnp.zeros((), bool),
        init_params=PackedTree.pack(params) if "distance" in want else (),
        last_update=PackedTree.pack(otu.tree_zeros_like(params)) if need_alpha else (),
        alpha_start=jnp.zeros((5,), dtype),
        key=jax.random.PRNGKey(seed),
        eigenvector=(PackedTree.pack(otu.tree_zeros_like(params)) if "hess_max_ev" in want
                     else ())))

  def compute(grads, new_updates, params, batch, state, key):
    """All requested instruments at ``theta_t`` on ``batch``.

    Returns ``(diagnostics, alpha start point, end point, eigenvector)``; the
    end point of the previous step's Alpha, ``(losses, slopes s_{t-1}'g_i)``,
    only if `shared_end` (every step tracked); HessMaxEV's top Ritz vector (else
    the state's).
    """
    out = {}
    dtype = jnp.result_type(*jax.tree_util.tree_leaves(params))
    cast = lambda x: jnp.asarray(x, dtype)
    pe_losses, end = None, None
    eigenvector = state.eigenvector
    if need_pe:
      refs = (new_updates,) if need_alpha else ()
      if shared_end:
        refs += (state.last_update.unpack(),)
      with jax.named_scope("per_example"):  # names the stages in profiles
        pe_losses, mean_g, second, sq_norms, dots, slopes, counts = _per_example(
            apply_fn, loss, params, batch, chunk_size, refs, want, hist_bins, hist_range)
      p0 = slopes[0] if need_alpha else None
      if shared_end:
        end = (pe_losses, slopes[1])
    elif shared_end:  # s_t'g_i and s_{t-1}'g_i: one linearisation, two tangents
      with jax.named_scope("alpha_start"):
        pe_losses, (p0, p1) = _losses_and_slopes(apply_fn, loss, params, batch, new_updates,
                                                 state.last_update.unpack())
      end = (pe_losses, p1)
    elif "loss" in want or need_alpha:
      inputs, targets = batch
      pe_losses = loss(apply_fn(params, inputs), targets)
    start = state.alpha_start
    if need_alpha:
      if not need_pe and not shared_end:  # else s'g_i came with the statistics above
        with jax.named_scope("alpha_start"):
          _, p0 = _losses_and_slopes(apply_fn, loss, params, batch, new_updates)
      start = jnp.stack([jnp.mean(pe_losses), alpha_lib.sample_variance(pe_losses),
                         jnp.mean(p0), alpha_lib.sample_variance(p0),
                         otu.tree_norm(new_updates)]).astype(dtype)
    diag = None
    if need_diag:
      with jax.named_scope("diag_curvature"):
        diag = _diag_curvature(curvature, apply_fn, loss, params, batch, key, chunk_size)
    for n in names:
      if n == "loss":
        out[n] = cast(jnp.mean(pe_losses))
      elif n in ("grad_norm", "update_size", "distance"):
        tree = {"grad_norm": grads, "update_size": new_updates}.get(n)
        if n == "distance":
          tree = otu.tree_sub(params, state.init_params.unpack())
        layers = norms.layer_norms(tree)
        out[n + "_layers"] = jax.tree_util.tree_map(cast, layers)
        out[n] = cast(norms.global_norm_from_layers(layers))
      elif n == "norm_test":
        out[n] = cast(gradient_tests.norm_test(sq_norms, dots))
      elif n == "inner_test":
        out[n] = cast(gradient_tests.inner_test(sq_norms, dots))
      elif n == "ortho_test":
        out[n] = cast(gradient_tests.ortho_test(sq_norms, dots))
      elif n in _HISTOGRAMS:
        out[n] = counts[n]
      elif n == "mean_gsnr":
        out[n] = cast(noise.mean_gsnr(mean_g, second))
      elif n == "cabs":
        out[n] = cast(noise.cabs(mean_g, second, jnp.mean(pe_losses), learning_rate))
      elif n == "early_stopping":
        out[n] = cast(noise.early_stopping(mean_g, second, pe_losses.shape[0]))
      elif n == "tic_diag":
        out[n] = cast(curv_lib.tic_diag(second, diag))
      elif n == "tic_trace":
        out[n] = cast(curv_lib.tic_trace(second, curv_lib.hessian_trace(diag)))
      elif n == "hess_trace":
        out[n + "_layers"] = jax.tree_util.tree_map(cast, curv_lib.layer_traces(diag))
        out[n] = cast(curv_lib.hessian_trace(diag))
      elif n == "hess_max_ev":
        from curvax.curvature import hessian_matvec  # pylint: disable=g-import-not-at-top
        from curvax.losses import objective  # pylint: disable=g-import-not-at-top
        mv = hessian_matvec(objective(apply_fn, loss), params, batch)
        with jax.named_scope("hess_max_ev"):
          value, vector = _top_eigenpair(mv, params, state.eigenvector.unpack(),
                                         jax.random.fold_in(key, 1), eigen_iterations,
                                         eigen_rtol)
        out[n] = cast(value)
        eigenvector = PackedTree.pack(otu.tree_cast_like(vector, state.eigenvector.unpack()))
    return PackedDict.pack(out), start, end, eigenvector

  def update_fn(updates, state, params=None, *, batch=None, scheduled=None,
                inner_scheduled=None, **extra_args):
    scheduled = _checks.static_flag(scheduled, "scheduled", "monitor")
    if params is None:
      raise TypeError("monitor.update needs `params` (the current parameters).")
    _checks.require_kwarg(batch, "batch", "monitor")
    batch = _checks.check_batch(batch)
    if inner_scheduled is not None:   # the inner optimizer's host schedule (it checks it)
      extra_args = dict(extra_args, scheduled=inner_scheduled)
    new_updates, inner_state = inner.update(updates, state.inner_state, params,
                                            batch=batch, **extra_args)
    count = state.count
    # The tracked step's randomness from the seed's key and the step: nothing
    # to advance (no split) on the steps that track nothing.
    sub = jax.random.fold_in(state.key, count)
    idle = scheduled is False     # the caller says: nothing scheduled (no cond)
    is_tracked = jnp.zeros((), bool) if idle else jnp.asarray(track(count), bool)

    if idle:
      diagnostics, start, end, eigenvector = (state.diagnostics, state.alpha_start, None,
                                              state.eigenvector)
    elif always_tracked:
      # No lax.cond when every step is tracked: inside a conditional's branch,
      # XLA:CPU leaves the per-example (grouped) weight-gradient convolutions of
      # the vmap path in a non-canonical layout that runs ~8x slower (3c3d,
      # batch 128: 0.87 s -> 7.3 s for the per-example norms alone; models built
      # with curvax.layers.PatchConv, as the problems are on CPU, have no convolutions).
      diagnostics, start, end, eigenvector = compute(updates, new_updates, params, batch,
                                                     state, sub)
    else:
      diagnostics, start, end, eigenvector = jax.lax.cond(
          is_tracked,
          lambda: compute(updates, new_updates, params, batch, state, sub),
          lambda: (state.diagnostics, state.alpha_start, None, state.eigenvector))

    alpha, alpha_step, alpha_fresh = state.alpha, state.alpha_step, jnp.zeros((), bool)
    last_update = state.last_update
    if need_alpha and not idle:
      # The previous update computed the start point (``tracked``: the
      # schedule's ``track(count - 1)``, unless the caller skipped that step).
      finish = state.tracked

      def end_point(losses1, p1):
        f0, vf0, m0, vp0, tau = (state.alpha_start[i] for i in range(5))
        safe = jnp.where(tau > 0, tau, 1.0)
        value = alpha_lib.alpha_from_fit(
            f0, jnp.mean(losses1), m0 / safe, jnp.mean(p1) / safe, vf0,
            alpha_lib.sample_variance(losses1), vp0 / safe ** 2,
            alpha_lib.sample_variance(p1) / safe ** 2, tau)
        return value.astype(state.alpha.dtype)

      if shared_end:   # no cond: on XLA:CPU a JVP inside one ran ~2x slower
        alpha = jnp.where(finish, end_point(*end), state.alpha)
      else:
        alpha = jax.lax.cond(
            finish,
            lambda: end_point(*jax.named_scope("alpha_end")(_losses_and_slopes)(
                apply_fn, loss, params, batch, state.last_update.unpack())),
            lambda: state.alpha)
      alpha_step = jnp.where(finish, count - 1, state.alpha_step)
      alpha_fresh = finish
    # The instruments (in conds, unless every step is tracked) read ``params``
    # and ``state.last_update``; made to depend on their results
    # (`ordered_after`), the update is computed after them, and so are the
    # caller's in-place parameter update and the in-place store of the update
    # below. Without that data dependency XLA copied the parameters and the
    # stored update (params-sized, each) on every step.
    # (The packed records whole: `ordered_after` reads one element of each
    # array in its second argument, and XLA folds element 0 of a
    # concatenation into its first operand, which would leave the other
    # records unordered; one element of each record cost a kernel each on a
    # GPU.) The idle variant has no instruments to order.
    if not idle:
      new_updates = ordered_after(new_updates, (start, alpha), whole=diagnostics)
    if need_alpha and not idle:
      # Written slot by slot into the stored vector (in place): packing the
      # update afresh concatenates computed leaves, which XLA:CPU runs ~30x
      # slower than computing them (see `PackedTree.update`).
      store = lambda: state.last_update.update(lambda _, u: u, new_updates)
      last_update = store() if always_tracked else jax.lax.cond(
          is_tracked, store, lambda: state.last_update)

    new_state = _state(
        inner_state=inner_state, count=count + 1, tracked=is_tracked,
        tracked_step=jnp.where(is_tracked, count, state.tracked_step),
        diagnostics=diagnostics, alpha=alpha, alpha_step=alpha_step,
        alpha_fresh=alpha_fresh, init_params=state.init_params,
        last_update=last_update, alpha_start=start, key=state.key, eigenvector=eigenvector)
    return new_updates, new_state

  return optax.GradientTransformationExtraArgs(init_fn, update_fn)
