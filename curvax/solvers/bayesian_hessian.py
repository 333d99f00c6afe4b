r"""Bayesian low-rank Hessian estimate from Hessian-vector products (one block).

Pure numerics of de Roos & Hennig (2019), "Active Probabilistic Inference on
Matrices for Pre-Conditioning in Stochastic Optimization" (AISTATS), as
specified in ``specs/probabilistic_preconditioning.md`` (sections "Observations",
"Posterior", "Rank-k estimate" and "Preconditioner"; the seed
000_102983c1e1ef3813.txt, chapter 3, documents the PyTorch class
``Preconditioner`` that implements it). Everything here acts on ONE block of
``n`` parameters (one parameter tensor, flattened); the transform in
``curvax.transforms.probabilistic_preconditioning`` applies it leaf by leaf,
through the ``*_blocks`` variants, which take a list of blocks and batch
their small dense linear algebra across blocks of equal shapes.

The spec's displayed equations carry no numbers; this module labels them, in the
spec's order, and every docstring cites the labels:

* (B1) ``B0 = (1/alpha) I`` (curvax's choice, the prior mean everywhere);
* (B2) ``Delta = Y - B0 S`` (residuals of the observations under the prior);
* (B3) ``X = Delta (w^2 S'S + lam^2 diag(S'S))^{-1}``, posterior mean
  ``B = B0 + w^2 X S'`` — exact Gaussian conditioning of the prior
  ``vec(B) ~ N(vec(B0), W (x) W)``, ``W = w I``, on the likelihood
  ``Y = B S + E`` whose noise ``E`` has covariance ``lam^2 I (x) diag(S'S)``
  (each of E's n rows ``~ N(0, lam^2 diag(S'S))``: ``lam`` is the noise's
  standard deviation per unit-norm observation). The spec's prose says
  ``lam I (x) diag(S'S)``; its formula (B3), which the seed code also
  computes, and which this module implements, is the ``lam^2`` one. (P3)
  estimates ``lam`` as a gradient variance, so it enters here squared;
* (W1) ``B^{-1} g = alpha g - alpha^2 w^2 X (I + alpha w^2 S'X)^{-1} S' g``
  (Woodbury; ``S'X``, not the seed code's ``X'S``);
* (L1) ``Z`` an orthonormal basis of span[X, S], ``K = Z'BZ = (1/alpha) I + w^2 (Z'X)(Z'S)'``,
  ``K = U_K diag(sigma) V_K'`` (SVD), rank-k factors ``U = Z U_K[:, :k]``,
  ``sigma[:k]`` — exact, because B equals ``(1/alpha) I`` outside span[X, S]
  and maps that span into itself;
* (C1) seed form ``g~ = (I - UU')g + U diag(sigma^{-1/2}) U'g``;
* (C2) inverse form ``g~ = (I - UU')g + U diag(1/(alpha sigma)) U'g``, so that
  ``alpha g~ = [alpha (I - UU') + U diag(1/sigma) U'] g`` is the inverse of the
  rank-k estimate applied to g.

Layout: observations are stored as ROWS, ``S`` and ``Delta`` of shape ``(M, n)``
(so the spec's ``S`` is ``S.T`` here). Rows not yet observed are masked out,
which lets fixed-shape buffers hold a growing set of observations under
``jit``: the single-block functions expect them zero; the ``*_blocks`` variants
given ``num_observed`` ignore rows from ``num_observed`` on whatever (finite)
values they hold, e.g. a previous round's observations, so a new round need
not clear its buffers. Observed directions have unit norm (the spec's "unit-norm columns
consistently in the Gram matrices"), so ``diag(S'S) = I`` on observed rows.
"""

from __future__ import annotations

from typing import Any, Callable, Hashable, Optional, Sequence, Tuple, Union

import jax
import jax.numpy as jnp
import numpy as np

from curvax._dtypes import call_in_at_least_float32

Array = jax.Array

FORMS = ("inverse", "seed")

# `_products` reads the rows once (`_row_dots`) when they are at least this
# long and there are at most this many pairs; else it uses matrix products.
_ROW_DOTS_MIN_SIZE = 2 ** 18
_ROW_DOTS_MAX_PAIRS = 128
# Parts of the n entries that `_row_dots` reduces separately (then sums).
_DOT_PARTS = 16


