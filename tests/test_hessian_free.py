"""Tests for curvax.transforms.hessian_free and micro-batched evaluation."""

import functools

import chex
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from jax.flatten_util import ravel_pytree

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



@pytest.mark.parametrize("kwargs, match", [
    (dict(initial_damping=-1.0), "initial_damping must be >= 0"),
    (dict(initial_damping=float("nan")), "initial_damping must be >= 0"),
    # The damping update only multiplies: from 0 it could never grow.
    (dict(initial_damping=0.0, min_damping=0.0),
     "min_damping must be > 0 \\(0 < min_damping <= max_damping"),
    (dict(min_damping=np.float32(-1e-3)), "min_damping must be > 0"),
    (dict(min_damping=1.0, max_damping=0.1),
     "min_damping must not exceed max_damping \\(0 < min_damping <= max_damping"),
    (dict(max_damping=jnp.asarray(0.0)), "max_damping must be > 0"),
    (dict(cg_tol=-1e-6), "cg_tol must be >= 0"),
    (dict(linesearch_beta=1.0), "linesearch_beta must satisfy 0 < linesearch_beta < 1"),
    (dict(linesearch_c=-0.1), "linesearch_c must satisfy 0 < linesearch_c < 1"),
    (dict(linesearch_initial_step=0.0), "linesearch_initial_step must satisfy 0 <"),
    (dict(linesearch_max_reductions=-1), "linesearch_max_reductions must satisfy 0 <="),
    (dict(cg_decay_x0=1.5), "cg_decay_x0 must satisfy 0 <= cg_decay_x0 <= 1"),
    (dict(martens_eps=-1e-4), "martens_eps must satisfy 0 <="),
    (dict(preconditioner_exponent=-0.75), "preconditioner_exponent must satisfy 0 <="),
])
def test_rejects_bad_damping_bounds_and_cg_tol(kwargs, match):
  with pytest.raises(ValueError, match=match):
    hessian_free(ref.mlp_apply, mse, **kwargs)
  # inject_hyperparams passes the initial values to init as concrete arrays:
  # checked there; inside update they are traced and not checked (the
  # injected updates under jit in the tests above and below run that path).
  injected = optax.inject_hyperparams(hessian_free, static_args=hessian_free.STATIC_ARGS)
  with pytest.raises(ValueError, match=match):
    injected(ref.mlp_apply, mse, **kwargs).init(ref.mlp_params(jax.random.PRNGKey(0)))


def test_accepts_zero_initial_damping_and_boundary_values():
  params = ref.mlp_params(jax.random.PRNGKey(0))
  kw = dict(initial_damping=0.0, min_damping=0.5, max_damping=0.5, cg_tol=0.0,
            cg_decay_x0=0.0, martens_eps=0.0, linesearch_max_reductions=0)
  assert float(hessian_free(ref.mlp_apply, mse, **kw).init(params).damping) == 0.0
  injected = optax.inject_hyperparams(hessian_free, static_args=hessian_free.STATIC_ARGS)
  state = injected(ref.mlp_apply, mse, **kw).init(params)
  assert float(state.hyperparams["min_damping"]) == 0.5


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


@pytest.mark.parametrize("adapt_damping", [True, False])
@pytest.mark.parametrize("where", ["eval_targets", "grads", "batch_inputs"])
def test_nonfinite_values_never_reach_params(where, adapt_damping):
  """Zero update, finite warm start, counted; the damping rises by 3/2 only
  when it adapts (adapt_damping=False keeps it fixed)."""
  params, batch, eval_batch = _teacher_batches(n=16)
  g = jax.grad(_LOSS_FN)(params, batch)
  if where == "eval_targets":
    eval_batch = (eval_batch[0], eval_batch[1].at[0, 0].set(jnp.nan))
  elif where == "grads":
    g = dict(g)
    g["w1"] = g["w1"].at[0, 0].set(jnp.nan)
  else:
    batch = (batch[0].at[1, 2].set(jnp.nan), batch[1])
  tx = _TX if adapt_damping else hessian_free(ref.mlp_apply, mse, adapt_damping=False)
  update = _UPDATE if adapt_damping else jax.jit(tx.update)
  state = tx.init(params)._replace(damping=jnp.asarray(2.0))
  u, state = update(g, state, params, batch=batch, eval_batch=eval_batch)
  for leaf in jax.tree_util.tree_leaves(u):
    np.testing.assert_array_equal(leaf, 0.0)
  assert bool(state.nonfinite) and int(state.nonfinite_count) == 1
  np.testing.assert_allclose(state.damping, 3.0 if adapt_damping else 2.0)
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


