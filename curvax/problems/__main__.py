"""Command line: ``python -m curvax.problems {run,plot,dashboard,list} ...``.

Examples::

  python -m curvax.problems run fmnist_mlp --optimizer sgd --epochs 1 --out results/
  python -m curvax.problems run quadratic_deep --optimizer adam --seeds 0 1 2 --out results/
  python -m curvax.problems run fmnist_2c2d --optimizer momentum --hp learning_rate=0.01 \\
      --max-steps 100 --train-size 5000 --eval-size 2000 --out results/
  python -m curvax.problems run fmnist_mlp --optimizer hessian_free --devices 4 --out results/
  python -m curvax.problems plot results/
  python -m curvax.problems run fmnist_mlp --optimizer sgd --max-steps 200 \\
      --monitor business --monitor-every 20 --out results/
  python -m curvax.problems dashboard results/fmnist_mlp/sgd/*/random_seed__0__*.json
"""

from __future__ import annotations

import argparse
import ast
import os
import sys


def _value(text):
  try:
    return ast.literal_eval(text)
  except (ValueError, SyntaxError):
    return text


def main(argv=None) -> int:
  parser = argparse.ArgumentParser(prog="python -m curvax.problems", description=__doc__,
                                   formatter_class=argparse.RawDescriptionHelpFormatter)
  sub = parser.add_subparsers(dest="command", required=True)
  r = sub.add_parser("run", help="train an optimizer on a problem, write results JSON")
  r.add_argument("problem")
  r.add_argument("--optimizer", default="sgd", help="registered optimizer name")
  r.add_argument("--hp", nargs="*", default=[], metavar="KEY=VALUE",
                 help="optimizer hyperparameters, e.g. learning_rate=0.01")
  r.add_argument("--lr", type=float, default=None, help="shorthand for --hp learning_rate=")
  r.add_argument("--epochs", type=int, default=None)
  r.add_argument("--seeds", type=int, nargs="+", default=[0])
  r.add_argument("--batch-size", type=int, default=None)
  r.add_argument("--eval-batch-size", type=int, default=None)
  r.add_argument("--log-every", type=int, default=10, metavar="K",
                 help="log the mini-batch loss and optimizer state on every K-th mini-batch "
                      "of each epoch, from its first (DeepOBS's train_log_interval)")
  r.add_argument("--out", default="results")
  r.add_argument("--data-dir", default=None,
                 help="folder holding <data set>/ (e.g. fashion-mnist/), where "
                      "curvax.problems.download(name, DATA_DIR) puts it")
  r.add_argument("--max-steps", type=int, default=None, help="stop early (smoke runs)")
  r.add_argument("--train-size", type=int, default=None, help="use a training subset")
  r.add_argument("--eval-size", type=int, default=None, help="evaluate on a subset")
  r.add_argument("--devices", type=int, default=None,
                 help="data-parallel over the first N devices (on CPU: N virtual devices)")
  r.add_argument("--steps-per-call", type=int, default=1,
                 help="steps per jitted call (lax.scan; helps small models on a GPU)")
  r.add_argument("--host-schedule", action="store_true",
                 help="compile the steps without scheduled work (curvature_step_size's "
                      "interval mode, probabilistic_preconditioning's steps between "
                      "estimations, the monitor's untracked steps) without their conds, "
                      "on which GPU runtimes wait for the host (run(..., scheduled='auto'))")
  r.add_argument("--monitor", default=None, metavar="PRESET",
                 help="watch the run with curvax.diagnostics.monitor: economy, business "
                      "or full (records under 'diagnostics' in the JSON)")
  r.add_argument("--monitor-every", type=int, default=None, metavar="K",
                 help="monitor every K-th step (default: every step, the monitor's default)")
  r.add_argument("--quiet", action="store_true")
  p = sub.add_parser("plot", help="plot learning curves of the results under a folder")
  p.add_argument("folder")
  p.add_argument("--out", default=None,
                 help="folder for one <problem>.png per problem (default: FOLDER), or a "
                      ".png file name if FOLDER holds results of one problem only")
  d = sub.add_parser("dashboard", help="draw the diagnostics of a monitored run (--monitor)")
  d.add_argument("result", help="a results JSON written by run --monitor")
  d.add_argument("--out", default=None, help="PNG file (default: RESULT with .png)")
  sub.add_parser("list", help="list problems and optimizers")
  args = parser.parse_args(argv)

  if args.command == "list":
    from curvax.problems import names, optimizers  # pylint: disable=import-outside-toplevel
    print("problems:  ", " ".join(names()))
    print("optimizers:", " ".join(optimizers.names()))
    return 0
  if args.command == "plot":
    from curvax.problems.plot import plot  # pylint: disable=import-outside-toplevel
    try:
      paths = plot(args.folder, args.out)
    except (FileNotFoundError, ValueError) as e:   # no results, or --out x.png for several
      print(f"{parser.prog} plot: error: {e}", file=sys.stderr)
      return 2
    for path in paths:
      print(f"wrote {path}")
    return 0
  if args.command == "dashboard":
    return _dashboard(args, parser.prog)
  if args.monitor_every is not None and args.monitor is None:
    parser.error("--monitor-every needs --monitor PRESET")
  if args.monitor_every is not None and args.monitor_every < 1:
    parser.error(f"--monitor-every must be a positive number of steps, got {args.monitor_every}")
  monitor = None
  if args.monitor is not None:
    monitor = {"instruments": args.monitor}
    if args.monitor_every is not None:
      monitor["every"] = args.monitor_every
  if args.devices is not None and args.devices > 1:
    # Virtual CPU devices; read when JAX's backend starts, which has not happened yet.
    flag = "--xla_force_host_platform_device_count"
    if flag not in os.environ.get("XLA_FLAGS", ""):
      os.environ["XLA_FLAGS"] = f"{os.environ.get('XLA_FLAGS', '')} {flag}={args.devices}".strip()
  from curvax.problems import get, run  # pylint: disable=import-outside-toplevel
  mesh = None
  if args.devices is not None:
    from curvax import sharding  # pylint: disable=import-outside-toplevel
    mesh = sharding.data_mesh(args.devices)
  hp = {}
  for item in args.hp:
    if "=" not in item:
      parser.error(f"--hp expects KEY=VALUE, got {item!r}")
    k, v = item.split("=", 1)
    if not k.isidentifier():
      parser.error(f"--hp expects KEY=VALUE with KEY a keyword name, got {item!r}")
    hp[k] = _value(v)
  if args.lr is not None:
    if "learning_rate" in hp:
      parser.error("pass the learning rate once: --lr or --hp learning_rate=, not both")
    hp["learning_rate"] = args.lr
  status = 0
  for seed in args.seeds:
    # Bad names, settings and missing data files are reported in one line,
    # without a traceback (KeyError: unknown problem or optimizer; the
    # optimizer's TypeError for a keyword it does not take).
    try:
      problem = get(args.problem, batch_size=args.batch_size, seed=seed,
                    data_dir=args.data_dir)
      result = run(problem, args.optimizer, epochs=args.epochs, seed=seed,
                   log_every=args.log_every, eval_batch_size=args.eval_batch_size,
                   out=args.out, hyperparams=hp, max_steps=args.max_steps,
                   train_size=args.train_size, eval_size=args.eval_size, mesh=mesh,
                   steps_per_call=args.steps_per_call, monitor=monitor,
                   scheduled="auto" if args.host_schedule else None,
                   verbose=not args.quiet)
    except (KeyError, ValueError, FileNotFoundError) as e:
      message = e.args[0] if isinstance(e, KeyError) and e.args else e
      print(f"{parser.prog} run: error: {message}", file=sys.stderr)
      return 2
    if result["status"] == "diverged":
      status = 1
  return status


