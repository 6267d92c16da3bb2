"""PCAE: Progressively Compressed Auto-Encoder for Self-supervised Representation Learning
(Li et al., ICLR 2023).

The authors' code is private; this is exact to their public reproduction, caddyless/PCAE
(`models_mae.py` PCAEViT.forward_teacher / forward_student / forward_decoder,
`engine_pretrain.py` train_one_epoch, `main_pretrain.py`), itself built on facebookresearch/mae:
  * per-sample random masking by argsort of uniform noise (MAE's `random_masking`): the first
    int(L * (1 - r)) patches of the shuffle are visible to the student, the remaining ones (in
    shuffle order) go to the teacher;
  * teacher: a momentum copy of the student's encoder (equal at initialisation, afterwards
    m * teacher + (1 - m) * student after every optimiser step, m following DINO's cosine
    schedule per iteration from `momentum` to 1). It runs without gradient and without drop
    path on the MASKED patches only (patch embedding + position embedding, no cls token) and
    progressively compresses them: after each block of the drop schedule it scores every token
    by its cosine similarity to the mean token, S(x) = rank(M(x, mean_j x_j)), and keeps the
    floor(N_i * k) LEAST similar ones (`keep_distinctive`), in ascending order of similarity,
    carrying their patch positions along; a final LayerNorm (the encoder's) ends it;
  * the similarity M is the cosine: the reproduction L2-normalises the tokens, averages the
    normalised tokens and takes the dot product (`center='normalized'`, the default; the order
    equals the cosine to that average). `center='raw'` uses the mean of the raw tokens as the
    paper's formula writes it;
  * student: the ViT encoder on the visible patches (MAE's keep path, cls token, drop path);
  * decoder: linear embed of the student's tokens, one learnable query (mask token, N(0, .02))
    per kept teacher token, fixed 2-D sin-cos position embeddings gathered at the visible and
    the kept teacher positions (cls: row 0), blocks with a constant drop path, LayerNorm, a
    linear prediction; the outputs at the queries are the predictions;
  * target: the teacher's kept tokens, each standardised over channels (mean, unbiased
    variance, eps 1e-6); loss = 1 - the mean cosine similarity between prediction and target
    (torch F.cosine_similarity, norms clamped at 1e-8).

See configs/pcae.py for the drop cases, the recipe and the deviations.
"""
from __future__ import annotations

from typing import Optional, Sequence

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from mim_jax import masking
from mim_jax.methods.base import Method, cosine_momentum, ema_update
from mim_jax.models import vit

