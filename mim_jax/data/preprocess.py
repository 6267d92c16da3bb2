"""The step's input preprocessing: uint8 batches from the host -> normalised float views.

Augmentation of in-memory data happens here, on the device inside the jitted step; streamed
data arrives cropped by the host workers and is only resized (when needed) and normalised.
Methods that build their own views start from `crop_or_resize`; evaluators use `preprocess`
with `train=False`.
"""
from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np

from mim_jax.data import augment


def crop_or_resize(rng: jax.Array, images: jax.Array, input_cfg, on_device_aug: bool,
                   train: bool = True) -> jax.Array:
  """uint8 [B,H,W,3] -> float32 levels [B,S,S,3]: the config's random resized crop + flip on
  the device (training on in-memory data), else a bilinear resize to `image_size` when needed.
  Methods that build their own views (colour jitter, two views) start from this.

  Clips [B,T,H,W,3] -> [B,T,S,S,3]: the frames are folded into the channels ([B,H,W,T*3]), so
  each clip gets ONE crop box and ONE flip (every frame cut and mirrored alike, as a video
  RandomResizedCrop does), then unfolded."""
  if images.ndim == 5:
    b, t, h, w, c = images.shape
    folded = images.transpose(0, 2, 3, 1, 4).reshape(b, h, w, t * c)
    out = crop_or_resize(rng, folded, input_cfg, on_device_aug, train)
    return out.reshape(out.shape[:3] + (t, c)).transpose(0, 3, 1, 2, 4)
  size = input_cfg.image_size
  x = images.astype(jnp.float32)
  if train and on_device_aug:
    a = input_cfg.aug
    return augment.random_resized_crop_flip(rng, x, out_size=size, scale=tuple(a.crop_scale),
                                            ratio=tuple(a.crop_ratio), hflip=bool(a.hflip))
  if x.shape[1] != size or x.shape[2] != size:
    x = jax.image.resize(x, (x.shape[0], size, size, x.shape[3]), "bilinear")
  return x


def preprocess(rng: jax.Array, images: jax.Array, input_cfg, on_device_aug: bool,
               train: bool = True) -> jax.Array:
  """uint8 [B,H,W,3] -> normalised float32 [B,S,S,3] (clips [B,T,H,W,3] -> [B,T,S,S,3])."""
  return augment.normalize(crop_or_resize(rng, images, input_cfg, on_device_aug, train),
                           input_cfg.mean, input_cfg.std)


def denormalize_uint8(x: jax.Array, input_cfg) -> np.ndarray:
  """The inverse of `preprocess`'s normalisation, rounded to uint8 levels (pictures)."""
  mean = np.asarray(input_cfg.mean, np.float32)
  std = np.asarray(input_cfg.std, np.float32)
  return np.clip(np.rint((np.asarray(x, np.float32) * std + mean) * 255.0), 0, 255).astype(np.uint8)
