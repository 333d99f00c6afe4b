"""Curvature-based step sizes on top of any optax optimizer (seed 004)."""

from __future__ import annotations

from typing import Any, Callable, NamedTuple, Optional, Tuple, Union

import jax
import jax.numpy as jnp
import numpy as np
import optax
import optax.tree_utils as otu

from curvax import _checks
from curvax._buffers import own_buffers
from curvax._packed import install_packed_fields
from curvax.curvature.quadratic_step_size import (quadratic_step_size,
                                                   step_size_from_parts,
                                                   step_size_is_defined)
from curvax.losses import as_loss, objective

Array = jax.Array

_NAME = "curvature_step_size"

#: Arguments to list in ``optax.inject_hyperparams(..., static_args=...)``: the
#: functions (which inject_hyperparams would take for schedules) and the
#: interval mode's ``num_estimates``, which sizes an array. ``warmup_steps``,
#: ``interval``, ``learning_rate`` and the floats may be injected.
STATIC_ARGS = ("inner", "apply_fn", "loss", "regularizer", "num_estimates")


#: The scalar quantities of `CurvatureStepSizeState`, packed in ``values`` (in
#: the parameters' float dtype; the interval window's estimates follow them)
#: and ``counts`` (int32), in this order.
_VALUE_FIELDS = ("alpha", "alpha_absolute", "numerator", "denominator", "eval_loss",
                 "biased_numerator", "biased_denominator", "hybrid", "cos_batch", "cos_eval",
                 "direction_norm", "learning_rate", "held_learning_rate", "scale",
                 "window_median")
_COUNT_FIELDS = ("count", "computed", "num_computed", "num_negative", "num_undefined",
                 "num_nonfinite")
# The values a step without measurement writes (contiguous in _VALUE_FIELDS).
_STEP_FIELDS = ("learning_rate", "held_learning_rate", "scale", "window_median")
assert _VALUE_FIELDS[_VALUE_FIELDS.index(_STEP_FIELDS[0]):][:len(_STEP_FIELDS)] == _STEP_FIELDS


