"""Losses: values, gradients, Hessian products and square roots vs autodiff."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import curvax
from reference import LOSSES, explicit_output_hessians, make_targets

N, C = 5, 4


def _data(name, seed=0, soft=False):
  k1, k2 = jax.random.split(jax.random.PRNGKey(seed))
  outputs = jax.random.normal(k1, (N, C))
  if soft:
    targets = jax.nn.softmax(jax.random.normal(k2, (N, C)))
  else:
    targets = make_targets(k2, name, outputs)
  return outputs, targets


def _configs():
  out = [(name, False) for name in LOSSES]
  out.append(("softmax_cross_entropy", True))
  return out


@pytest.mark.parametrize("name,soft", _configs())
@pytest.mark.parametrize("jit", [False, True])
def test_derivatives_match_autodiff(name, soft, jit):
  loss = LOSSES[name]
  outputs, targets = _data(name, soft=soft)
  maybe_jit = jax.jit if jit else (lambda f: f)

  values = maybe_jit(loss)(outputs, targets)
  assert values.shape == (N,)

  auto_grad = jax.vmap(jax.grad(lambda o, t: loss(o[None], t[None])[0]))(outputs, targets)
  np.testing.assert_allclose(maybe_jit(loss.grad)(outputs, targets), auto_grad, rtol=1e-10, atol=1e-12)

  h = explicit_output_hessians(loss, outputs, targets)
  u = jax.random.normal(jax.random.PRNGKey(3), (N, C))
  np.testing.assert_allclose(maybe_jit(loss.hvp)(outputs, targets, u),
                             jnp.einsum("ncd,nd->nc", h, u), rtol=1e-10, atol=1e-12)

  s = maybe_jit(loss.sqrt_hessian)(outputs, targets)
  assert s.shape[:2] == (N, C)
  if loss is curvax.losses.softmax_cross_entropy:
    assert s.shape[2] == C - 1    # H has rank C - 1: no column is wasted
  np.testing.assert_allclose(jnp.einsum("nck,ndk->ncd", s, s), h, rtol=1e-10, atol=1e-12)
  np.testing.assert_allclose(loss.hessian(outputs, targets), h, rtol=1e-10, atol=1e-12)


def test_softmax_values_match_optax():
  import optax
  outputs, labels = _data("softmax_cross_entropy")
  np.testing.assert_allclose(
      curvax.losses.softmax_cross_entropy(outputs, labels),
      optax.softmax_cross_entropy_with_integer_labels(outputs, labels), rtol=1e-12)
  onehot = jax.nn.one_hot(labels, C)
  np.testing.assert_allclose(
      curvax.losses.softmax_cross_entropy(outputs, onehot),
      optax.softmax_cross_entropy(outputs, onehot), rtol=1e-12)


def test_bce_and_mse_values_match_closed_forms():
  outputs, targets = _data("sigmoid_binary_cross_entropy")
  p = jax.nn.sigmoid(outputs)
  expected = -jnp.sum(targets * jnp.log(p) + (1 - targets) * jnp.log(1 - p), -1)
  np.testing.assert_allclose(curvax.losses.sigmoid_binary_cross_entropy(outputs, targets),
                             expected, rtol=1e-10)
  outputs, targets = _data("mean_squared_error")
  np.testing.assert_allclose(curvax.losses.mean_squared_error(outputs, targets),
                             0.5 * jnp.sum((outputs - targets) ** 2, -1), rtol=1e-12)


@pytest.mark.parametrize("name", list(LOSSES))
def test_sampled_sqrt_is_unbiased(name):
  """E[S~ S~'] = H; with M samples the error is O(1/sqrt(M)) entrywise."""
  loss = LOSSES[name]
  outputs, targets = _data(name)
  m = 20_000
  s = jax.jit(loss.sqrt_hessian_sampled, static_argnums=3)(
      jax.random.PRNGKey(1), outputs, targets, m)
  assert s.shape == (N, C, m)
  estimate = jnp.einsum("ncm,ndm->ncd", s, s)
  h = explicit_output_hessians(loss, outputs, targets)
  # Each entry is a mean of m products bounded by the largest second moment;
  # 6 standard errors of a variable with variance <= max E[s^4] ~ 3 (Gaussian).
  tol = 6 * np.sqrt(3.0 / m)
  np.testing.assert_allclose(estimate, h, atol=tol)
  assert float(jnp.max(jnp.abs(estimate - h))) > 0  # really sampled


@pytest.mark.parametrize("name", list(LOSSES))
def test_plain_callable_falls_back_to_autodiff(name):
  loss = LOSSES[name]
  wrapped = curvax.losses.as_loss(lambda o, t: loss(o, t))
  assert isinstance(wrapped, curvax.losses.AutodiffLoss)
  outputs, targets = _data(name)
  u = jax.random.normal(jax.random.PRNGKey(4), (N, C))
  np.testing.assert_allclose(wrapped(outputs, targets), loss(outputs, targets), rtol=1e-12)
  np.testing.assert_allclose(wrapped.grad(outputs, targets), loss.grad(outputs, targets), rtol=1e-10, atol=1e-12)
  np.testing.assert_allclose(wrapped.hvp(outputs, targets, u), loss.hvp(outputs, targets, u), rtol=1e-10, atol=1e-12)
  np.testing.assert_allclose(wrapped.hessian(outputs, targets), loss.hessian(outputs, targets), rtol=1e-8, atol=1e-10)
  s = wrapped.sqrt_hessian_sampled(jax.random.PRNGKey(0), outputs, targets, 4)
  assert s.shape == (N, C, 4)


def test_losses_are_hashable_static_args():
  for loss in LOSSES.values():
    hash(loss)
  assert curvax.losses.softmax_cross_entropy == curvax.losses.SoftmaxCrossEntropy()


@pytest.mark.parametrize("name,outputs_shape,targets,match", [
    ("softmax_cross_entropy", (N, C), jnp.zeros((N, C), jnp.int32), "integer labels"),
    ("softmax_cross_entropy", (N, C), jnp.zeros((N + 1,), jnp.int32), "integer labels"),
    ("softmax_cross_entropy", (N, C, 2), jnp.zeros((N,), jnp.int32), r"shape \(N, C\)"),
    ("sigmoid_binary_cross_entropy", (N, C), jnp.zeros((N,)), "shape of the outputs"),
    ("mean_squared_error", (N, C), jnp.zeros((N, C + 1)), "shape of the outputs"),
])
def test_unsupported_target_shapes_raise(name, outputs_shape, targets, match):
  with pytest.raises(ValueError, match=match):
    LOSSES[name](jnp.zeros(outputs_shape), targets)


def test_non_loss_is_rejected():
  with pytest.raises(TypeError, match="curvax.losses.Loss"):
    curvax.losses.as_loss("cross_entropy")


def test_objective_is_batch_mean():
  loss = curvax.losses.mean_squared_error
  apply_fn = lambda p, x: x * p
  fn = curvax.losses.objective(apply_fn, loss)
  x = jnp.arange(6.0).reshape(3, 2)
  y = jnp.ones((3, 2))
  np.testing.assert_allclose(fn(2.0, (x, y)), jnp.mean(0.5 * jnp.sum((2 * x - y) ** 2, -1)))
  with pytest.raises(TypeError, match=r"\(inputs, targets\)"):
    fn(2.0, {"x": x})


@pytest.mark.parametrize("dominant", [0, C - 1])
def test_softmax_root_is_exact_when_one_class_takes_all_the_mass(dominant):
  # p_c -> 1 for the class the Householder reflection pivots on (the last) or
  # another: the (C - 1)-column root stays exact in float32 (no 0 / 0).
  outputs = jnp.zeros((2, C), jnp.float32).at[:, dominant].set(jnp.array([30.0, 8.0]))
  labels = jnp.array([1, dominant])
  loss = curvax.losses.softmax_cross_entropy
  s = loss.sqrt_hessian(outputs, labels)
  p = jax.nn.softmax(outputs.astype(jnp.float64))
  h = jax.vmap(jnp.diag)(p) - p[:, :, None] * p[:, None, :]
  assert s.shape == (2, C, C - 1) and bool(jnp.all(jnp.isfinite(s)))
  np.testing.assert_allclose(jnp.einsum("nck,ndk->ncd", s, s), h, atol=1e-6)
