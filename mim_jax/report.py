"""Results tables: the ``eval_results.json`` of several runs as one Markdown table.

  python -m mim_jax.report WORKDIR... [--out table.md] [--metrics knn/top1,linear/top1]
                           [--names a,b,...]

One row per (run, encoder: online / ema), one column per metric, then the runs' pretraining
identity (method, model, steps and epochs, data) and, under the table, each number's protocol
as a numbered note; identical protocols are listed once. A note that holds for a whole column
is marked in its header, otherwise in each cell. The tables under docs/ are made this way
(tools/cifar10_table.sh, docs/results/).

A note states the protocol in a line or two: what is fitted on which features, the schedule,
the data sizes. Diagnostics a run records beside its protocol (few-shot's penalty chosen per
seed, long free-text fields) stay in ``eval_results.json``; a protocol type without a
hand-written note lists its short scalar fields and points there.

Metric ids are ``<evaluator>/<metric>`` with the encoder left out: the key
``online/top1`` of the evaluator ``knn`` is ``knn/top1`` in the online row. Metrics that belong
to no encoder (the held-out loss, computed with the trained online weights) go in the online
row. Percentages (top-k accuracies) have one decimal, other numbers four.
"""
from __future__ import annotations

import argparse
import dataclasses
import json
import math
import os
import re
import sys
from typing import Any, Optional, Sequence

from mim_jax import methods

RESULTS_FILENAME = "eval_results.json"   # = mim_jax.evaluators.common.RESULTS_FILENAME
# Feature-set names of EvalContext.encode, row order: the online encoder, its EMA, and a
# method's momentum teacher (iBOT, ExtreMA, PCAE, data2vec), each a row named as such.
ENCODERS = ("online", "ema", "teacher")
METHOD_NAMES = methods.TITLES            # the registry's published names (no jax import)
EVALUATOR_LABELS = {"knn": "kNN", "linear_probe": "linear probe", "heldout_loss": ""}
METRIC_LABELS = {"top1": "top-1 (%)", "top5": "top-5 (%)", "train_top1": "train top-1 (%)",
                 "train_loss": "train loss", "heldout_loss": "held-out loss",
                 "gap": "loss gap (held-out - train)"}
# Evaluators whose columns come first, in this order; others follow alphabetically.
EVALUATOR_ORDER = ("knn", "linear", "heldout_loss")
NO_VALUE = "-"


class ReportError(ValueError):
  """A workdir or option the report cannot use; the message names the fix."""


@dataclasses.dataclass
class Run:
  """One workdir's results and identity.

  Attributes:
    name: the row label (``--names`` or the workdir's base name).
    workdir: the folder.
    results: ``eval_results.json``: evaluator -> {metric: value, 'protocol': {...}, 'step'}.
    config: ``config.json`` (empty when absent).
    steps_per_epoch: from ``metrics.jsonl`` (None when absent).
  """
  name: str
  workdir: str
  results: dict
  config: dict
  steps_per_epoch: Optional[float] = None


def _read_json(path: str) -> Any:
  with open(path) as f:
    return json.load(f)


def _steps_per_epoch(workdir: str) -> Optional[float]:
  """The last ``steps_per_epoch`` the trainer wrote in ``metrics.jsonl`` (None if none)."""
  path = os.path.join(workdir, "metrics.jsonl")
  found = None
  if os.path.exists(path):
    with open(path) as f:
      for line in f:
        try:
          record = json.loads(line)
        except ValueError:
          continue
        if isinstance(record, dict) and record.get("steps_per_epoch"):
          found = float(record["steps_per_epoch"])
  return found


def load_run(workdir: str, name: Optional[str] = None) -> Run:
  """Reads a workdir written by ``mim_jax.main``.

  Raises:
    ReportError: no ``eval_results.json`` in it.
  """
  path = os.path.join(workdir, RESULTS_FILENAME)
  if not os.path.exists(path):
    raise ReportError(f"{path} not found: evaluate the run first (python -m mim_jax.main "
                      f"--mode=eval --workdir={workdir} --config=...)")
  cfg_path = os.path.join(workdir, "config.json")
  config = _read_json(cfg_path) if os.path.exists(cfg_path) else {}
  label = name or os.path.basename(os.path.normpath(workdir))
  return Run(label, workdir, _read_json(path), config, _steps_per_epoch(workdir))


