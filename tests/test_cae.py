"""CAE: its exact-count block mask against the official generator, the loss and the regressor
block by hand, the stop-gradient alignment target, the teacher update, init, and runs on the
embedded data (learning, exact resume)."""
import math
import random

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from helpers import load_config, tiny_config, losses, train_with_frozen_run, resumed_losses, assert_same_losses
from mim_jax import masking, methods, optim, teachers, train
from mim_jax.methods import cae
from test_beit import REAL_LOAD, fake_run, numpy_ce, numpy_ids


@pytest.fixture
def fake(monkeypatch):
  run = fake_run()
  monkeypatch.setattr(teachers, "load", lambda path, *args, **kwargs: run)
  return run


def small_config(**kw):
  c = tiny_config("cae", **kw)
  c.model.depth = 1
  c.cae.tokenizer = "/fake"
  c.cae.decoder.update(regressor_depth=1, depth=1)
  return c


# ---------------------------------------------------------------------------------------------
# Masking.

def official_cae_mask(height, width, num, min_num=16, min_aspect=0.3):
  """lxtGH/CAE furnace/masking_generator.py MaskingGenerator.__call__, in numpy + random."""
  lo, hi = math.log(min_aspect), math.log(1 / min_aspect)
  mask = np.zeros((height, width), int)
  count = 0
  while count != num:
    limit = num - count
    delta = 0
    for _ in range(10):
      area = random.uniform(min_num, limit)
      aspect = math.exp(random.uniform(lo, hi))
      h, w = int(round(math.sqrt(area * aspect))), int(round(math.sqrt(area / aspect)))
      if w < width and h < height:
        top, left = random.randint(0, height - h), random.randint(0, width - w)
        new = h * w - mask[top:top + h, left:left + w].sum()
        if 0 < new <= limit:
          mask[top:top + h, left:left + w] = 1
          delta = new
      if delta > 0:
        break
    count += delta
  return mask.reshape(-1)


def isolated(masks, grid):
  """Mean number of masked patches with no masked 4-neighbour."""
  m = np.asarray(masks).reshape(-1, grid, grid)
  p = np.pad(m, ((0, 0), (1, 1), (1, 1)))
  nb = p[:, :-2, 1:-1] + p[:, 2:, 1:-1] + p[:, 1:-1, :-2] + p[:, 1:-1, 2:]
  return ((m == 1) & (nb == 0)).sum((1, 2)).mean()


def test_mask_count_is_exact_and_distributed_like_the_official_generator():
  n = 400
  ours = np.asarray(jax.jit(lambda r: masking.block_mask(r, n, 14, 14, 98, 16, exact=True))(jax.random.PRNGKey(0)))
  assert ours.shape == (n, 196) and np.all(ours.sum(1) == 98)
  random.seed(0)
  official = np.stack([official_cae_mask(14, 14, 98) for _ in range(n)])
  # CAE keeps placing rectangles until the count is exact, so few masked patches are isolated
  # (about 0.06 per mask); topping BEiT's mask up with random patches instead gives about 0.3.
  got, want = isolated(ours, 14), isolated(official, 14)
  assert abs(got - want) < 0.05, (got, want)
  np.testing.assert_allclose(ours.mean(0).reshape(14, 14), official.mean(0).reshape(14, 14), atol=0.12)
  # The guard against a never-ending loop still returns the exact count.
  info = masking.block_mask_trace(jax.random.PRNGKey(1), 8, 8, 32, 5, until_exact=True, max_rounds=1)
  capped = masking.fill_to_count(jax.random.PRNGKey(2), info.mask.reshape(1, 64), 32)
  assert int(info.mask.sum()) < 32 and np.all(np.asarray(capped).sum(1) == 32)


# ---------------------------------------------------------------------------------------------
# The loss and its pieces.

def fixed_mask(batch=2, num=32):
  rng = np.random.RandomState(1)
  mask = np.zeros((batch, 64), np.int32)
  for b in range(batch):
    mask[b, rng.permutation(64)[:num]] = 1
  return mask


