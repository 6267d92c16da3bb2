"""DALL-E's Gumbel-softmax dVAE option of the image tokenizer (config.tokenizer.quantizer='gumbel',
mim_jax/models/quantizer.py): the KL to the uniform prior and the cosine schedules against hand
computations, the relaxed sample's low-temperature limit, the loss by hand, the ids a consumer
(BEiT) reads, and training / resuming on the embedded data."""
import json
import math
import os

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from helpers import load_config, tiny_config, resumed_losses, assert_same_losses, losses
from mim_jax import methods, teachers, train
from mim_jax.methods.tokenizer import default_tokenizer_config
from mim_jax.models import quantizer as vq

ONE = jax.devices()[:1]     # one device: the trainer compiles faster than on 8


def small(**overrides):
  """configs/tokenizer.py's default preset as a tiny conv dVAE (32 codes of 8 channels)."""
  c = tiny_config("tokenizer", **overrides)
  c.tokenizer.update(quantizer="gumbel", codebook_size=32, code_dim=8,
                     conv=dict(hidden=16, res_hidden=8, res_layers=1))
  c.evals = {}
  return c


def images(n=2, seed=0):
  return jax.random.normal(jax.random.PRNGKey(seed), (n, 32, 32, 3))


def np_softmax(x):
  x = np.asarray(x, np.float64)
  e = np.exp(x - x.max(-1, keepdims=True))
  return e / e.sum(-1, keepdims=True)


def np_kl_uniform(logits):
  """sum_k q_k log(K q_k), q = softmax(logits), by explicit loops over positions and codes."""
  q = np_softmax(logits).reshape(-1, np.shape(logits)[-1])
  k = q.shape[1]
  out = [sum(qi[j] * math.log(k * qi[j]) for j in range(k) if qi[j] > 0) for qi in q]
  return np.array(out).reshape(np.shape(logits)[:-1])


def tau_at(step, start=1.0, end=1 / 16, steps=150_000):
  return end + (start - end) * (1 + math.cos(math.pi * min(step, steps) / steps)) / 2


# ---------------------------------------------------------------------------------------------
# The quantiser's pieces.

def test_kl_to_uniform_equals_hand_computation():
  logits = np.array([[0.0, 0.0, 0.0, 0.0],        # q uniform: KL 0
                     [2.0, -1.0, 0.5, 0.0],
                     [1.0, 1.0, 0.0, 0.0],        # q = (e, e, 1, 1) / (2e + 2)
                     [40.0, 0.0, 0.0, 0.0]],      # q ~ one-hot: KL ~ log 4
                    np.float32)
  e = math.e
  q2 = np.array([e, e, 1, 1]) / (2 * e + 2)
  by_hand = [0.0, None, float(np.sum(q2 * np.log(4 * q2))), math.log(4.0)]
  want = np_kl_uniform(logits)
  for w, h in zip(want, by_hand):
    if h is not None:
      assert w == pytest.approx(h, abs=1e-12)
  got = np.asarray(vq.kl_to_uniform(jnp.asarray(logits)))
  np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-6)
  # In the quantiser: beta_t x the mean over positions / kl_divisor, with
  # beta_t = 6.6 x (1 - cos(pi/2)) / 2 = 3.3 halfway through the KL ramp.
  qz = vq.Quantizer("gumbel", codebook_size=4, dim=2, kl_weight=6.6, kl_steps=10, kl_divisor=48)
  params = qz.init_params(jax.random.PRNGKey(0))
  out = qz(params, qz.init_state(params), jnp.asarray(logits)[None], jax.random.PRNGKey(1), step=5)
  assert float(out.metrics["kl_weight"]) == pytest.approx(3.3, rel=1e-6)
  assert float(out.metrics["kl"]) == pytest.approx(want.mean(), rel=1e-5)
  assert float(out.loss) == pytest.approx(3.3 * want.mean() / 48, rel=1e-5)
  assert out.stats == {} and qz.init_state(params) == {}


