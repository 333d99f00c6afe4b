"""curvature_step_size: exact steps on quadratics, the interval schedule, composition."""

import dataclasses
import functools

import chex
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

import curvax
from curvax.losses import MeanSquaredError
from curvax.transforms.curvature_step_size import curvature_step_size

MSE = curvax.losses.mean_squared_error


def linear_apply(p, x):
  return x @ p["w"] + p["b"]


def _quadratic_problem(seed=0, n=9):
  """Linear model + MSE: the objective is quadratic and its GGN is its Hessian."""
  k = jax.random.split(jax.random.PRNGKey(seed), 4)
  params = {"w": jax.random.normal(k[0], (4, 2)), "b": 0.1 * jax.random.normal(k[1], (2,))}
  batch = (jax.random.normal(k[2], (n, 4)), jax.random.normal(k[3], (n, 2)))
  return params, batch


INNERS = {
    "sgd": lambda: optax.sgd(0.05),
    "momentum": lambda: optax.sgd(0.05, momentum=0.9),
    "adam": lambda: optax.adam(0.05),
}


@pytest.mark.parametrize("name", list(INNERS))
def test_step_lands_on_minimiser_along_direction(name):
  params, batch = _quadratic_problem(0)
  _, eval_batch = _quadratic_problem(1)
  loss_fn = curvax.losses.objective(linear_apply, MSE)
  tx = curvature_step_size(INNERS[name](), linear_apply, MSE, debias=True)
  inner = INNERS[name]()
  state, inner_state = tx.init(params), inner.init(params)

  @jax.jit
  def step(params, state, inner_state):
    g = jax.grad(loss_fn)(params, batch)
    d, inner_state = inner.update(g, inner_state, params)
    updates, state = tx.update(g, state, params, batch=batch, eval_batch=eval_batch)
    return updates, state, d, inner_state

  for _ in range(3):  # several steps, so momentum/Adam states matter
    updates, state, d, inner_state = step(params, state, inner_state)
    # The step is alpha* d with d the inner optimizer's own proposal ...
    chex.assert_trees_all_close(updates, jax.tree.map(lambda v: state.alpha * v, d), rtol=1e-12)
    # ... and lands on the minimiser of the eval-batch objective along d.
    new = optax.apply_updates(params, updates)
    along = lambda a: loss_fn(jax.tree.map(lambda p, v: p + a * v, new, d), eval_batch)
    np.testing.assert_allclose(jax.grad(along)(0.0), 0.0, atol=1e-12)
    assert jax.grad(jax.grad(along))(0.0) > 0
    assert bool(state.computed) and state.alpha > 0
    # default learning_rate=1.0: absolute == relative
    np.testing.assert_allclose(state.learning_rate, state.alpha, rtol=1e-12)
    params = new


def test_biased_equals_debiased_on_same_batch_and_absolute_uses_learning_rate():
  params, batch = _quadratic_problem(0)
  g = jax.grad(curvax.losses.objective(linear_apply, MSE))(params, batch)
  biased = curvature_step_size(optax.adam(0.1), linear_apply, MSE, debias=False,
                               learning_rate=0.1, diagnostics=True)
  debiased = curvature_step_size(optax.adam(0.1), linear_apply, MSE, debias=True,
                                 learning_rate=0.1, diagnostics=True)
  u1, s1 = biased.update(g, biased.init(params), params, batch=batch)
  u2, s2 = debiased.update(g, debiased.init(params), params, batch=batch, eval_batch=batch)
  chex.assert_trees_all_close(u1, u2, rtol=1e-12)
  for field in ("alpha", "numerator", "denominator", "hybrid", "biased_denominator",
                "cos_eval", "cos_batch", "eval_loss"):
    np.testing.assert_allclose(getattr(s1, field), getattr(s2, field), rtol=1e-12)
  np.testing.assert_allclose(s1.hybrid, s1.alpha, rtol=1e-12)
  np.testing.assert_allclose(s1.alpha_absolute, 0.1 * s1.alpha, rtol=1e-12)
  np.testing.assert_allclose(s1.learning_rate, s1.alpha_absolute, rtol=1e-12)
  np.testing.assert_allclose(s1.scale, s1.alpha, rtol=1e-12)
  # With the raw gradient as `updates`, the free numerator equals the JVP one.
  np.testing.assert_allclose(s1.biased_numerator, s1.numerator, rtol=1e-10)


def test_debias_diagnostics_on_two_batches():
  params, batch = _quadratic_problem(0)
  _, eval_batch = _quadratic_problem(1)
  g = jax.grad(curvax.losses.objective(linear_apply, MSE))(params, batch)
  tx = curvature_step_size(optax.sgd(0.1), linear_apply, MSE, learning_rate=0.1,
                           diagnostics=True)
  _, s = tx.update(g, tx.init(params), params, batch=batch, eval_batch=eval_batch)
  d = jax.tree.map(lambda v: -0.1 * v, g)
  on_eval = curvax.curvature.quadratic_step_size(linear_apply, MSE, params, d, eval_batch)
  on_batch = curvax.curvature.quadratic_step_size(linear_apply, MSE, params, d, batch)
  np.testing.assert_allclose(s.alpha, on_eval.alpha, rtol=1e-12)
  np.testing.assert_allclose(s.hybrid, -on_eval.numerator / on_batch.denominator, rtol=1e-12)
  np.testing.assert_allclose(s.cos_batch, 1.0, rtol=1e-12)  # SGD: d is -g
  g_eval = jax.grad(curvax.losses.objective(linear_apply, MSE))(params, eval_batch)
  cos = -optax.tree_utils.tree_vdot(d, g_eval) / (
      optax.tree_utils.tree_norm(d) * optax.tree_utils.tree_norm(g_eval))
  np.testing.assert_allclose(s.cos_eval, cos, rtol=1e-12)
  np.testing.assert_allclose(s.direction_norm, optax.tree_utils.tree_norm(d), rtol=1e-12)


