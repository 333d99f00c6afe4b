"""Tests of curvax.diagnostics: instruments against numpy on explicit per-example
gradients / Hessians, known limits, Alpha on quadratics, the monitor wrapper."""

from __future__ import annotations

import functools
import json

import jax
import jax.flatten_util
import jax.numpy as jnp
import numpy as np
import optax
import pytest

import curvax
from curvax import diagnostics as dg
from curvax._packed import PackedTree
from tests import reference as ref

RTOL = 1e-8


def _pe_grads(apply_fn, loss, params, batch):
  """(B, P) per-example gradients: the Jacobian of the per-example losses
  w.r.t. the flat parameters (one jacrev; same as ref.explicit_per_example_grads)."""
  flat, unravel = jax.flatten_util.ravel_pytree(params)
  x, y = batch
  return np.asarray(jax.jit(jax.jacrev(lambda w: loss(apply_fn(unravel(w), x), y)))(flat))


@functools.lru_cache(maxsize=None)
def _setup(model="mlp", loss_name="softmax_cross_entropy", n=6, seed=0):
  apply_fn, loss, params, batch = ref.problem(model, loss_name, n=n, seed=seed)
  g_flat = _pe_grads(apply_fn, loss, params, batch)
  x, y = batch

  def one(xi, yi):
    return jax.grad(lambda p: loss(apply_fn(p, xi[None]), yi[None])[0])(params)

  pe_tree = jax.jit(jax.vmap(one))(x, y)
  return apply_fn, loss, params, batch, g_flat, pe_tree


def _np_tests(g):
  b = g.shape[0]
  gm = g.mean(0)
  gsq = gm @ gm
  sq = (g ** 2).sum(1)
  dots = g @ gm
  norm = np.sqrt((sq.sum() - b * gsq) / (b * (b - 1) * gsq))
  inner = np.sqrt(((dots ** 2).sum() - b * gsq ** 2) / (b * (b - 1) * gsq ** 2))
  ortho = np.sqrt((sq.sum() - (dots ** 2).sum() / gsq) / (b * (b - 1) * gsq))
  return norm, inner, ortho


@pytest.mark.parametrize("model", ["mlp", "cnn"])
def test_gradient_tests_and_noise_match_numpy(model):
  _, _, _, _, g, pe = _setup(model)
  b, d = g.shape
  sq, dots = jax.jit(dg.gram_statistics)(pe)
  np.testing.assert_allclose(sq, (g ** 2).sum(1), rtol=RTOL)
  np.testing.assert_allclose(dots, g @ g.mean(0), rtol=RTOL)
  want = _np_tests(g)
  got = [dg.norm_test(sq, dots), dg.inner_test(sq, dots), dg.ortho_test(sq, dots)]
  np.testing.assert_allclose(got, want, rtol=1e-7)

  mean = jax.tree_util.tree_map(lambda t: t.mean(0), pe)
  second = jax.tree_util.tree_map(lambda t: (t ** 2).mean(0), pe)
  gm, m = g.mean(0), (g ** 2).mean(0)
  np.testing.assert_allclose(dg.mean_gsnr(mean, second),
                             np.mean(gm ** 2 / (m - gm ** 2 + 1e-5)), rtol=1e-7)
  var_sum = ((g - gm) ** 2).sum() / b
  np.testing.assert_allclose(dg.cabs(mean, second, 0.7, 0.1), 0.1 * var_sum / 0.7, rtol=1e-7)
  sigma2 = ((g - gm) ** 2).sum(0) / (b - 1) + 1e-5
  np.testing.assert_allclose(dg.early_stopping(mean, second, b),
                             1 - b / d * np.sum(gm ** 2 / sigma2), rtol=1e-7)


def test_gradient_tests_known_limits():
  """Identical per-example gradients: no noise, every test value is exactly 0;
  B orthogonal gradients of equal norm: ortho test from the closed form."""
  row = np.array([0.3, -1.2, 0.5, 2.0])
  g = np.tile(row, (5, 1))
  sq, dots = dg.gram_statistics(jnp.asarray(g))
  assert float(dg.norm_test(sq, dots)) == 0.0
  assert float(dg.inner_test(sq, dots)) == 0.0
  # sum ||g_i||^2 - sum (g_i'g)^2/||g||^2 cancels only to round-off
  assert float(dg.ortho_test(sq, dots)) < 1e-6
  # identical examples: zero variance everywhere -> EB criterion very negative (keep going)
  second = jnp.asarray(row ** 2)
  assert float(dg.early_stopping(jnp.asarray(row), second, 5)) < -1e4
  assert float(dg.cabs(jnp.asarray(row), second, 1.0, 0.1)) == pytest.approx(0.0, abs=1e-12)
  # e_1, ..., e_B: g = 1/B * ones, g_i'g = 1/B, ||g||^2 = 1/B
  b = 4
  g = np.eye(b)
  sq, dots = dg.gram_statistics(jnp.asarray(g))
  np.testing.assert_allclose(dg.inner_test(sq, dots), 0.0, atol=1e-12)  # equal projections
  np.testing.assert_allclose(dg.norm_test(sq, dots), np.sqrt((b - 1) / (b - 1)), rtol=1e-12)
  np.testing.assert_allclose(dg.ortho_test(sq, dots), np.sqrt((b - 1) / (b - 1)), rtol=1e-12)


def test_gradient_tests_on_parallel_gradients_and_reference_thresholds():
  """g_i = c_i r (all parallel): nothing orthogonal, so OrthoTest is 0 up to
  round-off, whose negative part is clipped (not a NaN from the square root);
  NormTest and InnerTest both reduce to ``std(c) / (sqrt(B) |mean(c)|)`` (the
  unbiased std). Reference thresholds: 0.9, 0.9 and tan 80 degrees."""
  rng = np.random.default_rng(0)
  for _ in range(20):   # several draws: some numerators round below zero
    c, r = rng.uniform(0.5, 2.0, size=5), rng.normal(size=7)
    sq, dots = dg.gram_statistics(jnp.asarray(c[:, None] * r))
    ortho = float(dg.ortho_test(sq, dots))
    assert np.isfinite(ortho) and 0.0 <= ortho < 1e-6
    want = np.std(c, ddof=1) / (np.sqrt(c.size) * abs(c.mean()))
    np.testing.assert_allclose(dg.norm_test(sq, dots), want, rtol=1e-10)
    np.testing.assert_allclose(dg.inner_test(sq, dots), want, rtol=1e-10)
  assert dg.NORM_TEST_THRESHOLD == dg.INNER_TEST_THRESHOLD == 0.9
  np.testing.assert_allclose(dg.ORTHO_TEST_THRESHOLD, np.tan(np.deg2rad(80.0)), rtol=1e-12)


def test_norms_histograms_match_numpy():
  _, _, params, _, g, pe = _setup("cnn")
  init = jax.tree_util.tree_map(lambda p: 0.5 * p, params)
  layers = dg.layer_norms(params)
  for k in params:
    np.testing.assert_allclose(layers[k], np.linalg.norm(np.asarray(params[k]).ravel()))
  np.testing.assert_allclose(dg.global_norm_from_layers(layers),
                             np.linalg.norm(ref.flat(params)), rtol=RTOL)
  np.testing.assert_allclose(dg.distance(params, init), 0.5 * np.linalg.norm(ref.flat(params)),
                             rtol=RTOL)
  np.testing.assert_allclose(dg.gradient_norm(params), np.linalg.norm(ref.flat(params)),
                             rtol=RTOL)
  np.testing.assert_allclose(dg.update_size(init), 0.5 * np.linalg.norm(ref.flat(params)),
                             rtol=RTOL)
  # scale so that some entries fall outside (-2, 2) and get clamped into edge bins
  big = jax.tree_util.tree_map(lambda t: 30.0 * t, pe)
  counts = jax.jit(dg.gradient_histogram)(big)
  want, _ = np.histogram(np.clip(30.0 * g.ravel(), -2, 2 - 1e-12), bins=100, range=(-2, 2))
  assert counts.sum() == g.size and (counts[0] > 0 or counts[-1] > 0)
  np.testing.assert_array_equal(counts, want)
  # layer-wise (per tensor, here with a non-default layout), and the edges
  layer_counts = dg.layer_gradient_histograms(big, 8, (-1.0, 0.5))
  sizes = [p.size for p in jax.tree_util.tree_leaves(params)]
  for c, block in zip(jax.tree_util.tree_leaves(layer_counts),
                      np.split(30.0 * g, np.cumsum(sizes)[:-1], axis=1)):
    np.testing.assert_array_equal(
        c, np.histogram(np.clip(block, -1.0, 0.5 - 1e-12), bins=8, range=(-1.0, 0.5))[0])
  np.testing.assert_allclose(dg.bin_edges(8, (-1.0, 0.5)), np.histogram_bin_edges(
      [], bins=8, range=(-1.0, 0.5)), rtol=1e-12)
  # 2-D: (g_ij, theta_j) pairs
  theta = np.broadcast_to(ref.flat(params), g.shape)
  h2 = jax.jit(dg.gradient_parameter_histogram)(big, params)
  want2, _, _ = np.histogram2d(np.clip(30.0 * g.ravel(), -1, 1 - 1e-12),
                               np.clip(theta.ravel(), -2, 2 - 1e-12), bins=(40, 50),
                               range=((-1, 1), (-2, 2)))
  np.testing.assert_array_equal(h2, want2)


