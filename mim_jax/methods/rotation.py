"""RotNet: unsupervised representation learning by predicting image rotations (Gidaris, Singh &
Komodakis, ICLR 2018), exact to gidariss/FeatureLearningRotNet.

  * dataloader.py (unsupervised mode): every image of the batch is given in its four rotations,
    0, 90, 180 and 270 degrees counter-clockwise (`rotate_img`: flipud(transpose), fliplr(flipud),
    transpose(flipud)), image-major: the batch of B images becomes 4B, row 4 b + r the image b
    turned r quarter turns, label r (`rotate_all`, `rotation_labels`). The rotations are taken
    after the augmentation, so the four copies share one crop and flip.
  * algorithms/ClassificationModel.py: the 4-way cross-entropy, averaged over the 4B copies
    (`rotation_loss`); 'accuracy' is its prec1.
  * The head is the network's last block (`RotationHead`):
      NetworkInNetwork.py (`model.name='nin'`): global average pool + Linear(192, 4);
      AlexNet.py (`'alexnet'`): Flatten(pool5), Linear(256*6*6 -> 4096, no bias), BatchNorm1d,
        ReLU, Linear(4096 -> 4096, no bias), BatchNorm1d, ReLU, Linear(4096 -> 4) (`fc_dim`
        sets 4096; the flatten is of the channels-last map: the same layer on a permuted input);
      any other backbone: the pooled features + Linear(4).
    Initialisation: PyTorch's defaults (U(+-1/sqrt(fan_in)) for Linear weights and biases,
    BatchNorm scale 1 / bias 0): the official training never calls NetworkInNetwork's
    `weight_initialization` (which would zero the Linear bias), and AlexNet.py has none.
    The head's BatchNorm statistics live in 'batch_stats' under 'head'.
  * Weight decay on every parameter (torch SGD's weight_decay; `decay_mask`).
  * The CIFAR augmentation (dataloader.py GenericDataset 'cifar10': RandomCrop(32, padding=4) +
    RandomHorizontalFlip) is `rotation.crop='pad'` (`random_crop_pad_flip`, on the device for
    in-memory data); 'config' uses config.input.aug (ImageNet: RandomSizedCrop(224) + flip,
    crop_scale (0.08, 1)).
"""
from __future__ import annotations

from typing import Optional

import flax.linen as nn
import jax
import jax.numpy as jnp
import optax

from mim_jax import models
from mim_jax.data import augment
from mim_jax.data import preprocess as data_preprocess
from mim_jax.methods.base import Method
from mim_jax.models.resnet import BatchNorm
from mim_jax.models.vit import torch_default_uniform

NUM_ROTATIONS = 4
CROPS = ("pad", "config")
HEADS = ("auto", "fc", "linear")


# -- pure functions ---------------------------------------------------------------------------
def rotate_all(images: jax.Array) -> jax.Array:
  """[B, H, W, C] (square) -> [4B, H, W, C]: row 4 b + r is image b rotated r x 90 degrees
  counter-clockwise (np.rot90(image, r); the official rotate_img)."""
  if images.shape[1] != images.shape[2]:
    raise ValueError(f"rotation needs square images, got {images.shape[1]}x{images.shape[2]}: "
                     f"set config.input.image_size")
  turns = [jnp.rot90(images, r, axes=(1, 2)) for r in range(NUM_ROTATIONS)]
  return jnp.stack(turns, axis=1).reshape((-1,) + images.shape[1:])


def rotation_labels(batch: int) -> jax.Array:
  """[4B] int32: 0, 1, 2, 3 for each image (the official collate's labels)."""
  return jnp.tile(jnp.arange(NUM_ROTATIONS, dtype=jnp.int32), batch)


def rotation_loss(logits: jax.Array, labels: jax.Array,
                  weights: Optional[jax.Array] = None) -> jax.Array:
  """nn.CrossEntropyLoss: the mean over the 4B copies of -log softmax(logits)[label]; with
  `weights` [4B] (FeatureDecoupling's PU weights), sum(weights * ce) / 4B."""
  ce = optax.softmax_cross_entropy_with_integer_labels(logits.astype(jnp.float32), labels)
  if weights is not None:
    ce = ce * weights
  return jnp.sum(ce) / ce.shape[0]


def random_crop_pad_flip(rng: jax.Array, images: jax.Array, pad: int = 4,
                         hflip: bool = True) -> jax.Array:
  """torchvision RandomCrop(size, padding=pad) (zero fill) + RandomHorizontalFlip on float
  levels [B, H, W, C]: each image padded by `pad` zeros, cut at a uniform offset in
  [0, 2 pad]^2 back to H x W, then mirrored with probability 1/2."""
  b, h, w, c = images.shape
  k_y, k_x, k_f = jax.random.split(rng, 3)
  ys = jax.random.randint(k_y, (b,), 0, 2 * pad + 1)
  xs = jax.random.randint(k_x, (b,), 0, 2 * pad + 1)
  padded = jnp.pad(images, ((0, 0), (pad, pad), (pad, pad), (0, 0)))
  cut = jax.vmap(lambda im, y, x: jax.lax.dynamic_slice(im, (y, x, 0), (h, w, c)))(padded, ys, xs)
  if not hflip:
    return cut
  return augment.apply_hflip(cut, jax.random.bernoulli(k_f, 0.5, (b,)))


