"""hessian_free against specs/hessian_free.md, read line by line.

The reference below is written from the spec alone, in float64 numpy: dense
curvature (``jax.jacfwd``/``jax.hessian`` of this file's own model and loss,
not curvax's), textbook preconditioned CG (Martens & Sutskever 2012, Alg. 2)
with the paper's stopping test (integer window ``k = max(10, ceil(i/10))``, the
model ``phi`` evaluated directly, not recursively), iterates kept at
``ceil(1.3^j)`` computed in rational arithmetic, Levenberg-Marquardt on the
damped model at the final iterate, backtracking, Armijo. The library runs whole
trajectories (several steps, fresh disjoint batches of different sizes each
step) against it: params, update and every state field at every step.
Non-finite values follow hessian_free's docstring (the spec is silent; DESIGN.md
asks that they never reach the parameters): zero update, damping * 3/2,
warm start reset.
Trajectories stay in well-damped regimes: with small damping CG's rounding
grows by orders of magnitude per iteration (two numpy CGs on a permuted copy
of the same system differ by 1e-3 after 20 iterations), which no reference can
match.
"""

import inspect

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.flatten_util import ravel_pytree

import curvax
from curvax import solvers
from reference import (CG_MARTENS as MARTENS, CG_MAX_ITER as MAX_ITER, CG_NONFINITE as NONFINITE,
                       CG_NONPOSITIVE as NONPOS, CG_RESIDUAL as RESIDUAL, numpy_cg,
                       numpy_iterate_grid)

hessian_free = curvax.transforms.hessian_free



# ----------------------------------------------------------------------------- the reference

def _np_step(theta, g, curv, eval_loss, damping, warm, fisher_diag=None, *, cg_max_iter=250,
             adapt_damping=True, min_damping=1e-8, max_damping=1e8, cg_tol=1e-5,
             cg_decay_x0=0.95, martens_criterion=True, martens_eps=5e-4,
             nonpositive_curvature="stop", preconditioner_exponent=0.75,
             use_cg_backtracking=True, use_linesearch=True, linesearch_initial_step=1.0,
             linesearch_c=0.01, linesearch_beta=0.8, linesearch_max_reductions=20):
  """One step of specs/hessian_free.md; ``eval_loss(w) = L_Bbar(w)``. Non-finite
  values: the docstring's policy (zero update, damping * 3/2, warm start 0)."""
  n = len(theta)
  a = curv + damping * np.eye(n)                                   # 1.
  minv = np.ones(n) if fisher_diag is None else \
      (fisher_diag + damping) ** -preconditioner_exponent
  p_final, iters, status, kept = numpy_cg(                          # 2.
      a, -g, cg_decay_x0 * warm, max_iter=cg_max_iter, tol=cg_tol, martens=martens_criterion,
      eps=martens_eps, nonpositive_curvature=nonpositive_curvature, minv=minv)
  phi = 0.5 * p_final @ a @ p_final + g @ p_final                  # 3.
  l0, lf = eval_loss(theta), eval_loss(theta + p_final)
  rho = (lf - l0) / phi if phi < 0 and np.isfinite(l0) and np.isfinite(lf) else -np.inf
  new_damping = damping
  if adapt_damping:
    new_damping = damping * (1.5 if rho < 0.25 else 2 / 3 if rho > 0.75 else 1.0)
    new_damping = min(max(new_damping, min_damping), max_damping)
  j = len(kept) - 1                                                # 4.
  if use_cg_backtracking:
    inf_nan = lambda v: v if np.isfinite(v) else np.inf  # noqa: E731
    while j > 0 and inf_nan(eval_loss(theta + kept[j - 1][1])) < inf_nan(
        eval_loss(theta + kept[j][1])):
      j -= 1
  p = kept[j][1]
  alpha = 1.0                                                      # 5.
  if use_linesearch:
    alpha = 0.0
    for red in range(linesearch_max_reductions + 1):
      t = linesearch_initial_step * linesearch_beta ** red
      v = eval_loss(theta + t * p)
      if np.isfinite(v) and v <= l0 + linesearch_c * t * (g @ p):
        alpha = t
        break
  loss_after = eval_loss(theta + alpha * p) if alpha > 0 else l0
  step, warm_new = alpha * p, p_final                              # 6.
  finite = (np.all(np.isfinite(g)) and np.isfinite(l0) and np.isfinite(loss_after)
            and status != NONFINITE and np.all(np.isfinite(p_final)))
  if not finite:
    step, warm_new, alpha, loss_after = np.zeros(n), np.zeros(n), 0.0, l0
    if adapt_damping:
      new_damping = min(max(damping * 1.5, min_damping), max_damping)
  return step, dict(damping=new_damping, rho=rho, cg_iterations=iters, cg_status=status,
                    chosen_iterate=j, chosen_iteration=kept[j][0], alpha=alpha,
                    loss_before=l0, loss_after=loss_after, warm_start=warm_new,
                    nonfinite=not finite, num_kept=len(kept))


