"""ExtreMA: the loss against a hand computation, the class-attention encoder against its
definition, the masks, the shared teacher pass, the EMA schedule, the colour views, resume and
learning on the embedded data."""
import functools
import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from helpers import load_config, tiny_config
from mim_jax import methods, optim, train
from mim_jax.methods import extrema

M, B = 3, 2          # masks per image, images


def small_config(**kw):
  c = tiny_config("extrema")
  c.model.depth = 1
  c.extrema.update(mlp_dim=32, proj_dim=16, num_masks=M, mask_ratio=0.8)
  c.extrema.update(kw)
  c.evals = {}
  return c


@functools.lru_cache(maxsize=None)
def arrays():
  m = methods.get(small_config())
  k1, k2, k3, k4 = jax.random.split(jax.random.PRNGKey(0), 4)
  views = {"student": jax.random.normal(k1, (B, 32, 32, 3)),
           "teacher": jax.random.normal(k4, (B, 32, 32, 3))}
  params = jax.jit(m.init)(k2, views["student"])

  @jax.jit
  def perturb(tree):
    # A teacher unlike the student, so mixing them up cannot go unnoticed.
    keys = jax.random.split(k3, len(jax.tree.leaves(tree)))
    return jax.tree.unflatten(jax.tree.structure(tree), [
        p + 0.05 * jax.random.normal(k, p.shape) for p, k in zip(jax.tree.leaves(tree), keys)])

  teacher = perturb({"encoder": params["encoder"], "projector": params["projector"]})
  return m, views, params, {"teacher": teacher}


@functools.lru_cache(maxsize=None)
def encoder_fn():
  """The encoder with its block outputs, jitted once (per keep-ids shape)."""
  enc = arrays()[0].encoder
  return jax.jit(lambda p, x, ids: enc.apply({"params": p}, x, keep_ids=ids, mutable=["intermediates"]))


@functools.lru_cache(maxsize=None)
def loss_and_grads():
  """Loss, metrics and gradients (params and state) at the fixed masks, from one jitted
  value_and_grad, and the shapes of the images every teacher pass received while tracing."""
  m, views, params, state = arrays()
  calls = []
  embed = m.teacher_embed

  def counting(teacher, images):
    calls.append(tuple(images.shape))
    return embed(teacher, images)

  m.teacher_embed = counting
  try:
    fn = jax.jit(jax.value_and_grad(lambda p, s, ids: m.loss_with_keep_ids(p, s, views, ids),
                                    argnums=(0, 1), has_aux=True))
    (loss, aux), grads = fn(params, state, jnp.asarray(fixed_keep_ids()))
  finally:
    del m.teacher_embed
  return float(loss), jax.device_get(aux), grads, calls


def fixed_keep_ids():
  """[M, B, 12] kept patches of the 64: image 0's masks disjoint, image 1's overlapping."""
  ids = np.zeros((M, B, 12), np.int32)
  for i in range(M):
    ids[i, 0] = np.arange(12) + 12 * i
    ids[i, 1] = (np.arange(12) * 5 + 7 * i) % 64
  return ids


# -- numpy reference, written from the official definitions (builder.py, vits.py) ------------

def np_gelu(x):
  return 0.5 * x * (1.0 + np.vectorize(math.erf)(x / math.sqrt(2.0)))


def np_ln(x, p, eps):
  mu = x.mean(-1, keepdims=True)
  var = x.var(-1, keepdims=True)
  return (x - mu) / np.sqrt(var + eps) * np.asarray(p["scale"], np.float64) + np.asarray(p["bias"], np.float64)


def np_dense(x, p):
  return x @ np.asarray(p["kernel"], np.float64) + np.asarray(p["bias"], np.float64)


def np_bn(x, p, eps=1e-5):
  """BatchNorm1d in training mode over the rows of x [N, C] (biased variance)."""
  mu = x.mean(0)
  var = x.var(0)
  return (x - mu) / np.sqrt(var + eps) * np.asarray(p["scale"], np.float64) + np.asarray(p["bias"], np.float64)


