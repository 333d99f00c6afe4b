"""quadratic_step_size against explicit gradients and GGN matrices."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.flatten_util import ravel_pytree

import curvax
from reference import LOSSES, explicit_ggn, flat, problem

CONFIGS = [("mlp", l) for l in LOSSES] + [("cnn", "softmax_cross_entropy")]


def _random_like(params, seed):
  flat_p, unravel = ravel_pytree(params)
  return unravel(jax.random.normal(jax.random.PRNGKey(seed), flat_p.shape))


def _reference(apply_fn, loss, params, batch, d, regularizer=None):
  """d'g by reverse mode, d'Gd from the explicit GGN (+ jax.hessian of r)."""
  loss_fn = curvax.losses.objective(apply_fn, loss, regularizer)
  g = jax.grad(loss_fn)(params, batch)
  gmat = explicit_ggn(apply_fn, loss, params, batch)
  if regularizer is not None:
    flat_p, unravel = ravel_pytree(params)
    gmat = gmat + jax.hessian(lambda w: regularizer(unravel(w)))(flat_p)
  num = flat(d) @ flat(g)
  den = flat(d) @ gmat @ flat(d)
  return num, den, loss_fn(params, batch)


@pytest.mark.parametrize("model,loss_name", CONFIGS)
def test_parts_match_explicit_gradient_and_ggn(model, loss_name):
  apply_fn, loss, params, batch = problem(model, loss_name)
  d = _random_like(params, 1)
  out = jax.jit(lambda p, d, b: curvax.curvature.quadratic_step_size(apply_fn, loss, p, d, b))(
      params, d, batch)
  num, den, value = _reference(apply_fn, loss, params, batch, d)
  np.testing.assert_allclose(out.numerator, num, rtol=1e-10)
  np.testing.assert_allclose(out.denominator, den, rtol=1e-10)
  np.testing.assert_allclose(out.alpha, -num / den, rtol=1e-10)
  np.testing.assert_allclose(out.loss, value, rtol=1e-12)
  assert bool(out.is_defined)


def test_regularizer_enters_slope_curvature_and_value():
  apply_fn, loss, params, batch = problem("mlp", "softmax_cross_entropy")
  reg = curvax.losses.l2_regularizer(0.3, lambda path, leaf: path[-1].key.startswith("w"))
  d = _random_like(params, 2)
  out = curvax.curvature.quadratic_step_size(apply_fn, loss, params, d, batch, regularizer=reg)
  num, den, value = _reference(apply_fn, loss, params, batch, d, reg)
  np.testing.assert_allclose(out.numerator, num, rtol=1e-10)
  np.testing.assert_allclose(out.denominator, den, rtol=1e-10)
  np.testing.assert_allclose(out.loss, value, rtol=1e-12)
  # The L2 terms are what the docstring says: weight * w.d and weight * d.d (weights only).
  plain = curvax.curvature.quadratic_step_size(apply_fn, loss, params, d, batch)
  ww = sum(jnp.vdot(params[k], d[k]) for k in ("w1", "w2"))
  dd = sum(jnp.vdot(d[k], d[k]) for k in ("w1", "w2"))
  np.testing.assert_allclose(out.numerator - plain.numerator, 0.3 * ww, rtol=1e-10)
  np.testing.assert_allclose(out.denominator - plain.denominator, 0.3 * dd, rtol=1e-10)


@pytest.mark.parametrize("regularized", [False, True])
@pytest.mark.parametrize("model,loss_name", [("mlp", "softmax_cross_entropy"),
                                             ("mlp", "mean_squared_error")])
def test_hessian_curvature_matches_dense_hessian(model, loss_name, regularized):
  """curvature="hessian": d'Hd against jax.hessian of the objective (which,
  on a nonlinear net, differs from d'Gd: checked, so the option is not the GGN)."""
  apply_fn, loss, params, batch = problem(model, loss_name)
  reg = (curvax.losses.l2_regularizer(0.3, lambda path, leaf: path[-1].key.startswith("w"))
         if regularized else None)
  d = _random_like(params, 4)
  loss_fn = curvax.losses.objective(apply_fn, loss, reg)
  flat_p, unravel = ravel_pytree(params)
  hmat = jax.hessian(lambda w: loss_fn(unravel(w), batch))(flat_p)
  out = jax.jit(lambda p, d, b: curvax.curvature.quadratic_step_size(
      apply_fn, loss, p, d, b, regularizer=reg, curvature="hessian"))(params, d, batch)
  num, ggn_den, value = _reference(apply_fn, loss, params, batch, d, reg)
  den = flat(d) @ hmat @ flat(d)
  np.testing.assert_allclose(out.numerator, num, rtol=1e-10)
  np.testing.assert_allclose(out.denominator, den, rtol=1e-10)
  np.testing.assert_allclose(out.loss, value, rtol=1e-12)
  assert abs(den - ggn_den) > 1e-6 * abs(den)
  np.testing.assert_allclose(out.alpha, -num / den if den > 0 else np.nan, rtol=1e-10)


