"""curvax.problems: architectures, parameter counts, synthetic problems' known minima."""

import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import curvax.problems as problems
from curvax.problems import models, synthetic
from curvax.problems.problem import SPLITS
from curvax.problems.problems import _flax_problem, _image_pre, _mnist_pre

IMAGE = {"mnist": (28, 28, 1), "fmnist": (28, 28, 1), "cifar10": (32, 32, 3),
         "cifar100": (32, 32, 3), "svhn": (32, 32, 3)}


def _count(tree):
  return sum(int(np.prod(x.shape)) for x in jax.tree_util.tree_leaves(tree))


def test_every_problem_is_registered_and_counted():
  assert sorted(problems.PARAM_COUNTS) == problems.names()
  for name in ("quadratic_deep", "two_d_beale", "fmnist_2c2d", "cifar100_allcnnc",
               "svhn_wrn164"):
    assert name in problems.names()
  with pytest.raises(KeyError, match="unknown problem 'nope'.*fmnist_mlp"):
    problems.get("nope")


@pytest.mark.parametrize("name", [n for n in problems.PARAM_COUNTS
                                  if not n.startswith(("two_d", "quadratic"))])
def test_model_shapes_and_parameter_counts_match_deepobs(name, tmp_path, monkeypatch):
  # No data anywhere: init and apply must not read any.
  monkeypatch.setenv("CURVAX_DATA", str(tmp_path))
  monkeypatch.setattr(problems.data, "SYSTEM_ROOT", str(tmp_path))
  p = problems.get(name, data_dir=str(tmp_path))
  variables = jax.eval_shape(p.init, jax.random.PRNGKey(0))
  assert _count(variables["params"]) == problems.PARAM_COUNTS[name]
  inputs = jax.ShapeDtypeStruct((3,) + IMAGE[name.split("_")[0]], jnp.float32)
  outputs = jax.eval_shape(lambda v, x: p.apply_fn(v, x), variables, inputs)
  if name.endswith("vae"):
    assert outputs.shape == (3, 784 + 16) and not p.has_accuracy
  else:
    classes = 100 if name.startswith("cifar100") else 10
    assert outputs.shape == (3, classes) and p.has_accuracy
  assert p.has_bn == name.endswith("wrn164")
  assert ("batch_stats" in variables) == p.has_bn
  if name.endswith(("3c3d", "allcnnc", "wrn164")):
    assert p.weight_decay == (0.002 if name.endswith("3c3d") else 5e-4)
  else:
    assert p.regularizer is None


def test_deepobs_defaults():
  assert (problems.get("fmnist_2c2d").batch_size, problems.get("fmnist_2c2d").num_epochs) == (128, 100)
  assert (problems.get("mnist_vae").batch_size, problems.get("mnist_vae").num_epochs) == (64, 50)
  assert (problems.get("cifar100_allcnnc").batch_size,
          problems.get("cifar100_allcnnc").num_epochs) == (256, 350)
  assert problems.get("svhn_wrn164").num_epochs == 160
  assert problems.get("fmnist_mlp", batch_size=32).batch_size == 32


@pytest.mark.parametrize("name", ["quadratic_deep", "two_d_beale", "fmnist_mlp"])
def test_batch_size_must_be_none_or_a_positive_int(name):
  """0 used to mean the default silently; negative or fractional sizes failed later in JAX."""
  for bad in (0, -100, 2.5, True, "32"):
    with pytest.raises(ValueError, match="batch_size must be a positive int"):
      problems.get(name, batch_size=bad)
  p = problems.get(name, batch_size=np.int64(7))
  assert p.batch_size == 7 and type(p.batch_size) is int
  assert problems.get(name, batch_size=None).batch_size == 128


