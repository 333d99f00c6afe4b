r"""Probabilistic preconditioning (de Roos & Hennig 2019) as an optax transformation.

de Roos & Hennig (2019), "Active Probabilistic Inference on Matrices for
Pre-Conditioning in Stochastic Optimization" (AISTATS); the algorithm, its
defaults and its variants as documented in the seed 000_102983c1e1ef3813.txt
(chapter 3: the PyTorch class ``Preconditioner``; chapter 4: PreconditionedSGD,
AdaptiveSGD, OnlyAdaptiveSGD, the "tuned" variants) and specified in
``specs/probabilistic_preconditioning.md``. Equation labels (P1-P3, O1-O2,
B1-B3, W1, L1, C1-C2) are defined in this docstring and in
`curvax.solvers.bayesian_hessian`, in the order the spec displays them.

One estimation round (``P = prior_iterations``, ``M = num_observations``), the
parameters stay fixed while it gathers data:

=================  =======================================================  ========
round step t       action                                                   params
=================  =======================================================  ========
0 .. P-1           prior statistics from v_i = g_i, u_i = H_i v_i            fixed
P-1                fit alpha, w, lam (P1-P3); observation 1 (O1)            fixed
P .. P+M-2         one active observation per step (O2), posterior (B3)     fixed
P+M-1              rank-k estimate (L1); inner optimizer (re)starts         updated
>= P+M             precondition g (C1/C2), inner optimizer step             updated
=================  =======================================================  ========

Per group of leaves (sums over ``i`` and over the group's leaves):

* (P1) ``alpha = sum v'u / sum ||u||^2`` — the learning rate (inverse curvature);
* (P2) ``w = sum v'u / sum ||v||^2`` — the prior scale (mean Rayleigh quotient);
* (P3) ``lam = (sum ||v_i||^2 - ||sum v_i||^2 / P) / (P - 1)`` — the unbiased
  gradient-noise estimate (``noise_estimate="unbiased"``, curvax's default), or
  the seed code's ``|sum ||v_i||^2 - ||sum v_i||^2| / P``
  (``noise_estimate="seed"``; it measures the squared mean gradient). Either
  is a squared-gradient quantity, and (B3) uses it as the noise's standard
  deviation: the likelihood's covariance is ``lam^2 I (x) diag(S'S)`` (see
  `curvax.solvers.bayesian_hessian`).

Per leaf (own ``S``, ``Delta``, ``U``, ``sigma``; block-diagonal model, but each
leaf's ``y`` is its block row of the whole network's ``H d``):

* (O1) ``s_1 = -gbar / ||gbar||``, ``y_1 = -ubar / ||gbar||`` (prior means);
* (O2) ``d = B^{-1} g`` (W1) on the step's batch, ``y = H d``,
  ``s_m = d / ||d||``, ``y_m = y / ||d||``.

The spec's equations are followed exactly; see `curvax.solvers.bayesian_hessian`
for (B1-B3), (W1), (L1), (C1), (C2).

Choices (the spec leaves them open):

* ``form="inverse"`` (C2) is the default: the step is the inverse of the
  rank-k estimate applied to the gradient, ``alpha (I - UU') + U diag(1/sigma)
  U'``, which is what a preconditioner should be. When ``lam = 0`` (no
  gradient noise under the unbiased (P3), e.g. the same batch on every step;
  the seed's estimate is not 0 then) it is invariant to the scale of the
  objective: for ``c f`` (``c > 0``) ``alpha -> alpha / c``,
  ``w -> c w``, ``sigma -> c sigma`` and the step is unchanged. With noise it
  is not: ``lam`` (P3, a gradient variance) scales like ``c^2``, so ``lam^2``
  in (B3) like ``c^4`` against ``w^2 S'S`` like ``c^2``, and the noise's
  weight in the posterior grows with the objective's scale.
  ``form="seed"`` (C1) is the seed's preconditioner: ``sigma^{-1/2}`` on the
  top directions, then learning rate alpha. It is not the seed code step for
  step, even with ``noise_estimate="seed"`` (its P3): curvax uses
  ``B0 = (1/alpha) I`` throughout (the seed code takes ``I`` in the first
  observation's residual, ``alpha I`` in the later ones and ``(1/alpha) I``
  in the rank-k estimate), ``S'X`` in (W1) (the seed code ``X'S``), the
  unit-norm directions in every Gram matrix of (B3) (the seed code puts the
  unnormalised ``||d||^2`` on the diagonal), and the exact rank-k estimate (L1)
  (the seed code: scipy's iterative ``svds``).
* ``groups=None``: one group (the PyTorch class's default single parameter
  group, the paper's global step size); ``groups="leaf"`` gives every leaf its
  own alpha, w, lam; or pass labels (see ``groups``).
* ``restart_every=None`` never restarts; the seed restarts every epoch — pass
  the number of steps per epoch. Restart clears everything, including the inner
  optimizer's state.
* The objective ``loss_fn`` includes any regularizer (e.g.
  ``curvax.losses.objective(apply_fn, loss, l2_regularizer(wd))``), so the
  seed's ``weight_decay`` terms (``v + wd theta``, ``u + wd v``) come from the
  gradient and Hessian of ``loss_fn`` itself.
* Robustness: an estimation step whose gradient or Hessian-vector product is
  non-finite is skipped (the observation is retaken on the next batch) and
  counted in ``num_skipped``; after `MAX_POSTERIOR_RETAKES` non-finite
  posterior observations in a row the posterior phase ends early and the
  rank-k estimate uses the observations gathered so far; a preconditioning step
  with a non-finite update (with the default inner optimizer: a non-finite
  gradient, seen in the ``k`` projections ``U_j'g`` per leaf, or learning
  rate; a step entry that overflows from finite values is zeroed alone, not
  counted) returns zeros, keeps the inner state and is counted too. A prior fit with
  non-finite or zero ``alpha``/``w`` in an active group (below), or with no
  active group at all, restarts the round and is counted in
  ``num_failed_fits``. Negative average curvature ``sum v'u < 0`` (the seed
  code would then step uphill with a negative learning rate) uses ``|sum v'u|``
  in (P1)/(P2) and is counted in ``num_negative_curvature``.
* Inactive groups: a group whose prior phase observed no gradient
  (``sum ||v_i||^2 = 0``, e.g. an unused or frozen parameter) or no curvature
  (``sum ||u_i||^2 = 0``) has (P1) or (P2) ``0/0``. It is inactive for the
  round: it does not fail the fit, takes the placeholders ``alpha = w = 1``,
  ``lam = 0`` (finite, and no estimate), spends no observation (its rows of
  ``S`` and ``Delta`` in the round are zero, its part of every active direction ``d`` of
  (O2) is zero, so the other leaves' ``y = H d`` have no term from it) and
  takes no step: its learning rate is 0 (also with a fixed
  ``learning_rate``). The active groups are estimated and stepped exactly as
  without it. The next round (``restart_every``) fits it afresh.
"""