def test_curvature_instruments_match_explicit_hessian():
  apply_fn, loss, params, batch, g, pe = _setup("mlp")
  h = np.asarray(ref.explicit_hessian(apply_fn, loss, params, batch))
  _, unravel = jax.flatten_util.ravel_pytree(params)
  diag = unravel(jnp.asarray(np.diag(h)))
  second = jax.tree_util.tree_map(lambda t: (t ** 2).mean(0), pe)
  m = (g ** 2).mean(0)
  np.testing.assert_allclose(dg.hessian_trace(diag), np.trace(h), rtol=RTOL)
  sizes = [p.size for p in jax.tree_util.tree_leaves(params)]
  np.testing.assert_allclose(jax.tree_util.tree_leaves(dg.layer_traces(diag)),
                             [b.sum() for b in np.split(np.diag(h), np.cumsum(sizes)[:-1])],
                             rtol=RTOL)
  np.testing.assert_allclose(dg.tic_trace(second, dg.hessian_trace(diag)),
                             m.sum() / (np.trace(h) + 1e-7), rtol=RTOL)
  np.testing.assert_allclose(dg.tic_diag(second, diag), np.sum(m / (np.diag(h) + 1e-7)),
                             rtol=RTOL)
  mv = curvax.curvature.hessian_matvec(curvax.losses.objective(apply_fn, loss), params, batch)
  lam = jax.jit(lambda k: dg.top_eigenvalue(mv, params, k, max_iter=500, rtol=1e-10,
                                            atol=0.0))(jax.random.PRNGKey(1))
  ev = np.linalg.eigvalsh(h)
  np.testing.assert_allclose(lam, ev[np.argmax(np.abs(ev))], rtol=1e-5)


@pytest.mark.parametrize("kwargs", [{}, {"atol": 10.0}, {"rtol": 1e-8, "atol": 0.0}])
def test_top_eigenvalue_start_vector_and_stopping_rule(kwargs):
  """Power iteration as the spec's HessMaxEV: a uniform-random start vector,
  normalised; one product per iteration; it stops after product k >= 2 once
  the Rayleigh quotients v_k'Av_k of the last two agree to rtol (1e-3) and atol
  (1e-6), else after max_iter (100) products, and returns the last quotient.
  The rule applied in numpy to the vectors the matvec was called with: the
  defaults (stops after a few products), an atol so loose that only the
  k >= 2 guard keeps it going, and a tolerance never met (the cap)."""
  rng = np.random.default_rng(4)
  q, _ = np.linalg.qr(rng.normal(size=(6, 6)))
  a = q @ np.diag([5.0, 4.5, 1.0, -2.0, 0.3, 0.0]) @ q.T
  seen = []

  def matvec(v):   # a tree of two leaves
    x = jnp.concatenate([v["u"], v["w"]])
    jax.debug.callback(lambda x: seen.append(np.asarray(x, np.float64)), x, ordered=True)
    y = jnp.asarray(a) @ x
    return {"u": y[:2], "w": y[2:]}

  params = {"u": jnp.zeros(2), "w": jnp.zeros(4)}
  lam = dg.top_eigenvalue(matvec, params, jax.random.PRNGKey(3), **kwargs)
  jax.effects_barrier()
  rtol, atol = kwargs.get("rtol", 1e-3), kwargs.get("atol", 1e-6)
  quot = [v @ a @ v for v in seen]
  want_k = next((k for k in range(2, 101) if k <= len(quot)
                 and abs(quot[k - 1] - quot[k - 2]) <= atol + rtol * abs(quot[k - 1])), 100)
  assert len(seen) == want_k and want_k == {0: 7, 1: 2, 2: 100}[len(kwargs)]
  np.testing.assert_allclose(lam, quot[-1], rtol=1e-12)
  assert np.all(seen[0] >= 0) and np.linalg.norm(seen[0]) == pytest.approx(1.0, rel=1e-12)


def _np_alpha(f, df, var, tau1):
  phi = np.array([[1, 0, 0], [1, tau1, tau1 ** 2], [0, 1, 0], [0, 1, 2 * tau1]], float)
  var = np.where(np.asarray(var) == 0, 1e-10, var)
  w = np.linalg.solve(phi.T @ (phi / var[:, None]), phi.T @ (np.r_[f, df] / var))
  if w[2] <= 0:
    return -1.0
  return tau1 / (-w[1] / (2 * w[2])) - 1


def test_alpha_fit_matches_weighted_least_squares():
  rng = np.random.default_rng(0)
  fit = jax.jit(dg.alpha_from_fit)
  for _ in range(5):
    f0, f1, df0, df1 = rng.normal(size=4)
    df0 = -abs(df0)
    var = rng.uniform(0.1, 2.0, size=4)
    tau1 = rng.uniform(0.1, 2.0)
    got = fit(f0, f1, df0, df1, *var, tau1)
    np.testing.assert_allclose(got, _np_alpha([f0, f1], [df0, df1], var, tau1), rtol=1e-8)
  # concave fit -> -1; zero step -> -1
  assert float(fit(0.0, -1.0, -1.0, -5.0, 1.0, 1.0, 1.0, 1.0, 1.0)) == -1.0
  assert float(fit(0.0, 0.0, -1.0, -1.0, 1.0, 1.0, 1.0, 1.0, 0.0)) == -1.0
  # flat fit (w_1 = w_2 = 0: a linear fit, tau_* -> inf) -> -1, not 0 / 0
  assert float(fit(1.0, 1.0, 0.0, 0.0, 1.0, 1.0, 1.0, 1.0, 1.0)) == -1.0
  # zero step -> -1 even where the fit fails (spec: None, or -1 when tau_1 = 0)
  assert float(fit(1.0, np.nan, -1.0, 1.0, 1.0, 1.0, 1.0, 1.0, 0.0)) == -1.0
  assert np.isnan(fit(1.0, np.nan, -1.0, 1.0, 1.0, 1.0, 1.0, 1.0, 1.0))


def test_alpha_from_per_example_observations_matches_weighted_least_squares():
  """`alpha` from per-example losses and projections s'g_i at both ends (batch
  sizes 5 and 7, so the unbiased variances do not share one scale factor):
  slopes are the projections over ||s||, noise levels the 1/(B-1) sample
  variances; against the normal equations in numpy. A zero step gives -1;
  `sample_variance` of one example is 0."""
  rng = np.random.default_rng(2)
  losses0, losses1 = rng.uniform(1.0, 2.0, 5), rng.uniform(0.5, 1.5, 7)
  proj0, proj1 = rng.normal(-0.8, 0.3, 5), rng.normal(0.3, 0.4, 7)
  tau = 0.37
  want = _np_alpha([losses0.mean(), losses1.mean()], [proj0.mean() / tau, proj1.mean() / tau],
                   [losses0.var(ddof=1), losses1.var(ddof=1), (proj0 / tau).var(ddof=1),
                    (proj1 / tau).var(ddof=1)], tau)
  assert want != -1.0
  got = jax.jit(dg.alpha)(losses0, losses1, proj0, proj1, tau)
  np.testing.assert_allclose(got, want, rtol=1e-9)
  assert float(dg.alpha(losses0, losses1, 0 * proj0, 0 * proj1, 0.0)) == -1.0
  np.testing.assert_allclose(dg.sample_variance(jnp.asarray(losses1)), losses1.var(ddof=1),
                             rtol=1e-12)
  assert float(dg.sample_variance(jnp.asarray([3.0]))) == 0.0


@pytest.mark.parametrize("tau1,want", [(0.5, -0.5), (1.0, 0.0), (2.0, 1.0)])
def test_alpha_exact_on_noise_free_quadratic(tau1, want):
  """f(tau) = (tau - 1)^2 observed exactly (zero variances): alpha = tau1 - 1."""
  f = lambda t: (t - 1.0) ** 2
  df = lambda t: 2 * (t - 1.0)
  got = dg.alpha_from_fit(f(0.0), f(tau1), df(0.0), df(tau1), 0.0, 0.0, 0.0, 0.0, tau1)
  np.testing.assert_allclose(got, want, atol=1e-9)


def _exact_alpha(f0, f1, df0, df1, *var_tau):
  """Alpha of the normal equations solved in exact rational arithmetic."""
  from fractions import Fraction  # pylint: disable=g-import-not-at-top
  *var, t = [Fraction(float(v)) for v in var_tau]
  var = [v if v else Fraction(1e-10) for v in var]
  phi = [[1, 0, 0], [1, t, t * t], [0, 1, 0], [0, 1, 2 * t]]
  y = [Fraction(float(v)) for v in (f0, f1, df0, df1)]
  a = [[sum(phi[k][i] * phi[k][j] / var[k] for k in range(4)) for j in range(3)]
       + [sum(phi[k][i] * y[k] / var[k] for k in range(4))] for i in range(3)]
  for i in range(3):  # Gaussian elimination, then back substitution
    for r in range(i + 1, 3):
      a[r] = [x - a[r][i] / a[i][i] * z for x, z in zip(a[r], a[i])]
  w = [Fraction(0)] * 3
  for i in (2, 1, 0):
    w[i] = (a[i][3] - sum(a[i][c] * w[c] for c in range(i + 1, 3))) / a[i][i]
  return -1.0 if w[2] <= 0 else float(t / (-w[1] / (2 * w[2])) - 1)


