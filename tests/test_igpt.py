"""iGPT: the causal mask, the palette (quantisation, k-means, cache), the model against a NumPy
re-derivation of openai/image-gpt's model.py, the autoregressive and BERT losses, the
half-image completion, the evaluators' features and exact resume."""
import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from helpers import apply_overrides, assert_same_losses, load_config, losses, resumed_losses
from mim_jax import methods, models
from mim_jax.methods import igpt
from mim_jax.models import gpt
from mim_jax.targets import palette as P

TINY = dict(depth=2, width=32, num_heads=2, resolution=4, vocab=512)


def tiny_config(tmp, objective="autoregressive", **overrides):
  c = load_config("igpt")
  c.model.update(depth=1, width=32, num_heads=2, resolution=8)
  c.igpt.update(objective=objective, palette_images=200, palette_pixels=4000, palette_iters=3,
                palette_cache=str(tmp))
  c.input.batch_size = 8
  c.total_steps, c.log_every, c.ckpt_every, c.keep_ckpts = 4, 1, 2, 5
  c.optim.warmup_epochs = 0.0
  c.evals = {}
  return apply_overrides(c, overrides)


def random_params(model, seed=0, scale=0.3):
  """Parameters of the module's shapes, every leaf random (the zero-initialised head included):
  gains near 1, matrices N(0, scale)."""
  shapes = jax.eval_shape(model.init, jax.random.PRNGKey(0),
                          jnp.zeros((1, model.seq_len), jnp.int32))["params"]
  rng = np.random.default_rng(seed)
  return jax.tree.map(lambda x: jnp.asarray(
      1.0 + 0.1 * rng.standard_normal(x.shape) if len(x.shape) == 1
      else scale * rng.standard_normal(x.shape), jnp.float32), shapes)


# --------------------------------------------------------------------------- the causal mask

@pytest.mark.parametrize("causal", [True, False])
def test_the_causal_mask_lets_no_position_see_a_later_one(causal):
  model = gpt.GPT(**TINY, causal=causal)
  params = random_params(model)
  n = model.seq_len
  tokens = jax.random.randint(jax.random.PRNGKey(3), (2, n), 0, 512)
  fn = jax.jit(lambda t: model.apply({"params": params}, t, logits=True,
                                     mutable=["intermediates"]))
  (h0, l0), inter0 = fn(tokens)
  for j in range(n):
    (h1, l1), inter1 = fn(tokens.at[:, j].set((tokens[:, j] + 1 + j) % 512))
    if causal:
      # Position i reads tokens < i (the sos shift): outputs up to j are exactly unchanged.
      np.testing.assert_array_equal(np.asarray(l1[:, :j + 1]), np.asarray(l0[:, :j + 1]))
      np.testing.assert_array_equal(np.asarray(h1[:, :j + 1]), np.asarray(h0[:, :j + 1]))
      for a, b in zip(inter0["intermediates"]["blocks"], inter1["intermediates"]["blocks"]):
        np.testing.assert_array_equal(np.asarray(a[:, :j + 1]), np.asarray(b[:, :j + 1]))
      if j + 1 < n:
        assert float(jnp.abs(l1[:, j + 1:] - l0[:, j + 1:]).max()) > 0
    else:     # bidirectional: every position sees the change
      assert float(jnp.abs(h1 - h0).max(axis=-1).min()) > 0


# --------------------------------------------------------------------------- the palette

def test_quantisation_is_the_nearest_centre_as_numpy():
  rng = np.random.default_rng(0)
  centres = rng.uniform(-1, 1, (512, 3)).astype(np.float32)
  pix = rng.uniform(-1, 1, (7, 9, 3)).astype(np.float32)
  d = ((pix.reshape(-1, 3)[:, None, :] - centres[None]) ** 2).sum(-1)
  want = d.argmin(1).reshape(7, 9)
  got = np.asarray(P.quantize(jnp.asarray(pix), jnp.asarray(centres)))
  np.testing.assert_array_equal(got, want)
  # Exact centres map to themselves; decoding returns the centre.
  np.testing.assert_array_equal(np.asarray(P.quantize(jnp.asarray(centres), centres)), np.arange(512))
  np.testing.assert_array_equal(np.asarray(P.dequantize(jnp.asarray(want), centres)), centres[want])
  # image_tokens: normalised images -> [-1, 1] -> raster order at the resolution.
  mean, std = (0.4, 0.5, 0.6), (0.2, 0.25, 0.3)
  img01 = rng.uniform(0, 1, (2, 4, 4, 3)).astype(np.float32)
  norm = (img01 - np.asarray(mean)) / np.asarray(std)
  toks = np.asarray(P.image_tokens(jnp.asarray(norm, jnp.float32), centres, 4, mean, std))
  d = ((img01.reshape(-1, 3) * 2 - 1)[:, None] - centres[None]) ** 2
  np.testing.assert_array_equal(toks, d.sum(-1).argmin(1).reshape(2, 16))
  # The default palette: 512 distinct grid colours in [-1, 1].
  grid = P.default_palette()
  assert grid.shape == (512, 3) and len(np.unique(grid, axis=0)) == 512 and np.abs(grid).max() < 1


