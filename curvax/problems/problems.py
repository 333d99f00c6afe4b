"""The registry of DeepOBS test problems: `get(name)` and `names()`.

Defaults (batch size, epochs, L2 weight) are DeepOBS's
(``config.DEFAULT_TEST_PROBLEMS_SETTINGS``; seed 001, Table 6.1 and App. A).
The 2-D problems have none in DeepOBS; curvax uses batch 128 and 100 epochs.
"""

from __future__ import annotations

import dataclasses
import functools
import numbers
from typing import Callable, Dict, Optional

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from curvax.curvature.flax_layers import BATCH_NORM_MESSAGE, LinenVariablesApply
from curvax.losses import l2_regularizer, mean_squared_error, softmax_cross_entropy
from curvax.losses.base import as_loss
from curvax.layers import CONV_IMPLS
from curvax.problems import data as data_lib
from curvax.problems import models, synthetic
from curvax.problems.problem import Problem

# DeepOBS parameter counts [seed 001, App. A; spec §1.4], trainable parameters.
PARAM_COUNTS = {
    "quadratic_deep": 100, "two_d_rosenbrock": 2, "two_d_beale": 2, "two_d_branin": 2,
    "mnist_logreg": 7_850, "fmnist_logreg": 7_850,
    "mnist_mlp": 1_336_610, "fmnist_mlp": 1_336_610,
    "mnist_2c2d": 3_274_634, "fmnist_2c2d": 3_274_634,
    "mnist_vae": 10_151_489, "fmnist_vae": 10_151_489,
    "cifar10_3c3d": 895_210, "cifar100_3c3d": 918_340, "svhn_3c3d": 895_210,
    "cifar100_allcnnc": 1_387_108, "svhn_wrn164": 2_748_890,
}

_DATASET_SIZES = {  # valid / train_eval size (the test-set size, DeepOBS 1.2)
    "fashion-mnist": 10_000, "mnist": 10_000, "cifar-10": 10_000, "cifar-100": 10_000,
    "svhn": 26_032,
}


def kernel_l2(weight: float):
  """DeepOBS's L2: ``(weight/2) sum ||W||^2`` over conv/dense kernels only (no biases, no BN)."""
  def predicate(path, leaf):
    del leaf
    last = path[-1] if path else None
    return getattr(last, "key", getattr(last, "name", None)) == "kernel"
  return l2_regularizer(weight, predicate)


def names():
  """Names of all registered problems."""
  return sorted(PARAM_COUNTS)


# ------------------------------------------------------------------ preprocessing

def _mnist_pre(x, y, rng, train):
  del rng, train
  return x.astype(jnp.float32) / 255.0, y


def _vae_pre(x, y, rng, train):
  del y, rng, train
  x = x.astype(jnp.float32) / 255.0
  return x, x.reshape(x.shape[0], -1)


def _standardize(x):
  """tf.image.per_image_standardization of DeepOBS's images, given on the [0, 1] scale.

  DeepOBS standardises the 0..255 values: ``(x - mean) / max(std, 1/sqrt(num_pixels))``.
  On the [0, 1] scale the same result needs the floor ``1 / (255 sqrt(num_pixels))``
  (a floor of ``1/sqrt(num_pixels)`` here would shrink images whose std is below
  about 4.6 grey levels, e.g. after the contrast augmentation, to std < 1).
  """
  n = x.shape[1] * x.shape[2] * x.shape[3]
  mean = jnp.mean(x, axis=(1, 2, 3), keepdims=True)
  std = jnp.std(x, axis=(1, 2, 3), keepdims=True)
  return (x - mean) / jnp.maximum(std, 1.0 / (255.0 * jnp.sqrt(n)))


