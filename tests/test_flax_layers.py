"""The per-layer fast path (`curvax.curvature.flax_layers`) and the Flax wrappers.

Edge cases of the fast path's applicability checks and of the wrappers, each
against an independent float64 reference: explicit per-example gradients (the
Jacobian of the loss vector over the batch), the dense GGN from ``jax.jacfwd``,
or the generic ``vmap`` path where the examples interact (so that no
per-example decomposition of the batch loss exists to compare with).
"""

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

import curvax
from curvax import flax_utils
from curvax.curvature import flax_layers
from curvax.curvature import per_example as pe
from reference import explicit_ggn, explicit_per_example_grads_jacrev, flat

TOL = dict(rtol=1e-9, atol=1e-12)
LOSS = curvax.losses.softmax_cross_entropy


def _batch(x_shape, n, seed=0):
  x = jax.random.normal(jax.random.PRNGKey(seed), (n,) + x_shape)
  y = jax.random.randint(jax.random.PRNGKey(seed + 1), (n,), 0, 3)
  return x, y


def _linen(module, x, apply_kwargs=None):
  variables = jax.tree_util.tree_map(lambda a: a.astype(jnp.float64),
                                     module.init(jax.random.PRNGKey(2), x))
  return flax_utils.from_linen(module, variables, apply_kwargs)


def _assert_exact(stats, diag, reference, params, batch):
  """Statistics and diagonal GGN against explicit float64 references of the
  model ``reference(params, inputs)``; every leaf shaped like its parameter."""
  g = explicit_per_example_grads_jacrev(reference, LOSS, params, batch)
  ggn = jax.jit(explicit_ggn, static_argnums=(0, 1))(reference, LOSS, params, batch)
  shapes = jax.tree_util.tree_map(jnp.shape, params)
  for tree in (stats.mean_gradient, stats.second_moment, diag):
    assert jax.tree_util.tree_map(jnp.shape, tree) == shapes
  np.testing.assert_allclose(flat(stats.mean_gradient), g.mean(0), **TOL)
  np.testing.assert_allclose(flat(stats.second_moment), np.mean(g ** 2, 0), **TOL)
  np.testing.assert_allclose(stats.gradient_norms, np.linalg.norm(g, axis=1), **TOL)
  np.testing.assert_allclose(flat(diag), np.diag(ggn), **TOL)


def _both(apply_fn, params, batch, method, **kwargs):
  """Per-example statistics and the diagonal GGN by ``method``, in one jit."""
  return jax.jit(lambda p, b: (
      pe.per_example_statistics(apply_fn, LOSS, p, b, method=method, **kwargs),
      curvax.curvature.diag_ggn(apply_fn, LOSS, p, b, method=method)))(params, batch)


def _layers(apply_fn, params, batch, **kwargs):
  return _both(apply_fn, params, batch, "layers", **kwargs)


def _refused(apply_fn, params, batch, match):
  """``method="layers"`` raises ``match`` (statistics and diagonal GGN); returns
  "auto"'s results, which must then be the vmap path's."""
  with pytest.raises(ValueError, match=match):
    pe.per_example_statistics(apply_fn, LOSS, params, batch, method="layers")
  with pytest.raises(ValueError, match=match):
    curvax.curvature.diag_ggn(apply_fn, LOSS, params, batch, method="layers")
  assert flax_layers._plan(apply_fn, params, batch[0], strict=False) is None
  return _both(apply_fn, params, batch, "auto")


# ---- wrappers ----------------------------------------------------------------------

class _Scaled(nn.Module):
  """A keyword of ``__call__`` that changes the outputs."""

  @nn.compact
  def __call__(self, x, scale=1.0):
    return scale * nn.Dense(3)(jnp.tanh(nn.Dense(4)(x)))


@pytest.mark.parametrize("mutable", [[], False])
def test_linen_apply_with_nothing_mutable_returns_the_outputs(mutable):
  """Flax's ``apply`` returns ``(outputs, updates)`` exactly when ``mutable is not
  False``, so an empty list still gives a pair: ``apply_fn`` unpacks it (and
  only it), and the fast path runs through it."""
  x, y = _batch((3,), 4)
  module = _Scaled()
  apply_fn, params = _linen(module, x, {"mutable": mutable})
  out = apply_fn(params, x)
  assert isinstance(out, jax.Array)
  np.testing.assert_array_equal(out, module.apply({"params": params}, x))
  reference = lambda p, x: module.apply({"params": p}, x)  # noqa: E731
  _assert_exact(*_layers(apply_fn, params, (x, y)), reference, params, (x, y))