# ----------------------------------------------------------------------------- one step vs numpy
#
# An independent reference for one whole step (spec, "One step k"): dense
# curvature matrices from jax.hessian / jax.jacfwd (tests/reference.py), and
# CG, the damping update, CG backtracking and the Armijo search written out in
# numpy, nothing taken from curvax.solvers. The update and every field of the
# new state are compared, from a state with a non-zero warm start.

# Only the status codes come from curvax.
_CG_MAX_ITER, _CG_MARTENS, _CG_RESIDUAL, _CG_NONPOSITIVE = (
    solvers.CGStatus.MAX_ITER, solvers.CGStatus.MARTENS, solvers.CGStatus.RESIDUAL,
    solvers.CGStatus.NONPOSITIVE_CURVATURE)


def _np_hessian_free_step(curv, g, eval_loss, damping, warm_start, *, cg_max_iter,
                          cg_decay_x0=0.95, cg_tol=1e-5, martens_eps=5e-4,
                          min_damping=1e-8, max_damping=1e8, linesearch_c=0.01,
                          linesearch_beta=0.8, linesearch_max_reductions=20,
                          linesearch_initial_step=1.0, adapt_damping=True,
                          use_cg_backtracking=True, use_linesearch=True,
                          nonpositive_curvature="stop", martens_criterion=True):
  """One Hessian-free step on flat vectors; ``eval_loss(d) = L_eval(theta + d)``."""
  a = curv + damping * np.eye(len(g))
  p_final, iterations, status, kept = ref.numpy_cg(
      a, -g, cg_decay_x0 * warm_start, max_iter=cg_max_iter, tol=cg_tol, eps=martens_eps,
      nonpositive_curvature=nonpositive_curvature, martens=martens_criterion)
  phi = 0.5 * p_final @ a @ p_final + g @ p_final
  # Levenberg-Marquardt with the damped model's prediction at the final iterate.
  loss_before = eval_loss(np.zeros_like(g))
  rho = (eval_loss(p_final) - loss_before) / phi if phi < 0 else -np.inf
  new_damping = damping * (1.5 if rho < 0.25 else 2 / 3 if rho > 0.75 else 1.0)
  new_damping = min(max(new_damping, min_damping), max_damping)
  if not adapt_damping:
    new_damping = damping
  # CG backtracking: step back while the earlier kept iterate is better.
  j = len(kept) - 1
  while use_cg_backtracking and j > 0 and eval_loss(kept[j - 1][1]) < eval_loss(kept[j][1]):
    j -= 1
  p = kept[j][1]
  # Armijo: alpha = a0, a0 beta, a0 beta^2, ... (at most max_reductions times), else 0.
  alpha = 0.0 if use_linesearch else 1.0
  for reductions in range(linesearch_max_reductions + 1 if use_linesearch else 0):
    trial = linesearch_initial_step * linesearch_beta ** reductions
    if eval_loss(trial * p) <= loss_before + linesearch_c * trial * (g @ p):
      alpha = trial
      break
  return dict(
      update=alpha * p, damping=new_damping, rho=rho, cg_iterations=iterations,
      cg_status=status, chosen_iterate=j, chosen_iteration=kept[j][0], alpha=alpha,
      loss_before=loss_before, loss_after=eval_loss(alpha * p), warm_start=p_final,
      num_kept=len(kept))


# Two compiled problems (the floats below are traced, so the cases share them):
# softmax regression with the GGN and least squares with the (indefinite)
# Hessian, both on a tiny MLP. Each case names what it pins down and the test
# checks that the reference shows it, so no case can silently become vacuous.
_STEP_PROBLEMS = {
    "ggn": dict(loss_name="softmax_cross_entropy", curvature="ggn", cg_max_iter=8),
    "hessian": dict(loss_name="mean_squared_error", curvature="hessian", cg_max_iter=250),
}
_STEP_DEFAULTS = dict(cg_decay_x0=0.95, min_damping=1e-8, linesearch_c=0.01,
                      linesearch_max_reductions=20)
