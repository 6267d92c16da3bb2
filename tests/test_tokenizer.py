"""Image tokenizers (mim_jax/methods/tokenizer.py, mim_jax/models/quantizer.py): losses against
hand computations, the straight-through gradient, the codebook updates (sonnet's EMA, BEiT v2's
normalised EMA, k-means init, dead-code restarts) on toy cases, the consumer contract, and
training / resuming on the embedded data."""
import json
import os

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from helpers import load_config, tiny_config, resumed_losses, assert_same_losses, losses
from mim_jax import methods, optim, teachers, train
from mim_jax.models import quantizer as vq
from mim_jax.models import vit

ONE = jax.devices()[:1]     # trainer runs on one device: a third less compile time than 8


def small(name="tokenizer", **overrides):
  """configs/<name>.py's default preset with tiny networks and codebooks."""
  c = tiny_config(name, **overrides)
  c.tokenizer.update(codebook_size=32, code_dim=8, conv=dict(hidden=16, res_hidden=8, res_layers=1),
                     decoder=dict(variant="mu", depth=1))
  c.model.depth = 1
  c.evals = {}
  return c


def metrics(workdir):
  with open(os.path.join(workdir, "metrics.jsonl")) as f:
    return [json.loads(l) for l in f]


def images(n=2, size=32, seed=0):
  return jax.random.normal(jax.random.PRNGKey(seed), (n, size, size, 3))


def brute_nearest(z, cb):
  """argmin_k |z_i - e_k|^2 by explicit loops."""
  z, cb = np.asarray(z, np.float64), np.asarray(cb, np.float64)
  return np.array([int(np.argmin([np.sum((zi - e) ** 2) for e in cb])) for zi in z])


@pytest.fixture(scope="module")
def teacher_dir(tmp_path_factory):
  """A 2-step MAE run (mu ViT, 2 blocks, patch 4 at 32 px) as VQ-KD teacher / PeCo network."""
  d = str(tmp_path_factory.mktemp("teacher"))
  c = tiny_config("mae", total_steps=2, ckpt_every=2)
  c.evals = {}
  train.train_and_evaluate(c, d, progress=False, devices=ONE)
  return d


# ---------------------------------------------------------------------------------------------
# Quantiser pieces on toy inputs.

def test_straight_through_is_q_forward_and_identity_backward():
  z = jnp.asarray([[0.3, -1.0], [2.0, 0.5]])
  q = jnp.asarray([[0.0, -1.0], [2.0, 1.0]])
  np.testing.assert_allclose(vq.straight_through(z, q), q, atol=1e-7)
  w = jnp.asarray([[1.0, 2.0], [3.0, 4.0]])
  gz, gq = jax.grad(lambda z, q: jnp.sum(w * vq.straight_through(z, q)), argnums=(0, 1))(z, q)
  np.testing.assert_array_equal(gz, w)
  np.testing.assert_array_equal(gq, 0.0)


def test_straight_through_codebook_gradients_are_the_vq_vae_losses():
  # Codes 0 and 2 are used, code 1 is not; loss = w * mean((e - sg z)^2) + beta * mean((sg e - z)^2).
  qz = vq.Quantizer("straight_through", codebook_size=3, dim=2, beta=0.25, codebook_weight=0.5)
  cb = jnp.asarray([[0.0, 0.0], [5.0, 5.0], [1.0, -1.0]])
  z = jnp.asarray([[[0.2, 0.1], [0.9, -1.2], [-0.1, 0.3]]])        # [B=1, 3, 2]
  def loss(cb, z):
    return qz({"codebook": cb}, {}, z, jax.random.PRNGKey(0)).loss
  g_cb, g_z = jax.grad(loss, argnums=(0, 1))(cb, z)
  zf = np.asarray(z[0])
  ids = brute_nearest(zf, cb)
  assert list(ids) == [0, 2, 0]
  n = zf.size
  q = np.asarray(cb)[ids]
  want_cb = np.zeros((3, 2))
  for i, k in enumerate(ids):
    want_cb[k] += 0.5 * 2 * (q[i] - zf[i]) / n          # codebook term: pulls e_k to its z's
  np.testing.assert_allclose(g_cb, want_cb, rtol=1e-5, atol=1e-7)
  np.testing.assert_allclose(g_z[0], 0.25 * 2 * (zf - q) / n, rtol=1e-5, atol=1e-7)   # commitment
  np.testing.assert_allclose(loss(cb, z), 0.75 * np.mean((q - zf) ** 2), rtol=1e-6)
  assert g_cb[1].tolist() == [0.0, 0.0]


