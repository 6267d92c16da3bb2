"""Limited-context inpainting with rotation and warping (Jenni, Jin & Favaro, CVPR 2020,
"Steering self-supervised feature learning beyond local pixel statistics"), after the official
sjenni/LCI (models/TCNet.py, models/lci_nets.py, train/TrainerSSL.py, run_stl10.py).

The backbone (`self.encoder` + a fully connected head) classifies six transformations of each
image (TrainerSSL.build_model's labels):
  0  not transformed: half the batch as is, half with an auto-encoded patch pasted in
     (the inpainter run on the un-erased patch, so that its artifacts alone give nothing away)
  1  limited-context inpainting (LCI): a `lci_crop` patch at a random position whose centre
     `lci_patch` square is erased (0.1 N(0, 1) noise), leaving a thin border of context, is
     inpainted and pasted back
  2-4  class 0 rotated by 90, 180, 270 degrees
  5  a thin-plate-spline warp: `warp_points` control points moved by up to size / warp_factor
Classes 0, 1 and 5 are first randomly cropped (and, for the first half of each, rotated by up
to +-0.07 pi), as TrainerSSL's random_crop_rot.

The inpainter (`Inpainter`: lci_nets.patch_inpainter) and a spectral-normalised patch
discriminator (`PatchDiscriminator`: lci_nets.patch_discriminator, real patches against
inpainted ones, two patches of the batch side by side in 6 channels) are the trainer's
adversary (`adversary_keys`): the inpainter minimises
  -mean(D(inpainted)) + 50 MSE(border of the inpainted patch) + 50 MSE(auto-encoded patch)
  - CE(classifier)                          (it tries to fool the transformation classifier)
the discriminator the hinge loss mean(relu(1 - D(real))) + mean(relu(1 + D(inpainted))).
All randomness of a step is drawn in `preprocess`, so both updates see the same transformations.
"""
from __future__ import annotations

import flax.linen as nn
import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import optax

from mim_jax import models
from mim_jax.methods.base import Method
from mim_jax.methods.context_encoder import from_unit, to_unit
from mim_jax.models.resnet import BatchNorm

CLASSES = ("original", "lci", "rot90", "rot180", "rot270", "warp")
EPS = 1e-10       # tf interpolate_spline's EPSILON


# -- geometry --------------------------------------------------------------------------------

def erase_mask(crop: int, patch: int) -> np.ndarray:
  """float32 [crop, crop]: 1 on the erased centre `patch` square (TCNet.patch_erase pads it by
  (crop - patch) // 2 on each side), 0 on the border of context."""
  pad = (crop - patch) // 2
  if crop <= patch or (crop - patch) % 2:
    raise ValueError(f"limited_context: lci_crop={crop} must exceed lci_patch={patch} by an even "
                     f"number (the border is (crop - patch) / 2 px)")
  m = np.zeros((crop, crop), np.float32)
  m[pad:pad + patch, pad:pad + patch] = 1.0
  return m


def jitter_range(size: int, crop: int) -> tuple[int, int]:
  """TCNet.random_crop / random_crop_rot: dx = (size - crop) // 2, the shift drawn from
  [-dx + 1, dx - 1]; as the [low, high) of the crop's top-left offset dx + shift."""
  dx = (size - crop) // 2
  if dx < 1:
    raise ValueError(f"limited_context: a {crop} px crop needs an image of at least {crop + 2} px")
  return 1, 2 * dx


def crop_at(images: jax.Array, offsets: jax.Array, size: int) -> jax.Array:
  """[B, size, size, C] windows of `images` at top-left `offsets` [B, 2] (row, col)."""
  return jax.vmap(lambda im, o: jax.lax.dynamic_slice(
      im, (o[0], o[1], 0), (size, size, im.shape[-1])))(images, offsets)


def paste_at(images: jax.Array, patches: jax.Array, offsets: jax.Array) -> jax.Array:
  """`images` with `patches` written at `offsets` (TCNet.paste_crop with the same shift)."""
  return jax.vmap(lambda im, p, o: jax.lax.dynamic_update_slice(im, p, (o[0], o[1], 0)))(
      images, patches, offsets)


