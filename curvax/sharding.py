r"""Data-parallel set-up: a device mesh, a sharded batch, replicated parameters.

curvax has no communication layer of its own: JAX's sharding is the engine.
Put the batch on a `jax.sharding.Mesh` split along its leading (batch) axis,
replicate the parameters and the optimizer state, and ``jax.jit`` the whole
training step. XLA's SPMD partitioner then runs every per-example computation
on the device that holds the example, and turns each batch mean of the
objective -- ``(1/N) sum_n`` in the gradient, in ``G v = (1/N) sum_n J_n' H_n
J_n v``, in ``H v``, in per-example statistics, in the losses that the line
searches evaluate -- into a local sum followed by one ``all-reduce`` inside the
compiled program. Everything downstream of those means (CG's inner products
and step sizes, damping, line-search decisions, the curvature estimates of
the transforms) is computed on replicated values, so it is the same on every
device and the same as on one device, up to the order of floating-point sums.

Typical use::

  mesh = curvax.sharding.data_mesh()                  # all devices, axis 'data'
  params = curvax.sharding.replicate(params, mesh)
  opt_state = curvax.sharding.replicate(tx.init(params), mesh)
  step = jax.jit(step)                                 # the whole step
  for batch, eval_batch in data:
    batch = curvax.sharding.shard_batch(batch, mesh)
    eval_batch = curvax.sharding.shard_batch(eval_batch, mesh)
    params, opt_state = step(params, opt_state, batch, eval_batch)

Chunked computations (``chunk_size`` of the per-example statistics,
``microbatch_size`` of `curvax.transforms.hessian_free`) stay data-parallel
when the chunk size is a multiple of the number of devices along the batch
axis; otherwise they are still correct, but XLA gathers the batch first.
See docs/multi_device.md.
"""

from __future__ import annotations

from typing import Any, Optional, Sequence

import jax
import numpy as np
from jax.sharding import Mesh, NamedSharding, PartitionSpec

__all__ = ["data_mesh", "replicate", "shard_batch"]


def data_mesh(devices: Optional[Sequence[Any]] = None, axis_name: str = "data") -> Mesh:
  """A one-axis `jax.sharding.Mesh` over ``devices`` (default: all of ``jax.devices()``).

  Args:
    devices: the devices to use, e.g. ``jax.devices()[:2]``; or an int ``k``
      for the first ``k`` devices of ``jax.devices()``.
    axis_name: name of the mesh axis the batch is split along.

  Raises:
    ValueError: no devices, more requested than there are, or one listed twice.
    TypeError: ``devices`` holds something other than ``jax.Device`` objects
      (device ids: pass ``[jax.devices()[i] for i in ids]``).
  """
  available = jax.devices()

  def not_devices(x):
    return TypeError(
        f"data_mesh: `devices` must be jax.Device objects (e.g. jax.devices()[:2]) or an "
        f"int k for the first k devices; got {type(x).__name__} {x!r}.")

  if isinstance(devices, (str, bool, float, np.floating, np.bool_)):
    raise not_devices(devices)
  if devices is None:
    devices = available
  elif isinstance(devices, (int, np.integer)):
    if devices < 1:
      raise ValueError(f"data_mesh: asked for {devices} devices; ask for at least 1.")
    if devices > len(available):
      raise ValueError(
          f"data_mesh: asked for {devices} devices; {len(available)} available "
          f"({available[0].platform}). On CPU, set XLA_FLAGS="
          "--xla_force_host_platform_device_count=N before JAX starts for N virtual devices.")
    devices = available[:int(devices)]
  devices = list(devices)
  if not devices:
    raise ValueError("data_mesh: `devices` is empty.")
  wrong = [d for d in devices if not isinstance(d, jax.Device)]
  if wrong:
    raise not_devices(wrong[0])
  if len(set(devices)) != len(devices):
    raise ValueError(f"data_mesh: `devices` lists a device more than once: {devices}.")
  return Mesh(np.asarray(devices), (axis_name,))


def _axis_size(mesh: Mesh, axis_name: str) -> int:
  if not isinstance(mesh, Mesh):
    raise TypeError(f"expected a jax.sharding.Mesh; got {type(mesh).__name__}.")
  if axis_name not in mesh.shape:
    raise ValueError(f"mesh has axes {tuple(mesh.shape)}; no axis named {axis_name!r}.")
  return mesh.shape[axis_name]


def _place(tree: Any, sharding: NamedSharding) -> Any:
  """``device_put`` for concrete arrays, a sharding constraint under ``jit``."""
  def place(leaf):
    if isinstance(leaf, jax.core.Tracer):
      return jax.lax.with_sharding_constraint(leaf, sharding)
    return jax.device_put(leaf, sharding)
  return jax.tree_util.tree_map(place, tree)


def shard_batch(batch: Any, mesh: Mesh, axis_name: str = "data") -> Any:
  """Splits every leaf of ``batch`` along its leading axis over ``mesh``'s ``axis_name``.

  The sharding is ``NamedSharding(mesh, PartitionSpec(axis_name))``: device
  ``d`` of the axis holds the ``d``-th contiguous block of ``N / D`` examples
  (replicated along any other mesh axis). Concrete arrays are moved with
  ``jax.device_put``; inside ``jit`` a sharding constraint is applied instead.

  Args:
    batch: a pytree of arrays with a common leading batch axis, e.g.
      ``(inputs, targets)``.
    mesh: the mesh (e.g. `data_mesh`).
    axis_name: the mesh axis to split the batch along.

  Raises:
    ValueError: a leaf without a batch axis, leaves of different batch sizes, or
      a batch size not divisible by the number of devices along ``axis_name``.
  """
  d = _axis_size(mesh, axis_name)
  leaves = jax.tree_util.tree_leaves(batch)
  if not leaves:
    raise ValueError("shard_batch: `batch` holds no arrays.")
  sizes = set()
  for leaf in leaves:
    shape = np.shape(leaf)
    if not shape:
      raise ValueError("shard_batch: every leaf of `batch` needs a leading batch axis; "
                       "got a scalar.")
    sizes.add(shape[0])
  if len(sizes) != 1:
    raise ValueError(f"shard_batch: leaves of `batch` have different batch sizes {sorted(sizes)}.")
  n = sizes.pop()
  if n % d:
    raise ValueError(
        f"shard_batch: batch size {n} is not divisible by the {d} devices of mesh axis "
        f"{axis_name!r}; use a batch size that is a multiple of {d} (e.g. "
        f"{(n // d + 1) * d}) or fewer devices.")
  return _place(batch, NamedSharding(mesh, PartitionSpec(axis_name)))


def replicate(tree: Any, mesh: Mesh) -> Any:
  """Places a full copy of every leaf of ``tree`` (params, optimizer state) on every device of ``mesh``."""
  if not isinstance(mesh, Mesh):
    raise TypeError(f"replicate: expected a jax.sharding.Mesh; got {type(mesh).__name__}.")
  return _place(tree, NamedSharding(mesh, PartitionSpec()))
