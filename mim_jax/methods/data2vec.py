"""data2vec (vision): self-distillation of contextualised targets (Baevski et al., ICML 2022).

Exact to facebookresearch/data2vec_vision `beit/` (the code behind the paper's image numbers:
`run_cyclical.py`, `engine_for_cyclical.py`, `modeling_cyclical.py`, `datasets.py`), with the
names of the options taken from fairseq `examples/data2vec/models/data2vec_vision.py`:
  * teacher: a copy of the student's encoder at initialisation, afterwards only its EMA
    (`update_state`, after every optimiser step; timm ModelEmaV2 over the whole model in the
    official code, the encoder here since the regression head never runs in the teacher). It
    runs in eval mode (no drop path) on the full, unmasked image and gets no gradient;
  * EMA decay at update `it`: ema_decay + it * (ema_end_decay - ema_decay) / ema_anneal_end_step
    while it < ema_anneal_end_step, then ema_end_decay (`engine_for_cyclical` with
    ema_start_at = the anneal length; fairseq's `get_annealed_rate` is the same line);
  * student: the same BEiT-style ViT on the image with a learnable mask token (trunc-normal
    .02 cut at +-.02) in place of the masked patch embeddings, BEiT block-wise masks
    (`masking.block_mask`: at most num_mask_patches per image, blocks of at least
    min_mask_patches_per_block, aspect 0.3 - 1/0.3);
  * target: the teacher's block outputs at the END of each block (layer_results='end': the
    residual stream after the FFN's residual add, before the final norm), the top K blocks,
    patch tokens only (cls dropped), each normalised without affine parameters - batch norm
    over (batch, tokens), then instance norm over tokens, then layer norm over channels, as
    the flags ask - averaged, then instance norm and/or layer norm of the average
    (eps 1e-5 everywhere, biased variances, float32);
  * prediction: the student's final-norm tokens at the masked positions through one linear
    layer (`lm_head`, D -> D, trunc-normal .02 cut at +-.02, zero bias);
  * loss on the masked positions: smooth L1 with beta = loss_beta (0: squared error), summed
    over channels, times loss_scale (0: 1/sqrt(D) as fairseq's None; -1: 1/D, i.e. the mean
    over channels of data2vec_vision's F.smooth_l1_loss, whose `--loss_scale -1` adds no
    further factor), averaged over the masked tokens of the batch;
  * augmentation: ColorJitter(0.4, 0.4, 0.4) on the full 8-bit image (PIL ImageEnhance
    brightness / contrast / colour in a random order per image, factors U(0.6, 1.4)), then the
    trainer's random resized crop and flip; teacher and student see the same view.

Only the 'end' target point exists here: fairseq's 'fc' variant (the FFN output before the
final residual add) is not exposed by mim_jax's ViT. See configs/data2vec.py for the recipe
and the deviations.
"""
from __future__ import annotations

import flax.linen as nn
import jax
import jax.numpy as jnp

from mim_jax import masking
from mim_jax.methods.base import Method, ema_update
from mim_jax.models import vit

NORM_EPS = 1e-5   # torch F.layer_norm / F.instance_norm / F.batch_norm default


def annealed_decay(step, start: float, end: float, anneal_steps: int):
  """EMA decay at update `step`: linear from `start` (step 0) to `end` (step `anneal_steps`),
  `end` afterwards; `anneal_steps` <= 0 means `end` from the first update."""
  if anneal_steps <= 0:
    return jnp.asarray(end, jnp.float32)
  frac = jnp.minimum(jnp.asarray(step, jnp.float32) / float(anneal_steps), 1.0)
  return jnp.asarray(start, jnp.float32) + (end - start) * frac


def layer_norm(x: jax.Array) -> jax.Array:
  """F.layer_norm(x, x.shape[-1:]) without affine parameters, per token over channels."""
  mean = x.mean(-1, keepdims=True)
  var = jnp.square(x - mean).mean(-1, keepdims=True)
  return (x - mean) * jax.lax.rsqrt(var + NORM_EPS)


