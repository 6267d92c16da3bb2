"""MaskFeat: Masked Feature Prediction for Self-Supervised Visual Pre-Training (Wei et al., 2022).

The image model, exact to facebookresearch/SlowFast (`slowfast/models/masked.py` MaskMViT in
its MaskFeat mode, `slowfast/models/head_helper.py` MSSeparateHead, `slowfast/models/
operators.py` HOGLayerC, `slowfast/datasets/imagenet.py` + `transform.py` MaskingGenerator,
`slowfast/models/losses.py` MultipleMSELoss, `configs/masked_ssl/in1k_VIT_B_MaskFeat_PT.yaml`):
  * BEiT block-wise masks drawn on the patch grid: num = round(G*G * ratio) patches at most
    (round(196 * 0.4) = 78 for ViT-B/16 at 224 px), rectangles of at least num // 5 patches
    (15), aspect ratio in [0.3, 1/0.3], no cap per rectangle (masking.block_mask);
  * a learnable mask token replaces the embeddings of the masked patches before the position
    embedding is added; the encoder (a plain ViT: qkv bias, learned absolute position
    embedding, cls token, no layer scale, drop path 0) runs over all tokens;
  * the head: the LayerNorm (eps 1e-6) that replaces the encoder's final norm (here the ViT's
    own final norm), the cls token dropped, one Linear to 3 * 9 * (16 / 8)^2 = 108 outputs;
  * the target: HOG of the normalised input (mim_jax.targets.hog: 9 bins, 8-pixel cells,
    per-cell per-channel L2 norm), 108 values per patch in the official order;
  * loss: MSE averaged over every masked patch of the batch and its 108 values (nn.MSELoss on
    the masked rows only);
  * initialisation (`official_init`, config.maskfeat.official_init): every Linear weight
    ~ N(0, 0.02) (torch trunc_normal_(std=.02) cuts at +-2, i.e. +-100 std), Linear and
    LayerNorm biases 0.02 and LayerNorm weights 1 in the blocks (MViT._init_weights), the
    patch-embedding Conv2d weight ~ N(0, 0.02) with PyTorch's default U(+-1/sqrt(3 p^2)) bias,
    cls token, position embedding and mask token ~ N(0, 0.02), the head's norm 1 / 0 and its
    Linear ~ N(0, 0.02) with zero bias (MSSeparateHead._init_weights);
  * weight decay on every parameter of 2 or more dims (ZERO_WD_1D_PARAM; ZERO_DECAY_POS_CLS is
    False, so the cls token, position embedding and mask token are decayed).

On an MViTv2 (config.model.name='mvit'), exact to SlowFast's MaskMViT (`_maskfeat_forward`,
`_get_multiscale_mask`, `_get_hog_label_2d`) with `calc_mvit_feature_geometry` and
`datasets/imagenet.py` `_prepare_im_masked`:
  * the prediction comes from the last block (MASK.PRETRAIN_DEPTH [15] of MViTv2-S: MaskMViT
    deletes the blocks after it; one pretrain depth, as every released MaskFeat config), at
    that block's feature grid and stride (14x14, stride 16 at 224 px for MViTv2-S with the
    query stride of its last stage transition set to 1, as k400_MVITv2_S_16x4_MaskFeat_PT.yaml
    does "for 14x14 output");
  * the block mask is drawn on that feature grid (mask_window_size = feat_size, num =
    round(h * w * MASK_RATIO), at least num // 5 per block, no cap per block:
    MAX_MASK_PATCHES_PER_BLOCK None), the same generator as above;
  * the mask token replaces the patch embeddings (MViT's 56x56 grid at 224 px) where the mask,
    upsampled by nearest neighbour (F.interpolate) to the patch grid, is 1: after the patch
    embedding, before the cls token and any absolute position embedding
    (models.mvit.MViT's `mask`);
  * the target: HOG of the normalised input, 8-pixel cells unfolded in blocks of
    (H / 8) / feat_size cells per output token (2x2 at stride 16: 108 values);
  * the head (MSSeparateHead): LayerNorm (eps 1e-6) on the block output (here the MViT's final
    norm, which MaskMViT deletes and the head's replaces), the cls token dropped when there is
    one, one Linear to the HOG size per token, the same MSE over the masked tokens;
  * initialisation (`official_init`): SlowFast MViT._init_weights (Linear and Conv
    weights, the pooling convolutions included, ~ N(0, .02), Linear and LayerNorm biases 0.02,
    LayerNorm weights 1; the patch Conv2d bias keeps PyTorch's default U(+-1/sqrt(3 k^2))),
    cls and mask tokens, position table and relative position tables ~ N(0, .02), the head as
    above. (The MViT's own initialisation, without official_init, is facebookresearch/mvit's:
    zero biases, default-initialised convolutions.)
On clips (a video MViT, config.model.num_frames > 0), exact to MaskMViT's video path
(`_maskfeat_forward`, `_get_multiscale_mask`, `_get_hog_label_3d`) and the Kinetics loader's
`_gen_mask` (configs/masked_ssl/k400_MVITv2_S_16x4_MaskFeat_PT.yaml):
  * cube masks (`masking.cube_mask`, MaskingGenerator3D) on the mask window
    (`maskfeat.mask_window`, AUG.MASK_WINDOW_SIZE [8, 7, 7] for 16 frames: one row per token
    frame), at most round(8 * 7 * 7 * 0.4) = 157 cells, cuboids whose face covers 49 // 5 = 9
    to 49 cells;
  * the window mask upsampled frame by frame (nearest, in space only) to the patch grid for the
    mask token (56x56) and to the output grid for the loss (14x14);
  * the target: HOG of every PATCH_STRIDE[0]-th (2nd) frame of the normalised clip, the image
    target per frame, tokens in (t, h, w) order (`hog.hog_target_3d`);
  * the same head and MSE over the masked output tokens, the same initialisation (the Conv3d
    patch bias's fan in counts its 3 frames).
There is no `reconstruct`: the model predicts HOG, not pixels, so the configs turn the
reconstruction picture off.
"""
from __future__ import annotations