def test_regularizer_enters_slope_and_curvature():
  params, batch = _quadratic_problem(0)
  reg = curvax.losses.l2_regularizer(0.5, lambda path, leaf: path[-1].key == "w")
  loss_fn = curvax.losses.objective(linear_apply, MSE, reg)
  g = jax.grad(loss_fn)(params, batch)
  tx = curvature_step_size(optax.sgd(0.1), linear_apply, MSE, debias=False, regularizer=reg)
  u, s = tx.update(g, tx.init(params), params, batch=batch)
  new = optax.apply_updates(params, u)
  along = lambda a: loss_fn(jax.tree.map(lambda p, v: p + a * v, new, u), batch)
  np.testing.assert_allclose(jax.grad(along)(0.0), 0.0, atol=1e-12)
  np.testing.assert_allclose(s.eval_loss, loss_fn(params, batch), rtol=1e-12)


# ---------------------------------------------------------------------------
# The interval schedule, step by step, on a problem whose alpha* we dictate.
#
# One weight w = 0, model f = x w, MSE, inner sgd(eta) fed the pseudo-gradient
# u = 1, so d = -eta. On eval_batch (x=1, y=c): g = -c, G = 1, hence
# alpha*_abs = -c: each step's estimate is chosen through c. x=0 makes d'Gd = 0
# (undefined). The update applied is -lr, the learning rate itself.

_calls = []


@dataclasses.dataclass(frozen=True)
class CountingMSE(MeanSquaredError):
  """MSE whose Hessian product records each *executed* call (not each trace)."""

  def hvp(self, outputs, targets, tangents):
    jax.debug.callback(lambda: _calls.append(1))
    return super().hvp(outputs, targets, tangents)


def scalar_apply(p, x):
  return x @ p["w"]


UNDEF = None


_SCHEDULE = dict(mode="interval", warmup_steps=2, interval=5, num_estimates=4)


def _run_schedule(targets, flags=None, **kwargs):
  """Runs the transform on dictated estimates; returns per-step records.

  ``flags``: per step, the ``scheduled`` keyword (static; None: not passed).
  """
  eta = 0.5
  # positive_only=True unless asked: the windows below mix signs to test which
  # estimates count; test_interval_seed_rule_and_clip runs the default (the seed's rule).
  tx = curvature_step_size(optax.sgd(eta), scalar_apply, CountingMSE(), learning_rate=eta,
                           **{**_SCHEDULE, "positive_only": True, **kwargs})
  params = {"w": jnp.zeros((1, 1))}
  u = {"w": jnp.ones((1, 1))}
  batch = (jnp.ones((1, 1)), jnp.zeros((1, 1)))
  traces = []

  @functools.partial(jax.jit, static_argnames="scheduled")
  def step(state, eval_batch, scheduled=None):
    traces.append(scheduled)
    return tx.update(u, state, params, batch=batch, eval_batch=eval_batch, scheduled=scheduled)

  state = tx.init(params)
  records = []
  _calls.clear()
  flags = [None] * len(targets) if flags is None else flags
  for a, flag in zip(targets, flags):
    x = 0.0 if a is UNDEF else 1.0
    c = 0.0 if a is UNDEF else -a
    upd, state = step(state, (jnp.full((1, 1), x), jnp.full((1, 1), c)), scheduled=flag)
    records.append((float(-upd["w"][0, 0]), bool(state.computed), float(state.alpha_absolute)))
  jax.effects_barrier()
  assert sorted(map(str, traces)) == sorted(map(str, set(flags)))  # one trace per variant
  return records, state, len(_calls)


# warm-up: 2 steps; windows of 5 steps start at t = 2, 7, 12; 4 estimates each.
_W = 9.0  # estimates offered outside windows: must never be computed or applied
_TARGETS = [_W, _W,                        # t0, t1 warm-up
            0.2, -0.1, 0.4, 0.3, _W,       # window 1: positives 0.2 0.4 0.3 -> 0.3
            0.1, 0.9, 0.3, 0.5, _W,        # window 2: even count -> (0.3+0.5)/2 = 0.4
            -0.2, UNDEF, -0.6, -0.1, _W,   # window 3: none usable -> keep 0.4
            0.7]                           # t17: new window starts
_EXPECTED_LR = [0.5, 0.5,
                0.5, 0.5, 0.5, 0.5, 0.3,
                0.3, 0.3, 0.3, 0.3, 0.4,
                0.4, 0.4, 0.4, 0.4, 0.4,
                0.4]
_EXPECTED_COMPUTED = [False, False] + ([True] * 4 + [False]) * 3 + [True]


def test_interval_schedule_step_by_step():
  records, state, calls = _run_schedule(_TARGETS)
  np.testing.assert_allclose([r[0] for r in records], _EXPECTED_LR, rtol=1e-12)
  assert [r[1] for r in records] == _EXPECTED_COMPUTED
  # estimates recorded on computing steps are the dictated ones
  for a, (_, computed, alpha_abs) in zip(_TARGETS, records):
    if computed and a is not UNDEF:
      np.testing.assert_allclose(alpha_abs, a, rtol=1e-12)
  # Steps without curvature computed no curvature: Hessian products executed
  # only on the 13 window steps (lax.cond), none in warm-up or outside windows.
  assert calls == sum(_EXPECTED_COMPUTED) == 13
  assert int(state.num_computed) == 13
  assert int(state.num_negative) == 4 and int(state.num_undefined) == 1
  np.testing.assert_allclose(state.negative_fraction, 4 / 13)
  assert int(state.count) == len(_TARGETS)


