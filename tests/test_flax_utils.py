"""(apply_fn, params) from Flax Linen and NNX models; curvature through them."""

import chex
import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from flax import nnx
from jax.flatten_util import ravel_pytree

import curvax
from curvax import flax_utils
from reference import explicit_ggn, explicit_per_example_grads_jacrev, flat

F64 = jnp.float64


class _LinenWithConstants(nn.Module):
  """An MLP whose input shift lives in a non-params collection (closed over)."""

  @nn.compact
  def __call__(self, x, scale=1.0):
    shift = self.variable("constants", "shift", lambda: jnp.full((4,), 0.5, F64))
    x = jnp.tanh(nn.Dense(5, param_dtype=F64)(x - shift.value))
    return scale * nn.Dense(3, param_dtype=F64)(x)


class _NNXMLP(nnx.Module):
  def __init__(self, rngs):
    self.l1 = nnx.Linear(4, 5, param_dtype=F64, rngs=rngs)
    self.l2 = nnx.Linear(5, 3, param_dtype=F64, rngs=rngs)

  def __call__(self, x):
    return self.l2(jnp.tanh(self.l1(x)))


class _NNXWithBatchNorm(nnx.Module):
  def __init__(self, rngs):
    self.l1 = nnx.Linear(4, 3, rngs=rngs)
    self.bn = nnx.BatchNorm(3, use_running_average=True, rngs=rngs)

  def __call__(self, x):
    return self.bn(self.l1(x))


def _data():
  x = jax.random.normal(jax.random.PRNGKey(0), (6, 4), F64)
  y = jax.random.randint(jax.random.PRNGKey(1), (6,), 0, 3)
  return x, y


def _from(kind):
  x, _ = _data()
  if kind == "linen":
    module = _LinenWithConstants()
    variables = module.init(jax.random.PRNGKey(2), x)
    return flax_utils.from_linen(module, variables, apply_kwargs={"scale": 2.0})
  return flax_utils.from_nnx(_NNXMLP(nnx.Rngs(2)))


@pytest.mark.parametrize("kind", ["linen", "nnx"])
def test_curvature_through_flax_models(kind):
  apply_fn, params = _from(kind)
  batch = _data()
  loss = curvax.losses.softmax_cross_entropy
  g = jax.jit(explicit_ggn, static_argnums=(0, 1))(apply_fn, loss, params, batch)
  grads = explicit_per_example_grads_jacrev(apply_fn, loss, params, batch)
  v = jax.tree_util.tree_map(lambda a: jnp.cos(jnp.arange(a.size, dtype=F64)).reshape(a.shape),
                             params)

  @jax.jit
  def run(params, batch, v):
    gv = curvax.curvature.ggn_matvec(apply_fn, loss, params, batch)(v)
    stats = curvax.curvature.per_example_statistics(apply_fn, loss, params, batch)
    return gv, stats

  gv, stats = run(params, batch, v)
  np.testing.assert_allclose(flat(gv), g @ flat(v), rtol=1e-9, atol=1e-12)
  np.testing.assert_allclose(flat(stats.second_moment), np.mean(grads ** 2, 0), rtol=1e-9, atol=1e-12)
  np.testing.assert_allclose(stats.gradient_norms, np.linalg.norm(grads, axis=1), rtol=1e-9)
  # The wrapper is the model: same outputs as calling it directly.
  x = batch[0]
  if kind == "linen":
    assert np.abs(apply_fn(params, x) - apply_fn(params, x + 0.5)).max() > 0  # shift is used
    np.testing.assert_allclose(
        apply_fn(params, x),
        _LinenWithConstants().apply({"params": params, **apply_fn.collections}, x, scale=2.0))


def test_nnx_update_writes_parameters_back():
  model = _NNXMLP(nnx.Rngs(0))
  apply_fn, params = flax_utils.from_nnx(model)
  x, _ = _data()
  new = jax.tree_util.tree_map(lambda a: 2 * a, params)
  out = apply_fn(new, x)
  assert np.abs(out - model(x)).max() > 1e-6
  flax_utils.nnx_update(model, new)
  np.testing.assert_allclose(model(x), out)


