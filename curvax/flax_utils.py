"""Glue between Flax models and curvax's ``(apply_fn, params)`` convention.

Every curvax curvature function takes a pure ``apply_fn(params, inputs)`` and a
``params`` pytree. These helpers build both from a Flax model:

* Linen: `from_linen(module, variables)`; the ``params`` collection is
  differentiated, the other collections are closed over as constants.
* NNX: `from_nnx(model)`; ``nnx.split`` into graph definition, ``nnx.Param``
  state and the rest; ``apply_fn`` merges them back (``nnx.merge``).
  `nnx_update(model, params)` writes parameters back into the model.

The returned ``apply_fn`` is an ordinary callable (jit it, close over it, pass
it to `curvax.curvature.ggn_matvec`) and a pytree whose leaves are the
constant state (Linen's other collections, NNX's non-``Param`` state): pass it
to a jitted function as an ordinary argument. It also lets per-example statistics
refuse batch norm (a ``batch_stats`` collection / ``nnx.BatchStat`` state) with
a clear error, and lets Linen models use the per-layer fast path.

Batch norm in inference mode normalises with stored running averages: the
examples are then independent and per-example quantities (per-example
gradients and their statistics, diagonal GGNs) well defined (ViViT puts batch
norm in eval mode for them; Dangel, thesis, App. D.2.1). Declare it with
``constant_batch_stats=True``; curvax cannot see from the variables alone
whether a model uses its batch statistics or the batch's.
"""

from __future__ import annotations

from typing import Any, Mapping, Optional, Tuple

from curvax.curvature.flax_layers import LinenApply, NNXApply

__all__ = ["LinenApply", "NNXApply", "from_linen", "from_nnx", "nnx_update"]


def from_linen(module: Any, variables: Mapping[str, Any],
               apply_kwargs: Optional[Mapping[str, Any]] = None, *,
               constant_batch_stats: bool = False
               ) -> Tuple[LinenApply, Any]:
  """Returns ``(apply_fn, params)`` for a Linen ``module`` and its ``variables``.

  The returned ``apply_fn`` holds ``variables``' other collections as
  constants. It is a pytree whose leaves are their arrays (and any arrays in
  ``apply_kwargs``, e.g. ``rngs`` keys); the module and the other
  ``apply_kwargs`` are static. Pass it to a jitted function as an ordinary
  (not static) argument: to follow changing collections (batch statistics),
  rebuild it with ``from_linen`` each step, which does not recompile while
  the module, the keywords and the collections' shapes and dtypes stay the same.

  Args:
    module: a ``flax.linen.Module``.
    variables: the dict returned by ``module.init``; must hold ``'params'``.
    apply_kwargs: extra keyword arguments for ``module.apply`` (e.g.
      ``{'train': False}``), fixed for every call. With ``'mutable'`` (e.g.
      ``{'train': True, 'mutable': ['batch_stats']}``, batch norm in training
      mode) ``apply_fn`` returns the outputs only and discards the updated
      collections: batch norm then normalises each call's inputs with their own
      batch statistics, and the running averages in ``variables`` stay as they
      are (update them with your own ``module.apply`` in the training step).
      Per-example quantities are refused while ``variables`` holds
      ``'batch_stats'`` (batch statistics couple the examples).
    constant_batch_stats: declares that the model normalises with the
      ``batch_stats`` in ``variables`` (batch norm in inference mode, e.g.
      ``apply_kwargs={'train': False}``), so that per-example quantities are
      computed instead of refused. ``nn.BatchNorm`` checks the declaration
      itself: the collection is closed over as immutable, and a batch norm that
      used the batch's statistics would update it and raise
      ``ModifyScopeVariableError``.

  Raises:
    TypeError: if ``module`` is not a Linen module.
    ValueError: if ``variables`` has no ``'params'`` collection, or
      ``constant_batch_stats`` with ``'mutable'`` in ``apply_kwargs``.
  """
  import flax.linen as nn  # pylint: disable=g-import-not-at-top
  if not isinstance(module, nn.Module):
    raise TypeError(f"from_linen expects a flax.linen.Module; got {type(module).__name__}.")
  if not isinstance(variables, Mapping) or "params" not in variables:
    raise ValueError(
        "from_linen: `variables` must be the dict from module.init with a "
        "'params' collection; got "
        + (f"collections {sorted(variables)}." if isinstance(variables, Mapping)
           else f"{type(variables).__name__}."))
  apply_kwargs = dict(apply_kwargs or {})
  if constant_batch_stats and "mutable" in apply_kwargs:
    raise ValueError("from_linen: constant_batch_stats=True declares the batch "
                     "statistics constants, but apply_kwargs makes collections "
                     f"mutable ({apply_kwargs['mutable']!r}).")
  collections = {k: v for k, v in variables.items() if k != "params"}
  return (LinenApply(module, collections, apply_kwargs, constant_batch_stats),
          variables["params"])