@pytest.mark.parametrize("mode", ["interval", "every_step"])
def test_host_schedule_matches_the_device_schedule(mode):
  # scheduled=computes_curvature(t, ...) on the host: the same steps, estimates
  # and learning rates as the cond on the device, two compiled variants, and
  # the one without curvature has no cond (nothing for a GPU to sync on).
  kw = {**_SCHEDULE, "mode": mode}
  flags = [curvax.transforms.computes_curvature(t, **kw) for t in range(len(_TARGETS))]
  expected = (_EXPECTED_COMPUTED if mode == "interval"
              else [False, False] + [True] * (len(_TARGETS) - 2))
  assert flags == expected
  device, s_device, calls_device = _run_schedule(_TARGETS, mode=mode)
  host, s_host, calls_host = _run_schedule(_TARGETS, flags, mode=mode)
  np.testing.assert_equal(host, device)   # NaN alpha where none was computed, alike
  assert calls_host == calls_device == sum(expected)
  chex.assert_trees_all_equal(s_host, s_device)
  tx = curvature_step_size(optax.sgd(0.5), scalar_apply, MSE, **kw)
  params = {"w": jnp.zeros((1, 1))}
  b = (jnp.ones((1, 1)), jnp.zeros((1, 1)))
  def update(scheduled):
    return str(jax.make_jaxpr(lambda s: tx.update(params, s, params, batch=b, eval_batch=b,
                                                  scheduled=scheduled))(tx.init(params)))
  assert "cond[" not in update(False)
  assert "cond[" in update(True) and "cond[" in update(None)


@pytest.mark.parametrize("skipped, changed", [
    (4, {t: 0.25 for t in range(6, 11)}),    # window 1 without 0.4: median(0.2, 0.3)
    (2, {t: 0.35 for t in range(6, 11)}),    # its first (the window's reset): median(0.4, 0.3)
    (5, {}),                                 # its last step: median(0.2, 0.4) still applied
    (7, {t: 0.5 for t in range(11, 18)}),    # window 2 without 0.1: median(0.9, 0.3, 0.5)
])
def test_scheduled_false_on_a_window_step_leaves_its_estimate_missing(skipped, changed):
  # The windows follow the schedule (reset at their first step, median after
  # their last) whether or not the caller skipped one of their steps; a
  # skipped last step applies the median the window's measuring steps kept
  # (window_median), unsorted.
  flags = [True] * len(_TARGETS)
  flags[skipped] = False
  records, state, calls = _run_schedule(_TARGETS, flags)
  assert [r[1] for r in records] == [c and t != skipped
                                     for t, c in enumerate(_EXPECTED_COMPUTED)]
  expected = [changed.get(t, lr) for t, lr in enumerate(_EXPECTED_LR)]
  np.testing.assert_allclose([r[0] for r in records], expected, rtol=1e-12)
  assert calls == int(state.num_computed) == 12


@pytest.mark.parametrize("bad, error", [
    (1, "must be None or a bool"), ("yes", "must be None or a bool"),
    ("traced", "static_argnames")])
def test_scheduled_must_be_static_bool(bad, error):
  tx = curvature_step_size(optax.sgd(0.5), scalar_apply, MSE, debias=False)
  params = {"w": jnp.zeros((1, 1))}
  b = (jnp.ones((1, 1)), jnp.zeros((1, 1)))
  state = tx.init(params)
  with pytest.raises(TypeError, match=error):
    if bad == "traced":
      jax.jit(lambda f: tx.update(params, state, params, batch=b, scheduled=f))(True)
    else:
      tx.update(params, state, params, batch=b, scheduled=bad)


def test_computes_curvature_rejects_unknown_mode():
  with pytest.raises(ValueError, match="mode"):
    curvax.transforms.computes_curvature(3, mode="sometimes")


def test_interval_seed_rule_and_clip():
  targets = [_W, _W, -0.2, 0.1, -0.6, 0.3, _W, 0.1, 0.9, 0.3, 0.5, _W]
  # positive_only=False (the default): median of all = (-0.2 + 0.1)/2 < 0 -> not applied.
  records, _, _ = _run_schedule(targets, positive_only=False)
  np.testing.assert_allclose([r[0] for r in records][6:], [0.5] * 5 + [0.4])
  # positive_only=True: median of 0.1, 0.3 = 0.2; clip caps window 2's 0.4 at 0.35.
  records, _, _ = _run_schedule(targets, clip=(0.0, 0.35))
  np.testing.assert_allclose([r[0] for r in records][6:], [0.2] * 5 + [0.35])


def test_every_step_fallbacks_and_warmup():
  """Undefined or negative alpha* is never applied: the held learning rate is."""
  eta = 0.5
  tx = curvature_step_size(optax.sgd(eta), scalar_apply, CountingMSE(), learning_rate=eta,
                           warmup_steps=1, clip=(0.0, 2.0))
  params, u = {"w": jnp.zeros((1, 1))}, {"w": jnp.ones((1, 1))}
  batch = (jnp.ones((1, 1)), jnp.zeros((1, 1)))
  step = jax.jit(lambda s, eb: tx.update(u, s, params, batch=batch, eval_batch=eb))
  state = tx.init(params)
  lrs = []
  _calls.clear()
  for a in [_W, UNDEF, 0.3, -0.4, UNDEF, 5.0, 0.7]:
    x, c = (0.0, 0.0) if a is UNDEF else (1.0, -a)
    upd, state = step(state, (jnp.full((1, 1), x), jnp.full((1, 1), c)))
    lrs.append(float(-upd["w"][0, 0]))
  jax.effects_barrier()
  np.testing.assert_allclose(lrs, [0.5, 0.5, 0.3, 0.3, 0.3, 2.0, 0.7], rtol=1e-12)
  assert len(_calls) == 6  # warm-up step computed nothing


