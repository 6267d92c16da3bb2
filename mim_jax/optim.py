"""Optimisers and learning-rate schedules, built from `config.optim` with optax.

The learning rate follows the official codes' linear scaling rule:
    lr = base_lr * batch_size / lr_batch_divisor
(MAE: divisor 256, SimMIM: 512), where batch_size is the effective batch of one optimiser
step (`config.input.batch_size`; gradient accumulation splits it, it does not grow it).
"""
from __future__ import annotations

from typing import Any, Callable

import ml_collections
import optax


def peak_lr(optim_cfg, batch_size: int) -> float:
  return float(optim_cfg.base_lr) * batch_size / float(optim_cfg.get("lr_batch_divisor", 256))


def make_schedule(optim_cfg: ml_collections.ConfigDict, batch_size: int, steps_per_epoch: int,
                  total_steps: int) -> Callable:
  """Per-step schedule: linear warm-up from `warmup_lr`, then
    * 'cosine': half-cycle cosine to `min_lr` at `total_steps` (MAE's adjust_learning_rate,
      applied per iteration), or
    * 'multistep': constant, multiplied by `gamma` at each of `milestones_epochs` (SimMIM ViT),
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
  if kind == "cosine":
    after = optax.cosine_decay_schedule(peak, max(total_steps - warmup, 1), alpha=min_lr / peak if peak else 0.0)
  elif kind == "multistep":
    bounds = {int(round(e * steps_per_epoch)) - warmup: float(optim_cfg.get("gamma", 0.1))
              for e in optim_cfg.get("milestones_epochs", ())}
    after = optax.piecewise_constant_schedule(peak, {k: v for k, v in bounds.items() if k > 0})
  elif kind == "constant":
    after = optax.constant_schedule(peak)
  else:
    raise ValueError(f"unknown schedule {kind!r}: set config.optim.schedule to 'cosine', 'multistep' or 'constant'")
  if warmup == 0:
    return after
  return optax.join_schedules([optax.linear_schedule(warm_lr, peak, warmup), after], [warmup])


def make_optimizer(optim_cfg: ml_collections.ConfigDict, schedule: Callable,
                   decay_mask: Any) -> optax.GradientTransformation:
  """AdamW / LAMB / LARS / SGD with weight decay only where `decay_mask` is True."""
  name = optim_cfg.get("name", "adamw")
  wd = float(optim_cfg.get("weight_decay", 0.0))
  if name == "adamw":
    tx = optax.adamw(schedule, b1=optim_cfg.get("b1", 0.9), b2=optim_cfg.get("b2", 0.999),
                     eps=optim_cfg.get("eps", 1e-8), weight_decay=wd, mask=decay_mask)
  elif name == "lamb":
    tx = optax.lamb(schedule, b1=optim_cfg.get("b1", 0.9), b2=optim_cfg.get("b2", 0.999),
                    eps=optim_cfg.get("eps", 1e-6), weight_decay=wd, mask=decay_mask)
  elif name == "lars":
    tx = optax.lars(schedule, weight_decay=wd, weight_decay_mask=decay_mask,
                    trust_ratio_mask=decay_mask, momentum=optim_cfg.get("momentum", 0.9))
  elif name == "sgd":
    tx = optax.chain(optax.add_decayed_weights(wd, decay_mask),
                     optax.sgd(schedule, momentum=optim_cfg.get("momentum", 0.9),
                               nesterov=optim_cfg.get("nesterov", False)))
  else:
    raise ValueError(f"unknown optimizer {name!r}: set config.optim.name to adamw, lamb, lars or sgd")
  clip = float(optim_cfg.get("clip_grad", 0.0))
  if clip > 0:
    tx = optax.chain(optax.clip_by_global_norm(clip), tx)
  return tx
