"""Teacher-feature MIM (MILAN, EVA-01, MVP): losses by hand, attentive masking, the prompting
decoder, the frozen teacher, learning and resuming on the embedded data."""
import math
import os
import shutil

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from helpers import load_config, tiny_config, losses as read_losses, assert_same_losses
from mim_jax import masking, methods, optim, teachers, train
from mim_jax.methods import feature_mim as fm
from mim_jax.models import vit


def one_device():
  """The training runs here are tiny: on one CPU device they compile and run faster."""
  return jax.devices()[:1]


# ---------------------------------------------------------------------------------------------
# Set-up: a teacher workdir holding only config.json is enough to build the method (the teacher
# module and its width); the trained teacher is made once for the integration tests.

@pytest.fixture(scope="module")
def teacher_config_dir(tmp_path_factory):
  d = tmp_path_factory.mktemp("teacher_cfg")
  with open(d / "config.json", "w") as f:
    f.write(tiny_config("mae").to_json_best_effort())
  return str(d)


@pytest.fixture(scope="module")
def trained_teacher(tmp_path_factory):
  d = str(tmp_path_factory.mktemp("teacher_run"))
  c = tiny_config("mae", total_steps=2)
  c.evals = {}
  train.train_and_evaluate(c, d, progress=False, devices=one_device())
  return d


def student(name, teacher, **fm_overrides):
  c = tiny_config(name)
  c.model.depth = 1
  c.feature_mim.teacher = teacher
  if name == "milan":
    c.feature_mim.decoder = dict(kind="prompting", width=32, depth=1, heads=2)
  c.feature_mim.update(fm_overrides)
  return c


X = np.random.default_rng(1).normal(size=(2, 32, 32, 3)).astype(np.float32)


def random_params(init, *args, seed=0):
  """Parameters shaped as `init` makes them, drawn with numpy (no compilation): any values
  serve a hand computation. LayerNorm scales near 1, everything else ~ N(0, 0.1^2)."""
  rng = np.random.default_rng(seed)
  shapes = jax.eval_shape(init, jax.random.PRNGKey(0), *args)
  return jax.tree_util.tree_map_with_path(
      lambda path, s: jnp.asarray((path[-1].key == "scale") + 0.1 * rng.normal(size=s.shape), s.dtype),
      shapes)


@pytest.fixture(scope="module")
def teacher_params(teacher_config_dir):
  enc = methods.get(student("milan", teacher_config_dir)).teacher[1]
  return random_params(enc.init, X, seed=2)["params"]


def built(c, teacher_params):
  """(method, params, state holding a randomly initialised teacher)."""
  m = methods.get(c)
  params = random_params(m.init, X)
  return m, params, {**m.init_state(params), "teacher": teacher_params}


def teacher_view(m):
  """The batch in the teacher run's normalisation (EVA's student uses CLIP's mean and std)."""
  tcfg = m.teacher[0]
  pixels = np.asarray(X) * np.asarray(m.config.input.std) + np.asarray(m.config.input.mean)
  return jnp.asarray((pixels - np.asarray(tcfg.input.mean)) / np.asarray(tcfg.input.std), jnp.float32)


def loss_and_state_grads(m, params, state):
  """The method's loss and its gradient w.r.t. the state (which holds the teacher)."""
  (loss, aux), grads = jax.jit(jax.value_and_grad(m.loss, argnums=1, has_aux=True))(
      params, state, X, jax.random.PRNGKey(3), 0)
  return float(loss), aux, grads


# ---------------------------------------------------------------------------------------------
# Losses by hand.

def np_cos(p, t):
  return (p * t).sum(-1) / (np.linalg.norm(p, axis=-1) * np.linalg.norm(t, axis=-1))


def np_loss(kind, p, t, w, beta=1.0):
  if kind == "cosine":
    per = -np_cos(p, t)
  elif kind == "mse_normalised":
    pu = p / np.linalg.norm(p, axis=-1, keepdims=True)
    tu = t / np.linalg.norm(t, axis=-1, keepdims=True)
    per = ((pu - tu) ** 2).sum(-1)
  else:
    d = np.abs(p - t)
    per = np.where(d < beta, 0.5 * d ** 2 / beta, d - 0.5 * beta).mean(-1)
  return float((per * w).sum() / w.sum())


