"""Armijo backtracking line search along a fixed direction."""

from __future__ import annotations

from typing import Callable, NamedTuple, Optional

import jax
import jax.numpy as jnp

Array = jax.Array


class LineSearchResult(NamedTuple):
  """What `armijo` returns.

  Attributes:
    step_size: the accepted ``alpha``, or 0 if none was accepted.
    loss: ``fn(step_size)`` (``value0`` when ``step_size = 0``).
    num_reductions: how many times ``alpha`` was multiplied by ``beta``.
    accepted: whether the Armijo condition held for some tried ``alpha``.
  """
  step_size: Array
  loss: Array
  num_reductions: Array
  accepted: Array


def armijo(fn: Callable[[Array], Array], value0: Array, slope: Array, *,
           initial_step: float = 1.0, c: float = 0.01, beta: float = 0.8,
           max_reductions: int = 20,
           initial_value: Optional[Array] = None) -> LineSearchResult:
  r"""Backtracking line search with the Armijo condition.

  Martens & Sutskever (2012, sec. 8.8); seed 002, App. A.1: start at
  ``alpha = initial_step`` and while

  .. math:: f(\alpha) > f(0) + c\,\alpha\,f'(0)

  set ``alpha <- beta * alpha``, at most ``max_reductions`` times (defaults
  ``c = 0.01``, ``beta = 0.8``, 20). If no tried ``alpha`` satisfies the
  condition, ``step_size = 0`` (no step) and ``accepted = False``. Non-finite
  ``f(alpha)`` never satisfies it. One ``lax.while_loop``.

  Args:
    fn: ``alpha -> loss(theta + alpha p)``.
    value0: ``f(0)``.
    slope: ``f'(0) = g'p`` (negative for a descent direction).
    initial_value: ``fn(initial_step)`` if already known (saves an evaluation).
  """
  value0 = jnp.asarray(value0)
  dtype = value0.dtype
  alpha0 = jnp.asarray(initial_step, dtype)

  def armijo_ok(alpha, v):
    return jnp.isfinite(v) & (v <= value0 + c * alpha * slope)

  v0 = fn(alpha0) if initial_value is None else jnp.asarray(initial_value, dtype)

  def cond(s):
    alpha, v, n = s
    return ~armijo_ok(alpha, v) & (n < max_reductions)

  def body(s):
    alpha, _, n = s
    alpha = alpha * beta
    return alpha, fn(alpha).astype(dtype), n + 1

  alpha, v, n = jax.lax.while_loop(cond, body, (alpha0, v0.astype(dtype),
                                                jnp.asarray(0, jnp.int32)))
  ok = armijo_ok(alpha, v)
  return LineSearchResult(step_size=jnp.where(ok, alpha, 0.0).astype(dtype),
                          loss=jnp.where(ok, v, value0), num_reductions=n, accepted=ok)
