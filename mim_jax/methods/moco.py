"""MoCo v1 / v2: momentum contrast (He et al., CVPR 2020; Chen et al., arXiv 2003.04297), exact
to facebookresearch/moco (moco/builder.py, main_moco.py, moco/loader.py) and, for the CIFAR
presets, to its CIFAR-10 demo (colab/moco_cifar10_demo.ipynb, branch colab-notebook).

  * builder.py `MoCo`: a query encoder and a key encoder, each a ResNet whose fc is the head
    (v1: one Linear(dim_mlp, dim) with bias; v2 --mlp: Linear(dim_mlp, dim_mlp) + ReLU +
    Linear(dim_mlp, dim), both with bias, no BatchNorm; PyTorch's default Linear init). The
    key encoder starts as a copy of the query encoder and is never trained by gradient:
    `_momentum_update_key_encoder`, k = m k + (1 - m) q over the parameters of encoder AND
    head (not the BatchNorm buffers), at constant m. The official update runs at the start of
    each forward with the current query parameters; here `update_state` runs it after the
    optimiser step with the new parameters: the same sequence of key encoders (step 0: the
    copy). m = 0 is allowed (the key encoder is then the query encoder's copy every step).
  * `forward`: q = normalize(fc(encoder_q(im_q))), k = normalize(encoder_k(im_k)) with no
    gradient; logits [N, 1 + K] = [q.k, q.queue] / T, labels 0, CrossEntropyLoss (mean):
    `moco_logits` / `infonce_with_queue`. The negatives are the queue only.
  * `_batch_shuffle_ddp` / `_batch_unshuffle_ddp` (shuffling BN): the global batch of key
    images is permuted by one random permutation, GPU g runs the key encoder on the g-th
    consecutive chunk (its BatchNorm statistics are of that chunk), the keys are un-permuted.
    Here: the jitted global batch is permuted, the key encoder runs with per-group BatchNorm
    statistics over G = config.model.bn_groups consecutive groups (models.resnet.BatchNorm
    `groups`: per-GPU BatchNorm), the keys are un-permuted (`shuffled_keys`). The query
    encoder uses the same groups over the unshuffled batch (DDP's non-synced BatchNorm,
    each GPU its own chunk). moco.shuffle_bn=False runs the key encoder unshuffled.
  * `_dequeue_and_enqueue`: after the loss, the keys of the whole global batch
    (`concat_all_gather`) replace the queue at the pointer, first in first out, the pointer
    moving by the batch modulo K; K must be a multiple of the keys per step. Here the keys
    come back from the loss as aux['state_append'] (in batch order, also over
    gradient-accumulation micro-batches) and `update_state` writes them. The queue is
    initialised as `randn(dim, K)` normalised along the feature dimension; it is stored as
    [K, dim] (rows = keys) in the method state, with its pointer, and checkpointed.
  * The demo's symmetric loss (moco.symmetric): loss(q1, k2) + loss(q2, k1), summed, both
    against the same queue, and the 2N keys cat([k1, k2]) enqueued; each key forward draws
    its own permutation.
  * Evaluation: the query encoder ('online') and the key encoder ('teacher'), pooled
    features (main_lincls.py evaluates the query encoder's pooled features).
"""
from __future__ import annotations

from typing import Optional

import jax
import jax.numpy as jnp

from mim_jax.methods.joint_embedding import JointEmbedding, collapse_monitor, l2_normalize


def moco_logits(q: jax.Array, k: jax.Array, queue: jax.Array, temperature: float) -> jax.Array:
  """builder.MoCo.forward's logits [N, 1 + K]: cat([l_pos, l_neg], 1) / T with
  l_pos = q_n . k_n, l_neg = q_n . queue^T, q_n and k_n the L2-normalised q, k [N, d] and the
  queue [K, d] (the official [d, K] transposed), all float32."""
  qn, kn = l2_normalize(q), l2_normalize(k)
  l_pos = jnp.sum(qn * kn, axis=1, keepdims=True)
  l_neg = qn @ queue.astype(jnp.float32).T
  return jnp.concatenate([l_pos, l_neg], axis=1) / temperature


