r"""Track schedules: which steps a monitor computes its instruments on.

Cockpit's ``linear(interval, offset)`` and ``logarithmic(start, end, steps=300,
base=10, init=True)`` (spec diagnostics.md §3.1). A schedule maps the (traced)
step counter to a boolean scalar, so the monitor can branch with ``lax.cond``;
given a Python int it returns a Python bool (host-side scheduling, see
`curvax.diagnostics.is_scheduled`).
"""

from __future__ import annotations

from typing import Callable

import jax
import jax.numpy as jnp
import numpy as np

Array = jax.Array
Schedule = Callable[[Array], Array]


def linear_schedule(interval: int, offset: int = 0) -> Schedule:
  """Tracks steps ``offset, offset + interval, offset + 2 interval, ...``."""
  if not isinstance(interval, int) or interval < 1:
    raise ValueError(f"`interval` must be a positive int; got {interval!r}.")
  if not isinstance(offset, int) or offset < 0:
    raise ValueError(f"`offset` must be a non-negative int; got {offset!r}.")

  def schedule(step):
    return (step >= offset) & ((step - offset) % interval == 0)

  return schedule


def log_steps(start: float, end: float, steps: int = 300, base: float = 10.0,
              init: bool = True) -> np.ndarray:
  """The sorted unique integer steps ``int(base ** linspace(start, end, steps))`` (+0)."""
  tracked = np.unique(np.logspace(start, end, steps, base=base).astype(np.int64))
  if init:
    tracked = np.unique(np.concatenate([[0], tracked]))
  return tracked


def log_schedule(start: float = 0.0, end: float = 4.0, steps: int = 300,
                 base: float = 10.0, init: bool = True) -> Schedule:
  """Tracks log-spaced steps (Cockpit's ``logarithmic``), e.g. 0, 1, 2, ..., 10^end."""
  steps_np = log_steps(start, end, steps, base, init).astype(np.int32)
  tracked = jnp.asarray(steps_np)

  def schedule(step):
    if isinstance(step, (int, np.integer)):   # on the host: no device work
      return bool(np.isin(step, steps_np))
    return jnp.any(tracked == step)

  return schedule
