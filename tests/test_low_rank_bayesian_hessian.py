"""Tests of curvax.solvers.bayesian_hessian against dense numpy references."""

from __future__ import annotations

import jax
import numpy as np
import pytest

from curvax.solvers import bayesian_hessian as bh


@pytest.fixture(autouse=True, params=["matmul", "one-pass"])
def _small_products(request, monkeypatch):
  """Every test both ways of forming the small Gram products: matrix products
  (short rows) and the single pass over the rows (long rows, forced here)."""
  if request.param == "one-pass":
    monkeypatch.setattr(bh, "_ROW_DOTS_MIN_SIZE", 0)


def _setup(n=9, m_buf=4, m=3, seed=0, lam=0.3):
  rng = np.random.default_rng(seed)
  s = np.zeros((m_buf, n))
  d = np.zeros((m_buf, n))
  raw = rng.normal(size=(m, n))
  s[:m] = raw / np.linalg.norm(raw, axis=1, keepdims=True)
  d[:m] = rng.normal(size=(m, n))
  # Stale garbage beyond m must be ignored only if rows are zero; keep zero here.
  return s, d, 0.7, 1.3, lam, m


def _dense_b(s, d, alpha, w, lam, m):
  """Dense posterior mean (B1-B3) from the observed rows, independently."""
  n = s.shape[1]
  S = s[:m].T                                          # n x m (spec layout)
  Delta = d[:m].T
  G = w ** 2 * S.T @ S + lam ** 2 * np.diag(np.diag(S.T @ S))
  X = Delta @ np.linalg.inv(G)
  return np.eye(n) / alpha + w ** 2 * X @ S.T


@pytest.mark.parametrize("m", [1, 3, 4])
def test_inverse_matvec_matches_dense_inverse(m):
  s, d, alpha, w, lam, _ = _setup(m=m)
  c = bh.posterior_coefficients(s, w, lam, m)
  b = _dense_b(s, d, alpha, w, lam, m)
  g = np.random.default_rng(1).normal(size=s.shape[1])
  np.testing.assert_allclose(bh.posterior_matvec(g, s, d, c, alpha, w), b @ g, rtol=1e-10)
  np.testing.assert_allclose(bh.posterior_inverse_matvec(g, s, d, c, alpha, w),
                             np.linalg.solve(b, g), rtol=1e-9, atol=1e-12)


def test_noise_free_posterior_interpolates_observations():
  s, d, alpha, w, _, m = _setup(lam=0.0)
  c = bh.posterior_coefficients(s, w, 0.0, m)
  b = _dense_b(s, d, alpha, w, 0.0, m)
  y = d[:m] + s[:m] / alpha                            # (B2): Y = Delta + B0 S
  for j in range(m):
    np.testing.assert_allclose(bh.posterior_matvec(s[j], s, d, c, alpha, w), y[j],
                               rtol=1e-9, atol=1e-12)
    np.testing.assert_allclose(b @ s[j], y[j], rtol=1e-9, atol=1e-12)


def test_masking_ignores_rows_beyond_num_observed():
  s, d, alpha, w, lam, _ = _setup(m=4, m_buf=4)
  g = np.random.default_rng(2).normal(size=s.shape[1])
  s2, d2 = s.copy(), d.copy()
  s2[3] = 0.0
  d2[3] = 0.0
  c = bh.posterior_coefficients(s, w, lam, 3)
  c2 = bh.posterior_coefficients(s2, w, lam, 3)
  np.testing.assert_allclose(c, c2)
  # Residual rows beyond m must be zero for the masked formula; zero them.
  d[3] = 0.0
  np.testing.assert_allclose(bh.posterior_inverse_matvec(g, s, d, c, alpha, w),
                             bh.posterior_inverse_matvec(g, s2, d2, c2, alpha, w))


