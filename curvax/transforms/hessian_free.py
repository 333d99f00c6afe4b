"""Hessian-free optimisation (truncated Newton) as an optax transformation."""

from __future__ import annotations

from typing import Any, Callable, NamedTuple, Optional

import jax
import jax.numpy as jnp
import numpy as np
import optax
import optax.tree_utils as otu

from curvax import _checks
from curvax._buffers import own_buffers
from curvax import curvature as curvature_lib
from curvax import solvers
from curvax.losses import as_loss, objective

Array = jax.Array

_NAME = "hessian_free"

#: Arguments to list in ``optax.inject_hyperparams(..., static_args=...)``: the
#: functions (which inject_hyperparams would take for schedules) and the
#: integers that size buffers. Every float may be injected.
STATIC_ARGS = ("apply_fn", "loss", "regularizer", "cg_max_iter", "microbatch_size")


class HessianFreeState(NamedTuple):
  """State of `hessian_free`; every field is meant for logging.

  Attributes:
    count: number of ``update`` calls.
    damping: Tikhonov damping ``lambda`` for the next step.
    rho: reduction ratio of the last step (``-inf`` if the model predicted no
      decrease or a value was non-finite).
    cg_iterations: CG iterations of the last step.
    cg_status: `curvax.solvers.CGStatus` of the last CG run.
    chosen_iterate: slot of the backtracked iterate among the stored ones.
    chosen_iteration: the CG iteration of that iterate.
    alpha: line-search step size of the last step (0: no step taken).
    loss_before: evaluation loss ``L_eval(theta)`` before the last step.
    loss_after: evaluation loss after the last step.
    warm_start: the last CG solution (the final, not the backtracked, iterate);
      the next CG run starts from ``cg_decay_x0 * warm_start``.
    nonfinite: whether the last step met a non-finite value (and was rejected).
    nonfinite_count: how many steps were rejected so far.
  """
  count: Array
  damping: Array
  rho: Array
  cg_iterations: Array
  cg_status: Array
  chosen_iterate: Array
  chosen_iteration: Array
  alpha: Array
  loss_before: Array
  loss_after: Array
  warm_start: Any
  nonfinite: Array
  nonfinite_count: Array


def _known(value: Any) -> Optional[np.ndarray]:
  """``value`` as a float array if it is known when the transform is built.

  None for a traced value: under ``jax.jit``, or a hyperparameter that
  ``optax.inject_hyperparams`` passes in inside ``update``. (Its ``init`` passes
  the initial values as concrete arrays, so those are checked there.)
  """
  if isinstance(value, jax.core.Tracer):
    return None
  return np.asarray(value, dtype=float)


def _check_damping_and_tol(initial_damping: Any, min_damping: Any, max_damping: Any,
                           cg_tol: Any) -> None:
  """Raises a ValueError for damping bounds or a CG tolerance that cannot work.

  ``0 < min_damping <= max_damping``: the Levenberg-Marquardt update only
  multiplies the damping, so a damping of 0 could never grow again; the clamp
  to ``[min_damping, max_damping]`` needs a non-empty range. ``initial_damping
  >= 0``; 0 is fine: the first step is undamped and the update's clamp lifts
  the damping to ``min_damping`` after it. ``cg_tol >= 0``.
  """
  d0, lo, hi, tol = map(_known, (initial_damping, min_damping, max_damping, cg_tol))
  if d0 is not None and not np.all(d0 >= 0):
    raise ValueError(f"{_NAME}: initial_damping must be >= 0; got {initial_damping!r}.")
  if lo is not None and not np.all(lo > 0):
    raise ValueError(
        f"{_NAME}: min_damping must be > 0 (0 < min_damping <= max_damping: the "
        f"damping update only multiplies, so a damping of 0 could never grow); got "
        f"min_damping={min_damping!r}.")
  if hi is not None and not np.all(hi > 0):
    raise ValueError(
        f"{_NAME}: max_damping must be > 0 (0 < min_damping <= max_damping); got "
        f"max_damping={max_damping!r}.")
  if lo is not None and hi is not None and not np.all(lo <= hi):
    raise ValueError(
        f"{_NAME}: min_damping must not exceed max_damping (0 < min_damping <= "
        f"max_damping); got min_damping={min_damping!r}, max_damping={max_damping!r}.")
  if tol is not None and not np.all(tol >= 0):
    raise ValueError(f"{_NAME}: cg_tol must be >= 0; got {cg_tol!r}.")