def instance_norm(x: jax.Array) -> jax.Array:
  """F.instance_norm on [B, C, T]: per sample and channel over the tokens. x is [B, T, C]."""
  mean = x.mean(1, keepdims=True)
  var = jnp.square(x - mean).mean(1, keepdims=True)
  return (x - mean) * jax.lax.rsqrt(var + NORM_EPS)


def batch_norm(x: jax.Array) -> jax.Array:
  """F.batch_norm(training=True) on [B, C, T]: per channel over batch and tokens."""
  mean = x.mean((0, 1), keepdims=True)
  var = jnp.square(x - mean).mean((0, 1), keepdims=True)
  return (x - mean) * jax.lax.rsqrt(var + NORM_EPS)


def regression_loss(pred: jax.Array, target: jax.Array, mask: jax.Array, beta: float,
                    scale: float) -> jax.Array:
  """Mean over masked tokens (mask [B, L], 1 = masked) of scale * sum over channels of
  smooth-L1(beta) (beta 0: squared error) between pred and target [B, L, D]."""
  d = pred - target
  if beta == 0:
    per = jnp.square(d)
  else:
    a = jnp.abs(d)
    per = jnp.where(a < beta, 0.5 * jnp.square(d) / beta, a - 0.5 * beta)
  per_token = per.sum(-1) * scale
  m = mask.astype(jnp.float32)
  return jnp.sum(per_token * m) / jnp.maximum(jnp.sum(m), 1.0)


def masked_std(y: jax.Array, mask: jax.Array) -> jax.Array:
  """fairseq's compute_var of the masked rows: mean over channels of sqrt(unbiased var + 1e-6)."""
  m = mask.astype(jnp.float32)[..., None]
  n = jnp.maximum(jnp.sum(m), 2.0)
  mean = jnp.sum(y * m, axis=(0, 1)) / n
  var = jnp.sum(jnp.square(y - mean) * m, axis=(0, 1)) / (n - 1)
  return jnp.mean(jnp.sqrt(var + 1e-6))


