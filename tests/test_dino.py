"""DINO: DINOLoss against a numpy hand computation, the multi-crop wiring (teacher on the global
crops only; the ResNet's BatchNorm per resolution group, the head's over all crops), the centre
update, the teacher-temperature schedule, the frozen last layer, and training on a ViT and a
ResNet."""
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from helpers import load_config
from je_helpers import method_and_state, tiny_je_config
from mim_jax import models, train
from mim_jax.methods import dino, ibot


def softmax(x):
  e = np.exp(x - x.max(-1, keepdims=True))
  return e / e.sum(-1, keepdims=True)


def log_softmax(x):
  z = x - x.max(-1, keepdims=True)
  return z - np.log(np.exp(z).sum(-1, keepdims=True))


def hand_dino_loss(student_output, teacher_output, center, temp, ncrops, student_temp=0.1):
  """main_dino.py DINOLoss.forward, loop for loop, in float64 numpy: outputs are the crops'
  batches concatenated (crop-major), the teacher's the 2 global crops'."""
  student_out = np.split(student_output / student_temp, ncrops)
  teacher_out = np.split(softmax((teacher_output - center) / temp), 2)
  total, n = 0.0, 0
  for iq, q in enumerate(teacher_out):
    for v in range(len(student_out)):
      if v == iq:
        continue
      total += np.mean(np.sum(-q * log_softmax(student_out[v]), axis=-1))
      n += 1
  return total / n


def test_dino_loss_equals_the_official_loss_by_hand():
  rng = np.random.default_rng(0)
  b, k, ncrops = 3, 7, 4                      # 2 global + 2 local crops
  s = rng.normal(size=(ncrops * b, k))
  t = rng.normal(size=(2 * b, k))
  center = rng.normal(size=(1, k)) * 0.3
  got, parts = ibot.dino_loss(jnp.asarray(s.reshape(ncrops, b, k), jnp.float32),
                              jnp.asarray(t.reshape(2, b, k), jnp.float32),
                              jnp.asarray(center, jnp.float32), 0.05, 0.1)
  want = hand_dino_loss(s, t, center, 0.05, ncrops)
  np.testing.assert_allclose(float(got), want, rtol=1e-5)
  # Centring and sharpening matter, and the same-crop pairs are skipped.
  assert abs(hand_dino_loss(s, t, 0 * center, 0.05, ncrops) - want) > 1e-3
  assert abs(hand_dino_loss(s, t, center, 0.07, ncrops) - want) > 1e-3
  same = np.mean([np.mean(np.sum(-softmax((t[q * b:(q + 1) * b] - center) / 0.05)
                                 * log_softmax(s[q * b:(q + 1) * b] / 0.1), -1)) for q in range(2)])
  assert abs((want * 6 + 2 * same) / 8 - want) > 1e-4
  np.testing.assert_allclose(np.asarray(parts["teacher_probs"]).reshape(2 * b, k),
                             softmax((t - center) / 0.05), rtol=1e-5, atol=1e-7)


def test_ibot_cls_term_is_dino_loss():
  rng = np.random.default_rng(1)
  s, t = rng.normal(size=(4, 3, 6)), rng.normal(size=(2, 3, 6))
  sp, tp = rng.normal(size=(2, 3, 5, 6)), rng.normal(size=(2, 3, 5, 6))
  masks = (rng.random((2, 3, 5)) > 0.5).astype(np.int32)
  c1, c2 = rng.normal(size=(1, 6)), rng.normal(size=(1, 1, 6))
  _, parts = ibot.ibot_loss(*[jnp.asarray(x, jnp.float32) for x in (s, sp, t, tp)], masks,
                            jnp.asarray(c1, jnp.float32), jnp.asarray(c2, jnp.float32), 0.04, 0.05)
  np.testing.assert_allclose(float(parts["loss_cls"]),
                             hand_dino_loss(s.reshape(12, 6), t.reshape(6, 6), c1, 0.04, 4), rtol=1e-5)


def vit_config(**overrides):
  """je_helpers.tiny_je_config('dino') (the default preset's ViT at 16 px) with one block."""
  return tiny_je_config("dino", **{"model.depth": 1, **overrides})


def resnet_config(**overrides):
  """configs/dino.py:cifar10_resnet shrunk as je_helpers.tiny_je_config shrinks a ResNet, with
  BatchNorm in the head (--use_bn_in_head)."""
  return tiny_je_config("dino", "cifar10_resnet", **{"dino.use_bn_in_head": True, **overrides})


@pytest.fixture(scope="module")
def vit_setup():
  """(method, params, state, views) of the one-block ViT: teacher temperature 0.04 -> 0.07
  over 3 epochs, gradients clipped at 0.01 per parameter, last layer frozen for 1 epoch."""
  return method_and_state(vit_config(**{"dino.warmup_teacher_temp_epochs": 3,
                                        "dino.teacher_temp": 0.07, "dino.clip_grad": 0.01,
                                        "dino.freeze_last_layer": 1.0}))


