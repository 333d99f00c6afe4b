"""Per-step cost of curvax.diagnostics presets on a 3c3d-shaped CNN.

DeepOBS's CIFAR-10 3c3d (895,210 parameters; by default the Linen model of
curvax.problems through ``from_linen``, so per-example quantities take the
per-layer fast path, with ``--conv-impl auto``: convolutions as patches @ kernel on
CPU, where XLA runs convolutions inside ``lax.cond`` several times slower;
``--model raw`` is the same net in ``jax.lax`` (vmap path); conv 64@5x5 valid, conv 96@3x3 valid,
conv 128@3x3 same, each ReLU + 3x3/2 max-pool, then dense 512, 256, 10) on random
data of CIFAR-10 shapes, batch 128, SGD. For each preset (economy / business /
full) the script times, with jit and after compilation, three kinds of steps:

* a tracked step (all instruments at theta_t), in the steady state of
  every-k tracking: after k steps on another batch, so that HessMaxEV starts
  from the Ritz vector of a tracked step k steps earlier;
* the step right after a tracked one (Alpha's end point: one JVP);
* an untracked step (the ``lax.cond`` branch that copies the state);
* the same step scheduled on the host ("idle": ``update(..., scheduled=False)``,
  compiled without the instruments and without any cond; column "host" of
  every-k tracking uses it for the k - 2 untracked steps);

and reports, as ratios to a plain jitted SGD step (gradient + update), none
of them donated (each round reuses its inputs):

* every step tracked: a monitor built with ``every=1`` (no ``lax.cond``: on
  XLA:CPU per-example conv gradients inside a conditional run several times
  slower with ``--conv-impl lax``), in steady state (each step includes Alpha's
  end point);
* every 64th step: ``(tracked + after + 62 * untracked) / 64``, amortised.

With ``--blocks N``, also N blocks of 64 consecutive steps run as a training
loop runs them: one call per step, parameters and state donated (the monitor
then updates its parameter-sized buffers in place), the schedule's conds
("loop") or host-scheduled steps ("loop host"), each block's time as a ratio
to 64 plain donated SGD steps.

Cockpit's published figures (thesis Fig. C.8 / 7.6b, GPU, CIFAR-10 3c3d):
every step 1.5x / 2.0x / 21x, every 64th step 1.0x / 1.0x / 1.3x. The first
GPU run (one H200, 2026-11-27, plain step 1.0 ms) gave every step 11x / 33x
(15x with ``:mc``) / 56x, every 64th 2.2x / 2.8x / 3.8x, untracked steps
2.1-3.0x: far from Cockpit's there (on 2 CPU cores: 1.5x / 5.5x / 14x and
1.0x / 1.1x / 1.3x). The second (2026-11-28; profiled by profile_steps.py):
every 64th 2.64x, 2.23x with the untracked steps scheduled on the host, whose
device time equals the plain step's (0.46 against 0.44 ms): the rest is host
time for the monitor state's 76 arrays. A tracked economy step: 16.8 ms on the
device, 10.5 ms of it cuDNN's per-example conv weight gradients (``vmap`` of
the transpose), 2.8 ms the histogram's scatter-add (docs/performance.md).

Cockpit itself on the same machine: ``benchmarks/peers/cockpit_3c3d.py`` (2 CPU
cores, 2026-11-27: every step 11.5x / 24.4x / 125x, every 64th 1.21x / 1.42x / 3.02x
its own plain step; curvax in the same hour 1.85x / 6.23x (2.45x ``:mc``) / 15.0x
and 1.01x / 1.03x / 1.31x; docs/performance.md).

Timings are medians over ``--repeats`` rounds; each round times every step kind
of a preset and the plain step once, in turn (the same input state each time),
so that machine noise hits numerator and denominator alike. A preset may drop
instruments: ``--presets economy-grad_hist_1d`` is economy without GradHist1d;
a suffix ``:mc`` (default row ``business:mc``) times the preset with the
Monte-Carlo diagonal GGN (``curvature='diag_ggn_mc'``, one sample) standing in
for the exact one (``--curvature``, ~C - 1 = 9 extra backward passes through
the batch plus the conv layers' per-example column products) in HessTrace and TIC.

  python benchmarks/diagnostics.py [--batch 128] [--repeats 3]
      [--presets economy,business,business:mc,full]
      [--every 64] [--chunk-size N] [--curvature diag_ggn_mc] [--conv-impl lax]
      [--blocks 3]
"""

