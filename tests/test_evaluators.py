"""Behaviour tests of mim_jax.evaluators with fake contexts (numpy encoders)."""
import json
import os

import jax
import ml_collections
import numpy as np
import optax
import pytest
from PIL import Image

from mim_jax import evaluators
from mim_jax.evaluators import knn, linear_probe


# ----------------------------------------------------------------------------- helpers


def _index_images(indices, size=4):
  """uint8 images [B,size,size,3] whose pixel (0,0) stores the index (r + 256 g)."""
  indices = np.asarray(indices)
  images = np.zeros((len(indices), size, size, 3), np.uint8)
  images[:, 0, 0, 0] = indices % 256
  images[:, 0, 0, 1] = indices // 256
  return images


class FakeData:
  """A fake trainer: feature tables per name, looked up from the index stored in each image."""

  def __init__(self, train_feats, train_y, eval_feats, eval_y, image_size=4):
    self.tables = {name: np.concatenate([train_feats[name], eval_feats[name]]) for name in train_feats}
    self.labels = {"train": np.asarray(train_y), "eval": np.asarray(eval_y)}
    self.offset = {"train": 0, "eval": len(train_y)}
    self.image_size = image_size
    self.encoded = 0  # images passed to encode

  def encode(self, images):
    self.encoded += len(images)
    idx = images[:, 0, 0, 0].astype(np.int64) + 256 * images[:, 0, 0, 1].astype(np.int64)
    return {name: table[idx] for name, table in self.tables.items()}

  def batches(self, split, batch_size, max_examples=None):
    labels, off = self.labels[split], self.offset[split]
    for start in range(0, len(labels), batch_size):
      idx = np.arange(start, min(start + batch_size, len(labels)))
      yield _index_images(idx + off, self.image_size), labels[idx]

  def ctx(self, num_classes, workdir=".", step=0, reconstruct=None):
    return evaluators.EvalContext(encode=self.encode, batches=self.batches, num_classes=num_classes,
                                  reconstruct=reconstruct, workdir=str(workdir), step=step)


def _reference_knn_scores(bank, bank_y, queries, num_classes, k, temperature):
  """Plain-numpy weighted vote, one query at a time (independent of the JAX code)."""
  bank = bank / np.linalg.norm(bank, axis=1, keepdims=True)
  scores = np.zeros((len(queries), num_classes))
  for i, q in enumerate(queries):
    sims = bank @ (q / np.linalg.norm(q))
    for j in np.argsort(-sims)[:min(k, len(bank))]:
      scores[i, bank_y[j]] += np.exp(sims[j] / temperature)
  return scores


def _unit(deg):
  return np.array([np.cos(np.radians(deg)), np.sin(np.radians(deg))])


# Six 2-D bank points, two classes. Query at angle 0: its 3 nearest are one class-0 point at 5
# degrees and two class-1 points at 40 and 45 degrees (majority says 1; sharp weighting says 0).
TINY_BANK = np.stack([_unit(5), _unit(180), _unit(170), _unit(40), _unit(45), _unit(-120)]) * \
    np.array([[2.0], [1.0], [3.0], [0.5], [1.5], [1.0]])  # norms differ: normalisation matters
TINY_LABELS = np.array([0, 0, 0, 1, 1, 1])


def _weighted_vote_by_hand(query_deg, k, temperature):
  """Weighted vote written out with the angles, no matrix code."""
  angles = [5, 180, 170, 40, 45, -120]
  sims = [np.cos(np.radians(a - query_deg)) for a in angles]
  nearest = sorted(range(6), key=lambda j: -sims[j])[:k]
  votes = [0.0, 0.0]
  for j in nearest:
    votes[TINY_LABELS[j]] += np.exp(sims[j] / temperature)
  return np.array(votes), nearest


# ----------------------------------------------------------------------------- kNN


