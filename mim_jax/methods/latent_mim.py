"""Latent MIM: masked patches reconstructed in a target encoder's latent space (Wei, Gupta and
Morgado, "Towards Latent Masked Image Modeling for Self-Supervised Visual Representation
Learning", ECCV 2024).

Exact to yibingwei-1/LatentMIM (`models_lmim.py`, `vits.py`, `xvits.py`, `main_lmim.py`,
`configs/lmim.yaml` and the README's ImageNet command):
  * views (`LMIM.create_views`): per image a uniformly random permutation of the grid's L
    patches; its first `num_vis` entries are the visible patches, the rest the targets
    (num_vis = L - round(L * mask_ratio): 20 of 196 at the official 0.9);
  * grid with gaps (`Patchify.patchify`, `masking.gap_grid`): the training crop is
    grid * (patch + gap) pixels a side and every cell gives one patch x patch patch at a random
    offset in [0, gap) pixels (`preprocess` here, which tiles those patches into the
    grid * patch image the ViT patchifies); evaluation uses the plain image;
  * online encoder: the ViT on the visible patches (cls token first), its final norm, then the
    projection head on every token: `proj_depth` bias-free Linear layers, each followed by a
    LayerNorm (eps 1e-5; the output one too) and, except the last, GELU (`_build_mlp` with
    out_norm=True; the official encoder always carries it, with 4096 hidden units and 3 layers);
  * target encoder: the same architecture; by default (`mask_target`) it sees only the target
    patches, and its projected patch tokens are the targets. 'ema': a copy of the online
    encoder at initialisation, then an EMA with momentum 1 - (1 - m0)(1 + cos(pi t / T)) / 2,
    t the iteration (updated before each iteration's forward in the official code, i.e. after
    the previous optimiser step here, with the momentum of the next iteration);
  * decoder (`xvits.CrossDecoder`): a Linear from the encoder width to the decoder width on the
    encoder tokens; per target a query = mask token (zeros at init) + the visual cue
    softmax(P_T P_V^T / sqrt(width)) Z_V (`visual_cue_queries`; P the decoder's fixed
    position embeddings of the target / visible positions, Z_V the embedded visible tokens);
    a decoder cls token prepended to the queries; position embeddings added to both streams
    (zero for cls); blocks of self-attention over the queries, cross-attention from the
    queries to the (separately normed) visible tokens, and an MLP, pre-norm (eps 1e-6); final
    norm; a Linear back to the encoder width; the cls output dropped;
  * position embeddings (`AbsolutePositionEmbeds`, frozen): 2-D sin-cos of positions
    linspace(0, 1, G) * G, i.e. index * G / (G - 1) (`lmim_pos_embed`); the online and target
    encoders use mim_jax's ViT, whose fixed sin-cos table uses the integer index;
  * loss 'patchdisc' (`infonce_patches`): predictions standardised over the target patches of
    each image (mean and unbiased std, + 1e-4), predictions and targets L2-normalised, logits
    cos / tau over the targets of the same image, cross-entropy with the same position as
    the positive, averaged, times 2 tau. 'mse' is the official `norm_l2`: each target token
    standardised over channels (unbiased variance, eps 1e-6), squared error averaged;
  * similarity regulariser (`avg_sim_coeff`): w * (sim(pred) - gamma)^2 + w * (sim(vis) -
    gamma)^2, sim the mean cosine similarity over all pairs (the diagonal included) and the
    batch, vis the online encoder's projected visible patch tokens; gamma cosine-decays from
    `gamma` to `gamma_end` over the run (sim_init 0.75 -> sim_end 0.25);
  * metrics avg_sim_pred / avg_sim_vis / avg_sim_trg as the official log, plus 'sim'
    (= avg_sim_vis: the online encoder's patch latents, the collapse signal);
  * xavier-uniform Linear weights, zero biases, cls tokens ~ N(0, 0.02); no weight decay on
    1-D parameters or on anything whose name contains 'embed' (the official
    no_weight_decay_list: the patch embedding and the decoder's input Linear).

The paper's ablations beyond the official code (its four tables) are switches of
`config.latent_mim`; see configs/latent_mim.py for each and the deviations.
"""
from __future__ import annotations

