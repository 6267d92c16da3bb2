"""data2vec (vision): the loss against a hand computation, the teacher's targets and EMA, the
colour jitter against PIL, resume and learning on the embedded data."""
import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from helpers import load_config, tiny_config, resumed_losses, assert_same_losses
from mim_jax import masking, methods, optim, train
from mim_jax.data import views
from mim_jax.methods import data2vec
from mim_jax.models import vit


def small_config(**d2v):
  c = tiny_config("data2vec")
  c.model.depth = 3
  c.data2vec.average_top_k_layers = 2
  c.data2vec.color_jitter = 0.0      # compiled once, in its own test
  c.data2vec.update(d2v)
  c.evals = {}
  return c


@functools.lru_cache(maxsize=None)
def arrays():
  """Images, parameters and a teacher for small_config(), built once for the module (the
  normalisation and loss flags do not change the parameters)."""
  m = methods.get(small_config())
  k1, k2, k3 = jax.random.split(jax.random.PRNGKey(0), 3)
  images = jax.random.normal(k1, (2, 32, 32, 3))
  params = jax.jit(m.init)(k2, images)

  @jax.jit
  def perturb(tree):
    # A teacher different from the student, so swapping them cannot go unnoticed.
    keys = jax.random.split(k3, len(jax.tree.leaves(tree)))
    return jax.tree.unflatten(jax.tree.structure(tree), [
        p + 0.05 * jax.random.normal(k, p.shape) for p, k in zip(jax.tree.leaves(tree), keys)])

  return images, params, {"teacher": perturb(params["encoder"])}


@functools.lru_cache(maxsize=None)
def encoder_fns():
  """The (shared) encoder with its block outputs, and on a masked image; jitted once."""
  enc = methods.get(small_config()).encoder
  blocks = jax.jit(lambda p, x: enc.apply({"params": p}, x, mutable=["intermediates"]))
  masked = jax.jit(lambda p, x, k: enc.apply({"params": p}, x, mask=k))
  return blocks, masked


def setup(c):
  return (methods.get(c),) + arrays()


def fixed_mask(batch=2, n=64):
  mask = np.zeros((batch, n), np.int32)
  mask[0, [1, 2, 3, 9, 10, 11, 17, 18, 19, 40]] = 1          # 10 masked
  mask[1, 20:44] = 1                                          # 24 masked
  return mask


# -- numpy reference, written from the official definitions ---------------------------------

def np_layer_norm(x):
  return (x - x.mean(-1, keepdims=True)) / np.sqrt(x.var(-1, keepdims=True) + 1e-5)


def np_instance_norm(x):   # [B, T, C]: per sample and channel over T
  return (x - x.mean(1, keepdims=True)) / np.sqrt(x.var(1, keepdims=True) + 1e-5)


def np_batch_norm(x):      # per channel over B and T
  return (x - x.mean((0, 1), keepdims=True)) / np.sqrt(x.var((0, 1), keepdims=True) + 1e-5)


def np_smooth_l1(d, beta):
  if beta == 0:
    return d ** 2
  a = np.abs(d)
  return np.where(a < beta, 0.5 * d ** 2 / beta, a - 0.5 * beta)