_STEP_CASES = {
    # rho > 3/4 lowers the damping; backtracking steps back from the final iterate.
    "ggn_backtracks": dict(
        problem="ggn", seed=0, damping=1.0,
        expect=dict(backtracks=True, alpha=1.0, damping=2 / 3, status=_CG_RESIDUAL)),
    # rho < 0 raises the damping; Armijo must shrink the step.
    "ggn_armijo_shrinks": dict(
        problem="ggn", seed=1, damping=1.0, cg_decay_x0=0.5,
        expect=dict(alpha="shrinks", damping=1.5)),
    # No step size is accepted: no update, the warm start is still the final
    # CG iterate; the iteration budget ends CG.
    "ggn_armijo_fails": dict(
        problem="ggn", seed=1, damping=0.1,
        expect=dict(alpha=0.0, damping=0.15, status=_CG_MAX_ITER)),
    # rho > 3/4, the lowered damping is clamped to min_damping; c = 1/2 makes
    # Armijo shrink a step that backtracking chose.
    "ggn_clamped": dict(
        problem="ggn", seed=0, damping=0.3, min_damping=0.25, linesearch_c=0.5,
        expect=dict(backtracks=True, alpha="shrinks", damping=0.25)),
    # Martens' test ends CG, backtracking steps back.
    "hessian_martens": dict(
        problem="hessian", seed=2, damping=1.0,
        expect=dict(backtracks=True, alpha=1.0, status=_CG_MARTENS)),
    # Negative curvature ends CG; Armijo (c = 1/2) shrinks.
    "hessian_negative_curvature": dict(
        problem="hessian", seed=1, damping=0.3, linesearch_c=0.5, cg_decay_x0=0.8,
        expect=dict(alpha="shrinks", status=_CG_NONPOSITIVE)),
}


@functools.lru_cache(maxsize=None)
def _flat_step_tools(loss_name, curvature):
  """Jitted ``(loss, gradient, curvature matrix)`` of the flat MLP parameters
  ``w`` on a ``batch``, and ``unravel`` (flat vector to parameter pytree)."""
  loss = ref.LOSSES[loss_name]
  _, unravel = ravel_pytree(ref.mlp_params(jax.random.PRNGKey(0)))

  def flat_loss(w, batch):
    return jnp.mean(loss(ref.mlp_apply(unravel(w), batch[0]), batch[1]))

  if curvature == "ggn":
    def matrix(w, batch):
      return ref.explicit_ggn(ref.mlp_apply, loss, unravel(w), batch)
  else:
    matrix = jax.hessian(flat_loss)
  return jax.jit(flat_loss), jax.jit(jax.grad(flat_loss)), jax.jit(matrix), unravel


@functools.partial(jax.jit, static_argnames=("loss_name", "curvature", "cg_max_iter"))
def _traced_hf_update(g, state, params, batch, eval_batch, floats, *, loss_name, curvature,
                      cg_max_iter):
  """``hessian_free(...).update`` with the settings in ``floats`` traced, so that
  the cases of one problem share one compilation."""
  tx = hessian_free(ref.mlp_apply, ref.LOSSES[loss_name], curvature=curvature,
                    cg_max_iter=cg_max_iter, **floats)
  return tx.update(g, state, params, batch=batch, eval_batch=eval_batch)


@pytest.mark.parametrize("case", list(_STEP_CASES))
def test_one_step_and_state_match_numpy_reference(case):
  cfg = dict(_STEP_CASES[case])
  expect, seed, damping = cfg.pop("expect"), cfg.pop("seed"), cfg.pop("damping")
  problem = _STEP_PROBLEMS[cfg.pop("problem")]
  floats = {**_STEP_DEFAULTS, **cfg}
  _, _, params, data = ref.problem("mlp", problem["loss_name"], n=16, seed=seed)
  batch = jax.tree.map(lambda a: a[:8], data)
  eval_batch = jax.tree.map(lambda a: a[8:], data)
  flat_loss, flat_grad, matrix, unravel = _flat_step_tools(problem["loss_name"],
                                                           problem["curvature"])
  theta = ref.flat(params)
  g = np.asarray(flat_grad(theta, batch))
  warm_start = 0.1 * np.random.default_rng(seed).normal(size=g.shape)

  want = _np_hessian_free_step(
      np.asarray(matrix(theta, batch)), g, lambda d: float(flat_loss(theta + d, eval_batch)),
      damping, warm_start, cg_max_iter=problem["cg_max_iter"], **floats)
  if expect.get("backtracks"):
    assert want["chosen_iterate"] < want["num_kept"] - 1
  if expect.get("alpha") == "shrinks":
    assert 0 < want["alpha"] < 1
  elif "alpha" in expect:
    assert want["alpha"] == expect["alpha"]
  if "status" in expect:
    assert want["cg_status"] == expect["status"]
  if "damping" in expect:
    np.testing.assert_allclose(want["damping"], expect["damping"], rtol=1e-15)

  state = hessian_free(ref.mlp_apply, ref.LOSSES[problem["loss_name"]],
                       initial_damping=damping).init(params)
  state = state._replace(warm_start=unravel(jnp.asarray(warm_start)),
                         count=jnp.asarray(4, jnp.int32),
                         nonfinite_count=jnp.asarray(2, jnp.int32))
  update, new = _traced_hf_update(unravel(jnp.asarray(g)), state, params, batch, eval_batch,
                                  floats, **problem)
  # Vectors to 1e-7 of their largest entry: CG's rounding differs from numpy's
  # (20 iterations on the Hessian case leave ~1e-8 absolute differences).
  for name, actual in (("update", update), ("warm_start", new.warm_start)):
    np.testing.assert_allclose(ref.flat(actual), want[name], rtol=0, err_msg=name,
                               atol=1e-7 * np.max(np.abs(want[name])))
  for name in ("damping", "rho", "alpha", "loss_before", "loss_after"):
    np.testing.assert_allclose(getattr(new, name), want[name], rtol=1e-7, err_msg=name)
  for name in ("cg_iterations", "cg_status", "chosen_iterate", "chosen_iteration"):
    assert int(getattr(new, name)) == want[name], name
  assert int(new.count) == 5 and int(new.nonfinite_count) == 2 and not bool(new.nonfinite)
  compared = set(want) - {"update", "num_kept"} | {"count", "nonfinite", "nonfinite_count"}
  assert compared == set(new._fields)


