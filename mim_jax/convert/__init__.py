"""PyTorch ViT weights in and out of mim_jax (`python -m mim_jax.convert`, docs/convert.md).

In: a timm / MAE / BEiT / DINO / iBOT checkpoint (.pth read without torch, or .safetensors)
becomes a mim_jax workdir, a `config.json` and a step-0 Orbax checkpoint written by the
trainer's own `checkpointing.Checkpointer`, so every consumer of a pretraining run
(`Trainer.from_workdir`, `teachers.load`, `config.finetune.pretrained`, `mim_jax.analysis`)
takes it. The config is the repository's `configs/mae.py` (absolute position embedding) or
`configs/simmim.py` (BEiT's shared relative position bias) with the model set from the
weights; the method's other parts (MAE decoder unless the checkpoint has one, SimMIM's linear
decoder, a missing mask token) keep their seeded initialisation and are listed in
`<workdir>/convert.json`. A BEiT v2 VQ-KD tokenizer (`--arch=vqkd`) becomes a configs/vqkd.py
tokenizer workdir instead (mim_jax/convert/vqkd.py), and DALL-E's dVAE encoder (`--arch=dalle`,
BEiT v1's tokenizer) a configs/tokenizer.py one (mim_jax/convert/dalle.py).

Out: a workdir's encoder as a timm-named state dict (torch layouts, float32) in .safetensors,
with the `timm.create_model` call that loads it.
"""
from __future__ import annotations

import dataclasses
import json
import os
from typing import Any, Optional

import numpy as np

from mim_jax import config_lib
from mim_jax.convert import names
from mim_jax.convert.names import ConversionError, ViTSpec
from mim_jax.convert.reader import CheckpointReadError, read_checkpoint  # noqa: F401 (API)
from mim_jax.models import vit

PyTree = Any

ARCHS = ("timm_vit", "mae", "beit", "beitv2", "dino", "ibot", "vqkd", "dalle", "torchvision_resnet",
         "swin", "swinv2", "mvitv2")
_IMAGENET = ((0.485, 0.456, 0.406), (0.229, 0.224, 0.225))
_INCEPTION = ((0.5, 0.5, 0.5), (0.5, 0.5, 0.5))
# The normalisation each family was trained with (timm's pretrained_cfg for timm ViT and BEiT
# v1: 0.5; MAE, DINO, iBOT, BEiT v2: ImageNet's; the VQ-KD tokenizer: pixels in [-1, 1]).
DEFAULT_NORM = {"timm_vit": "inception", "mae": "imagenet", "beit": "inception",
                "beitv2": "imagenet", "dino": "imagenet", "ibot": "imagenet",
                "vqkd": "inception"}


@dataclasses.dataclass
class Converted:
  """A checkpoint read into mim_jax trees."""
  arch: str
  spec: ViTSpec
  params: dict                  # {'encoder': ..., ['decoder': ...]}, float32 numpy
  decoder: Optional[dict]       # MAE decoder dict(width, depth, heads) when converted
  ignored: list[str]            # keys deliberately left out (classifier heads, lm_head, ...)


def _fmt(keys: list[str], n: int = 6) -> str:
  keys = list(keys)
  more = f" (+{len(keys) - n} more)" if len(keys) > n else ""
  return ", ".join(keys[:n]) + more


# ---------------------------------------------------------------------------------------------
# Torch -> mim_jax.

