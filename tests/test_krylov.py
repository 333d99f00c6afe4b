"""Block Lanczos against numpy's eigh of explicit matrices with repeated eigenvalues."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.flatten_util import ravel_pytree

import curvax
from curvax.curvature import krylov
from reference import explicit_ggn, problem


def _rows(tree):
  return np.asarray(jax.vmap(lambda t: ravel_pytree(t)[0])(tree))


def _matrix(eigenvalues, seed=0):
  """A random orthogonal similarity of diag(eigenvalues) and its matvec on {'a', 'b'} pytrees
  (leaves of shapes (3, 4) and (dim - 12,): the solver works on flattened pytrees)."""
  rng = np.random.default_rng(seed)
  dim = len(eigenvalues)
  u, _ = np.linalg.qr(rng.normal(size=(dim, dim)))
  a = u @ np.diag(eigenvalues) @ u.T
  example = {"a": jnp.zeros((3, 4)), "b": jnp.zeros(dim - 12)}
  _, unravel = ravel_pytree(example)
  mat = jnp.asarray(a)
  matvec = lambda v: unravel(mat @ ravel_pytree(v)[0])
  return a, matvec, unravel


def _start(unravel, dim, b, seed=1):
  return jax.vmap(unravel)(jnp.asarray(np.random.default_rng(seed).normal(size=(b, dim))))


# Eigenvalues 5 (three times), 3 (twice), then 35 distinct ones in (-1, 1).
SPECTRUM = np.concatenate([[5.0] * 3, [3.0] * 2, np.linspace(-0.95, 0.9, 35)])


@pytest.mark.parametrize("b", [3, 4])
def test_block_lanczos_finds_multiple_eigenvalues_with_their_multiplicity(b):
  """Multiplicities up to b come out as often as they occur, with orthonormal
  Ritz vectors, and residual_norms are the true ||A x - theta x||."""
  a, matvec, unravel = _matrix(SPECTRUM)
  dim = a.shape[0]
  run = jax.jit(lambda v0: krylov.block_lanczos(matvec, v0, 8))
  res = run(_start(unravel, dim, b))
  assert res.ritz_values.shape == (8 * b,)
  np.testing.assert_array_equal([res.iterations, res.rank], [8, 8 * b])
  np.testing.assert_allclose(res.ritz_values[:5], SPECTRUM[:5], rtol=1e-7)
  assert res.ritz_values[5] < 1.0
  x = _rows(res.ritz_vectors)
  np.testing.assert_allclose(x @ x.T, np.eye(8 * b), atol=1e-10)
  true_residuals = np.linalg.norm(x @ a - res.ritz_values[:, None] * x, axis=1)
  np.testing.assert_allclose(res.residual_norms, true_residuals, rtol=1e-5, atol=1e-12)
  assert np.all(res.residual_norms[:5] < 1e-3)


def test_block_lanczos_finds_multiplicities_that_lanczos_misses_at_the_same_cost():
  """18 products: 6 block steps of 3 give 5, 5, 5, 3, 3; 18 Lanczos steps from one
  vector give 5 and 3 once each (in floating point, a second copy grows out of
  round-off only later: at 24 steps here)."""
  a, matvec, unravel = _matrix(SPECTRUM)
  block = krylov.block_lanczos(matvec, _start(unravel, a.shape[0], 3), 6)
  np.testing.assert_allclose(block.ritz_values[:5], SPECTRUM[:5], atol=1e-3)
  single = krylov.lanczos(matvec, unravel(_rows(_start(unravel, a.shape[0], 1))[0]), 18)
  np.testing.assert_allclose(single.ritz_values[:2], [5.0, 3.0], atol=1e-3)
  assert single.ritz_values[2] < 1.0


@pytest.mark.parametrize("rtol", [1e-4, 1e-6])
def test_block_lanczos_with_a_tolerance_stops_once_the_top_pairs_converge(rtol):
  """Stops before the step limit, when each of the top `num_converged` residual
  bounds meets atol + rtol |theta|, and those Ritz values are eigenvalues of A
  to within the bound (Parlett Thm. 4.5.1); one step earlier, some bound did not hold."""
  a, matvec, unravel = _matrix(SPECTRUM)
  v0 = _start(unravel, a.shape[0], 3)
  res = krylov.block_lanczos(matvec, v0, 13, rtol=rtol, num_converged=5)
  assert 1 < res.iterations < 13
  theta, residual = np.asarray(res.ritz_values[:5]), np.asarray(res.residual_norms[:5])
  assert np.all(residual <= rtol * np.abs(theta))
  assert np.all(np.abs(theta - SPECTRUM[:5]) <= residual + 1e-12)
  before = krylov.block_lanczos(matvec, v0, int(res.iterations) - 1)
  assert not np.all(np.asarray(before.residual_norms[:5]) <= rtol * np.abs(before.ritz_values[:5]))
  np.testing.assert_allclose(before.ritz_values[:5], krylov.block_lanczos(
      matvec, v0, int(res.iterations) - 1, rtol=0.0).ritz_values[:5], rtol=1e-12)


@pytest.mark.parametrize("rtol", [None, 1e-10])
def test_block_lanczos_on_an_invariant_space_gives_exact_values_and_nan_beyond_its_rank(rtol):
  """diag(2, 2, 1, 1, 1, 0.5) from two vectors: the block Krylov space has
  dimension 5 (2 + 2 + 1: eigenvalue 1 has multiplicity 3 > b); after the
  breakdown no spurious Ritz value appears (NaN, zero vectors)."""
  d = jnp.array([2.0, 2.0, 1.0, 1.0, 1.0, 0.5])
  v0 = jnp.asarray(np.random.default_rng(3).normal(size=(2, 6)))
  # With a tolerance on all five pairs, only the invariant space meets it.
  res = krylov.block_lanczos(lambda v: d * v, v0, 3, rtol=rtol, num_converged=5)
  np.testing.assert_array_equal([res.iterations, res.rank], [3, 5])
  np.testing.assert_allclose(res.ritz_values[:5], [2.0, 2.0, 1.0, 1.0, 0.5], rtol=1e-12)
  assert np.isnan(res.ritz_values[5]) and np.isnan(res.residual_norms[5])
  np.testing.assert_array_equal(res.ritz_vectors[5], 0.0)
  assert np.all(np.asarray(res.residual_norms[:5]) < 1e-12)
  negative = krylov.block_lanczos(lambda v: -d * v, v0, 3, rtol=rtol, num_converged=5)  # all below zero padding
  np.testing.assert_allclose(negative.ritz_values[:5], [-0.5, -1.0, -1.0, -2.0, -2.0], rtol=1e-12)


def test_block_lanczos_drops_dependent_start_vectors():
  """Start rows (x, 2x, y): the second is dropped; the result equals the run from (x, y)
  with one Ritz value less per step."""
  a, matvec, unravel = _matrix(SPECTRUM)
  rows = np.random.default_rng(4).normal(size=(2, a.shape[0]))
  dependent = jax.vmap(unravel)(jnp.asarray(np.stack([rows[0], 2 * rows[0], rows[1]])))
  independent = jax.vmap(unravel)(jnp.asarray(rows))
  res3 = krylov.block_lanczos(matvec, dependent, 1)
  res2 = krylov.block_lanczos(matvec, independent, 1)
  assert int(res3.rank) == 2
  np.testing.assert_allclose(res3.ritz_values[:2], res2.ritz_values, rtol=1e-10)
  assert np.isnan(res3.ritz_values[2])


def test_block_lanczos_compiles_once_and_runs_in_half_precision():
  a, matvec, unravel = _matrix(SPECTRUM)
  traces = []

  @jax.jit
  def run(v0):
    traces.append(1)
    return krylov.block_lanczos(matvec, v0, 10).ritz_values[:5]

  for seed in (1, 2):
    np.testing.assert_allclose(run(_start(unravel, a.shape[0], 3, seed)), SPECTRUM[:5],
                               rtol=1e-6)
  assert len(traces) == 1
  f32 = _start(unravel, a.shape[0], 3)
  f32 = jax.tree_util.tree_map(lambda x: x.astype(jnp.bfloat16), f32)
  half = krylov.block_lanczos(lambda v: jax.tree_util.tree_map(
      lambda x: x.astype(jnp.bfloat16), matvec(v)), f32, 10)
  assert half.ritz_values.dtype == jnp.bfloat16
  np.testing.assert_allclose(np.asarray(half.ritz_values[:5], np.float64), SPECTRUM[:5],
                             rtol=2e-2)


def test_top_eigenpairs_with_blocks_reports_the_multiplicities_of_a_linear_layers_ggn():
  """A linear layer with K = 3 outputs under squared error: its GGN is I_3 (x) (X'X / N),
  each of its five eigenvalues three times. block_size=3 finds them with their
  multiplicity (the docstring's example); block_size=1 finds each once."""
  key_w, key_x, key_y = jax.random.split(jax.random.PRNGKey(0), 3)
  params = {"w": 0.1 * jax.random.normal(key_w, (4, 3)), "b": jnp.zeros(3)}
  apply_fn = lambda p, x: x @ p["w"] + p["b"]
  loss = curvax.losses.mean_squared_error
  batch = (jax.random.normal(key_x, (8, 4)), jax.random.normal(key_y, (8, 3)))
  g = np.asarray(explicit_ggn(apply_fn, loss, params, batch))
  lam = np.linalg.eigh(g)[0][::-1]
  np.testing.assert_allclose(lam.reshape(5, 3), lam[::3, None] * np.ones(3), rtol=1e-10)

  @jax.jit
  def run(key):
    mv = curvax.curvature.ggn_matvec(apply_fn, loss, params, batch)
    blocks = krylov.top_eigenpairs(mv, params, key, k=6, num_iterations=5, block_size=3)
    single = krylov.top_eigenvalues(mv, params, key, k=5, num_iterations=5)
    return blocks, single

  (values, vectors), single = run(jax.random.PRNGKey(1))
  np.testing.assert_allclose(values, lam[:6], rtol=1e-8)
  x = _rows(vectors)
  np.testing.assert_allclose(x @ g, values[:, None] * x, atol=1e-8)
  np.testing.assert_allclose(x @ x.T, np.eye(6), atol=1e-8)
  np.testing.assert_allclose(single, lam[::3], rtol=1e-8)


@pytest.mark.parametrize("seed", [0, 1])
def test_top_eigenpairs_with_blocks_takes_a_warm_start(seed):
  """A warm start at the top eigenvector (half of the first start vector, as in
  `lanczos`): after two block steps the top eigenvalue is 5x closer than cold."""
  spectrum = np.concatenate([[4.0], np.linspace(-1, 1, 29)])
  a, matvec, unravel = _matrix(spectrum)
  top = unravel(jnp.asarray(np.linalg.eigh(a)[1][:, -1]))
  params = jax.tree_util.tree_map(jnp.zeros_like, top)
  key = jax.random.PRNGKey(seed)
  warm, _ = krylov.top_eigenpairs(matvec, params, key, num_iterations=2, block_size=2,
                                  warm_start=top)
  cold, _ = krylov.top_eigenpairs(matvec, params, key, num_iterations=2, block_size=2)
  assert 0 < 4.0 - float(warm[0]) < 0.2 * (4.0 - float(cold[0]))
  with pytest.raises(ValueError, match="warm_start"):
    krylov.top_eigenpairs(matvec, params, key, block_size=2, warm_start={"w": jnp.zeros(3)})


def test_block_lanczos_errors():
  d = jnp.arange(1.0, 7.0)
  mv = lambda v: d * v
  with pytest.raises(ValueError, match="leading"):
    krylov.block_lanczos(lambda v: v, {"a": jnp.ones((2, 3)), "b": jnp.ones((3, 3))}, 2)
  with pytest.raises(ValueError, match="leading"):
    krylov.block_lanczos(lambda v: v, {"a": jnp.ones(())}, 2)
  with pytest.raises(ValueError, match="num_iterations"):
    krylov.block_lanczos(mv, jnp.ones((2, 6)), 0)
  with pytest.raises(ValueError, match="num_converged"):
    krylov.block_lanczos(mv, jnp.ones((2, 6)), 2, rtol=1e-3, num_converged=5)
  with pytest.raises(ValueError, match="matvec"):
    krylov.block_lanczos(lambda v: v[:2], jnp.ones((2, 6)), 2)
  with pytest.raises(ValueError, match="block_size"):
    krylov.top_eigenpairs(mv, jnp.zeros(6), jax.random.PRNGKey(0), block_size=0)
  with pytest.raises(ValueError, match="k=7 exceeds"):
    krylov.top_eigenpairs(mv, jnp.zeros(6), jax.random.PRNGKey(0), k=7, block_size=2)
  # 3 steps of 2 span R^6; later steps multiply zeros (breakdown).
  res = krylov.block_lanczos(mv, jnp.asarray(np.random.default_rng(0).normal(size=(2, 6))), 9)
  np.testing.assert_allclose(res.ritz_values[:6], np.arange(6.0, 0.0, -1.0), rtol=1e-10)
  np.testing.assert_array_equal([res.iterations, res.rank], [3, 6])


@pytest.mark.parametrize("rtol", [None, 1e-10])
def test_block_lanczos_with_a_dropped_start_vector_still_reaches_the_whole_space(rtol):
  """A zero start row leaves blocks of 2 for a nominal b = 3: ceil(D / 3) = 4 steps
  span only 8 of 10 dimensions; the run goes on until the space is whole."""
  rng = np.random.default_rng(6)
  u, _ = np.linalg.qr(rng.normal(size=(10, 10)))
  spectrum = np.arange(10, 0, -1.0) - 3.5
  a = jnp.asarray(u @ np.diag(spectrum) @ u.T)
  v0 = rng.normal(size=(3, 10))
  v0[2] = 0.0
  res = krylov.block_lanczos(lambda v: a @ v, jnp.asarray(v0), 50, rtol=rtol, num_converged=10)
  assert int(res.rank) == 10
  np.testing.assert_allclose(res.ritz_values[:10], spectrum, atol=1e-10)


@pytest.mark.parametrize("near_span", [True, False])
def test_reorthogonalisation_is_orthogonal_to_working_precision(near_span):
  """`_project_out` in float32: a vector 1e-5 away from the span of 10 basis
  vectors (one Gram-Schmidt pass cancels ~all of it and leaves round-off of
  ~eps ||w|| along the basis, ~3e-4 of the remainder; DGKS's criterion triggers
  the second pass) and a generic vector (one pass suffices) both come out
  orthogonal to the basis to ~eps of their norm; the coefficients are q w'."""
  rng = np.random.default_rng(5)
  q = jnp.asarray(np.linalg.qr(rng.normal(size=(1000, 10)))[0].T, jnp.float32)
  coeffs = rng.normal(size=10)
  noise = rng.normal(size=1000)
  w = (coeffs @ np.asarray(q, np.float64) + 1e-5 * noise) if near_span else noise
  out, first = jax.jit(krylov._project_out)(jnp.asarray(w, jnp.float32)[None], q)
  out = np.asarray(out[0], np.float64)
  along = np.abs(np.asarray(q, np.float64) @ out).max() / np.linalg.norm(out)
  assert along < 5e-6
  np.testing.assert_allclose(np.asarray(first)[:, 0], np.asarray(q, np.float64) @ w,
                             rtol=1e-4, atol=1e-5)


def test_block_lanczos_on_a_ggn_agrees_with_the_vivit_gram_eigenpairs():
  """Two independent routes to a small MLP's GGN spectrum: block Lanczos on
  `ggn_matvec` (products only) and ViViT's eigendecomposition of the Gram matrix
  of the GGN factor. The GGN has rank <= N (C - 1) = 12 of 43, so the block
  Krylov space becomes invariant within 10 steps of 2 and the two agree to
  round-off, eigenvectors included (up to sign)."""
  apply_fn, loss, params, batch = problem("mlp", "softmax_cross_entropy")

  @jax.jit
  def run(params, batch):
    mv = curvax.curvature.ggn_matvec(apply_fn, loss, params, batch)
    lanczos = krylov.top_eigenpairs(mv, params, jax.random.PRNGKey(3), k=4, num_iterations=10,
                                    block_size=2)
    vivit = curvax.curvature.ggn_eigenpairs(apply_fn, loss, params, batch, 4)
    return lanczos, vivit

  (values, vectors), vivit = run(params, batch)
  assert np.all(np.diff(np.asarray(vivit.eigenvalues)) < -1e-6)   # distinct: vectors comparable
  np.testing.assert_allclose(values, vivit.eigenvalues, rtol=1e-10)
  overlap = np.abs(np.sum(_rows(vectors) * _rows(vivit.eigenvectors), axis=1))
  np.testing.assert_allclose(overlap, 1.0, atol=1e-8)
