r"""mim_jax's Swin, Swin V2, SimMIM-on-Swin, MViT v2, MaskFeat's video MViT and VideoMAE (V1, V2)
against the official PyTorch modules.

Builds each model from the official repositories' own code (a user's checkouts: nothing of them
is in mim_jax), perturbs every parameter so that no bias is zero and no norm the identity,
and reads its weights into mim_jax: Swin and MViT v2 through the command line (the state dict
saved as the official checkpoints are, `python -m mim_jax.convert --from=torch
--arch=swin|swinv2|mvitv2`, the written workdir loaded as any run is, `teachers.load`);
MaskMViT and VideoMAE through name maps (below). Then it compares, on the same input:

* classifiers (Swin, Swin V2, MViT v2): the logits the 'classifier' evaluator reads
  (`method.features(...)['logits']`) against the official model's head output (the MViT
  head's pre-softmax projection);
* SimMIM pretraining (Swin-B 192 px window 6; Swin V2-B 192 px window 12 with the
  normalised targets of its config): the reconstruction and the loss for one mask drawn by
  `SimMIM.make_mask`, the same mask handed to the official `SimMIM.forward(x, mask)`;
* MaskFeat on the video MViTv2-S (SlowFast's `MaskMViT`,
  configs/masked_ssl/k400_MVITv2_S_16x4_MaskFeat_PT.yaml) against
  configs/maskfeat.py:k400_mvitv2_s, its weights read through `convert.mvit.entries`: the
  predictions and HOG targets of the masked tokens and the loss for one cube mask of
  `MaskFeat.make_mask`, handed to the official forward as the loader's mask;
* VideoMAE pretraining (MCG-NJU/VideoMAE `pretrain_videomae_base_patch16_224`, decoder depth
  4) against configs/videomae.py:kinetics400: the decoder's predictions of the masked cubes
  and the loss (engine_for_pretraining.py's normalised-cube target, rewritten here in its own
  einops terms) for one tube mask of `VideoMAE.masks`; and VideoMAE V2's dual masking
  (OpenGVLab/VideoMAEv2, decoder mask ratio 0.5: the running-cell mask of `VideoMAE.masks` as
  the official `decode_masked_pos`, the loss over the decoded cubes the encoder masked);
* parameter counts: the official module's `parameters()` against the converted tree.

    git clone https://github.com/microsoft/Swin-Transformer /tmp/Swin-Transformer
    git clone https://github.com/facebookresearch/mvit /tmp/mvit
    git clone https://github.com/facebookresearch/SlowFast /tmp/SlowFast
    git clone https://github.com/MCG-NJU/VideoMAE /tmp/VideoMAE
    git clone https://github.com/OpenGVLab/VideoMAEv2 /tmp/VideoMAEv2
    pip install torch einops fvcore iopath yacs psutil simplejson   # the official imports
    python tools/official_parity.py --swin /tmp/Swin-Transformer --mvit /tmp/mvit \
        --slowfast /tmp/SlowFast --videomae /tmp/VideoMAE --videomae_v2 /tmp/VideoMAEv2 \
        --out runs/official_parity.json

It runs on the CPU (about 15 minutes on 2 cores for all cases). The official Swin and VideoMAE modules import
five helpers from timm (`DropPath`, `drop_path`, `to_2tuple`, `trunc_normal_`,
`register_model`); where timm is not installed this tool stands in for them (drop path is the
identity in eval mode, where every comparison runs).
Exit status 1 when a case differs by more than --tol (relative to the output's largest value)
or a parameter count differs.
"""
from __future__ import annotations

import argparse
import importlib
import json
import os
import sys
import tempfile
import time
import types

import numpy as np


