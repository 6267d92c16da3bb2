"""A Flax linen ResNet equal to torchvision's (`torchvision.models.resnet{18,34,50,101,152}`).

The same network as torchvision.models.resnet.ResNet with its defaults (groups=1,
width_per_group=64, no dilation): a 7x7/2 convolution (no bias), BatchNorm and ReLU stem, a
3x3/2 max-pool with padding 1, four stages of BasicBlocks (18, 34) or Bottlenecks (50, 101,
152), global average pooling and an optional fc head. Bottlenecks put the stride on their 3x3
convolution (torchvision's "ResNet v1.5"); a block's shortcut is a 1x1 convolution (no bias)
and BatchNorm when its stride is not 1 or its channel count changes. Convolutions pad
(k - 1) // 2 on every side, as PyTorch's `padding=` does (flax's 'SAME' pads stride-2
convolutions asymmetrically, so padding is explicit), and the max-pool pads with -inf as
PyTorch's does. Parameters, initialisation and running statistics follow torchvision:
convolutions kaiming_normal_(mode='fan_out', nonlinearity='relu'), BatchNorm scale 1 and bias
0 (0 for the last BatchNorm of each block with `zero_init_residual`), fc PyTorch's default
Linear init; parameter counts equal torchvision's (11,689,512 for resnet18 and 25,557,032 for
resnet50 with the 1000-class head; tests/test_resnet.py).

Options beyond torchvision, each off by default:
  stem='cifar'  a 3x3/1 convolution (padding 1) and no max-pool, the CIFAR variant SimCLR,
                MoCo's CIFAR demo and solo-learn build by replacing torchvision's conv1 and
                maxpool (total stride 8 instead of 32);
  width         multiplies every stage's channels, the stem included, as SimCLR's ResNet-50
                (2x), (4x) do (`width_multiplier` in google-research/simclr, also solo-learn's
                wide ResNets); torchvision's wide_resnet50_2 widens only the bottleneck's inner
                convolutions and is a different network;
  bn_groups     per-group batch statistics (see `BatchNorm`);
  conv_init     'torch': every convolution drawn as nn.Conv2d draws it when nothing
                re-initialises it, U(+-1/sqrt(fan_in)) (kuangliu-style CIFAR ResNets such as
                lemniscate.pytorch's); the default 'torchvision' is kaiming_normal_ fan_out;
  depth=10      one BasicBlock per stage (the same stem, stages and widths as resnet18 with
                half its blocks; no torchvision model): the tests' tiny ResNet, which keeps
                every stage, stride and BatchNorm of the family at half the compile time.

Layout is NHWC. `__call__(images, train=False)` returns the logits [B, num_classes] with a head
(num_classes > 0), else the last feature map [B, h, w, C], float32 either way (float64 for a
float64 model, which the tests use as an exact reference); each stage's
output is sown to 'intermediates' ('stage_outputs', four entries; 'stem_output' after the
stem) when that collection is mutable. `train=True` normalises with batch statistics and
updates the 'batch_stats' collection, which must then be mutable.
"""
from __future__ import annotations

import functools
import math
from typing import Any, Callable

import flax.linen as nn
import jax
import jax.numpy as jnp
import ml_collections

from mim_jax.models.vit import torch_default_uniform

Dtype = Any

# depth -> (block type, blocks per stage), as torchvision's resnet18 ... resnet152 (10: see above).
DEPTHS = {
    10: ("basic", (1, 1, 1, 1)),
    18: ("basic", (2, 2, 2, 2)),
    34: ("basic", (3, 4, 6, 3)),
    50: ("bottleneck", (3, 4, 6, 3)),
    101: ("bottleneck", (3, 4, 23, 3)),
    152: ("bottleneck", (3, 8, 36, 3)),
}
EXPANSION = {"basic": 1, "bottleneck": 4}
STEMS = {"imagenet": 32, "cifar": 8}     # stem -> total stride of the last feature map
POOLINGS = ("mean", "avg")               # both mean the global average pool