def test_alpha_float32_agrees_with_the_exact_fit():
  """JAX's default float32: the normal equations square the condition number
  of the whitened rows (short steps, variances over decades) and gave NaN or
  wrong alphas; the closed-form fit is within a few eps (1 + |alpha|)^2 of the
  exact fit (alpha = -g1_hat / g0_hat: a relative error eps in g0_hat is
  eps |alpha| in alpha), and within 1e-12 in float64 (the old float64 normal
  equations: 6e-6 on this sweep). Cases: zero variances, late-phase steps of a
  float32 monitor run (NaN and a 60x error before), a random sweep."""
  cases = [(2.3, 2.29, -1.0, -0.9, 0.0, 0.0, 1.0, 1.0, 0.01),
           (2.3, 2.25, -1.0, -0.2, 0.5, 0.0, 1.0, 1.0, 0.1),
           (8.37814699e-04, 3.30059675e-06, -8.97669779e-03, -3.26379055e-07,
            2.13684645e-05, 1.01899676e-11, 2.56924741e-03, 1.64214053e-13, 0.0179533958),
           (7.89238366e-04, 2.62259669e-06, -6.57733909e-03, -3.94173182e-07,
            1.98221565e-05, 8.56038056e-12, 1.38414389e-03, 1.75690033e-12, 0.0131546781),
           (0.00183577, 8.02780739e-06, -0.0163, 3.09656309e-06, 0.00010746,
            3.32398673e-10, 0.00850186, 4.24535480e-10, 0.0326000033)]
  rng = np.random.default_rng(1)
  n = 200
  tau = 10 ** rng.uniform(-4, 0, n)
  var = 10 ** rng.uniform(-8, 1, (4, n))
  curv = 10 ** rng.uniform(-1, 3, n)
  slope = -(10 ** rng.uniform(-3, 1, n))
  f0 = rng.uniform(0, 3, n)
  noise = 0.1 * rng.normal(size=(3, n)) * np.sqrt(var[1:])
  f1 = f0 + slope * tau + 0.5 * curv * tau ** 2 + noise[0]
  obs = np.stack([f0, f1, slope + noise[1], slope + curv * tau + noise[2], *var, tau])
  obs = np.concatenate([np.asarray(cases).T, obs], axis=1).astype(np.float32)
  want = np.array([_exact_alpha(*col) for col in obs.T])
  fit = jax.jit(jax.vmap(dg.alpha_from_fit))
  got = fit(*jnp.asarray(obs, jnp.float32))
  assert got.dtype == jnp.float32
  err = np.abs(np.asarray(got, np.float64) - want)
  eps = np.finfo(np.float32).eps
  assert np.all(err <= 10 * eps * (1 + np.abs(want)) ** 2), (np.nanmax(err), np.isnan(err).sum())
  np.testing.assert_allclose(fit(*jnp.asarray(obs, jnp.float64)), want, rtol=1e-12)
  # zero variances, exact data: the float32 fit is exact to rounding
  f = lambda t: (t - 1.0) ** 2
  for tau1 in (0.5, 0.01):
    args = [f(0.0), f(tau1), -2.0, 2 * (tau1 - 1.0), 0.0, 0.0, 0.0, 0.0, tau1]
    got = dg.alpha_from_fit(*[jnp.float32(x) for x in args])
    np.testing.assert_allclose(got, tau1 - 1.0, rtol=1e-5)
  # NaN observations give NaN, as a failed fit; a zero step -1
  nan = dg.alpha_from_fit(*[jnp.float32(x) for x in (1.0, np.nan, -1, 1, 1, 1, 1, 1, 1)])
  assert np.isnan(nan) and nan.dtype == jnp.float32
  assert float(dg.alpha_from_fit(*[jnp.float32(x) for x in (1, 1, -1, 1, 1, 1, 1, 1, 0)])) == -1


def _linear_mse_problem(n=8, seed=0):
  """Linear model + MSE: the loss is an exact quadratic in the parameters."""
  key = jax.random.PRNGKey(seed)
  kx, ky, kw = jax.random.split(key, 3)
  x = jax.random.normal(kx, (n, 3))
  y = jax.random.normal(ky, (n, 2))
  params = {"w": jax.random.normal(kw, (3, 2)), "b": jnp.zeros(2)}
  apply_fn = lambda p, xx: xx @ p["w"] + p["b"]
  return apply_fn, curvax.losses.mean_squared_error, params, (x, y)


def test_monitor_alpha_exact_on_quadratic_and_economy_values():
  """SGD on a quadratic objective, the same batch at both ends: the four
  observations are exact samples of the 1-D quadratic, so the fit is exact and
  alpha = tau1 / tau* - 1 with tau* = -u'g / u'Hu."""
  apply_fn, loss, params, batch = _linear_mse_problem()
  lr = 0.3
  tx = dg.monitor(optax.sgd(lr), apply_fn, loss, "economy")
  state = tx.init(params)
  step = jax.jit(lambda u, s, p, b: tx.update(u, s, p, batch=b))
  obj = curvax.losses.objective(apply_fn, loss)
  grads = jax.grad(obj)(params, batch)
  upd, state = step(grads, state, params, batch)
  rec0 = dg.record(state)
  params1 = optax.apply_updates(params, upd)
  upd1, state = step(jax.grad(obj)(params1, batch), state, params1, batch)
  rec1 = dg.record(state)

  g = ref.flat(grads)
  h = np.asarray(ref.explicit_hessian(apply_fn, loss, params, batch))
  s = -lr * np.asarray(g)
  u = s / np.linalg.norm(s)
  tau_star = -(u @ g) / (u @ h @ u)
  assert rec1["alpha_step"] == 0
  np.testing.assert_allclose(rec1["alpha"], np.linalg.norm(s) / tau_star - 1, rtol=1e-7)

  # economy values at step 0 against numpy
  gpe = np.asarray(_pe_grads(apply_fn, loss, params, batch))
  assert rec0["step"] == 0 and "alpha" not in rec0
  np.testing.assert_allclose([rec0["norm_test"], rec0["inner_test"], rec0["ortho_test"]],
                             _np_tests(gpe), rtol=1e-7)
  np.testing.assert_allclose(rec0["grad_norm"], np.linalg.norm(g), rtol=RTOL)
  np.testing.assert_allclose(rec0["grad_norm_layers"]["['w']"],
                             np.linalg.norm(np.asarray(grads["w"])), rtol=RTOL)
  np.testing.assert_allclose(rec0["update_size"], lr * np.linalg.norm(g), rtol=RTOL)
  assert rec0["distance"] == 0.0
  np.testing.assert_allclose(rec1["distance"], lr * np.linalg.norm(g), rtol=RTOL)
  np.testing.assert_allclose(rec0["loss"], obj(params, batch), rtol=RTOL)
  assert sum(rec0["grad_hist_1d"]) == gpe.size
  json.dumps([rec0, rec1])


@pytest.mark.parametrize("names,schedule", [
    (["alpha"], None),
    # Tracked every step with per-example statistics: the end point comes from
    # the same pass (a dot_with reference), not a JVP; a callable schedule
    # takes the lax.cond route with the JVP.
    (["alpha", "norm_test"], None),
    (["alpha", "norm_test"], lambda t: t >= 0)])
def test_monitor_alpha_on_two_batches_matches_numpy(names, schedule):
  """Different batches at the two ends (noisy observations), MLP."""
  apply_fn, loss, params, b0 = ref.problem("mlp", n=6, seed=0)
  _, _, _, b1 = ref.problem("mlp", n=6, seed=1)
  tx = dg.monitor(optax.sgd(0.5), apply_fn, loss, names, schedule=schedule)
  state = tx.init(params)
  obj = curvax.losses.objective(apply_fn, loss)
  upd, state = tx.update(jax.grad(obj)(params, b0), state, params, batch=b0)
  p1 = optax.apply_updates(params, upd)
  _, state = tx.update(jax.grad(obj)(p1, b1), state, p1, batch=b1)
  s = ref.flat(upd)
  tau = np.linalg.norm(s)
  obs = []
  for p, b in ((params, b0), (p1, b1)):
    losses = np.asarray(loss(apply_fn(p, b[0]), b[1]))
    proj = np.asarray(_pe_grads(apply_fn, loss, p, b)) @ s / tau
    obs.append((losses.mean(), proj.mean(), losses.var(ddof=1), proj.var(ddof=1)))
  want = _np_alpha([obs[0][0], obs[1][0]], [obs[0][1], obs[1][1]],
                   [obs[0][2], obs[1][2], obs[0][3], obs[1][3]], tau)
  np.testing.assert_allclose(state.alpha, want, rtol=1e-7)
  assert bool(state.alpha_fresh) and int(state.alpha_step) == 0


@pytest.mark.parametrize("names", [["alpha"], ["alpha", "norm_test"], "economy"])
def test_monitor_tracking_every_step_has_no_cond(names):
  """every=1: no lax.cond in the step, Alpha's end point JVP included (inside
  one, XLA:CPU ran the JVP ~2x slower: 3c3d, Alpha without per-example
  instruments, every step 2.07x -> 1.81x a plain step); with every=2 the
  schedule's conds are there."""
  apply_fn, loss, params, batch = ref.problem("mlp", n=6)
  grads = jax.grad(curvax.losses.objective(apply_fn, loss))(params, batch)

  def conds(every):
    tx = dg.monitor(optax.sgd(0.1), apply_fn, loss, names, every=every)
    jaxpr = jax.make_jaxpr(lambda g, s, p: tx.update(g, s, p, batch=batch))(
        grads, tx.init(params), params)
    return str(jaxpr).count("cond[")

  assert conds(1) == 0
  assert conds(2) > 0


def test_monitor_untracked_steps_compute_nothing_and_jit_once():
  apply_fn, loss, params, batch = ref.problem("mlp", n=6)
  runs = []
  traces = []

  def counted_apply(p, x):
    jax.debug.callback(lambda: runs.append(1))
    return apply_fn(p, x)

  tx = dg.monitor(optax.sgd(0.1), counted_apply, loss, ["loss", "norm_test", "grad_hist_1d"],
                  every=3)

  @jax.jit
  def step(p, s):
    traces.append(1)
    g = jax.grad(curvax.losses.objective(apply_fn, loss))(p, batch)
    u, s = tx.update(g, s, p, batch=batch)
    return optax.apply_updates(p, u), s

  state = tx.init(params)
  per_step, tracked, tracked_step = [], [], []
  for _ in range(7):
    before = len(runs)
    params, state = step(params, state)
    jax.block_until_ready(state)
    per_step.append(len(runs) - before)
    tracked.append(bool(state.tracked))
    tracked_step.append(int(state.tracked_step))   # the step of the values held
  assert len(traces) == 1
  assert tracked == [True, False, False, True, False, False, True]
  assert tracked_step == [0, 0, 0, 3, 3, 3, 6]
  assert all(c > 0 for c, t in zip(per_step, tracked) if t)
  assert all(c == 0 for c, t in zip(per_step, tracked) if not t)
  assert dg.record(state)["step"] == 6


