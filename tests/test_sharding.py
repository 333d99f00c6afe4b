"""Data parallelism: a 4-device mesh gives the single-device results.

tests/conftest.py asks XLA for 4 virtual CPU devices before JAX starts
(``--xla_force_host_platform_device_count=4``). Every product and transform is
run twice under ``jit`` -- once on one CPU device, once with the batch sharded
along a 4-device mesh and the parameters replicated (or sharded on a 2 x 2
mesh) -- and the results must agree to float64 round-off. The compiled HLO of
the sharded program must contain the cross-device reduction (``all-reduce``),
must not move the batch or activations between devices (``all-gather``,
``all-to-all``, ``collective-permute``), and must not leave the device (no host
callbacks, infeed/outfeed, send/recv).
"""

from __future__ import annotations

import re

import chex
import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P

import curvax
from curvax.solvers import bayesian_hessian
import reference as ref

NUM_DEVICES = 4
CPUS = jax.devices("cpu")
if len(CPUS) < NUM_DEVICES:
  raise RuntimeError(
      f"tests/test_sharding.py needs {NUM_DEVICES} CPU devices; got {len(CPUS)}. "
      "tests/conftest.py sets XLA_FLAGS=--xla_force_host_platform_device_count=4 "
      "before importing jax; an XLA_FLAGS that already names a smaller count overrides it.")
ONE = CPUS[0]
MESH = curvax.sharding.data_mesh(CPUS[:NUM_DEVICES])
N = 32   # divisible by the 4 devices, and by every chunk size used below

_HOST_OPS = re.compile(r"\b(infeed|outfeed|send|recv|send-done|recv-done)\(")
_CALLBACK = re.compile(r'custom_call_target="[^"]*callback[^"]*"', re.IGNORECASE)


def _hlo(fn, *args) -> str:
  return fn.lower(*args).compile().as_text()


def _run_compiled(fn, *args):
  """Runs ``fn`` through its ahead-of-time compilation: (outputs, HLO text), one compile."""
  compiled = fn.lower(*args).compile()
  return compiled(*args), compiled.as_text()


def _sharded_matches_one_device(fn, params, batch, v):
  """``fn(params, batch, v)`` with replicated params/v and the batch sharded over
  MESH equals the single-device result; returns (sharded outputs, HLO text)."""
  expected = fn(_on_one(params), _on_one(batch), _on_one(v))
  got, hlo = _run_compiled(fn, curvax.sharding.replicate(params, MESH),
                           curvax.sharding.shard_batch(batch, MESH),
                           curvax.sharding.replicate(v, MESH))
  _close(got, expected)
  return got, hlo


def _host_round_trips(hlo: str) -> list:
  return _HOST_OPS.findall(hlo) + _CALLBACK.findall(hlo)


# Collectives that move data between devices (the batch, activations): a
# data-parallel program with replicated parameters needs none of them, only
# all-reduces of its batch sums.
_DATA_MOVES = re.compile(r"\b(all-gather|all-to-all|collective-permute)(-start)?\(")


def _data_moves(hlo: str) -> list:
  return [m.group(1) for m in _DATA_MOVES.finditer(hlo)]


def _assert_data_parallel(hlo: str):
  assert "all-reduce" in hlo, "no cross-device reduction in the sharded program"
  moves = _data_moves(hlo)
  assert not moves, f"the sharded program moves data across devices: {sorted(set(moves))}"
  assert not _host_round_trips(hlo), _host_round_trips(hlo)


def _on_one(tree):
  return jax.device_put(tree, ONE)


def _close(a, b, rtol=1e-9, atol=1e-11):
  chex.assert_trees_all_close(a, b, rtol=rtol, atol=atol)


def _mlp_problem(seed=0, n=N):
  apply_fn, loss, params, batch = ref.problem("mlp", "softmax_cross_entropy", n=n, seed=seed)
  return apply_fn, loss, params, batch


# ---------------------------------------------------------------- helpers


