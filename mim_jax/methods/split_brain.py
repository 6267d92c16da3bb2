"""Split-brain autoencoder (Zhang, Isola & Efros, CVPR 2017; richzhang/splitbrainauto).

The network is split into two disjoint halves, every layer's channels halved: two instances
of the configured backbone at half `model.width` (params 'encoder_l' and 'encoder_ab'). The L
half sees the lightness (L - 50, replicated to the backbone's 3 input channels) and predicts
ab as a classification over the 313 ab bins of colorization (soft-encoded to the 5 nearest
bins, sigma 5); the ab half sees a and b (a zero third channel) and predicts L as a
classification over `l_bins` quantised L values (one-hot of floor(L * l_bins / 100)). Each
half has its own fully convolutional head (colorization's fc6 / fc7 / fc8 at half width), and
the loss is the sum of the two cross-entropies, each averaged over the batch and the positions
of the prediction map. The representation is the two halves' concatenation, layer by layer:
`features`, `layer_features` (the per-layer probe) and `token_features` read both halves and
concatenate their channels. See configs/split_brain.py for every setting.
"""
from __future__ import annotations

from typing import Optional

import jax
import jax.numpy as jnp
import numpy as np

from mim_jax import models
from mim_jax.methods.base import Method, module_entries
from mim_jax.methods.colorization import (ColorHead, lightness_input, normalize, sample_grid,
                                          tokens_to_map, unnormalize)
from mim_jax.targets import ab_bins, lab

HALVES = ("encoder_l", "encoder_ab")
HEADS = {"encoder_l": "head_l", "encoder_ab": "head_ab"}


def ab_input(lab_images: jax.Array) -> jax.Array:
  """Lab [B, H, W, 3] -> the ab half's input: (a, b, 0) (a 2-channel image in the backbone's
  3-channel input; the zero channel adds nothing to conv1)."""
  return jnp.concatenate([lab_images[..., 1:], jnp.zeros_like(lab_images[..., :1])], -1)


def l_bin(lightness: jax.Array, l_bins: int) -> jax.Array:
  """int32: L in [0, 100] -> its bin floor(L * l_bins / 100), clipped to 0 .. l_bins - 1."""
  return jnp.clip(jnp.floor(lightness * (l_bins / 100.0)), 0, l_bins - 1).astype(jnp.int32)


def cross_entropy(logits: jax.Array, targets: jax.Array) -> jax.Array:
  """Mean over positions of -sum_q targets_q log softmax(logits)_q ([..., Q] each)."""
  logp = jax.nn.log_softmax(logits.astype(jnp.float32), axis=-1)
  return -jnp.mean(jnp.sum(targets * logp, axis=-1))


