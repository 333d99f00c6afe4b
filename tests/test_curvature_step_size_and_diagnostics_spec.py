"""Spec conformance: curvature_step_size (specs/curvature_step_size.md) and the
Cockpit instruments (specs/diagnostics.md), each against an independent numpy
float64 reference written from the spec (dense Jacobians from ``jax.jacfwd``,
closed-form output derivatives, no curvax code in the references)."""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from jax.flatten_util import ravel_pytree

import curvax
from curvax import diagnostics as dg
from curvax.transforms.curvature_step_size import curvature_step_size

LOSSES = {"ce": curvax.losses.softmax_cross_entropy, "mse": curvax.losses.mean_squared_error}


# ---------------------------------------------------------------------------
# Tiny problems and the numpy side: per-example losses and gradients, GGN.

def _mlp_apply(p, x):
  return jnp.tanh(x @ p["w1"] + p["b1"]) @ p["w2"] + p["b2"]


def _lin_apply(p, x):
  return x @ p["w"] + p["b"]


def _problem(kind, sizes, seed=0, scale=1.0):
  """(apply_fn, loss name, params, batches of the given sizes): an MLP with
  softmax cross-entropy, or a linear model with MSE (a quadratic objective);
  ``scale`` multiplies the weights and the inputs."""
  rng = np.random.default_rng(seed)
  if kind == "mlp":
    params = {"w1": scale * rng.normal(size=(3, 4)) / np.sqrt(3),
              "b1": 0.1 * rng.normal(size=4),
              "w2": scale * rng.normal(size=(4, 3)) / 2, "b2": 0.1 * rng.normal(size=3)}
    mk = lambda n: (jnp.asarray(scale * rng.normal(size=(n, 3))),   # noqa: E731
                    jnp.asarray(rng.integers(0, 3, n)))
    apply_fn, name = _mlp_apply, "ce"
  else:
    params = {"w": rng.normal(size=(3, 2)), "b": 0.1 * rng.normal(size=2)}
    mk = lambda n: (jnp.asarray(scale * rng.normal(size=(n, 3))),   # noqa: E731
                    jnp.asarray(rng.normal(size=(n, 2))))
    apply_fn, name = _lin_apply, "mse"
  return apply_fn, name, jax.tree.map(jnp.asarray, params), [mk(n) for n in sizes]


@functools.lru_cache(maxsize=None)
def _jacobian(apply_fn, treedef, shapes):
  """Jitted dense Jacobian (B, C, P) of the outputs w.r.t. the flat parameters."""
  sizes = np.cumsum([int(np.prod(s)) for s in shapes])[:-1]

  def unravel(w):
    return jax.tree_util.tree_unflatten(
        treedef, [c.reshape(s) for c, s in zip(jnp.split(w, sizes), shapes)])
  return jax.jit(jax.jacfwd(lambda w, x: apply_fn(unravel(w), x)))


def _np_per_example(apply_fn, loss_name, params, batch):
  """Per-example losses (B,), unscaled per-example gradients (B, P) and the
  GGN of the batch-mean loss (P, P), in numpy from the dense Jacobian."""
  flat_p, _ = ravel_pytree(params)
  x, y = batch
  z = np.asarray(apply_fn(params, x), np.float64)
  jac = np.asarray(_jacobian(apply_fn, jax.tree_util.tree_structure(params),
                             tuple(jnp.shape(l) for l in jax.tree_util.tree_leaves(params)))(
                                 flat_p, x))   # (B, C, P)
  n, c = z.shape
  if loss_name == "ce":
    e = np.exp(z - z.max(1, keepdims=True))
    p = e / e.sum(1, keepdims=True)
    onehot = np.eye(c)[np.asarray(y)]
    ell, gz = -np.log((p * onehot).sum(1)), p - onehot
    hz = np.stack([np.diag(q) - np.outer(q, q) for q in p])
  else:
    r = z - np.asarray(y)
    ell, gz, hz = 0.5 * (r * r).sum(1), r, np.stack([np.eye(c)] * n)
  gi = np.einsum("ncp,nc->np", jac, gz)
  ggn = np.einsum("ncp,ncd,ndq->pq", jac, hz, jac) / n
  return ell, gi, ggn