from __future__ import annotations

import argparse
import functools

import jax
import jax.numpy as jnp
import numpy as np
import optax

import curvax
from curvax import diagnostics as dg
from curvax import flax_utils
from curvax.problems import models

import _allocator  # noqa: E402  (benchmarks/_allocator.py)
from _timing import interleaved_medians, time_carried_calls  # noqa: E402  (benchmarks/_timing.py)

COCKPIT = {"economy": (1.5, 1.0), "business": (2.0, 1.0), "full": (21.0, 1.3)}


def _conv(x, k, b, padding):
  y = jax.lax.conv_general_dilated(x, k, (1, 1), padding,
                                   dimension_numbers=("NHWC", "HWIO", "NHWC"))
  return y + b


def _pool(x):
  return jax.lax.reduce_window(x, -jnp.inf, jax.lax.max, (1, 3, 3, 1), (1, 2, 2, 1), "SAME")


def apply_3c3d(params, x):
  h = _pool(jax.nn.relu(_conv(x, params["c1"]["k"], params["c1"]["b"], "VALID")))
  h = _pool(jax.nn.relu(_conv(h, params["c2"]["k"], params["c2"]["b"], "VALID")))
  h = _pool(jax.nn.relu(_conv(h, params["c3"]["k"], params["c3"]["b"], "SAME")))
  h = h.reshape(h.shape[0], -1)
  h = jax.nn.relu(h @ params["d1"]["w"] + params["d1"]["b"])
  h = jax.nn.relu(h @ params["d2"]["w"] + params["d2"]["b"])
  return h @ params["d3"]["w"] + params["d3"]["b"]


def init_3c3d(key):
  shapes = {"c1": (5, 5, 3, 64), "c2": (3, 3, 64, 96), "c3": (3, 3, 96, 128),
            "d1": (3 * 3 * 128, 512), "d2": (512, 256), "d3": (256, 10)}
  params = {}
  for (name, shape), k in zip(shapes.items(), jax.random.split(key, len(shapes))):
    fan_in = int(np.prod(shape[:-1]))
    w = jax.random.normal(k, shape) * np.sqrt(2.0 / fan_in)
    params[name] = {"k" if name.startswith("c") else "w": w, "b": jnp.zeros(shape[-1])}
  return params


