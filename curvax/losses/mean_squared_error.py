"""Squared error with its identity output Hessian."""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp

from curvax.losses.base import Loss, _flatten_outputs


@dataclasses.dataclass(frozen=True)
class MeanSquaredError(Loss):
  r"""Per-example ``l(f, y) = 0.5 * ||f - y||^2``, summed over output dimensions.

  The factor 0.5 makes the output Hessian the identity:

  * gradient ``f - y``; Hessian ``I``; exact square root ``I``;
  * Monte-Carlo root ``eps / sqrt(M)`` with ``eps ~ N(0, I)``, the gradient at
    targets drawn from the model's Gaussian ``N(f, I)``.

  Note: PyTorch's ``MSELoss(reduction="mean")`` is ``(1/C) ||f - y||^2``, i.e.
  ``2/C`` times this loss, and DeepOBS's quadratic problems use
  ``0.5 * ||.||^2`` as here.
  """

  def check_targets(self, outputs, targets):
    if jnp.shape(targets) != jnp.shape(outputs):
      raise ValueError(
          "mean_squared_error: targets must have the shape of the outputs "
          f"{jnp.shape(outputs)}; got {jnp.shape(targets)}.")

  def __call__(self, outputs, targets):
    self.check_targets(outputs, targets)
    r = _flatten_outputs(outputs - targets.astype(outputs.dtype))
    return 0.5 * jnp.sum(r * r, axis=-1)

  def grad(self, outputs, targets):
    self.check_targets(outputs, targets)
    return outputs - targets.astype(outputs.dtype)

  def hvp(self, outputs, targets, tangents):
    self.check_targets(outputs, targets)
    return tangents

  def sqrt_hessian(self, outputs, targets):
    self.check_targets(outputs, targets)
    n = outputs.shape[0]
    c = _flatten_outputs(outputs).shape[1]
    eye = jnp.broadcast_to(jnp.eye(c, dtype=outputs.dtype), (n, c, c))
    return eye.reshape(outputs.shape + (c,))

  def sqrt_hessian_sampled(self, key, outputs, targets, num_samples=1):
    self.check_targets(outputs, targets)
    eps = jax.random.normal(key, outputs.shape + (num_samples,), outputs.dtype)
    return eps / jnp.sqrt(num_samples)


mean_squared_error = MeanSquaredError()
