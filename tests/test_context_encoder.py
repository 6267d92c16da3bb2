"""Context encoders: train.lua's central region with its overlap weights, the random blocks and
train_random.lua's random regions, the weighted L2 and the BCE losses against hand
computations, the discriminator and the generator each updating only their own parameters
through the trainer's adversary step, and exact resume."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from helpers import tiny_convnet_config
from je_helpers import method_and_state
from mim_jax import methods, train
from mim_jax.methods import context_encoder as ce


def tiny_config(**overrides):
  return tiny_convnet_config("context_encoder", "", dict(ngf=8, ndf=8),
                             **{"optim.lr_batch_divisor": 8, **overrides})


def sigmoid(x):
  return 1.0 / (1.0 + np.exp(-x))


# -- masks ----------------------------------------------------------------------------------

def test_central_region_is_train_luas_with_the_overlap():
  # fineSize 128, overlapPred 4: the region is rows/cols 1+32 .. 64+32 (1-based), the erased
  # part 1+32+4 .. 64+32-4, i.e. 0-based [32, 96) and [36, 92).
  assert ce.central_bounds(128) == (32, 96)
  m = ce.central_mask(128, 4)
  rows = np.where(m.any(axis=1))[0]
  assert rows[0] == 36 and rows[-1] == 91 and m.sum() == 56 * 56
  assert np.array_equal(m, m.T)
  w = ce.central_weights(128, 4, 10.0)
  assert w.shape == (64, 64)
  inner = np.zeros((64, 64), bool)
  inner[4:60, 4:60] = True
  assert np.all(w[inner] == 1.0) and np.all(w[~inner] == 10.0)
  # the inner part of the predicted region is exactly the erased part of the image
  assert np.array_equal(m[32:96, 32:96], inner)
  assert np.all(ce.central_weights(32, 0, 10.0) == 1.0)
  with pytest.raises(ValueError, match="overlap"):
    ce.central_mask(16, 4)


def test_random_blocks_cover_at_most_a_quarter():
  draw = jax.jit(lambda k: ce.random_block_mask(k, 32, 8, 4, 8))
  for seed in range(5):
    m = np.asarray(draw(jax.random.PRNGKey(seed)))
    assert 0 < m.sum() <= 0.25 * 32 * 32
    # the union of axis-aligned squares: every erased row run lies in one of the blocks'
    # rows; at least one full 4x4 block is present
    windows = np.lib.stride_tricks.sliding_window_view(m, (4, 4)).all(axis=(2, 3))
    assert windows.any()


def test_random_region_is_train_random_luas_pattern():
  draw = jax.jit(lambda k: ce.random_region_mask(k, 32, 0.24))
  fracs = np.array([np.asarray(draw(jax.random.PRNGKey(seed))).mean() for seed in range(6)])
  assert np.all((fracs > 0.2) & (fracs < 0.3)), fracs
  # a re-derivation of one candidate: uniform noise resized bicubically, below 25%
  k = jax.random.split(jax.random.PRNGKey(0), 16)[0]
  k_noise, k_y, k_x = jax.random.split(k, 3)
  low = int(np.ceil(32 * 0.24)) + 1
  big = int(np.ceil(low / 0.24))
  noise = np.asarray(jax.random.uniform(k_noise, (low, low))) * 255.0
  pat = np.asarray(jax.image.resize(jnp.asarray(noise), (big, big), "cubic")) / 255.0 < 0.25
  y, x = int(jax.random.randint(k_y, (), 0, big - 31)), int(jax.random.randint(k_x, (), 0, big - 31))
  cand = pat[y:y + 32, x:x + 32]
  got = np.asarray(draw(jax.random.PRNGKey(0)))
  if 0.2 < cand.mean() < 0.3:
    assert np.array_equal(got, cand)


def test_erase_fills_train_luas_mean_pixel():
  x = jnp.zeros((1, 4, 4, 3))
  m = jnp.zeros((1, 4, 4), bool).at[0, 1, 2].set(True)
  out = np.asarray(ce.erase(x, m))
  np.testing.assert_allclose(out[0, 1, 2], 2 * np.array([117, 104, 123]) / 255 - 1, atol=1e-6)
  assert np.all(out[0, 0] == 0)


# -- losses ---------------------------------------------------------------------------------

def test_losses_by_hand():
  rng = np.random.default_rng(0)
  lr, lf = rng.normal(size=5), rng.normal(size=5)
  want_d = -np.mean(np.log(sigmoid(lr))) - np.mean(np.log(1 - sigmoid(lf)))
  np.testing.assert_allclose(float(ce.discriminator_loss(jnp.asarray(lr), jnp.asarray(lf))),
                             want_d, rtol=1e-5)
  pred, real = rng.uniform(-1, 1, (2, 8, 8, 3)), rng.uniform(-1, 1, (2, 8, 8, 3))
  w = 0.999 * ce.central_weights(16, 1, 10.0)
  want_rec = np.sum(w[None, :, :, None] * (pred - real) ** 2) / pred.size
  rec = ce.reconstruction_loss(jnp.asarray(pred), jnp.asarray(real), jnp.asarray(w)[None])
  np.testing.assert_allclose(float(rec), want_rec, rtol=1e-5)
  want_g = 0.001 * -np.mean(np.log(sigmoid(lf))) + want_rec
  np.testing.assert_allclose(float(ce.generator_loss(jnp.asarray(lf), rec, 0.001)), want_g, rtol=1e-5)


@pytest.fixture(scope="module")
def built():
  return method_and_state(tiny_config(), batch=8, jit=True)


def test_method_losses_equal_hand_computations(built):
  m, params, state, batch = built
  loss, aux = jax.jit(lambda p, s, b: m.loss(p, s, b, None, 0))(params, state, batch)
  pred, real, erased, _ = jax.jit(lambda p, s, b: m.generate(p, s, b, True))(params, state, batch)
  assert pred.shape == (8, 8, 8, 3) and real.shape == (8, 8, 8, 3)
  w = 0.999 * ce.central_weights(16, m.overlap, 10.0)
  want_rec = np.mean(w[None, :, :, None] * (np.asarray(pred) - np.asarray(real)) ** 2)
  np.testing.assert_allclose(float(aux["rec"]), want_rec, rtol=1e-5)
  lf, _ = m.discriminate(params, state, pred)
  want = 0.001 * -np.mean(np.log(sigmoid(np.asarray(lf)))) + want_rec
  np.testing.assert_allclose(float(loss), want, rtol=1e-5)
  # the encoder saw the erased image: the centre (shrunk by the overlap) is the mean pixel
  unit = np.asarray(ce.to_unit(erased, m.mean, m.std))
  np.testing.assert_allclose(unit[:, 5:11, 5:11], np.broadcast_to(
      2 * np.array([117, 104, 123]) / 255 - 1, (8, 6, 6, 3)), atol=1e-5)
  dloss, daux = jax.jit(lambda p, s, b: m.adversary_loss(p, s, b, None, 0))(params, state, batch)
  lr, stats = m.discriminate(params, state, real)
  lf2, _ = m.discriminate(params, state, pred, stats=stats)
  want_d = (-np.mean(np.log(sigmoid(np.asarray(lr)))) - np.mean(np.log(1 - sigmoid(np.asarray(lf2)))))
  np.testing.assert_allclose(float(dloss), want_d, rtol=1e-5)
  assert "collections" not in daux          # an 8 px discriminator has no BatchNorm
  assert set(aux["collections"]["batch_stats"]) == {"encoder", "decoder"}


def test_the_picture(built):
  m, params, state, batch = built
  r = jax.jit(m.reconstruct)(params, state, batch["image"], jax.random.PRNGKey(0))
  x = np.asarray(batch["image"])
  masked, rec = np.asarray(r["masked"]), np.asarray(r["reconstruction"])
  keep = ~ce.central_mask(16, m.overlap)
  np.testing.assert_allclose(masked[:, keep], x[:, keep], atol=1e-5)
  np.testing.assert_allclose(rec[:, keep], x[:, keep], atol=1e-5)
  assert not np.allclose(rec[:, ~keep], masked[:, ~keep])


def test_bad_mask_is_a_one_line_error():
  with pytest.raises(ValueError, match="context_encoder.mask"):
    methods.get(tiny_config(**{"context_encoder.mask": "ring"}))


# -- the trainer: who updates what ----------------------------------------------------------

def one_step(**overrides):
  tr = train.Trainer.create(tiny_config(**overrides), devices=jax.devices()[:1])
  p0 = jax.device_get(tr.state["params"])
  state, _ = tr.step_fn(tr.state, tr.next_batch())
  return p0, jax.device_get(state["params"])


def changed(a, b):
  return any(not np.array_equal(x, y) for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b)))


def test_each_update_touches_only_its_own_parameters():
  # Main lr 0: the step is the discriminator's update alone.
  p0, p1 = one_step(**{"optim.base_lr": 0.0})
  assert changed(p0["discriminator"], p1["discriminator"])
  assert not changed(p0["encoder"], p1["encoder"]) and not changed(p0["decoder"], p1["decoder"])
  # Discriminator lr 0: the step is the generator's update alone.
  q0, q1 = one_step(**{"context_encoder.d_lr": 0.0})
  assert not changed(q0["discriminator"], q1["discriminator"])
  assert changed(q0["encoder"], q1["encoder"]) and changed(q0["decoder"], q1["decoder"])


def test_l2_only_has_no_discriminator():
  m = methods.get(tiny_config(**{"context_encoder.adv_weight": 0.0}))
  assert m.adversary_keys == ()
  v = jax.eval_shape(m.init_variables, jax.random.PRNGKey(0), jnp.zeros((2, 16, 16, 3)))
  assert set(v["params"]) == {"encoder", "decoder"}


# (Exact resume, the discriminator's loss included: tests/test_contract_convnets.py.)