def test_zero_initial_damping_is_lifted_to_min_damping():
  # An undamped first step; the clamp then lifts the damping, which the
  # multiplicative update could not do from 0.
  problem = _STEP_PROBLEMS["ggn"]
  _, _, params, data = ref.problem("mlp", problem["loss_name"], n=16, seed=0)
  batch, eval_batch = (jax.tree.map(lambda a: a[:8], data),
                       jax.tree.map(lambda a: a[8:], data))
  _, flat_grad, _, unravel = _flat_step_tools(problem["loss_name"], problem["curvature"])
  g = unravel(flat_grad(ref.flat(params), batch))
  tx = hessian_free(ref.mlp_apply, ref.LOSSES[problem["loss_name"]], initial_damping=0.0)
  _, new = _traced_hf_update(g, tx.init(params), params, batch, eval_batch,
                             {**_STEP_DEFAULTS, "min_damping": 1e-3}, **problem)
  assert float(new.damping) == 1e-3 and not bool(new.nonfinite)


# ----------------------------------------------------------------------------- options and edge paths
#
# The switches (no backtracking, no line search, fixed damping), a line search
# starting below 1, against the same numpy reference; the GGN problem.

_OPTION_CASES = {
    # ggn_backtracks without backtracking: the final iterate, and rho > 3/4
    # leaves the fixed damping at 1.
    "no_backtracking_fixed_damping": dict(
        problem="ggn", seed=0, damping=1.0,
        options=dict(use_cg_backtracking=False, adapt_damping=False),
        expect=dict(reference_backtracks=True)),
    # ggn_armijo_shrinks without the line search: alpha = 1, loss_after at p.
    "no_linesearch": dict(problem="ggn", seed=1, damping=1.0, cg_decay_x0=0.5,
                          options=dict(use_linesearch=False),
                          expect=dict(reference_shrinks=True)),
    # Armijo from 0.5: 0.5 is rejected, 0.5 beta^k accepted.
    "initial_step": dict(problem="ggn", seed=1, damping=1.0, cg_decay_x0=0.5,
                         linesearch_initial_step=0.5, options=dict(),
                         expect=dict(alpha_below=0.5)),
    # Armijo from 0.5 accepts 0.5 at once (where the loss at p would be rejected).
    "initial_step_accepted": dict(problem="ggn", seed=2, damping=0.3,
                                  linesearch_initial_step=0.5, options=dict(),
                                  expect=dict(alpha=0.5)),
    # hessian_negative_curvature with |p'Ap|: CG goes on past the negative
    # curvature that stops the default.
    "abs_curvature": dict(problem="hessian", seed=1, damping=0.3, linesearch_c=0.5,
                          cg_decay_x0=0.8, options=dict(nonpositive_curvature="abs"),
                          expect=dict(reference_status=_CG_NONPOSITIVE)),
    # Neither backtracking nor a line search: the update is p_final and
    # loss_after is measured there.
    "final_iterate_only": dict(problem="ggn", seed=0, damping=1.0,
                               options=dict(use_cg_backtracking=False, use_linesearch=False),
                               expect=dict(reference_backtracks=True)),
    # hessian_martens without Martens' test: CG goes on.
    "no_martens": dict(problem="hessian", seed=2, damping=1.0,
                       options=dict(martens_criterion=False),
                       # (22 iterations instead of 20 on this ill-conditioned
                       # Hessian: rounding reaches ~1.1e-7 of the largest entry.)
                       expect=dict(reference_status=_CG_MARTENS, vector_tol=1e-6)),
    # Backtracking steps back and Armijo's slope is g'p at that iterate, not
    # at the final one: with g'p_final an earlier (larger) trial step passes.
    "slope_at_chosen_iterate": dict(problem="ggn", seed=3, damping=1.0, linesearch_c=0.3,
                                    options=dict(), expect=dict(slope_matters=True)),
    # The settings passed on to CG and Armijo: each changes the reference's step
    # from the one at its default ("changes": setting, default, changed field).
    # No reduction allowed: ggn_armijo_shrinks takes no step.
    "no_reductions": dict(problem="ggn", seed=1, damping=1.0, cg_decay_x0=0.5,
                          linesearch_max_reductions=0, options=dict(),
                          expect=dict(changes=("linesearch_max_reductions", 20, "alpha"))),
    # A loose residual tolerance ends CG earlier.
    "loose_cg_tol": dict(problem="ggn", seed=0, damping=1.0, cg_tol=0.1, options=dict(),
                         expect=dict(changes=("cg_tol", 1e-5, "cg_iterations"))),
    # A larger martens_eps ends hessian_martens earlier (with "abs" to share
    # abs_curvature's compilation; the reference runs the same variant).
    "large_martens_eps": dict(problem="hessian", seed=2, damping=1.0, martens_eps=0.05,
                              options=dict(nonpositive_curvature="abs"),
                              expect=dict(changes=("martens_eps", 5e-4, "cg_iterations"))),
}