def _assert_records_close(got, want):
  assert jax.tree.structure(got) == jax.tree.structure(want)
  for g, w in zip(jax.tree.leaves(got), jax.tree.leaves(want)):
    np.testing.assert_allclose(g, w, rtol=1e-12)


def _monitored_run(tx, flags, steps):
  """``steps`` monitored SGD steps on alternating batches; per step the
  ``scheduled`` keyword from ``flags(t)`` (static; None: not passed). Returns
  the records, the final state and the set of compiled variants."""
  apply_fn, loss, params, b0 = ref.problem("mlp", n=6, seed=0)
  b1 = ref.problem("mlp", n=6, seed=1)[3]
  obj = curvax.losses.objective(apply_fn, loss)
  variants = set()

  @functools.partial(jax.jit, static_argnames="scheduled")
  def step(p, s, b, scheduled=None):
    variants.add(scheduled)
    u, s = tx.update(jax.grad(obj)(p, b), s, p, batch=b, scheduled=scheduled)
    return optax.apply_updates(p, u), s

  state = tx.init(params)
  records = []
  for t in range(steps):
    params, state = step(params, state, (b0, b1)[t % 2], scheduled=flags(t))
    records.append(dg.record(state))
  return records, state, variants


@pytest.mark.parametrize("names, kw", [
    (["loss", "norm_test", "alpha"], dict(every=3)),
    (["loss", "grad_norm"], dict(every=3)),
    ("economy", dict(schedule="log")),
    (["loss", "norm_test", "alpha"], {}),          # every step: no cond either way
])
def test_monitor_host_schedule_matches_the_device_schedule(names, kw):
  # scheduled=is_scheduled(t, ...) on the host: the records of the device-side
  # schedule, and the idle variant contains no cond (nothing to sync on a GPU).
  apply_fn, loss, params, batch = ref.problem("mlp", n=6)
  make = lambda: dg.monitor(optax.sgd(0.5), apply_fn, loss, names, **kw)  # noqa: E731
  want, want_state, _ = _monitored_run(make(), lambda t: None, 8)
  flags = lambda t: dg.is_scheduled(t, instruments=names, **kw)  # noqa: E731
  got, state, variants = _monitored_run(make(), flags, 8)
  assert variants == {flags(t) for t in range(8)}
  _assert_records_close(got, want)
  assert int(state.tracked_step) == int(want_state.tracked_step)
  tx = make()
  jaxpr = lambda f: str(jax.make_jaxpr(  # noqa: E731
      lambda s: tx.update(params, s, params, batch=batch, scheduled=f))(tx.init(params)))
  assert "cond[" not in jaxpr(False)
  if kw:
    assert "cond[" in jaxpr(True)


def test_is_scheduled_covers_tracked_steps_and_alpha_end_points():
  assert [t for t in range(10) if dg.is_scheduled(t, every=4, instruments=["loss"])] == [0, 4, 8]
  assert [t for t in range(10) if dg.is_scheduled(t, every=4)] == [0, 1, 4, 5, 8, 9]  # Alpha
  log = dg.log_steps(0, 4)
  assert [t for t in range(200) if dg.is_scheduled(t, schedule="log", instruments="full")] == [
      t for t in range(200) if t in log or (t - 1) in log]
  assert [dg.is_scheduled(t, schedule=dg.linear_schedule(3, 1), instruments=["loss"])
          for t in range(5)] == [False, True, False, False, True]
  with pytest.raises(ValueError, match="conflicts"):
    dg.is_scheduled(3, every=2, schedule="log")
  # the schedules answer host ints with Python bools (no device work)
  assert dg.log_schedule()(38) is False and dg.log_schedule()(39) is True


def test_monitor_scheduled_false_skips_the_step_and_its_pending_alpha():
  # every=3 with Alpha: tracked 0, 3, 6; end points 1, 4, 7. The caller skips
  # step 3 (tracked by the schedule): nothing is computed there, and step 4
  # must not close an Alpha from step 0's start point with step 3's end.
  apply_fn, loss, params, _ = ref.problem("mlp", n=6)
  names = ["loss", "alpha"]
  make = lambda: dg.monitor(optax.sgd(0.5), apply_fn, loss, names, every=3)  # noqa: E731
  want, _, _ = _monitored_run(make(), lambda t: None, 8)
  got, state, _ = _monitored_run(make(), lambda t: t != 3, 8)
  assert got[3] == {} and "alpha" not in got[4] and "alpha" in want[4]
  keep = (0, 1, 2, 5, 6, 7)
  _assert_records_close([got[t] for t in keep], [want[t] for t in keep])
  assert int(state.alpha_step) == 6


def test_monitor_hands_inner_scheduled_to_the_optimizer_inside():
  # inner_scheduled goes to the inner optimizer as its scheduled (here
  # curvature_step_size's interval mode: False compiles its step without its
  # cond); not passed, the inner optimizer gets no scheduled at all.
  apply_fn, loss, params, batch = ref.problem("mlp", n=4)
  seen = []
  css = curvax.transforms.curvature_step_size(optax.sgd(0.1), apply_fn, loss, debias=False,
                                              mode="interval", interval=4, num_estimates=2)

  def update(updates, state, params=None, **kw):
    seen.append(kw.get("scheduled", "absent"))
    return css.update(updates, state, params, **kw)

  tx = dg.monitor(optax.GradientTransformationExtraArgs(css.init, update), apply_fn, loss,
                  ["loss"], every=2)
  jaxpr = lambda **kw: str(jax.make_jaxpr(  # noqa: E731
      lambda s: tx.update(params, s, params, batch=batch, **kw))(tx.init(params)))
  assert "cond[" not in jaxpr(scheduled=False, inner_scheduled=False)
  assert "cond[" in jaxpr(scheduled=False)   # the inner's own cond
  assert "cond[" in jaxpr(scheduled=False, inner_scheduled=True)
  assert seen == [False, "absent", True]
  with pytest.raises(TypeError, match="scheduled"):
    jaxpr(inner_scheduled="yes")   # checked by the optimizer that takes it


@pytest.mark.parametrize("bad", [1, "no", np.array(True)])
def test_monitor_scheduled_must_be_a_static_bool(bad):
  apply_fn, loss, params, batch = ref.problem("mlp", n=4)
  tx = dg.monitor(optax.sgd(0.1), apply_fn, loss, ["loss"], every=2)
  with pytest.raises(TypeError, match="scheduled"):
    tx.update(params, tx.init(params), params, batch=batch, scheduled=bad)
  with pytest.raises(TypeError, match="static_argnames"):
    jax.jit(lambda f: tx.update(params, tx.init(params), params, batch=batch,
                                scheduled=f))(True)


def test_monitor_in_chain_business_and_full_presets(tmp_path):
  apply_fn, loss, params, batch = ref.problem("mlp", n=6)
  obj = curvax.losses.objective(apply_fn, loss)
  tx = optax.chain(optax.clip_by_global_norm(10.0),
                   dg.monitor(optax.sgd(0.1), apply_fn, loss, "full", every=2,
                              curvature="diag_ggn", eigen_iterations=30))
  state = tx.init(params)
  step = jax.jit(lambda g, s, p: tx.update(g, s, p, batch=batch, unused_kwarg=1))
  records = []
  p = params
  for _ in range(4):
    u, state = step(jax.grad(obj)(p, batch), state, p)
    rec = dg.record(state)
    if rec:
      records.append(rec)
    if len(records) == 1 and "hess_max_ev" in rec:
      h = np.asarray(ref.explicit_hessian(apply_fn, loss, p, batch))
      ggn = np.asarray(ref.explicit_ggn(apply_fn, loss, p, batch))
      gpe = np.asarray(_pe_grads(apply_fn, loss, p, batch))
      m = (gpe ** 2).mean(0)
      np.testing.assert_allclose(rec["hess_max_ev"], np.linalg.eigvalsh(h)[-1], rtol=1e-6)
      np.testing.assert_allclose(rec["hess_trace"], np.trace(ggn), rtol=1e-7)
      np.testing.assert_allclose(rec["tic_diag"], np.sum(m / (np.diag(ggn) + 1e-7)),
                                 rtol=1e-7)
      assert np.asarray(rec["grad_hist_2d"]).sum() == gpe.size
    p = optax.apply_updates(p, u)
  assert [r.get("step") for r in records] == [0, None, 2, None]
  assert records[1]["alpha_step"] == 0 and records[3]["alpha_step"] == 2
  merged = dg.merge(records)
  assert [r["step"] for r in merged] == [0, 2] and all("alpha" in r for r in merged)
  assert dg.merge(merged) == merged   # idempotent: the runner's records can be merged again
  dg.dashboard(merged, str(tmp_path / "from_runner.png"))
  out = dg.dashboard(records, str(tmp_path / "cockpit.png"))
  with open(out, "rb") as f:
    assert f.read(8) == b"\x89PNG\r\n\x1a\n"


