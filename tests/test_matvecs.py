"""GGN, Hessian and empirical-Fisher products against explicit matrices."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.flatten_util import ravel_pytree

import curvax
from reference import (LOSSES, explicit_ggn, explicit_hessian,
                       explicit_per_example_grads, flat, problem)

CONFIGS = [(m, l) for m in ("mlp", "cnn") for l in LOSSES]


def _random_like(params, seed):
  flat_p, unravel = ravel_pytree(params)
  return unravel(jax.random.normal(jax.random.PRNGKey(seed), flat_p.shape))


@pytest.mark.parametrize("model,loss_name", CONFIGS)
def test_ggn_matvec_matches_explicit_ggn(model, loss_name):
  apply_fn, loss, params, batch = problem(model, loss_name)
  g = explicit_ggn(apply_fn, loss, params, batch)

  @jax.jit
  def product(params, batch, v):
    return curvax.curvature.ggn_matvec(apply_fn, loss, params, batch)(v)

  v = _random_like(params, 1)
  np.testing.assert_allclose(flat(product(params, batch, v)), g @ flat(v), rtol=1e-9, atol=1e-11)


@pytest.mark.parametrize("model,loss_name", CONFIGS)
def test_hessian_matvec_matches_jax_hessian(model, loss_name):
  apply_fn, loss, params, batch = problem(model, loss_name)
  h = explicit_hessian(apply_fn, loss, params, batch)
  loss_fn = curvax.losses.objective(apply_fn, loss)
  v = _random_like(params, 2)
  hv = jax.jit(lambda p, b, v: curvax.curvature.hessian_matvec(loss_fn, p, b)(v))(params, batch, v)
  np.testing.assert_allclose(flat(hv), h @ flat(v), rtol=1e-9, atol=1e-11)


@pytest.mark.parametrize("model,loss_name", CONFIGS)
def test_fisher_matvec_matches_per_example_outer_products(model, loss_name):
  apply_fn, loss, params, batch = problem(model, loss_name)
  grads = explicit_per_example_grads(apply_fn, loss, params, batch)
  f = grads.T @ grads / grads.shape[0]
  v = _random_like(params, 3)
  fv = jax.jit(lambda p, b, v: curvax.curvature.fisher_matvec(apply_fn, loss, p, b)(v))(params, batch, v)
  np.testing.assert_allclose(flat(fv), f @ flat(v), rtol=1e-9, atol=1e-11)


def test_ggn_equals_hessian_for_linear_model():
  """For a model linear in its parameters the GGN is the Hessian (Eq. 3.16)."""
  apply_fn = lambda p, x: x @ p["w"] + p["b"]
  params = {"w": jax.random.normal(jax.random.PRNGKey(0), (4, 3)), "b": jnp.zeros(3)}
  x = jax.random.normal(jax.random.PRNGKey(1), (7, 4))
  y = jax.random.randint(jax.random.PRNGKey(2), (7,), 0, 3)
  loss = curvax.losses.softmax_cross_entropy
  v = _random_like(params, 4)
  gv = curvax.curvature.ggn_matvec(apply_fn, loss, params, (x, y))(v)
  hv = curvax.curvature.hessian_matvec(curvax.losses.objective(apply_fn, loss), params, (x, y))(v)
  np.testing.assert_allclose(flat(gv), flat(hv), rtol=1e-10, atol=1e-12)


def test_plain_callable_loss_gives_same_ggn():
  apply_fn, loss, params, batch = problem("mlp", "softmax_cross_entropy")
  v = _random_like(params, 5)
  exact = curvax.curvature.ggn_matvec(apply_fn, loss, params, batch)(v)
  auto = curvax.curvature.ggn_matvec(apply_fn, lambda o, t: loss(o, t), params, batch)(v)
  np.testing.assert_allclose(flat(auto), flat(exact), rtol=1e-9, atol=1e-11)


def _explicit_matrix(matvec, params):
  """The matrix of a matvec on pytrees, column by column (unit vectors)."""
  flat_p, unravel = ravel_pytree(params)
  return jnp.stack([flat(matvec(unravel(e))) for e in jnp.eye(flat_p.size)], axis=1)


def test_plain_callable_convex_in_outputs_gives_one_ggn():
  """ggn_matvec, diag_ggn and ggn_eigenpairs agree on J'HJ for a convex plain
  callable (softplus(f - y), diagonal output Hessian sigmoid')."""
  def softplus_loss(o, t):
    return jnp.sum(jax.nn.softplus(o - t), axis=-1)
  apply_fn, _, params, (x, y) = problem("mlp", "mean_squared_error", n=4)
  batch = (x, y)
  g = _explicit_matrix(curvax.curvature.ggn_matvec(apply_fn, softplus_loss, params, batch),
                       params)
  np.testing.assert_allclose(g, g.T, atol=1e-12)
  eig = jnp.linalg.eigvalsh(g)
  assert float(eig[0]) > -1e-10
  np.testing.assert_allclose(
      jnp.diag(g), flat(curvax.curvature.diag_ggn(apply_fn, softplus_loss, params, batch)),
      rtol=1e-9, atol=1e-12)
  pairs = curvax.curvature.ggn_eigenpairs(apply_fn, softplus_loss, params, batch, 2)
  np.testing.assert_allclose(pairs.eigenvalues, eig[::-1][:2], rtol=1e-8)


def test_plain_callable_with_dict_targets():
  def weighted(o, t):
    return t["w"] * 0.5 * jnp.sum((o - t["y"]) ** 2, -1)
  apply_fn, mse, params, (x, y) = problem("mlp", "mean_squared_error", n=4)
  targets = {"y": y, "w": jnp.ones(4)}
  v = _random_like(params, 9)
  np.testing.assert_allclose(
      flat(curvax.curvature.ggn_matvec(apply_fn, weighted, params, (x, targets))(v)),
      flat(curvax.curvature.ggn_matvec(apply_fn, mse, params, (x, y))(v)), rtol=1e-9, atol=1e-12)
  np.testing.assert_allclose(
      flat(curvax.curvature.diag_ggn(apply_fn, weighted, params, (x, targets))),
      flat(curvax.curvature.diag_ggn(apply_fn, mse, params, (x, y))), rtol=1e-9, atol=1e-12)
  step = curvax.curvature.quadratic_step_size(apply_fn, weighted, params, v, (x, targets))
  expected = curvax.curvature.quadratic_step_size(apply_fn, mse, params, v, (x, y))
  np.testing.assert_allclose(flat(step), flat(expected), rtol=1e-9, atol=1e-12)


@pytest.mark.parametrize("kind", ["ggn", "hessian", "fisher"])
def test_matvecs_vmap_over_vectors_and_jit_once(kind):
  apply_fn, loss, params, batch = problem("mlp", "mean_squared_error")
  loss_fn = curvax.losses.objective(apply_fn, loss)
  traces = []

  def make(p, b):
    traces.append(1)
    if kind == "ggn":
      return curvax.curvature.ggn_matvec(apply_fn, loss, p, b)
    if kind == "hessian":
      return curvax.curvature.hessian_matvec(loss_fn, p, b)
    return curvax.curvature.fisher_matvec(apply_fn, loss, p, b)

  @jax.jit
  def many(p, b, vs):
    return jax.vmap(make(p, b))(vs)

  flat_p, unravel = ravel_pytree(params)
  basis = jax.vmap(unravel)(jnp.eye(flat_p.size)[:5])
  out = many(params, batch, basis)
  single = make(params, batch)
  for i in range(5):
    np.testing.assert_allclose(
        flat(jax.tree_util.tree_map(lambda a: a[i], out)),
        flat(single(jax.tree_util.tree_map(lambda a: a[i], basis))), rtol=1e-10, atol=1e-12)
  n_traces = len(traces)
  params2 = jax.tree_util.tree_map(lambda a: a + 1.0, params)
  many(params2, batch, basis)
  assert len(traces) == n_traces, "second call with same shapes re-traced"


def test_ggn_is_differentiable():
  """d/dtheta (v' G(theta) v) via grad runs and matches finite differences."""
  apply_fn, loss, params, batch = problem("mlp", "mean_squared_error")
  v = _random_like(params, 6)

  def quad(p):
    return jnp.vdot(flat(v), flat(curvax.curvature.ggn_matvec(apply_fn, loss, p, batch)(v)))

  g = jax.grad(quad)(params)
  d = _random_like(params, 7)
  eps = 1e-6
  shift = lambda s: jax.tree_util.tree_map(lambda a, b: a + s * b, params, d)
  fd = (quad(shift(eps)) - quad(shift(-eps))) / (2 * eps)
  np.testing.assert_allclose(jnp.vdot(flat(g), flat(d)), fd, rtol=1e-6)


def test_plain_callable_ggn_is_differentiable():
  """grad of v' G v through the autodiff loss's Hessian-vector product equals
  that through the closed form."""
  apply_fn, loss, params, batch = problem("mlp", "softmax_cross_entropy")
  v = _random_like(params, 6)

  def quad(p, l):
    return jnp.vdot(flat(v), flat(curvax.curvature.ggn_matvec(apply_fn, l, p, batch)(v)))

  np.testing.assert_allclose(flat(jax.grad(quad)(params, lambda o, t: loss(o, t))),
                             flat(jax.grad(quad)(params, loss)), rtol=1e-9, atol=1e-12)


def test_bad_inputs_raise_clear_errors():
  apply_fn, loss, params, batch = problem("mlp", "softmax_cross_entropy")
  with pytest.raises(TypeError, match=r"\(inputs, targets\)"):
    curvax.curvature.ggn_matvec(apply_fn, loss, params, batch[0])
  with pytest.raises(TypeError, match="required"):
    curvax.curvature.ggn_matvec(apply_fn, loss, params, None)
  with pytest.raises(ValueError, match="leading batch axis"):
    curvax.curvature.ggn_matvec(apply_fn, loss, params, (batch[0], batch[1][:2]))
  mv = curvax.curvature.ggn_matvec(apply_fn, loss, params, batch)
  bad = dict(params)
  del bad["b2"]
  with pytest.raises(ValueError, match="shaped like `params`"):
    mv(bad)
  wrong_shape = dict(params, w1=jnp.zeros((3, 3)))
  with pytest.raises(ValueError, match=r"\['w1'\]"):
    mv(wrong_shape)
  with pytest.raises(ValueError, match="integer labels"):
    curvax.curvature.ggn_matvec(apply_fn, loss, params, (batch[0], jnp.zeros((6, 7), jnp.int32)))


@pytest.mark.parametrize("kind", ["ggn", "hessian", "fisher"])
def test_every_matvec_rejects_a_vector_not_shaped_like_params(kind):
  """A missing leaf or a leaf of the wrong shape is a ValueError naming the
  mismatch, not a TypeError from deep inside a linearised function."""
  apply_fn, loss, params, batch = problem("mlp", "mean_squared_error", n=3)
  if kind == "ggn":
    mv = curvax.curvature.ggn_matvec(apply_fn, loss, params, batch)
  elif kind == "hessian":
    mv = curvax.curvature.hessian_matvec(curvax.losses.objective(apply_fn, loss), params, batch)
  else:
    mv = curvax.curvature.fisher_matvec(apply_fn, loss, params, batch)
  missing = dict(params)
  del missing["b2"]
  with pytest.raises(ValueError, match="shaped like `params`"):
    mv(missing)
  with pytest.raises(ValueError, match=r"\['w1'\]"):
    mv(dict(params, w1=jnp.zeros((3, 3))))


def test_l2_regularizer_adds_weight_times_identity_on_weights():
  apply_fn, loss, params, batch = problem("mlp", "mean_squared_error")
  names = {"w1", "w2"}
  reg = curvax.losses.l2_regularizer(
      0.3, lambda path, leaf: path[-1].key in names)
  loss_fn = curvax.losses.objective(apply_fn, loss, reg)
  h = jax.hessian(lambda w: loss_fn(ravel_pytree(params)[1](w), batch))(flat(params))
  mv = curvax.curvature.add_regularizer_curvature(
      curvax.curvature.hessian_matvec(curvax.losses.objective(apply_fn, loss), params, batch),
      reg, params)
  v = _random_like(params, 8)
  np.testing.assert_allclose(flat(mv(v)), h @ flat(v), rtol=1e-9, atol=1e-11)
  expected = 0.15 * (jnp.sum(params["w1"] ** 2) + jnp.sum(params["w2"] ** 2))
  np.testing.assert_allclose(reg(params), expected, rtol=1e-12)


def test_default_l2_skips_flax_biases():
  reg = curvax.losses.l2_regularizer(2.0)
  params = {"Dense_0": {"kernel": jnp.ones((2, 2)), "bias": jnp.ones(2)}}
  np.testing.assert_allclose(reg(params), 4.0)


def test_default_l2_skips_nnx_biases():
  from flax import nnx
  model = nnx.Linear(3, 2, bias_init=nnx.initializers.ones, param_dtype=jnp.float64,
                     rngs=nnx.Rngs(0))
  _, params = curvax.flax_utils.from_nnx(model)
  reg = curvax.losses.l2_regularizer(2.0)
  np.testing.assert_allclose(reg(params), jnp.sum(model.kernel[...] ** 2), rtol=1e-12)
