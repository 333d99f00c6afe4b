"""Per-example gradients, their statistics and directional slopes/curvatures
against explicit per-example gradients (one example at a time) and Jacobians."""

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.flatten_util import ravel_pytree

import curvax
from curvax import flax_utils
from curvax.curvature import per_example as pe
from reference import (LOSSES, explicit_jacobians, explicit_output_hessians,
                       explicit_per_example_grads, explicit_per_example_grads_jacrev, flat, make_targets, problem)

CONFIGS = [(m, l) for m in ("mlp", "cnn") for l in LOSSES]
TOL = dict(rtol=1e-9, atol=1e-12)


def _random_like(params, seed):
  flat_p, unravel = ravel_pytree(params)
  return unravel(jax.random.normal(jax.random.PRNGKey(seed), flat_p.shape))


def _flat_rows(tree):
  return jax.vmap(lambda t: ravel_pytree(t)[0])(tree)


@pytest.mark.parametrize("model,loss_name", CONFIGS)
def test_statistics_match_explicit_per_example_gradients(model, loss_name):
  apply_fn, loss, params, batch = problem(model, loss_name, n=7)
  g = explicit_per_example_grads_jacrev(apply_fn, loss, params, batch)  # (N, P)
  d = _random_like(params, 5)
  # MLP: chunk 3 on 7 examples, two scanned chunks and a remainder of one;
  # CNN: one vmap (conv inside scan compiles slowly on XLA:CPU).
  chunk_size = 3 if model == "mlp" else None

  x, y = batch

  @jax.jit
  def run(params, batch, d):
    s = pe.per_example_statistics(apply_fn, loss, params, batch, direction=d,
                                  return_gradients=True, chunk_size=chunk_size)
    full = jax.grad(curvax.losses.objective(apply_fn, loss))(params, batch)
    gd = curvax.curvature.ggn_matvec(apply_fn, loss, params, batch)(d)
    jac = explicit_jacobians(apply_fn, params, batch[0])  # (N, C, P)
    hess = explicit_output_hessians(loss, apply_fn(params, batch[0]), batch[1])
    return s, full, gd, jac, hess

  s, full, gd, jac, hess = run(params, batch, d)
  np.testing.assert_allclose(flat(s.mean_gradient), g.mean(0), **TOL)
  np.testing.assert_allclose(flat(s.second_moment), np.mean(g ** 2, 0), **TOL)
  np.testing.assert_allclose(flat(s.variance), np.var(g, 0), **TOL)
  np.testing.assert_allclose(s.gradient_norms, np.linalg.norm(g, axis=1), **TOL)
  np.testing.assert_allclose(_flat_rows(s.gradients), g, **TOL)
  np.testing.assert_allclose(s.losses, loss(apply_fn(params, batch[0]), batch[1]), **TOL)
  # The mean gradient is the gradient of the batch-mean objective.
  np.testing.assert_allclose(flat(s.mean_gradient), flat(full), **TOL)

  # Directional slopes d'g_n and curvatures d'G_n d.
  u = jac @ flat(d)
  curv = np.einsum("nc,ncd,nd->n", u, hess, u)
  slopes = g @ flat(d)
  ds = s.directional
  np.testing.assert_allclose(ds.slopes, slopes, **TOL)
  np.testing.assert_allclose(ds.curvatures, curv, **TOL)
  np.testing.assert_allclose(ds.slope_mean, slopes.mean(), **TOL)
  np.testing.assert_allclose(ds.slope_variance, slopes.var(), **TOL)
  np.testing.assert_allclose(ds.curvature_mean, curv.mean(), **TOL)
  np.testing.assert_allclose(ds.curvature_variance, curv.var(), **TOL)
  # d'G d from the GGN-vector product equals the mean curvature.
  np.testing.assert_allclose(ds.curvature_mean, flat(d) @ flat(gd), **TOL)