def test_merge_folds_alpha_onto_its_step_when_tracking_every_step():
  """Tracking every step, the record of step t also carries Alpha of step
  t - 1: `merge` moves it (without ``alpha_step``) onto step t - 1, in step
  order whatever the order of the records; an Alpha whose step has no record
  gets one of its own."""
  records = [{"step": 0, "loss": 3.0},
             {"step": 1, "loss": 2.0, "alpha": 0.25, "alpha_step": 0},
             {"step": 2, "loss": 1.5, "alpha": -0.5, "alpha_step": 1},
             {"alpha": 0.75, "alpha_step": 2}]
  want = [{"step": 0, "loss": 3.0, "alpha": 0.25}, {"step": 1, "loss": 2.0, "alpha": -0.5},
          {"step": 2, "loss": 1.5, "alpha": 0.75}]
  assert dg.merge(records) == want
  assert dg.merge(records[::-1]) == want
  assert dg.merge([{"alpha": 0.1, "alpha_step": 4}, {"step": 2, "loss": 1.0}]) == [
      {"step": 2, "loss": 1.0}, {"step": 4, "alpha": 0.1}]


def test_dashboard_has_a_panel_for_every_instrument(tmp_path):
  """Every instrument in the records of a monitor tracking all of them (the
  full preset, the layer-wise histograms, the noise criteria) is drawn by some
  panel, GradHist2d and the layer-wise ones (``*_layers``,
  ``layer_grad_hist_1d``) included; records holding only GradHist2d or only
  the layer-wise histograms draw (they used to raise "no instrument values")."""
  apply_fn, loss, params, batch = _LinenMLP.problem()
  obj = curvax.losses.objective(apply_fn, loss)
  names = sorted(dg.INSTRUMENTS)
  assert set(dg.FULL) <= set(names)
  tx = dg.monitor(optax.sgd(0.1), apply_fn, loss, names, learning_rate=0.1)
  step = jax.jit(lambda g, s, p: tx.update(g, s, p, batch=batch))
  # an L2 regulariser in the gradient passed in: the instruments other than
  # GradNorm use the data term only (monitor's conventions)
  reg_obj = lambda p, b: obj(p, b) + 0.05 * optax.tree_utils.tree_norm(p, squared=True)
  state, p, records = tx.init(params), params, []
  for _ in range(3):
    u, state = step(jax.grad(reg_obj)(p, batch), state, p)
    records.append(dg.record(state))
    p = optax.apply_updates(p, u)
  present = {k for r in records for k in r} - {"step", "alpha_step"}
  assert {"grad_hist_2d", "layer_grad_hist_1d", "grad_norm_layers", "alpha"} <= present
  # the noise and curvature instruments of step 0 (theta_0) against numpy on
  # explicit per-example gradients and the explicit GGN's diagonal
  rec, g = records[0], _pe_grads(apply_fn, loss, params, batch)
  b, d = g.shape
  gm, m = g.mean(0), (g ** 2).mean(0)
  ggn = np.diag(np.asarray(ref.explicit_ggn(apply_fn, loss, params, batch)))
  sigma2 = ((g - gm) ** 2).sum(0) / (b - 1) + 1e-5
  np.testing.assert_allclose(
      [rec[k] for k in ("mean_gsnr", "cabs", "early_stopping", "tic_trace", "tic_diag",
                        "hess_trace")],
      [np.mean(gm ** 2 / (m - gm ** 2 + 1e-5)),
       0.1 * ((g - gm) ** 2).sum() / b / obj(params, batch),
       1 - b / d * np.sum(gm ** 2 / sigma2), m.sum() / (ggn.sum() + 1e-7),
       np.sum(m / (ggn + 1e-7)), ggn.sum()], rtol=1e-7)
  sizes = [x.size for x in jax.tree_util.tree_leaves(params)]
  np.testing.assert_allclose(list(rec["hess_trace_layers"].values()),
                             [x.sum() for x in np.split(ggn, np.cumsum(sizes)[:-1])], rtol=1e-7)
  panels = dg.dashboard_panels(records)
  drawn = [k for panel in panels for k in panel.keys]
  assert present <= set(drawn)
  assert {p.kind for p in panels} == {"line", "alpha", "hist", "hist_2d", "layers",
                                      "layer_hists"}
  dg.dashboard(records, str(tmp_path / "all.png"))
  for only in (["grad_hist_2d"], ["layer_grad_hist_1d"], ["grad_norm_layers"]):
    recs = [{"step": r["step"], **{k: r[k] for k in only}} for r in records]
    assert [k for panel in dg.dashboard_panels(recs) for k in panel.keys] == only
    dg.dashboard(recs, str(tmp_path / f"{only[0]}.png"))
  many = {f"['Dense_{i}']['kernel']": [i, 1, 2] for i in range(20)}   # small multiples
  (layers,) = dg.dashboard_panels([{"step": 0, "layer_grad_hist_1d": many}])
  names = [name for name, _ in layers.data]   # evenly spaced, first and last included
  assert len(names) == 8 and names[0] == "Dense_0/kernel" and names[-1] == "Dense_19/kernel"
  assert "8 of 20" in layers.title


def _bits(tree):
  return [(np.asarray(x).dtype, np.atleast_1d(np.asarray(x)).view(np.uint8).tolist())
          for x in jax.tree_util.tree_leaves(tree)]


@pytest.mark.parametrize("inner", ["sgd_momentum", "adam", "inject_adamw"])
def test_monitor_step_returns_the_inner_updates_and_state_bitwise(inner):
  """One jitted monitored step returns exactly (bitwise) the updates and inner
  state of the bare optimizer's jitted step on the same gradients, state and
  float32 parameters: tracked every step (no cond), tracked in a cond (full
  preset, every 2) and untracked; the instruments (and `ordered_after`'s
  multiplication by one) change nothing."""
  make = {"sgd_momentum": lambda: optax.sgd(0.1, momentum=0.9),
          "adam": lambda: optax.adam(1e-2),
          "inject_adamw": lambda: optax.inject_hyperparams(optax.adamw)(
              learning_rate=1e-2, weight_decay=1e-3)}[inner]
  apply_fn, loss, params, (x, y) = _LinenMLP.problem()
  params = jax.tree_util.tree_map(lambda a: a.astype(jnp.float32), params)
  batch = (x.astype(jnp.float32), y)
  obj = curvax.losses.objective(apply_fn, loss)
  bare = make()
  bare_step = jax.jit(bare.update)
  state, p = bare.init(params), params
  for _ in range(2):   # moments away from their initial zeros
    u, state = bare_step(jax.grad(obj)(p, batch), state, p)
    p = optax.apply_updates(p, u)
  g = jax.grad(obj)(p, batch)
  want_u, want_state = bare_step(g, state, p)
  for preset, every, counts in [("economy", 1, [2]), ("full", 2, [2, 3])]:
    tx = dg.monitor(make(), apply_fn, loss, preset, every=every)
    step = jax.jit(lambda g, s, p, tx=tx: tx.update(g, s, p, batch=batch))
    for count in counts:
      mon = tx.init(params)._replace(inner_state=state, count=jnp.asarray(count, jnp.int32))
      u, new = step(g, mon, p)
      assert bool(new.tracked) == (count % every == 0)
      assert _bits(u) == _bits(want_u), (preset, every, count)
      assert _bits(new.inner_state) == _bits(want_state), (preset, every, count)


def test_schedules_and_errors():
  lin = dg.linear_schedule(4, offset=1)
  assert [bool(lin(jnp.asarray(t))) for t in range(10)] == [
      t >= 1 and (t - 1) % 4 == 0 for t in range(10)]
  steps = dg.log_steps(0, 3, steps=20)
  assert steps[0] == 0 and steps[1] == 1 and steps[-1] == 1000 and np.all(np.diff(steps) > 0)
  sched = dg.log_schedule(0, 3, steps=20)
  assert bool(sched(jnp.asarray(1000))) and not bool(sched(jnp.asarray(999)))
  apply_fn, loss, params, batch = ref.problem("mlp", n=4)
  with pytest.raises(ValueError, match="unknown preset"):
    dg.monitor(optax.sgd(0.1), apply_fn, loss, "first_class")
  with pytest.raises(ValueError, match="unknown instruments"):
    dg.monitor(optax.sgd(0.1), apply_fn, loss, ["loss", "vibes"])
  with pytest.raises(ValueError, match="learning_rate"):
    dg.monitor(optax.sgd(0.1), apply_fn, loss, ["cabs"])
  with pytest.raises(ValueError, match="`curvature` must be"):
    dg.monitor(optax.sgd(0.1), apply_fn, loss, ["hess_trace"], curvature="diag_h")
  # `every` is the linear schedule's interval: it conflicts with any other
  # schedule (it used to be ignored silently), even every=1 given explicitly
  for schedule in ("log", dg.log_schedule(), lin):
    for every in (1, 4):
      with pytest.raises(ValueError, match="conflicts with `schedule="):
        dg.monitor(optax.sgd(0.1), apply_fn, loss, ["loss"], every=every, schedule=schedule)
    dg.monitor(optax.sgd(0.1), apply_fn, loss, ["loss"], schedule=schedule)
  dg.monitor(optax.sgd(0.1), apply_fn, loss, ["loss"], every=4, schedule="linear")
  dg.monitor(optax.sgd(0.1), apply_fn, loss, ["loss"], 4, None)
  tx = dg.monitor(optax.sgd(0.1), apply_fn, loss, ["loss"])
  with pytest.raises(TypeError, match="batch"):
    tx.update(params, tx.init(params), params)
  with pytest.raises(ValueError, match="no curvax.diagnostics"):
    dg.record(optax.sgd(0.1).init(params))


