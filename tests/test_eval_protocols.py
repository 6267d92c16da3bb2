"""Few-shot, several-k and per-block kNN, per-layer and attentive probes, on fake contexts."""
import json
import os

import numpy as np
import pytest
from PIL import Image

from helpers import tiny_config
from mim_jax import evaluators, train
from mim_jax.evaluators import attentive_probe, few_shot, knn
from tests.test_evaluators import _index_images


class FakeEncoder:
  """A fake trainer over numpy tables, looked up from the index stored in each image.

  ``layers[name]`` is [N, depth + 1, D] (pooled block outputs, one table per pooling),
  ``tokens[name]`` [N, 1 + L, D]; rows [0, n_train) are the train split, the rest eval.
  ``encode`` gives the last layer, as the trainer's encoder gives the final-norm output.
  """

  def __init__(self, train_y, eval_y, layers=None, tokens=None, mean_layers=None):
    self.labels = {"train": np.asarray(train_y), "eval": np.asarray(eval_y)}
    self.offset = {"train": 0, "eval": len(train_y)}
    self.layers = {"cls": layers, "mean": mean_layers}
    self.tokens = tokens
    self.calls = {"encode": 0, "layers": [], "tokens": 0}

  @staticmethod
  def index(images):
    return images[:, 0, 0, 0].astype(np.int64) + 256 * images[:, 0, 0, 1].astype(np.int64)

  def encode(self, images):
    self.calls["encode"] += len(images)
    return {n: t[self.index(images), -1] for n, t in self.layers["cls"].items()}

  def encode_layers(self, images, pooling):
    self.calls["layers"].append((pooling, len(images)))
    return {n: t[self.index(images)] for n, t in self.layers[pooling].items()}

  def encode_tokens(self, images):
    self.calls["tokens"] += len(images)
    return {n: t[self.index(images)] for n, t in self.tokens.items()}

  def batches(self, split, batch_size, max_examples=None):
    labels, off = self.labels[split], self.offset[split]
    n = len(labels) if max_examples is None else min(max_examples, len(labels))
    for start in range(0, n, batch_size):
      idx = np.arange(start, min(start + batch_size, n))
      yield _index_images(idx + off), labels[idx]

  def ctx(self, num_classes, workdir=".", step=0):
    return evaluators.EvalContext(
        encode=self.encode, batches=self.batches, num_classes=num_classes, workdir=str(workdir),
        step=step, encode_layers=self.encode_layers if self.layers["cls"] is not None else None,
        encode_tokens=self.encode_tokens if self.tokens is not None else None)


def _clusters(rng, y, num_classes, dim, spread):
  """Features: a random centre per class plus unit Gaussian noise x ``spread``."""
  centres = rng.normal(size=(num_classes, dim)) * 3
  return centres[y] + spread * rng.normal(size=(len(y), dim))


def _layered(seed, n_train, n_eval, num_classes=4, depth=3, dim=8):
  """Layer tables whose block i is more separable than block i - 1 (noise falls with depth)."""
  rng = np.random.default_rng(seed)
  y = rng.integers(0, num_classes, n_train + n_eval)
  layers = {name: np.stack([_clusters(rng, y, num_classes, dim, spread)
                            for spread in np.linspace(8.0, 0.5, depth + 1)], axis=1)
            for name in ("online", "ema")}
  mean_layers = {n: t[..., ::-1] * 2.0 + 1.0 for n, t in layers.items()}  # a different table
  return FakeEncoder(y[:n_train], y[n_train:], layers=layers, mean_layers=mean_layers)


# ----------------------------------------------------------------------------- few-shot


def test_ridge_predictions_equal_direct_solve_with_free_bias():
  rng = np.random.default_rng(0)
  for n, dim in [(6, 10), (40, 5)]:  # dual (n <= D) and primal (n > D) branch
    x = rng.normal(size=(n, dim)) * 3 + 1
    y = rng.integers(0, 3, n)
    z = rng.normal(size=(7, dim))
    out = few_shot.ridge_predictions(x, y, 3, [z, x], (0.01, 1.0))
    targets = 2.0 * np.eye(3)[y] - 1.0
    xc = x - x.mean(0)
    scale = (xc ** 2).sum(1).mean()
    for i, r in enumerate((0.01, 1.0)):
      # Augmented least squares [x, 1] with the bias column unpenalised.
      a = np.concatenate([x, np.ones((n, 1))], axis=1)
      penalty = r * scale * np.diag([1.0] * dim + [0.0])
      wb = np.linalg.solve(a.T @ a + penalty, a.T @ targets)
      for q, got in zip((z, x), out):
        np.testing.assert_allclose(got[i], np.concatenate([q, np.ones((len(q), 1))], 1) @ wb,
                                   atol=1e-9)


