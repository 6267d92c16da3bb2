"""MoCo v3: the contrastive loss as moco/builder.py's contrastive_loss (2T scaling, keys of the
whole batch, symmetric in the views), the momentum schedule of main_moco.py, the official head
pairs, and the ViT variant (frozen random patch projection, vits.py's initialisation)."""
import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from helpers import load_config
from je_helpers import method_and_state, tiny_je_config
from mim_jax import config_lib, train
from mim_jax.methods import mocov3
from mim_jax.methods.base import cosine_momentum


def reference_ctr(q, k, t):
  """MoCo.contrastive_loss on one process (world size 1: the gathered keys are k), in numpy."""
  q = q / np.linalg.norm(q, axis=1, keepdims=True)
  k = k / np.linalg.norm(k, axis=1, keepdims=True)
  logits = q @ k.T / t
  logits = logits - logits.max(1, keepdims=True)
  n = len(q)
  ce = -(logits[np.arange(n), np.arange(n)] - np.log(np.exp(logits).sum(1)))
  return ce.mean() * 2 * t


def test_contrastive_loss_equals_the_official_formula_by_hand():
  rng = np.random.default_rng(0)
  q, k = rng.normal(size=(6, 5)), rng.normal(size=(6, 5))
  for t in (1.0, 0.2):
    got, _ = mocov3.contrastive_loss(jnp.asarray(q), jnp.asarray(k), t)
    np.testing.assert_allclose(float(got), reference_ctr(q, k, t), rtol=1e-5)
  # Two orthogonal images, each query equal to its key: CE = log(1 + e^(-1/T)), x 2T.
  a = np.array([[2.0, 0.0], [0.0, 3.0]])
  got, acc = mocov3.contrastive_loss(jnp.asarray(a), jnp.asarray(a), 0.5)
  np.testing.assert_allclose(float(got), math.log(1 + math.exp(-2.0)) * 2 * 0.5, rtol=1e-6)
  assert float(acc) == 1.0


def test_keys_come_from_the_whole_batch():
  """Each query is scored against all N keys (concat_all_gather + labels arange(N) + N rank):
  two halves scored alone (no gather) give a different loss."""
  rng = np.random.default_rng(1)
  q, k = rng.normal(size=(8, 4)), rng.normal(size=(8, 4))
  whole = float(mocov3.contrastive_loss(jnp.asarray(q), jnp.asarray(k), 0.2)[0])
  halves = np.mean([reference_ctr(q[s], k[s], 0.2) for s in (slice(0, 4), slice(4, 8))])
  # Rank r's loss with the gathered keys and labels arange(4) + 4 r, averaged over the ranks.
  per_rank = []
  for r in range(2):
    qn = q[4 * r:4 * r + 4] / np.linalg.norm(q[4 * r:4 * r + 4], axis=1, keepdims=True)
    kn = k / np.linalg.norm(k, axis=1, keepdims=True)
    lg = qn @ kn.T / 0.2
    lab = np.arange(4) + 4 * r
    ce = -(lg[np.arange(4), lab] - np.log(np.exp(lg).sum(1)))
    per_rank.append(ce.mean() * 2 * 0.2)
  np.testing.assert_allclose(whole, np.mean(per_rank), rtol=1e-5)
  assert abs(whole - halves) > 1e-3


def test_the_loss_is_ctr_q1_k2_plus_ctr_q2_k1():
  c = tiny_je_config("mocov3")
  m, params, state, views = method_and_state(c)
  rng = jax.random.PRNGKey(0)

  @jax.jit
  def run(params, state, views):
    loss, aux = m.loss(params, state, views, rng, jnp.int32(0))
    v = m.split_views(views)
    (o1, o2), _ = m.embed_views(params, state["collections"], v, heads=("projector", "predictor"))
    (k1, k2), _ = m.teacher_embed_views(state, v)
    return loss, aux, o1, o2, k1, k2

  loss, aux, o1, o2, k1, k2 = run(params, state, views)
  q1, q2 = np.asarray(o1["predictor"]), np.asarray(o2["predictor"])
  k1, k2 = np.asarray(k1["projector"]), np.asarray(k2["projector"])
  t = float(c.mocov3.temperature)
  want = reference_ctr(q1, k2, t) + reference_ctr(q2, k1, t)
  np.testing.assert_allclose(float(loss), want, rtol=1e-4)
  # Not the one-directional loss, nor the same-view pairing.
  assert abs(want - 2 * reference_ctr(q1, k2, t)) > 1e-4
  assert abs(want - reference_ctr(q1, k1, t) - reference_ctr(q2, k2, t)) > 1e-4
  # Each view its own forward: the online and the teacher BatchNorm statistics both moved.
  bs = aux["collections"]["batch_stats"]
  for name in ("encoder", "projector", "predictor", "teacher_encoder", "teacher_projector"):
    assert name in bs, sorted(bs)
  rm0 = state["collections"]["batch_stats"]["teacher_encoder"]["bn1"]["running_mean"]
  assert not np.allclose(rm0, bs["teacher_encoder"]["bn1"]["running_mean"])


