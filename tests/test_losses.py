"""Targets and losses against hand computations on tiny inputs."""
import jax
import jax.numpy as jnp
import numpy as np

from mim_jax.methods.mae import mae_loss
from mim_jax.methods.simmim import pixel_shuffle, simmim_loss
from mim_jax.targets import pixels


def test_patchify_matches_mae_layout_and_inverts():
  rng = np.random.default_rng(0)
  nhwc = rng.normal(size=(2, 8, 8, 3)).astype(np.float32)
  # The official code: NCHW -> reshape (n,c,h,p,w,q) -> einsum nchpwq->nhwpqc.
  nchw = nhwc.transpose(0, 3, 1, 2)
  x = nchw.reshape(2, 3, 2, 4, 2, 4)
  ref = np.einsum("nchpwq->nhwpqc", x).reshape(2, 4, 48)
  got = np.asarray(pixels.patchify(jnp.asarray(nhwc), 4))
  np.testing.assert_array_equal(got, ref)
  np.testing.assert_array_equal(np.asarray(pixels.unpatchify(jnp.asarray(got), 4)), nhwc)


def test_norm_pix_target_uses_unbiased_variance():
  img = np.zeros((1, 2, 2, 1), np.float32)
  img[0, :, :, 0] = [[1.0, 2.0], [3.0, 6.0]]
  # one patch of 4 values: mean 3, unbiased var = (4+1+0+9)/3 = 14/3
  t = np.asarray(pixels.norm_pix_target(jnp.asarray(img), 2))
  expect = (np.array([1, 2, 3, 6]) - 3.0) / np.sqrt(14 / 3 + 1e-6)
  np.testing.assert_allclose(t[0, 0], expect, rtol=1e-6)


def test_mae_loss_counts_only_masked_patches():
  pred = jnp.asarray([[[1.0, 1.0], [0.0, 2.0], [5.0, 5.0]]])
  target = jnp.zeros((1, 3, 2))
  mask = jnp.asarray([[1.0, 1.0, 0.0]])
  # per patch MSE: 1, 2, 25 ; masked mean of (1, 2) = 1.5
  assert float(mae_loss(pred, target, mask)) == 1.5


def test_simmim_loss_is_l1_over_masked_pixels_and_channels():
  x = np.zeros((1, 2, 2, 3), np.float32)
  rec = np.zeros_like(x)
  rec[0, 0, 0] = [1.0, 2.0, 3.0]   # masked pixel: |err| sum 6
  rec[0, 1, 1] = [9.0, 9.0, 9.0]   # unmasked pixel: ignored
  m = np.array([[[1, 0], [0, 0]]])
  got = float(simmim_loss(jnp.asarray(x), jnp.asarray(rec), jnp.asarray(m)))
  np.testing.assert_allclose(got, 6.0 / (1 + 1e-5) / 3, rtol=1e-6)


def test_pixel_shuffle_matches_torch_definition():
  r, c, h, w = 2, 3, 2, 3
  x = np.arange(1 * h * w * c * r * r, dtype=np.float32).reshape(1, h, w, c * r * r)
  got = np.asarray(pixel_shuffle(jnp.asarray(x), r, c))
  assert got.shape == (1, h * r, w * r, c)
  for ch in range(c):
    for i in range(r):
      for j in range(r):
        for y in range(h):
          for z in range(w):
            assert got[0, y * r + i, z * r + j, ch] == x[0, y, z, ch * r * r + i * r + j]


def test_losses_are_differentiable_and_finite():
  g = jax.grad(lambda p: mae_loss(p, jnp.zeros((1, 3, 2)), jnp.asarray([[1.0, 0.0, 1.0]])))(jnp.ones((1, 3, 2)))
  # d/dp mean over masked of mean_j p^2 = 2p / (2 dims * 2 masked patches)
  np.testing.assert_allclose(np.asarray(g)[0], [[0.5, 0.5], [0, 0], [0.5, 0.5]])


def test_mae_picture_uses_only_visible_patch_statistics():
  from helpers import tiny_config
  from mim_jax import masking, methods
  from mim_jax.methods.mae import visible_patch_stats
  c = tiny_config("mae")
  m = methods.get(c)
  x = jax.random.normal(jax.random.PRNGKey(0), (2, 32, 32, 3))
  p = m.init(jax.random.PRNGKey(1), x)
  sm = masking.random_shuffle_mask(jax.random.PRNGKey(2), 2, 64, 0.75)
  pred = jax.random.normal(jax.random.PRNGKey(3), (2, 64, 48))
  m.forward = lambda params, images, rng: (pred, sm)
  out = m.reconstruct(p, {}, x, jax.random.PRNGKey(2))
  # Changing the hidden pixels changes nothing in the picture.
  hidden = pixels.unpatchify(jnp.asarray(sm.mask)[:, :, None] * jnp.ones((2, 64, 48)), 4)
  out2 = m.reconstruct(p, {}, x + 5.0 * hidden, jax.random.PRNGKey(2))
  np.testing.assert_allclose(np.asarray(out2["reconstruction"]), np.asarray(out["reconstruction"]), atol=1e-5)
  # Visible patches are pasted; masked ones are pred * std + mean of the visible estimate.
  t = pixels.patchify(x, 4)
  mean, var = visible_patch_stats(t, sm.mask)
  rec = np.asarray(pixels.patchify(out["reconstruction"], 4))
  mk = np.asarray(sm.mask) > 0
  np.testing.assert_allclose(rec[~mk], np.asarray(t)[~mk], atol=1e-5)
  expect = np.asarray(pred * jnp.sqrt(var + 1e-6) + mean)
  np.testing.assert_allclose(rec[mk], expect[mk], rtol=1e-5, atol=1e-5)
  assert np.isclose((np.abs(np.asarray(out["masked"])).sum(-1) == 0).mean(), 0.75)


def test_visible_patch_stats_by_hand():
  from mim_jax.methods.mae import visible_patch_stats
  # 2x2 grid, one value pair per patch; patch 3 is masked, its neighbours at distance 1, 1, sqrt2.
  patches = jnp.asarray([[[0.0, 2.0], [2.0, 4.0], [4.0, 8.0], [100.0, 100.0]]])
  mask = jnp.asarray([[0.0, 0.0, 0.0, 1.0]])
  mean, var = visible_patch_stats(patches, mask)
  w = np.array([np.exp(-1.0), np.exp(-0.5), np.exp(-0.5)])  # d^2 = 2, 1, 1 from patch 3
  means, vars_ = np.array([1.0, 3.0, 6.0]), np.array([2.0, 2.0, 8.0])
  np.testing.assert_allclose(float(mean[0, 3, 0]), (w * means).sum() / w.sum(), rtol=1e-6)
  np.testing.assert_allclose(float(var[0, 3, 0]), (w * vars_).sum() / w.sum(), rtol=1e-6)
