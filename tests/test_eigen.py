"""ViViT GGN eigenpairs and Lanczos against jnp.linalg.eigh of explicit matrices."""

import jax
import jax.flatten_util
import jax.numpy as jnp
import numpy as np
import pytest
from jax.flatten_util import ravel_pytree

import curvax
from curvax.curvature import eigen, krylov
from reference import (LOSSES, explicit_ggn, explicit_hessian, explicit_jacobians,
                       explicit_output_hessians, flat, problem)

CONFIGS = [(m, l) for m in ("mlp", "cnn") for l in LOSSES]
K = 4


def _rows(tree):
  return np.asarray(jax.vmap(lambda t: ravel_pytree(t)[0])(tree))


@pytest.mark.parametrize("model,loss_name", CONFIGS)
def test_vivit_eigenpairs_match_eigh_of_explicit_ggn(model, loss_name):
  apply_fn, loss, params, batch = problem(model, loss_name, n=5)
  g = np.asarray(jax.jit(explicit_ggn, static_argnums=(0, 1))(apply_fn, loss, params, batch))

  @jax.jit
  def run(p, b):
    res = eigen.ggn_eigenpairs(apply_fn, loss, p, b, K, chunk_size=2)
    jac = explicit_jacobians(apply_fn, p, b[0])
    hess = explicit_output_hessians(loss, apply_fn(p, b[0]), b[1])
    return res, jac, hess

  res, jac, hess = run(params, batch)
  lam_ref = np.linalg.eigh(g)[0][::-1][:K]
  assert np.all(res.valid)
  np.testing.assert_allclose(res.eigenvalues, lam_ref, rtol=1e-8, atol=1e-12)
  e = _rows(res.eigenvectors)  # (K, P)
  np.testing.assert_allclose(e @ g.T, res.eigenvalues[:, None] * e, atol=1e-9 * lam_ref[0])
  np.testing.assert_allclose(e @ e.T, np.eye(K), atol=1e-8)
  # Per-example curvatures e' G_n e from the Gram eigenvectors (spec §2.4).
  u = np.einsum("ncp,kp->nkc", jac, e)
  per = np.einsum("nkc,ncd,nkd->nk", u, hess, u)
  np.testing.assert_allclose(res.per_example_curvatures, per, rtol=1e-7, atol=1e-10)
  np.testing.assert_allclose(res.per_example_curvatures.mean(0), res.eigenvalues, rtol=1e-9)


def test_vivit_monte_carlo_factor_and_masking():
  apply_fn, loss, params, batch = problem("mlp", "softmax_cross_entropy", n=3)
  key = jax.random.PRNGKey(7)

  # The third example repeats the first: the exact factor (softmax: C - 1 = 2
  # columns per example, N (C - 1) = 6 in all) then has rank 4.
  x, y = batch
  dup = (x.at[2].set(x[0]), y.at[2].set(y[0]))

  @jax.jit
  def run(params, batch, dup):
    v = eigen.ggn_factor(apply_fn, loss, params, batch, key=key, num_samples=2)
    res = eigen.ggn_eigenpairs(apply_fn, loss, params, batch, 6, key=key, num_samples=2)
    full = eigen.ggn_eigenpairs(apply_fn, loss, params, dup, 6)
    return v, res, full

  v, res, full = run(params, batch, dup)
  vm = _rows(jax.tree_util.tree_map(lambda a: a.reshape((-1,) + a.shape[2:]), v))  # (NM, P)
  g_mc = vm.T @ vm
  np.testing.assert_allclose(res.eigenvalues, np.linalg.eigh(g_mc)[0][::-1][:6], rtol=1e-8, atol=1e-12)
  e = _rows(res.eigenvectors)
  np.testing.assert_allclose(e @ g_mc, res.eigenvalues[:, None] * e, atol=1e-9)
  # The 2 null directions of the Gram matrix are masked, their vectors zero.
  assert int(full.valid.sum()) == 4
  assert np.all(_rows(full.eigenvectors)[~np.asarray(full.valid)] == 0)
  g = np.asarray(jax.jit(explicit_ggn, static_argnums=(0, 1))(apply_fn, loss, params, dup))
  np.testing.assert_allclose(np.asarray(full.eigenvalues)[np.asarray(full.valid)],
                             np.linalg.eigh(g)[0][::-1][:4], rtol=1e-8, atol=1e-12)
  with pytest.raises(ValueError, match="num_eigenpairs"):
    eigen.ggn_eigenpairs(apply_fn, loss, params, batch, 7)


