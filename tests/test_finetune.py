"""Fine-tuning with MAE's recipe: layer decay, timm's augmentations against their definitions,
the pretrained encoder loaded exactly, the classifier evaluator and a tiny run."""
import json
import math
import os

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import pytest
from PIL import Image, ImageEnhance, ImageOps

from helpers import load_config, tiny_config
from mim_jax import checkpointing, evaluators, methods, optim, train
from mim_jax.data import finetune_aug as fa
from mim_jax.methods import finetune
from mim_jax.models import vit

KEY = jax.random.PRNGKey(0)


# ----------------------------------------------------------------------------- layer decay

def _names(path):
  return "/".join(str(getattr(k, "key", k)) for k in path)


def test_layer_decay_factors_follow_maes_formula():
  c = tiny_config("finetune")
  assert c.model.depth == 2
  p = jax.eval_shape(methods.get(c).init, KEY, jnp.zeros((1, 32, 32, 3)))
  factors = optim.layer_decay_factors(p, 0.75)
  d, seen = 0.75, set()
  for path, f in jax.tree_util.tree_flatten_with_path(factors)[0]:
    name = _names(path)
    # layer id: 0 embeddings, i + 1 block i, L + 1 = 3 the rest; factor d ** (3 - id)
    if name.startswith(("encoder/patch_embed", "encoder/cls_token", "encoder/pos_embed")):
      want = d ** 3
    elif name.startswith("encoder/encoder/block00"):
      want = d ** 2
    elif name.startswith("encoder/encoder/block01"):
      want = d ** 1
    else:
      assert name.startswith(("encoder/encoder/norm", "head/fc_norm", "head/fc")), name
      want = 1.0
    assert f == pytest.approx(want, rel=1e-12), name
    seen.add(want)
  assert seen == {d ** 3, d ** 2, d, 1.0}
  mask = methods.get(c).decay_mask(p)
  assert mask["encoder"]["pos_embed"] is False and mask["encoder"]["cls_token"] is False
  assert mask["head"]["fc"]["kernel"] is True and mask["head"]["fc"]["bias"] is False
  assert mask["encoder"]["encoder"]["block00"]["attn"]["qkv_kernel"] is True


def test_layer_decay_scales_one_adamw_step_by_decay_power():
  r = np.random.default_rng(0)
  params = {"encoder": {"patch_embed": {"kernel": r.normal(size=(3, 4))},
                        "encoder": {"block00": {"w": r.normal(size=(4, 4))},
                                    "block01": {"w": r.normal(size=(4, 4))}}},
            "head": {"kernel": r.normal(size=(4, 2))}}
  params = jax.tree.map(jnp.asarray, params)
  grads = jax.tree.map(lambda x: jnp.asarray(r.normal(size=x.shape)), params)
  mask = jax.tree.map(lambda x: True, params)
  base = dict(name="adamw", weight_decay=0.05, b1=0.9, b2=0.999)
  decay = 0.65
  updates = []
  for ld in (1.0, decay):
    tx = optim.make_optimizer(ml_collections.ConfigDict(dict(base, layer_decay=ld)), lambda s: 1e-3, mask)
    updates.append(tx.update(grads, tx.init(params), params)[0])
  plain, decayed = updates
  L = 2
  np.testing.assert_allclose(decayed["encoder"]["encoder"]["block00"]["w"],
                             decay ** L * plain["encoder"]["encoder"]["block00"]["w"], rtol=1e-6)
  np.testing.assert_allclose(decayed["encoder"]["patch_embed"]["kernel"],
                             decay ** (L + 1) * plain["encoder"]["patch_embed"]["kernel"], rtol=1e-6)
  np.testing.assert_array_equal(decayed["head"]["kernel"], plain["head"]["kernel"])
  with pytest.raises(ValueError, match="layer_decay"):
    optim.make_optimizer(ml_collections.ConfigDict(dict(base, layer_decay=1.5)), lambda s: 1e-3, mask)