def test_initialisations_follow_deepobs():
  logreg = problems.get("fmnist_logreg").init(jax.random.PRNGKey(0))["params"]
  assert all(np.all(np.asarray(x) == 0) for x in jax.tree_util.tree_leaves(logreg))
  # The MLP's and 2c2d's initialisers on narrow copies (same code, cheaper).
  x = jnp.zeros((1, 28, 28, 1))
  mlp = jax.jit(problems.models.MLP(widths=(400,)).init)(jax.random.PRNGKey(0), x)["params"]
  w = np.asarray(mlp["Dense_0"]["kernel"])
  # truncated N(0, 0.03^2) at two std has std 0.03 * 0.8796.
  assert abs(w.std() - 0.03 * 0.8796) < 1e-3 and np.abs(w).max() <= 2 * 0.03 + 1e-6
  assert np.all(np.asarray(mlp["Dense_0"]["bias"]) == 0)


def test_l2_only_on_kernels():
  p = problems.get("cifar10_3c3d")
  shapes = jax.eval_shape(p.init, jax.random.PRNGKey(0))
  ones = jax.tree_util.tree_map(lambda s: jnp.ones(s.shape, s.dtype), shapes)
  params, _ = p.split_variables(ones)
  kernels = [x for path, x in jax.tree_util.tree_leaves_with_path(params)
             if path[-1].key == "kernel"]
  assert len(kernels) == 6
  expected = 0.5 * 0.002 * sum(k.size for k in kernels)
  np.testing.assert_allclose(float(p.regularizer(params)), expected, rtol=1e-5)
  assert expected < 0.5 * 0.002 * problems.PARAM_COUNTS["cifar10_3c3d"]  # biases skipped


# ------------------------------------------------------------------ quadratic_deep

@pytest.fixture(scope="module")
def quadratic():
  return problems.get("quadratic_deep")


def test_quadratic_hessian_matches_deepobs(quadratic):
  q = quadratic.hessian
  lam = np.linalg.eigvalsh(q)
  np.testing.assert_allclose(q, q.T, atol=1e-12)
  np.testing.assert_allclose([np.trace(q), lam.min(), lam.max()], [477.61, 0.00552, 53.13],
                             rtol=2e-3)
  # A fresh instance gets the same Q (DeepOBS PR #44 pitfall).
  np.testing.assert_array_equal(problems.get("quadratic_deep").hessian, q)
  # The curvax form (linear model + MSE) has Hessian = GGN = Q.
  variables = quadratic.init(None)
  x = quadratic.data("train")[0][:5]
  batch = (x, jnp.zeros_like(x))
  h = jax.hessian(lambda t: quadratic.loss_fn({"params": {"theta": t}}, batch))(
      variables["params"]["theta"])
  np.testing.assert_allclose(np.asarray(h), q, rtol=1e-4, atol=1e-4)


def test_quadratic_reference_losses_and_minimum(quadratic):
  m0 = quadratic.evaluate(quadratic.init(None))
  np.testing.assert_allclose([m0["train_eval_loss"], m0["test_loss"]], [353.71, 353.93],
                             atol=0.01)
  xbar = jnp.mean(quadratic.data("train")[0].astype(jnp.float64), axis=0)
  at_mean = {"params": {"theta": xbar.astype(jnp.float32)}}
  m = quadratic.evaluate(at_mean)
  np.testing.assert_allclose([m["train_eval_loss"], m["test_loss"]], [84.77, 87.13], atol=0.01)
  # The training loss is minimised at the data mean: gradient there is zero.
  train = quadratic.data("train")
  g = jax.grad(quadratic.loss_fn)(at_mean, train)["params"]["theta"]
  assert float(jnp.max(jnp.abs(g))) < 1e-3
  assert quadratic.evaluate({"params": {"theta": jnp.zeros(100)}})["test_loss"] == (
      pytest.approx(86.99, abs=0.01))


# ------------------------------------------------------------------ 2-D problems

