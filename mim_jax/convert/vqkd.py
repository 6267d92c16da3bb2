"""BEiT v2's VQ-KD tokenizer weights -> a mim_jax tokenizer workdir (`--arch=vqkd`).

microsoft/unilm beit2/modeling_vqkd.py `VQKD` (e.g. vqkd_encoder_base_decoder_3x768x12_clip)
holds, under its state dict's names:
  encoder.*            a beit2 `VisionTransformer` (modeling_finetune): patch Conv2d, cls token,
                       learned position table, blocks with q/v biases (no layer scale in the
                       released ones), and `fc_norm` (use_mean_pooling: `norm` is an Identity)
                       applied to the patch tokens that `encode` reads;
  encode_task_layer.*  Sequential(Linear(D, D), Tanh, Linear(D, code_dim)): indices 0 and 2;
  quantize.*           `NormEMAVectorQuantizer`: the l2-normalised codebook
                       `quantize.embedding.weight` [K, code_dim], its `initted` flag, and
                       statistics no forward pass reads (`quantize.cluster_size`, the usage EMA;
                       `quantize.embedding.cluster_size` / `embed_avg`, never updated);
  decoder.*            a second VisionTransformer over the code map (patch size 1, `in_chans` =
                       code_dim, its own fc_norm on the patch tokens);
  decode_task_layer.*  Sequential(Linear, Tanh, Linear(D, teacher width));
  teacher_model.*, scaling_layer.*  the CLIP / DINO teacher (its loader deletes keys starting with
                       'teacher', 'scaling' and 'loss' before use).

mim_jax's Tokenizer (methods/tokenizer.py, arch 'vit', quantizer 'norm_ema') has each of these
but the teacher: params {'encoder': ViT, 'to_code': TaskLayer, 'decoder': CodeDecoder{'backbone':
ViT, 'task': TaskLayer}} and method_state {'quantizer': {'codebook', 'initted'}}. The encoder's
`fc_norm` becomes the ViT's final norm (a LayerNorm per token, so the patch tokens are the same
whether or not the cls token also passes through it). The statistics and the teacher are left
out and listed; `token_ids` reads neither (`Tokenizer.frozen_state` keeps only the quantizer).

The written workdir is a frozen tokenizer: config.json is configs/vqkd.py (default preset or
`preset`) with the model, the codebook and the decoder set from the weights and the input
normalisation of the official `pre_process` (pixels scaled to [-1, 1]: mean = std = 0.5, or
ImageNet's for process_type 'imagenet_norm', `norm='imagenet'`); the checkpoint at step 0 holds
`step`, `params` and `method_state`, which is what `mim_jax.teachers.load` (and so
`--config.beit.tokenizer=`, CAE, `--to=timm`) reads. Training it further needs a teacher run of
the decoder's output width in mim_jax, which the CLIP teacher has no counterpart for.
"""
from __future__ import annotations

import dataclasses
import json
import os
from typing import Optional

import numpy as np

from mim_jax.convert import names
from mim_jax.convert.names import ConversionError, Entry, ViTSpec
from mim_jax.models import vit

# Keys the official tokenizer loader (modeling_vqkd.vqkd_encoder_*, as_tokenzer=True) deletes.
IGNORED_PREFIXES = ("teacher", "scaling", "loss")
# Quantizer buffers no forward pass reads (usage statistics; EmbeddingEMA's unused averages).
STATISTICS = ("quantize.cluster_size", "quantize.embedding.cluster_size",
              "quantize.embedding.embed_avg")
# Keys the shapes are read from; without them the file is not a VQ-KD state dict.
_REQUIRED = ("encoder.patch_embed.proj.weight", "decoder.patch_embed.proj.weight",
             "quantize.embedding.weight", "decode_task_layer.2.weight")
_INITTED = "quantize.embedding.initted"
_SAME_IN_BOTH = ("qkv_bias", "layer_scale", "pos_embed", "rel_pos_bias")


