"""Barlow Twins: the cross-correlation loss of facebookresearch/barlowtwins main.py by hand (with
BatchNorm1d(affine=False) and its biased variance), over the whole batch; the projector; the
views forwarded one at a time; the biases' learning rate and LARS's exclusions; the official
ImageNet recipe and learning-rate schedule."""
import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from helpers import load_config
from je_helpers import method_and_state, tiny_je_config
from mim_jax import methods, optim
from mim_jax.methods import barlow_twins as bt


def reference_loss(z1, z2, lambd, eps=1e-5):
  """main.py: c = bn(z1).T @ bn(z2) / N, bn = BatchNorm1d(affine=False) in training mode."""
  def bn(z):
    return (z - z.mean(0)) / np.sqrt(z.var(0) + eps)     # np.var: biased, as BatchNorm
  c = bn(z1).T @ bn(z2) / len(z1)
  on = np.sum((np.diag(c) - 1) ** 2)
  off = np.sum(c ** 2) - np.sum(np.diag(c) ** 2)
  return on + lambd * off


def test_cross_correlation_loss_equals_the_official_by_hand():
  rng = np.random.default_rng(0)
  z1, z2 = rng.normal(size=(6, 5)) * 3 + 1, rng.normal(size=(6, 5))
  got, parts = bt.cross_correlation_loss(jnp.asarray(z1), jnp.asarray(z2), 0.0051)
  np.testing.assert_allclose(float(got), reference_loss(z1, z2, 0.0051), rtol=1e-5)
  # Two examples, one dimension each: bn(z) = +-1 / sqrt(1 + eps / var).
  a = np.array([[1.0], [3.0]])      # mean 2, biased variance 1
  b = np.array([[5.0], [1.0]])      # mean 3, biased variance 4
  s = 1 / np.sqrt(1 + 1e-5) * 1 / np.sqrt(1 + 1e-5 / 4)
  c = (1 * -1 + -1 * 1) / 2 * s     # perfectly anti-correlated
  got, parts = bt.cross_correlation_loss(jnp.asarray(a), jnp.asarray(b), 0.5)
  np.testing.assert_allclose(float(got), (c - 1) ** 2, rtol=1e-6)
  assert float(parts["off_diag"]) == 0.0
  # The unbiased variance (torch's x.var()) would give bn(z) = +-1/sqrt(2), c = -1/2: 2.25.
  np.testing.assert_allclose(float(got), 4.0, rtol=1e-4)


def test_the_loss_is_over_the_whole_batch():
  """Two halves (two replicas each normalising and correlating its own half) give another loss:
  the jitted loss normalises and correlates the global batch."""
  rng = np.random.default_rng(1)
  z1, z2 = rng.normal(size=(8, 4)), rng.normal(size=(8, 4))
  whole = float(bt.cross_correlation_loss(jnp.asarray(z1), jnp.asarray(z2), 0.0051)[0])
  np.testing.assert_allclose(whole, reference_loss(z1, z2, 0.0051), rtol=1e-5)
  halves = np.mean([reference_loss(z1[s], z2[s], 0.0051) for s in (slice(0, 4), slice(4, 8))])
  assert abs(whole - halves) > 1e-2


def test_projector_layers_from_the_official_string():
  assert bt.projector_layers("8192-8192-8192") == (
      (8192, False, "affine"), (8192, False, "affine"), (8192, False, ""))
  assert bt.projector_layers("64-16", hidden_bias=True) == ((64, True, "affine"), (16, False, ""))
  assert bt.projector_layers("16") == ((16, False, ""),)


@pytest.fixture(scope="module")
def tiny():
  """(config, method, params, state, views): the tiny model with the official two rates, a
  larger weight decay and scale_loss 0.25."""
  c = tiny_je_config("barlow_twins", **{"barlow_twins.scale_loss": 0.25,
                                        "barlow_twins.lr_biases": 0.0048, "optim.base_lr": 0.2,
                                        "optim.weight_decay": 1e-3})
  return (c,) + method_and_state(c)


def test_the_views_are_forwarded_one_at_a_time_and_scale_loss_scales(tiny):
  c, m, params, state, views = tiny
  p = params["projector"]
  assert "bias" not in p["fc0"] and "bias" not in p["fc2"] and "bn2" not in p
  loss, aux = jax.jit(m.loss)(params, state, views, jax.random.PRNGKey(0), jnp.int32(0))
  v1, v2 = m.split_views(views)
  cols = state["collections"]
  embed = jax.jit(lambda c, v: m.embed(params, c, v, heads=("projector",)))
  o1, cols1 = embed(cols, v1)
  o2, cols2 = embed(cols1, v2)
  want = reference_loss(np.asarray(o1["projector"]), np.asarray(o2["projector"]), 0.0051)
  np.testing.assert_allclose(float(aux["barlow_loss"]), want, rtol=1e-4)
  np.testing.assert_allclose(float(loss), 0.25 * want, rtol=1e-4)
  # The running statistics moved twice, view 1's then view 2's.
  np.testing.assert_allclose(
      aux["collections"]["batch_stats"]["projector"]["bn0"]["running_mean"],
      cols2["batch_stats"]["projector"]["bn0"]["running_mean"], rtol=1e-5, atol=1e-7)
  # One forward over both views (SimCLR's) would normalise them together: another loss.
  o, _ = embed(cols, jnp.concatenate([v1, v2]))
  z = np.asarray(o["projector"])
  assert abs(reference_loss(z[:8], z[8:], 0.0051) - want) > 1e-3


