"""Masked image modelling with a frozen teacher's features as targets: MILAN, EVA-01, MVP.

The student sees a masked image and predicts, for the masked patches (MILAN: every token),
the patch features a frozen teacher computes from the whole image. The teacher is the ViT
encoder of another mim_jax run (`config.feature_mim.teacher`, its workdir), read once through
`mim_jax.teachers.load` and carried, frozen, in the method state (`external_state`), so it is
checkpointed with the run and never receives a gradient. Its targets are its final-norm tokens
[B, 1 + L, D] (cls first); the student's head is D wide.

Switches (`config.feature_mim`), each exact to the paper that uses it:
  * encoder 'visible' (MILAN; MAE's encoder on the kept patches, then a decoder) or
    'mask_token' (EVA-01 / MVP; BEiT's encoder over all tokens with a learnable mask token in
    place of the masked patch embeddings, then one linear head, `lm_head`);
  * masking 'random' (MAE's argsort of uniform noise), 'block' (BEiT's block-wise generator,
    `masking.block_mask`; with the 'visible' encoder filled to the exact count as CAE does) or
    'attentive' (MILAN `models_milan.attention_masking`): the importance of a patch is the
    teacher's last-block attention from the cls query to that patch, averaged over the heads
    (`nn.MultiheadAttention(need_weights=True)` averages them); the kept patches are
    int(L * (1 - ratio)) draws WITHOUT replacement with probability proportional to the
    importance (`torch.multinomial(importance, L, replacement=False)`, first draws kept).
    Here the draw is the Gumbel-top-k trick (sort log w + Gumbel noise), which has exactly
    the distribution of sequential sampling without replacement. `attentive_sampling='topk'`
    keeps the highest-ranked patches deterministically instead (not MILAN's rule);
  * decoder 'mae' (MAE's decoder: embed, mask tokens un-shuffled into place, fixed sin-cos
    position embedding, blocks over all tokens, norm, linear to D; MILAN's `models_mae.py`
    with use_clip keeps the cls output) or 'prompting' (MILAN's `models_milan.py`, see
    `PromptingBlock`), or 'linear' (the 'mask_token' encoder's head);
  * loss 'cosine' (EVA `engine_for_pretraining.compute_loss`: minus the cosine similarity,
    torch CosineSimilarity, averaged over the predicted tokens), 'mse_normalised' (MILAN
    `forward_loss`: both sides divided by their L2 norm, 2 - 2 cos, i.e. the squared distance of
    the unit vectors, averaged), 'smooth_l1' (torch smooth_l1_loss with `smooth_l1_beta`,
    averaged over tokens and channels); loss_on 'masked' (EVA, MVP: masked patches only) or
    'all' (MILAN: every token, the cls token and the visible patches included);
  * target_norm 'none' (MILAN, EVA, MVP) or 'layernorm' (a parameter-free LayerNorm of each
    teacher token, eps 1e-5, as feature-distillation methods using smooth-L1 do).
The teacher sees the student's augmented view re-normalised with its own run's mean and std.
The teacher's image size and patch size must equal the student's (the targets live on the
student's patch grid). Converted weights of other models (OpenAI CLIP, as the papers use) are
not read; a teacher is a mim_jax run. With attentive masking the teacher's forward pass asks
for its attention maps (`mutable=['intermediates']`, every block's; the last one is used). The
prompting decoder's cross-attention (queries: mask tokens, keys: all tokens) runs through
`jax.nn.dot_product_attention` with JAX's choice of implementation (`config.model.attn_impl`
and `attn_pad` apply to the self-attention blocks).

Weight decay follows the official optimiser groups: 1-D parameters are never decayed; with the
'mask_token' encoder also `pos_embed` and `cls_token` (BEiT/EVA `no_weight_decay`).
"""
from __future__ import annotations

import re
from typing import Optional

import flax.linen as nn
import jax
import jax.numpy as jnp
import ml_collections

from mim_jax import masking
from mim_jax.errors import TrainingError
from mim_jax.methods.base import Method
from mim_jax.methods.mae import decoder_input
from mim_jax.models import vit

