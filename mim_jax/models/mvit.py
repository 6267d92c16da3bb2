"""A Flax linen MViTv2 for images, equal to facebookresearch/mvit's (Li et al., CVPR 2022).

The network of facebookresearch/mvit `mvit/models/mvit_model.py` (MViT), `attention.py`
(MultiScaleBlock, MultiScaleAttention, attention_pool, cal_rel_pos_spatial) and
`common.py` (Mlp, DropPath, round_width), configured as `configs/MVITv2_{T,S,B}.yaml` and
`configs/test/MVITv2_L_test.yaml`, without the classification head:

  * patch embedding: a Conv2d 7x7, stride 4, padding 3 (PATCH_KERNEL / STRIDE / PADDING), the
    output flattened to tokens row-major; no cls token and no absolute position embedding in
    the image models (CLS_EMBED_ON and USE_ABS_POS default False in mvit/config/defaults.py;
    both are options here: `cls_token`, `abs_pos`, a learned table added after the cls token
    is prepended, as MViT.forward);
  * four stages. A stage transition (DIM_MUL / HEAD_MUL 2.0 at the block that starts stages 2,
    3, 4) doubles the width and the heads (`round_width`, with its divisor) and pools the
    queries with stride 2 (POOL_Q_STRIDE); every block lists a query stride (1 or 2), so every
    block pools q, k and v with a 3x3 depthwise convolution (POOL_KVQ_KERNEL, padding 1, no
    bias, one kernel shared by the heads: mode 'conv') followed by a LayerNorm over the head
    dimension that also normalises the cls token (`attention_pool`); pooling is skipped only
    for kernel 1 and stride 1. Keys and values are pooled with the adaptive stride
    (POOL_KV_STRIDE_ADAPTIVE [4, 4]: 4, divided by the query stride of every block up to and
    including this one, at least 1), applied to the block's input: at 224 px the key / value
    grid is 14x14 in stage 1, 28x28 in the first block of stages 2 and 3 (its input is not yet
    pooled), 14x14 in the rest of stages 2 and 3 and in the first block of stage 4, 7x7 after;
  * the attention: qkv = Linear(dim, 3 * dim_out) (qkv bias), heads of dim_out / heads
    channels, softmax(q k^T / sqrt(head dim) + decomposed relative position bias) v, the
    residual pooling connection (the pooled q added to the output at the spatial tokens, not
    the cls token: RESIDUAL_POOLING), then proj = Linear(dim_out, dim_out);
  * the decomposed relative position bias (REL_POS_SPATIAL, `cal_rel_pos_spatial`): per block
    two tables rel_pos_h, rel_pos_w of 2 * max(q size, kv size) - 1 rows by head dim; for
    query (qy, qx) and key (ky, kx) the logit gains q . Rh[dist_h(qy, ky)] + q . Rw[dist_w(qx,
    kx)] with dist(i, j) = i * max(k / q, 1) - j * max(q / k, 1) + (k - 1) * max(q / k, 1)
    (truncated to an integer), the unscaled pooled q, and nothing for rows or columns of the
    cls token (`rel_pos_bias`);
  * the block (MultiScaleBlock): x_norm = norm1(x); the skip path is x, projected by
    Linear(dim, dim_out) of x_norm when the width changes in the attention (DIM_MUL_IN_ATT,
    T/S/B), max-pooled (kernel stride + 1, padding (stride + 1) // 2) when the queries are
    pooled; x = skip + drop_path(attn); then x + drop_path(mlp(norm2(x))) with the MLP
    Linear-GELU-Linear of ratio 4 over the attention width. Without DIM_MUL_IN_ATT (L) the
    width changes in the MLP of the block before the transition and the skip is
    Linear(dim, dim_out) of norm2's output;
  * a final LayerNorm. All LayerNorms have eps 1e-6; drop path rates rise linearly from 0 to
    `drop_path` over the blocks (stochastic depth, per sample).

Initialisation as the official: every Linear weight trunc_normal_(std=.02) (bounds +-2, i.e.
+-100 std: a plain N(0, .02^2)) with zero bias, LayerNorm 1 / 0, rel_pos_h / rel_pos_w, the cls
token and position table trunc_normal_(std=.02); the patch and pooling convolutions keep
PyTorch's default Conv2d init, U(+-1/sqrt(fan_in)) for weight and bias (mvit's _init_weights
touches Linear and LayerNorm only). The mask token (`use_mask_token`, MaskFeat) is
trunc_normal_(std=.02) as SlowFast's MaskMViT.

Parameter counts with a 1000-class head at 224 px equal the released models' (MViTv2-T
24,173,320, -S 34,870,216, -B 51,472,744, -L 217,992,952: 24.2M, 34.9M, 51.5M, 218.0M as timm's
model cards of the official checkpoints list them; tests/test_mvit.py). The paper's Table
lists 34.5M, 51.2M and 217.6M for S, B and L, which neither the released code nor its
checkpoints have (mvitv2_small's float32 weights are 140 MB: 35M).

Video (`num_frames` > 0): SlowFast's MViT on clips [B, T, H, W, C] (slowfast/models/
video_model_builder.py MViT, attention.py), as configs/Kinetics/MVITv2_S_16x4.yaml and
MVITv2_B_32x3.yaml set it: the patch embedding is a Conv3d (`patch_kernel_t` 3, `patch_stride_t`
2, `patch_padding_t` 1: T / 2 token frames, time-major tokens); every pooling convolution is
3-D (POOL_KVQ_KERNEL [3, 3, 3]: `pool_kernel_t` 3, padding 1, time stride 1, as the published
configs' POOL_Q_STRIDE and POOL_KV_STRIDE_ADAPTIVE [1, 8, 8] have it: set `kv_stride` 8); the
skip path's max-pool is per frame (MaxPool3d kernel 1 in time); REL_POS_TEMPORAL adds a
rel_pos_t table of 2 T' - 1 rows per block (`rel_pos_temporal`), q . rel_pos_t[dist_t(qt, kt)]
(`cal_rel_pos_temporal`); a mask [B, T' m m] is upsampled frame by frame (MaskMViT
interpolates in space only). The Kinetics MViTv2-S 16x4 has 34,230,144 parameters without its
head (34.5M with the 400-class head, the MViTv2 paper's; tests/test_mvit_video.py). SlowFast's
video MViT initialises differently from facebookresearch/mvit (Conv weights N(0, .02), Linear
and LayerNorm biases .02): methods/maskfeat.py `official_init` applies that rule.

Deviations (none changes the function):
  * the input must be the `image_size` the model was built for (the official model asserts
    TRAIN_CROP_SIZE == TEST_CROP_SIZE and sizes its tables from it), and every pooled grid
    must be the official `size // stride` (a ValueError otherwise; SlowFast interpolates the
    relative position tables for other sizes, facebookresearch/mvit does not);
  * the attention runs through `jax.nn.dot_product_attention` (vit.attention, `attn_impl`) with
    the relative position term as its bias: the official logits + bias, softmax, times v;
  * the depthwise pooling convolutions are computed as k * k shifted multiply-adds
    (`depthwise_conv`: the same sum in another order; XLA's grouped convolution is ~3x slower
    on CPU), with nn.Conv's kernel layout;
  * compute in `dtype` (bfloat16 on accelerators) with the LayerNorms, the residual stream
    and the attention softmax in float32, as torch autocast keeps them.

Layout NHWC. `__call__(images, mask=None, train=False, features_only=False)` returns the
final-norm tokens [B, (1 +) h * w, C] float32, cls first when the model has one; each block's
output (before the final norm) is sown to 'intermediates' ('block_outputs') when that
collection is mutable. `mask` [B, m * m] (1 = masked) swaps masked patch embeddings for the
mask token, upsampled to the patch grid by nearest neighbour as MaskMViT does. `train=True`
applies drop path (rng 'dropout' when drop_path > 0). `features_only` is accepted for the CNN
call of mim_jax (the model has no head, so it changes nothing).

Beside the registry's five names: `plan` (every block's geometry), `layer_ids` (the official
layer ids for layer-wise lr decay, the hook mim_jax.optim asks), `adapt_pretrained` (relative
position tables resized for fine-tuning as SlowFast loads them), `param_count`.
"""
from __future__ import annotations

