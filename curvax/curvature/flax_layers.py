r"""Flax model wrappers and BackPACK's per-layer fast path for per-example statistics.

`LinenApply` and `NNXApply` are the ``apply_fn`` objects built by
`curvax.flax_utils`: plain callables ``apply_fn(params, inputs)`` that also
remember the model, so that per-example statistics can (i) refuse models with
batch norm (unless declared in inference mode: ``constant_batch_stats``) and
(ii) use per-layer contractions instead of ``vmap(grad)``.
`LinenVariablesApply` is the same for an ``apply_fn(variables, inputs)`` that
takes the Flax variables ``{'params': p}`` (`curvax.problems.Problem.apply_fn`).

Fast path (Dangel, thesis, App. B.1.1; spec §1.2). ``flax.linen.intercept_methods``
captures, for every ``nn.Dense``, ``nn.Conv`` and `curvax.layers.PatchConv` call,
the layer input ``A`` and adds a zero perturbation to its output;
differentiating the batch-mean loss with respect to the perturbations gives the
per-example output gradients ``B / N`` in the same backward pass as the mean
gradient (the pass a training step takes anyway: under one ``jit`` XLA shares
it). Then, per layer:

* Dense on ``(N, in)`` inputs: kernel gradient of example n is ``a_n b_n'``,
  so ``||g_n||^2 = ||a_n||^2 ||b_n||^2`` and the second moment is
  ``(A^2)'(B^2)/N``; bias: ``b_n``. No per-example gradient is formed.
* Conv and PatchConv (and Dense on inputs with extra axes): weight sharing
  sums over positions, so the per-example layer gradient is formed for that layer only,
  reduced, and discarded: memory ``N x layer`` instead of ``N x params``.
  PatchConv: ``P_n' B_n`` from the patches ``P`` of the forward pass (one batched
  matrix product, `_per_example_layer`); others: a ``vmap`` of the layer's own VJP.
* projections ``g_n' r`` on a reference ``r`` (e.g. the mean gradient, for
  Cockpit's gradient tests): ``a_n' R b_n + b_n' r_b`` for Dense, i.e.
  ``rowsum((A R) * B)``, again without per-example gradients;
* element-wise reductions (histograms) form a Dense kernel's ``a_n b_n'`` a
  block of examples at a time (`REDUCE_BLOCK_ELEMENTS`).

The fast path applies only when every parameter belongs to exactly one
Dense/Conv call, made outside lifted Flax transforms and on the parameters
themselves, every such call has the examples on the leading axis of its
input and output (checked by tracing at batch sizes ``N`` and ``N + 1``: a Dense
on a learned query, a positional grid or a time-major ``(T, N, F)`` input does
not qualify), and no parameter reaches the outputs other than through its own
layer call (checked on the jaxpr of a JVP in which each layer call sees its own
parameters under ``stop_gradient``: tied weights such as a decoder
``h @ dense.variables['params']['kernel'].T`` do not qualify); see
`_trace_problem`. These checks trace the model abstractly once more when the
fast path is planned, i.e. once per trace of the caller, not per step.
Otherwise (shared layers, custom ``self.param``s, other layer types, layers
under ``nn.remat``/``nn.checkpoint``, ``nn.scan``, ``nn.map_variables``, the
cases above...) `layer_statistics` returns None and callers fall back to
``vmap`` (``method="layers"``: a ValueError saying why). Not detected (as for
the ``vmap`` path, per-example quantities assume that examples do not
interact): a layer input whose leading axis has the batch's size but whose rows
mix examples.
"""

from __future__ import annotations

import dataclasses
import functools
from typing import Any, Dict, Mapping, Optional, Tuple

import jax
import jax.numpy as jnp
import numpy as np
import optax.tree_utils as otu

from curvax.curvature import _chunking

Array = jax.Array

DROPOUT_MESSAGE = (
    "per-example quantities are ill-defined for a model with dropout in training "
    "mode ({}): evaluated one example at a time, each call draws masks of its own "
    "shape, so they would not be those of the batch's pass (the per-example losses "
    "and gradients would not average to the batch's). Call model.eval() (or set "
    "the Dropout modules deterministic) before from_nnx.")

BATCH_NORM_MESSAGE = (
    "per-example quantities are ill-defined for a model with batch norm "
    "normalising with batch statistics (collection 'batch_stats' / nnx.BatchStat "
    "state present): they couple the examples of a batch. If the model normalises "
    "with its stored running averages (inference mode: e.g. "
    "from_linen(module, variables, apply_kwargs={'train': False}, "
    "constant_batch_stats=True), or nnx model.eval() and "
    "from_nnx(model, constant_batch_stats=True)), pass constant_batch_stats=True to "
    "declare them constants; otherwise remove batch norm.")


class _ByIdentity:
  """Static pytree data for an unhashable value: equal only to a wrapper of the same object."""
  __slots__ = ("value",)

  def __init__(self, value):
    self.value = value

  def __eq__(self, other):
    return isinstance(other, _ByIdentity) and other.value is self.value

  def __hash__(self):
    return id(self.value)