def _timm_stand_ins():
  """The timm helpers the official Swin and VideoMAE modules import, when timm is absent."""
  try:
    importlib.import_module("timm.models.layers")
    return "timm " + importlib.import_module("timm").__version__
  except ImportError:
    pass
  import torch  # pylint: disable=g-import-not-at-top

  class DropPath(torch.nn.Module):
    def __init__(self, drop_prob=0.0):
      super().__init__()
      self.drop_prob = drop_prob

    def forward(self, x):
      if self.training and self.drop_prob:
        raise RuntimeError("this stand-in is for eval mode only")
      return x

  def to_2tuple(x):
    return tuple(x) if isinstance(x, (tuple, list)) else (x, x)

  def drop_path(x, drop_prob=0.0, training=False):
    if training and drop_prob:
      raise RuntimeError("this stand-in is for eval mode only")
    return x

  layers = types.ModuleType("timm.models.layers")
  layers.DropPath, layers.drop_path, layers.to_2tuple = DropPath, drop_path, to_2tuple
  layers.trunc_normal_ = torch.nn.init.trunc_normal_
  registry = types.ModuleType("timm.models.registry")
  registry.register_model = lambda fn: fn
  package = types.ModuleType("timm")
  package.models = types.ModuleType("timm.models")
  package.models.layers, package.models.registry = layers, registry
  sys.modules.update({"timm": package, "timm.models": package.models, "timm.models.layers": layers,
                      "timm.models.registry": registry})
  return "stand-ins (timm not installed)"


def _perturb(module, seed: int, scale: float = 0.02):
  """Every parameter + N(0, scale^2): biases, norms and tokens off their initial values."""
  import torch  # pylint: disable=g-import-not-at-top
  g = torch.Generator().manual_seed(seed)
  with torch.no_grad():
    for p in module.parameters():
      p.add_(torch.randn(p.shape, generator=g) * scale)
  return module.eval()


def _count(tree) -> int:
  import jax  # pylint: disable=g-import-not-at-top
  return int(sum(np.size(x) for x in jax.tree.leaves(tree)))


def _convert(sd: dict, wrap: str, arch: str, tmp: str, name: str):
  """Saves `sd` as {wrap: sd} (the official files' layout), runs the convert command line and
  loads the workdir it wrote."""
  import torch  # pylint: disable=g-import-not-at-top
  from mim_jax import teachers  # pylint: disable=g-import-not-at-top
  from mim_jax.convert.__main__ import main as convert_main  # pylint: disable=g-import-not-at-top
  pth, out = os.path.join(tmp, f"{name}.pth"), os.path.join(tmp, name)
  torch.save({wrap: sd}, pth)
  if convert_main(["--from=torch", f"--arch={arch}", pth, out]) != 0:
    raise SystemExit(f"{name}: the conversion failed (its message is above)")
  return teachers.load(out)


def _compare(name: str, got, want, tol: float, **info) -> dict:
  got, want = np.asarray(got, np.float64), np.asarray(want, np.float64)
  if got.shape != want.shape:
    return dict(case=name, ok=False, error=f"shapes {got.shape} vs {want.shape}", **info)
  diff = float(np.abs(got - want).max())
  scale = float(np.abs(want).max())
  return dict(case=name, max_abs_diff=diff, max_abs_ref=scale, rel_diff=diff / max(scale, 1e-12),
              ok=bool(diff <= tol * max(scale, 1.0)), **info)


def _images(batch: int, size: int, seed: int) -> np.ndarray:
  return np.random.default_rng(seed).normal(size=(batch, size, size, 3)).astype(np.float32)


def _nchw(images: np.ndarray):
  import torch  # pylint: disable=g-import-not-at-top
  return torch.from_numpy(np.ascontiguousarray(images.transpose(0, 3, 1, 2)))


def _state_dict(module) -> dict:
  return {k: v.detach().clone() for k, v in module.state_dict().items()}


def swin_classifier(name, version, tmp, tol, batch, seed, **kw):
  import torch  # pylint: disable=g-import-not-at-top
  if version == 1:
    from models.swin_transformer import SwinTransformer as Official  # pylint: disable=g-import-not-at-top
  else:
    from models.swin_transformer_v2 import SwinTransformerV2 as Official  # pylint: disable=g-import-not-at-top
  torch.manual_seed(seed)
  model = _perturb(Official(**kw), seed)
  images = _images(batch, kw.get("img_size", 224), seed)
  with torch.no_grad():
    want = model(_nchw(images)).numpy()
  run = _convert(_state_dict(model), "model", "swin" if version == 1 else "swinv2", tmp, name)
  got = run.method.features(run.params, run.method_state, images)["logits"]
  return _compare(name, got, want, tol, output="logits",
                  official_params=sum(p.numel() for p in model.parameters()),
                  mim_jax_params=_count(run.params))


