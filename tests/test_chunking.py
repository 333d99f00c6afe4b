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
