"""Tests for curvax.transforms.hessian_free and micro-batched evaluation."""

import chex
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

import curvax
from curvax import solvers
import reference as ref

hessian_free = curvax.transforms.hessian_free
mse = curvax.losses.mean_squared_error


def linear_apply(params, x):
  return x @ params["w"] + params["b"]


def _linear_problem(n=20, seed=0):
  key = jax.random.PRNGKey(seed)
  k1, k2, k3 = jax.random.split(key, 3)
  x = jax.random.normal(k1, (n, 4))
  y = jax.random.normal(k2, (n, 2))
  params = {"w": 0.1 * jax.random.normal(k3, (4, 2)), "b": jnp.zeros(2)}
  return params, (x, y)


def _teacher_batches(n=32, seed=0):
  """Two disjoint batches from the same deterministic MLP teacher."""
  teacher = ref.mlp_params(jax.random.PRNGKey(100))
  params = ref.mlp_params(jax.random.PRNGKey(seed))
  kx1, kx2 = jax.random.split(jax.random.PRNGKey(seed + 1))
  x1 = jax.random.normal(kx1, (n, 4))
  x2 = jax.random.normal(kx2, (n, 4))
  return params, (x1, ref.mlp_apply(teacher, x1)), (x2, ref.mlp_apply(teacher, x2))


_TX = hessian_free(ref.mlp_apply, mse)
_UPDATE = jax.jit(_TX.update)  # shared by several tests: one compilation
_LOSS_FN = curvax.losses.objective(ref.mlp_apply, mse)


def _step_fn(tx, loss_fn):
  @jax.jit
  def step(params, state, batch, eval_batch):
    g = jax.grad(loss_fn)(params, batch)
    u, state = tx.update(g, state, params, batch=batch, eval_batch=eval_batch)
    return optax.apply_updates(params, u), state, u
  return step


@pytest.mark.parametrize("curvature", ["ggn", "hessian"])
def test_quadratic_reaches_minimiser_in_one_or_two_steps(curvature):
  params, batch = _linear_problem()
  x, y = batch
  xa = jnp.concatenate([x, jnp.ones((x.shape[0], 1))], axis=1)
  sol = jnp.linalg.lstsq(xa, y)[0]
  tx = hessian_free(linear_apply, mse, curvature=curvature, initial_damping=1e-6,
                    cg_tol=1e-12)
  loss_fn = curvax.losses.objective(linear_apply, mse)
  step = _step_fn(tx, loss_fn)
  state = tx.init(params)
  params, state, _ = step(params, state, batch, batch)
  params, state, _ = step(params, state, batch, batch)
  np.testing.assert_allclose(params["w"], sol[:4], atol=1e-6)
  np.testing.assert_allclose(params["b"], sol[4], atol=1e-6)
  assert float(state.alpha) == 1.0
  assert int(state.count) == 2


def test_matches_dense_damped_newton_step_with_and_without_preconditioner():
  apply_fn, loss, params, batch = ref.problem("mlp", "softmax_cross_entropy", n=8)
  g = jax.grad(curvax.losses.objective(apply_fn, loss))(params, batch)
  gd = ref.explicit_ggn(apply_fn, loss, params, batch)
  lam = 0.3
  expected = -jnp.linalg.solve(gd + lam * jnp.eye(gd.shape[0]), ref.flat(g))
  iters = []
  for pre in (None, "fisher"):
    tx = hessian_free(apply_fn, loss, initial_damping=lam, preconditioner=pre,
                      cg_tol=1e-12, martens_criterion=False, use_cg_backtracking=False,
                      use_linesearch=False, adapt_damping=False)
    _, state = jax.jit(tx.update)(g, tx.init(params), params, batch=batch, eval_batch=batch)
    np.testing.assert_allclose(ref.flat(state.warm_start), expected, rtol=1e-7, atol=1e-9)
    assert float(state.damping) == lam
    iters.append(int(state.cg_iterations))
  assert iters[1] != iters[0]  # the preconditioner changes the CG path


def test_eval_loss_falls_monotonically_on_least_squares_mlp():
  params, batch, eval_batch = _teacher_batches()
  tx = hessian_free(ref.mlp_apply, mse, cg_max_iter=50)
  loss_fn = curvax.losses.objective(ref.mlp_apply, mse)
  step = _step_fn(tx, loss_fn)
  state = tx.init(params)
  first = float(loss_fn(params, eval_batch))
  previous = first
  for _ in range(6):
    params, state, _ = step(params, state, batch, eval_batch)
    now = float(loss_fn(params, eval_batch))
    np.testing.assert_allclose(state.loss_before, previous, rtol=1e-12)
    np.testing.assert_allclose(state.loss_after, now, rtol=1e-10)
    assert now <= previous
    previous = now
  assert previous < 0.5 * first
  assert not bool(state.nonfinite) and int(state.nonfinite_count) == 0
  assert float(state.damping) < 1.0  # the model was trusted: damping went down
  assert 0 < int(state.chosen_iteration) <= int(state.cg_iterations)


