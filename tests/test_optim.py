"""Schedules, weight-decay masks and the optimiser against hand computations."""
import math

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import pytest

from mim_jax import config_lib, methods, optim


def cfg(**kw):
  return ml_collections.ConfigDict(kw)


def test_cosine_schedule_is_maes_per_iteration_rule():
  c = cfg(base_lr=1.5e-4, lr_batch_divisor=256, warmup_epochs=2, schedule="cosine", min_lr=0.0)
  spe, total, batch = 10, 100, 512
  s = optim.make_schedule(c, batch, spe, total)
  lr = 1.5e-4 * batch / 256
  for it in (0, 5, 19, 20, 37, 99):
    epoch = it / spe
    if epoch < 2:
      expect = lr * epoch / 2
    else:
      expect = lr * 0.5 * (1 + math.cos(math.pi * (epoch - 2) / (10 - 2)))
    np.testing.assert_allclose(float(s(it)), expect, rtol=1e-5, atol=1e-10)


def test_multistep_schedule_is_simmims():
  c = cfg(base_lr=1e-4, lr_batch_divisor=512, warmup_epochs=1, warmup_lr=5e-7, schedule="multistep",
          milestones_epochs=(7,), gamma=0.1)
  s = optim.make_schedule(c, 1024, 10, 100)
  np.testing.assert_allclose(float(s(0)), 1e-6, rtol=1e-5)
  np.testing.assert_allclose(float(s(10)), 2e-4, rtol=1e-5)
  np.testing.assert_allclose(float(s(69)), 2e-4, rtol=1e-5)
  np.testing.assert_allclose(float(s(70)), 2e-5, rtol=1e-5)


def test_table_schedule_is_rotnets_lut_per_epoch():
  # FeatureDecoupling's ImageNet LUT_lr goes back up after epoch 210: a table, not a multistep.
  table = ((90, 0.01), (130, 0.001), (190, 0.0001), (210, 0.00001), (230, 0.0001), (245, 0.00001))
  c = cfg(base_lr=0.0, lr_batch_divisor=192, schedule="table", lr_table=table)
  s = optim.make_schedule(c, 192, 10, 2450)
  for epoch, want in ((0, 0.01), (89, 0.01), (90, 0.001), (209, 0.00001), (210, 0.0001),
                      (229, 0.0001), (230, 0.00001), (300, 0.00001)):
    for step in (epoch * 10, epoch * 10 + 9):     # constant through each epoch
      np.testing.assert_allclose(float(s(step)), want, rtol=1e-6)
  # The lrs scale with the batch like base_lr; a warm-up leaves the table's epochs in place.
  s = optim.make_schedule(cfg(base_lr=0.0, lr_batch_divisor=192, schedule="table", lr_table=table,
                              warmup_epochs=1), 384, 10, 2450)
  np.testing.assert_allclose(float(s(905)), 0.002, rtol=1e-6)
  with pytest.raises(ValueError, match="lr_table"):
    optim.make_schedule(cfg(base_lr=0.1, schedule="table"), 192, 10, 100)


def method_params(name, preset=""):
  import importlib.util
  import pathlib
  path = pathlib.Path(__file__).parents[1] / "configs" / f"{name}.py"
  spec = importlib.util.spec_from_file_location(name, path)
  mod = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(mod)
  c = mod.get_config(preset)
  c.model.variant, c.model.depth = "mu", 1
  if name == "mae":
    c.mae.decoder = dict(width=32, depth=1, heads=2)
  if c.model.patch_size == 16:
    c.input.image_size = 64
  m = methods.get(c)
  size = c.input.image_size
  p = jax.eval_shape(m.init, jax.random.PRNGKey(0), jnp.zeros((1, size, size, 3)))
  return m, p


def test_mae_decays_matrices_and_tokens_not_biases_or_norms():
  m, p = method_params("mae")
  mask = m.decay_mask(p)
  assert mask["encoder"]["cls_token"] is True
  assert mask["decoder"]["mask_token"] is True
  assert mask["encoder"]["encoder"]["block00"]["attn"]["qkv_kernel"] is True
  assert mask["encoder"]["encoder"]["block00"]["attn"]["qkv_bias"] is False
  assert mask["encoder"]["encoder"]["block00"]["norm1"]["scale"] is False


def test_simmim_skips_cls_token_and_pos_embed_like_official_vit():
  m, p = method_params("simmim", "imagenet")
  mask = m.decay_mask(p)
  assert mask["encoder"]["cls_token"] is False
  assert mask["encoder"]["mask_token"] is True
  assert mask["encoder"]["rel_pos_bias"]["table"] is True
  assert mask["encoder"]["encoder"]["block00"]["gamma_1"] is False
  assert mask["encoder"]["encoder"]["block00"]["attn"]["q_bias"] is False


