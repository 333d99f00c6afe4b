"""Hessian-vector products of an arbitrary objective."""

from __future__ import annotations

from typing import Any, Callable

import jax

from curvax import _checks

Array = jax.Array


def hessian_matvec(loss_fn: Callable[[Any, Any], Array], params: Any,
                   batch: Any) -> Callable[[Any], Any]:
  r"""Returns ``v -> H v`` with ``H = \nabla^2_\theta loss_fn(\theta, batch)``.

  Forward-over-reverse (Pearlmutter 1994): ``H v = d/dt grad(theta + t v)``.
  The gradient is linearised once with ``jax.linearize``, so repeated
  products reuse the forward and backward pass of the primal computation and
  each costs one forward-mode sweep through the gradient program.

  Args:
    loss_fn: scalar objective ``loss_fn(params, batch)``, e.g.
      ``curvax.losses.objective(apply_fn, loss)``.
    params: parameters (any pytree).
    batch: passed to ``loss_fn`` unchanged.
  """
  _, hvp = jax.linearize(jax.grad(lambda p: loss_fn(p, batch)), params)

  def matvec(v):
    _checks.check_tree_like(v, params)
    return hvp(v)

  return matvec
