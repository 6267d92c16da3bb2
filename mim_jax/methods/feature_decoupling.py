"""FeatureDecoupling: self-supervised representation learning by rotation feature decoupling
(Feng, Xu & Tao, CVPR 2019), exact to philiptheother/FeatureDecoupling
(pytorch_feature_decoupling/algorithms/DecouplingModel.py and architectures/).

Every image is forwarded in its four rotations (`rotation.rotate_all`, image-major, labels
0..3: the official train_step builds the rotations with torch.flip / transpose). The feature
(AlexNetFeature.py: the AlexNet up to its fc block, 4096 wide after the second BatchNorm1d +
ReLU) is split into two halves (`split_features`):

  * the rotation half [:D/2] -> Linear(D/2, 4) (AlexNetClassifier.py): the 4-way
    cross-entropy, per copy, summed and divided by 4B; from epoch `pu_start_epoch` (210 of 245)
    weighted per copy by the positive-unlabeled weights w = 1 for the upright copy and
    1 - p^gamma (gamma 2) for a rotated one, p the copy's PU probability read from a file
    (`pu_weights`, `DecouplingModel.loadPUImageProb`): sum(w ce) / 4B;
  * the rotation-irrelevant half [D/2:]:
      - MSELoss between each copy's half and the (detached) mean of its image's four copies
        (`irrelevance_loss`: mean over 4B x D/2 values);
      - the mean over the four copies -> Linear(D/2, 128) -> L2 normalise
        (LinearTransformationNorm.py) -> InstDisc's NCE over a memory bank of one 128-d vector
        per training image (NCEAverage / NCECriterion, lemniscate's: K = 4096 noise
        indices drawn uniformly, T = 0.07, Z fixed at the first batch, bank momentum 0.5 at
        the batch's dataset indices); `instdisc.nce_scores`, `nce_loss`, `bank_update`.

  loss = lambda_cls L_cls + lambda_mse L_mse + lambda_nce L_nce, all lambdas 1.

The PU probabilities themselves come from a separate model: the official repository ships
no code for them (the README of _experiments/.../prob asks to download prob.dat). Here
`feature_decoupling.pu_prob_path` reads that file's format (one probability per line, 4 per
training image in dataset order, rotations 0..3); without it the classification loss stays
unweighted for the whole run. Weight decay on every parameter (torch SGD). On a backbone other
than AlexNet the fc block reads the pooled features.
"""
from __future__ import annotations

import math

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from mim_jax import models
from mim_jax.methods import instdisc
from mim_jax.methods.base import Method
from mim_jax.methods.joint_embedding import l2_normalize
from mim_jax.methods.rotation import (CROPS, NUM_ROTATIONS, FCBlock, flatten_map, preprocess_views,
                                      rotate_all, rotation_labels, rotation_loss, torch_dense)


# -- pure functions ---------------------------------------------------------------------------
def split_features(feature: jax.Array) -> tuple[jax.Array, jax.Array]:
  """[N, D] -> (rotation half [:, :D/2], rotation-irrelevant half [:, D/2:]) (torch.split)."""
  half = feature.shape[-1] // 2
  return feature[:, :half], feature[:, half:]


def instance_mean(feature: jax.Array) -> jax.Array:
  """[4B, d] image-major (row 4 b + r) -> [B, d]: each image's mean over its four rotations."""
  return feature.reshape(-1, NUM_ROTATIONS, feature.shape[-1]).mean(axis=1)


def irrelevance_loss(feature: jax.Array) -> jax.Array:
  """MSELoss(f, stop_gradient(mean of the image's four copies) repeated): the mean over all
  4B x d values of the squared distance to the detached per-image mean (DecouplingModel's
  target is built under torch.set_grad_enabled(False))."""
  target = jax.lax.stop_gradient(jnp.repeat(instance_mean(feature), NUM_ROTATIONS, axis=0))
  return jnp.mean(jnp.square(feature - target))


def pu_weights(prob: np.ndarray, gamma: float) -> np.ndarray:
  """loadPUImageProb: [4N] probabilities (rotation-major per image: 4 i + r) -> weights, 1 for
  the upright copy (r = 0) and 1 - p^gamma for the rotated ones."""
  prob = np.asarray(prob, np.float64).reshape(-1)
  w = 1.0 - prob ** gamma
  w[0::NUM_ROTATIONS] = 1.0
  return w.astype(np.float32)


def copy_indices(index: jax.Array) -> jax.Array:
  """[B] dataset indices -> [4B]: 4 i + r, the copies' rows of the PU weight table."""
  return (NUM_ROTATIONS * index[:, None] + jnp.arange(NUM_ROTATIONS)[None, :]).reshape(-1)


