"""Command line of the analyses: attention statistics and CKA of trained (or initial) encoders.

  python -m mim_jax.analysis attention --workdir W [--workdir2 W2] [--num_images 256] \
      [--split eval] [--out DIR]
  python -m mim_jax.analysis cka --workdir W [--workdir2 W2] [--num_images 512] \
      [--pooling mean|cls|tokens] [--out DIR]
  python -m mim_jax.analysis all ...      (both on the same images, each run loaded once)

Each writes a PNG and a JSON (numbers + protocol) into --out (default <workdir>/analysis/):
attention.{png,json} and/or cka_<pooling>.{png,json}. A workdir is a run written by mim_jax.main;
one trained with --config.total_epochs=0 has no checkpoint and stands for its seeded
initialisation (the random-init baseline, as mim_jax.main evaluated it). The images are a
fixed subset of --workdir's data split, shared by both models, preprocessed as for evaluation
(no augmentation, no masking); the online encoder runs jitted, in batches, over the run's mesh.
A workdir without a config or checkpoint is a one-line `error: ...` and exit code 2.
"""
from __future__ import annotations

import argparse
import dataclasses
import json
import os
import sys
from typing import Any, Callable, Optional, Sequence

import jax
import numpy as np

from mim_jax.analysis import attention, cka
from mim_jax.evaluators.common import map_padded

SUBSET_RULE = ("the data pipeline's fixed seeded subset of num_images records of the split "
               "(numpy PCG64 seed 0, kept in stored order), read from --workdir's data config and "
               "shared by every model")
PREPROCESSING = ("evaluation preprocessing (mim_jax.train.preprocess with train=False): resized "
                 "to the model's image size when it differs, normalised by the config's mean/std; "
                 "no augmentation, no masking (every patch visible)")


class AnalysisError(ValueError):
  """A request the analysis cannot serve; the message says what to change."""


@dataclasses.dataclass
class Run:
  """One encoder to analyse: a workdir's online encoder at one checkpoint (or its init)."""
  label: str
  workdir: str
  step: int
  checkpoint: str
  trainer: Any

  @property
  def config(self):
    return self.trainer.config

  @property
  def encoder(self):
    return self.trainer.method.encoder

  @property
  def params(self):
    return self.trainer.state["params"]["encoder"]

  def describe(self) -> dict:
    from mim_jax.models import vit
    width, depth, heads = vit.variant(self.config.model.variant)
    return dict(label=self.label, workdir=self.workdir, step=self.step, checkpoint=self.checkpoint,
                method=self.config.method, seed=int(self.config.seed),
                variant=self.config.model.variant, depth=int(self.config.model.depth or depth),
                heads=heads, width=width, patch_size=int(self.encoder.patch_size),
                image_size=int(self.encoder.image_size), encoder="online")


def _checkpoint_steps(workdir: str) -> list[int]:
  from mim_jax import checkpointing
  if not os.path.isdir(os.path.join(workdir, "checkpoints")):
    return []  # do not let the Checkpointer create the folder in a foreign directory
  ckpt = checkpointing.Checkpointer(workdir, keep=1)
  try:
    return sorted(int(s) for s in ckpt.manager.all_steps())
  finally:
    ckpt.close()


def load_run(workdir: str, step: Optional[int] = None, label: Optional[str] = None) -> Run:
  """The run in `workdir` at checkpoint `step` (default the latest). A run without checkpoints
  whose config trains 0 steps (--config.total_epochs=0) gives its seeded initialisation."""
  from mim_jax import train
  workdir = os.path.abspath(workdir)
  if not os.path.exists(os.path.join(workdir, "config.json")):
    raise AnalysisError(f"{workdir}/config.json not found: point --workdir at a run directory "
                        f"written by mim_jax.main")
  steps = _checkpoint_steps(workdir)
  if steps:
    if step is not None and step not in steps:
      raise AnalysisError(f"no checkpoint at step {step} in {workdir}/checkpoints: use one of {steps}")
    trainer = train.Trainer.from_workdir(workdir, step=step)
    step = int(jax.device_get(trainer.state["step"]))
    checkpoint = os.path.join(workdir, "checkpoints", str(step))
  else:
    from mim_jax.data import pipeline
    config = train.load_run_config(workdir)
    if step not in (None, 0) or train.total_and_epoch_steps(
        config, pipeline.steps_per_epoch(config.input)) != 0:
      raise AnalysisError(f"no checkpoint in {workdir}/checkpoints: train the run first (or, for "
                          f"the random-init baseline, run mim_jax.main with --config.total_epochs=0)")
    # The same seeded initial state mim_jax.main evaluated for this 0-step run.
    trainer = train.Trainer.create(config)
    step, checkpoint = 0, "none: the run trains 0 steps, so its seeded initialisation is used"
  label = label or f"{os.path.basename(workdir.rstrip(os.sep))}@{step}"
  return Run(label, workdir, step, checkpoint, trainer)