def test_errors():
  with pytest.raises(TypeError, match="linen"):
    flax_utils.from_linen(_NNXMLP(nnx.Rngs(0)), {})
  with pytest.raises(ValueError, match="params"):
    flax_utils.from_linen(_LinenWithConstants(), {"constants": {}})
  with pytest.raises(TypeError, match="nnx"):
    flax_utils.from_nnx(_LinenWithConstants())
  apply_fn, params = flax_utils.from_nnx(_NNXWithBatchNorm(nnx.Rngs(0)))
  batch = (jnp.ones((3, 4)), jnp.zeros((3,), jnp.int32))
  loss = curvax.losses.softmax_cross_entropy
  curvax.curvature.ggn_matvec(apply_fn, loss, params, batch)(params)  # fine
  with pytest.raises(ValueError, match="batch norm"):
    curvax.curvature.per_example_statistics(apply_fn, loss, params, batch)


class _LinenEvalBatchNorm(nn.Module):
  @nn.compact
  def __call__(self, x, train: bool):
    h = nn.BatchNorm(use_running_average=not train, param_dtype=F64)(
        nn.Dense(5, param_dtype=F64)(x))
    return nn.Dense(3, param_dtype=F64)(jnp.tanh(h))


class _NNXEvalBatchNorm(nnx.Module):
  def __init__(self, rngs):
    self.l1 = nnx.Linear(4, 5, param_dtype=F64, rngs=rngs)
    self.bn = nnx.BatchNorm(5, param_dtype=F64, rngs=rngs)
    self.l2 = nnx.Linear(5, 3, param_dtype=F64, rngs=rngs)

  def __call__(self, x):
    return self.l2(jnp.tanh(self.bn(self.l1(x))))


def _random_tree(tree, seed, positive=False):
  leaves, treedef = jax.tree_util.tree_flatten(tree)
  keys = jax.random.split(jax.random.PRNGKey(seed), len(leaves))
  new = [jax.random.uniform(k, l.shape, F64, 0.5, 2.0) if positive
         else jax.random.normal(k, l.shape, F64) for k, l in zip(keys, leaves)]
  return jax.tree_util.tree_unflatten(treedef, new)


@pytest.mark.parametrize("kind", ["linen", "nnx"])
def test_constant_batch_stats_allows_per_example_quantities(kind):
  """Batch norm in inference mode (running averages): refused by default with a
  message naming the option; with ``constant_batch_stats=True`` per-example
  statistics and the diagonal GGN equal explicit float64 references (the
  Jacobian of the loss vector over the whole batch, which would show any
  coupling of the examples)."""
  x, y = _data()
  batch = (x, y)
  loss = curvax.losses.softmax_cross_entropy
  if kind == "linen":
    module = _LinenEvalBatchNorm()
    variables = dict(module.init(jax.random.PRNGKey(2), x, train=False))
    stats = variables["batch_stats"]["BatchNorm_0"]
    variables["batch_stats"] = {"BatchNorm_0": {
        "mean": _random_tree(stats["mean"], 3), "var": _random_tree(stats["var"], 4, True)}}
    variables["params"] = _random_tree(variables["params"], 5)
    make = lambda **kw: flax_utils.from_linen(module, variables, {"train": False}, **kw)
  else:
    model = _NNXEvalBatchNorm(nnx.Rngs(2))
    model.bn.mean = nnx.BatchStat(_random_tree(jnp.zeros(5, F64), 3))
    model.bn.var = nnx.BatchStat(_random_tree(jnp.zeros(5, F64), 4, True))
    with pytest.raises(ValueError, match="eval"):
      flax_utils.from_nnx(model, constant_batch_stats=True)   # still in training mode
    model.eval()
    make = lambda **kw: flax_utils.from_nnx(model, **kw)
  refused, params = make()
  with pytest.raises(ValueError, match="constant_batch_stats=True"):
    curvax.curvature.per_example_statistics(refused, loss, params, batch)
  with pytest.raises(ValueError, match="constant_batch_stats=True"):
    curvax.curvature.diag_ggn(refused, loss, params, batch)
  apply_fn, params = make(constant_batch_stats=True)
  grads = explicit_per_example_grads_jacrev(apply_fn, loss, params, batch)
  ggn = explicit_ggn(apply_fn, loss, params, batch)
  got = curvax.curvature.per_example_statistics(apply_fn, loss, params, batch)
  diag = curvax.curvature.diag_ggn(apply_fn, loss, params, batch)
  np.testing.assert_allclose(flat(got.mean_gradient), grads.mean(0), rtol=1e-9, atol=1e-12)
  np.testing.assert_allclose(flat(got.second_moment), np.mean(grads ** 2, 0), rtol=1e-9,
                             atol=1e-12)
  np.testing.assert_allclose(got.gradient_norms, np.linalg.norm(grads, axis=1), rtol=1e-9)
  np.testing.assert_allclose(flat(diag), np.diag(ggn), rtol=1e-9, atol=1e-12)
  if kind == "linen":
    with pytest.raises(ValueError, match="mutable"):
      flax_utils.from_linen(module, variables, {"train": False, "mutable": ["batch_stats"]},
                            constant_batch_stats=True)


