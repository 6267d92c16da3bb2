"""A Flax linen Swin Transformer, v1 and v2, equal to microsoft/Swin-Transformer's.

Version 1 is `models/swin_transformer.py` `SwinTransformer` (Liu et al., 2021), version 2
`models/swin_transformer_v2.py` `SwinTransformerV2` (Liu et al., 2022), both without the
classification head (`num_classes=0`, as SimMIM pretrains them; fine-tuning adds its own head):

  * patch embedding: a patch_size x patch_size convolution with stride patch_size (PyTorch's
    default Conv2d init, which the official `_init_weights` leaves alone), then a LayerNorm
    (`patch_norm`); an absolute position embedding only with `ape` (off in every config);
  * stages of blocks; block j of a stage attends within ws x ws windows, shifted by ws // 2
    (a cyclic `jnp.roll` of the feature map) for odd j. A stage whose resolution is at most
    the window size uses one window of its size and no shift (the official clamp);
  * shifted windows carry the official attention mask: the map is cut into 3 x 3 regions by
    the slices [0, -ws), [-ws, -shift), [-shift, end) along each axis, numbered row-major,
    and a query never sees a key of another region inside its window (-100 added to the
    logit, 0 otherwise);
  * v1 attention: softmax(q k^T / sqrt(head_dim) + B) v with B read from a learned table
    [(2 ws - 1)^2, heads] at the official relative position index
    (dh + ws - 1) * (2 ws - 1) + (dw + ws - 1);
  * v2 attention (scaled cosine attention): softmax(cos(q, k) * exp(min(s_h, log 100)) + B) v
    with a learned per-head s_h (initialised to log 10), B = 16 * sigmoid(cpb_mlp(table)) where
    cpb_mlp is Linear(2, 512) + ReLU + Linear(512, heads, no bias) applied to the log-spaced
    relative coordinates: each offset divided by (pretrained_window_size - 1), or by
    (ws - 1) when that is 0, times 8, then sign(x) * log2(|x| + 1) / log2(8); q and v biases
    (the k bias is zero), no bias in the qkv Linear itself;
  * v1 blocks are pre-norm (x + attn(norm1(x)); x + mlp(norm2(x))); v2 blocks res-post-norm
    (x + norm1(attn(x)); x + norm2(mlp(x))); the MLP is fc1, exact GELU, fc2 (ratio 4);
  * drop path linear in the block index over all blocks (torch.linspace(0, rate, sum(depths)));
  * patch merging after every stage but the last: the map's (0::2, 0::2), (1::2, 0::2),
    (0::2, 1::2), (1::2, 1::2) positions concatenated in that order, then v1: LayerNorm(4C) and
    Linear(4C, 2C, no bias); v2: the Linear, then LayerNorm(2C);
  * a final LayerNorm; Swin's classifier input is the mean of the final normed tokens.

LayerNorms use eps 1e-5 (nn.LayerNorm's default, every Swin norm) and torch's two-pass
variance. Initialisation is the official `_init_weights`: Linear weights trunc_normal_(std
.02) with timm's absolute bounds +-2 (`vit.timm_trunc_normal`), biases 0, LayerNorms 1 and 0,
the v1 bias table trunc_normal_(.02), the v2 logit scale log 10; v2's `_init_respostnorm` then
sets the block norms norm1 / norm2 (scale and bias) to 0, so a v2 block starts as the identity.

Variants (`VARIANTS`): Swin-T/S/B/L (both versions) and the Swin V2 paper's H and G (v2 only;
configs only, nothing here was trained at those sizes). For SwinV2-H and -G the paper adds a
layer normalisation on the main branch every 6 layers (`extra_norm_period`, the variants'
default 6); the official repository has no such option, so it is written as timm's
`swinv2_cr` `extra_norm_period` and NASA's pytorch-caney SwinV2 have it: a LayerNorm `norm3`
(initialised 1 and 0) after the second residual of every block j with (j + 1) % 6 == 0,
counted within the stage. The H and G channel counts and depths are the paper's (H: C 352,
{2, 2, 18, 2}; G: C 512, {2, 2, 42, 4}; backbones of 655M and 3.0B parameters, as
published); their head counts (head dimension 32, as in every official Swin) are a stated
choice.

SimMIM (`use_mask_token`): `SwinTransformerForSimMIM` / `SwinTransformerV2ForSimMIM`'s
learnable mask token (trunc_normal_(std .02), timm's bounds) replaces the patch embeddings
(after the patch norm) where the mask, at patch resolution, is 1: x * (1 - w) + token * w.

Compute runs in `dtype` with parameters in `param_dtype`; LayerNorms, the residual stream, the
position bias (but for cuDNN) and the attention softmax are float32. The window attention goes through `vit.attention`
(`jax.nn.dot_product_attention`, `attn_impl` and cuDNN's even-length padding as for the ViT)
with the relative position bias and the shift mask as its bias; v2's per-head scale is folded
into q (q_hat * exp(s_h) * sqrt(head_dim), undone by the kernel's 1 / sqrt(head_dim)).

Deviations: no dropout or attention dropout (DROP_RATE and attn_drop are 0 in every official
config); the drop-path rates come from numpy's float64 linspace (torch: float32); v2's scale
folded into q rounds differently from multiplying the logits; a v2 window of 1 position (a
stage of resolution 1, CPU-sized models only) gets the relative coordinate 0 where the
official normalisation divides 0 by 0 (NaN); bf16 compute on accelerators (official: fp16
autocast). As the official PatchEmbed asserts its img_size, the model takes `image_size`
inputs only (any size whose stages divide by their windows, checked with a one-line error).

Fine-tuning at another window size: `interpolate_bias_table` resizes a v1 table bicubically
(Swin-Transformer utils.load_pretrained) or on SimMIM's geometric grid
(SimMIM utils.remap_pretrained_keys_swin); v2's continuous bias needs none
(`pretrained_window_sizes` keeps its coordinates on the pretraining scale).

Layout is NHWC. `__call__(images, *, train=False, mask=None, features_only=False)` returns the
final normed feature map [B, h, w, C] float32; every block's output is sown to
'intermediates' (`layers_i/block_outputs`) when that collection is mutable.
"""
from __future__ import annotations

import math
import re
from collections.abc import Mapping
from typing import Any, Optional

