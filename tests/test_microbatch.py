"""Tests for curvax.solvers.microbatch: chunked batch means against numpy."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from curvax import solvers

N = 12


def _batch():
  rng = np.random.default_rng(0)
  inputs = {"a": jnp.asarray(rng.normal(size=(N, 3))), "b": jnp.asarray(rng.normal(size=(N,)))}
  targets = jnp.asarray(rng.normal(size=(N, 2)))
  return inputs, targets


def _stats(batch):
  """A batch mean with a pytree value: per-example features, averaged, plus a
  batch-independent constant (which the chunk mean must keep, not scale)."""
  inputs, targets = batch
  feats = jnp.sin(inputs["a"]) * inputs["b"][:, None]
  return {"mean": jnp.mean(feats, 0), "y": jnp.mean(targets ** 2), "const": jnp.asarray(7.0)}


def _numpy_stats(batch):
  inputs, targets = jax.tree.map(np.asarray, batch)
  return {"mean": np.mean(np.sin(inputs["a"]) * inputs["b"][:, None], 0),
          "y": np.mean(targets ** 2), "const": 7.0}


@pytest.mark.parametrize("size", [None, 1, 2, 3, 4, 6, N])
def test_microbatch_mean_equals_the_batch_mean(size):
  batch = _batch()
  seen = []

  def fn(chunk):
    seen.append(jnp.shape(chunk[1])[0])
    return _stats(chunk)

  got = jax.jit(lambda b: solvers.microbatch_mean(fn, b, size))(batch)
  want = _numpy_stats(batch)
  for key in want:
    np.testing.assert_allclose(got[key], want[key], rtol=1e-12, atol=1e-14)
  # Every call of fn sees one chunk of `size` examples (the whole batch for None).
  assert set(seen) == {N if size is None else size}


def test_microbatch_chunks_partition_the_batch():
  # A sum that is not a mean reveals which examples the chunks hold: each
  # example is visited exactly once (the result is (1/M) * the total sum).
  batch = (jnp.arange(N, dtype=jnp.float64), jnp.zeros(N))
  visits = solvers.microbatch_mean(
      lambda c: jnp.zeros(N).at[c[0].astype(int)].add(1.0), batch, 3)
  np.testing.assert_allclose(visits, np.full(N, 1.0 / (N // 3)))


def test_microbatched_value_and_grad_against_autodiff():
  batch = _batch()
  params = jnp.array([0.3, -0.2, 0.5])

  def loss_fn(p, b):
    (inputs, targets) = b
    pred = inputs["a"] @ p + inputs["b"]
    return jnp.mean((pred - targets[:, 0]) ** 2) + 0.1 * jnp.sum(p ** 2)

  value, grad = solvers.microbatched_value_and_grad(loss_fn, 4)(params, batch)
  a, b, y = (np.asarray(batch[0]["a"]), np.asarray(batch[0]["b"]),
             np.asarray(batch[1][:, 0]))
  r = a @ np.asarray(params) + b - y
  np.testing.assert_allclose(value, np.mean(r ** 2) + 0.1 * np.sum(np.asarray(params) ** 2),
                             rtol=1e-12)
  np.testing.assert_allclose(grad, 2 * a.T @ r / N + 0.2 * np.asarray(params), rtol=1e-12)


@pytest.mark.parametrize("size", [0, -4, -12, 5, 13, 1.5, 2.5])
def test_microbatch_size_must_be_a_positive_divisor(size):
  with pytest.raises(ValueError, match=r"positive divisor .* `eval_batch` \(12 examples\)"):
    solvers.microbatch_mean(_stats, _batch(), size, batch_name="eval_batch")
