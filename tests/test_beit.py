"""BEiT (v1 and v2): loss by hand, the v2 cls head, init, colour jitter, tokenizer errors, and
runs on the embedded data (learning, frozen tokenizer, exact resume, a real tokenizer run)."""
import math
import shutil

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from helpers import load_config, tiny_config, losses, train_with_frozen_run, resumed_losses, assert_same_losses
from mim_jax import masking, methods, optim, teachers, train
from mim_jax.models import vit

CODES = 16
REAL_LOAD = teachers.load


class FakeTokenizer:
  """The tokenizer contract with a transparent rule: each patch's id is the argmax over codes
  of (its mean colour @ proj + bias), proj from the params and bias from the state."""
  name = "fake_tokenizer"

  def __init__(self, image_size=32, token_grid=8):
    self.codebook_size, self.image_size, self.token_grid = CODES, image_size, token_grid
    self.seen = []

  def token_ids(self, params, state, images):
    self.seen.append(tuple(images.shape))
    g, p = self.token_grid, self.image_size // self.token_grid
    b = images.shape[0]
    means = images.reshape(b, g, p, g, p, 3).mean(axis=(2, 4)).reshape(b, g * g, 3)
    return jnp.argmax(means @ params["proj"] + state["bias"], axis=-1).astype(jnp.int32)


def fake_run(**kw):
  rng = np.random.RandomState(0)
  return teachers.FrozenRun(None, FakeTokenizer(**kw),
                            {"proj": rng.randn(3, CODES).astype(np.float32)},
                            {"bias": (0.1 * rng.randn(CODES)).astype(np.float32)}, 0)


def numpy_ids(run, images):
  """The fake tokenizer's rule in numpy."""
  x = np.asarray(images, np.float64)
  b = x.shape[0]
  means = x.reshape(b, 8, 4, 8, 4, 3).mean(axis=(2, 4)).reshape(b, 64, 3)
  return np.argmax(means @ run.params["proj"] + run.method_state["bias"], axis=-1)


def numpy_ce(logits, labels, weights):
  logits = np.asarray(logits, np.float64)
  m = logits.max(-1, keepdims=True)
  logp = logits - m - np.log(np.exp(logits - m).sum(-1, keepdims=True))
  ce = -np.take_along_axis(logp, labels[..., None], -1)[..., 0]
  acc = (logits.argmax(-1) == labels).astype(np.float64)
  return (ce * weights).sum() / weights.sum(), (acc * weights).sum() / weights.sum()


@pytest.fixture
def fake(monkeypatch):
  run = fake_run()
  monkeypatch.setattr(teachers, "load", lambda path, *args, **kwargs: run)
  return run


def fixed_mask():
  """Two images: 24 masked patches (the budget) and 10 (a mask that stopped short)."""
  rng = np.random.RandomState(1)
  mask = np.zeros((2, 64), np.int32)
  mask[0, rng.permutation(64)[:24]] = 1
  mask[1, rng.permutation(64)[:10]] = 1
  return mask


def setup(config, monkeypatch, seed=0):
  m = methods.get(config)
  mask = fixed_mask()
  monkeypatch.setattr(m, "make_mask", lambda rng, b: jnp.asarray(mask))
  x = jax.random.normal(jax.random.PRNGKey(seed), (2, 32, 32, 3))
  params = jax.jit(m.init)(jax.random.PRNGKey(1), x)
  # Non-zero biases, so a wrong bias path shows.
  params["lm_head"]["bias"] = 0.3 * jax.random.normal(jax.random.PRNGKey(2), (CODES,))
  state = {**m.init_state(params), **m.external_state()}
  return m, mask, x, params, state


def test_loss_is_cross_entropy_over_the_masked_patches(fake, monkeypatch):
  c = tiny_config("beit")
  c.model.depth = 1
  c.beit.tokenizer = "/fake"
  m, mask, x, params, state = setup(c, monkeypatch)
  loss, aux = m.loss(params, state, x, jax.random.PRNGKey(3), 0)
  tokens = np.asarray(m.encoder.apply({"params": params["encoder"]}, x, mask=jnp.asarray(mask)))
  logits = tokens[:, 1:] @ np.asarray(params["lm_head"]["kernel"]) + np.asarray(params["lm_head"]["bias"])
  want, acc = numpy_ce(logits, numpy_ids(fake, x), mask.astype(np.float64))
  np.testing.assert_allclose(float(loss), want, rtol=1e-5)
  np.testing.assert_allclose(float(aux["mlm_acc"]), acc, rtol=1e-6)
  assert float(aux["mask_ratio"]) == pytest.approx(34 / 128)


