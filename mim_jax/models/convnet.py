"""The plain ConvNets of the pretext-task papers: AlexNet with BatchNorm and Network-in-Network.

`config.model.name = 'alexnet'`:
  AlexNet as Gidaris et al. (gidariss/FeatureLearningRotNet, architectures/AlexNet.py) and
  Noroozi & Favaro train it: five convolutions, each followed by BatchNorm and ReLU (the BN
  variant; no LRN, no grouped convolutions), max-pools (3, stride 2) after conv1, conv2 and
  conv5. `widths`:
    'torch'  64, 192, 384, 256, 256 (torchvision's / RotNet's AlexNet);
    'caffe'  96, 256, 384, 384, 256 (Krizhevsky's CaffeNet, as the jigsaw, colorization and
             split-brain papers use it).
  `stem`:
    'imagenet'  conv1 11x11, stride `conv1_stride` (4; the jigsaw network uses 2 on its 64 px
                tiles), padding 2; conv2 5x5 padding 2; conv3-5 3x3 padding 1; pools without
                padding (the 224 px input gives conv1 55x55, conv5 13x13, pool5 6x6);
    'cifar'     the CIFAR-sized variant of the CPU presets: conv1 5x5 stride 1 padding 2 and
                pools 3/2 with padding 1 (32 px: conv1 32x32, conv2 16x16, conv3-5 8x8,
                pool5 4x4). Not from a paper: a stride-4 11x11 conv on 32 px images leaves
                conv5 at 1x1.
  The fc6/fc7 block (Linear 256*6*6 -> 4096 without bias, BN1d, ReLU, twice) belongs to each
  method's head (the jigsaw network's fc6 sees one tile, RotNet's classifier the whole image),
  so the backbone stops at pool5 (`pool5=False`: at conv5, for fully convolutional heads).

`config.model.name = 'nin'`:
  RotNet's Network-in-Network for CIFAR (architectures/NetworkInNetwork.py): `num_stages`
  blocks of three BasicBlocks (Conv no bias, BN, ReLU; padding (k - 1) // 2):
    block1  192 5x5, 160 1x1, 96 1x1, MaxPool(3, 2, padding 1)
    block2  192 5x5, 192 1x1, 192 1x1, AvgPool(3, 2, padding 1, the padding counted)
    block3  192 3x3, 192 1x1, 192 1x1 (+ AvgPool(3, 2, 1) with use_avg_on_conv3 and more
            than 3 stages)
    block4+ 192 3x3, 192 1x1, 192 1x1
  RotNet's CIFAR default is 4 stages, use_avg_on_conv3=False; the classifier (global average
  pool + Linear) is the method's head.

Both: `width` multiplies every channel count (CPU presets); initialisation is PyTorch's
default, as RotNet's: its NIN defines `weight_initialization` (N(0, 2 / (k k out))) but never
calls it, and its AlexNet has none, so conv weights and biases are U(-1/sqrt(fan_in),
1/sqrt(fan_in)) (kaiming_uniform_ with a = sqrt(5)), BatchNorm scale 1 and bias 0 (PyTorch
>= 1.2; the 2018 code ran on a PyTorch whose BatchNorm drew its scale from U(0, 1)). BatchNorm
is `resnet.BatchNorm` (torch's running statistics).

The registry contract (mim_jax/models/__init__.py): `__call__` returns the last feature map
[B, h, w, C] float32; `outputs(..., layers=True)` gives one entry per convolutional layer
(AlexNet conv1..conv5 after ReLU; NIN each block's output) average-pooled to about
`probe_dims` values (9216: the split-brain per-layer protocol of Zhang et al. 2017, whose
AlexNet layers are pooled to 9600, 9216, 9600, 9600, 9216 values) and flattened, then the
global average pool of the last map ('pooled').
"""
from __future__ import annotations

import math
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import ml_collections
import numpy as np

from mim_jax.models.resnet import BatchNorm
from mim_jax.models.vit import torch_default_uniform

Dtype = Any

NAMES = ("alexnet", "nin")
ALEXNET_WIDTHS = {"torch": (64, 192, 384, 256, 256), "caffe": (96, 256, 384, 384, 256)}
ALEXNET_KERNELS = (11, 5, 3, 3, 3)
STEMS = ("imagenet", "cifar")
# NIN: per stage, (out channels, kernel) of its three BasicBlocks.
NIN_STAGES = (((192, 5), (160, 1), (96, 1)), ((192, 5), (192, 1), (192, 1)),
              ((192, 3), (192, 1), (192, 1)))
