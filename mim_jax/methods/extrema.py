"""ExtreMA: Extreme Masking for Learning Instance and Distributed Visual Representations
(Wu, Lai, Sun & Lin, TMLR 2023).

Siamese learning with masking as the augmentation: an EMA teacher embeds the whole image, the
student embeds several highly masked copies of it (MAE-style token dropping: the student
encoder sees only the kept tokens), and a BYOL loss pulls the student's predictions towards the
teacher's projection.

Exact to microsoft/ExtreMA (`lib/builder.py`, `vits.py`, `main.py`, `lib/augment.py`):
  * encoder (`vits.py`, CaiT-style): patch embedding plus the fixed 2-D sin-cos position
    embedding, NO cls token at the input; `depth` plain pre-norm blocks (no layer scale, drop
    path linearly up to `model.drop_path`) on the patch tokens; then
    `class_attention_layers` class-attention blocks (CaiT's Block_CA: the cls token attends to
    [cls, patches], layer scale initialised to `layer_scale_init_value`, no drop path) that
    build the cls token; final LayerNorm (eps 1e-6) over [cls, patches]; the image embedding is
    the normalised cls token. Linear weights xavier-uniform, biases 0, cls token N(0, .02),
    patch-embedding kernel xavier-uniform and bias PyTorch's Conv2d default U(+-1/sqrt(fan_in)).
    That is `vit.ViT` with `class_attention_layers` (`encoder_overrides`), so the encoder
    honours the config's execution options like every other; parameters patch_embed,
    cls_token, encoder/blockNN, ca_blockNN, norm.
  * projector (the encoders' `head`): Linear(D, mlp_dim) LN GELU Linear(mlp_dim, mlp_dim) LN GELU
    Linear(mlp_dim, proj_dim); predictor: Linear(proj_dim, mlp_dim) LN GELU
    Linear(mlp_dim, proj_dim). LayerNorm (eps 1e-5), not BatchNorm, in both; xavier-uniform
    weights, zero biases. (`head_norm='batchnorm'`, not official, swaps each LayerNorm for a
    training-mode BatchNorm over the call's rows: the control of the collapse study.)
  * masks (`generate_mask`): per image one argsort of uniform noise over the L patches; with
    `disjoint` (the default) mask i keeps the slice [i v, (i + 1) v) of that order, v =
    int(L (1 - mask_ratio)), so the masks of one image never share a token; otherwise each
    mask has its own argsort. The num_masks masked copies go through the student as one batch
    (mask-major), from a single patch embedding of the student view.
  * teacher (`momentum_encoder`): encoder + projector, a copy of the student's at
    initialisation, then only an EMA of it (no predictor); no drop path; it embeds the whole
    teacher view once per image and that one output is the target of all the image's masks.
  * loss (`byol_loss`): for each mask, the batch mean of ||q/|q| - k/|k|||^2 = 2 - 2 cos(q, k)
    (F.normalize, eps 1e-12), averaged over the masks. Not symmetrised: the student always
    sees view 1, the teacher view 2.
  * EMA momentum per iteration: 1 - (1 - ema_momentum) (1 + cos(pi t / T)) / 2
    (`adjust_ema_momentum`, `base.cosine_momentum`). The official code updates the teacher
    at the start of iteration t with m(t) and the student's parameters before that
    iteration's step; here `update_state` runs after the step of iteration t, so it uses
    m(t + 1) with the parameters the next iteration starts from: the same teacher at every
    forward (at t = 0 both are the student's copy).
  * augmentation (`SpatialConsistentColorAug`): ONE RandomResizedCrop(scale (crop_min, 1)) +
    horizontal flip per image, then two independent colour augmentations of that crop,
    RandomApply(ColorJitter(0.4, 0.4, 0.2, 0.1), p=0.8) and RandomGrayscale(0.2): view 1 for
    the student, view 2 for the teacher (`preprocess`; `mim_jax.data.views` provides the
    PIL-exact colour ops). With `color_aug=False` (`--aug-spatial`) both see the same crop.

Deviations are listed in configs/extrema.py.
"""
from __future__ import annotations

