"""DALL-E dVAE encoder weights (BEiT's tokenizer) -> a mim_jax tokenizer workdir.

The reference is a direct NumPy port of openai/DALL-E dall_e/encoder.py on the torch-layout
state dict (NCHW, [out, in, kh, kw] kernels), so the layouts, the block wiring, the post-gain
and the map_pixels normalisation are all checked against the definition, not against the code
under test."""
from __future__ import annotations

import json
import os

import jax.numpy as jnp
import numpy as np
import pytest

from mim_jax import teachers
from mim_jax.convert import __main__ as convert_cli

HID, BLOCKS, GROUPS, VOCAB = 8, 2, 4, 16       # DALL-E: 256, 2, 4, 8192


def _state_dict(seed=0):
  rng = np.random.default_rng(seed)

  def conv(sd, name, n_in, n_out, kw):
    sd[f"{name}.w"] = rng.normal(0, 1 / np.sqrt(n_in * kw * kw), (n_out, n_in, kw, kw)).astype(np.float32)
    sd[f"{name}.b"] = rng.normal(0, 0.1, (n_out,)).astype(np.float32)

  sd: dict = {}
  conv(sd, "blocks.input", 3, HID, 7)
  n_in = HID
  for g in range(1, GROUPS + 1):
    n_out = HID * 2 ** (g - 1)
    for b in range(1, BLOCKS + 1):
      pre = f"blocks.group_{g}.block_{b}"
      if n_in != n_out:
        conv(sd, f"{pre}.id_path", n_in, n_out, 1)
      hid = n_out // 4
      for i, (ci, co, kw) in enumerate([(n_in, hid, 3), (hid, hid, 3), (hid, hid, 3), (hid, n_out, 1)], 1):
        conv(sd, f"{pre}.res_path.conv_{i}", ci, co, kw)
      n_in = n_out
  conv(sd, "blocks.output.conv", n_in, VOCAB, 1)
  return sd


def _conv_nchw(x, w, b):
  """torch's F.conv2d(x, w, b, padding=(kw - 1) // 2), x [N, C, H, W]."""
  kw = w.shape[-1]
  p = (kw - 1) // 2
  xp = np.pad(x, ((0, 0), (0, 0), (p, p), (p, p)))
  h, wd = x.shape[2], x.shape[3]
  out = np.zeros((x.shape[0], w.shape[0], h, wd), np.float64)
  for i in range(kw):
    for j in range(kw):
      out += np.einsum("nchw,oc->nohw", xp[:, :, i:i + h, j:j + wd], w[:, :, i, j])
  return out + b[None, :, None, None]


