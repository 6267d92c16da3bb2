"""SimMIM: a Simple Framework for Masked Image Modeling (Xie et al., 2022).

Exact to microsoft/SimMIM `models/simmim.py`, `data/data_simmim.py` and its ViT and Swin
encoders (and microsoft/Swin-Transformer's `models/simmim.py` for Swin V2 and target
normalisation):
  * masks drawn on a coarse grid of mask patches (32 px), exactly ceil(T * ratio) of the T
    mask patches per image, upsampled to the model's patch grid (`MaskGenerator`);
  * a learnable mask token (ViT: trunc-normal std .02 cut at +-.02; Swin: timm's
    trunc_normal_(std=.02)) replaces the embeddings of the masked patches before the encoder,
    which runs over all tokens (`VisionTransformerForSimMIM`, `SwinTransformerForSimMIM`,
    `SwinTransformerV2ForSimMIM`: at patch resolution, after the patch embedding's norm);
  * the ViT encoder (BEiT-style in the official ViT-B config): q and v biases, layer scale
    0.1, a shared relative position bias, no absolute position embedding, trunc-normal .02
    weights with proj/fc2 rescaled by 1/sqrt(2 * layer), drop path 0.1 — all set in
    config.model; the Swin encoder is mim_jax.models.swin (config.model.name='swin');
  * decoder: one 1x1 conv from the encoder's final feature map to stride^2 * 3 channels +
    pixel shuffle(stride), stride the encoder's total stride (`encoder_stride`: the patch for a
    ViT, 32 for a Swin with patch 4 and four stages); the conv keeps PyTorch's default init;
  * L1 loss on the normalised pixels, summed over masked pixels and divided by
    (masked pixels + 1e-5) and by the 3 channels;
  * optionally (`simmim.norm_target`, Swin V2's SimMIM config: NORM_TARGET.ENABLE with
    PATCH_SIZE 47) the targets are each pixel normalised by the mean and unbiased variance of
    its k x k neighbourhood inside the image (`norm_targets`).
Weight decay: the ViT's as SimMIM's ViT.no_weight_decay(); a Swin's by the official rule for
its pretraining (`swin.decays` with keywords=False: the relative position bias tables, v2's
cpb_mlp and logit scales are decayed, because the wrapper's 'encoder.'-prefixed keywords match
no parameter name).
"""
from __future__ import annotations

import flax.linen as nn
import jax
import jax.numpy as jnp

from mim_jax import masking, models
from mim_jax.methods.base import Method, path_names
from mim_jax.models import swin, vit

BACKBONES = ("vit", "swin")


def pixel_shuffle(x: jax.Array, r: int, channels: int = 3) -> jax.Array:
  """torch.nn.PixelShuffle in NHWC: input channel c*r*r + i*r + j -> output (h*r+i, w*r+j, c)."""
  b, h, w, _ = x.shape
  x = x.reshape(b, h, w, channels, r, r).transpose(0, 1, 4, 2, 5, 3)
  return x.reshape(b, h * r, w * r, channels)


class SimMIMDecoder(nn.Module):
  stride: int
  dtype: jnp.dtype = jnp.float32
  param_dtype: jnp.dtype = jnp.float32

  @nn.compact
  def __call__(self, tokens, grid):
    """The encoder's output tokens [B, (1 +) h w, D] (a ViT's cls first, dropped) on its
    (h, w) output grid -> image [B, h*stride, w*stride, 3]."""
    x = tokens[:, tokens.shape[1] - grid[0] * grid[1]:]
    b, _, d = x.shape
    # nn.Conv2d(d, stride^2*3, 1) keeps PyTorch's default init: U(+-1/sqrt(fan_in)).
    init = vit.torch_default_uniform(d)
    x = nn.Dense(self.stride ** 2 * 3, dtype=self.dtype, param_dtype=self.param_dtype,
                 kernel_init=init, bias_init=init, name="conv1x1")(x)
    return pixel_shuffle(x.reshape(b, *grid, -1).astype(jnp.float32), self.stride)


def simmim_loss(images: jax.Array, rec: jax.Array, pixel_mask: jax.Array) -> jax.Array:
  """L1 over masked pixels and channels: sum(|x - rec| * m) / (sum(m) + 1e-5) / C."""
  c = images.shape[-1]
  m = pixel_mask[..., None].astype(jnp.float32)
  return jnp.sum(jnp.abs(images - rec) * m) / (jnp.sum(m) + 1e-5) / c


def local_stats(images: jax.Array, k: int) -> tuple[jax.Array, jax.Array]:
  """(mean, unbiased variance clamped at 0) of each pixel's k x k neighbourhood inside the
  image, per channel (Swin-Transformer models/simmim.py `norm_targets`: avg_pool2d(stride 1,
  padding k // 2, count_include_pad=False) of x and x^2, var * n / (n - 1), n the pixels of
  the window inside the image). Box sums are two 1-D window sums."""
  r = k // 2

  def box_sum(x):
    x = jax.lax.reduce_window(x, 0.0, jax.lax.add, (1, k, 1, 1), (1, 1, 1, 1),
                              ((0, 0), (r, r), (0, 0), (0, 0)))
    return jax.lax.reduce_window(x, 0.0, jax.lax.add, (1, 1, k, 1), (1, 1, 1, 1),
                                 ((0, 0), (0, 0), (r, r), (0, 0)))

  x = images.astype(jnp.float32)
  n = box_sum(jnp.ones_like(x[:1, ..., :1]))
  mean = box_sum(x) / n
  var = (box_sum(x * x) / n - mean ** 2) * (n / (n - 1))
  return mean, jnp.maximum(var, 0.0)


