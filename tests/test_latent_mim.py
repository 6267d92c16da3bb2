"""Latent MIM: its pieces against their definitions, the loss by hand, training and resume,
and the ablation runner's commands."""
import importlib.util
import os

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from helpers import load_config, losses, tiny_config, resumed_losses, assert_same_losses
from mim_jax import masking, methods, optim, train
from mim_jax.methods import latent_mim as lm


def small(**latent):
  c = tiny_config("latent_mim")
  c.model.depth = 1
  c.latent_mim.update(proj_hidden=32, **latent)
  c.latent_mim.decoder = dict(kind="cross", width=32, depth=1, heads=2)
  return c


def build(**latent):
  kind = latent.pop("kind", "cross")
  c = small(**latent)
  c.latent_mim.decoder.kind = kind
  return methods.get(c)


def images(n=4, seed=0):
  return jax.random.normal(jax.random.PRNGKey(seed), (n, 32, 32, 3))


def views(b, n=64, k=6, seed=0):
  rs = np.random.RandomState(seed)
  perm = np.stack([rs.permutation(n) for _ in range(b)]).astype(np.int32)
  return jnp.asarray(perm[:, :k]), jnp.asarray(perm[:, k:])


# ---------------------------------------------------------------------------------------------
# Hand computations (numpy, written from the official torch code).

def np_normalize(x):
  return x / np.maximum(np.linalg.norm(x, axis=-1, keepdims=True), 1e-12)


def np_patchdisc(pred, target, tau, standardize=True):
  pred, target = np.asarray(pred, np.float64), np.asarray(target, np.float64)
  if standardize:
    pred = (pred - pred.mean(1, keepdims=True)) / (pred.std(1, ddof=1, keepdims=True) + 1e-4)
  s = np.einsum("bpd,bqd->bpq", np_normalize(pred), np_normalize(target)) / tau
  total = 0.0
  b, n, _ = s.shape
  for i in range(b):
    for p in range(n):
      row = s[i, p]
      total += -(row[p] - np.log(np.sum(np.exp(row))))
  return total / (b * n) * 2 * tau


def np_sim(x):
  x = np_normalize(np.asarray(x, np.float64))
  return np.mean(np.einsum("bpd,bqd->bpq", x, x))


def test_patchdisc_equals_hand_computation():
  rs = np.random.RandomState(0)
  pred, target = rs.randn(2, 5, 8).astype(np.float32), rs.randn(2, 5, 8).astype(np.float32)
  for standardize in (True, False):
    got = float(lm.patch_disc_loss(pred, target, 0.2, standardize))
    np.testing.assert_allclose(got, np_patchdisc(pred, target, 0.2, standardize), rtol=1e-5)


def test_patchdisc_is_minimised_by_the_identity_prediction():
  rs = np.random.RandomState(1)
  target = rs.randn(1, 6, 16).astype(np.float32)
  best = float(lm.patch_disc_loss(target, target, 0.2, standardize=False))
  # Any other assignment of the targets to positions, random predictions and noisy copies lose.
  for _ in range(20):
    perm = rs.permutation(6)
    if (perm == np.arange(6)).all():
      continue
    assert float(lm.patch_disc_loss(target[:, perm], target, 0.2, standardize=False)) > best
  for scale in (0.3, 1.0):
    noisy = target + scale * rs.randn(*target.shape).astype(np.float32)
    assert float(lm.patch_disc_loss(noisy, target, 0.2, standardize=False)) > best
  assert float(lm.patch_disc_loss(rs.randn(1, 6, 16), target, 0.2, standardize=False)) > best
  # Cosine: the scale of the prediction does not matter.
  np.testing.assert_allclose(float(lm.patch_disc_loss(3 * target, target, 0.2, False)), best, rtol=1e-6)


def test_regression_losses_equal_their_definitions():
  rs = np.random.RandomState(2)
  pred, target = rs.randn(2, 3, 8), rs.randn(2, 3, 8) * 2 + 1
  t = (target - target.mean(-1, keepdims=True)) / np.sqrt(target.var(-1, ddof=1, keepdims=True) + 1e-6)
  d = pred - t
  hub = np.where(np.abs(d) < 0.5, 0.5 * d ** 2, 0.5 * (np.abs(d) - 0.25))
  for kind, want in (("mse", np.mean(d ** 2)), ("l1", np.mean(np.abs(d))), ("huber", np.mean(hub))):
    np.testing.assert_allclose(float(lm.regression_loss(pred, target, kind, 0.5)), want, rtol=1e-5)
  np.testing.assert_allclose(float(lm.regression_loss(pred, target, "mse", normalize_target=False)),
                             np.mean((pred - target) ** 2), rtol=1e-5)


