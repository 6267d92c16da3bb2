"""On-device augmentation in pure JAX: RandomResizedCrop + horizontal flip, and normalisation.

Everything here is jit-able and vectorised over the batch (no Python loop over samples), so
in-memory datasets are augmented on the accelerator, batch by batch, inside the train step.

Crop boxes follow torchvision's ``RandomResizedCrop.get_params``: up to 10 attempts, each
drawing an area fraction ~ U(scale) and a log aspect ratio ~ U(log ratio); the first attempt
whose box fits in the image wins, and if none fits, the central crop with the aspect ratio
clamped into ``ratio``. Unlike torchvision, box sides and offsets are not rounded to whole
pixels: the box is continuous and resampled exactly by ``jax.image.scale_and_translate``.
"""
from __future__ import annotations

import math
from typing import Sequence

import jax
import jax.numpy as jnp

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)

_ATTEMPTS = 10


def fallback_crop_size(height: int, width: int, ratio) -> tuple[float, float]:
  """torchvision's RandomResizedCrop fallback: (w, h) of the whole image with its aspect ratio
  clamped into `ratio`."""
  in_ratio = width / height
  if in_ratio < min(ratio):
    return float(width), width / min(ratio)
  if in_ratio > max(ratio):
    return height * max(ratio), float(height)
  return float(width), float(height)


def sample_crop_boxes(rng: jax.Array, batch: int, height: int, width: int, *,
                      scale: Sequence[float] = (0.2, 1.0),
                      ratio: Sequence[float] = (3 / 4, 4 / 3)) -> jax.Array:
  """Samples one RandomResizedCrop box per image.

  Args:
    rng: PRNG key.
    batch: number of boxes.
    height, width: image size in pixels.
    scale: range of the box area as a fraction of the image area.
    ratio: range of the box aspect ratio (width / height).

  Returns:
    float32 [batch, 4]: (top, left, box_height, box_width) in pixels, continuous; every box
    lies inside the image.
  """
  k_area, k_ratio, k_y, k_x = jax.random.split(rng, 4)
  area = float(height * width)
  shape = (batch, _ATTEMPTS)
  target = area * jax.random.uniform(k_area, shape, minval=scale[0], maxval=scale[1])
  log_r = jax.random.uniform(k_ratio, shape, minval=math.log(ratio[0]), maxval=math.log(ratio[1]))
  aspect = jnp.exp(log_r)
  w = jnp.sqrt(target * aspect)
  h = jnp.sqrt(target / aspect)
  fits = (w <= width) & (h <= height) & (w > 0) & (h > 0)
  first = jnp.argmax(fits, axis=1)                         # first fitting attempt (0 if none)
  any_fit = jnp.any(fits, axis=1)
  w = jnp.take_along_axis(w, first[:, None], axis=1)[:, 0]
  h = jnp.take_along_axis(h, first[:, None], axis=1)[:, 0]

  # Fallback: the central crop whose aspect ratio is the image's, clamped into `ratio`.
  fw, fh = fallback_crop_size(height, width, ratio)
  w = jnp.where(any_fit, w, fw)
  h = jnp.where(any_fit, h, fh)
  # Guard against float round-off in sqrt: the box must never exceed the image.
  w = jnp.minimum(w, float(width))
  h = jnp.minimum(h, float(height))
  top = jnp.where(any_fit, jax.random.uniform(k_y, (batch,)) * (height - h), (height - h) / 2)
  left = jnp.where(any_fit, jax.random.uniform(k_x, (batch,)) * (width - w), (width - w) / 2)
  return jnp.stack([top, left, h, w], axis=1).astype(jnp.float32)


def crop_and_resize(images: jax.Array, boxes: jax.Array, out_size: int) -> jax.Array:
  """Resamples box ``boxes[i]`` of ``images[i]`` to ``out_size`` x ``out_size`` (bilinear).

  Args:
    images: [B, H, W, C], any real dtype (uint8 is converted to float32).
    boxes: [B, 4] (top, left, height, width) in pixels, as from `sample_crop_boxes`.
    out_size: output side length.

  Returns:
    float32 [B, out_size, out_size, C]. No antialiasing: at the 32 px the in-memory datasets
    use, crops are upsampled or barely downsampled, where antialiasing changes nothing.
  """
  images = images.astype(jnp.float32)

  def one(image, box):
    top, left, h, w = box[0], box[1], box[2], box[3]
    scale = jnp.stack([out_size / h, out_size / w])
    translation = -jnp.stack([top, left]) * scale
    return jax.image.scale_and_translate(
        image, (out_size, out_size, image.shape[-1]), (0, 1), scale, translation,
        method="linear", antialias=False)

  return jax.vmap(one)(images, boxes)


def apply_hflip(images: jax.Array, flip: jax.Array) -> jax.Array:
  """Mirrors ``images[i]`` left-right where boolean ``flip[i]`` is True."""
  return jnp.where(flip[:, None, None, None], images[:, :, ::-1, :], images)


def random_resized_crop_flip(rng: jax.Array, images: jax.Array, *, out_size: int,
                             scale: Sequence[float] = (0.2, 1.0),
                             ratio: Sequence[float] = (3 / 4, 4 / 3),
                             hflip: bool = True) -> jax.Array:
  """RandomResizedCrop (bilinear, see `crop_and_resize`) then a random horizontal flip.

  Args:
    rng: PRNG key; the same key gives the same output.
    images: [B, H, W, C] with values in 0..255 (uint8 or float).
    out_size: output side length.
    scale, ratio: as in `sample_crop_boxes`.
    hflip: flip each image with probability 0.5.

  Returns:
    float32 [B, out_size, out_size, C], values in 0..255.
  """
  k_box, k_flip = jax.random.split(rng)
  b, h, w = images.shape[0], images.shape[1], images.shape[2]
  boxes = sample_crop_boxes(k_box, b, h, w, scale=scale, ratio=ratio)
  out = crop_and_resize(images, boxes, out_size)
  if hflip:
    out = apply_hflip(out, jax.random.bernoulli(k_flip, 0.5, (b,)))
  return out


