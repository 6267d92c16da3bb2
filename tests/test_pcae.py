"""PCAE: the teacher's token ranking, the loss against a numpy re-implementation, the momentum
teacher, the FLOP count, training and exact resume."""
import importlib.util
import math
import os

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from helpers import load_config, losses, tiny_config
from mim_jax import methods, train
from mim_jax.methods import pcae

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def small_config(**pcae_overrides):
  """A 16 px image of 16 patches: 8 visible, 8 masked -> 4 -> 2 teacher tokens."""
  c = tiny_config("pcae")
  c.input.image_size = 16
  c.pcae.mask_ratio = 0.5
  c.pcae.drop_schedule = ((0, 0.5), (1, 0.5))
  c.pcae.decoder = dict(width=32, depth=1, heads=2, drop_path=0.0)
  for k, v in pcae_overrides.items():
    c.pcae[k] = v
  return c


@pytest.fixture(scope="module")
def small():
  """(method, images, params, state, jitted loss_with_ids) of `small_config`, built once."""
  m, images, params, state = setup(small_config())
  return m, images, params, state, jax.jit(m.loss_with_ids)


def setup(c, batch=2):
  m = methods.get(c)
  images = jax.random.normal(jax.random.PRNGKey(0), (batch, c.input.image_size, c.input.image_size, 3))
  params = jax.jit(m.init)(jax.random.PRNGKey(1), images)
  # A teacher that differs from the student, so the test sees which one is used where.
  teacher = jax.tree.map(lambda p: p + 0.05 * jnp.cos(jnp.arange(p.size, dtype=jnp.float32)
                                                       ).reshape(p.shape), params["encoder"])
  return m, images, params, {"teacher": teacher}


# -- the ranking ------------------------------------------------------------------------------

def test_tokens_like_the_mean_are_dropped_first_distinct_ones_kept_in_order():
  e1, e2, e3 = np.eye(4)[:3]
  x = np.stack([e1, e2, 3 * e1, e1, e3, (e1 + e2) / np.sqrt(2)])[None].astype(np.float32)
  ids = np.array([[10, 11, 12, 13, 14, 15]])
  # Mean of the unit tokens: (3 e1 + e2 + e3 + (e1 + e2)/sqrt 2) / 6. Cosines with it, by
  # hand: e3 (14) lowest, then e2 (11), then the three e1 tokens (10, 12, 13; equal, the
  # lower index first), (e1 + e2)/sqrt 2 (15) highest.
  kept, kept_ids = pcae.keep_distinctive(jnp.asarray(x), jnp.asarray(ids), 0.5)
  np.testing.assert_array_equal(kept_ids, [[14, 11, 10]])           # floor(6 * 0.5) = 3
  np.testing.assert_array_equal(kept, x[:, [4, 1, 0]])
  _, two = pcae.keep_distinctive(jnp.asarray(x), jnp.asarray(ids), 0.4)  # floor(2.4) = 2
  np.testing.assert_array_equal(two, [[14, 11]])
  _, five = pcae.keep_distinctive(jnp.asarray(x), jnp.asarray(ids), 0.99)
  np.testing.assert_array_equal(five, [[14, 11, 10, 12, 13]])      # the most typical one goes


def test_a_token_equal_to_the_raw_mean_is_dropped_first():
  a, b = np.array([1.0, 0.0, 0.0]), np.array([0.0, 1.0, 0.0])
  x = np.stack([a, 2 * b, (a + 2 * b) / 2, a + 0.3 * b])[None].astype(np.float32)
  # The raw mean of the four is (a + 2b)/2 + (a + 0.3 b - (a + 2b)/2)/4; token 2 is the
  # closest to it and must be the first to go, the outer a / 2b the last.
  _, ids = pcae.keep_distinctive(jnp.asarray(x), jnp.arange(4)[None], 0.75, center="raw")
  assert sorted(np.asarray(ids)[0].tolist()) == [0, 1, 3]
  s = np.asarray(pcae.similarity_to_mean(jnp.asarray(x), "raw"))[0]
  mean = x[0].mean(0)
  want = x[0] @ mean / np.linalg.norm(x[0], axis=1) / np.linalg.norm(mean)
  np.testing.assert_allclose(s, want, rtol=1e-6)


