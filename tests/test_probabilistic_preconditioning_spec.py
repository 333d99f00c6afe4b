"""Spec conformance of `probabilistic_preconditioning` (specs/probabilistic_preconditioning.md).

`_spec_reference` is an independent float64 numpy re-implementation of the
spec's round, written from the spec alone (no curvax code): the state machine
of the table "One estimation round" (prior 0..P-1, fit and observation 1 at
P-1, active observations P..P+M-2, rank-k estimate and inner (re)start at
P+M-1, preconditioned steps from there, restart by step count clearing
everything), the prior fit (alpha, w, lam per group), the observations (O1,
O2 with d = B^{-1} g by the spec's Woodbury form, checked against a dense
solve), the posterior mean B = (1/alpha) I + w^2 X S', the rank-k estimate
from the SVD of K = Z'BZ (Z an orthonormal basis of span[X, S]) and the two
preconditioner forms, with SGD, heavy-ball momentum or Adam as the inner
optimizer. Gradients and dense Hessians come from jax.grad / jax.hessian of
the flattened objective, on a different (noisy) batch every step, so that
lam > 0 and every batch-dependent choice is visible.

Every configuration is compared with the library step by step: the phase and
round step after each step, the number of observations, alpha, w, lam and the
learning rate per group, the stored S and Delta, sigma and the projector UU'
per leaf, and the parameter update.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from jax.flatten_util import ravel_pytree

from curvax.transforms.probabilistic_preconditioning import (
    POSTERIOR, PRECONDITION, PRIOR, probabilistic_preconditioning)


# ---------------------------------------------------------------------------
# The reference (numpy only).


def _orth_basis(a, tol=1e-10):
  u, s, _ = np.linalg.svd(a, full_matrices=False)
  return u[:, s > tol * s.max()]


def _spec_reference(grad, hess, x0, slices, gids, num_steps, *, P, M, k, form="inverse",
                    noise="unbiased", lr_fixed=None, precondition=True, estimate=None,
                    inner="sgd", restart=None):
  """Runs the spec's algorithm for num_steps; returns one record per step.

  grad(x, t), hess(x, t): gradient and dense Hessian of step t's batch at the
  flat parameters x; slices: the leaves' parts of x; gids: group per leaf.
  """
  estimate = precondition if estimate is None else estimate
  num_groups, num_leaves = max(gids) + 1, len(slices)
  apply_start = P + M - 1 if estimate else P          # first step that moves params
  x = np.array(x0, float)
  r = count = 0
  alpha, w, lam = (np.zeros(num_groups) for _ in range(3))
  lr = np.zeros(num_groups) if lr_fixed is None else np.full(num_groups, lr_fixed)
  s_cols, y_cols = [[] for _ in slices], [[] for _ in slices]
  u_mat, sigma = [None] * num_leaves, [None] * num_leaves
  gaps = [np.inf] * num_leaves
  vs = us = None
  mom = adam_m = adam_v = None
  adam_t = 0
  records = []

  def posterior(i):                          # B = B0 + w^2 X S', B0 = I / alpha
    g_i = gids[i]
    s, y = np.array(s_cols[i]).T, np.array(y_cols[i]).T
    delta = y - s / alpha[g_i]
    sts = s.T @ s
    x_mat = delta @ np.linalg.inv(w[g_i] ** 2 * sts + lam[g_i] ** 2 * np.diag(np.diag(sts)))
    b = np.eye(s.shape[0]) / alpha[g_i] + w[g_i] ** 2 * x_mat @ s.T
    return b, x_mat, s

  for t in range(num_steps):
    g = grad(x, t)
    update = np.zeros_like(x)
    phase = PRIOR if r < P else (POSTERIOR if r < apply_start else PRECONDITION)
    if phase == PRIOR:
      if r == 0:
        vs, us = [], []
      vs.append(g)
      us.append(hess(x, t) @ g)
      if r == P - 1:                           # fit alpha, w, lam; observation 1
        vu, uu, vv, norm_sum = (np.zeros(num_groups) for _ in range(4))
        for i, sl in enumerate(slices):
          vu[gids[i]] += sum(v[sl] @ u[sl] for v, u in zip(vs, us))
          uu[gids[i]] += sum(u[sl] @ u[sl] for u in us)
          vv[gids[i]] += sum(v[sl] @ v[sl] for v in vs)
          norm_sum[gids[i]] += np.sum(sum(v[sl] for v in vs) ** 2)
        alpha, w = vu / uu, vu / vv
        lam = (vv - norm_sum / P) / (P - 1) if noise == "unbiased" else np.abs(vv - norm_sum) / P
        lr = alpha.copy() if lr_fixed is None else np.full(num_groups, lr_fixed)
        gbar, ubar = sum(vs) / P, sum(us) / P
        for i, sl in enumerate(slices):
          nrm = np.linalg.norm(gbar[sl])
          s_cols[i], y_cols[i] = [-gbar[sl] / nrm], [-ubar[sl] / nrm]
    elif phase == POSTERIOR:                   # active observation d = B^{-1} g, y = H d
      d = np.zeros_like(x)
      for i, sl in enumerate(slices):
        b, x_mat, s = posterior(i)
        a_i, w_i = alpha[gids[i]], w[gids[i]]
        m = s.shape[1]
        d[sl] = a_i * g[sl] - a_i ** 2 * w_i ** 2 * x_mat @ np.linalg.solve(
            np.eye(m) + a_i * w_i ** 2 * s.T @ x_mat, s.T @ g[sl])
        np.testing.assert_allclose(d[sl], np.linalg.solve(b, g[sl]), rtol=1e-7,
                                   atol=1e-10 * np.abs(d[sl]).max())
      y = hess(x, t) @ d
      for i, sl in enumerate(slices):
        nrm = np.linalg.norm(d[sl])
        s_cols[i].append(d[sl] / nrm)
        y_cols[i].append(y[sl] / nrm)
    else:
      if r == apply_start:                     # rank-k estimate; the inner optimizer starts
        if estimate:
          for i in range(num_leaves):
            b, x_mat, s = posterior(i)
            z = _orth_basis(np.concatenate([x_mat, s], axis=1))
            uk, sk, _ = np.linalg.svd(z.T @ b @ z)
            # A QR of [X S] has min(n, 2M) columns: the ones beyond its rank are
            # directions outside the span, where B = I / alpha (tied, so their
            # vectors are arbitrary: zero columns, i.e. left unpreconditioned).
            extra = min(b.shape[0], 2 * s.shape[1]) - z.shape[1]
            vals = np.concatenate([sk, np.full(extra, 1.0 / alpha[gids[i]])])
            vecs = np.concatenate([z @ uk, np.zeros((b.shape[0], extra))], axis=1)
            order = np.argsort(-vals, kind="stable")
            kk = min(k, len(vals))
            u_mat[i], sigma[i] = vecs[:, order[:kk]], vals[order[:kk]]
            gaps[i] = ((vals[order[kk - 1]] - vals[order[kk]]) / vals[order[0]]
                       if len(vals) > kk else np.inf)
        mom, adam_m, adam_v, adam_t = np.zeros_like(x), np.zeros_like(x), np.zeros_like(x), 0
      g_tilde = g.copy()
      if precondition:
        for i, sl in enumerate(slices):
          u, a_i = u_mat[i], alpha[gids[i]]
          c = 1.0 / (a_i * sigma[i]) if form == "inverse" else sigma[i] ** -0.5
          g_tilde[sl] = g[sl] - u @ (u.T @ g[sl]) + u @ (c * (u.T @ g[sl]))
      if inner == "sgd":
        direction = g_tilde
      elif inner == "momentum":                # torch.optim.SGD(momentum=0.9), dampening 0
        mom = g_tilde + 0.9 * mom
        direction = mom
      else:                                    # Adam, defaults of optax.scale_by_adam
        adam_t += 1
        adam_m = 0.9 * adam_m + 0.1 * g_tilde
        adam_v = 0.999 * adam_v + 0.001 * g_tilde ** 2
        direction = (adam_m / (1 - 0.9 ** adam_t)) / (
            np.sqrt(adam_v / (1 - 0.999 ** adam_t)) + 1e-8)
      for i, sl in enumerate(slices):
        update[sl] = -lr[gids[i]] * direction[sl]
    x = x + update
    r, count = r + 1, count + 1
    if restart is not None and count % restart == 0:
      r = 0
    next_phase = PRIOR if r < P else (POSTERIOR if r < apply_start else PRECONDITION)
    records.append(dict(
        phase=phase, next_phase=next_phase, round_step=r, update=update,
        num_observations=len(s_cols[0]) if estimate and next_phase != PRIOR else 0,
        alpha=alpha.copy(), w=w.copy(), lam=lam.copy(), lr=lr.copy(),
        s=[np.array(c) for c in s_cols], y=[np.array(c) for c in y_cols],
        u=list(u_mat), sigma=list(sigma), gaps=list(gaps)))
  return records


# ---------------------------------------------------------------------------
# Tiny problems, a different batch every step.

T_MAX = 48


def _quadratic(seed=0):
  """Two coupled leaves p (6,), q (2, 2): 0.5 x'(A + c E)x - (b + shift)'x."""
  rng = np.random.default_rng(seed)
  n = 10
  q, _ = np.linalg.qr(rng.normal(size=(n, n)))
  a = q @ np.diag(np.logspace(0, 1.5, n)) @ q.T
  e = rng.normal(size=(n, n))
  e = 0.15 * (e + e.T)
  b = rng.normal(size=n)
  params = {"p": jnp.asarray(rng.normal(size=6)), "q": jnp.asarray(rng.normal(size=(2, 2)))}
  batches = [(jnp.asarray([[0.5 * rng.normal()]]), jnp.asarray(rng.normal(size=(1, n))))
             for _ in range(T_MAX)]
  a, e, b = map(jnp.asarray, (a, e, b))

  def loss_fn(p, batch):
    x = jnp.concatenate([p["p"], jnp.ravel(p["q"])])
    return 0.5 * x @ (a + batch[0][0, 0] * e) @ x - (b + batch[1][0]) @ x

  return params, batches, loss_fn


def _mlp(seed=0):
  """tanh MLP 4-5-3 (leaves b1, b2, w1, w2), softmax cross-entropy, batches of 8."""
  rng = np.random.default_rng(seed)
  params = {"w1": rng.normal(size=(4, 5)) / 2, "b1": 0.1 * rng.normal(size=5),
            "w2": rng.normal(size=(5, 3)) / np.sqrt(5), "b2": 0.1 * rng.normal(size=3)}
  params = jax.tree.map(jnp.asarray, params)
  batches = [(jnp.asarray(rng.normal(size=(8, 4))), jnp.asarray(rng.integers(0, 3, 8)))
             for _ in range(T_MAX)]

  def loss_fn(p, batch):
    x, y = batch
    z = jnp.tanh(x @ p["w1"] + p["b1"]) @ p["w2"] + p["b2"]
    return jnp.mean(jax.nn.logsumexp(z, -1) - jnp.take_along_axis(z, y[:, None], 1)[:, 0])

  return params, batches, loss_fn


_PROBLEMS = {}


def _problem(name):
  """(params, batches, loss_fn, slices, grad, hess), built once per module."""
  if name not in _PROBLEMS:
    params, batches, loss_fn = (_quadratic if name == "quad" else _mlp)()
    flat0, unravel = ravel_pytree(params)
    sizes = [x.size for x in jax.tree.leaves(params)]
    ends = np.cumsum(sizes)
    slices = [slice(end - size, end) for size, end in zip(sizes, ends)]
    f = lambda x, b: loss_fn(unravel(x), b)
    g_fn, h_fn = jax.jit(jax.grad(f)), jax.jit(jax.hessian(f))
    grad = lambda x, t: np.asarray(g_fn(jnp.asarray(x), batches[t]))
    hess = lambda x, t: np.asarray(h_fn(jnp.asarray(x), batches[t]))
    _PROBLEMS[name] = (params, batches, loss_fn, slices, grad, hess)
  return _PROBLEMS[name]


def _run_library(tx, params, batches, loss_fn, num_steps):
  state = tx.init(params)
  step = jax.jit(lambda p, s, b: tx.update(jax.grad(loss_fn)(p, b), s, p, batch=b))
  states, updates = [], []
  for t in range(num_steps):
    u, state = step(params, state, batches[t])
    params = optax.apply_updates(params, u)
    states.append(state)
    updates.append(np.asarray(ravel_pytree(u)[0]))
  return states, updates


def _compare(states, updates, records, slices, gids, *, check_estimate=True):
  """Asserts the library's trajectory equals the reference's, step by step."""
  for t, (st, upd, ref) in enumerate(zip(states, updates, records)):
    msg = f"step {t}"
    assert int(st.phase) == ref["next_phase"], msg
    assert int(st.round_step) == ref["round_step"], msg
    assert int(st.num_observations) == ref["num_observations"], msg
    for field, key in (("alpha", "alpha"), ("prior_scale", "w"), ("noise_scale", "lam"),
                       ("learning_rate", "lr")):
      np.testing.assert_allclose(getattr(st, field), ref[key], rtol=1e-10, atol=1e-300,
                                 err_msg=f"{msg} {field}")
    if ref["phase"] == PRECONDITION and check_estimate:
      alpha_of = [ref["alpha"][gids[i]] for i in range(len(slices))]
      for i in range(len(slices)):
        # The stored S (unit-norm rows) and Delta = Y - S / alpha.
        np.testing.assert_allclose(st.directions.unpack()[i], ref["s"][i], rtol=1e-9, atol=1e-12,
                                   err_msg=f"{msg} S leaf {i}")
        np.testing.assert_allclose(st.residuals.unpack()[i],
                                   ref["y"][i] - ref["s"][i] / alpha_of[i],
                                   rtol=1e-9, atol=1e-10, err_msg=f"{msg} Delta leaf {i}")
        assert ref["gaps"][i] > 1e-6, (msg, i, ref["gaps"][i])   # U well defined
        np.testing.assert_allclose(st.eigenvalues.unpack()[i], ref["sigma"][i], rtol=1e-9,
                                   err_msg=f"{msg} sigma leaf {i}")
        u = np.stack(st.eigenvectors[i], axis=1)
        np.testing.assert_allclose(u @ u.T, ref["u"][i] @ ref["u"][i].T, atol=1e-9,
                                   err_msg=f"{msg} UU' leaf {i}")
    scale = np.abs(ref["update"]).max()
    if ref["phase"] != PRECONDITION:
      assert scale == 0.0 and not np.any(upd), msg        # params fixed while estimating
    else:
      assert scale > 0, msg
      np.testing.assert_allclose(upd, ref["update"], rtol=1e-9, atol=1e-12 * scale,
                                 err_msg=f"{msg} update")


# ---------------------------------------------------------------------------
# The configurations: every switch of the spec at least once.

MLP_LABELS = {"w1": "layer1", "b1": "layer1", "w2": "layer2", "b2": "layer2"}
CONFIGS = {
    # name: (problem, steps, reference kwargs, library kwargs)
    "mlp-seed-form-labels-momentum-restart": (
        "mlp", 20, dict(P=3, M=3, k=2, form="seed", noise="seed", inner="momentum", restart=9),
        dict(prior_iterations=3, num_observations=3, rank=2, form="seed", noise_estimate="seed",
             groups=MLP_LABELS, inner=optax.trace(decay=0.9), restart_every=9)),
    "quad-leaf-groups-adam-fixed-lr-restart": (
        "quad", 18, dict(P=3, M=2, k=1, inner="adam", lr_fixed=0.05, restart=8),
        dict(prior_iterations=3, num_observations=2, rank=1, groups="leaf",
             inner=optax.scale_by_adam(), learning_rate=0.05, restart_every=8)),
    "quad-adaptive-sgd-restart": (             # builds the estimate, does not apply it
        "quad", 20, dict(P=3, M=3, k=2, precondition=False, estimate=True, restart=9),
        dict(prior_iterations=3, num_observations=3, precondition=False,
             estimate_preconditioner=True, restart_every=9)),
    "quad-only-adaptive-restart": (            # no posterior phase, no estimate
        "quad", 16, dict(P=3, M=3, k=2, precondition=False, restart=7),
        dict(prior_iterations=3, num_observations=3, precondition=False, restart_every=7)),
    "quad-one-observation-restart": (
        "quad", 14, dict(P=3, M=1, k=1, restart=6),
        dict(prior_iterations=3, num_observations=1, rank=1, restart_every=6)),
}


def _gids(params, groups):
  names = [jax.tree_util.keystr(p)[2:-2] for p, _ in jax.tree_util.tree_leaves_with_path(params)]
  if groups is None:
    return [0] * len(names)
  if groups == "leaf":
    return list(range(len(names)))
  labels = list(dict.fromkeys(groups[n] for n in names))
  return [labels.index(groups[n]) for n in names]


@pytest.mark.parametrize("name", list(CONFIGS))
def test_trajectory_matches_the_spec_reference(name):
  problem, steps, ref_kw, lib_kw = CONFIGS[name]
  params, batches, loss_fn, slices, grad, hess = _problem(problem)
  gids = _gids(params, lib_kw.get("groups"))
  records = _spec_reference(grad, hess, ravel_pytree(params)[0], slices, gids, steps, **ref_kw)
  states, updates = _run_library(probabilistic_preconditioning(loss_fn, **lib_kw), params,
                                 batches, loss_fn, steps)
  _compare(states, updates, records, slices, gids,
           check_estimate=lib_kw.get("estimate_preconditioner", lib_kw.get("precondition", True)))
  # The comparison is not vacuous: noise matters (lam > 0) and steps were taken.
  assert np.all(records[-1]["lam"] > 0)
  assert sum(r["phase"] == PRECONDITION for r in records) >= 3


def test_defaults_round_structure_and_trajectory():
  """The defaults (spec "Notation" and "Variants"): P = 10, M = 5, k = 2, one
  group, inner SGD with learning rate alpha, form="inverse", the unbiased noise
  estimate (lam > 0 here: it matters), no restart. Round table: steps 0..9
  prior (fit and observation 1 at step 9), observations 2..5 at steps
  10..13, the first parameter update at step P + M - 1 = 14."""
  params, batches, loss_fn, slices, grad, hess = _problem("mlp")
  steps = 40
  records = _spec_reference(grad, hess, ravel_pytree(params)[0], slices, [0] * 4, steps,
                            P=10, M=5, k=2)
  states, updates = _run_library(probabilistic_preconditioning(loss_fn), params, batches,
                                 loss_fn, steps)
  _compare(states, updates, records, slices, [0] * 4)
  # The transitions, stated directly: phase after step t, observations, moves.
  want_phase = [PRIOR] * 9 + [POSTERIOR] * 4 + [PRECONDITION] * (steps - 13)
  assert [int(st.phase) for st in states] == want_phase
  assert [int(st.num_observations) for st in states[8:14]] == [0, 1, 2, 3, 4, 5]
  assert [t for t, u in enumerate(updates) if np.any(u)] == list(range(14, steps))
  assert not np.any(np.asarray(states[8].alpha)) and np.all(np.asarray(states[9].alpha) > 0)
  assert int(states[-1].num_restarts) == 0 and int(states[-1].round_step) == steps
  assert states[-1].alpha.shape == (1,) and np.all(records[-1]["lam"] > 0)
  assert all(v.shape == (2,) for v in states[-1].eigenvalues.unpack())
  # The first step applies the inverse of the rank-k estimate
  # B_k = U diag(sigma) U' + (I - UU') / alpha (from the dense reference) to the
  # gradient at the estimation point: B_k (-step) = g, leaf by leaf.
  g = grad(ravel_pytree(params)[0], 14)
  alpha = float(records[14]["alpha"][0])
  for i, sl in enumerate(slices):
    u, sigma = records[14]["u"][i], records[14]["sigma"][i]
    b_k = u @ np.diag(sigma) @ u.T + (np.eye(u.shape[0]) - u @ u.T) / alpha
    np.testing.assert_allclose(b_k @ -updates[14][sl], g[sl], rtol=1e-9, atol=1e-12)


def test_rank_is_capped_where_the_estimate_only_shortens_steps():
  """The spec takes the top k of K = (1/alpha) I + w^2 (Z'X)(Z'S)', the prior plus a
  rank-M term: by Weyl its top M singular values are >= 1/alpha (the reference's and
  the library's alike, so the inverse form scales steps by 1/(alpha sigma) <= 1), while
  singular values beyond M are <= 1/alpha and unbounded below (their inverse enlarged
  fmnist_mlp's steps up to 8e3-fold at M = 5, k = 10): rank > M is refused."""
  params, batches, loss_fn, slices, grad, hess = _problem("quad")
  records = _spec_reference(grad, hess, ravel_pytree(params)[0], slices, [0, 0], 8,
                            P=3, M=2, k=2)
  states, updates = _run_library(
      probabilistic_preconditioning(loss_fn, prior_iterations=3, num_observations=2, rank=2),
      params, batches, loss_fn, 8)
  _compare(states, updates, records, slices, [0, 0])
  built = [t for t, ref in enumerate(records) if ref["phase"] == PRECONDITION]
  assert built
  for t in built:
    inv_alpha = 1.0 / records[t]["alpha"][0]
    for sigma in records[t]["sigma"]:
      assert np.all(np.asarray(sigma) >= inv_alpha * (1 - 1e-12)), (t, sigma, inv_alpha)
    for sigma in states[t].eigenvalues.unpack():
      assert np.all(np.asarray(sigma) >= inv_alpha * (1 - 1e-9)), (t, sigma, inv_alpha)
  with pytest.raises(ValueError, match="must not exceed num_observations"):
    probabilistic_preconditioning(loss_fn, prior_iterations=3, num_observations=1, rank=2)
