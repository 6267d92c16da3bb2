"""DALL-E's dVAE encoder weights -> a mim_jax tokenizer workdir (`--arch=dalle`), BEiT's
original tokenizer.

openai/DALL-E `dall_e.Encoder` (what BEiT v1 loads from `encoder.pkl`) holds, under its state
dict's names:
  blocks.input.{w,b}                            7x7 convolution to n_hid
  blocks.group_<g>.block_<b>.id_path.{w,b}      1x1 convolution, where the width changes
  blocks.group_<g>.block_<b>.res_path.conv_<i>.{w,b}   i = 1..4 (3x3, 3x3, 3x3, 1x1)
  blocks.output.conv.{w,b}                      1x1 convolution to the vocab_size logits
(`w` in torch's [out, in, kh, kw] layout; the max-pools and ReLUs have no weights). mim_jax's
Tokenizer with `config.tokenizer.arch='dalle'` and the 'gumbel' quantizer has the same network
(mim_jax/methods/tokenizer.py DalleEncoder; its params 'encoder' and 'to_code'), and its
`token_ids` is the logits' argmax, as BEiT's `Dalle_VAE.get_codebook_indices`.

`encoder.pkl` is a pickled torch module; mim_jax's reader runs no pickled code, so save its
weights once with the dall_e package: `torch.save(dall_e.load_model("encoder.pkl").state_dict(),
"dalle_encoder.pth")`, then convert that file. The written workdir is configs/tokenizer.py
(default preset) with the network set from the weights, 112 px input (BEiT's
second_input_size) and DALL-E's `map_pixels` as the input normalisation: (1 - 2 * 0.1) x + 0.1
on [0, 1] pixels is mean -0.125, std 1.25. The decoder and the codebook the 'gumbel' decoder
reads are not in encoder.pkl: they keep their seeded initialisation (listed in convert.json),
so the run's reconstructions mean nothing; BEiT reads only the ids.
"""
from __future__ import annotations

import os
import re

import numpy as np

from mim_jax.convert.names import ConversionError

# DALL-E's map_pixels (logit_laplace_eps = 0.1) as a mean / std on [0, 1] pixels.
MAP_PIXELS_EPS = 0.1
MAP_PIXELS_NORM = ((-MAP_PIXELS_EPS / (1 - 2 * MAP_PIXELS_EPS),) * 3,
                   (1.0 / (1 - 2 * MAP_PIXELS_EPS),) * 3)
_KEY = re.compile(r"^blocks\.(?:(input)|output\.(conv)|group_(\d+)\.block_(\d+)\."
                  r"(?:(id_path)|res_path\.(conv_[1-4])))\.([wb])$")


def _leaf(value: np.ndarray, kind: str) -> tuple[str, np.ndarray]:
  value = np.asarray(value, np.float32)
  if kind == "w":
    return "kernel", np.transpose(value, (2, 3, 1, 0))      # [out, in, kh, kw] -> [kh, kw, in, out]
  return "bias", value


def torch_to_mim(sd: dict) -> tuple[dict, dict]:
  """(params {'encoder', 'to_code'}, spec dict(hidden, blocks_per_group, groups, vocab_size))
  of a dall_e Encoder state dict; any other key is an error."""
  if "blocks.input.w" not in sd or "blocks.output.conv.w" not in sd:
    raise ConversionError("the checkpoint is not a DALL-E encoder state dict (no blocks.input.w / "
                          "blocks.output.conv.w): save dall_e.load_model('encoder.pkl').state_dict()")
  params: dict = {"encoder": {}, "to_code": {}}
  unknown, groups, blocks = [], set(), set()
  for key, value in sd.items():
    m = _KEY.match(key)
    if m is None:
      unknown.append(key)
      continue
    inp, out, g, b, id_path, conv, kind = m.groups()
    name, leaf = _leaf(value, kind)
    if inp:
      params["encoder"].setdefault("input", {})[name] = leaf
    elif out:
      params["to_code"][name] = leaf
    else:
      groups.add(int(g))
      blocks.add(int(b))
      block = params["encoder"].setdefault(f"group_{g}_block_{b}", {})
      block.setdefault(id_path or conv, {})[name] = leaf
  if unknown:
    raise ConversionError(f"keys {sorted(unknown)[:4]} are not DALL-E encoder weights: point at "
                          f"the state dict of dall_e's Encoder")
  if sorted(groups) != list(range(1, len(groups) + 1)) or sorted(blocks) != list(range(1, len(blocks) + 1)):
    raise ConversionError(f"groups {sorted(groups)} / blocks {sorted(blocks)} are not numbered 1..n: "
                          f"the state dict is incomplete")
  hidden = int(sd["blocks.input.w"].shape[0])
  spec = dict(hidden=hidden, blocks_per_group=len(blocks), groups=len(groups),
              vocab_size=int(sd["blocks.output.conv.w"].shape[0]))
  return params, spec


def make_config(spec: dict, *, image_size: int = 0, config_dir: str = ""):
  """configs/tokenizer.py (default preset) as a DALL-E encoder: arch 'dalle', 'gumbel' codes,
  patch 2**(groups - 1), `image_size` (default 112, BEiT's tokenizer input), map_pixels."""
  from mim_jax import convert
  c = convert.load_config("tokenizer", "", config_dir)
  patch = 2 ** (spec["groups"] - 1)
  image_size = image_size or 112
  if image_size % patch:
    raise ConversionError(f"--image_size={image_size} is not a multiple of the encoder's "
                          f"downsampling {patch}")
  c.input.image_size = image_size
  c.model.patch_size = patch
  c.tokenizer.update(arch="dalle", quantizer="gumbel", codebook_size=spec["vocab_size"])
  c.tokenizer.dalle.update(hidden=spec["hidden"], blocks_per_group=spec["blocks_per_group"])
  c.input.mean, c.input.std = MAP_PIXELS_NORM
  c.ema.enabled = False
  return c


def convert_checkpoint(path: str, out_dir: str, *, image_size: int = 0, config_dir: str = "",
                       reader: str = "pure") -> dict:
  """The whole `--from=torch --arch=dalle` conversion; returns convert.json's contents."""
  from mim_jax import convert
  sd = convert.unwrap(convert.read_checkpoint(path, reader), "dalle")
  params, spec = torch_to_mim(sd)
  config = make_config(spec, image_size=image_size, config_dir=config_dir)
  prov = dict(source=os.path.abspath(path), arch="dalle", which="", ignored_keys=[],
              dalle_spec=spec, codebook_size=spec["vocab_size"],
              spec=dict(patch=int(config.model.patch_size),
                        grid=int(config.input.image_size) // int(config.model.patch_size)))
  return convert.write_workdir(out_dir, config, params, prov)