def _static(value):
  """``value`` as pytree aux data: itself if hashable (compared by value in
  ``jit``'s cache), else `_ByIdentity` (a Linen module with a list attribute)."""
  try:
    hash(value)
  except TypeError:
    return _ByIdentity(value)
  return value


def _unstatic(value):
  return value.value if isinstance(value, _ByIdentity) else value


def _set_fields(obj, **fields):
  for name, value in fields.items():
    object.__setattr__(obj, name, value)
  return obj


@jax.tree_util.register_pytree_with_keys_class
@dataclasses.dataclass(frozen=True, eq=False)
class LinenApply:
  """``apply_fn(params, inputs)`` for a Flax Linen module.

  Calls ``module.apply({'params': params, **collections}, inputs, **kwargs)``;
  the non-``params`` collections are constants for curvature.
  With a ``mutable`` keyword (other than False) ``module.apply`` returns
  ``(outputs, updated collections)``: only the outputs are returned, the
  updates (e.g. batch norm's running averages in training mode) are discarded.
  Per-example quantities are refused when ``collections`` holds
  ``'batch_stats'``, unless ``constant_batch_stats`` declares that the model
  normalises with them (batch norm in inference mode; see
  `curvax.flax_utils.from_linen`).

  A pytree: its leaves are the arrays of ``collections``, then the array
  values in ``kwargs`` (e.g. ``rngs`` keys), traced when it is passed to a
  jitted function; the module and the other ``kwargs`` values (``train``,
  ``mutable``...) are static, compared by value (by identity if unhashable).
  ``kwargs`` is copied down to its leaves (dicts, lists, tuples).
  """
  module: Any
  collections: Mapping[str, Any]
  kwargs: Mapping[str, Any]
  constant_batch_stats: bool = False
  # (treedef of kwargs, its leaves: None for an array, else the static value).
  _kwargs_spec: Any = dataclasses.field(init=False, repr=False)

  def __post_init__(self):
    leaves, treedef = jax.tree_util.tree_flatten(dict(self.kwargs))
    static = tuple(None if isinstance(leaf, (jax.Array, np.ndarray)) else _static(leaf)
                   for leaf in leaves)
    _set_fields(self, kwargs=treedef.unflatten(leaves), _kwargs_spec=(treedef, static))

  def __call__(self, params, inputs):
    outputs = self.module.apply({"params": params, **self.collections}, inputs,
                                **self.kwargs)
    # Flax returns (y, mutated variables) exactly when `mutable is not False`.
    if self.kwargs.get("mutable", False) is not False:
      outputs, _ = outputs
    return outputs

  @property
  def per_example_unsupported(self) -> Optional[str]:
    if "batch_stats" in self.collections and not self.constant_batch_stats:
      return BATCH_NORM_MESSAGE
    return None

  def _children_and_aux(self):
    # The array keywords as ``kwargs``' own tree with None (an empty subtree)
    # for the static values, so that their key paths read ``.kwargs['rngs']...``.
    treedef, static = self._kwargs_spec
    arrays = treedef.unflatten([leaf if s is None else None for leaf, s in
                                zip(treedef.flatten_up_to(self.kwargs), static)])
    return ((self.collections, arrays),
            (_static(self.module), treedef, static, self.constant_batch_stats))

  def tree_flatten(self):
    return self._children_and_aux()

  def tree_flatten_with_keys(self):
    (collections, arrays), aux = self._children_and_aux()
    return (((jax.tree_util.GetAttrKey("collections"), collections),
             (jax.tree_util.GetAttrKey("kwargs"), arrays)), aux)

  @classmethod
  def tree_unflatten(cls, aux, children):
    module, treedef, static, constant_batch_stats = aux
    collections, arrays = children
    leaves = [leaf if s is None else _unstatic(s)
              for leaf, s in zip(treedef.flatten_up_to(arrays), static)]
    return _set_fields(object.__new__(cls), module=_unstatic(module),
                       collections=collections, kwargs=treedef.unflatten(leaves),
                       constant_batch_stats=constant_batch_stats,
                       _kwargs_spec=(treedef, static))


@jax.tree_util.register_pytree_with_keys_class
@dataclasses.dataclass(frozen=True, eq=False)
class NNXApply:
  """``apply_fn(params, inputs)`` for a Flax NNX module split into graph and state.

  Calls ``nnx.merge(graphdef, params, rest)(inputs)`` on fresh copies of the
  variables (`_merge_copy`); ``rest`` (non-``Param`` state) is constant.
  Whatever the call writes to the rebuilt model (batch norm's running averages
  in training mode, a dropout RNG's count) goes to those copies and is
  discarded: every call sees the same ``rest``. Per-example quantities are
  refused when the model has ``nnx.BatchStat`` state, unless
  ``constant_batch_stats`` declares that it normalises with it (see
  `curvax.flax_utils.from_nnx`).

  A pytree: its leaves are those of ``rest``, traced when it is passed to a
  jitted function; the graph definition and the flags are static.
  """
  graphdef: Any
  rest: Any
  has_batch_stats: bool = False
  constant_batch_stats: bool = False
  active_dropout: Tuple[str, ...] = ()

  def __call__(self, params, inputs):
    return _merge_copy(self.graphdef, params, self.rest)(inputs)

  @property
  def per_example_unsupported(self) -> Optional[str]:
    if self.has_batch_stats and not self.constant_batch_stats:
      return BATCH_NORM_MESSAGE
    if self.active_dropout:
      return DROPOUT_MESSAGE.format(list(self.active_dropout))
    return None

  def _aux(self):
    return (_static(self.graphdef), self.has_batch_stats, self.constant_batch_stats,
            tuple(self.active_dropout))

  def tree_flatten(self):
    return (self.rest,), self._aux()

  def tree_flatten_with_keys(self):
    return ((jax.tree_util.GetAttrKey("rest"), self.rest),), self._aux()

  @classmethod
  def tree_unflatten(cls, aux, children):
    graphdef, has_batch_stats, constant_batch_stats, active_dropout = aux
    return cls(_unstatic(graphdef), children[0], has_batch_stats, constant_batch_stats,
               active_dropout)


