"""Cost of curvature_step_size per training step, relative to the bare optimizer.

mnist_mlp-shaped MLP (784-1000-500-100-10, ReLU), softmax cross-entropy,
batch 128 for both batches, float32, random data. Each variant is one jitted
training step *including the gradient*:

  bare:      g = grad(L)(params, batch); d = inner(g); params += d
  biased:    ... + alpha* on `batch` every step (one JVP; its forward pass can be
             shared by XLA with the gradient's)
  debiased:  ... + alpha* on `eval_batch` every step (one JVP on a new batch)
  interval:  debiased, interval=100, num_estimates=10 (10 % of the steps compute
             curvature; the others skip it through lax.cond)
  interval, host-scheduled: the same with ``update(..., scheduled=...)`` from
             `curvax.transforms.computes_curvature` on the host: two compiled
             steps, the one without curvature has no lax.cond (a GPU runtime
             waits for the host at each cond)

alpha* costs one forward-mode pass, no backward pass and no GGN matvec
(curvax.curvature.quadratic_step_size). Expected from matmul FLOPs alone (the
first layer holds 59 % of the FLOPs and its input has no tangent): gradient
= 2.41 forward passes, tangent of the JVP = 1.41, so biased ~1.6x (shared
forward), debiased ~2.0x, interval ~1.1x debiased / ~1.06x biased.
The seed (PyTorch + curvlinops) paid about 70x per alpha step (Table 4.1).

Floors, printed as their own lines: "biased, arithmetic only" is a hand-written
step with the same JVP (`quadratic_step_size`) and nothing else (no state, no
schedule, no non-finite guard; ~1.5x on XLA:CPU, 2 cores); the non-finite
guard every curvax transform keeps (a reduction over the update before it may
be applied) costs what ``optax.apply_if_finite`` costs (~1.1-1.15x): that is
the floor of the interval mode's steps without curvature. Both settings of
glibc's allocator are printed (benchmarks/_allocator.py); this step's scratch
is small, so they agree.

Every step donates its parameters and optimizer state, as a training loop
should (and `curvax.problems.run` does): the bare step then updates in place.
Without donation every step allocates fresh outputs, which glibc maps anew
(~450 page faults per bare step): 0.45-0.55 ms more per step for every
variant alike, so the ratios of earlier versions of this script (no
donation) read 0.1-0.2 lower: biased 1.45-1.47x, debiased 1.74-1.77x,
interval 1.14-1.18x against 1.58x, 1.94x, 1.22x donated (one run each). The last lines print the host time per call (see
benchmarks/_timing.py: ``host_time_per_call``): what a GPU must hide behind
its compute.

Then (``--one-call``, the default) each block of steps once more as ONE jitted
call (``lax.fori_loop``): no per-step host work. On an H200 (2026-11-27) the
bare step took 0.15-0.16 ms per call and 0.085 ms in a loop; per call biased
1.8-2.4x, debiased 1.8-2.4x, interval 2.2-3.0x (46 arrays per call against 25,
and the interval mode's cond syncs with the host); in a loop 2.0x / 2.3x /
1.7-1.9x, the arithmetic alone 1.7x. The second run (2026-11-28): per call
2.34x / 2.97x / 3.10x (host-scheduled 2.65x), in a loop 2.03x / 2.31x /
1.80-1.88x, the device time ~2.1 us per kernel (92 kernels biased, nadamw 40):
see docs/performance.md. Since then the state packs its 19 scalars into two
arrays (46 -> 29 arrays per call) and the non-finite guard shares its
reductions with the direction's (not yet timed on a GPU). (On XLA:CPU the
loop rows vary from run to run, a loop body runs slower than a top-level step,
jax-ml/jax#12868: read them on a GPU.)

Timings are medians over repeats of blocks of steps, interleaving the variants,
so machine noise hits all of them alike. Usage:

  python benchmarks/curvature_step_size.py [--inner nadamw|sgd] [--repeats 7] [--no-one-call]
"""

from __future__ import annotations

import argparse
import functools
import os
import sys
import time

import jax
import jax.numpy as jnp
import numpy as np
import optax

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
import curvax  # noqa: E402  (the checkout's curvax, not an installed copy)
from _timing import (HostScheduled, print_host_times, steps_in_one_call,  # noqa: E402  (benchmarks/_timing.py)
                     time_carried_calls)
import _allocator  # noqa: E402  (benchmarks/_allocator.py)

SIZES = (784, 1000, 500, 100, 10)


def mlp_apply(params, x):
  for i, (w, b) in enumerate(params):
    x = x @ w + b
    if i < len(params) - 1:
      x = jax.nn.relu(x)
  return x


