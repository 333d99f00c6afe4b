"""Tests for curvax.solvers.cg: exact solves, warm start, preconditioning,
stored iterate grid, Martens' criterion and non-positive curvature."""

import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from curvax import solvers
from curvax.solvers import CGStatus


def _spd(n, seed=0, cond_shift=1.0):
  rng = np.random.default_rng(seed)
  q = rng.normal(size=(n, n))
  return q @ q.T / n + cond_shift * np.eye(n), rng.normal(size=n)


def _numpy_cg(a, b, x0, num_iter, minv=None):
  """Plain textbook PCG; returns all iterates x_0..x_num_iter and phi values."""
  minv = np.eye(len(b)) if minv is None else minv
  x = x0.copy()
  r = b - a @ x
  z = minv @ r
  p = z.copy()
  xs, phis = [x.copy()], [0.5 * x @ a @ x - b @ x]
  for _ in range(num_iter):
    ap = a @ p
    alpha = (r @ z) / (p @ ap)
    x = x + alpha * p
    r_new = r - alpha * ap
    z_new = minv @ r_new
    beta = (r_new @ z_new) / (r @ z)
    p = z_new + beta * p
    r, z = r_new, z_new
    xs.append(x.copy())
    phis.append(0.5 * x @ a @ x - b @ x)
  return xs, np.array(phis)


_cg = jax.jit(solvers.cg, static_argnames=(
    "matvec", "preconditioner", "max_iter", "martens_criterion", "nonpositive_curvature"))


@pytest.mark.parametrize("n,seed", [(5, 0), (12, 1)])
def test_cg_solves_spd_within_n_iterations(n, seed):
  a, b = _spd(n, seed)
  res = jax.jit(lambda b: solvers.cg(lambda v: a @ v, b, tol=1e-10,
                                     martens_criterion=False))(b)
  assert int(res.iterations) <= n
  assert int(res.status) == CGStatus.RESIDUAL
  np.testing.assert_allclose(res.x, jnp.linalg.solve(a, b), rtol=1e-8, atol=1e-10)
  x = res.x
  np.testing.assert_allclose(res.phi, 0.5 * x @ a @ x - b @ x, rtol=1e-10)
  np.testing.assert_allclose(res.residual_norm, np.linalg.norm(b - a @ x), atol=1e-9)


def test_cg_on_pytrees():
  a, b = _spd(6, 3)
  tree_b = {"u": jnp.asarray(b[:2]), "w": jnp.asarray(b[2:]).reshape(2, 2)}

  def mv(t):
    v = jnp.concatenate([t["u"], t["w"].ravel()])
    av = a @ v
    return {"u": av[:2], "w": av[2:].reshape(2, 2)}

  res = solvers.cg(mv, tree_b, tol=1e-12)
  sol = np.linalg.solve(a, b)
  np.testing.assert_allclose(res.x["u"], sol[:2], rtol=1e-8)
  np.testing.assert_allclose(res.x["w"].ravel(), sol[2:], rtol=1e-8)


def test_cg_warm_start():
  a, b = _spd(8, 2)
  sol = np.linalg.solve(a, b)
  # A perfect warm start: no iteration at all.
  res = solvers.cg(lambda v: a @ v, b, jnp.asarray(sol), tol=1e-8)
  assert int(res.iterations) == 0 and int(res.status) == CGStatus.RESIDUAL
  assert int(res.num_iterates) == 1 and int(res.iterate_steps[0]) == 0
  # A 2x2 hand-computed step from x0 = (1, 0): A = diag(1, 2), b = (1, 1):
  # r0 = (0, 1), alpha = 1 / 2, x1 = (1, 1/2) = exact solution after 1 step.
  res = solvers.cg(lambda v: jnp.array([1.0, 2.0]) * v, jnp.ones(2), jnp.array([1.0, 0.0]),
                   max_iter=1, tol=0.0)
  np.testing.assert_allclose(res.x, [1.0, 0.5])
  np.testing.assert_allclose(res.phi_history[:2], [-0.5, -0.75])
  # Any warm start agrees with the numpy reference iterate by iterate.
  x0 = np.random.default_rng(5).normal(size=8)
  xs, phis = _numpy_cg(a, b, x0, 3)
  res = solvers.cg(lambda v: a @ v, b, jnp.asarray(x0), max_iter=3, tol=0.0,
                   martens_criterion=False)
  np.testing.assert_allclose(res.x, xs[3], rtol=1e-10)
  np.testing.assert_allclose(res.phi_history, phis, rtol=1e-10)


