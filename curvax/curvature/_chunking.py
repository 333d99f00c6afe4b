"""Chunked map-and-reduce over the leading (batch) axis of a pytree.

Per-example computations through ``vmap`` hold a ``chunk x params`` buffer;
scanning over fixed-size chunks bounds that memory independently of the batch
size, at the price of a sequential loop over ``N / chunk`` chunks.
"""

from __future__ import annotations

from typing import Any, Callable, Optional, Tuple

import jax
import jax.numpy as jnp
import optax.tree_utils as otu


def leading_size(tree: Any) -> int:
  return jnp.shape(jax.tree_util.tree_leaves(tree)[0])[0]


def check_chunk_size(chunk_size: Optional[int]) -> None:
  if chunk_size is not None and (not isinstance(chunk_size, int) or chunk_size < 1):
    raise ValueError(f"`chunk_size` must be a positive int or None; got {chunk_size!r}.")


def map_reduce(fn: Callable[[Any], Tuple[Any, Any]], xs: Any,
               chunk_size: Optional[int]) -> Tuple[Any, Any]:
  """Applies ``fn(chunk) -> (per_example, sums)`` chunk by chunk.

  Returns the per-example outputs concatenated along the leading axis and the
  ``sums`` added over chunks. ``chunk_size=None`` (or at least the batch size)
  processes everything at once; otherwise full chunks go through a
  ``lax.scan`` and a last partial chunk is processed on its own.
  """
  check_chunk_size(chunk_size)
  n = leading_size(xs)
  if chunk_size is None or chunk_size >= n:
    return fn(xs)
  q, r = divmod(n, chunk_size)
  main = jax.tree_util.tree_map(
      lambda a: a[:q * chunk_size].reshape((q, chunk_size) + a.shape[1:]), xs)
  first = jax.tree_util.tree_map(lambda a: a[0], main)
  _, sums_shape = jax.eval_shape(fn, first)
  init = jax.tree_util.tree_map(lambda s: jnp.zeros(s.shape, s.dtype), sums_shape)

  def body(carry, chunk):
    per, sums = fn(chunk)
    return otu.tree_add(carry, sums), per

  total, per = jax.lax.scan(body, init, main)
  per = jax.tree_util.tree_map(lambda a: a.reshape((q * chunk_size,) + a.shape[2:]), per)
  if r:
    tail = jax.tree_util.tree_map(lambda a: a[q * chunk_size:], xs)
    per_r, sums_r = fn(tail)
    total = otu.tree_add(total, sums_r)
    per = jax.tree_util.tree_map(lambda a, b: jnp.concatenate([a, b]), per, per_r)
  return per, total


def expand(tree: Any) -> Any:
  """Adds a leading axis of size one to every leaf (one example -> a batch of 1)."""
  return jax.tree_util.tree_map(lambda a: a[None], tree)
