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

from typing import Any, Dict, Iterator, Mapping, Optional, Sequence, Tuple

import jax
import jax.numpy as jnp
import numpy as np


def _layout(trees: Sequence[Tuple[str, Any]]) -> Tuple[Tuple[Any, ...], Dict[str, int]]:
  """The layout of `PackedDict` for ``[(key, pytree), ...]`` in that order (leaves:
  anything with ``shape`` and ``dtype``): ``((entries, dtypes), sizes)``, where
  each entry is ``(key, treedef, slots)``, a slot ``(dtype index, offset,
  shape)`` per leaf, and ``sizes[dtype]`` is the length of that dtype's vector."""
  flat = [(key, *jax.tree_util.tree_flatten(tree)) for key, tree in trees]
  dtypes = sorted({jnp.dtype(x.dtype).name for _, leaves, _ in flat for x in leaves})
  sizes = dict.fromkeys(dtypes, 0)
  entries = []
  for key, leaves, treedef in flat:
    slots = []
    for x in leaves:
      name = jnp.dtype(x.dtype).name
      slots.append((dtypes.index(name), sizes[name], tuple(x.shape)))
      sizes[name] += int(np.prod(x.shape, dtype=np.int64))
    entries.append((key, treedef, tuple(slots)))
  return (tuple(entries), tuple(dtypes)), sizes


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
    arrays = [(key, jax.tree_util.tree_map(jnp.asarray, tree))
              for key, tree in sorted(values.items())]
    layout, _ = _layout(arrays)
    parts = {name: [] for name in layout[1]}
    for _, tree in arrays:
      for x in jax.tree_util.tree_leaves(tree):
        parts[x.dtype.name].append(jnp.ravel(x))
    vectors = tuple(jnp.concatenate(parts[name]) if parts[name] else jnp.zeros((0,), name)
                    for name in layout[1])
    return cls(vectors, layout)

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


def install_packed_fields(cls: type, packs: Mapping[str, Sequence[str]],
                          casts: Optional[Mapping[str, Any]] = None) -> type:
  """Names the entries of a NamedTuple's packed arrays, as if they were fields.

  ``packs`` maps an array field of ``cls`` to the names of its entries along
  the last axis: ``state.<name>`` reads ``state.<field>[..., i]`` (cast to
  ``casts[name]`` if given; leading axes, e.g. of ``vmap``ped states, kept),
  ``state._replace(<name>=value)`` writes it, ``state.scalars()`` returns all
  of them by name; ``cls._scalar_names`` and ``cls._packed_fields`` list the
  names and the array fields (`curvax.problems.loggable_state` logs by them).
  A state holds its scalars this way because each array of a state costs a
  jitted call host time, and XLA:GPU updates each scalar array with a kernel
  of its own (docs/performance.md). Returns ``cls``.
  """
  casts = dict(casts or {})
  where = {}
  for field, names in packs.items():
    if field not in cls._fields:
      raise ValueError(f"{cls.__name__} has no field {field!r} to pack into.")
    for i, name in enumerate(names):
      if name in where or name in cls._fields:
        raise ValueError(f"{cls.__name__}: {name!r} is named twice.")
      where[name] = (field, i)

      def get(self, field=field, i=i, cast=casts.get(name)):
        value = getattr(self, field)[..., i]
        return value if cast is None else value.astype(cast)
      get.__name__ = name
      setattr(cls, name, property(get, doc=f"``{field}[..., {i}]``: see the class docstring."))

  replace_fields = cls._replace

  def _replace(self, **changes):
    packed = {name: changes.pop(name) for name in list(changes) if name in where}
    new = replace_fields(self, **changes)
    arrays = {}
    for name, value in packed.items():
      field, i = where[name]
      array = arrays.get(field, getattr(new, field))
      arrays[field] = array.at[..., i].set(jnp.asarray(value).astype(array.dtype))
    return replace_fields(new, **arrays) if arrays else new

  _replace.__doc__ = replace_fields.__doc__
  cls._replace = _replace
  cls._scalar_names = tuple(where)
  cls._packed_fields = tuple(packs)
  cls.scalars = lambda self: {name: getattr(self, name) for name in where}
  cls.scalars.__doc__ = "``{name: value}`` of all packed entries."
  return cls