def test_finite_proposal_that_overflows_when_rescaled_is_zeroed_and_counted():
  # float32, a nearly flat model (tiny d'Gd) and a steep linear regulariser
  # (large d'g): d is finite, alpha* is finite and positive, alpha* d is inf.
  apply = lambda p, x: 1e-15 * (x @ p["w"])  # noqa: E731
  reg = lambda p: 1e10 * jnp.sum(p["w"])  # noqa: E731
  params = {"w": jnp.ones((2, 1), jnp.float32)}
  batch = (jnp.ones((4, 2), jnp.float32), jnp.zeros((4, 1), jnp.float32))
  g = jax.grad(curvax.losses.objective(apply, MSE, reg))(params, batch)
  tx = curvature_step_size(optax.sgd(1e-3), apply, MSE, learning_rate=1e-3,
                           debias=False, regularizer=reg)
  u, state = jax.jit(lambda s: tx.update(g, s, params, batch=batch))(tx.init(params))
  assert np.isfinite(float(state.alpha_absolute)) and float(state.alpha_absolute) > 0
  with np.errstate(over="ignore"):  # the step in float32: alpha* times d = -1e-3 g
    assert not np.any(np.isfinite(state.alpha * np.float32(-1e-3) * np.asarray(g["w"])))
  np.testing.assert_array_equal(u["w"], 0.0)
  assert int(state.num_nonfinite) == 1


def test_nonfinite_proposal_is_zeroed_and_counted():
  params, batch = _quadratic_problem(0)
  tx = curvature_step_size(optax.adam(0.1), linear_apply, MSE, debias=False)
  state = tx.init(params)
  bad = jax.tree.map(lambda p: jnp.full_like(p, jnp.nan), params)
  upd, new_state = tx.update(bad, state, params, batch=batch)
  assert all(bool(jnp.all(l == 0)) for l in jax.tree_util.tree_leaves(upd))
  assert int(new_state.num_nonfinite) == 1 and int(new_state.num_undefined) == 1
  # optax.apply_if_finite around it skips the step and keeps the inner state.
  safe = optax.apply_if_finite(tx, max_consecutive_errors=3)
  s0 = safe.init(params)
  upd, s1 = safe.update(bad, s0, params, batch=batch)
  assert all(bool(jnp.all(l == 0)) for l in jax.tree_util.tree_leaves(upd))
  chex.assert_trees_all_equal(s1.inner_state, s0.inner_state)


# ---------------------------------------------------------------------------
# Composition and errors.

def test_chain_jit_unknown_kwargs_and_inject_hyperparams():
  params, batch = _quadratic_problem(0)
  _, eval_batch = _quadratic_problem(1)
  g = jax.grad(curvax.losses.objective(linear_apply, MSE))(params, batch)
  plain = curvature_step_size(optax.sgd(0.1), linear_apply, MSE)
  u_ref, _ = plain.update(g, plain.init(params), params, batch=batch, eval_batch=eval_batch)

  # inject_hyperparams on the inner optimizer, inside optax.chain, under jit,
  # with a keyword nobody knows.
  inner = optax.inject_hyperparams(optax.sgd)(learning_rate=0.1)
  tx = optax.chain(optax.identity(), curvature_step_size(inner, linear_apply, MSE))
  state = tx.init(params)

  @jax.jit
  @chex.assert_max_traces(n=1)
  def step(g, state, batch, eval_batch):
    return tx.update(g, state, params, batch=batch, eval_batch=eval_batch, value=1.0, foo=2)

  u, state = step(g, state, batch, eval_batch)
  u, state = step(g, state, batch, eval_batch)
  chex.assert_trees_all_close(u, u_ref, rtol=1e-12)

  # inject_hyperparams on the transform itself, under jit: the functions and
  # num_estimates are static (STATIC_ARGS); warmup_steps, interval and the
  # learning rate are injected (traced) hyperparameters.
  make = optax.inject_hyperparams(curvature_step_size,
                                  static_args=curvature_step_size.STATIC_ARGS)
  tx2 = make(optax.sgd(0.1), linear_apply, MSE, learning_rate=0.1)
  s2 = tx2.init(params)
  assert set(s2.hyperparams) == {"learning_rate", "warmup_steps", "interval"}
  u2, s2 = jax.jit(tx2.update)(g, s2, params, batch=batch, eval_batch=eval_batch)
  chex.assert_trees_all_close(u2, u_ref, rtol=1e-12)
  assert float(s2.hyperparams["learning_rate"]) == pytest.approx(0.1)