def np_mlp(x, p, layers, norm="layernorm"):
  """_build_proj / _build_pred: Linear, then (LayerNorm eps 1e-5, GELU, Linear) repeated;
  norm='batchnorm' (the control) normalises each feature over the rows instead."""
  for i in range(layers):
    x = np_dense(x, p[f"linear{i}"])
    if i < layers - 1:
      x = np_gelu(np_bn(x, p[f"norm{i}"]) if norm == "batchnorm" else np_ln(x, p[f"norm{i}"], 1e-5))
  return x


def np_normalize(x):
  return x / np.maximum(np.linalg.norm(x, axis=-1, keepdims=True), 1e-12)


def np_class_attention_top(x, p, heads):
  """vits.py after the plain blocks: Block_CA x L from cls = cls_token, then the final norm."""
  b, n, d = x.shape
  hd = d // heads
  cls = np.broadcast_to(np.asarray(p["cls_token"], np.float64), (b, 1, d))
  i = 0
  while f"ca_block{i:02d}" in p:
    blk = p[f"ca_block{i:02d}"]
    u = np_ln(np.concatenate([cls, x], 1), blk["norm1"], 1e-6)
    a = blk["attn"]
    q = np_dense(u[:, :1], a["q"]).reshape(b, 1, heads, hd).transpose(0, 2, 1, 3) * hd ** -0.5
    k = np_dense(u, a["k"]).reshape(b, n + 1, heads, hd).transpose(0, 2, 1, 3)
    v = np_dense(u, a["v"]).reshape(b, n + 1, heads, hd).transpose(0, 2, 1, 3)
    logits = q @ k.transpose(0, 1, 3, 2)
    w = np.exp(logits - logits.max(-1, keepdims=True))
    w = w / w.sum(-1, keepdims=True)
    y = np_dense((w @ v).transpose(0, 2, 1, 3).reshape(b, 1, d), a["proj"])
    cls = cls + np.asarray(blk["gamma_1"], np.float64) * y
    h = np_ln(cls, blk["norm2"], 1e-6)
    h = np_dense(np_gelu(np_dense(h, blk["mlp"]["fc1"])), blk["mlp"]["fc2"])
    cls = cls + np.asarray(blk["gamma_2"], np.float64) * h
    i += 1
  assert i == 2
  return np_ln(np.concatenate([cls, x], 1), p["norm"], 1e-6)


def to64(tree):
  return jax.tree.map(lambda a: np.asarray(a, np.float64), tree)


def hand_loss(m, views, params, state, keep_ids):
  # Student: each mask on its own (2-D keep ids), the cls token through projector + predictor.
  qs = []
  for i in range(M):
    tokens = np.asarray(encoder_fn()(params["encoder"], views["student"], jnp.asarray(keep_ids[i]))[0],
                        np.float64)
    assert tokens.shape == (B, 1 + 12, 64)
    p = to64(params)
    qs.append(np_mlp(np_mlp(tokens[:, 0], p["projector"], 3), p["predictor"], 2))
  t = to64(state["teacher"])
  tokens = np.asarray(encoder_fn()(state["teacher"]["encoder"], views["teacher"], None)[0], np.float64)
  k = np_normalize(np_mlp(tokens[:, 0], t["projector"], 3))
  # byol_loss per mask (batch mean of ||q^ - k^||^2), averaged over the masks.
  return np.mean([np.mean(np.sum((np_normalize(q) - k) ** 2, -1)) for q in qs])


def test_loss_equals_hand_computation():
  m, views, params, state = arrays()
  loss, aux, _, _ = loss_and_grads()
  want = hand_loss(m, views, params, state, fixed_keep_ids())
  np.testing.assert_allclose(loss, want, rtol=1e-5)
  assert float(aux["cosine"]) == pytest.approx(1 - want / 2, rel=1e-5)
  # The student and teacher views are not interchangeable (the loss is not symmetrised).
  swapped = {"student": views["teacher"], "teacher": views["student"]}
  assert abs(hand_loss(m, swapped, params, state, fixed_keep_ids()) - want) > 1e-4