import flax.linen as nn
import jax
import jax.numpy as jnp
import ml_collections
import numpy as np

from mim_jax.models import vit

Dtype = Any

# name -> (embed_dim, depths, num_heads, extra_norm_period); mlp ratio 4 everywhere.
VARIANTS = {
    "tiny": (96, (2, 2, 6, 2), (3, 6, 12, 24), 0),
    "small": (96, (2, 2, 18, 2), (3, 6, 12, 24), 0),
    "base": (128, (2, 2, 18, 2), (4, 8, 16, 32), 0),
    "large": (192, (2, 2, 18, 2), (6, 12, 24, 48), 0),
    "huge": (352, (2, 2, 18, 2), (11, 22, 44, 88), 6),      # Swin V2 only
    "giant": (512, (2, 2, 42, 4), (16, 32, 64, 128), 6),    # Swin V2 only
}
ALIASES = {"t": "tiny", "s": "small", "b": "base", "l": "large", "h": "huge", "g": "giant"}
V2_ONLY = ("huge", "giant")

LN_EPS = 1e-5                      # torch nn.LayerNorm's default, used by every Swin norm
MASK_LOGIT = -100.0                # the official shifted-window mask value
CPB_HIDDEN = 512                   # v2's continuous position bias MLP width
LOGIT_SCALE_MAX = math.log(1.0 / 0.01)
POOLINGS = ("mean", "avg")         # both mean Swin's avgpool over the final tokens

linear_init = vit.timm_trunc_normal(0.02)   # _init_weights: trunc_normal_(w, std=.02)


def variant_name(name: str) -> str:
  key = ALIASES.get(str(name).lower(), str(name).lower())
  if key not in VARIANTS:
    raise ValueError(f"config.model.variant={name!r}: use one of "
                     f"{', '.join(list(VARIANTS) + list(ALIASES))}")
  return key


def layer_norm(name: str, param_dtype: Dtype, zero_init: bool = False) -> nn.LayerNorm:
  """torch nn.LayerNorm (eps 1e-5, two-pass variance) in float32; `zero_init`: scale and bias
  0 (v2's `_init_respostnorm`)."""
  init = nn.initializers.zeros if zero_init else nn.initializers.ones
  return nn.LayerNorm(epsilon=LN_EPS, use_fast_variance=False, dtype=jnp.float32,
                      param_dtype=param_dtype, scale_init=init, name=name)


# ---------------------------------------------------------------------------------------------
# Windows, shifts and position tables (numpy at trace time, or jax for the activations).