def test_interval_mode_under_inject_hyperparams_follows_the_injected_schedule():
  # warmup_steps and interval injected (traced): the schedule is the one of a
  # plain transform with the same numbers, step by step.
  params, batch = _quadratic_problem(0)
  _, eval_batch = _quadratic_problem(1)
  kw = dict(mode="interval", warmup_steps=1, interval=3, num_estimates=2)
  plain = curvature_step_size(optax.sgd(0.05), linear_apply, MSE, learning_rate=0.05, **kw)
  injected = optax.inject_hyperparams(
      curvature_step_size, static_args=curvature_step_size.STATIC_ARGS)(
          optax.sgd(0.05), linear_apply, MSE, learning_rate=0.05, **kw)
  loss_fn = curvax.losses.objective(linear_apply, MSE)

  def run(tx):
    @jax.jit
    def step(p, s):
      u, s = tx.update(jax.grad(loss_fn)(p, batch), s, p, batch=batch, eval_batch=eval_batch)
      return optax.apply_updates(p, u), s
    p, s, computed = params, tx.init(params), []
    for _ in range(8):
      p, s = step(p, s)
      computed.append(bool((s.inner_state if hasattr(s, "hyperparams") else s).computed))
    return p, computed

  p_ref, computed_ref = run(plain)
  p_inj, computed_inj = run(injected)
  assert computed_ref == [False, True, True, False, True, True, False, True]
  assert computed_inj == computed_ref
  chex.assert_trees_all_close(p_inj, p_ref, rtol=1e-12)
  unlisted = optax.inject_hyperparams(curvature_step_size, static_args=(
      "inner", "apply_fn", "loss"))(optax.sgd(0.05), linear_apply, MSE, **kw)
  with pytest.raises(TypeError, match="`num_estimates` must be a static Python int"):
    jax.jit(unlisted.update)(params, unlisted.init(params), params, batch=batch,
                             eval_batch=eval_batch)


@pytest.mark.parametrize("debias", [False, True])
def test_hessian_curvature_on_a_loss_valued_model(debias):
  """A model whose output is the per-example loss (DeepOBS's 2-D functions):
  the GGN is zero, so the default measures nothing (alpha undefined, the inner
  step kept); curvature="hessian" steps to the minimiser of the quadratic model
  from the Hessian, measured on eval_batch when debiasing."""
  value_loss = curvax.losses.as_loss(lambda out, tgt: out[..., 0])
  apply_fn = lambda p, x: ((1 - p["u"]) ** 2 + 10 * (p["v"] - p["u"] ** 2) ** 2  # noqa: E731
                           + p["u"] * x[:, 0] + p["v"] * x[:, 1])[:, None]
  params = {"u": jnp.asarray(-0.5), "v": jnp.asarray(1.5)}
  batch = (jax.random.normal(jax.random.PRNGKey(0), (5, 2)), jnp.zeros(5))
  eval_batch = (jax.random.normal(jax.random.PRNGKey(1), (5, 2)), jnp.zeros(5))
  loss_fn = curvax.losses.objective(apply_fn, value_loss)
  g = jax.grad(loss_fn)(params, batch)
  kw = dict(batch=batch, eval_batch=eval_batch) if debias else dict(batch=batch)
  ggn = curvature_step_size(optax.sgd(0.01), apply_fn, value_loss, debias=debias)
  _, s = ggn.update(g, ggn.init(params), params, **kw)
  assert float(s.denominator) == 0.0 and int(s.num_undefined) == 1
  tx = curvature_step_size(optax.sgd(0.01), apply_fn, value_loss, debias=debias,
                           curvature="hessian")
  updates, s = jax.jit(lambda g, s, p: tx.update(g, s, p, **kw))(g, tx.init(params), params)
  d = jax.tree.map(lambda v: -0.01 * v, g)
  along = lambda a: loss_fn(jax.tree.map(lambda p, v: p + a * v, params, d),  # noqa: E731
                            eval_batch if debias else batch)
  np.testing.assert_allclose(s.numerator, jax.grad(along)(0.0), rtol=1e-10)
  np.testing.assert_allclose(s.denominator, jax.grad(jax.grad(along))(0.0), rtol=1e-10)
  assert bool(s.computed) and s.alpha > 0
  chex.assert_trees_all_close(updates, jax.tree.map(lambda v: s.alpha * v, d), rtol=1e-12)
  with pytest.raises(ValueError, match="curvature must be 'ggn' or 'hessian'"):
    curvature_step_size(optax.sgd(0.1), apply_fn, value_loss, curvature="fisher")


def test_clear_errors():
  params, batch = _quadratic_problem(0)
  g = jax.tree.map(jnp.ones_like, params)
  tx = curvature_step_size(optax.sgd(0.1), linear_apply, MSE)
  state = tx.init(params)
  with pytest.raises(TypeError, match="`batch`"):
    tx.update(g, state, params, eval_batch=batch)
  with pytest.raises(TypeError, match="eval_batch.*debias=False"):
    tx.update(g, state, params, batch=batch)
  with pytest.raises(TypeError, match="params"):
    tx.update(g, state, batch=batch, eval_batch=batch)
  with pytest.raises(TypeError, match="eval_batch"):
    tx.update(g, state, params, batch=batch, eval_batch=(batch[0],))
  with pytest.raises(ValueError, match="mode"):
    curvature_step_size(optax.sgd(0.1), linear_apply, MSE, mode="sometimes")
  with pytest.raises(ValueError, match="num_estimates"):
    curvature_step_size(optax.sgd(0.1), linear_apply, MSE, mode="interval", interval=3,
                        num_estimates=5)
  with pytest.raises(ValueError, match="clip"):
    curvature_step_size(optax.sgd(0.1), linear_apply, MSE, clip=(1.0, 0.5))
  with pytest.raises(TypeError, match="inner must be an optax.GradientTransformation"):
    curvature_step_size(0.1, linear_apply, MSE)
  with pytest.raises(ValueError, match="updates"):   # the user's argument, not `direction`
    tx.update({"w": g["w"][:2], "b": g["b"]}, state, params, batch=batch, eval_batch=batch)