@jax.tree_util.register_pytree_node_class
class PackedTree(PackedDict):
  """One pytree of arrays stored as one flat vector per dtype (a `PackedDict`
  of the single key ``"tree"``).

  ``PackedTree.pack(tree)`` packs it, ``.unpack()`` returns it (slices of the
  vectors, reshaped). For a state's parameter-shaped buffers that most steps
  pass through untouched (`curvax.diagnostics.monitor`'s ``theta_0``): one
  array per dtype instead of one per parameter tensor, so each jitted call
  moves fewer arrays in and out.
  """

  @classmethod
  def pack(cls, tree: Any) -> "PackedTree":  # pylint: disable=arguments-renamed
    return super().pack({"tree": tree})

  def unpack(self) -> Any:
    return PackedDict.__getitem__(self, "tree")

  # Read only through `unpack`: iterating or indexing the packing as the
  # Mapping it is built on would give its one key, "tree", where code written
  # for the unpacked tree (``for s in state.eigenvalues``) expects leaves.
  def __getitem__(self, key: Any) -> Any:
    raise TypeError(f"a PackedTree is read with .unpack() (then [{key!r}]), not indexed.")

  def __iter__(self) -> Iterator[str]:
    raise TypeError("a PackedTree is read with .unpack() (then iterated), not iterated.")

  # Mapping's == compares items, so iterates: identity instead (JAX compares
  # the layout, the pytree's static data, not the object).
  __eq__ = object.__eq__
  __hash__ = object.__hash__

  @classmethod
  def zeros(cls, like: Any, lead: Tuple[int, ...] = ()) -> "PackedTree":
    """Zeros packed with the layout of ``like`` (a pytree of arrays or
    ``jax.ShapeDtypeStruct``s) and leading axes ``lead`` on every vector:
    ``.unpack()`` gives each leaf with shape ``lead + leaf.shape``.

    With ``lead = (M,)`` this is a buffer of ``M`` rows, each a packed copy of
    ``like`` (`curvax.transforms.probabilistic_preconditioning`'s observations):
    one ``(M, size)`` array per dtype instead of one ``(M, ...)`` array per leaf.
    Nothing is concatenated (`pack` would be, which is slow for computed leaves).
    """
    layout, sizes = _layout([("tree", like)])
    return cls(tuple(jnp.zeros(tuple(lead) + (sizes[name],), name) for name in layout[1]),
               layout)

  def set_at(self, index: Any, tree: Any, keep: Any = False) -> "PackedTree":
    """This packing with ``tree``'s leaves written at ``index`` of the leading axis.

    For a packing with one leading axis (`zeros` with ``lead = (M,)``): leaf
    ``i`` of the result's ``unpack()`` has ``tree``'s leaf ``i`` as its row
    ``index`` (a traced integer, clamped to ``[0, M)``) and its other rows
    unchanged; where ``keep`` (a traced bool) holds, or ``index`` is out of
    bounds, no row changes. Each leaf's slot of the row is written by a
    ``lax.dynamic_update_slice`` of its own, in place when the vectors are
    donated; a write that may be skipped reads the slot it would overwrite (a
    select), nothing else is read. (``.at[index, slot].set(..., mode="drop")``
    does the same through a scatter, which XLA lowers with an index vector
    and a bounds check of its own per leaf: ~1.5 more kernels per write.)
    """
    (entry,), _ = self._layout
    leaves = jax.tree_util.tree_leaves(tree)
    if len(leaves) != len(entry[2]):
      raise ValueError(f"PackedTree.set_at: the tree has {len(leaves)} leaves, the "
                       f"packing {len(entry[2])}.")
    vectors = list(self._vectors)
    if any(v.ndim != 2 for v in vectors):
      raise ValueError("PackedTree.set_at needs one leading axis (PackedTree.zeros(like, "
                       f"lead=(M,))); the vectors have shapes {[v.shape for v in vectors]}.")
    rows = vectors[0].shape[0] if vectors else 0
    if rows == 0:
      return self
    index = jnp.asarray(index, jnp.int32)
    keep = jnp.asarray(keep) | (index < 0) | (index >= rows)
    index = jnp.clip(index, 0, rows - 1)
    for (group, offset, shape), x in zip(entry[2], leaves):
      v = vectors[group]
      size = int(np.prod(shape, dtype=np.int64))
      start = (index, jnp.asarray(offset, jnp.int32))
      new = jnp.reshape(x, (1, size)).astype(v.dtype)
      new = jnp.where(keep, jax.lax.dynamic_slice(v, start, (1, size)), new)
      vectors[group] = jax.lax.dynamic_update_slice(v, new, start)
    return type(self)(tuple(vectors), self._layout)

  def row(self, index: Any) -> Any:
    """The tree at ``index`` of the one leading axis (`zeros` with ``lead =
    (M,)``), clamped to ``[0, M)``: leaf ``i`` is ``unpack()[i][index]``, read
    with one ``lax.dynamic_slice`` of its slot."""
    (entry,), _ = self._layout
    rows = self._vectors[0].shape[0] if self._vectors else 0
    index = jnp.clip(jnp.asarray(index, jnp.int32), 0, max(rows - 1, 0))
    leaves = []
    for group, offset, shape in entry[2]:
      size = int(np.prod(shape, dtype=np.int64))
      start = (index, jnp.asarray(offset, jnp.int32))
      leaves.append(jax.lax.dynamic_slice(self._vectors[group], start, (1, size)).reshape(shape))
    return jax.tree_util.tree_unflatten(entry[1], leaves)

  def update(self, fn: Any, *trees: Any) -> "PackedTree":
    """This packing with each leaf ``x`` replaced by ``fn(x, *leaves of trees)``.

    ``trees`` share the packed tree's structure (their leaves are matched in
    order). Each leaf is read from its slot and written back into it with
    ``lax.dynamic_update_slice``: in place when the vectors are donated, with
    no copy of them (the update of a slot reads only that slot) and at most one
    leaf as scratch. Unpacking, updating and `pack` would concatenate instead,
    which XLA:CPU runs far slower than the leaves' own computation when it
    fuses that computation into the concatenation (mnist_mlp's 1.3M entries:
    ~77 ms against ~1 ms leaf by leaf); ``fn`` must keep each leaf's shape.
    """
    (entry,), _ = self._layout
    others = [jax.tree_util.tree_leaves(t) for t in trees]
    if any(len(o) != len(entry[2]) for o in others):
      raise ValueError(f"PackedTree.update: the trees have {[len(o) for o in others]} "
                       f"leaves, the packing {len(entry[2])}.")
    vectors = list(self._vectors)
    for i, (group, offset, shape) in enumerate(entry[2]):
      v = vectors[group]
      size = int(np.prod(shape, dtype=np.int64))
      lead = v.shape[:-1]
      start = (0,) * len(lead) + (offset,)
      old = jax.lax.dynamic_slice(v, start, lead + (size,)).reshape(lead + shape)
      new = jnp.asarray(fn(old, *[o[i] for o in others]))
      vectors[group] = jax.lax.dynamic_update_slice(
          v, new.astype(v.dtype).reshape(lead + (size,)), start)
    return type(self)(tuple(vectors), self._layout)

  def __repr__(self) -> str:
    shapes = [getattr(v, "shape", v) for v in self._vectors]
    return f"PackedTree(vectors={shapes})"
