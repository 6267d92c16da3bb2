"""Context prediction (Doersch, Gupta & Efros, ICCV 2015), after cdoersch/deepcontext train.py.

The pair (`sample_pair_origins`): a 3 x 3 grid of `patch` px patches separated by `gap` px is
laid at a uniformly random position of the image (deepcontext's grid start); the centre patch
and one of its 8 neighbours, chosen uniformly, are cut, each moved by a uniform jitter in
[-jitter, jitter] px per axis and clipped into the image (train.py `sample_patch`: patch 96,
gap 48, noise 7). The label is the neighbour's position relative to the centre, train.py's
`pos2lbl` layout (0-based, row-major around the centre):

    0 1 2
    3 . 4
    5 6 7

Against chromatic aberration (`color`):
  'drop'     colour dropping (the paper, Sec. 3.1; train.py `prep_image`): one channel of each
             patch kept (uniformly), mean-subtracted, the other two replaced by Gaussian noise
             with 1/100 of the kept channel's standard deviation (the paper's noise; train.py
             uses uniform noise of width 1 on the 0..255 scale, ~1/170 of a typical channel);
  'project'  the paper's projection: every pixel multiplied by B = I - a a^T / (a^T a), a =
             (-1, 2, -1), which removes the green-magenta component (`project_out_green_magenta`);
  'none'     the RGB patch.
then each patch is mean-subtracted per channel and divided by its RMS (train.py scales the RMS
to 50 for Caffe's 0..255 inputs; here to 1, the same up to a constant that BatchNorm removes).
With `downsample_prob` > 0 a patch is, with that probability, resampled to a random side
between `min_pixels`^(1/2) and patch - 1 px and back (train.py: p 1/3, to as few as 100
pixels); `downsample_sizes` are the candidate sides, cycled through with a random choice.

The network (train.py `gen_net`, late fusion): the backbone per patch with shared weights
(one forward over both patches of every pair), fc6 per patch = Linear(flattened pool5, fc_dim)
+ BatchNorm without scale and shift (Caffe's BatchNorm layer alone) + ReLU; the two fc6
concatenated (centre first); fc7 = Linear(fc_dim) + BN + ReLU; fc8 = Linear(fc_dim) + ReLU;
fc9 = Linear(8); softmax cross-entropy (`context_loss`). Xavier (Caffe's: uniform, fan-in)
weights and zero biases as the official fillers. The official loss is summed over pairs
(normalization NONE) with lr 1e-5; here the mean, with the lr scaled accordingly in the config.
"""
from __future__ import annotations

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax

from mim_jax import models
from mim_jax.methods.base import Method, module_entries
from mim_jax.models import resnet

# (dy, dx) of the neighbour for labels 0..7 (deepcontext pos2lbl).
OFFSETS = np.array([(-1, -1), (-1, 0), (-1, 1), (0, -1), (0, 1), (1, -1), (1, 0), (1, 1)],
                   np.int32)
COLORS = ("drop", "project", "none")
GREEN_MAGENTA = np.array([-1.0, 2.0, -1.0])


def projection_matrix() -> np.ndarray:
  """B = I - a a^T / (a^T a), a = (-1, 2, -1): the paper's green-magenta projection."""
  a = GREEN_MAGENTA[:, None]
  return np.eye(3) - (a @ a.T) / float(np.sum(GREEN_MAGENTA ** 2))


def project_out_green_magenta(x: jax.Array) -> jax.Array:
  """Every pixel [..., 3] times B (`projection_matrix`, symmetric)."""
  return x @ jnp.asarray(projection_matrix(), x.dtype)


def check_geometry(size: int, patch: int, gap: int, jitter: int) -> None:
  if patch < 1 or gap < 0 or jitter < 0:
    raise ValueError(f"context_prediction: patch={patch}, gap={gap}, jitter={jitter}: use a "
                     f"patch >= 1 and gap, jitter >= 0")
  if 3 * patch + 2 * gap > size:
    raise ValueError(f"context_prediction: 3 patches of {patch} px with gaps of {gap} need "
                     f"{3 * patch + 2 * gap} px, the image has {size}: lower patch/gap or "
                     f"raise context_prediction.resize")


