r"""Gradient tests: NormTest, InnerTest, OrthoTest, and their inputs.

With unscaled per-example gradients ``g_i``, mini-batch gradient
``g = (1/B) sum_i g_i`` and batch size ``B`` (Dangel, thesis, App. C.3.5;
spec diagnostics.md §3.3):

* NormTest (Byrd et al. 2012, Eq. C.20):
  ``theta_norm = sqrt((sum_i ||g_i||^2 - B ||g||^2) / (B (B-1) ||g||^2))``;
* InnerTest (Bollapragada et al. 2017, Eq. C.26):
  ``theta_inner = sqrt((sum_i (g_i'g)^2 - B ||g||^4) / (B (B-1) ||g||^4))``;
* OrthoTest (Bollapragada et al. 2017, Eq. C.33):
  ``nu_ortho = sqrt((sum_i ||g_i||^2 - sum_i (g_i'g)^2 / ||g||^2) / (B (B-1) ||g||^2))``.

Each value is the largest threshold at which the test would still pass: the
batch should grow once it exceeds the reference (0.9, 0.9, tan 80° ≈ 5.67).
The only inputs are the per-example squared norms ``||g_i||^2`` and the
projections ``g_i'g`` (row sums of the Gram matrix divided by ``B``); note that
``||g||^2 = mean_i g_i'g``. Numerator round-off below zero is clipped, so
identical per-example gradients give exactly 0 (no noise: any batch passes).

`gram_statistics` computes both from materialised per-example gradients; the
monitor gets them without forming those, from
``curvax.curvature.per_example_statistics(..., dot_with=("mean",))``
(``gradient_norms**2`` and ``dots[0]``; per layer ``a_i' G b_i`` for a Dense
layer with inputs ``a_i``, output gradients ``b_i`` and mean kernel gradient ``G``).
"""

from __future__ import annotations

import math
from typing import Any, Tuple

import jax
import jax.numpy as jnp

Array = jax.Array

NORM_TEST_THRESHOLD = 0.9
INNER_TEST_THRESHOLD = 0.9
# Bollapragada et al.'s nu = tan 80 deg = 5.671; the Cockpit thesis (App. C) and
# Cockpit's plots write "tan(80 deg) ~ 5.84", which is tan 80.28 deg. A reference
# line only: no computation uses it.
ORTHO_TEST_THRESHOLD = math.tan(math.radians(80.0))


def gram_statistics(per_example_grads: Any) -> Tuple[Array, Array]:
  """``(||g_i||^2, g_i'g)``, each ``(B,)``, from per-example gradients (leading axis B).

  Accumulated layer by layer, as Cockpit does during backpropagation.
  """
  leaves = jax.tree_util.tree_leaves(per_example_grads)
  b = leaves[0].shape[0]
  flat = [l.reshape(b, -1) for l in leaves]
  sq_norms = sum(jnp.sum(jnp.square(f), axis=1) for f in flat)
  dots = sum(f @ jnp.mean(f, axis=0) for f in flat)
  return sq_norms, dots


def _parts(sq_norms: Array, dots: Array):
  b = sq_norms.shape[0]
  g_sq = jnp.mean(dots)
  return b, g_sq


def norm_test(sq_norms: Array, dots: Array) -> Array:
  """NormTest ``theta_norm`` from ``||g_i||^2`` and ``g_i'g`` (Eq. C.20)."""
  b, g_sq = _parts(sq_norms, dots)
  num = jnp.maximum(jnp.sum(sq_norms) - b * g_sq, 0.0)
  return jnp.sqrt(num / (b * (b - 1) * g_sq))


def inner_test(sq_norms: Array, dots: Array) -> Array:
  """InnerTest ``theta_inner`` from ``||g_i||^2`` and ``g_i'g`` (Eq. C.26)."""
  del sq_norms
  b, g_sq = _parts(dots, dots)
  num = jnp.maximum(jnp.sum(jnp.square(dots)) - b * jnp.square(g_sq), 0.0)
  return jnp.sqrt(num / (b * (b - 1) * jnp.square(g_sq)))


def ortho_test(sq_norms: Array, dots: Array) -> Array:
  """OrthoTest ``nu_ortho`` from ``||g_i||^2`` and ``g_i'g`` (Eq. C.33)."""
  b, g_sq = _parts(sq_norms, dots)
  num = jnp.maximum(jnp.sum(sq_norms) - jnp.sum(jnp.square(dots)) / g_sq, 0.0)
  return jnp.sqrt(num / (b * (b - 1) * g_sq))
