"""Per-layer probe: the accuracy of every block's output, from one feature pass.

``ctx.encode_layers(images, pooling)`` gives each image's pooled output of every
block (entry i < depth: block i's output, before the final norm) and the
final-norm output (entry depth). Each of these depth + 1 feature sets is scored
with weighted kNN (default: the kNN evaluator's protocol, cheap) or a linear
probe (the linear-probe evaluator's recipe, one fit per layer). The result has
``name/top1_block{i}`` for i = 0 .. depth per encoder ``name`` (``block{depth}``
is the final-norm output) and a PNG of accuracy against depth, one line per
encoder, at ``<workdir>/layer_probe_step{step}.png``.
"""
from __future__ import annotations

import logging
import os

import numpy as np

from mim_jax.evaluators import common, knn, linear_probe


def layer_accuracies(train: np.ndarray, train_y: np.ndarray, evals: np.ndarray,
                     eval_y: np.ndarray, num_classes: int, classifier: str, *, k: int = 20,
                     temperature: float = 0.07, probe: linear_probe.ProbeConfig = None,
                     bank_chunk: int = 16384) -> list[float]:
  """Top-1 (percent) of each layer: ``train`` / ``evals`` are lists of [N, D_i] per layer (or
  stacked [N, layers, D])."""
  accs = []
  train, evals = knn.as_layer_list(train), knn.as_layer_list(evals)
  for layer in range(len(train)):
    if classifier == "knn":
      scores = knn.knn_scores(train[layer], train_y, evals[layer], num_classes, k=k,
                              temperature=temperature, bank_chunk=bank_chunk)
    else:
      params, norm, _ = linear_probe.fit(train[layer], train_y, num_classes, probe)
      scores = linear_probe.predict_scores(params, norm, evals[layer])
    accs.append(common.topk_accuracy(scores, eval_y, ks=(1,))[1])
  return accs


def plot(path: str, curves: dict[str, list[float]], title: str) -> str:
  """Writes accuracy against layer index (one line per name) as a PNG; returns ``path``."""
  from matplotlib.backends.backend_agg import FigureCanvasAgg
  from matplotlib.figure import Figure

  fig = Figure(figsize=(5, 3.5), dpi=100)
  FigureCanvasAgg(fig)
  ax = fig.add_subplot(1, 1, 1)
  depth = 0
  for name, accs in sorted(curves.items()):
    ax.plot(range(len(accs)), accs, marker="o", label=name)
    depth = max(depth, len(accs) - 1)
  ax.set_xticks(range(depth + 1))
  ax.set_xticklabels([str(i) for i in range(depth)] + ["norm"])
  ax.set_xlabel("block output (last: after the final norm)")
  ax.set_ylabel("top-1 (%)")
  ax.set_title(title)
  ax.grid(alpha=0.3)
  ax.legend()
  fig.tight_layout()
  os.makedirs(os.path.dirname(path) or ".", exist_ok=True)
  fig.savefig(path, format="png")
  return path


@common.register("layer_probe")
class LayerProbeEvaluator(common.Evaluator):
  """Top-1 of every block's pooled output; see the module docstring.

  Options: ``classifier`` ('knn' | 'linear'), ``pooling`` ('cls' | 'mean', default
  'cls'), ``batch_size`` (256, extraction), ``max_train`` / ``max_eval`` (caps,
  None/0 = all); for kNN ``k`` (20) and ``temperature`` (0.07); for the linear
  probe the linear-probe evaluator's options (``optimizer``, ``base_lr``,
  ``epochs``, ``warmup_epochs``, ``probe_batch_size``, ``weight_decay``,
  ``momentum``, ``seed``).
  """

  def probe_config(self) -> linear_probe.ProbeConfig:
    d = linear_probe.ProbeConfig()
    return linear_probe.ProbeConfig(
        optimizer=str(self.option("optimizer", d.optimizer)),
        base_lr=float(self.option("base_lr", d.base_lr)),
        epochs=int(self.option("epochs", d.epochs)),
        warmup_epochs=int(self.option("warmup_epochs", d.warmup_epochs)),
        batch_size=int(self.option("probe_batch_size", d.batch_size)),
        weight_decay=float(self.option("weight_decay", d.weight_decay)),
        momentum=float(self.option("momentum", d.momentum)),
        seed=int(self.option("seed", d.seed)))

  def run(self, ctx: common.EvalContext) -> dict:
    classifier = str(self.option("classifier", "knn"))
    if classifier not in ("knn", "linear"):
      raise ValueError(f"layer_probe: classifier {classifier!r}; use 'knn' or 'linear'")
    pooling = knn.check_pooling(self.option("pooling", "cls"), "layer_probe")
    batch_size = int(self.option("batch_size", 256))
    k, temperature = int(self.option("k", 20)), float(self.option("temperature", 0.07))
    probe = self.probe_config()
    if classifier == "linear" and probe.optimizer.lower() not in linear_probe.OPTIMIZER_RULES:
      raise ValueError(f"layer_probe: optimizer {probe.optimizer!r}; use lars, sgd or adamw")
    train, train_y = knn.extract_layers(ctx, "train", batch_size, self.option("max_train"), pooling)
    evals, eval_y = knn.extract_layers(ctx, "eval", batch_size, self.option("max_eval"), pooling)
    result, curves = {}, {}
    for name in sorted(train):
      accs = layer_accuracies(train[name], train_y, evals[name], eval_y, ctx.num_classes,
                              classifier, k=k, temperature=temperature, probe=probe,
                              bank_chunk=int(self.option("bank_chunk", 16384)))
      curves[name] = accs
      for i, acc in enumerate(accs):
        result[f"{name}/top1_block{i}"] = acc
      result[f"{name}/best_block"] = int(np.argmax(accs))
      logging.info("%s %s: per-block top1 %s", self.name, name, ", ".join(f"{a:.1f}" for a in accs))
    depth = len(next(iter(curves.values()))) - 1
    path = os.path.join(ctx.workdir, f"layer_probe_step{ctx.step}.png")
    result["path"] = plot(path, curves, f"{classifier} top-1 per block, step {ctx.step}")
    protocol = {
        "type": "layer_probe",
        "classifier": classifier,
        "pooling": pooling,
        "depth": depth,
        "layers": f"block0 .. block{depth}: the backbone's outputs(layers=True) entries (ViT: "
                  f"block outputs before the final norm, then the final-norm output; ResNet: "
                  f"stages; AlexNet / NIN: conv layers / blocks pooled to about "
                  f"model.probe_dims values, then the global average pool)",
        "num_train": int(len(train_y)),
        "num_eval": int(len(eval_y)),
        "features": "frozen, no augmentation",
    }
    if classifier == "knn":
      protocol.update(k=k, temperature=temperature, weighting="exp(cos_sim / T), summed per class",
                      normalisation="L2")
    else:
      protocol.update(optimizer=probe.optimizer, base_lr=probe.base_lr, epochs=probe.epochs,
                      warmup_epochs=probe.warmup_epochs, batch_size=probe.batch_size,
                      weight_decay=probe.weight_decay, momentum=probe.momentum, seed=probe.seed,
                      feature_normalisation="parameter-free BatchNorm (train mean/std)")
    result["protocol"] = protocol
    return result
