"""Cost of the monitor's untracked steps: with the schedule's lax.cond, and without.

A raw mnist_mlp-shaped MLP (784-1000-500-100-10, ReLU, plain ``jax.numpy``, so
per-example quantities take the ``vmap`` path), batch 128, SGD, monitored with
``--preset`` every 64th step. Times, as ratios to the plain SGD step:

* an untracked step of the device-side schedule (the ``lax.cond`` branch that
  copies the state). XLA:CPU sizes one scratch buffer for the largest branch,
  the tracked one (hundreds of MB on the ``vmap`` path), and allocates it on
  every execution, taken or not;
* the same step compiled with ``update(..., scheduled=False)`` (the host knows
  it has no scheduled work, `curvax.diagnostics.is_scheduled`): no cond, the
  plain step's scratch.

2 CPU cores, 2026-11-27, four runs: untracked 1.44x / 1.65x / 1.63x / 1.31x,
``scheduled=False`` 0.92x / 1.18x / 1.17x / 0.90x. Nothing is donated here (each
round reuses its inputs), so both monitored steps also copy the state's
parameter-sized buffers (``init_params``, ``last_update``) to fresh outputs,
which a training loop that donates its state does not. On a GPU the cond
also makes the runtime wait for the host.

  python benchmarks/monitor_untracked.py [--preset economy] [--repeats 7]
"""

from __future__ import annotations

import argparse
import functools
import os
import sys

import jax
import jax.numpy as jnp
import optax

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
import curvax  # noqa: E402  (the checkout's curvax, not an installed copy)
from curvax import diagnostics as dg  # noqa: E402
from _timing import interleaved_medians  # noqa: E402  (benchmarks/_timing.py)
# The same MLP as the curvature_step_size benchmark's.
from curvature_step_size import SIZES, init_params, make_batch, mlp_apply  # noqa: E402


def main():
  parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
  parser.add_argument("--preset", default="economy", choices=sorted(dg.PRESETS))
  parser.add_argument("--repeats", type=int, default=7, help="interleaved timing rounds")
  args = parser.parse_args()

  params = init_params(jax.random.PRNGKey(0))
  batch = make_batch(jax.random.PRNGKey(1))
  loss = curvax.losses.softmax_cross_entropy
  objective = curvax.losses.objective(mlp_apply, loss)
  sgd = optax.sgd(0.01)
  tx = dg.monitor(sgd, mlp_apply, loss, args.preset, every=64)

  def make(update):
    @jax.jit
    def step(p, s):
      u, s = update(jax.grad(objective)(p, batch), s, p)
      return optax.apply_updates(p, u), s
    return step

  plain = make(lambda g, s, p: sgd.update(g, s, p))
  cond = make(lambda g, s, p: tx.update(g, s, p, batch=batch))
  idle = make(lambda g, s, p: tx.update(g, s, p, batch=batch, scheduled=False))
  # Step 66: untracked, and not the end point of step 64's Alpha.
  state = tx.init(params)._replace(count=jnp.asarray(66, jnp.int32))
  assert not dg.is_scheduled(66, every=64, instruments=args.preset)
  fns = {"plain SGD step": functools.partial(plain, params, sgd.init(params)),
         "untracked (lax.cond)": functools.partial(cond, params, state),
         "scheduled=False": functools.partial(idle, params, state)}
  times = interleaved_medians(fns, args.repeats, settle=fns["plain SGD step"])
  print(f"monitor({args.preset!r}, every=64) on a raw MLP {'-'.join(map(str, SIZES))} "
        f"(vmap path), batch 128, {jax.devices()[0].platform}; median of {args.repeats} rounds")
  for name, t in times.items():
    print(f"  {name:22s} {1e3 * t:8.2f} ms  {t / times['plain SGD step']:5.2f}x")


if __name__ == "__main__":
  main()
