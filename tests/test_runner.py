"""curvax.problems runner, CLI, plots and the optimizer registry."""

import glob
import json
import os
import time
from typing import NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

import curvax
import curvax.problems as problems
from curvax.problems import __main__ as cli
from curvax.problems import models, optimizers
from curvax.problems import runner as runner_lib
from curvax.problems.problems import _flax_problem, _mnist_pre


def test_end_to_end_fmnist_mlp_sgd_json_and_plot(tmp_path):
  """Real Fashion-MNIST (a subset), a fraction of an epoch of SGD, via the CLI."""
  out = str(tmp_path / "results")
  common = ["--epochs", "1", "--out", out, "--max-steps", "30", "--train-size", "6400",
            "--eval-size", "1000", "--quiet"]
  assert cli.main(["run", "fmnist_mlp", "--optimizer", "sgd", "--lr", "0.2",
                   "--seeds", "0", "1"] + common) == 0
  files = sorted(glob.glob(os.path.join(out, "**", "*.json"), recursive=True))
  assert len(files) == 2
  assert os.path.relpath(files[0], out).startswith(
      "fmnist_mlp/sgd/num_epochs__1__batch_size__128__learning_rate__2.e-01__train_size__6400"
      "__eval_size__1000__max_steps__30/random_seed__0__")
  with open(files[0]) as f:
    r = json.load(f)
  assert (r["train_size"], r["full_train_size"], r["eval_size"], r["max_steps"]) == (
      6400, 50000, 1000, 30)
  assert r["testproblem"] == "fmnist_mlp" and r["status"] == "stopped" and r["steps"] == 30
  # DeepOBS's keys (spec 2.6), which its analyzer reads.
  for key in ("batch_size", "num_epochs", "random_seed", "weight_decay", "optimizer_name",
              "optimizer_hyperparams", "analyzable_training_params"):
    assert key in r, key
  for key in ("train_losses", "valid_losses", "test_losses", "train_accuracies",
              "test_accuracies", "wall_times", "eval_epochs"):
    assert len(r[key]) == 2, key
  assert r["train_losses"][1] < r["train_losses"][0] - 0.05
  assert r["test_losses"][1] < r["test_losses"][0] - 0.05
  assert r["test_accuracies"][1] > r["test_accuracies"][0] + 0.1
  assert r["minibatch_train_losses"][-1] < r["minibatch_train_losses"][0]
  assert r["minibatch_steps"][:3] == [1, 11, 21]   # mini-batches 0, 10, 20 (DeepOBS)
  assert r["optimizer_state"] == {} or all(len(v) == 3 for v in r["optimizer_state"].values())
  assert cli.main(["plot", out]) == 0
  png = os.path.join(out, "fmnist_mlp.png")
  with open(png, "rb") as f:
    assert f.read(8) == b"\x89PNG\r\n\x1a\n"


def test_cli_run_and_plot_quadratic_several_optimizers(tmp_path, capsys):
  out = str(tmp_path / "res")
  for opt in ("sgd", "adam"):
    assert cli.main(["run", "quadratic_deep", "--optimizer", opt, "--epochs", "2",
                     "--seeds", "0", "1", "--out", out]) == 0
  text = capsys.readouterr().out
  assert "epoch 2" in text and "wrote" in text
  runs = problems.plot.load_results(out)
  assert {k: len(v) for k, v in runs["quadratic_deep"].items()} == {
      "sgd (learning_rate=0.0158), batch_size=128, num_epochs=2": 2,
      "adam (b1=0.9, b2=0.999, eps=1e-08, learning_rate=0.0398), batch_size=128, num_epochs=2": 2}
  with open(glob.glob(os.path.join(out, "**", "*.json"), recursive=True)[0]) as f:
    r = json.load(f)
  assert "test_accuracies" not in r   # no accuracy on the quadratic (DeepOBS drops the key)
  assert r["test_losses"][-1] < 0.5 * r["test_losses"][0]
  png = str(tmp_path / "q.png")
  assert cli.main(["plot", out, "--out", png]) == 0 and os.path.getsize(png) > 10_000
  assert cli.main(["list"]) == 0 and "hessian_free" in capsys.readouterr().out


def test_cli_monitored_run_and_its_dashboard(tmp_path, capsys):
  # run --monitor wraps the optimizer in curvax.diagnostics.monitor: the same steps
  # (the monitor only watches), its records in the JSON, drawn by `dashboard`.
  out = str(tmp_path / "res")
  argv = ["run", "quadratic_deep", "--optimizer", "sgd", "--max-steps", "5", "--out", out]
  assert cli.main(argv + ["--monitor", "economy", "--monitor-every", "2"]) == 0
  path = glob.glob(os.path.join(out, "**", "*.json"), recursive=True)[0]
  with open(path) as f:
    r = json.load(f)
  assert r["monitor"] == {"instruments": "economy", "every": 2}
  assert [d["step"] for d in r["diagnostics"]] == [0, 2, 4]
  p = problems.get("quadratic_deep")
  plain = problems.run(p, "sgd", max_steps=5, verbose=False)
  watched = problems.run(p, curvax.diagnostics.monitor(optax.sgd(1.58e-2), p.apply_fn, p.loss,
                                                       every=2), max_steps=5, verbose=False)
  assert r["minibatch_train_losses"] == plain["minibatch_train_losses"]
  assert r["test_losses"] == plain["test_losses"]
  np.testing.assert_allclose([d["grad_norm"] for d in r["diagnostics"]],
                             [d["grad_norm"] for d in watched["diagnostics"]], rtol=1e-6)
  png = str(tmp_path / "cockpit.png")
  assert cli.main(["dashboard", path, "--out", png]) == 0 and os.path.getsize(png) > 10_000
  assert cli.main(["dashboard", path]) == 0 and os.path.exists(path[:-5] + ".png")
  capsys.readouterr()
  assert cli.main(argv[:-2] + ["--out", str(tmp_path / "plain")]) == 0
  unwatched = glob.glob(str(tmp_path / "plain" / "**" / "*.json"), recursive=True)[0]
  assert cli.main(["dashboard", unwatched]) == 2
  assert "holds no diagnostics; run with --monitor" in capsys.readouterr().err
  assert cli.main(["dashboard", str(tmp_path / "missing.json")]) == 2
  assert "cannot read" in capsys.readouterr().err
  with pytest.raises(SystemExit):
    cli.main(argv + ["--monitor-every", "2"])
  assert "--monitor-every needs --monitor" in capsys.readouterr().err
  assert cli.main(argv + ["--monitor", "first"]) == 2
  assert "unknown preset 'first'" in capsys.readouterr().err
  with pytest.raises(TypeError, match="monitor must be a preset name or a dict"):
    problems.run(p, "sgd", max_steps=1, verbose=False, monitor=["loss"])
  with pytest.raises(SystemExit):
    cli.main(argv + ["--monitor", "economy", "--monitor-every", "0"])
  assert "--monitor-every must be a positive" in capsys.readouterr().err
  # The optimizer's logged state keeps its names (CSS's alpha, not the monitor's Alpha).
  kw = dict(max_steps=4, log_every=2, verbose=False)
  css = problems.run("two_d_rosenbrock", "curvature_step_size", **kw)
  watched = problems.run("two_d_rosenbrock", "curvature_step_size", monitor="economy", **kw)
  assert watched["optimizer_state"] == css["optimizer_state"] and "alpha" in css["optimizer_state"]
  # A diverged run's JSON (inf written as 1e308, nan as null) draws with those as inf/nan.
  out = str(tmp_path / "div")
  assert cli.main(["run", "two_d_beale", "--optimizer", "sgd", "--monitor", "economy", "--out",
                   out, "--max-steps", "30"]) == 1
  path = glob.glob(os.path.join(out, "**", "*.json"), recursive=True)[0]
  assert cli.main(["dashboard", path]) == 0
  assert runner_lib.from_jsonable({"a": [-1e308], "b": 2}) == {"a": [float("-inf")], "b": 2}
  converted = runner_lib.from_jsonable([None, -1e308, 1e308, 3.0])
  assert np.isnan(converted[0]) and converted[1:] == [float("-inf"), float("inf"), 3.0]