def test_relaxed_sample_tends_to_the_one_hot_of_the_noisy_argmax():
  k = 16
  logits = 2.0 * jax.random.normal(jax.random.PRNGKey(4), (6, 10, k))
  rng = jax.random.PRNGKey(3)
  noise = jax.random.gumbel(rng, logits.shape)
  v = np.asarray(logits, np.float64) + np.asarray(noise, np.float64)
  hard = np.eye(k)[np.argmax(v, -1)]
  np.testing.assert_allclose(vq.gumbel_softmax(logits, noise, 1.0), np_softmax(v),
                             rtol=1e-5, atol=1e-7)
  errs = [float(np.abs(np.asarray(vq.gumbel_softmax(logits, noise, t)) - hard).max())
          for t in (1.0, 0.3, 0.1, 0.03)]
  assert all(a > b for a, b in zip(errs, errs[1:])), errs
  top2 = np.sort(v, -1)[..., -2:]
  gap = float(np.min(top2[..., 1] - top2[..., 0]))
  tau = gap / 25                               # 1 - y_max <= (K - 1) exp(-gap / tau) ~ 2e-10
  np.testing.assert_allclose(vq.gumbel_softmax(logits, noise, tau), hard, atol=1e-6)
  # The quantiser draws that noise from its rng and embeds the sample with the codebook: at a
  # tiny temperature it decodes the codebook rows of the noisy argmax, while its ids (the
  # tokens) are the noiseless argmax.
  qz = vq.Quantizer("gumbel", codebook_size=k, dim=3, tau_start=tau, tau_end=tau)
  params = qz.init_params(jax.random.PRNGKey(0))
  out = qz(params, {}, logits, rng, step=7)
  cb = np.asarray(params["codebook"])
  np.testing.assert_allclose(out.quantized, hard @ cb, atol=1e-6)
  np.testing.assert_array_equal(out.ids, np.argmax(np.asarray(logits), -1))
  assert np.mean(np.argmax(v, -1) != np.asarray(out.ids)) > 0.2     # the noise matters
  # Without a step (pictures): the argmax codes, no noise.
  hard_out = qz(params, {}, logits, rng)
  np.testing.assert_allclose(hard_out.quantized, cb[np.asarray(out.ids)], atol=1e-7)


def test_schedules_equal_their_formulas():
  qz = vq.Quantizer("gumbel", codebook_size=8, dim=4)          # DALL-E's values by default
  assert (qz.tau_start, qz.tau_end, qz.tau_steps, qz.kl_weight, qz.kl_steps) == \
      (1.0, 1 / 16, 150_000, 6.6, 5_000)
  cases = {0: (1.0, 0.0),
           1250: (tau_at(1250), 6.6 * (1 - math.cos(math.pi / 4)) / 2),
           2500: (tau_at(2500), 3.3),
           37_500: (1 / 16 + 15 / 16 * (1 + math.sqrt(0.5)) / 2, 6.6),
           75_000: (0.53125, 6.6),                  # the temperature's midpoint: (1 + 1/16) / 2
           150_000: (1 / 16, 6.6),
           1_000_000: (1 / 16, 6.6)}
  for step, (tau, beta) in cases.items():
    assert float(qz.temperature(step)) == pytest.approx(tau, rel=1e-6, abs=1e-7), step
    assert float(qz.kl_weight_at(step)) == pytest.approx(beta, rel=1e-6, abs=1e-7), step
    assert float(qz.temperature(jnp.asarray(step, jnp.int32))) == pytest.approx(tau, rel=1e-6)
  # A zero-length ramp is its end value from the first step.
  assert float(vq.cosine_ramp(0, 1.0, 0.25, 0)) == 0.25
  with pytest.raises(ValueError, match="tau_end"):
    vq.Quantizer("gumbel", codebook_size=8, dim=4, tau_end=0.0)


def test_configs_carry_the_paper_schedules():
  g = default_tokenizer_config()["gumbel"]
  assert g == dict(tau_start=1.0, tau_end=1 / 16, tau_steps=150_000, kl_weight=6.6, kl_steps=5_000)
  c = load_config("tokenizer", "imagenet")
  c.tokenizer.quantizer = "gumbel"
  q = methods.get(c).quantizer
  assert (q.kind, q.tau_steps, q.kl_steps, q.kl_weight, q.codebook_size) == \
      ("gumbel", 150_000, 5_000, 6.6, 8192)
  assert q.kl_divisor == 16 * 16 * 3          # pixel values per token (DALL-E: 8 x 8 x 3 = 192)
  cpu = load_config("tokenizer")
  cpu.tokenizer.quantizer = "gumbel"
  q = methods.get(cpu).quantizer
  assert (q.tau_steps, q.kl_steps, q.kl_divisor, q.restarts) == (150, 5, 48, 0)


# ---------------------------------------------------------------------------------------------
# The method: loss by hand and the consumer contract.

@pytest.fixture(scope="module")
def initialised():
  m = methods.get(small())
  p = jax.jit(m.init)(jax.random.PRNGKey(1), images())        # jitted: half the time of eager
  # Sharper logits than at initialisation, so that the KL term weighs in the total.
  p["to_code"] = dict(p["to_code"], kernel=30.0 * p["to_code"]["kernel"])
  return m, p, m.init_state(p)


