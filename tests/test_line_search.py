"""Tests for Armijo line search and CG backtracking over stored iterates."""

import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from curvax import solvers


def _expected_armijo(f, f0, slope, c=0.01, beta=0.8, max_red=20, alpha0=1.0):
  alpha = alpha0
  for n in range(max_red + 1):
    if f(alpha) <= f0 + c * alpha * slope:
      return alpha, n
    if n < max_red:
      alpha *= beta
  return 0.0, max_red


@pytest.mark.parametrize("scale", [1.0, 3.0, 10.0, 1e6])
def test_armijo_on_1d_quadratic(scale):
  # f(alpha) = (scale * alpha - 1)^2 along the direction; f(0) = 1, f'(0) = -2 scale.
  f = lambda a: (scale * a - 1.0) ** 2  # noqa: E731
  res = jax.jit(lambda: solvers.armijo(f, 1.0, -2.0 * scale))()
  alpha, n = _expected_armijo(f, 1.0, -2.0 * scale)
  # Closed form: accepted iff (s a - 1)^2 <= 1 - 0.02 s a  <=>  s a <= 1.98.
  assert scale * float(res.step_size) <= 1.98 or float(res.step_size) == 0.0
  np.testing.assert_allclose(res.step_size, alpha, rtol=1e-12)
  assert int(res.num_reductions) == n
  assert bool(res.accepted) == (alpha > 0)
  if alpha > 0:
    np.testing.assert_allclose(res.loss, f(alpha), rtol=1e-12)
  else:
    np.testing.assert_allclose(res.loss, 1.0)


def test_armijo_closed_form_reductions():
  # s = 3: need 3 * 0.8^n <= 1.98  ->  n = ceil(log(0.66) / log(0.8)) = 2.
  res = solvers.armijo(lambda a: (3.0 * a - 1.0) ** 2, 1.0, -6.0)
  assert int(res.num_reductions) == math.ceil(math.log(1.98 / 3) / math.log(0.8)) == 2
  np.testing.assert_allclose(res.step_size, 0.64)


def test_armijo_no_acceptable_step_and_nonfinite():
  res = solvers.armijo(lambda a: 1.0 + a, 1.0, -1.0)  # ascent: never accepted
  assert float(res.step_size) == 0.0 and not bool(res.accepted)
  assert int(res.num_reductions) == 20
  res = solvers.armijo(lambda a: jnp.where(a > 0.5, jnp.nan, (a - 1.0) ** 2), 1.0, -2.0)
  np.testing.assert_allclose(res.step_size, 0.8 ** 4)  # first alpha <= 0.5 that is finite


def test_armijo_uses_initial_value():
  # f(1) = 0 would be accepted; a (pretend) known f(1) = 5 must be used instead,
  # so the search reduces once to alpha = 0.8.
  f = lambda a: (a - 1.0) ** 2  # noqa: E731
  assert float(solvers.armijo(f, 1.0, -2.0).step_size) == 1.0
  res = solvers.armijo(f, 1.0, -2.0, initial_value=5.0)
  np.testing.assert_allclose(res.step_size, 0.8)
  assert int(res.num_reductions) == 1


def test_armijo_accepts_equality():
  # The search continues while f(alpha) > f(0) + c alpha f'(0): equality is
  # accepted. f is the Armijo bound itself, computed in the same order.
  res = solvers.armijo(lambda a: 1.0 + 0.01 * a * -2.0, 1.0, -2.0)
  assert bool(res.accepted) and float(res.step_size) == 1.0
  assert int(res.num_reductions) == 0


def test_armijo_rejects_minus_inf():
  # -inf satisfies the inequality but is not finite: never accepted; the first
  # alpha <= 0.5 (0.8^4, finite) is.
  f = lambda a: jnp.where(a > 0.5, -jnp.inf, (a - 1.0) ** 2)  # noqa: E731
  res = solvers.armijo(f, 1.0, -2.0)
  np.testing.assert_allclose(res.step_size, 0.8 ** 4)
  np.testing.assert_allclose(res.loss, (0.8 ** 4 - 1.0) ** 2)
  assert int(res.num_reductions) == 4 and bool(res.accepted)


@pytest.mark.parametrize("initial_step", [0.5, 4.0])
def test_armijo_starts_at_initial_step(initial_step):
  f = lambda a: (a - 1.0) ** 2  # noqa: E731
  res = jax.jit(lambda: solvers.armijo(f, 1.0, -2.0, initial_step=initial_step))()
  alpha, n = _expected_armijo(f, 1.0, -2.0, alpha0=initial_step)
  assert n == (0 if initial_step == 0.5 else 4)   # 4 * 0.8^4 = 1.6384: first accepted
  np.testing.assert_allclose(res.step_size, alpha, rtol=1e-12)
  assert int(res.num_reductions) == n