def simmim_swin(name, version, tmp, tol, batch, seed, norm_target=0, **kw):
  """The official SimMIM(encoder=Swin(V2)ForSimMIM, encoder_stride=32) against the converted
  run's encoder + decoder for one mask of SimMIM.make_mask."""
  import jax  # pylint: disable=g-import-not-at-top
  import jax.numpy as jnp  # pylint: disable=g-import-not-at-top
  import torch  # pylint: disable=g-import-not-at-top
  import models.simmim as official  # pylint: disable=g-import-not-at-top
  from mim_jax.methods import simmim  # pylint: disable=g-import-not-at-top
  enc_cls = official.SwinTransformerForSimMIM if version == 1 else official.SwinTransformerV2ForSimMIM
  torch.manual_seed(seed)
  norm_cfg = types.SimpleNamespace(NORM_TARGET=types.SimpleNamespace(
      ENABLE=bool(norm_target), PATCH_SIZE=norm_target or 47))
  model = official.SimMIM(norm_cfg, enc_cls(num_classes=0, **kw), encoder_stride=32,
                          in_chans=3, patch_size=kw.get("patch_size", 4))
  model = _perturb(model, seed)
  size = kw["img_size"]
  images = _images(batch, size, seed)
  run = _convert(_state_dict(model), "model", "swin" if version == 1 else "swinv2", tmp, name)
  method = run.method
  mask = np.asarray(method.make_mask(jax.random.PRNGKey(seed), batch))   # [B, H/p, W/p]
  with torch.no_grad():
    want_loss = float(model(_nchw(images), torch.from_numpy(mask.astype(np.float32))))
    want_rec = model.decoder(model.encoder(_nchw(images),
                                           torch.from_numpy(mask.astype(np.float32)))).numpy()
  out = method.encode(run.params["encoder"], jnp.asarray(images), jnp.asarray(mask))
  rec = method.decoder.apply({"params": run.params["decoder"]}, out["tokens"], out["grid"])
  pixel_mask = jnp.repeat(jnp.repeat(jnp.asarray(mask), method.patch, 1), method.patch, 2)
  target = simmim.norm_targets(jnp.asarray(images), norm_target) if norm_target else images
  loss = float(simmim.simmim_loss(target, rec, pixel_mask))
  row = _compare(name, np.asarray(rec), want_rec.transpose(0, 2, 3, 1), tol,
                 output="reconstruction", official_params=sum(p.numel() for p in model.parameters()),
                 mim_jax_params=_count(run.params), mask_ratio=float(mask.mean()),
                 loss=loss, official_loss=want_loss)
  row["loss_rel_diff"] = abs(loss - want_loss) / abs(want_loss)
  row["ok"] = bool(row["ok"] and row["loss_rel_diff"] <= tol)
  return row


def mvit_classifier(name, tmp, tol, batch, seed, mvit_dir, yaml_name, image_size=224):
  import torch  # pylint: disable=g-import-not-at-top
  from mvit.config.defaults import get_cfg  # pylint: disable=g-import-not-at-top
  from mvit.models.mvit_model import MViT  # pylint: disable=g-import-not-at-top
  cfg = get_cfg()
  cfg.merge_from_file(os.path.join(mvit_dir, "configs", yaml_name))
  cfg.DATA.TRAIN_CROP_SIZE = cfg.DATA.TEST_CROP_SIZE = image_size
  torch.manual_seed(seed)
  model = _perturb(MViT(cfg), seed)
  images = _images(batch, image_size, seed)
  logits = []
  hook = model.head.projection.register_forward_hook(lambda m, i, o: logits.append(o))
  with torch.no_grad():
    model(_nchw(images))
  hook.remove()
  run = _convert(_state_dict(model), "model_state", "mvitv2", tmp, name)
  got = run.method.features(run.params, run.method_state, images)["logits"]
  return _compare(name, got, logits[0].numpy(), tol, output="logits (pre-softmax)",
                  official_params=sum(p.numel() for p in model.parameters()),
                  mim_jax_params=_count(run.params))


