"""Colorization (Zhang et al. 2016): Lab against a NumPy re-derivation and skimage's published
values, the 313-bin gamut, soft-encoding, class rebalancing and the loss by hand, annealed
mean, the cached prior, exact resume, the presets."""
import os

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from helpers import (lab_setup, load_config, losses, numpy_ab_soft_encoding, numpy_log_softmax,
                     tiny_convnet_config)
from mim_jax import methods, train
from mim_jax.methods import colorization
from mim_jax.targets import ab_bins, lab


def tiny_config(preset="", **overrides):
  return tiny_convnet_config("colorization", preset, dict(fc_dim=16, prior_images=64), **overrides)


def numpy_lab(rgb):
  """sRGB [0, 1] -> Lab re-derived from the standard formulas (IEC 61966-2-1, CIE 1976), D65."""
  rgb = np.asarray(rgb, np.float64)
  lin = np.where(rgb <= 0.04045, rgb / 12.92, ((rgb + 0.055) / 1.055) ** 2.4)
  m = np.array([[0.412453, 0.357580, 0.180423], [0.212671, 0.715160, 0.072169],
                [0.019334, 0.119193, 0.950227]])
  xyz = lin @ m.T / np.array([0.95047, 1.0, 1.08883])
  eps, kappa = 0.008856, 7.787
  f = np.where(xyz > eps, xyz ** (1 / 3), kappa * xyz + 16 / 116)
  return np.stack([116 * f[..., 1] - 16, 500 * (f[..., 0] - f[..., 1]),
                   200 * (f[..., 1] - f[..., 2])], -1)


def test_lab_against_numpy_and_skimage_values():
  rng = np.random.default_rng(0)
  rgb = rng.uniform(size=(4, 5, 3)).astype(np.float32)
  rgb[0, :3] = [[0, 0, 0], [1, 1, 1], [0.02, 0.03, 0.01]]     # black, white, linear segment
  np.testing.assert_allclose(np.asarray(lab.rgb_to_lab(jnp.asarray(rgb))), numpy_lab(rgb),
                             atol=2e-3)
  # the sRGB primaries' D65 Lab values as usually tabulated (2 decimals)
  prim = np.asarray(lab.rgb_to_lab(jnp.eye(3)))
  np.testing.assert_allclose(prim, [[53.24, 80.09, 67.20], [87.73, -86.18, 83.18],
                                    [32.30, 79.19, -107.86]], atol=1e-2)
  back = np.asarray(lab.lab_to_rgb(lab.rgb_to_lab(jnp.asarray(rgb))))
  np.testing.assert_allclose(back, rgb, atol=1e-4)
  with pytest.raises(ValueError, match="255"):
    lab.rgb_to_lab(jnp.zeros((2, 3), jnp.uint8))


def test_the_313_bins_and_the_computed_gamut():
  pts = ab_bins.hull_points()
  assert pts.shape == (313, 2) and len({tuple(p) for p in pts}) == 313
  assert (pts % 10 == 0).all()
  assert (np.lexsort((pts[:, 1], pts[:, 0])) == np.arange(313)).all()    # pts_in_hull's order
  assert pts[:5].tolist() == [[-90, 50], [-90, 60], [-90, 70], [-90, 80], [-90, 90]]
  assert pts[-1].tolist() == [100, 0]
  computed = {tuple(p) for p in ab_bins.gamut_grid_points(1)}
  official = {tuple(p) for p in pts}
  assert len(computed) == 309 and computed <= official
  assert sorted(official - computed) == [(40, 90), (100, -90), (100, -10), (100, 0)]


def test_soft_encoding_picks_the_5_nearest_and_sums_to_1():
  rng = np.random.default_rng(1)
  centers = ab_bins.hull_points().astype(np.float32)
  ab = rng.uniform(-80, 80, size=(3, 4, 2)).astype(np.float32)
  enc = np.asarray(ab_bins.soft_encode(jnp.asarray(ab), jnp.asarray(centers), 5, 5.0))
  assert enc.shape == (3, 4, 313)
  np.testing.assert_allclose(enc.sum(-1), 1.0, rtol=1e-6)
  for v, e in zip(ab.reshape(-1, 2), enc.reshape(-1, 313)):
    d2 = ((centers - v) ** 2).sum(-1)
    near = np.argsort(d2)[:5]
    assert set(np.flatnonzero(e)) == set(near)
    w = np.exp(-d2[near] / 50.0)
    np.testing.assert_allclose(e[near], w / w.sum(), rtol=1e-4, atol=1e-7)
  assert (np.asarray(ab_bins.nearest_bin(jnp.asarray(ab), jnp.asarray(centers)))
          == enc.argmax(-1)).all()


