"""Colorization (Zhang, Isola & Efros, ECCV 2016; richzhang/colorization) as a pretext task.

The network sees the lightness L of the CIE Lab image (L - 50, the official `data_l`,
replicated to the backbone's 3 input channels) and predicts, at every position of its last
feature map (a fully convolutional backbone: AlexNet with pool5=False, NIN, a ResNet's last
stage), a distribution over the Q = 313 in-gamut ab bins (a 1x1 convolution, `head`). The target
is the ab map sampled at those positions (the official `data_ab_ss` takes every 4th pixel; here
pixel floor(i H / h) of an h-row map), soft-encoded over its 5 nearest bins with a Gaussian of
sigma 5. The multinomial cross-entropy of each position is weighted by the class-rebalancing
factor of its closest bin (lambda 0.5 over the Gaussian-smoothed empirical bin distribution,
computed once from the training data before training: `external_state`), times the official
non-grey mask (0 for an image whose sampled |a|, |b| never exceed 5). The pictures decode with
the annealed mean at T = 0.38 (`reconstruct`). See configs/colorization.py for every setting.
"""
from __future__ import annotations

import hashlib
import json
import os
from typing import Optional

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
from absl import logging

from mim_jax import models
from mim_jax.methods.base import Method
from mim_jax.models.resnet import BatchNorm
from mim_jax.targets import ab_bins, lab

PRIOR_FILE = "colorization_prior_{key}.npy"


def unnormalize(images: jax.Array, input_cfg) -> jax.Array:
  """Normalised images (data.preprocess: (x - mean) / std) -> RGB in [0, 1]."""
  mean = jnp.asarray(input_cfg.mean, jnp.float32)
  std = jnp.asarray(input_cfg.std, jnp.float32)
  return jnp.clip(images.astype(jnp.float32) * std + mean, 0.0, 1.0)


def normalize(rgb: jax.Array, input_cfg) -> jax.Array:
  return (rgb - jnp.asarray(input_cfg.mean, jnp.float32)) / jnp.asarray(input_cfg.std, jnp.float32)


def lightness_input(lab_images: jax.Array) -> jax.Array:
  """Lab [B, H, W, 3] -> the network input: L - 50 (in [-50, 50]) replicated to 3 channels."""
  return jnp.repeat(lab_images[..., :1] - 50.0, 3, axis=-1)


def sample_grid(x: jax.Array, grid: tuple[int, int]) -> jax.Array:
  """[B, H, W, C] -> [B, h, w, C]: pixel (floor(i H / h), floor(j W / w)) for each map position
  (i, j), the official stride-4 subsampling when H = 4 h."""
  h, w = grid
  rows = (np.arange(h) * x.shape[1]) // h
  cols = (np.arange(w) * x.shape[2]) // w
  return x[:, rows][:, :, cols]


def nongray_mask(ab: jax.Array, threshold: float = 5.0) -> jax.Array:
  """[B, ...,  2] -> float32 [B]: 1 where some |a| or |b| of the image exceeds `threshold`
  (the official NonGrayMaskLayer), else 0."""
  b = ab.shape[0]
  return (jnp.abs(ab.reshape(b, -1)) > threshold).any(axis=1).astype(jnp.float32)


def rebalanced_cross_entropy(logits: jax.Array, targets: jax.Array, weights: jax.Array) -> jax.Array:
  """Mean over positions of weights * (-sum_q targets_q log softmax(logits)_q).
  logits, targets [..., Q]; weights [...] (no gradient)."""
  logp = jax.nn.log_softmax(logits.astype(jnp.float32), axis=-1)
  ce = -jnp.sum(targets * logp, axis=-1)
  return jnp.mean(jax.lax.stop_gradient(weights) * ce)


class ColorHead(nn.Module):
  """The official AlexNet colorization head on the backbone's last map (train_alexnet/
  train_val.prototxt): fc6 as a 6x6 convolution of dilation 2 (padding 5: same size), fc7 1x1,
  each with BatchNorm (Caffe's, affine-free) and ReLU, weights N(0, 0.005), biases 1; then fc8,
  a 1x1 convolution to `num_bins` logits (Caffe's default filler: zeros). fc_dim=0: fc8 alone."""
  num_bins: int
  fc_dim: int = 4096
  bn_momentum: float = 0.1

  @nn.compact
  def __call__(self, fmap, train: bool = False):
    x = fmap
    if self.fc_dim:
      init = nn.initializers.normal(0.005)
      for name, k, dil in (("fc6", 6, 2), ("fc7", 1, 1)):
        pad = (k - 1) * dil // 2
        x = nn.Conv(self.fc_dim, (k, k), kernel_dilation=(dil, dil), padding=((pad, pad), (pad, pad)),
                    kernel_init=init, bias_init=nn.initializers.ones, name=name)(x)
        x = BatchNorm(momentum=self.bn_momentum, use_scale=False, use_bias=False,
                      name=f"{name}_bn")(x, train)
        x = nn.relu(x)
    return nn.Conv(self.num_bins, (1, 1), kernel_init=nn.initializers.zeros, name="fc8")(x)