def _merge_copy(graphdef, *states):
  """``nnx.merge`` into new ``Variable`` objects, shared with nothing else.

  In recent Flax (0.12 at least), ``nnx.split`` returns the
  model's own ``Variable`` objects and ``nnx.merge`` reuses them unless
  ``copy=True``: the rebuilt model would write its batch statistics and RNG
  counts into the states passed in (the user's model, for ``rest``), and under
  ``jit``/``grad`` such a write from inside the trace raises
  ``TraceContextError``. Older Flax (0.11.0, the lowest supported), whose ``merge`` has no ``copy``
  argument, always builds new variables from immutable ``VariableState`` leaves.
  """
  from flax import nnx  # pylint: disable=g-import-not-at-top
  if _merge_takes_copy():
    return nnx.merge(graphdef, *states, copy=True)
  return nnx.merge(graphdef, *states)  # pragma: no cover  (older Flax)


@functools.lru_cache(maxsize=None)
def _merge_takes_copy() -> bool:
  import inspect  # pylint: disable=g-import-not-at-top
  from flax import nnx  # pylint: disable=g-import-not-at-top
  return "copy" in inspect.signature(nnx.merge).parameters


@dataclasses.dataclass(frozen=True, eq=False)
class LinenVariablesApply:
  """``apply_fn(variables, inputs)`` for a Linen module, in Flax's variables layout.

  Like `LinenApply`, but the differentiated argument is the variables dict
  ``{'params': p}`` itself (the layout of `curvax.problems.Problem`): calls
  ``module.apply({**collections, **variables}, inputs, **kwargs)``. The
  per-layer fast path runs on ``p`` (as the `LinenApply` given by
  `linen_apply`) and returns its results in the ``{'params': ...}`` structure.
  Subclasses may accept extra keywords (``train=``...) as long as the call
  without them is the one above.
  """
  module: Any
  collections: Mapping[str, Any]
  kwargs: Mapping[str, Any]

  def __call__(self, variables, inputs):
    return self.module.apply({**self.collections, **variables}, inputs, **self.kwargs)

  def linen_apply(self) -> LinenApply:
    """The same model as a `LinenApply` of the inner ``params`` collection."""
    return LinenApply(self.module, self.collections, self.kwargs)

  @property
  def per_example_unsupported(self) -> Optional[str]:
    return BATCH_NORM_MESSAGE if "batch_stats" in self.collections else None


def _layer_types():
  import flax.linen as nn  # pylint: disable=g-import-not-at-top
  from curvax.layers import PatchConv  # pylint: disable=g-import-not-at-top
  return (nn.Dense, nn.Conv, PatchConv)


