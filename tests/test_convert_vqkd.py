"""BEiT v2's VQ-KD tokenizer weights into mim_jax (`--arch=vqkd`, mim_jax/convert/vqkd.py).

The checks: a random state dict under the official names (microsoft/unilm beit2
modeling_vqkd.VQKD, with a teacher) round-trips exactly and the layouts are the torch ones; the
token ids mim_jax computes from the converted workdir (the tokenizer itself, and BEiT v2 reading
it through --config.beit.tokenizer) equal a float64 NumPy port of the official encode path
(pre_process to [-1, 1], encoder with fc_norm on the patch tokens, task layer, l2-normalise,
nearest code); bad input is a one-line error.
"""
import collections
import json
import math
import os

import numpy as np
import pytest

from helpers import tiny_config
from mim_jax import convert, methods, teachers
from mim_jax.convert import vqkd
from mim_jax.convert.__main__ import main
from test_convert import save_state_dict      # the torch.save zip writer (no torch needed)

D, DEPTH, HEADS, P, GRID = 64, 2, 2, 4, 8     # the 'mu' ViT: 32 px images in 4 px patches
K, C, DEC_DEPTH, OUT = 16, 8, 1, 24           # codes, code dim, decoder blocks, teacher width


# ---------------------------------------------------------------------------------------------
# A random official-named VQ-KD state dict, written by hand (independent of the name map).

def _vit_sd(r, prefix, chans, patch, grid, depth, norm="fc_norm"):
  sd = {prefix + "patch_embed.proj.weight": r(D, chans, patch, patch),
        prefix + "patch_embed.proj.bias": r(D), prefix + "cls_token": r(1, 1, D),
        prefix + "pos_embed": r(1, grid * grid + 1, D)}
  for i in range(depth):
    b = f"{prefix}blocks.{i}."
    sd.update({b + "norm1.weight": 1 + r(D), b + "norm1.bias": r(D),
               b + "attn.qkv.weight": r(3 * D, D), b + "attn.q_bias": r(D),
               b + "attn.v_bias": r(D), b + "attn.proj.weight": r(D, D),
               b + "attn.proj.bias": r(D), b + "norm2.weight": 1 + r(D), b + "norm2.bias": r(D),
               b + "mlp.fc1.weight": r(4 * D, D), b + "mlp.fc1.bias": r(4 * D),
               b + "mlp.fc2.weight": r(D, 4 * D), b + "mlp.fc2.bias": r(D)})
  sd[f"{prefix}{norm}.weight"], sd[f"{prefix}{norm}.bias"] = 1 + r(D), r(D)
  return sd


def random_vqkd_sd(seed=0, norm="fc_norm", teacher=True):
  rng = np.random.default_rng(seed)
  r = lambda *s: rng.normal(0, 0.3, s).astype(np.float32)  # noqa: E731
  sd = _vit_sd(r, "encoder.", 3, P, GRID, DEPTH, norm)
  sd.update({"encode_task_layer.0.weight": r(D, D), "encode_task_layer.0.bias": r(D),
             "encode_task_layer.2.weight": r(C, D), "encode_task_layer.2.bias": r(C)})
  codes = rng.normal(size=(K, C))
  sd["quantize.embedding.weight"] = (codes / np.linalg.norm(codes, axis=1, keepdims=True)
                                     ).astype(np.float32)
  sd["quantize.embedding.initted"] = np.ones(1, np.float32)
  sd["quantize.embedding.cluster_size"] = np.abs(r(K))
  sd["quantize.embedding.embed_avg"] = r(K, C)
  sd["quantize.cluster_size"] = np.abs(r(K))
  sd.update(_vit_sd(r, "decoder.", C, 1, GRID, DEC_DEPTH, norm))
  sd.update({"decode_task_layer.0.weight": r(D, D), "decode_task_layer.0.bias": r(D),
             "decode_task_layer.2.weight": r(OUT, D), "decode_task_layer.2.bias": r(OUT)})
  if teacher:
    sd.update({"teacher_model.visual.proj": r(D, OUT), "teacher_model.logit_scale": r(),
               "scaling_layer.shift": r(1, 3, 1, 1), "scaling_layer.scale": r(1, 3, 1, 1)})
  return sd


