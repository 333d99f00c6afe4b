"""Test configuration: float64 everywhere, so reference comparisons can be tight."""

import jax

jax.config.update("jax_enable_x64", True)