@pytest.mark.parametrize("kind", ["cosine", "mse_normalised", "smooth_l1"])
@pytest.mark.parametrize("loss_on", ["masked", "all"])
def test_objective_equals_hand_computation(teacher_config_dir, kind, loss_on):
  m = methods.get(student("milan", teacher_config_dir, loss=kind, loss_on=loss_on, smooth_l1_beta=0.5))
  rng = np.random.default_rng(0)
  pred = rng.normal(size=(2, 5, 6)).astype(np.float32)
  target = rng.normal(size=(2, 5, 6)).astype(np.float32) * 2
  mask = np.array([[1, 0, 1, 0], [0, 0, 1, 1]], np.float32)
  w = np.ones((2, 5)) if loss_on == "all" else np.concatenate([np.zeros((2, 1)), mask], 1)
  got, cos = m.objective(jnp.asarray(pred), jnp.asarray(target), jnp.asarray(mask))
  np.testing.assert_allclose(float(got), np_loss(kind, pred, target, w, beta=0.5), rtol=1e-5)
  np.testing.assert_allclose(float(cos), -np_loss("cosine", pred, target, w), rtol=1e-5)


def test_layernorm_target(teacher_config_dir):
  m = methods.get(student("milan", teacher_config_dir, loss="smooth_l1", target_norm="layernorm"))
  rng = np.random.default_rng(1)
  pred, target = rng.normal(size=(2, 5, 6)), 3 + 2 * rng.normal(size=(2, 5, 6))
  mask = np.array([[1, 0, 1, 0], [0, 0, 1, 1]], np.float32)
  t = (target - target.mean(-1, keepdims=True)) / np.sqrt(target.var(-1, keepdims=True) + 1e-5)
  got, _ = m.objective(jnp.asarray(pred, jnp.float32), jnp.asarray(target, jnp.float32), jnp.asarray(mask))
  np.testing.assert_allclose(float(got), np_loss("smooth_l1", pred, t, np.ones((2, 5))), rtol=1e-5)


def test_eva_loss_with_fixed_masks_and_teacher_features(teacher_config_dir, teacher_params):
  # EVA: minus the cosine between lm_head(encoder tokens) and the teacher's patch features,
  # averaged over the masked patches of the batch (counts differ between images).
  m, params, state = built(student("eva", teacher_config_dir), teacher_params)
  mask = np.zeros((2, 64), np.float32)
  mask[0, [1, 2, 9, 10]] = 1
  mask[1, [30, 31, 38, 39, 40, 47]] = 1
  m.make_mask = lambda rng, b, importance=None: masking.ShuffleMask(None, None, jnp.asarray(mask))
  loss, aux, gs = loss_and_state_grads(m, params, state)
  tokens, target = jax.jit(lambda p, t: (m.encoder.apply({"params": p}, X, mask=jnp.asarray(mask)),
                                         m.teacher[1].apply({"params": t}, teacher_view(m))))(
                                             params["encoder"], teacher_params)
  pred = np.asarray(tokens) @ np.asarray(params["head"]["kernel"]) + np.asarray(params["head"]["bias"])
  sel = mask.astype(bool)
  want = -np.mean(np_cos(pred[:, 1:][sel], np.asarray(target)[:, 1:][sel]))
  np.testing.assert_allclose(loss, want, rtol=1e-5)
  np.testing.assert_allclose(float(aux["mask_ratio"]), 10 / 128)
  # The teacher receives no gradient (its outputs are cut from the graph).
  assert all(float(jnp.abs(a).max()) == 0.0 for a in jax.tree.leaves(gs["teacher"]))