# ----------------------------------------------------------------------------- mixup / cutmix

def test_mixup_mixes_images_and_smoothed_targets_with_one_lam():
  labels = jnp.asarray([0, 3, 1, 2, 2, 4])
  images = jnp.arange(6, dtype=jnp.float32)[:, None, None, None] * jnp.ones((6, 4, 4, 3))
  out, targets, aux = fa.mixup_cutmix(jax.random.PRNGKey(3), images, labels, 5, mixup_alpha=0.8,
                                      cutmix_alpha=0.0, smoothing=0.1)
  lam = float(aux["lam"])
  assert 0.0 < lam < 1.0
  np.testing.assert_allclose(out, lam * images + (1 - lam) * images[::-1], rtol=1e-6)
  eye = np.eye(5)
  y = eye[np.asarray(labels)] * 0.9 + 0.02                  # on = 1 - 0.1 + 0.1/5, off = 0.1/5
  np.testing.assert_allclose(targets, lam * y + (1 - lam) * y[::-1], rtol=1e-6)
  np.testing.assert_allclose(np.sum(targets, axis=1), 1.0, rtol=1e-6)


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_cutmix_lam_is_one_minus_the_pasted_area(seed):
  b, h, w = 4, 8, 12
  images = jnp.arange(b, dtype=jnp.float32)[:, None, None, None] * jnp.ones((b, h, w, 3))
  labels = jnp.asarray([0, 1, 2, 3])
  out, targets, aux = fa.mixup_cutmix(jax.random.PRNGKey(seed), images, labels, 4, mixup_alpha=0.0,
                                      cutmix_alpha=1.0, smoothing=0.0)
  pasted = np.asarray(out[0, :, :, 0]) == b - 1             # image 0 receives image 3's box
  lam = float(aux["lam"])
  assert lam == pytest.approx(1.0 - pasted.sum() / (h * w), abs=1e-6)
  rows, cols = np.nonzero(pasted)
  if pasted.any():                                          # one rectangle
    assert pasted.sum() == (np.ptp(rows) + 1) * (np.ptp(cols) + 1)
  np.testing.assert_allclose(targets[0], [lam, 0, 0, 1 - lam], atol=1e-6)
  np.testing.assert_allclose(np.sum(targets, axis=1), 1.0, rtol=1e-6)


