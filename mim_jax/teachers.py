"""Frozen networks read from other runs: teachers, tokenizers, perceptual feature extractors.

A method that needs one names its workdir in the config (e.g. `config.beit.tokenizer`). `load`
reads that run's `config.json`, rebuilds its method (so the architecture is the one it was
trained with) and restores the parameters and method state of a checkpoint, as host arrays.
The caller returns what it needs from `Method.external_state`, so the frozen weights travel in
the method state, are checkpointed with the run and receive no gradient.

Once a run has started it no longer needs those other workdirs (`frozen_runs`): its first start
copies each frozen run's config.json to `<workdir>/frozen/<config key>/config.json`, and every
restore of the run (resuming, --mode=eval, `Trainer.from_workdir`, `load` of the run itself)
rebuilds the frozen modules from that copy and gives `external_state` only the weights' shapes
(`jax.ShapeDtypeStruct`s), whose values then come from the run's own checkpoint. A tokenizer's
or teacher's workdir may be moved or deleted after the run it feeds has started.
"""
from __future__ import annotations

import contextlib
import contextvars
import dataclasses
import json
import os
import shutil
from typing import Any, Optional

import jax
import numpy as np
from absl import logging

from mim_jax import config_lib
from mim_jax.errors import TrainingError

PyTree = Any

FROZEN_DIR = "frozen"


class TeacherError(RuntimeError):
  """A frozen network that cannot be loaded; the message says what to point at."""


@dataclasses.dataclass
class FrozenRun:
  config: Any            # the run's ml_collections config
  method: Any            # its Method (for its modules and helper functions)
  params: PyTree         # host arrays (ShapeDtypeStructs while a run is restored)
  method_state: PyTree   # host arrays (EMA encoders, ...), likewise
  step: int              # its checkpoint's step (-1 when unknown)


@dataclasses.dataclass(frozen=True)
class _Context:
  workdir: str      # the run whose frozen runs are recorded / read
  restoring: bool   # its weights come from its own checkpoint: frozen weights as shapes only
  record: bool      # write the config copies (only the run being trained writes in its workdir)


_CONTEXT: contextvars.ContextVar = contextvars.ContextVar("mim_jax_frozen_runs", default=None)


@contextlib.contextmanager
def frozen_runs(workdir: str, restoring: bool, record: bool = True):
  """Within: the frozen runs a method reads belong to the run in `workdir`. A fresh start
  (`restoring=False`) reads them from their workdirs and copies their config.json into
  `workdir/frozen/<key>/`; a restore reads those copies (the frozen run's own workdir only for
  a run started before they were written) and gives `load` the weights' shapes only, since the
  values come from the restored checkpoint. `record=False` writes nothing (reading another run)."""
  with entered(_Context(os.path.abspath(workdir), bool(restoring), bool(record))):
    yield


def current_context() -> Optional[_Context]:
  """The active `frozen_runs` context (None outside one). A method keeps the one it was built
  in and re-enters it with `entered` wherever it reads a frozen run lazily."""
  return _CONTEXT.get()


@contextlib.contextmanager
def entered(ctx: Optional[_Context]):
  """Within: `ctx` (from `current_context`) is the active context again."""
  token = _CONTEXT.set(ctx)
  try:
    yield
  finally:
    _CONTEXT.reset(token)


def _record_dir(ctx: _Context, key: str) -> str:
  """Where the run of `ctx` records the frozen run its config key `key` names."""
  return os.path.join(ctx.workdir, FROZEN_DIR, key or "unnamed")


def _resolve(path: str, key: str) -> tuple:
  """(config, origin) of the frozen run in workdir `path`, named by this run's config key `key`:
  read from this run's record when it is being restored (origin = the record's folder, which
  also holds the frozen run's own records), else from `path` (origin = `path`), recording it on
  a fresh start. Raises TeacherError when `path` is not a workdir."""
  ctx = _CONTEXT.get()
  rec = _record_dir(ctx, key) if ctx is not None else ""
  if ctx is not None and ctx.restoring and os.path.exists(os.path.join(rec, "config.json")):
    source = os.path.join(rec, "source.json")
    if path and os.path.exists(source):
      with open(source) as f:
        started = json.load(f).get("workdir", "")
      if started and os.path.abspath(path) != started:
        logging.warning("config.%s=%s, but this run started on %s: it keeps that one (its "
                        "config recorded in %s, its weights in this run's checkpoint); start a "
                        "new workdir to use another", key, path, started, rec)
    return config_lib.load_run_config(rec), rec
  if not path:
    raise TeacherError("no workdir given for a frozen network: set the config key that names it "
                       "(e.g. --config.beit.tokenizer=/path/to/tokenizer_run)")
  if not os.path.exists(os.path.join(path, "config.json")):
    what = "does not exist" if not os.path.exists(path) else "is not a mim_jax workdir (no config.json)"
    raise TeacherError(f"{path} {what}: train that run first (its README command) or point the "
                       f"config key at its workdir")
  config = config_lib.load_run_config(path)
  if ctx is not None and ctx.record and jax.process_index() == 0:
    os.makedirs(rec, exist_ok=True)
    with open(os.path.join(rec, "config.json"), "w") as f:
      f.write(config.to_json_best_effort(indent=2))
    with open(os.path.join(rec, "source.json"), "w") as f:
      json.dump({"workdir": os.path.abspath(path), "key": key}, f, indent=2)
    # The frozen run's own records (a BEiT v2 tokenizer's teacher), for nested restores.
    own = os.path.join(path, FROZEN_DIR)
    if os.path.isdir(own):
      shutil.copytree(own, os.path.join(rec, FROZEN_DIR), dirs_exist_ok=True)
  return config, path


