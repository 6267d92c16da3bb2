"""Multi-crop views with the DINO / iBOT augmentations, on the device, batched and jit-able.

DINO's `DataAugmentationDINO` and iBOT's `DataAugmentationiBOT` (bytedance/ibot main_ibot.py)
turn one image into `num_global` global crops and `num_local` local crops:

    global 1:  RandomResizedCrop(global_size, global_scale) -> flip -> jitter -> grey -> blur p=1.0
    global 2+: RandomResizedCrop(global_size, global_scale) -> flip -> jitter -> grey -> blur p=0.1
               -> solarize p=0.2
    local:     RandomResizedCrop(local_size, local_scale)   -> flip -> jitter -> grey -> blur p=0.5
    then ToTensor + Normalize(ImageNet mean, std) for every crop, where

    flip    RandomHorizontalFlip(0.5)
    jitter  RandomApply(ColorJitter(brightness 0.4, contrast 0.4, saturation 0.2, hue 0.1), 0.8)
    grey    RandomGrayscale(0.2)
    blur    utils.GaussianBlur(p): PIL ImageFilter.GaussianBlur(radius ~ U(0.1, 2.0))
    solarize  utils.Solarization(0.2): PIL ImageOps.solarize (threshold 128)

Here every op runs on the whole batch at once, with its own random draw per image, on PIL's
8-bit levels (floats holding integers 0..255, as PIL holds uint8 between ops):

  * crop + flip: `augment.random_resized_crop_flip` (torchvision's box sampling), then rounded
    to 8 bit. Deviation: bilinear resampling of a continuous box (the official crops are
    bicubic, on whole pixels).
  * ColorJitter exactly as torchvision on a PIL image: factors b ~ U(0.6, 1.4), c ~ U(0.6, 1.4),
    s ~ U(0.8, 1.2), h ~ U(-0.1, 0.1) and the four ops in a random order per image (torchvision
    draws `randperm(4)`). Brightness, contrast and saturation are PIL's ImageEnhance blends
    (as `finetune_aug`'s, with the product rounded before the sum also under jit, where XLA
    would fuse them into a multiply-add: `rounded`); hue is torchvision's PIL path
    (`adjust_hue` below): RGB -> PIL's 8-bit HSV, H += uint8(h * 255) with wrap-around, back.
  * RandomGrayscale: PIL's RGB -> L (`finetune_aug.luma`) copied to the three channels.
  * GaussianBlur: PIL's own algorithm (`gaussian_blur`): three passes of an extended box blur
    per axis, 8-bit fixed point, edges replicated; not a sampled Gaussian kernel.
  * Solarization: PIL's ImageOps.solarize (`finetune_aug.solarize`, dm_pix.solarize).

dm_pix's adjust_brightness / adjust_contrast / adjust_saturation / rgb_to_grayscale /
gaussian_blur are not PIL's operations (an additive delta, per-channel means, float HSV, other
luma weights, a true Gaussian), so the PIL-exact versions are used instead; tests/test_ibot.py
compares every op with PIL itself.

For in-memory datasets the crops are taken from the stored images (exact). For streaming
datasets the method declares its views (`crop_specs`, `Method.train_views`) and the host cuts
each from the decoded image (`host_crop.HostMultiCrop`: bicubic, whole image, as the official
transforms); only the colour ops run here then (`multi_crop(..., crops=...)`).
"""
from __future__ import annotations

import math
from typing import Optional, Sequence

import jax
import jax.numpy as jnp

from mim_jax.data import augment, finetune_aug
from mim_jax.data.finetune_aug import rounded

# ---------------------------------------------------------------------------------------------
# Colour: torchvision ColorJitter on PIL images.


def _exact_div(x: jax.Array, c: float) -> jax.Array:
  """x / c correctly rounded. XLA rewrites a division by a constant (or by any broadcast
  scalar) as a multiplication by its rounded reciprocal, which moves PIL's 8-bit hue across a
  level now and then; a divisor computed elementwise from x keeps the true division."""
  return x / (x * 0.0 + c)


