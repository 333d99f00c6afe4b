"""Timing helper shared by the benchmark scripts."""

from __future__ import annotations

import time

import jax
import numpy as np


def median_time(fn, *args, repeats: int = 5) -> float:
  """Median wall time in seconds of ``fn(*args)`` over ``repeats`` calls.

  One call before timing compiles and warms up; each timed call waits for its
  results (``jax.block_until_ready``), so asynchronous dispatch is included.
  """
  jax.block_until_ready(fn(*args))
  times = []
  for _ in range(repeats):
    t = time.perf_counter()
    jax.block_until_ready(fn(*args))
    times.append(time.perf_counter() - t)
  return float(np.median(times))
