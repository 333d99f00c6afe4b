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
from reference import linen_calls

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


# ------------------------------------------------- independent references (round 18)

# DeepOBS's defaults (spec 1.2, Table 6.1 and config.DEFAULT_TEST_PROBLEMS_SETTINGS),
# the 2-D problems' curvax choice (module docstring), and the flags of spec 1.1's
# catalogue (Dr column) and 1.3 (L2 lambda), 2.2 (loss-metric problems).
_SPEC = {  # name: (batch size, epochs, has dropout, weight decay, metric)
    "quadratic_deep": (128, 100, False, None, "test_loss"),
    "two_d_beale": (128, 100, False, None, "test_loss"),
    "mnist_vae": (64, 50, True, None, "test_loss"),
    "fmnist_vae": (64, 100, True, None, "test_loss"),
    "fmnist_2c2d": (128, 100, False, None, "test_accuracy"),
    "mnist_2c2d": (128, 100, False, None, "test_accuracy"),
    "cifar10_3c3d": (128, 100, False, 0.002, "test_accuracy"),
    "cifar100_3c3d": (128, 100, False, 0.002, "test_accuracy"),
    "svhn_3c3d": (128, 100, False, 0.002, "test_accuracy"),
    "cifar100_allcnnc": (256, 350, True, 5e-4, "test_accuracy"),
    "svhn_wrn164": (128, 160, False, 5e-4, "test_accuracy"),
    "mnist_logreg": (128, 50, False, None, "test_accuracy"),
    "mnist_mlp": (128, 100, False, None, "test_accuracy"),
    "fmnist_mlp": (128, 100, False, None, "test_accuracy"),
}


@pytest.mark.parametrize("name", sorted(_SPEC))
def test_defaults_flags_and_metric_follow_the_spec(name):
  batch, epochs, dropout, wd, metric = _SPEC[name]
  p = problems.get(name)
  assert (p.batch_size, p.num_epochs) == (batch, epochs)
  assert p.has_dropout == dropout
  assert p.weight_decay == wd and (p.regularizer is None) == (wd is None)
  assert p.metric == metric and p.has_accuracy == (metric == "test_accuracy")


def test_synthetic_data_are_deepobs_seeded_draws():
  """quadratic_deep: N(0, 0.6^2 I_100) float32, 1,000 draws each from RandomState(42)
  (train = train_eval), 43 (test), 44 (valid). two_d_*: 10,000 x-draws then 10,000
  y-draws of N(0, 1) from RandomState(42) (valid 44), an all-zero test set."""
  q = problems.get("quadratic_deep")
  for split, seed in (("train", 42), ("train_eval", 42), ("test", 43), ("valid", 44)):
    x, y = q.data(split)
    ref = np.float32(np.random.RandomState(seed).normal(0.0, 0.6, (1000, 100)))
    assert x.dtype == jnp.float32 and x.shape == (1000, 100)
    np.testing.assert_array_equal(np.asarray(x), ref)
    np.testing.assert_array_equal(np.asarray(y), 0.0)
  p = problems.get("two_d_branin")
  for split, seed in (("train", 42), ("train_eval", 42), ("valid", 44)):
    rng = np.random.RandomState(seed)
    ref_x = rng.normal(0.0, 1.0, 10000)
    ref_y = rng.normal(0.0, 1.0, 10000)
    x = np.asarray(p.data(split)[0])
    np.testing.assert_array_equal(x, np.float32(np.stack([ref_x, ref_y], axis=1)))
  assert np.all(np.asarray(p.data("test")[0]) == 0) and p.num_examples("test") == 10000


