"""Dtype helpers shared by the numerics."""

from __future__ import annotations

from typing import Any

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
