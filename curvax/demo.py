"""A two-minute tour of curvax on a built-in problem that needs no download.

Run with ``python -m curvax.demo``.
"""

from __future__ import annotations

import time

import jax
import jax.numpy as jnp

import curvax


def _mlp(params, x):
  h = jnp.tanh(x @ params["w1"] + params["b1"])
  return h @ params["w2"] + params["b2"]


def main() -> None:
  key = jax.random.PRNGKey(0)
  k1, k2, k3, k4 = jax.random.split(key, 4)
  params = {
      "w1": jax.random.normal(k1, (20, 32)) / jnp.sqrt(20.0), "b1": jnp.zeros(32),
      "w2": jax.random.normal(k2, (32, 5)) / jnp.sqrt(32.0), "b2": jnp.zeros(5),
  }
  x = jax.random.normal(k3, (256, 20))
  y = jnp.argmax(x[:, :5] + 0.3 * jax.random.normal(k4, (256, 5)), axis=-1)
  batch = (x, y)
  loss = curvax.losses.softmax_cross_entropy
  print(f"curvax {curvax.__version__} on {jax.devices()[0].platform}: "
        f"MLP 20-32-5, batch {x.shape[0]}, softmax cross-entropy")

  gv = jax.jit(lambda p, b, v: curvax.curvature.ggn_matvec(_mlp, loss, p, b)(v))
  v = jax.tree_util.tree_map(jnp.ones_like, params)
  out = gv(params, batch, v)
  vgv = sum(jnp.vdot(a, b) for a, b in zip(jax.tree_util.tree_leaves(v),
                                           jax.tree_util.tree_leaves(out)))
  print(f"  GGN-vector product: v'Gv = {float(vgv):.4f} (v = ones)")
  loss_fn = curvax.losses.objective(_mlp, loss)
  hv = curvax.curvature.hessian_matvec(loss_fn, params, batch)(v)
  vhv = sum(jnp.vdot(a, b) for a, b in zip(jax.tree_util.tree_leaves(v),
                                           jax.tree_util.tree_leaves(hv)))
  print(f"  Hessian-vector product: v'Hv = {float(vhv):.4f}")
  for extra in _EXTRAS:
    extra(_mlp, loss, params, batch)
  print("done.")


def _per_example(apply_fn, loss, params, batch):
  pe = getattr(curvax.curvature, "per_example_statistics", None)
  if pe is None:
    return
  stats = pe(apply_fn, loss, params, batch)
  norms = stats.grad_norms if hasattr(stats, "grad_norms") else None
  if norms is not None:
    print(f"  per-example gradient norms: mean {float(jnp.mean(norms)):.4f}, "
          f"max {float(jnp.max(norms)):.4f}")


def _transforms(apply_fn, loss, params, batch):
  """Trains a few steps with each curvax transform that exists."""
  import optax
  tr = curvax.transforms
  x, y = batch
  train, evalb = (x[:128], y[:128]), (x[128:], y[128:])
  loss_fn = curvax.losses.objective(apply_fn, loss)
  candidates = []
  if hasattr(tr, "hessian_free"):
    candidates.append(("hessian_free", tr.hessian_free(apply_fn, loss)))
  if hasattr(tr, "curvature_step_size"):
    candidates.append(("curvature_step_size(sgd)",
                       tr.curvature_step_size(optax.sgd(1.0), apply_fn, loss)))
  if hasattr(tr, "probabilistic_preconditioning"):
    candidates.append(("probabilistic_preconditioning",
                       tr.probabilistic_preconditioning(loss_fn)))
  for name, opt in candidates:
    state = opt.init(params)

    @jax.jit
    def step(p, s):
      g = jax.grad(loss_fn)(p, train)
      u, s = opt.update(g, s, p, batch=train, eval_batch=evalb)
      return optax.apply_updates(p, u), s

    p = params
    t0 = time.perf_counter()
    for _ in range(10):
      p, state = step(p, state)
    jax.block_until_ready(p)
    print(f"  {name}: loss {float(loss_fn(params, evalb)):.4f} -> "
          f"{float(loss_fn(p, evalb)):.4f} in 10 steps ({time.perf_counter() - t0:.2f}s)")


_EXTRAS = [_per_example, _transforms]

if __name__ == "__main__":
  main()
