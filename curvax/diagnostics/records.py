"""Reading a monitor's values out of an optimizer state, as JSON-ready records."""

from __future__ import annotations

from typing import Any, Dict, List, Optional

import jax
import numpy as np

from curvax.diagnostics.monitor import MonitorState


def _is_variable(x: Any) -> bool:
  from flax import nnx  # pylint: disable=import-outside-toplevel
  return isinstance(x, nnx.Variable)


def _value(variable: Any) -> Any:
  """An nnx variable's value (``get_value`` in recent Flax, ``.value`` in 0.11)."""
  get = getattr(variable, "get_value", None)
  return get() if get is not None else variable.value


def find_state(opt_state: Any) -> Optional[MonitorState]:
  """The first `MonitorState` inside ``opt_state`` (chain, inject_hyperparams,
  ``nnx.Optimizer.opt_state``, whose arrays are wrapped in ``nnx`` variables:
  unwrapped here)."""
  for leaf in jax.tree_util.tree_leaves(
      opt_state, is_leaf=lambda x: isinstance(x, MonitorState)):
    if isinstance(leaf, MonitorState):
      return jax.tree_util.tree_map(lambda x: _value(x) if _is_variable(x) else x, leaf,
                                    is_leaf=_is_variable)
  return None


# Histogram counts: float32 in the state (they never wrap), whole numbers, written as ints.
_COUNTS = ("grad_hist_1d", "layer_grad_hist_1d", "grad_hist_2d")


def _json(value: Any, integral: bool = False) -> Any:
  if isinstance(value, (dict, list, tuple)) or not hasattr(value, "shape"):
    leaves = jax.tree_util.tree_leaves_with_path(value)
    return {jax.tree_util.keystr(p): _json(v, integral) for p, v in leaves}
  arr = np.asarray(value)
  if integral:
    arr = arr.astype(np.int64)
  return arr.item() if arr.ndim == 0 else arr.tolist()


def record(opt_state: Any) -> Dict[str, Any]:
  """What the last update computed, as plain Python (floats, lists, dicts).

  Keys: ``step`` and every instrument (``*_layers`` are dicts keyed by the
  parameter path) when the last update was a tracked step; ``alpha`` and
  ``alpha_step`` when it completed an Alpha. ``{}`` when it computed nothing.
  A training loop (e.g. the curvax.problems runner) appends the non-empty
  records to a list and writes that list to its JSON. Non-finite values stay
  Python floats (``nan``, ``inf``), which ``json.dump`` writes as the
  non-standard ``NaN`` / ``Infinity`` (``allow_nan=False`` refuses them); the
  runner writes ``null`` / ``+-1e308`` instead, which strict parsers accept.

  Raises:
    ValueError: if ``opt_state`` holds no monitor state, or a batched one.
  """
  state = find_state(opt_state)
  if state is None:
    raise ValueError("opt_state holds no curvax.diagnostics.monitor state.")
  if np.ndim(state.tracked) != 0:
    raise ValueError(
        f"record expects the optimizer state of one run; this monitor state is batched "
        f"(its `tracked` has shape {np.shape(state.tracked)}, e.g. from jax.vmap over "
        "seeds): record each run's, e.g. record(jax.tree.map(lambda x: x[i], opt_state)).")
  out: Dict[str, Any] = {}
  if bool(state.tracked):
    out["step"] = int(state.tracked_step)
    # One transfer per packed vector, then numpy slices (not a device op per value).
    diagnostics = jax.tree_util.tree_map(np.asarray, state.diagnostics)
    for name, value in diagnostics.items():
      out[name] = _json(value, name in _COUNTS)
  if bool(state.alpha_fresh):
    out["alpha"] = float(state.alpha)
    out["alpha_step"] = int(state.alpha_step)
  return out


def merge(records: List[Dict[str, Any]]) -> List[Dict[str, Any]]:
  """Folds Alpha (reported one update late) back onto the record of its step."""
  by_step: Dict[int, Dict[str, Any]] = {}
  order = []
  for rec in records:
    if "step" in rec:
      step = rec["step"]
      if step not in by_step:
        by_step[step] = {}
        order.append(step)
      by_step[step].update({k: v for k, v in rec.items() if k not in ("alpha", "alpha_step")})
    if "alpha" in rec:
      step = rec.get("alpha_step", rec.get("step"))   # merged records hold "step" only
      if step not in by_step:
        by_step[step] = {"step": step}
        order.append(step)
      by_step[step]["alpha"] = rec["alpha"]
  return [by_step[s] for s in sorted(order)]
