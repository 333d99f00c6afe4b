r"""Flax layers for curvature work: convolution and max-pooling from strided slices.

`PatchConv` is ``flax.linen.Conv`` (same parameters ``kernel`` of shape
``(*kernel_size, in_features, features)`` and ``bias``, same initialisers, same
output) computed without a convolution op (im2col; Chellapilla, Puri & Simard
2006): the input is padded, the ``prod(kernel_size)`` shifted, strided windows
are concatenated along the channel axis into patches ``P`` of shape
``(N, *out_spatial, prod(kernel_size) * in_features)``, and

.. math:: y = P \, \mathrm{reshape}(W, (\textstyle\prod k \cdot C_{in}, C_{out})) + b .

Why: second-order methods differentiate a model inside control flow (CG's
``lax.while_loop``, the transforms' ``lax.cond`` phases). XLA:CPU runs
convolutions there on a slow path, 6-20x slower than the same convolution at
the top level of a jitted function (jax-ml/jax#12868); slices, concatenations
and matrix products have no such path. ``benchmarks/conv_impl.py``, batch 128,
2 CPU cores (``conv_impl='lax'``: nn.Conv and nn.max_pool / ``'patches'``:
PatchConv and `max_pool`, seconds): a gradient 0.16 / 0.18 (fmnist_2c2d) and
0.30 / 0.20 (cifar10_3c3d); the same gradient inside ``lax.cond`` 1.8 / 0.18 and
3.7 / 0.20; a Hessian-vector product inside ``lax.fori_loop`` 3.1 / 0.20 and
6.5 / 0.23. On GPU and TPU, ``nn.Conv`` (cuDNN and friends) is the better
choice: `conv_class` picks by backend.

Memory: the patches hold ``prod(kernel_size)`` copies of the (strided) input.

`max_pool` is ``flax.linen.max_pool`` (same outputs, same gradients, ties go
to the first maximum of the window in row-major order) as the elementwise
maximum of the window's strided slices, with a custom JVP that routes each
tangent through a mask of the maximising entries (a window holding a NaN
has a NaN output either way; its tangent here is zero, where ``nn.max_pool``
routes it to an entry that depends on XLA's reduction order). Its transpose (the gradient)
is padding and adding, where XLA differentiates ``reduce_window`` max into a
``select_and_scatter``, which XLA:CPU runs on a serial loop, once per column
when back-propagating several columns (the ``K`` output-Hessian columns of an
exact diagonal GGN): a 3x3/2 pool of a ``128 x 28 x 28 x 64`` input, 2 CPU cores,
gradient 107 -> 14 ms, 10 columns 1.24 -> 0.14 s (3c3d's first pool).
"""

from __future__ import annotations

import functools
import itertools
from typing import Any, Optional, Sequence, Tuple, Union

import flax.linen as nn
import jax
import jax.numpy as jnp
from flax.linen.dtypes import promote_dtype
from jax import lax

__all__ = ["CONV_IMPLS", "PatchConv", "conv_class", "max_pool", "max_pool_fn",
           "patch_conv_operands"]

CONV_IMPLS = ("auto", "lax", "patches")

PaddingLike = Union[str, int, Sequence[Union[int, Tuple[int, int]]]]


def _pads(padding: PaddingLike, spatial: Sequence[int], kernel: Sequence[int],
          strides: Sequence[int]):
  """Explicit ``((lo, hi), ...)`` padding per spatial axis, as ``nn.Conv`` reads it
  (negative entries crop)."""
  nd = len(kernel)
  if isinstance(padding, str):
    if padding.upper() not in ("SAME", "VALID"):
      raise ValueError(f"PatchConv supports padding 'SAME', 'VALID', ints or (lo, hi) "
                       f"pairs, not {padding!r}.")
    return tuple(lax.padtype_to_pads(tuple(spatial), tuple(kernel), tuple(strides),
                                     padding.upper()))
  if isinstance(padding, int):
    return ((padding, padding),) * nd
  pads = tuple((p, p) if isinstance(p, int) else tuple(p) for p in padding)
  if len(pads) != nd or any(len(p) != 2 for p in pads):
    raise ValueError(f"padding {padding!r} does not give (lo, hi) for each of the "
                     f"{nd} spatial axes.")
  return pads


