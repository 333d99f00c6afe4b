"""Dtype helpers shared by the numerics."""

from __future__ import annotations

from typing import Any, Callable

import jax
import jax.numpy as jnp
import numpy as np


def at_least_float32(dtype: Any) -> np.dtype:
  """``dtype`` if it has 32 bits or more, else float32.

  For small linear algebra (no half-precision LAPACK/cuSOLVER kernels) and
  recurrences that lose too much in bfloat16. Not ``jnp.promote_types(dtype,
  float32)``: that is an implicit promotion, which
  ``jax_numpy_dtype_promotion='strict'`` refuses for float64.
  """
  dtype = jnp.dtype(dtype)
  return dtype if jnp.finfo(dtype).bits >= 32 else jnp.dtype(jnp.float32)


def call_in_at_least_float32(routine: Callable[..., Any], *matrices: Any) -> Any:
  """``routine`` (e.g. ``jnp.linalg.eigh``) on ``matrices`` cast to
  `at_least_float32` of the first one's dtype (there are no half-precision
  LAPACK/cuSOLVER kernels); results cast back to that dtype."""
  dtype = matrices[0].dtype
  wide = at_least_float32(dtype)
  out = routine(*(m.astype(wide) for m in matrices))
  return jax.tree_util.tree_map(lambda o: o.astype(dtype), out)