# ---------------------------------------------------------------------------------------------
# Metrics.


def _is_number(value: Any) -> bool:
  return isinstance(value, (int, float)) and not isinstance(value, bool)


def run_metrics(results: dict) -> dict[tuple[Optional[str], str], float]:
  """``{(encoder or None, metric id): value}`` for every number of ``results``."""
  out = {}
  for evaluator, entry in results.items():
    if not isinstance(entry, dict):
      continue
    for key, value in entry.items():
      if key in ("step", "protocol") or not _is_number(value):
        continue
      head, _, rest = key.partition("/")
      if rest and head in ENCODERS:
        out[(head, f"{evaluator}/{rest}")] = float(value)
      else:
        out[(None, f"{evaluator}/{key}")] = float(value)
  return out


def _metric_order(metric_id: str) -> tuple:
  evaluator, _, metric = metric_id.partition("/")
  rank = EVALUATOR_ORDER.index(evaluator) if evaluator in EVALUATOR_ORDER else len(EVALUATOR_ORDER)
  return (rank, evaluator, metric)


def default_metrics(runs: Sequence[Run]) -> list[str]:
  """The headline metrics present in ``runs``: every top-1 accuracy on held-out data (not the
  probes' training accuracy) and the held-out loss, in a fixed order."""
  found = set()
  for run in runs:
    for _, metric_id in run_metrics(run.results):
      metric = metric_id.partition("/")[2]
      if metric.startswith("top1") or metric == "heldout_loss":
        found.add(metric_id)
  return sorted(found, key=_metric_order)


def all_metrics(runs: Sequence[Run]) -> list[str]:
  return sorted({m for run in runs for _, m in run_metrics(run.results)}, key=_metric_order)


def is_percent(metric_id: str) -> bool:
  """Top-k accuracies are percentages (the evaluators return percent)."""
  metric = metric_id.rpartition("/")[2]
  return "top1" in metric or "top5" in metric or "acc" in metric


def format_value(metric_id: str, value: Optional[float]) -> str:
  if value is None or (isinstance(value, float) and math.isnan(value)):
    return NO_VALUE
  return f"{value:.1f}" if is_percent(metric_id) else f"{value:.4f}"


def _evaluator_type(runs: Sequence[Run], evaluator: str) -> str:
  for run in runs:
    protocol = run.results.get(evaluator, {}).get("protocol") or {}
    if protocol.get("type"):
      return str(protocol["type"])
  return evaluator


def column_label(runs: Sequence[Run], metric_id: str) -> str:
  """Human header, e.g. 'kNN top-1 (%)' for knn/top1, 'held-out loss' for heldout_loss/...."""
  evaluator, _, metric = metric_id.partition("/")
  kind = _evaluator_type(runs, evaluator)
  head = EVALUATOR_LABELS.get(kind, evaluator)
  if metric in METRIC_LABELS:
    tail = METRIC_LABELS[metric]
  elif metric.startswith(("top1_k", "top5_k")):   # kNN with several k: top1_k10
    kind_k = metric.split("_k", 1)
    tail = f"top-{kind_k[0][3:]} k={kind_k[1]} (%)"
  else:
    tail = metric.replace("/", " ") + (" (%)" if is_percent(metric_id) else "")
  return f"{head} {tail}".strip()


# ---------------------------------------------------------------------------------------------
# Protocols and identity.


def _fmt(value: Any) -> str:
  if isinstance(value, float):
    return f"{value:g}"
  if isinstance(value, (list, tuple)):
    return "/".join(_fmt(v) for v in value)
  return str(value)


def _feature_note(p: dict) -> str:
  """', feature=...' for features other than the encoder's final ones ('block:N', ...)."""
  return f", feature={_fmt(p['feature'])}" if p.get("feature") not in (None, "", "final") else ""


