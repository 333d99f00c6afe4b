"""Curvature-aware optax gradient transformations."""

from curvax.transforms.curvature_step_size import (  # noqa: E402
    CurvatureStepSizeState, curvature_step_size)

__all__ = ["CurvatureStepSizeState", "curvature_step_size"]
