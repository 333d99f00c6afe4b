"""curvax._packed.PackedDict: a dict of pytrees stored as one vector per dtype."""

from typing import NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from curvax import diagnostics as dg
from curvax._packed import PackedDict, PackedTree, install_packed_fields

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


def test_packed_tree_round_trip_under_jit_one_vector_per_dtype():
  tree = {"w": jnp.arange(6.0).reshape(2, 3), "b": (jnp.ones(4), jnp.arange(3, dtype=jnp.int32))}
  packed = PackedTree.pack(tree)
  assert sorted(v.shape for v in jax.tree_util.tree_leaves(packed)) == [(3,), (10,)]
  out = jax.jit(lambda p: jax.tree_util.tree_map(lambda v: 2 * v, p))(packed)
  assert isinstance(out, PackedTree)
  _assert_same(out.unpack(), jax.tree_util.tree_map(lambda x: 2 * x, tree))


def test_packed_tree_update_writes_each_slot_in_place():
  """``update`` gives what unpacking, mapping and packing gives (mixed dtypes,
  another tree's leaves matched in order), as a donated jitted call without a
  copy of the packed vectors; a tree of another leaf count is refused."""
  tree = {"w": jnp.arange(6.0).reshape(2, 3), "b": (jnp.ones(4), jnp.arange(3, dtype=jnp.int32)),
          "v": jnp.linspace(-1.0, 1.0, 5)}
  other = jax.tree_util.tree_map(lambda x: x + 3, tree)
  fn = lambda x, y: 2 * x + y
  want = PackedTree.pack(jax.tree_util.tree_map(fn, tree, other))
  step = jax.jit(lambda p, o: p.update(fn, o), donate_argnums=0)
  hlo = step.lower(PackedTree.pack(tree), other).compile().as_text()
  assert " copy(" not in hlo
  out = step(PackedTree.pack(tree), other)
  assert isinstance(out, PackedTree)
  _assert_same(out.unpack(), want.unpack())
  for got, expected in zip(jax.tree_util.tree_leaves(out), jax.tree_util.tree_leaves(want)):
    np.testing.assert_array_equal(got, expected)
  with pytest.raises(ValueError, match="leaves"):
    PackedTree.pack(tree).update(fn, {"w": tree["w"]})
  # Read through unpack() only: iterating or indexing the packing itself
  # would see its Mapping key "tree", not the tree's leaves.
  with pytest.raises(TypeError, match="unpack"):
    list(PackedTree.pack((jnp.ones(2), jnp.ones(3))))
  with pytest.raises(TypeError, match="unpack"):
    PackedTree.pack((jnp.ones(2), jnp.ones(3)))[0]


def test_packed_rows_write_and_read_one_row_per_call_in_place():
  """``zeros(like, lead=(M,))`` holds M rows of ``like`` in one (M, size) array
  per dtype; ``set_at(i, tree)`` gives the buffers with row i of every leaf
  replaced (mixed dtypes, checked against numpy), unless ``keep`` or ``i`` out
  of bounds; ``row(i)`` reads it back; a donated jitted write copies nothing."""
  like = (jax.ShapeDtypeStruct((3,), jnp.float32), jax.ShapeDtypeStruct((2, 2), jnp.bfloat16),
          jax.ShapeDtypeStruct((4,), jnp.float32))
  rows = PackedTree.zeros(like, lead=(5,))
  assert sorted(v.shape for v in jax.tree_util.tree_leaves(rows)) == [(5, 4), (5, 7)]
  assert [x.shape for x in rows.unpack()] == [(5, 3), (5, 2, 2), (5, 4)]
  rng = np.random.default_rng(0)
  want = [np.zeros((5,) + x.shape) for x in like]
  write = jax.jit(lambda r, i, t, keep: r.set_at(i, t, keep), donate_argnums=0)
  for i, keep in [(2, False), (0, False), (4, False), (2, True), (5, False), (-1, False)]:
    tree = tuple(jnp.asarray(rng.normal(size=x.shape), x.dtype) for x in like)
    rows = write(rows, i, tree, keep)
    if not keep and 0 <= i < 5:
      for w, t in zip(want, tree):
        w[i] = np.asarray(t, np.float64)
    for got, w, x in zip(rows.unpack(), want, like):
      assert got.dtype == x.dtype
      np.testing.assert_array_equal(np.asarray(got, np.float64), w)
  for i in range(5):
    for got, w in zip(jax.jit(lambda r, i: r.row(i))(rows, i), want):
      np.testing.assert_array_equal(np.asarray(got, np.float64), w[i])
  # In place: no copy of the buffers. (Not asserted for the bfloat16 vector:
  # XLA:CPU copies a bfloat16 buffer around a select-and-write of a whole
  # row, as it does for `.at[i].set(..., mode="drop")` on one.)
  like32 = (jax.ShapeDtypeStruct((3,), jnp.float32), jax.ShapeDtypeStruct((2, 2), jnp.int32))
  tree32 = tuple(jnp.ones(x.shape, x.dtype) for x in like32)
  hlo = write.lower(PackedTree.zeros(like32, lead=(5,)), 1, tree32, True).compile().as_text()
  assert " copy(" not in hlo
  with pytest.raises(ValueError, match="leaves"):
    rows.set_at(0, tree[:2])
  with pytest.raises(ValueError, match="leading axis"):
    PackedTree.pack(tree).set_at(0, tree)


