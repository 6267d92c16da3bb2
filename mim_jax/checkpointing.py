"""Orbax checkpoints: async saves every `ckpt_every` steps, keep the last N, preemption saves,
the data iterator's state beside the model, and restores into the current mesh's shardings.

A checkpoint directory `<workdir>/checkpoints/<step>/` holds three items:
  state   the train state pytree (params, opt_state, method state, step, rng);
  data    the grain iterator state of this process (skipped when the loader has none);
  meta    JSON: the method/model identity (`Method.describe()`) and the step.
"""
from __future__ import annotations

import json
import os
import re
from typing import Any, Optional

import jax
import orbax.checkpoint as ocp
from absl import logging

from mim_jax import models

PyTree = Any


class CheckpointMismatchError(RuntimeError):
  pass


def _diff(a: dict, b: dict, prefix: str = "") -> list[str]:
  out = []
  for k in sorted(set(a) | set(b)):
    va, vb = a.get(k, "<absent>"), b.get(k, "<absent>")
    if isinstance(va, dict) and isinstance(vb, dict):
      out += _diff(va, vb, f"{prefix}{k}.")
    elif va != vb:
      out.append(f"{prefix}{k}: checkpoint {va!r} vs config {vb!r}")
  return out


# How the model is computed, not what it is: a checkpoint resumes and evaluates across these
# (a run started with XLA attention continues with cuDNN on a GPU; keys added later default).
# Each model module lists its own (models.execution_keys); these are the ViT's.
EXECUTION_KEYS = models.execution_keys({"name": "vit"})


def _jsonable(x):
  return json.loads(json.dumps(x, default=lambda o: list(o) if isinstance(o, tuple) else str(o)))


class Checkpointer:
  """Thin wrapper over `ocp.CheckpointManager` with the three items above."""

  def __init__(self, workdir: str, *, keep: int, async_save: bool = True):
    self.directory = os.path.join(os.path.abspath(workdir), "checkpoints")
    opts = ocp.CheckpointManagerOptions(max_to_keep=keep, create=True,
                                        enable_async_checkpointing=async_save)
    self.manager = ocp.CheckpointManager(self.directory, options=opts,
                                         item_names=("state", "data", "meta"))

  def latest_step(self) -> Optional[int]:
    return self.manager.latest_step()

  def save(self, step: int, state: PyTree, data_iter: Any, meta: dict, *, force: bool = False) -> bool:
    from mim_jax.data import pipeline  # grain is imported lazily there
    items = dict(state=ocp.args.StandardSave(state), meta=ocp.args.JsonSave(_jsonable(meta)))
    if data_iter is not None and hasattr(data_iter, "get_state"):
      items["data"] = pipeline.checkpoint_args_save(data_iter)
    return self.manager.save(step, args=ocp.args.Composite(**items), force=force)

  def check_meta(self, step: int, meta: dict) -> None:
    saved = self.manager.restore(step, args=ocp.args.Composite(meta=ocp.args.JsonRestore()))["meta"]
    want = _jsonable(meta)
    saved_model, want_model = saved.get("model", {}), want.get("model", {})
    # Checkpoints written before config.model.name existed hold a ViT.
    if isinstance(saved_model.get("model"), dict):
      saved_model = {**saved_model, "model": {"name": models.DEFAULT, **saved_model["model"]}}
    execution = set(EXECUTION_KEYS)
    if isinstance(want_model.get("model"), dict):
      execution |= set(models.execution_keys(want_model["model"]))
    diffs = [d for d in _diff(saved_model, want_model) if d.split(":")[0] not in execution]
    if diffs:
      raise CheckpointMismatchError(
          f"{self.directory} holds a checkpoint of a different model ({'; '.join(diffs[:3])}): "
          f"use a new --workdir, or delete that directory to start over")

  def restore(self, step: int, abstract_state: PyTree, data_iter: Any, meta: dict) -> PyTree:
    """Restores into `abstract_state` (ShapeDtypeStructs carrying the target shardings), so a
    checkpoint written under one mesh loads under another."""
    from mim_jax.data import pipeline
    self.check_meta(step, meta)
    items = dict(state=ocp.args.StandardRestore(abstract_state))
    if data_iter is not None and hasattr(data_iter, "set_state"):
      if not self._restore_data_of_other_process_count(step, data_iter):
        items["data"] = pipeline.checkpoint_args_restore(data_iter)
    try:
      out = self.manager.restore(step, args=ocp.args.Composite(**items))
    except (ValueError, KeyError, TypeError) as e:
      first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
      raise CheckpointMismatchError(
          f"{self.directory}/{step} does not match this config's model ({first[:200]}): "
          f"use a new --workdir, or delete that directory to start over") from e
    logging.info("restored checkpoint %s/%d", self.directory, step)
    return out["state"]

  def _restore_data_of_other_process_count(self, step: int, data_iter: Any) -> bool:
    """Sets the data position of a checkpoint written by another number of processes.

    grain saves one file per process (`data/process_<i>-of-<n>.json`); a run with another
    process count finds none of its own. The in-memory loader samples the global batch order
    (one shard, `shard_count=1`), so every process's file holds the same position and any of
    them resumes it exactly. A streaming loader's positions are per shard: that is an error
    naming the process count to resume with. Returns False when this process's own file
    exists (the normal path)."""
    d = os.path.join(self.directory, str(step), "data")
    mine = f"process_{jax.process_index()}-of-{jax.process_count()}.json"
    if not os.path.isdir(d) or os.path.exists(os.path.join(d, mine)):
      return False
    saved = sorted(f for f in os.listdir(d) if re.fullmatch(r"process_\d+-of-\d+\.json", f))
    if not saved:
      return False
    with open(os.path.join(d, saved[0])) as f:
      state = f.read()
    writers = saved[0].split("-of-")[1].split(".")[0]
    shards = re.search(r"shard_count=(\d+)", json.loads(state).get("sampler", ""))
    if shards is None or int(shards.group(1)) != 1:
      raise CheckpointMismatchError(
          f"{d} holds the data positions of {writers} processes and this run has "
          f"{jax.process_count()}: resume this streaming-data run with {writers} processes")
    data_iter.set_state(state.encode())
    if hasattr(data_iter, "start_prefetch"):
      data_iter.start_prefetch()
    logging.info("data position of step %d taken from %s (written by %s processes)", step,
                 saved[0], writers)
    return True

  def wait(self) -> None:
    self.manager.wait_until_finished()

  def close(self) -> None:
    self.manager.wait_until_finished()
    self.manager.close()


def abstract_with_shardings(tree: PyTree, shardings: PyTree) -> PyTree:
  return jax.tree.map(lambda x, s: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=s), tree, shardings)