def _write_result(folder, problem, seed, batch_size=128, num_epochs=1, name="sgd",
                  hyperparams=None, **extra):
  """A minimal results JSON in DeepOBS's layout (no training)."""
  hyperparams = {"learning_rate": 0.01} if hyperparams is None else hyperparams
  setting = f"num_epochs__{num_epochs}__batch_size__{batch_size}" + "".join(
      f"__{k}__{v}" for k, v in sorted(hyperparams.items()))
  path = os.path.join(folder, problem, name, setting, f"random_seed__{seed}__x.json")
  os.makedirs(os.path.dirname(path), exist_ok=True)
  losses = [1.0 + seed, 0.5 + seed, 0.2][:num_epochs + 1]
  r = dict(testproblem=problem, batch_size=batch_size, num_epochs=num_epochs, random_seed=seed,
           optimizer_name=name, optimizer_hyperparams=hyperparams, test_losses=losses,
           train_losses=losses, eval_epochs=list(range(num_epochs + 1)), **extra)
  with open(path, "w") as f:
    json.dump(r, f)


def test_plot_groups_runs_by_full_setting(tmp_path):
  """Only runs differing in the seed alone are averaged: batch size and epochs separate settings."""
  out = str(tmp_path / "res")
  for seed in (0, 1):
    _write_result(out, "quadratic_deep", seed)
  _write_result(out, "quadratic_deep", 0, batch_size=32)
  _write_result(out, "quadratic_deep", 0, num_epochs=2)
  _write_result(out, "quadratic_deep", 2, weight_decay=0.002)   # DeepOBS override
  _write_result(out, "quadratic_deep", 3, weight_decay=None)    # curvax: problem's own
  # The runner's settings, where not the defaults (older files lack some fields).
  full = dict(train_size=1000, full_train_size=1000, eval_size=None, max_steps=None)
  _write_result(out, "quadratic_deep", 4, eval_batch_size=128, **full)
  _write_result(out, "quadratic_deep", 5, eval_batch_size=64, **full)
  _write_result(out, "quadratic_deep", 6, **{**full, "train_size": 256})
  _write_result(out, "quadratic_deep", 7, **{**full, "eval_size": 100})
  _write_result(out, "quadratic_deep", 8, **{**full, "max_steps": 3})
  _write_result(out, "quadratic_deep", 9, eval_batch_size=64, train_size=256,
                full_train_size=1000, eval_size=100, max_steps=3)
  runs = problems.plot.load_results(out)["quadratic_deep"]
  assert {k: sorted(r["random_seed"] for r in v) for k, v in runs.items()} == {
      "sgd (learning_rate=0.01), batch_size=128, num_epochs=1": [0, 1, 3, 4],
      "sgd (learning_rate=0.01), batch_size=128, num_epochs=1, eval_batch_size=64": [5],
      "sgd (learning_rate=0.01), batch_size=128, num_epochs=1, train_size=256": [6],
      "sgd (learning_rate=0.01), batch_size=128, num_epochs=1, eval_size=100": [7],
      "sgd (learning_rate=0.01), batch_size=128, num_epochs=1, max_steps=3": [8],
      "sgd (learning_rate=0.01), batch_size=128, num_epochs=1, train_size=256, eval_size=100, "
      "eval_batch_size=64, max_steps=3": [9],
      "sgd (learning_rate=0.01), batch_size=32, num_epochs=1": [0],
      "sgd (learning_rate=0.01), batch_size=128, num_epochs=2": [0],
      "sgd (learning_rate=0.01), batch_size=128, num_epochs=1, weight_decay=0.002": [2]}
  assert problems.plot.plot(out) == [os.path.join(out, "quadratic_deep.png")]


def test_runs_of_other_runner_settings_get_their_own_setting_folder(tmp_path):
  """train_size, eval_size, eval_batch_size, max_steps, eval_every and time_budget change
  what a run trains or reports: runs that differ in them are filed (and plotted) apart,
  not as seeds."""
  out = str(tmp_path / "res")
  kw = dict(epochs=1, out=out, verbose=False, hyperparams={"learning_rate": 0.01})
  base = "num_epochs__1__batch_size__128__learning_rate__1.e-02"
  for extra, suffix in ((dict(), ""), (dict(train_size=5000, eval_batch_size=128), ""),
                        (dict(train_size=256), "__train_size__256"),
                        (dict(eval_size=100, eval_batch_size=64, max_steps=3),
                         "__eval_size__100__eval_batch_size__64__max_steps__3"),
                        (dict(max_steps=4, eval_every=2), "__max_steps__4__eval_every__2"),
                        (dict(max_steps=4, time_budget=1e6), "__max_steps__4__time_budget__1.e+06")):
    r = problems.run("quadratic_deep", "sgd", **kw, **extra)
    assert os.path.relpath(os.path.dirname(r["path"]), out) == os.path.join(
        "quadratic_deep", "sgd", base + suffix), extra
  runs = problems.plot.load_results(out)["quadratic_deep"]
  assert sorted(len(v) for v in runs.values()) == [1, 1, 1, 1, 2]


def test_plot_one_png_for_several_problems_is_an_error(tmp_path, capsys):
  out = str(tmp_path / "res")
  _write_result(out, "quadratic_deep", 0)
  _write_result(out, "two_d_beale", 0)
  png = str(tmp_path / "all.png")
  with pytest.raises(ValueError, match="2 problems .*quadratic_deep, two_d_beale.*folder"):
    problems.plot.plot(out, png)
  assert cli.main(["plot", out, "--out", png]) == 2
  err = capsys.readouterr().err
  assert not os.path.exists(png)
  assert err.count("\n") == 1 and "error:" in err and "2 problems" in err
  figures = str(tmp_path / "figures")
  assert cli.main(["plot", out, "--out", figures]) == 0
  assert sorted(os.listdir(figures)) == ["quadratic_deep.png", "two_d_beale.png"]


