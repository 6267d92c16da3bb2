"""DeepMIM: Deep Supervision for Masked Image Modeling (Ren et al., WACV 2025).

MAE (`mim_jax.methods.mae`: masking, encoder, decoder and loss unchanged) with deep
supervision, exact to OliverRensu/DeepMIM `models_mae.py` and `engine_pretrain.py`:
  * extra decoders read the outputs of intermediate encoder blocks (blocks 6, 8 and 10 of the
    12 of ViT-B, 1-based: the residual stream right after the block, WITHOUT the encoder's
    final norm, which only the last output goes through);
  * each extra decoder is a full MAE decoder of its own (linear embed, its own mask token,
    un-shuffle, the fixed sin-cos decoder position embedding, blocks, norm, linear
    prediction), built like the main one; all of them see the same mask and visible tokens;
  * every decoder reconstructs the masked patches with MAE's loss, and the losses are summed
    with weight 1 each (`loss1 + loss2 + loss3 + loss4`).

The released code trains DeepMIM-CLIP (decoders regress CLIP features with a cosine loss);
the pixel target here is the paper's DeepMIM-MAE (MAE's norm-pix MSE on every decoder). See
configs/deepmim.py for the recipe and deviations.
"""
from __future__ import annotations

import jax
import jax.numpy as jnp

from mim_jax import masking
from mim_jax.methods.mae import MAE, mae_loss
from mim_jax.models import vit
from mim_jax.targets import pixels


class DeepMIM(MAE):
  name = "deepmim"

  def __init__(self, config):
    super().__init__(config)
    c = config.deepmim
    self.blocks = tuple(int(b) for b in c.blocks)
    self.weights = tuple(float(w) for w in c.loss_weights)
    depth = self.encoder.depth or vit.variant(self.encoder.variant)[1]
    if any(not 1 <= b < depth for b in self.blocks) or len(set(self.blocks)) != len(self.blocks):
      raise ValueError(f"deepmim.blocks={self.blocks}: distinct 1-based block indices below the "
                       f"depth {depth} (the last block feeds the main decoder)")
    if len(self.weights) != len(self.blocks) + 1:
      raise ValueError(f"deepmim.loss_weights needs {len(self.blocks) + 1} entries (one per "
                       f"deepmim.blocks entry, then the final decoder), got {len(self.weights)}")
    # Each extra decoder is the main one's twin (its own parameters, the same options).
    self.aux_decoders = {self.aux_name(b): self.decoder.clone() for b in self.blocks}

  @staticmethod
  def aux_name(block: int) -> str:
    return f"block{block}"

  def encode_with_blocks(self, encoder_params, images, keep_ids):
    """Final-norm latent [B, 1+K, D] and every block's output (before the final norm)."""
    latent, inter = self.encoder.apply({"params": encoder_params}, images, keep_ids=keep_ids,
                                       mutable=["intermediates"])
    return latent, inter["intermediates"]["encoder"]["block_outputs"]

  def init(self, rng, images):
    r0, r1, r2 = jax.random.split(rng, 3)
    params = super().init(r0, images)
    sm = masking.random_shuffle_mask(r2, images.shape[0], self.num_patches, self.mask_ratio)
    _, outs = self.encode_with_blocks(params["encoder"], images, sm.keep_ids)
    keys = jax.random.split(r1, len(self.blocks))
    params["aux_decoders"] = {
        self.aux_name(b): self.aux_decoders[self.aux_name(b)].init(k, outs[b - 1], sm.restore_ids)["params"]
        for b, k in zip(self.blocks, keys)}
    return params

  def forward_all(self, params, images, rng):
    """Predictions [B, L, p*p*3] of every decoder (the blocks' in config order, then the main
    one) and the mask."""
    sm = masking.random_shuffle_mask(rng, images.shape[0], self.num_patches, self.mask_ratio)
    latent, outs = self.encode_with_blocks(params["encoder"], images, sm.keep_ids)
    preds = [self.aux_decoders[self.aux_name(b)].apply(
        {"params": params["aux_decoders"][self.aux_name(b)]}, outs[b - 1], sm.restore_ids)
             for b in self.blocks]
    preds.append(self.decoder.apply({"params": params["decoder"]}, latent, sm.restore_ids))
    return preds, sm

  def loss(self, params, state, images, rng, step):
    images = images.astype(jnp.float32)
    preds, sm = self.forward_all(params, images, rng)
    target = pixels.pixel_target(images, self.patch, self.norm_pix)
    losses = [mae_loss(p, target, sm.mask) for p in preds]
    total = sum(w * l for w, l in zip(self.weights, losses))
    names = [f"loss_{self.aux_name(b)}" for b in self.blocks] + ["loss_final"]
    return total, {"mask_ratio": jnp.mean(sm.mask), **dict(zip(names, losses))}