def test_knn_tiny_bank_weighting_beats_majority():
  query = np.array([[3.0, 0.0]])
  expected, nearest = _weighted_vote_by_hand(0, k=3, temperature=0.07)
  assert sorted(nearest) == [0, 3, 4]
  majority = np.bincount(TINY_LABELS[nearest], minlength=2)
  assert majority.argmax() == 1  # plain majority vote picks class 1 ...
  scores = knn.knn_scores(TINY_BANK, TINY_LABELS, query, 2, k=3, temperature=0.07)
  np.testing.assert_allclose(scores[0], expected, rtol=1e-4)
  assert scores[0].argmax() == 0  # ... exp(sim/0.07) weighting picks class 0
  # A soft temperature makes the weights nearly equal: the majority wins again.
  expected_soft, _ = _weighted_vote_by_hand(0, k=3, temperature=1.0)
  soft = knn.knn_scores(TINY_BANK, TINY_LABELS, query, 2, k=3, temperature=1.0)
  np.testing.assert_allclose(soft[0], expected_soft, rtol=1e-5)
  assert soft[0].argmax() == 1
  # k = 1: only the nearest (class 0) votes, and class 1 gets exactly zero.
  one = knn.knn_scores(TINY_BANK, TINY_LABELS, query, 2, k=1, temperature=0.07)
  np.testing.assert_allclose(one[0], [np.exp(np.cos(np.radians(5)) / 0.07), 0.0], rtol=1e-5)


def test_knn_k_larger_than_bank_uses_whole_bank():
  query = np.array([[0.0, 1.0], [-1.0, 0.1]])
  scores = knn.knn_scores(TINY_BANK, TINY_LABELS, query, 3, k=50, temperature=0.5)
  expected = _reference_knn_scores(TINY_BANK, TINY_LABELS, query, 3, k=6, temperature=0.5)
  np.testing.assert_allclose(scores, expected, rtol=1e-5)
  assert np.all(scores[:, 2] == 0.0)  # a class absent from the bank gets no vote


@pytest.mark.parametrize("query_chunk,bank_chunk", [(7, 10), (256, 64), (1000, 100000)])
def test_knn_chunked_matches_bruteforce(query_chunk, bank_chunk):
  rng = np.random.default_rng(0)
  bank = rng.normal(size=(1003, 8))
  bank_y = rng.integers(0, 10, 1003)
  queries = rng.normal(size=(53, 8))
  scores = knn.knn_scores(bank, bank_y, queries, 10, k=20, temperature=0.07,
                          query_chunk=query_chunk, bank_chunk=bank_chunk)
  expected = _reference_knn_scores(bank, bank_y, queries, 10, k=20, temperature=0.07)
  assert scores.shape == (53, 10)
  np.testing.assert_allclose(scores, expected, rtol=2e-4)


def test_topk_accuracy_exact_and_fewer_classes_than_k():
  scores = np.array([[0.1, 0.5, 0.4], [0.9, 0.05, 0.05], [0.2, 0.3, 0.5], [0.6, 0.3, 0.1]])
  labels = np.array([2, 0, 2, 2])
  acc = evaluators.topk_accuracy(scores, labels, ks=(1, 2, 5))
  assert acc[1] == pytest.approx(50.0)
  assert acc[2] == pytest.approx(75.0)
  assert acc[5] == 100.0  # only 3 classes: every label is within the top 5


def _two_view_data(rng, n_train, n_eval, num_classes, dim, noise):
  """Clustered features: 'online' informative, 'ema' pure noise."""
  centres = rng.normal(size=(num_classes, dim)) * 3

  def draw(n):
    y = rng.integers(0, num_classes, n)
    return {"online": centres[y] + noise * rng.normal(size=(n, dim)),
            "ema": rng.normal(size=(n, dim))}, y

  (tf, ty), (ef, ey) = draw(n_train), draw(n_eval)
  return FakeData(tf, ty, ef, ey)