import math
import re
from typing import Any, NamedTuple, Optional

import flax.linen as nn
import jax
import jax.numpy as jnp
import ml_collections
from ml_collections.config_dict import placeholder
import numpy as np

from mim_jax.models import vit

Dtype = Any

# name -> (embed dim, heads, blocks per stage, DIM_MUL_IN_ATT): configs/MVITv2_T.yaml,
# MVITv2_S.yaml, MVITv2_B.yaml (DIM_MUL at blocks 1/3/8, 1/3/14, 2/5/21) and
# configs/test/MVITv2_L_test.yaml (EMBED_DIM 144, NUM_HEADS 2, DIM_MUL at 2/8/44,
# DIM_MUL_IN_ATT False).
VARIANTS = {
    "tiny": (96, 1, (1, 2, 5, 2), True),
    "small": (96, 1, (1, 2, 11, 2), True),
    "base": (96, 1, (2, 3, 16, 3), True),
    "large": (144, 2, (2, 6, 36, 4), False),
}
ALIASES = {"t": "tiny", "s": "small", "b": "base", "l": "large"}
POOLINGS = ("cls", "mean")
ATTN_IMPLS = ("", None, "xla", "cudnn")
DTYPES = ("float32", "bfloat16", "float16")

_NORMAL_02 = vit.timm_trunc_normal(0.02)


def variant(name: str) -> tuple[int, int, tuple[int, ...], bool]:
  key = ALIASES.get(str(name).lower(), str(name).lower())
  if key not in VARIANTS:
    raise ValueError(f"config.model.variant={name!r}: use one of {', '.join(VARIANTS)} "
                     f"(or {', '.join(ALIASES)})")
  return VARIANTS[key]