import flax.linen as nn
import jax
import jax.numpy as jnp

from mim_jax import masking, models
from mim_jax.methods.base import Method, path_names
from mim_jax.models import mvit, vit
from mim_jax.targets import hog

# torch.nn.init.trunc_normal_(std=0.02) keeps its default bounds a=-2, b=2 (absolute), which
# are +-100 standard deviations: in effect an untruncated N(0, 0.02).
_NORMAL_02 = vit.timm_trunc_normal(0.02)


class MaskFeatHead(nn.Module):
  """MSSeparateHead without a decoder: drop the cls token (when the encoder has one), one
  Linear to the target size. (Its LayerNorm is the encoder's final norm, applied before the
  tokens reach the head.)"""
  out_dim: int
  dtype: jnp.dtype = jnp.float32
  param_dtype: jnp.dtype = jnp.float32
  has_cls: bool = True

  @nn.compact
  def __call__(self, tokens):
    """tokens [B, (1+)L, D] (cls first, after the final norm) -> predictions [B, L, out_dim]."""
    x = tokens[:, 1:] if self.has_cls else tokens
    x = nn.Dense(self.out_dim, dtype=self.dtype, param_dtype=self.param_dtype,
                 kernel_init=_NORMAL_02, bias_init=nn.initializers.zeros, name="proj")(x)
    return x.astype(jnp.float32)


def maskfeat_loss(pred: jax.Array, target: jax.Array, mask: jax.Array) -> jax.Array:
  """Mean squared error over the masked patches of the whole batch and all target values:
  sum_masked ||pred - target||^2 / (number of masked patches * target size)."""
  m = mask.astype(jnp.float32)
  per_patch = jnp.sum((pred - target) ** 2, axis=-1)
  return jnp.sum(per_patch * m) / (jnp.maximum(jnp.sum(m), 1.0) * pred.shape[-1])


def num_masking_patches(grid: int, mask_ratio: float) -> int:
  """round(G * G * ratio) as `slowfast/datasets/imagenet.py` (Python's round, half to even)."""
  return int(round(grid * grid * mask_ratio))


