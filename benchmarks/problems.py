"""Throughput of the curvax.problems runner vs a bare jitted Flax + optax loop.

Both train ``fmnist_2c2d`` (DeepOBS's 2c2d net on Fashion-MNIST, batch 128)
with ``optax.sgd`` on the same device-resident data from the same initial
parameters, each step jitted with its parameters and optimizer state donated:

  bare:    a hand-written loop: per step, one jitted function gathers the
           batch from the epoch's permutation, takes ``value_and_grad`` of the
           objective, updates and applies; the host only loops.
  runner:  ``curvax.problems.run`` (the same, plus the disjoint ``eval_batch``,
           the training-mode loss with model state, logging every 10 steps).
  runner, K steps per call: ``run(..., steps_per_call=K)`` (``--steps-per-call``,
           default 10; 0 skips it): K steps in one jitted ``lax.scan``, the
           per-call host work paid once per K steps (for small models on a GPU).
           On 2 CPU cores (2026-11-27) it ran 1.44x and 1.52x the bare loop's
           throughput in two runs (runner / bare 0.97-1.02): XLA:CPU runs this
           program's steps faster inside the scan; jax-ml/jax#12868 reports the
           opposite for other programs, so measure yours.

Each variant trains ``--steps`` steps after compilation (the runner's
``train_time`` excludes compilation and evaluation); the best of ``--repeats``
runs is kept, interleaving the variants so that machine noise hits both.
Printed: examples/second of each and runner / bare (target >= 0.9).

Needs Fashion-MNIST (``apt-get install dataset-fashion-mnist``); ``--synthetic``
uses random data of the same shapes instead. Usage::

  python benchmarks/problems.py [--steps 100] [--repeats 3] [--synthetic]
"""

from __future__ import annotations

import argparse
import dataclasses
import functools
import time

import jax
import jax.numpy as jnp
import numpy as np
import optax

import curvax.problems as problems


def bare_loop(problem, params, lr: float, steps: int, seed: int = 0) -> float:
  """Seconds for ``steps`` SGD steps of a minimal jitted loop (compiled first).

  Donated, as the runner's step is (an undonated step allocates fresh outputs
  every step, which would favour the runner)."""
  x_all, y_all = problem.data("train")
  n, b = int(y_all.shape[0]), problem.batch_size
  tx = optax.sgd(lr)
  loss_fn = problem.loss_fn

  @functools.partial(jax.jit, donate_argnums=(0, 1))
  def step(params, opt_state, perm, i):
    idx = jax.lax.dynamic_slice(perm, (i * b,), (b,))
    batch = problem.preprocess(jnp.take(x_all, idx, axis=0), jnp.take(y_all, idx, axis=0),
                               None, True)
    loss, grads = jax.value_and_grad(loss_fn)(params, batch)
    updates, opt_state = tx.update(grads, opt_state, params)
    return optax.apply_updates(params, updates), opt_state, loss

  perm = jax.random.permutation(jax.random.PRNGKey(seed), n)
  params = jax.tree.map(jnp.copy, params)   # donated: the caller's arrays stay valid
  params, opt_state, _ = step(params, tx.init(params), perm, 0)
  jax.block_until_ready(params)
  start = time.perf_counter()
  for i in range(steps):
    params, opt_state, loss = step(params, opt_state, perm, i % (n // b))
  jax.block_until_ready(params)
  return time.perf_counter() - start


def runner_loop(problem, params, lr: float, steps: int, steps_per_call: int = 1) -> float:
  r = problems.run(problem, optax.sgd(lr), epochs=10 ** 6, max_steps=steps, eval_size=256,
                   init_params=params, steps_per_call=steps_per_call, verbose=False)
  assert r["steps"] == steps, r["stop_reason"]
  return r["train_time"]


def main() -> None:
  parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
  parser.add_argument("--steps", type=int, default=100)
  parser.add_argument("--repeats", type=int, default=3)
  parser.add_argument("--synthetic", action="store_true")
  parser.add_argument("--steps-per-call", type=int, default=10)
  args = parser.parse_args()

  problem = problems.get("fmnist_2c2d")
  if args.synthetic:
    rng = np.random.default_rng(0)
    def load():   # every split the runner evaluates, as the real loader gives
      data = {s: (rng.random((n, 28, 28, 1), np.float32), rng.integers(0, 10, n))
              for s, n in (("train", 50000), ("valid", 10000), ("test", 10000))}
      data["train_eval"] = tuple(a[:10000] for a in data["train"])
      return data
    problem = dataclasses.replace(problem, load_data=load, _data=None)
  lr = 0.1
  params, _ = problem.split_variables(problem.init(jax.random.PRNGKey(0)))
  b = problem.batch_size
  print(f"fmnist_2c2d on {jax.default_backend()}: batch {b}, {args.steps} SGD steps, "
        f"best of {args.repeats}")
  k = args.steps_per_call
  bare, runner, several = [], [], []
  for _ in range(args.repeats):
    bare.append(bare_loop(problem, params, lr, args.steps))
    runner.append(runner_loop(problem, params, lr, args.steps))
    if k > 0:
      several.append(runner_loop(problem, params, lr, args.steps, k))
  eps_bare = args.steps * b / min(bare)
  eps_runner = args.steps * b / min(runner)
  print(f"bare jitted loop: {eps_bare:9.1f} examples/s")
  print(f"curvax runner:    {eps_runner:9.1f} examples/s")
  print(f"runner / bare = {eps_runner / eps_bare:.3f} (target >= 0.9)")
  if k > 0:
    eps_several = args.steps * b / min(several)
    print(f"runner, {k} steps per call: {eps_several:9.1f} examples/s, "
          f"/ bare = {eps_several / eps_bare:.3f}")


if __name__ == "__main__":
  main()