def test_similarity_regulariser_equals_its_formula():
  rs = np.random.RandomState(3)
  pred, vis = rs.randn(2, 4, 8), rs.randn(2, 3, 8)
  s_p = np.mean([[np.dot(a, b) / np.linalg.norm(a) / np.linalg.norm(b) for a in x for b in x] for x in pred])
  s_v = np.mean([[np.dot(a, b) / np.linalg.norm(a) / np.linalg.norm(b) for a in x for b in x] for x in vis])
  got = float(lm.similarity_regularizer(pred, vis, 0.6))
  np.testing.assert_allclose(got, (0.6 - s_p) ** 2 + (0.6 - s_v) ** 2, rtol=1e-5)
  same = np.ones((1, 5, 4))                             # collapsed latents: similarity 1
  np.testing.assert_allclose(float(lm.avg_pairwise_sim(same)), 1.0, rtol=1e-6)


def test_visual_cue_queries_equal_the_formula():
  pe_t = np.array([[[1.0, 0.0], [0.0, 2.0]]])            # 2 targets
  pe_v = np.array([[[1.0, 1.0], [2.0, 0.0], [0.0, 0.0]]])  # 3 visible
  z = np.array([[[1.0, 2.0], [3.0, 4.0], [5.0, 6.0]]])
  logits = np.einsum("bmd,bkd->bmk", pe_t, pe_v) / np.sqrt(2.0)
  w = np.exp(logits) / np.exp(logits).sum(-1, keepdims=True)
  np.testing.assert_allclose(np.asarray(lm.visual_cue_queries(pe_t, pe_v, z)), w @ z[0], rtol=1e-6)
  # Target 0 (position (1, 0)) weighs visible 1 (2, 0) most: exp(sqrt 2) vs exp(1/sqrt 2) vs 1.
  np.testing.assert_allclose(w[0, 0], np.exp([1 / np.sqrt(2), np.sqrt(2), 0]) /
                             np.exp([1 / np.sqrt(2), np.sqrt(2), 0]).sum(), rtol=1e-6)


