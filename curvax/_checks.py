"""Input validation shared by every layer of curvax.

All checks run at trace time on shapes and tree structures, so they cost nothing
inside a compiled step and report bad input with a message that names the problem.
"""

from __future__ import annotations

from typing import Any, Optional, Sequence, Tuple

import jax
import jax.numpy as jnp
import numpy as np

Batch = Tuple[Any, Any]


def check_batch(batch: Any, name: str = "batch") -> Batch:
  """Returns ``(inputs, targets)`` after checking that ``batch`` is such a pair.

  A batch is a tuple or list of two array-likes (or pytrees of arrays for the
  inputs) sharing a leading batch axis.

  Raises:
    TypeError: if ``batch`` is missing or is not an ``(inputs, targets)`` pair.
    ValueError: if the leading batch axes differ or the batch is empty.
  """
  if batch is None:
    raise TypeError(
        f"`{name}` is required: pass {name}=(inputs, targets), arrays with a "
        "leading batch axis.")
  if isinstance(batch, dict) or not isinstance(batch, (tuple, list)) or len(batch) != 2:
    raise TypeError(
        f"`{name}` must be a pair (inputs, targets) with a leading batch axis; "
        f"got {type(batch).__name__}"
        + (f" of length {len(batch)}" if isinstance(batch, (tuple, list)) else "")
        + ".")
  inputs, targets = batch
  n_in = _leading_dims(inputs, f"{name}[0] (inputs)")
  n_tg = _leading_dims(targets, f"{name}[1] (targets)")
  if n_in != n_tg:
    raise ValueError(
        f"`{name}`: inputs and targets must share the leading batch axis; got "
        f"{n_in} inputs and {n_tg} targets.")
  if n_in == 0:
    raise ValueError(f"`{name}` is empty (batch size 0).")
  return inputs, targets


def _leading_dims(tree: Any, what: str) -> int:
  leaves = jax.tree_util.tree_leaves(tree)
  if not leaves:
    raise TypeError(f"{what} holds no arrays.")
  sizes = set()
  for leaf in leaves:
    shape = jnp.shape(leaf)
    if len(shape) == 0:
      raise ValueError(f"{what} must have a leading batch axis; got a scalar.")
    sizes.add(shape[0])
  if len(sizes) != 1:
    raise ValueError(f"{what}: leaves disagree on the batch size: {sorted(sizes)}.")
  return sizes.pop()


def batch_size(batch: Batch) -> int:
  """Static size of the leading axis of a checked batch."""
  return jnp.shape(jax.tree_util.tree_leaves(batch[1])[0])[0]


def check_tree_like(tree: Any, reference: Any, name: str = "vector",
                    reference_name: str = "params") -> None:
  """Checks that ``tree`` has the structure and leaf shapes of ``reference``.

  Raises:
    ValueError: naming the first mismatch.
  """
  s_tree = jax.tree_util.tree_structure(tree)
  s_ref = jax.tree_util.tree_structure(reference)
  if s_tree != s_ref:
    raise ValueError(
        f"`{name}` must be a pytree shaped like `{reference_name}`; tree "
        f"structures differ:\n  {name}: {s_tree}\n  {reference_name}: {s_ref}")
  paths_ref = jax.tree_util.tree_leaves_with_path(reference)
  for (path, ref), leaf in zip(paths_ref, jax.tree_util.tree_leaves(tree)):
    if jnp.shape(leaf) != jnp.shape(ref):
      raise ValueError(
          f"`{name}` must be shaped like `{reference_name}`: at "
          f"{jax.tree_util.keystr(path)} got shape {jnp.shape(leaf)}, expected "
          f"{jnp.shape(ref)}.")


def require_kwarg(value: Any, name: str, transform: str) -> Any:
  """Raises a TypeError naming a missing required extra argument of ``update``."""
  if value is None:
    raise TypeError(
        f"{transform}.update needs the keyword argument `{name}`: call "
        f"update(grads, state, params, {name}=(inputs, targets)). (Flax's "
        "TrainState.apply_gradients does not pass keywords on to tx.update: call "
        "state.tx.update yourself; nnx.Optimizer.update does pass them.)")
  return value


def require_callable(value: Any, name: str, transform: str,
                     static_args: Sequence[str]) -> Any:
  """``value`` if callable, else a TypeError (optax.inject_hyperparams turns a
  function argument not listed in ``static_args`` into a schedule and passes
  the constructor its value, a number)."""
  if not callable(value):
    raise TypeError(
        f"{transform}: `{name}` must be a function; got {type(value).__name__}. "
        f"With optax.inject_hyperparams, list it in static_args (which would "
        f"otherwise treat it as a schedule), e.g. static_args={tuple(static_args)}.")
  return value


