"""Limited-context inpainting: the patch / border geometry, the crops and rotations, the
thin-plate-spline warp, each loss against a hand computation, the adversary (inpainter +
patch discriminator) and the classifier each updating only their own parameters through the
trainer (exact resume: test_contract.py)."""
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from helpers import load_config, tiny_convnet_config
from je_helpers import method_and_state
from mim_jax import methods, train
from mim_jax.methods import limited_context as lc


def tiny_config(**overrides):
  return tiny_convnet_config("limited_context", "", dict(
      crop_size=12, lci_crop=8, lci_patch=4, inpainter_layers=2, ae_dim=8, disc_depth=8,
      fc_dim=16, warp_points=4), **{"optim.lr_batch_divisor": 8, **overrides})


# -- geometry -------------------------------------------------------------------------------

def test_border_and_patch_geometry():
  m = lc.erase_mask(48, 42)              # the official STL-10 setting: a 3 px border
  assert m.sum() == 42 * 42 and m[:3].sum() == 0 and m[3, 3] == 1 and m[44, 44] == 1 and m[45].sum() == 0
  m = lc.erase_mask(20, 16)              # the CIFAR presets: 2 px
  assert m[:2].sum() == 0 and m[:, :2].sum() == 0 and m[2:18, 2:18].all()
  with pytest.raises(ValueError, match="even"):
    lc.erase_mask(20, 15)
  assert lc.jitter_range(80, 48) == (1, 32)   # shifts -15 .. 15 around dx = 16
  assert lc.jitter_range(32, 28) == (1, 4)


def test_crop_paste_and_rotation():
  rng = np.random.default_rng(0)
  x = jnp.asarray(rng.normal(size=(2, 10, 10, 3)), jnp.float32)
  off = jnp.array([[1, 3], [4, 2]])
  p = lc.crop_at(x, off, 4)
  np.testing.assert_array_equal(p[1], x[1, 4:8, 2:6])
  y = lc.paste_at(x, p * 0 + 7.0, off)
  assert np.all(np.asarray(y[0, 1:5, 3:7]) == 7.0) and np.asarray(y[0, 0]).tolist() == np.asarray(x[0, 0]).tolist()
  # angle 0: exactly the integer crop; a quarter turn of a centred crop: rot90
  np.testing.assert_allclose(lc.crop_rotate(x, jnp.zeros(2), off, 4), p, atol=1e-6)
  q = lc.crop_rotate(x, jnp.full((2,), np.pi / 2), jnp.array([[3, 3], [3, 3]]), 4)
  c = x[:, 3:7, 3:7]
  assert min(np.abs(np.asarray(q) - np.asarray(jnp.rot90(c, k, axes=(1, 2)))).max() for k in (1, 3)) < 1e-4


def test_thin_plate_spline_warp():
  rng = np.random.default_rng(1)
  src = jnp.asarray(rng.uniform(0, 16, (6, 2)), jnp.float32)
  x = jnp.asarray(rng.normal(size=(1, 16, 16, 3)), jnp.float32)
  # no motion: the identity
  np.testing.assert_allclose(lc.warp(x, src[None], src[None]), x, atol=1e-4)
  # the spline interpolates: the flow at each moved point is its motion
  dst = src + jnp.asarray(rng.uniform(-1, 1, (6, 2)), jnp.float32)
  np.testing.assert_allclose(lc.spline_interpolate(dst, dst - src, dst), dst - src, atol=1e-3)
  f = np.asarray(lc.tps_flow(src, dst, 16))
  q = np.array([3.0, 5.0])
  np.testing.assert_allclose(f[3, 5], lc.spline_interpolate(dst, dst - src, jnp.asarray(q[None]))[0], atol=1e-4)
  # a common shift (an affine motion) is reproduced everywhere: out(q) = x(q - t)
  t = jnp.array([1.0, 2.0])
  np.testing.assert_allclose(lc.tps_flow(src, src + t, 16), np.broadcast_to(t, (16, 16, 2)), atol=1e-3)
  w = np.asarray(lc.warp(x, src[None], (src + t)[None]))
  np.testing.assert_allclose(w[0, 5:, 5:], np.asarray(x)[0, 4:-1, 3:-2], atol=1e-3)