def test_position_table_is_the_official_one():
  g, d = 4, 16
  lin = np.linspace(0, 1, g)
  a, b = np.meshgrid(lin, lin, indexing="ij")          # torch.meshgrid default
  loc = np.stack([a, b], 2).reshape(-1, 2)
  y, x = loc[:, 0] * g, loc[:, 1] * g
  omega = 1.0 / 10000 ** (np.arange(d // 4) / d * 4.0)
  emb = lambda p: np.concatenate([np.sin(p[:, None] * omega), np.cos(p[:, None] * omega)], 1)  # noqa: E731
  np.testing.assert_allclose(lm.lmim_pos_embed(d, g), np.concatenate([emb(x), emb(y)], 1), atol=1e-6)


def test_decoder_queries_use_the_visual_cues():
  m_on, m_off = build(visual_cues=True), build(visual_cues=False)
  x = images(2)
  vis, tgt = views(2)

  @jax.jit
  def both(x):
    p = m_on.init(jax.random.PRNGKey(0), x)
    latent = m_on.tower(m_on.online(p), x, vis)
    on = m_on.decoder.apply({"params": p["decoder"]}, latent, vis, tgt)
    off = m_off.decoder.apply({"params": p["decoder"]}, latent, vis, tgt)   # same weights, no cues
    return on, off

  on, off = both(x)
  assert on.shape == (2, 58, 64) and not np.allclose(on, off)


# ---------------------------------------------------------------------------------------------
# Views and the gap grid.

def test_views_split_every_patch_into_visible_and_targets():
  assert lm.num_visible(196, 0.9) == 20 and lm.num_visible(196, 0.75) == 49
  assert lm.num_visible(64, 0.9) == 6
  vis, tgt = lm.split_views(jax.random.PRNGKey(0), 8, 196, 20)
  assert vis.shape == (8, 20) and tgt.shape == (8, 176)
  for v, t in zip(np.asarray(vis), np.asarray(tgt)):
    assert sorted(np.concatenate([v, t]).tolist()) == list(range(196))
  # Uniform: every patch is visible about 20/196 of the time.
  vis, _ = lm.split_views(jax.random.PRNGKey(1), 4000, 16, 4)
  freq = np.bincount(np.asarray(vis).ravel(), minlength=16) / 4000
  np.testing.assert_allclose(freq, 0.25, atol=0.03)


@pytest.mark.parametrize("patch,gap", [(4, 0), (4, 1), (16, 4)])
def test_gap_grid_has_the_promised_patches_and_spacing(patch, gap):
  g, b = 5, 64
  starts = np.asarray(masking.gap_grid(jax.random.PRNGKey(0), b, g, patch, gap))
  assert starts.shape == (b, g * g, 2)
  cell = patch + gap
  s = starts.reshape(b, g, g, 2)
  idx = np.arange(g) * cell
  off_r, off_c = s[..., 0] - idx[None, :, None], s[..., 1] - idx[None, None, :]
  # One patch per cell, inside it: offsets in [0, gap) (all of them seen), 0 without a gap.
  for off in (off_r, off_c):
    assert off.min() == 0 and off.max() == max(gap - 1, 0)
  # Neighbouring patches never touch with a gap: spacing between gap + 1 - gap and 2 gap - 1.
  dr = s[:, 1:, :, 0] - s[:, :-1, :, 0] - patch
  dc = s[:, :, 1:, 1] - s[:, :, :-1, 1] - patch
  for d in (dr, dc):
    if gap == 0:
      assert (d == 0).all()
    else:
      assert d.min() >= 1 and d.max() <= 2 * gap - 1
  assert (starts + patch <= g * cell).all()


def test_gap_grid_image_tiles_the_chosen_patches():
  g, p, gap = 3, 4, 2
  size = g * (p + gap)
  img = np.arange(2 * size * size * 3, dtype=np.float32).reshape(2, size, size, 3)
  starts = masking.gap_grid(jax.random.PRNGKey(3), 2, g, p, gap)
  out = np.asarray(lm.gap_grid_image(jnp.asarray(img), starts, p))
  assert out.shape == (2, g * p, g * p, 3)
  st = np.asarray(starts)
  for bi in range(2):
    for k in range(g * g):
      r, c = st[bi, k]
      i, j = divmod(k, g)
      np.testing.assert_array_equal(out[bi, i * p:(i + 1) * p, j * p:(j + 1) * p], img[bi, r:r + p, c:c + p])
  # Without a gap the image comes back unchanged.
  z = masking.gap_grid(jax.random.PRNGKey(0), 2, g, p, 0)
  np.testing.assert_array_equal(np.asarray(lm.gap_grid_image(jnp.asarray(img[:, :12, :12]), z, p)),
                                img[:, :12, :12])


# ---------------------------------------------------------------------------------------------
# The method.

def test_loss_equals_hand_computation():
  m = build(reg_weight=0.1, gamma=0.7)
  x = images(3)
  vis, tgt = views(3, seed=1)

  @jax.jit
  def run(x):
    p = m.init(jax.random.PRNGKey(0), x)
    s = m.init_state(p)
    return (m.forward(p, s, x, vis, tgt), m.loss_terms(p, s, x, vis, tgt, 0),
            m.tower(s["target"], x, tgt)[:, 1:], m.tower(s["target"], x, None)[:, 1:])

  (latent, pred, target), (loss, met), own, full = run(x)
  want = np_patchdisc(pred, target, 0.2) + 0.1 * ((np_sim(pred) - 0.7) ** 2 +
                                                  (np_sim(latent[:, 1:]) - 0.7) ** 2)
  np.testing.assert_allclose(float(loss), want, rtol=1e-4)
  np.testing.assert_allclose(float(met["sim"]), np_sim(latent[:, 1:]), rtol=1e-5)
  # The targets are the EMA tower on the target patches only (mask_target), a copy at init.
  np.testing.assert_allclose(np.asarray(target), np.asarray(own), rtol=1e-5, atol=1e-6)
  assert not np.allclose(np.asarray(target), np.take_along_axis(np.asarray(full), np.asarray(tgt)[..., None], 1),
                         atol=1e-4)


def test_naive_target_passes_gradients_and_stopgrad_does_not():
  x = images(2)
  vis, tgt = views(2)
  m = build(target="naive")
  p = jax.jit(m.init)(jax.random.PRNGKey(0), x)
  other = jax.tree.map(lambda v: 0.5 * v + 0.01, m.online(p))

  def grads(target, q):
    m.target = target
    f = lambda q: jnp.sum(m.targets(m.target_params(q, {"target": other}), x, vis, tgt) ** 2)  # noqa: E731
    g = jax.jit(jax.grad(f))(q)
    return {k: float(sum(jnp.sum(jnp.abs(v)) for v in jax.tree.leaves(t))) for k, t in g.items()}

  assert grads("naive", p)["encoder"] > 0 and grads("naive", p)["proj"] > 0
  assert grads("stopgrad", p)["encoder"] == 0 and grads("stopgrad", p)["proj"] == 0
  # The independent target is its own encoder in the parameters, trained by the loss.
  g = grads("independent", {**p, "target": other})
  assert g["target"] > 0 and g["encoder"] == 0
  shapes = jax.eval_shape(build(target="independent").init, jax.random.PRNGKey(0), x)
  assert set(shapes) == {"encoder", "proj", "decoder", "target"}
  assert set(shapes["target"]) == {"encoder", "proj"}


def test_ema_update_and_schedules():
  m = build(target="ema", momentum=0.9)
  assert m.run_steps()[1] == 6
  shapes = jax.eval_shape(m.init, jax.random.PRNGKey(0), images(2))
  p = jax.tree.map(lambda a: jnp.asarray(np.random.RandomState(0).randn(*a.shape), a.dtype), shapes)
  s = m.init_state(p)
  p2 = jax.tree.map(lambda v: v + 1.0, p)
  s2 = jax.jit(m.update_state)(p2, s, jnp.int32(2))
  mom = 1 - (1 - 0.9) * (1 + np.cos(np.pi * 3 / 6)) / 2      # the next iteration's momentum
  k = ("encoder", "patch_embed", "proj", "kernel")
  old = p[k[0]][k[1]][k[2]][k[3]]
  np.testing.assert_allclose(s2["target"][k[0]][k[1]][k[2]][k[3]], mom * old + (1 - mom) * (old + 1),
                             rtol=1e-5, atol=1e-7)
  np.testing.assert_allclose(float(m.gamma(3)), 0.25 + 0.5 * (0.75 - 0.25) * (1 + np.cos(np.pi / 2)), rtol=1e-6)


def test_no_weight_decay_on_embeddings_and_1d_parameters():
  m = build()
  p = jax.eval_shape(m.init, jax.random.PRNGKey(0), jnp.zeros((2, 32, 32, 3)))
  mask = m.decay_mask(p)
  assert not mask["encoder"]["patch_embed"]["proj"]["kernel"]
  assert not mask["decoder"]["embed"]["kernel"]
  assert mask["encoder"]["cls_token"] and mask["decoder"]["mask_token"]
  assert mask["decoder"]["pred"]["kernel"] and mask["proj"]["linear0"]["kernel"]
  assert not mask["proj"]["norm0"]["scale"]


# ---------------------------------------------------------------------------------------------
# Training.

@pytest.fixture(scope="module")
def uninterrupted(tmp_path_factory, compilation_cache):
  c = small(reg_weight=0.0, proj_depth=1)
  c.update(total_steps=6, ckpt_every=2)
  c.optim.update(base_lr=0.05, warmup_epochs=0)
  c.evals = {}
  wd = str(tmp_path_factory.mktemp("latent_mim") / "a")
  train.train_and_evaluate(c, wd, progress=False)
  return c, wd


def test_training_lowers_the_loss_and_logs_the_similarity(uninterrupted):
  _, wd = uninterrupted
  la = losses(wd)
  assert sorted(la) == [1, 2, 3, 4, 5, 6]
  assert np.mean([la[5], la[6]]) < np.mean([la[1], la[2]]), la
  import json
  recs = [json.loads(r) for r in open(os.path.join(wd, "metrics.jsonl"))]
  sims = [r["aux/sim"] for r in recs if "aux/sim" in r]
  assert len(sims) == 6 and all(-1 <= v <= 1 for v in sims)


def test_resumed_run_equals_uninterrupted(uninterrupted, tmp_path):
  c, a = uninterrupted
  assert_same_losses(losses(a), resumed_losses(c, str(tmp_path / "b"), stop_after=3), 6)


# ---------------------------------------------------------------------------------------------
# Configs and the ablation runner.

def test_imagenet_preset_is_the_official_recipe():
  c = load_config("latent_mim", "imagenet")
  l = c.latent_mim
  assert (c.input.image_size, c.model.patch_size, c.model.variant) == (224, 16, "base")
  assert (l.target, l.momentum, l.loss, l.temperature, l.gap, l.reg_weight) == ("ema", 0.99, "patchdisc", 0.2, 4, 0.1)
  assert (l.gamma, l.gamma_end, l.proj_head, l.proj_hidden, l.proj_depth) == (0.75, 0.25, "mlp", 4096, 3)
  assert dict(l.decoder) == {"kind": "cross", "width": 512, "depth": 3, "heads": 16} and l.visual_cues
  m = methods.get(c)
  assert m.num_vis == 20 and m.grid == 14
  assert (c.optim.b2, c.optim.weight_decay, c.optim.warmup_epochs, c.total_epochs) == (0.95, 0.05, 40, 800)
  assert optim.peak_lr(c.optim, c.input.batch_size) == pytest.approx(1.5e-4 * 4096 / 256)
  s = optim.make_schedule(c.optim, 4096, 100, 80_000)
  assert float(s(80_000)) == pytest.approx(0.25 * 1.5e-4 * 16, rel=1e-4)


def _ablations():
  path = os.path.join(os.path.dirname(__file__), "..", "tools", "latent_mim_ablations.py")
  spec = importlib.util.spec_from_file_location("latent_mim_ablations", path)
  mod = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(mod)
  return mod


def test_ablation_runner_dry_run_gives_valid_commands(tmp_path, capsys):
  ab = _ablations()
  assert set(ab.TABLES) == {"target", "loss", "masking", "decoder"}
  assert ab.main(["--table", "all", "--workdir_root", str(tmp_path), "--data", "/data/c10",
                  "--steps", "5", "--batch", "64", "--dry_run"]) == 0
  lines = [l for l in capsys.readouterr().out.splitlines() if "mim_jax.main" in l]
  # The six rows that restate the recipe (momentum target, PatchDisc, ratio 0.9 gap 1,
  # cross-attention with cues, MLP head, depth 3) are one run, in <root>/recipe.
  recipe_rows = [(t, r.label) for t, tab in ab.TABLES.items() for r in tab.rows if ab.is_recipe(r)]
  assert recipe_rows == [("target", "momentum (EMA) target"), ("loss", "PatchDisc"),
                         ("masking", "ratio 0.9, gap 1"), ("decoder", "cross-attention, visual cues"),
                         ("decoder", "MLP projection head"), ("decoder", "decoder depth 3")]
  assert len(lines) == sum(len(tab.rows) for tab in ab.TABLES.values()) - 5
  assert sum(f"--workdir={tmp_path / 'recipe'} " in l for l in lines) == 1
  for line in lines:
    assert "--config=configs/latent_mim.py:cifar10" in line and "--config.total_steps=5" in line
    assert "--config.input.batch_size=64" in line
    c = load_config("latent_mim", "cifar10")
    for arg in line.split(" --config.")[1:]:
      key, value = arg.split("=", 1)
      node = c
      *path, last = key.split(".")
      for part in path:
        node = node[part]
      assert last in node, key                          # every override is a declared key
      old = node[last]
      node[last] = type(old)(value == "True") if isinstance(old, bool) else type(old)(value)
    methods.get(c)                                      # and the values build the method
  for table in ab.TABLES:
    assert os.path.exists(tmp_path / f"{table}.md")
  # A finished row is read back into its table and skipped.
  row = ab.TABLES["target"].rows[0]
  wd = ab.workdir(str(tmp_path), "target", row)
  os.makedirs(wd)
  with open(os.path.join(wd, "metrics.jsonl"), "w") as f:
    f.write('{"step": 5, "loss": 1.0, "aux/sim": 0.999}\n')
    f.write('{"step": 5, "summary": {"knn/online/top1": 12.5, "linear/online/top1": 20.0}}\n')
  ab.main(["--table", "target", "--workdir_root", str(tmp_path), "--dry_run"])
  assert "done, skipped" in capsys.readouterr().out
  md = open(tmp_path / "target.md").read()
  assert "| 5 | 1.00 | 12.5 | 20.0 |" in md
