"""The `Loss` interface: a per-example loss that knows its output Hessian.

A curvax loss is a function ``loss(outputs, targets) -> values`` of the model's
outputs ``f_n`` (leading batch axis ``N``) that returns the per-example values
``l(f_n, y_n)``, shape ``(N,)``, summed over the output dimensions. Besides the
value it provides, per example and with respect to the outputs:

* the gradient ``grad_f l(f_n, y_n)``;
* the Hessian-vector product ``H_n u_n`` with ``H_n = hess_f l(f_n, y_n)``;
* a square root ``S_n`` with ``S_n S_n' = H_n`` (exact), and a Monte-Carlo one
  ``S~_n`` with ``E[S~_n S~_n'] = H_n`` (Dangel, thesis, Ex. 5.1-5.2, Eqs. 5.9,
  B.13-B.15).

These are what the generalised Gauss-Newton ``G = (1/N) sum_n J_n' H_n J_n``
(Schraudolph 2002; Martens 2010) needs: curvax never forms ``H_n`` for a
product, it only applies it. curvax's losses are convex in the outputs, so
``H_n`` is positive semi-definite and all methods refer to it; for a plain
callable (`AutodiffLoss`) see there for a loss that is not convex.

Conventions for square roots: ``sqrt_hessian`` returns an array of shape
``outputs.shape + (K,)``: column ``k`` of example ``n`` is ``S_n[..., k]``, laid
out like ``f_n``. ``sqrt_hessian_sampled`` returns ``outputs.shape + (M,)`` for
``M`` samples, already scaled by ``1/sqrt(M)``.
"""

from __future__ import annotations

import abc
import dataclasses
from typing import Any, Callable

import jax
import jax.numpy as jnp

from curvax import _checks

Array = jax.Array


class Loss(abc.ABC):
  """Abstract per-example loss with known derivatives w.r.t. the outputs."""

  @abc.abstractmethod
  def __call__(self, outputs: Array, targets: Array) -> Array:
    """Per-example loss values, shape ``(N,)``."""

  @abc.abstractmethod
  def grad(self, outputs: Array, targets: Array) -> Array:
    """Per-example gradient w.r.t. the outputs, shaped like ``outputs``."""

  @abc.abstractmethod
  def hvp(self, outputs: Array, targets: Array, tangents: Array) -> Array:
    """Per-example ``H_n u_n``, shaped like ``outputs`` (``tangents`` too)."""

  @abc.abstractmethod
  def sqrt_hessian(self, outputs: Array, targets: Array) -> Array:
    """Exact symmetric factor ``S_n`` (``S_n S_n' = H_n``): ``outputs.shape + (K,)``."""

  @abc.abstractmethod
  def sqrt_hessian_sampled(self, key: Array, outputs: Array, targets: Array,
                           num_samples: int = 1) -> Array:
    """Monte-Carlo factor with ``E[S~ S~'] = H_n``: ``outputs.shape + (M,)``."""

  def check_targets(self, outputs: Array, targets: Any) -> None:
    """Raises ValueError if ``targets`` cannot go with ``outputs``.

    ``targets`` may be an array or a pytree of arrays (e.g. a dict); every leaf
    must have the outputs' leading batch size. Shapes only: free under ``jit``.
    """
    n_targets = _checks._leading_dims(targets, f"{self.name}: targets")  # pylint: disable=protected-access
    if jnp.shape(outputs)[:1] != (n_targets,):
      raise ValueError(
          f"{self.name}: outputs and targets disagree on the batch size: "
          f"outputs of shape {jnp.shape(outputs)}, targets with leading size "
          f"{n_targets}.")

  @property
  def name(self) -> str:
    return type(self).__name__

  def hessian(self, outputs: Array, targets: Array) -> Array:
    """Dense per-example ``S_n S_n'``, shape ``(N, C, C)`` with ``C = prod(outputs.shape[1:])``.

    The output Hessian ``hess_f l(f_n, y_n)`` for a loss convex in the outputs
    (all of curvax's); for a plain callable that is not, its projection
    ``[H_n]_+`` on the positive semi-definite cone (see `AutodiffLoss`). Meant
    for tests and small output dimensions.
    """
    s = self.sqrt_hessian(outputs, targets)
    n = s.shape[0]
    s = s.reshape(n, -1, s.shape[-1])
    return jnp.einsum("nck,ndk->ncd", s, s)


def _flatten_outputs(x: Array) -> Array:
  return x.reshape(x.shape[0], -1)


