r"""Reruns the four ablation tables of Latent MIM (Wei, Gupta, Morgado, ECCV 2024) on CIFAR-10.

  python tools/latent_mim_ablations.py --table target|loss|masking|decoder|all \
    --workdir_root runs/latent_mim --data ../shared/data/cifar10/train [--steps N] [--batch B] \
    [--dry_run]

Every row is a label and config overrides on top of configs/latent_mim.py:cifar10 (whose
defaults are the official recipe: EMA target, PatchDisc, mask ratio 0.9, a gap, the similarity
regulariser, cross-attention decoder with visual cues, MLP projection head, 3 decoder blocks),
changing one factor at a time from that recipe. Each row runs as

  python -m mim_jax.main --config=configs/latent_mim.py:cifar10 --workdir=<root>/<table>_<row> \
    --config.input.data.dir=<data> [--config.total_steps=N] [--config.input.batch_size=B] \
    --config.<key>=<value> ...

Rows that change nothing (their overrides are the recipe's own values: the momentum target,
PatchDisc, ratio 0.9 with gap 1, the cross-attention decoder with visual cues, the MLP head,
3 decoder blocks) are one run, in <root>/recipe, shared by every table. Rows are skipped
when their workdir already holds a finished run (a 'summary' record in
metrics.jsonl), then writes <root>/<table>.md: per row the final average cosine similarity of
the online encoder's patch latents ('Sim', aux/sim of the last logged step: 1.00 means
collapse), kNN top-1 and linear-probe top-1 on the held-out images. `--dry_run` only prints the
commands (and writes the tables of whatever runs exist).

The paper's own numbers (ImageNet, ViT-B) are not reproduced here: this is a CPU-scale rerun.
The gap is in pixels (the official code); at 32 px with 4-pixel patches 1 pixel is the paper's
4/16 of a patch, and 4 pixels the paper's pixel count.
"""
from __future__ import annotations

import argparse
import functools
import json
import os
import re
import subprocess
import sys
from typing import NamedTuple

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
BASE_CONFIG = "configs/latent_mim.py:cifar10"


class Row(NamedTuple):
  label: str
  overrides: dict


TABLES = {
    # 1. Target encoder (collapse study).
    "target": [
        Row("naive (shared, gradients through both)", {"latent_mim.target": "naive"}),
        Row("independent encoders", {"latent_mim.target": "independent"}),
        Row("shared + stop-gradient", {"latent_mim.target": "stopgrad"}),
        Row("momentum (EMA) target", {"latent_mim.target": "ema"}),
        Row("frozen random target", {"latent_mim.target": "random"}),
        # PatchDisc and the similarity regulariser both push patch latents apart, so with them
        # even the naive target cannot collapse; these two rows take both away.
        Row("naive, MSE, no regulariser", {"latent_mim.target": "naive", "latent_mim.loss": "mse",
                                           "latent_mim.reg_weight": 0.0}),
        Row("momentum, MSE, no regulariser", {"latent_mim.target": "ema", "latent_mim.loss": "mse",
                                              "latent_mim.reg_weight": 0.0}),
    ],
    # 2. Reconstruction objective on each masked patch's latent.
    "loss": [
        Row("MSE", {"latent_mim.loss": "mse"}),
        Row("L1", {"latent_mim.loss": "l1"}),
        Row("Huber (delta 1)", {"latent_mim.loss": "huber", "latent_mim.huber_delta": 1.0}),
        Row("PatchDisc", {"latent_mim.loss": "patchdisc"}),
    ],
    # 3. Masking and redundancy.
    "masking": [
        Row("ratio 0.75, gap 0", {"latent_mim.mask_ratio": 0.75, "latent_mim.gap": 0}),
        Row("ratio 0.9, gap 0", {"latent_mim.mask_ratio": 0.9, "latent_mim.gap": 0}),
        Row("ratio 0.75, gap 1", {"latent_mim.mask_ratio": 0.75, "latent_mim.gap": 1}),
        Row("ratio 0.9, gap 1", {"latent_mim.mask_ratio": 0.9, "latent_mim.gap": 1}),
        Row("ratio 0.9, gap 4", {"latent_mim.mask_ratio": 0.9, "latent_mim.gap": 4}),
        Row("ratio 0.9, gap 1, no regulariser", {"latent_mim.mask_ratio": 0.9, "latent_mim.gap": 1,
                                                 "latent_mim.reg_weight": 0.0}),
    ],
    # 4. Decoder design.
    "decoder": [
        Row("self-attention, no visual cues", {"latent_mim.decoder.kind": "self",
                                               "latent_mim.visual_cues": False}),
        Row("self-attention, visual cues", {"latent_mim.decoder.kind": "self",
                                            "latent_mim.visual_cues": True}),
        Row("cross-attention, no visual cues", {"latent_mim.decoder.kind": "cross",
                                                "latent_mim.visual_cues": False}),
        Row("cross-attention, visual cues", {"latent_mim.decoder.kind": "cross",
                                             "latent_mim.visual_cues": True}),
        Row("no projection head", {"latent_mim.proj_head": "none"}),
        Row("MLP projection head", {"latent_mim.proj_head": "mlp"}),
        Row("decoder depth 3", {"latent_mim.decoder.depth": 3}),
        Row("decoder depth 8", {"latent_mim.decoder.depth": 8}),
    ],
}