def test_jits_once_and_state_fields():
  params, batch, eval_batch = _teacher_batches(n=16)
  tx, loss_fn = _TX, _LOSS_FN

  @jax.jit
  @chex.assert_max_traces(n=1)
  def step(params, state, batch, eval_batch):
    g = jax.grad(loss_fn)(params, batch)
    u, state = tx.update(g, state, params, batch=batch, eval_batch=eval_batch)
    return optax.apply_updates(params, u), state

  state = tx.init(params)
  params, state = step(params, state, batch, eval_batch)
  params, state = step(params, state, eval_batch, batch)
  assert int(state.count) == 2
  for name in ("value", "grad"):
    assert name not in state._fields
  assert float(state.alpha) > 0 and np.isfinite(float(state.rho))
  assert 0 < int(state.cg_iterations) <= 250


def test_chain_inject_hyperparams_apply_if_finite_and_unknown_kwargs():
  params, batch, eval_batch = _teacher_batches(n=16)
  g = jax.grad(_LOSS_FN)(params, batch)
  kw = {}
  u_ref, _ = _UPDATE(g, _TX.init(params), params, batch=batch, eval_batch=eval_batch)

  chained = optax.chain(hessian_free(ref.mlp_apply, mse, **kw), optax.scale(0.5))
  u, _ = jax.jit(chained.update)(g, chained.init(params), params, batch=batch,
                                 eval_batch=eval_batch, some_unknown_kwarg=3)
  chex.assert_trees_all_close(u, jax.tree.map(lambda a: 0.5 * a, u_ref), rtol=1e-10)

  # Only the functions need to be static (cg_max_iter too, if passed).
  injected = optax.inject_hyperparams(
      hessian_free, static_args=("apply_fn", "loss"))(
          apply_fn=ref.mlp_apply, loss=mse, initial_damping=1.0, cg_decay_x0=0.95, **kw)
  guarded = optax.apply_if_finite(injected, 3)
  state = guarded.init(params)
  u, state = jax.jit(guarded.update)(g, state, params, batch=batch, eval_batch=eval_batch)
  chex.assert_trees_all_close(u, u_ref, rtol=1e-10)
  assert float(state.inner_state.hyperparams["initial_damping"]) == 1.0
  assert bool(state.last_finite)


def test_inject_hyperparams_with_static_args_and_a_regularizer():
  # inject_hyperparams binds every default, and takes any function it is not
  # told about for a schedule: STATIC_ARGS keeps the regularizer and the
  # buffer sizes static; the floats are injected.
  params, batch, eval_batch = _teacher_batches(n=16)
  reg = curvax.losses.l2_regularizer(1e-2)
  loss_fn = curvax.losses.objective(ref.mlp_apply, mse, reg)
  g = jax.grad(loss_fn)(params, batch)
  plain = hessian_free(ref.mlp_apply, mse, regularizer=reg, cg_max_iter=7)
  u_ref, _ = plain.update(g, plain.init(params), params, batch=batch, eval_batch=eval_batch)
  injected = optax.inject_hyperparams(hessian_free, static_args=hessian_free.STATIC_ARGS)(
      ref.mlp_apply, mse, regularizer=reg, cg_max_iter=7)
  state = injected.init(params)
  assert "cg_max_iter" not in state.hyperparams and "initial_damping" in state.hyperparams
  u, state = jax.jit(injected.update)(g, state, params, batch=batch, eval_batch=eval_batch)
  chex.assert_trees_all_close(u, u_ref, rtol=1e-10)
  # Without listing them: errors that say what to do.
  with pytest.raises(TypeError, match="`regularizer` must be a function.*static_args"):
    optax.inject_hyperparams(hessian_free, static_args=("apply_fn", "loss"))(
        ref.mlp_apply, mse, regularizer=reg).init(params)
  unlisted = optax.inject_hyperparams(hessian_free, static_args=("apply_fn", "loss"))(
      ref.mlp_apply, mse, cg_max_iter=7)
  with pytest.raises(TypeError, match="`cg_max_iter` must be a static Python int.*static_args"):
    jax.jit(unlisted.update)(g, unlisted.init(params), params, batch=batch,
                             eval_batch=eval_batch)


