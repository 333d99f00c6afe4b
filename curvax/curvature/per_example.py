r"""Per-example gradients and their batch statistics, per-example directional
slopes and curvatures.

Conventions (Dangel, thesis, §5.2, Table 5.1, Eqs. B.2-B.4, 3.29-3.31). With
``g_n = grad_theta l(f(theta, x_n), y_n)`` the gradient of example ``n``'s loss
(**unscaled**: not divided by the batch size) and ``N`` the batch size:

* mean gradient ``g = (1/N) sum_n g_n`` (the gradient of the batch-mean loss);
* second moment ``(1/N) sum_n g_n^2`` (elementwise), as in the thesis's
  Table 5.1. BackPACK's ``SumGradSquared`` under mean reduction is
  ``sum_n (g_n/N)^2``, i.e. curvax's value divided by ``N``;
* variance ``(1/N) sum_n g_n^2 - g^2`` (Eq. B.4 / 3.31, the biased, 1/N
  estimator; BackPACK's ``Variance`` is curvax's divided by ``N^2``);
* per-example gradient norms ``||g_n||`` (BackPACK's ``BatchL2Grad`` is
  ``||g_n / N||^2``).

Two implementations:

* generic: ``vmap(grad)`` over examples, chunked with ``lax.scan`` so that at most
  ``chunk_size x params`` floats are live; works for any ``apply_fn``;
* fast (BackPACK's contractions, App. B.1.1): for Flax Linen models wrapped by
  `curvax.flax_utils.from_linen`, every ``nn.Dense``/``nn.Conv`` layer's inputs
  ``A`` and per-example output gradients ``B`` come from one forward/backward
  pass; for Dense layers squared norms are ``rowsum(A^2) * rowsum(B^2)`` and the
  second moment ``(A^2)'(B^2)/N`` without forming per-example gradients; Conv
  layers (and Dense layers on inputs with extra axes) form per-example gradients
  one layer at a time. See `curvax.curvature.flax_layers`.

Per-example quantities assume the examples do not interact: batch norm with
batch statistics is refused (`curvax.flax_utils`), and so is an NNX model
with dropout active; a Linen model called with dropout active
(``apply_kwargs={'train': True, 'rngs': ...}``) gets the batch pass's masks on
the fast path, but on the ``vmap`` path each example draws its own, so the two
differ there: use inference mode for per-example quantities.

Neither path holds all ``N x params`` per-example gradients unless asked to
(``return_gradients``): projections ``g_n' r`` on references (``dot_with``;
``r = g`` gives Cockpit's gradient tests) and additive element-wise reductions
(``reduce_gradients``; histograms) are computed per layer or per chunk.
"""

from __future__ import annotations

from typing import Any, Callable, NamedTuple, Optional, Sequence, Tuple

import jax
import jax.numpy as jnp
import optax.tree_utils as otu

from curvax import _checks
from curvax.curvature import _chunking
from curvax.curvature.quadratic_step_size import directional_terms
from curvax.losses import as_loss

Array = jax.Array

DEFAULT_CHUNK_SIZE = 32


class DirectionalStatistics(NamedTuple):
  r"""Per-example slopes and curvatures along a direction ``d``.

  Attributes:
    slopes: ``(N,)``, ``d' g_n``.
    curvatures: ``(N,)``, ``d' G_n d`` with ``G_n = J_n' H_n J_n``.
    slope_mean: ``d' g``, the batch mean of ``slopes``.
    slope_variance: ``(1/N) sum_n (d'g_n - d'g)^2``.
    curvature_mean: ``d' G d``, the batch mean of ``curvatures``.
    curvature_variance: ``(1/N) sum_n (d'G_n d - d'G d)^2``.
  """
  slopes: Array
  curvatures: Array
  slope_mean: Array
  slope_variance: Array
  curvature_mean: Array
  curvature_variance: Array


