"""Registry of baseline optimizers for the runner, constructed lazily by name.

``sgd``, ``momentum`` (heavy ball, rho = 0.99) and ``adam`` (0.9, 0.999, 1e-8)
use DeepOBS's tuned learning rates where the showcase (seed 001, Table 5.2,
DeepOBS 1.1, 10 seeds) gives them, else a generic default; ``nadamw`` is
optax's. The curvax transforms are built with their defaults from the problem's
model, loss and regulariser; they are imported only when asked for (on the 2-D
test functions, whose GGN is zero, with ``curvature="hessian"`` unless given).

``build(name, problem, *, steps_per_epoch=None, **hyperparams) -> (optimizer, hyperparams)``;
``host_schedule(name, hyperparams)``: the optimizer's schedule on the host, for
``curvax.problems.run(..., scheduled=...)``.
"""

from __future__ import annotations

from typing import Any, Callable, Dict, Optional, Tuple

import optax

# DeepOBS 1.1 showcase, tuned learning rates [seed 001, Table 5.2].
TUNED_LR = {
    "sgd": {"quadratic_deep": 1.58e-2, "mnist_vae": 3.98e-3, "fmnist_2c2d": 1.58e-1,
            "fmnist_vae": 3.98e-3, "cifar100_allcnnc": 1.58e-1, "svhn_wrn164": 2.51e-2},
    "momentum": {"quadratic_deep": 2.51e-3, "mnist_vae": 2.51e-5, "fmnist_2c2d": 2.51e-3,
                 "fmnist_vae": 1.00e-5, "cifar100_allcnnc": 3.98e-3, "svhn_wrn164": 6.31e-4},
    "adam": {"quadratic_deep": 3.98e-2, "mnist_vae": 1.58e-4, "fmnist_2c2d": 2.51e-4,
             "fmnist_vae": 1.58e-4, "cifar100_allcnnc": 1.00e-3, "svhn_wrn164": 1.58e-4},
}
DEFAULT_LR = {"sgd": 1e-2, "momentum": 1e-3, "adam": 1e-3, "nadamw": 1e-3}


def _lr(name, problem, hp):
  return hp.pop("learning_rate", TUNED_LR.get(name, {}).get(problem.name, DEFAULT_LR[name]))


def _sgd(problem, hp):
  lr = _lr("sgd", problem, hp)
  return optax.sgd(lr, **hp), {"learning_rate": lr, **hp}


def _momentum(problem, hp):
  lr = _lr("momentum", problem, hp)
  hp.setdefault("momentum", 0.99)
  return optax.sgd(lr, **hp), {"learning_rate": lr, **hp}


def _adam(problem, hp):
  lr = _lr("adam", problem, hp)
  hp = {"b1": 0.9, "b2": 0.999, "eps": 1e-8, **hp}
  return optax.adam(lr, **hp), {"learning_rate": lr, **hp}


def _nadamw(problem, hp):
  lr = _lr("nadamw", problem, hp)
  return optax.nadamw(lr, **hp), dict(learning_rate=lr, **hp)


def _curvature_default(problem, hp):
  """``curvature="hessian"`` unless given, for problems whose model outputs the loss.

  DeepOBS's 2-D functions (``value_loss``): the loss is the identity of the
  model's output, whose Hessian is zero, so the GGN is zero and the transforms'
  default curvature would measure nothing (Hessian-free would take damped
  gradient steps of length ``1/lambda``, the curvature step size never one).
  """
  from curvax.problems import synthetic  # pylint: disable=import-outside-toplevel
  if problem.loss is synthetic.value_loss:
    hp.setdefault("curvature", "hessian")
  return hp


def _hessian_free(problem, hp):
  from curvax.transforms import hessian_free  # pylint: disable=import-outside-toplevel
  hp = _curvature_default(problem, hp)
  return (hessian_free(problem.apply_fn, problem.loss, regularizer=problem.regularizer, **hp),
          dict(hp))


