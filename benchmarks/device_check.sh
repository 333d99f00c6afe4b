#!/usr/bin/env bash
# The GPU checks, prepared as one run (about 6-7 minutes on an H200).
#
# First run on a device: 2026-11-27, one H200 (figures in docs/performance.md).
# On a device machine, from the repository root, with the image's own
# jax/optax/flax (curvax needs no install):
#
#   bash benchmarks/device_check.sh          # logs also go to $OUT (or /tmp/curvax_device)
#
# What it answers, in order:
#   1. buffer_copies: do the donated steps copy parameters on XLA:GPU too?
#   2. curvature_step_size and probabilistic_preconditioning, one call per step
#      and one call per block of steps: the issues' ratios (#5: biased <= 1.4x,
#      debiased <= 1.8x, interval <= 1.05x; #4: <= 1.2x per epoch) and the host
#      time per call. Open question from the first run: PP's preconditioning
#      steps went from 4-5 conds to 3; per step (each timed alone) 4.4-6.0x ->
#      3.1x SGD, but in a loop of steps 3.5x -> 3.9x (one run each, n = 2):
#      A/B the two versions in ONE run (git worktree of 25358b4^) before
#      merging more conds.
#   3. diagnostics on 3c3d (#7: Cockpit's 1.5/2.0/21x every step, 1.0/1.0/1.3x
#      every 64th): the first run gave 11/33/56x and 2.2/2.8/3.8x, untracked
#      steps 2.1-3.0x: conds and host time, not instruments. Since then: the
#      "idle"/"host" columns time untracked steps compiled with
#      update(..., scheduled=False) (no cond), and curvature_step_size's row
#      "interval, host-scheduled" the same for #5: do they reach 1.0x / 1.05x?
#   4. curvature products and Krylov solvers (GGN-vp per product, Lanczos vs
#      block Lanczos from 20 products): on CPU re-orthogonalisation is
#      memory-bound (Lanczos ~5x its products on 1.3M parameters); on a GPU?
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

run buffer_copies 60 benchmarks/buffer_copies.py
run curvature_step_size 80 benchmarks/curvature_step_size.py --repeats 3
run probabilistic_preconditioning 100 benchmarks/probabilistic_preconditioning.py --repeats 3
run diagnostics 150 benchmarks/diagnostics.py --repeats 2
run monitor_untracked 40 benchmarks/monitor_untracked.py --repeats 5
run curvature 60 benchmarks/curvature.py --repeats 5