# ----------------------------------------------------------------------------- problems

def _mlp(params, x):
  return jnp.tanh(x @ params["w1"] + params["b1"]) @ params["w2"] + params["b2"]


def _linear(params, x):
  return x @ params["w"] + params["b"]


def _se(out, y):   # 0.5 |out - y|^2, per example (curvax's mean_squared_error)
  return 0.5 * jnp.sum((out - y) ** 2, -1)


MSE = curvax.losses.mean_squared_error   # the library's loss for _se


def _problem(kind, seed=0, pool=128):
  """(apply, params, data pool) for a tiny float64 squared-error problem."""
  k = jax.random.split(jax.random.PRNGKey(seed), 4)
  if kind == "quadratic":   # linear model + squared error: an exact quadratic
    x = jax.random.normal(k[1], (pool, 4))
    y = x @ jax.random.normal(k[2], (4, 2)) + 0.3 * jax.random.normal(k[3], (pool, 2))
    return _linear, {"w": 0.3 * jax.random.normal(k[0], (4, 2)), "b": jnp.zeros(2)}, (x, y)
  params = {"w1": jax.random.normal(k[0], (4, 5)) / 2, "b1": 0.1 * jnp.ones(5),
            "w2": jax.random.normal(k[1], (5, 3)) / np.sqrt(5), "b2": jnp.zeros(3)}
  x = jax.random.normal(k[2], (pool, 4))
  return _mlp, params, (x, jax.random.normal(k[3], (pool, 3)))


_TOOLS = {}


def _tools(kind):
  """Jitted flat-parameter objective, gradient, dense GGN, Hessian and Fisher
  diagonal (mean of squared per-example gradients) of this file's model."""
  if kind in _TOOLS:
    return _TOOLS[kind]
  apply, params, _ = _problem(kind)
  lossf = _se
  _, unravel = ravel_pytree(params)

  def obj(w, batch):
    return jnp.mean(lossf(apply(unravel(w), batch[0]), batch[1]))

  def ggn(w, batch):
    x, _ = batch
    jac = jax.jacfwd(lambda v: apply(unravel(v), x))(w)   # (N, C, P); output Hessian I
    return jnp.einsum("ncp,ncq->pq", jac, jac) / x.shape[0]

  def fisher(w, batch):
    per = jax.jacfwd(lambda v: lossf(apply(unravel(v), batch[0]), batch[1]))(w)
    return jnp.mean(per ** 2, 0)

  _TOOLS[kind] = dict(obj=jax.jit(obj), grad=jax.jit(jax.grad(obj)), ggn=jax.jit(ggn),
                      hessian=jax.jit(jax.hessian(obj)), fisher=jax.jit(fisher),
                      unravel=unravel)
  return _TOOLS[kind]


def _flat(tree):
  return np.asarray(ravel_pytree(tree)[0])