def test_usage_and_perplexity():
  counts = vq.code_counts(jnp.asarray([0, 0, 1, 3]), 5)
  np.testing.assert_array_equal(counts, [2, 1, 0, 1, 0])
  assert float(vq.usage(counts)) == pytest.approx(3 / 5)
  p = np.array([0.5, 0.25, 0.25])
  assert float(vq.perplexity(counts)) == pytest.approx(np.exp(-np.sum(p * np.log(p))), rel=1e-5)


def test_ema_codebook_update_is_sonnets_debiased_ema():
  decay, eps, k = 0.9, 1e-5, 3
  qz = vq.Quantizer("ema", codebook_size=k, dim=2, decay=decay, epsilon=eps)
  state = qz.init_state({})
  batches = [np.array([[1.0, 0.0], [1.2, 0.2], [-3.0, 1.0], [-2.8, 1.0]]),
             np.array([[0.8, 0.0], [-3.2, 1.0], [-3.0, 1.2], [-3.1, 0.8]])]
  hid_n, hid_s = np.zeros(k), np.zeros((k, 2))
  for t, z in enumerate(batches, start=1):
    cb_before = np.asarray(state["codebook"])
    out = qz({}, state, jnp.asarray(z)[:, None], jax.random.PRNGKey(t))    # 4 images, 1 token
    ids = brute_nearest(z, cb_before)
    np.testing.assert_array_equal(out.ids[:, 0], ids)
    np.testing.assert_allclose(out.loss, 0.25 * np.mean((cb_before[ids] - z) ** 2), rtol=1e-5)
    state = qz.update({}, state, out.stats, batch_size=4)
    counts = np.bincount(ids, minlength=k).astype(np.float64)
    sums = np.zeros((k, 2))
    np.add.at(sums, ids, z)
    hid_n = hid_n - (hid_n - counts) * (1 - decay)
    hid_s = hid_s - (hid_s - sums) * (1 - decay)
    avg_n, avg_s = hid_n / (1 - decay ** t), hid_s / (1 - decay ** t)
    n = avg_n.sum()
    smoothed = (avg_n + eps) / (n + k * eps) * n
    np.testing.assert_allclose(state["codebook"], avg_s / smoothed[:, None], rtol=1e-4, atol=1e-6)
  assert int(state["ema_steps"]) == 2


def test_ema_statistics_are_exact_under_gradient_accumulation():
  # Per-image statistics averaged over two micro-batches, times the global batch, equal the
  # full batch's: the same state update.
  qz = vq.Quantizer("ema", codebook_size=8, dim=4)
  state = qz.init_state({})
  z = jax.random.normal(jax.random.PRNGKey(1), (6, 5, 4))       # 6 images x 5 tokens
  full = qz({}, state, z, jax.random.PRNGKey(0)).stats
  halves = [qz({}, state, z[i:i + 3], jax.random.PRNGKey(0)).stats for i in (0, 3)]
  mean = jax.tree.map(lambda a, b: (a + b) / 2, *halves)
  a = qz.update({}, state, full, batch_size=6)
  b = qz.update({}, state, mean, batch_size=6)
  jax.tree.map(lambda x, y: np.testing.assert_allclose(x, y, rtol=1e-5, atol=1e-6), a, b)
  np.testing.assert_allclose(np.asarray(full["counts"]) * 6,
                             np.bincount(np.asarray(qz.ids({}, state, z)).ravel(), minlength=8))


