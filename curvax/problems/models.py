"""Flax Linen models of the DeepOBS test problems, with DeepOBS's initialisations.

Architectures follow DeepOBS (Schneider, Balles & Hennig, ICLR 2019; the thesis
of seed 001, App. A.1, and the DeepOBS TensorFlow code); parameter counts match
DeepOBS's (see ``PARAM_COUNTS`` in `curvax.problems.problems`). Inputs are NHWC.
Every module takes ``train`` (dropout active, batch norm on batch statistics).
The convolutional models take ``conv_impl`` (see `curvax.layers.conv_class`):
``'auto'`` computes convolutions as patches @ kernel on CPU (`curvax.layers.PatchConv`,
fast inside the control flow of second-order methods; max-pooling likewise from
strided slices, `curvax.layers.max_pool`) and with ``nn.Conv`` / ``nn.max_pool``
elsewhere; either way the parameters (names, shapes, initial values) are the same.
"""

from __future__ import annotations

import itertools
from typing import Sequence

import flax.linen as nn
import jax
import jax.numpy as jnp

from curvax.layers import conv_class, max_pool_fn

glorot_normal = nn.initializers.glorot_normal()
glorot_uniform = nn.initializers.glorot_uniform()


def _const(c):
  return nn.initializers.constant(c)


def _convs(impl):
  """Constructor of the model's convolutions, named ``Conv_0, Conv_1, ...`` in call
  order (``nn.Conv``'s own names) whichever class `conv_class` picks."""
  cls = conv_class(impl)
  count = itertools.count()
  return lambda *args, **kwargs: cls(*args, name=f"Conv_{next(count)}", **kwargs)


def _trunc(std):
  # TF's truncated_normal(stddev=std): a N(0, std^2) truncated at two std.
  return nn.initializers.truncated_normal(stddev=std)


class LogReg(nn.Module):
  """Logistic regression: flatten -> Dense(C); W = 0, b = 0 (DeepOBS ``*_logreg``)."""
  num_classes: int = 10

  @nn.compact
  def __call__(self, x, train: bool = False):
    x = x.reshape(x.shape[0], -1)
    return nn.Dense(self.num_classes, kernel_init=nn.initializers.zeros,
                    bias_init=nn.initializers.zeros)(x)


class MLP(nn.Module):
  """784 -> 1000 -> 500 -> 100 -> C, ReLU; W ~ truncated N(0, 0.03^2), b = 0."""
  num_classes: int = 10
  widths: Sequence[int] = (1000, 500, 100)

  @nn.compact
  def __call__(self, x, train: bool = False):
    x = x.reshape(x.shape[0], -1)
    for w in self.widths:
      x = nn.relu(nn.Dense(w, kernel_init=_trunc(0.03), bias_init=nn.initializers.zeros)(x))
    return nn.Dense(self.num_classes, kernel_init=_trunc(0.03),
                    bias_init=nn.initializers.zeros)(x)


class TwoC2D(nn.Module):
  """conv5x5/32 -> pool -> conv5x5/64 -> pool -> Dense 1024 -> Dense C.

  SAME padding, max-pool 2x2/2 SAME, ReLU; W ~ truncated N(0, 0.05^2), b = 0.05.
  """
  num_classes: int = 10
  conv_impl: str = "auto"

  @nn.compact
  def __call__(self, x, train: bool = False):
    kw = dict(kernel_init=_trunc(0.05), bias_init=_const(0.05))
    conv = _convs(self.conv_impl)
    max_pool = max_pool_fn(self.conv_impl)
    for f in (32, 64):
      x = nn.relu(conv(f, (5, 5), padding="SAME", **kw)(x))
      x = max_pool(x, (2, 2), (2, 2), padding="SAME")
    x = x.reshape(x.shape[0], -1)
    x = nn.relu(nn.Dense(1024, **kw)(x))
    return nn.Dense(self.num_classes, **kw)(x)


class ThreeC3D(nn.Module):
  """3c3d: conv5x5/64 VALID, conv3x3/96 VALID, conv3x3/128 SAME (each ReLU and
  max-pool 3x3/2 SAME), then Dense 512 -> 256 -> C. Conv W glorot-normal, dense W
  glorot-uniform, biases 0."""
  num_classes: int = 10
  conv_impl: str = "auto"

  @nn.compact
  def __call__(self, x, train: bool = False):
    conv = _convs(self.conv_impl)
    max_pool = max_pool_fn(self.conv_impl)
    for f, k, pad in ((64, 5, "VALID"), (96, 3, "VALID"), (128, 3, "SAME")):
      x = nn.relu(conv(f, (k, k), padding=pad, kernel_init=glorot_normal,
                       bias_init=nn.initializers.zeros)(x))
      x = max_pool(x, (3, 3), (2, 2), padding="SAME")
    x = x.reshape(x.shape[0], -1)
    for w in (512, 256):
      x = nn.relu(nn.Dense(w, kernel_init=glorot_uniform, bias_init=nn.initializers.zeros)(x))
    return nn.Dense(self.num_classes, kernel_init=glorot_uniform,
                    bias_init=nn.initializers.zeros)(x)


