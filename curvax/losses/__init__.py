"""Losses that know their Hessian with respect to the model output."""

from curvax.losses.base import AutodiffLoss, Loss, as_loss
from curvax.losses.mean_squared_error import MeanSquaredError, mean_squared_error
from curvax.losses.objective import l2_regularizer, objective, per_example_losses
from curvax.losses.sigmoid_binary_cross_entropy import (
    SigmoidBinaryCrossEntropy, sigmoid_binary_cross_entropy)
from curvax.losses.softmax_cross_entropy import (
    SoftmaxCrossEntropy, softmax_cross_entropy)

__all__ = [
    "AutodiffLoss", "Loss", "MeanSquaredError", "SigmoidBinaryCrossEntropy",
    "SoftmaxCrossEntropy", "as_loss", "l2_regularizer", "mean_squared_error", "objective",
    "per_example_losses", "sigmoid_binary_cross_entropy", "softmax_cross_entropy",
]