@pytest.mark.parametrize("b", [250, 300])
def test_batches_cover_splits_exactly(b):
  """train: floor(n / b) full shuffled batches of distinct rows (an incomplete last one
  dropped, a complete one kept); other splits (train_eval too): file order, every
  example once, a partial last batch only when b does not divide n."""
  p = problems.get("quadratic_deep", batch_size=b)
  x = np.asarray(p.data("train")[0])
  train = [np.asarray(t[0]) for t in p.batches("train", jax.random.PRNGKey(3))]
  assert [len(t) for t in train] == [b] * (1000 // b)
  rows = np.concatenate(train)
  index = {r.tobytes(): i for i, r in enumerate(x)}
  picked = [index[r.tobytes()] for r in rows]
  assert len(set(picked)) == len(picked) and picked != sorted(picked)
  sizes = [b] * (1000 // b) + ([1000 % b] if 1000 % b else [])
  for split in ("train_eval", "test"):
    got = [np.asarray(t[0]) for t in p.batches(split, jax.random.PRNGKey(3))]
    assert [len(t) for t in got] == sizes, split
    np.testing.assert_array_equal(np.concatenate(got), np.asarray(p.data(split)[0]))
  with pytest.raises(ValueError, match="unknown split 'validation'"):
    p.data("validation")


def test_split_boundary_keeps_deepobs_size_when_it_fits_twice(monkeypatch):
  """A training file of exactly twice the held-out size still holds DeepOBS's 10,000."""
  monkeypatch.setattr(problems.data, "load", _fake_load(20_000, 10))
  out = problems.get("cifar10_3c3d").load_data()
  assert [len(out[s][1]) for s in ("train", "train_eval", "valid")] == [10_000] * 3


def test_image_preprocessing_of_mnist_and_vae_is_a_plain_rescale(monkeypatch):
  """(F-)MNIST: uint8 / 255, no augmentation; the VAE's targets are its flattened inputs."""
  _fake_images(monkeypatch, (28, 28, 1))
  x, y = (np.asarray(a) for a in problems.get("mnist_logreg").data("test"))
  for name in ("mnist_logreg", "mnist_vae"):
    p = problems.get(name, batch_size=5)
    for split in ("train", "test"):
      inputs, targets = next(p.batches(split, jax.random.PRNGKey(0)))
      if split == "test":
        np.testing.assert_allclose(np.asarray(inputs), x[:5] / 255.0, rtol=1e-6)
        if name == "mnist_logreg":
          np.testing.assert_array_equal(targets, y[:5])
      if name == "mnist_vae":
        np.testing.assert_array_equal(np.asarray(targets),
                                      np.asarray(inputs).reshape(5, 784))
  inputs, _ = _mnist_pre(jnp.asarray(x), jnp.asarray(y), None, True)   # no augmentation
  np.testing.assert_allclose(np.asarray(inputs), x / 255.0, rtol=1e-6)


def _crop_and_flip_of(out, img):
  """Which pad-2 crop (row, column offset) and flip of ``img`` (H, W, C) ``out`` is,
  up to a positive affine map of the values; None if none."""
  padded = np.pad(img, ((2, 2), (2, 2), (0, 0)))
  z = lambda a: (a - a.mean()) / a.std()
  target = z(out.astype(np.float64))
  for r in range(5):
    for c in range(5):
      crop = padded[r:r + 32, c:c + 32]
      for flip in (False, True):
        cand = crop[:, ::-1] if flip else crop
        if np.max(np.abs(z(cand) - target)) < 1e-3:
          return r, c, flip
  return None


def test_cifar_and_svhn_augmentation_is_deepobs_crop_flip_brightness_contrast():
  """Spec 1.3: pad to 36x36 and take a random 32x32 crop (all 5 x 5 offsets), flip
  horizontally at random (CIFAR only, never SVHN), add a brightness in +-63/255 and
  scale the contrast by a factor in [0.2, 1.8]. On grey images (saturation is then a
  no-op) each augmented image is a crop's positive affine image: found by search."""
  rng = np.random.RandomState(0)
  n = 64
  grey = rng.randint(0, 256, (n, 32, 32, 1)).astype(np.uint8).repeat(3, axis=-1)
  img = grey.astype(np.float32) / 255.0
  keys = jax.random.split(jax.random.PRNGKey(1), n)
  aug = jax.jit(jax.vmap(lambda k, a: problems.problems._augment_one(k, a, flip=True)))(
      keys, jnp.asarray(img))
  aug = np.asarray(aug, np.float64)
  found = [_crop_and_flip_of(a, i) for a, i in zip(aug, img.astype(np.float64))]
  assert None not in found
  assert {r for r, _, _ in found} == {c for _, c, _ in found} == set(range(5))
  assert {f for _, _, f in found} == {False, True}
  brightness, contrast = [], []
  for a, i, (r, c, f) in zip(aug, img.astype(np.float64), found):
    crop = np.pad(i, ((2, 2), (2, 2), (0, 0)))[r:r + 32, c:c + 32]
    brightness.append(a.mean() - crop.mean())
    contrast.append(a.std() / crop.std())
  assert max(np.abs(brightness)) <= 63 / 255 + 1e-5
  assert min(brightness) < -0.15 and max(brightness) > 0.15
  assert 0.2 - 1e-5 <= min(contrast) < 0.5 and 1.5 < max(contrast) <= 1.8 + 1e-5
  # Through SVHN's preprocessing: standardised crops, never flipped.
  p = problems.get("svhn_3c3d")
  out, _ = p._jit_preprocess(jnp.asarray(grey[:32]), jnp.zeros(32, jnp.int32),
                             jax.random.PRNGKey(2), True)
  found = [_crop_and_flip_of(a, i) for a, i in zip(np.asarray(out, np.float64),
                                                     img[:32].astype(np.float64))]
  assert None not in found and {f for _, _, f in found} == {False}
  assert len({(r, c) for r, c, _ in found}) > 1


def test_evaluate_accuracy_and_train_loss_against_numpy(monkeypatch):
  """Logistic regression on fake images: `evaluate`'s accuracy counts argmax hits of
  the real examples only (a padded chunk row would be 'correct' here: class 0 wins on
  zero inputs), and `train_loss` is the mean cross-entropy plus (lambda/2)||W||^2."""
  _fake_images(monkeypatch, (28, 28, 1))
  p = _flax_problem("tiny_mnist", models.LogReg(), (28, 28, 1),
                    problems.problems.softmax_cross_entropy, batch_size=4, num_epochs=1,
                    dataset="mnist", data_dir=None, preprocess=_mnist_pre, weight_decay=0.002)
  rng = np.random.RandomState(4)
  w = rng.normal(0, 0.02, (784, 10))
  bias = np.zeros(10)
  bias[0] = 0.01
  params = {"params": {"Dense_0": {"kernel": jnp.asarray(w), "bias": jnp.asarray(bias)}}}

  def reference(split):
    x, y = (np.asarray(a) for a in p.data(split))
    logits = (x.reshape(len(y), -1) / 255.0) @ w + bias
    logp = logits - np.log(np.sum(np.exp(logits - logits.max(1, keepdims=True)), 1,
                                  keepdims=True)) - logits.max(1, keepdims=True)
    ce = -logp[np.arange(len(y)), y]
    return ce, np.mean(np.argmax(logits, 1) == y)

  m = p.evaluate(params, batch_size=4)   # 11 examples: chunks of 4, 4, 3 (+1 padding)
  reg = 0.5 * 0.002 * np.sum(w ** 2)
  for split in ("train_eval", "valid", "test"):
    ce, acc = reference(split)
    assert m[f"{split}_accuracy"] == pytest.approx(acc, abs=1e-6), split
    assert m[f"{split}_loss"] == pytest.approx(ce.mean() + reg, rel=1e-5), split
  x, y = p.data("train")
  batch = _mnist_pre(x[:8], y[:8], None, True)
  value, state = p.train_loss(params, {}, batch, jax.random.PRNGKey(0))
  ce = -jax.nn.log_softmax(np.asarray(batch[0]).reshape(8, -1) @ w + bias)[
      np.arange(8), np.asarray(y[:8])]
  assert float(value) == pytest.approx(float(np.mean(ce)) + reg, rel=1e-5)
  assert state == {} and float(value) == pytest.approx(float(p.loss_fn(params, batch)), rel=1e-6)


@pytest.mark.slow
def test_initialisations_of_the_conv_models_follow_deepobs():
  """Spec 1.4 on small inputs (same layers, small dense fans): 2c2d W ~ truncated
  N(0, 0.05^2), b = 0.05; 3c3d conv W glorot-normal (truncated at two std, so beyond
  the glorot-uniform bound), dense W glorot-uniform, b = 0 (All-CNN-C: below)."""
  key = jax.random.PRNGKey(0)

  def init(module, size, channels):
    return jax.jit(module.init)(key, jnp.zeros((1, size, size, channels)))["params"]

  two = init(models.TwoC2D(conv_impl="lax"), 4, 1)
  for layer in two.values():
    assert np.all(np.asarray(layer["bias"]) == np.float32(0.05))
  k = np.asarray(two["Conv_1"]["kernel"])   # 5 x 5 x 32 x 64
  assert abs(k.std() - 0.05 * 0.8796) < 1e-3 and np.abs(k).max() <= 0.1 + 1e-6

  three = init(models.ThreeC3D(10, conv_impl="lax"), 12, 3)
  for name, layer in three.items():
    w = np.asarray(layer["kernel"])
    assert np.all(np.asarray(layer["bias"]) == 0), name
    if name.startswith("Conv"):
      fan_in, fan_out = np.prod(w.shape[:-1]), np.prod(w.shape[:-2]) * w.shape[-1]
    else:
      fan_in, fan_out = w.shape
    std = np.sqrt(2.0 / (fan_in + fan_out))
    assert abs(w.std() / std - 1) < 0.1, name
    if name.startswith("Conv"):   # truncated normal: up to 2 std / 0.8796 = 2.27 std
      assert np.abs(w).max() > 1.9 * std, name
    else:                         # uniform: bounded by sqrt(3) std, and nearly reaching it
      assert 1.6 * std < np.abs(w).max() <= np.sqrt(3) * std * (1 + 1e-6), name


def _lrelu_ref(a):
  a = np.asarray(a, np.float64)
  return np.where(a > 0, a, 0.3 * a)


def test_vae_wiring_follows_deepobs():
  """Spec 1.4's VAE, layer by layer: conv4x4/64 at strides 2, 2, 1 with leaky ReLU
  (slope 0.3); mu = Dense_0, s = 0.5 Dense_1, z = mu + eps exp(s); Dense 24 and 49 with
  leaky ReLU, reshape 7x7x1; deconvs at strides 2, 1, 1 with ReLU; Dense 784 sigmoid.
  Dropout 0.2 after the three convs and the first two deconvs (5 in all)."""
  module = models.VAE()
  shapes = jax.eval_shape(module.init, {"params": jax.random.PRNGKey(0),
                                        "latent": jax.random.PRNGKey(1)},
                          jnp.zeros((1, 28, 28, 1)))
  rng = np.random.RandomState(0)
  variables = jax.tree.map(lambda s: jnp.asarray(rng.normal(0, 0.05, s.shape), jnp.float32),
                           shapes)
  variables["params"]["Dense_1"]["bias"] = jnp.full((8,), 2.0, jnp.float32)
  x = jnp.asarray(rng.rand(8, 28, 28, 1), jnp.float32)
  latent = {"latent": jax.random.PRNGKey(7)}
  seen, out = linen_calls(module, variables, x, rngs=latent)
  layers = [(n, i, np.asarray(o, np.float64)) for n, _, i, o in seen if n != "Dropout"]
  names = [n for n, _, _ in layers]
  assert names == ["Conv"] * 3 + ["Dense"] * 4 + ["ConvTranspose"] * 3 + ["Dense"]
  (_, i0, c0), (_, i1, c1), (_, i2, c2) = layers[:3]
  np.testing.assert_array_equal(np.asarray(i0), np.asarray(x))
  assert [c.shape[1:] for c in (c0, c1, c2)] == [(14, 14, 64), (7, 7, 64), (7, 7, 64)]
  np.testing.assert_allclose(i1, _lrelu_ref(c0), rtol=1e-5, atol=1e-6)
  np.testing.assert_allclose(i2, _lrelu_ref(c1), rtol=1e-5, atol=1e-6)
  (_, h_mu, mu), (_, h_s, s_raw), (_, z, d1), (_, i_d2, d2) = layers[3:7]
  np.testing.assert_allclose(h_mu, _lrelu_ref(c2).reshape(8, -1), rtol=1e-5, atol=1e-6)
  np.testing.assert_array_equal(np.asarray(h_mu), np.asarray(h_s))
  out = np.asarray(out, np.float64)
  np.testing.assert_allclose(out[:, 784:792], mu, rtol=1e-6, atol=1e-7)
  np.testing.assert_allclose(out[:, 792:], 0.5 * s_raw, rtol=1e-6, atol=1e-7)
  np.testing.assert_allclose(i_d2, _lrelu_ref(d1), rtol=1e-5, atol=1e-6)
  (_, t0_in, t0), (_, t1_in, t1), (_, t2_in, t2), (_, f_in, f) = layers[7:]
  np.testing.assert_allclose(t0_in, _lrelu_ref(d2).reshape(8, 7, 7, 1), rtol=1e-5, atol=1e-6)
  assert [t.shape[1:] for t in (t0, t1, t2)] == [(14, 14, 64)] * 3
  np.testing.assert_allclose(t1_in, np.maximum(t0, 0), rtol=1e-5, atol=1e-6)
  np.testing.assert_allclose(t2_in, np.maximum(t1, 0), rtol=1e-5, atol=1e-6)
  np.testing.assert_allclose(f_in, np.maximum(t2, 0).reshape(8, -1), rtol=1e-5, atol=1e-6)
  np.testing.assert_allclose(out[:, :784], 1 / (1 + np.exp(-f)), rtol=1e-5, atol=1e-6)
  # z = mu + eps exp(s), eps ~ N(0, I): with s near 1 (Dense_1's bias set to 2), an
  # exp(2 s) or a missing exp(s) would scale the recovered eps by e.
  eps = (np.asarray(z, np.float64) - mu) / np.exp(0.5 * s_raw)
  assert 0.6 < eps.std() < 1.5 and abs(eps.mean()) < 0.4
  assert np.all(np.abs(0.5 * s_raw - 1) < 0.5)
  # Dropout (modules called, inactive, in eval mode): five layers of rate 0.2.
  assert [m.rate for n, m, _, _ in seen if n == "Dropout"] == [0.2] * 5


def test_vae_loss_is_squared_error_plus_closed_form_gaussian_kl():
  """KL(N(mu, e^{2s}) || N(0, I)) = 1/2 sum(e^{2s} + mu^2 - 1 - 2s), with a Monte-Carlo check."""
  rng = np.random.RandomState(0)
  x_hat, x = rng.rand(4, 784), rng.rand(4, 784)
  mu, s = rng.normal(0, 1, (4, 8)), rng.normal(0, 0.5, (4, 8))
  got = models.vae_loss(jnp.asarray(np.concatenate([x_hat, mu, s], 1)), jnp.asarray(x))
  kl = 0.5 * np.sum(np.exp(2 * s) + mu ** 2 - 1 - 2 * s, axis=1)
  np.testing.assert_allclose(got, np.sum((x_hat - x) ** 2, 1) + kl, rtol=1e-10)
  # Monte Carlo: E_q[log q(z) - log p(z)] for one example.
  z = mu[0] + np.exp(s[0]) * rng.normal(size=(200_000, 8))
  log_ratio = np.sum(-s[0] - 0.5 * ((z - mu[0]) / np.exp(s[0])) ** 2 + 0.5 * z ** 2, axis=1)
  assert log_ratio.mean() == pytest.approx(kl[0], abs=0.05)


@pytest.mark.slow
def test_allcnnc_and_wrn_structure_follow_deepobs():
  """All-CNN-C: b = 0.1; dropout 0.2 on the input, 0.5 after each strided block; ReLU
  after every conv, the last 1x1 one too (so the logits are non-negative). WRN: batch norm with
  momentum 0.9, eps 1e-5; every conv but the first (shortcuts included) reads a
  pre-activated (ReLU) input."""
  rng = np.random.RandomState(0)
  allc = models.AllCNNC(10, conv_impl="lax")
  x = jnp.asarray(rng.rand(2, 12, 12, 3), jnp.float32)
  v = jax.jit(allc.init)(jax.random.PRNGKey(0), x)
  for layer in v["params"].values():   # b = 0.1, W glorot-normal (truncated: > sqrt(3) std)
    w = np.asarray(layer["kernel"])
    std = np.sqrt(2.0 / (np.prod(w.shape[:-1]) + np.prod(w.shape[:-2]) * w.shape[-1]))
    assert np.all(np.asarray(layer["bias"]) == np.float32(0.1))
    assert abs(w.std() / std - 1) < 0.15 and np.abs(w).max() <= 2.28 * std
  seen, out = linen_calls(allc, v, x)
  assert [m.rate for n, m, _, _ in seen if n == "Dropout"] == [0.2, 0.5, 0.5]
  convs = [np.asarray(o) for n, _, _, o in seen if n == "Conv"]
  assert len(convs) == 9
  np.testing.assert_allclose(np.asarray(out), np.maximum(convs[-1], 0).mean(axis=(1, 2)),
                             rtol=1e-5, atol=1e-7)
  assert convs[-1].min() < 0   # the ReLU has something to do
  wrn = models.WideResNet(10, depth=10, width=2, conv_impl="lax")
  x = jnp.asarray(rng.normal(0, 1, (2, 8, 8, 3)), jnp.float32)
  v = jax.jit(wrn.init)(jax.random.PRNGKey(0), x)
  seen, _ = linen_calls(wrn, v, x)   # eval mode: running statistics
  bns = [m for n, m, _, _ in seen if n == "BatchNorm"]
  assert len(bns) == 7 and all((m.momentum, m.epsilon) == (0.9, 1e-5) for m in bns)
  conv_inputs = [np.asarray(i) for n, _, i, _ in seen if n == "Conv"]
  assert len(conv_inputs) == 1 + 3 * 3   # stem + per group (shortcut, two 3x3)
  assert conv_inputs[0].min() < 0
  assert all(i.min() >= 0 for i in conv_inputs[1:])
  # Head: BN -> ReLU -> global average pool -> Dense.
  (head_in,) = [np.asarray(i) for n, _, i, _ in seen if n == "Dense"]
  np.testing.assert_allclose(head_in, np.maximum(np.asarray(seen[-2][3]), 0).mean(axis=(1, 2)),
                             rtol=1e-5, atol=1e-6)
  assert seen[-2][0] == "BatchNorm" and np.asarray(seen[-2][3]).min() < 0


def test_train_mode_without_rng_does_not_silently_drop_dropout():
  """``apply_fn(v, x, train=True)`` needs an ``rng`` for dropout: without one it must not
  quietly return the eval-mode output (train=True with rng: dropout active)."""
  import flax.linen as nn  # pylint: disable=import-outside-toplevel

  class Drop(nn.Module):
    @nn.compact
    def __call__(self, x, train: bool = False):
      x = nn.Dropout(0.5, deterministic=not train)(x.reshape(x.shape[0], -1))
      return nn.Dense(3)(x)

  p = _flax_problem("tiny_dropout", Drop(), (2, 2, 1), problems.problems.softmax_cross_entropy,
                    batch_size=2, num_epochs=1, dataset="mnist", data_dir=None,
                    preprocess=_mnist_pre)
  v = p.init(jax.random.PRNGKey(0))
  x = jnp.ones((4, 2, 2, 1))
  trained = p.apply_fn(v, x, train=True, rng=jax.random.PRNGKey(1))
  assert not np.allclose(trained, p.apply_fn(v, x))
  with pytest.raises(Exception, match="dropout"):
    p.apply_fn(v, x, train=True)
