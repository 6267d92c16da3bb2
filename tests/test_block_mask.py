"""BEiT block-wise masking (masking.block_mask) against a direct NumPy version of
microsoft/unilm beit/masking_generator.py, and CAE's exact-count fill."""
import math

import jax
import numpy as np
import pytest

from mim_jax import masking


def numpy_block_mask(rng, height, width, num_masking, min_num=16, max_num=None, min_aspect=0.3,
                     max_aspect=None, max_attempts=10):
  """The generator, written directly: returns the mask and the (h * w, newly masked) of every
  accepted rectangle."""
  max_num = num_masking if max_num is None else max_num
  max_aspect = max_aspect or 1 / min_aspect
  lo, hi = math.log(min_aspect), math.log(max_aspect)
  mask = np.zeros((height, width), np.int64)
  rects = []
  count = 0
  while count < num_masking:
    budget = min(num_masking - count, max_num)
    delta = 0
    for _ in range(max_attempts):
      area = min_num + (budget - min_num) * rng.random()   # Python random.uniform(a, b)
      aspect = math.exp(rng.uniform(lo, hi))
      h = int(round(math.sqrt(area * aspect)))
      w = int(round(math.sqrt(area / aspect)))
      if w < width and h < height:
        top = rng.integers(0, height - h + 1)
        left = rng.integers(0, width - w + 1)
        window = mask[top:top + h, left:left + w]
        new = h * w - window.sum()
        if 0 < new <= budget:
          window[...] = 1
          delta = new
          rects.append((h * w, new))
      if delta > 0:
        break
    if delta == 0:
      break
    count += delta
  return mask, rects


def jax_draws(n, height=14, width=14, num_masking=75, **kw):
  keys = jax.random.split(jax.random.PRNGKey(0), n)
  fn = jax.jit(jax.vmap(lambda k: masking.block_mask_trace(k, height, width, num_masking, **kw)))
  return jax.device_get(fn(keys))


def test_count_never_exceeds_target_and_rectangles_respect_the_minimum():
  info = jax_draws(2000)
  counts = info.mask.reshape(len(info.mask), -1).sum(1)
  assert counts.max() <= 75 and counts.min() > 40
  # The per-rectangle trace adds up to the mask.
  assert np.array_equal(info.deltas.sum(1), counts)
  # While at least 16 patches were left, every target area was >= 16 (BEiT's minimum); the
  # rounded rectangle h * w can fall below the area by rounding only (e.g. 2 x 7 for 16 at
  # aspect 0.3), never below 12 for a target of 16 on this aspect range.
  remaining = 75 - np.concatenate([np.zeros((len(counts), 1), int), np.cumsum(info.deltas, 1)[:, :-1]], 1)
  accepted = info.deltas > 0
  big = accepted & (remaining >= 16)
  assert (info.areas[big] >= 16 - 1e-4).all()
  assert (info.sizes[big] >= 12).all()
  assert (info.sizes[accepted] >= info.deltas[accepted]).all()


def test_distribution_matches_the_numpy_generator():
  n = 3000
  info = jax_draws(n)
  rng = np.random.default_rng(0)
  ref = [numpy_block_mask(rng, 14, 14, 75) for _ in range(n)]
  ref_counts = np.array([m.sum() for m, _ in ref])
  ref_sizes = np.array([s for _, r in ref for s, _ in r])
  ref_first = np.array([r[0][0] for _, r in ref])
  ref_rects = np.array([len(r) for _, r in ref])
  counts = info.mask.reshape(n, -1).sum(1)
  sizes = info.sizes[info.deltas > 0]
  first = info.sizes[:, 0]
  rects = (info.deltas > 0).sum(1)
  # Means agree within a few standard errors, and the block-size histograms are close.
  for ours, theirs in ((counts, ref_counts), (sizes, ref_sizes), (first, ref_first), (rects, ref_rects)):
    se = math.sqrt(ours.var() / len(ours) + theirs.var() / len(theirs))
    assert abs(ours.mean() - theirs.mean()) < 4 * se + 1e-9, (ours.mean(), theirs.mean())
  bins = np.arange(0, 80, 8)
  h1 = np.histogram(sizes, bins)[0] / len(sizes)
  h2 = np.histogram(ref_sizes, bins)[0] / len(ref_sizes)
  assert np.abs(h1 - h2).max() < 0.03, (h1, h2)
  # The masked positions are spread like the reference's (centre patches more often).
  f1 = info.mask.mean(0)
  f2 = np.mean([m for m, _ in ref], 0)
  assert np.abs(f1 - f2).max() < 0.06