def test_nnx_optimizer_forwards_batch_and_eval_batch_to_curvax_transforms():
  """nnx.Optimizer.update(model, grads, **kwargs) passes batch=/eval_batch= on
  to tx.update: the NNX model moves exactly as the functional update says."""
  model = _NNXMLP(nnx.Rngs(0))
  apply_fn, params = curvax.flax_utils.from_nnx(model)
  loss = curvax.losses.softmax_cross_entropy
  loss_fn = curvax.losses.objective(apply_fn, loss)
  x = jax.random.normal(jax.random.PRNGKey(1), (16, 4), F64)
  y = jnp.arange(16) % 3
  batch, eval_batch = (x[:8], y[:8]), (x[8:], y[8:])
  tx = curvax.transforms.hessian_free(apply_fn, loss)
  grads = jax.grad(loss_fn)(params, batch)
  updates, _ = tx.update(grads, tx.init(params), params, batch=batch, eval_batch=eval_batch)
  expected = optax.apply_updates(params, updates)

  optimizer = nnx.Optimizer(model, tx, wrt=nnx.Param)
  nnx_grads = nnx.grad(lambda m: jnp.mean(loss(m(batch[0]), batch[1])))(model)
  optimizer.update(model, nnx_grads, batch=batch, eval_batch=eval_batch)
  _, moved = curvax.flax_utils.from_nnx(model)
  chex.assert_trees_all_close(moved, expected, rtol=1e-10)


class _NNXTrainBatchNorm(nnx.Module):
  """Batch norm in training mode: batch statistics, running averages updated."""

  def __init__(self, rngs):
    self.l1 = nnx.Linear(4, 5, param_dtype=F64, rngs=rngs)
    self.bn = nnx.BatchNorm(5, dtype=F64, param_dtype=F64, rngs=rngs)
    self.bn.mean = nnx.BatchStat(jnp.zeros(5, F64))   # float32 by default
    self.bn.var = nnx.BatchStat(jnp.ones(5, F64))
    self.l2 = nnx.Linear(5, 3, param_dtype=F64, rngs=rngs)

  def __call__(self, x):
    return self.l2(jnp.tanh(self.bn(self.l1(x))))


class _NNXDropout(nnx.Module):
  """Dropout with its own RNG stream (advanced by every call of the model)."""

  def __init__(self, rngs):
    self.l1 = nnx.Linear(4, 5, param_dtype=F64, rngs=rngs)
    self.drop = nnx.Dropout(0.5, rngs=rngs)
    self.l2 = nnx.Linear(5, 3, param_dtype=F64, rngs=rngs)

  def __call__(self, x):
    return self.l2(self.drop(jnp.tanh(self.l1(x))))


def _eval_copy(model):
  model = nnx.clone(model)
  model.eval()
  return model


def _non_param_state(model):
  unkey = lambda a: (jax.random.key_data(a) if jnp.issubdtype(a.dtype, jax.dtypes.prng_key)
                     else a)
  return jax.tree_util.tree_map(lambda a: np.array(unkey(a)),
                                nnx.state(model, nnx.Not(nnx.Param)))