# ---------------------------------------------------------------------------
# (a) curvature_step_size: the whole update, step by step, against the spec.

class _NpMomentum:
  """optax.sgd(lr, momentum=beta): m <- u + beta m, d = -eta_t m."""

  def __init__(self, eta, beta=0.9):
    self.eta, self.beta, self.m = eta, beta, None

  def __call__(self, u, t):
    self.m = u if self.m is None else u + self.beta * self.m
    return -self.eta(t) * self.m


class _NpAdam:
  """optax.adam(lr) with its defaults (b1 0.9, b2 0.999, eps 1e-8 outside the root)."""

  def __init__(self, eta):
    self.eta, self.m, self.v, self.k = eta, 0.0, 0.0, 0

  def __call__(self, u, t):
    self.k += 1
    self.m = 0.9 * self.m + 0.1 * u
    self.v = 0.999 * self.v + 0.001 * u * u
    mh, vh = self.m / (1 - 0.9 ** self.k), self.v / (1 - 0.999 ** self.k)
    return -self.eta(t) * mh / (np.sqrt(vh) + 1e-8)


def _np_curvature_step_size(apply_fn, loss_name, params, batches, eval_batches, inner, eta, *,
                            debias=True, mode="every_step", warmup_steps=0, interval=None,
                            num_estimates=None, positive_only=False, clip=None):
  """The spec's algorithm in numpy: alpha* = -d'g / d'Gd at theta_t on the
  evaluation batch (eval_batch if debiasing), absolute = alpha* eta_t;
  warm-up runs eta_t; every_step applies a positive alpha* (clipped), else the
  last learning rate; interval: windows of N estimates every I steps after the
  warm-up, learning rate fixed in them, then the median of the (positive, or
  all defined) absolute estimates if positive. Per-step records."""
  theta, unravel = ravel_pytree(params)
  theta = np.asarray(theta)
  held, window, out = eta(0), [], []
  counts = np.zeros(3, int)   # computed, negative, undefined
  cl = (lambda v: v) if clip is None else (lambda v: min(max(v, clip[0]), clip[1]))
  for t, (batch, eval_batch) in enumerate(zip(batches, eval_batches)):
    p = unravel(theta)
    _, gi, _ = _np_per_example(apply_fn, loss_name, p, batch)
    d = inner(gi.mean(0), t)
    e = eta(t)
    due = t >= warmup_steps and (mode == "every_step"
                                 or (t - warmup_steps) % interval < num_estimates)
    rec = {"computed": due}
    alpha = np.nan
    if due:
      _, gi1, ggn1 = _np_per_example(apply_fn, loss_name, p, eval_batch if debias else batch)
      num, den = d @ gi1.mean(0), d @ ggn1 @ d
      defined = np.isfinite(num) and np.isfinite(den) and den > 0
      alpha = -num / den if defined else np.nan
      rec.update(numerator=num, denominator=den, alpha=alpha, alpha_absolute=alpha * e)
      counts += [1, defined and alpha < 0, not defined]
    if t < warmup_steps:
      lr = held = e
    elif mode == "every_step":
      lr = cl(alpha * e) if alpha > 0 else held
      held = lr
    else:
      lr = held
      pos = (t - warmup_steps) % interval
      if pos == 0:
        window = []
      if due:
        if (alpha > 0) if positive_only else np.isfinite(alpha):
          window.append(alpha * e)
        if pos == num_estimates - 1 and window and np.median(window) > 0:
          held = cl(float(np.median(window)))
    theta = theta + (lr / e) * d
    rec.update(learning_rate=lr, held_learning_rate=held, step=(lr / e) * d,
               theta=theta.copy(), counts=tuple(counts))
    out.append(rec)
  return out


_SCHED = lambda t: 0.05 / (1.0 + 0.3 * t)   # noqa: E731

