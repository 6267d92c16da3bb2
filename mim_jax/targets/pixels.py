"""Pixel targets: patchify / unpatchify and MAE's per-patch normalised target."""
from __future__ import annotations

import jax
import jax.numpy as jnp


def patchify(images: jax.Array, patch: int) -> jax.Array:
  """[B, H, W, C] -> [B, (H/p)*(W/p), p*p*C], each row ordered (p, p, C) like MAE's patchify."""
  b, h, w, c = images.shape
  if h % patch or w % patch:
    raise ValueError(f"image {h}x{w} not divisible by patch {patch}")
  x = images.reshape(b, h // patch, patch, w // patch, patch, c).transpose(0, 1, 3, 2, 4, 5)
  return x.reshape(b, (h // patch) * (w // patch), patch * patch * c)


def unpatchify(x: jax.Array, patch: int, channels: int = 3) -> jax.Array:
  """Inverse of `patchify` for square images."""
  b, n, _ = x.shape
  g = int(round(n ** 0.5))
  if g * g != n:
    raise ValueError(f"{n} patches do not form a square grid")
  x = x.reshape(b, g, g, patch, patch, channels).transpose(0, 1, 3, 2, 4, 5)
  return x.reshape(b, g * patch, g * patch, channels)


def patch_stats(patches: jax.Array):
  """Per-patch mean and UNBIASED variance (torch's Tensor.var default), as MAE's norm_pix_loss."""
  mean = patches.mean(axis=-1, keepdims=True)
  var = patches.var(axis=-1, keepdims=True, ddof=1)
  return mean, var


def norm_pix_target(images: jax.Array, patch: int, eps: float = 1e-6) -> jax.Array:
  """MAE target with norm_pix_loss: each patch standardised by its own mean and variance."""
  t = patchify(images, patch)
  mean, var = patch_stats(t)
  return (t - mean) / jnp.sqrt(var + eps)


def pixel_target(images: jax.Array, patch: int, norm_pix: bool, eps: float = 1e-6) -> jax.Array:
  return norm_pix_target(images, patch, eps) if norm_pix else patchify(images, patch)
