"""Pretraining methods, one file each, looked up by `config.method`."""
from __future__ import annotations

import importlib

# name -> "module:Class"; a new method is one line here (and its title in TITLES), one file
# and one config.
REGISTRY = {
    "mae": "mim_jax.methods.mae:MAE",
    "simmim": "mim_jax.methods.simmim:SimMIM",
    "finetune": "mim_jax.methods.finetune:FineTune",
    "maskfeat": "mim_jax.methods.maskfeat:MaskFeat",
    "tokenizer": "mim_jax.methods.tokenizer:Tokenizer",
    "beit": "mim_jax.methods.beit:BEiT",
    "cae": "mim_jax.methods.cae:CAE",
    "ibot": "mim_jax.methods.ibot:IBOT",
    "data2vec": "mim_jax.methods.data2vec:Data2Vec",
    "deepmim": "mim_jax.methods.deepmim:DeepMIM",
    "feature_mim": "mim_jax.methods.feature_mim:FeatureMIM",
    "latent_mim": "mim_jax.methods.latent_mim:LatentMIM",
    "pcae": "mim_jax.methods.pcae:PCAE",
    "extrema": "mim_jax.methods.extrema:ExtreMA",
    "tinymim": "mim_jax.methods.tinymim:TinyMIM",
    "simclr": "mim_jax.methods.simclr:SimCLR",
}


# name -> the published name a report shows (mim_jax.report), for every entry of REGISTRY.
TITLES = {"mae": "MAE", "simmim": "SimMIM", "finetune": "fine-tune", "maskfeat": "MaskFeat",
          "tokenizer": "tokenizer", "beit": "BEiT", "cae": "CAE", "ibot": "iBOT",
          "data2vec": "data2vec", "deepmim": "DeepMIM", "feature_mim": "teacher-feature MIM",
          "tinymim": "TinyMIM", "latent_mim": "Latent MIM", "pcae": "PCAE", "extrema": "ExtreMA",
          "simclr": "SimCLR"}


def get(config):
  """Builds the method named by `config.method`."""
  name = config.method
  if name not in REGISTRY:
    raise ValueError(f"unknown method {name!r}: set config.method to one of {sorted(REGISTRY)}")
  module, cls = REGISTRY[name].split(":")
  return getattr(importlib.import_module(module), cls)(config)