class CurvatureStepSizeState(NamedTuple):
  """State of `curvature_step_size`: everything a researcher logs.

  Quantities measured with curvature are those of the latest step that
  computed curvature (``computed`` says whether it was this one); NaN before
  the first such step. "Absolute" is relative times the inner learning rate
  ``eta_t`` (the ``learning_rate`` argument).

  The scalars are packed in two arrays, ``values`` and ``counts``, and read
  by name (``state.alpha``, ``state.num_computed``, ...; all of them:
  ``state.scalars()``): each array of a state costs a jitted call host time
  (measured ~10 us per array in and out on a GPU machine, where a step of a
  small model is shorter than that), and XLA:GPU updates each scalar array
  with a kernel of its own (docs/performance.md).

  Attributes:
    inner_state: the inner optimizer's state.
    values: the float scalars below, in the parameters' dtype, then
      ``estimates``.
    counts: the int32 scalars below (``computed`` as 0 / 1).

  Properties:
    estimates: interval mode: absolute ``alpha*`` of the current estimation
      window (NaN where not usable); shape ``(num_estimates,)`` (``(1,)`` in
      ``every_step`` mode); read only (``values[..., 15:]``).
    count: number of updates so far.
    alpha: relative ``alpha* = -d'g / d'Gd`` (the factor on ``eta_t``); NaN if
      undefined (``d'Gd <= 0`` or not finite).
    alpha_absolute: ``alpha * eta_t``, the learning rate the method proposes.
    numerator: ``d'g`` on the evaluation batch (``eval_batch`` if debiasing).
    denominator: ``d'Gd`` on the evaluation batch.
    eval_loss: the objective at ``params`` on the evaluation batch (free).
    biased_numerator: ``d'u`` with ``u`` the incoming ``updates`` (the gradient on
      ``batch``); equals ``numerator`` when not debiasing, else needs
      ``diagnostics=True`` (a reduction over the parameters).
    biased_denominator: ``d'Gd`` on ``batch`` (``diagnostics=True`` when
      debiasing: one more JVP; the evaluation one otherwise).
    hybrid: ``-numerator / biased_denominator`` (seed 004 Eq. 3.5, signed like
      ``alpha``); NaN unless computed.
    cos_batch: ``cos(d, -u)``: cosine between the step and the negative gradient
      on ``batch`` (1 for plain SGD); ``diagnostics=True`` only.
    cos_eval: the same on the evaluation batch (``diagnostics=True`` when
      debiasing: one more gradient; equals ``cos_batch`` otherwise).
    direction_norm: ``||d||`` of the inner optimizer's proposal;
      ``diagnostics=True`` only.
    learning_rate: the absolute learning rate applied this step (the step is
      ``(learning_rate / eta_t) * d``).
    held_learning_rate: the learning rate carried to the next step: the
      fallback of ``every_step`` mode, the current median of ``interval`` mode.
    scale: the factor applied to ``d`` this step (``learning_rate / eta_t``).
    window_median: interval mode: the median of ``estimates`` (their usable
      entries; NaN if none), kept up to date by the steps that measure, so
      that the step closing a window without measuring (passed
      ``scheduled=False``) applies it without sorting; NaN in ``every_step``
      mode.
    computed: whether this step computed curvature (bool).
    num_computed, num_negative, num_undefined: counts over all curvature steps
      of computed, negative and undefined ``alpha*``.
    num_nonfinite: updates zeroed because the step ``(lr / eta_t) d`` was not
      finite (a non-finite inner proposal, or an overflowing rescaling).
  """
  inner_state: Any
  values: Array
  counts: Array

  @property
  def estimates(self) -> Array:
    """Interval mode: the estimation window's absolute ``alpha*`` (see above)."""
    return self.values[..., len(_VALUE_FIELDS):]

  @property
  def negative_fraction(self) -> Array:
    """Fraction of negative ``alpha*`` among all computed so far."""
    return self.num_negative / jnp.maximum(self.num_computed, 1)


# state.alpha, ..., state.scalars(); _scalar_names, _packed_fields (loggable_state).
install_packed_fields(CurvatureStepSizeState, {"values": _VALUE_FIELDS, "counts": _COUNT_FIELDS},
                      casts={"computed": bool})


class _Measurement(NamedTuple):
  numerator: Array
  denominator: Array
  eval_loss: Array
  biased_numerator: Array
  biased_denominator: Array
  cos_batch: Array
  cos_eval: Array
  direction_norm: Array