def test_v2_cls_head_is_its_definition(fake, monkeypatch):
  c = tiny_config("beitv2")
  c.beit.tokenizer = "/fake"
  c.beit.early_layers = 1
  m, mask, x, params, state = setup(c, monkeypatch)
  loss, aux = m.loss(params, state, x, jax.random.PRNGKey(3), 0)
  enc = params["encoder"]
  jmask = jnp.asarray(mask)
  tokens, inter = m.encoder.apply({"params": enc}, x, mask=jmask, mutable=["intermediates"])
  final_cls = inter["intermediates"]["encoder"]["block_outputs"][-1][:, :1]   # before the norm
  # The patch tokens after `early_layers` blocks, from a ViT that has only those blocks.
  shallow = m.encoder.clone(depth=1)
  sp = {**enc, "encoder": {k: v for k, v in enc["encoder"].items() if k != "block01"}}
  _, sinter = shallow.apply({"params": sp}, x, mask=jmask, mutable=["intermediates"])
  y = jnp.concatenate([final_cls, sinter["intermediates"]["encoder"]["block_outputs"][-1][:, 1:]], 1)
  bias = vit.RelativePositionBias(8, 2).apply({"params": enc["rel_pos_bias"]})
  for j in range(2):
    blk = vit.Block(2, 4.0, "qv", 0.1, 0.0, "beit", 1 + j + 1)
    y = blk.apply({"params": params["cls_head"][f"block{j:02d}"]}, y, bias)
  y = np.asarray(y, np.float64)[:, 1:]
  norm = enc["encoder"]["norm"]                                  # shared_lm_head: the encoder's
  y = (y - y.mean(-1, keepdims=True)) / np.sqrt(y.var(-1, keepdims=True) + 1e-6)
  y = y * np.asarray(norm["scale"]) + np.asarray(norm["bias"])
  labels = numpy_ids(fake, x)
  head = (np.asarray(params["lm_head"]["kernel"]), np.asarray(params["lm_head"]["bias"]))
  want_2, acc_2 = numpy_ce(y @ head[0] + head[1], labels, mask.astype(np.float64))
  want_1, _ = numpy_ce(np.asarray(tokens)[:, 1:] @ head[0] + head[1], labels, mask.astype(np.float64))
  np.testing.assert_allclose(float(aux["loss_2"]), want_2, rtol=1e-5)
  np.testing.assert_allclose(float(aux["mlm_acc_2"]), acc_2, rtol=1e-6)
  np.testing.assert_allclose(float(aux["loss_1"]), want_1, rtol=1e-5)
  np.testing.assert_allclose(float(loss), want_1 + want_2, rtol=1e-5)


def test_v2_head_drop_path_and_init_are_the_official_ones(fake):
  c = tiny_config("beitv2")
  c.beit.tokenizer = "/fake"
  c.model.update(depth=4, drop_path=0.1)
  c.beit.update(early_layers=3, head_layers=2)
  m = methods.get(c)
  # dpr = linspace(0, 0.1, max(depth 4, 3 + 2)); head block j takes dpr[3 + j].
  np.testing.assert_allclose(m.cls_head.drop_paths, [0.075, 0.1])
  p = jax.jit(m.init)(jax.random.PRNGKey(0), jnp.zeros((2, 32, 32, 3)))["cls_head"]
  for j in range(2):
    b = p[f"block{j:02d}"]
    rescale = 1.0 / math.sqrt(2.0 * (3 + j + 1))
    # PyTorch's default Linear init U(+-1/sqrt(fan_in)) (weights and biases), proj / fc2
    # weights rescaled; not BEiT's trunc-normal .02.
    for arr, bound in [(b["attn"]["qkv_kernel"], 1 / 8), (b["attn"]["proj"]["kernel"], rescale / 8),
                       (b["attn"]["proj"]["bias"], 1 / 8), (b["mlp"]["fc1"]["kernel"], 1 / 8),
                       (b["mlp"]["fc1"]["bias"], 1 / 8), (b["mlp"]["fc2"]["kernel"], rescale / 16),
                       (b["mlp"]["fc2"]["bias"], 1 / 16)]:
      a = np.abs(np.asarray(arr))
      assert a.max() <= bound and a.max() > 0.9 * bound, (j, a.max(), bound)
    assert not np.any(np.asarray(b["attn"]["q_bias"])) and np.all(np.asarray(b["gamma_1"]) == 0.1)