def test_per_example_gradients_any_chunk_size():
  apply_fn, loss, params, batch = problem("mlp", "mean_squared_error", n=7)
  g = explicit_per_example_grads(apply_fn, loss, params, batch)  # the loop reference

  @jax.jit
  def run(params, batch):
    return [pe.per_example_gradients(apply_fn, loss, params, batch, chunk_size=c)
            for c in (None, 3, 100)]

  for got in run(params, batch):
    np.testing.assert_allclose(_flat_rows(got), g, **TOL)


def test_named_functions_agree_with_statistics():
  apply_fn, loss, params, batch = problem("mlp", "softmax_cross_entropy")
  g = explicit_per_example_grads_jacrev(apply_fn, loss, params, batch)
  d = _random_like(params, 1)

  @jax.jit
  def run(params, batch, d):
    args = (apply_fn, loss, params, batch)
    return (pe.mean_gradient(*args), pe.gradient_second_moment(*args),
            pe.gradient_variance(*args), pe.per_example_gradient_norms(*args),
            pe.directional_statistics(*args, d))

  mean, second, var, norms, ds = run(params, batch, d)
  np.testing.assert_allclose(flat(mean), g.mean(0), **TOL)
  np.testing.assert_allclose(flat(second), np.mean(g ** 2, 0), **TOL)
  np.testing.assert_allclose(flat(var), np.var(g, 0), **TOL)
  np.testing.assert_allclose(norms, np.linalg.norm(g, axis=1), **TOL)
  np.testing.assert_allclose(ds.slopes, g @ flat(d), **TOL)


# ---- fast path (Flax Linen, per-layer contractions) ----------------------------

class _LinenMLP(nn.Module):
  @nn.compact
  def __call__(self, x):
    x = jnp.tanh(nn.Dense(5)(x))
    x = nn.Dense(4, use_bias=False)(x)
    return nn.Dense(3)(jnp.tanh(x))


class _LinenCNN(nn.Module):
  @nn.compact
  def __call__(self, x):
    x = nn.relu(nn.Conv(2, (3, 3), padding="SAME")(x))
    x = nn.Conv(2, (2, 2), strides=(2, 2), padding="VALID")(x)
    x = jnp.tanh(nn.Dense(3)(x))          # Dense on (N, H, W, C): per-position
    x = x.reshape(x.shape[0], -1)
    return nn.Dense(3)(x)


class _CustomParam(nn.Module):
  @nn.compact
  def __call__(self, x):
    scale = self.param("scale", nn.initializers.ones, (3,))
    return nn.Dense(3)(x) * scale


def _linen_problem(module, loss_name, x_shape, n=6):
  x = jax.random.normal(jax.random.PRNGKey(0), (n,) + x_shape)
  variables = module.init(jax.random.PRNGKey(1), x)
  variables = jax.tree_util.tree_map(lambda a: a.astype(jnp.float64), variables)
  apply_fn, params = flax_utils.from_linen(module, variables)
  y = make_targets(jax.random.PRNGKey(2), loss_name, apply_fn(params, x))
  return apply_fn, LOSSES[loss_name], params, (x, y)


@pytest.mark.parametrize("module,x_shape,loss_name",
                         [(_LinenMLP(), (4,), l) for l in LOSSES]
                         + [(_LinenCNN(), (6, 6, 1), "softmax_cross_entropy")])
def test_fast_path_equals_vmap_path_and_explicit(module, x_shape, loss_name):
  apply_fn, loss, params, batch = _linen_problem(module, loss_name, x_shape)

  @jax.jit
  def both(params, batch):
    fast = pe.per_example_statistics(apply_fn, loss, params, batch, method="layers",
                                     return_gradients=True)
    slow = pe.per_example_statistics(apply_fn, loss, params, batch, method="vmap",
                                     return_gradients=True, chunk_size=None)
    return fast, slow

  fast, slow = both(params, batch)
  for a, b in zip(jax.tree_util.tree_leaves(fast), jax.tree_util.tree_leaves(slow)):
    np.testing.assert_allclose(a, b, **TOL)
  g = explicit_per_example_grads_jacrev(apply_fn, loss, params, batch)
  np.testing.assert_allclose(flat(fast.second_moment), np.mean(g ** 2, 0), **TOL)
  np.testing.assert_allclose(fast.gradient_norms, np.linalg.norm(g, axis=1), **TOL)


