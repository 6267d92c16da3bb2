"""Fine-tuning augmentation on the device: timm's RandAugment, RandomErasing and Mixup/CutMix.

MAE's `main_finetune.py` builds its training transform with timm's `create_transform`
(RandomResizedCrop(0.08-1, bicubic) + flip, RandAugment 'rand-m9-mstd0.5-inc1', ToTensor,
Normalize, RandomErasing(0.25, 'pixel')) and mixes each batch with timm's `Mixup` (mixup 0.8,
cutmix 1.0, switch 0.5, prob 1, mode 'batch', label smoothing 0.1). The trainer already does
the crop and flip; this module does the rest, batched and jit-able, in timm's order:

    RandAugment on the [0, 1] image -> normalise -> random erasing -> mixup / cutmix.

RandAugment (timm `auto_augment.py`, 'rand-m9-mstd0.5-inc1'): for each image, n = 2 ops drawn
uniformly WITH replacement from the 15 'increasing' ops; each op runs with probability 0.5,
its magnitude ~ N(9, 0.5) clipped to [0, 10], and signed ops negate their argument with
probability 0.5. The ops follow PIL's definitions on 8-bit levels (the image is held as
integer-valued floats 0..255 between ops, as PIL holds uint8):
  AutoContrast   per channel, lut(v) = int((v - lo) * 255 / (hi - lo)), unchanged if hi <= lo
  Equalize       PIL's ImageOps.equalize LUT from each channel's 256-bin histogram
  Invert         255 - v
  Rotate         +-30 m/10 degrees about the centre (counter-clockwise for +), fill img_mean
  Posterize      keep 4 - int(4 m/10) most significant bits
  Solarize       v >= t -> 255 - v with t = 256 - int(256 m/10) (dm_pix.solarize)
  SolarizeAdd    v < 128 -> min(255, v + int(110 m/10))
  Color, Contrast, Brightness, Sharpness
                 PIL's ImageEnhance: blend(degenerate, image, f) = int(d + f (v - d)) clipped,
                 f = max(0.1, 1 +- 0.9 m/10); degenerate = the L (luma) image / a flat image at
                 the rounded mean luma / black / the 3x3 SMOOTH filter (borders kept)
  ShearX/Y       PIL affine (1, +-0.3 m/10, 0, 0, 1, 0) / (1, 0, 0, +-0.3 m/10, 1, 0)
  TranslateX/YRel  shift by +-0.45 m/10 of the width / height
The geometric ops are one affine warp per layer (`dm_pix.affine_transform`); like PIL, an
output pixel whose source lies outside the image gets the fill colour img_mean (ImageNet mean
in 8 bit: 124, 116, 104, timm's hparams), inside it is interpolated with clamped neighbours.
Every op equals PIL's on 8-bit images (tests/test_finetune.py), except that the warps
compute their coordinates in float32 where PIL uses double (a few pixels one level apart).
Deviation: timm resamples bicubic (create_transform's interpolation), dm_pix interpolates
bilinearly (PIL's BILINEAR, truncated to 8 bit as PIL does, is what is matched).

dm_pix's adjust_brightness (adds a delta), adjust_contrast (per-channel mean) and
adjust_saturation (HSV) are not PIL's ImageEnhance, so those blends are written here.
"""
from __future__ import annotations

import math
from typing import Sequence

import dm_pix
import jax
import jax.numpy as jnp
import numpy as np

MAX_LEVEL = 10.0
# timm's _RAND_INCREASING_TRANSFORMS, in timm's order (an op index refers to this list).
RAND_INCREASING_OPS = (
    "AutoContrast", "Equalize", "Invert", "Rotate", "PosterizeIncreasing", "SolarizeIncreasing",
    "SolarizeAdd", "ColorIncreasing", "ContrastIncreasing", "BrightnessIncreasing",
    "SharpnessIncreasing", "ShearX", "ShearY", "TranslateXRel", "TranslateYRel",
)
GEOMETRIC_OPS = ("Rotate", "ShearX", "ShearY", "TranslateXRel", "TranslateYRel")


def img_mean_fill(mean: Sequence[float]) -> tuple[int, ...]:
  """timm's fill colour: the dataset mean in 8 bit, `min(255, round(255 * m))`."""
  return tuple(min(255, round(255 * m)) for m in mean)


