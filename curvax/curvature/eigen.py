r"""Eigen-structure: top GGN eigenpairs through the Gram matrix (ViViT), Lanczos.

ViViT (Dangel, Tatzel & Hennig 2022; thesis §7.2, Eqs. 7.3-7.5, spec §2.4).
With ``V = (1/sqrt N) [J_n' s_{n,k}]_{n,k}`` (``D x NK``, exact or Monte-Carlo
loss-Hessian square roots) the GGN is ``G = V V'``. Its nonzero eigenvalues are
those of the ``NK x NK`` Gram matrix ``G~ = V'V`` (matrix determinant lemma,
App. D.1.1), and for an eigenpair ``(lam_k, e~_k)`` of ``G~`` with ``lam_k > 0``,
``e_k = V e~_k / sqrt(lam_k)`` is a unit eigenvector of ``G`` (Eq. 7.5).
Per-example curvatures along ``e_k`` come for free:
``e_k' G_n e_k = N lam_k ||[e~_k]_n||^2`` (``[.]_n``: example ``n``'s ``K`` entries).

Lanczos (Lanczos 1950; Golub & Van Loan §10.1) on any symmetric matvec, with
full re-orthogonalisation against a fixed ``(m+1) x D`` buffer inside a
``lax.fori_loop``: ``m`` products, ``O(m^2 D)`` extra work; meant for ``m`` in
the tens.
"""

from __future__ import annotations

from typing import Any, Callable, NamedTuple, Optional, Tuple

import jax
import jax.numpy as jnp
from jax.flatten_util import ravel_pytree

from curvax import _checks
from curvax._dtypes import at_least_float32, call_in_at_least_float32
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


class LanczosResult(NamedTuple):
  """Lanczos output.

  Attributes:
    ritz_values: ``(m,)`` eigenvalues of the tridiagonal matrix, descending.
    ritz_vectors: pytree with leading axis ``m``, the matching Ritz vectors.
    alphas: ``(m,)`` diagonal of the tridiagonal matrix.
    betas: ``(m,)`` off-diagonal (``betas[:m-1]``) and the last residual norm.
    iterations: the size ``j <= m`` of the tridiagonal matrix: the Lanczos
      steps up to the first breakdown (invariant Krylov space) or, with a
      tolerance, up to convergence. ``ritz_values[j:]`` are NaN and
      ``ritz_vectors[j:]`` zero. With a tolerance ``j`` matrix-vector products
      are taken, without one ``m`` (those after a breakdown multiply zero).
  """
  ritz_values: Array
  ritz_vectors: Any
  alphas: Array
  betas: Array
  iterations: Array


def _tridiagonal(alphas: Array, betas: Array, size: Array) -> Array:
  """The leading ``size x size`` tridiagonal block of ``(alphas, betas)``, padded to
  ``m x m`` with a decoupled diagonal below every eigenvalue of the block
  (Gershgorin), so that the block's eigenvalues are the ``size`` largest."""
  m = alphas.shape[0]
  inside = jnp.arange(m) < size
  off = jnp.where(jnp.arange(m - 1) < size - 1, betas[:m - 1], 0.0)
  radius = jnp.abs(jnp.concatenate([off, jnp.zeros(1, off.dtype)])) + jnp.abs(
      jnp.concatenate([jnp.zeros(1, off.dtype), off]))
  floor = jnp.min(jnp.where(inside, alphas - radius, jnp.inf)) - 1.0
  diag = jnp.where(inside, alphas, floor)
  return jnp.diag(diag) + jnp.diag(off, 1) + jnp.diag(off, -1)