class Data2Vec(Method):
  name = "data2vec"
  # BEiT's no_weight_decay(): {'pos_embed', 'cls_token'} besides 1-D parameters (the relative
  # position bias table and the mask token are decayed there, and so here).
  no_decay_names = ("pos_embed", "cls_token")

  def __init__(self, config):
    super().__init__(config)
    if self.ema_decay is not None:
      raise ValueError("data2vec's teacher is already an EMA of the encoder (evaluated as 'ema'): "
                       "set config.ema.enabled=False")
    c = config.data2vec
    self.patch = config.model.patch_size
    self.grid = self.image_size // self.patch
    self.num_mask = int(c.num_mask_patches)
    self.min_mask = int(c.min_mask_patches_per_block)
    self.max_mask = int(c.max_mask_patches_per_block) or None
    self.top_k = int(c.average_top_k_layers)
    self.flags = {k: bool(c[k]) for k in ("batch_norm_target_layer", "instance_norm_target_layer",
                                          "layer_norm_target_layer", "instance_norm_targets",
                                          "layer_norm_targets")}
    self.loss_beta = float(c.loss_beta)
    self.loss_scale = float(c.loss_scale)
    self.ema_start, self.ema_end = float(c.ema_decay), float(c.ema_end_decay)
    self.ema_anneal = int(c.ema_anneal_end_step)
    self.color_jitter = float(c.color_jitter)
    if c.layer_results != "end":
      raise ValueError(f"data2vec.layer_results={c.layer_results!r}: only 'end' (block outputs) is "
                       "available; the ViT does not expose the FFN output ('fc')")
    if self.top_k < 1:
      raise ValueError(f"data2vec.average_top_k_layers={self.top_k} must be >= 1")
    if not 0 < self.num_mask <= self.grid ** 2:
      raise ValueError(f"data2vec.num_mask_patches={self.num_mask} must be in 1..{self.grid ** 2}")
    m = config.model
    width = self.encoder.width
    self.width = width
    self.head = nn.Dense(width, dtype=jnp.dtype(m.get("dtype", "float32")),
                         param_dtype=jnp.dtype(m.get("param_dtype", "float32")),
                         kernel_init=vit.trunc_normal(0.02, cutoff=1.0), name="lm_head")

  def encoder_overrides(self):
    return {"use_mask_token": True}

  # -- pieces ---------------------------------------------------------------------------------
  def make_mask(self, rng, batch):
    """[B, L] int32 BEiT block-wise mask, 1 = masked."""
    return masking.block_mask(rng, batch, self.grid, self.grid, self.num_mask, self.min_mask,
                              self.max_mask)

  def scale(self) -> float:
    if self.loss_scale > 0:
      return self.loss_scale
    if self.loss_scale == -1:
      return 1.0 / self.width
    if self.loss_scale == 0:
      return self.width ** -0.5
    raise ValueError(f"data2vec.loss_scale={self.loss_scale}: use > 0, 0 (1/sqrt(D)) or -1 (1/D)")

  def decay(self, step):
    return annealed_decay(step, self.ema_start, self.ema_end, self.ema_anneal)

  def targets(self, teacher_params, images):
    """Top-K average of the normalised teacher block outputs, [B, L, D] float32, no gradient.
    K above the depth averages every block, as the official `y[-K:]` does."""
    _, inter = self.encoder.apply({"params": teacher_params}, images, mutable=["intermediates"])
    blocks = inter["intermediates"]["encoder"]["block_outputs"][-self.top_k:]
    ys = [jax.lax.stop_gradient(b[:, 1:].astype(jnp.float32)) for b in blocks]
    f = self.flags
    if f["batch_norm_target_layer"]:
      ys = [batch_norm(y) for y in ys]
    if f["instance_norm_target_layer"]:
      ys = [instance_norm(y) for y in ys]
    if f["layer_norm_target_layer"]:
      ys = [layer_norm(y) for y in ys]
    y = sum(ys) / len(ys)
    if f["instance_norm_targets"]:
      y = instance_norm(y)
    if f["layer_norm_targets"]:
      y = layer_norm(y)
    return y

  def predict(self, params, images, mask, rng, train=True):
    """Head outputs for every patch token of the masked image, [B, L, D] float32."""
    tokens = self.encoder.apply({"params": params["encoder"]}, images, mask=mask,
                                deterministic=not train, rngs={"dropout": rng} if train else None)
    return self.head.apply({"params": params["lm_head"]}, tokens[:, 1:]).astype(jnp.float32)

  # -- the Method interface -----------------------------------------------------------------
  def init(self, rng, images):
    r1, r2 = jax.random.split(rng)
    enc = self.encoder.init(r1, images)["params"]          # the mask token is created regardless
    tokens = self.encoder.apply({"params": enc}, images)
    return {"encoder": enc, "lm_head": self.head.init(r2, tokens[:, 1:])["params"]}

  def init_state(self, params):
    return {"teacher": jax.tree.map(jnp.copy, params["encoder"])}

  def update_state(self, params, state, step, stats=None):
    return {**state, "teacher": ema_update(state["teacher"], params["encoder"], self.decay(step))}

  def preprocess(self, rng, images, input_cfg, on_device_aug):
    from mim_jax.data import preprocess, views
    if self.color_jitter > 0:
      kj, rng = jax.random.split(rng)
      s = self.color_jitter     # ColorJitter(s, s, s): hue off
      images = views.color_jitter(kj, images, s, s, s, 0.0)
    return preprocess.preprocess(rng, images, input_cfg, on_device_aug)

  def loss_with_mask(self, params, state, images, mask, rng):
    images = images.astype(jnp.float32)
    y = self.targets(state["teacher"], images)
    x = self.predict(params, images, mask, rng)
    loss = regression_loss(x, y, mask, self.loss_beta, self.scale())
    return loss, {"mask_ratio": jnp.mean(mask.astype(jnp.float32)),
                  "target_var": masked_std(y, mask), "pred_var": masked_std(x, mask)}

  def loss(self, params, state, images, rng, step):
    mrng, drng = jax.random.split(rng)
    mask = self.make_mask(mrng, images.shape[0])
    loss, metrics = self.loss_with_mask(params, state, images, mask, drng)
    return loss, {**metrics, "ema_decay": self.decay(step)}

  def _encoders(self, params, state):
    return {"online": params["encoder"], "teacher": state["teacher"]}   # the EMA teacher