def _forward(apply: LinenApply, params, inputs, perturbations):
  """Runs the model recording (path, layer, input, output shape) per layer call.

  Returns ``(outputs, records, unsupported)``; ``unsupported`` lists why a layer
  call could not be recorded (the fast path then does not apply, `_plan`):

  * a call inside a lifted Flax transform (``nn.remat``/``nn.checkpoint``,
    ``nn.scan``, ``nn.vmap``, ``nn.jit``..., on the layer, an ancestor or a
    method): it runs under a JAX trace of its own, detected as a trace other
    than the one ``apply`` runs under, and its input and output are tracers of
    that trace, which must not leave it (recording them raised
    ``UnexpectedTracerError``). Such calls run unchanged, unrecorded and
    unperturbed;
  * a call whose input is neither positional nor the keyword ``inputs``;
  * a call whose kernel or bias is not the parameter leaf at its path (e.g.
    ``nn.map_variables`` transforms them on the way in): the per-layer formulas
    would give gradients with respect to the transformed values.
  """
  import flax.linen as nn  # pylint: disable=g-import-not-at-top
  try:  # Flax's own helper over JAX's trace-state API (flax.core.tracers, Flax 0.10+)
    from flax.core.tracers import current_trace  # pylint: disable=g-import-not-at-top
  except ImportError:  # pragma: no cover  (without it lifted transforms go undetected)
    current_trace = lambda: None  # noqa: E731
  records = []
  unsupported = []
  layer_types = _layer_types()
  base_trace = current_trace()
  leaves = {_key_tuple(p): leaf for p, leaf in jax.tree_util.tree_leaves_with_path(params)}

  def interceptor(next_fun, args, kwargs, context):
    module = context.module
    if context.method_name != "__call__" or type(module) not in layer_types:
      return next_fun(*args, **kwargs)
    key = "/".join(module.path)
    if current_trace() != base_trace:
      unsupported.append(
          f"layer {key!r} is called inside a lifted Flax transform (nn.remat/"
          "nn.checkpoint, nn.scan, nn.vmap, nn.jit, ...), whose values cannot be "
          "recorded outside it.")
      return next_fun(*args, **kwargs)
    if args:
      x = args[0]
    elif "inputs" in kwargs:
      x = kwargs["inputs"]
    else:
      unsupported.append(f"layer {key!r} is called without its input as the first "
                         "positional argument or the keyword `inputs`.")
      return next_fun(*args, **kwargs)
    y = next_fun(*args, **kwargs)
    path = tuple(module.path)
    for name in ("kernel", "bias"):
      leaf = leaves.get(path + (name,))
      if (leaf is not None and module.has_variable("params", name)
          and module.get_variable("params", name) is not leaf):
        unsupported.append(
            f"the {name} of layer {key!r} is not the parameter passed in (a lifted "
            "transform such as nn.map_variables changes it).")
        return y
    records.append((key, path, module, x, y.shape, y.dtype))
    if perturbations is not None:
      y = y + perturbations[key]
    return y

  with nn.intercept_methods(interceptor):
    outputs = apply(params, inputs)
  return outputs, records, unsupported


def _key_tuple(path) -> Tuple[str, ...]:
  return tuple(str(getattr(k, "key", getattr(k, "name", k))) for k in path)


def _unwrap(apply, params):
  """``(LinenApply, inner params, wrap)`` or a string saying why there is none.

  ``wrap`` puts a pytree shaped like the inner params back into the structure of
  ``params`` (the identity for a `LinenApply`; ``{'params': t}`` for a
  `LinenVariablesApply`, rebuilt from ``params``'s own tree structure).
  """
  if isinstance(apply, LinenApply):
    return apply, params, lambda tree: tree
  if not isinstance(apply, LinenVariablesApply):
    return "apply_fn is not a Flax Linen wrapper from curvax.flax_utils.from_linen."
  if apply.per_example_unsupported:
    return apply.per_example_unsupported
  if not isinstance(params, Mapping) or set(params) != {"params"}:
    return ("the variables given hold collections other than 'params' "
            f"({sorted(params) if isinstance(params, Mapping) else type(params).__name__}).")
  inner = params["params"]
  treedef = jax.tree_util.tree_structure(params)

  def wrap(tree):
    return jax.tree_util.tree_unflatten(treedef, jax.tree_util.tree_leaves(tree))

  return apply.linen_apply(), inner, wrap


def _plan(apply, params, inputs, strict, what="per-example"):
  """Discovers the layers by abstract evaluation; None if the fast path does not apply.

  Returns ``(linen_apply, inner_params, wrap, layers, param_paths)``:
  the fast path runs ``linen_apply`` on ``inner_params`` (see `_unwrap`) and
  ``wrap``s its parameter-shaped results. With ``strict``, raises a ValueError
  saying why the ``what`` fast path does not apply.
  """
  def fail(why):
    if strict:
      raise ValueError(f"{what} fast path not applicable: {why}")
    return None

  unwrapped = _unwrap(apply, params)
  if isinstance(unwrapped, str):
    return fail(unwrapped)
  apply, params, wrap = unwrapped
  found = []
  unsupported = []
  input_shapes = {}

  def probe(p, x):
    _, records, why = _forward(apply, p, x, None)
    unsupported.extend(why)
    for key, path, module, a, shape, dtype in records:
      found.append((key, path, module.clone(parent=None), shape, dtype))
      input_shapes[key] = jnp.shape(a)
    return 0.0

  jax.eval_shape(probe, params, inputs)

  if unsupported:
    return fail(unsupported[0])
  keys = [f[0] for f in found]
  if len(set(keys)) != len(keys):
    return fail("a Dense/Conv layer is called more than once (shared weights).")
  param_paths = [_key_tuple(p) for p, _ in jax.tree_util.tree_leaves_with_path(params)]
  covered = {}
  for key, path, module, shape, dtype in found:
    for name in ("kernel", "bias"):
      covered[path + (name,)] = (key, name)
  missing = [p for p in param_paths if p not in covered]
  if missing:
    return fail(f"parameters {['/'.join(m) for m in missing]} do not belong to "
                "an nn.Dense or nn.Conv layer.")
  why = _trace_problem(apply, params, inputs, found, input_shapes)
  if why:
    return fail(why)
  return apply, params, wrap, found, param_paths


