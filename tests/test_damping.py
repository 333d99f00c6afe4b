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


@pytest.mark.parametrize("before,after,predicted", [
    (2.0, 1.0, 0.5),            # the model predicts an increase: rho would be -2
    (2.0, 2.5, 0.0),            # no predicted change, loss rose: rho would be +inf
    (2.0, 2.0, 0.0),            # no predicted change, loss unchanged: 0 / 0
    (jnp.nan, 1.0, -1.0),       # non-finite loss before
    (jnp.inf, 1.0, -1.0),
    (2.0, -jnp.inf, -1.0),      # non-finite loss after (rho would be +inf)
    (2.0, 1.0, jnp.nan),        # non-finite prediction
])
def test_reduction_ratio_untrusted_model_is_minus_inf(before, after, predicted):
  """Spec: phi(p) >= 0 or any non-finite value -> rho = -inf, whatever the
  arithmetic (before - after) / phi would give (-2, +inf, NaN ...)."""
  rho = jax.jit(solvers.reduction_ratio)(before, after, predicted)
  assert float(rho) == -np.inf
  # ... so that the damping goes up.
  np.testing.assert_allclose(solvers.levenberg_marquardt(1.0, rho), 1.5)


@pytest.mark.parametrize("rho", [0.0, 0.5, 1.0])
def test_levenberg_marquardt_keeps_the_damping_dtype(rho):
  """A float32 damping stays float32 (the optimiser state's dtype must not
  change between steps under jit), even with a float64 rho (x64 is on)."""
  damping = jnp.asarray(1.0, jnp.float32)
  new = jax.jit(solvers.levenberg_marquardt)(damping, jnp.asarray(rho, jnp.float64))
  assert new.dtype == jnp.float32
  np.testing.assert_allclose(new, {0.0: 1.5, 0.5: 1.0, 1.0: 2.0 / 3.0}[rho], rtol=1e-6)


@pytest.mark.parametrize("damping, rho, expected", [(1, 0.0, 1.5), (3, 1.0, 2.0), (2, 0.5, 2.0)])
def test_levenberg_marquardt_integer_damping_is_not_truncated(damping, rho, expected):
  """Python/NumPy int damping: 1 * 3/2 is 1.5 (the update used to cast back to int: 1)."""
  for d in (damping, np.int32(damping)):
    out = jax.jit(solvers.levenberg_marquardt)(d, jnp.float32(rho))
    assert jnp.issubdtype(out.dtype, jnp.floating)
    np.testing.assert_allclose(out, expected, rtol=1e-6)
