"""Small networks and explicit-matrix references shared by the tests.

Everything here is deliberately naive: dense Jacobians and Hessians from
``jax.jacfwd``/``jax.hessian`` on flattened parameters, so that curvax's
matrix-free code is compared against an independent computation.
"""

from __future__ import annotations

import math
from fractions import Fraction

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
from jax.flatten_util import ravel_pytree

import curvax

LOSSES = {
    "softmax_cross_entropy": curvax.losses.softmax_cross_entropy,
    "sigmoid_binary_cross_entropy": curvax.losses.sigmoid_binary_cross_entropy,
    "mean_squared_error": curvax.losses.mean_squared_error,
}


def mlp_apply(params, x):
  h = jnp.tanh(x @ params["w1"] + params["b1"])
  return h @ params["w2"] + params["b2"]


def mlp_params(key, d_in=4, d_hidden=5, d_out=3):
  k1, k2, k3, k4 = jax.random.split(key, 4)
  return {
      "w1": jax.random.normal(k1, (d_in, d_hidden)) / np.sqrt(d_in),
      "b1": 0.1 * jax.random.normal(k2, (d_hidden,)),
      "w2": jax.random.normal(k3, (d_hidden, d_out)) / np.sqrt(d_hidden),
      "b2": 0.1 * jax.random.normal(k4, (d_out,)),
  }


def cnn_apply(params, x):
  """x: (N, 6, 6, 1) -> conv 3x3 (2 channels) -> relu -> dense to C."""
  h = jax.lax.conv_general_dilated(
      x, params["k"], (1, 1), "VALID",
      dimension_numbers=("NHWC", "HWIO", "NHWC")) + params["kb"]
  h = jax.nn.relu(h).reshape(x.shape[0], -1)
  return h @ params["w"] + params["b"]


def cnn_params(key, d_out=3):
  k1, k2, k3, k4 = jax.random.split(key, 4)
  return {
      "k": jax.random.normal(k1, (3, 3, 1, 2)) / 3.0,
      "kb": 0.1 * jax.random.normal(k2, (2,)),
      "w": jax.random.normal(k3, (32, d_out)) / np.sqrt(32),
      "b": 0.1 * jax.random.normal(k4, (d_out,)),
  }


def make_targets(key, loss_name, outputs):
  n, c = outputs.shape
  if loss_name == "softmax_cross_entropy":
    return jax.random.randint(key, (n,), 0, c)
  if loss_name == "sigmoid_binary_cross_entropy":
    return jax.random.bernoulli(key, 0.5, (n, c)).astype(outputs.dtype)
  return jax.random.normal(key, (n, c))


def problem(model="mlp", loss_name="softmax_cross_entropy", n=6, seed=0):
  """Returns (apply_fn, loss, params, batch) for a tiny float64 problem."""
  key = jax.random.PRNGKey(seed)
  kp, kx, ky = jax.random.split(key, 3)
  if model == "mlp":
    apply_fn, params = mlp_apply, mlp_params(kp)
    x = jax.random.normal(kx, (n, 4))
  else:
    apply_fn, params = cnn_apply, cnn_params(kp)
    x = jax.random.normal(kx, (n, 6, 6, 1))
  y = make_targets(ky, loss_name, apply_fn(params, x))
  return apply_fn, LOSSES[loss_name], params, (x, y)


def flat_objective(apply_fn, loss, params, batch):
  flat, unravel = ravel_pytree(params)
  x, y = batch
  return (lambda w: jnp.mean(loss(apply_fn(unravel(w), x), y))), flat, unravel


def explicit_hessian(apply_fn, loss, params, batch):
  f, flat, _ = flat_objective(apply_fn, loss, params, batch)
  return jax.hessian(f)(flat)


def explicit_output_hessians(loss, outputs, targets):
  """Per-example Hessians of the loss w.r.t. outputs, by autodiff: (N, C, C)."""
  def one(o, t):
    return jax.hessian(lambda z: loss(z[None], t[None])[0])(o)
  return jax.vmap(one)(outputs, targets)


def explicit_jacobians(apply_fn, params, x):
  """Per-example Jacobians (N, C, P) of the outputs w.r.t. flat params."""
  flat, unravel = ravel_pytree(params)
  return jax.jacfwd(lambda w: apply_fn(unravel(w), x))(flat)


def explicit_ggn(apply_fn, loss, params, batch):
  x, y = batch
  out = apply_fn(params, x)
  j = explicit_jacobians(apply_fn, params, x)
  h = explicit_output_hessians(loss, out, y)
  return jnp.einsum("ncp,ncd,ndq->pq", j, h, j) / x.shape[0]