ENCODERS = ("visible", "mask_token")
MASKINGS = ("random", "block", "attentive")
SAMPLINGS = ("multinomial", "topk")
DECODERS = ("mae", "prompting", "linear")
LOSSES = ("cosine", "mse_normalised", "smooth_l1")
LOSS_ON = ("masked", "all")
TARGET_NORMS = ("none", "layernorm")
TEACHER_ENCODERS = ("online", "ema")

_BLOCK_NAME = re.compile(r"block\d+$")


def default_config() -> ml_collections.ConfigDict:
  """Every key of `config.feature_mim` (configs/milan.py, eva.py and mvp.py start from it);
  the defaults are MILAN's."""
  return ml_collections.ConfigDict(dict(
      teacher="",                        # workdir of the teacher run (any mim_jax run)
      teacher_encoder="online",          # 'online' | 'ema' (the teacher run's EMA encoder)
      encoder="visible",                 # 'visible' (MAE-like) | 'mask_token' (BEiT/EVA-like)
      masking="attentive",               # 'random' | 'block' | 'attentive'
      mask_ratio=0.75,                   # random and attentive masking
      attentive_sampling="multinomial",  # 'multinomial' (MILAN) | 'topk'
      num_mask_patches=0,                # block masking: patches masked per image
      min_mask_patches=16,               # block masking: smallest block
      max_mask_patches=0,                # block masking: largest block (0 = num_mask_patches)
      decoder=dict(kind="prompting", width=512, depth=8, heads=16),  # 'mae' | 'prompting' | 'linear'
      loss="mse_normalised",             # 'cosine' | 'mse_normalised' | 'smooth_l1'
      loss_on="all",                     # 'masked' | 'all'
      target_norm="none",                # 'none' | 'layernorm'
      smooth_l1_beta=1.0,
      # ColorJitter(s, s, s) on the whole image before the crop and flip, as BEiT's
      # DataAugmentationForBEiT (MVP follows BEiT's recipe); 0 = off (MILAN, EVA).
      color_jitter=0.0,
  ))


# ---------------------------------------------------------------------------------------------
# Masks.

def cls_importance(attention: jax.Array) -> jax.Array:
  """attention [B, heads, 1+L, 1+L] (cls first) -> [B, L]: the cls query's weight on each
  patch key, averaged over the heads (MILAN: importance = attention[:, 0, 1:] of the
  head-averaged last-block map)."""
  return jnp.mean(attention[:, :, 0, 1:].astype(jnp.float32), axis=1)


def attentive_shuffle_mask(rng: jax.Array, importance: jax.Array, mask_ratio: float,
                           sampling: str = "multinomial") -> masking.ShuffleMask:
  """MILAN's attentive masking as a `ShuffleMask` (the patches kept first).

  'multinomial': the order is a draw without replacement with probabilities proportional to
  `importance` [B, L] (Gumbel-top-k: argsort of -(log w + Gumbel)); the first
  int(L * (1 - ratio)) patches of that order are kept. 'topk': the order is by decreasing
  importance (ties by index), so exactly the top-ranked patches are kept.
  """
  b, n = importance.shape
  keep = masking.num_kept(n, mask_ratio)
  w = importance.astype(jnp.float32)
  if sampling == "multinomial":
    scores = jnp.log(w) + jax.random.gumbel(rng, (b, n), jnp.float32)
  elif sampling == "topk":
    scores = w
  else:
    raise ValueError(f"attentive_sampling must be one of {SAMPLINGS}, got {sampling!r}")
  shuffle = jnp.argsort(-scores, axis=1, stable=True)
  restore = jnp.argsort(shuffle, axis=1)
  mask = jnp.concatenate([jnp.zeros((b, keep)), jnp.ones((b, n - keep))], axis=1)
  return masking.ShuffleMask(shuffle[:, :keep], restore, jnp.take_along_axis(mask, restore, axis=1))