def sample_pair_origins(rng: jax.Array, batch: int, size: int, patch: int, gap: int,
                        jitter: int):
  """Returns (origins int32 [batch, 2, 2]: the (y, x) corner of the centre patch (index 0)
  and of the neighbour (index 1), labels int32 [batch] in 0..7). The nominal 3 x 3 grid
  (stride patch + gap) starts uniformly in [0, size - (3 patch + 2 gap)]; each patch is
  jittered by a uniform [-jitter, jitter] per axis and clipped to [0, size - patch]."""
  check_geometry(size, patch, gap, jitter)
  k_start, k_lab, k_jit = jax.random.split(rng, 3)
  start = jax.random.randint(k_start, (batch, 1, 2), 0, size - (3 * patch + 2 * gap) + 1)
  labels = jax.random.randint(k_lab, (batch,), 0, 8)
  step = patch + gap
  centre = start[:, 0] + step
  neigh = centre + jnp.asarray(OFFSETS)[labels] * step
  nominal = jnp.stack([centre, neigh], axis=1)
  noise = jax.random.randint(k_jit, (batch, 2, 2), -jitter, jitter + 1)
  return jnp.clip(nominal + noise, 0, size - patch).astype(jnp.int32), labels.astype(jnp.int32)


def cut_patches(images: jax.Array, origins: jax.Array, patch: int) -> jax.Array:
  """images [B, H, W, C], origins [B, N, 2] -> [B, N, patch, patch, C]."""
  ar = jnp.arange(patch)
  ys = origins[..., 0][..., None] + ar
  xs = origins[..., 1][..., None] + ar
  bi = jnp.arange(images.shape[0])[:, None, None, None]
  return images[bi, ys[..., :, None], xs[..., None, :]]


def drop_colors(rng: jax.Array, patches: jax.Array, noise_ratio: float = 0.01) -> jax.Array:
  """Colour dropping: per patch [..., P, P, 3] one channel kept (uniform), mean-subtracted;
  the other two Gaussian noise of std noise_ratio x the kept channel's std."""
  k_ch, k_noise = jax.random.split(rng)
  lead = patches.shape[:-3]
  keep = jax.random.randint(k_ch, lead, 0, 3)
  onehot = jax.nn.one_hot(keep, 3)[..., None, None, :]
  kept = jnp.sum(patches * onehot, axis=-1, keepdims=True)
  kept = kept - kept.mean(axis=(-3, -2), keepdims=True)
  std = jnp.sqrt(jnp.mean(jnp.square(kept), axis=(-3, -2), keepdims=True))
  noise = jax.random.normal(k_noise, patches.shape) * std * noise_ratio
  return jnp.where(onehot > 0, kept, noise)


def normalize_patches(patches: jax.Array) -> jax.Array:
  """Per channel mean removed, then the whole patch divided by its RMS (prep_image's
  normalisation, to RMS 1 instead of 50)."""
  x = patches - patches.mean(axis=(-3, -2), keepdims=True)
  rms = jnp.sqrt(jnp.mean(jnp.square(x), axis=(-3, -2, -1), keepdims=True))
  return x / jnp.maximum(rms, 1e-8)


def downsample_patches(rng: jax.Array, patches: jax.Array, prob: float, sizes) -> jax.Array:
  """With probability `prob` per patch, bilinear resampling to a side drawn from `sizes` and
  back to the patch size (one static resize per candidate side, selected per patch)."""
  if prob <= 0 or not sizes:
    return patches
  k_on, k_size = jax.random.split(rng)
  p, c = patches.shape[-3], patches.shape[-1]
  flat = patches.reshape((-1, p, p, c))
  choice = jax.random.randint(k_size, (flat.shape[0],), 0, len(sizes))
  out = flat
  for i, s in enumerate(sizes):
    small = jax.image.resize(flat, (flat.shape[0], s, s, c), "linear", antialias=True)
    back = jax.image.resize(small, flat.shape, "linear")
    out = jnp.where((choice == i)[:, None, None, None], back, out)
  on = jax.random.uniform(k_on, (flat.shape[0],)) < prob
  out = jnp.where(on[:, None, None, None], out, flat)
  return out.reshape(patches.shape)


def context_loss(logits: jax.Array, labels: jax.Array) -> jax.Array:
  """Mean softmax cross-entropy over the 8 relative positions."""
  return optax.softmax_cross_entropy_with_integer_labels(logits.astype(jnp.float32),
                                                         labels).mean()


def _xavier():
  return nn.initializers.variance_scaling(1.0, "fan_in", "uniform")


