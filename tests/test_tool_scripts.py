"""The shell scripts behind the results tables (tools/*.sh) name configs and keys that exist: each
script runs with a stand-in `python` that records its arguments, and every mim_jax.main command
it would run is checked against its config (unknown keys fail, as main's locked config does).
tools/official_parity.py (it needs torch and the official checkouts) is checked for its
argument errors and its tolerance rule."""
import os
import shlex
import subprocess

import numpy as np
import pytest

from helpers import ROOT
from mim_jax import config_lib

SCRIPTS = {"cifar10_table.sh": ["mae", "simmim:swin_cifar10", "maskfeat:mvit_cifar10",
                                 "videomae:default:clips", "maskfeat:clips:maskfeat_clips"],
           "tinymim_cifar10.sh": []}


def recorded_commands(script, args, tmp_path, env=None):
  bin_dir = tmp_path / "bin"
  bin_dir.mkdir()
  log = tmp_path / "calls.txt"
  fake = bin_dir / "python"
  fake.write_text(f'#!/bin/bash\nprintf "%s\\n" "$(printf "%q " "$@")" >> {shlex.quote(str(log))}\n')
  fake.chmod(0o755)
  e = dict(os.environ, PATH=f"{bin_dir}{os.pathsep}{os.environ['PATH']}", OUT_DIR=str(tmp_path / "runs"),
           **(env or {}))
  subprocess.run(["bash", str(ROOT / "tools" / script), *args], cwd=ROOT, env=e, check=True,
                 capture_output=True, text=True)
  return [shlex.split(line) for line in log.read_text().splitlines()]


def check_main_command(argv):
  assert argv[:2] == ["-m", "mim_jax.main"], argv
  flags = dict(a[2:].split("=", 1) for a in argv[2:])
  path, _, preset = flags.pop("config").partition(":")
  method = os.path.splitext(os.path.basename(path))[0]
  config = config_lib.load(method, preset, str(ROOT / "configs"))
  assert "workdir" in flags, argv
  for key in (k for k in flags if k.startswith("config.")):
    node = config
    *parents, last = key[len("config."):].split(".")
    for name in parents:
      node = node[name]
    assert last in node, f"{key} is not a key of configs/{method}.py:{preset}"
  return method, flags


@pytest.mark.parametrize("script", sorted(SCRIPTS))
def test_tool_scripts_run_existing_configs_and_keys(script, tmp_path):
  calls = recorded_commands(script, SCRIPTS[script], tmp_path, env={"FINETUNE": "1"})
  mains = [check_main_command(c) for c in calls if c[:2] == ["-m", "mim_jax.main"]]
  reports = [c for c in calls if c[:2] == ["-m", "mim_jax.report"]]
  assert mains and len(reports) == 1 and len(calls) == len(mains) + 1, calls
  # Every run the table reads is one the script trains.
  workdirs = {flags["workdir"] for _, flags in mains}
  listed = [a for a in reports[0][2:] if not a.startswith("-")]
  names = reports[0][reports[0].index("--names") + 1].split(",")
  runs = [a for a in listed if a in workdirs]
  assert runs and len(runs) == len(names), (listed, names)


def test_cifar10_table_takes_a_fine_tuning_preset(tmp_path):
  """METHOD:PRESET:FT_PRESET fine-tunes with configs/finetune.py:FT_PRESET from METHOD_PRESET's
  run and from scratch; METHOD:PRESET fine-tunes with PRESET."""
  calls = recorded_commands("cifar10_table.sh", ["maskfeat:clips:maskfeat_clips", "mae"],
                            tmp_path, env={"FINETUNE": "1"})
  ft = [dict(a[2:].split("=", 1) for a in c[2:]) for c in calls
        if c[:2] == ["-m", "mim_jax.main"] and "finetune.py" in c[2]]
  run = str(tmp_path / "runs" / "maskfeat_clips")
  assert [(f["config"], f.get("config.finetune.pretrained")) for f in ft] == [
      ("configs/finetune.py:maskfeat_clips", run), ("configs/finetune.py:maskfeat_clips", None),
      ("configs/finetune.py:cifar10", str(tmp_path / "runs" / "mae_cifar10")),
      ("configs/finetune.py:cifar10", None)]


def _official_parity():
  import importlib.util
  spec = importlib.util.spec_from_file_location("official_parity", ROOT / "tools" / "official_parity.py")
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)
  return module


def test_official_parity_needs_a_checkout_and_names_it(tmp_path, capsys):
  """tools/official_parity.py (torch and the official repositories: run by hand, see
  docs/convert.md) refuses a missing checkout in one line before importing torch."""
  tool = _official_parity()
  for argv, says in (([], "give --swin, --mvit, --slowfast, --videomae and/or --videomae_v2"),
                     (["--swin", str(tmp_path / "none")], "clone the official repository there")):
    with pytest.raises(SystemExit) as e:
      tool.main(argv)
    assert e.value.code == 2 and says in capsys.readouterr().err


def test_official_parity_tolerance_is_relative_to_the_output_scale():
  tool = _official_parity()
  ref = np.array([[100.0, -3.0]])
  assert tool._compare("a", ref + 5e-3, ref, 1e-4)["ok"]          # 5e-3 <= 1e-4 x 100
  assert not tool._compare("b", ref + 2e-2, ref, 1e-4)["ok"]
  small = np.array([[0.5, 0.1]])                                   # scale floored at 1
  assert tool._compare("c", small + 9e-5, small, 1e-4)["ok"]
  assert not tool._compare("d", small + 2e-4, small, 1e-4)["ok"]
  row = tool._compare("e", np.zeros((2, 3)), np.zeros((3, 2)), 1e-4)
  assert not row["ok"] and "shapes" in row["error"]