def test_beit_init_is_trunc_normal_with_the_depth_rescale(fake):
  c = tiny_config("beit")
  c.beit.tokenizer = "/fake"
  p = jax.jit(methods.get(c).init)(jax.random.PRNGKey(0), jnp.zeros((2, 32, 32, 3)))
  enc = p["encoder"]
  for arr in (p["lm_head"]["kernel"], enc["mask_token"], enc["cls_token"],
              enc["patch_embed"]["proj"]["kernel"]):
    a = np.abs(np.asarray(arr))
    assert a.max() <= 0.02 and a.std() < 0.012                   # cut at one std
  assert not np.any(np.asarray(p["lm_head"]["bias"]))
  for l in (1, 2):
    blk = enc["encoder"][f"block{l - 1:02d}"]
    a = np.abs(np.asarray(blk["attn"]["proj"]["kernel"]))
    assert 0.95 * 0.02 / math.sqrt(2 * l) < a.max() <= 0.02 / math.sqrt(2 * l)


def test_colour_jitter_without_hue_is_pils_enhance_in_the_drawn_order():
  """ColorJitter(s, s, s) (BEiT, data2vec, TinyMIM): the hue slot of the drawn order is skipped."""
  from PIL import Image, ImageEnhance
  from mim_jax.data import views
  img = np.random.RandomState(0).randint(0, 256, (2, 6, 7, 3)).astype(np.uint8)
  factors = np.array([[1.3, 0.7, 1.2, 0.3], [0.6, 1.4, 0.8, -0.4]], np.float32)
  order = np.array([[2, 3, 0, 1], [1, 2, 0, 3]])
  got = np.asarray(views.color_jitter_ops(jnp.asarray(img, jnp.float32), jnp.asarray(order),
                                          jnp.asarray(factors), hue=False))
  enhance = (ImageEnhance.Brightness, ImageEnhance.Contrast, ImageEnhance.Color)
  for i in range(2):
    pil = Image.fromarray(img[i])
    for op in order[i]:
      if op < 3:
        pil = enhance[op](pil).enhance(float(factors[i, op]))
    np.testing.assert_array_equal(got[i], np.asarray(pil))
  # Strength 0 is the identity.
  np.testing.assert_array_equal(
      np.asarray(views.color_jitter(jax.random.PRNGKey(0), jnp.asarray(img), 0.0, 0.0, 0.0, 0.0)), img)
  # And a strength moves the pixels.
  assert np.abs(np.asarray(views.color_jitter(jax.random.PRNGKey(0), jnp.asarray(img), 0.4, 0.4, 0.4, 0.0))
                - img).max() > 0


def test_one_colour_jitter():
  """BEiT, data2vec and TinyMIM call the views' colour jitter; no method keeps its own copy."""
  import inspect
  from mim_jax.methods import beit, data2vec, tinymim
  for mod in (beit, data2vec, tinymim):
    src = inspect.getsource(mod)
    assert "views.color_jitter(" in src
    for name in ("def color_jitter", "def jitter_with", "def apply_color_jitter", ".blend(",
                 "views.brightness", "views.contrast", "views.saturation"):
      assert name not in src, (mod.__name__, name)


def test_tokenizer_sees_the_view_at_its_own_size(monkeypatch):
  run = fake_run(image_size=16, token_grid=8)
  monkeypatch.setattr(teachers, "load", lambda path, *args, **kwargs: run)
  c = tiny_config("beit")
  c.beit.tokenizer = "/fake"
  m = methods.get(c)
  x = jax.random.normal(jax.random.PRNGKey(0), (2, 32, 32, 3))
  ids = m.token_ids(m.external_state(), x)
  assert run.method.seen[-1] == (2, 16, 16, 3)
  small = jax.image.resize(x, (2, 16, 16, 3), "bicubic")
  np.testing.assert_array_equal(ids, run.method.token_ids(run.params, run.method_state, small))


