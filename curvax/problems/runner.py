"""Trains an optax optimizer on a problem and records DeepOBS-style results.

Protocol (DeepOBS, seed 001 §5.2-5.3 and its runners): train/valid/test metrics
are evaluated before the first epoch and after every epoch (so each list has
``epochs + 1`` entries), the train metrics on augmented training examples
(`Problem.evaluate`) with fresh augmentation at each evaluation, drawn from the
seed and the step; the mini-batch training loss is logged every
``log_every`` steps, counted as DeepOBS counts its ``train_log_interval``, from
each epoch's first mini-batch (mini-batches 0, 10, 20, ... of every epoch:
global steps 1, 11, ..., 461, 470, 480, ... at 469 steps per epoch); a
non-finite training loss stops the run (noticed at the
next logged step, the reason names the first non-finite one), recorded as
``status='diverged'`` with the reason; on DeepOBS's schedule (no ``max_steps``,
``eval_every`` or ``time_budget``) the metric lists are then padded, as DeepOBS's
PyTorch runner pads them, to ``epochs + 1`` entries with the epoch-0 values (so
that DeepOBS's analyzer scores the run as never converged, not as fast; the
padded wall times are null, ``padded_evaluations`` counts the entries). Reported
losses include the L2 term.

Every step is one jitted function: it slices the mini-batch out of the
device-resident training set with the epoch's permutation (drawn on device),
augments it, computes the training-mode loss and gradient, and calls
``optimizer.update(grads, state, params, batch=..., eval_batch=...)``.
``eval_batch`` is a second batch of the training set disjoint from ``batch``: the
``eval_batch_size`` examples that follow a random offset after the batch in the
epoch's permutation. Plain optax optimizers get these keywords through
``optax.with_extra_args_support``. Batch-norm statistics are threaded outside
the optimizer: it only sees the trainable ``{'params': ...}``. With
``steps_per_call=K`` one jitted call runs K such steps (``lax.scan``) and
returns what the host logs of each of them.

Scalar fields of NamedTuples in the optimizer state (damping, alpha, rho, CG
iterations, ...) are recorded at every log step under ``optimizer_state``.
"""

from __future__ import annotations

import functools
import itertools
import json
import math
import os
import sys
import time
from typing import Any, Callable, Dict, Optional, Tuple, Union

import jax
import jax.numpy as jnp
import numpy as np
import optax

from curvax import _checks
from curvax import sharding
from curvax.problems import optimizers as opt_lib
from curvax.problems import problems as problems_lib
from curvax.problems.problem import Problem


def loggable_state(state: Any) -> Dict[str, jax.Array]:
  """Scalar fields of NamedTuples in an optimizer state, by dotted path.

  Scalar leaves (and one-element ones, e.g. a per-group value with one group,
  returned as scalars) anywhere below a NamedTuple field, e.g.
  ``{'0.damping': ..., '1.count': ..., 'hyperparams.learning_rate': ...}``;
  arrays with more than one element are skipped. A state that packs its
  scalars into arrays (the fields ``_packed_fields``) and names them in
  ``_scalar_names`` (e.g. `curvax.transforms.CurvatureStepSizeState`) is
  logged by those names, and by its other fields as usual.
  """
  return _scalar_leaves(state, "", named=False)


def _is_packed(x) -> bool:
  return isinstance(x, tuple) and hasattr(type(x), "_scalar_names")


def _scalar_leaves(tree: Any, prefix: str, named: bool) -> Dict[str, jax.Array]:
  """`loggable_state` below ``prefix``; ``named``: the tree is a NamedTuple's field."""
  out = {}
  for path, leaf in jax.tree_util.tree_leaves_with_path(tree, is_leaf=_is_packed):
    here = prefix + _dotted(path)
    if _is_packed(leaf):
      for name in leaf._scalar_names:  # pylint: disable=protected-access
        value = getattr(leaf, name)
        # As below: numbers (no bools) with one element (a value per group: one group).
        if jnp.size(value) == 1 and jnp.issubdtype(jnp.result_type(value), jnp.number):
          out[here + name] = _loggable(value)
      for field in leaf._fields:
        if field not in leaf._packed_fields:  # pylint: disable=protected-access
          out.update(_scalar_leaves(getattr(leaf, field), here + field + ".", named=True))
      continue
    if not named and not any(isinstance(p, jax.tree_util.GetAttrKey) for p in path):
      continue
    if jnp.size(leaf) != 1 or not jnp.issubdtype(jnp.result_type(leaf), jnp.number):
      continue
    out[here[:-1]] = _loggable(leaf)
  return out


def _dotted(path) -> str:
  """``'a.0.b.'`` for the key path of ``x.a[0]['b']`` (empty for the root)."""
  parts = []
  for p in path:
    if isinstance(p, jax.tree_util.GetAttrKey):
      parts.append(p.name)
    elif isinstance(p, jax.tree_util.SequenceKey):
      parts.append(str(p.idx))
    elif isinstance(p, jax.tree_util.DictKey):
      parts.append(str(p.key))
  return "".join(part + "." for part in parts)


def _loggable(leaf) -> jax.Array:
  # A copy: the runner donates the state to the next step, which would delete
  # the state's own buffer before this value is read back.
  return jnp.array(leaf, copy=True).reshape(())