# (problem, inner, eta, steps, transform keywords): the switches of the spec.
_CONFIGS = {
    "every_step-debias-momentum": ("mlp", "momentum", 0.3, 7, {}),
    "every_step-biased-adam": ("mlp", "adam", 0.05, 6, {"debias": False}),
    "every_step-schedule-warmup-clip": ("mlp", "adam", _SCHED, 7,
                                        {"warmup_steps": 2, "clip": (0.0, 0.2)}),
    "every_step-quadratic-warmup": ("quad", "momentum", 0.1, 6, {"warmup_steps": 1}),
    "interval-positive_only": ("mlp", "adam", 0.05, 10,
                               {"mode": "interval", "warmup_steps": 1, "interval": 4,
                                "num_estimates": 3, "positive_only": True}),
    "interval-seed-rule-schedule-clip": ("mlp", "momentum", _SCHED, 10,
                                         {"mode": "interval", "warmup_steps": 2, "interval": 3,
                                          "num_estimates": 2, "clip": (0.0, 0.5),
                                          "positive_only": False}),
}


@pytest.mark.parametrize("config", list(_CONFIGS))
def test_curvature_step_size_trajectory_matches_numpy_reference(config):
  """Several steps with a stateful inner optimizer on fresh batches (and fresh
  evaluation batches): updates, parameters, applied and held learning rates,
  numerator d'g, denominator d'Gd (dense GGN), alpha (relative, absolute),
  the computed flag and the counters agree with the numpy reference of the
  spec. Catches e.g. measuring on ``batch`` when debiasing, the Hessian in
  place of the GGN, a wrong sign, absolute = alpha * eta_{t+1}, the fallback
  or the median rule."""
  kind, inner_name, eta, steps, kw = _CONFIGS[config]
  apply_fn, loss_name, params, batches = _problem(kind, [4] * (2 * steps))
  batches, eval_batches = batches[:steps], batches[steps:]
  eta_fn = eta if callable(eta) else (lambda t: eta)
  np_inner = (_NpMomentum if inner_name == "momentum" else _NpAdam)(eta_fn)
  want = _np_curvature_step_size(apply_fn, loss_name, params, batches, eval_batches, np_inner,
                                 eta_fn, **kw)
  inner = optax.sgd(eta, momentum=0.9) if inner_name == "momentum" else optax.adam(eta)
  loss = LOSSES[loss_name]
  tx = curvature_step_size(inner, apply_fn, loss, learning_rate=eta, **kw)
  obj = curvax.losses.objective(apply_fn, loss)
  debias = kw.get("debias", True)

  @jax.jit
  def step(p, s, b, eb):
    u, s = tx.update(jax.grad(obj)(p, b), s, p, batch=b, eval_batch=eb if debias else None)
    return optax.apply_updates(p, u), u, s

  p, s = params, tx.init(params)
  computed = []
  for b, eb, r in zip(batches, eval_batches, want):
    p, u, s = step(p, s, b, eb)
    computed.append(bool(s.computed))
    assert bool(s.computed) == r["computed"]
    np.testing.assert_allclose(ravel_pytree(u)[0], r["step"], rtol=1e-9, atol=1e-14)
    np.testing.assert_allclose(ravel_pytree(p)[0], r["theta"], rtol=1e-9, atol=1e-14)
    for f in ("learning_rate", "held_learning_rate") + (
        ("numerator", "denominator", "alpha", "alpha_absolute") if r["computed"] else ()):
      np.testing.assert_allclose(getattr(s, f), r[f], rtol=1e-9, err_msg=f)
    assert (int(s.num_computed), int(s.num_negative), int(s.num_undefined)) == r["counts"]
  # the configuration exercises both branches of the safeguard
  assert any(r["computed"] and r["alpha"] > 0 for r in want)
  if kind == "mlp" and debias:
    assert any(r["computed"] and r["alpha"] < 0 for r in want)