def test_vivit_default_threshold_keeps_small_accurate_float32_eigenvalues():
  """float32, D = 10^5 (a linear model): the default threshold is the round-off
  level ``max(NK, sqrt D) eps lam_max`` (~4e-5 lam_max here), so an accurate
  eigenvalue at ~0.3% of ``lam_max`` is returned valid; the worst-case level
  ``D eps lam_max`` (~1.2% of ``lam_max``) masked it."""
  n, d_in, c = 2, 20_000, 5
  x = jax.random.normal(jax.random.PRNGKey(0), (n, d_in)) / np.sqrt(d_in)
  x = x.at[1].multiply(0.05)  # the second example: ~400x smaller curvature
  apply_fn = lambda p, xx: xx @ p["w"]
  loss = LOSSES["mean_squared_error"]

  def run(dtype):
    params = {"w": jnp.zeros((d_in, c), dtype)}
    batch = (x.astype(dtype), jnp.zeros((n, c), dtype))
    return jax.jit(lambda p, b: eigen.ggn_eigenpairs(apply_fn, loss, p, b, n * c,
                                                      chunk_size=None))(params, batch)

  res, ref = run(jnp.float32), run(jnp.float64)
  assert res.eigenvalues.dtype == jnp.float32
  lam_ref = np.asarray(ref.eigenvalues)
  assert np.all(ref.valid) and lam_ref[-1] < 0.01 * lam_ref[0]
  assert np.all(res.valid)
  # Accurate to the eigh round-off ~ eps lam_max: ~0.2% of the smallest here.
  np.testing.assert_allclose(res.eigenvalues, lam_ref, rtol=1e-6,
                             atol=20 * np.finfo(np.float32).eps * lam_ref[0])
  e = _rows(res.eigenvectors).astype(np.float64)
  # ``|e_k|^2 - 1`` is eigh's round-off ~ eps lam_max over lam_k: the eigenvalues'
  # 20 eps lam_max allowance over lam_min (~1e-3). A fixed 1e-4 (~2 eps lam_max /
  # lam_min) failed at 1.05e-4 on jax 0.5.3 and 0.6.0 with 4 host devices.
  np.testing.assert_allclose(e @ e.T, np.eye(n * c),
                             atol=20 * np.finfo(np.float32).eps * lam_ref[0] / lam_ref[-1])


def test_lanczos_matches_eigh():
  apply_fn, loss, params, batch = problem("mlp", "softmax_cross_entropy")
  loss_fn = curvax.losses.objective(apply_fn, loss)
  h = np.asarray(jax.jit(explicit_hessian, static_argnums=(0, 1))(apply_fn, loss, params, batch))
  p = h.shape[0]
  v0 = jax.tree_util.tree_map(jnp.ones_like, params)

  @jax.jit
  def run(params, batch, key):
    mv = curvax.curvature.hessian_matvec(loss_fn, params, batch)
    full = krylov.lanczos(mv, v0, p + 5)  # clipped to p: the whole spectrum
    top = krylov.top_eigenvalues(mv, params, key, k=2, num_iterations=25)
    return full, top

  full, top = run(params, batch, jax.random.PRNGKey(0))
  lam = np.linalg.eigh(h)[0][::-1]
  assert full.ritz_values.shape == (p,)
  np.testing.assert_allclose(full.ritz_values, lam, atol=1e-8 * abs(lam).max())
  vec = _rows(full.ritz_vectors)
  top_vecs = vec[:2]
  np.testing.assert_allclose(top_vecs @ h, full.ritz_values[:2, None] * top_vecs, atol=1e-7)
  np.testing.assert_allclose(top, lam[:2], rtol=1e-6)