def rgb_to_hsv_pil(x: jax.Array) -> jax.Array:
  """PIL's RGB -> HSV conversion of 8-bit levels [..., 3] (Convert.c rgb2hsv_row): H and S are
  truncated to 8 bit (H = int(255 * hue in [0, 1))), V = max(R, G, B)."""
  r, g, b = x[..., 0], x[..., 1], x[..., 2]
  maxc = jnp.maximum(r, jnp.maximum(g, b))
  minc = jnp.minimum(r, jnp.minimum(g, b))
  cr = maxc - minc
  flat = cr == 0
  crs = jnp.where(flat, 1.0, cr)
  s = crs / jnp.where(maxc == 0, 1.0, maxc)
  rc, gc, bc = (maxc - r) / crs, (maxc - g) / crs, (maxc - b) / crs
  # C forms 2 + rc - bc and 4 + gc - rc exactly in double and rounds once to float. The
  # minimum channel's term is exactly 1, so each is one float32 operation, rounded once too.
  h = jnp.where(r == maxc, bc - gc,
                jnp.where(g == maxc, jnp.where(rc == 1.0, 3.0 - bc, 1.0 + rc),
                          jnp.where(rc == 1.0, 3.0 + gc, 5.0 - rc)))
  # fmod(h / 6 + 1, 1) in double, stored as float: h / 6 when it is >= 0, else h / 6 + 1.
  h6 = _exact_div(h, 6.0)
  h = jnp.where(h6 < 0, h6 + 1.0, h6)
  uh = jnp.where(flat, 0.0, jnp.clip(_trunc_times_255(h), 0, 255))
  us = jnp.where(flat, 0.0, jnp.clip(_trunc_times_255(s), 0, 255))
  return jnp.stack([uh, us, maxc], axis=-1)


def _trunc_times_255(v: jax.Array) -> jax.Array:
  """int(v * 255.0) for float32 v in [0, 1] with the product exact (C multiplies the float by
  the double 255.0): mantissa * 255 in uint32, shifted by the exponent."""
  bits = jax.lax.bitcast_convert_type(v.astype(jnp.float32), jnp.uint32)
  exp = (bits >> 23) & 0xFF
  mant = jnp.where(exp > 0, (bits & 0x7FFFFF) | 0x800000, bits & 0x7FFFFF)
  shift = jnp.uint32(150) - jnp.maximum(exp, 1)       # v = mant * 2^-(shift)
  prod = mant * jnp.uint32(255)                       # < 2^32
  out = jnp.where(shift < 32, prod >> jnp.minimum(shift, 31), 0)
  return out.astype(jnp.float32)


def hsv_to_rgb_pil(hsv: jax.Array) -> jax.Array:
  """PIL's HSV -> RGB conversion of 8-bit levels (Convert.c hsv2rgb): sextant i = floor(6 h / 255),
  p, q, t rounded half away from zero."""
  h, s, v = hsv[..., 0], hsv[..., 1], hsv[..., 2]
  hh = _exact_div(h * 6.0, 255.0)
  i = jnp.floor(hh)
  f = hh - i
  fs = _exact_div(s, 255.0)

  def rnd(y):
    return jnp.clip(jnp.sign(y) * jnp.floor(jnp.abs(y) + 0.5), 0, 255)

  # C rounds fs * f to float, then works in double; keep that rounding under jit (`rounded`).
  p = rnd(v * (1.0 - fs))
  q = rnd(v * (1.0 - rounded(fs * f, v)))
  t = rnd(v * (1.0 - rounded(fs * (1.0 - f), v)))
  i = jnp.mod(i.astype(jnp.int32), 6)
  choices = [(v, t, p), (q, v, p), (p, v, t), (p, q, v), (t, p, v), (v, p, q)]
  out = [jnp.select([i == k for k in range(6)], [c[ch] for c in choices]) for ch in range(3)]
  rgb = jnp.stack(out, axis=-1)
  return jnp.where((s == 0)[..., None], v[..., None], rgb)


def adjust_hue(x: jax.Array, factor: jax.Array) -> jax.Array:
  """torchvision F.adjust_hue on a PIL image: levels [B, H, W, 3], factor [B] in [-0.5, 0.5].

  The H channel of PIL's HSV gets `uint8(factor * 255)` added modulo 256 (numpy's uint8
  overflow; a negative shift wraps, truncated toward zero first as C's float -> int cast)."""
  hsv = rgb_to_hsv_pil(x)
  shift = jnp.mod(jnp.trunc(factor * 255.0), 256.0)[:, None, None]
  h = jnp.mod(hsv[..., 0] + shift, 256.0)
  return hsv_to_rgb_pil(jnp.stack([h, hsv[..., 1], hsv[..., 2]], axis=-1))


