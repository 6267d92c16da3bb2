"""Context encoders (Pathak, Kraehenbuehl, Donahue, Darrell & Efros, CVPR 2016), after the
official pathak22/context-encoder (train.lua: the central region; train_random.lua: random
regions) and the paper (Sec. 3: the channel-wise fully connected bottleneck, the region masks,
the joint loss).

The image with a region erased (filled with train.lua's mean pixel) goes through the registry
backbone (`self.encoder`: AlexNet up to pool5 in the paper), the channel-wise fully connected
layer (`ChannelWiseFC`: a fully connected layer over each channel's spatial map, m n^4 weights,
then dropout 0.5 as Sec. 5.2 and a 1x1 "stride 1 convolution" mixing the channels), and an
up-convolutional decoder (`Decoder`: train.lua's netG decoder, 4x4 stride-2 transposed
convolutions with BatchNorm and ReLU, tanh out) that produces the missing region (the central
quarter) or, for random masks, the whole image. Losses are in train.lua's [-1, 1] pixel space:
  generator      (1 - wtl2) BCE(D(G(x)), real) + mean(W (G(x) - x)^2)   wtl2 = 0.999
  discriminator  BCE(D(x), real) + BCE(D(G(x)), fake)
with W = wtl2 on the missing region and overlapL2Weight (10) x wtl2 on the overlapping border
(train.lua: `wtl2Matrix`), so that train.lua's gradient is the gradient of this loss. The
discriminator (`Discriminator`: train.lua's netD) is the trainer's adversary
(`adversary_keys`), stepped first with its own Adam.

All randomness of a step (the masks, the bottleneck's dropout) is drawn in `preprocess`, so
the discriminator's step and the generator's step see the same masked batch and the same
prediction, as train.lua's fDx and fGx do.
"""
from __future__ import annotations

import math

import flax.linen as nn
import jax
import jax.numpy as jnp
import ml_collections
import numpy as np

from mim_jax import models
from mim_jax.methods.base import Method
from mim_jax.models.resnet import BatchNorm

# train.lua: the erased pixels are set to 2 * {117, 104, 123} / 255 - 1 in channels 1, 2, 3.
MEAN_PIXEL = (117.0, 104.0, 123.0)
MASKS = ("central", "block", "region")
# train.lua's netD / netG weights_init: N(0, 0.02) convolutions, BatchNorm scale N(1, 0.02).
dcgan_init = nn.initializers.normal(0.02)


def bn_scale_init(key, shape, dtype=jnp.float32):
  return 1.0 + 0.02 * jax.random.normal(key, shape, dtype)


# -- pixel spaces ----------------------------------------------------------------------------

def to_unit(x: jax.Array, mean, std) -> jax.Array:
  """Normalised images -> train.lua's [-1, 1] pixel space: 2 (x std + mean) - 1."""
  return 2.0 * (x * jnp.asarray(std, jnp.float32) + jnp.asarray(mean, jnp.float32)) - 1.0


def from_unit(u: jax.Array, mean, std) -> jax.Array:
  """[-1, 1] pixels -> the normalised image space: ((u + 1) / 2 - mean) / std."""
  return ((u + 1.0) / 2.0 - jnp.asarray(mean, jnp.float32)) / jnp.asarray(std, jnp.float32)


def fill_value() -> jax.Array:
  """train.lua's fill of erased pixels in [-1, 1] space, per channel."""
  return 2.0 * jnp.asarray(MEAN_PIXEL, jnp.float32) / 255.0 - 1.0


# -- masks -----------------------------------------------------------------------------------

def central_bounds(size: int) -> tuple[int, int]:
  """[lo, hi) of the central region on each axis: train.lua's 1 + fineSize/4 ..
  fineSize/2 + fineSize/4 (1-based, inclusive), the centre quarter of the image."""
  if size % 4:
    raise ValueError(f"image size {size}: the central-region mask needs a multiple of 4")
  return size // 4, size // 4 + size // 2