# torchvision's nn.init.kaiming_normal_(w, mode='fan_out', nonlinearity='relu'): N(0, 2 / fan_out)
# untruncated, fan_out = out_channels * kh * kw (jax's fan_out of an HWIO kernel).
conv_init = nn.initializers.variance_scaling(2.0, "fan_out", "normal")


def torch_conv_init(key, shape, dtype=jnp.float32):
  """nn.Conv2d's own reset_parameters (kaiming_uniform_ with a=sqrt(5)): U(+-1/sqrt(fan_in)),
  fan_in = kh * kw * in_channels of the HWIO kernel: the init of networks that build their
  convolutions without re-initialising them (e.g. lemniscate.pytorch's CIFAR ResNet)."""
  return torch_default_uniform(math.prod(shape[:-1]))(key, shape, dtype)


CONV_INITS = {"torchvision": conv_init, "torch": torch_conv_init}


def channels(width: float, base: int) -> int:
  """`base * width` as a channel count; ValueError unless it is a whole positive number."""
  c = base * width
  if c <= 0 or c != int(c):
    raise ValueError(f"width={width} gives {c} channels for a {base}-channel layer: use a width "
                     f"that makes 64 * width a positive whole number")
  return int(c)


# ---------------------------------------------------------------------------------------------
# Layers.

