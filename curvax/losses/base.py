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
product, it only applies it.

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

  def check_targets(self, outputs: Array, targets: Array) -> None:
    """Raises ValueError if ``targets`` cannot go with ``outputs``."""
    if jnp.shape(outputs)[:1] != jnp.shape(targets)[:1]:
      raise ValueError(
          f"{self.name}: outputs and targets disagree on the batch size: "
          f"{jnp.shape(outputs)} vs {jnp.shape(targets)}.")

  @property
  def name(self) -> str:
    return type(self).__name__

  def hessian(self, outputs: Array, targets: Array) -> Array:
    """Dense per-example Hessians ``(N, C, C)`` with ``C = prod(outputs.shape[1:])``.

    Meant for tests and small output dimensions: it is built from the exact
    square root as ``S_n S_n'``.
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
  loss; the exact square root from an eigendecomposition of the per-example
  Hessian ``H_n = Q diag(lam) Q'`` as ``S_n = Q diag(sqrt(max(lam, 0))) Q'``
  (exact for losses convex in the outputs; otherwise the projection of
  ``H_n`` on the positive semi-definite cone, which is what a GGN needs). The
  sampled factor is ``S_n eps / sqrt(M)`` with ``eps ~ N(0, I)``.

  ``fn`` must treat examples independently (it is evaluated one example at a
  time through ``vmap``).
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

  def hvp(self, outputs, targets, tangents):
    def one(o, t, u):
      return jax.jvp(lambda o_: jax.grad(self._single)(o_, t), (o,), (u,))[1]
    return jax.vmap(one)(outputs, targets, tangents)

  def _sqrt_flat(self, outputs, targets):
    def one(o, t):
      shape = o.shape
      h = jax.hessian(lambda z: self._single(z.reshape(shape), t))(o.reshape(-1))
      h = 0.5 * (h + h.T)
      lam, q = jnp.linalg.eigh(h)
      return (q * jnp.sqrt(jnp.maximum(lam, 0.0))) @ q.T
    return jax.vmap(one)(outputs, targets)  # (N, C, C)

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
