"""curvax._checks.tree_all_finite: the non-finite guard shared by the transforms."""

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