def _trace_problem(apply, params, inputs, found, input_shapes):
  """Why the per-layer formulas would be wrong for this model, or None.

  One more abstract trace of the model (no computation), at batch size
  ``N + 1``, checks the two assumptions of the formulas that the structure of
  the recorded calls (`_plan`) does not show:

  * the batch is on axis 0: example ``n``'s layer input and output gradient are
    row ``n`` of ``A`` and ``B``. A layer applied to something without the
    batch axis first (a learned query ``nn.Dense(k)(jnp.ones((1, d)))``, a
    positional grid, a time-major ``(T, N, F)`` input) gives wrong statistics
    even when ``T == N``; so every recorded layer must have input and output
    leading dimension equal to the batch size at both ``N`` and ``N + 1``. A
    shape check: a layer input whose leading axis has the batch's size but
    whose rows mix examples (a transpose followed by a reshape) is not detected;
  * the parameters reach the outputs only through their own layer call: the
    gradient of a parameter that is also used elsewhere (a tied decoder
    ``h @ dense.variables['params']['kernel'].T``) has terms the layer's
    ``A``, ``B`` do not give. The model is traced as a JVP with respect to the
    parameters in which every recorded layer uses ``stop_gradient`` of its own
    parameters (`_outside_uses`); if the output tangent still depends on the
    parameter tangent, some parameter has another way to the outputs. The
    dependency walk over the jaxpr is conservative (an equation's outputs depend
    on all its inputs), so it can only refuse too often, never accept wrongly.
  """
  leaves = jax.tree_util.tree_leaves(inputs)
  if not leaves or any(jnp.ndim(leaf) == 0 for leaf in leaves):
    return "the inputs have no leading batch axis."
  n = jnp.shape(leaves[0])[0]
  bigger = jax.tree_util.tree_map(
      lambda a: jax.ShapeDtypeStruct((n + 1,) + jnp.shape(a)[1:], jnp.result_type(a)),
      inputs)
  try:
    shapes, leaked = _outside_uses(apply, params, bigger)
  except Exception as e:  # pylint: disable=broad-except
    return (f"the model cannot be traced at batch size {n + 1} ({type(e).__name__}: "
            f"{str(e)[:200]}), which the check that every layer sees the batch on "
            "axis 0 needs.")
  for key, _, _, out_shape, _ in found:
    for m, (a_shape, y_shape) in ((n, (input_shapes[key], out_shape)),
                                  (n + 1, shapes.get(key, ((), ())))):
      if a_shape[:1] != (m,) or y_shape[:1] != (m,):
        return (f"layer {key!r} is not applied to the batch along the leading axis "
                f"of its input and output (at batch size {m}: input {a_shape}, "
                f"output {y_shape}).")
  if leaked:
    return (f"parameters {leaked} reach the outputs other than through their "
            "layer's call (e.g. tied weights used outside the layer).")
  return None


def _outside_uses(apply, params, inputs):
  """``(shapes, leaked)`` from an abstract trace of the model at ``inputs``.

  ``shapes``: ``{layer key: (input shape, output shape)}`` per recorded layer
  call. ``leaked``: the ``'/'``-joined paths of the parameters whose tangent
  reaches the output tangent of ``jax.jvp`` of the model with respect to the
  parameters when every recorded layer call uses ``stop_gradient`` of its own
  parameters (computed on the jaxpr from ``jax.make_jaxpr``: a variable depends
  on a parameter if an equation producing it has an input that does).
  """
  import flax.linen as nn  # pylint: disable=g-import-not-at-top
  layer_types = _layer_types()
  shapes = {}
  busy = []

  def stopped(p, x):
    def interceptor(next_fun, args, kwargs, context):
      module = context.module
      if busy or context.method_name != "__call__" or type(module) not in layer_types:
        return next_fun(*args, **kwargs)
      own = jax.tree_util.tree_map(jax.lax.stop_gradient,
                                   dict(module.variables.get("params", {})))
      busy.append(True)
      try:  # the layer again, unbound, on the stopped parameters
        y = module.clone(parent=None).apply({"params": own}, *args, **kwargs)
      finally:
        busy.pop()
      a = args[0] if args else kwargs.get("inputs")
      shapes["/".join(module.path)] = (jnp.shape(a), jnp.shape(y))
      return y

    with nn.intercept_methods(interceptor):
      return apply(p, x)

  def tangents(p, t, x):
    return jax.jvp(lambda q: stopped(q, x), (p,), (t,))[1]

  spec = jax.tree_util.tree_map(
      lambda a: jax.ShapeDtypeStruct(jnp.shape(a), jnp.result_type(a)), params)
  jaxpr = jax.make_jaxpr(tangents)(spec, spec, inputs).jaxpr
  paths = ["/".join(_key_tuple(p)) for p, _ in jax.tree_util.tree_leaves_with_path(params)]
  num = len(paths)
  # Bit i: depends on the tangent of parameter i. Sub-jaxprs (pjit, scan, cond,
  # custom rules) are not entered: all outputs of such an equation depend on
  # all its inputs. Variables are compared by identity (literals never match).
  deps = {id(v): 1 << i for i, v in enumerate(jaxpr.invars[num:2 * num])}
  for eqn in jaxpr.eqns:
    mask = 0
    for v in eqn.invars:
      mask |= deps.get(id(v), 0)
    if mask:
      for v in eqn.outvars:
        deps[id(v)] = mask
  mask = 0
  for v in jaxpr.outvars:
    mask |= deps.get(id(v), 0)
  return shapes, [path for i, path in enumerate(paths) if mask >> i & 1]


