#!/usr/bin/env bash
# The GPU checks, prepared as one run (about 8 minutes on an H100).
#
# No GPU has been lent to this project's sessions so far; every ratio in the
# benchmarks' docstrings is from 2 CPU cores. On a device machine, from the
# repository root, with the image's own jax/optax/flax (curvax needs no install):
#
#   bash benchmarks/device_check.sh          # logs also go to $OUT (or /tmp/curvax_device)
#
# What it answers, in order:
#   1. buffer_copies: do the donated steps copy parameters on XLA:GPU too?
#   2. curvature_step_size and probabilistic_preconditioning: the issues' ratios
#      (#5: biased <= 1.4x, debiased <= 1.8x, interval <= 1.05x; #4: <= 1.2x per
#      epoch), and the host time per call beside them: where a step's device time
#      is shorter than its host time, the host sets the rate (PP moves 80 arrays
#      per call, SGD 8).
#   3. The same two with conditionals and while loops inside command buffers:
#      outside them XLA:GPU runs each lax.cond by copying its predicate to the host
#      and waiting (PP has 4 per step, interval mode 1, hessian_free's CG loop one
#      per iteration). If this flag changes the ratios much, merging conds (or
#      recommending the flag) is worth doing.
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

run buffer_copies 90 benchmarks/buffer_copies.py
run curvature_step_size 120 benchmarks/curvature_step_size.py --repeats 3
run probabilistic_preconditioning 150 benchmarks/probabilistic_preconditioning.py --repeats 3

export XLA_FLAGS="--xla_gpu_enable_command_buffer=FUSION,CUBLAS,CUBLASLT,CUSTOM_CALL,CUDNN,CONDITIONAL,WHILE"
run curvature_step_size_cmdbuf 120 benchmarks/curvature_step_size.py --repeats 3
run probabilistic_preconditioning_cmdbuf 150 benchmarks/probabilistic_preconditioning.py --repeats 3
