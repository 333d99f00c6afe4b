"""curvax: curvature-aware optimisation for JAX, as optax transformations."""

from curvax import curvature, losses, solvers, transforms
from curvax import diagnostics
from curvax import flax_utils, layers
from curvax import sharding

__version__ = "0.1.0"


def __getattr__(name: str):
  # `curvax.problems` (data loading, Flax models, a runner, matplotlib plots) is
  # imported on first use, so that `import curvax` stays light.
  if name == "problems":
    import importlib  # pylint: disable=import-outside-toplevel
    return importlib.import_module("curvax.problems")
  raise AttributeError(f"module 'curvax' has no attribute {name!r}")


__all__ = ["curvature", "diagnostics", "flax_utils", "layers", "losses", "sharding", "solvers", "transforms", "__version__"]