def test_debias_fields_on_an_mlp_match_dense_ggn():
  """debias with diagnostics on a non-linear model (GGN != Hessian): slope and
  curvature on eval_batch (batch 1), hybrid = -d2'g1 / d2'G2 d2 (seed 004
  Eq. 3.5, signed like alpha), so that the seed's decomposition
  alpha_unb - alpha_b = (hybrid - alpha_b) + (alpha_unb - hybrid) holds with
  alpha_b the debias=False value; cosines with the negative gradients; ||d||.
  Catches the biased denominator measured on eval_batch, or cos_eval on batch."""
  apply_fn, loss_name, params, (batch, eval_batch) = _problem("mlp", [5, 6], seed=1)
  loss = LOSSES[loss_name]
  g2 = jax.jit(jax.grad(curvax.losses.objective(apply_fn, loss)))(params, batch)
  kw = dict(learning_rate=0.1, diagnostics=True)
  tx = curvature_step_size(optax.adam(0.1), apply_fn, loss, **kw)
  _, s = jax.jit(tx.update)(g2, tx.init(params), params, batch=batch, eval_batch=eval_batch)
  biased = curvature_step_size(optax.adam(0.1), apply_fn, loss, debias=False, **kw)
  _, sb = jax.jit(biased.update)(g2, biased.init(params), params, batch=batch)
  d = _NpAdam(lambda t: 0.1)(np.asarray(ravel_pytree(g2)[0]), 0)
  _, gi1, ggn1 = _np_per_example(apply_fn, loss_name, params, eval_batch)
  _, gi2, ggn2 = _np_per_example(apply_fn, loss_name, params, batch)
  g1, gb = gi1.mean(0), gi2.mean(0)
  want = dict(numerator=d @ g1, denominator=d @ ggn1 @ d, alpha=-(d @ g1) / (d @ ggn1 @ d),
              biased_numerator=d @ gb, biased_denominator=d @ ggn2 @ d,
              hybrid=-(d @ g1) / (d @ ggn2 @ d), direction_norm=np.linalg.norm(d),
              cos_batch=-(d @ gb) / (np.linalg.norm(d) * np.linalg.norm(gb)),
              cos_eval=-(d @ g1) / (np.linalg.norm(d) * np.linalg.norm(g1)))
  for f, v in want.items():
    np.testing.assert_allclose(getattr(s, f), v, rtol=1e-9, err_msg=f)
  np.testing.assert_allclose(sb.alpha, -(d @ gb) / (d @ ggn2 @ d), rtol=1e-9)
  np.testing.assert_allclose(s.hybrid - sb.alpha,
                             -(want["numerator"] - want["biased_numerator"])
                             / want["biased_denominator"], rtol=1e-9)


def _dictated_interval_lrs(estimates, **kw):
  """Applied learning rates of an interval transform (warm-up 0, I = N =
  len(estimates), eta = 0.5) on a one-weight problem whose absolute alpha* at
  each window step is dictated: w = 0, f = x w, MSE, updates u = 1 so d = -eta;
  on eval_batch (x=1, y=c): g = -c, G = 1, alpha*_abs = -c."""
  n = len(estimates)
  tx = curvature_step_size(optax.sgd(0.5), lambda p, x: x @ p["w"], LOSSES["mse"],
                           learning_rate=0.5, mode="interval", interval=n, num_estimates=n,
                           **kw)
  params, u = {"w": jnp.zeros((1, 1))}, {"w": jnp.ones((1, 1))}
  batch = (jnp.ones((1, 1)), jnp.zeros((1, 1)))
  step = jax.jit(lambda s, eb: tx.update(u, s, params, batch=batch, eval_batch=eb))
  s, lrs = tx.init(params), []
  for a in list(estimates) + [0.0]:
    upd, s = step(s, (jnp.ones((1, 1)), jnp.full((1, 1), -a)))
    lrs.append(float(-upd["w"][0, 0]))
  return lrs