def bilinear(image: jax.Array, rows: jax.Array, cols: jax.Array, clamp: bool) -> jax.Array:
  """image [H, W, C] sampled bilinearly at (rows, cols) (any shape); outside the image the
  border is repeated (`clamp`, tf dense_image_warp) or 0 (tf.contrib.image.transform)."""
  h, w = image.shape[:2]
  if clamp:
    rows = jnp.clip(rows, 0.0, h - 1.0)
    cols = jnp.clip(cols, 0.0, w - 1.0)
  r0, c0 = jnp.floor(rows), jnp.floor(cols)
  ar, ac = (rows - r0)[..., None], (cols - c0)[..., None]

  def at(r, c):
    ok = (r >= 0) & (r <= h - 1) & (c >= 0) & (c <= w - 1)
    v = image[jnp.clip(r, 0, h - 1).astype(jnp.int32), jnp.clip(c, 0, w - 1).astype(jnp.int32)]
    return jnp.where(ok[..., None], v, 0.0)

  return ((1 - ar) * ((1 - ac) * at(r0, c0) + ac * at(r0, c0 + 1))
          + ar * ((1 - ac) * at(r0 + 1, c0) + ac * at(r0 + 1, c0 + 1)))


def crop_rotate(images: jax.Array, angles: jax.Array, offsets: jax.Array, crop: int) -> jax.Array:
  """TrainerSSL.random_crop_rot for given draws: each image rotated by `angles` [B] (radians,
  about its centre, bilinear, zeros outside: contrib.image.rotate) then the `crop` window at
  `offsets` [B, 2]."""
  size = images.shape[1]
  ctr = (size - 1) / 2.0
  ii, jj = jnp.meshgrid(jnp.arange(crop, dtype=jnp.float32), jnp.arange(crop, dtype=jnp.float32),
                        indexing="ij")

  def one(im, a, o):
    r, c = ii + o[0] - ctr, jj + o[1] - ctr
    cos, sin = jnp.cos(a), jnp.sin(a)
    return bilinear(im, cos * r - sin * c + ctr, sin * r + cos * c + ctr, clamp=False)

  return jax.vmap(one)(images, angles, offsets.astype(jnp.float32))


def spline_phi(r2: jax.Array) -> jax.Array:
  """tf interpolate_spline's order-2 kernel on squared distances: 0.5 r^2 log(max(r^2, eps))."""
  return 0.5 * r2 * jnp.log(jnp.maximum(r2, EPS))


def spline_interpolate(points: jax.Array, values: jax.Array, query: jax.Array) -> jax.Array:
  """tf interpolate_spline(order=2, regularization_weight=0): the polyharmonic spline through
  `values` [P, D] at `points` [P, 2] (an affine part plus phi-weighted terms), at `query` [Q, 2]."""
  p = points.shape[0]
  d2 = jnp.sum((points[:, None] - points[None]) ** 2, -1)
  pm = jnp.concatenate([points, jnp.ones((p, 1))], 1)
  lhs = jnp.block([[spline_phi(d2), pm], [pm.T, jnp.zeros((3, 3))]])
  rhs = jnp.concatenate([values, jnp.zeros((3, values.shape[1]))], 0)
  sol = jnp.linalg.solve(lhs, rhs)
  w, v = sol[:p], sol[p:]
  g2 = jnp.sum((query[:, None] - points[None]) ** 2, -1)
  return spline_phi(g2) @ w + jnp.concatenate([query, jnp.ones((query.shape[0], 1))], 1) @ v


def tps_flow(src: jax.Array, dst: jax.Array, size: int) -> jax.Array:
  """tf sparse_image_warp's dense flow [size, size, 2] for one image: the spline through the
  flows dst - src at the points dst [P, 2] (row, col), no boundary points."""
  ii, jj = jnp.meshgrid(jnp.arange(size, dtype=jnp.float32), jnp.arange(size, dtype=jnp.float32),
                        indexing="ij")
  q = jnp.stack([ii.ravel(), jj.ravel()], 1)
  return spline_interpolate(dst, dst - src, q).reshape(size, size, 2)