def hand_loss(m, c, images, params, state, mask):
  d2v = c.data2vec
  _, inter = encoder_fns()[0](state["teacher"], images)
  blocks = [np.asarray(b, np.float64) for b in inter["intermediates"]["encoder"]["block_outputs"]]
  assert len(blocks) == c.model.depth
  ys = [b[:, 1:] for b in blocks[len(blocks) - d2v.average_top_k_layers:]]   # top K, no cls
  if d2v.batch_norm_target_layer:
    ys = [np_batch_norm(y) for y in ys]
  if d2v.instance_norm_target_layer:
    ys = [np_instance_norm(y) for y in ys]
  if d2v.layer_norm_target_layer:
    ys = [np_layer_norm(y) for y in ys]
  y = sum(ys) / len(ys)
  if d2v.instance_norm_targets:
    y = np_instance_norm(y)
  if d2v.layer_norm_targets:
    y = np_layer_norm(y)
  tokens = encoder_fns()[1](params["encoder"], images, jnp.asarray(mask))
  tokens = np.asarray(tokens, np.float64)
  w = np.asarray(params["lm_head"]["kernel"], np.float64)
  b = np.asarray(params["lm_head"]["bias"], np.float64)
  x = tokens[:, 1:] @ w + b
  sel = mask.astype(bool)
  per = np_smooth_l1(x[sel] - y[sel], d2v.loss_beta).sum(-1)      # [num masked]
  dim = x.shape[-1]
  scale = {0.0: dim ** -0.5, -1.0: 1.0 / dim}.get(d2v.loss_scale, d2v.loss_scale)
  return (per * scale).mean()


@pytest.mark.parametrize("flags", [
    # data2vec_vision's ViT-B command: per-layer LN, LN of the average, smooth L1 beta 2, mean.
    dict(),
    # fairseq-style: instance norm per layer and of the average, L2, 1/sqrt(D).
    dict(layer_norm_target_layer=False, instance_norm_target_layer=True, layer_norm_targets=False,
         instance_norm_targets=True, loss_beta=0.0, loss_scale=0.0),
    # batch norm per layer, nothing after, smooth L1 beta 0.5, an explicit scale.
    dict(layer_norm_target_layer=False, batch_norm_target_layer=True, layer_norm_targets=False,
         loss_beta=0.5, loss_scale=3.0),
])
def test_loss_equals_hand_computation(flags):
  c = small_config(**flags)
  m, images, params, state = setup(c)
  mask = fixed_mask()
  loss, aux = jax.jit(m.loss_with_mask)(params, state, images, jnp.asarray(mask), jax.random.PRNGKey(5))
  want = hand_loss(m, c, images, params, state, mask)
  np.testing.assert_allclose(float(loss), want, rtol=2e-5)
  assert float(aux["mask_ratio"]) == pytest.approx(34 / 128)


def test_loss_changes_with_the_mask_and_the_teacher():
  c = small_config()
  m, images, params, state = setup(c)
  mask = fixed_mask()
  f = jax.jit(m.loss_with_mask)
  l0 = float(f(params, state, images, jnp.asarray(mask), jax.random.PRNGKey(0))[0])
  other = mask.copy()
  other[0, 40], other[0, 41] = 0, 1
  l1 = float(f(params, state, images, jnp.asarray(other), jax.random.PRNGKey(0))[0])
  l2 = float(f(params, {"teacher": params["encoder"]}, images, jnp.asarray(mask), jax.random.PRNGKey(0))[0])
  assert l0 != l1 and l0 != l2


def test_block_outputs_are_the_end_of_each_block():
  """The targets' 'end' point: block i's output is Block i applied to block i-1's output (the
  residual stream after the FFN's residual add), and the final tokens are its LayerNorm."""
  c = small_config()
  m, images, params, state = setup(c)
  enc = state["teacher"]
  tokens, inter = encoder_fns()[0](enc, images)
  outs = inter["intermediates"]["encoder"]["block_outputs"]
  block = vit.Block(vit.variant("mu")[2], qkv_bias="qv", init_values=0.1, init_style="beit", layer_id=2)
  assert c.model.qkv_bias == "qv" and c.model.init_values == 0.1
  again = block.apply({"params": enc["encoder"]["block01"]}, outs[0])
  np.testing.assert_allclose(again, outs[1], rtol=1e-5, atol=1e-5)
  last = np.asarray(outs[-1], np.float64)
  norm = enc["encoder"]["norm"]
  ln = (last - last.mean(-1, keepdims=True)) / np.sqrt(last.var(-1, keepdims=True) + 1e-6)
  np.testing.assert_allclose(tokens, ln * np.asarray(norm["scale"]) + np.asarray(norm["bias"]),
                             rtol=1e-4, atol=1e-4)


