"""`Problem.apply_fn` (variables layout ``{'params': p}``) takes the per-layer fast path.

Tiny Linen models wrapped exactly as `curvax.problems.get` wraps the DeepOBS
models (`_flax_problem`); per-example statistics and the diagonal GGN on the
fast path against the vmap path and explicit float64 references, in the
``{'params': ...}`` structure; batch norm still refused; ``train=``/``rng=``
keywords unchanged.
"""

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

import curvax
from curvax.curvature import diagonals
from curvax.curvature import flax_layers
from curvax.curvature import per_example as pe
from curvax.layers import PatchConv
from curvax.problems import models
from curvax.problems.problems import _flax_problem, _mnist_pre
from reference import (LOSSES, explicit_ggn, explicit_per_example_grads_jacrev, flat,
                       make_targets)

TOL = dict(rtol=1e-9, atol=1e-12)


class _TinyMLP(nn.Module):
  """Dense layers with dropout (inactive in eval mode), like the DeepOBS models."""

  @nn.compact
  def __call__(self, x, train: bool = False):
    x = x.reshape(x.shape[0], -1)
    x = nn.Dropout(0.5, deterministic=not train)(jnp.tanh(nn.Dense(5)(x)))
    return nn.Dense(3)(x)


class _TinyCNN(nn.Module):

  @nn.compact
  def __call__(self, x, train: bool = False):
    del train
    x = nn.relu(nn.Conv(2, (3, 3), padding="SAME")(x))
    x = x.reshape(x.shape[0], -1)
    return nn.Dense(3)(x)


class _TinyPatchCNN(nn.Module):
  """`curvax.layers.PatchConv` (what the problems use on CPU), strided."""

  @nn.compact
  def __call__(self, x, train: bool = False):
    del train
    x = nn.relu(PatchConv(2, (3, 3), strides=2)(x))
    x = x.reshape(x.shape[0], -1)
    return nn.Dense(3)(x)


class _TinyPatchCNN1d(nn.Module):
  """`PatchConv` on one spatial axis, VALID padding, no bias, then a strided one."""

  @nn.compact
  def __call__(self, x, train: bool = False):
    del train
    x = jnp.tanh(PatchConv(3, (2,), padding="VALID", use_bias=False)(x))
    x = nn.relu(PatchConv(2, (3,), strides=2, padding=((2, 1),))(x))
    x = x.reshape(x.shape[0], -1)
    return nn.Dense(3)(x)


def _tiny_problem(module, x_shape, loss_name, n=5):
  p = _flax_problem("tiny", module, x_shape, LOSSES[loss_name], batch_size=n,
                    num_epochs=1, dataset="mnist", data_dir=None, preprocess=_mnist_pre)
  variables = jax.tree_util.tree_map(lambda a: a.astype(jnp.float64),
                                     p.init(jax.random.PRNGKey(1)))
  params, _ = p.split_variables(variables)
  x = jax.random.normal(jax.random.PRNGKey(0), (n,) + x_shape)
  y = make_targets(jax.random.PRNGKey(2), loss_name, p.apply_fn(params, x))
  return p, params, (x, y)


def _spy(monkeypatch, name):
  used = []
  original = getattr(flax_layers, name)

  def spy(*args, **kwargs):
    result = original(*args, **kwargs)
    used.append(result is not None)
    return result

  monkeypatch.setattr(flax_layers, name, spy)
  return used


