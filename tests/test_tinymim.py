"""TinyMIM: the relation loss by hand, its alternative targets and inputs, the frozen teacher,
learning, resuming and sequential distillation on the embedded data."""
import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from helpers import load_config, tiny_config, losses as read_losses, train_with_frozen_run, resumed_losses, assert_same_losses
from mim_jax import masking, methods, optim, teachers, train
from mim_jax.methods import tinymim as tm
from mim_jax.models import vit


def one_device():
  return jax.devices()[:1]


@pytest.fixture(scope="module")
def teacher_dir(tmp_path_factory):
  """A workdir holding only the teacher's config.json (a 2-block, 64-wide, 2-head MAE ViT):
  enough to build the method; the weights come from a fake `teachers.load`."""
  d = tmp_path_factory.mktemp("teacher_cfg")
  with open(d / "config.json", "w") as f:
    f.write(tiny_config("mae").to_json_best_effort())
  return str(d)


def student(teacher, depth=1, **overrides):
  c = tiny_config("tinymim")
  c.model.depth = depth
  c.tinymim.teacher = teacher
  c.tinymim.update(overrides)
  return c


X = np.random.default_rng(1).normal(size=(2, 32, 32, 3)).astype(np.float32)


def random_params(init, *args, seed=0):
  """Parameters shaped as `init` makes them, drawn with numpy (LayerNorm scales near 1, the
  rest ~ N(0, 0.1^2), the qkv projection larger so the relations are far from uniform)."""
  rng = np.random.default_rng(seed)

  def draw(path, s):
    name = path[-1].key
    scale = 0.2 if name == "qkv_kernel" else 0.1
    return jnp.asarray((name == "scale") + scale * rng.normal(size=s.shape), s.dtype)
  return jax.tree_util.tree_map_with_path(draw, jax.eval_shape(init, jax.random.PRNGKey(0), *args))


@pytest.fixture(scope="module")
def teacher_params(teacher_dir):
  enc = methods.get(student(teacher_dir)).teacher[1]
  return random_params(enc.init, X, seed=2)["params"]


# ---------------------------------------------------------------------------------------------
# numpy by hand.

def np_embed(p, images, keep=None, mask=None):
  """The ViT's tokens before the blocks [B, 1 + L', D]: patch embedding (+ mask token), fixed
  sin-cos position, then the kept patches, cls first."""
  b = images.shape[0]
  x = images.reshape(b, 8, 4, 8, 4, 3).transpose(0, 1, 3, 2, 4, 5).reshape(b, 64, 48)
  x = x @ np.asarray(p["patch_embed"]["proj"]["kernel"]) + np.asarray(p["patch_embed"]["proj"]["bias"])
  if mask is not None:
    x = x * (1 - mask[..., None]) + np.asarray(p["mask_token"])[0] * mask[..., None]
  pe = vit.sincos_2d(x.shape[-1], 8, cls_token=True)
  x = x + pe[1:]
  if keep is not None:
    x = np.take_along_axis(x, keep[..., None], axis=1)
  cls = np.broadcast_to(np.asarray(p["cls_token"])[0] + pe[:1], (b, 1, x.shape[-1]))
  return np.concatenate([cls, x], axis=1)


def np_ln(x, p=None, eps=1e-6):
  y = (x - x.mean(-1, keepdims=True)) / np.sqrt(x.var(-1, keepdims=True) + eps)
  return y if p is None else y * np.asarray(p["scale"]) + np.asarray(p["bias"])


def np_qkv(x, blk):
  y = np_ln(x, blk["norm1"])
  qkv = y @ np.asarray(blk["attn"]["qkv_kernel"]) + np.asarray(blk["attn"]["qkv_bias"])
  d = x.shape[-1]
  return qkv[..., :d], qkv[..., d:2 * d], qkv[..., 2 * d:]


