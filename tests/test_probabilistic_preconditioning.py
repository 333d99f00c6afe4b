"""Tests of curvax.transforms.probabilistic_preconditioning.

Noise-free quadratics with known Hessians give closed forms for every stage:
the prior fit (P1-P2), the interpolation property of the posterior (B3), the
rank-k preconditioner (L1, C1/C2); the state machine is checked step by step.
A noisy quadratic (a different batch every step, so lam > 0) is compared with a
dense numpy re-implementation of the spec's round (`_dense_round`).
"""

from __future__ import annotations

import functools
import importlib

import chex
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

import curvax
from curvax._packed import PackedTree
from curvax.solvers import bayesian_hessian as bh
from curvax.transforms.probabilistic_preconditioning import (
    POSTERIOR, PRECONDITION, PRIOR, STATIC_ARGS, estimates_preconditioner, estimation_phase,
    probabilistic_preconditioning)

pp_module = importlib.import_module("curvax.transforms.probabilistic_preconditioning")
BATCH = (jnp.ones((2, 1)), jnp.zeros((2, 1)))
NAN_BATCH = (jnp.nan * jnp.ones((2, 1)), jnp.zeros((2, 1)))   # not weakly typed
ZERO_BATCH = (jnp.zeros((2, 1)), jnp.zeros((2, 1)))   # zero loss: no curvature at all
NEG_BATCH = (-jnp.ones((2, 1)), jnp.zeros((2, 1)))    # flips the curvature's sign


def _spd(n, eigenvalues, seed=0):
  q, _ = np.linalg.qr(np.random.default_rng(seed).normal(size=(n, n)))
  return q @ np.diag(eigenvalues) @ q.T, q


def _quadratic(blocks, bs):
  """Block-diagonal quadratic, one block per leaf; scaled by mean(inputs) (NaN batch -> NaN)."""
  blocks = {k: jnp.asarray(v) for k, v in blocks.items()}
  bs = {k: jnp.asarray(v) for k, v in bs.items()}

  def loss_fn(params, batch):
    scale = jnp.mean(batch[0])
    total = 0.0
    for k in blocks:
      x = jnp.ravel(params[k])
      total = total + 0.5 * x @ blocks[k] @ x - bs[k] @ x
    return scale * total

  return loss_fn


_STEPS = {}
_TRACES = {}


def _step_for(tx, loss_fn):
  """One jitted step per transformation (cached: tests share compilations)."""
  key = (id(tx), id(loss_fn))
  if key not in _STEPS:
    def step(p, s, b):
      _TRACES[key] = _TRACES.get(key, 0) + 1
      return tx.update(jax.grad(loss_fn)(p, b), s, p, batch=b)
    _STEPS[key] = (jax.jit(step), tx)                  # keep tx alive: its id is the key
  return _STEPS[key][0]


def _run(tx, loss_fn, params, num_steps, batches=None):
  """Runs num_steps jitted steps; returns params, states and updates per step."""
  state = tx.init(params)
  step = _step_for(tx, loss_fn)
  states, updates = [], []
  for t in range(num_steps):
    b = BATCH if batches is None else batches[t]
    u, state = step(params, state, b)
    params = optax.apply_updates(params, u)
    states.append(state)
    updates.append(u)
  return params, states, updates


# A single-leaf ill-conditioned quadratic and a two-leaf block-diagonal one.
N = 8
A1, _ = _spd(N, np.logspace(0, 2, N))
B1 = np.random.default_rng(1).normal(size=N)
SINGLE = _quadratic({"x": A1}, {"x": B1})
A_W, _ = _spd(6, np.linspace(1.0, 20.0, 6), seed=2)
A_B, _ = _spd(3, [0.5, 2.0, 3.0], seed=3)
TWO = _quadratic({"w": A_W, "b": A_B}, {"w": np.ones(6), "b": -np.ones(3)})
TWO_PARAMS = {"w": jnp.zeros((2, 3)), "b": 0.3 * jnp.ones(3)}
SHARED = probabilistic_preconditioning(SINGLE, prior_iterations=2, num_observations=2)


def _dense_posterior(state, leaf):
  """Dense posterior mean (B1-B3) rebuilt in numpy from the stored S, Delta."""
  s = np.asarray(state.directions.unpack()[leaf])
  d = np.asarray(state.residuals.unpack()[leaf])
  gid = 0 if state.alpha.shape[0] == 1 else leaf
  alpha, w, lam = (float(state.alpha[gid]), float(state.prior_scale[gid]),
                   float(state.noise_scale[gid]))
  S, Delta = s.T, d.T
  gram = w ** 2 * S.T @ S + lam ** 2 * np.diag(np.diag(S.T @ S))
  return np.eye(S.shape[0]) / alpha + w ** 2 * Delta @ np.linalg.inv(gram) @ S.T, alpha


def test_phase_transitions_step_by_step():
  p_it, m_obs, restart = 3, 3, 8
  tx = probabilistic_preconditioning(SINGLE, prior_iterations=p_it, num_observations=m_obs,
                                     restart_every=restart, inner=optax.trace(decay=0.9))
  params = {"x": jnp.ones(N)}
  _, states, updates = _run(tx, SINGLE, params, 2 * restart + 1)
  # Phase of the NEXT step after each step t; the round restarts after `restart` steps.
  expect_phase = [PRIOR, PRIOR, POSTERIOR, POSTERIOR, PRECONDITION, PRECONDITION,
                  PRECONDITION, PRIOR]
  expect_obs = [0, 0, 1, 2, 3, 3, 3, 0]
  for t, (st, u) in enumerate(zip(states, updates)):
    r = t % restart
    assert int(st.count) == t + 1
    assert int(st.phase) == expect_phase[r], t
    assert int(st.round_step) == (r + 1) % restart, t
    assert int(st.num_restarts) == (t + 1) // restart, t
    assert int(st.num_observations) == expect_obs[r], t
    moved = float(jnp.max(jnp.abs(u["x"]))) > 0
    assert moved == (r >= p_it + m_obs - 1), t     # params fixed while estimating
  # alpha is fitted at step P-1 of each round and equals the closed form (P1) there.
  g = np.asarray(jax.grad(SINGLE)(params, BATCH)["x"])
  np.testing.assert_allclose(states[p_it - 1].alpha, [g @ A1 @ g / np.sum((A1 @ g) ** 2)],
                             rtol=1e-10)
  np.testing.assert_allclose(states[p_it - 1].prior_scale, [g @ A1 @ g / (g @ g)], rtol=1e-10)
  np.testing.assert_allclose(states[p_it - 1].noise_scale, [0.0], atol=1e-8)
  np.testing.assert_allclose(states[p_it - 1].learning_rate, states[p_it - 1].alpha)
  # The inner optimizer restarts with the round: the first step of each round's
  # preconditioning phase has a fresh momentum buffer (update = -lr * g~).
  first = p_it + m_obs - 1
  for t in (first, first + restart):
    trace = states[t].inner_state.trace["x"]
    np.testing.assert_allclose(updates[t]["x"], -states[t].learning_rate[0] * trace, rtol=1e-12)
    assert not np.allclose(trace, states[t - 1].inner_state.trace["x"])



def test_noise_free_posterior_reproduces_hessian_on_observed_subspace():
  groups = "leaf"
  m_obs = 3
  tx = probabilistic_preconditioning(TWO, prior_iterations=2, num_observations=m_obs,
                                     groups=groups)
  _, states, _ = _run(tx, TWO, TWO_PARAMS, 2 + m_obs - 1)
  st = states[-1]
  assert int(st.num_observations) == m_obs and int(st.phase) == PRECONDITION
  for leaf, h in enumerate([A_B, A_W]):                # leaves in tree order: b, w
    b_mat, _ = _dense_posterior(st, leaf)
    s = np.asarray(st.directions.unpack()[leaf])
    np.testing.assert_allclose(np.linalg.norm(s, axis=1), 1.0, rtol=1e-12)
    # B s_j = H s_j for every observed direction (block-diagonal H: exact).
    np.testing.assert_allclose(s @ b_mat.T, s @ h.T, rtol=1e-7, atol=1e-7)
  # Per-group alpha (P1): each leaf's own closed form with groups="leaf".
  g = jax.grad(TWO)(TWO_PARAMS, BATCH)
  gs = [np.ravel(g["b"]), np.ravel(g["w"])]
  if groups == "leaf":
    want = [x @ h @ x / np.sum((h @ x) ** 2) for x, h in zip(gs, [A_B, A_W])]
  else:
    want = [sum(x @ h @ x for x, h in zip(gs, [A_B, A_W]))
            / sum(np.sum((h @ x) ** 2) for x, h in zip(gs, [A_B, A_W]))]
  np.testing.assert_allclose(st.alpha, want, rtol=1e-10)