class PerExampleStatistics(NamedTuple):
  """Per-example quantities of one batch (see the module docstring).

  Attributes:
    losses: ``(N,)`` per-example losses.
    mean_gradient: ``(1/N) sum_n g_n``, shaped like params.
    second_moment: ``(1/N) sum_n g_n^2``, shaped like params (unscaled ``g_n``).
    variance: ``second_moment - mean_gradient^2`` (clamped at 0 against
      round-off), shaped like params.
    gradient_norms: ``(N,)``, ``||g_n||``.
    gradients: per-example gradients (leading axis ``N``) if requested, else None.
    directional: `DirectionalStatistics` if a direction was given, else None.
    dots: one ``(N,)`` array ``g_n' r`` per reference ``r`` in ``dot_with``
      (``()`` if none).
    reduced: ``reduce_gradients``'s sums, a tree shaped like params, else None.
  """
  losses: Array
  mean_gradient: Any
  second_moment: Any
  variance: Any
  gradient_norms: Array
  gradients: Optional[Any] = None
  directional: Optional[DirectionalStatistics] = None
  dots: Tuple[Array, ...] = ()
  reduced: Optional[Any] = None


def check_per_example_supported(apply_fn: Any) -> None:
  """Raises ValueError if ``apply_fn`` declares per-example quantities ill-defined.

  `curvax.flax_utils` wrappers set ``per_example_unsupported`` to a message when
  the model carries batch statistics (batch norm in training mode couples the
  examples) not declared constant (``constant_batch_stats=True``: batch norm in
  inference mode, see `curvax.flax_utils.from_linen`).
  """
  message = getattr(apply_fn, "per_example_unsupported", None)
  if message:
    raise ValueError(message)


def _example_loss_and_grad(apply_fn, loss):
  def one(params, x, y):
    def f(p):
      return loss(apply_fn(p, _chunking.expand(x)), _chunking.expand(y))[0]
    return jax.value_and_grad(f)(params)
  return one


def per_example_gradients(apply_fn: Callable[[Any, Any], Array], loss: Any,
                          params: Any, batch: Any, *,
                          chunk_size: Optional[int] = DEFAULT_CHUNK_SIZE) -> Any:
  """Per-example gradients ``g_n`` (unscaled), a pytree with leading axis ``N``.

  ``vmap(grad)`` applied ``chunk_size`` examples at a time (a ``lax.scan``
  over strided chunks, which keeps a sharded batch axis data-parallel; see
  ``curvax.curvature._chunking``); the result itself is ``N x params``, so use
  the reductions below when only statistics are needed.
  """
  check_per_example_supported(apply_fn)
  loss = as_loss(loss)
  inputs, targets = _checks.check_batch(batch)
  chunk_size = _chunking.check_chunk_size(chunk_size)
  one = _example_loss_and_grad(apply_fn, loss)
  batched = jax.vmap(one, in_axes=(None, 0, 0))
  grads, _ = _chunking.map_reduce(lambda xy: (batched(params, *xy)[1], ()),
                                  (inputs, targets), chunk_size)
  return grads


def _vmap_statistics(apply_fn, loss, params, inputs, targets, chunk_size,
                     return_gradients, references=(), reduce_fn=None):
  """Chunked ``vmap(grad)``: per chunk, norms, dots and sums; gradients only if asked."""
  one = _example_loss_and_grad(apply_fn, loss)
  # "mean" stays a string only when one chunk holds the whole batch.
  ref_leaves = [r if isinstance(r, str) else jax.tree_util.tree_leaves(r)
                for r in references]

  def chunk_fn(xy):
    values, grads = jax.vmap(one, in_axes=(None, 0, 0))(params, *xy)
    rows = [g.reshape(g.shape[0], -1) for g in jax.tree_util.tree_leaves(grads)]
    sq_norms = sum(jnp.sum(jnp.square(g), axis=1) for g in rows)
    def reference_rows(leaves):
      if isinstance(leaves, str):  # the chunk is the batch: its mean is g
        return [jnp.mean(g, axis=0) for g in rows]
      return [r.reshape(-1) for r in leaves]

    dots = tuple(sum(g @ r for g, r in zip(rows, reference_rows(leaves)))
                 for leaves in ref_leaves)
    sums = (jax.tree_util.tree_map(lambda g: jnp.sum(g, 0), grads),
            jax.tree_util.tree_map(lambda g: jnp.sum(jnp.square(g), 0), grads),
            None if reduce_fn is None else jax.tree_util.tree_map(reduce_fn, grads, params))
    per = (values, sq_norms, dots, grads if return_gradients else None)
    return per, sums

  (values, sq_norms, dots, grads), (g_sum, g2_sum, reduced) = _chunking.map_reduce(
      chunk_fn, (inputs, targets), chunk_size)
  n = values.shape[0]
  return (values, otu.tree_scale(1.0 / n, g_sum), otu.tree_scale(1.0 / n, g2_sum),
          sq_norms, grads, dots, reduced)


