"""Weighted k-nearest-neighbour classification on frozen features.

The protocol of InstDisc (Wu et al., 2018) as used by DINO: train-split
features form the bank, eval-split features are the queries, both L2
normalised; each query takes its ``k`` most cosine-similar bank entries, each
voting for its label with weight ``exp(sim / T)``; the class with the largest
summed weight is the prediction.

Several ``k`` share one pass: the ``max(k)`` nearest neighbours are found once
(sorted by similarity) and each ``k`` sums the votes of the first ``k`` of them.
The features are the pooled output of the encoder ('final', what ``ctx.encode``
gives) or the pooled output of one block (``'block:N'``, via ``ctx.encode_layers``).
This module also holds the feature helpers the other frozen-feature evaluators
(few-shot, per-layer and attentive probes) share.
"""
from __future__ import annotations

import functools
import logging
import math
from typing import Optional, Sequence, Union

import jax
import jax.numpy as jnp
import numpy as np

from mim_jax.evaluators import common

# 'cls_normed': each block's cls token after the encoder's final LayerNorm (DINO / iBOT's
# get_intermediate_layers, which their eval_linear.py concatenates over the last blocks).
POOLINGS = ("cls", "mean", "cls_normed")


# ----------------------------------------------------------------------------- features


def check_pooling(pooling, who: str) -> str:
  """``pooling`` if it is one ``encode_layers`` understands, else a ValueError naming the fix."""
  if pooling not in POOLINGS:
    raise ValueError(f"{who}: pooling {pooling!r} is not one of {POOLINGS}; set the evaluator's "
                     "pooling option to 'cls' or 'mean'")
  return pooling


def as_layer_list(layers) -> list:
  """Per-layer features as a list of [B, D_i] (widths may differ: CNN stages); a stacked
  [B, layers, D] array (equal widths) is split along its layer axis."""
  if isinstance(layers, (list, tuple)):
    return list(layers)
  return [layers[:, i] for i in range(layers.shape[1])]


def extract_layers(ctx: common.EvalContext, split: str, batch_size: int, limit, pooling: str):
  """Every block's (stage's) pooled output ``({name: [float32 [N, D_i] per layer]}, labels
  [N])``: entry i < last is block i's output (before a ViT's final norm), the last entry the
  final output."""
  if ctx.encode_layers is None:
    raise ValueError("per-block features need ctx.encode_layers; build the EvalContext with it "
                     "(Trainer.eval_context does)")
  check_pooling(pooling, "per-block features")

  def encode(x):   # one flat {name/i: [B, D_i]} per batch, regrouped below
    return {(name, i): f for name, layers in ctx.encode_layers(x, pooling).items()
            for i, f in enumerate(as_layer_list(layers))}

  flat, labels = common.extract_outputs(ctx, split, batch_size, limit, ("layers", pooling), encode)
  out: dict = {}
  for (name, i), f in sorted(flat.items(), key=lambda kv: kv[0]):
    out.setdefault(name, []).append(f)
  return out, labels


def parse_feature(feature) -> Optional[int]:
  """None for 'final', N for 'block:N' (and for 'concat_last:N', N blocks); a ValueError naming
  the accepted forms otherwise."""
  feature = str(feature)
  if feature == "final":
    return None
  head, _, index = feature.partition(":")
  if head not in ("block", "concat_last") or not index.lstrip("-").isdigit():
    raise ValueError(f"feature {feature!r}: use 'final', 'block:N' (N = 0-based block index) or "
                     f"'concat_last:N' (the last N blocks' outputs concatenated)")
  return int(index)


def select_features(ctx: common.EvalContext, split: str, batch_size: int, limit, feature,
                    pooling) -> tuple[dict[str, np.ndarray], np.ndarray]:
  """Pooled features ``({name: float32 [N, D]}, labels)`` of ``split``: the encoder's output
  ('final', ``common.extract_features``, shared cache) or block N's output ('block:N')."""
  block = parse_feature(feature)
  if block is None:
    return common.extract_features(ctx, split, batch_size, common.cap(limit))
  layers, labels = extract_layers(ctx, split, batch_size, limit, pooling)
  depth = len(next(iter(layers.values()))) - 1
  if str(feature).startswith("concat_last:"):
    if not 1 <= block <= depth:
      raise ValueError(f"feature {feature!r}: the encoder has {depth} blocks (concat_last:1 .. "
                       f"concat_last:{depth})")
    return {name: np.concatenate(f[depth - block:depth], axis=1) for name, f in layers.items()}, labels
  if not 0 <= block < depth:
    raise ValueError(f"feature {feature!r}: the encoder has {depth} blocks (block:0 .. "
                     f"block:{depth - 1}); use 'final' for the final-norm output")
  return {name: f[block] for name, f in layers.items()}, labels


# ----------------------------------------------------------------------------- scores