def warp(images: jax.Array, src: jax.Array, dst: jax.Array) -> jax.Array:
  """tf.contrib.image.sparse_image_warp: out(q) = image(q - flow(q)), bilinear, border
  repeated (dense_image_warp)."""
  size = images.shape[1]
  ii, jj = jnp.meshgrid(jnp.arange(size, dtype=jnp.float32), jnp.arange(size, dtype=jnp.float32),
                        indexing="ij")

  def one(im, s, d):
    f = tps_flow(s, d, size)
    return bilinear(im, ii - f[..., 0], jj - f[..., 1], clamp=True)

  return jax.vmap(one)(images, src, dst)


def labels_for(batch: int, warping: bool = True) -> jax.Array:
  """TrainerSSL's labels: B x 0, B x 1, B x 2, B x 3, B x 4 (, B x 5)."""
  return jnp.repeat(jnp.arange(6 if warping else 5, dtype=jnp.int32), batch)


# -- losses ----------------------------------------------------------------------------------

def hinge_discriminator_loss(real: jax.Array, fake: jax.Array) -> jax.Array:
  """TCNet.discriminator_loss: mean(relu(1 - D(real))) + mean(relu(1 + D(fake)))."""
  return jnp.mean(jax.nn.relu(1.0 - real)) + jnp.mean(jax.nn.relu(1.0 + fake))


def weighted_mse(target: jax.Array, pred: jax.Array, weights: jax.Array) -> jax.Array:
  """tf.losses.mean_squared_error(weights=...) (SUM_BY_NONZERO_WEIGHTS): sum(w d^2) / the
  number of elements with a non-zero weight; `weights` broadcast to the images' shape."""
  w = jnp.broadcast_to(weights, target.shape)
  d = pred - target
  return jnp.sum(w * d * d) / jnp.maximum(jnp.sum(w != 0), 1)


def inpainter_loss(d_fake: jax.Array, patch: jax.Array, inpainted: jax.Array, border: jax.Array,
                   autoencoded: jax.Array, class_ce: jax.Array, ae_weight: float = 50.0) -> jax.Array:
  """TCNet.inpainter_loss minus the classifier's loss (TrainerSSL: loss_ae_lci -= loss_lci_adv):
  -mean(D(inpainted)) + 50 MSE on the border + 50 MSE of the auto-encoded patch - CE."""
  return (-jnp.mean(d_fake) + weighted_mse(patch, inpainted, ae_weight * border)
          + weighted_mse(patch, autoencoded, ae_weight * jnp.ones_like(border)) - class_ce)


# -- networks --------------------------------------------------------------------------------

def lrelu(x):
  return nn.leaky_relu(x, 0.1)


class Inpainter(nn.Module):
  """lci_nets.patch_inpainter: conv 3x3 (`depth`, LeakyReLU 0.1), then num_layers - 1 4x4
  stride-2 convolutions (depth x 2^i, max 512) and as many 4x4 stride-2 transposed convolutions
  back, with BatchNorm (decay 0.975, eps 1e-3) and LeakyReLU 0.1, then a 3x3 transposed
  convolution to 3 channels and tanh; xavier weights (slim's default)."""
  depth: int = 48
  num_layers: int = 4

  @nn.compact
  def __call__(self, x, train: bool):
    init = nn.initializers.xavier_uniform()
    bn = lambda name: BatchNorm(momentum=0.025, epsilon=1e-3, name=name)  # noqa: E731
    x = lrelu(nn.Conv(self.depth, (3, 3), padding="SAME", kernel_init=init, name="conv0")(x))
    for i in range(1, self.num_layers):
      x = nn.Conv(min(self.depth * 2 ** i, 512), (4, 4), (2, 2), padding="SAME", use_bias=False,
                  kernel_init=init, name=f"conv{i + 1}")(x)
      x = lrelu(bn(f"bn{i + 1}")(x, train))
    for i in range(1, self.num_layers):
      x = nn.ConvTranspose(min(self.depth * 2 ** (self.num_layers - 1 - i), 512), (4, 4), (2, 2),
                           padding="SAME", use_bias=False, kernel_init=init, name=f"deconv{i}")(x)
      x = lrelu(bn(f"bn_deconv{i}")(x, train))
    x = nn.ConvTranspose(3, (3, 3), padding="SAME", kernel_init=init,
                         name=f"deconv{self.num_layers + 1}")(x)
    return jnp.tanh(x)