def _slowfast_imports(slowfast_dir: str):
  """SlowFast's model modules import its whole package (datasets, visualisation, detection
  heads); the packages only those parts use are given empty stand-ins here, so that the
  models import with torch, fvcore, iopath and simplejson alone. Nothing stood in for runs in
  a MaskMViT forward pass (eval mode, one process)."""
  import importlib.abc  # pylint: disable=g-import-not-at-top
  import importlib.machinery  # pylint: disable=g-import-not-at-top

  class Absent(types.ModuleType):
    def __getattr__(self, name):
      if name.startswith("__"):
        raise AttributeError(name)
      def unavailable(*args, **kwargs):
        raise RuntimeError(f"{self.__name__}.{name} is a stand-in: not installed")
      return type(name, (), {"__init__": unavailable, "__call__": unavailable})

  class Finder(importlib.abc.MetaPathFinder, importlib.abc.Loader):
    roots = ("pytorchvideo", "detectron2", "torchvision", "cv2", "av", "scipy", "sklearn",
             "pandas", "matplotlib", "moviepy", "tensorboard")

    def find_spec(self, name, path, target=None):
      if name.split(".")[0] not in self.roots:
        return None
      try:                                     # a package that is installed is used as it is
        if importlib.machinery.PathFinder.find_spec(name.split(".")[0]) is not None:
          return None
      except (ImportError, ValueError):
        pass
      return importlib.machinery.ModuleSpec(name, self, is_package=True)

    def create_module(self, spec):
      return Absent(spec.name)

    def exec_module(self, module):
      module.__path__ = []

  sys.meta_path.append(Finder())
  sys.path.insert(0, slowfast_dir)


def maskfeat_video(name, tmp, tol, batch, seed, slowfast_dir):
  """SlowFast's MaskMViT (configs/masked_ssl/k400_MVITv2_S_16x4_MaskFeat_PT.yaml) against
  configs/maskfeat.py:k400_mvitv2_s on one 16-frame 224 px clip per sample and one cube mask
  of `MaskFeat.make_mask`: the predictions and HOG targets of the masked tokens and the loss."""
  del tmp
  import jax  # pylint: disable=g-import-not-at-top
  import jax.numpy as jnp  # pylint: disable=g-import-not-at-top
  import torch  # pylint: disable=g-import-not-at-top
  from slowfast.config.defaults import assert_and_infer_cfg, get_cfg  # pylint: disable=g-import-not-at-top
  from slowfast.models import losses  # pylint: disable=g-import-not-at-top
  from slowfast.models.masked import MaskMViT  # pylint: disable=g-import-not-at-top
  from mim_jax import config_lib, methods  # pylint: disable=g-import-not-at-top
  from mim_jax.convert import mvit as mvit_conv  # pylint: disable=g-import-not-at-top
  from mim_jax.convert.names import take_shaped  # pylint: disable=g-import-not-at-top
  cfg = get_cfg()
  cfg.merge_from_file(os.path.join(slowfast_dir, "configs", "masked_ssl",
                                   "k400_MVITv2_S_16x4_MaskFeat_PT.yaml"))
  cfg.NUM_GPUS = 0
  cfg = assert_and_infer_cfg(cfg)
  torch.manual_seed(seed)
  model = _perturb(MaskMViT(cfg), seed)
  config = config_lib.load("maskfeat", "k400_mvitv2_s")
  config.model.dtype = "float32"
  method = methods.get(config)
  sd = {k: v.numpy() for k, v in _state_dict(model).items()}
  params = take_shaped(sd, mvit_conv.entries(method.encoder, maskfeat_dim=method.head.out_dim),
                       lacks="mim_jax's map needs", not_ours="a MaskMViT's", misfit="mim_jax's map",
                       ignored=[k for k in sd if k.startswith("hogs.")])   # HOG filter buffers
  size, frames = config.input.image_size, config.model.num_frames
  clips = np.random.default_rng(seed).normal(
      size=(batch, frames, size, size, 3)).astype(np.float32)
  mask = np.asarray(method.make_mask(jax.random.PRNGKey(seed), batch))       # [B, 8*7*7]
  x = torch.from_numpy(np.ascontiguousarray(clips.transpose(0, 4, 1, 2, 3)))  # B C T H W
  with torch.no_grad():
    outputs, labels = model([x, None, torch.from_numpy(mask.reshape(batch, *method.window)
                                                        .astype(np.float32))])
    want_loss = float(losses.get_loss_func("multi_mse")()(outputs, labels)[0])  # (sum, per depth)
  pred = method.forward(params, jnp.asarray(clips), jnp.asarray(mask), train=False)
  out_mask = np.asarray(method.output_mask(jnp.asarray(mask))).astype(bool)
  target = np.asarray(method.target(jnp.asarray(clips)))
  from mim_jax.methods import maskfeat  # pylint: disable=g-import-not-at-top
  loss = float(maskfeat.maskfeat_loss(pred, jnp.asarray(target), jnp.asarray(out_mask)))
  row = _compare(name, np.asarray(pred)[out_mask], outputs[0].numpy(), tol,
                 output="masked predictions", official_params=sum(p.numel() for p in model.parameters()),
                 mim_jax_params=_count(params), mask_ratio=float(out_mask.mean()),
                 loss=loss, official_loss=want_loss)
  row["target_max_abs_diff"] = float(np.abs(target[out_mask] - labels[0][0].numpy()).max())
  off = np.abs(target[out_mask] - labels[0][0].numpy()) > tol
  row["target_values_off"], row["target_values"] = int(off.sum()), int(off.size)
  row["target_tokens_off"] = int(off.any(axis=-1).sum())
  row["loss_rel_diff"] = abs(loss - want_loss) / abs(want_loss)
  # A pixel whose gradient angle lies within float32 rounding of a HOG bin edge can fall into
  # the neighbouring bin (the two Sobel sums differ in their last bits): that moves one cell's
  # histogram. Such tokens may be at most 0.1% of the masked ones; the rest must be equal.
  tokens = int(out_mask.sum())
  row["ok"] = bool(row["ok"] and row["target_tokens_off"] <= 1e-3 * tokens
                   and row["loss_rel_diff"] <= tol)
  return row