def _l2_normalise(x: jnp.ndarray) -> jnp.ndarray:
  """Rows scaled to unit length (zero rows stay zero)."""
  x = x.astype(jnp.float32)
  return x / jnp.maximum(jnp.linalg.norm(x, axis=-1, keepdims=True), 1e-12)


@functools.partial(jax.jit, static_argnames=("ks", "num_classes"))
def _chunk_scores(queries, bank, bank_labels, bank_valid, temperature, *, ks, num_classes):
  """Class scores [len(ks), Q, C] of normalised ``queries`` against a chunked bank.

  ``bank`` is [nb, bc, D] (normalised, zero padded), ``bank_labels`` and
  ``bank_valid`` are [nb, bc]. The running top-``max(ks)`` is merged chunk by
  chunk, so memory is O(Q * (bc + k)) whatever the bank size; it stays sorted by
  similarity, so the ``k`` nearest are its first ``k`` entries for every ``k``.
  """
  num_q, k = queries.shape[0], max(ks)

  def merge(carry, chunk):
    best_sim, best_lab = carry
    feats, labels, valid = chunk
    sim = jnp.matmul(queries, feats.T, precision=jax.lax.Precision.HIGHEST)
    sim = jnp.where(valid[None, :], sim, -jnp.inf)
    sim, idx = jax.lax.top_k(sim, min(k, sim.shape[1]))
    lab = labels[idx]
    both_sim = jnp.concatenate([best_sim, sim], axis=1)
    both_lab = jnp.concatenate([best_lab, lab], axis=1)
    top_sim, top_idx = jax.lax.top_k(both_sim, k)
    return (top_sim, jnp.take_along_axis(both_lab, top_idx, axis=1)), None

  init = (jnp.full((num_q, k), -jnp.inf, jnp.float32), jnp.zeros((num_q, k), jnp.int32))
  (sim, lab), _ = jax.lax.scan(merge, init, (bank, bank_labels, bank_valid))
  votes = jnp.exp(sim / temperature)[..., None] * jax.nn.one_hot(lab, num_classes, dtype=jnp.float32)
  return jnp.stack([votes[:, :kk].sum(axis=1) for kk in ks])  # exp(-inf) = 0 for unfilled slots


def knn_scores_multi(bank: np.ndarray, bank_labels: np.ndarray, queries: np.ndarray,
                     num_classes: int, ks: Sequence[int], temperature: float = 0.07,
                     query_chunk: int = 256, bank_chunk: int = 16384) -> dict[int, np.ndarray]:
  """Weighted-vote class scores ``{k: [Q, num_classes]}`` for several ``k`` in one pass.

  Args:
    bank: [N, D] train features (any N >= 1); normalised here.
    bank_labels: [N] int labels in [0, num_classes).
    queries: [Q, D] features to classify; normalised here.
    num_classes: number of classes.
    ks: neighbour counts; each uses ``min(k, N)`` neighbours. The keys of the
      result are the given ``ks``.
    temperature: T in the vote weight ``exp(cos_sim / T)``.
    query_chunk: queries processed per jitted call.
    bank_chunk: bank rows per scan step (raised to ``max(ks)`` if smaller).
  """
  bank = np.asarray(bank, np.float32)
  queries = np.asarray(queries, np.float32)
  bank_labels = np.asarray(bank_labels, np.int32).reshape(-1)
  n, dim = bank.shape
  if n == 0:
    raise ValueError("kNN bank is empty")
  if queries.shape[1] != dim:
    raise ValueError(f"query dim {queries.shape[1]} != bank dim {dim}")
  ks = tuple(int(k) for k in ks)
  if not ks or min(ks) < 1:
    raise ValueError(f"kNN k must be positive integers, got {ks}")
  effective = tuple(sorted({min(k, n) for k in ks}))
  bc = min(max(int(bank_chunk), max(effective)), n)
  nb = math.ceil(n / bc)
  pad = nb * bc - n
  bank_n = _l2_normalise(jnp.asarray(np.pad(bank, ((0, pad), (0, 0)))))
  bank_n = bank_n.reshape(nb, bc, dim)
  labels = jnp.asarray(np.pad(bank_labels, (0, pad))).reshape(nb, bc)
  valid = jnp.asarray(np.arange(nb * bc) < n).reshape(nb, bc)
  temperature = jnp.float32(temperature)

  q_total = queries.shape[0]
  qc = max(1, min(int(query_chunk), q_total)) if q_total else 1
  out = []
  for start in range(0, q_total, qc):
    chunk = queries[start:start + qc]
    real = len(chunk)
    if real < qc:  # pad to a fixed shape: one compilation for all chunks
      chunk = np.pad(chunk, ((0, qc - real), (0, 0)))
    scores = _chunk_scores(_l2_normalise(jnp.asarray(chunk)), bank_n, labels, valid, temperature,
                           ks=effective, num_classes=int(num_classes))
    out.append(np.asarray(scores)[:, :real])
  stacked = (np.concatenate(out, axis=1) if out
             else np.zeros((len(effective), 0, num_classes), np.float32))
  return {k: stacked[effective.index(min(k, n))] for k in ks}