def round_width(width: float, multiplier: float, min_width: int = 1, divisor: int = 1) -> int:
  """mvit/models/common.py `round_width`: width * multiplier rounded to a multiple of divisor
  (at least min_width, one divisor more when rounding lost over 10%)."""
  if not multiplier:
    return int(width)
  width = width * multiplier
  min_width = min_width or divisor
  out = max(min_width, int(width + divisor / 2) // divisor * divisor)
  if out < 0.9 * width:
    out += divisor
  return int(out)


# ---------------------------------------------------------------------------------------------
# The per-block geometry (`_prepare_mvit_configs` and the block loop of MViT.__init__).

class BlockSpec(NamedTuple):
  """One MultiScaleBlock: widths, heads, pooling kernels (0 = no pooling) and strides, and the
  token grids it reads and writes."""
  dim: int                   # input width
  dim_out: int               # output width
  att_dim: int               # the attention's width (dim_out with DIM_MUL_IN_ATT, else dim)
  heads: int
  q_kernel: int
  q_stride: int
  kv_kernel: int
  kv_stride: int
  grid_in: int               # input grid side
  grid_q: int                # output (pooled query) grid side
  grid_kv: int               # pooled key / value grid side
  rel_pos_size: int          # rows of rel_pos_h / rel_pos_w: 2 * max(q size, kv size) - 1
  frames: int = 1            # the token grid's time length (1: images; no temporal stride)
  pool_kernel_t: int = 1     # the pooling convolutions' time extent (3 in SlowFast's video)
  rel_pos_t_size: int = 0    # rows of rel_pos_t (2 * frames - 1), 0 without REL_POS_TEMPORAL

  @property
  def head_dim(self) -> int:
    return self.att_dim // self.heads


def patch_grid(image_size: int, kernel: int, stride: int, padding: int) -> int:
  """The patch embedding's output side: floor((size + 2 padding - kernel) / stride) + 1."""
  return (image_size + 2 * padding - kernel) // stride + 1


def _pooled(size: int, kernel: int, stride: int) -> int:
  """A pooling convolution's output side (padding kernel // 2)."""
  return (size + 2 * (kernel // 2) - kernel) // stride + 1


def plan(image_size: int, embed_dim: int, num_heads: int, stage_blocks: tuple[int, ...],
         stage_strides: tuple[int, ...], patch_kernel: int = 7, patch_stride: int = 4,
         patch_padding: int = 3, pool_kernel: int = 3, kv_stride: int = 4,
         dim_mul_in_att: bool = True, num_frames: int = 0, patch_kernel_t: int = 3,
         patch_stride_t: int = 2, patch_padding_t: int = 1, pool_kernel_t: int = 3,
         rel_pos_temporal: bool = True) -> tuple[BlockSpec, ...]:
  """Every block's BlockSpec, as MViT.__init__ derives it from the yaml.

  The stage transitions are the first blocks of stages 2.., with DIM_MUL = HEAD_MUL = 2.0
  there and query stride `stage_strides[j]` (1 keeps the grid, as MaskFeat's MViT at its last
  transition); every other block has query stride 1. Every block pools q with `pool_kernel`
  and k, v with the adaptive stride (`kv_stride`, divided by each query stride on the way,
  at least 1), unless kernel and stride are both 1. ValueError (one line) when a pooled grid
  is not the official `size // stride` (an image size the strides do not divide).

  With `num_frames` > 0 the blocks of SlowFast's video MViT (clips of `num_frames` frames):
  the patch embedding's time axis (`patch_kernel_t`, `patch_stride_t`, `patch_padding_t`) gives
  `frames` = num_frames // patch_stride_t token frames (the official assertion), every pooling
  convolution spans `pool_kernel_t` frames with time stride 1 (the published configs' q and
  adaptive kv strides are 1 in time), and `rel_pos_temporal` adds a rel_pos_t table of
  2 * frames - 1 rows."""
  depth = sum(stage_blocks)
  starts = np.cumsum(stage_blocks)[:-1].tolist()
  dim_mul = [1.0] * (depth + 1)
  head_mul = [1.0] * (depth + 1)
  q_strides = [1] * depth
  for j, b in enumerate(starts):
    dim_mul[b] = head_mul[b] = 2.0
    q_strides[b] = int(stage_strides[j])
  grid = patch_grid(image_size, patch_kernel, patch_stride, patch_padding)
  frames, kt = 1, 1
  if num_frames:
    frames, kt = patch_grid(num_frames, patch_kernel_t, patch_stride_t, patch_padding_t), pool_kernel_t
    if frames != num_frames // patch_stride_t or kt % 2 == 0:
      raise ValueError(f"{num_frames} frames through the {patch_kernel_t}-frame patch kernel "
                       f"(stride {patch_stride_t}, padding {patch_padding_t}) give {frames} token "
                       f"frames, not {num_frames} // {patch_stride_t}, or pool_kernel_t={kt} is "
                       "even: use SlowFast's (3, 2, 1) with an even frame count and kernel 3")
  rel_t = 2 * frames - 1 if num_frames and rel_pos_temporal else 0
  heads, dim, kv = num_heads, embed_dim, kv_stride
  specs = []
  for i in range(depth):
    heads = round_width(heads, head_mul[i])
    if dim_mul_in_att:
      dim_out = round_width(dim, dim_mul[i], divisor=round_width(heads, head_mul[i]))
    else:
      dim_out = round_width(dim, dim_mul[i + 1], divisor=round_width(heads, head_mul[i + 1]))
    sq = q_strides[i]
    kv = max(kv // sq, 1)
    q_kernel = 0 if pool_kernel == 1 and kt == 1 and sq == 1 else pool_kernel
    kv_kernel = 0 if pool_kernel == 1 and kt == 1 and kv == 1 else pool_kernel
    grid_q = _pooled(grid, q_kernel, sq) if q_kernel else grid
    grid_kv = _pooled(grid, kv_kernel, kv) if kv_kernel else grid
    if grid_q != grid // sq or grid_kv != grid // kv:
      raise ValueError(f"image_size={image_size} gives a {grid}x{grid} grid at block {i}, which "
                       f"query stride {sq} / key-value stride {kv} do not divide: use an image "
                       f"size whose patch grid the stage strides divide (224 at stride 4)")
    att_dim = dim_out if dim_mul_in_att else dim
    if att_dim % heads:
      raise ValueError(f"block {i}: width {att_dim} is not divisible by its {heads} heads: "
                       f"change config.model.embed_dim or num_heads")
    specs.append(BlockSpec(dim, dim_out, att_dim, heads, q_kernel, sq, kv_kernel, kv, grid,
                           grid_q, grid_kv, 2 * max(grid // sq, grid // kv) - 1, frames, kt,
                           rel_t))
    grid, dim = grid_q, dim_out
  return tuple(specs)


# ---------------------------------------------------------------------------------------------
# Pure functions of the attention.

def rel_pos_distances(q_size: int, k_size: int) -> np.ndarray:
  """[q_size, k_size] int table indices of `cal_rel_pos_spatial`: i * max(k/q, 1) -
  j * max(q/k, 1) + (k - 1) * max(q/k, 1), in float32 as torch computes it, truncated."""
  q_ratio = np.float32(max(k_size / q_size, 1.0))
  k_ratio = np.float32(max(q_size / k_size, 1.0))
  dist = (np.arange(q_size, dtype=np.float32)[:, None] * q_ratio
          - np.arange(k_size, dtype=np.float32)[None, :] * k_ratio)
  dist = dist + np.float32(k_size - 1) * k_ratio
  return dist.astype(np.int64)


def rel_pos_bias(q: jax.Array, rel_pos_h: jax.Array, rel_pos_w: jax.Array, q_grid: int,
                 k_grid: int, has_cls: bool, rel_pos_t: Optional[jax.Array] = None,
                 frames: int = 1) -> jax.Array:
  """The decomposed relative position term of the attention logits, [B, heads, Nq, Nk].

  q [B, Nq, heads, D] (the pooled, normalised, unscaled queries, cls first when `has_cls`;
  `frames` x q_grid x q_grid tokens, time-major); entry (qt qy qx, kt ky kx) is
  q . rel_pos_h[dist_h(qy, ky)] + q . rel_pos_w[dist_w(qx, kx)] (+ q . rel_pos_t[dist_t(qt,
  kt)] with a `rel_pos_t` table; q and k have the same frames), zero in the cls row and column
  (`cal_rel_pos_spatial` and `cal_rel_pos_temporal` of SlowFast / facebookresearch/mvit)."""
  s = 1 if has_cls else 0
  b, _, h, d = q.shape
  rh = rel_pos_h[rel_pos_distances(q_grid, k_grid)]            # [qh, kh, D]
  rw = rel_pos_w[rel_pos_distances(q_grid, k_grid)]            # [qw, kw, D]
  r_q = q[:, s:].reshape(b, frames, q_grid, q_grid, h, d).astype(jnp.float32)
  rel_h = jnp.einsum("btyxhc,ykc->bhtyxk", r_q, rh.astype(jnp.float32))
  rel_w = jnp.einsum("btyxhc,xkc->bhtyxk", r_q, rw.astype(jnp.float32))
  bias = rel_h[..., None, :, None] + rel_w[..., None, None, :]  # [B, h, qt, qh, qw, kt, kh, kw]
  if rel_pos_t is not None:
    rt = rel_pos_t[rel_pos_distances(frames, frames)]           # [qt, kt, D]
    rel_t = jnp.einsum("btyxhc,tkc->bhtyxk", r_q, rt.astype(jnp.float32))
    bias = bias + rel_t[..., None, None]
  bias = bias.reshape(b, h, frames * q_grid * q_grid, -1)
  if s:
    bias = jnp.pad(bias, ((0, 0), (0, 0), (1, 0), (1, 0)))
  return bias


def attention_pool(t: jax.Array, conv: nn.Module, norm: nn.Module, grid: int,
                   has_cls: bool, frames: int = 1) -> jax.Array:
  """`attention_pool`: t [B, N, heads, D] -> the spatial tokens pooled by `conv` (applied to
  each head's [frames, grid, grid, D] map), the cls token put back in front, then `norm` over
  D (cls included)."""
  s = 1 if has_cls else 0
  b, _, h, d = t.shape
  x = t[:, s:].reshape(b, frames, grid, grid, h, d).transpose(0, 4, 1, 2, 3, 5)  # [B, h, T, g, g, D]
  x = conv(x)
  x = x.transpose(0, 2, 3, 4, 1, 5).reshape(b, -1, h, d).astype(t.dtype)
  if s:
    x = jnp.concatenate([t[:, :1], x], axis=1)
  return norm(x)


def upsample_mask(mask: jax.Array, out: int, frames: int = 1) -> jax.Array:
  """[B, frames * m * m] (square grids, row-major, time-major) -> [B, frames * out * out]
  float32, each frame by torch's F.interpolate(mode='nearest') (source index floor(i * m /
  out) in float32, clamped; MaskMViT interpolates a clip's mask in space only)."""
  m = math.isqrt(mask.shape[1] // frames)
  if frames * m * m != mask.shape[1]:
    raise ValueError(f"a [B, {mask.shape[1]}] mask is not {frames} square grids of patches")
  scale = np.float32(m) / np.float32(out)
  idx = np.minimum(np.floor(np.arange(out, dtype=np.float32) * scale).astype(np.int64), m - 1)
  up = mask.reshape(mask.shape[0], frames, m, m)[:, :, idx][:, :, :, idx]
  return up.reshape(mask.shape[0], frames * out * out).astype(jnp.float32)


def depthwise_conv(x: jax.Array, kernel: jax.Array, stride: int) -> jax.Array:
  """A depthwise cross-correlation with zero padding kernel // 2 (torch's Conv2d with
  groups = channels, no bias): x [..., H, W, C], kernel [k, k, 1, C] (flax's HWIO) ->
  [..., H', W', C], H' = (H + 2 (k // 2) - k) // stride + 1. A kernel [kt, k, k, 1, C] is
  torch's Conv3d over x [..., T, H, W, C] with time stride 1 and padding kt // 2 (the sum of
  the 2-D correlations of the shifted frames).

  Written as k * k shifted, strided multiply-adds rather than a grouped convolution: the same
  sum (in another order), and XLA's CPU backend runs a grouped convolution's backward pass
  about 3x slower than these elementwise products."""
  if kernel.ndim == 5:
    kt, t = kernel.shape[0], x.shape[-4]
    pad = [(0, 0)] * (x.ndim - 4) + [(kt // 2, kt // 2), (0, 0), (0, 0), (0, 0)]
    xp = jnp.pad(x, pad)
    return sum(depthwise_conv(xp[..., dt:dt + t, :, :, :], kernel[dt], stride)
               for dt in range(kt))
  k = kernel.shape[0]
  p = k // 2
  h, w = x.shape[-3], x.shape[-2]
  ho, wo = (h + 2 * p - k) // stride + 1, (w + 2 * p - k) // stride + 1
  pad = [(0, 0)] * (x.ndim - 3) + [(p, p), (p, p), (0, 0)]
  xp = jnp.pad(x, pad)
  out = None
  for dy in range(k):
    for dx in range(k):
      tap = xp[..., dy:dy + stride * (ho - 1) + 1:stride, dx:dx + stride * (wo - 1) + 1:stride, :]
      term = tap * kernel[dy, dx, 0].astype(x.dtype)
      out = term if out is None else out + term
  return out


class DepthwiseConv(nn.Module):
  """`depthwise_conv` with its kernel as a parameter 'kernel' [k, k, 1, C] (nn.Conv's layout
  with feature_group_count = C; [kt, k, k, 1, C] with `kernel_t` > 1, a video model's),
  PyTorch's default init U(+-1/sqrt(fan in))."""
  kernel_size: int
  stride: int = 1
  dtype: Dtype = jnp.float32
  param_dtype: Dtype = jnp.float32
  kernel_t: int = 1

  @nn.compact
  def __call__(self, x):
    k, c, kt = self.kernel_size, x.shape[-1], self.kernel_t
    shape = (k, k, 1, c) if kt == 1 else (kt, k, k, 1, c)
    kernel = self.param("kernel", vit.torch_default_uniform(kt * k * k), shape, self.param_dtype)
    return depthwise_conv(x.astype(self.dtype), kernel, self.stride)


# ---------------------------------------------------------------------------------------------
# Layers.

def _drop_path(module: nn.Module, x: jax.Array, rate: float, train: bool) -> jax.Array:
  """Stochastic depth per sample: x * Bernoulli(1 - rate) / (1 - rate) (common.py drop_path)."""
  if not train or rate == 0.0:
    return x
  keep = 1.0 - rate
  mask = jax.random.bernoulli(module.make_rng("dropout"), keep, (x.shape[0],) + (1,) * (x.ndim - 1))
  return x * mask.astype(x.dtype) / keep


class Mlp(nn.Module):
  """common.py Mlp: fc1 (to `hidden`), GELU (erf), fc2 (to `out`)."""
  hidden: int
  out: int
  dtype: Dtype = jnp.float32
  param_dtype: Dtype = jnp.float32

  @nn.compact
  def __call__(self, x):
    dense = lambda n, name: nn.Dense(n, dtype=self.dtype, param_dtype=self.param_dtype,  # noqa: E731
                                     kernel_init=_NORMAL_02, name=name)
    return dense(self.out, "fc2")(vit.gelu_exact(dense(self.hidden, "fc1")(x)))


class MultiScaleAttention(nn.Module):
  """Pooling attention of one block (see the module docstring); parameters qkv, proj,
  pool_q / norm_q, pool_k / norm_k, pool_v / norm_v (when pooled), rel_pos_h, rel_pos_w."""
  spec: BlockSpec
  has_cls: bool = False
  qkv_bias: bool = True
  rel_pos: bool = True
  residual_pooling: bool = True
  attn_impl: Optional[str] = None
  dtype: Dtype = jnp.float32
  param_dtype: Dtype = jnp.float32

  @nn.compact
  def __call__(self, x):
    """x [B, N, dim] (norm1's output) -> [B, Nq, att_dim]."""
    sp = self.spec
    b, n, _ = x.shape
    h, d = sp.heads, sp.head_dim
    qkv = nn.Dense(3 * sp.att_dim, use_bias=self.qkv_bias, dtype=self.dtype,
                   param_dtype=self.param_dtype, kernel_init=_NORMAL_02, name="qkv")(x)
    qkv = qkv.reshape(b, n, 3, h, d)
    q, k, v = qkv[:, :, 0], qkv[:, :, 1], qkv[:, :, 2]

    def pool(t, name, kernel, stride):
      if not kernel:
        return t
      conv = DepthwiseConv(kernel, stride, self.dtype, self.param_dtype, sp.pool_kernel_t,
                           name=f"pool_{name}")
      norm = vit.layer_norm(f"norm_{name}", self.param_dtype)
      return attention_pool(t, conv, norm, sp.grid_in, self.has_cls, sp.frames)

    q = pool(q, "q", sp.q_kernel, sp.q_stride)
    k = pool(k, "k", sp.kv_kernel, sp.kv_stride)
    v = pool(v, "v", sp.kv_kernel, sp.kv_stride)
    bias = None
    if self.rel_pos:
      table = lambda name, rows: self.param(name, _NORMAL_02, (rows, d), self.param_dtype)  # noqa: E731
      rel_t = table("rel_pos_t", sp.rel_pos_t_size) if sp.rel_pos_t_size else None
      bias = rel_pos_bias(q, table("rel_pos_h", sp.rel_pos_size),
                          table("rel_pos_w", sp.rel_pos_size), sp.grid_q, sp.grid_kv,
                          self.has_cls, rel_t, sp.frames).astype(self.dtype)
    q, k, v = (t.astype(self.dtype) for t in (q, k, v))
    out = vit.attention(q, k, v, bias, implementation=self.attn_impl)
    if self.residual_pooling:
      if self.has_cls:
        out = jnp.concatenate([out[:, :1], out[:, 1:] + q[:, 1:]], axis=1)
      else:
        out = out + q
    out = out.reshape(b, out.shape[1], sp.att_dim)
    return nn.Dense(sp.att_dim, dtype=self.dtype, param_dtype=self.param_dtype,
                    kernel_init=_NORMAL_02, name="proj")(out)


class MultiScaleBlock(nn.Module):
  """MultiScaleBlock (see the module docstring): norm1, attn, norm2, mlp, and proj (the skip
  path's Linear) when the width changes."""
  spec: BlockSpec
  has_cls: bool = False
  mlp_ratio: float = 4.0
  qkv_bias: bool = True
  rel_pos: bool = True
  residual_pooling: bool = True
  dim_mul_in_att: bool = True
  drop_path: float = 0.0
  attn_impl: Optional[str] = None
  dtype: Dtype = jnp.float32
  param_dtype: Dtype = jnp.float32

  def _skip_pool(self, x):
    """The skip path max-pooled with the query stride (kernel s + 1, padding (s + 1) // 2,
    -inf padding as torch's MaxPool2d; a clip's frames one by one, MaxPool3d's kernel 1 in
    time), the cls token passed through."""
    sp = self.spec
    if sp.q_stride == 1:
      return x
    s = 1 if self.has_cls else 0
    b, _, c = x.shape
    k, p = sp.q_stride + 1, (sp.q_stride + 1) // 2
    y = x[:, s:].reshape(b * sp.frames, sp.grid_in, sp.grid_in, c)
    y = nn.max_pool(y, (k, k), strides=(sp.q_stride, sp.q_stride), padding=((p, p), (p, p)))
    y = y.reshape(b, -1, c)
    return jnp.concatenate([x[:, :1], y], axis=1) if s else y

  @nn.compact
  def __call__(self, x, train: bool = False):
    sp = self.spec
    proj = lambda: nn.Dense(sp.dim_out, dtype=self.dtype, param_dtype=self.param_dtype,  # noqa: E731
                            kernel_init=_NORMAL_02, name="proj")
    x_norm = vit.layer_norm("norm1", self.param_dtype)(x)
    y = MultiScaleAttention(sp, self.has_cls, self.qkv_bias, self.rel_pos, self.residual_pooling,
                            self.attn_impl, self.dtype, self.param_dtype, name="attn")(x_norm)
    if self.dim_mul_in_att and sp.dim != sp.dim_out:
      x = proj()(x_norm).astype(jnp.float32)
    x = self._skip_pool(x) + _drop_path(self, y, self.drop_path, train).astype(jnp.float32)
    x_norm = vit.layer_norm("norm2", self.param_dtype)(x)
    y = Mlp(int(sp.att_dim * self.mlp_ratio), sp.dim_out, self.dtype, self.param_dtype,
            name="mlp")(x_norm)
    if not self.dim_mul_in_att and sp.dim != sp.dim_out:
      x = proj()(x_norm).astype(jnp.float32)
    return x + _drop_path(self, y, self.drop_path, train).astype(jnp.float32)


class PatchEmbed(nn.Module):
  """PatchEmbed: a Conv2d (PyTorch's default init), its output as row-major tokens; with
  `kernel_t` > 0 a Conv3d over clips [B, T, H, W, C] (time-major tokens), as SlowFast's."""
  dim: int
  kernel: int = 7
  stride: int = 4
  padding: int = 3
  dtype: Dtype = jnp.float32
  param_dtype: Dtype = jnp.float32
  kernel_t: int = 0
  stride_t: int = 1
  padding_t: int = 0

  @nn.compact
  def __call__(self, images):
    k, s, p = self.kernel, self.stride, self.padding
    kernel, strides, pads = (k, k), (s, s), ((p, p), (p, p))
    if self.kernel_t:
      kernel, strides = (self.kernel_t,) + kernel, (self.stride_t,) + strides
      pads = ((self.padding_t, self.padding_t),) + pads
    init = vit.torch_default_uniform(images.shape[-1] * math.prod(kernel))
    x = nn.Conv(self.dim, kernel, strides, padding=pads, kernel_init=init,
                bias_init=init, dtype=self.dtype, param_dtype=self.param_dtype, name="proj")(images)
    return x.reshape(x.shape[0], -1, self.dim)


class MViT(nn.Module):
  """MViTv2 without head (see the module docstring). Parameters: patch_embed/proj, cls_token,
  pos_embed, mask_token (each when enabled), block00 ... (norm1, attn, norm2, mlp, proj),
  norm."""
  image_size: int = 224
  embed_dim: int = 96
  num_heads: int = 1
  stage_blocks: tuple[int, ...] = (1, 2, 11, 2)
  stage_strides: tuple[int, ...] = (2, 2, 2)
  patch_kernel: int = 7
  patch_stride: int = 4
  patch_padding: int = 3
  pool_kernel: int = 3
  kv_stride: int = 4
  mlp_ratio: float = 4.0
  qkv_bias: bool = True
  cls_token: bool = False
  abs_pos: bool = False
  rel_pos: bool = True
  residual_pooling: bool = True
  dim_mul_in_att: bool = True
  drop_path: float = 0.0
  use_mask_token: bool = False
  remat: bool = False
  attn_impl: Optional[str] = None
  dtype: Dtype = jnp.float32
  param_dtype: Dtype = jnp.float32
  # Video (SlowFast's MViT on clips [B, T, H, W, C]) when num_frames > 0.
  num_frames: int = 0
  patch_kernel_t: int = 3
  patch_stride_t: int = 2
  patch_padding_t: int = 1
  pool_kernel_t: int = 3
  rel_pos_temporal: bool = True

  @property
  def specs(self) -> tuple[BlockSpec, ...]:
    return plan(self.image_size, self.embed_dim, self.num_heads, tuple(self.stage_blocks),
                tuple(self.stage_strides), self.patch_kernel, self.patch_stride,
                self.patch_padding, self.pool_kernel, self.kv_stride, self.dim_mul_in_att,
                self.num_frames, self.patch_kernel_t, self.patch_stride_t,
                self.patch_padding_t, self.pool_kernel_t, self.rel_pos_temporal)

  @property
  def frames(self) -> int:
    """The token grid's time length (1 for images)."""
    return self.specs[-1].frames

  @property
  def grid(self) -> int:
    """The output grid side at `image_size`."""
    return self.specs[-1].grid_q

  @property
  def stride(self) -> int:
    """Input pixels per output position (32 with the standard four stages)."""
    return self.image_size // self.grid

  @property
  def num_features(self) -> int:
    return self.specs[-1].dim_out

  @nn.compact
  def __call__(self, images: jax.Array, mask: Optional[jax.Array] = None, train: bool = False,
               features_only: bool = False, pooled: str = "") -> jax.Array:
    """The final-norm tokens [B, (1 +) N, D]; with pooled='mean', SlowFast's MViT.forward
    under USE_MEAN_POOLING (MaskFeat's fine-tuning): the mean of the last block's patch
    tokens (the cls token dropped), then the final norm, [B, D]."""
    del features_only                   # no head: the tokens either way
    if pooled not in ("", "mean"):
      raise ValueError(f"MViT pooled={pooled!r}: use '' (the tokens) or 'mean'")
    video = self.num_frames > 0
    if images.ndim != (5 if video else 4):
      raise ValueError(f"this MViT takes {'clips [B, T, H, W, C]' if video else 'images [B, H, W, C]'}"
                       f", got shape {tuple(images.shape)}: set config.model.num_frames to the "
                       "clip length (input.data.num_frames) for video, 0 for images")
    if video and images.shape[1] != self.num_frames:
      raise ValueError(f"this MViT is built for {self.num_frames}-frame clips, got "
                       f"{images.shape[1]}: set config.model.num_frames = input.data.num_frames")
    if images.shape[-3] != self.image_size or images.shape[-2] != self.image_size:
      raise ValueError(f"this MViT is built for {self.image_size}px images, got "
                       f"{images.shape[-3]}x{images.shape[-2]}: set input.image_size")
    specs = self.specs
    x = PatchEmbed(self.embed_dim, self.patch_kernel, self.patch_stride, self.patch_padding,
                   self.dtype, self.param_dtype, self.patch_kernel_t if video else 0,
                   self.patch_stride_t, self.patch_padding_t,
                   name="patch_embed")(images.astype(self.dtype))
    x = x.astype(jnp.float32)
    b, g = x.shape[0], specs[0].grid_in
    if self.use_mask_token:
      tok = self.param("mask_token", _NORMAL_02, (1, 1, self.embed_dim), self.param_dtype)
      if mask is not None:
        w = upsample_mask(mask, g, specs[0].frames)[..., None]
        x = x * (1 - w) + tok.astype(x.dtype) * w
    if self.cls_token:
      cls = self.param("cls_token", _NORMAL_02, (1, 1, self.embed_dim), self.param_dtype)
      x = jnp.concatenate([jnp.broadcast_to(cls.astype(x.dtype), (b, 1, self.embed_dim)), x], 1)
    if self.abs_pos:
      pos = self.param("pos_embed", _NORMAL_02, (1, x.shape[1], self.embed_dim), self.param_dtype)
      x = x + pos.astype(x.dtype)
    rates = vit.drop_path_rates(len(specs), self.drop_path)
    block = nn.remat(MultiScaleBlock, static_argnums=(2,)) if self.remat else MultiScaleBlock
    record = self.is_mutable_collection("intermediates")
    for i, sp in enumerate(specs):
      x = block(sp, self.cls_token, self.mlp_ratio, self.qkv_bias, self.rel_pos,
                self.residual_pooling, self.dim_mul_in_att, float(rates[i]), self.attn_impl,
                self.dtype, self.param_dtype, name=f"block{i:02d}")(x, train)
      if record:
        self.sow("intermediates", "block_outputs", x)
    if pooled == "mean":
      x = x[:, int(self.cls_token):].mean(axis=1)
    return vit.layer_norm("norm", self.param_dtype)(x).astype(jnp.float32)


# ---------------------------------------------------------------------------------------------
# The models registry's contract (mim_jax/models/__init__.py).

# None / 0 / () = the variant's value.
DEFAULTS = dict(name="mvit", variant="small", embed_dim=0, num_heads=0, stage_blocks=(),
                stage_strides=(2, 2, 2), patch_kernel=7, patch_stride=4, patch_padding=3,
                pool_kernel=3, kv_stride=4, mlp_ratio=4.0, qkv_bias=True, cls_token=False,
                abs_pos=False, rel_pos=True, residual_pooling=True, dim_mul_in_att=None,
                drop_path=0.0, remat=False, attn_impl="", dtype="float32", param_dtype="float32",
                num_frames=0, patch_kernel_t=3, patch_stride_t=2, patch_padding_t=1,
                pool_kernel_t=3, rel_pos_temporal=True)

EXECUTION_OPTIONS = ("dtype", "attn_impl", "remat")


def default_config(**kw) -> ml_collections.ConfigDict:
  """`config.model` of an MViTv2: DEFAULTS (MViTv2-S, head-less) updated by `kw`; ValueError
  for a key that is not an MViT key."""
  cfg = dict(DEFAULTS)
  for k, v in kw.items():
    if k not in DEFAULTS:
      raise ValueError(f"config.model.{k}: not an MViT key; use {', '.join(DEFAULTS)}")
    cfg[k] = v
  if cfg["dim_mul_in_att"] is None:       # a bool placeholder: --config.model.dim_mul_in_att=False
    cfg["dim_mul_in_att"] = placeholder(bool)
  return ml_collections.ConfigDict(cfg)


def _resolved(model_cfg) -> dict:
  """The architecture `config.model` describes, variant defaults filled in."""
  get = lambda k: model_cfg.get(k, DEFAULTS[k])  # noqa: E731
  dim, heads, blocks, in_att = variant(get("variant"))
  in_att = in_att if get("dim_mul_in_att") is None else bool(get("dim_mul_in_att"))
  return dict(embed_dim=int(get("embed_dim") or dim), num_heads=int(get("num_heads") or heads),
              stage_blocks=tuple(int(n) for n in (get("stage_blocks") or blocks)),
              stage_strides=tuple(int(s) for s in get("stage_strides")),
              patch_kernel=int(get("patch_kernel")), patch_stride=int(get("patch_stride")),
              patch_padding=int(get("patch_padding")), pool_kernel=int(get("pool_kernel")),
              kv_stride=int(get("kv_stride")), dim_mul_in_att=in_att,
              num_frames=int(get("num_frames")), patch_kernel_t=int(get("patch_kernel_t")),
              patch_stride_t=int(get("patch_stride_t")),
              patch_padding_t=int(get("patch_padding_t")),
              pool_kernel_t=int(get("pool_kernel_t")),
              rel_pos_temporal=bool(get("rel_pos_temporal")))


def _is_int(v, low: int) -> bool:
  return not isinstance(v, bool) and isinstance(v, (int, np.integer)) and v >= low


def check_config(model_cfg) -> None:
  """ValueError (one line naming the allowed values) for a key that is not an MViT key or a
  bad value of one."""
  unknown = [k for k in model_cfg.keys() if k not in DEFAULTS]
  if unknown:
    raise ValueError(f"config.model.{unknown[0]}: not an MViT key; use {', '.join(DEFAULTS)}")
  get = lambda k: model_cfg.get(k, DEFAULTS[k])  # noqa: E731
  variant(get("variant"))
  for key, low in (("embed_dim", 0), ("num_heads", 0), ("patch_kernel", 1), ("patch_stride", 1),
                   ("patch_padding", 0), ("kv_stride", 1), ("num_frames", 0),
                   ("patch_kernel_t", 1), ("patch_stride_t", 1), ("patch_padding_t", 0),
                   ("pool_kernel_t", 1)):
    if not _is_int(get(key), low):
      raise ValueError(f"config.model.{key}={get(key)!r}: use an integer >= {low}")
  if not _is_int(get("pool_kernel"), 1) or get("pool_kernel") % 2 == 0:
    raise ValueError(f"config.model.pool_kernel={get('pool_kernel')!r}: use an odd integer "
                     f"(the official 3)")
  blocks = get("stage_blocks")
  if not isinstance(blocks, (tuple, list)) or not all(_is_int(n, 1) for n in blocks):
    raise ValueError(f"config.model.stage_blocks={blocks!r}: use a tuple of block counts >= 1 "
                     f"per stage, e.g. (1, 2, 11, 2), or () for the variant's")
  n_stages = len(blocks or variant(get("variant"))[2])
  strides = get("stage_strides")
  if (not isinstance(strides, (tuple, list)) or len(strides) != n_stages - 1
      or not all(_is_int(s, 1) for s in strides)):
    raise ValueError(f"config.model.stage_strides={strides!r}: use {n_stages - 1} query strides "
                     f">= 1, one per stage transition, e.g. (2, 2, 2)")
  if not get("mlp_ratio") > 0:
    raise ValueError(f"config.model.mlp_ratio={get('mlp_ratio')!r}: use a value > 0 (4.0)")
  if not 0.0 <= get("drop_path") < 1.0:
    raise ValueError(f"config.model.drop_path={get('drop_path')!r}: use a rate in [0, 1)")
  for key in ("qkv_bias", "cls_token", "abs_pos", "rel_pos", "residual_pooling", "remat",
              "rel_pos_temporal"):
    if not isinstance(get(key), bool):
      raise ValueError(f"config.model.{key}={get(key)!r}: use True or False")
  if get("dim_mul_in_att") not in (None, True, False):
    raise ValueError(f"config.model.dim_mul_in_att={get('dim_mul_in_att')!r}: use True, False or "
                     f"None (the variant's)")
  if get("attn_impl") not in ATTN_IMPLS:
    raise ValueError(f"config.model.attn_impl={get('attn_impl')!r}: use '', 'xla' or 'cudnn'")
  for key in ("dtype", "param_dtype"):
    if get(key) not in DTYPES:
      raise ValueError(f"config.model.{key}={get(key)!r}: use 'float32', 'bfloat16' or 'float16'")


def summary(model_cfg, image_size: int) -> str:
  """'MViTv2-small, 16 blocks (1-2-11-2), width 96, 224 px' (the run header)."""
  r = _resolved(model_cfg)
  name = ALIASES.get(str(model_cfg.get("variant", "small")).lower(), model_cfg.get("variant", "small"))
  clip = f"{r['num_frames']} frames x " if r["num_frames"] else ""
  return (f"MViTv2-{name}, {sum(r['stage_blocks'])} blocks "
          f"({'-'.join(map(str, r['stage_blocks']))}), width {r['embed_dim']}, {clip}{image_size} px")


def from_config(model_cfg, image_size: int = 224, **overrides) -> MViT:
  """The MViT `config.model` describes (`models.build` with model.name='mvit'), for
  `image_size` inputs; `overrides` replace MViT fields (MaskFeat's use_mask_token)."""
  check_config(model_cfg)
  get = lambda k: model_cfg.get(k, DEFAULTS[k])  # noqa: E731
  kw = dict(_resolved(model_cfg), image_size=int(image_size), mlp_ratio=float(get("mlp_ratio")),
            qkv_bias=get("qkv_bias"), cls_token=get("cls_token"), abs_pos=get("abs_pos"),
            rel_pos=get("rel_pos"), residual_pooling=get("residual_pooling"),
            drop_path=float(get("drop_path")), remat=get("remat"),
            attn_impl=get("attn_impl") or None, dtype=jnp.dtype(get("dtype")),
            param_dtype=jnp.dtype(get("param_dtype")), use_mask_token=False)
  bad = [k for k in overrides if k not in kw]
  if bad:
    raise ValueError(f"an MViT has no option {bad[0]!r}; its fields are {', '.join(kw)}")
  kw.update(overrides)
  model = MViT(**kw)
  model.specs  # noqa: B018 (a ValueError now for an image size the strides do not divide)
  return model


def check_pooling(pooling: str, has_cls: bool) -> None:
  """ValueError (one line) unless `pooling` is one an MViT with(out) a cls token has."""
  if pooling not in POOLINGS:
    raise ValueError(f"pooling={pooling!r}: an MViT pools with {' or '.join(map(repr, POOLINGS))}")
  if pooling == "cls" and not has_cls:
    raise ValueError("pooling='cls' needs an MViT with a cls token (config.model.cls_token="
                     "True): use pooling='mean', the official head's input without one")


def pool(tokens: jax.Array, pooling: str, has_cls: bool) -> jax.Array:
  """'cls': the cls token (the official head's input with CLS_EMBED_ON); 'mean': the mean of
  the spatial tokens (the official head's input without a cls token). float32."""
  check_pooling(pooling, has_cls)
  if pooling == "cls":
    return tokens[:, 0].astype(jnp.float32)
  return tokens[:, 1 if has_cls else 0:].astype(jnp.float32).mean(axis=1)


def _named(model: MViT, tokens: jax.Array, pooling: str) -> dict:
  """'grid' of a clip: (token frames, h, w), as the video ViT's."""
  grid = (model.grid, model.grid)
  if model.num_frames:
    grid = (model.frames,) + grid
  return {"tokens": tokens.astype(jnp.float32), "pooled": pool(tokens, pooling, model.cls_token),
          "stride": model.stride, "grid": grid}


def outputs(model: MViT, variables, images, *, pooling: str, layers: bool = False) -> dict:
  """The evaluation-mode named outputs (the contract of `mim_jax.models`): 'tokens' (final
  norm, cls first when present), 'pooled' (`pool` of them), 'stride' (32 for the standard
  four stages), 'grid', and with `layers` every block's output pooled the same way (before
  the final norm; widths grow by stage), then 'pooled'."""
  check_pooling(pooling, model.cls_token)                  # before the pass
  if layers:
    tokens, state = model.apply(variables, images, mutable=["intermediates"])
    blocks = list(state["intermediates"]["block_outputs"])
  else:
    tokens = model.apply(variables, images)
  out = _named(model, tokens, pooling)
  if layers:
    out["layers"] = [pool(t, pooling, model.cls_token) for t in blocks[:-1]] + [out["pooled"]]
  return out


def forward(model: MViT, variables, images, *, train: bool, rng=None,
            pooling: str = "cls", mask=None) -> tuple[dict, dict]:
  """The training-or-evaluation forward of the registry contract: ('tokens', 'pooled',
  'stride', 'grid' as `outputs`; {} — no collection besides the parameters). In training,
  `rng` drives drop path (needed when model.drop_path > 0); `mask` swaps the masked patch
  embeddings for the mask token (MaskFeat, see MViT's `mask`)."""
  check_pooling(pooling, model.cls_token)
  rngs = {"dropout": rng} if train and rng is not None else None
  tokens = model.apply(variables, images, mask=mask, train=train, rngs=rngs)
  return _named(model, tokens, pooling), {}


def torch_linear_resize(table: np.ndarray, rows: int) -> np.ndarray:
  """[n, D] -> [rows, D]: torch's F.interpolate(mode='linear', align_corners=False) along the
  rows (source (i + 0.5) * n / rows - 0.5, clamped at 0; neighbours clamped at n - 1)."""
  n = table.shape[0]
  src = np.maximum((np.arange(rows, dtype=np.float32) + np.float32(0.5)) * np.float32(n / rows)
                   - np.float32(0.5), np.float32(0.0))
  lo = np.floor(src).astype(np.int64)
  hi = np.minimum(lo + 1, n - 1)
  frac = (src - lo)[:, None]
  table = np.asarray(table, np.float32)
  return (1 - frac) * table[lo] + frac * table[hi]


def adapt_pretrained(loaded: dict, init: dict) -> dict:
  """A pretrained MViT's parameters `loaded` for a model whose `init` parameters differ in
  the sizes of relative position tables (another image size, or query strides changed
  between pretraining and fine-tuning as SlowFast's MaskFeat MViT recipes do): each
  rel_pos_h / rel_pos_w whose rows differ resized by torch's linear interpolation, as
  slowfast/utils/checkpoint.py `load_checkpoint` does; everything else unchanged."""
  def fit(path, x):
    names = _names(path)
    node = init
    for k in names:
      if not isinstance(node, dict) or k not in node:
        return x
      node = node[k]
    if (names[-1] in ("rel_pos_h", "rel_pos_w", "rel_pos_t")
        and np.shape(x)[0] != np.shape(node)[0]):
      return torch_linear_resize(np.asarray(x), np.shape(node)[0])
    return x
  return jax.tree_util.tree_map_with_path(fit, loaded)


def param_count(model: MViT) -> int:
  """The number of parameters of `model` at its image size, without allocating them."""
  size = model.image_size
  shape = (1,) + ((model.num_frames,) if model.num_frames else ()) + (size, size, 3)
  shapes = jax.eval_shape(lambda: model.init(jax.random.PRNGKey(0), jnp.zeros(shape)))
  return sum(math.prod(x.shape) for x in jax.tree.leaves(shapes["params"]))


# ---------------------------------------------------------------------------------------------
# Layer-wise learning-rate decay.

_BLOCK = re.compile(r"block(\d+)$")
# mvit/models/optimizer.py get_ld_param_groups: layer 0.
_EMBEDDING_NAMES = ("cls_token", "mask_token", "pos_embed", "patch_embed")


def _names(path) -> tuple[str, ...]:
  return tuple(str(getattr(k, "key", getattr(k, "name", k))) for k in path)


def is_mvit_tree(tree: Any) -> bool:
  """Whether `tree` (parameters, or any tree shaped like them) has an MViT as its 'encoder':
  blocks whose attention has a 'qkv' Linear (a ViT's has a 'qkv_kernel', a Swin has stages)."""
  enc = tree.get("encoder") if isinstance(tree, dict) else None
  block = enc.get("block00") if isinstance(enc, dict) else None
  attn = block.get("attn") if isinstance(block, dict) else None
  return isinstance(attn, dict) and isinstance(attn.get("qkv"), dict)


def layer_ids(tree: Any) -> Optional[tuple[Any, int]]:
  """(layer id of every leaf, the largest id) for a parameter tree whose 'encoder' entry is an
  MViT, else None: the hook `mim_jax.optim` asks the module config.model names
  (`backbone_layer_ids`).

  The ids of mvit/models/optimizer.py `get_ld_param_groups` (`_get_layer_decay`): 0 for
  cls_token, mask_token, pos_embed and patch_embed; i + 1 for block i; DEPTH + 1 (the largest
  id) for everything else (the final norm, any head). The lr scale is then
  LAYER_DECAY ** (DEPTH + 1 - id), DEPTH the number of blocks."""
  if not is_mvit_tree(tree):
    return None
  depth = 1 + max(int(m.group(1)) for m in map(_BLOCK.match, tree["encoder"]) if m)

  def layer(path, _):
    names = _names(path)
    if len(names) < 2 or names[0] != "encoder":
      return depth + 1
    if names[1] in _EMBEDDING_NAMES:
      return 0
    m = _BLOCK.match(names[1])
    return int(m.group(1)) + 1 if m else depth + 1

  return jax.tree_util.tree_map_with_path(layer, tree), depth + 1


# -- fine-tuning (the hooks mim_jax/methods/finetune.py reads) --------------------------------
# Config keys that must equal the pretraining run's. stage_strides and kv_stride may differ:
# SlowFast's MaskFeat fine-tuning puts back the query stride the pretraining removed, and the
# relative position tables are resized (`finetune_adapt`).
FINETUNE_ARCH_KEYS = ("variant", "embed_dim", "num_heads", "stage_blocks", "patch_kernel",
                      "patch_stride", "patch_padding", "pool_kernel", "mlp_ratio", "qkv_bias",
                      "cls_token", "abs_pos", "rel_pos", "dim_mul_in_att", "num_frames",
                      "patch_kernel_t", "patch_stride_t", "patch_padding_t", "pool_kernel_t",
                      "rel_pos_temporal")
FINETUNE_HEAD_STD = 0.02        # the official head's trunc_normal_(std=.02), bias 0
# finetune.pooling: 'avg' (the mean of the final-norm tokens, SlowFast's and mvit's default
# [norm->mean] without a cls token), 'cls' (the final-norm cls token: both official forwards
# with CLS_EMBED_ON, e.g. SlowFast's supervised Kinetics / SSv2 MViTv2 yamls; the head at
# FINETUNE_HEAD_STD) or 'mean' (USE_MEAN_POOLING, MaskFeat's fine-tuning yamls: the backbone's
# `pooled='mean'`, and the head at HEAD_INIT_SCALE 0.001 of its trunc_normal_(std=.02): std
# 2e-5, bias 0).
FINETUNE_POOLINGS = ("avg", "cls", "mean")


def finetune_adapt(loaded: dict, init: dict, finetune_cfg) -> dict:
  """`adapt_pretrained` (no option of the fine-tuning config applies)."""
  del finetune_cfg
  return adapt_pretrained(loaded, init)


def finetune_decays(names: tuple[str, ...], ndim: int) -> bool:
  """SlowFast's construct_optimizer with ZERO_WD_1D_PARAM: no decay on 1-D parameters (norms,
  biases); the cls token, position and relative position tables are decayed (the official
  configs leave ZERO_DECAY_POS_CLS off)."""
  del names
  return ndim > 1