# ---------------------------------------------------------------------------------------------
# Point ops on one batch of 8-bit levels (float, integer-valued, [B, H, W, C]).

def _lut(x: jax.Array, lut: jax.Array) -> jax.Array:
  """Applies a per-image, per-channel table lut [B, C, 256] to levels x [B, H, W, C]."""
  idx = jnp.clip(x, 0, 255).astype(jnp.int32)
  b, h, w, c = x.shape
  flat = idx.transpose(0, 3, 1, 2).reshape(b, c, h * w)
  out = jnp.take_along_axis(lut, flat, axis=2).reshape(b, c, h, w).transpose(0, 2, 3, 1)
  return out.astype(x.dtype)


def histogram(x: jax.Array) -> jax.Array:
  """256-bin histogram of each image's channels: levels [B, H, W, C] -> counts int32 [B, C, 256]."""
  b, h, w, c = x.shape
  idx = jnp.clip(x, 0, 255).astype(jnp.int32)
  seg = (jnp.arange(b)[:, None, None, None] * c + jnp.arange(c)) * 256 + idx
  counts = jax.ops.segment_sum(jnp.ones(seg.size, jnp.int32), seg.reshape(-1), num_segments=b * c * 256)
  return counts.reshape(b, c, 256)


def auto_contrast(x: jax.Array) -> jax.Array:
  """PIL ImageOps.autocontrast (cutoff 0): each channel's [lo, hi] stretched to [0, 255]."""
  lo = jnp.min(x, axis=(1, 2), keepdims=True)
  hi = jnp.max(x, axis=(1, 2), keepdims=True)
  # (x - lo) * 255 is an exact integer, so the quotient floors like PIL's double arithmetic.
  out = jnp.clip(jnp.floor((x - lo) * 255.0 / jnp.maximum(hi - lo, 1.0)), 0, 255)
  return jnp.where(hi > lo, out, x)


