"""The README's first command, `python -m curvax.demo`, runs and every optimizer learns."""

import re

from curvax import demo


def test_demo_runs_and_every_optimizer_lowers_the_test_loss(capsys):
  demo.main()
  out = capsys.readouterr().out
  initial = float(re.search(r"\(initial\)\s+([0-9.]+)", out).group(1))
  rows = dict(re.findall(r"^\s+(\S+)\s+([0-9.]+)\s+[0-9.]+\s+[0-9.]+s$", out, re.M))
  assert set(rows) == {"sgd(0.5)", "adam(1e-2)", "hessian_free", "curvature_step_size(sgd)",
                       "probabilistic_preconditioning"}
  assert all(float(v) < 0.8 * initial for v in rows.values()), rows
  assert "v'Gv" in out and "top-3 GGN eigenvalues" in out and "per-example norms" in out
