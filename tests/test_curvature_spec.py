"""Spec conformance of curvax.curvature / curvax.losses (specs/curvature.md).

Checks the spec's own statements against references written from the spec in
plain numpy / pure jax.numpy (no curvax loss in the reference), for items the
other curvature tests do not pin that way:

* the Monte-Carlo factors are the gradients of the loss at labels drawn from
  the model (§2.2 notes, Eq. 5.9, Ex. 5.2), sample by sample;
* the Monte-Carlo GGN quantities (DiagGGNMC, the ViViT factor and its
  eigenpairs) have the scaling ``(1/(N M)) sum_{n,m}`` of those sampled
  gradients (Eqs. B.13-B.15, 7.3), default ``M = 1``;
* the GGN is the Fisher of the model's predictive distribution (Eqs. 3.26-3.28),
  computed by enumerating labels;
* the GGN is the Hessian of the linearised model's loss (Eq. 3.16);
* for a ReLU network each layer's Hessian block is its GGN block (§2.1);
* products reuse one linearisation (§2.3): no forward pass per product.
"""

import functools
import itertools

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.flatten_util import ravel_pytree

import curvax
from curvax.curvature import diagonals, eigen

N, D_IN, HIDDEN, C = 5, 3, 4, 3


def _mlp(params, x, act=jnp.tanh):
  return act(x @ params["w1"] + params["b1"]) @ params["w2"] + params["b2"]


def _relu_mlp(params, x):
  return _mlp(params, x, jax.nn.relu)


def _setup(loss_name, seed=0, c=C):
  rng = np.random.default_rng(seed)
  params = {"w1": rng.normal(size=(D_IN, HIDDEN)) / 2, "b1": 0.1 * rng.normal(size=HIDDEN),
            "w2": rng.normal(size=(HIDDEN, c)) / 2, "b2": 0.1 * rng.normal(size=c)}
  params = jax.tree_util.tree_map(jnp.asarray, params)
  x = jnp.asarray(rng.normal(size=(N, D_IN)))
  if loss_name == "softmax_cross_entropy":
    y = jnp.asarray(rng.integers(0, c, N))
  elif loss_name == "sigmoid_binary_cross_entropy":
    y = jnp.asarray((rng.random((N, c)) < 0.5).astype(float))
  else:
    y = jnp.asarray(rng.normal(size=(N, c)))
  return params, (x, y)


_LOSSES = {
    "softmax_cross_entropy": curvax.losses.softmax_cross_entropy,
    "sigmoid_binary_cross_entropy": curvax.losses.sigmoid_binary_cross_entropy,
    "mean_squared_error": curvax.losses.mean_squared_error,
}


def _pure_loss(loss_name, f, y):
  """Per-example losses of the spec's conventions in jax.numpy, no curvax:
  ``-log softmax(f)_y``; ``sum_j softplus(f_j) - y_j f_j``; ``0.5 ||f - y||^2``
  (curvax's documented MSE form, ``C/2`` times the thesis's ``(1/C)||y - f||^2``)."""
  if loss_name == "softmax_cross_entropy":
    return -jnp.take_along_axis(jax.nn.log_softmax(f), y[:, None], axis=-1)[:, 0]
  if loss_name == "sigmoid_binary_cross_entropy":
    return jnp.sum(jax.nn.softplus(f) - y * f, -1)
  return 0.5 * jnp.sum((f - y) ** 2, -1)


def _flat(tree):
  return np.asarray(ravel_pytree(tree)[0])


def _rows(tree):
  return np.asarray(jax.vmap(lambda t: ravel_pytree(t)[0])(tree))


def _dense(matvec, params):
  """The matrix of ``matvec`` (traceable: usable inside ``jit``)."""
  flat_p, unravel = ravel_pytree(params)
  return jax.vmap(lambda e: ravel_pytree(matvec(unravel(e)))[0])(jnp.eye(flat_p.size))


@functools.partial(jax.jit, static_argnums=(0, 1))
def _grads_at(apply_fn, loss_name, params, xs, labels):
  """(L, P): gradients of the pure-jnp loss of example ``xs[l]`` at label ``labels[l]``."""
  flat_p, unravel = ravel_pytree(params)

  def one(x, label):
    return jax.grad(lambda w: _pure_loss(loss_name, apply_fn(unravel(w), x[None]),
                                         label[None])[0])(flat_p)
  return jax.vmap(one)(xs, labels)