@pytest.mark.parametrize("cls", [_NNXTrainBatchNorm, _NNXDropout])
def test_nnx_apply_fn_leaves_model_state_alone(cls):
  """from_nnx's apply_fn is pure for models that write state when called
  (training-mode batch norm, dropout's RNG count): the user's model is not
  modified by calls, jit, grad or GGN products through it; every call gives
  the same output; and all of it equals a reference that rebuilds the model
  from an untouched clone on each call."""
  model = cls(nnx.Rngs(0))
  pristine = nnx.clone(model)
  before = _non_param_state(model)
  apply_fn, params = flax_utils.from_nnx(model)
  x, y = _data()
  batch = (x, y)
  loss = curvax.losses.softmax_cross_entropy

  def reference(p, x):
    m = nnx.clone(pristine)
    nnx.update(m, p)
    return m(x)

  expected = reference(params, x)
  np.testing.assert_allclose(apply_fn(params, x), expected, rtol=1e-12)
  np.testing.assert_allclose(apply_fn(params, x), expected, rtol=1e-12)  # same again
  np.testing.assert_allclose(jax.jit(apply_fn)(params, x), expected, rtol=1e-12)
  objective = curvax.losses.objective(apply_fn, loss)
  chex.assert_trees_all_close(
      jax.grad(objective)(params, batch),
      jax.grad(curvax.losses.objective(reference, loss))(params, batch), rtol=1e-10)
  v = _random_tree(params, 7)
  gv = jax.jit(lambda p, b, v: curvax.curvature.ggn_matvec(apply_fn, loss, p, b)(v))(
      params, batch, v)
  ggn = explicit_ggn(reference, loss, params, batch)
  np.testing.assert_allclose(flat(gv), ggn @ flat(v), rtol=1e-9, atol=1e-12)
  chex.assert_trees_all_equal(_non_param_state(model), before)
  chex.assert_trees_all_equal(_non_param_state(pristine), before)
  if cls is _NNXDropout:
    assert np.abs(expected - _eval_copy(model)(x)).max() > 1e-6   # dropout is on
    # Fresh masks: advance the model's RNG (calling it does) and call from_nnx again.
    model(x)
    fresh, _ = flax_utils.from_nnx(model)
    assert np.abs(fresh(params, x) - expected).max() > 1e-6
  else:
    # Training mode: each batch's statistics, not the (initial) running averages.
    assert np.abs(expected - _eval_copy(model)(x)).max() > 1e-6
    model(x)   # updates the model's running averages
  # apply_fn holds the state from_nnx saw, whatever the model does afterwards.
  assert any(not np.array_equal(a, b) for a, b in zip(
      jax.tree_util.tree_leaves(_non_param_state(model)), jax.tree_util.tree_leaves(before)))
  np.testing.assert_allclose(apply_fn(params, x), expected, rtol=1e-12)


def test_linen_mutable_batch_stats_gives_outputs_with_batch_statistics():
  """from_linen with apply_kwargs {'train': True, 'mutable': [...]} (batch norm
  in training mode): apply_fn returns the outputs alone (Flax's apply returns
  (outputs, updated state)), so objective, GGN and Hessian products work and
  equal a hand-written batch norm with each batch's statistics; the running
  averages are not used and stay unchanged; per-example quantities are refused."""
  x, y = _data()
  batch = (x, y)
  loss = curvax.losses.softmax_cross_entropy
  module = _LinenEvalBatchNorm()
  variables = dict(module.init(jax.random.PRNGKey(2), x, train=False))
  variables["params"] = _random_tree(variables["params"], 5)
  stats = variables["batch_stats"]["BatchNorm_0"]
  variables["batch_stats"] = {"BatchNorm_0": {
      "mean": _random_tree(stats["mean"], 3), "var": _random_tree(stats["var"], 4, True)}}
  saved = jax.tree_util.tree_map(np.array, variables["batch_stats"])
  apply_fn, params = flax_utils.from_linen(
      module, variables, {"train": True, "mutable": ["batch_stats"]})

  def reference(p, x):
    h = x @ p["Dense_0"]["kernel"] + p["Dense_0"]["bias"]
    mean = h.mean(0)
    var = (h ** 2).mean(0) - mean ** 2
    h = (h - mean) / jnp.sqrt(var + 1e-5) * p["BatchNorm_0"]["scale"] + p["BatchNorm_0"]["bias"]
    return jnp.tanh(h) @ p["Dense_1"]["kernel"] + p["Dense_1"]["bias"]

  out = apply_fn(params, x)
  assert isinstance(out, jax.Array)
  np.testing.assert_allclose(out, reference(params, x), rtol=1e-10, atol=1e-12)
  objective = curvax.losses.objective(apply_fn, loss)
  np.testing.assert_allclose(objective(params, batch),
                             curvax.losses.objective(reference, loss)(params, batch), rtol=1e-12)
  v = _random_tree(params, 7)
  gv = jax.jit(lambda p, b, v: curvax.curvature.ggn_matvec(apply_fn, loss, p, b)(v))(
      params, batch, v)
  np.testing.assert_allclose(flat(gv), explicit_ggn(reference, loss, params, batch) @ flat(v),
                             rtol=1e-9, atol=1e-12)
  hv = curvax.curvature.hessian_matvec(objective, params, batch)(v)
  hessian = jax.hessian(lambda w: curvax.losses.objective(reference, loss)(
      ravel_pytree(params)[1](w), batch))(flat(params))
  np.testing.assert_allclose(flat(hv), hessian @ flat(v), rtol=1e-8, atol=1e-10)
  chex.assert_trees_all_equal(jax.tree_util.tree_map(np.array, variables["batch_stats"]), saved)
  with pytest.raises(ValueError, match="batch norm"):
    curvax.curvature.per_example_statistics(apply_fn, loss, params, batch)


