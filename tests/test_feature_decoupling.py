"""FeatureDecoupling: each loss term against a hand computation (rotation cross-entropy with
and without the PU weights, the irrelevance MSE to the detached mean, InstDisc's NCE of the
four copies' mean), the bank written at the batch indices, the presets (exact resume: test_contract.py)."""
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from helpers import load_config, tiny_convnet_config
from mim_jax import methods, models, train
from mim_jax.methods import feature_decoupling as fd

TINY = {"feature_decoupling.fc_dim": 16, "feature_decoupling.low_dim": 8,
        "feature_decoupling.nce_k": 16}


def tiny_config(preset="", **overrides):
  return tiny_convnet_config("feature_decoupling", preset, **{**TINY, **overrides})


def log_softmax(x):
  x = x - x.max(1, keepdims=True)
  return x - np.log(np.exp(x).sum(1, keepdims=True))


def test_irrelevance_loss_is_the_mse_to_the_detached_mean():
  f = np.random.default_rng(0).normal(size=(8, 3))
  mean = f.reshape(2, 4, 3).mean(1)
  np.testing.assert_allclose(np.asarray(fd.instance_mean(jnp.asarray(f))), mean, rtol=1e-6)
  want = np.mean((f - np.repeat(mean, 4, 0)) ** 2)
  np.testing.assert_allclose(float(fd.irrelevance_loss(jnp.asarray(f))), want, rtol=1e-6)
  grad = np.asarray(jax.grad(fd.irrelevance_loss)(jnp.asarray(f)))
  np.testing.assert_allclose(grad, 2 * (f - np.repeat(mean, 4, 0)) / f.size, rtol=1e-5, atol=1e-7)
  rot, inv = fd.split_features(jnp.asarray(f[:, :2].repeat(2, 1)))
  assert rot.shape == inv.shape == (8, 2)


def test_pu_weights_and_their_rows():
  prob = np.array([0.9, 0.5, 0.1, 1.0, 0.2, 0.3, 0.4, 0.0])
  np.testing.assert_allclose(fd.pu_weights(prob, 2.0), [1, 0.75, 0.99, 0, 1, 0.91, 0.84, 1], rtol=1e-6)
  np.testing.assert_array_equal(np.asarray(fd.copy_indices(jnp.asarray([3, 0]))),
                                [12, 13, 14, 15, 0, 1, 2, 3])


@pytest.fixture(scope="module")
def setup():
  c = tiny_config()
  m = methods.get(c)
  rng = jax.random.PRNGKey(0)
  variables = m.init_variables(rng, jnp.zeros((2, 16, 16, 3)))
  params, state = variables["params"], m.initial_state(variables)
  imgs = np.asarray(jax.random.normal(jax.random.PRNGKey(1), (2, 16, 16, 3)))
  return m, params, state, imgs


def hand_terms(m, params, state, imgs, index, weights=None):
  """(L_cls, L_mse, L_nce given the noise indices, v) from the numpy rotations."""
  x4 = np.stack([np.rot90(im, r) for im in imgs for r in range(4)])
  out, _ = models.forward(m.encoder, m.variables(params, state), jnp.asarray(x4), train=True,
                          pooling="mean")
  feat, _ = m.fc.apply(m.variables(params, state, "fc"), out["tokens"].reshape(8, -1),
                       train=True, mutable=["batch_stats"])
  feat = np.asarray(feat, np.float64)
  rot, inv = feat[:, :8], feat[:, 8:]
  logits = rot @ np.asarray(params["classifier"]["kernel"]) + np.asarray(params["classifier"]["bias"])
  ce = -log_softmax(logits)[np.arange(8), np.tile(np.arange(4), 2)]
  cls = (ce * (1.0 if weights is None else weights)).sum() / 8
  mean = inv.reshape(2, 4, -1).mean(1)
  mse = np.mean((inv - np.repeat(mean, 4, 0)) ** 2)
  v = mean @ np.asarray(params["norm"]["kernel"]) + np.asarray(params["norm"]["bias"])
  v /= np.linalg.norm(v, axis=1, keepdims=True)
  return cls, mse, v


