"""The Swin backbones (mim_jax/models/swin.py) against microsoft/Swin-Transformer's code.

Checks: window partition and its inverse; the shifted-window mask and the relative position
index against literal numpy transcriptions of the official code; v2's log-spaced coordinates
by hand; every block (v1 pre-norm, v2 res-post-norm with cosine attention, the logit-scale
clamp and the continuous position bias) and the whole network against a float64 numpy port
that attends over the full map with per-pair allow / block rules rebuilt from the region ids;
patch merging's concatenation order; parameter counts against the official models'
(Swin-T/S/B with their 1000-class head subtracted) and a count by hand from the official
modules (Swin V2); the bias-table resizing (bicubic against torch's algorithm, geometric on
SimMIM's grid); layer ids and weight decay against transcriptions of the official optimizer
rules; the registry contract and one-line config errors.
"""
import math
import re

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from scipy.special import erf

from mim_jax import config_lib, methods, models, optim
from mim_jax.models import swin

KEY = jax.random.PRNGKey(0)


def count(tree):
  return sum(int(np.prod(x.shape)) for x in jax.tree.leaves(tree))


# --------------------------------------------------------------------------- numpy reference

def np_ln(x, p, eps=1e-5):
  mean = x.mean(-1, keepdims=True)
  var = ((x - mean) ** 2).mean(-1, keepdims=True)
  return (x - mean) / np.sqrt(var + eps) * p["scale"] + p["bias"]


def np_dense(x, p):
  return x @ p["kernel"] + (p["bias"] if "bias" in p else 0.0)


def np_mlp(x, p):
  h = np_dense(x, p["fc1"])
  return np_dense(0.5 * h * (1 + erf(h / math.sqrt(2))), p["fc2"])


def official_regions(h, w, ws, shift):
  """The official img_mask, with the official slices."""
  img = np.zeros((h, w))
  cnt = 0
  for hs in (slice(0, -ws), slice(-ws, -shift), slice(-shift, None)):
    for wsl in (slice(0, -ws), slice(-ws, -shift), slice(-shift, None)):
      img[hs, wsl] = cnt
      cnt += 1
  return img


def official_index(ws):
  """relative_position_index, the official operations in numpy."""
  coords = np.stack(np.meshgrid(np.arange(ws), np.arange(ws), indexing="ij"))
  flat = coords.reshape(2, -1)
  rel = flat[:, :, None] - flat[:, None, :]
  rel = rel.transpose(1, 2, 0).copy()
  rel[:, :, 0] += ws - 1
  rel[:, :, 1] += ws - 1
  rel[:, :, 0] *= 2 * ws - 1
  return rel.sum(-1)


def np_coords_table(ws, pretrained=0):
  r = np.arange(-(ws - 1), ws, dtype=np.float64)
  t = np.stack(np.meshgrid(r, r, indexing="ij"), -1) / ((pretrained or ws) - 1) * 8
  return (np.sign(t) * np.log2(np.abs(t) + 1) / np.log2(8)).reshape(-1, 2)


def np_window_bias(p, version, ws, heads, pretrained=0):
  """[(2ws-1)^2, heads]: v1's table, v2's 16 * sigmoid(cpb_mlp(coords))."""
  if version == 1:
    return p["relative_position_bias_table"]
  hidden = np.maximum(np_dense(np_coords_table(ws, pretrained), p["cpb_mlp"]["fc1"]), 0)
  return 16 / (1 + np.exp(-(hidden @ p["cpb_mlp"]["fc2"]["kernel"])))