def test_knn_evaluator_run_per_feature_set(tmp_path):
  data = _two_view_data(np.random.default_rng(1), 300, 120, 4, 6, noise=1.5)
  cfg = {"type": "knn", "k": 10, "temperature": 0.1, "batch_size": 32, "pooling": "avg",
         "max_train": 250}
  result = evaluators.build("knn_eval", cfg).run(data.ctx(4, tmp_path))
  json.dumps(result)  # JSON-serialisable
  bank = {n: t[:250] for n, t in data.tables.items()}
  queries = {n: t[300:] for n, t in data.tables.items()}
  for name in ("online", "ema"):
    ref = _reference_knn_scores(bank[name], data.labels["train"][:250], queries[name], 4, 10, 0.1)
    top1 = 100.0 * np.mean(ref.argmax(1) == data.labels["eval"])
    assert result[f"{name}/top1"] == pytest.approx(top1)
    assert result[f"{name}/top5"] == 100.0  # 4 classes < 5
    assert isinstance(result[f"{name}/top1"], float)
  assert result["online/top1"] > 80.0 and result["ema/top1"] < 50.0
  p = result["protocol"]
  assert (p["k"], p["temperature"], p["pooling"]) == (10, 0.1, "avg")
  assert (p["bank_size"], p["num_queries"]) == (250, 120)
  assert p["features"] == "frozen, no augmentation"
  assert data.encoded == 250 + 120  # the cap stops extraction early


# ----------------------------------------------------------------------------- linear probe


def _separable_data(seed, n_train=600, n_eval=300, num_classes=3, dim=16, shuffle_eval=False):
  """3 classes, each a union of two Gaussian clusters; linearly separable in 16-D."""
  rng = np.random.default_rng(seed)
  centres = rng.normal(size=(num_classes, 2, dim)) * 3

  def draw(n):
    y = rng.integers(0, num_classes, n)
    return centres[y, rng.integers(0, 2, n)] + rng.normal(size=(n, dim)), y

  (tx, ty), (ex, ey) = draw(n_train), draw(n_eval)
  if shuffle_eval:
    ey = rng.permutation(ey)
  # A second feature set on a wildly different scale and offset: the train-statistics
  # standardisation must make it as easy as the first.
  return FakeData({"online": tx, "ema": tx * 1e3 + 50.0}, ty, {"online": ex, "ema": ex * 1e3 + 50.0}, ey)


PROBE_CFG = {"type": "linear_probe", "optimizer": "sgd", "epochs": 8, "warmup_epochs": 1,
             "batch_size": 64, "pooling": "cls"}


def test_linear_probe_separable_reaches_high_accuracy(tmp_path):
  data = _separable_data(0)
  result = evaluators.build("probe", PROBE_CFG).run(data.ctx(3, tmp_path))
  json.dumps(result)
  for name in ("online", "ema"):
    assert result[f"{name}/top1"] > 95.0
    assert result[f"{name}/train_top1"] > 95.0
    assert result[f"{name}/top5"] == 100.0
  p = result["protocol"]
  assert p["optimizer"] == "sgd" and p["epochs"] == 8 and p["batch_size"] == 64
  assert p["lr"] == pytest.approx(0.1 * 64 / 256)
  assert p["augmentation"] == "none (features precomputed)"
  assert p["pooling"] == "cls" and p["weight_decay"] == 0.0 and p["warmup_epochs"] == 1
  assert (p["num_train"], p["num_eval"]) == (600, 300)


@pytest.mark.parametrize("optimizer,base_lr", [("adamw", 0.1), ("lars", 1000.0)])
def test_linear_probe_other_optimizers_learn(optimizer, base_lr):
  # LARS scales each update to trust_coefficient (1e-3) x |w|, so few steps need a large lr.
  data = _separable_data(3)
  cfg = dict(PROBE_CFG, optimizer=optimizer, base_lr=base_lr)
  result = evaluators.build("probe", cfg).run(data.ctx(3))
  assert result["online/top1"] > 95.0


def test_linear_probe_scores_only_eval_labels():
  data = _separable_data(0, shuffle_eval=True)
  result = evaluators.build("probe", PROBE_CFG).run(data.ctx(3))
  assert result["online/train_top1"] > 95.0
  assert result["online/top1"] < 50.0  # labels unrelated to eval features: about 1/3


def test_linear_probe_deterministic_per_seed():
  runs = [evaluators.build("probe", dict(PROBE_CFG, seed=s)).run(_separable_data(5).ctx(3))
          for s in (7, 7, 8)]
  assert runs[0] == runs[1]
  assert runs[0]["online/train_loss"] != runs[2]["online/train_loss"]


