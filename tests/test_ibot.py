"""iBOT: the loss against a hand computation, its pieces against their definitions (masks,
temperatures, momentum, EMA, centres, gradient shaping, position interpolation, the DINO views
against PIL), learning on the embedded data, and resuming."""
import math
import os
import random
import shutil

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from PIL import Image, ImageEnhance, ImageFilter, ImageOps

from helpers import load_config, tiny_config
from mim_jax import methods, train
from mim_jax.data import views
from mim_jax.methods import ibot
from mim_jax.models import vit


def small_config(**overrides):
  c = tiny_config("ibot", **overrides)
  c.ibot.update(out_dim=48, patch_out_dim=48)
  c.ibot.head = dict(hidden_dim=32, bottleneck_dim=16, nlayers=3)
  return c


@pytest.fixture(scope="module")
def method():
  return methods.get(small_config())


@pytest.fixture(scope="module")
def params_state(method):
  p = jax.jit(method.init)(jax.random.PRNGKey(0), jnp.zeros((2, 32, 32, 3)))
  return p, jax.jit(method.init_state)(p)


# ---------------------------------------------------------------------------------------------
# The loss.

def softmax(x):
  e = np.exp(x - x.max(-1, keepdims=True))
  return e / e.sum(-1, keepdims=True)


def log_softmax(x):
  z = x - x.max(-1, keepdims=True)
  return z - np.log(np.exp(z).sum(-1, keepdims=True))


def hand_loss(s_cls, s_patch, t_cls, t_patch, masks, c1, c2, temp, temp2, st=0.1, lam1=1.0, lam2=1.0):
  """main_ibot.py iBOTLoss.forward, loop for loop, in float64 numpy."""
  total1 = total2 = n1 = n2 = 0.0
  for q in range(t_cls.shape[0]):
    tq = softmax((t_cls[q] - c1) / temp)
    t2q = softmax((t_patch[q] - c2[0]) / temp2)
    for v in range(s_cls.shape[0]):
      if v == q:
        l2 = -(t2q * log_softmax(s_patch[v] / st)).sum(-1)
        m = masks[v].astype(np.float64)
        total2 += ((l2 * m).sum(-1) / np.maximum(m.sum(-1), 1.0)).mean()
        n2 += 1
      else:
        total1 += (-(tq * log_softmax(s_cls[v] / st)).sum(-1)).mean()
        n1 += 1
  return total1 / n1 * lam1 + total2 / n2 * lam2, total1 / n1, total2 / n2


def test_loss_equals_hand_computation():
  rs = np.random.RandomState(0)
  g, v, b, l, k, k2 = 2, 4, 3, 5, 7, 6
  s_cls, t_cls = rs.randn(v, b, k), rs.randn(g, b, k)
  s_patch, t_patch = rs.randn(g, b, l, k2), rs.randn(g, b, l, k2)
  masks = np.zeros((g, b, l), np.int32)
  masks[0, 0, [1, 3]] = 1
  masks[0, 2, :] = 1
  masks[1, 1, 0] = 1            # image (1, 0) and (0, 1) have no masked patch: 0 / max(0, 1)
  c1, c2 = rs.randn(1, k) * 0.3, rs.randn(1, 1, k2) * 0.3
  want, want1, want2 = hand_loss(s_cls, s_patch, t_cls, t_patch, masks, c1, c2, 0.05, 0.06,
                                 lam1=0.7, lam2=1.3)
  f32 = lambda x: jnp.asarray(x, jnp.float32)  # noqa: E731
  got, parts = ibot.ibot_loss(f32(s_cls), f32(s_patch), f32(t_cls), f32(t_patch), jnp.asarray(masks),
                              f32(c1), f32(c2), 0.05, 0.06, 0.1, 0.7, 1.3)
  np.testing.assert_allclose(float(got), want, rtol=2e-5)
  np.testing.assert_allclose(float(parts["loss_cls"]), want1, rtol=2e-5)
  np.testing.assert_allclose(float(parts["loss_patch"]), want2, rtol=2e-5)