def test_fast_path_falls_back_for_parameters_outside_dense_and_conv():
  apply_fn, loss, params, batch = _linen_problem(_CustomParam(), "mean_squared_error", (4,))
  with pytest.raises(ValueError, match="scale.*do not belong"):
    pe.per_example_statistics(apply_fn, loss, params, batch, method="layers")
  auto = pe.per_example_statistics(apply_fn, loss, params, batch)  # vmap fallback
  g = explicit_per_example_grads_jacrev(apply_fn, loss, params, batch)
  np.testing.assert_allclose(flat(auto.second_moment), np.mean(g ** 2, 0), **TOL)


class _LinenKeywordInput(nn.Module):
  @nn.compact
  def __call__(self, x):
    return nn.Dense(3)(jnp.tanh(nn.Dense(4)(inputs=x)))


class _TanhDense(nn.Module):
  @nn.compact
  def __call__(self, x):
    return jnp.tanh(nn.Dense(4)(x))


class _LinenRemat(nn.Module):
  """Dense layers under nn.remat (an ancestor) and nn.checkpoint (the layer)."""

  @nn.compact
  def __call__(self, x):
    x = nn.remat(_TanhDense)()(x)
    return nn.Dense(3)(jnp.tanh(nn.checkpoint(nn.Dense)(4)(x)))


class _LinenMapVariables(nn.Module):
  """A Dense whose parameters are scaled on the way in (no trace of its own)."""

  @nn.compact
  def __call__(self, x):
    scaled = nn.map_variables(nn.Dense, "params", init=True,
                              trans_in_fn=lambda v: jax.tree_util.tree_map(lambda a: 3 * a, v))
    return nn.Dense(3)(jnp.tanh(scaled(4)(x)))


LIFTED_OR_KEYWORD = [(_LinenKeywordInput(), None),
                     (_LinenRemat(), "lifted Flax transform"),
                     (_LinenMapVariables(), "not the parameter passed in")]


@pytest.mark.parametrize("module,unsupported", LIFTED_OR_KEYWORD)
def test_fast_path_keyword_inputs_and_lifted_transforms(module, unsupported):
  """A Dense called with ``inputs=`` takes the fast path; Dense layers under
  nn.remat/nn.checkpoint (whose values are tracers of their own trace) or
  nn.map_variables make "auto" fall back to vmap and "layers" raise, instead
  of an IndexError, an UnexpectedTracerError or wrong statistics."""
  apply_fn, loss, params, batch = _linen_problem(module, "softmax_cross_entropy", (3,), n=5)
  methods = ["vmap", "auto"] if unsupported else ["vmap", "auto", "layers"]

  @jax.jit
  def run(params, batch, d):
    return [pe.per_example_statistics(apply_fn, loss, params, batch, method=m, chunk_size=None,
                                      return_gradients=True, direction=d) for m in methods]

  slow, *others = run(params, batch, _random_like(params, 3))
  for got in others:
    for a, b in zip(jax.tree_util.tree_leaves(got), jax.tree_util.tree_leaves(slow)):
      np.testing.assert_allclose(a, b, **TOL)
  if unsupported:
    with pytest.raises(ValueError, match=unsupported):
      pe.per_example_statistics(apply_fn, loss, params, batch, method="layers")


class _LearnedQuery(nn.Module):
  """A Dense on a batch-independent input (a learned query)."""

  @nn.compact
  def __call__(self, x):
    q = nn.Dense(4)(jnp.ones((1, 2), x.dtype))
    return nn.Dense(3)(x * q)


class _TimeMajor(nn.Module):
  """A Dense on a time-major (T, N, F) layout of (N, T, F) inputs."""

  @nn.compact
  def __call__(self, x):
    h = jnp.tanh(nn.Dense(3)(jnp.swapaxes(x, 0, 1)))
    return nn.Dense(3)(jnp.swapaxes(h, 0, 1).mean(1))


