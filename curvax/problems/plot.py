"""DeepOBS-style learning curves from the runner's JSON results (matplotlib).

For each test problem found under a results folder, one PNG: rows test loss,
train(-eval) loss and, for classification problems, test and train accuracy
(DeepOBS's performance plot, seed 001 Fig. 5.2); the left column against epochs,
the right one against training wall time. One colour per setting (optimizer,
hyperparameters, batch size, number of epochs and, if set, weight decay: what
DeepOBS's setting folders separate; and the runner's training subset, evaluation
subset, eval_batch size, step limit, evaluation interval and time budget where
they are not the defaults, see
`curvax.problems.runner.runner_settings`); the line is the mean over the setting's
seeds, the band one standard deviation across seeds either side of it, as in
DeepOBS (runs that stopped early contribute to the points they reached; a
diverged run's padded evaluations, see `curvax.problems.runner`, are its
epoch-0 values, as DeepOBS's).
"""

from __future__ import annotations

import collections
import glob
import json
import os
from typing import Dict, List, Optional

import numpy as np

from curvax.problems.runner import runner_settings

ROWS = (("test_losses", "test loss"), ("train_losses", "train loss"),
        ("test_accuracies", "test accuracy"), ("train_accuracies", "train accuracy"))


def setting_label(r: dict) -> str:
  """A run's setting as a label: ``'sgd (learning_rate=0.01), batch_size=128, num_epochs=2'``.

  Runs share a label exactly when they share optimizer name, hyperparameters,
  batch size, number of epochs, weight decay and the runner's non-default
  ``train_size``, ``eval_size``, ``eval_batch_size``, ``max_steps``,
  ``eval_every`` and ``time_budget`` (`curvax.problems.runner.runner_settings`, e.g. ``..., train_size=256``;
  fields missing from ``r`` are left out), i.e. when they differ only in their
  seed.
  """
  hp = r.get("optimizer_hyperparams") or {}
  label = str(r.get("optimizer_name", "?"))
  if hp:
    label += " (" + ", ".join(f"{k}={v}" for k, v in sorted(hp.items())) + ")"
  setting = [f"{k}={r[k]}" for k in ("batch_size", "num_epochs") if r.get(k) is not None]
  if r.get("weight_decay"):
    setting.append(f"weight_decay={r['weight_decay']}")
  setting += [f"{k}={v}" for k, v in runner_settings(r).items()]
  return ", ".join([label] + setting)


def load_results(folder: str) -> Dict[str, Dict[str, List[dict]]]:
  """``{problem: {setting label: [run, ...]}}`` for every results JSON under ``folder``.

  Runs are grouped by `setting_label`: only runs that differ in nothing but
  their seed are averaged together.
  """
  runs = collections.defaultdict(lambda: collections.defaultdict(list))
  for path in sorted(glob.glob(os.path.join(folder, "**", "*.json"), recursive=True)):
    try:
      with open(path) as f:
        r = json.load(f)
    except (OSError, ValueError):
      continue
    if not isinstance(r, dict) or "testproblem" not in r or "test_losses" not in r:
      continue
    runs[r["testproblem"]][setting_label(r)].append(r)
  return runs


def _stack(curves: List[List[Optional[float]]]) -> np.ndarray:
  length = max(len(c) for c in curves)
  out = np.full((len(curves), length), np.nan)
  for i, c in enumerate(curves):
    out[i, :len(c)] = [np.nan if v is None else v for v in c]
  return out


def plot(folder: str, out: Optional[str] = None) -> List[str]:
  """Draws one PNG per problem found under ``folder``; returns the written paths.

  ``out`` is a folder (default: ``folder``) that receives ``<problem>.png`` for
  each problem, or a file name ending in ``.png``, allowed only when ``folder``
  holds results of a single problem.

  Raises:
    FileNotFoundError: if there are no results JSON files under ``folder``.
    ValueError: if ``out`` ends in ``.png`` and there are several problems (they
      would overwrite each other).
  """
  # A bare Figure draws with Agg whatever pyplot's backend is: no global
  # backend switch (which would silence plt.show() in a user's notebook).
  from matplotlib.figure import Figure  # pylint: disable=import-outside-toplevel

  runs = load_results(folder)
  if not runs:
    raise FileNotFoundError(f"no curvax/DeepOBS results JSON files under {folder}.")
  single_file = out is not None and out.lower().endswith(".png")
  if single_file and len(runs) > 1:
    raise ValueError(f"out={out!r} is a single .png file, but there are results of "
                     f"{len(runs)} problems under {folder} ({', '.join(sorted(runs))}); "
                     f"pass a folder instead to get one <problem>.png each.")
  written = []
  for problem, settings in sorted(runs.items()):
    rows = [(k, t) for k, t in ROWS
            if any(k in r for rs in settings.values() for r in rs)]
    fig = Figure(figsize=(10, 2.6 * len(rows)))
    axes = fig.subplots(len(rows), 2, squeeze=False)
    for ci, (label, rs) in enumerate(sorted(settings.items())):
      color = f"C{ci % 10}"
      for ri, (key, title) in enumerate(rows):
        curves = [r[key] for r in rs if key in r and r[key]]
        if not curves:
          continue
        y = _stack(curves)
        epochs = _stack([r.get("eval_epochs") or list(range(len(r[key]))) for r in rs
                         if key in r and r[key]])
        times = _stack([r.get("wall_times") or [np.nan] * len(r[key]) for r in rs
                        if key in r and r[key]])
        with np.errstate(all="ignore"), _quiet():
          mean = np.nanmean(y, axis=0)
          std = np.nanstd(y, axis=0)   # numpy's (and DeepOBS's) population std
          lo, hi = mean - std, mean + std
          xe, xt = np.nanmean(epochs, axis=0), np.nanmean(times, axis=0)
        for col, x in enumerate((xe, xt)):
          ax = axes[ri, col]
          ax.plot(x, mean, color=color, label=f"{label} [{len(curves)} seed(s)]")
          if len(curves) > 1:
            ax.fill_between(x, lo, hi, color=color, alpha=0.25, linewidth=0)
          ax.set_ylabel(title)
          ax.set_xlabel("epochs" if col == 0 else "training wall time [s]")
          ax.grid(alpha=0.3)
    axes[0, 0].legend(fontsize=7)
    fig.suptitle(problem)
    fig.tight_layout()
    if single_file:
      path = out
    else:
      os.makedirs(out or folder, exist_ok=True)
      path = os.path.join(out or folder, f"{problem}.png")
    fig.savefig(path, dpi=100)
    written.append(path)
  return written


class _quiet:
  def __enter__(self):
    import warnings  # pylint: disable=import-outside-toplevel
    self._w = warnings.catch_warnings()
    self._w.__enter__()
    warnings.simplefilter("ignore", RuntimeWarning)

  def __exit__(self, *a):
    return self._w.__exit__(*a)