def brightness(x: jax.Array, factor: jax.Array) -> jax.Array:
  """PIL ImageEnhance.Brightness: blend with black."""
  return finetune_aug.blend(jnp.zeros_like(x), x, factor)


def contrast(x: jax.Array, factor: jax.Array) -> jax.Array:
  """PIL ImageEnhance.Contrast: blend with a flat grey at int(mean luma + 0.5)."""
  mean = jnp.floor(jnp.mean(finetune_aug.luma(x), axis=(1, 2, 3), keepdims=True) + 0.5)
  return finetune_aug.blend(mean, x, factor)


def saturation(x: jax.Array, factor: jax.Array) -> jax.Array:
  """PIL ImageEnhance.Color: blend with the luma (L) image."""
  return finetune_aug.blend(finetune_aug.luma(x), x, factor)


def color_jitter_ops(x: jax.Array, order: jax.Array, factors: jax.Array,
                     hue: bool = True) -> jax.Array:
  """ColorJitter with explicit choices: levels x [B, H, W, 3], order [B, 4] (a permutation of
  0 brightness, 1 contrast, 2 saturation, 3 hue per image), factors [B, 4] in that op order.
  `hue=False` skips the hue op where it comes in the order (torchvision's hue=None, as in
  ColorJitter(b, c, s)): PIL's RGB -> HSV -> RGB round trip is not the identity on 8 bits."""
  ops = (brightness, contrast, saturation, adjust_hue if hue else (lambda x, f: x))

  def stage(i, x):
    op = jax.lax.dynamic_index_in_dim(order, i, axis=1, keepdims=False)
    out = x
    for k, fn in enumerate(ops):
      out = jnp.where((op == k)[:, None, None, None], fn(x, factors[:, k]), out)
    return out

  return jax.lax.fori_loop(0, 4, stage, x)


def color_jitter(rng: jax.Array, x: jax.Array, brightness: float = 0.4, contrast: float = 0.4,
                 saturation: float = 0.2, hue: float = 0.1) -> jax.Array:
  """torchvision ColorJitter(brightness, contrast, saturation, hue) on levels [B, H, W, 3]:
  per image, factors ~ U(max(0, 1 - j), 1 + j) (hue ~ U(-hue, hue)) and the four ops in a
  random order (torchvision's randperm(4)). A strength of 0 switches its op off as torchvision
  does (factor 1: PIL's enhance(1.0) returns the image; hue 0: skipped). The one colour jitter
  of mim_jax: DINO/iBOT views, BEiT, data2vec, TinyMIM and ExtreMA all call it."""
  k_order, k_f = jax.random.split(rng)
  b = x.shape[0]
  order = jnp.argsort(jax.random.uniform(k_order, (b, 4)), axis=1)
  lo = jnp.asarray([max(0.0, 1 - brightness), max(0.0, 1 - contrast), max(0.0, 1 - saturation), -hue])
  hi = jnp.asarray([1 + brightness, 1 + contrast, 1 + saturation, hue])
  factors = lo + (hi - lo) * jax.random.uniform(k_f, (b, 4))
  return color_jitter_ops(x.astype(jnp.float32), order, factors, hue=float(hue) != 0.0)


def grayscale(x: jax.Array) -> jax.Array:
  """torchvision rgb_to_grayscale(num_output_channels=3) on a PIL image: L copied to RGB."""
  return jnp.broadcast_to(finetune_aug.luma(x), x.shape)


# ---------------------------------------------------------------------------------------------
# PIL's Gaussian blur.


def box_blur_radius(radius: jax.Array, passes: int = 3) -> jax.Array:
  """Pillow's `_gaussian_blur_radius`: the extended-box radius l + a whose `passes` box passes
  have the variance of a Gaussian of standard deviation `radius` (Gwosdek et al. 2011), in
  float32 as Pillow's C (each product rounded before it is summed, true divisions)."""
  r = radius.astype(jnp.float32)
  sigma2 = _exact_div(rounded(r * r, r), float(passes))
  big_l = jnp.sqrt(rounded(12.0 * sigma2, sigma2) + 1.0)
  l = jnp.floor(_exact_div(big_l - 1.0, 2.0))
  a = rounded((2 * l + 1) * (rounded(l * (l + 1), l) - rounded(3 * sigma2, l)), l)
  a = a / rounded(6 * (sigma2 - (l + 1) * (l + 1)), l)
  return l + a