def equalize(x: jax.Array) -> jax.Array:
  """PIL ImageOps.equalize, per channel: step = (N - count of the last occupied level) // 255,
  lut[i] = (step // 2 + #pixels below level i) // step; identity when step is 0 (a flat
  channel included)."""
  h = histogram(x)
  total = jnp.sum(h, axis=-1, keepdims=True)
  last = jnp.max(jnp.where(h > 0, jnp.arange(256), -1), axis=-1, keepdims=True)
  last_count = jnp.take_along_axis(h, jnp.maximum(last, 0), axis=-1)
  step = (total - last_count) // 255
  below = jnp.cumsum(h, axis=-1) - h
  lut = jnp.minimum((step // 2 + below) // jnp.maximum(step, 1), 255)
  lut = jnp.where(step > 0, lut, jnp.arange(256))
  return _lut(x, lut.astype(jnp.int32))


def invert(x: jax.Array) -> jax.Array:
  return 255.0 - x


def posterize(x: jax.Array, bits: jax.Array) -> jax.Array:
  """PIL ImageOps.posterize: keep the `bits` [B] most significant bits (8 or more: unchanged)."""
  bits = jnp.clip(bits.astype(jnp.int32), 0, 8)[:, None, None, None]
  mask = jnp.bitwise_not(jnp.left_shift(1, 8 - bits) - 1) & 255
  return (x.astype(jnp.int32) & mask).astype(x.dtype)


def solarize(x: jax.Array, threshold: jax.Array) -> jax.Array:
  """PIL ImageOps.solarize: levels >= threshold [B] inverted (dm_pix.solarize on [0, 1])."""
  t = threshold.astype(x.dtype)[:, None, None, None] / 255.0
  return jnp.round(dm_pix.solarize(x / 255.0, t) * 255.0)


def solarize_add(x: jax.Array, add: jax.Array, threshold: float = 128.0) -> jax.Array:
  """timm solarize_add: levels below `threshold` get + add [B], capped at 255."""
  add = add.astype(x.dtype)[:, None, None, None]
  return jnp.where(x < threshold, jnp.minimum(x + add, 255.0), x)


def luma(x: jax.Array) -> jax.Array:
  """PIL's RGB -> L conversion (ITU-R 601-2 in 16-bit fixed point): [B, H, W, 3] -> [B, H, W, 1]."""
  q = x.astype(jnp.int32)
  l = (q[..., 0] * 19595 + q[..., 1] * 38470 + q[..., 2] * 7471 + 0x8000) >> 16
  return l[..., None].astype(x.dtype)


def rounded(p: jax.Array, nonneg: jax.Array) -> jax.Array:
  """p, rounded to float32 before its next use. XLA fuses a product feeding an addition into a
  fused multiply-add (one rounding), where PIL rounds the product first; passing the product
  through an integer OR with a runtime zero (the sign bit of `nonneg`, a value >= 0) keeps the
  two roundings. Needed under jit only; eager op-by-op execution rounds anyway."""
  zero = jax.lax.bitcast_convert_type(nonneg.astype(jnp.float32), jnp.int32) >> 31
  bits = jax.lax.bitcast_convert_type(p.astype(jnp.float32), jnp.int32) | zero
  return jax.lax.bitcast_convert_type(bits, jnp.float32)


def blend(degenerate: jax.Array, x: jax.Array, factor: jax.Array) -> jax.Array:
  """PIL Image.blend(degenerate, x, factor) on levels: int(d + fl(f (x - d))) clipped to 0..255
  The product is rounded before the addition under jit too (`rounded`), else XLA's fused
  multiply-add is one level off PIL now and then (x=46, grey 126, factor 1.35: 17 vs 18)."""
  f = factor.astype(x.dtype)[:, None, None, None]
  d = jnp.broadcast_to(degenerate, x.shape)
  return jnp.clip(jnp.floor(d + rounded(f * (x - d), d)), 0, 255)


def color(x: jax.Array, factor: jax.Array) -> jax.Array:
  return blend(jnp.broadcast_to(luma(x), x.shape), x, factor)


def contrast(x: jax.Array, factor: jax.Array) -> jax.Array:
  """Blend with a flat image at int(mean luma + 0.5)."""
  mean = jnp.floor(jnp.mean(luma(x), axis=(1, 2, 3), keepdims=True) + 0.5)
  return blend(jnp.broadcast_to(mean, x.shape), x, factor)


def brightness(x: jax.Array, factor: jax.Array) -> jax.Array:
  return blend(jnp.zeros_like(x), x, factor)


def smooth(x: jax.Array) -> jax.Array:
  """PIL ImageFilter.SMOOTH: 3x3 kernel [[1,1,1],[1,5,1],[1,1,1]] / 13 rounded, on the interior;
  the one-pixel border is copied unchanged."""
  p = jnp.pad(x, ((0, 0), (1, 1), (1, 1), (0, 0)), mode="edge")
  h, w = x.shape[1], x.shape[2]
  acc = 4.0 * x
  for dy in range(3):
    for dx in range(3):
      acc = acc + p[:, dy:dy + h, dx:dx + w]
  out = jnp.clip(jnp.floor(acc / 13.0 + 0.5), 0, 255)
  interior = np.zeros((1, h, w, 1), bool)
  interior[:, 1:-1, 1:-1] = True
  return jnp.where(interior, out, x)


def sharpness(x: jax.Array, factor: jax.Array) -> jax.Array:
  return blend(smooth(x), x, factor)


# ---------------------------------------------------------------------------------------------
# Geometric ops: PIL affine transforms, one warp per batch.

def rotate_matrix(degrees: jax.Array, height: int, width: int) -> jax.Array:
  """PIL Image.rotate's inverse affine (a, b, c, d, e, f), [B, 6], about (w/2, h/2)."""
  a = -jnp.deg2rad(degrees)
  cos, sin = jnp.cos(a), jnp.sin(a)
  cx, cy = width / 2.0, height / 2.0
  c = cos * -cx + sin * -cy + cx
  f = -sin * -cx + cos * -cy + cy
  return jnp.stack([cos, sin, c, -sin, cos, f], axis=-1)


def affine(x: jax.Array, coeffs: jax.Array, fill: Sequence[float]) -> jax.Array:
  """PIL Image.transform(size, AFFINE, (a, b, c, d, e, f)), per image, bilinear (not rounded).

  Output pixel (col x, row y) samples the input at (a X + b Y + c, d X + e Y + f), where
  X = x + 0.5, Y = y + 0.5 (PIL's pixel-centre coordinates); a source outside [0, W) x [0, H)
  gives `fill`, inside it is interpolated with clamped neighbours (dm_pix 'nearest' mode).
  """
  b, h, w, _ = x.shape
  a_, b_, c_, d_, e_, f_ = (coeffs[:, i] for i in range(6))
  zeros, ones = jnp.zeros_like(a_), jnp.ones_like(a_)
  # dm_pix index coordinates (row, col, channel): in = M @ out + offset.
  mat = jnp.stack([jnp.stack([e_, d_, zeros], -1), jnp.stack([b_, a_, zeros], -1),
                   jnp.stack([zeros, zeros, ones], -1)], axis=1)
  off = jnp.stack([0.5 * (d_ + e_) + f_ - 0.5, 0.5 * (a_ + b_) + c_ - 0.5, zeros], axis=-1)
  warped = jax.vmap(lambda im, m, o: dm_pix.affine_transform(im, m, offset=o, mode="nearest"))(x, mat, off)
  yy, xx = jnp.meshgrid(jnp.arange(h, dtype=x.dtype) + 0.5, jnp.arange(w, dtype=x.dtype) + 0.5,
                        indexing="ij")
  src_x = a_[:, None, None] * xx + b_[:, None, None] * yy + c_[:, None, None]
  src_y = d_[:, None, None] * xx + e_[:, None, None] * yy + f_[:, None, None]
  inside = (src_x >= 0) & (src_x < w) & (src_y >= 0) & (src_y < h)
  return jnp.where(inside[..., None], warped, jnp.asarray(fill, x.dtype))


# ---------------------------------------------------------------------------------------------
# RandAugment.

def _level_args(mag: jax.Array, sign: jax.Array, height: int, width: int) -> dict:
  """timm's level_to_arg functions for every op at magnitude `mag` [B] (sign = +-1 [B])."""
  frac = mag / MAX_LEVEL
  enhance = jnp.maximum(0.1, 1.0 + sign * frac * 0.9)
  return dict(
      rotate=sign * frac * 30.0,
      posterize_bits=4 - jnp.floor(frac * 4).astype(jnp.int32),
      solarize_threshold=256 - jnp.minimum(256, jnp.floor(frac * 256)).astype(jnp.int32),
      solarize_add=jnp.minimum(128, jnp.floor(frac * 110)).astype(jnp.int32),
      enhance=enhance,
      shear=sign * frac * 0.3,
      translate_x=sign * frac * 0.45 * width,
      translate_y=sign * frac * 0.45 * height,
  )


def _geometric_coeffs(op: jax.Array, args: dict, height: int, width: int) -> jax.Array:
  """The PIL affine (a..f) [B, 6] of each image's geometric op (identity for other ops)."""
  one, zero = jnp.ones_like(args["shear"]), jnp.zeros_like(args["shear"])
  table = {
      "Rotate": rotate_matrix(args["rotate"], height, width),
      "ShearX": jnp.stack([one, args["shear"], zero, zero, one, zero], -1),
      "ShearY": jnp.stack([one, zero, zero, args["shear"], one, zero], -1),
      "TranslateXRel": jnp.stack([one, zero, args["translate_x"], zero, one, zero], -1),
      "TranslateYRel": jnp.stack([one, zero, zero, zero, one, args["translate_y"]], -1),
  }
  coeffs = jnp.stack([one, zero, zero, zero, one, zero], -1)
  for name, value in table.items():
    coeffs = jnp.where((op == RAND_INCREASING_OPS.index(name))[:, None], value, coeffs)
  return coeffs


def apply_op(name: str, x: jax.Array, args: dict) -> jax.Array:
  """The non-geometric op `name` on levels x [B, H, W, 3] with `_level_args` arguments."""
  if name == "AutoContrast":
    return auto_contrast(x)
  if name == "Equalize":
    return equalize(x)
  if name == "Invert":
    return invert(x)
  if name == "PosterizeIncreasing":
    return posterize(x, args["posterize_bits"])
  if name == "SolarizeIncreasing":
    return solarize(x, args["solarize_threshold"])
  if name == "SolarizeAdd":
    return solarize_add(x, args["solarize_add"])
  if name == "ColorIncreasing":
    return color(x, args["enhance"])
  if name == "ContrastIncreasing":
    return contrast(x, args["enhance"])
  if name == "BrightnessIncreasing":
    return brightness(x, args["enhance"])
  if name == "SharpnessIncreasing":
    return sharpness(x, args["enhance"])
  raise ValueError(f"unknown RandAugment op {name!r}")


def rand_augment_layer(x: jax.Array, op: jax.Array, apply: jax.Array, mag: jax.Array,
                       sign: jax.Array, fill: Sequence[float]) -> jax.Array:
  """One RandAugment layer with explicit choices per image: op index [B] into
  RAND_INCREASING_OPS, apply [B] bool, magnitude [B], sign [B] (+-1)."""
  _, h, w, _ = x.shape
  args = _level_args(mag, sign, h, w)
  geometric = jnp.isin(op, jnp.asarray([RAND_INCREASING_OPS.index(n) for n in GEOMETRIC_OPS]))
  # PIL truncates its bilinear result to uint8.
  warped = jnp.floor(jnp.clip(affine(x, _geometric_coeffs(op, args, h, w), fill), 0, 255))
  out = jnp.where((apply & geometric)[:, None, None, None], warped, x)
  for k, name in enumerate(RAND_INCREASING_OPS):
    if name not in GEOMETRIC_OPS:
      out = jnp.where((apply & (op == k))[:, None, None, None], apply_op(name, x, args), out)
  return out


def rand_augment(rng: jax.Array, images: jax.Array, *, num_layers: int = 2, magnitude: float = 9.0,
                 magnitude_std: float = 0.5, prob: float = 0.5,
                 fill: Sequence[float] = (124, 116, 104)) -> jax.Array:
  """timm RandAugment 'rand-m{magnitude}-n{num_layers}-mstd{magnitude_std}-inc1' on a batch.

  images: [B, H, W, 3] in [0, 1] (the crop's output); it is rounded to 8-bit levels first (PIL
  holds the crop as uint8). Returns [B, H, W, 3] in [0, 1] on the 1/255 grid.

  Clips [B, T, H, W, 3]: each layer's op, skip, magnitude and sign are drawn once per clip and
  applied to every frame (each frame's own histogram for the histogram ops), as VideoMAE's
  ``rand_augment.py`` `AugmentOp` maps one draw over the clip's list of frames.
  """
  b = images.shape[0]
  frames = images.shape[1] if images.ndim == 5 else 1
  x = jnp.round(jnp.clip(images.astype(jnp.float32), 0.0, 1.0) * 255.0)
  x = x.reshape((-1,) + images.shape[-3:])
  for layer in range(num_layers):
    k_op, k_apply, k_mag, k_sign = jax.random.split(jax.random.fold_in(rng, layer), 4)
    op = jax.random.randint(k_op, (b,), 0, len(RAND_INCREASING_OPS))
    apply = jax.random.uniform(k_apply, (b,)) <= prob       # timm skips when random() > prob
    mag = magnitude + magnitude_std * jax.random.normal(k_mag, (b,)) if magnitude_std > 0 else jnp.full((b,), magnitude)
    mag = jnp.clip(mag, 0.0, MAX_LEVEL)
    sign = jnp.where(jax.random.uniform(k_sign, (b,)) > 0.5, -1.0, 1.0)  # timm _randomly_negate
    op, apply, mag, sign = (jnp.repeat(a, frames) for a in (op, apply, mag, sign))
    x = rand_augment_layer(x, op, apply, mag, sign, fill)
  return (x / 255.0).reshape(images.shape)


# ---------------------------------------------------------------------------------------------
# Random erasing (timm RandomErasing, after normalisation).

def erase_boxes(rng: jax.Array, batch: int, height: int, width: int, *, min_area: float = 0.02,
                max_area: float = 1 / 3, min_aspect: float = 0.3, attempts: int = 10) -> jax.Array:
  """timm's box search, per image: up to 10 attempts of area ~ U(min, max) x H W and log aspect
  ~ U(log 0.3, log 1/0.3), h = round(sqrt(area a)), w = round(sqrt(area / a)); the first with
  h < H and w < W wins, at top ~ U{0..H-h}, left ~ U{0..W-w}. int32 [B, 5]:
  (found, top, left, h, w)."""
  k_area, k_aspect, k_top, k_left = jax.random.split(rng, 4)
  shape = (batch, attempts)
  area = jax.random.uniform(k_area, shape, minval=min_area, maxval=max_area) * height * width
  log_r = jax.random.uniform(k_aspect, shape, minval=math.log(min_aspect), maxval=math.log(1 / min_aspect))
  aspect = jnp.exp(log_r)
  h = jnp.round(jnp.sqrt(area * aspect)).astype(jnp.int32)
  w = jnp.round(jnp.sqrt(area / aspect)).astype(jnp.int32)
  fits = (w < width) & (h < height)
  first = jnp.argmax(fits, axis=1)[:, None]
  found = jnp.any(fits, axis=1)
  h = jnp.take_along_axis(h, first, axis=1)[:, 0]
  w = jnp.take_along_axis(w, first, axis=1)[:, 0]
  top = jnp.floor(jax.random.uniform(k_top, (batch,)) * (height - h + 1)).astype(jnp.int32)
  left = jnp.floor(jax.random.uniform(k_left, (batch,)) * (width - w + 1)).astype(jnp.int32)
  return jnp.stack([found.astype(jnp.int32), top, left, h, w], axis=1)


def random_erasing(rng: jax.Array, images: jax.Array, *, prob: float = 0.25, mode: str = "pixel",
                   **box_kw) -> jax.Array:
  """timm RandomErasing(prob, mode, count 1) on normalised images [B, H, W, C]: with
  probability `prob` one box (`erase_boxes`) is replaced by N(0, 1) noise, per pixel and channel
  ('pixel'), one colour per box ('rand') or zeros ('const'). Clips [B, T, H, W, C]: every
  frame on its own (VideoMAE hands timm's RandomErasing the clip as a batch of T frames)."""
  if mode not in ("pixel", "rand", "const"):
    raise ValueError(f"random erasing mode {mode!r}: use 'pixel', 'rand' or 'const'")
  if images.ndim == 5:
    frames = images.reshape((-1,) + images.shape[2:])
    return random_erasing(rng, frames, prob=prob, mode=mode, **box_kw).reshape(images.shape)
  b, h, w, c = images.shape
  k_do, k_box, k_noise = jax.random.split(rng, 3)
  boxes = erase_boxes(k_box, b, h, w, **box_kw)
  do = (jax.random.uniform(k_do, (b,)) <= prob) & (boxes[:, 0] == 1)
  rows = jnp.arange(h)[None, :]
  cols = jnp.arange(w)[None, :]
  in_rows = (rows >= boxes[:, 1:2]) & (rows < boxes[:, 1:2] + boxes[:, 3:4])
  in_cols = (cols >= boxes[:, 2:3]) & (cols < boxes[:, 2:3] + boxes[:, 4:5])
  mask = do[:, None, None] & in_rows[:, :, None] & in_cols[:, None, :]
  if mode == "pixel":
    noise = jax.random.normal(k_noise, images.shape, images.dtype)
  elif mode == "rand":
    noise = jax.random.normal(k_noise, (b, 1, 1, c), images.dtype)
  else:
    noise = jnp.zeros((b, 1, 1, c), images.dtype)
  return jnp.where(mask[..., None], noise, images)


# ---------------------------------------------------------------------------------------------
# Mixup / CutMix (timm Mixup, mode 'batch', correct_lam=True).

def smooth_one_hot(labels: jax.Array, num_classes: int, smoothing: float) -> jax.Array:
  """timm one_hot with on = 1 - s + s/C, off = s/C."""
  off = smoothing / num_classes
  return jax.nn.one_hot(labels, num_classes) * (1.0 - smoothing) + off


def mixup_target(labels: jax.Array, num_classes: int, lam: jax.Array, smoothing: float) -> jax.Array:
  """timm mixup_target: lam * onehot(y) + (1 - lam) * onehot(y flipped over the batch)."""
  y1 = smooth_one_hot(labels, num_classes, smoothing)
  y2 = smooth_one_hot(labels[::-1], num_classes, smoothing)
  return lam * y1 + (1.0 - lam) * y2


def cutmix_box(rng: jax.Array, lam: jax.Array, height: int, width: int):
  """timm rand_bbox (margin 0): cut = int(side * sqrt(1 - lam)), centre ~ U{0..side-1}, box
  [c - cut//2, c + cut//2) clipped to the image; returns (yl, yh, xl, xh) int32 and the
  corrected lam = 1 - box area / image area."""
  k_y, k_x = jax.random.split(rng)
  ratio = jnp.sqrt(1.0 - lam)
  cut_h = jnp.floor(height * ratio).astype(jnp.int32)
  cut_w = jnp.floor(width * ratio).astype(jnp.int32)
  cy = jax.random.randint(k_y, (), 0, height)
  cx = jax.random.randint(k_x, (), 0, width)
  yl, yh = jnp.clip(cy - cut_h // 2, 0, height), jnp.clip(cy + cut_h // 2, 0, height)
  xl, xh = jnp.clip(cx - cut_w // 2, 0, width), jnp.clip(cx + cut_w // 2, 0, width)
  area = ((yh - yl) * (xh - xl)).astype(jnp.float32)
  return (yl, yh, xl, xh), 1.0 - area / float(height * width)


def mixup_cutmix(rng: jax.Array, images: jax.Array, labels: jax.Array, num_classes: int, *,
                 mixup_alpha: float = 0.8, cutmix_alpha: float = 1.0, prob: float = 1.0,
                 switch_prob: float = 0.5, smoothing: float = 0.1):
  """timm Mixup(mode='batch'): one lam and one choice for the whole batch; image i is mixed with
  image B-1-i (the batch flipped).

  With probability `prob`: cutmix with probability `switch_prob` (when both alphas are > 0),
  lam ~ Beta(alpha, alpha) of the chosen kind; cutmix pastes the partner's box and corrects lam
  to 1 - box area fraction. Returns (images, soft targets [B, num_classes], metrics). Clips
  [B, T, H, W, 3] mix whole clips, one box for every frame (VideoMAE's ``mixup.py`` pastes
  ``x[..., yl:yh, xl:xh]``).
  """
  if mixup_alpha <= 0 and cutmix_alpha <= 0:
    return images, smooth_one_hot(labels, num_classes, smoothing), {"lam": jnp.float32(1.0)}
  k_apply, k_switch, k_lam, k_box = jax.random.split(rng, 4)
  apply = jax.random.uniform(k_apply) < prob
  if mixup_alpha > 0 and cutmix_alpha > 0:
    use_cutmix = jax.random.uniform(k_switch) < switch_prob
  else:
    use_cutmix = jnp.asarray(cutmix_alpha > 0)
  # lam ~ Beta(alpha, alpha) of the chosen kind, drawn as jax.random.beta does (two log-gamma
  # variates), with one sampler for both kinds.
  alpha = jnp.where(use_cutmix, cutmix_alpha, mixup_alpha).astype(jnp.float32)
  log_g = jax.random.loggamma(k_lam, jnp.full((2,), alpha))
  lam_draw = jnp.exp(log_g[0] - jnp.logaddexp(log_g[0], log_g[1]))
  h, w = images.shape[-3:-1]
  (yl, yh, xl, xh), lam_box = cutmix_box(k_box, lam_draw, h, w)
  partner = images[::-1]
  rows, cols = jnp.arange(h)[:, None], jnp.arange(w)[None, :]
  in_box = (rows >= yl) & (rows < yh) & (cols >= xl) & (cols < xh)
  cut = jnp.where(in_box[:, :, None], partner, images)      # [H, W, 1] broadcasts over B (T)
  mixed = lam_draw * images + (1.0 - lam_draw) * partner
  out = jnp.where(apply, jnp.where(use_cutmix, cut, mixed), images)
  lam = jnp.where(apply, jnp.where(use_cutmix, lam_box, lam_draw), 1.0).astype(jnp.float32)
  targets = mixup_target(labels, num_classes, lam, smoothing)
  return out, targets, {"lam": lam, "cutmix": (apply & use_cutmix).astype(jnp.float32)}
