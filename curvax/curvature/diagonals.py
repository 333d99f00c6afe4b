r"""Diagonals and traces: exact and Monte-Carlo GGN diagonals, Hutchinson estimates.

With ``S_n`` a square root of the output Hessian (``S_n S_n' = H_n``, exact, or
``E[S~_n S~_n'] = H_n``, sampled) the GGN of the batch-mean loss is
``G = (1/N) sum_n (J_n' S_n)(J_n' S_n)'`` and its diagonal the row sums of the
squared factor (Dangel, thesis, Eqs. B.12-B.15, spec §1.3):

.. math:: \operatorname{diag} G = \frac{1}{N}\sum_n\sum_k (J_n^\top s_{n,k})^{\odot 2}.

Each column ``J_n' s_{n,k}`` is one VJP of the single-example model, so the
exact diagonal costs about ``K`` (= columns of the loss's root: the number of
outputs, ``C - 1`` for softmax cross-entropy) gradients and the
Monte-Carlo one ``M`` (= ``num_samples``). Examples are processed
``chunk_size`` at a time (``vmap`` inside a ``lax.scan``), so memory is
``chunk_size x K x params``.

Hutchinson (1989): for Rademacher probes ``z`` (entries ±1),
``E[z ⊙ A z] = diag A`` and ``E[z' A z] = tr A`` for any square ``A`` given as a
matvec.
"""

from __future__ import annotations

from typing import Any, Callable, Optional

import jax
import jax.numpy as jnp
import optax.tree_utils as otu

from curvax import _checks
from curvax.curvature import _chunking
from curvax.curvature.per_example import check_per_example_supported
from curvax.losses import as_loss

Array = jax.Array

DEFAULT_CHUNK_SIZE = 16


def factor_columns(apply_fn: Callable[[Any, Any], Array], params: Any, x: Any,
                   s: Array) -> Any:
  """``[J_n' s_k]_k`` for one example ``x`` and factor ``s`` (``out_shape + (K,)``).

  Returns a pytree shaped like ``params`` with a leading axis ``K``.
  """
  _, vjp = jax.vjp(lambda p: apply_fn(p, _chunking.expand(x))[0], params)
  return jax.vmap(lambda c: vjp(c)[0], in_axes=-1)(s)


def output_factors(apply_fn, loss, params, inputs, targets, key=None,
                   num_samples=None) -> Array:
  """Loss-Hessian square roots at the model outputs: exact, or sampled if ``key``."""
  outputs = apply_fn(params, inputs)
  loss.check_targets(outputs, targets)
  if key is None:
    if num_samples is not None:
      raise ValueError("`num_samples` needs a `key` (Monte-Carlo factor).")
    return loss.sqrt_hessian(outputs, targets)
  if num_samples is None:
    num_samples = 1
  if not isinstance(num_samples, int) or num_samples < 1:
    raise ValueError(f"`num_samples` must be a positive int; got {num_samples!r}.")
  return loss.sqrt_hessian_sampled(key, outputs, targets, num_samples)


def batch_factors(apply_fn, loss, params, batch, key=None, num_samples=None):
  """``(inputs, S)``: the batch's inputs and the output factors of `output_factors`.

  The per-example decomposition ``G = (1/N) sum_n J_n' S_n S_n' J_n`` needs
  examples that do not interact, so models that declare per-example quantities
  ill-defined (batch norm with batch statistics) are refused with a ValueError.
  """
  check_per_example_supported(apply_fn)
  loss = as_loss(loss)
  inputs, targets = _checks.check_batch(batch)
  return inputs, output_factors(apply_fn, loss, params, inputs, targets, key, num_samples)


def _diag_from_factors(apply_fn, params, inputs, factors, chunk_size, method="auto"):
  if method not in ("auto", "vmap", "layers"):
    raise ValueError(f"`method` must be 'auto', 'vmap' or 'layers'; got {method!r}.")
  if method != "vmap":
    from curvax.curvature import flax_layers  # pylint: disable=g-import-not-at-top
    fast = flax_layers.layer_diag_ggn(apply_fn, params, inputs, factors,
                                      strict=(method == "layers"))
    if fast is not None:
      return fast

  def chunk_fn(xs):
    x, s = xs
    cols = jax.vmap(lambda xi, si: factor_columns(apply_fn, params, xi, si))(x, s)
    return None, jax.tree_util.tree_map(lambda c: jnp.sum(jnp.square(c), axis=(0, 1)), cols)

  _, total = _chunking.map_reduce(chunk_fn, (inputs, factors), chunk_size)
  return otu.tree_scale(1.0 / factors.shape[0], total)


