"""Generalised Gauss-Newton-vector products."""

from __future__ import annotations

from typing import Any, Callable

import jax

from curvax import _checks
from curvax.curvature.linearization import linearize_model
from curvax.losses import as_loss

Array = jax.Array


def ggn_matvec(apply_fn: Callable[[Any, Any], Array], loss: Any, params: Any,
               batch: Any) -> Callable[[Any], Any]:
  r"""Returns ``v -> G v`` for the GGN of the batch-mean loss.

  .. math::
     G = \frac{1}{N} \sum_n J_n^\top H_n J_n,\qquad
     J_n = \partial f(\theta, x_n)/\partial\theta,\quad
     H_n = \nabla_f^2 \ell(f_n, y_n)

  (Schraudolph 2002; Martens 2010; Dangel, thesis, Eq. 3.13b). ``G`` is the
  Hessian of the loss of the model linearised at ``params`` (Eq. 3.16), and
  positive semi-definite for losses convex in the outputs (all of curvax's; a
  plain callable that is not gives the indefinite ``J'HJ`` here, see
  `curvax.losses.AutodiffLoss`).

  The model is linearised once here (``jax.linearize`` +
  ``jax.linear_transpose``), so each call of the returned function costs one
  JVP, one output-Hessian product (closed form for curvax losses) and one VJP:
  no forward pass, which is what CG's many products want.

  Args:
    apply_fn: ``apply_fn(params, inputs) -> outputs`` with a leading batch axis.
    loss: a `curvax.losses.Loss`, or a callable ``loss(outputs, targets)``
      returning per-example values (its output Hessian then comes from autodiff).
    params: the parameters (any pytree).
    batch: ``(inputs, targets)``.

  Returns:
    A function mapping a pytree shaped like ``params`` to ``G v``, same shape.
  """
  loss = as_loss(loss)
  inputs, targets = _checks.check_batch(batch)
  lin = linearize_model(apply_fn, params, inputs)
  loss.check_targets(lin.outputs, targets)
  n = lin.outputs.shape[0]

  def matvec(v):
    jv = lin.jvp(v)
    return lin.vjp(loss.hvp(lin.outputs, targets, jv) / n)

  return matvec
