"""MaskFeat (image, HOG target): the HOG against a plain NumPy implementation of the official
definition, the loss against a hand computation, the official masking / init / recipe, and
training on the embedded data (loss falls, a resumed run equals an uninterrupted one)."""


import jax
import jax.numpy as jnp
import numpy as np
import pytest

from helpers import load_config, tiny_config, losses, resumed_losses, assert_same_losses
from mim_jax import methods, optim, train
from mim_jax.targets import hog


# ---------------------------------------------------------------------------------------------
# A direct NumPy HOG, written from the definition (HOGLayerC) with explicit loops.

SOBEL_X = np.array([[1, 0, -1], [2, 0, -2], [1, 0, -1]], np.float64)


def numpy_hog(image, nbins=9, cell=8):
  """One image [H, W, C] -> [C, nbins, H / cell, W / cell], the official layout."""
  h, w, c = image.shape
  padded = np.pad(image.astype(np.float64), ((1, 1), (1, 1), (0, 0)), mode="reflect")
  gx = np.zeros((h, w, c))
  gy = np.zeros((h, w, c))
  for u in range(3):              # cross-correlation, as torch's conv2d
    for v in range(3):
      window = padded[u:u + h, v:v + w]
      gx += SOBEL_X[u, v] * window
      gy += SOBEL_X[v, u] * window      # the transposed kernel
  out = np.zeros((c, nbins, h // cell, w // cell))
  for i in range(h):
    for j in range(w):
      for ch in range(c):
        phase = np.arctan2(gx[i, j, ch], gy[i, j, ch]) / np.pi * nbins
        b = int(np.floor(phase)) % nbins          # Python's % is a floor-mod, like torch's
        out[ch, b, i // cell, j // cell] += np.hypot(gx[i, j, ch], gy[i, j, ch])
  norm = np.sqrt((out ** 2).sum(axis=1, keepdims=True))
  return out / np.maximum(norm, 1e-12)


def numpy_patch_targets(image, patch, nbins=9, cell=8):
  """[H, W, C] -> [L, C * nbins * k * k]: entry ((c * nbins + bin) * k + cy) * k + cx of patch
  (py, px) is the HOG of cell (py * k + cy, px * k + cx), as _get_hog_label_2d unfolds it."""
  h_ = numpy_hog(image, nbins, cell)
  c, _, gh, gw = h_.shape
  k = patch // cell
  out = np.zeros(((gh // k) * (gw // k), c * nbins * k * k))
  for py in range(gh // k):
    for px in range(gw // k):
      for ch in range(c):
        for b in range(nbins):
          for cy in range(k):
            for cx in range(k):
              out[py * (gw // k) + px, ((ch * nbins + b) * k + cy) * k + cx] = \
                  h_[ch, b, py * k + cy, px * k + cx]
  return out


@pytest.mark.parametrize("size,cell", [(16, 8), (32, 4), (12, 2)])
def test_hog_equals_numpy_reference(size, cell):
  x = np.random.RandomState(size + cell).randn(2, size, size, 3).astype(np.float32)
  got = np.asarray(hog.hog(jnp.asarray(x), nbins=9, cell=cell))      # [B, h, w, C, nbins]
  for i in range(2):
    ref = numpy_hog(x[i], 9, cell).transpose(2, 3, 0, 1)
    np.testing.assert_allclose(got[i], ref, rtol=1e-5, atol=1e-6)


def test_patch_target_has_the_official_order_and_size():
  x = np.random.RandomState(0).randn(2, 32, 32, 3).astype(np.float32)
  got = np.asarray(hog.hog_target(jnp.asarray(x), patch=16, nbins=9, cell=8))
  assert got.shape == (2, 4, 108)
  for i in range(2):
    np.testing.assert_allclose(got[i], numpy_patch_targets(x[i], 16, 9, 8), rtol=1e-5, atol=1e-6)
  # The CPU presets' scaled geometry: 4-pixel patches of 2x2-pixel cells, also 108 values.
  assert hog.hog_target(jnp.asarray(x), patch=4, nbins=9, cell=2).shape == (2, 64, 108)


def test_video_target_is_the_official_3d_layout():
  """hog_target_3d against `_get_hog_label_3d` re-derived in NumPy from the per-frame HOG cells
  in HOGLayerC's [BT, C, nbins, h, w] layout: frames[::2], flatten(1, 2), permute, unfold rows
  and columns, flatten(3), view(B, T, f, f, -1), flatten(1, 3)."""
  clips = jax.random.normal(jax.random.PRNGKey(0), (2, 6, 32, 32, 3))
  got = np.asarray(hog.hog_target_3d(clips, 2, 16, nbins=9, cell=8))
  frames = clips[:, ::2].reshape(6, 32, 32, 3)
  cells = np.asarray(hog.hog(frames, nbins=9, cell=8)).transpose(0, 3, 4, 1, 2)  # BT C nb h w
  x = cells.reshape(6, 27, 4, 4).transpose(0, 2, 3, 1)                 # BT Hc Wc C'
  x = x.reshape(6, 2, 2, 2, 2, 27).transpose(0, 1, 3, 5, 2, 4)         # BT f f C' u u
  want = x.reshape(6, 2, 2, -1).reshape(2, 3, 2, 2, -1).reshape(2, 12, -1)
  assert got.shape == (2, 3 * 2 * 2, 27 * 4) == want.shape
  np.testing.assert_allclose(got, want, rtol=1e-6, atol=1e-6)


def test_vertical_edge_puts_all_mass_in_the_horizontal_gradient_bin():
  x = np.zeros((1, 32, 32, 3), np.float32)
  x[:, :, 12:] = 1.0                          # a vertical edge between columns 11 and 12
  h = np.asarray(hog.hog(jnp.asarray(x), nbins=9, cell=4))   # [1, 8, 8, 3, 9]
  # gx = +-4, gy = 0: atan2(+-4, 0) / pi * 9 = +-4.5 -> floor 4 or -5 -> bin 4 either way.
  edge = h[0, :, 2:4]                          # cells holding columns 8..15
  np.testing.assert_allclose(edge[..., 4], 1.0, rtol=1e-6)
  np.testing.assert_allclose(np.delete(edge, 4, axis=-1), 0.0)
  # Cells without gradients stay zero (norm clamped at 1e-12, no NaN).
  assert np.all(np.delete(h[0], [2, 3], axis=1) == 0.0)
  # The flipped edge (dark on the right) lands in the same bin: orientation is unsigned.
  h2 = np.asarray(hog.hog(jnp.asarray(1.0 - x), nbins=9, cell=4))
  np.testing.assert_array_equal(h2, h)


def test_each_cell_is_l2_normalised_per_channel():
  x = np.random.RandomState(1).randn(3, 16, 16, 3).astype(np.float32)
  h = np.asarray(hog.hog(jnp.asarray(x), nbins=9, cell=4))
  np.testing.assert_allclose(np.linalg.norm(h, axis=-1), 1.0, rtol=1e-5)
  assert np.all(h >= 0)
  # Normalised per channel: scaling one channel leaves every histogram unchanged.
  y = x.copy()
  y[..., 1] *= 7.0
  np.testing.assert_allclose(np.asarray(hog.hog(jnp.asarray(y), nbins=9, cell=4)), h, rtol=1e-5, atol=1e-6)


def test_hog_rejects_sizes_that_do_not_split_into_cells():
  with pytest.raises(ValueError, match="hog_cell"):
    hog.hog(jnp.zeros((1, 20, 20, 3)), cell=8)


# ---------------------------------------------------------------------------------------------
# The method.

def test_loss_equals_hand_computation(monkeypatch):
  c = tiny_config("maskfeat")
  c.model.depth = 1
  m = methods.get(c)
  images = jnp.asarray(np.random.RandomState(2).randn(2, 32, 32, 3).astype(np.float32))
  params = m.init(jax.random.PRNGKey(0), images)
  # Perturb the head so the prediction is not near zero everywhere.
  params["head"]["proj"]["bias"] = jnp.asarray(np.random.RandomState(3).randn(108), jnp.float32)
  mask = np.zeros((2, 64), np.int32)
  mask[0, [0, 1, 8, 9, 10, 17]] = 1
  mask[1, 30:45] = 1
  monkeypatch.setattr(m, "make_mask", lambda rng, b: jnp.asarray(mask))
  loss, aux = m.loss(params, {}, images, jax.random.PRNGKey(1), 0)

  tokens = np.asarray(m.encoder.apply({"params": params["encoder"]}, images, mask=jnp.asarray(mask)))
  w = np.asarray(params["head"]["proj"]["kernel"], np.float64)
  b = np.asarray(params["head"]["proj"]["bias"], np.float64)
  pred = tokens[:, 1:].astype(np.float64) @ w + b                   # cls token dropped
  target = np.stack([numpy_patch_targets(np.asarray(images[i]), 4, 9, 2) for i in range(2)])
  rows = [(pred[i, j] - target[i, j]) ** 2 for i in range(2) for j in range(64) if mask[i, j]]
  expected = np.mean(np.stack(rows))                                # over masked patches x 108
  np.testing.assert_allclose(float(loss), expected, rtol=1e-5)
  assert float(aux["mask_ratio"]) == pytest.approx(21 / 128)

  # The unmasked encoder sees different inputs: the mask token must matter.
  plain = np.asarray(m.encoder.apply({"params": params["encoder"]}, images))
  assert not np.allclose(plain, tokens)


def test_block_masks_follow_the_official_generator_settings():
  m = methods.get(load_config("maskfeat", "imagenet"))
  assert (m.grid, m.num_masking, m.min_block) == (14, 78, 15)        # round(78.4), 78 // 5
  m = methods.get(tiny_config("maskfeat"))
  assert (m.grid, m.num_masking, m.min_block) == (8, 26, 5)          # round(25.6), 26 // 5
  masks = np.asarray(jax.jit(m.make_mask, static_argnums=1)(jax.random.PRNGKey(0), 64))
  assert masks.shape == (64, 64) and set(np.unique(masks)) <= {0, 1}
  counts = masks.sum(axis=1)
  assert counts.max() <= 26 and counts.min() >= 5
  assert counts.mean() > 20                  # BEiT's generator gets close to the target count
  # Masks are blocks, not scattered patches: most masked patches have a masked 4-neighbour.
  g = masks.reshape(64, 8, 8)
  nb = np.zeros_like(g)
  nb[:, 1:] |= g[:, :-1]
  nb[:, :-1] |= g[:, 1:]
  nb[:, :, 1:] |= g[:, :, :-1]
  nb[:, :, :-1] |= g[:, :, 1:]
  assert (g & nb).sum() / g.sum() > 0.9


def test_official_init():
  c = tiny_config("maskfeat")
  c.model.pos_embed = "learned"
  m = methods.get(c)
  p = m.init(jax.random.PRNGKey(0), jnp.zeros((2, 32, 32, 3)))
  e = p["encoder"]
  blk = e["encoder"]["block00"]
  for bias in (blk["attn"]["qkv_bias"], blk["attn"]["proj"]["bias"], blk["mlp"]["fc1"]["bias"],
               blk["mlp"]["fc2"]["bias"], blk["norm1"]["bias"], blk["norm2"]["bias"]):
    np.testing.assert_array_equal(bias, np.float32(0.02))          # MViT._init_weights
  np.testing.assert_array_equal(blk["norm1"]["scale"], 1.0)
  np.testing.assert_array_equal(e["encoder"]["norm"]["bias"], 0.0)   # the head's LayerNorm
  np.testing.assert_array_equal(p["head"]["proj"]["bias"], 0.0)
  kernels = np.concatenate([np.ravel(blk["attn"]["qkv_kernel"]), np.ravel(blk["mlp"]["fc1"]["kernel"]),
                            np.ravel(p["head"]["proj"]["kernel"]), np.ravel(e["pos_embed"])])
  assert np.std(kernels) == pytest.approx(0.02, rel=0.03) and abs(np.mean(kernels)) < 1e-3
  assert np.abs(kernels).max() > 0.07                # N(0, .02): not cut at 2 std
  bound = 1 / np.sqrt(3 * 4 * 4)                      # Conv2d default bias, fan_in 3 * 4 * 4
  pb = np.asarray(e["patch_embed"]["proj"]["bias"])
  assert np.abs(pb).max() <= bound and np.abs(pb).max() > bound / 2
  # official_init=False keeps the ViT's own (xavier, zero-bias) initialisation.
  c.maskfeat.official_init = False
  q = methods.get(c).init(jax.random.PRNGKey(0), jnp.zeros((2, 32, 32, 3)))
  np.testing.assert_array_equal(q["encoder"]["encoder"]["block00"]["mlp"]["fc1"]["bias"], 0.0)


def test_imagenet_preset_is_the_official_recipe():
  c = load_config("maskfeat", "imagenet")
  m = methods.get(c)
  assert (c.input.image_size, c.model.patch_size, c.model.variant) == (224, 16, "base")
  assert c.model.pos_embed == "learned"
  assert (c.maskfeat.mask_ratio, c.maskfeat.hog_bins, c.maskfeat.hog_cell, m.head.out_dim) == (0.4, 9, 8, 108)
  assert (c.model.qkv_bias, c.model.init_values, c.model.drop_path) == ("qkv", 0.0, 0.0)
  assert (c.optim.b1, c.optim.b2, c.optim.eps) == (0.9, 0.999, 1e-8)
  assert (c.optim.weight_decay, c.optim.clip_grad) == (0.05, 0.02)
  assert (c.total_epochs, c.optim.warmup_epochs, c.input.batch_size) == (300, 30, 2048)
  assert optim.peak_lr(c.optim, c.input.batch_size) == pytest.approx(2e-4 * 8)
  s = optim.make_schedule(c.optim, 2048, 100, 30_000)
  assert float(s(0)) == pytest.approx(1e-6 * 8, rel=1e-4)                # warm-up from 1e-6 x 8
  assert float(s(3_000)) == pytest.approx(1.6e-3, rel=1e-4)               # peak after 30 epochs
  assert float(s(30_000)) == pytest.approx(1e-6 * 8, rel=1e-3)            # cosine to 1e-6 x 8
  assert tuple(c.input.aug.crop_scale) == (0.5, 1.0)
  # ZERO_WD_1D_PARAM: 1-D parameters undecayed; pos_embed, cls and mask tokens decayed.
  shapes = jax.eval_shape(m.init, jax.random.PRNGKey(0), jnp.zeros((1, 224, 224, 3)))
  dm = m.decay_mask(shapes)
  assert dm["encoder"]["pos_embed"] and dm["encoder"]["cls_token"] and dm["encoder"]["mask_token"]
  assert not dm["encoder"]["encoder"]["block00"]["attn"]["qkv_bias"] and not dm["head"]["proj"]["bias"]
  assert dm["head"]["proj"]["kernel"]


@pytest.mark.parametrize("preset", ["", "cifar10"])
def test_cpu_presets_build(preset):
  c = load_config("maskfeat", preset)
  m = methods.get(c)
  assert (c.input.image_size, c.model.patch_size, c.maskfeat.hog_cell, m.head.out_dim) == (32, 4, 2, 108)


# ---------------------------------------------------------------------------------------------
# Training on the embedded data.


def test_loss_falls_and_a_resumed_run_equals_an_uninterrupted_one(tmp_path, compilation_cache):
  # One uninterrupted run (whose loss must fall) and one preempted at step 6 and resumed: the
  # resumed run must continue it bit for bit, the EMA encoder (method state) included.
  c = tiny_config("maskfeat", total_steps=12, ckpt_every=4)
  c.model.depth = 1
  c.optim.update(base_lr=5e-3, warmup_epochs=0.1)
  c.evals = {}
  assert c.ema.enabled
  a, b = str(tmp_path / "a"), str(tmp_path / "b")
  train.train_and_evaluate(c, a, progress=False)
  la = losses(a)
  assert sorted(la) == list(range(1, 13))
  first = np.mean([la[s] for s in (1, 2, 3)])
  last = np.mean([la[s] for s in (10, 11, 12)])
  assert last < 0.9 * first, la
  assert_same_losses(la, resumed_losses(c, b, stop_after=6), 12)
