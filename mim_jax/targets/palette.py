"""iGPT's colour palette (Chen et al. 2020, openai/image-gpt): pure functions.

The paper's 9-bit palette is 512 k-means centres of RGB pixels scaled to [-1, 1] (the official
`kmeans_centers.npy`). An image becomes a sequence by resizing it to the input resolution (IR)
and replacing every pixel by the index of its nearest centre (squared Euclidean distance,
`src/utils.py:color_quantize`), in raster order; `src/run.py:sample` decodes an index back to
`rint(127.5 * (centre + 1))`.

Here the palette is computed from the training data (`compute_palette`): pixels of a seeded
subset of the pretraining images at the IR, a seeded sample of them clustered by Lloyd's
k-means started from distinct sampled pixels, cached in a .npy keyed by everything it depends
on (`palette_key`).
"""
from __future__ import annotations

import hashlib
import json
import logging
import os
from typing import Any, Optional, Sequence

import jax
import jax.numpy as jnp
import numpy as np

VOCAB = 512          # the 9-bit palette


def default_palette(k: int = VOCAB) -> np.ndarray:
  """A data-free palette: the centres of a uniform n x n x n grid of [-1, 1]^3 (n = 8 for 512
  colours), in R-major order; what the GPT backbone uses when it is given no palette."""
  n = round(k ** (1 / 3))
  if n ** 3 != k:
    raise ValueError(f"default_palette: {k} is not a cube; give the palette explicitly")
  levels = (np.arange(n, dtype=np.float32) + 0.5) / n * 2.0 - 1.0
  r, g, b = np.meshgrid(levels, levels, levels, indexing="ij")
  return np.stack([r.ravel(), g.ravel(), b.ravel()], axis=1).astype(np.float32)


def to_unit_range(images: jax.Array, mean: Sequence[float], std: Sequence[float]) -> jax.Array:
  """Normalised images ((x - mean) / std of [0, 1] levels) -> pixels in [-1, 1] (the official
  palette's space)."""
  x = images.astype(jnp.float32) * jnp.asarray(std, jnp.float32) + jnp.asarray(mean, jnp.float32)
  return x * 2.0 - 1.0


def from_unit_range(pixels: jax.Array, mean: Sequence[float], std: Sequence[float]) -> jax.Array:
  """The inverse of `to_unit_range`."""
  x = (pixels.astype(jnp.float32) + 1.0) * 0.5
  return (x - jnp.asarray(mean, jnp.float32)) / jnp.asarray(std, jnp.float32)


def squared_distances(x: jax.Array, centres: jax.Array) -> jax.Array:
  """[N, 3] x [K, 3] -> [N, K]: |x|^2 - 2 x.c + |c|^2, as utils.squared_euclidean_distance."""
  x = x.astype(jnp.float32)
  c = centres.astype(jnp.float32)
  return (jnp.sum(x * x, -1, keepdims=True) - 2.0 * jnp.dot(x, c.T, precision="highest")
          + jnp.sum(c * c, -1)[None])


def quantize(pixels: jax.Array, centres: jax.Array) -> jax.Array:
  """Pixels [..., 3] in [-1, 1] -> int32 [...]: the index of the nearest centre (the first on
  ties), utils.color_quantize."""
  shape = pixels.shape[:-1]
  d = squared_distances(pixels.reshape(-1, 3), centres)
  return jnp.argmin(d, axis=1).astype(jnp.int32).reshape(shape)


def dequantize(tokens: jax.Array, centres: jax.Array) -> jax.Array:
  """int [...] -> the centres' colours [..., 3] in [-1, 1]."""
  return jnp.asarray(centres, jnp.float32)[tokens]


def resize(images: jax.Array, resolution: int) -> jax.Array:
  """[B, H, W, C] -> [B, r, r, C] (linear, antialiased when shrinking); unchanged at size r."""
  b, h, w, c = images.shape
  if (h, w) == (resolution, resolution):
    return images
  return jax.image.resize(images.astype(jnp.float32), (b, resolution, resolution, c), "linear",
                          antialias=True)


def image_tokens(images: jax.Array, centres: jax.Array, resolution: int,
                 mean: Sequence[float], std: Sequence[float]) -> jax.Array:
  """Normalised images [B, H, W, 3] -> the palette sequence int32 [B, r*r] in raster order
  (row by row, left to right) at the input resolution r."""
  pix = to_unit_range(resize(images, resolution), mean, std)
  return quantize(pix, centres).reshape(images.shape[0], resolution * resolution)


def tokens_to_images(tokens: jax.Array, centres: jax.Array, resolution: int,
                     mean: Sequence[float], std: Sequence[float]) -> jax.Array:
  """int [B, r*r] -> normalised images [B, r, r, 3] of the centres' colours."""
  pix = dequantize(tokens, centres).reshape(tokens.shape[0], resolution, resolution, 3)
  return from_unit_range(pix, mean, std)


# ----------------------------------------------------------------------------- k-means

def _assign(pixels: jax.Array, centres: jax.Array, chunk: int) -> jax.Array:
  """Nearest-centre index of every pixel, `chunk` pixels at a time (bounded memory)."""
  n = pixels.shape[0]
  pad = (-n) % chunk
  x = jnp.pad(pixels, ((0, pad), (0, 0))).reshape(-1, chunk, 3)
  idx = jax.lax.map(lambda xc: jnp.argmin(squared_distances(xc, centres), axis=1), x)
  return idx.reshape(-1)[:n].astype(jnp.int32)


