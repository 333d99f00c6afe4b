"""nn.Conv against curvax.layers.PatchConv, at the top level and inside control flow.

Second-order methods differentiate the model inside ``lax.while_loop`` (CG) and
``lax.cond`` (the transforms' phases, a monitor's tracked steps). On XLA:CPU a
convolution there takes a slow path (jax-ml/jax#12868). For each problem's
network (random inputs, batch 128; same parameters for both implementations)
this prints seconds per call of

* ``grad``: a jitted gradient;
* ``grad in cond``: the same gradient as the taken branch of ``lax.cond``;
* ``hvp in loop``: one Hessian-vector product per iteration of a
  ``lax.fori_loop`` of ``--loop`` iterations (time / iterations);
* ``ggn cg``: ``curvax.solvers.cg`` on the damped GGN, ``--loop`` iterations
  (time / iterations),

for ``conv_impl='lax'`` (nn.Conv) and ``'patches'``, and their ratio (lax /
patches: above 1 means PatchConv is faster). Medians of ``--repeats`` calls.
Usage: python benchmarks/conv_impl.py [--problems fmnist_2c2d,cifar10_3c3d]
"""

from __future__ import annotations

import argparse

import jax
import jax.numpy as jnp

import curvax
import curvax.problems

from _timing import median_time  # noqa: E402  (benchmarks/_timing.py)


def _measure(problem, batch, loop, repeats):
  variables = problem.init(jax.random.PRNGKey(0))
  params = variables["params"]
  apply_fn = problem.apply_fn
  model = lambda p, x: apply_fn({"params": p}, x)
  loss_fn = curvax.losses.objective(model, problem.loss)
  grad = jax.grad(loss_fn)
  x, y = batch
  tree_scale = lambda t, c: jax.tree_util.tree_map(lambda a: a * c, t)

  def grad_in_cond(p, x, y, pred):
    return jax.lax.cond(pred, lambda: grad(p, (x, y)),
                        lambda: jax.tree_util.tree_map(jnp.zeros_like, p))

  def hvp_loop(p, x, y):
    g = lambda q: grad(q, (x, y))
    body = lambda i, v: tree_scale(jax.jvp(g, (p,), (v,))[1], 1e-3)
    return jax.lax.fori_loop(0, loop, body, p)

  def ggn_cg(p, x, y):
    mv = curvax.curvature.ggn_matvec(model, problem.loss, p, (x, y))
    rhs = grad(p, (x, y))
    damped = lambda v: jax.tree_util.tree_map(lambda a, b: a + 1e-3 * b, mv(v), v)
    return curvax.solvers.cg(damped, rhs, max_iter=loop, tol=0.0,
                             martens_criterion=False).x

  out = {}
  out["grad"] = median_time(jax.jit(grad), params, (x, y), repeats=repeats)
  out["grad in cond"] = median_time(jax.jit(grad_in_cond), params, x, y, True, repeats=repeats)
  out["hvp in loop"] = median_time(jax.jit(hvp_loop), params, x, y, repeats=repeats) / loop
  out["ggn cg"] = median_time(jax.jit(ggn_cg), params, x, y, repeats=repeats) / loop
  return out


def main():
  parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
  parser.add_argument("--problems", default="fmnist_2c2d,cifar10_3c3d")
  parser.add_argument("--batch", type=int, default=128)
  parser.add_argument("--loop", type=int, default=5)
  parser.add_argument("--repeats", type=int, default=3)
  args = parser.parse_args()
  print(f"backend: {jax.default_backend()} ({jax.devices()[0].device_kind}); batch "
        f"{args.batch}; seconds per call (loop rows: per iteration)")
  for name in args.problems.split(","):
    shape = (28, 28, 1) if name.split("_")[0] in ("mnist", "fmnist") else (32, 32, 3)
    kx, ky = jax.random.split(jax.random.PRNGKey(1))
    batch = (jax.random.normal(kx, (args.batch,) + shape, jnp.float32),
             jax.random.randint(ky, (args.batch,), 0, 10))
    res = {impl: _measure(curvax.problems.get(name, conv_impl=impl), batch, args.loop,
                          args.repeats)
           for impl in ("lax", "patches")}
    print(f"\n{name}:   {'nn.Conv':>9s} {'PatchConv':>10s}   nn.Conv / PatchConv")
    for row in res["lax"]:
      a, b = res["lax"][row], res["patches"][row]
      print(f"  {row:14s} {a:8.3f}s {b:9.3f}s   {a / b:6.2f}x")


if __name__ == "__main__":
  main()