def knn_scores(bank: np.ndarray, bank_labels: np.ndarray, queries: np.ndarray,
               num_classes: int, k: int = 20, temperature: float = 0.07,
               query_chunk: int = 256, bank_chunk: int = 16384) -> np.ndarray:
  """Weighted-vote class scores [Q, num_classes] for one ``k`` (see :func:`knn_scores_multi`)."""
  return knn_scores_multi(bank, bank_labels, queries, num_classes, (int(k),), temperature,
                          query_chunk, bank_chunk)[int(k)]


def as_ks(k: Union[int, Sequence[int]]) -> tuple[tuple[int, ...], bool]:
  """``(ks, several)``: the k values in the given order (duplicates dropped) and whether a
  list/tuple was given (which selects the ``top1_k{k}`` metric names)."""
  if isinstance(k, (list, tuple)):
    ks = tuple(dict.fromkeys(int(v) for v in k))
    if not ks:
      raise ValueError("kNN k is an empty list; give an int or a list such as (10, 20, 100, 200)")
    return ks, True
  return (int(k),), False


@common.register("knn")
class KNNEvaluator(common.Evaluator):
  """Weighted kNN top-1/top-5 (percent) for each feature set of ``ctx.encode``.

  Options: ``k`` (20; or a list such as ``(10, 20, 100, 200)``, all from one
  top-``max(k)`` search), ``temperature`` (0.07), ``batch_size`` (256, feature
  extraction), ``feature`` ('final': the encoder's pooled features; 'block:N':
  block N's output, 0-based, pooled with ``pooling``), ``pooling`` ('cls' |
  'mean'; 'block:N' only: 'final' features are pooled by the method, and the protocol
  records the method's pooling, ``ctx.pooling``),
  ``max_train`` (cap on the bank, None/0 = whole train split), ``max_eval``
  (cap on queries, None/0 = all), ``query_chunk`` (256), ``bank_chunk`` (16384).

  Metrics per feature set ``name``: ``name/top1`` and ``name/top5`` for an int
  ``k``; for a list, ``name/top1_k{k}`` and ``name/top5_k{k}`` for every ``k``, and
  the first listed ``k``'s numbers also as ``name/top1`` / ``name/top5`` (so tools
  reading those names keep working).
  """

  def run(self, ctx: common.EvalContext) -> dict:
    ks, several = as_ks(self.option("k", 20))
    temperature = float(self.option("temperature", 0.07))
    batch_size = int(self.option("batch_size", 256))
    max_train = common.cap(self.option("max_train", None))
    max_eval = common.cap(self.option("max_eval", None))
    feature = str(self.option("feature", "final"))
    pooling = self.cfg.get("pooling")
    bank, bank_labels = select_features(ctx, "train", batch_size, max_train, feature, pooling)
    queries, query_labels = select_features(ctx, "eval", batch_size, max_eval, feature, pooling)
    bank_size, num_queries = len(bank_labels), len(query_labels)
    result = {}
    for name in sorted(bank):
      scores = knn_scores_multi(bank[name], bank_labels, queries[name], ctx.num_classes, ks,
                                temperature=temperature,
                                query_chunk=int(self.option("query_chunk", 256)),
                                bank_chunk=int(self.option("bank_chunk", 16384)))
      for i, k in enumerate(ks):
        acc = common.topk_accuracy(scores[k], query_labels, ks=(1, 5))
        if several:
          result[f"{name}/top1_k{k}"] = acc[1]
          result[f"{name}/top5_k{k}"] = acc[5]
        if i == 0:
          result[f"{name}/top1"] = acc[1]
          result[f"{name}/top5"] = acc[5]
        logging.info("%s %s (%s): kNN k=%d top1 %.2f top5 %.2f", self.name, name, feature, k,
                     acc[1], acc[5])
    result["protocol"] = {
        "type": "knn",
        "k": list(ks) if several else ks[0],
        "k_effective": [min(k, bank_size) for k in ks] if several else min(ks[0], bank_size),
        "temperature": temperature,
        "weighting": "exp(cos_sim / T), summed per class",
        "feature": feature,
        # 'final' features come pooled by the method (its config.pooling); the evaluator's
        # own pooling option applies to 'block:N' features only.
        "pooling": pooling if parse_feature(feature) is not None else (ctx.pooling or pooling),
        "bank_size": int(bank_size),
        "num_queries": int(num_queries),
        "bank_split": "train",
        "query_split": "eval",
        "max_train": max_train,
        "features": "frozen, no augmentation",
        "normalisation": "L2",
        "top5_classes": min(5, int(ctx.num_classes)),
    }
    return result
