"""`curvax.curvature.add_regularizer_curvature` against jax.hessian of the regulariser."""

import jax
import jax.numpy as jnp
import numpy as np
from jax.flatten_util import ravel_pytree

import curvax
from reference import flat


def _params():
  k1, k2 = jax.random.split(jax.random.PRNGKey(0))
  return {"w": jax.random.normal(k1, (3, 2)), "b": 0.5 + jax.random.normal(k2, (2,))}


def _random_like(params, seed):
  flat_p, unravel = ravel_pytree(params)
  return unravel(jax.random.normal(jax.random.PRNGKey(seed), flat_p.shape))


def test_non_quadratic_regularizer_adds_its_hessian_at_params():
  """r(theta) = sum(w^4)/4 + sum(log cosh(b)) + (w . w)(b . b): a Hessian that
  depends on theta (evaluated at ``params``, not elsewhere) and couples the
  leaves; the data curvature is a fixed symmetric matrix A."""
  params = _params()
  flat_p, unravel = ravel_pytree(params)
  dim = flat_p.size
  a = jax.random.normal(jax.random.PRNGKey(1), (dim, dim))
  a = a @ a.T

  def reg(p):
    return (0.25 * jnp.sum(p["w"] ** 4) + jnp.sum(jnp.log(jnp.cosh(p["b"])))
            + jnp.sum(p["w"] ** 2) * jnp.sum(p["b"] ** 2))

  data_mv = lambda v: unravel(a @ flat(v))  # noqa: E731
  mv = jax.jit(lambda p, v: curvax.curvature.add_regularizer_curvature(data_mv, reg, p)(v))
  h_reg = jax.jit(jax.hessian(lambda w: reg(unravel(w))))(flat_p)
  assert np.max(np.abs(np.diag(h_reg) - np.diag(h_reg).mean())) > 0.1  # not a multiple of I
  for seed in (2, 3):
    v = _random_like(params, seed)
    np.testing.assert_allclose(flat(mv(params, v)), (a + h_reg) @ flat(v), rtol=1e-10,
                               atol=1e-12)


def test_no_regularizer_returns_the_matvec_unchanged():
  params = _params()
  data_mv = lambda v: jax.tree_util.tree_map(lambda x: 2.0 * x, v)  # noqa: E731
  assert curvax.curvature.add_regularizer_curvature(data_mv, None, params) is data_mv
