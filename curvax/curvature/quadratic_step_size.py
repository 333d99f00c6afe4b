"""The minimiser of the quadratic model along a direction, from one JVP."""

from __future__ import annotations

from typing import Any, Callable, NamedTuple, Optional, Tuple

import jax
import jax.numpy as jnp

from curvax import _checks
from curvax.losses import as_loss, objective as objective_of

Array = jax.Array


class QuadraticStepSize(NamedTuple):
  r"""The step size minimising the local quadratic model along ``d``, and its parts.

  Attributes:
    alpha: ``-numerator / denominator``, the minimiser of
      ``h(a) = L + a d'g + a^2/2 d'Gd`` (Suckrow 2025, seed 004 Eqs. 3.2-3.3);
      NaN where it is undefined (``denominator <= 0`` or either part not finite).
      Negative where ``d`` is not a descent direction on this batch.
    numerator: the directional slope ``d'g`` (gradient of the objective, batch
      mean, regulariser included).
    denominator: the directional curvature ``d'Gd`` (GGN of the batch-mean
      loss, plus the regulariser's Hessian).
    loss: the objective at ``params`` on this batch (batch mean of the loss plus
      the regulariser), a free by-product of the forward pass.
  """
  alpha: Array
  numerator: Array
  denominator: Array
  loss: Array

  @property
  def is_defined(self) -> Array:
    """Whether ``alpha`` is defined: ``denominator > 0`` and both parts finite."""
    return step_size_is_defined(self.numerator, self.denominator)


def step_size_is_defined(numerator: Array, denominator: Array) -> Array:
  """``denominator > 0`` and both ``numerator`` and ``denominator`` finite."""
  return jnp.isfinite(numerator) & jnp.isfinite(denominator) & (denominator > 0)


def step_size_from_parts(numerator: Array, denominator: Array) -> Array:
  r"""``-numerator / denominator`` where defined (see `step_size_is_defined`), else NaN.

  Combining parts measured on different batches gives the seed's diagnostics,
  e.g. the hybrid ``alpha_hybrid = -d_2'g_1 / d_2'G_2 d_2`` (seed 004 Eq. 3.5,
  with the sign that makes it comparable to ``alpha``):
  ``step_size_from_parts(on_batch_1.numerator, on_batch_2.denominator)``.
  """
  defined = step_size_is_defined(numerator, denominator)
  safe_den = jnp.where(defined, denominator, jnp.ones_like(denominator))
  return jnp.where(defined, -numerator / safe_den, jnp.full_like(numerator, jnp.nan))


def _in_params_dtypes(direction: Any, params: Any) -> Any:
  """``direction`` cast leaf by leaf to its parameter's dtype, as `jax.jvp` needs.

  Mixed precision gives such pairs, e.g. ``optax.adam(mu_dtype=jnp.float32)`` on
  bfloat16 parameters returns float32 updates (which ``optax.apply_updates`` casts).
  """
  return jax.tree.map(lambda d, p: jnp.asarray(d, jnp.result_type(p)), direction, params)


def directional_terms(apply_fn: Callable[[Any, Any], Array], loss: Any, params: Any,
                      direction: Any, batch: Any) -> Tuple[Array, Array, Array]:
  r"""Per-example ``(l_n, d'g_n, d'G_n d)`` along ``direction`` from ONE JVP.

  The model's JVP gives outputs ``f_n`` and tangents ``u_n = J_n d``; then
  ``d'g_n = u_n' grad_f l_n`` and ``d'G_n d = u_n' H_n u_n`` with the loss's
  closed-form output gradient and Hessian product: no backward pass, no GGN
  matvec. Shared by `quadratic_step_size` (batch means) and
  `curvax.curvature.directional_statistics` (per-example spread).
  """
  loss = as_loss(loss)
  inputs, targets = _checks.check_batch(batch)
  _checks.check_tree_like(direction, params, "direction")
  direction = _in_params_dtypes(direction, params)
  outputs, u = jax.jvp(lambda p: apply_fn(p, inputs), (params,), (direction,))
  loss.check_targets(outputs, targets)
  n = outputs.shape[0]
  slopes = jnp.sum((u * loss.grad(outputs, targets)).reshape(n, -1), axis=1)
  curvatures = jnp.sum((u * loss.hvp(outputs, targets, u)).reshape(n, -1), axis=1)
  return loss(outputs, targets), slopes, curvatures