def test_linear_probe_standardiser_and_schedule():
  x = np.random.default_rng(0).normal(3.0, 5.0, size=(500, 4))
  mean, inv_std = linear_probe.standardiser(x)
  np.testing.assert_allclose(mean, x.mean(0), rtol=1e-6)
  np.testing.assert_allclose(inv_std, 1 / np.sqrt(x.var(0) + 1e-6), rtol=1e-6)
  cfg = linear_probe.ProbeConfig(optimizer="lars", epochs=10, warmup_epochs=2, base_lr=0.1)
  _, schedule = linear_probe.make_optimizer(cfg, steps_per_epoch=5, batch_size=512)
  assert float(schedule(0)) == 0.0
  assert float(schedule(10)) == pytest.approx(0.2)  # peak = 0.1 * 512 / 256 after warm-up
  assert float(schedule(30)) == pytest.approx(0.1)  # half-way through the cosine
  assert float(schedule(50)) == pytest.approx(0.0, abs=1e-7)
  params = linear_probe.init_params(jax.random.PRNGKey(0), 200, 50)
  w = np.asarray(params["w"])
  assert np.all(np.asarray(params["b"]) == 0) and np.abs(w).max() <= 0.02
  assert 0.007 < w.std() < 0.01  # trunc-normal at 2 std: std ~ 0.0088


def test_linear_probe_lars_steps_equal_mae_rule_by_hand():
  """Two steps of the probe's LARS against MAE's LARS (util/lars.py) written out in numpy: the
  matrix gets g + wd * w scaled by 0.001 |w| / |g + wd w|, the 1-D bias the plain gradient;
  buf = 0.9 buf + update; w -= lr_t * buf. No warm-up, 2 steps of cosine: lr_0 = 0.5, lr_1 = 0.25."""
  cfg = linear_probe.ProbeConfig(optimizer="lars", base_lr=0.5, epochs=2, warmup_epochs=0,
                                 weight_decay=0.1, momentum=0.9)
  tx, schedule = linear_probe.make_optimizer(cfg, steps_per_epoch=1, batch_size=256)
  lrs = [float(schedule(0)), float(schedule(1))]
  assert lrs == pytest.approx([0.5, 0.25])
  params = {"w": np.array([[3.0, 0.0], [0.0, 4.0]], np.float32), "b": np.array([1.0, -2.0], np.float32)}
  grads = [{"w": np.array([[1.0, 2.0], [2.0, 0.0]], np.float32), "b": np.array([0.5, -1.0], np.float32)},
           {"w": np.array([[0.0, -1.0], [3.0, 1.0]], np.float32), "b": np.array([2.0, 0.0], np.float32)}]
  state = tx.init(params)
  w = params["w"].astype(np.float64)
  buf_w, buf_b = np.zeros((2, 2)), np.zeros(2)
  for t, g in enumerate(grads):
    updates, state = tx.update(g, state, params)
    d = g["w"] + 0.1 * w                                      # weight decay, matrix only
    trust = 0.001 * np.sqrt((w ** 2).sum()) / np.sqrt((d ** 2).sum())
    buf_w = 0.9 * buf_w + trust * d
    buf_b = 0.9 * buf_b + g["b"]                              # bias: no decay, no trust ratio
    np.testing.assert_allclose(updates["w"], -lrs[t] * buf_w, rtol=1e-5)
    np.testing.assert_allclose(updates["b"], -lrs[t] * buf_b, rtol=1e-6)
    if t == 0:  # the first step in numbers: |w| = 5, g + 0.1 w = [[1.3, 2], [2, 0.4]]
      np.testing.assert_allclose(updates["w"], -0.5 * 0.005 / np.sqrt(9.85) * np.array(
          [[1.3, 2.0], [2.0, 0.4]]), rtol=1e-5)
      np.testing.assert_allclose(updates["b"], [-0.25, 0.5], rtol=1e-6)
    params = jax.tree.map(lambda p, u: p + u, params, updates)
    w = np.asarray(params["w"], np.float64)        # the bias has no decay: only w feeds d
  # optax.lars applies the rate inside the momentum (buf = 0.9 buf + lr_t u): with a changing
  # rate its second step differs from MAE's, which is why the probe builds its own chain.
  ref = optax.lars(schedule, weight_decay=0.1, weight_decay_mask=linear_probe._decay_mask,
                   trust_ratio_mask=linear_probe._decay_mask, momentum=0.9)
  p0 = {"w": np.array([[3.0, 0.0], [0.0, 4.0]], np.float32), "b": np.array([1.0, -2.0], np.float32)}
  s0 = ref.init(p0)
  u0, s0 = ref.update(grads[0], s0, p0)
  u1, _ = ref.update(grads[1], s0, jax.tree.map(lambda p, u: p + u, p0, u0))
  assert not np.allclose(u1["b"], -lrs[1] * buf_b, rtol=1e-3)
  np.testing.assert_allclose(u1["b"], -(0.9 * 0.5 * grads[0]["b"] + 0.25 * grads[1]["b"]), rtol=1e-6)