def test_from_nnx_params_are_a_snapshot_that_nnx_optimizer_does_not_move():
  # nnx.split hands out the model's own Variables; nnx.Optimizer.update rebinds
  # their values in place. from_nnx's params must keep the values of the call.
  model = nnx.Linear(3, 2, rngs=nnx.Rngs(0))
  apply_fn, params = flax_utils.from_nnx(model)
  before = jax.tree.map(np.array, jax.tree.leaves(params))
  opt = nnx.Optimizer(model, optax.sgd(0.5), wrt=nnx.Param)
  x = jnp.ones((4, 3))
  opt.update(model, nnx.grad(lambda m: jnp.sum(m(x) ** 2))(model))
  after_model = jax.tree.leaves(nnx.state(model, nnx.Param))
  assert any(not np.allclose(a, b) for a, b in zip(after_model, before))
  chex.assert_trees_all_equal(jax.tree.leaves(params), before)
  np.testing.assert_allclose(apply_fn(params, x), x @ before[1] + before[0])


def test_from_nnx_wrt_freezes_the_parameters_it_leaves_out():
  # The trainable subset (l2) is params; l1 is a constant of apply_fn. The GGN
  # in the subset is the principal block of the whole GGN, and nnx.Optimizer
  # with the same filter moves l2 by hessian_free's step and leaves l1 alone.
  model = _NNXMLP(nnx.Rngs(0))
  wrt = nnx.All(nnx.Param, nnx.PathContains("l2"))
  apply_fn, params = curvax.flax_utils.from_nnx(model, wrt=wrt)
  full_apply, full = curvax.flax_utils.from_nnx(model)
  assert set(params) == {"l2"}
  loss = curvax.losses.softmax_cross_entropy
  x = jax.random.normal(jax.random.PRNGKey(1), (16, 4), F64)
  y = jnp.arange(16) % 3
  batch, eval_batch = (x[:8], y[:8]), (x[8:], y[8:])
  np.testing.assert_allclose(apply_fn(params, x), model(x), rtol=1e-12)
  g_full = np.asarray(explicit_ggn(full_apply, loss, full, batch))
  n_l1 = sum(a.size for a in jax.tree.leaves(full["l1"]))
  vec, unravel = ravel_pytree(params)
  got = np.stack([ravel_pytree(curvax.curvature.ggn_matvec(apply_fn, loss, params, batch)(
      unravel(e)))[0] for e in np.eye(vec.size)])
  # ravel order: the full params' leaves are l1's then l2's, in the same order.
  np.testing.assert_allclose(got, g_full[n_l1:, n_l1:], rtol=1e-10, atol=1e-14)

  tx = curvax.transforms.hessian_free(apply_fn, loss)
  grads = jax.grad(curvax.losses.objective(apply_fn, loss))(params, batch)
  updates, _ = tx.update(grads, tx.init(params), params, batch=batch, eval_batch=eval_batch)
  expected = optax.apply_updates(params, updates)
  l1_before = jax.tree.map(np.array, full["l1"])
  optimizer = nnx.Optimizer(model, tx, wrt=wrt)
  nnx_grads = nnx.grad(lambda m: jnp.mean(loss(m(batch[0]), batch[1])), argnums=nnx.DiffState(0, wrt))(model)
  optimizer.update(model, nnx_grads, batch=batch, eval_batch=eval_batch)
  _, moved = curvax.flax_utils.from_nnx(model)
  chex.assert_trees_all_close(moved["l2"], expected["l2"], rtol=1e-10)
  chex.assert_trees_all_equal(jax.tree.map(np.array, moved["l1"]), l1_before)
  with pytest.raises(ValueError, match="selects no variables"):
    curvax.flax_utils.from_nnx(model, wrt=nnx.PathContains("nothing"))