def np_relation(a, b, heads):
  """softmax(a_h b_h^T / sqrt(d_h)) per head, [B, heads, N, N]."""
  bsz, n, d = a.shape
  a, b = a.astype(np.float64), b.astype(np.float64)
  ah = a.reshape(bsz, n, heads, d // heads).transpose(0, 2, 1, 3)
  bh = b.reshape(bsz, n, heads, d // heads).transpose(0, 2, 1, 3)
  logits = ah @ bh.transpose(0, 1, 3, 2) / math.sqrt(d // heads)
  e = np.exp(logits - logits.max(-1, keepdims=True))
  return e / e.sum(-1, keepdims=True)


def np_kl(pt, ps):
  assert pt.min() > 0 and ps.min() > 0
  return float(np.mean(np.sum(pt * (np.log(pt) - np.log(ps)), axis=-1)))


def np_smooth_l1(p, t, beta=2.0):
  d = np.abs(p - t)
  return float(np.mean(np.where(d < beta, 0.5 * d * d / beta, d - 0.5 * beta)))


def fixed_mask(m):
  """Patches 0, 5, 9, ..., 61 kept (16 of 64) in image 0, a shuffled other set in image 1."""
  rng = np.random.default_rng(7)
  keep = np.stack([np.arange(0, 64, 4) + 1 * (np.arange(16) % 2), rng.permutation(64)[:16]]).astype(np.int32)
  mask = np.ones((2, 64), np.float32)
  np.put_along_axis(mask, keep, 0, axis=1)
  rest = np.stack([np.flatnonzero(mask[b]) for b in range(2)])
  restore = np.argsort(np.concatenate([keep, rest], 1), axis=1)
  sm = masking.ShuffleMask(jnp.asarray(keep), jnp.asarray(restore), jnp.asarray(mask))
  m.make_mask = lambda rng, batch: sm
  return keep, mask


def method_loss(m, params, teacher_p, images=X):
  return jax.jit(m.loss)(params, {"teacher": teacher_p}, images, jax.random.PRNGKey(3), 0)


# ---------------------------------------------------------------------------------------------
# The relation loss.

@pytest.fixture(scope="module")
def wide_teacher(tmp_path_factory):
  """A ViT-S-width teacher (384 wide, 6 heads, 2 blocks) for a 'tiny' student (192, 3 heads)."""
  d = tmp_path_factory.mktemp("wide_teacher_cfg")
  t = tiny_config("mae")
  t.model.variant = "small"
  with open(d / "config.json", "w") as f:
    f.write(t.to_json_best_effort())
  enc = methods.get(student(str(d))).teacher[1]
  return str(d), random_params(enc.init, X, seed=5)["params"]


@pytest.mark.parametrize("input_kind,teacher_block,wide", [
    ("raw", 1, False), ("raw", 2, True), ("visible", 1, False), ("mask_token", 1, False)])
def test_relation_loss_equals_hand_computation(teacher_dir, teacher_params, wide_teacher, input_kind,
                                               teacher_block, wide):
  # KL(teacher || student) of softmax(q k^T / sqrt(d)) and softmax(v v^T / sqrt(d)) per head,
  # summed over keys, averaged over batch, heads and queries; teacher: its block
  # `teacher_block` in its own heads; student: its last (only) block split into the TEACHER's
  # heads (wide: a 6-head teacher, a 3-head student split into 6 heads of 32, scale 1/sqrt(32)).
  # 'visible': only cls + kept tokens, on both sides; 'mask_token': the masked patch
  # embeddings replaced by the mask token.
  if wide:
    teacher_dir, teacher_params = wide_teacher
  c = student(teacher_dir, input=input_kind, teacher_block=teacher_block)
  if wide:
    c.model.variant = "tiny"
  m = methods.get(c)
  params = random_params(m.init, X, seed=1)
  keep = mask = None
  if input_kind != "raw":
    keep, mask = fixed_mask(m)
  loss, aux = method_loss(m, params, teacher_params)

  tp = jax.tree.map(np.asarray, teacher_params)
  if teacher_block == 1:
    t_in = np_embed(tp, X)
  else:
    _, inter = m.teacher[1].apply({"params": teacher_params}, X, mutable=["intermediates"])
    t_in = np.asarray(inter["intermediates"]["encoder"]["block_outputs"][0])
  tq, tk, tv = np_qkv(t_in, tp["encoder"][f"block{teacher_block - 1:02d}"])
  sp = jax.tree.map(np.asarray, params["encoder"])
  s_in = np_embed(sp, X, keep=keep if input_kind == "visible" else None,
                  mask=mask if input_kind == "mask_token" else None)
  sq, sk, sv = np_qkv(s_in, sp["encoder"]["block00"])
  if input_kind == "visible":
    ids = np.concatenate([np.zeros((2, 1), int), 1 + keep], 1)
    tq, tk, tv = (np.take_along_axis(t, ids[..., None], 1) for t in (tq, tk, tv))
    assert sq.shape == (2, 17, 64)
  h = 6 if wide else 2
  assert m.relation_heads == h and sq.shape[-1] == (192 if wide else 64)
  qk = np_kl(np_relation(tq, tk, h), np_relation(sq, sk, h))
  vv = np_kl(np_relation(tv, tv, h), np_relation(sv, sv, h))
  assert qk > 1e-3 and vv > 1e-3
  np.testing.assert_allclose(float(aux["qk_loss"]), qk, rtol=2e-4)
  np.testing.assert_allclose(float(aux["vv_loss"]), vv, rtol=2e-4)
  np.testing.assert_allclose(float(loss), qk + vv, rtol=2e-4)
  if input_kind != "raw":
    np.testing.assert_allclose(float(aux["mask_ratio"]), 0.75)


def test_relation_loss_is_zero_for_the_teacher_itself_and_teacher_gets_no_gradient(
    teacher_dir, teacher_params):
  # Same architecture (2 blocks, 64 wide, 2 heads), same weights, same view: loss 0.
  m = methods.get(student(teacher_dir, depth=2))
  params = {"encoder": teacher_params}
  grad = jax.jit(jax.value_and_grad(m.loss, argnums=(0, 1), has_aux=True))
  (loss, aux), (gp, gs) = grad(params, {"teacher": teacher_params}, X, jax.random.PRNGKey(0), 0)
  assert abs(float(loss)) < 1e-5 and abs(float(aux["qk_loss"])) < 1e-5
  # Perturbing the student makes it positive; the teacher never gets a gradient.
  moved = jax.tree.map(lambda a: a + 0.05 * jnp.sign(a), params)
  (loss2, _), (gp, gs) = grad(moved, {"teacher": teacher_params}, X, jax.random.PRNGKey(0), 0)
  assert float(loss2) > 1e-3
  assert all(float(jnp.abs(g).max()) == 0.0 for g in jax.tree.leaves(gs))
  assert float(jnp.abs(gp["encoder"]["encoder"]["block01"]["attn"]["qkv_kernel"]).max()) > 0
  # Like the official student (which stops at its last block's attention), the last MLP and
  # the final norm are not reached by the loss.
  assert float(jnp.abs(gp["encoder"]["encoder"]["block01"]["mlp"]["fc1"]["kernel"]).max()) == 0.0


def test_kl_matches_torch_definition_with_zero_targets():
  # KLDivLoss(log p_s, p_t).sum(-1).mean() with 0 log 0 = 0 where the teacher's p underflows.
  t = jnp.asarray([[[0.0, -200.0, 1.0]]])
  s = jnp.asarray([[[0.5, 0.1, -0.3]]])
  pt = np.exp(np.asarray(t) - np.log(np.exp(np.asarray(t, np.float64)).sum(-1, keepdims=True)))
  ps = np.exp(np.asarray(s) - np.log(np.exp(np.asarray(s, np.float64)).sum(-1, keepdims=True)))
  want = np.sum(np.where(pt > 0, pt * np.log(np.where(pt > 0, pt, 1) / ps), 0.0))
  np.testing.assert_allclose(float(tm.relation_kl(t[None], s[None])), want, rtol=1e-5)


# ---------------------------------------------------------------------------------------------
# The other targets (FD's feature distillation: linear projection, whitened target, smooth L1).

@pytest.mark.parametrize("target,teacher_block", [("feature", 1), ("cls", 0)])
def test_feature_and_cls_targets(teacher_dir, teacher_params, target, teacher_block):
  m = methods.get(student(teacher_dir, target=target, teacher_block=teacher_block))
  params = random_params(m.init, X, seed=4)
  loss, _ = method_loss(m, params, teacher_params)
  out, inter = m.teacher[1].apply({"params": teacher_params}, X, mutable=["intermediates"])
  # block 1 of 2: its output (before the final norm); the last block: the final-norm output.
  t = np.asarray(inter["intermediates"]["encoder"]["block_outputs"][0] if teacher_block == 1 else out)
  t = np_ln(t, eps=1e-5)
  s = np.asarray(m.encoder.apply({"params": params["encoder"]}, X))
  pred = s @ np.asarray(params["head"]["kernel"]) + np.asarray(params["head"]["bias"])
  assert pred.shape == (2, 65, 64)
  if target == "cls":
    pred, t = pred[:, :1], t[:, :1]
  np.testing.assert_allclose(float(loss), np_smooth_l1(pred, t), rtol=1e-4)


def test_views_share_the_crop_and_jitter_only_the_student(teacher_dir):
  c = student(teacher_dir)
  images = jnp.asarray(np.random.default_rng(0).integers(0, 256, (4, 32, 32, 3)), jnp.uint8)
  views = lambda m: jax.jit(lambda r, x: m.preprocess(r, x, c.input, True))  # noqa: E731
  v = views(methods.get(c))(jax.random.PRNGKey(0), images)
  assert float(jnp.abs(v["student"] - v["teacher"]).max()) > 0.1
  c.tinymim.student_jitter = ()
  w = views(methods.get(c))(jax.random.PRNGKey(0), images)
  np.testing.assert_array_equal(w["student"], w["teacher"])
  np.testing.assert_array_equal(w["teacher"], v["teacher"])
  # 8-bit levels, as PIL holds the crop.
  lv = np.asarray(w["teacher"]) * np.asarray(c.input.std) + np.asarray(c.input.mean)
  np.testing.assert_allclose(lv * 255, np.round(lv * 255), atol=1e-3)


# ---------------------------------------------------------------------------------------------
# Training: learning, the frozen teacher, resuming, sequential distillation.

def fake_run(teacher_dir, teacher_params):
  tcfg = train.load_run_config(teacher_dir)
  return teachers.FrozenRun(tcfg, methods.get(tcfg), {"encoder": jax.tree.map(np.asarray, teacher_params)},
                            {}, 100)


def train_config(teacher):
  c = student(teacher)
  c.input.batch_size = 8
  c.total_steps = 6
  c.ckpt_every = 3
  c.tinymim.student_jitter = ()    # (the views are checked above; a smaller program to compile)
  c.optim.warmup_epochs = 0
  c.optim.base_lr = 0.1            # 0.1 x 8/256 = 3e-3 peak: a few steps must move the loss
  c.evals = {}
  return c


@pytest.fixture(scope="module")
def trained(tmp_path_factory, teacher_dir, teacher_params, compilation_cache):
  d = str(tmp_path_factory.mktemp("tinymim_a"))
  train_with_frozen_run(train_config(teacher_dir), d, fake_run(teacher_dir, teacher_params),
                        devices=one_device())
  return d


def test_training_lowers_the_loss_and_keeps_the_teacher_frozen(trained, teacher_params):
  la = read_losses(trained)
  assert sorted(la) == [1, 2, 3, 4, 5, 6]
  assert la[6] < 0.9 * la[1], la
  run = teachers.load(trained)
  for got, want in zip(jax.tree.leaves(run.method_state["teacher"]), jax.tree.leaves(teacher_params)):
    np.testing.assert_array_equal(got, np.asarray(want))


def test_parameters_without_gradient_keep_their_initialisation(trained, teacher_dir, teacher_params):
  """The relation loss does not reach the last block's attn/proj, layer scales, norm2, MLP and
  the final norm: like PyTorch's AdamW skipping grad-None parameters, they are not decayed
  (weight decay 0.05 would shrink them) and stay at their initial values; everything else moves."""
  from mim_jax import checkpointing
  c = train_config(teacher_dir)
  assert c.optim.weight_decay > 0
  with pytest.MonkeyPatch.context() as mp:
    mp.setattr(teachers, "load", lambda path, *a, **k: fake_run(teacher_dir, teacher_params))
    init = jax.device_get(train.Trainer.create(c, devices=one_device()).state["params"]["encoder"])
    tr = train.Trainer.create(c, devices=one_device())
    ckpt = checkpointing.Checkpointer(trained, keep=5)
    tr.restore(ckpt, ckpt.latest_step(), with_data=False)
    ckpt.close()
  done = jax.device_get(tr.state["params"]["encoder"])
  last = f"block{len([k for k in init['encoder'] if k.startswith('block')]) - 1:02d}"
  frozen = {f"encoder/{last}/attn/proj", f"encoder/{last}/mlp", f"encoder/{last}/norm2",
            "encoder/norm"}
  moved = kept = 0
  for path, a in jax.tree_util.tree_flatten_with_path(init)[0]:
    name = "/".join(k.key for k in path)
    b = jax.tree_util.tree_flatten_with_path(done)[0]
    b = dict(("/".join(k.key for k in p), v) for p, v in b)[name]
    if any(name.startswith(f) for f in frozen):
      np.testing.assert_array_equal(b, a, err_msg=name)
      kept += 1
    elif name.endswith("kernel"):
      assert not np.array_equal(a, b), name
      moved += 1
  assert kept >= 8 and moved >= 2, (kept, moved)    # patch embedding, qkv (a 1-block student)


def test_resumed_run_equals_uninterrupted(trained, tmp_path, teacher_dir, teacher_params):
  c, b = train_config(teacher_dir), str(tmp_path / "b")
  fake = fake_run(teacher_dir, teacher_params)
  lb = resumed_losses(c, b, stop_after=3, devices=one_device(),
                      train_fn=lambda cfg, w, **kw: train_with_frozen_run(cfg, w, fake, **kw))
  assert_same_losses(read_losses(trained), lb, 6)


def test_sequential_distillation_reads_a_tinymim_run_as_teacher(trained, teacher_params):
  # B -> S -> T: the next run names this TinyMIM run's workdir as its teacher; the real
  # teachers.load reads its config (a TinyMIM student: 1 block, 64 wide, 2 heads) and its
  # trained params['encoder'].
  m = methods.get(train_config(trained))
  ext = m.external_state()
  first = teachers.load(trained)
  assert first.step == 6 and m.teacher[3] == 1 and m.relation_heads == 2
  for got, want in zip(jax.tree.leaves(ext["teacher"]), jax.tree.leaves(first.params["encoder"])):
    np.testing.assert_array_equal(got, want)
  # ... which is not the initial teacher's encoder, and serves as a target.
  assert jax.tree.structure(ext["teacher"]) != jax.tree.structure(teacher_params)
  params = random_params(m.init, X, seed=6)
  loss, aux = method_loss(m, params, jax.tree.map(jnp.asarray, ext["teacher"]))
  assert np.isfinite(float(loss)) and float(loss) > 0


# ---------------------------------------------------------------------------------------------
# Errors and presets.

def test_missing_teacher_is_a_one_line_error(tmp_path):
  with pytest.raises(train.TrainingError, match=r"config.tinymim.teacher is empty.*python -m mim_jax.main") as e:
    methods.get(student("")).external_state()
  assert "\n" not in str(e.value)
  with pytest.raises(train.TrainingError, match="not a mim_jax workdir.*--config.tinymim.teacher="):
    methods.get(student(str(tmp_path / "nowhere"))).external_state()


def test_teacher_block_out_of_range_is_an_error(teacher_dir):
  with pytest.raises(train.TrainingError, match="teacher_block=3: the teacher has 2 blocks"):
    methods.get(student(teacher_dir, teacher_block=3)).teacher  # noqa: B018


def test_configs_carry_the_official_settings():
  c = load_config("tinymim", "imagenet")
  t = c.tinymim
  assert (t.target, t.input, t.teacher_block, tuple(t.student_jitter)) == (
      "relation", "raw", 0, (0.4, 0.4, 0.4))
  assert (c.model.variant, c.model.patch_size, c.input.image_size, c.model.drop_path) == ("tiny", 16, 224, 0.1)
  assert (c.total_epochs, c.optim.warmup_epochs, c.optim.b1, c.optim.b2, c.optim.weight_decay) == (
      300, 15, 0.9, 0.95, 0.05)
  assert optim.peak_lr(c.optim, c.input.batch_size) == pytest.approx(1.5e-4 * 4096 / 256)
  assert load_config("tinymim", "imagenet_small").model.variant == "small"
  b = load_config("tinymim", "imagenet_base")
  assert (b.model.variant, b.tinymim.teacher_block) == ("base", 18)
  c10, mae10 = load_config("tinymim", "cifar10"), load_config("mae", "cifar10")
  assert (c10.model.variant, c10.model.depth, c10.model.patch_size) == (
      mae10.model.variant, mae10.model.depth, mae10.model.patch_size)


def test_student_drop_path_is_constant_but_the_last_block():
  """models_tinymim.py: drop path 0.1 in every block but the last, none there (not timm's
  linear ramp). Behaviour: with block 0 made the identity (zero parameters), a 2-block encoder
  in training mode equals its evaluation under 'constant_but_last' (block 1 is never dropped)
  but not under 'linear' (block 1 has the full rate)."""
  assert vit.drop_path_rates(4, 0.1, "constant_but_last") == [0.1, 0.1, 0.1, 0.0]
  np.testing.assert_allclose(vit.drop_path_rates(4, 0.1, "linear"), [0, 0.1 / 3, 0.2 / 3, 0.1])
  x = jax.random.normal(jax.random.PRNGKey(0), (8, 5, 16))
  for rule, same in (("constant_but_last", True), ("linear", False)):
    enc = vit.Encoder(2, 2, drop_path=0.5, drop_path_rule=rule)
    p = enc.init(jax.random.PRNGKey(1), x)["params"]
    p = {**p, "block00": jax.tree.map(jnp.zeros_like, p["block00"])}
    train_out = enc.apply({"params": p}, x, None, False, rngs={"dropout": jax.random.PRNGKey(2)})
    eval_out = enc.apply({"params": p}, x)
    assert np.array_equal(np.asarray(train_out), np.asarray(eval_out)) == same, rule
  c = tiny_config("tinymim")
  c.tinymim.teacher = "/unused"             # the teacher is read lazily; the student is built
  assert methods.get(c).encoder.drop_path_rule == "constant_but_last"