def max_box_radius(max_radius: float, passes: int = 3) -> int:
  """The largest integer box radius `box_blur_radius` gives for Gaussian radii <= max_radius."""
  sigma2 = max_radius * max_radius / passes
  return int(math.floor((math.sqrt(12.0 * sigma2 + 1.0) - 1.0) / 2.0))


def _box_blur_rows(x: jax.Array, box_radius: jax.Array, max_int: int) -> jax.Array:
  """One pass of Pillow's ImagingHorizontalBoxBlur along axis 2 of uint32 levels [B, H, W, C]:
  out = (acc * ww + (left + right) * fw + 2^23) >> 24 with acc the sum over [x - r, x + r],
  left / right the pixels at x -+ (r + 1), indices clamped to the row (edges replicated),
  r = int(radius), ww = uint32(2^24 / (2 radius + 1)), fw = (2^24 - (2 r + 1) ww) / 2."""
  r = jnp.floor(box_radius).astype(jnp.uint32)
  ww = jnp.floor(jnp.float32(1 << 24) / (box_radius.astype(jnp.float32) * 2 + 1)).astype(jnp.uint32)
  fw = (jnp.uint32(1 << 24) - (2 * r + 1) * ww) // 2
  pad = max_int + 1
  w = x.shape[2]
  p = jnp.pad(x, ((0, 0), (0, 0), (pad, pad), (0, 0)), mode="edge")
  bulk = jnp.zeros(x.shape, jnp.uint32)
  for k in range(-pad, pad + 1):
    d = abs(k)
    weight = jnp.where(d <= r, ww, jnp.where(d == r + 1, fw, jnp.uint32(0)))
    bulk = bulk + p[:, :, pad + k:pad + k + w] * weight[:, None, None, None]
  return (bulk + jnp.uint32(1 << 23)) >> 24


def gaussian_blur(x: jax.Array, radius: jax.Array, max_radius: float = 2.0,
                  passes: int = 3) -> jax.Array:
  """PIL `ImageFilter.GaussianBlur(radius)` on levels [B, H, W, C], one radius [B] per image
  (each <= max_radius): `passes` box blurs along the rows, then `passes` along the columns,
  each rounded to 8 bit, as Pillow's ImagingBoxBlur."""
  box = box_blur_radius(radius.astype(jnp.float32), passes)
  max_int = max_box_radius(max_radius, passes)
  y = jnp.round(jnp.clip(x, 0, 255)).astype(jnp.uint32)
  for _ in range(passes):
    y = _box_blur_rows(y, box, max_int)
  y = y.transpose(0, 2, 1, 3)
  for _ in range(passes):
    y = _box_blur_rows(y, box, max_int)
  return y.transpose(0, 2, 1, 3).astype(x.dtype)


# ---------------------------------------------------------------------------------------------
# SimCLR's augmentation study (Chen et al. 2020, Sec. 3 and Fig. 4-5): the seven operators,
# each random per image, on 8-bit levels [B, S, S, 3]. The paper names rotate {90, 180, 270},
# cutout, Gaussian noise and Sobel filtering without their parameters (they are not in
# google-research/simclr either); the ranges below are mim_jax's choice, stated in
# configs/simclr.py. crop, colour and blur are the recipe's own operators.

STUDY_OPS = ("crop", "color", "rotate", "cutout", "noise", "blur", "sobel")


def rotate90(rng: jax.Array, x: jax.Array) -> jax.Array:
  """Each square image rotated by 90, 180 or 270 degrees (uniform; never 0)."""
  k = jax.random.randint(rng, (x.shape[0],), 1, 4)
  out = x
  for i in (1, 2, 3):
    out = jnp.where((k == i)[:, None, None, None], jnp.rot90(x, i, axes=(1, 2)), out)
  return out