# -- method -----------------------------------------------------------------------------------
class FeatureDecoupling(Method):
  name = "feature_decoupling"
  batch_fields = ("index",)

  def __init__(self, config):
    super().__init__(config)
    self.c = config.feature_decoupling
    self.model_name = models.name_of(config.model)
    self.fc_dim = int(self.c.fc_dim)
    if self.fc_dim % 2:
      raise ValueError(f"feature_decoupling.fc_dim={self.fc_dim}: use an even width (it is split in halves)")
    if str(self.c.crop) not in CROPS:
      raise ValueError(f"feature_decoupling.crop={self.c.crop!r}: use 'pad' or 'config'")
    self.fc = FCBlock(self.fc_dim, float(self.c.bn_momentum))

  @property
  def n_data(self) -> int:
    from mim_jax.data import pipeline
    return int(pipeline.num_examples(self.config.input, "pretrain"))

  def fc_input(self, out: dict) -> jax.Array:
    return flatten_map(out) if self.model_name == "alexnet" else out["pooled"]

  def init_variables(self, rng, images):
    k_enc, k_fc, k_cls, k_norm = jax.random.split(rng, 4)
    enc = self.encoder.init(k_enc, images)
    out = models.outputs(self.encoder, enc, images, pooling=self.pooling)
    fc = self.fc.init(k_fc, self.fc_input(out))
    half = jnp.zeros((1, self.fc_dim // 2))
    cls = torch_dense(NUM_ROTATIONS, self.fc_dim // 2).init(k_cls, half)
    norm = torch_dense(int(self.c.low_dim), self.fc_dim // 2).init(k_norm, half)
    return self.nest_modules(encoder=enc, fc=fc, classifier=cls, norm=norm)

  def init_state(self, params):
    state = dict(super().init_state(params))
    d = int(self.c.low_dim)
    stdv = 1.0 / math.sqrt(d / 3)
    key = jax.random.PRNGKey(int(self.config.seed) + 17)
    state["bank"] = jax.random.uniform(key, (self.n_data, d), jnp.float32, -stdv, stdv)
    state["z"] = jnp.float32(-1.0)
    return state

  def external_state(self):
    path = str(self.c.get("pu_prob_path", ""))
    if not path:
      return {}
    with open(path) as f:
      prob = np.array([float(line) for line in f if line.strip()])
    if prob.size != NUM_ROTATIONS * self.n_data:
      raise ValueError(f"feature_decoupling.pu_prob_path has {prob.size} probabilities: it needs "
                       f"4 per training image ({NUM_ROTATIONS * self.n_data})")
    return {"pu_weight": pu_weights(prob, float(self.c.gamma))}

  def preprocess(self, rng, images, input_cfg, on_device_aug):
    return preprocess_views(rng, images, input_cfg, on_device_aug, str(self.c.crop))

  def decay_mask(self, params):
    """Every parameter (torch SGD's weight_decay, as the official optimisers)."""
    return jax.tree.map(lambda _: True, params)

  def pu_active(self, step) -> jax.Array:
    """Whether the PU weights apply at `step`: from epoch pu_start_epoch (curr_epoch >= 210)."""
    spe, _ = self.run_steps()
    return jnp.asarray(step) >= int(round(float(self.c.pu_start_epoch) * spe))

  def loss(self, params, state, images, rng, step, index=None):
    if index is None:
      raise ValueError("FeatureDecoupling reads the batch field 'index' (the examples' dataset indices)")
    c = self.c
    b = images.shape[0]
    x = rotate_all(images.astype(jnp.float32))
    out, new = models.forward(self.encoder, self.variables(params, state), x, train=True,
                              rng=rng, pooling=self.pooling)
    feature, fc_new = self.fc.apply(self.variables(params, state, "fc"), self.fc_input(out),
                                    train=True, mutable=["batch_stats"])
    f_rot, f_inv = split_features(feature)
    logits = nn.Dense(NUM_ROTATIONS).apply({"params": params["classifier"]}, f_rot)
    labels = rotation_labels(b)
    weights = None
    if "pu_weight" in state:
      w = state["pu_weight"][copy_indices(index)]
      weights = jnp.where(self.pu_active(step), w, jnp.ones_like(w))
    loss_cls = rotation_loss(logits, labels, weights)
    loss_mse = irrelevance_loss(f_inv)
    v = l2_normalize(nn.Dense(int(c.low_dim)).apply({"params": params["norm"]}, instance_mean(f_inv)))
    k = int(c.nce_k)
    noise = jax.random.randint(jax.random.fold_in(rng, 7), (b, k + 1), 0, self.n_data)
    idx = noise.at[:, 0].set(index)
    scores = instdisc.nce_scores(v, state["bank"], idx, float(c.nce_t))
    z_batch = jax.lax.stop_gradient(jnp.mean(scores) * self.n_data)
    z = jnp.where(state["z"] < 0, z_batch, state["z"])
    loss_nce = instdisc.nce_loss(scores / z, self.n_data)
    lam = c.lambda_loss
    loss = (float(lam.cls) * loss_cls + float(lam.mse) * loss_mse + float(lam.nce) * loss_nce)
    aux = {"accuracy": jnp.mean(jnp.argmax(logits, -1) == labels), "loss_cls": loss_cls,
           "loss_mse": loss_mse, "loss_nce": loss_nce, "nce_z": z,
           "state_stats": {"z": z_batch},
           "state_append": {"v": jax.lax.stop_gradient(v), "index": index}}
    cols = self.nest_collections(encoder=new, fc=fc_new)
    if cols:
      aux["collections"] = cols
    return loss, aux

  def update_state(self, params, state, step, stats=None, appended=None):
    state = super().update_state(params, state, step, stats)
    if appended is not None:
      state = {**state, "bank": instdisc.bank_update(state["bank"], appended["v"],
                                                     appended["index"], float(self.c.nce_m))}
    if stats is not None and "z" in stats:
      state["z"] = jnp.where(state["z"] < 0, stats["z"], state["z"])
    return state