def mask_to_shuffle(mask: jax.Array, num_masked: int) -> masking.ShuffleMask:
  """A mask [B, L] with exactly `num_masked` ones per row -> a `ShuffleMask` whose shuffle lists
  the visible patches (in index order), then the masked ones."""
  b, n = mask.shape
  shuffle = jnp.argsort(mask.astype(jnp.int32), axis=1, stable=True)
  restore = jnp.argsort(shuffle, axis=1)
  return masking.ShuffleMask(shuffle[:, :n - num_masked], restore, mask.astype(jnp.float32))


# ---------------------------------------------------------------------------------------------
# Targets and losses.

def normalise_target(tokens: jax.Array, kind: str) -> jax.Array:
  if kind == "none":
    return tokens
  if kind == "layernorm":
    mean = jnp.mean(tokens, axis=-1, keepdims=True)
    var = jnp.mean((tokens - mean) ** 2, axis=-1, keepdims=True)
    return (tokens - mean) / jnp.sqrt(var + 1e-5)
  raise ValueError(f"target_norm must be one of {TARGET_NORMS}, got {kind!r}")


def per_token_loss(pred: jax.Array, target: jax.Array, kind: str, beta: float = 1.0) -> jax.Array:
  """[B, N, D] x [B, N, D] -> [B, N]."""
  if kind == "cosine":
    # torch CosineSimilarity(dim=-1), eps 1e-8 on each norm.
    pn = jnp.maximum(jnp.linalg.norm(pred, axis=-1), 1e-8)
    tn = jnp.maximum(jnp.linalg.norm(target, axis=-1), 1e-8)
    return -jnp.sum(pred * target, axis=-1) / (pn * tn)
  if kind == "mse_normalised":
    p = pred / jnp.maximum(jnp.linalg.norm(pred, axis=-1, keepdims=True), 1e-12)
    t = target / jnp.maximum(jnp.linalg.norm(target, axis=-1, keepdims=True), 1e-12)
    return 2.0 - 2.0 * jnp.sum(p * t, axis=-1)
  if kind == "smooth_l1":
    d = jnp.abs(pred - target)
    return jnp.mean(jnp.where(d < beta, 0.5 * d * d / beta, d - 0.5 * beta), axis=-1)
  raise ValueError(f"loss must be one of {LOSSES}, got {kind!r}")


def feature_loss(pred: jax.Array, target: jax.Array, weights: jax.Array, kind: str,
                 beta: float = 1.0) -> jax.Array:
  """Mean of the per-token loss over the tokens with weight 1 (weights [B, N] in {0, 1})."""
  per = per_token_loss(pred.astype(jnp.float32), target.astype(jnp.float32), kind, beta)
  return jnp.sum(per * weights) / jnp.sum(weights)


# ---------------------------------------------------------------------------------------------
# Decoders.