LEFT_OUT = sorted(["quantize.cluster_size", "quantize.embedding.cluster_size",
                   "quantize.embedding.embed_avg", "scaling_layer.scale", "scaling_layer.shift",
                   "teacher_model.logit_scale", "teacher_model.visual.proj"])


# ---------------------------------------------------------------------------------------------
# The official encode path in float64 NumPy (modeling_vqkd.VQKD.get_tokens).

def np_official_encode(sd, pixels01_nhwc):
  """(ids [B, L], z [B, L, C], margin): pre_process (x in [0, 1] -> x * 255 / 127.5 - 1), the
  beit2 VisionTransformer with return_patch_tokens (fc_norm, or norm, on the patch tokens),
  encode_task_layer, l2-normalise, argmin of |z|^2 + |e|^2 - 2 z.e; `margin` is the smallest
  gap between the best and second-best distance over all tokens."""
  g = {k: np.asarray(v, np.float64) for k, v in sd.items()}
  erf = np.vectorize(math.erf)

  def ln(x, name):
    m = x.mean(-1, keepdims=True)
    v = ((x - m) ** 2).mean(-1, keepdims=True)
    return (x - m) / np.sqrt(v + 1e-6) * g[name + ".weight"] + g[name + ".bias"]

  x = np.asarray(pixels01_nhwc, np.float64).transpose(0, 3, 1, 2)
  assert x.max() <= 1.0
  x = x * 255.0 / 127.5 - 1.0
  b, c, hh, ww = x.shape
  w = g["encoder.patch_embed.proj.weight"]
  d, _, p, _ = w.shape
  patches = x.reshape(b, c, hh // p, p, ww // p, p).transpose(0, 2, 4, 1, 3, 5)
  patches = patches.reshape(b, -1, c * p * p)
  x = patches @ w.reshape(d, -1).T + g["encoder.patch_embed.proj.bias"]
  x = np.concatenate([np.broadcast_to(g["encoder.cls_token"], (b, 1, d)), x], axis=1)
  x = x + g["encoder.pos_embed"]
  n, hd = x.shape[1], d // HEADS
  for i in range(DEPTH):
    t = f"encoder.blocks.{i}."
    y = ln(x, t + "norm1")
    bias = np.concatenate([g[t + "attn.q_bias"], np.zeros(d), g[t + "attn.v_bias"]])
    qkv = (y @ g[t + "attn.qkv.weight"].T + bias).reshape(b, n, 3, HEADS, hd)
    q, k, v = qkv.transpose(2, 0, 3, 1, 4)
    a = (q * hd ** -0.5) @ k.swapaxes(-1, -2)
    a = np.exp(a - a.max(-1, keepdims=True))
    a = a / a.sum(-1, keepdims=True)
    y = (a @ v).transpose(0, 2, 1, 3).reshape(b, n, d) @ g[t + "attn.proj.weight"].T
    x = x + y + g[t + "attn.proj.bias"]
    y = ln(x, t + "norm2") @ g[t + "mlp.fc1.weight"].T + g[t + "mlp.fc1.bias"]
    y = 0.5 * y * (1 + erf(y / math.sqrt(2)))
    x = x + y @ g[t + "mlp.fc2.weight"].T + g[t + "mlp.fc2.bias"]
  norm = "encoder.fc_norm" if "encoder.fc_norm.weight" in g else "encoder.norm"
  h = ln(x[:, 1:], norm)
  h = np.tanh(h @ g["encode_task_layer.0.weight"].T + g["encode_task_layer.0.bias"])
  z = h @ g["encode_task_layer.2.weight"].T + g["encode_task_layer.2.bias"]
  z = z / np.maximum(np.linalg.norm(z, axis=-1, keepdims=True), 1e-12)
  e = g["quantize.embedding.weight"]
  flat = z.reshape(-1, z.shape[-1])
  dist = (flat ** 2).sum(1, keepdims=True) + (e ** 2).sum(1) - 2 * flat @ e.T
  ids = dist.argmin(1)
  top2 = np.sort(dist, axis=1)[:, :2]
  return ids.reshape(b, -1), z, float((top2[:, 1] - top2[:, 0]).min())


def _pixels(seed, n=2):
  return np.random.default_rng(seed).uniform(0, 1, (n, GRID * P, GRID * P, 3)).astype(np.float32)


# ---------------------------------------------------------------------------------------------
# The name map.

@pytest.mark.parametrize("norm", ["fc_norm", "norm"])
def test_official_state_dict_round_trips_exactly(norm):
  sd = random_vqkd_sd(1, norm=norm)
  conv = vqkd.torch_to_mim(sd)
  s = conv.spec
  assert (s.codebook_size, s.code_dim, s.out_dim) == (K, C, OUT)
  assert (s.encoder.width, s.encoder.depth, s.encoder.patch, s.encoder.grid) == (D, DEPTH, P, GRID)
  assert (s.decoder.depth, s.decoder.patch, s.decoder.grid) == (DEC_DEPTH, 1, GRID)
  assert s.encoder.qkv_bias == "qv" and not s.encoder.layer_scale
  assert (s.encoder_norm, s.decoder_norm) == (norm, norm)
  assert conv.ignored == LEFT_OUT
  assert sorted(conv.params) == ["decoder", "encoder", "to_code"]
  assert sorted(conv.method_state["quantizer"]) == ["codebook", "initted"]
  back = vqkd.mim_to_torch(conv.params, conv.method_state, s)
  assert sorted(back) == sorted(k for k in sd if k not in LEFT_OUT)
  for k, v in back.items():
    assert v.dtype == np.float32
    np.testing.assert_array_equal(v, sd[k], err_msg=k)


def test_layouts_are_the_torch_ones():
  """One hand-checked entry per kind of layout change."""
  sd = random_vqkd_sd(2)
  conv = vqkd.torch_to_mim(sd)
  enc, dec = conv.params["encoder"], conv.params["decoder"]
  # The decoder's 1x1 patch conv [D, C, 1, 1] is a Dense kernel [C, D] over the code channels.
  np.testing.assert_array_equal(dec["backbone"]["patch_embed"]["proj"]["kernel"][5, 7],
                                sd["decoder.patch_embed.proj.weight"][7, 5, 0, 0])
  # Row (py * p + px) * 3 + c of the encoder's patch kernel is the conv weight at [:, c, py, px].
  np.testing.assert_array_equal(enc["patch_embed"]["proj"]["kernel"][(2 * P + 3) * 3 + 1],
                                sd["encoder.patch_embed.proj.weight"][:, 1, 2, 3])
  np.testing.assert_array_equal(conv.params["to_code"]["fc2"]["kernel"][:, 3],
                                sd["encode_task_layer.2.weight"][3])
  np.testing.assert_array_equal(dec["task"]["fc1"]["bias"], sd["decode_task_layer.0.bias"])
  np.testing.assert_array_equal(enc["encoder"]["norm"]["scale"], sd["encoder.fc_norm.weight"])
  np.testing.assert_array_equal(conv.method_state["quantizer"]["codebook"],
                                sd["quantize.embedding.weight"])
  assert conv.method_state["quantizer"]["initted"].dtype == np.bool_
  assert bool(conv.method_state["quantizer"]["initted"])


# ---------------------------------------------------------------------------------------------
# The workdir, through the command line.

@pytest.fixture(scope="module")
def converted(tmp_path_factory):
  """The official checkpoint layout ({'model': state dict}, teacher included) saved as .pth and
  converted by the CLI; returns (state dict, workdir, printed output)."""
  tmp = tmp_path_factory.mktemp("vqkd")
  sd = random_vqkd_sd(3)
  with pytest.MonkeyPatch.context() as mp:
    save_state_dict(tmp / "vqkd.pth", sd, mp, wrap=lambda t: {"model": t, "epoch": 99})
  import contextlib
  import io
  out = io.StringIO()
  with contextlib.redirect_stdout(out):
    rc = main(["--from=torch", "--arch=vqkd", str(tmp / "vqkd.pth"), str(tmp / "run")])
  assert rc == 0
  return sd, str(tmp / "run"), out.getvalue()


def test_cli_writes_a_tokenizer_workdir_with_sizes_from_the_weights(converted):
  sd, workdir, printed = converted
  assert f"wrote {workdir}: method tokenizer, ViT width {D} depth {DEPTH} patch {P} at 32px" \
      in printed
  assert "left out of the checkpoint: quantize.cluster_size" in printed
  assert f"--config.beit.tokenizer={workdir}" in printed
  with open(os.path.join(workdir, "convert.json")) as f:
    info = json.load(f)
  assert info["ignored_keys"] == LEFT_OUT and info["initialised_not_converted"] == []
  assert (info["codebook_size"], info["code_dim"], info["decoder_out_dim"]) == (K, C, OUT)
  run = teachers.load(workdir)
  c = run.config
  assert c.method == "tokenizer" and run.step == 0
  assert (c.model.variant, c.model.patch_size, c.model.qkv_bias, c.model.pos_embed) == \
      ("mu", P, "qv", "learned")
  assert c.model.init_values == 0.0 and c.input.image_size == GRID * P
  t = c.tokenizer
  assert (t.codebook_size, t.code_dim, t.quantizer, t.teacher) == (K, C, "norm_ema", "")
  assert dict(c.tokenizer.decoder) == {"variant": "mu", "depth": DEC_DEPTH}
  assert tuple(c.input.mean) == tuple(c.input.std) == (0.5, 0.5, 0.5)    # pixels in [-1, 1]
  assert sorted(run.method_state) == ["quantizer"]                        # no teacher
  back = vqkd.mim_to_torch(run.params, run.method_state, vqkd.torch_to_mim(sd).spec)
  for k, v in back.items():
    np.testing.assert_array_equal(v, sd[k], err_msg=k)


def test_token_ids_equal_the_official_encode_path(converted):
  sd, workdir, _ = converted
  run = teachers.load(workdir)
  tok = run.method
  assert (tok.codebook_size, tok.image_size, tok.token_grid) == (K, GRID * P, GRID)
  pixels = _pixels(4)
  want, z_want, margin = np_official_encode(sd, pixels)
  assert margin > 1e-4                   # no near-tie that float32 could flip
  assert len(np.unique(want)) >= 8       # the input exercises many codes
  mean, std = np.asarray(run.config.input.mean), np.asarray(run.config.input.std)
  images = ((pixels - mean) / std).astype(np.float32)
  z = tok.quantizer.prepare(tok.codes(run.params, images))
  np.testing.assert_allclose(np.asarray(z), z_want, atol=1e-5, rtol=0)
  # What a consumer holds: only Tokenizer.frozen_state of the method state.
  ids = tok.token_ids(run.params, tok.frozen_state(run.method_state), images)
  assert ids.dtype == np.int32 and ids.shape == (2, GRID * GRID)
  np.testing.assert_array_equal(np.asarray(ids), want)


def test_beitv2_reads_the_converted_tokenizer(converted):
  """configs/beitv2.py with --config.beit.tokenizer=WORKDIR: its ImageNet-normalised images are
  re-normalised to the tokenizer's [-1, 1] and tokenised as the official code does."""
  sd, workdir, _ = converted
  c = tiny_config("beitv2")
  c.beit.tokenizer = workdir
  c.beit.early_layers = 1
  m = methods.get(c)
  assert m.codebook_size == K
  state = m.external_state()
  assert sorted(state["tokenizer"]["state"]) == ["quantizer"]
  pixels = _pixels(5)
  want, _, margin = np_official_encode(sd, pixels)
  assert margin > 1e-4
  images = ((pixels - np.asarray(c.input.mean)) / np.asarray(c.input.std)).astype(np.float32)
  np.testing.assert_array_equal(np.asarray(m.token_ids(state, images)), want)


# ---------------------------------------------------------------------------------------------
# Errors.

def _one_line_error(fn, *args, **kw):
  with pytest.raises(convert.ConversionError) as e:
    fn(*args, **kw)
  msg = str(e.value)
  assert "\n" not in msg, msg
  return msg


def test_bad_keys_and_shapes_are_one_line_errors_naming_them():
  sd = random_vqkd_sd(6, teacher=False)
  missing = dict(sd)
  del missing["decoder.blocks.0.mlp.fc2.bias"]
  assert "missing decoder.blocks.0.mlp.fc2.bias" in _one_line_error(vqkd.torch_to_mim, missing)
  bad = dict(sd, **{"encode_task_layer.2.weight": np.zeros((C + 1, D), np.float32)})
  msg = _one_line_error(vqkd.torch_to_mim, bad)
  assert f"encode_task_layer.2.weight [{C + 1}, {D}] (expected [{C}, {D}])" in msg
  bad = dict(sd, **{"decoder.patch_embed.proj.weight": np.zeros((D, C + 2, 1, 1), np.float32)})
  msg = _one_line_error(vqkd.torch_to_mim, bad)
  assert f"decoder.patch_embed.proj.weight [{D}, {C + 2}, 1, 1] (expected [{D}, {C}, 1, 1])" in msg
  extra = dict(sd, **{"encoder.head.weight": np.zeros((10, D), np.float32)})
  assert "unused encoder.head.weight" in _one_line_error(vqkd.torch_to_mim, extra)
  msg = _one_line_error(vqkd.torch_to_mim, {k: v for k, v in sd.items() if "quantize" not in k})
  assert "lacks quantize.embedding.weight" in msg and "VQ-KD" in msg
  assert "--variant=mu" in _one_line_error(vqkd.torch_to_mim, sd, variant="base")
  assert "--image_size=32" in _one_line_error(vqkd.torch_to_mim, sd, image_size=64)


def test_what_cannot_be_converted_faithfully_is_refused_in_one_line():
  sd = random_vqkd_sd(7, teacher=False)
  two = dict(sd, **{"decoder.patch_embed.proj.weight": np.zeros((D, C, 2, 2), np.float32)})
  assert "patch size 1" in _one_line_error(vqkd.torch_to_mim, two)
  rel = dict(sd, **{"encoder.blocks.0.attn.relative_position_bias_table": np.zeros((3, HEADS))})
  assert "relative position bias per block" in _one_line_error(vqkd.torch_to_mim, rel)
  nobias = {k: v for k, v in sd.items() if not k.startswith("decoder.blocks.0.attn.") or
            not k.endswith("_bias")}
  msg = _one_line_error(vqkd.torch_to_mim, nobias)
  assert "qkv_bias is 'qv' and the decoder's 'none'" in msg and "one config.model" in msg
  fresh = dict(sd, **{"quantize.embedding.initted": np.zeros(1, np.float32)})
  assert "never initialised" in _one_line_error(vqkd.torch_to_mim, fresh)
  assert "vqkd.torch_to_mim" in _one_line_error(convert.torch_to_mim, sd, "vqkd")


def test_cli_error_is_one_line_and_an_existing_workdir_is_refused(converted, tmp_path, capsys):
  _, workdir, _ = converted
  src = os.path.join(os.path.dirname(workdir), "vqkd.pth")
  assert main(["--from=torch", "--arch=vqkd", src, workdir]) == 1
  err = capsys.readouterr().err.strip()
  assert err.count("\n") == 0 and "already holds checkpoints" in err
  assert main(["--from=torch", "--arch=vqkd", src, str(tmp_path / "o"), "--norm=dall-e"]) == 1
  err = capsys.readouterr().err.strip()
  assert err.count("\n") == 0 and "--norm='dall-e'" in err and "imagenet" in err


# ---------------------------------------------------------------------------------------------
# Real torch, when it is installed.

def test_file_written_by_torch_gives_the_ids_of_torch_ops_when_installed(tmp_path):
  """With torch: torch.save's own file converts, and the ids equal the official encode path
  computed with torch's functions (F.linear, F.layer_norm, F.gelu, F.normalize, argmin)."""
  try:
    import torch
    import torch.nn.functional as F
  except ImportError as e:
    pytest.skip(f"torch not installed: the NumPy port above checks the encode path ({e})")
  sd = random_vqkd_sd(8)
  torch.save({"model": collections.OrderedDict((k, torch.from_numpy(v)) for k, v in sd.items())},
             tmp_path / "vqkd.pth")
  assert main(["--from=torch", "--arch=vqkd", str(tmp_path / "vqkd.pth"),
               str(tmp_path / "run")]) == 0
  t = {k: torch.from_numpy(v).double() for k, v in sd.items()}
  pixels = _pixels(9)
  with torch.no_grad():
    x = torch.from_numpy(pixels).double().permute(0, 3, 1, 2) * 255.0 / 127.5 - 1.0
    x = F.conv2d(x, t["encoder.patch_embed.proj.weight"], t["encoder.patch_embed.proj.bias"], P)
    x = x.flatten(2).transpose(1, 2)
    x = torch.cat([t["encoder.cls_token"].expand(x.shape[0], -1, -1), x], 1)
    x = x + t["encoder.pos_embed"]
    b, n, d = x.shape
    for i in range(DEPTH):
      p = f"encoder.blocks.{i}."
      def ln(y, k):
        return F.layer_norm(y, (d,), t[p + k + ".weight"], t[p + k + ".bias"], 1e-6)
      zero = torch.zeros(d, dtype=torch.float64)
      bias = torch.cat([t[p + "attn.q_bias"], zero, t[p + "attn.v_bias"]])
      qkv = F.linear(ln(x, "norm1"), t[p + "attn.qkv.weight"], bias)
      q, k, v = qkv.reshape(b, n, 3, HEADS, -1).permute(2, 0, 3, 1, 4)
      a = ((q * (d // HEADS) ** -0.5) @ k.transpose(-2, -1)).softmax(-1)
      y = (a @ v).transpose(1, 2).reshape(b, n, d)
      x = x + F.linear(y, t[p + "attn.proj.weight"], t[p + "attn.proj.bias"])
      y = F.gelu(F.linear(ln(x, "norm2"), t[p + "mlp.fc1.weight"], t[p + "mlp.fc1.bias"]))
      x = x + F.linear(y, t[p + "mlp.fc2.weight"], t[p + "mlp.fc2.bias"])
    h = F.layer_norm(x[:, 1:], (d,), t["encoder.fc_norm.weight"], t["encoder.fc_norm.bias"], 1e-6)
    h = torch.tanh(F.linear(h, t["encode_task_layer.0.weight"], t["encode_task_layer.0.bias"]))
    z = F.normalize(F.linear(h, t["encode_task_layer.2.weight"], t["encode_task_layer.2.bias"]),
                    p=2, dim=-1).reshape(-1, C)
    e = t["quantize.embedding.weight"]
    dist = z.pow(2).sum(1, keepdim=True) + e.pow(2).sum(1) - 2 * torch.einsum("bd,nd->bn", z, e)
    want = torch.argmin(dist, 1).reshape(b, -1).numpy()
  run = teachers.load(str(tmp_path / "run"))
  images = (pixels - 0.5) / 0.5
  got = run.method.token_ids(run.params, run.method.frozen_state(run.method_state), images)
  np.testing.assert_array_equal(np.asarray(got), want)