def test_rank_k_preconditioned_step_matches_closed_form():
  form = "inverse"                  # form="seed" (C1): solver tests and the MLP test
  p_it, m_obs, rank = 2, 3, 2
  tx = probabilistic_preconditioning(SINGLE, prior_iterations=p_it, num_observations=m_obs,
                                     rank=rank, form=form)
  params = {"x": jnp.ones(N)}
  _, states, updates = _run(tx, SINGLE, params, p_it + m_obs)
  t = p_it + m_obs - 1                                 # first preconditioned step
  b_mat, alpha = _dense_posterior(states[t], 0)
  uu, ss, _ = np.linalg.svd(b_mat)
  u, sigma = uu[:, :rank], ss[:rank]
  np.testing.assert_allclose(states[t].eigenvalues.unpack()[0], sigma, rtol=1e-8)
  g = np.asarray(jax.grad(SINGLE)(params, BATCH)["x"])
  scale = 1.0 / (alpha * sigma) if form == "inverse" else sigma ** -0.5
  g_tilde = g - u @ (u.T @ g) + u @ (scale * (u.T @ g))          # (C2) / (C1)
  np.testing.assert_allclose(updates[t]["x"], -alpha * g_tilde, rtol=1e-8, atol=1e-12)
  # The estimate's top singular values approach the top eigenvalues of A1 (100, 51.8).
  np.testing.assert_allclose(sigma[0], 100.0, rtol=0.05)


def test_preconditioned_sgd_converges_faster_than_constructed_lr_alone():
  n = 12
  eig = np.concatenate([[17.0, 14.0], np.linspace(5.0, 10.0, n - 2)])
  a, q = _spd(n, eig)
  c = np.ones(n)
  c[:2] = 0.5
  b = q @ c
  loss_fn = _quadratic({"x": a}, {"x": b})
  f_min = float(loss_fn({"x": jnp.asarray(np.linalg.solve(a, b))}, BATCH))
  gaps = {}
  for pre in (True, False):
    tx = probabilistic_preconditioning(loss_fn, prior_iterations=3, num_observations=3,
                                       precondition=pre, estimate_preconditioner=True)
    state = tx.init({"x": jnp.zeros(n)})

    def body(carry, _, tx=tx):
      p, s = carry
      u, s = tx.update(jax.grad(loss_fn)(p, BATCH), s, p, batch=BATCH)
      p = optax.apply_updates(p, u)
      return (p, s), loss_fn(p, BATCH) - f_min

    (_, state), gap = jax.jit(lambda p, s: jax.lax.scan(body, (p, s), None, length=30))(
        {"x": jnp.zeros(n)}, state)
    gaps[pre] = np.asarray(gap)
    # Same round structure and the same constructed learning rate alpha in both.
    assert float(state.learning_rate[0]) == pytest.approx(float(state.alpha[0]))
  assert gaps[True][-1] < 1e-10
  assert gaps[False][-1] > 1e-4
  first_below = lambda g: int(np.argmax(g < 1e-6)) if np.any(g < 1e-6) else len(g)
  assert first_below(gaps[True]) < first_below(gaps[False])


def test_fixed_learning_rate_momentum_and_only_adaptive():
  """Tuned momentum without estimation (OnlyAdaptive round structure): the
  posterior phase is skipped, the inner optimizer steps with the fixed lr."""
  lr = 0.01
  tx = probabilistic_preconditioning(SINGLE, prior_iterations=2, num_observations=4,
                                     learning_rate=lr, inner=optax.trace(decay=0.9),
                                     precondition=False)
  params = {"x": jnp.ones(N)}
  _, states, updates = _run(tx, SINGLE, params, 4)
  assert [int(st.phase) for st in states] == [PRIOR, PRECONDITION, PRECONDITION, PRECONDITION]
  assert states[0].directions.unpack()[0].shape == (0, N)      # no posterior buffers
  np.testing.assert_allclose(states[-1].learning_rate, [lr])
  assert float(states[-1].alpha[0]) != lr
  assert float(jnp.max(jnp.abs(updates[1]["x"]))) == 0.0
  g2 = np.asarray(jax.grad(SINGLE)(params, BATCH)["x"])
  np.testing.assert_allclose(updates[2]["x"], -lr * g2, rtol=1e-12)
  p3 = optax.apply_updates(params, updates[2])
  g3 = np.asarray(jax.grad(SINGLE)(p3, BATCH)["x"])
  np.testing.assert_allclose(updates[3]["x"], -lr * (g3 + 0.9 * g2), rtol=1e-12)


def test_update_jits_once_across_phases_and_skips():
  """One trace for prior, posterior, preconditioning, skipped and failed steps."""
  params = {"x": jnp.ones(N)}
  step = _step_for(SHARED, SINGLE)
  key = (id(SHARED), id(SINGLE))
  before = _TRACES.get(key, 0)                      # traced by an earlier test, or not
  state = SHARED.init(params)
  seen = set()
  for b in [BATCH, BATCH, BATCH, BATCH, NAN_BATCH, NEG_BATCH, ZERO_BATCH]:
    u, state = step(params, state, b)
    seen.add(int(state.phase))
    params = optax.apply_updates(params, u)
  assert seen == {PRIOR, POSTERIOR, PRECONDITION}
  # Compiled once: one trace here, or none if an earlier test traced it (any
  # retrace between phases would add one).
  assert _TRACES.get(key, 0) - before == (0 if before else 1)


@pytest.mark.parametrize("kwargs,expected", [
    ({}, 3),                                                   # prior, posterior, build
    ({"inner": optax.sgd(0.1, momentum=0.9)}, 3),              # reset inside the build's
    ({"precondition": False}, 1),                              # OnlyAdaptive: prior only
    ({"num_observations": 1, "rank": 1}, 1),                   # no posterior phase
])
def test_number_of_conds_per_step(kwargs, expected):
  # Every step runs each lax.cond of the update (taken or not), and on a GPU
  # each one waits for the host to read its predicate (~40 us on an H200): the
  # fit, the inner state's reset and (without posterior observations) the
  # build share a branch instead of adding conds.
  params = {"x": jnp.ones(N)}
  tx = probabilistic_preconditioning(SINGLE, **{"prior_iterations": 2, **kwargs})
  grads = jax.tree.map(jnp.ones_like, params)
  jaxpr = jax.make_jaxpr(lambda g, s, p: tx.update(g, s, p, batch=BATCH))(
      grads, tx.init(params), params)
  assert sum(e.primitive.name == "cond" for e in jaxpr.jaxpr.eqns) == expected


def test_chain_and_unknown_kwargs_and_inject_hyperparams():
  params = {"x": jnp.ones(N)}
  g = jax.grad(SINGLE)(params, BATCH)
  chained = optax.chain(optax.clip(1e6), probabilistic_preconditioning(
      SINGLE, prior_iterations=2, num_observations=2, learning_rate=0.05))
  injected = optax.inject_hyperparams(probabilistic_preconditioning,
                                      static_args=STATIC_ARGS)(
      SINGLE, prior_iterations=2, num_observations=2, learning_rate=0.05)
  outs = []
  for tx in (chained, injected):
    state = tx.init(params)
    step = jax.jit(lambda p, s, tx=tx: tx.update(g, s, p, batch=BATCH, eval_batch=BATCH,
                                                   value_fn=None, foo=3))
    for _ in range(4):
      u, state = step(params, state)
    outs.append((u, state, step))
  # Both equal the closed form -lr * g~ with the state's own rank-2 factors (C2).
  st = outs[1][1].inner_state
  u_vec, sigma = np.asarray(st.eigenvectors[0]), np.asarray(st.eigenvalues.unpack()[0])
  gv = np.asarray(g["x"])
  scale = 1.0 / (float(st.alpha[0]) * sigma)
  want = -0.05 * (gv + u_vec.T @ ((scale - 1.0) * (u_vec @ gv)))
  np.testing.assert_allclose(outs[0][0]["x"], want, rtol=1e-10)
  np.testing.assert_allclose(outs[1][0]["x"], want, rtol=1e-10)
  # The injected learning rate is a live hyperparameter (same compiled step).
  _, state, step = outs[1]
  state.hyperparams["learning_rate"] = jnp.asarray(0.1)
  u, _ = step(params, state)
  np.testing.assert_allclose(u["x"], 2.0 * want, rtol=1e-10)
  with pytest.raises(TypeError, match="static_args"):
    tx = optax.inject_hyperparams(probabilistic_preconditioning, static_args="loss_fn")(
        SINGLE, prior_iterations=2, num_observations=2)
    jax.jit(lambda s: tx.update(g, s, params, batch=BATCH))(tx.init(params))


def test_non_finite_observations_are_skipped_and_recorded():
  params = {"x": jnp.ones(N)}
  batches = [BATCH, NAN_BATCH, BATCH, NAN_BATCH, BATCH, BATCH, NAN_BATCH, BATCH]
  params_out, states, updates = _run(SHARED, SINGLE, params, len(batches), batches)
  assert [int(s.num_skipped) for s in states] == [0, 1, 1, 2, 2, 2, 3, 3]
  # Estimation steps are retaken; a skipped preconditioning step still counts.
  assert [int(s.round_step) for s in states] == [1, 1, 2, 2, 3, 4, 5, 6]
  for u in updates:
    assert np.all(np.isfinite(u["x"]))
  assert np.all(np.isfinite(params_out["x"]))
  assert np.all(np.asarray(updates[6]["x"]) == 0.0)
  # The skipped observations left the estimate as if they never happened.
  _, clean, _ = _run(SHARED, SINGLE, params, 3)
  np.testing.assert_allclose(states[4].directions.unpack()[0], clean[2].directions.unpack()[0],
                             rtol=1e-12)
  np.testing.assert_allclose(states[4].alpha, clean[2].alpha, rtol=1e-12)


