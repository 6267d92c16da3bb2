"""What every joint-embedding method (je_helpers.JE_METHODS) must do on the one trainer (its
exact resume is tests/test_contract.py's, for every method): train on a ResNet with its
BatchNorm statistics, log the collapse monitor, take the same step on 8 devices as on one (one
method per kind of batch-wide quantity, SHARDED_CHECKS), keep
gradients out of its teacher, and flag a collapse on constant inputs."""
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from je_helpers import JE_METHODS, method_and_state, tiny_je_config
from mim_jax import train
from mim_jax.methods import joint_embedding as je


def run_steps(config, steps, devices):
  tr = train.Trainer.create(config, devices=devices)
  out = []
  for _ in range(steps):
    tr.state, m = tr.step_fn(tr.state, tr.next_batch())
    out.append(float(m["loss"]))
    for k in ("aux/collapse_std", "aux/collapse_ratio", "aux/collapsed"):
      assert k in m, sorted(m)
  return tr, out


# No method has per-device code (no shard_map, no collective by axis name): every batch-wide
# quantity is a reduction over the global batch inside one jit, so sharding cannot change a
# method's semantics, only XLA's partitioning of it. One method per kind of batch-wide
# quantity is checked: global negatives (SimCLR), a queue and grouped shuffle-BN (MoCo),
# multi-crop with a batch-mean centre (DINO). Barlow Twins' cross-correlation is a batch mean
# like SimCLR's similarity matrix and the BatchNorm statistics every method has.
SHARDED_CHECKS = ("simclr", "moco", "dino")


@pytest.mark.parametrize("method", SHARDED_CHECKS)
def test_eight_devices_take_the_one_device_step(method, compilation_cache):
  """Global-batch negatives, cross-correlations and BatchNorm statistics: the batch sharded
  over 8 devices gives the 1-device losses and parameters."""
  _, l1 = run_steps(tiny_je_config(method), 2, jax.devices()[:1])
  tr8, l8 = run_steps(tiny_je_config(method), 2, jax.devices()[:8])
  np.testing.assert_allclose(l8, l1, rtol=2e-5, atol=1e-6)


@pytest.mark.parametrize("method", JE_METHODS)
def test_no_gradient_reaches_the_teacher_and_constant_inputs_are_flagged(method):
  c = tiny_je_config(method)
  m, params, state, views = method_and_state(c)
  rng = jax.random.PRNGKey(3)
  fields = {"index": jnp.arange(8, dtype=jnp.int32)} if "index" in m.batch_fields else {}
  # Compiled once per method (eagerly, a ResNet's ops dispatch one by one: slower on CPU); the
  # constant views below reuse the compiled loss.
  loss = jax.jit(lambda s, v: m.loss(params, s, v, rng, jnp.int32(0), **fields))
  if "teacher" in state:
    g = jax.jit(jax.grad(lambda s: loss(s, views)[0], allow_int=True))(state)
    assert all(float(jnp.max(jnp.abs(x))) == 0.0 for x in jax.tree.leaves(g["teacher"]))
  _, aux = loss(state, views)
  assert float(aux["collapsed"]) == 0.0, aux["collapse_ratio"]
  const = jax.tree.map(jnp.zeros_like, views)
  _, aux = loss(state, const)
  assert float(aux["collapsed"]) == 1.0 and float(aux["collapse_std"]) < 1e-3, aux["collapse_std"]


def test_collapse_monitor_by_hand():
  z = jnp.asarray([[3.0, 4.0], [-4.0, 3.0], [0.0, -5.0]])
  u = np.asarray(z) / 5.0
  std = np.mean(np.std(u, axis=0))
  out = je.collapse_monitor(z)
  np.testing.assert_allclose(float(out["collapse_std"]), std, rtol=1e-6)
  np.testing.assert_allclose(float(out["collapse_ratio"]), std * np.sqrt(2), rtol=1e-6)
  assert float(out["collapsed"]) == 0.0
  assert float(je.collapse_monitor(jnp.ones((4, 8)))["collapsed"]) == 1.0


def test_mlp_batchnorm_kinds_are_torch_batchnorm1d():
  """'affine' = BatchNorm1d, 'scale' = TF's center=False, 'plain' = affine=False; the running
  statistics move by torch's momentum with the unbiased variance."""
  x = jax.random.normal(jax.random.PRNGKey(0), (6, 5))
  mlp = je.MLP(layers=((4, False, "affine"), (3, True, "scale"), (2, False, "plain")))
  v = mlp.init(jax.random.PRNGKey(1), x)
  assert sorted(v["params"]["bn0"]) == ["bias", "scale"]
  assert sorted(v["params"]["bn1"]) == ["scale"] and "bn2" not in v["params"]
  assert "bias" in v["params"]["fc1"] and "bias" not in v["params"]["fc0"]
  y, new = mlp.apply(v, x, train=True, mutable=["batch_stats"])
  p = jax.tree.map(np.asarray, v["params"])
  h = np.asarray(x) @ p["fc0"]["kernel"]
  mu, var = h.mean(0), h.var(0)
  h0 = (h - mu) / np.sqrt(var + 1e-5) * p["bn0"]["scale"] + p["bn0"]["bias"]
  np.testing.assert_allclose(new["batch_stats"]["bn0"]["running_var"],
                             0.9 + 0.1 * var * 6 / 5, rtol=1e-5)
  h = np.maximum(h0, 0) @ p["fc1"]["kernel"] + p["fc1"]["bias"]
  h = (h - h.mean(0)) / np.sqrt(h.var(0) + 1e-5) * p["bn1"]["scale"]
  h = np.maximum(h, 0) @ p["fc2"]["kernel"]
  h = (h - h.mean(0)) / np.sqrt(h.var(0) + 1e-5)
  np.testing.assert_allclose(np.asarray(y), h, rtol=1e-4, atol=1e-5)