def test_plot_cli_without_results_is_a_one_line_error(tmp_path, capsys):
  (tmp_path / "empty").mkdir()
  for folder in (tmp_path / "empty", tmp_path / "missing"):
    assert cli.main(["plot", str(folder)]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "Traceback" not in err
    assert f"no curvax/DeepOBS results JSON files under {folder}" in err


def test_runner_rejects_nonpositive_log_every_and_eval_batch_size():
  """Checked before anything is built or compiled (log_every=0 used to divide by zero
  after compiling, eval_batch_size=0 silently became the batch size)."""
  for kw, match in ((dict(log_every=0), "log_every must be a positive"),
                    (dict(log_every=-3), "log_every must be a positive"),
                    (dict(eval_batch_size=0), "eval_batch_size must be a positive"),
                    (dict(eval_batch_size=-1), "eval_batch_size must be a positive"),
                    (dict(eval_every=0), "eval_every must be a positive")):
    with pytest.raises(ValueError, match=match):
      problems.run("no_such_problem", "sgd", epochs=1, verbose=False, **kw)
  with pytest.raises(KeyError):   # the checks pass: the problem is looked up
    problems.run("no_such_problem", "sgd", epochs=1, verbose=False, log_every=1,
                 eval_batch_size=1, eval_every=1)


def test_divergence_stops_cleanly_and_is_recorded(tmp_path):
  r = problems.run("two_d_rosenbrock", "sgd", hyperparams={"learning_rate": 1.0}, epochs=3,
                   log_every=2, out=str(tmp_path), verbose=False)
  # The first reason (with the offending value) stands; the diverged parameters are not evaluated.
  assert r["status"] == "diverged" and "non-finite mini-batch training loss (" in r["stop_reason"]
  assert r["steps"] < 78 and r["eval_steps"] == [0, 78, 156, 234]
  # DeepOBS's padding: epochs + 1 evaluations, the three after the divergence the
  # epoch-0 values (not evaluated), with no wall time.
  assert r["padded_evaluations"] == 3 and r["wall_times"][1:] == [None] * 3
  assert r["test_losses"] == [r["test_losses"][0]] * 4 and r["eval_epochs"] == [0, 1, 2, 3]
  first_bad = next(s for s, v in zip(r["minibatch_steps"], r["minibatch_train_losses"])
                   if v is None or abs(v) >= 1e308)   # JSON stand-ins for nan and inf
  # noticed at the first logged non-finite loss (dated to an earlier step, if any)
  assert r["stop_reason"].endswith((f"at step {first_bad}", f"(noticed at step {first_bad})"))
  with open(r["path"]) as f:
    assert json.load(f)["status"] == "diverged"


class _Probe(NamedTuple):
  overlap: jax.Array
  batch_rows: jax.Array
  damping: jax.Array
  vector: jax.Array   # not a scalar: not logged


def probe_transform():
  """Checks it gets disjoint batch / eval_batch; exposes scalar fields to log."""

  def init(params):
    del params
    return _Probe(jnp.zeros((), jnp.int32), jnp.zeros((), jnp.int32), jnp.ones(()),
                  jnp.zeros(3))

  def update(updates, state, params=None, *, batch=None, eval_batch=None, **extra):
    del params, extra
    x, e = batch[0], eval_batch[0]
    same = jnp.all(x[:, None, :] == e[None, :, :], axis=-1)
    return (jax.tree_util.tree_map(lambda g: -0.01 * g, updates),
            _Probe(state.overlap + jnp.sum(same), jnp.asarray(x.shape[0] + 1000 * e.shape[0]),
                   0.5 * state.damping, state.vector))

  return optax.GradientTransformationExtraArgs(init, update)


def test_runner_passes_disjoint_batch_and_eval_batch_and_logs_state():
  r = problems.run("quadratic_deep", probe_transform(), epochs=2, eval_batch_size=50,
                   log_every=3, verbose=False, optimizer_name="probe")
  s = r["optimizer_state"]
  assert set(s) == {"overlap", "batch_rows", "damping"}
  # mini-batches 0, 3, 6 of each 7-step epoch, as DeepOBS counts its train_log_interval
  assert r["minibatch_steps"] == [1, 4, 7, 8, 11, 14]
  assert s["overlap"] == [0] * 6
  assert s["batch_rows"] == [128 + 1000 * 50] * 6
  np.testing.assert_allclose(s["damping"], [0.5 ** k for k in r["minibatch_steps"]])
  assert r["status"] == "completed" and r["steps"] == 14


def test_loggable_state_of_optax_states():
  tx = optax.chain(optax.inject_hyperparams(optax.sgd)(learning_rate=0.1),
                   optax.scale_by_adam())
  state = tx.init({"w": jnp.ones(3)})
  names = set(problems.loggable_state(state))
  assert {"0.hyperparams.learning_rate", "0.count", "1.count"} <= names
  assert not any(n.startswith("1.mu") for n in names)
  # One-element arrays (per-group values with one group) are logged too.
  pp = curvax.transforms.probabilistic_preconditioning(lambda p, b: jnp.sum(p["w"] ** 2))
  logged = problems.loggable_state(pp.init({"w": jnp.ones(3)}))
  assert {"alpha", "learning_rate", "prior_scale", "phase", "num_skipped"} <= set(logged)
  assert all(jnp.ndim(v) == 0 for v in logged.values())   # float(v) works
  # With a value per group of several groups, those are not scalars: not logged.
  pp = curvax.transforms.probabilistic_preconditioning(
      lambda p, b: jnp.sum(p["w"] ** 2) + jnp.sum(p["b"] ** 2), groups="leaf")
  logged = problems.loggable_state(pp.init({"w": jnp.ones(3), "b": jnp.ones(2)}))
  assert "phase" in logged and "alpha" not in logged and "learning_rate" not in logged


def test_loggable_state_names_packed_scalars():
  # curvature_step_size packs its scalars into two arrays: logged by name, as
  # the fields below them (the inner state's hyperparameters, count).
  css = curvax.transforms.curvature_step_size(
      optax.inject_hyperparams(optax.sgd)(learning_rate=0.1),
      lambda p, x: x @ p["w"], curvax.losses.mean_squared_error, debias=False)
  params = {"w": jnp.ones((3, 2))}
  state = optax.chain(optax.clip(1.0), css).init(params)
  batch = (jnp.arange(12.0).reshape(4, 3), jnp.zeros((4, 2)))
  grads = jax.grad(curvax.losses.objective(lambda p, x: x @ p["w"],
                                           curvax.losses.mean_squared_error))(params, batch)
  _, s = css.update(grads, state[1], params, batch=batch)
  logged = problems.loggable_state((state[0], s))
  names = {n for n in logged if n.startswith("1.")}
  assert names == {"1." + n for n in s._scalar_names if n != "computed"} | {
      "1.inner_state.count", "1.inner_state.hyperparams.learning_rate"}
  for name in ("alpha", "numerator", "denominator", "num_computed", "learning_rate"):
    np.testing.assert_array_equal(logged["1." + name], getattr(s, name))
  assert float(logged["1.num_computed"]) == 1 and np.isfinite(float(logged["1.alpha"]))


def _tiny_bn_problem():
  """A small WRN (same BN threading code as svhn_wrn164) on random images."""
  p = _flax_problem("tiny_wrn", models.WideResNet(10, depth=10, width=1), (32, 32, 3),
                    problems.problems.softmax_cross_entropy, batch_size=8, num_epochs=1,
                    dataset="svhn", data_dir=None, preprocess=_mnist_pre, weight_decay=5e-4)
  rng = np.random.RandomState(0)
  split = lambda n: (rng.randint(0, 256, (n, 32, 32, 3)).astype(np.uint8),
                     rng.randint(0, 10, n).astype(np.int32))
  p.load_data = lambda: {"train": split(40), "train_eval": split(8), "valid": split(8),
                         "test": split(8)}
  return p


def test_batch_norm_state_is_threaded_outside_the_optimizer():
  p = _tiny_bn_problem()
  assert p.has_bn
  variables = p.init(jax.random.PRNGKey(0))
  params, state = p.split_variables(variables)
  assert set(params) == {"params"} and set(state) == {"batch_stats"}
  x = jnp.asarray(np.random.RandomState(1).rand(4, 32, 32, 3), jnp.float32)
  # params alone: normalise with the batch's statistics, like training mode.
  np.testing.assert_allclose(p.apply_fn(params, x), p.apply_fn(variables, x, train=True),
                             rtol=1e-5, atol=1e-5)
  assert not np.allclose(p.apply_fn(variables, x), p.apply_fn(params, x), atol=1e-3)
  r = problems.run(p, "momentum", epochs=1, max_steps=3, verbose=False)
  assert r["status"] == "stopped"
  new_stats = r["model_state"]["batch_stats"]
  old, new = (jax.tree_util.tree_leaves(t) for t in (state["batch_stats"], new_stats))
  assert any(not np.allclose(a, b) for a, b in zip(old, new))   # running stats moved
  # The optimizer saw only the trainable parameters.
  assert set(r["params"]) == {"params"}


def _tiny_classification_problem(n=200):
  """Logistic regression on random 28x28 images; train_eval is the head of train."""
  p = _flax_problem("tiny_logreg", models.LogReg(), (28, 28, 1),
                    problems.problems.softmax_cross_entropy, batch_size=8, num_epochs=1,
                    dataset="mnist", data_dir=None, preprocess=_mnist_pre)
  rng = np.random.RandomState(0)
  x = rng.randint(0, 256, (n + 80, 28, 28, 1)).astype(np.uint8)
  y = rng.randint(0, 10, n + 80).astype(np.int32)
  p.load_data = lambda: {"train": (x[:n], y[:n]), "train_eval": (x[:100], y[:100]),
                         "valid": (x[n:n + 40], y[n:n + 40]), "test": (x[n + 40:], y[n + 40:])}
  return p


def test_train_size_reports_train_metrics_of_the_examples_trained_on():
  """With train_size=k, train_losses/train_accuracies are those of the first k examples
  of train_eval (the head of the training split), not mostly of held-out ones."""
  p = _tiny_classification_problem()

  def train_eval(r, k):
    return p.evaluate(r["params"], splits=("train_eval", "test"), max_examples=k)

  r = problems.run(p, optax.sgd(0.5), epochs=20, train_size=24, eval_batch_size=8,
                   verbose=False)
  m = train_eval(r, 24)
  assert r["train_losses"][-1] == pytest.approx(m["train_eval_loss"], rel=1e-6)
  assert r["train_accuracies"][-1] == pytest.approx(m["train_eval_accuracy"]) == 1.0
  assert train_eval(r, None)["train_eval_accuracy"] < 0.6   # 76 examples never trained on
  # eval_size caps it further (and still caps the other splits), alone as before.
  for kw, k in ((dict(train_size=24, eval_size=10), 10), (dict(eval_size=30), 30),
                (dict(train_size=500), None)):
    r = problems.run(p, optax.sgd(0.5), epochs=1, eval_batch_size=8, verbose=False, **kw)
    m = train_eval(r, k)
    assert r["train_losses"][-1] == pytest.approx(m["train_eval_loss"], rel=1e-6), kw
    assert r["test_losses"][-1] == pytest.approx(m["test_loss"], rel=1e-6), kw


def test_train_metrics_see_fresh_augmentation_at_each_evaluation():
  """Like DeepOBS's, each evaluation augments train_eval afresh (a key from the seed and
  the step), reproducibly for a given seed; valid and test are not augmented."""
  p = _flax_problem("tiny_cifar", models.LogReg(), (32, 32, 3),
                    problems.problems.softmax_cross_entropy, batch_size=4, num_epochs=1,
                    dataset="cifar-10", data_dir=None,
                    preprocess=problems.problems._image_pre(flip=True))
  rng = np.random.RandomState(0)
  split = lambda n: (rng.randint(0, 256, (n, 32, 32, 3)).astype(np.uint8),
                     rng.randint(0, 10, n).astype(np.int32))
  train = split(24)
  p.load_data = lambda: {"train": train, "train_eval": (train[0][:8], train[1][:8]),
                         "valid": split(8), "test": split(8)}
  w = jnp.asarray(rng.normal(0, 0.01, (32 * 32 * 3, 10)), jnp.float32)
  init = {"params": {"Dense_0": {"kernel": w, "bias": jnp.zeros(10, jnp.float32)}}}
  # Learning rate 0: the parameters stay put, only the augmentation can move train metrics.
  runs = [problems.run(p, optax.sgd(0.0), epochs=1, max_steps=4, eval_every=2, seed=seed,
                       init_params=init, verbose=False) for seed in (0, 0)]
  a, again = runs
  assert len(a["train_losses"]) == 3 and len(set(a["train_losses"])) == 3
  assert len(set(a["valid_losses"])) == len(set(a["test_losses"])) == 1
  assert a["train_losses"] == again["train_losses"]


def test_registry_baselines_use_deepobs_tuned_learning_rates():
  p = problems.get("fmnist_2c2d")
  for name, lr in (("sgd", 1.58e-1), ("momentum", 2.51e-3), ("adam", 2.51e-4)):
    tx, hp = optimizers.build(name, p)
    assert hp["learning_rate"] == lr
    assert isinstance(tx, optax.GradientTransformation)
  assert optimizers.build("momentum", p)[1]["momentum"] == 0.99
  assert optimizers.build("sgd", p, learning_rate=0.3)[1] == {"learning_rate": 0.3}
  assert optimizers.build("nadamw", problems.get("fmnist_mlp"))[1]["learning_rate"] == 1e-3
  assert optimizers.build("sgd", problems.get("fmnist_mlp"))[1]["learning_rate"] == 1e-2
  with pytest.raises(KeyError, match="registered: adam"):
    optimizers.build("lbfgs2", p)


@pytest.mark.parametrize("name", ["hessian_free", "curvature_step_size"])
def test_curvature_transforms_use_the_hessian_on_the_2d_functions(name):
  # Their model outputs the loss: a zero GGN, with which Hessian-free took damped
  # gradient steps and the curvature step size none (found by running every
  # problem with every optimizer). Asked-for curvature stands; other problems keep the GGN.
  p = problems.get("two_d_rosenbrock")
  assert optimizers.build(name, p)[1]["curvature"] == "hessian"
  assert optimizers.build(name, p, curvature="ggn")[1]["curvature"] == "ggn"
  assert "curvature" not in optimizers.build(name, problems.get("quadratic_deep"))[1]
  r = problems.run(p, name, max_steps=12, log_every=4, verbose=False, eval_batch_size=500)
  # (with curvature="ggn" the curvature step size diverges here within 12 steps)
  assert r["status"] == "stopped" and r["optimizer_hyperparams"]["curvature"] == "hessian"
  assert r["test_losses"][-1] < 0.02 * r["test_losses"][0]


@pytest.mark.parametrize("name,logged", [
    ("hessian_free", {"damping", "rho", "cg_iterations"}),
    ("curvature_step_size", {"alpha"}),
    ("probabilistic_preconditioning", {"num_observations"}),
])
def test_registry_builds_curvax_transforms_and_the_runner_trains_them(name, logged):
  """Built lazily from the problem's apply_fn/loss/regularizer (or loss_fn); update
  gets batch= and eval_batch=; their state's scalar fields are logged."""
  r = problems.run("quadratic_deep", name, epochs=2, verbose=False)
  assert r["status"] == "completed"
  assert logged <= set(r["optimizer_state"])
  assert all(np.isfinite(v) for v in r["test_losses"])
  if name != "probabilistic_preconditioning":   # it spends its first steps estimating
    assert r["test_losses"][-1] < 0.35 * r["test_losses"][0]


def test_resume_time_budget_eval_every_and_callback():
  """A run resumed from another's parameters starts where that one ended; the
  time budget stops training and evaluates; eval_every adds evaluations and the
  callback sees each one with the parameters then."""
  first = problems.run("quadratic_deep", "sgd", epochs=1, verbose=False)
  seen = []
  resumed = problems.run(
      "quadratic_deep", "sgd", epochs=1, eval_every=3, verbose=False,
      init_params=first["params"],
      callback=lambda step, params, model_state, opt_state, record: seen.append(
          (step, float(record["train_losses"][-1]), params)))
  assert resumed["train_losses"][0] == pytest.approx(first["train_losses"][-1], rel=1e-6)
  steps = resumed["steps_per_epoch"]
  expected = sorted(set(range(3, steps, 3)) | {steps})
  assert resumed["eval_steps"] == [0] + expected
  assert [s for s, _, _ in seen] == expected
  assert [l for _, l, _ in seen] == resumed["train_losses"][1:]
  jax.tree.map(np.testing.assert_array_equal, seen[-1][2],
               jax.tree.map(np.asarray, resumed["params"]))
  # The runner donates its carry to each step: the caller's init_params and the
  # parameters handed to the callback (kept as device arrays here) stay valid.
  jax.tree.map(np.asarray, first["params"])
  assert not np.array_equal(*(np.asarray(jax.tree.leaves(seen[i][2])[0]) for i in (0, -1)))
  with pytest.raises(ValueError, match="init_params"):
    problems.run("quadratic_deep", "sgd", epochs=1, verbose=False,
                 init_params={"w": jnp.zeros(3)})
  timed = problems.run("quadratic_deep", "sgd", epochs=50, time_budget=0.0, verbose=False)
  assert timed["status"] == "stopped" and "time_budget" in timed["stop_reason"]
  assert timed["steps"] == 1 and len(timed["train_losses"]) == 2


def test_runner_records_monitor_diagnostics():
  from curvax import diagnostics  # pylint: disable=import-outside-toplevel
  p = problems.get("quadratic_deep")
  tx = diagnostics.monitor(optax.sgd(0.01), p.apply_fn, p.loss, "economy", every=4)
  r = problems.run(p, tx, epochs=3, max_steps=9, verbose=False)
  assert r["steps"] == 9
  assert [d["step"] for d in r["diagnostics"]] == [0, 4, 8]   # updates 0, ..., 8
  assert all(np.isfinite(d["loss"]) and d["grad_norm"] > 0 for d in r["diagnostics"])
  assert all("alpha" in d for d in r["diagnostics"][:2])   # known one update later


@pytest.mark.parametrize("monitored", [False, True])
def test_several_steps_per_call_give_the_one_step_per_call_run(monitored):
  # One epoch of quadratic_deep is 7 steps: with 3 steps per call and eval_every=5 the
  # calls are 3+2 | 2 (eval) + ... of several lengths, the remainders of length 1 included.
  p = problems.get("quadratic_deep")

  def make():
    tx = probe_transform()
    if monitored:
      from curvax import diagnostics  # pylint: disable=import-outside-toplevel
      tx = diagnostics.monitor(tx, p.apply_fn, p.loss, "economy", every=3)
    return tx

  kw = dict(epochs=3, log_every=2, eval_every=5, max_steps=19, verbose=False)
  one = problems.run(p, make(), **kw)
  several = problems.run(p, make(), steps_per_call=3, **kw)
  assert several["steps"] == one["steps"] == 19
  for key in ("minibatch_steps", "eval_steps", "eval_epochs", "optimizer_state", "status"):
    assert several[key] == one[key], key
  for key in ("minibatch_train_losses", "train_losses", "test_losses"):
    np.testing.assert_allclose(several[key], one[key], rtol=1e-5, err_msg=key)
  jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-7),
               several["params"], one["params"])
  if monitored:
    assert [d["step"] for d in several["diagnostics"]] == [d["step"] for d in one["diagnostics"]]
    assert [d["step"] for d in one["diagnostics"]] == [0, 3, 6, 9, 12, 15, 18]
    for a, b in zip(several["diagnostics"], one["diagnostics"]):
      assert a.keys() == b.keys()
      np.testing.assert_allclose([a[k] for k in ("loss", "grad_norm", "alpha") if k in a],
                                 [b[k] for k in ("loss", "grad_norm", "alpha") if k in b],
                                 rtol=1e-4)


