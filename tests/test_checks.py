"""curvax._checks.tree_all_finite (and its scaled form): the non-finite guards shared by
the transforms, and the trace-time input checks."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from curvax import _checks


def _tree(dtype):
  return {"w": jnp.full((3, 4), 1e30, dtype), "b": jnp.arange(4, dtype=dtype),
          "n": jnp.arange(3)}   # an integer leaf: always finite


@pytest.mark.parametrize("dtype", [jnp.float32, jnp.float64, jnp.bfloat16])
@pytest.mark.parametrize("bad", [np.inf, -np.inf, np.nan, None])
@pytest.mark.parametrize("leaf", ["w", "b"])
def test_tree_all_finite_matches_numpy_under_jit(dtype, bad, leaf):
  tree = _tree(dtype)
  if bad is not None:
    tree[leaf] = tree[leaf].at[(1,) * tree[leaf].ndim].set(bad)
  expected = all(np.all(np.isfinite(np.asarray(x, np.float64))) for x in jax.tree.leaves(tree))
  assert bool(jax.jit(_checks.tree_all_finite)(tree)) == expected == (bad is None)


def test_tree_all_finite_large_finite_values_and_edge_cases():
  # Values at the edge of the float32 range are finite: no overflow false alarm.
  big = jnp.full((1000,), jnp.finfo(jnp.float32).max, jnp.float32)
  assert bool(_checks.tree_all_finite([big, -big]))
  assert bool(_checks.tree_all_finite({}))
  assert bool(_checks.tree_all_finite({"i": jnp.arange(3)}))
  assert not bool(_checks.tree_all_finite([jnp.zeros(2), jnp.array([1.0, jnp.nan])]))


@pytest.mark.parametrize("dtype", [jnp.float32, jnp.bfloat16])
def test_tree_all_finite_no_overflow_false_alarm(dtype):
  """Finite entries whose squares overflow (a sum-of-squares test would call
  them non-finite) are finite; a NaN or inf among small or huge entries is
  found."""
  small = {"a": jnp.linspace(-3.0, 3.0, 50).astype(dtype), "b": jnp.ones((2, 3), dtype)}
  assert bool(jax.jit(_checks.tree_all_finite)(small))
  for bad in [np.nan, np.inf]:
    assert not bool(jax.jit(_checks.tree_all_finite)(
        {**small, "b": small["b"].at[1, 2].set(bad)}))
  huge = {"a": jnp.full((4,), 1e20, dtype), "b": small["b"]}   # (1e20)^2 overflows
  assert not bool(jnp.isfinite(jnp.vdot(huge["a"], huge["a"])))
  assert bool(jax.jit(_checks.tree_all_finite)(huge))
  assert not bool(jax.jit(_checks.tree_all_finite)(
      {**huge, "a": huge["a"].at[0].set(-np.inf)}))


@pytest.mark.parametrize("dtype", [jnp.float32, jnp.float64, jnp.bfloat16, jnp.float16])
@pytest.mark.parametrize("scale", [0.0, 1.0, -3.0, 1e10, 1e36, 7e4, np.inf, np.nan])
@pytest.mark.parametrize("bad", [None, np.inf, -np.inf, np.nan, "huge"])
def test_scaled_tree_all_finite_equals_checking_the_scaled_tree(dtype, scale, bad):
  # The shortcut (one max per leaf, scaled afterwards) against the definition:
  # every entry of scale * tree, formed in the leaf's dtype.
  rng = np.random.RandomState(0)
  tree = {"w": jnp.asarray(rng.randn(3, 4), dtype), "b": jnp.asarray(rng.randn(5), dtype),
          "n": jnp.arange(3), "e": jnp.zeros((0,), dtype)}
  if bad == "huge":   # finite, but scaling may overflow it (float16: 65504)
    tree["b"] = tree["b"].at[2].set(0.5 * float(jnp.finfo(dtype).max))
  elif bad is not None:
    tree["w"] = tree["w"].at[1, 2].set(bad)
  scale = jnp.asarray(scale, jnp.float32)
  step = jax.tree.map(lambda x: scale.astype(x.dtype) * x
                      if jnp.issubdtype(x.dtype, jnp.inexact) else x, tree)
  expected = bool(_checks.tree_all_finite(step))
  assert bool(jax.jit(_checks.scaled_tree_all_finite)(scale, tree)) == expected
  assert bool(_checks.scaled_tree_all_finite(scale, {})) and bool(
      _checks.scaled_tree_all_finite(scale, {"i": jnp.arange(2)}))


# ---------------------------------------------------------------------------
# The trace-time checks: each bad input raises the documented error type with
# a message naming the problem; good input passes through unchanged.

_X, _Y = np.zeros((3, 2)), np.zeros((3,))


@pytest.mark.parametrize("batch, error, match", [
    (None, TypeError, "`batch` is required"),
    ({"x": _X, "y": _Y}, TypeError, "pair .* got dict"),
    ((_X,), TypeError, "of length 1"),
    ((_X, _Y, _Y), TypeError, "of length 3"),
    ((_X, _Y[:2]), ValueError, "3 inputs and 2 targets"),
    ((_X[:0], _Y[:0]), ValueError, "empty"),
    (({}, _Y), TypeError, "batch\\[0\\] \\(inputs\\) holds no arrays"),
    ((np.float32(1.0), _Y), ValueError, "batch\\[0\\] .*leading batch axis; got a scalar"),
    (({"a": _X, "b": np.zeros((4, 1))}, _Y), ValueError, "disagree on the batch size: \\[3, 4\\]"),
])
def test_check_batch_rejects(batch, error, match):
  with pytest.raises(error, match=match):
    _checks.check_batch(batch)


def test_check_batch_accepts_pairs_and_pytree_inputs():
  inputs = {"a": _X, "b": np.zeros((3, 5, 1))}
  for batch in [(_X, _Y), [_X, _Y], (inputs, _Y)]:
    x, y = _checks.check_batch(batch, "eval_batch")
    assert x is batch[0] and y is batch[1]
    assert _checks.batch_size(batch) == 3
  with pytest.raises(ValueError, match="`eval_batch`"):
    _checks.check_batch((_X, _Y[:1]), "eval_batch")


def test_check_tree_like():
  ref = {"w": np.zeros((2, 3)), "b": np.zeros(3)}
  _checks.check_tree_like({"w": np.ones((2, 3)), "b": np.ones(3)}, ref)
  with pytest.raises(ValueError, match="`v` must be a pytree shaped like `params`"):
    _checks.check_tree_like({"w": np.ones((2, 3))}, ref, "v")
  with pytest.raises(ValueError, match="at \\['w'\\] got shape \\(3, 2\\), expected \\(2, 3\\)"):
    _checks.check_tree_like({"w": np.ones((3, 2)), "b": np.ones(3)}, ref)


def test_require_kwarg_and_callable():
  assert _checks.require_kwarg(0, "batch", "t") == 0   # falsy but given
  with pytest.raises(TypeError, match="t.update needs the keyword argument `batch`"):
    _checks.require_kwarg(None, "batch", "t")
  assert _checks.require_callable(len, "f", "t", ()) is len
  with pytest.raises(TypeError, match="`f` must be a function.*static_args=\\('f',\\)"):
    _checks.require_callable(0.5, "f", "t", ("f",))


def test_static_int():
  assert _checks.static_int(3, "n", "t", 3, ()) == 3
  assert _checks.static_int(np.int64(4), "n", "t", 0, ()) == 4
  assert _checks.static_int(5.0, "n", "t", 0, ()) == 5
  for bad in (True, 2.5, "3", None):
    with pytest.raises(TypeError, match="`n` must be an int"):
      _checks.static_int(bad, "n", "t", 0, ())
  with pytest.raises(ValueError, match="`n` must be >= 3; got 2"):
    _checks.static_int(2, "n", "t", 3, ())
  with pytest.raises(TypeError, match="static Python int"):
    jax.jit(lambda v: _checks.static_int(v, "n", "t", 0, ("n",)))(3)


@pytest.mark.parametrize("bad", [np.nan, np.inf, None])
def test_tree_all_finite_checks_complex_leaves(bad):
  z = jnp.asarray([1.0 + 2.0j, 3.0j], jnp.complex64)
  if bad is not None:
    z = z.at[1].set(complex(0.0, bad))
  assert bool(jax.jit(_checks.tree_all_finite)({"z": z, "r": jnp.ones(2)})) == (bad is None)
