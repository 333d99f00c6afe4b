"""curvlinops and BackPACK (PyTorch) on the mnist_mlp shapes, timed on this machine.

The peer of ``benchmarks/curvature.py``: the same network (DeepOBS mnist_mlp,
784-1000-500-100-10, ReLU, softmax cross-entropy, batch 128, random data,
float32) and the same figure, each cost as a ratio of one gradient (forward,
backward) measured in the same run:

* curvlinops 3's ``GGNLinearOperator`` and ``HessianLinearOperator``: one
  product ``op @ v`` (each linearises anew: curvax's "one-shot" row);
* BackPACK's ``BatchL2Grad`` + ``SumGradSquared`` (per-example gradient norms
  and second moments, one backward pass with both extensions: curvax's
  per-example statistics) and ``DiagGGNExact`` (exact diagonal GGN).

Not a curvax dependency (pyproject's optional extra ``peers`` lists them).
Install the peers into their own environment (PyPI's default torch wheel is a
CUDA build of several GB; a CPU build is enough):

  python -m venv /tmp/peers && /tmp/peers/bin/pip install torch \
      curvlinops-for-pytorch backpack-for-pytorch
  /tmp/peers/bin/python benchmarks/peers/curvlinops_backpack_mlp.py [--threads 2]

Timings are medians over ``--repeats`` rounds; every round calls each function
once, in turn, so machine noise hits all alike.
"""

from __future__ import annotations

import time

import numpy as np
import torch
from backpack import backpack, extend
from backpack.extensions import BatchL2Grad, DiagGGNExact, SumGradSquared
from curvlinops import GGNLinearOperator, HessianLinearOperator

import _torch_setup  # benchmarks/peers/_torch_setup.py

SIZES = (784, 1000, 500, 100, 10)


def mnist_mlp() -> torch.nn.Sequential:
  layers = []
  for i, (d_in, d_out) in enumerate(zip(SIZES[:-1], SIZES[1:])):
    layers.append(torch.nn.Linear(d_in, d_out))
    if i < len(SIZES) - 2:
      layers.append(torch.nn.ReLU())
  return torch.nn.Sequential(*layers)


def main():
  args = _torch_setup.parser(__doc__.splitlines()[0], repeats=9).parse_args()
  model, ext_model = _torch_setup.plain_and_extended(mnist_mlp, args.threads)
  loss_fn = torch.nn.CrossEntropyLoss(reduction="mean")
  ext_loss_fn = extend(torch.nn.CrossEntropyLoss(reduction="mean"))
  x = torch.randn(args.batch, SIZES[0])
  y = torch.randint(0, SIZES[-1], (args.batch,))
  params = [p for p in model.parameters() if p.requires_grad]
  v = [torch.randn_like(p) for p in params]
  data = [(x, y)]
  ggn = GGNLinearOperator(model, loss_fn, params, data, progressbar=False,
                          check_deterministic=False)
  hess = HessianLinearOperator(model, loss_fn, params, data, progressbar=False,
                               check_deterministic=False)

  def gradient():
    model.zero_grad()
    loss_fn(model(x), y).backward()
    return [p.grad for p in params]

  def with_extensions(*extensions):
    def run():
      ext_model.zero_grad()
      loss = ext_loss_fn(ext_model(x), y)
      with backpack(*extensions):
        loss.backward()
    return run

  fns = {
      "gradient": gradient,
      "curvlinops GGN-vp (one-shot)": lambda: ggn @ v,
      "curvlinops HVP (one-shot)": lambda: hess @ v,
      "BackPACK BatchL2Grad + SumGradSquared": with_extensions(BatchL2Grad(), SumGradSquared()),
      "BackPACK DiagGGNExact": with_extensions(DiagGGNExact()),
  }
  for fn in fns.values():           # warm up
    fn()
  times = {k: [] for k in fns}
  for _ in range(args.repeats):
    for k, fn in fns.items():
      t = time.perf_counter()
      fn()
      times[k].append(time.perf_counter() - t)
  med = {k: float(np.median(t)) for k, t in times.items()}
  print(f"mnist_mlp (PyTorch {torch.__version__}, {torch.get_num_threads()} threads), "
        f"batch {args.batch}: gradient {med['gradient'] * 1e3:.2f} ms")
  for k, t in med.items():
    if k != "gradient":
      print(f"  {k:40s} {t / med['gradient']:6.2f}x")


if __name__ == "__main__":
  main()