def test_batchnorm_head_control_normalises_over_all_masked_copies():
  """head_norm='batchnorm' (not official): the student's heads normalise over all M x B masked
  copies of one step at once, the teacher's over its B images, with batch statistics."""
  m = methods.get(small_config(head_norm="batchnorm"))
  _, views, _, _ = arrays()
  params = jax.jit(m.init)(jax.random.PRNGKey(5), views["student"])
  assert set(params["projector"]["norm0"]) == {"scale", "bias"}
  params = jax.tree.map(lambda a: a + 0.1 * jnp.cos(jnp.arange(a.size).reshape(a.shape)), params)
  state = {"teacher": {"encoder": params["encoder"], "projector": params["projector"]}}
  ids = fixed_keep_ids()
  loss, _ = jax.jit(lambda p, s, i: m.loss_with_keep_ids(p, s, views, i))(params, state, jnp.asarray(ids))
  p = to64(params)
  cls = np.concatenate([np.asarray(encoder_fn()(params["encoder"], views["student"],
                                                jnp.asarray(ids[i]))[0], np.float64)[:, 0]
                        for i in range(M)])                   # [M * B, D], mask-major
  q = np_mlp(np_mlp(cls, p["projector"], 3, "batchnorm"), p["predictor"], 2, "batchnorm")
  tok = np.asarray(encoder_fn()(params["encoder"], views["teacher"], None)[0], np.float64)[:, 0]
  k = np_normalize(np_mlp(tok, p["projector"], 3, "batchnorm"))
  want = np.mean(np.sum((np_normalize(q).reshape(M, B, -1) - k) ** 2, -1))
  np.testing.assert_allclose(float(loss), want, rtol=1e-5)
  # per-mask statistics would give another loss, so the test tells the two apart
  q_per_mask = np.concatenate([np_mlp(np_mlp(c, p["projector"], 3, "batchnorm"), p["predictor"], 2,
                                      "batchnorm") for c in np.split(cls, M)])
  other = np.mean(np.sum((np_normalize(q_per_mask).reshape(M, B, -1) - k) ** 2, -1))
  assert abs(other - want) > 1e-3
  with pytest.raises(ValueError, match="head_norm"):
    methods.get(small_config(head_norm="groupnorm"))


def test_encoder_is_vits_class_attention_model():
  m, views, params, _ = arrays()
  p = params["encoder"]
  tokens, inter = encoder_fn()(p, views["student"], None)
  blocks = inter["intermediates"]["encoder"]["block_outputs"]
  assert len(blocks) == 1 and blocks[-1].shape == (B, 64, 64)     # no cls token in the blocks
  want = np_class_attention_top(np.asarray(blocks[-1], np.float64), to64(p), heads=2)
  np.testing.assert_allclose(np.asarray(tokens), want, rtol=1e-4, atol=1e-5)
  # The cls token enters only through the class attention; layer scale starts at 0.1.
  np.testing.assert_array_equal(p["ca_block01"]["gamma_2"], np.full(64, 0.1, np.float32))
  assert "pos_embed" not in p and "norm" not in p["encoder"]
  # Weight decay: kernels yes; cls token, biases, norms and gammas no.
  mask = m.decay_mask(params)
  assert mask["encoder"]["encoder"]["block00"]["attn"]["qkv_kernel"]
  assert mask["predictor"]["linear1"]["kernel"] and mask["projector"]["linear0"]["kernel"]
  assert not mask["encoder"]["cls_token"] and not mask["encoder"]["ca_block00"]["gamma_1"]
  assert not mask["projector"]["norm0"]["scale"]