class LateFusionHead(nn.Module):
  """fc6 per patch (+BN +ReLU), concatenation, fc7 (+BN +ReLU), fc8 (+ReLU), fc9 (8)."""
  fc_dim: int = 4096
  bn_momentum: float = 0.1

  @nn.compact
  def __call__(self, fmaps: jax.Array, train: bool = False) -> jax.Array:
    b, n = fmaps.shape[:2]

    def bn(name):
      return resnet.BatchNorm(momentum=self.bn_momentum, use_scale=False, use_bias=False,
                              name=name)
    x = fmaps.reshape(b * n, -1).astype(jnp.float32)
    x = nn.Dense(self.fc_dim, kernel_init=_xavier(), name="fc6")(x)
    x = nn.relu(bn("bn6")(x, train)).reshape(b, n * self.fc_dim)
    x = nn.Dense(self.fc_dim, kernel_init=_xavier(), name="fc7")(x)
    x = nn.relu(bn("bn7")(x, train))
    x = nn.relu(nn.Dense(self.fc_dim, kernel_init=_xavier(), name="fc8")(x))
    return nn.Dense(8, kernel_init=_xavier(), name="fc9")(x)


class ContextPrediction(Method):
  name = "context_prediction"

  def __init__(self, config):
    super().__init__(config)
    c = self.c = config.context_prediction
    self.resize = int(c.resize) or self.image_size
    self.patch, self.gap, self.jitter = int(c.patch), int(c.gap), int(c.jitter)
    check_geometry(self.resize, self.patch, self.gap, self.jitter)
    if c.color not in COLORS:
      raise ValueError(f"context_prediction.color={c.color!r}: use one of {', '.join(COLORS)}")
    self.mean = jnp.asarray(config.input.mean, jnp.float32)
    self.std = jnp.asarray(config.input.std, jnp.float32)
    self.head = LateFusionHead(fc_dim=int(c.fc_dim))

  def pairs(self, rng: jax.Array, images: jax.Array, train: bool = True) -> dict:
    """Normalised images -> {'patches': [B, 2, P, P, 3] network input (centre, neighbour),
    'labels': [B], 'origins': [B, 2, 2]}."""
    c = self.c
    b = images.shape[0]
    k_pos, k_col, k_down = jax.random.split(rng, 3)
    x = jnp.clip(images.astype(jnp.float32) * self.std + self.mean, 0.0, 1.0)
    if self.resize != x.shape[1]:
      x = jax.image.resize(x, (b, self.resize, self.resize, 3), "bilinear")
    origins, labels = sample_pair_origins(k_pos, b, self.resize, self.patch, self.gap,
                                          self.jitter)
    p = cut_patches(x, origins, self.patch)
    if train:
      p = downsample_patches(k_down, p, float(c.downsample_prob),
                             tuple(int(s) for s in c.downsample_sizes))
    if c.color == "drop":
      p = drop_colors(k_col, p, float(c.drop_noise))
    elif c.color == "project":
      p = project_out_green_magenta(p)
    return {"patches": normalize_patches(p), "labels": labels, "origins": origins}

  def _maps(self, variables, patches, train):
    b, n = patches.shape[:2]
    flat = patches.reshape((b * n,) + patches.shape[2:])
    if train:
      out, new = models.forward(self.encoder, variables, flat, train=True, pooling=self.pooling)
    else:
      out, new = models.outputs(self.encoder, variables, flat, pooling=self.pooling), {}
    h, w = out["grid"]
    return out["tokens"].reshape(b, n, h, w, -1), new

  def init_variables(self, rng, images):
    k_enc, k_head = jax.random.split(rng)
    enc = dict(self.encoder.init(k_enc, images))
    patches = jnp.zeros((2, 2, self.patch, self.patch, 3), jnp.float32)
    fmap = jax.eval_shape(lambda: self._maps(enc, patches, False)[0])
    head = self.head.init(k_head, jnp.zeros(fmap.shape, jnp.float32))
    return self.nest_modules(encoder=enc, head=head)

  def logits(self, params, state, patches, train=True):
    fmap, new = self._maps(self.variables(params, state), patches, train)
    hv = {"params": params["head"], **module_entries((state or {}).get("collections"), "head")}
    if train:
      logits, upd = self.head.apply(hv, fmap, train=True, mutable=["batch_stats"])
      return logits, self.nest_collections(encoder=new, head=upd)
    return self.head.apply(hv, fmap, train=False), {}

  def loss(self, params, state, images, rng, step):
    p = self.pairs(rng, images)
    logits, new = self.logits(params, state, p["patches"])
    loss = context_loss(logits, p["labels"])
    aux = {"accuracy": jnp.mean(jnp.argmax(logits, -1) == p["labels"])}
    if new:
      aux["collections"] = new
    return loss, aux