def _curvature_step_size(problem, hp):
  from curvax.transforms import curvature_step_size  # pylint: disable=import-outside-toplevel
  hp = _curvature_default(problem, hp)
  inner_name = hp.pop("inner", "sgd")
  inner_lr = hp.pop("inner_learning_rate", 1.0)
  inner, _ = build(inner_name, problem, learning_rate=inner_lr)
  return (curvature_step_size(inner, problem.apply_fn, problem.loss,
                              regularizer=problem.regularizer, **hp),
          dict(inner=inner_name, inner_learning_rate=inner_lr, **hp))


def _probabilistic_preconditioning(problem, hp, steps_per_epoch=None):
  """Restarts the estimation every epoch unless told otherwise, as the seed does.

  (Not when an epoch is shorter than one estimation round: then never.)
  """
  from curvax.transforms import probabilistic_preconditioning  # pylint: disable=import-outside-toplevel
  if "restart_every" not in hp and steps_per_epoch is not None:
    try:
      return (probabilistic_preconditioning(problem.loss_fn, restart_every=steps_per_epoch, **hp),
              dict(hp, restart_every=steps_per_epoch))
    except ValueError as e:
      if "restart_every" not in str(e):
        raise
  return probabilistic_preconditioning(problem.loss_fn, **hp), dict(hp)


OPTIMIZERS: Dict[str, Callable[[Any, dict], Tuple[optax.GradientTransformation, dict]]] = {
    "sgd": _sgd, "momentum": _momentum, "adam": _adam, "nadamw": _nadamw,
    "hessian_free": _hessian_free, "curvature_step_size": _curvature_step_size,
    "probabilistic_preconditioning": _probabilistic_preconditioning,
}


def names():
  return sorted(OPTIMIZERS)


def build(name: str, problem: Any, *, steps_per_epoch: Optional[int] = None,
          **hyperparams) -> Tuple[optax.GradientTransformation, dict]:
  """Returns ``(optimizer, hyperparams used)`` for registered optimizer ``name`` on ``problem``.

  ``steps_per_epoch`` (the runner passes it): probabilistic_preconditioning then
  restarts its estimation every epoch (``restart_every``) unless given one.
  """
  if name not in OPTIMIZERS:
    raise KeyError(f"unknown optimizer '{name}'; registered: {', '.join(names())}.")
  if name == "probabilistic_preconditioning":
    return _probabilistic_preconditioning(problem, dict(hyperparams), steps_per_epoch)
  return OPTIMIZERS[name](problem, dict(hyperparams))


def host_schedule(name: str, hyperparams: dict) -> Optional[Callable[[int], Any]]:
  """``t -> bool`` (or a phase name): whether (which) registered optimizer ``name`` (built with
  ``hyperparams``, as `build` returns them) has scheduled work at update ``t``.

  For ``curvax.problems.run(..., scheduled=...)`` (``scheduled="auto"``):
  ``curvature_step_size`` computes curvature on the steps of
  `curvax.transforms.computes_curvature`, ``probabilistic_preconditioning``
  names each step's phase (`curvax.transforms.estimation_phase`); ``None``
  for the others, which have nothing scheduled (every step is alike).
  """
  if name not in OPTIMIZERS:
    raise KeyError(f"unknown optimizer '{name}'; registered: {', '.join(names())}.")
  from curvax import transforms  # pylint: disable=import-outside-toplevel
  if name == "curvature_step_size":
    keys = ("mode", "warmup_steps", "interval", "num_estimates")
    settings = {k: hyperparams[k] for k in keys if k in hyperparams}
    return lambda t: transforms.computes_curvature(t, **settings)
  if name == "probabilistic_preconditioning":
    keys = ("prior_iterations", "num_observations", "restart_every", "precondition",
            "estimate_preconditioner")
    settings = {k: hyperparams[k] for k in keys if k in hyperparams}
    return lambda t: transforms.estimation_phase(t, **settings)
  return None