class _PositionalGrid(nn.Module):
  """A Dense on a batch-independent positional grid (T, 2) added to (N, T, F)."""

  @nn.compact
  def __call__(self, x):
    t = jnp.arange(x.shape[1], dtype=x.dtype)
    h = x + nn.Dense(x.shape[-1])(jnp.stack([t, t ** 2], 1))
    return nn.Dense(3)(jnp.tanh(h).reshape(h.shape[0], -1))


def _auto_falls_back_and_layers_raises(apply_fn, loss, params, batch, match):
  """``method="layers"`` raises ``match``; "auto" equals "vmap" (statistics and
  diagonal GGN). Returns the explicit per-example gradients and "auto"'s results."""
  with pytest.raises(ValueError, match=match):
    pe.per_example_statistics(apply_fn, loss, params, batch, method="layers")
  with pytest.raises(ValueError, match=match):
    curvax.curvature.diag_ggn(apply_fn, loss, params, batch, method="layers")

  @jax.jit
  def run(params, batch):
    return [(pe.per_example_statistics(apply_fn, loss, params, batch, method=m,
                                       chunk_size=None),
             curvax.curvature.diag_ggn(apply_fn, loss, params, batch, method=m))
            for m in ("auto", "vmap")]

  auto, slow = run(params, batch)
  for a, b in zip(jax.tree_util.tree_leaves(auto), jax.tree_util.tree_leaves(slow)):
    np.testing.assert_allclose(a, b, **TOL)
  return explicit_per_example_grads_jacrev(apply_fn, loss, params, batch), auto


@pytest.mark.parametrize("module,x_shape,layer", [
    (_LearnedQuery(), (4,), "Dense_0"),
    (_TimeMajor(), (6, 4), "Dense_0"),       # T == N: same shapes as batch-first
    (_TimeMajor(), (2, 4), "Dense_0"),
    (_PositionalGrid(), (3, 4), "Dense_0"),
])
def test_fast_path_needs_the_batch_on_axis_0_of_every_layer(module, x_shape, layer):
  """Layers whose input or output does not carry the examples on axis 0 make
  "auto" fall back to vmap (per-example statistics and the diagonal GGN equal
  the vmap path's) and "layers" raise naming the layer, instead of wrong
  values or a shape error."""
  apply_fn, loss, params, batch = _linen_problem(module, "softmax_cross_entropy", x_shape)
  g, auto = _auto_falls_back_and_layers_raises(apply_fn, loss, params, batch,
                                               f"{layer}.*leading axis")
  np.testing.assert_allclose(auto[0].gradient_norms, np.linalg.norm(g, axis=1), **TOL)


class _TiedDecoder(nn.Module):
  """The encoder's kernel also decodes (tied weights), outside its layer call."""

  @nn.compact
  def __call__(self, x):
    enc = nn.Dense(3)
    h = jnp.tanh(enc(x))
    return nn.Dense(3)(h @ enc.variables["params"]["kernel"].T) + h


class _BiasReused(nn.Module):
  """A layer's bias added to the output a second time."""

  @nn.compact
  def __call__(self, x):
    last = nn.Dense(3)
    return last(jnp.tanh(nn.Dense(4)(x))) * 2.0 + last.variables["params"]["bias"]


@pytest.mark.parametrize("module,leaked", [(_TiedDecoder(), "Dense_0/kernel"),
                                           (_BiasReused(), "Dense_0/bias")])
def test_fast_path_falls_back_for_parameters_used_outside_their_layer(module, leaked):
  """A parameter that reaches the outputs other than through its layer call
  makes "auto" fall back to vmap and "layers" raise naming it, instead of
  wrong second moments, norms and diagonal GGN (the mean was right)."""
  apply_fn, loss, params, batch = _linen_problem(module, "softmax_cross_entropy", (4,))
  g, auto = _auto_falls_back_and_layers_raises(apply_fn, loss, params, batch,
                                               f"{leaked}.*other than through")
  np.testing.assert_allclose(flat(auto[0].second_moment), np.mean(g ** 2, 0), **TOL)