def test_few_shot_separable_reaches_100_and_reuses_features(tmp_path):
  rng = np.random.default_rng(1)
  num_classes, n_train, n_eval = 4, 400, 200
  y = rng.integers(0, num_classes, n_train + n_eval)
  feats = _clusters(rng, y, num_classes, 6, spread=0.1)[:, None, :]  # one "layer": encode's
  data = FakeEncoder(y[:n_train], y[n_train:], layers={"online": feats})
  ctx = data.ctx(num_classes, tmp_path)
  cfg = {"type": "few_shot", "seeds": 3, "max_train": 300, "batch_size": 64}
  result = evaluators.build("fs", cfg).run(ctx)
  json.dumps(result)
  expected = {f"online/top1_{s}shot{suffix}" for s in (1, 5, 10, 25) for suffix in ("", "_std")}
  assert set(result) - {"protocol"} == expected
  for s in (1, 5, 10, 25):
    assert result[f"online/top1_{s}shot"] == 100.0
    assert result[f"online/top1_{s}shot_std"] == 0.0
  p = result["protocol"]
  assert p["shots"] == [1, 5, 10, 25] and p["seeds"] == 3 and p["targets"] == "one-hot in {-1, +1}"
  assert (p["num_train_subset"], p["num_eval"]) == (300, 200)
  assert all(len(v) == 3 for v in p["chosen_l2"]["online"].values())
  assert data.calls["encode"] == 300 + 200
  evaluators.build("fs", dict(cfg, shots=(2,))).run(ctx)  # same round: features from the cache
  assert data.calls["encode"] == 300 + 200


def test_few_shot_pool_split_and_shortage_error():
  labels = np.repeat(np.arange(3), [8, 9, 12])
  pools, val = few_shot.split_pool(labels, 3, val_per_class=2, need=5, seed=0)
  assert np.bincount(labels[val], minlength=3).tolist() == [2, 2, 2]
  for c, pool in enumerate(pools):
    assert np.all(labels[pool] == c) and len(pool) == [6, 7, 10][c]
    assert not set(pool) & set(val)
  with pytest.raises(ValueError, match="raise max_train"):
    few_shot.split_pool(labels, 3, val_per_class=2, need=7, seed=0)


def test_few_shot_more_shots_help_on_noisy_features():
  rng = np.random.default_rng(2)
  y = rng.integers(0, 5, 1500)
  x = _clusters(rng, y, 5, 16, spread=6.0)
  runs = few_shot.few_shot_runs(x[:1000], y[:1000], x[1000:], y[1000:], 5, (1, 25), seeds=4,
                                l2_regs=few_shot.DEFAULT_L2_REGS, val_per_class=20)
  one, many = np.mean(runs[1][0]), np.mean(runs[25][0])
  assert len(runs[1][0]) == 4 and np.std(runs[1][0]) > 0  # seeds draw different shots
  assert many > one + 10 and many > 60


# ----------------------------------------------------------------------------- kNN


def test_knn_several_k_equal_single_k_runs():
  data = _layered(4, 250, 100)
  bank, queries = data.layers["cls"]["online"][:250, -1], data.layers["cls"]["online"][250:, -1]
  multi = knn.knn_scores_multi(bank, data.labels["train"], queries, 4, (20, 1, 600))
  for k in (20, 1, 600):
    single = knn.knn_scores(bank, data.labels["train"], queries, 4, k=k)
    np.testing.assert_allclose(multi[k], single, rtol=1e-5)  # float32 sums in another order
  # k beyond the bank uses the whole bank.
  whole = knn.knn_scores(bank, data.labels["train"], queries, 4, k=250)
  np.testing.assert_allclose(multi[600], whole, rtol=1e-5)

  several = evaluators.build("knn", {"type": "knn", "k": (5, 20)}).run(data.ctx(4))
  for k in (5, 20):
    one = evaluators.build("knn", {"type": "knn", "k": k}).run(data.ctx(4))
    for name in ("online", "ema"):
      assert several[f"{name}/top1_k{k}"] == one[f"{name}/top1"]
      assert several[f"{name}/top5_k{k}"] == one[f"{name}/top5"]
  assert several["online/top1"] == several["online/top1_k5"]  # the first k keeps the old names
  assert several["protocol"]["k"] == [5, 20] and one["protocol"]["k"] == 20
  assert several["protocol"]["k_effective"] == [5, 20]
  assert "online/top1_k20" not in one  # a single k: the names are unchanged