from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from mim_jax.methods.base import Method, cosine_momentum, ema_update
from mim_jax.models import vit

PyTree = Any
Dtype = Any


# ---------------------------------------------------------------------------------------------
# Heads (builder._build_proj / _build_pred) and the loss.

class BatchStatNorm(nn.Module):
  """BatchNorm1d in training mode (eps 1e-5, affine): each call normalises by the statistics
  of its own rows (all leading axes), as BYOL's heads do at every forward. No running averages
  are kept: the heads are never evaluated (the probes read the encoder's cls token), so they
  would only be dead state. For the `head_norm='batchnorm'` control only (not official)."""
  epsilon: float = 1e-5
  param_dtype: Dtype = jnp.float32

  @nn.compact
  def __call__(self, x):
    x = x.astype(jnp.float32)
    axes = tuple(range(x.ndim - 1))
    mean = jnp.mean(x, axis=axes)
    var = jnp.mean(jnp.square(x - mean), axis=axes)     # biased, as torch normalises
    scale = self.param("scale", nn.initializers.ones, (x.shape[-1],), self.param_dtype)
    bias = self.param("bias", nn.initializers.zeros, (x.shape[-1],), self.param_dtype)
    return (x - mean) * jax.lax.rsqrt(var + self.epsilon) * scale + bias


class MLPHead(nn.Module):
  """Linear layers with LayerNorm (eps 1e-5) + exact GELU between them; `norm='batchnorm'`
  puts `BatchStatNorm` where the LayerNorms are (a control, not the official heads)."""
  num_layers: int
  hidden: int
  out: int
  dtype: Dtype = jnp.float32
  param_dtype: Dtype = jnp.float32
  norm: str = "layernorm"

  @nn.compact
  def __call__(self, x):
    for i in range(self.num_layers):
      last = i == self.num_layers - 1
      x = nn.Dense(self.out if last else self.hidden, dtype=self.dtype, param_dtype=self.param_dtype,
                   kernel_init=vit.xavier_uniform, name=f"linear{i}")(x)
      if not last:
        if self.norm == "batchnorm":
          x = BatchStatNorm(param_dtype=self.param_dtype, name=f"norm{i}")(x)
        else:
          x = nn.LayerNorm(epsilon=1e-5, dtype=jnp.float32, param_dtype=self.param_dtype,
                           name=f"norm{i}")(x)
        x = vit.gelu_exact(x)
    return x.astype(jnp.float32)


def l2_normalize(x: jax.Array, eps: float = 1e-12) -> jax.Array:
  """F.normalize(x, dim=-1): x / max(||x||, eps)."""
  return x / jnp.maximum(jnp.linalg.norm(x, axis=-1, keepdims=True), eps)


def byol_loss(q: jax.Array, k: jax.Array) -> jax.Array:
  """q [M, B, P] (one prediction per mask), k [B, P] (one target per image): the mean over
  masks of the batch mean of ||q/|q| - k/|k|||^2."""
  d = l2_normalize(q.astype(jnp.float32)) - l2_normalize(k.astype(jnp.float32))[None]
  return jnp.mean(jnp.sum(jnp.square(d), axis=-1))


def sample_keep_ids(rng: jax.Array, batch: int, num_patches: int, mask_ratio: float,
                    num_masks: int, disjoint: bool = True) -> jax.Array:
  """builder.generate_mask: [num_masks, batch, v] kept patch indices, v = int(L (1 - ratio)).
  disjoint: slices [i v, (i + 1) v) of one argsort of uniform noise per image; otherwise an
  argsort per mask, the first v."""
  v = int(num_patches * (1 - mask_ratio))
  if v < 1:
    raise ValueError(f"extrema.mask_ratio={mask_ratio} keeps no patch of {num_patches}")
  if disjoint:
    if num_masks * v > num_patches:
      raise ValueError(f"extrema: {num_masks} disjoint masks of {v} patches need {num_masks * v} > "
                       f"{num_patches} patches; lower num_masks or set extrema.disjoint=False")
    order = jnp.argsort(jax.random.uniform(rng, (batch, num_patches)), axis=1)
    return jnp.stack([order[:, i * v:(i + 1) * v] for i in range(num_masks)])
  keys = jax.random.split(rng, num_masks)
  return jnp.stack([jnp.argsort(jax.random.uniform(k, (batch, num_patches)), axis=1)[:, :v]
                    for k in keys])


