"""The batch-mean objective built from a model and a per-example loss."""

from __future__ import annotations

from typing import Any, Callable, Optional

import jax
import jax.numpy as jnp

from curvax import _checks
from curvax.losses.base import as_loss

Array = jax.Array


def objective(apply_fn: Callable[[Any, Any], Array], loss: Any,
              regularizer: Optional[Callable[[Any], Array]] = None
              ) -> Callable[[Any, Any], Array]:
  r"""Returns ``loss_fn(params, batch) = (1/N) sum_n l(apply_fn(params, x_n), y_n) + r(params)``.

  This is the objective every curvature product in curvax refers to. ``batch``
  is an ``(inputs, targets)`` pair; ``loss`` a `curvax.losses.Loss` or a plain
  callable returning per-example values; ``regularizer`` an optional function
  ``r(params) -> scalar`` (e.g. `l2_regularizer`), added once, not per example.
  """
  loss = as_loss(loss)

  def loss_fn(params, batch):
    inputs, targets = _checks.check_batch(batch)
    value = jnp.mean(loss(apply_fn(params, inputs), targets))
    if regularizer is not None:
      value = value + regularizer(params)
    return value

  return loss_fn


def per_example_losses(apply_fn: Callable[[Any, Any], Array], loss: Any
                       ) -> Callable[[Any, Any], Array]:
  """Returns ``fn(params, batch) -> (N,)`` per-example losses of the model."""
  loss = as_loss(loss)

  def fn(params, batch):
    inputs, targets = _checks.check_batch(batch)
    return loss(apply_fn(params, inputs), targets)

  return fn


def l2_regularizer(weight: float, predicate: Optional[Callable[[Any, Array], bool]] = None
                   ) -> Callable[[Any], Array]:
  r"""Returns ``r(params) = (weight / 2) * sum ||w||^2`` over the selected leaves.

  This is DeepOBS's (TensorFlow's ``l2_regularizer``) convention; its Hessian is
  ``weight * I`` on the selected leaves. ``predicate(path, leaf)`` selects the
  leaves (``path`` a ``jax.tree_util`` key path); by default every leaf whose
  parameter name is not ``bias`` (Flax's convention) is penalised. The name is
  the last key of the path once the keys of a variable wrapper are skipped:
  NNX parameters (`curvax.flax_utils.from_nnx`) end in
  ``['bias'].value`` (a trailing ``GetAttrKey('value')``), and a wrapper
  flattened without keys adds a ``FlattenedIndexKey``; for Linen's plain
  dicts the name is the last key itself.
  """
  if predicate is None:
    def predicate(path, leaf):
      del leaf
      return _parameter_name(path) != "bias"

  def regularizer(params):
    total = 0.0
    for path, leaf in jax.tree_util.tree_leaves_with_path(params):
      if predicate(path, leaf):
        total = total + jnp.sum(jnp.square(leaf))
    return 0.5 * weight * total

  return regularizer


_WRAPPER_ATTRS = ("value", "raw_value")


def _parameter_name(path) -> Any:
  """The name of the parameter at ``path``, skipping trailing variable-wrapper keys.

  ``GetAttrKey('value')`` / ``GetAttrKey('raw_value')`` (NNX ``Variable``'s
  payload) and ``FlattenedIndexKey`` (a node flattened without keys) name the
  wrapper, not the parameter, so the first other key from the end is used:
  its ``key`` (dict), ``name`` (attribute) or ``idx`` (sequence); ``None`` for
  an empty path.
  """
  for key in reversed(path):
    if isinstance(key, jax.tree_util.FlattenedIndexKey):
      continue
    if isinstance(key, jax.tree_util.GetAttrKey) and key.name in _WRAPPER_ATTRS:
      continue
    for attr in ("key", "name", "idx"):
      if hasattr(key, attr):
        return getattr(key, attr)
    return None
  return None