def slug(label: str) -> str:
  return re.sub(r"[^a-z0-9]+", "_", label.lower()).strip("_")


@functools.lru_cache(maxsize=None)
def recipe():
  """configs/latent_mim.py:cifar10, the config every row starts from (read once: every
  workdir() and table line asks)."""
  from mim_jax import config_lib
  return config_lib.load("latent_mim", BASE_CONFIG.split(":")[1], os.path.join(ROOT, "configs"))


def _value(config, key: str):
  for part in key.split("."):
    config = config[part]
  return config


def is_recipe(row: Row) -> bool:
  """Whether the row's overrides only restate the recipe's values (the same run)."""
  base = recipe()
  return all(_value(base, k) == v for k, v in row.overrides.items())


def workdir(root: str, table: str, row: Row) -> str:
  if is_recipe(row):
    return os.path.join(root, "recipe")
  return os.path.join(root, f"{table}_{slug(row.label)}")


def command(table: str, row: Row, root: str, data: str, steps: int = 0,
            batch: int = 0) -> list[str]:
  cmd = [sys.executable, "-m", "mim_jax.main", f"--config={BASE_CONFIG}",
         f"--workdir={workdir(root, table, row)}", f"--config.input.data.dir={data}"]
  if steps:
    cmd.append(f"--config.total_steps={int(steps)}")
  if batch:      # the learning rate follows: base_lr is per 256 images
    cmd.append(f"--config.input.batch_size={int(batch)}")
  cmd += [f"--config.{k}={v}" for k, v in row.overrides.items()]
  return cmd


def records(wd: str) -> list[dict]:
  path = os.path.join(wd, "metrics.jsonl")
  if not os.path.exists(path):
    return []
  with open(path) as f:
    return [json.loads(line) for line in f if line.strip()]


def finished(wd: str) -> bool:
  return any("summary" in r for r in records(wd))


def _metric(summary: dict, evaluator: str):
  for key in (f"{evaluator}/online/top1", f"{evaluator}/top1"):
    if key in summary:
      return summary[key]
  hits = [v for k, v in summary.items() if k.startswith(evaluator + "/") and k.endswith("/top1")]
  return hits[0] if hits else None


def row_results(wd: str) -> dict:
  """{'sim', 'knn', 'linear'} of a run (None where missing)."""
  recs = records(wd)
  sims = [r["aux/sim"] for r in recs if "aux/sim" in r]
  summary = next((r["summary"] for r in reversed(recs) if "summary" in r), {})
  return {"sim": sims[-1] if sims else None, "knn": _metric(summary, "knn"),
          "linear": _metric(summary, "linear")}


def markdown(table: str, root: str) -> str:
  fmt = lambda v, f: "-" if v is None else format(v, f)  # noqa: E731
  lines = [f"## Latent MIM ablation: {table}", "",
           f"configs/latent_mim.py:cifar10 + the row's overrides; workdirs {root}/{table}_* and "
           f"{root}/recipe.", "",
           "| row | overrides | Sim | kNN top-1 | linear top-1 |", "|---|---|---|---|---|"]
  for row in TABLES[table]:
    r = row_results(workdir(root, table, row))
    ov = ", ".join(f"{k.split('.', 1)[1]}={v}" for k, v in row.overrides.items())
    ov += " (the recipe)" if is_recipe(row) else ""
    lines.append(f"| {row.label} | {ov} | {fmt(r['sim'], '.2f')} | {fmt(r['knn'], '.1f')} | "
                 f"{fmt(r['linear'], '.1f')} |")
  return "\n".join(lines) + "\n"


def main(argv: list[str]) -> int:
  parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
  parser.add_argument("--table", default="all", choices=sorted(TABLES) + ["all"])
  parser.add_argument("--workdir_root", default="runs/latent_mim")
  parser.add_argument("--data", default="../shared/data/cifar10/train",
                      help="the CIFAR-10 image folder (config.input.data.dir)")
  parser.add_argument("--steps", type=int, default=0, help="config.total_steps (0: the preset's)")
  parser.add_argument("--batch", type=int, default=0,
                      help="config.input.batch_size (0: the preset's; the lr scales with it)")
  parser.add_argument("--dry_run", action="store_true", help="print the commands, run nothing")
  args = parser.parse_args(argv)
  tables = sorted(TABLES) if args.table == "all" else [args.table]
  # The runs start in the repository root: make the caller's relative paths absolute.
  args.workdir_root, args.data = os.path.abspath(args.workdir_root), os.path.abspath(args.data)
  os.makedirs(args.workdir_root, exist_ok=True)
  started = set()
  for table in tables:
    for row in TABLES[table]:
      wd = workdir(args.workdir_root, table, row)
      cmd = command(table, row, args.workdir_root, args.data, args.steps, args.batch)
      if wd in started:                 # the recipe, already run (or printed) above
        continue
      started.add(wd)
      if finished(wd):
        print(f"# done, skipped: {wd}")
        continue
      print(" ".join(cmd), flush=True)
      if not args.dry_run:
        subprocess.run(cmd, check=True, cwd=ROOT)
    out = os.path.join(args.workdir_root, f"{table}.md")
    with open(out, "w") as f:
      f.write(markdown(table, args.workdir_root))
    print(f"# wrote {out}")
  return 0


if __name__ == "__main__":
  sys.exit(main(sys.argv[1:]))