@pytest.mark.parametrize("n,rank,alpha", [(9, 2, None), (9, 3, None), (3, 2, None),
                                          (3, 3, None), (2, 2, None), (3, 2, 0.5)])
def test_low_rank_factors_are_top_singular_pairs(n, rank, alpha):
  # n < 2M (fewer parameters than two per observation, e.g. a bias): the span
  # of [X S] is all of R^n. The cases (3, 3) and (3, 2, alpha=0.5) put 1/alpha
  # above a true singular value of B, which a prior slot would displace.
  s, d, alpha_, w, lam, m = _setup(n=n, m=3)
  alpha = alpha_ if alpha is None else alpha
  c = bh.posterior_coefficients(s, w, lam, m)
  u, sigma = bh.low_rank_factors(s, d, c, alpha, w, rank)
  b = _dense_b(s, d, alpha, w, lam, m)
  uu, ss, _ = np.linalg.svd(b)
  k = min(rank, n)
  assert u.shape == (k, n) and sigma.shape == (k,)
  np.testing.assert_allclose(sigma, ss[:k], rtol=1e-9)
  np.testing.assert_allclose(u @ u.T, np.eye(k), atol=1e-10)
  np.testing.assert_allclose(u.T @ u, uu[:, :k] @ uu[:, :k].T, atol=1e-8)


@pytest.mark.parametrize("alpha", [0.7, 0.1])
def test_low_rank_factors_with_one_direction_outside_the_span(alpha):
  """n = 7 with 3 of 4 rows observed: [X S] has rank 6 and two empty slots, but
  only one direction of R^7 lies outside its span, where B = 1/alpha (with
  alpha = 0.1 the largest singular value). All 7 singular values of B come out,
  1/alpha exactly once; its row of U is zero (that direction stays
  unpreconditioned, where the prior is exact), the others are orthonormal, and
  the inverse-form step is the dense rank-7 estimate's inverse."""
  n = 7
  s, d, _, w, lam, m = _setup(n=n, m=3)
  c = bh.posterior_coefficients(s, w, lam, m)
  u, sigma = bh.low_rank_factors(s, d, c, alpha, w, n)
  b = _dense_b(s, d, alpha, w, lam, m)
  uu, ss, _ = np.linalg.svd(b)
  assert u.shape == (n, n)
  np.testing.assert_allclose(sigma, ss, rtol=1e-9)
  assert np.sum(np.isclose(ss, 1.0 / alpha, rtol=1e-9)) == 1
  norms = np.linalg.norm(u, axis=1)
  zero = norms < 1e-12
  assert np.sum(zero) == 1
  np.testing.assert_allclose(sigma[zero], 1.0 / alpha, rtol=1e-9)
  nz = np.asarray(u)[~zero]
  np.testing.assert_allclose(nz @ nz.T, np.eye(n - 1), atol=1e-10)
  g = np.random.default_rng(6).normal(size=n)
  got = bh.low_rank_precondition(g, u, bh.preconditioner_scales(sigma, alpha, "inverse"))
  est = uu @ np.diag(ss) @ uu.T
  np.testing.assert_allclose(alpha * got, np.linalg.solve(est, g), rtol=1e-8, atol=1e-12)


