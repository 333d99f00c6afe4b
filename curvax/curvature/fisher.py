"""Empirical Fisher-vector products, without per-example gradients."""

from __future__ import annotations

from typing import Any, Callable

import jax

from curvax import _checks
from curvax.losses import as_loss

Array = jax.Array


def fisher_matvec(apply_fn: Callable[[Any, Any], Array], loss: Any, params: Any,
                  batch: Any) -> Callable[[Any], Any]:
  r"""Returns ``v -> F v`` for the (uncentred) empirical Fisher of the batch.

  .. math:: F = \frac{1}{N}\sum_n g_n g_n^\top,\qquad
            g_n = \nabla_\theta \ell(f(\theta, x_n), y_n)

  (Dangel, thesis, Eq. 3.29; Kunstner et al. 2019 warn that it is generally
  not the Fisher). With ``L(theta)`` the vector of per-example losses and
  ``D = dL/dtheta`` (rows ``g_n'``), ``F v = D'(D v) / N``: one JVP of the
  linearised per-example losses and one transpose, never an ``N x P`` matrix.
  """
  loss = as_loss(loss)
  inputs, targets = _checks.check_batch(batch)

  def losses(p):
    return loss(apply_fn(p, inputs), targets)

  values, jvp_fn = jax.linearize(losses, params)
  transpose = jax.linear_transpose(jvp_fn, params)
  n = values.shape[0]

  def matvec(v):
    _checks.check_tree_like(v, params)
    return transpose(jvp_fn(v) / n)[0]

  return matvec
