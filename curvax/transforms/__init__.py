"""Curvature-aware optax gradient transformations."""
