"""CAE: Context Autoencoder for Self-Supervised Representation Learning (Chen et al., IJCV 2023).

Exact to lxtGH/CAE (the authors' PyTorch code) `models/modeling_cae.py`,
`models/modeling_cae_helper.py`, `furnace/engine_for_pretraining.py`,
`furnace/masking_generator.py` and `scripts/cae_base_800e.sh`:
  * block-wise masking with an exact count (`masking.block_mask(..., exact=True)`): BEiT's rectangles, drawn again
    and again until exactly `num_mask_patches` patches are masked (mim_jax.masking.block_mask
    with exact=True instead tops BEiT's mask up with single random patches, which leaves about
    5x more isolated masked patches at 98 of 14x14; tests/test_cae.py);
  * the encoder (ViT with q/v biases, layer scale, fixed 2-D sin-cos position embedding, cls
    token, drop path) runs on the visible patches only;
  * latent contextual regressor: mask queries (a learnable mask token + the masked patches'
    position embeddings) cross-attend to [visible latents, current queries] in `regressor_depth`
    blocks: x = q + g1 * CA(LN_q(q + pos_q), k = LN_k(kv + pos_kv), v = LN_v(kv)); x = LN(x);
    x = x + g2 * MLP(x); a final LayerNorm gives the predicted latents of the masked patches;
  * alignment: those predictions regress (MSE, weight `align_loss_weight`) the latents a teacher
    copy of the encoder computes from the masked patches alone, without gradient; the teacher
    is the official `momentum_update(base_momentum)` (0: a copy), applied after the target is
    computed and before the optimiser step, so step t's target comes from the encoder weights
    of step t - 1 (of step 0 at the first step); like the official teacher it runs in training
    mode (its own drop-path draws);
  * decoder: the predicted latents + position embeddings through `decoder_depth` ViT blocks, a
    LayerNorm and a linear head to the tokenizer's codebook; cross-entropy against the
    tokenizer's ids of the masked patches, averaged over all masked patches; the masked-token
    accuracy is logged (`mlm_acc`);
  * init of the base recipe (no --fix_init_weight): every Linear xavier-uniform with zero bias
    (the top-level `_init_weights` pass also resets the encoder's and the head's), LayerNorms
    1 / 0, the patch embedding, cls and mask tokens trunc-normal .02 cut at +-std, layer scales
    `layer_scale_init_value` (encoder) and `decoder_layer_scale_init_value` (regressor, decoder);
  * an encoder-to-decoder Linear + LayerNorm when the decoder width differs from the encoder's
    (applied to the latents and, without gradient, to the target).
The tokenizer is a frozen mim_jax run (config.cae.tokenizer), as in BEiT (beit.TokenizerTargets).
"""
from __future__ import annotations

from typing import Optional

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from mim_jax import masking
from mim_jax.methods.base import Method, ema_update
from mim_jax.methods.beit import TokenizerTargets, cross_entropy
from mim_jax.models import vit


# ---------------------------------------------------------------------------------------------
# Masking.

def drop_path(module: nn.Module, x: jax.Array, rate: float, deterministic: bool) -> jax.Array:
  """Stochastic depth per sample (timm's drop_path), as vit.Block does."""
  if deterministic or rate == 0.0:
    return x
  keep = 1.0 - rate
  mask = jax.random.bernoulli(module.make_rng("dropout"), keep, (x.shape[0],) + (1,) * (x.ndim - 1))
  return x * mask.astype(x.dtype) / keep