def _knn_note(p: dict) -> str:
  return (f"kNN: k={_fmt(p['k'])}, T={_fmt(p['temperature'])}, cosine, "
          f"bank={p['bank_size']} {p.get('bank_split', 'train')} images, "
          f"pooling={p.get('pooling')}{_feature_note(p)}, split={p.get('query_split', 'eval')} "
          f"({p['num_queries']} held-out)")


def _linear_note(p: dict) -> str:
  return (f"linear probe: {p['optimizer']}, lr {_fmt(p['lr'])} (base {_fmt(p['base_lr'])}), "
          f"{p['epochs']} epochs ({p.get('warmup_epochs', 0)} warm-up), batch {p['batch_size']}, "
          f"wd {_fmt(p.get('weight_decay', 0.0))}, BatchNorm on frozen features, "
          f"pooling={p.get('pooling')}{_feature_note(p)}, fit on {p['num_train']} train images, "
          f"split=eval ({p['num_eval']} held-out)")


def _heldout_note(p: dict) -> str:
  return (f"held-out loss: the method's loss per image, no augmentation, mask seeds "
          f"{_fmt(list(p['seeds']))}; {p['num_heldout']} held-out images vs {p['num_train']} "
          "of the images pretraining used")


def _few_shot_note(p: dict) -> str:
  # The per-seed penalties (p['chosen_l2']) are diagnostics: eval_results.json only.
  minival = re.search(r"minival of (\d+) train images per class", str(p.get("l2_selection", "")))
  where = f" ({minival.group(1)} per class)" if minival else ""
  return (f"few-shot: ridge regression on frozen features (pooling={p.get('pooling')}), "
          f"{_fmt(list(p['shots']))} shots x {p['seeds']} seeds from {p['num_train_subset']} "
          f"train images, penalty chosen per seed on a held-out train minival{where}; mean and "
          f"std over seeds, split=eval ({p['num_eval']} held-out)")


def _classifier_note(p: dict) -> str:
  return (f"classifier: arg-max of the fine-tuned {p.get('head', 'linear')} head "
          f"(pooling={p.get('pooling')}) at step {p['step']}, eval preprocessing, no augmentation, "
          f"split={p.get('split', 'eval')} ({p['num_images']} held-out)")


def _layer_probe_note(p: dict) -> str:
  if p["classifier"] == "knn":
    how = f"kNN (k={_fmt(p['k'])}, T={_fmt(p['temperature'])})"
  else:
    how = f"linear probe ({p['optimizer']}, base lr {_fmt(p['base_lr'])}, {p['epochs']} epochs)"
  return (f"per-layer probe: {how} on block0 .. block{p['depth']} (ViT: blocks, final norm; "
          f"ConvNets: layers pooled to ~9,216 values, global pool), "
          f"pooling={p.get('pooling')}, fit on {p['num_train']} train images, "
          f"split=eval ({p['num_eval']} held-out)")


def _attentive_note(p: dict) -> str:
  return (f"attentive probe: one learned query cross-attending over {p['num_tokens']} frozen "
          f"{p['tokens']} tokens, adamw, lr {_fmt(p['lr'])} (base {_fmt(p['base_lr'])}), "
          f"{p['epochs']} epochs ({p.get('warmup_epochs', 0)} warm-up), batch {p['batch_size']}, "
          f"fit on {p['num_train']} train images, split=eval ({p['num_eval']} held-out)")


_NOTES = {"knn": _knn_note, "linear_probe": _linear_note, "heldout_loss": _heldout_note,
          "few_shot": _few_shot_note, "classifier": _classifier_note,
          "layer_probe": _layer_probe_note, "attentive_probe": _attentive_note}
# A protocol without a hand-written note lists its fields whose value prints in this many
# characters or fewer (numbers, short names); longer ones and nested dicts stay in the file.
MAX_FIELD_CHARS = 40


