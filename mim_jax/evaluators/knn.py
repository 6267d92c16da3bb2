"""Weighted k-nearest-neighbour classification on frozen features.

The protocol of InstDisc (Wu et al., 2018) as used by DINO: train-split
features form the bank, eval-split features are the queries, both L2
normalised; each query takes its ``k`` most cosine-similar bank entries, each
voting for its label with weight ``exp(sim / T)``; the class with the largest
summed weight is the prediction.
"""
from __future__ import annotations

import functools
import logging
import math

import jax
import jax.numpy as jnp
import numpy as np

from mim_jax.evaluators import common


def _l2_normalise(x: jnp.ndarray) -> jnp.ndarray:
  """Rows scaled to unit length (zero rows stay zero)."""
  x = x.astype(jnp.float32)
  return x / jnp.maximum(jnp.linalg.norm(x, axis=-1, keepdims=True), 1e-12)


@functools.partial(jax.jit, static_argnames=("k", "num_classes"))
def _chunk_scores(queries, bank, bank_labels, bank_valid, temperature, *, k, num_classes):
  """Class scores [Q, C] of normalised ``queries`` against a chunked bank.

  ``bank`` is [nb, bc, D] (normalised, zero padded), ``bank_labels`` and
  ``bank_valid`` are [nb, bc]. The running top-``k`` is merged chunk by chunk,
  so memory is O(Q * (bc + k)) whatever the bank size.
  """
  num_q = queries.shape[0]

  def merge(carry, chunk):
    best_sim, best_lab = carry
    feats, labels, valid = chunk
    sim = jnp.matmul(queries, feats.T, precision=jax.lax.Precision.HIGHEST)
    sim = jnp.where(valid[None, :], sim, -jnp.inf)
    sim, idx = jax.lax.top_k(sim, k)
    lab = labels[idx]
    both_sim = jnp.concatenate([best_sim, sim], axis=1)
    both_lab = jnp.concatenate([best_lab, lab], axis=1)
    top_sim, top_idx = jax.lax.top_k(both_sim, k)
    return (top_sim, jnp.take_along_axis(both_lab, top_idx, axis=1)), None

  init = (jnp.full((num_q, k), -jnp.inf, jnp.float32), jnp.zeros((num_q, k), jnp.int32))
  (sim, lab), _ = jax.lax.scan(merge, init, (bank, bank_labels, bank_valid))
  weights = jnp.exp(sim / temperature)  # exp(-inf) = 0 for unfilled slots
  return jnp.einsum("qk,qkc->qc", weights, jax.nn.one_hot(lab, num_classes, dtype=jnp.float32))


def knn_scores(bank: np.ndarray, bank_labels: np.ndarray, queries: np.ndarray,
               num_classes: int, k: int = 20, temperature: float = 0.07,
               query_chunk: int = 256, bank_chunk: int = 16384) -> np.ndarray:
  """Weighted-vote class scores [Q, num_classes] for each query.

  Args:
    bank: [N, D] train features (any N >= 1); normalised here.
    bank_labels: [N] int labels in [0, num_classes).
    queries: [Q, D] features to classify; normalised here.
    num_classes: number of classes.
    k: neighbours per query; ``min(k, N)`` are used.
    temperature: T in the vote weight ``exp(cos_sim / T)``.
    query_chunk: queries processed per jitted call.
    bank_chunk: bank rows per scan step (raised to ``k`` if smaller).
  """
  bank = np.asarray(bank, np.float32)
  queries = np.asarray(queries, np.float32)
  bank_labels = np.asarray(bank_labels, np.int32).reshape(-1)
  n, dim = bank.shape
  if n == 0:
    raise ValueError("kNN bank is empty")
  if queries.shape[1] != dim:
    raise ValueError(f"query dim {queries.shape[1]} != bank dim {dim}")
  k = max(1, min(int(k), n))
  bc = min(max(int(bank_chunk), k), n)
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
                           k=k, num_classes=int(num_classes))
    out.append(np.asarray(scores)[:real])
  if not out:
    return np.zeros((0, num_classes), np.float32)
  return np.concatenate(out)


@common.register("knn")
class KNNEvaluator(common.Evaluator):
  """Weighted kNN top-1/top-5 (percent) for each feature set of ``ctx.encode``.

  Options: ``k`` (20), ``temperature`` (0.07), ``batch_size`` (256, feature
  extraction), ``pooling`` (recorded only), ``max_train`` (cap on the bank,
  None = whole train split), ``max_eval`` (cap on queries, None = all),
  ``query_chunk`` (256), ``bank_chunk`` (16384).
  """

  def run(self, ctx: common.EvalContext) -> dict:
    k = int(self.option("k", 20))
    temperature = float(self.option("temperature", 0.07))
    batch_size = int(self.option("batch_size", 256))
    max_train = self.option("max_train", None)
    max_eval = self.option("max_eval", None)
    bank, bank_labels = common.extract_features(ctx, "train", batch_size, max_train)
    queries, query_labels = common.extract_features(ctx, "eval", batch_size, max_eval)
    bank_size, num_queries = len(bank_labels), len(query_labels)
    result = {}
    for name in sorted(bank):
      scores = knn_scores(bank[name], bank_labels, queries[name], ctx.num_classes, k=k,
                          temperature=temperature,
                          query_chunk=int(self.option("query_chunk", 256)),
                          bank_chunk=int(self.option("bank_chunk", 16384)))
      acc = common.topk_accuracy(scores, query_labels, ks=(1, 5))
      result[f"{name}/top1"] = acc[1]
      result[f"{name}/top5"] = acc[5]
      logging.info("%s %s: kNN top1 %.2f top5 %.2f", self.name, name, acc[1], acc[5])
    result["protocol"] = {
        "type": "knn",
        "k": k,
        "k_effective": min(k, bank_size),
        "temperature": temperature,
        "weighting": "exp(cos_sim / T), summed per class",
        "pooling": self.cfg.get("pooling"),
        "bank_size": int(bank_size),
        "num_queries": int(num_queries),
        "bank_split": "train",
        "query_split": "eval",
        "max_train": None if max_train is None else int(max_train),
        "features": "frozen, no augmentation",
        "normalisation": "L2",
        "top5_classes": min(5, int(ctx.num_classes)),
    }
    return result
