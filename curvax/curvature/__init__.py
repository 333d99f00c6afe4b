"""Matrix-free curvature: GGN, Hessian and Fisher products, per-example
statistics, diagonals and eigen-structure."""

from curvax.curvature.fisher import fisher_matvec
from curvax.curvature.ggn import ggn_matvec
from curvax.curvature.hessian import hessian_matvec
from curvax.curvature.linearization import ModelLinearization, linearize_model
from curvax.curvature.regularized import add_regularizer_curvature
from curvax.curvature.per_example import (
    DirectionalStatistics, PerExampleStatistics, directional_statistics, gradient_second_moment,
    gradient_variance, mean_gradient, per_example_gradient_norms, per_example_gradients,
    per_example_statistics)
from curvax.curvature.diagonals import (
    diag_ggn, diag_ggn_mc, hutchinson_diagonal, hutchinson_trace)
from curvax.curvature.eigen import GGNEigenpairs, ggn_eigenpairs, ggn_factor
from curvax.curvature.krylov import (
    BlockLanczosResult, LanczosResult, block_lanczos, lanczos, top_eigenpairs, top_eigenvalues)
from curvax.curvature.quadratic_step_size import (
    QuadraticStepSize, quadratic_step_size, step_size_from_parts, step_size_is_defined)

__all__ = [
    "DirectionalStatistics", "PerExampleStatistics", "directional_statistics",
    "gradient_second_moment", "gradient_variance", "mean_gradient", "per_example_gradient_norms",
    "per_example_gradients", "per_example_statistics",
    "diag_ggn", "diag_ggn_mc", "hutchinson_diagonal", "hutchinson_trace",
    "GGNEigenpairs", "ggn_eigenpairs", "ggn_factor",
    "BlockLanczosResult", "LanczosResult", "block_lanczos", "lanczos", "top_eigenpairs",
    "top_eigenvalues",
    "QuadraticStepSize", "quadratic_step_size", "step_size_from_parts", "step_size_is_defined",
    "ModelLinearization", "add_regularizer_curvature", "fisher_matvec", "ggn_matvec", "hessian_matvec",
    "linearize_model",
]
