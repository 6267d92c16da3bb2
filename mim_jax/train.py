"""The one trainer: mesh, data, state, one jitted and sharded step, the loop, evals, checkpoints.

Every method runs through `train_and_evaluate`; a method only supplies its parameters, extra
state, loss and state update (see `mim_jax.methods.base.Method`). Notebooks can call the pieces
(`Trainer.create`, `Trainer.step`, `Trainer.evaluate`) directly.
"""
from __future__ import annotations

import dataclasses
import math
import os
import signal
import time
from typing import Any, Optional

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import optax
from absl import logging

from mim_jax import (checkpointing, config_lib, errors, methods, metric_writers, models, optim,
                     sharding, teachers)
from mim_jax.data import preprocess as data_preprocess

PyTree = Any


# Kept importable from here for notebooks and tools; they live below the trainer.
TrainingError = errors.TrainingError
crop_or_resize = data_preprocess.crop_or_resize
preprocess = data_preprocess.preprocess
denormalize_uint8 = data_preprocess.denormalize_uint8


class Preempted(Exception):
  """Raised after the preemption checkpoint is written (SIGTERM)."""

  def __init__(self, step: int, path: str):
    super().__init__(f"preempted: saved step {step} to {path}; rerun the same command to resume")
    self.step = step


# ---------------------------------------------------------------------------------------------
# The train state and the step.

total_and_epoch_steps = optim.total_steps


def _split_aux(aux: dict):
  """The loss's aux -> (logged metrics, 'state_stats', 'state_append', 'collections')."""
  aux = dict(aux)
  return (aux, aux.pop("state_stats", None), aux.pop("state_append", None),
          aux.pop("collections", None))


def merge_collections(state: PyTree, new: Optional[dict]) -> PyTree:
  """The method state with the models' collections replaced where `new` ({collection:
  {module: tree}}, from a loss's aux['collections']) has them."""
  if not new:
    return state
  cols = dict(state.get("collections", {}))
  for col, modules in new.items():
    if col not in cols:
      raise TrainingError(f"the loss returned the collection {col!r} that init_variables did not "
                          f"create: return it from the method's init_variables")
    cols[col] = {**cols[col], **modules}
  return {**state, "collections": cols}


def batch_fields(method, batch: dict) -> dict:
  """The batch fields the method's loss reads (Method.batch_fields), as keyword arguments."""
  fields = {}
  for name in getattr(method, "batch_fields", ()):
    if name not in batch:
      raise TrainingError(f"the {method.name} method reads the batch field {name!r}, which this "
                          f"input pipeline does not give (it gives {sorted(batch)})")
    fields[name] = batch[name]
  return fields


def split_adversary(tree: dict, keys) -> tuple[dict, dict]:
  """(the main optimiser's entries, the adversary's entries `keys`) of a top-level tree."""
  return ({k: v for k, v in tree.items() if k not in keys}, {k: tree[k] for k in keys})


