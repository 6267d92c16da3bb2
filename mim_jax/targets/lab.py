"""CIE Lab colour space as pure jnp functions, matching skimage.color.rgb2lab / lab2rgb.

Conventions (those of skimage, which the official colorization and split-brain training code use
through `skimage.color.rgb2lab`): the input is float sRGB in [0, 1] (IEC 61966-2-1 transfer
curve), converted to XYZ with the sRGB/ITU-R BT.709 primaries and the D65 white point of the 2
degree observer (0.95047, 1.0, 1.08883), then to CIE 1976 L*a*b* with the 0.008856 / 7.787
linear segment. L lies in [0, 100]; a and b are roughly in [-87, 99] and [-108, 95] for in-gamut
colours.
"""
from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np

# sRGB (linear) -> XYZ, skimage.color.colorconv.xyz_from_rgb.
XYZ_FROM_RGB = np.array([[0.412453, 0.357580, 0.180423],
                         [0.212671, 0.715160, 0.072169],
                         [0.019334, 0.119193, 0.950227]], np.float64)
RGB_FROM_XYZ = np.linalg.inv(XYZ_FROM_RGB)
# D65 reference white, 2 degree observer (skimage's _illuminants['D65']['2']).
D65_WHITE = np.array([0.95047, 1.0, 1.08883], np.float64)


def _check(x: jax.Array, name: str) -> None:
  if x.shape[-1:] != (3,):
    raise ValueError(f"{name} needs a trailing axis of 3 channels, got shape {tuple(x.shape)}")


def srgb_to_linear(rgb: jax.Array) -> jax.Array:
  """sRGB companding inverse: ((c + 0.055) / 1.055)^2.4 above 0.04045, c / 12.92 below."""
  return jnp.where(rgb > 0.04045, ((jnp.maximum(rgb, 0.04045) + 0.055) / 1.055) ** 2.4,
                   rgb / 12.92)


def linear_to_srgb(lin: jax.Array) -> jax.Array:
  """sRGB companding: 1.055 c^(1/2.4) - 0.055 above 0.0031308, 12.92 c below."""
  return jnp.where(lin > 0.0031308,
                   1.055 * jnp.maximum(lin, 0.0031308) ** (1 / 2.4) - 0.055, lin * 12.92)


def rgb_to_lab(rgb: jax.Array) -> jax.Array:
  """Float sRGB in [0, 1], shape [..., 3] -> Lab [..., 3] (L in [0, 100], a, b), as skimage.

  Steps: sRGB -> linear RGB -> XYZ (D65) -> XYZ / white -> f(t) = t^(1/3) above 0.008856 else
  7.787 t + 16/116 -> L = 116 f(Y) - 16, a = 500 (f(X) - f(Y)), b = 200 (f(Y) - f(Z)).
  Computed in the input's float dtype (float32 under default JAX).
  """
  rgb = jnp.asarray(rgb)
  _check(rgb, "rgb_to_lab")
  if not jnp.issubdtype(rgb.dtype, jnp.floating):
    raise ValueError("rgb_to_lab takes float RGB in [0, 1]; divide uint8 images by 255 first")
  dt = rgb.dtype
  lin = srgb_to_linear(rgb)
  xyz = lin @ jnp.asarray(XYZ_FROM_RGB.T, dt)
  t = xyz / jnp.asarray(D65_WHITE, dt)
  f = jnp.where(t > 0.008856, jnp.cbrt(jnp.maximum(t, 0.008856)), 7.787 * t + 16.0 / 116.0)
  fx, fy, fz = f[..., 0], f[..., 1], f[..., 2]
  return jnp.stack([116.0 * fy - 16.0, 500.0 * (fx - fy), 200.0 * (fy - fz)], axis=-1)


def lab_to_xyz(lab: jax.Array) -> jax.Array:
  """Lab [..., 3] -> XYZ [..., 3] (D65), as skimage.color.lab2xyz (negative Z clipped to 0)."""
  lab = jnp.asarray(lab)
  _check(lab, "lab_to_xyz")
  fy = (lab[..., 0] + 16.0) / 116.0
  fx = lab[..., 1] / 500.0 + fy
  fz = jnp.maximum(fy - lab[..., 2] / 200.0, 0.0)
  f = jnp.stack([fx, fy, fz], axis=-1)
  t = jnp.where(f > 0.2068966, f ** 3, (f - 16.0 / 116.0) / 7.787)
  return t * jnp.asarray(D65_WHITE, f.dtype)


def lab_to_rgb(lab: jax.Array, clip: bool = True) -> jax.Array:
  """Lab [..., 3] -> float sRGB [..., 3], the inverse of `rgb_to_lab` (skimage.color.lab2rgb).

  Out-of-gamut colours are clipped to [0, 1] when `clip` (skimage always clips); with
  clip=False they come back unclipped (negative values through the linear segment).
  """
  xyz = lab_to_xyz(lab)
  lin = xyz @ jnp.asarray(RGB_FROM_XYZ.T, xyz.dtype)
  rgb = linear_to_srgb(lin)
  return jnp.clip(rgb, 0.0, 1.0) if clip else rgb
