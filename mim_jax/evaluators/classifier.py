"""Top-1 / top-5 accuracy of a fine-tuned classifier on the held-out split.

The evaluator of `config.method='finetune'`: it reads the logits the method's `features()`
returns under 'logits' (`ctx.encode`), on the 'eval' split as the eval pipeline gives it
(in memory: the stored images resized to the model's size, no crop; streaming: shorter side
resized to size / 0.875, centre crop, as MAE's eval transform with crop_pct 224/256), and
compares the arg-max class with the label, like MAE's `engine_finetune.evaluate` (which also
reports the mean cross-entropy, here `loss`).
"""
from __future__ import annotations

import dataclasses
import logging

import numpy as np

from mim_jax.evaluators import common


def cross_entropy(logits: np.ndarray, labels: np.ndarray) -> float:
  """Mean of -log softmax(logits)[label], computed stably in float64."""
  z = np.asarray(logits, np.float64)
  z = z - z.max(axis=1, keepdims=True)
  logp = z - np.log(np.exp(z).sum(axis=1, keepdims=True))
  return float(-logp[np.arange(len(labels)), np.asarray(labels)].mean()) if len(labels) else float("nan")


def view_log_probs(encode, images: np.ndarray) -> dict:
  """``images`` [b, V, ...] -> {'logits': log of the softmax averaged over the V views [b, C]
  (its arg-max is VideoMAE's merged prediction; its cross-entropy that of the averaged
  probabilities), 'views': [b] V}."""
  images = np.asarray(images)
  b, v = images.shape[:2]
  logits = np.asarray(encode(images.reshape((b * v,) + images.shape[2:]))["logits"], np.float64)
  z = logits - logits.max(axis=1, keepdims=True)
  probs = np.exp(z) / np.exp(z).sum(axis=1, keepdims=True)
  mean = probs.reshape(b, v, -1).mean(axis=1)
  return {"logits": np.log(np.maximum(mean, 1e-300)), "views": np.full((b,), v, np.int32)}


@common.register("classifier")
class ClassifierEvaluator(common.Evaluator):
  """Options: `batch_size` (256), `max_eval` (0 = the whole held-out split), `pooling` and
  `head` (recorded in the protocol only)."""

  def run(self, ctx: common.EvalContext) -> dict:
    batch_size = int(self.option("batch_size", 256))
    max_eval = self.option("max_eval", None)
    views = ctx.view_batches is not None
    if views:      # VideoMAE's multi-view test: softmax of every view, averaged per example
      feats, labels = common.extract_outputs(
          dataclasses.replace(ctx, batches=ctx.view_batches), "eval", batch_size, max_eval,
          ("views",), lambda images: view_log_probs(ctx.encode, images))
    else:
      feats, labels = common.extract_features(ctx, "eval", batch_size, max_eval)
    if "logits" not in feats:
      raise ValueError(f"evaluator {self.name!r} needs logits from the method's features(): use "
                       f"config.method='finetune' (got feature sets {sorted(feats)})")
    logits = feats["logits"]
    if logits.shape[1] != ctx.num_classes:
      raise ValueError(f"the classifier has {logits.shape[1]} outputs but the data has "
                       f"{ctx.num_classes} classes: set config.finetune.num_classes={ctx.num_classes}")
    ks = (1, 5) if ctx.num_classes > 5 else (1,)
    acc = common.topk_accuracy(logits, labels, ks=ks)
    result = {f"top{k}": acc[k] for k in ks}
    result["loss"] = cross_entropy(logits, labels)
    logging.info("%s: top1 %.2f%s", self.name, acc[1], f" top5 {acc[5]:.2f}" if 5 in acc else "")
    result["protocol"] = {
        "type": "classifier",
        "split": "eval",
        "num_images": int(len(labels)),
        "num_classes": int(ctx.num_classes),
        "step": int(ctx.step),
        "pooling": self.cfg.get("pooling"),
        "head": self.cfg.get("head", "linear"),
        "preprocessing": "eval pipeline: in memory, stored images resized to image_size (no crop); "
                         "streaming, shorter side to image_size / 0.875 then centre crop; "
                         "streamed video, VideoMAE's test view(s)",
        "augmentation": "none",
        "prediction": ("arg-max of the softmax averaged over the test views" if views else
                       "arg-max of the fine-tuned head's logits"),
    }
    if views:
      result["protocol"]["views_per_example"] = int(feats["views"][0])
    return result