def _augment_one(key, img, flip: bool):
  """DeepOBS's CIFAR/SVHN training augmentation for one (32, 32, 3) image in [0, 1]."""
  k_crop, k_flip, k_b, k_s, k_c = jax.random.split(key, 5)
  padded = jnp.pad(img, ((2, 2), (2, 2), (0, 0)))
  off = jax.random.randint(k_crop, (2,), 0, 5)
  img = jax.lax.dynamic_slice(padded, (off[0], off[1], 0), (32, 32, 3))
  if flip:
    img = jnp.where(jax.random.bernoulli(k_flip), img[:, ::-1], img)
  img = img + jax.random.uniform(k_b, (), minval=-63 / 255, maxval=63 / 255)
  gray = jnp.mean(img, axis=-1, keepdims=True)  # saturation in [0.5, 1.5] (approx. HSV)
  img = gray + jax.random.uniform(k_s, (), minval=0.5, maxval=1.5) * (img - gray)
  mean = jnp.mean(img, axis=(0, 1), keepdims=True)
  return mean + jax.random.uniform(k_c, (), minval=0.2, maxval=1.8) * (img - mean)


def _image_pre(flip: bool):
  def pre(x, y, rng, train):
    x = x.astype(jnp.float32) / 255.0
    if train:
      keys = jax.random.split(rng, x.shape[0])
      x = jax.vmap(functools.partial(_augment_one, flip=flip))(keys, x)
    return _standardize(x), y
  return pre


# ------------------------------------------------------------------ data splitting

def _split_real(dataset: str, data_dir: Optional[str]):
  def load():
    raw = data_lib.load(dataset, data_dir)
    x, y = raw["train"]
    # DeepOBS's held-out size (26,032 of SVHN's 73,257, 10,000 elsewhere); a fifth
    # of the training set only for small copies, too small to hold it twice.
    # Held out: the last examples. DeepOBS 1.2's TensorFlow loaders hold out the
    # first ones (data.take(k), training on data.skip(k)), its PyTorch port a
    # random subset; the committed results here come from this split.
    size = _DATASET_SIZES[dataset]
    k = size if len(y) >= 2 * size else len(y) // 5
    out = {"train": (x[:-k], y[:-k]), "valid": (x[-k:], y[-k:]),
           "test": raw["test"]}
    out["train_eval"] = (out["train"][0][:k], out["train"][1][:k])
    return out
  return load


# ------------------------------------------------------------------ builders

def _rngs_of(needs_rng, rng):
  # Without rng (the keyword-free apply_fn) the VAE's latent noise has a fixed key;
  # Problem.evaluate passes rng= to draw fresh noise per chunk.
  if rng is None:
    return {"latent": jax.random.PRNGKey(0)} if needs_rng else {}
  k1, k2 = jax.random.split(rng)
  return {"dropout": k1, "latent": k2}


@dataclasses.dataclass(frozen=True, eq=False)
class _ProblemApply(LinenVariablesApply):
  """``apply_fn(variables, inputs, *, train=False, rng=None)`` of a Linen problem.

  The DeepOBS model: eval mode unless ``train`` (dropout with stream ``rng``;
  ``rng`` also draws the VAE's latent noise, in either mode); see `Problem`.
  Without keywords it is the `LinenVariablesApply` of the eval-mode model (the
  VAE's latent noise from the fixed key ``PRNGKey(0)``), so per-example
  statistics and diagonal curvature take the per-layer fast path
  (`curvax.curvature.flax_layers`); batch-norm problems (whose keyword-free call
  normalises with batch statistics when ``variables`` holds no ``batch_stats``)
  refuse per-example quantities instead.
  """
  has_bn: bool = False
  needs_rng: bool = False

  def __call__(self, variables, inputs, *, train=False, rng=None):
    if self.has_bn and (train or "batch_stats" not in variables):
      out, _ = self.module.apply(variables, inputs, train=True,
                                 rngs=_rngs_of(self.needs_rng, rng),
                                 mutable=["batch_stats"])
      return out
    if not train and rng is None:
      return super().__call__(variables, inputs)
    return self.module.apply(variables, inputs, train=train,
                             rngs=_rngs_of(self.needs_rng, rng))

  @property
  def per_example_unsupported(self) -> Optional[str]:
    return BATCH_NORM_MESSAGE if self.has_bn else None


