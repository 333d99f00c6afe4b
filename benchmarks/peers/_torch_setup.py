"""Set-up shared by the PyTorch peer benchmarks (not a curvax dependency)."""

from __future__ import annotations

import argparse
import warnings
from typing import Callable, Tuple

import torch
from backpack import extend


def parser(description: str, repeats: int) -> argparse.ArgumentParser:
  """``--batch``, ``--threads`` and ``--repeats``, the options every peer script has."""
  ap = argparse.ArgumentParser(description=description)
  ap.add_argument("--batch", type=int, default=128)
  ap.add_argument("--threads", type=int, default=None,
                  help="torch.set_num_threads (default: torch's, i.e. the cores)")
  ap.add_argument("--repeats", type=int, default=repeats)
  return ap


def plain_and_extended(make_model: Callable[[], torch.nn.Module], threads=None
                       ) -> Tuple[torch.nn.Module, torch.nn.Module]:
  """Two copies of one initialisation: plain, and extended for BackPACK.

  The plain model times plain steps (no BackPACK hooks on its backward pass).
  BackPACK's hooks fire on every backward pass of the extended one; the input
  needs no gradient, so torch warns that the full backward hooks see module
  outputs only, which is all BackPACK needs: that warning is silenced.
  """
  if threads is not None:
    torch.set_num_threads(threads)
  torch.manual_seed(0)
  warnings.filterwarnings("ignore", message="Full backward hook is firing")
  plain = make_model()
  extended = extend(make_model())
  extended.load_state_dict(plain.state_dict())
  return plain, extended