class PatchDiscriminator(nn.Module):
  """lci_nets.patch_discriminator with num_layers = inpainter layers - 1: per level a 3x3 and a
  4x4 stride-2 spectral-normalised convolution (depth x 2^(i-1)), LeakyReLU 0.1, then a 3x3
  one, the sum over positions and a spectral-normalised linear to one logit. Its input is two
  patches of the batch side by side (TCNet.patch_disc: the halves concatenated on channels).
  The power iteration's u lives in 'batch_stats'; `update` as update_collection=None (real)
  versus 'NO_OPS' (fake)."""
  depth: int = 64
  num_layers: int = 3

  @nn.compact
  def __call__(self, x, update: bool):
    def sn(layer, name):
      return nn.SpectralNorm(layer, collection_name="batch_stats", name=name)

    half = x.shape[0] // 2
    x = jnp.concatenate([x[:half], x[half:2 * half]], -1)
    for i in range(1, self.num_layers):
      c = min(self.depth * 2 ** (i - 1), 512)
      x = lrelu(sn(nn.Conv(c, (3, 3), padding="SAME"), f"conv{i + 1}_0")(x, update_stats=update))
      x = lrelu(sn(nn.Conv(c, (4, 4), (2, 2), padding="SAME"), f"conv{i + 1}_1")(
          x, update_stats=update))
    c = min(self.depth * 2 ** (self.num_layers - 1), 512)
    x = lrelu(sn(nn.Conv(c, (3, 3), padding="SAME"), f"conv_{self.num_layers}")(
        x, update_stats=update))
    x = jnp.sum(x, axis=(1, 2))
    return sn(nn.Dense(1), "linear")(x, update_stats=update)[:, 0]


class Head(nn.Module):
  """alexnet_V2's fc_1 (a convolution over the whole map = a dense layer on the flattened map),
  fc_2 (both BatchNorm + ReLU, decay 0.975, eps 1e-3) and fc_3 to the classes; weights
  N(0, 0.005) (truncated in the official)."""
  fc_dim: int
  classes: int

  @nn.compact
  def __call__(self, x, train: bool):
    init = nn.initializers.normal(0.005)
    x = x.reshape(x.shape[0], -1)
    for i in range(2):
      x = nn.Dense(self.fc_dim, use_bias=False, kernel_init=init, name=f"fc{i + 1}")(x)
      x = nn.relu(BatchNorm(momentum=0.025, epsilon=1e-3, name=f"bn{i + 1}")(x, train))
    return nn.Dense(self.classes, kernel_init=init, name="fc3")(x)


# -- the method ------------------------------------------------------------------------------