def test_norm_ema_update_is_beit_v2s():
  decay = 0.9
  qz = vq.Quantizer("norm_ema", codebook_size=3, dim=2, beta=1.0, decay=decay)
  cb = np.array([[1.0, 0.0], [0.0, 1.0], [-1.0, 0.0]])
  state = {"codebook": jnp.asarray(cb), "initted": jnp.asarray(True)}
  z = np.array([[2.0, 0.2], [3.0, -0.1], [0.1, 0.5]])      # codes 0, 0, 1; code 2 unused
  out = qz({}, state, jnp.asarray(z)[None], jax.random.PRNGKey(0))
  zn = z / np.linalg.norm(z, axis=1, keepdims=True)
  np.testing.assert_array_equal(out.ids[0], [0, 0, 1])
  np.testing.assert_allclose(out.quantized[0], cb[[0, 0, 1]], atol=1e-6)
  np.testing.assert_allclose(out.loss, np.mean((cb[[0, 0, 1]] - zn) ** 2), rtol=1e-5)
  new = qz.update({}, state, out.stats, batch_size=1)["codebook"]
  def unit(v):
    return v / np.linalg.norm(v)
  m0 = unit(zn[0] + zn[1])
  np.testing.assert_allclose(new[0], unit(decay * cb[0] + (1 - decay) * m0), rtol=1e-5)
  np.testing.assert_allclose(new[1], unit(decay * cb[1] + (1 - decay) * zn[2]), rtol=1e-5)
  np.testing.assert_allclose(new[2], cb[2], atol=1e-7)      # unused: unchanged


def test_kmeans_init_finds_the_clusters_and_starts_the_codebook():
  centres = np.array([[1.0, 0.0, 0.0], [0.0, 1.0, 0.0], [0.0, 0.0, 1.0]])
  rng = np.random.default_rng(0)
  z = np.concatenate([c + 0.05 * rng.normal(size=(20, 3)) for c in centres])
  z = z / np.linalg.norm(z, axis=1, keepdims=True)
  means = np.asarray(vq.kmeans(jax.random.PRNGKey(3), jnp.asarray(z), 3, iters=10))
  want = np.stack([z[i * 20:(i + 1) * 20].mean(0) for i in range(3)])
  want /= np.linalg.norm(want, axis=1, keepdims=True)
  order = [int(np.argmax(means @ w)) for w in want]
  assert sorted(order) == [0, 1, 2]
  np.testing.assert_allclose(means[order], want, atol=1e-5)
  # In the quantiser: the first batch is coded with the k-means codebook, which then starts
  # the normalised EMA.
  qz = vq.Quantizer("norm_ema", codebook_size=3, dim=3, beta=1.0, decay=0.99, kmeans_init=True)
  state = qz.init_state({})
  assert not bool(state["initted"])
  out = qz({}, state, jnp.asarray(z)[:, None], jax.random.PRNGKey(3))
  init = np.asarray(out.stats["init_codebook"])
  order = [int(np.argmax(init @ w)) for w in want]
  np.testing.assert_allclose(init[order], want, atol=1e-5)
  np.testing.assert_array_equal(out.ids[:, 0], np.argmax(z @ init.T, axis=1))
  new = qz.update({}, state, out.stats, batch_size=60)
  assert bool(new["initted"])
  cluster = np.asarray(out.ids[:, 0])
  for k in range(3):
    mk = z[cluster == k].sum(0)
    mk /= np.linalg.norm(mk)
    v = 0.99 * init[k] + 0.01 * mk
    np.testing.assert_allclose(new["codebook"][k], v / np.linalg.norm(v), rtol=1e-5)
  # Once initialised, the state's codebook is used as is.
  again = qz({}, new, jnp.asarray(z)[:, None], jax.random.PRNGKey(4))
  np.testing.assert_allclose(again.quantized[:, 0], np.asarray(new["codebook"])[again.ids[:, 0]], atol=1e-6)