def test_top_eigenpairs_cold_and_warm_starts_match_eigh():
  """top_eigenpairs: the top two eigenvalues and eigenvectors of the explicit
  Hessian from a Gaussian start, from a zero warm start (= cold), and from a
  warm start at the exact top eigenvector; mismatched warm starts are refused."""
  apply_fn, loss, params, batch = problem("mlp", "softmax_cross_entropy")
  loss_fn = curvax.losses.objective(apply_fn, loss)
  h = np.asarray(jax.jit(explicit_hessian, static_argnums=(0, 1))(apply_fn, loss, params, batch))
  lam, vec = np.linalg.eigh(h)
  _, unravel = jax.flatten_util.ravel_pytree(params)
  key = jax.random.PRNGKey(2)

  @jax.jit
  def run(params, batch, warm):
    mv = curvax.curvature.hessian_matvec(loss_fn, params, batch)
    return krylov.top_eigenpairs(mv, params, key, k=2, num_iterations=30, warm_start=warm)

  cold = run(params, batch, None)
  for warm in [None, jax.tree_util.tree_map(jnp.zeros_like, params), unravel(vec[:, -1])]:
    values, vectors = run(params, batch, warm)
    np.testing.assert_allclose(values, lam[::-1][:2], rtol=1e-6)
    x = _rows(vectors)
    np.testing.assert_allclose(np.abs(np.sum(x * vec[:, ::-1][:, :2].T, axis=1)), 1.0,
                               atol=1e-6)
  np.testing.assert_allclose(run(params, batch, jax.tree_util.tree_map(
      jnp.zeros_like, params))[0], cold[0], rtol=1e-12)
  mv = curvax.curvature.hessian_matvec(loss_fn, params, batch)
  with pytest.raises(ValueError, match="warm_start"):
    krylov.top_eigenpairs(mv, params, key, warm_start={"w": jnp.zeros(3)})


@pytest.mark.parametrize("k", [1, 2])
def test_lanczos_with_a_tolerance_stops_on_the_residual_bound(k):
  apply_fn, loss, params, batch = problem("mlp", "softmax_cross_entropy")
  loss_fn = curvax.losses.objective(apply_fn, loss)
  h = np.asarray(jax.jit(explicit_hessian, static_argnums=(0, 1))(apply_fn, loss, params, batch))
  p = h.shape[0]
  lam = np.linalg.eigh(h)[0][::-1]
  v0 = jax.tree_util.tree_map(lambda a: jnp.cos(jnp.arange(a.size).reshape(a.shape)), params)
  rtol = 1e-4

  @jax.jit
  def run(params, batch):
    mv = curvax.curvature.hessian_matvec(loss_fn, params, batch)
    return (krylov.lanczos(mv, v0, p, rtol=rtol, num_converged=k),
            krylov.top_eigenvalues(mv, params, jax.random.PRNGKey(1), k=k, num_iterations=p,
                                  rtol=rtol))

  res, top = run(params, batch)
  j = int(res.iterations)
  assert k <= j < p                                   # stopped early
  assert np.all(np.isnan(res.ritz_values[j:])) and np.all(np.isfinite(res.ritz_values[:j]))
  x = _rows(res.ritz_vectors)[:k]
  theta = np.asarray(res.ritz_values[:k])
  residual = np.linalg.norm(x @ h - theta[:, None] * x, axis=1)
  assert np.all(residual <= rtol * np.abs(theta) * (1 + 1e-6))  # the bound it stopped on
  np.testing.assert_allclose(theta, lam[:k], rtol=1e-3)
  np.testing.assert_allclose(top, lam[:k], rtol=1e-3)
  # One step fewer would not have met the bound (the stop is the first one).
  t = np.diag(res.alphas[:j - 1]) + np.diag(res.betas[:j - 2], 1) + np.diag(res.betas[:j - 2], -1)
  ev, y = np.linalg.eigh(t)
  assert np.any(res.betas[j - 2] * np.abs(y[-1, -k:]) > rtol * np.abs(ev[-k:])) or j - 1 < k


def test_lanczos_with_a_tolerance_on_negative_definite_and_invariant_spaces():
  # All eigenvalues negative: the padded tridiagonal must not report a spurious top.
  d = -jnp.concatenate([jnp.array([1.0]), jnp.linspace(50.0, 80.0, 29)])
  res = krylov.lanczos(lambda v: d * v, jnp.ones(30), 30, rtol=1e-6)
  assert int(res.iterations) < 30
  np.testing.assert_allclose(res.ritz_values[0], -1.0, rtol=1e-6)
  assert np.all(np.asarray(res.ritz_values[1:int(res.iterations)]) < -49.0)
  # A 2-dimensional invariant start space: stops after 2 products, the rest NaN.
  d2 = jnp.array([3.0, 2.0, 2.0, 1.0, 0.5])
  res = krylov.lanczos(lambda v: d2 * v, jnp.array([1.0, 1.0, 0, 0, 0]), 5, rtol=1e-3)
  assert int(res.iterations) == 2
  np.testing.assert_allclose(res.ritz_values[:2], [3.0, 2.0], rtol=1e-12)
  assert np.all(np.isnan(res.ritz_values[2:]))
  with pytest.raises(ValueError, match="num_converged"):
    krylov.lanczos(lambda v: v, jnp.ones(3), 2, rtol=1e-3, num_converged=3)
  with pytest.raises(ValueError, match="rtol"):
    krylov.lanczos(lambda v: v, jnp.ones(3), 2, rtol=-1.0)