@pytest.mark.parametrize("make", [
    lambda a, l, lf: curvax.transforms.hessian_free(a, l),
    lambda a, l, lf: curvax.transforms.curvature_step_size(optax.sgd(0.1), a, l),
    lambda a, l, lf: curvax.transforms.probabilistic_preconditioning(lf),
    lambda a, l, lf: curvax.diagnostics.monitor(optax.sgd(0.1), a, l),
])
@pytest.mark.parametrize("wrap", ["masked", "multi_transform"])
def test_masked_wrappers_are_refused_with_a_pointer_to_wrt(make, wrap):
  params = {"l1": {"w": jnp.ones((4, 5)), "b": jnp.zeros(5)}, "l2": {"w": jnp.ones((5, 3))}}
  apply_fn = lambda p, x: jnp.tanh(x @ p["l1"]["w"] + p["l1"]["b"]) @ p["l2"]["w"]  # noqa: E731
  loss = curvax.losses.softmax_cross_entropy
  tx = make(apply_fn, loss, curvax.losses.objective(apply_fn, loss))
  labels = {"l1": {"w": False, "b": False}, "l2": {"w": True}}
  if wrap == "masked":
    opt = optax.masked(tx, labels)
  else:
    opt = optax.multi_transform({True: tx, False: optax.set_to_zero()}, labels)
  with pytest.raises(TypeError, match=r"MaskedNode at .*l1.*wrt="):
    opt.init(params)


@pytest.mark.parametrize("make", [
    lambda a, l, lf: curvax.transforms.hessian_free(a, l),
    lambda a, l, lf: curvax.transforms.curvature_step_size(optax.sgd(0.1), a, l),
    lambda a, l, lf: curvax.transforms.probabilistic_preconditioning(lf),
    lambda a, l, lf: curvax.diagnostics.monitor(optax.sgd(0.1), a, l),
])
@pytest.mark.parametrize("leaf", [jnp.asarray(3), np.asarray([True, False]), 2])
def test_non_floating_params_leaves_are_refused_by_name(make, leaf):
  # Without the check: a float0 tangent error from deep inside jvp.
  params = {"w": jnp.ones((4, 3)), "count": leaf}
  apply_fn = lambda p, x: x @ p["w"]  # noqa: E731
  loss = curvax.losses.softmax_cross_entropy
  tx = make(apply_fn, loss, curvax.losses.objective(apply_fn, loss))
  with pytest.raises(TypeError, match=r"\['count'\] \((int|bool)"):
    tx.init(params)
  tx.init({"w": jnp.ones((4, 3)), "scale": 2.0})  # a Python float is fine


def test_per_example_quantities_are_refused_while_nnx_dropout_is_active():
  # One example at a time, each call draws masks of its own shape: the
  # per-example losses would not be the batch's. Eval mode is fine.
  model = _NNXDropout(nnx.Rngs(0))
  apply_fn, params = flax_utils.from_nnx(model)
  x, y = _data()
  loss = curvax.losses.softmax_cross_entropy
  with pytest.raises(ValueError, match=r"dropout in training mode \(\['drop'\]\)"):
    curvax.curvature.per_example_statistics(apply_fn, loss, params, (x, y))
  curvax.curvature.ggn_matvec(apply_fn, loss, params, (x, y))(params)   # batch products: fine
  model.eval()
  apply_fn, params = flax_utils.from_nnx(model)
  stats = curvax.curvature.per_example_statistics(apply_fn, loss, params, (x, y))
  np.testing.assert_allclose(stats.losses, loss(model(x), y), rtol=1e-12)


# ---------------------------------------------------------------------------
# The wrappers are pytrees: ordinary (traced) arguments of jitted functions.


def _traced_call():
  """``f(apply_fn, params, x) = apply_fn(params, x)`` under ``jit`` (apply_fn not
  static) and the list its traces append to (one entry per compilation)."""
  traces = []

  @jax.jit
  def f(apply_fn, params, x):
    traces.append(1)
    return apply_fn(params, x)

  return f, traces


