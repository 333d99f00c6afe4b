r"""Krylov eigen-solvers for any symmetric matvec: Lanczos and block Lanczos.

Lanczos (Lanczos 1950; Golub & Van Loan, *Matrix Computations*, 4th ed.,
§10.1) builds an orthonormal basis ``Q_j`` of the Krylov space
``span{v, Av, ..., A^{j-1} v}`` and the tridiagonal ``T_j = Q_j' A Q_j``; the
eigenpairs ``(theta, Q_j y)`` of ``T_j`` (Ritz pairs) approximate the extreme
eigenpairs of ``A``. Block Lanczos (Golub & Underwood 1977; Golub & Van Loan
§10.3.6) starts from ``b`` vectors ``V`` and spans ``{V, AV, A^2 V, ...}``: a
Krylov space from one vector holds one eigenvector per distinct eigenvalue, one
from ``b`` vectors up to ``b`` per eigenvalue, so eigenvalues of multiplicity
``<= b`` are found with their multiplicity.

Both keep a fixed ``(m+1) x D`` (resp. ``(m+1) b x D``) basis buffer inside a
``lax`` loop and re-orthogonalise fully against it (classical Gram-Schmidt,
repeated where it cancelled: `_project_out`): ``O(m^2 D)`` (resp. ``O(m^2 b^2
D)``) extra work, memory-bound (each pass reads the buffer); meant for ``m b``
in the tens. On mnist_mlp's 1.3M parameters (CPU) the 20-step Lanczos takes
~5x its 20 GGN products (``benchmarks/curvature.py``).
"""

from __future__ import annotations

import dataclasses
from typing import Any, Callable, NamedTuple, Optional, Tuple

import jax
import jax.numpy as jnp
from jax.flatten_util import ravel_pytree

from curvax import _checks
from curvax._dtypes import at_least_float32

Array = jax.Array


@dataclasses.dataclass(frozen=True)
class _FlatOperator:
  """``matvec`` on flat vectors in the working dtype of the recurrence.

  The recurrences run in at least float32: with bfloat16 vectors the
  breakdown test (a remainder against ``100 eps ||A q||``) and the
  re-orthogonalisation fail (a 6 x 6 test matrix's top eigenvalue 8 came out
  as 1.76). ``matvec`` sees pytrees in ``v0``'s dtypes; results go back to them
  (``out_dtype``).
  """
  mv: Callable[[Array], Array]
  unravel: Callable[[Array], Any]
  out_dtype: Any
  dtype: Any
  tiny: Array

  @classmethod
  def of(cls, matvec: Callable[[Any], Any], v0: Any) -> "_FlatOperator":
    flat0, unravel = ravel_pytree(v0)
    out_dtype = flat0.dtype
    dtype = at_least_float32(out_dtype)
    # An array of dtype: numpy < 2 makes a float32 scalar times an int float64,
    # which strict promotion refuses against the float32 norms.
    tiny = jnp.asarray(jnp.finfo(dtype).eps, dtype)

    def mv(x):
      out = matvec(unravel(x.astype(out_dtype)))
      _checks.check_tree_like(out, v0, "matvec(v)", "v0")
      return ravel_pytree(out)[0].astype(dtype)

    return cls(mv, unravel, out_dtype, dtype, tiny)


def _check_iterations(num_iterations: Any, rtol: Optional[float], atol: float) -> None:
  if not isinstance(num_iterations, int) or num_iterations < 1:
    raise ValueError(f"`num_iterations` must be a positive int; got {num_iterations!r}.")
  if rtol is not None and not (rtol >= 0 and atol >= 0):
    raise ValueError(f"`rtol` and `atol` must be >= 0; got {rtol!r}, {atol!r}.")


def _check_num_converged(num_converged: Any, size: int) -> None:
  if not isinstance(num_converged, int) or not 1 <= num_converged <= size:
    raise ValueError(f"`num_converged` must be an int in [1, {size}]; got {num_converged!r}.")


# Daniel, Gragg, Kaufman & Stewart (1976): a second Gram-Schmidt pass is needed
# only where the first cancelled more than 1 - 1/sqrt(2) of a vector's norm.
_DGKS = 0.7071067811865476