def perturbed(tree, key, scale):
  leaves, tdef = jax.tree.flatten(tree)
  keys = jax.random.split(key, len(leaves))
  return jax.tree.unflatten(tdef, [x + scale * jax.random.normal(k, x.shape) for x, k in zip(leaves, keys)])


def test_loss_is_its_definition(fake, monkeypatch):
  m = methods.get(small_config())
  mask = fixed_mask()
  monkeypatch.setattr(m, "make_mask", lambda rng, b: jnp.asarray(mask))
  x = jax.random.normal(jax.random.PRNGKey(0), (2, 32, 32, 3))
  params = jax.jit(m.init)(jax.random.PRNGKey(1), x)
  state = {**m.init_state(params), **m.external_state()}
  state["teacher"] = perturbed(params["encoder"], jax.random.PRNGKey(2), 0.01)   # not the encoder
  loss, aux = jax.jit(m.loss)(params, state, x, jax.random.PRNGKey(3), 0)
  visible = np.stack([np.flatnonzero(r == 0) for r in mask])      # patch order
  masked = np.stack([np.flatnonzero(r == 1) for r in mask])

  @jax.jit
  def reference(params, teacher):
    latent = m.encoder.apply({"params": params["encoder"]}, x, keep_ids=jnp.asarray(visible))
    target = m.encoder.apply({"params": teacher}, x, keep_ids=jnp.asarray(masked))[:, 1:]
    logits, pred = m.neck.apply({"params": params["neck"]}, latent[:, 1:], jnp.asarray(visible),
                                jnp.asarray(masked))
    return logits, pred, target

  logits, pred, target = reference(params, state["teacher"])
  labels = np.take_along_axis(numpy_ids(fake, x), masked, axis=1)
  ce, acc = numpy_ce(logits, labels, np.ones(labels.shape))
  align = 2.0 * np.mean((np.asarray(pred, np.float64) - np.asarray(target, np.float64)) ** 2)
  np.testing.assert_allclose(float(aux["loss_main"]), ce, rtol=1e-5)
  np.testing.assert_allclose(float(aux["loss_align"]), align, rtol=1e-5)
  np.testing.assert_allclose(float(aux["mlm_acc"]), acc, rtol=1e-6)
  np.testing.assert_allclose(float(loss), ce + align, rtol=1e-5)


def layer_norm(x, p):
  x = np.asarray(x, np.float64)
  y = (x - x.mean(-1, keepdims=True)) / np.sqrt(x.var(-1, keepdims=True) + 1e-6)
  return y * np.asarray(p["scale"]) + np.asarray(p["bias"])


