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
    "moco": "mim_jax.methods.moco:MoCo",
    "mocov3": "mim_jax.methods.mocov3:MoCoV3",
    "byol": "mim_jax.methods.byol:BYOL",
    "simsiam": "mim_jax.methods.simsiam:SimSiam",
    "barlow_twins": "mim_jax.methods.barlow_twins:BarlowTwins",
    "vicreg": "mim_jax.methods.vicreg:VICReg",
    "dino": "mim_jax.methods.dino:DINO",
    "instdisc": "mim_jax.methods.instdisc:InstDisc",
    "rotation": "mim_jax.methods.rotation:Rotation",
    "feature_decoupling": "mim_jax.methods.feature_decoupling:FeatureDecoupling",
    "jigsaw": "mim_jax.methods.jigsaw:Jigsaw",
    "context_prediction": "mim_jax.methods.context_prediction:ContextPrediction",
    "colorization": "mim_jax.methods.colorization:Colorization",
    "split_brain": "mim_jax.methods.split_brain:SplitBrain",
    "context_encoder": "mim_jax.methods.context_encoder:ContextEncoder",
    "limited_context": "mim_jax.methods.limited_context:LimitedContextInpainting",
    "igpt": "mim_jax.methods.igpt:IGPT",
    "videomae": "mim_jax.methods.videomae:VideoMAE",
}


# name -> the published name a report shows (mim_jax.report), for every entry of REGISTRY.
TITLES = {"mae": "MAE", "simmim": "SimMIM", "finetune": "fine-tune", "maskfeat": "MaskFeat",
          "tokenizer": "tokenizer", "beit": "BEiT", "cae": "CAE", "ibot": "iBOT",
          "data2vec": "data2vec", "deepmim": "DeepMIM", "feature_mim": "teacher-feature MIM",
          "tinymim": "TinyMIM", "latent_mim": "Latent MIM", "pcae": "PCAE", "extrema": "ExtreMA",
          "simclr": "SimCLR", "moco": "MoCo", "mocov3": "MoCo v3", "byol": "BYOL",
          "simsiam": "SimSiam", "barlow_twins": "Barlow Twins", "vicreg": "VICReg", "dino": "DINO",
          "instdisc": "InstDisc", "rotation": "RotNet", "feature_decoupling": "FeatureDecoupling",
          "jigsaw": "Jigsaw", "context_prediction": "context prediction",
          "colorization": "colorization", "split_brain": "split-brain autoencoder",
          "context_encoder": "context encoder", "limited_context": "limited-context inpainting",
          "igpt": "iGPT", "videomae": "VideoMAE"}


def get(config):
  """Builds the method named by `config.method`."""
  name = config.method
  if name not in REGISTRY:
    raise ValueError(f"unknown method {name!r}: set config.method to one of {sorted(REGISTRY)}")
  module, cls = REGISTRY[name].split(":")
  return getattr(importlib.import_module(module), cls)(config)