from __future__ import annotations

from typing import Any, Callable, Hashable, NamedTuple, Optional, Sequence, Tuple, Union

import jax
import jax.numpy as jnp
import numpy as np
import optax
import optax.tree_utils as otu

from curvax import _checks
from curvax._buffers import own_buffers
from curvax._packed import PackedTree, install_packed_fields
from curvax.curvature import hessian_matvec
from curvax.solvers import bayesian_hessian as bh

Array = jax.Array

PRIOR = 0
POSTERIOR = 1
PRECONDITION = 2
MAX_POSTERIOR_RETAKES = 2   # consecutive non-finite posterior observations before giving up

_NAME = "probabilistic_preconditioning"

#: Arguments to list in ``optax.inject_hyperparams(..., static_args=...)``:
#: ``loss_fn`` is callable (inject_hyperparams would take it for a schedule) and
#: the integer sizes fix array shapes. ``learning_rate`` may be injected.
STATIC_ARGS = ("loss_fn", "rank", "num_observations", "prior_iterations", "restart_every",
               "groups")


#: The counters packed in `ProbabilisticPreconditioningState.counts` (int32)
#: and the per-group values packed in ``group_values`` (last axis), in order.
_COUNT_FIELDS = ("round_step", "phase", "num_observations", "num_restarts", "num_skipped",
                 "num_failed_fits", "num_negative_curvature", "posterior_retakes")
_GROUP_FIELDS = ("alpha", "prior_scale", "noise_scale", "learning_rate", "sum_vu", "sum_uu",
                 "sum_vv")


class ProbabilisticPreconditioningState(NamedTuple):
  """State of `probabilistic_preconditioning`.

  The scalars and the per-group values are packed, read by name as
  properties (``state.phase``, ``state.alpha``, ...; all of them:
  ``state.scalars()``; ``state._replace(phase=...)`` writes them): each array
  of a state costs a jitted call host time, and XLA:GPU updates each small
  array with a kernel of its own (docs/performance.md).

  Attributes:
    count: number of ``update`` calls.
    counts: int32 ``(8,)``, the counters below, from ``round_step`` to
      ``posterior_retakes`` (``_COUNT_FIELDS``).
    group_values: ``(G, 7)`` in the parameters' float dtype, the per-group
      values below (``alpha`` ... ``sum_vv``, ``_GROUP_FIELDS``).
    eigenvalues, eigenvectors, directions, residuals, sum_directions,
    sum_products, inner_state: arrays, below.

  Packed (properties):
    round_step: position of the NEXT step in the current estimation round.
    phase: phase the next step runs: 0 prior (`PRIOR`), 1 posterior
      observations (`POSTERIOR`), 2 preconditioned inner step (`PRECONDITION`).
    num_observations: posterior observations gathered in this round (m <= M).
    num_restarts: completed estimation rounds restarted by ``restart_every``.
    alpha: (G,) per-group inverse curvature (P1) from the last fit (1 for an
      inactive group, see the module docstring).
    prior_scale: (G,) per-group ``w`` (P2) (1 for an inactive group).
    noise_scale: (G,) per-group ``lam`` (P3) (0 for an inactive group).
    learning_rate: (G,) learning rate the inner optimizer uses (alpha, or the
      fixed ``learning_rate``; 0 for an inactive group, which takes no step).
    eigenvalues: per leaf, the ``k`` top singular values ``sigma`` of the
      rank-k Hessian estimate (L1) (its eigenvalue estimates), packed into one
      vector per dtype (`curvax._packed.PackedTree`; ``.unpack()`` gives the
      tuple, ``.unpack()[i]`` leaf ``i``'s ``(k,)`` values).
    eigenvectors: per leaf, ``U``'s ``k`` rows ``(n,)`` (L1), a tuple of arrays (not
      one ``(k, n)`` array: rows sliced out of it were copied every step).
    directions: per leaf, ``S`` as rows ``(M, n)`` (unit-norm observed
      directions); only the first ``num_observations`` rows are this round's,
      the others are unread (a previous round's, or zero). Packed: one
      ``(M, size)`` array per dtype, each row all leaves' rows side by side
      (`curvax._packed.PackedTree`; ``.unpack()[i]`` is leaf ``i``'s ``(M, n)``).
    residuals: per leaf, ``Delta = Y - S / alpha`` as rows ``(M, n)`` (B2), as
      ``directions`` (packed likewise).
    sum_vu, sum_uu, sum_vv: (G,) prior sums of v'u, ||u||^2, ||v||^2.
    sum_directions: sum of the prior directions v_i, a
      `curvax._packed.PackedTree` (``.unpack()`` gives the params-shaped tree):
      one array per dtype, not one per parameter tensor, as the state passes
      through every jitted call (each array costs host time).
    sum_products: sum of the prior products u_i = H_i v_i, packed likewise.
    inner_state: state of the inner optimizer.
    num_skipped: steps skipped because of non-finite values, and host-scheduled
      steps that found the round late (they step with the estimate the state
      holds, and the round waits; see `probabilistic_preconditioning`).
    num_failed_fits: prior fits rejected (non-finite or zero alpha, w in an
      active group, or no active group); each restarts the round.
    num_negative_curvature: prior fits with a negative sum v'u in some group
      (absolute values were used).
    posterior_retakes: consecutive non-finite posterior observations (reset by a
      finite one); at `MAX_POSTERIOR_RETAKES` the posterior phase ends early.
  """
  count: Array
  counts: Array
  group_values: Array
  eigenvalues: Any
  eigenvectors: Tuple[Tuple[Array, ...], ...]
  directions: Any
  residuals: Any
  sum_directions: Any
  sum_products: Any
  inner_state: Any


install_packed_fields(ProbabilisticPreconditioningState,
                      {"counts": _COUNT_FIELDS, "group_values": _GROUP_FIELDS})


class _Fields(NamedTuple):
  """`ProbabilisticPreconditioningState` unpacked: what ``update`` works on."""
  count: Array
  round_step: Array
  phase: Array
  num_observations: Array
  num_restarts: Array
  alpha: Array
  prior_scale: Array
  noise_scale: Array
  learning_rate: Array
  eigenvalues: Any
  eigenvectors: Tuple[Tuple[Array, ...], ...]
  directions: Any
  residuals: Any
  sum_vu: Array
  sum_uu: Array
  sum_vv: Array
  sum_directions: Any
  sum_products: Any
  inner_state: Any
  num_skipped: Array
  num_failed_fits: Array
  num_negative_curvature: Array
  posterior_retakes: Array


def _unpack(state: ProbabilisticPreconditioningState) -> _Fields:
  return _Fields(**{f: getattr(state, f) for f in _Fields._fields})


