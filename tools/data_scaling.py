r"""Data scaling of masked image modelling: pretrain on nested training subsets, draw the curves.

After Xie et al., "On Data Scaling in Masked Image Modeling" (CVPR 2023): the same model
pretrained for the same number of steps on 10%, 20%, 50% and 100% of the training images. On
little data the pretext loss keeps falling on the images the model saw while it stalls or
rises on held-out images (over-fitting), and downstream accuracy follows the held-out loss.

  python tools/data_scaling.py --method mae --data ../shared/data/cifar10/train \
      --fractions 0.1,0.2,0.5,1.0 --steps 1050 --eval_every 150 \
      --workdir_root runs/data_scaling_mae [--parallel K] [--linear] [--plot_only] \
      [--extra --config.key=value ...]

(Estimated from measured step and evaluation costs: about 45 minutes a run, 3 hours for
the four, on an otherwise idle 2-core CPU.)

Each fraction f is one ``python -m mim_jax.main`` run of ``configs/<method>.py:<preset>`` with
``--config.input.data.train_subset`` (f as its image count, the same nested subset; 0 for the
whole split), ``--config.total_steps=N --config.eval_every=M``, checkpoints at every
evaluation, the held-out-loss evaluator on and the linear probe off unless ``--linear``; its
log is ``<run>/train.log``. The warm-up (in epochs in the configs) is converted to each
subset's epochs so that every run has the learning-rate schedule, in steps, of the whole
split (`schedule_flags`). Subsets are nested (one seeded permutation of the training split,
after the hold-out is removed), and evaluators other than the held-out loss read the whole
training split, so kNN banks and probes are the same for every fraction.
Re-running the command skips finished runs and resumes unfinished ones from their last
checkpoint. Then it writes into ``--workdir_root``:

  data_scaling.json   per run: subset, images, epochs, the loss log, every evaluation
  data_scaling.png    training loss, held-out loss and accuracy vs step (one line per fraction),
                      final held-out loss vs accuracy
  data_scaling_reconstructions.png   training and held-out images reconstructed by the model
                      of the smallest fraction and of the largest, same masks
  data_scaling.md     the final numbers as a table (mim_jax.report)
"""
from __future__ import annotations

import argparse
import concurrent.futures
import json
import math
import os
import subprocess
import sys
from typing import Optional, Sequence

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if ROOT not in sys.path:
  sys.path.insert(0, ROOT)

HELDOUT_KEYS = {"heldout_loss": "heldout_loss/heldout_loss",
                "train_loss": "heldout_loss/train_loss", "gap": "heldout_loss/gap"}
DEFAULT_ACCURACY = "knn/online/top1"
LINEAR_ACCURACY = "linear/online/top1"
ACCURACY_LABELS = {DEFAULT_ACCURACY: "kNN top-1", LINEAR_ACCURACY: "linear probe top-1"}
JSON_NAME, PNG_NAME = "data_scaling.json", "data_scaling.png"
RECON_NAME, TABLE_NAME = "data_scaling_reconstructions.png", "data_scaling.md"


class SweepError(RuntimeError):
  """The sweep cannot go on; the message says what to change."""


# ---------------------------------------------------------------------------------------------
# Runs.


def parse_fractions(text: str) -> list[float]:
  """'0.1,0.2,0.5,1.0' -> [0.1, 0.2, 0.5, 1.0] (counts above 1 are numbers of images)."""
  try:
    values = [float(t) for t in text.split(",") if t.strip()]
  except ValueError:
    raise SweepError(f"--fractions={text!r} is not a comma-separated list of numbers, e.g. "
                     "0.1,0.2,0.5,1.0") from None
  if not values or any(not math.isfinite(v) or v <= 0 for v in values):
    raise SweepError(f"--fractions={text!r}: give positive fractions in (0, 1] or image counts")
  return sorted(set(values))


def subset_text(fraction: float) -> str:
  """'0.1', '1', '5000': a train_subset value as flags and folder names show it."""
  return str(int(fraction)) if fraction == int(fraction) else repr(float(fraction))