def test_milan_loss_with_attentive_masks_and_teacher_features(teacher_config_dir, teacher_params):
  # MILAN: the kept patches are ranked by the teacher's LAST block cls-to-patch attention,
  # averaged over heads ('topk' here so the mask is known: int(64 * .25) = 16 kept); the loss
  # is 2 - 2 cos of the unit vectors over ALL tokens (cls, visible and masked).
  m, params, state = built(student("milan", teacher_config_dir, attentive_sampling="topk"), teacher_params)
  loss, _, gs = loss_and_state_grads(m, params, state)
  enc = m.teacher[1]
  target, inter = jax.jit(lambda t: enc.apply({"params": t}, teacher_view(m), mutable=["intermediates"]))(
      teacher_params)
  attn = np.asarray(inter["intermediates"]["encoder"]["block01"]["attn"]["attention"][0])  # 2 blocks
  importance = attn[:, :, 0, 1:].mean(1)
  perm = np.argsort(-importance, axis=1, kind="stable")
  mask = np.ones((2, 64), np.float32)
  np.put_along_axis(mask, perm[:, :16], 0, axis=1)
  sm = masking.ShuffleMask(jnp.asarray(perm[:, :16]), jnp.asarray(np.argsort(perm, axis=1)),
                           jnp.asarray(mask))
  pred = np.asarray(jax.jit(lambda p: m.forward(p, X, sm, None, train=False))(params))
  assert pred.shape == (2, 65, 64)
  np.testing.assert_allclose(loss, np.mean(2 - 2 * np_cos(pred, np.asarray(target))), rtol=1e-5)
  assert all(float(jnp.abs(a).max()) == 0.0 for a in jax.tree.leaves(gs["teacher"]))


# ---------------------------------------------------------------------------------------------
# Attentive masking (MILAN).

def test_importance_is_the_head_averaged_cls_row():
  a = jax.nn.softmax(jax.random.normal(jax.random.PRNGKey(0), (2, 3, 5, 5)), axis=-1)
  want = np.asarray(a)[:, :, 0, 1:].mean(1)
  np.testing.assert_allclose(fm.cls_importance(a), want, rtol=1e-6)


def test_topk_keeps_exactly_the_highest_ranked_patches():
  imp = jnp.asarray([[0.05, 0.30, 0.01, 0.20, 0.02, 0.25, 0.03, 0.14],
                     [0.50, 0.01, 0.02, 0.03, 0.04, 0.05, 0.06, 0.29]])
  sm = fm.attentive_shuffle_mask(jax.random.PRNGKey(0), imp, 0.75, "topk")   # keep int(8 * .25) = 2
  np.testing.assert_array_equal(sm.keep_ids, [[1, 5], [0, 7]])
  want = np.ones((2, 8))
  want[0, [1, 5]] = want[1, [0, 7]] = 0
  np.testing.assert_array_equal(sm.mask, want)
  # restore_ids un-shuffles: the kept tokens, then the rest, go back to their positions.
  shuffle = np.argsort(np.asarray(sm.restore_ids), axis=1)
  np.testing.assert_array_equal(shuffle[:, :2], sm.keep_ids)


def test_multinomial_keeps_the_attended_patches_of_a_peaked_map():
  imp = np.full((256, 16), 1e-9, np.float32)
  imp[:, [2, 7, 11, 12]] = 1.0
  sm = fm.attentive_shuffle_mask(jax.random.PRNGKey(1), jnp.asarray(imp), 0.75, "multinomial")
  assert np.all(np.sort(np.asarray(sm.keep_ids), axis=1) == [2, 7, 11, 12])


def test_multinomial_is_sampling_without_replacement():
  # torch.multinomial(w, L, replacement=False): the first two draws form the kept pair, with
  # P({i, j}) = w_i w_j / (1 - w_i) + w_j w_i / (1 - w_j) for normalised w.
  w = np.array([0.1, 0.2, 0.3, 0.4])
  n = 40_000
  sm = fm.attentive_shuffle_mask(jax.random.PRNGKey(2), jnp.tile(jnp.asarray(w, jnp.float32), (n, 1)),
                                 0.5, "multinomial")
  kept = np.sort(np.asarray(sm.keep_ids), axis=1)
  for i in range(4):
    for j in range(i + 1, 4):
      p = w[i] * w[j] / (1 - w[i]) + w[j] * w[i] / (1 - w[j])
      freq = np.mean((kept[:, 0] == i) & (kept[:, 1] == j))
      assert abs(freq - p) < 4 * math.sqrt(p * (1 - p) / n), (i, j, freq, p)


