"""Mask generators: pure functions of an rng and static shapes, jit-able, no Python randomness.

Every generator returns the same number of masked tokens in every sample, so shapes are static
and one compiled step serves the whole run.
"""
from __future__ import annotations

import math
from typing import NamedTuple

import jax
import jax.numpy as jnp


class ShuffleMask(NamedTuple):
  """MAE's per-sample random masking by sorting uniform noise.

  keep_ids:    [B, K] patch indices kept (the first K of the shuffle), K = int(L * (1 - ratio)).
  restore_ids: [B, L] the inverse permutation: token j of the shuffled sequence goes back to
               position restore_ids[:, j] ... i.e. take_along_axis(shuffled, restore_ids) un-shuffles.
  mask:        [B, L] float, 1 = masked (removed), 0 = kept, in the original patch order.
  """
  keep_ids: jax.Array
  restore_ids: jax.Array
  mask: jax.Array


def num_kept(num_patches: int, mask_ratio: float) -> int:
  """Tokens kept by MAE's random masking: int(L * (1 - mask_ratio)), as the official code."""
  return int(num_patches * (1 - mask_ratio))


def random_shuffle_mask(rng: jax.Array, batch: int, num_patches: int, mask_ratio: float) -> ShuffleMask:
  """MAE `random_masking`: argsort of uniform noise per sample, keep the first K."""
  return shuffle_mask_from_noise(jax.random.uniform(rng, (batch, num_patches)), mask_ratio)


def shuffle_mask_from_noise(noise: jax.Array, mask_ratio: float) -> ShuffleMask:
  """`random_shuffle_mask` for given noise [B, L] (e.g. the noise a PyTorch reference drew)."""
  batch, num_patches = noise.shape
  keep = num_kept(num_patches, mask_ratio)
  shuffle = jnp.argsort(noise, axis=1)
  restore = jnp.argsort(shuffle, axis=1)
  mask = jnp.concatenate([jnp.zeros((batch, keep)), jnp.ones((batch, num_patches - keep))], axis=1)
  mask = jnp.take_along_axis(mask, restore, axis=1)
  return ShuffleMask(shuffle[:, :keep], restore, mask)