def test_steps_per_call_stop_early_on_divergence_and_rejects_bad_values():
  r = problems.run("two_d_rosenbrock", "sgd", hyperparams={"learning_rate": 1.0}, epochs=3,
                   log_every=2, steps_per_call=4, verbose=False)
  assert r["status"] == "diverged" and r["steps"] < 78 and r["padded_evaluations"] == 3
  for bad in (0, 2.0, True):
    with pytest.raises(ValueError, match="steps_per_call"):
      problems.run("quadratic_deep", "sgd", epochs=1, steps_per_call=bad, verbose=False)


def test_every_call_length_is_compiled_before_training(monkeypatch):
  # Calls of lengths 3, 2 and 1 (7 steps per epoch, eval_every=5, max_steps=17): all
  # compile before the timed loop, none inside it.
  compiled, called = [], set()
  real_jit = jax.jit

  def length(fun):   # steps per call: one run of the call's layout (no schedule)
    return sum(n for _, n in getattr(fun, "keywords", {}).get("layout", ((True, 1),)))

  def counting_jit(fun, *args, **kwargs):
    jitted = real_jit(fun, *args, **kwargs)

    class Wrapped:
      def __call__(self, *a, **k):
        if getattr(fun, "__name__", "") != "<lambda>":   # not the permutation
          called.add(length(fun))
        return jitted(*a, **k)

      def lower(self, *a, **k):
        compiled.append(length(fun))
        return jitted.lower(*a, **k)
    return Wrapped()

  monkeypatch.setattr(jax, "jit", counting_jit)
  r = problems.run("quadratic_deep", "sgd", epochs=3, eval_every=5, max_steps=17,
                   steps_per_call=3, verbose=False)
  assert r["steps"] == 17
  assert sorted(compiled) == [1, 2, 3] and called == {1, 2, 3}