@pytest.mark.parametrize("dtype", [jnp.float32, jnp.float64])
@pytest.mark.parametrize("inner", [None, optax.identity()], ids=["default", "identity"])
def test_preconditioning_step_guard_sees_every_non_finite_gradient_entry(inner, dtype):
  """A NaN or infinite gradient entry where every row of U is exactly zero still
  zeroes and counts the whole step (the default inner optimizer checks the
  projections U_j'g, inf * 0 = NaN; any other inner checks the step itself).
  A step entry that overflows from finite values is never returned: the default
  zeroes that entry, any other inner zeroes and counts the step."""
  n = 4
  tx = probabilistic_preconditioning(lambda p, b: 0.5 * jnp.sum(p["x"] ** 2) * jnp.mean(b[0]),
                                     inner=inner, prior_iterations=2, num_observations=2,
                                     rank=2, learning_rate=1e30)
  params = {"x": jnp.ones(n, dtype)}
  state = tx.init(params)
  rows = (jnp.eye(n, dtype=dtype)[0], jnp.eye(n, dtype=dtype)[1])   # zero at entries 2, 3
  # A state as after a fit (with prior sums: a group with none is inactive).
  state = state._replace(phase=jnp.asarray(PRECONDITION, jnp.int32),
                         round_step=jnp.asarray(10, jnp.int32),
                         sum_vv=jnp.ones_like(state.sum_vv), sum_uu=jnp.ones_like(state.sum_uu),
                         alpha=jnp.ones_like(state.alpha),
                         eigenvectors=(rows,),
                         eigenvalues=PackedTree.pack((jnp.asarray([2.0, 4.0], dtype),)))
  batch = (jnp.ones((2, 1), dtype), jnp.zeros((2, 1), dtype))
  update = jax.jit(lambda g, s: tx.update(g, s, params, batch=batch))
  g = jnp.asarray([1e-30, 2e-30, 3e-30, 0.0], dtype)
  u, st = update({"x": g}, state)          # finite: g~ = g + U ((c - 1) * U'g)
  want = -1e30 * np.asarray([0.5e-30, 0.5e-30, 3e-30, 0.0])
  np.testing.assert_allclose(u["x"], want, rtol=1e-6)
  assert int(st.num_skipped) == 0
  for bad in (jnp.nan, jnp.inf, -jnp.inf):
    u, st = update({"x": g.at[2].set(bad)}, state)
    assert np.all(np.asarray(u["x"]) == 0.0), bad
    assert int(st.num_skipped) == 1, bad
  # Entry 3 overflows: 1e30 * 1e20 is not a float32 (nor is 1e30 * 1e300 a float64).
  u, st = update({"x": g.at[3].set(1e20 if dtype == jnp.float32 else 1e300)}, state)
  assert np.all(np.isfinite(np.asarray(u["x"])))
  if inner is None:
    np.testing.assert_allclose(u["x"], want, rtol=1e-6)
    assert int(st.num_skipped) == 0
  else:
    assert np.all(np.asarray(u["x"]) == 0.0) and int(st.num_skipped) == 1


def test_posterior_gives_up_after_repeated_non_finite_observations():
  """A degenerate estimate would fail every posterior observation: after
  MAX_POSTERIOR_RETAKES in a row the phase ends and the rank-k estimate is built
  from the observations so far (here the one from the prior), exactly as a
  configuration that asks for that many observations builds it."""
  assert pp_module.MAX_POSTERIOR_RETAKES == 2
  batches = [BATCH, BATCH, NAN_BATCH, NAN_BATCH, BATCH, BATCH]
  _, states, updates = _run(SHARED, SINGLE, {"x": jnp.ones(N)}, len(batches), batches)
  assert [int(s.phase) for s in states] == [PRIOR, POSTERIOR, POSTERIOR, PRECONDITION,
                                            PRECONDITION, PRECONDITION]
  assert [int(s.posterior_retakes) for s in states] == [0, 0, 1, 0, 0, 0]
  assert int(states[-1].num_skipped) == 2 and int(states[-1].num_observations) == 1
  one_obs = probabilistic_preconditioning(SINGLE, prior_iterations=2, num_observations=1,
                                          rank=1)
  _, ref, ref_updates = _run(one_obs, SINGLE, {"x": jnp.ones(N)}, 3)
  # Rank 2 from one observation: its pair, then the prior's 1/alpha (a direction
  # the inverse form leaves unscaled), so the step equals the rank-1 one.
  sigma, u = states[4].eigenvalues.unpack()[0], states[4].eigenvectors[0]
  np.testing.assert_allclose(sigma[0], ref[2].eigenvalues.unpack()[0][0], rtol=1e-10)
  np.testing.assert_allclose(sigma[1], 1.0 / states[4].alpha[0], rtol=1e-10)
  np.testing.assert_allclose(abs(u[0] @ ref[2].eigenvectors[0][0]), 1.0, rtol=1e-10)
  np.testing.assert_allclose(updates[4]["x"], ref_updates[2]["x"], rtol=1e-9)