def _batches(data, k, nb=8, ne=6):
  """Step k's disjoint batches B (nb examples) and B-bar (ne): different sizes,
  so a batch used in the wrong role cannot go unnoticed."""
  off = k * (nb + ne)
  return (jax.tree.map(lambda a: a[off:off + nb], data),
          jax.tree.map(lambda a: a[off + nb:off + nb + ne], data))


# ----------------------------------------------------------------------------- trajectories

# Each case names what its reference trajectory must show (so it cannot become
# vacuous): "up"/"down"/"keep" = rho < 1/4 / > 3/4 / in between, "backtracks"
# (an earlier stored iterate chosen, then another step: the warm start must be
# the final iterate), "shrinks" (0 < alpha < 1), "no_step" (alpha = 0), a CG
# status, "nonfinite". One compilation per case (about 5 s on a CPU), so each
# case covers several things.
_TRAJECTORIES = {
    # The defaults on an exact quadratic; a NaN gradient at step 3 (CG meets
    # it at once), then clean steps from a zero warm start.
    "quadratic_ggn": dict(kind="quadratic", steps=6, nan=("grad", 3),
                          show={"up", "down", "backtracks", "no_step", RESIDUAL, NONFINITE,
                                "nonfinite"}),
    # The Hessian (indefinite) with the Fisher preconditioner (M from B and the
    # current damping): Martens' test, negative curvature, residual; a NaN in
    # B-bar at the last step.
    "mlp_hessian_fisher": dict(kind="mlp", steps=5, curvature="hessian", nb=12,
                                  options=dict(preconditioner="fisher"), nan=("eval", 4),
                                  show={"up", "down", "backtracks", "shrinks", "no_step",
                                        MARTENS, NONPOS, RESIDUAL, "nonfinite"}),
}

_UPDATES = {}


def _compiled_update(kind, curvature="ggn", **options):
  """``jit(hessian_free(...).update)`` with the library's defaults, shared by the
  tests that use the same settings."""
  key = (kind, curvature, tuple(sorted(options.items())))
  if key not in _UPDATES:
    apply, _, _ = _problem(kind)
    tx = hessian_free(apply, MSE, curvature=curvature, **options)
    _UPDATES[key] = tx, jax.jit(
        lambda g, s, p, b, e: tx.update(g, s, p, batch=b, eval_batch=e))
  return _UPDATES[key]