class _Consistency(NamedTuple):
  value_gap: jax.Array
  grad_gap: jax.Array


def test_line_search_args_are_value_grad_and_value_fn_of_one_function():
  # fmnist_vae has dropout and a random latent: value and grad are those of the
  # training-mode objective with this step's key, so value_fn must be that one too.
  def init(params):
    del params
    return _Consistency(jnp.zeros(()), jnp.zeros(()))

  def update(grads, state, params=None, *, value, grad, value_fn, **extra):
    del state, extra
    v, g = jax.value_and_grad(value_fn)(params)
    gap = jax.tree.map(lambda a, b: jnp.max(jnp.abs(a - b)), g, grad)
    return (jax.tree.map(lambda u: -1e-4 * u, grads),
            _Consistency(jnp.abs(v - value) / jnp.abs(value), jnp.max(jnp.stack(
                jax.tree_util.tree_leaves(gap)))))

  p = problems.get("fmnist_vae", batch_size=16)
  r = problems.run(p, optax.GradientTransformationExtraArgs(init, update), epochs=1,
                   max_steps=3, log_every=1, train_size=256, eval_size=32,
                   line_search_args=True, verbose=False)
  s = r["optimizer_state"]
  assert len(s["value_gap"]) == 3
  assert max(s["value_gap"]) < 1e-6 and max(s["grad_gap"]) < 1e-5, s


def test_registry_probabilistic_preconditioning_restarts_every_epoch_as_the_seed():
  # quadratic_deep: 7 steps per epoch; a round of 3 prior + 2 posterior steps fits.
  hp = dict(prior_iterations=3, num_observations=2)
  r = problems.run("quadratic_deep", "probabilistic_preconditioning", hyperparams=hp,
                   epochs=3, log_every=1, verbose=False)
  assert r["optimizer_hyperparams"]["restart_every"] == 7
  assert r["optimizer_state"]["num_restarts"][-1] == 3
  assert r["optimizer_state"]["num_restarts"][6:8] == [1, 1]   # after steps 7 and 8
  # Given explicitly, or an epoch too short for a round (10 + 5 default steps): as asked.
  assert optimizers.build("probabilistic_preconditioning", problems.get("quadratic_deep"),
                          steps_per_epoch=7, restart_every=None)[1] == {"restart_every": None}
  assert optimizers.build("probabilistic_preconditioning", problems.get("quadratic_deep"),
                          steps_per_epoch=7)[1] == {}


def test_runs_finishing_in_the_same_second_keep_both_results(tmp_path, monkeypatch):
  """Result files are named by seed and time to the second: a second run of the
  same seed and setting within that second gets its own file, not the first's."""
  monkeypatch.setattr(time, "strftime", lambda *a: "2026-11-27-10-00-00")
  out = str(tmp_path / "res")
  kw = dict(epochs=1, out=out, verbose=False, hyperparams={"learning_rate": 0.01},
            max_steps=2, eval_size=100)
  paths = [problems.run("quadratic_deep", "sgd", **kw)["path"] for _ in range(3)]
  assert len(set(paths)) == 3 and all(os.path.exists(p) for p in paths)
  runs = problems.plot.load_results(out)["quadratic_deep"]
  assert [len(v) for v in runs.values()] == [3]