def test_hessian_curvature_on_a_value_output_model():
  """A model that outputs the loss (value_loss, DeepOBS's 2-D functions): the
  GGN is zero (alpha undefined), the Hessian is Rosenbrock's."""
  value_loss = curvax.losses.as_loss(lambda out, tgt: out[..., 0])
  f = lambda u, v: (1 - u) ** 2 + 100 * (v - u ** 2) ** 2  # noqa: E731
  apply_fn = lambda p, x: (f(p["u"], p["v"]) + p["u"] * x[:, 0] + p["v"] * x[:, 1])[:, None]  # noqa: E731
  params = {"u": jnp.asarray(-0.5), "v": jnp.asarray(1.5)}
  x = jax.random.normal(jax.random.PRNGKey(0), (6, 2))
  batch = (x, jnp.zeros(6))
  d = {"u": jnp.asarray(0.3), "v": jnp.asarray(-0.2)}
  ggn = curvax.curvature.quadratic_step_size(apply_fn, value_loss, params, d, batch)
  assert float(ggn.denominator) == 0.0 and np.isnan(ggn.alpha)
  hess = curvax.curvature.quadratic_step_size(apply_fn, value_loss, params, d, batch,
                                              curvature="hessian")
  u, v, du, dv = -0.5, 1.5, 0.3, -0.2
  h = np.array([[2 - 400 * (v - u ** 2) + 800 * u ** 2, -400 * u], [-400 * u, 200]])
  g = np.array([-2 * (1 - u) - 400 * u * (v - u ** 2), 200 * (v - u ** 2)]) + np.mean(x, 0)
  dd = np.array([du, dv])
  np.testing.assert_allclose(hess.denominator, dd @ h @ dd, rtol=1e-10)
  np.testing.assert_allclose(hess.numerator, dd @ g, rtol=1e-10)
  with pytest.raises(ValueError, match="curvature"):
    curvax.curvature.quadratic_step_size(apply_fn, value_loss, params, d, batch,
                                         curvature="fisher")


def test_quadratic_objective_alpha_lands_on_minimiser_along_d():
  """Linear model + MSE: the objective is exactly quadratic, so h'(alpha*) = 0."""
  apply_fn = lambda p, x: x @ p["w"] + p["b"]
  key = jax.random.PRNGKey(0)
  params = {"w": jax.random.normal(key, (4, 2)), "b": jnp.zeros(2)}
  x = jax.random.normal(jax.random.PRNGKey(1), (9, 4))
  y = jax.random.normal(jax.random.PRNGKey(2), (9, 2))
  loss = curvax.losses.mean_squared_error
  loss_fn = curvax.losses.objective(apply_fn, loss)
  d = _random_like(params, 3)
  out = curvax.curvature.quadratic_step_size(apply_fn, loss, params, d, (x, y))
  along = lambda a: loss_fn(jax.tree.map(lambda p, v: p + a * v, params, d), (x, y))
  np.testing.assert_allclose(jax.grad(along)(out.alpha), 0.0, atol=1e-12)
  assert jax.grad(jax.grad(along))(out.alpha) > 0


def test_plain_callable_loss_uses_autodiff_output_hessian():
  apply_fn, loss, params, batch = problem("mlp", "mean_squared_error")
  plain = lambda f, y: 0.5 * jnp.sum((f - y) ** 2, axis=-1)
  d = _random_like(params, 4)
  a = curvax.curvature.quadratic_step_size(apply_fn, plain, params, d, batch)
  b = curvax.curvature.quadratic_step_size(apply_fn, loss, params, d, batch)
  np.testing.assert_allclose(a.numerator, b.numerator, rtol=1e-12)
  np.testing.assert_allclose(a.denominator, b.denominator, rtol=1e-12)


def test_zero_direction_is_undefined_not_nan_or_inf_by_accident():
  apply_fn, loss, params, batch = problem("mlp", "softmax_cross_entropy")
  d = jax.tree.map(jnp.zeros_like, params)
  out = curvax.curvature.quadratic_step_size(apply_fn, loss, params, d, batch)
  assert out.denominator == 0 and not bool(out.is_defined) and jnp.isnan(out.alpha)
  # Parts from different batches combine into the hybrid diagnostic.
  np.testing.assert_allclose(
      curvax.curvature.step_size_from_parts(jnp.asarray(2.0), jnp.asarray(4.0)), -0.5)
  assert jnp.isnan(curvax.curvature.step_size_from_parts(jnp.asarray(1.0), jnp.asarray(-1.0)))
  assert jnp.isnan(curvax.curvature.step_size_from_parts(jnp.asarray(jnp.inf), jnp.asarray(1.0)))


