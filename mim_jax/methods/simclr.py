"""SimCLR v1 / v2: contrastive learning of visual representations (Chen et al., ICML 2020;
Chen et al., NeurIPS 2020), exact to google-research/simclr (tf2/).

  * objective.py `add_contrastive_loss`: the 2N projections are L2-normalised; for view a's
    example i the positive is view b's example i and the negatives are the other 2N - 2
    projections of the GLOBAL batch (the replicas' batches concatenated: here the jitted
    batch, whatever its sharding); logits / temperature, self-similarity masked out; loss =
    mean over i of (CE_a(i) + CE_b(i)) (the two directions summed, not averaged): `nt_xent`.
  * model.py: both views in one forward (`features = tf.concat(features_list, 0)`), so the
    BatchNorm statistics are over the 2N views, global over replicas (`global_bn`);
    `ProjectionHead` 'nonlinear': num_proj_layers LinearLayers, every one a Dense without
    bias (use_bn) + BatchNorm; the middle ones as wide as their input, with BN centre and
    ReLU; the last proj_out_dim wide with BN without centre (scale only) and no ReLU
    (v1: 2 layers, v2: 3); 'linear': one such last layer; 'none': the encoder output.
    Dense kernels N(0, 0.01).
  * The augmentation study (Sec. 3, Fig. 5; `simclr.aug_study`, e.g. 'crop+color'): both
    branches start from the same image at the input size; one branch is left as it is (the
    identity) and the other gets the named operators in that order (`data.views.study_view`).
  * The features for evaluation are the encoder output ('hidden'), as the official linear
    evaluation; v2 fine-tunes from the head's first layer (ft_proj_selector=1):
    configs/finetune.py with finetune.proj_layers=1 keeps that layer (and its ReLU) in front
    of the classifier, initialised from this run.
"""
from __future__ import annotations

import jax
import jax.numpy as jnp

from mim_jax.methods.joint_embedding import JointEmbedding, collapse_monitor, l2_normalize

# objective.py LARGE_NUM: subtracted from the self-similarity logits.
LARGE_NUM = 1e9


def nt_xent(z1: jax.Array, z2: jax.Array, temperature: float) -> tuple[jax.Array, dict]:
  """SimCLR's loss of two views' projections z1, z2 [N, d] (rows i are the same image):
  (mean_i CE([z1_i.z2, z1_i.z1 (self masked)] / T, i) + CE([z2_i.z1, z2_i.z2] / T, i), parts)
  with z L2-normalised; N is the global batch."""
  h1, h2 = l2_normalize(z1), l2_normalize(z2)
  n = h1.shape[0]
  mask = jnp.eye(n, dtype=jnp.float32) * LARGE_NUM
  aa = h1 @ h1.T / temperature - mask
  bb = h2 @ h2.T / temperature - mask
  ab = h1 @ h2.T / temperature
  ba = h2 @ h1.T / temperature
  idx = jnp.arange(n)
  logits_a = jnp.concatenate([ab, aa], axis=1)
  logits_b = jnp.concatenate([ba, bb], axis=1)
  loss_a = -jax.nn.log_softmax(logits_a, axis=1)[idx, idx]
  loss_b = -jax.nn.log_softmax(logits_b, axis=1)[idx, idx]
  acc = jnp.mean((jnp.argmax(logits_a, axis=1) == idx).astype(jnp.float32))
  return jnp.mean(loss_a + loss_b), {"contrast_acc": acc}


def color_strength_jitter(s: float) -> tuple:
  """data_util.color_jitter(strength s): brightness, contrast, saturation 0.8 s, hue 0.2 s."""
  return (0.8 * s, 0.8 * s, 0.8 * s, 0.2 * s)


def projection_layers(mode: str, num_layers: int, in_dim: int, out_dim: int) -> tuple:
  """ProjectionHead's layers as `joint_embedding.MLP` specs ((width, bias, bn), ...)."""
  if mode == "none":
    return ()
  if mode == "linear":
    return ((out_dim, False, "scale"),)
  if mode == "nonlinear":
    if num_layers < 1:
      raise ValueError(f"simclr.num_proj_layers={num_layers}: use 1 or more (v1: 2, v2: 3)")
    return tuple((in_dim, False, "affine") for _ in range(num_layers - 1)) + ((out_dim, False, "scale"),)
  raise ValueError(f"simclr.proj_head_mode={mode!r}: use 'nonlinear', 'linear' or 'none'")


def study_ops(spec: str) -> tuple[str, ...]:
  """simclr.aug_study ('crop+color', say; '' = off) as the operators in their order."""
  from mim_jax.data.views import STUDY_OPS
  ops = tuple(o.strip() for o in str(spec or "").split("+") if o.strip())
  bad = [o for o in ops if o not in STUDY_OPS]
  if bad:
    raise ValueError(f"simclr.aug_study={spec!r}: unknown {bad[0]!r}; join operators of "
                     f"{', '.join(STUDY_OPS)} with '+' (e.g. 'crop+color'), or '' for the recipe")
  return ops


class SimCLR(JointEmbedding):
  name = "simclr"
  concat_views = True

  def __init__(self, config):
    super().__init__(config)
    self.study = study_ops(self.c.get("aug_study", ""))

  def views_cfg(self):
    """The config's views with the colour jitter of simclr.color_strength."""
    v = self.c.views.copy_and_resolve_references()
    v.jitter = color_strength_jitter(float(self.c.color_strength))
    return v

  def train_views(self):
    """The study's streamed base image: the centre square, resized, unflipped (a crop of the
    whole area at aspect 1 falls back to torchvision's centre crop); else the two views."""
    if not self.study:
      return super().train_views()
    from mim_jax.data.host_crop import CropSpec
    return (CropSpec("global", 1, int(self.config.input.image_size), (1.0, 1.0), (1.0, 1.0),
                     hflip=False),)

  def preprocess(self, rng, images, input_cfg, on_device_aug):
    if not self.study:
      return super().preprocess(rng, images, input_cfg, on_device_aug)
    from mim_jax.data import augment, preprocess, views
    if isinstance(images, dict):
      base = images["global"][:, 0].astype(jnp.float32)
    else:
      base = preprocess.crop_or_resize(rng, images, input_cfg, on_device_aug=False)
    base = jnp.round(jnp.clip(base, 0.0, 255.0))
    other = views.study_view(rng, base, self.study, self.views_cfg())
    pair = jnp.stack([base, other], axis=1)                  # [B, 2, S, S, 3]: identity first
    return {"global": augment.normalize(pair, input_cfg.mean, input_cfg.std)}

  def head_modules(self):
    c = self.c
    layers = projection_layers(str(c.proj_head_mode), int(c.num_proj_layers),
                               self.feature_width(), int(c.proj_out_dim))
    return {"projector": self.mlp(layers)} if layers else {}

  def loss(self, params, state, images, rng, step):
    heads = tuple(self.heads)
    (o1, o2), cols = self.embed_views(params, state.get("collections"), self.split_views(images),
                                      heads=heads, rng=rng)
    key = heads[-1] if heads else "pooled"
    loss, parts = nt_xent(o1[key], o2[key], float(self.c.temperature))
    aux = {**parts, **collapse_monitor(o1[key])}
    if cols:
      aux["collections"] = cols
    return loss, aux