def half_width(model_cfg):
  """The backbone's `width` for one half: half of config.model.width."""
  width = model_cfg.get("width", 1.0)
  return width / 2 if isinstance(width, float) else (width // 2 if width % 2 == 0 else width / 2)


class SplitBrain(Method):
  name = "split_brain"
  picture_titles = {"masked": "grey input (L)", "reconstruction": "colorized",
                    "header": "the L half's ab prediction (annealed mean)"}

  def __init__(self, config):
    super().__init__(config)
    sb = config.split_brain
    self.k = int(sb.neighbors)
    self.sigma = float(sb.sigma)
    self.l_bins = int(sb.l_bins)
    self.temperature = float(sb.temperature)
    self.centers = ab_bins.hull_points().astype(np.float32)
    fc_dim = int(sb.fc_dim)
    if fc_dim % 2:
      raise ValueError(f"config.split_brain.fc_dim={fc_dim}: use an even width (each half gets "
                       f"half of it)")
    self.heads = {"head_l": ColorHead(ab_bins.Q, fc_dim // 2, float(sb.bn_momentum)),
                  "head_ab": ColorHead(self.l_bins, fc_dim // 2, float(sb.bn_momentum))}
    if self.l_bins < 2:
      raise ValueError(f"config.split_brain.l_bins={self.l_bins}: use at least 2 L bins (100)")
    if self.ema_decay is not None:
      raise ValueError("split_brain has two encoders and no encoder EMA: set config.ema.enabled=False")

  def encoder_overrides(self) -> dict:
    if "width" not in self.config.model:
      raise ValueError(f"split_brain halves config.model.width; the backbone "
                       f"{models.name_of(self.config.model)!r} has no width: use alexnet, nin or resnet")
    return {"width": half_width(self.config.model)}

  # -- inputs -------------------------------------------------------------------------------
  def to_lab(self, images):
    return lab.rgb_to_lab(unnormalize(images, self.config.input))

  def inputs(self, lab_images) -> dict:
    return {"encoder_l": lightness_input(lab_images), "encoder_ab": ab_input(lab_images)}

  # -- model --------------------------------------------------------------------------------
  def init_variables(self, rng, images):
    xs = self.inputs(self.to_lab(images))
    keys = dict(zip(("encoder_l", "encoder_ab", "head_l", "head_ab"), jax.random.split(rng, 4)))
    modules = {}
    for half in HALVES:
      enc = self.encoder.init(keys[half], xs[half])
      fmap = tokens_to_map(models.outputs(self.encoder, enc, xs[half], pooling=self.pooling))
      modules[half] = enc
      modules[HEADS[half]] = self.heads[HEADS[half]].init(keys[HEADS[half]], fmap)
    return self.nest_modules(**modules)

  def half_logits(self, params, state, half, x, *, train, rng=None):
    """(logits [B, h, w, bins] of one half's head, its new collections by module name)."""
    head_name = HEADS[half]
    if train:
      out, new = models.forward(self.encoder, self.variables(params, state, half), x,
                                train=True, rng=rng, pooling=self.pooling)
    else:
      out, new = models.outputs(self.encoder, self.variables(params, state, half), x,
                                pooling=self.pooling), {}
    new = {c: {half: t} for c, t in new.items()}
    fmap = tokens_to_map(out)
    head, head_vars = self.heads[head_name], self.variables(params, state, head_name)
    if train and head.fc_dim:
      logits, head_new = head.apply(head_vars, fmap, train=True, mutable=["batch_stats"])
      for c, t in head_new.items():
        new.setdefault(c, {})[head_name] = t
    else:
      logits = head.apply(head_vars, fmap)
    return logits, new

  def targets(self, lab_images, grid_l, grid_ab):
    """(soft ab targets for the L half [B, h, w, 313], one-hot L targets for the ab half
    [B, h', w', l_bins])."""
    ab = sample_grid(lab_images[..., 1:], grid_l)
    soft_ab = ab_bins.soft_encode(ab, jnp.asarray(self.centers), self.k, self.sigma)
    lightness = sample_grid(lab_images[..., :1], grid_ab)[..., 0]
    onehot_l = jax.nn.one_hot(l_bin(lightness, self.l_bins), self.l_bins, dtype=jnp.float32)
    return soft_ab, onehot_l

  def loss(self, params, state, images, rng, step):
    lab_images = self.to_lab(images)
    xs = self.inputs(lab_images)
    k_l, k_ab = jax.random.split(rng)
    logits_l, new_l = self.half_logits(params, state, "encoder_l", xs["encoder_l"], train=True, rng=k_l)
    logits_ab, new_ab = self.half_logits(params, state, "encoder_ab", xs["encoder_ab"], train=True,
                                         rng=k_ab)
    soft_ab, onehot_l = self.targets(lab_images, logits_l.shape[1:3], logits_ab.shape[1:3])
    loss_ab = cross_entropy(logits_l, soft_ab)       # L -> ab
    loss_l = cross_entropy(logits_ab, onehot_l)      # ab -> L
    aux = {"loss_l_to_ab": loss_ab, "loss_ab_to_l": loss_l,
           "accuracy_ab": jnp.mean(jnp.argmax(logits_l, -1) == jnp.argmax(soft_ab, -1)),
           "accuracy_l": jnp.mean(jnp.argmax(logits_ab, -1) == jnp.argmax(onehot_l, -1))}
    new = {}
    for part in (new_l, new_ab):
      for c, t in part.items():
        new.setdefault(c, {}).update(t)
    if new:
      aux["collections"] = new
    return loss_ab + loss_l, aux

  # -- what evaluators read: the concatenation of the two halves ---------------------------
  def half_variables(self, params, state) -> dict:
    return {half: {"params": params[half],
                   **module_entries((state or {}).get("collections"), half)} for half in HALVES}

  def features(self, params, state, images):
    xs = self.inputs(self.to_lab(images))
    vs = self.half_variables(params, state)
    return {"online": jnp.concatenate([self.outputs(vs[h], xs[h])["pooled"] for h in HALVES], -1)}

  def token_features(self, params, state, images):
    xs = self.inputs(self.to_lab(images))
    vs = self.half_variables(params, state)
    return {"online": jnp.concatenate([self.outputs(vs[h], xs[h])["tokens"] for h in HALVES], -1)}

  def layer_features(self, params, state, images, pooling):
    """Per layer, the two halves' maps concatenated on the channels, then pooled as one layer
    (the split-brain protocol pools the whole conv layer to about 9,216 values); the last entry
    the concatenated global pool. Backbones without sown layer maps (not alexnet / nin):
    the two halves' pooled entries concatenated."""
    xs = self.inputs(self.to_lab(images))
    vs = self.half_variables(params, state)
    probe_dims = getattr(self.encoder, "probe_dims", None)
    if probe_dims is not None:
      from mim_jax.models import convnet
      maps, pooled = [], []
      for h in HALVES:
        fmap, col = self.encoder.apply(vs[h], xs[h], mutable=["intermediates"])
        maps.append(list(col["intermediates"]["layer_outputs"]))
        pooled.append(fmap.astype(jnp.float32).mean(axis=(1, 2)))
      layers = [convnet.probe_features(jnp.concatenate([a, b], -1), probe_dims)
                for a, b in zip(*maps)]
      return {"online": layers + [jnp.concatenate(pooled, -1)]}
    per_half = [self.outputs(vs[h], xs[h], layers=True, pooling=pooling)["layers"] for h in HALVES]
    return {"online": [jnp.concatenate([a, b], -1) for a, b in zip(*per_half)]}

  def reconstruct(self, params, state, images, rng) -> Optional[dict]:
    """The L half's colorization: 'masked' the grey input, 'reconstruction' L with the
    annealed-mean ab (T = config.split_brain.temperature), both normalised images."""
    del rng
    lab_images = self.to_lab(images)
    logits, _ = self.half_logits(params, state, "encoder_l", lightness_input(lab_images), train=False)
    ab = ab_bins.annealed_mean(logits, self.centers, self.temperature)
    b, hh, ww, _ = lab_images.shape
    ab = jax.image.resize(ab, (b, hh, ww, 2), "bilinear")
    to_image = lambda x: normalize(lab.lab_to_rgb(x), self.config.input)  # noqa: E731
    return {"masked": to_image(jnp.concatenate([lab_images[..., :1], jnp.zeros_like(ab)], -1)),
            "reconstruction": to_image(jnp.concatenate([lab_images[..., :1], ab], -1))}

  def describe(self) -> dict:
    d = super().describe()
    d["halves"] = list(HALVES)
    return d