def _pack(fields: _Fields, group_dtype: Any) -> ProbabilisticPreconditioningState:
  # One array each: XLA:GPU computes the new counters in one kernel, not one
  # kernel per scalar field.
  return ProbabilisticPreconditioningState(
      count=fields.count,
      counts=jnp.stack([jnp.asarray(getattr(fields, f)).astype(jnp.int32)
                        for f in _COUNT_FIELDS]),
      group_values=jnp.stack([getattr(fields, f).astype(group_dtype) for f in _GROUP_FIELDS],
                             axis=-1),
      **{f: getattr(fields, f) for f in ProbabilisticPreconditioningState._fields
         if f in _Fields._fields and f != "count"})


def _static_int(value: Any, name: str, minimum: int) -> int:
  return _checks.static_int(value, name, _NAME, minimum, STATIC_ARGS)


def _group_ids(params: Any, groups: Any) -> Tuple[Tuple[int, ...], int]:
  """Static group index of every leaf of ``params`` and the number of groups."""
  with_path = jax.tree_util.tree_leaves_with_path(params)
  num_leaves = len(with_path)
  if groups is None:
    return (0,) * num_leaves, 1
  if isinstance(groups, str):
    if groups != "leaf":
      raise ValueError(f"{_NAME}: groups must be None, 'leaf', a callable or a pytree of "
                       f"labels shaped like params; got the string {groups!r}.")
    return tuple(range(num_leaves)), num_leaves
  if callable(groups):
    labels = [groups(path, leaf) for path, leaf in with_path]
  else:
    labels = jax.tree_util.tree_leaves(groups)
    if (jax.tree_util.tree_structure(groups) != jax.tree_util.tree_structure(params)
        or len(labels) != num_leaves):
      raise ValueError(
          f"{_NAME}: `groups` must be a pytree of hashable labels with the structure of "
          f"params (one label per leaf); got {jax.tree_util.tree_structure(groups)} for "
          f"params {jax.tree_util.tree_structure(params)}.")
  index = {}
  ids = []
  for label in labels:
    if isinstance(label, (jax.Array, jax.core.Tracer)):
      label = label.item() if not isinstance(label, jax.core.Tracer) else None
      if label is None:
        raise TypeError(f"{_NAME}: group labels must be static (ints or strings).")
    if not isinstance(label, Hashable):
      raise TypeError(f"{_NAME}: group labels must be hashable; got {label!r}.")
    ids.append(index.setdefault(label, len(index)))
  return tuple(ids), len(index)


def _inverse_norm(v: Array) -> Array:
  """``1 / ||v||``, and 0 for ``v = 0`` (so ``v * _inverse_norm(v)`` is the unit
  direction of an observation, or the empty one)."""
  nrm = jnp.linalg.norm(v)
  return jnp.where(nrm > 0, 1.0 / jnp.where(nrm > 0, nrm, 1.0), 0.0)


def _active_groups(sum_vv: Array, sum_uu: Array) -> Array:
  """(G,) bool: groups whose prior phase observed gradient and curvature.

  The others have ``sum ||v||^2 = 0`` or ``sum ||u||^2 = 0``, so (P2) or (P1)
  is ``0/0`` (then ``sum v'u = 0`` too, by Cauchy-Schwarz): inactive.
  """
  return (sum_vv > 0) & (sum_uu > 0)


def _group_sum(per_leaf: Sequence[Array], gids: Sequence[int], num_groups: int) -> Array:
  return jnp.zeros((num_groups,), jnp.result_type(*per_leaf)).at[jnp.asarray(gids)].add(
      jnp.stack(per_leaf))


def _round_layout(estimate: bool, num_prior: int, num_obs: int) -> Tuple[int, bool, int]:
  """Where a round's steps fall (see the module docstring's table).

  Returns ``apply_start`` (the round step of the first inner step),
  ``finish_in_prior`` (no posterior phase: OnlyAdaptiveSGD, or ``M = 1``; the
  prior's last step also builds the estimate and resets the inner state) and
  ``busy_steps``, the number of steps at the start of a round that estimate
  (the prior's, the posterior's and, with a posterior phase, the step at
  ``apply_start`` that builds the rank-k estimate before its inner step).
  """
  apply_start = num_prior + num_obs - 1 if estimate else num_prior
  finish_in_prior = not estimate or num_obs == 1
  return apply_start, finish_in_prior, apply_start + (0 if finish_in_prior else 1)


#: The steps of an estimation round by name, for ``update(..., scheduled=...)``.
SCHEDULED_PHASES = ("prior", "posterior", "build")


def estimation_phase(step: int, *, prior_iterations: int = 10, num_observations: int = 5,
                     restart_every: Optional[int] = None, precondition: bool = True,
                     estimate_preconditioner: Optional[bool] = None) -> Union[bool, str]:
  """Which estimation step `probabilistic_preconditioning` takes at ``step``.

  ``"prior"``, ``"posterior"``, ``"build"`` (the rank-k estimate, then the
  first preconditioned step) or ``False`` (a preconditioning step), for
  ``update(..., scheduled=estimation_phase(t, ...))``: each value compiles a
  step with that work and no ``lax.cond`` (on a GPU each cond waits for the
  host, and the estimation steps' branches ran as separate launches). The
  keywords are the transform's; see `estimates_preconditioner` for rounds
  that run late.
  """
  estimate = precondition if estimate_preconditioner is None else bool(estimate_preconditioner)
  num_prior = int(prior_iterations)
  apply_start, _, busy_steps = _round_layout(estimate, num_prior, int(num_observations))
  position = int(step) if restart_every is None else int(step) % int(restart_every)
  if position < num_prior:
    return "prior"
  if position >= busy_steps:
    return False
  return "build" if position == apply_start else "posterior"


def estimates_preconditioner(step: int, *, prior_iterations: int = 10,
                             num_observations: int = 5, restart_every: Optional[int] = None,
                             precondition: bool = True,
                             estimate_preconditioner: Optional[bool] = None) -> bool:
  """Whether `probabilistic_preconditioning` with these settings estimates at ``step``.

  Evaluated on the host, for ``update(..., scheduled=...)``: ``step`` counts
  updates from 0, like the state's ``count``; the keywords are the
  transform's. True on the first steps of every round (the round restarts at
  multiples of ``restart_every``): the prior's ``P`` steps, the posterior's
  ``M - 1`` and the step that builds the rank-k estimate. A loop that knows
  the step number compiles two variants of its step and calls the one
  without estimation (``scheduled=False``: no ``lax.cond``, on which GPU
  runtimes wait for the host) on the other steps.

  This is the schedule of a round that runs as planned. A retaken
  observation (non-finite values) or a failed prior fit makes the device's
  round late: steps then passed ``scheduled=False`` step with the estimate the
  state holds while the round waits for the next step passed ``True`` or the
  next restart (see `probabilistic_preconditioning`, "Host-side schedule");
  ``scheduled=True`` is always right.
  """
  return estimation_phase(step, prior_iterations=prior_iterations,
                          num_observations=num_observations, restart_every=restart_every,
                          precondition=precondition,
                          estimate_preconditioner=estimate_preconditioner) is not False