def test_mismatched_direction_and_missing_batch_raise_clear_errors():
  apply_fn, loss, params, batch = problem("mlp", "softmax_cross_entropy")
  with pytest.raises(ValueError, match="direction"):
    curvax.curvature.quadratic_step_size(apply_fn, loss, params, {"w1": params["w1"]}, batch)
  with pytest.raises(TypeError, match="batch"):
    curvax.curvature.quadratic_step_size(apply_fn, loss, params, params, None)


def test_one_forward_mode_pass_no_backward_pass():
  """The jaxpr of the computation holds no transpose: forward mode only."""
  apply_fn, loss, params, batch = problem("mlp", "softmax_cross_entropy")
  d = _random_like(params, 5)
  calls = []

  def counted(p, x):
    calls.append(1)
    return apply_fn(p, x)

  jaxpr = jax.make_jaxpr(
      lambda p, d: curvax.curvature.quadratic_step_size(counted, loss, p, d, batch).alpha)(params, d)
  assert len(calls) == 1  # the model is traced once (inside one jvp)
  # The MLP has two matmuls: 2 primal + 3 tangent dot_generals (x dW1, dH W2,
  # H dW2); a backward pass or a GGN matvec (JVP + VJP) would add 3 more.
  n_dots = str(jaxpr).count("dot_general")
  assert n_dots == 5, n_dots
  assert "transpose" not in str(jaxpr)


def test_mixed_precision_direction_is_taken_in_the_parameters_dtype():
  # optax.adam(mu_dtype=float32) on bfloat16 parameters proposes float32 updates.
  import optax  # pylint: disable=import-outside-toplevel
  apply_fn = lambda p, x: jnp.tanh(x @ p["w"]) @ p["v"]  # noqa: E731
  k1, k2, k3 = jax.random.split(jax.random.PRNGKey(0), 3)
  params = {"w": jax.random.normal(k1, (3, 4), jnp.bfloat16),
            "v": jax.random.normal(k2, (4, 2), jnp.bfloat16)}
  batch = (jax.random.normal(k3, (5, 3), jnp.bfloat16), jnp.zeros((5, 2), jnp.bfloat16))
  d32 = jax.tree.map(lambda p: -0.1 * jnp.ones(p.shape, jnp.float32), params)
  reg = curvax.losses.l2_regularizer(1e-2)
  loss = curvax.losses.mean_squared_error
  got = curvax.curvature.quadratic_step_size(apply_fn, loss, params, d32, batch,
                                             regularizer=reg)
  want = curvax.curvature.quadratic_step_size(
      apply_fn, loss, params, jax.tree.map(lambda d: d.astype(jnp.bfloat16), d32), batch,
      regularizer=reg)
  assert np.isfinite(float(got.alpha)) and float(got.denominator) > 0
  np.testing.assert_array_equal(np.asarray(got, np.float32), np.asarray(want, np.float32))
  tx = curvax.transforms.curvature_step_size(optax.adam(1e-2, mu_dtype=jnp.float32), apply_fn,
                                             loss, learning_rate=1e-2, debias=False)
  grads = jax.grad(curvax.losses.objective(apply_fn, loss))(params, batch)
  _, state = jax.jit(tx.update)(grads, tx.init(params), params, batch=batch)
  assert np.isfinite(float(state.alpha))


@pytest.mark.parametrize("numerator,denominator,defined", [
    (2.0, 4.0, True), (-3.0, 0.5, True), (1.0, 0.0, False), (1.0, -1.0, False),
    (1.0, np.inf, False), (1.0, np.nan, False), (np.inf, 1.0, False), (np.nan, 1.0, False),
    (-np.inf, 1.0, False), (1.0, -np.inf, False)])
def test_step_size_is_defined_only_for_finite_parts_and_positive_curvature(
    numerator, denominator, defined):
  """alpha = -num/den exactly where den > 0 and both parts are finite, NaN
  elsewhere (an infinite curvature would otherwise give alpha = -0, a step of
  zero that looks valid)."""
  num, den = jnp.asarray(numerator), jnp.asarray(denominator)
  assert bool(curvax.curvature.step_size_is_defined(num, den)) == defined
  parts = curvax.curvature.QuadraticStepSize(jnp.asarray(0.0), num, den, jnp.asarray(0.0))
  assert bool(parts.is_defined) == defined
  alpha = jax.jit(curvax.curvature.step_size_from_parts)(num, den)
  if defined:
    np.testing.assert_allclose(alpha, -numerator / denominator, rtol=1e-15)
  else:
    assert np.isnan(alpha)
