"""Adding the curvature of a parameter regulariser to a data-curvature product."""

from __future__ import annotations

from typing import Any, Callable, Optional

import jax
import optax.tree_utils as otu

Array = jax.Array


def add_regularizer_curvature(matvec: Callable[[Any], Any],
                              regularizer: Optional[Callable[[Any], Array]],
                              params: Any) -> Callable[[Any], Any]:
  r"""Returns ``v -> C v + \nabla^2 r(params) v``.

  The objective ``L(theta) = (1/N) sum_n l_n(theta) + r(theta)`` has as
  curvature that of the data term (GGN, Hessian, Fisher: ``matvec``) plus the
  Hessian of the regulariser, which depends on the parameters only and is
  applied exactly by forward-over-reverse (``weight * v`` for an L2 penalty).
  With ``regularizer=None`` ``matvec`` is returned unchanged.
  """
  if regularizer is None:
    return matvec
  _, reg_hvp = jax.linearize(jax.grad(regularizer), params)

  def regularized(v):
    return otu.tree_add(matvec(v), reg_hvp(v))

  return regularized