@functools.partial(jax.jit, static_argnames=("loss_name", "curvature", "cg_max_iter", "options"))
def _hf_update_with_options(g, state, params, batch, eval_batch, floats, *, loss_name,
                            curvature, cg_max_iter, options):
  tx = hessian_free(ref.mlp_apply, ref.LOSSES[loss_name], curvature=curvature,
                    cg_max_iter=cg_max_iter, **dict(options), **floats)
  return tx.update(g, state, params, batch=batch, eval_batch=eval_batch)


@pytest.mark.parametrize("case", list(_OPTION_CASES))
def test_options_match_numpy_reference(case):
  cfg = dict(_OPTION_CASES[case])
  expect, seed, damping = cfg.pop("expect"), cfg.pop("seed"), cfg.pop("damping")
  options, problem = cfg.pop("options"), _STEP_PROBLEMS[cfg.pop("problem")]
  floats = {**_STEP_DEFAULTS, "linesearch_initial_step": 1.0, **cfg}
  _, _, params, data = ref.problem("mlp", problem["loss_name"], n=16, seed=seed)
  batch, eval_batch = jax.tree.map(lambda a: a[:8], data), jax.tree.map(lambda a: a[8:], data)
  flat_loss, flat_grad, matrix, unravel = _flat_step_tools(problem["loss_name"],
                                                           problem["curvature"])
  theta = ref.flat(params)
  g = np.asarray(flat_grad(theta, batch))
  warm_start = 0.1 * np.random.default_rng(seed).normal(size=g.shape)
  eval_loss = lambda d: float(flat_loss(theta + d, eval_batch))  # noqa: E731
  curv = np.asarray(matrix(theta, batch))
  kw = dict(cg_max_iter=problem["cg_max_iter"], **floats)
  want = _np_hessian_free_step(curv, g, eval_loss, damping, warm_start, **kw, **options)
  # The case shows what it claims: the option changes the reference's step.
  default = _np_hessian_free_step(curv, g, eval_loss, damping, warm_start, **kw)
  if expect.get("reference_backtracks"):
    assert default["chosen_iterate"] < default["num_kept"] - 1
    assert default["damping"] != damping
  if expect.get("reference_shrinks"):
    assert 0 < default["alpha"] < 1
  if "alpha_below" in expect:
    assert 0 < want["alpha"] < expect["alpha_below"]
  if "alpha" in expect:
    assert want["alpha"] == expect["alpha"]
    # ... while the loss at p itself fails the test at that step size.
    p = want["update"] / want["alpha"]
    threshold = want["loss_before"] + floats["linesearch_c"] * want["alpha"] * (g @ p)
    assert eval_loss(p) > threshold >= eval_loss(want["alpha"] * p)
  if "reference_status" in expect:
    assert default["cg_status"] == expect["reference_status"] != want["cg_status"]
    assert want["cg_iterations"] > default["cg_iterations"]
  if expect.get("slope_matters"):
    assert want["chosen_iterate"] < want["num_kept"] - 1 and 0 < want["alpha"] < 1
    p, c = want["update"] / want["alpha"], floats["linesearch_c"]
    trials = [0.8 ** k for k in range(20) if 0.8 ** k > want["alpha"] * (1 + 1e-12)]
    assert any(eval_loss(a * p) <= want["loss_before"] + c * a * (g @ want["warm_start"])
               for a in trials)
  if "changes" in expect:
    name, default_value, field = expect["changes"]
    at_default = _np_hessian_free_step(curv, g, eval_loss, damping, warm_start,
                                       **{**kw, name: default_value}, **options)
    assert at_default[field] != want[field]

  state = hessian_free(ref.mlp_apply, ref.LOSSES[problem["loss_name"]],
                       initial_damping=damping).init(params)
  state = state._replace(warm_start=unravel(jnp.asarray(warm_start)))
  update, new = _hf_update_with_options(unravel(jnp.asarray(g)), state, params, batch,
                                        eval_batch, floats, options=tuple(options.items()),
                                        **problem)
  vector_tol = expect.get("vector_tol", 1e-7)
  for name, actual in (("update", update), ("warm_start", new.warm_start)):
    np.testing.assert_allclose(ref.flat(actual), want[name], rtol=0, err_msg=name,
                               atol=vector_tol * np.max(np.abs(want[name])))
  for name in ("damping", "rho", "alpha", "loss_before", "loss_after"):
    np.testing.assert_allclose(getattr(new, name), want[name], rtol=1e-7, err_msg=name)
  for name in ("cg_iterations", "cg_status", "chosen_iterate", "chosen_iteration"):
    assert int(getattr(new, name)) == want[name], name