@pytest.mark.parametrize("name", sorted(synthetic.TWO_D))
def test_two_d_known_minima_and_noise_model(name):
  f, start, argmin, fmin = synthetic.TWO_D[name]
  p = problems.get(name)
  v0 = p.init(None)
  assert (float(v0["params"]["u"]), float(v0["params"]["v"])) == pytest.approx(start)
  uv = jnp.asarray(argmin, jnp.float64)
  assert float(f(uv[0], uv[1])) == pytest.approx(fmin, abs=1e-6)
  g = jax.grad(lambda z: f(z[0], z[1]))(uv)
  assert float(jnp.max(jnp.abs(g))) < 1e-4
  # Test set is all zeros: test loss is f itself; training noise is additive & linear.
  at_min = {"params": {"u": uv[0], "v": uv[1]}}
  assert p.evaluate(at_min, splits=("test",))["test_loss"] == pytest.approx(fmin, abs=1e-4)
  x, _ = p.data("train")
  assert x.shape == (10000, 2)
  np.testing.assert_allclose(np.asarray(x).std(0), 1.0, atol=0.03)
  per_example = p.apply_fn(at_min, x[:4])[:, 0]
  np.testing.assert_allclose(per_example, fmin + uv[0] * x[:4, 0] + uv[1] * x[:4, 1],
                             rtol=1e-5, atol=1e-5)
  np.testing.assert_allclose(synthetic.two_d_data(42)[0][:3], x[:3])


def test_branin_has_three_minimisers():
  for u, v in ((-math.pi, 12.275), (math.pi, 2.275), (9.42478, 2.475)):
    assert float(synthetic.branin(jnp.float64(u), jnp.float64(v))) == pytest.approx(
        0.397887, abs=1e-5)


def test_batches_are_seeded_and_drop_remainder(quadratic):
  p = problems.get("quadratic_deep", batch_size=300)
  a = [b[0] for b in p.batches("train", jax.random.PRNGKey(1))]
  b = [b[0] for b in p.batches("train", jax.random.PRNGKey(1))]
  c = [b[0] for b in p.batches("train", jax.random.PRNGKey(2))]
  assert len(a) == 3 and all(x.shape == (300, 100) for x in a)
  np.testing.assert_array_equal(a[0], b[0])
  assert not np.array_equal(a[0], c[0])
  rows = np.concatenate(a)
  assert len({r.tobytes() for r in rows}) == 900   # a permutation: no repeats
  test = [b[0] for b in p.batches("test")]
  assert [t.shape[0] for t in test] == [300, 300, 300, 100]
  np.testing.assert_array_equal(np.concatenate(test), p.data("test")[0])


# ------------------------------------------------------------------ data splits

def _fake_load(n_train, n_test):
  """A `data.load` of uint8 'images' of shape (1,) whose value is the example index."""
  def load(name, data_dir=None):
    del name, data_dir
    split = lambda n: ((np.arange(n) % 256).astype(np.uint8)[:, None],
                       np.arange(n, dtype=np.int32))
    return {"train": split(n_train), "test": split(n_test)}
  return load


@pytest.mark.parametrize("name,n_train,n_test,held_out", [
    ("svhn_3c3d", 73_257, 26_032, 26_032),     # a fifth (14,651) used to cap SVHN's
    ("cifar10_3c3d", 50_000, 10_000, 10_000),
    ("cifar10_3c3d", 15_000, 10_000, 3_000),   # a small copy: a fifth
])
def test_valid_and_train_eval_have_deepobs_sizes(name, n_train, n_test, held_out, monkeypatch):
  monkeypatch.setattr(problems.data, "load", _fake_load(n_train, n_test))
  out = problems.get(name).load_data()
  assert [len(out[s][1]) for s in ("train", "train_eval", "valid", "test")] == [
      n_train - held_out, held_out, held_out, n_test]
  # valid is the tail of the training file, train_eval the head of what remains.
  np.testing.assert_array_equal(out["valid"][1], np.arange(n_train - held_out, n_train))
  np.testing.assert_array_equal(out["train_eval"][1], np.arange(held_out))


# ------------------------------------------------------------------ preprocessing

def _per_image_standardization(x):
  """tf.image.per_image_standardization in NumPy, per image of a batch."""
  x = x.astype(np.float64)
  n = np.prod(x.shape[1:])
  mean = x.mean(axis=(1, 2, 3), keepdims=True)
  std = x.std(axis=(1, 2, 3), keepdims=True)
  return (x - mean) / np.maximum(std, 1.0 / np.sqrt(n))


