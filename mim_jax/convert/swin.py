r"""microsoft/Swin-Transformer and microsoft/SimMIM Swin state dicts <-> mim_jax.models.swin.

`torch_to_params(sd)` reads a `SwinTransformer` / `SwinTransformerV2` state dict (numpy arrays
under the official names; a SimMIM pretraining checkpoint's 'encoder.' / 'decoder.' keys
too) into {'encoder': ..., ['decoder': ...], ['head': ...]} for `swin.SwinTransformer`,
SimMIM's decoder and the fine-tuning head, with the `SwinSpec` read from the shapes and the
buffers: version (v2 has `logit_scale`), patch and width (patch_embed.proj), blocks per stage,
heads (the v1 tables' columns, v2's logit scales), window (a `relative_position_index`), image
size (a shifted block's `attn_mask` counts the stage-0 windows, else --image_size), qkv
biases, ape, patch_norm, v2's extra norms (`norm3`) and the pretrained window sizes (v2's
`relative_coords_table` largest entry, log2((ws - 1) / (pws - 1) * 8 + 1) / 3).
`params_to_torch` writes the official names back, buffers included (relative_position_index,
relative_coords_table, attn_mask, as the official modules register them), so the official
`load_state_dict(strict=True)` takes them.

Layouts: Conv2d weight [O, I, kh, kw] <-> flax Conv kernel [kh, kw, I, O]; Linear weight
[out, in] <-> Dense kernel [in, out] (the fused qkv as a whole: the model reshapes its 3C
outputs as (3, heads, head_dim) like the official code); SimMIM's 1x1 decoder conv
[s^2 * 3, C, 1, 1] <-> Dense kernel [C, s^2 * 3]; LayerNorm weight -> scale; tables, logit
scales, q / v biases, tokens unchanged.

  python -m mim_jax.convert.swin --arch=swin|swinv2 in.pth OUT_WORKDIR [--image_size=N]
      [--preset=P] [--reader=pure|torch]

writes a configs/simmim.py workdir (the model and image size from the weights; see
`make_config`) for an encoder checkpoint, a configs/finetune.py one when the weights carry a
classifier `head`; `python -m mim_jax.convert --from=torch --arch=swin|swinv2` runs the same.
tools/official_parity.py checks the written workdir against the official modules' outputs.
"""
from __future__ import annotations

import dataclasses
import math
import re
import sys
from typing import Any

import ml_collections
import numpy as np

from mim_jax.convert.names import ConversionError, fmt_keys, from_torch, put_shaped, take_shaped
from mim_jax.convert.names import ShapedEntry as Entry
from mim_jax.models import swin

PyTree = Any
ARCHS = {"swin": 1, "swinv2": 2}
BUFFERS = ("relative_position_index", "relative_coords_table", "attn_mask")


@dataclasses.dataclass(frozen=True)
class SwinSpec:
  """What a Swin's weights determine (swin.SwinTransformer's parameter-shaping fields)."""
  version: int
  embed_dim: int
  depths: tuple
  num_heads: tuple
  patch_size: int = 4
  window_size: int = 7
  image_size: int = 224
  qkv_bias: bool = True
  ape: bool = False
  patch_norm: bool = True
  extra_norm_period: int = 0
  pretrained_window_sizes: tuple = ()

  def model_config(self, **kw) -> ml_collections.ConfigDict:
    """`config.model` of this Swin (a named variant when the sizes are one, else explicit)."""
    named = [n for n, (e, d, h, p) in swin.VARIANTS.items()
             if (e, d, h) == (self.embed_dim, tuple(self.depths), tuple(self.num_heads))
             and (self.version == 2 or n not in swin.V2_ONLY)]
    sizes = (dict(variant=named[0], extra_norm_period=self.extra_norm_period) if named else
             dict(embed_dim=self.embed_dim, depths=tuple(self.depths),
                  num_heads=tuple(self.num_heads), extra_norm_period=self.extra_norm_period))
    return swin.default_config(version=self.version, patch_size=self.patch_size,
                               window_size=self.window_size, qkv_bias=self.qkv_bias, ape=self.ape,
                               patch_norm=self.patch_norm,
                               pretrained_window_sizes=tuple(self.pretrained_window_sizes),
                               **sizes, **kw)

  def stage_windows(self) -> list[int]:
    r = self.image_size // self.patch_size
    out = []
    for _ in self.depths:
      out.append(swin.window_and_shift((r, r), self.window_size, False)[0])
      r //= 2
    return out


