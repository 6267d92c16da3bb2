"""SimMIM: a Simple Framework for Masked Image Modeling (Xie et al., 2022).

Exact to microsoft/SimMIM `models/simmim.py`, `data/data_simmim.py` and its ViT:
  * masks drawn on a coarse grid of mask patches (32 px), exactly ceil(T * ratio) of the T
    mask patches per image, upsampled to the model's patch grid;
  * a learnable mask token (trunc-normal std .02 cut at +-.02) replaces the embeddings of the
    masked patches before the encoder, which runs over all tokens;
  * the encoder (BEiT-style ViT in the official ViT-B config): q and v biases, layer scale 0.1,
    a shared relative position bias, no absolute position embedding, trunc-normal .02 weights
    with proj/fc2 rescaled by 1/sqrt(2 * layer), drop path 0.1 — all set in config.model;
  * decoder: one linear layer (a 1x1 conv) to stride^2 * 3 channels + pixel shuffle;
  * L1 loss on the normalised pixels, summed over masked pixels and divided by
    (masked pixels + 1e-5) and by the 3 channels.
"""
from __future__ import annotations

import flax.linen as nn
import jax
import jax.numpy as jnp

from mim_jax import masking
from mim_jax.methods.base import Method
from mim_jax.models import vit


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
  def __call__(self, tokens):
    """tokens [B, 1+L, D] (cls first) -> image [B, H, W, 3]."""
    x = tokens[:, 1:]
    b, n, d = x.shape
    g = int(round(n ** 0.5))
    # nn.Conv2d(d, stride^2*3, 1) keeps PyTorch's default init: U(+-1/sqrt(fan_in)).
    init = vit.torch_default_uniform(d)
    x = nn.Dense(self.stride ** 2 * 3, dtype=self.dtype, param_dtype=self.param_dtype,
                 kernel_init=init, bias_init=init, name="conv1x1")(x)
    return pixel_shuffle(x.reshape(b, g, g, -1).astype(jnp.float32), self.stride)


def simmim_loss(images: jax.Array, rec: jax.Array, pixel_mask: jax.Array) -> jax.Array:
  """L1 over masked pixels and channels: sum(|x - rec| * m) / (sum(m) + 1e-5) / C."""
  c = images.shape[-1]
  m = pixel_mask[..., None].astype(jnp.float32)
  return jnp.sum(jnp.abs(images - rec) * m) / (jnp.sum(m) + 1e-5) / c


class SimMIM(Method):
  name = "simmim"
  # ViT.no_weight_decay() of the official code: {'pos_embed', 'cls_token'} (mask_token and the
  # relative position bias table are decayed there, and so here).
  no_decay_names = ("pos_embed", "cls_token")

  def __init__(self, config):
    super().__init__(config)
    c = config.simmim
    self.mask_patch = int(c.mask_patch_size)
    self.mask_ratio = float(c.mask_ratio)
    self.patch = config.model.patch_size
    m = config.model
    self.decoder = SimMIMDecoder(self.patch, jnp.dtype(m.get("dtype", "float32")),
                                 jnp.dtype(m.get("param_dtype", "float32")))

  def encoder_overrides(self):
    return {"use_mask_token": True}

  def make_mask(self, rng, batch):
    return masking.simmim_mask(rng, batch, self.image_size, self.mask_patch, self.patch,
                               self.mask_ratio)

  def init(self, rng, images):
    r1, r2 = jax.random.split(rng)
    enc = self.encoder.init(r1, images, mask=self.make_mask(r2, images.shape[0]).reshape(images.shape[0], -1))["params"]
    tokens = self.encoder.apply({"params": enc}, images)
    return {"encoder": enc, "decoder": self.decoder.init(r2, tokens)["params"]}

  def forward(self, params, images, rng, train):
    mrng, drng = jax.random.split(rng)
    mask = self.make_mask(mrng, images.shape[0])
    tokens = self.encoder.apply({"params": params["encoder"]}, images,
                                mask=mask.reshape(images.shape[0], -1), deterministic=not train,
                                rngs={"dropout": drng} if train else None)
    rec = self.decoder.apply({"params": params["decoder"]}, tokens)
    pixel_mask = jnp.repeat(jnp.repeat(mask, self.patch, axis=1), self.patch, axis=2)
    return rec, pixel_mask

  def loss(self, params, state, images, rng, step):
    images = images.astype(jnp.float32)
    rec, pixel_mask = self.forward(params, images, rng, train=True)
    return simmim_loss(images, rec, pixel_mask), {"mask_ratio": jnp.mean(pixel_mask.astype(jnp.float32))}

  def reconstruct(self, params, state, images, rng):
    images = images.astype(jnp.float32)
    rec, pixel_mask = self.forward(params, images, rng, train=False)
    m = pixel_mask[..., None].astype(jnp.float32)
    return {"masked": images * (1 - m), "reconstruction": rec * m + images * (1 - m)}