def window_and_shift(resolution: tuple[int, int], window: int, shifted: bool) -> tuple[int, int]:
  """The official block's window and shift: one window of the map's size and no shift when
  min(H, W) <= window, else (window, window // 2 for a shifted block, 0 otherwise)."""
  if min(resolution) <= window:
    return min(resolution), 0
  return window, (window // 2 if shifted else 0)


def window_partition(x, ws: int):
  """[B, H, W, C] -> [B * nW, ws, ws, C], windows in (b, row, column) order, as the official
  `window_partition` (numpy or jax arrays)."""
  b, h, w, c = x.shape
  x = x.reshape(b, h // ws, ws, w // ws, ws, c).transpose(0, 1, 3, 2, 4, 5)
  return x.reshape(-1, ws, ws, c)


def window_reverse(windows, ws: int, h: int, w: int):
  """Inverse of `window_partition`: [B * nW, ws, ws, C] -> [B, H, W, C]."""
  c = windows.shape[-1]
  x = windows.reshape(-1, h // ws, w // ws, ws, ws, c).transpose(0, 1, 3, 2, 4, 5)
  return x.reshape(-1, h, w, c)


def relative_position_index(ws: int) -> np.ndarray:
  """[ws^2, ws^2] int32: the official index of the pair (i, j) of window positions,
  (dh + ws - 1) * (2 ws - 1) + (dw + ws - 1) with (dh, dw) = position i - position j."""
  coords = np.stack(np.meshgrid(np.arange(ws), np.arange(ws), indexing="ij")).reshape(2, -1)
  rel = (coords[:, :, None] - coords[:, None, :]).transpose(1, 2, 0) + (ws - 1)
  return (rel[..., 0] * (2 * ws - 1) + rel[..., 1]).astype(np.int32)


def relative_coords_table(ws: int, pretrained_ws: int = 0) -> np.ndarray:
  """[(2 ws - 1)^2, 2] float32: v2's log-spaced relative coordinates (row-major over (dh, dw)
  in [-(ws - 1), ws - 1]), in float32 as the official buffer."""
  r = np.arange(-(ws - 1), ws, dtype=np.float32)
  table = np.stack(np.meshgrid(r, r, indexing="ij"), axis=-1)
  norm = np.float32((pretrained_ws if pretrained_ws > 0 else ws) - 1)
  if norm > 0:                      # a 1-position window has the one offset 0 (see Deviations)
    table = table / norm
  table = table * np.float32(8)
  table = np.sign(table) * np.log2(np.abs(table) + np.float32(1)) / np.float32(np.log2(8))
  return table.reshape(-1, 2).astype(np.float32)


def shift_regions(h: int, w: int, ws: int, shift: int) -> np.ndarray:
  """[H, W] int32: the official `img_mask`, region ids 0..8 of the slices [0, -ws),
  [-ws, -shift), [-shift, end) along each axis, numbered row-major."""
  def bounds(n):
    return ((0, n - ws), (n - ws, n - shift), (n - shift, n))
  ids = np.zeros((h, w), np.int32)
  cnt = 0
  for h0, h1 in bounds(h):
    for w0, w1 in bounds(w):
      ids[h0:h1, w0:w1] = cnt
      cnt += 1
  return ids


def attention_mask(h: int, w: int, ws: int, shift: int) -> np.ndarray:
  """[nW, ws^2, ws^2] float32: 0 where two positions of a shifted window share a region,
  -100 where they do not (the official `attn_mask`)."""
  regions = window_partition(shift_regions(h, w, ws, shift)[None, :, :, None], ws)
  regions = regions.reshape(-1, ws * ws)
  differ = regions[:, None, :] != regions[:, :, None]
  return np.where(differ, MASK_LOGIT, 0.0).astype(np.float32)


def drop_path(x: jax.Array, rate: float, rng: jax.Array) -> jax.Array:
  """timm DropPath in training: each sample's branch kept with probability 1 - rate, then
  divided by it."""
  keep = 1.0 - rate
  mask = jax.random.bernoulli(rng, keep, (x.shape[0],) + (1,) * (x.ndim - 1))
  return x * mask.astype(x.dtype) / keep


# ---------------------------------------------------------------------------------------------
# Layers.

class CPBMlp(nn.Module):
  """v2's `cpb_mlp`: Linear(2, 512) + ReLU + Linear(512, heads, no bias) ('fc1', 'fc2')."""
  num_heads: int
  param_dtype: Dtype = jnp.float32

  @nn.compact
  def __call__(self, coords):
    x = nn.Dense(CPB_HIDDEN, kernel_init=linear_init, param_dtype=self.param_dtype,
                 name="fc1")(coords)
    return nn.Dense(self.num_heads, use_bias=False, kernel_init=linear_init,
                    param_dtype=self.param_dtype, name="fc2")(nn.relu(x))


class WindowAttention(nn.Module):
  """W-MSA / SW-MSA over windows [B * nW, ws^2, C] (module docstring); `mask` [nW, N, N] is
  the shifted-window mask. Parameters, v1: qkv (kernel, bias), relative_position_bias_table,
  proj; v2: qkv (kernel), q_bias, v_bias, logit_scale [heads, 1, 1], cpb_mlp, proj."""
  num_heads: int
  window: int
  version: int = 1
  qkv_bias: bool = True
  pretrained_window: int = 0
  attn_impl: Optional[str] = None
  attn_pad: int = -1
  dtype: Dtype = jnp.float32
  param_dtype: Dtype = jnp.float32

  def position_bias(self) -> jax.Array:
    """[heads, N, N] float32: the relative position bias of one window."""
    ws, h = self.window, self.num_heads
    idx = relative_position_index(ws).reshape(-1)
    if self.version == 1:
      table = self.param("relative_position_bias_table", linear_init, ((2 * ws - 1) ** 2, h),
                         self.param_dtype)
    else:
      coords = jnp.asarray(relative_coords_table(ws, self.pretrained_window))
      table = 16.0 * jax.nn.sigmoid(CPBMlp(h, self.param_dtype, name="cpb_mlp")(coords))
    bias = table.astype(jnp.float32)[idx].reshape(ws * ws, ws * ws, h)
    return bias.transpose(2, 0, 1)

  @nn.compact
  def __call__(self, x, mask=None):
    bw, n, c = x.shape
    h = self.num_heads
    hd = c // h
    xd = x.astype(self.dtype)
    if self.version == 1:
      qkv = nn.Dense(3 * c, use_bias=self.qkv_bias, kernel_init=linear_init, dtype=self.dtype,
                     param_dtype=self.param_dtype, name="qkv")(xd)
    else:
      qkv = nn.Dense(3 * c, use_bias=False, kernel_init=linear_init, dtype=self.dtype,
                     param_dtype=self.param_dtype, name="qkv")(xd)
      if self.qkv_bias:
        qb = self.param("q_bias", nn.initializers.zeros, (c,), self.param_dtype)
        vb = self.param("v_bias", nn.initializers.zeros, (c,), self.param_dtype)
        qkv = qkv + jnp.concatenate([qb, jnp.zeros_like(vb), vb]).astype(self.dtype)
    qkv = qkv.reshape(bw, n, 3, h, hd)
    q, k, v = qkv[:, :, 0], qkv[:, :, 1], qkv[:, :, 2]          # [B * nW, N, heads, hd]
    if self.version == 2:
      # Cosine attention: F.normalize (eps 1e-12) of q and k, times the clamped, exponentiated
      # per-head scale; sqrt(hd) cancels the kernel's 1 / sqrt(hd).
      scale = self.param("logit_scale", nn.initializers.constant(math.log(10.0)), (h, 1, 1),
                         self.param_dtype)
      scale = jnp.exp(jnp.minimum(scale.astype(jnp.float32), LOGIT_SCALE_MAX)).reshape(h, 1)

      def normalize(t):
        t = t.astype(jnp.float32)
        return t / jnp.maximum(jnp.linalg.norm(t, axis=-1, keepdims=True), 1e-12)

      q = (normalize(q) * (scale * math.sqrt(hd))).astype(self.dtype)
      k = normalize(k).astype(self.dtype)
    bias = self.position_bias()[None]                             # [1, heads, N, N]
    if mask is not None:
      nw = mask.shape[0]
      bias = bias + jnp.asarray(mask)[:, None]                    # [nW, heads, N, N]
      bias = jnp.broadcast_to(bias[None], (bw // nw, nw, h, n, n)).reshape(bw, h, n, n)
    # XLA adds the bias to float32 logits; cuDNN's kernel takes it in the compute dtype.
    bias = bias.astype(self.dtype) if self.attn_impl == "cudnn" else bias
    out = vit.attention(q, k, v, bias, self.attn_impl,
                        vit.attn_pad_multiple(self.attn_impl, self.attn_pad))
    return nn.Dense(c, kernel_init=linear_init, dtype=self.dtype, param_dtype=self.param_dtype,
                    name="proj")(out.reshape(bw, n, c))


class SwinBlock(nn.Module):
  """`SwinTransformerBlock` of either version on a [B, H, W, C] map (module docstring):
  norm1, attn, norm2, mlp (fc1, fc2), and norm3 with `extra_norm` (v2)."""
  num_heads: int
  window: int
  shift: int
  version: int = 1
  mlp_ratio: float = 4.0
  qkv_bias: bool = True
  drop_path: float = 0.0
  pretrained_window: int = 0
  extra_norm: bool = False
  attn_impl: Optional[str] = None
  attn_pad: int = -1
  dtype: Dtype = jnp.float32
  param_dtype: Dtype = jnp.float32

  def _branch(self, y, train: bool):
    if not train or self.drop_path == 0.0:
      return y
    return drop_path(y, self.drop_path, self.make_rng("dropout"))

  def _attention(self, x):
    b, h, w, c = x.shape
    ws, s = self.window, self.shift
    if s:
      x = jnp.roll(x, (-s, -s), axis=(1, 2))
    windows = window_partition(x, ws).reshape(-1, ws * ws, c)
    mask = attention_mask(h, w, ws, s) if s else None
    out = WindowAttention(self.num_heads, ws, self.version, self.qkv_bias, self.pretrained_window,
                          self.attn_impl, self.attn_pad, self.dtype, self.param_dtype,
                          name="attn")(windows, mask)
    out = window_reverse(out.reshape(-1, ws, ws, c), ws, h, w)
    if s:
      out = jnp.roll(out, (s, s), axis=(1, 2))
    return out.astype(jnp.float32)

  @nn.compact
  def __call__(self, x, train: bool = False):
    c = x.shape[-1]
    post = self.version == 2
    mlp = vit.Mlp(int(c * self.mlp_ratio), linear_init, linear_init, self.dtype, self.param_dtype,
                  name="mlp")
    norm1 = layer_norm("norm1", self.param_dtype, zero_init=post)
    norm2 = layer_norm("norm2", self.param_dtype, zero_init=post)
    if post:
      x = x + self._branch(norm1(self._attention(x)), train)
      x = x + self._branch(norm2(mlp(x).astype(jnp.float32)), train)
      if self.extra_norm:
        x = layer_norm("norm3", self.param_dtype)(x)
      return x
    x = x + self._branch(self._attention(norm1(x)), train)
    return x + self._branch(mlp(norm2(x)).astype(jnp.float32), train)


class PatchMerging(nn.Module):
  """[B, H, W, C] -> [B, H/2, W/2, 2C]: (x0, x1, x2, x3) = positions (0::2, 0::2),
  (1::2, 0::2), (0::2, 1::2), (1::2, 1::2) concatenated; v1 norm (4C) then reduction, v2
  reduction then norm (2C)."""
  version: int = 1
  dtype: Dtype = jnp.float32
  param_dtype: Dtype = jnp.float32

  @nn.compact
  def __call__(self, x):
    b, h, w, c = x.shape
    if h % 2 or w % 2:
      raise ValueError(f"patch merging needs an even feature map, got {h}x{w}: use an image "
                       f"size whose patch grid halves evenly at every stage")
    x = jnp.concatenate([x[:, 0::2, 0::2], x[:, 1::2, 0::2], x[:, 0::2, 1::2], x[:, 1::2, 1::2]],
                        axis=-1)
    reduction = nn.Dense(2 * c, use_bias=False, kernel_init=linear_init, dtype=self.dtype,
                         param_dtype=self.param_dtype, name="reduction")
    if self.version == 1:
      return reduction(layer_norm("norm", self.param_dtype)(x)).astype(jnp.float32)
    return layer_norm("norm", self.param_dtype)(reduction(x))


class PatchEmbed(nn.Module):
  """`PatchEmbed`: Conv2d(3, C, p, stride p) ('proj', PyTorch's default init: weight and bias
  U(+-1/sqrt(3 p^2))) and, with `patch_norm`, LayerNorm(C) ('norm'); [B, H, W, 3] ->
  [B, H/p, W/p, C] float32."""
  patch_size: int
  embed_dim: int
  patch_norm: bool = True
  dtype: Dtype = jnp.float32
  param_dtype: Dtype = jnp.float32

  @nn.compact
  def __call__(self, images):
    p = self.patch_size
    if images.shape[1] % p or images.shape[2] % p:
      raise ValueError(f"image size {images.shape[1]}x{images.shape[2]} is not divisible by the "
                       f"patch size {p}")
    fan_in = p * p * images.shape[-1]
    x = nn.Conv(self.embed_dim, (p, p), (p, p), padding="VALID",
                kernel_init=vit.torch_default_uniform(fan_in),
                bias_init=vit.torch_default_uniform(fan_in), dtype=self.dtype,
                param_dtype=self.param_dtype, name="proj")(images.astype(self.dtype))
    x = x.astype(jnp.float32)
    return layer_norm("norm", self.param_dtype)(x) if self.patch_norm else x


class BasicLayer(nn.Module):
  """One stage: blocks_0 ... blocks_{depth-1} (odd ones shifted), then `downsample` (patch
  merging) unless it is the last stage. Each block's output is sown to 'intermediates'
  ('block_outputs') when that collection is mutable."""
  depth: int
  num_heads: int
  window_size: int
  version: int = 1
  mlp_ratio: float = 4.0
  qkv_bias: bool = True
  drop_path: tuple = ()
  pretrained_window: int = 0
  extra_norm_period: int = 0
  downsample: bool = False
  remat: bool = False
  attn_impl: Optional[str] = None
  attn_pad: int = -1
  dtype: Dtype = jnp.float32
  param_dtype: Dtype = jnp.float32

  @nn.compact
  def __call__(self, x, train: bool = False):
    block_cls = nn.remat(SwinBlock, static_argnums=(2,)) if self.remat else SwinBlock
    record = self.is_mutable_collection("intermediates")
    for j in range(self.depth):
      ws, shift = window_and_shift(x.shape[1:3], self.window_size, shifted=j % 2 == 1)
      if x.shape[1] % ws or x.shape[2] % ws:
        raise ValueError(f"window {ws} does not divide the {x.shape[1]}x{x.shape[2]} feature "
                         f"map: set config.model.window_size to a divisor of every stage's map")
      extra = self.extra_norm_period > 0 and (j + 1) % self.extra_norm_period == 0
      x = block_cls(self.num_heads, ws, shift, self.version, self.mlp_ratio, self.qkv_bias,
                    float(self.drop_path[j]), self.pretrained_window, extra, self.attn_impl,
                    self.attn_pad, self.dtype, self.param_dtype, name=f"blocks_{j}")(x, train)
      if record:
        self.sow("intermediates", "block_outputs", x)
    if self.downsample:
      x = PatchMerging(self.version, self.dtype, self.param_dtype, name="downsample")(x)
    return x


class SwinTransformer(nn.Module):
  """Swin v1 / v2 backbone (module docstring); parameter tree: patch_embed (proj, norm),
  [absolute_pos_embed], [mask_token], layers_i / blocks_j / (norm1, attn, norm2, mlp[, norm3]),
  layers_i / downsample (reduction, norm), norm.

  `__call__(images [B, H, W, 3], *, train=False, mask=None, features_only=False)`: the final
  normed feature map [B, h, w, C] float32. `mask` [B, H/p, W/p] (or flattened; 1 = masked)
  swaps masked patch embeddings for the mask token (`use_mask_token`). `train` turns drop path
  on (rng 'dropout'). `features_only` is accepted for the callers of CNN backbones: a Swin
  here has no head, so its output is always the feature map.
  """
  variant: str = "tiny"
  version: int = 1
  patch_size: int = 4
  window_size: int = 7
  image_size: int = 224
  embed_dim: int = 0                   # 0: the variant's
  depths: tuple = ()                   # (): the variant's
  num_heads: tuple = ()                # (): the variant's
  mlp_ratio: float = 4.0
  qkv_bias: bool = True
  ape: bool = False
  patch_norm: bool = True
  drop_path: float = 0.1
  pretrained_window_sizes: tuple = ()  # v2, per stage; (): all 0
  extra_norm_period: int = -1          # v2; -1: the variant's (6 for huge / giant)
  use_mask_token: bool = False
  remat: bool = False
  attn_impl: Optional[str] = None
  attn_pad: int = -1
  dtype: Dtype = jnp.float32
  param_dtype: Dtype = jnp.float32

  @property
  def dims(self) -> tuple[int, tuple[int, ...], tuple[int, ...], int]:
    """(embed_dim, depths, num_heads, extra_norm_period) after the variant's defaults."""
    embed, depths, heads, period = VARIANTS[variant_name(self.variant)]
    return (int(self.embed_dim or embed), tuple(int(d) for d in (self.depths or depths)),
            tuple(int(n) for n in (self.num_heads or heads)),
            int(period if self.extra_norm_period < 0 else self.extra_norm_period))

  @property
  def stride(self) -> int:
    """Input pixels per position of the final feature map (32 for patch 4 and 4 stages)."""
    return self.patch_size * 2 ** (len(self.dims[1]) - 1)

  @property
  def num_features(self) -> int:
    embed, depths = self.dims[:2]
    return embed * 2 ** (len(depths) - 1)

  @nn.compact
  def __call__(self, images, *, train: bool = False, mask=None, features_only: bool = False):
    del features_only     # no head: the output is the feature map either way
    embed, depths, heads, period = self.dims
    b, hh, ww, _ = images.shape
    p = self.patch_size
    if (hh, ww) != (self.image_size, self.image_size):
      raise ValueError(f"this Swin is built for {self.image_size}px images, got {hh}x{ww}: "
                       f"set config.input.image_size")
    x = PatchEmbed(p, embed, self.patch_norm, self.dtype, self.param_dtype,
                   name="patch_embed")(images)
    gh, gw = x.shape[1:3]
    if self.use_mask_token:
      tok = self.param("mask_token", linear_init, (1, 1, embed), self.param_dtype)
      if mask is not None:
        w = mask.reshape(b, gh, gw, 1).astype(x.dtype)
        x = x * (1 - w) + tok.astype(x.dtype).reshape(1, 1, 1, embed) * w
    if self.ape:
      pe = self.param("absolute_pos_embed", linear_init, (1, gh * gw, embed), self.param_dtype)
      x = x + pe.astype(x.dtype).reshape(1, gh, gw, embed)
    rates = vit.drop_path_rates(sum(depths), self.drop_path)
    pws = tuple(self.pretrained_window_sizes) or (0,) * len(depths)
    for i, depth in enumerate(depths):
      start = sum(depths[:i])
      x = BasicLayer(depth, heads[i], self.window_size, self.version, self.mlp_ratio,
                     self.qkv_bias, tuple(rates[start:start + depth]), int(pws[i]), period,
                     i < len(depths) - 1, self.remat, self.attn_impl, self.attn_pad, self.dtype,
                     self.param_dtype, name=f"layers_{i}")(x, train)
    return layer_norm("norm", self.param_dtype)(x)


# ---------------------------------------------------------------------------------------------
# The models registry's contract (mim_jax/models/__init__.py).

# config.model of a Swin. depths / num_heads () and embed_dim 0 take the variant's;
# extra_norm_period -1 the variant's (6 for Swin V2-H and -G, else 0); pretrained_window_sizes
# () means 0 for every stage (v2: normalise by the window itself).
DEFAULTS = dict(name="swin", variant="tiny", version=1, patch_size=4, window_size=7,
                embed_dim=0, depths=(), num_heads=(), mlp_ratio=4.0, qkv_bias=True, ape=False,
                patch_norm=True, drop_path=0.1, pretrained_window_sizes=(),
                extra_norm_period=-1, remat=False, attn_impl="", attn_pad=-1, dtype="float32",
                param_dtype="float32")

# How the model is computed, not what it is: a checkpoint resumes across these.
EXECUTION_OPTIONS = ("dtype", "attn_impl", "attn_pad", "remat")
_ATTN_IMPLS = ("", None, "xla", "cudnn")
_DTYPES = ("float32", "bfloat16", "float16")


def default_config(**kw) -> ml_collections.ConfigDict:
  """`config.model` of a Swin: DEFAULTS (Swin-T v1, patch 4, window 7) updated by `kw`;
  ValueError for a key that is not a Swin key."""
  cfg = dict(DEFAULTS)
  for k, v in kw.items():
    if k not in DEFAULTS:
      raise ValueError(f"config.model.{k}: not a Swin key; use {', '.join(DEFAULTS)}")
    cfg[k] = v
  return ml_collections.ConfigDict(cfg)


def _ints(value) -> tuple:
  return tuple(int(v) for v in (value or ()))


def resolved(model_cfg) -> tuple[int, tuple[int, ...], tuple[int, ...], int]:
  """(embed_dim, depths, num_heads, extra_norm_period) of `config.model`, variant defaults
  filled in."""
  get = lambda k: model_cfg.get(k, DEFAULTS[k])  # noqa: E731
  embed, depths, heads, period = VARIANTS[variant_name(get("variant"))]
  p = int(get("extra_norm_period"))
  return (int(get("embed_dim") or embed), _ints(get("depths")) or depths,
          _ints(get("num_heads")) or heads, period if p < 0 else p)


def check_config(model_cfg) -> None:
  """ValueError (one line naming the allowed values) for a key that is not a Swin key or a bad
  variant, version, size, width, depth, head count, drop path, v2-only key or dtype."""
  unknown = [k for k in model_cfg.keys() if k not in DEFAULTS]
  if unknown:
    raise ValueError(f"config.model.{unknown[0]}: not a Swin key; use {', '.join(DEFAULTS)}")
  get = lambda k: model_cfg.get(k, DEFAULTS[k])  # noqa: E731
  name = variant_name(get("variant"))
  version = get("version")
  if version not in (1, 2):
    raise ValueError(f"config.model.version={version!r}: use 1 (Swin) or 2 (Swin V2)")
  if version == 1 and name in V2_ONLY:
    raise ValueError(f"config.model.variant={name!r} is a Swin V2 size: set "
                     f"config.model.version=2 or use tiny, small, base or large")
  for key in ("patch_size", "window_size"):
    v = get(key)
    if isinstance(v, bool) or not isinstance(v, int) or v < 1:
      raise ValueError(f"config.model.{key}={v!r}: use an integer >= 1")
  embed, depths, heads, period = resolved(model_cfg)
  if embed < 1 or not depths or min(depths) < 1 or len(heads) != len(depths):
    raise ValueError(f"config.model: embed_dim {embed}, depths {list(depths)} and num_heads "
                     f"{list(heads)} must be positive with one head count per stage")
  for i, h in enumerate(heads):
    if h < 1 or (embed * 2 ** i) % h:
      raise ValueError(f"config.model.num_heads: {h} heads do not divide stage {i}'s width "
                       f"{embed * 2 ** i}: use head counts that divide embed_dim * 2^stage")
  if not get("mlp_ratio") > 0:
    raise ValueError(f"config.model.mlp_ratio={get('mlp_ratio')!r}: use a value > 0 (4 is Swin's)")
  if not 0.0 <= float(get("drop_path")) < 1.0:
    raise ValueError(f"config.model.drop_path={get('drop_path')!r}: use a rate in [0, 1)")
  pws = _ints(get("pretrained_window_sizes"))
  if pws and (len(pws) != len(depths) or any(w == 1 or w < 0 for w in pws)):
    raise ValueError(f"config.model.pretrained_window_sizes={list(pws)}: give one window per "
                     f"stage ({len(depths)}), each 0 (none) or >= 2, or ()")
  if version == 1 and (any(pws) or period > 0):
    raise ValueError("config.model.pretrained_window_sizes and extra_norm_period are Swin V2 "
                     "keys: set config.model.version=2 or leave them at () and -1 / 0")
  if int(get("extra_norm_period")) < -1:
    raise ValueError(f"config.model.extra_norm_period={get('extra_norm_period')}: use -1 (the "
                     f"variant's), 0 (off) or a block count")
  for key in ("qkv_bias", "ape", "patch_norm", "remat"):
    if not isinstance(get(key), bool):
      raise ValueError(f"config.model.{key}={get(key)!r}: use True or False")
  if get("attn_impl") not in _ATTN_IMPLS:
    raise ValueError(f"config.model.attn_impl={get('attn_impl')!r}: use '', 'xla' or 'cudnn'")
  for key in ("dtype", "param_dtype"):
    if get(key) not in _DTYPES:
      raise ValueError(f"config.model.{key}={get(key)!r}: use 'float32', 'bfloat16' or 'float16'")


def check_image_size(model_cfg, image_size: int) -> None:
  """ValueError (one line) unless the patch grid halves evenly at every merging and every
  stage's window divides its map."""
  p, ws = int(model_cfg.get("patch_size", 4)), int(model_cfg.get("window_size", 7))
  depths = resolved(model_cfg)[1]
  if image_size % p:
    raise ValueError(f"input.image_size={image_size} is not a multiple of model.patch_size={p}")
  r = image_size // p
  for i in range(len(depths)):
    w = window_and_shift((r, r), ws, False)[0]
    if r % w:
      raise ValueError(f"model.window_size={ws} does not divide stage {i}'s {r}x{r} map at "
                       f"{image_size}px: use a window that divides every stage's map")
    if i < len(depths) - 1 and r % 2:
      raise ValueError(f"stage {i}'s {r}x{r} map at {image_size}px cannot be merged 2x2: use an "
                       f"image size that is patch_size * 2^{len(depths) - 1} times a whole number")
    r //= 2


def summary(model_cfg, image_size: int) -> str:
  """'Swin V2-B, window 12, patch 4, 192 px' or, with custom sizes, 'Swin v1 (embed 48,
  depths 2-2-2-2), window 4, patch 2, 32 px' (the run header)."""
  version = int(model_cfg.get("version", 1))
  name = variant_name(model_cfg.get("variant", "tiny"))
  custom = any(model_cfg.get(k) for k in ("embed_dim", "depths", "num_heads"))
  if custom:
    embed, depths = resolved(model_cfg)[:2]
    what = f"Swin v{version} (embed {embed}, depths {'-'.join(map(str, depths))})"
  else:
    what = f"Swin{' V2' if version == 2 else ''}-{name[0].upper()}"
  return (f"{what}, window {model_cfg.get('window_size', 7)}, patch "
          f"{model_cfg.get('patch_size', 4)}, {image_size} px")


def from_config(model_cfg, image_size: int = 224, **overrides) -> SwinTransformer:
  """The Swin `config.model` describes (`models.build` with model.name='swin') for
  `image_size` inputs; `overrides` replace SwinTransformer fields (SimMIM's use_mask_token)."""
  check_config(model_cfg)
  check_image_size(model_cfg, image_size)
  get = lambda k: model_cfg.get(k, DEFAULTS[k])  # noqa: E731
  kw = dict(variant=variant_name(get("variant")), version=int(get("version")),
            patch_size=int(get("patch_size")), window_size=int(get("window_size")),
            image_size=int(image_size), embed_dim=int(get("embed_dim")),
            depths=_ints(get("depths")), num_heads=_ints(get("num_heads")),
            mlp_ratio=float(get("mlp_ratio")), qkv_bias=bool(get("qkv_bias")),
            ape=bool(get("ape")), patch_norm=bool(get("patch_norm")),
            drop_path=float(get("drop_path")),
            pretrained_window_sizes=_ints(get("pretrained_window_sizes")),
            extra_norm_period=int(get("extra_norm_period")), remat=bool(get("remat")),
            attn_impl=get("attn_impl") or None, attn_pad=int(get("attn_pad")),
            dtype=jnp.dtype(get("dtype")), param_dtype=jnp.dtype(get("param_dtype")))
  bad = [k for k in overrides if k not in kw and k != "use_mask_token"]
  if bad:
    raise ValueError(f"a Swin has no option {bad[0]!r}; its fields are "
                     f"{', '.join(kw)}, use_mask_token")
  kw.update(overrides)
  return SwinTransformer(**kw)


def _check_pooling(pooling: str) -> None:
  if pooling not in POOLINGS:
    raise ValueError(f"pooling={pooling!r}: a Swin pools with 'mean' (the average of its final "
                     f"tokens, Swin's avgpool)")


def _named(model: SwinTransformer, fmap: jax.Array) -> dict:
  """'tokens', 'pooled', 'stride', 'grid' of the final normed feature map [B, h, w, C]."""
  b, h, w, c = fmap.shape
  tokens = fmap.reshape(b, h * w, c).astype(jnp.float32)
  return {"tokens": tokens, "pooled": tokens.mean(axis=1), "stride": model.stride,
          "grid": (h, w)}


def outputs(model: SwinTransformer, variables, images, *, pooling: str,
            layers: bool = False) -> dict:
  """The evaluation-mode named outputs of `model` (the contract of `mim_jax.models`):
  'tokens' (the final normed map, row-major), 'pooled' (their mean, Swin's avgpool), 'stride'
  (patch x 2^(stages - 1)), 'grid', and with `layers` every block's output mean-pooled (stage
  0 first; widths double at each stage), then 'pooled'."""
  _check_pooling(pooling)
  if layers:
    fmap, state = model.apply(variables, images, mutable=["intermediates"])
    inter = state["intermediates"]
    blocks = [t for i in range(len(model.dims[1])) for t in inter[f"layers_{i}"]["block_outputs"]]
  else:
    fmap = model.apply(variables, images)
  out = _named(model, fmap)
  if layers:
    out["layers"] = [t.astype(jnp.float32).mean(axis=(1, 2)) for t in blocks] + [out["pooled"]]
  return out


def forward(model: SwinTransformer, variables, images, *, train: bool, rng=None,
            pooling: str = "mean", mask=None) -> tuple[dict, dict]:
  """The training-or-evaluation forward of the registry contract ('tokens', 'pooled',
  'stride', 'grid' as `outputs`; {}: a Swin keeps no collection besides its parameters). In
  training, `rng` drives drop path (needed when model.drop_path > 0); `mask` [B, h, w] swaps
  the masked patch embeddings for the mask token (SimMIM)."""
  _check_pooling(pooling)
  rngs = {"dropout": rng} if train and rng is not None else None
  fmap = model.apply(variables, images, train=train, mask=mask, rngs=rngs)
  return _named(model, fmap), {}


def param_count(model: SwinTransformer) -> int:
  """The number of parameters of `model`, without allocating them."""
  size = model.image_size
  shapes = jax.eval_shape(lambda: model.init(jax.random.PRNGKey(0), jnp.zeros((1, size, size, 3))))
  return sum(math.prod(x.shape) for x in jax.tree.leaves(shapes["params"]))


# ---------------------------------------------------------------------------------------------
# Optimiser rules: layer-wise lr decay and weight decay, as the official optimizer.py.

_STAGE = re.compile(r"layers_(\d+)$")
_BLOCK = re.compile(r"blocks_(\d+)$")


def _names(path) -> tuple[str, ...]:
  return tuple(str(getattr(k, "key", getattr(k, "name", k))) for k in path)


def is_swin_tree(tree: Any) -> bool:
  """Whether `tree`'s 'encoder' entry is a SwinTransformer's parameters."""
  enc = tree.get("encoder") if isinstance(tree, Mapping) else None
  return isinstance(enc, Mapping) and "patch_embed" in enc and "layers_0" in enc


def layer_ids(tree: Any) -> Optional[tuple[Any, int]]:
  """(layer id of every leaf, the largest id) for a parameter tree whose 'encoder' entry is a
  Swin, else None (the hook mim_jax.optim asks): SimMIM / Swin-Transformer `get_swin_layer`
  with num_layers = sum(depths) + 2. The mask token and the patch embedding are layer 0; block
  j of stage i is sum(depths[:i]) + j + 1; stage i's patch merging shares the id of its last
  block, sum(depths[:i + 1]); everything else (the absolute position embedding, the final
  norm, a head) is sum(depths) + 1. The lr scale is decay^(largest id - id)."""
  if not is_swin_tree(tree):
    return None
  enc = tree["encoder"]
  stages = sorted(int(m.group(1)) for m in map(_STAGE.match, enc) if m)
  depths = [len([k for k in enc[f"layers_{i}"] if _BLOCK.match(k)]) for i in stages]
  top = sum(depths) + 1

  def layer(path, _):
    names = _names(path)
    if names[0] != "encoder" or len(names) < 2:
      return top
    if names[1] in ("mask_token", "patch_embed"):
      return 0
    stage = _STAGE.match(names[1])
    if stage is None:
      return top
    i = int(stage.group(1))
    block = _BLOCK.match(names[2]) if len(names) > 2 else None
    if block is None:                    # downsample: reduction, norm
      return sum(depths[:i + 1])
    return sum(depths[:i]) + int(block.group(1)) + 1

  return jax.tree_util.tree_map_with_path(layer, tree), top


# Swin's no_weight_decay() ('absolute_pos_embed'; SimMIM's encoders add 'mask_token') and
# no_weight_decay_keywords() (v1 'relative_position_bias_table'; v2 adds 'cpb_mlp', 'logit_scale').
NO_DECAY_NAMES = ("absolute_pos_embed", "mask_token")
NO_DECAY_KEYWORDS = ("relative_position_bias_table", "cpb_mlp", "logit_scale")


def decays(names: tuple[str, ...], ndim: int, keywords: bool = True) -> bool:
  """The official weight-decay rule for a Swin parameter at `names` (its path inside the
  encoder): no decay for 1-D parameters, biases, NO_DECAY_NAMES and, with `keywords`, any
  parameter whose path holds a NO_DECAY_KEYWORDS name.

  keywords=False is SimMIM pretraining: the optimiser is built on the SimMIM wrapper, whose
  no_weight_decay_keywords() are prefixed 'encoder.' ('encoder.relative_position_bias_table'),
  and that string occurs in no parameter name ('encoder.layers.0.blocks.0.attn.relative_...'),
  so the tables, cpb_mlp weights and logit scales are decayed there, as here. Fine-tuning
  builds it on the bare SwinTransformer, where the keywords match (keywords=True)."""
  if ndim <= 1 or names[-1] == "bias" or names[-1] in NO_DECAY_NAMES:
    return False
  return not (keywords and any(k in n for n in names for k in NO_DECAY_KEYWORDS))


# ---------------------------------------------------------------------------------------------
# Fine-tuning at another window size or resolution.

def _geometric_positions(src: int, dst: int) -> tuple[np.ndarray, np.ndarray]:
  """SimMIM's remap_pretrained_keys_swin: the source offsets on a geometric grid (ratio q found
  by bisection so that the outermost offset reaches dst // 2) and the integer target offsets."""
  def progression(a, r, n):
    return a * (1.0 - r ** n) / (1.0 - r)
  left, right = 1.01, 1.5
  while right - left > 1e-6:
    q = (left + right) / 2.0
    if progression(1, q, src // 2) > dst // 2:
      right = q
    else:
      left = q
  dis, cur = [], 1
  for i in range(src // 2):
    dis.append(cur)
    cur += q ** (i + 1)
  x = np.asarray([-d for d in reversed(dis)] + [0] + dis, np.float64)
  t = dst // 2.0
  return x, np.arange(-t, t + 0.1, 1.0)


def interpolate_bias_table(table, dst_window: int, method: str = "bicubic") -> np.ndarray:
  """A v1 relative position bias table [(2 w - 1)^2, heads] resized to `dst_window`'s
  [(2 dst_window - 1)^2, heads] (float32 numpy), each head's (2w - 1)^2 grid as an image:

    'bicubic'    Swin-Transformer utils.load_pretrained: F.interpolate(mode='bicubic',
                 align_corners=False, size=(S2, S2));
    'geometric'  SimMIM utils.remap_pretrained_keys_swin (its Swin fine-tuning): the source
                 offsets on a geometric grid, scipy's interp2d(kind='cubic') evaluated at the
                 integer target offsets (written with RectBivariateSpline(kx=ky=3, s=0), the
                 same interpolating spline on a grid; interp2d is gone from scipy).
  """
  table = np.asarray(table, np.float64)
  s1, s2 = int(round(table.shape[0] ** 0.5)), 2 * dst_window - 1
  if s1 * s1 != table.shape[0]:
    raise ValueError(f"a bias table of {table.shape[0]} rows is not a square grid of offsets")
  if s1 == s2:
    return table.astype(np.float32)
  grids = table.T.reshape(-1, s1, s1)
  if method == "bicubic":
    m = vit.torch_bicubic_matrix(s1, s2, s2 / s1)
    out = np.einsum("ij,hjk,lk->hil", m, grids, m)
  elif method == "geometric":
    from scipy import interpolate  # pylint: disable=g-import-not-at-top
    x, dx = _geometric_positions(s1, s2)
    out = np.stack([interpolate.RectBivariateSpline(x, x, g.T, kx=3, ky=3, s=0)(dx, dx).T
                    for g in grids])
  else:
    raise ValueError(f"bias table interpolation {method!r}: use 'bicubic' (Swin-Transformer) or "
                     f"'geometric' (SimMIM)")
  return out.reshape(-1, s2 * s2).T.astype(np.float32)


def interpolate_pos_embed(pe, dst_grid: int) -> np.ndarray:
  """An absolute position embedding [1, g^2, C] resized bicubically to [1, dst_grid^2, C]
  (Swin-Transformer utils.load_pretrained, size=(S2, S2))."""
  pe = np.asarray(pe, np.float64)
  g = int(round(pe.shape[1] ** 0.5))
  m = vit.torch_bicubic_matrix(g, dst_grid, dst_grid / g)
  out = np.einsum("ij,jkc,lk->ilc", m, pe[0].reshape(g, g, -1), m)
  return out.reshape(1, dst_grid * dst_grid, -1).astype(np.float32)


def adapt_pretrained(loaded: Any, target: Any, method: str = "geometric") -> Any:
  """`loaded` (a Swin's parameters, numpy) with every v1 relative position bias table and the
  absolute position embedding resized to `target`'s shapes where they differ (fine-tuning at
  another window size or resolution); v2's tables are computed, not stored. Other entries are
  left as they are (merging reports any other mismatch)."""
  shapes = {_names(p): tuple(v.shape) for p, v in jax.tree_util.tree_flatten_with_path(target)[0]}

  def fit(path, value):
    names = _names(path)
    want = shapes.get(names)
    if want is None or tuple(np.shape(value)) == want:
      return value
    if names[-1] == "relative_position_bias_table" and np.shape(value)[1] == want[1]:
      return interpolate_bias_table(value, (int(round(want[0] ** 0.5)) + 1) // 2, method)
    if names[-1] == "absolute_pos_embed" and np.shape(value)[2] == want[2]:
      return interpolate_pos_embed(value, int(round(want[1] ** 0.5)))
    return value

  return jax.tree_util.tree_map_with_path(fit, loaded)


# -- fine-tuning (the hooks mim_jax/methods/finetune.py reads) --------------------------------
# Config keys that must equal the pretraining run's (the window and v2's pretrained windows
# may differ: their tables are resized or computed).
FINETUNE_ARCH_KEYS = ("variant", "version", "patch_size", "embed_dim", "depths", "num_heads",
                      "mlp_ratio", "qkv_bias", "ape", "patch_norm", "extra_norm_period")
FINETUNE_HEAD_STD = 0.02        # _init_weights: timm trunc_normal_(std=.02) on the head


def finetune_adapt(loaded: Any, init: Any, finetune_cfg) -> Any:
  """`adapt_pretrained` with finetune.table_interp ('geometric', SimMIM's
  remap_pretrained_keys_swin, default; 'bicubic', Swin-Transformer's load_pretrained)."""
  return adapt_pretrained(loaded, init, str(finetune_cfg.get("table_interp", "geometric")))


def finetune_decays(names: tuple[str, ...], ndim: int) -> bool:
  """The official fine-tuning weight-decay rule (`decays` with its keywords)."""
  return decays(names, ndim, keywords=True)