def _reference_logits(sd, pixels01):
  """dall_e Encoder.forward(map_pixels(x)) in NumPy: logits [N, vocab, h, w]."""
  relu = lambda v: np.maximum(v, 0)  # noqa: E731
  x = (1 - 2 * 0.1) * np.transpose(pixels01, (0, 3, 1, 2)).astype(np.float64) + 0.1
  h = _conv_nchw(x, sd["blocks.input.w"], sd["blocks.input.b"])
  n_layers = GROUPS * BLOCKS
  for g in range(1, GROUPS + 1):
    for b in range(1, BLOCKS + 1):
      pre = f"blocks.group_{g}.block_{b}"
      ident = _conv_nchw(h, sd[f"{pre}.id_path.w"], sd[f"{pre}.id_path.b"]) if f"{pre}.id_path.w" in sd else h
      r = h
      for i in range(1, 5):
        r = _conv_nchw(relu(r), sd[f"{pre}.res_path.conv_{i}.w"], sd[f"{pre}.res_path.conv_{i}.b"])
      h = ident + r / n_layers ** 2
    if g < GROUPS:                                   # MaxPool2d(2)
      n, c, hh, ww = h.shape
      h = h.reshape(n, c, hh // 2, 2, ww // 2, 2).max(axis=(3, 5))
  return _conv_nchw(relu(h), sd["blocks.output.conv.w"], sd["blocks.output.conv.b"])


@pytest.fixture(scope="module")
def converted(tmp_path_factory):
  import safetensors.numpy
  root = tmp_path_factory.mktemp("dalle")
  sd = _state_dict()
  src = str(root / "dalle_encoder.safetensors")
  safetensors.numpy.save_file(sd, src)
  out = str(root / "run")
  code = convert_cli.main(["--from=torch", "--arch=dalle", src, out, "--image_size=32"])
  assert code == 0
  return sd, out


def test_converted_encoder_gives_the_reference_logits_and_ids(converted):
  sd, out = converted
  run = teachers.load(out)
  tok = run.method
  assert (tok.arch, tok.codebook_size, tok.patch, tok.token_grid) == ("dalle", VOCAB, 8, 4)
  pixels01 = np.random.default_rng(1).uniform(0, 1, (2, 32, 32, 3)).astype(np.float32)
  # The workdir's mean / std are DALL-E's map_pixels: (x - mean) / std == 0.8 x + 0.1.
  mean = np.asarray(run.config.input.mean, np.float32)
  std = np.asarray(run.config.input.std, np.float32)
  normalised = (pixels01 - mean) / std
  np.testing.assert_allclose(normalised, 0.8 * pixels01 + 0.1, rtol=1e-6, atol=1e-6)

  ref = _reference_logits(sd, pixels01)                                  # [N, V, 4, 4]
  ref_tokens = np.transpose(ref, (0, 2, 3, 1)).reshape(2, 16, VOCAB)      # row-major grid
  got = np.asarray(tok.codes(run.params, jnp.asarray(normalised)))
  np.testing.assert_allclose(got, ref_tokens, rtol=2e-4, atol=2e-4)
  ids = np.asarray(tok.token_ids(run.params, run.method_state, jnp.asarray(normalised)))
  np.testing.assert_array_equal(ids, ref_tokens.argmax(-1))

  info = json.load(open(os.path.join(out, "convert.json")))
  assert info["dalle_spec"] == dict(hidden=HID, blocks_per_group=BLOCKS, groups=GROUPS, vocab_size=VOCAB)
  # encoder.pkl has no decoder: it and the codebook the decoder reads stay initialised, listed.
  assert info["initialised_not_converted"]
  assert all(k.startswith(("decoder/", "quantizer/")) for k in info["initialised_not_converted"])


def test_beit_reads_the_converted_tokenizer(converted):
  """BEiT's default preset (8x8 patch grid at 32 px) takes the 32 px DALL-E tokenizer (4x4
  tokens) only if the grids agree: a 64 px conversion has 8x8 and gives BEiT its ids."""
  from mim_jax import config_lib, methods
  sd, out = converted
  import safetensors.numpy
  src = os.path.join(os.path.dirname(out), "dalle_encoder.safetensors")
  out64 = os.path.join(os.path.dirname(out), "run64")
  assert convert_cli.main(["--from=torch", "--arch=dalle", src, out64, "--image_size=64"]) == 0
  c = config_lib.load("beit", "")
  c.beit.tokenizer = out
  with pytest.raises(Exception, match="tokens per side"):
    methods.get(c)
  c.beit.tokenizer = out64
  beit = methods.get(c)
  state = beit.external_state()
  images01 = np.random.default_rng(2).uniform(0, 1, (2, 32, 32, 3)).astype(np.float32)
  mean, std = np.asarray(c.input.mean, np.float32), np.asarray(c.input.std, np.float32)
  ids = np.asarray(beit.token_ids(state, jnp.asarray((images01 - mean) / std)))
  # BEiT resizes its crop to the tokenizer's 64 px (bicubic) and gives it map_pixels.
  import jax
  up = np.asarray(jax.image.resize(jnp.asarray(images01), (2, 64, 64, 3), "bicubic"))
  ref = _reference_logits(safetensors.numpy.load_file(src), up)
  np.testing.assert_array_equal(ids, np.transpose(ref, (0, 2, 3, 1)).reshape(2, 64, VOCAB).argmax(-1))


def test_a_pickled_module_or_a_foreign_state_dict_is_a_one_line_error(tmp_path, capsys):
  import safetensors.numpy
  src = str(tmp_path / "vit.safetensors")
  safetensors.numpy.save_file({"blocks.input.w": np.zeros((8, 3, 7, 7), np.float32),
                               "blocks.output.conv.w": np.zeros((16, 64, 1, 1), np.float32),
                               "cls_token": np.zeros((1, 1, 8), np.float32)}, src)
  assert convert_cli.main(["--from=torch", "--arch=dalle", src, str(tmp_path / "o")]) == 1
  err = capsys.readouterr().err
  assert err.count("\n") == 1 and "cls_token" in err and "Encoder" in err


def test_vit_flags_that_do_not_apply_to_dalle_are_refused_in_one_line(tmp_path, capsys):
  src = str(tmp_path / "never_read.safetensors")                # refused before any reading
  out = str(tmp_path / "o")
  code = convert_cli.main(["--from=torch", "--arch=dalle", src, out, "--patch_size=16",
                           "--norm=imagenet"])
  err = capsys.readouterr().err
  assert code == 1 and err.count("\n") == 1
  assert "--patch_size, --norm" in err and "drop them" in err
  assert not os.path.exists(out)


def test_the_dalle_arch_trains_from_scratch_as_a_dvae(tmp_path):
  """arch 'dalle' is a tokenizer of its own (DALL-E's encoder, the conv decoder): a few steps
  of the Gumbel dVAE on the embedded data lower its loss."""
  import jax

  from helpers import losses, tiny_config
  from mim_jax import train
  c = tiny_config("tokenizer", total_steps=6, ckpt_every=6)
  c.tokenizer.update(arch="dalle", quantizer="gumbel", codebook_size=32, code_dim=8,
                     conv=dict(hidden=16, res_hidden=8, res_layers=1),
                     dalle=dict(hidden=8, blocks_per_group=1))
  c.tokenizer.gumbel.update(tau_steps=4, kl_steps=2)
  c.optim.base_lr = 2e-3
  c.evals = {}
  train.train_and_evaluate(c, str(tmp_path), progress=False, devices=jax.devices()[:1])
  ls = losses(str(tmp_path))
  assert sorted(ls) == [1, 2, 3, 4, 5, 6] and ls[6] < 0.8 * ls[1], ls
