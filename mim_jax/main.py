"""Entry point: parse flags, start the processes, dispatch. The logic lives in train.py.

  python -m mim_jax.main --config=configs/simmim.py[:preset] --workdir=DIR \
      [--mode=train|eval] [--config.key=value ...]
"""
from __future__ import annotations

import os
import sys

from absl import app, flags, logging
from ml_collections import config_flags

_CONFIG = config_flags.DEFINE_config_file("config", None, "Config file, e.g. configs/simmim.py:cifar10",
                                          lock_config=True)
_WORKDIR = flags.DEFINE_string("workdir", None, "Directory for checkpoints, metrics and results.")
_MODE = flags.DEFINE_enum("mode", "train", ["train", "eval"], "train (resumes if possible) or eval.")
# Multi-process start-up (TPU pods, SLURM). On Cloud TPU and SLURM jax finds these itself.
_COORD = flags.DEFINE_string("coordinator_address", None, "host:port of process 0, for multi-process runs.")
_NPROC = flags.DEFINE_integer("num_processes", None, "Number of processes.")
_PID = flags.DEFINE_integer("process_id", None, "This process's index.")
_DIST = flags.DEFINE_bool("distributed", None, "Call jax.distributed.initialize() (default: when the "
                          "flags above or the JAX_COORDINATOR_ADDRESS / SLURM / TPU environment ask for it).")
# Under SLURM jax gives each process only the GPU numbered SLURM_LOCALID (one process per GPU);
# a one-process-per-node job names all its GPUs here (launch/slurm.sbatch does).
_LOCAL_DEVICES = flags.DEFINE_list("local_device_ids", None, "This process's local device ids, "
                                   "e.g. 0,1,2,3 (default: jax's choice).")

flags.mark_flags_as_required(["config", "workdir"])


def _want_distributed() -> bool:
  if _DIST.value is not None:
    return _DIST.value
  if _COORD.value or os.environ.get("JAX_COORDINATOR_ADDRESS"):
    return True
  return int(os.environ.get("SLURM_NTASKS", "1")) > 1


class DoorError(ValueError):
  """A command line that cannot start a run; the message names the fix."""


def _config_arg(args: list[str]) -> str:
  for i, a in enumerate(args):
    if a.startswith("--config="):
      return a.split("=", 1)[1]
    if a == "--config" and i + 1 < len(args):
      return args[i + 1]
  return ""


def _overrides(args: list[str]) -> list[str]:
  """The dotted keys of the --config.<key>=value (or --config.<key> value) arguments."""
  out = []
  for a in args:
    if a.startswith("--config."):
      out.append(a[len("--config."):].split("=", 1)[0])
  return out


def _load_config_file(spec: str):
  """get_config(preset) of `spec` = PATH[:preset], the checks of the flag, one-line errors."""
  from mim_jax import config_lib
  path, preset = spec, ""
  head, sep, tail = spec.rpartition(":")
  if sep and head.endswith(".py") and "/" not in tail:
    path, preset = head, tail
  if not os.path.isfile(path):
    folder = os.path.dirname(path) or "."
    known = sorted(f for f in os.listdir(folder) if f.endswith(".py")) if os.path.isdir(folder) else []
    where = f"the configs in {folder}: {', '.join(known)}" if known else (
        "a file such as configs/simmim.py (run from the checkout, or give its path)")
    raise DoorError(f"--config={spec}: {path} does not exist; name one of {where}")
  module = config_lib.config_module(path)
  try:
    return module.get_config(preset or None)
  except ValueError as e:
    msg = str(e).splitlines()[0] if str(e) else type(e).__name__
    presets = getattr(module, "PRESETS", None)
    if presets and "use " not in msg:
      msg += f"; its presets are {', '.join(repr(p) for p in presets)}"
    raise DoorError(f"--config={spec}: {msg}") from None


def _check_key(config, dotted: str) -> None:
  """DoorError naming the valid (or closest) keys when config has no `dotted` key."""
  import difflib
  node, seen = config, "config"
  for part in dotted.split("."):
    keys = list(node.keys()) if hasattr(node, "keys") else []
    if part not in keys:
      close = difflib.get_close_matches(part, keys, n=3, cutoff=0.6)
      hint = (f"did you mean {' or '.join(f'--{seen}.{c}' for c in close)}?" if close else
              f"the keys of {seen} are {', '.join(sorted(keys))}" if keys else
              f"{seen} is a value, not a group of keys")
      raise DoorError(f"--config.{dotted}: {seen} has no key {part!r}; {hint}")
    node, seen = node[part], f"{seen}.{part}"


