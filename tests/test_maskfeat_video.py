"""MaskFeat on clips (issue 29): SlowFast's MaskMViT on a video MViTv2. The loss against a
hand computation (cube mask on its window, upsampled frame by frame to the output grid; HOG of
every second frame, `_get_hog_label_3d`; the head on the last block's tokens), the Kinetics
preset's geometry, the official initialisation's Conv3d bias, and a short run on the embedded
clips that resumes exactly."""
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from helpers import apply_overrides, assert_same_losses, load_config, losses, resumed_losses
from mim_jax import methods, train
from mim_jax.models import mvit
from test_maskfeat import numpy_patch_targets

pytestmark = pytest.mark.usefixtures("compilation_cache")


def tiny_clip_config(**overrides):
  """The 'clips' preset shrunk: 4-frame clips (2 token frames), width 8, two blocks, the 8x8
  patch grid pooled once to the 4x4 output grid (stride 8, HOG cells of 4 pixels)."""
  c = load_config("maskfeat", "clips")
  c.input.data.num_frames = 4
  c.model.update(num_frames=4, embed_dim=8, stage_blocks=(1, 1), stage_strides=(2,))
  c.maskfeat.mask_window = (2, 2, 2)
  c.input.batch_size = 8
  c.total_steps = 4
  c.log_every = 1
  c.ckpt_every = 2
  c.keep_ckpts = 5
  c.evals = {}
  return apply_overrides(c, overrides)


def test_loss_equals_hand_computation(monkeypatch):
  m = methods.get(tiny_clip_config())
  assert (m.frames, m.grid, m.patch, m.window, m.head.out_dim) == (2, 4, 8, (2, 2, 2), 108)
  clips = jnp.asarray(np.random.RandomState(2).randn(2, 4, 32, 32, 3).astype(np.float32))
  params = jax.jit(m.init)(jax.random.PRNGKey(0), clips)
  params["head"]["proj"]["bias"] = jnp.asarray(np.random.RandomState(3).randn(108), jnp.float32)
  window = np.zeros((2, 2, 2, 2), np.int32)          # [B, t, h, w] on the 2x2 mask window
  window[0, 0, 0, 0] = window[0, 1, 1, :] = 1
  window[1, 1] = 1
  monkeypatch.setattr(m, "make_mask", lambda rng, b: jnp.asarray(window.reshape(2, 8)))
  loss, aux = jax.jit(m.loss)(params, {}, clips, jax.random.PRNGKey(1), 0)

  # Each window cell covers 2x2 output tokens of its frame (F.interpolate in space only).
  out_mask = np.stack([np.kron(w, np.ones((1, 2, 2))).reshape(-1) for w in window])   # [B, 32]
  fine = np.stack([np.kron(w, np.ones((1, 8, 8))).reshape(-1) for w in window])       # patch grid
  tokens = np.asarray(jax.jit(lambda p, x, k: m.encoder.apply({"params": p}, x, mask=k))(
      params["encoder"], clips, jnp.asarray(fine)))
  assert tokens.shape == (2, 1 + 2 * 4 * 4, 16)
  w = np.asarray(params["head"]["proj"]["kernel"], np.float64)
  b = np.asarray(params["head"]["proj"]["bias"], np.float64)
  pred = tokens[:, 1:].astype(np.float64) @ w + b                   # cls token dropped
  # HOG of frames 0 and 2 (PATCH_STRIDE[0] = 2), 2x2 cells of 4 pixels per stride-8 token.
  target = np.stack([np.concatenate([numpy_patch_targets(np.asarray(clips[i, t]), 8, 9, 4)
                                     for t in (0, 2)]) for i in range(2)])
  rows = [(pred[i, j] - target[i, j]) ** 2 for i in range(2) for j in range(32) if out_mask[i, j]]
  np.testing.assert_allclose(float(loss), np.mean(np.stack(rows)), rtol=1e-5)
  assert float(aux["mask_ratio"]) == pytest.approx(out_mask.mean())


def test_kinetics_preset_geometry_and_init():
  c = load_config("maskfeat", "k400_mvitv2_s")
  m = methods.get(c)
  assert (m.frames, m.grid, m.patch, m.window, m.head.out_dim) == (8, 14, 16, (8, 7, 7), 108)
  assert m.encoder.specs[-1].dim_out == 768 and not m.encoder.dim_mul_in_att
  mask = m.make_mask(jax.random.PRNGKey(0), 3)
  assert mask.shape == (3, 8 * 7 * 7)
  assert np.all(np.asarray(mask).sum(1) <= round(8 * 49 * 0.4))
  out = np.asarray(m.output_mask(mask)).reshape(3, 8, 14, 14)
  np.testing.assert_array_equal(out[:, :, ::2, ::2], np.asarray(mask).reshape(3, 8, 7, 7))
  np.testing.assert_array_equal(out[:, :, 1::2, 1::2], out[:, :, ::2, ::2])
  target = jax.eval_shape(m.target, jax.ShapeDtypeStruct((1, 16, 224, 224, 3), jnp.float32))
  assert target.shape == (1, 8 * 14 * 14, 108)
  assert c.optim.base_lr * c.input.batch_size / c.optim.lr_batch_divisor == 1e-4


def test_official_init_draws_the_conv3d_bias_from_its_fan_in():
  m = methods.get(tiny_clip_config())
  params = m.init(jax.random.PRNGKey(0), m.init_input())
  bias = np.asarray(params["encoder"]["patch_embed"]["proj"]["bias"])
  bound = 1 / np.sqrt(3 * 3 * 7 * 7)                 # Conv3d(3, C, (3, 7, 7)) default bias
  assert np.all(np.abs(bias) <= bound) and np.abs(bias).max() > 0.6 * bound
  kernel = np.asarray(params["encoder"]["block00"]["attn"]["pool_q"]["kernel"])
  assert kernel.shape == (3, 3, 3, 1, 8) and 0.015 < kernel.std() < 0.025   # N(0, .02)


def test_clip_run_learns_and_resumes_exactly(tmp_path):
  one = jax.devices()[:1]
  train.train_and_evaluate(tiny_clip_config(), str(tmp_path / "full"), progress=False,
                           devices=one)
  full = losses(tmp_path / "full")
  assert np.all(np.isfinite(list(full.values())))
  assert_same_losses(full, resumed_losses(tiny_clip_config(), str(tmp_path / "part"),
                                          stop_after=2, devices=one), 4)


def test_video_needs_an_mvit_and_a_matching_window():
  with pytest.raises(ValueError, match="mask_window"):
    methods.get(tiny_clip_config(**{"maskfeat.mask_window": (3, 2, 2)}))
  assert mvit.from_config(load_config("maskfeat", "clips").model, 32).frames == 4