def test_from_linen_keeps_its_own_copy_of_apply_kwargs():
  """``apply_kwargs`` are fixed when ``from_linen`` is called: changing the
  caller's dict afterwards does not change the model (a jitted caller would
  otherwise silently keep the value it traced with)."""
  x, _ = _batch((3,), 4)
  module = _Scaled()
  kwargs = {"scale": 2.0}
  apply_fn, params = _linen(module, x, kwargs)
  kwargs["scale"] = 5.0
  np.testing.assert_allclose(apply_fn(params, x),
                             module.apply({"params": params}, x, scale=2.0), **TOL)


def test_from_linen_apply_fn_differentiates_the_params_passed_in():
  """Only the non-``params`` collections are closed over: ``apply_fn(p, x)`` is
  the model at ``p`` (not at the initial parameters), so its derivatives are
  the model's (checked against the per-example gradients of ``module.apply``)."""
  x, y = _batch((3,), 4)
  module = _Scaled()
  apply_fn, params = _linen(module, x)
  moved = jax.tree_util.tree_map(lambda a: 2.0 * a + 0.1, params)
  reference = lambda p, x: module.apply({"params": p}, x)  # noqa: E731
  np.testing.assert_allclose(apply_fn(moved, x), reference(moved, x), **TOL)
  np.testing.assert_allclose(
      explicit_per_example_grads_jacrev(apply_fn, LOSS, moved, (x, y)),
      explicit_per_example_grads_jacrev(reference, LOSS, moved, (x, y)), **TOL)


def test_linen_variables_apply_keeps_its_keywords_on_the_fast_path():
  """`LinenVariablesApply` (the `Problem` layout ``{'params': p}``) with keyword
  arguments: the call and the fast path's per-layer model both use them."""
  x, y = _batch((3,), 5)
  module = _Scaled()
  variables = jax.tree_util.tree_map(lambda a: a.astype(jnp.float64),
                                     module.init(jax.random.PRNGKey(2), x))
  apply_fn = flax_layers.LinenVariablesApply(module, {}, {"scale": 2.0})
  reference = lambda v, x: module.apply(v, x, scale=2.0)  # noqa: E731
  np.testing.assert_allclose(apply_fn(variables, x), reference(variables, x), **TOL)
  _assert_exact(*_layers(apply_fn, variables, (x, y)), reference, variables, (x, y))


# ---- which models take the fast path ---------------------------------------------

class _PointwiseConvOn2D(nn.Module):
  """nn.Conv with a 1-D kernel on 2-D ``(N, C)`` inputs sees one unbatched signal
  of length N; kernel size 1 keeps the examples apart, so the model is
  per-example and every layer has the batch on axis 0 (a Conv layer whose
  factors are 2-D, handled by the layer's own VJP, not the Dense formulas)."""

  @nn.compact
  def __call__(self, x):
    return nn.Dense(3)(jnp.tanh(nn.Conv(4, (1,))(x)))


def test_conv_with_two_dimensional_factors_is_not_treated_as_dense():
  x, y = _batch((3,), 5)
  apply_fn, params = _linen(_PointwiseConvOn2D(), x)
  assert params["Conv_0"]["kernel"].shape == (1, 3, 4)
  stats, diag = _layers(apply_fn, params, (x, y), return_gradients=True)
  _assert_exact(stats, diag, apply_fn, params, (x, y))
  g = explicit_per_example_grads_jacrev(apply_fn, LOSS, params, (x, y))
  assert jax.tree_util.tree_map(jnp.shape, stats.gradients) == jax.tree_util.tree_map(
      lambda p: (5,) + p.shape, params)
  np.testing.assert_allclose(jax.vmap(flat)(stats.gradients), g, **TOL)


class _SharedDense(nn.Module):
  """One Dense layer applied twice (shared weights)."""

  @nn.compact
  def __call__(self, x):
    shared = nn.Dense(3)
    return nn.Dense(3)(jnp.tanh(shared(jnp.tanh(shared(x)))))


def test_shared_layer_falls_back():
  """A layer called twice has two (A, B) pairs whose per-example gradients add
  before squaring: the per-layer formulas do not apply."""
  x, y = _batch((3,), 5)
  apply_fn, params = _linen(_SharedDense(), x)
  _assert_exact(*_refused(apply_fn, params, (x, y), "more than once"), apply_fn, params, (x, y))