def _eval_batch_norm_wrapper(kind, seed):
  """``(apply_fn, params, expected outputs on _data()'s inputs)`` for batch norm in
  inference mode whose running averages are drawn from ``seed``; the expected
  outputs come from the model itself (``module.apply`` / the NNX model)."""
  x, _ = _data()
  mean = _random_tree(jnp.zeros(5, F64), seed)
  var = _random_tree(jnp.zeros(5, F64), seed + 1, True)
  if kind == "linen":
    module = _LinenEvalBatchNorm()
    params = _random_tree(module.init(jax.random.PRNGKey(2), x, train=False)["params"], 5)
    variables = {"params": params, "batch_stats": {"BatchNorm_0": {"mean": mean, "var": var}}}
    apply_fn, params = flax_utils.from_linen(module, variables, {"train": False},
                                             constant_batch_stats=True)
    return apply_fn, params, module.apply(variables, x, train=False)
  model = _NNXEvalBatchNorm(nnx.Rngs(2))
  model.bn.mean = nnx.BatchStat(mean)
  model.bn.var = nnx.BatchStat(var)
  model.eval()
  apply_fn, params = flax_utils.from_nnx(model, constant_batch_stats=True)
  return apply_fn, params, model(x)


@pytest.mark.parametrize("kind", ["linen", "nnx"])
def test_rebuilt_wrapper_with_new_batch_stats_does_not_recompile(kind):
  """Batch norm in inference mode, wrapper rebuilt with other running averages
  (same shapes) and passed to a jitted function as an ordinary argument: each
  call gives its own model's outputs (the statistics are traced, not baked in
  at the first trace), and the function is compiled once."""
  x, _ = _data()
  f, traces = _traced_call()
  outputs = []
  for seed in (3, 7):
    apply_fn, params, expected = _eval_batch_norm_wrapper(kind, seed)
    outputs.append(f(apply_fn, params, x))
    np.testing.assert_allclose(outputs[-1], expected, rtol=1e-12, atol=1e-12)
  assert np.abs(outputs[0] - outputs[1]).max() > 1e-3   # the statistics matter
  assert len(traces) == 1


def test_linen_list_valued_kwargs_survive_flatten_and_jit():
  """``mutable=['batch_stats']`` (a list, unhashable) in the static part: the
  round trip through flatten/unflatten and a jitted call give the outputs of
  ``module.apply(..., mutable=['batch_stats'])[0]``; wrappers rebuilt with a
  new list have the same tree structure and share the compilation."""
  x, _ = _data()
  module = _LinenEvalBatchNorm()
  variables = dict(module.init(jax.random.PRNGKey(2), x, train=False))
  variables["params"] = _random_tree(variables["params"], 5)
  expected = module.apply(variables, x, train=True, mutable=["batch_stats"])[0]
  make = lambda: flax_utils.from_linen(  # noqa: E731
      module, variables, {"train": True, "mutable": ["batch_stats"]})
  apply_fn, params = make()
  leaves, treedef = jax.tree_util.tree_flatten(apply_fn)
  again = jax.tree_util.tree_unflatten(treedef, leaves)
  assert again.kwargs == {"train": True, "mutable": ["batch_stats"]}
  assert again.per_example_unsupported == apply_fn.per_example_unsupported is not None
  np.testing.assert_allclose(again(params, x), expected, rtol=1e-12)
  assert jax.tree_util.tree_structure(make()[0]) == treedef
  f, traces = _traced_call()
  np.testing.assert_allclose(f(apply_fn, params, x), expected, rtol=1e-12)
  np.testing.assert_allclose(f(make()[0], params, x), expected, rtol=1e-12)
  assert len(traces) == 1


class _LinenListAttribute(nn.Module):
  """A list attribute makes the module unhashable (Flax hashes its fields)."""
  features: list

  @nn.compact
  def __call__(self, x, train: bool):
    h = nn.BatchNorm(use_running_average=not train, param_dtype=F64)(
        nn.Dense(self.features[0], param_dtype=F64)(x))
    return nn.Dense(3, param_dtype=F64)(h)


def test_unhashable_static_parts_compare_by_identity():
  """A module or keyword value that cannot be hashed (a list attribute; a set
  for ``mutable``, which Flax accepts) is static by identity: the wrapper works
  under jit, rebuilding it with the same objects reuses the compilation, and
  new objects compile again (never a stale trace)."""
  x, _ = _data()
  module = _LinenListAttribute([5])
  with pytest.raises(TypeError):
    hash(module)
  variables = module.init(jax.random.PRNGKey(2), x, train=False)
  mutable = {"batch_stats"}
  expected = module.apply(variables, x, train=True, mutable=["batch_stats"])[0]
  f, traces = _traced_call()
  for m, s in [(module, mutable), (module, mutable), (_LinenListAttribute([5]), mutable),
               (module, {"batch_stats"})]:
    apply_fn, params = flax_utils.from_linen(m, variables, {"train": True, "mutable": s})
    np.testing.assert_allclose(f(apply_fn, params, x), expected, rtol=1e-12)
  assert len(traces) == 3