# The reproduction's --drop_case values: which blocks (0-based; the drop follows the block)
# compress the teacher's tokens, for `stages` drops in a `depth`-block encoder.
DROP_CASES = {
    0: lambda depth, stages: [depth // stages * i for i in range(stages)],
    1: lambda depth, stages: [depth // stages * (i + 1) - 1 for i in range(stages)],
    2: lambda depth, stages: [int(v) for v in np.linspace(0, depth - 1, stages, endpoint=True)],
    3: lambda depth, stages: list(range(stages)),
}


def drop_schedule(depth: int, case: int, stages: int, keep_ratio: float,
                  explicit: Sequence = ()) -> tuple[tuple[int, float], ...]:
  """((block index, keep ratio), ...) in block order: `explicit` pairs when given, else the
  reproduction's drop case `case` with `stages` drops, each keeping `keep_ratio`."""
  if explicit:
    pairs = [(int(b), float(k)) for b, k in explicit]
  else:
    if case not in DROP_CASES:
      raise ValueError(f"pcae.drop_case={case!r}: use one of {sorted(DROP_CASES)} or set "
                       "pcae.drop_schedule=((block, keep_ratio), ...)")
    # The reproduction tests `i in drop_indices`: a block listed twice drops once.
    pairs = [(b, float(keep_ratio)) for b in sorted(set(DROP_CASES[case](depth, stages)))]
  blocks = [b for b, _ in pairs]
  if len(set(blocks)) != len(blocks) or blocks != sorted(blocks):
    raise ValueError(f"pcae drop blocks {blocks} must be distinct and increasing")
  for b, k in pairs:
    if not 0 <= b < depth:
      raise ValueError(f"pcae drop block {b} is outside the encoder's blocks 0..{depth - 1}")
    if not 0 < k <= 1:
      raise ValueError(f"pcae keep ratio {k} must be in (0, 1]")
  return tuple(pairs)


def token_counts(num_masked: int, schedule) -> list[int]:
  """Teacher tokens after each drop: N_{i+1} = floor(N_i * k_i) (the reproduction's int())."""
  counts, n = [], num_masked
  for _, k in schedule:
    n = int(n * k)
    if n < 1:
      raise ValueError(f"the pcae drop schedule {schedule} leaves no teacher token of {num_masked}")
    counts.append(n)
  return counts


def similarity_to_mean(x: jax.Array, center: str = "normalized") -> jax.Array:
  """M(x_i, mean_j x_j) per token, x [B, N, D] -> [B, N]: the cosine of each token with the
  mean of the L2-normalised tokens ('normalized', the reproduction) or of the raw tokens
  ('raw'). Ranking by either, up to the positive scale of the mean, is what PCAE uses."""
  x = x.astype(jnp.float32)
  unit = x / jnp.maximum(jnp.linalg.norm(x, axis=-1, keepdims=True), 1e-12)
  if center == "normalized":
    return jnp.einsum("bd,bnd->bn", unit.mean(1), unit)
  if center == "raw":
    mean = x.mean(1)
    mean = mean / jnp.maximum(jnp.linalg.norm(mean, axis=-1, keepdims=True), 1e-12)
    return jnp.einsum("bd,bnd->bn", mean, unit)
  raise ValueError(f"pcae.center={center!r}: use 'normalized' or 'raw'")


def keep_distinctive(x: jax.Array, ids: jax.Array, keep_ratio: float, center: str = "normalized",
                     rng: Optional[jax.Array] = None):
  """T(x; k): the floor(N * k) tokens of x [B, N, D] least similar to the mean token, in
  ascending order of similarity (ties: lower index first), with their positions ids [B, N].
  With `rng` the order is a random permutation instead (the reproduction's random_drop)."""
  n = x.shape[1]
  count = int(n * keep_ratio)
  if rng is not None:
    order = jnp.argsort(jax.random.uniform(rng, ids.shape), axis=1)[:, :count]
  else:
    _, order = jax.lax.top_k(-jax.lax.stop_gradient(similarity_to_mean(x, center)), count)
  return vit.take_rows(x, order), jnp.take_along_axis(ids, order, axis=1)


def standardize(t: jax.Array, eps: float = 1e-6) -> jax.Array:
  """Per token over channels: (t - mean) / sqrt(unbiased var + eps) (torch .var default)."""
  m = t.mean(-1, keepdims=True)
  v = jnp.sum(jnp.square(t - m), -1, keepdims=True) / (t.shape[-1] - 1)
  return (t - m) / jnp.sqrt(v + eps)


def cosine_loss(pred: jax.Array, target: jax.Array, eps: float = 1e-8) -> jax.Array:
  """1 - mean over tokens of F.cosine_similarity(pred, target, dim=-1)."""
  dot = jnp.sum(pred * target, -1)
  norms = (jnp.maximum(jnp.linalg.norm(pred, axis=-1), eps)
           * jnp.maximum(jnp.linalg.norm(target, axis=-1), eps))
  return 1.0 - jnp.mean(dot / norms)


class PCAEDecoder(nn.Module):
  """The reproduction's decoder: embed, one query per kept teacher token, sin-cos positions of
  the visible and the kept patches, `depth` blocks (drop path `drop_path` in every block),
  LayerNorm, linear to `out_dim`; returns the predictions at the queries [B, K, out_dim]."""
  num_patches: int
  out_dim: int
  width: int = 512
  depth: int = 8
  heads: int = 16
  drop_path: float = 0.0
  attn_impl: Optional[str] = None
  attn_pad: int = -1
  dtype: jnp.dtype = jnp.float32
  param_dtype: jnp.dtype = jnp.float32

  @nn.compact
  def __call__(self, latent, visible_ids, target_ids, deterministic=True):
    b = latent.shape[0]
    k = target_ids.shape[1]
    x = nn.Dense(self.width, dtype=self.dtype, param_dtype=self.param_dtype,
                 kernel_init=vit.xavier_uniform, name="embed")(latent).astype(jnp.float32)
    query = self.param("mask_token", nn.initializers.normal(0.02), (1, 1, self.width),
                       self.param_dtype)
    x = jnp.concatenate([x, jnp.broadcast_to(query.astype(x.dtype), (b, k, self.width))], axis=1)
    grid = int(round(self.num_patches ** 0.5))
    table = jnp.asarray(vit.sincos_2d(self.width, grid, cls_token=True))
    ids = jnp.concatenate([visible_ids, target_ids], axis=1)
    pos = jnp.concatenate([jnp.broadcast_to(table[:1], (b, 1, self.width)),
                           jnp.take(table[1:], ids, axis=0)], axis=1)
    x = x + pos
    for i in range(self.depth):
      x = vit.Block(self.heads, drop_path=self.drop_path, attn_impl=self.attn_impl,
                    attn_pad=self.attn_pad, dtype=self.dtype, param_dtype=self.param_dtype,
                    name=f"block{i:02d}")(x, None, deterministic)
    x = vit.layer_norm("norm", self.param_dtype)(x)
    x = nn.Dense(self.out_dim, dtype=self.dtype, param_dtype=self.param_dtype,
                 kernel_init=vit.xavier_uniform, name="pred")(x)
    return x[:, x.shape[1] - k:].astype(jnp.float32)


class PCAE(Method):
  name = "pcae"

  def __init__(self, config):
    super().__init__(config)
    if self.ema_decay is not None:
      raise ValueError("PCAE's teacher is already an EMA of the encoder (evaluated as 'teacher'): "
                       "set config.ema.enabled=False")
    c = config.pcae
    e = self.encoder
    if e.rel_pos_bias != "none":
      raise ValueError("PCAE drops tokens: use config.model.rel_pos_bias='none'")
    if e.pos_embed not in ("sincos", "learned"):
      raise ValueError("PCAE needs position embeddings: config.model.pos_embed 'sincos' or 'learned'")
    self.c = c
    self.patch = config.model.patch_size
    self.num_patches = (self.image_size // self.patch) ** 2
    self.mask_ratio = float(c.mask_ratio)
    self.num_visible = masking.num_kept(self.num_patches, self.mask_ratio)
    self.num_masked = self.num_patches - self.num_visible
    if self.num_visible < 1 or self.num_masked < 1:
      raise ValueError(f"pcae.mask_ratio={self.mask_ratio} leaves no visible or no masked patch")
    _, depth, self.heads = vit.variant(e.variant)
    self.depth = e.depth or depth
    self.width = e.width
    self.schedule = drop_schedule(self.depth, int(c.drop_case), int(c.drop_stage),
                                  float(c.keep_ratio), tuple(c.drop_schedule))
    self.counts = token_counts(self.num_masked, self.schedule)
    self.center = str(c.center)
    similarity_to_mean(jnp.ones((1, 2, 4)), self.center)       # validates the name
    if c.similarity != "cosine":
      raise ValueError(f"pcae.similarity={c.similarity!r}: only 'cosine' (the paper's M) exists")
    self.random_drop = bool(c.random_drop)
    m = config.model
    d = c.decoder
    self.decoder = PCAEDecoder(self.num_patches, self.width, d.width, d.depth, d.heads,
                               float(d.drop_path), m.get("attn_impl", "") or None,
                               m.get("attn_pad", -1), jnp.dtype(m.get("dtype", "float32")),
                               jnp.dtype(m.get("param_dtype", "float32")))

  # -- pieces ---------------------------------------------------------------------------------
  def momentum(self, step):
    return cosine_momentum(step, self.run_steps()[1], float(self.c.momentum),
                           float(self.c.momentum_final))

  def split(self, rng, batch):
    """(visible ids [B, V], masked ids [B, L - V]) of one random masking, both in shuffle order."""
    sm = masking.random_shuffle_mask(rng, batch, self.num_patches, self.mask_ratio)
    shuffle = jnp.argsort(sm.restore_ids, axis=1)
    return sm.keep_ids, shuffle[:, self.num_visible:]

  def teacher_forward(self, tparams, images, masked_ids, rng=None):
    """The compressing teacher on the masked patches: (final-norm tokens [B, K, D] float32,
    their patch positions [B, K]); no gradient reaches `tparams`. One `vit.ViT` forward
    without the cls token and without drop path on `masked_ids`, the schedule's
    `keep_distinctive` drops applied between its blocks (`between_blocks`)."""
    tparams = jax.lax.stop_gradient(tparams)
    drops = dict(self.schedule)
    rngs = (jax.random.split(rng, len(drops)) if rng is not None and self.random_drop
            else [None] * len(drops))
    stage = {b: j for j, b in enumerate(sorted(drops))}

    def drop(i, x, ids):
      if i not in drops:
        return x, ids
      return keep_distinctive(x, ids, drops[i], self.center, rngs[stage[i]])

    x, ids = self.encoder.apply({"params": tparams}, images, keep_ids=masked_ids, with_cls=False,
                                between_blocks=drop)
    return jax.lax.stop_gradient(x.astype(jnp.float32)), ids

  def predict(self, params, images, visible_ids, target_ids, rng=None):
    """Student + decoder: predictions [B, K, D] at the positions `target_ids`."""
    train = rng is not None
    r1, r2 = jax.random.split(rng) if train else (None, None)
    latent = self.encoder.apply({"params": params["encoder"]}, images, keep_ids=visible_ids,
                                deterministic=not train, rngs={"dropout": r1} if train else None)
    return self.decoder.apply({"params": params["decoder"]}, latent, visible_ids, target_ids,
                              deterministic=not train, rngs={"dropout": r2} if train else None)

  def loss_with_ids(self, params, state, images, visible_ids, masked_ids, rng):
    rt, rs = jax.random.split(rng)
    target, target_ids = self.teacher_forward(state["teacher"], images, masked_ids, rt)
    pred = self.predict(params, images, visible_ids, target_ids, rs)
    loss = cosine_loss(pred, standardize(target))
    return loss, {"teacher_tokens": jnp.asarray(target.shape[1], jnp.float32)}

  # -- the Method interface -----------------------------------------------------------------
  def init(self, rng, images):
    r1, r2, r3 = jax.random.split(rng, 3)
    enc = self.encoder.init(r1, images)["params"]
    vis, masked = self.split(r3, images.shape[0])
    latent = self.encoder.apply({"params": enc}, images, keep_ids=vis)
    tgt = masked[:, :self.counts[-1]]
    return {"encoder": enc, "decoder": self.decoder.init(r2, latent, vis, tgt)["params"]}

  def init_state(self, params):
    return {"teacher": jax.tree.map(jnp.copy, params["encoder"])}

  def update_state(self, params, state, step, stats=None):
    return {**state, "teacher": ema_update(state["teacher"], params["encoder"], self.momentum(step))}

  def loss(self, params, state, images, rng, step):
    images = images.astype(jnp.float32)
    mrng, rng = jax.random.split(rng)
    vis, masked = self.split(mrng, images.shape[0])
    loss, metrics = self.loss_with_ids(params, state, images, vis, masked, rng)
    return loss, {**metrics, "momentum": self.momentum(step)}

  def _encoders(self, params, state):
    return {"online": params["encoder"], "teacher": state["teacher"]}