def run_name(method: str, fraction: float) -> str:
  """The run folder of one fraction: 'mae_subset0.1', 'mae_subset1', 'mae_subset5000'."""
  return f"{method}_subset{subset_text(fraction)}"


def _config_spec(method: str, preset: str) -> str:
  path = os.path.join(ROOT, "configs", f"{method}.py")
  return f"{path}:{preset}" if preset else path


def load_config(method: str, preset: str):
  """``configs/<method>.py``'s ``get_config(preset)``."""
  from mim_jax import config_lib  # pylint: disable=g-import-not-at-top
  try:
    return config_lib.load(method, preset, os.path.join(ROOT, "configs"))
  except FileNotFoundError as e:
    raise SweepError(f"--method={method}: {e}") from None


def check_config(config, method: str, preset: str, linear: bool) -> None:
  """The keys the sweep sets must exist in the config (the command line cannot add keys)."""
  where = f"configs/{method}.py{':' + preset if preset else ''}"
  if "train_subset" not in config.input.data:
    raise SweepError(f"{where} has no input.data.train_subset: add train_subset=0.0 and "
                     "subset_seed=0 to input.data in mim_jax/config_lib.py: base_config()")
  if "heldout_loss" not in config.evals:
    raise SweepError(f"{where} has no evals.heldout_loss: add heldout_loss=dict(type="
                     "'heldout_loss', enabled=False, num_images=1000, seeds=(0,), max_train=1000) "
                     "to mim_jax/config_lib.py: default_evals()")
  if linear and "linear" not in config.evals:
    raise SweepError(f"{where} has no evals.linear: drop --linear")


def apply_overrides(config, extra: Sequence[str]) -> None:
  """Sets the ``--config.key=value`` flags of ``extra`` on ``config`` (values read as Python
  literals, else strings), as mim_jax.main will; a key the config lacks is an error."""
  from mim_jax import config_lib  # pylint: disable=g-import-not-at-top
  for flag in extra:
    if not flag.startswith("--config.") or "=" not in flag:
      raise SweepError(f"--extra {flag!r}: only --config.key=value flags may follow --extra")
    key, text = flag[len("--config."):].split("=", 1)
    try:
      config_lib.set_path(config, key, config_lib.parse_value(text))
    except KeyError:
      raise SweepError(f"--extra {flag!r}: the config has no key {key!r}") from None
    except TypeError as e:
      raise SweepError(f"--extra {flag!r}: {e}".splitlines()[0]) from None


def subset_plan(config, fraction: float) -> tuple[int, int]:
  """``(images of the subset, images of the whole training split)`` for the run on
  ``fraction`` (a fraction in (0, 1] or a count) of ``config``'s data."""
  from mim_jax.data import sources  # pylint: disable=g-import-not-at-top
  batch = int(config.input.batch_size)
  try:
    full = sources.split_size(config.input.data, "train")
    images = sources.subset_size(full, fraction)
  except sources.DataError as e:
    raise SweepError(str(e)) from None
  if images < batch:
    raise SweepError(f"train_subset={subset_text(fraction)} keeps {images} images, fewer than "
                     f"one batch of {batch}: raise the fraction or lower "
                     "--config.input.batch_size in --extra")
  return images, full


def subset_value(config, fraction: float) -> int:
  """The train_subset a run on ``fraction`` is given: its image count (the same nested subset
  as the fraction; an int or a float config field takes it), or 0 (the default: all) when that
  is the whole training split."""
  images, full = subset_plan(config, fraction)
  return 0 if images == full else images


