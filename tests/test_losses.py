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


@pytest.mark.parametrize("wrap", [False, True], ids=["closed-form", "autodiff"])
@pytest.mark.parametrize("name", list(LOSSES))
def test_sampled_sqrt_is_unbiased(name, wrap):
  """E[S~ S~'] = H: every entry within 5 of its own estimated standard errors,
  for the closed forms and for the autodiff fallback of a plain callable."""
  loss = LOSSES[name]
  if wrap:
    loss = curvax.losses.as_loss(lambda o, t, loss=loss: loss(o, t))
  outputs, targets = _data(name)
  m = 20_000
  s = jax.jit(loss.sqrt_hessian_sampled, static_argnums=3)(
      jax.random.PRNGKey(1), outputs, targets, m)
  assert s.shape == (N, C, m)
  # The estimate is the mean over the m samples of x = m s_c s_d (s carries
  # 1/sqrt(m)); its standard error is std(x) / sqrt(m), estimated per entry.
  x = m * s[:, :, None, :] * s[:, None, :, :]             # (N, C, C, m)
  estimate = jnp.mean(x, -1)
  np.testing.assert_allclose(estimate, jnp.einsum("ncm,ndm->ncd", s, s), rtol=1e-10, atol=1e-14)
  stderr = jnp.std(x, -1) / np.sqrt(m)
  h = explicit_output_hessians(loss, outputs, targets)
  tol = 5 * stderr + 1e-12
  assert bool(jnp.all(jnp.abs(estimate - h) <= tol)), float(jnp.max(jnp.abs(estimate - h) / tol))
  assert float(jnp.max(jnp.abs(estimate - h))) > 0  # really sampled
  # Power: a root whose E[S~ S~'] were 0.8 H would be caught.
  assert not bool(jnp.all(jnp.abs(0.8 * estimate - h) <= tol))


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
  outputs = jnp.zeros((2, C), jnp.float32).at[:, dominant].set(jnp.array([30.0, 8.0], jnp.float32))
  labels = jnp.array([1, dominant])
  loss = curvax.losses.softmax_cross_entropy
  s = loss.sqrt_hessian(outputs, labels)
  p = jax.nn.softmax(outputs.astype(jnp.float64))
  h = jax.vmap(jnp.diag)(p) - p[:, :, None] * p[:, None, :]
  assert s.shape == (2, C, C - 1) and bool(jnp.all(jnp.isfinite(s)))
  np.testing.assert_allclose(jnp.einsum("nck,ndk->ncd", s, s), h, atol=1e-6)


def test_autodiff_loss_conventions_for_a_loss_not_convex_in_the_outputs():
  """hvp applies the true (indefinite) H; S S' and hessian() are [H]_+."""
  def sin_loss(o, t):
    return jnp.sum(jnp.sin(o - t), axis=-1)
  loss = curvax.losses.as_loss(sin_loss)
  outputs, targets = _data("mean_squared_error")
  h = explicit_output_hessians(loss, outputs, targets)
  lam, q = jnp.linalg.eigh(h)
  assert float(jnp.min(lam)) < -0.1 and float(jnp.max(lam)) > 0.1  # indefinite
  h_plus = jnp.einsum("nck,nk,ndk->ncd", q, jnp.maximum(lam, 0.0), q)
  u = jax.random.normal(jax.random.PRNGKey(3), (N, C))
  np.testing.assert_allclose(jax.jit(loss.hvp)(outputs, targets, u),
                             jnp.einsum("ncd,nd->nc", h, u), atol=1e-12)
  np.testing.assert_allclose(loss.hessian(outputs, targets), h_plus, atol=1e-12)
  s = loss.sqrt_hessian(outputs, targets)
  np.testing.assert_allclose(jnp.einsum("nck,ndk->ncd", s, s), h_plus, atol=1e-12)
  np.testing.assert_allclose(loss.grad(outputs, targets), jnp.cos(outputs - targets), atol=1e-12)


def test_autodiff_hvp_forms_no_output_hessian():
  # O(C) per product: no eigendecomposition and no C x C array in its program
  # (a VAE's 800 outputs made a product take seconds when it had one).
  loss = curvax.losses.as_loss(lambda o, t: jnp.sum((o - t) ** 2, -1))
  c = 50
  o, t = jnp.ones((3, c)), jnp.zeros((3, c))
  jaxpr = jax.make_jaxpr(loss.hvp)(o, t, o)
  eqns = jaxpr.jaxpr.eqns
  assert not any(e.primitive.name == "eigh" for e in eqns)
  assert all(c * c > int(np.prod(v.aval.shape)) for e in eqns for v in e.outvars)


def test_plain_callable_accepts_pytree_targets():
  def weighted(o, t):
    return t["w"] * jnp.sum((o - t["y"]) ** 2, -1)
  loss = curvax.losses.as_loss(weighted)
  outputs = jnp.ones((N, C))
  targets = {"y": jnp.zeros((N, C)), "w": jnp.arange(1.0, N + 1.0)}
  loss.check_targets(outputs, targets)  # agrees: no error
  np.testing.assert_allclose(loss.hvp(outputs, targets, outputs), 2 * targets["w"][:, None] * outputs)
  with pytest.raises(ValueError, match="disagree on the batch size"):
    loss.check_targets(jnp.ones((N + 1, C)), targets)
  with pytest.raises(ValueError, match="disagree on the batch size"):
    loss.check_targets(outputs, dict(targets, w=jnp.ones(N + 1)))
  with pytest.raises(ValueError, match="disagree on the batch size"):
    loss.check_targets(outputs, jnp.zeros((N + 1, C)))