def test_adamw_decays_only_masked_parameters():
  params = {"w": jnp.ones((2, 2)), "b": jnp.ones((2,))}
  c = cfg(name="adamw", weight_decay=0.5, b1=0.9, b2=0.95)
  tx = optim.make_optimizer(c, lambda s: 0.1, {"w": True, "b": False})
  zero = jax.tree.map(jnp.zeros_like, params)
  upd, _ = tx.update(zero, tx.init(params), params)
  np.testing.assert_allclose(upd["w"], -0.1 * 0.5 * np.ones((2, 2)), rtol=1e-6)
  np.testing.assert_allclose(upd["b"], 0.0)


def test_cosine_weight_decay_follows_the_dino_schedule_step_by_step():
  # With zero gradients AdamW's update is -lr * wd(step) * p on decayed leaves only, so the
  # per-step decay exposes the schedule: wd_end + (wd - wd_end) * (1 + cos(pi t / T)) / 2.
  total, wd, end = 8, 0.04, 0.4
  c = cfg(name="adamw", weight_decay=wd, weight_decay_schedule="cosine", weight_decay_end=end)
  tx = optim.make_optimizer(c, lambda s: 1.0, {"w": True, "b": False}, total_steps=total)
  params = {"w": jnp.ones((3,)), "b": jnp.ones((3,))}
  state = tx.init(params)
  zero = jax.tree.map(jnp.zeros_like, params)
  for t in range(total + 1):
    upd, state = tx.update(zero, state, params)
    want = end + 0.5 * (wd - end) * (1 + np.cos(np.pi * t / total))
    np.testing.assert_allclose(upd["w"], -want * np.ones(3), rtol=1e-6)
    np.testing.assert_allclose(upd["b"], 0.0)
  with pytest.raises(ValueError, match="total steps"):
    optim.make_optimizer(c, lambda s: 1.0, {"w": True})
  # A 0-step run (the random-init baseline, total_epochs=0) builds its optimiser with the
  # starting decay instead of dividing by zero.
  assert optim.weight_decay_schedule(c, 0) == wd
  with pytest.raises(ValueError, match="LARS"):
    optim.make_optimizer(cfg(name="lars", weight_decay_schedule="cosine"), lambda s: 1.0,
                         {"w": True}, total_steps=total)


def test_clip_grad_bounds_the_global_norm():
  c = cfg(name="sgd", weight_decay=0.0, momentum=0.0, clip_grad=1.0)
  tx = optim.make_optimizer(c, lambda s: 1.0, {"w": True})
  p = {"w": jnp.zeros((4,))}
  upd, _ = tx.update({"w": jnp.full((4,), 10.0)}, tx.init(p), p)
  np.testing.assert_allclose(float(jnp.linalg.norm(upd["w"])), 1.0, rtol=1e-5)


def test_peak_lr_scaling_rule():
  assert optim.peak_lr(cfg(base_lr=1.5e-4, lr_batch_divisor=256), 4096) == 1.5e-4 * 16
  base = config_lib.base_config()
  assert base.optim.lr_batch_divisor == 256


def test_cosine_epoch_holds_each_epoch_and_a_constant_lr_group_keeps_the_peak():
  """SimSiam's adjust_learning_rate (once per epoch) and its fix_pred_lr group."""
  import jax
  import jax.numpy as jnp
  import ml_collections
  import numpy as np
  from mim_jax import optim
  cfg = ml_collections.ConfigDict(dict(name="sgd", base_lr=0.05, lr_batch_divisor=256, momentum=0.0,
                                       weight_decay=0.0, schedule="cosine_epoch", warmup_epochs=0.0,
                                       min_lr=0.0))
  s = optim.make_schedule(cfg, 512, 10, 100)
  peak = 0.05 * 2
  for step in (0, 9, 10, 19, 55, 99):
    epoch = step // 10
    np.testing.assert_allclose(float(s(step)), peak * 0.5 * (1 + np.cos(np.pi * epoch / 10)), rtol=1e-5)
  params = {"encoder": {"w": jnp.ones((2, 2))}, "predictor": {"w": jnp.ones((2, 2))}}
  tx = optim.make_optimizer(cfg, s, jax.tree.map(lambda _: False, params), 100,
                            groups=((r"^predictor/", {"constant_lr": True}),), steps_per_epoch=10,
                            peak_lr=peak)
  state = tx.init(params)
  grads = jax.tree.map(jnp.ones_like, params)
  for step in range(60):
    updates, state = tx.update(grads, state, params)
  # At step 59 (epoch 5) the encoder's lr is the cosine's, the predictor's the peak.
  np.testing.assert_allclose(float(updates["predictor"]["w"][0, 0]), -peak, rtol=1e-6)
  np.testing.assert_allclose(float(updates["encoder"]["w"][0, 0]),
                             -peak * 0.5 * (1 + np.cos(np.pi * 5 / 10)), rtol=1e-5)
