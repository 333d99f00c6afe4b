"""Softmax cross-entropy with its output Hessian and square roots."""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp

from curvax.losses.base import Loss


def _is_integer(targets):
  return jnp.issubdtype(jnp.result_type(targets), jnp.integer)


def _labels(targets):
  """Integer labels at least as wide as int32: compared with (or clipped to) the
  class count ``C``, an int8 / uint8 / int16 label would see ``C`` wrapped."""
  if jnp.iinfo(jnp.result_type(targets)).bits < 32:
    return targets.astype(jnp.int32)
  return targets


def _soft_targets(outputs, targets):
  if _is_integer(targets):
    return jax.nn.one_hot(_labels(targets), outputs.shape[-1], dtype=outputs.dtype)
  return targets.astype(outputs.dtype)


def _mass(outputs, targets):
  """``t = sum_c y_c`` per example, ``(N, 1)``: 1 for a label in ``[0, C)``, NaN outside."""
  if _is_integer(targets):
    targets = _labels(targets)
    valid = (targets >= 0) & (targets < outputs.shape[-1])
    return jnp.where(valid, 1.0, jnp.nan).astype(outputs.dtype)[:, None]
  return jnp.sum(targets, -1, keepdims=True).astype(outputs.dtype)


@dataclasses.dataclass(frozen=True)
class SoftmaxCrossEntropy(Loss):
  r"""Per-example ``l(f, y) = -sum_c y_c log softmax(f)_c`` on logits ``f`` (N, C).

  Targets are integer labels ``(N,)`` or one-hot / soft targets ``(N, C)``.
  With ``p = softmax(f)`` and ``t = sum_c y_c`` (1 for labels and proper
  distributions):

  * gradient ``t p - y``;
  * Hessian ``H = t (diag(p) - p p')`` (Dangel, thesis, Table 4.1 / App. A.3.2),
    which does not depend on how the mass of ``y`` is spread, so the GGN equals
    the Fisher (Eq. 3.28);
  * exact square root with ``C - 1`` columns: ``S = sqrt(t) (diag(sqrt p) - p sqrt(p)')``,
    i.e. ``(I - p 1') diag(sqrt p)``, has ``S S' = H`` because ``1'p = 1`` and
    ``S sqrt(p) = 0``; ``sqrt_hessian`` returns ``S R`` with ``R`` the ``C - 1``
    columns of a Householder reflection orthogonal to ``sqrt(p)`` (still
    ``(S R)(S R)' = H``): a diagonal GGN back-propagates ``C - 1`` columns, not ``C``;
  * Monte-Carlo root: columns ``(onehot(c_m) - p) / sqrt(M)`` for
    ``c_m ~ Cat(p)`` (Eq. 5.9), the gradients at labels drawn from the model.

  An integer label outside ``[0, C)`` (e.g. ``-1`` or ``C``) makes the value,
  the gradient (also the autodiff one of the value), the Hessian product and
  both square roots NaN for that example (its mass ``t`` is NaN), so curvax's
  non-finite guards report it rather than train on a wrapped or dropped label.
  The check is a cheap elementwise ``where`` on device: no host sync, fine
  under ``jit``.
  """

  def check_targets(self, outputs, targets):
    if jnp.ndim(outputs) != 2:
      raise ValueError(
          "softmax_cross_entropy: outputs must be logits of shape (N, C); got "
          f"shape {jnp.shape(outputs)}.")
    n, c = jnp.shape(outputs)
    shape = jnp.shape(targets)
    integer = jnp.issubdtype(jnp.result_type(targets), jnp.integer)
    if integer and shape == (n,):
      return
    if not integer and shape == (n, c):
      return
    raise ValueError(
        "softmax_cross_entropy: targets must be integer labels of shape "
        f"({n},) or one-hot/soft targets of shape ({n}, {c}); got "
        f"{'integer' if integer else 'float'} targets of shape {shape}.")

  def __call__(self, outputs, targets):
    self.check_targets(outputs, targets)
    logp = jax.nn.log_softmax(outputs, axis=-1)
    if _is_integer(targets):
      # Clipped index, then scaled by the mass (1, or NaN for a bad label) so
      # that the value and its autodiff gradient are NaN, not wrapped/zero.
      labels = jnp.clip(_labels(targets), 0, outputs.shape[-1] - 1)
      picked = jnp.take_along_axis(logp, labels[:, None], axis=-1)
      return -(_mass(outputs, targets) * picked)[:, 0]
    return -jnp.sum(targets * logp, axis=-1)

  def grad(self, outputs, targets):
    self.check_targets(outputs, targets)
    y = _soft_targets(outputs, targets)
    p = jax.nn.softmax(outputs, axis=-1)
    return _mass(outputs, targets) * p - y

  def hvp(self, outputs, targets, tangents):
    self.check_targets(outputs, targets)
    p = jax.nn.softmax(outputs, axis=-1)
    hu = p * tangents - p * jnp.sum(p * tangents, -1, keepdims=True)
    return _mass(outputs, targets) * hu

  def sqrt_hessian(self, outputs, targets):
    self.check_targets(outputs, targets)
    p = jax.nn.softmax(outputs, axis=-1)
    sp = jnp.sqrt(p)
    s = jax.vmap(jnp.diag)(sp) - p[:, :, None] * sp[:, None, :]
    c = p.shape[-1]
    if c > 1:
      # S sqrt(p) = 0: drop that direction. R = the Householder reflection with
      # w = sqrt(p) + e_c (w'w = 2 (1 + sqrt(p_c)) >= 2, stable for every p) maps
      # sqrt(p) to -e_c, so its other columns span sqrt(p)'s complement and
      # (S R)(S R)' = S S' = H; S w = S e_c = sqrt(p_c) (e_c - p).
      last = sp[:, -1:]
      w = sp.at[:, -1].add(1.0)
      u = last * (jax.nn.one_hot(c - 1, c, dtype=p.dtype) - p)
      # S R = S - 2 (S w) w' / (w'w), its first C - 1 columns; 2 / w'w = 1 / (1 + sqrt(p_c)).
      s = s[:, :, :-1] - (u / (1.0 + last))[:, :, None] * w[:, None, :-1]
    return jnp.sqrt(_mass(outputs, targets))[:, :, None] * s

  def sqrt_hessian_sampled(self, key, outputs, targets, num_samples=1):
    self.check_targets(outputs, targets)
    p = jax.nn.softmax(outputs, axis=-1)
    c = jax.random.categorical(key, outputs, axis=-1,
                               shape=(num_samples,) + outputs.shape[:1])  # (M, N)
    onehot = jax.nn.one_hot(c, outputs.shape[-1], dtype=outputs.dtype)  # (M, N, C)
    s = jnp.moveaxis(onehot - p[None], 0, -1)  # (N, C, M)
    scale = jnp.sqrt(_mass(outputs, targets) / num_samples)
    return scale[:, :, None] * s


softmax_cross_entropy = SoftmaxCrossEntropy()
