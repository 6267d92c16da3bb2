"""The table runner behind the ablation tools (tools/latent_mim_ablations.py,
tools/joint_embedding_tables.py): each table is a base config and rows of config overrides,
one factor at a time; each row runs as

  python -m mim_jax.main --config=<base> --workdir=<root>/<table>_<row> \
    --config.input.data.dir=<data> [--config.total_steps=N] [--config.input.batch_size=B] \
    --config.<key>=<value> ...

A row that changes the batch size (an `input.batch_size` override) counts --steps N at the
table's batch: it runs as many images, N x that batch / its batch steps (SimCLR's batch study
compares batch sizes at equal epochs).

Rows whose overrides restate the base config's own values are one run, in <root>/<recipe>,
shared by every table of that base. Rows are skipped when their workdir holds a finished run (a
'summary' record in metrics.jsonl) of the same length and batch (another is an error: a table
never mixes budgets, so --steps / --batch other than a root's runs need another root); then
<root>/<table>.md is written: per row the table's monitored training value (the last logged
one), kNN top-1 (and kNN k=200 where the run has it) and linear-probe top-1 of the online
encoder on the held-out images. `--dry_run` only prints the commands (and writes the tables
of whatever runs exist).
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


class Row(NamedTuple):
  label: str
  overrides: dict


class Table(NamedTuple):
  title: str
  base: str                          # 'configs/<name>.py:<preset>'
  rows: list
  monitor: tuple = ("aux/sim", "Sim")  # (logged key, column title)
  recipe: str = "recipe"             # the workdir name of the base config's own run


def slug(label: str) -> str:
  return re.sub(r"[^a-z0-9]+", "_", label.lower()).strip("_")


@functools.lru_cache(maxsize=None)
def base_config(base: str):
  """The config a table's rows start from (read once)."""
  from mim_jax import config_lib
  path, preset = base.split(":") if ":" in base else (base, "")
  name = os.path.splitext(os.path.basename(path))[0]
  return config_lib.load(name, preset, os.path.join(ROOT, "configs"))


def _value(config, key: str):
  for part in key.split("."):
    config = config[part]
  return config


def is_recipe(table: Table, row: Row) -> bool:
  """Whether the row's overrides only restate the base config's values (the same run)."""
  base = base_config(table.base)
  return all(_value(base, k) == v for k, v in row.overrides.items())


def workdir(root: str, name: str, table: Table, row: Row) -> str:
  if is_recipe(table, row):
    return os.path.join(root, table.recipe)
  return os.path.join(root, f"{name}_{slug(row.label)}")


def row_steps(table: Table, row: Row, steps: int = 0, batch: int = 0) -> int:
  """The row's total_steps for --steps `steps` (0: the preset's length): `steps` itself, or for
  a row that overrides the batch the steps that see as many images at its batch as `steps` at
  the table's (`batch`, else the base config's)."""
  if not steps or "input.batch_size" not in row.overrides:
    return steps
  at = batch or int(base_config(table.base).input.batch_size)
  return max(1, round(steps * at / int(row.overrides["input.batch_size"])))


def command(name: str, table: Table, row: Row, root: str, data: str, steps: int = 0,
            batch: int = 0) -> list[str]:
  cmd = [sys.executable, "-m", "mim_jax.main", f"--config={table.base}",
         f"--workdir={workdir(root, name, table, row)}", f"--config.input.data.dir={data}"]
  if steps:
    cmd.append(f"--config.total_steps={row_steps(table, row, steps, batch)}")
  if batch:      # the learning rate follows: base_lr is per lr_batch_divisor images
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


def budget_mismatch(wd: str, table: Table, steps: int = 0, batch: int = 0) -> str:
  """What differs between the finished run in `wd` (its config.json) and the length and batch
  asked for (0: the base config's); '' when they agree or the run has no config.json."""
  from mim_jax import config_lib  # pylint: disable=g-import-not-at-top
  if not os.path.exists(os.path.join(wd, "config.json")):
    return ""
  ran = config_lib.load_run_config(wd)
  base = base_config(table.base)
  want = {"total_steps": steps or int(base.total_steps),
          "input.batch_size": batch or int(base.input.batch_size)}
  got = {"total_steps": int(ran.get("total_steps", 0)),
         "input.batch_size": int(ran.input.batch_size)}
  return ", ".join(f"{k}={got[k]} (asked: {want[k]})" for k in want if got[k] != want[k])


def _metric(summary: dict, evaluator: str):
  for key in (f"{evaluator}/online/top1", f"{evaluator}/top1"):
    if key in summary:
      return summary[key]
  hits = [v for k, v in summary.items() if k.startswith(evaluator + "/") and k.endswith("/top1")]
  return hits[0] if hits else None


