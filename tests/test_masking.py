"""Mask generators: exact counts, inverse permutations, determinism."""
import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from mim_jax import masking
from mim_jax.methods.mae import unshuffle


@pytest.mark.parametrize("num_patches,ratio,kept", [(196, 0.75, 49), (64, 0.75, 16), (10, 0.33, 6), (49, 0.5, 24)])
def test_shuffle_mask_keeps_exactly_int_L_times_1_minus_r(num_patches, ratio, kept):
  assert masking.num_kept(num_patches, ratio) == kept
  sm = masking.random_shuffle_mask(jax.random.PRNGKey(0), 5, num_patches, ratio)
  assert sm.keep_ids.shape == (5, kept)
  np.testing.assert_array_equal(np.asarray(sm.mask).sum(1), num_patches - kept)


def test_shuffle_mask_restore_is_inverse_and_consistent():
  sm = masking.random_shuffle_mask(jax.random.PRNGKey(3), 4, 16, 0.75)
  restore = np.asarray(sm.restore_ids)
  x = np.arange(4 * 16).reshape(4, 16)
  # Rebuild the full shuffle: keep_ids are its first K entries.
  shuffle = np.argsort(restore, axis=1)
  np.testing.assert_array_equal(shuffle[:, :4], np.asarray(sm.keep_ids))
  shuffled = np.take_along_axis(x, shuffle, 1)
  np.testing.assert_array_equal(np.take_along_axis(shuffled, restore, 1), x)
  mask = np.asarray(sm.mask)
  for b in range(4):
    assert set(np.nonzero(mask[b] == 0)[0]) == set(np.asarray(sm.keep_ids)[b])
  # per-sample masks differ, and the same key gives the same mask
  assert len({tuple(m) for m in mask}) > 1
  np.testing.assert_array_equal(mask, np.asarray(masking.random_shuffle_mask(jax.random.PRNGKey(3), 4, 16, 0.75).mask))


def test_unshuffle_places_visible_tokens_and_mask_tokens():
  sm = masking.random_shuffle_mask(jax.random.PRNGKey(1), 3, 9, 0.6)
  keep = np.asarray(sm.keep_ids)
  k = keep.shape[1]
  visible = jnp.asarray(np.arange(3 * k, dtype=np.float32).reshape(3, k, 1) + 1.0)
  out = np.asarray(unshuffle(visible, jnp.full((1, 1, 1), -1.0), sm.restore_ids))[..., 0]
  for b in range(3):
    for j in range(k):
      assert out[b, keep[b, j]] == visible[b, j, 0]
    masked = np.nonzero(np.asarray(sm.mask)[b])[0]
    np.testing.assert_array_equal(out[b, masked], -1.0)


@pytest.mark.parametrize("img,mp,p,r", [(224, 32, 16, 0.6), (192, 32, 4, 0.6), (32, 8, 4, 0.6), (32, 16, 4, 0.5)])
def test_simmim_mask_exact_count_and_upsampling(img, mp, p, r):
  m = np.asarray(masking.simmim_mask(jax.random.PRNGKey(0), 6, img, mp, p, r))
  g, s = img // p, mp // p
  assert m.shape == (6, g, g)
  count = math.ceil((img // mp) ** 2 * r)
  assert count == masking.num_masked_simmim(img, mp, r)
  np.testing.assert_array_equal(m.sum((1, 2)), count * s * s)
  coarse = m[:, ::s, ::s]
  np.testing.assert_array_equal(coarse.sum((1, 2)), count)
  np.testing.assert_array_equal(np.repeat(np.repeat(coarse, s, 1), s, 2), m)
  assert len({c.tobytes() for c in coarse}) > 1


def test_simmim_mask_224_has_30_of_49():
  assert masking.num_masked_simmim(224, 32, 0.6) == 30


def test_simmim_mask_rejects_bad_sizes():
  with pytest.raises(ValueError, match="multiple of mask_patch_size"):
    masking.simmim_mask(jax.random.PRNGKey(0), 1, 30, 8, 4, 0.6)
  with pytest.raises(ValueError, match="multiple of the model patch size"):
    masking.simmim_mask(jax.random.PRNGKey(0), 1, 36, 6, 4, 0.6)


def test_masks_are_jittable_and_uniform_over_positions():
  f = jax.jit(lambda k: masking.simmim_mask(k, 512, 32, 8, 4, 0.6), static_argnums=())
  m = np.asarray(f(jax.random.PRNGKey(7)))[:, ::2, ::2].reshape(512, -1)
  freq = m.mean(0)  # each of 16 positions masked with probability 10/16
  assert np.all(np.abs(freq - 10 / 16) < 0.1)
