"""A one-minute tour of curvax on synthetic data (no download needed).

Run with ``python -m curvax.demo``. It builds a small Flax Linen classifier on
a synthetic 10-class problem and shows, in order:

1. a GGN-vector product and a Hessian-vector product (``v'Gv``, ``v'Hv``), and
   the top GGN eigenvalue by Lanczos (`curvax.curvature`);
2. per-example statistics of the gradient (variance, per-example norms) on the
   Linen fast path (`curvax.flax_utils.from_linen`);
3. 60 jitted training steps of plain SGD and Adam and of the three curvax
   transformations, each an ordinary optax optimizer whose ``update`` receives
   the mini-batch (``batch=``) and a second, disjoint one (``eval_batch=``).
"""

from __future__ import annotations

import time
from typing import Sequence

import flax.linen as nn
import jax
import jax.numpy as jnp
import optax

import curvax

NUM_CLASSES = 10
DIM = 32


class MLP(nn.Module):
  """A 32-64-64-10 tanh network."""
  features: Sequence[int] = (64, 64)

  @nn.compact
  def __call__(self, x):
    for f in self.features:
      x = jnp.tanh(nn.Dense(f)(x))
    return nn.Dense(NUM_CLASSES)(x)


def synthetic_data(key, n: int):
  """Labels from a fixed random 2-layer teacher with 10 % label noise."""
  k_x, k_noise, k_flip = jax.random.split(key, 3)
  k_teacher = jax.random.PRNGKey(42)   # the same teacher for every split
  w1 = jax.random.normal(k_teacher, (DIM, 16)) / jnp.sqrt(DIM)
  w2 = jax.random.normal(jax.random.fold_in(k_teacher, 1), (16, NUM_CLASSES))
  x = jax.random.normal(k_x, (n, DIM))
  y = jnp.argmax(jnp.tanh(x @ w1) @ w2, axis=-1)
  flip = jax.random.bernoulli(k_flip, 0.1, (n,))
  y = jnp.where(flip, jax.random.randint(k_noise, (n,), 0, NUM_CLASSES), y)
  return x, y


def train(tx, loss_fn, params, data, steps: int, batch_size: int):
  """Jitted steps on disjoint (batch, eval_batch) pairs; returns final losses."""
  x, y = data

  @jax.jit
  def step(params, state, i):
    idx = (i * 2 * batch_size + jnp.arange(2 * batch_size)) % x.shape[0]
    xb, yb = x[idx], y[idx]
    batch = (xb[:batch_size], yb[:batch_size])
    eval_batch = (xb[batch_size:], yb[batch_size:])
    grads = jax.grad(loss_fn)(params, batch)
    updates, state = tx.update(grads, state, params, batch=batch, eval_batch=eval_batch)
    return optax.apply_updates(params, updates), state

  state = tx.init(params)
  jax.block_until_ready(step(params, state, 0))   # compile outside the timing
  start = time.perf_counter()
  for i in range(steps):
    params, state = step(params, state, i)
  jax.block_until_ready(params)
  return params, time.perf_counter() - start


def main() -> None:
  key = jax.random.PRNGKey(0)
  k_data, k_test, k_init, k_lanczos = jax.random.split(key, 4)
  data = synthetic_data(k_data, 4096)
  test = synthetic_data(k_test, 2048)
  module = MLP()
  apply_fn, variables = curvax.flax_utils.from_linen(
      module, module.init(k_init, data[0][:1]))
  params = variables
  loss = curvax.losses.softmax_cross_entropy
  loss_fn = curvax.losses.objective(apply_fn, loss)
  batch = (data[0][:256], data[1][:256])
  n_params = sum(p.size for p in jax.tree_util.tree_leaves(params))
  print(f"curvax {curvax.__version__} on {jax.default_backend()}: Linen MLP "
        f"{DIM}-64-64-{NUM_CLASSES} ({n_params} parameters), synthetic data, "
        "softmax cross-entropy")

  print("\n1. Curvature products (batch of 256)")
  v = jax.tree_util.tree_map(jnp.ones_like, params)
  ggn = jax.jit(lambda p, b, v: curvax.curvature.ggn_matvec(apply_fn, loss, p, b)(v))
  hvp = jax.jit(lambda p, b, v: curvax.curvature.hessian_matvec(loss_fn, p, b)(v))
  vgv = optax.tree_utils.tree_vdot(v, ggn(params, batch, v))
  vhv = optax.tree_utils.tree_vdot(v, hvp(params, batch, v))
  print(f"   v'Gv = {float(vgv):.4f}, v'Hv = {float(vhv):.4f}  (v = ones; G is PSD, H need not be)")
  top = curvax.curvature.top_eigenvalues(
      curvax.curvature.ggn_matvec(apply_fn, loss, params, batch), params, k_lanczos, k=3)
  print("   top-3 GGN eigenvalues (Lanczos): " + ", ".join(f"{float(e):.4f}" for e in top))

  print("\n2. Per-example statistics of the gradient (Linen fast path, no vmap)")
  stats = jax.jit(lambda p, b: curvax.curvature.per_example_statistics(
      apply_fn, loss, p, b))(params, batch)
  total_var = sum(float(jnp.sum(t)) for t in jax.tree_util.tree_leaves(stats.variance))
  g_norm = float(optax.tree_utils.tree_norm(stats.mean_gradient))
  print(f"   ||mean gradient|| = {g_norm:.4f}; per-example norms: mean "
        f"{float(jnp.mean(stats.gradient_norms)):.4f}, max {float(jnp.max(stats.gradient_norms)):.4f}")
  print(f"   total gradient variance (1/N sum_n ||g_n - g||^2) = {total_var:.4f}")

  print("\n3. Training, 60 steps, batch 128 (+ a disjoint eval_batch of 128)")
  optimizers = {
      "sgd(0.5)": optax.sgd(0.5),
      "adam(1e-2)": optax.adam(1e-2),
      "hessian_free": curvax.transforms.hessian_free(apply_fn, loss, cg_max_iter=50),
      "curvature_step_size(sgd)": curvax.transforms.curvature_step_size(
          optax.sgd(1.0), apply_fn, loss),
      "probabilistic_preconditioning": curvax.transforms.probabilistic_preconditioning(loss_fn),
  }
  test_loss = jax.jit(loss_fn)
  print(f"   {'optimizer':32s} {'test loss':>10s} {'accuracy':>9s} {'time':>8s}")
  print(f"   {'(initial)':32s} {float(test_loss(params, test)):10.4f}")
  for name, tx in optimizers.items():
    final, seconds = train(tx, loss_fn, params, data, steps=60, batch_size=128)
    acc = float(jnp.mean(jnp.argmax(apply_fn(final, test[0]), -1) == test[1]))
    print(f"   {name:32s} {float(test_loss(final, test)):10.4f} {acc:9.3f} {seconds:7.2f}s")
  print("\nNext: README.md (reference), notebooks/ (experiments), "
        "python -m curvax.problems --help (benchmark problems).")


if __name__ == "__main__":
  main()