def central_mask(size: int, overlap: int) -> np.ndarray:
  """bool [size, size]: True on the erased pixels, the central region shrunk by `overlap`
  on each side (train.lua's overlapPred: the predicted region overlaps the context)."""
  lo, hi = central_bounds(size)
  if not 0 <= 2 * overlap < hi - lo:
    raise ValueError(f"context_encoder.overlap={overlap}: use 0 <= overlap < {(hi - lo) // 2}")
  m = np.zeros((size, size), bool)
  m[lo + overlap:hi - overlap, lo + overlap:hi - overlap] = True
  return m


def central_weights(size: int, overlap: int, overlap_weight: float) -> np.ndarray:
  """float32 [size/2, size/2]: the L2 weight of each predicted pixel relative to wtl2:
  `overlap_weight` (train.lua's overlapL2Weight, 10) on the border of width `overlap`, 1
  inside (1 everywhere without overlap)."""
  half = size // 2
  w = np.full((half, half), overlap_weight if overlap else 1.0, np.float32)
  w[overlap:half - overlap, overlap:half - overlap] = 1.0
  return w


def random_block_mask(rng: jax.Array, size: int, num_blocks: int, min_side: int, max_side: int,
                      max_fraction: float = 0.25) -> jax.Array:
  """bool [size, size]: the paper's random blocks (Sec. 3.3: "a number of smaller possibly
  overlapping masks, covering up to 1/4 of the image"; no official code). `num_blocks` squares
  of side uniform in [min_side, max_side] at uniform positions, taken in order, each kept only
  if the union stays within `max_fraction` of the image."""
  k_side, k_y, k_x = jax.random.split(rng, 3)
  sides = jax.random.randint(k_side, (num_blocks,), min_side, max_side + 1)
  ys = jax.random.randint(k_y, (num_blocks,), 0, size - sides + 1)
  xs = jax.random.randint(k_x, (num_blocks,), 0, size - sides + 1)
  idx = jnp.arange(size)

  def add(mask, block):
    s, y, x = block
    b = (((idx >= y) & (idx < y + s))[:, None]) & (((idx >= x) & (idx < x + s))[None, :])
    new = mask | b
    keep = jnp.sum(new) <= max_fraction * size * size
    return jnp.where(keep, new, mask), None

  mask, _ = jax.lax.scan(add, jnp.zeros((size, size), bool), (sides, ys, xs))
  return mask


def random_region_mask(rng: jax.Array, size: int, res: float, density: float = 0.25,
                       area: tuple[float, float] = (0.20, 0.30), tries: int = 16) -> jax.Array:
  """bool [size, size]: train_random.lua's random region. A uniform noise pattern at
  resolution `res` (0.06 at 128 px) is resized bicubically to full resolution and thresholded
  below `density` (25% ones); a size x size window whose area of ones lies strictly within
  `area` percent (20-30%) is kept. train_random.lua crops windows of one 10000 x 10000 pattern
  drawn once, retrying until the area fits; here each of `tries` candidates is a fresh pattern
  window (the same distribution), the first that fits is taken, else the one closest to
  `density`."""
  low = max(2, int(math.ceil(size * res)) + 1)
  big = int(math.ceil(low / res))
  keys = jax.random.split(rng, tries)

  def one(k):
    k_noise, k_y, k_x = jax.random.split(k, 3)
    noise = jax.random.uniform(k_noise, (low, low)) * 255.0
    pattern = jax.image.resize(noise, (big, big), "cubic") / 255.0 < density
    y = jax.random.randint(k_y, (), 0, big - size + 1)
    x = jax.random.randint(k_x, (), 0, big - size + 1)
    return jax.lax.dynamic_slice(pattern, (y, x), (size, size))

  cands = jax.vmap(one)(keys)
  frac = jnp.mean(cands, axis=(1, 2))
  ok = (frac > area[0]) & (frac < area[1])
  first = jnp.where(jnp.any(ok), jnp.argmax(ok), jnp.argmin(jnp.abs(frac - density)))
  return cands[first]