@pytest.mark.parametrize("kind", ["ema", "norm_ema", "straight_through"])
def test_dead_codes_restart_at_batch_vectors(kind):
  qz = vq.Quantizer(kind, codebook_size=4, dim=2, decay=0.9, restart_after=2)
  params = {"codebook": jnp.asarray([[0.0, 1.0], [9.0, 9.0], [0.1, 1.0], [-9.0, 9.0]])} \
      if kind == "straight_through" else {}
  state = qz.init_state(params)
  if kind != "straight_through":
    state["codebook"] = jnp.asarray([[0.0, 1.0], [9.0, 9.0], [0.1, 1.0], [-9.0, 9.0]])
    if kind == "norm_ema":
      state["codebook"] = vq.l2norm(state["codebook"])
  z = jnp.asarray([[[0.0, 1.0]], [[0.02, 1.0]]])         # both nearest to code 0
  used = set()
  for step in range(2):
    out = qz(params, state, z, jax.random.PRNGKey(step))
    used |= set(np.asarray(out.ids).ravel().tolist())
    cand = np.asarray(out.stats["candidates"])
    state = qz.update(params, state, out.stats, batch_size=2)
  dead = sorted({0, 1, 2, 3} - used)
  assert 1 in dead and 3 in dead
  cb = np.asarray(qz.codebook(params, state))
  zs = np.asarray(qz.prepare(z)).reshape(-1, 2)
  for k in dead:       # replaced by one of the batch's (prepared) encoder outputs
    assert min(np.abs(cb[k] - v).max() for v in zs) < 1e-6, (k, cb[k])
    np.testing.assert_allclose(cb[k], cand[k] if kind != "norm_ema" else vq.l2norm(cand[k]), atol=1e-6)
    assert int(state["unused_steps"][k]) == 0
  if kind == "ema":    # the moving averages restart at count 1 and sum = the new code
    t = int(state["ema_steps"])
    np.testing.assert_allclose(np.asarray(state["ema_count"])[dead] / (1 - 0.9 ** t), 1.0, rtol=1e-5)


# ---------------------------------------------------------------------------------------------
# The method's losses against hand computations.

def test_vqvae_loss_equals_hand_computation(uninterrupted):
  run = teachers.load(uninterrupted)          # fixed weights: a trained conv VQ-VAE (EMA codebook)
  m, p, s = run.method, run.params, run.method_state
  x = images()
  loss, aux = m.loss(p, s, x, jax.random.PRNGKey(2), 0)
  z = np.asarray(m.codes(p, x)).reshape(-1, 8)                   # network output [B*L, D]
  assert z.shape == (2 * 64, 8)
  cb = np.asarray(s["quantizer"]["codebook"])
  ids = brute_nearest(z, cb)
  q = cb[ids]
  rec = np.asarray(m.decode(p, jnp.asarray(q.reshape(2, 64, 8))))
  want = np.mean((rec - np.asarray(x)) ** 2) + 0.25 * np.mean((q - z) ** 2)
  np.testing.assert_allclose(loss, want, rtol=1e-5)
  counts = np.bincount(ids, minlength=32)
  pr = counts / counts.sum()
  assert float(aux["codebook_usage"]) == pytest.approx(np.mean(counts > 0))
  assert float(aux["perplexity"]) == pytest.approx(np.exp(-np.sum(pr * np.log(pr + 1e-10))), rel=1e-5)
  np.testing.assert_allclose(aux["state_stats"]["counts"], counts / 2)     # per image


@pytest.fixture(scope="module")
def vqkd_run(teacher_dir, tmp_path_factory):
  """A 2-step VQ-KD run on the embedded data with the MAE run as its teacher."""
  d = str(tmp_path_factory.mktemp("vqkd"))
  c = small("vqkd", total_steps=2, ckpt_every=2)
  c.tokenizer.teacher = teacher_dir
  train.train_and_evaluate(c, d, progress=False, devices=ONE)
  return d


def test_vqkd_trains_with_its_teacher_in_the_state(vqkd_run, teacher_dir):
  run = teachers.load(vqkd_run)
  assert bool(run.method_state["quantizer"]["initted"])         # k-means ran on step 1
  jax.tree.map(np.testing.assert_array_equal, run.method_state["teacher"],
               teachers.load(teacher_dir).params["encoder"])
  assert sorted(losses(vqkd_run)) == [1, 2]
  assert all(np.isfinite(v) for v in losses(vqkd_run).values())