def _flax_problem(name, module, input_shape, loss, *, batch_size, num_epochs, dataset,
                  data_dir, preprocess, weight_decay=None, has_accuracy=True, seed=0,
                  metric="test_accuracy"):
  has_bn = isinstance(module, models.WideResNet)
  has_dropout = isinstance(module, (models.AllCNNC, models.VAE))
  needs_rng = isinstance(module, models.VAE)

  @jax.jit
  def init(key):
    k1, k2, k3 = jax.random.split(key, 3)
    variables = module.init({"params": k1, "dropout": k2, "latent": k3},
                            jnp.zeros((1,) + input_shape, jnp.float32))
    return dict(variables)

  rngs_of = functools.partial(_rngs_of, needs_rng)
  apply_fn = _ProblemApply(module, {}, {"train": False, "rngs": rngs_of(None)},
                           has_bn=has_bn, needs_rng=needs_rng)
  regularizer = kernel_l2(weight_decay) if weight_decay else None
  problem = Problem(
      name=name, init=init, apply_fn=apply_fn, loss=loss, regularizer=regularizer,
      batch_size=batch_size, num_epochs=num_epochs, has_accuracy=has_accuracy,
      load_data=_split_real(dataset, data_dir), preprocess=preprocess,
      weight_decay=weight_decay, has_bn=has_bn, has_dropout=has_dropout,
      needs_rng=needs_rng, seed=seed, metric=metric)
  if has_bn:
    def apply_train(variables, inputs, rng):
      out, new_state = module.apply(variables, inputs, train=True, rngs=rngs_of(rng),
                                    mutable=["batch_stats"])
      return out, dict(new_state)
    problem.apply_train = apply_train
  problem.module = module
  return problem


def _quadratic_deep(batch_size, seed, data_dir):
  del data_dir
  q = synthetic.deep_quadratic_hessian()
  lam, vec = np.linalg.eigh(q)
  q_sqrt = jnp.asarray((vec * np.sqrt(np.maximum(lam, 0.0))) @ vec.T, jnp.float32)

  def init(key):
    del key
    return {"params": {"theta": jnp.ones((100,), jnp.float32)}}

  def apply_fn(variables, inputs, *, train=False, rng=None):
    """``Q^{1/2} (theta - x)`` per example, (N, 100)."""
    del train, rng
    return (variables["params"]["theta"] - inputs) @ q_sqrt

  def load():
    train = synthetic.quadratic_data(42)
    return {"train": train, "train_eval": train, "test": synthetic.quadratic_data(43),
            "valid": synthetic.quadratic_data(44)}

  return Problem(name="quadratic_deep", init=init, apply_fn=apply_fn,
                 loss=mean_squared_error, regularizer=None, batch_size=batch_size or 128,
                 num_epochs=100, has_accuracy=False, load_data=load, seed=seed,
                 metric="test_loss", hessian=q)


def _two_d(name, batch_size, seed, data_dir):
  del data_dir
  f, start, argmin, fmin = synthetic.TWO_D[name]

  def init(key):
    del key
    return {"params": {"u": jnp.asarray(start[0], jnp.float32),
                       "v": jnp.asarray(start[1], jnp.float32)}}

  def apply_fn(variables, inputs, *, train=False, rng=None):
    """Per-example ``f(u, v) + u x + v y``, (N, 1)."""
    del train, rng
    u, v = variables["params"]["u"], variables["params"]["v"]
    return (f(u, v) + u * inputs[:, 0] + v * inputs[:, 1])[:, None]

  def load():
    train = synthetic.two_d_data(42)
    zeros = (np.zeros((10000, 2), np.float32), np.zeros((10000,), np.float32))
    return {"train": train, "train_eval": train, "test": zeros,
            "valid": synthetic.two_d_data(44)}

  return Problem(name=name, init=init, apply_fn=apply_fn, loss=synthetic.value_loss,
                 regularizer=None, batch_size=batch_size or 128, num_epochs=100,
                 has_accuracy=False, load_data=load, seed=seed, metric="test_loss",
                 minimum=(np.asarray(argmin), fmin))


