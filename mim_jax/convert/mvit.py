"""Official MViTv2 state dicts <-> mim_jax.models.mvit parameters.

`official_to_params(sd)` reads a facebookresearch/mvit `MViT` state dict (numpy arrays under
its names, e.g. the released MViTv2_{T,S,B,L}_in1k.pyth's 'model_state'; SlowFast's image MViT
with Conv3d pooling kernels [C, 1, 1, k, k] is read too, its time axis of size 1 dropped as
TEST.CHECKPOINT_SQUEEZE_TEMPORAL does) into `{'encoder': ..., ['head': ...]}` and the
`config.model` it describes, inferred from the shapes: width (patch_embed), heads (head dim of
the relative position tables, or the width when there are none), blocks per stage (where the
width changes: in the transition block's attention with DIM_MUL_IN_ATT, in the block before it
otherwise), patch and pooling kernels, cls token, absolute position table. Query strides
(2 at each transition), the patch stride and padding (4, 3) and the adaptive kv stride (4)
leave no parameters: they are the official values unless given, and the relative position
tables' sizes must agree with them at `image_size` (ConversionError otherwise).
`params_to_official` writes the same names back.

Layouts: Conv2d weight [O, I, kh, kw] <-> flax kernel [kh, kw, I, O] (the depthwise pooling
kernels [C, 1, k, k] <-> [k, k, 1, C]); Linear weight [out, in] <-> Dense kernel [in, out];
LayerNorm weight / bias -> scale / bias; cls_token, pos_embed, rel_pos_h, rel_pos_w unchanged.
The classifier `head.projection` becomes the 'head' entry {'fc': kernel, bias} of
configs/finetune.py's ClassifierHead.

SlowFast's video MViT (`is_video`: Conv3d patch and pooling kernels kept 5-D, `rel_pos_t`) and
MaskMViT (`maskfeat_dim`: `mask_token`, `pred_head`) are read the same way.

`convert_checkpoint` (`--arch=mvitv2`) writes a configs/finetune.py workdir (a MaskMViT: a
configs/maskfeat.py one); the convert package registers it in ARCHS and
`convert_torch_checkpoint`.
"""
from __future__ import annotations

import math
import re
from typing import Any

import ml_collections
import numpy as np

from mim_jax.convert.names import ConversionError, fmt_keys, put_shaped, take_shaped
from mim_jax.convert.names import ShapedEntry as Entry
from mim_jax.models import mvit

PyTree = Any


def _linear(t: str, path: tuple, n_in: int, n_out: int, bias: bool = True) -> list[Entry]:
  out = [Entry(f"{t}.weight", (*path, "kernel"), "linear", (n_out, n_in))]
  return out + ([Entry(f"{t}.bias", (*path, "bias"), "same", (n_out,))] if bias else [])


def _norm(t: str, path: tuple, n: int) -> list[Entry]:
  return [Entry(f"{t}.weight", (*path, "scale"), "same", (n,)),
          Entry(f"{t}.bias", (*path, "bias"), "same", (n,))]


