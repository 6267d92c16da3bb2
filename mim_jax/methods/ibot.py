"""iBOT: Image BERT Pre-Training with Online Tokenizer (Zhou et al., ICLR 2022).

Masked self-distillation: a student ViT sees masked global views (and unmasked local views), an
EMA teacher sees the unmasked global views, and the student's projected tokens are trained to
match the teacher's centred and sharpened distributions over `out_dim` prototypes: the [CLS]
token across views (DINO), the patch tokens at the masked positions of the same view (MIM).

Exact to bytedance/ibot:
  * main_ibot.py `iBOTLoss`: student logits / 0.1; teacher softmax((t - center) / temp);
    cls loss = mean over the (teacher view q, student view v != q) pairs of the batch-mean
    cross-entropy, every student view (global and local) against both teacher views; patch
    loss, same view only (q = v): per image the cross-entropy summed over its masked patches
    divided by max(#masked, 1), averaged over images, then over the global views; total
    lambda1 * cls + lambda2 * patch. Centres: center = m * center + (1 - m) * batch mean of
    the teacher's cls outputs [1, out_dim], center2 likewise with the teacher's patch outputs
    averaged over the patches first [1, 1, patch_out_dim], m = 0.9 for both, updated after the
    loss (`update_state`, from the loss's 'state_stats').
  * Teacher temperature: per epoch, linspace(warmup, final, warmup_epochs) then final (cls
    and patch alike; with pred_start_epoch > 0 the patch one holds its warm-up value until
    masking starts). Teacher momentum: DINO's cosine_scheduler, per iteration, from
    momentum_teacher to 1 over the whole run.
  * loader.py `ImageFolderMask`: one mask per global view per image. Its prediction ratio is
    drawn per crop: for each (pred_ratio, pred_ratio_var) pair U(r - v, r + v) (r when v = 0),
    then one of the pairs uniformly (the ViT-S recipe 'pred_ratio 0 0.3, var 0 0.2': half the
    crops unmasked, half masked with a ratio ~ U(0.1, 0.5)); 0 before pred_start_epoch. Block
    shape: `ibot_block_mask`, iBOT's variant of BEiT's generator (see there: a per-image float
    budget ratio * H * W, a minimum block area (min(H, W) // 3)^2, no maximum); 'rand':
    int(ratio * H * W) patches uniformly.
  * models/vision_transformer.py: the masked patch embeddings are replaced by a learnable
    `masked_embed` (zeros at init) before the position embedding is added; local crops use the
    position embedding interpolated bicubically as `interpolate_pos_encoding` does
    (`vit.interpolate_pos_embed`: PyTorch's a = -0.75 kernel, align_corners=False, scale
    factor (grid + 0.1) / N^0.5), inside the one ViT forward (`vit.ViT` at the crop's size).
    Student drop path `model.drop_path` (0.1), teacher none.
  * models/head.py `iBOTHead`: MLP in -> 2048 -> 2048 -> 256 (GELU, no norm), l2-normalised,
    then a weight-normalised linear layer without bias (torch weight_norm over the input
    dimension, g = 1 and frozen when norm_last_layer, else trained) to out_dim for the cls
    token and `last_layer2` to patch_out_dim for the patch tokens, or the same layer when
    shared_head. The teacher's head is built with shared_head_teacher (default True): when the
    student's head is not shared, its `last_layer2` has no teacher counterpart and the teacher
    projects patch tokens with (the EMA of) the cls layer, as the official code does.
  * Initialisation (`official_init`, config ibot.official_init): Linear weights trunc-normal
    std .02, biases 0, cls token and learned position embedding trunc-normal .02, masked
    embedding 0, patch-embedding conv PyTorch's default U(+-1/sqrt(fan_in)); head Linear
    trunc-normal .02, weight-normalised layers PyTorch's default Linear init for v.
  * utils.py: `clip_gradients` clips EACH parameter's gradient to norm clip_grad (3.0) and
    `cancel_gradients_last_layer` drops the gradients of every `last_layer*` parameter during
    the first freeze_last_layer epochs; both are applied to the gradient inside `loss` by
    `shape_gradients` (a custom VJP of the identity on the parameters), in that order. The
    dropped gradient is None in PyTorch, so AdamW skips those parameters: no weight decay,
    no moments, and its step count for them starts when they thaw. Here they are an optimiser
    group frozen until that step (`param_groups`, `optim.freeze_until`): the same.
  * The teacher (EMA of the student's encoder and head; the momentum is applied after the
    optimiser step) and both centres live in the method state, so they are checkpointed.

Collapse monitoring (logged under aux/): the teacher's per-sample output entropy for cls and
patch tokens, the entropy of its batch-mean cls distribution (low when one prototype wins),
KL(teacher || student) over the cls pairs, the fraction of masked patches and the agreement of
teacher view 0 with student view 1 (the official 'acc').

Deviations (the config docstring lists them with the data-side ones): the gradient shaping
acts per micro-batch under gradient accumulation.
"""
from __future__ import annotations