def test_lanczos_invariant_subspace_and_errors():
  d = jnp.array([3.0, 2.0, 2.0, 1.0, 0.5])
  # Start in a 2-dimensional invariant subspace: breakdown after two steps.
  res = krylov.lanczos(lambda v: d * v, jnp.array([1.0, 1.0, 0, 0, 0]), 4)
  assert int(res.iterations) == 2
  np.testing.assert_allclose(res.ritz_values[:2], [3.0, 2.0], rtol=1e-12)
  assert np.all(np.isnan(res.ritz_values[2:]))
  assert np.all(_rows(res.ritz_vectors)[2:] == 0)
  with pytest.raises(ValueError, match="num_iterations"):
    krylov.lanczos(lambda v: v, d, 0)
  with pytest.raises(ValueError, match="matvec"):
    krylov.lanczos(lambda v: v[:2], d, 2)


@pytest.mark.parametrize("dtype", [jnp.float32, jnp.float64])
def test_lanczos_without_a_tolerance_reports_no_spurious_ritz_values_after_a_breakdown(dtype):
  """Diagonal matrices with 2 and 3 distinct eigenvalues: the Krylov space is
  invariant after 2 and 3 steps. The Ritz values are the distinct eigenvalues
  (eigvalsh), then NaN, rather than zeros from a zero-padded tridiagonal matrix
  (which came out on top for the negative definite one)."""
  rtol = 1e-5 if dtype == jnp.float32 else 1e-12
  neg = -jnp.array([1.0, 1.0, 1.0, 2.0, 2.0, 2.0], dtype)
  top = krylov.top_eigenvalues(lambda v: neg * v, jnp.zeros(6, dtype), jax.random.PRNGKey(0),
                              1, 5)
  np.testing.assert_allclose(top, np.linalg.eigvalsh(np.diag(neg))[-1:], rtol=rtol)
  res = krylov.lanczos(lambda v: neg * v, jnp.ones(6, dtype), 5)
  assert int(res.iterations) == 2
  np.testing.assert_allclose(res.ritz_values[:2], [-1.0, -2.0], rtol=rtol)

  spd = jnp.array([1.0, 1.0, 1.0, 2.0, 2.0, 3.0], dtype)
  res = krylov.lanczos(lambda v: spd * v, jnp.ones(6, dtype) + 0.01 * jnp.arange(6, dtype=dtype), 5)
  assert int(res.iterations) == 3
  np.testing.assert_allclose(res.ritz_values[:3],
                             np.unique(np.linalg.eigvalsh(np.diag(spd)))[::-1], rtol=rtol)
  assert np.all(np.isnan(res.ritz_values[3:]))
  x = _rows(res.ritz_vectors)
  np.testing.assert_allclose(x[:3] * np.asarray(spd), res.ritz_values[:3, None] * x[:3],
                             atol=10 * rtol)
  assert np.all(x[3:] == 0)