@pytest.mark.parametrize("path,why", [("", "no workdir given"), ("/nonexistent/tok", "does not exist")])
def test_missing_tokenizer_is_a_one_line_error_naming_key_and_command(path, why):
  c = tiny_config("beit")
  c.beit.tokenizer = path
  with pytest.raises(train.TrainingError) as e:
    # Without a path the method builds and fails when the tokenizer is needed; a named run is
    # read when the method is built.
    methods.get(c).init(jax.random.PRNGKey(0), jnp.zeros((2, 32, 32, 3)))
  msg = str(e.value)
  assert "\n" not in msg and why in msg, msg
  assert "config.beit.tokenizer" in msg and "configs/tokenizer.py" in msg, msg


def test_token_grid_mismatch_is_a_one_line_error(monkeypatch):
  run = fake_run(image_size=32, token_grid=4)
  monkeypatch.setattr(teachers, "load", lambda path, *args, **kwargs: run)
  c = tiny_config("beit")
  c.beit.tokenizer = "/fake"
  with pytest.raises(train.TrainingError, match="token grid is 4x4 but this model's patch grid is 8x8"):
    methods.get(c)


@pytest.mark.parametrize("name", ["beit", "beitv2"])
def test_imagenet_presets_are_the_official_recipes(name):
  c = load_config(name, "imagenet")
  m = methods.get(c)          # no tokenizer named: the method still builds
  assert (c.input.image_size, c.model.patch_size, c.model.variant, m.grid) == (224, 16, "base", 14)
  assert (c.beit.num_mask_patches, c.beit.min_mask_patches_per_block, c.beit.max_mask_patches_per_block,
          c.beit.color_jitter) == (75, 16, 0, 0.4)
  assert (c.model.qkv_bias, c.model.init_values, c.model.rel_pos_bias, c.model.pos_embed,
          c.model.init_style, c.model.drop_path) == ("qv", 0.1, "shared", "none", "beit", 0.1)
  assert (c.optim.b1, c.optim.b2, c.optim.eps, c.optim.weight_decay,
          c.optim.clip_grad) == (0.9, 0.999, 1e-8, 0.05, 3.0)
  assert c.input.batch_size == 2048 and optim.peak_lr(c.optim, 2048) == pytest.approx(1.5e-3)
  s = optim.make_schedule(c.optim, 2048, 100, int(c.total_epochs) * 100)
  assert float(s(1000)) == pytest.approx(1.5e-3, rel=1e-4)            # after 10 warm-up epochs
  assert float(s(int(c.total_epochs) * 100)) == pytest.approx(1e-5, rel=1e-3)
  assert m.no_decay_names == ("pos_embed", "cls_token")
  if name == "beit":
    assert c.total_epochs == 800 and tuple(c.input.aug.crop_scale) == (0.08, 1.0) and not m.cls_pt
  else:
    assert c.total_epochs == 1600 and tuple(c.input.aug.crop_scale) == (0.2, 1.0)
    assert (m.cls_pt, m.early, m.shared_head, len(m.cls_head.drop_paths)) == (True, 9, True, 2)


# ---------------------------------------------------------------------------------------------
# Runs on the embedded data.


def run_config(**kw):
  c = tiny_config("beit", **{"total_steps": 8, "ckpt_every": 4, **kw})
  c.model.depth = 1
  c.beit.tokenizer = "/fake"
  c.optim.update(base_lr=1e-3, lr_batch_divisor=16, warmup_epochs=0.0)
  c.evals = {}
  return c


@pytest.fixture(scope="module")
def uninterrupted(tmp_path_factory, compilation_cache):
  """The workdir of one 8-step run with the (deterministic) fake tokenizer, shared by the run
  tests below."""
  workdir = str(tmp_path_factory.mktemp("beit_a"))
  train_with_frozen_run(run_config(), workdir, fake_run())
  return workdir


def test_a_few_steps_lower_the_loss(uninterrupted):
  ls = losses(uninterrupted)
  assert np.mean([ls[s] for s in (6, 7, 8)]) < np.mean([ls[s] for s in (1, 2, 3)]) - 0.2, ls