def row_results(wd: str, monitor: str = "aux/sim") -> dict:
  """{'steps', 'monitor', 'knn', 'knn_200', 'linear'} of a run (None where missing): steps is
  the last training step logged."""
  recs = records(wd)
  seen = [r[monitor] for r in recs if monitor in r]
  steps = [r["step"] for r in recs if "loss" in r]
  summary = next((r["summary"] for r in reversed(recs) if "summary" in r), {})
  return {"steps": steps[-1] if steps else None, "monitor": seen[-1] if seen else None,
          "knn": _metric(summary, "knn"), "knn_200": _metric(summary, "knn_200"),
          "linear": _metric(summary, "linear")}


def markdown(name: str, table: Table, root: str) -> str:
  fmt = lambda v, f: "-" if v is None else format(v, f)  # noqa: E731
  results = [(row, row_results(workdir(root, name, table, row), table.monitor[0]))
             for row in table.rows]
  k200 = any(r["knn_200"] is not None for _, r in results)
  shown = os.path.relpath(root, ROOT) if os.path.abspath(root).startswith(ROOT + os.sep) else root
  head = (f"| row | overrides | steps | {table.monitor[1]} | kNN top-1 |"
          + (" kNN-200 top-1 |" if k200 else ""))
  lines = [f"## {table.title}", "",
           f"{table.base} + the row's overrides; workdirs {shown}/{name}_* and "
           f"{shown}/{table.recipe}. Steps: the run's last training step; "
           f"{table.monitor[1]}: its last logged value; top-1 (%) of the online encoder on the "
           f"held-out images (each run's eval_results.json records the probes' protocol).",
           "", head + " linear top-1 |", "|---|---|---|---|---|" + ("---|" if k200 else "") + "---|"]
  for row, r in results:
    ov = ", ".join(f"{k.split('.', 1)[1] if k.count('.') else k}={v}"
                   for k, v in row.overrides.items())
    ov += " (the recipe)" if is_recipe(table, row) else ""
    cells = [fmt(r["steps"], "d"), fmt(r["monitor"], ".2f"), fmt(r["knn"], ".1f")]
    if k200:
      cells.append(fmt(r["knn_200"], ".1f"))
    cells.append(fmt(r["linear"], ".1f"))
    lines.append(f"| {row.label} | {ov} | " + " | ".join(cells) + " |")
  return "\n".join(lines) + "\n"


def main(tables: dict, argv: list[str], description: str, default_root: str) -> int:
  parser = argparse.ArgumentParser(description=description)
  parser.add_argument("--table", default="all", choices=sorted(tables) + ["all"])
  parser.add_argument("--workdir_root", default=default_root)
  parser.add_argument("--data", default="../shared/data/cifar10/train",
                      help="the CIFAR-10 image folder (config.input.data.dir)")
  parser.add_argument("--steps", type=int, default=0, help="config.total_steps (0: the preset's)")
  parser.add_argument("--batch", type=int, default=0,
                      help="config.input.batch_size (0: the preset's; the lr scales with it)")
  parser.add_argument("--dry_run", action="store_true", help="print the commands, run nothing")
  args = parser.parse_args(argv)
  names = sorted(tables) if args.table == "all" else [args.table]
  # The runs start in the repository root: make the caller's relative paths absolute.
  args.workdir_root, args.data = os.path.abspath(args.workdir_root), os.path.abspath(args.data)
  os.makedirs(args.workdir_root, exist_ok=True)
  started = set()
  for name in names:
    table = tables[name]
    for row in table.rows:
      wd = workdir(args.workdir_root, name, table, row)
      cmd = command(name, table, row, args.workdir_root, args.data, args.steps, args.batch)
      if wd in started:                 # the recipe, already run (or printed) above
        continue
      started.add(wd)
      if finished(wd):
        differs = budget_mismatch(wd, table, row_steps(table, row, args.steps, args.batch),
                                  int(row.overrides.get("input.batch_size", args.batch)))
        if differs:     # a table mixes no budgets: that run stays, this one goes elsewhere
          print(f"error: {wd} finished with {differs}; give this budget its own "
                f"--workdir_root (e.g. {args.workdir_root}_{args.steps or 'preset'})",
                file=sys.stderr)
          return 2
        print(f"# done, skipped: {wd}")
        continue
      print(" ".join(cmd), flush=True)
      if not args.dry_run:
        subprocess.run(cmd, check=True, cwd=ROOT)
    out = os.path.join(args.workdir_root, f"{name}.md")
    with open(out, "w") as f:
      f.write(markdown(name, table, args.workdir_root))
    print(f"# wrote {out}")
  return 0