def test_value_fn_replaces_eval_batch():
  params, batch, eval_batch = _teacher_batches(n=16)
  g = jax.grad(_LOSS_FN)(params, batch)
  u1, s1 = _UPDATE(g, _TX.init(params), params, batch=batch, eval_batch=eval_batch)
  u2, s2 = jax.jit(lambda g, s, p, b: _TX.update(
      g, s, p, batch=b, value_fn=lambda q: _LOSS_FN(q, eval_batch)))(
          g, _TX.init(params), params, batch)
  chex.assert_trees_all_close(u1, u2, rtol=1e-10)
  np.testing.assert_allclose(s1.rho, s2.rho, rtol=1e-10)


def test_chain_with_optax_backtracking_linesearch():
  """hessian_free(use_linesearch=False) proposes; optax's line search scales.

  optax calls value_fn with the keywords it names (and rejects the others), so
  value_fn names batch and eval_batch; hessian_free itself uses eval_batch.
  The result is hessian_free's step times optax's accepted step size, which
  satisfies optax's sufficient-decrease condition on value_fn.
  """
  params, batch, eval_batch = _teacher_batches(n=16)
  g = jax.grad(_LOSS_FN)(params, batch)
  hf = hessian_free(ref.mlp_apply, mse, use_linesearch=False)
  tx = optax.chain(hf, optax.scale_by_backtracking_linesearch(
      max_backtracking_steps=15, slope_rtol=1e-4))

  def value_fn(p, batch, eval_batch):
    del batch
    return _LOSS_FN(p, eval_batch)

  value = value_fn(params, batch, eval_batch)   # the line search's f(x_0)
  u, state = jax.jit(lambda g, s, p, v: tx.update(
      g, s, p, value=v, grad=g, value_fn=value_fn, batch=batch, eval_batch=eval_batch))(
          g, tx.init(params), params, value)
  p_hf, _ = jax.jit(lambda g, s, p: hf.update(g, s, p, batch=batch, eval_batch=eval_batch))(
      g, hf.init(params), params)
  lr = state[1].learning_rate
  assert 0 < float(lr) <= 1
  chex.assert_trees_all_close(u, jax.tree.map(lambda a: lr * a, p_hf), rtol=1e-8)
  new_value = value_fn(optax.apply_updates(params, u), batch, eval_batch)
  slope = optax.tree_utils.tree_vdot(u, g) / lr
  np.testing.assert_allclose(state[1].value, new_value, rtol=1e-12)
  assert float(new_value) <= float(value) + 1e-4 * float(lr * slope)


def test_clear_errors():
  params, batch, eval_batch = _teacher_batches(n=8)
  tx = _TX
  state = tx.init(params)
  g = params
  with pytest.raises(TypeError, match="`batch`"):
    tx.update(g, state, params, eval_batch=eval_batch)
  with pytest.raises(TypeError, match="`eval_batch`"):
    tx.update(g, state, params, batch=batch)
  with pytest.raises(TypeError, match="eval_batch"):
    tx.update(g, state, params, batch=batch, eval_batch={"x": eval_batch[0]})
  with pytest.raises(ValueError, match="batch"):
    tx.update(g, state, params, batch=(batch[0], batch[1][:3]), eval_batch=eval_batch)
  with pytest.raises(ValueError, match="updates"):
    tx.update({"w1": params["w1"]}, state, params, batch=batch, eval_batch=eval_batch)
  with pytest.raises(TypeError, match="params"):
    tx.update(g, state, None, batch=batch, eval_batch=eval_batch)
  with pytest.raises(ValueError, match="curvature"):
    hessian_free(ref.mlp_apply, mse, curvature="fisher")
  with pytest.raises(ValueError, match="preconditioner"):
    hessian_free(ref.mlp_apply, mse, preconditioner="jacobi")
  with pytest.raises(ValueError, match="microbatch_size"):
    hessian_free(ref.mlp_apply, mse, microbatch_size=3).update(
        g, state, params, batch=batch, eval_batch=eval_batch)
  with pytest.raises(TypeError, match="`eval_batch`.*or, instead, `value_fn`"):
    tx.update(g, state, params, batch=batch)
  # eval_batch is chunked too: the error names it.
  with pytest.raises(ValueError, match="microbatch_size=4 .* size of `eval_batch` \\(6"):
    hessian_free(ref.mlp_apply, mse, microbatch_size=4).update(
        g, state, params, batch=batch, eval_batch=jax.tree.map(lambda a: a[:6], eval_batch))
  # A state from other parameters.
  narrower = ref.mlp_params(jax.random.PRNGKey(0), d_hidden=3)
  with pytest.raises(ValueError, match="`state.warm_start` must be shaped like `params`"):
    tx.update(g, tx.init(narrower), params, batch=batch, eval_batch=eval_batch)