def test_regressor_block_is_its_definition():
  d, heads = 8, 2
  blk = cae.RegressorBlock(heads, init_values=0.1)
  k = jax.random.split(jax.random.PRNGKey(0), 5)
  xq, xkv = jax.random.normal(k[0], (2, 3, d)), jax.random.normal(k[1], (2, 7, d))
  pq, pkv = jax.random.normal(k[2], (2, 3, d)), jax.random.normal(k[3], (2, 7, d))
  p = perturbed(jax.jit(blk.init)(k[4], xq, xkv, pq, pkv)["params"], jax.random.PRNGKey(5), 0.3)
  got = jax.jit(blk.apply)({"params": p}, xq, xkv, pq, pkv)
  a = jax.tree.map(lambda t: np.asarray(t, np.float64), p)
  ca = a["cross_attn"]
  q = layer_norm(np.asarray(xq + pq), a["norm1_q"]) @ ca["q_kernel"] + ca["q_bias"]
  kk = layer_norm(np.asarray(xkv + pkv), a["norm1_k"]) @ ca["k_kernel"]          # no k bias
  v = layer_norm(np.asarray(xkv), a["norm1_v"]) @ ca["v_kernel"] + ca["v_bias"]
  split = lambda t: t.reshape(t.shape[0], t.shape[1], heads, d // heads).transpose(0, 2, 1, 3)  # noqa: E731
  logits = split(q) @ split(kk).transpose(0, 1, 3, 2) / math.sqrt(d // heads)
  w = np.exp(logits - logits.max(-1, keepdims=True))
  w /= w.sum(-1, keepdims=True)
  att = (w @ split(v)).transpose(0, 2, 1, 3).reshape(2, 3, d)
  att = att @ ca["proj"]["kernel"] + ca["proj"]["bias"]
  x = layer_norm(np.asarray(xq, np.float64) + a["gamma_1_cross"] * att, a["norm2_cross"])
  mlp = a["mlp_cross"]
  h = x @ mlp["fc1"]["kernel"] + mlp["fc1"]["bias"]
  h = 0.5 * h * (1 + np.vectorize(math.erf)(h / math.sqrt(2)))
  want = x + a["gamma_2_cross"] * (h @ mlp["fc2"]["kernel"] + mlp["fc2"]["bias"])
  np.testing.assert_allclose(np.asarray(got), want, rtol=1e-4, atol=1e-5)


def test_alignment_target_is_stop_gradient(fake, monkeypatch):
  """With the teacher equal to the encoder, letting the gradient reach the target branch
  (teacher = the differentiated encoder) changes nothing: the target is a constant."""
  m = methods.get(small_config())
  mask = fixed_mask()
  monkeypatch.setattr(m, "make_mask", lambda rng, b: jnp.asarray(mask))
  x = jax.random.normal(jax.random.PRNGKey(0), (2, 32, 32, 3))
  params = jax.jit(m.init)(jax.random.PRNGKey(1), x)
  state = {**m.init_state(params), **m.external_state()}
  rng = jax.random.PRNGKey(3)

  def through_target(p):
    return m.loss(p, {**state, "teacher": p["encoder"]}, x, rng, 0)[0]

  g_through = jax.jit(jax.grad(through_target))(params)
  g_const = jax.jit(jax.grad(lambda p: m.loss(p, state, x, rng, 0)[0]))(params)
  # Equal up to float reassociation; the target branch's own gradient would be of the order of
  # the alignment gradient itself (1e-3 here).
  jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-6), g_through, g_const)


@pytest.mark.parametrize("momentum", [0.0, 0.5])
def test_teacher_is_the_official_momentum_update(fake, momentum):
  c = small_config()
  c.cae.base_momentum = momentum
  m = methods.get(c)
  p0 = {"encoder": {"w": jnp.arange(6.0), "b": {"c": jnp.ones((2, 3))}}}   # any encoder tree
  p1 = {**p0, "encoder": perturbed(p0["encoder"], jax.random.PRNGKey(1), 1.0)}
  p2 = {**p0, "encoder": perturbed(p0["encoder"], jax.random.PRNGKey(2), 1.0)}
  s0 = m.init_state(p0)
  # momentum_update(m) runs in the forward of step t with the encoder of step t, before the
  # optimiser changes it: teacher_{t+1} = m teacher_t + (1 - m) encoder_t.
  s1 = m.update_state(p1, s0, 0)           # the step that ran with p0 produced p1
  s2 = m.update_state(p2, s1, 1)           # the step that ran with p1 produced p2
  e0, e1 = p0["encoder"], p1["encoder"]
  want1 = e0                                                      # teacher_0 = encoder_0
  want2 = jax.tree.map(lambda t, e: momentum * t + (1 - momentum) * e, want1, e1)
  close = lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-6, atol=1e-6)  # noqa: E731
  jax.tree.map(close, s1["teacher"], want1)
  jax.tree.map(close, s2["teacher"], want2)
  jax.tree.map(close, s2["last_encoder"], p2["encoder"])


