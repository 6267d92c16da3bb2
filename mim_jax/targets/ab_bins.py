"""The quantised ab colour space of Zhang, Isola & Efros (ECCV 2016) as pure functions.

* `hull_points()`: the Q = 313 in-gamut ab bin centres on the 10-unit grid, in the order of
  the official `resources/pts_in_hull.npy` (a ascending, then b ascending). The official file
  is binary and the richzhang/colorization snapshot is too large to fetch here, so the bins are
  embedded, one contiguous b range per a column (`HULL_B_RANGES`), taken from a published
  transcription of pts_in_hull.npy (313 distinct points). Computing them is not exactly
  reproducible: `gamut_grid_points()` (the grid points that are a corner of a 10 x 10 ab cell
  holding an 8-bit sRGB colour, any L) gives 309 points, all of them in the official 313; the
  official set has 4 more, (40, 90), (100, -90), (100, -10), (100, 0), which no sRGB colour
  reaches within 10 units (tests/test_colorization.py checks both statements).
* `soft_encode`: the official NNEncode (caffe_traininglayers.py): each ab value spread over its
  k nearest bins with Gaussian weights exp(-d^2 / (2 sigma^2)), normalised to sum to 1 (the
  paper's 5 neighbours, sigma 5; the official layer uses 10 neighbours).
* `smoothed_prior`, `rebalance_weights`: the class-rebalancing factor of the paper's Eq. 3-4
  (the official PriorFactor): w proportional to 1 / ((1 - lam) p~ + lam / Q), normalised so
  that sum_q p~_q w_q = 1, p~ the empirical bin distribution smoothed with a Gaussian of sigma 5.
* `annealed_mean`: the paper's Eq. 5, H(Z) = E[f_T(Z)] with f_T(z) = exp(log z / T) / sum, i.e.
  softmax(logits / T) averaged over the bin centres (T = 0.38 for the pictures).
"""
from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np