def _videomae_entries(enc_depth: int, dec_depth: int) -> list:
  """The official PretrainVisionTransformer's names <-> mim_jax's VideoMAE parameters, from the
  converters' ViT block map (`names.block_entries`, BEiT-style q / v biases); the Conv3d patch
  kernel is read apart (`_videomae_patch`)."""
  from mim_jax.convert import names  # pylint: disable=g-import-not-at-top
  Entry = names.Entry  # pylint: disable=invalid-name
  spec = names.ViTSpec(width=0, depth=0, heads=0, patch=0, grid=0, qkv_bias="qv")
  out = [Entry("encoder.patch_embed.proj.bias", ("encoder", "patch_embed", "proj", "bias"))]
  for i in range(enc_depth):
    out += names.block_entries(spec, "encoder.blocks.", ("encoder", "encoder"), i, "beit")
  out += [Entry("encoder.norm.weight", ("encoder", "encoder", "norm", "scale")),
          Entry("encoder.norm.bias", ("encoder", "encoder", "norm", "bias")),
          Entry("encoder_to_decoder.weight", ("decoder", "encoder_to_decoder", "kernel"), "linear"),
          Entry("mask_token", ("decoder", "mask_token"))]
  for i in range(dec_depth):
    out += names.block_entries(spec, "decoder.blocks.", ("decoder", "blocks"), i, "beit")
  return out + [Entry("decoder.norm.weight", ("decoder", "norm", "scale")),
                Entry("decoder.norm.bias", ("decoder", "norm", "bias")),
                Entry("decoder.head.weight", ("decoder", "head", "kernel"), "linear"),
                Entry("decoder.head.bias", ("decoder", "head", "bias"))]


def _videomae_v2_models(repo: str):
  """OpenGVLab/VideoMAEv2's `models` package under its own name (Swin-Transformer's checkout
  has a `models` package too)."""
  import importlib.util  # pylint: disable=g-import-not-at-top
  root = os.path.join(repo, "models")
  spec = importlib.util.spec_from_file_location("videomae_v2_models", os.path.join(root, "__init__.py"),
                                                submodule_search_locations=[root])
  package = importlib.util.module_from_spec(spec)
  sys.modules["videomae_v2_models"] = package
  spec.loader.exec_module(package)
  return importlib.import_module("videomae_v2_models.modeling_pretrain")