# ------------------------------------------------- independent references (round 18)

def _index_problem(n, batch_size=4):
  """A problem whose training input row i is (i, 0): batches name their examples."""
  from curvax.losses import mean_squared_error  # pylint: disable=import-outside-toplevel
  from curvax.problems.problem import Problem  # pylint: disable=import-outside-toplevel
  x = np.stack([np.arange(n, dtype=np.float32), np.zeros(n, np.float32)], axis=1)
  split = (x, np.zeros((n, 1), np.float32))

  def apply_fn(variables, inputs, *, train=False, rng=None):
    del train, rng
    return inputs @ variables["params"]["w"][:, None]

  return Problem(name="index_probe", init=lambda key: {"params": {"w": jnp.zeros(2)}},
                 apply_fn=apply_fn, loss=mean_squared_error, regularizer=None,
                 batch_size=batch_size, num_epochs=1, has_accuracy=False,
                 load_data=lambda: {"train": split, "train_eval": split, "valid": split,
                                    "test": split}, metric="test_loss")


def _rows_probe(b, e):
  """Logs the example index of each row of ``batch`` (b0, ...) and ``eval_batch`` (e0, ...)."""
  fields = [f"b{j}" for j in range(b)] + [f"e{j}" for j in range(e)]
  rows = NamedTuple("_Rows", [(f, jax.Array) for f in fields])

  def init(params):
    del params
    return rows(*[jnp.zeros(()) for _ in fields])

  def update(updates, state, params=None, *, batch=None, eval_batch=None, **extra):
    del state, params, extra
    return updates, rows(*batch[0][:, 0], *eval_batch[0][:, 0])

  return optax.GradientTransformationExtraArgs(init, update)


def test_epochs_are_fresh_permutations_and_eval_batch_follows_the_batch():
  """Each epoch's batches are consecutive slices of a new permutation of the training set
  (here n = 2 b: all of it); eval_batch holds the e examples that follow the batch after
  an offset in [0, n - b - e] (wrapping around the permutation), all offsets occurring."""
  n, b, e, epochs = 8, 4, 3, 6
  r = problems.run(_index_problem(n, b), _rows_probe(b, e), epochs=epochs, log_every=1,
                   eval_batch_size=e, eval_every=1, verbose=False)
  s = {k: [int(v) for v in vals] for k, vals in r["optimizer_state"].items()}
  steps = n // b
  assert r["steps"] == epochs * steps and r["minibatch_steps"] == list(range(1, epochs * steps + 1))
  perms, offsets = [], set()
  for epoch in range(epochs):
    perm = [s[f"b{j}"][epoch * steps + i] for i in range(steps) for j in range(b)]
    assert sorted(perm) == list(range(n)), perm
    perms.append(perm)
    for i in range(steps):
      t = epoch * steps + i
      ev = [s[f"e{j}"][t] for j in range(e)]
      start = (perm.index(ev[0]) - (i * b + b)) % n
      assert ev == [perm[(i * b + b + start + j) % n] for j in range(e)], (epoch, i)
      assert 0 <= start <= n - b - e
      offsets.add(start)
  assert offsets == set(range(n - b - e + 1))
  assert len({tuple(p) for p in perms}) > 1   # not one permutation reused every epoch
  # eval_every=1: one evaluation per step, at fractional epochs.
  assert r["eval_steps"] == list(range(epochs * steps + 1))
  np.testing.assert_allclose(r["eval_epochs"], np.arange(epochs * steps + 1) / steps)


def test_smallest_training_set_holds_batch_and_eval_batch_exactly():
  """n = b + e fits (offset 0, eval_batch = the rest of the permutation); n < b + e not."""
  b, e = 4, 3
  r = problems.run(_index_problem(b + e, b), _rows_probe(b, e), epochs=2, log_every=1,
                   eval_batch_size=e, verbose=False)
  s = r["optimizer_state"]
  for t in range(2):
    rows = [int(s[f"b{j}"][t]) for j in range(b)] + [int(s[f"e{j}"][t]) for j in range(e)]
    assert sorted(rows) == list(range(b + e))
  with pytest.raises(ValueError, match="too small for a batch of 4"):
    problems.run(_index_problem(b + e - 1, b), _rows_probe(b, e), epochs=1,
                 eval_batch_size=e, verbose=False)


def test_setting_folder_and_json_conversion():
  """DeepOBS's setting folder: num_epochs, batch_size, weight_decay (when set), then the
  hyperparameters in alphabetical order, then curvax's runner settings; JSON has no
  NaN/inf (NaN -> null, +-inf -> +-1e308)."""
  from curvax.problems import runner  # pylint: disable=import-outside-toplevel
  folder = runner._setting_folder(3, 64, 0.002, {"lr": 0.1, "b1": 0.9, "eps": 1e-8},
                                  {"train_size": 256, "max_steps": None})
  assert folder == ("num_epochs__3__batch_size__64__weight_decay__2.e-03__b1__9.e-01__eps__1.e-08"
                    "__lr__1.e-01__train_size__256")
  # DeepOBS's float2str: floats (numpy's too) in ten-digit scientific notation, trailing
  # zeros dropped; ints, bools and strings as str; a weight decay of 0.0 is still written.
  assert runner._setting_folder(1, 8, 0.0, {"b": 1.58e-2, "c": np.float32(0.5), "d": 3,
                                            "e": True, "f": "cos"}) == (
      "num_epochs__1__batch_size__8__weight_decay__0.e+00__b__1.58e-02__c__5.e-01__d__3"
      "__e__True__f__cos")
  assert runner._setting_folder(1, 8, None, {}) == "num_epochs__1__batch_size__8"
  got = runner._jsonable({"a": [float("nan"), float("inf"), -float("inf"), 1.5],
                          "b": np.float32(2.0), 3: (np.int64(4), jnp.float32(0.5))})
  assert got == {"a": [None, 1e308, -1e308, 1.5], "b": 2.0, "3": [4, 0.5]}
  assert json.loads(json.dumps(got, allow_nan=False)) == got


def test_json_conversion_writes_arrays_as_lists():
  """Arrays become (nested) JSON lists, their non-finite entries converted as
  scalars are; 0-d arrays become scalars (not the string of a list)."""
  from curvax.problems import runner  # pylint: disable=import-outside-toplevel
  assert runner._jsonable({"boundaries": np.array([10, 20]), "w": jnp.ones(2)}) == {
      "boundaries": [10, 20], "w": [1.0, 1.0]}
  assert runner._jsonable(np.array([[np.nan, 1.0], [np.inf, -np.inf]])) == [
      [None, 1.0], [1e308, -1e308]]
  assert runner._jsonable(jnp.asarray(3)) == 3
  assert runner._jsonable(np.float32(np.nan)) is None


# DeepOBS 1.1 showcase, tuned learning rates (spec 2.9, seed 001 Table 5.2).
_TABLE_5_2 = {
    "quadratic_deep": (1.58e-2, 2.51e-3, 3.98e-2), "mnist_vae": (3.98e-3, 2.51e-5, 1.58e-4),
    "fmnist_2c2d": (1.58e-1, 2.51e-3, 2.51e-4), "fmnist_vae": (3.98e-3, 1.00e-5, 1.58e-4),
    "cifar100_allcnnc": (1.58e-1, 3.98e-3, 1.00e-3), "svhn_wrn164": (2.51e-2, 6.31e-4, 1.58e-4),
}


