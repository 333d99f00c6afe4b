"""Shared numerics on pytrees: conjugate gradients, damping rules, line searches."""
