"""The `Problem` record: model, loss, regulariser, data splits and evaluation.

A problem is DeepOBS's test problem (seed 001, Ch. 5 and App. A) in JAX form:

* ``init(key) -> variables``: Flax variables (``{'params': ...}``, plus
  ``'batch_stats'`` for batch-norm problems); reads no data.
* ``apply_fn(variables, inputs, *, train=False, rng=None) -> outputs``: the model.
  ``train=True`` activates dropout (rng stream ``rng``) and batch statistics.
  For batch-norm problems, variables without ``'batch_stats'`` (the trainable
  ``{'params': ...}`` alone, which is what the runner hands the optimizer)
  normalise with the batch's own statistics, i.e. the training-mode function
  whose gradient the runner follows; this is the function a curvature transform
  given ``problem.apply_fn`` sees (its per-example curvature is not defined).
  For the Flax problems ``apply_fn`` is a
  `curvax.curvature.flax_layers.LinenVariablesApply`: called without keywords
  on ``{'params': ...}`` it is the eval-mode model (the VAE's latent noise then
  from the fixed key ``PRNGKey(0)``; ``rng=`` draws other noise, as `evaluate`
  does), and per-example statistics
  and diagonal GGNs take the per-layer Dense/Conv fast path (results shaped
  ``{'params': ...}``); batch-norm problems refuse per-example quantities.
* ``loss``: the per-example `curvax.losses.Loss`; ``regularizer``: DeepOBS's
  ``(lambda / 2) sum ||W||^2`` over kernels only
  (`curvax.losses.l2_regularizer`), or None.
* ``loss_fn(params, batch)``: the batch-mean loss **plus the L2 term**
  (evaluation mode). Every loss `evaluate` and the runner report includes the
  L2 term too, as DeepOBS's PyTorch runner does.
* ``batches(split, key)``: ``(inputs, targets)`` device batches of
  ``batch_size``; ``'train'`` is shuffled with ``key`` (reproducibly) and drops
  the incomplete last batch, the other splits keep it. Data are read on first use
  and placed on the device once.
* ``evaluate(params, key=...) -> dict``: ``'{split}_loss'`` and, for
  classification, ``'{split}_accuracy'`` for ``train_eval``, ``valid`` and
  ``test``; ``key`` draws ``train_eval``'s augmentation and the VAE's noise.

Splits (DeepOBS 1.2): ``valid`` holds out the last ``valid_size`` training
examples (synthetic problems draw it with seed 44); ``train_eval`` is the first
``train_eval_size`` examples of the remaining training set. Like DeepOBS's,
``train_eval`` is evaluated on the training pipeline: with the training
preprocessing (CIFAR/SVHN's augmentation, drawn from `evaluate`'s ``key``) and
the model in evaluation mode (no dropout, batch norm on running statistics);
``valid`` and ``test`` are not augmented. One difference remains: DeepOBS's
``train_eval`` is a fresh random subset of the shuffled training stream at each
evaluation (TF: ``train_dataset.take(...)``), curvax's the same first
``train_eval_size`` examples every time.
"""

from __future__ import annotations

import dataclasses
import functools
from typing import Any, Callable, Dict, Iterator, Optional, Sequence, Tuple

import jax
import jax.numpy as jnp
import numpy as np

from curvax.losses import objective

SPLITS = ("train", "train_eval", "valid", "test")
EVAL_SPLITS = ("train_eval", "valid", "test")


def _identity_preprocess(inputs, targets, rng, train):
  del rng, train
  return inputs, targets