def test_vit_loss_is_dinoloss_of_the_multi_crop_outputs(vit_setup):
  """The teacher sees the 2 global crops, the student every crop; the loss is DINOLoss of
  those outputs with the state's centre and the epoch's temperature."""
  m, params, state, views = vit_setup
  state = {**state, "center": jax.random.normal(jax.random.PRNGKey(5), state["center"].shape)}
  assert m.vit and views["global"].shape[1] == 2 and views["local"].shape[1] == 2
  b = views["global"].shape[0]
  gv, lv = dino.view_major(views["global"]), dino.view_major(views["local"])
  t_out, _ = jax.jit(lambda t: m.multi_crop_forward(t, {}, [gv], backbone_train=False))(state["teacher"])
  s_out, _ = jax.jit(lambda p: m.multi_crop_forward(p, {}, [gv, lv], backbone_train=True,
                                                    rng=jax.random.PRNGKey(1)))(params)
  step = m.run_steps()[0] + 1                               # epoch 1: linspace(.04, .07, 3)[1]
  loss, aux = jax.jit(m.loss)(params, state, views, jax.random.PRNGKey(1), jnp.int32(step))
  np.testing.assert_allclose(float(aux["teacher_temp"]), 0.055, rtol=1e-6)
  want = hand_dino_loss(np.asarray(s_out, np.float64), np.asarray(t_out, np.float64),
                        np.asarray(state["center"]), 0.055, 4)
  np.testing.assert_allclose(float(loss), want, rtol=2e-5)
  np.testing.assert_allclose(np.asarray(aux["state_stats"]["center"]),
                             np.asarray(t_out).mean(0, keepdims=True), rtol=1e-5, atol=1e-7)
  assert t_out.shape[0] == 2 * b and s_out.shape[0] == 4 * b
  for key in ("collapse_ratio", "teacher_entropy_cls", "teacher_batch_entropy_cls", "kl_cls"):
    assert np.isfinite(float(aux[key])), key


def test_resnet_batchnorm_per_resolution_group_and_the_teachers_own_statistics():
  """MultiCropWrapper: the backbone's BatchNorm over the global crops together, then over the
  local crops together (running statistics moved twice), the head's over all crops; the
  teacher's statistics (its global crops only) kept as 'teacher_*' modules."""
  c = resnet_config()
  c.dino.views.local_size = 8
  m, params, state, views = method_and_state(c)
  assert not m.vit and m.head.use_bn
  cols = state["collections"]
  assert {"encoder", "head", "teacher_encoder", "teacher_head"} <= set(cols["batch_stats"])
  gv, lv = dino.view_major(views["global"]), dino.view_major(views["local"])
  _, aux = jax.jit(m.loss)(params, state, views, jax.random.PRNGKey(0), jnp.int32(0))
  new = aux["collections"]["batch_stats"]

  def enc(p, stats, x):
    out, upd = models.forward(m.encoder, {"params": p, "batch_stats": stats}, x, train=True,
                              pooling="mean")
    return out["pooled"], upd["batch_stats"]

  f1, s1 = enc(params["encoder"], cols["batch_stats"]["encoder"], gv)
  f2, s2 = enc(params["encoder"], s1, lv)
  jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-6), new["encoder"], s2)
  _, head_upd = m.head.apply({"params": params["head"], "batch_stats": cols["batch_stats"]["head"]},
                             jnp.concatenate([f1, f2]), patches=False, train=True,
                             mutable=["batch_stats"])
  jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-6),
               new["head"], head_upd["batch_stats"])
  _, t1 = enc(state["teacher"]["encoder"], cols["batch_stats"]["teacher_encoder"], gv)
  jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-6),
               new["teacher_encoder"], t1)
  assert not np.allclose(new["encoder"]["bn1"]["running_mean"], t1["bn1"]["running_mean"])