def make_train_step(method, tx, schedule, input_cfg, on_device_aug: bool, grad_accum: int,
                    adversary_tx=None):
  """The pure step (state, batch) -> (state, metrics); the trainer jits it with shardings.

  Gradient accumulation splits the batch into `grad_accum` micro-batches (a scan): the loss,
  the logged aux values, the gradients and 'state_stats' are averaged; 'state_append' records
  are concatenated in batch order; the models' 'collections' (BatchNorm running statistics)
  are threaded through the micro-batches in order. With `adversary_tx` (a method with
  `adversary_keys`), the adversary's parameters take their step first, on
  `method.adversary_loss`, and the main loss then sees the updated adversary.
  """
  adv_keys = tuple(getattr(method, "adversary_keys", ()) or ())

  def loss_fn(params, mstate, images, fields, rng, step):
    loss, aux = method.loss(params, mstate, images, rng, step, **fields)
    return loss, _split_aux(aux)

  grad_fn = jax.value_and_grad(loss_fn, has_aux=True)

  def accumulate(grad_fn, params, mstate, images, fields, rng, step):
    """(loss, logged aux, stats, appended, collections, grads) over the micro-batches."""
    if grad_accum == 1:
      (loss, (aux, stats, app, cols)), grads = grad_fn(params, mstate, images, fields, rng, step)
      return loss, aux, stats, app, cols, grads
    b = jax.tree.leaves(images)[0].shape[0]
    if b % grad_accum:
      raise TrainingError(f"batch {b} is not divisible by config.optim.grad_accum={grad_accum}")
    # `images` may be a pytree (several views of the batch): split each leaf.
    split = lambda x: x.reshape((grad_accum, b // grad_accum) + x.shape[1:])  # noqa: E731
    micro, micro_fields = jax.tree.map(split, images), jax.tree.map(split, fields)

    def one(cols, i, x, f):
      ms = merge_collections(mstate, cols)
      return grad_fn(params, ms, x, f, jax.random.fold_in(rng, i), step)

    first = jax.tree.map(lambda x: x[0], (micro, micro_fields))
    (l0, (a0, s0, _, c0)), g0 = jax.eval_shape(one, None, 0, *first)
    zeros = jax.tree.map(lambda s: jnp.zeros(s.shape, s.dtype), (l0, a0, s0, g0))
    # The first micro-batch starts from the state's own collections.
    cols0 = None if c0 is None else {col: {m: mstate["collections"][col][m] for m in mods}
                                     for col, mods in c0.items()}

    def body(carry, i_x_f):
      sums, cols = carry
      i, x, f = i_x_f
      (l, (a, st, app, new_cols)), g = one(cols, i, x, f)
      return (jax.tree.map(jnp.add, sums, (l, a, st, g)), new_cols), app

    ((loss, aux, stats, grads), cols), apps = jax.lax.scan(
        body, (zeros, cols0), (jnp.arange(grad_accum), micro, micro_fields))
    loss, aux, stats, grads = jax.tree.map(lambda x: x / grad_accum, (loss, aux, stats, grads))
    if apps is not None:   # [k, b/k, ...] -> [b, ...]: batch order
      apps = jax.tree.map(lambda x: x.reshape((b,) + x.shape[2:]), apps)
    return loss, aux, stats, apps, cols, grads

  def adversary_step(state, params, mstate, images, fields, rng, step):
    """One optimiser step of the adversary's parameters (params[k] for k in adv_keys) on
    `method.adversary_loss`, the other parameters held fixed."""
    def adv_loss(adv, ms, x, f, r, st):
      loss, aux = method.adversary_loss({**params, **adv}, ms, x, r, st, **f)
      return loss, _split_aux(aux)
    _, adv = split_adversary(params, adv_keys)
    g = jax.value_and_grad(adv_loss, has_aux=True)
    loss, aux, _, _, cols, grads = accumulate(g, adv, mstate, images, fields, rng, step)
    updates, opt_state = adversary_tx.update(grads, state["adversary_opt_state"], adv)
    adv = optax.apply_updates(adv, updates)
    metrics = {"adversary/loss": loss, **{f"adversary/{k}": v for k, v in aux.items()}}
    return {**params, **adv}, merge_collections(mstate, cols), opt_state, metrics

  def step_fn(state, batch):
    step = state["step"]
    rng = jax.random.fold_in(state["rng"], step)
    aug_rng, loss_rng = jax.random.split(rng)
    images = batch["image"]
    # The named scopes only label the compiled ops (profiles: benchmarks/speed.py --profile).
    with jax.named_scope("input"):
      if "offset" in batch:   # input.device_resize: host-decoded regions, resampled here
        from mim_jax.data import augment  # pylint: disable=g-import-not-at-top
        regions = augment.unpack_regions(images, batch["offset"], batch["valid"],
                                         int(input_cfg.device_resize))
        images = augment.resize_regions(regions, batch["box"], batch["valid"], batch["flip"],
                                        input_cfg.image_size)
      images = method.preprocess(aug_rng, images, input_cfg, on_device_aug)
    params, mstate = state["params"], state["method_state"]
    fields = batch_fields(method, batch)
    new = dict(state)
    adv_metrics = {}
    if adv_keys:
      with jax.named_scope("adversary"):
        params, mstate, new["adversary_opt_state"], adv_metrics = adversary_step(
            state, params, mstate, images, fields, jax.random.fold_in(loss_rng, 1), step)
    loss, aux, stats, appended, cols, grads = accumulate(grad_fn, params, mstate, images, fields,
                                                         loss_rng, step)
    # Batch statistics a method's state update needs (e.g. iBOT's centre: the mean teacher
    # output) come back in aux under 'state_stats'; with gradient accumulation they are the
    # mean over the micro-batches, like the loss.
    mstate = merge_collections(mstate, cols)
    # The main optimiser owns the other parameters only.
    main, _ = split_adversary(params, adv_keys)
    grads, _ = split_adversary(grads, adv_keys)
    with jax.named_scope("optimizer"):
      updates, opt_state = tx.update(grads, state["opt_state"], main)
      params = {**params, **optax.apply_updates(main, updates)}
    with jax.named_scope("method_state"):
      if appended is None:
        mstate = method.update_state(params, mstate, step, stats)
      else:
        mstate = method.update_state(params, mstate, step, stats, appended=appended)
    with jax.named_scope("metrics"):
      metrics = {"loss": loss, "lr": schedule(step), "grad_norm": optax.tree.norm(grads),
                 **{f"aux/{k}": v for k, v in aux.items()}, **adv_metrics}
    if "bad" in batch:
      metrics["data/bad_images"] = jnp.sum(batch["bad"])
    new.update(step=step + 1, params=params, opt_state=opt_state, method_state=mstate)
    return new, metrics

  return step_fn


def build_state_and_step(config, method, mesh, schedule, on_device_aug: bool,
                         total_steps: Optional[int] = None, steps_per_epoch: int = 1):
  """The initial train state on `mesh`, its shardings, the batch sharding and the jitted step
  (shared by `Trainer.create` and benchmarks/speed.py, so the benchmark times this step)."""
  dummy = method.init_input()
  prng, srng = jax.random.split(jax.random.PRNGKey(config.seed))
  # The weight-decay mask and the parameter groups depend only on the parameters' structure,
  # so one optimiser built from their shapes serves both the initial state and the step.
  param_shapes = jax.eval_shape(method.init_variables, prng, dummy)["params"]
  adv_keys = tuple(getattr(method, "adversary_keys", ()) or ())
  main_shapes, adv_shapes = split_adversary(param_shapes, adv_keys)
  spe = max(1, steps_per_epoch)
  try:
    tx = optim.make_optimizer(config.optim, schedule, method.decay_mask(main_shapes), total_steps,
                              groups=method.param_groups(), steps_per_epoch=spe,
                              peak_lr=optim.peak_lr(config.optim, config.input.batch_size),
                              model_cfg=config.model)
    adversary_tx = None
    if adv_keys:
      adv_cfg = method.adversary_optim_config()
      adv_schedule = optim.make_schedule(adv_cfg, config.input.batch_size, spe, total_steps or 0)
      adversary_tx = optim.make_optimizer(adv_cfg, adv_schedule, method.decay_mask(adv_shapes),
                                          total_steps, steps_per_epoch=spe)
  except ValueError as e:
    raise TrainingError(str(e)) from None

  # Frozen weights read from other runs (a tokenizer, a teacher) enter the method state after
  # the jitted init, so they are never baked into the program as constants.
  # While a run is restored they are shapes only (teachers.frozen_runs): the checkpoint holds them.
  external = method.external_state()

  def init_fn(prng, srng):
    variables = method.init_variables(prng, dummy)
    params = variables["params"]
    mstate = {**method.initial_state(variables),
              **jax.tree.map(lambda x: jnp.zeros(x.shape, x.dtype), external)}
    main, adv = split_adversary(params, adv_keys)
    state = dict(step=jnp.zeros((), jnp.int32), params=params, opt_state=tx.init(main),
                 method_state=mstate, rng=srng)
    if adv_keys:
      state["adversary_opt_state"] = adversary_tx.init(adv)
    return state

  shapes = jax.eval_shape(init_fn, prng, srng)
  state_sh = sharding.tree_shardings(mesh, shapes, config.sharding_rules)
  state = jax.jit(init_fn, out_shardings=state_sh)(prng, srng)
  if external and not teachers.is_abstract(external):
    placed = jax.device_put(external, {k: state_sh["method_state"][k] for k in external})
    state = dict(state, method_state={**state["method_state"], **placed})
  step_fn = make_train_step(method, tx, schedule, config.input, on_device_aug,
                            int(config.optim.get("grad_accum", 1)), adversary_tx)
  batch_sh = sharding.batch_sharding(mesh)
  metrics_sh = sharding.replicated(mesh)
  jitted = jax.jit(step_fn, in_shardings=(state_sh, batch_sh), out_shardings=(state_sh, metrics_sh),
                   donate_argnums=(0,))
  return state, state_sh, batch_sh, jitted


load_run_config = config_lib.load_run_config


# ---------------------------------------------------------------------------------------------

@dataclasses.dataclass
class Trainer:
  """Everything one run needs, built from a config; usable from a notebook."""
  config: ml_collections.ConfigDict
  method: Any
  mesh: Any
  loader: Any
  state: PyTree
  state_shardings: PyTree
  batch_sharding: Any
  step_fn: Any
  total_steps: int
  steps_per_epoch: int
  on_device_aug: bool
  _batch_spec: Any = None

  @classmethod
  def create(cls, config, *, devices=None) -> "Trainer":
    from mim_jax.data import pipeline
    jax.config.update("jax_threefry_partitionable", True)
    try:
      models.check_config(config.model)
    except ValueError as e:
      raise TrainingError(str(e)) from None
    method = methods.get(config)
    mesh = sharding.make_mesh(config.mesh, devices)
    sharding.check_batch(config.input.batch_size, mesh)
    local = [d for d in mesh.devices.flat if d.process_index == jax.process_index()]
    loader = pipeline.make_train_loader(config.input, seed=config.seed,
                                        process_index=jax.process_index(),
                                        process_count=jax.process_count(),
                                        device_groups=len(local), views=method.train_views())
    on_device_aug = bool(getattr(loader, "on_device_aug", False))
    spe = pipeline.steps_per_epoch(config.input)
    total = optim.total_steps(config, spe)
    schedule = optim.make_schedule(config.optim, config.input.batch_size, spe, total)
    state, state_sh, batch_sh, jitted = build_state_and_step(config, method, mesh, schedule,
                                                             on_device_aug, total, spe)
    return cls(config, method, mesh, loader, state, state_sh, batch_sh, jitted, total, spe,
               on_device_aug)

  @classmethod
  def from_workdir(cls, workdir: str, *, step: Optional[int] = None, overrides: Optional[dict] = None,
                   devices=None) -> "Trainer":
    """The run saved in `workdir`: its config.json (with dotted-key `overrides`, e.g.
    {'input.batch_size': 64}), restored from checkpoint `step` (default: the latest)."""
    config = load_run_config(workdir, overrides)
    ckpt = checkpointing.Checkpointer(workdir, keep=config.keep_ckpts)
    step = ckpt.latest_step() if step is None else step
    if step is None:
      raise TrainingError(f"no checkpoint in {ckpt.directory}: train first (or point at a trained run)")
    with teachers.frozen_runs(workdir, restoring=True, record=False):
      tr = cls.create(config, devices=devices)
    tr.restore(ckpt, step, with_data=False)
    ckpt.close()
    return tr

  def restore(self, ckpt: checkpointing.Checkpointer, step: int, with_data: bool = True) -> None:
    """Loads checkpoint `step` into this trainer's shardings (any mesh), and the data
    iterator's position when `with_data`; refuses a checkpoint of another model."""
    abstract = checkpointing.abstract_with_shardings(self.state, self.state_shardings)
    self.state = ckpt.restore(step, abstract, self.loader if with_data else None,
                              {"model": self.method.describe()})

  def next_batch(self) -> dict:
    batch = next(self.loader)
    return sharding.host_to_global(batch, self.batch_sharding)

  def step(self):
    batch = self.next_batch()
    if self._batch_spec is None:
      self._batch_spec = jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=x.sharding), batch)
    self.state, metrics = self.step_fn(self.state, batch)
    return metrics

  def flops_per_step(self) -> Optional[float]:
    """FLOPs of one training step of the whole global batch, from XLA's cost analysis of the
    step as lowered (forward, backward and update; any method), None before the first step
    or when the backend gives no count."""
    if self._batch_spec is None:
      return None
    state_spec = jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=x.sharding),
                              self.state)
    cost = self.step_fn.lower(state_spec, self._batch_spec).cost_analysis()
    if isinstance(cost, (list, tuple)):
      cost = cost[0] if cost else None
    flops = (cost or {}).get("flops")
    return float(flops) if flops and flops > 0 else None

  # -- evaluation ---------------------------------------------------------------------------
  def eval_context(self, workdir: str, step: int):
    from mim_jax import evaluators
    from mim_jax.data import pipeline, video
    cfg, method, mesh = self.config, self.method, self.mesh
    ndev = mesh.devices.size
    chunk = int(math.ceil(256 / ndev) * ndev)
    rep = sharding.replicated(mesh)
    prep = lambda x: method.eval_preprocess(x, cfg.input)  # noqa: E731

    def jit_eval(fn):
      return jax.jit(fn, in_shardings=(self.state_shardings["params"], self.state_shardings["method_state"],
                                       self.batch_sharding), out_shardings=rep)

    feat_fn = jit_eval(lambda p, s, x: method.features(p, s, prep(x)))
    params, mstate = self.state["params"], self.state["method_state"]

    def run_padded(fn, images):
      def global_batch(x):
        local = np.split(x, jax.process_count())[jax.process_index()]
        return fn(sharding.host_to_global(local, self.batch_sharding))
      return evaluators.map_padded(global_batch, images, chunk)

    def encode(images):
      return run_padded(lambda x: feat_fn(params, mstate, x), images)

    layer_fns, token_fn, loss_fns = {}, [], {}

    def encode_layers(images, pooling):
      if pooling not in layer_fns:
        layer_fns[pooling] = jit_eval(lambda p, s, x: method.layer_features(p, s, prep(x), pooling))
      return run_padded(lambda x: layer_fns[pooling](params, mstate, x), images)

    def encode_tokens(images):
      if not token_fn:
        token_fn.append(jit_eval(lambda p, s, x: method.token_features(p, s, prep(x))))
      return run_padded(lambda x: token_fn[0](params, mstate, x), images)

    def loss(images, seed):
      """The training loss (same masking rule, its own seed) of each image, no augmentation:
      [B] float; for held-out vs training loss (data-scaling analysis)."""
      if seed not in loss_fns:
        def per_image(p, s, x):
          x = prep(x)
          rngs = jax.random.split(jax.random.PRNGKey(seed), x.shape[0])
          one = lambda xi, r: method.loss(p, s, xi[None], r, self.state["step"])[0]  # noqa: E731
          return jax.lax.map(lambda xr: one(*xr), (x, rngs), batch_size=64)
        loss_fns[seed] = jit_eval(per_image)
      return run_padded(lambda x: loss_fns[seed](params, mstate, x), images)

    reconstruct = None
    if type(method).reconstruct is not methods.base.Method.reconstruct:
      rec_fn = jax.jit(lambda p, s, x, r: method.reconstruct(p, s, prep(x), r),
                       out_shardings=rep)

      def reconstruct_images(images, seed):
        x = sharding.host_to_global(np.asarray(images), rep)
        out = rec_fn(params, mstate, x, jax.random.PRNGKey(seed))
        res = {k: denormalize_uint8(v, cfg.input) for k, v in out.items()}
        res["input"] = np.asarray(images, np.uint8)
        return res
      reconstruct = reconstruct_images

    return evaluators.EvalContext(
        encode=encode,
        batches=lambda split, bs, limit=None: pipeline.eval_batches(cfg.input, split, bs, limit),
        num_classes=pipeline.num_classes(cfg.input),
        reconstruct=reconstruct, picture_titles=method.picture_titles,
        workdir=workdir, step=step, encode_layers=encode_layers,
        encode_tokens=encode_tokens, loss=None if method.batch_fields else loss,
        pooling=getattr(method, "pooling", None),
        prefix_tokens=models.prefix_tokens(cfg.model),
        view_batches=(lambda split, bs, limit=None: pipeline.eval_batches(
            cfg.input, split, bs, limit, views=True))
        if video.test_views(cfg.input.data) != (1, 1) else None)

  def evaluate(self, workdir: str) -> dict:
    from mim_jax import evaluators
    step = int(jax.device_get(self.state["step"]))
    ctx = self.eval_context(workdir, step)
    results = evaluators.run_all(self.config.evals, ctx)
    if jax.process_index() == 0:
      evaluators.write_results(workdir, results, step)
    return results