# ---------------------------------------------------------------------------
# Schedules, safeguards and state fields on the dictated problem above (the
# estimate a offered at a step is alpha*_abs = a, whatever eta_t is; the update
# applied is -lr whenever eta_t != 0).


def _dictated_run(targets, learning_rate=0.5, **kwargs):
  """Applied learning rates and the states (init first) on dictated estimates."""
  tx = curvature_step_size(optax.sgd(learning_rate), scalar_apply, MSE,
                           learning_rate=learning_rate, **kwargs)
  params, u = {"w": jnp.zeros((1, 1))}, {"w": jnp.ones((1, 1))}
  batch = (jnp.ones((1, 1)), jnp.zeros((1, 1)))
  step = jax.jit(lambda s, eb: tx.update(u, s, params, batch=batch, eval_batch=eb))
  state = tx.init(params)
  lrs, states = [], [state]
  for a in targets:
    x, c = (0.0, 0.0) if a is UNDEF else (1.0, -a)
    upd, state = step(state, (jnp.full((1, 1), x), jnp.full((1, 1), c)))
    lrs.append(float(-upd["w"][0, 0]))
    states.append(state)
  return np.asarray(lrs), states


def _decay(t):
  return 0.5 / (1.0 + t)


def test_every_step_with_schedule_uses_eta_t_and_holds_the_last_warmup_rate():
  # Warm-up runs eta_t; an undefined first estimate keeps the last warm-up
  # learning rate eta_1 (not eta_0); relative alpha is alpha_abs / eta_t.
  lrs, states = _dictated_run([_W, _W, UNDEF, 0.3, -0.4, 0.7], _decay, warmup_steps=2,
                              clip=(0.0, 2.0))
  np.testing.assert_allclose(lrs, [0.5, 0.25, 0.25, 0.3, 0.3, 0.7], rtol=1e-12)
  for t in (3, 5):
    s = states[t + 1]
    np.testing.assert_allclose(s.alpha * _decay(t), s.alpha_absolute, rtol=1e-12)
    np.testing.assert_allclose(s.alpha, lrs[t] / _decay(t), rtol=1e-12)
    np.testing.assert_allclose(s.scale, lrs[t] / _decay(t), rtol=1e-12)
    np.testing.assert_allclose(s.learning_rate, lrs[t], rtol=1e-12)
  # Without warm-up the fallback of the first step is eta_0 (the inner step unchanged).
  lrs, states = _dictated_run([UNDEF, 0.3], _decay)
  np.testing.assert_allclose(states[0].learning_rate, 0.5, rtol=1e-12)
  np.testing.assert_allclose(states[0].held_learning_rate, 0.5, rtol=1e-12)
  np.testing.assert_allclose(lrs, [0.5, 0.3], rtol=1e-12)
  np.testing.assert_allclose(states[1].scale, 1.0, rtol=1e-12)


def test_interval_with_schedule_holds_last_warmup_rate_unclipped():
  # warm-up t0, t1 follow eta_t; the first window (t2, t3) runs the last warm-up
  # learning rate 0.25 although clip caps derived rates at 0.15; then the median
  # of 0.3 and 0.1, clipped.
  lrs, states = _dictated_run([_W, _W, 0.3, 0.1, _W, 0.2], _decay, mode="interval",
                              warmup_steps=2, interval=3, num_estimates=2, clip=(0.0, 0.15))
  np.testing.assert_allclose(lrs, [0.5, 0.25, 0.25, 0.25, 0.15, 0.15], rtol=1e-12)
  np.testing.assert_allclose([s.learning_rate for s in states[1:]], lrs, rtol=1e-12)
  np.testing.assert_allclose([s.held_learning_rate for s in states[1:]],
                             [0.5, 0.25, 0.25, 0.15, 0.15, 0.15], rtol=1e-12)


def test_zero_estimate_is_neither_applied_nor_counted_negative():
  # a = 0: the eval gradient is zero, so d'g = 0 and alpha* = 0 (defined).
  lrs, states = _dictated_run([0.3, 0.0, UNDEF])
  np.testing.assert_allclose(lrs, [0.3, 0.3, 0.3], rtol=1e-12)
  assert float(states[2].alpha) == 0.0 and float(states[2].denominator) > 0
  s = states[-1]
  assert (int(s.num_computed), int(s.num_negative), int(s.num_undefined)) == (3, 0, 1)
  # interval, positive_only: 0 is not a usable estimate -> median(0.2, 0.4, 0.3).
  records, _, _ = _run_schedule([_W, _W, 0.0, 0.2, 0.4, 0.3, _W])
  np.testing.assert_allclose(records[-1][0], 0.3, rtol=1e-12)


def test_infinite_estimate_is_never_applied_nor_enters_the_median():
  # a = 1e308: alpha* = a / eta overflows (finite d'g and d'Gd, alpha = inf).
  lrs, states = _dictated_run([0.3, 1e308, 0.7], clip=(0.0, 2.0))
  assert np.isinf(float(states[2].alpha)) and np.isfinite(float(states[2].denominator))
  np.testing.assert_allclose(lrs, [0.3, 0.3, 0.7], rtol=1e-12)
  assert int(states[-1].num_nonfinite) == 0 and int(states[-1].num_undefined) == 0
  for positive_only in (True, False):
    records, _, _ = _run_schedule([_W, _W, 0.2, 1e308, 0.4, 0.3, _W],
                                  positive_only=positive_only)
    np.testing.assert_allclose(records[-1][0], 0.3, rtol=1e-12)  # median(0.2, 0.4, 0.3)


