"""Every transform's state can be donated to ``jax.jit`` with the parameters.

``jax.jit(step, donate_argnums=(0, 1))`` over ``(params, opt_state)`` lets XLA
update both in place; it fails ("Attempt to donate the same buffer twice") if
two leaves share a buffer, and deletes any state leaf that IS a parameter array.
"""

from __future__ import annotations

import functools
import re

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

import curvax
from curvax import diagnostics as dg
from curvax._buffers import ordered_after, own_buffers

import reference as ref

LOSS = curvax.losses.softmax_cross_entropy


def _apply(params, x):
  return jnp.tanh(x @ params["w1"] + params["b1"]) @ params["w2"]


def _problem():
  k1, k2, k3 = jax.random.split(jax.random.PRNGKey(0), 3)
  params = {"w1": 0.5 * jax.random.normal(k1, (3, 4)), "b1": jnp.zeros((4,)),
            "w2": 0.5 * jax.random.normal(k2, (4, 3))}
  keys = jax.random.split(k3, 8)
  batches = [(jax.random.normal(keys[2 * i], (8, 3)),
              jax.random.randint(keys[2 * i + 1], (8,), 0, 3)) for i in range(4)]
  return params, batches


_OBJ = curvax.losses.objective(_apply, LOSS)
T = curvax.transforms

TRANSFORMS = {
    "hessian_free": lambda: T.hessian_free(_apply, LOSS),
    "probabilistic_preconditioning": lambda: T.probabilistic_preconditioning(
        _OBJ, prior_iterations=2, num_observations=2, restart_every=6),
    "probabilistic_preconditioning_momentum": lambda: T.probabilistic_preconditioning(
        _OBJ, inner=optax.trace(0.9), prior_iterations=2, num_observations=2),
    "curvature_step_size": lambda: T.curvature_step_size(optax.sgd(0.1), _apply, LOSS),
    "curvature_step_size_interval": lambda: T.curvature_step_size(
        optax.nadamw(0.01), _apply, LOSS, mode="interval", warmup_steps=1, interval=3,
        num_estimates=2),
    "monitor_economy": lambda: dg.monitor(optax.sgd(0.1), _apply, LOSS, "economy", every=2),
    "monitor_full": lambda: dg.monitor(optax.sgd(0.1), _apply, LOSS, "full", every=2),
}


def _train_step(tx, params, state, batch, eval_batch):
  grads = jax.grad(_OBJ)(params, batch)
  updates, state = tx.update(grads, state, params, batch=batch, eval_batch=eval_batch)
  return optax.apply_updates(params, updates), state


def _step(tx, donate):
  return jax.jit(functools.partial(_train_step, tx),
                 donate_argnums=(0, 1) if donate else ())


def _buffers(tree):
  return [x.unsafe_buffer_pointer() for x in jax.tree_util.tree_leaves(tree)
          if isinstance(x, jax.Array)]


@pytest.mark.parametrize("name", sorted(TRANSFORMS))
def test_init_state_shares_no_buffer_with_itself_or_the_params(name):
  params, _ = _problem()
  pointers = _buffers((params, TRANSFORMS[name]().init(params)))
  assert len(pointers) == len(set(pointers))


@pytest.mark.parametrize("name", sorted(TRANSFORMS))
def test_donated_steps_match_plain_steps(name):
  params, batches = _problem()
  tx = TRANSFORMS[name]()
  plain, donated = _step(tx, False), _step(tx, True)
  p_ref, s_ref = params, tx.init(params)
  p, s = jax.tree_util.tree_map(jnp.copy, params), tx.init(params)
  for t in range(6):
    batch, eval_batch = batches[t % 4], batches[(t + 1) % 4]
    p_ref, s_ref = plain(p_ref, s_ref, batch, eval_batch)
    p, s = donated(p, s, batch, eval_batch)
  jax.tree_util.tree_map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-12, atol=0),
                         (p, s), (p_ref, s_ref))
  # The donated run really moved the parameters (the step is not a no-op).
  assert any(not np.allclose(a, b) for a, b in zip(jax.tree_util.tree_leaves(p),
                                                     jax.tree_util.tree_leaves(params)))


def test_own_buffers_copies_shared_and_aliased_leaves():
  x = jnp.arange(3.0)
  tree = {"a": x, "b": x, "c": 1.5}
  out = own_buffers(tree)
  assert out["c"] == 1.5
  pointers = _buffers((x, out))
  assert len(set(pointers)) == 3
  np.testing.assert_array_equal(out["a"], x)
  np.testing.assert_array_equal(out["b"], x)