def test_low_rank_factors_float32_and_nearly_dependent_observations():
  """Float32 (the Gram-matrix route loses half the digits of a QR) on a larger
  block, with one direction almost repeating another: the top pairs still match
  the float64 dense reference to float32-level accuracy, the rows are orthonormal."""
  import jax.numpy as jnp  # noqa: PLC0415
  s, d, alpha, w, lam, m = _setup(n=200, m_buf=5, m=5, seed=4)
  s[4] = s[3] + 1e-3 * s[0]
  s[4] /= np.linalg.norm(s[4])
  c = bh.posterior_coefficients(s, w, lam, m)
  u64, sig64 = bh.low_rank_factors(s, d, c, alpha, w, 3)
  f32 = lambda x: jnp.asarray(x, jnp.float32)
  c32 = bh.posterior_coefficients(f32(s), f32(w), f32(lam), m)
  u32, sig32 = bh.low_rank_factors(f32(s), f32(d), c32, f32(alpha), f32(w), 3)
  _, ss, _ = np.linalg.svd(_dense_b(s, d, alpha, w, lam, m))
  np.testing.assert_allclose(sig64, ss[:3], rtol=1e-9)
  np.testing.assert_allclose(sig32, ss[:3], rtol=2e-3)
  np.testing.assert_allclose(np.asarray(u32) @ np.asarray(u32).T, np.eye(3), atol=1e-5)
  # Same top-3 subspace as float64 (projector difference).
  p64 = np.asarray(u64).T @ np.asarray(u64)
  p32 = np.asarray(u32, np.float64).T @ np.asarray(u32, np.float64)
  assert np.linalg.norm(p64 - p32, 2) < 1e-2


@pytest.mark.parametrize("form", ["inverse", "seed"])
def test_preconditioner_closed_form(form):
  s, d, alpha, w, lam, m = _setup()
  c = bh.posterior_coefficients(s, w, lam, m)
  u, sigma = bh.low_rank_factors(s, d, c, alpha, w, 2)
  g = np.random.default_rng(3).normal(size=s.shape[1])
  got = bh.low_rank_precondition(g, u, bh.preconditioner_scales(sigma, alpha, form))
  b = _dense_b(s, d, alpha, w, lam, m)
  uu, ss, _ = np.linalg.svd(b)
  U, sg = uu[:, :2], ss[:2]
  scale = 1.0 / (alpha * sg) if form == "inverse" else sg ** -0.5
  want = g - U @ (U.T @ g) + U @ (scale * (U.T @ g))
  np.testing.assert_allclose(got, want, rtol=1e-9, atol=1e-12)
  if form == "inverse":
    # alpha * g~ = [alpha (I - UU') + U diag(1/sigma) U'] g: the inverse of the rank-k
    # estimate alpha^{-1} (I - UU') + U diag(sigma) U' applied to g.
    est = (np.eye(len(g)) - U @ U.T) / alpha + U @ np.diag(sg) @ U.T
    np.testing.assert_allclose(alpha * got, np.linalg.solve(est, g), rtol=1e-8)
  # The same step from precomputed coefficients (c - 1) * U'g, rows given apart.
  scales = bh.preconditioner_scales(sigma, alpha, form)
  coef = bh.low_rank_coefficients(g, tuple(u), scales)
  np.testing.assert_allclose(coef, (scale - 1.0) * np.abs(U.T @ g) * np.sign(u @ g),
                             rtol=1e-9)
  np.testing.assert_allclose(bh.low_rank_precondition(g, tuple(u), coefficients=coef), want,
                             rtol=1e-9, atol=1e-12)
  with pytest.raises(TypeError, match="exactly one"):
    bh.low_rank_precondition(g, u)
  with pytest.raises(TypeError, match="exactly one"):
    bh.low_rank_precondition(g, u, scales, coefficients=coef)


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
def test_low_rank_coefficients_are_non_finite_exactly_when_the_gradient_is(dtype):
  """Even through rows that are zero where g is not finite (inf * 0 = NaN)."""
  n = 1000
  rows = np.zeros((2, n), dtype)
  rows[0, :500] = 1 / np.sqrt(500)
  rows[1, 500:-1] = 1 / np.sqrt(499)            # both rows are zero at the last entry
  g = np.random.default_rng(0).normal(size=n).astype(dtype)
  coef = jax.jit(bh.low_rank_coefficients)(g, tuple(rows), np.asarray([0.5, 2.0], dtype))
  assert np.all(np.isfinite(coef))
  for where in (0, 700, n - 1):
    for bad in (np.nan, np.inf, -np.inf):
      bad_g = g.copy()
      bad_g[where] = bad
      coef = jax.jit(bh.low_rank_coefficients)(bad_g, tuple(rows),
                                                np.asarray([0.5, 2.0], dtype))
      assert not np.any(np.isfinite(coef)), (where, bad)