def check_params(params: Any, transform: str) -> None:
  """Raises if ``params`` cannot be the transform's parameters.

  * ``optax.MaskedNode`` placeholders: ``optax.masked`` and
    ``optax.multi_transform`` pass their inner transformation the parameters
    with the other leaves replaced by ``MaskedNode``; a curvature transform
    runs the model on ``params`` and cannot do without them.
  * Leaves of integer or boolean dtype (a step counter, a mask): a curvature
    transform differentiates the model with respect to every leaf of
    ``params``, which needs floating dtypes (JAX's tangents of an integer are
    ``float0``, and the failure would surface deep inside ``jvp``).
  """
  import optax  # pylint: disable=import-outside-toplevel
  is_masked = lambda x: isinstance(x, optax.MaskedNode)  # noqa: E731
  flat = jax.tree_util.tree_flatten_with_path(params, is_leaf=is_masked)[0]

  def listing(paths):
    return f"{', '.join(paths[:4])}{' ...' if len(paths) > 4 else ''}"

  masked = [jax.tree_util.keystr(path) for path, leaf in flat if is_masked(leaf)]
  if masked:
    raise TypeError(
        f"{transform}: params hold optax.MaskedNode at {listing(masked)}: the transform "
        "is inside optax.masked or optax.multi_transform, which hide those parameters "
        "from it, but it runs the model on params. To freeze parameters, give it an "
        "apply_fn over the trainable ones only, closing over the frozen ones "
        "(curvax.flax_utils.from_nnx(model, wrt=...) does this for NNX), and pass only "
        "the trainable ones as params.")
  discrete = [f"{jax.tree_util.keystr(path)} ({jnp.result_type(leaf)})"
              for path, leaf in flat
              if not jnp.issubdtype(jnp.result_type(leaf), jnp.inexact)]
  if discrete:
    raise TypeError(
        f"{transform}: params leaves {listing(discrete)} are not floating point; the "
        "transform differentiates the model with respect to every leaf of params. "
        "Keep integer or boolean state out of params: close over it in apply_fn "
        "(Linen: a collection other than 'params', which curvax.flax_utils.from_linen "
        "closes over; NNX: a Variable type other than nnx.Param, or "
        "from_nnx(model, wrt=...)).")


def static_flag(value: Any, name: str, transform: str) -> Optional[bool]:
  """``value`` as ``None`` or a Python bool, or a clear error.

  For ``update`` keywords that choose what is compiled (a traced value cannot:
  the caller passes it as a static argument of ``jax.jit``).
  """
  if value is None or isinstance(value, bool):
    return value
  if isinstance(value, jax.core.Tracer):
    raise TypeError(
        f"{transform}.update: `{name}` must be a Python bool known when the step is "
        f"traced (it decides what is compiled); got a traced value. Pass it as a static "
        f"argument: jax.jit(step, static_argnames=({name!r},)).")
  if isinstance(value, np.bool_):
    return bool(value)
  raise TypeError(f"{transform}.update: `{name}` must be None or a bool; got {value!r}.")


def static_int(value: Any, name: str, transform: str, minimum: int,
               static_args: Sequence[str]) -> int:
  """``value`` as a Python int of at least ``minimum``, or a clear error.

  For constructor arguments that size arrays or unroll loops. Under
  ``optax.inject_hyperparams`` every int argument (defaults included) arrives
  as a traced array unless listed in ``static_args``: the error says so.
  """
  if isinstance(value, jax.core.Tracer):
    raise TypeError(
        f"{transform}: `{name}` must be a static Python int (it fixes array shapes); "
        f"got a traced value. With optax.inject_hyperparams, list it in static_args, "
        f"e.g. static_args={tuple(static_args)}.")
  if isinstance(value, bool):
    raise TypeError(f"{transform}: `{name}` must be an int; got {value!r}.")
  try:
    as_int = int(value)
  except (TypeError, ValueError):
    raise TypeError(f"{transform}: `{name}` must be an int; got {value!r}.") from None
  if as_int != value:
    raise TypeError(f"{transform}: `{name}` must be an int; got {value!r}.")
  if as_int < minimum:
    raise ValueError(f"{transform}: `{name}` must be >= {minimum}; got {as_int}.")
  return as_int


#: Leaves up to this size are checked for finiteness together (`_all_float_leaves`).
SMALL_LEAF = 4096


def tree_all_finite(tree: Any) -> jax.Array:
  """Whether every floating-point entry of ``tree`` is finite (a traced bool).

  The one non-finite guard of the transforms (an update with a non-finite entry
  is never applied). Integer leaves are always finite; an empty tree is finite.
  (``isfinite(sum(x * 0))`` per leaf, a single fused reduction, measured no
  faster inside a training step on XLA:CPU, so the plain form is kept.)
  """
  return _all_float_leaves(lambda x: jnp.all(jnp.isfinite(x)), tree)


def scaled_tree_all_finite(scale: jax.Array, tree: Any) -> jax.Array:
  """``tree_all_finite(scale * tree)``, without forming ``scale * tree``.

  ``|scale x_i|`` is largest at ``max_i |x_i|`` (rounding is monotone), so
  ``scale * max|x|``, computed in each leaf's dtype as the step would be, is
  finite exactly when every ``scale * x_i`` is (a NaN or infinity in ``x``
  makes the maximum non-finite; ``jnp.max`` propagates NaN). The maxima do not
  depend on ``scale``, so XLA can compute them with the other reductions of
  ``tree`` (a direction's dot products) instead of after ``scale`` is known:
  on a GPU each separate reduction is a kernel launch (docs/performance.md).
  """
  return _all_float_leaves(
      lambda x: jnp.isfinite(jnp.asarray(scale).astype(x.dtype)
                             * jnp.max(jnp.abs(x), initial=jnp.zeros((), x.dtype))), tree)


def _all_float_leaves(flag, tree: Any) -> jax.Array:
  """``flag(x)`` and-ed over the floating-point leaves of ``tree`` (True if none).

  ``flag`` is a reduction that ands over entries (the checks above), so the
  leaves of at most `SMALL_LEAF` entries of one dtype are flagged together, as
  one vector: on a GPU each reduction is a kernel launch, and a network's
  biases or a transform's per-leaf scalars would each cost one.
  """
  small, flags = {}, []
  for x in jax.tree_util.tree_leaves(tree):
    if not jnp.issubdtype(jnp.result_type(x), jnp.inexact):
      continue
    if jnp.size(x) <= SMALL_LEAF:
      small.setdefault(jnp.result_type(x), []).append(jnp.ravel(x))
    else:
      flags.append(flag(x))
  flags += [flag(parts[0] if len(parts) == 1 else jnp.concatenate(parts))
            for parts in small.values()]
  if not flags:
    return jnp.asarray(True)
  return jnp.all(jnp.stack(flags))
