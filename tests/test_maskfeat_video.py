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


def test_finetune_presets_load_a_maskfeat_clip_run(tmp_path):
  """configs/finetune.py:maskfeat_clips on a (shrunk) MaskFeat clips run: the encoder loads
  unchanged, the head is SlowFast's USE_MEAN_POOLING head at HEAD_INIT_SCALE 0.001, and with
  repeated augmentation (aug.num_sample 2) each step trains on copies of half as many clips."""
  pre = tiny_clip_config(total_steps=2, ckpt_every=2)
  pre_dir = str(tmp_path / "pre")
  train.train_and_evaluate(pre, pre_dir, devices=jax.devices()[:1], progress=False)
  c = load_config("finetune", "maskfeat_clips")
  assert (c.optim.base_lr, c.optim.clip_grad, c.optim.layer_decay, c.finetune.pooling,
          c.model.drop_path) == (6e-4, 5.0, 0.75, "mean", 0.1)
  c.model = pre.model.copy_and_resolve_references()
  c.model.drop_path = 0.1
  c.input.data.update(num_frames=4, train_subset=64)
  c.input.batch_size = 8
  c.input.aug.num_sample = 2
  c.total_steps, c.ckpt_every, c.log_every = 2, 2, 1
  c.evals = {}
  c.finetune.pretrained = pre_dir
  tr = train.Trainer.create(c, devices=jax.devices()[:1])
  assert tr.steps_per_epoch == 16                      # 64 clips, 4 a step
  saved = train.Trainer.from_workdir(pre_dir, devices=jax.devices()[:1])
  got, want = tr.state["params"]["encoder"], saved.state["params"]["encoder"]
  flat = lambda t: {jax.tree_util.keystr(p): v for p, v in jax.tree_util.tree_flatten_with_path(t)[0]}  # noqa: E731
  got, want = flat(got), flat(want)
  assert set(want) - set(got) == {"['mask_token']"} and set(got) <= set(want)
  for k in got:
    np.testing.assert_array_equal(got[k], want[k], err_msg=k)
  std = float(np.std(np.asarray(tr.state["params"]["head"]["fc"]["kernel"])))
  assert 1e-5 < std < 3e-5                             # trunc_normal(.02) x 0.001
  batch = tr.next_batch()
  index = np.asarray(batch["index"])
  assert index.shape == (8,) and (index[0::2] == index[1::2]).all()
  tr.state, m = tr.step_fn(tr.state, batch)
  assert np.isfinite(float(m["loss"]))


def test_k400_finetune_preset_puts_back_the_query_stride_of_the_pretraining():
  """configs/finetune.py:k400_mvitv2_s against configs/maskfeat.py:k400_mvitv2_s: the same
  parameters but for the relative position tables the restored block-14 query stride changes
  (block 15's q and k: 14x14 -> 7x7, 27 -> 13 rows), which adapt_pretrained resizes; the
  yaml's data, test and optimiser settings."""
  ft, pt = load_config("finetune", "k400_mvitv2_s"), load_config("maskfeat", "k400_mvitv2_s")
  shapes = {}
  for name, c in (("ft", ft), ("pt", pt)):
    model = mvit.from_config(c.model, 224)
    tree = jax.eval_shape(lambda m=model: m.init(jax.random.PRNGKey(0),
                                                 jnp.zeros((1, 16, 224, 224, 3))))["params"]
    shapes[name] = {"/".join(str(k.key) for k in p): v.shape
                    for p, v in jax.tree_util.tree_flatten_with_path(tree)[0]}
  assert set(shapes["ft"]) == set(shapes["pt"])
  differ = {k: (shapes["pt"][k], shapes["ft"][k]) for k in shapes["ft"]
            if shapes["ft"][k] != shapes["pt"][k]}
  assert differ == {"block15/attn/rel_pos_h": ((27, 96), (13, 96)),
                    "block15/attn/rel_pos_w": ((27, 96), (13, 96))}, differ
  loaded = {"block15": {"attn": {"rel_pos_h": np.random.RandomState(0).randn(27, 96)}}}
  init = {"block15": {"attn": {"rel_pos_h": np.zeros((13, 96))}}}
  assert mvit.adapt_pretrained(loaded, init)["block15"]["attn"]["rel_pos_h"].shape == (13, 96)
  d, a = ft.input.data, ft.input.aug
  assert (d.sampling, d.num_frames, d.sampling_rate, d.use_offset, tuple(d.test_views)) == (
      "clip", 16, 4, True, (10, 1))
  assert (a.num_sample, ft.input.batch_size, tuple(a.crop_scale)) == (2, 32, (0.08, 1.0))
  assert (ft.optim.base_lr, ft.optim.lr_batch_divisor, ft.optim.warmup_epochs,
          ft.total_epochs, ft.optim.clip_grad, ft.finetune.num_classes) == (
              6e-4, 32, 20, 100, 5.0, 400)