@dataclasses.dataclass(frozen=True)
class VQKDSpec:
  """The sizes and switches of a VQ-KD tokenizer, read from its weights."""
  encoder: ViTSpec
  decoder: ViTSpec              # patch 1 over the encoder's token grid
  codebook_size: int
  code_dim: int
  out_dim: int                  # decode task layer output: the teacher's width (CLIP 512)
  encoder_norm: str = "fc_norm"   # the torch name of each ViT's final norm: 'fc_norm' | 'norm'
  decoder_norm: str = "fc_norm"


@dataclasses.dataclass
class Converted:
  spec: VQKDSpec
  params: dict                  # {'encoder', 'to_code', 'decoder'}, float32 numpy
  method_state: dict            # {'quantizer': {'codebook', 'initted'}}
  ignored: list[str]            # teacher keys and quantizer statistics, left out


def _fmt(keys, n: int = 6) -> str:
  keys = list(keys)
  more = f" (+{len(keys) - n} more)" if len(keys) > n else ""
  return ", ".join(keys[:n]) + more


# ---------------------------------------------------------------------------------------------
# Shapes -> spec.

def _vit_spec(sd: dict, prefix: str) -> tuple[ViTSpec, int, str]:
  """(ViTSpec with grid 0 where no table gives it, input channels, final-norm name) of the
  beit2 VisionTransformer stored under `prefix`."""
  key = prefix + "patch_embed.proj.weight"
  w = sd[key]
  if np.ndim(w) != 4 or w.shape[2] != w.shape[3]:
    raise ConversionError(f"{key} {list(np.shape(w))} is not a square Conv2d weight "
                          f"[width, channels, p, p]: not a VQ-KD state dict")
  width, chans, p, _ = (int(s) for s in w.shape)
  if width not in names.WIDTH_TO_VARIANT:
    raise ConversionError(f"{prefix[:-1]} width {width} is not a mim_jax ViT variant (widths "
                          f"{sorted(names.WIDTH_TO_VARIANT)}): add it to "
                          f"mim_jax.models.vit.VARIANTS")
  heads = vit.variant(names.WIDTH_TO_VARIANT[width])[2]
  blocks = names.block_indices(sd, prefix + "blocks.")
  if not blocks or blocks != list(range(len(blocks))):
    raise ConversionError(f"the checkpoint's {prefix}blocks are {blocks[:5]}: expected "
                          f"{prefix}blocks.0 .. {prefix}blocks.N-1")
  b0 = prefix + "blocks.0."
  if b0 + "attn.relative_position_bias_table" in sd:
    raise ConversionError(f"{prefix[:-1]} has a relative position bias per block "
                          f"(use_rel_pos_bias): mim_jax's ViT shares one table; such a VQ-KD "
                          f"cannot be converted faithfully")
  qkv = "qv" if b0 + "attn.q_bias" in sd else "qkv" if b0 + "attn.qkv.bias" in sd else "none"
  grid, pos, rel = 0, "none", "none"
  if prefix + "pos_embed" in sd:
    pe = sd[prefix + "pos_embed"]
    n = int(pe.shape[1]) - 1 if np.ndim(pe) == 3 else -1
    grid = int(round(max(n, 0) ** 0.5))
    if n < 1 or grid * grid != n:
      raise ConversionError(f"{prefix}pos_embed {list(np.shape(pe))} is not a cls token plus a "
                            f"square grid of positions")
    pos = "learned"
  table = sd.get(prefix + "rel_pos_bias.relative_position_bias_table")
  if table is not None:
    rel = "shared"
    g = int(round(((table.shape[0] - 3) ** 0.5 + 1) / 2))
    if (2 * g - 1) ** 2 + 3 != table.shape[0] or grid not in (0, g):
      raise ConversionError(f"{prefix}rel_pos_bias.relative_position_bias_table "
                            f"{list(table.shape)} does not fit the {prefix[:-1]}'s grid")
    grid = g
  has_fc, has_norm = prefix + "fc_norm.weight" in sd, prefix + "norm.weight" in sd
  if has_fc and has_norm:
    raise ConversionError(f"{prefix[:-1]} has both fc_norm and norm: a beit2 VisionTransformer "
                          f"has one of them (use_mean_pooling); not a VQ-KD state dict")
  spec = ViTSpec(width, len(blocks), heads, p, grid, qkv, b0 + "gamma_1" in sd, pos, rel, False)
  return spec, chans, "fc_norm" if has_fc else "norm"


