"""Parameter-sized copies in the compiled training step of each transform.

When a training step is jitted with the parameters and the optimizer state
donated (``jax.jit(step, donate_argnums=(0, 1))``), XLA updates them in place.
If some computation reads the parameters (an HVP, a JVP, per-example gradients)
and nothing orders it before the in-place ``params + update``, XLA protects the
read by copying the parameters first: a full extra pass over memory on every
step, invisible in the results. Whether it does depends on data dependencies
and on the order of the HLO, so it can come back with an innocent-looking edit
or a new XLA version (jax is not pinned). This script compiles a donated step
for every transform on the mnist_mlp-shaped MLP (784-1000-500-100-10, 1.33M
parameters, batch 128) and prints the ``copy`` instructions of the optimized
program (its ENTRY computation) whose arrays have at least as many elements as
the smallest kernel, and their megabytes beside the parameters' own.

What this printed (XLA:CPU, jax 0.10.2): plain optax steps copy the three
hidden kernels (2.2 MB): the backward pass reads each kernel for the error it
sends down, and nothing orders that read before the kernel's own update (so
every ratio to a plain step already includes these). No copies for every
``curvature_step_size`` mode, ``probabilistic_preconditioning`` and the
monitor's untracked steps (their updates depend on computations that read all
parameters). ``hessian_free`` copies one parameter-sized vector (5.3 MB) per
step: CG's loop starts with ``r = z = p`` (no preconditioner), three carried
buffers from one value, beside CG's tens of GGN products. The monitor tracked
on every step copies small histogram buffers.

Beside the copies it prints each step's shape as the device runs it: the
kernels launched outside control flow ("kernels": fusions, library calls such
as cuBLAS GEMMs, copies), the ``conditional`` and ``while`` instructions (on
XLA:GPU each is a host round-trip for its predicate) and the kernels inside
them. On a GPU, a step of this small MLP costs a few microseconds per kernel
launch, so these counts, not FLOPs, set the ratios of the speed benchmarks
(docs/performance.md). ``--dump DIR`` writes each optimized program to DIR.

Copies and kernels are structural properties, not timings: the numbers do not
depend on the machine's load. Usage:
python benchmarks/buffer_copies.py [--show 3] [--dump DIR]
"""

from __future__ import annotations

import argparse
import os
import re

import jax
import numpy as np
import optax

import curvax
from probabilistic_preconditioning import (  # benchmarks/: the same MLP
    fixed_low_rank_preconditioner, mlp_apply, mlp_init)

_COPY = re.compile(r"=\s*(\w+)\[([0-9,]*)\]\S*\s+copy\(")
_ITEMSIZE = {"f64": 8, "f32": 4, "bf16": 2, "f16": 2, "s32": 4, "u32": 4, "s64": 8, "pred": 1}


def large_copies(compiled_text: str, min_elements: int):
  """``(shape, megabytes, line)`` of each copy in ENTRY of at least ``min_elements``."""
  entry = compiled_text[compiled_text.index("\nENTRY"):]
  out = []
  for line in entry.splitlines():
    m = _COPY.search(line)
    if not m:
      continue
    dims = [int(v) for v in m.group(2).split(",") if v]
    size = int(np.prod(dims)) if dims else 1
    if size >= min_elements:
      out.append((tuple(dims), size * _ITEMSIZE.get(m.group(1), 4) / 1e6, line.strip()))
  return out


_HEADER = re.compile(r"^(ENTRY\s+)?%?([\w.\-]+)\s*\(.*\{\s*$")
_OPCODE = re.compile(r"=\s*(?:\([^=]*\)|\S+)\s+([\w\-]+)\(")
_FREE = {"parameter", "constant", "get-tuple-element", "tuple", "bitcast", "after-all",
         "add-dependency", "opt-barrier", "partition-id", "replica-id"}
_NESTED = re.compile(r"(?:branch_computations=\{([^}]*)\}|true_computation=%?([\w.\-]+)"
                     r"|false_computation=%?([\w.\-]+)|body=%?([\w.\-]+)"
                     r"|condition=%?([\w.\-]+))")
_CALL = re.compile(r"to_apply=%?([\w.\-]+)")


def computations(compiled_text: str):
  """``name -> [(opcode, line)]`` of the optimized program, and the ENTRY's name."""
  comps, entry, name = {}, None, None
  for line in re.sub(r"/\*index=\d+\*/", "", compiled_text).splitlines():
    m = _HEADER.match(line)
    if m:
      name = m.group(2)
      comps[name] = []
      entry = name if m.group(1) else entry
    elif name is not None and line.strip() == "}":
      name = None
    elif name is not None:
      op = _OPCODE.search(line)
      if op:
        comps[name].append((op.group(1), line))
  return comps, entry


def kernel_counts(compiled_text: str):
  """``(kernels, conds, whiles, kernels in control flow)`` of a compiled step.

  Walks from ENTRY through control flow (``conditional`` branches, ``while``
  bodies and conditions, XLA:CPU's ``call`` wrappers) without entering fusions:
  each instruction met that is not free (parameters, tuples, bitcasts, ...) is
  one launch. Kernels in control flow are summed over all branches (an upper
  bound for one execution) and counted once per ``while`` (not per iteration).
  """
  comps, entry = computations(compiled_text)
  counts = {"straight": 0, "cond": 0, "while": 0, "nested": 0}

  def walk(name, nested):
    for opcode, line in comps.get(name, ()):
      if opcode in ("conditional", "while"):
        counts["cond" if opcode == "conditional" else "while"] += 1
        for m in _NESTED.finditer(line):
          for group in m.groups():
            for callee in (group or "").replace("%", "").split(","):
              if callee.strip():
                walk(callee.strip(), True)
      elif opcode == "call":
        for callee in _CALL.findall(line):
          walk(callee, nested)
      elif opcode not in _FREE:
        counts["nested" if nested else "straight"] += 1

  walk(entry, False)
  return counts["straight"], counts["cond"], counts["while"], counts["nested"]