@pytest.mark.parametrize("dtype,classes", [(jnp.int8, 200), (jnp.uint8, 300), (jnp.int16, 40000)])
def test_softmax_narrow_integer_labels_with_many_classes(dtype, classes):
  # The class count does not fit the label dtype: compared or clipped in that
  # dtype it would wrap and make valid labels NaN.
  loss = curvax.losses.softmax_cross_entropy
  outputs = jax.random.normal(jax.random.PRNGKey(0), (3, classes))
  labels = np.array([0, 1, 100], np.int64)
  wide = jnp.asarray(labels, jnp.int32)
  narrow = jnp.asarray(labels, dtype)
  np.testing.assert_allclose(loss(outputs, narrow), loss(outputs, wide), rtol=1e-12)
  np.testing.assert_allclose(loss.grad(outputs, narrow), loss.grad(outputs, wide), rtol=1e-12)
  u = jnp.ones_like(outputs)
  np.testing.assert_allclose(loss.hvp(outputs, narrow, u), loss.hvp(outputs, wide, u),
                             rtol=1e-12)

@pytest.mark.parametrize("bad", [-1, C])
@pytest.mark.parametrize("jit", [False, True])
def test_softmax_out_of_range_labels_give_nan(bad, jit):
  loss = curvax.losses.softmax_cross_entropy
  maybe_jit = jax.jit if jit else (lambda f: f)
  outputs, labels = _data("softmax_cross_entropy")
  labels = labels.at[1].set(bad)
  good = np.arange(N) != 1
  u = jax.random.normal(jax.random.PRNGKey(3), (N, C))

  def autodiff_grad(o, y):
    return jax.vmap(jax.grad(lambda oi, yi: loss(oi[None], yi[None])[0]))(o, y)

  results = {
      "value": maybe_jit(loss)(outputs, labels),
      "grad": maybe_jit(loss.grad)(outputs, labels),
      "autodiff grad": maybe_jit(autodiff_grad)(outputs, labels),
      "hvp": maybe_jit(loss.hvp)(outputs, labels, u),
      "sqrt": maybe_jit(loss.sqrt_hessian)(outputs, labels),
      "sampled": loss.sqrt_hessian_sampled(jax.random.PRNGKey(0), outputs, labels, 3),
  }
  for what, r in results.items():
    assert bool(jnp.all(jnp.isnan(r[1]))), what
    assert bool(jnp.all(jnp.isfinite(r[good]))), what
  # The valid examples are unaffected.
  ok = labels.at[1].set(0)
  np.testing.assert_allclose(results["value"][good], loss(outputs, ok)[good], rtol=1e-14)
  np.testing.assert_allclose(results["grad"][good], loss.grad(outputs, ok)[good], rtol=1e-14)
  np.testing.assert_allclose(results["hvp"][good], loss.hvp(outputs, ok, u)[good], rtol=1e-14)


@pytest.mark.parametrize("mass", [0.3, 2.5])
def test_softmax_unnormalised_soft_targets(mass):
  """Soft targets with mass t = sum_c y_c != 1: gradient t p - y, Hessian
  t (diag p - p p'), all against autodiff of the value -sum_c y_c log p_c."""
  loss = curvax.losses.softmax_cross_entropy
  outputs, targets = _data("softmax_cross_entropy", soft=True)
  targets = mass * targets
  logp = jax.nn.log_softmax(outputs)
  np.testing.assert_allclose(loss(outputs, targets), -jnp.sum(targets * logp, -1), rtol=1e-12)
  auto_grad = jax.vmap(jax.grad(lambda o, t: loss(o[None], t[None])[0]))(outputs, targets)
  np.testing.assert_allclose(loss.grad(outputs, targets), auto_grad, rtol=1e-10, atol=1e-12)
  h = explicit_output_hessians(loss, outputs, targets)
  p = jax.nn.softmax(outputs)
  np.testing.assert_allclose(h, mass * (jax.vmap(jnp.diag)(p) - p[:, :, None] * p[:, None, :]),
                             rtol=1e-10, atol=1e-12)
  u = jax.random.normal(jax.random.PRNGKey(3), (N, C))
  np.testing.assert_allclose(loss.hvp(outputs, targets, u), jnp.einsum("ncd,nd->nc", h, u),
                             rtol=1e-10, atol=1e-12)
  s = loss.sqrt_hessian(outputs, targets)
  np.testing.assert_allclose(jnp.einsum("nck,ndk->ncd", s, s), h, rtol=1e-10, atol=1e-12)
  # The sampled root draws c ~ Cat(p), independent of y: with the same key it
  # is sqrt(t) times the root for the normalised targets.
  key = jax.random.PRNGKey(2)
  np.testing.assert_allclose(loss.sqrt_hessian_sampled(key, outputs, targets, 3),
                             np.sqrt(mass) * loss.sqrt_hessian_sampled(
                                 key, outputs, targets / mass, 3), rtol=1e-12)


def test_plain_callable_must_return_per_example_values():
  # Per-output values (not summed over the outputs) or a batch total.
  per_output = curvax.losses.as_loss(lambda o, t: (o - t) ** 2)
  total = curvax.losses.as_loss(lambda o, t: jnp.sum((o - t) ** 2))
  outputs, targets = _data("mean_squared_error")
  for loss in (per_output, total):
    with pytest.raises(ValueError, match="per-example values of shape"):
      loss(outputs, targets)
  for method in ("grad", "sqrt_hessian"):
    with pytest.raises(ValueError, match="per-example values of shape"):
      getattr(per_output, method)(outputs, targets)