def test_centre_moves_by_point_nine_and_the_teacher_by_the_cosine_momentum(vit_setup):
  m, params, state, _ = vit_setup
  batch_center = jax.random.normal(jax.random.PRNGKey(2), state["center"].shape)
  state = {**state, "center": jnp.full_like(state["center"], 0.5)}
  online = jax.tree.map(lambda x: x + 1.0, params)
  step = 7
  new = m.update_state(online, state, jnp.int32(step), {"center": batch_center})
  np.testing.assert_allclose(new["center"], 0.9 * 0.5 + 0.1 * np.asarray(batch_center), rtol=1e-6)
  total = m.run_steps()[1]
  mom = 1 + 0.5 * (0.99 - 1) * (1 + np.cos(np.pi * step / total))   # cosine_scheduler(0.99, 1)
  leaf = lambda t: np.asarray(t["head"]["fc0"]["kernel"])
  np.testing.assert_allclose(leaf(new["teacher"]), mom * leaf(state["teacher"]) + (1 - mom) * leaf(online),
                             rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("epochs,warmup", [(3, 0.04), (0, 0.04), (1, 0.03)])
def test_teacher_temperature_is_the_official_epoch_schedule(epochs, warmup):
  c = vit_config(**{"dino.warmup_teacher_temp_epochs": epochs,
                                "dino.warmup_teacher_temp": warmup, "dino.teacher_temp": 0.07})
  from mim_jax import methods
  m = methods.get(c)
  spe = m.run_steps()[0]
  nepochs = 6
  official = np.concatenate((np.linspace(warmup, 0.07, epochs), np.ones(nepochs - epochs) * 0.07))
  for step in (0, spe - 1, spe, 2 * spe + 3, 5 * spe):
    np.testing.assert_allclose(float(m.teacher_temp(step)), official[step // spe], rtol=1e-6)


def test_gradients_are_clipped_per_parameter_and_the_last_layer_cancelled_in_the_first_epoch(vit_setup):
  m, params, state, views = vit_setup
  spe = m.run_steps()[0]
  grad_fn = jax.jit(jax.grad(lambda p, step: m.loss(p, state, views, jax.random.PRNGKey(0), step)[0]))
  grad = lambda step: grad_fn(params, jnp.int32(step))
  g0, g1 = grad(0), grad(spe)
  assert float(jnp.max(jnp.abs(g0["head"]["last_layer"]["kernel_v"]))) == 0.0
  assert float(jnp.max(jnp.abs(g1["head"]["last_layer"]["kernel_v"]))) > 0.0
  norms = [float(jnp.linalg.norm(x)) for x in jax.tree.leaves(g1)]
  assert max(norms) <= 0.01 * (1 + 1e-4) and max(norms) > 0.009
  assert m.param_groups() == ((r"^head/last_layer", {"frozen_until_step": spe}),)


@pytest.mark.parametrize("backbone", ["vit", "resnet"])
def test_trains_two_steps_with_the_last_layer_frozen(backbone, compilation_cache):
  """Two trainer steps: finite losses, the centre, the teacher and (ResNet) every BatchNorm's
  running statistics move; head/last_layer is untouched inside its frozen steps (3 here)."""
  c = vit_config() if backbone == "vit" else resnet_config()
  assert models.name_of(c.model) == backbone
  from mim_jax import methods
  c.dino.freeze_last_layer = 3 / methods.get(c).run_steps()[0]
  tr = train.Trainer.create(c, devices=jax.devices()[:1])
  s0 = jax.device_get(tr.state["method_state"])
  p0 = jax.device_get(tr.state["params"])
  out = []
  for _ in range(2):
    tr.state, metrics = tr.step_fn(tr.state, tr.next_batch())
    out.append(float(metrics["loss"]))
  s2 = jax.device_get(tr.state["method_state"])
  p2 = jax.device_get(tr.state["params"])
  assert all(np.isfinite(out)), out
  np.testing.assert_array_equal(p0["head"]["last_layer"]["kernel_v"], p2["head"]["last_layer"]["kernel_v"])
  assert not np.array_equal(p0["head"]["fc0"]["kernel"], p2["head"]["fc0"]["kernel"])
  assert not np.allclose(s0["center"], s2["center"])
  assert not np.array_equal(s0["teacher"]["head"]["fc0"]["kernel"], s2["teacher"]["head"]["fc0"]["kernel"])
  if backbone == "resnet":
    for name in ("encoder", "teacher_encoder", "head", "teacher_head"):
      a = jax.tree.leaves(s0["collections"]["batch_stats"][name])
      b = jax.tree.leaves(s2["collections"]["batch_stats"][name])
      assert not all(np.array_equal(x, y) for x, y in zip(a, b)), name


def test_presets_carry_the_official_recipes():
  v = load_config("dino", "imagenet")
  assert (v.model.name, v.model.variant, v.model.patch_size, v.input.batch_size, v.total_epochs) == (
      "vit", "small", 16, 1024, 300)
  assert (v.dino.out_dim, v.dino.teacher_temp, v.dino.warmup_teacher_temp_epochs,
          v.dino.norm_last_layer, v.dino.views.num_local, v.dino.views.local_size) == (
              65536, 0.07, 30, False, 8, 96)
  assert (v.optim.name, v.optim.base_lr, v.optim.weight_decay, v.optim.weight_decay_end) == (
      "adamw", 5e-4, 0.04, 0.4)
  assert v.model.drop_path == 0.1 and v.pooling == "cls" and v.evals.knn.k == 20
  r = load_config("dino", "imagenet_resnet")
  # The README's ResNet-50 command: SGD 0.03, wd 1e-4 constant, crops 0.14-1 / 0.05-0.14.
  assert (r.model.name, r.model.depth, r.input.batch_size, r.total_epochs, r.optim.name,
          r.optim.base_lr, r.optim.momentum) == ("resnet", 50, 512, 100, "sgd", 0.03, 0.9)
  assert (r.optim.weight_decay, r.optim.weight_decay_schedule) == (1e-4, "constant")
  np.testing.assert_allclose(r.optim.min_lr * r.input.batch_size / 256, 1e-6)
  assert not r.dino.use_bn_in_head and tuple(r.dino.views.global_scale) == (0.14, 1.0)
  assert tuple(r.dino.views.local_scale) == (0.05, 0.14) and r.dino.teacher_temp == 0.04
  d = load_config("dino")
  assert (d.dino.views.num_global, d.dino.views.num_local, d.dino.views.local_size) == (2, 2, 16)
