"""Wall time per epoch of probabilistic preconditioning relative to plain SGD.

The seed's Experiment 2 (000_102983c1e1ef3813.txt, section 4.2): DeepOBS
mnist_mlp (784-1000-500-100-10, ReLU, softmax cross-entropy, batch 128, 469
steps per epoch), estimation restarted every epoch. The seed measured on a GPU
2.39x (PreconditionedSGD), 1.87x (AdaptiveSGD: estimate, do not apply),
1.00x (OnlyAdaptiveSGD: prior only) the time of SGD.

Printed twice: with glibc's default allocator, and with large blocks cached
(benchmarks/_allocator.py: XLA:CPU mallocs each execution's scratch buffer, and
glibc mmaps blocks over 32 MiB afresh, so a step page-faults all the scratch it
touches; GPU runtimes cache). The page faults per step are printed too, and
then the cost of one step in each phase (prior, posterior, preconditioned)
relative to an SGD step: where an epoch's extra time goes.

Labels are class indices, as a user would pass them. (With one-hot label rows
instead, XLA:CPU's runtime scheduled the plain SGD step ~1.2x slower, 5.9 against
4.9 ms on 2 cores, while the preconditioned step's time did not change: an
earlier version of this script measured against that slower baseline, and its
ratios read ~15% low. Both speeds of the SGD step still occur within one run on
this machine, so the ratio of the fastest epochs is printed beside the medians.)

A reference row, "floor: fixed rank-2 + SGD", times plain SGD whose
gradient goes through a FIXED rank-2 preconditioner per leaf (random
orthonormal rows, the transform's own `low_rank_coefficients` and
`low_rank_precondition`): the arithmetic of a preconditioned step and nothing
else (no estimation rounds, no state machine, no non-finite guard), the floor
that the full algorithm's preconditioned steps can approach on this device.

The epochs do not wait for each step (as a training loop would not), so the host
runs ahead of the computation. In that mode only (0 faults when every step is
waited for), glibc mapped this transform's 21 MiB scratch afresh on some runs
and not on others (SGD's is 3.7 MiB): on 2 cores, the same code gave 0-4 page
faults per step and PreconditionedSGD 1.32-1.41x in one run, 860-1030 faults
and 1.62-1.66x in another. Compare runs by their page-fault column. The last
rows print the host time per call (benchmarks/_timing.py:
``host_time_per_call``), ~6.5 us per array passed in and out on this machine:
the PP step moved 80 when this was written (SGD 8; 32 since its buffers are
packed), which a GPU has to hide behind a step that may be shorter.

Then (``--one-call``, the default) each epoch once more as ONE jitted call, a
``lax.fori_loop`` over its steps: no per-step host work. On an H200 (synthetic
data, 2026-11-27) one call per step gave PreconditionedSGD 9-11x SGD (host time
per call 0.7-1.2 ms against SGD's 0.1 ms, and its conds' host syncs; floor row
1.3-1.8x), one call per epoch 3.5-3.9x (floor 1.3-1.4x, OnlyAdaptiveSGD 1.6-1.7x):
see docs/performance.md. The third run (2026-11-28) added "host-scheduled" rows, then
with ``update(..., scheduled=estimates_preconditioner(t, ...))`` (the steps without
estimation compiled without conds; per epoch call, two loops): one call per epoch
2.11x against 3.96x, OnlyAdaptiveSGD 1.33x, floor 1.38x. They now pass
``scheduled=estimation_phase(t, ...)``: every step without conds, one loop per phase. (On XLA:CPU a loop body runs
slower than a top-level step, jax-ml/jax#12868: read those rows on a GPU.)

Fashion-MNIST batches when installed, else synthetic ones of the same shapes.
Each configuration runs whole epochs of jitted steps (one compiled step, a
Python loop over batches already on the device); the ratios are medians over
repeats measured in one run. Usage: python benchmarks/probabilistic_preconditioning.py
[--repeats 5] [--steps 469] [--no-one-call]
"""

from __future__ import annotations

import argparse
import functools
import time

import jax
import jax.numpy as jnp
import numpy as np
import optax

import curvax
from curvax.solvers import bayesian_hessian as bh

import _allocator  # noqa: E402  (benchmarks/_allocator.py)
from _timing import (HostScheduled, print_host_times, steps_in_one_call,  # noqa: E402  (benchmarks/_timing.py)
                     time_carried_calls)


def mlp_init(key, sizes=(784, 1000, 500, 100, 10)):
  params = {}
  for i, (a, b) in enumerate(zip(sizes[:-1], sizes[1:])):
    key, k = jax.random.split(key)
    params[f"dense_{i}"] = {
        "kernel": 0.03 * jax.random.truncated_normal(k, -2.0, 2.0, (a, b)),
        "bias": jnp.zeros((b,))}
  return params