def test_monitor_log_schedule_tracks_cockpits_log_steps():
  """``schedule="log"`` is `log_schedule()`: steps 0..37 are tracked, 38 (the
  first integer not in ``log_steps(0, 4)``) is not, 39 is."""
  apply_fn, loss, params, batch = ref.problem("mlp", n=4)
  tx = dg.monitor(optax.sgd(0.1), apply_fn, loss, ["loss"], schedule="log")
  step = jax.jit(lambda s: tx.update(params, s, params, batch=batch)[1])
  assert 38 not in dg.log_steps(0, 4) and {37, 39} <= set(dg.log_steps(0, 4))
  for count, want in [(37, True), (38, False), (39, True)]:
    state = step(tx.init(params)._replace(count=jnp.asarray(count, jnp.int32)))
    assert bool(state.tracked) == want, count


def test_presets_are_cockpits_configurations():
  """Spec §3.2, the config column: economy = Loss, Distance, UpdateSize,
  GradNorm, Alpha, NormTest, InnerTest, OrthoTest, GradHist1d; business adds
  TICDiag and HessTrace; full adds HessMaxEV and GradHist2d."""
  economy = {"loss", "distance", "update_size", "grad_norm", "alpha", "norm_test",
             "inner_test", "ortho_test", "grad_hist_1d"}
  assert set(dg.ECONOMY) == economy and len(dg.ECONOMY) == len(economy)
  assert set(dg.BUSINESS) == economy | {"tic_diag", "hess_trace"}
  assert len(dg.BUSINESS) == len(economy) + 2
  assert set(dg.FULL) == set(dg.BUSINESS) | {"hess_max_ev", "grad_hist_2d"}
  assert len(dg.FULL) == len(dg.BUSINESS) + 2
  assert dg.PRESETS == {"economy": dg.ECONOMY, "business": dg.BUSINESS, "full": dg.FULL}


def test_monitor_monte_carlo_curvature_is_unbiased_and_draws_afresh_each_step():
  """``curvature="diag_ggn_mc"``: HessTrace from one Monte-Carlo sample per
  example, random (it varies with the state's key), its mean over 64 keys
  within 5 standard errors of the explicit GGN's trace; the next step draws
  afresh (``fold_in(key, t)``), from the same key."""
  apply_fn, loss, params, batch = ref.problem("mlp", n=6)
  tx = dg.monitor(optax.sgd(0.1), apply_fn, loss, ["hess_trace"], curvature="diag_ggn_mc")
  grads = jax.grad(curvax.losses.objective(apply_fn, loss))(params, batch)
  run = jax.jit(jax.vmap(lambda k: tx.update(grads, tx.init(params)._replace(key=k), params,
                                             batch=batch)[1]))
  first = run(jax.random.split(jax.random.PRNGKey(0), 64))
  second = jax.jit(jax.vmap(lambda s: tx.update(grads, s, params, batch=batch)[1]))(first)
  np.testing.assert_array_equal(second.key, first.key)
  values = np.asarray(first.diagnostics["hess_trace"])
  exact = np.trace(np.asarray(ref.explicit_ggn(apply_fn, loss, params, batch)))
  stderr = values.std(ddof=1) / np.sqrt(values.size)
  assert stderr > 1e-3 * exact
  assert abs(values.mean() - exact) <= 5 * stderr, (values.mean(), exact, stderr)
  # (3 classes, 6 examples: a discrete distribution, some draws coincide)
  assert np.mean(np.asarray(second.diagnostics["hess_trace"]) != values) > 0.5


def test_log_schedule_steps_and_linear_schedule_checks():
  """Cockpit's ``logarithmic(start, end, steps=300, base=10, init=True)``: the
  unique truncated integers of ``base ** linspace(start, end, steps)``, plus 0
  if ``init``. By hand: 10^(2k/9) = 1, 1.67, 2.78, 4.64, 7.74, 12.9, 21.5, 35.9,
  59.9, 100; 2^(1..5). ``log_schedule()`` tracks exactly ``log_steps(0, 4)``
  with those defaults. ``linear_schedule`` rejects a non-positive or
  non-integer interval and a negative offset."""
  np.testing.assert_array_equal(dg.log_steps(0, 2, steps=10),
                                [0, 1, 2, 4, 7, 12, 21, 35, 59, 100])
  np.testing.assert_array_equal(dg.log_steps(0, 2, steps=10, init=False),
                                [1, 2, 4, 7, 12, 21, 35, 59, 100])
  np.testing.assert_array_equal(dg.log_steps(1, 5, steps=5, base=2.0), [0, 2, 4, 8, 16, 32])
  default = dg.log_steps(0, 4, 300, 10.0, True)
  np.testing.assert_array_equal(dg.log_steps(0, 4), default)
  assert len(default) != len(dg.log_steps(0, 4, 100))   # the default count matters
  steps = jnp.arange(10_002)
  tracked = np.asarray(jax.vmap(dg.log_schedule())(steps))
  np.testing.assert_array_equal(np.flatnonzero(tracked), default)
  assert tracked[0] and tracked[10_000] and not tracked[10_001]
  for interval, offset in [(0, 0), (-2, 0), (1.5, 0), (3, -1), (3, 0.5)]:
    with pytest.raises(ValueError):
      dg.linear_schedule(interval, offset)


class _LinenMLP:
  """A small Linen MLP (Dense layers only: the per-layer fast path)."""

  @staticmethod
  def problem(n=6):
    import flax.linen as nn  # pylint: disable=g-import-not-at-top

    class MLP(nn.Module):
      @nn.compact
      def __call__(self, x):
        x = jnp.tanh(nn.Dense(5)(x))
        return nn.Dense(3)(nn.Dense(4, use_bias=False)(x))

    x = jax.random.normal(jax.random.PRNGKey(0), (n, 4))
    module = MLP()
    variables = jax.tree_util.tree_map(lambda a: a.astype(jnp.float64),
                                       module.init(jax.random.PRNGKey(1), x))
    apply_fn, params = curvax.flax_utils.from_linen(module, variables)
    y = jax.random.randint(jax.random.PRNGKey(2), (n,), 0, 3)
    return apply_fn, curvax.losses.softmax_cross_entropy, params, (x, y)


@pytest.mark.parametrize("path,hist_2d", [("layers", True), ("layers", False),
                                          ("vmap_chunks", True)])
def test_monitor_per_example_instruments_match_explicit_gradients(path, hist_2d):
  """Gradient tests, Alpha's start slopes and all three histograms from the
  monitor (which never forms all per-example gradients) against numpy on
  explicit float64 per-example gradients: Linen fast path, and the vmap path
  in chunks of 4 on 6 examples (one scanned chunk and a remainder). Without
  GradHist2d the fast path counts Dense kernels from their factors
  (`counts_1d_outer`)."""
  if path == "layers":
    apply_fn, loss, params, batch = _LinenMLP.problem()
    chunk_size = None
  else:
    apply_fn, loss, params, batch = ref.problem("cnn", n=6)
    chunk_size = 4
  names = ["norm_test", "inner_test", "ortho_test", "alpha", "grad_hist_1d",
           "layer_grad_hist_1d"] + (["grad_hist_2d"] if hist_2d else [])
  lo, hi = -0.3, 0.3
  tx = dg.monitor(optax.sgd(0.5), apply_fn, loss, names, chunk_size=chunk_size,
                  hist_range=(lo, hi), hist_bins=20)
  obj = curvax.losses.objective(apply_fn, loss)
  grads = jax.grad(obj)(params, batch)
  upd, state = jax.jit(lambda g, s, p: tx.update(g, s, p, batch=batch))(
      grads, tx.init(params), params)
  rec = dg.record(state)
  g = _pe_grads(apply_fn, loss, params, batch)  # jacrev of the loss vector: no vmap(grad)
  np.testing.assert_allclose([rec["norm_test"], rec["inner_test"], rec["ortho_test"]],
                             _np_tests(g), rtol=1e-7)
  slopes = g @ ref.flat(upd)
  np.testing.assert_allclose(state.alpha_start[2:4], [slopes.mean(), slopes.var(ddof=1)],
                             rtol=1e-9)
  clip = lambda v, a, b: np.clip(v, a, b - 1e-12)
  want, _ = np.histogram(clip(g.ravel(), lo, hi), bins=20, range=(lo, hi))
  assert 0 < want[0] + want[-1] < g.size  # some entries clamped, some not
  np.testing.assert_array_equal(rec["grad_hist_1d"], want)
  layers = jax.tree_util.tree_leaves(state.diagnostics["layer_grad_hist_1d"])
  sizes = [p.size for p in jax.tree_util.tree_leaves(params)]
  for counts, block in zip(layers, np.split(g, np.cumsum(sizes)[:-1], axis=1)):
    np.testing.assert_array_equal(counts, np.histogram(clip(block.ravel(), lo, hi), bins=20,
                                                       range=(lo, hi))[0])
  if hist_2d:
    theta = np.broadcast_to(ref.flat(params), g.shape)
    want2, _, _ = np.histogram2d(clip(g.ravel(), -1, 1), clip(theta.ravel(), -2, 2),
                                 bins=(40, 50), range=((-1, 1), (-2, 2)))
    np.testing.assert_array_equal(rec["grad_hist_2d"], want2)


