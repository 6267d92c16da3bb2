"""SimSiam: Exploring Simple Siamese Representation Learning (Chen & He, CVPR 2021), exact to
facebookresearch/simsiam.

  * simsiam/builder.py `SimSiam`: the encoder is torchvision's ResNet with
    zero_init_residual=True (config.model.zero_init_residual) whose fc becomes the 3-layer
    projector Linear(d, d, no bias)-BN-ReLU-Linear(d, d, no bias)-BN-ReLU-fc-BN(dim,
    affine=False), d the encoder's feature width (simsiam.proj_hidden_dim 0; solo-learn's
    CIFAR recipe sets 2048). The fc's bias is frozen at its initial value by the official
    `requires_grad = False` hack and cancelled by the affine-free BatchNorm that follows (a
    constant shift of every example), so here the fc has no bias: the same outputs and
    gradients. The predictor is Linear(dim, pred_dim, no bias)-BN-ReLU-Linear(pred_dim, dim)
    with bias; nn.Linear's default init (head_init 'torch'). dim 2048, pred_dim 512.
  * `forward`: z1 = encoder(x1), z2 = encoder(x2) in two calls (per-view BatchNorm
    statistics, SyncBatchNorm: global over the devices), p = predictor(z); z detached.
  * main_simsiam.py `train`: loss = -(cos(p1, z2).mean() + cos(p2, z1).mean()) * 0.5 with
    nn.CosineSimilarity(dim=1) (eps 1e-8): `simsiam_loss`.
  * main_simsiam.py: torch SGD weight decay on EVERY parameter (BatchNorm and biases
    included): config simsiam.decay_all (`JointEmbedding.decay_mask`).
  * --fix-pred-lr (the README's command): the predictor keeps the initial lr while the rest
    follows the cosine: `param_groups`, the optimiser group 'constant_lr' (mim_jax.optim).
  * simsiam.stop_gradient=False: the paper's ablation without stop-gradient (collapses).
"""
from __future__ import annotations

import jax
import jax.numpy as jnp

from mim_jax.methods.joint_embedding import JointEmbedding, collapse_monitor



def cosine_similarity(a: jax.Array, b: jax.Array, eps: float = 1e-8) -> jax.Array:
  """torch.nn.functional.cosine_similarity(a, b, dim=-1, eps): a.b / (max(|a|, eps)
  max(|b|, eps)), float32, [B]."""
  a, b = a.astype(jnp.float32), b.astype(jnp.float32)
  na = jnp.maximum(jnp.linalg.norm(a, axis=-1), eps)
  nb = jnp.maximum(jnp.linalg.norm(b, axis=-1), eps)
  return jnp.sum(a * b, axis=-1) / (na * nb)


def simsiam_loss(p1: jax.Array, p2: jax.Array, z1: jax.Array, z2: jax.Array,
                 stop_gradient: bool = True) -> jax.Array:
  """main_simsiam.train's loss: -(cos(p1, sg z2).mean() + cos(p2, sg z1).mean()) * 0.5; with
  stop_gradient=False the gradient also flows through z."""
  if stop_gradient:
    z1, z2 = jax.lax.stop_gradient(z1), jax.lax.stop_gradient(z2)
  return -(jnp.mean(cosine_similarity(p1, z2)) + jnp.mean(cosine_similarity(p2, z1))) * 0.5


def projector_layers(hidden: int, dim: int) -> tuple:
  """builder.SimSiam's projector as `joint_embedding.MLP` layers."""
  return ((int(hidden), False, "affine"), (int(hidden), False, "affine"), (int(dim), False, "plain"))


def predictor_layers(hidden: int, dim: int) -> tuple:
  """builder.SimSiam's predictor as `joint_embedding.MLP` layers."""
  return ((int(hidden), False, "affine"), (int(dim), True, ""))


class SimSiam(JointEmbedding):
  name = "simsiam"

  def head_modules(self):
    c = self.c
    hidden = int(c.proj_hidden_dim) or self.feature_width()
    return {"projector": self.mlp(projector_layers(hidden, c.proj_dim)),
            "predictor": self.mlp(predictor_layers(c.pred_hidden_dim, c.proj_dim))}

  def param_groups(self):
    """--fix-pred-lr: the predictor at the initial (peak) lr throughout."""
    if not bool(self.c.get("fix_pred_lr", False)):
      return ()
    return (("^predictor/", {"constant_lr": True}),)

  def loss(self, params, state, images, rng, step):
    (o1, o2), cols = self.embed_views(params, state.get("collections"), self.split_views(images),
                                      heads=("projector", "predictor"), rng=rng)
    loss = simsiam_loss(o1["predictor"], o2["predictor"], o1["projector"], o2["projector"],
                        bool(self.c.get("stop_gradient", True)))
    aux = collapse_monitor(o1["projector"])
    if cols:
      aux["collections"] = cols
    return loss, aux