def main():
  ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  ap.add_argument("--batch", type=int, default=128)
  ap.add_argument("--repeats", type=int, default=3)
  ap.add_argument("--every", type=int, default=64,
                  help="k of 'every k-th step' (>= 3: the untracked step timed is k + 2)")
  ap.add_argument("--presets", default="economy,business,business:mc,full")
  ap.add_argument("--chunk-size", type=int, default=None)
  ap.add_argument("--curvature", default="diag_ggn", choices=["diag_ggn", "diag_ggn_mc"])
  ap.add_argument("--model", default="linen", choices=["linen", "raw"],
                  help="linen: curvax.problems.models.ThreeC3D through from_linen (the "
                  "per-layer fast path); raw: the same net in jax.lax (vmap path)")
  ap.add_argument("--conv-impl", default="auto", choices=["auto", "lax", "patches"],
                  help="convolutions of the Linen model (curvax.layers.conv_class)")
  ap.add_argument("--blocks", type=int, default=0,
                  help="also time this many blocks of `every` consecutive steps, one call "
                  "per step with parameters and state donated, as a training loop runs "
                  "them: the schedule's conds, and host-scheduled (columns 'loop', "
                  "'loop host'); 0: skip")
  ap.add_argument("--cache-allocator", action="store_true",
                  help="cache large malloc blocks (benchmarks/_allocator.py)")
  args = ap.parse_args()
  if args.every < 3:
    ap.error("--every must be >= 3: the step after a tracked one (k + 1) and an untracked "
             "one (k + 2) are timed, and with k < 3 the latter is tracked too")
  if args.cache_allocator and not _allocator.cache_large_blocks():
    print("(could not change glibc's allocator settings)")

  key = jax.random.PRNGKey(0)
  kp, kx, ky = jax.random.split(key, 3)
  if args.model == "linen":
    module = models.ThreeC3D(num_classes=10, conv_impl=args.conv_impl)
    apply_fn, params = flax_utils.from_linen(
        module, module.init(kp, jnp.zeros((1, 32, 32, 3))))
  else:
    apply_fn, params = apply_3c3d, init_3c3d(kp)
  n_params = sum(p.size for p in jax.tree_util.tree_leaves(params))
  batch = (jax.random.normal(kx, (args.batch, 32, 32, 3)),
           jax.random.randint(ky, (args.batch,), 0, 10))
  ko1, ko2 = jax.random.split(jax.random.fold_in(key, 1))
  other = (jax.random.normal(ko1, (args.batch, 32, 32, 3)),
           jax.random.randint(ko2, (args.batch,), 0, 10))
  loss = curvax.losses.softmax_cross_entropy
  obj = curvax.losses.objective(apply_fn, loss)
  conv = (curvax.layers.conv_class(args.conv_impl).__name__ if args.model == "linen"
          else "lax.conv")
  print(f"3c3d ({args.model}, {conv}): {n_params:,} parameters, batch {args.batch}, "
        f"device {jax.devices()[0]}")

  sgd = optax.sgd(1e-3)
  plain_step = _training_step(obj, sgd)
  make_step = functools.partial(_training_step, obj)

  header = False
  width = max(10, *(len(p) for p in args.presets.split(",")))
  for preset in args.presets.split(","):
    name, _, variant = preset.partition(":")
    if variant not in ("", "mc"):
      raise SystemExit(f"unknown preset variant {variant!r} in {preset!r} (use ':mc')")
    curvature = "diag_ggn_mc" if variant == "mc" else args.curvature
    instruments = _instruments(name)
    tx = dg.monitor(sgd, apply_fn, loss, instruments, every=args.every,
                    curvature=curvature, chunk_size=args.chunk_size)
    step = make_step(tx)
    # Steady state of every-k tracking: k steps (one tracked, k - 1 untracked) on
    # another batch first, so that the timed tracked step starts HessMaxEV from
    # the Ritz vector of a tracked step k steps earlier, on other data.
    p_k, state = params, tx.init(params)
    for _ in range(args.every):
      p_k, state = step(p_k, state, other)
    at = lambda c, state=state: state._replace(count=jnp.asarray(c, jnp.int32))
    # Every step tracked: a monitor with every=1 (no lax.cond at all), in steady
    # state (from its second step on, each step includes Alpha's end point).
    tx1 = dg.monitor(sgd, apply_fn, loss, instruments, every=1, curvature=curvature,
                     chunk_size=args.chunk_size)
    step1 = make_step(tx1)
    p1, state1 = step1(params, tx1.init(params), other)  # the previous step: other data
    # "after": the step after a tracked one, which finishes Alpha's fit (the
    # warm-up ended on an untracked step, so its state says "not tracked").
    kinds = {"plain": (plain_step, sgd.init(params)), "tracked": (step, at(args.every)),
             "after": (step, at(args.every + 1)._replace(tracked=jnp.asarray(True))),
             "untracked": (step, at(args.every + 2)),
             # the same untracked step, scheduled on the host (no cond at all)
             "idle": (make_step(tx, scheduled=False), at(args.every + 2)),
             "every1": (step1, state1)}
    fns = {k: functools.partial(f, p1 if k == "every1" else p_k, st, batch)
           for k, (f, st) in kinds.items()}
    t = interleaved_medians(fns, args.repeats, settle=fns["plain"])
    if not header:
      print(f"plain SGD step: {t['plain'] * 1e3:.1f} ms (each row's ratios use the plain "
            f"step timed interleaved with its own)\n")
      print(f"{'preset':{width}s} {'tracked':>9s} {'after':>9s} {'untracked':>10s} "
            f"{'idle':>7s}   {'every step':>10s} {'(Cockpit)':>9s}   "
            f"{'every ' + str(args.every):>9s} {'host':>7s} {'(Cockpit)':>9s}"
            + (f"   {'loop':>8s} {'loop host':>9s}" if args.blocks else ""))
      header = True
    r = {k: v / t["plain"] for k, v in t.items()}
    k = args.every
    every_k = (r["tracked"] + r["after"] + (k - 2) * r["untracked"]) / k
    host_k = (r["tracked"] + r["after"] + (k - 2) * r["idle"]) / k
    c1, ck = COCKPIT.get(name, (float("nan"), float("nan")))  # nan: no published figure
    loop = ""
    if args.blocks:
      b = _donated_blocks(obj, sgd, tx, instruments, params, batch, args.every, args.blocks)
      loop = f"   {b['monitor'] / b['plain']:7.2f}x {b['monitor, host'] / b['plain']:9.2f}x"
    print(f"{preset:{width}s} {r['tracked']:8.2f}x {r['after']:8.2f}x {r['untracked']:9.2f}x "
          f"{r['idle']:6.2f}x   {r['every1']:9.2f}x {c1:8.1f}x   {every_k:8.2f}x "
          f"{host_k:6.2f}x {ck:8.1f}x{loop}", flush=True)