# name -> (bound, open?) below and above: the ranges in which the Armijo search and
# the warm start do what they say (beta = 1 would never shrink the step; c >= 1
# asks for more decrease than the linear model promises).
_RANGES = {
    "linesearch_c": ((0.0, True), (1.0, True)),
    "linesearch_beta": ((0.0, True), (1.0, True)),
    "linesearch_initial_step": ((0.0, True), (np.inf, False)),
    "linesearch_max_reductions": ((0.0, False), (np.inf, False)),
    "cg_decay_x0": ((0.0, False), (1.0, False)),
    "martens_eps": ((0.0, False), (np.inf, False)),
    "preconditioner_exponent": ((0.0, False), (np.inf, False)),
}


def _check_ranges(**values: Any) -> None:
  """Raises a ValueError for a known value outside its range in `_RANGES`."""
  for name, value in values.items():
    v = _known(value)
    if v is None:
      continue
    (lo, lo_open), (hi, hi_open) = _RANGES[name]
    ok = (v > lo if lo_open else v >= lo) & (v < hi if hi_open else v <= hi)
    if not np.all(ok):
      lo_s = f"{lo:g} <" if lo_open else f"{lo:g} <="
      hi_s = "" if hi == np.inf else (f" < {hi:g}" if hi_open else f" <= {hi:g}")
      raise ValueError(f"{_NAME}: {name} must satisfy {lo_s} {name}{hi_s}; got {value!r}.")