def test_interval_estimates_window_by_window():
  """``estimates`` holds the current window's usable values (NaN elsewhere):
  reset when a window starts, untouched outside windows."""
  n = np.nan
  w2 = [0.1, 0.9, 0.3, 0.5]
  # positive_only=True: usable = defined and positive.
  _, states = _dictated_run(_TARGETS, mode="interval", warmup_steps=2, interval=5,
                            num_estimates=4, positive_only=True)
  w1 = [0.2, n, 0.4, 0.3]
  expected = ([[n] * 4] * 2
              + [[0.2, n, n, n], [0.2, n, n, n], [0.2, n, 0.4, n], w1, w1]
              + [[0.1, n, n, n], [0.1, 0.9, n, n], [0.1, 0.9, 0.3, n], w2, w2]
              + [[n] * 4] * 5 + [[0.7, n, n, n]])
  np.testing.assert_allclose(np.stack([s.estimates for s in states[1:]]), expected,
                             rtol=1e-12)
  # The default (the seed's rule): every defined estimate, negative ones too.
  _, states = _dictated_run(_TARGETS, mode="interval", warmup_steps=2, interval=5,
                            num_estimates=4)
  w1, w3 = [0.2, -0.1, 0.4, 0.3], [-0.2, n, -0.6, -0.1]
  expected = ([[n] * 4] * 2
              + [[0.2, n, n, n], [0.2, -0.1, n, n], [0.2, -0.1, 0.4, n], w1, w1]
              + [[0.1, n, n, n], [0.1, 0.9, n, n], [0.1, 0.9, 0.3, n], w2, w2]
              + [[-0.2, n, n, n], [-0.2, n, n, n], [-0.2, n, -0.6, n], w3, w3]
              + [[0.7, n, n, n]])
  np.testing.assert_allclose(np.stack([s.estimates for s in states[1:]]), expected,
                             rtol=1e-12)
  # window 1's median (0.2, -0.1, 0.4, 0.3) = 0.25; window 3's is negative: kept.
  np.testing.assert_allclose([s.held_learning_rate for s in states][7], 0.25, rtol=1e-12)


def test_measured_fields_are_kept_on_steps_without_curvature():
  # _TARGETS: t5 (estimate 0.3) computes; t6 does not. With eta = 0.5, c = -0.3:
  # d = -0.5, g = 0.3, G = 1.
  _, states = _dictated_run(_TARGETS, mode="interval", warmup_steps=2, interval=5,
                            num_estimates=4, diagnostics=True)
  fields = ("alpha", "alpha_absolute", "numerator", "denominator", "eval_loss",
            "hybrid", "cos_batch", "cos_eval", "direction_norm", "biased_denominator")
  for t in (0, 1):  # warm-up: nothing measured yet
    assert all(np.isnan(float(getattr(states[t + 1], f))) for f in fields)
  want = dict(alpha=0.6, alpha_absolute=0.3, numerator=-0.15, denominator=0.25,
              eval_loss=0.045, hybrid=0.15 / 0.25, cos_batch=1.0, cos_eval=1.0,
              direction_norm=0.5, biased_denominator=0.25)
  for s in (states[6], states[7]):
    for f, v in want.items():
      np.testing.assert_allclose(getattr(s, f), v, rtol=1e-12, err_msg=f)
  assert bool(states[6].computed) and not bool(states[7].computed)


def test_zero_inner_learning_rate_gives_a_zero_step_without_nonfinite():
  # eta_1 = 0: d = 0 (undefined alpha*), scale = lr / eta is taken as 0.
  sched = lambda t: jnp.where(t == 1, 0.0, 0.5)  # noqa: E731
  for kw in (dict(), dict(warmup_steps=2)):
    lrs, states = _dictated_run([0.3, 0.3, 0.7], sched, **kw)
    assert lrs[1] == 0.0 and float(states[2].scale) == 0.0
    assert int(states[-1].num_nonfinite) == 0


@pytest.mark.parametrize("diagnostics", [False, True])
def test_biased_fields_without_diagnostics(diagnostics):
  """Debiasing without diagnostics: the biased and cosine fields are NaN; not
  debiasing, the biased parts are the (free) evaluation ones."""
  params, batch = _quadratic_problem(0)
  _, eval_batch = _quadratic_problem(1)
  g = jax.grad(curvax.losses.objective(linear_apply, MSE))(params, batch)
  d = jax.tree.map(lambda v: -0.1 * v, g)
  tx = curvature_step_size(optax.sgd(0.1), linear_apply, MSE, learning_rate=0.1,
                           diagnostics=diagnostics)
  _, s = jax.jit(tx.update)(g, tx.init(params), params, batch=batch, eval_batch=eval_batch)
  assert np.isfinite(float(s.alpha))
  diag = ("biased_numerator", "biased_denominator", "hybrid", "cos_batch", "cos_eval",
          "direction_norm")
  for f in diag:
    assert np.isnan(float(getattr(s, f))) != diagnostics, f
  if diagnostics:
    np.testing.assert_allclose(s.biased_numerator, optax.tree_utils.tree_vdot(d, g),
                               rtol=1e-12)
  biased = curvature_step_size(optax.sgd(0.1), linear_apply, MSE, learning_rate=0.1,
                               debias=False, diagnostics=diagnostics)
  _, s = jax.jit(biased.update)(g, biased.init(params), params, batch=batch)
  np.testing.assert_allclose(s.biased_numerator, s.numerator, rtol=1e-10)
  np.testing.assert_allclose(s.biased_denominator, s.denominator, rtol=1e-12)
  np.testing.assert_allclose(s.hybrid, s.alpha, rtol=1e-12)
  assert np.isnan(float(s.cos_batch)) != diagnostics


