"""Exact and Monte-Carlo GGN diagonals, Hutchinson diagonal and trace estimates."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.flatten_util import ravel_pytree

import curvax
from curvax.curvature import diagonals
from reference import LOSSES, explicit_ggn, flat, problem

CONFIGS = [(m, l) for m in ("mlp", "cnn") for l in LOSSES]


@pytest.mark.parametrize("model,loss_name", CONFIGS)
def test_diag_ggn_exact_and_monte_carlo(model, loss_name):
  mc_check = model == "mlp" or loss_name == "softmax_cross_entropy"  # bounds compile time
  apply_fn, loss, params, batch = problem(model, loss_name, n=5)
  g = jax.jit(explicit_ggn, static_argnums=(0, 1))(apply_fn, loss, params, batch)
  num_repeats, num_samples = 16, 32

  @jax.jit
  def run(params, batch, keys):
    # chunk 2 on 5 examples: scanned chunks plus a remainder.
    exact = diagonals.diag_ggn(apply_fn, loss, params, batch, chunk_size=2)
    if not mc_check:
      return exact, None
    mc = jax.vmap(lambda k: diagonals.diag_ggn_mc(
        apply_fn, loss, params, batch, k, num_samples, chunk_size=None))(keys)
    return exact, mc

  keys = jax.random.split(jax.random.PRNGKey(0), num_repeats)
  exact, mc = run(params, batch, keys)
  np.testing.assert_allclose(flat(exact), np.diag(g), rtol=1e-9, atol=1e-12)
  if not mc_check:
    return
  # MC: independent repeats give the standard error of their mean; the mean of
  # num_repeats * num_samples draws must lie within 5 standard errors.
  mc = jax.vmap(lambda t: ravel_pytree(t)[0])(mc)  # (R, P)
  mean = mc.mean(0)
  stderr = mc.std(0, ddof=1) / np.sqrt(num_repeats)
  assert np.all(np.abs(mean - np.diag(g)) <= 5 * stderr + 1e-10), (
      np.max(np.abs(mean - np.diag(g)) / (stderr + 1e-12)))
  # ... and the error shrinks like 1/sqrt(samples): a single repeat is worse on average.
  assert np.mean(np.abs(mean - np.diag(g))) < np.mean(np.abs(mc[0] - np.diag(g)))


def test_mc_factor_needs_a_key_and_valid_sample_count():
  apply_fn, loss, params, batch = problem("mlp", "softmax_cross_entropy")
  with pytest.raises(ValueError, match="num_samples"):
    diagonals.diag_ggn_mc(apply_fn, loss, params, batch, jax.random.PRNGKey(0), 0)
  with pytest.raises(ValueError, match="targets"):
    diagonals.diag_ggn(apply_fn, loss, params, (batch[0], batch[1][:, None]))


def test_hutchinson_diagonal_and_trace_within_their_standard_error():
  apply_fn, loss, params, batch = problem("mlp", "softmax_cross_entropy")
  g = np.asarray(jax.jit(explicit_ggn, static_argnums=(0, 1))(apply_fn, loss, params, batch))
  m = 400

  @jax.jit
  def run(params, batch, key):
    mv = curvax.curvature.ggn_matvec(apply_fn, loss, params, batch)
    return (diagonals.hutchinson_diagonal(mv, params, key, m, batch_size=100),
            diagonals.hutchinson_trace(mv, params, key, m, batch_size=100))

  diag, trace = run(params, batch, jax.random.PRNGKey(3))
  # Rademacher probes: Var[z_i (Gz)_i] = sum_{j != i} G_ij^2,
  # Var[z'Gz] = 2 (||G||_F^2 - sum_i G_ii^2).
  off = g - np.diag(np.diag(g))
  sd_diag = np.sqrt(np.sum(off ** 2, axis=1) / m)
  sd_trace = np.sqrt(2 * np.sum(off ** 2) / m)
  assert np.all(np.abs(flat(diag) - np.diag(g)) <= 5 * sd_diag + 1e-12)
  assert abs(trace - np.trace(g)) <= 5 * sd_trace
  # Exact for a diagonal matrix (zero variance): guards against a wrong scale.
  d = jax.random.uniform(jax.random.PRNGKey(1), (7,))
  np.testing.assert_allclose(diagonals.hutchinson_diagonal(lambda v: d * v, d, jax.random.PRNGKey(2), 3), d)
  np.testing.assert_allclose(diagonals.hutchinson_trace(lambda v: d * v, d, jax.random.PRNGKey(2), 3), d.sum())


def test_hutchinson_rejects_a_matvec_of_the_wrong_shape():
  x = jnp.ones(3)
  with pytest.raises(ValueError, match="matvec"):
    diagonals.hutchinson_trace(lambda v: jnp.ones(4), x, jax.random.PRNGKey(0), 2)


@pytest.mark.parametrize("block_elements", [None, 1, 60])
def test_fast_path_conv_diag_ggn_in_blocks_equals_explicit(monkeypatch, block_elements):
  """Conv layers' factor columns are formed column by column and a block of
  examples at a time (`flax_layers.DIAG_BLOCK_ELEMENTS`): blocks of 1 and of 2 or
  3 examples with a remainder (7 examples) give the explicit diagonal."""
  from test_per_example import _LinenCNN, _linen_problem  # pylint: disable=g-import-not-at-top
  from curvax.curvature import flax_layers  # pylint: disable=g-import-not-at-top
  if block_elements is not None:
    monkeypatch.setattr(flax_layers, "DIAG_BLOCK_ELEMENTS", block_elements)
  apply_fn, loss, params, batch = _linen_problem(_LinenCNN(), "softmax_cross_entropy",
                                                 (6, 6, 1), n=7)
  fast = jax.jit(lambda p, b: diagonals.diag_ggn(apply_fn, loss, p, b, method="layers"))(
      params, batch)
  g = jax.jit(explicit_ggn, static_argnums=(0, 1))(apply_fn, loss, params, batch)
  np.testing.assert_allclose(flat(fast), np.diag(g), rtol=1e-9, atol=1e-12)


def test_fast_path_diag_ggn_equals_vmap_path_and_explicit():
  from test_per_example import _LinenCNN, _LinenMLP, _linen_problem  # pylint: disable=g-import-not-at-top
  for module, x_shape, loss_name in [(_LinenMLP(), (4,), "sigmoid_binary_cross_entropy"),
                                     (_LinenCNN(), (6, 6, 1), "softmax_cross_entropy")]:
    apply_fn, loss, params, batch = _linen_problem(module, loss_name, x_shape, n=4)
    key = jax.random.PRNGKey(4)

    @jax.jit
    def run(params, batch):
      return [f(apply_fn, loss, params, batch, *extra, method=m, chunk_size=None)
              for f, extra in ((diagonals.diag_ggn, ()), (diagonals.diag_ggn_mc, (key, 3)))
              for m in ("layers", "vmap")]

    exact_fast, exact_vmap, mc_fast, mc_vmap = run(params, batch)
    g = jax.jit(explicit_ggn, static_argnums=(0, 1))(apply_fn, loss, params, batch)
    np.testing.assert_allclose(flat(exact_fast), np.diag(g), rtol=1e-9, atol=1e-12)
    np.testing.assert_allclose(flat(exact_fast), flat(exact_vmap), rtol=1e-9, atol=1e-12)
    np.testing.assert_allclose(flat(mc_fast), flat(mc_vmap), rtol=1e-9, atol=1e-12)


@pytest.mark.parametrize("case", [0, 1, 2])
def test_fast_path_diag_ggn_keyword_inputs_and_lifted_transforms(case):
  """diag_ggn on Dense layers called with ``inputs=``, under nn.remat /
  nn.checkpoint and under nn.map_variables: "auto" equals the vmap path (the
  fast path for the first, a fallback for the others); "layers" raises for the
  others."""
  from test_per_example import LIFTED_OR_KEYWORD, _linen_problem  # pylint: disable=g-import-not-at-top
  module, unsupported = LIFTED_OR_KEYWORD[case]
  apply_fn, loss, params, batch = _linen_problem(module, "softmax_cross_entropy", (3,), n=5)
  methods = ["vmap", "auto"] if unsupported else ["vmap", "auto", "layers"]
  slow, *others = jax.jit(lambda p, b: [diagonals.diag_ggn(apply_fn, loss, p, b, method=m,
                                                           chunk_size=None)
                                        for m in methods])(params, batch)
  for got in others:
    np.testing.assert_allclose(flat(got), flat(slow), rtol=1e-9, atol=1e-12)
  if unsupported:
    with pytest.raises(ValueError, match=unsupported):
      diagonals.diag_ggn(apply_fn, loss, params, batch, method="layers")


@pytest.mark.parametrize("fn", [diagonals.hutchinson_diagonal, diagonals.hutchinson_trace])
@pytest.mark.parametrize("num_samples", [0, -2, 2.0])
def test_hutchinson_rejects_a_non_positive_or_non_int_sample_count(fn, num_samples):
  """Zero probes would give a NaN (empty mean) rather than an error."""
  with pytest.raises(ValueError, match="num_samples"):
    fn(lambda v: v, jnp.ones(3), jax.random.PRNGKey(0), num_samples)


@pytest.mark.parametrize("fn", ["diag_ggn", "diag_ggn_mc"])
def test_diag_ggn_rejects_an_unknown_method(fn):
  apply_fn, loss, params, batch = problem("mlp", "softmax_cross_entropy", n=3)
  extra = (jax.random.PRNGKey(0),) if fn == "diag_ggn_mc" else ()
  with pytest.raises(ValueError, match="method"):
    getattr(diagonals, fn)(apply_fn, loss, params, batch, *extra, method="fast")


def test_hutchinson_probes_are_independent_across_leaves():
  """Two leaves of the same shape coupled entry by entry: A = [[I, I], [I, I]]
  (diag 1, trace 8). With independent Rademacher probes z_i (Az)_i =
  1 + z_i z_{i+4} has mean 1 and variance 1, z'Az = 8 + 2 sum_i z_i z_{i+4}
  mean 8 and variance 16; probes shared between the leaves (z_a = z_b) would
  give 2 and 16 exactly."""
  params = {"a": jnp.zeros(4), "b": jnp.zeros(4)}
  matvec = lambda v: {"a": v["a"] + v["b"], "b": v["a"] + v["b"]}  # noqa: E731
  m = 400
  key = jax.random.PRNGKey(5)
  diag = jax.jit(lambda k: diagonals.hutchinson_diagonal(matvec, params, k, m,
                                                         batch_size=50))(key)
  trace = jax.jit(lambda k: diagonals.hutchinson_trace(matvec, params, k, m))(key)
  assert np.all(np.abs(flat(diag) - 1.0) <= 5 * np.sqrt(1.0 / m))
  assert abs(float(trace) - 8.0) <= 5 * np.sqrt(16.0 / m)