def describe_protocol(evaluator: str, protocol: Optional[dict]) -> str:
  """A line or two for a protocol dict: a hand-written summary for known evaluator types, else
  the short scalar fields and a pointer to ``eval_results.json`` for the rest."""
  if not protocol:
    return f"{evaluator}: protocol not recorded"
  kind = str(protocol.get("type", evaluator))
  if kind in _NOTES:
    try:
      return _NOTES[kind](protocol)
    except (KeyError, TypeError):
      pass   # an older or newer protocol layout: list the fields instead
  fields, left_out = [], 0
  for key, value in sorted(protocol.items()):
    if key == "type":
      continue
    text = _fmt(value)
    if isinstance(value, dict) or len(text) > MAX_FIELD_CHARS:
      left_out += 1
    else:
      fields.append(f"{key}={text}")
  note = f"{EVALUATOR_LABELS.get(kind) or kind}: {', '.join(fields)}"
  if left_out:
    note += f" (+ {left_out} more field{'s' if left_out > 1 else ''} in {RESULTS_FILENAME})"
  return note


def _get(d: dict, dotted: str, default: Any = None) -> Any:
  for part in dotted.split("."):
    if not isinstance(d, dict) or part not in d:
      return default
    d = d[part]
  return d


def _variant_depth(variant: str) -> Optional[int]:
  try:
    from mim_jax.models import vit  # pylint: disable=g-import-not-at-top
    return int(vit.variant(variant)[1])
  except Exception:  # pylint: disable=broad-except
    return None


def _convnet_label(config: dict) -> str:
  """'ResNet-18, width 0.25', 'AlexNet (BN, torch widths), width 0.5', 'NIN, 4 blocks, width
  0.25', 'GPT, 4 layers, width 128' or '' from config.model (without importing the model)."""
  name = _get(config, "model.name", "vit") or "vit"
  width = _get(config, "model.width")
  if name == "resnet":
    head = f"ResNet-{_get(config, 'model.depth', 50)}"
  elif name == "alexnet":
    head = f"AlexNet (BN, {_get(config, 'model.widths', 'torch')} widths)"
  elif name == "nin":
    head = f"NIN, {_get(config, 'model.num_stages', 4)} blocks"
  elif name == "gpt":
    return f"GPT, {_get(config, 'model.depth', '?')} layers, width {width}"
  else:
    return ""
  return f"{head}, width {_fmt(width)}" if width is not None else head


def model_label(config: dict) -> str:
  """e.g. 'ViT-tiny, 6 blocks, patch 4, 32 px' from a run's config."""
  variant = _get(config, "model.variant")
  convnet = _convnet_label(config)
  if convnet:
    size = _get(config, "input.image_size")
    return f"{convnet}, {size} px" if size else convnet
  if not variant:
    return NO_VALUE
  depth = int(_get(config, "model.depth", 0) or 0) or _variant_depth(variant)
  parts = [f"ViT-{variant}"]
  if depth:
    parts.append(f"{depth} blocks")
  if _get(config, "model.patch_size"):
    parts.append(f"patch {_get(config, 'model.patch_size')}")
  if _get(config, "input.image_size"):
    parts.append(f"{_get(config, 'input.image_size')} px")
  return ", ".join(parts)


def _subset_label(config: dict) -> str:
  subset = float(_get(config, "input.data.train_subset", 0) or 0)
  if not subset:
    return ""
  if subset <= 1:
    return f", {subset * 100:g}% of the training images"
  return f", {int(subset)} training images"


def evaluated_step(run: Run) -> Optional[int]:
  steps = [e.get("step") for e in run.results.values() if isinstance(e, dict)]
  steps = [int(s) for s in steps if _is_number(s)]
  return max(steps) if steps else None


def pretraining_label(run: Run) -> str:
  """'1050 steps (6 epochs)' from the evaluated step and the run's steps per epoch; '0 steps
  (random init)' for an evaluation of the initialisation."""
  step = evaluated_step(run)
  if step is None:
    return NO_VALUE
  if step == 0:
    return "0 steps (random init)"
  if run.steps_per_epoch:
    epochs = round(step / run.steps_per_epoch, 2)
    unit = "epoch" if epochs == 1 else "epochs"
    return f"{step} steps ({epochs:g} {unit}){_subset_label(run.config)}"
  return f"{step} steps{_subset_label(run.config)}"