def test_cg_preconditioning():
  # Exact diagonal preconditioner on a diagonal system: one iteration.
  d = jnp.array([1.0, 10.0, 100.0, 1000.0])
  b = jnp.array([1.0, -2.0, 3.0, 0.5])
  res = solvers.cg(lambda v: d * v, b, preconditioner=lambda r: r / d, tol=1e-12)
  assert int(res.iterations) == 1
  np.testing.assert_allclose(res.x, b / d, rtol=1e-12)
  plain = solvers.cg(lambda v: d * v, b, tol=1e-12)
  assert int(plain.iterations) >= 4  # unpreconditioned: one per distinct eigenvalue
  # A general SPD preconditioner matches textbook PCG iterate by iterate.
  a, bb = _spd(7, 4)
  m = np.diag(np.diag(a)) + 0.3 * np.eye(7)
  minv = np.linalg.inv(m)
  xs, _ = _numpy_cg(a, bb, np.zeros(7), 4, minv)
  res = solvers.cg(lambda v: a @ v, bb, preconditioner=lambda r: minv @ r, max_iter=4,
                   tol=0.0, martens_criterion=False)
  np.testing.assert_allclose(res.x, xs[4], rtol=1e-9)


def test_iterate_grid_values():
  assert solvers.iterate_grid(250) == (1, 2, 3, 4, 5, 7, 9, 11, 14, 18, 24, 31, 40, 52, 67,
                                       87, 113, 147, 191, 248)
  assert solvers.iterate_grid(10) == (1, 2, 3, 4, 5, 7, 9)
  expected = sorted({math.ceil(1.5 ** j) for j in range(20) if math.ceil(1.5 ** j) <= 50})
  assert solvers.iterate_grid(50, 1.5) == tuple(expected)


@pytest.mark.parametrize("max_iter", [12, 9])
def test_cg_stores_grid_iterates(max_iter):
  n = 40
  d = np.logspace(0, 3, n)
  b = np.random.default_rng(0).normal(size=n)
  a = np.diag(d)
  xs, phis = _numpy_cg(a, b, np.zeros(n), max_iter)
  res = solvers.cg(lambda v: d * v, b, max_iter=max_iter, tol=0.0, martens_criterion=False)
  assert int(res.iterations) == max_iter and int(res.status) == CGStatus.MAX_ITER
  grid = [s for s in (1, 2, 3, 4, 5, 7, 9, 11) if s <= max_iter]
  steps = grid + ([max_iter] if grid[-1] != max_iter else [])
  num = int(res.num_iterates)
  assert num == len(steps)
  np.testing.assert_array_equal(res.iterate_steps[:num], steps)
  assert np.all(np.asarray(res.iterate_steps[num:]) == -1)
  for slot, step in enumerate(steps):
    np.testing.assert_allclose(res.iterates[slot], xs[step], rtol=1e-8, atol=1e-12)
    np.testing.assert_allclose(res.iterate_phis[slot], phis[step], rtol=1e-8)
  np.testing.assert_allclose(res.iterates[num - 1], res.x)


def test_martens_criterion_stops_where_the_definition_says():
  n = 300
  d = np.logspace(-3, 1, n)
  b = np.random.default_rng(1).normal(size=n)
  full = solvers.cg(lambda v: d * v, b, max_iter=200, tol=0.0, martens_criterion=False)
  phis = np.asarray(full.phi_history)
  eps = 5e-4
  expected = None
  for i in range(1, 201):
    k = max(10, math.ceil(0.1 * i))
    if i > k and phis[i] < 0 and (phis[i] - phis[i - k]) / phis[i] < k * eps:
      expected = i
      break
  assert expected is not None and 11 <= expected < 200
  res = solvers.cg(lambda v: d * v, b, max_iter=200, tol=0.0, martens_criterion=True)
  assert int(res.status) == CGStatus.MARTENS
  assert int(res.iterations) == expected
  # A looser eps stops earlier.
  early = solvers.cg(lambda v: d * v, b, max_iter=200, tol=0.0, martens_eps=5e-2)
  assert int(early.iterations) < expected


