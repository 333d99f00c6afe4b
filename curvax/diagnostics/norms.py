r"""By-product instruments: gradient norm, update size, distance from init.

Cockpit's GradNorm, UpdateSize and Distance (Dangel, thesis, Table C.1; spec
diagnostics.md §3.2) are Euclidean norms reported per parameter tensor
("layer-wise"); the global value is the root-sum-square of the layer values.
"""

from __future__ import annotations

from typing import Any

import jax
import jax.numpy as jnp
import optax.tree_utils as otu

Array = jax.Array


def layer_norms(tree: Any) -> Any:
  """``||t||_2`` of every leaf: a pytree shaped like ``tree`` with scalar leaves."""
  return jax.tree_util.tree_map(lambda t: jnp.sqrt(jnp.sum(jnp.square(t))), tree)


def global_norm_from_layers(norms: Any) -> Array:
  """Root-sum-square of per-layer norms: the Euclidean norm of the whole tree."""
  return jnp.sqrt(sum(jnp.square(n) for n in jax.tree_util.tree_leaves(norms)))


def gradient_norm(grads: Any) -> Array:
  """GradNorm: ``||g||_2`` of the mini-batch gradient (global)."""
  return otu.tree_norm(grads)


def update_size(updates: Any) -> Array:
  """UpdateSize: ``||theta_{t+1} - theta_t||_2`` given the update actually applied."""
  return otu.tree_norm(updates)


def distance(params: Any, init_params: Any) -> Array:
  """Distance: ``||theta_t - theta_0||_2`` (global)."""
  return otu.tree_norm(otu.tree_sub(params, init_params))
