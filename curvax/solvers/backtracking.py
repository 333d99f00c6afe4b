"""CG backtracking: choose among the stored CG iterates by the loss."""

from __future__ import annotations

from typing import Any, Callable, NamedTuple, Optional

import jax
import jax.numpy as jnp

Array = jax.Array


class BacktrackingResult(NamedTuple):
  """What `cg_backtracking` returns.

  Attributes:
    index: slot of the chosen iterate in the stacked buffer.
    iterate: the chosen iterate (a pytree like one slot of the buffer).
    loss: ``fn(iterate)`` (non-finite values reported as ``+inf``).
    last_loss: ``fn`` at the last stored iterate (slot ``num_iterates - 1``,
      the final CG iterate), the first one evaluated.
    num_evaluations: how many times ``fn`` was called.
  """
  index: Array
  iterate: Any
  loss: Array
  last_loss: Array
  num_evaluations: Array


def _take(iterates, j):
  return jax.tree.map(lambda buf: jax.lax.dynamic_index_in_dim(buf, j, keepdims=False),
                      iterates)


def cg_backtracking(fn: Callable[[Any], Array], iterates: Any, num_iterates: Array,
                    *, last_loss: Optional[Array] = None) -> BacktrackingResult:
  r"""Backtracks over stored CG iterates (Martens & Sutskever 2012, p. 36).

  Starting from the last stored iterate ``j = num_iterates - 1``, step back to
  ``j - 1`` while ``fn(iterate_{j-1}) < fn(iterate_j)``; stop at the first
  iterate that does not improve on its successor. Only the visited iterates
  and one more are evaluated (a ``lax.while_loop``), not all candidates.
  Non-finite losses count as ``+inf``, so a diverging final iterate is
  stepped back from.

  Args:
    fn: the loss of a candidate, e.g. ``x -> L_eval(theta + x)``.
    iterates: stacked pytree (leading axis = slots), as in
      `curvax.solvers.CGResult.iterates`.
    num_iterates: number of valid slots (>= 1).
    last_loss: ``fn`` at the last valid iterate if already known (saves one
      evaluation).
  """
  # fn's dtype (e.g. float64 data with float32 parameters) rules the loop's.
  dtype = jax.eval_shape(lambda: fn(_take(iterates, 0))).dtype

  def f(j):
    v = fn(_take(iterates, j))
    return jnp.where(jnp.isfinite(v), v, jnp.inf).astype(dtype)

  last = jnp.asarray(num_iterates, jnp.int32) - 1
  if last_loss is None:
    cur, evals = f(last), 1
  else:
    cur = jnp.where(jnp.isfinite(last_loss), last_loss, jnp.inf).astype(dtype)
    evals = 0

  def f_before(j):
    # fn at slot j - 1, or +inf (without evaluating) when j is the first slot.
    return jax.lax.cond(j > 0, lambda: f(jnp.maximum(j - 1, 0)),
                        lambda: jnp.asarray(jnp.inf, dtype))

  cand = f_before(last)

  def cond(s):
    j, cur, cand, _ = s
    return (j > 0) & (cand < cur)

  def body(s):
    j, _, cand, n = s
    j = j - 1
    nxt = f_before(j)
    return j, cand, nxt, n + (j > 0).astype(jnp.int32)

  init = (last, cur, cand, jnp.asarray(evals, jnp.int32) + (last > 0).astype(jnp.int32))
  j, loss, _, n = jax.lax.while_loop(cond, body, init)
  return BacktrackingResult(index=j, iterate=_take(iterates, j), loss=loss,
                            last_loss=init[1], num_evaluations=n)