def entries(model: mvit.MViT, num_classes: int = 0, maskfeat_dim: int = 0) -> list[Entry]:
  """Every official key of `model` (and of a `num_classes` head), with its mim_jax path and
  torch shape, in the official module order. A video MViT (`num_frames` > 0) has SlowFast's
  names: Conv3d patch and pooling kernels [O, I, t, h, w], `rel_pos_t`. `maskfeat_dim` > 0:
  SlowFast's MaskMViT (slowfast/models/masked.py, one prediction depth, the last block):
  `mask_token`, and `pred_head.transforms.0.0` (its LayerNorm, the encoder's final norm here)
  and `pred_head.projections.0` (MaskFeat's head 'proj') in place of `norm` and `head`."""
  c, k = model.embed_dim, model.patch_kernel
  enc = ("encoder",)
  video = model.num_frames > 0
  conv, kt = ("conv3d", (model.patch_kernel_t,)) if video else ("conv", ())
  out = [Entry("patch_embed.proj.weight", (*enc, "patch_embed", "proj", "kernel"), conv,
               (c, 3, *kt, k, k)),
         Entry("patch_embed.proj.bias", (*enc, "patch_embed", "proj", "bias"), "same", (c,))]
  grid = model.specs[0].grid_in
  if maskfeat_dim:
    out.append(Entry("mask_token", (*enc, "mask_token"), "same", (1, 1, c)))
  if model.cls_token:
    out.append(Entry("cls_token", (*enc, "cls_token"), "same", (1, 1, c)))
  if model.abs_pos:
    out.append(Entry("pos_embed", (*enc, "pos_embed"), "same",
                     (1, model.specs[0].frames * grid * grid + int(model.cls_token), c)))
  for i, sp in enumerate(model.specs):
    t, b = f"blocks.{i}", (*enc, f"block{i:02d}")
    d = sp.head_dim
    out += _norm(f"{t}.norm1", (*b, "norm1"), sp.dim)
    out += _linear(f"{t}.attn.qkv", (*b, "attn", "qkv"), sp.dim, 3 * sp.att_dim, model.qkv_bias)
    out += _linear(f"{t}.attn.proj", (*b, "attn", "proj"), sp.att_dim, sp.att_dim)
    for name, kernel in (("q", sp.q_kernel), ("k", sp.kv_kernel), ("v", sp.kv_kernel)):
      if kernel:
        out.append(Entry(f"{t}.attn.pool_{name}.weight", (*b, "attn", f"pool_{name}", "kernel"),
                         conv, (d, 1, *((sp.pool_kernel_t,) if video else ()), kernel, kernel)))
        out += _norm(f"{t}.attn.norm_{name}", (*b, "attn", f"norm_{name}"), d)
    if model.rel_pos:
      for name in ("rel_pos_h", "rel_pos_w"):
        out.append(Entry(f"{t}.attn.{name}", (*b, "attn", name), "same", (sp.rel_pos_size, d)))
      if sp.rel_pos_t_size:
        out.append(Entry(f"{t}.attn.rel_pos_t", (*b, "attn", "rel_pos_t"), "same",
                         (sp.rel_pos_t_size, d)))
    out += _norm(f"{t}.norm2", (*b, "norm2"), sp.att_dim)
    hidden = int(sp.att_dim * model.mlp_ratio)
    out += _linear(f"{t}.mlp.fc1", (*b, "mlp", "fc1"), sp.att_dim, hidden)
    out += _linear(f"{t}.mlp.fc2", (*b, "mlp", "fc2"), hidden, sp.dim_out)
    if sp.dim != sp.dim_out:
      out += _linear(f"{t}.proj", (*b, "proj"), sp.dim, sp.dim_out)
  if maskfeat_dim:
    out += _norm("pred_head.transforms.0.0", (*enc, "norm"), model.num_features)
    return out + _linear("pred_head.projections.0", ("head", "proj"), model.num_features,
                         maskfeat_dim)
  out += _norm("norm", (*enc, "norm"), model.num_features)
  if num_classes:
    out += _linear("head.projection", ("head", "fc"), model.num_features, num_classes)
  return out


def is_video(sd: dict) -> bool:
  """Whether an official state dict is SlowFast's video MViT: a temporal relative position
  table, or a patch kernel that spans frames."""
  pw = np.shape(sd.get("patch_embed.proj.weight", ()))
  return "blocks.0.attn.rel_pos_t" in sd or (len(pw) == 5 and pw[2] > 1)


def _squeezed(key: str, x: np.ndarray) -> np.ndarray:
  """SlowFast's Conv3d pooling kernels [C, 1, 1, k, k] (and patch kernels [C, 3, 1, k, k]) of
  an image MViT as 2-D ones; anything else unchanged."""
  if x.ndim == 5 and re.search(r"(pool_[qkv]|patch_embed\.proj)\.weight$", key):
    if x.shape[2] != 1:
      raise ConversionError(f"{key} {list(x.shape)} spans {x.shape[2]} frames in an image MViT's "
                            f"state dict: its other kernels have one")
    return x[:, :, 0]
  return x