def test_interval_seed_rule_median_of_all_estimates_when_positive_only_false():
  """positive_only=False is the seed's rule (Fig. 4.8): the median of all N
  estimates (even N: the mean of the middle two), applied only if positive."""
  np.testing.assert_allclose(_dictated_interval_lrs([-0.2, 0.1, -0.6, 0.3],
                                                    positive_only=False)[-1], 0.5)
  np.testing.assert_allclose(_dictated_interval_lrs([-0.2, 0.1, 0.6, 0.3],
                                                    positive_only=False)[-1], 0.2)


def test_interval_default_follows_the_spec_median_rule():
  """The default is the spec's rule: median (-0.2, 0.1, -0.6, 0.3) = -0.05 < 0,
  so the learning rate stays 0.5 (filtering the negatives first would give 0.2)."""
  lrs = _dictated_interval_lrs([-0.2, 0.1, -0.6, 0.3])
  np.testing.assert_allclose(lrs, [0.5] * 5)


# ---------------------------------------------------------------------------
# (b) diagnostics: instruments from the definitions in the thesis / Cockpit.

def _np_gradient_tests(gi):
  """The practical tests in the thesis' variance forms (Eqs. C.17-C.33), not
  the algebra the code uses: NormTest from the l1 norm of the unbiased sample
  variance, InnerTest from the unbiased variance of the normalised
  projections g_i'g / ||g||^2, OrthoTest from the orthogonal components."""
  b = gi.shape[0]
  g = gi.mean(0)
  gsq = g @ g
  norm = np.sqrt(np.sum(np.var(gi, axis=0, ddof=1)) / (b * gsq))
  inner = np.sqrt(np.var(gi @ g / gsq, ddof=1) / b)
  orth = gi - np.outer(gi @ g / gsq, g)
  ortho = np.sqrt(np.sum(orth ** 2) / gsq / (b * (b - 1)))
  return norm, inner, ortho


def _cockpit_alpha(t, fs, dfs, fs_var, dfs_var):
  """Cockpit's ``_fit_quadratic`` and ``_get_alpha`` (quantities/alpha.py):
  Phi (3 x 4), zero variances -> 1e-10, mu by the normal equations;
  -1 if mu_2 < 0, else 2 t / (-mu_1 / mu_2) - 1."""
  phi = np.array([[1, 0, 0], [1, t, t ** 2], [0, 1, 0], [0, 1, 2 * t]], float).T
  var = [1e-10 if v == 0 else v for v in list(fs_var) + list(dfs_var)]
  lam_inv = np.linalg.inv(np.diag(var))
  mu = np.linalg.inv(phi @ lam_inv @ phi.T) @ phi @ lam_inv @ np.asarray(list(fs) + list(dfs))
  return -1.0 if mu[2] < 0 else 2 * t / (-mu[1] / mu[2]) - 1


def _np_alpha(ell0, gi0, ell1, gi1, s):
  """Alpha of step s from per-example losses and gradients at both ends:
  slopes s'g_i / ||s||, noise levels the unbiased per-example variances."""
  tau = np.linalg.norm(s)
  d0, d1 = gi0 @ s / tau, gi1 @ s / tau
  return _cockpit_alpha(tau, [ell0.mean(), ell1.mean()], [d0.mean(), d1.mean()],
                        [np.var(ell0, ddof=1), np.var(ell1, ddof=1)],
                        [np.var(d0, ddof=1), np.var(d1, ddof=1)])


_MONITORED = ["loss", "grad_norm", "update_size", "distance", "alpha", "norm_test",
              "inner_test", "ortho_test", "grad_hist_1d", "mean_gsnr", "cabs",
              "early_stopping", "tic_diag", "tic_trace", "hess_trace"]


@pytest.mark.parametrize("every,names", [
    (1, _MONITORED), (2, ["loss", "alpha", "distance", "update_size", "norm_test"])])