def _monitored(opt_state: Any) -> bool:
  """Whether ``opt_state`` holds a `curvax.diagnostics.monitor` state."""
  if "curvax.diagnostics" not in sys.modules:
    return False   # nobody built a monitor
  from curvax.diagnostics import records  # pylint: disable=import-outside-toplevel
  return records.find_state(opt_state) is not None


def _diagnostics_record(opt_state: Any) -> Dict[str, Any]:
  from curvax.diagnostics import records  # pylint: disable=import-outside-toplevel
  return records.record(opt_state)


def _float2str(x: float) -> str:
  """DeepOBS's ``float2str``: ten-digit scientific notation, trailing zeros of
  the mantissa dropped (``0.01 -> '1.e-02'``, ``1.58e-2 -> '1.58e-02'``)."""
  mantissa, exponent = f"{x:.10e}".split("e")
  return mantissa.rstrip("0") + "e" + exponent


def _folder_value(v) -> str:
  return _float2str(float(v)) if isinstance(v, (float, np.floating)) else str(v)


def _setting_folder(num_epochs, batch_size, weight_decay, hyperparams, settings=None):
  """DeepOBS's setting folder name, ``num_epochs__2__batch_size__128__learning_rate__1.e-02``.

  As DeepOBS's runners write it (``create_output_directory``): the weight decay
  when the problem has one, then the hyperparameters in alphabetical order,
  floats in DeepOBS's ``float2str`` form, so that a setting run with DeepOBS
  and with curvax lands in the same folder. ``settings`` (curvax's runner
  options that change what a run trains or reports, `runner_settings`, e.g.
  ``{'train_size': 256}``) follow in the same ``key__value`` style, those that
  are None left out: runs of one folder differ only in their seed.
  """
  parts = [f"num_epochs__{num_epochs}", f"batch_size__{batch_size}"]
  if weight_decay is not None:
    parts.append(f"weight_decay__{_folder_value(weight_decay)}")
  for k in sorted(hyperparams):
    parts.append(f"{k}__{_folder_value(hyperparams[k])}")
  for k, v in (settings or {}).items():
    if v is not None:
      parts.append(f"{k}__{_folder_value(v)}")
  return "__".join(parts)


def runner_settings(record: Dict[str, Any]) -> Dict[str, Any]:
  """The runner options of a results record that differ from their defaults.

  ``train_size`` (when a strict subset of the training split was used),
  ``eval_size``, ``eval_batch_size`` (when not the batch size), ``max_steps``,
  ``eval_every`` and ``time_budget``, in that order; records that lack a field
  (older files) leave it out. ``eval_every`` places the evaluation points (runs
  with other points cannot be averaged point by point), ``time_budget`` where
  training stops. The setting folder and `curvax.problems.plot.setting_label` show
  these next to DeepOBS's settings.
  """
  out = {}
  full = record.get("full_train_size")
  if full is not None and record.get("train_size") is not None and record["train_size"] < full:
    out["train_size"] = record["train_size"]
  if record.get("eval_size") is not None:
    out["eval_size"] = record["eval_size"]
  e, b = record.get("eval_batch_size"), record.get("batch_size")
  if e is not None and b is not None and e != b:
    out["eval_batch_size"] = e
  for k in ("max_steps", "eval_every", "time_budget"):
    if record.get(k) is not None:
      out[k] = record[k]
  return out


# What the JSON holds for +-inf (strict JSON has no infinities; NaN is null).
_JSON_INF = 1e308


def _jsonable(x):
  if isinstance(x, dict):
    return {str(k): _jsonable(v) for k, v in x.items()}
  if isinstance(x, (list, tuple)):
    return [_jsonable(v) for v in x]
  if isinstance(x, (np.generic, np.ndarray)) or isinstance(x, jax.Array):
    x = np.asarray(x).tolist()  # a Python scalar, or (nested) lists of them
    if isinstance(x, list):
      return _jsonable(x)
  if isinstance(x, float) and not math.isfinite(x):
    return None if math.isnan(x) else (_JSON_INF if x > 0 else -_JSON_INF)
  if isinstance(x, (int, float, str, bool)) or x is None:
    return x
  return str(x)


def from_jsonable(x):
  """`_jsonable`'s stand-ins back to floats: ``None`` -> nan, ``+-1e308`` -> ``+-inf``."""
  if isinstance(x, dict):
    return {k: from_jsonable(v) for k, v in x.items()}
  if isinstance(x, list):
    return [from_jsonable(v) for v in x]
  if x is None:
    return float("nan")
  if isinstance(x, float) and abs(x) >= _JSON_INF:
    return math.copysign(math.inf, x)
  return x


_ACCURACIES = ("train_accuracies", "valid_accuracies", "test_accuracies")
_METRICS = ("train_losses", "valid_losses", "test_losses") + _ACCURACIES


def _pad_diverged(record: Dict[str, Any], epochs: int, steps_per_epoch: int) -> None:
  """Pads a diverged run's evaluations to ``epochs + 1`` with the epoch-0 values.

  DeepOBS's PyTorch runner does this, so that its analyzer (which scores speed
  as the length of a curve that never reaches the target) ranks the run last.
  """
  done = len(record["test_losses"])
  missing = epochs + 1 - done
  if done == 0 or missing <= 0:
    return
  for key in _METRICS:
    if record.get(key):
      record[key] = record[key] + [record[key][0]] * missing
  record["eval_epochs"] = record["eval_epochs"] + [float(e) for e in range(done, epochs + 1)]
  record["eval_steps"] = record["eval_steps"] + [e * steps_per_epoch
                                                 for e in range(done, epochs + 1)]
  record["wall_times"] = record["wall_times"] + [None] * missing
  record["padded_evaluations"] = missing