def test_loss_equals_hand_computation(initialised):
  m, p, s = initialised
  assert m.quantizer.kl_divisor == 48 and "codebook" in p["quantizer"]
  assert p["to_code"]["kernel"].shape == (1, 1, 16, 32)       # logits over the 32 codes
  x = images()
  rng, step = jax.random.PRNGKey(5), 40        # the default preset: tau over 150 steps, beta over 5
  # One compiled call gives the loss, its terms and the gradient (checked at the end).
  (loss, aux), g = jax.jit(jax.value_and_grad(
      lambda q: m.loss(q, s, x, rng, step), has_aux=True))(p)
  logits = np.asarray(m.codes(p, x), np.float64)                 # [2, 64, 32]
  assert logits.shape == (2, 64, 32)
  noise = np.asarray(jax.random.gumbel(rng, logits.shape), np.float64)
  tau = tau_at(step, steps=150)
  y = np_softmax((logits + noise) / tau)
  codes = y @ np.asarray(p["quantizer"]["codebook"], np.float64)
  rec = np.asarray(m.decode(p, jnp.asarray(codes, jnp.float32)), np.float64)
  mse = np.mean((rec - np.asarray(x, np.float64)) ** 2)
  kl = np_kl_uniform(logits).mean()
  assert kl > 0.5                               # the term is not negligible
  np.testing.assert_allclose(aux["temperature"], tau, rtol=1e-6)
  np.testing.assert_allclose(aux["kl_weight"], 6.6, rtol=1e-6)
  np.testing.assert_allclose(aux["kl"], kl, rtol=1e-5)
  np.testing.assert_allclose(aux["vq_loss"], 6.6 * kl / 48, rtol=1e-5)
  np.testing.assert_allclose(aux["rec_loss"], mse, rtol=1e-5)
  np.testing.assert_allclose(loss, mse + 6.6 * kl / 48, rtol=1e-5)
  ids = np.argmax(logits, -1)
  counts = np.bincount(ids.ravel(), minlength=32)
  pr = counts / counts.sum()
  assert float(aux["codebook_usage"]) == pytest.approx(np.mean(counts > 0))
  want_ppl = np.exp(-np.sum(pr * np.log(pr + 1e-10)))
  assert float(aux["perplexity"]) == pytest.approx(want_ppl, rel=1e-5)
  assert "state_stats" not in aux
  # The gradient reaches the codebook (the decoder's embedding) and the encoder's logits.
  assert float(jnp.abs(g["quantizer"]["codebook"]).sum()) > 0
  assert float(jnp.abs(g["to_code"]["kernel"]).sum()) > 0


def test_token_ids_are_the_argmax_of_the_logits(initialised):
  m, p, s = initialised
  x = images(3, seed=7)
  ids = np.asarray(jax.jit(m.token_ids)(p, m.frozen_state(s), x))
  assert ids.shape == (3, 64) and ids.dtype == np.int32
  h = m.conv_encoder.apply({"params": p["encoder"]}, x)
  lmap = np.asarray(m.to_code.apply({"params": p["to_code"]}, h))       # [3, 8, 8, 32]
  for b in range(3):
    for r in range(8):
      for col in range(8):                       # row-major over the grid
        assert ids[b, r * 8 + col] == int(np.argmax(lmap[b, r, col]))
  assert len(np.unique(ids)) > 1
  # Deterministic: no noise, whatever the step.
  np.testing.assert_array_equal(ids, m.token_ids(p, s, x))


# ---------------------------------------------------------------------------------------------
# Training on the embedded data.

def resume_config():
  c = small(total_steps=6, ckpt_every=3)
  c.tokenizer.gumbel.update(tau_steps=4, kl_steps=2)    # both schedules move within the run
  c.optim.base_lr = 2e-3
  return c


@pytest.fixture(scope="module")
def uninterrupted(tmp_path_factory, compilation_cache):
  d = str(tmp_path_factory.mktemp("dvae_a"))
  train.train_and_evaluate(resume_config(), d, progress=False, devices=ONE)
  return d


def test_a_few_steps_lower_the_loss(uninterrupted):
  ls = losses(uninterrupted)
  assert sorted(ls) == [1, 2, 3, 4, 5, 6]
  assert ls[6] < 0.8 * ls[1], ls
  with open(os.path.join(uninterrupted, "metrics.jsonl")) as f:
    recs = {r["step"]: r for r in map(json.loads, f) if "loss" in r}
  for step, r in recs.items():          # logged step s is the update after s - 1 updates
    assert r["aux/temperature"] == pytest.approx(tau_at(step - 1, steps=4), rel=1e-6)
    beta = 6.6 * (1 - math.cos(math.pi * min(step - 1, 2) / 2)) / 2
    assert r["aux/kl_weight"] == pytest.approx(beta, rel=1e-6, abs=1e-7)
    assert 0 < r["aux/codebook_usage"] <= 1 and r["aux/perplexity"] >= 1


def test_resumed_run_equals_uninterrupted(uninterrupted, tmp_path):
  b = str(tmp_path / "b")
  assert_same_losses(losses(uninterrupted), resumed_losses(resume_config(), b, stop_after=3,
                                                           devices=ONE), 6)
  ra, rb = teachers.load(uninterrupted), teachers.load(b)
  jax.tree.map(np.testing.assert_array_equal, ra.params, rb.params)


def test_beit_reads_the_dvae_run_unchanged(uninterrupted):
  c = tiny_config("beit")
  c.beit.tokenizer = uninterrupted
  beit = methods.get(c)
  assert beit.codebook_size == 32
  run = teachers.load(uninterrupted)
  x = images(2, seed=9)
  got = np.asarray(beit.token_ids(beit.external_state(), x))
  want = np.argmax(np.asarray(run.method.codes(run.params, x)), -1)
  np.testing.assert_array_equal(got, want)