def test_block_masking(teacher_config_dir):
  # The 'visible' encoder needs the same count in every image (CAE's fill to the exact count);
  # the 'mask_token' encoder takes BEiT's masks as drawn (at most the count).
  for name, exact in (("milan", True), ("eva", False)):
    m = methods.get(student(name, teacher_config_dir, masking="block", num_mask_patches=26,
                            min_mask_patches=4))
    sm = jax.jit(m.make_mask, static_argnums=1)(jax.random.PRNGKey(0), 6)
    counts = np.asarray(sm.mask).sum(1)
    if exact:
      np.testing.assert_array_equal(counts, 26)
      for b in range(6):
        np.testing.assert_array_equal(np.asarray(sm.keep_ids[b]), np.flatnonzero(np.asarray(sm.mask[b]) == 0))
    else:
      assert sm.keep_ids is None and np.all((counts > 0) & (counts <= 26)), counts


# ---------------------------------------------------------------------------------------------
# The prompting decoder.

def np_ln(x, p, eps=1e-6):
  mu, var = x.mean(-1, keepdims=True), x.var(-1, keepdims=True)
  return (x - mu) / np.sqrt(var + eps) * np.asarray(p["scale"]) + np.asarray(p["bias"])


def np_dense(x, p):
  return x @ np.asarray(p["kernel"]) + np.asarray(p["bias"])


def np_gelu(x):
  from math import erf
  return 0.5 * x * (1 + np.vectorize(erf)(x / math.sqrt(2)))


def test_prompting_block_equals_milan_block_by_hand():
  blk = fm.PromptingBlock(num_heads=2)
  rng = np.random.default_rng(0)
  queries = rng.normal(size=(2, 3, 8)).astype(np.float32)
  context = 3 * rng.normal(size=(2, 4, 8)).astype(np.float32)
  p = random_params(blk.init, queries, context)["params"]
  got = jax.jit(blk.apply)({"params": p}, queries, context)
  y = np_ln(queries, p["norm1"])
  keys_in = np.concatenate([context, y], 1)           # the fixed tokens enter un-normalised
  q = np_dense(y, p["q"]).reshape(2, 3, 2, 4)
  kv = np_dense(keys_in, p["kv"]).reshape(2, 7, 2, 2, 4)
  k, v = kv[:, :, 0], kv[:, :, 1]
  logits = np.einsum("bqhd,bkhd->bhqk", q, k) / 2.0
  attn = np.exp(logits - logits.max(-1, keepdims=True))
  attn /= attn.sum(-1, keepdims=True)
  out = np.einsum("bhqk,bkhd->bqhd", attn, v).reshape(2, 3, 8)
  x = queries + np_dense(out, p["proj"])
  x = x + np_dense(np_gelu(np_dense(np_ln(x, p["norm2"]), p["mlp"]["fc1"])), p["mlp"]["fc2"])
  np.testing.assert_allclose(got, x, rtol=1e-4, atol=1e-5)


@pytest.fixture(scope="module")
def prompting():
  dec = fm.FeatureDecoder(num_patches=16, out_dim=6, kind="prompting", width=8, depth=2, heads=2)
  latent = jax.random.normal(jax.random.PRNGKey(0), (2, 5, 12))     # cls + 4 visible
  perm = np.stack([np.random.default_rng(s).permutation(16) for s in (0, 1)])
  restore = jnp.asarray(np.argsort(perm, axis=1))
  params = random_params(dec.init, latent, restore, seed=1)["params"]
  return dec, params, latent, perm, restore


