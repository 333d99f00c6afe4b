"""DeepOBS-style benchmark problems, a runner, results and plots.

``import curvax`` loads it on first use of ``curvax.problems`` (or import it
explicitly, ``import curvax.problems``). See `get` for the problems, `run` for
the runner, and ``python -m curvax.problems --help`` for the command line.
"""

from curvax.problems.data import DataNotFoundError, download
from curvax.problems.problem import EVAL_SPLITS, Problem
from curvax.problems.problems import PARAM_COUNTS, get, kernel_l2, names

__all__ = ["DataNotFoundError", "EVAL_SPLITS", "PARAM_COUNTS", "Problem", "download", "get",
           "kernel_l2", "names"]

from curvax.problems import optimizers, plot  # noqa: E402
from curvax.problems.runner import loggable_state, run  # noqa: E402

__all__ += ["loggable_state", "optimizers", "plot", "run"]