def get(name: str, *, batch_size: Optional[int] = None, seed: int = 0,
        data_dir: Optional[str] = None, conv_impl: str = "auto") -> Problem:
  """Returns DeepOBS test problem ``name`` (see `names()`).

  Args:
    name: e.g. ``'quadratic_deep'``, ``'fmnist_mlp'``, ``'cifar100_allcnnc'``.
    batch_size: overrides DeepOBS's default batch size (a positive int; None
      for the default).
    seed: default seed of `Problem.batches` (the runner takes its own).
    data_dir: searched first for the data files, in ``data_dir/<data set>``
      (e.g. ``data_dir/fashion-mnist``, where `curvax.problems.download` puts
      them; CIFAR and SVHN files also directly in ``data_dir``), then
      ``$CURVAX_DATA``, ``~/.curvax_data`` and ``/usr/share/datasets``, see
      `curvax.problems.data.search_paths`; nothing is read until data are
      first used.
    conv_impl: how the convolutional models (2c2d, 3c3d, All-CNN-C, WRN)
      compute their convolutions, see `curvax.layers.conv_class`: ``'auto'``
      (patches @ kernel on CPU, ``nn.Conv`` elsewhere), ``'lax'``, ``'patches'``.
      Parameters and results are the same; only speed differs.
  """
  if conv_impl not in CONV_IMPLS:
    raise ValueError(f"conv_impl must be one of {CONV_IMPLS}, got {conv_impl!r}.")
  if batch_size is not None:
    # `batch_size or default` below would silently turn 0 into the default, and a
    # negative or fractional size fails deep inside JAX at the first batch.
    if (isinstance(batch_size, bool) or not isinstance(batch_size, numbers.Integral)
        or batch_size < 1):
      raise ValueError(f"batch_size must be a positive int (or None for DeepOBS's "
                       f"default), got {batch_size!r}.")
    batch_size = int(batch_size)
  if name == "quadratic_deep":
    return _quadratic_deep(batch_size, seed, data_dir)
  if name in synthetic.TWO_D:
    return _two_d(name, batch_size, seed, data_dir)
  if name not in PARAM_COUNTS:
    raise KeyError(f"unknown problem '{name}'; known problems: {', '.join(names())}.")
  dataset = data_lib.DATASET_OF_PROBLEM[name]
  kw = dict(data_dir=data_dir, seed=seed, dataset=dataset)
  b = lambda default: batch_size or default
  mnist_shape = (28, 28, 1)
  image_shape = (32, 32, 3)
  arch = name.split("_", 1)[1]
  if dataset in ("mnist", "fashion-mnist"):
    if arch == "logreg":
      return _flax_problem(name, models.LogReg(), mnist_shape, softmax_cross_entropy,
                           batch_size=b(128), num_epochs=50, preprocess=_mnist_pre, **kw)
    if arch == "mlp":
      return _flax_problem(name, models.MLP(), mnist_shape, softmax_cross_entropy,
                           batch_size=b(128), num_epochs=100, preprocess=_mnist_pre, **kw)
    if arch == "2c2d":
      return _flax_problem(name, models.TwoC2D(conv_impl=conv_impl), mnist_shape,
                           softmax_cross_entropy, batch_size=b(128), num_epochs=100,
                           preprocess=_mnist_pre, **kw)
    return _flax_problem(name, models.VAE(), mnist_shape, as_loss(models.vae_loss),
                         batch_size=b(64), num_epochs=50 if dataset == "mnist" else 100,
                         preprocess=_vae_pre, has_accuracy=False, metric="test_loss", **kw)
  classes = 100 if dataset == "cifar-100" else 10
  pre = _image_pre(flip=dataset != "svhn")
  if arch == "3c3d":
    return _flax_problem(name, models.ThreeC3D(classes, conv_impl=conv_impl), image_shape,
                         softmax_cross_entropy, batch_size=b(128), num_epochs=100, preprocess=pre,
                         weight_decay=0.002, **kw)
  if arch == "allcnnc":
    return _flax_problem(name, models.AllCNNC(classes, conv_impl=conv_impl), image_shape,
                         softmax_cross_entropy, batch_size=b(256), num_epochs=350, preprocess=pre,
                         weight_decay=5e-4, **kw)
  return _flax_problem(name, models.WideResNet(classes, 16, 4, conv_impl=conv_impl), image_shape,
                       softmax_cross_entropy, batch_size=b(128), num_epochs=160,
                       preprocess=pre, weight_decay=5e-4, **kw)