def test_martens_criterion_hand_case():
  # A = I (n large), b = e: CG converges in one step, so phi is constant after
  # it: at i = 11 > k = 10, (phi_11 - phi_1) / phi_11 = 0 < 10 eps. The residual
  # test is disabled by making the matvec slightly inexact: A = I + tiny * diag.
  n = 50
  d = 1.0 + 1e-9 * np.arange(n)
  res = solvers.cg(lambda v: d * v, np.ones(n), max_iter=100, tol=0.0)
  assert int(res.status) == CGStatus.MARTENS
  assert int(res.iterations) == 11


def test_nonpositive_curvature_hand_case():
  # A = diag(2, -1), b = (1, 1): p0 = b, p0'Ap0 = 1, alpha = 2, x1 = (2, 2);
  # r1 = (-3, 3), beta = 9, p1 = (6, 12), p1'Ap1 = -72 <= 0: stop at x1.
  a = jnp.array([2.0, -1.0])
  res = solvers.cg(lambda v: a * v, jnp.ones(2))
  assert int(res.status) == CGStatus.NONPOSITIVE_CURVATURE
  assert int(res.iterations) == 1
  np.testing.assert_allclose(res.x, [2.0, 2.0])
  np.testing.assert_allclose(res.iterates[int(res.num_iterates) - 1], [2.0, 2.0])
  # Saddle-free option: alpha = 18 / |-72| = 1/4, x2 = (3.5, 5).
  res = solvers.cg(lambda v: a * v, jnp.ones(2), max_iter=2, nonpositive_curvature="abs")
  np.testing.assert_allclose(res.x, [3.5, 5.0])
  # Negative curvature on the very first direction: x0 is returned.
  res = solvers.cg(lambda v: -v, jnp.ones(3), jnp.full(3, 0.5))
  assert int(res.status) == CGStatus.NONPOSITIVE_CURVATURE and int(res.iterations) == 0
  np.testing.assert_allclose(res.x, 0.5 * np.ones(3))


@pytest.mark.parametrize("precondition", [False, True])
def test_abs_variant_tracks_the_quadratic_model_past_negative_curvature(precondition):
  # After an "abs" step along negative curvature, p'r != r'z: phi must still be
  # 0.5 x'Ax - b'x of the true (indefinite) A at every iterate it reports.
  d = jnp.array([2.0, -1.0, 3.0, 0.5, -0.25, 1.5], jnp.float64)
  b = jnp.linspace(0.5, 1.5, 6, dtype=jnp.float64)
  m = jnp.linspace(1.0, 2.0, 6, dtype=jnp.float64)
  res = solvers.cg(lambda v: d * v, b, max_iter=5, tol=0.0, martens_criterion=False,
                   nonpositive_curvature="abs",
                   preconditioner=(lambda r: r / m) if precondition else None)
  assert int(res.iterations) == 5
  phi = lambda x: 0.5 * jnp.vdot(x, d * x) - jnp.vdot(b, x)  # noqa: E731
  np.testing.assert_allclose(res.phi, phi(res.x), rtol=1e-10)
  stored = res.iterate_steps[:int(res.num_iterates)]
  for slot, step in enumerate(stored):
    x = jax.tree.map(lambda a: a[slot], res.iterates)
    np.testing.assert_allclose(res.phi_history[int(step)], phi(x), rtol=1e-10)
    np.testing.assert_allclose(res.iterate_phis[slot], phi(x), rtol=1e-10)


def test_nonfinite_matvec_stops():
  res = solvers.cg(lambda v: v * jnp.nan, jnp.ones(3))
  assert int(res.status) == CGStatus.NONFINITE
  assert int(res.iterations) == 0
  assert np.all(np.isfinite(res.x))