@pytest.mark.parametrize("value", [jnp.asarray(2.5), jnp.asarray([jnp.nan, 1.0]),
                                   jnp.asarray(jnp.inf), jnp.arange(3, dtype=jnp.int32)])
def test_ordered_after_returns_the_tree_bit_for_bit_and_depends_on_the_values(value):
  tree = {"a": jnp.asarray([1.5, -0.0, jnp.inf, -jnp.inf, jnp.nan]), "b": jnp.ones((2, 2))}
  out = jax.jit(ordered_after)(tree, value)
  for x, y in zip(jax.tree_util.tree_leaves(out), jax.tree_util.tree_leaves(tree)):
    np.testing.assert_array_equal(np.asarray(x).view(np.uint64 if x.dtype == np.float64
                                                     else np.uint32),
                                  np.asarray(y).view(np.uint64 if y.dtype == np.float64
                                                     else np.uint32))
  # The values feed the computation (a dependency XLA cannot drop), not just pass by.
  # Dead-code elimination keeps every equation some output needs: the value
  # must survive it (reading it into an unused temporary would not).
  from jax.interpreters import partial_eval as pe  # pylint: disable=import-outside-toplevel
  jaxpr = jax.make_jaxpr(ordered_after)(tree, value).jaxpr
  _, used_inputs = pe.dce_jaxpr(jaxpr, [True] * len(jaxpr.outvars))
  assert used_inputs[-1], "the output does not depend on `values`"


@pytest.mark.parametrize("name", sorted(TRANSFORMS))
def test_steps_inside_one_jitted_loop_match_steps_called_one_by_one(name):
  # docs/performance.md advises running several steps per call (fori_loop over a
  # stack of batches) when the host's time per call exceeds the device's step.
  params, batches = _problem()
  tx = TRANSFORMS[name]()
  plain = _step(tx, False)
  xs = jnp.stack([b[0] for b in batches])
  ys = jnp.stack([b[1] for b in batches])
  num_steps = 6

  def body(t, carry):
    return _train_step(tx, *carry, (xs[t % 4], ys[t % 4]), (xs[(t + 1) % 4], ys[(t + 1) % 4]))

  many = jax.jit(lambda p, s: jax.lax.fori_loop(0, num_steps, body, (p, s)),
                 donate_argnums=(0, 1))
  p, s = many(jax.tree_util.tree_map(jnp.copy, params), tx.init(params))
  p_ref, s_ref = params, tx.init(params)
  for t in range(num_steps):
    p_ref, s_ref = plain(p_ref, s_ref, batches[t % 4], batches[(t + 1) % 4])
  jax.tree_util.tree_map(
      lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-6), (p, s), (p_ref, s_ref))
  assert any(not np.allclose(a, b) for a, b in zip(jax.tree_util.tree_leaves(p),
                                                     jax.tree_util.tree_leaves(params)))


def _copied_parameters(step, params, state):
  """Names of the donated step's parameter leaves that its program copies (ENTRY)."""
  text = jax.jit(step, donate_argnums=(0, 1)).lower(params, state).compile().as_text()
  entry = text[text.index("\nENTRY"):]
  n = len(jax.tree_util.tree_leaves(params))   # the params come first among the arguments
  names = {m.group(1) for m in re.finditer(r"%([\w.\-]+) = [^=]*? parameter\((\d+)\)", entry)
           if int(m.group(2)) < n}
  return names & set(re.findall(r"copy\(%([\w.\-]+)\)", entry))


@pytest.mark.parametrize("preset", ["economy", "business"])
def test_monitor_tracking_every_step_copies_no_parameter(preset):
  # The instruments read params; `ordered_after` makes the update wait for
  # each of them, so XLA updates params in place instead of copying them first
  # (a plain optax step does copy the kernels its backward pass reads: the
  # check can fail). Packing the records must not hide their dependencies.
  apply_fn, loss, params, batch = ref.problem("mlp", n=6)
  obj = curvax.losses.objective(apply_fn, loss)

  def stepper(tx, **kw):
    def step(p, s):
      u, s = tx.update(jax.grad(obj)(p, batch), s, p, **kw)
      return optax.apply_updates(p, u), s
    return step

  sgd = optax.sgd(0.1)
  assert _copied_parameters(stepper(sgd), params, sgd.init(params))
  tx = dg.monitor(sgd, apply_fn, loss, preset, every=1)
  assert not _copied_parameters(stepper(tx, batch=batch), params, tx.init(params))