def unwrap(obj: Any, arch: str, which: str = "teacher") -> dict:
  """The flat {key: array} state dict of the network `arch` names inside a loaded checkpoint:
  {'model': sd} (MAE, BEiT), {'module': sd} (BEiT v2), {'teacher': ..., 'student': ...} (DINO /
  iBOT full checkpoints, `which` picks one) or the state dict itself; 'module.' (DDP) and, for
  DINO / iBOT, 'backbone.' prefixes are removed."""
  if arch not in ARCHS:
    raise ConversionError(f"unknown --arch={arch!r}: use one of {', '.join(ARCHS)}")
  if not isinstance(obj, dict):
    raise ConversionError(f"the checkpoint holds a {type(obj).__name__}, not a state dict: save "
                          f"model.state_dict()")
  sd = obj
  if arch in ("dino", "ibot") and ("teacher" in sd or "student" in sd):
    if which not in ("teacher", "student"):
      raise ConversionError(f"--which={which!r}: use 'teacher' or 'student'")
    if which not in sd:
      raise ConversionError(f"the checkpoint has no {which!r} entry (it has {_fmt(sorted(sd))}): "
                            f"use --which={'student' if which == 'teacher' else 'teacher'}")
    sd = sd[which]
  else:
    for key in ("model", "module", "state_dict"):
      if isinstance(sd.get(key), dict):
        sd = sd[key]
        break
  if sd and all(k.startswith("module.") for k in sd):
    sd = {k[len("module."):]: v for k, v in sd.items()}
  if arch in ("dino", "ibot") and any(k.startswith("backbone.") for k in sd):
    sd = {(k[len("backbone."):] if k.startswith("backbone.") else k): v for k, v in sd.items()}
  not_arrays = [k for k, v in sd.items() if not isinstance(v, np.ndarray)]
  if not_arrays:
    raise ConversionError(f"entries {_fmt(not_arrays)} of the checkpoint are not tensors: point at "
                          f"a state dict (or a checkpoint holding one under 'model')")
  return dict(sd)


