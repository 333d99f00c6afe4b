"""DeepOBS's synthetic problems: the noisy deep quadratic and noisy 2-D functions.

``quadratic_deep`` (seed 001, App. A.1.1; DeepOBS ``quadratic_deep``): per-example
loss ``l_i(theta) = 1/2 (theta - x_i)' Q (theta - x_i)`` with ``x_i ~ N(0, 0.6^2 I)``
(1,000 training draws from ``RandomState(42)``, test seed 43, validation seed 44),
``theta_0 = 1``. ``Q = R' diag(lambda) R`` with 90 eigenvalues ~ U(0, 1) then 10 ~
U(30, 60) and a Haar rotation drawn with Diaconis & Shahshahani's subgroup
algorithm from the same seed-42 stream (negated, as DeepOBS does). In curvax
form the model is linear, ``f(theta, x) = Q^{1/2} (theta - x)``, and the loss is
``mean_squared_error`` against zero targets, so the GGN equals the Hessian ``Q``.

``two_d_*``: per-example loss ``f(u, v) + u x_i + v y_i`` with ``(x_i, y_i) ~
N(0, I)`` (10,000 draws, ``RandomState(42)``; validation seed 44); the test set
is all zeros, so test loss is ``f`` itself and the gradient noise is additive,
``N(0, I / B)``. The model outputs that per-example value and the loss is the
identity (``value_loss``): its output Hessian is zero, so use Hessian (not GGN)
curvature on these problems (the runner builds ``hessian_free`` and
``curvature_step_size`` with ``curvature="hessian"`` for them unless told otherwise).
"""

from __future__ import annotations

import math

import jax.numpy as jnp
import numpy as np

from curvax.losses import as_loss


def random_rotation(dim: int, rng: np.random.RandomState) -> np.ndarray:
  """Haar-random rotation (DeepOBS's subgroup algorithm, negated like DeepOBS)."""
  t = 2 * np.pi * rng.uniform()
  r = np.array([[np.cos(t), np.sin(t)], [-np.sin(t), np.cos(t)]])
  for d in range(2, dim):
    v = rng.normal(size=(d + 1, 1))
    v = v / np.sqrt(v.T.dot(v))
    e = np.concatenate((np.array([[1.0]]), np.zeros((d, 1))), axis=0)
    x = (e - v) / np.sqrt((e - v).T.dot(e - v))
    big = np.vstack([np.hstack([[[1.0]], np.zeros((1, d))]), np.hstack([np.zeros((d, 1)), r])])
    r = big - 2 * np.outer(x, x.T.dot(big))
  return -r


def deep_quadratic_hessian() -> np.ndarray:
  """DeepOBS's ``quadratic_deep`` Hessian Q (100 x 100), from a fresh RandomState(42)."""
  rng = np.random.RandomState(42)
  eig = np.concatenate((rng.uniform(0.0, 1.0, 90), rng.uniform(30.0, 60.0, 10)))
  r = random_rotation(100, rng)
  return r.T.dot(np.diag(eig)).dot(r)


def quadratic_data(seed: int, size: int = 1000, dim: int = 100, noise: float = 0.6):
  x = np.float32(np.random.RandomState(seed).normal(0.0, noise, (size, dim)))
  return x, np.zeros((size, dim), np.float32)


def rosenbrock(u, v):
  return (1.0 - u) ** 2 + 100.0 * (v - u ** 2) ** 2


def beale(u, v):
  return ((1.5 - u + u * v) ** 2 + (2.25 - u + u * v ** 2) ** 2
          + (2.625 - u + u * v ** 3) ** 2)


def branin(u, v):
  return ((v - 5.1 / (4 * math.pi ** 2) * u ** 2 + 5 / math.pi * u - 6) ** 2
          + 10 * (1 - 1 / (8 * math.pi)) * jnp.cos(u) + 10)


# name -> (f, start (u0, v0), a minimiser, minimum value)
TWO_D = {
    "two_d_rosenbrock": (rosenbrock, (-0.5, 1.5), (1.0, 1.0), 0.0),
    "two_d_beale": (beale, (-4.5, 4.5), (3.0, 0.5), 0.0),
    "two_d_branin": (branin, (2.5, 12.5), (math.pi, 2.275), 0.39788735772973816),
}


def two_d_data(seed: int, size: int = 10000, noise: float = 1.0):
  rng = np.random.RandomState(seed)
  x = rng.normal(0.0, noise, size)
  y = rng.normal(0.0, noise, size)
  return np.float32(np.stack([x, y], axis=1)), np.zeros((size,), np.float32)


def _value(outputs, targets):
  del targets
  return outputs[:, 0]


value_loss = as_loss(_value)
"""Identity loss: the model's (N, 1) output is the per-example loss (2-D problems)."""