def lanczos(matvec: Callable[[Any], Any], v0: Any, num_iterations: int, *,
            rtol: Optional[float] = None, atol: float = 0.0,
            num_converged: int = 1) -> LanczosResult:
  r"""Lanczos with full re-orthogonalisation: at most ``num_iterations`` steps.

  Args:
    matvec: a symmetric linear map on pytrees shaped like ``v0``.
    v0: starting vector (nonzero pytree).
    num_iterations: ``m`` (static); clipped to the dimension.
    rtol, atol: with ``rtol``, stop after step ``j`` once each of the top
      ``num_converged`` Ritz pairs ``(theta, x = Q_j y)`` has the residual
      ``||A x - theta x|| = beta_j |y_j| <= atol + rtol |theta|`` (Parlett, *The
      Symmetric Eigenvalue Problem*, Thm. 13.1.1 / Eq. 13.2.1: an eigenvalue of
      ``A`` lies within that distance of ``theta``), or once the Krylov space is
      invariant. Without ``rtol``, all ``m`` steps run.

  If the Krylov space becomes invariant after ``j < m`` steps (``beta_j ~ 0``
  relative to ``||A q_j||``: a breakdown), the remaining basis vectors are zero,
  and the Ritz values are those of the leading ``j x j`` tridiagonal block, the
  exact eigenvalues of ``A`` on that space; ``ritz_values[j:]`` are NaN
  (``iterations = j``). Zero-padding the tridiagonal matrix instead would add
  spurious 0 Ritz values, above the true ones when ``A`` is negative definite.
  """
  flat0, unravel = ravel_pytree(v0)
  dim = flat0.shape[0]
  if not isinstance(num_iterations, int) or num_iterations < 1:
    raise ValueError(f"`num_iterations` must be a positive int; got {num_iterations!r}.")
  if rtol is not None and not (rtol >= 0 and atol >= 0):
    raise ValueError(f"`rtol` and `atol` must be >= 0; got {rtol!r}, {atol!r}.")
  m = min(num_iterations, dim)
  if not isinstance(num_converged, int) or not 1 <= num_converged <= m:
    raise ValueError(f"`num_converged` must be an int in [1, {m}]; got {num_converged!r}.")
  # The recurrence runs in at least float32: with bfloat16 vectors its
  # breakdown test (beta against 100 eps ||A q||) and re-orthogonalisation fail
  # (a 6 x 6 test matrix's top eigenvalue 8 came out as 1.76). The matvec sees
  # vectors in ``v0``'s dtypes; results come back in them.
  out_dtype = flat0.dtype
  dtype = at_least_float32(out_dtype)
  # An array of dtype: numpy < 2 makes a float32 scalar times an int float64,
  # which strict promotion refuses against the float32 norms.
  tiny = jnp.asarray(jnp.finfo(dtype).eps, dtype)

  def mv(x):
    out = matvec(unravel(x.astype(out_dtype)))
    _checks.check_tree_like(out, v0, "matvec(v)", "v0")
    return ravel_pytree(out)[0].astype(dtype)

  def step(i, q, alphas, betas):
    w = mv(q[i])
    w_norm = jnp.linalg.norm(w)
    alpha = jnp.dot(w, q[i])
    # Full re-orthogonalisation (twice is enough, Giraud et al. 2005); the
    # rows of q beyond i are zero, so all previous vectors are removed.
    w = w - q.T @ (q @ w)
    w = w - q.T @ (q @ w)
    beta = jnp.linalg.norm(w)
    ok = beta > 100 * tiny * w_norm
    q = q.at[i + 1].set(jnp.where(ok, w / jnp.where(ok, beta, 1.0), 0.0))
    return q, alphas.at[i].set(alpha), betas.at[i].set(jnp.where(ok, beta, 0.0))

  flat0 = flat0.astype(dtype)
  q = jnp.zeros((m + 1, dim), dtype).at[0].set(flat0 / jnp.linalg.norm(flat0))
  alphas = jnp.zeros((m,), dtype)
  betas = jnp.zeros((m,), dtype)
  if rtol is None:
    q, alphas, betas = jax.lax.fori_loop(
        0, m, lambda i, c: step(i, *c), (q, alphas, betas))
    # Step i breaks down iff it sets beta_i = 0; its alpha_i is still valid,
    # and every later step multiplies the zero vector.
    broken = betas == 0
    iterations = jnp.where(jnp.any(broken), jnp.argmax(broken) + 1, m)
  else:
    def converged(j, alphas, betas):
      theta, y = jnp.linalg.eigh(_tridiagonal(alphas, betas, j))
      top = slice(m - num_converged, m)
      residual = betas[j - 1] * jnp.abs(y[j - 1, top])
      return jnp.all(residual <= atol + rtol * jnp.abs(theta[top]))

    def body(carry):
      j, q, alphas, betas, _ = carry
      q, alphas, betas = step(j, q, alphas, betas)
      j = j + 1
      # A breakdown ends the loop even before `num_converged` steps: the space
      # is invariant, and a further step would multiply the zero vector (and
      # add a spurious 0 Ritz value).
      done = ((j >= num_converged) & converged(j, alphas, betas)) | (betas[j - 1] == 0)
      return j, q, alphas, betas, done

    iterations, q, alphas, betas, _ = jax.lax.while_loop(
        lambda c: (c[0] < m) & ~c[4], body, (jnp.asarray(0), q, alphas, betas, False))
  theta, y = jnp.linalg.eigh(_tridiagonal(alphas, betas, iterations))
  theta, y = theta[::-1], y[:, ::-1]
  real = jnp.arange(m) < iterations
  theta = jnp.where(real, theta, jnp.nan)
  y = jnp.where(real[None, :] & real[:, None], y, 0.0)
  vectors = (q[:m].T @ y).T.astype(out_dtype)
  return LanczosResult(theta.astype(out_dtype), jax.vmap(unravel)(vectors),
                       alphas.astype(out_dtype), betas.astype(out_dtype), iterations)