@dataclasses.dataclass(frozen=True)
class AutodiffLoss(Loss):
  """Wraps a plain callable ``fn(outputs, targets) -> (N,)`` as a `Loss`.

  Gradient and Hessian-vector products come from autodiff of the per-example
  loss: ``hvp`` is forward-over-reverse, ``O(C)`` per example with ``C =
  prod(outputs.shape[1:])`` (no ``C x C`` matrix: a VAE's 800 outputs cost one
  more pass, not 800). The square roots need the ``C x C`` output Hessian
  ``H_n = Q diag(lam) Q'`` (``C`` autodiff products and an eigendecomposition,
  ``O(C^3)`` per example): ``S_n = Q diag(sqrt(max(lam, 0))) Q'``, and the
  sampled factor is ``S_n eps / sqrt(M)`` with ``eps ~ N(0, I)``.

  For a loss convex in the outputs (cross-entropies, squared errors, the VAE's
  reconstruction + KL) ``S_n S_n' = H_n``, and every method refers to the same
  matrix. For one that is not, ``S_n S_n' = [H_n]_+``, the projection on the
  positive semi-definite cone, while ``hvp`` applies ``H_n`` itself: then
  `ggn_matvec` and `quadratic_step_size` use the true, indefinite ``J'HJ``,
  and `diag_ggn`, `ggn_eigenpairs` and `hessian` its PSD counterpart ``J'[H]_+J``.
  (Projecting in ``hvp`` too would cost the ``O(C^3)`` factorisation on every
  product.) Subclass `Loss` to choose another convention or closed forms.

  ``fn`` must treat examples independently (it is evaluated one example at a
  time through ``vmap``). ``targets`` may be an array or a pytree of arrays
  with a leading batch axis.
  """

  fn: Callable[[Array, Array], Array]

  @property
  def name(self) -> str:
    return getattr(self.fn, "__name__", "AutodiffLoss")

  def _single(self, o: Array, t: Any) -> Array:
    value = self.fn(o[None], jax.tree_util.tree_map(lambda a: a[None], t))
    if jnp.shape(value) != (1,):
      raise ValueError(
          f"loss `{self.name}` must return per-example values of shape (N,); "
          f"for one example it returned shape {jnp.shape(value)}.")
    return value[0]

  def __call__(self, outputs: Array, targets: Array) -> Array:
    values = self.fn(outputs, targets)
    if jnp.shape(values) != jnp.shape(outputs)[:1]:
      raise ValueError(
          f"loss `{self.name}` must return per-example values of shape "
          f"{jnp.shape(outputs)[:1]}; got {jnp.shape(values)}.")
    return values

  def grad(self, outputs, targets):
    return jax.vmap(jax.grad(self._single))(outputs, targets)

  def _sqrt_flat(self, outputs, targets):
    """Per-example ``S_n`` (``S_n S_n' = [H_n]_+``) on flattened outputs: ``(N, C, C)``."""
    def one(o, t):
      shape = o.shape
      h = jax.hessian(lambda z: self._single(z.reshape(shape), t))(o.reshape(-1))
      lam, q = jnp.linalg.eigh(0.5 * (h + h.T))
      return (q * jnp.sqrt(jnp.maximum(lam, 0.0))) @ q.T
    return jax.vmap(one)(outputs, targets)

  def hvp(self, outputs, targets, tangents):
    """``H_n u_n`` by forward-over-reverse autodiff: ``O(C)``, no ``C x C`` matrix."""
    def one(o, t, u):
      return jax.jvp(lambda o_: jax.grad(self._single)(o_, t), (o,), (u,))[1]
    return jax.vmap(one)(outputs, targets, tangents)

  def sqrt_hessian(self, outputs, targets):
    s = self._sqrt_flat(outputs, targets)
    return s.reshape(outputs.shape + (s.shape[-1],))

  def sqrt_hessian_sampled(self, key, outputs, targets, num_samples=1):
    s = self._sqrt_flat(outputs, targets)
    eps = jax.random.normal(key, s.shape[:2] + (num_samples,), s.dtype)
    out = jnp.einsum("nck,nkm->ncm", s, eps) / jnp.sqrt(num_samples)
    return out.reshape(outputs.shape + (num_samples,))


def as_loss(loss: Any) -> Loss:
  """Returns ``loss`` as a `Loss`; plain callables get the autodiff fallback.

  Raises:
    TypeError: if ``loss`` is neither a `Loss` nor callable.
  """
  if isinstance(loss, Loss):
    return loss
  if callable(loss):
    return AutodiffLoss(loss)
  raise TypeError(
      "`loss` must be a curvax.losses.Loss (softmax_cross_entropy, "
      "sigmoid_binary_cross_entropy, mean_squared_error) or a callable "
      f"loss(outputs, targets) -> per-example values; got {type(loss).__name__}.")