def _row_dots(rows: Sequence[Array], pairs: Sequence[Tuple[int, int]]) -> Array:
  r"""``[rows[i] . rows[j] for (i, j) in pairs]``, every row read once.

  One variadic reduction over ``_DOT_PARTS`` equal parts of the entries
  (summed afterwards), which XLA:CPU runs on every core at memory speed.
  """
  dtype = jnp.result_type(*rows)
  if not pairs:
    return jnp.zeros((0,), dtype)
  n = rows[0].shape[0]
  parts = next(c for c in range(min(_DOT_PARTS, max(n, 1)), 0, -1) if n % c == 0)
  views = [jnp.asarray(r, dtype).reshape(parts, n // parts) for r in rows]
  sums = jax.lax.reduce(tuple(views[i] * views[j] for i, j in pairs),
                        (jnp.zeros((), dtype),) * len(pairs),
                        lambda xs, ys: tuple(x + y for x, y in zip(xs, ys)), (1,))
  return jnp.sum(jnp.stack(sums), axis=1)


def _products(blocks: Sequence[Array], wanted: Sequence[Tuple[int, int]]) -> list:
  r"""``[blocks[p] @ blocks[q].T for (p, q) in wanted]`` for row blocks ``(m, n)``.

  The Gram matrices here are ``(M, n) x (n, M)`` with small ``M`` and large
  ``n``, which XLA:CPU runs as matrix products at a fraction of memory speed
  once the rows leave the cache (mnist_mlp's first layer, ``n = 784000``,
  ``M = 5``: ``S S'`` 4.3 ms, the 10-row Gram of the rank-k build 25 ms). For
  long rows and few pairs all of them come from one pass over the rows
  (`_row_dots`): 1.0 and 5.1 ms; ``S Delta'`` with ``S'g`` 3.5 ms instead of 9.
  Shorter rows (below about ``2^18`` entries) are faster as matrix products.
  """
  offsets = np.cumsum([0] + [b.shape[0] for b in blocks])
  index = {}                     # (row, row) -> position; symmetric blocks once
  layouts = []
  for p, q in wanted:
    layout = np.empty((blocks[p].shape[0], blocks[q].shape[0]), int)
    for i in range(layout.shape[0]):
      for j in range(layout.shape[1]):
        a, b = offsets[p] + i, offsets[q] + j
        key = (min(a, b), max(a, b)) if p == q else (a, b)
        layout[i, j] = index.setdefault(key, len(index))
    layouts.append(layout)
  n = blocks[0].shape[1]
  if n >= _ROW_DOTS_MIN_SIZE and 0 < len(index) <= _ROW_DOTS_MAX_PAIRS:
    values = _row_dots([r for b in blocks for r in b], list(index))
    return [values[layout] for layout in layouts]
  return [blocks[p] @ blocks[q].T for p, q in wanted]


def observation_mask(directions: Array, num_observed: Optional[Array] = None) -> Array:
  """Boolean ``(M,)`` mask of the usable rows of ``directions``.

  A row is usable when it is among the first ``num_observed`` (all rows if
  ``None``) and non-zero (a zero row is an empty observation, e.g. the block of
  a parameter whose gradient vanished).
  """
  return _mask(jnp.sum(jnp.square(directions), axis=1), num_observed)


def _mask(squared_norms: Array, num_observed: Optional[Array]) -> Array:
  mask = squared_norms > 0
  if num_observed is not None:
    num_observed = jnp.asarray(num_observed)
    mask = mask & (jnp.arange(squared_norms.shape[0], dtype=num_observed.dtype) < num_observed)
  return mask


def posterior_coefficients(directions: Array, prior_scale: Array, noise_scale: Array,
                           num_observed: Optional[Array] = None) -> Array:
  r"""Returns ``C = (w^2 S'S + lam^2 diag(S'S))^{-1}`` of (B3), masked, ``(M, M)``.

  With ``X = Delta' C`` (rows layout) the posterior mean is (B3)
  ``B = (1/alpha) I + w^2 Delta' C S``. Unobserved or empty rows get an
  identity block (their residual rows are zero, so they contribute nothing).
  """
  gram, = _products([directions], [(0, 0)])
  return _coefficients(gram, prior_scale, noise_scale, num_observed)


def _coefficients(gram: Array, prior_scale: Array, noise_scale: Array,
                  num_observed: Optional[Array]) -> Array:
  """`posterior_coefficients` from the Gram matrix ``S S'`` (rows layout)."""
  return call_in_at_least_float32(jnp.linalg.inv,
                                  _gram_system(gram, prior_scale, noise_scale, num_observed))


def _gram_mask(gram: Array, num_observed: Optional[Array]) -> Array:
  """The mask of `observation_mask` as 0/1 in ``gram``'s dtype, from the
  diagonal of the Gram matrix ``S S'`` (no second pass over ``S``)."""
  return _mask(jnp.diagonal(gram), num_observed).astype(gram.dtype)


def _gram_system(gram: Array, prior_scale: Array, noise_scale: Array,
                 num_observed: Optional[Array]) -> Array:
  """``C^{-1} = w^2 S S' + lam^2 diag(S S')`` of (B3), masked (identity rows
  for unobserved or empty observations), from the Gram matrix ``S S'``."""
  # Mask the (M, M) Gram matrix, not the (M, n) directions (no n-sized copy).
  maskf = _gram_mask(gram, num_observed)
  gram = gram * maskf[:, None] * maskf[None, :]
  diag = jnp.diagonal(gram)
  return (jnp.square(prior_scale) * gram
          + jnp.diag(jnp.square(noise_scale) * diag + (1.0 - maskf)))


def posterior_matvec(v: Array, directions: Array, residuals: Array, coefficients: Array,
                     alpha: Array, prior_scale: Array) -> Array:
  r"""``B v = v / alpha + w^2 X S' v`` with ``X = Delta' C`` — the posterior mean (B3)."""
  sv = _products([directions, v[None]], [(0, 1)])[0][:, 0]
  return v / alpha + jnp.square(prior_scale) * ((coefficients @ sv) @ residuals)


def posterior_inverse_matvec(g: Array, directions: Array, residuals: Array,
                             coefficients: Array, alpha: Array, prior_scale: Array) -> Array:
  r"""``B^{-1} g`` by Woodbury (W1), matrix-free: O(n M) work, no n x n matrix.

  ``d = alpha g - alpha^2 w^2 X (I + alpha w^2 S'X)^{-1} S' g``, ``X = Delta' C``.
  This is the active direction of the posterior observations (spec,
  "Observations": ``d = B^{-1} g``, then ``y = H d``). For several blocks at
  once, with ``C`` from the noise scale, see `posterior_inverse_matvec_blocks`.
  """
  return _inverse_matvecs([g], [directions], [residuals], [alpha], [prior_scale],
                          coefficients=[coefficients])[0]


def posterior_inverse_matvec_blocks(
    gs: Sequence[Array], directions: Sequence[Array], residuals: Sequence[Array],
    alphas: Sequence[Array], prior_scales: Sequence[Array], noise_scales: Sequence[Array],
    num_observed: Optional[Array] = None) -> list:
  r"""`posterior_inverse_matvec` of each block, with ``C`` of (B3) computed on the way.

  Equals ``[posterior_inverse_matvec(g_b, S_b, Delta_b, posterior_coefficients(S_b,
  w_b, lam_b, num_observed), alpha_b, w_b) for each block b]``, with fewer
  launches: the small ``M x M`` algebra of blocks of equal shapes and dtypes
  runs as one batched call (`_map_blocks`) instead of one per block, and it is
  one solve: ``C`` of (B3) is not formed, ``x = C z`` of (W1) is
  ``(C^{-1} + alpha w^2 S Delta')^{-1} S g`` (rows layout). (``S S'`` is formed apart from
  ``S Delta'`` and ``S g``: one pass of 45 row products over mnist_mlp's long
  rows made XLA:CPU's posterior step ~10% slower than two of 15 and 30.)
  Rows from ``num_observed`` on are ignored, whatever finite values they hold
  (every Gram block is masked): a caller's buffers may keep stale rows.
  """
  return _inverse_matvecs(gs, directions, residuals, alphas, prior_scales,
                          noise_scales=noise_scales, num_observed=num_observed)


def _inverse_matvecs(gs, directions, residuals, alphas, prior_scales, *, coefficients=None,
                     noise_scales=None, num_observed=None) -> list:
  """(W1) per block; ``C`` given (``coefficients``) or from (B3) (``noise_scales``)."""
  own_c = coefficients is None
  small = []
  for b, (g, s, res) in enumerate(zip(gs, directions, residuals)):
    grams = _products([s, res, g[None]], [(0, 1), (0, 2)])
    c = _products([s], [(0, 0)])[0] if own_c else coefficients[b]
    extra = noise_scales[b] if own_c else 0.0
    small.append((None, (grams[0], grams[1][:, 0], c, alphas[b], prior_scales[b], extra)))

  def weights(_, s_delta, s_g, c, alpha, prior_scale, noise_scale):
    # ``x = C z`` with z of (W1): d = alpha g - alpha^2 w^2 x Delta (rows).
    a = alpha * jnp.square(prior_scale)
    if own_c:
      # With C = K^{-1} (K of (B3), `_gram_system`): C (I + a S'X)^{-1} =
      # K^{-1} (I + a S'Delta' K^{-1})^{-1} = (K + a S'Delta')^{-1}, so x is
      # one M x M solve, where forming C took an inverse and then a solve
      # (two LU factorizations: on a GPU, library calls outside the step's
      # CUDA graph, and a while loop each to apply the pivots).
      k = _gram_system(c, prior_scale, noise_scale, num_observed)
      maskf = _gram_mask(c, num_observed)
      return call_in_at_least_float32(
          jnp.linalg.solve, k + a * s_delta * maskf[:, None] * maskf[None, :], s_g * maskf)
    sx = s_delta @ c                                     # S'X, (M, M)
    m = sx.shape[0]
    z = call_in_at_least_float32(jnp.linalg.solve, jnp.eye(m, dtype=sx.dtype) + a * sx, s_g)
    return c @ z

  xs = _map_blocks(weights, small)
  # ``x Delta`` as a sum of M scaled rows, fused into one elementwise pass:
  # as a product (``x @ Delta``) or a reduction over the rows, XLA:CPU copied
  # each block's rows first when they were slices of a larger buffer (the
  # transform's packed rows: 27 MB per posterior step on mnist_mlp), as its
  # dot and library reduction fusions take no slices.
  return [alpha * g - jnp.square(alpha) * jnp.square(w)
          * sum((x[i] * res[i] for i in range(res.shape[0])), jnp.zeros_like(g))
          for g, res, x, alpha, w in zip(gs, residuals, xs, alphas, prior_scales)]


def low_rank_factors(directions: Array, residuals: Array, coefficients: Array,
                     alpha: Array, prior_scale: Array, rank: int) -> Tuple[Array, Array]:
  r"""Top-``rank`` left singular vectors and values of the posterior mean on span[X, S] (L1).

  (L1) asks for an orthonormal basis ``Z`` of span[X, S] (``n x 2M``) and the
  SVD of the small ``K = Z'BZ = (1/alpha) I + w^2 (Z'X)(Z'S)'``; then
  ``U = Z U_K[:, :k]``. These are the top singular pairs of ``B`` within the
  span, not always of the whole ``n x n`` ``B``: outside the span ``B`` is
  ``(1/alpha) I``, so where ``1/alpha`` exceeds some of the span's singular
  values, ``B``'s own top ``k`` would include ``1/alpha`` (any direction
  outside the span) in their place. For ``k <= M`` the two coincide: ``K`` is
  ``(1/alpha) I`` plus a rank-``M`` term, so (Weyl) its top ``M`` singular values
  are ``>= 1/alpha``, and the preconditioner applies ``alpha`` outside ``U``. Its
  singular values beyond ``M`` are ``<= 1/alpha`` and unbounded below (the
  transform refuses ``rank > M``). Here ``Z`` is never formed: with ``A = [X S]`` and its
  ``2M x 2M`` Gram matrix ``G = A'A`` (columns equilibrated,
  ``G = D Ghat D``, ``Ghat = V diag(mu) V'``), ``Z = A T`` with
  ``T = D^{-1} V diag(mu)^{-1/2}``, so ``Z'X = T' G[:, :M]`` and
  ``Z'S = T' G[:, M:]`` are small products, and the only ``n``-sized work is
  the three Gram blocks of the stored rows (``Delta Delta'``, ``Delta S'``,
  ``S S'``; ``X = Delta' C`` is not formed) and ``U' = (T U_K[:, :k])' A'``. Directions with ``mu <= sqrt(eps) max(mu)``
  (columns of ``A`` within about ``eps^{1/4}`` of the span of the others,
  e.g. fewer parameters than ``2M``) are dropped from ``Z``. While ``A`` spans
  less than ``R^n``, a dropped slot's share of ``K`` is the prior's ``1/alpha``
  (B's value outside the span) and its row of ``U`` is zero, which leaves that
  direction unpreconditioned; beyond the ``n - rank(A)`` dimensions outside
  the span (``n < 2M``) a dropped slot gets ``0``, so it cannot displace a
  true singular value. A last symmetric re-orthonormalisation
  of the ``k`` rows (``U <- (UU')^{-1/2} U``, a ``k x k`` Gram) removes the
  Gram matrix's rounding from their orthonormality.

  Cost and memory (why not a QR of ``A``): no ``n``-sized temporary but the
  ``k x n`` result, and ``O(n M^2)`` flops; a thin QR needs ``[X S]`` and ``Z`` as ``n x 2M``
  temporaries (on XLA:CPU the QR's scratch memory made every step of the
  transform slower, taken or not: see the transform's "Structure" note).

  Returns ``U`` as ROWS, shape ``(k, n)``, and ``sigma`` of shape ``(k,)``,
  ``k = min(rank, n, 2M)``. No iterative eigensolver and no ``n x n`` matrix.
  """
  return _factors([directions], [residuals], [alpha], [prior_scale], rank,
                  coefficients=[coefficients])[0]


def low_rank_factors_blocks(
    directions: Sequence[Array], residuals: Sequence[Array], alphas: Sequence[Array],
    prior_scales: Sequence[Array], noise_scales: Sequence[Array], rank: int,
    num_observed: Optional[Array] = None) -> list:
  r"""`low_rank_factors` of each block, with ``C`` of (B3) computed on the way.

  Equals ``[low_rank_factors(S_b, Delta_b, posterior_coefficients(S_b, w_b,
  lam_b, num_observed), alpha_b, w_b, rank) for each block b]`` (a list of
  ``(U_b, sigma_b)``), with fewer passes and launches: each block's rows are
  read once for the three Gram blocks (``S S'`` serving both ``C`` and
  ``A'A``), and the small algebra of blocks of equal shapes, dtypes and ``k``
  (the inverse of (B3), the ``2M x 2M`` eigendecomposition and SVD of (L1), the
  ``k x k`` re-orthonormalisation) runs as one batched call per stage
  (`_map_blocks`) instead of one per block. Rows from ``num_observed`` on are
  ignored, whatever finite values they hold (every Gram block is masked).
  """
  return _factors(directions, residuals, alphas, prior_scales, rank,
                  noise_scales=noise_scales, num_observed=num_observed)


def _factors(directions, residuals, alphas, prior_scales, rank, *, coefficients=None,
             noise_scales=None, num_observed=None) -> list:
  """(L1) per block; ``C`` given (``coefficients``) or from (B3) (``noise_scales``)."""
  own_c = coefficients is None
  small = []
  for b, (s, res) in enumerate(zip(directions, residuals)):
    m, n = s.shape
    # X' = C' Delta (M x n) is never formed either: its Gram blocks come from
    # those of the stored rows, X'X = C'(Delta Delta')C and X'S = C'(Delta S').
    g_dd, g_ds, g_ss = _products([res, s], [(0, 0), (0, 1), (1, 1)])
    extra = noise_scales[b] if own_c else coefficients[b]
    small.append((min(rank, n, 2 * m),
                  (g_dd, g_ds, g_ss, extra, alphas[b], prior_scales[b], np.int32(n))))

  def span_factors(k, g_dd, g_ds, g_ss, extra, alpha, prior_scale, n):
    if own_c:
      maskf = _gram_mask(g_ss, num_observed)
      both = maskf[:, None] * maskf[None, :]
      g_dd, g_ds, g_ss = g_dd * both, g_ds * both, g_ss * both
      c = _coefficients(g_ss, prior_scale, extra, num_observed)
    else:
      c = extra
    a, b, sigma = _span_factors(g_dd, g_ds, g_ss, c, alpha, prior_scale, n, k)
    return c @ a, b, sigma

  factors = _map_blocks(span_factors, small)
  # U' = a' Delta + b' S, (k, n), written as k rows of 2M scaled-row sums:
  # one fused loop per row and no (k, n) temporaries besides the result (as
  # two products plus a sum it held three; the largest branch sets the scratch
  # size of every step, see the transform's "Structure" note).
  us = []
  for s, res, (a, b, _) in zip(directions, residuals, factors):
    m, k = b.shape
    us.append(jnp.stack([sum(a[i, j] * res[i] + b[i, j] * s[i] for i in range(m))
                         for j in range(k)]) if k else jnp.zeros((0, s.shape[1]), s.dtype))
  # (U U')^{-1/2} U: exact orthonormality of the rows (zero rows stay zero).
  inv_sqrts = _map_blocks(lambda _, gram: _inverse_sqrt(gram),
                          [(None, (_products([u], [(0, 0)])[0],)) for u in us])
  return [(q @ u, sigma) for q, u, (_, _, sigma) in zip(inv_sqrts, us, factors)]


def _span_factors(g_dd: Array, g_ds: Array, g_ss: Array, coefficients: Array, alpha: Array,
                  prior_scale: Array, n: Array, k: int) -> Tuple[Array, Array, Array]:
  """The small part of (L1): ``U = Delta' (C a) + S' b`` and ``sigma``, from Gram blocks.

  Returns ``a`` (the weights of ``X``'s columns), ``b`` (of ``S``'s), both
  ``(M, k)``, and ``sigma`` ``(k,)``; see `low_rank_factors` for the steps.
  """
  m = g_ss.shape[0]
  dtype = g_ss.dtype
  g_xx = coefficients.T @ g_dd @ coefficients
  g_xs = coefficients.T @ g_ds
  gram = jnp.block([[g_xx, g_xs], [g_xs.T, g_ss]])       # A'A, (2M, 2M)
  norms = jnp.sqrt(jnp.maximum(jnp.diagonal(gram), 0.0))
  d_inv = jnp.where(norms > 0, 1.0 / jnp.where(norms > 0, norms, 1.0), 0.0)
  mu, v = call_in_at_least_float32(jnp.linalg.eigh, gram * d_inv[:, None] * d_inv[None, :])
  keep = mu > jnp.sqrt(jnp.finfo(dtype).eps) * jnp.max(mu)
  t = d_inv[:, None] * v * jnp.where(keep, jax.lax.rsqrt(jnp.where(keep, mu, 1.0)), 0.0)
  zx = t.T @ gram[:, :m]                                 # Z'X, (2M, M)
  zs = t.T @ gram[:, m:]                                 # Z'S, (2M, M)
  # A dropped slot stands for a direction outside span[X, S], where B is the
  # prior's (1/alpha) I -- but only n - rank(A) such directions exist: with
  # fewer parameters than 2M (a small bias) the span is all of R^n, and a
  # 1/alpha there would be a fake singular value displacing a true one.
  outside = (jnp.cumsum(~keep, dtype=jnp.int32)
             <= n - jnp.sum(keep, dtype=jnp.int32))    # n: int32, also under vmap
  k_mat = (jnp.diag(jnp.where(keep | outside, 1.0 / alpha, 0.0).astype(dtype))
           + jnp.square(prior_scale) * (zx @ zs.T))
  u_k, sigma, _ = call_in_at_least_float32(jnp.linalg.svd, k_mat)
  coef = t @ u_k[:, :k]                                  # U = A coef, (2M, k)
  return coef[:m], coef[m:], sigma[:k]


def _inverse_sqrt(gram: Array) -> Array:
  """``gram^{-1/2}`` of a PSD Gram matrix, its tiny eigenvalues dropped (zero rows stay zero)."""
  dtype = gram.dtype
  lam, w = call_in_at_least_float32(jnp.linalg.eigh, gram)
  ok = lam > jnp.sqrt(jnp.finfo(dtype).eps) * jnp.maximum(jnp.max(lam), 1.0)
  return (w * jnp.where(ok, jax.lax.rsqrt(jnp.where(ok, lam, 1.0)), 0.0)) @ w.T


def _map_blocks(fn: Callable[..., Any], blocks: Sequence[Tuple[Hashable, Tuple[Any, ...]]]
                ) -> list:
  """``[fn(static, *args) for static, args in blocks]``, equal blocks batched.

  Blocks whose ``static`` and whose arguments' shapes and dtypes agree are
  stacked and run as one ``jax.vmap``-ed call: per-block small linear algebra
  (``inv``, ``solve``, ``eigh``, ``svd`` of ``M x M`` matrices) becomes one
  batched call per group, which GPU runtimes issue as one batched library
  launch (outside CUDA graphs each launch costs host time) instead of one per
  parameter tensor. A block alone in its group is called as it is.
  """
  groups: dict = {}
  for b, (static, args) in enumerate(blocks):
    key = (static, tuple((jnp.shape(x), jnp.result_type(x)) for x in args))
    groups.setdefault(key, []).append(b)
  out: list = [None] * len(blocks)
  for members in groups.values():
    static = blocks[members[0]][0]
    if len(members) == 1:
      out[members[0]] = fn(static, *blocks[members[0]][1])
      continue
    stacked = [jnp.stack([jnp.asarray(blocks[b][1][i]) for b in members])
               for i in range(len(blocks[members[0]][1]))]
    result = jax.vmap(lambda *args: fn(static, *args))(*stacked)
    for j, b in enumerate(members):
      out[b] = jax.tree_util.tree_map(lambda r: r[j], result)
  return out


def preconditioner_scales(sigma: Array, alpha: Array, form: str = "inverse") -> Array:
  r"""Per-direction factors ``c`` of ``g~ = (I - UU')g + U diag(c) U'g``.

  ``form="inverse"`` (C2): ``c = 1 / (alpha sigma)``; ``form="seed"`` (C1):
  ``c = sigma^{-1/2}`` (the seed code's ``1/D`` with ``D = sqrt(svds values)``).
  Non-positive or non-finite ``sigma`` (a degenerate estimate) give ``c = 1``:
  that direction is left unpreconditioned.
  """
  if form not in FORMS:
    raise ValueError(f"form must be one of {FORMS}; got {form!r}.")
  ok = jnp.isfinite(sigma) & (sigma > 0)
  safe = jnp.where(ok, sigma, 1.0)
  if form == "inverse":
    c = 1.0 / (alpha * safe)
  else:
    c = jax.lax.rsqrt(safe)
  return jnp.where(ok & jnp.isfinite(c), c, 1.0)


def low_rank_coefficients(g: Array, vectors: Union[Array, Sequence[Array]],
                          scales: Array) -> Array:
  r"""The ``k`` coefficients ``(c - 1) * U'g`` of `low_rank_precondition` (C1/C2).

  ``vectors``: ``U``'s ``k`` rows, as a ``(k, n)`` array or a sequence of ``k``
  arrays ``(n,)``; ``scales``: ``c``. O(n k) work.

  Non-finite values show here: if ``g`` has a NaN or infinite entry, every
  ``U_j'g`` is NaN or infinite, whatever the (finite) row ``U_j``, zero rows
  included (``inf * 0`` is NaN in IEEE arithmetic). So with finite ``U`` and
  ``c`` these ``k`` numbers are finite exactly when ``g`` is (up to overflow
  of a sum near the floating-point maximum, which reads as non-finite).
  """
  # ``U_j'g`` as k fused multiply-reductions, not a gemv ``U @ g``: the gemv
  # made XLA:CPU copy the gradient into a column layout first, a params-sized
  # temporary that pushed the step's scratch past glibc's 32 MiB mmap
  # threshold (~3000 page faults per step). Rows given separately are read in
  # place; rows sliced out of a ``(k, n)`` array are copied first, because
  # XLA:CPU's dot fusions take no slices (mnist_mlp's preconditioned step 7.3
  # -> 6.9 ms).
  k = len(vectors)
  ug = jnp.stack([jnp.vdot(vectors[j], g) for j in range(k)]) if k else jnp.zeros((0,), g.dtype)
  return (scales - 1.0) * ug


def low_rank_precondition(g: Array, vectors: Union[Array, Sequence[Array]],
                          scales: Optional[Array] = None, *,
                          coefficients: Optional[Array] = None) -> Array:
  r"""``g~ = (I - UU')g + U diag(c) U'g = g + U ((c - 1) * U'g)`` (C1/C2).

  ``vectors``: ``U``'s ``k`` orthonormal rows, as a ``(k, n)`` array or a
  sequence of ``k`` arrays ``(n,)`` (the faster form, see
  `low_rank_coefficients`); ``scales``: ``c``; or, instead of ``scales``,
  ``coefficients``: ``(c - 1) * U'g`` from `low_rank_coefficients` (computed
  once when the caller needs them too). O(n k) work.
  """
  if (scales is None) == (coefficients is None):
    raise TypeError("low_rank_precondition: pass exactly one of `scales` and `coefficients`.")
  coef = low_rank_coefficients(g, vectors, scales) if coefficients is None else coefficients
  # ``sum_j coef_j U_j`` elementwise, which XLA fuses with the addition of ``g``
  # and with whatever consumes the result (the parameter update): one pass
  # over memory instead of three (0.51 -> 0.32 ms at n = 784000, k = 2).
  out = g
  for j in range(len(vectors)):
    out = out + coef[j] * vectors[j]
  return out
