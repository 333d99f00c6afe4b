"""A Cockpit-like dashboard: a multi-panel PNG from a run's monitor records.

One panel per instrument group found in the records (Dangel, thesis, Fig. 7.2 /
Table 7.1): time series (loss, norms, gradient tests, curvature, noise
criteria), the Alpha distribution, the last GradHist1d, the last GradHist2d as
an image over (parameter, gradient element), the layer-wise series
(``*_layers``, one line per parameter tensor) and, on a row of their own, the
last layer-wise GradHist1d as small multiples (Fig. 7.4b: the layer-wise view
shows degenerate layers that the network-wide histogram hides). Records holding
only some instruments draw only their panels.

matplotlib is imported lazily (a bare Figure, drawn with Agg) so that importing curvax never pulls
it in.
"""

from __future__ import annotations

from typing import Any, Dict, List, NamedTuple, Sequence

import numpy as np

from curvax.diagnostics import histograms
from curvax.diagnostics.records import merge

# Time series drawn together: (record keys, title, log scale).
_LINES = (
    (("loss",), "mini-batch loss", False),
    (("grad_norm",), "gradient norm", False),
    (("distance", "update_size"), "distance / update size", True),
    (("norm_test", "inner_test", "ortho_test"), "gradient tests", True),
    (("hess_max_ev",), "top Hessian eigenvalue", False),
    (("hess_trace",), "curvature trace", False),
    (("tic_diag", "tic_trace"), "TIC", True),
    (("mean_gsnr", "early_stopping", "cabs"), "noise criteria", False),
)
_LAYER_TITLES = {"grad_norm_layers": "gradient norm per layer",
                 "distance_layers": "distance per layer",
                 "update_size_layers": "update size per layer",
                 "hess_trace_layers": "curvature trace per layer"}
# Layer-wise histograms drawn at most (evenly spaced, first and last included).
MAX_LAYER_HISTOGRAMS = 8


class Panel(NamedTuple):
  """One panel: ``kind`` (``line``, ``layers``, ``alpha``, ``hist``,
  ``hist_2d``, ``layer_hists``), its title, the record keys it draws, the data
  and whether its y axis is logarithmic; ``layer_hists`` spans a row."""
  kind: str
  title: str
  keys: tuple
  data: Any
  log: bool = False


def _series(records, key):
  steps, vals = [], []
  for r in records:
    if key in r and r[key] is not None and np.isfinite(np.asarray(r[key], float)).all():
      steps.append(r["step"])
      vals.append(r[key])
  return np.asarray(steps), np.asarray(vals, float)


def _layer_series(records, key) -> Dict[str, tuple]:
  """Parameter path -> (steps, values) of a ``*_layers`` instrument (finite values)."""
  out: Dict[str, tuple] = {}
  for r in records:
    if not isinstance(r.get(key), dict):
      continue
    for path, v in r[key].items():
      if v is not None and np.isfinite(float(v)):
        steps, vals = out.setdefault(path, ([], []))
        steps.append(r["step"])
        vals.append(float(v))
  return {k: (np.asarray(s), np.asarray(v, float)) for k, (s, v) in out.items()}


def _last(records, key):
  values = [r[key] for r in records if r.get(key) is not None]
  return values[-1] if values else None


def _short(path: str) -> str:
  """``"['params']['Dense_0']['kernel']"`` -> ``"Dense_0/kernel"``."""
  parts = [p.strip("'\"") for p in path.strip("[]").split("][")]
  if len(parts) > 1 and parts[0] == "params":
    parts = parts[1:]
  return "/".join(parts)


def dashboard_panels(records: Sequence[Dict[str, Any]]) -> List[Panel]:
  """The panels `dashboard` draws for ``records`` (merged first), in order."""
  recs = merge(list(records))
  out: List[Panel] = []
  for keys, title, log in _LINES:
    data = [(k, *_series(recs, k)) for k in keys]
    data = [d for d in data if d[1].size]
    if data:
      out.append(Panel("line", title, tuple(d[0] for d in data), data, log))
  _, alphas = _series(recs, "alpha")
  if alphas.size:
    out.append(Panel("alpha", "Alpha", ("alpha",), alphas))
  last = _last(recs, "grad_hist_1d")
  if last is not None:
    out.append(Panel("hist", "gradient elements (last tracked step)", ("grad_hist_1d",),
                     np.asarray(last, float), True))
  last = _last(recs, "grad_hist_2d")
  if last is not None:
    out.append(Panel("hist_2d", "gradient elements vs parameters (last tracked step)",
                     ("grad_hist_2d",), np.asarray(last, float)))
  found = {k for r in recs for k in r if k.endswith("_layers")}
  layer_keys = [k for k in _LAYER_TITLES if k in found] + sorted(found - set(_LAYER_TITLES))
  for key in layer_keys:
    series = _layer_series(recs, key)
    if series:
      positive = all((v > 0).all() for _, v in series.values())
      out.append(Panel("layers", _LAYER_TITLES.get(key, key), (key,), series,
                       positive and key != "hess_trace_layers"))
  last = _last(recs, "layer_grad_hist_1d")
  if isinstance(last, dict) and last:
    items = list(last.items())
    if len(items) > MAX_LAYER_HISTOGRAMS:
      pick = np.unique(np.linspace(0, len(items) - 1, MAX_LAYER_HISTOGRAMS).round().astype(int))
      items = [items[i] for i in pick]
    title = f"gradient elements per layer (last tracked step; {len(items)} of {len(last)})"
    out.append(Panel("layer_hists", title, ("layer_grad_hist_1d",),
                     [(_short(k), np.asarray(v, float)) for k, v in items], True))
  return out


