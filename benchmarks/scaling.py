"""Data-parallel scaling of a GGN-vector product and a hessian_free step.

DeepOBS ``mnist_mlp`` shapes (784-1000-500-100-10, ReLU, softmax
cross-entropy, random data, float32, Flax Linen), global batch 128 (and an
``eval_batch`` of 128 for the step). For each device count ``k`` the batch is
split over a ``k``-device mesh (`curvax.sharding.shard_batch`), the parameters
are replicated, and two jitted programs are timed:

* ``ggn``: linearise once and apply ``G v`` ``--products`` times (a
  ``fori_loop``, as in CG); the batch mean is an all-reduce per product;
* ``hessian_free``: gradient plus one `curvax.transforms.hessian_free` update
  (``--cg-iters`` CG iterations exactly: tolerance 0, no Martens test; CG
  backtracking and Armijo line search on ``eval_batch``).

Configurations are timed in interleaved rounds (median over ``--repeats``
rounds, after a warm-up call), and the table prints the speed-up
``time(1 device) / time(k devices)`` and the throughput in examples/s.

Devices: the accelerators when JAX sees more than one (GPUs), else virtual
CPU devices -- this script sets ``XLA_FLAGS=--xla_force_host_platform_device_count``
itself before JAX starts. Virtual CPU devices share the host's cores: on a
2-core machine the 1-device program already uses both cores through XLA's
intra-op threads, so splitting the batch adds communication and per-device
overhead without adding compute, and speed-ups near or below 1 are expected
there. The figures mean something on real multi-GPU (or many-core) hosts.

Run: ``python benchmarks/scaling.py [--devices 1,2,4] [--repeats 7]``.
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import time


def _parse_args():
  parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
  parser.add_argument("--devices", default="1,2,4", help="comma-separated device counts")
  parser.add_argument("--repeats", type=int, default=7, help="timing rounds")
  parser.add_argument("--batch", type=int, default=128, help="examples per batch")
  parser.add_argument("--products", type=int, default=10, help="GGN products per call")
  parser.add_argument("--cg-iters", type=int, default=10)
  return parser.parse_args()


ARGS = _parse_args()
COUNTS = sorted({int(c) for c in ARGS.devices.split(",")})
_FLAG = "--xla_force_host_platform_device_count"
if _FLAG not in os.environ.get("XLA_FLAGS", ""):
  os.environ["XLA_FLAGS"] = f"{os.environ.get('XLA_FLAGS', '')} {_FLAG}={max(COUNTS)}".strip()

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import optax  # noqa: E402

import curvax  # noqa: E402
from curvax.problems import models  # noqa: E402


# DeepOBS's mnist_mlp (784-1000-500-100-10, ReLU), the model of curvax.problems.
MnistMLP = models.MLP


def _devices():
  accelerators = [d for d in jax.devices() if d.platform != "cpu"]
  return accelerators if len(accelerators) > 1 else jax.devices("cpu")


def main():
  devices = _devices()
  counts = [k for k in COUNTS if k <= len(devices) and ARGS.batch % k == 0]
  skipped = sorted(set(COUNTS) - set(counts))
  if skipped:
    print(f"skipping device counts {skipped}: {len(devices)} devices, batch {ARGS.batch}",
          file=sys.stderr)

  module = MnistMLP()
  kx, ky, kx2, ky2, kp = jax.random.split(jax.random.PRNGKey(0), 5)
  batch = (jax.random.normal(kx, (ARGS.batch, 784), jnp.float32),
           jax.random.randint(ky, (ARGS.batch,), 0, 10))
  eval_batch = (jax.random.normal(kx2, (ARGS.batch, 784), jnp.float32),
                jax.random.randint(ky2, (ARGS.batch,), 0, 10))
  apply_fn, params = curvax.flax_utils.from_linen(module, module.init(kp, batch[0]))
  loss = curvax.losses.softmax_cross_entropy
  loss_fn = curvax.losses.objective(apply_fn, loss)
  v = jax.tree.map(lambda a: 1e-2 * jnp.ones_like(a), params)
  tx = curvax.transforms.hessian_free(apply_fn, loss, cg_max_iter=ARGS.cg_iters, cg_tol=0.0,
                                      martens_criterion=False)

  def ggn_loop(params, batch, v):
    mv = curvax.curvature.ggn_matvec(apply_fn, loss, params, batch)
    return jax.lax.fori_loop(
        0, ARGS.products, lambda _, u: jax.tree.map(lambda a, b: 0.5 * a + 1e-3 * b, u, mv(u)), v)

  def hf_step(params, state, batch, eval_batch):
    g = jax.grad(loss_fn)(params, batch)
    updates, state = tx.update(g, state, params, batch=batch, eval_batch=eval_batch)
    return optax.apply_updates(params, updates), state

  calls = {}
  for k in counts:
    mesh = curvax.sharding.data_mesh(devices[:k])
    rep = lambda t, mesh=mesh: curvax.sharding.replicate(t, mesh)  # noqa: E731
    shard = lambda b, mesh=mesh: curvax.sharding.shard_batch(b, mesh)  # noqa: E731
    p = rep(params)
    ggn_args = (p, shard(batch), rep(v))
    hf_args = (p, rep(tx.init(params)), shard(batch), shard(eval_batch))
    calls[("ggn", k)] = (jax.jit(ggn_loop).lower(*ggn_args).compile(), ggn_args)
    calls[("hessian_free", k)] = (jax.jit(hf_step).lower(*hf_args).compile(), hf_args)

  times = {key: [] for key in calls}
  for fn, args in calls.values():
    jax.block_until_ready(fn(*args))
  for _ in range(ARGS.repeats):
    for key, (fn, args) in calls.items():
      t0 = time.perf_counter()
      jax.block_until_ready(fn(*args))
      times[key].append(time.perf_counter() - t0)
  med = {key: statistics.median(ts) for key, ts in times.items()}

  n_params = sum(a.size for a in jax.tree.leaves(params))
  print(f"mnist_mlp shapes ({n_params:,} params), batch {ARGS.batch}, "
        f"{devices[0].platform} x {len(devices)} available "
        f"({os.cpu_count()} host cores), median of {ARGS.repeats} rounds")
  print(f"ggn: {ARGS.products} GGN-vector products per call; hessian_free: gradient + one "
        f"update with {ARGS.cg_iters} CG iterations")
  print(f"{'devices':>7} | {'ggn ms':>8} {'speed-up':>8} {'ex/s':>9} | "
        f"{'hf ms':>8} {'speed-up':>8} {'ex/s':>9}")
  base = counts[0]
  for k in counts:
    g, h = med[("ggn", k)], med[("hessian_free", k)]
    print(f"{k:>7} | {1e3 * g:8.1f} {med[('ggn', base)] / g:8.2f} "
          f"{ARGS.products * ARGS.batch / g:9.0f} | {1e3 * h:8.1f} "
          f"{med[('hessian_free', base)] / h:8.2f} {ARGS.batch / h:9.0f}")


if __name__ == "__main__":
  main()