def unwrap(obj: Any) -> dict:
  """The state dict inside an official checkpoint ({'model_state': sd} as mvit / SlowFast save
  it), with a 'module.' (DDP) prefix removed; an image MViT's Conv3d kernels squeezed to 2-D
  (a video MViT's kept)."""
  if not isinstance(obj, dict):
    raise ConversionError(f"the checkpoint holds a {type(obj).__name__}, not a state dict")
  sd = obj.get("model_state", obj)
  if not isinstance(sd, dict):
    raise ConversionError("the checkpoint's 'model_state' is not a state dict")
  sd = {k[len("module."):] if k.startswith("module.") else k: np.asarray(v) for k, v in sd.items()}
  return sd if is_video(sd) else {k: _squeezed(k, v) for k, v in sd.items()}


def maskfeat_dim(sd: dict) -> int:
  """The HOG width of SlowFast's MaskMViT prediction head (pred_head.projections.0), 0 for a
  plain MViT."""
  w = sd.get("pred_head.projections.0.weight")
  return int(np.shape(w)[0]) if w is not None else 0


def config_from_official(sd: dict, *, image_size: int = 224, stage_strides: tuple = (),
                         patch_stride: int = 4, patch_padding: int = 3, kv_stride: int = 0,
                         num_frames: int = 0, patch_stride_t: int = 2,
                         patch_padding_t: int = 1) -> tuple[ml_collections.ConfigDict, int]:
  """(`config.model`, number of classes: 0 without head) of an official state dict.

  A video MViT (`is_video`; SlowFast's) reads its patch and pooling kernels' time extent from
  the Conv3d kernels and its clip length from rel_pos_t (2 T' - 1 rows, T' = num_frames /
  patch_stride_t; give `num_frames` for a model without it). Defaults that leave no parameter:
  query strides 2 at every stage transition, except the last for a MaskMViT (pred_head keys:
  SlowFast's MaskFeat MViT yamls keep the last stage's grid, "instead of [14, 1, 2, 2] for
  14x14 output"); adaptive kv stride 4 for an image MViT, 8 for a video one
  (POOL_KV_STRIDE_ADAPTIVE [1, 8, 8] of the Kinetics yamls)."""
  if "patch_embed.proj.weight" not in sd or "blocks.0.attn.qkv.weight" not in sd:
    raise ConversionError(f"not an official MViT state dict: no patch_embed.proj.weight / "
                          f"blocks.0.attn.qkv.weight (keys: {fmt_keys(sorted(sd))})")
  pw = np.shape(sd["patch_embed.proj.weight"])
  video = is_video(sd)
  if len(pw) != (5 if video else 4) or pw[1] != 3 or pw[-2] != pw[-1]:
    raise ConversionError(f"patch_embed.proj.weight {list(pw)} is not a square RGB convolution")
  depth = 1 + max(int(m.group(1)) for k in sd for m in [re.match(r"blocks\.(\d+)\.", k)] if m)
  embed = int(pw[0])
  width = lambda i: int(np.shape(sd[f"blocks.{i}.mlp.fc2.weight"])[0])  # noqa: E731
  att = lambda i: int(np.shape(sd[f"blocks.{i}.attn.qkv.weight"])[0]) // 3  # noqa: E731
  dims_in = [embed] + [width(i) for i in range(depth - 1)]
  changes = [i for i in range(depth) if width(i) != dims_in[i]]
  in_att = all(att(i) == width(i) for i in changes) if changes else True
  starts = changes if in_att else [i + 1 for i in changes]
  bounds = [0, *starts, depth]
  stage_blocks = tuple(bounds[j + 1] - bounds[j] for j in range(len(bounds) - 1))
  if "blocks.0.attn.rel_pos_h" in sd:
    heads = att(0) // int(np.shape(sd["blocks.0.attn.rel_pos_h"])[1])
  elif "blocks.0.attn.pool_q.weight" in sd:
    heads = att(0) // int(np.shape(sd["blocks.0.attn.pool_q.weight"])[0])
  else:
    raise ConversionError("no relative position table or pooling kernel in block 0: the head "
                          "count cannot be read from the weights")
  pool_w = next((np.shape(v) for k, v in sd.items() if k.endswith("attn.pool_q.weight")), None)
  pool = int(pool_w[-1]) if pool_w is not None else 1
  strides = tuple(stage_strides) or (2,) * (len(stage_blocks) - 2) + (
      (1 if maskfeat_dim(sd) else 2,) if len(stage_blocks) > 1 else ())
  video_kw = {}
  if video:
    if "blocks.0.attn.rel_pos_t" in sd:
      rows = int(np.shape(sd["blocks.0.attn.rel_pos_t"])[0])
      num_frames = num_frames or (rows + 1) // 2 * patch_stride_t
    if not num_frames:
      raise ConversionError("a video MViT without temporal relative positions does not give "
                            "its clip length: pass num_frames")
    video_kw = dict(num_frames=int(num_frames), patch_kernel_t=int(pw[2]),
                    patch_stride_t=patch_stride_t, patch_padding_t=patch_padding_t,
                    pool_kernel_t=int(pool_w[2]) if pool_w is not None else 1,
                    rel_pos_temporal="blocks.0.attn.rel_pos_t" in sd)
  cfg = mvit.default_config(
      embed_dim=embed, num_heads=heads, stage_blocks=stage_blocks, stage_strides=strides,
      patch_kernel=int(pw[-1]), patch_stride=patch_stride, patch_padding=patch_padding,
      pool_kernel=pool, kv_stride=kv_stride or (8 if video else 4),
      qkv_bias="blocks.0.attn.qkv.bias" in sd, cls_token="cls_token" in sd,
      abs_pos="pos_embed" in sd, rel_pos="blocks.0.attn.rel_pos_h" in sd,
      dim_mul_in_att=in_att, **video_kw)
  num_classes = int(np.shape(sd["head.projection.weight"])[0]) if "head.projection.weight" in sd else 0
  try:
    mvit.from_config(cfg, image_size)
  except ValueError as e:
    raise ConversionError(f"the weights give an MViT that does not build at {image_size}px: {e}") from None
  return cfg, num_classes