#: At most this many programs of differently scheduled steps per call (`run`).
MAX_LAYOUTS = 4


def _schedule_value(value):
  if isinstance(value, tuple):
    return tuple(_schedule_value(v) for v in value)
  return value if isinstance(value, str) else bool(value)


def schedule_runs(schedule: Optional[Callable[[int], Any]], first: int,
                  count: int) -> Tuple[Tuple[Any, int], ...]:
  """Steps ``first .. first + count - 1`` as runs ``((value, length), ...)`` of
  equal ``schedule(t)``, each value as ``update(..., scheduled=...)`` takes it
  (a phase name, else a bool): one loop per run, each of its own variant.
  Without a schedule (``None``) the steps are one run of busy steps,
  ``((True, count),)``, called without ``scheduled``. A pair (a monitor's
  value, the optimizer's inside it) is normalised entry by entry."""
  if schedule is None:
    return ((True, count),) if count > 0 else ()
  runs = []
  for t in range(first, first + count):
    value = _schedule_value(schedule(t))
    if runs and runs[-1][0] == value:
      runs[-1] = (value, runs[-1][1] + 1)
    else:
      runs.append((value, 1))
  return tuple(runs)


def run(problem: Union[Problem, str], optimizer: Union[optax.GradientTransformation, str], *,
        epochs: Optional[int] = None, seed: int = 0, log_every: int = 10,
        eval_batch_size: Optional[int] = None, out: Optional[str] = None,
        hyperparams: Optional[dict] = None, optimizer_name: Optional[str] = None,
        max_steps: Optional[int] = None, train_size: Optional[int] = None,
        eval_size: Optional[int] = None, line_search_args: bool = False,
        init_params: Optional[Any] = None, init_model_state: Optional[Any] = None,
        time_budget: Optional[float] = None, eval_every: Optional[int] = None,
        callback: Optional[Callable[..., None]] = None,
        mesh: Optional[jax.sharding.Mesh] = None,
        steps_per_call: int = 1,
        scheduled: Union[None, str, Callable[[int], bool]] = None,
        monitor: Union[None, str, Dict[str, Any]] = None,
        verbose: bool = True) -> Dict[str, Any]:
  """Trains ``optimizer`` on ``problem`` and returns (and optionally writes) the results.

  Args:
    problem: a `Problem` or a problem name for `curvax.problems.get`.
    optimizer: any optax transformation, or a registered name
      (`curvax.problems.optimizers.names()`), built with ``hyperparams`` (and
      the run's steps per epoch, e.g. probabilistic_preconditioning's default
      ``restart_every``).
    epochs: number of epochs (default: the problem's DeepOBS budget).
    seed: seeds initialisation, shuffling, augmentation (training and the
      train metrics'), dropout.
    log_every: mini-batch loss / optimizer-state logging interval, in steps (>= 1),
      counted from each epoch's first step (``minibatch_steps`` lists the
      logged global steps).
    eval_batch_size: size of ``eval_batch`` (>= 1; default: the batch size).
    out: a folder; the results JSON goes to DeepOBS's layout
      ``out/<problem>/<optimizer>/<setting>/random_seed__<seed>__<time>.json``;
      ``<setting>`` also names ``train_size`` (if a strict subset), ``eval_size``,
      ``eval_batch_size`` (if not the batch size), ``max_steps``, ``eval_every``
      and ``time_budget`` when set (`runner_settings`), so that a folder holds only runs that differ in the seed.
    hyperparams: recorded in the JSON (and used to build a named optimizer).
    optimizer_name: recorded name (default: the registered name, else 'custom').
    max_steps: stop after this many steps (smoke runs); a final evaluation follows.
    train_size: train on the first ``train_size`` training examples only; the
      train metrics (``train_losses``, ``train_accuracies``) are then those of
      the first ``min(train_size, eval_size)`` examples of ``train_eval`` (the
      head of the training split), i.e. of examples trained on.
    eval_size: evaluate on the first ``eval_size`` examples of each split only.
    line_search_args: also pass ``value``, ``grad`` and ``value_fn`` (optax's
      line-search keywords): ``value_fn(p)`` is the objective whose ``value`` and
      ``grad`` at ``params`` these are, the training-mode loss on ``batch`` with
      this step's dropout key and the current batch-norm state.
    init_params: start from these parameters instead of ``problem.init`` (e.g.
      ``previous_result['params']`` to resume from a checkpoint); the optimizer
      state starts fresh.
    init_model_state: the matching non-trainable state (batch-norm statistics);
      default: the freshly initialised one.
    time_budget: stop once this many seconds of training time (compilation and
      evaluation excluded) have passed, then evaluate (``status='stopped'``).
      Each step is then waited for, so the check is exact to one step.
    eval_every: also evaluate every ``eval_every`` (>= 1) steps, not only at the end of
      each epoch (``eval_steps``/``eval_epochs`` say where).
    callback: called after every evaluation as ``callback(step, params,
      model_state, opt_state, record)`` (e.g. to keep checkpoints).
    mesh: run data-parallel on this `jax.sharding.Mesh` (e.g.
      `curvax.sharding.data_mesh`): ``batch`` and ``eval_batch`` are split along
      the mesh axis ``'data'`` (else its first axis), parameters, model and
      optimizer state and the training set are replicated (each device slices
      its examples of a batch locally: only indices move); batch means become
      all-reduces inside the step. Batch sizes must be divisible by the number
      of devices along that axis. See docs/multi_device.md.
    steps_per_call: run up to this many steps inside ONE jitted call (a
      ``lax.scan`` over the steps; the host then pays its per-call cost once per
      call, the remedy for small models on a GPU, see docs/performance.md). The
      results are those of one call per step: the mini-batch losses, optimizer
      state scalars and monitor records of every step come back stacked. A call
      ends early at the end of an epoch, at ``eval_every`` and ``max_steps``;
      each distinct length compiles once, so choose them multiples of it.
      ``time_budget`` is checked after each call. Measure before choosing: on
      2 CPU cores fmnist_2c2d trained 1.4-1.5x faster with 10 steps per call
      (`benchmarks/problems.py`), while other programs' loop bodies run slower
      than top-level steps on XLA:CPU (jax-ml/jax#12868).
    scheduled: host-side schedule, ``scheduled(t) -> bool`` for update ``t``
      (from 0): whether the optimizer has scheduled work there (or which: a
      string, passed on as ``update(..., scheduled=...)``), e.g.
      ``lambda t: curvax.diagnostics.is_scheduled(t, every=64)`` for a
      monitor, ``curvax.transforms.computes_curvature`` for
      curvature_step_size or ``curvax.transforms.estimation_phase`` for
      probabilistic_preconditioning (its phase by name); ``"auto"``: that of the
      registered optimizer named by ``optimizer``
      (`curvax.problems.optimizers.host_schedule`), with ``monitor=`` the
      monitor's (paired with the optimizer's, see ``monitor``). Steps without
      run a second compiled step, built with ``update(..., scheduled=False)``:
      no ``lax.cond``, on which GPU runtimes wait for the host
      (docs/performance.md). With ``steps_per_call``, a call runs one loop per
      run of steps of equal schedule (e.g. an epoch's estimation steps, then
      the others) when the run needs at most `MAX_LAYOUTS` such programs, else
      a call with any scheduled step runs the step with conds throughout. The
      results are those without it (up to rounding: the programs differ) when
      ``scheduled`` matches the optimizer's schedule.
    monitor: watch the run with `curvax.diagnostics.monitor` (Cockpit's
      instruments): a preset name (``'economy'``, ``'business'``, ``'full'``)
      or a dict of the monitor's keywords (``instruments``, ``every``,
      ``schedule``, ``curvature``, ``learning_rate``, ``hist_range``...); the
      optimizer is wrapped as ``monitor(optimizer, problem.apply_fn,
      problem.loss, **settings)``. Its steps are the optimizer's, unchanged;
      the settings are recorded under ``'monitor'`` and the records under
      ``'diagnostics'`` (`curvax.diagnostics.dashboard` draws them; the
      command line: ``python -m curvax.problems dashboard RESULT.json``), and
      ``optimizer_state`` logs the optimizer's fields as without the monitor.
      With ``monitor=``, ``scheduled(t)`` is the monitor's schedule
      (`curvax.diagnostics.is_scheduled`), or a pair ``(monitor's,
      optimizer's)``: the second goes to the optimizer inside the monitor
      (``update(..., inner_scheduled=...)``); ``"auto"`` gives the pair when
      the registered optimizer has a host schedule.
    verbose: print progress.

  Returns:
    The results dictionary written to JSON (with ``'path'`` when ``out`` is set),
    plus the final ``'params'`` and ``'model_state'`` (not written). Its values
    are the JSON's: a non-finite loss reads ``None`` (NaN) or ``+-1e308``
    (+-inf), as in the file. If the
    optimizer state holds a `curvax.diagnostics.monitor`, its records (one per
    tracked step, `curvax.diagnostics.merge`d) are under ``'diagnostics'``.
  """
  if log_every < 1:
    raise ValueError(f"log_every must be a positive number of steps, got {log_every}.")
  if scheduled is not None and not callable(scheduled) and scheduled != "auto":
    raise TypeError(f"scheduled must be a function step -> bool, 'auto' or None; got "
                    f"{scheduled!r}.")
  if scheduled == "auto" and monitor is None and not isinstance(optimizer, str):
    raise ValueError("scheduled='auto' needs a registered optimizer's name (its schedule: "
                     "curvax.problems.optimizers.host_schedule) or monitor=; pass the "
                     "schedule of your optimizer as a function step -> bool.")
  if max_steps is not None and max_steps < 1:
    raise ValueError(f"max_steps must be a positive number of steps (or None), got {max_steps}.")
  if isinstance(steps_per_call, bool) or not isinstance(steps_per_call, int) or steps_per_call < 1:
    raise ValueError(f"steps_per_call must be a positive int, got {steps_per_call!r}.")
  if eval_every is not None and eval_every < 1:
    raise ValueError(f"eval_every must be a positive number of steps, got {eval_every}.")
  if eval_batch_size is not None and eval_batch_size < 1:
    raise ValueError(f"eval_batch_size must be a positive number of examples (or None for "
                     f"the batch size), got {eval_batch_size}.")
  if isinstance(problem, str):
    problem = problems_lib.get(problem)
  x_all, y_all = problem.data("train")
  full_train_size = int(y_all.shape[0])
  if train_size is not None:
    x_all, y_all = x_all[:train_size], y_all[:train_size]
  n = int(y_all.shape[0])
  b = problem.batch_size
  e = b if eval_batch_size is None else eval_batch_size
  if b + e > n:
    raise ValueError(f"training set of {n} examples is too small for a batch of {b} "
                     f"and a disjoint eval_batch of {e}.")
  steps_per_epoch = n // b
  hyperparams = dict(hyperparams or {})
  registered = None
  if isinstance(optimizer, str):
    optimizer_name = optimizer_name or optimizer
    registered = optimizer
    optimizer, hyperparams = opt_lib.build(optimizer, problem, steps_per_epoch=steps_per_epoch,
                                           **hyperparams)
    if scheduled == "auto" and monitor is None:
      scheduled = opt_lib.host_schedule(registered, hyperparams)
  optimizer_name = optimizer_name or "custom"
  monitor_settings = None
  if monitor is not None:
    from curvax import diagnostics as diagnostics_lib  # pylint: disable=import-outside-toplevel
    if not isinstance(monitor, (str, dict)):
      raise TypeError(f"monitor must be a preset name or a dict of curvax.diagnostics.monitor "
                      f"keywords; got {type(monitor).__name__}.")
    monitor_settings = {"instruments": monitor} if isinstance(monitor, str) else dict(monitor)
    optimizer = diagnostics_lib.monitor(optimizer, problem.apply_fn, problem.loss,
                                        **monitor_settings)
    if scheduled == "auto":
      schedule_settings = {k: monitor_settings[k] for k in ("every", "schedule", "instruments")
                           if k in monitor_settings}
      tracks = lambda t: diagnostics_lib.is_scheduled(t, **schedule_settings)  # noqa: E731
      inner_schedule = (opt_lib.host_schedule(registered, hyperparams)
                        if registered is not None else None)
      # The monitor's schedule and, handed on through it, the optimizer's.
      scheduled = tracks if inner_schedule is None else (
          lambda t: (tracks(t), inner_schedule(t)))
  tx = optax.with_extra_args_support(optimizer)
  epochs = problem.num_epochs if epochs is None else epochs
  # With monitor=, the optimizer's own state fields keep their names in
  # `optimizer_state` (the monitor's values are under 'diagnostics').
  log_state = (loggable_state if monitor_settings is None
               else lambda state: loggable_state(state.inner_state))

  key = jax.random.PRNGKey(seed)
  k_init, k_perm, k_step = jax.random.split(key, 3)
  # Evaluation's key (train_eval's augmentation), folded with the step at each one.
  k_eval = jax.random.fold_in(key, 0x6576616C)   # b"eval"
  variables = problem.init(k_init)
  params, model_state = problem.split_variables(variables)
  if init_params is not None:
    _checks.check_tree_like(init_params, params, "init_params", f"{problem.name}'s parameters")
    params = jax.tree.map(jnp.asarray, init_params)
  if init_model_state is not None:
    model_state = init_model_state
  opt_state = tx.init(params)
  monitored = _monitored(opt_state)

  place = lambda tree: tree  # noqa: E731
  if mesh is not None:
    axis = "data" if "data" in mesh.axis_names else mesh.axis_names[0]
    for name, size in (("batch size", b), ("eval_batch_size", e)):
      if size % mesh.shape[axis]:
        raise ValueError(f"{name} {size} is not divisible by the {mesh.shape[axis]} devices "
                         f"of mesh axis {axis!r}.")
    place = lambda tree: sharding.shard_batch(tree, mesh, axis)  # noqa: E731

  def step(carry, x, y, perm, i, global_step, busy=True):
    params, model_state, opt_state = carry
    k_aug, k_drop, k_off, k_eaug = jax.random.split(jax.random.fold_in(k_step, global_step), 4)
    idx = jax.lax.dynamic_slice(perm, (i * b,), (b,))
    batch = place(problem.preprocess(*place((jnp.take(x, idx, axis=0), jnp.take(y, idx, axis=0))),
                                     k_aug, True))
    offset = jax.random.randint(k_off, (), 0, n - b - e + 1)
    eidx = jnp.take(perm, (i * b + b + offset + jnp.arange(e)) % n)
    eval_batch = place(problem.preprocess(
        *place((jnp.take(x, eidx, axis=0), jnp.take(y, eidx, axis=0))), k_eaug, True))
    (loss, new_state), grads = jax.value_and_grad(problem.train_loss, has_aux=True)(
        params, model_state, batch, k_drop)
    extra = {}
    if line_search_args:
      # The function whose value and gradient these are: the training-mode objective
      # with this step's dropout/latent key and batch statistics (an eval-mode
      # value_fn disagreed with `value` and `grad` on dropout and VAE problems).
      extra = dict(value=loss, grad=grads,
                   value_fn=lambda p: problem.train_loss(p, model_state, batch, k_drop)[0])
    # The host knows this step's scheduled work (False: none); a pair is the
    # monitor's and the optimizer's inside it.
    mon_busy, inner_busy = busy if isinstance(busy, tuple) else (busy, True)
    if mon_busy is not True:
      extra["scheduled"] = mon_busy
    if inner_busy is not True:
      extra["inner_scheduled"] = inner_busy
    updates, opt_state = tx.update(grads, opt_state, params, batch=batch,
                                   eval_batch=eval_batch, **extra)
    params = optax.apply_updates(params, updates)
    model_state = {**model_state, **new_state}
    return (params, model_state, opt_state), loss

  # The carry (params, model state, optimizer state) is donated: XLA updates it
  # in place instead of allocating and copying every buffer each step (large
  # for transforms with big states). The run works on a copy of the initial
  # carry, so arrays the caller passed in (init_params) stay valid.
  step_jit = jax.jit(step, donate_argnums=(0,), static_argnames="busy")
  perm_jit = jax.jit(lambda k: jax.random.permutation(k, n))

  def steps(carry, x, y, perm, i0, step0, *, layout):
    """The call's steps in one program, one loop per run ``(busy, length)`` of
    ``layout``; returns what the host logs of each step."""
    def body(busy, carry, j):
      carry, loss = step(carry, x, y, perm, i0 + j, step0 + j, busy)
      mon = None
      if monitored:   # the fields `curvax.diagnostics.record` reads, nothing params-sized
        from curvax.diagnostics import records  # pylint: disable=import-outside-toplevel
        mon = records.find_state(carry[2])._replace(
            inner_state=(), init_params=(), last_update=(), key=(), eigenvector=())
      return carry, (loss, log_state(carry[2]), mon)
    outs, offset = [], 0
    for busy, length in layout:
      carry, out = jax.lax.scan(functools.partial(body, busy), carry,
                                offset + jnp.arange(length))
      outs.append(out)
      offset += length
    return carry, (outs[0] if len(outs) == 1 else
                   jax.tree.map(lambda *parts: jnp.concatenate(parts), *outs))

  steps_jits: Dict[Tuple[Tuple[bool, int], ...], Callable[..., Any]] = {}

  def call_length(i, global_step):
    """Steps in the call that starts at step ``i`` of an epoch."""
    count = min(steps_per_call, steps_per_epoch - i)
    if max_steps is not None:
      count = min(count, max_steps - global_step)
    if eval_every is not None:
      count = min(count, eval_every - global_step % eval_every)
    return count

  def call_lengths():
    """The lengths of all calls of the run (if it runs to the end): each compiles once."""
    if steps_per_call == 1:
      return {1}
    # An epoch's calls depend only on where it starts relative to eval_every, unless
    # max_steps ends it: simulate each such epoch once.
    lengths, starts, global_step = set(), set(), 0
    for _ in range(epochs):
      if max_steps is not None and global_step >= max_steps:
        break
      start = global_step % eval_every if eval_every is not None else 0
      if start in starts and (max_steps is None or global_step + steps_per_epoch < max_steps):
        global_step += steps_per_epoch
        continue
      starts.add(start)
      i = 0
      while i < steps_per_epoch and (max_steps is None or global_step < max_steps):
        count = call_length(i, global_step)
        lengths.add(count)
        i += count
        global_step += count
    return lengths or {1}

  def steps_jit(layout):
    if layout not in steps_jits:
      steps_jits[layout] = jax.jit(functools.partial(steps, layout=layout), donate_argnums=(0,))
    return steps_jits[layout]

  def coarse(runs):
    """One run for the whole call: busy (with conds) unless none of its steps is
    (for pairs, entry by entry)."""
    values = [busy for busy, _ in runs]
    if all(isinstance(v, tuple) for v in values):
      busy = tuple(any(v is not False for v in entry) for entry in zip(*values))
    else:
      busy = any(v is not False for v in values)
    return ((busy, sum(length for _, length in runs)),)

  def planned_calls():
    """``(first step, length)`` of every call of the run (if it runs to the end)."""
    global_step = 0
    for _ in range(epochs):
      i = 0
      while i < steps_per_epoch and (max_steps is None or global_step < max_steps):
        count = call_length(i, global_step)
        yield global_step, count
        i += count
        global_step += count

  # A call's steps run in one loop per run of equal schedule, each loop of a
  # step compiled for it (without the conds where nothing is scheduled), when
  # the run's calls need at most MAX_LAYOUTS such programs (e.g. an
  # estimation at every epoch's start); else a call with any scheduled step is
  # compiled with the conds throughout and the others without.
  split_calls = False
  if scheduled is not None and steps_per_call > 1:
    layouts = set()
    for first, count in planned_calls():
      layouts.add(schedule_runs(scheduled, first, count))
      if len(layouts) > MAX_LAYOUTS:
        break
    split_calls = len(layouts) <= MAX_LAYOUTS

  def layout_of(first, count):
    runs = schedule_runs(scheduled, first, count)
    return runs if split_calls else coarse(runs)

  record: Dict[str, Any] = {
      "testproblem": problem.name, "batch_size": b, "num_epochs": epochs,
      "random_seed": seed, "weight_decay": problem.weight_decay,
      "optimizer_name": optimizer_name, "optimizer_hyperparams": hyperparams,
      **({"monitor": monitor_settings} if monitor_settings is not None else {}),
      # DeepOBS's key for a runner-side learning-rate schedule (lr_sched_epochs,
      # lr_sched_factors); curvax's optimizers carry their schedules inside.
      "analyzable_training_params": {},
      **{key: [] for key in _METRICS},
      "minibatch_train_losses": [], "minibatch_steps": [], "optimizer_state": {},
      "eval_steps": [], "eval_epochs": [], "wall_times": [],
      "eval_batch_size": e, "train_size": n, "full_train_size": full_train_size,
      "eval_size": eval_size, "max_steps": max_steps, "eval_every": eval_every,
      "time_budget": time_budget, "steps_per_epoch": steps_per_epoch,
      "status": "running", "stop_reason": None,
  }

  # train_eval is the head of the training split (`Problem`): with a training subset,
  # only its first n examples were trained on, so only those count as "train".
  train_eval_size = eval_size if train_size is None else (
      n if eval_size is None else min(n, eval_size))

  def evaluate(step_count, train_time):
    k = jax.random.fold_in(k_eval, step_count)
    m = problem.evaluate(params, model_state=model_state, splits=("train_eval",),
                         max_examples=train_eval_size, key=k)
    m.update(problem.evaluate(params, model_state=model_state, splits=("valid", "test"),
                              max_examples=eval_size, key=k))
    record["train_losses"].append(m["train_eval_loss"])
    record["valid_losses"].append(m["valid_loss"])
    record["test_losses"].append(m["test_loss"])
    if problem.has_accuracy:
      record["train_accuracies"].append(m["train_eval_accuracy"])
      record["valid_accuracies"].append(m["valid_accuracy"])
      record["test_accuracies"].append(m["test_accuracy"])
    record["eval_steps"].append(step_count)
    record["eval_epochs"].append(step_count / steps_per_epoch)
    record["wall_times"].append(train_time)
    return m

  def say(msg, end="\n"):
    if verbose:
      print(msg, end=end, file=sys.stdout, flush=True)

  t_compile = time.perf_counter()
  carry = jax.tree.map(jnp.copy, (params, model_state, opt_state))
  if steps_per_call > 1:
    # A loop's carry keeps its types: start from the dtypes that a step returns (a
    # state may settle, e.g. an int32 counter that a step returns as int64).
    settled = jax.eval_shape(step, carry, x_all, y_all, jnp.arange(n), 0, 0)[0]
    carry = jax.tree.map(lambda a, t: a.astype(t.dtype), carry, settled)
  if mesh is not None:
    carry, x_all, y_all = sharding.replicate((carry, x_all, y_all), mesh)
  perm0 = perm_jit(jax.random.fold_in(k_perm, 1))
  # Compile outside the timed loop (the jit cache keeps it; calling step_jit, not the
  # AOT executable, tolerates optimizer states whose dtypes settle after one step).
  if scheduled is None:
    plans = {((True, count),) for count in call_lengths()}
  else:
    plans = {layout_of(first, count) for first, count in planned_calls()}
  for layout in sorted(plans, key=repr):
    if sum(length for _, length in layout) == 1:
      step_jit.lower(carry, x_all, y_all, perm0, 0, 0, busy=layout[0][0]).compile()
    else:
      steps_jit(layout).lower(carry, x_all, y_all, perm0, 0, 0).compile()
  record["compile_time"] = time.perf_counter() - t_compile

  m = evaluate(0, 0.0)
  say(f"[{problem.name} / {optimizer_name} / seed {seed}] epoch 0: "
      + ", ".join(f"{k} {v:.4g}" for k, v in m.items()))
  # (call number, step, loss, state scalars, index into them or None) not yet read back
  pending = []
  # (step, loss, index or None) of every step not yet checked: divergence is
  # noticed at a logged step, and then dated to the first non-finite loss.
  unchecked = []
  calls = 0
  train_time, global_step = 0.0, 0
  tty = verbose and sys.stdout.isatty()

  def item(a, j):
    """Entry ``j`` of a stacked logged array (the array itself for ``j=None``), read back."""
    return np.asarray(a).item() if j is None else np.asarray(a)[j].item()

  def diverged_at(s, value):
    """The reason, dated to the first non-finite loss up to step ``s``."""
    first, first_value = s, value
    for t, loss_t, j in unchecked:
      if t > s:
        continue
      v = float(item(loss_t, j))
      if not math.isfinite(v):
        first, first_value = t, v
        break
    seen = "" if first == s else f" (noticed at step {s})"
    return f"non-finite mini-batch training loss ({first_value}) at step {first}{seen}"

  def flush(upto_all: bool):
    """Reads back logged values (all, or all but the newest call's) and checks divergence."""
    while pending and (upto_all or pending[0][0] != calls):
      _, s, loss, scalars, j = pending.pop(0)
      value = float(item(loss, j))
      record["minibatch_train_losses"].append(value)
      record["minibatch_steps"].append(s)
      for k, v in scalars.items():
        record["optimizer_state"].setdefault(k, []).append(item(v, j))
      if not math.isfinite(value):
        return diverged_at(s, value)
      unchecked[:] = [u for u in unchecked if u[0] > s]
    return None

  stop = None           # (status, reason) once training ends early
  last_eval = 0
  diagnostics = []

  def end_stretch(t_start, diverged=False):
    """Ends a timed stretch: waits, books its time, evaluates unless diverged."""
    nonlocal train_time, params, model_state, last_eval
    jax.block_until_ready(carry)
    train_time += time.perf_counter() - t_start
    reason = flush(upto_all=True)
    if diverged:
      return None   # the first reason stands; diverged parameters are not evaluated
    if reason is None and not math.isfinite(float(loss)):
      reason = diverged_at(global_step, float(loss))
    if reason is not None or global_step == last_eval:
      return reason
    params, model_state, opt_state = carry
    m = evaluate(global_step, train_time)
    last_eval = global_step
    if not math.isfinite(m["train_eval_loss"]):
      return f"non-finite train_eval loss at step {global_step}"
    say(f"step {global_step}, epoch {global_step / steps_per_epoch:.3g} "
        f"(train time {train_time:.1f}s): " + ", ".join(f"{k} {v:.4g}" for k, v in m.items()))
    if callback is not None:   # copies: the next step donates (deletes) the carry's buffers
      callback(global_step, *jax.tree.map(jnp.copy, (params, model_state, opt_state)), record)
    return None

  loss = jnp.zeros(())
  for epoch in range(1, epochs + 1):
    perm = perm_jit(jax.random.fold_in(k_perm, epoch))
    t_start = time.perf_counter()
    i = 0
    while i < steps_per_epoch:
      count = call_length(i, global_step)
      calls += 1
      first = global_step
      layout = layout_of(global_step, count)
      if count == 1:
        carry, loss = step_jit(carry, x_all, y_all, perm, i, global_step, busy=layout[0][0])
        logged, mons = None, None
      else:
        carry, (losses, logged, mons) = steps_jit(layout)(carry, x_all, y_all, perm, i,
                                                          global_step)
        loss = losses[-1]
        if monitored:
          mons = jax.device_get(mons)
      i += count
      global_step += count
      for j in range(count):
        s = first + j + 1
        in_epoch = i - count + j   # the step's mini-batch within the epoch, from 0
        unchecked.append((s, loss, None) if logged is None else (s, losses, j))
        if monitored:
          diagnostics.append(_diagnostics_record(
              carry[2] if mons is None else jax.tree.map(lambda a: a[j], mons)))  # pylint: disable=cell-var-from-loop
        if in_epoch % log_every == 0:   # DeepOBS: batch_count % train_log_interval
          if logged is None:
            pending.append((calls, s, loss, log_state(carry[2]), None))
          else:
            pending.append((calls, s, losses, logged, j))
      if pending and pending[-1][0] == calls:
        # The previous call's losses are long computed: reading them does not stall.
        reason = flush(upto_all=False)
        if reason is not None:
          stop = ("diverged", reason)
          break
        if tty:
          say(f"\repoch {epoch}/{epochs} step {i}/{steps_per_epoch} "
              f"loss {record['minibatch_train_losses'][-1]:.4g}" if
              record["minibatch_train_losses"] else "", end="")
      if max_steps is not None and global_step >= max_steps:
        stop = ("stopped", f"max_steps={max_steps} reached")
        break
      if time_budget is not None:
        jax.block_until_ready(loss)
        if train_time + time.perf_counter() - t_start >= time_budget:
          stop = ("stopped", f"time_budget={time_budget}s reached")
          break
      if eval_every is not None and global_step % eval_every == 0 and i < steps_per_epoch:
        if tty:
          say("")
        reason = end_stretch(t_start)
        if reason is not None:
          stop = ("diverged", reason)
          break
        t_start = time.perf_counter()
    if tty:
      say("")
    reason = end_stretch(t_start, diverged=stop is not None and stop[0] == "diverged")
    if reason is not None:
      stop = ("diverged", reason)
    if stop is not None:
      record["status"], record["stop_reason"] = stop
      say(f"stopped: {stop[1]}")
      break
  if record["status"] == "running":
    record["status"] = "completed"
  if (record["status"] == "diverged" and eval_every is None and max_steps is None
      and time_budget is None):
    _pad_diverged(record, epochs, steps_per_epoch)
  record["steps"] = global_step
  if monitored:
    from curvax import diagnostics as diagnostics_lib  # pylint: disable=import-outside-toplevel
    record["diagnostics"] = diagnostics_lib.merge([d for d in diagnostics if d])
  record["train_time"] = train_time
  if not problem.has_accuracy:
    for k in _ACCURACIES:
      del record[k]
  record = _jsonable(record)
  if out is not None:
    folder = os.path.join(out, problem.name, optimizer_name,
                          _setting_folder(epochs, b, problem.weight_decay, hyperparams,
                                          runner_settings(record)))
    os.makedirs(folder, exist_ok=True)
    stamp = time.strftime("%Y-%m-%d-%H-%M-%S")
    # Exclusive creation: two runs of one seed finishing within the same second
    # (small problems) get distinct files instead of the second overwriting the first.
    for copy in itertools.count():
      path = os.path.join(folder, f"random_seed__{seed}__{stamp}{f'-{copy}' if copy else ''}.json")
      try:
        f = open(path, "x")
      except FileExistsError:
        continue
      with f:
        json.dump(record, f, indent=1)
      break
    record["path"] = path
    say(f"wrote {path}")
  params, model_state, _ = carry
  record["params"], record["model_state"] = params, model_state
  return record