def quadratic_step_size(apply_fn: Callable[[Any, Any], Array], loss: Any, params: Any,
                        direction: Any, batch: Any, *,
                        regularizer: Optional[Callable[[Any], Array]] = None,
                        curvature: str = "ggn") -> QuadraticStepSize:
  r"""``alpha* = -d'g / d'Gd`` on ``batch`` from a single forward-mode pass.

  With the objective ``L(theta) = (1/N) sum_n l(f(theta, x_n), y_n) + r(theta)``,
  its gradient ``g`` and GGN ``G = (1/N) sum_n J_n' H_n J_n`` at ``params``,
  the quadratic model along ``d`` is ``h(a) = L + a d'g + a^2/2 d'Gd``, minimised
  by ``alpha* = -d'g / d'Gd`` (seed 004 Eqs. 3.1-3.3). With the debiasing of
  seed 004 Eq. 3.4, ``d`` comes from one batch and this function is called on
  another.

  How it is computed (spec "How to compute it cheaply"): neither ``g`` nor
  ``G d`` is needed as a vector. ONE ``jax.jvp`` of the model at ``params``
  along ``d`` gives the outputs ``f_n`` and the output tangents ``u_n = J_n d``;
  then, with the loss's closed-form output gradient and Hessian product,

  .. math::
     d^\top g  = \frac{1}{N}\sum_n u_n^\top \nabla_f l_n + d^\top\nabla r,\qquad
     d^\top G d = \frac{1}{N}\sum_n u_n^\top H_n u_n + d^\top \nabla^2 r\, d.

  Cost: one forward pass with its tangent (about two to three forward passes),
  no backward pass, no GGN matvec, nothing stored for a transpose. The
  regulariser's terms come from forward-mode too (a JVP and a JVP-of-JVP of
  ``r``, e.g. ``weight * sum(w * d_w)`` and ``weight * sum(d_w^2)`` for an L2
  penalty).

  Args:
    apply_fn: ``apply_fn(params, inputs) -> outputs`` with a leading batch axis.
    loss: a `curvax.losses.Loss`, or a callable ``loss(outputs, targets)``
      returning per-example values.
    params: the point ``theta_0`` where slope and curvature are measured.
    direction: ``d``, a pytree shaped like ``params`` (e.g. an optax optimizer's
      proposed update, which includes its learning rate).
    batch: ``(inputs, targets)``.
    regularizer: optional ``r(params) -> scalar`` added to the objective; its
      gradient enters the numerator and its Hessian the denominator.
    curvature: ``"ggn"`` (default) or ``"hessian"``: ``d'Hd``, the second
      directional derivative of the objective, from a JVP of that JVP
      (forward over forward, about twice the GGN's cost, still no backward
      pass). For models whose output is the loss itself (DeepOBS's 2-D test
      functions, `curvax.problems`' ``value_loss``) the GGN is zero and only
      ``"hessian"`` measures curvature; elsewhere ``d'Hd`` may be negative
      (``alpha`` then undefined, NaN) where ``d'Gd`` is not.

  Returns:
    A `QuadraticStepSize` ``(alpha, numerator, denominator, loss)``.
  """
  if curvature not in ("ggn", "hessian"):
    raise ValueError(f"quadratic_step_size: curvature must be 'ggn' or 'hessian'; got "
                     f"{curvature!r}.")
  if curvature == "hessian":
    return _hessian_step_size(apply_fn, loss, params, direction, batch, regularizer)
  values, slopes, curvatures = directional_terms(apply_fn, loss, params, direction, batch)
  objective = jnp.mean(values)
  numerator = jnp.mean(slopes)        # d'g = (1/N) sum_n u_n' grad_f l_n   (no backward pass)
  denominator = jnp.mean(curvatures)  # d'Gd = (1/N) sum_n u_n' H_n u_n   (no GGN matvec)
  if regularizer is not None:
    r_value, r_slope, r_curvature = _along(regularizer, params,
                                           _in_params_dtypes(direction, params))
    objective = objective + r_value
    numerator = numerator + r_slope
    denominator = denominator + r_curvature
  return QuadraticStepSize(step_size_from_parts(numerator, denominator), numerator,
                           denominator, objective)


def _along(f: Callable[[Any], Array], params: Any, direction: Any
           ) -> Tuple[Array, Array, Array]:
  """``(f, d'grad f, d'Hess(f) d)`` at ``params``: a JVP of a JVP (forward over forward)."""
  def slope(p):
    return jax.jvp(f, (p,), (direction,))
  (value, first), (_, second) = jax.jvp(slope, (params,), (direction,))
  return value, first, second


def _hessian_step_size(apply_fn, loss, params, direction, batch, regularizer):
  """`quadratic_step_size` with ``d'Hd`` of the whole objective (`_along`)."""
  _checks.check_batch(batch)
  _checks.check_tree_like(direction, params, "direction")
  loss_fn = objective_of(apply_fn, loss, regularizer)
  objective, numerator, denominator = _along(lambda p: loss_fn(p, batch), params,
                                             _in_params_dtypes(direction, params))
  return QuadraticStepSize(step_size_from_parts(numerator, denominator), numerator,
                           denominator, objective)
