"""Cockpit (PyTorch + BackPACK) on the 3c3d CNN, timed on this machine.

The peer of ``benchmarks/diagnostics.py``: the same network (DeepOBS CIFAR-10
3c3d, 895,210 parameters: conv 64@5x5 valid, conv 96@3x3 valid, conv 128@3x3
same, each ReLU + 3x3/2 max-pool with TensorFlow's "same" padding, then dense
512, 256, 10), random data of CIFAR-10 shapes, batch 128, SGD, softmax
cross-entropy, and Cockpit's three configurations (``economy``, ``business``,
``full``; Schneider et al. 2021, seed 001 appendix C), each as a ratio of the
time of a plain PyTorch SGD step (forward, backward, update):

* every step tracked (``track_schedule=linear(1)``), a block of steps;
* every k-th step (``linear(k)``), a block of k steps: tracked, the step after
  (Cockpit's Alpha end point) and k - 2 untracked ones, amortised.

Cockpit's published ratios (GPU) are 1.5x / 2.0x / 21x every step and
1.0x / 1.0x / 1.3x every 64th; this script measures them on the machine (and
core count) that ``benchmarks/diagnostics.py`` runs on, so that curvax's
ratios can be compared with Cockpit's on the same hardware.

Not a curvax dependency (pyproject's optional extra ``peers`` lists them).
Install the peers into their own environment (PyPI's default torch wheel is a
CUDA build of several GB; a CPU build is enough):

  python -m venv /tmp/peers && /tmp/peers/bin/pip install torch \
      cockpit-for-pytorch backpack-for-pytorch "setuptools<81"
  /tmp/peers/bin/python benchmarks/peers/cockpit_3c3d.py [--threads 2] [--every 64]

(cockpit-for-pytorch 1.0.2 imports ``pkg_resources``, gone from setuptools 81.)
Timings are medians over ``--repeats`` rounds; every round times the plain
block and each configuration's block in turn, so machine noise hits all alike.
"""

from __future__ import annotations

import time
import warnings

import numpy as np
import torch
from backpack import extend

import _torch_setup  # benchmarks/peers/_torch_setup.py

with warnings.catch_warnings():
  warnings.simplefilter("ignore", UserWarning)  # cockpit 1.0.2: "pkg_resources is deprecated"
  from cockpit import Cockpit
from cockpit.utils import schedules
from cockpit.utils.configuration import configuration

COCKPIT_PUBLISHED = {"economy": (1.5, 1.0), "business": (2.0, 1.0), "full": (21.0, 1.3)}


def three_c3d() -> torch.nn.Sequential:
  """DeepOBS's 3c3d in BackPACK-supported modules (NCHW).

  TensorFlow's "same" 3x3/2 max-pool pads 28 -> 29, 12 -> 13, 6 -> 7 on the
  bottom/right; after a ReLU, zero padding equals -inf padding.
  """
  pool = lambda: [torch.nn.ZeroPad2d((0, 1, 0, 1)), torch.nn.MaxPool2d(3, 2)]  # noqa: E731
  return torch.nn.Sequential(
      torch.nn.Conv2d(3, 64, 5), torch.nn.ReLU(), *pool(),
      torch.nn.Conv2d(64, 96, 3), torch.nn.ReLU(), *pool(),
      torch.nn.Conv2d(96, 128, 3, padding=1), torch.nn.ReLU(), *pool(),
      torch.nn.Flatten(),
      torch.nn.Linear(3 * 3 * 128, 512), torch.nn.ReLU(),
      torch.nn.Linear(512, 256), torch.nn.ReLU(),
      torch.nn.Linear(256, 10))


def main():
  ap = _torch_setup.parser(__doc__.splitlines()[0], repeats=3)
  ap.add_argument("--every", type=int, default=64)
  ap.add_argument("--steps", type=int, default=4, help="steps per every-step block")
  ap.add_argument("--presets", default="economy,business,full")
  args = ap.parse_args()
  plain_model, model = _torch_setup.plain_and_extended(three_c3d, args.threads)
  # Cockpit's own calls (backward with create_graph for the curvature instruments).
  warnings.filterwarnings("ignore", message="Using backward\\(\\) with create_graph=True")
  n_params = sum(p.numel() for p in model.parameters())
  plain_loss_fn = torch.nn.CrossEntropyLoss(reduction="mean")
  loss_fn = extend(torch.nn.CrossEntropyLoss(reduction="mean"))
  individual_loss_fn = torch.nn.CrossEntropyLoss(reduction="none")
  x = torch.randn(args.batch, 3, 32, 32)
  y = torch.randint(0, 10, (args.batch,))
  plain_opt = torch.optim.SGD(plain_model.parameters(), lr=1e-3)
  opt = torch.optim.SGD(model.parameters(), lr=1e-3)
  print(f"3c3d (PyTorch {torch.__version__}, {torch.get_num_threads()} threads): "
        f"{n_params:,} parameters, batch {args.batch}")

  def plain(num_steps):
    for _ in range(num_steps):
      plain_opt.zero_grad()
      plain_loss_fn(plain_model(x), y).backward()
      plain_opt.step()

  def tracked(cockpit, start, num_steps):
    for step in range(start, start + num_steps):
      opt.zero_grad()
      outputs = model(x)
      loss = loss_fn(outputs, y)
      losses = individual_loss_fn(outputs, y)
      info = {"batch_size": args.batch, "individual_losses": losses, "loss": loss,
              "optimizer": opt}
      with cockpit(step, info=info):
        loss.backward(create_graph=cockpit.create_graph(step))
      opt.step()

  def timed(fn, *a):
    t = time.perf_counter()
    fn(*a)
    return time.perf_counter() - t

  presets = args.presets.split(",")
  cockpits = {}
  for name in presets:
    for mode, interval in (("every step", 1), (f"every {args.every}", args.every)):
      cockpits[name, mode] = Cockpit(model.parameters(), quantities=configuration(
          name, track_schedule=schedules.linear(interval)))
  steps = {mode: (args.steps if mode == "every step" else args.every)
           for _, mode in cockpits}
  # Warm up with one block each; the timed blocks continue its steps (Cockpit's
  # Alpha ends at the step after each tracked one), each every-k block starting
  # at a tracked step.
  plain(2)
  starts = {}
  for k, cp in cockpits.items():
    tracked(cp, 0, steps[k[1]])
    starts[k] = steps[k[1]]
  times = {k: [] for k in cockpits}
  plain_times = {mode: [] for mode in steps}
  for _ in range(args.repeats):
    for mode, n in steps.items():
      plain_times[mode].append(timed(plain, n) / n)
    for k, cp in cockpits.items():
      n = steps[k[1]]
      times[k].append(timed(tracked, cp, starts[k], n) / n)
      starts[k] += n
  print(f"plain SGD step: {np.median(plain_times['every step']) * 1e3:.1f} ms\n")
  print(f"{'Cockpit config':15s} {'every step':>10s} {'(published)':>11s}   "
        f"{'every ' + str(args.every):>9s} {'(published)':>11s}")
  for name in presets:
    row = [np.median(times[name, mode]) / np.median(plain_times[mode]) for mode in steps]
    pub = COCKPIT_PUBLISHED.get(name, (float("nan"),) * 2)
    print(f"{name:15s} {row[0]:9.2f}x {pub[0]:10.1f}x   {row[1]:8.2f}x {pub[1]:10.1f}x")


if __name__ == "__main__":
  main()