def _project_out(w: Array, q: Array) -> Tuple[Array, Array]:
  """The rows of ``w`` (``b x D``) less their components along the rows of
  ``q`` (orthonormal or zero), by classical Gram-Schmidt, with the second pass
  that makes it orthogonal to working precision where the first cancelled
  (DGKS's criterion; "twice is enough", Giraud et al. 2005). Returns the rows
  and the first pass's coefficients ``q w'`` (``K x b``).

  Each pass reads ``q`` twice: re-orthogonalisation is memory-bound, and
  skipping an unneeded second pass halves it. The products are written as
  einsums with the long axis contracted last: XLA:CPU ran ``w @ q.T`` (``4 x
  1.3M`` times ``1.3M x 25``) ~10x slower than ``q @ w.T``.
  """
  coeffs = jnp.einsum("kd,bd->kb", q, w)
  out = w - jnp.einsum("kb,kd->bd", coeffs, q)
  again = jnp.any(jnp.linalg.norm(out, axis=1) < _DGKS * jnp.linalg.norm(w, axis=1))
  out = jax.lax.cond(
      again, lambda v: v - jnp.einsum("kb,kd->bd", jnp.einsum("kd,bd->kb", q, v), q),
      lambda v: v, out)
  return out, coeffs


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


def _decoupled(t: Array, active: Array) -> Array:
  """Symmetric ``t`` restricted to its ``active`` rows and columns, the others
  moved onto a diagonal below every eigenvalue of the active block
  (Gershgorin), so that its eigenvalues sort first, with no spurious zeros
  among them (zero padding would put zeros above a negative definite block)."""
  t = jnp.where(active[:, None] & active[None, :], t, 0.0)
  diag = jnp.diagonal(t)
  radius = jnp.sum(jnp.abs(t), axis=1) - jnp.abs(diag)
  floor = jnp.min(jnp.where(active, diag - radius, jnp.inf)) - 1.0
  return t + jnp.diag(jnp.where(active, 0.0, floor))


def _tridiagonal(alphas: Array, betas: Array, size: Array) -> Array:
  """The leading ``size x size`` tridiagonal block of ``(alphas, betas)``, padded to
  ``m x m`` (`_decoupled`), so that the block's eigenvalues are the ``size`` largest."""
  m = alphas.shape[0]
  off = betas[:m - 1]
  t = jnp.diag(alphas) + jnp.diag(off, 1) + jnp.diag(off, -1)
  return _decoupled(t, jnp.arange(m) < size)


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
  flat0 = ravel_pytree(v0)[0]
  dim = flat0.shape[0]
  _check_iterations(num_iterations, rtol, atol)
  m = min(num_iterations, dim)
  _check_num_converged(num_converged, m)
  op = _FlatOperator.of(matvec, v0)
  dtype, tiny, mv = op.dtype, op.tiny, op.mv

  def step(i, q, alphas, betas):
    w = mv(q[i])
    w_norm = jnp.linalg.norm(w)
    alpha = jnp.dot(w, q[i])
    # The three-term recurrence removes the large components (along q_i and
    # q_{i-1}); full re-orthogonalisation then removes what round-off left
    # along every previous vector (the rows of q beyond i are zero).
    w = w - alpha * q[i] - jnp.where(i > 0, betas[i - 1], 0.0) * q[i - 1]
    w = _project_out(w[None], q)[0][0]
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
  vectors = jnp.einsum("kd,kr->rd", q[:m], y).astype(op.out_dtype)
  return LanczosResult(theta.astype(op.out_dtype), jax.vmap(op.unravel)(vectors),
                       alphas.astype(op.out_dtype), betas.astype(op.out_dtype), iterations)


class BlockLanczosResult(NamedTuple):
  """Block Lanczos output (``m`` block steps of ``b`` vectors: ``s = m b``).

  Attributes:
    ritz_values: ``(s,)`` eigenvalues of ``Q' A Q`` on the basis built,
      descending; NaN beyond ``rank``.
    ritz_vectors: pytree with leading axis ``s``, the matching Ritz vectors
      ``Q y`` (unit, mutually orthogonal); zero beyond ``rank``.
    residual_norms: ``(s,)``, ``||A x - theta x||`` of each Ritz pair, computed
      from the last block's remainder (no further products); an eigenvalue of
      ``A`` lies within that distance of ``theta`` (Parlett, *The Symmetric
      Eigenvalue Problem*, Thm. 4.5.1). NaN beyond ``rank``. As `lanczos`'
      ``beta_j |y_j|``, this is the residual of the recurrence in exact
      arithmetic on the computed basis: once it falls below round-off
      (``~ eps ||A||`` in the working dtype) the residual of the returned
      vectors stays at that level (in float64 the two agree to ~1e-15).
    iterations: block steps taken (each ``b`` products): up to the first
      breakdown (every new basis vector dependent: an invariant space) or, with
      a tolerance, up to convergence.
    rank: the basis size, the number of Ritz values: ``b`` per step less the
      vectors dropped as dependent.
  """
  ritz_values: Array
  ritz_vectors: Any
  residual_norms: Array
  iterations: Array
  rank: Array