class PromptingBlock(nn.Module):
  """MILAN's decoder block (`Block_fordecoder`): only the mask tokens are updated.

  queries [B, M, W] (mask tokens), context [B, 1+K, W] (cls and visible latents, fixed).
  The queries are LayerNorm'ed; keys and values are computed from the context AS IS (not
  normalised) together with the normalised queries; the attention output (separate `q` and
  `kv` projections, both with bias) is added to the queries, then a pre-norm MLP. The
  context is returned unchanged by construction, it is only read.
  """
  num_heads: int
  mlp_ratio: float = 4.0
  dtype: jnp.dtype = jnp.float32
  param_dtype: jnp.dtype = jnp.float32

  @nn.compact
  def __call__(self, queries, context):
    b, m, w = queries.shape
    h = self.num_heads
    dense = lambda n, name: nn.Dense(n, dtype=self.dtype, param_dtype=self.param_dtype,  # noqa: E731
                                     kernel_init=vit.xavier_uniform, name=name)
    y = vit.layer_norm("norm1", self.param_dtype)(queries)
    keys_in = jnp.concatenate([context, y], axis=1)
    q = dense(w, "q")(y).reshape(b, m, h, w // h)
    kv = dense(2 * w, "kv")(keys_in).reshape(b, keys_in.shape[1], 2, h, w // h)
    out = jax.nn.dot_product_attention(q, kv[:, :, 0], kv[:, :, 1]).reshape(b, m, w)
    queries = queries + dense(w, "proj")(out).astype(queries.dtype)
    y = vit.layer_norm("norm2", self.param_dtype)(queries)
    y = vit.Mlp(int(w * self.mlp_ratio), dtype=self.dtype, param_dtype=self.param_dtype, name="mlp")(y)
    return queries + y.astype(queries.dtype)


class FeatureDecoder(nn.Module):
  """latent [B, 1+K, D] (cls first), restore_ids [B, L] -> predictions [B, 1+L, out_dim].

  kind 'mae': MAE's decoder (mae.MAEDecoder) with `out_dim` outputs and the cls output kept.
  kind 'prompting': MILAN's: the embedded cls and visible tokens plus their position embedding
  stay fixed through the blocks (`PromptingBlock`); the mask tokens (mask token + position
  embedding) are updated by attending to them and to each other; at the end every token is
  put back in place and goes through the norm and the linear prediction.
  """
  num_patches: int
  out_dim: int
  kind: str = "prompting"
  width: int = 512
  depth: int = 8
  heads: int = 16
  remat: bool = False
  attn_impl: Optional[str] = None
  attn_pad: int = -1
  dtype: jnp.dtype = jnp.float32
  param_dtype: jnp.dtype = jnp.float32

  @nn.compact
  def __call__(self, latent, restore_ids):
    x = decoder_input(self, latent, restore_ids)
    if self.kind == "mae":
      x = vit.Encoder(self.depth, self.heads, remat=self.remat, attn_impl=self.attn_impl,
                      attn_pad=self.attn_pad, dtype=self.dtype, param_dtype=self.param_dtype,
                      name="blocks")(x)
    elif self.kind == "prompting":
      k = latent.shape[1] - 1
      shuffled = vit.take_rows(x[:, 1:], jnp.argsort(restore_ids, axis=1))
      context = jnp.concatenate([x[:, :1], shuffled[:, :k]], axis=1)
      queries = shuffled[:, k:]
      block = nn.remat(PromptingBlock) if self.remat else PromptingBlock
      for i in range(self.depth):
        queries = block(self.heads, 4.0, self.dtype, self.param_dtype, name=f"block{i:02d}")(queries, context)
      patches = vit.take_rows(jnp.concatenate([context[:, 1:], queries], axis=1), restore_ids)
      x = vit.layer_norm("norm", self.param_dtype)(jnp.concatenate([context[:, :1], patches], axis=1))
    else:
      raise ValueError(f"decoder kind must be 'mae' or 'prompting', got {self.kind!r}")
    x = nn.Dense(self.out_dim, dtype=self.dtype, param_dtype=self.param_dtype,
                 kernel_init=vit.xavier_uniform, name="pred")(x)
    return x.astype(jnp.float32)


# ---------------------------------------------------------------------------------------------
# The method.

def _choice(value, options, key):
  if value not in options:
    raise ValueError(f"config.feature_mim.{key} must be one of {options}, got {value!r}")
  return value


def _error(msg):
  return TrainingError(msg)


class FeatureMIM(Method):
  name = "feature_mim"

  def __init__(self, config):
    super().__init__(config)
    c = config.feature_mim
    self.style = _choice(c.encoder, ENCODERS, "encoder")
    self.masking = _choice(c.masking, MASKINGS, "masking")
    self.sampling = _choice(c.attentive_sampling, SAMPLINGS, "attentive_sampling")
    self.loss_kind = _choice(c.loss, LOSSES, "loss")
    self.loss_on = _choice(c.loss_on, LOSS_ON, "loss_on")
    self.target_norm = _choice(c.target_norm, TARGET_NORMS, "target_norm")
    self.teacher_which = _choice(c.teacher_encoder, TEACHER_ENCODERS, "teacher_encoder")
    self.decoder_kind = _choice(c.decoder.kind, DECODERS, "decoder.kind")
    if (self.style == "mask_token") != (self.decoder_kind == "linear"):
      raise ValueError("config.feature_mim.decoder.kind: 'linear' goes with encoder='mask_token', "
                       "'mae' or 'prompting' with encoder='visible'")
    self.mask_ratio = float(c.mask_ratio)
    self.beta = float(c.smooth_l1_beta)
    self.patch = config.model.patch_size
    self.grid = self.image_size // self.patch
    self.num_patches = self.grid ** 2
    self.num_mask_patches = int(c.num_mask_patches)
    self.min_mask_patches = int(c.min_mask_patches)
    self.max_mask_patches = int(c.max_mask_patches) or None
    if self.masking == "block" and not 0 < self.num_mask_patches < self.num_patches:
      raise ValueError(f"config.feature_mim.num_mask_patches={self.num_mask_patches}: block masking "
                       f"needs 0 < count < {self.num_patches} patches")
    if self.style == "mask_token":
      self.no_decay_names = ("pos_embed", "cls_token")
    self.color_jitter = float(c.get("color_jitter", 0.0))
    self._teacher = None

  def preprocess(self, rng, images, input_cfg, on_device_aug):
    """BEiT's order with feature_mim.color_jitter: the whole image jittered (ColorJitter(s, s,
    s), hue off), then cropped and flipped; else the trainer's crop and flip alone."""
    from mim_jax.data import preprocess, views
    if self.color_jitter > 0:
      k_jit, rng = jax.random.split(rng)
      s = self.color_jitter
      images = views.color_jitter(k_jit, images, s, s, s, 0.0)
    return preprocess.preprocess(rng, images, input_cfg, on_device_aug)

  def encoder_overrides(self):
    return {"use_mask_token": self.config.feature_mim.encoder == "mask_token"}

  # -- the teacher ----------------------------------------------------------------------------
  @property
  def teacher_path(self) -> str:
    return self.config.feature_mim.teacher

  @property
  def teacher(self):
    """(teacher config, teacher ViT module), read from the teacher run's config.json once."""
    if self._teacher is None:
      from mim_jax import teachers
      with teachers.entered(self.frozen_context):
        self._teacher = teachers.read_teacher_config(self.teacher_path, "feature_mim.teacher",
                                                     self.image_size, self.patch)
    return self._teacher

  @property
  def teacher_dim(self) -> int:
    return self.teacher[1].width

  def external_state(self):
    from mim_jax import teachers
    self.teacher  # noqa: B018 (checks the grid before the checkpoint is read)
    with teachers.entered(self.frozen_context):
      return {"teacher": teachers.load_teacher_encoder(self.teacher_path, "feature_mim.teacher",
                                                      self.teacher_which)}

  def _to_teacher_input(self, images):
    """The student's normalised view in the teacher run's normalisation."""
    from mim_jax import teachers
    return teachers.renormalize(images, self.config, self.teacher[0])

  def teacher_forward(self, teacher_params, images, with_attention: bool = False):
    """-> (tokens [B, 1+L, D] float32, importance [B, L] or None), no gradient."""
    enc = self.teacher[1]
    x = self._to_teacher_input(images)
    importance = None
    if with_attention:
      tokens, inter = enc.apply({"params": teacher_params}, x, mutable=["intermediates"])
      blocks = inter["intermediates"]["encoder"]
      last = max(k for k in blocks if _BLOCK_NAME.match(k))
      importance = jax.lax.stop_gradient(cls_importance(blocks[last]["attn"]["attention"][0]))
    else:
      tokens = enc.apply({"params": teacher_params}, x)
    return jax.lax.stop_gradient(tokens.astype(jnp.float32)), importance

  # -- the student ----------------------------------------------------------------------------
  @property
  def head(self) -> nn.Module:
    m = self.config.model
    dtype, pdtype = jnp.dtype(m.get("dtype", "float32")), jnp.dtype(m.get("param_dtype", "float32"))
    if self.style == "mask_token":
      # EVA / BEiT lm_head: trunc_normal_(std=.02, a=-.02, b=.02), zero bias.
      return nn.Dense(self.teacher_dim, dtype=dtype, param_dtype=pdtype,
                      kernel_init=vit.trunc_normal(0.02, cutoff=1.0))
    d = self.config.feature_mim.decoder
    return FeatureDecoder(self.num_patches, self.teacher_dim, self.decoder_kind, d.width, d.depth,
                          d.heads, m.get("remat", False), m.get("attn_impl", "") or None,
                          m.get("attn_pad", -1), dtype, pdtype)

  def make_mask(self, rng, batch: int, importance=None) -> masking.ShuffleMask:
    """The masks of one batch; with the 'mask_token' encoder and block masking only `mask` is
    set (counts may differ between images, as in BEiT)."""
    if self.masking == "random":
      return masking.random_shuffle_mask(rng, batch, self.num_patches, self.mask_ratio)
    if self.masking == "attentive":
      return attentive_shuffle_mask(rng, importance, self.mask_ratio, self.sampling)
    exact = self.style == "visible"
    mask = masking.block_mask(rng, batch, self.grid, self.grid, self.num_mask_patches,
                              self.min_mask_patches, self.max_mask_patches, exact=exact)
    if exact:
      return mask_to_shuffle(mask, self.num_mask_patches)
    return masking.ShuffleMask(None, None, mask.astype(jnp.float32))

  def init(self, rng, images):
    r1, r2, r3 = jax.random.split(rng, 3)
    b = images.shape[0]
    sm = masking.random_shuffle_mask(r3, b, self.num_patches, self.mask_ratio)
    if self.style == "visible":
      enc = self.encoder.init(r1, images, keep_ids=sm.keep_ids)["params"]
      latent = self.encoder.apply({"params": enc}, images, keep_ids=sm.keep_ids)
      return {"encoder": enc, "decoder": self.head.init(r2, latent, sm.restore_ids)["params"]}
    enc = self.encoder.init(r1, images, mask=sm.mask)["params"]
    tokens = self.encoder.apply({"params": enc}, images, mask=sm.mask)
    return {"encoder": enc, "head": self.head.init(r2, tokens)["params"]}

  def forward(self, params, images, sm: masking.ShuffleMask, rng, train: bool = True):
    """Predictions [B, 1+L, teacher dim] (cls first) for the masking `sm`."""
    kw = dict(deterministic=not train, rngs={"dropout": rng} if train else None)
    if self.style == "visible":
      latent = self.encoder.apply({"params": params["encoder"]}, images, keep_ids=sm.keep_ids, **kw)
      return self.head.apply({"params": params["decoder"]}, latent, sm.restore_ids)
    tokens = self.encoder.apply({"params": params["encoder"]}, images, mask=sm.mask, **kw)
    return self.head.apply({"params": params["head"]}, tokens).astype(jnp.float32)

  def weights(self, mask: jax.Array) -> jax.Array:
    """[B, 1+L] token weights of the loss: the masked patches, or every token."""
    if self.loss_on == "all":
      return jnp.ones((mask.shape[0], mask.shape[1] + 1), jnp.float32)
    return jnp.concatenate([jnp.zeros((mask.shape[0], 1)), mask.astype(jnp.float32)], axis=1)

  def objective(self, pred, teacher_tokens, mask):
    """(loss, mean cosine similarity over the same tokens)."""
    target = normalise_target(teacher_tokens, self.target_norm)
    w = self.weights(mask)
    loss = feature_loss(pred, target, w, self.loss_kind, self.beta)
    cos = -feature_loss(pred, target, w, "cosine")
    return loss, cos

  def loss(self, params, state, images, rng, step):
    images = images.astype(jnp.float32)
    mrng, drng = jax.random.split(rng)
    tokens, importance = self.teacher_forward(state["teacher"], images,
                                              with_attention=self.masking == "attentive")
    sm = self.make_mask(mrng, images.shape[0], importance)
    pred = self.forward(params, images, sm, drng, train=True)
    loss, cos = self.objective(pred, tokens, sm.mask)
    return loss, {"mask_ratio": jnp.mean(sm.mask), "cosine": cos}