def test_knn_block_feature_equals_hand_taken_layer(tmp_path):
  data = _layered(5, 200, 80)
  cfg = {"type": "knn", "k": 10, "feature": "block:1", "pooling": "mean", "batch_size": 32}
  result = evaluators.build("knn", cfg).run(data.ctx(4, tmp_path))
  assert {p for p, _ in data.calls["layers"]} == {"mean"} and data.calls["encode"] == 0
  for name in ("online", "ema"):
    table = data.layers["mean"][name]
    scores = knn.knn_scores(table[:200, 1], data.labels["train"], table[200:, 1], 4, k=10)
    top1 = 100.0 * np.mean(scores.argmax(1) == data.labels["eval"])
    assert result[f"{name}/top1"] == pytest.approx(top1)
  assert result["protocol"]["feature"] == "block:1"
  final = evaluators.build("knn", {"type": "knn", "k": 10}).run(data.ctx(4))
  hand_final = knn.knn_scores(data.layers["cls"]["online"][:200, -1], data.labels["train"],
                              data.layers["cls"]["online"][200:, -1], 4, k=10)
  assert final["online/top1"] == pytest.approx(
      100.0 * np.mean(hand_final.argmax(1) == data.labels["eval"]))
  with pytest.raises(ValueError, match="block:0 .. block:2"):
    evaluators.build("knn", dict(cfg, feature="block:3")).run(data.ctx(4))
  with pytest.raises(ValueError, match="use 'final', 'block:N'"):
    evaluators.build("knn", dict(cfg, feature="layer3")).run(data.ctx(4))


# ----------------------------------------------------------------------------- per-layer probe


def test_knn_protocol_records_the_pooling_its_features_had(tmp_path):
  """'final' features are pooled by the method (ctx.pooling: what the protocol records); the
  evaluator's pooling option applies to 'block:N' features only."""
  import dataclasses
  data = _layered(5, 200, 80)
  ctx = dataclasses.replace(data.ctx(4, tmp_path), pooling="mean")
  final = evaluators.build("knn", {"type": "knn", "k": 10, "pooling": "cls"}).run(ctx)
  assert final["protocol"]["pooling"] == "mean"
  ctx = dataclasses.replace(data.ctx(4, tmp_path), pooling="mean")
  block = evaluators.build("knn", {"type": "knn", "k": 10, "pooling": "cls",
                                   "feature": "block:1"}).run(ctx)
  assert block["protocol"]["pooling"] == "cls"


def test_layer_probe_reports_every_block_and_writes_png(tmp_path):
  data = _layered(6, 240, 100, depth=3)
  cfg = {"type": "layer_probe", "k": 10, "pooling": "cls", "batch_size": 64}
  result = evaluators.build("layers", cfg).run(data.ctx(4, tmp_path, step=42))
  json.dumps(result)
  for name in ("online", "ema"):
    accs = [result[f"{name}/top1_block{i}"] for i in range(4)]
    assert f"{name}/top1_block4" not in result  # depth 3: blocks 0, 1, 2 and the final norm
    table = data.layers["cls"][name]
    for i in range(4):
      scores = knn.knn_scores(table[:240, i], data.labels["train"], table[240:, i], 4, k=10)
      assert accs[i] == pytest.approx(100.0 * np.mean(scores.argmax(1) == data.labels["eval"]))
    assert accs[3] > accs[0] + 20  # the least noisy layer is the most accurate
    assert result[f"{name}/best_block"] == int(np.argmax(accs))
  assert result["path"] == os.path.join(str(tmp_path), "layer_probe_step42.png")
  with Image.open(result["path"]) as im:
    assert im.format == "PNG" and im.size == (500, 350)
  assert result["protocol"]["depth"] == 3 and result["protocol"]["classifier"] == "knn"
  linear = evaluators.build("layers", dict(cfg, classifier="linear", optimizer="sgd", epochs=5,
                                           warmup_epochs=1, probe_batch_size=32)
                            ).run(data.ctx(4, tmp_path, step=43))
  assert linear["online/top1_block3"] > 90.0 and linear["protocol"]["optimizer"] == "sgd"