def test_helpers_place_batch_and_params_and_reject_bad_sizes():
  assert MESH.shape == {"data": NUM_DEVICES}
  assert curvax.sharding.data_mesh(2).shape == {"data": 2}
  _, _, params, batch = _mlp_problem()
  sharded = curvax.sharding.shard_batch(batch, MESH)
  for leaf in sharded:
    assert leaf.sharding.spec == P("data")
    assert {s.data.shape[0] for s in leaf.addressable_shards} == {N // NUM_DEVICES}
  np.testing.assert_array_equal(sharded[0], batch[0])
  replicated = curvax.sharding.replicate(params, MESH)
  for leaf in jax.tree.leaves(replicated):
    assert leaf.sharding.spec == P() and len(leaf.addressable_shards) == NUM_DEVICES

  # Under jit the helpers constrain instead of moving data.
  hlo = _hlo(jax.jit(lambda b: jax.tree.map(
      jnp.sum, curvax.sharding.shard_batch(b, MESH))),
      jax.tree.map(lambda a: jax.ShapeDtypeStruct(a.shape, a.dtype), batch))
  assert "all-reduce" in hlo or "reduce-scatter" in hlo

  with pytest.raises(ValueError, match=r"batch size 30 is not divisible by the 4 devices"):
    curvax.sharding.shard_batch((batch[0][:30], batch[1][:30]), MESH)
  with pytest.raises(ValueError, match="different batch sizes"):
    curvax.sharding.shard_batch((batch[0], batch[1][:8]), MESH)
  with pytest.raises(ValueError, match="no axis named 'batch'"):
    curvax.sharding.shard_batch(batch, MESH, axis_name="batch")
  with pytest.raises(ValueError, match="xla_force_host_platform_device_count"):
    curvax.sharding.data_mesh(len(jax.devices()) + 1)


def test_hlo_check_detects_host_callbacks():
  """The round-trip check can fail: a debug callback in a sharded step is found."""
  _, _, params, batch = _mlp_problem()

  def f(b):
    s = jnp.sum(b[0])
    jax.debug.callback(lambda x: None, s)
    return s

  hlo = _hlo(jax.jit(f), curvax.sharding.shard_batch(batch, MESH))
  assert _host_round_trips(hlo)


# ---------------------------------------------------------------- curvature


def _curvature_quantities(apply_fn, loss, params, batch, v):
  loss_fn = curvax.losses.objective(apply_fn, loss)
  stats = curvax.curvature.per_example_statistics(
      apply_fn, loss, params, batch, direction=v, return_gradients=True, chunk_size=8)
  return {
      "ggn": curvax.curvature.ggn_matvec(apply_fn, loss, params, batch)(v),
      "hessian": curvax.curvature.hessian_matvec(loss_fn, params, batch)(v),
      "fisher": curvax.curvature.fisher_matvec(apply_fn, loss, params, batch)(v),
      "stats": stats,
      "stats_unchunked": curvax.curvature.per_example_statistics(
          apply_fn, loss, params, batch, chunk_size=None),
      "grads": curvax.curvature.per_example_gradients(apply_fn, loss, params, batch,
                                                      chunk_size=4),
      "diag_ggn": curvax.curvature.diag_ggn(apply_fn, loss, params, batch, chunk_size=8),
  }


def test_curvature_products_and_statistics_match_single_device():
  apply_fn, loss, params, batch = _mlp_problem()
  v = jax.tree.map(lambda p: jnp.cos(jnp.arange(p.size).reshape(p.shape)), params)
  fn = jax.jit(lambda p, b, v: _curvature_quantities(apply_fn, loss, p, b, v))
  got, hlo = _sharded_matches_one_device(fn, params, batch, v)
  # Means are replicated on every device; per-example outputs stay split by example.
  assert got["ggn"]["w1"].sharding.is_fully_replicated
  for per_example in (got["stats"].losses, got["stats"].gradient_norms,
                      got["stats"].directional.slopes, got["grads"]["w2"],
                      got["stats"].gradients["w1"]):
    assert per_example.sharding.spec[0] == "data", per_example.sharding
  _assert_data_parallel(hlo)


class _LinenMLP(nn.Module):
  @nn.compact
  def __call__(self, x):
    h = nn.tanh(nn.Dense(6, param_dtype=jnp.float64)(x))
    return nn.Dense(3, param_dtype=jnp.float64)(h)


def test_linen_fast_path_and_two_axis_mesh_with_sharded_params():
  """Per-layer contractions on a sharded batch; params split over a 'model' axis."""
  _, loss, _, batch = _mlp_problem()
  model = _LinenMLP()
  apply_fn, params = curvax.flax_utils.from_linen(model, model.init(jax.random.PRNGKey(3),
                                                                    batch[0]))
  v = jax.tree.map(lambda p: jnp.sin(jnp.arange(p.size).reshape(p.shape)), params)

  def quantities(p, b, v):
    stats = curvax.curvature.per_example_statistics(apply_fn, loss, p, b, method="layers")
    return stats, curvax.curvature.ggn_matvec(apply_fn, loss, p, b)(v)

  fn = jax.jit(quantities)
  _, hlo = _sharded_matches_one_device(fn, params, batch, v)
  _assert_data_parallel(hlo)
  expected = fn(_on_one(params), _on_one(batch), _on_one(v))

  # 2 x 2 mesh: batch over 'data', every even-width layer output dimension over 'model'.
  mesh2 = Mesh(np.asarray(CPUS[:NUM_DEVICES]).reshape(2, 2), ("data", "model"))

  def model_sharded(tree):
    def put(leaf):
      spec = P(*([None] * (leaf.ndim - 1) + ["model"])) if leaf.shape[-1] % 2 == 0 else P()
      return jax.device_put(leaf, NamedSharding(mesh2, spec))
    return jax.tree.map(put, tree)

  ps = model_sharded(params)
  assert ps["Dense_0"]["kernel"].sharding.spec == P(None, "model")
  got = fn(ps, curvax.sharding.shard_batch(batch, mesh2), model_sharded(v))
  _close(got, expected)


class _ConvPool(nn.Module):
  """PatchConv -> overlapping max_pool (3x3/2, as 3c3d) -> Dense, float64."""

  @nn.compact
  def __call__(self, x):
    h = jax.nn.relu(curvax.layers.PatchConv(3, (3, 3), param_dtype=jnp.float64)(x))
    h = curvax.layers.max_pool(h, (3, 3), (2, 2), "SAME")
    return nn.Dense(3, param_dtype=jnp.float64)(h.reshape(h.shape[0], -1))


def test_max_pool_derivatives_stay_on_each_examples_device():
  """`curvax.layers.max_pool` routes the tangent of overlapping windows in
  blocks of examples; on a sharded batch (8 examples per device) gradient,
  GGN- and Hessian-vector products move no activations between devices
  (contiguous halves of the batch did: all-to-all and collective-permute)."""
  _, loss, _, _ = _mlp_problem()
  x = jax.random.normal(jax.random.PRNGKey(4), (N, 8, 8, 2), jnp.float64)
  batch = (x, jnp.arange(N) % 3)
  model = _ConvPool()
  apply_fn, params = curvax.flax_utils.from_linen(model, model.init(jax.random.PRNGKey(5), x))
  loss_fn = curvax.losses.objective(apply_fn, loss)
  v = jax.tree.map(lambda p: jnp.cos(jnp.arange(p.size).reshape(p.shape)), params)

  def quantities(p, b, v):
    return {"grad": jax.grad(loss_fn)(p, b),
            "ggn": curvax.curvature.ggn_matvec(apply_fn, loss, p, b)(v),
            "hessian": curvax.curvature.hessian_matvec(loss_fn, p, b)(v)}

  fn = jax.jit(quantities)
  _, hlo = _sharded_matches_one_device(fn, params, batch, v)
  _assert_data_parallel(hlo)


# ---------------------------------------------------------------- transforms


def _transform(name, apply_fn, loss):
  loss_fn = curvax.losses.objective(apply_fn, loss)
  if name == "hessian_free":
    return curvax.transforms.hessian_free(apply_fn, loss, cg_max_iter=10)
  if name == "hessian_free_microbatched":
    return curvax.transforms.hessian_free(
        apply_fn, loss, curvature="hessian", cg_max_iter=10, microbatch_size=8,
        preconditioner="fisher")
  if name == "probabilistic_preconditioning":
    return curvax.transforms.probabilistic_preconditioning(
        loss_fn, prior_iterations=2, num_observations=2, rank=2)
  return curvax.transforms.curvature_step_size(
      optax.sgd(0.1, momentum=0.9), apply_fn, loss, debias=True)


@pytest.mark.parametrize("name", ["hessian_free", "hessian_free_microbatched",
                                  "probabilistic_preconditioning", "curvature_step_size"])
def test_transform_steps_match_single_device(name):
  apply_fn, loss, params, batch = _mlp_problem(0)
  _, _, _, eval_batch = _mlp_problem(1)
  loss_fn = curvax.losses.objective(apply_fn, loss)
  tx = _transform(name, apply_fn, loss)
  steps = 5   # probabilistic_preconditioning: prior, posterior and preconditioned steps

  @jax.jit
  def train(params, batch, eval_batch):
    def step(carry, _):
      p, s = carry
      g = jax.grad(loss_fn)(p, batch)
      u, s = tx.update(g, s, p, batch=batch, eval_batch=eval_batch)
      return (optax.apply_updates(p, u), s), None
    return jax.lax.scan(step, (params, tx.init(params)), None, length=steps)[0]

  expected = train(_on_one(params), _on_one(batch), _on_one(eval_batch))
  args = (curvax.sharding.replicate(params, MESH), curvax.sharding.shard_batch(batch, MESH),
          curvax.sharding.shard_batch(eval_batch, MESH))
  got, hlo = _run_compiled(train, *args)
  got_params, got_state = got
  exp_params, exp_state = expected
  _close(got_params, exp_params)
  for leaf in jax.tree.leaves(got_params):
    assert leaf.sharding.is_fully_replicated
  if name == "probabilistic_preconditioning":
    # Eigenvectors are defined up to sign and, within the degenerate 1/alpha
    # eigenspace of the estimate, up to rotation; compare the preconditioner's
    # action g -> g + U'((c - 1) * Ug) (one parameter group: alpha has one entry).
    def lowrank(state):
      return [jnp.stack(u).T @ ((bayesian_hessian.preconditioner_scales(s, state.alpha[0])
                                 - 1.0)[:, None] * jnp.stack(u))
              for s, u in zip(state.eigenvalues.unpack(), state.eigenvectors)]
    _close(lowrank(got_state), lowrank(exp_state))
    got_state = got_state._replace(eigenvectors=None)
    exp_state = exp_state._replace(eigenvectors=None)
    assert int(got_state.phase) == 2   # the preconditioner was applied
  _close(got_state, exp_state)
  if name.startswith("hessian_free"):
    # CG's scalars are global: same iteration count, same damping, same line search.
    assert int(got_state.cg_iterations) == int(exp_state.cg_iterations) > 0
  _assert_data_parallel(hlo)


# ---------------------------------------------------------------- runner


def test_runner_with_a_mesh_matches_one_device(tmp_path):
  import curvax.problems as problems  # pylint: disable=import-outside-toplevel
  from curvax.problems import __main__ as cli  # pylint: disable=import-outside-toplevel

  kwargs = dict(epochs=1, max_steps=3, log_every=1, verbose=False,
                hyperparams={"cg_max_iter": 10})
  single = problems.run("quadratic_deep", "hessian_free", **kwargs)
  multi = problems.run("quadratic_deep", "hessian_free", mesh=MESH, **kwargs)
  assert multi["status"] == single["status"] and len(multi["minibatch_train_losses"]) == 3
  for key in ("minibatch_train_losses", "train_losses", "test_losses"):
    np.testing.assert_allclose(multi[key], single[key], rtol=1e-5, err_msg=key)
  for key, values in single["optimizer_state"].items():
    np.testing.assert_allclose(multi["optimizer_state"][key], values, rtol=1e-4, atol=1e-6,
                               err_msg=key)
  _close(multi["params"], single["params"], rtol=1e-4, atol=1e-4)   # float32 problem
  assert jax.tree.leaves(multi["params"])[0].sharding.is_fully_replicated

  with pytest.raises(ValueError, match="eval_batch_size 50 is not divisible by the 4 devices"):
    problems.run("quadratic_deep", "sgd", mesh=MESH, eval_batch_size=50, verbose=False)
  assert cli.main(["run", "quadratic_deep", "--optimizer", "sgd", "--devices", "4",
                   "--max-steps", "2", "--epochs", "1", "--out", str(tmp_path), "--quiet"]) == 0


def test_data_mesh_takes_the_devices_asked_for_in_order():
  devices = jax.devices()
  mesh = curvax.sharding.data_mesh()   # default: every device, axis 'data'
  assert mesh.axis_names == ("data",)
  assert list(mesh.devices.flat) == devices
  for k in range(1, len(devices) + 1):   # an int k: the first k devices (all of them included)
    for count in (k, np.int64(k)):
      assert list(curvax.sharding.data_mesh(count).devices.flat) == devices[:k]
  picked = [CPUS[2], CPUS[1]]
  mesh = curvax.sharding.data_mesh(picked, axis_name="batch")
  assert mesh.shape == {"batch": 2} and list(mesh.devices.flat) == picked
  with pytest.raises(ValueError, match="asked for 0 devices"):
    curvax.sharding.data_mesh(0)
  with pytest.raises(ValueError, match="empty"):
    curvax.sharding.data_mesh([])
  with pytest.raises(TypeError, match="jax.Device objects.*got int 0"):
    curvax.sharding.data_mesh([0, 1])   # ids, not devices
  with pytest.raises(ValueError, match="more than once"):
    curvax.sharding.data_mesh([CPUS[1], CPUS[1]])
  for bad in ("cpu", 2.0, True):
    with pytest.raises(TypeError, match="jax.Device objects .* or an int k"):
      curvax.sharding.data_mesh(bad)
  with pytest.raises(ValueError, match="ask for at least 1"):
    curvax.sharding.data_mesh(-1)


def test_shard_batch_and_replicate_reject_bad_arguments():
  x = jnp.ones((8, 3))
  with pytest.raises(TypeError, match="Mesh"):
    curvax.sharding.shard_batch(x, "data")
  with pytest.raises(TypeError, match="Mesh"):
    curvax.sharding.replicate(x, None)
  with pytest.raises(ValueError, match="holds no arrays"):
    curvax.sharding.shard_batch((), MESH)
  with pytest.raises(ValueError, match="scalar"):
    curvax.sharding.shard_batch((x, jnp.ones(())), MESH)
  # Fewer examples than devices is not divisible either; the message names the
  # next multiple of the device count.
  for n, suggestion in ((2, 4), (6, 8), (30, 32)):
    with pytest.raises(ValueError, match=rf"batch size {n} is not divisible by the 4 devices"
                                         rf".*e\.g\. {suggestion}\)"):
      curvax.sharding.shard_batch(jnp.ones((n, 3)), MESH)


def test_helpers_under_jit_give_the_outputs_their_shardings():
  """Inside ``jit`` the helpers are sharding constraints: an (uncommitted,
  single-device) batch comes out split over the mesh, parameters replicated on
  every device."""
  batch = (jnp.arange(N * 3.0).reshape(N, 3), jnp.arange(N))
  params = {"w": jnp.ones((3, 2))}
  sharded, replicated = jax.jit(lambda b, p: (curvax.sharding.shard_batch(b, MESH),
                                              curvax.sharding.replicate(p, MESH)))(batch, params)
  for leaf, expected in zip(sharded, batch):
    assert leaf.sharding.is_equivalent_to(NamedSharding(MESH, P("data")), leaf.ndim)
    assert {s.data.shape[0] for s in leaf.addressable_shards} == {N // NUM_DEVICES}
    np.testing.assert_array_equal(leaf, expected)
  assert replicated["w"].sharding.is_fully_replicated
  assert len(replicated["w"].sharding.device_set) == NUM_DEVICES