def parse_flags(argv: list[str]) -> list[str]:
  """absl's flag parsing with the errors a mistyped command line meets turned into one line
  naming the fix, exit code 2 and nothing written: a missing config file (the configs that
  exist), an unknown preset (the presets), an unknown --config.<key> (the closest or the
  valid keys), any other flag error."""
  try:
    spec = _config_arg(argv[1:])
    if spec:
      config = _load_config_file(spec)
      for key in _overrides(argv[1:]):
        _check_key(config, key)
    return flags.FLAGS(argv)
  except DoorError as e:
    print(f"error: {e}", file=sys.stderr)
  except flags.Error as e:
    msg = " ".join(str(e).split())
    print(f"error: {msg[:500]}; see --helpshort", file=sys.stderr)
  sys.exit(2)


def _quiet_libraries() -> None:
  """INFO logs (Orbax's, grain's, absl's, mim_jax's) only with --verbosity given; warnings
  and errors always show."""
  if not flags.FLAGS["verbosity"].present:
    logging.set_verbosity(logging.WARNING)


def _writable_workdir(workdir: str) -> None:
  if os.path.isdir(workdir):
    if not os.access(workdir, os.W_OK):
      raise DoorError(f"--workdir={workdir} is not writable: pick a directory you can write to")
    return
  parent = os.path.dirname(os.path.abspath(workdir))
  while parent and not os.path.exists(parent):
    parent = os.path.dirname(parent)
  if not (os.path.isdir(parent) and os.access(parent, os.W_OK)) or parent.startswith(("/proc", "/sys")):
    raise DoorError(f"--workdir={workdir} cannot be created ({parent} is not a writable "
                    f"directory): pick a directory you can write to")


def main(argv):
  del argv
  _quiet_libraries()
  try:
    _writable_workdir(_WORKDIR.value)
  except DoorError as e:
    print(f"error: {e}", file=sys.stderr)
    sys.exit(2)
  import jax
  if _want_distributed():
    kw = {}
    if _COORD.value:
      kw = dict(coordinator_address=_COORD.value, num_processes=_NPROC.value, process_id=_PID.value)
    if _LOCAL_DEVICES.value:
      try:
        kw["local_device_ids"] = [int(i) for i in _LOCAL_DEVICES.value]
      except ValueError:
        sys.exit(f"error: --local_device_ids={','.join(_LOCAL_DEVICES.value)}: give integers, "
                 "e.g. --local_device_ids=0,1,2,3")
    jax.distributed.initialize(**kw)
  from mim_jax import train  # after distributed init
  from mim_jax.checkpointing import CheckpointMismatchError
  from mim_jax.sharding import ShardingError
  from mim_jax.teachers import TeacherError
  config = _CONFIG.value
  workdir = _WORKDIR.value
  if logging.get_verbosity() >= 1:
    logging.info("config:\n%s", config)
  errors = (train.TrainingError, CheckpointMismatchError, ShardingError, TeacherError)
  try:
    from mim_jax.data.sources import DataError
    errors = errors + (DataError,)
  except ImportError:
    pass
  try:
    if _MODE.value == "train":
      summary = train.train_and_evaluate(config, workdir)
    else:
      summary = train.evaluate_only(config, workdir)
  except train.Preempted as e:
    print(str(e), file=sys.stderr)
    sys.exit(143)
  except errors as e:
    print(f"error: {e}", file=sys.stderr)
    sys.exit(2)
  if jax.process_index() == 0:
    _print_summary(summary, workdir)


def _print_summary(summary: dict, workdir: str) -> None:
  w = os.path.abspath(workdir)
  lines = [f"done: step {summary['step']}"]
  for k, v in sorted(summary["eval"].items()):
    lines.append(f"  {k} = {v:.4g}")
  lines += [f"  metrics:        {w}/metrics.jsonl",
            f"  checkpoints:    {w}/checkpoints",
            f"  eval results:   {w}/eval_results.json"]
  if os.path.exists(os.path.join(w, "reconstruction.png")):
    lines.append(f"  reconstruction: {w}/reconstruction.png")
  print("\n".join(lines))


if __name__ == "__main__":
  app.run(main, flags_parser=parse_flags)