def test_preconditioner_scales_degenerate_and_bad_form():
  c = bh.preconditioner_scales(np.array([2.0, 0.0, np.nan]), 0.5, "inverse")
  np.testing.assert_allclose(c, [1.0, 1.0, 1.0])
  # Negative or infinite sigma is degenerate too (no negative or zero scale).
  for form in ("inverse", "seed"):
    c = bh.preconditioner_scales(np.array([-2.0, np.inf, -np.inf, 0.25]), 0.5, form)
    np.testing.assert_allclose(c, [1.0, 1.0, 1.0, 8.0 if form == "inverse" else 2.0])
  np.testing.assert_allclose(bh.preconditioner_scales(np.array([4.0]), 0.5, "seed"), [0.5])
  with pytest.raises(ValueError, match="form"):
    bh.preconditioner_scales(np.array([1.0]), 1.0, "bogus")


@pytest.mark.parametrize("row_dots", [True, False], ids=["one-pass", "matmul"])
@pytest.mark.parametrize("n", [1, 30, 1009, 4096])
def test_block_products_match_numpy(n, row_dots, monkeypatch):
  """The small Gram products against numpy, both ways of computing them (one
  pass over rows split into 16, 15 or 1 parts, or matrix products), float64
  and float32, with an empty row, a single-row block and a symmetric block."""
  monkeypatch.setattr(bh, "_ROW_DOTS_MIN_SIZE", 0 if row_dots else 10 ** 9)
  rng = np.random.default_rng(n)
  a, b, v = rng.normal(size=(3, n)), rng.normal(size=(2, n)), rng.normal(size=(1, n))
  a[1] = 0.0
  aa, ab, av, bb = bh._products([a, b, v], [(0, 0), (0, 1), (0, 2), (1, 1)])
  for got, want in ((aa, a @ a.T), (ab, a @ b.T), (av, a @ v.T), (bb, b @ b.T)):
    np.testing.assert_allclose(got, want, rtol=1e-12, atol=1e-12)
  got32 = jax.jit(lambda x: bh._products([x], [(0, 0)])[0])(a.astype(np.float32))
  assert got32.dtype == np.float32
  np.testing.assert_allclose(got32, a @ a.T, rtol=1e-5, atol=1e-4 * np.sqrt(n))
  assert bh._row_dots(list(a), []).shape == (0,)
  empty, = bh._products([a[:0]], [(0, 0)])
  assert empty.shape == (0, 0)


def test_observation_mask_and_empty_rows():
  """A zero row is no observation, wherever it sits and whether or not
  num_observed is given: the posterior equals the dense one of the non-zero
  rows alone."""
  s, d, alpha, w, lam, _ = _setup(n=9, m_buf=4, m=4)
  s[1] = 0.0                                           # an empty observation inside
  d[1] = 0.0
  np.testing.assert_array_equal(bh.observation_mask(s), [True, False, True, True])
  np.testing.assert_array_equal(bh.observation_mask(s, 3), [True, False, True, False])
  np.testing.assert_array_equal(bh.observation_mask(s, 0), [False] * 4)
  keep = [0, 2, 3]
  b = _dense_b(s[keep], d[keep], alpha, w, lam, 3)
  g = np.random.default_rng(5).normal(size=9)
  for num in (None, 4):
    c = bh.posterior_coefficients(s, w, lam, num)
    np.testing.assert_allclose(bh.posterior_matvec(g, s, d, c, alpha, w), b @ g, rtol=1e-10)
    np.testing.assert_allclose(bh.posterior_inverse_matvec(g, s, d, c, alpha, w),
                               np.linalg.solve(b, g), rtol=1e-9, atol=1e-12)


