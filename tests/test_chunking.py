"""`curvax.curvature._chunking`: chunked sums equal the unchunked ones, in any
chunking (remainders included) and with the batch axis anywhere."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from curvax.curvature import _chunking
from curvax.curvature import flax_layers


@pytest.mark.parametrize("n,chunk", [(7, 1), (7, 2), (7, 3), (7, 7), (7, 10), (8, 4), (8, None)])
@pytest.mark.parametrize("axis", [0, 1])
def test_sum_chunks_and_map_reduce_equal_the_direct_sum(n, chunk, axis):
  a = jax.random.normal(jax.random.PRNGKey(0), (n, 3))
  b = jax.random.normal(jax.random.PRNGKey(1), (4, n, 2) if axis == 1 else (n, 4, 2))
  b0 = jnp.moveaxis(b, axis, 0)
  seen = []

  def fn(xs):
    a_c, b_c = xs
    b_c = jnp.moveaxis(b_c, axis, 0)
    seen.append(a_c.shape[0])
    # Nonlinear in the chunk as a whole, but a sum over its examples.
    return {"s": jnp.einsum("ni,njk->ijk", jnp.sin(a_c), b_c ** 2), "c": jnp.sum(a_c[:, 0])}

  direct = {"s": jnp.einsum("ni,njk->ijk", jnp.sin(a), b0 ** 2), "c": jnp.sum(a[:, 0])}
  a_in = a if axis == 0 else a[None]
  fn_in = fn if axis == 0 else (lambda xs: fn((xs[0][0], xs[1])))
  got = jax.jit(lambda a, b: _chunking.sum_chunks(fn_in, (a, b), chunk, axis=axis))(a_in, b)
  for k in direct:
    np.testing.assert_allclose(got[k], direct[k], rtol=1e-5, atol=1e-6)
  expected = {n} if chunk is None or chunk >= n else {chunk} | ({n % chunk} if n % chunk else set())
  assert set(seen) == expected
  if axis == 0:
    _, mr = _chunking.map_reduce(lambda xs: (None, fn(xs)), (a, b), chunk)
    for k in direct:
      np.testing.assert_allclose(mr[k], direct[k], rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("m", [1, 2, 3, 5, 7, 8, 32, 33])
def test_sum_of_squares_over_the_leading_axis(m):
  x = jax.random.normal(jax.random.PRNGKey(m), (m, 4, 3))
  np.testing.assert_allclose(jax.jit(flax_layers._sum_of_squares)(x),
                             jnp.sum(x ** 2, axis=0), rtol=1e-5)


def test_sum_chunks_rejects_a_bad_chunk_size():
  with pytest.raises(ValueError, match="chunk_size"):
    _chunking.sum_chunks(lambda x: x, jnp.ones(3), 0)


@pytest.mark.parametrize("n,chunk", [(7, 1), (7, 2), (7, 3), (9, 4), (8, 4), (8, 8), (5, None)])
def test_map_reduce_returns_per_example_outputs_in_the_original_order(n, chunk):
  # Reference: fn on the whole batch at once (a per-example map is row by row).
  x = jax.random.normal(jax.random.PRNGKey(0), (n, 3))
  y = jnp.arange(n * 2.0).reshape(n, 2)

  def fn(xs):
    a, b = xs
    per = {"f": jnp.tanh(a) * b[:, :1], "id": b}
    return per, jnp.sum(a * b[:, 1:], axis=0)

  per, total = jax.jit(lambda x, y: _chunking.map_reduce(fn, (x, y), chunk))(x, y)
  per_ref, total_ref = fn((x, y))
  np.testing.assert_array_equal(per["id"], y)   # example n's row comes back at row n
  np.testing.assert_allclose(per["f"], per_ref["f"], rtol=1e-12)
  np.testing.assert_allclose(total, total_ref, rtol=1e-12, atol=1e-12)


def test_split_and_merge_chunks_are_strided_and_inverse():
  a = jnp.arange(12 * 2).reshape(12, 2)
  chunks = _chunking.split_chunks(a, 4)   # q = 3 chunks of m = 4
  assert chunks.shape == (3, 4, 2)
  for j in range(3):   # chunk j holds examples j, j + q, j + 2q, ...
    np.testing.assert_array_equal(chunks[j], a[j::3])
  np.testing.assert_array_equal(_chunking.merge_chunks(chunks), a)


@pytest.mark.parametrize("chunk", [0, -1, 2.0, "2", True, np.int64(0)])
def test_map_reduce_and_sum_chunks_reject_a_bad_chunk_size(chunk):
  xs = jnp.ones((7, 2))
  with pytest.raises(ValueError, match="chunk_size"):
    _chunking.map_reduce(lambda x: (x, jnp.sum(x)), xs, chunk)
  with pytest.raises(ValueError, match="chunk_size"):
    _chunking.sum_chunks(jnp.sum, xs, chunk)


def test_expand_adds_a_batch_axis_of_one_to_every_leaf():
  tree = {"x": jnp.arange(6.0).reshape(2, 3), "y": jnp.asarray(4)}
  out = _chunking.expand(tree)
  assert out["x"].shape == (1, 2, 3) and out["y"].shape == (1,)
  np.testing.assert_array_equal(out["x"][0], tree["x"])
  np.testing.assert_array_equal(out["y"][0], tree["y"])


def test_a_numpy_integer_chunk_size_is_an_int():
  # np.int64(3) (e.g. from a config array) chunks like 3.
  xs = jnp.arange(14.0).reshape(7, 2)
  for chunk in (np.int64(3), np.int32(3)):
    assert _chunking.check_chunk_size(chunk) == 3 and type(_chunking.check_chunk_size(chunk)) is int
    np.testing.assert_allclose(_chunking.sum_chunks(jnp.sum, xs, chunk),
                               _chunking.sum_chunks(jnp.sum, xs, 3))