@pytest.mark.parametrize("case", list(_TRAJECTORIES))
def test_trajectory_matches_spec_reference(case):
  """Several steps of hessian_free (defaults unless the case says otherwise)
  against the spec's reference: at every step the update, the parameters and
  every state field; the state carries the damping and the warm start from
  step to step, each step gets fresh disjoint batches B (gradient, curvature,
  preconditioner) and B-bar (rho, backtracking, line search)."""
  cfg = _TRAJECTORIES[case]
  kind, curvature = cfg["kind"], cfg.get("curvature", "ggn")
  options = cfg.get("options", {})
  _, params, data = _problem(kind)
  t = _tools(kind)
  tx, update = _compiled_update(kind, curvature, **options)
  state, lib_params = tx.init(params), params
  theta, damping, warm = _flat(params), 1.0, np.zeros(len(_flat(params)))
  seen = set()
  for k in range(cfg["steps"]):
    prev_damping = damping
    batch, eval_batch = _batches(data, k, nb=cfg.get("nb", 8))
    nan_here = cfg.get("nan", (None, -1))[1] == k
    if nan_here and cfg["nan"][0] == "eval":
      eval_batch = (eval_batch[0].at[0, 0].set(jnp.nan), eval_batch[1])
    g = np.asarray(t["grad"](jnp.asarray(theta), batch))
    g_lib = t["grad"](jnp.asarray(_flat(lib_params)), batch)
    if nan_here and cfg["nan"][0] == "grad":
      g, g_lib = np.full_like(g, np.nan), jnp.full_like(g_lib, jnp.nan)
    curv = np.asarray(t[curvature](jnp.asarray(theta), batch))
    fisher = (np.asarray(t["fisher"](jnp.asarray(theta), batch))
              if options.get("preconditioner") == "fisher" else None)
    eval_loss = lambda w, e=eval_batch: float(t["obj"](jnp.asarray(w), e))  # noqa: E731
    step, want = _np_step(theta, g, curv, eval_loss, damping, warm, fisher)
    u, state = update(t["unravel"](g_lib), state, lib_params, batch, eval_batch)
    lib_params = jax.tree.map(jnp.add, lib_params, u)
    theta, damping, warm = theta + step, want["damping"], want["warm_start"]

    msg = f"step {k}"
    for name, actual, expected in (("update", u, step), ("warm_start", state.warm_start, warm),
                                   ("params", lib_params, theta)):
      np.testing.assert_allclose(_flat(actual), expected, rtol=0, err_msg=f"{msg}: {name}",
                                 atol=1e-9 * max(np.max(np.abs(expected)), 1e-12))
    for name in ("damping", "rho", "alpha", "loss_before", "loss_after"):
      np.testing.assert_allclose(getattr(state, name), want[name], rtol=1e-9,
                                 err_msg=f"{msg}: {name}")
    for name in ("cg_iterations", "cg_status", "chosen_iterate", "chosen_iteration",
                 "nonfinite"):
      assert int(getattr(state, name)) == int(want[name]), f"{msg}: {name}"
    assert int(state.count) == k + 1
    seen |= {want["cg_status"]}
    seen |= {"up"} if want["rho"] < 0.25 else {"down"} if want["rho"] > 0.75 else {"keep"}
    if want["chosen_iterate"] < want["num_kept"] - 1 and k < cfg["steps"] - 1:
      seen.add("backtracks")
    seen |= ({"shrinks"} if 0 < want["alpha"] < 1 else {"no_step"} if want["alpha"] == 0
             else set())
    assert want["nonfinite"] == nan_here
    if nan_here:
      seen.add("nonfinite")
      # Rejected: no update, damping * 3/2, the warm start reset to zero.
      assert not np.any(step) and not np.any(warm) and want["damping"] == 1.5 * prev_damping
  assert cfg["show"] <= seen, cfg["show"] - seen
  assert int(state.nonfinite_count) == ("nan" in cfg)


# ----------------------------------------------------------------------------- the two batches

def test_each_batch_feeds_only_its_quantities():
  """B (``batch``) and the gradient (``updates``) make the CG solution; B-bar
  (``eval_batch``) only the losses that rho, backtracking and the line search
  use. Bitwise: the CG outputs do not change with B-bar, loss_before does not
  change with B, and the solution changes with ``updates``."""
  _, params, data = _problem("quadratic")
  t = _tools("quadratic")
  tx, update = _compiled_update("quadratic")
  b1, e1 = _batches(data, 0)
  b2, e2 = _batches(data, 1)
  g = t["unravel"](t["grad"](jnp.asarray(_flat(params)), b1))
  state = tx.init(params)._replace(
      warm_start=jax.tree.map(lambda a: 0.1 * jnp.ones_like(a), params))

  def run(g, b, e):
    return update(g, state, params, b, e)[1]

  base, other_eval, other_batch = run(g, b1, e1), run(g, b1, e2), run(g, b2, e1)
  other_grad = run(jax.tree.map(lambda a: 1.5 * a, g), b1, e1)
  for name in ("cg_iterations", "cg_status"):
    assert int(getattr(base, name)) == int(getattr(other_eval, name))
  np.testing.assert_array_equal(_flat(base.warm_start), _flat(other_eval.warm_start))
  assert float(base.loss_before) != float(other_eval.loss_before)
  np.testing.assert_allclose(base.loss_before, t["obj"](jnp.asarray(_flat(params)), e1),
                             rtol=1e-13)
  assert float(base.loss_before) == float(other_batch.loss_before)
  for changed in (other_batch, other_grad):
    assert not np.allclose(_flat(changed.warm_start), _flat(base.warm_start), rtol=1e-3)