def mlp_apply(params, x):
  n = len(params)
  for i in range(n):
    layer = params[f"dense_{i}"]
    x = x @ layer["kernel"] + layer["bias"]
    if i < n - 1:
      x = jax.nn.relu(x)
  return x


def fixed_low_rank_preconditioner(key, rank=2, scale=0.5, dots="vdot"):
  """``g -> g + U ((scale - 1) U'g)`` per leaf with fixed random orthonormal rows
  ``U`` (``rank`` of them) kept in the state: the preconditioning arithmetic alone.

  ``dots="vdot"``: ``U'g`` as the transform computes it (`low_rank_coefficients`:
  one ``vdot`` per row); ``"reduce"``: one variadic reduction per leaf for all
  its rows (reads g once; XLA:CPU HLO of the mnist_mlp step 67 -> 53 kernels,
  ~5% slower on 2 CPU cores): the row "floor, one reduce per leaf", to measure on
  a GPU, where a step of this size costs about its kernel count. ``"flat"``: all
  leaves' rows in ONE ``(rank, total)`` array (each leaf's entries from an
  offset aligned to ``_CHUNK``, zero-padded), the gradient concatenated in the
  same layout, every ``U_j'g`` of every leaf from one reduction over chunks and
  a small chunk-to-leaf sum (row "floor, flat U"): a few kernels and one state
  array for the whole preconditioner, at the price of a copy of the gradient.
  """
  def init_fn(params):
    leaves = jax.tree_util.tree_leaves(params)
    rows = []
    for k, x in zip(jax.random.split(key, len(leaves)), leaves):
      q, _ = jnp.linalg.qr(jax.random.normal(k, (x.size, min(rank, x.size)), x.dtype))
      rows.append(tuple(jnp.array(q[:, j]) for j in range(q.shape[1])))
    if dots != "flat":
      return tuple(rows)
    return jnp.concatenate([jnp.pad(jnp.stack(r), ((0, rank - len(r)), (0, p - x.size)))
                            for r, x, p in zip(rows, leaves, _padded_sizes(leaves))], axis=1)

  def one_reduce(flat, u):
    zero = jnp.zeros((), flat.dtype)
    ug = jax.lax.reduce(tuple(r * flat for r in u), (zero,) * len(u),
                        lambda xs, ys: tuple(x + y for x, y in zip(xs, ys)), (0,))
    return (scale - 1.0) * jnp.stack(ug)

  def flat_update(leaves, u):
    sizes = _padded_sizes(leaves)
    g = jnp.concatenate([jnp.pad(jnp.ravel(x), (0, p - x.size)) for x, p in zip(leaves, sizes)])
    chunks = g.size // _CHUNK
    per_chunk = jnp.sum((u * g).reshape(rank, chunks, _CHUNK), axis=2)       # (rank, chunks)
    owner = np.repeat(np.arange(len(leaves)), [p // _CHUNK for p in sizes])
    ug = per_chunk @ jnp.asarray(owner[:, None] == np.arange(len(leaves)), g.dtype)
    coef = (scale - 1.0) * ug                                                 # (rank, leaves)
    out, start = [], 0
    for i, (x, p) in enumerate(zip(leaves, sizes)):
      rows = u[:, start:start + x.size]
      out.append((jnp.ravel(x) + sum(coef[j, i] * rows[j] for j in range(rank))).reshape(x.shape))
      start += p
    return out

  def update_fn(updates, state, params=None):
    del params
    leaves, treedef = jax.tree_util.tree_flatten(updates)
    if dots == "flat":
      return treedef.unflatten(flat_update(leaves, state)), state
    out = []
    for g, u in zip(leaves, state):
      flat = jnp.ravel(g)
      c = (bh.low_rank_coefficients(flat, u, jnp.full((len(u),), scale, flat.dtype))
           if dots == "vdot" else one_reduce(flat, u))
      out.append(bh.low_rank_precondition(flat, u, coefficients=c).reshape(g.shape))
    return treedef.unflatten(out), state

  return optax.GradientTransformation(init_fn, update_fn)


_CHUNK = 1024


def _padded_sizes(leaves):
  return [-(-x.size // _CHUNK) * _CHUNK for x in leaves]


def _batches(num):
  """``num`` Fashion-MNIST training batches if the data are installed, else
  teacher-labelled synthetic ones with pixel-like inputs. (Random labels on
  N(0, 1) inputs make the prior's curvature tiny and its learning rate huge:
  the runs diverged and skipped steps, which changes what is timed.)"""
  try:
    from curvax import problems  # pylint: disable=import-outside-toplevel
    problem = problems.get("fmnist_mlp")
    it = problem.batches("train", jax.random.PRNGKey(1))
    batches = []
    for _ in range(num):
      x, y = next(it)
      batches.append((x.reshape(x.shape[0], -1), jnp.asarray(y, jnp.int32)))
    return batches, "Fashion-MNIST"
  except (FileNotFoundError, OSError, ValueError) as e:
    print(f"(Fashion-MNIST not available: {e}; using synthetic teacher-labelled data)")
  kx, kt = jax.random.split(jax.random.PRNGKey(1))
  xs = jax.random.uniform(kx, (num, 128, 784))
  teacher = mlp_init(kt)
  ys = jnp.argmax(mlp_apply(teacher, xs), -1)
  return [(xs[i], ys[i]) for i in range(num)], "synthetic"


def phase_costs(make_step, configs, params0, batches, rounds=6, round_len=20):
  """Median time of one step in each position of an estimation round, relative
  to an SGD step: where an epoch's extra time goes (P prior steps with a
  Hessian-vector product each, M - 1 posterior steps with one each, the
  preconditioned steps)."""
  print(f"per step, by position in an estimation round (restart_every={round_len}; "
        f"median of {rounds} rounds, each step timed alone):")
  for name, tx in configs.items():
    if name.startswith("OnlyAdaptive") or name in (REFERENCE, REFERENCE_REDUCE, REFERENCE_FLAT):
      continue
    if not name.startswith("SGD"):
      tx = curvax.transforms.probabilistic_preconditioning(
          **{**_PP_KWARGS[name], "restart_every": round_len})
    step = make_step(tx)
    params, state = step(jax.tree.map(jnp.copy, params0), tx.init(params0), batches[0])
    times = np.zeros((rounds, round_len))
    phases = np.zeros(round_len, int)
    for r in range(rounds):
      for t in range(round_len):
        phases[t] = -1 if name.startswith("SGD") else int(state.phase)
        t0 = time.perf_counter()
        params, state = step(params, state, batches[t % len(batches)])
        jax.block_until_ready(params)
        times[r, t] = time.perf_counter() - t0
    med = np.median(times, axis=0)
    if name.startswith("SGD"):
      sgd = float(np.median(med))
      print(f"  {name:36s} {1e3 * sgd:6.2f} ms/step")
      continue
    labels = {0: "prior", 1: "posterior", 2: "precondition"}
    parts = []
    for ph in (0, 1, 2):
      sel = med[phases == ph]
      if len(sel):
        parts.append(f"{labels[ph]} {len(sel)} x {np.median(sel) / sgd:4.2f}x")
    print(f"  {name:36s} " + ", ".join(parts))


_PP_KWARGS = {}
REFERENCE = "floor: fixed rank-2 + SGD"
REFERENCE_REDUCE = "floor, one reduce per leaf"
REFERENCE_FLAT = "floor, flat U"


def main():
  parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
  parser.add_argument("--steps", type=int, default=469, help="steps per epoch")
  parser.add_argument("--repeats", type=int, default=5, help="epochs timed per configuration")
  parser.add_argument("--one-call", action=argparse.BooleanOptionalAction, default=True,
                      help="also time each epoch as one jitted call (fori_loop)")
  args = parser.parse_args()

  loss_fn = curvax.losses.objective(mlp_apply, curvax.losses.softmax_cross_entropy)
  params0 = mlp_init(jax.random.PRNGKey(0))
  num_distinct = 16
  batches, data_name = _batches(num_distinct)
  steps = args.steps
  pp = curvax.transforms.probabilistic_preconditioning
  _PP_KWARGS.update({
      "PreconditionedSGD": dict(loss_fn=loss_fn),
      "AdaptiveSGD (estimate, no apply)": dict(loss_fn=loss_fn, precondition=False,
                                               estimate_preconditioner=True),
      "OnlyAdaptiveSGD (prior only)": dict(loss_fn=loss_fn, precondition=False),
  })
  configs = {"SGD (lr 0.01)": optax.sgd(0.01)}
  configs.update({name: pp(**kw, restart_every=steps) for name, kw in _PP_KWARGS.items()})
  # update(..., scheduled=estimation_phase(t, ...)): every step compiled
  # without conds, with its phase's work only.
  host_scheduled = {f"{name}, host-scheduled": _PP_KWARGS[name]
                    for name in ("PreconditionedSGD", "OnlyAdaptiveSGD (prior only)")}
  configs.update({name: pp(**kw, restart_every=steps) for name, kw in host_scheduled.items()})

  def schedule(name):
    kw = {k: v for k, v in host_scheduled[name].items() if k != "loss_fn"}
    return lambda t: curvax.transforms.estimation_phase(t, restart_every=steps, **kw)
  configs[REFERENCE] = optax.chain(fixed_low_rank_preconditioner(jax.random.PRNGKey(2)),
                                   optax.sgd(0.01))
  configs[REFERENCE_REDUCE] = optax.chain(
      fixed_low_rank_preconditioner(jax.random.PRNGKey(2), dots="reduce"), optax.sgd(0.01))
  configs[REFERENCE_FLAT] = optax.chain(
      fixed_low_rank_preconditioner(jax.random.PRNGKey(2), dots="flat"), optax.sgd(0.01))

  def step_fn(tx):
    def step(params, state, batch, scheduled=None):
      grads = jax.grad(loss_fn)(params, batch)
      kw = {} if scheduled is None else {"scheduled": scheduled}
      updates, state = tx.update(grads, state, params, batch=batch, **kw)
      return optax.apply_updates(params, updates), state
    return step

  def make_step(tx, name=None):
    # Donating params and state lets XLA update the estimation buffers in place
    # (without it every step copies S, Delta and the prior sums: ~(2M + 4) x params).
    jitted = functools.partial(jax.jit, donate_argnums=(0, 1), static_argnames="scheduled")(
        step_fn(tx))
    return HostScheduled(jitted, schedule(name)) if name in host_scheduled else jitted

  stacked = jax.tree.map(lambda *b: jnp.stack(b), *batches)

  def make_epoch_call(tx, name):
    # An epoch starts a round (restart_every = steps): its first steps estimate.
    one = step_fn(tx)
    return steps_in_one_call(
        lambda t, p, s, data, scheduled=None: one(
            p, s, jax.tree.map(lambda a: a[t % num_distinct], data), scheduled),
        steps, schedule(name) if name in host_scheduled else None)

  def epoch(step, params, state):
    for t in range(steps):
      params, state = step(params, state, batches[t % num_distinct])
    jax.block_until_ready(params)
    return params, state

  runners = {}
  for name, tx in configs.items():
    step = make_step(tx, name)
    state = tx.init(params0)
    params, state = step(jax.tree.map(jnp.copy, params0), state, batches[0])       # compile
    if name in host_scheduled:     # each phase's step compiles on its first use
      params, state = epoch(step, params, state)
    jax.block_until_ready(params)
    runners[name] = [step, params, state]

  def measure(label):
    times = {name: [] for name in configs}
    faults = {name: 0 for name in configs}
    for _ in range(args.repeats):
      for name, run in runners.items():                    # interleaved: shared noise
        f0 = _allocator.minor_page_faults()
        t0 = time.perf_counter()
        run[1], run[2] = epoch(run[0], run[1], run[2])
        times[name].append(time.perf_counter() - t0)
        faults[name] += _allocator.minor_page_faults() - f0
    base = np.median(times["SGD (lr 0.01)"])
    fastest = np.min(times["SGD (lr 0.01)"])
    print(f"{label}:")
    for name in configs:
      t = np.median(times[name])
      print(f"  {name:46s} {t:8.3f} s/epoch   {t / base:5.2f}x SGD   "
            f"(fastest/fastest {np.min(times[name]) / fastest:5.2f}x)   "
            f"{faults[name] / (args.repeats * steps):7.0f} page faults/step")

  def measure_one_call():
    # Each epoch one jitted call (fori_loop over the steps): no per-step host
    # work, so this is the step rate the device alone allows.
    calls = {}
    for name, tx in configs.items():
      call = make_epoch_call(tx, name)
      params, state = call(jax.tree.map(jnp.copy, params0), tx.init(params0), stacked)
      jax.block_until_ready(params)
      calls[name] = [call, params, state]
    times = time_carried_calls(calls, stacked, repeats=args.repeats)
    base = np.median(times["SGD (lr 0.01)"])
    print("each epoch ONE jitted call (lax.fori_loop over its steps; no per-step host work):")
    for name in configs:
      t = np.median(times[name])
      print(f"  {name:46s} {t:8.3f} s/epoch   {t / base:5.2f}x SGD   "
            f"(fastest/fastest {np.min(times[name]) / np.min(times['SGD (lr 0.01)']):5.2f}x)")

  print(f"device: {jax.devices()[0].device_kind}; {data_name} data; {steps} steps/epoch, "
        f"batch 128, median of {args.repeats} epochs")
  measure("default allocator")
  if _allocator.cache_large_blocks():
    measure("glibc caching large blocks (like a GPU runtime's caching allocator; "
            "see benchmarks/_allocator.py)")
  if args.one_call:
    measure_one_call()
  phase_costs(make_step, {k: v for k, v in configs.items() if k not in host_scheduled},
              params0, batches)
  for name, run in runners.items():
    if name not in _PP_KWARGS and name not in host_scheduled:
      continue
    st = run[2]
    print(f"  {name}: alpha={np.asarray(st.alpha)} skipped={int(st.num_skipped)} "
          f"restarts={int(st.num_restarts)}")
  print_host_times(runners, batches[0], width=46)


if __name__ == "__main__":
  main()