def diag_ggn(apply_fn: Callable[[Any, Any], Array], loss: Any, params: Any,
             batch: Any, *, chunk_size: Optional[int] = DEFAULT_CHUNK_SIZE,
             method: str = "auto") -> Any:
  """Exact diagonal of the GGN of the batch-mean loss, shaped like ``params``.

  Uses the exact loss-Hessian square root (``loss.sqrt_hessian``): ``K`` VJPs
  per example (``K`` = its number of columns: the output dimension, ``C - 1``
  for softmax cross-entropy).

  ``method``: ``"auto"`` uses the per-layer fast path for Flax Linen models
  whose parameters all sit in Dense/Conv layers (see
  `curvax.curvature.flax_layers.layer_diag_ggn`: ``K`` backward passes through
  the batch, no ``N K`` parameter-sized columns), else the chunked ``vmap``
  over examples; ``"vmap"`` / ``"layers"`` force one. Models with batch norm
  in batch-statistics mode are refused (ValueError), as for per-example
  quantities: batch statistics couple the examples.
  """
  inputs, factors = batch_factors(apply_fn, loss, params, batch)
  return _diag_from_factors(apply_fn, params, inputs, factors, chunk_size, method)


def diag_ggn_mc(apply_fn: Callable[[Any, Any], Array], loss: Any, params: Any,
                batch: Any, key: Array, num_samples: int = 1, *,
                chunk_size: Optional[int] = DEFAULT_CHUNK_SIZE,
                method: str = "auto") -> Any:
  """Monte-Carlo diagonal GGN (BackPACK's DiagGGNMC, thesis Eqs. B.13-B.15).

  Unbiased: uses ``loss.sqrt_hessian_sampled(key, ..., num_samples)`` (for
  softmax cross-entropy, gradients at labels drawn from the model), so
  ``num_samples`` VJPs per example; the standard error falls as
  ``1/sqrt(num_samples * N)``. ``method`` and batch norm as in `diag_ggn`.
  """
  inputs, factors = batch_factors(apply_fn, loss, params, batch, key, num_samples)
  return _diag_from_factors(apply_fn, params, inputs, factors, chunk_size, method)


def rademacher_like(key: Array, tree: Any, num_samples: int) -> Any:
  """``num_samples`` Rademacher (±1) probes shaped like ``tree`` (leading axis)."""
  leaves, treedef = jax.tree_util.tree_flatten(tree)
  keys = jax.random.split(key, len(leaves))
  probes = [jax.random.rademacher(k, (num_samples,) + jnp.shape(leaf), jnp.result_type(leaf))
            for k, leaf in zip(keys, leaves)]
  return jax.tree_util.tree_unflatten(treedef, probes)


def _hutchinson_terms(matvec, params, key, num_samples, batch_size):
  if not isinstance(num_samples, int) or num_samples < 1:
    raise ValueError(f"`num_samples` must be a positive int; got {num_samples!r}.")
  probes = rademacher_like(key, params, num_samples)

  def one(z):
    az = matvec(z)
    _checks.check_tree_like(az, params, "matvec(v)")
    return jax.tree_util.tree_map(jnp.multiply, z, az)

  return jax.lax.map(one, probes, batch_size=batch_size)


def hutchinson_diagonal(matvec: Callable[[Any], Any], params: Any, key: Array,
                        num_samples: int = 100, *, batch_size: Optional[int] = None) -> Any:
  r"""Hutchinson estimate ``(1/M) sum_m z_m ⊙ A z_m`` of ``diag A``.

  ``params`` only gives the shapes of the probes. Entry ``i`` has variance
  ``sum_{j != i} A_ij^2 / M`` for symmetric ``A``. Probes are processed
  ``batch_size`` at a time with ``vmap`` (``lax.map``; None: one at a time).
  """
  terms = _hutchinson_terms(matvec, params, key, num_samples, batch_size)
  return jax.tree_util.tree_map(lambda t: jnp.mean(t, axis=0), terms)


def hutchinson_trace(matvec: Callable[[Any], Any], params: Any, key: Array,
                     num_samples: int = 100, *, batch_size: Optional[int] = None) -> Array:
  r"""Hutchinson estimate ``(1/M) sum_m z_m' A z_m`` of ``tr A``.

  Variance ``2 (||A||_F^2 - sum_i A_ii^2) / M`` for symmetric ``A``.
  """
  terms = _hutchinson_terms(matvec, params, key, num_samples, batch_size)
  per_probe = sum(jnp.sum(t.reshape(t.shape[0], -1), axis=1)
                  for t in jax.tree_util.tree_leaves(terms))
  return jnp.mean(per_probe)
