"""`curvax.layers.PatchConv` is ``nn.Conv``: same parameters, outputs and gradients;
`curvax.layers.max_pool` is ``nn.max_pool``: same outputs, gradients, JVPs and
Hessian-vector products (ties included).

The reference is ``flax.linen.Conv`` (XLA's convolution) with the very same
variables, in float64; configurations cover 1-D/2-D/3-D kernels, strides,
SAME/VALID/explicit padding, odd sizes and no bias. The DeepOBS models built with
either implementation hold identical parameters and compute the same function.
"""

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

import curvax
import curvax.problems
from curvax.layers import PatchConv, conv_class, max_pool, max_pool_fn

TOL = dict(rtol=1e-10, atol=1e-12)


@pytest.mark.parametrize("x_shape,kwargs", [
    ((2, 7, 7, 3), dict(features=4, kernel_size=(3, 3))),
    ((2, 7, 6, 3), dict(features=4, kernel_size=(3, 2), padding="VALID")),
    ((2, 8, 9, 1), dict(features=5, kernel_size=(5, 5), strides=2)),
    ((2, 9, 9, 2), dict(features=3, kernel_size=(3, 3), strides=(2, 3), padding="VALID")),
    ((3, 6, 6, 2), dict(features=2, kernel_size=(2, 2), padding=1, use_bias=False)),
    ((2, 6, 7, 2), dict(features=2, kernel_size=(3, 3), padding=((0, 2), (1, 0)))),
    ((2, 10, 3), dict(features=4, kernel_size=(4,), strides=3)),
    ((2, 4, 5, 4, 2), dict(features=3, kernel_size=(2, 3, 2))),
    ((2, 5, 5, 3), dict(features=4, kernel_size=(1, 1), strides=2)),
    ((2, 6, 5, 2), dict(features=3, kernel_size=(3, 3), strides=None)),   # None is 1
    # Negative padding crops (as nn.Conv reads it).
    ((2, 7, 6, 2), dict(features=3, kernel_size=(3, 2), padding=((-1, 1), (0, 0)))),
    ((2, 7, 6, 2), dict(features=3, kernel_size=(3, 2), strides=(2, 1),
                        padding=((-1, -2), (2, -1)))),
    # Padding strings in any case, as nn.Conv (lax.padtype_to_pads) reads them.
    ((2, 8, 7, 2), dict(features=3, kernel_size=(3, 2), strides=2, padding="same")),
    ((2, 6, 5, 2), dict(features=3, kernel_size=(3, 2), padding="valid")),
    # A sequence mixing ints (symmetric, per axis) and (lo, hi) pairs.
    ((2, 5, 5, 2), dict(features=3, kernel_size=(3, 3), padding=(1, 2))),
    ((2, 5, 6, 2), dict(features=3, kernel_size=(3, 3), padding=[2, (0, 1)])),
    # A kernel that covers the whole (padded) input: one output position.
    ((2, 3, 4, 2), dict(features=3, kernel_size=(3, 4), padding="VALID")),
    ((2, 4, 2), dict(features=3, kernel_size=(6,), strides=4, padding=1)),
    # An int kernel_size is the 1-D kernel (k,), as nn.Conv reads it.
    ((2, 7, 2), dict(features=3, kernel_size=3, strides=2, padding="SAME")),
])
def test_patch_conv_matches_nn_conv(x_shape, kwargs):
  kwargs = dict(kwargs, param_dtype=jnp.float64, bias_init=nn.initializers.normal(1.0))
  x = jax.random.normal(jax.random.PRNGKey(0), x_shape, jnp.float64)
  reference, ours = nn.Conv(**kwargs), PatchConv(**kwargs)
  variables = reference.init(jax.random.PRNGKey(1), x)
  own = ours.init(jax.random.PRNGKey(1), x)
  # Same names, shapes and initial values (same initialisers, same rng paths).
  assert jax.tree_util.tree_structure(own) == jax.tree_util.tree_structure(variables)
  for a, b in zip(jax.tree_util.tree_leaves(own), jax.tree_util.tree_leaves(variables)):
    np.testing.assert_array_equal(a, b)

  @jax.jit
  def both(variables, x):
    f = lambda m: lambda v, x: jnp.sum(jnp.sin(m.apply(v, x)))
    return [(m.apply(variables, x), jax.grad(f(m), argnums=(0, 1))(variables, x))
            for m in (reference, ours)]

  (y_ref, g_ref), (y, g) = both(variables, x)
  assert y.shape == y_ref.shape
  np.testing.assert_allclose(y, y_ref, **TOL)
  for a, b in zip(jax.tree_util.tree_leaves(g), jax.tree_util.tree_leaves(g_ref)):
    np.testing.assert_allclose(a, b, **TOL)


