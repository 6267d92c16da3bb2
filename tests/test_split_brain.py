"""Split-brain autoencoder: the two halves at half width, each half's loss by hand, the
evaluators' features as the halves' concatenation, the presets (exact resume: test_contract.py)."""
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from helpers import (lab_setup, load_config, numpy_ab_soft_encoding, numpy_log_softmax,
                     tiny_convnet_config)
from mim_jax import methods
from mim_jax.methods import colorization, split_brain
from mim_jax.models import convnet
from mim_jax.targets import lab


def tiny_config(preset="", **overrides):
  return tiny_convnet_config("split_brain", preset, dict(fc_dim=16), **overrides)


@pytest.fixture(scope="module")
def setup():
  c = tiny_config()
  u8 = np.random.default_rng(0).integers(0, 256, (2, 16, 16, 3), dtype=np.uint8)
  m, x, params, state = lab_setup(c, u8, heads=("head_l", "head_ab"))
  return c, m, x, params, state


def test_halves_have_half_the_channels(setup):
  c, m, _, params, _ = setup
  full = convnet.from_config(c.model).channels
  assert m.encoder.channels == tuple(ch // 2 for ch in full)
  assert set(params) == {"encoder_l", "encoder_ab", "head_l", "head_ab"}
  assert params["encoder_l"]["conv5"]["conv"]["kernel"].shape[-1] == full[-1] // 2


def test_each_half_loss_by_hand(setup):
  c, m, x, params, state = setup
  loss, aux = jax.jit(m.loss)(params, state, x, jax.random.PRNGKey(1), 0)
  lab_img = np.asarray(lab.rgb_to_lab(colorization.unnormalize(x, c.input)))
  fwd = jax.jit(lambda p, s, y, half: m.half_logits(p, s, half, y, train=True)[0],
                static_argnums=3)
  logits_l = fwd(params, state, colorization.lightness_input(jnp.asarray(lab_img)), "encoder_l")
  logits_ab = fwd(params, state, split_brain.ab_input(jnp.asarray(lab_img)), "encoder_ab")
  h, w = logits_l.shape[1:3]
  s = 16 // h
  # L -> ab: soft-encoded ab (5 nearest of the 313 bins, sigma 5) at every s-th pixel
  soft, _ = numpy_ab_soft_encoding(lab_img[:, ::s, ::s, 1:])
  want_ab = -(soft * numpy_log_softmax(logits_l)).sum(-1).mean()
  # ab -> L: 100 unit bins of L, one-hot
  lightness = lab_img[:, ::s, ::s, 0]
  bins = np.clip(np.floor(lightness), 0, 99).astype(int)
  lp = numpy_log_softmax(logits_ab)
  want_l = -np.take_along_axis(lp, bins[..., None], -1).mean()
  np.testing.assert_allclose(float(aux["loss_l_to_ab"]), want_ab, rtol=1e-4)
  np.testing.assert_allclose(float(aux["loss_ab_to_l"]), want_l, rtol=1e-4)
  np.testing.assert_allclose(float(loss), want_ab + want_l, rtol=1e-4)


def test_features_are_the_concatenation_of_the_halves(setup):
  c, m, x, params, state = setup
  lab_img = lab.rgb_to_lab(colorization.unnormalize(x, c.input))
  xs = {"encoder_l": colorization.lightness_input(lab_img), "encoder_ab": split_brain.ab_input(lab_img)}
  vs = m.half_variables(params, state)
  halves = {h: m.outputs(vs[h], xs[h]) for h in split_brain.HALVES}
  feats = m.features(params, state, x)["online"]
  np.testing.assert_allclose(np.asarray(feats), np.concatenate(
      [np.asarray(halves[h]["pooled"]) for h in split_brain.HALVES], -1), rtol=1e-6)
  layers = m.layer_features(params, state, x, "mean")["online"]
  maps = {h: m.encoder.apply(vs[h], xs[h], mutable=["intermediates"])[1]["intermediates"]["layer_outputs"]
          for h in split_brain.HALVES}
  assert len(layers) == 6
  for i in range(5):
    both = jnp.concatenate([maps["encoder_l"][i], maps["encoder_ab"][i]], -1)
    np.testing.assert_allclose(np.asarray(layers[i]),
                               np.asarray(convnet.probe_features(both, m.encoder.probe_dims)), rtol=1e-6)
  np.testing.assert_allclose(np.asarray(layers[-1]), np.asarray(feats), rtol=1e-6)
  tokens = m.token_features(params, state, x)["online"]
  assert tokens.shape[-1] == 2 * m.encoder.num_features


@pytest.mark.parametrize("preset", ["", "cifar10", "imagenet"])
def test_presets_build(preset):
  c = load_config("split_brain", preset)
  m = methods.get(c)
  assert c.model.name == "alexnet" and not c.model.pool5 and m.l_bins == 100
  assert m.encoder.width == c.model.width / 2