# Per-example gradient elements are formed at most this many at a time when a
# reduction of them is requested (`layer_statistics`'s ``reduce_fn``): 2^20
# entries, 4 MiB in float32, a buffer that stays in cache and far below glibc's
# mmap threshold (histograms of fmnist_mlp's 128 x 1.3M entries, XLA:CPU:
# 0.36 s with 2^20, 0.42 s with 2^22, 0.54 s with 2^24).
REDUCE_BLOCK_ELEMENTS = 1 << 20
# Entries of the per-example layer gradients of one factor column formed at once
# by `layer_diag_ggn` for non-Dense layers.
DIAG_BLOCK_ELEMENTS = 1 << 22


def _reduce_in_chunks(fn, make, xs, per_example_size):
  """``sum over example chunks of fn(make(*chunk))`` with chunks of ~`REDUCE_BLOCK_ELEMENTS`."""
  n = jax.tree_util.tree_leaves(xs)[0].shape[0]
  chunk = max(1, min(n, REDUCE_BLOCK_ELEMENTS // max(per_example_size, 1)))
  _, total = _chunking.map_reduce(lambda c: ((), fn(make(*c))), xs, chunk)
  return total


def layer_statistics(apply_fn, loss, params, inputs, targets, return_gradients,
                     strict=False, dot_with=(), reduce_fn=None, reduce_outer_fn=None):
  r"""Fast-path statistics or None (see `curvax.curvature.per_example_statistics`).

  Returns ``(losses, mean, second moment, squared norms, per-example gradients
  or None, dots, reduced or None)``. ``dot_with``: references ``r`` (pytrees
  like ``params``, or ``"mean"`` for the batch mean gradient ``g``); ``dots[j]``
  is ``(N,)``, ``g_n' r_j``, accumulated per layer without per-example gradients:

  * Dense on ``(N, in)`` inputs, ``g_n = a_n b_n'`` (kernel), ``b_n`` (bias):
    ``g_n' r = a_n' R b_n + b_n' r_b``, i.e. ``rowsum((A R) * B) + B r_b``;
  * other layers (Conv; Dense on inputs with extra axes): the per-example layer
    gradients formed for the norms anyway, contracted with ``r``.

  ``reduce_fn(g, theta)``: applied to the per-example gradients ``g`` (leading
  axis: a block of examples) of each parameter tensor ``theta``, summed over
  blocks; Dense kernels' ``a_n b_n'`` are formed a block of examples at a time
  (at most `REDUCE_BLOCK_ELEMENTS` entries), unless ``reduce_outer_fn(a, b,
  theta)`` is given: it then gets the factors ``A`` (N, in), ``B`` (N, out) of
  the whole batch instead and must return what ``reduce_fn`` would have summed.
  """
  plan = _plan(apply_fn, params, inputs, strict)
  if plan is None:
    return None
  outer_treedef = jax.tree_util.tree_structure(params)
  apply_fn, params, wrap, layers, param_paths = plan
  perturbations = {key: jnp.zeros(shape, dtype) for key, _, _, shape, dtype in layers}

  def batch_mean(p, perts):
    outputs, records, _ = _forward(apply_fn, p, inputs, perts)
    values = loss(outputs, targets)
    return jnp.mean(values), (values, {r[0]: r[3] for r in records})

  # The batch *mean*, differentiated as a user's training step differentiates it
  # (`curvax.losses.objective`): in one jitted step XLA then computes the forward
  # and backward pass once for both (common subexpressions; the zero
  # perturbations fold away). Output gradients of the mean are B / N.
  (_, (values, acts)), (mean, out_grads) = jax.value_and_grad(
      batch_mean, argnums=(0, 1), has_aux=True)(params, perturbations)
  n = values.shape[0]
  out_grads = jax.tree_util.tree_map(lambda b: b * n, out_grads)
  flat_params = {_key_tuple(p): leaf for p, leaf in jax.tree_util.tree_leaves_with_path(params)}
  flat_mean = dict(zip(param_paths, jax.tree_util.tree_leaves(mean)))
  # References in the inner layout (same leaf order as the outer one).
  flat_refs = [flat_mean if isinstance(r, str) else
               dict(zip(param_paths, jax.tree_util.tree_leaves(r))) for r in dot_with]

  second: Dict[Tuple[str, ...], Array] = {}
  grads: Dict[Tuple[str, ...], Array] = {}
  reduced: Dict[Tuple[str, ...], Any] = {}
  sq_norms = jnp.zeros((n,), values.dtype)
  dots = [jnp.zeros((n,), values.dtype) for _ in flat_refs]
  for key, path, module, _, _ in layers:
    a, b = acts[key], out_grads[key]
    names = [nm for nm in ("kernel", "bias") if path + (nm,) in flat_params]
    if a.ndim == 2 and b.ndim == 2 and type(module).__name__ == "Dense":
      a, b = _promote(a, b, flat_params[path + ("kernel",)])
      a2, b2 = jnp.square(a), jnp.square(b)
      b2_rows = jnp.sum(b2, axis=1)
      sq_norms = sq_norms + jnp.sum(a2, axis=1) * b2_rows
      second[path + ("kernel",)] = a2.T @ b2 / n
      kernel = flat_params[path + ("kernel",)]
      for j, fr in enumerate(flat_refs):
        dots[j] = dots[j] + jnp.sum((a @ fr[path + ("kernel",)]) * b, axis=1)
      outer = lambda a_, b_, k=kernel: jnp.einsum("ni,no->nio", a_, b_).astype(k.dtype)
      if return_gradients:
        grads[path + ("kernel",)] = outer(a, b)
      if reduce_outer_fn is not None:
        reduced[path + ("kernel",)] = reduce_outer_fn(a, b, kernel)
      elif reduce_fn is not None:
        reduced[path + ("kernel",)] = _reduce_in_chunks(
            lambda g, kernel=kernel: reduce_fn(g, kernel), outer, (a, b), kernel.size)
      if "bias" in names:
        sq_norms = sq_norms + b2_rows
        second[path + ("bias",)] = jnp.mean(b2, axis=0)
        for j, fr in enumerate(flat_refs):
          dots[j] = dots[j] + b @ fr[path + ("bias",)]
        bias = flat_params[path + ("bias",)]
        if return_gradients:
          grads[path + ("bias",)] = b.astype(bias.dtype)
        if reduce_fn is not None:
          reduced[path + ("bias",)] = reduce_fn(b.astype(bias.dtype), bias)
      continue
    layer_params = {nm: flat_params[path + (nm,)] for nm in names}
    xs, layer_grads = _per_example_layer(module, layer_params, a)
    per = layer_grads(xs, b)
    for nm in names:
      g = per[nm]
      rows = g.reshape(n, -1)
      sq_norms = sq_norms + jnp.sum(jnp.square(rows), axis=1)
      second[path + (nm,)] = _sum_of_squares(g) / n
      for j, fr in enumerate(flat_refs):
        dots[j] = dots[j] + rows @ fr[path + (nm,)].reshape(-1)
      if return_gradients:
        grads[path + (nm,)] = g
      if reduce_fn is not None:
        reduced[path + (nm,)] = reduce_fn(g, flat_params[path + (nm,)])

  second_tree = _like_params(second, params, flat_params, param_paths)
  grads_tree = (_like_params(grads, params, flat_params, param_paths)
                if return_gradients else None)
  norm_dtype = jnp.result_type(*flat_params.values())
  sq_norms = sq_norms.astype(norm_dtype)
  dots = [d.astype(jnp.result_type(norm_dtype, *fr.values())) for d, fr in zip(dots, flat_refs)]
  reduced_tree = (jax.tree_util.tree_unflatten(outer_treedef, [reduced[p] for p in param_paths])
                  if reduce_fn is not None else None)
  return (values, wrap(mean), wrap(second_tree), sq_norms,
          wrap(grads_tree) if return_gradients else None, tuple(dots), reduced_tree)


def _like_params(values, params, flat_params, param_paths):
  """``values`` (dict path -> array) as a tree shaped like ``params``, each leaf in
  its parameter's dtype, as the vmap path gives them (its per-example gradients
  are): float64 inputs to a float32 model make the layer factors, and so the
  fast path's sums, float64."""
  return jax.tree_util.tree_unflatten(
      jax.tree_util.tree_structure(params),
      [values[p].astype(flat_params[p].dtype) for p in param_paths])


def _promote(a, b, kernel):
  """A Dense layer's factors ``a``, ``b`` in the dtype of ``a``, ``b`` and its kernel
  together: squares and products of, e.g., bfloat16 inputs of a float32 layer
  are formed in float32, as its per-example gradients ``a_n b_n'`` are."""
  dtype = jnp.result_type(a, b, kernel)
  return a.astype(dtype), b.astype(dtype)


def _per_example_layer(module, layer_params, a):
  """``(xs, grads)``: per-example layer gradients ``grads(xs[rows], b[rows])`` for
  output gradients ``b`` (leading axis: examples), ``{name: (n, *param shape)}``.

  `curvax.layers.PatchConv`: ``xs`` are the patches ``P`` of the layer's own
  call (`curvax.layers.patch_conv_operands`, the same operations, so under
  ``jit`` XLA builds them once for the forward pass and for this), and the
  kernel gradient of example ``n`` is ``P_n' B_n`` summed over the output
  positions, the bias gradient ``B_n`` summed over them: one batched matrix
  product. Recomputing the patches example by example (a ``vmap`` of the
  layer's VJP) copied the input ``prod(kernel_size)`` times more per call
  (3c3d, batch 128: ~50 ms of a ~200 ms training step on 2 CPU cores, and
  again for each of the ``K`` columns of a diagonal GGN). Other layers:
  ``xs = a`` and a ``vmap`` over examples of the layer's own VJP.
  """
  from curvax.layers import PatchConv, patch_conv_operands  # pylint: disable=g-import-not-at-top
  if type(module) is PatchConv:  # pylint: disable=unidiomatic-typecheck
    kernel, bias = layer_params["kernel"], layer_params.get("bias")
    patches, _, _ = patch_conv_operands(module, a, kernel, bias)

    def patch_grads(p, b):
      n = p.shape[0]
      p, b = p.reshape(n, -1, p.shape[-1]), b.reshape(n, -1, b.shape[-1])
      out = {"kernel": jnp.einsum("nsk,nso->nko", p, b).reshape(
          (n,) + kernel.shape).astype(kernel.dtype)}
      if bias is not None:
        out["bias"] = jnp.sum(b, axis=1).astype(bias.dtype)
      return out

    return patches, patch_grads

  def one(x_n, b_n):
    _, vjp = jax.vjp(lambda lp: module.apply({"params": lp}, x_n[None]), layer_params)
    return vjp(b_n[None])[0]

  return a, jax.vmap(one)


def _sum_of_squares(x: Array) -> Array:
  """``sum(x ** 2, axis=0)`` as a tree of elementwise adds of slices: XLA:CPU fuses
  them into one loop, where it runs a reduction over the leading axis of a
  ``(32, 864, 128)`` block at ~5 ns per entry (a YNNPACK reduce fusion)."""
  x = jnp.square(x)
  while x.shape[0] > 1:
    half = x.shape[0] // 2
    rest = x[2 * half:]
    x = x[:half] + x[half:2 * half]
    if rest.shape[0]:
      x = jnp.concatenate([x[:1] + rest, x[1:]]) if half > 1 else x + rest
  return x[0]


def layer_diag_ggn(apply_fn, params, inputs, factors, strict=False):
  r"""Fast-path ``diag G = (1/N) sum_{n,k} (J_n' s_{n,k})^2`` or None.

  The ``K`` factor columns ``S[..., k]`` are back-propagated through the batch
  (``vmap`` over ``k`` of one VJP w.r.t. the layer-output perturbations), giving
  per layer ``B_k`` (``N x out``). Dense on ``(N, in)`` inputs:
  ``diag = (A^2)' (sum_k B_k^2) / N`` (kernel), ``sum_{n,k} B_k^2 / N`` (bias),
  without forming the ``N K`` factor columns (thesis App. B.1.2, Eq. B.12);
  other layers form the columns of that layer only.
  """
  plan = _plan(apply_fn, params, inputs, strict, what="diag GGN")
  if plan is None:
    return None
  apply_fn, params, wrap, layers, param_paths = plan
  perturbations = {key: jnp.zeros(shape, dtype) for key, _, _, shape, dtype in layers}

  def forward(perts):
    outputs, records, _ = _forward(apply_fn, params, inputs, perts)
    return outputs, {r[0]: r[3] for r in records}

  _, vjp, acts = jax.vjp(forward, perturbations, has_aux=True)
  out_grads = jax.vmap(lambda s: vjp(s)[0], in_axes=-1)(factors)  # leading K
  n = factors.shape[0]
  flat_params = {_key_tuple(p): leaf for p, leaf in jax.tree_util.tree_leaves_with_path(params)}
  diag: Dict[Tuple[str, ...], Array] = {}
  for key, path, module, _, _ in layers:
    a, b = acts[key], out_grads[key]  # b: (K, N, ...)
    names = [nm for nm in ("kernel", "bias") if path + (nm,) in flat_params]
    if a.ndim == 2 and b.ndim == 3 and type(module).__name__ == "Dense":
      a, b = _promote(a, b, flat_params[path + ("kernel",)])
      b2 = jnp.sum(jnp.square(b), axis=0)  # (N, out)
      diag[path + ("kernel",)] = jnp.square(a).T @ b2 / n
      if "bias" in names:
        diag[path + ("bias",)] = jnp.sum(b2, axis=0) / n
      continue
    layer_params = {nm: flat_params[path + (nm,)] for nm in names}
    xs, layer_grads = _per_example_layer(module, layer_params, a)

    # The N K columns of this layer, formed column k by column k (a scan over
    # B's leading axis, so every block is contiguous in B's (K, N, ...) layout and
    # the batched products need no transposed copy of B) and a block of examples
    # at a time, squared and summed as they are formed: all at once they are
    # N K x layer size (566 MB for 3c3d's third conv at batch 128).
    size = sum(flat_params[path + (nm,)].size for nm in names)
    chunk = max(1, min(n, 32, DIAG_BLOCK_ELEMENTS // max(size, 1)))

    def block(chunk_xs, layer_grads=layer_grads, names=names):
      cols = layer_grads(*chunk_xs)
      return {nm: _sum_of_squares(cols[nm]) for nm in names}

    def column(total, b_k, block=block, xs=xs, chunk=chunk):
      return otu.tree_add(total, _chunking.sum_chunks(block, (xs, b_k), chunk)), None

    init = {nm: jnp.zeros_like(flat_params[path + (nm,)]) for nm in names}
    sums, _ = jax.lax.scan(column, init, b)
    for nm in names:
      diag[path + (nm,)] = sums[nm] / n
  return wrap(_like_params(diag, params, flat_params, param_paths))