def test_vivit_masks_a_zero_ggn_and_honours_an_explicit_threshold():
  """A GGN that is exactly zero (inputs zero, no bias: J = 0) has threshold 0
  and no valid eigenpair: eigenvalues, eigenvectors and per-example curvatures
  are 0, not NaN from 1/sqrt(0). An explicit ``threshold`` masks exactly the
  eigenvalues at or below it: linear model, MSE, G = (x'x / N) kron I_2, whose
  eigenvalues are those of x x' / N, each twice."""
  apply_fn = lambda p, x: x @ p["w"]  # noqa: E731
  loss = LOSSES["mean_squared_error"]
  params = {"w": jnp.ones((3, 2))}
  run = jax.jit(lambda b, t: eigen.ggn_eigenpairs(apply_fn, loss, params, b, 6, threshold=t))
  zero = (jnp.zeros((4, 3)), jnp.ones((4, 2)))
  res = jax.jit(lambda b: eigen.ggn_eigenpairs(apply_fn, loss, params, b, 6))(zero)
  assert not np.any(res.valid)
  for a in (res.eigenvalues, _rows(res.eigenvectors), res.per_example_curvatures):
    np.testing.assert_array_equal(a, 0.0)

  x = jax.random.normal(jax.random.PRNGKey(0), (4, 3))
  batch = (x, jnp.zeros((4, 2)))
  lam = np.repeat(np.linalg.eigvalsh(np.asarray(x @ x.T) / 4)[::-1][:3], 2)
  res = run(batch, 0.5 * (lam[1] + lam[2]))
  np.testing.assert_array_equal(res.valid, [True, True, False, False, False, False])
  np.testing.assert_allclose(res.eigenvalues[:2], lam[:2], rtol=1e-10)
  np.testing.assert_array_equal(res.eigenvalues[2:], 0.0)
  assert np.all(_rows(res.eigenvectors)[2:] == 0)
  # A negative threshold keeps every (positive) eigenvalue.
  res = run(batch, -1.0)
  assert np.all(res.valid)
  np.testing.assert_allclose(res.eigenvalues, lam, rtol=1e-10)
  with pytest.raises(ValueError, match="num_eigenpairs"):
    jax.jit(lambda b: eigen.ggn_eigenpairs(apply_fn, loss, params, b, 0))(batch)


def test_ggn_factor_monte_carlo_defaults_to_one_column_and_needs_a_key():
  """With a key and no ``num_samples`` the Monte-Carlo factor has one column per
  example (``(N, 1)`` leading axes; the exact softmax factor has C - 1 = 2);
  ``num_samples`` without a key is refused."""
  apply_fn, loss, params, batch = problem("mlp", "softmax_cross_entropy", n=3)
  key = jax.random.PRNGKey(0)
  for kwargs, k in [(dict(key=key), 1), (dict(key=key, num_samples=3), 3), ({}, 2)]:
    v = jax.eval_shape(lambda p, b, kw=kwargs: eigen.ggn_factor(apply_fn, loss, p, b,
                                                                chunk_size=None, **kw),
                       params, batch)
    for leaf, p in zip(jax.tree_util.tree_leaves(v), jax.tree_util.tree_leaves(params)):
      assert leaf.shape == (3, k) + p.shape
  with pytest.raises(ValueError, match="num_samples"):
    jax.eval_shape(lambda p, b: eigen.ggn_factor(apply_fn, loss, p, b, num_samples=2),
                   params, batch)
  with pytest.raises(ValueError, match="num_samples"):
    jax.eval_shape(lambda p, b: eigen.ggn_eigenpairs(apply_fn, loss, p, b, 2, num_samples=2),
                   params, batch)


def test_lanczos_with_an_unreachable_tolerance_takes_all_steps_and_checks_atol():
  """rtol = atol = 0 on a diagonal matrix with distinct eigenvalues and a dense
  start (no breakdown before ``dim``): exactly ``num_iterations`` steps, and the
  Ritz values of 4 steps are those of the explicit Krylov tridiagonal matrix."""
  d = jnp.linspace(1.0, 2.0, 10) ** 2
  v0 = jnp.ones(10) + 0.1 * jnp.arange(10.0)
  res = krylov.lanczos(lambda v: d * v, v0, 4, rtol=0.0)
  assert int(res.iterations) == 4
  assert np.all(np.isfinite(res.ritz_values))
  # Reference: orthonormal Krylov basis by QR, projected matrix Q' A Q.
  k = np.stack([np.asarray(d) ** i * np.asarray(v0) for i in range(4)], axis=1)
  q = np.linalg.qr(k)[0]
  np.testing.assert_allclose(res.ritz_values,
                             np.linalg.eigvalsh(q.T @ np.diag(np.asarray(d)) @ q)[::-1],
                             rtol=1e-9)
  with pytest.raises(ValueError, match="atol"):
    krylov.lanczos(lambda v: v, jnp.ones(3), 2, rtol=1e-3, atol=-1.0)