def kmeans(pixels: np.ndarray, k: int = VOCAB, iters: int = 30, seed: int = 0,
           chunk: int = 8192) -> np.ndarray:
  """Lloyd's k-means of `pixels` [N, 3] (float): k distinct pixels drawn with
  numpy.random.default_rng(seed) as the start, then `iters` rounds of nearest-centre assignment
  and mean update (a centre left without pixels keeps its place). Deterministic for a seed.
  Returns float32 [k, 3]."""
  pixels = np.asarray(pixels, np.float32)
  if pixels.ndim != 2 or pixels.shape[1] != 3:
    raise ValueError(f"kmeans takes pixels [N, 3], got shape {pixels.shape}")
  uniq = np.unique(pixels, axis=0)
  if uniq.shape[0] < k:
    raise ValueError(f"kmeans: only {uniq.shape[0]} distinct colours for {k} centres; sample "
                     f"more pixels (igpt.palette_pixels) or images (igpt.palette_images)")
  rng = np.random.default_rng(seed)
  start = uniq[np.sort(rng.choice(uniq.shape[0], size=k, replace=False))]

  @jax.jit
  def run(x, c0):
    def step(c, _):
      idx = _assign(x, c, chunk)
      sums = jax.ops.segment_sum(x, idx, num_segments=k)
      counts = jax.ops.segment_sum(jnp.ones_like(idx, jnp.float32), idx, num_segments=k)
      return jnp.where(counts[:, None] > 0, sums / jnp.maximum(counts, 1.0)[:, None], c), None
    c, _ = jax.lax.scan(step, c0, None, length=iters)
    return c

  return np.asarray(run(jnp.asarray(pixels), jnp.asarray(start)), np.float32)


# ----------------------------------------------------------------------------- from the data

def sample_pixels(input_cfg: Any, resolution: int, num_images: int, num_pixels: int,
                  seed: int = 0) -> np.ndarray:
  """[num_pixels, 3] float32 in [-1, 1]: the pixels of a fixed seeded subset of `num_images`
  pretraining images (pipeline.eval_batches 'pretrain': no augmentation) resized to the IR, a
  seeded sample of `num_pixels` of them (all when fewer)."""
  from mim_jax.data import pipeline  # pylint: disable=g-import-not-at-top
  parts = []
  for images, _ in pipeline.eval_batches(input_cfg, "pretrain", 256, max_examples=num_images or None):
    x = resize(jnp.asarray(images, jnp.float32) / 255.0, resolution)
    parts.append(np.asarray(x * 2.0 - 1.0, np.float32).reshape(-1, 3))
  if not parts:
    raise ValueError("the palette needs training images: the pretraining split is empty")
  pix = np.concatenate(parts)
  if num_pixels and pix.shape[0] > num_pixels:
    rng = np.random.default_rng(seed)
    pix = pix[np.sort(rng.choice(pix.shape[0], size=num_pixels, replace=False))]
  return pix


def palette_key(input_cfg: Any, **settings) -> str:
  """A hash of what the palette depends on: the data config (source, splits, hold-out,
  subset), the image size and the palette settings."""
  data = input_cfg.data.to_dict() if hasattr(input_cfg.data, "to_dict") else dict(input_cfg.data)
  for k in ("cache_dir", "in_memory"):
    data.pop(k, None)
  blob = json.dumps({"data": data, "image_size": int(input_cfg.image_size), **settings},
                    sort_keys=True, default=str)
  return hashlib.sha1(blob.encode()).hexdigest()[:16]


def compute_palette(input_cfg: Any, *, resolution: int, k: int = VOCAB, num_images: int = 0,
                    num_pixels: int = 100_000, iters: int = 30, seed: int = 0,
                    cache_dir: Optional[str] = None) -> np.ndarray:
  """The data's palette float32 [k, 3] in [-1, 1], read from
  `<cache_dir>/igpt_palettes/<palette_key>.npy` when computed before, else computed
  (`sample_pixels`, `kmeans`) and written there. `cache_dir` defaults to
  config.input.data.cache_dir, else ~/.cache/mim_jax."""
  settings = dict(resolution=int(resolution), k=int(k), num_images=int(num_images),
                  num_pixels=int(num_pixels), iters=int(iters), seed=int(seed))
  root = cache_dir or input_cfg.data.get("cache_dir", "") or "~/.cache/mim_jax"
  path = os.path.join(os.path.expanduser(root), "igpt_palettes",
                      palette_key(input_cfg, **settings) + ".npy")
  if os.path.exists(path):
    centres = np.load(path)
    if centres.shape == (k, 3):
      return centres.astype(np.float32)
    logging.warning("%s holds shape %s, not (%d, 3): recomputing", path, centres.shape, k)
  pix = sample_pixels(input_cfg, resolution, num_images, num_pixels, seed)
  logging.info("iGPT palette: k-means of %d pixels into %d colours (%d rounds)", pix.shape[0], k,
               iters)
  centres = kmeans(pix, k, iters, seed)
  if jax.process_index() == 0:
    os.makedirs(os.path.dirname(path), exist_ok=True)
    tmp = f"{path}.{os.getpid()}.tmp.npy"
    np.save(tmp, centres)
    os.replace(tmp, path)
  return centres
