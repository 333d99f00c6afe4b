"""curvax: curvature-aware optimisation for JAX, as optax transformations."""

from curvax import curvature, losses, solvers, transforms
from curvax import diagnostics

__version__ = "0.1.0"

__all__ = ["curvature", "diagnostics", "losses", "solvers", "transforms", "__version__"]