@pytest.mark.parametrize("dependence", [1e-3, 1e-4])
def test_low_rank_rows_are_orthonormal_to_float32_rounding(dependence):
  """The rows built from the Gram matrices lose orthonormality with nearly
  dependent observations (float32: errors ~1e-5); the final symmetric
  re-orthonormalisation brings them back to a few float32 eps."""
  import jax.numpy as jnp  # noqa: PLC0415
  s, d, alpha, w, lam, m = _setup(n=200, m_buf=5, m=5, seed=4)
  s[4] = s[3] + dependence * s[0]
  s[4] /= np.linalg.norm(s[4])
  f32 = lambda x: jnp.asarray(x, jnp.float32)
  c32 = bh.posterior_coefficients(f32(s), f32(w), f32(lam), m)
  u32, _ = bh.low_rank_factors(f32(s), f32(d), c32, f32(alpha), f32(w), 3)
  u = np.asarray(u32, np.float64)
  np.testing.assert_allclose(u @ u.T, np.eye(3), atol=16 * np.finfo(np.float32).eps)


def _primitive_counts(fn, *args):
  """Primitive name -> count in ``fn``'s jaxpr, sub-jaxprs (pjit, custom_jvp) included."""
  counts: dict = {}

  def walk(jaxpr):
    for eqn in jaxpr.eqns:
      counts[eqn.primitive.name] = counts.get(eqn.primitive.name, 0) + 1
      for value in eqn.params.values():
        for v in value if isinstance(value, (tuple, list)) else (value,):
          v = getattr(v, "jaxpr", v)                     # ClosedJaxpr -> Jaxpr
          if hasattr(v, "eqns"):
            walk(v)

  walk(jax.make_jaxpr(fn)(*args).jaxpr)
  return counts


def _blocks():
  """Five blocks: four of float64, one with a single entry (so k = 1), one of
  float32; each with its own alpha, w, lam."""
  out = []
  for seed, (n, dtype) in enumerate([(9, np.float64), (9, np.float64), (7, np.float64),
                                     (1, np.float64), (9, np.float32)]):
    s, d, _, _, _, m = _setup(n=n, seed=seed)
    out.append((s.astype(dtype), d.astype(dtype), 0.5 + 0.2 * seed, 1.0 + 0.3 * seed,
                0.1 + 0.1 * seed))
  return out, m


def test_posterior_inverse_matvec_blocks_match_single_blocks_and_dense():
  blocks, m = _blocks()
  rng = np.random.default_rng(7)
  gs = [rng.normal(size=s.shape[1]).astype(s.dtype) for s, *_ in blocks]
  s_, d_, a_, w_, l_ = zip(*blocks)
  got = jax.jit(bh.posterior_inverse_matvec_blocks)(gs, s_, d_, a_, w_, l_, m)
  for g, (s, d, alpha, w, lam), out in zip(gs, blocks, got):
    single = bh.posterior_inverse_matvec(g, s, d, bh.posterior_coefficients(s, w, lam, m),
                                         alpha, w)
    tol = 1e-5 if s.dtype == np.float32 else 1e-10
    assert out.dtype == single.dtype
    np.testing.assert_allclose(out, single, rtol=tol, atol=tol)
    dense = np.linalg.solve(_dense_b(s.astype(np.float64), d.astype(np.float64), alpha, w,
                                     lam, m), g.astype(np.float64))
    np.testing.assert_allclose(out, dense, rtol=100 * tol, atol=100 * tol)