def erase(images_unit: jax.Array, mask: jax.Array) -> jax.Array:
  """[B, H, W, 3] [-1, 1] images with the pixels where mask [B, H, W] is True set to
  train.lua's mean pixel."""
  return jnp.where(mask[..., None], fill_value(), images_unit)


# -- losses ----------------------------------------------------------------------------------

def bce_with_logits(logits: jax.Array, label: float) -> jax.Array:
  """torch nn.BCECriterion on sigmoid(logits) (netD ends in a Sigmoid), batch mean:
  -mean(label log p + (1 - label) log(1 - p)), computed from the logits."""
  logits = logits.astype(jnp.float32)
  return -jnp.mean(label * jax.nn.log_sigmoid(logits) + (1.0 - label) * jax.nn.log_sigmoid(-logits))


def discriminator_loss(logits_real: jax.Array, logits_fake: jax.Array) -> jax.Array:
  """train.lua's errD = BCE(D(real), 1) + BCE(D(fake), 0)."""
  return bce_with_logits(logits_real, 1.0) + bce_with_logits(logits_fake, 0.0)


def reconstruction_loss(pred: jax.Array, target: jax.Array, weights: jax.Array) -> jax.Array:
  """mean over every element of weights * (pred - target)^2 (nn.MSECriterion's size average
  with train.lua's wtl2Matrix; `weights` [B or 1, h, w] broadcast over the channels)."""
  d = pred.astype(jnp.float32) - target.astype(jnp.float32)
  return jnp.mean(weights[..., None] * d * d)


def generator_loss(logits_fake: jax.Array, rec: jax.Array, adv_weight: float) -> jax.Array:
  """train.lua's errG_total for 0 < wtl2 < 1: adv_weight BCE(D(fake), 1) + rec (rec already
  carries wtl2 in its weights)."""
  if adv_weight == 0:
    return rec
  return adv_weight * bce_with_logits(logits_fake, 1.0) + rec


# -- networks --------------------------------------------------------------------------------

class ChannelWiseFC(nn.Module):
  """Sec. 3.1: for m feature maps of n x n, a fully connected layer within each map (m n^4
  weights, a bias per output unit), dropout, then a 1x1 convolution across the channels."""
  dropout: float = 0.5

  @nn.compact
  def __call__(self, x, train: bool, dropout_rng=None):
    b, h, w, c = x.shape
    k = self.param("kernel", nn.initializers.lecun_normal(batch_axis=(0,)), (c, h * w, h * w))
    bias = self.param("bias", nn.initializers.zeros, (c, h * w))
    y = jnp.einsum("bpc,cpq->bqc", x.reshape(b, h * w, c), k) + bias.T[None]
    if train and self.dropout > 0:
      keep = jax.random.bernoulli(dropout_rng, 1.0 - self.dropout, y.shape)
      y = jnp.where(keep, y / (1.0 - self.dropout), 0.0)
    y = y.reshape(b, h, w, c)
    return nn.Conv(c, (1, 1), kernel_init=nn.initializers.lecun_normal(), name="mix")(y)


class Decoder(nn.Module):
  """The bottleneck (`ChannelWiseFC`, then train.lua's BatchNorm + LeakyReLU(0.2) after the
  bottleneck) and train.lua's up-convolutional decoder: 4x4 stride-2 transposed convolutions
  (padding 1), BatchNorm + ReLU, `ngf` x 2^k channels halving to `ngf`, the last to 3 channels
  with tanh, as many as double the n x n map to `out_size` (resized bilinearly when that is not
  a power of two times n). No biases: train.lua zeroes every convolution bias before each
  forward pass."""
  out_size: int
  ngf: int = 64
  dropout: float = 0.5

  @nn.compact
  def __call__(self, fmap, train: bool, dropout_rng=None):
    x = ChannelWiseFC(self.dropout, name="cfc")(fmap, train, dropout_rng)
    x = BatchNorm(scale_init=bn_scale_init, name="bn_cfc")(x, train)
    x = nn.leaky_relu(x, 0.2)
    ups = max(1, math.ceil(math.log2(self.out_size / x.shape[1])))
    for i in range(ups):
      last = i == ups - 1
      feats = 3 if last else self.ngf * 2 ** (ups - 2 - i)
      x = nn.ConvTranspose(feats, (4, 4), (2, 2), padding=((2, 2), (2, 2)), use_bias=False,
                           kernel_init=dcgan_init, name=f"up{i}")(x)
      if not last:
        x = nn.relu(BatchNorm(scale_init=bn_scale_init, name=f"bn{i}")(x, train))
    if x.shape[1] != self.out_size:
      x = jax.image.resize(x, (x.shape[0], self.out_size, self.out_size, 3), "linear")
    return jnp.tanh(x)