def test_method_loss_wires_views_masks_centres_and_temperatures(method, params_state):
  """The method's loss on fixed views and masks equals the hand loss of its networks' outputs:
  teacher on the unmasked global views, student on the masked global views and the local views,
  view-major order, the current centres and the step's temperatures."""
  params, state = params_state
  rs = np.random.RandomState(1)
  b, grid = 2, 8
  imgs = {"global": jnp.asarray(rs.randn(b, 2, 32, 32, 3), jnp.float32),
          "local": jnp.asarray(rs.randn(b, 2, 16, 16, 3), jnp.float32)}
  masks = (rs.rand(2 * b, grid * grid) < 0.3).astype(np.int32)
  state = dict(state, center=jnp.asarray(rs.randn(1, 48) * 0.1, jnp.float32),
               center2=jnp.asarray(rs.randn(1, 1, 48) * 0.1, jnp.float32))
  m = methods.get(small_config())
  m.masks = lambda rng, n, step: jnp.asarray(masks)
  spe = m.run_steps()[0]
  step = 3 * spe                 # epoch 3 of the 2-epoch warm-up: both temperatures final
  loss, aux = jax.jit(lambda p, s: m.loss(p, s, imgs, jax.random.PRNGKey(0), step))(params, state)

  gv = np.swapaxes(np.asarray(imgs["global"]), 0, 1).reshape(2 * b, 32, 32, 3)
  lv = np.swapaxes(np.asarray(imgs["local"]), 0, 1).reshape(2 * b, 16, 16, 3)

  @jax.jit
  def outputs(params, state):
    t_tok = m.encoder.apply({"params": state["teacher"]["encoder"]}, gv)
    t_cls, t_patch = m.teacher_head.apply({"params": state["teacher"]["head"]}, t_tok)
    s_tok = m.encoder.apply({"params": params["encoder"]}, gv, mask=jnp.asarray(masks))
    s_cls, s_patch = m.head.apply({"params": params["head"]}, s_tok)
    l_tok = m.encoder.apply({"params": params["encoder"]}, lv)     # 16 px: interpolated table
    l_cls, _ = m.head.apply({"params": params["head"]}, l_tok[:, 0], patches=False)
    return t_cls, t_patch, s_cls, s_patch, l_cls

  t_cls, t_patch, s_cls, s_patch, l_cls = outputs(params, state)
  s_all = np.concatenate([np.asarray(s_cls), np.asarray(l_cls)]).reshape(4, b, -1)
  want, _, _ = hand_loss(s_all.astype(np.float64), np.asarray(s_patch, np.float64).reshape(2, b, 64, -1),
                         np.asarray(t_cls, np.float64).reshape(2, b, -1),
                         np.asarray(t_patch, np.float64).reshape(2, b, 64, -1), masks.reshape(2, b, -1),
                         np.asarray(state["center"]), np.asarray(state["center2"]), 0.07, 0.07)
  np.testing.assert_allclose(float(loss), want, rtol=1e-4)
  np.testing.assert_allclose(np.asarray(aux["state_stats"]["center"]),
                             np.asarray(t_cls).mean(0, keepdims=True), rtol=1e-5, atol=1e-6)
  np.testing.assert_allclose(np.asarray(aux["state_stats"]["center2"]),
                             np.asarray(t_patch).mean((0, 1))[None, None], rtol=1e-5, atol=1e-6)
  assert float(aux["mask_ratio"]) == pytest.approx(masks.mean())


GRAD_VIEWS = {"global": jax.random.normal(jax.random.PRNGKey(4), (2, 2, 32, 32, 3))}


def grad_fn(clip, freeze):
  """jit(step -> gradients wrt (params, state)) of a method with that clipping and freeze."""
  c = small_config()
  c.ibot.update(clip_grad=clip, freeze_last_layer=freeze)
  m = methods.get(c)
  loss = lambda p, s, step: m.loss(p, s, GRAD_VIEWS, jax.random.PRNGKey(5), step)[0]  # noqa: E731
  return m, jax.jit(jax.grad(loss, argnums=(0, 1)))


