r"""Top GGN eigenpairs through the Gram matrix of its factor (ViViT).

ViViT (Dangel, Tatzel & Hennig 2022; thesis §7.2, Eqs. 7.3-7.5, spec §2.4).
With ``V = (1/sqrt N) [J_n' s_{n,k}]_{n,k}`` (``D x NK``, exact or Monte-Carlo
loss-Hessian square roots) the GGN is ``G = V V'``. Its nonzero eigenvalues are
those of the ``NK x NK`` Gram matrix ``G~ = V'V`` (matrix determinant lemma,
App. D.1.1), and for an eigenpair ``(lam_k, e~_k)`` of ``G~`` with ``lam_k > 0``,
``e_k = V e~_k / sqrt(lam_k)`` is a unit eigenvector of ``G`` (Eq. 7.5).
Per-example curvatures along ``e_k`` come for free:
``e_k' G_n e_k = N lam_k ||[e~_k]_n||^2`` (``[.]_n``: example ``n``'s ``K`` entries).

For any symmetric matvec (GGN, Hessian, Fisher), `curvax.curvature.lanczos`
and `curvax.curvature.block_lanczos` (module ``krylov``) find extreme eigenpairs
from products alone.
"""

from __future__ import annotations

from typing import Any, Callable, NamedTuple, Optional

import jax
import jax.numpy as jnp

from curvax._dtypes import call_in_at_least_float32
from curvax.curvature import _chunking, diagonals

Array = jax.Array


class GGNEigenpairs(NamedTuple):
  """Top GGN eigenpairs from the Gram matrix.

  Attributes:
    eigenvalues: ``(k,)``, descending; entries that fail the threshold are 0;
      all NaN (none ``valid``) when the factor is not finite (a NaN loss, an
      inf parameter).
    eigenvectors: pytree shaped like params with leading axis ``k``: unit,
      mutually orthogonal eigenvectors; zero where not ``valid``.
    valid: ``(k,)`` bool, ``eigenvalue > threshold`` (shapes are static under
      ``jit``, so near-zero eigenvalues are masked rather than dropped).
    gram_eigenvectors: ``(N*K, k)`` eigenvectors ``e~_k`` of ``G~``.
    per_example_curvatures: ``(N, k)``, ``e_k' G_n e_k`` (unscaled per example;
      their mean over ``n`` is the eigenvalue).
  """
  eigenvalues: Array
  eigenvectors: Any
  valid: Array
  gram_eigenvectors: Array
  per_example_curvatures: Array


def ggn_factor(apply_fn: Callable[[Any, Any], Array], loss: Any, params: Any,
               batch: Any, *, key: Optional[Array] = None,
               num_samples: Optional[int] = None,
               chunk_size: Optional[int] = diagonals.DEFAULT_CHUNK_SIZE) -> Any:
  """The GGN factor ``V`` with ``G = V V'``: a params-shaped pytree with leading axes ``(N, K)``.

  Column ``(n, k)`` is ``J_n' s_{n,k} / sqrt(N)``: exact square roots by default
  (``K`` = the root's columns: the output dimension, ``C - 1`` for softmax
  cross-entropy), Monte-Carlo ones with ``key`` (``K = num_samples``).
  Memory: ``N K`` copies of the parameters. Batch-norm models are refused, as
  in `curvax.curvature.diag_ggn`.
  """
  inputs, factors = diagonals.batch_factors(apply_fn, loss, params, batch, key, num_samples)
  n = factors.shape[0]

  def chunk_fn(xs):
    x, s = xs
    cols = jax.vmap(lambda xi, si: diagonals.factor_columns(apply_fn, params, xi, si))(x, s)
    return cols, ()

  cols, _ = _chunking.map_reduce(chunk_fn, (inputs, factors), chunk_size)
  return jax.tree_util.tree_map(lambda c: c / jnp.sqrt(jnp.asarray(n, c.dtype)), cols)


