"""Frozen networks read from other runs: teachers, tokenizers, perceptual feature extractors.

A method that needs one names its workdir in the config (e.g. `config.beit.tokenizer`). `load`
reads that run's `config.json`, rebuilds its method (so the architecture is the one it was
trained with) and restores the parameters and method state of a checkpoint, as host arrays.
The caller returns what it needs from `Method.external_state`, so the frozen weights travel in
the method state, are checkpointed with the run and receive no gradient.
"""
from __future__ import annotations

import dataclasses
import os
from typing import Any, Optional

import jax
import numpy as np

PyTree = Any


class TeacherError(RuntimeError):
  """A frozen network that cannot be loaded; the message says what to point at."""


@dataclasses.dataclass
class FrozenRun:
  config: Any            # the run's ml_collections config
  method: Any            # its Method (for its modules and helper functions)
  params: PyTree         # host arrays
  method_state: PyTree   # host arrays (EMA encoders, ...)
  step: int


def load(path: str, step: Optional[int] = None) -> FrozenRun:
  """The run in `path` (a workdir written by mim_jax.main) at checkpoint `step` (latest)."""
  import orbax.checkpoint as ocp
  from mim_jax import methods, train
  if not path:
    raise TeacherError("no workdir given for a frozen network: set the config key that names it "
                       "(e.g. --config.beit.tokenizer=/path/to/tokenizer_run)")
  if not os.path.isdir(path):
    raise TeacherError(f"{path} does not exist: train that run first (its README command) or "
                       f"point the config key at its workdir")
  config = train.load_run_config(path)
  directory = os.path.join(os.path.abspath(path), "checkpoints")
  mngr = ocp.CheckpointManager(directory, item_names=("state", "data", "meta"))
  try:
    step = mngr.latest_step() if step is None else step
    if step is None:
      raise TeacherError(f"no checkpoint in {directory}: train that run to the end first")
    restored = mngr.restore(step, args=ocp.args.Composite(state=ocp.args.StandardRestore()))
  finally:
    mngr.close()
  state = jax.tree.map(np.asarray, restored["state"])
  return FrozenRun(config, methods.get(config), state["params"], state.get("method_state", {}),
                   int(step))


def read_teacher_config(path: str, key: str, image_size: int, patch_size: int):
  """(config, encoder module) of the teacher run in `path`, named by config key `key` (e.g.
  'feature_mim.teacher'), read from its config.json without its checkpoint. Raises
  train.TrainingError naming `key` when the path is empty or not a workdir, or when the
  teacher's tokens are not on this run's grid (`image_size`, `patch_size`)."""
  from mim_jax import methods, train
  hint = ("train one first, e.g. `python -m mim_jax.main --config=configs/mae.py "
          f"--workdir=/tmp/mae`, then pass --config.{key}=/tmp/mae")
  if not path:
    raise train.TrainingError(f"config.{key} is empty: it names the workdir of the teacher run; {hint}")
  if not os.path.exists(os.path.join(path, "config.json")):
    raise train.TrainingError(f"config.{key}={path!r} is not a mim_jax workdir (no config.json): {hint}")
  config = train.load_run_config(path)
  ti, tp = config.input.image_size, config.model.patch_size
  if (ti, tp) != (image_size, patch_size):
    raise train.TrainingError(
        f"the teacher {path} was trained on {ti}px images in {tp}px patches, this run uses "
        f"{image_size}px in {patch_size}px: the targets must lie on the same patch grid; set "
        f"--config.input.image_size={ti} --config.model.patch_size={tp} or point config.{key} "
        f"at a run of this size")
  return config, methods.get(config).encoder


def load_teacher_encoder(path: str, key: str, which: str = "online") -> PyTree:
  """The encoder parameters (host arrays) of the teacher run in `path`: its online encoder or,
  for `which='ema'`, its EMA encoder; errors are train.TrainingError naming config key `key`."""
  from mim_jax import train
  try:
    run = load(path)
  except TeacherError as e:
    raise train.TrainingError(f"config.{key}: {e}") from None
  if which == "ema":
    if "ema_encoder" not in run.method_state:
      raise train.TrainingError(f"the teacher {path} has no EMA encoder: set "
                                f"--config.{key}_encoder=online")
    return run.method_state["ema_encoder"]
  return run.params["encoder"]


def renormalize(images, config, teacher_config):
  """Images normalised with `config.input`'s mean / std, re-normalised with the teacher run's."""
  import jax.numpy as jnp
  ms, ss = (np.asarray(config.input[k], np.float32) for k in ("mean", "std"))
  mt, st = (np.asarray(teacher_config.input[k], np.float32) for k in ("mean", "std"))
  if np.array_equal(ms, mt) and np.array_equal(ss, st):
    return images
  return images * jnp.asarray(ss / st) + jnp.asarray((ms - mt) / st)