def discriminator_widths(size: int, ndf: int) -> list[int]:
  """train.lua / train_random.lua netD's stride-2 layers down to 4 x 4: ndf, 2 ndf, 4 ndf,
  8 ndf at 64 px, an extra ndf layer in front at 128 px; fewer at smaller sizes."""
  n = int(round(math.log2(size / 4)))
  if size < 8 or 4 * 2 ** n != size:
    raise ValueError(f"the discriminator's input {size} px must be 4 x a power of two >= 8")
  return [ndf * 2 ** max(0, i - max(0, n - 4)) for i in range(n)]


class Discriminator(nn.Module):
  """train.lua's netD: 4x4 stride-2 convolutions (padding 1), LeakyReLU(0.2), BatchNorm on all
  but the first, down to 4 x 4, then a 4x4 convolution to one logit (the Sigmoid is in the
  loss). No biases (train.lua zeroes them before each forward)."""
  ndf: int = 64

  @nn.compact
  def __call__(self, x, train: bool):
    for i, c in enumerate(discriminator_widths(x.shape[1], self.ndf)):
      x = nn.Conv(c, (4, 4), (2, 2), padding=((1, 1), (1, 1)), use_bias=False,
                  kernel_init=dcgan_init, name=f"conv{i}")(x)
      if i:
        x = BatchNorm(scale_init=bn_scale_init, name=f"bn{i}")(x, train)
      x = nn.leaky_relu(x, 0.2)
    x = nn.Conv(1, (4, 4), padding="VALID", use_bias=False, kernel_init=dcgan_init, name="out")(x)
    return x.reshape(x.shape[0])


# -- the method ------------------------------------------------------------------------------

