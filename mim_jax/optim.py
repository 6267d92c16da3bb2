"""Optimisers and learning-rate schedules, built from `config.optim` with optax.

The learning rate follows the official codes' linear scaling rule:
    lr = base_lr * batch_size / lr_batch_divisor
(MAE: divisor 256, SimMIM: 512), where batch_size is the effective batch of one optimiser
step (`config.input.batch_size`; gradient accumulation splits it, it does not grow it).

Layer-wise learning-rate decay (`optim.layer_decay` < 1, fine-tuning; ELECTRA / BEiT / MAE's
`util/lr_decay.py: param_groups_lrd`) multiplies each parameter's whole update (the Adam step
and its decoupled weight decay, as a torch param group's `lr_scale` does) by
decay^(L + 1 - layer_id), L the number of encoder blocks; see `layer_ids`. A backbone with
its own rule (Swin's stages) defines `layer_ids(tree)` in its model module, asked for the
backbone config.model names; see
`backbone_layer_ids`.
"""
from __future__ import annotations

import re
from typing import Any, Callable, NamedTuple, Optional, Sequence, Union

import jax
import jax.numpy as jnp
import ml_collections
import optax


def total_steps(config, steps_per_epoch: int) -> int:
  """A run's length in optimiser steps: config.total_steps when > 0, else config.total_epochs
  over the training split (0 epochs = evaluate the initialisation: the random-init baseline
  of the results tables)."""
  if config.get("total_steps", 0) and config.total_steps > 0:
    return int(config.total_steps)
  return max(0, int(round(float(config.total_epochs) * steps_per_epoch)))


def peak_lr(optim_cfg, batch_size: int) -> float:
  return float(optim_cfg.base_lr) * batch_size / float(optim_cfg.get("lr_batch_divisor", 256))