def flatten_map(out: dict) -> jax.Array:
  """The backbone's last map ('tokens' [B, h w, C]) flattened to [B, h w C] (AlexNet's pool5)."""
  t = out["tokens"]
  return t.reshape(t.shape[0], -1)


# -- heads ------------------------------------------------------------------------------------
class FCBlock(nn.Module):
  """AlexNet's fc_block: (Linear no bias -> BatchNorm1d -> ReLU) x 2, `dim` wide."""
  dim: int = 4096
  bn_momentum: float = 0.1

  @nn.compact
  def __call__(self, x, train: bool = False):
    for i in range(2):
      x = nn.Dense(self.dim, use_bias=False, kernel_init=torch_default_uniform(x.shape[-1]),
                   name=f"fc{i + 6}")(x)
      x = nn.relu(BatchNorm(momentum=self.bn_momentum, name=f"bn{i + 6}")(x, train))
    return x


def torch_dense(features: int, fan_in: int, name: Optional[str] = None,
                use_bias: bool = True) -> nn.Dense:
  """nn.Linear with PyTorch's default initialisation (weight and bias U(+-1/sqrt(fan_in)))."""
  init = torch_default_uniform(fan_in)
  return nn.Dense(features, use_bias=use_bias, kernel_init=init, bias_init=init, name=name)


class RotationHead(nn.Module):
  """`fc`: FCBlock then Linear(4) on the flattened map; else Linear(4) on the pooled features."""
  fc: bool = False
  fc_dim: int = 4096
  bn_momentum: float = 0.1

  @nn.compact
  def __call__(self, x, train: bool = False):
    if self.fc:
      x = FCBlock(self.fc_dim, self.bn_momentum, name="fc_block")(x, train)
    return torch_dense(NUM_ROTATIONS, x.shape[-1], name="classifier")(x)


def uses_fc(head: str, model_name: str) -> bool:
  """Whether the head has AlexNet's fc block: 'auto' -> on an AlexNet."""
  if head not in HEADS:
    raise ValueError(f"rotation.head={head!r}: use one of {', '.join(HEADS)}")
  return head == "fc" or (head == "auto" and model_name == "alexnet")


def preprocess_views(rng, images, input_cfg, on_device_aug: bool, crop: str):
  """uint8 [B, H, W, 3] -> normalised float [B, S, S, 3]: 'pad' is the official CIFAR
  RandomCrop(S, padding=4) + flip (in-memory data; streamed data arrives cropped by the host
  and is only normalised), 'config' the default random resized crop of config.input.aug."""
  if crop not in CROPS:
    raise ValueError(f"crop={crop!r}: use 'pad' (RandomCrop with padding 4 + flip) or 'config'")
  if crop == "config" or not on_device_aug:
    return data_preprocess.preprocess(rng, images, input_cfg, on_device_aug)
  x = data_preprocess.crop_or_resize(rng, images, input_cfg, False, train=False)
  hflip = bool(input_cfg.aug.get("hflip", True))
  return augment.normalize(random_crop_pad_flip(rng, x, 4, hflip), input_cfg.mean, input_cfg.std)


class Rotation(Method):
  name = "rotation"

  def __init__(self, config):
    super().__init__(config)
    self.c = config.get("rotation", None) or {}
    self.model_name = models.name_of(config.model)
    self.fc = uses_fc(str(self.c.get("head", "auto")), self.model_name)
    self.head = RotationHead(fc=self.fc, fc_dim=int(self.c.get("fc_dim", 4096)),
                             bn_momentum=float(self.c.get("bn_momentum", 0.1)))
    if str(self.c.get("crop", "pad")) not in CROPS:
      raise ValueError(f"rotation.crop={self.c.get('crop')!r}: use 'pad' or 'config'")

  def head_input(self, out: dict) -> jax.Array:
    return flatten_map(out) if self.fc else out["pooled"]

  def init_variables(self, rng, images):
    k_enc, k_head = jax.random.split(rng)
    enc = self.encoder.init(k_enc, images)
    out = models.outputs(self.encoder, enc, images, pooling=self.pooling)
    head = self.head.init(k_head, self.head_input(out))
    return self.nest_modules(encoder=enc, head=head)

  def preprocess(self, rng, images, input_cfg, on_device_aug):
    return preprocess_views(rng, images, input_cfg, on_device_aug, str(self.c.get("crop", "pad")))

  def decay_mask(self, params):
    """Every parameter (torch SGD's weight_decay, as the official optimiser)."""
    return jax.tree.map(lambda _: True, params)

  def logits(self, params, state, images, rng):
    """(logits [4B, 4], labels [4B], new collections) of the batch's four rotations."""
    x = rotate_all(images.astype(jnp.float32))
    out, new = models.forward(self.encoder, self.variables(params, state), x, train=True,
                              rng=rng, pooling=self.pooling)
    head_vars = self.variables(params, state, "head")
    logits, head_new = self.head.apply(head_vars, self.head_input(out), train=True,
                                       mutable=["batch_stats"])
    return (logits, rotation_labels(images.shape[0]),
            self.nest_collections(encoder=new, head=head_new))

  def loss(self, params, state, images, rng, step):
    logits, labels, cols = self.logits(params, state, images, rng)
    loss = rotation_loss(logits, labels)
    aux = {"accuracy": jnp.mean(jnp.argmax(logits, -1) == labels)}
    if cols:
      aux["collections"] = cols
    return loss, aux