# ---------------------------------------------------------------------------------------------
# The loop.

def _any_process(flag: bool) -> bool:
  from jax.experimental import multihost_utils
  return bool(np.any(multihost_utils.process_allgather(np.asarray(flag))))


def train_and_evaluate(config: ml_collections.ConfigDict, workdir: str, *, devices=None,
                       stop_after: Optional[int] = None, progress: bool = True) -> dict:
  """Trains (resuming from `workdir` if it holds a checkpoint), evaluates, returns a summary.

  `stop_after` ends the loop early at that step, as a preemption would (tests use it).
  """
  os.makedirs(workdir, exist_ok=True)
  ckpt = checkpointing.Checkpointer(workdir, keep=config.keep_ckpts)
  latest = ckpt.latest_step()
  # A fresh start records the frozen runs it reads; a resume rebuilds them from those records.
  with teachers.frozen_runs(workdir, restoring=latest is not None):
    tr = Trainer.create(config, devices=devices)
  meta = {"model": tr.method.describe()}
  start = 0
  if latest is not None:
    tr.restore(ckpt, latest)
    start = int(jax.device_get(tr.state["step"]))
    logging.info("resuming from step %d", start)
  if jax.process_index() == 0:
    with open(os.path.join(workdir, "config.json"), "w") as f:
      f.write(config.to_json_best_effort(indent=2))
    if progress:
      print("\n".join(run_header(tr, workdir, start)), flush=True)

  tb_cfg = config.get("tensorboard", {}) or {}
  writer = metric_writers.MetricsWriter(workdir, tensorboard=bool(tb_cfg.get("enabled", True)))
  peak = metric_writers.device_peak_flops(tr.mesh.devices.flat[0], float(tb_cfg.get("peak_tflops", 0.0)))
  flops_per_step = None
  profile = tuple(config.get("profile_steps", ()) or ())
  if profile and (len(profile) != 2 or not 0 <= int(profile[0]) < int(profile[1])):
    raise TrainingError(f"config.profile_steps={profile!r}: give (first, last) steps with "
                        "first < last, e.g. --config.profile_steps='(10, 15)'")
  tracing = False
  skipped = int(getattr(tr.loader, "num_skipped", 0))
  if skipped:
    logging.warning("%d unreadable images were skipped while loading the training data", skipped)
  writer.write({"step": start, "data/skipped_at_load": skipped, "steps_per_epoch": tr.steps_per_epoch,
                "total_steps": tr.total_steps})
  stop = {"flag": False}
  old_handler = None
  if hasattr(signal, "SIGTERM"):
    def on_term(signum, frame):
      stop["flag"] = True
    try:
      old_handler = signal.signal(signal.SIGTERM, on_term)
    except ValueError:  # not the main thread (e.g. a notebook worker)
      old_handler = None

  bar = None
  if progress and jax.process_index() == 0:
    from tqdm import auto as tqdm
    bar = tqdm.tqdm(total=tr.total_steps, initial=start, desc=f"{config.method} train",
                    unit="step", dynamic_ncols=True)

  pending: list = []
  t_last, step_last = time.perf_counter(), start
  last_good = latest
  bad_total = 0
  step = start
  try:
    while step < tr.total_steps:
      if profile and step == int(profile[0]) and jax.process_index() == 0:
        jax.profiler.start_trace(os.path.join(workdir, "profile"))
        tracing = True
      metrics = tr.step()
      step += 1
      if tracing and step >= int(profile[1]):
        jax.block_until_ready(metrics)
        jax.profiler.stop_trace()
        tracing = False
        logging.info("profile of steps %d-%d written to %s", int(profile[0]), step,
                     os.path.join(workdir, "profile"))
      pending.append(metrics)
      if bar is not None:
        bar.update(1)
      want_log = step % config.log_every == 0 or step == tr.total_steps
      want_ckpt = step % config.ckpt_every == 0 or step == tr.total_steps
      preempt = stop["flag"] or (stop_after is not None and step >= stop_after)
      if jax.process_count() > 1:
        # Processes agree at log steps only (every process reaches those), so one that got
        # SIGTERM first waits for the next log step instead of deadlocking the others.
        preempt = want_log and _any_process(preempt)
      if want_log or want_ckpt or preempt:
        fetched = jax.device_get(pending)
        pending = []
        losses = [float(m["loss"]) for m in fetched]
        if not all(math.isfinite(v) for v in losses):
          where = "no checkpoint yet" if last_good is None else f"last good checkpoint: step {last_good} in {ckpt.directory}"
          raise TrainingError(f"loss is {losses[-1]} at step {step} ({where}): lower "
                              f"config.optim.base_lr or enable config.optim.clip_grad")
        bad_total += sum(int(m.get("data/bad_images", 0)) for m in fetched)
        if want_log:
          now = time.perf_counter()
          ips = (step - step_last) * config.input.batch_size / max(now - t_last, 1e-9)
          t_last, step_last = now, step
          rec = {"step": step, "loss": float(np.mean(losses)), "loss_last": losses[-1],
                 "lr": float(fetched[-1]["lr"]), "grad_norm": float(fetched[-1]["grad_norm"]),
                 "images_per_sec": ips, "epoch": step / tr.steps_per_epoch,
                 "data/bad_images_total": bad_total}
          rec.update({k: float(v) for k, v in fetched[-1].items()
                      if k.startswith(("aux/", "adversary/"))})
          if config.log_every == 1:
            rec["loss"] = losses[-1]
          if peak is not None:
            if flops_per_step is None:
              flops_per_step = tr.flops_per_step()
            if flops_per_step:
              rec["mfu"] = metric_writers.mfu(flops_per_step, ips / config.input.batch_size,
                                              tr.mesh.devices.size, peak)
          writer.write(rec)
          writer.train_scalars(step, rec)
          if bar is not None:
            bar.set_postfix(loss=f"{rec['loss']:.4f}", lr=f"{rec['lr']:.2e}", ips=f"{ips:.0f}")
      if want_ckpt or preempt:
        ckpt.save(step, tr.state, tr.loader, {**meta, "step": step}, force=True)
        last_good = step
        if want_ckpt and tb_cfg.get("histograms", True):
          writer.histograms(step, tr.state["params"])
      if preempt:
        ckpt.wait()
        raise Preempted(step, ckpt.directory)
      if config.eval_every and step % config.eval_every == 0 and step < tr.total_steps:
        res = tr.evaluate(workdir)
        flat = _flat_numbers(res)
        if bar is not None:
          bar.write(f"step {step}: " + ", ".join(f"{k} {v:.4g}" for k, v in sorted(flat.items())))
        writer.write({"step": step, "eval": flat})
        writer.eval_results(step, res)
  except BaseException:
    writer.close()
    raise
  finally:
    if tracing:
      jax.profiler.stop_trace()
    if bar is not None:
      bar.close()
    if old_handler is not None:
      signal.signal(signal.SIGTERM, old_handler)
    ckpt.close()

  if progress and jax.process_index() == 0:
    enabled = [n for n, e in (config.get("evals") or {}).items() if e.get("enabled", True)]
    if enabled:
      print(f"evaluating step {step}: {', '.join(enabled)}", flush=True)
  results = tr.evaluate(workdir)
  summary = {"step": step, "workdir": os.path.abspath(workdir), "eval": _flat_numbers(results),
             "bad_images": bad_total + skipped}
  writer.write({"step": step, "summary": summary["eval"]})
  writer.eval_results(step, results)
  writer.close()
  return summary