def cutout(rng: jax.Array, x: jax.Array, side: Sequence[float] = (0.25, 0.5)) -> jax.Array:
  """One square per image set to 0 (black): side ~ U(side) x the image side (whole pixels,
  at least 1), centre uniform over the image, the square clipped at the borders."""
  b, h, w = x.shape[:3]
  k_s, k_y, k_x = jax.random.split(rng, 3)
  size = jnp.maximum(1.0, jnp.round(jax.random.uniform(k_s, (b,), minval=side[0], maxval=side[1])
                                    * min(h, w)))
  cy = jax.random.randint(k_y, (b,), 0, h).astype(jnp.float32)
  cx = jax.random.randint(k_x, (b,), 0, w).astype(jnp.float32)
  y0 = cy - jnp.floor(size / 2)
  x0 = cx - jnp.floor(size / 2)
  rows = jnp.arange(h, dtype=jnp.float32)[None, :]
  cols = jnp.arange(w, dtype=jnp.float32)[None, :]
  in_r = (rows >= y0[:, None]) & (rows < (y0 + size)[:, None])
  in_c = (cols >= x0[:, None]) & (cols < (x0 + size)[:, None])
  hole = in_r[:, :, None] & in_c[:, None, :]
  return jnp.where(hole[..., None], 0.0, x)


def gaussian_noise(rng: jax.Array, x: jax.Array, max_sigma: float = 25.5) -> jax.Array:
  """Additive N(0, sigma^2) per pixel and channel, sigma ~ U(0, max_sigma) levels per image
  (at most a tenth of the 8-bit range), rounded and clipped to 0..255."""
  k_s, k_n = jax.random.split(rng)
  sigma = jax.random.uniform(k_s, (x.shape[0], 1, 1, 1), maxval=max_sigma)
  return jnp.round(jnp.clip(x + sigma * jax.random.normal(k_n, x.shape), 0.0, 255.0))


def sobel(x: jax.Array) -> jax.Array:
  """Sobel filtering: the gradient magnitude sqrt(gx^2 + gy^2) of the image's luma (3x3 Sobel
  kernels, edges replicated), clipped to 0..255, rounded and copied to the three channels."""
  l = finetune_aug.luma(jnp.round(jnp.clip(x, 0.0, 255.0)))[..., 0]
  p = jnp.pad(l, ((0, 0), (1, 1), (1, 1)), mode="edge")
  h, w = l.shape[1:]

  def at(dy, dx):
    return p[:, 1 + dy:1 + dy + h, 1 + dx:1 + dx + w]

  gx = (at(-1, 1) + 2 * at(0, 1) + at(1, 1)) - (at(-1, -1) + 2 * at(0, -1) + at(1, -1))
  gy = (at(1, -1) + 2 * at(1, 0) + at(1, 1)) - (at(-1, -1) + 2 * at(-1, 0) + at(-1, 1))
  mag = jnp.round(jnp.clip(jnp.sqrt(gx * gx + gy * gy), 0.0, 255.0))
  return jnp.broadcast_to(mag[..., None], x.shape)


def study_view(rng: jax.Array, x: jax.Array, ops: Sequence[str], views_cfg) -> jax.Array:
  """The study's transformed branch: `ops` (of STUDY_OPS) applied in that order to levels
  x [B, S, S, 3]. crop: RandomResizedCrop(views_cfg.global_scale, ratio) + flip at the same
  size; color: the views' jitter with its probability, then greyscale with its probability;
  blur: PIL's Gaussian blur of radius ~ U(views_cfg.blur_radius), always; rotate, cutout,
  noise, sobel: the functions above, always."""
  v = views_cfg
  b, size = x.shape[0], x.shape[1]
  x = jnp.round(jnp.clip(x.astype(jnp.float32), 0.0, 255.0))
  for op, key in zip(ops, jax.random.split(rng, max(1, len(ops)))):
    if op == "crop":
      x = jnp.round(jnp.clip(augment.random_resized_crop_flip(
          key, x, out_size=size, scale=tuple(v.global_scale), ratio=tuple(v.ratio),
          hflip=bool(v.hflip)), 0.0, 255.0))
    elif op == "color":
      k_p, k_j, k_g = jax.random.split(key, 3)
      x = _where(jax.random.uniform(k_p, (b,)) < float(v.jitter_prob),
                 color_jitter(k_j, x, *tuple(v.jitter)), x)
      x = _where(jax.random.uniform(k_g, (b,)) < float(v.gray_prob), grayscale(x), x)
    elif op == "blur":
      k_r, _ = jax.random.split(key)
      lo, hi = (float(r) for r in v.blur_radius)
      x = gaussian_blur(x, jax.random.uniform(k_r, (b,), minval=lo, maxval=hi), max_radius=hi)
    elif op == "rotate":
      x = rotate90(key, x)
    elif op == "cutout":
      x = cutout(key, x)
    elif op == "noise":
      x = gaussian_noise(key, x)
    elif op == "sobel":
      x = sobel(x)
    else:
      raise ValueError(f"unknown augmentation {op!r}: use {', '.join(STUDY_OPS)}")
  return x