def test_nonfinite_step_clamps_damping_resets_warm_start_and_keeps_loss():
  """A rejected step: the damping rises by 3/2 but not past max_damping, the
  (non-zero) warm start is reset to zero, and loss_after is loss_before."""
  params, batch, eval_batch = _teacher_batches(n=16)
  g = jax.grad(_LOSS_FN)(params, batch)
  g["w1"] = g["w1"].at[0, 0].set(jnp.nan)
  state = _TX.init(params)._replace(
      damping=jnp.asarray(0.9e8), warm_start=jax.tree.map(jnp.ones_like, params))
  u, state = _UPDATE(g, state, params, batch=batch, eval_batch=eval_batch)
  assert all(np.all(np.asarray(l) == 0) for l in jax.tree_util.tree_leaves(u))
  assert float(state.damping) == 1e8   # the default max_damping, not 1.35e8
  assert all(np.all(np.asarray(l) == 0) for l in jax.tree_util.tree_leaves(state.warm_start))
  np.testing.assert_allclose(state.loss_before, _LOSS_FN(params, eval_batch), rtol=1e-12)
  assert float(state.loss_after) == float(state.loss_before)
  assert float(state.alpha) == 0.0 and bool(state.nonfinite)


def test_nonfinite_loss_at_the_step_without_linesearch_is_rejected():
  """use_linesearch=False: a finite loss before and a NaN one at the step (a
  value_fn that fails away from theta) reject the step; loss_after reports
  loss_before, not the NaN."""
  params, batch, eval_batch = _teacher_batches(n=8)
  g = jax.grad(_LOSS_FN)(params, batch)
  flat0 = ref.flat(params)

  def value_fn(q):
    moved = jnp.any(ref.flat(q) != flat0)
    return _LOSS_FN(q, eval_batch) + jnp.where(moved, jnp.nan, 0.0)

  tx = hessian_free(ref.mlp_apply, mse, use_linesearch=False, cg_max_iter=5)
  u, state = jax.jit(lambda g, s, p: tx.update(g, s, p, batch=batch, value_fn=value_fn))(
      g, tx.init(params), params)
  assert bool(state.nonfinite) and float(state.alpha) == 0.0
  assert all(np.all(np.asarray(l) == 0) for l in jax.tree_util.tree_leaves(u))
  np.testing.assert_allclose(state.loss_before, _LOSS_FN(params, eval_batch), rtol=1e-12)
  assert float(state.loss_after) == float(state.loss_before)