def official_to_params(sd: dict, *, image_size: int = 224, **geometry) -> tuple[dict, ml_collections.ConfigDict, int]:
  """({'encoder': ..., ['head': {'fc': ...}]} float32 numpy, `config.model`, classes) of an
  official MViT state dict (a MaskMViT's: {'encoder' with its mask_token, 'head': {'proj'}},
  MaskFeat's tree); `geometry` (stage_strides, patch_stride, patch_padding, kv_stride, video:
  num_frames, patch_stride_t, patch_padding_t) where they are not the defaults of
  `config_from_official`. ConversionError, one line, for missing, unknown or misshapen keys."""
  cfg, num_classes = config_from_official(sd, image_size=image_size, **geometry)
  params = take_shaped(
      sd, entries(mvit.from_config(cfg, image_size), num_classes, maskfeat_dim(sd)),
      lacks="the state dict lacks, of the MViT its shapes describe,",
      not_ours=f"{'a video' if cfg.num_frames else 'an image'} MViT's",
      misfit=f"the MViT at {image_size}px with query strides {tuple(cfg.stage_strides)}, kv "
             f"stride {cfg.kv_stride} (the relative position tables fix the strides and the "
             f"image size)")
  return params, cfg, num_classes


def params_to_official(params: PyTree, model_cfg, image_size: int = 224,
                       dtype: Any = np.float32) -> dict:
  """{official key: numpy array in torch layout} of `params` ({'encoder': ..., ['head':
  {'fc': ...}]}) of the MViT `model_cfg` describes."""
  head = params.get("head") if isinstance(params.get("head"), dict) else {}
  num_classes = int(np.shape(head["fc"]["kernel"])[1]) if "fc" in head else 0
  hog = int(np.shape(head["proj"]["kernel"])[1]) if "proj" in head else 0
  return put_shaped(params, entries(mvit.from_config(model_cfg, image_size), num_classes, hog),
                    dtype)