def np_attention(y, p, version, ws, shift, heads, pretrained=0):
  """Window attention over the full map y [B, H, W, C] by brute force: token pairs of one
  shifted window attend (-100 across regions), all other pairs are blocked; positions, windows
  and regions come from the cyclic shift, not from a partition."""
  b, h, w, c = y.shape
  hd = c // heads
  x = y.reshape(b, h * w, c)
  if version == 1:
    qkv = np_dense(x, p["qkv"])
  else:
    qkv = x @ p["qkv"]["kernel"] + np.concatenate([p["q_bias"], 0 * p["v_bias"], p["v_bias"]])
  qkv = qkv.reshape(b, h * w, 3, heads, hd)
  q, k, v = qkv[:, :, 0], qkv[:, :, 1], qkv[:, :, 2]
  hh, ww = np.meshgrid(np.arange(h), np.arange(w), indexing="ij")
  sh, sw = ((hh - shift) % h).ravel(), ((ww - shift) % w).ravel()   # position after torch.roll(-s)
  win = (sh // ws) * (w // ws) + sw // ws
  region = official_regions(h, w, ws, shift)[sh, sw] if shift else np.zeros(h * w)
  lh, lw = sh % ws, sw % ws
  index = (lh[:, None] - lh[None] + ws - 1) * (2 * ws - 1) + (lw[:, None] - lw[None] + ws - 1)
  bias = np_window_bias(p, version, ws, heads, pretrained)[index]       # [L, L, heads]
  bias = bias + np.where(region[:, None] != region[None], -100.0, 0.0)[..., None]
  if version == 1:
    logits = np.einsum("bqhd,bkhd->bhqk", q, k) / math.sqrt(hd)
  else:
    qn = q / np.linalg.norm(q, axis=-1, keepdims=True)
    kn = k / np.linalg.norm(k, axis=-1, keepdims=True)
    scale = np.exp(np.minimum(p["logit_scale"].reshape(heads), math.log(100.0)))
    logits = np.einsum("bqhd,bkhd->bhqk", qn, kn) * scale[None, :, None, None]
  logits = logits + bias.transpose(2, 0, 1)[None]
  logits = np.where((win[:, None] == win[None])[None, None], logits, -np.inf)
  att = np.exp(logits - logits.max(-1, keepdims=True))
  att = att / att.sum(-1, keepdims=True)
  out = np.einsum("bhqk,bkhd->bqhd", att, v).reshape(b, h * w, c)
  return np_dense(out, p["proj"]).reshape(b, h, w, c)


def np_block(x, p, version, ws, shift, heads, pretrained=0, extra_norm=False):
  if version == 1:
    x = x + np_attention(np_ln(x, p["norm1"]), p["attn"], version, ws, shift, heads)
    return x + np_mlp(np_ln(x, p["norm2"]), p["mlp"])
  x = x + np_ln(np_attention(x, p["attn"], version, ws, shift, heads, pretrained), p["norm1"])
  x = x + np_ln(np_mlp(x, p["mlp"]), p["norm2"])
  return np_ln(x, p["norm3"]) if extra_norm else x


def np_merge(x, p, version):
  x = np.concatenate([x[:, 0::2, 0::2], x[:, 1::2, 0::2], x[:, 0::2, 1::2], x[:, 1::2, 1::2]], -1)
  if version == 1:
    return np_ln(x, p["norm"]) @ p["reduction"]["kernel"]
  return np_ln(x @ p["reduction"]["kernel"], p["norm"])


def np_forward(params, images, model):
  """The official SwinTransformer(V2).forward_features up to the final norm (not pooled)."""
  embed, depths, heads, period = model.dims
  p = model.patch_size
  b, hh, ww, c = images.shape
  patches = images.reshape(b, hh // p, p, ww // p, p, c).transpose(0, 1, 3, 2, 4, 5)
  patches = patches.reshape(b, hh // p, ww // p, p * p * c)
  x = patches @ params["patch_embed"]["proj"]["kernel"].reshape(-1, embed)
  x = np_ln(x + params["patch_embed"]["proj"]["bias"], params["patch_embed"]["norm"])
  pws = model.pretrained_window_sizes or (0,) * len(depths)
  for i, depth in enumerate(depths):
    stage = params[f"layers_{i}"]
    for j in range(depth):
      ws, shift = swin.window_and_shift(x.shape[1:3], model.window_size, j % 2 == 1)
      extra = period > 0 and (j + 1) % period == 0
      x = np_block(x, stage[f"blocks_{j}"], model.version, ws, shift, heads[i], pws[i], extra)
    if i < len(depths) - 1:
      x = np_merge(x, stage["downsample"], model.version)
  return np_ln(x, params["norm"])


def random_params(module, *args, seed=0):
  """float64 parameters of `module`'s shapes (traced, not initialised): N(0, 0.3^2), norm
  scales around 1 (v2's post-norms included, so no block is the identity), v2 logit scales
  spread across the clamp at log 100."""
  rng = np.random.default_rng(seed)

  def draw(path, x):
    name = getattr(path[-1], "key", "")
    if name == "logit_scale":
      return np.linspace(math.log(5.0), math.log(400.0), x.size).reshape(x.shape)
    return (name == "scale") + 0.3 * rng.standard_normal(x.shape)

  shapes = jax.eval_shape(module.init, KEY, *args)["params"]
  return jax.tree_util.tree_map_with_path(draw, shapes)


def f32(params):
  return {"params": jax.tree.map(jnp.float32, params)}


def tiny(version=1, **kw):
  cfg = dict(version=version, embed_dim=8, depths=(2, 2), num_heads=(2, 4), window_size=4,
             patch_size=2)
  cfg.update(kw)
  return swin.default_config(**cfg)


# --------------------------------------------------------------------------- windows and masks

def test_window_partition_round_trip_and_order():
  x = np.arange(2 * 8 * 12 * 3).reshape(2, 8, 12, 3)
  w = swin.window_partition(x, 4)
  assert w.shape == (2 * 2 * 3, 4, 4, 3)
  # window k = (b, row, column) row-major; inside it the rows and columns of that tile.
  np.testing.assert_array_equal(w[1 * 6 + 1 * 3 + 2], x[1, 4:8, 8:12])
  np.testing.assert_array_equal(swin.window_reverse(w, 4, 8, 12), x)
  xj = jnp.asarray(x, jnp.float32)
  np.testing.assert_array_equal(swin.window_reverse(swin.window_partition(xj, 4), 4, 8, 12), xj)


@pytest.mark.parametrize("h,w,ws,shift", [(8, 8, 4, 2), (12, 12, 4, 2), (14, 14, 7, 3),
                                          (12, 8, 4, 2)])
def test_attention_mask_blocks_exactly_the_official_pairs(h, w, ws, shift):
  img = official_regions(h, w, ws, shift)
  # The official window_partition of img_mask, mask_windows[:, None] - mask_windows[:, :, None].
  wins = [img[r:r + ws, c:c + ws].ravel() for r in range(0, h, ws) for c in range(0, w, ws)]
  mw = np.stack(wins)
  diff = mw[:, None, :] - mw[:, :, None]
  want = np.where(diff != 0, -100.0, 0.0)
  got = swin.attention_mask(h, w, ws, shift)
  np.testing.assert_array_equal(got, want)
  np.testing.assert_array_equal(swin.shift_regions(h, w, ws, shift), img)
  # Only the windows on the wrapped border block anything; the first window none.
  assert not got[0].any() and got[-1].any()
  assert set(np.unique(got)) <= {0.0, -100.0}


@pytest.mark.parametrize("ws", [1, 2, 6, 7])
def test_relative_position_index_is_the_official_formula(ws):
  idx = swin.relative_position_index(ws)
  np.testing.assert_array_equal(idx, official_index(ws))
  centre = (ws - 1) * (2 * ws - 1) + (ws - 1)
  assert (np.diag(idx) == centre).all() and idx.max() == (2 * ws - 1) ** 2 - 1


def test_v2_coordinates_table_by_hand():
  t = swin.relative_coords_table(2)          # offsets -1, 0, 1 over ws - 1 = 1, times 8
  v = math.log2(9) / 3
  np.testing.assert_allclose(t.reshape(3, 3, 2)[0, 2], [-v, v], rtol=1e-6)
  np.testing.assert_allclose(t.reshape(3, 3, 2)[1, 1], [0, 0])
  # A pretrained window of 12 keeps a window 24's coordinates on the 12-window scale.
  np.testing.assert_allclose(swin.relative_coords_table(24, 12), np_coords_table(24, 12),
                             rtol=1e-6, atol=1e-7)
  # The native window's largest offset maps to log2(9) / 3; 23 offsets on the 12-scale beyond.
  np.testing.assert_allclose(np.abs(swin.relative_coords_table(12)).max(), v, rtol=1e-6)
  np.testing.assert_allclose(np.abs(swin.relative_coords_table(24, 12)).max(),
                             math.log2(23 / 11 * 8 + 1) / 3, rtol=1e-6)


# --------------------------------------------------------------------------- blocks and network

@pytest.mark.parametrize("version,shift,extra", [(1, 0, False), (1, 2, False), (2, 2, True),
                                                 (2, 0, False)])
def test_block_equals_brute_force_full_attention(version, shift, extra):
  block = swin.SwinBlock(num_heads=2, window=4, shift=shift, version=version, extra_norm=extra)
  x = np.random.default_rng(1).standard_normal((2, 8, 8, 8)).astype(np.float32)
  params = random_params(block, x)
  got = jax.jit(block.apply)(f32(params), x)
  want = np_block(x.astype(np.float64), params, version, 4, shift, 2, 0, extra)
  np.testing.assert_allclose(got, want, rtol=1e-4, atol=1e-4)


def test_v2_attention_scale_clamp_and_continuous_bias_by_hand():
  att = swin.WindowAttention(num_heads=2, window=3, version=2, pretrained_window=5)
  x = np.random.default_rng(2).standard_normal((4, 9, 8)).astype(np.float32)
  mask = np.where(np.random.default_rng(3).random((2, 9, 9)) < 0.3, -100.0, 0.0)
  params = random_params(att, x, mask)
  assert params["logit_scale"].shape == (2, 1, 1)
  got = np.asarray(jax.jit(att.apply)(f32(params), x, mask))
  # By hand, window by window: cos(q, k) x min(exp(s), 100) + 16 sigmoid(cpb) + mask.
  qkv = x @ params["qkv"]["kernel"] + np.concatenate([params["q_bias"], np.zeros(8),
                                                      params["v_bias"]])
  bias = np_window_bias(params, 2, 3, 2, pretrained=5)[official_index(3)]
  scale = np.minimum(np.exp(params["logit_scale"].ravel()), 100.0)
  assert scale[0] < 100.0 == scale[1]
  for n in range(4):
    out = np.zeros((9, 8))
    for h in range(2):
      q, k, v = (qkv[n, :, j * 8 + h * 4: j * 8 + h * 4 + 4] for j in range(3))
      cos = (q / np.linalg.norm(q, axis=1, keepdims=True)) @ (k / np.linalg.norm(k, axis=1,
                                                                                 keepdims=True)).T
      logits = cos * scale[h] + bias[..., h] + mask[n % 2]
      a = np.exp(logits - logits.max(1, keepdims=True))
      out[:, h * 4:(h + 1) * 4] = (a / a.sum(1, keepdims=True)) @ v
    np.testing.assert_allclose(got[n], np_dense(out, params["proj"]), rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("version", [1, 2])
def test_network_equals_numpy_port(version):
  cfg = tiny(version, extra_norm_period=1 if version == 2 else -1, depths=(2, 2, 2),
             num_heads=(1, 2, 4), pretrained_window_sizes=(6, 6, 2) if version == 2 else ())
  model = swin.from_config(cfg, 32)
  x = np.random.default_rng(4).standard_normal((2, 32, 32, 3)).astype(np.float32)
  params = random_params(model, x)
  got = jax.jit(model.apply)(f32(params), x)
  assert got.shape == (2, 4, 4, 32) and model.stride == 8
  np.testing.assert_allclose(got, np_forward(params, x.astype(np.float64), model),
                             rtol=2e-4, atol=2e-4)


@pytest.mark.parametrize("version", [1, 2])
def test_patch_merging_concatenates_x0_x1_x2_x3(version):
  x = np.random.default_rng(5).standard_normal((1, 4, 6, 3)).astype(np.float32)
  merge = swin.PatchMerging(version)
  params = random_params(merge, x)
  seen = []

  def record(next_fun, args, kwargs, context):
    if context.method_name == "__call__" and isinstance(context.module, (nn.LayerNorm, nn.Dense)):
      seen.append(np.asarray(args[0]))
    return next_fun(*args, **kwargs)

  with nn.intercept_methods(record):
    got = merge.apply(f32(params), x)
  cat = seen[0]                     # v1: the norm's input; v2: the reduction's
  assert cat.shape == (1, 2, 3, 12)
  for i, (r, c) in enumerate(((0, 0), (1, 0), (0, 1), (1, 1))):
    np.testing.assert_array_equal(cat[..., 3 * i:3 * i + 3], x[:, r::2, c::2])
  np.testing.assert_allclose(got, np_merge(x.astype(np.float64), params, version), rtol=1e-5,
                             atol=1e-5)
  assert params["norm"]["scale"].shape == ((12,) if version == 1 else (6,))
  assert "bias" not in params["reduction"]


def test_v2_block_starts_as_the_identity_and_initialisation():
  block = swin.SwinBlock(num_heads=2, window=4, shift=2, version=2)
  x = np.random.default_rng(6).standard_normal((2, 8, 8, 8)).astype(np.float32)
  v = jax.jit(block.init)(KEY, x)
  np.testing.assert_array_equal(jax.jit(block.apply)(v, x), x)   # _init_respostnorm: norms at 0
  p = v["params"]
  assert not np.any(p["norm1"]["scale"]) and not np.any(p["norm2"]["bias"])
  np.testing.assert_allclose(p["attn"]["logit_scale"], math.log(10.0), rtol=1e-6)
  assert not np.any(p["attn"]["q_bias"]) and not np.any(p["attn"]["v_bias"])
  big = swin.SwinTransformer(version=1, embed_dim=96, depths=(1,), num_heads=(3,),
                             window_size=7, image_size=28)
  p1 = jax.jit(big.init)(KEY, jnp.zeros((1, 28, 28, 3)))["params"]
  w = np.asarray(p1["layers_0"]["blocks_0"]["mlp"]["fc1"]["kernel"])
  assert abs(w.std() - 0.02) < 1e-3 and not np.any(p1["layers_0"]["blocks_0"]["mlp"]["fc1"]["bias"])
  assert abs(np.asarray(p1["layers_0"]["blocks_0"]["attn"]["relative_position_bias_table"]).std()
             - 0.02) < 2e-3
  conv = np.asarray(p1["patch_embed"]["proj"]["kernel"])     # PyTorch's Conv2d default
  assert conv.shape == (4, 4, 3, 96) and np.abs(conv).max() <= 1 / math.sqrt(48)
  assert abs(conv.std() - 1 / math.sqrt(3 * 48)) < 3e-3
  np.testing.assert_array_equal(p1["norm"]["scale"], 1.0)


def test_drop_path_is_linear_over_all_blocks_and_needs_an_rng():
  cfg = tiny(drop_path=0.3, depths=(2, 1), num_heads=(2, 4))
  model = swin.from_config(cfg, 32)
  x = np.random.default_rng(7).standard_normal((4, 32, 32, 3)).astype(np.float32)
  v = jax.jit(model.init)(KEY, x)
  rates = []

  def record(next_fun, args, kwargs, context):
    if isinstance(context.module, swin.SwinBlock) and context.method_name == "__call__":
      rates.append(context.module.drop_path)
    return next_fun(*args, **kwargs)

  with nn.intercept_methods(record):
    jax.eval_shape(model.apply, v, x)
  np.testing.assert_allclose(rates, [0.0, 0.15, 0.3])
  with pytest.raises(Exception, match="dropout"):
    jax.eval_shape(lambda v, x: model.apply(v, x, train=True), v, x)
  apply = jax.jit(model.apply, static_argnames="train")
  a = apply(v, x, train=True, rngs={"dropout": jax.random.PRNGKey(1)})
  assert not np.allclose(a, apply(v, x))


# --------------------------------------------------------------------------- parameter counts

def hand_count(embed, depths, heads, window, image, version, patch=4):
  """Parameters of the official backbone (no head), module by module."""
  n = 3 * patch * patch * embed + embed + 2 * embed
  r = image // patch
  for i, (d, h) in enumerate(zip(depths, heads)):
    c = embed * 2 ** i
    ws = min(r, window)
    attn = 3 * c * c + c * c + c
    attn += (3 * c + (2 * ws - 1) ** 2 * h) if version == 1 else (2 * c + h + 3 * 512 + 512 * h)
    n += d * (attn + 4 * c + 8 * c * c + 5 * c)
    if i < len(depths) - 1:
      n += 8 * c * c + (8 * c if version == 1 else 4 * c)
    r //= 2
  return n + 2 * embed * 2 ** (len(depths) - 1)


# The official models' parameter counts with their 1000-class head.
OFFICIAL = {"tiny": 28_288_354, "small": 49_606_258, "base": 87_768_224}


@pytest.mark.parametrize("variant", sorted(OFFICIAL))
def test_parameter_count_equals_official(variant):
  model = swin.from_config(swin.default_config(variant=variant, window_size=7), 224)
  n = swin.param_count(model)
  head = model.num_features * 1000 + 1000
  assert n == OFFICIAL[variant] - head
  embed, depths, heads, _ = model.dims
  assert n == hand_count(embed, depths, heads, 7, 224, 1)


@pytest.mark.parametrize("variant,window,image", [("tiny", 8, 256), ("base", 12, 192)])
def test_v2_parameter_count_equals_the_official_modules(variant, window, image):
  model = swin.from_config(swin.default_config(variant=variant, version=2, window_size=window),
                           image)
  embed, depths, heads, _ = model.dims
  assert swin.param_count(model) == hand_count(embed, depths, heads, window, image, 2)


def test_v2_huge_and_giant_sizes_are_the_published_ones():
  # MODELHUB's SwinV2-Huge (655M) and the paper's 3 billion-parameter SwinV2-G; shapes only.
  huge = swin.from_config(swin.default_config(variant="huge", version=2, window_size=12), 192)
  giant = swin.from_config(swin.default_config(variant="giant", version=2, window_size=12), 192)
  assert round(swin.param_count(huge) / 1e6) == 655
  assert round(swin.param_count(giant) / 1e9, 1) == 3.0
  assert huge.dims[3] == giant.dims[3] == 6      # the extra main-branch norm every 6 blocks


# --------------------------------------------------------------------------- resizing tables

def torch_bicubic(img, out):
  """torch's upsample_bicubic2d (align_corners=False, size=out) written from its algorithm:
  source x = (in / out) (i + 0.5) - 0.5, Keys' kernel a = -0.75, indices clamped."""
  n = img.shape[-1]
  a = -0.75

  def cubic(t):
    t = abs(t)
    if t <= 1:
      return ((a + 2) * t - (a + 3)) * t * t + 1
    return ((a * t - 5 * a) * t + 8 * a) * t - 4 * a if t < 2 else 0.0

  res = np.zeros((out, out))
  for i in range(out):
    for j in range(out):
      y, x = n / out * (i + 0.5) - 0.5, n / out * (j + 0.5) - 0.5
      y0, x0 = math.floor(y), math.floor(x)
      for dy in range(-1, 3):
        for dx in range(-1, 3):
          yy, xx = min(max(y0 + dy, 0), n - 1), min(max(x0 + dx, 0), n - 1)
          res[i, j] += cubic(y - (y0 + dy)) * cubic(x - (x0 + dx)) * img[yy, xx]
  return res


def test_bias_table_bicubic_is_torch_interpolate():
  table = np.random.default_rng(8).standard_normal((11 * 11, 3))       # window 6, 3 heads
  got = swin.interpolate_bias_table(table, 7, "bicubic")
  assert got.shape == (13 * 13, 3)
  for h in range(3):
    np.testing.assert_allclose(got[:, h].reshape(13, 13),
                               torch_bicubic(table[:, h].reshape(11, 11), 13), atol=1e-5)
  np.testing.assert_array_equal(swin.interpolate_bias_table(table, 6), table.astype(np.float32))


def test_bias_table_geometric_is_simmims_grid():
  # A cubic spline through a linear function is that function: the values at the integer
  # target offsets are the function at SimMIM's geometric source positions' scale.
  x, dx = swin._geometric_positions(11, 13)
  assert x[5] == 0 and x[6] == 1 and x[-1] >= 6 - 1e-4 and len(dx) == 13 and dx[0] == -6
  fy, fx = np.meshgrid(x, x, indexing="ij")
  table = np.stack([2 * fy - 3 * fx + 1, fx + 0.5 * fy], -1).reshape(-1, 2)
  got = swin.interpolate_bias_table(table, 7, "geometric").reshape(13, 13, 2)
  ty, tx = np.meshgrid(dx, dx, indexing="ij")
  np.testing.assert_allclose(got[..., 0], 2 * ty - 3 * tx + 1, atol=1e-4)
  np.testing.assert_allclose(got[..., 1], tx + 0.5 * ty, atol=1e-4)
  with pytest.raises(ValueError, match="'bicubic'.*'geometric'"):
    swin.interpolate_bias_table(table, 7, "nearest")


def test_adapt_pretrained_resizes_tables_and_absolute_embedding():
  small = swin.from_config(tiny(ape=True, depths=(2,), num_heads=(2,)), 32)
  large = swin.from_config(tiny(ape=True, depths=(2,), num_heads=(2,), window_size=8), 32)
  x = jnp.zeros((1, 32, 32, 3))
  loaded = jax.tree.map(np.asarray, jax.jit(small.init)(KEY, x)["params"])
  target = jax.eval_shape(large.init, KEY, x)["params"]
  got = swin.adapt_pretrained(loaded, target, "bicubic")
  assert jax.tree.map(np.shape, got) == jax.tree.map(np.shape, target)
  t = loaded["layers_0"]["blocks_0"]["attn"]["relative_position_bias_table"]
  np.testing.assert_allclose(got["layers_0"]["blocks_0"]["attn"]["relative_position_bias_table"],
                             swin.interpolate_bias_table(t, 8, "bicubic"))
  np.testing.assert_array_equal(got["layers_0"]["blocks_0"]["mlp"]["fc1"]["kernel"],
                                loaded["layers_0"]["blocks_0"]["mlp"]["fc1"]["kernel"])


# --------------------------------------------------------------------------- optimiser rules

def official_name(names):
  """A mim_jax path -> the official parameter name (SwinTransformer, head included)."""
  s = ".".join(names)
  s = re.sub(r"(layers|blocks)_(\d+)", r"\1.\2", s)
  s = re.sub(r"\.(kernel|scale)$", ".weight", s).replace("head.fc.", "head.")
  return s.replace("cpb_mlp.fc1", "cpb_mlp.0").replace("cpb_mlp.fc2", "cpb_mlp.2")


def get_swin_layer(name, num_layers, depths):
  """SimMIM optimizer.py get_swin_layer, transcribed."""
  if name in ("mask_token"):
    return 0
  elif name.startswith("patch_embed"):
    return 0
  elif name.startswith("layers"):
    layer_id = int(name.split('.')[1])
    block_id = name.split('.')[3]
    if block_id == 'reduction' or block_id == 'norm':
      return sum(depths[:layer_id + 1])
    layer_id = sum(depths[:layer_id]) + int(block_id)
    return layer_id + 1
  else:
    return num_layers - 1


def swin_finetune_config(version=1):
  c = config_lib.load("finetune", "swin_cifar10")
  c.model.update(version=version, embed_dim=8, depths=(2, 3), num_heads=(2, 4), ape=True)
  return c


@pytest.mark.parametrize("version", [1, 2])
def test_layer_decay_is_official_get_swin_layer(version):
  c = swin_finetune_config(version)
  m = methods.get(c)
  p = jax.eval_shape(m.init_variables, KEY, jnp.zeros((1, 32, 32, 3)))["params"]
  factors = optim.layer_decay_factors(m.decay_mask(p), 0.8, c.model)
  depths = [2, 3]
  seen = set()
  for path, f in jax.tree_util.tree_flatten_with_path(factors)[0]:
    names = tuple(k.key for k in path)
    name = official_name(names[1:])
    lid = get_swin_layer(name, sum(depths) + 2, depths)
    assert f == pytest.approx(0.8 ** (sum(depths) + 1 - lid), rel=1e-12), name
    seen.add(lid)
  assert seen == set(range(sum(depths) + 2))
  assert optim.layer_ids(m.decay_mask(p), c.model)["head"]["fc"]["kernel"] == sum(depths) + 1



def test_the_trainer_decays_swin_by_the_swin_rule(monkeypatch):
  """train.build_state_and_step hands config.model to the optimiser, whose layer decay then
  follows get_swin_layer rather than MAE's ViT rule."""
  from mim_jax import sharding, train
  c = swin_finetune_config()
  c.input.image_size = 32
  m = methods.get(c)
  seen = []
  scale = optim.scale_by_tree
  monkeypatch.setattr(optim, "scale_by_tree", lambda f: seen.append(f) or scale(f))
  mesh = sharding.make_mesh(c.mesh, jax.devices()[:1])
  schedule = optim.make_schedule(c.optim, c.input.batch_size, 10, 10)
  train.build_state_and_step(c, m, mesh, schedule, False, total_steps=10)
  p = jax.eval_shape(m.init_variables, KEY, jnp.zeros((1, 32, 32, 3)))["params"]
  want = optim.layer_decay_factors(m.decay_mask(p), c.optim.layer_decay, c.model)
  assert len(seen) == 1 and seen[0] == want
  assert seen[0] != optim.layer_decay_factors(m.decay_mask(p), c.optim.layer_decay)

def official_decays(name, shape, prefix, keywords):
  """get_pretrain_param_groups / get_finetune_param_groups' no-decay test, transcribed."""
  skip = {prefix + k for k in ("absolute_pos_embed", "mask_token")}
  kws = {prefix + k for k in keywords}
  return not (len(shape) == 1 or name.endswith(".bias") or name in skip
              or any(k in name for k in kws))


@pytest.mark.parametrize("version", [1, 2])
def test_weight_decay_is_the_official_rule(version):
  kws = ("relative_position_bias_table",) + (("cpb_mlp", "logit_scale") if version == 2 else ())
  ft = methods.get(swin_finetune_config(version))
  p = jax.eval_shape(ft.init_variables, KEY, jnp.zeros((1, 32, 32, 3)))["params"]
  pre_cfg = config_lib.load("simmim", "swin_cifar10")
  pre_cfg.model.update(version=version, embed_dim=8, depths=(2, 3), num_heads=(2, 4), ape=True)
  pre = methods.get(pre_cfg)
  pp = jax.eval_shape(pre.init, KEY, jnp.zeros((1, 32, 32, 3)))
  decayed = 0
  for tree, mask, prefix in ((p, ft.decay_mask(p), ""), (pp, pre.decay_mask(pp), "encoder.")):
    flat = dict(jax.tree_util.tree_flatten_with_path(mask)[0])
    for path, leaf in jax.tree_util.tree_flatten_with_path(tree)[0]:
      names = tuple(k.key for k in path)
      if names[0] == "encoder":
        name = prefix + official_name(names[1:])
      else:     # the SimMIM decoder's conv, the fine-tuning head
        name = official_name(names).replace("decoder.conv1x1", "decoder.0")
      assert flat[path] == official_decays(name, leaf.shape, prefix, kws), name
      decayed += flat[path]
  # Pretraining decays the bias tables (the wrapper's keywords match nothing); fine-tuning not.
  assert pre.decay_mask(pp)["encoder"]["layers_0"]["blocks_0"]["attn"].get(
      "relative_position_bias_table", True)
  assert decayed > 0


# --------------------------------------------------------------------------- registry contract

def test_outputs_contract_and_summary():
  cfg = tiny()
  model = models.build(cfg, 32)
  x = np.random.default_rng(9).standard_normal((2, 32, 32, 3)).astype(np.float32)
  v = jax.jit(model.init)(KEY, x)
  meta = {}

  def arrays(v, x):     # the jitted outputs; their Python ints recorded while tracing
    o = models.outputs(model, v, x, pooling="mean", layers=True)
    meta.update(stride=o["stride"], grid=o["grid"])
    return {k: o[k] for k in ("tokens", "pooled", "layers")}

  out = {**jax.jit(arrays)(v, x), **meta}
  fmap = jax.jit(model.apply)(v, x)
  assert out["stride"] == 4 and out["grid"] == (8, 8) and out["tokens"].shape == (2, 64, 16)
  np.testing.assert_allclose(out["pooled"], fmap.reshape(2, 64, 16).mean(1), atol=1e-5)
  assert [l.shape for l in out["layers"]] == [(2, 8)] * 2 + [(2, 16)] * 3
  np.testing.assert_array_equal(out["layers"][-1], out["pooled"])
  tokens, cols = jax.jit(lambda v, x: (lambda o: (o[0]["tokens"], o[1]))(
      models.forward(model, v, x, train=False, pooling="mean")))(v, x)
  assert cols == {}
  np.testing.assert_allclose(tokens, out["tokens"], atol=1e-5)
  with pytest.raises(ValueError, match="'mean'"):
    models.outputs(model, v, x, pooling="cls")
  assert models.summary(cfg, 32) == "Swin v1 (embed 8, depths 2-2), window 4, patch 2, 32 px"
  assert models.summary(swin.default_config(variant="b", version=2, window_size=12), 192) == \
      "Swin V2-B, window 12, patch 4, 192 px"
  assert set(swin.EXECUTION_OPTIONS) <= set(swin.DEFAULTS)


@pytest.mark.parametrize("key,value,match", [
    ("variant", "xl", "variant='xl': use one of tiny"),
    ("version", 3, "use 1 .* or 2"),
    ("variant", "giant", "Swin V2 size"),
    ("window_size", 0, "integer >= 1"),
    ("num_heads", (3, 5), "heads do not divide"),
    ("depths", (2, 2, 2), "one head count per stage"),
    ("drop_path", 1.0, r"\[0, 1\)"),
    ("pretrained_window_sizes", (6, 6), "Swin V2 keys"),
    ("dtype", "float64", "'float32', 'bfloat16'"),
    ("attn_impl", "flash", "'xla' or 'cudnn'"),
    ("extra_norm_period", -2, "-1 .the variant's."),
    ("windows", 7, "not a Swin key"),
])
def test_bad_config_values_are_one_line_errors(key, value, match):
  cfg = swin.default_config(depths=(2, 2), num_heads=(3, 6))
  cfg[key] = value
  with pytest.raises(ValueError, match=match) as e:
    swin.from_config(cfg, 224)
  assert "\n" not in str(e.value)


def test_image_size_errors_name_the_fix():
  with pytest.raises(ValueError, match="does not divide stage 0"):
    swin.from_config(swin.default_config(window_size=5), 224)
  with pytest.raises(ValueError, match="cannot be merged"):
    swin.from_config(swin.default_config(patch_size=2, window_size=3), 36)
  model = swin.from_config(tiny(), 32)
  with pytest.raises(ValueError, match="built for 32px"):
    model.init(KEY, jnp.zeros((1, 64, 64, 3)))


# --------------------------------------------------------------------------- official weights

def test_official_state_dict_round_trip_layouts_and_buffers():
  from mim_jax.convert import swin as convert
  for version, kw in ((1, dict(ape=True)),
                      (2, dict(extra_norm_period=2, pretrained_window_sizes=(6, 2)))):
    model = swin.from_config(tiny(version, **kw), 32, use_mask_token=True)
    params = jax.tree.map(np.float32, random_params(model, jnp.zeros((1, 32, 32, 3))))
    spec = convert.SwinSpec(version, 8, (2, 2), (2, 4), 2, 4, 32, True, version == 1, True,
                            2 if version == 2 else 0, (6, 2) if version == 2 else ())
    sd = convert.params_to_torch(params, spec)
    b = params["layers_0"]["blocks_1"]
    np.testing.assert_array_equal(sd["layers.0.blocks.1.attn.qkv.weight"], b["attn"]["qkv"]["kernel"].T)
    np.testing.assert_array_equal(sd["patch_embed.proj.weight"],
                                  params["patch_embed"]["proj"]["kernel"].transpose(3, 2, 0, 1))
    np.testing.assert_array_equal(sd["layers.0.downsample.reduction.weight"],
                                  params["layers_0"]["downsample"]["reduction"]["kernel"].T)
    np.testing.assert_array_equal(sd["layers.1.blocks.0.attn.relative_position_index"],
                                  official_index(4))
    np.testing.assert_array_equal(sd["layers.0.blocks.1.attn_mask"][:, :, :],
                                  swin.attention_mask(16, 16, 4, 2))
    assert "layers.0.blocks.0.attn_mask" not in sd and sd["norm.weight"].shape == (16,)
    if version == 2:
      assert sd["layers.0.blocks.0.attn.cpb_mlp.2.weight"].shape == (2, 512)
      assert "layers.0.blocks.1.norm3.weight" in sd and "layers.0.blocks.0.norm3.weight" not in sd
      np.testing.assert_allclose(sd["layers.0.blocks.0.attn.relative_coords_table"].reshape(-1, 2),
                                 np_coords_table(4, 6), rtol=1e-6, atol=1e-7)
    else:
      assert sd["layers.0.blocks.0.attn.qkv.bias"].shape == (24,)
    simmim_sd = {f"encoder.{k}": v for k, v in sd.items()}
    simmim_sd.update({"decoder.0.weight": np.ones((48, 16, 1, 1)), "decoder.0.bias": np.ones(48)})
    tree, got_spec, ignored = convert.torch_to_params(simmim_sd)
    assert got_spec == spec and all(k.rsplit(".", 1)[-1] in convert.BUFFERS for k in ignored)
    jax.tree.map(np.testing.assert_array_equal, tree["encoder"], params)
    assert tree["decoder"]["conv1x1"]["kernel"].shape == (16, 48)
    # The config written for these weights builds a method whose parameters they fill exactly.
    c = convert.make_config(got_spec, preset="swin_cifar10")
    m = methods.get(c)
    shapes = jax.eval_shape(m.init, KEY, jnp.zeros((1, 32, 32, 3)))
    assert jax.tree.map(np.shape, shapes) == jax.tree.map(np.shape, tree)


def test_official_state_dict_errors_are_one_line():
  from mim_jax.convert import swin as convert
  from mim_jax.convert.names import ConversionError
  model = swin.from_config(tiny(), 32)
  spec = convert.SwinSpec(1, 8, (2, 2), (2, 4), 2, 4, 32)
  sd = convert.params_to_torch(random_params(model, jnp.zeros((1, 32, 32, 3))), spec)
  broken = (
      ({k: v for k, v in sd.items() if k != "layers.1.blocks.0.mlp.fc1.bias"}, "lacks"),
      ({**sd, "layers.0.blocks.0.attn.extra": np.zeros(3)}, "not a Swin v1's"),
      ({**sd, "layers.0.blocks.0.mlp.fc2.weight": np.zeros((8, 31))}, "do not fit"),
      ({k: v for k, v in sd.items() if "attn_mask" not in k}, "give --image_size"),
      ({"pos_embed": np.zeros(3)}, "not a Swin state dict"),
  )
  for bad, match in broken:
    with pytest.raises(ConversionError, match=match) as e:
      convert.torch_to_params(bad)
    assert "\n" not in str(e.value)
  tree, got, _ = convert.torch_to_params({k: v for k, v in sd.items() if "attn_mask" not in k},
                                         image_size=32)
  assert got == spec
