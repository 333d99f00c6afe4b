"""Optimizer states and updates that XLA can donate and apply in place.

`own_buffers` gives an ``init`` state no shared or parameter-aliasing buffers;
`ordered_after` makes an update depend on the conds that read ``params``. (Where
the update already depends on a cond's output, as probabilistic
preconditioning's phase test reads its ``round_step``, that dependency does the
same job with nothing added.)
"""

from __future__ import annotations

from typing import Any, TypeVar

import jax
import jax.numpy as jnp

T = TypeVar("T")


def own_buffers(tree: T) -> T:
  """``tree`` with every array leaf in a buffer of its own.

  ``jax.jit(step, donate_argnums=...)``, the usual way to let XLA update the
  parameters and the optimizer state in place, rejects a donated argument two
  of whose leaves share a buffer ("Attempt to donate the same buffer twice"),
  and a state leaf that IS a parameter array is deleted with the parameters
  when those are donated. A state built from one shared zero in several fields,
  or holding the initial parameters, has both problems. ``init`` functions
  return their state through this function: one copy of the state, once.
  """
  return jax.tree_util.tree_map(
      lambda x: jnp.array(x, copy=True) if isinstance(x, jax.Array) else x, tree)


def ordered_after(tree: T, values: Any, whole: Any = ()) -> T:
  """``tree``, unchanged, computed after every array in ``values``.

  XLA orders operations by their data dependencies only. When a transform's
  ``lax.cond`` reads ``params`` (e.g. a Jacobian-vector product on tracked
  steps) while the update it returns does not depend on that cond, XLA cannot
  order the read before the caller's in-place ``params + update`` and copies
  the parameters on every step to protect it. Multiplying ``tree`` by a one
  computed from ``values`` (``1 + 0 * v`` with ``v`` a finite float taken from
  each array) adds that dependency at no cost: the product fuses into the
  parameter update, and ``x * 1`` is ``x`` exactly (infinities and NaNs
  included). Floating-point leaves only. Since one element stands for each
  array, pass an array assembled from parts (a concatenation, e.g. a
  `curvax._packed.PackedDict`'s vectors) as its parts: XLA folds element 0 of
  a concatenation into its first part and the others would stay unordered.
  Or pass it in ``whole``: each array there is summed, so every element (every
  part) comes first, at one reduction per array (a `PackedDict` of dozens of
  records: a few reductions, where its parts' elements cost XLA:GPU a kernel
  each).
  """
  firsts = [jnp.ravel(v)[0].astype(jnp.float32) for v in jax.tree_util.tree_leaves(values)
            if isinstance(v, jax.Array) and v.size]
  firsts += [jnp.sum(v).astype(jnp.float32) for v in jax.tree_util.tree_leaves(whole)
             if isinstance(v, jax.Array) and v.size]
  if not firsts:
    return tree
  v = sum(jnp.where(jnp.isfinite(x), x, 0.0) for x in firsts)
  one = 1.0 + 0.0 * v        # XLA does not fold x * 0 for floats (NaN, inf)
  return jax.tree_util.tree_map(lambda x: x * one.astype(x.dtype), tree)