# ---------------------------------------------------------------------------------------------
# Views.


def _where(flags: jax.Array, a: jax.Array, b: jax.Array) -> jax.Array:
  return jnp.where(flags[:, None, None, None], a, b)


def dino_view(rng: jax.Array, images: jax.Array, *, size: int, scale: Sequence[float],
              ratio: Sequence[float] = (3 / 4, 4 / 3), hflip: bool = True,
              jitter_prob: float = 0.8, jitter: Sequence[float] = (0.4, 0.4, 0.2, 0.1),
              gray_prob: float = 0.2, blur_prob=0.0, blur_radius: Sequence[float] = (0.1, 2.0),
              solarize_prob=0.0, crop: bool = True) -> jax.Array:
  """One DINO-augmented view of every image: uint8 / float levels [B, H, W, 3] -> 8-bit levels
  (float32) [B, size, size, 3]. The order is the official one: crop, flip, jitter (p), grey (p),
  blur (p), solarize (p). `blur_prob` and `solarize_prob` are scalars or per-image [B].
  `crop=False`: the images are crops already (cut and flipped on the host from the decoded
  image, `host_crop.HostMultiCrop`); only the colour ops run, with the same draws."""
  b = images.shape[0]
  k_crop, k_jit_p, k_jit, k_gray, k_blur_p, k_blur, k_sol = jax.random.split(rng, 7)
  if crop:
    x = augment.random_resized_crop_flip(k_crop, images, out_size=size, scale=tuple(scale),
                                         ratio=tuple(ratio), hflip=hflip)
  else:
    x = images.astype(jnp.float32)
  x = jnp.round(jnp.clip(x, 0.0, 255.0))
  if jitter_prob > 0:
    x = _where(jax.random.uniform(k_jit_p, (b,)) < jitter_prob, color_jitter(k_jit, x, *jitter), x)
  if gray_prob > 0:
    x = _where(jax.random.uniform(k_gray, (b,)) < gray_prob, grayscale(x), x)
  blur_prob = jnp.broadcast_to(jnp.asarray(blur_prob, jnp.float32), (b,))
  radius = jax.random.uniform(k_blur, (b,), minval=blur_radius[0], maxval=blur_radius[1])
  blurred = gaussian_blur(x, radius, max_radius=float(blur_radius[1]))
  x = _where(jax.random.uniform(k_blur_p, (b,)) <= blur_prob, blurred, x)  # utils.GaussianBlur: <=
  solarize_prob = jnp.broadcast_to(jnp.asarray(solarize_prob, jnp.float32), (b,))
  sol = finetune_aug.solarize(x, jnp.full((b,), 128.0))
  return _where(jax.random.uniform(k_sol, (b,)) < solarize_prob, sol, x)   # utils.Solarization: <