def test_monitor_histogram_totals_never_wrap():
  """A Dense 4096 -> 4097 layer at batch 128 on positive inputs: its kernel's
  per-example gradient entries are positive and tiny but for one output (the
  label's), 128 * 4096 * 4096 = 2^31 of them in the bin right of 0. The
  monitor's histograms (Dense kernels counted from their factors, then summed
  over tensors) were int32 and wrapped; float32, they are non-negative and sum
  to B * D within float rounding, and records write them as ints."""
  import flax.linen as nn  # pylint: disable=g-import-not-at-top
  n, i, j = 128, 4096, 4097
  rng = np.random.default_rng(0)
  x = jnp.asarray(np.abs(rng.normal(size=(n, i))) * 1e-3, jnp.float32)
  y = jnp.asarray(rng.integers(0, j, n))
  module = nn.Dense(j)
  apply_fn, params = curvax.flax_utils.from_linen(module, module.init(jax.random.PRNGKey(0),
                                                                      x[:1]))
  loss = curvax.losses.softmax_cross_entropy
  names = ["grad_hist_1d", "layer_grad_hist_1d", "grad_hist_2d"]
  tx = dg.monitor(optax.sgd(0.1), apply_fn, loss, names)
  grads = jax.grad(curvax.losses.objective(apply_fn, loss))(params, (x, y))
  _, state = jax.jit(lambda g, s, p: tx.update(g, s, p, batch=(x, y)))(
      grads, tx.init(params), params)
  rec = dg.record(state)
  layers = rec["layer_grad_hist_1d"]
  kernel = next(v for k, v in layers.items() if "kernel" in k)
  bias = next(v for k, v in layers.items() if "bias" in k)
  for counts, total in [(rec["grad_hist_1d"], n * (i * j + j)), (kernel, n * i * j),
                        (bias, n * j), (sum(rec["grad_hist_2d"], []), n * (i * j + j))]:
    assert all(type(c) is int and c >= 0 for c in counts)   # pylint: disable=unidiomatic-typecheck
    np.testing.assert_allclose(sum(counts), total, rtol=1e-6)
  assert sum(bias) == n * j   # below 2^24: exact
  np.testing.assert_allclose(kernel[50], n * i * (j - 1), rtol=1e-6)   # [0, 0.04)
  json.dumps(rec)


@pytest.mark.parametrize("size,bins", [(1, 12), (7, 12), (1001, 100), (64, 300)])
def test_counts_1d_pairs_odd_sizes_and_large_bins(size, bins):
  """counts_1d counts pairs of entries in a joint table (an odd entry out
  paired with a dropped pad bin); above PAIR_TABLE_MAX bins^2 it counts single
  entries: both against numpy."""
  g = np.random.default_rng(size).normal(scale=1.5, size=size)
  got = jax.jit(lambda x: dg.counts_1d(x, bins, (-2.0, 2.0)))(g)
  want, _ = np.histogram(np.clip(g, -2.0, 2.0 - 1e-12), bins, (-2.0, 2.0))
  np.testing.assert_array_equal(got, want)
  assert ((bins + 1) ** 2 > dg.histograms.PAIR_TABLE_MAX) == (bins == 300)


def test_counts_1d_and_2d_match_numpy_histograms_with_clamped_edges():
  """The exported per-tensor building blocks (for use with per_example_statistics'
  reduce_gradients in a user's own step) against numpy, out-of-range values clamped."""
  rng = np.random.default_rng(7)
  g = rng.normal(scale=1.5, size=(4, 6, 5))
  theta = rng.normal(scale=1.5, size=(6, 5))
  got = jax.jit(lambda x: dg.counts_1d(x, 12, (-2.0, 2.0)))(g)
  want, _ = np.histogram(np.clip(g, -2.0, 2.0), 12, (-2.0, 2.0))
  np.testing.assert_array_equal(got, want)
  got2 = dg.counts_2d(jnp.asarray(g), jnp.asarray(theta), (8, 10), (-1.0, 1.0), (-2.0, 2.0))
  want2, _, _ = np.histogram2d(np.clip(g, -1.0, 1.0).ravel(),
                               np.clip(np.broadcast_to(theta, g.shape), -2.0, 2.0).ravel(),
                               (8, 10), ((-1.0, 1.0), (-2.0, 2.0)))
  np.testing.assert_array_equal(got2, want2)


