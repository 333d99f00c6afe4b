"""Every research notebook runs top to bottom on the smoke budget.

``CURVAX_NOTEBOOK_BUDGET=smoke`` shrinks epochs and grids; a cell that raises
fails the test with the cell's source and traceback. The committed outputs come
from full-budget runs (see each notebook's run record).
"""

import glob
import importlib.util
import os

import pytest

pytest.importorskip("nbclient")
pytest.importorskip("nbformat")
pytest.importorskip("matplotlib")

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
NOTEBOOKS = sorted(glob.glob(os.path.join(ROOT, "notebooks", "*.ipynb")))


def _executor():
  spec = importlib.util.spec_from_file_location(
      "curvax_notebook_execute", os.path.join(ROOT, "notebooks", "execute.py"))
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)
  return module


def test_there_are_notebooks():
  assert NOTEBOOKS, "no notebooks found under notebooks/"


@pytest.mark.parametrize("path", NOTEBOOKS, ids=[os.path.basename(p) for p in NOTEBOOKS])
def test_notebook_runs_on_smoke_budget(path, monkeypatch):
  monkeypatch.setenv("MPLBACKEND", "Agg")
  # Notebooks run in float32, as users run them (the test session enables x64).
  monkeypatch.delenv("JAX_ENABLE_X64", raising=False)
  _executor().execute(path, budget="smoke", write=False, timeout=600)