def data_note(config: dict) -> str:
  """The training data and optimisation of a run, for the notes under the table ('fine-tuning:'
  for a fine-tuning run, 'pretraining:' otherwise)."""
  data = _get(config, "input.data", {}) or {}
  name = data.get("name", "?")
  where = {"embedded": "the embedded CIFAR-10 subset",
           "image_folder": f"image folder {data.get('dir', '')}",
           "tfds": f"tfds {data.get('tfds_name', '')}"}.get(name, name)
  parts = [where]
  if data.get("holdout_per_class"):
    parts.append(f"{data['holdout_per_class']} images per class held out "
                 f"(seed {data.get('holdout_seed', 0)})")
  subset = float(data.get("train_subset", 0) or 0)
  if subset:
    size = f"{subset * 100:g}%" if subset <= 1 else f"{int(subset)} images"
    parts.append(f"pretrained on a nested subset: {size} of the rest "
                 f"(seed {data.get('subset_seed', 0)})")
  optim = _get(config, "optim", {}) or {}
  batch = _get(config, "input.batch_size")
  if optim and batch and optim.get("base_lr") is not None:
    peak = float(optim["base_lr"]) * float(batch) / float(optim.get("lr_batch_divisor") or 256)
    parts.append(f"batch {batch}, {optim.get('name')} peak lr {peak:.3g}")
  kind = "fine-tuning" if config.get("method") == "finetune" else "pretraining"
  return f"{kind}: " + ", ".join(parts)


# ---------------------------------------------------------------------------------------------
# The table.


class _Notes:
  """Numbered, de-duplicated notes in order of first use."""

  def __init__(self):
    self.texts: list[str] = []

  def number(self, text: str) -> int:
    if text not in self.texts:
      self.texts.append(text)
    return self.texts.index(text) + 1


def _encoders(metrics: dict) -> list[Optional[str]]:
  names = {enc for enc, _ in metrics if enc is not None}
  order = [e for e in ENCODERS if e in names] + sorted(names - set(ENCODERS))
  return order or [None]


def _mark(text: str, numbers: Sequence[int]) -> str:
  if not numbers:
    return text
  return f"{text} " + " ".join(f"[{n}]" for n in sorted(set(numbers)))