def test_linear_probe_records_each_optimizer():
  data = _separable_data(2, n_train=64, n_eval=32)
  for name in ("lars", "sgd", "adamw"):
    p = evaluators.build("probe", dict(PROBE_CFG, optimizer=name, epochs=1)).run(data.ctx(3))["protocol"]
    assert p["optimizer"] == name and p["optimizer_rule"] == linear_probe.OPTIMIZER_RULES[name]
    assert (p["momentum"] is None) == (name == "adamw")
    assert (p["trust_coefficient"] == 0.001) == (name == "lars")
  with pytest.raises(ValueError, match="use lars, sgd or adamw"):
    evaluators.build("probe", dict(PROBE_CFG, optimizer="lamb")).run(data.ctx(3))


# ----------------------------------------------------------------------------- reconstruction


def _fake_reconstruct(calls):
  def reconstruct(images, seed):
    calls.append((images.copy(), seed))
    masked = images.copy()
    masked[:, ::2, ::2] = 0
    return {"input": images, "masked": masked, "reconstruction": 255 - images}
  return reconstruct


def test_reconstruction_grid_pixels(tmp_path):
  rng = np.random.default_rng(0)
  n, size = 10, 32
  images = rng.integers(0, 256, (n, size, size, 3), dtype=np.uint8)
  labels = np.zeros(n, np.int64)

  def batches(split, batch_size, max_examples=None):
    assert split == "eval"
    for s in range(0, n, batch_size):
      yield images[s:s + batch_size], labels[s:s + batch_size]

  calls = []
  ctx = evaluators.EvalContext(encode=None, batches=batches, num_classes=1,
                               reconstruct=_fake_reconstruct(calls), workdir=str(tmp_path), step=1200)
  result = evaluators.build("recon", {"type": "reconstruction", "num_images": 4, "seed": 3}).run(ctx)
  assert result["path"] == os.path.join(str(tmp_path), "reconstruction_1200.png")
  assert result["protocol"]["num_images"] == 4 and result["protocol"]["seed"] == 3
  assert len(calls) == 1 and calls[0][1] == 3
  np.testing.assert_array_equal(calls[0][0], images[:4])  # the first eval images
  picture = np.asarray(Image.open(result["path"]).convert("RGB"))
  scale, sep, cell = 3, 2, 96  # 32 px upscaled x3 to reach 96 px
  hd = result["protocol"]["header"]
  assert hd == 28 and picture.shape == (hd + sep + 4 * (cell + sep), sep + 3 * (cell + sep), 3)
  # The header: a title line, then a title over each column (dark text on white).
  header, grid = picture[:hd], picture[hd:]
  assert (header[:14] < 128).any()
  for c in range(3):
    x0 = sep + c * (cell + sep)
    assert (header[14:, x0:x0 + cell] < 128).any(), c
  # A quarter of the pixels is zeroed by the fake masking (every other row and column).
  assert result["protocol"]["masked_fraction"] == pytest.approx(
      np.mean(np.any(images[:4, ::2, ::2] != 0, axis=-1)) / 4, abs=1e-9)
  for r in range(4):
    y0 = sep + r * (cell + sep)
    for c, expect in enumerate([images[r], _fake_masked(images[r]), 255 - images[r]]):
      x0 = sep + c * (cell + sep)
      block = grid[y0:y0 + cell, x0:x0 + cell]
      np.testing.assert_array_equal(block[1::scale, 2::scale], expect)  # any pixel in each 3x3 block
      np.testing.assert_array_equal(block, np.kron(expect, np.ones((scale, scale, 1), np.uint8)))
  assert np.all(grid[:sep] == 255) and np.all(grid[:, sep + cell:2 * sep + cell] == 255)
  with open(result["path"], "rb") as a, open(os.path.join(str(tmp_path), "reconstruction.png"), "rb") as b:
    assert a.read() == b.read()


