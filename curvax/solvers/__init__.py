"""Shared numerics on pytrees: conjugate gradients, damping rules, line searches."""

from curvax.solvers import bayesian_hessian
from curvax.solvers.backtracking import BacktrackingResult, cg_backtracking
from curvax.solvers.cg import CGResult, CGStatus, cg, iterate_grid
from curvax.solvers.damping import levenberg_marquardt, reduction_ratio
from curvax.solvers.line_search import LineSearchResult, armijo
from curvax.solvers.microbatch import microbatch_mean, microbatched_value_and_grad

__all__ = [
    "bayesian_hessian",
    "BacktrackingResult", "CGResult", "CGStatus", "LineSearchResult", "armijo", "cg",
    "cg_backtracking", "iterate_grid", "levenberg_marquardt", "microbatch_mean",
    "microbatched_value_and_grad", "reduction_ratio",
]