def test_vqkd_loss_equals_hand_computation(vqkd_run, teacher_dir):
  run = teachers.load(vqkd_run)
  m, p, s = run.method, run.params, run.method_state
  x = images()
  loss, aux = m.loss(p, s, x, jax.random.PRNGKey(2), 0)
  z = np.asarray(m.codes(p, x)).reshape(-1, 8)
  zn = z / np.linalg.norm(z, axis=1, keepdims=True)
  cb = np.asarray(s["quantizer"]["codebook"])
  np.testing.assert_allclose(np.linalg.norm(cb, axis=1), 1.0, rtol=1e-5)
  ids = np.argmax(zn @ cb.T, axis=1)                   # nearest unit code = largest cosine
  q = cb[ids]
  teacher = teachers.load(teacher_dir)
  width = teacher.method.encoder.width
  pred = np.asarray(m.decode(p, jnp.asarray(q.reshape(2, 64, 8)))).reshape(-1, width)
  target = np.asarray(teacher.method.encoder.apply({"params": teacher.params["encoder"]}, x))[:, 1:]
  target = target.reshape(-1, width)
  cos = np.sum(pred * target, 1) / np.linalg.norm(pred, axis=1) / np.linalg.norm(target, axis=1)
  want = np.mean(1 - cos) + 1.0 * np.mean((q - zn) ** 2)
  np.testing.assert_allclose(loss, want, rtol=1e-5)
  np.testing.assert_allclose(aux["rec_loss"], np.mean(1 - cos), rtol=1e-5)


def official_vqkd_rule(names):
  """What beit2's VQKD does to each parameter (modeling_vqkd.py, modeling_finetune.py), written
  out independently of the method: ('uniform', None) for the Conv2d patch embeddings' PyTorch
  default (the bound 1/sqrt(fan_in) comes from the kernel's shape), ('normal', std) for timm's
  trunc_normal_(std=.02) (bounds +-2: uncut) after fix_init_weight, ('const', value) for the
  zero biases and the LayerNorm scales."""
  leaf = names[-1]
  if "patch_embed" in names:             # kernel [p * p * C_in, width]; its bias uses the same fan-in
    return "uniform", None
  if leaf in ("cls_token", "pos_embed", "kernel", "qkv_kernel"):
    block = [n for n in names if n.startswith("block")]
    if block and names[-3:-1] in (("attn", "proj"), ("mlp", "fc2")):
      return "normal", 0.02 / np.sqrt(2.0 * (int(block[0][5:]) + 1))
    return "normal", 0.02
  if leaf in ("bias", "q_bias", "v_bias"):
    return "const", 0.0
  if leaf == "scale":
    return "const", 1.0
  raise AssertionError(f"no official rule for {'/'.join(names)}")


def test_vqkd_official_init_matches_beit2_leaf_by_leaf(monkeypatch):
  from mim_jax.methods.base import path_names
  c = small("vqkd")
  c.model.depth = 2
  c.tokenizer.decoder = dict(variant="mu", depth=2)
  assert c.tokenizer.official_init and c.model.init_style == "beit"
  m = methods.get(c)

  class Teacher:
    encoder = type("E", (), {"width": 96})()

  monkeypatch.setattr(m, "teacher_method", lambda: Teacher)
  p = jax.jit(m.init)(jax.random.PRNGKey(0), images())
  leaves = [(path_names(path), np.asarray(x, np.float64))
            for path, x in jax.tree_util.tree_flatten_with_path(p)[0]]
  fan_in = {n[:-1]: x.shape[0] for n, x in leaves if "patch_embed" in n and n[-1] == "kernel"}
  assert sorted(fan_in.values()) == [8, 4 * 4 * 3]                 # decoder 1x1 from the codes
  seen = set()
  for names, x in leaves:
    kind, value = official_vqkd_rule(names)
    where = "/".join(names)
    seen.add(kind)
    if kind == "const":
      np.testing.assert_array_equal(x, value, err_msg=where)
    elif kind == "uniform":        # kaiming_uniform_(a=sqrt(5)) / the bias rule: U(+-1/sqrt(fan_in))
      bound = 1.0 / np.sqrt(fan_in[names[:-1]])
      assert np.abs(x).max() <= bound, where
      assert np.abs(x).max() > 0.85 * bound, where               # fills the interval
      assert abs(x.std() / (bound / np.sqrt(3.0)) - 1) < 0.2, where
    else:                          # N(0, std^2), not cut at one std as the 'beit' style is
      n = x.size
      assert abs(x.std() / value - 1) < 4 / np.sqrt(2 * n) + 0.02, (where, x.std(), value)
      assert abs(x.mean()) < 4 * value / np.sqrt(n), where
      assert np.abs(x).max() > 1.5 * value, where
      if n >= 1000:
        assert 0.27 < np.mean(np.abs(x) > value) < 0.37, where      # 31.7% beyond one std
  assert seen == {"const", "uniform", "normal"}
  # The rescale is per block: block01's proj / fc2 at .02 / 2, block00's at .02 / sqrt(2).
  blk = p["encoder"]["encoder"]
  assert float(jnp.std(blk["block01"]["mlp"]["fc2"]["kernel"])) == pytest.approx(0.01, rel=0.05)
  assert float(jnp.std(blk["block00"]["mlp"]["fc2"]["kernel"])) == pytest.approx(0.02 / np.sqrt(2), rel=0.05)
  # Other tokenizers keep their initialisation (official_init off; only arch 'vit' takes it).
  assert not load_config("tokenizer").tokenizer.official_init
  assert not load_config("peco").tokenizer.official_init
  c.tokenizer.update(official_init=False)
  m2 = methods.get(c)
  monkeypatch.setattr(m2, "teacher_method", lambda: Teacher)
  p2 = jax.jit(m2.init)(jax.random.PRNGKey(0), images())
  cut = np.asarray(p2["encoder"]["patch_embed"]["proj"]["kernel"])
  assert np.abs(cut).max() <= 0.02 + 1e-7                       # the 'beit' style's cut at 1 std
  c2 = small("tokenizer")
  c2.tokenizer.official_init = True
  with pytest.raises(ValueError, match="config.tokenizer.arch='vit'"):
    methods.get(c2)