def test_fisher_preconditioner_with_pytree_inputs():
  # Inputs as a dict (accepted everywhere else): the per-example gradients of
  # the Fisher diagonal must slice every leaf.
  params, batch, eval_batch = _teacher_batches(n=8)
  g = jax.grad(_LOSS_FN)(params, batch)
  as_dict = lambda b: ({"x": b[0]}, b[1])  # noqa: E731
  kw = dict(preconditioner="fisher", cg_max_iter=5)
  tx = hessian_free(ref.mlp_apply, mse, **kw)
  tx_dict = hessian_free(lambda p, x: ref.mlp_apply(p, x["x"]), mse, **kw)
  u, s = tx.update(g, tx.init(params), params, batch=batch, eval_batch=eval_batch)
  u_dict, s_dict = tx_dict.update(g, tx_dict.init(params), params, batch=as_dict(batch),
                                  eval_batch=as_dict(eval_batch))
  chex.assert_trees_all_close(u_dict, u, rtol=1e-12)
  assert int(s_dict.cg_iterations) == int(s.cg_iterations)


@pytest.mark.parametrize("where", ["eval_targets", "grads", "batch_inputs"])
def test_nonfinite_values_never_reach_params(where):
  params, batch, eval_batch = _teacher_batches(n=16)
  g = jax.grad(_LOSS_FN)(params, batch)
  if where == "eval_targets":
    eval_batch = (eval_batch[0], eval_batch[1].at[0, 0].set(jnp.nan))
  elif where == "grads":
    g = dict(g)
    g["w1"] = g["w1"].at[0, 0].set(jnp.nan)
  else:
    batch = (batch[0].at[1, 2].set(jnp.nan), batch[1])
  state = _TX.init(params)._replace(damping=jnp.asarray(2.0))
  u, state = _UPDATE(g, state, params, batch=batch, eval_batch=eval_batch)
  for leaf in jax.tree_util.tree_leaves(u):
    np.testing.assert_array_equal(leaf, 0.0)
  assert bool(state.nonfinite) and int(state.nonfinite_count) == 1
  np.testing.assert_allclose(state.damping, 3.0)
  assert all(np.all(np.isfinite(l)) for l in jax.tree_util.tree_leaves(state.warm_start))
  assert float(state.alpha) == 0.0


# ----------------------------------------------------------------------------- micro-batching


def test_microbatch_mean_equals_unchunked():
  apply_fn, loss, params, batch = ref.problem("mlp", "softmax_cross_entropy", n=12)
  loss_fn = curvax.losses.objective(apply_fn, loss, curvax.losses.l2_regularizer(0.1))
  v = jax.tree.map(jnp.ones_like, params)
  vg = solvers.microbatched_value_and_grad(loss_fn, 4)(params, batch)
  chex.assert_trees_all_close(vg, jax.value_and_grad(loss_fn)(params, batch), rtol=1e-12)
  gv = solvers.microbatch_mean(
      lambda c: curvax.curvature.ggn_matvec(apply_fn, loss, params, c)(v), batch, 3)
  chex.assert_trees_all_close(
      gv, curvax.curvature.ggn_matvec(apply_fn, loss, params, batch)(v), rtol=1e-11)
  with pytest.raises(ValueError, match="divisor"):
    solvers.microbatch_mean(lambda c: loss_fn(params, c), batch, 5)


@pytest.mark.parametrize("curvature", [
    "ggn", pytest.param("hessian", marks=pytest.mark.slow)])
def test_microbatched_hessian_free_equals_unchunked(curvature):
  params, batch, eval_batch = _teacher_batches(n=16)
  reg = curvax.losses.l2_regularizer(1e-2)
  loss_fn = curvax.losses.objective(ref.mlp_apply, mse, reg)
  g = jax.grad(loss_fn)(params, batch)
  kw = dict(curvature=curvature, regularizer=reg, cg_max_iter=15,
            preconditioner="fisher")
  outs = []
  for m in (None, 4):
    tx = hessian_free(ref.mlp_apply, mse, microbatch_size=m, **kw)
    outs.append(jax.jit(tx.update)(g, tx.init(params), params, batch=batch,
                                   eval_batch=eval_batch))
  chex.assert_trees_all_close(outs[0][0], outs[1][0], rtol=1e-8, atol=1e-12)
  np.testing.assert_allclose(outs[0][1].rho, outs[1][1].rho, rtol=1e-8)
  assert int(outs[0][1].cg_iterations) == int(outs[1][1].cg_iterations)