def multi_crop(rng: jax.Array, images: jax.Array, *, global_size: int, local_size: int = 96,
               num_global: int = 2, num_local: int = 0,
               global_scale: Sequence[float] = (0.14, 1.0),
               local_scale: Sequence[float] = (0.05, 0.4),
               ratio: Sequence[float] = (3 / 4, 4 / 3), hflip: bool = True,
               jitter_prob: float = 0.8, jitter: Sequence[float] = (0.4, 0.4, 0.2, 0.1),
               gray_prob: float = 0.2, blur_probs: Sequence[float] = (1.0, 0.1, 0.5),
               blur_radius: Sequence[float] = (0.1, 2.0), solarize_prob: float = 0.2,
               mean: Sequence[float] = augment.IMAGENET_MEAN,
               std: Sequence[float] = augment.IMAGENET_STD, crops: Optional[dict] = None) -> dict:
  """iBOT's DataAugmentationiBOT on a batch: {'global': [B, num_global, S, S, 3],
  'local': [B, num_local, s, s, 3]} (no 'local' entry when num_local is 0), normalised.

  `crops` ({'global': uint8 [B, num_global, S, S, 3], 'local': ...}): the views already cut
  and flipped on the host from the decoded image (streamed data, `host_crop.HostMultiCrop`);
  then `images` is unused and only the colour ops run here.

  blur_probs = (first global view, other global views, local views); solarisation only on the
  global views after the first. Every view of an image has its own draws; the views of one
  size are made in one batched call. Batch first, so gradient accumulation splits every view
  alike.
  """
  if num_global < 1:
    raise ValueError("multi_crop needs at least one global view (num_global >= 1)")
  b = (images if crops is None else crops["global"]).shape[0]
  k_global, k_local = jax.random.split(rng)
  common = dict(ratio=ratio, hflip=hflip, jitter_prob=jitter_prob, jitter=jitter,
                gray_prob=gray_prob, blur_radius=blur_radius)

  def views_of(key, n, size, scale, blur, sol, name):
    if crops is None:
      tiled = jnp.concatenate([images] * n, axis=0) if n > 1 else images    # view-major
    else:
      cut = crops[name]
      if cut.shape[1:3] != (n, size):
        raise ValueError(f"host crops {name!r} have shape {cut.shape[1:]}; the views want {n} "
                         f"of {size} px")
      tiled = jnp.swapaxes(cut, 0, 1).reshape((n * b,) + cut.shape[2:])      # view-major
    x = dino_view(key, tiled, size=size, scale=scale, blur_prob=jnp.repeat(jnp.asarray(blur, jnp.float32), b),
                  solarize_prob=jnp.repeat(jnp.asarray(sol, jnp.float32), b), crop=crops is None,
                  **common)
    x = augment.normalize(x, mean, std).reshape((n, b) + x.shape[1:])
    return jnp.swapaxes(x, 0, 1)

  g_blur = [blur_probs[0]] + [blur_probs[1]] * (num_global - 1)
  g_sol = [0.0] + [solarize_prob] * (num_global - 1)
  out = {"global": views_of(k_global, num_global, global_size, global_scale, g_blur, g_sol, "global")}
  if num_local:
    out["local"] = views_of(k_local, num_local, local_size, local_scale,
                            [blur_probs[2]] * num_local, [0.0] * num_local, "local")
  return out


def crop_specs(views_cfg, input_cfg, image_size: Optional[int] = None) -> tuple:
  """The `host_crop.CropSpec`s of a method's `views` config block (what `multi_crop` cuts):
  'global' (num_global at the input size) and 'local' (num_local, when > 0)."""
  from mim_jax.data.host_crop import CropSpec  # pylint: disable=g-import-not-at-top
  v = views_cfg
  common = dict(ratio=tuple(float(r) for r in v.ratio), hflip=bool(v.hflip))
  specs = [CropSpec("global", int(v.num_global), int(image_size or input_cfg.image_size),
                    tuple(float(x) for x in v.global_scale), **common)]
  if int(v.num_local):
    specs.append(CropSpec("local", int(v.num_local), int(v.local_size),
                          tuple(float(x) for x in v.local_scale), **common))
  return tuple(specs)


def views_from_config(rng: jax.Array, images: jax.Array, views_cfg, input_cfg,
                      image_size: Optional[int] = None) -> dict:
  """`multi_crop` with the options of a method's `views` config block (keys as in
  `multi_crop`; the global size is input.image_size). `images` may be the host's crops
  ({'global': ..., 'local': ...}, streamed data): then only the colour ops run."""
  v = views_cfg
  crops = images if isinstance(images, dict) else None
  return multi_crop(
      rng, None if crops is not None else images, crops=crops, global_size=image_size or input_cfg.image_size, local_size=int(v.local_size),
      num_global=int(v.num_global), num_local=int(v.num_local),
      global_scale=tuple(v.global_scale), local_scale=tuple(v.local_scale),
      ratio=tuple(v.ratio), hflip=bool(v.hflip), jitter_prob=float(v.jitter_prob),
      jitter=tuple(v.jitter), gray_prob=float(v.gray_prob), blur_probs=tuple(v.blur_probs),
      blur_radius=tuple(v.blur_radius), solarize_prob=float(v.solarize_prob),
      mean=input_cfg.mean, std=input_cfg.std)
