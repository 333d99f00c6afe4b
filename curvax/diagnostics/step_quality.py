r"""Alpha: the local step-size quality on a noisy 1-D quadratic fit.

Dangel, thesis, §7.2.1 and App. C.3.1 (Eqs. C.1-C.4); spec diagnostics.md §3.3.
Along the step ``s = theta_{t+1} - theta_t`` with ``tau_1 = ||s||``:

* function observations ``f_0 = L_{B_t}(theta_t)``, ``f_1 = L_{B_{t+1}}(theta_{t+1})``
  (different mini-batches), noise levels the sample variances of the
  per-example losses (not divided by ``B``);
* slope observations along the unit step ``df_k = mean_i s'g_i / ||s||``, noise
  levels the sample variances of those projections;
* the weighted least-squares (Gaussian maximum-likelihood) fit of
  ``f(tau) = w_0 + w_1 tau + w_2 tau^2`` with rows ``[1,0,0], [1,tau_1,tau_1^2],
  [0,1,0], [0,1,2 tau_1]``, zero variances replaced by ``1e-10``;
* ``alpha = tau_1 / tau_* - 1`` with ``tau_* = -w_1 / (2 w_2)``; ``alpha = -1`` for a
  concave or linear fit (``w_2 <= 0``: the limit ``tau_* -> inf``) or ``tau_1 = 0``,
  NaN where the fit is singular (Cockpit returns None).

``alpha = -1``: stayed at the start; 0: landed on the fitted minimum; +1: landed
at the mirror point across the valley. "Sample variance" is the unbiased
``1/(B-1)`` estimator.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

Array = jax.Array

ZERO_VARIANCE = 1e-10


def alpha_from_fit(f0: Array, f1: Array, df0: Array, df1: Array, var_f0: Array,
                   var_f1: Array, var_df0: Array, var_df1: Array,
                   tau1: Array) -> Array:
  """Alpha from the four observations, their noise levels and ``tau_1 = ||s||``.

  Slopes ``df0``, ``df1`` are derivatives along the *unit* step direction.
  """
  dtype = jnp.result_type(f0, f1, df0, df1, tau1, float)
  tau1 = jnp.asarray(tau1, dtype)
  zero, one = jnp.zeros((), dtype), jnp.ones((), dtype)
  phi = jnp.stack([
      jnp.stack([one, zero, zero]),
      jnp.stack([one, tau1, tau1 ** 2]),
      jnp.stack([zero, one, zero]),
      jnp.stack([zero, one, 2 * tau1]),
  ])
  var = jnp.stack([var_f0, var_f1, var_df0, var_df1]).astype(dtype)
  var = jnp.where(var == 0, ZERO_VARIANCE, var)
  y = jnp.stack([f0, f1, df0, df1]).astype(dtype)
  lam_inv = 1.0 / var
  a = phi.T @ (lam_inv[:, None] * phi)
  w = jnp.linalg.solve(a, phi.T @ (lam_inv * y))
  singular = ~jnp.all(jnp.isfinite(w))
  w1, w2 = w[1], w[2]
  safe_w2 = jnp.where(w2 > 0, w2, 1.0)
  tau_star = -w1 / (2 * safe_w2)
  value = jnp.where(w2 > 0, tau1 / tau_star - 1.0, -1.0)
  value = jnp.where(singular, jnp.nan, value)
  return jnp.where(tau1 == 0, -1.0, value)


def sample_variance(x: Array) -> Array:
  """Unbiased ``1/(B-1)`` variance of a ``(B,)`` vector (0 for ``B = 1``)."""
  b = x.shape[0]
  return jnp.var(x) * b / max(b - 1, 1)


def alpha(losses0: Array, losses1: Array, projections0: Array, projections1: Array,
          step_norm: Array) -> Array:
  """Alpha from per-example observations at both ends of a step.

  Args:
    losses0: ``(B_t,)`` per-example losses at ``theta_t`` on ``B_t``.
    losses1: ``(B_{t+1},)`` per-example losses at ``theta_{t+1}`` on ``B_{t+1}``.
    projections0: ``(B_t,)`` ``s'g_i(theta_t)`` (unnormalised directional derivatives).
    projections1: ``(B_{t+1},)`` ``s'g_i(theta_{t+1})``.
    step_norm: ``||s||``.
  """
  safe = jnp.where(step_norm > 0, step_norm, 1.0)
  d0, d1 = projections0 / safe, projections1 / safe
  return alpha_from_fit(jnp.mean(losses0), jnp.mean(losses1), jnp.mean(d0), jnp.mean(d1),
                        sample_variance(losses0), sample_variance(losses1),
                        sample_variance(d0), sample_variance(d1), step_norm)
