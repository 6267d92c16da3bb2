"""tools/joint_embedding_tables.py: every row of every seed table is a command whose overrides
are declared keys of the method's cifar10 preset and build the method; recipe rows share one
run; finished rows are read back into the table."""
import importlib.util
import os

from helpers import ROOT, load_config
from mim_jax import methods


def _tool():
  spec = importlib.util.spec_from_file_location("joint_embedding_tables",
                                                ROOT / "tools" / "joint_embedding_tables.py")
  mod = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(mod)
  return mod


def _apply(config, key, value):
  node = config
  *path, last = key.split(".")
  for part in path:
    node = node[part]
  assert last in node, key                                    # a declared key
  old = node[last]
  node[last] = (value == "True") if isinstance(old, bool) else type(old)(value)


def test_every_row_is_a_valid_override_and_recipes_are_shared(tmp_path, capsys):
  tool = _tool()
  assert tool.main(["--table", "all", "--workdir_root", str(tmp_path), "--data", "/data/c10",
                    "--steps", "3", "--dry_run"]) == 0
  lines = [l for l in capsys.readouterr().out.splitlines() if "mim_jax.main" in l]
  rows = [(name, t, r) for name, t in tool.TABLES.items() for r in t.rows]
  assert len(lines) == len({tool.ablations.workdir(str(tmp_path), n, t, r) for n, t, r in rows})
  for line in lines:
    base = line.split("--config=")[1].split(" ")[0]
    name, preset = os.path.splitext(os.path.basename(base.split(":")[0]))[0], base.split(":")[1]
    batch = (int(line.split("--config.input.batch_size=")[1].split(" ")[0])
             if "batch_size" in line else 256)
    # SimCLR's batch table runs each row as many images as 3 steps at batch 256.
    assert preset == "cifar10" and f"--config.total_steps={round(3 * 256 / batch)}" in line, line
    c = load_config(name, preset)
    for arg in line.split(" --config.")[1:]:
      key, value = arg.split("=", 1)
      if key in ("input.data.dir", "total_steps"):
        continue
      _apply(c, key, value)
    methods.get(c)                                            # the values build the method
  for name in tool.TABLES:
    assert os.path.exists(tmp_path / f"{name}.md")
  # SimCLR's augmentation study: the recipe, the 7 single operators and their 21 pairs.
  aug = tool.TABLES["simclr_aug"]
  studies = [r.overrides["simclr.aug_study"] for r in aug.rows]
  assert len(studies) == 29 and len(set(studies)) == 29 and tool.ablations.is_recipe(aug, aug.rows[0])
  assert sum("+" in s for s in studies) == 21 and "crop+color" in studies
  # The recipe row of SimCLR's head table is the preset's own run, shared.
  head = tool.TABLES["simclr_head"]
  assert [tool.ablations.is_recipe(head, r) for r in head.rows] == [False, False, False, True]
  wd = tool.ablations.workdir(str(tmp_path), "simclr_head", head, head.rows[0])
  os.makedirs(wd)
  with open(os.path.join(wd, "metrics.jsonl"), "w") as f:
    f.write('{"step": 3, "loss": 1.0, "aux/collapse_ratio": 0.5}\n')
    f.write('{"step": 3, "summary": {"knn/online/top1": 12.5, "knn_200/online/top1": 13.0, '
            '"linear/online/top1": 20.0}}\n')
  tool.main(["--table", "simclr_head", "--workdir_root", str(tmp_path), "--dry_run"])
  assert "done, skipped" in capsys.readouterr().out
  # A finished run of another length is not taken for this budget's row: a one-line error.
  with open(os.path.join(wd, "config.json"), "w") as f:
    f.write('{"total_steps": 3, "input": {"batch_size": 256}}')
  assert tool.main(["--table", "simclr_head", "--workdir_root", str(tmp_path), "--steps", "3",
                    "--dry_run"]) == 0
  assert "done, skipped" in capsys.readouterr().out
  assert tool.main(["--table", "simclr_head", "--workdir_root", str(tmp_path), "--steps", "300",
                    "--dry_run"]) == 2
  err = capsys.readouterr().err
  assert "total_steps=3 (asked: 300)" in err and f"--workdir_root (e.g. {tmp_path}_300)" in err
  assert tool.main(["--table", "simclr_head", "--workdir_root", str(tmp_path), "--batch", "64",
                    "--steps", "3", "--dry_run"]) == 2
  assert "input.batch_size=256 (asked: 64)" in capsys.readouterr().err
  # A finished row of the batch table is read at its own batch and its images-matched steps.
  batch = tool.TABLES["simclr_batch"]
  wd64 = tool.ablations.workdir(str(tmp_path), "simclr_batch", batch, batch.rows[0])
  os.makedirs(wd64)
  with open(os.path.join(wd64, "metrics.jsonl"), "w") as f:
    f.write('{"step": 1200, "summary": {}}\n')
  with open(os.path.join(wd64, "config.json"), "w") as f:
    f.write('{"total_steps": 1200, "input": {"batch_size": 64}}')
  assert tool.main(["--table", "simclr_batch", "--workdir_root", str(tmp_path), "--steps", "300",
                    "--dry_run"]) == 0
  out = capsys.readouterr().out
  assert f"done, skipped: {wd64}" in out and "--config.total_steps=150 " in out
  assert tool.main(["--table", "simclr_batch", "--workdir_root", str(tmp_path), "--steps", "3",
                    "--dry_run"]) == 2
  assert "total_steps=1200 (asked: 12)" in capsys.readouterr().err
  md = open(tmp_path / "simclr_head.md").read()
  assert "| no head | proj_head_mode=none | 3 | 0.50 | 12.5 | 13.0 | 20.0 |" in md
  assert f"workdirs {tmp_path}/simclr_head_* and {tmp_path}/simclr_recipe." in md


def test_cpu_benchmark_times_a_preset_and_prints_its_table(monkeypatch, capsys):
  """benchmarks/joint_embedding_cpu.py on a shrunk preset: one timed step, a table row whose
  estimate is steps x seconds."""
  from mim_jax import config_lib
  spec = importlib.util.spec_from_file_location("joint_embedding_cpu",
                                                ROOT / "benchmarks" / "joint_embedding_cpu.py")
  bench = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(bench)
  real = config_lib.load

  def small(name, preset="", *a):
    c = real(name, preset, *a)
    c.model.width, c.input.batch_size, c.input.image_size = 0.125, 16, 16
    return c

  monkeypatch.setattr(config_lib, "load", small)
  assert bench.main(["--methods", "instdisc", "--steps", "1", "--warmup", "1"]) == 0
  row = capsys.readouterr().out.splitlines()[-1].split(" | ")
  assert row[0] == "| instdisc" and row[2] == "16"
  steps, sec, hours = int(row[3]), float(row[4]), float(row[5].rstrip(" |"))
  assert steps == 5 * (45_000 // 16) and sec > 0
  assert abs(hours - steps * sec / 3600) <= steps * 0.005 / 3600 + 0.005   # printed rounding