def make_config(model_cfg, num_classes: int, *, image_size: int = 224, preset: str = "",
                config_dir: str = "", maskfeat: int = 0) -> ml_collections.ConfigDict:
  """The run config of a converted MViT, the model set from the weights, ImageNet's mean and
  std and `image_size`: configs/finetune.py (`preset`, default '' for an image MViT,
  'k400_mvitv2_s' for a video one) with its classes from the head, the classifier on what both
  official forwards (mvit, SlowFast) give it without USE_MEAN_POOLING: the final-norm cls token
  ('cls') when the model has one (SlowFast's released Kinetics / SSv2 MViTv2 classifiers), else
  the mean of the final-norm tokens ('avg'; the released image MViTv2s). A checkpoint
  fine-tuned under USE_MEAN_POOLING (MaskFeat's fine-tuning yamls) is read with
  finetune.pooling='mean', which its state dict cannot tell apart; a MaskMViT
  (`maskfeat`: its HOG width) configs/maskfeat.py (`preset`, default 'k400_mvitv2_s' /
  'imagenet_mvitv2_s') with the HOG cell its head width gives at the model's output stride and
  the mask window on the output grid (as the official presets have them)."""
  from mim_jax import config_lib
  video = bool(model_cfg.num_frames)
  name = "maskfeat" if maskfeat else "finetune"
  if not preset and (video or maskfeat):
    preset = "k400_mvitv2_s" if video else "imagenet_mvitv2_s"
  try:
    c = config_lib.load(name, preset, config_dir)
  except FileNotFoundError as e:
    raise ConversionError(str(e)) from None
  c.model = model_cfg
  if maskfeat:
    stride = int(image_size) // mvit.from_config(model_cfg, int(image_size)).specs[-1].grid_q
    per_side = math.isqrt(int(maskfeat) // (3 * int(c.maskfeat.hog_bins)))
    if per_side < 1 or per_side ** 2 * 3 * int(c.maskfeat.hog_bins) != int(maskfeat) or stride % per_side:
      raise ConversionError(f"pred_head.projections.0 predicts {maskfeat} values a token, not "
                            f"HOG of {c.maskfeat.hog_bins} bins x 3 channels on a square of "
                            f"cells dividing the output stride {stride}")
    c.maskfeat.update(hog_cell=stride // per_side, mask_window=())
  else:
    c.finetune.pooling = "cls" if model_cfg.cls_token else "avg"
  if num_classes:
    c.finetune.num_classes = num_classes
  c.input.image_size = int(image_size)
  c.input.mean, c.input.std = (0.485, 0.456, 0.406), (0.229, 0.224, 0.225)
  return c


def convert_checkpoint(path: str, out_dir: str, *, image_size: int = 0, preset: str = "",
                       config_dir: str = "", reader: str = "pure") -> dict:
  """`--arch=mvitv2`: an official MViTv2 checkpoint (facebookresearch/mvit, or SlowFast's image
  or video MViT) -> a configs/finetune.py workdir (the backbone as the encoder, head.projection
  as the classifier); SlowFast's MaskMViT (MaskFeat pretraining, e.g. the released
  k400_MVIT_S_MaskFeat_PT_epoch_00300.pyth) -> a configs/maskfeat.py workdir."""
  from mim_jax import convert
  sd = unwrap(convert.read_checkpoint(path, reader))
  size = int(image_size or 224)
  params, model_cfg, num_classes = official_to_params(sd, image_size=size)
  config = make_config(model_cfg, num_classes, image_size=size, preset=preset,
                       config_dir=config_dir, maskfeat=maskfeat_dim(sd))
  prov = dict(source=path, arch="mvitv2", spec=model_cfg.to_dict())
  return convert.write_workdir(out_dir, config, params, prov, build_config=build_config(config))


def build_config(config) -> ml_collections.ConfigDict | None:
  """For a video MViT's config whose data are files (the Kinetics presets, which this machine
  may not have): the same config on the embedded clips, a batch of one per device, to build
  the step-0 state from (same model, method and optimiser; the written config keeps the
  files). None otherwise."""
  if not config.model.get("num_frames") or config.input.data.name == "embedded_clips":
    return None
  import jax  # pylint: disable=g-import-not-at-top
  build = config.copy_and_resolve_references()
  build.input.data = ml_collections.ConfigDict(dict(
      name="embedded_clips", holdout_per_class=100, num_frames=int(config.model.num_frames)))
  build.input.update(batch_size=jax.device_count(), workers=0)
  build.input.aug.num_sample = 1
  return build