NIN_LATER_STAGE = ((192, 3), (192, 1), (192, 1))


def scaled(width: float, c: int) -> int:
  n = c * width
  if n < 1 or n != int(n):
    raise ValueError(f"width={width} gives {n} channels for a {c}-channel layer: use a width "
                     f"that makes every channel count a positive whole number")
  return int(n)


def max_pool(x: jax.Array, pad: int) -> jax.Array:
  """torch's MaxPool2d(3, 2, padding=pad) (reduce_window pads with -inf)."""
  return nn.max_pool(x, (3, 3), strides=(2, 2), padding=((pad, pad), (pad, pad)))


def avg_pool_include_pad(x: jax.Array) -> jax.Array:
  """torch's AvgPool2d(3, 2, padding=1) with count_include_pad=True: zero padding counted."""
  return nn.avg_pool(x, (3, 3), strides=(2, 2), padding=((1, 1), (1, 1)), count_include_pad=True)


def adaptive_avg_pool(x: jax.Array, size: int) -> jax.Array:
  """torch's AdaptiveAvgPool2d(size) on [B, H, W, C]: bin i spans floor(i H / s) ..
  ceil((i + 1) H / s)."""
  def bins(n):
    return [(i * n // size, -(-(i + 1) * n // size)) for i in range(size)]
  rows = [x[:, a:b].mean(axis=1) for a, b in bins(x.shape[1])]
  x = jnp.stack(rows, axis=1)
  cols = [x[:, :, a:b].mean(axis=2) for a, b in bins(x.shape[2])]
  return jnp.stack(cols, axis=2)


def probe_grid(channels: int, map_size: int, probe_dims: int) -> int:
  """The side s of the pooled grid for a layer of `channels`: round(sqrt(probe_dims /
  channels)), at least 1 and at most the map's side."""
  return int(min(max(1, round(math.sqrt(probe_dims / channels))), map_size))


def probe_features(fmap: jax.Array, probe_dims: int) -> jax.Array:
  """[B, h, w, C] -> [B, s * s * C] float32: the split-brain per-layer probe input."""
  s = probe_grid(fmap.shape[-1], min(fmap.shape[1], fmap.shape[2]), probe_dims)
  pooled = adaptive_avg_pool(fmap.astype(jnp.float32), s)
  return pooled.reshape(pooled.shape[0], -1)


class ConvBNReLU(nn.Module):
  features: int
  kernel: int
  stride: int = 1
  padding: int = 0
  use_bias: bool = False
  bn_momentum: float = 0.1
  dtype: Dtype = jnp.float32

  @nn.compact
  def __call__(self, x, train: bool = False):
    p = self.padding
    init = torch_default_uniform(x.shape[-1] * self.kernel * self.kernel)   # torch's Conv2d default
    x = nn.Conv(self.features, (self.kernel, self.kernel), (self.stride, self.stride),
                padding=((p, p), (p, p)), use_bias=self.use_bias, kernel_init=init,
                bias_init=init, dtype=self.dtype, name="conv")(x)
    return nn.relu(BatchNorm(momentum=self.bn_momentum, dtype=self.dtype, name="bn")(x, train))


class AlexNet(nn.Module):
  """See the module docstring; parameters conv1 .. conv5 / {conv, bn}. Sows each conv layer's
  output (after ReLU) to 'intermediates' / 'layer_outputs' when that collection is mutable."""
  widths: str = "torch"
  stem: str = "imagenet"
  conv1_stride: int = 4
  width: float = 1.0
  pool5: bool = True
  bn_momentum: float = 0.1
  probe_dims: int = 9216
  dtype: Dtype = jnp.float32

  @property
  def channels(self) -> tuple[int, ...]:
    return tuple(scaled(self.width, c) for c in ALEXNET_WIDTHS[self.widths])

  @property
  def num_features(self) -> int:
    return self.channels[-1]

  @property
  def stride(self) -> int:
    s = self.conv1_stride * 4 if self.stem == "imagenet" else 4
    return s * 2 if self.pool5 else s

  @nn.compact
  def __call__(self, images, train: bool = False):
    record = self.is_mutable_collection("intermediates")
    cifar = self.stem == "cifar"
    pool_pad = 1 if cifar else 0
    x = images.astype(self.dtype)
    for i, (c, k) in enumerate(zip(self.channels, ALEXNET_KERNELS)):
      stride = 1 if i or cifar else self.conv1_stride
      pad = 2 if (i == 0 or k == 5) else 1
      x = ConvBNReLU(c, 5 if cifar and i == 0 else k, stride, pad, use_bias=True,
                     bn_momentum=self.bn_momentum, dtype=self.dtype, name=f"conv{i + 1}")(x, train)
      if record:
        self.sow("intermediates", "layer_outputs", x)
      if i in (0, 1) or (i == 4 and self.pool5):
        x = max_pool(x, pool_pad)
    return x.astype(jnp.promote_types(x.dtype, jnp.float32))


class NIN(nn.Module):
  """See the module docstring; parameters block{s}_conv{j} / {conv, bn}. Sows each block's
  output to 'intermediates' / 'layer_outputs' when that collection is mutable."""
  num_stages: int = 4
  use_avg_on_conv3: bool = False
  width: float = 1.0
  bn_momentum: float = 0.1
  probe_dims: int = 9216
  dtype: Dtype = jnp.float32

  @property
  def num_features(self) -> int:
    return scaled(self.width, 192)

  @property
  def stride(self) -> int:
    return 8 if self.use_avg_on_conv3 and self.num_stages > 3 else 4

  @nn.compact
  def __call__(self, images, train: bool = False):
    record = self.is_mutable_collection("intermediates")
    x = images.astype(self.dtype)
    for s in range(self.num_stages):
      for j, (c, k) in enumerate(NIN_STAGES[s] if s < 3 else NIN_LATER_STAGE):
        x = ConvBNReLU(scaled(self.width, c), k, 1, (k - 1) // 2, bn_momentum=self.bn_momentum,
                       dtype=self.dtype, name=f"block{s + 1}_conv{j + 1}")(x, train)
      if s == 0:
        x = max_pool(x, 1)
      elif s == 1 or (s == 2 and self.use_avg_on_conv3 and self.num_stages > 3):
        x = avg_pool_include_pad(x)
      if record:
        self.sow("intermediates", "layer_outputs", x)
    return x.astype(jnp.promote_types(x.dtype, jnp.float32))


# ---------------------------------------------------------------------------------------------
# The models registry's contract (mim_jax/models/__init__.py).

DEFAULTS = {
    "alexnet": dict(name="alexnet", widths="torch", stem="imagenet", conv1_stride=4, width=1.0,
                    pool5=True, bn_momentum=0.1, probe_dims=9216, dtype="float32"),
    "nin": dict(name="nin", num_stages=4, use_avg_on_conv3=False, width=1.0, bn_momentum=0.1,
                probe_dims=9216, dtype="float32"),
}
EXECUTION_OPTIONS = ("dtype",)


def _name(model_cfg) -> str:
  return str(model_cfg.get("name", "alexnet"))


def default_config(name: str = "alexnet", **kw) -> ml_collections.ConfigDict:
  """`config.model` of an AlexNet or NIN: DEFAULTS[name] updated by `kw`."""
  cfg = ml_collections.ConfigDict(dict(DEFAULTS[name]))
  cfg.update(kw)
  check_config(cfg)
  return cfg


def check_config(model_cfg) -> None:
  """ValueError (one line naming the allowed values) for an unknown key or a bad value."""
  name = _name(model_cfg)
  if name not in DEFAULTS:
    raise ValueError(f"config.model.name={name!r}: convnet has {', '.join(DEFAULTS)}")
  defaults = DEFAULTS[name]
  unknown = [k for k in model_cfg.keys() if k not in defaults]
  if unknown:
    raise ValueError(f"config.model.{unknown[0]}: not a {name} key; use {', '.join(defaults)}")
  get = lambda k: model_cfg.get(k, defaults[k])  # noqa: E731
  width = get("width")
  if isinstance(width, bool) or not isinstance(width, (int, float)) or width <= 0:
    raise ValueError(f"config.model.width={width!r}: use a number > 0 (1 = the paper's widths)")
  if name == "alexnet":
    if get("widths") not in ALEXNET_WIDTHS:
      raise ValueError(f"config.model.widths={get('widths')!r}: use 'torch' or 'caffe'")
    if get("stem") not in STEMS:
      raise ValueError(f"config.model.stem={get('stem')!r}: use 'imagenet' or 'cifar'")
    for c in ALEXNET_WIDTHS[get("widths")]:
      scaled(width, c)
  else:
    if not isinstance(get("num_stages"), int) or not 3 <= get("num_stages") <= 5:
      raise ValueError(f"config.model.num_stages={get('num_stages')!r}: use 3, 4 or 5 "
                       f"(RotNet's CIFAR models)")
    for c in (192, 160, 96):
      scaled(width, c)
  if get("dtype") not in ("float32", "bfloat16", "float16"):
    raise ValueError(f"config.model.dtype={get('dtype')!r}: use 'float32', 'bfloat16' or 'float16'")
  if int(get("probe_dims")) < 1:
    raise ValueError(f"config.model.probe_dims={get('probe_dims')!r}: use a positive count "
                     f"(9216: the split-brain protocol)")


def summary(model_cfg, image_size: int) -> str:
  name = _name(model_cfg)
  if name == "alexnet":
    return (f"AlexNet (BN, {model_cfg.get('widths', 'torch')} widths), width "
            f"{model_cfg.get('width', 1.0)}, {model_cfg.get('stem', 'imagenet')} stem, {image_size} px")
  return f"NIN, {model_cfg.get('num_stages', 4)} stages, width {model_cfg.get('width', 1.0)}, {image_size} px"


def from_config(model_cfg, image_size: int = 224, **overrides):
  """The AlexNet or NIN `config.model` describes; `overrides` replace module fields."""
  del image_size
  check_config(model_cfg)
  name = _name(model_cfg)
  get = lambda k: model_cfg.get(k, DEFAULTS[name][k])  # noqa: E731
  common_kw = dict(width=float(get("width")), bn_momentum=float(get("bn_momentum")),
                   probe_dims=int(get("probe_dims")), dtype=jnp.dtype(get("dtype")))
  if name == "alexnet":
    kw = dict(widths=get("widths"), stem=get("stem"), conv1_stride=int(get("conv1_stride")),
              pool5=bool(get("pool5")), **common_kw)
    cls = AlexNet
  else:
    kw = dict(num_stages=int(get("num_stages")), use_avg_on_conv3=bool(get("use_avg_on_conv3")),
              **common_kw)
    cls = NIN
  bad = [k for k in overrides if k not in kw]
  if bad:
    raise ValueError(f"a {name} has no option {bad[0]!r}; its fields are {', '.join(kw)}")
  kw.update(overrides)
  return cls(**kw)


POOLINGS = ("mean", "avg")


def _check_pooling(pooling: str) -> None:
  if pooling not in POOLINGS:
    raise ValueError(f"pooling={pooling!r}: a ConvNet pools with 'mean' (the global average pool)")


def _named(model, fmap: jax.Array) -> dict:
  b, h, w, c = fmap.shape
  return {"tokens": fmap.reshape(b, h * w, c).astype(jnp.float32),
          "pooled": fmap.astype(jnp.float32).mean(axis=(1, 2)), "stride": model.stride,
          "grid": (h, w)}


def outputs(model, variables, images, *, pooling: str, layers: bool = False) -> dict:
  """Evaluation-mode named outputs (running statistics); with `layers`, each conv layer's
  (block's) output pooled to about probe_dims values, then 'pooled'."""
  _check_pooling(pooling)
  if layers:
    fmap, state = model.apply(variables, images, mutable=["intermediates"])
    maps = list(state["intermediates"]["layer_outputs"])
  else:
    fmap = model.apply(variables, images)
  out = _named(model, fmap)
  if layers:
    out["layers"] = [probe_features(m, model.probe_dims) for m in maps] + [out["pooled"]]
  return out


def forward(model, variables, images, *, train: bool, rng=None, pooling: str = "mean"):
  """(named outputs, {'batch_stats': ...} after a training pass or {})."""
  del rng
  _check_pooling(pooling)
  if train:
    fmap, new = model.apply(variables, images, train=True, mutable=["batch_stats"])
  else:
    fmap, new = model.apply(variables, images), {}
  return _named(model, fmap), dict(new)


def param_count(model, image_size: int = 32) -> int:
  shapes = jax.eval_shape(lambda: model.init(jax.random.PRNGKey(0),
                                             jnp.zeros((1, image_size, image_size, 3))))
  return sum(int(np.prod(x.shape)) for x in jax.tree.leaves(shapes["params"]))