# ----------------------------------------------------------------------------- attentive probe


def _token_data(seed, n, num_classes=4, length=9, dim=16):
  """Tokens [n, 1 + L, D]: every token holds the embedding of a random class (decoys) plus
  noise, except one random patch per image, which holds the image's class and a marker
  (dim 0 = 4, decoys 0). Averaging the tokens mostly averages decoys; attending to the marked
  token reads the class."""
  rng = np.random.default_rng(seed)
  y = rng.integers(0, num_classes, n)
  emb = rng.normal(size=(num_classes, dim - 1)) * 2.0
  tokens = np.zeros((n, 1 + length, dim))
  tokens[..., 1:] = emb[rng.integers(0, num_classes, (n, 1 + length))]
  where = 1 + rng.integers(0, length, n)
  tokens[np.arange(n), where, 0] = 4.0
  tokens[np.arange(n), where, 1:] = emb[y]
  tokens += 0.3 * rng.normal(size=tokens.shape)
  return tokens.astype(np.float32), y


def test_attentive_probe_finds_the_class_token(tmp_path):
  tokens, y = _token_data(7, 768)
  data = FakeEncoder(y[:512], y[512:], tokens={"online": tokens})
  cfg = {"type": "attentive_probe", "epochs": 8, "warmup_epochs": 1, "batch_size": 32,
         "base_lr": 0.05, "num_heads": 2}
  ctx = data.ctx(4, tmp_path)
  result = evaluators.build("attn", cfg).run(ctx)
  json.dumps(result)
  assert result["online/top1"] > 90.0, result
  p = result["protocol"]
  assert (p["num_tokens"], p["num_heads"], p["batch_size"]) == (9, 2, 32)
  assert p["lr"] == pytest.approx(0.05 * 32 / 256) and (p["num_train"], p["num_eval"]) == (512, 256)
  cached = [v for k, v in ctx.feature_cache.items() if k[0] == "tokens"]
  assert all(v[0]["online"].dtype == np.float16 for v in cached) and len(cached) == 2
  # Mean pooling of the same tokens with a linear probe is far worse: the attention matters.
  mean = tokens[:, 1:].mean(1)
  probe = evaluators.build("lin", {"type": "linear_probe", "optimizer": "sgd", "epochs": 8,
                                   "warmup_epochs": 1, "batch_size": 32})
  fake = FakeEncoder(y[:512], y[512:], layers={"online": mean[:, None]})
  assert probe.run(fake.ctx(4))["online/top1"] < 60.0


def test_attentive_pooler_shapes_and_decay_mask():
  import jax
  import jax.numpy as jnp
  model = attentive_probe.AttentivePooler(num_classes=3, num_heads=2)
  params = jax.jit(model.init)(jax.random.PRNGKey(0), jnp.zeros((1, 5, 8)))["params"]
  assert params["query"].shape == (1, 8) and params["head"]["kernel"].shape == (8, 3)
  mask = attentive_probe._decay_mask(params)
  assert not mask["query"] and mask["q"]["kernel"] and not mask["q"]["bias"]
  assert not mask["token_norm"]["scale"] and mask["head"]["kernel"]
  # The pooled output cannot depend on the token order (no position inside the probe).
  x = np.random.default_rng(0).normal(size=(2, 5, 8)).astype(np.float32)
  logits = np.asarray(jax.jit(model.apply)({"params": params}, np.concatenate([x, x[:, ::-1]])))
  assert logits.shape == (4, 3)
  np.testing.assert_allclose(logits[:2], logits[2:], rtol=1e-5, atol=1e-6)


# ----------------------------------------------------------------------------- end to end