def test_loss_draws_its_mask_with_the_block_generator():
  c = small_config()
  m, images, params, state = setup(c)
  rng = jax.random.PRNGKey(3)
  mrng, drng = jax.random.split(rng)
  mask = jax.jit(lambda r: masking.block_mask(r, 2, 8, 8, 38, 5, None))(mrng)
  np.testing.assert_array_equal(jax.jit(m.make_mask, static_argnums=1)(mrng, 2), mask)
  assert (np.asarray(mask).sum(1) <= 38).all() and (np.asarray(mask).sum(1) > 0).all()
  loss, aux = jax.jit(m.loss)(params, state, images, rng, jnp.asarray(0))
  want, _ = jax.jit(m.loss_with_mask)(params, state, images, mask, drng)
  assert float(loss) == float(want)
  assert float(aux["ema_decay"]) == pytest.approx(0.99)


def test_imagenet_preset_is_the_official_vit_b_recipe():
  c = load_config("data2vec", "imagenet")
  d = c.data2vec
  assert (d.num_mask_patches, d.min_mask_patches_per_block, d.max_mask_patches_per_block) == (120, 16, 196)
  assert (d.average_top_k_layers, d.layer_results, d.layer_norm_target_layer, d.layer_norm_targets) == (6, "end", True, True)
  assert not (d.instance_norm_target_layer or d.batch_norm_target_layer or d.instance_norm_targets)
  assert (d.loss_beta, d.loss_scale, d.ema_end_decay, d.ema_anneal_end_step) == (2.0, -1.0, 0.9998, 0)
  assert (c.model.qkv_bias, c.model.init_values, c.model.rel_pos_bias, c.model.pos_embed,
          c.model.drop_path) == ("qv", 1e-4, "shared", "none", 0.25)
  assert (c.optim.b2, c.optim.weight_decay, c.optim.clip_grad, c.optim.warmup_epochs) == (0.999, 0.05, 3.0, 10)
  assert c.input.batch_size == 2048 and tuple(c.input.aug.crop_scale) == (0.08, 1.0)
  assert d.color_jitter == 0.4 and (c.optim.warmup_lr, c.optim.min_lr) == (0.0, 1e-5)
  assert optim.peak_lr(c.optim, c.input.batch_size) == pytest.approx(2e-3)   # not batch-rescaled
  m = methods.get(c)
  assert m.scale() == pytest.approx(1 / 768)


# -- the EMA teacher ------------------------------------------------------------------------

def official_decay(start, end, step, total):
  """fairseq get_annealed_rate / data2vec_vision engine_for_cyclical, in float64."""
  if total <= 0 or step >= total:
    return end
  return end - (end - start) * (1 - step / total)


@pytest.mark.parametrize("step", [0, 1, 37, 99, 100, 1000])
def test_annealed_decay_is_the_official_formula(step):
  got = float(data2vec.annealed_decay(jnp.asarray(step), 0.999, 0.9998, 100))
  assert got == pytest.approx(official_decay(0.999, 0.9998, step, 100), abs=1e-7)
  assert float(data2vec.annealed_decay(jnp.asarray(step), 0.999, 0.9998, 0)) == pytest.approx(0.9998, abs=1e-7)


def test_ema_update_follows_the_formula():
  c = small_config(ema_decay=0.9, ema_end_decay=0.99, ema_anneal_end_step=10)
  m, images, params, state = setup(c)
  moved = jax.tree.map(lambda p: p + 1.0, params)
  for step in (0, 4, 10, 25):
    d = official_decay(0.9, 0.99, step, 10)
    new = m.update_state(moved, state, jnp.asarray(step))
    assert set(new) == {"teacher"}
    jax.tree.map(lambda t, t0, o: np.testing.assert_allclose(t, d * t0 + (1 - d) * o, rtol=1e-6, atol=1e-6),
                 new["teacher"], state["teacher"], moved["encoder"])