@pytest.mark.parametrize("disjoint", [True, False])
def test_masks_keep_exactly_v_tokens_and_differ(disjoint):
  ids = np.asarray(extrema.sample_keep_ids(jax.random.PRNGKey(3), 4, 196, 0.8, 5, disjoint))
  assert ids.shape == (5, 4, 39)                       # int(196 * 0.2) tokens per mask
  for b in range(4):
    for i in range(5):
      assert len(set(ids[i, b])) == 39 and ids[i, b].min() >= 0 and ids[i, b].max() < 196
    sets = [frozenset(ids[i, b]) for i in range(5)]
    assert len(set(sets)) == 5                         # the masks of one image differ
    if disjoint:
      assert len(frozenset().union(*sets)) == 5 * 39   # and share no token
  assert extrema.sample_keep_ids(jax.random.PRNGKey(0), 1, 196, 0.9, 8).shape == (8, 1, 19)
  with pytest.raises(ValueError, match="disjoint"):
    extrema.sample_keep_ids(jax.random.PRNGKey(0), 1, 64, 0.8, 6)


def test_student_sees_v_tokens_per_mask_and_teacher_runs_once():
  m, views, params, state = arrays()
  ids = jnp.asarray(fixed_keep_ids())
  # The M masked copies go through the student as one mask-major batch of 12-token sequences.
  tokens, inter = encoder_fn()(params["encoder"], views["student"], ids)
  assert tokens.shape == (M * B, 13, 64)
  assert inter["intermediates"]["encoder"]["block_outputs"][0].shape == (M * B, 12, 64)
  one = encoder_fn()(params["encoder"], views["student"], ids[1])[0]
  np.testing.assert_allclose(tokens[B:2 * B], one, rtol=1e-5, atol=1e-6)
  # The teacher ran once in the loss, on the B whole teacher views: its one output per image is
  # the target of every mask (the hand computation above uses that single k for all M masks).
  assert loss_and_grads()[3] == [(B, 32, 32, 3)]
  q = np.asarray(jax.random.normal(jax.random.PRNGKey(0), (M, B, 16)))
  k = np.asarray(jax.random.normal(jax.random.PRNGKey(1), (B, 16)))
  per_mask = [np.mean(np.sum((np_normalize(q[i]) - np_normalize(k)) ** 2, -1)) for i in range(M)]
  assert float(extrema.byol_loss(q, k)) == pytest.approx(np.mean(per_mask), rel=1e-6)


def test_teacher_gets_no_gradient():
  _, _, (g_params, g_state), _ = loss_and_grads()
  assert all(float(jnp.abs(g).max()) == 0.0 for g in jax.tree.leaves(g_state))
  for part in ("encoder", "projector", "predictor"):
    assert float(optax_norm(g_params[part])) > 0, part


def optax_norm(tree):
  return jnp.sqrt(sum(jnp.sum(jnp.square(x)) for x in jax.tree.leaves(tree)))