def test_fast_path_squares_bfloat16_inputs_in_the_layers_dtype():
  """bfloat16 inputs to a float32 model: the Dense factors are squared in
  float32 (the dtype of the per-example gradients a_n b_n'), so the fast path
  agrees with the vmap path to float32 round-off (in bfloat16: ~1e-3)."""
  module = _LinenMLP()
  x = jax.random.normal(jax.random.PRNGKey(0), (8, 32)).astype(jnp.bfloat16)
  apply_fn, params = flax_utils.from_linen(
      module, module.init(jax.random.PRNGKey(1), x.astype(jnp.float32)))
  assert {p.dtype for p in jax.tree_util.tree_leaves(params)} == {jnp.dtype(jnp.float32)}
  batch = (x, jax.random.randint(jax.random.PRNGKey(2), (8,), 0, 3))
  loss = curvax.losses.softmax_cross_entropy
  fast, slow = [(pe.per_example_statistics(apply_fn, loss, params, batch, method=m),
                 curvax.curvature.diag_ggn(apply_fn, loss, params, batch, method=m))
                for m in ("layers", "vmap")]
  for name, f, v in [("second moment", fast[0].second_moment, slow[0].second_moment),
                     ("norms", fast[0].gradient_norms, slow[0].gradient_norms),
                     ("diag GGN", fast[1], slow[1])]:
    f, v = flat(f), flat(v)
    assert np.max(np.abs(f - v)) <= 1e-5 * np.max(np.abs(v)), name


@pytest.mark.parametrize("module,x_shape", [(_LinenMLP(), (4,)), (_LinenCNN(), (6, 6, 1))])
def test_fast_path_results_have_the_vmap_paths_dtypes(module, x_shape):
  """float32 parameters, float64 inputs: every result of the fast path has the
  vmap path's dtype (the parameters'; float64 before for Dense layers)."""
  x = jax.random.normal(jax.random.PRNGKey(0), (5,) + x_shape, jnp.float64)
  apply_fn, params = flax_utils.from_linen(
      module, module.init(jax.random.PRNGKey(1), x.astype(jnp.float32)))
  assert {p.dtype for p in jax.tree_util.tree_leaves(params)} == {jnp.dtype(jnp.float32)}
  batch = (x, jax.random.randint(jax.random.PRNGKey(2), (5,), 0, 3))
  loss = curvax.losses.softmax_cross_entropy
  d = jax.tree_util.tree_map(jnp.ones_like, params)
  fast, slow = [(pe.per_example_statistics(apply_fn, loss, params, batch, method=m,
                                           return_gradients=True, dot_with=("mean", d),
                                           reduce_gradients=_cube_sum),
                 curvax.curvature.diag_ggn(apply_fn, loss, params, batch, method=m))
                for m in ("layers", "vmap")]
  assert jax.tree_util.tree_structure(fast) == jax.tree_util.tree_structure(slow)
  for a, b in zip(jax.tree_util.tree_leaves(fast), jax.tree_util.tree_leaves(slow)):
    assert a.dtype == b.dtype
    np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-6)


def test_fast_path_needs_a_linen_wrapper():
  apply_fn, loss, params, batch = problem("mlp", "mean_squared_error")
  with pytest.raises(ValueError, match="from_linen"):
    pe.per_example_statistics(apply_fn, loss, params, batch, method="layers")


# ---- errors ---------------------------------------------------------------------

class _WithBatchNorm(nn.Module):
  @nn.compact
  def __call__(self, x):
    x = nn.BatchNorm(use_running_average=True)(nn.Dense(4)(x))
    return nn.Dense(3)(x)


