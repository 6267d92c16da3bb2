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
  keep = num_kept(num_patches, mask_ratio)
  noise = jax.random.uniform(rng, (batch, num_patches))
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
