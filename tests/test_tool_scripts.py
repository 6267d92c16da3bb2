"""The shell scripts behind the results tables (tools/*.sh) name configs and keys that exist: each
script runs with a stand-in `python` that records its arguments, and every mim_jax.main command
it would run is checked against its config (unknown keys fail, as main's locked config does)."""
import os
import shlex
import subprocess

import pytest

from helpers import ROOT
from mim_jax import config_lib

SCRIPTS = {"cifar10_table.sh": ["mae", "simmim"], "tinymim_cifar10.sh": []}


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