def official_init(rng: jax.Array, params: dict, patch_kernel: int, in_channels: int = 3,
                  patch_frames: int = 1) -> dict:
  """Re-draws the encoder and head parameters as the official MaskFeat initialises them (see
  the module docstring), for the ViT (`patch_kernel` = the patch size) and the MViT
  (SlowFast's MaskMViT, `patch_kernel` = its patch-embedding kernel) alike: every Linear and
  pooling Conv weight N(0, .02), biases .02, LayerNorms 1 / 0 inside the blocks; the head N(0,
  .02) / 0; the patch embedding N(0, .02) with torch's default conv bias; cls, position and
  mask tokens N(0, .02); the final norm ('norm' outside the blocks) 1 / 0 (`patch_frames`: the
  video patch Conv3d's time extent, in its bias's fan in). Parameters it has
  no rule for (a relative position table, layer-scale gammas) keep their own initialisation
  (the MViT's relative tables: its own N(0, .02), which MultiScaleAttention draws and
  _init_weights leaves alone)."""
  leaves, treedef = jax.tree_util.tree_flatten_with_path(params)
  keys = jax.random.split(rng, len(leaves))
  conv_bias = vit.torch_default_uniform(in_channels * patch_frames * patch_kernel * patch_kernel)

  def draw(names, key, p):
    leaf = names[-1]
    if names[0] == "head":
      return _NORMAL_02(key, p.shape, p.dtype) if leaf == "kernel" else jnp.zeros_like(p)
    if names[0] != "encoder":
      return p
    if names[1] == "patch_embed":
      return _NORMAL_02(key, p.shape, p.dtype) if leaf == "kernel" else conv_bias(key, p.shape, p.dtype)
    if leaf in ("cls_token", "pos_embed", "mask_token"):
      return _NORMAL_02(key, p.shape, p.dtype)
    in_block = any(n.startswith("block") for n in names)
    if not in_block and names[-2] == "norm":           # the final norm before the head
      return jnp.ones_like(p) if leaf == "scale" else jnp.zeros_like(p)
    if in_block:
      if leaf in ("kernel", "qkv_kernel"):             # Linear and pooling Conv weights
        return _NORMAL_02(key, p.shape, p.dtype)
      if leaf in ("bias", "qkv_bias", "q_bias", "v_bias"):   # Linear and LayerNorm biases
        return jnp.full_like(p, 0.02)
      if leaf == "scale":
        return jnp.ones_like(p)
    return p

  new = [draw(path_names(path), k, p) for (path, p), k in zip(leaves, keys)]
  return jax.tree_util.tree_unflatten(treedef, new)