# ---------------------------------------------------------------------------------------------

class ExtreMA(Method):
  name = "extrema"
  # timm add_weight_decay with model.no_weight_decay() = {pos_embed (fixed here), cls_token}
  # besides 1-D parameters (biases, norms, layer-scale gammas).
  no_decay_names = ("cls_token",)

  def __init__(self, config):
    super().__init__(config)
    if self.ema_decay is not None:
      raise ValueError("ExtreMA's teacher is already an EMA of the encoder (evaluated as 'teacher'): "
                       "set config.ema.enabled=False")
    c = self.c = config.extrema
    m = config.model
    if m.get("pos_embed", "sincos") != "sincos" or m.get("rel_pos_bias", "none") != "none":
      raise ValueError("ExtreMA's ViT has a fixed sin-cos position embedding and no relative "
                       "position bias: set config.model.pos_embed='sincos', rel_pos_bias='none'")
    if m.get("init_style", "xavier") != "xavier":
      raise ValueError("ExtreMA's ViT is initialised as vits.py does (xavier-uniform Linear "
                       "layers): set config.model.init_style='xavier'")
    if int(c.class_attention_layers) < 1:
      raise ValueError("extrema.class_attention_layers must be >= 1 (they build the cls token)")
    dtype = jnp.dtype(m.get("dtype", "float32"))
    param_dtype = jnp.dtype(m.get("param_dtype", "float32"))
    self.num_patches = self.encoder.grid ** 2
    self.mask_ratio = float(c.mask_ratio)
    self.num_masks = int(c.num_masks)
    self.disjoint = bool(c.disjoint)
    self.num_kept = int(self.num_patches * (1 - self.mask_ratio))
    sample_keep_ids(jax.random.PRNGKey(0), 1, self.num_patches, self.mask_ratio, self.num_masks,
                    self.disjoint)   # checks the settings now, with a message
    norm = str(c.get("head_norm", "layernorm"))
    if norm not in ("layernorm", "batchnorm"):
      raise ValueError(f"extrema.head_norm={norm!r}: use 'layernorm' (official) or 'batchnorm' "
                       "(the BYOL-style control)")
    self.projector = MLPHead(3, int(c.mlp_dim), int(c.proj_dim), dtype, param_dtype, norm)
    self.predictor = MLPHead(2, int(c.mlp_dim), int(c.proj_dim), dtype, param_dtype, norm)

  def encoder_overrides(self) -> dict:
    """vits.py's model as `vit.ViT` options: the class-attention blocks that build the cls
    token, and the patch conv's bias left at PyTorch's Conv2d default."""
    c = self.config.extrema
    return {"class_attention_layers": int(c.class_attention_layers),
            "ca_init_values": float(c.layer_scale_init_value), "patch_bias_init": "torch"}

  # -- pieces ---------------------------------------------------------------------------------
  def momentum(self, step) -> jax.Array:
    """adjust_ema_momentum at iteration `step` (fraction step / total steps of the run)."""
    return cosine_momentum(step, self.run_steps()[1], float(self.c.ema_momentum))

  def keep_ids(self, rng, batch) -> jax.Array:
    return sample_keep_ids(rng, batch, self.num_patches, self.mask_ratio, self.num_masks,
                           self.disjoint)

  def student_embed(self, params, images, keep_ids, rng=None):
    """Predictions q [M, B, proj_dim] of the student on the M masked copies of `images`."""
    train = rng is not None
    tokens = self.encoder.apply({"params": params["encoder"]}, images, keep_ids=keep_ids,
                                deterministic=not train, rngs={"dropout": rng} if train else None)
    q = self.predictor.apply({"params": params["predictor"]},
                             self.projector.apply({"params": params["projector"]}, tokens[:, 0]))
    return q.reshape(keep_ids.shape[:2] + q.shape[1:])

  def teacher_embed(self, teacher, images):
    """The teacher's projection k [B, proj_dim] of the whole images, one pass, no gradient."""
    tokens = self.encoder.apply({"params": teacher["encoder"]}, images)
    k = self.projector.apply({"params": teacher["projector"]}, tokens[:, 0])
    return jax.lax.stop_gradient(k)

  def loss_with_keep_ids(self, params, state, images, keep_ids, rng=None):
    if isinstance(images, dict):
      x1, x2 = images["student"], images["teacher"]
    else:
      x1 = x2 = images
    q = self.student_embed(params, x1.astype(jnp.float32), keep_ids, rng)
    k = self.teacher_embed(state["teacher"], x2.astype(jnp.float32))
    loss = byol_loss(q, k)
    kn = l2_normalize(k)
    return loss, {"cosine": 1.0 - 0.5 * loss,
                  # collapse monitor: spread of the normalised targets over the batch
                  "target_std": jnp.mean(jnp.std(kn, axis=0)) * np.sqrt(kn.shape[-1])}

  # -- the Method interface -----------------------------------------------------------------
  def init(self, rng, images):
    r1, r2, r3 = jax.random.split(rng, 3)
    enc = self.encoder.init(r1, images)["params"]
    cls = self.encoder.apply({"params": enc}, images)[:, 0]
    proj = self.projector.init(r2, cls)["params"]
    z = self.projector.apply({"params": proj}, cls)
    return {"encoder": enc, "projector": proj, "predictor": self.predictor.init(r3, z)["params"]}

  def init_state(self, params):
    return {"teacher": jax.tree.map(jnp.copy, {"encoder": params["encoder"],
                                               "projector": params["projector"]})}

  def update_state(self, params, state, step, stats=None):
    online = {"encoder": params["encoder"], "projector": params["projector"]}
    return {**state, "teacher": ema_update(state["teacher"], online, self.momentum(step + 1))}

  def preprocess(self, rng, images, input_cfg, on_device_aug):
    """{'student': view 1, 'teacher': view 2}: one crop + flip per image (on the device for
    in-memory data, the host's crop for streaming data), two colour augmentations of it."""
    from mim_jax.data import augment, preprocess
    k_crop, k1, k2 = jax.random.split(rng, 3)
    x = preprocess.crop_or_resize(k_crop, images, input_cfg, on_device_aug)
    if not self.c.color_aug:
      return augment.normalize(x, input_cfg.mean, input_cfg.std)
    x = jnp.round(jnp.clip(x, 0.0, 255.0))      # PIL holds 8-bit levels between the ops
    return {"student": augment.normalize(self.color_view(k1, x), input_cfg.mean, input_cfg.std),
            "teacher": augment.normalize(self.color_view(k2, x), input_cfg.mean, input_cfg.std)}

  def color_view(self, rng, x):
    """RandomApply(ColorJitter(...), p) then RandomGrayscale(p) on 8-bit levels [B, H, W, 3]."""
    from mim_jax.data import views
    c = self.c
    kp, kj, kg = jax.random.split(rng, 3)
    b = x.shape[0]
    if float(c.jitter_prob) > 0:
      jit = jax.random.uniform(kp, (b,)) < float(c.jitter_prob)
      x = jnp.where(jit[:, None, None, None], views.color_jitter(kj, x, *tuple(c.jitter)), x)
    if float(c.gray_prob) > 0:
      gray = jax.random.uniform(kg, (b,)) < float(c.gray_prob)
      x = jnp.where(gray[:, None, None, None], views.grayscale(x), x)
    return x

  def loss(self, params, state, images, rng, step):
    mrng, drng = jax.random.split(rng)
    batch = (images["student"] if isinstance(images, dict) else images).shape[0]
    return self.loss_with_keep_ids(params, state, images, self.keep_ids(mrng, batch), drng)

  def _encoders(self, params, state):
    # main_lincls.py --eval_momentum probes the momentum encoder: both are evaluated.
    return {"online": params["encoder"], "teacher": state["teacher"]["encoder"]}