def test_prompting_decoder_keeps_visible_latents_fixed(prompting):
  dec, p, latent, perm, restore = prompting
  apply = jax.jit(dec.apply)
  out = np.asarray(apply({"params": p}, latent, restore))
  # cls and visible outputs are pred(norm(embed(latent) + pos)): no decoder block touches them.
  pos = vit.sincos_2d(8, 4, cls_token=True)
  fixed = np.asarray(np_dense(np.asarray(latent), p["embed"]))
  fixed[:, 0] += pos[0]
  for b in range(2):
    fixed[b, 1:] += pos[1:][perm[b, :4]]
  want = np_dense(np_ln(fixed, p["norm"]), p["pred"])
  np.testing.assert_allclose(out[:, 0], want[:, 0], rtol=1e-4, atol=1e-5)
  for b in range(2):
    np.testing.assert_allclose(out[b, 1:][perm[b, :4]], want[b, 1:], rtol=1e-4, atol=1e-5)
  # Changing the blocks changes the mask tokens' outputs only.
  moved = {**p, **{k: jax.tree.map(lambda a: a + 1.0, v) for k, v in p.items() if k.startswith("block")}}
  out2 = np.asarray(apply({"params": moved}, latent, restore))
  vis = np.zeros((2, 17), bool)
  vis[:, 0] = True
  for b in range(2):
    vis[b, 1 + perm[b, :4]] = True
  np.testing.assert_array_equal(out2[vis], out[vis])
  assert np.all(np.abs(out2[~vis] - out[~vis]).max(-1) > 1e-4)


def test_prompting_decoder_gradients_follow_the_mask_token_path(prompting):
  dec, p, latent, perm, restore = prompting
  vis = np.zeros((2, 17), bool)
  vis[:, 0] = True
  for b in range(2):
    vis[b, 1 + perm[b, :4]] = True
  vis = jnp.asarray(vis)

  def part(params, lat, which):
    out = dec.apply({"params": params}, lat, restore)
    return jnp.sum(jnp.where(which[..., None], out, 0.0) ** 2)

  grad = jax.jit(jax.grad(part, argnums=(0, 1)))
  g_vis_p, g_vis_l = grad(p, latent, vis)
  g_msk_p, g_msk_l = grad(p, latent, ~vis)
  # Visible outputs: no gradient into the blocks or the mask token ...
  for k in g_vis_p:
    if k.startswith("block") or k == "mask_token":
      assert all(float(jnp.abs(g).max()) == 0.0 for g in jax.tree.leaves(g_vis_p[k])), k
  # ... and each depends on its own latent only.
  jac = jax.jit(jax.jacrev(lambda lat: dec.apply({"params": p}, lat, restore)))(latent)  # [2,17,6,2,5,12]
  jac = np.abs(np.asarray(jac)).sum(axis=(2, 5))                                   # [2,17,2,5]
  for b in range(2):
    for j in range(5):                                   # latent token j of image b
      pos = 0 if j == 0 else 1 + perm[b, j - 1]
      others = [i for i in range(17) if bool(vis[b, i]) and i != pos]
      assert jac[b, others, b, j].max() == 0.0
      assert jac[b, pos, b, j] > 0
  # Mask tokens' outputs: gradient into every block, the mask token and the visible latents.
  for k in ("block00", "block01", "mask_token"):
    assert all(float(jnp.abs(g).max()) > 0 for g in jax.tree.leaves(g_msk_p[k])), k
  assert float(jnp.abs(g_msk_l[:, 1:]).sum(-1).min()) > 0


def test_mae_decoder_kind_is_the_mae_decoder_with_the_cls_output(prompting):
  from mim_jax.methods import mae
  _, _, latent, _, restore = prompting
  ours = fm.FeatureDecoder(num_patches=16, out_dim=2 * 2 * 3, kind="mae", width=8, depth=1, heads=2)
  ref = mae.MAEDecoder(num_patches=16, patch_size=2, width=8, depth=1, heads=2)
  p = random_params(ours.init, latent, restore, seed=2)["params"]
  got = jax.jit(ours.apply)({"params": p}, latent, restore)
  want = jax.jit(ref.apply)({"params": p}, latent, restore)
  assert got.shape == (2, 17, 12)
  np.testing.assert_allclose(got[:, 1:], want, rtol=1e-5, atol=1e-6)


