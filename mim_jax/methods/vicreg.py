"""VICReg: variance-invariance-covariance regularisation (Bardes, Ponce and LeCun, ICLR 2022),
exact to facebookresearch/vicreg (main_vicreg.py).

  * `Projector`: the expander '8192-8192-8192' after the ResNet-50's 2048 pooled features:
    (Linear with bias, BatchNorm1d, ReLU) twice, then a Linear without bias
    (`expander_layers`, `barlow_twins.projector_layers(spec, hidden_bias=True)`; torch's
    default Linear init).
  * `VICReg.forward`: the two views through backbone and expander one after the other (their
    BatchNorm statistics each their own, SyncBN: global); then `vicreg_loss`:
      invariance  F.mse_loss(x, y), the mean over the local batch and the dimensions; DDP
                  averages the replicas' gradients, so it is the global batch's mean (here:
                  the mean over the jitted batch);
      variance    over the GLOBAL batch (FullGatherLayer): mean_j relu(1 - sqrt(var_j(x) +
                  1e-4)) / 2 + the same for y, var the unbiased variance;
      covariance  over the GLOBAL batch: cov(x) = x_c.T @ x_c / (N - 1), x_c centred;
                  sum_{i != j} cov_ij^2 / d + the same for y;
    loss = sim_coeff 25 x invariance + std_coeff 25 x variance + cov_coeff 1 x covariance.
    FullGatherLayer's backward sums the replicas' gradients and DDP averages them, so the
    official gradient is the gradient of this loss on the global batch, as here.
  * `LARS` with `exclude_bias_and_norm` (1-D parameters: no weight decay, no trust ratio)
    and one learning rate for all parameters, base_lr x batch / 256 with 10 warm-up epochs
    and a cosine to 0.001 x (`adjust_learning_rate`): mim_jax's LARS with its weight-decay
    mask (also the trust-ratio mask: 1-D parameters left out).

The evaluators read the encoder's pooled features, as the official evaluate.py.
"""
from __future__ import annotations

import jax
import jax.numpy as jnp

from mim_jax.methods.barlow_twins import off_diagonal_sq_sum
from mim_jax.methods.joint_embedding import JointEmbedding, collapse_monitor

# main_vicreg.py: sqrt(var + 0.0001).
STD_EPS = 1e-4


def invariance_loss(x: jax.Array, y: jax.Array) -> jax.Array:
  """F.mse_loss(x, y): mean over examples and dimensions of (x - y)^2."""
  return jnp.mean(jnp.square(x.astype(jnp.float32) - y.astype(jnp.float32)))


def variance_loss(x: jax.Array, y: jax.Array, eps: float = STD_EPS) -> jax.Array:
  """mean(relu(1 - sqrt(var(x) + eps))) / 2 + the same for y, var the unbiased per-dimension
  variance over the batch."""
  def one(z):
    z = z.astype(jnp.float32)
    std = jnp.sqrt(jnp.var(z, axis=0, ddof=1) + eps)
    return jnp.mean(jax.nn.relu(1.0 - std)) / 2.0
  return one(x) + one(y)


def covariance_loss(x: jax.Array, y: jax.Array) -> jax.Array:
  """sum_{i != j} cov(x)_ij^2 / d + the same for y, cov(z) = z_c.T @ z_c / (N - 1) with z_c
  the batch-centred z [N, d]."""
  def one(z):
    z = z.astype(jnp.float32)
    n, d = z.shape
    zc = z - jnp.mean(z, axis=0)
    cov = jnp.matmul(zc.T, zc, precision=jax.lax.Precision.HIGHEST) / (n - 1)
    return off_diagonal_sq_sum(cov) / d
  return one(x) + one(y)


def vicreg_loss(x: jax.Array, y: jax.Array, sim_coeff: float = 25.0, std_coeff: float = 25.0,
                cov_coeff: float = 1.0) -> tuple[jax.Array, dict]:
  """main_vicreg.py VICReg.forward's loss of the two views' embeddings x, y [N, d] (N the global
  batch): sim_coeff x `invariance_loss` + std_coeff x `variance_loss` + cov_coeff x
  `covariance_loss`; returns (loss, {'sim_loss', 'std_loss', 'cov_loss'}) unweighted."""
  sim, std, cov = invariance_loss(x, y), variance_loss(x, y), covariance_loss(x, y)
  loss = sim_coeff * sim + std_coeff * std + cov_coeff * cov
  return loss, {"sim_loss": sim, "std_loss": std, "cov_loss": cov}


class VICReg(JointEmbedding):
  """config.vicreg: expander_layers, sim_coeff, std_coeff, cov_coeff, views."""

  name = "vicreg"

  def head_modules(self):
    return {"expander": self.mlp(self.c.expander_layers)}

  def loss(self, params, state, images, rng, step):
    (o1, o2), cols = self.embed_views(params, state.get("collections"), self.split_views(images),
                                      heads=("expander",), rng=rng)
    x, y = o1["expander"], o2["expander"]
    c = self.c
    loss, parts = vicreg_loss(x, y, float(c.sim_coeff), float(c.std_coeff), float(c.cov_coeff))
    aux = {**parts, **collapse_monitor(x)}
    if cols:
      aux["collections"] = cols
    return loss, aux
