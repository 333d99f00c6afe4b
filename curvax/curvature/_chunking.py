"""Chunked map-and-reduce over the leading (batch) axis of a pytree.

Per-example computations through ``vmap`` hold a ``chunk x params`` buffer;
scanning over fixed-size chunks bounds that memory independently of the batch
size, at the price of a sequential loop over ``N / chunk`` chunks.

Chunks are strided, not contiguous: with ``N = q m`` (``m`` the chunk size),
chunk ``j`` holds examples ``j, j + q, j + 2q, ...`` (`split_chunks`). Per-example
outputs are put back in the original order (`merge_chunks`) and sums do not
depend on the order, so results are those of contiguous chunks; but when the
batch axis is sharded over ``D`` devices (contiguous blocks, ``D`` dividing
``m``), the chunk axis ``m`` inherits that sharding and every device scans over
its own examples: data parallelism survives chunking, with no all-gather.
"""

from __future__ import annotations

import numbers
from typing import Any, Callable, Optional, Tuple

import jax
import jax.numpy as jnp
import optax.tree_utils as otu


def leading_size(tree: Any) -> int:
  return jnp.shape(jax.tree_util.tree_leaves(tree)[0])[0]


def check_chunk_size(chunk_size: Optional[int]) -> Optional[int]:
  """``chunk_size`` as a Python int (numpy integers too) or None, else ValueError."""
  if chunk_size is None:
    return None
  if (isinstance(chunk_size, bool) or not isinstance(chunk_size, numbers.Integral)
      or chunk_size < 1):
    raise ValueError(f"`chunk_size` must be a positive int or None; got {chunk_size!r}.")
  return int(chunk_size)


def split_chunks(a: jax.Array, chunk_size: int) -> jax.Array:
  """``(q m, ...) -> (q, m, ...)``: chunk ``j`` is examples ``j, j + q, ...`` (strided)."""
  q = a.shape[0] // chunk_size
  return jnp.swapaxes(a.reshape((chunk_size, q) + a.shape[1:]), 0, 1)


def merge_chunks(a: jax.Array) -> jax.Array:
  """Inverse of `split_chunks`: ``(q, m, ...) -> (q m, ...)`` in the original order."""
  return jnp.swapaxes(a, 0, 1).reshape((a.shape[0] * a.shape[1],) + a.shape[2:])


def map_reduce(fn: Callable[[Any], Tuple[Any, Any]], xs: Any,
               chunk_size: Optional[int]) -> Tuple[Any, Any]:
  """Applies ``fn(chunk) -> (per_example, sums)`` chunk by chunk.

  Returns the per-example outputs concatenated along the leading axis and the
  ``sums`` added over chunks. ``chunk_size=None`` (or at least the batch size)
  processes everything at once; otherwise full (strided, see the module
  docstring) chunks go through a ``lax.scan`` and the last ``N mod chunk``
  examples are processed on their own.
  """
  chunk_size = check_chunk_size(chunk_size)
  n = leading_size(xs)
  if chunk_size is None or chunk_size >= n:
    return fn(xs)
  q, r = divmod(n, chunk_size)
  main = jax.tree_util.tree_map(
      lambda a: split_chunks(a[:q * chunk_size] if r else a, chunk_size), xs)
  first = jax.tree_util.tree_map(lambda a: a[0], main)
  _, sums_shape = jax.eval_shape(fn, first)
  init = jax.tree_util.tree_map(lambda s: jnp.zeros(s.shape, s.dtype), sums_shape)

  def body(carry, chunk):
    per, sums = fn(chunk)
    return otu.tree_add(carry, sums), per

  total, per = jax.lax.scan(body, init, main)
  per = jax.tree_util.tree_map(merge_chunks, per)
  if r:
    tail = jax.tree_util.tree_map(lambda a: a[q * chunk_size:], xs)
    per_r, sums_r = fn(tail)
    total = otu.tree_add(total, sums_r)
    per = jax.tree_util.tree_map(lambda a, b: jnp.concatenate([a, b]), per, per_r)
  return per, total


def sum_chunks(fn: Callable[[Any], Any], xs: Any, chunk_size: Optional[int],
               axis: int = 0) -> Any:
  """``sum over chunks c of fn(c)``, the batch axis of every leaf of ``xs`` at ``axis``.

  The chunks are those of `map_reduce` (strided), but no leaf is rearranged
  beforehand: ``(..., q m, ...)`` is viewed as ``(..., m, q, ...)`` and each step
  of the ``lax.scan`` gathers its chunk ``[..., :, j, ...]``, so a leaf whose batch
  axis is not leading (``(K, N, ...)`` columns) is never transposed as a whole.
  """
  chunk_size = check_chunk_size(chunk_size)
  n = jnp.shape(jax.tree_util.tree_leaves(xs)[0])[axis]
  if chunk_size is None or chunk_size >= n:
    return fn(xs)
  q, r = divmod(n, chunk_size)

  def view(a):
    a = jax.lax.slice_in_dim(a, 0, q * chunk_size, axis=axis) if r else a
    return a.reshape(a.shape[:axis] + (chunk_size, q) + a.shape[axis + 1:])

  main = jax.tree_util.tree_map(view, xs)
  take = lambda j: jax.tree_util.tree_map(
      lambda a: jax.lax.dynamic_index_in_dim(a, j, axis=axis + 1, keepdims=False), main)
  init = jax.tree_util.tree_map(lambda s: jnp.zeros(s.shape, s.dtype),
                                jax.eval_shape(fn, take(0)))
  total, _ = jax.lax.scan(lambda carry, j: (otu.tree_add(carry, fn(take(j))), None),
                          init, jnp.arange(q))
  if r:
    tail = jax.tree_util.tree_map(
        lambda a: jax.lax.slice_in_dim(a, q * chunk_size, n, axis=axis), xs)
    total = otu.tree_add(total, fn(tail))
  return total


def expand(tree: Any) -> Any:
  """Adds a leading axis of size one to every leaf (one example -> a batch of 1)."""
  return jax.tree_util.tree_map(lambda a: a[None], tree)
