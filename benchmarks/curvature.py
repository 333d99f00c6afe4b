"""Cost of curvature products and per-example statistics relative to a gradient.

DeepOBS ``mnist_mlp`` shapes (784-1000-500-100-10, ReLU, softmax cross-entropy,
batch 128, random data, float32), Flax Linen. Every figure is a ratio to one
jitted ``jax.value_and_grad`` step measured in the same run: each function is
jitted, warmed up, then timed in interleaved rounds (median over rounds,
`_timing.interleaved_medians`); the ``vmap`` paths (hundreds of times slower)
in three rounds of their own afterwards.

* GGN-vp / HVP "in CG": per-product cost of a jitted loop that linearises once
  and applies the matvec ``k`` times: ``(t(2k) - t(k)) / k``.
* GGN-vp / HVP "one-shot": linearisation plus one product.
* per-example statistics and diagonal GGN: the generic ``vmap`` path and the
  per-layer fast path (Linen Dense layers, BackPACK's contractions).
* top-4 GGN eigenvalues from 20 products: Lanczos (20 steps) and block Lanczos
  (5 steps of 4 products, batched by ``vmap``).

Run: ``python benchmarks/curvature.py [--repeats 15] [--k 10]``.
Targets (issue 2): GGN-vp in CG <= 1.3x a gradient, HVP <= 2x.
"""

from __future__ import annotations

import argparse
import functools

import jax
import jax.numpy as jnp

import curvax
from curvax import flax_utils
from curvax.problems import models

from _timing import interleaved_medians  # noqa: E402  (benchmarks/_timing.py)

C = curvax.curvature


# DeepOBS's mnist_mlp (784-1000-500-100-10, ReLU), the model of curvax.problems.
MnistMLP = models.MLP


