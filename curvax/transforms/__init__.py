"""Curvature-aware optax gradient transformations."""

from curvax.transforms.curvature_step_size import (  # noqa: E402
    CurvatureStepSizeState, curvature_step_size)

from curvax.transforms.hessian_free import HessianFreeState, hessian_free  # noqa: E402
from curvax.transforms.probabilistic_preconditioning import (  # noqa: E402
    STATIC_ARGS as _PP_STATIC_ARGS, ProbabilisticPreconditioningState,
    probabilistic_preconditioning)

# The function shadows its module here, so its static arguments travel with it:
# optax.inject_hyperparams(probabilistic_preconditioning,
#                          static_args=probabilistic_preconditioning.STATIC_ARGS)
probabilistic_preconditioning.STATIC_ARGS = _PP_STATIC_ARGS

__all__ = [
    "CurvatureStepSizeState", "curvature_step_size",
    "ProbabilisticPreconditioningState", "probabilistic_preconditioning",
    "HessianFreeState", "hessian_free",
]
