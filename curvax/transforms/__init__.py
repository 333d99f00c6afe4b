"""Curvature-aware optax gradient transformations."""

from curvax.transforms.curvature_step_size import (  # noqa: E402
    STATIC_ARGS as _CSS_STATIC_ARGS, CurvatureStepSizeState, computes_curvature,
    curvature_step_size)

from curvax.transforms.hessian_free import (  # noqa: E402
    STATIC_ARGS as _HF_STATIC_ARGS, HessianFreeState, hessian_free)
from curvax.transforms.probabilistic_preconditioning import (  # noqa: E402
    STATIC_ARGS as _PP_STATIC_ARGS, ProbabilisticPreconditioningState,
    estimates_preconditioner, estimation_phase, probabilistic_preconditioning)

# Each function shadows its module here, so its static arguments travel with it:
# optax.inject_hyperparams(probabilistic_preconditioning,
#                          static_args=probabilistic_preconditioning.STATIC_ARGS)
probabilistic_preconditioning.STATIC_ARGS = _PP_STATIC_ARGS
curvature_step_size.STATIC_ARGS = _CSS_STATIC_ARGS
hessian_free.STATIC_ARGS = _HF_STATIC_ARGS

__all__ = [
    "CurvatureStepSizeState", "curvature_step_size", "computes_curvature",
    "ProbabilisticPreconditioningState", "probabilistic_preconditioning",
    "estimates_preconditioner", "estimation_phase",
    "HessianFreeState", "hessian_free",
]
