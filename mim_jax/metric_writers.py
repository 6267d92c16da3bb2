"""What a run logs: `metrics.jsonl` (the record the tools read) and TensorBoard event files.

Both are written by process 0 only. TensorBoard goes through tensorboardX's `SummaryWriter`
(event files under `<workdir>/tensorboard`, read by `tensorboard --logdir <workdir>`), so the
format is TensorBoard's own:

  scalars     train/loss, train/lr, train/grad_norm, train/images_per_sec, train/epoch,
              train/mfu (model FLOP utilisation, when the device's peak is known), aux/*
              (a method's extra numbers) and eval/<evaluator>/<metric> for every evaluation
  images      eval/reconstruction: the reconstruction evaluator's grid (input | masked | output)
  histograms  params/<module path>: every parameter array, at checkpoint steps

`config.tensorboard.enabled` (on by default) switches the event files; `metrics.jsonl` is always
written.
"""
from __future__ import annotations

import json
import os
from typing import Any, Mapping, Optional

import jax
import numpy as np

TB_DIR = "tensorboard"

# Dense bf16 matmul peaks (FLOP/s) per device, from the vendors' data sheets; MFU is reported
# against config.tensorboard.peak_tflops when set, else against this table, else not at all.
PEAK_FLOPS = (
    ("H200", 989e12), ("H100", 989e12), ("A100", 312e12), ("L4", 121e12),
    ("TPU v6", 918e12), ("TPU v5p", 459e12), ("TPU v5", 197e12), ("TPU v4", 275e12),
    ("TPU v3", 123e12),
)


def device_peak_flops(device: Any, override_tflops: float = 0.0) -> Optional[float]:
  """FLOP/s of one `device` (`override_tflops` x 1e12 when > 0), None when unknown (CPUs)."""
  if override_tflops and override_tflops > 0:
    return float(override_tflops) * 1e12
  kind = str(getattr(device, "device_kind", ""))
  for name, peak in PEAK_FLOPS:
    if name.lower() in kind.lower():
      return peak
  return None


def mfu(flops_per_step: float, steps_per_sec: float, num_devices: int, peak_per_device: float) -> float:
  """Model FLOP utilisation: achieved FLOP/s over the devices' combined peak."""
  return flops_per_step * steps_per_sec / (num_devices * peak_per_device)


def _flat(tree: Mapping[str, Any], prefix: str = "") -> dict:
  out = {}
  for k, v in tree.items():
    name = f"{prefix}/{k}" if prefix else str(k)
    if isinstance(v, Mapping):
      out.update(_flat(v, name))
    else:
      out[name] = v
  return out


class MetricsWriter:
  """Appends records to `<workdir>/metrics.jsonl` and mirrors them into TensorBoard."""

  def __init__(self, workdir: str, tensorboard: bool = True):
    self.workdir = workdir
    self.path = os.path.join(workdir, "metrics.jsonl")
    self.on = jax.process_index() == 0
    self.tb = None
    if self.on and tensorboard:
      from tensorboardX import SummaryWriter  # pylint: disable=g-import-not-at-top
      self.tb = SummaryWriter(logdir=os.path.join(workdir, TB_DIR), flush_secs=30)

  def write(self, record: dict) -> None:
    if self.on:
      with open(self.path, "a") as f:
        f.write(json.dumps(record) + "\n")

  def train_scalars(self, step: int, record: Mapping[str, Any]) -> None:
    """The training record of one log step as TensorBoard scalars (train/*, aux/*)."""
    if self.tb is None:
      return
    for k, v in record.items():
      if k == "step" or not isinstance(v, (int, float)) or isinstance(v, bool):
        continue
      self.tb.add_scalar(k if "/" in k else f"train/{k}", float(v), step)

  def eval_results(self, step: int, results: Mapping[str, Mapping[str, Any]]) -> None:
    """Every number of an evaluation (eval/<evaluator>/<metric>) and the reconstruction grid."""
    if self.tb is None:
      return
    for name, res in results.items():
      for k, v in _flat(res).items():
        if isinstance(v, (int, float)) and not isinstance(v, bool):
          self.tb.add_scalar(f"eval/{name}/{k}", float(v), step)
      path = res.get("path") if name == "reconstruction" and isinstance(res, Mapping) else None
      if path and os.path.exists(path):
        from PIL import Image  # pylint: disable=g-import-not-at-top
        grid = np.asarray(Image.open(path).convert("RGB"))
        self.tb.add_image("eval/reconstruction", grid, step, dataformats="HWC")
    self.tb.flush()

  def histograms(self, step: int, params: Any) -> None:
    """One histogram per parameter array (host copies), named by its path in the tree."""
    if self.tb is None:
      return
    for path, leaf in jax.tree_util.tree_flatten_with_path(params)[0]:
      if not getattr(leaf, "is_fully_addressable", True):
        continue   # sharded over other processes' devices: process 0 holds only a part
      name = "/".join(str(getattr(p, "key", getattr(p, "idx", p))) for p in path)
      self.tb.add_histogram(f"params/{name}", np.asarray(jax.device_get(leaf), np.float32), step)
    self.tb.flush()

  def close(self) -> None:
    if self.tb is not None:
      self.tb.close()
      self.tb = None