import types

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from mim_jax import masking
from mim_jax.methods.base import Method, cosine_momentum, ema_update, path_names
from mim_jax.models import vit

TARGETS = ("naive", "independent", "stopgrad", "ema", "random")
LOSSES = ("patchdisc", "mse", "l1", "huber")


# ---------------------------------------------------------------------------------------------
# Pure pieces (tested directly).

def num_visible(num_patches: int, mask_ratio: float) -> int:
  """Visible patches per image: L - round(L * mask_ratio) (20 of 196 at 0.9, the official
  num_vis)."""
  return num_patches - int(round(num_patches * mask_ratio))


def split_views(rng: jax.Array, batch: int, num_patches: int, num_vis: int):
  """(visible ids [B, K], target ids [B, L - K]): one uniform permutation per image, its first
  K entries visible and the rest targets (`LMIM.create_views`)."""
  shuffle = jnp.argsort(jax.random.uniform(rng, (batch, num_patches)), axis=1).astype(jnp.int32)
  return shuffle[:, :num_vis], shuffle[:, num_vis:]


def gap_grid_image(images: jax.Array, starts: jax.Array, patch_size: int) -> jax.Array:
  """images [B, H, W, C], starts [B, G*G, 2] top-left pixels (`masking.gap_grid`) -> the G*G
  patches tiled into one [B, G*p, G*p, C] image, which the ViT cuts back into those patches."""
  b, n, _ = starts.shape
  g = int(round(n ** 0.5))
  p = patch_size
  ar = jnp.arange(p)
  rows = starts[..., 0, None] + ar                    # [B, N, p]
  cols = starts[..., 1, None] + ar
  bi = jnp.arange(b)[:, None, None, None]
  patches = images[bi, rows[:, :, :, None], cols[:, :, None, :]]     # [B, N, p, p, C]
  patches = patches.reshape(b, g, g, p, p, -1).transpose(0, 1, 3, 2, 4, 5)
  return patches.reshape(b, g * p, g * p, -1)