def test_cg_jits_once():
  a, b = _spd(6, 0)
  traces = []

  @jax.jit
  def solve(b):
    traces.append(1)
    return solvers.cg(lambda v: a @ v, b, tol=1e-10)

  r1 = solve(b)
  r2 = solve(2 * b)
  assert len(traces) == 1
  np.testing.assert_allclose(r2.x, 2 * r1.x, rtol=1e-8)


def test_cg_bad_arguments():
  with pytest.raises(ValueError, match="nonpositive_curvature"):
    solvers.cg(lambda v: v, jnp.ones(2), nonpositive_curvature="flip")
  with pytest.raises(ValueError, match="x0"):
    solvers.cg(lambda v: v, jnp.ones(2), jnp.ones(3))


@pytest.mark.parametrize("variant", ["stop", "abs"])
def test_zero_curvature_always_stops(variant):
  # A = diag(1, 0), b = e_2: p_0 = b and p_0'Ap_0 = 0 exactly. No step (it would
  # be infinite): x_0 is returned with the curvature status, in both variants.
  res = solvers.cg(lambda v: jnp.array([1.0, 0.0]) * v, jnp.array([0.0, 1.0]),
                   nonpositive_curvature=variant)
  assert int(res.status) == CGStatus.NONPOSITIVE_CURVATURE
  assert int(res.iterations) == 0
  np.testing.assert_array_equal(res.x, [0.0, 0.0])
  np.testing.assert_allclose(res.residual_norm, 1.0)


def test_failed_iteration_leaves_no_trace():
  # The hand case of test_nonpositive_curvature_hand_case: iteration 2 (a grid
  # point) meets p'Ap = -72 and is not taken. Only x_1 is stored, phi_history
  # is NaN beyond iteration 1, and phi / the residual are those of x_1.
  a = jnp.array([2.0, -1.0])
  res = jax.jit(lambda b: solvers.cg(lambda v: a * v, b))(jnp.ones(2))
  assert int(res.status) == CGStatus.NONPOSITIVE_CURVATURE and int(res.iterations) == 1
  x1 = np.array([2.0, 2.0])
  phi1 = 0.5 * x1 @ (np.asarray(a) * x1) - x1.sum()                     # = -2
  assert int(res.num_iterates) == 1
  np.testing.assert_array_equal(res.iterate_steps, [1] + [-1] * (len(res.iterate_steps) - 1))
  np.testing.assert_allclose(res.iterates[0], x1)
  np.testing.assert_allclose(res.iterate_phis[0], phi1)
  np.testing.assert_allclose(res.phi, phi1)
  np.testing.assert_allclose(res.phi_history[:2], [0.0, phi1])
  assert np.all(np.isnan(np.asarray(res.phi_history[2:])))
  np.testing.assert_allclose(res.residual_norm, np.linalg.norm(1.0 - np.asarray(a) * x1))


def test_nonfinite_preconditioned_residual_keeps_the_last_finite_iterate():
  # p'Ap is finite but M^{-1} r_1 is NaN: the step to x_1 is not taken. A =
  # diag(1, 2), b = (1, 1): alpha_0 = 2/3, r_1 = (1/3, -1/3), where this
  # preconditioner returns NaN (|r[0]| < 0.9).
  d = jnp.array([1.0, 2.0])
  precond = lambda r: jnp.where(jnp.abs(r[0]) < 0.9, jnp.nan, 1.0) * r  # noqa: E731
  res = solvers.cg(lambda v: d * v, jnp.ones(2), preconditioner=precond)
  assert int(res.status) == CGStatus.NONFINITE
  assert int(res.iterations) == 0
  np.testing.assert_array_equal(res.x, [0.0, 0.0])
  np.testing.assert_allclose(res.phi, 0.0)
  assert np.all(np.isnan(np.asarray(res.phi_history[1:])))
  # residual_norm is ||b - A x|| of the returned x, not of the rejected step.
  np.testing.assert_allclose(res.residual_norm, np.sqrt(2.0))
  assert int(res.num_iterates) == 1 and int(res.iterate_steps[0]) == 0