class CrossAttention(nn.Module):
  """CAE's CrossAttention: separate q, k, v projections without bias, plus learnable q and v
  biases (k's is zero) when `qkv_bias`; scaled dot-product attention; output projection."""
  num_heads: int
  qkv_bias: bool = True
  attn_impl: Optional[str] = None
  dtype: jnp.dtype = jnp.float32
  param_dtype: jnp.dtype = jnp.float32

  @nn.compact
  def __call__(self, q, k, v):
    d = q.shape[-1]
    h = self.num_heads

    def project(x, name, bias):
      w = self.param(name, vit.xavier_uniform, (d, d), self.param_dtype)
      y = jnp.einsum("bnd,de->bne", x.astype(self.dtype), w.astype(self.dtype))
      if bias:
        y = y + self.param(name.replace("kernel", "bias"), nn.initializers.zeros, (d,),
                           self.param_dtype).astype(self.dtype)
      return y.reshape(x.shape[0], x.shape[1], h, d // h)

    q = project(q, "q_kernel", self.qkv_bias)
    k = project(k, "k_kernel", False)
    v = project(v, "v_kernel", self.qkv_bias)
    out = vit.attention(q, k, v, None, self.attn_impl, 0)
    out = out.reshape(out.shape[0], out.shape[1], d)
    return nn.Dense(d, dtype=self.dtype, param_dtype=self.param_dtype, kernel_init=vit.xavier_uniform,
                    name="proj")(out)


class RegressorBlock(nn.Module):
  """CAE's RegressorBlock (see the module docstring). Without layer scale (init_values 0) the
  official gammas are fixed ones, i.e. absent here."""
  num_heads: int
  init_values: Optional[float] = None
  drop_path: float = 0.0
  attn_impl: Optional[str] = None
  dtype: jnp.dtype = jnp.float32
  param_dtype: jnp.dtype = jnp.float32

  @nn.compact
  def __call__(self, x_q, x_kv, pos_q, pos_kv, deterministic=True):
    d = x_q.shape[-1]
    norm = lambda name: vit.layer_norm(name, self.param_dtype)  # noqa: E731
    y = CrossAttention(self.num_heads, True, self.attn_impl, self.dtype, self.param_dtype,
                       name="cross_attn")(norm("norm1_q")(x_q + pos_q), norm("norm1_k")(x_kv + pos_kv),
                                          norm("norm1_v")(x_kv))
    gamma = lambda name: self.param(name, nn.initializers.constant(self.init_values), (d,),  # noqa: E731
                                    self.param_dtype)
    if self.init_values is not None:
      y = y * gamma("gamma_1_cross")
    x = x_q + drop_path(self, y, self.drop_path, deterministic).astype(x_q.dtype)
    x = norm("norm2_cross")(x)
    y = vit.Mlp(4 * d, dtype=self.dtype, param_dtype=self.param_dtype, name="mlp_cross")(x)
    if self.init_values is not None:
      y = y * gamma("gamma_2_cross")
    return x + drop_path(self, y, self.drop_path, deterministic).astype(x.dtype)


class CAENeck(nn.Module):
  """`VisionTransformerNeck` (regressor + decoder + head) with the mask token.

  __call__(visible [B, K, D] latents without the cls token, visible_ids [B, K], masked_ids
  [B, M]) -> (logits [B, M, V], predicted latents [B, M, D]), both float32.
  """
  grid: int
  num_classes: int
  num_heads: int
  regressor_depth: int = 4
  decoder_depth: int = 4
  init_values: Optional[float] = None
  drop_path: float = 0.0
  attn_impl: Optional[str] = None
  attn_pad: int = -1
  dtype: jnp.dtype = jnp.float32
  param_dtype: jnp.dtype = jnp.float32

  @nn.compact
  def __call__(self, visible, visible_ids, masked_ids, deterministic=True):
    b, _, d = visible.shape
    pe = jnp.asarray(vit.sincos_2d(d, self.grid))
    pos_v, pos_m = pe[visible_ids], pe[masked_ids]
    token = self.param("mask_token", vit.trunc_normal(0.02, cutoff=1.0), (1, 1, d), self.param_dtype)
    x = jnp.broadcast_to(token.astype(jnp.float32), (b, masked_ids.shape[1], d))
    visible = visible.astype(jnp.float32)
    pos_kv = jnp.concatenate([pos_v, pos_m], axis=1)
    rates = np.linspace(0.0, self.drop_path, self.regressor_depth)
    for i in range(self.regressor_depth):
      x = RegressorBlock(self.num_heads, self.init_values, float(rates[i]), self.attn_impl, self.dtype,
                         self.param_dtype, name=f"regressor{i:02d}")(
                             x, jnp.concatenate([visible, x], axis=1), pos_m, pos_kv, deterministic)
    latent = vit.layer_norm("norm", self.param_dtype)(x)
    # vit.Encoder: `decoder_depth` blocks (drop path linspace(0, rate, depth)) + LayerNorm
    # (the official norm2), xavier init.
    x = vit.Encoder(self.decoder_depth, self.num_heads, 4.0, "qv", self.init_values, self.drop_path,
                    "xavier", False, self.attn_impl, True, self.dtype, self.param_dtype, self.attn_pad,
                    name="decoder")(latent + pos_m, None, deterministic)
    logits = nn.Dense(self.num_classes, dtype=self.dtype, param_dtype=self.param_dtype,
                      kernel_init=vit.xavier_uniform, name="head")(x)
    return logits.astype(jnp.float32), latent.astype(jnp.float32)


class EncoderToDecoder(nn.Module):
  """`encoder_to_decoder` Linear (xavier, zero bias) + `encoder_to_decoder_norm`."""
  width: int
  dtype: jnp.dtype = jnp.float32
  param_dtype: jnp.dtype = jnp.float32

  @nn.compact
  def __call__(self, x):
    x = nn.Dense(self.width, dtype=self.dtype, param_dtype=self.param_dtype,
                 kernel_init=vit.xavier_uniform, name="proj")(x)
    return vit.layer_norm("norm", self.param_dtype)(x.astype(jnp.float32))


# ---------------------------------------------------------------------------------------------

class CAE(TokenizerTargets, Method):
  name = "cae"
  # The official CAE model has no `no_weight_decay()`: only 1-D parameters skip weight decay
  # (the cls and mask tokens are decayed).
  no_decay_names = ()

  def __init__(self, config):
    super().__init__(config)
    c = config.cae
    m = config.model
    self.patch = int(m.patch_size)
    self.grid = self.image_size // self.patch
    self.num_patches = self.grid ** 2
    self.num_mask = int(c.num_mask_patches)
    if not 0 < self.num_mask < self.num_patches:
      raise ValueError(f"config.cae.num_mask_patches={self.num_mask} must be in 1..{self.num_patches - 1}")
    self.min_per_block = int(c.min_mask_patches_per_block)
    self.max_per_block = int(c.max_mask_patches_per_block) or None     # 0 = None (official)
    self.align_weight = float(c.align_loss_weight)
    self.momentum = float(c.base_momentum)
    if m.get("rel_pos_bias", "none") != "none" or m.get("pos_embed", "sincos") != "sincos":
      raise ValueError("CAE's encoder drops the masked patches: use config.model.pos_embed='sincos' "
                       "and rel_pos_bias='none'")
    self.dtype = jnp.dtype(m.get("dtype", "float32"))
    self.param_dtype = jnp.dtype(m.get("param_dtype", "float32"))
    self.width, _, enc_heads = vit.variant(m.variant)
    d = c.decoder
    self.dec_width = int(d.width) or self.width
    self.dec_heads = int(d.heads) or enc_heads
    self.neck_kw = dict(num_heads=self.dec_heads, regressor_depth=int(d.regressor_depth),
                        decoder_depth=int(d.depth), init_values=float(d.layer_scale) or None,
                        drop_path=float(m.get("drop_path", 0.0)), attn_impl=m.get("attn_impl", "") or None,
                        attn_pad=m.get("attn_pad", -1), dtype=self.dtype, param_dtype=self.param_dtype)
    self.setup_tokenizer("cae.tokenizer", c.tokenizer, self.grid)

  def describe(self) -> dict:
    return {**super().describe(), "cae": self.config.cae.decoder.to_dict()}

  @property
  def neck(self) -> CAENeck:
    return CAENeck(self.grid, self.codebook_size, **self.neck_kw)

  def _proj(self):
    """encoder_to_decoder (+ its LayerNorm) when the widths differ, else None."""
    if self.dec_width == self.width:
      return None
    return EncoderToDecoder(self.dec_width, self.dtype, self.param_dtype)

  def make_mask(self, rng, batch):
    """[B, L] int32, exactly num_mask_patches ones per row (CAE's generator)."""
    return masking.block_mask(rng, batch, self.grid, self.grid, self.num_mask, self.min_per_block,
                              self.max_per_block, exact=True)

  # -- parameters and state -----------------------------------------------------------------
  def init(self, rng, images):
    self.tokenizer  # noqa: B018  (first: a missing tokenizer fails before any work)
    r_enc, r_pe, r_cls, r_neck, r_proj = jax.random.split(rng, 5)
    enc = self.encoder.init(r_enc, images)["params"]
    # The patch embedding and the cls token keep the encoder's trunc-normal init (the
    # top-level xavier pass resets only Linear and LayerNorm modules).
    tn = vit.trunc_normal(0.02, cutoff=1.0)
    kernel = enc["patch_embed"]["proj"]["kernel"]
    enc = {**enc, "cls_token": tn(r_cls, enc["cls_token"].shape, enc["cls_token"].dtype),
           "patch_embed": {"proj": {**enc["patch_embed"]["proj"],
                                    "kernel": tn(r_pe, kernel.shape, kernel.dtype)}}}
    params = {"encoder": enc}
    k = self.num_patches - self.num_mask
    visible = jnp.zeros((1, k, self.dec_width), jnp.float32)
    ids = jnp.arange(self.num_patches)[None]
    params["neck"] = self.neck.init(r_neck, visible, ids[:, :k], ids[:, k:])["params"]
    proj = self._proj()
    if proj is not None:
      params["encoder_to_decoder"] = proj.init(r_proj, jnp.zeros((1, 1, self.width)))["params"]
    return params

  def init_state(self, params):
    # The teacher starts as a copy of the encoder (`_init_teacher`); `last_encoder` holds the
    # encoder weights the current step runs with, for the next teacher update.
    return {**super().init_state(params), "teacher": jax.tree.map(jnp.copy, params["encoder"]),
            "last_encoder": jax.tree.map(jnp.copy, params["encoder"])}

  def update_state(self, params, state, step, stats=None):
    state = super().update_state(params, state, step, stats)
    teacher = ema_update(state["teacher"], state["last_encoder"], self.momentum)
    return {**state, "teacher": teacher, "last_encoder": params["encoder"]}

  # -- the loss -----------------------------------------------------------------------------
  def forward(self, params, state, images, mask, rng, train=True):
    """(logits [B, M, V], predicted latents [B, M, D], target latents [B, M, D], masked ids)."""
    k_enc, k_teacher, k_neck = jax.random.split(rng, 3)
    rngs = lambda k: {"dropout": k} if train else None  # noqa: E731
    order = jnp.argsort(mask, axis=1, stable=True)       # visible, then masked; each in patch order
    k = self.num_patches - self.num_mask
    visible_ids, masked_ids = order[:, :k], order[:, k:]
    latent = self.encoder.apply({"params": params["encoder"]}, images, keep_ids=visible_ids,
                                deterministic=not train, rngs=rngs(k_enc))
    target = self.encoder.apply({"params": state["teacher"]}, images, keep_ids=masked_ids,
                                deterministic=not train, rngs=rngs(k_teacher))[:, 1:]
    proj = self._proj()
    if proj is not None:
      latent = proj.apply({"params": params["encoder_to_decoder"]}, latent)
      target = proj.apply({"params": params["encoder_to_decoder"]}, target)
    target = jax.lax.stop_gradient(target.astype(jnp.float32))
    logits, pred = self.neck.apply({"params": params["neck"]}, latent[:, 1:], visible_ids, masked_ids,
                                   deterministic=not train, rngs=rngs(k_neck))
    return logits, pred, target, masked_ids

  def loss(self, params, state, images, rng, step):
    images = images.astype(jnp.float32)
    k_mask, k_fwd = jax.random.split(rng)
    mask = self.make_mask(k_mask, images.shape[0])
    logits, pred, target, masked_ids = self.forward(params, state, images, mask, k_fwd)
    labels = jnp.take_along_axis(self.token_ids(state, images), masked_ids, axis=1)
    loss_main, acc = cross_entropy(logits, labels, jnp.ones(labels.shape, jnp.float32))
    loss_align = self.align_weight * jnp.mean((pred - target) ** 2)
    return loss_main + loss_align, {"loss_main": loss_main, "loss_align": loss_align, "mlm_acc": acc,
                                    "mask_ratio": jnp.mean(mask.astype(jnp.float32))}
