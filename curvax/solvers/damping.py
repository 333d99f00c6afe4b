"""The Levenberg-Marquardt rule for the Tikhonov damping of Hessian-free."""

from __future__ import annotations

import jax
import jax.numpy as jnp

Array = jax.Array


def reduction_ratio(loss_before: Array, loss_after: Array, predicted_change: Array) -> Array:
  r"""``rho = (L(theta + p) - L(theta)) / phi(p)``: actual over predicted change.

  ``phi(p) = 0.5 p'(C + lambda I)p + g'p`` is the damped quadratic model's
  predicted change (`curvax.solvers.cg` returns it as ``CGResult.phi`` for
  ``b = -g``). When the model predicts no decrease (``phi(p) >= 0``) or any
  value is non-finite, the model cannot be trusted and ``rho = -inf`` is
  returned, so that `levenberg_marquardt` raises the damping.
  """
  valid = (predicted_change < 0) & jnp.isfinite(loss_before) & jnp.isfinite(loss_after)
  safe = jnp.where(valid, predicted_change, -1.0)
  return jnp.where(valid, (loss_after - loss_before) / safe, -jnp.inf)


def levenberg_marquardt(damping: Array, rho: Array, *, lower: float = 0.25,
                        upper: float = 0.75, increase: float = 1.5,
                        decrease: float = 2.0 / 3.0, min_damping: float = 1e-8,
                        max_damping: float = 1e8) -> Array:
  r"""Levenberg-Marquardt damping update (Martens 2010, sec. 4.1).

  .. math::
     \lambda \leftarrow \begin{cases}
       \tfrac32 \lambda & \rho < \tfrac14 \\
       \tfrac23 \lambda & \rho > \tfrac34 \\
       \lambda & \text{otherwise}
     \end{cases}

  clamped to ``[min_damping, max_damping]``. A non-finite ``rho`` (NaN) counts
  as ``rho < 1/4``: an untrustworthy model raises the damping. The result has
  ``damping``'s floating dtype (an integer ``damping`` becomes the default
  float, not truncated).
  """
  damping = jnp.asarray(damping)
  if not jnp.issubdtype(damping.dtype, jnp.floating):
    damping = damping.astype(jnp.result_type(float))
  bad = (rho < lower) | jnp.isnan(rho)
  new = jnp.where(bad, damping * increase,
                  jnp.where(rho > upper, damping * decrease, damping))
  return jnp.clip(new, min_damping, max_damping).astype(damping.dtype)
