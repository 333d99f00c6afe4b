"""Timing helper shared by the benchmark scripts."""

from __future__ import annotations

import functools
import time

import jax
import numpy as np

from curvax.problems.runner import schedule_runs


def median_time(fn, *args, repeats: int = 5) -> float:
  """Median wall time in seconds of ``fn(*args)`` over ``repeats`` calls.

  One call before timing compiles and warms up; each timed call waits for its
  results (``jax.block_until_ready``), so asynchronous dispatch is included.
  """
  jax.block_until_ready(fn(*args))
  times = []
  for _ in range(repeats):
    t = time.perf_counter()
    jax.block_until_ready(fn(*args))
    times.append(time.perf_counter() - t)
  return float(np.median(times))


def interleaved_medians(fns, repeats: int = 5, settle=None) -> dict:
  """Median wall time in seconds of each ``fns[k]()``, timed round-robin.

  Each function is called once to compile and warm up; then every round calls
  each function once, in turn, so slow phases of a shared machine hit all of
  them alike and ratios between them stay meaningful. ``settle`` (a cheap
  callable) runs untimed before each timed call: on a VM, the call right after
  one that touched gigabytes runs up to 2x slower while the kernel reclaims
  and refaults memory, which would otherwise bias whichever function follows.
  """
  for fn in fns.values():
    jax.block_until_ready(fn())
  times = {k: [] for k in fns}
  for _ in range(repeats):
    for k, fn in fns.items():
      if settle is not None:
        jax.block_until_ready(settle())
      t = time.perf_counter()
      jax.block_until_ready(fn())
      times[k].append(time.perf_counter() - t)
  return {k: float(np.median(v)) for k, v in times.items()}


def host_time_per_call(step, carry, *args, calls: int = 50):
  """Median seconds from calling ``step(*carry, *args)`` until it returns.

  ``step`` is a jitted training step returning its new ``carry`` (e.g.
  ``(params, state)``); every call starts with its inputs ready. Under
  asynchronous dispatch the call returns before the computation ends, so this
  is the host's share of a step: flattening the arguments, launching the
  executable (one buffer-table entry per allocation), wrapping every output
  leaf. A GPU hides it behind its own compute only when the step's device time
  is longer; on a small model it can set the step rate. Returns ``(seconds,
  carry)`` (the carry advanced by ``calls + 1`` steps).
  """
  carry = step(*carry, *args)
  jax.block_until_ready(carry)
  times = []
  for _ in range(calls):
    t = time.perf_counter()
    carry = step(*carry, *args)
    times.append(time.perf_counter() - t)
    jax.block_until_ready(carry)
  return float(np.median(times)), carry


def print_host_times(runs, *args, width: int = 36) -> None:
  """Prints `host_time_per_call` for each ``name -> [step, params, state]`` in
  ``runs`` (advancing their params and state), with the arrays each call moves."""
  print("host time per call (until the jitted step returns; asynchronous dispatch):")
  for name, run in runs.items():
    seconds, (run[1], run[2]) = host_time_per_call(run[0], (run[1], run[2]), *args)
    arrays = len(jax.tree_util.tree_leaves((run[1], run[2])))
    print(f"  {name:{width}s} {1e3 * seconds:6.3f} ms/call   ({arrays} arrays in and out)")


def steps_in_one_call(body, num_steps: int, scheduled=None):
  """``num_steps`` training steps as ONE jitted, donated call (``fori_loop``s).

  ``body(t, params, state, data) -> (params, state)`` is one step, picking its
  batch(es) out of ``data`` (stacked batches) by the step index ``t``. Returns
  ``run(params, state, data) -> (params, state)``. Against one call per step
  this takes the host's per-call work (argument and output handling, launch)
  out of the step rate, which on a GPU and a small model can dominate it; it is
  what docs/performance.md recommends there.

  With ``scheduled`` (a host function of the step's index in the call: whether
  it has scheduled work, or which: a phase name), ``body`` also takes
  ``scheduled=`` and the call runs one loop per run of equal values (the same
  runs every call): e.g. the steps without scheduled work in a loop of the
  variant compiled without conds.
  """
  runs = schedule_runs(scheduled, 0, num_steps)

  @functools.partial(jax.jit, donate_argnums=(0, 1))
  def run(params, state, data):
    carry, first = (params, state), 0
    for flag, length in runs:
      step = (lambda t, c, f=flag: body(t, *c, data, scheduled=f)) if scheduled is not None \
          else (lambda t, c: body(t, *c, data))
      carry = jax.lax.fori_loop(first, first + length, step, carry)
      first += length
    return carry
  return run


class HostScheduled:
  """A jitted step called with ``scheduled=schedule(t)``, ``t`` counted here
  (every call is one update, from 0): two compiled variants, the one passed
  ``scheduled=False`` without the transform's ``lax.cond``s."""

  def __init__(self, jitted, schedule):
    self.jitted, self.schedule, self.t = jitted, schedule, 0

  def __call__(self, *args):
    (flag, _), = schedule_runs(self.schedule, self.t, 1)
    self.t += 1
    return self.jitted(*args, scheduled=flag)


def time_carried_calls(runs, *args, repeats: int) -> dict:
  """Wall times of ``repeats`` rounds of calls ``run[0](run[1], run[2], *args)``
  for each ``name -> [call, params, state]`` in ``runs``, interleaved (every
  round calls each once, in turn, so machine noise hits all alike); each call
  is waited for and advances that run's params and state. Returns ``{name:
  [seconds, ...]}``."""
  times = {name: [] for name in runs}
  for _ in range(repeats):
    for name, run in runs.items():
      start = time.perf_counter()
      run[1], run[2] = run[0](run[1], run[2], *args)
      jax.block_until_ready(run[1])
      times[name].append(time.perf_counter() - start)
  return times