@pytest.mark.parametrize("name", sorted(_TABLE_5_2) + ["cifar10_3c3d", "fmnist_mlp"])
def test_registry_learning_rates_are_table_5_2s(name):
  """Tuned rates where Table 5.2 has them (cifar10_3c3d's are missing from the text),
  else each optimizer's generic default; momentum 0.99, Adam (0.9, 0.999, 1e-8)."""
  p = problems.get(name)
  lrs = _TABLE_5_2.get(name, (1e-2, 1e-3, 1e-3))
  for opt, lr in zip(("sgd", "momentum", "adam"), lrs):
    assert optimizers.build(opt, p)[1]["learning_rate"] == lr, opt
  assert optimizers.build("nadamw", p)[1]["learning_rate"] == 1e-3
  assert optimizers.build("momentum", p)[1] == {"learning_rate": lrs[1], "momentum": 0.99}
  assert optimizers.build("adam", p)[1] == {"learning_rate": lrs[2], "b1": 0.9, "b2": 0.999,
                                            "eps": 1e-8}


def test_train_size_alone_keeps_full_valid_and_test_sets():
  """train_size caps train_eval only; valid and test are evaluated whole (eval_size None)."""
  p = _index_problem(8)
  init = {"params": {"w": jnp.asarray([0.1, 0.0])}}
  r = problems.run(p, optax.sgd(0.0), epochs=1, train_size=7, eval_batch_size=3,
                   init_params=init, verbose=False)
  full = p.evaluate(init, splits=("valid", "test"))
  # curvax's mean_squared_error is 1/2 ||output - target||^2 per example.
  assert full["test_loss"] == pytest.approx(np.mean(0.5 * (0.1 * np.arange(8)) ** 2), rel=1e-6)
  assert r["test_losses"] == pytest.approx([full["test_loss"]] * 2, rel=1e-6)
  assert r["valid_losses"] == pytest.approx([full["valid_loss"]] * 2, rel=1e-6)
  head = np.mean(0.5 * (0.1 * np.arange(7)) ** 2)   # train metrics: the 7 examples trained on
  assert r["train_losses"] == pytest.approx([head] * 2, rel=1e-6)


@pytest.mark.parametrize("argv, message", [
    (["run", "quadratic_deeep"], "unknown problem 'quadratic_deeep'"),
    (["run", "quadratic_deep", "--optimizer", "sgdd"], "unknown optimizer 'sgdd'"),
    (["run", "quadratic_deep", "--max-steps", "0"], "max_steps must be a positive"),
    (["run", "cifar10_3c3d", "--data-dir", "/nonexistent"], "download"),
])
def test_cli_run_errors_are_one_line(tmp_path, capsys, argv, message):
  assert cli.main(argv + ["--out", str(tmp_path), "--quiet"]) == 2
  err = capsys.readouterr().err
  assert "run: error:" in err and message in err and "Traceback" not in err


@pytest.mark.parametrize("hp", [["=0.1"], ["learning_rate=0.1", "x y=2"]])
def test_cli_rejects_malformed_or_duplicate_hyperparameters(tmp_path, hp):
  with pytest.raises(SystemExit):
    cli.main(["run", "quadratic_deep", "--hp", *hp, "--out", str(tmp_path)])
  with pytest.raises(SystemExit):
    cli.main(["run", "quadratic_deep", "--hp", "learning_rate=0.1", "--lr", "0.2",
              "--out", str(tmp_path)])


def test_run_rejects_max_steps_below_one():
  problem = curvax.problems.get("quadratic_deep", batch_size=8)
  for bad in (0, -1):
    with pytest.raises(ValueError, match="max_steps"):
      curvax.problems.run(problem, optax.sgd(0.1), max_steps=bad, verbose=False)


@pytest.mark.parametrize("steps_per_call", [1, 3])
def test_divergence_is_dated_to_the_first_nonfinite_loss_whatever_log_every(steps_per_call):
  # Beale from DeepOBS's start with a large step overflows within a few steps.
  # Logged every step, the runner stops at the first non-finite loss: the
  # reference. Logged every 7th or 100th, it notices later and dates it the same.
  problem = curvax.problems.get("two_d_beale", batch_size=16)
  runs = {k: curvax.problems.run(problem, optax.sgd(1e-3), max_steps=40, log_every=k,
                                 steps_per_call=steps_per_call, verbose=False)
          for k in (1, 7, 100)}
  reference = runs[1]["stop_reason"]
  assert runs[1]["status"] == "diverged" and "noticed" not in reference
  first = int(reference.split("at step ")[1].split()[0])
  for k in (7, 100):
    assert runs[k]["status"] == "diverged"
    assert f"at step {first} (noticed at step" in runs[k]["stop_reason"], (first, k)


@pytest.mark.parametrize("steps_per_call", [1, 2])
def test_host_schedule_gives_the_records_of_the_device_schedule(steps_per_call):
  # run(..., scheduled=is_scheduled): calls without scheduled work take the
  # variant compiled with update(..., scheduled=False); losses and monitor
  # records equal those of the device-side schedule.
  from curvax import diagnostics as dg
  problem = curvax.problems.get("quadratic_deep", batch_size=8)
  names = ["loss", "grad_norm", "alpha"]
  seen = []

  def make():
    inner = dg.monitor(optax.sgd(0.05), problem.apply_fn, problem.loss, names, every=4)

    def update(updates, state, params=None, **kw):
      seen.append(kw.get("scheduled"))     # at trace time
      return inner.update(updates, state, params, **kw)
    return optax.GradientTransformationExtraArgs(inner.init, update)

  kw = dict(max_steps=12, train_size=64, eval_size=16, log_every=1,
            steps_per_call=steps_per_call, verbose=False)
  want = curvax.problems.run(problem, make(), **kw)
  assert False not in seen
  got = curvax.problems.run(
      problem, make(), scheduled=lambda t: dg.is_scheduled(t, every=4, instruments=names), **kw)
  assert False in seen        # the idle variant was built and used
  assert got["minibatch_train_losses"] == want["minibatch_train_losses"]
  assert got["diagnostics"] == want["diagnostics"]
  assert [d["step"] for d in got["diagnostics"]] == [0, 4, 8]
  assert all("alpha" in d for d in got["diagnostics"])
  with pytest.raises(TypeError, match="scheduled must be a function"):
    curvax.problems.run(problem, optax.sgd(0.1), scheduled=True, **kw)


def test_schedule_runs_groups_steps_of_equal_schedule():
  """Runs of equal ``schedule(t)`` over steps first .. first + count - 1 (values
  normalised to bool unless a phase name); no schedule: one busy run."""
  phase = lambda t: "prior" if t % 10 < 2 else t % 10 == 5  # noqa: E731
  assert runner_lib.schedule_runs(phase, 8, 10) == (
      (False, 2), ("prior", 2), (False, 3), (True, 1), (False, 2))
  assert runner_lib.schedule_runs(lambda t: np.int64(t >= 3), 0, 5) == ((False, 3), (True, 2))
  assert runner_lib.schedule_runs(None, 4, 7) == ((True, 7),)
  assert runner_lib.schedule_runs(None, 4, 0) == runner_lib.schedule_runs(phase, 4, 0) == ()