def top_eigenpairs(matvec: Callable[[Any], Any], params: Any, key: Array,
                   k: int = 1, num_iterations: int = 20, *,
                   rtol: Optional[float] = None, atol: float = 0.0,
                   warm_start: Optional[Any] = None) -> Tuple[Array, Any]:
  """Largest ``k`` eigenvalues (descending) and their Ritz vectors (a pytree
  with leading axis ``k``) of a symmetric matvec by Lanczos.

  Starts from a Gaussian vector shaped like ``params`` drawn with ``key``, plus,
  if given, ``warm_start`` scaled to the same norm (e.g. the top eigenvector of
  the previous training step: the top eigenvector moves slowly, and a start
  close to it needs fewer products, while the Gaussian half keeps a component
  along every eigenvector, as a cold start has; a zero ``warm_start`` is a cold
  start). With ``rtol`` (and ``atol``), stops as soon as the top ``k`` Ritz
  values are within ``atol + rtol |theta|`` of eigenvalues (`lanczos`), else
  after ``num_iterations`` matrix-vector products. If the Krylov space is
  invariant with dimension ``j < k`` (`lanczos`), the values beyond the first
  ``j`` are NaN and their vectors zero.

  Repeated eigenvalues: a Krylov space from one start vector holds one
  eigenvector per distinct eigenvalue, so a multiple eigenvalue is found once
  and the next distinct ones follow it (a linear layer under MSE with ``K``
  outputs has each GGN eigenvalue ``K`` times: ``[1.59, 1.59, 1.59, 1.46]``
  comes back as ``[1.59, 1.46, 0.99, 0.43]``). Where multiplicities matter,
  `ggn_eigenpairs` (exact eigenvalues of the batch's GGN) reports them.
  """
  flat, unravel = ravel_pytree(params)
  if k > min(num_iterations, flat.shape[0]):
    raise ValueError(f"k={k} exceeds the number of Lanczos iterations "
                     f"({min(num_iterations, flat.shape[0])}).")
  v0 = jax.random.normal(key, flat.shape, flat.dtype)
  if warm_start is not None:
    _checks.check_tree_like(warm_start, params, "warm_start", "params")
    warm = ravel_pytree(warm_start)[0].astype(flat.dtype)
    norm = jnp.linalg.norm(warm)
    v0 = v0 / jnp.linalg.norm(v0) + jnp.where(norm > 0, warm / jnp.where(norm > 0, norm, 1), 0)
  result = lanczos(matvec, unravel(v0), num_iterations, rtol=rtol, atol=atol, num_converged=k)
  return (result.ritz_values[:k],
          jax.tree_util.tree_map(lambda v: v[:k], result.ritz_vectors))


def top_eigenvalues(matvec: Callable[[Any], Any], params: Any, key: Array,
                    k: int = 1, num_iterations: int = 20, *,
                    rtol: Optional[float] = None, atol: float = 0.0) -> Array:
  """Largest ``k`` eigenvalues (descending) of a symmetric matvec by Lanczos
  (`top_eigenpairs` from a Gaussian start)."""
  return top_eigenpairs(matvec, params, key, k, num_iterations, rtol=rtol, atol=atol)[0]
