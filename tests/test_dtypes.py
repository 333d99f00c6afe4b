"""Dtypes: strict promotion, and gradients in another dtype than the parameters.

Every transform runs under ``jax_numpy_dtype_promotion='strict'``.

Strict promotion refuses implicit mixes (a Python float times an int32 array,
int32 against int64 indices under x64, float64 with float32): a library used
by code that turns it on must spell every cast out. The tests run with x64
(conftest), so the float32 problem also checks int64 against int32 indices.
"""

import warnings

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

import curvax


def _apply(p, x):
  return jnp.tanh(x @ p["w"]) @ p["v"]


_LOSS = curvax.losses.softmax_cross_entropy
_OBJECTIVE = curvax.losses.objective(_apply, _LOSS)

TRANSFORMS = {
    "hessian_free": lambda: curvax.transforms.hessian_free(_apply, _LOSS, cg_max_iter=5),
    "hessian_free_fisher": lambda: curvax.transforms.hessian_free(
        _apply, _LOSS, cg_max_iter=5, preconditioner="fisher", microbatch_size=4),
    "probabilistic_preconditioning": lambda: curvax.transforms.probabilistic_preconditioning(
        _OBJECTIVE, prior_iterations=2, num_observations=2, restart_every=6),
    "curvature_step_size": lambda: curvax.transforms.curvature_step_size(
        optax.sgd(0.1), _apply, _LOSS, learning_rate=0.1, mode="interval", interval=3,
        num_estimates=2, clip=(0.0, 1.0)),
    "monitor_full": lambda: curvax.diagnostics.monitor(optax.sgd(0.1), _apply, _LOSS, "full",
                                                       every=2),
}


@pytest.mark.parametrize("dtype", [jnp.float32, jnp.float64])
@pytest.mark.parametrize("name", list(TRANSFORMS))
def test_transform_runs_under_strict_promotion(name, dtype):
  k = jax.random.split(jax.random.PRNGKey(0), 3)
  params = {"w": 0.5 * jax.random.normal(k[0], (4, 8), dtype),
            "v": 0.5 * jax.random.normal(k[1], (8, 3), dtype)}
  batch = (jax.random.normal(k[2], (8, 4), dtype), jnp.arange(8) % 3)
  with jax.numpy_dtype_promotion("strict"):
    tx = TRANSFORMS[name]()
    state = tx.init(params)
    step = jax.jit(lambda p, s: tx.update(jax.grad(_OBJECTIVE)(p, batch), s, p, batch=batch,
                                          eval_batch=batch))
    for _ in range(7):     # through every phase / schedule branch
      updates, state = step(params, state)
      params = optax.apply_updates(params, updates)
  for leaf in jax.tree.leaves(params):
    assert leaf.dtype == dtype and np.all(np.isfinite(leaf))


@pytest.mark.parametrize("param_dtype, grad_dtype", [
    (jnp.bfloat16, jnp.float32), (jnp.float32, jnp.bfloat16), (jnp.float64, jnp.float32),
    (jnp.float32, jnp.float64)])
@pytest.mark.parametrize("name", ["hessian_free", "probabilistic_preconditioning"])
def test_a_gradient_in_another_dtype_is_taken_in_the_parameters_dtype(name, param_dtype,
                                                                     grad_dtype):
  # The transform works in the parameters' dtypes: a gradient of another dtype
  # gives the updates of the same gradient cast to them, to an ulp (it used to
  # raise, or warn of mixed scatter types).
  k = jax.random.split(jax.random.PRNGKey(0), 3)
  params = {"w": (0.5 * jax.random.normal(k[0], (4, 8))).astype(param_dtype),
            "v": (0.5 * jax.random.normal(k[1], (8, 3))).astype(param_dtype)}
  batch = (jax.random.normal(k[2], (8, 4)).astype(param_dtype), jnp.arange(8) % 3)
  grads = jax.grad(_OBJECTIVE)(params, batch)
  tx = TRANSFORMS[name]()
  step = jax.jit(lambda g, s: tx.update(g, s, params, batch=batch, eval_batch=batch))
  state_a = state_b = tx.init(params)
  other = jax.tree.map(lambda g: g.astype(grad_dtype), grads)
  cast = jax.tree.map(lambda g: g.astype(param_dtype), other)
  with warnings.catch_warnings():
    warnings.simplefilter("error")
    for _ in range(4):
      got, state_a = step(other, state_a)
      want, state_b = step(cast, state_b)
  # The same arithmetic; the two programs (the cast inside or outside) may fuse
  # and round differently by an ulp (seen with jax 0.6).
  eps = float(jnp.finfo(param_dtype).eps)
  for g, w in zip(jax.tree.leaves(got), jax.tree.leaves(want)):
    assert g.dtype == param_dtype
    np.testing.assert_allclose(np.asarray(g, np.float64), np.asarray(w, np.float64),
                               rtol=8 * eps, atol=8 * eps * float(np.max(np.abs(w))))