def test_the_tokenizer_gets_no_gradient_and_stays_unchanged(uninterrupted, fake):
  saved = REAL_LOAD(uninterrupted)            # the final checkpoint, as host arrays
  assert saved.step == 8
  frozen = saved.method_state["tokenizer"]
  np.testing.assert_array_equal(frozen["params"]["proj"], fake.params["proj"])
  np.testing.assert_array_equal(frozen["state"]["bias"], fake.method_state["bias"])
  assert set(saved.params) == {"encoder", "lm_head"}


def test_resumed_run_equals_uninterrupted(uninterrupted, fake, tmp_path):
  lb = resumed_losses(run_config(), str(tmp_path / "b"), stop_after=4)
  assert_same_losses(losses(uninterrupted), lb, 8)


def test_end_to_end_on_a_tokenizer_run(tmp_path, compilation_cache):
  """A 2-step tokenizer run (configs/tokenizer.py), then 2 BEiT steps reading its workdir (a
  3-step run preempted after 2, so that its resume below reuses the compiled step)."""
  tok = tiny_config("tokenizer", total_steps=2, ckpt_every=2)
  tok.tokenizer.conv.update(hidden=16, res_hidden=8, res_layers=1)
  tok.evals = {}
  train.train_and_evaluate(tok, str(tmp_path / "tok"), progress=False)
  c = run_config(total_steps=3, ckpt_every=2)
  c.beit.tokenizer = str(tmp_path / "tok")
  with pytest.raises(train.Preempted):
    train.train_and_evaluate(c, str(tmp_path / "beit"), progress=False, stop_after=2)
  ls = losses(str(tmp_path / "beit"))
  assert sorted(ls) == [1, 2] and all(math.isfinite(v) for v in ls.values()), ls
  frozen, run = teachers.load(str(tmp_path / "tok")), teachers.load(str(tmp_path / "beit"))
  assert run.params["lm_head"]["kernel"].shape == (64, tok.tokenizer.codebook_size)
  jax.tree.map(np.testing.assert_array_equal, run.method_state["tokenizer"]["params"], frozen.params)
  # Once started, the run no longer needs the tokenizer's workdir: loading it, evaluating it or
  # resuming it rebuilds the tokenizer from the config recorded in beit/frozen/ and takes its
  # weights from the run's own checkpoint.
  x = jnp.asarray(np.random.default_rng(0).normal(size=(2, 32, 32, 3)), jnp.float32)
  ids = run.method.token_ids(run.method_state, x)
  shutil.rmtree(tmp_path / "tok")
  again = teachers.load(str(tmp_path / "beit"))
  jax.tree.map(np.testing.assert_array_equal, again.method_state, run.method_state)
  np.testing.assert_array_equal(again.method.token_ids(again.method_state, x), ids)
  tr = train.Trainer.from_workdir(str(tmp_path / "beit"))
  jax.tree.map(np.testing.assert_array_equal, jax.device_get(tr.state["method_state"]), run.method_state)
  assert train.train_and_evaluate(c, str(tmp_path / "beit"), progress=False)["step"] == 3


def test_v2_masks_exactly_the_budget_and_v1_at_most(fake):
  """beit2/masking_generator.py fills the blocks up with random single patches to exactly
  num_mask_patches; BEiT v1's generator stops at or below it (short a fraction of the time)."""
  counts = {}
  for name in ("beit", "beitv2"):
    c = tiny_config(name)
    c.beit.update(tokenizer="/fake", early_layers=1)
    m = methods.get(c)
    masks = np.asarray(jax.jit(lambda r: m.make_mask(r, 256))(jax.random.PRNGKey(0)))
    counts[name] = masks.sum(axis=1)
    assert set(np.unique(masks)) <= {0, 1}
  budget = tiny_config("beitv2").beit.num_mask_patches
  assert np.all(counts["beitv2"] == budget)
  assert np.all(counts["beit"] <= budget) and np.any(counts["beit"] < budget)
  # The filled-up masks keep the v1 blocks they started from.
  c = tiny_config("beitv2")
  c.beit.update(tokenizer="/fake", early_layers=1)
  m = methods.get(c)
  rng = jax.random.PRNGKey(0)
  blocks = np.asarray(masking.block_mask(rng, 4, m.grid, m.grid, m.num_mask, m.min_per_block,
                                         m.max_per_block))
  filled = np.asarray(m.make_mask(rng, 4))
  assert np.all(filled >= blocks)