class PatchConv(nn.Module):
  """``nn.Conv`` as patches @ kernel matrix (see the module docstring).

  Inputs are channels-last with one batch axis, ``(N, *spatial, C_in)``. The
  fields mean what they mean for ``nn.Conv`` (negative explicit padding crops);
  dilation, feature groups and circular/causal padding are not supported.
  """
  features: int
  kernel_size: Union[int, Sequence[int]]
  strides: Union[None, int, Sequence[int]] = 1
  padding: PaddingLike = "SAME"
  use_bias: bool = True
  dtype: Optional[Any] = None
  param_dtype: Any = jnp.float32
  kernel_init: Any = nn.initializers.lecun_normal()
  bias_init: Any = nn.initializers.zeros_init()

  @nn.compact
  def __call__(self, inputs: jax.Array) -> jax.Array:
    kernel_size = _kernel_size(self.kernel_size)
    nd = len(kernel_size)
    if inputs.ndim != nd + 2:
      raise ValueError(f"PatchConv with a {nd}-D kernel needs inputs (N, {nd} spatial axes, "
                       f"C), got shape {inputs.shape}.")
    kernel = self.param("kernel", self.kernel_init,
                        kernel_size + (inputs.shape[-1], self.features), self.param_dtype)
    bias = (self.param("bias", self.bias_init, (self.features,), self.param_dtype)
            if self.use_bias else None)
    patches, matrix, bias = patch_conv_operands(self, inputs, kernel, bias)
    y = patches @ matrix
    if bias is not None:
      y = y + bias
    return y


def patch_conv_operands(module: PatchConv, inputs: jax.Array, kernel: jax.Array,
                        bias: Optional[jax.Array] = None):
  r"""``(P, W, b)`` with ``module(inputs) = P @ W + b``, as `PatchConv` computes it.

  ``P``: the patches, ``(N, *out_spatial, prod(kernel_size) * C_in)`` (kernel
  offsets outer, input channels inner); ``W``: ``kernel`` as a
  ``(prod(kernel_size) * C_in, C_out)`` matrix; ``b``: ``bias`` (or None); all
  promoted to the module's computation dtype. The same operations as the
  module's own call, so that under ``jit`` XLA computes ``P`` once for both
  (per-example kernel gradients ``G_n = P_n' B_n``, summed over positions, reuse
  the forward pass's patches: `curvax.curvature.flax_layers`).
  """
  kernel_size = _kernel_size(module.kernel_size)
  nd = len(kernel_size)
  strides = _conv_strides(module.strides, nd)
  pads = _pads(module.padding, inputs.shape[1:-1], kernel_size, strides)
  inputs, kernel, bias = promote_dtype(inputs, kernel, bias, dtype=module.dtype)
  windows = _window_slices(inputs, kernel_size, strides, pads, 0, "PatchConv: kernel")
  # Kernel offsets outer, input channels inner: the row order of W.reshape(-1, F).
  patches = windows[0] if len(windows) == 1 else jnp.concatenate(windows, axis=-1)
  return patches, kernel.reshape(-1, kernel.shape[-1]), bias


def _kernel_size(kernel_size) -> Tuple[int, ...]:
  """``nn.Conv``'s reading: an integer ``k`` is the 1-D kernel ``(k,)``."""
  return (kernel_size,) if isinstance(kernel_size, int) else tuple(kernel_size)


def _conv_strides(strides, nd: int) -> Tuple[int, ...]:
  """``strides`` as ``nn.Conv`` reads them: None is 1, an int applies to every
  spatial axis, a sequence gives one stride per spatial axis."""
  if strides is None:
    return (1,) * nd
  if isinstance(strides, int):
    return (strides,) * nd
  strides = tuple(strides)
  if len(strides) != nd:
    raise ValueError(f"PatchConv: strides {strides} must give one stride for each of "
                     f"the {nd} spatial axes of the {nd}-D kernel (or be an int or None).")
  return strides


def conv_class(impl: str = "auto"):
  """The convolution layer class for ``impl``: ``nn.Conv`` or `PatchConv`.

  ``'lax'``: ``nn.Conv``; ``'patches'``: `PatchConv`; ``'auto'``: `PatchConv` on
  the CPU backend (where convolutions inside control flow are slow), ``nn.Conv``
  elsewhere. Both hold the same parameters and give the same outputs for the
  arguments `PatchConv` takes (``features, kernel_size, strides, padding,
  use_bias, dtype, param_dtype, kernel_init, bias_init``; not ``precision``,
  ``mask``, ``promote_dtype``, dilations, ``feature_group_count``, circular or
  causal padding) on inputs with one batch axis.
  """
  if impl not in CONV_IMPLS:
    raise ValueError(f"conv impl must be one of {CONV_IMPLS}, got {impl!r}.")
  if impl == "auto":
    impl = "patches" if jax.default_backend() == "cpu" else "lax"
  return PatchConv if impl == "patches" else nn.Conv