def _linear(tkey: str, path: tuple, cin: int, cout: int, bias: bool = True) -> list[Entry]:
  out = [Entry(f"{tkey}.weight", (*path, "kernel"), "linear", (cout, cin))]
  return out + ([Entry(f"{tkey}.bias", (*path, "bias"), "same", (cout,))] if bias else [])


def _norm(tkey: str, path: tuple, c: int) -> list[Entry]:
  return [Entry(f"{tkey}.weight", (*path, "scale"), "same", (c,)),
          Entry(f"{tkey}.bias", (*path, "bias"), "same", (c,))]


def encoder_entries(spec: SwinSpec, mask_token: bool = False) -> list[Entry]:
  """Every official parameter key of the Swin `spec` describes (no buffers), in module order."""
  c, p = spec.embed_dim, spec.patch_size
  out = [Entry("patch_embed.proj.weight", ("patch_embed", "proj", "kernel"), "conv", (c, 3, p, p)),
         Entry("patch_embed.proj.bias", ("patch_embed", "proj", "bias"), "same", (c,))]
  if spec.patch_norm:
    out += _norm("patch_embed.norm", ("patch_embed", "norm"), c)
  grid = spec.image_size // p
  if spec.ape:
    out.append(Entry("absolute_pos_embed", ("absolute_pos_embed",), "same", (1, grid * grid, c)))
  if mask_token:
    out.append(Entry("mask_token", ("mask_token",), "same", (1, 1, c)))
  windows = spec.stage_windows()
  for i, (depth, heads) in enumerate(zip(spec.depths, spec.num_heads)):
    d = c * 2 ** i
    for j in range(depth):
      t, m = f"layers.{i}.blocks.{j}", (f"layers_{i}", f"blocks_{j}")
      out += _norm(f"{t}.norm1", (*m, "norm1"), d)
      a, ma = f"{t}.attn", (*m, "attn")
      if spec.version == 1:
        ws = windows[i]
        out.append(Entry(f"{a}.relative_position_bias_table",
                         (*ma, "relative_position_bias_table"), "same", ((2 * ws - 1) ** 2, heads)))
        out += _linear(f"{a}.qkv", (*ma, "qkv"), d, 3 * d, spec.qkv_bias)
      else:
        out.append(Entry(f"{a}.logit_scale", (*ma, "logit_scale"), "same", (heads, 1, 1)))
        if spec.qkv_bias:
          out += [Entry(f"{a}.q_bias", (*ma, "q_bias"), "same", (d,)),
                  Entry(f"{a}.v_bias", (*ma, "v_bias"), "same", (d,))]
        out += _linear(f"{a}.cpb_mlp.0", (*ma, "cpb_mlp", "fc1"), 2, swin.CPB_HIDDEN)
        out += _linear(f"{a}.cpb_mlp.2", (*ma, "cpb_mlp", "fc2"), swin.CPB_HIDDEN, heads, False)
        out += _linear(f"{a}.qkv", (*ma, "qkv"), d, 3 * d, False)
      out += _linear(f"{a}.proj", (*ma, "proj"), d, d)
      out += _norm(f"{t}.norm2", (*m, "norm2"), d)
      out += _linear(f"{t}.mlp.fc1", (*m, "mlp", "fc1"), d, 4 * d)
      out += _linear(f"{t}.mlp.fc2", (*m, "mlp", "fc2"), 4 * d, d)
      if spec.extra_norm_period and (j + 1) % spec.extra_norm_period == 0:
        out += _norm(f"{t}.norm3", (*m, "norm3"), d)
    if i < len(spec.depths) - 1:
      t, m = f"layers.{i}.downsample", (f"layers_{i}", "downsample")
      out += _linear(f"{t}.reduction", (*m, "reduction"), 4 * d, 2 * d, False)
      out += _norm(f"{t}.norm", (*m, "norm"), 4 * d if spec.version == 1 else 2 * d)
  return out + _norm("norm", ("norm",), c * 2 ** (len(spec.depths) - 1))


