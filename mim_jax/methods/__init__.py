"""Pretraining methods, one file each, looked up by `config.method`."""
from __future__ import annotations

import importlib

# name -> "module:Class"; a new method is one line here, one file and one config.
REGISTRY = {
    "mae": "mim_jax.methods.mae:MAE",
    "simmim": "mim_jax.methods.simmim:SimMIM",
    "finetune": "mim_jax.methods.finetune:FineTune",
}


def get(config):
  """Builds the method named by `config.method`."""
  name = config.method
  if name not in REGISTRY:
    raise ValueError(f"unknown method {name!r}: set config.method to one of {sorted(REGISTRY)}")
  module, cls = REGISTRY[name].split(":")
  return getattr(importlib.import_module(module), cls)(config)
