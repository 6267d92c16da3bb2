"""Few-shot accuracy of frozen features by closed-form ridge regression (big_vision style).

Recipe, per feature set and per ``shots`` in (1, 5, 10, 25):

1. Features of a fixed seeded subset of the train split (``max_train`` images,
   extracted once and cached) and of the held-out 'eval' split.
2. A class-balanced *minival* is split off that train subset once (seed
   ``split_seed``): ``val_per_class`` images of every class. The rest is the shot
   pool; the minival only picks the regulariser, the eval split is never used
   to choose anything.
3. For each of ``seeds`` seeds (0, 1, ...), ``shots`` images per class are drawn
   from the pool without replacement (``numpy.random.default_rng(seed)``).
4. Ridge regression to one-hot targets in {-1, +1} (big_vision's choice):
   features are centred with the mean of the shot set (queries too), the bias is
   unpenalised (so it equals the mean target), and
   ``W = argmin |Xc W - (Y - mean Y)|^2 + l2 |W|^2``. ``l2`` is ``r * s`` with ``s``
   the mean squared norm of the centred shot features (so the grid does not
   depend on the features' scale) and ``r`` in ``l2_regs`` (2^-10 .. 2^10). All
   ``l2`` are solved at once from one eigendecomposition of the smaller of
   ``Xc Xc^T`` and ``Xc^T Xc`` (float64).
5. The ``l2`` with the best minival accuracy is kept (ties: the larger, i.e.
   more regularised one) and the eval split is scored with it: prediction =
   argmax over classes.

Reported per feature set ``name``: ``name/top1_{shots}shot`` (mean over seeds,
percent) and ``name/top1_{shots}shot_std`` (population std over seeds, ddof 0).
"""
from __future__ import annotations

import logging
from typing import Sequence

import numpy as np

from mim_jax.evaluators import common, knn

DEFAULT_SHOTS = (1, 5, 10, 25)
DEFAULT_L2_REGS = tuple(2.0 ** i for i in range(-10, 11))


def ridge_predictions(x: np.ndarray, y: np.ndarray, num_classes: int, queries: Sequence[np.ndarray],
                      l2_regs: Sequence[float]) -> list[np.ndarray]:
  """Ridge-regression class scores for every relative regulariser, in closed form.

  Args:
    x: [n, D] training features; y: [n] int labels.
    num_classes: width of the one-hot targets (in {-1, +1}).
    queries: feature arrays [m_j, D] to score.
    l2_regs: regularisers relative to the mean squared norm of the centred ``x``.

  Returns:
    one array [len(l2_regs), m_j, num_classes] per query array.
  """
  x = np.asarray(x, np.float64)
  mean = x.mean(axis=0)
  xc = x - mean
  targets = 2.0 * np.eye(num_classes)[np.asarray(y)] - 1.0
  bias = targets.mean(axis=0)
  yc = targets - bias
  scale = max(float((xc ** 2).sum(axis=1).mean()), 1e-12)
  n, dim = xc.shape
  if n <= dim:  # dual: W = Xc^T U (S + l2)^-1 U^T Yc with Xc Xc^T = U S U^T
    s, u = np.linalg.eigh(xc @ xc.T)
    right = u.T @ yc
    left = lambda z: (z - mean) @ xc.T @ u  # noqa: E731
  else:  # primal: W = V (S + l2)^-1 V^T Xc^T Yc with Xc^T Xc = V S V^T
    s, v = np.linalg.eigh(xc.T @ xc)
    right = v.T @ (xc.T @ yc)
    left = lambda z: (z - mean) @ v  # noqa: E731
  s = np.maximum(s, 0.0)  # round-off can leave tiny negative eigenvalues
  inv = 1.0 / (s[None, :] + scale * np.asarray(l2_regs, np.float64)[:, None])  # [R, r]
  out = []
  for z in queries:
    a = left(np.asarray(z, np.float64))  # [m, r]
    out.append(np.einsum("mr,Rr,rc->Rmc", a, inv, right) + bias)
  return out


def split_pool(labels: np.ndarray, num_classes: int, val_per_class: int, need: int,
               seed: int) -> tuple[list[np.ndarray], np.ndarray]:
  """Per class, a seeded shuffle of its indices: the first ``val_per_class`` go to the minival,
  the rest to that class's shot pool. Returns ``(pools per class, minival indices)``."""
  rng = np.random.default_rng(seed)
  pools, val = [], []
  for c in range(num_classes):
    idx = rng.permutation(np.flatnonzero(labels == c))
    if len(idx) < val_per_class + need:
      raise ValueError(f"few_shot: class {c} has {len(idx)} images in the {len(labels)}-image "
                       f"train subset, {val_per_class + need} needed (val_per_class "
                       f"{val_per_class} + {need} shots); raise max_train or lower val_per_class")
    val.append(idx[:val_per_class])
    pools.append(idx[val_per_class:])
  return pools, np.concatenate(val)