def test_nonfinite_curvature_with_finite_gradient_is_rejected():
  """A NaN in ``batch`` reaches only the curvature products (the gradient was
  computed on a clean batch): CG meets it at once (``A x0`` with a non-zero
  warm start) and returns the finite ``x0`` with status NONFINITE. That status
  alone must reject the step, although ``x0``, the losses and the step itself
  are finite."""
  params, batch, eval_batch = _teacher_batches(n=8)
  g = jax.grad(_LOSS_FN)(params, batch)
  bad_batch = (batch[0].at[1, 2].set(jnp.nan), batch[1])
  tx = hessian_free(ref.mlp_apply, mse, use_linesearch=False, use_cg_backtracking=False,
                    cg_max_iter=5)
  state = tx.init(params)._replace(damping=jnp.asarray(2.0),
                                   warm_start=jax.tree.map(jnp.ones_like, params))
  u, state = jax.jit(lambda g, s, p: tx.update(g, s, p, batch=bad_batch,
                                               eval_batch=eval_batch))(g, state, params)
  assert int(state.cg_status) == solvers.CGStatus.NONFINITE
  assert int(state.cg_iterations) == 0
  assert all(np.all(np.asarray(l) == 0) for l in jax.tree_util.tree_leaves(u))
  assert bool(state.nonfinite) and int(state.nonfinite_count) == 1
  assert float(state.alpha) == 0.0
  np.testing.assert_allclose(state.damping, 3.0)
  assert all(np.all(np.asarray(l) == 0) for l in jax.tree_util.tree_leaves(state.warm_start))


def test_nonfinite_loss_before_the_step_is_rejected():
  """A value_fn that is NaN at theta but finite away from it
  (use_linesearch=False, so nothing else looks at ``L_eval(theta)``): the step
  is rejected and the NaN is reported."""
  params, batch, eval_batch = _teacher_batches(n=8)
  g = jax.grad(_LOSS_FN)(params, batch)
  flat0 = ref.flat(params)

  def value_fn(q):
    moved = jnp.any(ref.flat(q) != flat0)
    return _LOSS_FN(q, eval_batch) + jnp.where(moved, 0.0, jnp.nan)

  tx = hessian_free(ref.mlp_apply, mse, use_linesearch=False, cg_max_iter=5)
  u, state = jax.jit(lambda g, s, p: tx.update(g, s, p, batch=batch, value_fn=value_fn))(
      g, tx.init(params), params)
  assert np.isnan(float(state.loss_before)) and float(state.rho) == -np.inf
  assert bool(state.nonfinite) and float(state.alpha) == 0.0
  assert all(np.all(np.asarray(l) == 0) for l in jax.tree_util.tree_leaves(u))


def test_eval_losses_include_the_regularizer():
  """``L_eval`` is the whole objective on ``eval_batch``, regulariser included
  (loss_before, loss_after), written out here as mean squared error plus
  ``(c/2) |theta|^2``."""
  params, batch, eval_batch = _teacher_batches(n=8)
  c = 0.5
  reg = curvax.losses.l2_regularizer(c)
  g = jax.grad(curvax.losses.objective(ref.mlp_apply, mse, reg))(params, batch)

  def objective_np(p):
    out = np.asarray(ref.mlp_apply(p, eval_batch[0]))
    data = np.mean(0.5 * np.sum((out - np.asarray(eval_batch[1])) ** 2, axis=-1))
    return data + 0.5 * c * np.sum(np.asarray(ref.flat(p)) ** 2)

  # The regulariser's share is large enough to be seen.
  assert 0.5 * c * np.sum(np.asarray(ref.flat(params)) ** 2) > 1e-3 * objective_np(params)
  tx = hessian_free(ref.mlp_apply, mse, regularizer=reg, cg_max_iter=3)
  u, state = jax.jit(lambda g, s, p: tx.update(g, s, p, batch=batch, eval_batch=eval_batch))(
      g, tx.init(params), params)
  assert not bool(state.nonfinite) and float(state.alpha) > 0
  np.testing.assert_allclose(state.loss_before, objective_np(params), rtol=1e-10)
  np.testing.assert_allclose(state.loss_after,
                             objective_np(optax.apply_updates(params, u)), rtol=1e-10)