class _ConvOverBatchPairs(nn.Module):
  """nn.Conv given 2-D ``(N, C)`` inputs convolves along the batch: stride 2
  pairs the examples, the output has ceil(N/2) rows (examples interact)."""

  @nn.compact
  def __call__(self, x):
    h = nn.Conv(4, (2,), strides=2)(x)
    h = jnp.repeat(h, 2, axis=0)[:x.shape[0]]
    return nn.Dense(3)(jnp.tanh(h))


class _ConvOnFoldedExamples(nn.Module):
  """``(N, 2C)`` folded into ``(2N, C)`` for a stride-2 nn.Conv along that axis:
  per example (rows 2n, 2n+1 are example n's), but the layer's input rows are
  not the examples."""

  @nn.compact
  def __call__(self, x):
    h = nn.Conv(4, (2,), strides=2, padding="VALID")(x.reshape(2 * x.shape[0], -1))
    return nn.Dense(3)(jnp.tanh(h))


@pytest.mark.parametrize("module,x_shape,independent", [
    (_ConvOverBatchPairs(), (3,), False),      # input rows: N; output rows: N / 2
    (_ConvOnFoldedExamples(), (4,), True),     # input rows: 2 N; output rows: N
])
def test_layer_input_and_output_both_need_the_batch_on_axis_0(module, x_shape, independent):
  x, y = _batch(x_shape, 6)
  apply_fn, params = _linen(module, x)
  stats, diag = _refused(apply_fn, params, (x, y), "Conv_0.*leading axis")
  if independent:
    _assert_exact(stats, diag, apply_fn, params, (x, y))
  else:   # no per-example decomposition of the batch loss: "auto" is the vmap path
    slow = _both(apply_fn, params, (x, y), "vmap")
    for a, b in zip(jax.tree_util.tree_leaves((stats, diag)), jax.tree_util.tree_leaves(slow)):
      np.testing.assert_allclose(a, b, **TOL)


class _FixedBatchSizes(nn.Module):
  """A model that accepts only some batch sizes (the applicability check traces
  it at N + 1)."""
  sizes: tuple

  @nn.compact
  def __call__(self, x):
    if x.shape[0] not in self.sizes:
      raise ValueError(f"batch size {x.shape[0]} not supported")
    return nn.Dense(3)(jnp.tanh(nn.Dense(4)(x)))


def test_model_that_cannot_be_traced_at_a_larger_batch_falls_back():
  x, y = _batch((3,), 5)
  apply_fn, params = _linen(_FixedBatchSizes((1, 5)), x)
  _assert_exact(*_refused(apply_fn, params, (x, y), "cannot be traced at batch size 6"),
                apply_fn, params, (x, y))


class _TiedHalf(nn.Module):
  """Half of a kernel, taken with a multi-output primitive (``split``), also used
  outside its layer."""

  @nn.compact
  def __call__(self, x):
    enc = nn.Dense(4)
    h = jnp.tanh(enc(x))
    _, second_half = jnp.split(enc.variables["params"]["kernel"], 2, axis=1)
    return nn.Dense(3)(h) + jnp.sum(x @ second_half, axis=1, keepdims=True)


def test_parameter_leaking_through_a_multi_output_primitive_is_detected():
  """The dependency walk follows every output of an equation, not only its first."""
  x, y = _batch((3,), 5)
  apply_fn, params = _linen(_TiedHalf(), x)
  _assert_exact(*_refused(apply_fn, params, (x, y), "Dense_0/kernel.*other than through"),
                apply_fn, params, (x, y))


# ---- dtypes ------------------------------------------------------------------------

def test_dots_with_float64_references_of_a_float32_model_are_float64():
  """float32 parameters and inputs, a float64 reference: ``g_n' r`` in the dtype
  of the parameters and the reference together, as on the vmap path."""
  x, y = _batch((3,), 5)
  x = x.astype(jnp.float32)
  module = _Scaled()
  apply_fn, params = flax_utils.from_linen(module, module.init(jax.random.PRNGKey(2), x))
  assert {p.dtype for p in jax.tree_util.tree_leaves(params)} == {jnp.dtype(jnp.float32)}
  r = jax.tree_util.tree_map(
      lambda p: jnp.cos(jnp.arange(p.size, dtype=jnp.float64)).reshape(p.shape), params)
  fast, slow = jax.jit(lambda p, b, r: [
      pe.per_example_statistics(apply_fn, LOSS, p, b, method=m, dot_with=(r, "mean"))
      for m in ("layers", "vmap")])(params, (x, y), r)
  assert [d.dtype for d in fast.dots] == [d.dtype for d in slow.dots] == [
      jnp.dtype(jnp.float64), jnp.dtype(jnp.float32)]
  for a, b in zip(fast.dots, slow.dots):
    np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-6)