def _orthonormalize_rows(w: Array, scale: Array, tiny: Array) -> Array:
  """The rows of ``w`` (already orthogonal to the basis) made orthonormal to
  each other, one by one (modified Gram-Schmidt, twice). A row whose remainder is
  ``<= 100 eps scale`` lies in the span already and is dropped (a zero row):
  deflation."""
  rows = []
  for j in range(w.shape[0]):  # static: b is small; vector operations, no b x D buffer
    x = w[j]
    for _ in range(2):
      for r in rows:
        x = x - jnp.dot(r, x) * r
    norm = jnp.linalg.norm(x)
    ok = norm > 100 * tiny * scale[j]
    rows.append(jnp.where(ok, x / jnp.where(ok, norm, 1.0), 0.0))
  return jnp.stack(rows)


def _rayleigh_ritz(c: Array, filled: Array, b: int, iterations: Array,
                   remainder_gram: Array) -> Tuple[Array, Array, Array, Array]:
  """Ritz values (descending, NaN beyond the rank), their coefficients ``y``,
  residual norms and the rank, from the product coefficients ``c``.

  Column block ``i`` of ``c`` holds ``Q' A Q_i`` computed at step ``i``, when the
  blocks after ``i + 1`` were still zero: the block upper triangle of ``T = Q'
  A Q``, mirrored (``A`` symmetric). Dropped and unbuilt basis vectors are
  decoupled (`_decoupled`), so they sort last instead of adding spurious
  zeros. With ``A Q = Q T + E``, ``E`` nonzero
  in the last block only (its remainder ``R``, Gram ``R R'``), the residual of
  ``(theta, Q y)`` is ``||R' y_last||``.
  """
  size = c.shape[0]
  block = jnp.arange(size) // b
  active = (block < iterations) & filled[:size]
  upper = block[:, None] < block[None, :]
  t = jnp.where(upper, c, jnp.where(upper.T, c.T, 0.5 * (c + c.T)))
  theta, y = jnp.linalg.eigh(_decoupled(t, active))
  theta, y = theta[::-1], y[:, ::-1]
  rank = jnp.sum(active)
  real = jnp.arange(size) < rank
  y = jnp.where(real[None, :] & active[:, None], y, 0.0)
  last = jax.lax.dynamic_slice_in_dim(y, (iterations - 1) * b, b, axis=0)
  residual = jnp.sqrt(jnp.maximum(jnp.sum(last * (remainder_gram @ last), axis=0), 0.0))
  return (jnp.where(real, theta, jnp.nan), y, jnp.where(real, residual, jnp.nan), rank)