def _blocks(sd: dict) -> list[int]:
  """Blocks per stage from the `layers.i.blocks.j.` keys."""
  found: dict = {}
  for k in sd:
    m = re.match(r"layers\.(\d+)\.blocks\.(\d+)\.", k)
    if m:
      found.setdefault(int(m.group(1)), set()).add(int(m.group(2)))
  return [len(found[i]) for i in sorted(found)]


def _pretrained_window(table: np.ndarray, ws: int) -> int:
  """The pretrained window v2's relative_coords_table was normalised with (0: its own)."""
  top = float(np.abs(np.asarray(table)).max())
  if ws < 2 or top == 0:
    return 0
  pws = int(round((ws - 1) * 8 / (2 ** (3 * top) - 1) + 1))
  return 0 if pws == ws else pws


def spec_from_state_dict(sd: dict, image_size: int = 0) -> SwinSpec:
  """The SwinSpec of an official state dict (prefixes already stripped); `image_size` when no
  shifted stage-0 block's attn_mask gives it."""
  if "patch_embed.proj.weight" not in sd:
    raise ConversionError(f"not a Swin state dict: no patch_embed.proj.weight (keys: "
                          f"{fmt_keys(sorted(sd))})")
  c, _, p, _ = np.shape(sd["patch_embed.proj.weight"])
  depths = tuple(_blocks(sd))
  if not depths:
    raise ConversionError("not a Swin state dict: no layers.i.blocks.j keys")
  version = 2 if "layers.0.blocks.0.attn.logit_scale" in sd else 1
  if version == 1:
    heads = tuple(int(np.shape(sd[f"layers.{i}.blocks.0.attn.relative_position_bias_table"])[1])
                  for i in range(len(depths)))
  else:
    heads = tuple(int(np.shape(sd[f"layers.{i}.blocks.0.attn.logit_scale"])[0])
                  for i in range(len(depths)))
  index = sd.get("layers.0.blocks.0.attn.relative_position_index")
  if index is not None:
    ws = int(round(math.sqrt(np.shape(index)[0])))
  elif version == 1:
    ws = (int(round(math.sqrt(np.shape(sd["layers.0.blocks.0.attn.relative_position_bias_table"])[0]))) + 1) // 2
  else:
    raise ConversionError("the Swin V2 state dict has no relative_position_index buffers: the "
                          "window size cannot be read (save the full model.state_dict())")
  mask = sd.get("layers.0.blocks.1.attn_mask") if depths[0] > 1 else None
  if mask is not None and np.ndim(mask) == 3:
    size = int(round(math.sqrt(np.shape(mask)[0]))) * ws * p
    if image_size and image_size != size:
      raise ConversionError(f"--image_size={image_size}, but the weights' attn_mask was built "
                            f"for {size}px: drop --image_size")
    image_size = size
  if not image_size:
    raise ConversionError("the state dict has no stage-0 attn_mask to read the image size from: "
                          "give --image_size")
  qkv_bias = ("layers.0.blocks.0.attn.qkv.bias" in sd if version == 1
              else "layers.0.blocks.0.attn.q_bias" in sd)
  period = 0
  extra = sorted({int(m.group(1)) + 1 for k in sd for m in [re.match(r"layers\.\d+\.blocks\.(\d+)\.norm3\.", k)] if m})
  if extra:
    period = extra[0]
  pws = ()
  if version == 2:
    spec = SwinSpec(version, int(c), depths, heads, int(p), ws, image_size)
    tables = [sd.get(f"layers.{i}.blocks.0.attn.relative_coords_table") for i in range(len(depths))]
    if all(t is not None for t in tables):
      pws = tuple(_pretrained_window(t, w) for t, w in zip(tables, spec.stage_windows()))
      pws = pws if any(pws) else ()
  return SwinSpec(version, int(c), depths, heads, int(p), ws, image_size, qkv_bias,
                  "absolute_pos_embed" in sd, "patch_embed.norm.weight" in sd, period, pws)