def _counting(losses):
  """fn(x) = losses[x] that also counts its executions (not its traces)."""
  calls = []

  def fn(x):
    jax.debug.callback(lambda: calls.append(1))
    return losses[x.astype(int)]
  return fn, calls


@pytest.mark.parametrize("losses,num,last_loss,index,evaluations", [
    ([1.0, 2.0, 3.0], 3, None, 0, 3),        # all the way back: slot 0 once, nothing before it
    ([3.0, 1.0, 2.0], 3, None, 1, 3),        # visits 2, 1 and looks at 0
    ([1.0, 2.0, 3.0], 1, None, 0, 1),        # a single iterate: one evaluation
    ([1.0, 2.0, 3.0], 3, 3.0, 0, 2),         # known last loss: slots 1 and 0 only
    ([5.0, 1.0, 2.0, 4.0], 4, None, 1, 4),
])
def test_cg_backtracking_counts_its_evaluations(losses, num, last_loss, index, evaluations):
  """Only the visited iterates and one more are evaluated, each once, and
  num_evaluations says how many (counted here by a host callback)."""
  fn, calls = _counting(jnp.asarray(losses))
  res = solvers.cg_backtracking(
      fn, jnp.arange(len(losses), dtype=jnp.float64), num,
      last_loss=None if last_loss is None else jnp.asarray(last_loss))
  jax.effects_barrier()
  assert int(res.index) == index
  assert len(calls) == evaluations
  assert int(res.num_evaluations) == evaluations


def test_cg_backtracking_stops_at_ties():
  # fn(iterate_{j-1}) < fn(iterate_j) is strict: an equal loss does not step back.
  losses = jnp.array([1.0, 2.0, 2.0])
  fn = lambda x: losses[x.astype(int)]  # noqa: E731
  res = solvers.cg_backtracking(fn, jnp.arange(3.0), 3)
  assert int(res.index) == 2 and float(res.loss) == 2.0


def test_cg_backtracking_nonfinite_known_last_loss():
  # A NaN last_loss counts as +inf: step back from it like from a NaN fn value.
  losses = jnp.array([3.0, 1.0, 2.0])
  fn = lambda x: losses[x.astype(int)]  # noqa: E731
  res = solvers.cg_backtracking(fn, jnp.arange(3.0), 3, last_loss=jnp.asarray(jnp.nan))
  assert int(res.index) == 1 and float(res.loss) == 1.0
  assert float(res.last_loss) == np.inf


def test_cg_backtracking_picks_first_non_improving():
  losses = jnp.array([5.0, 3.0, 2.0, 2.5, 4.0, 9.0])  # stored iterates' losses
  iterates = {"v": jnp.arange(6.0)[:, None] * jnp.ones((6, 2))}
  fn = lambda x: losses[x["v"][0].astype(int)]  # noqa: E731
  res = jax.jit(solvers.cg_backtracking, static_argnums=0)(fn, iterates, 6)
  # From slot 5 (9.0) back to 4 (4.0), 3 (2.5), 2 (2.0); slot 1 (3.0) is worse.
  assert int(res.index) == 2 and float(res.loss) == 2.0
  np.testing.assert_allclose(res.iterate["v"], [2.0, 2.0])
  assert float(res.last_loss) == 9.0
  # Only num_iterates valid: from slot 3 (2.5) back to 2 (2.0), not 1.
  res = solvers.cg_backtracking(fn, iterates, 4)
  assert int(res.index) == 2
  # Last iterate best: keep it.
  res = solvers.cg_backtracking(fn, iterates, 3, last_loss=jnp.asarray(2.0))
  assert int(res.index) == 2 and int(res.num_evaluations) == 1
  # Single iterate.
  res = solvers.cg_backtracking(fn, iterates, 1)
  assert int(res.index) == 0 and float(res.loss) == 5.0


def test_cg_backtracking_steps_back_from_nan():
  losses = jnp.array([3.0, 1.0, jnp.nan])
  fn = lambda x: losses[x.astype(int)]  # noqa: E731
  res = solvers.cg_backtracking(fn, jnp.arange(3.0), 3)
  assert int(res.index) == 1 and float(res.loss) == 1.0


def test_cg_backtracking_with_a_float32_last_loss_and_a_float64_objective():
  """float32 parameters with float64 data (x64 on): the loop runs in fn's dtype."""
  losses = jnp.array([3.0, 1.0, 2.0], jnp.float64)
  fn = lambda x: losses[x.astype(int)]  # noqa: E731
  res = jax.jit(solvers.cg_backtracking, static_argnums=0)(
      fn, jnp.arange(3.0, dtype=jnp.float32), 3, last_loss=jnp.asarray(2.0, jnp.float32))
  assert int(res.index) == 1 and float(res.loss) == 1.0
  assert res.loss.dtype == jnp.float64