def test_batch_norm_is_refused():
  x = jnp.ones((4, 3))
  module = _WithBatchNorm()
  apply_fn, params = flax_utils.from_linen(module, module.init(jax.random.PRNGKey(0), x))
  batch = (x, jnp.zeros((4,), jnp.int32))
  loss = curvax.losses.softmax_cross_entropy
  # Curvature products are fine (statistics closed over) ...
  curvax.curvature.ggn_matvec(apply_fn, loss, params, batch)(params)
  # ... per-example quantities are not.
  for fn in (pe.per_example_statistics, pe.per_example_gradients, pe.gradient_variance):
    with pytest.raises(ValueError, match="batch norm"):
      fn(apply_fn, loss, params, batch)
  with pytest.raises(ValueError, match="batch norm"):
    pe.directional_statistics(apply_fn, loss, params, batch, params)
  # Curvature built from per-example factors is refused too (auto would fall back to vmap).
  key = jax.random.PRNGKey(0)
  for fn in (lambda: curvax.curvature.diag_ggn(apply_fn, loss, params, batch),
             lambda: curvax.curvature.diag_ggn(apply_fn, loss, params, batch, method="vmap"),
             lambda: curvax.curvature.diag_ggn_mc(apply_fn, loss, params, batch, key),
             lambda: curvax.curvature.ggn_factor(apply_fn, loss, params, batch)):
    with pytest.raises(ValueError, match="batch norm"):
      fn()


def test_bad_input_errors():
  apply_fn, loss, params, batch = problem("mlp", "softmax_cross_entropy")
  bad = dict(params)
  del bad["b2"]
  with pytest.raises(ValueError, match="direction"):
    pe.directional_statistics(apply_fn, loss, params, batch, bad)
  with pytest.raises(ValueError, match="direction"):
    pe.per_example_statistics(apply_fn, loss, params, batch, direction=bad)
  with pytest.raises(TypeError, match="batch"):
    pe.per_example_statistics(apply_fn, loss, params, batch[0])
  with pytest.raises(ValueError, match="method"):
    pe.per_example_statistics(apply_fn, loss, params, batch, method="fast")
  with pytest.raises(ValueError, match="chunk_size"):
    pe.per_example_statistics(apply_fn, loss, params, batch, chunk_size=0)


def test_auto_uses_the_fast_path_and_jits_once(monkeypatch):
  import chex  # pylint: disable=g-import-not-at-top
  from curvax.curvature import flax_layers  # pylint: disable=g-import-not-at-top
  apply_fn, loss, params, batch = _linen_problem(_LinenMLP(), "softmax_cross_entropy", (4,))
  used = []
  original = flax_layers.layer_statistics

  def spy(*args, **kwargs):
    result = original(*args, **kwargs)
    used.append(result is not None)
    return result

  monkeypatch.setattr(flax_layers, "layer_statistics", spy)

  @jax.jit
  @chex.assert_max_traces(n=1)
  def step(params, batch):
    return pe.per_example_statistics(apply_fn, loss, params, batch).variance

  step(params, batch)
  step(jax.tree_util.tree_map(lambda a: a + 1.0, params), batch)
  assert used == [True]



def _count_dots(fn, *args):
  import re  # pylint: disable=g-import-not-at-top
  return len(re.findall(r" dot\(", jax.jit(fn).lower(*args).compile().as_text()))


def test_fast_path_shares_the_training_steps_forward_and_backward_pass():
  # The fast path differentiates the batch mean as `curvax.losses.objective`
  # does, so in one jitted step with the user's gradient XLA computes the
  # passes once: the step costs the gradient's matrix products plus one
  # (A^2)'(B^2) per Dense layer, not two gradients' worth.
  apply_fn, loss, params, batch = _linen_problem(_LinenMLP(), "softmax_cross_entropy", (4,))
  grad = jax.grad(curvax.losses.objective(apply_fn, loss))

  def stats(p, b):
    s = pe.per_example_statistics(apply_fn, loss, p, b, method="layers")
    return s.second_moment, s.gradient_norms

  num_dense = len(params)
  alone = _count_dots(grad, params, batch)
  assert _count_dots(stats, params, batch) >= alone
  assert _count_dots(lambda p, b: (grad(p, b), stats(p, b)), params, batch) == alone + num_dense


# ---- dots with references and reductions of per-example gradients --------------