def num_masked_simmim(image_size: int, mask_patch_size: int, mask_ratio: float) -> int:
  """Masked mask-patches per image in SimMIM: ceil((image/mask_patch)^2 * ratio)."""
  return int(math.ceil((image_size // mask_patch_size) ** 2 * mask_ratio))


def simmim_mask(rng: jax.Array, batch: int, image_size: int, mask_patch_size: int,
                model_patch_size: int, mask_ratio: float) -> jax.Array:
  """SimMIM `MaskGenerator`: exactly ceil(T * ratio) of the T coarse mask-patches masked per
  sample (a random permutation's first entries), upsampled to the model's patch grid.

  Returns [B, G, G] int32 with G = image_size // model_patch_size, 1 = masked.
  """
  if image_size % mask_patch_size:
    raise ValueError(f"image_size {image_size} must be a multiple of mask_patch_size {mask_patch_size}")
  if mask_patch_size % model_patch_size:
    raise ValueError(f"mask_patch_size {mask_patch_size} must be a multiple of the model patch size "
                     f"{model_patch_size}")
  rand = image_size // mask_patch_size
  scale = mask_patch_size // model_patch_size
  count = num_masked_simmim(image_size, mask_patch_size, mask_ratio)
  # A uniformly random permutation per sample, then its first `count` entries are masked:
  # ranks of iid noise are a uniform permutation.
  noise = jax.random.uniform(rng, (batch, rand * rand))
  ranks = jnp.argsort(jnp.argsort(noise, axis=1), axis=1)
  mask = (ranks < count).astype(jnp.int32).reshape(batch, rand, rand)
  return jnp.repeat(jnp.repeat(mask, scale, axis=1), scale, axis=2)


# ---------------------------------------------------------------------------------------------
# BEiT block-wise masking.

class BlockMaskInfo(NamedTuple):
  """Per-sample trace of `block_mask_trace`, for tests and analyses.

  mask:   [H, W] int32, 1 = masked ([T, H, W] for a cube mask).
  areas:  [T] float, the target area drawn for each accepted rectangle (0 past the last).
  sizes:  [T] int32, h * w of each accepted rectangle.
  deltas: [T] int32, patches each accepted rectangle newly masked.
  """
  mask: jax.Array
  areas: jax.Array
  sizes: jax.Array
  deltas: jax.Array


def block_mask_trace(rng: jax.Array, height: int, width: int, num_masking: int,
                     min_num: int = 16, max_num: int | None = None, min_aspect: float = 0.3,
                     max_aspect: float | None = None, max_attempts: int = 10,
                     until_exact: bool = False, max_rounds: int = 0,
                     temporal: int = 0) -> BlockMaskInfo:
  """One sample of microsoft/unilm `beit/masking_generator.py` `MaskingGenerator`, in JAX.

  The algorithm, step for step: while fewer than `num_masking` patches are masked, try up to
  `max_attempts` rectangles: target area ~ U(min_num, m) with m = min(remaining, max_num),
  log aspect ~ U(log min_aspect, log max_aspect), h = round(sqrt(area * aspect)),
  w = round(sqrt(area / aspect)) (round half to even, as Python's round); if h < H and w < W, a
  uniformly placed rectangle is accepted when it adds between 1 and m new patches. Stop when
  an attempt round adds nothing. The count therefore never exceeds `num_masking` and may stay
  below it. With `until_exact` (CAE's furnace/masking_generator.py) a round that adds nothing
  does not stop the loop (`while mask_count != num_masking_patches`), so the count is exact;
  `max_rounds` (default 50 + 10 * num_masking) only bounds that loop. The draws are JAX's, so
  masks equal the official ones in distribution, not bits.

  ``temporal`` = T > 0 is SlowFast's `MaskingGenerator3D` (``slowfast/datasets/transform.py``)
  on a [T, H, W] grid: each try also draws a length ``t ~ U{1..T}`` and a front
  ``U{0..T - t}``, the cuboid h x w x t counts its new patches, and the target area is
  ~ U(min_num, max_num) with the fixed ``max_num`` (not the remaining budget; acceptance still
  caps the new patches at the remaining budget). `cube_mask` passes its 100 tries a round.
  The mask is then [T, H, W] and `sizes` hold h * w * t.
  """
  max_num = num_masking if max_num is None else max_num
  max_aspect = max_aspect or 1.0 / min_aspect
  log_lo, log_hi = math.log(min_aspect), math.log(max_aspect)
  rows = jnp.arange(height)[:, None]
  cols = jnp.arange(width)[None, :]
  frames = jnp.arange(max(temporal, 1))[:, None, None]
  limit = max(num_masking, 1)
  max_rounds = max_rounds or 50 + 10 * num_masking

  def one_rectangle(mask, count, rng):
    """Up to `max_attempts` tries; returns the mask, the patches added (0: none fitted), the
    rng, and the accepted rectangle's target area and h * w."""
    max_mask = jnp.minimum(num_masking - count, max_num).astype(jnp.int32)
    # BEiT draws the area below the budget; MaskingGenerator3D below the fixed max_num.
    area_top = (jnp.asarray(max_num, jnp.float32) if temporal
                else max_mask.astype(jnp.float32))

    def cond(c):
      return (c[0] < max_attempts) & (c[1] == 0)

    def body(c):
      i, _, mask, rng, _, _ = c
      rng, ka, kr, kt, kl = jax.random.split(rng, 5)
      # Python's random.uniform(a, b) = a + (b - a) * U, also when b < a (few patches left);
      # jax.random.uniform would clamp that case to a.
      area = min_num + (area_top - min_num) * jax.random.uniform(ka, ())
      aspect = jnp.exp(jax.random.uniform(kr, (), minval=log_lo, maxval=log_hi))
      h = jnp.round(jnp.sqrt(area * aspect)).astype(jnp.int32)
      w = jnp.round(jnp.sqrt(area / aspect)).astype(jnp.int32)
      fits = (w < width) & (h < height)
      if temporal:
        kt, k_len, k_front = jax.random.split(kt, 3)
        t = jax.random.randint(k_len, (), 1, temporal + 1)               # randint(1, T)
        front = jax.random.randint(k_front, (), 0, temporal - t + 1)     # randint(0, T - t)
      top = jax.random.randint(kt, (), 0, jnp.maximum(height - h, 0) + 1)     # randint(0, H - h)
      left = jax.random.randint(kl, (), 0, jnp.maximum(width - w, 0) + 1)
      inside = (rows >= top) & (rows < top + h) & (cols >= left) & (cols < left + w)
      size = h * w
      if temporal:
        inside = inside[None] & (frames >= front) & (frames < front + t)
        size = size * t
      new = jnp.sum(inside & (mask == 0)).astype(jnp.int32)
      ok = fits & (new > 0) & (new <= max_mask)
      return (i + 1, jnp.where(ok, new, 0), jnp.where(ok & inside, 1, mask), rng,
              jnp.where(ok, area, 0.0), jnp.where(ok, size, 0))

    init = (jnp.int32(0), jnp.int32(0), mask, rng, jnp.float32(0), jnp.int32(0))
    _, delta, mask, rng, area, size = jax.lax.while_loop(cond, body, init)
    return mask, delta, rng, area, size

  def cond(c):
    mask, count, stuck, rng, k, areas, sizes, deltas, rounds = c
    return (count < num_masking) & (~stuck | until_exact) & (rounds < max_rounds)

  def body(c):
    mask, count, stuck, rng, k, areas, sizes, deltas, rounds = c
    mask, delta, rng, area, size = one_rectangle(mask, count, rng)
    got = delta > 0
    areas = areas.at[k].set(jnp.where(got, area, 0.0))
    sizes = sizes.at[k].set(jnp.where(got, size, 0))
    deltas = deltas.at[k].set(delta)
    return (mask, count + delta, ~got, rng, k + got.astype(jnp.int32), areas, sizes, deltas,
            rounds + 1)

  shape = (temporal, height, width) if temporal else (height, width)
  init = (jnp.zeros(shape, jnp.int32), jnp.int32(0), jnp.bool_(False), rng, jnp.int32(0),
          jnp.zeros((limit,), jnp.float32), jnp.zeros((limit,), jnp.int32), jnp.zeros((limit,), jnp.int32),
          jnp.int32(0))
  mask, _, _, _, _, areas, sizes, deltas, _ = jax.lax.while_loop(cond, body, init)
  return BlockMaskInfo(mask, areas, sizes, deltas)


def block_mask(rng: jax.Array, batch: int, height: int, width: int, num_masking: int,
               min_num: int = 16, max_num: int | None = None, min_aspect: float = 0.3,
               max_aspect: float | None = None, exact: bool = False) -> jax.Array:
  """BEiT block-wise masks [B, H*W] int32 (1 = masked), jittable, drawn on the device.

  `exact=False` is BEiT's generator (`block_mask_trace`): at most `num_masking` patches per
  image, for encoders that see every token with mask tokens in place (static shapes whatever
  the count). `exact=True` is CAE's generator for its encoder that drops the masked tokens:
  rectangles are drawn until exactly `num_masking` patches are masked (`until_exact`), so every
  image keeps the same number of visible tokens; `fill_to_count` only covers the round limit.
  """
  keys = jax.random.split(rng, batch)
  info = jax.vmap(lambda k: block_mask_trace(k, height, width, num_masking, min_num, max_num,
                                             min_aspect, max_aspect, until_exact=exact))(keys)
  mask = info.mask.reshape(batch, height * width)
  if exact:
    mask = fill_to_count(jax.random.fold_in(rng, 1), mask, num_masking)
  return mask


def cube_mask(rng: jax.Array, batch: int, temporal: int, height: int, width: int,
              ratio: float = 0.4) -> jax.Array:
  """MaskFeat's video cube masks [B, T*H*W] int32 (1 = masked, (t, h, w) order), drawn on the
  device: SlowFast's `MaskingGenerator3D` with the settings of its Kinetics loader
  (``slowfast/datasets/kinetics.py`` `_gen_mask`, AUG.MASK_TUBE and MASK_FRAMES off): at most
  ``round(T H W ratio)`` patches, cuboid areas between ``H W // 5`` and ``H W``, 100 tries a
  round (`block_mask_trace` with ``temporal``)."""
  num = int(round(temporal * height * width * ratio))
  max_num = height * width
  keys = jax.random.split(rng, batch)
  info = jax.vmap(lambda k: block_mask_trace(k, height, width, num, min_num=max_num // 5,
                                             max_num=max_num, max_attempts=100,
                                             temporal=temporal))(keys)
  return info.mask.reshape(batch, temporal * height * width)


def fill_to_count(rng: jax.Array, mask: jax.Array, count: int) -> jax.Array:
  """mask [B, L] with at most `count` ones -> exactly `count` ones: the missing ones go to
  unmasked positions chosen uniformly at random (ranks of uniform noise among them)."""
  noise = jax.random.uniform(rng, mask.shape)
  noise = jnp.where(mask > 0, -1.0, noise)          # already masked: ranked last
  order = jnp.argsort(-noise, axis=1)               # unmasked first, in random order
  ranks = jnp.argsort(order, axis=1)
  missing = count - jnp.sum(mask, axis=1, keepdims=True)
  return jnp.where((mask > 0) | (ranks < missing), 1, 0).astype(jnp.int32)


# ---------------------------------------------------------------------------------------------
# Latent MIM's grid with gaps.

def gap_grid(rng: jax.Array, batch: int, grid: int, patch_size: int, gap: int) -> jax.Array:
  """Latent MIM's non-contiguous patch grid (yibingwei-1/LatentMIM `vits.Patchify`).

  The image is (grid * (patch_size + gap)) pixels a side, cut into grid x grid cells of
  patch_size + gap pixels; each cell yields one patch_size x patch_size patch at a random offset
  in [0, gap) pixels, drawn independently for the rows and the columns of every cell (gap 0:
  the plain contiguous grid). Any two neighbouring patches are therefore separated by
  gap + (offset difference), between 1 and 2 * gap - 1 pixels, never overlapping.

  Returns int32 [B, grid * grid, 2]: each patch's top-left pixel (row, column), patches in
  row-major order (the ViT's patch order).
  """
  cell = patch_size + gap
  if gap > 0:
    offsets = jax.random.randint(rng, (batch, grid, grid, 2), 0, gap)
  else:
    offsets = jnp.zeros((batch, grid, grid, 2), jnp.int32)
  rows, cols = jnp.meshgrid(jnp.arange(grid) * cell, jnp.arange(grid) * cell, indexing="ij")
  starts = jnp.stack([rows, cols], axis=-1)[None] + offsets
  return starts.reshape(batch, grid * grid, 2).astype(jnp.int32)
