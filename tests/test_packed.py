"""curvax._packed.PackedDict: a dict of pytrees stored as one vector per dtype."""

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from curvax import diagnostics as dg
from curvax._packed import PackedDict

import reference as ref


def _values(scale=1.0):
  return {"loss": jnp.float32(1.5 * scale),
          "norm_layers": {"w": jnp.float32(2.0 * scale), "b": {"c": jnp.float32(-3.0)}},
          "hist": jnp.arange(5.0, dtype=jnp.float32) * scale,
          "low": jnp.full((2, 3), 0.25 * scale, jnp.bfloat16),
          "grid": jnp.arange(6, dtype=jnp.int32).reshape(3, 2)}


def _assert_same(a, b):
  assert jax.tree_util.tree_structure(a) == jax.tree_util.tree_structure(b)
  for x, y in zip(jax.tree_util.tree_leaves(a), jax.tree_util.tree_leaves(b)):
    assert jnp.asarray(x).dtype == jnp.asarray(y).dtype and np.shape(x) == np.shape(y)
    np.testing.assert_array_equal(np.asarray(x, np.float64), np.asarray(y, np.float64))


def test_round_trip_one_vector_per_dtype():
  values = _values()
  packed = jax.jit(PackedDict.pack)(values)
  vectors = jax.tree_util.tree_leaves(packed)
  assert sorted(v.dtype.name for v in vectors) == ["bfloat16", "float32", "int32"]
  assert sum(v.size for v in vectors) == sum(
      x.size for x in jax.tree_util.tree_leaves(values))
  assert list(packed) == sorted(values) and len(packed) == 5 and "hist" in packed
  for key in values:
    _assert_same(packed[key], values[key])
  _assert_same(packed.unpack(), values)
  with pytest.raises(KeyError):
    packed["nope"]   # pylint: disable=pointless-statement


def test_insertion_order_does_not_matter_and_cond_accepts_both():
  a = PackedDict.pack(_values())
  b = PackedDict.pack(dict(reversed(list(_values(2.0).items()))))
  assert jax.tree_util.tree_structure(a) == jax.tree_util.tree_structure(b)
  picked = jax.jit(lambda p: jax.lax.cond(p, lambda: a, lambda: b))(False)
  _assert_same(picked["norm_layers"], _values(2.0)["norm_layers"])


def test_leading_axes_from_vmap_and_host_copies():
  stacked = jax.vmap(lambda s: PackedDict.pack(_values(s)))(jnp.arange(3.0))
  assert stacked["low"].shape == (3, 2, 3) and stacked["loss"].shape == (3,)
  np.testing.assert_allclose(stacked["norm_layers"]["w"], [0.0, 2.0, 4.0])
  host = jax.tree_util.tree_map(np.asarray, stacked)   # numpy vectors slice the same way
  assert isinstance(host["hist"], np.ndarray)
  np.testing.assert_array_equal(host["hist"][2], np.arange(5.0) * 2)


def test_monitor_records_are_one_array_per_dtype():
  # The monitor's records (dozens of scalars and per-layer values) travel as
  # one array (per dtype) through every jitted step, and read as before.
  apply_fn, loss, params, batch = ref.problem("mlp", n=6)
  tx = dg.monitor(optax.sgd(0.1), apply_fn, loss, "business", every=1)
  state = tx.init(params)
  assert len(jax.tree_util.tree_leaves(state.diagnostics)) <= 2
  grads = jax.grad(lambda p: jnp.mean(loss(apply_fn(p, batch[0]), batch[1])))(params)
  _, state = jax.jit(lambda g, s, p: tx.update(g, s, p, batch=batch))(grads, state, params)
  layers = state.diagnostics["grad_norm_layers"]
  assert jax.tree_util.tree_structure(layers) == jax.tree_util.tree_structure(params)
  for norm, g in zip(jax.tree_util.tree_leaves(layers), jax.tree_util.tree_leaves(grads)):
    np.testing.assert_allclose(norm, np.linalg.norm(np.ravel(g)), rtol=1e-6)
  np.testing.assert_allclose(state.diagnostics["grad_norm"],
                             np.linalg.norm(np.concatenate([np.ravel(g) for g in
                                                            jax.tree_util.tree_leaves(grads)])),
                             rtol=1e-6)
  assert dg.record(state)["step"] == 0
