"""Test configuration: float64 everywhere, so reference comparisons can be tight.

XLA is asked for 4 virtual CPU devices (read when JAX's backend starts, so set
here, before ``import jax``) for tests/test_sharding.py's multi-device checks;
unsharded computations still run on one device.
"""

import os

_DEVICE_FLAG = "--xla_force_host_platform_device_count"
if _DEVICE_FLAG not in os.environ.get("XLA_FLAGS", ""):
  os.environ["XLA_FLAGS"] = f"{os.environ.get('XLA_FLAGS', '')} {_DEVICE_FLAG}=4".strip()

import jax  # noqa: E402

jax.config.update("jax_enable_x64", True)
