"""Truncated, preconditioned conjugate gradients for Hessian-free optimisation."""

from __future__ import annotations

import enum
import functools
import math
from typing import Any, Callable, NamedTuple, Optional, Tuple

import jax
import jax.numpy as jnp
import optax.tree_utils as otu

from curvax import _checks

Array = jax.Array


class CGStatus(enum.IntEnum):
  """Why `cg` stopped (stored as an int32 in `CGResult.status`)."""
  RUNNING = -1
  MAX_ITER = 0            # the iteration budget was spent
  MARTENS = 1             # Martens' relative-progress criterion fired
  RESIDUAL = 2            # ||r|| <= tol * ||b||
  NONPOSITIVE_CURVATURE = 3  # p'Ap <= 0: the last good iterate is returned
  NONFINITE = 4           # a non-finite value in p'Ap or r'z: last good iterate


class CGResult(NamedTuple):
  """What `cg` returns.

  Attributes:
    x: the final iterate (shaped like ``b``).
    iterations: number of completed CG iterations ``i`` (``x = x_i``).
    status: a `CGStatus` code (int32).
    phi: the quadratic model ``phi(x) = 0.5 x'Ax - b'x`` at ``x``.
    phi_history: ``(max_iter + 1,)``, ``phi(x_i)`` for ``i <= iterations``
      (entry 0 is ``phi(x0)``), NaN beyond.
    iterates: stacked pytree, leading axis ``len(iterate_grid(max_iter)) + 1``:
      the iterates at the grid iterations ``ceil(gamma^j)`` that were reached,
      followed by the final iterate (not duplicated when the final iteration is
      a grid point). Unused slots hold stale values; see ``num_iterates``.
    iterate_steps: ``(capacity,)`` int32, the CG iteration of each stored
      iterate, ``-1`` in unused slots.
    num_iterates: number of valid slots; slot ``num_iterates - 1`` is ``x``.
    iterate_phis: ``(capacity,)``, ``phi`` at each stored iterate.
    residual_norm: ``||b - A x||`` (recursively updated residual).
  """
  x: Any
  iterations: Array
  status: Array
  phi: Array
  phi_history: Array
  iterates: Any
  iterate_steps: Array
  num_iterates: Array
  iterate_phis: Array
  residual_norm: Array


def iterate_grid(max_iter: int, gamma: float = 1.3) -> Tuple[int, ...]:
  r"""The CG iterations whose iterates are kept for backtracking.

  Martens (2010, sec. 4.6): the distinct values ``ceil(gamma^j)``, ``j = 0, 1,
  ...``, up to ``max_iter``. For ``gamma = 1.3``: 1, 2, 3, 4, 5, 7, 9, 11, 14, 18,
  24, 31, 40, 52, 67, 87, 113, 147, 191, 248 (PyTorchHessianFree stores the same
  iterations, counted from 0).
  """
  if gamma <= 1.0:
    raise ValueError(f"iterate grid factor gamma must be > 1; got {gamma}.")
  grid, j = [], 0
  while True:
    step = math.ceil(gamma ** j - 1e-9)
    if step > max_iter:
      break
    if not grid or step != grid[-1]:
      grid.append(step)
    j += 1
  return tuple(grid)


def _keeping_dtypes(fn: Callable[[Any], Any]) -> Callable[[Any], Any]:
  """``fn`` with its output cast leaf by leaf to its argument's dtypes."""
  def cast(v):
    return jax.tree.map(lambda o, x: jnp.asarray(o).astype(jnp.result_type(x)), fn(v), v)
  return cast