def test_fisher_preconditioner_first_cg_step_matches_closed_form():
  """One preconditioned CG iteration from zero: ``x_1 = (r'z / z'Az) z`` with
  ``z = M^{-1} r``, ``r = -g``, ``A = G + lambda I`` and ``M = (diag(F) +
  lambda)^xi``, ``diag(F)`` the mean of squared per-example gradients (dense
  references from tests/reference.py). The regulariser enters A, not M."""
  apply_fn, loss, params, batch = ref.problem("mlp", "softmax_cross_entropy", n=8, seed=3)
  reg = curvax.losses.l2_regularizer(0.05)
  g = jax.grad(curvax.losses.objective(apply_fn, loss, reg))(params, batch)
  lam, xi = 0.2, 0.6
  tx = hessian_free(apply_fn, loss, regularizer=reg, initial_damping=lam,
                    preconditioner="fisher", preconditioner_exponent=xi, cg_max_iter=1,
                    cg_tol=0.0, martens_criterion=False, use_cg_backtracking=False,
                    use_linesearch=False, adapt_damping=False)
  _, state = jax.jit(tx.update)(g, tx.init(params), params, batch=batch, eval_batch=batch)
  theta, unravel = ravel_pytree(params)

  @jax.jit
  def dense(theta):   # per-example gradients (N, P) and A, dense
    p = unravel(theta)
    per_example = ref.explicit_per_example_grads_jacrev(apply_fn, loss, p, batch)
    a = (ref.explicit_ggn(apply_fn, loss, p, batch)
         + jax.hessian(lambda w: reg(unravel(w)))(theta) + lam * jnp.eye(len(theta)))
    return per_example, a
  per_example, a = map(np.asarray, dense(theta))
  m = (np.mean(per_example ** 2, axis=0) + lam) ** xi
  r = -np.asarray(ref.flat(g))
  z = r / m
  expected = (r @ z) / (z @ a @ z) * z
  assert int(state.cg_iterations) == 1
  np.testing.assert_allclose(ref.flat(state.warm_start), expected, rtol=1e-10, atol=1e-14)
  # The unpreconditioned first step points elsewhere: the case can fail.
  assert not np.allclose(expected / np.linalg.norm(expected), r / np.linalg.norm(r), atol=1e-3)


def test_default_cg_budget_is_250_iterations():
  """cg_max_iter=None means 250 (Martens 2010): an ill-conditioned least-squares
  problem (condition number ~1e10) that CG does not finish in 250 iterations,
  with Martens' test off and cg_tol=0, stops at the budget."""
  k1, k2 = jax.random.split(jax.random.PRNGKey(0))
  n, p = 256, 200
  x = jax.random.normal(k1, (n, p)) * jnp.logspace(0, -5, p)
  y = jax.random.normal(k2, (n, 1))
  params = {"w": jnp.zeros((p, 1)), "b": jnp.zeros(1)}
  g = jax.grad(curvax.losses.objective(linear_apply, mse))(params, (x, y))
  tx = hessian_free(linear_apply, mse, initial_damping=1e-12, cg_tol=0.0,
                    martens_criterion=False, use_cg_backtracking=False, use_linesearch=False)
  _, state = jax.jit(tx.update)(g, tx.init(params), params, batch=(x, y), eval_batch=(x, y))
  assert int(state.cg_status) == solvers.CGStatus.MAX_ITER
  assert int(state.cg_iterations) == 250 == int(state.chosen_iteration)


@pytest.mark.parametrize("curvature", ["ggn", "hessian"])
def test_mixed_precision_parameters(curvature):
  """A float32 kernel beside a float64 bias (bfloat16 beside float32 alike)
  used to crash: CG's vectors were promoted, and the curvature product was
  linearised at float32 primals with float64 tangents. Now each leaf keeps
  its dtype in the update and the state (one compilation for two steps), and
  the step matches the all-float64 one up to the kernel's float32 rounding."""
  mse = curvax.losses.mean_squared_error
  apply = lambda p, x: x @ p["w"] + p["b"]  # noqa: E731
  x = jax.random.normal(jax.random.PRNGKey(0), (16, 4))
  y = jax.random.normal(jax.random.PRNGKey(1), (16, 2))
  w0 = 0.5 * jax.random.normal(jax.random.PRNGKey(2), (4, 2))
  mixed = {"w": w0.astype(jnp.float32), "b": jnp.full((2,), 0.1, jnp.float64)}
  wide = {"w": mixed["w"].astype(jnp.float64), "b": mixed["b"]}
  tx = curvax.transforms.hessian_free(apply, mse, curvature=curvature, cg_max_iter=8)
  obj = curvax.losses.objective(apply, mse)
  traces = []

  @jax.jit
  def step(p, s):
    traces.append(1)
    u, s = tx.update(jax.grad(obj)(p, (x, y)), s, p, batch=(x, y), eval_batch=(x, y))
    return u, optax.apply_updates(p, u), s

  u_mixed, p1, s1 = step(mixed, tx.init(mixed))
  _, _, s2 = step(p1, s1)
  assert len(traces) == 1
  chex.assert_trees_all_equal_dtypes(u_mixed, mixed)
  chex.assert_trees_all_equal_dtypes(s1, s2, tx.init(mixed))
  u_wide, _ = tx.update(jax.grad(obj)(wide, (x, y)), tx.init(wide), wide, batch=(x, y),
                        eval_batch=(x, y))
  for a, b in zip(jax.tree.leaves(u_mixed), jax.tree.leaves(u_wide)):
    np.testing.assert_allclose(np.asarray(a, np.float64), b, rtol=1e-4, atol=1e-5)