class ContextEncoder(Method):
  name = "context_encoder"
  picture_titles = {"masked": "erased", "reconstruction": "inpainted",
                    "header": "{hidden:.0%} of the pixels erased"}

  def __init__(self, config: ml_collections.ConfigDict):
    super().__init__(config)
    c = self.c = config.context_encoder
    if c.mask not in MASKS:
      raise ValueError(f"context_encoder.mask={c.mask!r}: use one of {', '.join(MASKS)}")
    if not 0.0 < float(c.rec_weight) <= 1.0 or float(c.adv_weight) < 0.0:
      raise ValueError("context_encoder.rec_weight must be in (0, 1] and adv_weight >= 0 "
                       "(the paper: 0.999 and 0.001)")
    size = self.image_size
    self.overlap = (int(c.overlap) if c.overlap is not None
                    else int(round(4 * size / 128)))          # train.lua: 4 px at 128 px
    if c.mask == "central":
      central_mask(size, self.overlap)                         # checks the overlap
    self.region_res = float(c.region_res) if c.region_res else 0.06 * 128 / size
    self.adv_weight = float(c.adv_weight)
    # The discriminator exists only with an adversarial loss (adv_weight 0: the paper's
    # L2-only AlexNet feature learning).
    self.adversary_keys = ("discriminator",) if self.adv_weight > 0 else ()
    self.mean = tuple(config.input.mean)
    self.std = tuple(config.input.std)

  @property
  def out_size(self) -> int:
    return self.image_size // 2 if self.c.mask == "central" else self.image_size

  def decoder(self) -> Decoder:
    return Decoder(self.out_size, int(self.c.ngf), float(self.c.dropout))

  def discriminator(self) -> Discriminator:
    return Discriminator(int(self.c.ndf))

  # -- masks ---------------------------------------------------------------------------------
  def draw_masks(self, rng: jax.Array, batch: int) -> jax.Array:
    """bool [B, S, S] erased pixels of one batch for config.context_encoder.mask."""
    size, c = self.image_size, self.c
    if c.mask == "central":
      return jnp.broadcast_to(jnp.asarray(central_mask(size, self.overlap)), (batch, size, size))
    if c.mask == "region":   # train_random.lua: one mask for the whole batch
      m = random_region_mask(rng, size, self.region_res, float(c.region_density),
                             tuple(c.region_area), int(c.region_tries))
      return jnp.broadcast_to(m, (batch, size, size))
    lo, hi = c.block_sides
    keys = jax.random.split(rng, batch)
    return jax.vmap(lambda k: random_block_mask(
        k, size, int(c.block_count), max(1, int(round(lo * size))), max(1, int(round(hi * size))),
        float(c.block_max_fraction)))(keys)

  def preprocess(self, rng, images, input_cfg, on_device_aug):
    k_aug, k_mask, k_drop = jax.random.split(rng, 3)
    x = super().preprocess(k_aug, images, input_cfg, on_device_aug)
    b = x.shape[0]
    seeds = jax.random.randint(k_drop, (b,), 0, np.iinfo(np.int32).max)
    return {"image": x, "mask": self.draw_masks(k_mask, b), "seed": seeds}

  # -- variables -----------------------------------------------------------------------------
  def init_variables(self, rng, images):
    k_enc, k_dec, k_disc = jax.random.split(rng, 3)
    enc = self.encoder.init(k_enc, images)
    fmap = self.feature_map(enc, images, train=False)[0]
    dec = self.decoder().init(k_dec, fmap, False)
    parts = {"decoder": dec}
    if self.adversary_keys:
      shape = (images.shape[0], self.out_size, self.out_size, 3)
      parts["discriminator"] = self.discriminator().init(k_disc, jnp.zeros(shape), False)
    return self.nest_modules(encoder=enc, **parts)

  def feature_map(self, variables, x, train: bool):
    """The backbone's last map [B, h, w, C] and its new collections."""
    out, new = models.forward(self.encoder, variables, x, train=train, pooling=self.pooling)
    h, w = out["grid"]
    return out["tokens"].reshape(x.shape[0], h, w, -1), new

  # -- forward -------------------------------------------------------------------------------
  def targets(self, x_unit: jax.Array) -> jax.Array:
    """What the generator predicts, in [-1, 1]: the central quarter or the whole image."""
    if self.c.mask == "central":
      lo, hi = central_bounds(self.image_size)
      return x_unit[:, lo:hi, lo:hi]
    return x_unit

  def weights(self, mask: jax.Array) -> jax.Array:
    """wtl2Matrix [B or 1, h, w]: wtl2 (x overlap_weight on the overlap border) on the central
    region; for random masks wtl2 on the erased pixels and context_weight x wtl2 elsewhere
    (0: the paper's Eq. 1; train_random.lua: 1 with useOverlapPred=0, 10 with 1)."""
    w = float(self.c.rec_weight)
    if self.c.mask == "central":
      return w * jnp.asarray(central_weights(self.image_size, self.overlap,
                                             float(self.c.overlap_weight)))[None]
    return w * jnp.where(mask, 1.0, float(self.c.context_weight))

  def generate(self, params, state, batch, train: bool):
    """(prediction in [-1, 1], real targets in [-1, 1], erased input (normalised), new
    collections {col: {'encoder'|'decoder': ...}})."""
    x, mask = batch["image"], batch["mask"]
    unit = to_unit(x, self.mean, self.std)
    erased = from_unit(erase(unit, mask), self.mean, self.std)
    fmap, enc_new = self.feature_map(self.variables(params, state), erased, train)
    dvars = self.variables(params, state, "decoder")
    drop = jax.random.fold_in(jax.random.PRNGKey(0), batch["seed"][0])
    if train:
      pred, dec_new = self.decoder().apply(dvars, fmap, True, drop, mutable=["batch_stats"])
    else:
      pred, dec_new = self.decoder().apply(dvars, fmap, False), {}
    new = self.nest_collections(encoder=enc_new, decoder=dec_new)
    return pred, self.targets(unit), erased, new

  def discriminate(self, params, state, images, train: bool = True, stats=None):
    """(logits [B], new 'batch_stats' of the discriminator) for [-1, 1] images, starting from
    `stats` (the running statistics after an earlier pass) when given."""
    v = self.variables(params, state, "discriminator")
    if stats:
      v = {**v, "batch_stats": stats}
    logits, new = self.discriminator().apply(v, images, train, mutable=["batch_stats"])
    return logits, new.get("batch_stats", {})

  # -- losses --------------------------------------------------------------------------------
  def loss(self, params, state, images, rng, step):
    del rng, step
    pred, real, _, new = self.generate(params, state, images, train=True)
    rec = reconstruction_loss(pred, real, self.weights(images["mask"]))
    aux = {"rec": rec, "collections": new}
    if not self.adversary_keys:
      return rec, aux
    # fGx: the discriminator's verdict on the prediction (its statistics are its own step's).
    logits_fake, _ = self.discriminate(params, state, pred)
    adv = bce_with_logits(logits_fake, 1.0)
    aux["adv"] = adv
    aux["d_fake"] = jnp.mean(jax.nn.sigmoid(logits_fake))
    return generator_loss(logits_fake, rec, self.adv_weight), aux

  def adversary_loss(self, params, state, images, rng, step):
    """fDx: BCE(D(real), 1) + BCE(D(G(x)), 0), real then fake, each with its own batch
    statistics; the running statistics move twice as netD's do. The generator runs in
    training mode (its batch statistics) but its running statistics are left to `loss`."""
    del rng, step
    pred, real, _, _ = self.generate(params, state, images, train=True)
    pred = jax.lax.stop_gradient(pred)
    logits_real, stats = self.discriminate(params, state, real)
    logits_fake, stats = self.discriminate(params, state, pred, stats=stats)
    aux = {"d_real": jnp.mean(jax.nn.sigmoid(logits_real)),
           "d_fake": jnp.mean(jax.nn.sigmoid(logits_fake))}
    if stats:   # no BatchNorm below 16 px (one stride-2 layer)
      aux["collections"] = {"batch_stats": {"discriminator": stats}}
    return discriminator_loss(logits_real, logits_fake), aux

  def adversary_optim_config(self):
    """train.lua's optimStateD: Adam lr 2e-4, beta1 0.5 (beta2 0.999, eps 1e-8), constant."""
    c = self.config.optim.copy_and_resolve_references()
    c.update(name="adamw", base_lr=float(self.c.d_lr), b1=float(self.c.d_beta1), b2=0.999,
             eps=1e-8, weight_decay=0.0, warmup_epochs=0.0, warmup_lr=0.0, schedule="constant",
             param_groups=(), layer_decay=1.0, clip_grad=0.0)
    return c

  # -- the picture ---------------------------------------------------------------------------
  def reconstruct(self, params, state, images, rng):
    """The erased images and the inpaintings (the prediction pasted into the erased pixels:
    for the central region its inner part, as train.lua's display), normalised."""
    b = images.shape[0]
    batch = {"image": images, "mask": self.draw_masks(rng, b), "seed": jnp.zeros((b,), jnp.int32)}
    pred, _, erased, _ = self.generate(params, state, batch, train=False)
    unit = to_unit(images, self.mean, self.std)
    if self.c.mask == "central":
      lo, hi = central_bounds(self.image_size)
      full = jax.lax.dynamic_update_slice(unit, pred, (0, lo, lo, 0))
    else:
      full = pred
    painted = jnp.where(batch["mask"][..., None], full, unit)
    return {"masked": erased, "reconstruction": from_unit(painted, self.mean, self.std)}
