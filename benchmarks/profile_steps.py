"""Where each transform's step spends its device time: a profile per step.

For each step of ``buffer_copies.steps`` (the mnist_mlp-shaped MLP, batch 128,
donated parameters and state) and the monitor's presets on the 3c3d-shaped CNN of
``diagnostics.py`` (tracked every step, and an untracked step with and without
the schedule's cond), this script runs ``--calls`` jitted calls under
``jax.profiler.trace`` and reads the trace back (``jax.profiler.ProfileData``):

* ``wall``: milliseconds per call of the traced loop (the profiler adds some);
* ``busy``: the device's kernel time per call, summed over the kernels it ran;
* ``kernels``: kernel launches per call (on a GPU; XLA:CPU reports thunks);
* ``idle``: ``1 - busy / wall``: the share of a call the device waited (for the
  host, a cond's predicate, a launch);
* from the optimized program (``buffer_copies.kernel_counts``): the kernels
  outside control flow, the conds and the while loops;
* the ``--top`` most expensive HLO instructions of each step with their JAX
  ``op_name`` (curvax names its stages with ``jax.named_scope``: ``per_example``,
  ``diag_curvature``, ``hess_max_ev``, ``alpha_end``, ``jvp``, ...).

On a small model on a GPU, ``busy`` far below ``wall`` means launches and host
round-trips, not arithmetic, set the step's cost (docs/performance.md); where
``busy`` is large, the top instructions say which stage to make cheaper.

  python benchmarks/profile_steps.py [--calls 20] [--top 6] [--only css,pp]
      [--presets economy,business,full] [--dump DIR]
"""

from __future__ import annotations

import argparse
import collections
import glob
import os
import re
import shutil
import tempfile
import time

import jax
import jax.numpy as jnp
import optax

import curvax
from curvax import diagnostics as dg
from curvax import flax_utils
from curvax.problems import models

import buffer_copies  # benchmarks/: the MLP steps and the HLO parser
import diagnostics  # benchmarks/: the 3c3d preset instruments

_OP_NAME = re.compile(r'op_name="([^"]*)"')
_INSTR = re.compile(r"^\s*(?:ROOT\s+)?%?([\w.\-]+)\s*=")


def op_names(compiled_text: str):
  """HLO instruction name -> its JAX ``op_name``, and the control-flow instructions.

  Control flow (``while``, ``conditional``, ``call``) is returned apart: on
  XLA:CPU its event spans the kernels inside it, which are events of their own.
  """
  names, control = {}, set()
  for comp in buffer_copies.computations(compiled_text)[0].values():
    for opcode, line in comp:
      m, o = _INSTR.match(line), _OP_NAME.search(line)
      if m and o:
        names[m.group(1)] = o.group(1)
      if m and opcode in ("while", "conditional", "call"):
        control.add(m.group(1))
  return names, control


def device_events(trace_dir: str):
  """``(hlo_op, hlo_module, start_ns, duration_ns)`` of each device-side kernel.

  GPU planes (``/device:GPU:N``) hold the kernels; on XLA:CPU the thunks run on
  the host's threads and carry the same ``hlo_op`` statistic (their time is
  summed over threads, so ``busy`` may exceed ``wall`` there).
  """
  files = glob.glob(os.path.join(trace_dir, "**", "*.xplane.pb"), recursive=True)
  if not files:
    raise RuntimeError(f"the profiler wrote no trace under {trace_dir}")
  data = jax.profiler.ProfileData.from_file(max(files, key=os.path.getmtime))
  out = []
  for plane in data.planes:
    device = plane.name.startswith("/device:")
    if not device and plane.name != "/host:CPU":
      continue
    for line in plane.lines:
      for e in line.events:
        stats = dict(e.stats)
        if "hlo_op" in stats or (device and e.duration_ns > 0):
          out.append((stats.get("hlo_op", e.name), stats.get("hlo_module", ""),
                      e.start_ns, e.duration_ns))
  return out


def profile(fn, carry, calls: int, module_names, control=frozenset()):
  """Run ``carry = fn(*carry)`` ``calls`` times under the profiler; aggregate.

  Returns wall seconds per call, busy seconds per call, kernels per call and
  ``{hlo_op: ns per call}``, leaving out the ``control`` instructions' events.
  """
  for _ in range(3):
    carry = fn(*carry)
  jax.block_until_ready(carry)
  trace_dir = tempfile.mkdtemp(prefix="curvax_profile_")
  try:
    with jax.profiler.trace(trace_dir):
      t0 = time.perf_counter()
      for _ in range(calls):
        carry = fn(*carry)
      jax.block_until_ready(carry)
      wall = (time.perf_counter() - t0) / calls
    events = [e for e in device_events(trace_dir) if e[0] not in control
              and (not module_names or any(m in e[1] for m in module_names))]
  finally:
    shutil.rmtree(trace_dir, ignore_errors=True)
  by_op = collections.defaultdict(float)
  for op, _, _, dur in events:
    by_op[op] += dur / calls
  busy = sum(by_op.values()) * 1e-9
  return wall, busy, len(events) / calls, by_op


def _copy(tree):
  """A fresh copy: each run donates its carry."""
  return jax.tree_util.tree_map(jnp.copy, tree)