def videomae_pretraining(name, tmp, tol, batch, seed, videomae_dir, v2=False):
  """MCG-NJU/VideoMAE's pretrain_videomae_base_patch16_224 (decoder depth 4) against
  configs/videomae.py:kinetics400 on one 16-frame 224 px clip per sample and one tube mask of
  `VideoMAE.masks` (the official forward's `bool_masked_pos`): the decoder's predictions of the
  masked cubes, and the loss against engine_for_pretraining.py's normalised-cube target.
  `v2`: OpenGVLab/VideoMAEv2's model and loss with its dual masking (decoder mask ratio 0.5,
  the running-cell mask of `VideoMAE.masks` as the official `decode_masked_pos`)."""
  del tmp
  import jax  # pylint: disable=g-import-not-at-top
  import jax.numpy as jnp  # pylint: disable=g-import-not-at-top
  import torch  # pylint: disable=g-import-not-at-top
  from einops import rearrange  # pylint: disable=g-import-not-at-top
  from mim_jax import config_lib, methods  # pylint: disable=g-import-not-at-top
  if v2:
    modeling_pretrain = _videomae_v2_models(videomae_dir)
  else:
    import modeling_pretrain  # pylint: disable=g-import-not-at-top
  torch.manual_seed(seed)
  model = _perturb(modeling_pretrain.pretrain_videomae_base_patch16_224(decoder_depth=4), seed)
  config = config_lib.load("videomae", "kinetics400")
  config.model.dtype = "float32"
  if v2:
    config.videomae.decoder_mask_ratio = 0.5
  method = methods.get(config)
  size, frames = config.input.image_size, config.input.data.num_frames
  clips = np.random.default_rng(seed).normal(size=(batch, frames, size, size, 3)).astype(np.float32)
  shapes = jax.eval_shape(method.init, jax.random.PRNGKey(0), jnp.asarray(clips[:1]))
  from mim_jax.convert import names  # pylint: disable=g-import-not-at-top
  sd = {k: v.numpy() for k, v in _state_dict(model).items()}
  used = {"encoder.patch_embed.proj.weight"}
  flat = {tuple(getattr(q, "key", q) for q in path): x.shape
          for path, x in jax.tree_util.tree_flatten_with_path(shapes)[0]}
  depths = [sum(k.startswith("block") for k in tree) for tree in
            (shapes["encoder"]["encoder"], shapes["decoder"]["blocks"])]
  params, missing, bad = names.take(sd, _videomae_entries(*depths), flat, used)
  w = sd["encoder.patch_embed.proj.weight"]            # Conv3d [D, C, t, p, p] -> [t*p*p*C, D]
  params["encoder"]["patch_embed"]["proj"]["kernel"] = w.transpose(2, 3, 4, 1, 0).reshape(
      -1, w.shape[0]).astype(np.float32)
  if missing or bad or set(sd) != used:
    raise SystemExit(f"{name}: official keys missing {missing}, misshapen {bad}, unmapped "
                     f"{sorted(set(sd) - used)}")
  if jax.tree.structure(params) != jax.tree.structure(shapes):
    raise SystemExit(f"{name}: the map does not fill every mim_jax parameter")
  rng = jax.random.PRNGKey(seed)
  mask, _, decode_ids = method.masks(jax.random.split(rng, 3)[0], batch)    # as loss() draws them
  mask = np.asarray(mask)
  x = torch.from_numpy(np.ascontiguousarray(clips.transpose(0, 4, 1, 2, 3)))  # B C T H W
  bool_masked_pos = torch.from_numpy(mask.copy())
  not_decoded = np.ones_like(mask)
  np.put_along_axis(not_decoded, np.asarray(decode_ids), False, axis=1)
  decode_masked_pos = torch.from_numpy(not_decoded)
  with torch.no_grad():
    outputs = model(x, bool_masked_pos, decode_masked_pos) if v2 else model(x, bool_masked_pos)
    mean = torch.as_tensor(config.input.mean)[None, :, None, None, None]
    std = torch.as_tensor(config.input.std)[None, :, None, None, None]
    squeeze = rearrange(x * std + mean, "b c (t p0) (h p1) (w p2) -> b (t h w) (p0 p1 p2) c",
                        p0=2, p1=16, p2=16)
    norm = (squeeze - squeeze.mean(dim=-2, keepdim=True)) / (
        squeeze.var(dim=-2, unbiased=True, keepdim=True).sqrt() + 1e-6)
    patches = rearrange(norm, "b n p c -> b n (p c)")
    if v2:     # VideoMAEv2's engine: the decoded cubes' errors, counted where the encoder masked
      labels = patches[~decode_masked_pos].reshape(batch, -1, patches.shape[-1])
      counted = bool_masked_pos[~decode_masked_pos].reshape(batch, -1)
      per_cube = ((outputs - labels) ** 2).mean(dim=-1)
      want_loss = float((per_cube * counted).sum() / counted.sum())
    else:
      labels = patches[bool_masked_pos].reshape(batch, -1, patches.shape[-1])
      want_loss = float(torch.nn.MSELoss()(outputs, labels))
  pred, got_mask, _ = method.forward(params, jnp.asarray(clips), rng, train=False)
  if not np.array_equal(np.asarray(got_mask), mask):
    raise SystemExit(f"{name}: the method's forward drew another mask than its masks()")
  loss = float(method.loss(params, {}, jnp.asarray(clips), rng, 0)[0])
  row = _compare(name, np.asarray(pred), outputs.numpy(), tol,
                 output=f"{'decoded' if v2 else 'masked'}-cube predictions",
                 official_params=sum(p.numel() for p in model.parameters()),
                 mim_jax_params=_count(params), mask_ratio=float(mask.mean()), loss=loss,
                 official_loss=want_loss)
  row["loss_rel_diff"] = abs(loss - want_loss) / abs(want_loss)
  row["ok"] = bool(row["ok"] and row["loss_rel_diff"] <= tol)
  return row


