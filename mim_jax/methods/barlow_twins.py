"""Barlow Twins: self-supervised learning via redundancy reduction (Zbontar et al., ICML 2021),
exact to facebookresearch/barlowtwins (main.py).

  * `BarlowTwins.__init__`: the projector '8192-8192-8192' after the ResNet-50's 2048 pooled
    features: (Linear without bias, BatchNorm1d, ReLU) twice, then a Linear without bias
    (`projector_layers`; torch's default Linear init); then `self.bn`, a BatchNorm1d with
    affine=False, of each view's embedding: `standardize` (training mode: the batch mean and
    biased variance, eps 1e-5; its running statistics are never read, so none are kept).
  * `BarlowTwins.forward`: the two views go through backbone and projector one after the
    other (each view's BatchNorm statistics its own, the running statistics updated after
    each); c = bn(z1).T @ bn(z2) / batch_size; the official divides each replica's product by
    the GLOBAL batch size and sums the replicas' matrices (all_reduce), which is the global
    product: here the jitted batch whatever its sharding (the model's BatchNorms are SyncBN in
    the official, global here too). loss = sum_i (c_ii - 1)^2 + lambd sum_{i != j} c_ij^2,
    lambd 0.0051: `cross_correlation_loss`.
  * `main_worker` / `adjust_learning_rate` / `LARS`: two parameter groups, the weights at
    learning_rate_weights 0.2 and the 1-D parameters (biases, BatchNorm) at
    learning_rate_biases 0.0048, both x batch / 256 x the warm-up / cosine factor; LARS
    (momentum 0.9, eta 0.001) with the 1-D parameters excluded from the weight decay and from
    the trust ratio. Here the biases' rate is an optimiser group with lr_scale
    lr_biases / optim.base_lr (`param_groups`); mim_jax's weight-decay mask, also the LARS
    trust-ratio mask, leaves out the 1-D parameters.

The encoder's features (the ResNet's pooled output) are what the evaluators read, as the
official linear evaluation (evaluate.py) does.
"""
from __future__ import annotations

import jax
import jax.numpy as jnp

from mim_jax.methods.joint_embedding import JointEmbedding, collapse_monitor

# The 1-D parameters, as a param-group regex over 'module/.../name' paths: Dense biases and
# BatchNorm scales and biases (the official `param.ndim == 1`).
BIAS_AND_NORM = r"(^|/)(bias|scale)$"


def projector_layers(spec: str, *, hidden_bias: bool = False) -> tuple:
  """An official MLP string ('8192-8192-8192') as `joint_embedding.MLP` layers: every width but
  the last a Linear (with a bias when `hidden_bias`: VICReg's expander) + BatchNorm1d + ReLU,
  the last a Linear without bias and without BatchNorm."""
  widths = [int(w) for w in str(spec).split("-")]
  if not widths:
    raise ValueError(f"projector {spec!r}: give widths as 'W-W-W'")
  return (tuple((w, bool(hidden_bias), "affine") for w in widths[:-1])
          + ((widths[-1], False, ""),))


def standardize(z: jax.Array, eps: float = 1e-5) -> jax.Array:
  """BatchNorm1d(affine=False) in training mode: (z - batch mean) / sqrt(biased batch var + eps),
  per dimension, float32."""
  z = z.astype(jnp.float32)
  mu = jnp.mean(z, axis=0)
  var = jnp.mean(jnp.square(z - mu), axis=0)
  return (z - mu) * jax.lax.rsqrt(var + eps)


def off_diagonal_sq_sum(m: jax.Array) -> jax.Array:
  """sum_{i != j} m_ij^2 of a square matrix (main.py off_diagonal(m).pow(2).sum())."""
  return jnp.sum(jnp.square(jnp.where(jnp.eye(m.shape[0], dtype=bool), 0.0, m)))


def cross_correlation(z1: jax.Array, z2: jax.Array, eps: float = 1e-5) -> jax.Array:
  """c = bn(z1).T @ bn(z2) / N over the whole (global) batch of N, bn = `standardize`."""
  n = z1.shape[0]
  return jnp.matmul(standardize(z1, eps).T, standardize(z2, eps),
                    precision=jax.lax.Precision.HIGHEST) / n


def cross_correlation_loss(z1: jax.Array, z2: jax.Array, lambd: float,
                           eps: float = 1e-5) -> tuple[jax.Array, dict]:
  """main.py BarlowTwins.forward's loss of two views' embeddings z1, z2 [N, d]:
  sum_i (c_ii - 1)^2 + lambd sum_{i != j} c_ij^2 with c = `cross_correlation`; returns
  (loss, {'on_diag', 'off_diag', 'mean_diag'})."""
  c = cross_correlation(z1, z2, eps)
  diag = jnp.diagonal(c)
  on = jnp.sum(jnp.square(diag - 1.0))
  off = off_diagonal_sq_sum(c)
  return on + lambd * off, {"on_diag": on, "off_diag": off, "mean_diag": jnp.mean(diag)}


class BarlowTwins(JointEmbedding):
  """config.barlow_twins: projector_layers (`projector_layers`), lambd, lr_biases (the base
  rate of the 1-D parameters, per 256 like optim.base_lr), scale_loss (multiplies the
  optimised loss; aux/barlow_loss is the unscaled one), views."""

  name = "barlow_twins"

  def head_modules(self):
    return {"projector": self.mlp(self.c.projector_layers)}

  def bias_lr_scale(self) -> float:
    """lr_biases / optim.base_lr: the 1-D parameters' rate relative to the weights'."""
    lr_b = self.c.get("lr_biases", None)
    base = float(self.config.optim.base_lr)
    if lr_b is None or base == 0.0:
      return 1.0
    return float(lr_b) / base

  def param_groups(self):
    scale = self.bias_lr_scale()
    return () if scale == 1.0 else ((BIAS_AND_NORM, {"lr_scale": scale}),)

  def loss(self, params, state, images, rng, step):
    (o1, o2), cols = self.embed_views(params, state.get("collections"), self.split_views(images),
                                      heads=("projector",), rng=rng)
    z1, z2 = o1["projector"], o2["projector"]
    loss, parts = cross_correlation_loss(z1, z2, float(self.c.lambd))
    aux = {**parts, "barlow_loss": loss, **collapse_monitor(z1)}
    if cols:
      aux["collections"] = cols
    return float(self.c.get("scale_loss", 1.0)) * loss, aux