@pytest.mark.parametrize("max_layouts", [4, 0])
def test_host_schedule_splits_calls_into_loops_of_equal_schedule(monkeypatch, max_layouts):
  # probabilistic_preconditioning estimates on the first 4 steps of every
  # epoch (P = M = 2, restarts every epoch of 8 steps); with 8 steps per call
  # every call is 4 estimation steps, then 4 without: two loops in one
  # program, the second of the step compiled with scheduled=False. With more
  # distinct layouts than runner.MAX_LAYOUTS (here 0), each call with an
  # estimation step runs the device-scheduled step throughout. The results
  # are the device-side schedule's either way.
  from curvax.problems import runner as runner_lib
  monkeypatch.setattr(runner_lib, "MAX_LAYOUTS", max_layouts)
  problem = curvax.problems.get("quadratic_deep", batch_size=8)
  hp = dict(prior_iterations=2, num_observations=2, rank=1)
  seen = []

  def make():
    inner = curvax.transforms.probabilistic_preconditioning(problem.loss_fn, restart_every=8,
                                                           **hp)

    def update(updates, state, params=None, **kw):
      seen.append(kw.get("scheduled"))     # at trace time
      return inner.update(updates, state, params, **kw)
    return optax.GradientTransformationExtraArgs(inner.init, update)

  kw = dict(max_steps=24, train_size=64, eval_size=16, log_every=1, steps_per_call=8,
            verbose=False)
  want = curvax.problems.run(problem, make(), **kw)
  schedule = lambda t: curvax.transforms.estimates_preconditioner(t, restart_every=8, **{
      k: v for k, v in hp.items() if k != "rank"})
  seen.clear()
  got = curvax.problems.run(problem, make(), scheduled=schedule, **kw)
  assert (False in seen) == (max_layouts > 0)
  assert got["minibatch_train_losses"] == want["minibatch_train_losses"]
  assert got["optimizer_state"] == want["optimizer_state"]
  assert got["optimizer_state"]["num_skipped"][-1] == 0
  assert got["optimizer_state"]["num_restarts"][-1] == 3


def test_auto_schedule_of_registered_optimizers_and_the_command_line(tmp_path):
  # scheduled="auto": the registered optimizer's host schedule, built from the
  # hyperparameters it was built with (PP restarts every epoch: 8 steps).
  from curvax.problems import optimizers as opt_lib
  problem = curvax.problems.get("quadratic_deep", batch_size=8)
  hp = dict(prior_iterations=2, num_observations=2, rank=1)
  kw = dict(max_steps=16, train_size=64, eval_size=16, log_every=1, steps_per_call=8,
            hyperparams=hp, verbose=False)
  want = curvax.problems.run(problem, "probabilistic_preconditioning", **kw)
  got = curvax.problems.run(problem, "probabilistic_preconditioning", scheduled="auto", **kw)
  assert got["minibatch_train_losses"] == want["minibatch_train_losses"]
  assert got["optimizer_state"] == want["optimizer_state"]
  schedule = opt_lib.host_schedule("probabilistic_preconditioning",
                                   dict(hp, restart_every=8))
  assert [schedule(t) for t in range(10)] == (["prior"] * 2 + ["posterior", "build"]
                                               + [False] * 4 + ["prior"] * 2)
  css = opt_lib.host_schedule("curvature_step_size",
                              {"mode": "interval", "interval": 5, "num_estimates": 2})
  assert [css(t) for t in range(7)] == [True, True, False, False, False, True, True]
  assert opt_lib.host_schedule("sgd", {}) is None
  with pytest.raises(KeyError, match="unknown optimizer"):
    opt_lib.host_schedule("nope", {})
  with pytest.raises(ValueError, match="scheduled='auto' needs"):
    curvax.problems.run(problem, optax.sgd(0.1), scheduled="auto", max_steps=1, verbose=False)
  # The command line's --host-schedule.
  from curvax.problems.__main__ import main
  assert main(["run", "quadratic_deep", "--optimizer", "probabilistic_preconditioning",
               "--max-steps", "4", "--train-size", "64", "--eval-size", "16",
               "--batch-size", "8", "--host-schedule", "--quiet", "--out", str(tmp_path),
               "--hp", "prior_iterations=2", "num_observations=2", "rank=1"]) == 0


def test_schedule_functions_take_the_transforms_defaults():
  # The host schedules must agree with the transforms when a keyword is left out.
  import inspect
  pairs = [(curvax.transforms.estimates_preconditioner,
            curvax.transforms.probabilistic_preconditioning),
           (curvax.transforms.computes_curvature, curvax.transforms.curvature_step_size)]
  for host, transform in pairs:
    params = inspect.signature(transform).parameters
    for name, p in inspect.signature(host).parameters.items():
      if name != "step":
        assert p.default == params[name].default, (host.__name__, name)


def test_auto_schedule_with_a_monitor_is_the_monitors():
  problem = curvax.problems.get("quadratic_deep", batch_size=8)
  kw = dict(max_steps=8, train_size=64, eval_size=16, log_every=1, steps_per_call=4,
            monitor={"instruments": ["loss", "grad_norm"], "every": 4}, verbose=False)
  want = curvax.problems.run(problem, optax.sgd(0.05), **kw)
  got = curvax.problems.run(problem, optax.sgd(0.05), scheduled="auto", **kw)
  assert got["minibatch_train_losses"] == want["minibatch_train_losses"]
  assert got["diagnostics"] == want["diagnostics"]
  assert [d["step"] for d in got["diagnostics"]] == [0, 4]


@pytest.mark.parametrize("steps_per_call", [1, 4])
def test_auto_schedule_with_a_monitor_pairs_it_with_the_optimizers(monkeypatch, steps_per_call):
  # A monitored registered optimizer with a host schedule of its own: "auto"
  # gives the pair (monitor's, optimizer's); the optimizer gets its value
  # through the monitor (inner_scheduled -> scheduled), so its steps without
  # curvature compile without its cond. Results: the device-side schedules'
  # (up to rounding: the programs differ).
  from curvax.problems import optimizers as opt_lib
  problem = curvax.problems.get("quadratic_deep", batch_size=8)
  hp = dict(mode="interval", interval=4, num_estimates=2, debias=False)
  seen, real_build = [], opt_lib.build

  def build(*args, **kwargs):   # records the scheduled values the optimizer is traced with
    tx, built = real_build(*args, **kwargs)

    def update(updates, state, params=None, **kw):
      seen.append(kw.get("scheduled"))
      return tx.update(updates, state, params, **kw)
    return optax.GradientTransformationExtraArgs(tx.init, update), built

  monkeypatch.setattr(opt_lib, "build", build)
  kw = dict(max_steps=12, train_size=64, eval_size=16, log_every=1, hyperparams=hp,
            steps_per_call=steps_per_call, verbose=False,
            monitor={"instruments": ["loss", "grad_norm"], "every": 3})
  want = curvax.problems.run(problem, "curvature_step_size", **kw)
  assert set(seen) == {None}
  seen.clear()
  got = curvax.problems.run(problem, "curvature_step_size", scheduled="auto", **kw)
  assert False in seen and set(seen) <= {None, False}
  np.testing.assert_allclose(got["minibatch_train_losses"], want["minibatch_train_losses"],
                             rtol=1e-5)
  assert got["optimizer_state"]["num_computed"] == want["optimizer_state"]["num_computed"] == [
      1, 2, 2, 2, 3, 4, 4, 4, 5, 6, 6, 6]
  np.testing.assert_allclose(got["optimizer_state"]["learning_rate"],
                             want["optimizer_state"]["learning_rate"], rtol=1e-5)
  assert [d["step"] for d in got["diagnostics"]] == [d["step"] for d in want["diagnostics"]] == [
      0, 3, 6, 9]
  for a, b in zip(got["diagnostics"], want["diagnostics"]):
    np.testing.assert_allclose([a["loss"], a["grad_norm"]], [b["loss"], b["grad_norm"]],
                               rtol=1e-5)
  # A pair from the caller's own function does the same; coarse calls (more
  # layouts than MAX_LAYOUTS) run each entry with its conds where any step has work.
  monkeypatch.setattr(runner_lib, "MAX_LAYOUTS", 0)
  pairs = lambda t: (t % 3 == 0, curvax.transforms.computes_curvature(t, **{  # noqa: E731
      k: v for k, v in hp.items() if k != "debias"}))
  coarse = curvax.problems.run(problem, "curvature_step_size", scheduled=pairs, **kw)
  np.testing.assert_allclose(coarse["minibatch_train_losses"], want["minibatch_train_losses"],
                             rtol=1e-5)
  assert coarse["optimizer_state"]["num_computed"] == want["optimizer_state"]["num_computed"]