def cg(matvec: Callable[[Any], Any],
       b: Any,
       x0: Optional[Any] = None,
       *,
       preconditioner: Optional[Callable[[Any], Any]] = None,
       max_iter: int = 250,
       tol: float = 1e-5,
       martens_criterion: bool = True,
       martens_eps: float = 5e-4,
       martens_min_window: int = 10,
       martens_window_fraction: float = 0.1,
       nonpositive_curvature: str = "stop",
       gamma: float = 1.3) -> CGResult:
  r"""Solves ``A x = b`` approximately by preconditioned conjugate gradients.

  Martens & Sutskever (2012), Algorithm 2, with ``M^{-1}`` given as
  ``preconditioner(r)``:

  .. math::
     r_0 = b - A x_0,\ z_0 = M^{-1} r_0,\ p_0 = z_0;\quad
     \alpha_i = \frac{r_i' z_i}{p_i' A p_i},\ x_{i+1} = x_i + \alpha_i p_i,\
     r_{i+1} = r_i - \alpha_i A p_i,\ \beta_i = \frac{r_{i+1}' z_{i+1}}{r_i' z_i},\
     p_{i+1} = z_{i+1} + \beta_i p_i.

  The quadratic model ``phi(x) = 0.5 x'Ax - b'x`` is tracked along the way:
  ``phi(x_0) = -0.5 x_0'(b + r_0)`` (since ``A x_0 = b - r_0``), then
  ``phi(x_{i+1}) = phi(x_i) - alpha_i p_i'r_i + alpha_i^2 p_i'Ap_i / 2`` with
  ``p_i'r_i = r_i'z_i`` in CG (no extra pass) and measured by a dot product in
  the ``"abs"`` variant, where it differs after a negative-curvature step. For
  Hessian-free, ``A`` is the damped curvature and ``b = -g``, so ``phi`` is the
  model's predicted change of the loss.

  CG stops when, at iteration ``i``:

  * ``i = max_iter`` (Martens 2010 uses 250);
  * ``martens_criterion`` and, with ``k = max(martens_min_window,
    ceil(martens_window_fraction * i))``: ``i > k``, ``phi(x_i) < 0`` and
    ``(phi(x_i) - phi(x_{i-k})) / phi(x_i) < k * martens_eps`` (Martens 2010,
    sec. 4.4, eq. in the text; PyTorchHessianFree uses the stricter
    ``(phi_i - phi_{i-k}) / (phi_i - phi_0) < eps`` without the factor ``k``,
    ``k = max(10, floor(i / 10))``: curvax follows the paper);
  * ``||r_i|| <= tol * ||b||`` (also before the first iteration, e.g. after a
    perfect warm start);
  * ``p_i'Ap_i <= 0`` (possible with an indefinite ``A``, e.g. the Hessian):
    with ``nonpositive_curvature="stop"`` the iteration is not taken, ``x_i``
    (the last iterate with a positive-curvature history) is returned and the
    status says so; with ``"abs"`` ``|p_i'Ap_i|`` is used instead (the
    saddle-free variant, Dauphin et al. 2014) and CG continues; ``p'Ap = 0``
    always stops;
  * a non-finite ``p'Ap`` or ``r'z``: the last finite iterate is returned with
    status `CGStatus.NONFINITE`.

  The iterates at the iterations of `iterate_grid` and the final one are kept
  in a fixed-size stacked buffer, the backtracking candidates of Martens (2010,
  sec. 4.6). Everything runs in one ``lax.while_loop``: jit-compiles once for
  a given ``max_iter``.

  Args:
    matvec: ``v -> A v`` on pytrees shaped like ``b`` (symmetric ``A``).
    b: right-hand side, any pytree of arrays.
    x0: initial guess (warm start); zeros if None.
    preconditioner: ``r -> M^{-1} r`` (symmetric positive definite ``M``), or
      None for ``M = I``.
    max_iter: maximum number of iterations (static).
    tol: relative residual tolerance (``||r|| <= tol ||b||``; the default 1e-5
      is PyTorchHessianFree's test, Martens' criterion usually stops CG first).
    martens_criterion: whether to use Martens' relative-progress test.
    martens_eps, martens_min_window, martens_window_fraction: its constants.
    nonpositive_curvature: ``"stop"`` or ``"abs"``.
    gamma: the iterate-grid factor.

  Returns:
    A `CGResult`. With leaves of several dtypes (e.g. bfloat16 and float32), the
    scalars are computed in the widest one and each vector leaf (``x``, the
    stored iterates) in its promotion with it; ``matvec`` and
    ``preconditioner`` receive such leaves and their outputs are cast to them.
  """
  if nonpositive_curvature not in ("stop", "abs"):
    raise ValueError(
        "nonpositive_curvature must be 'stop' or 'abs'; got "
        f"{nonpositive_curvature!r}.")
  if int(max_iter) != max_iter or max_iter < 0:
    raise ValueError(f"max_iter must be a non-negative integer; got {max_iter}.")
  max_iter = int(max_iter)
  if x0 is None:
    x0 = otu.tree_zeros_like(b)
  else:
    _checks.check_tree_like(x0, b, "x0", "b")
  if preconditioner is None:
    preconditioner = lambda r: r  # noqa: E731

  grid = iterate_grid(max_iter, gamma)
  capacity = len(grid) + 1
  is_grid = jnp.zeros((max_iter + 1,), bool).at[jnp.asarray(grid, jnp.int32)].set(True) \
      if grid else jnp.zeros((max_iter + 1,), bool)
  # Mixed precision (e.g. bfloat16 and float32 leaves): the scalars take the
  # widest dtype (weakly typed leaves included), and each vector leaf works in
  # its promotion with it, so that the loop keeps its types; matvec and
  # preconditioner outputs are cast to the leaves' working dtypes. (One dtype
  # throughout: nothing changes.)
  dtype = functools.reduce(jnp.promote_types,
                           [jnp.result_type(l) for l in jax.tree_util.tree_leaves(b)])
  real = jnp.finfo(dtype).dtype
  b, x0 = (jax.tree.map(lambda l: jnp.asarray(l, jnp.promote_types(jnp.result_type(l), dtype)), t)
           for t in (b, x0))
  matvec = _keeping_dtypes(matvec)
  preconditioner = _keeping_dtypes(preconditioner)

  bb = otu.tree_vdot(b, b).real
  threshold = jnp.maximum((tol ** 2) * bb, jnp.finfo(real).tiny)
  r0 = otu.tree_sub(b, matvec(x0))
  z0 = preconditioner(r0)
  rz0 = otu.tree_vdot(r0, z0).real
  rr0 = otu.tree_vdot(r0, r0).real
  phi0 = -0.5 * otu.tree_vdot(x0, otu.tree_add(b, r0)).real

  phis = jnp.full((max_iter + 1,), jnp.nan, real).at[0].set(phi0)
  iterates = jax.tree.map(
      lambda l: jnp.zeros((capacity,) + jnp.shape(l), jnp.result_type(l)), x0)
  steps = jnp.full((capacity,), -1, jnp.int32)
  iterate_phis = jnp.full((capacity,), jnp.nan, real)

  status0 = jnp.where(
      rr0 <= threshold, CGStatus.RESIDUAL,
      jnp.where(~jnp.isfinite(rz0), CGStatus.NONFINITE,
                jnp.where(max_iter == 0, CGStatus.MAX_ITER, CGStatus.RUNNING)))

  init = dict(i=jnp.asarray(0, jnp.int32), x=x0, r=r0, z=z0, p=z0, rz=rz0, rr=rr0,
              status=jnp.asarray(status0, jnp.int32), phis=phis,
              iterates=iterates, steps=steps, iterate_phis=iterate_phis,
              slot=jnp.asarray(0, jnp.int32))

  def cond(s):
    return s["status"] == CGStatus.RUNNING

  def body(s):
    i, x, r, p = s["i"], s["x"], s["r"], s["p"]
    ap = matvec(p)
    pap = otu.tree_vdot(p, ap).real
    curv = jnp.abs(pap) if nonpositive_curvature == "abs" else pap
    bad_curv = curv <= 0
    nonfinite = ~jnp.isfinite(pap)
    ok = ~(bad_curv | nonfinite)
    alpha = jnp.where(ok, s["rz"] / jnp.where(ok, curv, 1.0), 0.0)
    x_new = otu.tree_add_scale(x, alpha, p)
    r_new = otu.tree_add_scale(r, -alpha, ap)
    z_new = preconditioner(r_new)
    rz_new = otu.tree_vdot(r_new, z_new).real
    rr_new = otu.tree_vdot(r_new, r_new).real
    nonfinite_next = ~jnp.isfinite(rz_new)
    ok = ok & ~nonfinite_next
    beta = rz_new / jnp.where(s["rz"] != 0, s["rz"], 1.0)
    p_new = otu.tree_add_scale(z_new, beta, p)
    i_new = i + 1
    # phi(x + alpha p) = phi(x) - alpha p'r + alpha^2 p'Ap / 2. In (preconditioned)
    # CG p'r = r'z, since each step minimises phi along the previous direction,
    # so no pass over the vectors is needed. An "abs" step along a direction of
    # negative curvature is no such minimisation (afterwards p'r_new = 2 r'z),
    # so that variant measures p'r.
    pr = otu.tree_vdot(p, r).real if nonpositive_curvature == "abs" else s["rz"]
    phi_new = s["phis"][i] - alpha * pr + 0.5 * alpha ** 2 * pap

    # Martens (2010, sec. 4.4) relative progress over a window of k iterations.
    frac = jnp.asarray(martens_window_fraction)
    k = jnp.maximum(martens_min_window,
                    jnp.ceil(frac * i_new.astype(frac.dtype)).astype(jnp.int32))
    phi_old = s["phis"][jnp.clip(i_new - k, 0, max_iter)]
    martens = (martens_criterion & (i_new > k) & (phi_new < 0)
               & ((phi_new - phi_old) / jnp.where(phi_new < 0, phi_new, -1.0)
                  < k.astype(phi_new.dtype) * martens_eps))

    status = jnp.where(
        nonfinite | nonfinite_next, CGStatus.NONFINITE,
        jnp.where(bad_curv, CGStatus.NONPOSITIVE_CURVATURE,
                  jnp.where(rr_new <= threshold, CGStatus.RESIDUAL,
                            jnp.where(martens, CGStatus.MARTENS,
                                      jnp.where(i_new >= max_iter, CGStatus.MAX_ITER,
                                                CGStatus.RUNNING)))))
    store = ok & is_grid[jnp.minimum(i_new, max_iter)]
    # Grid iterates go to the next free slot; otherwise to the scratch slot.
    slot_w = jnp.where(store, s["slot"], capacity - 1)
    # A failed iteration ends the loop (its status is terminal), so only x,
    # which is returned, must fall back to x_i; r, z and p are never read again.
    x_keep = otu.tree_where(ok, x_new, x)
    phi_keep = jnp.where(ok, phi_new, s["phis"][i])
    out = dict(
        i=jnp.where(ok, i_new, i),
        x=x_keep, r=r_new, z=z_new, p=p_new,
        rz=jnp.where(ok, rz_new, s["rz"]), rr=jnp.where(ok, rr_new, s["rr"]),
        status=status.astype(jnp.int32),
        phis=s["phis"].at[i_new].set(jnp.where(ok, phi_new, jnp.nan)),
        iterates=jax.tree.map(lambda buf, l: buf.at[slot_w].set(l),
                              s["iterates"], x_keep),
        steps=s["steps"].at[slot_w].set(jnp.where(store, i_new, -1)),
        iterate_phis=s["iterate_phis"].at[slot_w].set(phi_keep),
        slot=s["slot"] + store.astype(jnp.int32))
    return out

  s = jax.lax.while_loop(cond, body, init)

  # Append the final iterate unless the last stored one already is it.
  slot = s["slot"]
  final_stored = (slot > 0) & (s["steps"][jnp.maximum(slot - 1, 0)] == s["i"])
  write = jnp.where(final_stored, capacity - 1, slot)
  phi_final = s["phis"][s["i"]]
  iterates = jax.tree.map(lambda buf, l: buf.at[write].set(l), s["iterates"], s["x"])
  steps = s["steps"].at[write].set(s["i"])
  iterate_phis = s["iterate_phis"].at[write].set(phi_final)
  num = jnp.where(final_stored, slot, slot + 1)
  # Clear the scratch slot's step unless it holds the final iterate.
  steps = jnp.where(jnp.arange(capacity, dtype=num.dtype) < num, steps, -1)
  return CGResult(
      x=s["x"], iterations=s["i"], status=s["status"], phi=phi_final,
      phi_history=s["phis"], iterates=iterates, iterate_steps=steps,
      num_iterates=num.astype(jnp.int32), iterate_phis=iterate_phis,
      residual_norm=jnp.sqrt(s["rr"]))