def _strip(sd: dict) -> tuple[dict, dict]:
  """(encoder keys without 'module.' / 'encoder.' prefixes, SimMIM decoder keys)."""
  sd = {k[len("module."):] if k.startswith("module.") else k: v for k, v in sd.items()}
  decoder = {k: v for k, v in sd.items() if k.startswith("decoder.")}
  if any(k.startswith("encoder.") for k in sd):
    sd = {k[len("encoder."):]: v for k, v in sd.items() if k.startswith("encoder.")}
  else:
    sd = {k: v for k, v in sd.items() if not k.startswith("decoder.")}
  return sd, decoder


def torch_to_params(sd: dict, image_size: int = 0) -> tuple[dict, SwinSpec, list[str]]:
  """({'encoder': tree[, 'decoder': SimMIM's conv][, 'head': {'fc': ...}]} of float32 numpy,
  SwinSpec, the keys left out (buffers)) of an official Swin state dict. ConversionError, one
  line, for missing, unknown or misshapen keys."""
  enc_sd, dec_sd = _strip(dict(sd))
  spec = spec_from_state_dict(enc_sd, image_size)
  ents = encoder_entries(spec, mask_token="mask_token" in enc_sd)
  head = [Entry("head.weight", ("head", "fc", "kernel"), "linear",
                (int(np.shape(enc_sd["head.weight"])[0]), spec.embed_dim * 2 ** (len(spec.depths) - 1))),
          Entry("head.bias", ("head", "fc", "bias"), "same", (int(np.shape(enc_sd["head.weight"])[0]),))
          ] if "head.weight" in enc_sd else []
  ignored = sorted(k for k in enc_sd if k.rsplit(".", 1)[-1] in BUFFERS)
  tree = take_shaped(enc_sd, ents + head, lacks=f"the Swin v{spec.version} state dict lacks",
                     not_ours=f"a Swin v{spec.version}'s", misfit="the Swin read from the weights",
                     ignored=ignored)
  tree = {"encoder": {k: v for k, v in tree.items() if k != "head"},
          **({"head": tree["head"]} if "head" in tree else {})}
  if dec_sd:
    w = np.asarray(dec_sd.get("decoder.0.weight"), np.float32)
    if w.ndim != 4 or "decoder.0.bias" not in dec_sd or len(dec_sd) != 2:
      raise ConversionError(f"SimMIM's decoder is decoder.0.weight [s^2*3, C, 1, 1] and "
                            f"decoder.0.bias; got {fmt_keys(sorted(dec_sd))}")
    tree["decoder"] = {"conv1x1": {"kernel": from_torch("conv1x1", w),
                                   "bias": np.asarray(dec_sd["decoder.0.bias"], np.float32)}}
  return tree, spec, ignored


def buffers(spec: SwinSpec) -> dict:
  """The official modules' registered buffers for `spec` (int64 index, float32 tables and
  masks), so that a strict load_state_dict takes the exported dict."""
  out = {}
  r = spec.image_size // spec.patch_size
  pws = tuple(spec.pretrained_window_sizes) or (0,) * len(spec.depths)
  for i, depth in enumerate(spec.depths):
    for j in range(depth):
      ws, shift = swin.window_and_shift((r, r), spec.window_size, j % 2 == 1)
      t = f"layers.{i}.blocks.{j}"
      out[f"{t}.attn.relative_position_index"] = swin.relative_position_index(ws).astype(np.int64)
      if spec.version == 2:
        out[f"{t}.attn.relative_coords_table"] = swin.relative_coords_table(ws, pws[i]).reshape(
            1, 2 * ws - 1, 2 * ws - 1, 2)
      if shift:
        out[f"{t}.attn_mask"] = swin.attention_mask(r, r, ws, shift)
    r //= 2
  return out


def params_to_torch(encoder: PyTree, spec: SwinSpec, with_buffers: bool = True) -> dict:
  """{official key: numpy array in torch layout} of a mim_jax Swin encoder's parameters (a
  mask token included when present), with the buffers unless `with_buffers` is False."""
  out = put_shaped(encoder, encoder_entries(spec, mask_token="mask_token" in encoder))
  return {**out, **(buffers(spec) if with_buffers else {})}