def test_small_budget_draws_between_remaining_and_minimum():
  # 10 patches to mask with a minimum of 16: Python's random.uniform(16, 10) draws in [10, 16],
  # so rectangles of at most 16 (+ rounding) cells and never more than 10 new ones.
  # When no rectangle fits in 10 attempts the generator stops with what it has (here: nothing).
  info = jax_draws(500, num_masking=10)
  got = info.deltas[:, 0] > 0
  a = info.areas[got, 0]
  assert 0.5 < got.mean() < 1.0
  assert (a >= 10 - 1e-4).all() and (a <= 16 + 1e-4).all() and a.std() > 0.5
  assert info.mask.reshape(500, -1).sum(1).max() <= 10


def test_batch_mask_shapes_and_seeding():
  rng = jax.random.PRNGKey(3)
  a = masking.block_mask(rng, 8, 14, 14, 75)
  b = masking.block_mask(rng, 8, 14, 14, 75)
  assert a.shape == (8, 196) and a.dtype == np.int32
  assert np.array_equal(a, b)
  assert not np.array_equal(a[0], a[1])


@pytest.mark.parametrize("num", [75, 98])
def test_exact_count_fill_as_cae(num):
  m = masking.block_mask(jax.random.PRNGKey(1), 64, 14, 14, num, exact=True)
  assert (np.asarray(m).sum(1) == num).all()
  # Only additions: every patch of BEiT's mask stays masked.
  base = masking.block_mask(jax.random.PRNGKey(1), 64, 14, 14, num)
  assert (np.asarray(m) >= np.asarray(base)).all()


# ----------------------------------------------------------------------------------------------
# MaskFeat's video cube masks: SlowFast's MaskingGenerator3D.


def numpy_cube_mask(rng, temporal, height, width, num_masking, min_num, max_num,
                    min_aspect=0.3):
  """slowfast/datasets/transform.py MaskingGenerator3D, written directly (NumPy draws)."""
  lo, hi = math.log(min_aspect), math.log(1 / min_aspect)
  mask = np.zeros((temporal, height, width), np.int64)
  sizes = []
  count = 0
  while count < num_masking:
    budget = num_masking - count
    delta = 0
    for _ in range(100):
      area = rng.uniform(min_num, max_num)
      aspect = math.exp(rng.uniform(lo, hi))
      h = int(round(math.sqrt(area * aspect)))
      w = int(round(math.sqrt(area / aspect)))
      t = int(rng.integers(1, temporal + 1))
      if w < width and h < height:
        top = rng.integers(0, height - h + 1)
        left = rng.integers(0, width - w + 1)
        front = rng.integers(0, temporal - t + 1)
        window = mask[front:front + t, top:top + h, left:left + w]
        new = h * w * t - window.sum()
        if 0 < new <= budget:
          window[...] = 1
          delta = new
          sizes.append(h * w * t)
      if delta > 0:
        break
    if delta == 0:
      break
    count += delta
  return mask, sizes


def test_cube_mask_matches_slowfast_generator_in_distribution():
  # Kinetics' MaskFeat: window (8, 7, 7), ratio 0.4 -> at most round(156.8) = 157 patches,
  # cuboid areas in [49 // 5, 49] = [9, 49].
  n = 300
  masks = np.asarray(masking.cube_mask(jax.random.PRNGKey(0), n, 8, 7, 7)).reshape(n, 8, 7, 7)
  rng = np.random.default_rng(0)
  ref = [numpy_cube_mask(rng, 8, 7, 7, 157, 9, 49) for _ in range(n)]
  counts, ref_counts = masks.reshape(n, -1).sum(1), np.array([m.sum() for m, _ in ref])
  assert counts.max() <= 157 and ref_counts.max() <= 157
  se = math.sqrt(counts.var() / n + ref_counts.var() / n)
  assert abs(counts.mean() - ref_counts.mean()) < 4 * se + 1e-9, (counts.mean(), ref_counts.mean())
  # masked share per frame and per spatial position spread alike
  per_t = masks.mean((0, 2, 3)), np.mean([m for m, _ in ref], 0).mean((1, 2))
  assert np.abs(per_t[0] - per_t[1]).max() < 0.05, per_t
  per_hw = masks.mean((0, 1)), np.mean([m for m, _ in ref], 0).mean(0)
  assert np.abs(per_hw[0] - per_hw[1]).max() < 0.08
  # the mask varies over time (cubes, not tubes) and is seeded
  assert (masks != masks[:, :1]).any()
  again = np.asarray(masking.cube_mask(jax.random.PRNGKey(0), n, 8, 7, 7)).reshape(n, 8, 7, 7)
  assert np.array_equal(masks, again)