def test_standardization_is_deepobs_on_the_0_255_scale():
  """DeepOBS standardises the uint8 values cast to float (no /255): its floor
  1/sqrt(num_pixels) is in grey levels, so a low-contrast image still gets std 1."""
  rng = np.random.RandomState(0)
  x = np.stack([
      rng.randint(100, 104, (32, 32, 3)),                  # std ~1.1 grey levels
      np.full((32, 32, 3), 7) + (rng.rand(32, 32, 3) < 0.001),  # std ~0.03 grey levels
      np.full((32, 32, 3), 200),                           # constant: the floor alone
      rng.randint(0, 256, (32, 32, 3)),
  ]).astype(np.uint8)
  expected = _per_image_standardization(x)
  pre = problems.problems._image_pre(flip=True)
  inputs, _ = pre(jnp.asarray(x), jnp.zeros(4, jnp.int32), None, False)
  keep = [0, 1, 3]
  # atol: the float32 mean's round-off (a few ulps, the summation order XLA's) over
  # std: mean/std ~ 230 in the second image, 1.6e-4 on jax 0.6.0 (a wrong floor is O(1)).
  np.testing.assert_allclose(np.asarray(inputs)[keep], expected[keep], rtol=1e-4, atol=1e-3)
  # The constant image: float32 rounding of its mean (200/255), over the floor.
  np.testing.assert_allclose(inputs[2], expected[2], atol=2e-3)
  np.testing.assert_allclose(np.asarray(inputs)[:2].std(axis=(1, 2, 3)), 1.0, rtol=1e-4)


# ------------------------------------------------------------------ evaluation

def _fake_images(monkeypatch, shape, n_train=55, n_test=11):
  """Random uint8 images as every data set's files (55 training examples hold out 11;
  train_eval, valid and test of one size compile `evaluate` once)."""
  rng = np.random.RandomState(0)
  split = lambda n: (rng.randint(0, 256, (n,) + shape).astype(np.uint8),
                     rng.randint(0, 10, n).astype(np.int32))
  arrays = {"train": split(n_train), "test": split(n_test)}
  monkeypatch.setattr(problems.data, "load", lambda name, data_dir=None: arrays)


def _random_params(p, scale=0.01):
  rng = np.random.RandomState(1)
  params, _ = p.split_variables(p.init(jax.random.PRNGKey(0)))
  return jax.tree.map(lambda a: jnp.asarray(rng.normal(0, scale, a.shape), a.dtype), params)


def _manual_eval_loss(p, params, split, key, augment, chunk):
  """`Problem.evaluate`'s loss by hand: chunk i (the last one zero-padded) preprocessed
  with the first key of split(fold_in(fold_in(key, split index), i))."""
  x, y = (np.asarray(a) for a in p.data(split))
  split_key = jax.random.fold_in(key, SPLITS.index(split))
  total = 0.0
  for i, start in enumerate(range(0, len(y), chunk)):
    xb, yb = x[start:start + chunk], y[start:start + chunk]
    r = len(yb)
    xb = np.concatenate([xb, np.zeros((chunk - r,) + xb.shape[1:], xb.dtype)])
    yb = np.concatenate([yb, np.zeros((chunk - r,), yb.dtype)])
    k_pre, _ = jax.random.split(jax.random.fold_in(split_key, i))
    inputs, targets = p._jit_preprocess(jnp.asarray(xb), jnp.asarray(yb), k_pre, augment)
    total += float(jnp.sum(p.loss(p.apply_fn(params, inputs), targets)[:r]))
  reg = float(p.regularizer(params)) if p.regularizer is not None else 0.0
  return total / len(y) + reg