def infonce_with_queue(q: jax.Array, k: jax.Array, queue: jax.Array,
                       temperature: float) -> tuple[jax.Array, dict]:
  """main_moco.py's criterion (nn.CrossEntropyLoss, mean) of `moco_logits` against label 0 (the
  positive key), no gradient into k or the queue; parts: the top-1 accuracy of the positive
  (main_moco's acc1 / 100)."""
  logits = moco_logits(q, jax.lax.stop_gradient(k), jax.lax.stop_gradient(queue), temperature)
  loss = -jnp.mean(jax.nn.log_softmax(logits, axis=1)[:, 0])
  acc = jnp.mean((jnp.argmax(logits, axis=1) == 0).astype(jnp.float32))
  return loss, {"contrast_acc": acc}


def initial_queue(rng: jax.Array, size: int, dim: int) -> jax.Array:
  """builder.py's queue: randn(dim, K) normalised along the feature dimension, as [K, dim]."""
  return l2_normalize(jax.random.normal(rng, (size, dim), jnp.float32), axis=1)


def check_queue_size(size: int, keys_per_step: int, batch_note: str = "") -> None:
  """The official assertion K % keys == 0, as a one-line error that names the fix."""
  if size <= 0 or size % keys_per_step:
    raise ValueError(f"moco.k={size} is not a multiple of the {keys_per_step} keys of a step"
                     f"{batch_note}: set moco.k to a multiple of {keys_per_step}")


def enqueue(queue: jax.Array, ptr: jax.Array, keys: jax.Array) -> tuple[jax.Array, jax.Array]:
  """`_dequeue_and_enqueue`: keys [n, d] written at rows ptr .. ptr + n - 1 of the queue [K, d],
  the pointer moved to (ptr + n) % K; K must be a multiple of n (the official assertion)."""
  size, n = queue.shape[0], keys.shape[0]
  check_queue_size(size, n)
  queue = jax.lax.dynamic_update_slice(queue, keys.astype(queue.dtype), (ptr, jnp.int32(0)))
  return queue, ((ptr + n) % size).astype(ptr.dtype)


def head_layers(mlp: bool, dim_mlp: int, dim: int) -> tuple:
  """The ResNet fc of builder.py as `joint_embedding.MLP` layers: Linear(dim_mlp, dim) (v1), or
  with --mlp Linear(dim_mlp, dim_mlp) + ReLU before it (v2); biases, no BatchNorm."""
  last = ((int(dim), True, ""),)
  return ((int(dim_mlp), True, ""),) + last if mlp else last


def v1_views(views):
  """main_moco.py's v1 augmentation from a views block: the block's crop, flip and greyscale,
  ColorJitter(0.4, 0.4, 0.4, 0.4) always applied, no blur, no solarisation."""
  v = views.copy_and_resolve_references()
  v.jitter = (0.4, 0.4, 0.4, 0.4)
  v.jitter_prob = 1.0
  v.blur_probs = tuple(0.0 for _ in v.blur_probs)
  v.solarize_prob = 0.0
  return v