def _sampled_labels(loss_name, s, outputs):
  """Labels ``y~`` (N, M, ...) with ``sqrt(M) s[..., m] = +-grad_f l(f, y~_m)``, checked exactly."""
  m = s.shape[-1]
  if loss_name == "softmax_cross_entropy":
    onehot = np.asarray(s) * np.sqrt(m) + np.asarray(jax.nn.softmax(outputs))[:, :, None]
    np.testing.assert_allclose(onehot, np.round(onehot), atol=1e-12)
    np.testing.assert_allclose(onehot.sum(1), 1.0, atol=1e-12)
    assert onehot.min() == pytest.approx(0.0, abs=1e-12)
    return np.argmax(onehot, 1)  # (N, M)
  bern = np.asarray(jax.nn.sigmoid(outputs))[:, :, None] - np.asarray(s) * np.sqrt(m)
  np.testing.assert_allclose(bern, np.round(bern), atol=1e-12)
  assert set(np.unique(np.round(bern))) <= {0.0, 1.0}
  return np.moveaxis(np.round(bern), -1, 1)  # (N, M, C)


@pytest.mark.parametrize("loss_name", ["softmax_cross_entropy", "sigmoid_binary_cross_entropy"])
def test_mc_factor_columns_are_gradients_at_labels_drawn_from_the_model(loss_name):
  """Spec §2.2: "MC factors are exactly gradients of the loss at sampled labels",
  ``s = onehot(c) - p`` with ``c ~ Cat(p)`` (Eq. 5.9; BCE: ``s - y~``,
  ``y~ ~ Bernoulli(s)``), scaled by ``1/sqrt(M)``. Each column, times
  ``sqrt(M)``, is such a gradient (exactly), and the labels' frequencies match
  the model's probabilities within 5 standard errors. Catches a factor with the
  right covariance but another distribution (e.g. ``S eps`` with Gaussian eps),
  a missing or doubled ``1/sqrt(M)``, labels drawn from the targets or uniformly."""
  params, (x, y) = _setup(loss_name)
  loss = _LOSSES[loss_name]
  outputs = _mlp(params, x)
  m = 4000
  s = jax.jit(loss.sqrt_hessian_sampled, static_argnums=3)(jax.random.PRNGKey(0), outputs, y, m)
  assert s.shape == outputs.shape + (m,)
  labels = _sampled_labels(loss_name, s, outputs)
  if loss_name == "softmax_cross_entropy":
    probs = np.asarray(jax.nn.softmax(outputs))
    freq = np.stack([np.mean(labels == c, axis=1) for c in range(C)], axis=1)  # (N, C)
  else:
    probs = np.asarray(jax.nn.sigmoid(outputs))
    freq = labels.mean(1)
  stderr = np.sqrt(probs * (1 - probs) / m)
  assert np.all(np.abs(freq - probs) <= 5 * stderr), np.max(np.abs(freq - probs) / stderr)
  assert np.max(np.abs(freq - probs)) > 0  # really sampled


@pytest.mark.parametrize("num_samples", [None, 3])
@pytest.mark.parametrize("loss_name", ["softmax_cross_entropy", "sigmoid_binary_cross_entropy"])
def test_mc_ggn_quantities_are_mean_squares_of_sampled_gradients(loss_name, num_samples):
  """DiagGGNMC (Eqs. B.13-B.15, default M = 1, spec §1.3), the Monte-Carlo ViViT
  factor (Eq. 7.3: ``V = [g~_{n,m}] / sqrt(N M)``) and its eigenpairs, against
  the gradients ``g~_{n,m}`` of the pure-jnp loss at the drawn labels: sample by
  sample, not only in expectation. Catches ``1/N^2`` or ``1/N`` dropped, ``1/M``
  dropped or doubled, a default other than one sample, per-example curvatures
  not ``(1/M) sum_m (e' g~_{n,m})^2``."""
  params, (x, y) = _setup(loss_name, seed=1)
  loss = _LOSSES[loss_name]
  key = jax.random.PRNGKey(5)
  m = 1 if num_samples is None else num_samples
  k = 4
  kwargs = {} if num_samples is None else {"num_samples": num_samples}

  @jax.jit
  def run(params, batch):
    outputs = _mlp(params, batch[0])
    s = loss.sqrt_hessian_sampled(key, outputs, batch[1], m)
    diag = diagonals.diag_ggn_mc(_mlp, loss, params, batch, key, method="vmap", chunk_size=2,
                                 **kwargs)
    v = eigen.ggn_factor(_mlp, loss, params, batch, key=key, chunk_size=2, **kwargs)
    res = eigen.ggn_eigenpairs(_mlp, loss, params, batch, k, key=key, **kwargs)
    return outputs, s, diag, v, res

  outputs, s, diag, v, res = run(params, (x, y))
  labels = _sampled_labels(loss_name, s, outputs)
  xs = jnp.repeat(x, m, axis=0)  # example n's M draws are rows n M .. n M + M - 1
  g = np.asarray(_grads_at(_mlp, loss_name, params, xs,
                           jnp.asarray(labels.reshape((N * m,) + labels.shape[2:]))))
  g = g.reshape(N, m, -1)  # (N, M, P)
  np.testing.assert_allclose(_flat(diag), np.sum(g ** 2, (0, 1)) / (N * m), rtol=1e-10,
                             atol=1e-14)
  cols = _rows(jax.tree_util.tree_map(lambda a: a.reshape((-1,) + a.shape[2:]), v))
  ref = g.reshape(N * m, -1) / np.sqrt(N * m)
  sign = np.sign(np.sum(cols * ref, axis=1, keepdims=True))  # CE's root is -gradient
  np.testing.assert_allclose(cols, sign * ref, rtol=1e-10, atol=1e-14)
  fisher = ref.T @ ref
  lam, vec = np.linalg.eigh(fisher)
  np.testing.assert_allclose(res.eigenvalues, lam[::-1][:k], rtol=1e-9, atol=1e-13)
  e = _rows(res.eigenvectors)
  np.testing.assert_allclose(e @ fisher, res.eigenvalues[:, None] * e, atol=1e-10)
  per = np.mean(np.einsum("kp,nmp->nmk", e, g) ** 2, axis=1)  # (N, k)
  np.testing.assert_allclose(res.per_example_curvatures, per, rtol=1e-8, atol=1e-12)