def test_train_eval_is_evaluated_on_augmented_training_examples(monkeypatch):
  """DeepOBS evaluates train_eval on its (augmented) training pipeline, model in eval
  mode; valid and test are not augmented. Chunks get keys folded from `key`."""
  _fake_images(monkeypatch, (32, 32, 3))
  p = _flax_problem("tiny_cifar", models.LogReg(), (32, 32, 3),
                    problems.problems.softmax_cross_entropy, batch_size=4, num_epochs=1,
                    dataset="cifar-10", data_dir=None, preprocess=_image_pre(flip=True),
                    weight_decay=0.002)
  params = _random_params(p)
  key = jax.random.PRNGKey(5)
  m = p.evaluate(params, batch_size=4, key=key)
  assert p.num_examples("train_eval") == 11   # 3 chunks, the last one partial
  augmented = _manual_eval_loss(p, params, "train_eval", key, True, 4)
  assert m["train_eval_loss"] == pytest.approx(augmented, rel=1e-5)
  plain = _manual_eval_loss(p, params, "train_eval", key, False, 4)
  assert abs(augmented - plain) > 1e-3
  for split in ("valid", "test"):
    assert m[f"{split}_loss"] == pytest.approx(
        _manual_eval_loss(p, params, split, key, False, 4), rel=1e-5)
  # The default key is the problem's seed; another key changes train_eval only.
  assert p.evaluate(params, batch_size=4) == p.evaluate(params, batch_size=4,
                                                        key=jax.random.PRNGKey(p.seed))
  other = p.evaluate(params, batch_size=4, key=jax.random.PRNGKey(6))
  assert other["train_eval_loss"] != m["train_eval_loss"]
  assert (other["valid_loss"], other["test_loss"]) == (m["valid_loss"], m["test_loss"])


def test_evaluation_without_augmentation_does_not_depend_on_the_key(monkeypatch):
  _fake_images(monkeypatch, (28, 28, 1))
  p = _flax_problem("tiny_mnist", models.LogReg(), (28, 28, 1),
                    problems.problems.softmax_cross_entropy, batch_size=4, num_epochs=1,
                    dataset="mnist", data_dir=None, preprocess=_mnist_pre)
  params = _random_params(p)
  m = p.evaluate(params, batch_size=4)
  assert m == p.evaluate(params, batch_size=4, key=jax.random.PRNGKey(7))
  for split in ("train_eval", "valid", "test"):
    assert m[f"{split}_loss"] == pytest.approx(
        _manual_eval_loss(p, params, split, jax.random.PRNGKey(0), False, 4), rel=1e-5)


def test_vae_evaluation_draws_fresh_latent_noise_per_chunk_and_key(monkeypatch):
  """DeepOBS draws the VAE's eps afresh for every batch; evaluation used to reuse
  PRNGKey(0)'s rows in every chunk and every evaluation."""
  img = np.random.RandomState(0).randint(0, 256, (1, 28, 28, 1)).astype(np.uint8)
  same = lambda n: (np.repeat(img, n, axis=0), np.zeros(n, np.int32))
  monkeypatch.setattr(problems.data, "load",
                      lambda name, data_dir=None: {"train": same(10), "test": same(4)})
  p = problems.get("mnist_vae", batch_size=2)
  params, _ = p.split_variables(p.init(jax.random.PRNGKey(0)))

  def test_loss(n, key=None):
    return p.evaluate(params, splits=("test",), batch_size=2, max_examples=n,
                      key=key)["test_loss"]

  # One image everywhere: had chunk 1 chunk 0's noise, 4 examples would give 2's loss.
  assert test_loss(4) != pytest.approx(test_loss(2), rel=1e-6)
  key = jax.random.PRNGKey(3)
  assert test_loss(4, key) == test_loss(4, key)
  assert test_loss(4, key) != pytest.approx(test_loss(4), rel=1e-6)


def test_import_curvax_loads_problems_on_first_use():
  """``import curvax`` stays light (no data loaders, models, matplotlib), yet
  ``curvax.problems`` works without an explicit import."""
  import subprocess  # pylint: disable=import-outside-toplevel
  import sys  # pylint: disable=import-outside-toplevel
  code = ("import sys, curvax\n"
          "assert 'curvax.problems' not in sys.modules\n"
          "assert 'matplotlib' not in sys.modules\n"
          "assert curvax.problems.get('quadratic_deep').name == 'quadratic_deep'\n"
          "assert 'curvax.problems' in sys.modules\n"
          "try:\n  curvax.no_such_module\nexcept AttributeError as e:\n"
          "  assert \"no attribute 'no_such_module'\" in str(e)\n"
          "else:\n  raise SystemExit('no AttributeError')\n")
  subprocess.run([sys.executable, "-c", code], check=True, timeout=120)