def tokens_to_map(out: dict) -> jax.Array:
  """The backbone's named outputs -> its last feature map [B, h, w, C]."""
  h, w = out["grid"]
  t = out["tokens"]
  return t.reshape(t.shape[0], h, w, t.shape[-1])


class Colorization(Method):
  name = "colorization"
  picture_titles = {"masked": "grey input (L)", "reconstruction": "colorized",
                    "header": "ab predicted from L (annealed mean)"}

  def __init__(self, config):
    super().__init__(config)
    cc = config.colorization
    self.k = int(cc.neighbors)
    self.sigma = float(cc.sigma)
    self.lam = float(cc.lam)
    self.prior_sigma = float(cc.prior_sigma)
    self.temperature = float(cc.temperature)
    self.gray_threshold = float(cc.gray_threshold)
    self.rebalance = bool(cc.rebalance)
    self.prior_images = int(cc.prior_images)
    self.centers = ab_bins.hull_points().astype(np.float32)
    self.fc_dim = int(cc.fc_dim)
    self.head = ColorHead(ab_bins.Q, self.fc_dim, float(cc.bn_momentum))
    if not 0.0 <= self.lam <= 1.0:
      raise ValueError(f"config.colorization.lam={self.lam}: use a mix in [0, 1] (the paper's 0.5)")
    if self.temperature <= 0:
      raise ValueError(f"config.colorization.temperature={self.temperature}: use T > 0 (0.38)")

  # -- the class-rebalancing weights: one pass over the training data, cached ---------------
  def prior_key(self) -> str:
    """What the cached bin counts depend on: the data, the image size, the pass's length."""
    data = self.config.input.data.to_dict()
    blob = json.dumps({"data": data, "size": int(self.image_size), "n": self.prior_images,
                       "q": ab_bins.Q}, sort_keys=True, default=str)
    return hashlib.sha1(blob.encode()).hexdigest()[:12]

  def count_bins(self) -> np.ndarray:
    """float64 [Q]: nearest-bin counts over every pixel of the pretraining images (central
    crops at the input size, `pipeline.eval_batches(..., 'pretrain')`; the first
    `prior_images` of a seeded subset when that is > 0)."""
    from mim_jax.data import pipeline
    centers = jnp.asarray(self.centers)

    @jax.jit
    def counts(images):
      ab = lab.rgb_to_lab(images.astype(jnp.float32) / 255.0)[..., 1:]
      return ab_bins.bin_counts(ab, centers)

    total = np.zeros((ab_bins.Q,), np.float64)
    limit = self.prior_images or None
    for images, _ in pipeline.eval_batches(self.config.input, "pretrain", 256, limit):
      total += np.asarray(counts(jnp.asarray(images)), np.float64)
    return total

  def prior_counts(self) -> np.ndarray:
    """`count_bins`, cached as <workdir>/colorization_prior_<key>.npy when the method runs
    inside a workdir (the trainer's frozen_runs context)."""
    ctx = self.frozen_context
    path = os.path.join(ctx.workdir, PRIOR_FILE.format(key=self.prior_key())) if ctx else None
    if path and os.path.exists(path):
      return np.load(path)
    counts = self.count_bins()
    if path and getattr(ctx, "record", True):
      os.makedirs(os.path.dirname(path), exist_ok=True)
      tmp = path + ".tmp.npy"
      np.save(tmp, counts)
      os.replace(tmp, path)
      logging.info("colorization: bin counts of %d pixels cached in %s", int(counts.sum()), path)
    return counts

  def external_state(self) -> dict:
    if not self.rebalance:
      return {"rebalance": np.ones((ab_bins.Q,), np.float32)}
    ctx = self.frozen_context
    if ctx is not None and ctx.restoring:      # the values come from the run's checkpoint
      return {"rebalance": jax.ShapeDtypeStruct((ab_bins.Q,), jnp.float32)}
    prior = ab_bins.smoothed_prior(self.prior_counts(), self.centers, self.prior_sigma)
    return {"rebalance": ab_bins.rebalance_weights(prior, self.lam).astype(np.float32)}

  # -- the model ----------------------------------------------------------------------------
  def to_lab(self, images: jax.Array) -> jax.Array:
    return lab.rgb_to_lab(unnormalize(images, self.config.input))

  def init_variables(self, rng, images):
    k_enc, k_head = jax.random.split(rng)
    x = lightness_input(self.to_lab(images))
    enc = self.encoder.init(k_enc, x)
    fmap = tokens_to_map(models.outputs(self.encoder, enc, x, pooling=self.pooling))
    head = self.head.init(k_head, fmap)
    return self.nest_modules(encoder=enc, head=head)

  def logits(self, params, state, lab_images, *, train, rng=None):
    """(logits [B, h, w, Q], new collections {col: {'encoder': ..., 'head': ...}})."""
    x = lightness_input(lab_images)
    if train:
      out, new = models.forward(self.encoder, self.variables(params, state), x, train=True,
                                rng=rng, pooling=self.pooling)
    else:
      out, new = models.outputs(self.encoder, self.variables(params, state), x,
                                pooling=self.pooling), {}
    fmap = tokens_to_map(out)
    head_vars = self.variables(params, state, "head")
    if train and self.fc_dim:
      logits, head_new = self.head.apply(head_vars, fmap, train=True, mutable=["batch_stats"])
      new = {c: {"encoder": t} for c, t in new.items()}
      for c, t in head_new.items():
        new.setdefault(c, {})["head"] = t
      return logits, new
    new = {c: {"encoder": t} for c, t in new.items()}
    return self.head.apply(head_vars, fmap), new

  def targets(self, lab_images, grid, rebalance):
    """(soft targets [B, h, w, Q], per-position weights [B, h, w]) of the sampled ab map."""
    centers = jnp.asarray(self.centers)
    ab = sample_grid(lab_images[..., 1:], grid)
    soft = ab_bins.soft_encode(ab, centers, self.k, self.sigma)
    closest = jnp.argmax(soft, axis=-1)       # the official PriorFactor: argmax of the encoding
    weights = jnp.asarray(rebalance)[closest]
    if self.gray_threshold > 0:
      weights = weights * nongray_mask(ab, self.gray_threshold)[:, None, None]
    return soft, weights

  def loss(self, params, state, images, rng, step):
    lab_images = self.to_lab(images)
    logits, new = self.logits(params, state, lab_images, train=True, rng=rng)
    soft, weights = self.targets(lab_images, logits.shape[1:3], state["rebalance"])
    loss = rebalanced_cross_entropy(logits, soft, weights)
    logp = jax.nn.log_softmax(logits.astype(jnp.float32), axis=-1)
    aux = {"cross_entropy": -jnp.mean(jnp.sum(soft * logp, axis=-1)),
           "accuracy": jnp.mean(jnp.argmax(logits, -1) == jnp.argmax(soft, -1)),
           "mean_weight": jnp.mean(weights)}
    if new:
      aux["collections"] = new
    return loss, aux

  # -- what evaluators read: the encoder on the L channel --------------------------------
  def eval_input(self, images: jax.Array) -> jax.Array:
    return lightness_input(self.to_lab(images))

  def features(self, params, state, images):
    return super().features(params, state, self.eval_input(images))

  def layer_features(self, params, state, images, pooling):
    return super().layer_features(params, state, self.eval_input(images), pooling)

  def token_features(self, params, state, images):
    return super().token_features(params, state, self.eval_input(images))

  def reconstruct(self, params, state, images, rng) -> Optional[dict]:
    """'masked': the grey input (L with a = b = 0); 'reconstruction': L with the annealed-mean
    ab (T = config.colorization.temperature) resized bilinearly to the image; both normalised."""
    del rng
    lab_images = self.to_lab(images)
    logits, _ = self.logits(params, state, lab_images, train=False)
    ab = ab_bins.annealed_mean(logits, self.centers, self.temperature)
    b, hh, ww, _ = lab_images.shape
    ab = jax.image.resize(ab, (b, hh, ww, 2), "bilinear")
    grey = jnp.concatenate([lab_images[..., :1], jnp.zeros_like(ab)], -1)
    color = jnp.concatenate([lab_images[..., :1], ab], -1)
    to_image = lambda x: normalize(lab.lab_to_rgb(x), self.config.input)  # noqa: E731
    return {"masked": to_image(grey), "reconstruction": to_image(color)}