def test_each_loss_term_by_hand(setup):
  m, params, state, imgs = setup
  index = np.array([5, 17])
  rng = jax.random.PRNGKey(3)
  loss, aux = m.loss(params, state, jnp.asarray(imgs), rng, jnp.int32(0), index=jnp.asarray(index))
  cls, mse, v = hand_terms(m, params, state, imgs, index)
  np.testing.assert_allclose(float(aux["loss_cls"]), cls, rtol=1e-4)
  np.testing.assert_allclose(float(aux["loss_mse"]), mse, rtol=1e-4, atol=1e-8)
  np.testing.assert_allclose(np.asarray(aux["state_append"]["v"]), v, rtol=1e-4, atol=1e-6)
  np.testing.assert_array_equal(np.asarray(aux["state_append"]["index"]), index)
  # NCE with the noise the loss draws (column 0 the image's own index), Z from this batch.
  k, n = 16, m.n_data
  idx = np.array(jax.random.randint(jax.random.fold_in(rng, 7), (2, k + 1), 0, n))
  idx[:, 0] = index
  bank = np.asarray(state["bank"], np.float64)
  p = np.exp(np.einsum("bkd,bd->bk", bank[idx], v) / 0.07)
  z = p.mean() * n
  p /= z
  nce = -(np.log(p[:, 0] / (p[:, 0] + k / n + 1e-7)).sum()
          + np.log((k / n) / (p[:, 1:] + k / n + 1e-7)).sum()) / 2
  np.testing.assert_allclose(float(aux["nce_z"]), z, rtol=1e-4)
  np.testing.assert_allclose(float(aux["loss_nce"]), nce, rtol=1e-4)
  np.testing.assert_allclose(float(loss), cls + mse + nce, rtol=1e-4)
  assert set(aux["collections"]["batch_stats"]) == {"encoder", "fc"}


def test_pu_weights_apply_from_their_epoch(setup):
  m, params, state, imgs = setup
  table = np.random.default_rng(4).uniform(0.2, 1.0, size=4 * m.n_data).astype(np.float32)
  st = {**state, "pu_weight": jnp.asarray(table)}
  index = np.array([2, 9])
  start = int(round(m.config.feature_decoupling.pu_start_epoch * m.run_steps()[0]))
  w = table[fd.copy_indices(jnp.asarray(index))]
  cls_w, _, _ = hand_terms(m, params, st, imgs, index, weights=w)
  cls, _, _ = hand_terms(m, params, st, imgs, index)
  for step, want in ((start - 1, cls), (start, cls_w)):
    _, aux = m.loss(params, st, jnp.asarray(imgs), jax.random.PRNGKey(0), jnp.int32(step),
                    index=jnp.asarray(index))
    np.testing.assert_allclose(float(aux["loss_cls"]), want, rtol=1e-4)


def test_pu_probabilities_file_becomes_the_weight_table(tmp_path, setup):
  m = setup[0]
  prob = np.linspace(0, 1, 4 * m.n_data)
  path = tmp_path / "prob.dat"
  path.write_text("\n".join(f"{p:.6f}" for p in prob) + "\n")
  c = tiny_config(**{"feature_decoupling.pu_prob_path": str(path)})
  ext = methods.get(c).external_state()
  np.testing.assert_allclose(ext["pu_weight"], fd.pu_weights(np.round(prob, 6), 2.0), rtol=1e-6)
  path.write_text("0.5\n")
  with pytest.raises(ValueError, match="4 per training image"):
    methods.get(c).external_state()


def test_bank_is_written_at_the_dataset_indices_and_z_is_fixed():
  tr = train.Trainer.create(tiny_config(), devices=jax.devices()[:1])
  bank0 = np.asarray(tr.state["method_state"]["bank"])
  batch = tr.next_batch()
  tr.state, metrics = tr.step_fn(tr.state, batch)
  idx = np.asarray(batch["index"])
  bank1 = np.asarray(tr.state["method_state"]["bank"])
  others = np.setdiff1d(np.arange(len(bank0)), idx)
  np.testing.assert_array_equal(bank1[others], bank0[others])
  assert not np.allclose(bank1[idx], bank0[idx])
  np.testing.assert_allclose(np.linalg.norm(bank1[idx], axis=1), 1.0, rtol=1e-5)
  z1 = float(tr.state["method_state"]["z"])
  assert z1 > 0 and z1 == float(metrics["aux/nce_z"])


@pytest.mark.parametrize("preset", ["", "cifar10", "imagenet"])
def test_presets_build(preset):
  c = load_config("feature_decoupling", preset)
  methods.get(c)
  fdc = c.feature_decoupling
  assert (fdc.nce_k, fdc.nce_t, fdc.nce_m, fdc.low_dim, fdc.gamma) == (4096, 0.07, 0.5, 128, 2.0)
  assert c.model.name == "alexnet" and c.optim.nesterov and c.optim.weight_decay == 5e-4
  assert c.optim.base_lr * c.input.batch_size / c.optim.lr_batch_divisor == 0.01
  if preset == "imagenet":
    assert fdc.fc_dim == 4096 and c.optim.schedule == "table"
    assert c.optim.lr_table == ((90, 0.01), (130, 1e-3), (190, 1e-4), (210, 1e-5), (230, 1e-4),
                                (245, 1e-5))
    assert c.total_epochs == 245 and fdc.pu_start_epoch == 210
