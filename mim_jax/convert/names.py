"""Name maps between PyTorch ViT state dicts (timm, MAE, BEiT, DINO / iBOT) and mim_jax trees.

A map is a list of `Entry(torch_key, mim_path, kind)`; `kind` says how the array changes layout:
  same    identical arrays (tokens, position tables, biases, LayerNorm weight -> scale, gammas,
          the relative position bias table, whose index layout equals vit.relative_position_index);
  linear  torch Linear weight [out, in] <-> flax Dense kernel [in, out] (a transpose). The fused
          qkv weight [3D, D] maps as a whole: vit.Attention reshapes its 3D outputs as (3, heads,
          head_dim) exactly as timm's Attention does, so q, k, v and the heads line up unsplit;
  patch   Conv2d weight [D, C, p, p] <-> vit.PatchEmbed's Dense kernel [p * p * C, D], whose rows
          are (row, column, channel) of a patch;
  token2  iBOT's `masked_embed` [1, D] <-> a mim_jax mask token [1, 1, D];
  conv1x1 a 1x1 Conv2d weight [D, C, 1, 1] <-> a Dense kernel [C, D] (VQ-KD's decoder patch
          embedding over the C-channel code map, any C).
`encoder_entries` builds the map of one ViT encoder for a `ViTSpec`; `take` reads a state dict
through a map, checking every shape; `put` writes one.
"""
from __future__ import annotations

import dataclasses
import re
from typing import Any, Optional

import numpy as np

from mim_jax.models import vit

PyTree = Any


class ConversionError(ValueError):
  """Weights that do not fit the requested architecture; the message names the keys."""


# width -> the mim_jax variant name used when writing a config (the first of each width).
WIDTH_TO_VARIANT = {64: "mu", 192: "tiny", 384: "small", 768: "base", 1024: "large", 1280: "huge"}


@dataclasses.dataclass(frozen=True)
class ViTSpec:
  """What a mim_jax ViT encoder's parameter tree holds (vit.ViT's switches that add parameters)."""
  width: int
  depth: int
  heads: int
  patch: int
  grid: int
  qkv_bias: str = "qkv"          # 'qkv' | 'qv' | 'none'
  layer_scale: bool = False
  pos_embed: str = "learned"     # 'learned' (a parameter) | 'sincos' (fixed) | 'none'
  rel_pos_bias: str = "none"     # 'none' | 'shared'
  mask_token: bool = False

  @property
  def image_size(self) -> int:
    return self.grid * self.patch

  @property
  def variant(self) -> str:
    return WIDTH_TO_VARIANT[self.width]


@dataclasses.dataclass(frozen=True)
class Entry:
  torch_key: str
  path: tuple[str, ...]
  kind: str = "same"


@dataclasses.dataclass(frozen=True)
class ShapedEntry:
  """An `Entry` that also holds the torch tensor's shape (the CNN, Swin and MViT maps, which
  check every tensor against the architecture read from the state dict)."""
  torch_key: str
  path: tuple
  kind: str
  shape: tuple


