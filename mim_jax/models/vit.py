"""A Flax linen Vision Transformer covering the variants the MIM papers use.

One `Encoder` (a stack of pre-norm blocks) serves every ViT here: the MAE encoder and decoder
(timm blocks: qkv bias, no layer scale, fixed 2-D sin-cos position embeddings) and the SimMIM /
BEiT encoder (q and v biases only, layer scale, shared relative position bias, no absolute
position embedding). The options only switch parameters on and off; the arithmetic of a block
is the same.

`ViT` is the one encoder forward pass of every method: its call also covers other input sizes
(iBOT's local crops, the position table interpolated), several masked copies per image and a
function between blocks (ExtreMA, PCAE's token-dropping teacher), and its options CaiT's
class-attention blocks (ExtreMA), so every method's encoder honours the config's execution
options (`EXECUTION_OPTIONS`). Methods build decoders and heads from `Encoder` / `Block`, not
encoders.

Compute runs in `dtype` (bfloat16 by default) with parameters kept in `param_dtype` (float32).
LayerNorm statistics and the attention softmax are computed in float32 whatever `dtype` is.
Attention goes through `jax.nn.dot_product_attention`, whose `implementation` ('xla', 'cudnn'
or None for JAX's choice) comes from the config. cuDNN's fused attention rejects some sequence
lengths (odd ones such as 197 in the backward pass), so with 'cudnn' the tokens are padded
inside `attention` to a multiple of `attn_pad` (2 by default) and the padded keys masked out: the same function,
checked against the plain path by tests/test_vit.py.
"""
from __future__ import annotations

import functools
import math
from typing import Any, Callable, Optional

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

Dtype = Any

# name -> (width, depth, heads); mlp ratio 4 everywhere.
VARIANTS = {
    "mu": (64, 2, 2),        # tests only
    "ti": (192, 12, 3),
    "tiny": (192, 12, 3),
    "s": (384, 12, 6),
    "small": (384, 12, 6),
    "b": (768, 12, 12),
    "base": (768, 12, 12),
    "l": (1024, 24, 16),
    "large": (1024, 24, 16),
    "h": (1280, 32, 16),
    "huge": (1280, 32, 16),
}


def variant(name: str) -> tuple[int, int, int]:
  try:
    return VARIANTS[name.lower()]
  except KeyError:
    raise ValueError(f"unknown ViT variant {name!r}: use one of {sorted(set(VARIANTS))}") from None


# ---------------------------------------------------------------------------------------------
# Position embeddings (numpy, computed once at trace time) and their interpolation.

