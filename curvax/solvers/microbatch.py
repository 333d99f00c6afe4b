"""Accumulating batch means over micro-batches, for batches too large for memory."""

from __future__ import annotations

from typing import Any, Callable, Optional

import jax
import jax.numpy as jnp
import optax.tree_utils as otu

from curvax import _checks

Array = jax.Array


def microbatch_mean(fn: Callable[[Any], Any], batch: Any,
                    microbatch_size: Optional[int], *, batch_name: str = "batch") -> Any:
  r"""``fn(batch)`` for a batch-mean ``fn``, computed chunk by chunk.

  For any ``fn`` that is a mean over the examples of its batch (plus terms
  independent of the batch, such as a regulariser), with ``N = M m``:

  .. math:: fn(B) = \frac{1}{M} \sum_{c=1}^{M} fn(B_c),\qquad |B_c| = m

  The chunks are visited by a ``lax.scan`` that accumulates the sum (the
  JAX counterpart of PyTorchHessianFree's ``acc_step``, seed 002 App. A.1), so
  only one chunk's intermediate values are alive at a time. Chunks are
  strided (chunk ``c`` holds examples ``c, c + M, c + 2M, ...``), which leaves
  the mean unchanged and, for a batch sharded over devices (see
  `curvax.sharding`; ``microbatch_size`` a multiple of the device count), lets
  every device scan over its own examples instead of gathering the batch. With
  ``microbatch_size=None`` (or equal to the batch size) ``fn(batch)`` is
  returned directly.

  Args:
    fn: ``batch -> pytree`` (a loss, a gradient, a curvature product ...).
    batch: ``(inputs, targets)`` with a leading batch axis.
    microbatch_size: chunk size ``m``; must divide the batch size.
    batch_name: what the error message calls ``batch`` (e.g. ``"eval_batch"``).

  Raises:
    ValueError: if ``microbatch_size`` does not divide the batch size.
  """
  inputs, targets = _checks.check_batch(batch, batch_name)
  n = _checks.batch_size((inputs, targets))
  if microbatch_size is None or microbatch_size == n:
    return fn((inputs, targets))
  if int(microbatch_size) != microbatch_size or microbatch_size <= 0 or n % microbatch_size:
    raise ValueError(
        f"microbatch_size={microbatch_size} must be a positive divisor of the size "
        f"of `{batch_name}` ({n} examples).")
  m = int(microbatch_size)
  chunks = jax.tree.map(
      lambda a: jnp.swapaxes(jnp.reshape(a, (m, n // m) + jnp.shape(a)[1:]), 0, 1),
      (inputs, targets))
  first = jax.tree.map(lambda a: a[0], chunks)
  acc0 = jax.tree.map(lambda s: jnp.zeros(s.shape, s.dtype), jax.eval_shape(fn, first))

  def step(acc, chunk):
    return otu.tree_add(acc, fn(chunk)), None

  total, _ = jax.lax.scan(step, acc0, chunks)
  return otu.tree_scale(1.0 / (n // m), total)


def microbatched_value_and_grad(loss_fn: Callable[[Any, Any], Array],
                                microbatch_size: Optional[int] = None
                                ) -> Callable[[Any, Any], Any]:
  """``(params, batch) -> (loss, grad)`` of a batch-mean ``loss_fn``, by chunks.

  ``loss_fn(params, batch)`` is e.g. `curvax.losses.objective`; see
  `microbatch_mean`.
  """
  vg = jax.value_and_grad(loss_fn)

  def value_and_grad(params, batch):
    return microbatch_mean(lambda b: vg(params, b), batch, microbatch_size)

  return value_and_grad