def block_lanczos(matvec: Callable[[Any], Any], v0: Any, num_iterations: int, *,
                  rtol: Optional[float] = None, atol: float = 0.0,
                  num_converged: int = 1) -> BlockLanczosResult:
  r"""Block Lanczos with full re-orthogonalisation: at most ``num_iterations`` block steps.

  Eigenvalues of multiplicity up to ``b`` (the block size) are found as often as
  they occur; `lanczos` from one vector finds each once (a second copy grows
  only out of round-off, many steps later).
  Each step applies ``matvec`` to ``b`` vectors at once (``jax.vmap``: batched
  products, e.g. a GGN's JVPs and VJPs on ``b`` tangents in one pass).
  The Ritz pairs are the eigenpairs of ``T = Q' A Q`` (Rayleigh-Ritz on the
  basis ``Q``; Golub & Van Loan §10.3.6), with ``T`` assembled from the
  coefficients of the re-orthogonalisation, so no product is spent on it.

  Args:
    matvec: a symmetric linear map on pytrees shaped like one row of ``v0``.
    v0: starting block: a pytree whose leaves have a leading axis ``b`` (``b``
      linearly independent vectors, e.g. Gaussian; dependent ones are dropped).
    num_iterations: ``m`` (static), block steps; clipped to ``D``.
    rtol, atol: with ``rtol``, stop after a step once each of the top
      ``num_converged`` Ritz pairs has ``||A x - theta x|| <= atol + rtol
      |theta|`` (`BlockLanczosResult.residual_norms`), or once the space is
      invariant. Without ``rtol``, all ``m`` steps run.
    num_converged: how many top Ritz pairs the tolerance applies to.

  Cost: ``m b`` products, ``O(m^2 b^2 D)`` for the re-orthogonalisation,
  ``O((m b)^3)`` per eigendecomposition (one per step with a tolerance, one
  without); memory: ``(m + 1) b`` vectors.
  """
  leaves = jax.tree_util.tree_leaves(v0)
  if not leaves or any(jnp.ndim(leaf) < 1 for leaf in leaves):
    raise ValueError("`v0` must be a nonempty pytree whose leaves have a leading block axis.")
  b = jnp.shape(leaves[0])[0]
  if any(jnp.shape(leaf)[0] != b for leaf in leaves):
    raise ValueError("`v0`'s leaves must share their leading (block) axis; got sizes "
                     f"{sorted({jnp.shape(leaf)[0] for leaf in leaves})}.")
  if b < 1:
    raise ValueError("`v0` must hold at least one vector (leading axis >= 1).")
  _check_iterations(num_iterations, rtol, atol)
  first = jax.tree_util.tree_map(lambda leaf: leaf[0], v0)
  op = _FlatOperator.of(matvec, first)
  dtype, tiny = op.dtype, op.tiny
  flat0 = jax.vmap(lambda v: ravel_pytree(v)[0])(v0).astype(dtype)
  dim = flat0.shape[1]
  # Dropped vectors shrink later blocks, so ceil(D / b) steps may not span R^D;
  # each step before a breakdown adds a vector, so D steps always do.
  m = min(num_iterations, dim)
  size = m * b
  _check_num_converged(num_converged, size)
  mv = jax.vmap(op.mv)

  def step(i, q, c, filled):
    x = jax.lax.dynamic_slice_in_dim(q, i * b, b, axis=0)
    w = mv(x)
    scale = jnp.linalg.norm(w, axis=1)
    # The first pass's coefficients are Q' A X: column block i of T.
    remainder, coeffs = _project_out(w, q)
    c = jax.lax.dynamic_update_slice_in_dim(c, coeffs[:size], i * b, axis=1)
    rows = _orthonormalize_rows(remainder, scale, tiny)
    new = jnp.any(rows != 0, axis=1)
    q = jax.lax.dynamic_update_slice_in_dim(q, rows, (i + 1) * b, axis=0)
    filled = jax.lax.dynamic_update_slice_in_dim(filled, new, (i + 1) * b, axis=0)
    gram = jnp.einsum("bd,cd->bc", remainder, remainder)
    return q, c, filled, gram, ~jnp.any(new)

  start = _orthonormalize_rows(flat0, jnp.linalg.norm(flat0, axis=1), tiny)
  q = jnp.zeros(((m + 1) * b, dim), dtype).at[:b].set(start)
  filled = jnp.zeros(((m + 1) * b,), bool).at[:b].set(jnp.any(start != 0, axis=1))
  c = jnp.zeros((size, size), dtype)
  gram = jnp.zeros((b, b), dtype)
  if rtol is None:
    def body(i, carry):
      q, c, filled, gram, broken = carry
      q, c, filled, new_gram, stop = step(i, q, c, filled)
      # After a breakdown every step multiplies zeros: keep the last remainder.
      gram = jnp.where(broken, gram, new_gram)
      return q, c, filled, gram, broken | stop

    q, c, filled, gram, _ = jax.lax.fori_loop(0, m, body, (q, c, filled, gram, False))
    iterations = jnp.sum(jnp.any(filled[:size].reshape(m, b), axis=1))
  else:
    def body(carry):
      j, q, c, filled, gram, _ = carry
      q, c, filled, gram, broken = step(j, q, c, filled)
      j = j + 1
      theta, _, residual, _ = _rayleigh_ritz(c, filled, b, j, gram)
      top = slice(0, num_converged)
      converged = jnp.all(residual[top] <= atol + rtol * jnp.abs(theta[top]))
      return j, q, c, filled, gram, converged | broken

    iterations, q, c, filled, gram, _ = jax.lax.while_loop(
        lambda carry: (carry[0] < m) & ~carry[5], body,
        (jnp.asarray(0), q, c, filled, gram, False))
  theta, y, residual, rank = _rayleigh_ritz(c, filled, b, iterations, gram)
  vectors = jnp.einsum("kd,kr->rd", q[:size], y).astype(op.out_dtype)
  return BlockLanczosResult(theta.astype(op.out_dtype), jax.vmap(op.unravel)(vectors),
                            residual.astype(op.out_dtype), iterations, rank)