def test_new_evaluators_on_a_real_tiny_encoder(tmp_path):
  import jax
  c = tiny_config("mae")
  tr = train.Trainer.create(c, devices=jax.devices()[:1])
  ctx = tr.eval_context(str(tmp_path), 0)
  evals = {  # all three read the same cached per-block features (one encode_layers pass per split)
      "knn_block": {"type": "knn", "k": (5, 10), "feature": "block:0", "pooling": "cls",
                    "max_train": 200, "max_eval": 50, "batch_size": 100},
      "layers": {"type": "layer_probe", "k": 5, "pooling": "cls", "max_train": 200,
                 "max_eval": 50, "batch_size": 100},
      "few_shot": {"type": "few_shot", "shots": (1, 2), "seeds": 2, "val_per_class": 2,
                   "feature": "block:0", "pooling": "cls", "max_train": 200, "max_eval": 50,
                   "batch_size": 100},
  }
  results = evaluators.run_all(evals, ctx)
  depth = c.model.depth
  assert results["layers"]["protocol"]["depth"] == depth
  assert {k for k in results["layers"] if "top1_block" in k} == {
      f"{n}/top1_block{i}" for n in ("online", "ema") for i in range(depth + 1)}
  # Block 0 of the layer probe (k=5) is the kNN on block 0 (k=5), from the same features.
  assert results["layers"]["online/top1_block0"] == results["knn_block"]["online/top1_k5"]
  assert results["few_shot"]["protocol"]["num_train_subset"] == 200
  assert len([k for k in ctx.feature_cache if k[0] == "layers"]) == 2  # train and eval
  for r in results.values():
    for k, v in r.items():
      if "top1" in k:
        assert 0.0 <= v <= 100.0
  tokens, _ = attentive_probe.extract_tokens(ctx, "eval", 25, 50)
  grid = (c.input.image_size // c.model.patch_size) ** 2
  assert tokens["online"].shape[:2] == (50, 1 + grid) and tokens["online"].dtype == np.float16


def test_concat_last_blocks_and_normed_cls_features_as_dino_and_ibot(tmp_path):
  """iBOT / DINO's eval_linear.py: the [CLS] of the last N blocks, each through the encoder's
  final norm, concatenated. The ViT's 'cls_normed' layers apply the final LayerNorm to each
  block's cls token (the last one is the final features); 'concat_last:N' concatenates the
  last N blocks."""
  import jax
  from mim_jax import methods
  from mim_jax.models import vit
  m = methods.get(tiny_config("mae"))
  x = jax.random.normal(jax.random.PRNGKey(0), (3, 32, 32, 3))
  p = m.encoder.init(jax.random.PRNGKey(1), x)
  out = vit.outputs(m.encoder, p, x, pooling="cls_normed", layers=True)
  _, inter = m.encoder.apply(p, x, mutable=["intermediates"])
  blocks = inter["intermediates"]["encoder"]["block_outputs"]
  norm = p["params"]["encoder"]["norm"]
  for i, t in enumerate(blocks):
    c = np.asarray(t[:, 0], np.float64)
    want = (c - c.mean(-1, keepdims=True)) / np.sqrt(c.var(-1, keepdims=True) + 1e-6)
    want = want * np.asarray(norm["scale"]) + np.asarray(norm["bias"])
    np.testing.assert_allclose(out["layers"][i], want, rtol=1e-4, atol=1e-5)
  np.testing.assert_allclose(out["layers"][-2], out["pooled"], rtol=1e-5, atol=1e-6)
  np.testing.assert_allclose(out["pooled"], vit.pool(m.encoder.apply(p, x), "cls"), rtol=1e-6)
  # The evaluator side: concat_last:2 of per-block features.
  data = _layered(5, 200, 80, depth=3)
  feats, _ = knn.select_features(data.ctx(4, tmp_path), "train", 32, None, "concat_last:2", "cls")
  layers = data.layers["cls"]["online"][:200]
  np.testing.assert_allclose(feats["online"], np.concatenate([layers[:, 1], layers[:, 2]], axis=1))
  with pytest.raises(ValueError, match="concat_last:1 .. concat_last:3"):
    knn.select_features(data.ctx(4, tmp_path), "train", 32, None, "concat_last:4", "cls")
  probe = evaluators.build("lin", {"type": "linear_probe", "epochs": 2, "optimizer": "sgd",
                                   "feature": "concat_last:2", "pooling": "cls",
                                   "batch_size": 64}).run(data.ctx(4, tmp_path))
  assert probe["protocol"]["feature"] == "concat_last:2" and probe["protocol"]["pooling"] == "cls"


def test_ibot_is_evaluated_as_its_official_code():
  from mim_jax import config_lib
  for preset in ("", "cifar10", "imagenet"):
    c = config_lib.load("ibot", preset)
    assert c.pooling == "cls" and c.evals.knn.pooling == "cls"
    assert (c.evals.linear.feature, c.evals.linear.pooling) == ("concat_last:4", "cls_normed")