def init_params(key):
  params = []
  for d_in, d_out in zip(SIZES[:-1], SIZES[1:]):
    key, sub = jax.random.split(key)
    params.append((jax.random.normal(sub, (d_in, d_out), jnp.float32) * np.sqrt(2.0 / d_in),
                   jnp.zeros((d_out,), jnp.float32)))
  return params


def make_batch(key, n=128):
  kx, ky = jax.random.split(key)
  return (jax.random.normal(kx, (n, SIZES[0]), jnp.float32),
          jax.random.randint(ky, (n,), 0, SIZES[-1]))


def alpha_step_only(inner, apply_fn, loss):
  """``alpha* d`` on ``batch`` and nothing else: the arithmetic of the biased mode."""
  def update_fn(grads, state, params=None, *, batch=None, **unused):
    del unused
    d, state = inner.update(grads, state, params)
    alpha = curvax.curvature.quadratic_step_size(apply_fn, loss, params, d, batch).alpha
    return jax.tree.map(lambda x: alpha * x, d), state
  return optax.GradientTransformationExtraArgs(inner.init, update_fn)


def step_fn(tx, loss_fn, needs_batches):
  def step(params, state, batch, eval_batch, scheduled=None):
    grads = jax.grad(loss_fn)(params, batch)
    if needs_batches:
      kw = {} if scheduled is None else {"scheduled": scheduled}
      updates, state = tx.update(grads, state, params, batch=batch, eval_batch=eval_batch,
                                 **kw)
    else:
      updates, state = tx.update(grads, state, params)
    return optax.apply_updates(params, updates), state
  return step


def make_step(tx, loss_fn, needs_batches, schedule=None):
  # Parameters and state donated, as a training loop (and curvax.problems.run)
  # would: XLA updates them in place instead of allocating fresh outputs (which
  # glibc maps anew: hundreds of page faults per step of the bare optimizer).
  jitted = functools.partial(jax.jit, donate_argnums=(0, 1), static_argnames="scheduled")(
      step_fn(tx, loss_fn, needs_batches))
  return jitted if schedule is None else HostScheduled(
      jitted, lambda t: curvax.transforms.computes_curvature(t, **schedule))


def make_block_call(tx, loss_fn, needs_batches, num_steps, schedule=None):
  """``num_steps`` steps as one jitted call; batches i % 2 and 2 + i % 2 of
  the stacked four, as the per-call loop uses them. With ``schedule`` (the
  keywords of `computes_curvature`; blocks start at multiples of the
  interval) the steps without curvature run in loops of the variant without
  the cond."""
  one = step_fn(tx, loss_fn, needs_batches)

  def body(t, params, state, data, scheduled=None):
    pick = lambda i: jax.tree.map(lambda a: a[i], data)  # noqa: E731
    return one(params, state, pick(t % 2), pick(2 + t % 2), scheduled)
  scheduled = None if schedule is None else (
      lambda t: curvax.transforms.computes_curvature(t, **schedule))
  return steps_in_one_call(body, num_steps, scheduled)