@pytest.fixture(scope="module")
def shaped_grads(params_state):
  params, state = params_state
  m, f = grad_fn(0.05, 1.0)
  spe = m.run_steps()[0]
  return spe, f(params, state, 0), f(params, state, spe)


@pytest.fixture(scope="module")
def raw_grads(params_state, shaped_grads):
  params, state = params_state
  spe = shaped_grads[0]
  _, f = grad_fn(0.0, 0.0)
  return f(params, state, 0), f(params, state, spe)


def test_teacher_receives_no_gradient(shaped_grads, raw_grads):
  for g_params, g_state in (shaped_grads[1], raw_grads[0]):
    assert all(float(jnp.abs(x).max()) == 0.0 for x in jax.tree.leaves(g_state))
    assert float(jnp.abs(g_params["encoder"]["encoder"]["block00"]["mlp"]["fc1"]["kernel"]).max()) > 0


# ---------------------------------------------------------------------------------------------
# Schedules, EMA and centres.

def test_teacher_temperatures_follow_the_official_epoch_schedule():
  c = small_config()
  c.ibot.update(warmup_teacher_temp_epochs=4, teacher_temp=0.07, teacher_patch_temp=0.06,
                pred_start_epoch=2)
  m = methods.get(c)
  spe = m.run_steps()[0]
  t1 = np.concatenate([np.linspace(0.04, 0.07, 4), np.full(6, 0.07)])
  t2 = np.concatenate([np.full(2, 0.04), np.linspace(0.04, 0.06, 4), np.full(4, 0.06)])
  for epoch in range(10):
    for step in (epoch * spe, epoch * spe + spe - 1):
      a, b = m.teacher_temps(step)
      assert float(a) == pytest.approx(t1[epoch], rel=1e-6) and float(b) == pytest.approx(t2[epoch], rel=1e-6)