@pytest.mark.parametrize("curvature", ["ggn", "hessian"])
def test_one_linearisation_on_b_per_step(curvature):
  """The model runs on B exactly once per step (the linearisation every CG
  product reuses) and on B-bar for the losses, nothing else (trace-time count:
  B has 8 examples, B-bar 6)."""
  apply, params, data = _problem("mlp")
  batch, eval_batch = _batches(data, 0)
  sizes = []

  def counting_apply(p, x):
    sizes.append(x.shape[0])
    return apply(p, x)

  tx = hessian_free(counting_apply, MSE, curvature=curvature)
  g = jax.tree.map(jnp.ones_like, params)
  jax.make_jaxpr(lambda g, s, p: tx.update(g, s, p, batch=batch, eval_batch=eval_batch))(
      g, tx.init(params), params)
  assert sizes.count(8) == 1 and sizes.count(6) >= 1 and set(sizes) == {6, 8}, sizes


# ----------------------------------------------------------------------------- rho and Armijo

@jax.jit
def _update_with_value_fn(g, state, params, batch, knobs):
  """``hessian_free`` on the quadratic problem, no backtracking, with
  ``L_Bbar`` replaced by ``value_fn(theta + d) = l0 + u d'p/p'p - s |d|`` for
  ``|d| <= r`` and ``l0 + jump`` beyond (``knobs = (l0, p, u, s, jump, r)``):
  rho and the Armijo test see exactly what the test asks for."""
  l0, p, u, s, jump, r = knobs
  theta = ravel_pytree(params)[0]

  def value_fn(q):
    d = ravel_pytree(q)[0] - theta
    norm = jnp.sqrt(jnp.sum(d * d))
    return jnp.where(norm <= r, l0 + u * (d @ p) / (p @ p) - s * norm, l0 + jump)

  tx = hessian_free(_linear, MSE, use_cg_backtracking=False)
  return tx.update(g, state, params, batch=batch, value_fn=value_fn)


def _value_fn_setup():
  _, params, data = _problem("quadratic")
  t = _tools("quadratic")
  batch, _ = _batches(data, 0)
  theta = _flat(params)
  g = np.asarray(t["grad"](jnp.asarray(theta), batch))
  tx = hessian_free(_linear, MSE)
  state = tx.init(params)._replace(damping=jnp.asarray(0.5))
  zero = (1.0, jnp.ones_like(jnp.asarray(theta)), 0.0, 0.0, 0.0, np.inf)

  def run(knobs):
    knobs = tuple(jnp.asarray(k, jnp.float64) for k in knobs)
    return _update_with_value_fn(t["unravel"](jnp.asarray(g)), state, params, batch, knobs)

  # CG does not look at value_fn: its solution p_final, and the damped model there.
  p = _flat(run(zero)[1].warm_start)
  a = np.asarray(t["ggn"](jnp.asarray(theta), batch)) + 0.5 * np.eye(len(theta))
  phi = 0.5 * p @ a @ p + g @ p
  assert phi < 0 and np.linalg.norm(a @ p + g) <= 1e-5 * np.linalg.norm(g)
  return run, p, g, phi


@pytest.mark.parametrize("rho, factor", [
    (0.25 - 1e-4, 1.5), (0.25 + 1e-4, 1.0), (0.75 - 1e-4, 1.0), (0.75 + 1e-4, 2 / 3)])
def test_levenberg_marquardt_rho_thresholds_and_factors(rho, factor):
  """rho = (L(theta + p_final) - L(theta)) / phi(p_final) with the damped model
  phi(p) = p'(C + lambda I)p / 2 + g'p; lambda * 3/2 below 1/4, * 2/3 above 3/4."""
  run, p, _, phi = _value_fn_setup()
  _, state = run((1.0, p, rho * phi, 0.0, 0.0, np.inf))
  np.testing.assert_allclose(state.rho, rho, rtol=1e-9)
  np.testing.assert_allclose(state.damping, 0.5 * factor, rtol=1e-15)