def infer_spec(sd: dict, arch: str, *, variant: str = "", patch_size: int = 0,
               image_size: int = 0) -> tuple[ViTSpec, str]:
  """(ViTSpec, gamma naming style) of the encoder in state dict `sd`, from its shapes; the
  optional flags must agree with them."""
  w = sd.get("patch_embed.proj.weight")
  if w is None or w.ndim != 4:
    raise ConversionError(
        f"no 4-D patch_embed.proj.weight among the keys ({_fmt(sorted(sd))}): not a ViT state "
        f"dict of --arch={arch}; pick the right --arch or --which")
  width, chans, p, _ = w.shape
  if chans != 3:
    raise ConversionError(f"patch_embed.proj.weight has {chans} input channels: mim_jax's ViT "
                          f"reads RGB")
  if patch_size and patch_size != p:
    raise ConversionError(f"--patch_size={patch_size} but the checkpoint's patches are {p}px: "
                          f"drop the flag")
  if width not in names.WIDTH_TO_VARIANT:
    raise ConversionError(f"width {width} is not a mim_jax ViT variant (widths "
                          f"{sorted(names.WIDTH_TO_VARIANT)}): add it to "
                          f"mim_jax.models.vit.VARIANTS")
  if variant and vit.variant(variant)[0] != width:
    raise ConversionError(f"--variant={variant} has width {vit.variant(variant)[0]} but the "
                          f"checkpoint has {width}: use --variant={names.WIDTH_TO_VARIANT[width]}")
  heads = vit.variant(names.WIDTH_TO_VARIANT[width])[2]
  blocks = names.block_indices(sd, "blocks.")
  if not blocks or blocks != list(range(len(blocks))):
    raise ConversionError(f"the checkpoint's blocks are {blocks[:5]}...: expected blocks.0 .. "
                          f"blocks.N-1")
  if "blocks.0.attn.relative_position_bias_table" in sd:
    raise ConversionError("the checkpoint has a relative position bias per block (a fine-tuned "
                          "BEiT): mim_jax's ViT shares one table; convert the pretraining "
                          "checkpoint")
  qkv = ("qkv" if "blocks.0.attn.qkv.bias" in sd else
         "qv" if "blocks.0.attn.q_bias" in sd else "none")
  style = "beit" if "blocks.0.gamma_1" in sd else "timm"
  layer_scale = "blocks.0.gamma_1" in sd or "blocks.0.ls1.gamma" in sd
  grid, pos, rel = 0, "none", "none"
  if "pos_embed" in sd:
    n = sd["pos_embed"].shape[1] - 1
    grid = int(round(n ** 0.5))
    if grid * grid != n:
      raise ConversionError(f"pos_embed has {n} patch positions, not a square grid (or no cls "
                            f"token)")
    pos = "learned"
    if arch == "mae" and np.allclose(sd["pos_embed"], names.sincos_table(width, grid), atol=1e-5):
      pos = "sincos"      # MAE's fixed table: mim_jax computes it, no parameter
  table = sd.get("rel_pos_bias.relative_position_bias_table")
  if table is not None:
    rel = "shared"
    g = int(round(((table.shape[0] - 3) ** 0.5 + 1) / 2))
    if (2 * g - 1) ** 2 + 3 != table.shape[0] or table.shape[1] != heads:
      raise ConversionError(f"rel_pos_bias.relative_position_bias_table {list(table.shape)} "
                            f"does not fit a square grid with {heads} heads")
    if grid and g != grid:
      raise ConversionError(f"the relative position table is for a {g}x{g} grid, pos_embed "
                            f"for {grid}x{grid}")
    grid = g
  if image_size:
    if image_size % p or (grid and image_size // p != grid):
      raise ConversionError(f"--image_size={image_size} does not fit the checkpoint's "
                            f"{grid}x{grid} grid of {p}px patches: use --image_size={grid * p}")
    grid = image_size // p
  if not grid:
    raise ConversionError("the checkpoint has no position table to read the image size from: "
                          "pass --image_size")
  mask = "mask_token" in sd and arch in ("beit", "beitv2")
  return ViTSpec(width, len(blocks), heads, p, grid, qkv, layer_scale, pos, rel, mask), style


_IGNORED = {
    "timm_vit": ("head.",),
    "mae": (),
    "beit": ("lm_head.",),
    "beitv2": ("lm_head.", "cls_pt_layers."),
    "dino": ("head.",),
    "ibot": ("head.", "masked_embed"),
}


def torch_to_mim(sd: dict, arch: str, *, variant: str = "", patch_size: int = 0,
                 image_size: int = 0, decoder_heads: int = 16) -> Converted:
  """Reads the state dict of `arch` into mim_jax parameter trees; any key missing, of the
  wrong shape or left unused is a one-line ConversionError naming it."""
  if arch in ("vqkd", "dalle"):
    raise ConversionError(f"--arch={arch} is a whole tokenizer, not one ViT: read it with "
                          f"mim_jax.convert.{arch}.torch_to_mim")
  spec, style = infer_spec(sd, arch, variant=variant, patch_size=patch_size, image_size=image_size)
  used: set = set()
  entries = names.encoder_entries(spec, style)
  enc, missing, bad = names.take(sd, entries, _encoder_shapes(spec), used)
  params = {"encoder": enc}
  decoder = None
  if spec.pos_embed == "sincos":
    used.add("pos_embed")
  if spec.rel_pos_bias == "shared" and "rel_pos_bias.relative_position_index" in sd:
    index = sd["rel_pos_bias.relative_position_index"]
    if not np.array_equal(index, vit.relative_position_index(spec.grid)):
      bad.append("rel_pos_bias.relative_position_index (not BEiT's index layout)")
    used.add("rel_pos_bias.relative_position_index")
  if arch == "mae" and "decoder_embed.weight" in sd:     # the released encoder-only files lack it
    width = int(sd["decoder_embed.weight"].shape[0])
    depth = len(names.block_indices(sd, "decoder_blocks."))
    if width % decoder_heads:
      raise ConversionError(f"--decoder_heads={decoder_heads} does not divide the decoder "
                            f"width {width}")
    dec, dmiss, dbad = names.take(sd, names.mae_decoder_entries(depth), None, used)
    params["decoder"] = dec
    missing += dmiss
    bad += dbad
    decoder = dict(width=width, depth=depth, heads=int(decoder_heads))
    dpe = sd.get("decoder_pos_embed")
    if dpe is None or dpe.shape != (1, spec.grid ** 2 + 1, width) or not np.allclose(
        dpe, names.sincos_table(width, spec.grid), atol=1e-5):
      bad.append("decoder_pos_embed (mim_jax's MAE decoder uses the fixed sin-cos table)")
    used.add("decoder_pos_embed")
  prefixes = _IGNORED[arch]
  ignored = sorted(k for k in sd if k not in used and k.startswith(prefixes))
  unused = sorted(k for k in sd if k not in used and k not in ignored)
  if missing or bad or unused:
    parts = ([f"missing {_fmt(missing)}"] if missing else []) + \
            ([f"bad shape {_fmt(bad, 3)}"] if bad else []) + \
            ([f"unused {_fmt(unused)}"] if unused else [])
    raise ConversionError(f"the checkpoint does not fit --arch={arch} ({'; '.join(parts)}): "
                          f"pick the --arch (one of {', '.join(ARCHS)}) that wrote it")
  return Converted(arch, spec, params, decoder, ignored)


def _encoder_shapes(spec: ViTSpec) -> dict:
  """{mim path: shape} of a ViT encoder with `spec`, from vit.ViT's own init (abstract)."""
  import jax
  import jax.numpy as jnp
  model = vit.ViT(variant=spec.variant, depth=spec.depth, patch_size=spec.patch,
                  image_size=spec.image_size, pos_embed=spec.pos_embed,
                  rel_pos_bias=spec.rel_pos_bias, qkv_bias=spec.qkv_bias,
                  init_values=0.1 if spec.layer_scale else None,
                  use_mask_token=spec.mask_token)
  x = jax.ShapeDtypeStruct((1, spec.image_size, spec.image_size, 3), jnp.float32)
  shapes = jax.eval_shape(lambda r: model.init(r, jnp.zeros(x.shape, x.dtype))["params"],
                          jax.random.PRNGKey(0))
  return {k: tuple(v.shape) for k, v in names.flat_paths(shapes).items()}


# ---------------------------------------------------------------------------------------------
# mim_jax -> torch names.

def spec_of(encoder: vit.ViT, params: PyTree) -> ViTSpec:
  """The ViTSpec of a mim_jax encoder module and its parameters."""
  width, depth, heads = vit.variant(encoder.variant)
  return ViTSpec(width, encoder.depth or depth, heads, encoder.patch_size, encoder.grid,
                 encoder.qkv_bias, encoder.init_values is not None, encoder.pos_embed,
                 encoder.rel_pos_bias, "mask_token" in params)


def mim_to_torch(encoder_params: PyTree, spec: ViTSpec, style: str = "timm") -> dict:
  """{torch key: float32 array}: the encoder under timm ViT names (style 'timm') or BEiT names
  (style 'beit': q_bias / v_bias, gamma_1 / gamma_2, shared rel_pos_bias), torch layouts; a fixed
  sin-cos position table is written as pos_embed; the mask token is left out."""
  s = dataclasses.replace(spec, mask_token=False)
  sd = names.put(encoder_params, names.encoder_entries(s, style))
  if spec.pos_embed == "sincos":
    sd["pos_embed"] = names.sincos_table(spec.width, spec.grid)
  return sd


def mae_to_torch(params: PyTree, spec: ViTSpec, decoder_depth: int) -> dict:
  """A mim_jax MAE run's params under facebookresearch/mae's names
  (models_mae.MaskedAutoencoderViT: encoder as timm, decoder_* and mask_token)."""
  sd = mim_to_torch(params["encoder"], spec)
  sd.update(names.put(params["decoder"], names.mae_decoder_entries(decoder_depth)))
  width = int(np.asarray(params["decoder"]["embed"]["kernel"]).shape[1])
  sd["decoder_pos_embed"] = names.sincos_table(width, spec.grid)
  return sd


_SIZES = {192: "tiny", 384: "small", 768: "base", 1024: "large", 1280: "huge"}


def timm_state_dict(encoder_params: PyTree, spec: ViTSpec) -> tuple[dict, str, dict]:
  """(state dict, timm model name, create_model kwargs) of a mim_jax encoder for timm:
  `VisionTransformer` ('vit_*') for absolute position embeddings, `Beit` ('beit_*') with one
  shared relative position bias."""
  kwargs: dict = {"num_classes": 0}
  size = _SIZES.get(spec.width)
  if size is None:
    size = "base"
    kwargs.update(embed_dim=spec.width, num_heads=spec.heads)
  std_depth = 24 if size == "large" else 32 if size == "huge" else 12
  if spec.depth != std_depth or "embed_dim" in kwargs:
    kwargs["depth"] = spec.depth
  if spec.rel_pos_bias == "shared":
    enc, s = encoder_params, spec
    if spec.qkv_bias == "qkv":   # timm's Beit has q and v biases only (its k bias is fixed at 0)
      enc, s = _qkv_to_qv(encoder_params), dataclasses.replace(spec, qkv_bias="qv")
    sd = mim_to_torch(enc, s, "beit")
    index = vit.relative_position_index(spec.grid).astype(np.int64)
    sd["rel_pos_bias.relative_position_index"] = index     # a persistent buffer in timm
    name = f"beit_{size}_patch16_224"
    kwargs.update(use_abs_pos_emb=spec.pos_embed != "none", use_rel_pos_bias=False,
                  use_shared_rel_pos_bias=True, global_pool="token",
                  init_values=_gamma(encoder_params) if spec.layer_scale else None)
    if spec.qkv_bias == "none":
      kwargs["qkv_bias"] = False
  else:
    if spec.pos_embed == "none":
      raise ConversionError("an encoder with neither a position embedding nor a relative position "
                            "bias has no timm counterpart")
    if spec.qkv_bias == "qv":
      sd = mim_to_torch(_qv_to_qkv(encoder_params), dataclasses.replace(spec, qkv_bias="qkv"))
    else:
      sd = mim_to_torch(encoder_params, spec)
    name = f"vit_{size}_patch16_224"
    if spec.qkv_bias == "none":
      kwargs["qkv_bias"] = False
    if spec.layer_scale:
      kwargs["init_values"] = _gamma(encoder_params)
  if spec.patch != 16:
    kwargs["patch_size"] = spec.patch
  if spec.image_size != 224:
    kwargs["img_size"] = spec.image_size
  return sd, name, kwargs


def _gamma(encoder_params) -> float:
  return float(np.mean(np.asarray(encoder_params["encoder"]["block00"]["gamma_1"])))


def _map_blocks(encoder_params, fn):
  enc = dict(encoder_params["encoder"])
  for k, blk in enc.items():
    if k.startswith("block"):
      enc[k] = {**blk, "attn": fn(dict(blk["attn"]))}
  return {**encoder_params, "encoder": enc}


def _qv_to_qkv(encoder_params):
  def fn(attn):
    q, v = np.asarray(attn.pop("q_bias")), np.asarray(attn.pop("v_bias"))
    attn["qkv_bias"] = np.concatenate([q, np.zeros_like(q), v])
    return attn
  return _map_blocks(encoder_params, fn)


def _qkv_to_qv(encoder_params):
  def fn(attn):
    b = np.asarray(attn.pop("qkv_bias"))
    q, k, v = np.split(b, 3)
    if np.any(k != 0):
      raise ConversionError("the encoder has a non-zero key bias, which timm's Beit (q and v "
                            "biases only) cannot hold")
    attn["q_bias"], attn["v_bias"] = q, v
    return attn
  return _map_blocks(encoder_params, fn)


# ---------------------------------------------------------------------------------------------
# Workdirs.

def load_config(method: str, preset: str = "", config_dir: str = ""):
  """`configs/<method>.py`'s get_config(preset) (config_lib.load), errors as ConversionError."""
  try:
    return config_lib.load(method, preset, config_dir)
  except FileNotFoundError as e:
    raise ConversionError(str(e)) from None


def make_config(conv: Converted, *, preset: str = "", norm: str = "", config_dir: str = ""):
  """The run config of a converted checkpoint: configs/mae.py (absolute positions) or
  configs/simmim.py (shared relative position bias), model set from the weights, EMA off."""
  s = conv.spec
  method = "simmim" if s.rel_pos_bias == "shared" else "mae"
  c = load_config(method, preset, config_dir)
  variant = s.variant
  c.model.update(variant=variant, depth=0 if s.depth == vit.variant(variant)[1] else s.depth,
                 patch_size=s.patch, pos_embed=s.pos_embed, rel_pos_bias=s.rel_pos_bias,
                 qkv_bias=s.qkv_bias,
                 init_values=(float(c.model.init_values) or 0.1) if s.layer_scale else 0.0)
  c.input.image_size = s.image_size
  norm = norm or DEFAULT_NORM[conv.arch]
  if norm not in ("imagenet", "inception"):
    raise ConversionError(f"--norm={norm!r}: use 'imagenet' or 'inception' (0.5 mean and std)")
  c.input.mean, c.input.std = _IMAGENET if norm == "imagenet" else _INCEPTION
  c.ema.enabled = False
  if method == "mae" and conv.decoder is not None:
    c.mae.decoder = dict(conv.decoder)
  if method == "simmim":
    size = s.image_size
    # SimMIM's 32 px mask patches where they tile the image, else the largest that does.
    c.simmim.mask_patch_size = next(m for m in (32, 2 * s.patch, s.patch)
                                    if size % m == 0 and m % s.patch == 0)
  return c


def _merge(init: dict, converted: dict) -> tuple[dict, list[str]]:
  """`init` with every converted leaf put in; returns the merged tree and the init leaves kept
  (the method's parts the checkpoint does not have). A converted leaf absent from `init` or of
  another shape is an error."""
  flat_init = names.flat_paths(init)
  flat_conv = names.flat_paths(converted)
  extra = ["/".join(k) for k in flat_conv if k not in flat_init]
  shapes = ["/".join(k) + f" {list(np.shape(v))} vs {list(np.shape(flat_init[k]))}"
            for k, v in flat_conv.items()
            if k in flat_init and np.shape(v) != np.shape(flat_init[k])]
  if extra or shapes:
    raise ConversionError(f"the converted weights do not fit the written config's model "
                          f"({_fmt(shapes + ['no place for ' + e for e in extra], 4)})")
  kept = sorted("/".join(k) for k in flat_init if k not in flat_conv)
  out: dict = {}
  for k, v in flat_init.items():
    names._set(out, k, np.asarray(flat_conv.get(k, v), np.asarray(v).dtype))
  return out, kept


def write_workdir(out_dir: str, config, params: dict, provenance: Optional[dict] = None,
                  collections: Optional[dict] = None, build_config=None) -> dict:
  """Writes `config` and a step-0 checkpoint whose params are the method's seeded
  initialisation with `params` put in, as train.py would: the trainer's own state (optimizer
  state and all), saved by checkpointing.Checkpointer; `collections` ({'batch_stats':
  {'encoder': ...}}) replace the models' initial ones likewise. `build_config`: the config the
  trainer is built from when `config`'s data is not on this machine (the same model and
  method on the embedded data). Returns the provenance written to `<out_dir>/convert.json`
  (with the parameters kept from the initialisation)."""
  import jax

  from mim_jax import checkpointing, train
  ckpt_dir = os.path.join(out_dir, "checkpoints")
  if os.path.isdir(ckpt_dir) and os.listdir(ckpt_dir):
    raise ConversionError(f"{ckpt_dir} already holds checkpoints: give a new output directory")
  os.makedirs(out_dir, exist_ok=True)
  tr = train.Trainer.create(build_config if build_config is not None else config)
  init = jax.device_get(tr.state["params"])
  merged, kept = _merge(init, params)
  # Every optimiser here (AdamW, LARS, LAMB, SGD) starts from zero moments whatever the
  # parameter values, so the initial optimiser state stays valid for the new parameters.
  state = dict(tr.state, params=jax.device_put(merged, tr.state_shardings["params"]))
  mstate = dict(state["method_state"])
  init_cols = jax.device_get(mstate.pop("collections", {}))
  if tr.method.ema_decay is not None or jax.tree_util.tree_leaves(mstate):
    raise ConversionError("the written config's method keeps state derived from the parameters "
                          "(EMA, teachers): convert into configs/mae.py or configs/simmim.py")
  if collections or init_cols:
    cols, kept_cols = _merge(init_cols, collections or {})
    kept += [f"collections/{k}" for k in kept_cols]
    placed = jax.device_put(cols, tr.state_shardings["method_state"]["collections"])
    state["method_state"] = {**state["method_state"], "collections": placed}
  ckpt = checkpointing.Checkpointer(out_dir, keep=config.keep_ckpts, async_save=False)
  try:
    ckpt.save(0, state, None, {"model": tr.method.describe(), "step": 0}, force=True)
  finally:
    ckpt.close()
  if jax.process_index() == 0:
    with open(os.path.join(out_dir, "config.json"), "w") as f:
      f.write(config.to_json_best_effort(indent=2))
    info = dict(provenance or {}, method=config.method, initialised_not_converted=kept)
    with open(os.path.join(out_dir, "convert.json"), "w") as f:
      json.dump(info, f, indent=2)
    return info
  return {}


def convert_torch_checkpoint(path: str, out_dir: str, arch: str, *, which: str = "teacher",
                             variant: str = "", patch_size: int = 0, image_size: int = 0,
                             decoder_heads: int = 16, preset: str = "", norm: str = "",
                             config_dir: str = "", reader: str = "pure") -> dict:
  """The whole `--from=torch` conversion: read, map, write the workdir; returns convert.json."""
  if arch not in ARCHS:
    raise ConversionError(f"unknown --arch={arch!r}: use one of {', '.join(ARCHS)}")
  if arch == "dalle":
    # DALL-E's encoder fixes its own width, patch (8 px: three 2x2 pools) and input mapping
    # (map_pixels); a ViT flag given here would otherwise be dropped without a word.
    given = [f"--{k}" for k, v in (("variant", variant), ("patch_size", patch_size),
                                   ("preset", preset), ("norm", norm)) if v]
    if given:
      raise ConversionError(f"--arch=dalle takes no {', '.join(given)} (the encoder fixes its "
                            f"width, 8 px patch and map_pixels input): drop them; --image_size "
                            f"sets the input size")
    from mim_jax.convert import dalle
    return dalle.convert_checkpoint(path, out_dir, image_size=image_size, config_dir=config_dir,
                                    reader=reader)
  if arch == "torchvision_resnet":
    given = [f"--{k}" for k, v in (("variant", variant), ("patch_size", patch_size), ("norm", norm)) if v]
    if given:
      raise ConversionError(f"--arch=torchvision_resnet takes no {', '.join(given)} (a ResNet has "
                            f"no variant or patch; its input is ImageNet-normalised): drop them")
    from mim_jax.convert import resnet as resnet_conv
    return resnet_conv.convert_checkpoint(path, out_dir, image_size=image_size, preset=preset,
                                          config_dir=config_dir, reader=reader)
  if arch in ("swin", "swinv2", "mvitv2"):
    given = [f"--{k}" for k, v in (("variant", variant), ("patch_size", patch_size), ("norm", norm)) if v]
    if given:
      raise ConversionError(f"--arch={arch} takes no {', '.join(given)} (the weights give the "
                            f"architecture; its input is ImageNet-normalised): drop them")
    if arch == "mvitv2":
      from mim_jax.convert import mvit as mvit_conv
      return mvit_conv.convert_checkpoint(path, out_dir, image_size=image_size, preset=preset,
                                          config_dir=config_dir, reader=reader)
    from mim_jax.convert import swin as swin_conv
    return swin_conv.convert_checkpoint(path, out_dir, arch, image_size=image_size, preset=preset,
                                        config_dir=config_dir, reader=reader)
  if arch == "vqkd":
    from mim_jax.convert import vqkd
    return vqkd.convert_checkpoint(path, out_dir, variant=variant, patch_size=patch_size,
                                   image_size=image_size, preset=preset, norm=norm,
                                   config_dir=config_dir, reader=reader)
  sd = unwrap(read_checkpoint(path, reader), arch, which)
  conv = torch_to_mim(sd, arch, variant=variant, patch_size=patch_size, image_size=image_size,
                      decoder_heads=decoder_heads)
  config = make_config(conv, preset=preset, norm=norm, config_dir=config_dir)
  prov = dict(source=os.path.abspath(path), arch=arch,
              which=which if arch in ("dino", "ibot") else "", ignored_keys=conv.ignored,
              spec=dataclasses.asdict(conv.spec))
  return write_workdir(out_dir, config, conv.params, prov)


def export_timm(workdir: str, out_path: str, encoder: str = "online") -> tuple[str, dict, dict]:
  """Writes the encoder of the run in `workdir` to `out_path` (.safetensors) under timm's names;
  returns (timm model name, create_model kwargs, state dict). `encoder`: 'online' (params),
  'ema' (the EMA encoder) or 'teacher' (an iBOT-style teacher)."""
  import safetensors.numpy

  from mim_jax import teachers
  if not out_path.endswith(".safetensors"):
    raise ConversionError(f"{out_path}: the export is written as .safetensors; name the file "
                          f"*.safetensors")
  run = teachers.load(workdir)
  if encoder == "online":
    enc = run.params["encoder"]
  elif encoder == "ema" and "ema_encoder" in run.method_state:
    enc = run.method_state["ema_encoder"]
  elif encoder == "teacher" and "encoder" in run.method_state.get("teacher", {}):
    enc = run.method_state["teacher"]["encoder"]
  else:
    raise ConversionError(f"--encoder={encoder!r}: the run in {workdir} has 'online'"
                          + (", 'ema'" if "ema_encoder" in run.method_state else "")
                          + (", 'teacher'" if "teacher" in run.method_state else ""))
  module = run.method.encoder
  spec = spec_of(module, enc)
  sd, name, kwargs = timm_state_dict(enc, spec)
  sd = {k: np.ascontiguousarray(v) for k, v in sd.items()}
  os.makedirs(os.path.dirname(os.path.abspath(out_path)), exist_ok=True)
  safetensors.numpy.save_file(sd, out_path)
  return name, kwargs, sd
