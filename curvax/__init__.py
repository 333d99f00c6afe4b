"""curvax: curvature-aware optimisation for JAX, as optax transformations."""

from curvax import curvature, losses, solvers, transforms

__version__ = "0.1.0"

__all__ = ["curvature", "losses", "solvers", "transforms", "__version__"]