def test_monitor_run_matches_numpy_reference(every, names):
  """Adam (so the step s is not -eta g) on a fresh batch each step, tracked
  every step (Alpha's end point shared with the per-example pass) or every
  other step (end point by a JVP in a cond). Every tracked value against
  numpy: Loss = mean of the per-example
  losses; GradNorm, UpdateSize (the Adam step), Distance ||theta_t - theta_0||,
  each also per layer; the three gradient tests in the thesis' variance forms;
  GradHist1d of the unscaled g_ij (100 bins on (-2, 2), clamped); MeanGSNR
  (Eq. C.40, eps 1e-5); CABS (Eq. C.6); EarlyStopping (Eq. C.11 with eps 1e-5
  on the unbiased variance); TICDiag / TICTrace (eps 1e-7) and HessTrace (per
  layer) from the exact GGN diagonal; Alpha of step t (reported at t + 1) by
  Cockpit's fit. Catches g_i / B (BackPACK scaling), 1/B for 1/(B-1), a
  population variance in Alpha, the step of the wrong update, Distance from
  the wrong origin."""
  lr = 0.3
  apply_fn, loss_name, params, batches = _problem("mlp", [6] * 4, seed=3, scale=2.0)
  loss = LOSSES[loss_name]
  tx = dg.monitor(optax.adam(lr), apply_fn, loss, names, every=every, learning_rate=lr)
  obj = curvax.losses.objective(apply_fn, loss)
  step = jax.jit(lambda s, p, b: tx.update(jax.grad(obj)(p, b), s, p, batch=b))
  theta0, unravel = ravel_pytree(params)
  theta0 = np.asarray(theta0)
  sizes = [l.size for l in jax.tree_util.tree_leaves(params)]
  split = lambda v: np.split(v, np.cumsum(sizes)[:-1])   # noqa: E731
  adam = _NpAdam(lambda t: lr)
  theta, state, p, prev, alphas = theta0.copy(), tx.init(params), params, None, []
  for t, batch in enumerate(batches):
    ell, gi, ggn = _np_per_example(apply_fn, loss_name, unravel(theta), batch)
    b, dim = gi.shape
    g = gi.mean(0)
    s = adam(g, t)
    u, state = step(state, p, batch)
    np.testing.assert_allclose(ravel_pytree(u)[0], s, rtol=1e-9, atol=1e-14)
    rec = dg.record(state)
    tracked = t % every == 0
    assert bool(state.tracked) == tracked
    if tracked:
      m, dggn = (gi ** 2).mean(0), np.diag(ggn)
      var = np.var(gi, axis=0, ddof=1)
      want = dict(loss=ell.mean(), grad_norm=np.linalg.norm(g), update_size=np.linalg.norm(s),
                  distance=np.linalg.norm(theta - theta0),
                  mean_gsnr=np.mean(g ** 2 / ((gi ** 2).sum(0) / b - g ** 2 + 1e-5)),
                  cabs=lr * np.sum((gi - g) ** 2) / b / ell.mean(),
                  early_stopping=1 - b / dim * np.sum(g ** 2 / (var + 1e-5)),
                  tic_diag=np.sum(m / (dggn + 1e-7)), tic_trace=m.sum() / (dggn.sum() + 1e-7),
                  hess_trace=dggn.sum())
      want.update(zip(("norm_test", "inner_test", "ortho_test"), _np_gradient_tests(gi)))
      for k in set(names) & set(want):
        np.testing.assert_allclose(rec[k], want[k], rtol=1e-8, atol=1e-14, err_msg=f"t={t} {k}")
      for k, vec in (("grad_norm", g), ("update_size", s), ("distance", theta - theta0),
                     ("hess_trace", None)):
        if k not in names:
          continue
        layers = ([x.sum() for x in split(dggn)] if vec is None
                  else [np.linalg.norm(x) for x in split(vec)])
        np.testing.assert_allclose(list(rec[k + "_layers"].values()), layers, rtol=1e-8,
                                   atol=1e-14, err_msg=k)
      if "grad_hist_1d" in names:
        hist, _ = np.histogram(np.clip(gi.ravel(), -2, 2 - 1e-12), bins=100, range=(-2, 2))
        np.testing.assert_array_equal(rec["grad_hist_1d"], hist)
    if prev is not None:
      pt, pell, pgi, ps = prev
      assert int(state.alpha_step) == pt and bool(state.alpha_fresh)
      want_alpha = _np_alpha(pell, pgi, ell, gi, ps)
      np.testing.assert_allclose(state.alpha, want_alpha, rtol=1e-8, err_msg=f"alpha {pt}")
      alphas.append(want_alpha)
    else:
      assert not bool(state.alpha_fresh)
    prev = (t, ell, gi, s) if tracked else None
    theta = theta + s
    p = optax.apply_updates(p, u)
  assert len(alphas) == len(batches) // every - (every == 1)
  assert any(a != -1.0 for a in alphas)   # a fit with a minimum, not only the -1 branch