def make_config(spec: SwinSpec, *, classes: int = 0, preset: str = "",
                config_dir: str = "") -> ml_collections.ConfigDict:
  """configs/simmim.py (an encoder) or configs/finetune.py (weights with a head of `classes`)
  with the model and image size from the weights: at `preset`, or by default the swin_cifar10
  preset reading the embedded CIFAR-10 subset (as the ViT converter's default preset; a run
  that names the workdir in config.finetune.pretrained reads only its model and weights).
  SimMIM's mask patch: 32 px where it tiles the image, else the largest of 2 and 1 patches."""
  from mim_jax import config_lib  # pylint: disable=g-import-not-at-top
  method = "finetune" if classes else "simmim"
  try:
    c = config_lib.load(method, preset or "swin_cifar10", config_dir)
  except (FileNotFoundError, ValueError) as e:
    raise ConversionError(str(e)) from None
  if c.model.get("name") != "swin":
    raise ConversionError(f"--preset={preset!r} of configs/{method}.py is not a Swin preset: use "
                          f"swin_cifar10, imagenet_swin_b or imagenet_swinv2_b")
  if not preset:
    c.input.data.update(name="embedded", dir="", holdout_per_class=100)
  c.model = spec.model_config(drop_path=float(c.model.drop_path), dtype=c.model.dtype)
  c.input.image_size = spec.image_size
  if classes:
    c.finetune.num_classes = classes
  else:
    p = spec.patch_size
    c.simmim.mask_patch_size = next(m for m in (32, 2 * p, p)
                                    if spec.image_size % m == 0 and m % p == 0)
  return c


def convert_checkpoint(path: str, out_dir: str, arch: str, *, image_size: int = 0,
                       preset: str = "", config_dir: str = "", reader: str = "pure") -> dict:
  """An official Swin checkpoint -> a mim_jax workdir (convert.write_workdir: the trainer's own
  config.json and step-0 checkpoint); returns convert.json's provenance."""
  from mim_jax import convert  # pylint: disable=g-import-not-at-top
  if arch not in ARCHS:
    raise ConversionError(f"--arch={arch!r}: use {' or '.join(ARCHS)}")
  sd = convert.read_checkpoint(path, reader)
  if isinstance(sd, dict) and isinstance(sd.get("model"), dict):
    sd = sd["model"]
  tree, spec, ignored = torch_to_params(sd, image_size)
  if spec.version != ARCHS[arch]:
    raise ConversionError(f"--arch={arch} but the weights are a Swin v{spec.version}: use "
                          f"--arch={'swinv2' if spec.version == 2 else 'swin'}")
  classes = int(tree["head"]["fc"]["bias"].shape[0]) if "head" in tree else 0
  config = make_config(spec, classes=classes, preset=preset, config_dir=config_dir)
  if classes:
    tree["encoder"].pop("mask_token", None)
  prov = dict(source=path, arch=arch, spec=dataclasses.asdict(spec), ignored_keys=ignored)
  return convert.write_workdir(out_dir, config, tree, prov)


def main(argv=None) -> int:
  import argparse  # pylint: disable=g-import-not-at-top
  from mim_jax.convert.reader import CheckpointReadError  # pylint: disable=g-import-not-at-top
  p = argparse.ArgumentParser(prog="python -m mim_jax.convert.swin", description=__doc__,
                              formatter_class=argparse.RawDescriptionHelpFormatter)
  p.add_argument("input")
  p.add_argument("output")
  p.add_argument("--arch", required=True, choices=sorted(ARCHS))
  p.add_argument("--image_size", type=int, default=0)
  p.add_argument("--preset", default="")
  p.add_argument("--config_dir", default="")
  p.add_argument("--reader", default="pure")
  args = p.parse_args(argv)
  try:
    info = convert_checkpoint(args.input, args.output, args.arch, image_size=args.image_size,
                              preset=args.preset, config_dir=args.config_dir, reader=args.reader)
  except (ConversionError, CheckpointReadError) as e:
    print(f"error: {e}", file=sys.stderr)
    return 1
  spec = info.get("spec", {})
  print(f"wrote {args.output}: method {info.get('method')}, Swin v{spec.get('version')} embed "
        f"{spec.get('embed_dim')} depths {spec.get('depths')} window {spec.get('window_size')} at "
        f"{spec.get('image_size')}px; use it as --config.finetune.pretrained={args.output}")
  return 0


if __name__ == "__main__":
  sys.exit(main())