def explicit_per_example_grads(apply_fn, loss, params, batch):
  """(N, P) per-example gradients, one example at a time (a Python loop)."""
  f_flat, unravel = ravel_pytree(params)
  x, y = batch
  rows = []
  for i in range(x.shape[0]):
    g = jax.grad(lambda w: loss(apply_fn(unravel(w), x[i:i + 1]), y[i:i + 1])[0])(f_flat)
    rows.append(g)
  return jnp.stack(rows)


def flat(tree):
  return ravel_pytree(tree)[0]


def explicit_per_example_grads_jacrev(apply_fn, loss, params, batch):
  """(N, P) per-example gradients as the Jacobian of the loss vector (jitted, no vmap(grad))."""
  f_flat, unravel = ravel_pytree(params)
  x, y = batch
  return jax.jit(jax.jacrev(lambda w: loss(apply_fn(unravel(w), x), y)))(f_flat)


# `curvax.solvers.CGStatus` codes, written out (the reference does not import them).
CG_MAX_ITER, CG_MARTENS, CG_RESIDUAL, CG_NONPOSITIVE, CG_NONFINITE = 0, 1, 2, 3, 4


def numpy_iterate_grid(max_iter):
  """The distinct ``ceil(1.3^j) <= max_iter`` (exact, in rational arithmetic): the CG
  iterations whose iterates Hessian-free keeps for backtracking."""
  out, j = [], 0
  while (v := math.ceil(Fraction(13, 10) ** j)) <= max_iter:
    if not out or out[-1] != v:
      out.append(v)
    j += 1
  return out


def numpy_cg(a, b, x0, *, max_iter, tol, eps, martens=True, nonpositive_curvature="stop",
             minv=None):
  """Textbook preconditioned CG on the dense ``a x = b`` from ``x0`` (Martens &
  Sutskever 2012, Alg. 2) with Martens' stopping test on ``phi(x) = x'ax/2 - b'x``
  evaluated directly: stop at iteration ``i > k = max(10, ceil(i/10))`` once
  ``phi_i < 0`` and ``(phi_i - phi_{i-k}) / phi_i < k eps``. ``minv``: the diagonal
  of the inverse preconditioner (None: none). ``nonpositive_curvature="abs"``
  takes ``|p'Ap|``.

  Returns ``(x, iterations, status, kept)``, ``kept`` the iterates ``[(i, x_i)]``
  at `numpy_iterate_grid` iterations, then the final one.
  """
  minv = np.ones_like(b) if minv is None else minv
  phi = lambda x: 0.5 * x @ a @ x - b @ x  # noqa: E731
  grid = set(numpy_iterate_grid(max_iter))
  x, r = x0.copy(), b - a @ x0
  z = minv * r
  p = z.copy()
  phis, kept, i, thr = [phi(x)], [], 0, tol ** 2 * (b @ b)
  if not np.isfinite(r @ z):
    status = CG_NONFINITE
  elif r @ r <= thr:
    status = CG_RESIDUAL
  elif max_iter == 0:
    status = CG_MAX_ITER
  else:
    while True:
      ap = a @ p
      pap = p @ ap
      if not np.isfinite(pap):
        status = CG_NONFINITE
        break
      curv = abs(pap) if nonpositive_curvature == "abs" else pap
      if curv <= 0:  # the iteration is not taken; x_i is returned
        status = CG_NONPOSITIVE
        break
      rz = r @ z
      alpha = rz / curv
      x_new, r_new = x + alpha * p, r - alpha * ap
      z_new = minv * r_new
      if not np.isfinite(r_new @ z_new):
        status = CG_NONFINITE
        break
      p = z_new + (r_new @ z_new) / rz * p
      x, r, z, i = x_new, r_new, z_new, i + 1
      phis.append(phi(x))
      if i in grid:
        kept.append((i, x.copy()))
      k = max(10, -(-i // 10))
      if r @ r <= thr:
        status = CG_RESIDUAL
      elif martens and i > k and phis[i] < 0 and (phis[i] - phis[i - k]) / phis[i] < k * eps:
        status = CG_MARTENS
      elif i >= max_iter:
        status = CG_MAX_ITER
      else:
        continue
      break
  if not kept or kept[-1][0] != i:
    kept.append((i, x.copy()))
  return x, i, status, kept


def linen_calls(module, variables, x, **kw):
  """(module class name, module, input, output) of every Linen submodule call, in order
  (one jitted apply; the interceptor records the calls while tracing)."""
  meta = []

  def run(variables, x):
    meta.clear()
    arrays = []

    def interceptor(next_fun, args, kwargs, context):
      out = next_fun(*args, **kwargs)
      if context.method_name == "__call__" and type(context.module) is not type(module):
        meta.append((type(context.module).__name__, context.module))
        arrays.append((args[0], out))
      return out

    with nn.intercept_methods(interceptor):
      out = module.apply(variables, x, **kw)
    return arrays, out

  arrays, out = jax.jit(run)(variables, x)
  return [(n, m, i, o) for (n, m), (i, o) in zip(meta, arrays)], out