def probabilistic_preconditioning(
    loss_fn: Callable[[Any, Any], Array],
    *,
    inner: Optional[optax.GradientTransformation] = None,
    rank: int = 2,
    num_observations: int = 5,
    prior_iterations: int = 10,
    restart_every: Optional[int] = None,
    learning_rate: Optional[Union[float, Array]] = None,
    precondition: bool = True,
    estimate_preconditioner: Optional[bool] = None,
    form: str = "inverse",
    noise_estimate: str = "unbiased",
    groups: Any = None,
) -> optax.GradientTransformationExtraArgs:
  r"""de Roos & Hennig's probabilistic preconditioner around an inner optimizer.

  Estimates a Bayesian rank-``rank`` Hessian model from Hessian-vector products
  of ``loss_fn`` (prior P1-P3, observations O1-O2, posterior B3), preconditions
  every gradient with its inverse (C2, or the seed's C1), feeds the result to
  ``inner`` and scales the inner direction by ``-learning_rate`` per group
  (``alpha`` of P1 unless ``learning_rate`` is given). See the module docstring
  for the round structure and the equations.

  The seed's variants (chapter 4, Table 4.1):

  * PreconditionedSGD: the defaults (``form="seed", noise_estimate="seed"`` for
    the seed's preconditioner and noise estimate; the module docstring lists
    where curvax still differs from the seed code).
  * AdaptiveSGD: ``precondition=False, estimate_preconditioner=True`` (builds the
    preconditioner, does not apply it).
  * OnlyAdaptiveSGD: ``precondition=False`` (the posterior phase is skipped too;
    steps start right after the prior).
  * Preconditioned Tuned SGD / Momentum: ``learning_rate=0.11288`` (fmnist_2c2d)
    and ``inner=optax.trace(decay=0.9)`` for momentum.

  Args:
    loss_fn: batch-mean objective ``loss_fn(params, batch) -> scalar`` (with its
      regularizer), e.g. ``curvax.losses.objective(apply_fn, loss)``; its
      Hessian-vector products come from `curvax.curvature.hessian_matvec`.
    inner: an optax transformation producing a descent DIRECTION without the
      learning rate (``optax.identity()`` = SGD, the default;
      ``optax.trace(decay=0.9)`` = heavy-ball momentum as torch.optim.SGD;
      ``optax.scale_by_adam()`` ...). Its output is multiplied by
      ``-learning_rate``.
    rank: rank ``k`` of the estimate (>= 1, <= ``num_observations``: the
      posterior mean is the prior plus a rank-``M`` term, so its top ``M``
      singular values are at least the prior's ``1/alpha`` (the
      preconditioner only shortens steps) and the others at most that,
      unbounded below; per leaf also at most its size).
    num_observations: ``M``, observations of the posterior (>= 1), default 5.
    prior_iterations: ``P``, steps of prior statistics (>= 2 with the unbiased
      noise estimate, >= 1 with ``noise_estimate="seed"``), default 10.
    restart_every: restart the estimation every this many steps (>= the
      estimation length + 1); ``None`` (default) never restarts. Counted in
      steps (``count``), so restarts fall after steps ``restart_every``,
      ``2 restart_every``, ... (every epoch when given the steps per epoch, as
      `curvax.problems.run` does) whatever happened within a round: a round
      that retaken estimation steps or a failed fit (which starts a new round
      at once) made late is cut short by the next restart.
    learning_rate: fixed learning rate (the seed's "tuned" variants), a float,
      or ``None`` (default) to use ``alpha`` (P1), re-estimated each round.
    precondition: apply the preconditioner (C1/C2) to the gradient.
    estimate_preconditioner: gather posterior observations and build the
      rank-k estimate; defaults to ``precondition``.
    form: ``"inverse"`` (C2, default) or ``"seed"`` (C1).
    noise_estimate: ``"unbiased"`` (P3, default) or ``"seed"``.
    groups: ``None`` (one group), ``"leaf"`` (one group per leaf), a callable
      ``(path, leaf) -> label`` or a pytree of labels shaped like params; each
      group gets its own ``alpha``, ``w``, ``lam`` and learning rate.

  Host-side schedule: each estimation phase is a ``lax.cond`` on the state,
  and a GPU runtime waits for the host at each (three per step, taken or
  not). A loop that knows the step number can pass ``scheduled`` (a Python
  bool, static under ``jax.jit``): ``scheduled=False`` compiles the step
  without estimation and without the conds, ``True`` (or ``None``, the
  default) with them; `estimates_preconditioner` says which. Or pass the
  step's phase, ``"prior"``, ``"posterior"`` or ``"build"``, as
  `estimation_phase` gives it: then every step is compiled without conds,
  each with its phase's work only::

    @functools.partial(jax.jit, static_argnames="scheduled")
    def step(params, state, batch, scheduled): ...
    step(params, state, batch, scheduled=estimation_phase(t, **kw))

  The results are those of ``scheduled=True`` on every step (up to rounding:
  the programs differ, and so may XLA's fusions) while the rounds run as
  planned. A step passed ``False`` or a phase while the state needs other
  work (a round that ran late: a retaken non-finite observation, a failed
  prior fit) leaves the round where it was, counts itself in ``num_skipped``
  (the restart schedule still counts it) and takes a preconditioning step
  with the estimate the state holds: the last completed round's rank-k
  estimate and the current learning rate (the last successful fit's, or the
  fixed ``learning_rate`` of a group with prior observations; before the
  first fit a fitted rate is zero, and the step a zero update). So training
  goes on while the round waits, until a step is passed the phase the state
  is in (or ``True``), at the latest until the next restart; without
  ``restart_every`` a host schedule never passes the round's phases again, so
  such a loop should watch ``state.num_skipped`` (or ``state.phase``) and
  pass ``True`` while it grows.

  Unknown keyword arguments raise ``TypeError`` (as for `hessian_free` and
  `curvature_step_size`): a misspelt option, or one of the seed's names
  (``lr``, ``est_rank``, ``weight_decay``), is an error, not silently the default.

  Returns:
    An ``optax.GradientTransformationExtraArgs`` whose ``update(updates, state,
    params, *, batch, scheduled=None, **extra_args)`` needs ``params`` and ``batch`` (the batch
    the gradient ``updates`` was computed on). ``update`` accepts other keywords
    (``optax.chain`` forwards every keyword to every member) and passes them on
    to the inner transformation.

  With ``optax.inject_hyperparams`` list `STATIC_ARGS` (``loss_fn`` and the
  integer sizes) in ``static_args``; ``learning_rate`` can then be injected.
  """
  if not callable(loss_fn):
    raise TypeError(f"{_NAME}: loss_fn must be a callable loss_fn(params, batch); got "
                    f"{type(loss_fn).__name__}.")
  plain_inner = inner is None      # the step is -lr * g~ (see the non-finite guard)
  if inner is None:
    inner = optax.identity()
  if not isinstance(inner, optax.GradientTransformation):
    raise TypeError(f"{_NAME}: inner must be an optax.GradientTransformation; got "
                    f"{type(inner).__name__}.")
  inner = optax.with_extra_args_support(inner)
  if form not in bh.FORMS:
    raise ValueError(f"{_NAME}: form must be one of {bh.FORMS}; got {form!r}.")
  if noise_estimate not in ("unbiased", "seed"):
    raise ValueError(f"{_NAME}: noise_estimate must be 'unbiased' or 'seed'; got "
                     f"{noise_estimate!r}.")
  estimate = precondition if estimate_preconditioner is None else bool(estimate_preconditioner)
  if precondition and not estimate:
    raise ValueError(f"{_NAME}: precondition=True needs estimate_preconditioner=True.")
  rank = _static_int(rank, "rank", 1)
  num_obs = _static_int(num_observations, "num_observations", 1)
  num_prior = _static_int(prior_iterations, "prior_iterations",
                          2 if noise_estimate == "unbiased" else 1)
  if rank > num_obs:
    # K = (1/alpha) I + w^2 (Z'X)(Z'S)' is the prior plus a rank-M term (Weyl):
    # its top M singular values are >= 1/alpha, the rest <= 1/alpha and unbounded
    # below, where the inverse would amplify the step by 1/(alpha sigma)
    # (fmnist_mlp, M = 5, rank 10: factors up to 8e3, divergence in 19 steps).
    raise ValueError(
        f"{_NAME}: rank ({rank}) must not exceed num_observations ({num_obs}): the "
        "posterior is the prior plus a rank-num_observations term; its singular values "
        "beyond that fall below the prior's 1/alpha, and inverting them would enlarge "
        "the step without bound.")
  apply_start, finish_in_prior, busy_steps = _round_layout(estimate, num_prior, num_obs)
  if restart_every is not None:
    restart_every = _static_int(restart_every, "restart_every", apply_start + 1)
  if learning_rate is not None and not isinstance(learning_rate, jax.core.Tracer):
    if not jnp.all(jnp.asarray(learning_rate) > 0):
      raise ValueError(f"{_NAME}: learning_rate must be positive or None; got {learning_rate!r}.")
  m_buf = num_obs if estimate else 0

  def _layout(params):
    leaves, treedef = jax.tree_util.tree_flatten(params)
    leaves = [jnp.asarray(x) for x in leaves]  # Python float leaves too
    if not leaves:
      raise ValueError(f"{_NAME}: params hold no arrays.")
    gids, num_groups = _group_ids(params, groups)
    dtype = jnp.result_type(*[x.dtype for x in leaves])
    return leaves, treedef, gids, num_groups, dtype

  def _rank_of(size):
    return min(rank, size) if estimate else 0   # rank <= num_obs, checked above

  def init_fn(params):
    _checks.check_params(params, _NAME)
    leaves, _, _, num_groups, dtype = _layout(params)
    # Every field gets its own buffer, so that the state can be donated to jit
    # (the inner state too: `own_buffers`).
    zeros_g = lambda: jnp.zeros((num_groups,), dtype)
    lr0 = zeros_g() if learning_rate is None else zeros_g() + jnp.asarray(learning_rate, dtype)
    izero = lambda: jnp.zeros([], jnp.int32)
    rows = tuple(jax.ShapeDtypeStruct((x.size,), x.dtype) for x in leaves)
    return _pack(_Fields(
        count=izero(), round_step=izero(), phase=izero(), num_observations=izero(),
        num_restarts=izero(), alpha=zeros_g(), prior_scale=zeros_g(), noise_scale=zeros_g(),
        learning_rate=lr0,
        eigenvalues=PackedTree.pack(tuple(jnp.ones((_rank_of(x.size),), x.dtype)
                                          for x in leaves)),
        eigenvectors=tuple(tuple(jnp.zeros((x.size,), x.dtype) for _ in range(_rank_of(x.size)))
                           for x in leaves),
        directions=PackedTree.zeros(rows, lead=(m_buf,)),
        residuals=PackedTree.zeros(rows, lead=(m_buf,)),
        sum_vu=zeros_g(), sum_uu=zeros_g(), sum_vv=zeros_g(),
        sum_directions=PackedTree.pack(optax.tree_utils.tree_zeros_like(params)),
        sum_products=PackedTree.pack(optax.tree_utils.tree_zeros_like(params)),
        inner_state=own_buffers(inner.init(params)),
        num_skipped=izero(), num_failed_fits=izero(), num_negative_curvature=izero(),
        posterior_retakes=izero()), dtype)

  def update_fn(updates, state, params=None, *, batch=None, scheduled=None, **extra_args):
    if isinstance(scheduled, str):
      if scheduled not in SCHEDULED_PHASES:
        raise ValueError(f"{_NAME}.update: scheduled must be None, a bool or one of "
                         f"{SCHEDULED_PHASES}; got {scheduled!r}.")
      if finish_in_prior and scheduled != "prior":
        raise ValueError(f"{_NAME}.update: scheduled={scheduled!r}, but these settings have "
                         "no posterior phase (estimation_phase says which steps are which).")
    else:
      scheduled = _checks.static_flag(scheduled, "scheduled", _NAME)
    _checks.require_kwarg(batch, "batch", _NAME)
    _checks.check_batch(batch)
    if params is None:
      raise TypeError(f"{_NAME}.update needs `params` (Hessian-vector products are taken "
                      "at params): call update(grads, state, params, batch=...).")
    _checks.check_tree_like(updates, params, "updates")
    group_dtype = state.group_values.dtype
    state = _unpack(state)
    # The gradient in the parameters' dtypes, as the estimate's buffers (a
    # gradient of another dtype made the phases' branches disagree).
    updates = otu.tree_cast_like(updates, params)
    leaves_p, treedef, gids, num_groups, dtype = _layout(params)
    del leaves_p
    g_leaves = treedef.flatten_up_to(updates)
    g_flat = [jnp.ravel(x) for x in g_leaves]
    shapes = [x.shape for x in g_leaves]
    # Built inside the branches that need it: jax.linearize runs the forward and
    # backward pass at construction, which outside a cond would cost a second
    # gradient evaluation on every step.
    # Tangents in the parameters' dtypes: linearisation requires them, and with
    # mixed precision (e.g. bfloat16 beside float32 leaves) the directions d of
    # (O2) come out promoted.
    hvp = lambda v: hessian_matvec(loss_fn, params, batch)(otu.tree_cast_like(v, params))
    one = jnp.ones([], jnp.int32)

    def unflat(flat_leaves):
      return treedef.unflatten([f.reshape(s) for f, s in zip(flat_leaves, shapes)])

    def leaf_scalar(per_group, i):
      return per_group[gids[i]]

    # Structure (cost): one flat sequence of two-way conds, one per estimation
    # phase (the fit runs in the prior's, selected by where) and one for the
    # rank-k build; the cheap preconditioning step is computed outside them,
    # see below. Each passes through only the fields it may change. A single
    # lax.switch over the whole state, or
    # conds nested in pass-through branches, make XLA copy every buffer passing
    # through (S, Delta, U, the prior sums: ~(2M + k + 2) x params) on every
    # step; flat two-way conds over donated buffers update them in place, so a
    # preconditioning step touches none of the estimation buffers. Branches
    # also keep their scratch small (no (M, n) or (n, 2M) temporaries: rows
    # written in place, the rank-k build from a Gram matrix): XLA sizes one
    # scratch buffer for the largest branch and XLA:CPU allocates it on every
    # execution, taken branch or not (see benchmarks/_allocator.py).
    phase = state.phase

    # ---------------------------------------------------------------- prior
    def prior_step(carry, gate=True):
      # ``gate`` False: the sums stay as they were (a host-scheduled step whose
      # state is in another phase; its other fields are discarded by the caller).
      sum_vu, sum_uu, sum_vv, sum_dirs, sum_prods, r, skipped = carry
      u_tree = hvp(updates)
      u_flat = [jnp.ravel(x) for x in treedef.flatten_up_to(u_tree)]
      finite = _checks.tree_all_finite(g_flat + u_flat)
      first = r == 0
      keep = lambda x: jnp.where(first, jnp.zeros_like(x), x)
      pick = lambda new, old: jnp.where(finite & gate, new, old)
      vu = _group_sum([jnp.vdot(v, u) for v, u in zip(g_flat, u_flat)], gids, num_groups)
      uu = _group_sum([jnp.vdot(u, u) for u in u_flat], gids, num_groups)
      vv = _group_sum([jnp.vdot(v, v) for v in g_flat], gids, num_groups)
      new = (pick(keep(sum_vu) + vu, sum_vu), pick(keep(sum_uu) + uu, sum_uu),
             pick(keep(sum_vv) + vv, sum_vv),
             sum_dirs.update(lambda s, v: pick(keep(s) + v, s), updates),
             sum_prods.update(lambda s, u: pick(keep(s) + u, s), u_tree),
             pick(r + 1, r), skipped + jnp.where(finite, 0, 1).astype(skipped.dtype))
      return new, finite & gate & (r == num_prior - 1)

    prior_fields = ("sum_vu", "sum_uu", "sum_vv", "sum_directions", "sum_products",
                    "round_step", "num_skipped")

    # ------------------------------------------------------------------ fit
    fit_fields = ("alpha", "prior_scale", "noise_scale", "learning_rate",
                  "num_negative_curvature", "directions", "residuals", "num_observations",
                  "round_step", "num_failed_fits")

    def fit(state, do_fit, gate=True):
      # (P1), (P2), (P3), on the prior phase's last step (``do_fit``); the
      # fields are returned unchanged on its other steps.
      # Negative average curvature (a saddle region of a non-convex loss): use
      # |sum v'u|, the curvature's magnitude, and count it (num_negative_curvature).
      # Inactive groups (no gradient or no curvature: P1 or P2 is 0/0) get
      # the finite placeholders alpha = w = 1, lam = 0 and learning rate 0.
      negative = jnp.any(state.sum_vu < 0)
      active = _active_groups(state.sum_vv, state.sum_uu)
      one_g = jnp.ones_like(state.sum_vu)
      alpha = jnp.where(active, jnp.abs(state.sum_vu) / jnp.where(active, state.sum_uu, one_g),
                        one_g)
      w = jnp.where(active, jnp.abs(state.sum_vu) / jnp.where(active, state.sum_vv, one_g), one_g)
      sum_v = [jnp.ravel(x) for x in treedef.flatten_up_to(state.sum_directions.unpack())]
      sum_u = [jnp.ravel(x) for x in treedef.flatten_up_to(state.sum_products.unpack())]
      norm_sum = _group_sum([jnp.vdot(s, s) for s in sum_v], gids, num_groups)
      if noise_estimate == "unbiased":
        lam = jnp.maximum((state.sum_vv - norm_sum / num_prior) / (num_prior - 1), 0.0)
      else:
        lam = jnp.abs(state.sum_vv - norm_sum) / num_prior
      lam = jnp.where(active, lam, 0.0)
      valid = jnp.any(active) & jnp.all(jnp.isfinite(alpha) & jnp.isfinite(w)
                                        & jnp.isfinite(lam) & (alpha > 0) & (w > 0))
      lr = jnp.where(active, alpha if learning_rate is None else learning_rate, 0.0).astype(
          alpha.dtype)
      new = state._replace(alpha=alpha, prior_scale=w, noise_scale=lam, learning_rate=lr,
                           num_negative_curvature=state.num_negative_curvature
                           + negative.astype(jnp.int32))
      failed = state._replace(round_step=jnp.zeros_like(state.round_step),
                              num_observations=jnp.zeros_like(state.num_observations),
                              num_failed_fits=state.num_failed_fits + 1)
      # Selected with where, not a nested cond (see "Structure").
      small = tuple(f for f in fit_fields if f not in ("directions", "residuals"))
      out = {f: jax.tree.map(lambda a, b, c: jnp.where(do_fit, jnp.where(valid, a, b), c),
                             getattr(new, f), getattr(failed, f), getattr(state, f))
             for f in small}
      if estimate:
        # (O1): first observation from the prior means, with (B2) Delta = Y - S / alpha.
        # Only row 0 is written, in place: the posterior and the build mask
        # rows from num_observations on (the last round's observations stay
        # there, unread). Writing the buffers outright (zeros with row 0)
        # wrote 2M x params on every prior step (mnist_mlp: 53 MB; XLA:CPU,
        # 2 cores: 2.4-2.7 -> 0.8-0.9 ms per step). An inactive group's
        # leaves get a zero row 0 (an empty observation); a prior step that
        # does not fit writes zeros too (row 0 is unread in the prior phase,
        # and a write that does not read the row needs no copy of it).
        write = do_fit & valid
        dirs, res = [], []
        for i, (sv, su) in enumerate(zip(sum_v, sum_u)):
          inv = _inverse_norm(sv / num_prior)
          s1 = -(sv / num_prior) * inv
          y1 = -(su / num_prior) * inv
          write_i = write & leaf_scalar(active, i)
          zero = jnp.zeros((), sv.dtype)
          dirs.append(jnp.where(write_i, s1, zero))
          res.append(jnp.where(write_i, y1 - s1 / leaf_scalar(alpha, i), zero))
        # With a traced gate, another phase's row 0 is kept (read and
        # written back, slot by slot, in place).
        keep = False if gate is True else ~gate
        out.update(directions=state.directions.set_at(0, dirs, keep),
                   residuals=state.residuals.set_at(0, res, keep),
                   num_observations=jnp.where(write, one, out["num_observations"]))
      return state._replace(**out)


    # ------------------------------------------------------------ posterior
    post_fields = ("directions", "residuals", "num_observations", "round_step", "num_skipped",
                   "posterior_retakes")

    def posterior_step(state, gate=True):
      # ``gate`` False: rows are written as for a skipped observation (zeros
      # at row m, which is not read, or out of bounds: dropped); the caller
      # discards the other fields.
      m = state.num_observations
      num_leaves = len(g_flat)
      alphas = [leaf_scalar(state.alpha, i) for i in range(num_leaves)]
      # (O2): active direction d = B^{-1} g (W1), with C of (B3), leaf by leaf
      # (their small M x M algebra batched across leaves); zero on an
      # inactive group's leaves, so H d, and every leaf's y, has no term
      # from them (their rows stay zero: s = d / ||d|| with d = 0).
      active = _active_groups(state.sum_vv, state.sum_uu)
      d_flat = bh.posterior_inverse_matvec_blocks(
          g_flat, state.directions.unpack(), state.residuals.unpack(), alphas,
          [leaf_scalar(state.prior_scale, i) for i in range(num_leaves)],
          [leaf_scalar(state.noise_scale, i) for i in range(num_leaves)], m)
      d_flat = [jnp.where(leaf_scalar(active, i), d, jnp.zeros((), d.dtype))
                for i, d in enumerate(d_flat)]
      y_flat = [jnp.ravel(x) for x in treedef.flatten_up_to(hvp(unflat(d_flat)))]
      finite = _checks.tree_all_finite(d_flat + y_flat)
      written = finite & gate
      # Row m written in place (a select over the whole buffer would
      # materialise a copy of it). Rows from num_observations on are masked
      # (unread) by the posterior and the build, so a skipped observation
      # writes zeros there instead of keeping the row (reading it copied
      # the row: ~1 ms per leaf).
      dirs, invs = [], []
      for d in d_flat:
        inv = _inverse_norm(d)
        dirs.append(jnp.where(written, d * inv, jnp.zeros((), d.dtype)))
        invs.append(inv)
      directions = state.directions.set_at(m, dirs)
      # Delta's row from S's row as written (read back): XLA recomputes d,
      # elementwise in Delta's old rows, inside each row write, so every write
      # into the packed Delta must come after all of S's, or Delta is copied
      # first (mnist_mlp: 27 MB per posterior step); reading s back orders them.
      res = [jnp.where(written, y * inv - s / alpha, jnp.zeros((), y.dtype))
             for y, inv, s, alpha in zip(y_flat, invs, directions.row(m), alphas)]
      skipped = state.num_skipped + jnp.where(finite, 0, 1).astype(jnp.int32)
      # A non-finite observation is retaken on the next batch, at most
      # MAX_POSTERIOR_RETAKES times in a row: a degenerate estimate (e.g. no
      # gradient noise, so nearly repeated directions and an ill-posed Gram
      # matrix) fails every time, and estimation would never end. Then the phase
      # ends early: the rank-k estimate is built from the observations so far.
      retakes = jnp.where(finite, 0, state.posterior_retakes + 1)
      give_up = retakes >= MAX_POSTERIOR_RETAKES
      round_step = jnp.where(finite, state.round_step + 1,
                             jnp.where(give_up, apply_start, state.round_step))
      return (directions, state.residuals.set_at(m, res), jnp.where(finite, m + 1, m),
              round_step.astype(state.round_step.dtype), skipped,
              jnp.where(give_up, 0, retakes).astype(jnp.int32))

    # -------------------------------------------------------- precondition
    # ``phase == PRECONDITION``, read through the conds' ``round_step`` (which is
    # ``>= apply_start`` throughout the preconditioning phase; no cond changes
    # it there): the step, and so the caller's in-place parameter update, then
    # depends on the conds whose branches read ``params`` (the Hessian-vector
    # products). Without that data dependency XLA cannot order those reads
    # before the update and may copy parameters on every step to protect them
    # (AdaptiveSGD on mnist_mlp, XLA:CPU: three kernels, 4.3 MB, precondition-
    # phase step 1.21 -> 1.14x SGD).
    def build(state):
      # (L1) per leaf (the small algebra batched across leaves).
      num_leaves = len(state.eigenvectors)
      factors = bh.low_rank_factors_blocks(
          state.directions.unpack(), state.residuals.unpack(),
          [leaf_scalar(state.alpha, i) for i in range(num_leaves)],
          [leaf_scalar(state.prior_scale, i) for i in range(num_leaves)],
          [leaf_scalar(state.noise_scale, i) for i in range(num_leaves)], rank,
          state.num_observations)
      vecs, vals = [], []
      old_vals = state.eigenvalues.unpack()
      for i, (u, sigma) in enumerate(factors):
        ok = jnp.all(jnp.isfinite(u)) & jnp.all(jnp.isfinite(sigma))
        # In the state's dtypes (the leaf's; the group scalars may be wider).
        vecs.append(tuple(row.astype(v.dtype) for row, v in
                          zip(jnp.where(ok, u, 0.0), state.eigenvectors[i])))
        vals.append(jnp.where(ok, sigma, 1.0).astype(old_vals[i].dtype))
      return tuple(vecs), PackedTree.pack(tuple(vals))

    # The conds. GPU runtimes sync with the host for each lax.cond (its
    # predicate is read on the host: ~40 us per cond on an H200, measured), and
    # the preconditioning phase runs all of them untaken, so there are as few
    # as the structure allows: the prior phase's (the fit selected inside it by
    # where), the posterior's, and the build's (with the inner state's reset).
    # Building inside the posterior branch (after the last observation), as the
    # prior branch does below where there are no observations, made XLA copy S
    # and Delta on every posterior step (the build read the rows just written
    # in place), and a branch that built from S and Delta as they came in,
    # before writing, made it copy them on every step: kept apart.
    prior_out = prior_fields + tuple(f for f in fit_fields if f not in prior_fields)
    build_out = ("eigenvectors", "eigenvalues", "inner_state")
    if finish_in_prior:
      prior_out += build_out

    def build_and_reset(state):
      vecs, vals = build(state) if estimate else (state.eigenvectors, state.eigenvalues)
      return vecs, vals, inner.init(params)

    def prior_branch(state, gate=True):
      carry, do_fit = prior_step(tuple(getattr(state, f) for f in prior_fields), gate)
      state = fit(state._replace(**dict(zip(prior_fields, carry))), do_fit, gate)
      if finish_in_prior:   # the round's last estimation step: (L1) and the reset
        done = (state.round_step == apply_start) & gate
        state = state._replace(**dict(zip(build_out, jax.tree.map(
            lambda a, b: jnp.where(done, a, b), build_and_reset(state),
            tuple(getattr(state, f) for f in build_out)))))
      return tuple(getattr(state, f) for f in prior_out)

    def unchanged(fields):
      return lambda state: tuple(getattr(state, f) for f in fields)

    def cond(pred, branch, fields, state):
      return state._replace(**dict(zip(fields, jax.lax.cond(pred, branch, unchanged(fields),
                                                            state))))

    def selected(pred, branch, fields, state, gated=()):
      # The branch computed unconditionally, its fields kept where ``pred``
      # (those in ``gated``: the branch, given ``pred``, kept them itself; a
      # select over them made XLA copy or re-read parameter-sized buffers).
      new = branch(state)
      return state._replace(**{
          f: n if f in gated else jax.tree.map(lambda a, b: jnp.where(pred, a, b), n, o)
          for f, n, o in zip(fields, new, unchanged(fields)(state))})

    if scheduled is None or scheduled is True:
      state = cond(phase == PRIOR, prior_branch, prior_out, state)
      if not finish_in_prior:
        state = cond(phase == POSTERIOR, posterior_step, post_fields, state)
        starting = (phase == PRECONDITION) & (state.round_step == apply_start)
        state = cond(starting, build_and_reset, build_out, state)
      in_precondition = (phase == PRECONDITION) & (state.round_step >= apply_start)
      late = jnp.zeros((), bool)
    else:
      # The caller's host schedule says which step this is (see
      # `estimation_phase`): compiled without conds, with that phase's work
      # (if any) applied where the state agrees. A state that needs other
      # work (a round that ran late: a retaken observation or a failed fit)
      # leaves the round as it is (it waits, counted in num_skipped) and the
      # step is a preconditioning step with the estimate the state holds; a
      # step passed the phase the state is in goes on with the round.
      ran = jnp.zeros((), bool)
      ready = busy_steps
      if scheduled == "prior":
        ran = phase == PRIOR
        state = selected(ran, lambda st: prior_branch(st, ran), prior_out, state,
                         gated=("sum_directions", "sum_products", "directions", "residuals")
                         + (build_out if finish_in_prior else ()))
      elif scheduled == "posterior":
        ran = phase == POSTERIOR
        state = selected(ran, lambda st: posterior_step(st, ran), post_fields, state,
                         gated=("directions", "residuals"))
      elif scheduled == "build":
        starting = (phase == PRECONDITION) & (state.round_step == apply_start)
        state = selected(starting, build_and_reset, build_out, state)
        ready = apply_start
      in_precondition = (phase == PRECONDITION) & (state.round_step >= ready)
      late = ~(ran | in_precondition)
    inner_state = state.inner_state

    # Computed on every step and selected with ``where``, not in a cond: the
    # step is a few elementwise passes (plus the inner optimizer's), so XLA
    # fuses it with the caller's parameter update when both are under one jit.
    # Inside a cond the step is materialised, checked and copied out
    # (mnist_mlp's preconditioning-phase step on XLA:CPU, 2 cores: ~8.0 ->
    # ~6.9 ms). In the estimation phases the result is discarded.
    if precondition:
      # The factors c (C1/C2) of all leaves in one elementwise pass (per leaf,
      # XLA:GPU launched two kernels for each leaf's k numbers).
      eigenvalues = state.eigenvalues.unpack()
      ranks = [s.shape[0] for s in eigenvalues]
      scales = jnp.split(bh.preconditioner_scales(
          jnp.concatenate(eigenvalues),
          jnp.concatenate([jnp.broadcast_to(leaf_scalar(state.alpha, i), (k,))
                           for i, k in enumerate(ranks)]), form), np.cumsum(ranks)[:-1])
      coefs = [bh.low_rank_coefficients(g, u, c)
               for g, u, c in zip(g_flat, state.eigenvectors, scales)]
      # In the gradient's dtypes (a group's scalars may be wider than a leaf).
      g_tilde = unflat([bh.low_rank_precondition(g, u, coefficients=c).astype(g.dtype)
                        for g, u, c in zip(g_flat, state.eigenvectors, coefs)])
    else:
      g_tilde = updates
    direction, new_inner = inner.update(g_tilde, inner_state, params, batch=batch,
                                        **extra_args)
    # A fixed learning rate is live if injected; an inactive group's is 0
    # (the fit's, and so state.learning_rate, already is with learning_rate=None).
    lr = (state.learning_rate if learning_rate is None
          else jnp.where(_active_groups(state.sum_vv, state.sum_uu), learning_rate,
                         0.0).astype(state.learning_rate.dtype))
    step = [-leaf_scalar(lr, i).astype(d.dtype) * d
            for i, d in enumerate(treedef.flatten_up_to(direction))]
    if precondition and plain_inner:
      # The step is -lr (g + sum_j coef_j U_j) with U and c finite by
      # construction (build, preconditioner_scales): it is finite when g, the
      # coefficients and lr are, and the coefficients (c - 1) U_j'g, already
      # computed, are non-finite whenever g has a non-finite entry (see
      # bh.low_rank_coefficients). So k scalars per leaf stand in for a pass
      # over the step (one that re-reads g and U: mnist_mlp's preconditioned
      # step ~6.7 -> ~6.3 ms on XLA:CPU, 2 cores). An entry that overflows
      # from finite values (near the float maximum) is zeroed where it is
      # computed, fused with the parameter update, so nothing non-finite is
      # ever returned.
      finite = _checks.tree_all_finite(coefs) & jnp.all(jnp.isfinite(lr))
      step = [jnp.where(jnp.isfinite(x), x, jnp.zeros((), x.dtype)) for x in step]
    else:
      finite = _checks.tree_all_finite(step)
    apply = (in_precondition | late) & finite
    new_updates = treedef.unflatten(
        [jnp.where(apply, x, jnp.zeros((), x.dtype)) for x in step])
    new_state = state._replace(
        inner_state=optax.tree_utils.tree_where(apply, new_inner, inner_state),
        round_step=state.round_step + in_precondition.astype(state.round_step.dtype),
        learning_rate=jnp.where(in_precondition, lr, state.learning_rate),
        num_skipped=state.num_skipped + ((in_precondition & ~finite) | late).astype(
            jnp.int32))

    r = new_state.round_step
    count = optax.safe_increment(state.count)
    if restart_every is not None:
      # On the step count, not the round's: restarts stay on the schedule
      # (epoch boundaries) whatever retaken steps or failed fits did in the round.
      restart = count % restart_every == 0
      r = jnp.where(restart, 0, r)
      new_state = new_state._replace(
          num_restarts=new_state.num_restarts + restart.astype(jnp.int32),
          num_observations=jnp.where(restart, 0, new_state.num_observations),
          posterior_retakes=jnp.where(restart, 0, new_state.posterior_retakes))
    phase = jnp.where(r < num_prior, PRIOR, jnp.where(r < apply_start, POSTERIOR, PRECONDITION))
    new_state = new_state._replace(round_step=r, phase=phase.astype(jnp.int32), count=count)
    return new_updates, _pack(new_state, group_dtype)

  return optax.GradientTransformationExtraArgs(init_fn, update_fn)