def from_nnx(model: Any, *, wrt: Any = None,
             constant_batch_stats: bool = False) -> Tuple[NNXApply, Any]:
  """Returns ``(apply_fn, params)`` for an NNX module, ``params`` its ``nnx.Param`` state.

  ``params`` is a snapshot: later updates of the model (``nnx.Optimizer``) do
  not change it (its arrays are the model's at this call, not copies).

  ``apply_fn(params, inputs) = nnx.merge(graphdef, params, rest)(inputs)``: pure,
  so it can be jitted, vmapped and differentiated. ``rest``, the non-``Param``
  state (batch statistics, RNG state...), is a copy taken when ``from_nnx`` is
  called, and every call rebuilds the model from fresh copies of the variables:
  the model object itself is never modified (neither by ``apply_fn`` nor by
  curvax's products through it), and what a call writes to its rebuilt model
  is discarded. So batch norm in training mode normalises with each batch's
  statistics and does not update the running averages, and a dropout layer
  (``nnx.Dropout(rngs=...)`` in training mode) draws the same mask on every call
  (for a given input shape): its RNG state is frozen at ``from_nnx`` time, which
  keeps the objective a fixed function of the parameters, as Hessian-free's CG
  iterations and line searches need. For fresh masks, advance the model's own
  RNG state (calling the model does; or ``nnx.reseed``) and call ``from_nnx``
  again (``apply_fn`` is a pytree of ``rest``'s arrays: passed to a jitted
  function as an argument, the new one does not retrace); ``model.eval()`` turns
  dropout off. Per-example quantities (`curvax.curvature.per_example_statistics`
  and what builds on it) are refused while dropout is active, as for batch
  norm with batch statistics: one example at a time, the masks would not be the
  batch's. Use `nnx_update` to write new parameters back.

  Frozen parameters: ``wrt`` selects the trainable variables, as
  ``nnx.Optimizer(model, tx, wrt=...)`` does (default ``nnx.Param``); the
  parameters it leaves out join ``rest`` and are constants of ``apply_fn``.
  Pass the optimizer's filter, and ``params``, its gradients and its updates
  have the same structure. (``optax.masked`` / ``multi_transform`` cannot
  freeze leaves for curvax's transforms: they hide the frozen parameters from
  the transform, which needs them to run the model.)

  Args:
    model: an ``nnx.Module``.
    wrt: an ``nnx`` filter of the trainable variables (``None``: ``nnx.Param``),
      e.g. ``nnx.All(nnx.Param, nnx.PathContains('head'))``.
    constant_batch_stats: declares that the model normalises with its stored
      ``nnx.BatchStat`` running averages (after ``model.eval()``), so that
      per-example quantities are computed instead of refused. Checked for
      ``nnx.BatchNorm`` modules' ``use_running_average`` attribute, not for a
      ``use_running_average=False`` passed when the model calls them.

  Raises:
    TypeError: if ``model`` is not an ``nnx.Module``.
    ValueError: ``constant_batch_stats`` with an ``nnx.BatchNorm`` not in
      inference mode.
  """
  from flax import nnx  # pylint: disable=g-import-not-at-top
  if not isinstance(model, nnx.Module):
    raise TypeError(f"from_nnx expects a flax.nnx.Module; got {type(model).__name__}.")
  if constant_batch_stats:
    modules = (nnx.iter_modules(model) if hasattr(nnx, "iter_modules")
               else model.iter_modules())
    training = ["/".join(map(str, path)) for path, m in modules
                if isinstance(m, nnx.BatchNorm) and not m.use_running_average]
    if training:
      raise ValueError(
          f"from_nnx: constant_batch_stats=True, but batch norm {training} "
          "normalises with batch statistics (use_running_average=False); call "
          "model.eval() first.")
  import jax  # pylint: disable=g-import-not-at-top
  import jax.numpy as jnp  # pylint: disable=g-import-not-at-top
  graphdef, params, rest = nnx.split(model, nnx.Param if wrt is None else wrt, ...)
  if not jax.tree_util.tree_leaves(params):
    raise ValueError(f"from_nnx: the filter wrt={wrt!r} selects no variables of the model.")
  # A snapshot: new Variables (recent Flax splits into the model's own) holding
  # copies of the arrays, unaffected by later calls of the model.
  rest = jax.tree_util.tree_map(jnp.copy, rest)
  # The parameters in new Variables too (the same arrays, no copy): those of
  # the split are the model's own, which nnx.Optimizer.update rebinds in
  # place, so `params` would have followed the model's later updates.
  params = jax.tree_util.tree_map(lambda x: x, params)
  has_batch_stats = bool(jax.tree_util.tree_leaves(nnx.state(model, nnx.BatchStat)))
  modules = nnx.iter_modules(model) if hasattr(nnx, "iter_modules") else model.iter_modules()
  dropout = tuple("/".join(map(str, path)) for path, m in modules
                  if isinstance(m, nnx.Dropout) and not m.deterministic and m.rate > 0)
  return NNXApply(graphdef, rest, has_batch_stats, constant_batch_stats, dropout), params


def nnx_update(model: Any, params: Any) -> None:
  """Writes ``params`` (as returned by `from_nnx`, possibly updated) into ``model``."""
  from flax import nnx  # pylint: disable=g-import-not-at-top
  nnx.update(model, params)