GRID = 10
# a -> (lowest b, highest b) of pts_in_hull.npy's bins in that a column (every 10 units).
HULL_B_RANGES = {
    -90: (50, 90), -80: (20, 90), -70: (0, 90), -60: (-20, 90), -50: (-30, 100),
    -40: (-40, 100), -30: (-50, 100), -20: (-50, 100), -10: (-60, 100), 0: (-70, 100),
    10: (-80, 90), 20: (-80, 90), 30: (-90, 90), 40: (-100, 90), 50: (-100, 80),
    60: (-110, 80), 70: (-110, 80), 80: (-110, 70), 90: (-110, 70), 100: (-90, 0),
}
Q = sum((hi - lo) // GRID + 1 for lo, hi in HULL_B_RANGES.values())
assert Q == 313


def hull_points() -> np.ndarray:
  """[313, 2] int64 ab bin centres, ordered as the official pts_in_hull.npy."""
  return np.array([(a, b) for a, (lo, hi) in sorted(HULL_B_RANGES.items())
                   for b in range(lo, hi + 1, GRID)], np.int64)


def srgb_surface(step: int = 1) -> np.ndarray:
  """The 8-bit sRGB colours [N, 3] in [0, 1] on the surface of the RGB cube (one channel at 0
  or 255), every `step` levels. The ab projection of the whole gamut solid is that of its
  surface (every vertical line in L through the solid meets its boundary)."""
  v = np.arange(0, 256, step) / 255.0
  if v[-1] != 1.0:
    v = np.append(v, 1.0)
  u, w = (x.reshape(-1) for x in np.meshgrid(v, v, indexing="ij"))
  faces = []
  for ch in range(3):
    for level in (0.0, 1.0):
      cols = [u, w]
      cols.insert(ch, np.full_like(u, level))
      faces.append(np.stack(cols, -1))
  return np.concatenate(faces)      # the cube's edges appear twice: harmless for a projection


def srgb_lab_ab(rgb: np.ndarray) -> np.ndarray:
  """The ab values [N, 2] (float64) of sRGB colours [N, 3] in [0, 1] (NumPy, skimage's
  conversion; `mim_jax.targets.lab` is the jnp version)."""
  from mim_jax.targets import lab
  lin = np.where(rgb > 0.04045, ((rgb + 0.055) / 1.055) ** 2.4, rgb / 12.92)
  t = lin @ lab.XYZ_FROM_RGB.T / lab.D65_WHITE
  f = np.where(t > 0.008856, np.cbrt(t), 7.787 * t + 16.0 / 116.0)
  return np.stack([500.0 * (f[:, 0] - f[:, 1]), 200.0 * (f[:, 1] - f[:, 2])], -1)


def gamut_grid_points(step: int = 1) -> np.ndarray:
  """The 10-unit grid points that are a corner of a grid cell holding an sRGB colour's ab (for
  some L): floor and ceil of every colour's a and b on the grid, over the 8-bit colours of the
  RGB cube's surface (`srgb_surface`). [N, 2] int64, sorted as `hull_points`. With step=1:
  309 points, a subset of the official 313."""
  ab = srgb_lab_ab(srgb_surface(step)) / GRID
  lo, hi = np.floor(ab).astype(np.int64), np.ceil(ab).astype(np.int64)
  pts = np.concatenate([lo, hi, np.stack([lo[:, 0], hi[:, 1]], 1),
                        np.stack([hi[:, 0], lo[:, 1]], 1)]) * GRID
  key = np.unique((pts[:, 0] + 1000) * 10000 + (pts[:, 1] + 1000))   # a, then b ascending
  return np.stack([key // 10000 - 1000, key % 10000 - 1000], 1)


def squared_distances(ab: jax.Array, centers: jax.Array) -> jax.Array:
  """[..., 2] x [Q, 2] -> [..., Q] squared Euclidean distances in ab."""
  ab = jnp.asarray(ab, jnp.float32)
  c = jnp.asarray(centers, jnp.float32)
  return jnp.sum((ab[..., None, :] - c) ** 2, axis=-1)


def nearest_bin(ab: jax.Array, centers: jax.Array) -> jax.Array:
  """int32 [...]: the index of each ab value's closest bin centre."""
  return jnp.argmin(squared_distances(ab, centers), axis=-1).astype(jnp.int32)


def soft_encode(ab: jax.Array, centers: jax.Array, k: int = 5, sigma: float = 5.0) -> jax.Array:
  """[..., 2] -> [..., Q] soft targets: the k nearest bins weighted by exp(-d^2 / (2 sigma^2)),
  normalised to sum to 1; zero elsewhere."""
  if not 1 <= k <= centers.shape[0]:
    raise ValueError(f"soft_encode: k={k} neighbours, use 1 .. {centers.shape[0]} (the paper's 5)")
  d2 = squared_distances(ab, centers)
  neg, idx = jax.lax.top_k(-d2, k)                          # the k smallest distances
  w = jnp.exp(neg / (2.0 * sigma ** 2))
  w = w / jnp.sum(w, axis=-1, keepdims=True)
  onehots = jax.nn.one_hot(idx, centers.shape[0], dtype=w.dtype)   # [..., k, Q]
  return jnp.einsum("...k,...kq->...q", w, onehots)


def bin_counts(ab: jax.Array, centers: jax.Array) -> jax.Array:
  """float32 [Q]: how many of the ab values [..., 2] fall closest to each bin."""
  idx = nearest_bin(ab, centers).reshape(-1)
  return jnp.zeros((centers.shape[0],), jnp.float32).at[idx].add(1.0)


def smoothed_prior(counts: np.ndarray, centers: np.ndarray, sigma: float = 5.0) -> np.ndarray:
  """The empirical bin distribution p = counts / sum, smoothed with a Gaussian of `sigma` ab
  units over the bin centres, p~_q = sum_k exp(-|c_q - c_k|^2 / (2 sigma^2)) p_k, renormalised
  to sum to 1 over the Q bins (float64 [Q]). sigma=0: p unsmoothed."""
  counts = np.asarray(counts, np.float64)
  if counts.sum() <= 0:
    raise ValueError("smoothed_prior: the bin counts are all zero; the prior pass saw no pixels")
  p = counts / counts.sum()
  if sigma <= 0:
    return p
  c = np.asarray(centers, np.float64)
  d2 = np.sum((c[:, None] - c[None]) ** 2, axis=-1)
  p = np.exp(-d2 / (2.0 * sigma ** 2)) @ p
  return p / p.sum()


def rebalance_weights(prior: np.ndarray, lam: float = 0.5) -> np.ndarray:
  """w_q proportional to 1 / ((1 - lam) prior_q + lam / Q), scaled so sum_q prior_q w_q = 1
  (float64 [Q])."""
  prior = np.asarray(prior, np.float64)
  w = 1.0 / ((1.0 - lam) * prior + lam / prior.shape[0])
  return w / np.sum(prior * w)


def annealed_mean(logits: jax.Array, centers: jax.Array, temperature: float = 0.38) -> jax.Array:
  """[..., Q] logits -> [..., 2] ab: the mean of softmax(logits / T) over the bin centres
  (T = 1: the expectation; T -> 0: the mode)."""
  probs = jax.nn.softmax(jnp.asarray(logits, jnp.float32) / temperature, axis=-1)
  return probs @ jnp.asarray(centers, jnp.float32)