def to_torch(kind: str, x: np.ndarray) -> np.ndarray:
  """A mim_jax array in torch's layout: 'linear' [in, out] -> [out, in]; 'conv' HWIO -> OIHW;
  'conv3d' THWIO -> OITHW; 'conv1x1' [in, out] -> [out, in, 1, 1]; 'patch' a flattened patch embedding -> OIHW;
  'token2' [1, 1, D] -> [1, D]; 'same' as it is."""
  x = np.asarray(x)
  if kind == "linear":
    return x.T
  if kind == "conv":
    return x.transpose(3, 2, 0, 1)
  if kind == "conv3d":
    return x.transpose(4, 3, 0, 1, 2)
  if kind == "patch":
    kp, d = x.shape
    c = 3
    p = int(round((kp // c) ** 0.5))
    return x.reshape(p, p, c, d).transpose(3, 2, 0, 1)
  if kind == "token2":
    return x.reshape(1, -1)
  if kind == "conv1x1":
    return x.T[:, :, None, None]
  return x


def from_torch(kind: str, x: np.ndarray) -> np.ndarray:
  """The inverse of `to_torch`."""
  x = np.asarray(x)
  if kind == "linear":
    return x.T
  if kind == "conv":
    return x.transpose(2, 3, 1, 0)
  if kind == "conv3d":
    return x.transpose(2, 3, 4, 1, 0)
  if kind == "patch":
    d, c, p, _ = x.shape
    return x.transpose(2, 3, 1, 0).reshape(p * p * c, d)
  if kind == "token2":
    return x.reshape(1, 1, -1)
  if kind == "conv1x1":
    if x.ndim != 4 or x.shape[2:] != (1, 1):
      raise ValueError(f"not a 1x1 convolution weight: {list(x.shape)}")
    return x[:, :, 0, 0].T
  return x


def torch_shape(kind: str, shape: tuple) -> tuple:
  return tuple(to_torch(kind, np.zeros(shape, np.int8)).shape)


# ---------------------------------------------------------------------------------------------
# Maps.

def block_entries(spec: ViTSpec, tprefix: str, mpath: tuple, i: int, style: str) -> list[Entry]:
  """One pre-norm block: torch `{tprefix}{i}.` <-> mim `mpath + ('blockNN',)`.

  style 'timm': fused qkv bias `attn.qkv.bias`, layer scale `ls1.gamma` / `ls2.gamma`;
  style 'beit': `attn.q_bias` / `attn.v_bias`, layer scale `gamma_1` / `gamma_2`.
  """
  t, m = f"{tprefix}{i}.", mpath + (f"block{i:02d}",)
  out = [Entry(t + "norm1.weight", m + ("norm1", "scale")),
         Entry(t + "norm1.bias", m + ("norm1", "bias")),
         Entry(t + "attn.qkv.weight", m + ("attn", "qkv_kernel"), "linear")]
  if spec.qkv_bias == "qkv":
    out.append(Entry(t + "attn.qkv.bias", m + ("attn", "qkv_bias")))
  elif spec.qkv_bias == "qv":
    out += [Entry(t + "attn.q_bias", m + ("attn", "q_bias")),
            Entry(t + "attn.v_bias", m + ("attn", "v_bias"))]
  out += [Entry(t + "attn.proj.weight", m + ("attn", "proj", "kernel"), "linear"),
          Entry(t + "attn.proj.bias", m + ("attn", "proj", "bias"))]
  out += [Entry(t + "norm2.weight", m + ("norm2", "scale")),
          Entry(t + "norm2.bias", m + ("norm2", "bias"))]
  for name in ("fc1", "fc2"):
    out += [Entry(t + f"mlp.{name}.weight", m + ("mlp", name, "kernel"), "linear"),
            Entry(t + f"mlp.{name}.bias", m + ("mlp", name, "bias"))]
  if spec.layer_scale:
    names = ("gamma_1", "gamma_2") if style == "beit" else ("ls1.gamma", "ls2.gamma")
    out += [Entry(t + names[0], m + ("gamma_1",)), Entry(t + names[1], m + ("gamma_2",))]
  return out


def encoder_entries(spec: ViTSpec, style: str = "timm", prefix: str = "",
                    mask_token_key: str = "mask_token") -> list[Entry]:
  """The map of a whole encoder (patch embed, tokens, position, blocks, final norm)."""
  p = prefix
  out = [Entry(p + "patch_embed.proj.weight", ("patch_embed", "proj", "kernel"), "patch"),
         Entry(p + "patch_embed.proj.bias", ("patch_embed", "proj", "bias")),
         Entry(p + "cls_token", ("cls_token",))]
  if spec.pos_embed == "learned":
    out.append(Entry(p + "pos_embed", ("pos_embed",)))
  if spec.mask_token:
    out.append(Entry(p + mask_token_key, ("mask_token",),
                     "token2" if mask_token_key == "masked_embed" else "same"))
  if spec.rel_pos_bias == "shared":
    out.append(Entry(p + "rel_pos_bias.relative_position_bias_table", ("rel_pos_bias", "table")))
  for i in range(spec.depth):
    out += block_entries(spec, p + "blocks.", ("encoder",), i, style)
  out += [Entry(p + "norm.weight", ("encoder", "norm", "scale")),
          Entry(p + "norm.bias", ("encoder", "norm", "bias"))]
  return out


def mae_decoder_entries(depth: int) -> list[Entry]:
  """facebookresearch/mae's decoder <-> mim_jax's MAEDecoder (decoder_pos_embed is fixed and
  checked separately)."""
  dspec = ViTSpec(width=0, depth=depth, heads=0, patch=0, grid=0)
  out = [Entry("decoder_embed.weight", ("embed", "kernel"), "linear"),
         Entry("decoder_embed.bias", ("embed", "bias")),
         Entry("mask_token", ("mask_token",))]
  for i in range(depth):
    out += block_entries(dspec, "decoder_blocks.", ("blocks",), i, "timm")
  out += [Entry("decoder_norm.weight", ("blocks", "norm", "scale")),
          Entry("decoder_norm.bias", ("blocks", "norm", "bias")),
          Entry("decoder_pred.weight", ("pred", "kernel"), "linear"),
          Entry("decoder_pred.bias", ("pred", "bias"))]
  return out


# ---------------------------------------------------------------------------------------------
# Reading and writing through a map.

def _get(tree: PyTree, path: tuple):
  for k in path:
    tree = tree[k]
  return tree


def _set(tree: dict, path: tuple, value) -> None:
  for k in path[:-1]:
    tree = tree.setdefault(k, {})
  tree[path[-1]] = value


def take(sd: dict, entries: list[Entry], shapes: Optional[dict] = None,
         used: Optional[set] = None) -> tuple[dict, list[str], list[str]]:
  """(mim tree, missing keys, bad shapes) of `sd` read through `entries`, float32.

  `shapes`: {mim path: expected mim shape}; a torch array whose converted shape differs is
  reported as 'key [torch shape] (expected [shape])'. Keys read are added to `used`.
  """
  tree: dict = {}
  missing, bad = [], []
  for e in entries:
    if e.torch_key not in sd:
      missing.append(e.torch_key)
      continue
    if used is not None:
      used.add(e.torch_key)
    x = np.asarray(sd[e.torch_key])
    want = shapes.get(e.path) if shapes else None
    if want is not None and x.shape != torch_shape(e.kind, want):
      bad.append(f"{e.torch_key} {list(x.shape)} (expected {list(torch_shape(e.kind, want))})")
      continue
    try:
      _set(tree, e.path, from_torch(e.kind, x).astype(np.float32))
    except ValueError:
      bad.append(f"{e.torch_key} {list(x.shape)}")
  return tree, missing, bad


def put(tree: PyTree, entries: list[Entry]) -> dict:
  """{torch key: float32 array in torch layout} of `tree` through `entries`."""
  out = {}
  for e in entries:
    try:
      x = _get(tree, e.path)
    except (KeyError, TypeError):
      raise ConversionError(f"the mim_jax parameters lack {'/'.join(e.path)} (for "
                            f"{e.torch_key}): the run's model does not have the feature this "
                            f"export expects") from None
    out[e.torch_key] = np.ascontiguousarray(to_torch(e.kind, np.asarray(x, np.float32)))
  return out


def fmt_keys(keys, n: int = 4) -> str:
  """The first `n` of `keys`, comma-separated, with '(+k more)' for the rest."""
  keys = list(keys)
  more = f" (+{len(keys) - n} more)" if len(keys) > n else ""
  return ", ".join(keys[:n]) + more


def take_shaped(sd: dict, entries: list[ShapedEntry], *, lacks: str, not_ours: str,
                misfit: str, ignored=()) -> dict:
  """The float32 tree of `sd` read through `entries` (ShapedEntry: every tensor's torch shape
  is known), for the CNN, Swin and MViT maps. ConversionError, one line, for a key the map
  needs and `sd` lacks ('`lacks` k1, k2'), a key of `sd` outside the map and `ignored` ('keys
  that are not `not_ours`: ...'), or a tensor of another shape ('shapes that do not fit
  `misfit`: ...')."""
  known = {e.torch_key for e in entries}
  missing = [e.torch_key for e in entries if e.torch_key not in sd]
  if missing:
    raise ConversionError(f"{lacks} {fmt_keys(missing)}")
  ignored = set(ignored)
  unknown = [k for k in sd if k not in known and k not in ignored]
  if unknown:
    raise ConversionError(f"keys that are not {not_ours}: {fmt_keys(unknown)} (drop them, or "
                          f"strip a prefix, before converting)")
  bad = [f"{e.torch_key} {list(np.shape(sd[e.torch_key]))} (expected {list(e.shape)})"
         for e in entries if tuple(np.shape(sd[e.torch_key])) != tuple(e.shape)]
  if bad:
    raise ConversionError(f"shapes that do not fit {misfit}: {fmt_keys(bad, 3)}")
  tree: dict = {}
  for e in entries:
    _set(tree, e.path, np.ascontiguousarray(
        from_torch(e.kind, np.asarray(sd[e.torch_key], np.float32))))
  return tree


def put_shaped(tree: PyTree, entries: list[ShapedEntry], dtype=np.float32) -> dict:
  """{torch key: array in torch layout} of `tree` through `entries` (the inverse of
  `take_shaped`); ConversionError for a path the tree lacks or a tensor of another shape."""
  out = {}
  for e in entries:
    try:
      x = _get(tree, e.path)
    except (KeyError, TypeError):
      raise ConversionError(f"the parameters lack {'/'.join(e.path)} (for {e.torch_key})") from None
    x = np.ascontiguousarray(to_torch(e.kind, np.asarray(x, dtype)))
    if x.shape != tuple(e.shape):
      raise ConversionError(f"{'/'.join(e.path)} {list(x.shape)} does not fit {e.torch_key} "
                            f"{list(e.shape)}")
    out[e.torch_key] = x
  return out


def flat_paths(tree: PyTree, prefix: tuple = ()) -> dict:
  """{path tuple: leaf} of a nested dict."""
  out = {}
  for k, v in tree.items():
    if isinstance(v, dict):
      out.update(flat_paths(v, prefix + (k,)))
    else:
      out[prefix + (k,)] = v
  return out


def block_indices(sd: dict, prefix: str) -> list[int]:
  pat = re.compile(re.escape(prefix) + r"(\d+)\.")
  return sorted({int(m.group(1)) for k in sd for m in [pat.match(k)] if m})


def sincos_table(width: int, grid: int) -> np.ndarray:
  return vit.sincos_2d(width, grid, cls_token=True)[None]