def test_teacher_gets_no_gradient():
  c = small_config()
  m, images, params, state = setup(c)
  g_params, g_state = jax.jit(jax.grad(lambda p, s: m.loss(p, s, images, jax.random.PRNGKey(1),
                                                           jnp.asarray(0))[0], argnums=(0, 1)))(params, state)
  assert all(float(jnp.abs(g).max()) == 0.0 for g in jax.tree.leaves(g_state))
  assert float(jnp.abs(g_params["lm_head"]["kernel"]).max()) > 0
  assert float(jnp.abs(g_params["encoder"]["mask_token"]).max()) > 0


def test_ema_flag_is_refused():
  c = small_config()
  c.ema.enabled = True
  with pytest.raises(ValueError, match="ema.enabled=False"):
    methods.get(c)


# -- colour jitter --------------------------------------------------------------------------

def test_preprocess_jitters_the_full_image_before_the_crop():
  c = small_config(color_jitter=0.4)
  m = methods.get(c)
  images = jnp.asarray(np.random.default_rng(1).integers(0, 256, (4, 32, 32, 3)), jnp.uint8)
  rng = jax.random.PRNGKey(2)
  got = jax.jit(lambda r, x: m.preprocess(r, x, c.input, True))(rng, images)
  kj, rest = jax.random.split(rng)
  jittered = views.color_jitter(kj, images, 0.4, 0.4, 0.4, 0.0)
  want = train.preprocess(rest, jittered, c.input, True)
  # Jitted against op by op: the float32 roundings differ (1.1e-5 on one pixel of 12,288 with
  # XLA's CPU backend at optimisation level 0), far below what the jitter changes (next line).
  np.testing.assert_allclose(got, want, rtol=1e-5, atol=5e-5)
  assert not np.allclose(got, train.preprocess(rest, images, c.input, True), atol=1e-3)


# -- training -------------------------------------------------------------------------------


def test_training_moves_the_teacher_by_ema_only_resumes_exactly_and_learns(tmp_path, compilation_cache):
  c = small_config()
  c.model.depth = 2
  c.total_steps, c.ckpt_every, c.log_every = 6, 3, 1
  c.optim.update(base_lr=3e-3, lr_batch_divisor=c.input.batch_size, warmup_epochs=0.0)
  one = jax.devices()[:1]

  # The uninterrupted run, step by step.
  tr = train.Trainer.create(c, devices=one)
  before = jax.device_get(tr.state)
  la = {1: float(tr.step()["loss"])}
  after = jax.device_get(tr.state)
  # At init the teacher is the student's copy; the step moved the student by the optimiser
  # and the teacher only by the EMA towards the new student.
  jax.tree.map(np.testing.assert_array_equal, before["method_state"]["teacher"], before["params"]["encoder"])
  d = official_decay(c.data2vec.ema_decay, c.data2vec.ema_end_decay, 0, c.data2vec.ema_anneal_end_step)
  jax.tree.map(lambda t, t0, o: np.testing.assert_allclose(t, d * t0 + (1 - d) * o, rtol=1e-5, atol=1e-7),
               after["method_state"]["teacher"], before["method_state"]["teacher"],
               after["params"]["encoder"])
  assert not np.array_equal(after["params"]["encoder"]["patch_embed"]["proj"]["kernel"],
                            before["params"]["encoder"]["patch_embed"]["proj"]["kernel"])
  for s in range(2, 7):
    la[s] = float(tr.step()["loss"])

  # The same run preempted after step 3 and resumed from its checkpoint.
  assert_same_losses(la, resumed_losses(c, str(tmp_path / "b"), stop_after=3, devices=one), 6)
  # A few steps on the embedded data lower the loss (the teacher moves slowly meanwhile).
  assert la[6] < 0.8 * la[1], la