def _cube_sum(g, theta):
  """An additive reduction that depends on every element and on ``theta``."""
  return {"cube": jnp.sum(g ** 3, axis=0) * jnp.cos(theta), "count": jnp.asarray(g.shape[0])}


@pytest.mark.parametrize("setup,method", [
    (("mlp", "softmax_cross_entropy", None), "vmap"),
    (("cnn", "mean_squared_error", None), "vmap"),
    ((_LinenMLP(), "softmax_cross_entropy", (4,)), "layers"),
    ((_LinenCNN(), "softmax_cross_entropy", (6, 6, 1)), "layers")])
def test_dots_and_reductions_match_explicit_per_example_gradients(setup, method,
                                                                  monkeypatch):
  """g_n'g, g_n'd and an element-wise reduction, without return_gradients,
  against explicit float64 per-example gradients; the fast path forms Dense
  kernel gradients in blocks of examples (here forced to 2 of 7 / 6); the vmap
  path in chunks of 3 of 7 (g from an extra backward pass) or in one chunk."""
  from curvax.curvature import flax_layers  # pylint: disable=g-import-not-at-top
  monkeypatch.setattr(flax_layers, "REDUCE_BLOCK_ELEMENTS", 2 * 20)
  model, loss_name, x_shape = setup
  if x_shape is None:
    apply_fn, loss, params, batch = problem(model, loss_name, n=7)
  else:
    apply_fn, loss, params, batch = _linen_problem(model, loss_name, x_shape)
  g = explicit_per_example_grads_jacrev(apply_fn, loss, params, batch)
  d = _random_like(params, 3)

  @jax.jit
  def run(params, batch, d):
    return pe.per_example_statistics(apply_fn, loss, params, batch, method=method,
                                     dot_with=("mean", d), reduce_gradients=_cube_sum,
                                     chunk_size=None if model == "cnn" else 3)

  s = run(params, batch, d)
  assert s.gradients is None
  np.testing.assert_allclose(s.dots[0], g @ g.mean(0), **TOL)
  np.testing.assert_allclose(s.dots[1], g @ flat(d), **TOL)
  cube = jax.tree_util.tree_map(lambda r: r["cube"], s.reduced,
                                is_leaf=lambda r: isinstance(r, dict) and "cube" in r)
  np.testing.assert_allclose(flat(cube), np.sum(g ** 3, 0) * np.cos(flat(params)),
                             rtol=1e-9, atol=1e-12)
  counts = [r["count"] for r in jax.tree_util.tree_leaves(
      s.reduced, is_leaf=lambda r: isinstance(r, dict) and "count" in r)]
  assert counts == [g.shape[0]] * len(counts)


def test_reduce_outer_products_gets_the_dense_kernels_factors():
  """On the fast path, ``reduce_outer_products(a, b, theta)`` replaces
  ``reduce_gradients`` for Dense kernels: the same reduction computed from the
  factors (g_n = a_n b_n') equals it on the explicit per-example gradients;
  every other tensor still goes through ``reduce_gradients``."""
  apply_fn, loss, params, batch = _linen_problem(_LinenMLP(), "softmax_cross_entropy", (4,))
  g = explicit_per_example_grads_jacrev(apply_fn, loss, params, batch)
  kernels = []

  def from_factors(a, b, theta):
    kernels.append(theta.shape)
    return _cube_sum(jnp.einsum("ni,nj->nij", a, b), theta)

  s = jax.jit(lambda p, bt: pe.per_example_statistics(
      apply_fn, loss, p, bt, method="layers", reduce_gradients=_cube_sum,
      reduce_outer_products=from_factors))(params, batch)
  assert sorted(kernels) == sorted(p.shape for p in jax.tree_util.tree_leaves(params)
                                   if p.ndim == 2)
  cube = jax.tree_util.tree_map(lambda r: r["cube"], s.reduced,
                                is_leaf=lambda r: isinstance(r, dict) and "cube" in r)
  np.testing.assert_allclose(flat(cube), np.sum(g ** 3, 0) * np.cos(flat(params)),
                             rtol=1e-9, atol=1e-12)
  with pytest.raises(ValueError, match="reduce_gradients"):
    pe.per_example_statistics(apply_fn, loss, params, batch, reduce_outer_products=from_factors)


