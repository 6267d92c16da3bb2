"""RotNet: the four rotations of every image (np.rot90 and the official rotate_img), the loss
against a hand cross-entropy, the official heads, the CIFAR crop, the presets (exact resume: test_contract.py)."""
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from helpers import load_config, tiny_convnet_config
from mim_jax import methods, models
from mim_jax.methods import rotation
from mim_jax.models import convnet


def tiny_config(preset="", **overrides):
  return tiny_convnet_config("rotation", preset, **overrides)


def official_rotate(img, rot):
  """dataloader.py's rotate_img on an HWC array."""
  if rot == 0:
    return img
  if rot == 90:
    return np.flipud(np.transpose(img, (1, 0, 2)))
  if rot == 180:
    return np.fliplr(np.flipud(img))
  return np.transpose(np.flipud(img), (1, 0, 2))


def test_every_image_in_its_four_rotations_with_their_labels():
  imgs = np.random.default_rng(0).normal(size=(3, 5, 5, 2)).astype(np.float32)
  got = np.asarray(rotation.rotate_all(jnp.asarray(imgs)))
  assert got.shape == (12, 5, 5, 2)
  for b in range(3):
    for r in range(4):
      np.testing.assert_array_equal(got[4 * b + r], np.rot90(imgs[b], r))
      np.testing.assert_array_equal(got[4 * b + r], official_rotate(imgs[b], 90 * r))
  np.testing.assert_array_equal(np.asarray(rotation.rotation_labels(3)), [0, 1, 2, 3] * 3)
  with pytest.raises(ValueError, match="square"):
    rotation.rotate_all(jnp.zeros((1, 4, 5, 3)))


def test_loss_is_the_cross_entropy_of_the_rotated_batch():
  c = tiny_config()
  m = methods.get(c)
  rng = jax.random.PRNGKey(0)
  variables = m.init_variables(rng, jnp.zeros((2, 16, 16, 3)))
  params, state = variables["params"], m.initial_state(variables)
  assert set(params["head"]) == {"classifier"} and params["head"]["classifier"]["kernel"].shape == (24, 4)
  imgs = np.asarray(jax.random.normal(jax.random.PRNGKey(1), (2, 16, 16, 3)))
  loss, aux = m.loss(params, state, jnp.asarray(imgs), rng, jnp.int32(0))
  # By hand: the numpy rotations, the encoder in training mode, global pool, Linear.
  x4 = np.stack([np.rot90(im, r) for im in imgs for r in range(4)])
  out, _ = models.forward(m.encoder, m.variables(params, state), jnp.asarray(x4), train=True,
                          pooling="mean")
  w, bias = (np.asarray(params["head"]["classifier"][k], np.float64) for k in ("kernel", "bias"))
  logits = np.asarray(out["pooled"], np.float64) @ w + bias
  labels = np.tile(np.arange(4), 2)
  logp = logits - np.log(np.exp(logits).sum(1, keepdims=True))
  want = -logp[np.arange(8), labels].mean()
  np.testing.assert_allclose(float(loss), want, rtol=1e-5)
  np.testing.assert_allclose(float(aux["accuracy"]), np.mean(logits.argmax(1) == labels))
  assert set(aux["collections"]["batch_stats"]) == {"encoder"}


def test_weighted_cross_entropy_by_hand():
  logits = np.random.default_rng(2).normal(size=(4, 4))
  labels, w = np.array([0, 1, 2, 3]), np.array([1.0, 0.5, 0.0, 2.0])
  ce = -(logits - np.log(np.exp(logits).sum(1, keepdims=True)))[np.arange(4), labels]
  got = rotation.rotation_loss(jnp.asarray(logits), jnp.asarray(labels), jnp.asarray(w))
  np.testing.assert_allclose(float(got), (w * ce).sum() / 4, rtol=1e-5)


def test_alexnet_head_is_the_official_fc_block_with_its_batch_stats():
  c = load_config("rotation", "imagenet")
  m = methods.get(c)
  shapes = jax.eval_shape(m.init_variables, jax.random.PRNGKey(0), jnp.zeros((2, 224, 224, 3)))
  head = shapes["params"]["head"]
  assert head["fc_block"]["fc6"]["kernel"].shape == (256 * 6 * 6, 4096)
  assert "bias" not in head["fc_block"]["fc6"] and "bias" not in head["fc_block"]["fc7"]
  assert head["fc_block"]["fc7"]["kernel"].shape == (4096, 4096)
  assert head["classifier"]["kernel"].shape == (4096, 4) and head["classifier"]["bias"].shape == (4,)
  assert set(shapes["batch_stats"]["head"]["fc_block"]) == {"bn6", "bn7"}


def test_alexnet_head_trains_and_returns_its_batch_stats():
  c = tiny_config(**{"rotation.fc_dim": 16})
  c.model = convnet.default_config("alexnet", stem="cifar", width=0.125)
  m = methods.get(c)
  variables = m.init_variables(jax.random.PRNGKey(0), jnp.zeros((2, 16, 16, 3)))
  state = m.initial_state(variables)
  loss, aux = m.loss(variables["params"], state, jnp.ones((2, 16, 16, 3)), jax.random.PRNGKey(1),
                     jnp.int32(0))
  assert np.isfinite(float(loss))
  bs = aux["collections"]["batch_stats"]
  assert set(bs) == {"encoder", "head"}
  before = state["collections"]["batch_stats"]["head"]["fc_block"]["bn6"]["running_mean"]
  assert not np.allclose(bs["head"]["fc_block"]["bn6"]["running_mean"], before)


def test_random_crop_with_padding_is_a_shifted_window():
  imgs = np.random.default_rng(3).uniform(1, 2, size=(6, 8, 8, 3)).astype(np.float32)
  got = np.asarray(rotation.random_crop_pad_flip(jax.random.PRNGKey(0), jnp.asarray(imgs), 4))
  padded = np.pad(imgs, ((0, 0), (4, 4), (4, 4), (0, 0)))
  for b in range(6):
    windows = [w for y in range(9) for x in range(9)
               for w in (padded[b, y:y + 8, x:x + 8], padded[b, y:y + 8, x:x + 8][:, ::-1])]
    assert any(np.array_equal(got[b], w) for w in windows)


@pytest.mark.parametrize("preset", ["", "cifar10", "imagenet"])
def test_presets_build(preset):
  c = load_config("rotation", preset)
  m = methods.get(c)
  assert c.optim.name == "sgd" and c.optim.nesterov and c.optim.weight_decay == 5e-4
  if preset == "imagenet":
    assert c.model.name == "alexnet" and m.fc and c.optim.milestones_epochs == (15, 30, 45)
    assert c.optim.base_lr * c.input.batch_size / c.optim.lr_batch_divisor == 0.01
  else:
    assert c.model.name == "nin" and c.model.num_stages == 4 and not m.fc
    assert c.optim.base_lr * c.input.batch_size / c.optim.lr_batch_divisor == 0.1
    assert c.optim.gamma == 0.2 and len(c.optim.milestones_epochs) == 3
    assert c.evals.layer_probe.enabled