import functools
import math
from typing import Any, Optional, Sequence

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from mim_jax.methods.base import Method, cosine_momentum, ema_update, path_names
from mim_jax.models import resnet, vit

PyTree = Any


# ---------------------------------------------------------------------------------------------
# Masks (loader.py ImageFolderMask).

def ibot_block_mask(rng: jax.Array, height: int, width: int, high: jax.Array,
                    min_aspect: float = 0.3, max_aspect: Optional[float] = None,
                    max_attempts: int = 10) -> jax.Array:
  """One block-wise mask [height, width] int32 (1 = masked) of iBOT's `ImageFolderMask`.

  BEiT's loop (`mim_jax.masking.block_mask_trace`) with iBOT's three differences: the budget
  `high` = ratio * H * W is a float drawn per image (traced here); a rectangle's target area is
  U(low, high - count) with low = (min(H, W) // 3)^2 (16 at 14 x 14, 4 at 8 x 8) instead of
  BEiT's min_num; there is no max_num. As in BEiT: up to `max_attempts` rectangles of log
  aspect ~ U(log min_aspect, log max_aspect), h = round(sqrt(area * aspect)), w =
  round(sqrt(area / aspect)) (half to even), accepted when h < H, w < W and it adds between 1
  and high - count new patches; the loop ends when count >= high or an attempt round adds
  nothing, so the count never exceeds floor(high).
  """
  max_aspect = max_aspect or 1.0 / min_aspect
  log_lo, log_hi = math.log(min_aspect), math.log(max_aspect)
  low = float((min(height, width) // 3) ** 2)
  rows = jnp.arange(height)[:, None]
  cols = jnp.arange(width)[None, :]
  high = jnp.asarray(high, jnp.float32)

  def one_round(mask, count, rng):
    budget = high - count.astype(jnp.float32)

    def cond(c):
      return (c[0] < max_attempts) & (c[1] == 0)

    def body(c):
      i, _, mask, rng = c
      rng, ka, kr, kt, kl = jax.random.split(rng, 5)
      area = low + (budget - low) * jax.random.uniform(ka, ())    # Python's random.uniform
      aspect = jnp.exp(jax.random.uniform(kr, (), minval=log_lo, maxval=log_hi))
      h = jnp.round(jnp.sqrt(area * aspect)).astype(jnp.int32)
      w = jnp.round(jnp.sqrt(area / aspect)).astype(jnp.int32)
      fits = (w < width) & (h < height)
      top = jax.random.randint(kt, (), 0, jnp.maximum(height - h, 0) + 1)
      left = jax.random.randint(kl, (), 0, jnp.maximum(width - w, 0) + 1)
      inside = (rows >= top) & (rows < top + h) & (cols >= left) & (cols < left + w)
      new = jnp.sum(inside & (mask == 0)).astype(jnp.int32)
      ok = fits & (new > 0) & (new.astype(jnp.float32) <= budget)
      return i + 1, jnp.where(ok, new, 0), jnp.where(ok & inside, 1, mask), rng

    _, delta, mask, rng = jax.lax.while_loop(cond, body, (jnp.int32(0), jnp.int32(0), mask, rng))
    return mask, delta, rng

  def cond(c):
    mask, count, stuck, rng = c
    return (count.astype(jnp.float32) < high) & ~stuck

  def body(c):
    mask, count, stuck, rng = c
    mask, delta, rng = one_round(mask, count, rng)
    return mask, count + delta, delta == 0, rng

  init = (jnp.zeros((height, width), jnp.int32), jnp.int32(0), jnp.bool_(False), rng)
  return jax.lax.while_loop(cond, body, init)[0]


def pred_ratios(rng: jax.Array, n: int, ratio: Sequence[float], ratio_var: Sequence[float]) -> jax.Array:
  """`ImageFolderMask.get_pred_ratio` for n crops: per crop, every (r, v) pair gives
  U(r - v, r + v) (r when v = 0) and one pair is chosen uniformly."""
  ratio = np.asarray(ratio, np.float32).reshape(-1)
  var = np.broadcast_to(np.asarray(ratio_var, np.float32).reshape(-1), ratio.shape)
  if np.any(ratio < var):
    raise ValueError(f"ibot.pred_ratio {tuple(ratio)} must be >= ibot.pred_ratio_var {tuple(var)}")
  k_u, k_c = jax.random.split(rng)
  u = jax.random.uniform(k_u, (n, len(ratio)))
  draws = jnp.where(var > 0, (ratio - var) + 2 * var * u, ratio)
  choice = jax.random.randint(k_c, (n,), 0, len(ratio))
  return jnp.take_along_axis(draws, choice[:, None], axis=1)[:, 0]


def ibot_masks(rng: jax.Array, ratios: jax.Array, height: int, width: int,
               shape: str = "block", aspect: Sequence[float] = (0.3, 1 / 0.3)) -> jax.Array:
  """One mask per crop [n, H * W] int32 for per-crop ratios [n] ('block' or 'rand')."""
  n = ratios.shape[0]
  high = ratios.astype(jnp.float32) * (height * width)
  keys = jax.random.split(rng, n)
  if shape == "block":
    masks = jax.vmap(lambda k, hi: ibot_block_mask(k, height, width, hi, aspect[0], aspect[1]))(keys, high)
    return masks.reshape(n, height * width)
  if shape == "rand":
    # int(high) patches chosen uniformly: ranks of iid noise below the count.
    noise = jax.vmap(lambda k: jax.random.uniform(k, (height * width,)))(keys)
    ranks = jnp.argsort(jnp.argsort(noise, axis=1), axis=1)
    return (ranks < jnp.floor(high)[:, None].astype(jnp.int32)).astype(jnp.int32)
  raise ValueError(f"ibot.pred_shape must be 'block' or 'rand', got {shape!r}")


# ---------------------------------------------------------------------------------------------
# The loss (main_ibot.py iBOTLoss.forward) as a pure function.

def dino_loss(student_cls: jax.Array, teacher_cls: jax.Array, center: jax.Array, temp,
              student_temp: float = 0.1) -> tuple[jax.Array, dict]:
  """DINO's loss (facebookresearch/dino main_dino.py `DINOLoss.forward`; iBOT's cls term):
  student_cls [V, B, K] (the G global views first, then the local ones), teacher_cls [G, B, K]
  (the teacher's global views), center [1, K] -> (mean over the (teacher view q, student view
  v != q) pairs of the batch-mean cross-entropy between softmax((t_q - center) / temp) and
  log_softmax(s_v / student_temp), parts). The teacher term gets no gradient."""
  g, v = teacher_cls.shape[0], student_cls.shape[0]
  if v < 2:
    raise ValueError("the cls loss needs at least two views: set views.num_global >= 2 or add "
                     "local views")
  t = jax.lax.stop_gradient(jax.nn.softmax((teacher_cls.astype(jnp.float32) - center) / temp, axis=-1))
  s = jax.nn.log_softmax(student_cls.astype(jnp.float32) / student_temp, axis=-1)
  # ce[q, v]: batch mean of the cross-entropy of teacher view q against student view v.
  ce = -jnp.einsum("qbk,vbk->qv", t, s) / t.shape[1]
  pairs = 1.0 - np.eye(g, v, dtype=np.float32)                 # v != q
  return jnp.sum(ce * pairs) / pairs.sum(), {"teacher_probs": t, "student_log_probs": s}


def ibot_loss(student_cls: jax.Array, student_patch: jax.Array, teacher_cls: jax.Array,
              teacher_patch: jax.Array, masks: jax.Array, center: jax.Array, center2: jax.Array,
              temp, temp2, student_temp: float = 0.1, lambda1: float = 1.0,
              lambda2: float = 1.0) -> tuple[jax.Array, dict]:
  """student_cls [V, B, K] (the G global views first, then the local ones), student_patch
  [G, B, L, K2], teacher_cls [G, B, K], teacher_patch [G, B, L, K2], masks [G, B, L] (1 =
  masked), center [1, K], center2 [1, 1, K2] -> (loss, parts). The teacher terms get no
  gradient; the cls term is `dino_loss`."""
  if student_cls.shape[0] < 2:
    raise ValueError("iBOT's cls loss needs at least two views: set ibot.views.num_global >= 2 "
                     "or add local views")
  loss_cls, cls_parts = dino_loss(student_cls, teacher_cls, center, temp, student_temp)
  t2 = jax.lax.stop_gradient(
      jax.nn.softmax((teacher_patch.astype(jnp.float32) - center2) / temp2, axis=-1))
  s2 = jax.nn.log_softmax(student_patch.astype(jnp.float32) / student_temp, axis=-1)
  per_patch = -jnp.sum(t2 * s2, axis=-1)                       # [G, B, L]
  m = masks.astype(jnp.float32)
  per_image = jnp.sum(per_patch * m, axis=-1) / jnp.maximum(jnp.sum(m, axis=-1), 1.0)
  loss_patch = jnp.mean(jnp.mean(per_image, axis=1))
  total = lambda1 * loss_cls + lambda2 * loss_patch
  return total, {"loss_cls": loss_cls, "loss_patch": loss_patch, **cls_parts,
                 "teacher_patch_probs": t2}


def entropy(p: jax.Array) -> jax.Array:
  """Mean over all leading axes of -sum_k p log p (0 log 0 = 0)."""
  return jnp.mean(-jnp.sum(jnp.where(p > 0, p * jnp.log(jnp.where(p > 0, p, 1.0)), 0.0), axis=-1))


# ---------------------------------------------------------------------------------------------
# Schedules shared with DINO (methods/dino.py).

def teacher_temperature(epoch: jax.Array, warmup: float, final: float, warmup_epochs: int) -> jax.Array:
  """DINOLoss / iBOTLoss `teacher_temp_schedule[epoch]`: np.linspace(warmup, final,
  warmup_epochs) for the first warmup_epochs epochs, then final (float `epoch`)."""
  n = int(warmup_epochs)
  frac = epoch / max(n - 1, 1)
  return jnp.where(epoch < n, warmup + (final - warmup) * frac, final)


def freeze_steps(freeze_last_layer: float, steps_per_epoch: int) -> int:
  """Steps during which the last layers are frozen (freeze_last_layer epochs)."""
  return int(round(float(freeze_last_layer) * steps_per_epoch))


def last_layer_groups(until: int, head: str = "head") -> tuple:
  """`cancel_gradients_last_layer` as optimiser groups: every `<head>/last_layer*` parameter
  is untouched (no update, no decay, no optimiser state) until step `until`, then trained with
  fresh optimiser state at the global learning rate, as PyTorch skips a grad-None
  parameter."""
  return ((rf"^{head}/last_layer", {"frozen_until_step": until}),) if until > 0 else ()


# ---------------------------------------------------------------------------------------------
# Gradient shaping: per-parameter clipping and the frozen last layer.

def _is_last_layer(path) -> bool:
  return any(str(n).startswith("last_layer") for n in path_names(path))


def _shape(grads: PyTree, keep_last: jax.Array, clip: float) -> PyTree:
  def one(path, g):
    if clip > 0:
      norm = jnp.sqrt(jnp.sum(jnp.square(g.astype(jnp.float32))))
      coef = clip / (norm + 1e-6)
      g = jnp.where(coef < 1, g * coef.astype(g.dtype), g)
    if _is_last_layer(path):
      g = g * keep_last.astype(g.dtype)
    return g
  return jax.tree_util.tree_map_with_path(one, grads)


@functools.partial(jax.custom_vjp, nondiff_argnums=(2,))
def shape_gradients(params: PyTree, keep_last: jax.Array, clip: float) -> PyTree:
  """The identity on `params`; its backward pass clips each parameter's gradient to norm `clip`
  (utils.clip_gradients: coef = clip / (norm + 1e-6), applied when < 1; 0 = off) and then
  multiplies the gradients of `last_layer*` parameters by keep_last (0. during the frozen
  epochs: utils.cancel_gradients_last_layer)."""
  return params


def _shape_fwd(params, keep_last, clip):
  return params, keep_last


def _shape_bwd(clip, keep_last, g):
  return _shape(g, keep_last, clip), jnp.zeros_like(keep_last)


shape_gradients.defvjp(_shape_fwd, _shape_bwd)


# ---------------------------------------------------------------------------------------------
# Head (models/head.py iBOTHead).

# utils.trunc_normal_(std=.02) with its default bounds a=-2, b=2 (absolute: +-100 std).
_trunc02 = vit.timm_trunc_normal(0.02)


class WeightNormDense(nn.Module):
  """nn.utils.weight_norm(nn.Linear(in, out, bias=False)): W = g * v / ||v||, the norm taken
  over the input dimension of each output unit; g = 1 fixed unless `train_g`."""
  features: int
  train_g: bool = False
  dtype: Any = jnp.float32

  @nn.compact
  def __call__(self, x):
    v = self.param("kernel_v", vit.torch_default_uniform(x.shape[-1]), (x.shape[-1], self.features))
    w = v / jnp.sqrt(jnp.sum(jnp.square(v), axis=0, keepdims=True))
    if self.train_g:
      # [1, out]: 2-D like torch's weight_g [out, 1], so it is weight-decayed as there.
      w = w * self.param("kernel_g", nn.initializers.ones, (1, self.features))
    return jnp.dot(x.astype(self.dtype), w.astype(self.dtype)).astype(jnp.float32)


class IBOTHead(nn.Module):
  """iBOTHead: MLP (nlayers Linear, GELU between) to the bottleneck, l2-normalised, then the
  weight-normalised `last_layer` (cls, out_dim) and `last_layer2` (patches, patch_out_dim) or
  `last_layer` again when `shared`."""
  out_dim: int
  patch_out_dim: int
  hidden_dim: int = 2048
  bottleneck_dim: int = 256
  nlayers: int = 3
  norm_last_layer: bool = True
  shared: bool = False
  dtype: Any = jnp.float32
  # DINOHead(use_bn=True) (--use_bn_in_head, DINO's ResNet recipe): BatchNorm1d (torch
  # semantics, `resnet.BatchNorm`, module 'bn<i>') after every hidden Linear, before the GELU.
  use_bn: bool = False
  bn_groups: int = 1

  @nn.compact
  def __call__(self, x, patches: bool = True, train: bool = False):
    """x: tokens [B, 1 + L, D] (cls first) with `patches`, else cls tokens [B, D].
    Returns (cls logits [B, out_dim], patch logits [B, L, patch_out_dim] or None). `train`:
    BatchNorm (use_bn) with batch statistics, updating its running ones."""
    dims = [self.hidden_dim] * (max(self.nlayers, 1) - 1) + [self.bottleneck_dim]
    h = x
    for i, d in enumerate(dims):
      h = nn.Dense(d, dtype=self.dtype, kernel_init=_trunc02, bias_init=nn.initializers.zeros,
                   name=f"fc{i}")(h)
      if i < len(dims) - 1:
        if self.use_bn:
          h = resnet.BatchNorm(groups=self.bn_groups, name=f"bn{i}")(h, train)
        h = vit.gelu_exact(h)
    h = h.astype(jnp.float32)
    h = h / jnp.maximum(jnp.sqrt(jnp.sum(jnp.square(h), axis=-1, keepdims=True)), 1e-12)
    last = WeightNormDense(self.out_dim, not self.norm_last_layer, self.dtype, name="last_layer")
    if not patches:
      return last(h), None
    last2 = last if self.shared else WeightNormDense(self.patch_out_dim, not self.norm_last_layer,
                                                     self.dtype, name="last_layer2")
    return last(h[:, 0]), last2(h[:, 1:])


# ---------------------------------------------------------------------------------------------
# Initialisation.

def official_init(rng: jax.Array, encoder_params: PyTree) -> PyTree:
  """Redraws a mim_jax ViT's parameters as iBOT's VisionTransformer initialises them."""
  leaves, treedef = jax.tree_util.tree_flatten_with_path(encoder_params)
  out = []
  for i, (path, x) in enumerate(leaves):
    names = path_names(path)
    key = jax.random.fold_in(rng, i)
    if names[0] == "patch_embed":        # Conv2d default: kaiming_uniform(a=sqrt(5)), bias alike
      fan_in = encoder_params["patch_embed"]["proj"]["kernel"].shape[0]
      x = vit.torch_default_uniform(fan_in)(key, x.shape, x.dtype)
    elif names[-1] == "mask_token":
      x = jnp.zeros_like(x)
    elif names[-1] in ("cls_token", "pos_embed") or names[-1].endswith("kernel"):
      x = _trunc02(key, x.shape, x.dtype)
    elif names[-1].endswith("bias"):
      x = jnp.zeros_like(x)
    out.append(x)
  return jax.tree_util.tree_unflatten(treedef, out)


# ---------------------------------------------------------------------------------------------

class IBOT(Method):
  name = "ibot"

  def __init__(self, config):
    super().__init__(config)
    c = config.ibot
    self.c = c
    m = config.model
    if m.get("rel_pos_bias", "none") != "none":
      raise ValueError("iBOT's ViT has an absolute position embedding: set config.model.rel_pos_bias='none'")
    self.patch = int(m.patch_size)
    self.grid = self.image_size // self.patch
    self.shared, self.shared_teacher = bool(c.shared_head), bool(c.shared_head_teacher)
    if self.shared and not self.shared_teacher:
      raise ValueError("ibot.shared_head=True needs ibot.shared_head_teacher=True (the teacher's "
                       "separate patch layer would have no student counterpart)")
    if (self.shared or self.shared_teacher) and int(c.patch_out_dim) != int(c.out_dim):
      raise ValueError(f"with a shared head the patch outputs have out_dim: set "
                       f"ibot.patch_out_dim={int(c.out_dim)} (= ibot.out_dim)")
    v = c.views
    if int(v.num_global) + int(v.num_local) < 2:
      raise ValueError("iBOT needs two views or more: set ibot.views.num_global=2")
    if int(v.num_local) and int(v.local_size) % self.patch:
      raise ValueError(f"ibot.views.local_size={int(v.local_size)} must be a multiple of the patch "
                       f"size {self.patch}")
    dtype = jnp.dtype(m.get("dtype", "float32"))
    h = c.head
    kw = dict(out_dim=int(c.out_dim), patch_out_dim=int(c.patch_out_dim), hidden_dim=int(h.hidden_dim),
              bottleneck_dim=int(h.bottleneck_dim), nlayers=int(h.nlayers),
              norm_last_layer=bool(c.norm_last_layer), dtype=dtype)
    self.head = IBOTHead(shared=self.shared, **kw)
    self.teacher_head = IBOTHead(shared=self.shared_teacher, **kw)

  def encoder_overrides(self) -> dict:
    return {"use_mask_token": True}

  def freeze_steps(self) -> int:
    """Steps during which the last layers are frozen (freeze_last_layer epochs)."""
    return freeze_steps(self.c.freeze_last_layer, self.run_steps()[0])

  def param_groups(self):
    """`cancel_gradients_last_layer`: every head `last_layer*` parameter is untouched (no
    update, no decay, no optimiser state) for the first freeze_last_layer epochs, then trained
    with fresh AdamW state at the global learning rate, as PyTorch skips a grad-None
    parameter."""
    return last_layer_groups(self.freeze_steps())

  # -- run length (schedules are per epoch / per iteration, as the official ones) -------------
  def epoch(self, step) -> jax.Array:
    return jnp.asarray(step, jnp.int32) // self.run_steps()[0]

  def teacher_temps(self, step) -> tuple[jax.Array, jax.Array]:
    """(cls, patch) teacher temperatures at `step` (iBOTLoss.teacher_temp{,2}_schedule[epoch])."""
    c = self.c
    e = self.epoch(step).astype(jnp.float32)
    n = int(c.warmup_teacher_temp_epochs)
    t1 = teacher_temperature(e, float(c.warmup_teacher_temp), float(c.teacher_temp), n)
    start = float(c.pred_start_epoch)
    t2 = teacher_temperature(e - start, float(c.warmup_teacher_patch_temp),
                             float(c.teacher_patch_temp), n)
    t2 = jnp.where(e < start, float(c.warmup_teacher_patch_temp), t2)
    return t1, t2

  def momentum(self, step) -> jax.Array:
    """utils.cosine_scheduler(momentum_teacher, 1, epochs, iters)[step]."""
    return cosine_momentum(step, self.run_steps()[1], float(self.c.momentum_teacher))

  # -- networks -----------------------------------------------------------------------------
  def teacher_params(self, params: PyTree) -> PyTree:
    """The student parameters the teacher mirrors (utils: names common to both networks)."""
    head = dict(params["head"])
    if self.shared_teacher and not self.shared:
      head.pop("last_layer2", None)
    return {"encoder": params["encoder"], "head": head}

  # -- Method interface ----------------------------------------------------------------------
  def init(self, rng, images):
    r_enc, r_head, r_off = jax.random.split(rng, 3)
    enc = self.encoder.init(r_enc, images)["params"]
    if self.c.official_init:
      enc = official_init(r_off, enc)
    tokens = self.encoder.apply({"params": enc}, images)
    return {"encoder": enc, "head": self.head.init(r_head, tokens)["params"]}

  def init_state(self, params):
    c = self.c
    return {**super().init_state(params),
            "teacher": jax.tree.map(jnp.copy, self.teacher_params(params)),
            "center": jnp.zeros((1, int(c.out_dim)), jnp.float32),
            "center2": jnp.zeros((1, 1, int(c.patch_out_dim)), jnp.float32)}

  def update_state(self, params, state, step, stats=None):
    state = super().update_state(params, state, step, stats)
    new = {**state, "teacher": ema_update(state["teacher"], self.teacher_params(params),
                                          self.momentum(step))}
    if stats is not None:
      m1, m2 = float(self.c.center_momentum), float(self.c.center_momentum2)
      new["center"] = state["center"] * m1 + stats["center"] * (1 - m1)
      new["center2"] = state["center2"] * m2 + stats["center2"] * (1 - m2)
    return new

  def train_views(self):
    """DataAugmentationiBOT's crops: num_global at the input size, num_local at local_size."""
    from mim_jax.data import views
    return views.crop_specs(self.c.views, self.config.input)

  def preprocess(self, rng, images, input_cfg, on_device_aug):
    """The multi-crop views ({'global': [B, G, S, S, 3], 'local': [B, N, s, s, 3]}), normalised:
    in-memory data is cropped here from the stored images; streamed data arrives as the
    host's crops of the decoded image (`train_views`) and only gets the colour ops."""
    from mim_jax.data import views
    return views.views_from_config(rng, images, self.c.views, input_cfg)

  def masks(self, rng, n: int, step) -> jax.Array:
    """[n, L] int32 masks for n global crops at `step` (none before pred_start_epoch)."""
    c = self.c
    k_r, k_m = jax.random.split(rng)
    ratios = pred_ratios(k_r, n, tuple(np.ravel(c.pred_ratio)), tuple(np.ravel(c.pred_ratio_var)))
    ratios = jnp.where(self.epoch(step) < int(c.pred_start_epoch), 0.0, ratios)
    return ibot_masks(k_m, ratios, self.grid, self.grid, c.pred_shape, tuple(c.pred_aspect_ratio))

  def loss(self, params, state, images, rng, step):
    c = self.c
    if not isinstance(images, dict):   # one plain view (evaluators): use it as both global views
      images = {"global": jnp.stack([images, images], axis=1)}
    glob = images["global"].astype(jnp.float32)
    b, g = glob.shape[:2]
    gv = jnp.swapaxes(glob, 0, 1).reshape((g * b,) + glob.shape[2:])   # view-major, as torch.cat
    k_mask, k_drop, k_drop_local = jax.random.split(rng, 3)
    masks = self.masks(k_mask, g * b, step)

    keep_last = (jnp.asarray(step) >= self.freeze_steps()).astype(jnp.float32)
    params = shape_gradients(params, keep_last, float(c.clip_grad))

    # One ViT forward for every view: the teacher's without drop path, the student's masked
    # global views and its local views (position table interpolated at their size) with it.
    teacher = jax.lax.stop_gradient(state["teacher"])
    t_tokens = self.encoder.apply({"params": teacher["encoder"]}, gv)
    t_cls, t_patch = self.teacher_head.apply({"params": teacher["head"]}, t_tokens)
    s_tokens = self.encoder.apply({"params": params["encoder"]}, gv, mask=masks, deterministic=False,
                                  rngs={"dropout": k_drop})
    s_cls, s_patch = self.head.apply({"params": params["head"]}, s_tokens)
    s_cls = s_cls.reshape(g, b, -1)
    if "local" in images:
      loc = images["local"].astype(jnp.float32)
      nl = loc.shape[1]
      lv = jnp.swapaxes(loc, 0, 1).reshape((nl * b,) + loc.shape[2:])
      l_tokens = self.encoder.apply({"params": params["encoder"]}, lv, deterministic=False,
                                    rngs={"dropout": k_drop_local})
      l_cls, _ = self.head.apply({"params": params["head"]}, l_tokens[:, 0], patches=False)
      s_cls = jnp.concatenate([s_cls, l_cls.reshape(nl, b, -1)], axis=0)

    temp, temp2 = self.teacher_temps(step)
    t_cls = t_cls.reshape(g, b, -1)
    t_patch = t_patch.reshape((g, b) + t_patch.shape[1:])
    s_patch = s_patch.reshape((g, b) + s_patch.shape[1:])
    loss, parts = ibot_loss(s_cls, s_patch, t_cls, t_patch, masks.reshape(g, b, -1), state["center"],
                            state["center2"], temp, temp2, float(c.student_temp), float(c.lambda1),
                            float(c.lambda2))
    t = parts["teacher_probs"]
    h_cls = entropy(t)
    stats = {"center": jax.lax.stop_gradient(jnp.mean(t_cls.reshape(g * b, -1), axis=0, keepdims=True)),
             "center2": jax.lax.stop_gradient(jnp.mean(t_patch, axis=(0, 1, 2))[None, None])}
    agree = jnp.mean(jnp.argmax(t[0], -1) == jnp.argmax(parts["student_log_probs"][1], -1))
    metrics = {
        "loss_cls": parts["loss_cls"], "loss_patch": parts["loss_patch"],
        "teacher_entropy_cls": h_cls,
        "teacher_entropy_patch": entropy(parts["teacher_patch_probs"]),
        "teacher_batch_entropy_cls": entropy(jnp.mean(t.reshape(g * b, -1), axis=0)),
        "kl_cls": parts["loss_cls"] - h_cls,
        "mask_ratio": jnp.mean(masks.astype(jnp.float32)),
        "teacher_temp": temp, "teacher_patch_temp": temp2, "momentum": self.momentum(step),
        "cls_agreement": agree.astype(jnp.float32),
        "state_stats": stats,
    }
    return loss, metrics

  def _encoders(self, params, state):
    return {**super()._encoders(params, state), "teacher": state["teacher"]["encoder"]}