class BatchNorm(nn.Module):
  """torch.nn.BatchNorm2d over the last (channel) axis, with PyTorch's running statistics.

  Written here rather than using flax's nn.BatchNorm because flax updates the running variance
  with the biased batch variance, torch with the unbiased one (and flax has no per-group
  statistics). Training mode (`train=True`) normalises with the batch mean and biased variance
  over all axes but the last, `(x - mean) / sqrt(var + epsilon) * scale + bias`, and updates
  'batch_stats' `running_mean` / `running_var` as torch does with `momentum`:
  new = (1 - momentum) * old + momentum * batch, the variance term being the unbiased
  n / (n - 1) * var (n values per channel). Evaluation mode normalises with the running
  statistics. Statistics, running statistics and the normalisation are float32 whatever
  `dtype` (the output's) is (float64 when the input or `param_dtype` is float64).
  The running statistics are not updated while the module is initialised.

  The batch statistics are over the whole batch axis: under `jax.jit` with the batch sharded
  over devices that is the global batch (SyncBatchNorm; SimCLR's global BN). With
  `groups` = G > 1 the batch is split into G consecutive groups of B / G examples, each
  normalised by its own statistics: per-device BatchNorm when the batch is sharded
  contiguously over G devices (group g = device g), as MoCo's shuffling BN needs. The running
  statistics then move towards the mean over groups of the per-group mean and unbiased
  variance; torch DistributedDataParallel would instead keep rank 0's running statistics
  (broadcast from rank 0 at each forward), i.e. group 0's alone.
  """
  momentum: float = 0.1
  epsilon: float = 1e-5
  groups: int = 1
  scale_init: Callable = nn.initializers.ones
  # affine=False (torch) is use_scale=use_bias=False; TF's center=False is use_bias=False.
  use_scale: bool = True
  use_bias: bool = True
  dtype: Dtype = jnp.float32
  param_dtype: Dtype = jnp.float32

  @nn.compact
  def __call__(self, x: jax.Array, train: bool = False) -> jax.Array:
    c = x.shape[-1]
    stats_dtype = jnp.promote_types(self.param_dtype, jnp.float32)
    running_mean = self.variable("batch_stats", "running_mean", jnp.zeros, (c,), stats_dtype)
    running_var = self.variable("batch_stats", "running_var", jnp.ones, (c,), stats_dtype)
    xf = x.astype(jnp.promote_types(x.dtype, jnp.float32))
    if train:
      b, g = x.shape[0], self.groups
      if b % g:
        raise ValueError(f"BatchNorm groups={g} does not divide the batch of {b}: use a batch "
                         f"size divisible by model.bn_groups")
      xg = xf.reshape(g, b // g, *x.shape[1:])
      axes = tuple(range(1, xg.ndim - 1))
      n = math.prod(xg.shape[1:-1])
      if n < 2:
        raise ValueError(f"BatchNorm needs more than 1 value per channel in training mode, got "
                         f"{n} (batch {b}, groups {g}, input {tuple(x.shape)}): use a larger batch")
      mean = xg.mean(axes, keepdims=True)
      var = jnp.square(xg - mean).mean(axes, keepdims=True)          # biased, two-pass
      y = ((xg - mean) * jax.lax.rsqrt(var + self.epsilon)).reshape(x.shape)
      if not self.is_initializing():
        m = self.momentum
        batch_mean = mean.reshape(g, c).mean(0)
        batch_var = var.reshape(g, c).mean(0) * (n / (n - 1))       # unbiased, as torch
        running_mean.value = (1 - m) * running_mean.value + m * batch_mean
        running_var.value = (1 - m) * running_var.value + m * batch_var
    else:
      y = (xf - running_mean.value) * jax.lax.rsqrt(running_var.value + self.epsilon)
    if self.use_scale:
      y = y * self.param("scale", self.scale_init, (c,), self.param_dtype).astype(xf.dtype)
    if self.use_bias:
      y = y + self.param("bias", nn.initializers.zeros, (c,), self.param_dtype).astype(xf.dtype)
    return y.astype(self.dtype)


def conv(features: int, kernel: int, stride: int, name: str, dtype: Dtype,
         param_dtype: Dtype, init: str = "torchvision") -> nn.Conv:
  """torch's nn.Conv2d(k, stride, padding=(k - 1) // 2, bias=False): symmetric padding; `init`
  a CONV_INITS key."""
  p = (kernel - 1) // 2
  return nn.Conv(features, (kernel, kernel), (stride, stride), padding=((p, p), (p, p)),
                 use_bias=False, kernel_init=CONV_INITS[init], dtype=dtype,
                 param_dtype=param_dtype, name=name)


class Block(nn.Module):
  """torchvision's BasicBlock ('basic': 3x3, 3x3) or Bottleneck ('bottleneck': 1x1, 3x3 with
  the stride, 1x1 to 4 * planes), ReLU after the residual sum; the shortcut is
  `downsample_conv` (1x1, stride) + `downsample_bn` when the stride is not 1 or the channel
  count changes (torchvision's `downsample.0` / `downsample.1`)."""
  kind: str
  planes: int
  stride: int = 1
  zero_init_residual: bool = False
  norm: Callable = BatchNorm
  dtype: Dtype = jnp.float32
  param_dtype: Dtype = jnp.float32
  conv_init: str = "torchvision"

  @nn.compact
  def __call__(self, x: jax.Array, train: bool = False) -> jax.Array:
    cv = functools.partial(conv, dtype=self.dtype, param_dtype=self.param_dtype,
                           init=self.conv_init)
    last_scale = nn.initializers.zeros if self.zero_init_residual else nn.initializers.ones
    out_features = self.planes * EXPANSION[self.kind]
    if self.kind == "basic":
      y = nn.relu(self.norm(name="bn1")(cv(self.planes, 3, self.stride, "conv1")(x), train))
      y = self.norm(name="bn2", scale_init=last_scale)(cv(self.planes, 3, 1, "conv2")(y), train)
    else:
      y = nn.relu(self.norm(name="bn1")(cv(self.planes, 1, 1, "conv1")(x), train))
      y = nn.relu(self.norm(name="bn2")(cv(self.planes, 3, self.stride, "conv2")(y), train))
      y = self.norm(name="bn3", scale_init=last_scale)(cv(out_features, 1, 1, "conv3")(y), train)
    identity = x
    if self.stride != 1 or x.shape[-1] != out_features:
      identity = self.norm(name="downsample_bn")(
          cv(out_features, 1, self.stride, "downsample_conv")(x), train)
    return nn.relu(y + identity)


class Stage(nn.Module):
  """torchvision's `layerK`: `blocks` Blocks named block0, block1, ..., the first with the
  stride."""
  kind: str
  planes: int
  blocks: int
  stride: int
  zero_init_residual: bool = False
  norm: Callable = BatchNorm
  dtype: Dtype = jnp.float32
  param_dtype: Dtype = jnp.float32
  conv_init: str = "torchvision"

  @nn.compact
  def __call__(self, x: jax.Array, train: bool = False) -> jax.Array:
    for j in range(self.blocks):
      x = Block(self.kind, self.planes, self.stride if j == 0 else 1, self.zero_init_residual,
                self.norm, self.dtype, self.param_dtype, self.conv_init,
                name=f"block{j}")(x, train)
    return x


class ResNet(nn.Module):
  """torchvision's ResNet (see the module docstring); parameter tree:
  conv1, bn1, layer1 ... layer4 / blockJ / conv1, bn1, ..., downsample_conv, downsample_bn,
  and fc (kernel [C, num_classes], bias) when num_classes > 0.

  `__call__(images [B, H, W, 3], train=False, features_only=False)`: the logits
  [B, num_classes] when the model has a head and not `features_only`, else the last feature
  map [B, h, w, C]; float32 (float64 for a float64 model). `features_only` skips the head
  (its parameters are then not needed), so `outputs` reads the pre-logits features in the
  same forward pass.
  """
  depth: int = 50
  width: float = 1
  stem: str = "imagenet"
  zero_init_residual: bool = False
  num_classes: int = 0
  bn_groups: int = 1
  bn_momentum: float = 0.1
  bn_eps: float = 1e-5
  dtype: Dtype = jnp.float32
  param_dtype: Dtype = jnp.float32
  conv_init: str = "torchvision"

  @property
  def stride(self) -> int:
    """Input pixels per position of the last feature map."""
    return STEMS[self.stem]

  @property
  def stage_widths(self) -> tuple[int, ...]:
    """The output channels of layer1 ... layer4."""
    kind = DEPTHS[self.depth][0]
    return tuple(channels(self.width, 64 * 2 ** i) * EXPANSION[kind] for i in range(4))

  @property
  def num_features(self) -> int:
    return self.stage_widths[-1]

  @nn.compact
  def __call__(self, images: jax.Array, train: bool = False,
               features_only: bool = False) -> jax.Array:
    if self.depth not in DEPTHS:
      raise ValueError(f"ResNet depth={self.depth!r}: use one of {', '.join(map(str, DEPTHS))}")
    if self.stem not in STEMS:
      raise ValueError(f"ResNet stem={self.stem!r}: use 'imagenet' or 'cifar'")
    if self.conv_init not in CONV_INITS:
      raise ValueError(f"ResNet conv_init={self.conv_init!r}: use one of {', '.join(CONV_INITS)}")
    kind, blocks = DEPTHS[self.depth]
    norm = functools.partial(BatchNorm, momentum=self.bn_momentum, epsilon=self.bn_eps,
                             groups=self.bn_groups, dtype=self.dtype,
                             param_dtype=self.param_dtype)
    record = self.is_mutable_collection("intermediates")
    x = images.astype(self.dtype)
    c0 = channels(self.width, 64)
    if self.stem == "imagenet":
      x = conv(c0, 7, 2, "conv1", self.dtype, self.param_dtype, self.conv_init)(x)
      x = nn.relu(norm(name="bn1")(x, train))
      # torch's MaxPool2d(3, 2, padding=1): reduce_window pads with the -inf init value.
      x = nn.max_pool(x, (3, 3), strides=(2, 2), padding=((1, 1), (1, 1)))
    else:
      x = conv(c0, 3, 1, "conv1", self.dtype, self.param_dtype, self.conv_init)(x)
      x = nn.relu(norm(name="bn1")(x, train))
    if record:
      self.sow("intermediates", "stem_output", x)
    for i in range(4):
      x = Stage(kind, channels(self.width, 64 * 2 ** i), blocks[i], 1 if i == 0 else 2,
                self.zero_init_residual, norm, self.dtype, self.param_dtype, self.conv_init,
                name=f"layer{i + 1}")(x, train)
      if record:
        self.sow("intermediates", "stage_outputs", x)
    x = x.astype(jnp.promote_types(x.dtype, jnp.float32))
    if features_only or not self.num_classes:
      return x
    pooled = x.mean(axis=(1, 2))
    fc_init = torch_default_uniform(pooled.shape[-1])
    logits = nn.Dense(self.num_classes, kernel_init=fc_init, bias_init=fc_init, dtype=self.dtype,
                      param_dtype=self.param_dtype, name="fc")(pooled.astype(self.dtype))
    return logits.astype(x.dtype)


# ---------------------------------------------------------------------------------------------
# The models registry's contract (mim_jax/models/__init__.py).

# width is a float so that a command-line override such as model.width=0.5 fits its type.
DEFAULTS = dict(name="resnet", depth=50, width=1.0, stem="imagenet", zero_init_residual=False,
                num_classes=0, bn_groups=1, bn_momentum=0.1, bn_eps=1e-5, dtype="float32",
                param_dtype="float32", conv_init="torchvision")

EXECUTION_OPTIONS = ("dtype",)


def default_config(**kw) -> ml_collections.ConfigDict:
  """`config.model` of a ResNet: DEFAULTS (a torchvision ResNet-50 without head) updated by
  `kw`; ValueError for a key that is not a ResNet key."""
  cfg = dict(DEFAULTS)
  for k, v in kw.items():
    if k not in DEFAULTS:
      raise ValueError(f"config.model.{k}: not a ResNet key; use {', '.join(DEFAULTS)}")
    cfg[k] = v
  return ml_collections.ConfigDict(cfg)


def check_config(model_cfg) -> None:
  """ValueError (one line naming the allowed values) for a key that is not a ResNet key or a
  bad depth, stem, width, num_classes, bn_groups, bn_momentum, bn_eps or dtype."""
  unknown = [k for k in model_cfg.keys() if k not in DEFAULTS]
  if unknown:
    raise ValueError(f"config.model.{unknown[0]}: not a ResNet key; use {', '.join(DEFAULTS)}")
  get = lambda k: model_cfg.get(k, DEFAULTS[k])  # noqa: E731
  if get("depth") not in DEPTHS:
    raise ValueError(f"config.model.depth={get('depth')!r}: use one of "
                     f"{', '.join(map(str, DEPTHS))}")
  if get("stem") not in STEMS:
    raise ValueError(f"config.model.stem={get('stem')!r}: use 'imagenet' or 'cifar'")
  width = get("width")
  if isinstance(width, bool) or not isinstance(width, (int, float)) or width <= 0:
    raise ValueError(f"config.model.width={width!r}: use a number > 0 (1 = torchvision)")
  channels(width, 64)
  for key, low in (("num_classes", 0), ("bn_groups", 1)):
    v = get(key)
    if isinstance(v, bool) or not isinstance(v, int) or v < low:
      raise ValueError(f"config.model.{key}={v!r}: use an integer >= {low}")
  if not 0.0 <= get("bn_momentum") <= 1.0:
    raise ValueError(f"config.model.bn_momentum={get('bn_momentum')!r}: use a value in [0, 1] "
                     f"(torch's momentum: 0.1)")
  if get("conv_init") not in CONV_INITS:
    raise ValueError(f"config.model.conv_init={get('conv_init')!r}: use 'torchvision' "
                     "(kaiming_normal_ fan_out) or 'torch' (nn.Conv2d's own U(+-1/sqrt(fan_in)))")
  if not get("bn_eps") > 0:
    raise ValueError(f"config.model.bn_eps={get('bn_eps')!r}: use a value > 0 (torch's: 1e-5)")
  for key in ("dtype", "param_dtype"):
    if get(key) not in ("float32", "bfloat16", "float16"):
      raise ValueError(f"config.model.{key}={get(key)!r}: use 'float32', 'bfloat16' or 'float16'")


def summary(model_cfg, image_size: int) -> str:
  """'ResNet-18, width 1, cifar stem, 32 px' (the run header)."""
  return (f"ResNet-{model_cfg.get('depth', 50)}, width {model_cfg.get('width', 1)}, "
          f"{model_cfg.get('stem', 'imagenet')} stem, {image_size} px")


def from_config(model_cfg, image_size: int = 224, **overrides) -> ResNet:
  """The ResNet `config.model` describes (`models.build` with model.name='resnet'); the keys are
  DEFAULTS' (`name` is ignored), anything else is a ValueError. `image_size` is unused (a
  ResNet takes any input size); `overrides` replace ResNet fields."""
  check_config(model_cfg)
  get = lambda k: model_cfg.get(k, DEFAULTS[k])  # noqa: E731
  kw = dict(depth=get("depth"), width=get("width"), stem=get("stem"),
            zero_init_residual=bool(get("zero_init_residual")), num_classes=get("num_classes"),
            bn_groups=get("bn_groups"), bn_momentum=float(get("bn_momentum")),
            bn_eps=float(get("bn_eps")), dtype=jnp.dtype(get("dtype")),
            param_dtype=jnp.dtype(get("param_dtype")), conv_init=str(get("conv_init")))
  bad = [k for k in overrides if k not in kw]
  if bad:
    raise ValueError(f"a ResNet has no option {bad[0]!r} (a ViT-only method switch?); its "
                     f"fields are {', '.join(kw)}")
  kw.update(overrides)
  return ResNet(**kw)


def global_pool(feature_map: jax.Array) -> jax.Array:
  """torch's AdaptiveAvgPool2d((1, 1)) + flatten: [B, h, w, C] -> [B, C] float32."""
  return feature_map.astype(jnp.float32).mean(axis=(1, 2))


def outputs(model: ResNet, variables, images, *, pooling: str, layers: bool = False) -> dict:
  """The evaluation-mode named outputs of `model` (the contract of `mim_jax.models`), from one
  forward pass with the running statistics and without the head: 'tokens' (the last feature
  map, row-major, [B, h*w, C]), 'pooled' (its global average pool, the pre-logits feature even
  when the model has a head; `pooling` 'mean' or 'avg'), 'stride' (32, or 8 with the CIFAR
  stem), 'grid' (h, w), and with `layers` the global average pool of each stage's output,
  layer1 first, the last being 'pooled'."""
  _check_pooling(pooling)
  if layers:
    fmap, state = model.apply(variables, images, features_only=True, mutable=["intermediates"])
    stages = list(state["intermediates"]["stage_outputs"])
  else:
    fmap = model.apply(variables, images, features_only=True)
  out = _named(model, fmap)
  if layers:
    out["layers"] = [global_pool(s) for s in stages[:-1]] + [out["pooled"]]
  return out


def _check_pooling(pooling: str) -> None:
  if pooling not in POOLINGS:
    raise ValueError(f"pooling={pooling!r}: a ResNet pools with 'mean' (the global average pool)")


def _named(model: ResNet, fmap: jax.Array) -> dict:
  """'tokens', 'pooled', 'stride', 'grid' of the last feature map [B, h, w, C]."""
  b, h, w, c = fmap.shape
  return {"tokens": fmap.reshape(b, h * w, c).astype(jnp.float32), "pooled": global_pool(fmap),
          "stride": model.stride, "grid": (h, w)}


def forward(model: ResNet, variables, images, *, train: bool, rng=None,
            pooling: str = "mean") -> tuple[dict, dict]:
  """The training-or-evaluation forward of the registry contract: ('pooled' [B, C], 'tokens',
  'stride', 'grid' as `outputs`; the BatchNorm statistics updated by a training-mode pass,
  {'batch_stats': ...}, or {} in evaluation). `rng` is unused (no dropout)."""
  del rng
  _check_pooling(pooling)
  if train:
    fmap, new = model.apply(variables, images, train=True, features_only=True,
                            mutable=["batch_stats"])
  else:
    fmap, new = model.apply(variables, images, features_only=True), {}
  return _named(model, fmap), dict(new)


def param_count(model: ResNet, image_size: int = 32) -> int:
  """The number of parameters (not running statistics) of `model`, without allocating them."""
  shapes = jax.eval_shape(lambda: model.init(jax.random.PRNGKey(0),
                                             jnp.zeros((1, image_size, image_size, 3))))
  return sum(math.prod(x.shape) for x in jax.tree.leaves(shapes["params"]))
