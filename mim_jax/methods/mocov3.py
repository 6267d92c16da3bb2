"""MoCo v3: an empirical study of training self-supervised vision transformers (Chen, Xie and
He, ICCV 2021), exact to facebookresearch/moco-v3 (main_moco.py, moco/builder.py, vits.py,
moco/optimizer.py).

  * moco/builder.py `MoCo.contrastive_loss`: q and k L2-normalised, the keys gathered from
    every GPU (`concat_all_gather`: here the jitted batch is already the global one), logits
    q k^T / T, labels the positions of each query's own key in the gathered batch
    (arange(N) + N x rank: arange of the global batch), cross-entropy averaged over the queries
    (DDP then averages the ranks: the global mean), times 2T: `contrastive_loss`.
  * `MoCo.forward`: q1 = predictor(base_encoder(x1)), q2 = predictor(base_encoder(x2)) and,
    without gradient, k1 = momentum_encoder(x1), k2 = momentum_encoder(x2), every view its own
    forward (training-mode BatchNorm per view, SyncBatchNorm: statistics over the global
    batch, running statistics moved after each view); loss = ctr(q1, k2) + ctr(q2, k1). No
    queue.
  * `_build_mlp`: Linear layers without bias, BatchNorm1d + ReLU after every hidden one, the
    last followed by BatchNorm1d(affine=False) when last_bn. `MoCo_ResNet`: the projector
    (replacing the ResNet's fc) is _build_mlp(2, 2048, mlp_dim, dim), the predictor
    _build_mlp(2, dim, mlp_dim, dim, last_bn=False); `MoCo_ViT`: projector _build_mlp(3, D,
    mlp_dim, dim), predictor _build_mlp(2, dim, mlp_dim, dim) (last BN kept): `mlp_spec`,
    HEADS. Head Linear layers keep PyTorch's default init.
  * The momentum encoder is the base encoder with its projector (the fc / head), a copy at
    initialisation; `_update_momentum_encoder(m)` runs at the start of every iteration with
    main_moco.py's `adjust_moco_momentum(epoch + i / iters_per_epoch)` = 1 - (1 + cos(pi
    epoch / epochs)) (1 - m) / 2 (--moco-m-cos; otherwise the constant --moco-m), then the
    keys are computed: `adjust_moco_momentum`, `MoCoV3.momentum`.
  * vits.py `VisionTransformerMoCo`: timm's ViT with a fixed 2-D sin-cos position embedding
    (zero for [CLS]), the [CLS] token after the final norm as the feature (the head's input),
    xavier-uniform Linear layers with q, k and v's thirds of the qkv weight each treated as
    its own matrix, zero biases, [CLS] token N(0, 1e-6), the patch projection uniform with
    bound sqrt(6 / (3 p^2 + D)) and zero bias (`vit_init`); `stop_grad_conv1`: the patch
    projection's weight and bias never receive a gradient (an optimiser group frozen for the
    whole run, `param_groups`).
  * moco/optimizer.py `LARS`: weight decay and the trust ratio on parameters of more than one
    dimension only (mim_jax's default decay mask). torch AdamW over model.parameters() decays
    every parameter that receives a gradient, biases and norms included: mocov3.decay_all
    (the base's `decay_mask`), set by the ViT preset.
"""
from __future__ import annotations

import math

import jax
import jax.numpy as jnp

from mim_jax.methods.base import cosine_momentum
from mim_jax.methods.joint_embedding import JointEmbedding, collapse_monitor, l2_normalize

# Official head pairs per backbone: (projector layers, predictor ends with BatchNorm).
HEADS = {"resnet": (2, False), "vit": (3, True)}


def contrastive_loss(q: jax.Array, k: jax.Array, temperature: float) -> tuple[jax.Array, jax.Array]:
  """moco/builder.py `MoCo.contrastive_loss` of queries q and keys k [N, d] of the global
  batch (row i of both is image i): CE(normalize(q) normalize(k)^T / T, arange(N)) x 2T.
  Returns (loss, the fraction of queries whose own key scores highest)."""
  q, k = l2_normalize(q), l2_normalize(k)
  logits = q @ k.T / temperature
  idx = jnp.arange(q.shape[0])
  ce = -jax.nn.log_softmax(logits, axis=1)[idx, idx]
  acc = jnp.mean((jnp.argmax(logits, axis=1) == idx).astype(jnp.float32))
  return jnp.mean(ce) * (2.0 * temperature), acc


def adjust_moco_momentum(epoch, epochs: float, base: float):
  """main_moco.py `adjust_moco_momentum` at a fractional `epoch`:
  1 - 0.5 (1 + cos(pi epoch / epochs)) (1 - base)."""
  return 1.0 - 0.5 * (1.0 + jnp.cos(jnp.pi * jnp.asarray(epoch, jnp.float32) / epochs)) * (1.0 - base)