def test_peco_loss_adds_the_perceptual_term(teacher_dir, uninterrupted):
  c = small("peco")
  c.tokenizer.update(teacher=teacher_dir, perceptual_layers=(1, 2), perceptual_weight=0.7)
  m = methods.get(c)
  # Fixed weights: the trained conv VQ-VAE's (same shapes), its EMA codes as the codebook parameter.
  trained = teachers.load(uninterrupted)
  p = {**trained.params, "quantizer": {"codebook": trained.method_state["quantizer"]["codebook"]}}
  s = {**m.init_state(p), **m.external_state()}
  x = images()
  loss, aux = m.loss(p, s, x, jax.random.PRNGKey(2), 0)
  z = np.asarray(m.codes(p, x)).reshape(-1, 8)
  cb = np.asarray(p["quantizer"]["codebook"])
  ids = brute_nearest(z, cb)
  q = cb[ids]
  rec = m.decode(p, jnp.asarray(q.reshape(2, 64, 8)))
  run = teachers.load(teacher_dir)
  def blocks(imgs):
    _, inter = run.method.encoder.apply({"params": run.params["encoder"]}, imgs, mutable=["intermediates"])
    return [np.asarray(b)[:, 1:] for b in inter["intermediates"]["encoder"]["block_outputs"]]
  fx, fr = blocks(x), blocks(rec)
  perceptual = sum(np.mean((fx[l] - fr[l]) ** 2) for l in (0, 1))
  # VQGAN's legacy quantiser loss: 1.0 x commitment + 0.25 x codebook (equal values forward);
  # its L1 on [-1, 1] images.
  pixel = np.mean(np.abs(minus_one_one(rec, c) - minus_one_one(x, c)))
  want = pixel + 0.7 * perceptual + 1.25 * np.mean((q - z) ** 2)
  np.testing.assert_allclose(aux["rec_loss"], pixel, rtol=1e-5)
  np.testing.assert_allclose(aux["perceptual_loss"], perceptual, rtol=1e-5)
  np.testing.assert_allclose(loss, want, rtol=1e-5)
  # The gradient reaches the reconstruction through the frozen network.
  g = jax.grad(lambda r: m.perceptual_loss(s, x, r))(rec)
  assert float(jnp.abs(g).sum()) > 0


def minus_one_one(x, c):
  """Normalised NHWC images on VQGAN's [-1, 1] scale, by hand: 2 (x std + mean) - 1."""
  mean, std = np.asarray(c.input.mean, np.float64), np.asarray(c.input.std, np.float64)
  return 2.0 * (np.asarray(x, np.float64) * std + mean) - 1.0


