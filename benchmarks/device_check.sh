#!/usr/bin/env bash
# The GPU checks, prepared as one run (about 8-9 minutes on an H200).
#
# First run on a device: 2026-11-27, one H200 (figures in docs/performance.md).
# On a device machine, from the repository root, with the image's own
# jax/optax/flax (curvax needs no install):
#
#   bash benchmarks/device_check.sh          # logs also go to $OUT (or /tmp/curvax_device)
#
# What it answers, in order:
#   1. curvature_step_size, one call per step and one call per block of steps:
#      issue #5's ratios (biased <= 1.4x, debiased <= 1.8x, interval <= 1.05x)
#      and the host time per call; "interval, host-scheduled" compiles the
#      steps without curvature without the cond (update(..., scheduled=False)).
#   2. profile_steps: per step of each transform (MLP) and monitor preset
#      (3c3d), device busy time against wall time, kernels per step and the
#      most expensive instructions with their JAX op_name; the steps' optimized
#      HLO comes back as hlo.tar.gz. The first run found the small steps bound
#      by launches and host round-trips; this says by how much, and where the
#      tracked monitor steps (11/33/56x a plain step there) spend their time.
#   3. diagnostics on 3c3d (#7: Cockpit's 1.5/2.0/21x every step, 1.0/1.0/1.3x
#      every 64th; the first run: 11/33/56x and 2.2/2.8/3.8x, untracked steps
#      2.1-3.0x). Its "idle"/"host" columns time untracked steps compiled
#      without the cond: do they reach 1.0x?
#   4. probabilistic_preconditioning per epoch (#4: <= 1.2x SGD; the first
#      run: 9-11x one call per step, 3.5-3.9x in blocks of steps).
#   5. curvature products and Krylov solvers (GGN-vp per product, Lanczos vs
#      block Lanczos from 20 products): on CPU re-orthogonalisation is
#      memory-bound (Lanczos ~5x its products on 1.3M parameters); on a GPU?
# Not in this run (time): benchmarks/buffer_copies.py (parameter copies and
# kernel counts of the compiled steps) and monitor_untracked.py; both run
# on a device too.
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

# In order of what the open issues need; the total of the timeouts (~550 s)
# fits one call of the 15 minutes a task's session may hold a device.
run curvature_step_size 80 benchmarks/curvature_step_size.py --repeats 3
run profile_steps 150 benchmarks/profile_steps.py --calls 20 --dump "$out/hlo"
tar -C "$out" -czf "$out/hlo.tar.gz" hlo 2>/dev/null && rm -rf "$out/hlo"
run diagnostics 150 benchmarks/diagnostics.py --repeats 2
run probabilistic_preconditioning 100 benchmarks/probabilistic_preconditioning.py --repeats 3
run curvature 60 benchmarks/curvature.py --repeats 5