def test_low_rank_factors_blocks_match_single_blocks_and_dense():
  blocks, m = _blocks()
  s_, d_, a_, w_, l_ = zip(*blocks)
  got = jax.jit(bh.low_rank_factors_blocks, static_argnums=5)(s_, d_, a_, w_, l_, 2, m)
  for (s, d, alpha, w, lam), (u, sigma) in zip(blocks, got):
    u1, sigma1 = bh.low_rank_factors(s, d, bh.posterior_coefficients(s, w, lam, m), alpha, w, 2)
    tol = 1e-4 if s.dtype == np.float32 else 1e-9
    assert u.shape == u1.shape == (min(2, s.shape[1]), s.shape[1]) and u.dtype == u1.dtype
    np.testing.assert_allclose(sigma, sigma1, rtol=tol)
    # Rows up to sign; the projector U'U is sign-free.
    np.testing.assert_allclose(u.T @ u, u1.T @ u1, atol=tol)
    b = _dense_b(s.astype(np.float64), d.astype(np.float64), alpha, w, lam, m)
    top = np.linalg.svd(b, compute_uv=False)[:len(sigma)]
    np.testing.assert_allclose(sigma, top, rtol=100 * tol)


def test_blocks_ignore_stale_rows_beyond_num_observed():
  """The ``*_blocks`` variants mask every Gram block by ``num_observed``: rows
  from there on may hold a previous round's (finite) observations and give the
  results of zero rows, to rounding (the transform leaves them in place)."""
  blocks, m = _blocks()
  rng = np.random.default_rng(8)
  stale = []
  for s, d, alpha, w, lam in blocks:
    s2, d2 = s.copy(), d.copy()
    raw = rng.normal(size=(s.shape[0] - m, s.shape[1]))
    s2[m:] = raw / np.linalg.norm(raw, axis=1, keepdims=True)
    d2[m:] = 3.0 * rng.normal(size=raw.shape)
    stale.append((s2, d2, alpha, w, lam))
  gs = [rng.normal(size=s.shape[1]).astype(s.dtype) for s, *_ in blocks]
  inverse = jax.jit(bh.posterior_inverse_matvec_blocks)
  factors = jax.jit(bh.low_rank_factors_blocks, static_argnums=5)
  for num in (m, 1):
    want_x = inverse(gs, *zip(*[(s[:num].copy(), d[:num].copy(), *rest)
                                for s, d, *rest in blocks]), num)
    want_f = factors(*zip(*[(np.concatenate([s[:num], 0 * s[num:]]),
                             np.concatenate([d[:num], 0 * d[num:]]), *rest)
                            for s, d, *rest in blocks]), 2, num)
    got_x = inverse(gs, *zip(*stale), num)
    got_f = factors(*zip(*stale), 2, num)
    for (s, *_), x, x_want, (u, sigma), (u_want, sigma_want) in zip(
        blocks, got_x, want_x, got_f, want_f):
      tol = 1e-5 if s.dtype == np.float32 else 1e-10
      np.testing.assert_allclose(x, x_want, rtol=tol, atol=tol)
      np.testing.assert_allclose(sigma, sigma_want, rtol=tol)
      np.testing.assert_allclose(u.T @ u, u_want.T @ u_want, atol=tol)


def test_blocks_batch_their_small_linear_algebra():
  """Blocks whose small matrices agree in shape and dtype share one
  inverse/solve/eigh/svd (one per block before): the posterior's M x M algebra
  in two groups (by dtype; the rows' length n does not matter), one solve
  each (C of (B3) folded into the solve of (W1)); the build's in three (k = 1
  for the one-entry block)."""
  blocks, m = _blocks()
  s_, d_, a_, w_, l_ = zip(*blocks)
  gs = [np.ones(s.shape[1], s.dtype) for s in s_]
  post = _primitive_counts(lambda *a: bh.posterior_inverse_matvec_blocks(*a, m),
                           gs, s_, d_, a_, w_, l_)
  build = _primitive_counts(lambda *a: bh.low_rank_factors_blocks(*a, 2, m),
                            s_, d_, a_, w_, l_)
  assert post["lu"] == 2               # (K + a S'Delta') x = S'g, per group
  assert build["lu"] == 3 and build["svd"] == 3 and build["eigh"] == 2 * 3
