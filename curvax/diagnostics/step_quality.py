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
  [0,1,0], [0,1,2 tau_1]``, noise ``Lambda = diag(var)``, zero variances replaced
  by ``1e-10``: ``w = (Phi' Lambda^-1 Phi)^-1 Phi' Lambda^-1 y``;
* ``alpha = tau_1 / tau_* - 1`` with ``tau_* = -w_1 / (2 w_2)``; ``alpha = -1`` for a
  concave or linear fit (``w_2 <= 0``: the limit ``tau_* -> inf``) or ``tau_1 = 0``,
  NaN where an observation or a noise level is not finite (the fit fails;
  Cockpit returns None).

``alpha = -1``: stayed at the start; 0: landed on the fitted minimum; +1: landed
at the mirror point across the valley. "Sample variance" is the unbiased
``1/(B-1)`` estimator.

Evaluation (`alpha_from_fit`): in the unit-free coordinate ``u = tau / tau_1``
the rows are ``[1,0,0], [1,1,1], [0,1,0], [0,1,2]``, the slopes ``g_k = tau_1 df_k``
have variances ``tau_1^2 var(df_k)``, and ``alpha = 1/u_* - 1``. Four observations
of three parameters leave one redundant direction: ``n = (-2, 2, -1, -1)`` has
``n' Phi = 0`` (a quadratic satisfies ``2 (f_1 - f_0) = g_0 + g_1``), and the
fitted values ``y_hat = Phi w`` minimise ``(y - y_hat)' Lambda^-1 (y - y_hat)``
subject to ``n' y_hat = 0``: ``y_hat = y - Lambda n (n' y) / (n' Lambda n)``. With
``v_k`` the variances (``u``-units) and ``D = n' Lambda n = 4 v_f0 + 4 v_f1 + v_g0 + v_g1``
the fitted slopes are

  ``g0_hat = [(4 v_f0 + 4 v_f1 + v_g1) g_0 + v_g0 (2 (f_1 - f_0) - g_1)] / D``,
  ``g1_hat = [(4 v_f0 + 4 v_f1 + v_g0) g_1 + v_g1 (2 (f_1 - f_0) - g_0)] / D``,

``g0_hat = w_1 tau_1`` and ``g1_hat - g0_hat = 2 w_2 tau_1^2``, so ``w_2 > 0`` iff
``g1_hat > g0_hat`` and then ``alpha = -2 w_2 tau_1 / w_1 - 1 = -g1_hat / g0_hat``
(the slope at the end against the slope at the start). The same estimate as
the normal equations (to rounding, also in float64), but the normal equations
square the condition number of the whitened ``Phi``, which with short steps and
variances spanning decades is beyond float32 (JAX's default; Cockpit solves
them in float64 numpy): NaN or wrong alphas. Here every weight is a ratio of
nonnegative variances in ``[0, 1]`` and the only cancellations are the data's
own (``f_1 - f_0``; ``g0_hat`` near 0, where ``alpha`` is large), so the float32
value is within a few ``eps (1 + |alpha|)^2`` of the exact fit.
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

  Slopes ``df0``, ``df1`` are derivatives along the *unit* step direction. The
  fitted slopes in closed form (module docstring), not the normal equations:
  stable in float32.
  """
  dtype = jnp.result_type(f0, f1, df0, df1, tau1, float)
  f0, f1, df0, df1, tau1 = (jnp.asarray(x, dtype) for x in (f0, f1, df0, df1, tau1))
  var_f0, var_f1, var_df0, var_df1 = (
      jnp.where(v == 0, ZERO_VARIANCE, v)
      for v in (jnp.asarray(v, dtype) for v in (var_f0, var_f1, var_df0, var_df1)))
  # u = tau / tau_1: slopes and their variances per unit of u
  g0, g1 = tau1 * df0, tau1 * df1
  v0, v1 = tau1 ** 2 * var_df0, tau1 ** 2 * var_df1
  vf = 4 * (var_f0 + var_f1)
  d = vf + v0 + v1
  two_df = 2 * (f1 - f0)
  g0_hat = (vf + v1) / d * g0 + v0 / d * (two_df - g1)
  g1_hat = (vf + v0) / d * g1 + v1 / d * (two_df - g0)
  value = jnp.where(g1_hat > g0_hat, -g1_hat / g0_hat, -1.0)
  value = jnp.where(jnp.isfinite(g0_hat) & jnp.isfinite(g1_hat), value, jnp.nan)
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