def accuracy(scores: np.ndarray, labels: np.ndarray) -> np.ndarray:
  """Percent of rows whose argmax is the label, for each leading index of ``scores``."""
  return 100.0 * (scores.argmax(axis=-1) == np.asarray(labels)[None]).mean(axis=-1)


def few_shot_runs(train_x, train_y, eval_x, eval_y, num_classes: int, shots: Sequence[int],
                  seeds: int, l2_regs: Sequence[float], val_per_class: int, split_seed: int = 0):
  """``{shots: (eval accuracies per seed, chosen relative l2 per seed)}``."""
  train_y = np.asarray(train_y)
  pools, val_idx = split_pool(train_y, num_classes, val_per_class, max(shots), split_seed)
  out = {}
  for n_shots in shots:
    accs, chosen = [], []
    for seed in range(int(seeds)):
      rng = np.random.default_rng(seed)
      idx = np.concatenate([rng.choice(pool, n_shots, replace=False) for pool in pools])
      val_scores, eval_scores = ridge_predictions(train_x[idx], train_y[idx], num_classes,
                                                  [train_x[val_idx], eval_x], l2_regs)
      val_acc = accuracy(val_scores, train_y[val_idx])
      best = int(np.flatnonzero(val_acc == val_acc.max())[-1])  # ties: the larger l2
      accs.append(float(accuracy(eval_scores[best:best + 1], eval_y)[0]))
      chosen.append(float(l2_regs[best]))
    out[int(n_shots)] = (accs, chosen)
  return out


@common.register("few_shot")
class FewShotEvaluator(common.Evaluator):
  """Few-shot ridge-regression accuracy (percent) of frozen features; see the module docstring.

  Options: ``shots`` ((1, 5, 10, 25)), ``seeds`` (5), ``l2_regs`` (2^-10 .. 2^10,
  relative to the mean squared centred feature norm), ``val_per_class`` (5,
  minival images per class taken from the train subset), ``split_seed`` (0),
  ``max_train`` (train subset to extract, None/0 = the whole split), ``max_eval``
  (None/0 = all), ``batch_size`` (256, extraction), ``feature`` ('final' |
  'block:N', as for kNN), ``pooling`` ('cls' | 'mean', for 'block:N').
  """

  def run(self, ctx: common.EvalContext) -> dict:
    shots = tuple(int(s) for s in self.option("shots", DEFAULT_SHOTS))
    seeds = int(self.option("seeds", 5))
    l2_regs = tuple(float(r) for r in self.option("l2_regs", DEFAULT_L2_REGS))
    val_per_class = int(self.option("val_per_class", 5))
    split_seed = int(self.option("split_seed", 0))
    batch_size = int(self.option("batch_size", 256))
    feature = str(self.option("feature", "final"))
    if not shots or min(shots) < 1 or seeds < 1 or not l2_regs:
      raise ValueError("few_shot: shots, seeds and l2_regs must be non-empty and positive, "
                       f"got shots={shots} seeds={seeds} l2_regs={l2_regs}")
    max_train, max_eval = self.option("max_train", None), self.option("max_eval", None)
    pooling = self.cfg.get("pooling")
    train, train_y = knn.select_features(ctx, "train", batch_size, max_train, feature, pooling)
    evals, eval_y = knn.select_features(ctx, "eval", batch_size, max_eval, feature, pooling)
    result, chosen_l2 = {}, {}
    for name in sorted(train):
      runs = few_shot_runs(train[name], train_y, evals[name], eval_y, ctx.num_classes, shots,
                           seeds, l2_regs, val_per_class, split_seed)
      chosen_l2[name] = {}
      for n_shots, (accs, chosen) in runs.items():
        result[f"{name}/top1_{n_shots}shot"] = float(np.mean(accs))
        result[f"{name}/top1_{n_shots}shot_std"] = float(np.std(accs))
        chosen_l2[name][f"{n_shots}shot"] = chosen
        logging.info("%s %s: %d-shot top1 %.2f +- %.2f", self.name, name, n_shots,
                     np.mean(accs), np.std(accs))
    result["protocol"] = {
        "type": "few_shot",
        "classifier": "closed-form ridge regression, unpenalised bias, features centred with "
                      "the shot-set mean",
        "targets": "one-hot in {-1, +1}",
        "shots": list(shots),
        "seeds": seeds,
        "shot_sampling": "per seed s: numpy default_rng(s) draws `shots` per class without "
                         "replacement from the train subset minus the minival",
        "l2_regs": list(l2_regs),
        "l2_scale": "l2 = r * mean squared norm of the centred shot features",
        "l2_selection": f"best accuracy on a class-balanced minival of {val_per_class} train "
                        f"images per class (split seed {split_seed}); ties -> larger l2",
        "chosen_l2": chosen_l2,
        "std": "population std over seeds (ddof 0)",
        "feature": feature,
        "pooling": pooling,
        "num_train_subset": int(len(train_y)),
        "max_train": common.cap(max_train),
        "num_eval": int(len(eval_y)),
        "eval_split": "eval",
        "features": "frozen, no augmentation",
    }
    return result