def test_biases_and_batchnorm_get_their_own_rate_without_decay_or_trust_ratio(tiny):
  """The official LARS step from zero momentum: weights -lr * eta |p| / |g + wd p| * (g + wd p);
  1-D parameters -lr_biases * g."""
  c, m, params, state, views = tiny
  groups = m.param_groups()
  assert groups == ((bt.BIAS_AND_NORM, {"lr_scale": pytest.approx(0.0048 / 0.2)}),)
  mask = m.decay_mask(params)
  labels = optim.group_labels(mask, optim.parse_groups(groups))
  assert all(jax.tree.leaves(jax.tree.map(lambda l, p: (l == "g0") == (p.ndim == 1), labels, params)))
  lr = 0.2 * 16 / 256
  # The step on the projector's parameters alone (the rule is per leaf).
  params = {"projector": params["projector"]}
  tx = optim.make_optimizer(c.optim, lambda count: lr, m.decay_mask(params), 10, groups=groups)
  leaves, tree = jax.tree.flatten(params)
  keys = jax.random.split(jax.random.PRNGKey(5), len(leaves))
  grads = jax.tree.unflatten(tree, [jax.random.normal(k, x.shape) * 1e-2 for k, x in zip(keys, leaves)])
  upd, _ = jax.jit(tx.update)(grads, tx.init(params), params)
  k, g = params["projector"]["fc0"]["kernel"], grads["projector"]["fc0"]["kernel"]
  u = g + 1e-3 * k
  want = -lr * 0.001 * np.linalg.norm(k) / np.linalg.norm(u) * u
  np.testing.assert_allclose(upd["projector"]["fc0"]["kernel"], want, rtol=1e-4, atol=1e-10)
  b = grads["projector"]["bn0"]["bias"]
  np.testing.assert_allclose(upd["projector"]["bn0"]["bias"], -lr * 0.024 * b, rtol=1e-5, atol=1e-12)
  # Equal rates: no parameter group.
  c2 = tiny_je_config("barlow_twins", **{"barlow_twins.lr_biases": 0.3, "optim.base_lr": 0.3})
  assert methods.get(c2).param_groups() == ()


def assert_official_schedule(c, spe: int = 20, total: int = 1000):
  """The config's lr at batch 2048 equals adjust_learning_rate's (peak 0.2 x 8, 10 warm-up
  epochs, cosine to 0.001 x peak) at a few steps."""
  sched = optim.make_schedule(c.optim, 2048, spe, total)
  for s in (0, 7, 200, 201, 600, 999):
    np.testing.assert_allclose(float(sched(s)), official_lr(s, total, 10 * spe, 0.2 * 8), rtol=1e-5,
                               atol=1e-7)


def official_lr(step, steps, warmup, peak):
  """main.py adjust_learning_rate (peak = batch / 256 x the group's base rate)."""
  if step < warmup:
    return peak * step / warmup
  q = 0.5 * (1 + math.cos(math.pi * (step - warmup) / (steps - warmup)))
  return peak * q + peak * 0.001 * (1 - q)


def test_imagenet_preset_is_the_official_recipe():
  c = load_config("barlow_twins", "imagenet")
  b = c.barlow_twins
  assert b.lambd == 0.0051 and tuple(map(tuple, b.projector_layers)) == bt.projector_layers("8192-8192-8192")
  assert c.input.batch_size == 2048 and c.total_epochs == 1000 and c.model.depth == 50
  assert c.model.zero_init_residual and c.model.bn_groups == 1
  assert (c.optim.name, c.optim.base_lr, c.optim.weight_decay, c.optim.momentum) == ("lars", 0.2, 1e-6, 0.9)
  assert b.lr_biases == 0.0048 and b.scale_loss == 1 / 16
  v = b.views
  assert tuple(v.global_scale) == (0.08, 1.0) and tuple(v.jitter) == (0.4, 0.4, 0.2, 0.1)
  assert (v.jitter_prob, v.gray_prob, v.solarize_prob) == (0.8, 0.2, 0.2)
  assert tuple(v.blur_probs[:2]) == (1.0, 0.1) and tuple(v.blur_radius) == (0.1, 2.0)
  assert_official_schedule(c)


@pytest.mark.parametrize("preset", ["", "cifar10"])
def test_cpu_presets_take_solo_learns_cifar_recipe(preset):
  c = load_config("barlow_twins", preset)
  w = 1024 if preset == "" else 2048
  assert tuple(map(tuple, c.barlow_twins.projector_layers)) == bt.projector_layers(f"{w}-{w}-{w}")
  assert (c.optim.base_lr, c.optim.weight_decay, c.optim.min_lr) == (0.3, 1e-4, 0.0)
  assert (c.barlow_twins.scale_loss, c.barlow_twins.lr_biases) == (0.1, 0.3)
  assert methods.get(c).param_groups() == ()
  v = c.barlow_twins.views
  assert tuple(v.blur_probs[:2]) == (0.0, 0.0) and v.solarize_prob == 0.2
