"""Optimizer states that can be donated to ``jax.jit``."""

from __future__ import annotations

from typing import TypeVar

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