def test_gradient_tests_follow_the_variance_forms_on_spread_gradients():
  """NormTest, InnerTest, OrthoTest from (||g_i||^2, g_i'g) equal the thesis'
  variance forms (unbiased 1/(B-1) sample variances, divided by B) on random
  per-example gradients of several batch sizes, B = 2 included (where 1/(B-1)
  against 1/B is a factor 2)."""
  rng = np.random.default_rng(7)
  for b in (2, 3, 8):
    gi = rng.normal(0.4, 1.0, size=(b, 6)) * rng.uniform(0.2, 3.0, size=(b, 1))
    sq, dots = dg.gram_statistics(jnp.asarray(gi))
    got = [dg.norm_test(sq, dots), dg.inner_test(sq, dots), dg.ortho_test(sq, dots)]
    np.testing.assert_allclose(got, _np_gradient_tests(gi), rtol=1e-10)


def test_alpha_matches_cockpits_fit_including_the_edge_branches():
  """`dg.alpha` from per-example observations (B = 4 and 6) against Cockpit's
  normal equations: a convex fit overshooting, one undershooting, a step that
  goes uphill (fitted start slope > 0: alpha < -1), a concave fit (-1), and
  identical per-example losses at the start (zero variance -> 1e-10)."""
  rng = np.random.default_rng(11)
  tau = 0.4
  cases = {
      "overshoot": (-1.0, 1.2), "undershoot": (-1.0, -0.3), "uphill": (0.5, 2.0),
      "concave": (-0.5, -1.5)}
  for name, (m0, m1) in cases.items():
    ell0, ell1 = rng.uniform(1.0, 1.4, 4), rng.uniform(0.8, 1.2, 6)
    if name == "concave":
      ell1 = ell0.mean() - 2.0 + 0.01 * rng.normal(size=6)
    p0, p1 = tau * rng.normal(m0, 0.05, 4), tau * rng.normal(m1, 0.05, 6)
    want = _cockpit_alpha(tau, [ell0.mean(), ell1.mean()], [p0.mean() / tau, p1.mean() / tau],
                          [np.var(ell0, ddof=1), np.var(ell1, ddof=1)],
                          [np.var(p0 / tau, ddof=1), np.var(p1 / tau, ddof=1)])
    got = dg.alpha(jnp.asarray(ell0), jnp.asarray(ell1), jnp.asarray(p0), jnp.asarray(p1), tau)
    np.testing.assert_allclose(got, want, rtol=1e-8, err_msg=name)
    assert {"overshoot": want > 0, "undershoot": -1 < want < 0, "uphill": want < -1,
            "concave": want == -1.0}[name], (name, want)
  ell0 = np.full(4, 1.3)
  ell1, p0, p1 = rng.uniform(0.8, 1.2, 6), tau * rng.normal(-1, 0.05, 4), tau * rng.normal(
      0.2, 0.05, 6)
  want = _cockpit_alpha(tau, [1.3, ell1.mean()], [p0.mean() / tau, p1.mean() / tau],
                        [0.0, np.var(ell1, ddof=1)],
                        [np.var(p0 / tau, ddof=1), np.var(p1 / tau, ddof=1)])
  np.testing.assert_allclose(dg.alpha(jnp.asarray(ell0), jnp.asarray(ell1), jnp.asarray(p0),
                                      jnp.asarray(p1), tau), want, rtol=1e-7)
