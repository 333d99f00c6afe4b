"""Sigmoid binary cross-entropy with its (diagonal) output Hessian."""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp

from curvax.losses.base import Loss, _flatten_outputs


@dataclasses.dataclass(frozen=True)
class SigmoidBinaryCrossEntropy(Loss):
  r"""Per-example ``l(f, y) = sum_j [softplus(f_j) - y_j f_j]`` on logits ``f``.

  This is ``-sum_j [y_j log s_j + (1 - y_j) log(1 - s_j)]`` with
  ``s = sigmoid(f)``, summed over all output dimensions of an example; targets
  ``y`` in ``[0, 1]`` have the shape of the outputs. Derivatives:

  * gradient ``s - y``;
  * Hessian ``diag(s (1 - s))``, independent of ``y``;
  * exact square root ``diag(sqrt(s (1 - s)))``;
  * Monte-Carlo root: ``(s - y~) / sqrt(M)`` with ``y~_j ~ Bernoulli(s_j)``,
    since ``E[(s - y~)^2] = s (1 - s)``.
  """

  def check_targets(self, outputs, targets):
    if jnp.shape(targets) != jnp.shape(outputs):
      raise ValueError(
          "sigmoid_binary_cross_entropy: targets must have the shape of the "
          f"outputs {jnp.shape(outputs)}; got {jnp.shape(targets)}.")

  def __call__(self, outputs, targets):
    self.check_targets(outputs, targets)
    y = targets.astype(outputs.dtype)
    values = jax.nn.softplus(outputs) - y * outputs
    return jnp.sum(_flatten_outputs(values), axis=-1)

  def grad(self, outputs, targets):
    self.check_targets(outputs, targets)
    return jax.nn.sigmoid(outputs) - targets.astype(outputs.dtype)

  def hvp(self, outputs, targets, tangents):
    self.check_targets(outputs, targets)
    s = jax.nn.sigmoid(outputs)
    return s * (1 - s) * tangents

  def sqrt_hessian(self, outputs, targets):
    self.check_targets(outputs, targets)
    s = jax.nn.sigmoid(_flatten_outputs(outputs))
    root = jax.vmap(jnp.diag)(jnp.sqrt(s * (1 - s)))  # (N, C, C)
    return root.reshape(outputs.shape + (root.shape[-1],))

  def sqrt_hessian_sampled(self, key, outputs, targets, num_samples=1):
    self.check_targets(outputs, targets)
    s = jax.nn.sigmoid(outputs)
    y = jax.random.bernoulli(key, s[..., None], s.shape + (num_samples,))
    return (s[..., None] - y.astype(s.dtype)) / jnp.sqrt(num_samples)


sigmoid_binary_cross_entropy = SigmoidBinaryCrossEntropy()