def normalize(images: jax.Array, mean: Sequence[float] = IMAGENET_MEAN,
              std: Sequence[float] = IMAGENET_STD) -> jax.Array:
  """Maps 0..255 values to ``(x / 255 - mean) / std`` per channel, float32."""
  mean = jnp.asarray(mean, jnp.float32)
  std = jnp.asarray(std, jnp.float32)
  return (images.astype(jnp.float32) / 255.0 - mean) / std


def _keys_cubic(x: jax.Array, a: float = -0.5) -> jax.Array:
  """The Keys cubic convolution kernel with a = -0.5 (Pillow's and torchvision's bicubic)."""
  x = jnp.abs(x)
  near = ((a + 2.0) * x - (a + 3.0)) * x * x + 1.0
  far = ((a * x - 5.0 * a) * x + 8.0 * a) * x - 4.0 * a
  return jnp.where(x < 1.0, near, jnp.where(x < 2.0, far, 0.0))


def _bicubic_weights(start: jax.Array, length: jax.Array, valid: jax.Array, in_size: int,
                     out_size: int) -> jax.Array:
  """[B, out_size, in_size] weights resampling the span [start, start + length) of each row of
  inputs to ``out_size`` samples, as Pillow's antialiased bicubic resize does: sample i is
  centred at start + (i + 0.5) * scale (scale = length / out_size), the kernel is stretched by
  max(scale, 1), and the weights on inputs j < valid are normalised to sum to one (Pillow
  clips its window to the image the same way)."""
  scale = length / out_size
  stretch = jnp.maximum(scale, 1.0)
  centre = start[:, None] + (jnp.arange(out_size, dtype=jnp.float32) + 0.5)[None] * scale[:, None]
  pos = jnp.arange(in_size, dtype=jnp.float32)
  w = _keys_cubic((pos[None, None] + 0.5 - centre[:, :, None]) / stretch[:, None, None])
  w = jnp.where(pos[None, None] < valid[:, None, None], w, 0.0)
  return w / jnp.sum(w, axis=-1, keepdims=True)


def unpack_regions(rows: jax.Array, offset: jax.Array, valid: jax.Array, canvas: int
                   ) -> jax.Array:
  """The regions `regions.PackRegions` packed, each at the top left of a canvas.

  Args:
    rows: uint8 [G, R * 3]: one row per device group, regions stored one after another.
    offset: int32 [B]: each region's first pixel in its row (the batch's G groups of B / G
      consecutive images).
    valid: int32 [B, 2]: each region's (height, width).
    canvas: the canvas side; no region is larger.

  Returns:
    uint8 [B, canvas, canvas, 3]. Inside ``valid`` the region's pixels; beyond it whatever
    follows in the row (`resize_regions` gives those pixels zero weight).
  """
  groups, batch = rows.shape[0], offset.shape[0]
  per = batch // groups
  pixels = rows.reshape(groups, -1, 3)
  width = valid[:, 1].reshape(groups, per)
  # Canvas row y of image i starts at offset_i + y * width_i; each is read as `canvas` pixels.
  starts = offset.reshape(groups, per)[..., None] + jnp.arange(canvas)[None, None] * width[..., None]

  def read(row, start):
    return jax.lax.dynamic_slice(row, (start, 0), (canvas, 3))

  read_group = jax.vmap(jax.vmap(read, in_axes=(None, 0)), in_axes=(None, 0))
  out = jax.vmap(read_group)(pixels, starts)            # [G, per, canvas, canvas, 3]
  return out.reshape((batch, canvas, canvas, 3))


def resize_regions(regions: jax.Array, boxes: jax.Array, valid: jax.Array, flip: jax.Array,
                   out_size: int) -> jax.Array:
  """The device half of ``input.device_resize``: bicubic (antialiased) resampling of box
  ``boxes[i]`` of the decoded region ``regions[i]``, then the flip, as the host path's Pillow
  resize + flip does.

  Args:
    regions: uint8 [B, C, C, 3]: each region's pixels at the top left (`unpack_regions`),
      anything beyond ``valid``.
    boxes: float32 [B, 4]: (top, left, height, width) of the crop inside its region.
    valid: int32 [B, 2]: the region's (height, width); weights beyond it are zero, so edges
      where the region ends at the image's edge are treated as Pillow treats the image's.
    flip: bool [B]: mirror left-right.
    out_size: output side.

  Returns:
    float32 [B, out_size, out_size, 3], whole levels 0..255. Pillow's resize differs by its
    22-bit fixed-point weights and its rounding to uint8 between the two passes; here the
    passes are float32 matmuls at full precision, rounded once (the tests hold the two to
    under half a level on average, at most 3).
  """
  size_y, size_x = regions.shape[1], regions.shape[2]
  boxes = boxes.astype(jnp.float32)
  valid = valid.astype(jnp.float32)
  wy = _bicubic_weights(boxes[:, 0], boxes[:, 2], valid[:, 0], size_y, out_size)
  wx = _bicubic_weights(boxes[:, 1], boxes[:, 3], valid[:, 1], size_x, out_size)
  x = regions.astype(jnp.float32)
  hi = jax.lax.Precision.HIGHEST
  x = jnp.einsum("bij,bjkc->bikc", wy, x, precision=hi)
  x = jnp.einsum("blk,bikc->bilc", wx, x, precision=hi)
  return apply_hflip(jnp.clip(jnp.round(x), 0.0, 255.0), flip)