def sincos_1d(dim: int, pos: np.ndarray) -> np.ndarray:
  """1-D sin-cos embedding as in MAE's `get_1d_sincos_pos_embed_from_grid` (float64 math)."""
  assert dim % 2 == 0
  omega = np.arange(dim // 2, dtype=np.float64) / (dim / 2.0)
  omega = 1.0 / 10000**omega
  out = np.einsum("m,d->md", pos.reshape(-1).astype(np.float64), omega)
  return np.concatenate([np.sin(out), np.cos(out)], axis=1)


def sincos_2d(dim: int, grid_h: int, grid_w: Optional[int] = None, cls_token: bool = False) -> np.ndarray:
  """2-D sin-cos embedding [(1 +) h*w, dim] with the same layout as the official MAE code.

  Half the channels encode the column (w) coordinate and half the row (h) coordinate, in that
  order, and a zero row is prepended for the cls token when `cls_token`.
  """
  assert dim % 4 == 0, "sin-cos position embedding needs a width divisible by 4"
  grid_w = grid_w or grid_h
  gw, gh = np.meshgrid(np.arange(grid_w, dtype=np.float32), np.arange(grid_h, dtype=np.float32))
  emb = np.concatenate([sincos_1d(dim // 2, gw), sincos_1d(dim // 2, gh)], axis=1)
  if cls_token:
    emb = np.concatenate([np.zeros([1, dim]), emb], axis=0)
  return emb.astype(np.float32)


def sinusoid_table(num_positions: int, dim: int) -> np.ndarray:
  """The 1-D sinusoid table [num_positions, dim] of VideoMAE's `get_sinusoid_encoding_table`
  (MCG-NJU/VideoMAE modeling_finetune.py; the Transformer's): position / 10000^(2 (j // 2) / dim)
  in float64, sine in the even channels and cosine in the odd ones (interleaved, unlike
  `sincos_1d`'s halves), returned as float32. VideoMAE numbers the T/t * h * w tokens of a clip
  in (t, h, w) order and takes row i for token i: one table over space and time, not the
  separable space + time tables of MAE-ST."""
  j = np.arange(dim)
  angle = np.arange(num_positions, dtype=np.float64)[:, None] / np.power(10000, 2 * (j // 2) / dim)[None]
  table = angle.copy()
  table[:, 0::2] = np.sin(angle[:, 0::2])
  table[:, 1::2] = np.cos(angle[:, 1::2])
  return table.astype(np.float32)


def relative_position_index(grid: int) -> np.ndarray:
  """BEiT/SimMIM relative position index [(1+g*g), (1+g*g)] with three extra cls entries."""
  coords = np.stack(np.meshgrid(np.arange(grid), np.arange(grid), indexing="ij")).reshape(2, -1)
  rel = (coords[:, :, None] - coords[:, None, :]).transpose(1, 2, 0)
  rel[:, :, 0] += grid - 1
  rel[:, :, 1] += grid - 1
  rel[:, :, 0] *= 2 * grid - 1
  num = (2 * grid - 1) ** 2 + 3
  idx = np.zeros((grid * grid + 1,) * 2, dtype=np.int32)
  idx[1:, 1:] = rel.sum(-1)
  idx[0, 0:] = num - 3
  idx[0:, 0] = num - 2
  idx[0, 0] = num - 1
  return idx


def torch_bicubic_matrix(in_size: int, out_size: int, scale_factor: float) -> np.ndarray:
  """[out_size, in_size] matrix of torch.nn.functional.interpolate(mode='bicubic',
  align_corners=False, scale_factor=scale_factor) along one axis: source coordinate
  (i + 0.5) / scale_factor - 0.5, Keys' cubic kernel with a = -0.75, indices clamped."""
  a = -0.75

  def near(x):   # |x| <= 1
    return ((a + 2) * x - (a + 3)) * x * x + 1

  def far(x):    # 1 < |x| < 2
    return ((a * x - 5 * a) * x + 8 * a) * x - 4 * a

  m = np.zeros((out_size, in_size), np.float64)
  for i in range(out_size):
    src = (i + 0.5) / scale_factor - 0.5
    x0 = math.floor(src)
    t = src - x0
    for k, w in zip((-1, 0, 1, 2), (far(t + 1), near(t), near(1 - t), far(2 - t))):
      m[i, min(max(x0 + k, 0), in_size - 1)] += w
  return m


def interpolate_pos_embed(table: jax.Array, grid: int, out_h: int, out_w: int) -> jax.Array:
  """[1, 1 + grid^2, D] position table (cls first) -> [1, 1 + out_h * out_w, D], unchanged at
  the native grid, else the patch part resized bicubically with scale (out + 0.1) / grid.

  DINO / iBOT `VisionTransformer.interpolate_pos_encoding` (facebookresearch/dino and
  bytedance/ibot models/vision_transformer.py): the patch rows as a [grid, grid] image,
  nn.functional.interpolate(mode='bicubic', scale_factor=((h + 0.1) / grid, (w + 0.1) / grid))
  (the 0.1 avoids floating point error in the output size), the cls row unchanged.
  """
  if (out_h, out_w) == (grid, grid):
    return table
  d = table.shape[-1]
  mh = jnp.asarray(torch_bicubic_matrix(grid, out_h, (out_h + 0.1) / grid), jnp.float32)
  mw = jnp.asarray(torch_bicubic_matrix(grid, out_w, (out_w + 0.1) / grid), jnp.float32)
  patch = table[0, 1:].reshape(grid, grid, d).astype(jnp.float32)
  out = jnp.einsum("ij,jkd,lk->ild", mh, patch, mw).reshape(1, out_h * out_w, d)
  return jnp.concatenate([table[:, :1].astype(jnp.float32), out], axis=1)


# ---------------------------------------------------------------------------------------------
# Initialisers.

xavier_uniform = nn.initializers.xavier_uniform()


def trunc_normal(std: float, cutoff: float = 2.0) -> Callable:
  """timm's trunc_normal_(std, a=-cutoff*std, b=cutoff*std) (cutoff in units of std); like
  timm, the truncated draw is not rescaled, so its standard deviation is below `std`.

  SIMMIM_TRUNC: SimMIM's VisionTransformerForSimMIM overrides `_trunc_normal_` to cut at
  +-1 std, and since the parent's __init__ calls the overridden method, every trunc-normal
  weight of its encoder (patch embed, Linear layers, cls token, mask token) is cut at +-std.
  The 'beit' init style does the same.
  """
  def init(key, shape, dtype=jnp.float32):
    return std * jax.random.truncated_normal(key, -cutoff, cutoff, shape, dtype)
  return init


def timm_trunc_normal(std: float = 0.02, bound: float = 2.0) -> Callable:
  """timm's trunc_normal_(std=std) with its default bounds a=-2, b=2, which are absolute: at
  std .02 they sit 100 std out, so the draw is in practice N(0, std^2). Drawn as a normal
  clipped at the bounds: `jax.random.truncated_normal` between bounds that wide maps its lowest
  uniform draw (probability 2^-23 per entry: a few weights of a ViT-B) onto the bound itself."""
  def init(key, shape, dtype=jnp.float32):
    return jnp.clip(std * jax.random.normal(key, shape, dtype), -bound, bound)
  return init


def torch_default_uniform(fan_in: int) -> Callable:
  """PyTorch's default Linear/Conv init for biases (and weights): U(-1/sqrt(fan_in), +)."""
  bound = 1.0 / math.sqrt(fan_in)
  def init(key, shape, dtype=jnp.float32):
    return jax.random.uniform(key, shape, dtype, -bound, bound)
  return init


# ---------------------------------------------------------------------------------------------
# Layers.

def attention(q, k, v, bias=None, implementation=None, pad_multiple=0, valid_len=None):
  """softmax(q k^T / sqrt(d) + bias) v over [B, N, H, D] inputs.

  With `pad_multiple` > 0, N is padded up to a multiple of it and the padded keys are masked
  (`key_value_seq_lengths`); padded query rows attend to the real keys and are sliced off, so
  the result and its gradients equal the unpadded attention. This lets cuDNN's fused kernel
  run (forward and backward) on sequence lengths it rejects, such as 197.

  `valid_len` (a Python int) says the inputs are padded already (by `Encoder`, once for all
  blocks): only the first `valid_len` keys are attended to, and the padded query rows are
  returned as computed (the caller slices them off once).
  """
  n = q.shape[1]
  if valid_len is not None and valid_len < n:
    lengths = jnp.full((q.shape[0],), valid_len, jnp.int32)
    return jax.nn.dot_product_attention(q, k, v, bias=bias, key_value_seq_lengths=lengths,
                                        implementation=implementation)
  padded = -(-n // pad_multiple) * pad_multiple if pad_multiple else n
  if padded == n:
    return jax.nn.dot_product_attention(q, k, v, bias=bias, implementation=implementation)
  widths = [(0, 0), (0, padded - n), (0, 0), (0, 0)]
  q, k, v = (jnp.pad(t, widths) for t in (q, k, v))
  if bias is not None:
    bias = jnp.pad(bias, [(0, 0), (0, 0), (0, padded - n), (0, padded - n)])
  lengths = jnp.full((q.shape[0],), n, jnp.int32)
  out = jax.nn.dot_product_attention(q, k, v, bias=bias, key_value_seq_lengths=lengths,
                                     implementation=implementation)
  return out[:, :n]


@functools.partial(jax.custom_vjp, nondiff_argnums=(2,))
def _take_rows(x, ids, _num_rows):
  return jnp.take_along_axis(x, ids[..., None], axis=1)


def _take_rows_fwd(x, ids, num_rows):
  return _take_rows(x, ids, num_rows), ids


def _take_rows_bwd(num_rows, ids, g):
  # Each source row is picked at most once, so the gradient is a gather of g through the
  # inverse index (rows never picked read an appended zero row), not a scatter-add.
  b, k = ids.shape
  inverse = jnp.full((b, num_rows), k, jnp.int32).at[jnp.arange(b)[:, None], ids].set(
      jnp.arange(k, dtype=jnp.int32)[None])
  g = jnp.concatenate([g, jnp.zeros((b, 1) + g.shape[2:], g.dtype)], axis=1)
  return jnp.take_along_axis(g, inverse[..., None], axis=1), None


_take_rows.defvjp(_take_rows_fwd, _take_rows_bwd)


def take_rows(x: jax.Array, ids: jax.Array) -> jax.Array:
  """x [B, L, D], ids [B, K] of DISTINCT indices per row -> x[b, ids[b]] [B, K, D].

  Equal to `jnp.take_along_axis`, with a backward pass that gathers instead of scatter-adding
  (the MAE keep and un-shuffle gathers, whose indices are a permutation or part of one).
  """
  return _take_rows(x, ids.astype(jnp.int32), x.shape[1])


def attn_pad_multiple(attn_impl: Optional[str], attn_pad: int) -> int:
  """`attn_pad` < 0 means automatic: cuDNN's fused attention trains only on even sequence
  lengths, so pad to a multiple of 2 for cuDNN (197 -> 198), not at all otherwise."""
  if attn_pad >= 0:
    return attn_pad
  return 2 if attn_impl == "cudnn" else 0


_SQRT_HALF = 1.0 / math.sqrt(2.0)
_INV_SQRT_2PI = 1.0 / math.sqrt(2.0 * math.pi)


@jax.custom_vjp
def gelu_exact(x: jax.Array) -> jax.Array:
  """PyTorch's nn.GELU(): x * Phi(x) with the erf form, computed in float32.

  A custom VJP keeps only x for the backward pass (Phi(x) + x phi(x) is recomputed there), so
  the forward writes one tensor instead of the several that autodiff of the formula saves.
  """
  xf = x.astype(jnp.float32)
  return (0.5 * xf * (1.0 + jax.lax.erf(xf * _SQRT_HALF))).astype(x.dtype)


def _gelu_fwd(x):
  return gelu_exact(x), x


def _gelu_bwd(x, g):
  xf = x.astype(jnp.float32)
  cdf = 0.5 * (1.0 + jax.lax.erf(xf * _SQRT_HALF))
  pdf = jnp.exp(-0.5 * xf * xf) * _INV_SQRT_2PI
  return ((g.astype(jnp.float32) * (cdf + xf * pdf)).astype(x.dtype),)


gelu_exact.defvjp(_gelu_fwd, _gelu_bwd)

class Attention(nn.Module):
  """Multi-head self-attention. `qkv_bias`: 'qkv' (timm), 'qv' (BEiT/SimMIM) or 'none'.

  `qkv_proj` says how q, k and v are computed from the one [d, 3d] kernel: 'fused' (one
  product, then q, k, v cut from it) or 'split' (three products with the kernel's column
  blocks, so q, k and v come out as separate arrays and their gradients need no concatenation).
  Same parameters and the same function; which is faster depends on the device.
  """
  num_heads: int
  qkv_bias: str = "qkv"
  kernel_init: Callable = xavier_uniform
  proj_init: Callable = xavier_uniform
  attn_impl: Optional[str] = None
  attn_pad: int = -1
  dtype: Dtype = jnp.float32
  param_dtype: Dtype = jnp.float32
  qkv_proj: str = "fused"

  @nn.compact
  def __call__(self, x, bias=None, valid_len=None):
    b, n, d = x.shape
    h = self.num_heads
    w = self.param("qkv_kernel", self.kernel_init, (d, 3 * d), self.param_dtype)
    if self.qkv_bias == "qkv":
      qkv_b = self.param("qkv_bias", nn.initializers.zeros, (3 * d,), self.param_dtype).astype(self.dtype)
    elif self.qkv_bias == "qv":
      qb = self.param("q_bias", nn.initializers.zeros, (d,), self.param_dtype)
      vb = self.param("v_bias", nn.initializers.zeros, (d,), self.param_dtype)
      qkv_b = jnp.concatenate([qb, jnp.zeros_like(vb), vb]).astype(self.dtype)
    elif self.qkv_bias == "none":
      qkv_b = None
    else:
      raise ValueError(f"qkv_bias must be 'qkv', 'qv' or 'none', got {self.qkv_bias!r}")
    xd, wd = x.astype(self.dtype), w.astype(self.dtype)
    if self.qkv_proj == "fused":
      qkv = jnp.einsum("bnd,de->bne", xd, wd)
      if qkv_b is not None:
        qkv = qkv + qkv_b
      q, k, v = jnp.split(qkv.reshape(b, n, 3, h, d // h), 3, axis=2)
      q, k, v = q[:, :, 0], k[:, :, 0], v[:, :, 0]  # [b, n, h, hd]
    elif self.qkv_proj == "split":
      parts = []
      for i in range(3):
        t = jnp.einsum("bnd,de->bne", xd, wd[:, i * d:(i + 1) * d])
        if qkv_b is not None and not (self.qkv_bias == "qv" and i == 1):
          t = t + qkv_b[i * d:(i + 1) * d]
        parts.append(t.reshape(b, n, h, d // h))
      q, k, v = parts
    else:
      raise ValueError(f"qkv_proj must be 'fused' or 'split', got {self.qkv_proj!r}")
    if bias is not None:
      bias = bias.astype(self.dtype)
    if self.is_mutable_collection("intermediates"):
      # For the analyses (mim_jax.analysis): the attention maps [B, heads, N, N], computed
      # only when a caller asks for intermediates, never in training.
      m = n if valid_len is None else valid_len     # the real tokens of a padded sequence
      logits = jnp.einsum("bqhd,bkhd->bhqk", q[:, :m], k[:, :m]).astype(jnp.float32) / math.sqrt(d // h)
      if bias is not None:
        logits = logits + bias[..., :m, :m].astype(jnp.float32)
      self.sow("intermediates", "attention", jax.nn.softmax(logits, axis=-1))
    out = attention(q, k, v, bias, self.attn_impl, attn_pad_multiple(self.attn_impl, self.attn_pad),
                    valid_len)
    out = out.reshape(b, n, d)
    return nn.Dense(d, dtype=self.dtype, param_dtype=self.param_dtype, kernel_init=self.proj_init,
                    name="proj")(out)


class Mlp(nn.Module):
  hidden: int
  kernel_init: Callable = xavier_uniform
  fc2_init: Callable = xavier_uniform
  dtype: Dtype = jnp.float32
  param_dtype: Dtype = jnp.float32

  @nn.compact
  def __call__(self, x):
    d = x.shape[-1]
    x = nn.Dense(self.hidden, dtype=self.dtype, param_dtype=self.param_dtype,
                 kernel_init=self.kernel_init, name="fc1")(x)
    x = gelu_exact(x)  # PyTorch nn.GELU default: exact erf form.
    return nn.Dense(d, dtype=self.dtype, param_dtype=self.param_dtype,
                    kernel_init=self.fc2_init, name="fc2")(x)


@functools.partial(jax.custom_vjp, nondiff_argnums=(3,))
def layer_norm_recompute(x, scale, bias, eps):
  """Flax's LayerNorm arithmetic (float32 statistics, Var = E[x^2] - E[x]^2 clipped at 0,
  (x - mean) * (rsqrt(var + eps) * scale) + bias), with a custom VJP that keeps only x and two
  numbers per row for the backward pass and recomputes the normalised x there. Autodiff of
  the formula keeps three float32 arrays of x's size per LayerNorm (x - mean, the broadcast
  rsqrt * scale, and a product for the variance); the backward is the standard
  dx = rstd * (g - mean(g) - xhat * mean(g * xhat)) with g = dy * scale.
  """
  return _ln_fwd(x, scale, bias, eps)[0]


def _ln_stats(xf, eps):
  mean = jnp.mean(xf, axis=-1, keepdims=True)
  mean2 = jnp.mean(jax.lax.square(xf), axis=-1, keepdims=True)
  var = jnp.maximum(0.0, mean2 - jax.lax.square(mean))
  return mean, jax.lax.rsqrt(var + eps)


def _ln_fwd(x, scale, bias, eps):
  xf = x.astype(jnp.float32)
  mean, rstd = _ln_stats(xf, eps)
  y = (xf - mean) * (rstd * scale.astype(jnp.float32)) + bias.astype(jnp.float32)
  return y, (x, mean, rstd, scale, bias)


def _ln_bwd(eps, res, dy):
  x, mean, rstd, scale, bias = res
  dy = dy.astype(jnp.float32)
  xhat = (x.astype(jnp.float32) - mean) * rstd
  rows = tuple(range(x.ndim - 1))
  g = dy * scale.astype(jnp.float32)
  dx = rstd * (g - jnp.mean(g, axis=-1, keepdims=True)
               - xhat * jnp.mean(g * xhat, axis=-1, keepdims=True))
  return (dx.astype(x.dtype), jnp.sum(dy * xhat, axis=rows).astype(scale.dtype),
          jnp.sum(dy, axis=rows).astype(bias.dtype))


layer_norm_recompute.defvjp(_ln_fwd, _ln_bwd)


class RecomputeLayerNorm(nn.Module):
  """nn.LayerNorm's parameters ('scale' ones, 'bias' zeros) and output (float32), computed by
  `layer_norm_recompute`: the same function, with a backward pass that saves less."""
  epsilon: float = 1e-6
  param_dtype: Dtype = jnp.float32

  @nn.compact
  def __call__(self, x):
    d = x.shape[-1]
    scale = self.param("scale", nn.initializers.ones, (d,), self.param_dtype)
    bias = self.param("bias", nn.initializers.zeros, (d,), self.param_dtype)
    return layer_norm_recompute(x, scale, bias, self.epsilon)


def layer_norm(name: str, param_dtype: Dtype, dtype: Dtype = jnp.float32, impl: str = "flax") -> nn.Module:
  """The ViTs' LayerNorm: eps 1e-6 as in MAE (partial(nn.LayerNorm, eps=1e-6)) and SimMIM's
  ViT, statistics and output in float32. `impl` 'flax' is nn.LayerNorm; 'recompute' is
  `RecomputeLayerNorm` (the same function; see `layer_norm_recompute`)."""
  if impl == "flax":
    return nn.LayerNorm(epsilon=1e-6, dtype=dtype, param_dtype=param_dtype, name=name)
  if impl == "recompute":
    if jnp.dtype(dtype) != jnp.float32:
      raise ValueError("layer_norm impl 'recompute' computes in float32 only")
    return RecomputeLayerNorm(1e-6, param_dtype, name=name)
  raise ValueError(f"layer_norm must be 'flax' or 'recompute', got {impl!r}")


class Block(nn.Module):
  """Pre-norm transformer block, optional layer scale (`init_values`) and drop path."""
  num_heads: int
  mlp_ratio: float = 4.0
  qkv_bias: str = "qkv"
  init_values: Optional[float] = None
  drop_path: float = 0.0
  init_style: str = "xavier"        # 'xavier' (MAE) or 'beit' (trunc-normal .02 + depth rescale)
  layer_id: int = 1           # 1-based, for the BEiT depth rescale of proj/fc2
  attn_impl: Optional[str] = None
  attn_pad: int = -1
  dtype: Dtype = jnp.float32
  param_dtype: Dtype = jnp.float32
  qkv_proj: str = "fused"
  ln_impl: str = "flax"              # see `layer_norm`

  def _drop_path(self, x, deterministic):
    if deterministic or self.drop_path == 0.0:
      return x
    keep = 1.0 - self.drop_path
    mask = jax.random.bernoulli(self.make_rng("dropout"), keep, (x.shape[0],) + (1,) * (x.ndim - 1))
    return x * mask.astype(x.dtype) / keep

  @nn.compact
  def __call__(self, x, bias=None, deterministic=True, valid_len=None):
    """`valid_len`: x holds that many real tokens followed by padding (see `Encoder`)."""
    d = x.shape[-1]
    if self.init_style == "beit":
      kinit = trunc_normal(0.02, cutoff=1.0)  # see SIMMIM_TRUNC below
      scale = 1.0 / math.sqrt(2.0 * self.layer_id)
      rinit = lambda k, s, t=jnp.float32: kinit(k, s, t) * scale  # noqa: E731
    else:
      kinit = rinit = xavier_uniform
    y = layer_norm("norm1", self.param_dtype, impl=self.ln_impl)(x)
    y = Attention(self.num_heads, self.qkv_bias, kinit, rinit, self.attn_impl, self.attn_pad,
                  self.dtype, self.param_dtype, self.qkv_proj, name="attn")(y, bias, valid_len)
    if self.init_values is not None:
      y = y * self.param("gamma_1", nn.initializers.constant(self.init_values), (d,), self.param_dtype)
    x = x + self._drop_path(y, deterministic).astype(x.dtype)
    y = layer_norm("norm2", self.param_dtype, impl=self.ln_impl)(x)
    y = Mlp(int(d * self.mlp_ratio), kinit, rinit, self.dtype, self.param_dtype, name="mlp")(y)
    if self.init_values is not None:
      y = y * self.param("gamma_2", nn.initializers.constant(self.init_values), (d,), self.param_dtype)
    return x + self._drop_path(y, deterministic).astype(x.dtype)


# Which values a rematerialised block keeps for the backward pass (model.remat_policy):
# 'full' keeps only the block's input and recomputes the rest; 'dots_no_batch' also keeps the
# outputs of the projection and MLP matmuls (recomputing LayerNorm, GELU and attention), 'dots'
# every matmul's output. Less recomputation for more memory.
REMAT_POLICIES = {
    "full": None,
    "dots_no_batch": jax.checkpoint_policies.dots_with_no_batch_dims_saveable,
    "dots": jax.checkpoint_policies.dots_saveable,
}


# The config's execution options (model.<key>: how the model is computed, not what it is; a
# checkpoint resumes across them, checkpointing.EXECUTION_KEYS) and, for those with a fixed
# set, their values, checked before a run builds anything (`check_execution_options`).
EXECUTION_CHOICES = {
    "attn_impl": ("", None, "xla", "cudnn"),     # '' or None: JAX's choice
    "qkv_proj": ("fused", "split"),
    "layer_norm": ("flax", "recompute"),
    "remat_policy": tuple(REMAT_POLICIES),
    "residual_dtype": ("float32", "bfloat16"),
}
EXECUTION_OPTIONS = ("attn_pad", "remat", "dtype", *EXECUTION_CHOICES)


def check_execution_options(model_cfg) -> None:
  """ValueError, one line naming the allowed values, for an unknown execution option value."""
  for key, allowed in EXECUTION_CHOICES.items():
    value = model_cfg.get(key, allowed[0])
    if value not in allowed:
      raise ValueError(f"config.model.{key}={value!r}: use one of {', '.join(map(repr, allowed))}")


def drop_path_rates(depth: int, drop_path: float, rule: str = "linear") -> list[float]:
  """Each block's drop-path rate: 'linear' is timm's dpr, linspace(0, drop_path, depth);
  'constant_but_last' is TinyMIM's student (models_tinymim.py: drop_path in every block but
  the last, which has none)."""
  if rule == "linear":
    return [float(r) for r in np.linspace(0.0, drop_path, depth)] if depth else []
  if rule == "constant_but_last":
    return [float(drop_path)] * max(depth - 1, 0) + [0.0] * min(depth, 1)
  raise ValueError(f"drop_path_rule must be 'linear' or 'constant_but_last', got {rule!r}")


class Encoder(nn.Module):
  """A stack of `depth` blocks followed by a final LayerNorm (unless `final_norm=False`).

  `__call__(x, bias=None, deterministic=True, between_blocks=None, ids=None)`: with
  `between_blocks`, a function (i, x, ids) -> (x, ids) applied after block i (0-based) to the
  tokens and to `ids`, per-token data the caller threads through (their patch positions, say),
  the call returns (x, ids). It may drop or reorder tokens (PCAE's teacher compresses its
  tokens between blocks); the sequence is then padded for the attention inside each block
  (`attention`'s `pad_multiple`), not once for all blocks, and a relative position bias, which
  fixes the sequence, cannot be given.
  """
  depth: int
  num_heads: int
  mlp_ratio: float = 4.0
  qkv_bias: str = "qkv"
  init_values: Optional[float] = None
  drop_path: float = 0.0
  init_style: str = "xavier"
  remat: bool = False
  attn_impl: Optional[str] = None
  final_norm: bool = True
  dtype: Dtype = jnp.float32
  param_dtype: Dtype = jnp.float32
  attn_pad: int = -1
  qkv_proj: str = "fused"
  ln_impl: str = "flax"
  remat_policy: str = "full"         # with remat: see REMAT_POLICIES
  drop_path_rule: str = "linear"     # see drop_path_rates

  @nn.compact
  def __call__(self, x, bias=None, deterministic=True, between_blocks=None, ids=None):
    if self.remat_policy not in REMAT_POLICIES:
      raise ValueError(f"remat_policy must be one of {list(REMAT_POLICIES)}, got {self.remat_policy!r}")
    block_cls = (nn.remat(Block, static_argnums=(3, 4), policy=REMAT_POLICIES[self.remat_policy])
                 if self.remat else Block)
    rates = drop_path_rates(self.depth, self.drop_path, self.drop_path_rule)
    # Where the attention needs a padded sequence (cuDNN: 197 -> 198), pad the tokens once
    # here rather than q, k and v in every block: the padded rows go through the blocks
    # (LayerNorm, MLP and attention act on each row alone; padded keys are masked, so no real
    # token sees them) and are sliced off after the last block. Same result and gradients as
    # padding inside each attention, without the per-block pad and slice copies. A
    # `between_blocks` hook sees the real tokens only and may change their number, so with
    # one the attention pads inside each block instead.
    if between_blocks is not None and bias is not None:
      raise ValueError("between_blocks may change the tokens: it cannot be combined with a "
                       "relative position bias (use rel_pos_bias='none')")
    n = x.shape[1]
    multiple = attn_pad_multiple(self.attn_impl, self.attn_pad)
    padded = -(-n // multiple) * multiple if multiple and self.depth and between_blocks is None else n
    valid_len = None
    if padded != n:
      valid_len = n
      x = jnp.pad(x, [(0, 0), (0, padded - n), (0, 0)])
      if bias is not None:
        bias = jnp.pad(bias, [(0, 0), (0, 0), (0, padded - n), (0, padded - n)])
    for i in range(self.depth):
      x = block_cls(self.num_heads, self.mlp_ratio, self.qkv_bias, self.init_values, float(rates[i]),
                    self.init_style, i + 1, self.attn_impl, self.attn_pad, self.dtype,
                    self.param_dtype, self.qkv_proj, self.ln_impl,
                    name=f"block{i:02d}")(x, bias, deterministic, valid_len)
      # Every block's output, for per-layer probes and CKA (only when intermediates are asked).
      if self.is_mutable_collection("intermediates"):
        self.sow("intermediates", "block_outputs", x[:, :n])
      if between_blocks is not None:
        x, ids = between_blocks(i, x, ids)
    if between_blocks is None:
      x = x[:, :n]
    if self.final_norm:
      x = layer_norm("norm", self.param_dtype, impl=self.ln_impl)(x)
    return x if between_blocks is None else (x, ids)


class ClassAttention(nn.Module):
  """CaiT's class attention (facebookresearch/deit cait_models.py `Class_Attention`, as
  microsoft/ExtreMA vits.py uses it): the first token queries all tokens, output [B, 1, D].
  Separate q, k, v Linear layers (parameters 'q', 'k', 'v', 'proj'); the one-query softmax
  runs through XLA (`attention` with JAX's default implementation), in `dtype`."""
  num_heads: int
  qkv_bias: bool = True
  dtype: Dtype = jnp.float32
  param_dtype: Dtype = jnp.float32

  @nn.compact
  def __call__(self, u):
    b, n, d = u.shape
    h = self.num_heads
    dense = lambda name, bias=self.qkv_bias: nn.Dense(  # noqa: E731
        d, use_bias=bias, dtype=self.dtype, param_dtype=self.param_dtype,
        kernel_init=xavier_uniform, name=name)
    q = dense("q")(u[:, :1]).reshape(b, 1, h, d // h)
    k = dense("k")(u).reshape(b, n, h, d // h)
    v = dense("v")(u).reshape(b, n, h, d // h)
    out = attention(q, k, v).reshape(b, 1, d)
    return dense("proj", True)(out)


class ClassAttentionBlock(nn.Module):
  """CaiT's `LayerScale_Block_CA` (ExtreMA vits.py `Block_CA`): cls += g1 * CA(LN([cls, x]));
  cls += g2 * MLP(LN(cls)), layer scales g1, g2 initialised to `init_values`, no drop path.
  x [B, N, D] (the patch tokens), cls [B, 1, D] -> the new cls [B, 1, D]."""
  num_heads: int
  init_values: float = 0.1
  mlp_ratio: float = 4.0
  dtype: Dtype = jnp.float32
  param_dtype: Dtype = jnp.float32
  ln_impl: str = "flax"              # see `layer_norm`

  @nn.compact
  def __call__(self, x, cls):
    d = cls.shape[-1]
    u = layer_norm("norm1", self.param_dtype, impl=self.ln_impl)(jnp.concatenate([cls, x], axis=1))
    y = ClassAttention(self.num_heads, True, self.dtype, self.param_dtype, name="attn")(u)
    g1 = self.param("gamma_1", nn.initializers.constant(self.init_values), (d,), self.param_dtype)
    cls = cls + (y * g1).astype(cls.dtype)
    y = layer_norm("norm2", self.param_dtype, impl=self.ln_impl)(cls)
    y = Mlp(int(d * self.mlp_ratio), dtype=self.dtype, param_dtype=self.param_dtype, name="mlp")(y)
    g2 = self.param("gamma_2", nn.initializers.constant(self.init_values), (d,), self.param_dtype)
    return cls + (y * g2).astype(cls.dtype)


class PatchEmbed(nn.Module):
  """Non-overlapping patch projection, equal to a Conv2d with kernel = stride = patch.

  With `tubelet` > 0 it is VideoMAE's space-time patch embedding, a Conv3d with kernel =
  stride = (tubelet, patch, patch) over clips [B, T, H, W, C]: the tokens come out in
  (t, h, w) order (Conv3d's output [B, D, T/t, H/p, W/p] `.flatten(2)`), each the Dense of its
  cube's pixels flattened in (t, p, p, c) order. So 'proj/kernel' [t*p*p*C, D] is a torch
  Conv3d weight W [D, C, t, p, p] as W.permute(2, 3, 4, 1, 0).reshape(t*p*p*C, D), the same
  rule as the 2-D case (W [D, C, p, p] -> W.permute(2, 3, 1, 0).reshape(p*p*C, D)).
  """
  patch_size: int
  width: int
  kernel_init: Callable = xavier_uniform
  bias_init: Callable = nn.initializers.zeros
  dtype: Dtype = jnp.float32
  param_dtype: Dtype = jnp.float32
  tubelet: int = 0

  @nn.compact
  def __call__(self, images):
    p = self.patch_size
    if self.tubelet:
      b, tt, hh, ww, c = images.shape
      t = self.tubelet
      if tt % t or hh % p or ww % p:
        raise ValueError(f"clip {tt}x{hh}x{ww} is not divisible by the {t}x{p}x{p} tubelet "
                         "patches: set input.data.num_frames to a multiple of model.tubelet and "
                         "input.image_size to a multiple of model.patch_size")
      x = images.reshape(b, tt // t, t, hh // p, p, ww // p, p, c).transpose(0, 1, 3, 5, 2, 4, 6, 7)
      x = x.reshape(b, (tt // t) * (hh // p) * (ww // p), t * p * p * c)
    else:
      b, hh, ww, c = images.shape
      if hh % p or ww % p:
        raise ValueError(f"image size {hh}x{ww} is not divisible by the patch size {p}")
      # Rows of (p, p, c) like patchify() below, so a Dense over them is the conv.
      x = images.reshape(b, hh // p, p, ww // p, p, c).transpose(0, 1, 3, 2, 4, 5)
      x = x.reshape(b, (hh // p) * (ww // p), p * p * c)
    return nn.Dense(self.width, dtype=self.dtype, param_dtype=self.param_dtype,
                    kernel_init=self.kernel_init, bias_init=self.bias_init, name="proj")(x)


class RelativePositionBias(nn.Module):
  """SimMIM/BEiT shared relative position bias: one table for all blocks, zeros at init."""
  grid: int
  num_heads: int
  param_dtype: Dtype = jnp.float32

  @nn.compact
  def __call__(self):
    num = (2 * self.grid - 1) ** 2 + 3
    table = self.param("table", nn.initializers.zeros, (num, self.num_heads), self.param_dtype)
    idx = relative_position_index(self.grid)
    bias = table[idx.reshape(-1)].reshape(idx.shape + (self.num_heads,))
    return bias.transpose(2, 0, 1)[None]  # [1, heads, n, n]


class ViT(nn.Module):
  """ViT backbone: patch embed, cls token, position information, blocks, final norm.

  `__call__(images, mask=None, keep_ids=None, deterministic=True, between_blocks=None,
  with_cls=True)` returns all tokens [B, 1+L', D] after the final norm, cls first.
    images          [B, H, W, C], H and W multiples of the patch. At `image_size` the position
                    table is used as it is; at any other size it is interpolated as DINO /
                    iBOT's `interpolate_pos_encoding` does (`interpolate_pos_embed`: iBOT's
                    local crops). A shared relative position bias exists at `image_size` only.
    mask            [B, L] (1 = masked) swaps masked patch embeddings for a learnable mask
                    token before the position embedding is added (SimMIM, iBOT).
    keep_ids        [B, K] keeps only those patches (MAE); [M, B, K] makes M masked copies of
                    every image from one patch embedding, mask-major (B' = M B, row m B + b
                    is image b under mask m: ExtreMA).
    with_cls        False: no cls token, the blocks run on the patch tokens alone and the call
                    returns [B, K, D] (PCAE's teacher).
    between_blocks  (i, x, ids) -> (x, ids), applied after block i (see `Encoder`): ids start
                    as the patch positions of the blocks' patch tokens (`keep_ids`, else
                    0 .. L-1); when the blocks carry the cls token it is x[:, 0] and ids cover
                    x[:, 1:]. The call then returns (tokens, ids) (PCAE's teacher drops tokens
                    this way).

  With `class_attention_layers` > 0 it is CaiT's class-attention ViT as ExtreMA uses it
  (microsoft/ExtreMA vits.py `VisionTransformer`, facebookresearch/deit cait_models.py): the
  plain blocks carry the patch tokens only and end without a norm; the cls token, without
  position embedding, is then built by that many `ClassAttentionBlock`s (layer scale
  `ca_init_values`, no drop path) attending to [cls, tokens]; one LayerNorm over [cls,
  tokens] ends it. Its parameters: patch_embed, cls_token, encoder/blockNN, ca_blockNN, norm.

  With `tubelet` > 0 it is VideoMAE's space-time ViT (MCG-NJU/VideoMAE modeling_pretrain.py,
  modeling_finetune.py): `images` are clips [B, T, H, W, C], cut into tubelet x patch x patch
  cubes (`PatchEmbed`, a Conv3d), T/t * h * w tokens in (t, h, w) order under joint space-time
  attention; `keep_ids` and `mask` index that flattened token axis as they index an image's
  patches. VideoMAE's position information is `pos_embed='sinusoid'`: the fixed 1-D table of
  `sinusoid_table` over all T/t * h * w tokens (MAE-ST's separable space and time tables are not
  VideoMAE's and are not here), and it has no cls token (`cls_token=False`). `num_frames` fixes
  T (0: any T the tubelet divides; a 'learned' table needs it). A clip must come at
  `image_size` (the official patch embed asserts it): no table is interpolated.

  `cls_token=False` builds no cls token at all: the blocks carry the patch tokens alone and the
  call returns [B, L', D] (VideoMAE; `pool`'s 'mean' then averages every token).

  Applied with `mutable=["intermediates"]` it also returns each block's output
  (`encoder/block_outputs`, before the final norm) and attention maps
  (`encoder/blockNN/attn/attention`, [B, heads, N, N]).
  """
  variant: str = "tiny"
  depth: int = 0                   # 0 = the variant's depth; >0 overrides it (small CPU runs)
  patch_size: int = 16
  image_size: int = 224
  pos_embed: str = "sincos"        # 'sincos' (fixed), 'learned' or 'none'
  rel_pos_bias: str = "none"       # 'none' or 'shared'
  qkv_bias: str = "qkv"
  init_values: Optional[float] = None
  init_style: str = "xavier"             # 'xavier' (MAE) or 'beit' (SimMIM)
  drop_path: float = 0.0
  use_mask_token: bool = False
  remat: bool = False
  attn_impl: Optional[str] = None
  attn_pad: int = -1                     # -1: 2 with cuDNN, none otherwise (see `attention`)
  dtype: Dtype = jnp.float32
  param_dtype: Dtype = jnp.float32
  qkv_proj: str = "fused"                # 'fused' or 'split' (see `Attention`)
  # The residual stream's dtype inside the blocks. float32 (the default) matches PyTorch
  # autocast; bfloat16 halves the stream's memory traffic and rounds every residual add.
  residual_dtype: Dtype = jnp.float32
  ln_impl: str = "flax"                  # the LayerNorms: 'flax' or 'recompute'
  remat_policy: str = "full"             # with remat: see REMAT_POLICIES
  class_attention_layers: int = 0        # > 0: CaiT / ExtreMA class-attention blocks (above)
  ca_init_values: float = 0.1            # their layer scale's initial value
  # The patch projection's bias init: 'zeros' (timm / MAE) or 'torch', PyTorch's Conv2d
  # default U(+-1/sqrt(fan_in)) (ExtreMA, which leaves the conv's bias as PyTorch made it).
  patch_bias_init: str = "zeros"
  drop_path_rule: str = "linear"         # the blocks' drop-path rates: see drop_path_rates
  num_heads: int = 0                     # 0: the variant's (MoCo v3's ViT-S has 12, DeiT's 6)
  # The patch projection's kernel init: 'xavier' (MAE; 'beit' init_style: trunc-normal .02) or
  # 'torch', PyTorch's Conv default U(+-1/sqrt(fan_in)) (VideoMAE leaves its Conv3d as made).
  patch_kernel_init: str = "default"
  cls_token: bool = True                 # False: no cls token (VideoMAE)
  tubelet: int = 0                       # > 0: clips [B, T, H, W, C] in t x p x p cubes (above)
  num_frames: int = 0                    # with tubelet: T (0 = the input's)

  @property
  def grid(self) -> int:
    return self.image_size // self.patch_size

  @property
  def width(self) -> int:
    return variant(self.variant)[0]

  @nn.compact
  def __call__(self, images, mask=None, keep_ids=None, deterministic=True, between_blocks=None,
               with_cls=True):
    width, depth, heads = variant(self.variant)
    depth = self.depth or depth
    heads = self.num_heads or heads
    if width % heads:
      raise ValueError(f"config.model.num_heads={heads} does not divide the width {width}")
    beit = self.init_style == "beit"
    cait = self.class_attention_layers > 0
    has_cls = self.cls_token
    if cait and not (with_cls and has_cls):
      raise ValueError("a class-attention ViT's output is built from its cls token: call it with "
                       "with_cls=True (and model.cls_token=True)")
    video = self.tubelet > 0
    p = self.patch_size
    if images.ndim != (5 if video else 4):
      raise ValueError(
          f"model.tubelet={self.tubelet} takes clips [B, T, H, W, C], got shape {images.shape}: use "
          "video data (input.data.name='embedded_clips')" if video else
          f"the ViT takes images [B, H, W, C], got shape {images.shape}: for clips set "
          "model.tubelet (2 in VideoMAE)")
    cube = p * p * images.shape[-1] * (self.tubelet if video else 1)
    if self.patch_bias_init == "zeros":
      bias_init = nn.initializers.zeros
    elif self.patch_bias_init == "torch":
      bias_init = torch_default_uniform(cube)
    else:
      raise ValueError(f"patch_bias_init must be 'zeros' or 'torch', got {self.patch_bias_init!r}")
    if self.patch_kernel_init == "default":
      kernel_init = trunc_normal(0.02, cutoff=1.0) if beit else xavier_uniform
    elif self.patch_kernel_init == "torch":
      kernel_init = torch_default_uniform(cube)
    else:
      raise ValueError(f"patch_kernel_init must be 'default' or 'torch', got {self.patch_kernel_init!r}")
    x = PatchEmbed(p, width, kernel_init=kernel_init, bias_init=bias_init, dtype=self.dtype,
                   param_dtype=self.param_dtype, tubelet=self.tubelet, name="patch_embed")(images)
    # Embeddings are summed in float32; the blocks carry the residual stream in `residual_dtype`
    # (float32 by default, as under torch autocast) and compute in `dtype`.
    x = x.astype(jnp.float32)
    b, n, _ = x.shape
    grid_h, grid_w = images.shape[-3] // p, images.shape[-2] // p
    if video:
      frames = self.num_frames or images.shape[1]
      if images.shape[1] != frames or (grid_h, grid_w) != (self.grid, self.grid):
        raise ValueError(f"this video ViT is built for {frames}-frame clips at {self.image_size} "
                         f"px, got {images.shape[1]} frames of {images.shape[2]}x{images.shape[3]}: "
                         "resize the clips to input.image_size and set input.data.num_frames")
    if self.use_mask_token:
      # SimMIM: trunc_normal_(std=.02, a=-.02, b=.02), i.e. cut at one std.
      tok = self.param("mask_token", trunc_normal(0.02, cutoff=1.0), (1, 1, width), self.param_dtype)
      if mask is not None:
        w = mask.reshape(b, n, 1).astype(x.dtype)
        x = x * (1 - w) + tok.astype(x.dtype) * w
    cls = None
    if has_cls:
      cls_init = trunc_normal(0.02, cutoff=1.0) if beit else nn.initializers.normal(0.02)
      cls = self.param("cls_token", cls_init, (1, 1, width), self.param_dtype).astype(x.dtype)
    # The position table of the model's own tokens, a cls row first when there is a cls token.
    extra = int(has_cls)
    own = n if video else self.grid ** 2
    if self.pos_embed == "sincos":
      if video:
        raise ValueError("pos_embed='sincos' is the 2-D image table: use 'sinusoid' (VideoMAE) "
                         "or 'learned' for clips")
      pe = jnp.asarray(sincos_2d(width, self.grid, cls_token=True))[None][:, 1 - extra:]
    elif self.pos_embed == "sinusoid":
      pe = jnp.asarray(np.concatenate([np.zeros((extra, width), np.float32),
                                       sinusoid_table(own, width)]))[None]
    elif self.pos_embed == "learned":
      if video and not self.num_frames:
        raise ValueError("a learned position table for clips needs model.num_frames (the "
                         "clip length it is built for)")
      pe = self.param("pos_embed", trunc_normal(0.02, cutoff=1.0 if beit else 2.0),
                      (1, own + extra, width), self.param_dtype)
    elif self.pos_embed == "none":
      pe = None
    else:
      raise ValueError(f"pos_embed must be 'sincos', 'sinusoid', 'learned' or 'none', got "
                       f"{self.pos_embed!r}")
    if pe is not None:
      patch_pe = pe[:, extra:]
      if not video and (grid_h, grid_w) != (self.grid, self.grid):
        if self.pos_embed == "sinusoid":
          raise ValueError(f"pos_embed='sinusoid' numbers the tokens of {self.image_size}px "
                           f"inputs: resize the {images.shape[1]}x{images.shape[2]} images to "
                           "input.image_size")
        # Interpolated as DINO / iBOT do (a cls row in front, which interpolation keeps).
        patch_pe = interpolate_pos_embed(
            jnp.concatenate([jnp.zeros_like(patch_pe[:, :1]), patch_pe], axis=1),
            self.grid, grid_h, grid_w)[:, 1:]
      x = x + patch_pe.astype(x.dtype)
      if has_cls and not cait:         # CaiT: the cls token gets no position embedding
        cls = cls + pe[:, :1].astype(x.dtype)
    if keep_ids is not None:
      if keep_ids.ndim == 3:           # M masked copies, mask-major
        x = jnp.concatenate([take_rows(x, ids) for ids in keep_ids], axis=0)
        keep_ids = keep_ids.reshape(-1, keep_ids.shape[-1])
      else:
        x = take_rows(x, keep_ids)
    ids = None
    if between_blocks is not None:
      ids = keep_ids if keep_ids is not None else jnp.broadcast_to(jnp.arange(n), (b, n))
    if has_cls:
      cls = jnp.broadcast_to(cls, (x.shape[0], 1, width))
    if with_cls and has_cls and not cait:
      x = jnp.concatenate([cls, x], axis=1)
    bias = None
    if self.rel_pos_bias == "shared":
      if keep_ids is not None:
        raise ValueError("a shared relative position bias needs all tokens (no keep_ids)")
      if (grid_h, grid_w) != (self.grid, self.grid):
        raise ValueError(f"a shared relative position bias is built for image_size={self.image_size}: "
                         f"got {images.shape[1]}x{images.shape[2]} images (resize them)")
      if cait or not (with_cls and has_cls):
        raise ValueError("a shared relative position bias covers the cls token: use "
                         "rel_pos_bias='none' without a cls token in the blocks")
      bias = RelativePositionBias(self.grid, heads, self.param_dtype, name="rel_pos_bias")()
    elif self.rel_pos_bias != "none":
      raise ValueError(f"rel_pos_bias must be 'none' or 'shared', got {self.rel_pos_bias!r}")
    x = Encoder(depth, heads, 4.0, self.qkv_bias, self.init_values, self.drop_path, self.init_style,
                self.remat, self.attn_impl, not cait, self.dtype, self.param_dtype,
                self.attn_pad, self.qkv_proj, self.ln_impl, self.remat_policy,
                drop_path_rule=self.drop_path_rule, name="encoder")(
                    x.astype(self.residual_dtype), bias, deterministic, between_blocks, ids)
    if between_blocks is not None:
      x, ids = x
    if cait:
      for i in range(self.class_attention_layers):
        cls = ClassAttentionBlock(heads, self.ca_init_values, 4.0, self.dtype, self.param_dtype,
                                  self.ln_impl, name=f"ca_block{i:02d}")(x, cls)
      x = layer_norm("norm", self.param_dtype, impl=self.ln_impl)(jnp.concatenate([cls, x], axis=1))
    return x if between_blocks is None else (x, ids)


def pool(tokens: jax.Array, pooling: str, has_cls: bool = True) -> jax.Array:
  """Image features from ViT tokens: 'cls' token, or 'mean' over patch tokens ('cls_normed':
  the cls token; of final-norm tokens it is 'cls'). Without a cls token (`has_cls=False`,
  VideoMAE) 'mean' averages every token and 'cls' is an error."""
  if pooling in ("cls", "cls_normed"):
    if not has_cls:
      raise ValueError(f"pooling={pooling!r} reads the cls token, and this ViT has none "
                       "(model.cls_token=False): set config.pooling='mean'")
    return tokens[:, 0]
  if pooling == "mean":
    return (tokens[:, 1:] if has_cls else tokens).mean(axis=1)
  raise ValueError(f"pooling must be 'cls' or 'mean', got {pooling!r}")


def check_config(model_cfg) -> None:
  """ValueError (one line) for an unknown variant or execution option value."""
  variant(model_cfg.get("variant", "tiny"))
  check_execution_options(model_cfg)
  tubelet = int(model_cfg.get("tubelet", 0) or 0)
  if tubelet < 0:
    raise ValueError(f"config.model.tubelet={tubelet}: use 0 (images) or the frames per cube (2)")
  if tubelet and model_cfg.get("pos_embed", "sincos") == "sincos":
    raise ValueError("config.model.pos_embed='sincos' is the 2-D image table: use 'sinusoid' "
                     "(VideoMAE) or 'learned' with model.tubelet > 0")


def outputs(model: ViT, variables, images, *, pooling: str, layers: bool = False) -> dict:
  """The evaluation-mode named outputs of `model` (the contract of `mim_jax.models`):
  'tokens' (final-norm, cls first), 'pooled' (`pool` of them), 'stride' (the patch), 'grid',
  and with `layers` every block's pooled output before the final norm, then 'pooled'. The
  plain blocks of a class-attention ViT carry no cls token: their outputs are mean-pooled."""
  if layers:
    tokens, inter = model.apply(variables, images, mutable=["intermediates"])
    blocks = list(inter["intermediates"]["encoder"]["block_outputs"])
  else:
    tokens = model.apply(variables, images)
  out = _named(model, tokens, images, pooling)
  pooled = out["pooled"]
  if layers:
    if model.class_attention_layers:
      out["layers"] = [t.mean(axis=1).astype(jnp.float32) for t in blocks] + [pooled]
    elif pooling == "cls_normed" and model.cls_token:
      # Each block's cls token through the encoder's final LayerNorm (DINO / iBOT's
      # get_intermediate_layers): the last block's is 'pooled' itself.
      norm = layer_norm("norm", model.param_dtype, impl=model.ln_impl)
      norm_params = {"params": variables["params"]["encoder"]["norm"]}
      out["layers"] = [norm.apply(norm_params, t[:, 0]).astype(jnp.float32) for t in blocks] + [pooled]
    else:
      out["layers"] = [pool(t, pooling, model.cls_token).astype(jnp.float32) for t in blocks] + [pooled]
  return out


def forward(model: ViT, variables, images, *, train: bool, rng=None,
            pooling: str = "cls", mask=None) -> tuple[dict, dict]:
  """The training-or-evaluation forward of the registry contract: ('tokens', 'pooled',
  'stride', 'grid' as `outputs`; {} — a ViT keeps no collection besides its parameters).
  In training, `rng` drives drop path (needed when model.drop_path > 0); `mask` [B, h, w]
  or [B, L] swaps the masked patch embeddings for the mask token."""
  rngs = {"dropout": rng} if train and rng is not None else None
  tokens = model.apply(variables, images, mask=mask, deterministic=not train, rngs=rngs)
  return _named(model, tokens, images, pooling), {}


def _named(model: ViT, tokens: jax.Array, images: jax.Array, pooling: str) -> dict:
  """'tokens', 'pooled', 'stride', 'grid' of the final-norm tokens ('grid' of a clip: (T/t, h,
  w))."""
  p = model.patch_size
  grid = (images.shape[-3] // p, images.shape[-2] // p)
  if model.tubelet:
    grid = (images.shape[1] // model.tubelet,) + grid
  return {"tokens": tokens.astype(jnp.float32),
          "pooled": pool(tokens, pooling, model.cls_token).astype(jnp.float32),
          "stride": p, "grid": grid}


def summary(model_cfg, image_size: int) -> str:
  """'ViT-tiny, 6 blocks, patch 4, 32 px' (the run header)."""
  depth = int(model_cfg.get("depth", 0)) or variant(model_cfg.variant)[1]
  tubelet = int(model_cfg.get("tubelet", 0) or 0)
  cube = f"{tubelet}x{model_cfg.patch_size}x{model_cfg.patch_size} cubes" if tubelet else \
      f"patch {model_cfg.patch_size}"
  return f"ViT-{model_cfg.variant}, {depth} blocks, {cube}, {image_size} px"


def from_config(model_cfg, image_size: int, **overrides) -> ViT:
  """Builds the ViT `config.model` describes (`models.build` with model.name='vit')."""
  kw = dict(
      variant=model_cfg.variant,
      depth=model_cfg.get("depth", 0),
      patch_size=model_cfg.patch_size,
      image_size=image_size,
      pos_embed=model_cfg.get("pos_embed", "sincos"),
      rel_pos_bias=model_cfg.get("rel_pos_bias", "none"),
      qkv_bias=model_cfg.get("qkv_bias", "qkv"),
      init_values=model_cfg.get("init_values", 0.0) or None,   # 0 = no layer scale
      init_style=model_cfg.get("init_style", "xavier"),
      drop_path=model_cfg.get("drop_path", 0.0),
      **execution_options(model_cfg),
      num_heads=int(model_cfg.get("num_heads", 0) or 0),
      cls_token=bool(model_cfg.get("cls_token", True)),
      tubelet=int(model_cfg.get("tubelet", 0) or 0),
      num_frames=int(model_cfg.get("num_frames", 0) or 0),
  )
  kw.update(overrides)
  return ViT(**kw)


def execution_options(model_cfg) -> dict:
  """The model config's execution options (how blocks run, not what they compute), as the
  keyword arguments of `ViT`, `Encoder` and the decoders built on them (MAE's, VideoMAE's)."""
  return dict(
      remat=model_cfg.get("remat", False),
      attn_impl=model_cfg.get("attn_impl", "") or None,         # '' = JAX's choice
      attn_pad=model_cfg.get("attn_pad", -1),
      dtype=jnp.dtype(model_cfg.get("dtype", "float32")),
      param_dtype=jnp.dtype(model_cfg.get("param_dtype", "float32")),
      qkv_proj=model_cfg.get("qkv_proj", "fused"),
      residual_dtype=jnp.dtype(model_cfg.get("residual_dtype", "float32")),
      ln_impl=model_cfg.get("layer_norm", "flax"),
      remat_policy=model_cfg.get("remat_policy", "full"),
  )


vit_from_config = from_config   # the name before the models registry
