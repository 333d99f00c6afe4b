"""Matrix-free curvature: GGN, Hessian and Fisher products, per-example
statistics, diagonals and eigen-structure."""

from curvax.curvature.fisher import fisher_matvec
from curvax.curvature.ggn import ggn_matvec
from curvax.curvature.hessian import hessian_matvec
from curvax.curvature.linearization import ModelLinearization, linearize_model
from curvax.curvature.regularized import add_regularizer_curvature
from curvax.curvature.quadratic_step_size import (
    QuadraticStepSize, quadratic_step_size, step_size_from_parts, step_size_is_defined)

__all__ = [
    "QuadraticStepSize", "quadratic_step_size", "step_size_from_parts", "step_size_is_defined",
    "ModelLinearization", "add_regularizer_curvature", "fisher_matvec", "ggn_matvec", "hessian_matvec",
    "linearize_model",
]