@dataclasses.dataclass(eq=False)
class Problem:
  """A DeepOBS-style test problem; build one with `curvax.problems.get`."""

  name: str
  init: Callable[[jax.Array], Any]
  apply_fn: Callable[..., jax.Array]
  loss: Any
  regularizer: Optional[Callable[[Any], jax.Array]]
  batch_size: int
  num_epochs: int
  has_accuracy: bool
  load_data: Callable[[], Dict[str, Tuple[np.ndarray, np.ndarray]]]
  preprocess: Callable[..., Tuple[jax.Array, jax.Array]] = _identity_preprocess
  weight_decay: Optional[float] = None
  has_bn: bool = False
  has_dropout: bool = False
  needs_rng: bool = False
  seed: int = 0
  metric: str = "test_accuracy"
  hessian: Optional[np.ndarray] = None
  minimum: Optional[Tuple[np.ndarray, float]] = None
  _data: Optional[Dict[str, Tuple[jax.Array, jax.Array]]] = dataclasses.field(
      default=None, repr=False)

  # -- objective ---------------------------------------------------------------
  @functools.cached_property
  def loss_fn(self) -> Callable[[Any, Any], jax.Array]:
    """``loss_fn(params, batch)``: batch-mean loss plus the L2 term (eval mode)."""
    return objective(self.apply_fn, self.loss, self.regularizer)

  def train_loss(self, params: Any, model_state: Any, batch: Any, rng: jax.Array
                 ) -> Tuple[jax.Array, Any]:
    """Training-mode objective (dropout on, batch statistics): ``(value, new_model_state)``."""
    inputs, targets = batch
    outputs, new_state = self.apply_train({**params, **model_state}, inputs, rng)
    value = jnp.mean(self.loss(outputs, targets))
    if self.regularizer is not None:
      value = value + self.regularizer(params)
    return value, new_state

  def apply_train(self, variables, inputs, rng):
    """``(outputs, new_model_state)`` in training mode; overridden for BN problems."""
    return self.apply_fn(variables, inputs, train=True, rng=rng), {}

  # -- data --------------------------------------------------------------------
  def data(self, split: str) -> Tuple[jax.Array, jax.Array]:
    """The raw (un-preprocessed) device arrays of ``split``, loaded on first use."""
    if split not in SPLITS:
      raise ValueError(f"unknown split '{split}'; use one of {SPLITS}.")
    if self._data is None:
      raw = self.load_data()
      self._data = {k: (jax.device_put(v[0]), jax.device_put(v[1])) for k, v in raw.items()}
    return self._data[split]

  def num_examples(self, split: str) -> int:
    return int(self.data(split)[1].shape[0])

  @functools.cached_property
  def _jit_preprocess(self):
    return jax.jit(self.preprocess, static_argnums=3)

  def batches(self, split: str, key: Optional[jax.Array] = None,
              batch_size: Optional[int] = None) -> Iterator[Tuple[jax.Array, jax.Array]]:
    """Yields preprocessed ``(inputs, targets)`` batches of ``split``.

    ``'train'``: a fresh permutation drawn from ``key`` (default: the problem's
    seed), incomplete last batch dropped, training-time augmentation; other
    splits in file order with the last partial batch.
    """
    x, y = self.data(split)
    n = int(y.shape[0])
    b = batch_size or self.batch_size
    train = split == "train"
    if key is None:
      key = jax.random.PRNGKey(self.seed)
    if train:
      key, sub = jax.random.split(key)
      order = jax.random.permutation(sub, n)
      stops = range(b, n + 1, b)
    else:
      order = jnp.arange(n)
      stops = list(range(b, n + 1, b)) + ([n] if n % b else [])
    start = 0
    for stop in stops:
      idx = order[start:stop]
      key, sub = jax.random.split(key)
      yield self._jit_preprocess(jnp.take(x, idx, axis=0), jnp.take(y, idx, axis=0), sub, train)
      start = stop

  # -- evaluation ----------------------------------------------------------------
  def _eval_sums(self, variables, x, y, key, chunk: int, augment: bool):
    """Mean loss (plus the L2 term) and accuracy over ``(x, y)``, in chunks.

    Chunk ``i`` is preprocessed with the first key of
    ``jax.random.split(jax.random.fold_in(key, i))``, with the training
    preprocessing (augmentation) if ``augment``; the model runs in eval mode,
    problems that draw noise there (``needs_rng``: the VAE's latent) with the
    second key as ``rng``.
    """
    n = y.shape[0]
    pad = (-n) % chunk
    mask = jnp.arange(n + pad) < n
    xp = jnp.concatenate([x, jnp.zeros((pad,) + x.shape[1:], x.dtype)]) if pad else x
    yp = jnp.concatenate([y, jnp.zeros((pad,) + y.shape[1:], y.dtype)]) if pad else y
    resh = lambda a: a.reshape((-1, chunk) + a.shape[1:])

    def body(carry, xs):
      i, xb, yb, mb = xs
      k_pre, k_model = jax.random.split(jax.random.fold_in(key, i))
      inputs, targets = self.preprocess(xb, yb, k_pre, augment)
      if self.needs_rng:   # fresh noise for every chunk, as DeepOBS per batch
        outputs = self.apply_fn(variables, inputs, train=False, rng=k_model)
      else:
        outputs = self.apply_fn(variables, inputs)
      losses = self.loss(outputs, targets)
      total_loss = carry[0] + jnp.sum(jnp.where(mb, losses, 0.0)).astype(carry[0].dtype)
      total_acc = carry[1]
      if self.has_accuracy:
        correct = jnp.argmax(outputs, axis=-1) == targets
        total_acc = total_acc + jnp.sum(jnp.where(mb, correct, False)).astype(carry[1].dtype)
      return (total_loss, total_acc), None

    zero = jnp.zeros((), jnp.float32)
    chunks = jnp.arange((n + pad) // chunk)
    (tl, ta), _ = jax.lax.scan(body, (zero, zero), (chunks, resh(xp), resh(yp), resh(mask)))
    reg = self.regularizer(variables) if self.regularizer is not None else 0.0
    return tl / n + reg, ta / n

  @functools.cached_property
  def _jit_eval(self):
    return jax.jit(self._eval_sums, static_argnums=(4, 5))

  def evaluate(self, params: Any, *, splits: Sequence[str] = EVAL_SPLITS,
               batch_size: Optional[int] = None, model_state: Any = None,
               max_examples: Optional[int] = None,
               key: Optional[jax.Array] = None) -> Dict[str, float]:
    """Loss (including the L2 term) and accuracy on each split, model in evaluation mode.

    The training splits (``train_eval``, ``train``) get the training
    preprocessing, i.e. DeepOBS's augmentation (see the splits above), the
    others none. ``key`` (default: ``PRNGKey(seed)``, so that repeated calls
    agree) draws it: split ``s`` uses ``fold_in(key, SPLITS.index(s))``, and
    its chunk ``i`` (of ``batch_size`` examples, default the problem's
    ``max(batch_size, 500)``) preprocesses with the first key of
    ``split(fold_in(split_key, i))``; problems that draw noise in evaluation
    mode (``needs_rng``: the VAE's latent, drawn by DeepOBS afresh for each
    batch) draw it with the second. Problems with neither give the same
    numbers for every key.
    ``max_examples`` evaluates only the first examples of each split (smoke runs).
    """
    variables = {**params, **(model_state or {})}
    if key is None:
      key = jax.random.PRNGKey(self.seed)
    out = {}
    for split in splits:
      x, y = self.data(split)
      if max_examples is not None:
        x, y = x[:max_examples], y[:max_examples]
      chunk = min(batch_size or max(self.batch_size, 500), int(y.shape[0]))
      split_key = jax.random.fold_in(key, SPLITS.index(split))
      loss, acc = self._jit_eval(variables, x, y, split_key, chunk,
                                 split in ("train", "train_eval"))
      out[f"{split}_loss"] = float(loss)
      if self.has_accuracy:
        out[f"{split}_accuracy"] = float(acc)
    return out

  def split_variables(self, variables: Any) -> Tuple[Any, Any]:
    """``(params, model_state)``: the trainable ``{'params': ...}`` and the rest."""
    params = {"params": variables["params"]}
    state = {k: v for k, v in variables.items() if k != "params"}
    return params, state