def norm_targets(images: jax.Array, k: int) -> jax.Array:
  """Swin-Transformer's SimMIM `norm_targets(x, k)`: (x - local mean) / sqrt(local var + 1e-6)
  over each pixel's k x k neighbourhood (`local_stats`), k odd."""
  mean, var = local_stats(images, k)
  return (images.astype(jnp.float32) - mean) / jnp.sqrt(var + 1e-6)


class SimMIM(Method):
  name = "simmim"
  # ViT.no_weight_decay() of the official code: {'pos_embed', 'cls_token'} (mask_token and the
  # relative position bias table are decayed there, and so here). A Swin: see decay_mask.
  no_decay_names = ("pos_embed", "cls_token")

  def __init__(self, config):
    self.backbone = models.name_of(config.model)
    if self.backbone not in BACKBONES:
      raise ValueError(f"SimMIM runs on config.model.name 'vit' or 'swin', got {self.backbone!r}")
    super().__init__(config)
    c = config.simmim
    self.mask_patch = int(c.mask_patch_size)
    self.mask_ratio = float(c.mask_ratio)
    # The mask acts on the patch grid; the decoder undoes the encoder's total stride (the
    # official encoder_stride: the patch for a ViT, the final map's stride for a Swin).
    self.patch = config.model.patch_size
    stride = self.patch if self.backbone == "vit" else self.encoder.stride
    self.norm_target = int(c.get("norm_target_patch", 47)) if c.get("norm_target", False) else 0
    if self.norm_target and self.norm_target % 2 == 0:
      raise ValueError(f"config.simmim.norm_target_patch={self.norm_target}: use an odd size "
                       f"(47 as Swin V2's SimMIM)")
    m = config.model
    self.decoder = SimMIMDecoder(stride, jnp.dtype(m.get("dtype", "float32")),
                                 jnp.dtype(m.get("param_dtype", "float32")))

  def encoder_overrides(self):
    return {"use_mask_token": True}

  def make_mask(self, rng, batch):
    return masking.simmim_mask(rng, batch, self.image_size, self.mask_patch, self.patch,
                               self.mask_ratio)

  def encode(self, encoder_params, images, mask, rng=None, train=False):
    """The encoder's named outputs with the masked patches swapped for the mask token."""
    out, _ = models.forward(self.encoder, {"params": encoder_params}, images, train=train,
                            rng=rng, pooling=self.pooling, mask=mask)
    return out

  def init(self, rng, images):
    r1, r2 = jax.random.split(rng)
    mask = self.make_mask(r2, images.shape[0])
    enc = self.encoder.init(r1, images, mask=mask)["params"]
    out = self.encode(enc, images, mask)
    return {"encoder": enc, "decoder": self.decoder.init(r2, out["tokens"], out["grid"])["params"]}

  def forward(self, params, images, rng, train):
    mrng, drng = jax.random.split(rng)
    mask = self.make_mask(mrng, images.shape[0])
    out = self.encode(params["encoder"], images, mask, drng, train)
    rec = self.decoder.apply({"params": params["decoder"]}, out["tokens"], out["grid"])
    pixel_mask = jnp.repeat(jnp.repeat(mask, self.patch, axis=1), self.patch, axis=2)
    return rec, pixel_mask

  def loss(self, params, state, images, rng, step):
    images = images.astype(jnp.float32)
    rec, pixel_mask = self.forward(params, images, rng, train=True)
    target = norm_targets(images, self.norm_target) if self.norm_target else images
    return simmim_loss(target, rec, pixel_mask), {"mask_ratio": jnp.mean(pixel_mask.astype(jnp.float32))}

  def reconstruct(self, params, state, images, rng):
    images = images.astype(jnp.float32)
    rec, pixel_mask = self.forward(params, images, rng, train=False)
    if self.norm_target:     # the prediction is of normalised targets: back to the image's scale
      mean, var = local_stats(images, self.norm_target)
      rec = rec * jnp.sqrt(var + 1e-6) + mean
    m = pixel_mask[..., None].astype(jnp.float32)
    return {"masked": images * (1 - m), "reconstruction": rec * m + images * (1 - m)}

  def decay_mask(self, params):
    if self.backbone == "vit":
      return super().decay_mask(params)

    def decays(path, p):
      names = path_names(path)
      if names[0] == "encoder":
        return swin.decays(names[1:], p.ndim, keywords=False)
      return p.ndim > 1
    return jax.tree_util.tree_map_with_path(decays, params)