@pytest.mark.parametrize("keep", [0.5, 0.3, 1.0])
def test_ranking_equals_its_definition_on_random_tokens(keep):
  x = np.asarray(jax.random.normal(jax.random.PRNGKey(3), (3, 13, 8)))
  ids = np.stack([np.random.RandomState(i).permutation(40)[:13] for i in range(3)])
  kept, kept_ids = pcae.keep_distinctive(jnp.asarray(x), jnp.asarray(ids), keep)
  n = int(13 * keep)
  assert kept.shape == (3, n, 8)
  for b in range(3):
    u = x[b] / np.linalg.norm(x[b], axis=1, keepdims=True)
    order = np.argsort(u @ u.mean(0), kind="stable")[:n]
    np.testing.assert_array_equal(kept_ids[b], ids[b, order])
    np.testing.assert_allclose(kept[b], x[b, order])


def test_drop_cases_are_the_reproductions():
  s = lambda case: [b for b, _ in pcae.drop_schedule(12, case, 3, 0.5)]  # noqa: E731
  assert s(0) == [0, 4, 8] and s(1) == [3, 7, 11] and s(2) == [0, 5, 11] and s(3) == [0, 1, 2]
  assert pcae.drop_schedule(12, 0, 3, 0.5, ((2, 0.4), (9, 0.5))) == ((2, 0.4), (9, 0.5))
  assert pcae.token_counts(147, pcae.drop_schedule(12, 0, 3, 0.5)) == [73, 36, 18]
  with pytest.raises(ValueError, match="drop_case"):
    pcae.drop_schedule(12, 7, 3, 0.5)
  with pytest.raises(ValueError, match="outside"):
    pcae.drop_schedule(12, 0, 3, 0.5, ((12, 0.5),))


# -- the loss against numpy -------------------------------------------------------------------

def _ln(x, p, eps=1e-6):
  m = x.mean(-1, keepdims=True)
  v = ((x - m) ** 2).mean(-1, keepdims=True)
  return (x - m) / np.sqrt(v + eps) * np.asarray(p["scale"]) + np.asarray(p["bias"])


def _dense(x, p):
  return x @ np.asarray(p["kernel"], np.float64) + np.asarray(p["bias"], np.float64)