def test_labels():
  assert lc.labels_for(2).tolist() == [0, 0, 1, 1, 2, 2, 3, 3, 4, 4, 5, 5]
  assert lc.labels_for(1, warping=False).tolist() == [0, 1, 2, 3, 4]


# -- losses ---------------------------------------------------------------------------------

def test_losses_by_hand():
  rng = np.random.default_rng(2)
  real, fake = rng.normal(size=4), rng.normal(size=4)
  want = np.mean(np.maximum(0, 1 - real)) + np.mean(np.maximum(0, 1 + fake))
  np.testing.assert_allclose(float(lc.hinge_discriminator_loss(jnp.asarray(real), jnp.asarray(fake))), want, rtol=1e-6)
  patch, ip, ae = (rng.uniform(-1, 1, (2, 8, 8, 3)) for _ in range(3))
  border = np.broadcast_to(1 - lc.erase_mask(8, 4)[None, :, :, None], patch.shape)
  mse_border = 50 * np.sum(border * (ip - patch) ** 2) / border.sum()
  mse_ae = 50 * np.mean((ae - patch) ** 2)
  d_fake, ce = rng.normal(size=1), 1.3
  want_g = -d_fake.mean() + mse_border + mse_ae - ce
  got = lc.inpainter_loss(jnp.asarray(d_fake), jnp.asarray(patch), jnp.asarray(ip), jnp.asarray(border),
                          jnp.asarray(ae), jnp.asarray(ce))
  np.testing.assert_allclose(float(got), want_g, rtol=1e-5)


@pytest.fixture(scope="module")
def built():
  return method_and_state(tiny_config(), batch=4, jit=True)


def test_method_losses_equal_hand_computations(built):
  m, params, state, batch = built
  loss, aux = jax.jit(lambda p, s, b: m.loss(p, s, b, None, 0))(params, state, batch)

  def parts(p, s, b):
    unit = lc.to_unit(b["image"], m.mean, m.std)
    patch, erased, ip, ae, img_lci, img_ae, _ = m.lci(p, s, b)
    x = m.classifier_input(b, unit, img_lci, img_ae)
    logits, _ = m.classify(p, s, x)
    return unit, patch, erased, ip, ae, img_lci, x, logits

  unit, patch, erased, ip, ae, img_lci, x, logits = map(np.asarray, jax.jit(parts)(params, state, batch))
  assert x.shape == (24, 12, 12, 3) and logits.shape == (24, 6)
  labels = np.repeat(np.arange(6), 4)
  logp = logits - np.log(np.sum(np.exp(logits - logits.max(1, keepdims=True)), 1, keepdims=True)) - logits.max(1, keepdims=True)
  ce = -np.mean(logp[np.arange(24), labels])
  np.testing.assert_allclose(float(loss), ce, rtol=1e-5)
  # the limited context: the border of the erased patch is the real border, the centre noise
  m4 = lc.erase_mask(8, 4).astype(bool)
  np.testing.assert_allclose(erased[:, ~m4], patch[:, ~m4], atol=1e-6)
  np.testing.assert_allclose(erased[:, m4], 0.1 * np.asarray(batch["noise"])[:, m4], atol=1e-6)
  # the LCI images differ from the originals only inside their patch
  off = np.asarray(batch["lci_offset"])
  for i in range(4):
    inside = np.zeros((16, 16), bool)
    inside[off[i, 0]:off[i, 0] + 8, off[i, 1]:off[i, 1] + 8] = True
    np.testing.assert_allclose(img_lci[i][~inside], unit[i][~inside], atol=1e-6)
  # the adversary's loss: inpainter + hinge, recomputed from the pieces
  adv, aux_a = jax.jit(lambda p, s, b: m.adversary_loss(p, s, b, None, 0))(params, state, batch)
  dv = m.variables(params, state, "patch_disc")
  d_fake = np.asarray(m.patch_disc().apply(dv, jnp.asarray(ip), False, mutable=["batch_stats"])[0])
  d_real = np.asarray(m.patch_disc().apply(dv, jnp.asarray(patch), True, mutable=["batch_stats"])[0])
  border = np.broadcast_to(1 - m4[None, :, :, None], patch.shape)
  want_g = (-d_fake.mean() + 50 * np.sum(border * (ip - patch) ** 2) / border.sum()
            + 50 * np.mean((ae - patch) ** 2) - ce)
  want_d = np.mean(np.maximum(0, 1 - d_real)) + np.mean(np.maximum(0, 1 + d_fake))
  np.testing.assert_allclose(float(aux_a["inpainter"]), want_g, rtol=1e-4)
  np.testing.assert_allclose(float(aux_a["disc"]), want_d, rtol=1e-4)
  np.testing.assert_allclose(float(adv), want_g + want_d, rtol=1e-4)
  assert set(aux_a["collections"]["batch_stats"]) == {"patch_disc"} or \
      set(aux_a["collections"]["batch_stats"]) == {"patch_disc", "inpainter"}
  assert set(aux["collections"]["batch_stats"]) == {"encoder", "head"}