def load_images(run: Run, split: str, num_images: int) -> np.ndarray:
  """uint8 [n, S, S, 3]: the fixed subset of `num_images` images of `split` (SUBSET_RULE)."""
  from mim_jax.evaluators import common
  if num_images <= 0:
    raise AnalysisError(f"--num_images must be positive, got {num_images}")
  ctx = run.trainer.eval_context(run.workdir, run.step)
  images, _ = common.take_images(ctx, split, num_images, batch_size=min(num_images, 256))
  return images


def map_batches(run: Run, fn: Callable, images: np.ndarray, batch_size: int) -> Any:
  """fn(encoder, encoder_params, normalised images) -> pytree of per-image arrays, jitted once
  and applied to padded batches of `images` sharded over the run's mesh; concatenated on host."""
  from mim_jax import sharding, train
  if jax.process_count() > 1:
    raise AnalysisError("the analysis runs in one process: start it without --num_processes")
  ndev = run.trainer.mesh.devices.size
  bs = -(-min(int(batch_size), len(images)) // ndev) * ndev
  encoder, input_cfg = run.encoder, run.config.input
  jitted = jax.jit(lambda p, x: fn(encoder, p, train.preprocess(None, x, input_cfg, False, train=False)))
  return map_padded(lambda x: jitted(run.params, sharding.host_to_global(x, run.trainer.batch_sharding)),
                    images, bs)


def _runs(args) -> list[Run]:
  runs = [load_run(args.workdir, args.step, args.label)]
  if args.workdir2:
    runs.append(load_run(args.workdir2, args.step2, args.label2))
  return runs


def _forward(run: Run, with_attention: bool, pooling: str) -> Callable:
  """The per-batch function of one run: one encoder pass giving the attention statistics
  [B, depth, H] and/or the blocks' representations for CKA."""
  grid, patch = run.encoder.grid, run.encoder.patch_size
  if getattr(run.encoder, "tubelet", 0):
    raise ValueError("the attention and CKA analyses read image ViTs: this run's encoder takes "
                     "clips (model.tubelet > 0)")

  def fn(encoder, params, x):
    _, inter = encoder.apply({"params": params}, x, mutable=["intermediates"])
    enc = inter["intermediates"]["encoder"]
    out = {}
    if with_attention:
      out["attention"] = attention.layer_statistics(attention.attention_maps(enc), grid, patch)
    if pooling:
      out["cka"] = cka.pooled_blocks(enc["block_outputs"], pooling, run.encoder.cls_token)
    return out

  return fn


def _protocol(args, runs: Sequence[Run], num_images: int) -> dict:
  return dict(split=args.split, num_images=int(num_images), image_subset=SUBSET_RULE,
              preprocessing=PREPROCESSING, batch_size=int(args.batch_size),
              seed=dict(image_subset=0, runs=[int(r.config.seed) for r in runs]),
              checkpoint_steps=[r.step for r in runs],
              encoder="each run's online encoder (params['encoder']), deterministic, un-masked")


def _write(out_dir: str, stem: str, result: dict, plot: Callable[[str], Any]) -> list[str]:
  from mim_jax.evaluators import common
  os.makedirs(out_dir, exist_ok=True)
  json_path = os.path.join(out_dir, f"{stem}.json")
  png_path = os.path.join(out_dir, f"{stem}.png")
  with open(json_path, "w") as f:
    json.dump(_nan_to_none(common.to_jsonable(result)), f, indent=2)
    f.write("\n")
  plot(png_path)
  return [json_path, png_path]


def _nan_to_none(x):
  if isinstance(x, dict):
    return {k: _nan_to_none(v) for k, v in x.items()}
  if isinstance(x, list):
    return [_nan_to_none(v) for v in x]
  if isinstance(x, float) and not np.isfinite(x):
    return None
  return x


def attention_result(runs: Sequence[Run], per_image: Sequence[dict], protocol: dict) -> dict:
  """The attention JSON: per model the [depth, heads] means of `per_image` ([N, depth, H])."""
  models = []
  for run, stats in zip(runs, per_image):
    summary = attention.summarize(stats)
    models.append({**run.describe(), "grid": run.encoder.grid,
                   **{k: v.tolist() for k, v in summary.items()}})
  protocol = dict(protocol, cls_token=attention.CLS_RULE, definitions=attention.DEFINITIONS,
                  distance_unit="pixels of the model input: patch-centre distance in grid cells "
                                "x patch size", kl_log_eps=attention.LOG_EPS)
  return dict(analysis="attention", step=runs[0].step, models=models, protocol=protocol)


def cka_result(runs: Sequence[Run], features: Sequence[np.ndarray], pooling: str,
               protocol: dict) -> dict:
  """The CKA JSON: each model's layer-by-layer matrix and, for two models, the one between."""
  rows = [cka.as_rows(f) for f in features]
  if len(rows) == 2 and rows[0].shape[0] != rows[1].shape[0]:
    n = features[0].shape[0]
    raise AnalysisError(f"--pooling tokens needs the same number of patches in both models "
                        f"({rows[0].shape[0] // n} vs {rows[1].shape[0] // n} per image): use "
                        f"--pooling mean")
  models = [{**run.describe(), "cka": cka.cka_matrix(r).tolist()} for run, r in zip(runs, rows)]
  result = dict(analysis="cka", step=runs[0].step, pooling=pooling, models=models)
  if len(rows) == 2:
    result["between"] = cka.cka_matrix(rows[0], rows[1]).tolist()
  result["protocol"] = dict(
      protocol, definition=cka.DEFINITION, pooling=cka.POOLINGS[pooling], rows=int(rows[0].shape[0]),
      layers="layer i = the output of block i (1..depth), before the final LayerNorm",
      matrices=("models[m].cka[i][j] = CKA(layer i+1, layer j+1) of model m; between[i][j] = "
                "CKA(layer i+1 of models[0], layer j+1 of models[1])"))
  return result


def cka_panels(result: dict) -> list:
  panels = [(f"{m['label']} vs itself", np.asarray(m["cka"], np.float64), f"{m['label']} layer",
             f"{m['label']} layer") for m in result["models"]]
  if "between" in result:
    a, b = (m["label"] for m in result["models"])
    panels.append((f"{a} vs {b}", np.asarray(result["between"], np.float64), f"{a} layer", f"{b} layer"))
  return panels


def analyse(args) -> list[str]:
  """Loads the runs and the images once, runs one jitted encoder pass per run, writes the
  requested analyses; returns the written paths."""
  from mim_jax.analysis import plots
  with_attention = args.analysis in ("attention", "all")
  pooling = args.pooling if args.analysis in ("cka", "all") else ""
  runs = _runs(args)
  images = load_images(runs[0], args.split, args.num_images)
  outs = [map_batches(r, _forward(r, with_attention, pooling), images, args.batch_size) for r in runs]
  protocol = _protocol(args, runs, len(images))
  out_dir = args.out or os.path.join(runs[0].workdir, "analysis")
  paths = []
  if with_attention:
    res = attention_result(runs, [o["attention"] for o in outs], protocol)
    paths += _write(out_dir, "attention", res, lambda p: plots.plot_attention(res["models"], p))
  if pooling:
    res_cka = cka_result(runs, [o["cka"] for o in outs], pooling, protocol)
    paths += _write(out_dir, f"cka_{pooling}", res_cka, lambda p: plots.plot_cka(cka_panels(res_cka), p))
  return paths


def build_parser() -> argparse.ArgumentParser:
  parser = argparse.ArgumentParser(prog="python -m mim_jax.analysis", description=__doc__.split("\n")[0])
  sub = parser.add_subparsers(dest="analysis", required=True)
  for name, num_images, helptext in (
      ("attention", 256, "attention distance, entropy and KL between heads per layer and head"),
      ("cka", 512, "linear CKA between the layers of one run, or of two"),
      ("all", 256, "both, on the same images, loading each run once")):
    p = sub.add_parser(name, help=helptext)
    p.add_argument("--workdir", required=True, help="run directory written by mim_jax.main")
    p.add_argument("--workdir2", default="", help="a second run, compared with the first")
    p.add_argument("--step", type=int, default=None, help="checkpoint step of --workdir (default latest)")
    p.add_argument("--step2", type=int, default=None, help="checkpoint step of --workdir2")
    p.add_argument("--label", default="", help="legend name of --workdir (default <dir name>@<step>)")
    p.add_argument("--label2", default="", help="legend name of --workdir2")
    p.add_argument("--num_images", type=int, default=num_images)
    p.add_argument("--split", default="eval", choices=("eval", "train"))
    p.add_argument("--batch_size", type=int, default=64)
    p.add_argument("--out", default="", help="output folder (default <workdir>/analysis)")
    if name != "attention":
      p.add_argument("--pooling", default="mean", choices=sorted(cka.POOLINGS),
                     help="CKA representations: " + "; ".join(f"{k}: {v}" for k, v in cka.POOLINGS.items()))
  return parser


def main(argv: Optional[Sequence[str]] = None) -> int:
  """Runs one analysis; returns the exit code (0, or 2 after a one-line `error: ...`)."""
  from mim_jax import train
  from mim_jax.checkpointing import CheckpointMismatchError
  from mim_jax.data.sources import DataError
  from mim_jax.sharding import ShardingError
  args = build_parser().parse_args(argv)
  try:
    paths = analyse(args)
  except (AnalysisError, train.TrainingError, CheckpointMismatchError, ShardingError, DataError) as e:
    print(f"error: {e}", file=sys.stderr)
    return 2
  print("\n".join(f"wrote {p}" for p in paths))
  return 0


if __name__ == "__main__":
  sys.exit(main())