def _outer_factors(rng, n, i, j, scale_a, scale_b, dtype):
  a = rng.normal(scale=scale_a, size=(n, i))
  b = rng.normal(scale=scale_b, size=(n, j))
  a[0, : i // 2] = 0.0  # zero inputs (dead ReLUs) and a zero output gradient
  b[-1, -1] = 0.0
  a[-1, 0] = -1e-30  # a tiny negative product
  return a.astype(dtype), b.astype(dtype)


@pytest.mark.parametrize("shape,scales,value_range,bins,dtype", [
    ((5, 9, 4), (1.0, 1.0), (-2.0, 2.0), 100, np.float32),
    ((8, 6, 30), (0.2, 0.3), (-0.5, 0.5), 7, np.float64),   # J > I: factors swapped
    ((3, 40, 7), (5.0, 5.0), (-0.3, 1.1), 9, np.float32),   # all entries hot
    ((6, 20, 20), (1e-3, 1e-3), (-2.0, 2.0), 100, np.float64),  # all cold
    ((4, 12, 10), (1.0, 0.5), (0.2, 2.0), 6, np.float32),   # 0 below the range
    ((4, 12, 10), (1.0, 0.5), (-2.0, -0.05), 5, np.float64),  # 0 above the range
])
def test_counts_outer_equal_counts_of_the_formed_products(shape, scales, value_range,
                                                          bins, dtype):
  """Counting a Dense kernel's per-example gradients a_n b_n' from the factors
  (sorted magnitudes, prefix sums / matmuls of signs, only entries away from 0
  binned) gives exactly the 1-D and 2-D counts of the formed products: symmetric and shifted
  ranges, ranges without 0, J > I (swapped), all entries hot / all cold, tiny
  tiles (several pages and column blocks), zeros and tiny negative products."""
  rng = np.random.default_rng(sum(shape) + bins)
  a, b = _outer_factors(rng, *shape, *scales, dtype)
  want = dg.counts_1d(jnp.einsum("ni,nj->nij", a, b), bins, value_range)
  for tile in [(3, 4), (2048, 64)]:
    got = jax.jit(lambda a, b, tile=tile: dg.counts_1d_outer(a, b, bins, value_range,
                                                             tile=tile))(a, b)
    np.testing.assert_array_equal(got, want)
  assert int(np.sum(want)) == a.shape[0] * a.shape[1] * b.shape[1]
  # GradHist2d from the factors, against the formed products (theta-bins of
  # a kernel-shaped theta; the gradient bins reuse this case's layout)
  theta = rng.normal(scale=1.5, size=shape[1:]).astype(dtype)
  want2 = dg.counts_2d(jnp.einsum("ni,nj->nij", a, b), theta, (bins, 6), value_range,
                       (-2.0, 2.0))
  got2 = jax.jit(lambda a, b, th: dg.counts_2d_outer(a, b, th, (bins, 6), value_range,
                                                     (-2.0, 2.0), tile=(3, 4)))(a, b, theta)
  np.testing.assert_array_equal(got2, want2)
  assert got.dtype == got2.dtype == want.dtype == jnp.float32   # as the monitor's state
  # and against numpy on the float64 products (exact signs near 0)
  prods = np.einsum("ni,nj->nij", a.astype(np.float64), b.astype(np.float64)).ravel()
  lo, hi = value_range
  np_counts, _ = np.histogram(np.clip(prods, lo, hi - 1e-12), bins, value_range)
  np.testing.assert_array_equal(want, np_counts)


def test_bin_index_keeps_the_sign_of_tiny_values_in_float32():
  """-1e-9 is in [-0.04, 0), bin 49 of 100 on (-2, 2); (x - lo) / width in
  float32 rounds it to 50.0 (bin 50). Binning relative to the edge at 0 does not."""
  x = jnp.asarray([-1e-9, -0.0, 0.0, 1e-9, -0.04, 0.0399, 1.99, 5.0, -7.0], jnp.float32)
  np.testing.assert_array_equal(dg.counts_1d(x[:1]), np.eye(100, dtype=int)[49])
  idx = jax.jit(lambda v: dg.histograms.bin_index(v, 100, (-2.0, 2.0)))(x)
  np.testing.assert_array_equal(idx, [49, 50, 50, 50, 49, 50, 99, 99, 0])


def test_counts_drop_nan_and_clamp_inf_like_numpy():
  """NaN entries are not counted (np.histogram with a range drops them; they
  used to land in bin 0), +-inf clamp into the edge bins; in 2-D a pair with a
  NaN in either coordinate is dropped."""
  rng = np.random.default_rng(3)
  g = rng.normal(scale=1.5, size=(3, 4, 5))
  g.flat[rng.choice(g.size, 12, replace=False)] = [np.nan] * 8 + [np.inf, -np.inf] * 2
  theta = rng.normal(scale=1.5, size=(4, 5))
  theta.flat[[1, 7]] = np.nan
  idx = dg.histograms.bin_index(jnp.asarray([np.nan, np.inf, -np.inf, 0.5]), 12, (-2.0, 2.0))
  np.testing.assert_array_equal(idx, [12, 11, 0, 7])
  got = jax.jit(lambda x: dg.counts_1d(x, 12, (-2.0, 2.0)))(g)
  want, _ = np.histogram(np.clip(g, -2.0, 2.0 - 1e-12), 12, (-2.0, 2.0))
  np.testing.assert_array_equal(got, want)
  assert int(got.sum()) == g.size - 8
  gg, tt = g.ravel(), np.broadcast_to(theta, g.shape).ravel()
  keep = ~np.isnan(gg) & ~np.isnan(tt)
  got2 = jax.jit(lambda x, t: dg.counts_2d(x, t, (8, 10), (-1.0, 1.0), (-2.0, 2.0)))(g, theta)
  want2, _, _ = np.histogram2d(np.clip(gg[keep], -1.0, 1.0 - 1e-12),
                               np.clip(tt[keep], -2.0, 2.0 - 1e-12), (8, 10),
                               ((-1.0, 1.0), (-2.0, 2.0)))
  np.testing.assert_array_equal(got2, want2)


@pytest.mark.parametrize("shape,dtype", [((4, 7, 3), np.float32), ((5, 3, 6), np.float64)])
def test_counts_outer_with_nonfinite_factors_equal_counts_of_the_products(shape, dtype):
  """Dense kernels' fast path, NaN / +-inf / 0 factors (a diverging run) and
  NaN parameters: the same counts as the formed products (NaN products,
  inf * 0 included, dropped; +-inf in the edge bins) and as numpy."""
  rng = np.random.default_rng(sum(shape))
  n, i, j = shape
  a, b = rng.normal(size=(n, i)), rng.normal(size=(n, j))
  for x in (a, b):
    u = rng.uniform(size=x.shape)
    x[u < 0.3] = np.nan
    x[(u >= 0.3) & (u < 0.4)] = np.inf
    x[(u >= 0.4) & (u < 0.45)] = -np.inf
    x[(u >= 0.45) & (u < 0.55)] = 0.0
  a, b = a.astype(dtype), b.astype(dtype)
  theta = rng.normal(scale=1.5, size=(i, j)).astype(dtype)
  theta[0, 1] = np.nan
  with np.errstate(invalid="ignore"):
    prods = np.einsum("ni,nj->nij", a, b).astype(np.float64)
  got = jax.jit(lambda a, b: dg.counts_1d_outer(a, b, 9, (-2.0, 2.0), tile=(3, 4)))(a, b)
  keep = ~np.isnan(prods)
  want, _ = np.histogram(np.clip(prods[keep], -2.0, 2.0 - 1e-12), 9, (-2.0, 2.0))
  np.testing.assert_array_equal(got, want)
  np.testing.assert_array_equal(got, dg.counts_1d(jnp.asarray(prods.astype(dtype)), 9))
  got2 = jax.jit(lambda a, b, t: dg.counts_2d_outer(a, b, t, (5, 6), tile=(3, 4)))(a, b, theta)
  th = np.broadcast_to(theta, prods.shape).astype(np.float64)
  keep &= ~np.isnan(th)
  want2, _, _ = np.histogram2d(np.clip(prods[keep], -1.0, 1.0 - 1e-12),
                               np.clip(th[keep], -2.0, 2.0 - 1e-12), (5, 6),
                               ((-1.0, 1.0), (-2.0, 2.0)))
  np.testing.assert_array_equal(got2, want2)


def test_counts_outer_never_wrap_on_vgg16s_first_dense_layer():
  """VGG16's 25088 x 4096 kernel at batch 128 (spec §3.5), from its factors:
  1.3e10 per-example gradient entries, all near 0. int32 counts wrapped to a
  negative total (-4026531840); float32 sums of int32 partials under 2^31 give
  the two bins around 0, ~6.58e9 each, summing to B * D within float rounding."""
  rng = np.random.default_rng(0)
  n, i, j = 128, 25088, 4096
  a = jnp.asarray(rng.normal(size=(n, i)) * 1e-3, jnp.float32)
  b = jnp.asarray(rng.normal(size=(n, j)) * 1e-3, jnp.float32)
  got = np.asarray(jax.jit(lambda a, b: dg.counts_1d_outer(a, b, 100, (-2.0, 2.0)))(a, b))
  assert (got >= 0).all() and got.dtype == np.float32
  np.testing.assert_allclose(got.astype(np.float64).sum(), n * i * j, rtol=1e-6)
  assert (got[[49, 50]] > 6.5e9).all() and got[:49].sum() == got[51:].sum() == 0


@pytest.mark.parametrize("span", [40, 97])
def test_counts_sum_int32_partials_of_at_most_int32_span_entries(span, monkeypatch):
  """With `INT32_SPAN` (entries behind one int32 partial count) shrunk, every
  counting path splits into many partials added in float32 (formed arrays in
  pieces, factor counts per group of rows / column blocks, 2-D counts per
  group of kernel rows, non-finite factors included): the same counts as
  numpy."""
  monkeypatch.setattr(dg.histograms, "INT32_SPAN", span)
  rng = np.random.default_rng(span)
  a, b = _outer_factors(rng, 4, 12, 5, 1.0, 1.0, np.float64)
  a[1, 3], b[2, 1], a[3, 7] = np.inf, -np.inf, np.nan
  theta = rng.normal(scale=1.5, size=(12, 5))
  with np.errstate(invalid="ignore"):
    prods = np.einsum("ni,nj->nij", a, b)
  keep = ~np.isnan(prods)
  want, _ = np.histogram(np.clip(prods[keep], -2.0, 2.0 - 1e-12), 9, (-2.0, 2.0))
  np.testing.assert_array_equal(jax.jit(lambda x: dg.counts_1d(x, 9))(prods), want)
  for x, y, th in [(a, b, theta), (b, a, theta.T)]:   # and swapped (J > I)
    got = jax.jit(lambda x, y: dg.counts_1d_outer(x, y, 9, tile=(3, 4)))(x, y)
    np.testing.assert_array_equal(got, want)
    got2 = jax.jit(lambda x, y, t: dg.counts_2d_outer(x, y, t, (5, 6), tile=(3, 4)))(x, y, th)
    th_b = np.broadcast_to(th, (4,) + th.shape)
    with np.errstate(invalid="ignore"):
      pr = np.einsum("ni,nj->nij", x, y)
    k = ~np.isnan(pr)
    want2, _, _ = np.histogram2d(np.clip(pr[k], -1.0, 1.0 - 1e-12),
                                 np.clip(th_b[k], -2.0, 2.0 - 1e-12), (5, 6),
                                 ((-1.0, 1.0), (-2.0, 2.0)))
    np.testing.assert_array_equal(got2, want2)
    np.testing.assert_array_equal(
        jax.jit(lambda p, t: dg.counts_2d(p, t, (5, 6)))(pr, th), want2)


def test_counts_outer_reject_mismatched_factors():
  with pytest.raises(ValueError, match="a .N, I. and b .N, J."):
    dg.counts_1d_outer(jnp.ones((3, 4)), jnp.ones((2, 4)))
  with pytest.raises(ValueError, match="tile"):
    dg.counts_1d_outer(jnp.ones((3, 4)), jnp.ones((3, 4)), tile=(8, 0))
  with pytest.raises(ValueError, match="theta"):
    dg.counts_2d_outer(jnp.ones((3, 4)), jnp.ones((3, 5)), jnp.ones((5, 4)))


def test_hess_max_ev_warm_start_keeps_the_top_eigenpair():
  """HessMaxEV keeps its top Ritz vector in the state and starts the next
  tracked step from it (plus as much Gaussian noise): the vector is the top
  eigenvector of the explicit Hessian, and the next value is the new top
  eigenvalue, also when the state's vector is replaced by the eigenvector of
  the second-largest eigenvalue (a start that favours the wrong eigenvalue)."""
  apply_fn, loss, params, batch = ref.problem("mlp", n=6)
  obj = curvax.losses.objective(apply_fn, loss)
  tx = dg.monitor(optax.sgd(0.05), apply_fn, loss, ["hess_max_ev"], eigen_iterations=40)
  step = jax.jit(lambda g, s, p: tx.update(g, s, p, batch=batch))
  flat = lambda t: np.asarray(jax.flatten_util.ravel_pytree(t)[0])
  state = tx.init(params)
  assert not flat(state.eigenvector.unpack()).any()
  p = params
  for i in range(3):
    h = np.asarray(ref.explicit_hessian(apply_fn, loss, p, batch))
    lam, vec = np.linalg.eigh(h)
    if i == 2:  # start from the second eigenvector instead
      _, unravel = jax.flatten_util.ravel_pytree(params)
      state = state._replace(eigenvector=PackedTree.pack(unravel(jnp.asarray(vec[:, -2]))))
    u, state = step(jax.grad(obj)(p, batch), state, p)
    np.testing.assert_allclose(dg.record(state)["hess_max_ev"], lam[-1], rtol=1e-6)
    v = flat(state.eigenvector.unpack())
    np.testing.assert_allclose(abs(v @ vec[:, -1]) / np.linalg.norm(v), 1.0, atol=1e-6)
    p = optax.apply_updates(p, u)


def test_record_reads_an_nnx_optimizer_state_and_rejects_a_batched_one():
  from flax import nnx

  class Net(nnx.Module):
    def __init__(self, rngs):
      self.l1 = nnx.Linear(3, 4, rngs=rngs)
      self.l2 = nnx.Linear(4, 3, rngs=rngs)

    def __call__(self, x):
      return self.l2(jnp.tanh(self.l1(x)))

  model = Net(nnx.Rngs(0))
  apply_fn, params = curvax.flax_utils.from_nnx(model)
  loss = curvax.losses.softmax_cross_entropy
  x, y = jnp.linspace(-1, 1, 24).reshape(8, 3), jnp.arange(8) % 3
  opt = nnx.Optimizer(model, dg.monitor(optax.sgd(0.1), apply_fn, loss, ["loss", "grad_norm"]),
                      wrt=nnx.Param)
  grads = nnx.grad(lambda m: jnp.mean(loss(m(x), y)))(model)
  opt.update(model, grads, batch=(x, y))
  rec = dg.record(opt.opt_state)
  # against the plain-pytree monitor on the same parameters and batch
  tx = dg.monitor(optax.sgd(0.1), apply_fn, loss, ["loss", "grad_norm"])
  g = jax.grad(curvax.losses.objective(apply_fn, loss))(params, (x, y))
  _, state = tx.update(g, tx.init(params), params, batch=(x, y))
  want = dg.record(state)
  assert rec["step"] == want["step"] == 0
  np.testing.assert_allclose(rec["loss"], want["loss"], rtol=1e-6)
  np.testing.assert_allclose(rec["grad_norm"], want["grad_norm"], rtol=1e-6)
  batched = jax.tree.map(lambda a: jnp.stack([a, a]), state)
  with pytest.raises(ValueError, match="batched"):
    dg.record(batched)