def test_init_and_weight_decay_are_the_official_base_recipe(fake):
  m = methods.get(small_config())
  p = jax.jit(m.init)(jax.random.PRNGKey(0), jnp.zeros((2, 32, 32, 3)))
  enc, neck = p["encoder"], p["neck"]

  def within(arr, bound):
    a = np.abs(np.asarray(arr))
    assert 0.9 * bound < a.max() <= bound, (a.max(), bound)

  for arr in (enc["patch_embed"]["proj"]["kernel"], enc["cls_token"], neck["mask_token"]):
    within(arr, 0.02)                                             # trunc-normal .02 cut at std
  xavier = lambda fan_in, fan_out: math.sqrt(6 / (fan_in + fan_out))  # noqa: E731
  within(enc["encoder"]["block00"]["attn"]["qkv_kernel"], xavier(64, 192))   # not BEiT's rescale
  within(enc["encoder"]["block00"]["mlp"]["fc2"]["kernel"], xavier(256, 64))
  within(neck["regressor00"]["cross_attn"]["q_kernel"], xavier(64, 64))
  within(neck["head"]["kernel"], xavier(64, 16))
  assert np.all(np.asarray(neck["regressor00"]["gamma_1_cross"]) == 0.1)
  decays = m.decay_mask(p)
  assert decays["encoder"]["cls_token"] and decays["neck"]["mask_token"]    # no no_weight_decay()
  assert not decays["neck"]["regressor00"]["gamma_1_cross"] and not decays["neck"]["head"]["bias"]


def test_missing_tokenizer_names_the_cae_key():
  c = small_config()
  c.cae.tokenizer = ""
  with pytest.raises(train.TrainingError, match="config.cae.tokenizer=''.*configs/tokenizer.py"):
    methods.get(c).init(jax.random.PRNGKey(0), jnp.zeros((2, 32, 32, 3)))


def test_imagenet_preset_is_the_official_base_recipe():
  c = load_config("cae", "imagenet")
  m = methods.get(c)
  assert (c.input.image_size, c.model.patch_size, c.model.variant, m.grid) == (224, 16, "base", 14)
  assert (c.cae.num_mask_patches, c.cae.min_mask_patches_per_block, c.cae.align_loss_weight,
          c.cae.base_momentum) == (98, 16, 2.0, 0.0)
  assert dict(c.cae.decoder) == dict(width=0, heads=0, regressor_depth=4, depth=4, layer_scale=0.1)
  assert (m.dec_width, m.dec_heads) == (768, 12)
  assert (c.model.qkv_bias, c.model.init_values, c.model.pos_embed, c.model.init_style,
          c.model.drop_path) == ("qv", 0.1, "sincos", "xavier", 0.1)
  assert (c.optim.b1, c.optim.b2, c.optim.weight_decay, c.optim.clip_grad) == (0.9, 0.999, 0.05, 3.0)
  assert c.input.batch_size == 2048 and optim.peak_lr(c.optim, 2048) == pytest.approx(1.5e-3)
  assert (c.optim.warmup_epochs, c.total_epochs, tuple(c.input.aug.crop_scale)) == (20, 800, (0.08, 1.0))


# ---------------------------------------------------------------------------------------------
# Runs on the embedded data.


def run_config():
  c = small_config(total_steps=8, ckpt_every=4)
  c.optim.update(base_lr=1e-3, lr_batch_divisor=16, warmup_epochs=0.0)
  c.evals = {}
  return c


@pytest.fixture(scope="module")
def uninterrupted(tmp_path_factory, compilation_cache):
  workdir = str(tmp_path_factory.mktemp("cae_a"))
  train_with_frozen_run(run_config(), workdir, fake_run())
  return workdir


def test_a_few_steps_lower_the_loss(uninterrupted):
  ls = losses(uninterrupted)
  assert np.mean([ls[s] for s in (6, 7, 8)]) < np.mean([ls[s] for s in (1, 2, 3)]) - 0.5, ls


def test_resumed_run_equals_uninterrupted(uninterrupted, fake, tmp_path):
  b = str(tmp_path / "b")
  assert_same_losses(losses(uninterrupted), resumed_losses(run_config(), b, stop_after=3), 8)
  sa, sb = REAL_LOAD(uninterrupted), REAL_LOAD(b)
  jax.tree.map(np.testing.assert_array_equal, sa.method_state["teacher"], sb.method_state["teacher"])