def test_momentum_schedule():
  # main_moco.py adjust_moco_momentum: 0.99 at epoch 0, 0.995 half-way, 1 at the end.
  for epoch, want in ((0.0, 0.99), (50.0, 0.995), (100.0, 1.0), (25.0, 1 - 0.005 * (1 + math.cos(math.pi / 4)))):
    np.testing.assert_allclose(float(mocov3.adjust_moco_momentum(epoch, 100, 0.99)), want, rtol=1e-6)
  # The base class's 'cosine' schedule at step k of K is the same function of k / K.
  for k in (0, 13, 50, 99, 100):
    np.testing.assert_allclose(float(cosine_momentum(k, 100, 0.99)),
                               float(mocov3.adjust_moco_momentum(k / 100 * 300, 300, 0.99)), rtol=1e-6)
  # After optimiser step s the teacher moves with the next iteration's rate, m(s + 1).
  c = tiny_je_config("mocov3")
  m, *_ = method_and_state(c)
  spe, total = m.run_steps()
  epochs = total / spe
  for s in (0, total // 2, total - 1):
    np.testing.assert_allclose(float(m.momentum(s)),
                               float(mocov3.adjust_moco_momentum((s + 1) / spe, epochs, 0.99)),
                               rtol=1e-6)
  assert float(m.momentum(total - 1)) == pytest.approx(1.0)
  c = tiny_je_config("mocov3", **{"mocov3.momentum_schedule": "constant"})
  m, *_ = method_and_state(c)
  assert float(m.momentum(3)) == pytest.approx(0.99)


def test_official_head_pairs():
  # _build_mlp(2, ..., last_bn=True) / (..., last_bn=False) / _build_mlp(3, ...)
  assert mocov3.mlp_spec(2, 4096, 256) == ((4096, False, "affine"), (256, False, "plain"))
  assert mocov3.mlp_spec(2, 4096, 256, False) == ((4096, False, "affine"), (256, False, ""))
  assert mocov3.mlp_spec(3, 64, 8) == ((64, False, "affine"), (64, False, "affine"), (8, False, "plain"))
  m, params, *_ = method_and_state(tiny_je_config("mocov3"))
  assert [l[2] for l in m.heads["projector"].layers] == ["affine", "plain"]
  assert [l[2] for l in m.heads["predictor"].layers] == ["affine", ""]
  assert "bn1" not in params["predictor"] and "bn1" not in params["projector"]   # affine=False


def tiny_vit_config(**overrides):
  c = tiny_je_config("mocov3", **overrides)
  c.model = config_lib.base_config().model
  c.model.update(variant="mu", depth=1, patch_size=4)
  c.pooling = "cls"
  c.optim.update(name="adamw", base_lr=1e-2, weight_decay=0.1)
  c.mocov3.update(temperature=0.2, decay_all=True)
  return c


def test_vit_frozen_patch_projection_and_a_training_step():
  c = tiny_vit_config(**{"mocov3.stop_grad_conv1": True})
  m, params, state, views = method_and_state(c)
  assert [l[2] for l in m.heads["projector"].layers] == ["affine", "affine", "plain"]
  assert [l[2] for l in m.heads["predictor"].layers] == ["affine", "plain"]
  tr = train.Trainer.create(c, devices=jax.devices()[:1])
  p0 = jax.tree.map(np.asarray, tr.state["params"])
  for _ in range(2):
    tr.state, metrics = tr.step_fn(tr.state, tr.next_batch())
    assert np.isfinite(float(metrics["loss"]))
  p2 = jax.tree.map(np.asarray, tr.state["params"])
  for leaf in ("kernel", "bias"):
    np.testing.assert_array_equal(p2["encoder"]["patch_embed"]["proj"][leaf],
                                  p0["encoder"]["patch_embed"]["proj"][leaf])
  teacher = tr.state["method_state"]["teacher"]["encoder"]["patch_embed"]["proj"]["kernel"]
  # The momentum encoder's copy stays the initialisation too (m T + (1 - m) T, up to rounding).
  np.testing.assert_allclose(np.asarray(teacher), p0["encoder"]["patch_embed"]["proj"]["kernel"],
                             rtol=1e-6, atol=1e-7)
  for path in (("encoder", "cls_token"), ("encoder", "encoder", "block00", "attn", "qkv_kernel"),
               ("encoder", "encoder", "norm", "bias"), ("projector", "fc0", "kernel")):
    a, b = p0, p2
    for k in path:
      a, b = a[k], b[k]
    assert not np.allclose(a, b), path
  # Without the flag the patch projection trains.
  c = tiny_vit_config(**{"mocov3.stop_grad_conv1": False})
  m, *_ = method_and_state(c)
  assert m.param_groups() == ()


def test_vit_initialisation_and_adamw_decays_every_parameter():
  c = tiny_vit_config()
  m, params, *_ = method_and_state(c)
  d = 64
  qkv = np.asarray(params["encoder"]["encoder"]["block00"]["attn"]["qkv_kernel"])
  bound = math.sqrt(6.0 / (d + d))
  assert qkv.shape == (d, 3 * d) and np.abs(qkv).max() <= bound
  assert np.abs(qkv).max() > math.sqrt(6.0 / (d + 3 * d))      # wider than xavier on [d, 3d]
  assert np.abs(np.asarray(params["encoder"]["cls_token"])).max() < 1e-5
  pe = np.asarray(params["encoder"]["patch_embed"]["proj"]["kernel"])
  assert np.abs(pe).max() <= math.sqrt(6.0 / (3 * 16 + d))
  assert all(jax.tree.leaves(m.decay_mask(params)))     # torch AdamW(model.parameters())
  assert load_config("mocov3", "imagenet_vit").mocov3.decay_all
  # LARS: moco/optimizer.py adapts and decays only parameters of more than one dimension.
  m2, params2, *_ = method_and_state(tiny_je_config("mocov3"))
  mask = m2.decay_mask(params2)
  assert all(bool(k) == (p.ndim > 1) for k, p in zip(jax.tree.leaves(mask), jax.tree.leaves(params2)))


def test_imagenet_presets_are_the_config_md_recipes():
  c = load_config("mocov3", "imagenet")
  assert (c.model.name, c.model.depth, c.model.zero_init_residual) == ("resnet", 50, True)
  assert (c.optim.name, c.optim.base_lr, c.optim.weight_decay, c.optim.warmup_epochs) == ("lars", 0.6, 1e-6, 10)
  assert (c.input.batch_size, c.total_epochs, c.mocov3.temperature, c.mocov3.momentum) == (4096, 100, 1.0, 0.99)
  assert tuple(c.mocov3.views.global_scale) == (0.2, 1.0) and c.mocov3.momentum_schedule == "cosine"
  v = load_config("mocov3", "imagenet_vit")
  assert (v.model.name, v.model.variant, v.model.patch_size, v.model.pos_embed, v.pooling) == (
      "vit", "small", 16, "sincos", "cls")
  assert (v.optim.name, v.optim.base_lr, v.optim.weight_decay, v.optim.warmup_epochs) == ("adamw", 1.5e-4, 0.1, 40)
  assert (v.input.batch_size, v.total_epochs, v.mocov3.temperature, v.mocov3.stop_grad_conv1) == (4096, 300, 0.2, True)
  assert tuple(v.mocov3.views.global_scale) == (0.08, 1.0)


def test_the_vit_s_preset_has_moco_v3s_12_heads():
  """vits.py's vit_small: 12 heads of 32 channels (model.num_heads overrides the variant's 6)."""
  from mim_jax import models
  c = load_config("mocov3", "imagenet_vit")
  assert c.model.num_heads == 12 and c.model.variant == "small"
  c.model.update(depth=1, patch_size=16, dtype="float32")
  enc = models.build(c.model, 32)
  x = jnp.zeros((1, 32, 32, 3))
  v = enc.init(jax.random.PRNGKey(0), x)
  _, inter = enc.apply(v, x, mutable=["intermediates"])
  maps = [a for a in jax.tree.leaves(inter) if a.ndim == 4]
  assert maps and all(a.shape[1] == 12 for a in maps), [a.shape for a in maps]
  c.model.num_heads = 5
  with pytest.raises(ValueError, match="num_heads=5"):
    models.build(c.model, 32).init(jax.random.PRNGKey(0), x)