def test_zero_iterations_return_the_warm_start():
  a, b = _spd(5, 6)
  x0 = np.random.default_rng(7).normal(size=5)
  res = solvers.cg(lambda v: a @ v, b, jnp.asarray(x0), max_iter=0)
  assert int(res.status) == CGStatus.MAX_ITER and int(res.iterations) == 0
  np.testing.assert_allclose(res.x, x0, rtol=1e-15)
  np.testing.assert_allclose(res.phi, 0.5 * x0 @ a @ x0 - b @ x0, rtol=1e-12)
  assert res.phi_history.shape == (1,)
  np.testing.assert_allclose(res.residual_norm, np.linalg.norm(b - a @ x0), rtol=1e-12)
  assert int(res.num_iterates) == 1 and int(res.iterate_steps[0]) == 0


def test_cg_defaults_follow_martens():
  # max_iter = 250 (Martens 2010): without the other criteria CG runs exactly
  # 250 iterations and keeps the spec's grid ceil(1.3^j) plus the final one.
  n = 300
  d = np.logspace(0, 3, n)
  b = np.random.default_rng(0).normal(size=n)
  res = solvers.cg(lambda v: d * v, b, tol=0.0, martens_criterion=False)
  assert int(res.status) == CGStatus.MAX_ITER and int(res.iterations) == 250
  assert res.phi_history.shape == (251,)
  num = int(res.num_iterates)
  np.testing.assert_array_equal(
      res.iterate_steps[:num], [1, 2, 3, 4, 5, 7, 9, 11, 14, 18, 24, 31, 40, 52, 67, 87, 113,
                                147, 191, 248, 250])


def test_cg_default_residual_tolerance():
  # tol = 1e-5 by default: CG stops at the first i with ||r_i|| <= 1e-5 ||b||,
  # found here from textbook CG (the crossing has a wide margin: 3e-5 -> 5e-6).
  n = 40
  d = np.logspace(0, 2, n)
  b = np.random.default_rng(0).normal(size=n)
  xs, _ = _numpy_cg(np.diag(d), b, np.zeros(n), n)
  rel = np.array([np.linalg.norm(b - d * x) for x in xs]) / np.linalg.norm(b)
  expected = int(np.argmax(rel <= 1e-5))
  assert expected > 0 and rel[expected - 1] > 2e-5 and rel[expected] < 0.6e-5
  res = solvers.cg(lambda v: d * v, b, martens_criterion=False)
  assert int(res.status) == CGStatus.RESIDUAL
  assert int(res.iterations) == expected


def test_martens_window_needs_more_than_k_iterations():
  # A warm start at the solution's quadratic-model value: phi barely moves, so
  # the relative progress over any window is ~0. Still, the test needs i > k =
  # 10 (phi_{i-k} with i - k >= 1): it fires at i = 11, not at i = 10 (where
  # the window would reach back to phi_0).
  n = 50
  d = 1.0 + 1e-9 * np.arange(n)
  x0 = 1.0 / d + 1e-3 * np.random.default_rng(2).normal(size=n)
  full = solvers.cg(lambda v: d * v, np.ones(n), jnp.asarray(x0), max_iter=15, tol=0.0,
                    martens_criterion=False)
  assert int(full.iterations) == 15
  phis = np.asarray(full.phi_history)
  assert np.all(phis < 0) and abs((phis[10] - phis[0]) / phis[10]) < 10 * 5e-4
  res = solvers.cg(lambda v: d * v, np.ones(n), jnp.asarray(x0), max_iter=15, tol=0.0)
  assert int(res.status) == CGStatus.MARTENS
  assert int(res.iterations) == 11