@pytest.mark.parametrize("preset", ["economy", "full"])
def test_monitor_parameter_buffers_are_one_array_per_dtype(preset):
  # theta_0, the last update and HessMaxEV's vector pass through most steps
  # untouched: one array each, not one per parameter tensor, and they read
  # back as the trees (the state of the 3c3d CNN's monitor: 33 -> 6 arrays).
  apply_fn, loss, params, batch = ref.problem("mlp", n=6)
  tx = dg.monitor(optax.sgd(0.1), apply_fn, loss, preset, every=2)
  state = tx.init(params)
  n_leaves = len(jax.tree_util.tree_leaves(params))
  assert n_leaves == 4
  fields = ["init_params", "last_update"] + (["eigenvector"] if preset == "full" else [])
  for f in fields:
    assert len(jax.tree_util.tree_leaves(getattr(state, f))) == 1
  # The scalars in two arrays, read by name: the whole state (SGD's is empty)
  # is the records (one array per dtype), those two, the buffers and the key.
  num_records = len(jax.tree_util.tree_leaves(state.diagnostics))
  assert len(jax.tree_util.tree_leaves(state)) == num_records + 3 + len(fields)
  assert (int(state.count), bool(state.tracked), int(state.tracked_step)) == (0, False, -1)
  assert np.isnan(state.alpha) and state.alpha_start.shape == (5,)
  _assert_same(state.init_params.unpack(), params)
  grads = jax.grad(lambda p: jnp.mean(loss(apply_fn(p, batch[0]), batch[1])))(params)
  step = jax.jit(lambda g, s, p: tx.update(g, s, p, batch=batch))
  updates, state = step(grads, state, params)          # step 0: tracked, stores the update
  _assert_same(state.last_update.unpack(), updates)
  assert (int(state.count), bool(state.tracked), int(state.tracked_step)) == (1, True, 0)
  _, state2 = step(grads, state, optax.apply_updates(params, updates))   # untracked
  assert (int(state2.count), bool(state2.tracked), int(state2.tracked_step)) == (2, False, 0)
  assert bool(state2.alpha_fresh) and int(state2.alpha_step) == 0 and np.isfinite(state2.alpha)
  _assert_same(state2.last_update.unpack(), updates)
  _assert_same(state2.init_params.unpack(), params)


class _Packed(NamedTuple):
  count: jax.Array
  ints: jax.Array
  floats: jax.Array
  other: jax.Array


install_packed_fields(_Packed, {"ints": ("a", "flag"), "floats": ("x", "y", "z")},
                      casts={"flag": bool})


def _packed_state():
  return _Packed(jnp.asarray(3), jnp.asarray([4, 1], jnp.int32),
                 jnp.asarray([[1.0, 2.0, 3.0], [4.0, 5.0, 6.0]]), jnp.zeros(2))


def test_installed_names_read_and_replace_entries_of_packed_arrays():
  s = _packed_state()
  assert int(s.a) == 4 and s.flag.dtype == jnp.bool_ and bool(s.flag)
  np.testing.assert_array_equal(s.y, [2.0, 5.0])             # one value per row (group)
  assert list(s.scalars()) == ["a", "flag", "x", "y", "z"] == list(_Packed._scalar_names)
  assert _Packed._packed_fields == ("ints", "floats")
  t = s._replace(a=7, z=jnp.asarray([-1.0, -2.0]), count=jnp.asarray(9), flag=False)
  np.testing.assert_array_equal(t.ints, [7, 0])
  np.testing.assert_array_equal(t.floats, [[1.0, 2.0, -1.0], [4.0, 5.0, -2.0]])
  assert int(t.count) == 9 and t.ints.dtype == jnp.int32
  np.testing.assert_array_equal(s.ints, [4, 1])               # the original is unchanged
  with pytest.raises(ValueError):
    s._replace(nonexistent=1)
  # Leading axes (vmap over states) are kept; under jit the names trace.
  batched = jax.vmap(lambda c: _packed_state()._replace(a=c))(jnp.arange(3))
  np.testing.assert_array_equal(batched.a, [0, 1, 2])
  assert float(jax.jit(lambda st: st.x.sum() + st.a)(s)) == 5.0 + 4


def test_install_rejects_unknown_fields_and_repeated_names():
  class Twice(NamedTuple):
    p: jax.Array
    q: jax.Array
  with pytest.raises(ValueError, match="no field"):
    install_packed_fields(Twice, {"r": ("a",)})
  with pytest.raises(ValueError, match="named twice"):
    install_packed_fields(Twice, {"p": ("a",), "q": ("a",)})
  with pytest.raises(ValueError, match="named twice"):
    install_packed_fields(Twice, {"p": ("q",)})