@pytest.mark.parametrize("dtype", [jnp.float32, jnp.float64])
def test_vivit_default_threshold_masks_the_null_space_of_repeated_examples(dtype):
  """4 distinct examples repeated 4 times (linear model, MSE: N K = 48 Gram
  columns of rank 12): the 36 null eigenvalues come out as round-off of either
  sign, up to a few ``eps lam_max``; the default threshold (``max(NK, sqrt D)
  eps lam_max``) masks all of them and keeps the 12 true ones, which match the
  float64 eigenvalues of the distinct examples' GGN."""
  n, reps, d_in, c = 4, 4, 50, 3
  x0 = jax.random.normal(jax.random.PRNGKey(0), (n, d_in))
  apply_fn = lambda p, xx: xx @ p["w"]  # noqa: E731
  loss = LOSSES["mean_squared_error"]
  x = jnp.tile(x0, (reps, 1)).astype(dtype)
  params = {"w": jnp.zeros((d_in, c), dtype)}
  res = jax.jit(lambda p, b: eigen.ggn_eigenpairs(apply_fn, loss, p, b, n * reps * c,
                                                   chunk_size=None))(
      params, (x, jnp.zeros((n * reps, c), dtype)))
  np.testing.assert_array_equal(res.valid, np.arange(n * reps * c) < n * c)
  # Reference: G = (x0'x0 / n) kron I_C (the repeats leave the batch mean unchanged).
  xx = np.asarray(x0, np.float64)
  lam_ref = np.sort(np.repeat(np.linalg.eigvalsh(xx @ xx.T / n), c))[::-1]
  rtol = 1e-4 if dtype == jnp.float32 else 1e-10
  np.testing.assert_allclose(res.eigenvalues[:n * c], lam_ref, rtol=rtol)
  np.testing.assert_array_equal(res.eigenvalues[n * c:], 0.0)


def _krylov_ritz_values(d, v0, j):
  """Eigenvalues (descending) of Q' diag(d) Q, Q an orthonormal basis of the
  Krylov space span{v0, A v0, ..., A^(j-1) v0} (QR of the explicit powers)."""
  d, v0 = np.asarray(d, np.float64), np.asarray(v0, np.float64)
  k = np.stack([(d / np.abs(d).max()) ** i * v0 for i in range(j)], axis=1)
  q = np.linalg.qr(k)[0]
  return np.linalg.eigvalsh(q.T @ (d[:, None] * q))[::-1]


def test_lanczos_early_stop_ritz_values_are_those_of_the_krylov_space():
  """With a tolerance, Lanczos stops after j < m steps while beta_j != 0: the
  Ritz values are the eigenvalues of the leading j x j tridiagonal block, i.e.
  of A projected on the j-dimensional Krylov space, uncoupled from the padding."""
  d = jnp.concatenate([jnp.array([10.0, 6.0]), jnp.linspace(1.0, 2.0, 18)])
  v0 = jnp.ones(20) + 0.05 * jnp.arange(20.0)
  res = krylov.lanczos(lambda v: d * v, v0, 20, rtol=1e-4, num_converged=2)
  j = int(res.iterations)
  assert 2 <= j < 20 and res.betas[j - 1] > 1e-3
  np.testing.assert_allclose(res.ritz_values[:j], _krylov_ritz_values(d, v0, j), rtol=1e-9)
  np.testing.assert_allclose(res.ritz_values[:2], [10.0, 6.0], rtol=1e-4)


@pytest.mark.parametrize("sign", [1.0, -1.0])
def test_lanczos_breakdown_ritz_values_far_below_the_diagonal(sign):
  """A 2-dimensional invariant Krylov space whose Ritz values lie far from the
  tridiagonal diagonal: d = ±(0, 10, 4, 4, 4) from (1, 1, 0, 0, 0) gives
  alpha = ±5, beta = 5 and Ritz values ±10 and 0. The padding of the 2 x 2 block
  must sit below both (Gershgorin), else it would show up as a spurious value."""
  d = sign * jnp.array([0.0, 10.0, 4.0, 4.0, 4.0])
  v0 = jnp.array([1.0, 1.0, 0.0, 0.0, 0.0])
  for kwargs in ({}, dict(rtol=1e-8)):
    res = krylov.lanczos(lambda v: d * v, v0, 5, **kwargs)
    assert int(res.iterations) == 2
    np.testing.assert_allclose(res.ritz_values[:2], np.sort([0.0, 10.0 * sign])[::-1],
                               atol=1e-12)
    assert np.all(np.isnan(res.ritz_values[2:]))