def test_patch_conv_dtype_promotion_matches_nn_conv():
  kwargs = dict(features=3, kernel_size=(3, 3), dtype=jnp.float32)
  x = jax.random.normal(jax.random.PRNGKey(0), (2, 5, 5, 2), jnp.float64)
  variables = nn.Conv(**kwargs).init(jax.random.PRNGKey(1), x)
  y = PatchConv(**kwargs).apply(variables, x)
  assert y.dtype == nn.Conv(**kwargs).apply(variables, x).dtype == jnp.float32
  np.testing.assert_allclose(y, nn.Conv(**kwargs).apply(variables, x), rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("kwargs,x_shape,match", [
    (dict(padding="CIRCULAR"), (1, 5, 5, 1), "padding"),
    (dict(padding=((1, 1),)), (1, 5, 5, 1), "spatial axes"),
    (dict(), (5, 5, 1), "needs inputs"),
    (dict(padding="VALID"), (1, 2, 2, 1), "does not fit"),
    (dict(strides=(2, 2, 2), padding="VALID"), (1, 6, 6, 1), "one stride for each"),
    (dict(strides=(2,), padding="VALID"), (1, 6, 6, 1), "one stride for each"),
])
def test_patch_conv_rejects_what_it_does_not_support(kwargs, x_shape, match):
  with pytest.raises(ValueError, match=match):
    PatchConv(2, (3, 3), **kwargs).init(jax.random.PRNGKey(0), jnp.ones(x_shape))


def test_conv_class_by_name_and_backend():
  assert conv_class("lax") is nn.Conv
  assert conv_class("patches") is PatchConv
  expected = PatchConv if jax.default_backend() == "cpu" else nn.Conv
  assert conv_class("auto") is expected
  with pytest.raises(ValueError, match="conv impl"):
    conv_class("cudnn")
  with pytest.raises(ValueError, match="conv_impl"):
    curvax.problems.get("fmnist_2c2d", conv_impl="fft")


@pytest.mark.parametrize("name", ["fmnist_2c2d", "cifar10_3c3d", "cifar100_allcnnc",
                                  "svhn_wrn164"])
def test_problems_hold_the_same_parameters_with_either_conv(name):
  shapes = [jax.eval_shape(curvax.problems.get(name, conv_impl=impl).init,
                           jax.random.PRNGKey(0)) for impl in ("lax", "patches")]
  assert jax.tree_util.tree_structure(shapes[0]) == jax.tree_util.tree_structure(shapes[1])
  assert [a.shape for a in jax.tree_util.tree_leaves(shapes[0])] == [
      b.shape for b in jax.tree_util.tree_leaves(shapes[1])]


@pytest.mark.parametrize("name,shape", [
    ("fmnist_2c2d", (3, 28, 28, 1)),
    ("cifar10_3c3d", (3, 32, 32, 3)),
])
def test_problems_compute_the_same_function_with_either_conv(name, shape):
  lax_problem = curvax.problems.get(name, conv_impl="lax")
  patch_problem = curvax.problems.get(name, conv_impl="patches")
  v = jax.tree_util.tree_map(lambda a: a.astype(jnp.float64),
                             lax_problem.init(jax.random.PRNGKey(0)))
  x = jax.random.normal(jax.random.PRNGKey(1), shape, jnp.float64)
  out_lax = jax.jit(lax_problem.apply_fn)(v, x)
  out_patch = jax.jit(patch_problem.apply_fn)(v, x)
  np.testing.assert_allclose(out_patch, out_lax, rtol=1e-9, atol=1e-11)
  # The patch model holds no convolution op and no reduce_window at all.
  patch_jaxpr = str(jax.make_jaxpr(patch_problem.apply_fn)(v, x))
  lax_jaxpr = str(jax.make_jaxpr(lax_problem.apply_fn)(v, x))
  assert "conv_general_dilated" not in patch_jaxpr and "reduce_window" not in patch_jaxpr
  assert "conv_general_dilated" in lax_jaxpr and "reduce_window" in lax_jaxpr
  # Gradients agree too (max-pool ties route to the same entry).
  y = jax.nn.one_hot(jnp.arange(shape[0]) % 10, 10)
  grads = [jax.jit(jax.grad(lambda v, p=p: jnp.sum(jax.nn.log_softmax(p.apply_fn(v, x)) * y)))(v)
           for p in (lax_problem, patch_problem)]
  for a, b in zip(*map(jax.tree_util.tree_leaves, grads)):
    np.testing.assert_allclose(a, b, rtol=1e-8, atol=1e-11)


@pytest.mark.parametrize("x_shape,window,strides,padding", [
    ((3, 9, 9, 2), (3, 3), (2, 2), "SAME"),      # 3c3d's pool
    ((3, 8, 8, 2), (2, 2), (2, 2), "SAME"),      # 2c2d's pool
    ((2, 9, 7, 3), (3, 2), (2, 1), "VALID"),
    ((2, 6, 6, 1), (2, 2), None, ((1, 0), (0, 1))),
    ((2, 10, 3), (4,), (3,), "SAME"),
    ((2, 4, 5, 4, 2), (2, 3, 2), (1, 2, 2), "VALID"),
    ((7, 7, 2), (3, 3), (2, 2), "SAME"),          # no batch axis
    ((2, 3, 6, 6, 2), (2, 2), (2, 2), "VALID"),   # two batch axes
    ((2, 13, 12, 1), (12, 11), (1, 1), "VALID"),  # 132 window entries: int32 index
])
def test_max_pool_matches_nn_max_pool_with_ties(x_shape, window, strides, padding):
  # ReLU and rounding make ties (zeros, repeated values) common, as after a conv.
  x = jnp.round(jax.nn.relu(jax.random.normal(jax.random.PRNGKey(0), x_shape, jnp.float64)), 1)
  t = jax.random.normal(jax.random.PRNGKey(1), x_shape, jnp.float64)
  pools = [lambda x: nn.max_pool(x, window, strides, padding),
           lambda x: max_pool(x, window, strides, padding)]

  @jax.jit
  def all_of(x, t):
    out = []
    for pool in pools:
      f = lambda x, pool=pool: jnp.sum(jnp.sin(pool(x)) * jnp.cos(pool(x) + 1.0))
      y, y_dot = jax.jvp(pool, (x,), (t,))
      # Hessian-vector product: forward over reverse through the pool twice.
      hvp = jax.jvp(jax.grad(f), (x,), (t,))[1]
      out.append((y, y_dot, jax.grad(f)(x), hvp))
    return out

  ref, ours = all_of(x, t)
  assert ours[0].shape == ref[0].shape
  for a, b in zip(ours, ref):
    np.testing.assert_allclose(a, b, **TOL)


def test_max_pool_window_with_a_nan():
  """A NaN in a window: the output is NaN (as nn.max_pool's) and that window's tangent
  zero; the other windows' values and tangents are nn.max_pool's."""
  x = jax.random.normal(jax.random.PRNGKey(0), (2, 6, 6, 2), jnp.float64)
  x = x.at[1, 2, 3, 0].set(jnp.nan)
  t = jax.random.normal(jax.random.PRNGKey(1), x.shape, jnp.float64)
  (y, y_dot), (y_ref, y_dot_ref) = (jax.jvp(lambda x: pool(x, (2, 2), (2, 2)), (x,), (t,))
                                    for pool in (max_pool, nn.max_pool))
  bad = np.zeros(y.shape, bool)
  bad[1, 1, 1, 0] = True
  np.testing.assert_array_equal(np.isnan(y), bad)
  np.testing.assert_array_equal(np.isnan(y_ref), bad)
  assert y_dot[1, 1, 1, 0] == 0 and np.all(np.isfinite(y_dot))
  np.testing.assert_allclose(y[~bad], y_ref[~bad], **TOL)
  np.testing.assert_allclose(y_dot[~bad], y_dot_ref[~bad], **TOL)


def test_max_pool_negative_padding_crops():
  """Negative padding crops (nn.max_pool's outputs; its gradient fails in JAX's
  reduce_window transpose, so the reference crops by slicing)."""
  x = jax.random.normal(jax.random.PRNGKey(0), (2, 7, 6, 2), jnp.float64)
  pads = ((-1, 1), (1, -2))
  ours = lambda x: max_pool(x, (2, 2), (1, 2), pads)
  ref = lambda x: nn.max_pool(x[:, 1:, :-2], (2, 2), (1, 2), ((0, 1), (1, 0)))
  np.testing.assert_allclose(ours(x), nn.max_pool(x, (2, 2), (1, 2), pads), **TOL)
  f = lambda pool: jax.grad(lambda x: jnp.sum(jnp.sin(pool(x))))(x)
  np.testing.assert_allclose(ours(x), ref(x), **TOL)
  np.testing.assert_allclose(f(ours), f(ref), **TOL)


def test_max_pool_fn_follows_conv_class():
  assert max_pool_fn("patches") is max_pool
  assert max_pool_fn("lax") is nn.max_pool
  assert max_pool_fn("auto") is (max_pool if conv_class("auto") is PatchConv else nn.max_pool)
  with pytest.raises(ValueError, match="strides"):
    max_pool(jnp.ones((1, 4, 4, 1)), (2, 2), (2,))
  with pytest.raises(ValueError, match="spatial"):
    max_pool(jnp.ones((4, 4)), (2, 2))
  with pytest.raises(ValueError, match="does not fit"):
    max_pool(jnp.ones((1, 2, 2, 1)), (3, 3), padding="VALID")
  # Integer inputs have no -inf padding: nn.max_pool's own code handles them.
  xi = jnp.arange(32).reshape(2, 4, 4, 1)
  np.testing.assert_array_equal(max_pool(xi, (2, 2), (2, 2)), nn.max_pool(xi, (2, 2), (2, 2)))


@pytest.mark.parametrize("single_device", [False, True])
@pytest.mark.parametrize("n", [5, 6])
@pytest.mark.parametrize("parts", [1, 2, 3])
def test_max_pool_gradient_columns_in_blocks_of_examples(parts, n, single_device, monkeypatch):
  # Overlapping windows route the tangent in blocks of examples (a
  # concatenation in the transpose, for XLA:CPU's fusion); several VJP columns
  # at once (vmap, as the diagonal GGN back-propagates them). Several devices:
  # strided blocks, batch 6 in blocks, batch 5 (not a multiple of 2 or 3) in
  # one piece; one device: contiguous blocks of any batch size.
  monkeypatch.setattr(curvax.layers, "TANGENT_PARTS", parts)
  monkeypatch.setattr(curvax.layers, "_single_device", lambda: single_device)
  x = jnp.round(jax.nn.relu(jax.random.normal(jax.random.PRNGKey(0), (n, 9, 9, 2),
                                              jnp.float64)), 1)
  cols = jax.random.normal(jax.random.PRNGKey(1), (4, n, 5, 5, 2), jnp.float64)

  def columns(pool):
    _, vjp = jax.vjp(pool, x)
    return jax.jit(jax.vmap(lambda c: vjp(c)[0]))(cols)

  ours = columns(lambda x: max_pool(x, (3, 3), (2, 2), "SAME"))
  ref = columns(lambda x: nn.max_pool(x, (3, 3), (2, 2), "SAME"))
  np.testing.assert_allclose(ours, ref, **TOL)


@pytest.mark.parametrize("padding,ref_padding", [
    ("same", "same"), ("valid", "valid"),
    (1, ((1, 1), (1, 1))),   # an int pads every spatial axis by that much on both sides
])
def test_max_pool_reads_padding_as_nn_max_pool(padding, ref_padding):
  x = jax.random.normal(jax.random.PRNGKey(0), (2, 5, 6, 2), jnp.float64)
  ours = lambda x: max_pool(x, (2, 3), (2, 2), padding)
  ref = lambda x: nn.max_pool(x, (2, 3), (2, 2), ref_padding)
  value_and_grad = lambda pool: jax.jit(jax.value_and_grad(
      lambda x: jnp.sum(jnp.sin(pool(x)) * jnp.arange(1.0, 1.0 + pool(x).size).reshape(
          pool(x).shape))))(x)
  np.testing.assert_allclose(ours(x), ref(x), **TOL)
  for a, b in zip(value_and_grad(ours), value_and_grad(ref)):
    np.testing.assert_allclose(a, b, **TOL)


@pytest.mark.parametrize("kwargs,x_shape,match", [
    (dict(padding=((1, 2, 3), (1, 1))), (1, 5, 5, 1), "spatial axes"),   # not a (lo, hi) pair
    (dict(), (1, 2, 5, 5, 1), "needs inputs"),                          # two batch axes
])
def test_patch_conv_rejects_malformed_padding_and_extra_axes(kwargs, x_shape, match):
  with pytest.raises(ValueError, match=match):
    PatchConv(2, (3, 3), **kwargs).init(jax.random.PRNGKey(0), jnp.ones(x_shape))