def _label_distribution(loss_name, f):
  """All labels with their model probabilities for one example (Eq. 3.26)."""
  if loss_name == "softmax_cross_entropy":
    return jnp.arange(f.shape[-1]), jax.nn.softmax(f)
  s = jax.nn.sigmoid(f)
  labels = jnp.asarray(list(itertools.product([0.0, 1.0], repeat=f.shape[-1])))
  return labels, jnp.prod(jnp.where(labels == 1, s, 1 - s), axis=-1)


@pytest.mark.parametrize("loss_name", list(_LOSSES))
def test_ggn_is_the_fisher_of_the_models_predictive_distribution(loss_name):
  """Eqs. 3.26-3.28: ``F = (1/N) sum_n E_{y ~ q(.|f_n)}[g_n(y) g_n(y)']`` equals
  the GGN for CE and BCE (labels enumerated; pure-jnp gradients) and for the
  squared error with ``y ~ N(f, I)`` (closed form ``(1/N) sum J_n'J_n``, curvax's
  ``0.5 ||f - y||^2``; the thesis's ``(1/C)||y - f||^2`` would give ``2/C`` of
  it, spec §2.2). ``ggn_matvec`` and ``diag_ggn`` against it. Catches a wrong
  reduction (sum or ``1/N^2``), a wrong output Hessian, an MSE scaled by 2 or
  ``1/C``."""
  params, (x, y) = _setup(loss_name, seed=2)
  loss = _LOSSES[loss_name]

  @jax.jit
  def run(params, batch):
    g = _dense(curvax.curvature.ggn_matvec(_mlp, loss, params, batch), params)
    return g, diagonals.diag_ggn(_mlp, loss, params, batch, method="vmap")

  ggn, diag = run(params, (x, y))
  if loss_name == "mean_squared_error":
    flat_p, unravel = ravel_pytree(params)
    jac = np.asarray(jax.jacfwd(lambda w: _mlp(unravel(w), x))(flat_p))  # (N, C, P)
    fisher = np.einsum("ncp,ncq->pq", jac, jac) / N
  else:
    labels, probs = jax.vmap(lambda f: _label_distribution(loss_name, f))(_mlp(params, x))
    num = labels.shape[1]  # (N, L, ...) all labels of each example, (N, L) their probabilities
    g = np.asarray(_grads_at(_mlp, loss_name, params, jnp.repeat(x, num, axis=0),
                             labels.reshape((N * num,) + labels.shape[2:])))
    fisher = np.einsum("l,lp,lq->pq", np.asarray(probs).reshape(-1), g, g) / N
  np.testing.assert_allclose(ggn, fisher, rtol=1e-9, atol=1e-12)
  np.testing.assert_allclose(_flat(diag), np.diag(fisher), rtol=1e-9, atol=1e-12)


