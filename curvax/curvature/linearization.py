"""Linearise a model once, reuse the linearisation for many products."""

from __future__ import annotations

from typing import Any, Callable, NamedTuple

import jax

from curvax import _checks

Array = jax.Array


class ModelLinearization(NamedTuple):
  """A model linearised at ``params`` on fixed inputs.

  Attributes:
    outputs: ``f(params, inputs)``, the primal outputs (leading batch axis).
    jvp: ``v -> J v``, the Jacobian of the outputs w.r.t. the parameters applied
      to a parameter-shaped tangent (no forward pass: residuals are stored).
    vjp: ``u -> J' u``, its transpose, from an outputs-shaped cotangent to a
      parameter-shaped vector.
  """
  outputs: Array
  jvp: Callable[[Any], Array]
  vjp: Callable[[Array], Any]


def linearize_model(apply_fn: Callable[[Any, Any], Array], params: Any,
                    inputs: Any) -> ModelLinearization:
  """Linearises ``p -> apply_fn(p, inputs)`` at ``params``.

  One forward pass with ``jax.linearize``; ``jax.linear_transpose`` of the
  linear map gives the VJP. Each later ``jvp``/``vjp`` costs one forward-mode /
  reverse-mode sweep of the linear model, no re-evaluation of the network.
  """
  outputs, jvp_fn = jax.linearize(lambda p: apply_fn(p, inputs), params)
  transpose = jax.linear_transpose(jvp_fn, params)

  def jvp(v):
    _checks.check_tree_like(v, params)
    return jvp_fn(v)

  def vjp(u):
    return transpose(u)[0]

  return ModelLinearization(outputs, jvp, vjp)