def top_eigenpairs(matvec: Callable[[Any], Any], params: Any, key: Array,
                   k: int = 1, num_iterations: int = 20, *,
                   rtol: Optional[float] = None, atol: float = 0.0,
                   warm_start: Optional[Any] = None,
                   block_size: int = 1) -> Tuple[Array, Any]:
  """Largest ``k`` eigenvalues (descending) and their Ritz vectors (a pytree
  with leading axis ``k``) of a symmetric matvec by (block) Lanczos.

  Starts from a Gaussian vector shaped like ``params`` drawn with ``key``, plus,
  if given, ``warm_start`` scaled to the same norm (e.g. the top eigenvector of
  the previous training step: the top eigenvector moves slowly, and a start
  close to it needs fewer products, while the Gaussian half keeps a component
  along every eigenvector, as a cold start has; a zero ``warm_start`` is a cold
  start). With ``rtol`` (and ``atol``), stops as soon as the top ``k`` Ritz
  values are within ``atol + rtol |theta|`` of eigenvalues (`lanczos`), else
  after ``num_iterations`` steps. If the Krylov space is invariant with
  dimension ``j < k`` (`lanczos`), the values beyond the first ``j`` are NaN
  and their vectors zero.

  Repeated eigenvalues: a Krylov space from one start vector holds one
  eigenvector per distinct eigenvalue, so with ``block_size=1`` a multiple
  eigenvalue is found once and the next distinct ones follow it (a linear layer
  under MSE with ``K`` outputs has each GGN eigenvalue ``K`` times: ``[1.59,
  1.59, 1.59, 1.46]`` comes back as ``[1.59, 1.46, 0.99, 0.43]``). With
  ``block_size=b`` (`block_lanczos` from ``b`` Gaussian vectors, the first
  warm-started) multiplicities up to ``b`` are found; each step then takes ``b``
  products (batched). `ggn_eigenpairs` gives the batch GGN's exact eigenvalues.
  """
  if not isinstance(block_size, int) or block_size < 1:
    raise ValueError(f"`block_size` must be a positive int; got {block_size!r}.")
  flat, unravel = ravel_pytree(params)
  most = min(num_iterations * block_size, flat.shape[0])
  if k > most:
    raise ValueError(f"k={k} exceeds the number of Ritz values (num_iterations * block_size "
                     f"= {num_iterations * block_size}, at most the dimension {flat.shape[0]}).")
  v0 = jax.random.normal(key, (block_size,) + flat.shape, flat.dtype)
  if warm_start is not None:
    _checks.check_tree_like(warm_start, params, "warm_start", "params")
    warm = ravel_pytree(warm_start)[0].astype(flat.dtype)
    norm = jnp.linalg.norm(warm)
    v0 = v0.at[0].set(v0[0] / jnp.linalg.norm(v0[0])
                      + jnp.where(norm > 0, warm / jnp.where(norm > 0, norm, 1), 0))
  if block_size == 1:
    result = lanczos(matvec, unravel(v0[0]), num_iterations, rtol=rtol, atol=atol,
                     num_converged=k)
  else:
    result = block_lanczos(matvec, jax.vmap(unravel)(v0), num_iterations, rtol=rtol, atol=atol,
                           num_converged=k)
  return (result.ritz_values[:k],
          jax.tree_util.tree_map(lambda v: v[:k], result.ritz_vectors))


def top_eigenvalues(matvec: Callable[[Any], Any], params: Any, key: Array,
                    k: int = 1, num_iterations: int = 20, *,
                    rtol: Optional[float] = None, atol: float = 0.0,
                    block_size: int = 1) -> Array:
  """Largest ``k`` eigenvalues (descending) of a symmetric matvec by (block)
  Lanczos (`top_eigenpairs` from a Gaussian start)."""
  return top_eigenpairs(matvec, params, key, k, num_iterations, rtol=rtol, atol=atol,
                        block_size=block_size)[0]