@pytest.mark.parametrize("loss_name", list(_LOSSES))
def test_ggn_is_the_hessian_of_the_linearised_models_loss(loss_name):
  """Eq. 3.16: ``G`` is the Hessian at ``theta`` of ``theta' -> (1/N) sum_n
  l(f_n + J_n (theta' - theta), y_n)`` (pure-jnp loss, dense Jacobian). Catches
  any error in the JVP / output-Hessian / VJP chain or its 1/N."""
  params, (x, y) = _setup(loss_name, seed=3)
  flat_p, unravel = ravel_pytree(params)

  @jax.jit
  def run(params, batch):
    ggn = _dense(curvax.curvature.ggn_matvec(_mlp, _LOSSES[loss_name], params, batch), params)
    f0 = _mlp(params, batch[0])
    jac = jax.jacfwd(lambda w: _mlp(unravel(w), batch[0]))(flat_p)
    lin = lambda w: jnp.mean(_pure_loss(loss_name, f0 + jnp.einsum("ncp,p->nc", jac, w - flat_p),
                                        batch[1]))
    return ggn, jax.hessian(lin)(flat_p)

  ggn, expected = run(params, (x, y))
  np.testing.assert_allclose(ggn, expected, rtol=1e-9, atol=1e-12)


@pytest.mark.parametrize("loss_name", ["softmax_cross_entropy", "mean_squared_error"])
def test_layer_blocks_of_a_relu_networks_hessian_equal_its_ggn(loss_name):
  """Spec §2.1 (thesis §4.3.1): with piecewise-linear activations each layer's
  Hessian block equals its GGN block (the off-diagonal blocks differ: the model
  is bilinear across layers). ``hessian_matvec`` on the pure-jnp objective,
  ``ggn_matvec`` from curvax."""
  params, (x, y) = _setup(loss_name, seed=4)
  flat_p, unravel = ravel_pytree(params)

  @jax.jit
  def run(params, batch):
    ggn = _dense(curvax.curvature.ggn_matvec(_relu_mlp, _LOSSES[loss_name], params, batch),
                 params)
    obj = lambda p, b: jnp.mean(_pure_loss(loss_name, _relu_mlp(p, b[0]), b[1]))
    return ggn, _dense(curvax.curvature.hessian_matvec(obj, params, batch), params)

  ggn, hess = run(params, (x, y))
  layer = _flat({"w1": jnp.ones((D_IN, HIDDEN)), "b1": jnp.ones(HIDDEN),
                 "w2": jnp.zeros((HIDDEN, C)), "b2": jnp.zeros(C)}).astype(bool)
  for block in (layer, ~layer):
    np.testing.assert_allclose(ggn[np.ix_(block, block)], hess[np.ix_(block, block)],
                               rtol=1e-9, atol=1e-12)
  assert np.max(np.abs(ggn[np.ix_(layer, ~layer)] - hess[np.ix_(layer, ~layer)])) > 1e-3


def test_products_reuse_one_linearisation():
  """Spec §2.3: the model (and, for the Hessian, the gradient program) is
  linearised once; further products run no forward pass. Counts Python calls
  of ``apply_fn`` (eager: each evaluation traces it) over three products of each
  kind, and checks `linearize_model`'s ``jvp``/``vjp`` against the dense
  Jacobian. Catches a matvec that calls ``jax.jvp``/``jax.vjp`` of the model
  per product."""
  params, (x, y) = _setup("softmax_cross_entropy", seed=5)
  loss = curvax.losses.softmax_cross_entropy
  calls = []

  def counted(p, inputs):
    calls.append(1)
    return _mlp(p, inputs)

  v = jax.tree_util.tree_map(jnp.ones_like, params)
  for make in (lambda: curvax.curvature.ggn_matvec(counted, loss, params, (x, y)),
               lambda: curvax.curvature.fisher_matvec(counted, loss, params, (x, y)),
               lambda: curvax.curvature.hessian_matvec(
                   curvax.losses.objective(counted, loss), params, (x, y))):
    del calls[:]
    matvec = make()
    assert len(calls) == 1
    for _ in range(3):
      matvec(v)
    assert len(calls) == 1

  lin = curvax.curvature.linearize_model(_mlp, params, x)
  flat_p, unravel = ravel_pytree(params)
  jac = np.asarray(jax.jacfwd(lambda w: _mlp(unravel(w), x))(flat_p))  # (N, C, P)
  np.testing.assert_allclose(lin.outputs, _mlp(params, x), rtol=1e-12)
  np.testing.assert_allclose(lin.jvp(v), jac @ _flat(v), rtol=1e-10, atol=1e-12)
  u = np.random.default_rng(0).normal(size=(N, C))
  np.testing.assert_allclose(_flat(lin.vjp(jnp.asarray(u))), np.einsum("ncp,nc->p", jac, u),
                             rtol=1e-10, atol=1e-12)