def per_example_statistics(apply_fn: Callable[[Any, Any], Array], loss: Any,
                           params: Any, batch: Any, *,
                           direction: Optional[Any] = None,
                           return_gradients: bool = False,
                           dot_with: Sequence[Any] = (),
                           reduce_gradients: Optional[Callable[[Array, Array], Any]] = None,
                           reduce_outer_products: Optional[
                               Callable[[Array, Array, Array], Any]] = None,
                           chunk_size: Optional[int] = DEFAULT_CHUNK_SIZE,
                           method: str = "auto") -> PerExampleStatistics:
  r"""Losses, mean gradient, second moment, variance, norms (and more) in one pass.

  Per-example gradients are never all held at once unless
  ``return_gradients``: ``dot_with`` and ``reduce_gradients`` give the
  quantities that usually motivate them (Cockpit's gradient tests and
  histograms; Dangel, thesis, App. C.3.4-C.3.5) at the memory of one layer
  (fast path) or one chunk (``vmap`` path).

  Args:
    apply_fn: ``apply_fn(params, inputs) -> outputs``; a
      `curvax.flax_utils.from_linen` wrapper enables the fast path.
    loss: a `curvax.losses.Loss` or plain per-example callable.
    params: parameters (pytree).
    batch: ``(inputs, targets)``.
    direction: optional pytree shaped like ``params``; adds
      `DirectionalStatistics` along it (one extra JVP, see
      `directional_statistics`).
    return_gradients: also return the ``N``-leading per-example gradients.
    dot_with: a sequence of references ``r``, each a pytree shaped like
      ``params`` or the string ``"mean"`` (the batch mean gradient ``g``, so that
      ``g_n'g`` and ``||g||^2 = mean_n g_n'g`` come from the same pass);
      ``dots[j] = (g_n' r_j)_n``. Fast path, Dense layer ``(A, B)``:
      ``g_n' r = a_n' R b_n + b_n' r_b``, no per-example gradient formed; ``vmap``
      path: contracted chunk by chunk (``"mean"`` costs one extra batched
      backward pass there unless one chunk holds the whole batch, since ``g``
      must be known before the chunks).
    reduce_gradients: ``f(g, theta)``, applied to the per-example gradients
      ``g`` (leading axis: a block of examples) of each parameter tensor
      ``theta``; must be additive over blocks of examples (e.g. histogram
      counts), as the result (``reduced``, shaped like ``params`` with ``f``'s
      outputs as leaves) is the sum over blocks. Blocks are the chunks of the
      ``vmap`` path, or per layer on the fast path.
    reduce_outer_products: optional ``f(a, b, theta)`` returning what
      ``reduce_gradients`` sums over the per-example gradients of a Dense
      kernel ``theta`` on ``(N, in)`` inputs, from the factors of those
      gradients ``g_n = a_n b_n'`` (``a``: ``(N, in)`` layer inputs, ``b``:
      ``(N, out)`` output gradients), for reductions that exploit the structure
      (`curvax.diagnostics.counts_1d_outer`). Fast path only; elsewhere
      ``reduce_gradients`` is used.
    chunk_size: examples per ``vmap`` chunk on the generic path (None: all).
    method: ``"auto"`` (fast path when ``apply_fn`` supports it and every
      parameter belongs to a Dense/Conv layer, else vmap), ``"vmap"``, or
      ``"layers"`` (fast path or a ValueError saying why not).

  Raises:
    ValueError: batch norm (``batch_stats``) in a Flax model not declared
      inference-mode (``constant_batch_stats=True`` of `curvax.flax_utils`), an unknown
      ``method``, a direction or reference not shaped like ``params``, or
      ``method="layers"`` on an unsupported model.
  """
  check_per_example_supported(apply_fn)
  if reduce_outer_products is not None and reduce_gradients is None:
    raise ValueError("`reduce_outer_products` replaces `reduce_gradients` for Dense "
                     "kernels only; pass `reduce_gradients` too (for every other tensor).")
  if method not in ("auto", "vmap", "layers"):
    raise ValueError(f"`method` must be 'auto', 'vmap' or 'layers'; got {method!r}.")
  loss = as_loss(loss)
  inputs, targets = _checks.check_batch(batch)
  if direction is not None:
    _checks.check_tree_like(direction, params, "direction")
  if (not isinstance(dot_with, (list, tuple))
      or (dot_with and jax.tree_util.tree_structure(dot_with)
          == jax.tree_util.tree_structure(params))):
    # tuple(params_dict) would give its keys, tuple("mean") its letters; a list
    # shaped like list params is one reference, not a list of them.
    raise TypeError(
        "`dot_with` must be a tuple (or list) of references, each a pytree shaped like "
        f"params or 'mean'; got {type(dot_with).__name__}. For one reference r, pass "
        "dot_with=(r,).")
  dot_with = tuple(dot_with)
  for r in dot_with:
    if isinstance(r, str):
      if r != "mean":
        raise ValueError(f"a `dot_with` string must be 'mean'; got {r!r}.")
    else:
      _checks.check_tree_like(r, params, "dot_with reference")
  result = None
  if method != "vmap":
    from curvax.curvature import flax_layers  # pylint: disable=g-import-not-at-top
    result = flax_layers.layer_statistics(apply_fn, loss, params, inputs, targets,
                                          return_gradients,
                                          strict=(method == "layers"),
                                          dot_with=dot_with, reduce_fn=reduce_gradients,
                                          reduce_outer_fn=reduce_outer_products)
  if result is None:
    references = dot_with
    one_chunk = chunk_size is None or chunk_size >= _chunking.leading_size(inputs)
    if any(isinstance(r, str) for r in dot_with) and not one_chunk:
      g = jax.grad(lambda p: jnp.mean(loss(apply_fn(p, inputs), targets)))(params)
      references = tuple(g if isinstance(r, str) else r for r in dot_with)
    result = _vmap_statistics(apply_fn, loss, params, inputs, targets, chunk_size,
                              return_gradients, references, reduce_gradients)
  values, mean, second, sq_norms, grads, dots, reduced = result
  # Clamped at 0: round-off can make s - m^2 slightly negative.
  variance = jax.tree_util.tree_map(lambda s, m: jnp.maximum(s - jnp.square(m), 0.0),
                                    second, mean)
  directional = None
  if direction is not None:
    directional = directional_statistics(apply_fn, loss, params, batch, direction)
  return PerExampleStatistics(values, mean, second, variance,
                              jnp.sqrt(jnp.maximum(sq_norms, 0.0)), grads, directional,
                              tuple(dots), reduced)


