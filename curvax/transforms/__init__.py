"""Curvature-aware optax gradient transformations."""

from curvax.transforms.curvature_step_size import (  # noqa: E402
    CurvatureStepSizeState, curvature_step_size)

from curvax.transforms.hessian_free import HessianFreeState, hessian_free  # noqa: E402
from curvax.transforms.probabilistic_preconditioning import (  # noqa: E402
    ProbabilisticPreconditioningState, probabilistic_preconditioning)

__all__ = [
    "CurvatureStepSizeState", "curvature_step_size",
    "ProbabilisticPreconditioningState", "probabilistic_preconditioning",
    "HessianFreeState", "hessian_free",
]