def lmim_pos_embed(dim: int, grid: int) -> np.ndarray:
  """The official `AbsolutePositionEmbeds` table [G*G, dim] (no cls row; cls gets zeros):
  column then row sin-cos halves of positions linspace(0, 1, G) * G."""
  pos = np.linspace(0.0, 1.0, grid) * grid
  cols, rows = np.meshgrid(pos, pos)
  return np.concatenate([vit.sincos_1d(dim // 2, cols), vit.sincos_1d(dim // 2, rows)],
                        axis=1).astype(np.float32)


def visual_cue_queries(pe_targets: jax.Array, pe_visible: jax.Array, visible: jax.Array) -> jax.Array:
  """softmax(P_T P_V^T / sqrt(D)) Z_V: each target query starts from the visible latents
  weighted by positional similarity (`CrossPositionAttentionStem`). [B, M, D], [B, K, D],
  [B, K, D] -> [B, M, D]."""
  logits = jnp.einsum("bmd,bkd->bmk", pe_targets, pe_visible) * pe_targets.shape[-1] ** -0.5
  return jnp.einsum("bmk,bkd->bmd", jax.nn.softmax(logits, axis=-1), visible)


def _l2_normalize(x: jax.Array) -> jax.Array:
  """F.normalize(x, dim=-1): x / max(||x||, 1e-12)."""
  return x / jnp.maximum(jnp.linalg.norm(x, axis=-1, keepdims=True), 1e-12)


def patch_disc_loss(pred: jax.Array, target: jax.Array, tau: float,
                    standardize: bool = True) -> jax.Array:
  """PatchDisc (`infonce_patches`): pred, target [B, M, D]. With `standardize`, pred is
  standardised over the M patches of each image (unbiased std + 1e-4); then both are
  L2-normalised and the loss is 2 tau * mean over (b, i) of -log softmax_j(cos(p_i, t_j) / tau)
  at j = i."""
  pred = pred.astype(jnp.float32)
  target = target.astype(jnp.float32)
  if standardize:
    mu = pred.mean(axis=1, keepdims=True)
    sd = jnp.std(pred, axis=1, keepdims=True, ddof=1)
    pred = (pred - mu) / (sd + 1e-4)
  logits = jnp.einsum("bpd,bqd->bpq", _l2_normalize(pred), _l2_normalize(target)) / tau
  logp = jax.nn.log_softmax(logits, axis=-1)
  return -jnp.mean(jnp.diagonal(logp, axis1=1, axis2=2)) * (2.0 * tau)


def standardize_tokens(x: jax.Array) -> jax.Array:
  """Each token over its channels: (x - mean) / sqrt(unbiased var + 1e-6) (`norm_l2`)."""
  mean = x.mean(-1, keepdims=True)
  var = jnp.var(x, axis=-1, keepdims=True, ddof=1)
  return (x - mean) / jnp.sqrt(var + 1e-6)


def regression_loss(pred: jax.Array, target: jax.Array, kind: str, delta: float = 1.0,
                    normalize_target: bool = True) -> jax.Array:
  """'mse' | 'l1' | 'huber' (torch F.huber_loss: 0.5 d^2 if |d| < delta else
  delta (|d| - delta / 2)), averaged over every element; the target standardised per token
  first when `normalize_target` (the official `norm_l2`)."""
  pred = pred.astype(jnp.float32)
  target = target.astype(jnp.float32)
  if normalize_target:
    target = standardize_tokens(target)
  d = pred - target
  if kind == "mse":
    per = jnp.square(d)
  elif kind == "l1":
    per = jnp.abs(d)
  elif kind == "huber":
    a = jnp.abs(d)
    per = jnp.where(a < delta, 0.5 * jnp.square(d), delta * (a - 0.5 * delta))
  else:
    raise ValueError(f"latent_mim.loss={kind!r}: use one of {LOSSES}")
  return jnp.mean(per)


def avg_pairwise_sim(x: jax.Array) -> jax.Array:
  """Mean cosine similarity over all token pairs (i = j included) and the batch, x [B, N, D]."""
  x = _l2_normalize(x.astype(jnp.float32))
  return jnp.mean(jnp.einsum("bpd,bqd->bpq", x, x))


def similarity_regularizer(pred: jax.Array, visible: jax.Array, gamma) -> jax.Array:
  """(sim(pred) - gamma)^2 + (sim(visible) - gamma)^2, sim = `avg_pairwise_sim`."""
  return jnp.square(avg_pairwise_sim(pred) - gamma) + jnp.square(avg_pairwise_sim(visible) - gamma)


# ---------------------------------------------------------------------------------------------
# Modules.

class ProjHead(nn.Module):
  """`_build_mlp(D, D, hidden, depth, out_norm=True)`: bias-free Linear + LayerNorm (eps 1e-5)
  per layer, GELU between layers."""
  dim: int
  hidden: int
  depth: int
  dtype: jnp.dtype = jnp.float32
  param_dtype: jnp.dtype = jnp.float32

  @nn.compact
  def __call__(self, x):
    for i in range(self.depth):
      last = i == self.depth - 1
      x = nn.Dense(self.dim if last else self.hidden, use_bias=False, dtype=self.dtype,
                   param_dtype=self.param_dtype, kernel_init=vit.xavier_uniform, name=f"linear{i}")(x)
      x = nn.LayerNorm(epsilon=1e-5, dtype=jnp.float32, param_dtype=self.param_dtype, name=f"norm{i}")(x)
      if not last:
        x = vit.gelu_exact(x)
    return x.astype(jnp.float32)


class CrossAttention(nn.Module):
  """Queries attend to a separate key/value sequence (`xvits.CrossAttention`, with biases)."""
  num_heads: int
  attn_impl: str | None = None
  dtype: jnp.dtype = jnp.float32
  param_dtype: jnp.dtype = jnp.float32

  @nn.compact
  def __call__(self, q, kv):
    b, n, d = q.shape
    m = kv.shape[1]
    h = self.num_heads
    dense = lambda f, name: nn.Dense(f, dtype=self.dtype, param_dtype=self.param_dtype,  # noqa: E731
                                     kernel_init=vit.xavier_uniform, name=name)
    q = dense(d, "q")(q).reshape(b, n, h, d // h)
    k, v = jnp.split(dense(2 * d, "kv")(kv).reshape(b, m, 2, h, d // h), 2, axis=2)
    out = vit.attention(q, k[:, :, 0], v[:, :, 0], implementation=self.attn_impl)
    return dense(d, "proj")(out.reshape(b, n, d))


class CrossBlock(nn.Module):
  """`xvits.CrossBlock`: q += SA(norm1 q); q += CA(norm2q q, norm2kv kv); q += MLP(norm3 q)."""
  num_heads: int
  attn_impl: str | None = None
  dtype: jnp.dtype = jnp.float32
  param_dtype: jnp.dtype = jnp.float32

  @nn.compact
  def __call__(self, q, kv):
    pd = self.param_dtype
    d = q.shape[-1]
    y = vit.Attention(self.num_heads, "qkv", attn_impl=self.attn_impl, dtype=self.dtype,
                      param_dtype=pd, name="self_attn")(vit.layer_norm("norm1", pd)(q))
    q = q + y.astype(q.dtype)
    y = CrossAttention(self.num_heads, self.attn_impl, self.dtype, pd, name="cross_attn")(
        vit.layer_norm("norm2q", pd)(q), vit.layer_norm("norm2kv", pd)(kv))
    q = q + y.astype(q.dtype)
    y = vit.Mlp(4 * d, dtype=self.dtype, param_dtype=pd, name="mlp")(vit.layer_norm("norm3", pd)(q))
    return q + y.astype(q.dtype)


class LatentDecoder(nn.Module):
  """Predicts the target latents [B, M, out_dim] from the projected encoder tokens [B, 1+K, D].

  kind 'cross': `xvits.CrossDecoder` (see the module docstring). kind 'self': an MAE-style
  decoder on the same inputs: the embedded visible tokens (cls first) and the target queries
  concatenated, position embeddings added, self-attention blocks (vit.Encoder) over all, the
  target outputs through the final Linear.
  """
  grid: int
  out_dim: int
  width: int = 512
  depth: int = 3
  heads: int = 16
  kind: str = "cross"
  visual_cues: bool = True
  attn_impl: str | None = None
  dtype: jnp.dtype = jnp.float32
  param_dtype: jnp.dtype = jnp.float32

  @nn.compact
  def __call__(self, latent, vis_ids, tgt_ids):
    b, w, pd = latent.shape[0], self.width, self.param_dtype
    pe = jnp.asarray(lmim_pos_embed(w, self.grid))
    pe_v, pe_t = pe[vis_ids], pe[tgt_ids]
    x = nn.Dense(w, dtype=self.dtype, param_dtype=pd, kernel_init=vit.xavier_uniform,
                 name="embed")(latent).astype(jnp.float32)
    m = jnp.broadcast_to(self.param("mask_token", nn.initializers.zeros, (1, 1, w), pd),
                         (b, tgt_ids.shape[1], w)).astype(jnp.float32)
    if self.visual_cues:
      m = m + visual_cue_queries(pe_t, pe_v, x[:, 1:])
    x = x + jnp.concatenate([jnp.zeros((b, 1, w)), pe_v], axis=1)
    m = m + pe_t
    if self.kind == "cross":
      cls = self.param("cls_token", nn.initializers.normal(0.02), (1, 1, w), pd)
      m = jnp.concatenate([jnp.broadcast_to(cls, (b, 1, w)).astype(jnp.float32), m], axis=1)
      for i in range(self.depth):
        m = CrossBlock(self.heads, self.attn_impl, self.dtype, pd, name=f"block{i:02d}")(m, x)
      out = vit.layer_norm("norm", pd)(m)[:, 1:]
    elif self.kind == "self":
      h = jnp.concatenate([x, m], axis=1)
      h = vit.Encoder(self.depth, self.heads, attn_impl=self.attn_impl, dtype=self.dtype,
                      param_dtype=pd, name="blocks")(h)
      out = h[:, x.shape[1]:]
    else:
      raise ValueError(f"latent_mim.decoder.kind={self.kind!r}: use 'cross' or 'self'")
    return nn.Dense(self.out_dim, dtype=self.dtype, param_dtype=pd, kernel_init=vit.xavier_uniform,
                    name="pred")(out).astype(jnp.float32)


# ---------------------------------------------------------------------------------------------
# The method.

class LatentMIM(Method):
  name = "latent_mim"

  def __init__(self, config):
    super().__init__(config)
    c = config.latent_mim
    self.c = c
    self.patch = config.model.patch_size
    self.grid = self.image_size // self.patch
    self.num_patches = self.grid ** 2
    self.num_vis = num_visible(self.num_patches, float(c.mask_ratio))
    if not 0 < self.num_vis < self.num_patches:
      raise ValueError(f"latent_mim.mask_ratio={c.mask_ratio} leaves {self.num_vis} of "
                       f"{self.num_patches} patches visible: pick a ratio with 1..L-1 visible")
    self.target = str(c.target)
    if self.target not in TARGETS:
      raise ValueError(f"latent_mim.target={self.target!r}: use one of {TARGETS}")
    if str(c.loss) not in LOSSES:
      raise ValueError(f"latent_mim.loss={c.loss!r}: use one of {LOSSES}")
    if c.proj_head not in ("none", "mlp"):
      raise ValueError(f"latent_mim.proj_head={c.proj_head!r}: use 'none' or 'mlp'")
    self.gap = int(c.gap)
    m = config.model
    dtype, pdtype = jnp.dtype(m.get("dtype", "float32")), jnp.dtype(m.get("param_dtype", "float32"))
    width = self.encoder.width
    self.proj = (ProjHead(width, int(c.proj_hidden), int(c.proj_depth), dtype, pdtype)
                 if c.proj_head == "mlp" else None)
    d = c.decoder
    self.decoder = LatentDecoder(self.grid, width, int(d.width), int(d.depth), int(d.heads),
                                 str(d.kind), bool(c.visual_cues), m.get("attn_impl", "") or None,
                                 dtype, pdtype)

  # -- schedules ------------------------------------------------------------------------------
  def momentum(self, step):
    return cosine_momentum(step, self.run_steps()[1], float(self.c.momentum), float(self.c.momentum_final))

  def gamma(self, step):
    return cosine_momentum(step, self.run_steps()[1], float(self.c.gamma), float(self.c.gamma_end))

  # -- networks -------------------------------------------------------------------------------
  def _init_tower(self, rng, images):
    r1, r2 = jax.random.split(rng)
    tower = {"encoder": self.encoder.init(r1, images)["params"]}
    if self.proj is not None:
      tokens = self.encoder.apply({"params": tower["encoder"]}, images)
      tower["proj"] = self.proj.init(r2, tokens)["params"]
    return tower

  def tower(self, tower_params, images, ids):
    """Projected tokens [B, 1+K, D] (cls first) of the patches `ids` through one encoder."""
    x = self.encoder.apply({"params": tower_params["encoder"]}, images, keep_ids=ids)
    x = x.astype(jnp.float32)
    if self.proj is not None:
      x = self.proj.apply({"params": tower_params["proj"]}, x)
    return x

  def online(self, params):
    return {k: params[k] for k in ("encoder", "proj") if k in params}

  def target_params(self, params, state):
    """The target tower's parameters; only 'naive' and 'independent' let gradients through."""
    if self.target == "naive":
      return self.online(params)
    if self.target == "stopgrad":
      return jax.lax.stop_gradient(self.online(params))
    if self.target == "independent":
      return params["target"]
    return jax.lax.stop_gradient(state["target"])      # 'ema', 'random'

  def targets(self, target_params, images, vis_ids, tgt_ids):
    """Target latents [B, M, D]: the target tower on the target patches only (`mask_target`),
    or on every patch with the target positions read out."""
    if bool(self.c.mask_target):
      return self.tower(target_params, images, tgt_ids)[:, 1:]
    full = self.tower(target_params, images, None)[:, 1:]
    return vit.take_rows(full, tgt_ids)

  # -- the Method interface -----------------------------------------------------------------
  def init(self, rng, images):
    r1, r2, r3, r4 = jax.random.split(rng, 4)
    params = self._init_tower(r1, images)
    vis, tgt = split_views(r3, images.shape[0], self.num_patches, self.num_vis)
    latent = self.tower(params, images, vis)
    params["decoder"] = self.decoder.init(r2, latent, vis, tgt)["params"]
    if self.target == "independent":
      params["target"] = self._init_tower(r4, images)
    return params

  def init_state(self, params):
    state = super().init_state(params)
    if self.target == "ema":
      state["target"] = jax.tree.map(jnp.copy, self.online(params))
    elif self.target == "random":
      dummy = jnp.zeros((1, self.image_size, self.image_size, 3), jnp.float32)
      state["target"] = self._init_tower(jax.random.PRNGKey(int(self.config.seed) + 1), dummy)
    return state

  def update_state(self, params, state, step, stats=None):
    state = super().update_state(params, state, step, stats)
    if self.target == "ema":
      # The official update runs before iteration t + 1's forward with that iteration's momentum.
      state = {**state, "target": ema_update(state["target"], self.online(params), self.momentum(step + 1))}
    return state

  def preprocess(self, rng, images, input_cfg, on_device_aug):
    """One augmented view; with a gap, cropped at grid * (patch + gap) pixels and re-tiled from
    the jittered patches of `masking.gap_grid` into the grid * patch image."""
    from mim_jax.data import preprocess
    if self.gap == 0:
      return preprocess.preprocess(rng, images, input_cfg, on_device_aug)
    k_crop, k_grid = jax.random.split(rng)
    size = self.grid * (self.patch + self.gap)
    big = types.SimpleNamespace(image_size=size, aug=input_cfg.aug, mean=input_cfg.mean, std=input_cfg.std)
    x = preprocess.preprocess(k_crop, images, big, on_device_aug)
    starts = masking.gap_grid(k_grid, x.shape[0], self.grid, self.patch, self.gap)
    return gap_grid_image(x, starts, self.patch)

  def forward(self, params, state, images, vis_ids, tgt_ids):
    """(online tokens [B, 1+K, D], predictions [B, M, D], targets [B, M, D])."""
    images = images.astype(jnp.float32)
    target = self.targets(self.target_params(params, state), images, vis_ids, tgt_ids)
    latent = self.tower(self.online(params), images, vis_ids)
    pred = self.decoder.apply({"params": params["decoder"]}, latent, vis_ids, tgt_ids)
    return latent, pred, target

  def loss_terms(self, params, state, images, vis_ids, tgt_ids, step):
    c = self.c
    latent, pred, target = self.forward(params, state, images, vis_ids, tgt_ids)
    if c.loss == "patchdisc":
      rec = patch_disc_loss(pred, target, float(c.temperature), bool(c.standardize_pred))
    else:
      rec = regression_loss(pred, target, str(c.loss), float(c.huber_delta), bool(c.normalize_target))
    loss = rec
    gamma = self.gamma(step)
    sim_pred, sim_vis = avg_pairwise_sim(pred), avg_pairwise_sim(latent[:, 1:])
    if float(c.reg_weight) > 0:
      loss = loss + float(c.reg_weight) * similarity_regularizer(pred, latent[:, 1:], gamma)
    sim_trg = avg_pairwise_sim(jax.lax.stop_gradient(target))
    metrics = {"rec_loss": rec, "sim": jax.lax.stop_gradient(sim_vis),
               "avg_sim_vis": jax.lax.stop_gradient(sim_vis),
               "avg_sim_pred": jax.lax.stop_gradient(sim_pred), "avg_sim_trg": sim_trg,
               "gamma": gamma}
    if self.target == "ema":
      metrics["momentum"] = self.momentum(step)
    return loss, metrics

  def loss(self, params, state, images, rng, step):
    vis, tgt = split_views(rng, images.shape[0], self.num_patches, self.num_vis)
    return self.loss_terms(params, state, images, vis, tgt, step)

  def decay_mask(self, params):
    """No decay on 1-D parameters and on names containing 'embed' (the official list)."""
    def decays(path, p):
      return p.ndim > 1 and not any("embed" in n for n in path_names(path))
    return jax.tree_util.tree_map_with_path(decays, params)