def hessian_free(
    apply_fn: Callable[[Any, Any], Array],
    loss: Any,
    *,
    curvature: str = "ggn",
    regularizer: Optional[Callable[[Any], Array]] = None,
    initial_damping: float = 1.0,
    adapt_damping: bool = True,
    min_damping: float = 1e-8,
    max_damping: float = 1e8,
    cg_max_iter: Optional[int] = None,
    cg_tol: float = 1e-5,
    cg_decay_x0: float = 0.95,
    martens_criterion: bool = True,
    martens_eps: float = 5e-4,
    nonpositive_curvature: str = "stop",
    preconditioner: Optional[str] = None,
    preconditioner_exponent: float = 0.75,
    use_cg_backtracking: bool = True,
    use_linesearch: bool = True,
    linesearch_initial_step: float = 1.0,
    linesearch_c: float = 0.01,
    linesearch_beta: float = 0.8,
    linesearch_max_reductions: int = 20,
    microbatch_size: Optional[int] = None,
) -> optax.GradientTransformationExtraArgs:
  r"""Hessian-free optimisation (Martens 2010), as in seed 002, Algorithm 1.

  One step, with ``g`` the gradient on batch ``B`` (the ``updates`` optax
  passes in; it must already contain the regulariser's gradient):

  1. ``A = C + lambda I`` with ``C`` the GGN (``curvature="ggn"``, default) or
     the Hessian (``"hessian"``) of the batch-mean objective on ``B`` (plus the
     regulariser's curvature). Without ``microbatch_size`` the model (for
     ``"hessian"``, the gradient) is linearised once per step and every CG
     product reuses that; with it, every curvature product re-linearises on
     each chunk (see below).
  2. ``p_final = cg(A, -g, x0 = cg_decay_x0 * x_prev)`` (`curvax.solvers.cg`:
     Martens' relative-progress test, ``cg_max_iter``, residual ``cg_tol``; the
     iterates at ``ceil(1.3^j)`` are kept). Optional preconditioner
     ``"fisher"`` (Martens 2010, sec. 4.7): ``M = (diag(F) + lambda)^xi``,
     ``xi = preconditioner_exponent``, with ``diag(F) = (1/N) sum_n g_n^2`` the
     empirical Fisher diagonal from per-example gradients ``g_n`` of the
     per-example loss (the scale of ``C`` for a batch-mean objective; Martens
     writes the sum). The regulariser does not enter ``M``.
  3. ``rho = (L_eval(theta + p_final) - L_eval(theta)) / phi(p_final)`` with the
     damped model ``phi`` (PyTorchHessianFree's choice: final, not backtracked,
     iterate); ``lambda`` is updated by `curvax.solvers.levenberg_marquardt`
     (``adapt_damping``), clamped to ``[min_damping, max_damping]``. When
     gradient noise dominates (small batches late in training), the reduction
     measured on the disjoint batch stays far below the model's prediction,
     ``rho < 1/4`` nearly every step, and ``lambda`` grows until the steps
     vanish (notebooks/01: batch 128 on Fashion-MNIST reached ``max_damping``
     within about 130 steps). Use larger batches (seed 002: m = 256 to 6144
     with a disjoint batch of 1024), a smaller ``max_damping``, or
     ``adapt_damping=False`` there.
  4. ``p`` = `curvax.solvers.cg_backtracking` over the stored iterates on
     ``L_eval`` (``use_cg_backtracking``).
  5. ``alpha`` = `curvax.solvers.armijo` on ``L_eval(theta + alpha p)`` with
     slope ``g'p`` (``use_linesearch``; ``alpha = 1`` otherwise; 0 if no step
     size is accepted).
  6. The update is ``alpha p``. The next warm start is ``p_final``.

  ``L_eval`` is the objective on ``eval_batch`` (a second batch, disjoint from
  ``batch``: seed 002, App. A.2 shows that assessing steps on ``batch`` itself
  over-estimates progress); without ``eval_batch``, ``value_fn(params)``
  (optax's name for the objective of a line search). When both are given (a
  chain with an optax line search, which calls ``value_fn`` with the keywords
  it names), ``eval_batch`` is used here.

  If any of the loss, the gradient, a curvature product or the proposed step
  is non-finite, the update is zero, the damping is multiplied by 3/2 (clamped;
  with ``adapt_damping=False`` it stays), the warm start is reset to zero and ``nonfinite``/``nonfinite_count`` record
  it; parameters never see a non-finite value from this transform.

  With ``microbatch_size`` the loss values and curvature products are
  accumulated over chunks of that size (`curvax.solvers.microbatch_mean`),
  for batches too large to process at once; results equal the unchunked ones.
  It trades compute for memory: no linearisation is kept between products,
  so each curvature product runs the model's forward pass (for
  ``"hessian"``, forward and backward) again on every chunk, instead of
  once per step.

  Args:
    apply_fn: ``apply_fn(params, inputs) -> outputs``.
    loss: a `curvax.losses.Loss` or a per-example callable.
    curvature: ``"ggn"`` or ``"hessian"``.
    regularizer: optional ``r(params)`` added to the objective (value and
      curvature); its gradient must already be in ``updates``.
    initial_damping, adapt_damping, min_damping, max_damping: damping;
      ``initial_damping >= 0`` (0: an undamped first step, after which, with
      ``adapt_damping``, the clamp lifts the damping to ``min_damping``) and
      ``0 < min_damping <= max_damping`` (the update only multiplies the
      damping, so a damping of 0 would stay 0).
    cg_max_iter, cg_tol, cg_decay_x0, martens_criterion, martens_eps,
      nonpositive_curvature: CG (see `curvax.solvers.cg`). ``cg_max_iter=None``
      means 250 (Martens 2010); it sizes buffers, so it must be a Python int
      (see ``STATIC_ARGS`` below). ``cg_tol >= 0``.
    preconditioner: None or ``"fisher"``; preconditioner_exponent its ``xi``.
    use_cg_backtracking: CG backtracking on/off.
    use_linesearch, linesearch_initial_step, linesearch_c, linesearch_beta,
      linesearch_max_reductions: Armijo line search.
    microbatch_size: chunk size for loss and curvature evaluations; it must
      divide the sizes of ``batch`` and ``eval_batch``.

  Under ``optax.inject_hyperparams`` pass ``static_args=hessian_free.STATIC_ARGS``
  (the functions ``apply_fn``, ``loss``, ``regularizer`` and the integers
  ``cg_max_iter``, ``microbatch_size`` that size buffers); every float may be
  injected. The bounds above are checked on values known when the transform
  is built (numbers, and the initial values ``inject_hyperparams`` passes to
  ``init``); values traced inside ``update`` are not checked.

  Returns:
    An ``optax.GradientTransformationExtraArgs`` whose ``update(updates,
    state, params, *, batch, eval_batch=None, value_fn=None, **extra_args)``
    returns ``alpha p`` (unknown keywords are ignored).
  """
  if curvature not in ("ggn", "hessian"):
    raise ValueError(f"{_NAME}: curvature must be 'ggn' or 'hessian'; got {curvature!r}.")
  if preconditioner not in (None, "fisher"):
    raise ValueError(
        f"{_NAME}: preconditioner must be None or 'fisher'; got {preconditioner!r}.")
  if nonpositive_curvature not in ("stop", "abs"):
    raise ValueError(f"{_NAME}: nonpositive_curvature must be 'stop' or 'abs'; got "
                     f"{nonpositive_curvature!r}.")
  _check_damping_and_tol(initial_damping, min_damping, max_damping, cg_tol)
  _check_ranges(linesearch_c=linesearch_c, linesearch_beta=linesearch_beta,
                linesearch_initial_step=linesearch_initial_step,
                linesearch_max_reductions=linesearch_max_reductions,
                cg_decay_x0=cg_decay_x0, martens_eps=martens_eps,
                preconditioner_exponent=preconditioner_exponent)
  cg_max_iter = _checks.static_int(250 if cg_max_iter is None else cg_max_iter,
                                   "cg_max_iter", _NAME, 0, STATIC_ARGS)
  if microbatch_size is not None:
    microbatch_size = _checks.static_int(microbatch_size, "microbatch_size", _NAME, 1,
                                         STATIC_ARGS)
  _checks.require_callable(apply_fn, "apply_fn", _NAME, STATIC_ARGS)
  if regularizer is not None:
    _checks.require_callable(regularizer, "regularizer", _NAME, STATIC_ARGS)
  loss = as_loss(loss)
  loss_fn = objective(apply_fn, loss, regularizer)
  data_loss_fn = objective(apply_fn, loss)

  def init_fn(params):
    _checks.check_params(params, _NAME)
    dtype = optax.tree.dtype(params, "highest") if jax.tree_util.tree_leaves(params) \
        else jnp.float32
    zero = jnp.zeros((), dtype)
    int0 = jnp.zeros((), jnp.int32)
    return own_buffers(HessianFreeState(
        count=int0, damping=jnp.asarray(initial_damping, dtype), rho=zero,
        cg_iterations=int0, cg_status=int0, chosen_iterate=int0, chosen_iteration=int0,
        alpha=zero, loss_before=zero, loss_after=zero,
        warm_start=otu.tree_zeros_like(params), nonfinite=jnp.asarray(False),
        nonfinite_count=int0))

  def curvature_matvec(params, batch):
    if curvature == "ggn":
      def chunk_mv(chunk, v):
        return curvature_lib.ggn_matvec(apply_fn, loss, params, chunk)(v)
    else:
      def chunk_mv(chunk, v):
        return curvature_lib.hessian_matvec(data_loss_fn, params, chunk)(v)
    if microbatch_size is None:
      if curvature == "ggn":
        mv = curvature_lib.ggn_matvec(apply_fn, loss, params, batch)
      else:
        mv = curvature_lib.hessian_matvec(data_loss_fn, params, batch)
    else:
      def mv(v):
        return solvers.microbatch_mean(lambda c: chunk_mv(c, v), batch, microbatch_size)
    mv = curvature_lib.add_regularizer_curvature(mv, regularizer, params)
    # Tangents in the parameters' dtypes: linearisation requires them, and with
    # mixed precision (e.g. bfloat16 kernels, float32 biases) CG's vectors are
    # promoted by its float32 scalars (`solvers.cg` casts the product back).
    return lambda v: mv(otu.tree_cast_like(v, params))

  def fisher_diagonal(params, batch):
    def per_example(p, x, y):
      one = lambda a: a[None]  # noqa: E731  (inputs and targets may be pytrees)
      return loss(apply_fn(p, jax.tree.map(one, x)), jax.tree.map(one, y))[0]
    per_grad = jax.vmap(jax.grad(per_example), in_axes=(None, 0, 0))

    def chunk_fisher(chunk):
      x, y = chunk
      return jax.tree.map(lambda a: jnp.mean(jnp.square(a), axis=0), per_grad(params, x, y))
    return solvers.microbatch_mean(chunk_fisher, batch, microbatch_size)

  def update_fn(updates, state, params=None, *, batch=None, eval_batch=None,
                value_fn=None, **extra_args):
    del extra_args
    if params is None:
      raise TypeError(f"{_NAME}.update needs `params` (the current parameters).")
    batch = _checks.require_kwarg(batch, "batch", _NAME)
    batch = _checks.check_batch(batch, "batch")
    _checks.check_tree_like(updates, params, "updates", "params")
    _checks.check_tree_like(state.warm_start, params, "state.warm_start", "params")
    # The gradient in the parameters' dtypes, as CG's iterates (a wider or
    # narrower gradient mixed dtypes inside the solve).
    updates = otu.tree_cast_like(updates, params)
    if eval_batch is None and value_fn is None:
      raise TypeError(
          f"{_NAME}.update needs the keyword argument `eval_batch`: a second batch "
          "(inputs, targets), disjoint from `batch`, on which damping, backtracking "
          "and the line search evaluate the loss; or, instead, `value_fn`, a "
          "function of params giving that loss.")
    if eval_batch is not None:
      eval_batch = _checks.check_batch(eval_batch, "eval_batch")

      def eval_loss(p):
        return solvers.microbatch_mean(lambda c: loss_fn(p, c), eval_batch,
                                       microbatch_size, batch_name="eval_batch")
    else:
      if not callable(value_fn):
        raise TypeError(f"{_NAME}: value_fn must be a function of params.")
      eval_loss = value_fn

    g = updates
    damping = state.damping
    dtype = damping.dtype
    curv_mv = curvature_matvec(params, batch)

    def damped(v):
      return otu.tree_add_scale(curv_mv(v), damping, v)

    precond = None
    if preconditioner == "fisher":
      diag = fisher_diagonal(params, batch)
      m = jax.tree.map(lambda d: (d + damping) ** preconditioner_exponent, diag)
      precond = lambda r: otu.tree_div(r, m)  # noqa: E731

    x0 = otu.tree_scale(cg_decay_x0, state.warm_start)
    res = solvers.cg(damped, otu.tree_scale(-1.0, g), x0, preconditioner=precond,
                     max_iter=cg_max_iter, tol=cg_tol, martens_criterion=martens_criterion,
                     martens_eps=martens_eps, nonpositive_curvature=nonpositive_curvature)
    p_final = res.x

    def step_loss(x):
      # The loss where optax.apply_updates would put the parameters: the step
      # is cast to their dtypes.
      return eval_loss(otu.tree_add(params, otu.tree_cast_like(x, params)))

    loss_before = jnp.asarray(eval_loss(params), dtype)
    loss_final = jnp.asarray(step_loss(p_final), dtype)
    rho = solvers.reduction_ratio(loss_before, loss_final, res.phi).astype(dtype)
    if adapt_damping:
      new_damping = solvers.levenberg_marquardt(damping, rho, min_damping=min_damping,
                                                max_damping=max_damping)
    else:
      new_damping = damping

    if use_cg_backtracking:
      bt = solvers.cg_backtracking(step_loss, res.iterates, res.num_iterates,
                                   last_loss=loss_final)
      p, loss_p, index = bt.iterate, bt.loss.astype(dtype), bt.index
    else:
      p, loss_p, index = p_final, loss_final, res.num_iterates - 1
    chosen_iteration = res.iterate_steps[index]

    if use_linesearch:
      slope = otu.tree_vdot(g, p).real.astype(dtype)
      ls = solvers.armijo(lambda a: jnp.asarray(step_loss(otu.tree_scale(a, p)), dtype),
                          loss_before, slope, initial_step=linesearch_initial_step,
                          c=linesearch_c, beta=linesearch_beta,
                          max_reductions=linesearch_max_reductions,
                          initial_value=(loss_p if isinstance(linesearch_initial_step, (int, float))
                                         and linesearch_initial_step == 1.0 else None))
      alpha, loss_after = ls.step_size, ls.loss
    else:
      alpha, loss_after = jnp.asarray(1.0, dtype), loss_p
    step = otu.tree_scale(alpha, p)

    finite = (_checks.tree_all_finite(g) & jnp.isfinite(loss_before) & jnp.isfinite(loss_after)
              & (res.status != solvers.CGStatus.NONFINITE) & _checks.tree_all_finite(p_final)
              & _checks.tree_all_finite(step))
    zeros = otu.tree_zeros_like(params)
    step = otu.tree_where(finite, step, zeros)
    step = otu.tree_cast_like(step, params)
    if adapt_damping:
      new_damping = jnp.where(
          finite, new_damping, jnp.clip(damping * 1.5, min_damping, max_damping))
    warm = otu.tree_cast_like(
        otu.tree_where(finite & _checks.tree_all_finite(p_final), p_final, zeros), params)

    new_state = HessianFreeState(
        count=optax.safe_increment(state.count),
        damping=new_damping.astype(dtype),
        rho=rho,
        cg_iterations=res.iterations,
        cg_status=res.status,
        chosen_iterate=index.astype(jnp.int32),
        chosen_iteration=chosen_iteration.astype(jnp.int32),
        alpha=jnp.where(finite, alpha, 0.0).astype(dtype),
        loss_before=loss_before,
        loss_after=jnp.where(finite, loss_after, loss_before).astype(dtype),
        warm_start=warm,
        nonfinite=~finite,
        nonfinite_count=state.nonfinite_count + (~finite).astype(jnp.int32))
    return step, new_state

  return optax.GradientTransformationExtraArgs(init_fn, update_fn)
