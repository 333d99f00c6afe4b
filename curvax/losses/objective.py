"""The batch-mean objective built from a model and a per-example loss."""

from __future__ import annotations

from typing import Any, Callable

import jax
import jax.numpy as jnp

from curvax import _checks
from curvax.losses.base import as_loss

Array = jax.Array


def objective(apply_fn: Callable[[Any, Any], Array], loss: Any
              ) -> Callable[[Any, Any], Array]:
  r"""Returns ``loss_fn(params, batch) = (1/N) sum_n l(apply_fn(params, x_n), y_n)``.

  This is the objective every curvature product in curvax refers to. ``batch``
  is an ``(inputs, targets)`` pair; ``loss`` a `curvax.losses.Loss` or a plain
  callable returning per-example values.
  """
  loss = as_loss(loss)

  def loss_fn(params, batch):
    inputs, targets = _checks.check_batch(batch)
    return jnp.mean(loss(apply_fn(params, inputs), targets))

  return loss_fn


def per_example_losses(apply_fn: Callable[[Any, Any], Array], loss: Any
                       ) -> Callable[[Any, Any], Array]:
  """Returns ``fn(params, batch) -> (N,)`` per-example losses of the model."""
  loss = as_loss(loss)

  def fn(params, batch):
    inputs, targets = _checks.check_batch(batch)
    return loss(apply_fn(params, inputs), targets)

  return fn