def run_header(tr: "Trainer", workdir: str, start: int) -> list[str]:
  """The few lines a run prints before its progress bar: method, model and size, data and
  split sizes, devices and mesh, the schedule, the workdir (and where a resume starts)."""
  from mim_jax.data import pipeline
  cfg = tr.config
  n_params = sum(int(np.prod(x.shape)) for x in jax.tree.leaves(tr.state["params"]))
  data = cfg.input.data
  try:
    held_out = f", {pipeline.num_examples(cfg.input, 'eval'):,} held out for evaluation"
    classes = f", {pipeline.num_classes(cfg.input)} classes"
  except Exception:  # pylint: disable=broad-except  (a header never stops a run)
    held_out = classes = ""
  mesh = " x ".join(f"{n}={s}" for n, s in zip(tr.mesh.axis_names, tr.mesh.devices.shape))
  kinds = sorted({d.platform for d in tr.mesh.devices.flat})
  name = methods.TITLES.get(cfg.method, cfg.method)
  clips = isinstance(tr.loader.image_shape, tuple) and len(tr.loader.image_shape) == 4
  lines = [
      f"{name} ({cfg.method}) on {models.summary(cfg.model, cfg.input.image_size)}: "
      f"{n_params / 1e6:.2f}M parameters",
      f"data: {data.name}{' ' + str(data.dir) if data.get('dir') else ''}: "
      f"{tr.loader.num_records:,} training {'clips' if clips else 'images'}{held_out}{classes}",
      f"devices: {tr.mesh.devices.size} {'/'.join(kinds)} ({mesh}); batch {cfg.input.batch_size}, "
      f"{tr.steps_per_epoch} steps/epoch, {tr.total_steps} steps",
      f"workdir: {os.path.abspath(workdir)} (config.json has the full config; --verbosity=1 "
      f"prints it)",
  ]
  if start:
    lines.append(f"resuming from step {start}")
  return lines


def evaluate_only(config: ml_collections.ConfigDict, workdir: str, *, devices=None) -> dict:
  """--mode=eval: restores the workdir's latest checkpoint and runs the config's evaluators."""
  ckpt = checkpointing.Checkpointer(workdir, keep=config.keep_ckpts)
  latest = ckpt.latest_step()
  if latest is None:
    raise TrainingError(f"no checkpoint in {ckpt.directory}: train first with --mode=train "
                        f"(or point --workdir at a trained run)")
  with teachers.frozen_runs(workdir, restoring=True, record=False):
    tr = Trainer.create(config, devices=devices)
  tr.restore(ckpt, latest, with_data=False)
  ckpt.close()
  results = tr.evaluate(workdir)
  return {"step": latest, "workdir": os.path.abspath(workdir), "eval": _flat_numbers(results)}


def _flat_numbers(results: dict) -> dict:
  out = {}
  for name, res in results.items():
    for k, v in res.items():
      if isinstance(v, (int, float)) and not isinstance(v, bool):
        out[f"{name}/{k}"] = v
  return out