def mlp_runs(only):
  key = jax.random.PRNGKey(0)
  params = buffer_copies.mlp_init(key)
  kx, ky = jax.random.split(jax.random.fold_in(key, 1))
  x = jax.random.uniform(kx, (256, 784))
  y = jax.random.randint(ky, (256,), 0, 10)
  for name, (step, tx) in buffer_copies.steps(params, (x[:128], y[:128]),
                                              (x[128:], y[128:])).items():
    if only and not any(o in name for o in only):
      continue
    yield (name.strip(), jax.jit(step, donate_argnums=(0, 1)),
           (_copy(params), tx.init(params)))


def cnn_runs(presets):
  key = jax.random.PRNGKey(0)
  kp, kx, ky = jax.random.split(key, 3)
  module = models.ThreeC3D(num_classes=10, conv_impl="auto")
  apply_fn, params = flax_utils.from_linen(module, module.init(kp, jnp.zeros((1, 32, 32, 3))))
  batch = (jax.random.normal(kx, (128, 32, 32, 3)), jax.random.randint(ky, (128,), 0, 10))
  loss = curvax.losses.softmax_cross_entropy
  obj = curvax.losses.objective(apply_fn, loss)
  sgd = optax.sgd(1e-3)

  def make(tx, scheduled=None):
    def step(p, s):
      g = jax.grad(obj)(p, batch)
      u, s = tx.update(g, s, p, batch=batch, scheduled=scheduled)
      return optax.apply_updates(p, u), s
    return jax.jit(step, donate_argnums=(0, 1))

  def plain(p, s):
    u, s = sgd.update(jax.grad(obj)(p, batch), s, p)
    return optax.apply_updates(p, u), s

  yield "3c3d plain SGD", jax.jit(plain, donate_argnums=(0, 1)), (_copy(params),
                                                                   sgd.init(params))
  for preset in presets:
    instruments = diagnostics._instruments(preset)  # pylint: disable=protected-access
    tx1 = dg.monitor(sgd, apply_fn, loss, instruments, every=1)
    yield f"3c3d {preset} every step", make(tx1), (_copy(params), tx1.init(params))
    tx = dg.monitor(sgd, apply_fn, loss, instruments, every=1 << 30)  # never again
    state = tx.init(params)
    state = state._replace(count=jnp.ones_like(state.count))  # past the tracked step 0
    yield f"3c3d {preset} untracked (cond)", make(tx), (_copy(params), state)
    yield f"3c3d {preset} untracked (host)", make(tx, scheduled=False), (_copy(params),
                                                                         _copy(state))


def main():
  ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  ap.add_argument("--calls", type=int, default=20)
  ap.add_argument("--top", type=int, default=6)
  ap.add_argument("--only", default="",
                  help="comma-separated substrings of the MLP steps to profile (default all)")
  ap.add_argument("--presets", default="economy,business,full",
                  help="monitor presets on 3c3d ('' for none)")
  ap.add_argument("--dump", default=None,
                  help="write each step's optimized program (HLO text) to this folder")
  args = ap.parse_args()
  only = [o for o in args.only.split(",") if o]
  presets = [p for p in args.presets.split(",") if p]
  print(f"jax {jax.__version__}, {jax.devices()[0]}; {args.calls} calls each")
  print(f"{'step':40s} {'wall ms':>8s} {'busy ms':>8s} {'kernels':>8s} {'idle':>6s} "
        f"{'| HLO: kernels':>7s} {'conds':>5s} {'whiles':>6s}")
  runs = list(mlp_runs(only)) + (list(cnn_runs(presets)) if presets else [])
  for name, fn, carry in runs:
    try:
      text = fn.lower(*carry).compile().as_text()
    except Exception as e:  # pylint: disable=broad-except  (report, go on with the rest)
      print(f"{name:40s} failed to compile: {type(e).__name__}: {str(e)[:200]}")
      continue
    if args.dump:
      os.makedirs(args.dump, exist_ok=True)
      with open(os.path.join(args.dump, re.sub(r"\W+", "_", name).strip("_") + ".txt"),
                "w") as f:
        f.write(text)
    module = re.search(r"HloModule\s+([\w.\-]+)", text)
    names, control = op_names(text)
    static = buffer_copies.kernel_counts(text)
    try:
      wall, busy, kernels, by_op = profile(fn, carry, args.calls,
                                           [module.group(1)] if module else [], control)
    except Exception as e:  # pylint: disable=broad-except  (no profiler: the counts)
      print(f"{name:40s} profiler failed ({type(e).__name__}: {str(e)[:80]}); "
            f"compiled: {static[0]} kernels, {static[1]} conds, {static[2]} whiles")
      continue
    idle = 1 - busy / wall if wall > 0 else float("nan")
    print(f"{name:40s} {wall * 1e3:8.3f} {busy * 1e3:8.3f} {kernels:8.1f} {idle:6.0%} "
          f"{static[0]:7d} {static[1]:5d} {static[2]:6d}", flush=True)
    for op, ns in sorted(by_op.items(), key=lambda kv: -kv[1])[:args.top]:
      scope = names.get(op, "")
      scope = scope if len(scope) <= 80 else "..." + scope[-77:]
      print(f"    {ns * 1e-6:7.3f} ms  {op[:34]:34s} {scope}")


if __name__ == "__main__":
  main()