def mlp_spec(num_layers: int, mlp_dim: int, output_dim: int, last_bn: bool = True) -> tuple:
  """moco/builder.py `MoCo._build_mlp` as a `joint_embedding.MLP` layers spec."""
  if num_layers < 1:
    raise ValueError(f"mocov3: an MLP needs at least one layer, got {num_layers}")
  hidden = tuple((int(mlp_dim), False, "affine") for _ in range(num_layers - 1))
  return hidden + ((int(output_dim), False, "plain" if last_bn else ""),)


def vit_init(rng: jax.Array, encoder_params: dict) -> dict:
  """vits.py `VisionTransformerMoCo`'s initialisation on mim_jax's ViT parameters: every
  qkv kernel [D, 3D] uniform(+-sqrt(6 / (D + D))) (the three D x D blocks as separate
  xavier-uniform matrices) and the [CLS] token N(0, 1e-6). The other Linear kernels and the
  patch projection (a Dense over the 3 p^2 pixels of a patch: bound sqrt(6 / (3 p^2 + D))) are
  already xavier-uniform with zero biases."""
  flat = jax.tree_util.tree_flatten_with_path(encoder_params)[0]
  treedef = jax.tree_util.tree_structure(encoder_params)
  keys = jax.random.split(rng, len(flat))
  out = []
  for key, (path, p) in zip(keys, flat):
    name = getattr(path[-1], "key", str(path[-1]))
    if name == "qkv_kernel":
      d = p.shape[0]
      val = math.sqrt(6.0 / float(d + p.shape[1] // 3))
      p = jax.random.uniform(key, p.shape, p.dtype, -val, val)
    elif name == "cls_token":
      p = 1e-6 * jax.random.normal(key, p.shape, p.dtype)
    out.append(p)
  return jax.tree_util.tree_unflatten(treedef, out)


class MoCoV3(JointEmbedding):
  name = "mocov3"
  teacher_heads = ("projector",)

  def head_kind(self) -> str:
    kind = str(self.c.get("heads", "auto"))
    if kind == "auto":
      kind = self.model_name
    if kind not in HEADS:
      raise ValueError(f"mocov3.heads={kind!r}: use 'auto', 'resnet' or 'vit'")
    return kind

  def head_modules(self):
    proj_layers, pred_last_bn = HEADS[self.head_kind()]
    c = self.c
    return {"projector": self.mlp(mlp_spec(proj_layers, c.mlp_dim, c.dim)),
            "predictor": self.mlp(mlp_spec(2, c.mlp_dim, c.dim, pred_last_bn))}

  def init_variables(self, rng, images):
    out = super().init_variables(rng, images)
    if self.model_name == "vit" and bool(self.c.get("vit_init", True)):
      out["params"]["encoder"] = vit_init(jax.random.fold_in(rng, 7), out["params"]["encoder"])
    return out

  def param_groups(self):
    """vits.py stop_grad_conv1: the ViT's patch projection is frozen for the whole run."""
    if self.model_name == "vit" and bool(self.c.get("stop_grad_conv1", False)):
      return ((r"^encoder/patch_embed/", "frozen"),)
    return ()

  def momentum(self, step):
    """The rate applied after optimiser step `step`: the official code updates the momentum
    encoder at the start of the next iteration, step + 1, with adjust_moco_momentum of its
    fractional epoch ((step + 1) / total steps x epochs), before computing the keys."""
    if str(self.c.get("momentum_schedule", "cosine")) == "cosine":
      return cosine_momentum(jnp.asarray(step, jnp.float32) + 1.0, self.run_steps()[1],
                             self.momentum_base)
    return jnp.float32(self.momentum_base)

  def loss(self, params, state, images, rng, step):
    views = self.split_views(images)
    r_online, r_teacher = jax.random.split(rng)
    (o1, o2), cols = self.embed_views(params, state.get("collections"), views,
                                      heads=tuple(self.heads), rng=r_online)
    (k1, k2), tcols = self.teacher_embed_views(state, views, rng=r_teacher)
    t = float(self.c.temperature)
    l12, a12 = contrastive_loss(o1["predictor"], k2["projector"], t)
    l21, a21 = contrastive_loss(o2["predictor"], k1["projector"], t)
    aux = {"contrast_acc": 0.5 * (a12 + a21), **collapse_monitor(o1["predictor"])}
    merged = self.merged(cols, tcols)
    if merged:
      aux["collections"] = merged
    return l12 + l21, aux
