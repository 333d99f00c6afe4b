r"""Gradient-noise instruments: MeanGSNR, CABS and the EB early-stopping criterion.

All three need only the mini-batch gradient ``g`` and the second moment
``m = (1/B) sum_i g_i^2`` of the unscaled per-example gradients (curvax's
convention; BackPACK's ``SumGradSquared`` is ``m / B``), elementwise, shaped like
the parameters (Dangel, thesis, App. C.3.2, C.3.3, C.3.9; spec diagnostics.md
§3.3). CABS and EB assume SGD without momentum.
"""

from __future__ import annotations

from typing import Any

import jax
import jax.numpy as jnp

Array = jax.Array


def _leaves(*trees):
  return zip(*(jax.tree_util.tree_leaves(t) for t in trees))


def mean_gsnr(grad: Any, second_moment: Any, epsilon: float = 1e-5) -> Array:
  r"""MeanGSNR (Liu et al. 2020; Eq. C.41): ``(1/D) sum_j g_j^2 / (m_j - g_j^2 + eps)``.

  ``m_j - g_j^2`` is the population-style (1/B) variance of the per-example
  gradients; ``eps = 1e-5`` as in Cockpit's code.
  """
  total, d = 0.0, 0
  for g, m in _leaves(grad, second_moment):
    g2 = jnp.square(g)
    total = total + jnp.sum(g2 / (m - g2 + epsilon))
    d += g.size
  return total / d


def cabs(grad: Any, second_moment: Any, loss: Array, learning_rate: float | Array) -> Array:
  r"""CABS batch size (Balles et al. 2017; Eq. C.6): ``eta (1/B) sum_{j,i} (g_ij - g_j)^2 / L``.

  ``(1/B) sum_i (g_ij - g_j)^2 = m_j - g_j^2``, so the numerator is
  ``eta * sum_j (m_j - g_j^2)``.
  """
  var = sum(jnp.sum(m - jnp.square(g)) for g, m in _leaves(grad, second_moment))
  return learning_rate * var / loss


def early_stopping(grad: Any, second_moment: Any, batch_size: int,
                   epsilon: float = 1e-5) -> Array:
  r"""EB criterion (Mahsereci et al. 2017; Eqs. C.7-C.11): stop when positive.

  ``1 - (B/D) sum_j g_j^2 / sigma_j^2`` with the unbiased per-example variance
  ``sigma_j^2 = B (m_j - g_j^2) / (B - 1) + eps``.
  """
  b = batch_size
  total, d = 0.0, 0
  for g, m in _leaves(grad, second_moment):
    g2 = jnp.square(g)
    sigma2 = b * (m - g2) / (b - 1) + epsilon
    total = total + jnp.sum(g2 / sigma2)
    d += g.size
  return 1.0 - b * total / d