def test_kmeans_is_deterministic_for_a_seed_and_a_lloyd_fixed_point():
  rng = np.random.default_rng(1)
  pix = rng.uniform(-1, 1, (3000, 3)).astype(np.float32)
  a = P.kmeans(pix, k=16, iters=40, seed=0)
  b = P.kmeans(pix, k=16, iters=40, seed=0)
  c = P.kmeans(pix, k=16, iters=40, seed=1)
  np.testing.assert_array_equal(a, b)
  assert not np.array_equal(a, c)
  # Converged: each centre is the mean of the pixels nearest to it.
  idx = ((pix[:, None] - a[None]) ** 2).sum(-1).argmin(1)
  means = np.stack([pix[idx == i].mean(0) for i in range(16)])
  np.testing.assert_allclose(a, means, atol=1e-4)
  with pytest.raises(ValueError, match="distinct colours"):
    P.kmeans(pix[:10], k=16)


def test_palette_from_the_data_is_cached(tmp_path, monkeypatch):
  c = tiny_config(tmp_path)
  kw = dict(resolution=8, k=512, num_images=200, num_pixels=4000, iters=3, seed=0,
            cache_dir=str(tmp_path))
  first = P.compute_palette(c.input, **kw)
  assert first.shape == (512, 3) and np.abs(first).max() <= 1.0
  monkeypatch.setattr(P, "kmeans", lambda *a, **k: pytest.fail("recomputed"))
  np.testing.assert_array_equal(P.compute_palette(c.input, **kw), first)
  assert P.palette_key(c.input, **{**kw, "seed": 1}) != P.palette_key(c.input, **kw)


# --------------------------------------------------------------------------- the model by hand

def numpy_forward(params, tokens, depth, heads, causal, keep=None):
  """image-gpt's model.py `model` in NumPy: -> (final-norm h, gen_logits)."""
  p = jax.tree.map(lambda x: np.asarray(x, np.float64), params)

  def norm(x, g):
    return x / np.sqrt((x ** 2).mean(-1, keepdims=True) + 1e-5) * g

  h = p["wte"][tokens]
  if causal:
    h = np.concatenate([np.broadcast_to(p["sos"], (h.shape[0], 1, h.shape[2])), h[:, :-1]], 1)
  elif keep is not None:
    h = h * keep[..., None]
  h = h + p["wpe"][None]
  n = h.shape[1]
  for i in range(depth):
    b = p[f"h{i}"]
    x = norm(h, b["ln_1"]["g"])
    q, k, v = (np.einsum("bsf,hef->bhse", x, b["attn"][w]) for w in ("q_proj", "k_proj", "v_proj"))
    w = q @ k.transpose(0, 1, 3, 2) / np.sqrt(v.shape[-1])
    if causal:
      m = np.tril(np.ones((n, n)))
      w = w * m - 1e10 * (1 - m)
    w = np.exp(w - w.max(-1, keepdims=True))
    w = w / w.sum(-1, keepdims=True)
    h = h + np.einsum("bhse,hef->bsf", w @ v, b["attn"]["c_proj"])
    x = norm(h, b["ln_2"]["g"])
    f = x @ b["c_fc"]["w"]
    f = f / (1 + np.exp(-1.702 * f))
    h = h + f @ b["c_proj"]["w"]
  h = norm(h, p["ln_f"]["g"])
  return h, h @ p["wtet"].T


def numpy_ce(logits, tokens):
  z = logits - logits.max(-1, keepdims=True)
  logp = z - np.log(np.exp(z).sum(-1, keepdims=True))
  return -np.take_along_axis(logp, tokens[..., None], -1)[..., 0]