class MoCo(JointEmbedding):
  """config.moco: dim (--moco-dim), k (--moco-k, the queue size), momentum (--moco-m),
  temperature (--moco-t), mlp (--mlp), aug_plus (--aug-plus: the views block as written, else
  `v1_views` of it), symmetric (the demo's --symmetric), shuffle_bn, views, head_init."""

  name = "moco"
  teacher_heads = ("projector",)
  # Not exact: shuffling BN permutes the whole global batch, and a micro-batch's BatchNorm
  # groups are not the full batch's.
  accumulates_exactly = False

  def __init__(self, config):
    super().__init__(config)
    self.queue_size = int(self.c.k)
    self.dim = int(self.c.dim)
    self.symmetric = bool(self.c.get("symmetric", False))
    per_step = int(config.input.batch_size) * (2 if self.symmetric else 1)
    check_queue_size(self.queue_size, per_step,
                     f" (global batch {config.input.batch_size}"
                     f"{' x2, symmetric' if self.symmetric else ''})")

  # -- heads and views ------------------------------------------------------------------------
  def head_modules(self):
    return {"projector": self.mlp(head_layers(bool(self.c.mlp), self.feature_width(), self.dim))}

  def views_cfg(self):
    return self.c.views if bool(self.c.get("aug_plus", True)) else v1_views(self.c.views)

  # -- state ----------------------------------------------------------------------------------
  def has_teacher(self) -> bool:
    return True          # moco.momentum = 0: the key encoder copies the query encoder

  def init_state(self, params):
    state = dict(super().init_state(params))
    rng = jax.random.fold_in(jax.random.PRNGKey(int(self.config.seed)), 0x30C0)
    state["queue"] = initial_queue(rng, self.queue_size, self.dim)
    state["queue_ptr"] = jnp.zeros((), jnp.int32)
    return state

  def update_state(self, params, state, step, stats=None, appended=None, **kw):
    state = super().update_state(params, state, step, stats)
    if appended is not None:
      keys = appended["keys"]
      if keys.ndim == 3:              # symmetric: [B, 2, d] -> cat([k1, k2])
        keys = jnp.swapaxes(keys, 0, 1).reshape(-1, keys.shape[-1])
      queue, ptr = enqueue(state["queue"], state["queue_ptr"], keys)
      state = {**state, "queue": queue, "queue_ptr": ptr}
    return state

  # -- forward --------------------------------------------------------------------------------
  def shuffled_keys(self, state, images: jax.Array, rng: Optional[jax.Array]):
    """The key encoder's L2-normalised outputs [N, dim] of `images`, with shuffling BN when rng is
    given (the batch permuted by jax.random.permutation(rng, N), run with per-group BatchNorm,
    the keys put back in the images' order), and its updated collections ('teacher_*')."""
    perm = None if rng is None else jax.random.permutation(rng, images.shape[0])
    x = images if perm is None else images[perm]
    (out,), cols = self.teacher_embed_views(state, [x])
    k = l2_normalize(out["projector"])
    if perm is not None:
      k = k[jnp.argsort(perm)]
    return jax.lax.stop_gradient(k), cols

  def loss(self, params, state, images, rng, step):
    views = self.split_views(images)
    # The query encoder sees the first view (both with the symmetric loss, in order).
    outs, online_cols = self.embed_views(params, state.get("collections"),
                                         views if self.symmetric else views[:1],
                                         heads=("projector",))
    o1 = outs[0]
    shuffle = bool(self.c.get("shuffle_bn", True))
    t = float(self.c.temperature)
    pairs = [(o1, 1)] + ([(outs[1], 0)] if self.symmetric else [])
    teacher_state, teacher_cols = state, {}
    loss, parts, keys = 0.0, [], []
    for i, (o, key_view) in enumerate(pairs):
      k, cols = self.shuffled_keys(teacher_state, views[key_view],
                                   jax.random.fold_in(rng, 1000 + i) if shuffle else None)
      teacher_cols = self.merged(teacher_cols, cols)
      teacher_state = {**teacher_state, "collections": self.merged(state.get("collections"),
                                                                   teacher_cols)}
      li, pi = infonce_with_queue(o["projector"], k, state["queue"], t)
      loss, keys = loss + li, keys + [k]
      parts.append(pi)
    aux = {"contrast_acc": sum(p["contrast_acc"] for p in parts) / len(parts),
           **collapse_monitor(o1["projector"])}
    # Keys in the order of builder.py's enqueue: k (asymmetric) or cat([k1, k2]) (symmetric).
    aux["state_append"] = {"keys": keys[0] if not self.symmetric
                           else jnp.stack([keys[1], keys[0]], axis=1)}
    cols = self.merged(online_cols, teacher_cols)
    if cols:
      aux["collections"] = cols
    return loss, aux