class LimitedContextInpainting(Method):
  name = "limited_context"
  picture_titles = {"masked": "erased patch", "reconstruction": "inpainted",
                    "header": "{hidden:.0%} of the pixels erased"}
  adversary_keys = ("inpainter", "patch_disc")

  def __init__(self, config: ml_collections.ConfigDict):
    super().__init__(config)
    c = self.c = config.limited_context
    size = self.image_size
    self.crop = int(c.crop_size)
    self.lci_crop, self.lci_patch = int(c.lci_crop), int(c.lci_patch)
    self.mask = erase_mask(self.lci_crop, self.lci_patch)
    jitter_range(size, self.crop)
    jitter_range(size, self.lci_crop)
    if self.lci_crop % 2 ** (int(c.inpainter_layers) - 1):
      raise ValueError(f"limited_context.lci_crop={self.lci_crop} must be a multiple of "
                       f"2^(inpainter_layers - 1) = {2 ** (int(c.inpainter_layers) - 1)}")
    self.warping = bool(c.warp)
    self.classes = 6 if self.warping else 5
    self.mean, self.std = tuple(config.input.mean), tuple(config.input.std)

  def inpainter(self):
    return Inpainter(int(self.c.ae_dim), int(self.c.inpainter_layers))

  def patch_disc(self):
    return PatchDiscriminator(int(self.c.disc_depth), int(self.c.inpainter_layers) - 1)

  def head(self):
    return Head(int(self.c.fc_dim), self.classes)

  # -- randomness ----------------------------------------------------------------------------
  def preprocess(self, rng, images, input_cfg, on_device_aug):
    """The augmented view plus every draw of the step (TrainerSSL.build_model's), per example."""
    k_aug, k_off, k_noise, k_ang, k_jit, k_src, k_mv = jax.random.split(rng, 7)
    x = super().preprocess(k_aug, images, input_cfg, on_device_aug)
    b, size = x.shape[0], self.image_size
    lo, hi = jitter_range(size, self.lci_crop)
    clo, chi = jitter_range(size, self.crop)
    amax = float(self.c.rot_max) * np.pi
    angles = jax.random.uniform(k_ang, (b, 3), minval=-amax, maxval=amax)
    # rot_split 2: the first B - B // 2 of each group are rotated, the rest only cropped.
    angles = jnp.where((jnp.arange(b) < b - b // 2)[:, None], angles, 0.0)
    mag = size / float(self.c.warp_factor)
    src = jax.random.uniform(k_src, (b, int(self.c.warp_points), 2), minval=0.0, maxval=size)
    return {"image": x,
            "lci_offset": jax.random.randint(k_off, (b, 2), lo, hi),
            "noise": jax.random.normal(k_noise, (b, self.lci_crop, self.lci_crop, 3)),
            "angle": angles,
            "crop_offset": jax.random.randint(k_jit, (b, 3, 2), clo, chi),
            "warp_src": src,
            "warp_dst": src + jax.random.uniform(k_mv, src.shape, minval=-mag, maxval=mag)}

  # -- variables -----------------------------------------------------------------------------
  def init_variables(self, rng, images):
    k_enc, k_head, k_inp, k_disc = jax.random.split(rng, 4)
    x = jnp.zeros((2, self.crop, self.crop, 3))
    enc = self.encoder.init(k_enc, x)
    tokens = models.outputs(self.encoder, enc, x, pooling=self.pooling)["tokens"]
    parts = {"head": self.head().init(k_head, tokens, False),
             "inpainter": self.inpainter().init(k_inp, jnp.zeros((2, self.lci_crop, self.lci_crop, 3)), False),
             "patch_disc": self.patch_disc().init(
                 {"params": k_disc}, jnp.zeros((2, self.lci_crop, self.lci_crop, 3)), False)}
    return self.nest_modules(encoder=enc, **parts)

  # -- the transformations -------------------------------------------------------------------
  def run_inpainter(self, params, state, x, train: bool):
    v = self.variables(params, state, "inpainter")
    if train:
      out, new = self.inpainter().apply(v, x, True, mutable=["batch_stats"])
      return out, new.get("batch_stats", {})
    return self.inpainter().apply(v, x, False), {}

  def lci(self, params, state, batch, train: bool = True):
    """TCNet.lci: (real patches, erased patches, inpainted, auto-encoded, images with the
    inpainted patch, images with the auto-encoded patch, inpainter statistics), [-1, 1]."""
    unit = to_unit(batch["image"], self.mean, self.std)
    off = batch["lci_offset"]
    patch = crop_at(unit, off, self.lci_crop)
    m = jnp.asarray(self.mask)[None, :, :, None]
    erased = patch * (1.0 - m) + 0.1 * m * batch["noise"]
    out, stats = self.run_inpainter(params, state, jnp.concatenate([patch, erased], 0), train)
    b = unit.shape[0]
    ae, ip = out[:b], out[b:]
    return (patch, erased, ip, ae, paste_at(unit, ip, off), paste_at(unit, ae, off), stats)

  def classifier_input(self, batch, unit, img_lci, img_ae) -> jax.Array:
    """TrainerSSL.build_model's [nt, lci, rot90, rot180, rot270, warp] batch, normalised."""
    b = unit.shape[0]
    nt = jnp.concatenate([unit[:b // 2], img_ae[b // 2:]], 0)
    ang, off = batch["angle"], batch["crop_offset"]
    groups = [crop_rotate(nt, ang[:, 0], off[:, 0], self.crop),
              crop_rotate(img_lci, ang[:, 1], off[:, 1], self.crop)]
    groups += [jnp.rot90(groups[0], k, axes=(1, 2)) for k in (1, 2, 3)]
    if self.warping:
      warped = warp(unit, batch["warp_src"], batch["warp_dst"])
      groups.append(crop_rotate(warped, ang[:, 2], off[:, 2], self.crop))
    return from_unit(jnp.concatenate(groups, 0), self.mean, self.std)

  def classify(self, params, state, x):
    """(logits, new collections of the encoder and head) in training mode."""
    out, enc_new = models.forward(self.encoder, self.variables(params, state), x, train=True,
                                  pooling=self.pooling)
    logits, head_new = self.head().apply(self.variables(params, state, "head"), out["tokens"], True,
                                         mutable=["batch_stats"])
    return logits, self.nest_collections(encoder=enc_new, head=head_new)

  def class_loss(self, params, state, batch):
    unit = to_unit(batch["image"], self.mean, self.std)
    patch, erased, ip, ae, img_lci, img_ae, inp_stats = self.lci(params, state, batch)
    x = self.classifier_input(batch, unit, img_lci, img_ae)
    logits, new = self.classify(params, state, x)
    labels = labels_for(unit.shape[0], self.warping)
    ce = optax.softmax_cross_entropy_with_integer_labels(logits, labels).mean()
    acc = jnp.mean(jnp.argmax(logits, -1) == labels)
    return ce, acc, new, (patch, ip, ae, inp_stats)

  # -- losses --------------------------------------------------------------------------------
  def loss(self, params, state, images, rng, step):
    """TCNet.loss_ssl: the transformation classifier's cross-entropy (6 classes)."""
    del rng, step
    ce, acc, new, _ = self.class_loss(params, state, images)
    return ce, {"accuracy": acc, "collections": new}

  def adversary_loss(self, params, state, images, rng, step):
    """The inpainter's loss plus the patch discriminator's (each gets the gradient of its own
    term only: the other network is held by stop_gradient)."""
    del rng, step
    ce, acc, _, (patch, ip, ae, inp_stats) = self.class_loss(params, state, images)
    dv = self.variables(params, state, "patch_disc")
    frozen = jax.tree.map(jax.lax.stop_gradient, dv)
    d_fake_g, _ = self.patch_disc().apply(frozen, ip, False, mutable=["batch_stats"])
    d_fake, _ = self.patch_disc().apply(dv, jax.lax.stop_gradient(ip), False, mutable=["batch_stats"])
    d_real, sn = self.patch_disc().apply(dv, patch, True, mutable=["batch_stats"])
    border = 1.0 - jnp.broadcast_to(jnp.asarray(self.mask)[None, :, :, None], patch.shape)
    g = inpainter_loss(d_fake_g, patch, ip, border, ae, ce, float(self.c.ae_weight))
    d = hinge_discriminator_loss(d_real, d_fake)
    cols = {"batch_stats": {"patch_disc": sn["batch_stats"]}}
    if inp_stats:
      cols["batch_stats"]["inpainter"] = inp_stats
    return g + d, {"inpainter": g, "disc": d, "class_ce": ce, "class_accuracy": acc,
                   "collections": cols}

  def adversary_optim_config(self):
    """TrainerBase.optimizer for the inpainter and the discriminator: Adam lr 2e-4, beta1 0.5
    (run_stl10.py), constant, the discriminator at d_lr_mult 4 x lr."""
    c = self.config.optim.copy_and_resolve_references()
    c.update(name="adamw", base_lr=float(self.c.adv_lr), b1=0.5, b2=0.999, eps=1e-8,
             weight_decay=0.0, warmup_epochs=0.0, warmup_lr=0.0, schedule="constant",
             layer_decay=1.0, clip_grad=0.0,
             param_groups=(("^patch_disc/", {"lr_scale": float(self.c.d_lr_mult)}),))
    return c

  # -- the picture ---------------------------------------------------------------------------
  def reconstruct(self, params, state, images, rng):
    """The images with the erased patch (the limited context) and with the inpainted patch."""
    b, size = images.shape[0], self.image_size
    lo, hi = jitter_range(size, self.lci_crop)
    k_off, k_noise = jax.random.split(rng)
    batch = {"image": images, "lci_offset": jax.random.randint(k_off, (b, 2), lo, hi),
             "noise": jax.random.normal(k_noise, (b, self.lci_crop, self.lci_crop, 3))}
    unit = to_unit(images, self.mean, self.std)
    _, erased, ip, _, img_lci, _, _ = self.lci(params, state, batch, train=False)
    masked = paste_at(unit, erased, batch["lci_offset"])
    return {"masked": from_unit(masked, self.mean, self.std),
            "reconstruction": from_unit(img_lci, self.mean, self.std)}