class AllCNNC(nn.Module):
  """All-CNN-C (Springenberg et al.), DeepOBS's version (ReLU on the last conv too).

  Conv W glorot-normal, b = 0.1; dropout 0.2 on the input and 0.5 after each
  strided block.
  """
  num_classes: int = 100
  conv_impl: str = "auto"

  @nn.compact
  def __call__(self, x, train: bool = False):
    make = _convs(self.conv_impl)

    def conv(x, f, k, stride=1, pad="SAME"):
      return nn.relu(make(f, (k, k), (stride, stride), padding=pad,
                          kernel_init=glorot_normal, bias_init=_const(0.1))(x))
    x = nn.Dropout(0.2, deterministic=not train)(x)
    x = conv(x, 96, 3); x = conv(x, 96, 3); x = conv(x, 96, 3, 2)
    x = nn.Dropout(0.5, deterministic=not train)(x)
    x = conv(x, 192, 3); x = conv(x, 192, 3); x = conv(x, 192, 3, 2)
    x = nn.Dropout(0.5, deterministic=not train)(x)
    x = conv(x, 192, 3, pad="VALID"); x = conv(x, 192, 1); x = conv(x, self.num_classes, 1)
    return jnp.mean(x, axis=(1, 2))


class WideResNet(nn.Module):
  """Pre-activation wide ResNet (Zagoruyko & Komodakis) as in DeepOBS.

  ``(depth - 4) / 6`` units per group, filters (16, 16k, 32k, 64k), strides
  (1, 2, 2); 3x3 SAME convs without bias, glorot-uniform; batch norm with
  momentum 0.9, eps 1e-5; a 1x1 strided shortcut conv on the pre-activated input
  where the shape changes; head BN -> ReLU -> global average pool -> Dense C.
  """
  num_classes: int = 10
  depth: int = 16
  width: int = 4
  conv_impl: str = "auto"

  @nn.compact
  def __call__(self, x, train: bool = False):
    n = (self.depth - 4) // 6
    bn = lambda: nn.BatchNorm(use_running_average=not train, momentum=0.9, epsilon=1e-5)
    make = _convs(self.conv_impl)
    conv = lambda f, k, s: make(f, (k, k), (s, s), padding="SAME", use_bias=False,
                                kernel_init=glorot_uniform)
    x = conv(16, 3, 1)(x)
    channels = 16
    for group, (f, s) in enumerate(zip((16 * self.width, 32 * self.width, 64 * self.width),
                                       (1, 2, 2))):
      for unit in range(n):
        stride = s if unit == 0 else 1
        pre = nn.relu(bn()(x))
        shortcut = x
        if channels != f or stride != 1:
          shortcut = conv(f, 1, stride)(pre)
        y = conv(f, 3, stride)(pre)
        y = conv(f, 3, 1)(nn.relu(bn()(y)))
        x = y + shortcut
        channels = f
      del group
    x = nn.relu(bn()(x))
    x = jnp.mean(x, axis=(1, 2))
    return nn.Dense(self.num_classes, kernel_init=glorot_uniform,
                    bias_init=nn.initializers.zeros)(x)


def _lrelu(x):
  return jnp.maximum(x, 0.3 * x)


class VAE(nn.Module):
  """DeepOBS's variational auto-encoder (``*_vae``) with an 8-dim latent.

  Returns, per example, ``concat([x_hat (784), mu (8), s (8)])`` so that the
  loss (`vae_loss`) can form ``sum (x_hat - x)^2 + KL``. ``z = mu + eps exp(s)``
  with ``eps ~ N(0, I)`` drawn from the ``'latent'`` rng stream, also at
  evaluation, as DeepOBS does: `curvax.problems.Problem.evaluate` draws fresh
  noise for every chunk from its ``key`` (DeepOBS: for every batch), while the
  problem's keyword-free ``apply_fn`` (``loss_fn``, per-example quantities)
  uses the fixed key ``PRNGKey(0)``. TF-default initialisers: glorot-uniform, b = 0.
  """
  latent: int = 8

  @nn.compact
  def __call__(self, x, train: bool = False):
    kw = dict(kernel_init=glorot_uniform, bias_init=nn.initializers.zeros)
    h = x.reshape(x.shape[0], 28, 28, 1)
    for s in (2, 2, 1):
      h = _lrelu(nn.Conv(64, (4, 4), (s, s), padding="SAME", **kw)(h))
      h = nn.Dropout(0.2, deterministic=not train)(h)
    h = h.reshape(h.shape[0], -1)
    mu = nn.Dense(self.latent, **kw)(h)
    s = 0.5 * nn.Dense(self.latent, **kw)(h)
    eps = jax.random.normal(self.make_rng("latent"), mu.shape, mu.dtype)
    z = mu + eps * jnp.exp(s)
    d = _lrelu(nn.Dense(24, **kw)(z))
    d = _lrelu(nn.Dense(49, **kw)(d))
    d = d.reshape(d.shape[0], 7, 7, 1)
    for i, stride in enumerate((2, 1, 1)):
      d = nn.relu(nn.ConvTranspose(64, (4, 4), (stride, stride), padding="SAME", **kw)(d))
      if i < 2:
        d = nn.Dropout(0.2, deterministic=not train)(d)
    d = d.reshape(d.shape[0], -1)
    x_hat = nn.sigmoid(nn.Dense(28 * 28, **kw)(d))
    return jnp.concatenate([x_hat, mu, s], axis=-1)


def vae_loss(outputs, targets):
  """Per-example ``sum_pixels (x_hat - x)^2 + KL(N(mu, e^{2s}) || N(0, I))``.

  ``outputs`` = concat([x_hat (784), mu (L), s (L)]); ``targets`` the images, (N, 784).
  """
  d = targets.shape[-1]
  x_hat, rest = outputs[:, :d], outputs[:, d:]
  latent = rest.shape[-1] // 2
  mu, s = rest[:, :latent], rest[:, latent:]
  rec = jnp.sum(jnp.square(x_hat - targets), axis=-1)
  kl = -0.5 * jnp.sum(1.0 + 2.0 * s - jnp.square(mu) - jnp.exp(2.0 * s), axis=-1)
  return rec + kl
