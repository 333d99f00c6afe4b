#!/usr/bin/env bash
# The GPU checks, prepared as one run (about 9 minutes on an H200).
#
# Runs on a device: 2026-11-27 and 2026-11-28, one H200 each (figures in
# docs/performance.md; the second took 504 s, the machine's start ~40 s more).
# On a device machine, from the repository root, with the image's own
# jax/optax/flax (curvax needs no install):
#
#   bash benchmarks/device_check.sh          # logs also go to $OUT (or /tmp/curvax_device)
#
# What it answers, in order:
#   1. probabilistic_preconditioning per epoch (#4: <= 1.2x SGD; the third
#      run and its follow-up: 3.7-4.0x one call per epoch with the conds,
#      "host-scheduled" 1.91x (every step compiled without conds, each with
#      its phase's work: update(..., scheduled=estimation_phase(t, ...)), one
#      loop per phase), floor 1.39x; the posterior and build steps ~80% idle
#      in their small per-leaf jnp.linalg calls). Since then those calls are
#      batched across leaves (one inv/solve/eigh/svd per group of equal small
#      shapes; XLA:CPU HLO posterior 428 -> 271 kernels, build 546 -> 243),
#      and the posterior's two factorizations are one solve (271 -> 261, one
#      LU per group), a prior step writes row 0 of S and Delta in place
#      (not both whole buffers), and the prior sums and the eigenvalues are
#      packed, then S and Delta too (one (M, size) array per dtype; state
#      67 -> 46 -> 32 arrays per call): look at the host-scheduled rows and
#      profile_steps' phase steps. New
#      row "floor, one reduce per leaf": U'g as one variadic reduction per
#      leaf instead of a vdot per row (XLA:CPU 67 -> 53 kernels, slower there),
#      and "floor, flat U": all leaves' rows in one array, all U'g from one
#      reduction (XLA:CPU: SGD's 36 kernels; slower there). If either beats
#      "floor" here, the transform's preconditioner should take its layout.
#   2. curvature_step_size, one call per step and one call per block of steps:
#      issue #5's ratios (biased <= 1.4x, debiased <= 1.8x, interval <= 1.05x)
#      and the host time per call; "interval, host-scheduled" compiles the
#      steps without curvature without the cond (update(..., scheduled=False)),
#      now also inside a block (two loops). Since the second run: state 38 ->
#      21 arrays, fewer kernels (XLA:CPU biased 135 -> 114); since the third,
#      2 arrays beside the inner state and the unscheduled interval step
#      without sort or full-vector writes (XLA:CPU 85 -> 77, nadamw 57).
#   3. profile_steps: per step of each transform (MLP) and monitor preset
#      (3c3d), device busy time against wall time, kernels per step and the
#      most expensive instructions with their JAX op_name; the steps' optimized
#      HLO comes back as hlo.tar.gz. The second run found a step's device time
#      ~2.1 us per kernel (nadamw 40, curvature_step_size biased 92) and the
#      per-call time set by the host's work per array.
#   4. diagnostics on 3c3d (#7: Cockpit's 1.5/2.0/21x every step, 1.0/1.0/1.3x
#      every 64th; the third run, cut after three rows: every 64th 2.0/2.5x,
#      host-scheduled 1.7/2.1x, donated blocks host-scheduled 2.5/2.9x; since
#      then the idle step lost 33 kernels of record slices, MLP: 72 -> 39, SGD
#      33, and the state 33 -> 6 arrays on 3c3d: host time per untracked
#      call; no PRNG split on untracked steps, XLA:CPU 47 -> 38 kernels). Its
#      "idle"/"host" columns time untracked steps compiled without the cond.
#      "loop" / "loop host" (--blocks): blocks of 64 steps with parameters and
#      state donated, as a training loop runs them (the other columns are
#      composed from undonated steps).
# Not in this run (time): benchmarks/curvature.py (on the second run: a GGN-vp
# 0.15x a gradient, Lanczos from 20 products 14.9x), buffer_copies.py (copies,
# kernel counts) and monitor_untracked.py; all run on a device too.
set -uo pipefail
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}" PYTHONUNBUFFERED=1
out="${OUT:-/tmp/curvax_device}"
mkdir -p "$out"

run() {  # run NAME SECONDS SCRIPT [ARGS...]
  local name=$1 seconds=$2
  shift 2
  echo "== $name (${XLA_FLAGS:-default XLA flags})"
  timeout "$seconds" python3 "$@" 2>&1 | tee "$out/$name.log"
}

python3 -c "import jax, optax, flax; print('jax', jax.__version__, 'optax', optax.__version__, \
'flax', flax.__version__, jax.devices())" 2>&1 | tee "$out/versions.log"
command -v nvidia-smi >/dev/null && nvidia-smi --query-gpu=name,memory.total --format=csv

# In order of what the open issues need; the total of the timeouts (~570 s)
# fits one call (at most 600 s) of the 15 minutes a task's session may hold a
# device, with time to start the machine; the last one is cut first.
run probabilistic_preconditioning 140 benchmarks/probabilistic_preconditioning.py --repeats 3
run curvature_step_size 90 benchmarks/curvature_step_size.py --repeats 3
run profile_steps 120 benchmarks/profile_steps.py --calls 20 --presets economy \
    --dump "$out/hlo"
tar -C "$out" -czf "$out/hlo.tar.gz" hlo 2>/dev/null && rm -rf "$out/hlo"
run diagnostics 210 benchmarks/diagnostics.py --repeats 2 --blocks 3