def test_reconstruction_picture_takes_the_methods_words(tmp_path, monkeypatch):
  """A method that is not masked image modelling names its columns and header line
  (ctx.picture_titles; the rest stays the default), and the protocol records them."""
  from mim_jax.evaluators import reconstruction
  drawn = []
  real = reconstruction.add_header
  monkeypatch.setattr(reconstruction, "add_header",
                      lambda grid, title, cols, *a: drawn.append((title, cols)) or real(
                          grid, title, cols, *a))
  data = _separable_data(0, n_train=10, n_eval=10)
  ctx = data.ctx(3, tmp_path, step=12, reconstruct=_fake_reconstruct([]))
  words = {"masked": "shuffled tiles", "header": "{hidden:.0%} moved"}
  ctx.picture_titles = words
  result = evaluators.build("recon", {"type": "reconstruction", "num_images": 2}).run(ctx)
  hidden = result["protocol"]["masked_fraction"]
  assert drawn == [(f"step 12: {hidden:.0%} moved",
                    ["input", "shuffled tiles", "reconstruction"])]
  assert result["protocol"]["titles"] == {**reconstruction.TITLES, **words}
  ctx.picture_titles = None          # the default: masked image modelling's words
  evaluators.build("recon", {"type": "reconstruction", "num_images": 2}).run(ctx)
  assert drawn[1] == (f"step 12: {hidden:.0%} of the pixels masked",
                      ["input", "masked input", "reconstruction"])


def _fake_masked(image):
  masked = image.copy()
  masked[::2, ::2] = 0
  return masked


def test_reconstruction_skipped_without_method(tmp_path):
  data = _separable_data(0, n_train=10, n_eval=10)
  result = evaluators.build("recon", {"type": "reconstruction"}).run(data.ctx(3, tmp_path))
  assert result == {"skipped": "method has no reconstruction"}
  assert not os.listdir(str(tmp_path))


# ----------------------------------------------------------------------------- run_all / results


def test_run_all_skips_disabled_and_accepts_configdict(tmp_path):
  data = _separable_data(1, n_train=120, n_eval=40)
  evals = ml_collections.ConfigDict({
      "knn": {"type": "knn", "k": 5, "batch_size": 50},
      "probe": {"type": "linear_probe", "enabled": False},
      "recon": {"type": "reconstruction", "num_images": 2},
  })
  results = evaluators.run_all(evals, data.ctx(3, tmp_path, step=7, reconstruct=_fake_reconstruct([])))
  assert set(results) == {"knn", "recon"}
  assert results["knn"]["protocol"]["bank_size"] == 120 and "online/top1" in results["knn"]
  assert os.path.exists(os.path.join(str(tmp_path), "reconstruction_7.png"))
  with pytest.raises(ValueError, match="unknown type"):
    evaluators.build("x", {"type": "nope"})


def test_write_results_merges_and_updates_step(tmp_path):
  wd = str(tmp_path)
  evaluators.write_results(wd, {"knn": {"online/top1": np.float32(50.0), "protocol": {"k": 20}},
                                "probe": {"online/top1": 60.0, "protocol": {}}}, step=100)
  path = evaluators.write_results(wd, {"knn": {"online/top1": 75.5, "protocol": {"k": 20}}}, step=200)
  assert path == os.path.join(wd, "eval_results.json")
  with open(path) as f:
    saved = json.load(f)
  assert saved == {"knn": {"online/top1": 75.5, "protocol": {"k": 20}, "step": 200},
                   "probe": {"online/top1": 60.0, "protocol": {}, "step": 100}}
  assert os.listdir(wd) == ["eval_results.json"]  # no temporary file left behind