def ggn_eigenpairs(apply_fn: Callable[[Any, Any], Array], loss: Any, params: Any,
                   batch: Any, num_eigenpairs: int, *, key: Optional[Array] = None,
                   num_samples: Optional[int] = None,
                   threshold: Optional[float] = None,
                   chunk_size: Optional[int] = diagonals.DEFAULT_CHUNK_SIZE
                   ) -> GGNEigenpairs:
  """Top ``num_eigenpairs`` eigenpairs of the GGN via the ViViT Gram matrix.

  Args:
    apply_fn, loss, params, batch: the model/loss pair and data.
    num_eigenpairs: ``k`` (static), at most ``N * K``.
    key, num_samples: Monte-Carlo factor with ``num_samples`` columns per
      example instead of the exact one (``key`` alone: one column).
    threshold: eigenvalues ``lam <= threshold`` are masked (ViViT filters
      small ones because ``1/sqrt(lam)`` amplifies round-off; the thesis uses
      1e-4). It applies to the GGN eigenvalues ``lam = sigma^2`` (``sigma``:
      the singular values of ``V``), in the units of the GGN. Default:
      ``max(N K, sqrt(D)) * eps * lam_max`` (``D``: the parameter count,
      ``eps``: the machine epsilon of the factor's dtype), the round-off level
      of the computed eigenvalues up to modest factors, so that null
      directions (computed as noise of either sign) are masked and accurate
      eigenvalues are not: ``eigh`` of the ``NK x NK`` Gram matrix is backward
      stable, with an error ``~ N K eps ||G~|| = N K eps lam_max``; each Gram
      entry ``v_i' v_j`` is a dot product of length ``D``, whose rounding
      error is ``<= D eps ||v_i|| ||v_j||`` in the worst case but ``~ sqrt(D)
      eps ||v_i|| ||v_j||`` in practice (rounding errors behave as
      independent and zero-mean; Higham & Mary 2019, "A new approach to
      probabilistic rounding error analysis"), and ``||v_i||^2 = G~_ii <=
      lam_max``. The worst-case ``D eps`` would mask, in float32 (``eps ~
      1.2e-7``) at ``D = 10^6``, eigenvalues below 12% of ``lam_max`` that are
      accurate to about ``1e-6`` relative.
    chunk_size: examples per ``vmap`` chunk when building ``V``.

  Cost: building ``V`` (``N K`` VJPs), ``O((NK)^2 D)`` for the Gram matrix,
  ``O((NK)^3)`` for its eigendecomposition.
  """
  v = ggn_factor(apply_fn, loss, params, batch, key=key, num_samples=num_samples,
                 chunk_size=chunk_size)
  leaves = jax.tree_util.tree_leaves(v)
  n, kk = leaves[0].shape[:2]
  cols = n * kk
  if not isinstance(num_eigenpairs, int) or not 1 <= num_eigenpairs <= cols:
    raise ValueError(
        f"`num_eigenpairs` must be an int in [1, N*K] = [1, {cols}]; got {num_eigenpairs!r}.")
  flat = [leaf.reshape(cols, -1) for leaf in leaves]
  gram = sum(f @ f.T for f in flat)
  # No half-precision eigh kernels: bfloat16 parameters give a bfloat16 Gram matrix.
  lam, vec = call_in_at_least_float32(jnp.linalg.eigh, gram)
  lam, vec = lam[::-1][:num_eigenpairs], vec[:, ::-1][:, :num_eigenpairs]
  dim = sum(f.shape[1] for f in flat)
  if threshold is None:
    level = max(float(cols), float(dim) ** 0.5)
    threshold = (jnp.asarray(level * float(jnp.finfo(lam.dtype).eps), lam.dtype)
                 * jnp.maximum(jnp.max(lam), 0.0))
  # A non-finite factor (a NaN loss, inf parameters) gives NaN eigenvalues, as
  # every other curvature quantity does, not masked zeros that read as flat.
  finite = jnp.all(jnp.isfinite(gram))
  valid = (lam > threshold) & finite
  scale = jnp.where(valid, 1.0 / jnp.sqrt(jnp.where(valid, lam, 1.0)), 0.0)
  coeffs = jnp.where(valid, vec, 0.0) * scale  # (NK, k)
  eigenvectors = jax.tree_util.tree_map(
      lambda leaf: jnp.einsum("ck,c...->k...", coeffs, jnp.where(
          finite, leaf, 0.0).reshape((cols,) + leaf.shape[2:])), v)
  lam = jnp.where(finite, jnp.where(valid, lam, 0.0), jnp.nan)
  blocks = jnp.sum(jnp.square(vec.reshape(n, kk, -1)), axis=1)  # (N, k)
  per_example = n * lam * blocks
  return GGNEigenpairs(lam, eigenvectors, valid, vec, per_example)