def test_cutmix_box_follows_timm_rand_bbox():
  """cut = int(side * sqrt(1 - lam)); the box is [c - cut//2, c + cut//2) clipped, for some
  centre c in [0, side)."""
  h, w = 10, 16
  for i in range(20):
    lam = 0.05 * i
    (yl, yh, xl, xh), corrected = fa.cutmix_box(jax.random.PRNGKey(i), jnp.float32(lam), h, w)
    box = tuple(map(int, (yl, yh, xl, xh)))
    cut_h, cut_w = int(h * math.sqrt(1 - lam)), int(w * math.sqrt(1 - lam))
    ys = {(min(max(c - cut_h // 2, 0), h), min(max(c + cut_h // 2, 0), h)) for c in range(h)}
    xs = {(min(max(c - cut_w // 2, 0), w), min(max(c + cut_w // 2, 0), w)) for c in range(w)}
    assert box[:2] in ys and box[2:] in xs, (lam, box)
    assert float(corrected) == pytest.approx(1 - (box[1] - box[0]) * (box[3] - box[2]) / (h * w), abs=1e-6)


# ----------------------------------------------------------------------------- RandAugment ops

def _tiny_image():
  img = np.random.default_rng(0).integers(20, 230, size=(7, 9, 3), dtype=np.uint8)
  img[0, 0] = 5                                             # distinct extremes per channel
  return img


def _ours(fn, img, *args):
  x = jnp.asarray(img[None], jnp.float32)
  return np.asarray(fn(x, *[jnp.asarray([a]) for a in args])[0]).astype(int)


POINT_OPS = [
    ("auto_contrast", lambda im: ImageOps.autocontrast(im), fa.auto_contrast, ()),
    ("equalize", lambda im: ImageOps.equalize(im), fa.equalize, ()),
    ("invert", lambda im: ImageOps.invert(im), fa.invert, ()),
] + [(f"posterize{b}", lambda im, b=b: ImageOps.posterize(im, b), fa.posterize, (b,)) for b in (1, 2, 4, 7, 8)] \
  + [(f"solarize{t}", lambda im, t=t: ImageOps.solarize(im, t), fa.solarize, (t,)) for t in (0, 26, 128, 256)] \
  + [(f"{n}{f}", lambda im, cls=cls, f=f: cls(im).enhance(f), fn, (f,))
     for n, cls, fn in (("color", ImageEnhance.Color, fa.color), ("contrast", ImageEnhance.Contrast, fa.contrast),
                        ("brightness", ImageEnhance.Brightness, fa.brightness),
                        ("sharpness", ImageEnhance.Sharpness, fa.sharpness))
     for f in (0.1, 0.37, 1.55, 1.9)]


@pytest.mark.parametrize("name,pil_op,op,args", POINT_OPS, ids=[o[0] for o in POINT_OPS])
def test_point_op_equals_pil_on_a_tiny_image(name, pil_op, op, args):
  img = _tiny_image()
  np.testing.assert_array_equal(_ours(op, img, *args), np.asarray(pil_op(Image.fromarray(img))))


def test_blend_under_jit_equals_pil_where_a_fused_multiply_add_would_not():
  """Contrast 1.35 of level 46 against a grey of 126: PIL gives int(126 + fl(1.35 * -80)) = 18;
  a fused multiply-add under jit would give 17."""
  img = np.full((4, 4, 3), 46, np.uint8)
  img[0, 0] = (255, 255, 255)   # PIL's grey: int(mean luma + 0.5)
  want = np.asarray(ImageEnhance.Contrast(Image.fromarray(img)).enhance(1.35))
  x = jnp.asarray(img, jnp.float32)[None]
  mean = jnp.floor(jnp.mean(fa.luma(x), axis=(1, 2, 3), keepdims=True) + 0.5)
  got = jax.jit(fa.blend)(mean, x, jnp.asarray([1.35]))
  np.testing.assert_array_equal(np.asarray(got[0]).astype(np.uint8), want)
  flat = jax.jit(fa.blend)(jnp.full((1, 1, 1, 3), 126.0), jnp.full((1, 1, 1, 3), 46.0), jnp.asarray([1.35]))
  assert float(flat[0, 0, 0, 0]) == 18.0


def test_posterize_zero_bits_and_solarize_add_follow_their_definitions():
  img = _tiny_image()
  assert not _ours(fa.posterize, img, 0).any()             # keep 0 bits: black (timm at m=10)
  want = np.where(img < 128, np.minimum(img.astype(int) + 99, 255), img)
  np.testing.assert_array_equal(_ours(fa.solarize_add, img, 99), want)


FILL = (124, 116, 104)
GEOMETRIC = [
    ("rotate13.7", lambda im: im.rotate(13.7, resample=Image.BILINEAR, fillcolor=FILL),
     lambda h, w: fa.rotate_matrix(jnp.asarray([13.7]), h, w)),
    ("rotate-30", lambda im: im.rotate(-30, resample=Image.BILINEAR, fillcolor=FILL),
     lambda h, w: fa.rotate_matrix(jnp.asarray([-30.0]), h, w)),
    ("shear_x", lambda im: im.transform(im.size, Image.AFFINE, (1, 0.27, 0, 0, 1, 0), resample=Image.BILINEAR, fillcolor=FILL),
     lambda h, w: jnp.asarray([[1, 0.27, 0, 0, 1, 0]])),
    ("shear_y", lambda im: im.transform(im.size, Image.AFFINE, (1, 0, 0, -0.27, 1, 0), resample=Image.BILINEAR, fillcolor=FILL),
     lambda h, w: jnp.asarray([[1, 0, 0, -0.27, 1, 0]])),
    ("translate_x", lambda im: im.transform(im.size, Image.AFFINE, (1, 0, 3.645, 0, 1, 0), resample=Image.BILINEAR, fillcolor=FILL),
     lambda h, w: jnp.asarray([[1, 0, 3.645, 0, 1, 0]])),
    ("translate_y", lambda im: im.transform(im.size, Image.AFFINE, (1, 0, 0, 0, 1, -2.835), resample=Image.BILINEAR, fillcolor=FILL),
     lambda h, w: jnp.asarray([[1, 0, 0, 0, 1, -2.835]])),
]


@pytest.mark.parametrize("name,pil_op,coeffs", GEOMETRIC, ids=[g[0] for g in GEOMETRIC])
def test_geometric_op_equals_pil_bilinear(name, pil_op, coeffs):
  """PIL's affine with bilinear resampling and fill colour, truncated to 8 bit; PIL computes
  coordinates in double, we in float32: at most one level, on at most 5% of the pixels."""
  img = _tiny_image()
  ours = np.floor(np.asarray(fa.affine(jnp.asarray(img[None], jnp.float32), coeffs(7, 9), FILL)[0])).astype(int)
  ref = np.asarray(pil_op(Image.fromarray(img))).astype(int)
  assert np.abs(ours - ref).max() <= 1
  assert np.mean(ours != ref) <= 0.05
  assert (ref == np.asarray(FILL)).all(axis=-1).any()      # the fill colour appears


def test_level_args_at_magnitude_nine_are_timms():
  a = fa._level_args(jnp.asarray([9.0, 9.0]), jnp.asarray([1.0, -1.0]), 32, 40)
  np.testing.assert_allclose(a["rotate"], [27.0, -27.0], rtol=1e-6)
  np.testing.assert_array_equal(a["posterize_bits"], [4 - 3, 4 - 3])         # 4 - int(3.6)
  np.testing.assert_array_equal(a["solarize_threshold"], [256 - 230] * 2)    # 256 - int(230.4)
  np.testing.assert_array_equal(a["solarize_add"], [99, 99])                 # int(99.0)
  np.testing.assert_allclose(a["enhance"], [1.81, 0.19], rtol=1e-6)
  np.testing.assert_allclose(a["shear"], [0.27, -0.27], rtol=1e-6)
  np.testing.assert_allclose(a["translate_x"], [0.405 * 40, -0.405 * 40], rtol=1e-6)
  np.testing.assert_allclose(a["translate_y"], [0.405 * 32, -0.405 * 32], rtol=1e-6)


def test_rand_augment_layer_applies_each_images_chosen_op():
  img = _tiny_image()
  x = jnp.asarray(np.stack([img] * 4), jnp.float32)
  ops = jnp.asarray([fa.RAND_INCREASING_OPS.index(n) for n in ("Invert", "Equalize", "ShearX", "Invert")])
  apply = jnp.asarray([True, True, True, False])
  layer = jax.jit(lambda *a: fa.rand_augment_layer(*a, FILL))
  out = np.asarray(layer(x, ops, apply, jnp.full((4,), 9.0), jnp.ones((4,))))
  np.testing.assert_array_equal(out[0], 255 - img)
  np.testing.assert_array_equal(out[1], np.asarray(ImageOps.equalize(Image.fromarray(img))))
  sheared = np.floor(np.asarray(fa.affine(x[:1], jnp.asarray([[1, 0.27, 0, 0, 1, 0]]), FILL)[0]))
  np.testing.assert_allclose(out[2], sheared, atol=1e-4)
  np.testing.assert_array_equal(out[3], img)                # not applied (p = 0.5 draw)


# ----------------------------------------------------------------------------- random erasing

def test_random_erasing_changes_exactly_one_timm_box_per_erased_image():
  b, h, w = 400, 8, 10
  x = jnp.full((b, h, w, 3), 7.0)
  erase = jax.jit(lambda k, x, p: fa.random_erasing(k, x, prob=p, mode="pixel"))
  out = np.asarray(erase(jax.random.PRNGKey(1), x, 0.25))
  changed = (out != 7.0)
  erased = 0
  for i in range(b):
    m = changed[i].any(-1)
    if not m.any():
      continue
    erased += 1
    assert (changed[i].all(-1) == m).all()                  # every channel ('pixel' noise)
    rows, cols = np.nonzero(m)
    bh, bw = np.ptp(rows) + 1, np.ptp(cols) + 1
    assert m.sum() == bh * bw and bh < h and bw < w         # one box, smaller than the image
  assert 70 <= erased <= 130                                # p = 0.25 of 400 images
  np.testing.assert_array_equal(np.asarray(erase(jax.random.PRNGKey(1), x, 0.0)), np.asarray(x))
  boxes = np.asarray(jax.jit(fa.erase_boxes, static_argnums=(1, 2, 3))(jax.random.PRNGKey(0), 400, 8, 10))
  found, top, left, bh, bw = boxes.T
  # h = round(sqrt(A r)), w = round(sqrt(A / r)), A ~ U(0.02, 1/3) * 80 px: 10 attempts at h < 8,
  # w < 10 practically always find one; the box lies inside the image.
  assert found.all() and (bh < 8).all() and (bw < 10).all()
  assert (top >= 0).all() and (left >= 0).all() and (top + bh <= 8).all() and (left + bw <= 10).all()
  assert top.min() == 0 and (top + bh).max() == 8 and left.min() == 0 and (left + bw).max() == 10


# ----------------------------------------------------------------------------- evaluator

def test_classifier_evaluator_counts_top1_and_top5():
  logits = np.zeros((6, 7), np.float32)
  labels = np.asarray([0, 1, 2, 3, 4, 5])
  for i, order in enumerate([[0], [2, 1], [3, 4, 5, 6, 2], [0, 1, 2, 4, 5, 6, 3], [4], [1, 2, 3, 4, 6, 5, 0]]):
    logits[i, order] = np.arange(len(order), 0, -1)        # descending scores in that order
  # rank of the label: 1, 2, 5, 7, 1, 6 -> top-1 2/6, top-5 4/6

  def batches(split, bs, limit=None):
    assert split == "eval"
    yield np.arange(6)[:, None, None, None].astype(np.uint8) * np.ones((1, 2, 2, 3), np.uint8), labels

  def encode(images):
    idx = images[:, 0, 0, 0].astype(int)
    return {"online": np.zeros((len(idx), 3), np.float32), "logits": logits[idx]}

  ctx = evaluators.EvalContext(encode=encode, batches=batches, num_classes=7, step=5)
  res = evaluators.build("classifier", {"type": "classifier", "pooling": "mean"}).run(ctx)
  assert res["top1"] == pytest.approx(100 * 2 / 6) and res["top5"] == pytest.approx(100 * 4 / 6)
  z = logits - logits.max(1, keepdims=True)
  ce = -(z - np.log(np.exp(z).sum(1, keepdims=True)))[np.arange(6), labels].mean()
  assert res["loss"] == pytest.approx(ce, rel=1e-6)
  assert res["protocol"]["num_images"] == 6 and res["protocol"]["step"] == 5
  assert res["protocol"]["pooling"] == "mean"


# ----------------------------------------------------------------------------- configs

def test_imagenet_presets_are_the_official_recipes():
  b = load_config("finetune", "imagenet_base")
  assert optim.peak_lr(b.optim, b.input.batch_size) == pytest.approx(5e-4 * 1024 / 256)
  assert (b.optim.layer_decay, b.total_epochs, b.optim.warmup_epochs, b.model.drop_path) == (0.65, 100, 5, 0.1)
  assert (b.optim.b1, b.optim.b2, b.optim.weight_decay, b.optim.clip_grad) == (0.9, 0.999, 0.05, 0.0)
  assert b.optim.min_lr * b.input.batch_size / 256 == pytest.approx(1e-6)
  assert tuple(b.input.aug.crop_scale) == (0.08, 1.0) and b.finetune.num_classes == 1000
  a = b.finetune.aug
  assert (a.ra_magnitude, a.ra_magnitude_std, a.ra_num_layers, a.reprob, a.remode) == (9, 0.5, 2, 0.25, "pixel")
  assert (a.mixup, a.cutmix, a.mixup_prob, a.mixup_switch_prob, a.smoothing) == (0.8, 1.0, 1.0, 0.5, 0.1)
  large = load_config("finetune", "imagenet_large")
  assert optim.peak_lr(large.optim, large.input.batch_size) == pytest.approx(1e-3 * 1024 / 256)
  assert (large.optim.layer_decay, large.total_epochs, large.model.drop_path, large.model.variant) == (0.75, 50, 0.2, "large")
  for c in (b, large):
    assert [n for n, e in c.evals.items() if e.enabled] == ["classifier"]
    assert methods.get(c).name == "finetune"


@pytest.mark.parametrize("preset,pretrain", [("", ""), ("cifar10", "cifar10"), ("imagenet_base", "imagenet"),
                                            ("clips", "videomae")])
def test_finetune_model_matches_its_pretraining_preset(preset, pretrain):
  if pretrain == "videomae":
    ft, pre = load_config("finetune", preset), load_config("videomae")
    assert ft.input.data.num_frames == pre.input.data.num_frames
  else:
    ft, pre = load_config("finetune", preset), load_config("mae", pretrain)
  for k in finetune._ARCH_KEYS["vit"]:
    assert ft.model.get(k) == pre.model.get(k), k
  assert ft.input.image_size == pre.input.image_size
  assert ft.input.data.holdout_per_class == pre.input.data.holdout_per_class


# ----------------------------------------------------------------------------- pretrained runs

@pytest.fixture(scope="module")
def pretrain_dir(tmp_path_factory):
  """A tiny MAE pretraining workdir written by the trainer's own pieces (config.json and an
  Orbax checkpoint of its train state), its online encoder moved off the initialisation and
  its EMA encoder different from it; yields (workdir, saved state)."""
  d = str(tmp_path_factory.mktemp("mae_pretrain"))
  c = tiny_config("mae")
  c.ema.enabled = True
  tr = train.Trainer.create(c, devices=jax.devices()[:1])
  noise = jax.tree.map(lambda x: 0.01 * jnp.ones_like(x), tr.state["params"]["encoder"])
  online = jax.tree.map(jnp.add, tr.state["params"]["encoder"], noise)
  ema = jax.tree.map(lambda x: 0.5 * x, online)
  state = dict(tr.state, step=jnp.asarray(3, jnp.int32),
               params={**tr.state["params"], "encoder": online}, method_state={"ema_encoder": ema})
  ckpt = checkpointing.Checkpointer(d, keep=2)
  ckpt.save(3, state, tr.loader, {"model": tr.method.describe(), "step": 3}, force=True)
  ckpt.close()
  with open(os.path.join(d, "config.json"), "w") as f:
    f.write(c.to_json_best_effort(indent=2))
  return d, jax.device_get(state)


def test_pretrained_encoder_is_loaded_exactly(pretrain_dir):
  d, saved = pretrain_dir
  want = {"online": saved["params"]["encoder"], "ema": saved["method_state"]["ema_encoder"]}
  for which in ("online", "ema"):
    c = tiny_config("finetune", **{"finetune.pretrained": d, "finetune.pretrained_encoder": which})
    got = jax.device_get(jax.jit(methods.get(c).init)(KEY, jnp.zeros((2, 32, 32, 3)))["encoder"])
    table = vit.sincos_2d(64, 8, cls_token=True)[None]
    np.testing.assert_array_equal(got.pop("pos_embed"), table)   # learnable, from the sin-cos table
    assert jax.tree.structure(got) == jax.tree.structure(want[which])
    jax.tree.map(np.testing.assert_array_equal, got, want[which])


def test_pretrained_model_mismatch_is_a_one_line_error(pretrain_dir):
  c = tiny_config("finetune", **{"finetune.pretrained": pretrain_dir[0]})
  c.model.depth = 3
  with pytest.raises(finetune.PretrainedMismatchError, match=r"model.depth: 2 vs 3.*set the fine-tune config"):
    jax.eval_shape(methods.get(c).init, KEY, jnp.zeros((1, 32, 32, 3)))
  init = {"cls_token": np.zeros((1, 1, 8)), "pos_embed": np.zeros((1, 5, 8))}
  with pytest.raises(finetune.PretrainedMismatchError, match=r"cls_token \(1, 1, 4\) vs \(1, 1, 8\)"):
    finetune.merge_pretrained(init, {"cls_token": np.zeros((1, 1, 4))}, "W")


def test_an_extrema_encoder_gives_its_patch_embedding_and_plain_blocks():
  # ExtreMA's fine-tuning model keeps its patch embedding and plain blocks and drops the
  # class-attention head (ca_blocks, their cls token, their norm).
  zeros = jnp.zeros((1, 32, 32, 3))
  shapes = jax.eval_shape(methods.get(tiny_config("extrema")).init, KEY, zeros)["encoder"]
  rng = np.random.default_rng(0)
  loaded = jax.tree.map(lambda s: rng.normal(size=s.shape).astype(np.float32), shapes)
  assert {"ca_block00", "norm", "cls_token"} <= set(loaded)
  m = methods.get(tiny_config("finetune"))
  init = jax.device_get(m.init(KEY, zeros)["encoder"])
  merged = jax.device_get(jax.jit(lambda: finetune.merge_pretrained(init, loaded, "W"))())
  jax.tree.map(np.testing.assert_array_equal, merged["encoder"]["block01"], loaded["encoder"]["block01"])
  np.testing.assert_array_equal(merged["patch_embed"]["proj"]["kernel"], loaded["patch_embed"]["proj"]["kernel"])
  for kept in ("cls_token", "pos_embed"):       # the ViT's own, at their initial values
    np.testing.assert_array_equal(merged[kept], init[kept])
  jax.tree.map(np.testing.assert_array_equal, merged["encoder"]["norm"], init["encoder"]["norm"])
  del loaded["ca_block00"], loaded["ca_block01"]   # without the class-attention head: an error
  with pytest.raises(finetune.PretrainedMismatchError, match="unexpected norm"):
    finetune.merge_pretrained(init, loaded, "W")


@pytest.mark.parametrize("method", ["latent_mim", "pcae", "data2vec", "mae", "simmim"])
def test_each_pretraining_methods_online_encoder_fits_the_finetune_vit(method):
  # What load_pretrained_encoder reads (state.params.encoder) of a run of `method` with the same
  # config.model initialises every parameter of the fine-tune ViT, with no leftover (SimMIM's
  # mask token aside).
  zeros = jnp.zeros((1, 32, 32, 3))
  pre = tiny_config(method)
  shapes = jax.eval_shape(methods.get(pre).init, KEY, zeros)["encoder"]
  rng = np.random.default_rng(0)
  loaded = jax.tree.map(lambda s: rng.normal(size=s.shape).astype(np.float32), shapes)
  c = tiny_config("finetune")
  c.model.update({k: v for k, v in pre.model.items() if k in finetune._ARCH_KEYS["vit"] + ("init_values",)})
  init = jax.device_get(methods.get(c).init(KEY, zeros)["encoder"])
  merged = jax.device_get(jax.jit(lambda: finetune.merge_pretrained(init, loaded, "W"))())
  want = {k: v for k, v in loaded.items() if k != "mask_token"}
  if "pos_embed" not in want:                   # fixed sin-cos in pretraining: learnable here
    np.testing.assert_array_equal(merged.pop("pos_embed"), init["pos_embed"])
  assert jax.tree.structure(merged) == jax.tree.structure(want)
  jax.tree.map(np.testing.assert_array_equal, merged, want)


def test_finetune_run_from_pretrained_writes_classifier_accuracy(tmp_path, pretrain_dir):
  c = tiny_config("finetune", total_steps=2, ckpt_every=2, **{"finetune.pretrained": pretrain_dir[0]})
  c.evals.classifier.max_eval = 200
  summary = train.train_and_evaluate(c, str(tmp_path), progress=False)
  res = json.loads((tmp_path / "eval_results.json").read_text())
  assert set(res) == {"classifier"}
  cls = res["classifier"]
  assert cls["protocol"]["num_images"] == 200 and cls["protocol"]["step"] == 2
  assert cls["protocol"]["pooling"] == "mean"
  for k in ("top1", "top5"):
    assert (cls[k] * 2) == pytest.approx(round(cls[k] * 2), abs=1e-6)  # a count out of 200
  assert cls["top5"] >= cls["top1"]
  assert summary["eval"]["classifier/top1"] == cls["top1"]
  recs = [json.loads(l) for l in (tmp_path / "metrics.jsonl").read_text().splitlines()]
  assert all(math.isfinite(r["loss"]) for r in recs if "loss" in r)


def test_finetune_from_scratch_steps_and_leaves_the_unused_final_norm():
  """From scratch (and with the augmentations switched off: label-smoothed cross-entropy on the
  crops), one step moves the head, blocks and position embedding but not the encoder's final
  norm, which mean pooling skips."""
  c = tiny_config("finetune", **{"finetune.aug.rand_augment": False, "finetune.aug.reprob": 0.0,
                                 "finetune.aug.mixup": 0.0, "finetune.aug.cutmix": 0.0})
  c.optim.warmup_epochs = 0
  tr = train.Trainer.create(c, devices=jax.devices()[:1])
  before = jax.device_get(tr.state["params"])
  assert np.abs(before["head"]["fc"]["kernel"]).max() < 2e-4 and not before["head"]["fc"]["bias"].any()
  # mean pooling reads the last block's output, before the encoder's final norm (MAE's
  # global_pool deletes that norm), then fc_norm
  m, x = tr.method, jax.random.normal(KEY, (2, 32, 32, 3))

  def both(p, x):
    _, inter = m.encoder.apply({"params": p["encoder"]}, x, mutable=["intermediates"])
    last = inter["intermediates"]["encoder"]["block_outputs"][-1]
    return m.encoder_tokens(p["encoder"], x), last, m.classify(p, x)[0], m.head.apply({"params": p["head"]}, last)[0]

  tokens, last, feats, want = jax.jit(both)(before, x)
  np.testing.assert_allclose(tokens, last, rtol=1e-6, atol=1e-6)
  np.testing.assert_allclose(feats, want, rtol=1e-6, atol=1e-6)
  mean = np.asarray(last)[:, 1:].mean(1)
  z = (mean - mean.mean(-1, keepdims=True)) / np.sqrt(mean.var(-1, keepdims=True) + 1e-6)
  np.testing.assert_allclose(feats, z * before["head"]["fc_norm"]["scale"] + before["head"]["fc_norm"]["bias"],
                             rtol=1e-4, atol=1e-4)
  metrics = jax.device_get(tr.step())
  after = jax.device_get(tr.state["params"])
  assert math.isfinite(float(metrics["loss"])) and float(metrics["aux/lam"]) == 1.0
  jax.tree.map(np.testing.assert_array_equal, after["encoder"]["encoder"]["norm"],
               before["encoder"]["encoder"]["norm"])
  for moved in (lambda p: p["head"]["fc"]["kernel"], lambda p: p["head"]["fc_norm"]["scale"],
                lambda p: p["encoder"]["encoder"]["block00"]["attn"]["qkv_kernel"],
                lambda p: p["encoder"]["pos_embed"]):
    assert not np.array_equal(moved(after), moved(before))
