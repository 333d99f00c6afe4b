"""curvax: curvature-aware optimisation for JAX, as optax transformations."""

from curvax import curvature, losses, solvers, transforms
from curvax import diagnostics
from curvax import flax_utils, layers
from curvax import sharding

__version__ = "0.1.0"

__all__ = ["curvature", "diagnostics", "flax_utils", "layers", "losses", "sharding", "solvers", "transforms", "__version__"]