def mean_gradient(apply_fn, loss, params, batch, **kwargs) -> Any:
  """``(1/N) sum_n g_n``: the gradient of the batch-mean loss."""
  return per_example_statistics(apply_fn, loss, params, batch, **kwargs).mean_gradient


def gradient_second_moment(apply_fn, loss, params, batch, **kwargs) -> Any:
  """``(1/N) sum_n g_n^2`` of the unscaled per-example gradients (BackPACK: ``/N``)."""
  return per_example_statistics(apply_fn, loss, params, batch, **kwargs).second_moment


def gradient_variance(apply_fn, loss, params, batch, **kwargs) -> Any:
  """``(1/N) sum_n g_n^2 - g^2``, elementwise (thesis Eq. B.4)."""
  return per_example_statistics(apply_fn, loss, params, batch, **kwargs).variance


def per_example_gradient_norms(apply_fn, loss, params, batch, **kwargs) -> Array:
  """``(N,)`` Euclidean norms ``||g_n||`` of the unscaled per-example gradients."""
  return per_example_statistics(apply_fn, loss, params, batch, **kwargs).gradient_norms


def directional_statistics(apply_fn: Callable[[Any, Any], Array], loss: Any,
                           params: Any, batch: Any, direction: Any
                           ) -> DirectionalStatistics:
  r"""Per-example slopes ``d'g_n`` and curvatures ``d'G_n d`` along ``direction``.

  With ``u_n = J_n d`` from one JVP of the model (a forward pass carrying a
  tangent), ``d' g_n = u_n' grad_f l_n`` and ``d' G_n d = u_n' H_n u_n``
  (thesis §7.2.2, Eqs. 7.7-7.8 along an arbitrary direction): no per-example
  gradients and no backward pass. Means and (1/N) variances over the batch.
  """
  check_per_example_supported(apply_fn)
  _, slopes, curvatures = directional_terms(apply_fn, loss, params, direction, batch)
  return DirectionalStatistics(slopes, curvatures, jnp.mean(slopes), jnp.var(slopes),
                               jnp.mean(curvatures), jnp.var(curvatures))