def test_adversary_gradients_stay_in_their_terms(built):
  """The discriminator's gradient comes from the hinge loss alone, the inpainter's from its own
  loss: the adversary loss's gradient equals the sum of the two terms' own gradients."""
  m, params, state, batch = built
  g = jax.jit(jax.grad(lambda p: m.adversary_loss(p, state, batch, None, 0)[0]))(params)
  gd = jax.jit(jax.grad(lambda p: m.adversary_loss(p, state, batch, None, 0)[1]["disc"]))(params)
  for a, b in zip(jax.tree.leaves(g["patch_disc"]), jax.tree.leaves(gd["patch_disc"])):
    np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-6)
  # the picture
  r = jax.jit(m.reconstruct)(params, state, batch["image"], jax.random.PRNGKey(0))
  assert r["masked"].shape == r["reconstruction"].shape == batch["image"].shape


# -- the trainer ----------------------------------------------------------------------------

def one_step(**overrides):
  tr = train.Trainer.create(tiny_config(**overrides), devices=jax.devices()[:1])
  p0 = jax.device_get(tr.state["params"])
  state, metrics = tr.step_fn(tr.state, tr.next_batch())
  return p0, jax.device_get(state["params"]), metrics


def changed(a, b):
  return any(not np.array_equal(x, y) for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b)))


def test_each_update_touches_only_its_own_parameters():
  p0, p1, metrics = one_step(**{"optim.base_lr": 0.0, "optim.min_lr": 0.0})
  assert "adversary/inpainter" in metrics and "aux/accuracy" in metrics
  assert changed(p0["inpainter"], p1["inpainter"]) and changed(p0["patch_disc"], p1["patch_disc"])
  assert not changed(p0["encoder"], p1["encoder"]) and not changed(p0["head"], p1["head"])
  q0, q1, _ = one_step(**{"limited_context.adv_lr": 0.0})
  assert not changed(q0["inpainter"], q1["inpainter"]) and not changed(q0["patch_disc"], q1["patch_disc"])
  assert changed(q0["encoder"], q1["encoder"]) and changed(q0["head"], q1["head"])


def test_the_optimisers_are_the_officials():
  m = methods.get(load_config("limited_context"))
  adv = m.adversary_optim_config()
  assert adv.base_lr == 2e-4 and adv.b1 == 0.5 and adv.param_groups == (("^patch_disc/", {"lr_scale": 4.0}),)
  c = load_config("limited_context")
  assert (c.optim.base_lr, c.optim.b1, c.optim.b2) == (3e-4, 0.5, 0.99)
  assert c.optim.base_lr * c.optim.weight_decay == pytest.approx(1e-4)