# ---------------------------------------------------------------------------------------------
# Errors, presets, weight decay.

def test_missing_teacher_is_a_one_line_error(tmp_path):
  c = student("milan", "")
  with pytest.raises(train.TrainingError,
                     match=r"config.feature_mim.teacher is empty.*python -m mim_jax.main") as e:
    jax.eval_shape(methods.get(c).init, jax.random.PRNGKey(0), jnp.zeros((2, 32, 32, 3)))
  assert "\n" not in str(e.value)
  c = student("milan", str(tmp_path / "nowhere"))
  with pytest.raises(train.TrainingError, match="not a mim_jax workdir.*--config.feature_mim.teacher="):
    methods.get(c).external_state()


def test_teacher_on_another_grid_is_an_error(tmp_path):
  t = tiny_config("mae")
  t.input.image_size = 64
  with open(tmp_path / "config.json", "w") as f:
    f.write(t.to_json_best_effort())
  with pytest.raises(train.TrainingError, match="64px.*--config.input.image_size=64"):
    methods.get(student("eva", str(tmp_path))).teacher_dim


def test_configs_carry_the_official_settings():
  c = load_config("milan", "imagenet")
  f = c.feature_mim
  assert (f.encoder, f.masking, f.attentive_sampling, f.mask_ratio) == (
      "visible", "attentive", "multinomial", 0.75)
  assert (f.loss, f.loss_on, dict(f.decoder)) == (
      "mse_normalised", "all", dict(kind="prompting", width=512, depth=8, heads=16))
  assert (c.total_epochs, c.optim.warmup_epochs, c.optim.b2) == (400, 40, 0.95)
  assert optim.peak_lr(c.optim, c.input.batch_size) == pytest.approx(1.5e-4 * 4096 / 256)
  c = load_config("eva", "imagenet")
  f = c.feature_mim
  assert (f.encoder, f.masking, f.num_mask_patches, f.min_mask_patches, f.loss, f.loss_on) == (
      "mask_token", "block", 105, 16, "cosine", "masked")
  assert (c.input.image_size // c.model.patch_size, c.model.pos_embed, c.model.qkv_bias) == (
      16, "learned", "qv")
  assert (c.optim.b2, c.optim.eps, c.optim.clip_grad, c.total_epochs) == (0.98, 1e-6, 3.0, 150)
  assert optim.peak_lr(c.optim, 4096) == pytest.approx(1e-3)
  c = load_config("mvp", "imagenet")
  f = c.feature_mim
  assert (f.encoder, f.masking, f.num_mask_patches, f.loss, f.loss_on) == (
      "mask_token", "block", 75, "cosine", "masked")
  assert (c.model.rel_pos_bias, c.model.init_values, c.total_epochs) == ("shared", 0.1, 300)
  assert optim.peak_lr(c.optim, 2048) == pytest.approx(1.5e-3)
  for name in ("milan", "eva", "mvp"):
    for preset in ("", "cifar10", "imagenet"):
      assert methods.get(load_config(name, preset)).name == "feature_mim"


def test_mask_token_encoder_weight_decay(teacher_config_dir):
  c = student("eva", teacher_config_dir)
  m = methods.get(c)
  mask = m.decay_mask(jax.eval_shape(m.init, jax.random.PRNGKey(0), jnp.zeros((2, 32, 32, 3))))
  assert not mask["encoder"]["pos_embed"] and not mask["encoder"]["cls_token"]
  assert mask["encoder"]["mask_token"] and mask["head"]["kernel"] and not mask["head"]["bias"]


# ---------------------------------------------------------------------------------------------
# Training on the embedded data: the loss falls, the teacher stays, a resumed run is the same.


@pytest.fixture
def one_compiled_step(monkeypatch):
  """The trainer jits a fresh step function per run; the three runs below share one config,
  so they share its compiled step (what each run computes is unchanged, the CPU time is not
  spent three times)."""
  build, steps = train.build_state_and_step, {}

  def shared(config, *args):
    state, state_sh, batch_sh, step = build(config, *args)
    return state, state_sh, batch_sh, steps.setdefault(config.to_json_best_effort(), step)

  monkeypatch.setattr(train, "build_state_and_step", shared)