def run_config(path: str, key: str = ""):
  """The config of the frozen run in workdir `path`, named by this run's config key `key`
  (e.g. 'beit.tokenizer'): from this run's copy when it is being restored, else from `path`
  (recording the copy on a fresh start). Raises TeacherError when `path` is not a workdir."""
  return _resolve(path, key)[0]


def _abstract_state(method, config) -> tuple:
  """(params, method state) of `method` as ShapeDtypeStructs, as its trainer builds them."""
  size = int(config.input.image_size)
  dummy = jax.ShapeDtypeStruct((2, size, size, 3), np.float32)

  def init(rng, images):     # as the trainer builds them (a CNN's BatchNorm state included)
    variables = method.init_variables(rng, images)
    return variables["params"], method.initial_state(variables)

  params, mstate = jax.eval_shape(init, jax.random.PRNGKey(0), dummy)
  external = method.external_state()   # shapes too: the caller's restoring context is active
  return params, {**mstate, **external}


def is_abstract(tree: PyTree) -> bool:
  """Whether `tree` holds shapes only (a frozen run's weights while a run is restored)."""
  return any(isinstance(x, jax.ShapeDtypeStruct) for x in jax.tree.leaves(tree))


def host(tree: PyTree) -> PyTree:
  """`tree` as numpy arrays, ShapeDtypeStructs left as they are."""
  return jax.tree.map(lambda x: x if isinstance(x, jax.ShapeDtypeStruct) else np.asarray(x), tree)


def load(path: str, step: Optional[int] = None, key: str = "") -> FrozenRun:
  """The run in `path` (a workdir written by mim_jax.main) at checkpoint `step` (latest), read
  as this run's config key `key` names it. Within a restoring `frozen_runs` context the
  weights are ShapeDtypeStructs (the restore fills them) and the config is the recorded copy."""
  import orbax.checkpoint as ocp
  from mim_jax import methods
  config, origin = _resolve(path, key)
  ctx = _CONTEXT.get()
  if ctx is not None and ctx.restoring:
    # The frozen run's own frozen runs: from the records copied beside its config, or from
    # its workdir for a run started before records were kept.
    with frozen_runs(origin, restoring=True, record=False):
      method = methods.get(config)
      params, mstate = _abstract_state(method, config)
    return FrozenRun(config, method, params, mstate, -1)
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
  # Built as the run itself is restored: its frozen runs from its own records and checkpoint.
  with frozen_runs(path, restoring=True, record=False):
    method = methods.get(config)
  return FrozenRun(config, method, state["params"], state.get("method_state", {}), int(step))


def read_teacher_config(path: str, key: str, image_size: int, patch_size: int):
  """(config, encoder module) of the teacher run in `path`, named by config key `key` (e.g.
  'feature_mim.teacher'), read from its config.json without its checkpoint. Raises
  TrainingError naming `key` when the path is empty or not a workdir, or when the
  teacher's tokens are not on this run's grid (`image_size`, `patch_size`)."""
  from mim_jax import methods
  hint = ("train one first, e.g. `python -m mim_jax.main --config=configs/mae.py "
          f"--workdir=/tmp/mae`, then pass --config.{key}=/tmp/mae")
  try:
    config = run_config(path, key)
  except TeacherError:
    if not path:
      raise TrainingError(f"config.{key} is empty: it names the workdir of the teacher run; "
                                f"{hint}") from None
    raise TrainingError(f"config.{key}={path!r} is not a mim_jax workdir (no config.json): "
                              f"{hint}") from None
  ti, tp = config.input.image_size, config.model.patch_size
  if (ti, tp) != (image_size, patch_size):
    raise TrainingError(
        f"the teacher {path} was trained on {ti}px images in {tp}px patches, this run uses "
        f"{image_size}px in {patch_size}px: the targets must lie on the same patch grid; set "
        f"--config.input.image_size={ti} --config.model.patch_size={tp} or point config.{key} "
        f"at a run of this size")
  return config, methods.get(config).encoder


def load_teacher_encoder(path: str, key: str, which: str = "online") -> PyTree:
  """The encoder parameters (host arrays) of the teacher run in `path`: its online encoder or,
  for `which='ema'`, its EMA encoder; errors are TrainingError naming config key `key`."""
  try:
    run = load(path, key=key)
  except TeacherError as e:
    raise TrainingError(f"config.{key}: {e}") from None
  if which == "ema":
    if "ema_encoder" not in run.method_state:
      raise TrainingError(f"the teacher {path} has no EMA encoder: set "
                                f"--config.{key}_encoder=online")
    return run.method_state["ema_encoder"]
  return run.params["encoder"]


def encoder_variables(run: FrozenRun, which: str = "online") -> dict:
  """The Flax variables of a frozen run's encoder: its parameters ('online', or its EMA
  encoder for 'ema') with their non-param collections (a ResNet teacher's BatchNorm running
  statistics, read at evaluation mode), as `teacher.method.encoder.apply` takes them."""
  encoders = run.method.encoder_variables(run.params, run.method_state or {})
  if which not in encoders:
    raise TrainingError(f"the teacher run has no {which} encoder: use one of {sorted(encoders)}")
  return encoders[which]


def renormalize(images, config, teacher_config):
  """Images normalised with `config.input`'s mean / std, re-normalised with the teacher run's."""
  import jax.numpy as jnp
  ms, ss = (np.asarray(config.input[k], np.float32) for k in ("mean", "std"))
  mt, st = (np.asarray(teacher_config.input[k], np.float32) for k in ("mean", "std"))
  if np.array_equal(ms, mt) and np.array_equal(ss, st):
    return images
  return images * jnp.asarray(ss / st) + jnp.asarray((ms - mt) / st)
