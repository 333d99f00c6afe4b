"""A Cockpit-like dashboard: a multi-panel PNG from a run's monitor records.

matplotlib is imported lazily (a bare Figure, drawn with Agg) so that importing curvax never pulls
it in.
"""

from __future__ import annotations

from typing import Any, Dict, List, Sequence

import numpy as np

from curvax.diagnostics.records import merge


def _series(records, key):
  steps, vals = [], []
  for r in records:
    if key in r and r[key] is not None and np.isfinite(np.asarray(r[key], float)).all():
      steps.append(r["step"])
      vals.append(r[key])
  return np.asarray(steps), np.asarray(vals, float)


def dashboard(records: Sequence[Dict[str, Any]], path: str, title: str = "curvax cockpit",
              hist_range: tuple = (-2.0, 2.0)) -> str:
  """Writes a dashboard PNG to ``path`` and returns ``path``.

  Args:
    records: the list of `record` dicts of a run (Alpha is folded back onto its
      step with `merge`); panels for instruments absent from the records are
      left out.
    path: output file (PNG).
    title: figure title.
    hist_range: value range of GradHist1d (as configured in the monitor).
  """
  # A bare Figure draws with Agg whatever pyplot's backend is: no global
  # backend switch (which would silence plt.show() in a user's notebook).
  from matplotlib.figure import Figure  # pylint: disable=g-import-not-at-top

  recs: List[Dict[str, Any]] = merge(list(records))
  panels = []

  def line(keys, label, log=False):
    data = [(k, *_series(recs, k)) for k in keys]
    data = [d for d in data if d[1].size]
    if data:
      panels.append(("line", label, data, log))

  line(["loss"], "mini-batch loss")
  line(["grad_norm"], "gradient norm")
  line(["distance", "update_size"], "distance / update size", log=True)
  line(["norm_test", "inner_test", "ortho_test"], "gradient tests", log=True)
  line(["hess_max_ev"], "top Hessian eigenvalue")
  line(["hess_trace"], "curvature trace")
  line(["tic_diag", "tic_trace"], "TIC", log=True)
  line(["mean_gsnr", "early_stopping", "cabs"], "noise criteria")
  _, alphas = _series(recs, "alpha")
  if alphas.size:
    panels.append(("alpha", "Alpha", alphas, False))
  hists = [r["grad_hist_1d"] for r in recs if "grad_hist_1d" in r]
  if hists:
    panels.append(("hist", "gradient elements (last tracked step)", np.asarray(hists[-1]),
                   False))
  if not panels:
    raise ValueError("records hold no instrument values to plot.")

  cols = 3
  rows = -(-len(panels) // cols)
  fig = Figure(figsize=(4.2 * cols, 3.0 * rows))
  axes = fig.subplots(rows, cols, squeeze=False)
  for ax, (kind, label, data, log) in zip(axes.flat, panels):
    ax.set_title(label, fontsize=10)
    if kind == "line":
      for key, steps, vals in data:
        ax.plot(steps, vals, ".-", ms=3, label=key)
      if log and all((v > 0).all() for _, _, v in data):
        ax.set_yscale("log")
      if len(data) > 1:
        ax.legend(fontsize=7)
      ax.set_xlabel("step", fontsize=8)
    elif kind == "alpha":
      bins = np.linspace(-3, 3, 31)
      clipped = np.clip(data, -3, 3)
      ax.hist(clipped, bins=bins, alpha=0.5, label="all", density=True)
      tail = clipped[-max(1, len(clipped) // 10):]
      ax.hist(tail, bins=bins, alpha=0.5, label="last 10%", density=True)
      ax.axvline(0.0, color="k", lw=0.8)
      ax.legend(fontsize=7)
    else:
      edges = np.linspace(hist_range[0], hist_range[1], data.size + 1)
      ax.bar(edges[:-1], np.maximum(data, 0.5), width=np.diff(edges), align="edge")
      ax.set_yscale("log")
  for ax in list(axes.flat)[len(panels):]:
    ax.axis("off")
  fig.suptitle(title)
  fig.tight_layout()
  fig.savefig(path, dpi=90)
  return path
