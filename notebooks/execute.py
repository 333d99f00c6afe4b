"""Executes curvax's research notebooks and records the run at their top.

Every notebook reads its budget from the environment variable
``CURVAX_NOTEBOOK_BUDGET``: ``"full"`` (the default; the committed outputs) or
``"smoke"`` (a few steps and a tiny grid, used by ``tests/test_notebooks.py`` so
that every cell is exercised in CI within seconds to a minute per notebook).

Usage::

  python notebooks/execute.py notebooks/02_hessian_free_late_phase.ipynb          # full, in place
  python notebooks/execute.py --budget smoke notebooks/*.ipynb --no-write          # check only

A full run writes the outputs into the notebook and puts a markdown cell tagged
``run-record`` right after the title, stating the budget, the hardware, the
software versions and the wall time of that run.
"""

from __future__ import annotations

import argparse
import datetime
import os
import platform
import sys
import time
from typing import Optional

import nbformat
from nbclient import NotebookClient

BUDGET_VARIABLE = "CURVAX_NOTEBOOK_BUDGET"
RECORD_TAG = "run-record"


def _cpu_name() -> str:
  try:
    with open("/proc/cpuinfo") as f:
      for line in f:
        if line.startswith("model name"):
          return line.split(":", 1)[1].strip()
  except OSError:
    pass
  return platform.processor() or platform.machine()


def hardware() -> str:
  """One line naming the accelerator (or CPU), core count and software versions."""
  import jax  # pylint: disable=g-import-not-at-top
  import flax  # pylint: disable=g-import-not-at-top
  import optax  # pylint: disable=g-import-not-at-top
  devices = jax.devices()
  backend = jax.default_backend()
  if backend == "cpu":
    where = f"CPU only ({_cpu_name()}, {os.cpu_count()} cores)"
  else:
    where = f"{len(devices)} x {devices[0].device_kind} ({backend})"
  return (f"{where}; Python {platform.python_version()}, JAX {jax.__version__}, "
          f"optax {optax.__version__}, Flax {flax.__version__}")


def _set_record(nb, budget: str, seconds: float) -> None:
  text = (f"**Run record.** These outputs come from one top-to-bottom run with "
          f"`{BUDGET_VARIABLE}={budget}` on {hardware()}, "
          f"finished {datetime.date.today().isoformat()}, wall time "
          f"{seconds / 60:.1f} min (`python notebooks/execute.py {{this notebook}}`).")
  for cell in nb.cells:
    if RECORD_TAG in cell.get("metadata", {}).get("tags", []):
      cell.source = text
      return
  cell = nbformat.v4.new_markdown_cell(text, metadata={"tags": [RECORD_TAG]})
  nb.cells.insert(1 if nb.cells and nb.cells[0].cell_type == "markdown" else 0, cell)


def execute(path: str, budget: str = "full", write: bool = True,
            timeout: Optional[int] = None) -> float:
  """Runs the notebook at ``path`` top to bottom; returns the wall time in seconds.

  Raises ``nbclient.exceptions.CellExecutionError`` (naming the cell) if a cell
  fails. The kernel runs in the notebook's folder with ``CURVAX_NOTEBOOK_BUDGET``
  set to ``budget``.
  """
  if budget not in ("full", "smoke"):
    raise ValueError(f"budget must be 'full' or 'smoke', got {budget!r}.")
  nb = nbformat.read(path, as_version=4)
  old = os.environ.get(BUDGET_VARIABLE)
  os.environ[BUDGET_VARIABLE] = budget
  try:
    client = NotebookClient(
        nb, timeout=timeout, kernel_name="python3",
        resources={"metadata": {"path": os.path.dirname(os.path.abspath(path))}})
    start = time.perf_counter()
    client.execute()
    seconds = time.perf_counter() - start
  finally:
    if old is None:
      os.environ.pop(BUDGET_VARIABLE, None)
    else:
      os.environ[BUDGET_VARIABLE] = old
  if write:
    _set_record(nb, budget, seconds)
    nbformat.write(nb, path)
  return seconds


def main(argv=None) -> int:
  parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
  parser.add_argument("notebooks", nargs="+")
  parser.add_argument("--budget", default="full", choices=("full", "smoke"))
  parser.add_argument("--no-write", action="store_true",
                      help="execute only; leave the files unchanged")
  args = parser.parse_args(argv)
  for path in args.notebooks:
    seconds = execute(path, args.budget, write=not args.no_write)
    print(f"{path}: {args.budget} run in {seconds / 60:.1f} min", flush=True)
  return 0


if __name__ == "__main__":
  sys.exit(main())