def test_ema_follows_the_official_cosine_schedule():
  m, _, params, state = arrays()
  total = m.run_steps()[1]
  for t in (0, total // 3, total):
    official = 1 - 0.5 * (1 + math.cos(math.pi * t / total)) * (1 - 0.99)   # adjust_ema_momentum
    assert float(m.momentum(t)) == pytest.approx(official, abs=1e-7)
  new = m.update_state(params, state, jnp.asarray(4), None)
  mom = 1 - 0.5 * (1 + math.cos(math.pi * 5 / total)) * (1 - 0.99)           # m(step + 1)
  online = {"encoder": params["encoder"], "projector": params["projector"]}
  jax.tree.map(lambda n, t, o: np.testing.assert_allclose(n, mom * t + (1 - mom) * o, rtol=1e-5, atol=1e-7),
               new["teacher"], state["teacher"], online)
  assert set(new["teacher"]) == {"encoder", "projector"}      # no predictor in the teacher


def test_views_share_the_crop_and_differ_in_colour():
  c = small_config(jitter_prob=0.0, gray_prob=1.0)
  m = methods.get(c)
  images = jax.random.randint(jax.random.PRNGKey(0), (8, 40, 40, 3), 0, 256).astype(jnp.uint8)
  v = jax.jit(lambda r, x: m.preprocess(r, x, c.input, True))(jax.random.PRNGKey(1), images)
  assert v["student"].shape == (8, 32, 32, 3)
  # Always grey: both views are the grey image of one shared crop (and colourless).
  np.testing.assert_allclose(v["student"], v["teacher"], atol=1e-6)
  raw = v["student"] * jnp.asarray(c.input.std) + jnp.asarray(c.input.mean)
  np.testing.assert_allclose(raw[..., 0], raw[..., 1], atol=1e-5)
  # Grey with p = 0.5, drawn per view: some images get a grey and a colour view of that crop.
  c.extrema.gray_prob = 0.5
  v = jax.jit(lambda r, x: m.preprocess(r, x, c.input, True))(jax.random.PRNGKey(1), images)
  differ = np.abs(np.asarray(v["student"] - v["teacher"])).reshape(8, -1).max(1) > 1e-3
  assert 0 < differ.sum() < 8, differ


def test_imagenet_preset_is_the_official_recipe():
  c = load_config("extrema", "imagenet")
  e = c.extrema
  assert (e.mask_ratio, e.num_masks, e.disjoint, e.ema_momentum) == (0.8, 5, True, 0.996)
  assert (e.proj_dim, e.mlp_dim, e.class_attention_layers, e.layer_scale_init_value) == (256, 4096, 2, 0.1)
  assert (e.jitter_prob, tuple(e.jitter), e.gray_prob, e.color_aug) == (0.8, (0.4, 0.4, 0.2, 0.1), 0.2, True)
  assert (c.model.variant, c.model.patch_size, c.input.image_size, c.model.drop_path) == ("base", 16, 224, 0.1)
  assert (c.optim.b1, c.optim.b2, c.optim.weight_decay, c.optim.warmup_epochs, c.total_epochs) == (0.9, 0.95, 0.1, 40, 300)
  assert optim.peak_lr(c.optim, c.input.batch_size) == pytest.approx(1.5e-4 * 2048 / 256)
  assert tuple(c.input.aug.crop_scale) == (0.2, 1.0) and c.pooling == "cls"
  assert methods.get(c).num_kept == 39


def test_training_moves_the_teacher_by_ema_only_and_learns():
  """(Its exact resume is tests/test_contract.py's.)"""
  c = small_config()
  c.extrema.color_aug = False          # the colour views have their own test
  c.input.batch_size = 8
  c.total_steps, c.ckpt_every, c.log_every = 4, 2, 1
  c.optim.update(base_lr=3e-3, lr_batch_divisor=c.input.batch_size, warmup_epochs=0.0)
  one = jax.devices()[:1]

  tr = train.Trainer.create(c, devices=one)
  before = jax.device_get(tr.state)
  la = {1: float(tr.step()["loss"])}
  after = jax.device_get(tr.state)
  online0 = {"encoder": before["params"]["encoder"], "projector": before["params"]["projector"]}
  jax.tree.map(np.testing.assert_array_equal, before["method_state"]["teacher"], online0)
  mom = float(tr.method.momentum(1))
  online1 = {"encoder": after["params"]["encoder"], "projector": after["params"]["projector"]}
  jax.tree.map(lambda t, t0, o: np.testing.assert_allclose(t, mom * t0 + (1 - mom) * o, rtol=1e-5, atol=1e-7),
               after["method_state"]["teacher"], before["method_state"]["teacher"], online1)
  for s in range(2, 5):
    la[s] = float(tr.step()["loss"])

  # A few steps on the embedded data lower the loss (the teacher moves slowly meanwhile).
  assert la[4] < 0.8 * la[1], la
