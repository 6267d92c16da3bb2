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
