"""The method's own loss on held-out and on training images: the over-fitting gauge of the
data-scaling study (Xie et al., "On Data Scaling in Masked Image Modeling", CVPR 2023).

A masked-image model pretrained long on little data drives its loss down on the images it saw
while the loss on unseen images stalls or rises. This evaluator measures both the same way:
``ctx.loss(images, seed)`` (the training loss of each image with masks drawn from ``seed``, no
augmentation) averaged over a fixed seeded subset of the held-out 'eval' split and over one of
the 'pretrain' split, the images pretraining sampled from (the training split, or its
``input.data.train_subset``), so "training loss" is the loss on images the model was trained
on. Both sides use the same seeds and preprocessing, so their difference (``gap``) is the
generalisation gap of the pretext task, free of the augmentation the logged training loss has.
"""
from __future__ import annotations

import logging
from typing import Optional

import numpy as np

from mim_jax.evaluators import common

TRAIN_SPLIT = "pretrain"
HELDOUT_SPLIT = "eval"


def mean_loss(ctx: common.EvalContext, split: str, limit: Optional[int], seeds: tuple[int, ...],
              batch_size: int) -> tuple[float, list[float], int]:
  """Mean per-image loss over ``split`` (at most ``limit`` images: the source's seeded subset).

  Returns ``(mean over seeds of the per-seed means, per-seed means, images used)``; one pass
  over the data, every seed evaluated on each batch.
  """
  sums = np.zeros(len(seeds), np.float64)
  count = 0
  for images, _ in ctx.batches(split, batch_size, limit):
    images = np.asarray(images)
    if limit is not None:
      images = images[:max(limit - count, 0)]
    if not len(images):
      break
    for i, seed in enumerate(seeds):
      losses = np.asarray(ctx.loss(images, seed), np.float64).reshape(-1)
      if losses.shape[0] != len(images):
        raise ValueError(f"ctx.loss gave {losses.shape[0]} losses for {len(images)} images: it "
                         "must return one loss per image")
      sums[i] += losses.sum()
    count += len(images)
    if limit is not None and count >= limit:
      break
  if not count:
    raise ValueError(f"split {split!r} yielded no images for the held-out loss")
  per_seed = sums / count
  return float(per_seed.mean()), [float(v) for v in per_seed], count


@common.register("heldout_loss")
class HeldoutLossEvaluator(common.Evaluator):
  """``heldout_loss``, ``train_loss`` (mean per-image loss) and ``gap`` = held-out - train.

  Options: ``num_images`` (1000 held-out images; 0 = the whole 'eval' split), ``max_train``
  (1000 'pretrain' images; 0 = all), ``seeds`` ((0,): mask seeds, averaged), ``batch_size``
  (256).
  """

  def run(self, ctx: common.EvalContext) -> dict:
    if ctx.loss is None:
      raise ValueError(f"evaluator {self.name!r}: this method has no per-image loss "
                       "(EvalContext.loss is None): disable it with "
                       f"--config.evals.{self.name}.enabled=False")
    seeds = self.option("seeds", (0,))
    seeds = tuple(int(s) for s in (seeds if isinstance(seeds, (list, tuple)) else (seeds,)))
    if not seeds:
      raise ValueError(f"evaluator {self.name!r}: seeds is empty: give at least one, e.g. "
                       f"--config.evals.{self.name}.seeds='(0,)'")
    num_images = int(self.option("num_images", 1000)) or None   # 0 = the whole split
    max_train = int(self.option("max_train", 1000)) or None
    batch_size = int(self.option("batch_size", 256))
    heldout, heldout_seeds, n_heldout = mean_loss(ctx, HELDOUT_SPLIT, num_images, seeds,
                                                  batch_size)
    train, train_seeds, n_train = mean_loss(ctx, TRAIN_SPLIT, max_train, seeds, batch_size)
    logging.info("%s: held-out loss %.4f, train loss %.4f (gap %.4f)", self.name, heldout, train,
                 heldout - train)
    return {
        "heldout_loss": heldout,
        "train_loss": train,
        "gap": heldout - train,
        "protocol": {
            "type": "heldout_loss",
            "loss": "the method's training loss per image (its masking rule, masks from each seed)",
            "augmentation": "none (stored images at image_size)",
            "seeds": list(seeds),
            "heldout_split": HELDOUT_SPLIT,
            "num_heldout": n_heldout,
            "train_split": f"{TRAIN_SPLIT} (the images pretraining sampled from)",
            "num_train": n_train,
            "subset": "a fixed seeded subset of each split when capped",
        },
        "per_seed": {"heldout_loss": heldout_seeds, "train_loss": train_seeds},
    }
