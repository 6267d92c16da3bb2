"""MAE: Masked Autoencoders Are Scalable Vision Learners (He et al., 2022).

Exact to facebookresearch/mae `models_mae.py`:
  * per-sample random masking by argsort of uniform noise, int(L * (1 - r)) tokens kept;
  * encoder (timm blocks, qkv bias, fixed 2-D sin-cos position embedding, cls token) on the
    visible patches only;
  * decoder: linear embed, a learnable mask token appended for the removed patches, un-shuffled
    to their places, fixed sin-cos decoder position embedding, blocks, norm, linear to p*p*3;
  * MSE per patch, averaged over masked patches only; norm_pix_loss standardises each target
    patch with its own mean and unbiased variance (eps 1e-6);
  * xavier-uniform Linear weights, zero biases, cls and mask tokens ~ N(0, 0.02).
"""
from __future__ import annotations

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from mim_jax import masking
from mim_jax.methods.base import Method
from mim_jax.models import vit
from mim_jax.targets import pixels


class MAEDecoder(nn.Module):
  num_patches: int
  patch_size: int
  width: int = 512
  depth: int = 8
  heads: int = 16
  remat: bool = False
  attn_impl: str | None = None
  attn_pad: int = -1
  dtype: jnp.dtype = jnp.float32
  param_dtype: jnp.dtype = jnp.float32
  qkv_proj: str = "fused"
  residual_dtype: jnp.dtype = jnp.float32
  ln_impl: str = "flax"
  remat_policy: str = "full"

  @nn.compact
  def __call__(self, latent, restore_ids):
    """latent [B, 1+K, D] (cls first), restore_ids [B, L] -> predictions [B, L, p*p*3]."""
    x = decoder_input(self, latent, restore_ids).astype(self.residual_dtype)
    x = vit.Encoder(self.depth, self.heads, remat=self.remat, attn_impl=self.attn_impl,
                    attn_pad=self.attn_pad, dtype=self.dtype, param_dtype=self.param_dtype,
                    qkv_proj=self.qkv_proj, ln_impl=self.ln_impl, remat_policy=self.remat_policy,
                    name="blocks")(x)
    x = nn.Dense(self.patch_size ** 2 * 3, dtype=self.dtype, param_dtype=self.param_dtype,
                 kernel_init=vit.xavier_uniform, name="pred")(x)
    return x[:, 1:].astype(jnp.float32)


def decoder_input(module: nn.Module, latent: jax.Array, restore_ids: jax.Array) -> jax.Array:
  """MAE's decoder input, built inside `module`'s compact call (its `width`, `num_patches`,
  `dtype`, `param_dtype`; parameters 'embed' and 'mask_token'): the latent [B, 1+K, D] linearly
  embedded, mask tokens appended and un-shuffled into place, plus the fixed sin-cos position
  embedding -> [B, 1+L, width]. Shared by MAE's decoder and decoders built on it (MILAN)."""
  x = nn.Dense(module.width, dtype=module.dtype, param_dtype=module.param_dtype,
               kernel_init=vit.xavier_uniform, name="embed")(latent).astype(jnp.float32)
  mask_token = module.param("mask_token", nn.initializers.normal(0.02), (1, 1, module.width),
                            module.param_dtype)
  x = jnp.concatenate([x[:, :1], unshuffle(x[:, 1:], mask_token.astype(x.dtype), restore_ids)], axis=1)
  grid = int(round(module.num_patches ** 0.5))
  return x + jnp.asarray(vit.sincos_2d(module.width, grid, cls_token=True))[None]


def unshuffle(visible: jax.Array, mask_token: jax.Array, restore_ids: jax.Array) -> jax.Array:
  """Appends mask tokens after the K visible tokens and un-shuffles to the original order:
  position i receives visible token j where keep_ids[j] == i, else the mask token."""
  b, k, d = visible.shape
  n = restore_ids.shape[1]
  tokens = jnp.concatenate([visible, jnp.broadcast_to(mask_token, (b, n - k, d))], axis=1)
  return vit.take_rows(tokens, restore_ids)