def test_rebalancing_weights_by_hand():
  centers = np.array([[0, 0], [10, 0], [0, 10], [50, 50]], np.float64)
  counts = np.array([6.0, 2.0, 2.0, 0.0])
  p = counts / 10
  k = np.exp(-np.array([[0, 100, 100, 5000], [100, 0, 200, 4100], [100, 200, 0, 4100],
                        [5000, 4100, 4100, 0]]) / 50.0)
  smooth = k @ p / (k @ p).sum()
  np.testing.assert_allclose(ab_bins.smoothed_prior(counts, centers, 5.0), smooth, rtol=1e-12)
  w = 1 / (0.5 * smooth + 0.5 / 4)
  w = w / (smooth * w).sum()
  got = ab_bins.rebalance_weights(smooth, 0.5)
  np.testing.assert_allclose(got, w, rtol=1e-12)
  np.testing.assert_allclose((smooth * got).sum(), 1.0, rtol=1e-12)
  np.testing.assert_allclose(ab_bins.rebalance_weights(smooth, 1.0), 1.0, rtol=1e-12)   # uniform


def test_annealed_mean_at_t1_is_the_expectation_and_tends_to_the_mode():
  rng = np.random.default_rng(2)
  centers = ab_bins.hull_points().astype(np.float32)
  logits = rng.normal(size=(2, 3, 313)).astype(np.float32)
  p = np.exp(logits - logits.max(-1, keepdims=True))
  p /= p.sum(-1, keepdims=True)
  np.testing.assert_allclose(np.asarray(ab_bins.annealed_mean(jnp.asarray(logits), centers, 1.0)),
                             p @ centers, rtol=1e-4, atol=1e-3)
  peaked = logits.copy()
  peaked[..., 17] += 20.0                       # one clear mode
  cold = np.asarray(ab_bins.annealed_mean(jnp.asarray(peaked), centers, 0.38))
  np.testing.assert_allclose(cold, np.broadcast_to(centers[17], cold.shape), atol=1e-3)


def test_a_run_trains_and_caches_the_prior(tmp_path):
  """(Its exact resume, the rebalancing weights read back from the checkpoint, is
  tests/test_contract_convnets.py's.)"""
  a = str(tmp_path)
  train.train_and_evaluate(tiny_config(), a, progress=False)
  assert sorted(losses(a)) == [1, 2, 3, 4]
  cached = [f for f in os.listdir(a) if f.startswith("colorization_prior_")]
  assert len(cached) == 1
  counts = np.load(os.path.join(a, cached[0]))
  assert counts.shape == (313,) and counts.sum() == 64 * 16 * 16     # every pixel, one pass


def test_loss_by_hand():
  c = tiny_config()
  rng = np.random.default_rng(3)
  u8 = rng.integers(0, 256, size=(2, 16, 16, 3), dtype=np.uint8)
  u8[1] = u8[1, ..., :1]                      # a grey image: the non-grey mask drops it
  m, x, params, state = lab_setup(c, u8)
  weights = rng.uniform(0.5, 2.0, size=313).astype(np.float32)
  state["rebalance"] = jnp.asarray(weights)
  loss, aux = jax.jit(m.loss)(params, state, x, jax.random.PRNGKey(1), 0)
  lab_img = np.asarray(lab.rgb_to_lab(colorization.unnormalize(x, c.input)))
  logits, _ = jax.jit(lambda p, s, y: m.logits(p, s, y, train=True))(params, state,
                                                                     jnp.asarray(lab_img))
  logits = np.asarray(logits, np.float64)
  h, w = logits.shape[1:3]
  ab = lab_img[:, ::16 // h, ::16 // w, 1:]                   # the stride-(16 / h) subsampling
  soft, d2 = numpy_ab_soft_encoding(ab)
  ce = -(soft * numpy_log_softmax(logits)).sum(-1)
  wpos = weights[d2.argmin(-1)] * np.array([1.0, 0.0])[:, None, None]
  assert np.abs(ab[1]).max() < 0.05            # grey up to the float32 round trip
  np.testing.assert_allclose(float(loss), (wpos * ce).mean(), rtol=1e-4)
  np.testing.assert_allclose(float(aux["cross_entropy"]), ce.mean(), rtol=1e-4)


def test_reconstruct_returns_grey_and_colour_pictures():
  c = tiny_config()
  m = methods.get(c)
  x = m.eval_preprocess(jnp.asarray(np.random.default_rng(4).integers(0, 256, (2, 16, 16, 3),
                                                                      dtype=np.uint8)), c.input)
  v = m.init_variables(jax.random.PRNGKey(0), x)
  state = {"collections": {k: t for k, t in v.items() if k != "params"}}
  out = m.reconstruct(v["params"], state, x, jax.random.PRNGKey(0))
  grey = np.asarray(colorization.unnormalize(out["masked"], c.input))
  np.testing.assert_allclose(grey[..., 0], grey[..., 1], atol=2e-3)        # a = b = 0: neutral
  # a zero-initialised fc8 gives uniform probabilities: the mean of the 313 bin centres
  lab_rec = np.asarray(lab.rgb_to_lab(colorization.unnormalize(out["reconstruction"], c.input)))
  assert out["reconstruction"].shape == x.shape and np.isfinite(lab_rec).all()


@pytest.mark.parametrize("preset", ["", "cifar10", "imagenet"])
def test_presets_build(preset):
  c = load_config("colorization", preset)
  m = methods.get(c)
  assert c.model.name == "alexnet" and not c.model.pool5
  assert (m.k, m.sigma, m.lam, m.temperature) == (5, 5.0, 0.5, 0.38)
  if preset == "imagenet":
    assert c.model.widths == "caffe" and m.fc_dim == 4096