@pytest.mark.parametrize("case", ["accept_after_20", "none_after_20", "beta_cubed",
                                  "c_just_met", "c_just_missed"])
def test_armijo_constants(case):
  """Armijo: alpha = 1, 0.8, 0.8^2, ... (at most 20 reductions), accepted when
  L(theta + alpha p) <= L(theta) + 0.01 alpha g'p (g = ``updates``); alpha = 0
  and no step when none is. The value_fn decreases at slope -s along p up to
  radius r and jumps up beyond."""
  run, p, g, _ = _value_fn_setup()
  norm, slope = np.linalg.norm(p), g @ p
  steep = 1e3 * abs(slope) / norm   # Armijo holds wherever the loss decreases
  r_for = lambda j, f: 0.8 ** j * norm * f  # noqa: E731
  knobs, alpha = {
      "accept_after_20": ((steep, 1.0, r_for(20, 1 + 1e-7)), 0.8 ** 20),
      "none_after_20": ((steep, 1.0, r_for(20, 1 - 1e-7)), 0.0),
      "beta_cubed": ((steep, 1.0, r_for(3, 1 + 1e-7)), 0.8 ** 3),
      "c_just_met": ((1.0001 * 0.01 * abs(slope) / norm, 0.0, np.inf), 1.0),
      "c_just_missed": ((0.9999 * 0.01 * abs(slope) / norm, 0.0, np.inf), 0.0),
  }[case]
  u, state = run((1.0, p, 0.0) + knobs)
  np.testing.assert_allclose(state.alpha, alpha, rtol=1e-12)
  np.testing.assert_allclose(_flat(u), alpha * p, rtol=1e-12, atol=1e-300)
  assert not bool(state.nonfinite) and float(state.loss_before) == 1.0
  s = knobs[0]
  np.testing.assert_allclose(state.loss_after, 1.0 - s * alpha * norm, rtol=1e-12)
  np.testing.assert_allclose(_flat(state.warm_start), p, rtol=1e-13)   # the final iterate


# ----------------------------------------------------------------------------- defaults

def test_defaults_are_the_specs():
  """specs/hessian_free.md's constants, where hessian_free and the solvers it
  calls with their defaults keep them."""
  def defaults(fn):
    return {n: v.default for n, v in inspect.signature(fn).parameters.items()}
  hf = defaults(hessian_free)
  assert {n: hf[n] for n in (
      "curvature", "initial_damping", "adapt_damping", "cg_max_iter", "cg_decay_x0",
      "martens_criterion", "martens_eps", "nonpositive_curvature", "preconditioner",
      "preconditioner_exponent", "use_cg_backtracking", "use_linesearch",
      "linesearch_initial_step", "linesearch_c", "linesearch_beta",
      "linesearch_max_reductions")} == dict(
          curvature="ggn", initial_damping=1.0, adapt_damping=True, cg_max_iter=None,
          cg_decay_x0=0.95, martens_criterion=True, martens_eps=5e-4,
          nonpositive_curvature="stop", preconditioner=None, preconditioner_exponent=0.75,
          use_cg_backtracking=True, use_linesearch=True, linesearch_initial_step=1.0,
          linesearch_c=0.01, linesearch_beta=0.8, linesearch_max_reductions=20)
  cg = defaults(solvers.cg)
  assert (cg["martens_min_window"], cg["martens_window_fraction"], cg["gamma"]) == (10, 0.1, 1.3)
  lm = defaults(solvers.levenberg_marquardt)
  assert (lm["lower"], lm["upper"], lm["increase"], lm["decrease"]) == (0.25, 0.75, 1.5, 2 / 3)
  assert solvers.iterate_grid(250) == tuple(numpy_iterate_grid(250))