def steps(params, batch, eval_batch):
  """``name -> (step, tx)``; each step is ``(params, state) -> (params, state)``."""
  sce = curvax.losses.softmax_cross_entropy
  loss_fn = curvax.losses.objective(mlp_apply, sce)
  T = curvax.transforms

  def make(tx, extra=None):
    extra = extra or {}
    def step(p, s):
      g = jax.grad(loss_fn)(p, batch)
      u, s = tx.update(g, s, p, batch=batch, **extra)
      return optax.apply_updates(p, u), s
    return step, tx

  sgd = optax.with_extra_args_support(optax.sgd(0.1))
  two = {"eval_batch": eval_batch}
  css = lambda **kw: T.curvature_step_size(optax.nadamw(1e-3), mlp_apply, sce, **kw)
  pp = lambda **kw: T.probabilistic_preconditioning(loss_fn, restart_every=469, **kw)
  mon = lambda preset, every: curvax.diagnostics.monitor(sgd, mlp_apply, sce, preset,
                                                          every=every)
  return {
      "optax.sgd (reference)": make(sgd),
      "optax.nadamw (reference)": make(optax.with_extra_args_support(optax.nadamw(1e-3))),
      "hessian_free": make(T.hessian_free(mlp_apply, sce, cg_max_iter=10), two),
      "curvature_step_size biased": make(css(debias=False)),
      "curvature_step_size debiased": make(css(debias=True), two),
      "curvature_step_size interval": make(
          css(debias=True, mode="interval", interval=100, num_estimates=10), two),
      "  interval, scheduled=False": make(
          css(debias=True, mode="interval", interval=100, num_estimates=10),
          dict(two, scheduled=False)),
      "probabilistic_preconditioning": make(pp()),
      "  scheduled=False": make(pp(), {"scheduled": False}),
      **{f"  scheduled={phase!r}": make(pp(), {"scheduled": phase})
         for phase in ("prior", "posterior", "build")},
      "  fixed rank-2 + SGD (reference)": make(optax.with_extra_args_support(optax.chain(
          fixed_low_rank_preconditioner(jax.random.PRNGKey(2)), optax.sgd(0.1)))),
      "  fixed rank-2, one reduce per leaf": make(optax.with_extra_args_support(optax.chain(
          fixed_low_rank_preconditioner(jax.random.PRNGKey(2), dots="reduce"),
          optax.sgd(0.1)))),
      "  fixed rank-2, flat U": make(optax.with_extra_args_support(optax.chain(
          fixed_low_rank_preconditioner(jax.random.PRNGKey(2), dots="flat"),
          optax.sgd(0.1)))),
      "  adaptive (no preconditioning)": make(pp(precondition=False,
                                                 estimate_preconditioner=True)),
      "  momentum inner": make(pp(inner=optax.trace(0.9))),
      "monitor economy every 64": make(mon("economy", 64)),
      "monitor business every 64": make(mon("business", 64)),
      "monitor economy every step": make(mon("economy", 1)),
      "monitor economy, scheduled=False": make(mon("economy", 64), {"scheduled": False}),
  }


def main():
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument("--show", type=int, default=0,
                      help="print this many copy instructions of each step")
  parser.add_argument("--dump", default=None,
                      help="write each step's optimized program (HLO text) to this folder")
  args = parser.parse_args()

  key = jax.random.PRNGKey(0)
  params = mlp_init(key)
  kx, ky = jax.random.split(jax.random.fold_in(key, 1))
  x = jax.random.uniform(kx, (256, 784))
  y = jax.random.randint(ky, (256,), 0, 10)
  batch, eval_batch = (x[:128], y[:128]), (x[128:], y[128:])
  leaves = jax.tree_util.tree_leaves(params)
  min_kernel = min(l.size for l in leaves if l.ndim == 2)
  params_mb = sum(l.size * l.dtype.itemsize for l in leaves) / 1e6
  print(f"jax {jax.__version__} on {jax.devices()[0].platform}; parameters {params_mb:.1f} MB; "
        f"copies of >= {min_kernel} elements in each donated step's ENTRY")
  print(f"{'transform':34s} {'copies':>6s} {'MB':>7s} {'kernels':>7s} {'conds':>5s} "
        f"{'whiles':>6s} {'in them':>7s}")
  if args.dump:
    os.makedirs(args.dump, exist_ok=True)
  for name, (step, tx) in steps(params, batch, eval_batch).items():
    state = tx.init(params)
    text = jax.jit(step, donate_argnums=(0, 1)).lower(params, state).compile().as_text()
    copies = large_copies(text, min_kernel)
    kernels, conds, whiles, nested = kernel_counts(text)
    print(f"{name:34s} {len(copies):6d} {sum(c[1] for c in copies):7.2f} {kernels:7d} "
          f"{conds:5d} {whiles:6d} {nested:7d}")
    if args.dump:
      file = re.sub(r"[^\w]+", "_", name.strip()).strip("_") + ".txt"
      with open(os.path.join(args.dump, file), "w") as f:
        f.write(text)
    for shape, mb, line in copies[:args.show]:
      print(f"    {shape} {mb:.2f} MB: {line[:110]}")


if __name__ == "__main__":
  main()