def test_dot_with_errors():
  apply_fn, loss, params, batch = problem("mlp", "softmax_cross_entropy")
  bad = dict(params)
  del bad["b2"]
  with pytest.raises(ValueError, match="dot_with"):
    pe.per_example_statistics(apply_fn, loss, params, batch, dot_with=(bad,))
  with pytest.raises(ValueError, match="mean"):
    pe.per_example_statistics(apply_fn, loss, params, batch, dot_with=("median",))
  for unwrapped in (params, "mean"):  # one reference, not in a tuple
    with pytest.raises(TypeError, match=r"dot_with=\(r,\)"):
      pe.per_example_statistics(apply_fn, loss, params, batch, dot_with=unwrapped)
  as_list = list(params.values())   # list params: the list itself is one reference
  list_apply = lambda p, x: apply_fn(dict(zip(params, p)), x)  # noqa: E731
  with pytest.raises(TypeError, match=r"dot_with=\(r,\)"):
    pe.per_example_statistics(list_apply, loss, as_list, batch, dot_with=as_list)
  s = pe.per_example_statistics(list_apply, loss, as_list, batch, dot_with=(as_list,),
                                method="vmap")
  ref = pe.per_example_statistics(apply_fn, loss, params, batch, dot_with=(params,),
                                  method="vmap")
  np.testing.assert_allclose(s.dots[0], ref.dots[0], rtol=1e-12)


@pytest.mark.parametrize("chunk_size", [None, 3])
def test_variance_of_identical_examples_is_zero_never_negative(chunk_size):
  """Seven copies of one example: every g_n is the same, so the variance
  (1/N) sum g_n^2 - g^2 is 0 in exact arithmetic; round-off makes the raw
  difference slightly negative in some entries, which the clamp must remove
  (a negative variance would give NaN standard deviations / SNRs)."""
  apply_fn, loss, params, (x, y) = problem("mlp", "mean_squared_error", n=7)
  batch = (jnp.broadcast_to(x[:1], x.shape), jnp.broadcast_to(y[:1], y.shape))
  g1 = explicit_per_example_grads(apply_fn, loss, params, (x[:1], y[:1]))[0]
  s = jax.jit(lambda p, b: pe.per_example_statistics(apply_fn, loss, p, b, method="vmap",
                                                     chunk_size=chunk_size))(params, batch)
  # (On XLA:CPU float64 the raw difference is about -4e-16 in a dozen entries.)
  var = flat(s.variance)
  assert np.all(var >= 0)
  np.testing.assert_allclose(var, 0.0, atol=1e-12)
  np.testing.assert_allclose(flat(s.mean_gradient), g1, **TOL)
  np.testing.assert_allclose(s.gradient_norms, np.full(7, np.linalg.norm(g1)), **TOL)


@pytest.mark.parametrize("chunk_size,batched_calls", [(None, 0), (7, 0), (3, 1)])
def test_dot_with_mean_needs_an_extra_pass_only_over_several_chunks(chunk_size, batched_calls):
  """``dot_with=("mean",)`` on the vmap path: when one chunk holds the batch
  (None or chunk_size >= N) the chunk's mean is g and no extra (batched)
  backward pass is traced; over several chunks exactly one computes g first.
  The values equal g_n'g from explicit per-example gradients either way."""
  apply_fn, loss, params, batch = problem("mlp", "softmax_cross_entropy", n=7)
  shapes = []

  def counted(p, x):
    shapes.append(x.shape[0])
    return apply_fn(p, x)

  s = jax.jit(lambda p, b: pe.per_example_statistics(counted, loss, p, b, method="vmap",
                                                     dot_with=("mean",),
                                                     chunk_size=chunk_size))(params, batch)
  assert shapes.count(7) == batched_calls, shapes
  g = explicit_per_example_grads_jacrev(apply_fn, loss, params, batch)
  np.testing.assert_allclose(s.dots[0], g @ g.mean(0), **TOL)