@pytest.mark.parametrize("late_by", ["retaken_step", "failed_fits"])
def test_restarts_stay_on_the_step_count(late_by):
  """restart_every counts steps, not round steps: a round made late by a
  retaken (non-finite) prior step or by failed fits is cut at the next
  multiple of restart_every, and the next round starts there (the seed
  restarts at every epoch's start). P = M = 2 (estimation takes 3 steps),
  restart_every = 6."""
  p_it, m_obs, restart, steps = 2, 2, 6, 13
  tx = probabilistic_preconditioning(SINGLE, prior_iterations=p_it, num_observations=m_obs,
                                     restart_every=restart)
  if late_by == "retaken_step":     # round 1 starts at step 1, preconditions at steps 4, 5
    head, moved_first = [NAN_BATCH], [4, 5]
  else:                             # fits fail at steps 1 and 3; the fit at 5 is cut
    head, moved_first = [ZERO_BATCH] * 4, []
  batches = head + [BATCH] * (steps - len(head))
  _, states, updates = _run(tx, SINGLE, {"x": jnp.ones(N)}, steps, batches)
  assert [int(s.num_restarts) for s in states] == [(t + 1) // restart for t in range(steps)]
  moved = [t for t, u in enumerate(updates) if float(jnp.max(jnp.abs(u["x"]))) > 0]
  assert moved == moved_first + [9, 10, 11]    # round 2: steps 6..11, estimation 6..8
  after_cut = states[restart - 1]
  assert (int(after_cut.phase), int(after_cut.round_step),
          int(after_cut.num_observations)) == (PRIOR, 0, 0)
  assert int(states[-1].num_skipped) == (late_by == "retaken_step")
  assert int(states[-1].num_failed_fits) == 2 * (late_by == "failed_fits")


def test_failed_fit_restarts_round_and_negative_curvature_uses_magnitude():
  batches = [ZERO_BATCH] * 4 + [NEG_BATCH, NEG_BATCH]
  _, states, updates = _run(SHARED, SINGLE, {"x": jnp.ones(N)}, len(batches), batches)
  assert [int(s.num_failed_fits) for s in states] == [0, 1, 1, 2, 2, 2]
  assert [int(s.phase) for s in states] == [PRIOR] * 5 + [POSTERIOR]
  assert all(float(jnp.max(jnp.abs(u["x"]))) == 0.0 for u in updates)
  assert int(states[-1].num_negative_curvature) == 1
  g = -np.asarray(jax.grad(SINGLE)({"x": jnp.ones(N)}, BATCH)["x"])     # H = -A1
  np.testing.assert_allclose(states[-1].alpha, [g @ A1 @ g / np.sum((A1 @ g) ** 2)],
                             rtol=1e-10)


@pytest.mark.parametrize("groups,learning_rate", [
    ("leaf", None), ({"lin": "l", "unused": "u", "x": "x", "z": "z"}, 0.05)])
def test_inactive_groups_do_not_fail_the_fit_nor_change_the_active_ones(groups, learning_rate):
  """Groups with no observed signal are inactive (module docstring): "unused"
  is not in the loss (zero gradient and curvature: P1 and P2 are 0/0); "lin"
  enters linearly (a gradient, no curvature: P1 is 0/0); "z" has no signal in
  the prior phase and, afterwards, a gradient and a coupling to "x". None of
  them fails the fit, steps (learning rate 0, also a fixed one) or spends an
  observation, and "x" trains exactly as it does alone (z stays 0, so x's
  gradient has no z term, and H d none while d_z = 0): 30 noisy steps over
  3 restarts."""
  n, p_it, m_obs, restart = 4, 3, 2, 8
  a, _ = _spd(n, np.linspace(1.0, 6.0, n), seed=4)
  rng = np.random.default_rng(5)
  e = rng.normal(size=(n, n))
  e = 0.3 * (e + e.T)
  b = rng.normal(size=n)
  # inputs [[c, flag]], targets [shift]: a different batch every step; flag 0
  # in each round's prior phase.
  batches = [(jnp.asarray([[0.5 * rng.normal(), float(t % restart >= p_it)]]),
              jnp.asarray(0.2 * rng.normal(size=(1, n)))) for t in range(30)]

  def loss_x(params, batch):
    c, x = batch[0][0, 0], params["x"]
    return 0.5 * x @ (a + c * e) @ x - (b + batch[1][0]) @ x

  def loss_all(params, batch):
    c, flag, x, z = batch[0][0, 0], batch[0][0, 1], params["x"], params["z"]
    return (loss_x(params, batch) + (1.0 + c) * jnp.sum(params["lin"])
            + flag * (jnp.sum(z) + 0.7 * z @ x[:2]))

  x0 = jnp.asarray(rng.normal(size=n))
  kw = dict(prior_iterations=p_it, num_observations=m_obs, rank=2, restart_every=restart,
            learning_rate=learning_rate)
  tx_all = probabilistic_preconditioning(loss_all, groups=groups, **kw)
  tx_x = probabilistic_preconditioning(loss_x, **kw)
  params = {"lin": jnp.ones(2), "unused": jnp.ones(3), "x": x0, "z": jnp.zeros(2)}
  inactive = ("lin", "unused", "z")
  ix = 2                                      # leaves (= groups) in order lin, unused, x, z
  out, states, updates = _run(tx_all, loss_all, params, 30, batches)
  _, ref_states, ref_updates = _run(tx_x, loss_x, {"x": x0}, 30, batches)
  assert int(states[-1].num_failed_fits) == 0 and int(states[-1].num_restarts) == 3
  moved = 0
  for st, u, ref, ref_u in zip(states, updates, ref_states, ref_updates):
    np.testing.assert_allclose(u["x"], ref_u["x"], rtol=1e-12, atol=1e-15)
    moved += float(jnp.max(jnp.abs(u["x"]))) > 0
    for f in ("alpha", "prior_scale", "noise_scale", "learning_rate"):
      np.testing.assert_allclose(getattr(st, f)[ix], getattr(ref, f)[0], rtol=1e-12)
    np.testing.assert_allclose(st.directions.unpack()[ix], ref.directions.unpack()[0],
                               rtol=1e-12, atol=1e-15)
    for name in inactive:
      assert not np.any(np.asarray(u[name])), name
  # 4 preconditioned steps in each full round of 8, 2 in the last 6 steps.
  assert moved == 3 * 4 + 2
  for name in inactive:
    np.testing.assert_array_equal(out[name], params[name])
  st = states[-1]
  # Placeholders alpha = w = 1, lam = 0, learning rate 0; no observation.
  others = [0, 1, 3]
  np.testing.assert_array_equal(np.asarray(st.alpha)[others], 1.0)
  np.testing.assert_array_equal(np.asarray(st.prior_scale)[others], 1.0)
  np.testing.assert_array_equal(np.asarray(st.noise_scale)[others], 0.0)
  np.testing.assert_array_equal(np.asarray(st.learning_rate)[others], 0.0)
  for i in others:
    assert not np.any(np.asarray(st.directions.unpack()[i]))
    assert not np.any(np.asarray(st.residuals.unpack()[i]))


@pytest.mark.slow
def test_groups_labels_callable_seed_form_on_mlp():
  from reference import problem  # noqa: PLC0415 (shared tiny nets)
  apply_fn, loss, params, batch = problem("mlp", "softmax_cross_entropy")
  loss_fn = curvax.losses.objective(apply_fn, loss)
  labels = {"w1": "layer1", "b1": "layer1", "w2": "layer2", "b2": "layer2"}
  by_callable = lambda path, leaf: "layer" + path[-1].key[-1]
  for groups in (labels, by_callable):
    ids, num = pp_module._group_ids(params, groups)
    assert num == 2 and ids == (0, 1, 0, 1)           # leaves sorted: b1 b2 w1 w2
  tx = probabilistic_preconditioning(loss_fn, prior_iterations=2, num_observations=2,
                                     groups=labels, form="seed")
  start = float(loss_fn(params, batch))
  params_out, states, updates = _run(tx, loss_fn, params, 8, [batch] * 8)
  st = states[-1]
  assert st.alpha.shape == (2,) and np.all(np.asarray(st.alpha) > 0)
  assert all(v.shape == (2,) for v in st.eigenvalues.unpack())
  assert int(st.num_skipped) == 0
  assert float(loss_fn(params_out, batch)) < start
  # First preconditioned step: the seed form (C1) with the state's own factors.
  t = 3
  grads = jax.grad(loss_fn)(params, batch)
  for i, name in enumerate(["b1", "b2", "w1", "w2"]):
    u_vec = np.asarray(states[t].eigenvectors[i])
    sigma = np.asarray(states[t].eigenvalues.unpack()[i])
    gv = np.ravel(np.asarray(grads[name]))
    want = -float(st.learning_rate[i % 2]) * (gv + u_vec.T @ ((sigma ** -0.5 - 1.0)
                                                               * (u_vec @ gv)))
    np.testing.assert_allclose(np.ravel(updates[t][name]), want, rtol=1e-9, atol=1e-14)


# A noisy quadratic with cross-leaf curvature: on batch (c, shift) the loss is
# 0.5 x'(A + c E)x - (b + shift)'x, x the leaves a, b, c concatenated.
NOISY_SIZES = {"a": 4, "b": 3, "c": 3}


def _noisy_problem(seed=0, n=10, num_batches=10):
  rng = np.random.default_rng(seed)
  q, _ = np.linalg.qr(rng.normal(size=(n, n)))
  a = q @ np.diag(np.logspace(0, 1.5, n)) @ q.T          # dense: leaves are coupled
  e = rng.normal(size=(n, n))
  e = 0.15 * (e + e.T)
  b = rng.normal(size=n)
  x0 = np.linalg.solve(a, b) + 0.05 * rng.normal(size=n)
  batches = [(np.asarray([[0.5 * rng.normal()]]), rng.normal(size=(1, n)))
             for _ in range(num_batches)]
  return a, e, b, x0, batches


def _dense_round(a, e, b, x0, batches, groups, p_it, m_obs, rank, form, noise_estimate,
                 num_steps, lag=0):
  """The spec's round in dense numpy, written from the spec, not from curvax.

  ``groups``: leaf name -> label. ``lag``: the posterior observations (O2)
  take their gradient and Hessian from batch ``t - lag`` (0: the step's own).
  Returns alpha, w, lam per group (P1-P3), per leaf the observed S and
  Delta = Y - S / alpha as rows (O1, O2, B2), U and sigma_1..sigma_{k+1}
  (L1), and the steps from round step P + M - 1 on (C1/C2).
  """
  hess = lambda t: a + batches[t][0][0, 0] * e
  grad = lambda x, t: hess(t) @ x - b - batches[t][1][0]
  names = sorted(NOISY_SIZES)
  ends = np.cumsum([NOISY_SIZES[k] for k in names])
  part = {k: slice(end - NOISY_SIZES[k], end) for k, end in zip(names, ends)}
  labels = list(dict.fromkeys(groups[k] for k in names))
  gid = {k: labels.index(groups[k]) for k in names}
  # Prior (P1-P3): v_i = g_i, u_i = H_i v_i at x0 on batches 0..P-1.
  vs = [grad(x0, t) for t in range(p_it)]
  us = [hess(t) @ v for t, v in enumerate(vs)]
  vu, uu, vv, norm_sum = (np.zeros(len(labels)) for _ in range(4))
  for k in names:
    i, sl = gid[k], part[k]
    vu[i] += sum(v[sl] @ u[sl] for v, u in zip(vs, us))
    uu[i] += sum(u[sl] @ u[sl] for u in us)
    vv[i] += sum(v[sl] @ v[sl] for v in vs)
    norm_sum[i] += np.sum(sum(v[sl] for v in vs) ** 2)
  alpha, w = vu / uu, vu / vv
  if noise_estimate == "unbiased":
    lam = (vv - norm_sum / p_it) / (p_it - 1)
  else:
    lam = np.abs(vv - norm_sum) / p_it
  # (O1): the prior means.
  gbar, ubar = sum(vs) / p_it, sum(us) / p_it
  s_cols = {k: [-gbar[part[k]] / np.linalg.norm(gbar[part[k]])] for k in names}
  y_cols = {k: [-ubar[part[k]] / np.linalg.norm(gbar[part[k]])] for k in names}

  def posterior_mean(k):                 # (B1-B3), dense n_k x n_k
    al, wk, lk = alpha[gid[k]], w[gid[k]], lam[gid[k]]
    s, y = np.array(s_cols[k]).T, np.array(y_cols[k]).T
    gram = wk ** 2 * s.T @ s + lk ** 2 * np.diag(np.diag(s.T @ s))
    return np.eye(len(s)) / al + wk ** 2 * (y - s / al) @ np.linalg.inv(gram) @ s.T

  # (O2): d = B^{-1} g per leaf (a dense solve), y = H d for the whole vector.
  for t in range(p_it, p_it + m_obs - 1):
    g = grad(x0, t - lag)
    d = np.concatenate([np.linalg.solve(posterior_mean(k), g[part[k]]) for k in names])
    y = hess(t - lag) @ d
    for k in names:
      norm = np.linalg.norm(d[part[k]])
      s_cols[k].append(d[part[k]] / norm)
      y_cols[k].append(y[part[k]] / norm)
  # (L1): the top-k left singular pairs of the dense posterior mean (and
  # sigma_{k+1}, to check that they are well defined).
  factors = {}
  for k in names:
    u, sigma, _ = np.linalg.svd(posterior_mean(k))
    factors[k] = (u[:, :rank], sigma[:rank + 1])
  # (C1)/(C2) with learning rate alpha.
  x, steps = x0.copy(), []
  for t in range(p_it + m_obs - 1, num_steps):
    g, step = grad(x, t), np.zeros_like(x)
    for k in names:
      (u, sigma), al, gk = factors[k], alpha[gid[k]], g[part[k]]
      sigma = sigma[:rank]
      c = 1.0 / (al * sigma) if form == "inverse" else sigma ** -0.5
      step[part[k]] = -al * (gk - u @ (u.T @ gk) + u @ (c * (u.T @ gk)))
    steps.append(step)
    x = x + step
  return dict(alpha=alpha, w=w, lam=lam, factors=factors, steps=steps,
              s={k: np.array(s_cols[k]) for k in names},
              delta={k: np.array(y_cols[k]) - np.array(s_cols[k]) / alpha[gid[k]]
                     for k in names})


@pytest.mark.parametrize("form,noise_estimate,two_groups", [
    ("inverse", "unbiased", True), ("seed", "seed", False),
    ("inverse", "seed", False), ("seed", "unbiased", True)])
def test_noisy_batches_match_a_dense_reference_round(form, noise_estimate, two_groups):
  """A different batch every step (so lam > 0 and the products differ by
  batch): every stage equals `_dense_round`. The same batch on every step
  gives lam = 0 (unbiased) and a symmetric S'Delta, under which ignoring lam,
  a wrong (P3), or the seed code's X'S in (W1) go unnoticed."""
  p_it, m_obs, rank, num_steps = 4, 3, 2, 10
  a, e, b, x0, batches = _noisy_problem()
  names = sorted(NOISY_SIZES)
  labels = {"a": "g1", "b": "g2", "c": "g1"} if two_groups else dict.fromkeys(names, 0)
  ref = _dense_round(a, e, b, x0, batches, labels, p_it, m_obs, rank, form, noise_estimate,
                     num_steps)
  a_j, e_j, b_j = jnp.asarray(a), jnp.asarray(e), jnp.asarray(b)

  def loss_fn(params, batch):
    x = jnp.concatenate([params[k] for k in names])
    return 0.5 * x @ (a_j + batch[0][0, 0] * e_j) @ x - (b_j + batch[1][0]) @ x

  tx = probabilistic_preconditioning(
      loss_fn, prior_iterations=p_it, num_observations=m_obs, rank=rank, form=form,
      noise_estimate=noise_estimate, groups=labels if two_groups else None)
  ends = np.cumsum([NOISY_SIZES[k] for k in names])
  params = {k: jnp.asarray(x0[end - NOISY_SIZES[k]:end]) for k, end in zip(names, ends)}
  _, states, updates = _run(tx, loss_fn, params, num_steps,
                            [tuple(map(jnp.asarray, bt)) for bt in batches])
  fit, built = states[p_it - 1], states[p_it + m_obs - 1]
  # (P1-P3); lam matters: lam^2 is 10-200 % of w^2 here.
  np.testing.assert_allclose(fit.alpha, ref["alpha"], rtol=1e-12)
  np.testing.assert_allclose(fit.prior_scale, ref["w"], rtol=1e-12)
  np.testing.assert_allclose(fit.noise_scale, ref["lam"], rtol=1e-12)
  assert np.all(ref["lam"] ** 2 > 0.1 * ref["w"] ** 2)
  np.testing.assert_allclose(fit.learning_rate, ref["alpha"], rtol=1e-12)
  for i, k in enumerate(names):
    # (O1), (O2), (B2): the observed directions and residuals.
    np.testing.assert_allclose(built.directions.unpack()[i], ref["s"][k], rtol=1e-9, atol=1e-12)
    np.testing.assert_allclose(built.residuals.unpack()[i], ref["delta"][k], rtol=1e-9, atol=1e-10)
    # (L1): sigma, and U up to signs (its projector).
    u_ref, sigma_ref = ref["factors"][k]
    assert sigma_ref[rank - 1] > 1.05 * sigma_ref[rank]      # U well defined
    u = np.asarray(built.eigenvectors[i])
    np.testing.assert_allclose(built.eigenvalues.unpack()[i], sigma_ref[:rank], rtol=1e-9)
    np.testing.assert_allclose(u.T @ u, u_ref @ u_ref.T, atol=1e-9)
  # The observations use the step's own batch: the gradient and Hessian of the
  # batch before give directions far from curvax's.
  lagged = _dense_round(a, e, b, x0, batches, labels, p_it, m_obs, rank, form,
                        noise_estimate, num_steps, lag=1)
  for i, k in enumerate(names):
    assert np.max(np.abs(np.asarray(built.directions.unpack()[i])[1:] - lagged["s"][k][1:])) > 1e-2
  # (C1)/(C2): no step while estimating, then the reference's steps.
  for u in updates[:p_it + m_obs - 1]:
    assert not any(np.any(np.asarray(x)) for x in u.values())
  for u, want in zip(updates[p_it + m_obs - 1:], ref["steps"]):
    got = np.concatenate([np.asarray(u[k]) for k in names])
    np.testing.assert_allclose(got, want, rtol=1e-9, atol=1e-12)


def test_bad_arguments():
  mk = lambda **kw: probabilistic_preconditioning(SINGLE, **kw)
  with pytest.raises(ValueError, match="rank"):
    mk(rank=0)
  with pytest.raises(ValueError, match="must not exceed num_observations"):
    mk(rank=4, num_observations=3)
  with pytest.raises(ValueError, match="num_observations"):
    mk(num_observations=0)
  with pytest.raises(ValueError, match="prior_iterations"):
    mk(prior_iterations=1)
  mk(prior_iterations=1, noise_estimate="seed")        # fine with the seed's estimator
  with pytest.raises(ValueError, match="restart_every"):
    mk(prior_iterations=3, num_observations=3, restart_every=5)
  with pytest.raises(TypeError, match="rank"):
    mk(rank=2.5)
  with pytest.raises(ValueError, match="form"):
    mk(form="sqrt")
  with pytest.raises(ValueError, match="noise_estimate"):
    mk(noise_estimate="x")
  with pytest.raises(ValueError, match="learning_rate"):
    mk(learning_rate=-1.0)
  with pytest.raises(ValueError, match="estimate_preconditioner"):
    mk(precondition=True, estimate_preconditioner=False)
  with pytest.raises(TypeError, match="inner"):
    mk(inner=optax.sgd)
  with pytest.raises(TypeError, match="loss_fn"):
    probabilistic_preconditioning(None)
  # Unknown options are errors, not silently the defaults (the seed's own names
  # included: lr, est_rank, weight_decay; or a misspelling).
  for name in ("lr", "est_rank", "num_observation", "weight_decay"):
    with pytest.raises(TypeError, match=name):
      mk(**{name: 1})
  tx = mk(prior_iterations=2, num_observations=2)
  params = {"x": jnp.ones(N)}
  state = tx.init(params)
  with pytest.raises(TypeError, match="batch"):
    tx.update(params, state, params)
  with pytest.raises(TypeError, match="batch"):
    tx.update(params, state, params, batch=jnp.ones(3))
  with pytest.raises(TypeError, match="params"):
    tx.update(params, state, batch=BATCH)
  with pytest.raises(ValueError, match="updates"):
    tx.update({"x": jnp.ones(N + 1)}, state, params, batch=BATCH)
  with pytest.raises(ValueError, match="groups"):
    probabilistic_preconditioning(SINGLE, groups="layer").init(params)
  with pytest.raises(ValueError, match="groups"):
    probabilistic_preconditioning(SINGLE, groups={"y": 0}).init(params)


def test_static_args_reachable_from_the_exported_function():
  """The exported function shadows its module; STATIC_ARGS travels with it."""
  pp = curvax.transforms.probabilistic_preconditioning
  assert pp.STATIC_ARGS == STATIC_ARGS and "loss_fn" in pp.STATIC_ARGS
  tx = optax.inject_hyperparams(pp, static_args=pp.STATIC_ARGS)(
      loss_fn=lambda p, b: jnp.sum(p ** 2), learning_rate=0.1)
  assert float(tx.init(jnp.ones(2)).hyperparams["learning_rate"]) == pytest.approx(0.1)


def test_mixed_precision_parameters_keep_their_dtypes():
  """A float32 leaf beside a float64 one used to crash: the (O2) directions
  came out promoted, and the Hessian-vector product was linearised at float32
  primals with float64 tangents. Now every phase runs in one compilation, each
  leaf's update and state keep the leaf's dtype, and the updates match the
  all-float64 run up to float32 rounding."""
  mixed = {"w": TWO_PARAMS["w"].astype(jnp.float32), "b": TWO_PARAMS["b"]}
  tx = probabilistic_preconditioning(TWO, prior_iterations=2, num_observations=2)
  _, states, updates = _run(tx, TWO, mixed, 8)
  assert _TRACES[(id(tx), id(TWO))] == 1
  assert {int(s.phase) for s in states} == {PRIOR, POSTERIOR, PRECONDITION}
  for u in updates:
    chex.assert_trees_all_equal_dtypes(u, mixed)
  chex.assert_trees_all_equal_dtypes(states[-1], tx.init(mixed))
  # The prior sums are packed: one vector per dtype, whatever the leaf count;
  # the observations S and Delta one (M, size) array per dtype.
  for packed in (states[-1].sum_directions, states[-1].sum_products):
    assert sorted(str(v.dtype) for v in jax.tree.leaves(packed)) == ["float32", "float64"]
    chex.assert_trees_all_equal_dtypes(packed.unpack(), mixed)
  for packed in (states[-1].directions, states[-1].residuals):
    assert sorted((str(v.dtype), v.shape) for v in jax.tree.leaves(packed)) == [
        ("float32", (2, mixed["w"].size)), ("float64", (2, mixed["b"].size))]
    assert [(x.dtype, x.shape) for x in packed.unpack()] == [
        (mixed[k].dtype, (2, mixed[k].size)) for k in sorted(mixed)]
  _, _, wide = _run(tx, TWO, {"w": mixed["w"].astype(jnp.float64), "b": mixed["b"]}, 8)
  for u, v in zip(updates, wide):
    for a, b in zip(jax.tree.leaves(u), jax.tree.leaves(v)):
      np.testing.assert_allclose(np.asarray(a, np.float64), b, rtol=1e-4, atol=1e-6)
  assert any(float(jnp.abs(u["w"]).max()) > 0 for u in updates[4:])


# ---------------------------------------------------------------------------
# Added by mutation testing: the round's bookkeeping across restarts and
# retakes, the fit's rejection rules, defaults, and small leaves.


def test_defaults_are_the_spec_defaults():
  """P = 10, M = 5, k = 2 (spec, "Notation"): M and k fix the state's buffers,
  and restart_every must exceed the estimation length P + M - 1 = 14."""
  params = {"x": jnp.ones(N)}
  state = probabilistic_preconditioning(SINGLE).init(params)
  assert state.directions.unpack()[0].shape == (5, N)
  assert state.residuals.unpack()[0].shape == (5, N)
  assert len(state.eigenvectors[0]) == 2 and state.eigenvalues.unpack()[0].shape == (2,)
  with pytest.raises(ValueError, match="restart_every"):
    probabilistic_preconditioning(SINGLE, restart_every=14)
  probabilistic_preconditioning(SINGLE, restart_every=15)


def test_learning_rate_zero_is_rejected():
  """A fixed learning rate must be positive: 0 would silently never step."""
  with pytest.raises(ValueError, match="learning_rate"):
    probabilistic_preconditioning(SINGLE, learning_rate=0.0)
  with pytest.raises(ValueError, match="learning_rate"):
    probabilistic_preconditioning(SINGLE, learning_rate=np.asarray([0.1, 0.0]))


# P = M = 2 (estimation: steps 0..2), heavy-ball inner, restart after 6 steps.
MOMENTUM_TX = probabilistic_preconditioning(SINGLE, prior_iterations=2, num_observations=2,
                                            restart_every=6, inner=optax.trace(decay=0.9))


def test_momentum_accumulates_over_the_preconditioned_steps_and_restart_refits():
  """Steps 3, 4, 5 are preconditioned with the SAME rank-2 factors (built once,
  at step 3; dense SVD of the posterior) and the inner momentum accumulates
  across them: update_t = -alpha m_t, m_t = g~_t + 0.9 m_{t-1}, m_2 = 0. The
  restart after step 5 starts the prior sums afresh: the fit at step 7 is the
  closed form (P1, P2) at the parameters of steps 6-7 alone, with lam = 0, and
  its first preconditioned step (9) starts from a fresh momentum buffer."""
  params0 = {"x": jnp.ones(N)}
  _, states, updates = _run(MOMENTUM_TX, SINGLE, params0, 10)
  xs = [np.ones(N)]
  for u in updates:
    xs.append(xs[-1] + np.asarray(u["x"]))
  grad = lambda x: A1 @ x - B1                         # SINGLE on BATCH (scale 1)

  def preconditioned(state, g):                        # (C2) from the dense posterior
    b_mat, alpha = _dense_posterior(state, 0)
    uu, sigma, _ = np.linalg.svd(b_mat)
    u2, scale = uu[:, :2], 1.0 / (alpha * sigma[:2])
    return g - u2 @ (u2.T @ g) + u2 @ (scale * (u2.T @ g)), alpha

  mom = np.zeros(N)
  for t in (3, 4, 5):
    g_tilde, alpha = preconditioned(states[3], grad(xs[t]))
    mom = g_tilde + 0.9 * mom
    np.testing.assert_allclose(updates[t]["x"], -alpha * mom, rtol=1e-8, atol=1e-12)
  # Restart after step 5 (count 6); steps 6, 7 are the new round's prior phase.
  assert [int(s.phase) for s in states[5:8]] == [PRIOR, PRIOR, POSTERIOR]
  assert not np.any(np.asarray(updates[6]["x"])) and not np.any(np.asarray(updates[7]["x"]))
  g = grad(xs[6])
  np.testing.assert_allclose(states[7].alpha, [g @ A1 @ g / np.sum((A1 @ g) ** 2)], rtol=1e-10)
  np.testing.assert_allclose(states[7].prior_scale, [g @ A1 @ g / (g @ g)], rtol=1e-10)
  np.testing.assert_allclose(states[7].noise_scale, [0.0], atol=1e-8 * (g @ g))
  # Round 2 preconditions from step 9 with its own factors and no old momentum.
  assert int(states[8].phase) == PRECONDITION and not np.any(np.asarray(updates[8]["x"]))
  g_tilde, alpha = preconditioned(states[9], grad(xs[9]))
  np.testing.assert_allclose(updates[9]["x"], -alpha * g_tilde, rtol=1e-8, atol=1e-12)


def test_restart_clears_the_posterior_retake_count():
  """Restart clears everything (spec): a round cut by the restart after one
  non-finite posterior observation leaves no pending retake, so in the next
  round a single non-finite observation is retaken (phase stays POSTERIOR),
  not given up on (MAX_POSTERIOR_RETAKES = 2)."""
  batches = [NAN_BATCH] * 3 + [BATCH] * 2 + [NAN_BATCH] + [BATCH] * 2 + [NAN_BATCH]
  _, states, _ = _run(MOMENTUM_TX, SINGLE, {"x": jnp.ones(N)}, len(batches), batches)
  # Steps 0-2 retaken (prior), fit at step 4, step 5 retaken then cut by the restart.
  assert [int(s.phase) for s in states] == [PRIOR] * 4 + [POSTERIOR, PRIOR, PRIOR,
                                                          POSTERIOR, POSTERIOR]
  assert [int(s.posterior_retakes) for s in states] == [0] * 8 + [1]
  assert [int(s.num_restarts) for s in states] == [0] * 5 + [1] * 4
  assert int(states[-1].num_skipped) == 5 and int(states[-1].num_observations) == 1


def test_fit_waits_for_prior_iterations_finite_steps():
  """A non-finite last prior step is retaken, not fitted from the P - 1 finite
  ones: no fit and no observation yet; the fit follows the next finite step and
  equals the closed form (P1-P3, lam = 0 on the same batch)."""
  params = {"x": jnp.ones(N)}
  _, states, _ = _run(SHARED, SINGLE, params, 3, [BATCH, NAN_BATCH, BATCH])
  init = SHARED.init(params)
  assert (int(states[1].phase), int(states[1].round_step)) == (PRIOR, 1)
  assert int(states[1].num_observations) == 0
  np.testing.assert_array_equal(states[1].alpha, init.alpha)
  np.testing.assert_array_equal(states[1].noise_scale, init.noise_scale)
  assert int(states[2].phase) == POSTERIOR and int(states[2].num_observations) == 1
  g = A1 @ np.ones(N) - B1
  np.testing.assert_allclose(states[2].alpha, [g @ A1 @ g / np.sum((A1 @ g) ** 2)], rtol=1e-10)
  np.testing.assert_allclose(states[2].noise_scale, [0.0], atol=1e-8 * (g @ g))


def test_zero_average_curvature_fails_the_fit():
  """H = diag(1, -1) at x = (1, 1): v = g = (1, -1), u = H v = (1, 1), so
  sum v'u = 0 while ||v||, ||u|| > 0: an active group with alpha = w = 0, which
  the fit rejects (module docstring) — round restarted, counted, no step."""
  loss_fn = _quadratic({"x": np.diag([1.0, -1.0])}, {"x": np.zeros(2)})
  tx = probabilistic_preconditioning(loss_fn, prior_iterations=2, num_observations=2)
  _, states, updates = _run(tx, loss_fn, {"x": jnp.ones(2)}, 3)
  assert [int(s.num_failed_fits) for s in states] == [0, 1, 1]
  assert [int(s.phase) for s in states] == [PRIOR, PRIOR, PRIOR]
  assert [int(s.round_step) for s in states] == [1, 0, 1]
  assert int(states[-1].num_observations) == 0
  assert all(not np.any(np.asarray(u["x"])) for u in updates)


def test_non_finite_learning_rate_skips_and_counts_the_step():
  """An infinite fixed learning rate makes every preconditioned step
  non-finite: it returns zeros, keeps the inner state and counts the step in
  num_skipped (module docstring: "... or learning rate")."""
  tx = probabilistic_preconditioning(SINGLE, prior_iterations=2, num_observations=2,
                                     learning_rate=float("inf"))
  _, states, updates = _run(tx, SINGLE, {"x": jnp.ones(N)}, 5)
  assert [int(s.num_skipped) for s in states] == [0, 0, 0, 1, 2]
  assert [int(s.round_step) for s in states] == [1, 2, 3, 4, 5]
  for u in updates:
    assert np.all(np.asarray(u["x"]) == 0.0)


def test_leaf_smaller_than_rank_gets_a_newton_step():
  """A one-entry leaf (a scalar bias) with rank 2 has a rank-1 estimate; as its
  own group (P1) alpha = 1/h, and the inverse form (C2) leaves alpha on the
  leaf's only direction whatever sigma is, so its step is Newton's -g/h."""
  h, c = 3.0, 2.0
  loss_fn = _quadratic({"s": [[h]], "x": A1}, {"s": [c], "x": B1})
  tx = probabilistic_preconditioning(loss_fn, prior_iterations=2, num_observations=2, rank=2,
                                     groups="leaf")
  params = {"s": jnp.ones(1), "x": jnp.ones(N)}
  _, states, updates = _run(tx, loss_fn, params, 4)
  st = states[-1]
  assert st.eigenvalues.unpack()[0].shape == (1,) and len(st.eigenvectors[0]) == 1   # leaves: s, x
  assert st.eigenvalues.unpack()[1].shape == (2,) and len(st.eigenvectors[1]) == 2
  np.testing.assert_allclose(st.alpha[0], 1.0 / h, rtol=1e-12)
  np.testing.assert_allclose(updates[3]["s"], [-(h - c) / h], rtol=1e-10)
  assert np.all(np.isfinite(np.asarray(updates[3]["x"])))
  assert float(jnp.max(jnp.abs(updates[3]["x"]))) > 0


def test_fixed_learning_rate_is_the_state_learning_rate_from_init():
  """With a fixed learning rate the state's learning_rate is that rate (per
  group) from the start, not only after the first fit."""
  params = {"w": jnp.zeros((2, 3)), "b": jnp.ones(3)}
  for groups, size in ((None, 1), ("leaf", 2)):
    st = probabilistic_preconditioning(TWO, learning_rate=0.05, groups=groups).init(params)
    np.testing.assert_array_equal(st.learning_rate, np.full(size, 0.05))


def test_all_bfloat16_parameters_follow_the_float32_run():
  # The M x M / 2M x 2M linear algebra (inv, solve, eigh, svd) has no
  # half-precision kernels: it runs in float32 and the estimate, kept in
  # bfloat16, preconditions like the float32 run's (it used to raise).
  def apply_fn(p, x):
    return jnp.tanh(x @ p["w"]) @ p["v"]

  loss_fn = curvax.losses.objective(apply_fn, curvax.losses.softmax_cross_entropy)
  k = jax.random.split(jax.random.PRNGKey(0), 3)
  base = {"w": 0.5 * jax.random.normal(k[0], (4, 8)), "v": 0.5 * jax.random.normal(k[1], (8, 3))}

  def run(dtype):
    params = jax.tree.map(lambda a: a.astype(dtype), base)
    tx = curvax.transforms.probabilistic_preconditioning(loss_fn)
    state = tx.init(params)
    step = jax.jit(lambda p, s, b: tx.update(jax.grad(loss_fn)(p, b), s, p, batch=b))
    for t in range(16):     # 10 prior + 4 posterior steps, then preconditioned ones
      kt = jax.random.fold_in(k[2], t)
      batch = (jax.random.normal(kt, (16, 4)).astype(dtype),
               jax.random.randint(kt, (16,), 0, 3))
      updates, state = step(params, state, batch)
    return np.concatenate([np.ravel(np.asarray(u, np.float64))
                           for u in jax.tree.leaves(updates)]), state

  low, s_low = run(jnp.bfloat16)
  ref32, s32 = run(jnp.float32)
  assert int(s_low.phase) == int(s32.phase) == 2 and int(s_low.num_skipped) == 0
  assert all(e.dtype == jnp.bfloat16 for e in s_low.eigenvalues.unpack())
  assert np.all(np.isfinite(low)) and np.linalg.norm(low) > 0
  assert low @ ref32 / (np.linalg.norm(low) * np.linalg.norm(ref32)) > 0.99
  np.testing.assert_allclose(np.asarray(s_low.alpha, np.float64), s32.alpha, rtol=2e-2)


# ------------------------------------------------------------ host-side schedule
def _noisy_setup():
  a, e, b, x0, batches = _noisy_problem(num_batches=16)
  a_j, e_j, b_j = jnp.asarray(a), jnp.asarray(e), jnp.asarray(b)
  names = sorted(NOISY_SIZES)

  def loss_fn(params, batch):
    x = jnp.concatenate([params[k] for k in names])
    return 0.5 * x @ (a_j + batch[0][0, 0] * e_j) @ x - (b_j + batch[1][0]) @ x

  ends = np.cumsum([NOISY_SIZES[k] for k in names])
  params = {k: jnp.asarray(x0[end - NOISY_SIZES[k]:end]) for k, end in zip(names, ends)}
  return loss_fn, params, [tuple(map(jnp.asarray, bt)) for bt in batches]


def _run_scheduled(tx, loss_fn, params, batches, flags, state=None):
  """Runs one step per batch with ``scheduled=flags[t]`` from ``state`` (``tx.init``
  if None); lists the values traced."""
  traces = []

  @functools.partial(jax.jit, static_argnames="scheduled")
  def step(p, s, b, scheduled):
    traces.append(scheduled)
    return tx.update(jax.grad(loss_fn)(p, b), s, p, batch=b, scheduled=scheduled)

  state = tx.init(params) if state is None else state
  states, updates = [state], []
  for flag, b in zip(flags, batches):
    u, state = step(params, state, b, scheduled=flag)
    params = optax.apply_updates(params, u)
    states.append(state)
    updates.append(u)
  return states, updates, traces


SCHEDULE_CASES = {
    "preconditioned": {},
    "only_adaptive": {"precondition": False},
    "adaptive_no_apply": {"precondition": False, "estimate_preconditioner": True},
    "one_observation": {"num_observations": 1, "rank": 1},
    "momentum": {"inner": optax.trace(decay=0.9)},
    "no_restart": {"restart_every": None},
}


@pytest.mark.parametrize("by_phase", [False, True], ids=["estimates", "phase"])
@pytest.mark.parametrize("case", sorted(SCHEDULE_CASES))
def test_host_scheduled_steps_match_the_device_schedule(case, by_phase):
  """Steps passed ``scheduled=estimates_preconditioner(t, ...)`` give the
  results of steps that branch on the device (every field, every step), and
  the host's schedule is exactly the steps that estimate: True where the
  device-side run's step started in an estimation phase or built the
  estimate, False elsewhere (so it spares every cond that can be spared)."""
  kw = {"prior_iterations": 3, "num_observations": 2, "rank": 2, "restart_every": 7,
        **SCHEDULE_CASES[case]}
  loss_fn, params, batches = _noisy_setup()
  tx = probabilistic_preconditioning(loss_fn, **kw)
  host_kw = {k: v for k, v in kw.items() if k not in ("rank", "inner")}
  host = estimation_phase if by_phase else estimates_preconditioner
  flags = [host(t, **host_kw) for t in range(len(batches))]
  ref_states, ref_updates, _ = _run_scheduled(tx, loss_fn, params, batches, [True] * 16)
  states, updates, traces = _run_scheduled(tx, loss_fn, params, batches, flags)
  assert len(traces) == len(set(traces)) == len(set(flags))     # each compiled once
  # Equal up to rounding (the programs differ, so may XLA's fusions: jax 0.6.0
  # rounded a prior sum with cancellation 3e-14 apart); float64, values O(1-50).
  for got, want in zip(updates, ref_updates):
    chex.assert_trees_all_close(got, want, rtol=1e-12, atol=1e-12)
  for got, want in zip(states, ref_states):
    chex.assert_trees_all_close(got, want, rtol=1e-12, atol=1e-12)
  assert int(states[-1].num_skipped) == 0
  # The schedule is the device's: estimation (phase PRIOR/POSTERIOR at the
  # step's start) or the build (first PRECONDITION step of a round with a
  # posterior phase: round_step == apply_start).
  estimate = kw.get("estimate_preconditioner", kw.get("precondition", True))
  apply_start, finish_in_prior, _ = pp_module._round_layout(  # pylint: disable=protected-access
      estimate, kw["prior_iterations"], kw["num_observations"])
  device = [int(s.phase) != PRECONDITION
            or (not finish_in_prior and int(s.round_step) == apply_start)
            for s in ref_states[:-1]]
  assert [f is not False for f in flags] == device
  assert not all(flags) and any(flags)
  if by_phase:     # one variant per phase the round has, none with a cond
    assert set(flags) == ({"prior", False} if finish_in_prior
                          else {"prior", "posterior", "build", False})


@pytest.mark.parametrize("by_phase", [False, True], ids=["device", "host_phase"])
def test_a_round_ignores_the_previous_rounds_rows(by_phase):
  """A new round writes only row 0 of S and Delta (the fit's observation) and
  leaves the last round's rows in place: the posterior and the build must mask
  them by ``num_observations``. A run whose buffers are cleared at the restart
  gives the same round (every update, the factors), while the uncleared
  buffers do hold the old rows."""
  kw = {"prior_iterations": 3, "num_observations": 3, "rank": 2, "restart_every": 7}
  loss_fn, params, batches = _noisy_setup()
  tx = probabilistic_preconditioning(loss_fn, **kw)
  host_kw = {k: v for k, v in kw.items() if k != "rank"}
  flags = [estimation_phase(t, **host_kw) if by_phase else True for t in range(14)]
  states, updates, _ = _run_scheduled(tx, loss_fn, params, batches[:14], flags)
  # The cleared run: params and state at the restart (after step 7), buffers zeroed.
  start = jax.tree.map(jnp.copy, params)
  for u in updates[:7]:
    start = optax.apply_updates(start, u)
  restarted = states[7]
  assert int(restarted.round_step) == 0 and int(restarted.num_observations) == 0
  cleared = restarted._replace(
      directions=jax.tree.map(jnp.zeros_like, restarted.directions),
      residuals=jax.tree.map(jnp.zeros_like, restarted.residuals))
  again, again_updates, _ = _run_scheduled(tx, loss_fn, start, batches[7:14], flags[7:],
                                           state=cleared)
  for got, want in zip(again_updates, updates[7:]):
    chex.assert_trees_all_close(got, want, rtol=1e-12, atol=1e-12)
  # After the fit (step 9): row 0 written, the old rows kept (or zero, cleared).
  assert int(again[3].num_observations) == 1
  assert any(np.any(np.asarray(x)[1:]) for x in states[10].directions.unpack())
  assert not any(np.any(np.asarray(x)[1:]) for x in again[3].directions.unpack())
  assert any(np.any(np.asarray(x)) for x in updates[13].values())
  s = again[-1]
  chex.assert_trees_all_close((s.eigenvectors, s.eigenvalues),
                              (states[14].eigenvectors, states[14].eigenvalues),
                              rtol=1e-12, atol=1e-12)
  chex.assert_trees_all_close(s.directions, states[14].directions, rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("scheduled", [False, "prior", "posterior", "build"])
def test_host_scheduled_steps_compile_no_cond(scheduled):
  params = {"x": jnp.ones(N)}
  grads = jax.tree.map(jnp.ones_like, params)
  jaxpr = jax.make_jaxpr(lambda g, s, p: SHARED.update(g, s, p, batch=BATCH,
                                                       scheduled=scheduled))(
      grads, SHARED.init(params), params)
  assert not any(e.primitive.name in ("cond", "while") for e in jaxpr.jaxpr.eqns)


def test_bad_scheduled_values():
  params = {"x": jnp.ones(N)}
  grads = jax.tree.map(jnp.ones_like, params)
  with pytest.raises(TypeError, match="scheduled"):
    jax.jit(lambda s, f: SHARED.update(grads, s, params, batch=BATCH, scheduled=f))(
        SHARED.init(params), True)
  with pytest.raises(ValueError, match="one of"):
    SHARED.update(grads, SHARED.init(params), params, batch=BATCH, scheduled="posterio")
  only_adaptive = probabilistic_preconditioning(SINGLE, prior_iterations=2, precondition=False)
  with pytest.raises(ValueError, match="no posterior phase"):
    only_adaptive.update(grads, only_adaptive.init(params), params, batch=BATCH,
                         scheduled="build")


def test_scheduled_false_while_the_round_runs_late_steps_with_the_held_estimate():
  """P = M = 2, restart_every = 6: the host schedules steps 0-3 of each round.
  A non-finite first batch retakes a prior step, so on the device the build
  falls on step 4, which the host passed False: steps 4 and 5 find the round
  late. Nothing of the round changes (it waits, counted; the restart after
  step 5 cuts it as usual), and each takes a preconditioning step with the
  estimate the state holds: the fit's learning rate and, before any build,
  no rank-k part (-alpha g, plain SGD). A step passed True goes on where the
  round stood (it builds, and steps as the device-side run does from that
  round)."""
  tx = probabilistic_preconditioning(SINGLE, prior_iterations=2, num_observations=2,
                                     restart_every=6)
  params = {"x": jnp.ones(N)}
  batches = [NAN_BATCH] + [BATCH] * 7
  flags = [estimates_preconditioner(t, prior_iterations=2, num_observations=2, restart_every=6)
           for t in range(8)]
  assert flags == [True] * 4 + [False] * 2 + [True] * 2
  states, updates, _ = _run_scheduled(tx, SINGLE, params, batches, flags)
  assert [int(s.num_skipped) for s in states[1:]] == [1, 1, 1, 1, 2, 3, 3, 3]
  assert not any(np.any(np.asarray(u["x"])) for u in updates[:4] + updates[6:])
  for f in ("round_step", "phase", "num_observations", "directions", "residuals", "alpha",
            "eigenvectors", "eigenvalues"):
    chex.assert_trees_all_equal(getattr(states[5], f), getattr(states[4], f))
  lr = float(states[4].learning_rate[0])
  assert lr > 0 and lr == float(states[4].alpha[0])
  p = params
  for t in (4, 5):   # each at the parameters the step before left
    want = jax.tree.map(lambda g: -lr * g, jax.grad(SINGLE)(p, BATCH))
    chex.assert_trees_all_close(updates[t], want, rtol=1e-12)
    p = optax.apply_updates(p, updates[t])
  assert int(states[6].round_step) == 0 and int(states[6].num_restarts) == 1   # cut on time
  # A fixed learning rate: the late steps take it (the group has prior observations).
  fixed = probabilistic_preconditioning(SINGLE, prior_iterations=2, num_observations=2,
                                        restart_every=6, learning_rate=0.125)
  _, fixed_updates, _ = _run_scheduled(fixed, SINGLE, params, batches[:5], flags[:5])
  assert not any(np.any(np.asarray(u["x"])) for u in fixed_updates[:4])
  chex.assert_trees_all_close(fixed_updates[4], jax.tree.map(
      lambda g: -0.125 * g, jax.grad(SINGLE)(params, BATCH)), rtol=1e-12)
  # By phase: the retaken prior step makes the device one step late, so the
  # host's posterior and build steps (2, 3) and the steps after find it late
  # before its fit: no learning rate yet, zero updates.
  phases = [estimation_phase(t, prior_iterations=2, num_observations=2, restart_every=6)
            for t in range(6)]
  assert phases == ["prior", "prior", "posterior", "build", False, False]
  by_phase, phase_updates, _ = _run_scheduled(tx, SINGLE, params, batches[:6], phases)
  assert [int(s.num_skipped) for s in by_phase[1:]] == [1, 1, 2, 3, 4, 5]
  assert not any(np.any(np.asarray(u["x"])) for u in phase_updates)
  for f in ("round_step", "phase", "sum_vu", "sum_directions", "directions"):
    chex.assert_trees_all_equal(getattr(by_phase[5], f), getattr(by_phase[2], f))
  # Without the restart the late round resumes at the next step passed True:
  # its build is the device-side run's, and its step the one the device-side
  # run's round state takes at the parameters the late step left.
  tx_long = probabilistic_preconditioning(SINGLE, prior_iterations=2, num_observations=2)
  ref, _, _ = _run_scheduled(tx_long, SINGLE, params, batches[:6], [True] * 6)
  got, got_updates, _ = _run_scheduled(tx_long, SINGLE, params, batches[:6],
                                       [True] * 4 + [False, True])
  chex.assert_trees_all_close(got_updates[4], updates[4], rtol=1e-12)
  chex.assert_trees_all_close(got[6].eigenvectors, ref[5].eigenvectors, rtol=1e-12)
  p = optax.apply_updates(params, got_updates[4])
  want, _ = tx_long.update(jax.grad(SINGLE)(p, BATCH), ref[4], p, batch=BATCH)
  assert np.any(np.asarray(want["x"]))
  chex.assert_trees_all_close(got_updates[5], want, rtol=1e-12)
  assert int(got[6].num_skipped) == int(ref[6].num_skipped) + 1