class MaskFeat(Method):
  name = "maskfeat"
  # ZERO_WD_1D_PARAM only: 1-D parameters are not decayed (the base class's rule), every
  # other parameter is, position embedding and cls / mask tokens included.
  no_decay_names = ()

  def __init__(self, config):
    super().__init__(config)
    c = config.maskfeat
    self.backbone = models.name_of(config.model)
    if self.backbone == "vit":
      self.patch = config.model.patch_size
      self.grid = self.image_size // self.patch
      has_cls = True
    elif self.backbone == "mvit":
      # MaskMViT predicts at the last block's feature grid (its stride plays the patch's part).
      self.grid = self.encoder.grid
      self.patch = self.encoder.stride
      has_cls = self.encoder.cls_token
      if self.patch * self.grid != self.image_size:
        raise ValueError(f"the MViT's {self.grid}x{self.grid} output grid does not tile the "
                         f"{self.image_size}px input: use an image size its strides divide")
    else:
      raise ValueError(f"MaskFeat runs on model.name 'vit' or 'mvit', got {self.backbone!r}")
    self.video = models.takes_clips(config.model)
    if self.video and self.backbone != "mvit":
      raise ValueError("MaskFeat on clips runs on a video MViT (model.name='mvit' with "
                       "model.num_frames > 0, SlowFast's MaskMViT), not a space-time ViT")
    # Video: the token frames, and the cube mask's window (AUG.MASK_WINDOW_SIZE; () = the
    # output grid), upsampled in space to the output grid as `_get_multiscale_mask` does.
    self.frames = self.encoder.frames if self.video else 1
    window = tuple(int(n) for n in (c.get("mask_window", ()) or ()))
    self.window = window or (self.frames, self.grid, self.grid)
    if self.video and (len(self.window) != 3 or self.window[0] != self.frames
                       or min(self.window) < 1):
      raise ValueError(f"config.maskfeat.mask_window={list(window)}: use (frames, h, w) with "
                       f"frames = the MViT's {self.frames} token frames (SlowFast's [8, 7, 7] "
                       "at 16 frames), or () for the output grid")
    self.nbins = int(c.hog_bins)
    self.cell = int(c.hog_cell)
    if self.patch % self.cell:
      what = "patch size" if self.backbone == "vit" else "MViT's output stride"
      raise ValueError(f"config.maskfeat.hog_cell={self.cell} must divide the {what} {self.patch}")
    self.mask_ratio = float(c.mask_ratio)
    self.num_masking = num_masking_patches(self.grid, self.mask_ratio)
    self.min_block = self.num_masking // 5
    self.use_official_init = bool(c.official_init)
    m = config.model
    self.head = MaskFeatHead(hog.target_dim(self.patch, self.cell, self.nbins),
                             jnp.dtype(m.get("dtype", "float32")),
                             jnp.dtype(m.get("param_dtype", "float32")), has_cls)

  def encoder_overrides(self):
    return {"use_mask_token": True}

  def make_mask(self, rng, batch):
    """[B, G*G] int32 block-wise masks, 1 = masked, at most `num_masking` per image (G: the
    ViT's patch grid, the MViT's output grid). Clips: [B, t*h*w] cube masks on the mask
    window (`masking.cube_mask`, the Kinetics loader's `_gen_mask`)."""
    if self.video:
      return masking.cube_mask(rng, batch, *self.window, ratio=self.mask_ratio)
    return masking.block_mask(rng, batch, self.grid, self.grid, self.num_masking,
                              min_num=self.min_block)

  def output_mask(self, mask):
    """The mask at the output tokens: a clip's window mask upsampled frame by frame to the
    output grid (nearest, `_get_multiscale_mask`); an image's is drawn there already."""
    return mvit.upsample_mask(mask, self.grid, self.frames) if self.video else mask

  def target(self, images):
    images = images.astype(jnp.float32)
    if self.video:       # `_get_hog_label_3d`: every PATCH_STRIDE[0]-th frame
      return hog.hog_target_3d(images, self.encoder.patch_stride_t, self.patch, self.nbins,
                               self.cell)
    return hog.hog_target(images, self.patch, self.nbins, self.cell)

  def init(self, rng, images):
    r1, r2, r3 = jax.random.split(rng, 3)
    enc = self.encoder.init(r1, images)["params"]
    tokens = self.encoder.apply({"params": enc}, images)
    params = {"encoder": enc, "head": self.head.init(r2, tokens)["params"]}
    if self.use_official_init:
      kernel = self.patch if self.backbone == "vit" else self.encoder.patch_kernel
      params = official_init(r3, params, kernel,
                             patch_frames=self.encoder.patch_kernel_t if self.video else 1)
    return params

  def forward(self, params, images, mask, rng=None, train=True):
    """Predicted HOG features [B, L, target size] of every patch (MViT: output token), masked
    ones replaced by the mask token at the input."""
    out, _ = models.forward(self.encoder, {"params": params["encoder"]}, images, train=train,
                            rng=rng, pooling=self.pooling, mask=mask)
    return self.head.apply({"params": params["head"]}, out["tokens"])

  def loss(self, params, state, images, rng, step):
    images = images.astype(jnp.float32)
    mrng, drng = jax.random.split(rng)
    mask = self.make_mask(mrng, images.shape[0])
    pred = self.forward(params, images, mask, drng, train=True)
    out_mask = self.output_mask(mask)
    loss = maskfeat_loss(pred, self.target(images), out_mask)
    return loss, {"mask_ratio": jnp.mean(out_mask.astype(jnp.float32))}