def main(argv=None) -> int:
  p = argparse.ArgumentParser(description=__doc__,
                              formatter_class=argparse.RawDescriptionHelpFormatter)
  p.add_argument("--swin", default="", help="a checkout of microsoft/Swin-Transformer")
  p.add_argument("--mvit", default="", help="a checkout of facebookresearch/mvit")
  p.add_argument("--slowfast", default="", help="a checkout of facebookresearch/SlowFast")
  p.add_argument("--videomae", default="", help="a checkout of MCG-NJU/VideoMAE")
  p.add_argument("--videomae_v2", default="", help="a checkout of OpenGVLab/VideoMAEv2")
  p.add_argument("--out", default="", help="the JSON record to write")
  p.add_argument("--tol", type=float, default=1e-4)
  p.add_argument("--batch", type=int, default=2)
  p.add_argument("--seed", type=int, default=0)
  p.add_argument("--cases", default="", help="comma-separated case names (default: all)")
  args = p.parse_args(argv)
  repos = (args.swin, args.mvit, args.slowfast, args.videomae, args.videomae_v2)
  if not any(repos):
    p.error("give --swin, --mvit, --slowfast, --videomae and/or --videomae_v2 (checkouts of "
            "the official repositories)")
  for d in repos:
    if d and not os.path.isdir(d):
      p.error(f"{d} is not a directory: clone the official repository there first")
  import torch  # pylint: disable=g-import-not-at-top
  torch.set_num_threads(os.cpu_count() or 1)
  helpers = _timm_stand_ins() if (args.swin or args.videomae or args.videomae_v2) else ""
  sys.path[:0] = [d for d in (args.swin, args.mvit, args.videomae) if d]
  b, s, tol = args.batch, args.seed, args.tol
  cases = []
  if args.swin:
    cases += [
        ("swin_t_224_w7", lambda t: swin_classifier("swin_t_224_w7", 1, t, tol, b, s)),
        ("swin_b_224_w7", lambda t: swin_classifier(
            "swin_b_224_w7", 1, t, tol, b, s, embed_dim=128, depths=[2, 2, 18, 2],
            num_heads=[4, 8, 16, 32])),
        ("swinv2_t_256_w8", lambda t: swin_classifier(
            "swinv2_t_256_w8", 2, t, tol, b, s, img_size=256, window_size=8)),
        ("swinv2_b_256_w16_from_w12", lambda t: swin_classifier(
            "swinv2_b_256_w16_from_w12", 2, t, tol, b, s, img_size=256, window_size=16,
            embed_dim=128, depths=[2, 2, 18, 2], num_heads=[4, 8, 16, 32],
            pretrained_window_sizes=[12, 12, 12, 6])),
        ("simmim_swin_b_192_w6", lambda t: simmim_swin(
            "simmim_swin_b_192_w6", 1, t, tol, b, s, img_size=192, window_size=6,
            embed_dim=128, depths=[2, 2, 18, 2], num_heads=[4, 8, 16, 32])),
        ("simmim_swinv2_b_192_w12_norm47", lambda t: simmim_swin(
            "simmim_swinv2_b_192_w12_norm47", 2, t, tol, b, s, norm_target=47, img_size=192,
            window_size=12, embed_dim=128, depths=[2, 2, 18, 2], num_heads=[4, 8, 16, 32])),
    ]
  if args.mvit:
    for v in ("T", "S", "B"):
      n = f"mvitv2_{v.lower()}_224"
      cases.append((n, lambda t, n=n, v=v: mvit_classifier(n, t, tol, b, s, args.mvit,
                                                            f"MVITv2_{v}.yaml")))
  if args.slowfast:
    _slowfast_imports(args.slowfast)
    cases.append(("maskfeat_k400_mvitv2_s_16x4", lambda t: maskfeat_video(
        "maskfeat_k400_mvitv2_s_16x4", t, tol, b, s, args.slowfast)))
  if args.videomae:
    cases.append(("videomae_vit_b_16x224", lambda t: videomae_pretraining(
        "videomae_vit_b_16x224", t, tol, b, s, args.videomae)))
  if args.videomae_v2:
    cases.append(("videomae_v2_dual_vit_b_16x224", lambda t: videomae_pretraining(
        "videomae_v2_dual_vit_b_16x224", t, tol, b, s, args.videomae_v2, v2=True)))
  wanted = [c for c in args.cases.split(",") if c]
  unknown = sorted(set(wanted) - {n for n, _ in cases})
  if unknown:
    p.error(f"unknown --cases {unknown}: choose from {[n for n, _ in cases]}")
  rows = []
  with tempfile.TemporaryDirectory() as tmp:
    for n, fn in cases:
      if wanted and n not in wanted:
        continue
      t0 = time.time()
      row = fn(tmp)
      row["seconds"] = round(time.time() - t0, 1)
      rows.append(row)
      print(json.dumps(row), flush=True)
  ok = all(r["ok"] and r["official_params"] == r["mim_jax_params"] for r in rows)
  print("\n| case | output | params (official = mim_jax) | max abs diff | max abs output | ok |")
  print("|---|---|---|---|---|---|")
  for r in rows:
    same = "yes" if r["official_params"] == r["mim_jax_params"] else (
        f"NO: {r['official_params']:,} vs {r['mim_jax_params']:,}")
    extra = (f"; loss {r['loss']:.6f} vs {r['official_loss']:.6f}" if "loss" in r else "")
    if "target_values" in r:
      extra += (f"; HOG targets: {r['target_values_off']} of {r['target_values']:,} values off "
                f"(max {r['target_max_abs_diff']:.2g}, {r['target_tokens_off']} token(s))")
    print(f"| {r['case']} | {r['output']}{extra} | {r['official_params']:,} ({same}) | "
          f"{r['max_abs_diff']:.2e} | {r['max_abs_ref']:.3g} | {'yes' if r['ok'] else 'NO'} |")
  if args.out:
    os.makedirs(os.path.dirname(os.path.abspath(args.out)), exist_ok=True)
    import jax  # pylint: disable=g-import-not-at-top
    record = dict(command=" ".join(["python", "tools/official_parity.py"] + sys.argv[1:]),
                  date=time.strftime("%Y-%m-%d"), torch=torch.__version__, jax=jax.__version__,
                  timm_helpers=helpers, tol=tol, batch=b, seed=s, rows=rows, ok=ok)
    with open(args.out, "w") as f:
      json.dump(record, f, indent=1)
    print(f"wrote {args.out}")
  return 0 if ok else 1


if __name__ == "__main__":
  sys.exit(main())