class _LinenDropout(nn.Module):
  @nn.compact
  def __call__(self, x):
    h = nn.Dropout(0.5, deterministic=False)(nn.Dense(5, param_dtype=F64)(x))
    return nn.Dense(3, param_dtype=F64)(h)


def test_array_keywords_are_leaves():
  """Arrays among the keywords (``rngs`` keys) are leaves after the
  collections', with their paths in the keywords: a new key traces through the
  same compilation and gives ``module.apply`` with that key."""
  x, _ = _data()
  module = _LinenDropout()
  variables = module.init(jax.random.PRNGKey(2), x)
  f, traces = _traced_call()
  outputs = []
  for seed in (0, 1):
    key = jax.random.PRNGKey(seed)
    apply_fn, params = flax_utils.from_linen(module, variables, {"rngs": {"dropout": key}})
    leaves = jax.tree_util.tree_leaves_with_path(apply_fn)
    assert len(leaves) == 1 and leaves[0][1] is key
    assert jax.tree_util.keystr(leaves[0][0]) == ".kwargs['rngs']['dropout']"
    outputs.append(f(apply_fn, params, x))
    np.testing.assert_allclose(outputs[-1],
                               module.apply(variables, x, rngs={"dropout": key}), rtol=1e-12)
  assert np.abs(outputs[0] - outputs[1]).max() > 1e-6   # the keys matter
  assert len(traces) == 1


@pytest.mark.parametrize("kind", ["linen", "linen_params_only", "nnx_batch_norm", "nnx"])
def test_wrapper_leaves_round_trip_and_jitted_curvature(kind):
  """The leaves are exactly the constant state (none without it); flatten and
  unflatten give a wrapper with the same outputs; a GGN product and per-example
  statistics in a jitted function taking ``apply_fn`` as an argument equal the
  unjitted ones."""
  x, y = _data()
  batch = (x, y)
  loss = curvax.losses.softmax_cross_entropy
  if kind.startswith("linen"):
    module = _LinenWithConstants() if kind == "linen" else nn.Dense(3, param_dtype=F64)
    variables = module.init(jax.random.PRNGKey(2), x)
    apply_fn, params = flax_utils.from_linen(module, variables)
    constants = jax.tree_util.tree_leaves({k: v for k, v in variables.items() if k != "params"})
    assert len(constants) == (1 if kind == "linen" else 0)
    leaves = jax.tree_util.tree_leaves(apply_fn)
    assert len(leaves) == len(constants) and all(a is b for a, b in zip(leaves, constants))
  else:
    model = (_NNXEvalBatchNorm if kind == "nnx_batch_norm" else _NNXMLP)(nnx.Rngs(2))
    model.eval()
    apply_fn, params = flax_utils.from_nnx(model, constant_batch_stats=True)
    constants = jax.tree_util.tree_leaves(nnx.state(model, nnx.Not(nnx.Param)))
    assert len(constants) == (2 if kind == "nnx_batch_norm" else 0)
    leaves = jax.tree_util.tree_leaves(apply_fn)
    assert len(leaves) == len(constants)
    for a, b in zip(leaves, constants):
      np.testing.assert_array_equal(a, b)
  leaves, treedef = jax.tree_util.tree_flatten(apply_fn)
  again = jax.tree_util.tree_unflatten(treedef, leaves)
  assert type(again) is type(apply_fn) and again is not apply_fn
  np.testing.assert_array_equal(again(params, x), apply_fn(params, x))
  v = _random_tree(params, 7)

  def curvature(apply_fn, params, batch, v):
    gv = curvax.curvature.ggn_matvec(apply_fn, loss, params, batch)(v)
    stats = curvax.curvature.per_example_statistics(apply_fn, loss, params, batch)
    return gv, stats.gradient_norms, stats.second_moment

  expected = curvature(apply_fn, params, batch, v)
  got = jax.jit(curvature)(again, params, batch, v)
  chex.assert_trees_all_close(got, expected, rtol=1e-10, atol=1e-13)