def test_peco_pixel_term_is_the_l1_on_minus_one_one_images():
  c = small("peco")
  assert c.tokenizer.pixel_space == "minus_one_one" and c.tokenizer.pixel_loss == "l1"
  c.tokenizer.perceptual_weight = 0.0             # the pixel and quantiser terms alone
  m = methods.get(c)
  x = images()
  p = jax.jit(m.init)(jax.random.PRNGKey(0), x)
  s = m.init_state(p)
  loss, aux = m.loss(p, s, x, jax.random.PRNGKey(2), 0)
  qo, rec = m.forward(p, s, x, jax.random.PRNGKey(2), 0)
  x11, rec11 = minus_one_one(x, c), minus_one_one(rec, c)
  want = np.mean(np.abs(rec11 - x11))
  np.testing.assert_allclose(aux["rec_loss"], want, rtol=1e-5)
  np.testing.assert_allclose(loss, want + float(qo.loss), rtol=1e-5)
  # The normalised-pixel L1 (the plain tokenizer's default scale) is ~2.2x larger.
  normalised = np.mean(np.abs(np.asarray(rec) - np.asarray(x)))
  assert 2.0 < normalised / want < 2.4
  c.tokenizer.pixel_space = "normalized"
  _, aux = methods.get(c).loss(p, s, x, jax.random.PRNGKey(2), 0)
  np.testing.assert_allclose(aux["rec_loss"], normalised, rtol=1e-5)
  assert load_config("tokenizer").tokenizer.pixel_space == "normalized"
  c.tokenizer.pixel_space = "zero_one"
  with pytest.raises(ValueError, match="config.tokenizer.pixel_space"):
    methods.get(c)


def test_token_ids_contract(uninterrupted):
  run = teachers.load(uninterrupted)        # as a consumer (BEiT, CAE) reads a tokenizer run
  m, p, s = run.method, run.params, run.method_state
  x = images(3)
  assert (m.codebook_size, m.image_size, m.token_grid) == (32, 32, 8)
  ids = jax.jit(m.token_ids)(p, m.frozen_state(s), x)     # what a consumer keeps
  assert ids.shape == (3, 64) and ids.dtype == jnp.int32
  # Row-major over the grid: id [b, r * 8 + col] is the nearest code of the conv code map at (r, col).
  h = m.conv_encoder.apply({"params": p["encoder"]}, x)
  zmap = np.asarray(m.to_code.apply({"params": p["to_code"]}, h))         # [3, 8, 8, 8]
  cb = np.asarray(s["quantizer"]["codebook"])
  ids = np.asarray(ids)
  for b in range(3):
    for r in range(8):
      for col in range(8):
        assert ids[b, r * 8 + col] == brute_nearest(zmap[b, r, col][None], cb)[0]


def test_missing_teacher_names_the_config_key():
  c = small("vqkd")
  m = methods.get(c)
  with pytest.raises(teachers.TeacherError, match="config.tokenizer.teacher"):
    m.external_state()


# ---------------------------------------------------------------------------------------------
# Training on the embedded data.

@pytest.fixture(scope="module")
def uninterrupted(tmp_path_factory, compilation_cache):
  c = resume_config()
  d = str(tmp_path_factory.mktemp("tok_a"))
  train.train_and_evaluate(c, d, progress=False, devices=ONE)
  return d


def resume_config():
  c = small("tokenizer", total_steps=6, ckpt_every=2)
  c.tokenizer.restart_after = 2          # restarts and EMA averages: all state
  c.optim.base_lr = 2e-3
  return c


def test_a_few_steps_lower_the_loss(uninterrupted):
  ls = losses(uninterrupted)
  assert sorted(ls) == [1, 2, 3, 4, 5, 6]
  assert ls[6] < 0.8 * ls[1], ls
  rec = [r for r in metrics(uninterrupted) if "loss" in r][-1]
  assert 0 < rec["aux/codebook_usage"] <= 1 and rec["aux/perplexity"] >= 1