def test_martens_criterion_needs_negative_phi():
  # b = 0: phi(x) = x'Ax / 2 > 0 at every iterate, shrinking by less than
  # k * eps per window. Martens' test requires phi_i < 0, so it never fires.
  n = 50
  d = np.logspace(0, 3, n)
  x0 = 1e-3 * np.ones(n)
  res = solvers.cg(lambda v: d * v, np.zeros(n), jnp.asarray(x0), max_iter=30, tol=0.0)
  phis = np.asarray(res.phi_history)
  assert np.all(phis > 0) and phis[0] - phis[30] < 5e-3
  assert int(res.status) == CGStatus.MAX_ITER and int(res.iterations) == 30


def test_iterate_grid_is_exact_near_integers():
  # gamma = sqrt(2): gamma^(2j) = 2^j exactly in real arithmetic, but
  # 1.4142135623730951 ** 2 = 2.0000000000000004 in floats; ceil must give 2,
  # 4, 8, ... The exact grid is ceil(sqrt(2^j)) = isqrt(2^j - 1) + 1.
  exact = sorted({math.isqrt(2 ** j - 1) + 1 for j in range(40)
                  if math.isqrt(2 ** j - 1) + 1 <= 100})
  assert solvers.iterate_grid(100, math.sqrt(2.0)) == tuple(exact)
  assert exact[:6] == [1, 2, 3, 4, 6, 8]


@pytest.mark.parametrize("kwargs,match", [
    (dict(max_iter=-1), "max_iter"), (dict(max_iter=2.5), "max_iter"),
    (dict(gamma=1.0), "gamma"), (dict(gamma=0.5), "gamma"),
])
def test_cg_rejects_bad_sizes(kwargs, match):
  with pytest.raises(ValueError, match=match):
    solvers.cg(lambda v: v, jnp.ones(2), **kwargs)


@pytest.mark.parametrize("eps", [1e-4, 2e-5])
def test_martens_window_grows_past_100_iterations(eps):
  # Beyond i = 100 the window is k = ceil(0.1 i) > 10; these eps make CG stop
  # there at an i that is not a multiple of 10 (where the rounding matters).
  n = 300
  d = np.logspace(-3, 1, n)
  b = np.random.default_rng(1).normal(size=n)
  full = solvers.cg(lambda v: d * v, b, max_iter=250, tol=0.0, martens_criterion=False)
  phis = np.asarray(full.phi_history)
  expected = next(i for i in range(1, 251)
                  if i > (k := max(10, math.ceil(0.1 * i))) and phis[i] < 0
                  and (phis[i] - phis[i - k]) / phis[i] < k * eps)
  assert 100 < expected < 250 and expected % 10 != 0
  res = solvers.cg(lambda v: d * v, b, max_iter=250, tol=0.0, martens_eps=eps)
  assert int(res.status) == CGStatus.MARTENS
  assert int(res.iterations) == expected


@pytest.mark.parametrize("low", [jnp.float32, jnp.bfloat16])
def test_cg_with_mixed_precision_leaves_works_in_the_widest_dtype(low):
  """Leaves of two dtypes (a float64 scalar dtype): the loop keeps its types
  (each vector leaf is promoted to float64, as the scalars are) and solves the
  system as the all-float64 CG does, although `matvec` returns the low dtype."""
  a = np.diag(np.arange(1.0, 7.0)) + 0.1 * np.ones((6, 6))
  b = {"lo": jnp.asarray([1.0, -2.0, 0.5], low), "hi": jnp.asarray([0.25, 1.0, -1.0])}

  def matvec(v):
    out = jnp.asarray(a) @ jnp.concatenate([v["lo"].astype(jnp.float64), v["hi"]])
    return {"lo": out[:3].astype(low), "hi": out[3:]}
  res = jax.jit(lambda b: solvers.cg(matvec, b, max_iter=6, tol=0.0))(b)
  assert res.x["lo"].dtype == jnp.float64 and res.x["hi"].dtype == jnp.float64
  x = np.linalg.solve(a, np.concatenate([np.asarray(b["lo"], np.float64), np.asarray(b["hi"])]))
  # Only matvec's rounding to `low` separates it from the exact solution.
  tol = 1e-5 if low == jnp.float32 else 3e-2
  np.testing.assert_allclose(np.concatenate([res.x["lo"], res.x["hi"]]), x, rtol=tol, atol=tol)