def _dashboard(args, prog) -> int:
  """``dashboard RESULT.json``: `curvax.diagnostics.dashboard` of its records."""
  import json  # pylint: disable=import-outside-toplevel
  from curvax import diagnostics  # pylint: disable=import-outside-toplevel
  try:
    with open(args.result) as f:
      result = json.load(f)
  except (OSError, ValueError) as e:
    print(f"{prog} dashboard: error: cannot read {args.result}: {e}", file=sys.stderr)
    return 2
  records = result.get("diagnostics") if isinstance(result, dict) else None
  if not records:
    print(f"{prog} dashboard: error: {args.result} holds no diagnostics; run with "
          "--monitor PRESET to record them.", file=sys.stderr)
    return 2
  settings = result.get("monitor")
  settings = settings if isinstance(settings, dict) else {}
  hist_range = tuple(settings.get("hist_range") or (-2.0, 2.0))
  from curvax.problems.runner import from_jsonable  # pylint: disable=import-outside-toplevel
  records = from_jsonable(records)
  out = args.out or os.path.splitext(args.result)[0] + ".png"
  title = (f"{result.get('testproblem', '?')} / {result.get('optimizer_name', '?')} / "
           f"seed {result.get('random_seed', '?')}")
  try:
    path = diagnostics.dashboard(records, out, title=title, hist_range=hist_range)
  except ValueError as e:
    print(f"{prog} dashboard: error: {e}", file=sys.stderr)
    return 2
  print(f"wrote {path}")
  return 0


if __name__ == "__main__":
  sys.exit(main())
