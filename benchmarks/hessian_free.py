"""Cost of a hessian_free step relative to its CG products.

mnist_mlp-shaped MLP (784-1000-500-100-10, ReLU), float32, random inputs
labelled by a random teacher network: batch 1024 for gradient and curvature,
1024 for evaluation. Prints

* t_ggn: one GGN-vector product with the linearisation reused (what each CG
  iteration costs), from the slope of a loop of N products, measured again
  next to every step (machine load drifts);
* per step: (time of one full ``update`` / CG iterations it took) / t_ggn
  (target <= 1.5: the step's overhead beyond its CG products is small);
* steps/second of the full training step (gradient + update + apply).

Medians over repeated steps on fresh batches (the state evolves, so CG iteration counts vary;
the ratio is taken per step). Usage: python benchmarks/hessian_free.py [--steps 6]
"""

from __future__ import annotations

import argparse
import time

import jax
import jax.numpy as jnp
import numpy as np
import optax

import curvax

from _timing import median_time  # noqa: E402  (benchmarks/_timing.py)

SIZES = (784, 1000, 500, 100, 10)


def mlp_init(key):
  params = []
  for k, (a, b) in zip(jax.random.split(key, len(SIZES) - 1), zip(SIZES[:-1], SIZES[1:])):
    params.append({"w": jax.random.normal(k, (a, b), jnp.float32) * np.sqrt(2.0 / a),
                   "b": jnp.zeros((b,), jnp.float32)})
  return params


def mlp_apply(params, x):
  for layer in params[:-1]:
    x = jax.nn.relu(x @ layer["w"] + layer["b"])
  return x @ params[-1]["w"] + params[-1]["b"]


def main():
  parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
  parser.add_argument("--steps", type=int, default=6, help="hessian_free steps timed")
  parser.add_argument("--batch", type=int, default=1024, help="examples per batch")
  parser.add_argument("--cg-max-iter", type=int, default=250, help="CG iterations at most")
  args = parser.parse_args()

  key = jax.random.PRNGKey(0)
  kp, kx, ky, kx2, ky2 = jax.random.split(key, 5)
  params = mlp_init(kp)
  n = args.batch
  # Labels from a random teacher network, so that steps can make progress
  # (random labels make most line searches fail, which measures only them).
  teacher = mlp_init(ky)

  def draw(key):   # a fresh labelled batch, as in training
    x = jax.random.normal(key, (n, 784), jnp.float32)
    return x, jnp.argmax(mlp_apply(teacher, x), -1)

  batch, eval_batch = draw(kx), draw(kx2)
  loss = curvax.losses.softmax_cross_entropy
  loss_fn = curvax.losses.objective(mlp_apply, loss)
  print(f"device: {jax.devices()[0].device_kind}; params: "
        f"{sum(x.size for x in jax.tree_util.tree_leaves(params))}; batch {n} + {n}")

  # One GGN-vector product, linearisation reused: slope over N products.
  def products(params, v, num):
    mv = curvax.curvature.ggn_matvec(mlp_apply, loss, params, batch)
    return jax.lax.fori_loop(0, num, lambda i, u: jax.tree.map(
        lambda a, b: 0.5 * a + 1e-3 * b, mv(u), u), v)
  prod = jax.jit(products, static_argnums=2)
  v = jax.tree.map(jnp.ones_like, params)
  few, many = 2, 22

  def measure_t_ggn(params):
    t_few = median_time(prod, params, v, few, repeats=3)
    t_many = median_time(prod, params, v, many, repeats=3)
    return (t_many - t_few) / (many - few)

  t_ggn = measure_t_ggn(params)
  t_grad = median_time(jax.jit(jax.grad(loss_fn)), params, batch)
  print(f"t_ggn = {t_ggn * 1e3:.3f} ms  (gradient: {t_grad * 1e3:.3f} ms, "
        f"ratio {t_ggn / t_grad:.2f})")

  tx = curvax.transforms.hessian_free(mlp_apply, loss, cg_max_iter=args.cg_max_iter)
  update = jax.jit(lambda g, s, p, batch, eval_batch: tx.update(
      g, s, p, batch=batch, eval_batch=eval_batch))

  @jax.jit
  def train_step(params, state, batch, eval_batch):
    g = jax.grad(loss_fn)(params, batch)
    u, state = tx.update(g, state, params, batch=batch, eval_batch=eval_batch)
    return optax.apply_updates(params, u), state

  state = tx.init(params)
  g = jax.jit(jax.grad(loss_fn))(params, batch)
  jax.block_until_ready(update(g, state, params, batch, eval_batch))  # compile
  jax.block_until_ready(train_step(params, state, batch, eval_batch))  # compile
  ratios, step_times = [], []
  for k in range(args.steps):
    batch = draw(jax.random.fold_in(kx, k + 1))
    eval_batch = draw(jax.random.fold_in(kx2, k + 1))
    g = jax.jit(jax.grad(loss_fn))(params, batch)
    t_ggn = measure_t_ggn(params)   # next to the step: machine load drifts
    t = time.perf_counter()
    u, new_state = jax.block_until_ready(update(g, state, params, batch, eval_batch))
    t_update = time.perf_counter() - t
    t = time.perf_counter()
    params, state = jax.block_until_ready(train_step(params, state, batch, eval_batch))
    step_times.append(time.perf_counter() - t)
    iters = max(int(new_state.cg_iterations), 1)
    ratio = (t_update / iters) / t_ggn
    ratios.append(ratio)
    print(f"step {k}: cg_iterations {int(new_state.cg_iterations):3d}  update "
          f"{t_update * 1e3:8.1f} ms  t_ggn {t_ggn * 1e3:6.1f} ms  per-iteration/t_ggn {ratio:5.2f}  damping "
          f"{float(new_state.damping):.3g}  alpha {float(new_state.alpha):.3g}  "
          f"eval loss {float(new_state.loss_before):.4f} -> {float(new_state.loss_after):.4f}")
  print(f"median (update time / CG iterations) / t_ggn = {np.median(ratios):.2f} (target <= 1.5)")
  print(f"steps/second (gradient + update + apply) = {1.0 / np.median(step_times):.2f}")


if __name__ == "__main__":
  main()
