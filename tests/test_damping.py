"""Tests for the Levenberg-Marquardt damping rule and the reduction ratio."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from curvax import solvers


@pytest.mark.parametrize("rho,expected", [
    (0.1, 1.5), (-3.0, 1.5), (0.2499, 1.5), (0.25, 1.0), (0.5, 1.0), (0.75, 1.0),
    (0.7501, 2.0 / 3.0), (2.0, 2.0 / 3.0), (float("nan"), 1.5), (-float("inf"), 1.5),
])
def test_levenberg_marquardt_cases(rho, expected):
  new = jax.jit(solvers.levenberg_marquardt)(jnp.asarray(1.0), jnp.asarray(rho))
  np.testing.assert_allclose(new, expected, rtol=1e-12)


def test_levenberg_marquardt_clamps():
  assert float(solvers.levenberg_marquardt(1e8, 0.0)) == 1e8
  assert float(solvers.levenberg_marquardt(1e-8, 1.0)) == 1e-8
  np.testing.assert_allclose(
      solvers.levenberg_marquardt(2.0, 0.0, increase=3.0, max_damping=5.0), 5.0)


def test_reduction_ratio():
  # Loss fell by 0.5 where the model predicted -1: rho = 0.5.
  np.testing.assert_allclose(solvers.reduction_ratio(2.0, 1.5, -1.0), 0.5)
  # Loss rose: negative rho.
  np.testing.assert_allclose(solvers.reduction_ratio(2.0, 2.5, -1.0), -0.5)
  # No predicted decrease or non-finite values: -inf (raises the damping).
  assert float(solvers.reduction_ratio(2.0, 1.0, 0.0)) == -np.inf
  assert float(solvers.reduction_ratio(2.0, jnp.nan, -1.0)) == -np.inf