def _bars(ax, counts, value_range):
  from matplotlib.ticker import NullFormatter  # pylint: disable=g-import-not-at-top
  edges = np.linspace(value_range[0], value_range[1], counts.size + 1)
  ax.bar(edges[:-1], np.maximum(counts, 0.5), width=np.diff(edges), align="edge")
  ax.set_yscale("log")
  ax.yaxis.set_minor_formatter(NullFormatter())


def _draw(ax, panel: Panel, hist_range) -> None:
  """Draws one grid panel into ``ax``."""
  ax.set_title(panel.title, fontsize=10)
  if panel.kind == "line":
    for key, steps, vals in panel.data:
      ax.plot(steps, vals, ".-", ms=3, label=key)
    if panel.log and all((v > 0).all() for _, _, v in panel.data):
      ax.set_yscale("log")
    if len(panel.data) > 1:
      ax.legend(fontsize=7)
    ax.set_xlabel("step", fontsize=8)
  elif panel.kind == "layers":   # one line per parameter tensor
    for key, (steps, vals) in panel.data.items():
      ax.plot(steps, vals, ".-", ms=2, lw=0.8, label=_short(key))
    if panel.log:
      ax.set_yscale("log")
    if len(panel.data) <= 8:
      ax.legend(fontsize=6)
    ax.set_xlabel("step", fontsize=8)
  elif panel.kind == "alpha":
    bins = np.linspace(-3, 3, 31)
    clipped = np.clip(panel.data, -3, 3)
    ax.hist(clipped, bins=bins, alpha=0.5, label="all", density=True)
    tail = clipped[-max(1, len(clipped) // 10):]
    ax.hist(tail, bins=bins, alpha=0.5, label="last 10%", density=True)
    ax.axvline(0.0, color="k", lw=0.8)
    ax.legend(fontsize=7)
  elif panel.kind == "hist":
    _bars(ax, panel.data, hist_range)
  elif panel.kind == "hist_2d":   # rows: gradient bins, columns: parameter bins
    (t_lo, t_hi), (g_lo, g_hi) = histograms.HIST_2D_PARAM_RANGE, histograms.HIST_2D_GRAD_RANGE
    image = ax.imshow(np.log10(1.0 + np.maximum(panel.data, 0.0)), origin="lower",
                      aspect="auto", extent=(t_lo, t_hi, g_lo, g_hi), cmap="viridis")
    ax.set_xlabel("parameter", fontsize=8)
    ax.set_ylabel("gradient element", fontsize=8)
    ax.get_figure().colorbar(image, ax=ax, label="log10(1 + count)")
  else:
    raise ValueError(f"unknown panel kind {panel.kind!r}.")


def dashboard(records: Sequence[Dict[str, Any]], path: str, title: str = "curvax cockpit",
              hist_range: tuple = (-2.0, 2.0)) -> str:
  """Writes a dashboard PNG to ``path`` and returns ``path``.

  Args:
    records: the list of `record` dicts of a run (Alpha is folded back onto its
      step with `merge`); panels (`dashboard_panels`) for instruments absent from the
      records are left out.
    path: output file (PNG).
    title: figure title.
    hist_range: value range of GradHist1d and its layer-wise variant (as
      configured in the monitor); GradHist2d's axes are the monitor's fixed
      layout (`histograms.HIST_2D_PARAM_RANGE`, `histograms.HIST_2D_GRAD_RANGE`).

  Raises:
    ValueError: if the records hold no instrument values.
  """
  # A bare Figure draws with Agg whatever pyplot's backend is: no global
  # backend switch (which would silence plt.show() in a user's notebook).
  from matplotlib.figure import Figure  # pylint: disable=g-import-not-at-top

  chosen = dashboard_panels(records)
  if not chosen:
    raise ValueError("records hold no instrument values to plot.")
  grid = [p for p in chosen if p.kind != "layer_hists"]
  wide = [p for p in chosen if p.kind == "layer_hists"]
  cols = 3
  grid_rows = -(-len(grid) // cols)
  ratios = ([grid_rows] if grid else []) + [1] * len(wide)
  fig = Figure(figsize=(4.2 * cols, 3.0 * sum(ratios)), layout="constrained")
  subfigs = list(fig.subfigures(len(ratios), 1, squeeze=False, height_ratios=ratios)[:, 0])
  if grid:
    axes = subfigs.pop(0).subplots(grid_rows, cols, squeeze=False)
    for ax, panel in zip(axes.flat, grid):
      _draw(ax, panel, hist_range)
    for ax in list(axes.flat)[len(grid):]:
      ax.axis("off")
  for sub, panel in zip(subfigs, wide):   # small multiples on a row of their own
    sub.suptitle(panel.title, fontsize=10)
    for ax, (name, counts) in zip(sub.subplots(1, len(panel.data), squeeze=False).flat,
                                  panel.data):
      _bars(ax, counts, hist_range)
      ax.set_title(name, fontsize=7)
      ax.tick_params(labelsize=6)
  fig.suptitle(title)
  fig.savefig(path, dpi=90)
  return path
