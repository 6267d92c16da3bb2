"""HOG targets: MaskFeat's histograms of oriented gradients, as pure jit-able JAX functions.

Exact to facebookresearch/SlowFast `slowfast/models/operators.py` (`HOGLayerC`) with the
settings `slowfast/models/masked.py` (`MaskMViT`) builds it with for images (9 bins, 8-pixel
cells, no Gaussian window), and to `MaskMViT._get_hog_label_2d` for the per-patch layout:

  * the input is the normalised image (what the encoder sees), each RGB channel on its own;
  * reflect padding by one pixel, then the 3x3 Sobel pair applied as a cross-correlation
    (`F.conv2d`): gx with [[1, 0, -1], [2, 0, -2], [1, 0, -1]] (left minus right) and gy with
    its transpose (top minus bottom);
  * magnitude sqrt(gx^2 + gy^2); orientation atan2(gx, gy) (gx first, as the official code)
    scaled by nbins / pi to [-nbins, nbins], floored and taken modulo nbins (floor-mod, so
    -9..8 fold onto 0..8: opposite gradients share a bin, unsigned orientation);
  * each pixel adds its magnitude to its bin; magnitudes are summed over non-overlapping
    cell x cell windows (a remainder at the border is an error here; unfold drops it there);
  * every cell's histogram is L2-normalised over its bins, per channel:
    h / max(||h||_2, 1e-12) (`F.normalize(p=2, dim=bins)`);
  * a patch's target is its (patch / cell)^2 cells x nbins x 3 channels, flattened in the
    official order (channel, bin, cell row, cell column): 2 x 2 x 9 x 3 = 108 values for
    16-pixel patches and 8-pixel cells.

The Gaussian window of `HOGLayerC(gaussian_window=...)` is not implemented: MaskFeat's image
and video models build the layer without it.
"""
from __future__ import annotations

import functools
import math

import jax
import jax.numpy as jnp


def sobel(images: jax.Array) -> tuple[jax.Array, jax.Array]:
  """[B, H, W, C] -> (gx, gy), each [B, H, W, C]: the official Sobel cross-correlation of the
  reflect-padded image, channel by channel (gx = left - right, gy = top - bottom)."""
  x = jnp.pad(images, ((0, 0), (1, 1), (1, 1), (0, 0)), mode="reflect")
  h, w = images.shape[1], images.shape[2]

  def at(dy, dx):          # the padded image shifted by (dy, dx) in 0..2
    return x[:, dy:dy + h, dx:dx + w]

  gx = (at(0, 0) - at(0, 2)) + 2.0 * (at(1, 0) - at(1, 2)) + (at(2, 0) - at(2, 2))
  gy = (at(0, 0) + 2.0 * at(0, 1) + at(0, 2)) - (at(2, 0) + 2.0 * at(2, 1) + at(2, 2))
  return gx, gy


def orientation_bins(gx: jax.Array, gy: jax.Array, nbins: int = 9) -> jax.Array:
  """int32 bin of every gradient: floor(atan2(gx, gy) / pi * nbins) mod nbins."""
  phase = jnp.arctan2(gx, gy) / math.pi * nbins
  return jnp.mod(jnp.floor(phase).astype(jnp.int32), nbins)


@functools.partial(jax.jit, static_argnames=("nbins", "cell"))
def hog(images: jax.Array, nbins: int = 9, cell: int = 8) -> jax.Array:
  """Per-channel, per-cell L2-normalised orientation histograms.

  images [B, H, W, C] (normalised, float) -> [B, H / cell, W / cell, C, nbins] float32.
  Equal to `HOGLayerC(nbins, pool=cell)(x)` of the official code, permuted from its
  [B, C, nbins, H / cell, W / cell] layout.
  """
  b, h, w, c = images.shape
  if h % cell or w % cell:
    raise ValueError(f"image {h}x{w} is not divisible by the HOG cell size {cell}: "
                     "set config.maskfeat.hog_cell to a divisor of the image size")
  x = jax.lax.stop_gradient(images.astype(jnp.float32))
  gx, gy = sobel(x)
  magnitude = jnp.sqrt(gx * gx + gy * gy)
  bins = orientation_bins(gx, gy, nbins)
  votes = jax.nn.one_hot(bins, nbins, dtype=jnp.float32) * magnitude[..., None]   # [B,H,W,C,nbins]
  hist = votes.reshape(b, h // cell, cell, w // cell, cell, c, nbins).sum(axis=(2, 4))
  norm = jnp.sqrt(jnp.sum(hist * hist, axis=-1, keepdims=True))
  return hist / jnp.maximum(norm, 1e-12)


def cells_to_patches(cells: jax.Array, cells_per_patch: int) -> jax.Array:
  """[B, Gh*k, Gw*k, C, nbins] cell histograms -> [B, Gh*Gw, C*nbins*k*k] per-patch targets,
  patches in row-major order and each row ordered (channel, bin, cell row, cell column) as
  `MaskMViT._get_hog_label_2d` (flatten(1, 2), permute, unfold rows, unfold columns)."""
  b, hh, ww, c, nbins = cells.shape
  k = cells_per_patch
  if hh % k or ww % k:
    raise ValueError(f"a {hh}x{ww} grid of HOG cells does not split into {k}x{k}-cell patches")
  x = cells.reshape(b, hh // k, k, ww // k, k, c, nbins).transpose(0, 1, 3, 5, 6, 2, 4)
  return x.reshape(b, (hh // k) * (ww // k), c * nbins * k * k)


def hog_target(images: jax.Array, patch: int, nbins: int = 9, cell: int = 8) -> jax.Array:
  """MaskFeat's regression target: [B, H, W, C] -> [B, (H/patch)*(W/patch), C*nbins*(patch/cell)^2]."""
  if patch % cell:
    raise ValueError(f"patch size {patch} is not a multiple of the HOG cell size {cell}")
  return cells_to_patches(hog(images, nbins=nbins, cell=cell), patch // cell)


def hog_target_3d(clips: jax.Array, temporal_stride: int, patch: int, nbins: int = 9,
                  cell: int = 8) -> jax.Array:
  """MaskFeat's video target (``slowfast/models/masked.py`` `MaskMViT._get_hog_label_3d`):
  every ``temporal_stride``-th frame of the normalised clips [B, T, H, W, C] (the patch
  embedding's temporal stride, PATCH_STRIDE[0]) gets the image target `hog_target`; tokens in
  (t, h, w) order -> [B, (T / stride) * (H / patch) * (W / patch), C * nbins * (patch / cell)^2]."""
  frames = clips[:, ::temporal_stride]
  b, t = frames.shape[:2]
  out = hog_target(frames.reshape((b * t,) + frames.shape[2:]), patch, nbins=nbins, cell=cell)
  return out.reshape(b, t * out.shape[1], out.shape[2])


def target_dim(patch: int, cell: int, nbins: int = 9, channels: int = 3) -> int:
  """Length of one patch's HOG target: channels * nbins * (patch / cell)^2."""
  return channels * nbins * (patch // cell) ** 2
