"""Backbones by name: `config.model.name` picks `mim_jax/models/<name>.py`.

As in big_vision, a model module is built from `config.model`'s keys. Every registered module
provides

  from_config(model_cfg, image_size, **overrides) -> flax.linen.Module
      the backbone; `overrides` are a method's switches (a mask token, say);
  EXECUTION_OPTIONS: tuple of `config.model` keys that say how the model is computed, not what
      it is (a checkpoint resumes across them: dtype, remat, attention kernel ...);
  check_config(model_cfg) -> None
      ValueError, one line naming the allowed values, for a bad key value (before anything is
      built);
  outputs(model, variables, images, *, pooling, layers=False) -> dict
      the evaluation-mode named outputs (see `outputs` below);
  forward(model, variables, images, *, train, rng=None, pooling) -> (dict, dict)
      the same named outputs (no 'layers') in training or evaluation mode, and the updated
      mutable collections ({'batch_stats': ...} after a ResNet's training pass, else {}): what
      a backbone-agnostic loss calls (`models.forward`). Backbones that can carry a mask token
      (ViT, Swin, MViT, built with `use_mask_token`) also take `mask=` [B, h, w] (or [B, h w])
      on their patch grid, 1 = the patch embedding replaced by the mask token.

The backbone's `__call__` is its one forward pass (the tokens of a ViT, the last feature map
of a ResNet); methods call it for their losses. `outputs` is what evaluators and
`Method.features` read:

  'pooled'   [B, D] float32: the image representation under `pooling` (ViT: 'cls' | 'mean';
             ResNet: 'mean', the global average pool);
  'tokens'   [B, N, D]: the final output as a sequence (ViT: final-norm tokens, cls first;
             ResNet: the last feature map, row-major); `prefix_tokens(model_cfg)` says how
             many lead (a cls token) before the spatial ones;
  'layers'   with layers=True, a list of [B, D_i] float32, one pooled output per block or
             stage, input side first, widths may differ (CNN stages); the last entry is
             'pooled' itself;
  'stride'   int: input pixels per output position (patch size, total stride);
  'grid'     (h, w) of the output positions.

Adding a backbone: one file here with the five names above and one line in REGISTRY
(docs/adding_a_method.md).
"""
from __future__ import annotations

import importlib
import types
from typing import Any

REGISTRY = {
    "vit": "mim_jax.models.vit",
    "resnet": "mim_jax.models.resnet",
    "swin": "mim_jax.models.swin",
    "mvit": "mim_jax.models.mvit",
    "alexnet": "mim_jax.models.convnet",
    "nin": "mim_jax.models.convnet",
    "gpt": "mim_jax.models.gpt",
}

DEFAULT = "vit"


def name_of(model_cfg) -> str:
  """`config.model.name`, 'vit' when absent (configs and checkpoints from before the key)."""
  return str(model_cfg.get("name", DEFAULT) or DEFAULT)


def prefix_tokens(model_cfg) -> int:
  """Leading non-spatial tokens of the backbone's 'tokens' (its cls token): 1 for a ViT or an
  MViT built with one (`model.cls_token`; a ViT's default True, an MViT's False), else 0."""
  name = name_of(model_cfg)
  if name in ("vit", "mvit"):
    return int(bool(model_cfg.get("cls_token", name == "vit")))
  return 0


def takes_clips(model_cfg) -> bool:
  """Whether the backbone reads clips [B, T, H, W, C]: a space-time ViT (`model.tubelet` > 0)
  or a video MViT (`model.num_frames` > 0)."""
  name = name_of(model_cfg)
  key = {"vit": "tubelet", "mvit": "num_frames"}.get(name)
  return bool(key) and int(model_cfg.get(key, 0) or 0) > 0


def module(name: str) -> types.ModuleType:
  if name not in REGISTRY:
    raise ValueError(f"config.model.name={name!r}: use one of {', '.join(sorted(REGISTRY))}")
  return importlib.import_module(REGISTRY[name])


def module_for(model_cfg) -> types.ModuleType:
  return module(name_of(model_cfg))


def build(model_cfg, image_size: int, **overrides) -> Any:
  """The backbone `config.model` names, for `image_size` inputs."""
  return module_for(model_cfg).from_config(model_cfg, image_size, **overrides)


def check_config(model_cfg) -> None:
  """ValueError (one line) for an unknown model name or a bad value of one of its keys."""
  module_for(model_cfg).check_config(model_cfg)


def summary(model_cfg, image_size: int) -> str:
  """One line naming the model (the run header): the module's `summary` where it has one."""
  mod = module_for(model_cfg)
  if hasattr(mod, "summary"):
    return mod.summary(model_cfg, image_size)
  return f"{name_of(model_cfg)} at {image_size} px"


def execution_keys(model_cfg) -> tuple[str, ...]:
  """'model.<key>' for the keys of the named model that do not change what is computed."""
  return tuple(f"model.{k}" for k in module_for(model_cfg).EXECUTION_OPTIONS)


def _module_of_model(model: Any, fn: str) -> types.ModuleType:
  mod = importlib.import_module(type(model).__module__)
  if not hasattr(mod, fn):
    raise TypeError(f"{type(model).__name__} is not a registered backbone (no {fn}() in "
                    f"{mod.__name__})")
  return mod


def outputs(model: Any, variables: Any, images: Any, *, pooling: str, layers: bool = False) -> dict:
  """The evaluation-mode named outputs of a registered backbone (see the module docstring)."""
  return _module_of_model(model, "outputs").outputs(model, variables, images, pooling=pooling,
                                                    layers=layers)


def forward(model: Any, variables: Any, images: Any, *, train: bool, rng: Any = None,
            pooling: str, mask: Any = None) -> tuple[dict, dict]:
  """(named outputs, updated collections) of a registered backbone in training (`train`) or
  evaluation mode: the backbone-agnostic forward a method's loss calls; `mask` (the masked
  patches, for a backbone with a mask token) is passed on only when given."""
  kw = {} if mask is None else {"mask": mask}
  return _module_of_model(model, "forward").forward(model, variables, images, train=train,
                                                    rng=rng, pooling=pooling, **kw)