def test_the_model_is_image_gpts_and_the_ar_loss_predicts_each_token_from_the_earlier_ones():
  model = gpt.GPT(**TINY)
  params = random_params(model, seed=4)
  tokens = jax.random.randint(jax.random.PRNGKey(5), (3, model.seq_len), 0, 512)
  h, logits = jax.jit(lambda p, t: model.apply({"params": p}, t, logits=True))(params, tokens)
  want_h, want_logits = numpy_forward(params, np.asarray(tokens), 2, 2, True)
  np.testing.assert_allclose(np.asarray(h), want_h, rtol=2e-4, atol=2e-4)
  np.testing.assert_allclose(np.asarray(logits), want_logits, rtol=2e-4, atol=2e-4)
  # The shifted targets: logits at i score token i (not i + 1).
  want = numpy_ce(want_logits, np.asarray(tokens)).mean()
  np.testing.assert_allclose(float(igpt.ar_loss(logits, tokens)), want, rtol=1e-5)
  # Fresh initialisation: the zero head gives log(512) exactly; init scales as the official.
  fresh = jax.jit(model.init)(jax.random.PRNGKey(0), tokens)["params"]
  _, l0 = model.apply({"params": fresh}, tokens, logits=True)
  np.testing.assert_allclose(float(igpt.ar_loss(l0, tokens)), np.log(512), rtol=1e-6)
  assert float(jnp.abs(fresh["wtet"]).max()) == 0.0
  assert "bias" not in str(jax.tree_util.tree_structure(fresh))
  std = lambda *path: float(np.std(np.asarray(  # noqa: E731
      functools.reduce(lambda a, k: a[k], path, fresh))))
  np.testing.assert_allclose(std("wpe"), 0.01, rtol=0.08)
  np.testing.assert_allclose(std("wte"), 0.02, rtol=0.08)
  # q/k/v N(0, 1/sqrt(width)), c_proj N(0, 1/sqrt(width * depth)), MLP N(0, 0.02) (width 32, 2 blocks).
  np.testing.assert_allclose(std("h0", "attn", "q_proj"), 32 ** -0.5, rtol=0.08)
  np.testing.assert_allclose(std("h1", "attn", "c_proj"), 64 ** -0.5, rtol=0.08)
  np.testing.assert_allclose(std("h0", "c_fc", "w"), 0.02, rtol=0.08)
  assert gpt.param_count(gpt.from_config(gpt.default_config("s"))) == pytest.approx(76e6, rel=0.02)


def test_bert_loss_counts_only_masked_positions_15_percent_in_expectation():
  keep = igpt.bert_keep_mask(jax.random.PRNGKey(0), (400, 256), 0.15)
  assert abs(1.0 - float(keep.mean()) - 0.15) < 0.003
  model = gpt.GPT(**TINY, causal=False)
  params = random_params(model, seed=6)
  assert "sos" not in params
  tokens = jax.random.randint(jax.random.PRNGKey(7), (3, model.seq_len), 0, 512)
  keep = igpt.bert_keep_mask(jax.random.PRNGKey(8), tokens.shape, 0.3)
  keep = keep.at[:, 0].set(False)      # at least one masked token per image
  h, logits = model.apply({"params": params}, tokens, keep=keep, logits=True)
  want_h, want_logits = numpy_forward(params, np.asarray(tokens), 2, 2, False,
                                      np.asarray(keep, np.float64))
  np.testing.assert_allclose(np.asarray(logits), want_logits, rtol=2e-4, atol=2e-4)
  ce, im = numpy_ce(want_logits, np.asarray(tokens)), ~np.asarray(keep)
  want = np.mean([ce[b][im[b]].mean() for b in range(3)])
  np.testing.assert_allclose(float(igpt.bert_loss(logits, tokens, keep)), want, rtol=1e-5)
  # Logits at kept positions do not count; a masked token's value never reaches the model.
  noisy = jnp.where(keep[..., None], logits + 100.0 * jnp.arange(512.0), logits)
  np.testing.assert_allclose(float(igpt.bert_loss(noisy, tokens, keep)), want, rtol=1e-5)
  other = jnp.where(keep, tokens, (tokens + 7) % 512)
  h2 = model.apply({"params": params}, other, keep=keep)
  np.testing.assert_array_equal(np.asarray(h2), np.asarray(h))


# --------------------------------------------------------------------------- the method

@pytest.fixture(scope="module")
def ar_setup(tmp_path_factory):
  tmp = tmp_path_factory.mktemp("palette")
  c = tiny_config(tmp)
  m = methods.get(c)
  v = jax.jit(m.init_variables)(jax.random.PRNGKey(0), m.init_input())
  state = {**m.initial_state(v), **m.external_state()}
  images = jax.random.normal(jax.random.PRNGKey(1), (4, 32, 32, 3))
  return c, m, random_params_tree(v["params"]), state, images


def random_params_tree(params):
  rng = np.random.default_rng(9)
  return jax.tree.map(lambda x: x + jnp.asarray(0.2 * rng.standard_normal(x.shape), x.dtype),
                      params)