def mae_loss(pred: jax.Array, target: jax.Array, mask: jax.Array) -> jax.Array:
  """Mean over masked patches of the per-patch mean squared error (models_mae.forward_loss)."""
  per_patch = jnp.mean((pred - target) ** 2, axis=-1)
  return jnp.sum(per_patch * mask) / jnp.sum(mask)


class MAE(Method):
  name = "mae"

  def __init__(self, config):
    super().__init__(config)
    c = config.mae
    self.mask_ratio = float(c.mask_ratio)
    self.norm_pix = bool(c.norm_pix_loss)
    self.patch = config.model.patch_size
    self.num_patches = (self.image_size // self.patch) ** 2
    m = config.model
    self.decoder = MAEDecoder(self.num_patches, self.patch, c.decoder.width, c.decoder.depth,
                              c.decoder.heads, **vit.execution_options(m))

  def init(self, rng, images):
    r1, r2, r3 = jax.random.split(rng, 3)
    enc = self.encoder.init(r1, images)["params"]
    sm = masking.random_shuffle_mask(r3, images.shape[0], self.num_patches, self.mask_ratio)
    latent = self.encoder.apply({"params": enc}, images, keep_ids=sm.keep_ids)
    dec = self.decoder.init(r2, latent, sm.restore_ids)["params"]
    return {"encoder": enc, "decoder": dec}

  def forward(self, params, images, rng):
    sm = masking.random_shuffle_mask(rng, images.shape[0], self.num_patches, self.mask_ratio)
    latent = self.encoder.apply({"params": params["encoder"]}, images, keep_ids=sm.keep_ids)
    pred = self.decoder.apply({"params": params["decoder"]}, latent, sm.restore_ids)
    return pred, sm

  def loss(self, params, state, images, rng, step):
    pred, sm = self.forward(params, images, rng)
    target = pixels.pixel_target(images.astype(jnp.float32), self.patch, self.norm_pix)
    loss = mae_loss(pred, target, sm.mask)
    return loss, {"mask_ratio": jnp.mean(sm.mask)}

  def reconstruct(self, params, state, images, rng):
    """Prediction mapped back to pixels, visible patches pasted from the input.

    With norm_pix_loss the model predicts each patch standardised by its own mean and
    variance (scalars over the patch's p*p*3 values). The picture restores them from the
    VISIBLE patches only (`visible_patch_stats`): each masked patch gets the Gaussian-weighted
    (sigma = 1 patch) average of the visible patches' means and variances, so nothing the
    model did not see enters the picture.
    """
    images = images.astype(jnp.float32)
    pred, sm = self.forward(params, images, rng)
    p = self.patch
    target = pixels.patchify(images, p)
    mask = sm.mask[:, :, None]
    if self.norm_pix:
      mean, var = visible_patch_stats(target, sm.mask)
      pred = pred * jnp.sqrt(var + 1e-6) + mean
    rec = pred * mask + target * (1 - mask)
    return {"masked": pixels.unpatchify(target * (1 - mask), p),
            "reconstruction": pixels.unpatchify(rec, p)}


def visible_patch_stats(patches: jax.Array, mask: jax.Array, sigma: float = 1.0):
  """Per-patch mean and unbiased variance estimated from visible patches only.

  patches [B, L, D], mask [B, L] (1 = masked). Each patch gets the average of the visible
  patches' statistics weighted by exp(-d^2 / (2 sigma^2)), d the distance on the patch grid;
  a visible patch's own statistics dominate its estimate (d = 0).
  """
  b, n, _ = patches.shape
  g = int(round(n ** 0.5))
  yx = np.stack(np.meshgrid(np.arange(g), np.arange(g), indexing="ij"), -1).reshape(n, 2)
  d2 = ((yx[:, None, :] - yx[None, :, :]) ** 2).sum(-1)
  w = jnp.asarray(np.exp(-d2 / (2 * sigma ** 2)), jnp.float32)[None] * (1 - mask)[:, None, :]
  w = w / jnp.maximum(w.sum(-1, keepdims=True), 1e-12)
  mean, var = pixels.patch_stats(patches)
  return jnp.einsum("bij,bjk->bik", w, mean), jnp.einsum("bij,bjk->bik", w, var)
