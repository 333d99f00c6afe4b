r"""Curvature instruments: HessTrace, TICTrace, TICDiag and the top eigenvalue.

Dangel, thesis, App. C.3.6-C.3.8; spec diagnostics.md §3.3. Diagonal curvature
``diag(H_B)`` (or the exact / Monte-Carlo diagonal GGN standing in for it) and the
second moment ``m = (1/B) sum_i g_i^2`` of the unscaled per-example gradients
are inputs, shaped like the parameters.
"""

from __future__ import annotations

from typing import Any, Callable

import jax
import jax.numpy as jnp
import optax.tree_utils as otu

Array = jax.Array

TIC_EPSILON = 1e-7


def layer_traces(diag_curvature: Any) -> Any:
  """HessTrace per layer: ``sum_j [H_B]_jj`` over each parameter tensor."""
  return jax.tree_util.tree_map(jnp.sum, diag_curvature)


def hessian_trace(diag_curvature: Any) -> Array:
  """HessTrace: ``tr H_B`` (or ``tr G_B``) from the diagonal, summed over layers."""
  return otu.tree_sum(diag_curvature)


def tic_trace(second_moment: Any, trace: Array, epsilon: float = TIC_EPSILON) -> Array:
  r"""TICTrace (Eq. C.37): ``[(1/B) sum_i ||g_i||^2] / (tr H_B + eps)``.

  ``(1/B) sum_i ||g_i||^2 = sum_j m_j``.
  """
  return otu.tree_sum(second_moment) / (trace + epsilon)


def tic_diag(second_moment: Any, diag_curvature: Any,
             epsilon: float = TIC_EPSILON) -> Array:
  r"""TICDiag (Eq. C.38): ``sum_j m_j / ([H_B]_jj + eps)``."""
  return otu.tree_sum(jax.tree_util.tree_map(lambda m, h: m / (h + epsilon),
                                             second_moment, diag_curvature))


def top_eigenvalue(matvec: Callable[[Any], Any], params: Any, key: Array, *,
                   max_iter: int = 100, rtol: float = 1e-3, atol: float = 1e-6) -> Array:
  r"""HessMaxEV (Eq. C.34) by power iteration on ``matvec``, as Cockpit does.

  Start vector uniform-random and normalised; at most ``max_iter`` products;
  stops when consecutive Rayleigh quotients agree to ``rtol``/``atol``. Like any
  power iteration it returns the eigenvalue of largest *magnitude* (with its
  sign). A ``lax.while_loop``: one product per iteration.

  Cockpit's method, kept as a pure function; the monitor's HessMaxEV uses
  Lanczos instead (`curvax.curvature.top_eigenpairs`: the algebraically
  largest eigenvalue, warm-started, fewer products).
  """
  v0 = otu.tree_random_like(key, params, jax.random.uniform)
  v0 = otu.tree_scale(1.0 / otu.tree_norm(v0), v0)
  dtype = jnp.result_type(*jax.tree_util.tree_leaves(params))

  def cond(carry):
    i, _, lam, lam_old = carry
    close = jnp.abs(lam - lam_old) <= atol + rtol * jnp.abs(lam)
    return (i < max_iter) & ((i < 2) | ~close)

  def body(carry):
    i, v, lam, _ = carry
    hv = matvec(v)
    new_lam = otu.tree_vdot(v, hv)
    norm = otu.tree_norm(hv)
    v = otu.tree_scale(1.0 / jnp.where(norm > 0, norm, 1.0), hv)
    return i + 1, v, new_lam.astype(dtype), lam

  init = (0, v0, jnp.zeros((), dtype), jnp.full((), jnp.inf, dtype))
  _, _, lam, _ = jax.lax.while_loop(cond, body, init)
  return lam