@pytest.mark.parametrize("module,x_shape,loss_name", [
    (_TinyMLP(), (4,), "softmax_cross_entropy"),
    (_TinyMLP(), (4,), "mean_squared_error"),
    (_TinyCNN(), (5, 5, 1), "softmax_cross_entropy"),
    (_TinyPatchCNN(), (5, 5, 2), "softmax_cross_entropy"),
    (_TinyPatchCNN1d(), (7, 2), "mean_squared_error"),
])
def test_problem_apply_takes_the_fast_path_with_params_structure(
    module, x_shape, loss_name, monkeypatch):
  p, params, batch = _tiny_problem(module, x_shape, loss_name)
  apply_fn, loss = p.apply_fn, p.loss
  assert isinstance(apply_fn, flax_layers.LinenVariablesApply)
  assert set(params) == {"params"}
  used_stats = _spy(monkeypatch, "layer_statistics")
  used_diag = _spy(monkeypatch, "layer_diag_ggn")

  @jax.jit
  def run(params, batch):
    auto = pe.per_example_statistics(apply_fn, loss, params, batch, return_gradients=True)
    slow = pe.per_example_statistics(apply_fn, loss, params, batch, method="vmap",
                                     return_gradients=True, chunk_size=None)
    diag = diagonals.diag_ggn(apply_fn, loss, params, batch)
    diag_slow = diagonals.diag_ggn(apply_fn, loss, params, batch, method="vmap",
                                   chunk_size=None)
    return auto, slow, diag, diag_slow

  auto, slow, diag, diag_slow = run(params, batch)
  assert used_stats == [True] and used_diag == [True]   # "auto" took the fast path
  structure = jax.tree_util.tree_structure(params)
  for tree in (auto.mean_gradient, auto.second_moment, auto.variance, diag):
    assert jax.tree_util.tree_structure(tree) == structure
  assert jax.tree_util.tree_structure(auto.gradients) == structure
  for a, b in zip(jax.tree_util.tree_leaves(auto), jax.tree_util.tree_leaves(slow)):
    np.testing.assert_allclose(a, b, **TOL)
  np.testing.assert_allclose(flat(diag), flat(diag_slow), **TOL)
  # Explicit float64 references (full Jacobians, no vmap, no layer contractions).
  g = explicit_per_example_grads_jacrev(apply_fn, loss, params, batch)  # (N, P)
  rows = jax.vmap(lambda t: flat(t))(auto.gradients)
  np.testing.assert_allclose(rows, g, **TOL)
  np.testing.assert_allclose(flat(auto.mean_gradient), g.mean(0), **TOL)
  np.testing.assert_allclose(flat(auto.second_moment), np.mean(g ** 2, 0), **TOL)
  np.testing.assert_allclose(auto.gradient_norms, np.linalg.norm(g, axis=1), **TOL)
  np.testing.assert_allclose(flat(diag), np.diag(explicit_ggn(apply_fn, loss, params, batch)),
                             **TOL)


def test_fast_path_on_problem_layout_equals_from_linen():
  p, params, batch = _tiny_problem(_TinyCNN(), (5, 5, 1), "softmax_cross_entropy")
  linen_fn, inner = curvax.flax_utils.from_linen(p.module, params)
  ours = pe.per_example_statistics(p.apply_fn, p.loss, params, batch, method="layers")
  theirs = pe.per_example_statistics(linen_fn, p.loss, inner, batch, method="layers")
  np.testing.assert_allclose(flat(ours.second_moment), flat(theirs.second_moment), **TOL)
  np.testing.assert_allclose(ours.gradient_norms, theirs.gradient_norms, **TOL)


def test_extra_collections_in_the_differentiated_variables_fall_back():
  p, params, batch = _tiny_problem(_TinyMLP(), (4,), "mean_squared_error")
  variables = {**params, "extra": {"c": jnp.ones(2)}}
  with pytest.raises(ValueError, match="other than 'params'"):
    pe.per_example_statistics(p.apply_fn, p.loss, variables, batch, method="layers")
  assert flax_layers._plan(p.apply_fn, variables, batch[0], strict=False) is None


def test_batch_norm_problem_still_refuses_per_example_quantities():
  p = _flax_problem("tiny_wrn", models.WideResNet(3, depth=10, width=1), (8, 8, 3),
                    curvax.losses.softmax_cross_entropy, batch_size=4, num_epochs=1,
                    dataset="svhn", data_dir=None, preprocess=_mnist_pre)
  assert p.has_bn
  params, _ = p.split_variables(jax.eval_shape(p.init, jax.random.PRNGKey(0)))
  batch = (jnp.ones((4, 8, 8, 3)), jnp.zeros((4,), jnp.int32))
  for fn in (pe.per_example_statistics, pe.per_example_gradients, pe.gradient_variance):
    with pytest.raises(ValueError, match="batch norm"):
      fn(p.apply_fn, p.loss, params, batch)
  # Diagonal curvature is refused on every route: the vmap over examples would
  # normalise each example with its own statistics (a different model).
  for method in ("auto", "vmap", "layers"):
    with pytest.raises(ValueError, match="batch norm"):
      jax.eval_shape(lambda prm, m=method: diagonals.diag_ggn(p.apply_fn, p.loss, prm, batch,
                                                              method=m), params)
  assert flax_layers._plan(p.apply_fn, params, batch[0], strict=False) is None


def test_train_and_rng_keywords_behave_as_before():
  p, params, (x, _) = _tiny_problem(_TinyMLP(), (4,), "softmax_cross_entropy", n=8)
  module, key = p.module, jax.random.PRNGKey(3)
  k1, k2 = jax.random.split(key)
  train = p.apply_fn(params, x, train=True, rng=key)
  np.testing.assert_array_equal(
      train, module.apply(params, x, train=True, rngs={"dropout": k1, "latent": k2}))
  evaluation = module.apply(params, x, train=False)
  assert not np.allclose(train, evaluation)   # dropout active
  np.testing.assert_array_equal(p.apply_fn(params, x), evaluation)
  np.testing.assert_array_equal(p.apply_fn(params, x, train=False, rng=key), evaluation)
  np.testing.assert_array_equal(jax.jit(p.apply_fn)(params, x), evaluation)