def test_lanczos_does_not_stop_before_num_converged_steps():
  """A start vector within 1e-7 of the top eigenvector converges the top Ritz
  pair after one step; with ``num_converged=2`` Lanczos must go on until the
  second pair has converged too."""
  d = jnp.linspace(1.0, 2.0, 10) ** 2
  v0 = jnp.zeros(10).at[-1].set(1.0) + 1e-7 * jnp.cos(jnp.arange(10.0))
  res = krylov.lanczos(lambda v: d * v, v0, 10, rtol=1e-3, num_converged=2)
  assert int(res.iterations) >= 2
  np.testing.assert_allclose(res.ritz_values[0], d[-1], rtol=1e-10)
  np.testing.assert_allclose(res.ritz_values[1], d[-2], rtol=1e-2)


def test_lanczos_with_a_tolerance_stops_at_a_breakdown_before_num_converged_steps():
  """An invariant 2-dimensional start space with ``num_converged=3``: the loop
  must stop at the breakdown (2 steps), not multiply the zero vector on and
  report a spurious 0 Ritz value, which tops a negative definite matrix."""
  d = -jnp.array([3.0, 2.0, 2.0, 1.0, 0.5])
  res = krylov.lanczos(lambda v: d * v, jnp.array([1.0, 1.0, 0, 0, 0]), 5, rtol=1e-3,
                      num_converged=3)
  assert int(res.iterations) == 2
  np.testing.assert_allclose(res.ritz_values[:2], [-2.0, -3.0], rtol=1e-12)
  assert np.all(np.isnan(res.ritz_values[2:]))
  neg = -jnp.array([1.0, 1.0, 1.0, 2.0, 2.0, 2.0])
  top = krylov.top_eigenvalues(lambda v: neg * v, jnp.zeros(6), jax.random.PRNGKey(0), 3, 5,
                              rtol=1e-6)
  np.testing.assert_allclose(top[:2], [-1.0, -2.0], rtol=1e-10)
  assert np.isnan(top[2])


@pytest.mark.parametrize("dtype", [jnp.bfloat16, jnp.float16])
@pytest.mark.parametrize("rtol", [None, 1e-2])
def test_lanczos_and_vivit_in_half_precision(dtype, rtol):
  # eigh has no half-precision kernels: the small eigenproblems run in float32,
  # and the results come back in the parameters' dtype, close to float64's.
  rng = np.random.default_rng(0)
  q, _ = np.linalg.qr(rng.normal(size=(6, 6)))
  lam = np.array([8.0, 4.0, 2.0, 1.0, 0.5, 0.25])
  a = (q * lam) @ q.T
  mv = lambda v: {"w": (jnp.asarray(a, jnp.float32) @ v["w"].astype(jnp.float32)).astype(dtype)}
  out = jax.jit(lambda v: krylov.lanczos(mv, v, 6, rtol=rtol))({"w": jnp.ones(6, dtype)})
  assert out.ritz_values.dtype == dtype and out.ritz_vectors["w"].dtype == dtype
  np.testing.assert_allclose(np.asarray(out.ritz_values[0], np.float64), 8.0, rtol=2e-2)
  apply_fn, loss, params, batch = problem("mlp", "softmax_cross_entropy")
  low = jax.tree.map(lambda x: x.astype(dtype), params)
  lam_low = jax.jit(lambda p: eigen.ggn_eigenpairs(
      apply_fn, loss, p, jax.tree.map(lambda x: x.astype(dtype) if x.dtype.kind == "f" else x,
                                      batch), num_eigenpairs=2).eigenvalues)(low)
  want = np.linalg.eigvalsh(np.asarray(explicit_ggn(apply_fn, loss, params, batch)))[::-1][:2]
  assert lam_low.dtype == dtype
  np.testing.assert_allclose(np.asarray(lam_low, np.float64), want, rtol=5e-2)


def test_vivit_reports_nan_for_a_nonfinite_factor():
  # A NaN loss (here: inf inputs) must read as NaN eigenvalues, as diag_ggn and
  # top_eigenvalues report it, not as masked zeros (flat curvature).
  apply_fn, loss, params, batch = problem("mlp", "softmax_cross_entropy", n=5)
  bad = (batch[0].at[0, 0].set(jnp.inf), batch[1])
  res = eigen.ggn_eigenpairs(apply_fn, loss, params, bad, 3)
  assert np.all(np.isnan(res.eigenvalues)) and not np.any(res.valid)
  assert all(np.all(np.asarray(v) == 0) for v in jax.tree.leaves(res.eigenvectors))
  ok = eigen.ggn_eigenpairs(apply_fn, loss, params, batch, 3)
  assert np.all(np.isfinite(ok.eigenvalues)) and np.all(ok.valid)