def test_resumed_run_equals_uninterrupted(uninterrupted, tmp_path):
  c = resume_config()
  b = str(tmp_path / "b")
  assert_same_losses(losses(uninterrupted), resumed_losses(c, b, stop_after=3, devices=ONE), 6)
  # The EMA codebook, its averages and the restart counters continue bit for bit.
  ra, rb = teachers.load(uninterrupted), teachers.load(b)
  jax.tree.map(np.testing.assert_array_equal, ra.method_state, rb.method_state)
  jax.tree.map(np.testing.assert_array_equal, ra.params, rb.params)


# ---------------------------------------------------------------------------------------------
# Presets.

@pytest.mark.parametrize("name", ["tokenizer", "vqkd", "peco"])
@pytest.mark.parametrize("preset", ["", "cifar10", "imagenet"])
def test_presets_build_with_the_consumer_patch_grid(name, preset):
  c = load_config(name, preset)
  m = methods.get(c)
  assert m.name == "tokenizer" and c.input.batch_size % 8 == 0
  assert m.token_grid == {"": 8, "cifar10": 8, "imagenet": 14}[preset]
  assert not c.evals.knn.enabled and c.evals.reconstruction.enabled


def test_vqkd_imagenet_is_the_official_recipe(monkeypatch):
  c = load_config("vqkd", "imagenet")
  t = c.tokenizer
  assert (t.codebook_size, t.code_dim, t.quantizer, t.beta, t.decay, t.kmeans_init) == \
      (8192, 32, "norm_ema", 1.0, 0.99, True)
  assert (c.model.variant, c.model.patch_size, c.model.qkv_bias, c.model.pos_embed) == \
      ("base", 16, "qv", "learned")
  assert dict(t.decoder) == {"variant": "base", "depth": 3} and t.restart_after == 0
  assert (c.optim.b1, c.optim.b2, c.optim.weight_decay, c.total_epochs) == (0.9, 0.99, 1e-4, 100)
  assert tuple(c.input.aug.crop_scale) == (0.08, 1.0)
  spe = 1000
  s = optim.make_schedule(c.optim, 512, spe, 100 * spe)
  assert float(s(0)) == 0.0     # run_vqkd_training.py: cosine_scheduler with no warm-up start value
  assert c.tokenizer.official_init                           # modeling_vqkd.py's initialisation
  assert float(s(10 * spe)) == pytest.approx(5e-5 * 512 / 128, rel=1e-5)
  assert float(s(100 * spe)) == pytest.approx(1e-5, rel=1e-4)
  m = methods.get(c)

  class Teacher:                      # CLIP ViT-B/16's 512-d output
    encoder = type("E", (), {"width": 512})()

  monkeypatch.setattr(m, "teacher_method", lambda: Teacher)
  p = jax.eval_shape(m.init, jax.random.PRNGKey(0), jnp.zeros((1, 224, 224, 3)))
  assert p["to_code"]["fc1"]["kernel"].shape == (768, 768)
  assert p["to_code"]["fc2"]["kernel"].shape == (768, 32)
  assert p["decoder"]["task"]["fc2"]["kernel"].shape == (768, 512)
  assert p["decoder"]["backbone"]["patch_embed"]["proj"]["kernel"].shape == (32, 768)   # patch 1
  assert sorted(k for k in p["decoder"]["backbone"]["encoder"] if k.startswith("block")) == \
      ["block00", "block01", "block02"]
  assert p["decoder"]["backbone"]["pos_embed"].shape == (1, 197, 768)


def test_a_vit_tokenizers_encoder_is_evaluated_on_its_own_parameters():
  """features() of an arch='vit' tokenizer pools its ViT encoder's tokens with the encoder's
  parameters (the former Tokenizer.encode, now `codes`, no longer shadows a base method that
  evaluators reach)."""
  c = small()
  c.tokenizer.arch = "vit"
  m = methods.get(c)
  x = images()
  p = jax.jit(m.init)(jax.random.PRNGKey(0), x)
  got = m.features(p, m.init_state(p), x)["online"]
  tokens = m.encoder.apply({"params": p["encoder"]}, x)
  np.testing.assert_allclose(got, vit.pool(tokens, m.pooling), rtol=1e-6, atol=1e-6)
  assert m.codes(p, x).shape[:2] == (2, 64) and not hasattr(type(m).__mro__[1], "encode")