def test_debias_diagnostics_with_a_regularizer_against_dense_hessians():
  """hybrid, cos_eval and alpha include r, checked against float64 dense Hessians
  of the objectives (linear model + MSE: GGN = Hessian)."""
  from jax.flatten_util import ravel_pytree
  params, batch = _quadratic_problem(0)
  _, eval_batch = _quadratic_problem(1)
  reg = curvax.losses.l2_regularizer(0.7)
  obj = curvax.losses.objective(linear_apply, MSE, reg)
  g = jax.grad(obj)(params, batch)
  tx = curvature_step_size(optax.sgd(0.1), linear_apply, MSE, learning_rate=0.1,
                           regularizer=reg, diagnostics=True)
  _, s = jax.jit(tx.update)(g, tx.init(params), params, batch=batch, eval_batch=eval_batch)
  theta, unravel = ravel_pytree(params)
  flat_obj = lambda th, b: obj(unravel(th), b)  # noqa: E731
  d = -0.1 * np.asarray(ravel_pytree(g)[0])
  g_eval = np.asarray(jax.jit(jax.grad(flat_obj))(theta, eval_batch))
  hessian = jax.jit(jax.hessian(flat_obj))
  num = d @ g_eval
  den_eval = d @ np.asarray(hessian(theta, eval_batch)) @ d
  den_batch = d @ np.asarray(hessian(theta, batch)) @ d
  np.testing.assert_allclose(s.numerator, num, rtol=1e-10)
  np.testing.assert_allclose(s.alpha, -num / den_eval, rtol=1e-10)
  np.testing.assert_allclose(s.biased_denominator, den_batch, rtol=1e-10)
  np.testing.assert_allclose(s.hybrid, -num / den_batch, rtol=1e-10)
  np.testing.assert_allclose(s.cos_eval, -num / (np.linalg.norm(d) * np.linalg.norm(g_eval)),
                             rtol=1e-10)


def test_mixed_precision_update_keeps_each_leaf_dtype():
  params, batch = _quadratic_problem(0)
  params = {"w": params["w"].astype(jnp.float32), "b": params["b"].astype(jnp.bfloat16)}
  batch = jax.tree.map(lambda a: a.astype(jnp.float32), batch)
  g = jax.grad(curvax.losses.objective(linear_apply, MSE))(params, batch)
  tx = curvature_step_size(optax.sgd(0.1), linear_apply, MSE, learning_rate=0.1,
                           debias=False)
  state = tx.init(params)
  assert state.alpha.dtype == jnp.float32 and state.estimates.dtype == jnp.float32
  u, state = jax.jit(lambda s: tx.update(g, s, params, batch=batch))(state)
  assert u["w"].dtype == jnp.float32 and u["b"].dtype == jnp.bfloat16
  assert state.alpha.dtype == jnp.float32 and np.isfinite(float(state.alpha))


def test_constructor_boundaries():
  # interval == num_estimates: every step after warm-up computes.
  _, states = _dictated_run([_W, 0.2, 0.4, 0.6], mode="interval", warmup_steps=1,
                            interval=2, num_estimates=2)
  assert [bool(s.computed) for s in states[1:]] == [False, True, True, True]
  _dictated_run([0.2], clip=(0.5, 0.5))  # lo == hi is allowed
  with pytest.raises(ValueError, match="warmup_steps"):
    curvature_step_size(optax.sgd(0.1), linear_apply, MSE, warmup_steps=-1)
  with pytest.raises(ValueError, match="num_estimates"):
    curvature_step_size(optax.sgd(0.1), linear_apply, MSE, mode="interval", num_estimates=0)
  with pytest.raises(ValueError, match="clip"):
    curvature_step_size(optax.sgd(0.1), linear_apply, MSE, clip=(-0.1, 1.0))


def test_state_packs_its_scalars_into_two_arrays():
  # Each array of a state costs host time per jitted call (docs/performance.md):
  # the scalars live in ``values`` and ``counts`` and are read by name.
  params, batch = _quadratic_problem(0)
  inner = optax.adam(0.1)
  tx = curvature_step_size(inner, linear_apply, MSE, debias=False, learning_rate=0.5)
  state = tx.init(params)
  n_inner = len(jax.tree_util.tree_leaves(inner.init(params)))
  assert len(jax.tree_util.tree_leaves(state)) == n_inner + 2  # values (+ estimates), counts
  assert int(state.count) == 0 and state.estimates.shape == (1,)
  grads = jax.grad(curvax.losses.objective(linear_apply, MSE))(params, batch)
  _, state = jax.jit(functools.partial(tx.update, batch=batch))(grads, state, params)
  scalars = state.scalars()
  assert list(scalars) == list(state._scalar_names)
  assert all(jnp.shape(v) == () for v in scalars.values())
  assert scalars["computed"].dtype == jnp.bool_ and bool(scalars["computed"])
  assert int(state.num_computed) == 1 and int(state.num_nonfinite) == 0
  assert int(state.count) == 1
  np.testing.assert_allclose(state.estimates, [state.alpha_absolute], rtol=1e-6)
  np.testing.assert_allclose(state.alpha_absolute, state.alpha * 0.5, rtol=1e-6)
  assert float(state.alpha) > 0
  np.testing.assert_allclose(state.scale, state.alpha, rtol=1e-6)
  np.testing.assert_allclose(state.learning_rate, state.alpha_absolute, rtol=1e-6)