def infer_spec(sd: dict, *, variant: str = "", patch_size: int = 0,
               image_size: int = 0) -> VQKDSpec:
  """The VQKDSpec of a VQ-KD state dict from its shapes; the optional flags must agree."""
  lacking = [k for k in _REQUIRED if k not in sd]
  if lacking:
    raise ConversionError(f"the checkpoint lacks {_fmt(lacking)}: not a BEiT v2 VQ-KD state "
                          f"dict (encoder.*, quantize.*, decoder.*, encode_/decode_task_layer.*); "
                          f"pick the --arch that wrote it")
  enc, chans, enc_norm = _vit_spec(sd, "encoder.")
  if chans != 3:
    raise ConversionError(f"encoder.patch_embed.proj.weight has {chans} input channels: mim_jax's "
                          f"tokenizer reads RGB")
  if patch_size and patch_size != enc.patch:
    raise ConversionError(f"--patch_size={patch_size} but the encoder's patches are "
                          f"{enc.patch}px: drop the flag")
  if variant and vit.variant(variant)[0] != enc.width:
    raise ConversionError(f"--variant={variant} has width {vit.variant(variant)[0]} but the "
                          f"encoder has {enc.width}: use --variant={enc.variant}")
  grid = enc.grid
  if image_size:
    if image_size % enc.patch or (grid and image_size // enc.patch != grid):
      raise ConversionError(f"--image_size={image_size} does not fit the encoder's {grid}x{grid} "
                            f"grid of {enc.patch}px patches: use --image_size={grid * enc.patch}")
    grid = image_size // enc.patch
  dec, _, dec_norm = _vit_spec(sd, "decoder.")
  if dec.patch != 1:
    raise ConversionError(f"decoder.patch_embed.proj.weight has {dec.patch}x{dec.patch} patches: "
                          f"mim_jax's VQ-KD decoder reads the code map with patch size 1, as "
                          f"modeling_vqkd's does; this decoder cannot be converted")
  if dec.grid and grid and dec.grid != grid:
    raise ConversionError(f"the decoder's position table is for a {dec.grid}x{dec.grid} code map, "
                          f"the encoder's grid is {grid}x{grid}: they must be equal")
  grid = grid or dec.grid
  if not grid:
    raise ConversionError("neither ViT has a position table to read the image size from: pass "
                          "--image_size")
  for field in _SAME_IN_BOTH:
    a, b = getattr(enc, field), getattr(dec, field)
    if a != b:
      raise ConversionError(f"the encoder's {field} is {a!r} and the decoder's {b!r}: mim_jax "
                            f"builds both ViTs from one config.model, so this VQ-KD cannot be "
                            f"converted faithfully")
  cb = sd["quantize.embedding.weight"]
  out = sd["decode_task_layer.2.weight"]
  if np.ndim(cb) != 2 or np.ndim(out) != 2:
    raise ConversionError(f"quantize.embedding.weight {list(np.shape(cb))} and "
                          f"decode_task_layer.2.weight {list(np.shape(out))} must be 2-D")
  return VQKDSpec(dataclasses.replace(enc, grid=grid), dataclasses.replace(dec, grid=grid),
                  int(cb.shape[0]), int(cb.shape[1]), int(out.shape[0]), enc_norm, dec_norm)


# ---------------------------------------------------------------------------------------------
# The name map (paths rooted at {'params': ..., 'method_state': ...}).

def _vit_entries(spec: ViTSpec, prefix: str, root: tuple, norm: str) -> list[Entry]:
  out = []
  for e in names.encoder_entries(spec, "beit", prefix=prefix):
    key, kind = e.torch_key, e.kind
    if norm == "fc_norm" and key.startswith(prefix + "norm."):
      key = prefix + "fc_norm." + key[len(prefix + "norm."):]
    if kind == "patch" and spec.patch == 1:
      kind = "conv1x1"           # the decoder's patch embedding over the code map
    out.append(Entry(key, root + e.path, kind))
  return out


def _task_entries(prefix: str, root: tuple) -> list[Entry]:
  """Sequential(Linear, Tanh, Linear): modules 0 and 2 <-> TaskLayer fc1 and fc2."""
  out = []
  for i, name in ((0, "fc1"), (2, "fc2")):
    out += [Entry(f"{prefix}.{i}.weight", root + (name, "kernel"), "linear"),
            Entry(f"{prefix}.{i}.bias", root + (name, "bias"))]
  return out


def entries(spec: VQKDSpec) -> list[Entry]:
  """The whole map but the `initted` flag (converted by value, see torch_to_mim)."""
  p, s = ("params",), ("method_state", "quantizer")
  return (_vit_entries(spec.encoder, "encoder.", p + ("encoder",), spec.encoder_norm)
          + _task_entries("encode_task_layer", p + ("to_code",))
          + [Entry("quantize.embedding.weight", s + ("codebook",))]
          + _vit_entries(spec.decoder, "decoder.", p + ("decoder", "backbone"), spec.decoder_norm)
          + _task_entries("decode_task_layer", p + ("decoder", "task")))


def _shapes(encoder: vit.ViT, to_code, decoder, image_size: int, spec: VQKDSpec,
            init_state=None) -> dict:
  """{path: shape} of the mim_jax modules (abstract init), rooted like `entries`."""
  import jax
  import jax.numpy as jnp
  key = jax.random.PRNGKey(0)
  x = jnp.zeros((1, image_size, image_size, 3), jnp.float32)
  n = spec.encoder.grid ** 2
  params = {
      "encoder": jax.eval_shape(encoder.init, key, x)["params"],
      "to_code": jax.eval_shape(to_code.init, key,
                                jnp.zeros((1, n, spec.encoder.width), jnp.float32))["params"],
      "decoder": jax.eval_shape(decoder.init, key,
                                jnp.zeros((1, n, spec.code_dim), jnp.float32))["params"]}
  if init_state is None:
    state = {"quantizer": {"codebook": jax.ShapeDtypeStruct((spec.codebook_size, spec.code_dim),
                                                            jnp.float32),
                           "initted": jax.ShapeDtypeStruct((), jnp.bool_)}}
  else:
    state = jax.eval_shape(init_state, params)
  flat = names.flat_paths({"params": params, "method_state": state})
  return {k: tuple(v.shape) for k, v in flat.items()}


def _spec_shapes(spec: VQKDSpec) -> dict:
  """Shapes of modules built from the spec alone (no config), as the Tokenizer builds them."""
  from mim_jax.methods import tokenizer

  def build(s: ViTSpec) -> vit.ViT:
    return vit.ViT(variant=s.variant, depth=s.depth, patch_size=s.patch, image_size=s.image_size,
                   pos_embed=s.pos_embed, rel_pos_bias=s.rel_pos_bias, qkv_bias=s.qkv_bias,
                   init_values=0.1 if s.layer_scale else None)
  enc = build(spec.encoder)
  decoder = tokenizer.CodeDecoder(build(spec.decoder), spec.out_dim)
  return _shapes(enc, tokenizer.TaskLayer(spec.encoder.width, spec.code_dim), decoder,
                 spec.encoder.image_size, spec)


# ---------------------------------------------------------------------------------------------
# Torch <-> mim_jax.

def torch_to_mim(sd: dict, *, variant: str = "", patch_size: int = 0,
                 image_size: int = 0) -> Converted:
  """Reads a VQ-KD state dict (the teacher's keys allowed) into the mim_jax tokenizer's
  parameters and method state; any key missing, of the wrong shape or unused is a one-line
  ConversionError naming it."""
  spec = infer_spec(sd, variant=variant, patch_size=patch_size, image_size=image_size)
  used: set = set()
  tree, missing, bad = names.take(sd, entries(spec), _spec_shapes(spec), used)
  if _INITTED not in sd:
    missing.append(_INITTED)
  else:
    used.add(_INITTED)
    flag = np.asarray(sd[_INITTED]).reshape(-1)
    if flag.size != 1:
      bad.append(f"{_INITTED} {list(np.shape(sd[_INITTED]))} (expected [1])")
    elif not flag[0]:
      raise ConversionError(f"{_INITTED} is 0: the codebook was never initialised (the official "
                            f"quantizer would run k-means on the first batch it sees); convert a "
                            f"trained VQ-KD")
  ignored = sorted(k for k in sd if k not in used
                   and (k.startswith(IGNORED_PREFIXES) or k in STATISTICS))
  unused = sorted(k for k in sd if k not in used and k not in ignored)
  if missing or bad or unused:
    parts = ([f"missing {_fmt(missing)}"] if missing else []) + \
            ([f"bad shape {_fmt(bad, 3)}"] if bad else []) + \
            ([f"unused {_fmt(unused)}"] if unused else [])
    raise ConversionError(f"the checkpoint does not fit --arch=vqkd ({'; '.join(parts)}): "
                          f"convert a microsoft/unilm beit2 VQKD state dict")
  state = tree["method_state"]
  state["quantizer"]["initted"] = np.asarray(True)
  return Converted(spec, tree["params"], state, ignored)


def mim_to_torch(params: dict, method_state: dict, spec: VQKDSpec) -> dict:
  """{official key: float32 array} of a mim_jax VQ-KD tokenizer: every key `torch_to_mim`
  reads (the teacher and the quantizer statistics are not produced)."""
  sd = names.put({"params": params, "method_state": method_state}, entries(spec))
  flag = bool(np.asarray(method_state["quantizer"]["initted"]))
  sd[_INITTED] = np.asarray([float(flag)], np.float32)
  return sd


# ---------------------------------------------------------------------------------------------
# The workdir.

_NORMS = {"inception": ((0.5, 0.5, 0.5), (0.5, 0.5, 0.5)),          # pre_process 'default'
          "imagenet": ((0.485, 0.456, 0.406), (0.229, 0.224, 0.225))}  # 'imagenet_norm'


def make_config(spec: VQKDSpec, *, preset: str = "", norm: str = "", config_dir: str = ""):
  """configs/vqkd.py (`preset`) with the model, codebook and decoder of `spec`; the teacher
  is left unset (the official one is not a mim_jax run)."""
  from mim_jax import convert
  c = convert.load_config("vqkd", preset, config_dir)
  e, d = spec.encoder, spec.decoder
  c.model.update(variant=e.variant, depth=0 if e.depth == vit.variant(e.variant)[1] else e.depth,
                 patch_size=e.patch, pos_embed=e.pos_embed, rel_pos_bias=e.rel_pos_bias,
                 qkv_bias=e.qkv_bias, drop_path=0.0,
                 init_values=(float(c.model.init_values) or 0.1) if e.layer_scale else 0.0)
  c.input.image_size = e.image_size
  c.tokenizer.update(arch="vit", quantizer="norm_ema", codebook_size=spec.codebook_size,
                     code_dim=spec.code_dim, restart_after=0, target="teacher", teacher="")
  c.tokenizer.decoder.update(variant=d.variant, depth=d.depth)
  norm = norm or "inception"
  if norm not in _NORMS:
    raise ConversionError(f"--norm={norm!r}: use 'inception' (VQ-KD's default [-1, 1] pixels) "
                          f"or 'imagenet' (its process_type='imagenet_norm')")
  c.input.mean, c.input.std = _NORMS[norm]
  c.ema.enabled = False
  return c


def _config_shapes(config, spec: VQKDSpec) -> tuple[dict, dict]:
  """(shapes of the modules the written config builds, its Tokenizer.describe())."""
  from mim_jax import methods
  from mim_jax.methods import tokenizer
  tok = methods.get(config)
  decoder = tokenizer.CodeDecoder(tok.decoder_vit, spec.out_dim)   # out_dim: the teacher's width
  return _shapes(tok.encoder, tok.to_code, decoder, tok.image_size, spec, tok.init_state), \
      tok.describe()


def write_workdir(out_dir: str, config, conv: Converted, provenance: Optional[dict] = None) -> dict:
  """Writes config.json, a step-0 checkpoint {step, params, method_state} (what
  teachers.load reads) and convert.json; the converted trees must be exactly those of the
  tokenizer the config builds."""
  import jax

  from mim_jax import checkpointing
  ckpt_dir = os.path.join(out_dir, "checkpoints")
  if os.path.isdir(ckpt_dir) and os.listdir(ckpt_dir):
    raise ConversionError(f"{ckpt_dir} already holds checkpoints: give a new output directory")
  want, describe = _config_shapes(config, conv.spec)
  tree = {"params": conv.params, "method_state": conv.method_state}
  got = {k: tuple(np.shape(v)) for k, v in names.flat_paths(tree).items()}
  diff = sorted("/".join(k) + f" {list(got.get(k, []))} vs {list(want.get(k, []))}"
                for k in set(want) | set(got) if got.get(k) != want.get(k))
  if diff:
    raise ConversionError(f"the converted weights do not fit the written config's tokenizer "
                          f"({_fmt(diff, 4)})")
  os.makedirs(out_dir, exist_ok=True)
  state = dict(step=np.zeros((), np.int32), params=conv.params, method_state=conv.method_state)
  ckpt = checkpointing.Checkpointer(out_dir, keep=config.keep_ckpts, async_save=False)
  try:
    ckpt.save(0, state, None, {"model": describe, "step": 0}, force=True)
  finally:
    ckpt.close()
  if jax.process_index() != 0:
    return {}
  with open(os.path.join(out_dir, "config.json"), "w") as f:
    f.write(config.to_json_best_effort(indent=2))
  info = dict(provenance or {}, method=config.method, initialised_not_converted=[])
  with open(os.path.join(out_dir, "convert.json"), "w") as f:
    json.dump(info, f, indent=2)
  return info


def convert_checkpoint(path: str, out_dir: str, *, variant: str = "", patch_size: int = 0,
                       image_size: int = 0, preset: str = "", norm: str = "",
                       config_dir: str = "", reader: str = "pure") -> dict:
  """The whole `--from=torch --arch=vqkd` conversion; returns convert.json's contents."""
  from mim_jax import convert
  sd = convert.unwrap(convert.read_checkpoint(path, reader), "vqkd")
  conv = torch_to_mim(sd, variant=variant, patch_size=patch_size, image_size=image_size)
  config = make_config(conv.spec, preset=preset, norm=norm, config_dir=config_dir)
  s = conv.spec
  prov = dict(source=os.path.abspath(path), arch="vqkd", which="", ignored_keys=conv.ignored,
              spec=dataclasses.asdict(s.encoder), decoder_spec=dataclasses.asdict(s.decoder),
              codebook_size=s.codebook_size, code_dim=s.code_dim, decoder_out_dim=s.out_dim,
              norm=norm or "inception")
  return write_workdir(out_dir, config, conv, prov)
