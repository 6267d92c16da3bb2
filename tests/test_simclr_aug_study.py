"""SimCLR's augmentation study (Sec. 3, Fig. 5): the operators on a tiny batch against their
definitions, their order, and the study's one-sided views (identity beside the transforms)."""
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from je_helpers import method_and_state, tiny_je_config
from mim_jax.data import augment, views
from mim_jax.methods import simclr


def levels(seed=0, b=6, s=12):
  return jnp.asarray(np.random.default_rng(seed).integers(0, 256, (b, s, s, 3)), jnp.float32)


def test_rotate_is_a_quarter_half_or_three_quarter_turn_never_none():
  x = levels(b=64)
  y = np.asarray(views.rotate90(jax.random.PRNGKey(0), x))
  turns = []
  for xi, yi in zip(np.asarray(x), y):
    ks = [k for k in range(4) if np.array_equal(np.rot90(xi, k, axes=(0, 1)), yi)]
    assert len(ks) == 1 and ks[0] != 0
    turns.append(ks[0])
  assert set(turns) == {1, 2, 3}


def test_cutout_blackens_one_square_of_a_quarter_to_half_the_side():
  x = jnp.full((200, 32, 32, 3), 200.0)
  y = np.asarray(views.cutout(jax.random.PRNGKey(1), x))
  sides = []
  for yi in y:
    hole = (yi == 0).all(-1)
    assert ((yi == 0) | (yi == 200)).all() and (hole == (yi == 0).any(-1)).all()
    rows, cols = np.nonzero(hole.any(1))[0], np.nonzero(hole.any(0))[0]
    # one axis-aligned rectangle: every pixel inside its bounding box is black
    assert hole.sum() == len(rows) * len(cols) == hole[rows[0]:rows[-1] + 1, cols[0]:cols[-1] + 1].sum()
    assert len(rows) <= 16 and len(cols) <= 16
    inside = 0 < rows[0] and rows[-1] < 31 and 0 < cols[0] and cols[-1] < 31
    if inside:
      assert len(rows) == len(cols)
      sides.append(len(rows))
  assert min(sides) >= 8 and max(sides) <= 16 and len(set(sides)) > 3


def test_noise_is_zero_mean_with_at_most_a_tenth_of_the_range():
  x = jnp.full((64, 16, 16, 3), 128.0)
  y = np.asarray(views.gaussian_noise(jax.random.PRNGKey(2), x))
  assert np.array_equal(y, np.round(y)) and y.min() >= 0 and y.max() <= 255
  d = (y - 128.0).reshape(64, -1)
  assert abs(d.mean()) < 0.5
  std = d.std(1)
  assert std.max() < 25.5 * 1.15 and std.min() < 5 and std.max() > 15   # sigma ~ U(0, 25.5)


def test_sobel_is_the_gradient_magnitude_of_the_luma():
  x = levels(3, b=2, s=9)
  got = np.asarray(views.sobel(x))
  q = np.asarray(x, np.int64)
  l = ((q[..., 0] * 19595 + q[..., 1] * 38470 + q[..., 2] * 7471 + 0x8000) >> 16).astype(np.float64)
  p = np.pad(l, ((0, 0), (1, 1), (1, 1)), mode="edge")
  kx = np.array([[-1, 0, 1], [-2, 0, 2], [-1, 0, 1]], np.float64)
  gx = np.zeros_like(l)
  gy = np.zeros_like(l)
  for i in range(3):
    for j in range(3):
      win = p[:, i:i + 9, j:j + 9]
      gx += kx[i, j] * win
      gy += kx.T[i, j] * win
  want = np.round(np.clip(np.hypot(gx, gy), 0, 255))
  for c in range(3):
    np.testing.assert_allclose(got[..., c], want, atol=1.0)     # float32 sqrt at .5 ties
  assert np.mean(got[..., 0] == want) > 0.99
  flat = np.asarray(views.sobel(jnp.full((1, 5, 5, 3), 77.0)))
  assert (flat == 0).all()


def test_the_operators_apply_in_the_order_given():
  x = levels(4, b=4, s=16)
  v = tiny_je_config("simclr").simclr.views
  rng = jax.random.PRNGKey(5)
  k1, k2 = jax.random.split(rng, 2)
  a = views.study_view(rng, x, ("rotate", "sobel"), v)
  np.testing.assert_array_equal(a, views.sobel(views.rotate90(k1, x)))
  b = views.study_view(rng, x, ("sobel", "cutout"), v)
  np.testing.assert_array_equal(b, views.cutout(k2, views.sobel(x)))
  np.testing.assert_array_equal(views.study_view(rng, x, (), v), x)
  with pytest.raises(ValueError, match="crop, color"):
    views.study_view(rng, x, ("jitter",), v)


def test_study_views_are_the_image_beside_its_transform():
  c = tiny_je_config("simclr", **{"simclr.aug_study": "color+blur"})
  m, params, state, pair = method_and_state(c)
  assert m.study == ("color", "blur")
  size = c.input.image_size
  rng = jax.random.PRNGKey(0)
  images = jax.random.randint(jax.random.fold_in(rng, 1), (8, size, size, 3), 0, 256).astype(jnp.uint8)
  x = images.astype(jnp.float32)
  norm = lambda t: augment.normalize(t, c.input.mean, c.input.std)
  g = pair["global"]
  assert g.shape == (8, 2, size, size, 3)
  np.testing.assert_allclose(g[:, 0], norm(x), atol=1e-6)              # the identity branch
  want = views.study_view(jax.random.fold_in(rng, 2), x, ("color", "blur"), m.views_cfg())
  np.testing.assert_allclose(g[:, 1], norm(want), atol=1e-6)
  assert not np.allclose(g[:, 0], g[:, 1])
  loss, _ = m.loss(params, state, pair, rng, jnp.int32(0))
  assert np.isfinite(float(loss))
  # streamed data: one centre-square base crop, unflipped, instead of the two views
  (spec,) = m.train_views()
  assert (spec.count, spec.scale, spec.ratio, spec.hflip) == (1, (1.0, 1.0), (1.0, 1.0), False)
  host = m.preprocess(rng, {"global": images[:, None]}, c.input, False)["global"]
  np.testing.assert_allclose(host[:, 0], norm(x), atol=1e-6)
  assert len(tiny_je_config("simclr").simclr.aug_study) == 0
  assert simclr.SimCLR(tiny_je_config("simclr")).train_views()[0].count == 2


def test_an_unknown_operator_is_one_line_naming_the_operators():
  with pytest.raises(ValueError, match=r"unknown 'jitter'.*crop, color, rotate, cutout, noise, blur, sobel"):
    method_and_state(tiny_je_config("simclr", **{"simclr.aug_study": "crop+jitter"}))