def _masked_median(values: Array) -> Array:
  """Median of the non-NaN entries (mean of the two middle ones for an even
  count); NaN if there are none."""
  present = ~jnp.isnan(values)
  k = jnp.sum(present)
  ordered = jnp.sort(jnp.where(present, values, jnp.inf))
  lo = ordered[jnp.maximum((k - 1) // 2, 0)]
  hi = ordered[jnp.minimum(k // 2, values.shape[0] - 1)]
  return jnp.where(k > 0, 0.5 * (lo + hi), jnp.nan)


def _due(step, mode: str, warmup_steps, interval, num_estimates):
  """Whether the schedule computes alpha* at ``step`` (Python ints or traced)."""
  after_warmup = step >= warmup_steps
  if mode == "interval":
    return after_warmup & ((step - warmup_steps) % interval < num_estimates)
  return after_warmup


def computes_curvature(step: int, *, mode: str = "every_step", warmup_steps: int = 0,
                       interval: int = 1000, num_estimates: int = 10) -> bool:
  """Whether `curvature_step_size` with these settings computes alpha* at ``step``.

  Evaluated on the host, for ``update(..., scheduled=...)``: a training loop
  that knows the step number compiles two variants of its step (``scheduled``
  static under ``jax.jit``) and calls the one without curvature on the other
  steps, which then contain no ``lax.cond`` (GPU runtimes wait for the host on
  each). ``step`` counts updates from 0, like the state's ``count``; the
  keywords are the transform's.
  """
  if mode not in ("every_step", "interval"):
    raise ValueError(f"{_NAME}: mode must be 'every_step' or 'interval'; got {mode!r}.")
  return bool(_due(int(step), mode, int(warmup_steps), int(interval),
                   int(num_estimates) if mode == "interval" else 1))


def _float_dtype(params):
  leaves = [l for l in jax.tree_util.tree_leaves(params)
            if jnp.issubdtype(jnp.result_type(l), jnp.floating)]
  return jnp.result_type(*leaves) if leaves else jnp.result_type(float)


def curvature_step_size(
    inner: optax.GradientTransformation,
    apply_fn: Callable[[Any, Any], Array],
    loss: Any,
    *,
    learning_rate: Union[float, optax.Schedule] = 1.0,
    debias: bool = True,
    mode: str = "every_step",
    warmup_steps: int = 0,
    interval: int = 1000,
    num_estimates: int = 10,
    positive_only: bool = False,
    clip: Optional[Tuple[float, float]] = None,
    regularizer: Optional[Callable[[Any], Array]] = None,
    curvature: str = "ggn",
    diagnostics: bool = False,
) -> optax.GradientTransformationExtraArgs:
  r"""Rescales any optax optimizer's step to the minimiser of the quadratic model.

  The inner optimizer proposes ``d`` from the gradient it is given
  (``updates``; ``d`` includes its learning rate ``eta_t``). With ``g`` and
  ``G`` the gradient and GGN (``curvature="hessian"``: Hessian) of the
  objective at ``params`` (before the step),
  the minimiser of the quadratic model along ``d`` is

  .. math:: \alpha^* = -\frac{d^\top g}{d^\top G d}
     \quad\text{(Suckrow 2025, seed 004 Eqs. 3.2-3.3),}

  the *relative* step (a factor on ``eta_t``); ``alpha* eta_t`` is the
  *absolute* step, the learning rate the method proposes. Debiasing (seed 004
  Eq. 3.4, after Tatzel et al. 2024): ``d`` comes from ``batch`` (through
  ``updates``) and slope and curvature are measured on a second batch
  ``eval_batch``; ``debias=False`` measures them on ``batch``.

  ``alpha*`` costs one forward-mode pass (a JVP of the model along ``d``) on the
  evaluation batch, no backward pass and no GGN matvec: see
  `curvax.curvature.quadratic_step_size`.

  Modes:

  * ``"every_step"``: after ``warmup_steps`` steps of the unchanged inner
    optimizer, every step computes ``alpha*`` and applies ``alpha* d``
    (absolute learning rate ``alpha* eta_t``, clipped to ``clip``).
  * ``"interval"``, the stabilised schedule of seed 004 Sec. 4.5 (Fig. 4.8):
    ``warmup_steps`` steps of the unchanged inner optimizer (following its own
    schedule); then, at the start of every window of ``interval`` steps,
    ``alpha*`` is computed on ``num_estimates`` consecutive steps while the
    learning rate stays at its held value; after the last of them the held
    learning rate becomes the median (mean of the two middle values for an
    even count) of the usable absolute estimates, clipped to ``clip``, and is
    applied until the next window's median. By default (the seed's rule,
    ``positive_only=False``) the median is of all defined estimates and is
    applied only if positive: when most estimates say ``d`` is not a descent
    direction on the evaluation batch, the learning rate stays. With
    ``positive_only=True`` only the defined positive estimates count (a window
    with a few positive estimates among negative ones then sets the learning
    rate from those few). No usable estimate, or a non-positive median: the
    learning rate is unchanged. Steps outside the windows compute no curvature
    (``lax.cond``, or ``scheduled=False``: see "Host-side schedule").

  ``every_step`` mode trusts each step's ``alpha*``: on a non-convex loss it
  can grow step after step until the iterate lands where every later
  ``alpha*`` is undefined, and the last (huge) rate is then held. Give it a
  ``clip`` range, or use ``interval`` mode (a median over several estimates),
  which seed 004 found stable.

  Safeguards and fallback: an undefined ``alpha*`` (``d'Gd <= 0`` or not
  finite) or a negative one is never applied. The step then uses the held
  learning rate: the last applied one (in ``every_step`` mode; at the first
  step that is ``eta_0``, i.e. the inner step unchanged) or the current median
  (``interval`` mode). ``clip=(lo, hi)`` bounds the learning rates that come
  from ``alpha*`` (each step's, or the interval mode's median); warm-up steps
  run the inner optimizer's own ``eta_t``, and until the first usable estimate
  the step keeps the last warm-up learning rate (``eta_0`` without warm-up),
  held constant and unclipped. A non-finite step (a non-finite inner proposal, or a finite one
  that overflows when rescaled) is never applied: the update is zeroed and
  ``num_nonfinite`` counts it. The inner state still advances (selecting
  the old one would cost a pass over the optimizer state every step): wrap the
  whole optimizer in ``optax.apply_if_finite`` to skip such steps entirely.

  Conversions between relative and absolute steps use ``learning_rate``, which
  must be the learning rate (float or schedule) contained in the inner
  optimizer's output, e.g. ``curvature_step_size(optax.nadamw(sched), ...,
  learning_rate=sched)``. The default 1.0 suits an inner transformation without
  a learning rate (e.g. ``optax.scale_by_adam()`` followed by ``optax.scale(-1)``)
  and makes absolute equal relative. The step applied is ``(lr / eta_t) d``: with
  ``eta_t = 0`` the update is zero.

  Regulariser: the objective is ``batch mean of loss + r(params)``; the
  ``updates`` the user passes already contain ``grad r`` (curvax's contract),
  and ``r``'s slope and curvature along ``d`` are added to the numerator and
  denominator. Decoupled weight decay (``optax.adamw``/``nadamw``) is part of
  ``d``, not of ``g``.

  Args:
    inner: any optax transformation proposing the update ``d`` (it receives
      ``updates``, ``params`` and all keyword arguments).
    apply_fn: ``apply_fn(params, inputs) -> outputs``.
    loss: a `curvax.losses.Loss` or a plain per-example callable.
    learning_rate: the learning rate (float or schedule of the step count)
      inside ``d``; see above.
    debias: measure slope and curvature on ``eval_batch`` (True) or ``batch``.
    mode: ``"every_step"`` or ``"interval"``.
    warmup_steps: steps run with the inner optimizer unchanged, no curvature.
    interval: interval mode: window length ``I`` (>= ``num_estimates``).
    num_estimates: interval mode: consecutive estimates ``N`` per window.
    positive_only: interval mode: median over the positive estimates only
      (default: over all defined estimates, applied if positive).
    clip: optional ``(lo, hi)``, ``0 <= lo <= hi``, bounds of the absolute
      learning rates derived from ``alpha*``.
    regularizer: optional ``r(params) -> scalar`` of the objective.
    curvature: ``"ggn"`` (``d'Gd``, the spec's) or ``"hessian"`` (``d'Hd``,
      for models whose output is the loss, where the GGN is zero; see
      `curvax.curvature.quadratic_step_size`).
    diagnostics: measure ``direction_norm``, ``cos_batch`` and (debiasing)
      ``biased_numerator`` (reductions over the parameters, each about as
      costly as an elementwise optimizer update on XLA:CPU); when debiasing,
      also ``d'Gd`` on ``batch`` (one more JVP: ``biased_denominator``,
      ``hybrid``) and the gradient on ``eval_batch`` (one more backward pass:
      ``cos_eval``). Off by default: they cost time. Without them these
      fields are NaN (``hybrid`` equals ``alpha`` when not debiasing).

  Under ``optax.inject_hyperparams`` pass
  ``static_args=curvature_step_size.STATIC_ARGS`` (the functions and
  ``num_estimates``, which sizes an array); ``learning_rate``,
  ``warmup_steps``, ``interval`` and the floats may then be injected.

  Host-side schedule: steps that may or may not compute curvature branch with
  ``lax.cond`` on the step count, and a GPU runtime waits for the host at each
  cond. A loop that knows the step number can pass ``scheduled`` (a Python
  bool, static under ``jax.jit``): ``scheduled=False`` compiles the step
  without curvature and without the cond, ``True`` (or ``None``, the default)
  with them; ``computes_curvature(t, mode=..., warmup_steps=..., interval=...,
  num_estimates=...)`` says which. A step passed ``False`` that the schedule
  wanted computes nothing (``computed`` is False; its estimate is missing
  from its window). The results are otherwise the same::

    @functools.partial(jax.jit, static_argnames="scheduled")
    def step(params, state, batch, eval_batch, scheduled): ...
    step(params, state, batch, eval_batch, scheduled=computes_curvature(t, **kw))

  Returns:
    An ``optax.GradientTransformationExtraArgs``; ``update(updates, state,
    params, *, batch, eval_batch=None, scheduled=None, **extra_args)`` (unknown
    keywords are forwarded to ``inner`` and otherwise ignored).
  """
  if mode not in ("every_step", "interval"):
    raise ValueError(f"{_NAME}: mode must be 'every_step' or 'interval'; got {mode!r}.")
  # warmup_steps and interval are only compared with the step count, so they
  # may be traced (optax.inject_hyperparams); they are checked when concrete.
  if not isinstance(warmup_steps, jax.core.Tracer) and int(warmup_steps) < 0:
    raise ValueError(f"{_NAME}: warmup_steps must be >= 0; got {warmup_steps}.")
  # A traced warmup_steps (injected) may be anything: keep the cond then.
  no_warmup = not isinstance(warmup_steps, jax.core.Tracer) and int(warmup_steps) == 0
  num_slots = 1
  if mode == "interval":
    num_slots = _checks.static_int(num_estimates, "num_estimates", _NAME, 1, STATIC_ARGS)
    if not isinstance(interval, jax.core.Tracer) and int(interval) < num_slots:
      raise ValueError(
          f"{_NAME}: interval mode needs 1 <= num_estimates <= interval; got "
          f"num_estimates={num_estimates}, interval={interval}.")
  if clip is not None:
    lo, hi = clip
    if not 0 <= lo <= hi:
      raise ValueError(f"{_NAME}: clip must be (lo, hi) with 0 <= lo <= hi; got {clip}.")
  if curvature not in ("ggn", "hessian"):
    raise ValueError(f"{_NAME}: curvature must be 'ggn' or 'hessian'; got {curvature!r}.")
  if not isinstance(inner, optax.GradientTransformation):
    raise TypeError(f"{_NAME}: inner must be an optax.GradientTransformation (e.g. "
                    f"optax.sgd(0.1)); got {type(inner).__name__}.")
  _checks.require_callable(apply_fn, "apply_fn", _NAME, STATIC_ARGS)
  if regularizer is not None:
    _checks.require_callable(regularizer, "regularizer", _NAME, STATIC_ARGS)
  loss = as_loss(loss)
  inner = optax.with_extra_args_support(inner)
  lr_fn = learning_rate if callable(learning_rate) else (lambda _: learning_rate)

  def init_fn(params):
    _checks.check_params(params, _NAME)
    dtype = _float_dtype(params)
    nan = jnp.full((), jnp.nan, dtype)
    eta0 = jnp.asarray(lr_fn(jnp.zeros((), jnp.int32)), dtype)
    values = dict.fromkeys(_VALUE_FIELDS, nan)
    values.update(learning_rate=eta0, held_learning_rate=eta0, scale=jnp.ones((), dtype))
    return own_buffers(CurvatureStepSizeState(
        inner_state=inner.init(params),
        values=jnp.concatenate([jnp.stack([values[f] for f in _VALUE_FIELDS]),
                                jnp.full((num_slots,), jnp.nan, dtype)]),
        counts=jnp.zeros((len(_COUNT_FIELDS),), jnp.int32)))

  def clip_lr(lr):
    return lr if clip is None else jnp.clip(lr, clip[0], clip[1])

  def update_fn(updates, state, params=None, *, batch=None, eval_batch=None, scheduled=None,
                **extra_args):
    scheduled = _checks.static_flag(scheduled, "scheduled", _NAME)
    if params is None:
      raise TypeError(f"{_NAME}.update needs `params` (slope and curvature are "
                      "measured at the current parameters).")
    _checks.require_kwarg(batch, "batch", _NAME)
    _checks.check_batch(batch, "batch")
    _checks.check_tree_like(updates, params, "updates", "params")
    if debias:
      if eval_batch is None:
        raise TypeError(
            f"{_NAME}(debias=True).update needs the keyword argument `eval_batch`: a "
            "second batch (inputs, targets) on which slope and curvature are measured; "
            "pass eval_batch=... or build the transform with debias=False.")
      _checks.check_batch(eval_batch, "eval_batch")
    curv_batch = eval_batch if debias else batch
    dtype = state.values.dtype

    def propose():
      return inner.update(updates, state.inner_state, params, batch=batch,
                          eval_batch=eval_batch, **extra_args)

    t = state.count
    eta = jnp.asarray(lr_fn(t), dtype)
    in_warmup = t < warmup_steps
    position = ((t - warmup_steps) % interval if mode == "interval"
                else jnp.zeros((), jnp.int32))
    # ``due``: the schedule wants alpha* this step; ``compute``: it is measured
    # (not when the caller passed ``scheduled=False``). The windows' bookkeeping
    # follows ``due``, so a skipped estimate is only missing from its window.
    due = jnp.asarray(_due(t, mode, warmup_steps, interval, num_slots))
    compute = due if scheduled is None else due & scheduled

    nan = jnp.full((), jnp.nan, dtype)

    def measure(d):
      m = quadratic_step_size(apply_fn, loss, params, d, curv_batch, regularizer=regularizer,
                              curvature=curvature)
      if diagnostics:
        # Reductions over the parameters: on XLA:CPU each costs about as much as
        # the inner optimizer's update, so they are opt-in.
        d_norm = otu.tree_norm(d)
        biased_num = otu.tree_vdot(d, updates)
        cos_batch = -biased_num / (d_norm * otu.tree_norm(updates))
      else:
        d_norm = cos_batch = nan
        biased_num = nan if debias else m.numerator
      if debias and diagnostics:
        biased_den = quadratic_step_size(apply_fn, loss, params, d, batch,
                                         regularizer=regularizer,
                                         curvature=curvature).denominator
        g_eval = jax.grad(objective(apply_fn, loss, regularizer))(params, eval_batch)
        cos_eval = -otu.tree_vdot(d, g_eval) / (d_norm * otu.tree_norm(g_eval))
      elif debias:
        biased_den = cos_eval = nan
      else:
        biased_den, cos_eval = m.denominator, cos_batch
      return jax.tree.map(lambda x: jnp.asarray(x, dtype), _Measurement(
          m.numerator, m.denominator, m.loss, biased_num, biased_den, cos_batch,
          cos_eval, d_norm))

    def skip(_):
      return _Measurement(*([jnp.full((), jnp.nan, dtype)] * len(_Measurement._fields)))

    if scheduled is False:
      d, inner_state = propose()
      meas = skip(None)  # the caller knows the schedule has nothing here: no cond
    elif mode == "every_step" and no_warmup:
      d, inner_state = propose()
      meas = measure(d)  # every step computes: no cond needed
    else:
      # The inner update runs inside both branches: a cond taking the proposal
      # d as an operand forces XLA to materialise it between the fused gradient
      # and update loops (measured: ~1.3x the bare step on steps that compute
      # nothing, against ~1.1x this way).
      def with_measure(_):
        d, s = propose()
        return d, s, measure(d)
      def without(_):
        d, s = propose()
        return d, s, skip(None)
      d, inner_state, meas = jax.lax.cond(compute, with_measure, without, None)

    defined = step_size_is_defined(meas.numerator, meas.denominator)
    alpha = step_size_from_parts(meas.numerator, meas.denominator)
    alpha_abs = alpha * eta
    usable = compute & defined & (alpha > 0) & jnp.isfinite(alpha_abs)
    held = state.held_learning_rate

    if mode == "every_step":
      lr = jnp.where(in_warmup, eta, jnp.where(usable, clip_lr(alpha_abs), held))
      new_held = lr
      estimates = jnp.where(compute, jnp.where(usable, alpha_abs, jnp.nan)[None],
                            state.estimates)
      median = nan
    else:
      lr = jnp.where(in_warmup, eta, held)
      accept = usable if positive_only else (compute & defined & jnp.isfinite(alpha_abs))
      restart = due & (position == 0)     # a new window starts empty
      estimates = jnp.where(restart, jnp.full_like(state.estimates, jnp.nan), state.estimates)
      slot = jnp.clip(position, 0, num_slots - 1)
      if scheduled is False:
        # Nothing measured: the window changed at most by its restart (no
        # estimate, median NaN), so its median is the stored one: no sort.
        median = jnp.where(restart, jnp.nan, state.window_median)
      else:
        estimates = jnp.where(compute, estimates.at[slot].set(
            jnp.where(accept, alpha_abs, jnp.nan)), estimates)
        median = _masked_median(estimates)   # NaN iff the window has no usable estimate
      window_done = due & (position == num_estimates - 1)
      new_held = jnp.where(in_warmup, eta,
                           jnp.where(window_done & (median > 0), clip_lr(median), held))
    scale = jnp.where(eta != 0, lr / jnp.where(eta != 0, eta, 1), 0).astype(dtype)

    # The guard checks the step itself: a finite d times a finite, usable
    # learning rate can still overflow (the seed saw alpha* above 1e14).
    step = jax.tree.map(lambda x: scale.astype(x.dtype) * x, d)
    finite = _checks.scaled_tree_all_finite(scale, d)  # = tree_all_finite(step)
    new_updates = jax.tree.map(lambda x: jnp.where(finite, x, jnp.zeros_like(x)), step)

    hybrid = step_size_from_parts(meas.numerator, meas.biased_denominator)
    # The packed scalars, by name. Measured quantities are kept from the last
    # step that computed them (one select over the vector); the rest is this
    # step's; counters accumulate, ``computed`` does not.
    measured = dict(meas._asdict(), alpha=alpha, alpha_absolute=alpha_abs, hybrid=hybrid)
    now = dict(measured, learning_rate=lr, held_learning_rate=new_held, scale=scale,
               window_median=median)
    if scheduled is False:
      # Nothing measured: only this step's rates change (contiguous in
      # _VALUE_FIELDS), written in place, and the window (its reset).
      first = _VALUE_FIELDS.index(_STEP_FIELDS[0])
      values = jax.lax.dynamic_update_slice(
          state.values, jnp.stack([jnp.asarray(now[f], dtype) for f in _STEP_FIELDS]),
          (first,))
      if mode == "interval":
        values = jnp.where((np.arange(values.shape[-1]) >= len(_VALUE_FIELDS)) & restart,
                           jnp.nan, values)
    else:
      values = jnp.where(np.array([f in measured for f in _VALUE_FIELDS]) & ~compute,
                         state.values[:len(_VALUE_FIELDS)],
                         jnp.stack([jnp.asarray(now[f], dtype) for f in _VALUE_FIELDS]))
      values = jnp.concatenate([values, estimates.astype(dtype)])
    # ``count`` as optax.safe_int32_increment: it stops at the int32 maximum.
    steps = dict(count=t < jnp.iinfo(jnp.int32).max, computed=compute, num_computed=compute,
                 num_negative=compute & defined & (alpha < 0),
                 num_undefined=compute & ~defined, num_nonfinite=~finite)
    counts = (jnp.where(np.array([f != "computed" for f in _COUNT_FIELDS]), state.counts, 0)
              + jnp.stack([steps[f] for f in _COUNT_FIELDS]).astype(jnp.int32))
    new_state = CurvatureStepSizeState(inner_state=inner_state, values=values, counts=counts)
    return new_updates, new_state

  return optax.GradientTransformationExtraArgs(init_fn, update_fn)