def make_schedule(optim_cfg: ml_collections.ConfigDict, batch_size: int, steps_per_epoch: int,
                  total_steps: int) -> Callable:
  """Per-step schedule: linear warm-up from `warmup_lr`, then
    * 'cosine': half-cycle cosine to `min_lr` at `total_steps` (MAE's adjust_learning_rate,
      applied per iteration), or
    * 'cosine_epoch': the same cosine held constant through each epoch (read at the epoch's
      first step: SimSiam's and MoCo's adjust_learning_rate, set once per epoch), or
    * 'multistep': constant, multiplied by `gamma` at each of `milestones_epochs` (SimMIM ViT),
    * 'table': RotNet's and FeatureDecoupling's LUT_lr, `lr_table` = ((until_epoch, lr), ...):
      epoch e (whole epochs, set once per epoch) runs at the lr of the first entry with
      e < until_epoch, past the last entry at the last lr (the lrs scaled by the batch like
      `base_lr`; `base_lr` itself is then unused), or
    * 'constant'.
  warmup_lr and min_lr are scaled by the batch like the peak (as SimMIM does; MAE's are 0).
  """
  scale = batch_size / float(optim_cfg.get("lr_batch_divisor", 256))
  peak = float(optim_cfg.base_lr) * scale
  warm_lr = float(optim_cfg.get("warmup_lr", 0.0)) * scale
  min_lr = float(optim_cfg.get("min_lr", 0.0)) * scale
  warmup = int(round(float(optim_cfg.get("warmup_epochs", 0.0)) * steps_per_epoch))
  warmup = min(warmup, total_steps)
  kind = optim_cfg.get("schedule", "cosine")
  if kind in ("cosine", "cosine_epoch"):
    after = optax.cosine_decay_schedule(peak, max(total_steps - warmup, 1), alpha=min_lr / peak if peak else 0.0)
    if kind == "cosine_epoch":
      spe, smooth = max(int(steps_per_epoch), 1), after
      after = lambda count: smooth((jnp.asarray(count) // spe) * spe)  # noqa: E731
  elif kind == "multistep":
    bounds = {int(round(e * steps_per_epoch)) - warmup: float(optim_cfg.get("gamma", 0.1))
              for e in optim_cfg.get("milestones_epochs", ())}
    after = optax.piecewise_constant_schedule(peak, {k: v for k, v in bounds.items() if k > 0})
  elif kind == "table":
    table = [(float(e), float(lr) * scale) for e, lr in optim_cfg.get("lr_table", ())]
    if not table:
      raise ValueError("config.optim.schedule='table' needs config.optim.lr_table = "
                       "((until_epoch, lr), ...), e.g. ((60, 0.1), (120, 0.02))")
    spe = max(int(steps_per_epoch), 1)

    def after(count):
      epoch = (jnp.asarray(count) + warmup) // spe
      lr = jnp.float32(table[-1][1])
      for until, value in reversed(table):
        lr = jnp.where(epoch < until, jnp.float32(value), lr)
      return lr
  elif kind == "constant":
    after = optax.constant_schedule(peak)
  else:
    raise ValueError(f"unknown schedule {kind!r}: set config.optim.schedule to 'cosine', "
                     "'cosine_epoch', 'multistep', 'table' or 'constant'")
  if warmup == 0:
    return after
  return optax.join_schedules([optax.linear_schedule(warm_lr, peak, warmup), after], [warmup])


_BLOCK = re.compile(r"block(\d+)$")
# Parameters of the ViT's input side (MAE's get_layer_id_for_vit: cls_token, pos_embed,
# patch_embed; the mask token of SimMIM-style encoders sits beside them): layer 0.
_EMBEDDING_NAMES = ("patch_embed", "cls_token", "pos_embed", "mask_token")


def _names(path) -> tuple[str, ...]:
  return tuple(str(getattr(k, "key", getattr(k, "name", k))) for k in path)


def num_encoder_blocks(tree: Any) -> int:
  """Number of ViT blocks (`blockNN` modules) under the top-level 'encoder' entry of `tree`."""
  found = set()
  for path, _ in jax.tree_util.tree_flatten_with_path(tree)[0]:
    names = _names(path)
    if names and names[0] == "encoder":
      found.update(int(m.group(1)) for m in map(_BLOCK.match, names[1:]) if m)
  return max(found) + 1 if found else 0


def backbone_layer_ids(tree: Any, model_cfg: Any = None) -> Optional[tuple[Any, int]]:
  """(layer id of every leaf, the largest id) by the rule of the backbone `model_cfg` names
  (`config.model`), else None (the ViT rule of `layer_ids`).

  The hook: a module of `mim_jax.models.REGISTRY` may define `layer_ids(tree)` returning
  (ids, largest id) for a parameter tree whose 'encoder' is its backbone and None for any
  other tree (mim_jax/models/swin.py: the official get_swin_layer; mvit.py)."""
  if model_cfg is None:
    return None
  from mim_jax import models  # pylint: disable=g-import-not-at-top
  rule = getattr(models.module_for(model_cfg), "layer_ids", None)
  return rule(tree) if rule is not None else None


def layer_ids(tree: Any, model_cfg: Any = None) -> Any:
  """The layer id of every leaf of a parameter tree: the rule of the backbone `model_cfg`
  names where its model module has one (`backbone_layer_ids`), else MAE's for a tree whose
  'encoder' entry is a mim_jax ViT.

  MAE's: 0 for the patch embedding, cls token, position embedding (and mask token); i + 1 for
  encoder block i; L + 1 for everything else (the encoder's final norm, fc_norm, the head),
  L = number of blocks. MAE writes the last one as `num_layers` with num_layers = L + 1.
  """
  claimed = backbone_layer_ids(tree, model_cfg)
  if claimed is not None:
    return claimed[0]
  depth = num_encoder_blocks(tree)

  def layer(path, _):
    names = _names(path)
    if not names or names[0] != "encoder":
      return depth + 1
    if len(names) > 1 and names[1] in _EMBEDDING_NAMES:
      return 0
    blocks = [int(m.group(1)) for m in map(_BLOCK.match, names[1:]) if m]
    return blocks[0] + 1 if blocks else depth + 1

  return jax.tree_util.tree_map_with_path(layer, tree)


def layer_decay_factors(tree: Any, decay: float, model_cfg: Any = None) -> Any:
  """decay ** (largest id - layer_id) per leaf: MAE's `layer_scales[layer_id]` with largest
  id L + 1, or the rule of the backbone `model_cfg` names (Swin: sum(depths) + 1)."""
  claimed = backbone_layer_ids(tree, model_cfg)
  if claimed is not None:
    ids, top = claimed
  else:
    ids, top = layer_ids(tree), num_encoder_blocks(tree) + 1
  return jax.tree.map(lambda i: float(decay) ** (top - i), ids)


def scale_by_tree(factors: Any) -> optax.GradientTransformation:
  """Multiplies each update by its fixed factor (a pytree of floats shaped like the params)."""

  def init(params):
    del params
    return optax.EmptyState()

  def update(updates, state, params=None):
    del params
    return jax.tree.map(lambda u, f: u * f if u is not None else None, updates, factors), state

  return optax.GradientTransformation(init, update)


def weight_decay_schedule(optim_cfg: ml_collections.ConfigDict,
                          total_steps: Optional[int]) -> Union[float, Callable]:
  """The weight decay, a float or (for `weight_decay_schedule='cosine'`) a per-step schedule
  weight_decay_end + (weight_decay - weight_decay_end) * (1 + cos(pi * step / total)) / 2,
  DINO / iBOT's `cosine_scheduler` without warm-up."""
  wd = float(optim_cfg.get("weight_decay", 0.0))
  kind = optim_cfg.get("weight_decay_schedule", "constant")
  if kind == "constant":
    return wd
  if kind != "cosine":
    raise ValueError(f"config.optim.weight_decay_schedule={kind!r}: use 'constant' or 'cosine'")
  if total_steps is None:
    raise ValueError("a cosine weight-decay schedule needs the run's total steps")
  if total_steps == 0:    # a 0-step run (evaluating the initialisation) takes no step
    return wd
  end = float(optim_cfg.get("weight_decay_end", 0.0))
  return lambda step: end + 0.5 * (wd - end) * (1.0 + jnp.cos(jnp.pi * step / total_steps))


def _base_optimizer(optim_cfg: ml_collections.ConfigDict, schedule: Callable, decay_mask: Any,
                    wd: Union[float, Callable]) -> optax.GradientTransformation:
  """AdamW / LAMB / LARS / SGD at `schedule` with weight decay `wd` where `decay_mask`."""
  name = optim_cfg.get("name", "adamw")
  if name == "lars" and callable(wd):
    raise ValueError("config.optim.weight_decay_schedule='cosine' is not supported with LARS: "
                     "set it to 'constant'")
  if name == "adamw":
    return optax.adamw(schedule, b1=optim_cfg.get("b1", 0.9), b2=optim_cfg.get("b2", 0.999),
                       eps=optim_cfg.get("eps", 1e-8), weight_decay=wd, mask=decay_mask)
  if name == "lamb":
    return optax.lamb(schedule, b1=optim_cfg.get("b1", 0.9), b2=optim_cfg.get("b2", 0.999),
                      eps=optim_cfg.get("eps", 1e-6), weight_decay=wd, mask=decay_mask)
  if name == "lars":
    return optax.lars(schedule, weight_decay=wd, weight_decay_mask=decay_mask,
                      trust_ratio_mask=decay_mask, momentum=optim_cfg.get("momentum", 0.9))
  if name == "sgd":
    return optax.chain(optax.add_decayed_weights(wd, decay_mask),
                       optax.sgd(schedule, momentum=optim_cfg.get("momentum", 0.9),
                                 nesterov=optim_cfg.get("nesterov", False)))
  raise ValueError(f"unknown optimizer {name!r}: set config.optim.name to adamw, lamb, lars or sgd")


# -- parameter groups ---------------------------------------------------------------------------
# config.optim.param_groups (and a method's `param_groups()`): ((regex, spec), ...), matched
# in order against each parameter's path ('encoder/block11/mlp/fc1/kernel', re.search); the
# first match wins, the config's groups before the method's. A spec is 'frozen' or a dict of
GROUP_KEYS = ("lr_scale", "weight_decay", "frozen", "frozen_until_step", "frozen_until_epoch",
              "constant_lr")
# lr_scale: the group's learning rate is lr_scale x the schedule (warm-up and decay included);
# constant_lr=True: the group's learning rate is lr_scale x the peak learning rate at every step,
#   no warm-up, no decay (SimSiam's fix_pred_lr: the predictor keeps the initial lr);
# weight_decay: its own decay (where the decay mask allows it);
# frozen=True: never updated, never decayed, no optimiser state advances (PyTorch's AdamW
#   skipping a parameter whose grad is None);
# frozen_until_step / frozen_until_epoch: frozen so until that step, then trained with its
#   own optimiser state starting fresh (Adam's bias correction counts from the unfreezing, as
#   PyTorch's state for a parameter starts at its first gradient), at the global schedule.


def parse_groups(groups: Sequence) -> list[tuple[str, dict]]:
  """[(regex, spec dict)] from ((regex, 'frozen' | dict), ...); a one-line ValueError for a
  bad entry."""
  out = []
  for entry in groups or ():
    if not isinstance(entry, (tuple, list)) or len(entry) != 2:
      raise ValueError(f"config.optim.param_groups entry {entry!r}: give (regex, spec) pairs, "
                       "e.g. (('.*last_layer.*', 'frozen'),)")
    rx, spec = entry
    if spec == "frozen":
      spec = {"frozen": True}
    spec = dict(spec.to_dict() if hasattr(spec, "to_dict") else spec)
    bad = sorted(set(spec) - set(GROUP_KEYS))
    if bad:
      raise ValueError(f"config.optim.param_groups {rx!r}: unknown keys {bad}; use {', '.join(GROUP_KEYS)}")
    try:
      re.compile(rx)
    except re.error as e:
      raise ValueError(f"config.optim.param_groups: bad regex {rx!r} ({e})") from None
    out.append((str(rx), spec))
  return out


def group_labels(tree: Any, groups: Sequence[tuple[str, dict]]) -> Any:
  """The group label ('g<i>' of the first matching regex, else 'default') of every leaf."""
  compiled = [re.compile(rx) for rx, _ in groups]

  def label(path, _):
    name = "/".join(_names(path))
    for i, rx in enumerate(compiled):
      if rx.search(name):
        return f"g{i}"
    return "default"

  return jax.tree_util.tree_map_with_path(label, tree)


class FreezeState(NamedTuple):
  count: jax.Array
  inner: Any


def freeze_until(inner: optax.GradientTransformation, until: int) -> optax.GradientTransformation:
  """Zero updates and an untouched `inner` state before step `until` (counted by this
  transform), `inner` from then on: its own step count (bias correction) starts there."""

  def init(params):
    return FreezeState(jnp.zeros((), jnp.int32), inner.init(params))

  def update(updates, state, params=None):
    def frozen(_):
      return jax.tree.map(jnp.zeros_like, updates), state.inner

    def live(_):
      return inner.update(updates, state.inner, params)

    new_updates, new_inner = jax.lax.cond(state.count < until, frozen, live, None)
    return new_updates, FreezeState(optax.safe_int32_increment(state.count), new_inner)

  return optax.GradientTransformation(init, update)


def _group_optimizer(optim_cfg, schedule: Callable, decay_mask: Any, wd, spec: dict,
                     steps_per_epoch: int, peak: Optional[float] = None) -> optax.GradientTransformation:
  if spec.get("frozen", False):
    return optax.set_to_zero()
  until = int(spec.get("frozen_until_step", 0))
  if "frozen_until_epoch" in spec:
    until = max(until, int(round(float(spec["frozen_until_epoch"]) * steps_per_epoch)))
  scale = float(spec.get("lr_scale", 1.0))
  if "weight_decay" in spec:
    wd = float(spec["weight_decay"])
  # A frozen-then-trained group's inner optimiser counts from the unfreezing: its schedules
  # read count + until, the global step.
  group_schedule = lambda count: scale * schedule(count + until)  # noqa: E731
  if spec.get("constant_lr", False):
    if peak is None:
      raise ValueError("a constant_lr parameter group needs the peak learning rate")
    group_schedule = lambda count: scale * peak  # noqa: E731
  group_wd = (lambda count: wd(count + until)) if callable(wd) else wd  # noqa: E731
  tx = _base_optimizer(optim_cfg, group_schedule, decay_mask, group_wd)
  return freeze_until(tx, until) if until > 0 else tx


def make_optimizer(optim_cfg: ml_collections.ConfigDict, schedule: Callable,
                   decay_mask: Any, total_steps: Optional[int] = None, *,
                   groups: Sequence = (), steps_per_epoch: int = 1,
                   peak_lr: Optional[float] = None,
                   model_cfg: Any = None) -> optax.GradientTransformation:
  """AdamW / LAMB / LARS / SGD with weight decay only where `decay_mask` is True (constant or
  on a cosine schedule, see `weight_decay_schedule`), and layer-wise lr decay when
  `optim_cfg.layer_decay` < 1 (read from the mask's tree paths, so `decay_mask` must then be
  a pytree shaped like the parameters), by the layer rule of the backbone `model_cfg`
  (config.model) names.

  Parameter groups (`optim_cfg.param_groups`, then the method's `groups`; see GROUP_KEYS) make
  it an `optax.multi_transform` over the groups, each its own optimiser; without any the
  transform is the single optimiser, unchanged. Gradient clipping and layer decay act on the
  whole tree, outside the groups."""
  wd = weight_decay_schedule(optim_cfg, total_steps)
  parsed = parse_groups(tuple(optim_cfg.get("param_groups", ()) or ()) + tuple(groups or ()))
  if parsed:
    if callable(decay_mask):
      raise ValueError("parameter groups need the weight-decay mask as a pytree shaped like the "
                       "params, not a function")
    labels = group_labels(decay_mask, parsed)
    specs = {f"g{i}": spec for i, (_, spec) in enumerate(parsed)}
    specs["default"] = {}
    used = set(jax.tree.leaves(labels))
    tx = optax.multi_transform(
        {label: _group_optimizer(optim_cfg, schedule, decay_mask, wd, specs[label], steps_per_epoch,
                                 peak_lr)
         for label in sorted(used)}, labels)
  else:
    tx = _base_optimizer(optim_cfg, schedule, decay_mask, wd)
  layer_decay = float(optim_cfg.get("layer_decay", 1.0))
  if not 0.0 < layer_decay <= 1.0:
    raise ValueError(f"config.optim.layer_decay={layer_decay} must be in (0, 1] (1 = off)")
  if layer_decay < 1.0:
    if callable(decay_mask):
      raise ValueError("layer decay needs the weight-decay mask as a pytree shaped like the params, not a function")
    tx = optax.chain(tx, scale_by_tree(layer_decay_factors(decay_mask, layer_decay, model_cfg)))
  clip = float(optim_cfg.get("clip_grad", 0.0))
  if clip > 0:
    tx = optax.chain(optax.clip_by_global_norm(clip), tx)
  return tx