def _block(x, p, heads):
  b, n, d = x.shape
  y = _ln(x, p["norm1"])
  qkv = y @ np.asarray(p["attn"]["qkv_kernel"], np.float64) + np.asarray(p["attn"]["qkv_bias"])
  qkv = qkv.reshape(b, n, 3, heads, d // heads)
  q, k, v = qkv[:, :, 0], qkv[:, :, 1], qkv[:, :, 2]
  logits = np.einsum("bqhd,bkhd->bhqk", q, k) / math.sqrt(d // heads)
  att = np.exp(logits - logits.max(-1, keepdims=True))
  att /= att.sum(-1, keepdims=True)
  x = x + _dense(np.einsum("bhqk,bkhd->bqhd", att, v).reshape(b, n, d), p["attn"]["proj"])
  h = _dense(_ln(x, p["norm2"]), p["mlp"]["fc1"])
  h = 0.5 * h * (1 + np.vectorize(math.erf)(h / math.sqrt(2)))
  return x + _dense(h, p["mlp"]["fc2"])


def _sincos(d, g):
  def one(dim, pos):
    omega = 1.0 / 10000 ** (np.arange(dim // 2) / (dim / 2))
    out = np.outer(pos.reshape(-1), omega)
    return np.concatenate([np.sin(out), np.cos(out)], 1)
  gw, gh = np.meshgrid(np.arange(g), np.arange(g))
  return np.concatenate([one(d // 2, gw), one(d // 2, gh)], 1)        # [g*g, d], no cls row


def _embed(images, p, patch):
  b, h, w, c = images.shape
  x = images.reshape(b, h // patch, patch, w // patch, patch, c).transpose(0, 1, 3, 2, 4, 5)
  return _dense(x.reshape(b, -1, patch * patch * c), p["patch_embed"]["proj"])


def hand_loss(images, params, teacher, vis, masked, schedule, heads=2, dec_heads=2):
  images = np.asarray(images, np.float64)
  p, g = 4, images.shape[1] // 4
  width = params["encoder"]["cls_token"].shape[-1]
  pe = _sincos(width, g)
  rows = np.arange(images.shape[0])[:, None]
  # teacher: masked patches, no cls, drops after the scheduled blocks, final norm
  x = (_embed(images, teacher, p) + pe)[rows, masked]
  ids = masked.copy()
  blocks = sorted(k for k in teacher["encoder"] if k.startswith("block"))
  for i, name in enumerate(blocks):
    x = _block(x, teacher["encoder"][name], heads)
    if i in dict(schedule):
      u = x / np.linalg.norm(x, axis=-1, keepdims=True)
      score = np.einsum("bd,bnd->bn", u.mean(1), u)
      order = np.argsort(score, axis=1, kind="stable")[:, :int(x.shape[1] * dict(schedule)[i])]
      x, ids = x[rows, order], ids[rows, order]
  t = _ln(x, teacher["encoder"]["norm"])
  t = (t - t.mean(-1, keepdims=True)) / np.sqrt(t.var(-1, ddof=1, keepdims=True) + 1e-6)
  # student: visible patches with cls
  e = params["encoder"]
  s = (_embed(images, e, p) + pe)[rows, vis]
  cls = np.broadcast_to(np.asarray(e["cls_token"], np.float64), (s.shape[0], 1, width))
  s = np.concatenate([cls, s], 1)
  for name in sorted(k for k in e["encoder"] if k.startswith("block")):
    s = _block(s, e["encoder"][name], heads)
  s = _ln(s, e["encoder"]["norm"])
  # decoder: embed, queries at the kept positions, sin-cos positions, blocks, norm, pred
  d = params["decoder"]
  y = _dense(s, d["embed"])
  dw = y.shape[-1]
  q = np.broadcast_to(np.asarray(d["mask_token"], np.float64), (y.shape[0], ids.shape[1], dw))
  y = np.concatenate([y, q], 1)
  dpe = _sincos(dw, g)
  pos = np.concatenate([np.zeros((y.shape[0], 1, dw)), dpe[np.concatenate([vis, ids], 1)]], 1)
  y = y + pos
  for name in sorted(k for k in d if k.startswith("block")):
    y = _block(y, d[name], dec_heads)
  pred = _dense(_ln(y, d["norm"]), d["pred"])[:, -ids.shape[1]:]
  cos = (pred * t).sum(-1) / (np.linalg.norm(pred, axis=-1) * np.linalg.norm(t, axis=-1))
  return 1.0 - cos.mean(), ids


def test_loss_equals_hand_computation(small):
  m, images, params, state, f = small
  vis = np.array([[0, 5, 2, 9, 14, 3, 7, 11], [15, 1, 4, 6, 8, 10, 12, 13]])
  masked = np.array([[1, 4, 6, 8, 10, 12, 13, 15], [0, 2, 3, 5, 7, 9, 11, 14]])
  loss, aux = f(params, state, images, jnp.asarray(vis), jnp.asarray(masked), jax.random.PRNGKey(5))
  want, ids = hand_loss(images, jax.device_get(params), jax.device_get(state["teacher"]), vis,
                        masked, ((0, 0.5), (1, 0.5)))
  np.testing.assert_allclose(float(loss), want, rtol=1e-4)
  assert aux["teacher_tokens"] == 2
  _, got_ids = jax.jit(m.teacher_forward)(state["teacher"], images, jnp.asarray(masked))
  np.testing.assert_array_equal(got_ids, ids)
  assert set(np.asarray(got_ids)[0]) <= set(masked[0])
  # The loss sees the teacher, the ranking, and the masks.
  swapped = f(params, {"teacher": params["encoder"]}, images, jnp.asarray(vis), jnp.asarray(masked),
               jax.random.PRNGKey(5))[0]
  other = f(params, state, images, jnp.asarray(masked), jnp.asarray(vis), jax.random.PRNGKey(5))[0]
  assert float(swapped) != float(loss) and float(other) != float(loss)


def test_masking_is_maes_split_into_student_and_teacher_patches(small):
  m = small[0]
  rng = jax.random.PRNGKey(4)
  vis, masked = m.split(rng, 2)
  shuffle = np.argsort(np.asarray(jax.random.uniform(rng, (2, 16))), axis=1)
  np.testing.assert_array_equal(vis, shuffle[:, :8])          # int(16 * (1 - 0.5)) visible
  np.testing.assert_array_equal(masked, shuffle[:, 8:])       # the rest, in shuffle order


# -- the momentum teacher ---------------------------------------------------------------------

def test_teacher_gets_no_gradient_and_moves_by_ema(small):
  m, images, params, state, f = small
  rng = jax.random.PRNGKey(2)
  loss, (g_params, g_state) = jax.jit(jax.value_and_grad(
      lambda p, s: m.loss(p, s, images, rng, 0)[0], argnums=(0, 1)))(params, state)
  # m.loss = loss_with_ids on the MAE split drawn from the first half of its rng
  mrng, rest = jax.random.split(rng)
  vis, masked = m.split(mrng, 2)
  np.testing.assert_allclose(float(loss), float(f(params, state, images, vis, masked, rest)[0]), rtol=1e-6)
  assert all(float(jnp.abs(g).max()) == 0 for g in jax.tree.leaves(g_state))
  assert float(jnp.abs(g_params["encoder"]["encoder"]["block00"]["attn"]["qkv_kernel"]).max()) > 0
  assert float(jnp.abs(g_params["decoder"]["mask_token"]).max()) > 0
  total = m.run_steps()[1]
  update = jax.jit(m.update_state)
  for step in (0, 3, total - 1):
    mom = 1 + (0.99 - 1) * (1 + math.cos(math.pi * step / total)) / 2   # DINO cosine_scheduler
    new = update(params, state, jnp.asarray(step))["teacher"]
    jax.tree.map(lambda n, t, o: np.testing.assert_allclose(n, mom * t + (1 - mom) * o, rtol=1e-6, atol=1e-7),
                 new, state["teacher"], params["encoder"])
  init = m.init_state(params)["teacher"]
  jax.tree.map(np.testing.assert_array_equal, init, params["encoder"])


def test_imagenet_preset_is_the_reproduction_recipe():
  c = load_config("pcae", "imagenet")
  p = c.pcae
  assert (p.mask_ratio, p.drop_case, p.drop_stage, p.keep_ratio, p.momentum) == (0.75, 0, 3, 0.5, 0.9999)
  assert dict(p.decoder) == dict(width=512, depth=8, heads=16, drop_path=0.25)
  assert (c.model.variant, c.model.patch_size, c.input.image_size, c.model.drop_path) == ("base", 16, 224, 0.25)
  assert (c.optim.b2, c.optim.base_lr, c.optim.warmup_epochs, c.total_epochs) == (0.95, 1.5e-4, 40, 400)
  m = methods.get(c)
  assert m.schedule == ((0, 0.5), (4, 0.5), (8, 0.5)) and m.counts == [73, 36, 18]


# -- compute ----------------------------------------------------------------------------------

def test_flop_count_equals_hand_value():
  spec = importlib.util.spec_from_file_location("pcae_compute", os.path.join(ROOT, "benchmarks", "pcae_compute.py"))
  mod = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(mod)
  # 16 patches of 4x4x3, width 8, depth 2, mask 0.75 (4 visible, 12 masked -> 6 -> 3), decoder
  # 4 wide, 1 block. A block on n tokens of width d: 24 n d^2 + 4 n^2 d.
  #   student: embed 2*16*48*8 = 12288; encoder 2 x (24*5*64 + 4*25*8) = 16960; decoder embed
  #            2*5*8*4 = 320; decoder block on 8 tokens 24*8*16 + 4*64*4 = 4096; pred 2*8*4*8 = 512
  #            -> 34176
  #   teacher: embed 12288; block on 12: 18432 + 4608; block on 6: 9216 + 1152 -> 45696
  #   MAE:     12288 + 16960 + 320 + decoder block on 17 (6528 + 4624) + pred 2*17*4*48 = 6528
  #            -> 47248
  f = mod.pcae_forward_flops(16, 4, 8, 2, 0.75, ((0, 0.5), (1, 0.5)), 4, 1)
  assert (f["student"], f["teacher"], f["kept"]) == (34176, 45696, 3)
  assert mod.mae_forward_flops(16, 4, 8, 2, 0.75, 4, 1) == 47248
  pair = mod.train_flops_pair(load_config("pcae", "imagenet"))
  assert pair["pcae"] < 0.85 * pair["mae"]
  # The timed pair differs only in the method; --embedded_data swaps ImageNet for the embedded set.
  pc, mc = mod.matched_configs("imagenet", batch=8, embedded=True)
  assert pc.input.data.name == mc.input.data.name == "embedded"
  assert pc.input.batch_size == mc.input.batch_size == 8 and pc.input.image_size == 224
  assert mc.model.to_dict() == pc.model.to_dict() and mc.mae.mask_ratio == pc.pcae.mask_ratio
  assert mod.matched_configs("imagenet")[1].input.data.name == "tfds"


# -- training ---------------------------------------------------------------------------------

def test_training_learns(tmp_path):
  """(Its exact resume is tests/test_contract.py's.)"""
  c = tiny_config("pcae", total_steps=6, ckpt_every=2)
  c.pcae.drop_stage = 2                       # blocks 0 and 1 of the 2-block test encoder
  c.pcae.decoder = dict(width=32, depth=1, heads=2, drop_path=0.0)
  c.evals = {}
  a = str(tmp_path / "a")
  train.train_and_evaluate(c, a, progress=False)
  la = losses(a)
  assert sorted(la) == [1, 2, 3, 4, 5, 6]
  assert la[6] < la[1], la