def _training_step(obj, tx, scheduled=None, donate=False):
  """Jitted ``(params, state, batch) -> (params, state)``: gradient, ``tx``, update.

  ``tx.update`` gets ``batch`` and ``scheduled`` (a plain optax ``tx`` ignores
  them). With ``donate``, parameters and state are donated, as a training loop
  does.
  """
  tx = optax.with_extra_args_support(tx)

  def step(p, s, b):
    u, s = tx.update(jax.grad(obj)(p, b), s, p, batch=b, scheduled=scheduled)
    return optax.apply_updates(p, u), s
  return jax.jit(step, donate_argnums=(0, 1) if donate else ())


def _donated_blocks(obj, sgd, tx, instruments, params, batch, every, blocks):
  """Median seconds of ``every`` consecutive steps, one donated call per step.

  As a training loop runs them (`curvax.problems.run` donates its carry too):
  parameters and optimizer state donated to each call, so that untracked steps
  update them in place, and the block holds one tracked step, the step after
  it and ``every - 2`` untracked ones. Three runs, interleaved block by block:
  plain SGD; the monitor with its device-side schedule (conds); the monitor
  scheduled on the host (`dg.is_scheduled` picks ``scheduled=False`` on steps
  without work: two compiled steps, no conds). Each block starts at a tracked
  step of its run (the monitors' counts are multiples of ``every``).
  """
  plain = _training_step(obj, sgd, donate=True)
  device = _training_step(obj, tx, donate=True)
  busy, idle = (_training_step(obj, tx, scheduled=flag, donate=True) for flag in (True, False))
  host_step = lambda t: busy if dg.is_scheduled(t, every=every, instruments=instruments) else idle
  copy = lambda tree: jax.tree_util.tree_map(jnp.copy, tree)

  def block(step_of):
    done = [0]  # steps so far: the host knows the step number, as a training loop does
    def call(p, s, b):
      for t in range(done[0], done[0] + every):
        p, s = step_of(t)(p, s, b)
      done[0] += every
      return p, s
    return call

  runs = {"plain": [block(lambda t: plain), copy(params), sgd.init(params)],
          "monitor": [block(lambda t: device), copy(params), tx.init(params)],
          "monitor, host": [block(host_step), copy(params), tx.init(params)]}
  time_carried_calls(runs, batch, repeats=1)  # compiles every variant, reaches steady state
  times = time_carried_calls(runs, batch, repeats=blocks)
  return {name: float(np.median(t)) for name, t in times.items()}


def _instruments(spec):
  """``"economy"`` -> the preset; ``"economy-grad_hist_1d"`` -> the preset without it."""
  name, *drop = spec.split("-")
  unknown = [d for d in drop if d not in dg.PRESETS[name]]
  if unknown:
    raise SystemExit(f"{unknown} are not instruments of the {name!r} preset")
  return [n for n in dg.PRESETS[name] if n not in drop]


if __name__ == "__main__":
  main()