def test_ema_update_uses_the_cosine_momentum_and_centres_move_by_point_nine(method, params_state):
  c = small_config()
  c.ibot.momentum_teacher = 0.996
  m = methods.get(c)
  assert (c.ibot.center_momentum, c.ibot.center_momentum2) == (0.9, 0.9)
  total = m.run_steps()[1]
  its = np.arange(total)
  official = 1 + 0.5 * (0.996 - 1) * (1 + np.cos(np.pi * its / len(its)))   # utils.cosine_scheduler
  for it in (0, 1, total // 2, total - 1):
    assert float(m.momentum(it)) == pytest.approx(official[it], abs=1e-7)
  assert float(m.momentum(0)) == pytest.approx(0.996)

  params, state = params_state
  new_params = jax.tree.map(lambda x: x + 1.0, params)
  stats = {"center": jnp.full((1, 48), 2.0), "center2": jnp.full((1, 1, 48), -1.0)}
  state = dict(state, center=jnp.full((1, 48), 0.5), center2=jnp.full((1, 1, 48), 0.25))
  out = m.update_state(new_params, state, 3, stats)
  mom = official[3]
  jax.tree.map(lambda t, old, p: np.testing.assert_allclose(t, mom * old + (1 - mom) * p, rtol=1e-6, atol=1e-7),
               out["teacher"], state["teacher"], m.teacher_params(new_params))
  np.testing.assert_allclose(out["center"], 0.9 * 0.5 + 0.1 * 2.0, rtol=1e-6)
  np.testing.assert_allclose(out["center2"], 0.9 * 0.25 + 0.1 * -1.0, rtol=1e-6)


def test_teacher_mirrors_the_shared_head_or_drops_the_patch_layer():
  c = small_config()
  c.ibot.update(shared_head=False, shared_head_teacher=True)
  m = methods.get(c)
  p = jax.eval_shape(m.init, jax.random.PRNGKey(0), jnp.zeros((2, 32, 32, 3)))
  assert "last_layer2" in p["head"] and "last_layer2" not in jax.eval_shape(m.init_state, p)["teacher"]["head"]
  assert "kernel_g" in p["head"]["last_layer"]               # norm_last_layer=False: g trained
  c.ibot.norm_last_layer = True
  p = jax.eval_shape(methods.get(c).init, jax.random.PRNGKey(0), jnp.zeros((2, 32, 32, 3)))
  assert set(p["head"]["last_layer"]) == {"kernel_v"}        # g fixed at 1


# ---------------------------------------------------------------------------------------------
# Gradient shaping.

def test_last_layer_frozen_in_the_first_epoch_and_gradients_clipped_per_parameter(shaped_grads, raw_grads):
  """Step 0 (epoch 0, frozen) and step spe (epoch 1): each parameter's gradient is the raw one
  scaled by min(1, clip / (norm + 1e-6)); the last layer's is zero in the frozen epoch only."""
  _, (frozen, _), (thawed, _) = shaped_grads
  for raw, shaped, freeze in ((raw_grads[0][0], frozen, True), (raw_grads[1][0], thawed, False)):
    flat_raw = jax.tree_util.tree_flatten_with_path(raw)[0]
    for (path, r), g in zip(flat_raw, jax.tree.leaves(shaped)):
      norm = float(jnp.sqrt(jnp.sum(r ** 2)))
      clipped = np.asarray(r) * min(1.0, 0.05 / (norm + 1e-6))
      if freeze and "last_layer" in jax.tree_util.keystr(path):
        assert float(jnp.abs(g).max()) == 0.0 and norm > 0
      else:
        # The raw and the shaped gradients come from two compiled programs whose sums may run in
        # another order: elements near 0 get an absolute tolerance relative to the leaf's scale.
        np.testing.assert_allclose(g, clipped, rtol=1e-5, atol=1e-4 * np.abs(clipped).max())
  assert any(float(jnp.abs(g).max()) > 0 for g in jax.tree.leaves(thawed["head"]["last_layer"]))


# ---------------------------------------------------------------------------------------------
# Masks.

def official_block_mask(h, w, ratio, rnd, aspect=(0.3, 1 / 0.3)):
  """loader.py ImageFolderMask.__getitem__ (pred_shape 'block'), in plain Python."""
  log_aspect = (math.log(aspect[0]), math.log(aspect[1]))
  high = ratio * h * w
  mask = np.zeros((h, w), bool)
  count = 0
  while count < high:
    budget = high - count
    delta = 0
    for _ in range(10):
      low = (min(h, w) // 3) ** 2
      area = rnd.uniform(low, budget)
      ar = math.exp(rnd.uniform(*log_aspect))
      hh, ww = int(round(math.sqrt(area * ar))), int(round(math.sqrt(area / ar)))
      if ww < w and hh < h:
        top, left = rnd.randint(0, h - hh), rnd.randint(0, w - ww)
        num = mask[top:top + hh, left:left + ww].sum()
        if 0 < hh * ww - num <= budget:
          delta += hh * ww - num
          mask[top:top + hh, left:left + ww] = True
      if delta > 0:
        break
    if delta == 0:
      break
    count += delta
  return mask


@pytest.mark.parametrize("grid", [8, 14])
def test_block_masks_follow_ibots_generator(grid):
  rnd = random.Random(0)
  ratios = np.asarray([0.0, 0.1, 0.3, 0.5], np.float32)
  n = 256
  got = np.asarray(ibot.ibot_masks(jax.random.PRNGKey(0), jnp.asarray(np.repeat(ratios, n)), grid, grid))
  counts = got.reshape(len(ratios), n, -1).sum(-1)
  for r, c in zip(ratios, counts):
    assert c.max() <= math.floor(r * grid * grid)       # never more than the float budget
    ref = np.asarray([official_block_mask(grid, grid, float(r), rnd).sum() for _ in range(1000)])
    se = math.sqrt(c.var() / n + ref.var() / 1000) + 1e-9
    assert abs(c.mean() - ref.mean()) < 4 * se + 0.05, (r, c.mean(), ref.mean())
  assert counts[0].max() == 0


def test_rand_masks_have_exactly_int_ratio_patches():
  ratios = jnp.asarray([0.0, 0.13, 0.3, 0.5])
  got = np.asarray(ibot.ibot_masks(jax.random.PRNGKey(1), ratios, 14, 14, shape="rand"))
  assert list(got.sum(1)) == [int(float(r) * 196) for r in np.asarray(ratios)]


def test_prediction_ratio_per_crop_is_zero_or_uniform():
  r = np.asarray(ibot.pred_ratios(jax.random.PRNGKey(0), 4000, (0.0, 0.3), (0.0, 0.2)))
  zero = r == 0
  assert 0.45 < zero.mean() < 0.55
  assert r[~zero].min() >= 0.1 and r[~zero].max() <= 0.5
  assert abs(r[~zero].mean() - 0.3) < 0.01


# ---------------------------------------------------------------------------------------------
# Encoder: the one ViT forward; other sizes use the interpolated table (tests/test_vit_forward.py
# checks the ViT at other sizes against the hand-built computation).

def test_encoder_is_the_vit_and_interpolation_is_torch_bicubic(method, params_state):
  params, _ = params_state
  assert type(method.encoder) is vit.ViT and not hasattr(method, "backbone")
  assert float(jnp.abs(params["encoder"]["mask_token"]).max()) == 0.0   # masked_embed = zeros

  def cubic(d, a=-0.75):   # Keys' kernel as a function of the distance
    d = abs(d)
    if d <= 1:
      return (a + 2) * d ** 3 - (a + 3) * d ** 2 + 1
    return a * d ** 3 - 5 * a * d ** 2 + 8 * a * d - 4 * a if d < 2 else 0.0

  for n_in, n_out in ((8, 4), (14, 6), (4, 4)):
    sf = (n_out + 0.1) / n_in
    want = np.zeros((n_out, n_in))
    for i in range(n_out):
      src = (i + 0.5) / sf - 0.5
      for j in range(math.floor(src) - 1, math.floor(src) + 3):
        want[i, min(max(j, 0), n_in - 1)] += cubic(src - j)
    np.testing.assert_allclose(vit.torch_bicubic_matrix(n_in, n_out, sf), want, atol=1e-12)
  table = jax.random.normal(jax.random.PRNGKey(8), (1, 65, 16))
  assert vit.interpolate_pos_embed(table, 8, 8, 8) is table
  out = vit.interpolate_pos_embed(table, 8, 4, 4)
  m = vit.torch_bicubic_matrix(8, 4, 4.1 / 8)
  np.testing.assert_allclose(out[0, 1:].reshape(4, 4, 16),
                             np.einsum("ij,jkd,lk->ild", m, np.asarray(table[0, 1:]).reshape(8, 8, 16), m),
                             rtol=1e-5, atol=1e-6)
  np.testing.assert_array_equal(out[0, 0], table[0, 0])


def test_official_initialisation(method, params_state):
  """iBOT's VisionTransformer / iBOTHead init: Linear weights N(0, .02) (trunc at +-2 absolute),
  biases 0, LayerNorm 1 / 0, cls token and position table N(0, .02), masked_embed 0, patch conv
  and weight-normalised v PyTorch's default U(+-1/sqrt(fan_in)); decay on every >= 2-D leaf."""
  params, _ = params_state
  enc, head = params["encoder"], params["head"]
  kernels = np.concatenate([np.ravel(enc["encoder"][f"block{i:02d}"]["mlp"]["fc1"]["kernel"]) for i in range(2)]
                           + [np.ravel(enc["encoder"]["block00"]["attn"]["qkv_kernel"]), np.ravel(head["fc0"]["kernel"])])
  assert abs(kernels.std() - 0.02) < 0.001 and abs(kernels.mean()) < 0.001
  for leaf in (enc["encoder"]["block00"]["attn"]["qkv_bias"], enc["encoder"]["norm"]["bias"], head["fc1"]["bias"]):
    assert float(jnp.abs(leaf).max()) == 0.0
  np.testing.assert_array_equal(enc["encoder"]["norm"]["scale"], 1.0)
  for leaf in (enc["cls_token"], enc["pos_embed"]):
    assert 0.01 < float(jnp.std(leaf)) < 0.03
  bound = 1 / math.sqrt(4 * 4 * 3)
  pe = enc["patch_embed"]["proj"]
  assert float(jnp.abs(pe["kernel"]).max()) <= bound and float(jnp.std(pe["kernel"])) > 0.8 * bound / math.sqrt(3)
  assert float(jnp.abs(pe["bias"]).max()) <= bound and float(jnp.abs(pe["bias"]).max()) > 0
  v = head["last_layer"]["kernel_v"]
  assert float(jnp.abs(v).max()) <= 1 / math.sqrt(16)
  np.testing.assert_array_equal(head["last_layer"]["kernel_g"], 1.0)
  decay = method.decay_mask(params)
  assert decay["head"]["last_layer"]["kernel_g"] and decay["encoder"]["mask_token"] and decay["encoder"]["pos_embed"]
  assert not decay["head"]["fc0"]["bias"]


# ---------------------------------------------------------------------------------------------
# Views against PIL.

def levels(seed, n=4, h=13, w=17):
  return np.random.RandomState(seed).randint(0, 256, (n, h, w, 3)).astype(np.uint8)


def test_hue_blur_grey_and_solarize_equal_pil():
  x = levels(0)
  xf = jnp.asarray(x, jnp.float32)
  factors = np.asarray([0.1, -0.1, 0.037, -0.061], np.float32)
  got = np.asarray(jax.jit(views.adjust_hue)(xf, jnp.asarray(factors)))
  radii = np.asarray([0.1, 0.7, 1.3, 2.0], np.float32)
  blur = np.asarray(jax.jit(views.gaussian_blur)(xf, jnp.asarray(radii)))
  grey = np.asarray(jax.jit(views.grayscale)(xf))
  for i in range(len(x)):
    img = Image.fromarray(x[i])
    h, s, v = img.convert("HSV").split()      # torchvision F_pil.adjust_hue
    nh = ((np.asarray(h, np.int64) + int(np.trunc(factors[i] * 255)) % 256) % 256).astype(np.uint8)
    want = np.asarray(Image.merge("HSV", (Image.fromarray(nh, "L"), s, v)).convert("RGB"))
    np.testing.assert_array_equal(got[i], want)
    np.testing.assert_array_equal(blur[i], np.asarray(img.filter(ImageFilter.GaussianBlur(float(radii[i])))))
    np.testing.assert_array_equal(grey[i], np.asarray(img.convert("L").convert("RGB")))
  sol = np.asarray(views.finetune_aug.solarize(xf, jnp.full((4,), 128.0)))
  np.testing.assert_array_equal(sol[0], np.asarray(ImageOps.solarize(Image.fromarray(x[0]))))


def test_color_jitter_applies_pils_ops_in_the_drawn_order():
  """Under jit, where XLA would fuse PIL's rounded product and sum into one multiply-add."""
  x = levels(1, n=8)
  rs = np.random.RandomState(2)
  order = np.stack([rs.permutation(4) for _ in range(8)])
  order[:2] = [[3, 0, 2, 1], [1, 2, 3, 0]]
  factors = np.stack([rs.uniform(0.6, 1.4, 8), rs.uniform(0.6, 1.4, 8), rs.uniform(0.8, 1.2, 8),
                      rs.uniform(-0.1, 0.1, 8)], axis=1).astype(np.float32)
  factors[1] = [0.65, 1.35, 0.85, -0.09]      # contrast 1.35 at a level where an FMA rounds down
  got = np.asarray(jax.jit(views.color_jitter_ops)(jnp.asarray(x, jnp.float32), jnp.asarray(order),
                                                  jnp.asarray(factors)))
  for i in range(len(x)):
    img = Image.fromarray(x[i])
    for op in order[i]:
      f = float(factors[i, op])
      if op == 0:
        img = ImageEnhance.Brightness(img).enhance(f)
      elif op == 1:
        img = ImageEnhance.Contrast(img).enhance(f)
      elif op == 2:
        img = ImageEnhance.Color(img).enhance(f)
      else:
        h, s, v = img.convert("HSV").split()
        nh = ((np.asarray(h, np.int64) + int(np.trunc(f * 255)) % 256) % 256).astype(np.uint8)
        img = Image.merge("HSV", (Image.fromarray(nh, "L"), s, v)).convert("RGB")
    np.testing.assert_array_equal(got[i], np.asarray(img))


def test_multi_crop_shapes_and_per_view_options():
  x = jnp.asarray(levels(2, n=3, h=32, w=32))
  out = jax.jit(lambda k, x: views.multi_crop(
      k, x, global_size=32, local_size=16, num_global=2, num_local=3, blur_probs=(1.0, 0.0, 0.0),
      solarize_prob=1.0, jitter_prob=0.0, gray_prob=0.0, mean=(0.0, 0.0, 0.0),
      std=(1.0, 1.0, 1.0)))(jax.random.PRNGKey(0), x)
  assert out["global"].shape == (3, 2, 32, 32, 3) and out["local"].shape == (3, 3, 16, 16, 3)
  g = np.asarray(out["global"]) * 255.0
  np.testing.assert_allclose(g, np.round(g), atol=1e-3)        # 8-bit levels
  # Only the second global view is solarised: no level >= 128 survives there.
  assert g[:, 1].max() < 128 and g[:, 0].max() >= 128


# ---------------------------------------------------------------------------------------------
# Configs and training.

@pytest.mark.parametrize("preset", ["", "cifar10", "imagenet"])
def test_presets_build(preset):
  c = load_config("ibot", preset)
  assert methods.get(c).name == "ibot" and c.input.batch_size % 8 == 0


def test_imagenet_preset_is_the_official_vit_s_recipe():
  c = load_config("ibot", "imagenet")
  i = c.ibot
  assert (c.model.variant, c.model.patch_size, c.input.image_size, c.model.drop_path) == ("small", 16, 224, 0.1)
  assert (i.out_dim, i.shared_head, i.norm_last_layer, i.momentum_teacher) == (8192, True, False, 0.996)
  temps = (i.warmup_teacher_temp, i.teacher_temp, i.warmup_teacher_patch_temp, i.teacher_patch_temp)
  assert temps == (0.04, 0.07, 0.04, 0.07) and i.warmup_teacher_temp_epochs == 30
  assert (tuple(i.pred_ratio), tuple(i.pred_ratio_var)) == ((0.0, 0.3), (0.0, 0.2))
  assert (i.clip_grad, i.freeze_last_layer, i.student_temp, i.center_momentum) == (3.0, 1.0, 0.1, 0.9)
  v = i.views
  assert (v.num_local, v.local_size, tuple(v.global_scale), tuple(v.local_scale)) == (10, 96, (0.25, 1.0), (0.05, 0.25))
  assert (c.input.batch_size, c.total_epochs, c.optim.base_lr, c.optim.warmup_epochs) == (1024, 800, 5e-4, 10)
  wd = (c.optim.weight_decay, c.optim.weight_decay_schedule, c.optim.weight_decay_end)
  assert wd == (0.04, "cosine", 0.4)


def read_losses(workdir):
  import json
  with open(os.path.join(workdir, "metrics.jsonl")) as f:
    return {r["step"]: r for r in map(json.loads, f) if "loss" in r}


def test_frozen_last_layer_is_untouched_then_trained_from_fresh_adam_state():
  """cancel_gradients_last_layer: PyTorch's AdamW skips the grad-None last layer, so it is not
  weight-decayed while frozen (kernel_g is a 2-D decayed parameter when norm_last_layer=False)
  and thaws with its own step count; the rest of the head moves from the first step."""
  c = small_config(total_steps=3)
  c.ibot.views.num_local = 0
  c.ibot.norm_last_layer = False
  c.optim.update(warmup_epochs=0.0, base_lr=2e-3, weight_decay=0.04,
                 weight_decay_schedule="constant")
  tr = train.Trainer.create(c, devices=jax.devices()[:1])
  c.ibot.freeze_last_layer = 2.0 / tr.steps_per_epoch         # two steps
  tr = train.Trainer.create(c, devices=jax.devices()[:1])
  assert tr.method.freeze_steps() == 2
  head0 = jax.device_get(tr.state["params"]["head"])
  for _ in range(2):
    tr.step()
  head2 = jax.device_get(tr.state["params"]["head"])
  frozen = [n for n in head0 if n.startswith("last_layer")]
  assert "last_layer" in frozen and set(head0["last_layer"]) == {"kernel_v", "kernel_g"}
  for name in frozen:
    for k in head0[name]:
      np.testing.assert_array_equal(head2[name][k], head0[name][k])
  assert not np.array_equal(head2["fc0"]["kernel"], head0["fc0"]["kernel"])
  lr = float(tr.step()["lr"])
  head3 = jax.device_get(tr.state["params"]["head"])
  v0, v3 = head0["last_layer"]["kernel_v"], head3["last_layer"]["kernel_v"]
  assert not np.array_equal(v3, v0)
  # A first AdamW step moves each element by lr (|m / sqrt(v)| = 1) plus the decoupled decay.
  step = np.abs(v3 - v0 * (1 - lr * 0.04))
  moved = step > 0.5 * lr
  assert moved.mean() > 0.9
  np.testing.assert_allclose(step[moved], lr, rtol=5e-3)


def train_config():
  c = small_config(total_steps=8, ckpt_every=4)
  c.optim.update(warmup_epochs=0.0, base_lr=2e-3)
  c.ibot.freeze_last_layer = 0.0
  c.ibot.views.num_local = 0          # compile time; local views are covered above
  c.evals = {}
  return c


@pytest.fixture(scope="module")
def uninterrupted(tmp_path_factory):
  workdir = str(tmp_path_factory.mktemp("ibot_a"))
  train.train_and_evaluate(train_config(), workdir, progress=False)
  return workdir, read_losses(workdir)


def test_a_few_steps_lower_the_loss(uninterrupted):
  la = uninterrupted[1]
  ls = [la[s]["loss"] for s in range(1, 9)]
  assert np.mean(ls[-3:]) < np.mean(ls[:3]) - 0.05, ls
  assert all(0 < la[s]["aux/teacher_entropy_cls"] <= math.log(48) + 1e-4 for s in range(1, 9))


def test_resumed_run_equals_uninterrupted(tmp_path, uninterrupted):
  """A run resumed from the uninterrupted run's step-4 checkpoint (parameters, optimiser, the
  teacher and both centres in the method state, the data position) repeats steps 5-8 exactly."""
  a, la = uninterrupted
  b = str(tmp_path / "b")
  shutil.copytree(a, b)
  assert sorted(os.listdir(os.path.join(b, "checkpoints")), key=str) == ["4", "8"]
  shutil.rmtree(os.path.join(b, "checkpoints", "8"))
  os.remove(os.path.join(b, "metrics.jsonl"))
  train.train_and_evaluate(train_config(), b, progress=False)
  lb = read_losses(b)
  assert sorted(lb) == [5, 6, 7, 8]
  for s in range(5, 9):
    assert la[s]["loss"] == lb[s]["loss"], s
    assert la[s]["aux/momentum"] == lb[s]["aux/momentum"], s
    assert la[s]["aux/teacher_entropy_patch"] == lb[s]["aux/teacher_entropy_patch"], s