def main():
  parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
  parser.add_argument("--inner", default="nadamw", choices=("nadamw", "sgd"))
  parser.add_argument("--repeats", type=int, default=5)
  parser.add_argument("--steps", type=int, default=100, help="steps per timed block "
                      "(a multiple of 100, so interval mode sees whole intervals)")
  parser.add_argument("--one-call", action=argparse.BooleanOptionalAction, default=True,
                      help="also time each block of steps as one jitted call (fori_loop)")
  args = parser.parse_args()

  loss = curvax.losses.softmax_cross_entropy
  loss_fn = curvax.losses.objective(mlp_apply, loss)
  lr = 1e-3 if args.inner == "nadamw" else 1e-2
  make_inner = (lambda: optax.nadamw(lr, weight_decay=1e-4)) if args.inner == "nadamw" \
      else (lambda: optax.sgd(lr))
  css = curvax.transforms.curvature_step_size
  window = dict(mode="interval", interval=100, num_estimates=10)
  variants = {
      "bare": (make_inner(), False),
      # The cost of a non-finite guard alone (every curvax transform has one):
      "bare + optax.apply_if_finite": (optax.apply_if_finite(make_inner(), 10), False),
      "biased every step": (css(make_inner(), mlp_apply, loss, learning_rate=lr,
                                debias=False), True),
      "biased, arithmetic only": (alpha_step_only(make_inner(), mlp_apply, loss), True),
      "debiased every step": (css(make_inner(), mlp_apply, loss, learning_rate=lr), True),
      "interval 100/10 debiased": (css(make_inner(), mlp_apply, loss, learning_rate=lr,
                                       mode="interval", interval=100, num_estimates=10), True),
      "interval 100/10 biased": (css(make_inner(), mlp_apply, loss, learning_rate=lr,
                                     debias=False, **window), True),
      # The same, scheduled on the host (update(..., scheduled=...)): no cond.
      "interval, host-scheduled": (css(make_inner(), mlp_apply, loss, learning_rate=lr,
                                       **window), True),
  }
  host_scheduled = {"interval, host-scheduled": window}
  params0 = init_params(jax.random.PRNGKey(0))
  batches = [make_batch(jax.random.PRNGKey(i)) for i in range(1, 5)]
  runs = {}
  for name, (tx, needs) in variants.items():
    step = make_step(tx, loss_fn, needs, host_scheduled.get(name))
    params, state = jax.tree.map(jnp.copy, (params0, tx.init(params0)))
    params, state = step(params, state, batches[0], batches[1])  # compile
    jax.block_until_ready(params)
    runs[name] = [step, params, state]

  targets = {"biased every step": 1.4, "debiased every step": 1.8,
             "interval 100/10 debiased": 1.05, "interval 100/10 biased": 1.05,
             "interval, host-scheduled": 1.05}

  def measure(label):
    times = {name: [] for name in variants}
    faults = {name: 0 for name in variants}
    for _ in range(args.repeats):
      for name, run in runs.items():
        step, params, state = run
        f0 = _allocator.minor_page_faults()
        start = time.perf_counter()
        for i in range(args.steps):
          params, state = step(params, state, batches[i % 2], batches[2 + i % 2])
        jax.block_until_ready(params)
        times[name].append((time.perf_counter() - start) / args.steps)
        faults[name] += _allocator.minor_page_faults() - f0
        run[1], run[2] = params, state
    bare = np.median(times["bare"])
    print(f"{label}:")
    print(f"  {'variant':30s} {'ms/step':>9s} {'ratio':>7s} {'min ratio':>9s} {'target':>7s} "
          f"{'faults/step':>11s}")
    for name in variants:
      med = np.median(times[name])
      min_ratio = np.min(times[name]) / np.min(times["bare"])
      target = targets.get(name)
      print(f"  {name:30s} {1e3 * med:9.3f} {med / bare:7.3f} {min_ratio:9.3f} "
            f"{'' if target is None else f'<= {target}':>7s} "
            f"{faults[name] / (args.repeats * args.steps):11.0f}")

  def measure_one_call():
    # Each block of steps one jitted call (fori_loop): no per-step host work.
    stacked = jax.tree.map(lambda *b: jnp.stack(b), *batches)
    calls = {}
    for name, (tx, needs) in variants.items():
      # Host-scheduled: the call's steps without curvature in their own loop.
      call = make_block_call(tx, loss_fn, needs, args.steps, host_scheduled.get(name))
      params, state = call(*jax.tree.map(jnp.copy, (params0, tx.init(params0))), stacked)
      jax.block_until_ready(params)
      calls[name] = [call, params, state]
    times = {name: [t / args.steps for t in ts] for name, ts in
             time_carried_calls(calls, stacked, repeats=args.repeats).items()}
    bare = np.median(times["bare"])
    print(f"{args.steps} steps per jitted call (lax.fori_loop; no per-step host work):")
    for name in calls:
      med = np.median(times[name])
      target = targets.get(name)
      print(f"  {name:30s} {1e3 * med:9.3f} {med / bare:7.3f} "
            f"{np.min(times[name]) / np.min(times['bare']):9.3f} "
            f"{'' if target is None else f'<= {target}':>7s}")
    state = calls["interval, host-scheduled"][2]
    print(f"  (interval, host-scheduled: curvature computed on {int(state.num_computed)} of "
          f"{int(state.count)} steps)")

  print(f"curvature_step_size on {jax.devices()[0].platform}: MLP {'-'.join(map(str, SIZES))}, "
        f"batch 128, float32, inner={args.inner}, {args.repeats} repeats x {args.steps} steps")
  measure("default allocator")
  if _allocator.cache_large_blocks():
    measure("glibc caching large blocks (see benchmarks/_allocator.py)")
  if args.one_call:
    measure_one_call()
  print_host_times(runs, batches[0], batches[2], width=30)
  for name in ("interval 100/10 debiased", "interval, host-scheduled"):
    state = runs[name][2]
    print(f"({name}: curvature computed on {int(state.num_computed)} of "
          f"{int(state.count)} steps)")


if __name__ == "__main__":
  main()