def make_table(runs: Sequence[Run], metrics: Optional[Sequence[str]] = None) -> str:
  """The Markdown table (with its notes) of ``runs``; ``metrics`` default: `default_metrics`.

  Raises:
    ReportError: a requested metric is in none of the runs, or there is nothing to show.
  """
  if not runs:
    raise ReportError("no workdirs given: pass the run folders to report")
  available = all_metrics(runs)
  metrics = list(metrics) if metrics else default_metrics(runs)
  unknown = [m for m in metrics if m not in available]
  if unknown:
    raise ReportError(f"metric(s) {', '.join(unknown)} in none of the runs: choose from "
                      f"{', '.join(available) or '(none)'}")
  if not metrics:
    raise ReportError("the runs have no numeric results: evaluate them first (--mode=eval)")

  # Each run's numbers in the chosen columns.
  values = [{k: v for k, v in run_metrics(run.results).items() if k[1] in metrics}
            for run in runs]
  notes = _Notes()
  # Notes: the data of each run (pretraining column), each evaluator's protocol (its columns).
  data_numbers = [notes.number(data_note(run.config)) if run.config else None for run in runs]
  cell_notes: dict[tuple[int, str], int] = {}
  for col in metrics:
    evaluator = col.partition("/")[0]
    for i, run in enumerate(runs):
      if any(m == col for _, m in values[i]):
        protocol = run.results[evaluator].get("protocol")
        cell_notes[(i, col)] = notes.number(describe_protocol(evaluator, protocol))

  rows = []   # (run index, encoder, first row of the run)
  for i in range(len(runs)):
    for j, enc in enumerate(_encoders(values[i])):
      rows.append((i, enc, j == 0))

  def shared(numbers: list) -> bool:
    return len(set(numbers)) == 1 and None not in numbers

  data_in_header = shared(data_numbers)
  header = ["run", "method", "model", _mark("pretraining", [data_numbers[0]] if data_in_header
                                            and data_numbers[0] else []), "encoder"]
  col_in_header = {}
  for col in metrics:
    numbers = [cell_notes[(i, col)] for i in range(len(runs)) if (i, col) in cell_notes]
    col_in_header[col] = shared(numbers)
    header.append(_mark(column_label(runs, col), [numbers[0]] if col_in_header[col] else []))

  lines = ["| " + " | ".join(header) + " |", "|" + " --- |" * len(header)]
  for i, enc, first in rows:
    run = runs[i]
    pretraining = pretraining_label(run)
    if not data_in_header and data_numbers[i]:
      pretraining = _mark(pretraining, [data_numbers[i]])
    cells = [run.name, method_label(run.config), model_label(run.config), pretraining, enc or NO_VALUE]
    for col in metrics:
      value = values[i].get((enc, col))
      if value is None and first:
        value = values[i].get((None, col))   # a run-level number: in the run's first row
      text = format_value(col, value)
      if value is not None and not col_in_header[col] and (i, col) in cell_notes:
        text = _mark(text, [cell_notes[(i, col)]])
      cells.append(text)
    lines.append("| " + " | ".join(cells) + " |")
  lines.append("")
  lines += [f"[{n}] {text}" for n, text in enumerate(notes.texts, 1)]
  return "\n".join(lines) + "\n"


def method_label(config: dict) -> str:
  """The method column: the config's published name (`config.name`, e.g. MILAN, which shares
  the feature_mim method with MVP and EVA), else the method's name."""
  method = config.get("method")
  return config.get("name") or METHOD_NAMES.get(method, method or NO_VALUE)


def load_runs(workdirs: Sequence[str], names: Optional[Sequence[str]] = None) -> list[Run]:
  """`load_run` of each workdir, rows named ``names`` (default: the folders' base names)."""
  if names is not None and len(names) != len(workdirs):
    raise ReportError(f"{len(names)} names for {len(workdirs)} workdirs: give one name per "
                      "workdir in --names")
  return [load_run(w, names[i] if names else None) for i, w in enumerate(workdirs)]


def report(workdirs: Sequence[str], names: Optional[Sequence[str]] = None,
           metrics: Optional[Sequence[str]] = None) -> str:
  """The Markdown table of ``workdirs`` (see `make_table`); ``metrics=['all']`` for every
  number."""
  runs = load_runs(workdirs, names)
  if metrics is not None and list(metrics) == ["all"]:
    metrics = all_metrics(runs)
  return make_table(runs, metrics)


def _split_list(text: Optional[str]) -> Optional[list[str]]:
  if text is None:
    return None
  return [t.strip() for t in text.split(",")]


def main(argv: Optional[Sequence[str]] = None) -> int:
  parser = argparse.ArgumentParser(prog="python -m mim_jax.report", description=__doc__.split(
      "\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter)
  parser.add_argument("workdirs", nargs="+", help="run folders (each with eval_results.json)")
  parser.add_argument("--out", help="also write the table to this file")
  parser.add_argument("--metrics", help="comma-separated metric ids, e.g. knn/top1,linear/top1; "
                      "'all' for every number (default: held-out top-1s and the held-out loss)")
  parser.add_argument("--names", help="comma-separated row names, one per workdir")
  args = parser.parse_args(argv)
  try:
    text = report(args.workdirs, _split_list(args.names), _split_list(args.metrics))
  except (ReportError, OSError, ValueError) as e:
    print(f"error: {e}", file=sys.stderr)
    return 2
  sys.stdout.write(text)
  if args.out:
    with open(args.out, "w") as f:
      f.write(text)
  return 0


if __name__ == "__main__":
  sys.exit(main())