def main():
  parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
  parser.add_argument("--repeats", type=int, default=9, help="interleaved timing rounds")
  parser.add_argument("--k", type=int, default=10, help="products per CG-like loop")
  parser.add_argument("--batch", type=int, default=128, help="examples per batch")
  parser.add_argument("--slow", action="store_true",
                      help="also time the vmap-over-examples diagonal GGN (~1000x a gradient on CPU)")
  args = parser.parse_args()

  module = MnistMLP()
  kx, ky, kp = jax.random.split(jax.random.PRNGKey(0), 3)
  x = jax.random.normal(kx, (args.batch, 784), jnp.float32)
  y = jax.random.randint(ky, (args.batch,), 0, 10)
  apply_fn, params = flax_utils.from_linen(module, module.init(kp, x))
  batch = (x, y)
  loss = curvax.losses.softmax_cross_entropy
  loss_fn = curvax.losses.objective(apply_fn, loss)
  v = jax.tree_util.tree_map(lambda a: jnp.ones_like(a) * 1e-2, params)
  num_params = sum(a.size for a in jax.tree_util.tree_leaves(params))

  def loop(make_matvec, k):
    @jax.jit
    def run(params, batch, v):
      mv = make_matvec(params, batch)
      def body(_, u):
        w = mv(u)
        return jax.tree_util.tree_map(lambda a, b: 0.5 * a + 1e-3 * b, u, w)
      return jax.lax.fori_loop(0, k, body, v)
    return run

  ggn = lambda p, b: C.ggn_matvec(apply_fn, loss, p, b)
  hvp = lambda p, b: C.hessian_matvec(loss_fn, p, b)
  k = args.k
  fns = {
      "value_and_grad": jax.jit(jax.value_and_grad(loss_fn)),
      "ggn_loop_k": loop(ggn, k),
      "ggn_loop_2k": loop(ggn, 2 * k),
      "hvp_loop_k": loop(hvp, k),
      "hvp_loop_2k": loop(hvp, 2 * k),
      "ggn_one_shot": jax.jit(lambda p, b, v: ggn(p, b)(v)),
      "hvp_one_shot": jax.jit(lambda p, b, v: hvp(p, b)(v)),
      "per_example_grads_vmap": jax.jit(lambda p, b: C.per_example_gradients(
          apply_fn, loss, p, b, chunk_size=None)),
      "stats_vmap_chunk32": jax.jit(lambda p, b: C.per_example_statistics(
          apply_fn, loss, p, b, method="vmap", chunk_size=32)),
      "stats_fast_path": jax.jit(lambda p, b: C.per_example_statistics(
          apply_fn, loss, p, b, method="layers")),
      "diag_ggn_exact": jax.jit(lambda p, b: C.diag_ggn(apply_fn, loss, p, b, method="layers")),
      "diag_ggn_mc_1": jax.jit(lambda p, b: C.diag_ggn_mc(
          apply_fn, loss, p, b, jax.random.PRNGKey(1), 1, method="layers")),
      "lanczos_20": jax.jit(lambda p, b: C.top_eigenvalues(
          ggn(p, b), p, jax.random.PRNGKey(2), k=4, num_iterations=20)),
      "block_lanczos_4x5": jax.jit(lambda p, b: C.top_eigenvalues(
          ggn(p, b), p, jax.random.PRNGKey(2), k=4, num_iterations=5, block_size=4)),
  }
  if args.slow:
    fns["diag_ggn_exact_vmap"] = jax.jit(lambda p, b: C.diag_ggn(apply_fn, loss, p, b, method="vmap"))
  takes_v = {"ggn_loop_k", "ggn_loop_2k", "hvp_loop_k", "hvp_loop_2k", "ggn_one_shot",
             "hvp_one_shot"}

  def call(name):
    f = fns[name]
    return f(params, batch, v) if name in takes_v else f(params, batch)

  # The vmap paths take ~200-400x a gradient and leave the allocator and caches
  # cold: interleaved with the others they slowed whatever ran next (the fast
  # path's statistics 3.05x instead of 1.45x). They run in a second phase.
  slow = {"per_example_grads_vmap", "stats_vmap_chunk32", "diag_ggn_exact_vmap"}
  phase = lambda names: {name: functools.partial(call, name) for name in names}
  med = interleaved_medians(phase([name for name in fns if name not in slow]), args.repeats)
  med.update(interleaved_medians(phase([name for name in fns if name in slow]), 3))
  base = med["value_and_grad"]
  rows = [
      ("value_and_grad (reference)", base, "", ""),
      ("GGN-vp in CG (per product)", (med["ggn_loop_2k"] - med["ggn_loop_k"]) / k, "<= 1.3", 1.3),
      ("HVP in CG (per product)", (med["hvp_loop_2k"] - med["hvp_loop_k"]) / k, "", ""),
      ("GGN-vp one-shot (linearise + 1)", med["ggn_one_shot"], "", ""),
      ("HVP one-shot (hessian_matvec)", med["hvp_one_shot"], "<= 2", 2.0),
      ("per-example grads, vmap", med["per_example_grads_vmap"], "", ""),
      ("2nd moment+var+norms, vmap chunk 32", med["stats_vmap_chunk32"], "", ""),
      ("2nd moment+var+norms, fast path", med["stats_fast_path"], "", ""),
      ("diag GGN exact, fast path (C - 1 = 9 columns)", med["diag_ggn_exact"], "", ""),
      ("diag GGN MC 1 sample, fast path", med["diag_ggn_mc_1"], "", ""),
      ("top-4 GGN eigenvalues, Lanczos 20 steps", med["lanczos_20"], "", ""),
      ("top-4, block Lanczos 5 steps x 4", med["block_lanczos_4x5"], "", ""),
  ]
  if args.slow:
    rows.append(("diag GGN exact, vmap over examples", med["diag_ggn_exact_vmap"], "", ""))
  print(f"mnist_mlp shapes: {num_params:,} params, batch {args.batch}, float32, "
        f"device {jax.devices()[0].platform}, median of {args.repeats} interleaved rounds "
        f"(the vmap paths: 3 rounds of their own)")
  print(f"{'quantity':40s} {'ms':>9s} {'x grad':>8s} {'target':>8s} {'met':>5s}")
  for name, t, target, bound in rows:
    ratio = t / base
    met = "" if not bound else ("yes" if ratio <= bound else "no")
    print(f"{name:40s} {1e3 * t:9.3f} {ratio:8.2f} {target:>8s} {met:>5s}")


if __name__ == "__main__":
  main()