def test_method_loss_is_the_ar_loss_of_the_palette_sequence(ar_setup):
  c, m, params, state, images = ar_setup
  loss, aux = jax.jit(m.loss)(params, state, images, jax.random.PRNGKey(0), jnp.int32(0))
  toks = m.tokens(state, images)
  assert toks.shape == (4, 64) and int(toks.max()) < 512
  want_h, want_logits = numpy_forward(params["encoder"], np.asarray(toks), 1, 2, True)
  np.testing.assert_allclose(float(loss), numpy_ce(want_logits, np.asarray(toks)).mean(), rtol=1e-4)
  assert 0.0 <= float(aux["accuracy"]) <= 1.0
  # The evaluators' path: the GPT quantises the normalised images with the method's palette.
  feats = jax.jit(m.features)(params, state, images)["online"]
  np.testing.assert_allclose(np.asarray(feats), want_h.mean(1), rtol=2e-4, atol=2e-4)
  layers = jax.jit(lambda p, s, x: m.layer_features(p, s, x, "mean"))(params, state, images)["online"]
  assert len(layers) == c.model.depth + 1
  np.testing.assert_allclose(np.asarray(layers[-1]), np.asarray(feats), rtol=1e-6)
  out = models.outputs(m.encoder, m.encoder_variables(params, state)["online"], images,
                       pooling="mean")
  assert out["tokens"].shape == (4, 64, 32) and out["grid"] == (8, 8) and out["stride"] == 4
  with pytest.raises(ValueError, match="pools with 'mean'"):
    models.outputs(m.encoder, {"params": params["encoder"]}, images, pooling="cls")


def test_half_image_completion_keeps_the_given_half(ar_setup):
  c, m, params, state, images = ar_setup
  toks = m.tokens(state, images)
  fn = lambda t, keep: m.logits(params, state, t, keep)  # noqa: E731
  out = jax.jit(lambda t, r: igpt.complete(fn, t, 32, r, 1.0))(toks, jax.random.PRNGKey(2))
  np.testing.assert_array_equal(np.asarray(out[:, :32]), np.asarray(toks[:, :32]))
  assert not np.array_equal(np.asarray(out[:, 32:]), np.asarray(toks[:, 32:]))
  again = igpt.complete(fn, toks, 32, jax.random.PRNGKey(2), 1.0)
  np.testing.assert_array_equal(np.asarray(again), np.asarray(out))      # seeded
  # Greedy: each drawn token is the argmax of the logits given everything before it.
  greedy = igpt.complete(fn, toks, 32, jax.random.PRNGKey(0), 0.0)
  np.testing.assert_array_equal(np.asarray(jnp.argmax(fn(greedy, None), -1)[:, 32:]),
                                np.asarray(greedy[:, 32:]))
  rec = jax.jit(m.reconstruct)(params, state, images, jax.random.PRNGKey(2))
  assert rec["masked"].shape == rec["reconstruction"].shape == images.shape
  # The top half of the picture (rows 0..15 of 32 px: 4 IR rows x 4 px) is the given half.
  np.testing.assert_array_equal(np.asarray(rec["masked"][:, :16]),
                                np.asarray(rec["reconstruction"][:, :16]))


def test_bert_method_and_bad_config(tmp_path):
  c = tiny_config(tmp_path, "bert")
  m = methods.get(c)
  assert not m.encoder.causal
  v = jax.jit(m.init_variables)(jax.random.PRNGKey(0), m.init_input())
  state = {**m.initial_state(v), **m.external_state()}
  images = jax.random.normal(jax.random.PRNGKey(1), (4, 32, 32, 3))
  loss, aux = jax.jit(m.loss)(v["params"], state, images, jax.random.PRNGKey(0), jnp.int32(0))
  np.testing.assert_allclose(float(loss), np.log(512), rtol=1e-5)
  assert 0.05 < float(aux["masked_fraction"]) < 0.3
  rec = jax.jit(m.reconstruct)(v["params"], state, images, jax.random.PRNGKey(2))
  np.testing.assert_array_equal(np.asarray(rec["masked"][:, :16]),
                                np.asarray(rec["reconstruction"][:, :16]))
  with pytest.raises(ValueError, match="objective"):
    methods.get(tiny_config(tmp_path, "causal"))
  bad = tiny_config(tmp_path)
  bad.model.num_heads = 3
  with pytest.raises(ValueError, match="multiple of num_heads"):
    models.check_config(bad.model)


def test_exact_resume(tmp_path):
  c = tiny_config(tmp_path / "cache")
  from mim_jax import train
  a = str(tmp_path / "a")
  train.train_and_evaluate(c, a, progress=False)
  want = losses(a)
  np.testing.assert_array_equal(np.load(f"{a}/palette.npy").shape, (512, 3))
  got = resumed_losses(c, str(tmp_path / "b"), stop_after=2)
  assert_same_losses(want, got, 4)
  assert want[4] < want[1]