def schedule_flags(config, fraction: float) -> list[str]:
  """Flags that give the run on ``fraction`` the learning-rate schedule, in steps, of a run on
  the whole training split.

  The warm-up (and multistep milestones) are set in epochs, and an epoch of a 10% subset is a
  tenth of the steps; left alone, small subsets would warm up in a tenth of the steps. The
  config's values are read as epochs of the whole training split and converted to epochs of
  the subset.
  """
  images, full = subset_plan(config, fraction)
  batch = int(config.input.batch_size)
  scale = (full // batch) / (images // batch)
  flags = [f"--config.optim.warmup_epochs={float(config.optim.warmup_epochs) * scale!r}"]
  milestones = tuple(config.optim.get("milestones_epochs", ()) or ())
  if config.optim.get("schedule") == "multistep" and milestones:
    flags.append("--config.optim.milestones_epochs="
                 f"({','.join(repr(float(m) * scale) for m in milestones)},)")
  return flags


def train_command(args: argparse.Namespace, fraction: float, workdir: str,
                  config=None) -> list[str]:
  """The ``python -m mim_jax.main`` command of one fraction.

  With the run's ``config`` (the preset, the data and ``--extra`` applied) the subset is
  passed as `subset_value` and the schedule is matched in steps (`schedule_flags`).
  """
  subset = subset_text(fraction) if config is None else str(subset_value(config, fraction))
  cmd = [sys.executable, "-m", "mim_jax.main", f"--config={_config_spec(args.method, args.preset)}",
         f"--workdir={os.path.abspath(workdir)}",
         f"--config.input.data.train_subset={subset}",
         f"--config.total_steps={args.steps}", f"--config.eval_every={args.eval_every}",
         "--config.evals.heldout_loss.enabled=True",
         f"--config.evals.linear.enabled={bool(args.linear)}"]
  if args.data:
    cmd.append(f"--config.input.data.dir={os.path.abspath(args.data)}")
  if not any(e.startswith("--config.ckpt_every") for e in args.extra):
    cmd.append(f"--config.ckpt_every={args.eval_every}")   # resume at the last evaluation
  cmd += list(args.extra)
  if config is not None:
    cmd += schedule_flags(config, fraction)   # after --extra: they already went into config
  return cmd


def read_records(workdir: str) -> list[dict]:
  """``metrics.jsonl`` as records, without those a resumed run wrote again.

  A run that resumes from step c writes a header record ``{'step': c, 'steps_per_epoch': ...}``
  and then logs steps c+1... again; records of steps after c written before that header are
  dropped, so each step keeps the values of the run that carried on.
  """
  path = os.path.join(workdir, "metrics.jsonl")
  records: list[dict] = []
  if not os.path.exists(path):
    return records
  with open(path) as f:
    for line in f:
      try:
        record = json.loads(line)
      except ValueError:
        continue   # a line cut short by a kill
      if not isinstance(record, dict) or "step" not in record:
        continue
      if "steps_per_epoch" in record:
        records = [r for r in records if r["step"] <= record["step"]]
      records.append(record)
  return records


def is_finished(workdir: str, steps: int) -> bool:
  """Whether the run trained ``steps`` steps and wrote its final evaluation."""
  return any("summary" in r and int(r["step"]) == int(steps) for r in read_records(workdir))


def check_workdir(workdir: str, subsets: Sequence[float], steps: int) -> None:
  """A workdir holding a run of other settings is an error, not something to resume.
  ``subsets``: the train_subset values that mean the wanted subset (fraction, count)."""
  path = os.path.join(workdir, "config.json")
  if not os.path.exists(path):
    return
  with open(path) as f:
    config = json.load(f)
  subset = float(config.get("input", {}).get("data", {}).get("train_subset", 0) or 0)
  have_steps = int(config.get("total_steps", 0))
  if subset not in [float(s) for s in subsets] or have_steps != int(steps):
    raise SweepError(f"{workdir} holds a run with train_subset={subset_text(subset)}, "
                     f"total_steps={have_steps} (wanted {subset_text(subsets[0])}, {steps}): "
                     "use another --workdir_root")


def launch(commands: dict[str, list[str]], parallel: int = 1) -> dict[str, int]:
  """Runs ``{workdir: command}`` (``parallel`` at a time, from the repository root), each
  logging to ``<workdir>/train.log``; returns ``{workdir: exit code}``."""

  def one(item):
    workdir, cmd = item
    os.makedirs(workdir, exist_ok=True)
    with open(os.path.join(workdir, "train.log"), "a") as log:
      log.write("$ " + " ".join(cmd) + "\n")
      log.flush()
      print(f"training {os.path.basename(workdir)} (log: {workdir}/train.log)", flush=True)
      return workdir, subprocess.run(cmd, cwd=ROOT, stdout=log, stderr=subprocess.STDOUT,
                                     check=False).returncode

  with concurrent.futures.ThreadPoolExecutor(max(1, int(parallel))) as pool:
    return dict(pool.map(one, commands.items()))


# ---------------------------------------------------------------------------------------------
# Aggregation.


def _train_images(config: dict) -> tuple[Optional[int], Optional[int]]:
  """Images in the run's pretraining split (its subset) and in the whole training split, or
  Nones when the data is not on this machine."""
  try:
    from mim_jax.data import sources  # pylint: disable=g-import-not-at-top
    data = config["input"]["data"]
    return sources.split_size(data, "pretrain"), sources.split_size(data, "train")
  except Exception:  # pylint: disable=broad-except
    return None, None


def run_summary(workdir: str, accuracy: str = DEFAULT_ACCURACY) -> dict:
  """One run's subset, size, loss log and evaluations (``eval_every`` rounds and the final)."""
  config_path = os.path.join(workdir, "config.json")
  if not os.path.exists(config_path):
    raise SweepError(f"{config_path} not found: train the run first (or drop --plot_only)")
  with open(config_path) as f:
    config = json.load(f)
  records = read_records(workdir)
  spe = next((r["steps_per_epoch"] for r in reversed(records) if "steps_per_epoch" in r), None)
  log = sorted({int(r["step"]): r["loss"] for r in records if "loss" in r}.items())
  evals = {}
  for r in records:
    flat = r.get("eval", r.get("summary"))
    if isinstance(flat, dict):
      evals[int(r["step"])] = flat
  steps = sorted(evals)
  series = {"step": steps}
  keys = {**HELDOUT_KEYS, "accuracy": accuracy, "linear_accuracy": LINEAR_ACCURACY}
  for name, key in keys.items():
    series[name] = [evals[s].get(key) for s in steps]
  final_step = max((int(r["step"]) for r in records if "summary" in r), default=None)
  final = {name: values[-1] for name, values in series.items() if values} if steps else {}
  subset = float(config.get("input", {}).get("data", {}).get("train_subset", 0) or 0)
  last = log[-1][0] if log else (steps[-1] if steps else 0)
  images, full = _train_images(config)
  return {
      "name": os.path.basename(os.path.normpath(workdir)),
      "workdir": os.path.abspath(workdir),
      "method": config.get("method"),
      "train_subset": subset,
      "train_images": images,
      "train_fraction": images / full if images and full else None,
      "steps_per_epoch": spe,
      "epochs": (last / spe) if spe else None,
      "finished": final_step is not None and final_step == int(config.get("total_steps", -1)),
      "train_log": {"step": [s for s, _ in log], "loss": [v for _, v in log]},
      "evals": series,
      "final": final,
  }


def collect(workdirs: Sequence[str], accuracy: str = DEFAULT_ACCURACY) -> dict:
  """`run_summary` of each run, smallest subset first (0 = all counts as the largest)."""
  runs = [run_summary(w, accuracy) for w in workdirs]
  runs.sort(key=lambda r: (r["train_images"] if r["train_images"] is not None else math.inf,
                           r["train_subset"] or math.inf))
  return {"paper": "Xie et al., On Data Scaling in Masked Image Modeling, CVPR 2023",
          "accuracy_metric": accuracy, "runs": runs}


def _label(run: dict) -> str:
  """'10% (4500 img, 23.3 ep)': the share of the training split, its images and epochs."""
  subset = run["train_subset"]
  if run.get("train_fraction"):
    text = f"{run['train_fraction'] * 100:.3g}%"
  else:
    text = "100%" if not subset else (f"{subset * 100:g}%" if subset <= 1 else f"{int(subset)}")
  extra = []
  if run["train_images"] is not None:
    extra.append(f"{run['train_images']} img")
  if run["epochs"] is not None:
    extra.append(f"{run['epochs']:.3g} ep")
  return f"{text} ({', '.join(extra)})" if extra else text


def _xy(steps, values):
  pairs = [(s, v) for s, v in zip(steps, values) if v is not None]
  return [s for s, _ in pairs], [v for _, v in pairs]


def plot_curves(summary: dict, path: str) -> str:
  """The four panels of ``data_scaling.png``; returns ``path``."""
  import matplotlib  # pylint: disable=g-import-not-at-top
  matplotlib.use("Agg")
  from matplotlib import pyplot as plt  # pylint: disable=g-import-not-at-top
  runs = summary["runs"]
  if not runs:
    raise SweepError("no runs to plot: train them first (drop --plot_only)")
  colours = plt.get_cmap("viridis")([0.1 + 0.8 * i / max(len(runs) - 1, 1)
                                     for i in range(len(runs))])
  fig, axes = plt.subplots(2, 2, figsize=(12, 9))
  (ax_train, ax_held), (ax_acc, ax_final) = axes
  acc_name = summary.get("accuracy_metric", DEFAULT_ACCURACY)
  acc_name = ACCURACY_LABELS.get(acc_name, acc_name)
  for run, colour in zip(runs, colours):
    ev, label = run["evals"], _label(run)
    ax_train.plot(run["train_log"]["step"], run["train_log"]["loss"], color=colour, alpha=0.3,
                  linewidth=0.8)
    ax_train.plot(*_xy(ev["step"], ev["train_loss"]), "o-", color=colour, label=label)
    ax_held.plot(*_xy(ev["step"], ev["heldout_loss"]), "o-", color=colour, label=label)
    ax_acc.plot(*_xy(ev["step"], ev["accuracy"]), "o-", color=colour, label=label)
    if any(v is not None for v in ev["linear_accuracy"]):
      ax_acc.plot(*_xy(ev["step"], ev["linear_accuracy"]), "s--", color=colour)
    final = run["final"]
    if run["finished"] and final.get("heldout_loss") is not None and \
        final.get("accuracy") is not None:
      ax_final.scatter([final["heldout_loss"]], [final["accuracy"]], color=colour, s=60,
                       label=label, zorder=3)
      ax_final.annotate(label.split(" ")[0], (final["heldout_loss"], final["accuracy"]),
                        textcoords="offset points", xytext=(6, 4))
  ax_train.set(title="loss on training images (dots: no augmentation; faint: logged batches)",
               xlabel="step", ylabel="loss")
  ax_held.set(title="loss on held-out images", xlabel="step", ylabel="loss")
  ax_acc.set(title=f"{acc_name} (%)" + (" ; squares: linear probe" if any(
      any(v is not None for v in r["evals"]["linear_accuracy"]) for r in runs) else ""),
             xlabel="step", ylabel="top-1 (%)")
  ax_final.set(title="finished runs: final held-out loss vs accuracy", xlabel="held-out loss",
               ylabel=f"{acc_name} (%)")
  for ax in axes.flat:
    ax.grid(alpha=0.3)
    if ax.get_legend_handles_labels()[0]:
      ax.legend(fontsize=8, title="pretraining subset", title_fontsize=8)
  method = runs[0].get("method") or ""
  fig.suptitle(f"{method.upper()} data scaling: same model, same steps, nested subsets")
  fig.tight_layout()
  fig.savefig(path, dpi=110)
  plt.close(fig)
  return path


def reconstructions(workdir: str, train_images, heldout_images, seed: int = 0,
                    devices=None) -> dict:
  """``reconstruct`` of the run in ``workdir`` (its latest checkpoint, on ``devices``, default
  all) on both image sets."""
  from mim_jax import train  # pylint: disable=g-import-not-at-top
  trainer = train.Trainer.from_workdir(workdir, devices=devices)
  ctx = trainer.eval_context(workdir, int(trainer.state["step"]))
  if ctx.reconstruct is None:
    raise SweepError(f"the method of {workdir} has no pixel reconstruction: skip the figure "
                     "with --no_reconstructions")
  return {"train": ctx.reconstruct(train_images, seed),
          "heldout": ctx.reconstruct(heldout_images, seed)}


def sample_images(workdir: str, count: int):
  """``count`` images the run in ``workdir`` trained on ('pretrain') and ``count`` held-out."""
  from mim_jax import train  # pylint: disable=g-import-not-at-top
  from mim_jax.data import pipeline  # pylint: disable=g-import-not-at-top
  config = train.load_run_config(workdir)

  def take(split):
    return next(iter(pipeline.eval_batches(config.input, split, count, count)))[0]
  return take("pretrain"), take("eval")


def plot_reconstructions(small: str, large: str, path: str, count: int = 4, seed: int = 0,
                         names: Sequence[str] = ("smallest subset", "largest subset"),
                         devices=None) -> str:
  """Figure: ``count`` images the smaller run trained on (so the larger did too: the subsets
  are nested) and ``count`` held-out images, each reconstructed by both models with the same
  masks. Columns: input, masked, reconstruction by each model."""
  import matplotlib  # pylint: disable=g-import-not-at-top
  matplotlib.use("Agg")
  from matplotlib import pyplot as plt  # pylint: disable=g-import-not-at-top
  import numpy as np  # pylint: disable=g-import-not-at-top
  train_images, heldout_images = sample_images(small, count)
  done: dict[str, dict] = {}
  for w in (small, large):   # one restore per distinct run
    if w not in done:
      done[w] = reconstructions(w, train_images, heldout_images, seed, devices)
  outs = [done[small], done[large]]
  columns = [("input", outs[0], "input"), ("masked", outs[0], "masked")]
  for out, name in zip(outs, names):
    same_mask = all(np.array_equal(out[s]["masked"], outs[0][s]["masked"]) for s in out)
    if not same_mask:
      columns.append((f"masked ({name})", out, "masked"))
    columns.append((f"reconstruction\n({name})", out, "reconstruction"))
  rows = [("train", i) for i in range(len(train_images))] + \
         [("heldout", i) for i in range(len(heldout_images))]
  fig, axes = plt.subplots(len(rows), len(columns),
                           figsize=(1.9 * len(columns), 1.9 * len(rows)), squeeze=False)
  for r, (split, i) in enumerate(rows):
    for c, (title, out, key) in enumerate(columns):
      ax = axes[r, c]
      ax.imshow(out[split][key][i], interpolation="nearest")
      ax.set_xticks([])
      ax.set_yticks([])
      if r == 0:
        ax.set_title(title, fontsize=9)
      if c == 0:
        ax.set_ylabel("trained on" if split == "train" else "held out", fontsize=9)
  fig.suptitle("rows: images both models trained on, then held-out images", fontsize=10)
  fig.tight_layout()
  fig.savefig(path, dpi=100)
  plt.close(fig)
  return path


def write_outputs(root: str, workdirs: Sequence[str], accuracy: str = DEFAULT_ACCURACY,
                  recon: bool = True, recon_images: int = 4, devices=None) -> dict:
  """Aggregates ``workdirs`` and writes the JSON, the figures and the table into ``root``
  (the reconstruction figure restores the models on ``devices``, default all)."""
  summary = collect(workdirs, accuracy)
  summary["figure"] = plot_curves(summary, os.path.join(root, PNG_NAME))
  finished = [r for r in summary["runs"] if r["finished"]]
  if recon and finished:
    names = (_label(finished[0]).split(" ")[0] + " model", _label(finished[-1]).split(" ")[0]
             + " model")
    summary["reconstructions"] = plot_reconstructions(
        finished[0]["workdir"], finished[-1]["workdir"], os.path.join(root, RECON_NAME),
        recon_images, names=names, devices=devices)
  try:
    from mim_jax import report  # pylint: disable=g-import-not-at-top
    table = report.report([r["workdir"] for r in summary["runs"]])
    with open(os.path.join(root, TABLE_NAME), "w") as f:
      f.write(table)
    summary["table"] = os.path.join(root, TABLE_NAME)
  except ValueError as e:   # a run without results yet: the table waits for them
    print(f"no table: {e}", file=sys.stderr)
  with open(os.path.join(root, JSON_NAME), "w") as f:
    json.dump(summary, f, indent=1)
  return summary


# ---------------------------------------------------------------------------------------------


def parse_args(argv: Sequence[str]) -> argparse.Namespace:
  argv = list(argv)
  extra: list[str] = []
  if "--extra" in argv:
    at = argv.index("--extra")
    argv, extra = argv[:at], argv[at + 1:]
  parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                   formatter_class=argparse.RawDescriptionHelpFormatter)
  parser.add_argument("--method", default="mae", help="config in configs/: mae or simmim")
  parser.add_argument("--preset", default="cifar10", help="config preset ('' = embedded data)")
  parser.add_argument("--data", default="", help="image folder (input.data.dir)")
  parser.add_argument("--fractions", default="0.1,0.2,0.5,1.0",
                      help="train_subset values: fractions in (0, 1] or image counts")
  parser.add_argument("--steps", type=int, required=True, help="optimiser steps of every run")
  parser.add_argument("--eval_every", type=int, default=0,
                      help="steps between evaluations (default: steps / 8)")
  parser.add_argument("--workdir_root", required=True, help="folder of the runs and the outputs")
  parser.add_argument("--parallel", type=int, default=1, help="runs trained at the same time")
  parser.add_argument("--linear", action="store_true", help="also a linear probe at every eval")
  parser.add_argument("--accuracy", default=DEFAULT_ACCURACY, help="flat eval key to plot")
  parser.add_argument("--recon_images", type=int, default=4,
                      help="training and held-out images in the reconstruction figure")
  parser.add_argument("--no_reconstructions", action="store_true")
  parser.add_argument("--plot_only", action="store_true", help="only aggregate existing runs")
  args = parser.parse_args(argv)
  args.extra = extra
  if args.steps <= 0:
    parser.error("--steps must be positive")
  args.eval_every = args.eval_every or max(1, args.steps // 8)
  return args


def main(argv: Sequence[str]) -> int:
  args = parse_args(argv)
  try:
    fractions = parse_fractions(args.fractions)
    os.makedirs(args.workdir_root, exist_ok=True)
    workdirs = {f: os.path.join(args.workdir_root, run_name(args.method, f)) for f in fractions}
    if not args.plot_only:
      config = load_config(args.method, args.preset)
      check_config(config, args.method, args.preset, args.linear)
      if args.data:
        config.input.data.dir = os.path.abspath(args.data)
      apply_overrides(config, args.extra)
      todo = {}
      for f, w in workdirs.items():
        check_workdir(w, (f, subset_value(config, f)), args.steps)
        if is_finished(w, args.steps):
          print(f"{os.path.basename(w)}: finished, skipped")
        else:
          todo[w] = train_command(args, f, w, config)
      failed = [w for w, code in launch(todo, args.parallel).items() if code != 0]
      if failed:
        raise SweepError(f"{len(failed)} run(s) failed, e.g. {failed[0]}: see its train.log, "
                         "fix it and rerun the same command (finished runs are skipped)")
    present = [w for w in workdirs.values() if os.path.exists(os.path.join(w, "config.json"))]
    summary = write_outputs(args.workdir_root, present, args.accuracy,
                            not args.no_reconstructions, args.recon_images)
  except SweepError as e:
    print(f"error: {e}", file=sys.stderr)
    return 2
  for key in ("figure", "reconstructions", "table"):
    if key in summary:
      print(f"{key}: {summary[key]}")
  print(f"summary: {os.path.join(args.workdir_root, JSON_NAME)}")
  return 0


if __name__ == "__main__":
  sys.exit(main(sys.argv[1:]))
