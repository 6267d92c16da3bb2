"""VideoMAE (issue 29): the space-time ViT against NumPy re-derivations of the official
Conv3d patch embedding and sinusoid table, the tube and running-cell token selections, the
norm-pix cube target and the whole loss computed by hand, one crop per clip on the device, a
2-step run on the embedded clips with kNN numbers, and sharded == one device."""
import functools
import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from scipy.special import erf

from helpers import losses, tiny_config
from mim_jax import methods, train
from mim_jax.data import augment, preprocess
from mim_jax.methods import videomae
from mim_jax.models import vit

pytestmark = pytest.mark.usefixtures("compilation_cache")

MEAN, STD = np.array([0.485, 0.456, 0.406]), np.array([0.229, 0.224, 0.225])


def small_config(**videomae_overrides):
  """8-px clips of 4 frames: 2 x 2 x 2 = 8 tokens of 2x4x4 cubes; a 1-block mu ViT."""
  c = tiny_config("videomae")
  c.model.depth = 1
  c.input.image_size = 8
  c.input.data.num_frames = 4
  c.videomae.update(mask_ratio=0.5, decoder=dict(width=16, depth=0, heads=2))
  c.videomae.update(videomae_overrides)
  return c


def official_sinusoid(n_position, d_hid):
  """get_sinusoid_encoding_table of VideoMAE's modeling_finetune.py, as written there."""
  def angles(position):
    return [position / np.power(10000, 2 * (hid_j // 2) / d_hid) for hid_j in range(d_hid)]
  table = np.array([angles(pos_i) for pos_i in range(n_position)])
  table[:, 0::2] = np.sin(table[:, 0::2])
  table[:, 1::2] = np.cos(table[:, 1::2])
  return table.astype(np.float32)


def test_sinusoid_table_is_the_official_one():
  np.testing.assert_array_equal(vit.sinusoid_table(40, 24), official_sinusoid(40, 24))


def conv3d_tokens(clips, weight, bias, t, p):
  """torch Conv3d(kernel = stride = (t, p, p)) on clips [B, C, T, H, W], then .flatten(2)
  .transpose(1, 2): tokens [B, T/t * H/p * W/p, D], written as the sum over each cube."""
  b, c, tt, hh, ww = clips.shape
  out = []
  for i in range(tt // t):
    for y in range(hh // p):
      for x in range(ww // p):
        cube = clips[:, :, i * t:(i + 1) * t, y * p:(y + 1) * p, x * p:(x + 1) * p]
        out.append(np.einsum("bctyx,dctyx->bd", cube, weight) + bias)
  return np.stack(out, axis=1)


def test_patch_embed_is_conv3d_with_the_documented_layout():
  rng = np.random.default_rng(0)
  clips = rng.normal(size=(2, 3, 4, 8, 12)).astype(np.float32)        # [B, C, T, H, W]
  weight = rng.normal(size=(5, 3, 2, 4, 4)).astype(np.float32)        # torch [D, C, t, p, p]
  bias = rng.normal(size=(5,)).astype(np.float32)
  kernel = weight.transpose(2, 3, 4, 1, 0).reshape(2 * 4 * 4 * 3, 5)  # PatchEmbed's docstring
  params = {"params": {"proj": {"kernel": kernel, "bias": bias}}}
  got = vit.PatchEmbed(4, 5, tubelet=2).apply(params, clips.transpose(0, 2, 3, 4, 1))
  np.testing.assert_allclose(got, conv3d_tokens(clips, weight, bias, 2, 4), rtol=1e-5, atol=1e-5)


def test_weight_decay_spares_the_mask_token_only_besides_1d():
  """optim_factory: no decay on 1-D parameters and the top module's 'mask_token'; the Conv3d
  kernel and encoder_to_decoder (no bias) decay."""
  m = methods.get(small_config())
  p = jax.eval_shape(m.init, jax.random.PRNGKey(0), m.init_input())
  decay = m.decay_mask(p)
  assert not decay["decoder"]["mask_token"] and decay["decoder"]["encoder_to_decoder"]["kernel"]
  assert decay["encoder"]["patch_embed"]["proj"]["kernel"]
  assert not decay["encoder"]["patch_embed"]["proj"]["bias"]


def test_video_vit_has_no_cls_and_no_table_parameter_and_names_its_errors():
  c = small_config()
  m = methods.get(c)
  p = jax.eval_shape(m.init, jax.random.PRNGKey(0), m.init_input())["encoder"]
  assert set(p) == {"patch_embed", "encoder"} and p["patch_embed"]["proj"]["kernel"].shape == (96, 64)
  clips = jnp.zeros((1, 4, 8, 8, 3))
  tokens = jax.jit(m.encoder.apply)({"params": jax.tree.map(jnp.zeros_like, p)}, clips)
  out = vit._named(m.encoder, tokens, clips, "mean")           # what outputs() returns
  assert out["tokens"].shape == (1, 8, 64) and out["pooled"].shape == (1, 64) and out["grid"] == (2, 2, 2)
  np.testing.assert_allclose(out["pooled"], tokens.mean(1), rtol=1e-6)
  bad = small_config()
  bad.input.data.num_frames = 3
  with pytest.raises(ValueError, match="multiple of config.model.tubelet"):
    methods.get(bad)
  with pytest.raises(ValueError, match="takes clips"):
    m.encoder.init(jax.random.PRNGKey(0), jnp.zeros((1, 8, 8, 3)))
  with pytest.raises(ValueError, match="cls token"):
    vit.pool(out["tokens"], "cls", has_cls=False)


@pytest.mark.parametrize("decoder_ratio", [0.0, 0.5])
def test_token_selection(decoder_ratio):
  """Tube masks: int(0.9 h w) per time slice, the same slice over time; the encoder keeps the
  visible tokens in position order (x[~mask]); the decoder predicts the masked ones (V1) or
  every token the running cell keeps (V2), and the loss weighs the masked ones among them."""
  c = tiny_config("videomae")
  c.input.data.num_frames = 8
  c.videomae.decoder_mask_ratio = decoder_ratio
  m = methods.get(c)                                   # 32 px, patch 4: 4 x 8 x 8 tokens
  mask, keep, dec = (np.asarray(a) for a in m.masks(jax.random.PRNGKey(3), 5))
  grid = mask.reshape(5, 4, 8, 8)
  np.testing.assert_array_equal(grid.sum((2, 3)), np.full((5, 4), int(0.9 * 64)))
  assert np.all(grid == grid[:, :1]) and not np.array_equal(grid[0], grid[1])
  assert keep.shape == (5, 4 * 7) and m.num_visible == 28
  for b in range(5):
    np.testing.assert_array_equal(keep[b], np.flatnonzero(~mask[b]))
  if decoder_ratio == 0:
    for b in range(5):
      np.testing.assert_array_equal(dec[b], np.flatnonzero(mask[b]))
  else:
    assert dec.shape == (5, 256 // 2) and m.num_decoded == 128
    from mim_jax.data import video
    cells = np.asarray(video.running_cell_mask(5, 4, 8, 8, 0.5, rng=jax.random.split(
        jax.random.PRNGKey(3))[1])).reshape(5, 256)
    for b in range(5):
      np.testing.assert_array_equal(dec[b], np.flatnonzero(~cells[b]))
      # Each time slice decodes half its 64 positions, visible ones included.
      np.testing.assert_array_equal(np.bincount(dec[b] // 64, minlength=4), [32] * 4)
    # Of a slice's 32 decoded positions at most its 7 visible ones are not masked.
    assert np.all(mask[np.arange(5)[:, None], dec].sum(1) >= 4 * (32 - 7))


def official_target(clips_nchw, t, p, normalize):
  """engine_for_pretraining.py's labels from normalised videos [B, C, T, H, W]: unnormalise,
  rearrange 'b c (t p0) (h p1) (w p2) -> b (t h w) (p0 p1 p2) c', standardise over the cube's
  pixels per channel with the unbiased std + 1e-6, flatten '(p c)'."""
  x = clips_nchw * STD[None, :, None, None, None] + MEAN[None, :, None, None, None]
  b, c, tt, hh, ww = x.shape
  x = x.reshape(b, c, tt // t, t, hh // p, p, ww // p, p)
  x = x.transpose(0, 2, 4, 6, 3, 5, 7, 1).reshape(b, -1, t * p * p, c)   # b (t h w) (p0 p1 p2) c
  if normalize:
    x = (x - x.mean(axis=-2, keepdims=True)) / (x.var(axis=-2, ddof=1, keepdims=True) ** 0.5 + 1e-6)
  return x.reshape(b, x.shape[1], -1)


@pytest.mark.parametrize("normalize", [True, False])
def test_target_is_the_official_rearrangement(normalize):
  rng = np.random.default_rng(1)
  clips = rng.normal(size=(2, 3, 4, 8, 12)).astype(np.float32)
  got = videomae.videomae_target(jnp.asarray(clips.transpose(0, 2, 3, 4, 1)), MEAN, STD, 2, 4,
                                 normalize)
  np.testing.assert_allclose(got, official_target(clips.astype(np.float64), 2, 4, normalize),
                             rtol=1e-4, atol=1e-4)


def _ln(x, scale, bias):
  mu = x.mean(-1, keepdims=True)
  return (x - mu) / np.sqrt(((x - mu) ** 2).mean(-1, keepdims=True) + 1e-6) * scale + bias


def _block(x, p, heads):
  """A VideoMAE Block (modeling_finetune.py) in NumPy: pre-norm attention with q and v biases
  (k's bias zero), exact GELU MLP."""
  n, d = x.shape
  a = p["attn"]
  y = _ln(x, p["norm1"]["scale"], p["norm1"]["bias"])
  qkv = y @ a["qkv_kernel"] + np.concatenate([a["q_bias"], np.zeros(d), a["v_bias"]])
  q, k, v = (qkv[:, i * d:(i + 1) * d].reshape(n, heads, d // heads).transpose(1, 0, 2) for i in range(3))
  att = q @ k.transpose(0, 2, 1) / math.sqrt(d // heads)
  att = np.exp(att - att.max(-1, keepdims=True))
  att = att / att.sum(-1, keepdims=True)
  o = (att @ v).transpose(1, 0, 2).reshape(n, d) @ a["proj"]["kernel"] + a["proj"]["bias"]
  x = x + o
  y = _ln(x, p["norm2"]["scale"], p["norm2"]["bias"]) @ p["mlp"]["fc1"]["kernel"] + p["mlp"]["fc1"]["bias"]
  y = 0.5 * y * (1 + erf(y / math.sqrt(2)))
  return x + y @ p["mlp"]["fc2"]["kernel"] + p["mlp"]["fc2"]["bias"]


@pytest.mark.parametrize("decoder_ratio", [0.0, 0.5])
def test_loss_equals_a_hand_computation(decoder_ratio):
  """The whole VideoMAE (V2) forward and loss in NumPy, written from the official code, on a
  tiny clip with the method's parameters and a given tube (and running-cell) mask."""
  c = small_config(decoder_mask_ratio=decoder_ratio)
  m = methods.get(c)
  rng = np.random.default_rng(2)
  params = jax.jit(m.init)(jax.random.PRNGKey(0), m.init_input())
  params = jax.tree.map(lambda a: np.asarray(a) + np.float32(0.05) * rng.standard_normal(
      a.shape, np.float32), params)                   # no zero biases / unit norms left
  clips = rng.normal(size=(2, 4, 8, 8, 3)).astype(np.float32)        # normalised clips
  spatial = np.array([[1, 0, 0, 1], [0, 1, 1, 0]], bool)               # 2 of 4 patches masked
  mask = np.repeat(spatial[:, None], 2, axis=1).reshape(2, 8)          # tube: same over time
  cells = np.array([[0, 1, 1, 0, 1, 0, 0, 1]] * 2, bool)                # decoder drops these
  keep = np.stack([np.flatnonzero(~r) for r in mask])
  dec = np.stack([np.flatnonzero(~r) for r in (cells if decoder_ratio else ~mask)])
  m.masks = lambda rng, batch: (jnp.asarray(mask), jnp.asarray(keep), jnp.asarray(dec))
  got, _ = jax.jit(m.loss)(params, {}, jnp.asarray(clips), jax.random.PRNGKey(1), 0)

  p = jax.tree.map(lambda a: np.asarray(a, np.float64), params)
  e, d = p["encoder"], p["decoder"]
  kernel = e["patch_embed"]["proj"]["kernel"]                          # (t p p c) rows
  torch_w = kernel.reshape(2, 4, 4, 3, 64).transpose(4, 3, 0, 1, 2)
  tokens = conv3d_tokens(clips.transpose(0, 4, 1, 2, 3).astype(np.float64), torch_w,
                         e["patch_embed"]["proj"]["bias"], 2, 4)
  tokens = tokens + official_sinusoid(8, 64)
  pos_d = official_sinusoid(8, 16).astype(np.float64)
  target = official_target(clips.transpose(0, 4, 1, 2, 3).astype(np.float64), 2, 4, True)
  total = count = 0.0
  for b in range(2):
    x = tokens[b][~mask[b]]                                            # x[~mask]
    x = _block(x, e["encoder"]["block00"], 2)
    x = _ln(x, e["encoder"]["norm"]["scale"], e["encoder"]["norm"]["bias"])
    x = x @ d["encoder_to_decoder"]["kernel"]
    decode = ~cells[b] if decoder_ratio else mask[b]                   # decode_vis
    full = np.concatenate([x + pos_d[~mask[b]], d["mask_token"][0] + pos_d[decode]])
    y = _ln(full[-decode.sum():], d["norm"]["scale"], d["norm"]["bias"])  # depth-0 decoder
    pred = y @ d["head"]["kernel"] + d["head"]["bias"]
    per_token = ((pred - target[b][decode]) ** 2).mean(-1)
    weight = mask[b][decode]                                           # cal_loss_mask
    total += (per_token * weight).sum()
    count += weight.sum()
  np.testing.assert_allclose(float(got), total / count, rtol=2e-4)


def test_one_crop_and_flip_per_clip():
  """A clip is cut by one box and mirrored by one flip: each frame equals the per-frame crop
  with that clip's box and flip (drawn as random_resized_crop_flip draws them)."""
  c = tiny_config("videomae")
  rng = np.random.default_rng(4)
  clips = jnp.asarray(rng.integers(0, 256, (6, 3, 20, 24, 3)), jnp.uint8)
  key = jax.random.PRNGKey(6)                         # flips 3 of the 6 clips
  a = c.input.aug
  k_box, k_flip = jax.random.split(key)
  boxes = augment.sample_crop_boxes(k_box, 6, 20, 24, scale=tuple(a.crop_scale), ratio=tuple(a.crop_ratio))
  per_frame = jax.jit(lambda x, f: augment.apply_hflip(augment.crop_and_resize(x, boxes, 32), f))
  for hflip in (False, True):                           # the flip, too, is one per clip
    c.input.aug.hflip = hflip
    got = jax.jit(lambda x: preprocess.crop_or_resize(key, x, c.input, on_device_aug=True))(clips)
    assert got.shape == (6, 3, 32, 32, 3)
    flip = jax.random.bernoulli(k_flip, 0.5, (6,)) if hflip else jnp.zeros((6,), bool)
    assert int(flip.sum()) == (3 if hflip else 0)
    for f in range(3):
      np.testing.assert_allclose(got[:, f], per_frame(clips[:, f], flip), rtol=1e-5, atol=1e-3)
  # Evaluation: every frame resized alike, then normalised with the 3-channel mean / std.
  ev = preprocess.preprocess(None, clips, c.input, False, train=False)
  want = augment.normalize(jax.image.resize(clips[:, 1].astype(jnp.float32), (6, 32, 32, 3), "bilinear"))
  np.testing.assert_allclose(ev[:, 1], want, rtol=1e-5, atol=1e-4)


def run_config():
  c = tiny_config("videomae", total_steps=2, ckpt_every=2)
  c.input.data.num_frames = 4
  c.model.depth = 1
  c.videomae.decoder = dict(width=32, depth=1, heads=2)
  c.evals.linear.enabled = False
  c.evals.knn.update(max_train=200, max_eval=100)
  return c


@pytest.fixture(scope="module")
def two_step_run(tmp_path_factory):
  d = str(tmp_path_factory.mktemp("videomae_run"))
  train.train_and_evaluate(run_config(), d, progress=False, devices=jax.devices()[:1])
  return d


def test_two_steps_on_embedded_clips_give_knn_numbers(two_step_run):
  import json
  import os
  ls = losses(two_step_run)
  assert sorted(ls) == [1, 2] and all(np.isfinite(v) for v in ls.values())
  with open(os.path.join(two_step_run, "eval_results.json")) as f:
    knn = json.load(f)["knn"]
  assert 0 < knn["online/top1"] <= 100 and knn["step"] == 2
  assert knn["protocol"]["pooling"] == "mean" and knn["protocol"]["num_queries"] == 100
  with open(os.path.join(two_step_run, "eval_results.json")) as f:
    rec = json.load(f)["reconstruction"]
  from PIL import Image
  picture = np.asarray(Image.open(rec["latest_path"]))
  p = rec["protocol"]          # 2 rows of 3 filmstrips of 4 frames, 32 px each at scale 3
  assert p["frames_per_cell"] == 4 and 0.8 < p["masked_fraction"] < 1.0
  cell = 32 * p["scale"]
  assert picture.shape[:2] == (p["header"] + 2 + 2 * (cell + 2), 2 + 3 * (4 * cell + 2))


def test_reconstruct_pastes_predictions_into_the_hidden_cubes(monkeypatch):
  c = small_config()
  m = methods.get(c)
  clips = jax.random.normal(jax.random.PRNGKey(0), (2, 4, 8, 8, 3))
  cubes = videomae.to_cubes(clips, 2, 4)
  np.testing.assert_array_equal(videomae.from_cubes(cubes, clips.shape, 2, 4), clips)
  params = m.init(jax.random.PRNGKey(1), clips)
  _, mask, decode_ids = m.forward(params, clips, jax.random.PRNGKey(2))
  # a perfect prediction (the normalised target itself) gives the clips back
  target = videomae.videomae_target(clips, MEAN, STD, 2, 4, True)
  perfect = jnp.take_along_axis(target, decode_ids[..., None], axis=1)
  monkeypatch.setattr(type(m), "forward", lambda self, p, x, r, train=True: (perfect, mask, decode_ids))
  out = m.reconstruct(params, None, clips, jax.random.PRNGKey(2))
  np.testing.assert_allclose(out["reconstruction"], clips, atol=1e-4)
  hidden = np.asarray(mask).reshape(2, 2, 2, 2)                 # (t, h, w) cubes of 2 x 4 x 4
  shown = videomae.to_cubes(out["masked"] * STD + MEAN, 2, 4)   # back to [0, 1] levels
  np.testing.assert_allclose(np.abs(shown).max(axis=(2, 3)) * hidden.reshape(2, -1), 0, atol=1e-5)
  np.testing.assert_allclose(out["masked"][~np.repeat(np.repeat(np.repeat(
      hidden, 2, 1), 4, 2), 4, 3)], clips[~np.repeat(np.repeat(np.repeat(hidden, 2, 1), 4, 2), 4, 3)],
      atol=1e-5)


def test_sharded_steps_equal_one_device(two_step_run):
  c = run_config()
  c.evals = {}
  tr = train.Trainer.create(c, devices=jax.devices()[:8])
  got = [float(tr.step()["loss"]) for _ in range(2)]
  want = losses(two_step_run)
  np.testing.assert_allclose(got, [want[1], want[2]], rtol=2e-5)
  data_line = train.run_header(tr, "/tmp/w", 0)[1]        # the run says what it reads
  assert "training clips" in data_line and "images" not in data_line, data_line


# ----------------------------------------------------------------------------------------------
# Fine-tuning on clips: VideoMAE's augmentation drawn per clip, the head on every token.


def test_finetune_aug_draws_once_per_clip():
  from mim_jax.data import finetune_aug as fa
  # Jitted as the train step runs them (eagerly, every op of RandAugment compiles on its own).
  rand_augment = jax.jit(functools.partial(fa.rand_augment, num_layers=4, magnitude=7.0, prob=1.0))
  random_erasing = jax.jit(functools.partial(fa.random_erasing, prob=1.0))
  mixup_cutmix = jax.jit(fa.mixup_cutmix, static_argnums=3)
  rng = np.random.default_rng(0)
  clips = jnp.asarray(rng.uniform(size=(4, 3, 8, 8, 3)), jnp.float32)
  key = jax.random.PRNGKey(3)
  # RandAugment: frame f of the clips = RandAugment of the frames f alone with the same key
  # (the draws are per clip, so they do not depend on T); the frames of a clip differ.
  ra = rand_augment(key, clips)
  for f in range(3):
    np.testing.assert_allclose(ra[:, f], rand_augment(key, clips[:, f]), atol=1e-6)
  # Random erasing: each frame on its own, in (clip, frame) order.
  er = random_erasing(key, clips)
  np.testing.assert_array_equal(er, random_erasing(key, clips.reshape(12, 8, 8, 3)).reshape(clips.shape))
  erased = np.asarray(er != clips).any(-1)             # [B, T, H, W]
  assert not all((erased[0, f] == erased[0, 0]).all() for f in range(3))
  # Mixup / CutMix: whole clips with one lam and one box for every frame.
  for seed in range(6):
    k = jax.random.PRNGKey(seed)
    mixed, targets, info = mixup_cutmix(k, clips, jnp.arange(4), 5)
    for f in range(3):
      want, want_t, _ = mixup_cutmix(k, clips[:, f], jnp.arange(4), 5)
      np.testing.assert_allclose(mixed[:, f], want, atol=1e-6)
      np.testing.assert_allclose(targets, want_t, atol=1e-6)


def test_head_and_probe_skip_a_cls_token_only_where_there_is_one():
  from mim_jax import models
  from mim_jax.evaluators import attentive_probe
  from mim_jax.methods import finetune
  assert models.prefix_tokens(tiny_config("mae").model) == 1
  assert models.prefix_tokens(run_config().model) == 0                # VideoMAE's ViT
  assert models.prefix_tokens(tiny_config("mae", **{"model.name": "resnet"}).model) == 0
  tokens = np.arange(2 * 5 * 4, dtype=np.float32).reshape(2, 5, 4)
  assert attentive_probe.select_tokens(tokens, "patches", 0).shape == (2, 5, 4)
  assert attentive_probe.select_tokens(tokens, "patches", 1).shape == (2, 4, 4)
  head = finetune.ClassifierHead(3, "mean", prefix=0)
  params = head.init(jax.random.PRNGKey(0), tokens)
  feats, _ = head.apply(params, tokens)
  mean = tokens.mean(1)
  want = (mean - mean.mean(-1, keepdims=True)) / np.sqrt(mean.var(-1, keepdims=True) + 1e-6)
  np.testing.assert_allclose(feats, want, rtol=1e-5, atol=1e-5)      # fc_norm starts at 1, 0
  m = methods.get(apply_ft(tiny_config("finetune")))
  assert m.head.prefix == 0


def apply_ft(c):
  """A fine-tune config for run_config()'s clips and ViT (configs/finetune.py:clips shrunk)."""
  from helpers import load_config
  ft = load_config("finetune", "clips")
  r = run_config()
  ft.model = r.model
  ft.input.update(batch_size=r.input.batch_size)
  ft.input.data.num_frames = 4
  ft.total_steps, ft.log_every, ft.ckpt_every = 2, 1, 2
  ft.evals.classifier.max_eval = 64
  return ft


def test_finetune_on_clips_from_the_pretraining_run(two_step_run, tmp_path):
  import json
  c = apply_ft(None)
  c.finetune.pretrained = two_step_run
  train.train_and_evaluate(c, str(tmp_path), progress=False, devices=jax.devices()[:1])
  ls = losses(str(tmp_path))
  assert sorted(ls) == [1, 2] and all(np.isfinite(v) for v in ls.values())
  with open(tmp_path / "eval_results.json") as f:
    res = json.load(f)["classifier"]
  assert 0 <= res["top1"] <= 100 and res["step"] == 2
  # the encoder it starts from is the pretraining run's, and a model that differs says so
  c.model.tubelet = 1
  with pytest.raises(Exception, match="model.tubelet: 2 vs 1"):
    methods.get(c).init_variables(jax.random.PRNGKey(0),
                                  jnp.zeros((1, 4, 32, 32, 3), jnp.float32))