def _window_slices(x: jax.Array, window: Tuple[int, ...], strides: Tuple[int, ...],
                   pads, fill, what: str = "max_pool: window") -> list:
  """The ``prod(window)`` strided slices of ``x`` (``(N, *spatial, C)``) padded with
  ``fill``: slice ``j`` holds, at each output position, entry ``j`` (row-major) of
  the window (`PatchConv`'s patches, `max_pool`'s candidates). Negative padding
  crops, as ``nn.Conv`` and ``lax.conv_general_dilated`` read it."""
  config = [(0, 0, 0)] + [(int(lo), int(hi), 0) for lo, hi in pads] + [(0, 0, 0)]
  x = lax.pad(x, jnp.asarray(fill, x.dtype), config)
  out = [(x.shape[1 + d] - window[d]) // strides[d] + 1 for d in range(len(window))]
  if min(out) < 1:
    raise ValueError(f"{what} {window} does not fit the padded input {x.shape[1:-1]}.")
  slices = []
  for offset in itertools.product(*(range(k) for k in window)):
    index = tuple(slice(o, o + (n - 1) * s + 1, s) for o, n, s in zip(offset, out, strides))
    slices.append(x[(slice(None),) + index + (slice(None),)])
  return slices


# Blocks of examples in which `max_pool`'s tangent is routed for overlapping
# windows (see `_window_max_jvp`): contiguous on a single device, strided when
# the batch may be sharded over several.
TANGENT_PARTS = 2


def _single_device() -> bool:
  return jax.device_count() == 1


@functools.partial(jax.custom_jvp, nondiff_argnums=(1, 2, 3))
def _window_max(x, window, strides, pads):
  return functools.reduce(jnp.maximum, _window_slices(x, window, strides, pads, -jnp.inf))


@_window_max.defjvp
def _window_max_jvp(window, strides, pads, primals, tangents):
  # y_dot = sum_j [which = j] x_dot_j, ``which`` the first maximiser:
  # linear in the tangent, so JAX transposes it (slices -> pads) for the VJP, and
  # the masks, computed from the primal, are shared by every column under vmap.
  # The primal output is this function again (not jnp.maximum, which splits ties
  # half and half), so that differentiating this rule (Hessian-vector products)
  # routes ties as the rule does.
  (x,), (t,) = primals, tangents
  y = _window_max(x, window, strides, pads)
  slices = _window_slices(jax.lax.stop_gradient(x), window, strides, pads, -jnp.inf)
  y_const = jax.lax.stop_gradient(y)
  # Index of the first maximiser, materialised once (optimization_barrier): fused
  # into its consumers, XLA recomputed the whole tie-breaking chain for every
  # term of the transpose.
  index_dtype = jnp.int8 if len(slices) < 127 else jnp.int32
  which = jnp.full(y.shape, len(slices), index_dtype)
  for j in reversed(range(len(slices))):
    which = jnp.where(slices[j] == y_const, jnp.asarray(j, index_dtype), which)
  which = jax.lax.optimization_barrier(which)

  def route(t, which):
    y_dot = jnp.zeros(which.shape, t.dtype)
    for j, t_s in enumerate(_window_slices(t, window, strides, pads, 0)):
      y_dot = y_dot + jnp.where(which == j, t_s, 0)
    return y_dot

  # Overlapping windows: the tangent is routed in `TANGENT_PARTS` blocks of
  # examples, so that its transpose (the gradient) ends in a concatenation of
  # the blocks. Without it, XLA:CPU fused the sum of the window's
  # ``prod(window)`` pads into every consumer of the pool's input gradient (the
  # previous layer's kernel-gradient and input-gradient products) and
  # materialised each pad as a full-size buffer instead. Not for disjoint
  # windows: 2c2d's 2x2/2 pools were 14-39% slower in blocks. Same values either
  # way (blocks of examples, which a pool never mixes).
  #
  # The blocks are strided (block b holds examples b, b + P, b + 2P, ...; P =
  # `TANGENT_PARTS`), not contiguous: on a batch sharded over devices in
  # contiguous shards whose size is a multiple of P, every block then takes
  # the same rows of every shard and the routing stays on the device holding
  # the example, whereas contiguous halves straddle devices and XLA moved
  # activations between them (all-to-all, collective-permute: see
  # tests/test_sharding.py). A batch that is not a multiple of P is routed in
  # one piece. With a single device nothing can be sharded, so the blocks stay
  # contiguous (any batch size) and the diagonal GGN keeps its speed. 3c3d (3x3/2 pools), batch 128, float32, jax 0.10.2, 2 shared CPU cores,
  # interleaved medians, ms (one piece / contiguous halves / strided blocks):
  # gradient 195 / 175 / 173, GGN-vector product 265 / 246 / 232,
  # Hessian-vector product 383 / 307 / 306, exact diagonal GGN (per-layer fast
  # path, 9 columns) 1192 / 838 / 956 (contiguous / strided 839 / 920 in a
  # second run): strided blocks keep the products' gain, and the diagonal GGN,
  # 10-14% slower than in contiguous halves, is still 20% faster than in one
  # piece: the price of routing that stays on each example's device.
  n = t.shape[0]
  overlap = any(w > s for w, s in zip(window, strides))
  parts = min(TANGENT_PARTS, n) if overlap else 1
  if parts > 1 and _single_device():
    sizes = tuple(n // parts + (i < n % parts) for i in range(parts))
    y_dot = jnp.concatenate([route(t_b, w_b) for t_b, w_b in zip(
        jax.lax.split(t, sizes, axis=0), jax.lax.split(which, sizes, axis=0))], axis=0)
  elif parts > 1 and n % parts == 0:
    blocks = lambda a: a.reshape((n // parts, parts) + a.shape[1:])  # noqa: E731
    t_b, which_b = blocks(t), blocks(which)
    y_dot = jnp.stack([route(t_b[:, b], which_b[:, b]) for b in range(parts)],
                      axis=1).reshape(which.shape)
  else:
    y_dot = route(t, which)
  return y, y_dot


def max_pool(inputs: jax.Array, window_shape: Sequence[int],
             strides: Optional[Sequence[int]] = None,
             padding: PaddingLike = "VALID") -> jax.Array:
  r"""``flax.linen.max_pool`` from strided slices (see the module docstring).

  .. math:: y_{n,p,c} = \max_{j \in \text{window}(p)} x_{n,j,c},

  the window's entries taken as ``prod(window_shape)`` strided slices of the
  input padded with ``-inf``. Same arguments as ``nn.max_pool``: inputs
  ``(*batch, *spatial, C)`` with any number of batch axes (none included),
  ``strides`` defaulting to 1, padding ``'SAME'``, ``'VALID'``, an int or
  ``(lo, hi)`` pairs. Non-floating inputs go to ``nn.max_pool``.

  Derivatives stay per example: on a batch sharded over devices (leading axis,
  contiguous shards as `curvax.sharding.shard_batch` makes them), gradients and
  curvature products through the pool move no activations between devices
  when each device's share of the batch is a multiple of `TANGENT_PARTS` (2;
  otherwise XLA gathers the activations across devices).
  """
  window = tuple(window_shape)
  nd = len(window)
  strides = (1,) * nd if strides is None else tuple(strides)
  if len(strides) != nd:
    raise ValueError(f"max_pool: strides {strides} and window {window} differ in length.")
  if inputs.ndim < nd + 1:
    raise ValueError(f"max_pool with a {nd}-D window needs inputs (..., {nd} spatial axes, "
                     f"C), got shape {inputs.shape}.")
  if not jnp.issubdtype(inputs.dtype, jnp.floating):
    return nn.max_pool(inputs, window, strides, padding)
  batch_shape = inputs.shape[:inputs.ndim - nd - 1]
  x = inputs.reshape((-1,) + inputs.shape[len(batch_shape):])
  pads = _pads(padding, x.shape[1:-1], window, strides)
  y = _window_max(x, window, strides, tuple(tuple(p) for p in pads))
  return y.reshape(batch_shape + y.shape[1:])


def max_pool_fn(impl: str = "auto"):
  """The max-pooling function that goes with `conv_class`'s ``impl``: `max_pool`
  (strided slices) for ``'patches'``, ``nn.max_pool`` for ``'lax'``; ``'auto'``
  picks by backend as `conv_class` does."""
  return max_pool if conv_class(impl) is PatchConv else nn.max_pool