def test_training_lowers_the_loss_keeps_the_teacher_and_resumes(tmp_path, trained_teacher,
                                                                 one_compiled_step):
  # The student reads a copy of the teacher run, deleted before the resume below.
  teacher_copy = str(tmp_path / "teacher")
  shutil.copytree(trained_teacher, teacher_copy)
  c = student("milan", teacher_copy)
  c.total_steps, c.ckpt_every, c.evals = 6, 3, {}
  c.optim.update(warmup_epochs=0.0, base_lr=0.05)
  a, b = str(tmp_path / "a"), str(tmp_path / "b")
  train.train_and_evaluate(c, a, progress=False, devices=one_device())
  la = read_losses(a)
  assert sorted(la) == [1, 2, 3, 4, 5, 6]
  assert la[5] + la[6] < 0.9 * (la[1] + la[2]), la
  # The teacher in the run's state is the teacher run's encoder, unchanged by 6 steps.
  run = teachers.load(trained_teacher)
  got = teachers.load(a).method_state["teacher"]
  jax.tree.map(np.testing.assert_array_equal, got, run.params["encoder"])
  # teacher_encoder='ema' takes the teacher run's EMA encoder instead.
  ema = methods.get(student("milan", trained_teacher, teacher_encoder="ema")).external_state()
  jax.tree.map(np.testing.assert_array_equal, ema["teacher"], run.method_state["ema_encoder"])
  # Resuming needs neither the teacher's workdir nor its checkpoint: the first start recorded the
  # teacher's config in b/frozen/, the restore takes its weights from b's own checkpoint.
  with pytest.raises(train.Preempted):
    train.train_and_evaluate(c, b, progress=False, stop_after=3, devices=one_device())
  recorded = os.path.join(b, "frozen", "feature_mim.teacher", "config.json")
  assert train.load_run_config(os.path.dirname(recorded)).to_dict() == \
      train.load_run_config(trained_teacher).to_dict()
  shutil.rmtree(teacher_copy)
  train.train_and_evaluate(c, b, progress=False, devices=one_device())
  assert_same_losses(la, read_losses(b), 6)
  resumed = teachers.load(b)
  jax.tree.map(np.testing.assert_array_equal, resumed.method_state["teacher"], run.params["encoder"])
  assert resumed.method.teacher_dim == run.method.encoder.width
  # A fresh start still needs the teacher: the one-line error names the key.
  with pytest.raises(train.TrainingError, match="config.feature_mim.teacher="):
    train.train_and_evaluate(c, str(tmp_path / "c"), progress=False, devices=one_device())


def test_mvp_jitters_the_whole_image_before_the_crop(teacher_config_dir):
  """feature_mim.color_jitter (MVP, as BEiT): ColorJitter(s, s, s) on the uint8 image, then the
  trainer's crop and flip, with the keys split in that order; off, the crop alone."""
  from mim_jax.data import preprocess, views
  c = student("mvp", teacher_config_dir)
  m = methods.get(c)
  assert m.color_jitter == 0.4
  images = jnp.asarray(np.random.default_rng(1).integers(0, 256, (4, 32, 32, 3)), jnp.uint8)
  rng = jax.random.PRNGKey(2)
  got = jax.jit(lambda r, x: m.preprocess(r, x, c.input, True))(rng, images)
  kj, rest = jax.random.split(rng)
  want = preprocess.preprocess(rest, views.color_jitter(kj, images, 0.4, 0.4, 0.4, 0.0), c.input, True)
  np.testing.assert_allclose(got, want, rtol=1e-5, atol=5e-5)
  assert not np.allclose(got, preprocess.preprocess(rest, images, c.input, True), atol=1e-3)
  c.feature_mim.color_jitter = 0.0
  plain = methods.get(c).preprocess(rng, images, c.input, True)
  np.testing.assert_array_equal(plain, preprocess.preprocess(rng, images, c.input, True))
