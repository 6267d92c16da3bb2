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


def main(argv):
  del argv
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
  app.run(main)
