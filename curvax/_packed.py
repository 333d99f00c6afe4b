"""A read-only dict of pytrees of arrays, stored as one flat vector per dtype.

Optimizer states are passed in and out of every jitted training step, and each
array of a state costs the host work of a call (flattening, a buffer-table
entry, wrapping the output): on a GPU machine ~10 us per array in and out,
longer than a small model's step (docs/performance.md). A state field holding
dozens of scalars and per-layer values (`curvax.diagnostics.monitor`'s
records) is therefore kept as a `PackedDict`: a pytree whose leaves are one
vector per dtype, with the keys, tree structures and shapes as static data,
read like the dict it was packed from (``d["loss"]``, ``d.items()``).
"""

from __future__ import annotations

from typing import Any, Dict, Iterator, Mapping, Tuple

import jax
import jax.numpy as jnp
import numpy as np


@jax.tree_util.register_pytree_node_class
class PackedDict(Mapping):
  """``{key: pytree of arrays}`` stored as one flat vector per dtype.

  ``PackedDict.pack(d)`` concatenates the leaves of each dtype (in key order)
  into one vector; ``packed[key]`` slices and reshapes them back (on device
  arrays and numpy arrays alike; leading batch axes, e.g. from ``jax.vmap``
  over states, are kept). As a pytree its leaves are the vectors, so states
  holding one compare, ``lax.cond`` and donate like any other.
  """

  def __init__(self, vectors: Tuple[Any, ...], layout: Tuple[Any, ...]):
    # No validation: tree_unflatten passes whatever stands in for the leaves.
    self._vectors = tuple(vectors)
    self._layout = layout  # ((key, treedef, ((group, offset, shape), ...)), ...), dtypes

  @classmethod
  def pack(cls, values: Mapping[str, Any]) -> "PackedDict":
    """Packs ``values`` (a mapping of pytrees of arrays) into one vector per dtype.

    Keys are sorted, so that mappings built in different orders (e.g. the two
    branches of a ``lax.cond``) pack to the same structure.
    """
    dtypes = sorted({jnp.result_type(x).name for tree in values.values()
                     for x in jax.tree_util.tree_leaves(tree)})
    parts = {name: [] for name in dtypes}
    sizes = dict.fromkeys(dtypes, 0)
    entries = []
    for key, tree in sorted(values.items()):
      leaves, treedef = jax.tree_util.tree_flatten(tree)
      slots = []
      for x in leaves:
        x = jnp.asarray(x)
        group = dtypes.index(x.dtype.name)
        slots.append((group, sizes[x.dtype.name], tuple(x.shape)))
        sizes[x.dtype.name] += x.size
        parts[x.dtype.name].append(jnp.ravel(x))
      entries.append((key, treedef, tuple(slots)))
    vectors = tuple(jnp.concatenate(parts[name]) if parts[name] else jnp.zeros((0,), name)
                    for name in dtypes)
    return cls(vectors, (tuple(entries), tuple(dtypes)))

  def _entry(self, key):
    for entry in self._layout[0]:
      if entry[0] == key:
        return entry
    raise KeyError(key)

  def __getitem__(self, key: str) -> Any:
    _, treedef, slots = self._entry(key)
    leaves = []
    for group, offset, shape in slots:
      v = self._vectors[group]
      size = int(np.prod(shape, dtype=np.int64))
      leaves.append(v[..., offset:offset + size].reshape(v.shape[:-1] + shape))
    return jax.tree_util.tree_unflatten(treedef, leaves)

  def __iter__(self) -> Iterator[str]:
    return (entry[0] for entry in self._layout[0])

  def __len__(self) -> int:
    return len(self._layout[0])

  def __contains__(self, key: object) -> bool:
    return any(entry[0] == key for entry in self._layout[0])

  def __repr__(self) -> str:
    shapes = [getattr(v, "shape", v) for v in self._vectors]
    return f"PackedDict(keys={list(self)}, vectors={shapes})"

  def unpack(self) -> Dict[str, Any]:
    """The plain dict it was packed from."""
    return {key: self[key] for key in self}

  def tree_flatten(self):
    return self._vectors, self._layout

  @classmethod
  def tree_unflatten(cls, layout, vectors):
    return cls(tuple(vectors), layout)
