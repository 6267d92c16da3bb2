"""torchvision ResNet state dicts <-> mim_jax.models.resnet variables.

`torchvision_to_variables(sd)` reads a `torchvision.models.resnet{18,34,50,101,152}` state dict
(numpy arrays under torchvision's names; also one whose conv1 is the 3x3 CIFAR stem, as
solo-learn and SimCLR's CIFAR models build, or whose widths are all scaled by one multiplier)
into `{'params': ..., 'batch_stats': ...}` for `resnet.ResNet` and the `ResNetSpec` inferred
from the shapes: block type and counts (depth), conv1's channels / 64 (width), conv1's kernel
(stem) and fc's rows (num_classes, 0 without fc). `variables_to_torchvision` writes the same
names back, so torchvision's `load_state_dict(strict=True)` takes them.

Layouts: Conv2d weight [O, I, kh, kw] <-> flax Conv kernel [kh, kw, I, O]; Linear weight
[out, in] <-> Dense kernel [in, out]; BatchNorm weight / bias -> params scale / bias,
running_mean / running_var -> batch_stats (same arrays). `num_batches_tracked` is not read
(torch's update does not use it when momentum is set, as it is by default) and is written as 0.
"""
from __future__ import annotations

import dataclasses
import re
from typing import Any

import ml_collections
import numpy as np

from mim_jax.convert.names import ConversionError, fmt_keys, put_shaped, take_shaped
from mim_jax.convert.names import ShapedEntry as Entry
from mim_jax.models import resnet

PyTree = Any

BLOCKS_TO_DEPTH = {v: k for k, v in resnet.DEPTHS.items()}
STEM_KERNEL = {"imagenet": 7, "cifar": 3}


@dataclasses.dataclass(frozen=True)
class ResNetSpec:
  """What a ResNet's weights determine: resnet.ResNet's depth, width, stem, num_classes."""
  depth: int
  width: float = 1
  num_classes: int = 0
  stem: str = "imagenet"

  @property
  def kind(self) -> str:
    return resnet.DEPTHS[self.depth][0]

  def model_config(self, **kw) -> ml_collections.ConfigDict:
    """The `config.model` of this ResNet (resnet.default_config; `kw` sets other keys)."""
    return resnet.default_config(depth=self.depth, width=self.width, stem=self.stem,
                                 num_classes=self.num_classes, **kw)

  def build(self, **kw) -> resnet.ResNet:
    return resnet.ResNet(depth=self.depth, width=self.width, stem=self.stem,
                         num_classes=self.num_classes, **kw)


def _conv_bn(t_conv: str, t_bn: str, path: tuple, conv: str, bn: str, cin: int, cout: int,
             k: int) -> list[Entry]:
  return [Entry(f"{t_conv}.weight", ("params", *path, conv, "kernel"), "conv", (cout, cin, k, k)),
          Entry(f"{t_bn}.weight", ("params", *path, bn, "scale"), "same", (cout,)),
          Entry(f"{t_bn}.bias", ("params", *path, bn, "bias"), "same", (cout,)),
          Entry(f"{t_bn}.running_mean", ("batch_stats", *path, bn, "running_mean"), "same", (cout,)),
          Entry(f"{t_bn}.running_var", ("batch_stats", *path, bn, "running_var"), "same", (cout,))]


def entries(spec: ResNetSpec) -> list[Entry]:
  """Every torchvision key of the ResNet `spec` describes (bar num_batches_tracked), in
  torchvision's order, with its mim_jax path and torch shape."""
  kind, blocks = resnet.DEPTHS[spec.depth]
  exp = resnet.EXPANSION[kind]
  c0 = resnet.channels(spec.width, 64)
  out = _conv_bn("conv1", "bn1", (), "conv1", "bn1", 3, c0, STEM_KERNEL[spec.stem])
  cin = c0
  for i, n in enumerate(blocks):
    planes = resnet.channels(spec.width, 64 * 2 ** i)
    for j in range(n):
      t, m = f"layer{i + 1}.{j}", (f"layer{i + 1}", f"block{j}")
      if kind == "basic":
        convs = [(cin, planes, 3), (planes, planes, 3)]
      else:
        convs = [(cin, planes, 1), (planes, planes, 3), (planes, planes * exp, 1)]
      for c, (a, b, k) in enumerate(convs, 1):
        out += _conv_bn(f"{t}.conv{c}", f"{t}.bn{c}", m, f"conv{c}", f"bn{c}", a, b, k)
      if j == 0 and (i > 0 or cin != planes * exp):
        out += _conv_bn(f"{t}.downsample.0", f"{t}.downsample.1", m, "downsample_conv",
                        "downsample_bn", cin, planes * exp, 1)
      cin = planes * exp
  if spec.num_classes:
    out += [Entry("fc.weight", ("params", "fc", "kernel"), "linear", (spec.num_classes, cin)),
            Entry("fc.bias", ("params", "fc", "bias"), "same", (spec.num_classes,))]
  return out


def _depth(kind: str, counts: tuple[int, ...], what: str) -> int:
  depth = BLOCKS_TO_DEPTH.get((kind, counts))
  if depth is None:
    known = ", ".join(f"{d}: {k} {list(c)}" for d, (k, c) in resnet.DEPTHS.items())
    raise ConversionError(f"{what}: {kind} blocks per stage {list(counts)} are no torchvision "
                          f"ResNet's ({known})")
  return depth


def _stem(k: int, what: str) -> str:
  for stem, kernel in STEM_KERNEL.items():
    if kernel == k:
      return stem
  raise ConversionError(f"{what}: a {k}x{k} conv1 is neither the ImageNet stem (7x7) nor the "
                        f"CIFAR one (3x3)")


def spec_from_torchvision(sd: dict) -> ResNetSpec:
  """The ResNetSpec of a torchvision-named state dict, from its shapes and block indices."""
  if "conv1.weight" not in sd:
    prefixed = [k[:-len("conv1.weight")] for k in sd if k.endswith(".conv1.weight")
                and not k.startswith("layer") and ".layer" not in k]
    hint = (f"; its keys carry the prefix {prefixed[0]!r}: strip it first" if prefixed
            else f" (keys: {fmt_keys(sorted(sd))})")
    raise ConversionError(f"not a torchvision ResNet state dict: no conv1.weight{hint}")
  w = np.shape(sd["conv1.weight"])
  if len(w) != 4 or w[1] != 3 or w[2] != w[3]:
    raise ConversionError(f"conv1.weight {list(w)} is not a square RGB convolution")
  stem = _stem(w[2], "conv1.weight")
  kind = "bottleneck" if "layer1.0.conv3.weight" in sd else "basic"
  counts = tuple(len({m.group(1) for k in sd
                      for m in [re.match(rf"layer{i}\.(\d+)\.", k)] if m}) for i in range(1, 5))
  depth = _depth(kind, counts, "state dict")
  num_classes = int(np.shape(sd["fc.weight"])[0]) if "fc.weight" in sd else 0
  width = w[0] / 64
  return ResNetSpec(depth, int(width) if width == int(width) else width, num_classes, stem)


def torchvision_to_variables(sd: dict) -> tuple[dict, ResNetSpec]:
  """({'params': tree, 'batch_stats': tree} of float32 numpy arrays, ResNetSpec) of a
  torchvision ResNet state dict (numpy arrays or anything np.asarray reads). ConversionError,
  one line, for missing, unknown or misshapen keys."""
  spec = spec_from_torchvision(sd)
  ignored = [k for k in sd if k.endswith(".num_batches_tracked")]
  variables = take_shaped(
      sd, entries(spec), lacks=f"the {spec.kind} ResNet-{spec.depth} state dict lacks",
      not_ours=f"torchvision ResNet-{spec.depth}'s", ignored=ignored,
      misfit=f"a width-{spec.width} ResNet-{spec.depth} (every stage scaled alike; "
             f"torchvision's wide_resnet widens only the bottlenecks)")
  return variables, spec


def spec_from_variables(variables: PyTree) -> ResNetSpec:
  """The ResNetSpec of resnet.ResNet variables (a 'params' tree), from shapes and names."""
  params = variables["params"]
  try:
    k = np.shape(params["conv1"]["kernel"])
    kind = "bottleneck" if "conv3" in params["layer1"]["block0"] else "basic"
    counts = tuple(len([b for b in params[f"layer{i}"] if b.startswith("block")])
                   for i in range(1, 5))
  except (KeyError, TypeError):
    raise ConversionError(f"not mim_jax ResNet variables (params keys: "
                          f"{fmt_keys(sorted(params))})") from None
  depth = _depth(kind, counts, "variables")
  num_classes = int(np.shape(params["fc"]["kernel"])[1]) if "fc" in params else 0
  width = k[3] / 64
  return ResNetSpec(depth, int(width) if width == int(width) else width, num_classes,
                    _stem(k[0], "conv1 kernel"))


def variables_to_torchvision(variables: PyTree, num_batches_tracked: bool = True,
                             dtype: Any = np.float32) -> dict:
  """{torchvision key: numpy array in torch layout, `dtype`} of resnet.ResNet `variables`
  ({'params', 'batch_stats'}); with `num_batches_tracked` also each BatchNorm's
  `num_batches_tracked` as an int64 0, so that torch's strict load_state_dict takes it."""
  spec = spec_from_variables(variables)
  out = {}
  for key, x in put_shaped(variables, entries(spec), dtype).items():
    out[key] = x
    if num_batches_tracked and key.endswith(".running_var"):
      out[key[:-len("running_var")] + "num_batches_tracked"] = np.zeros((), np.int64)
  return out


def make_config(spec: ResNetSpec, *, image_size: int = 0, preset: str = "",
                config_dir: str = "") -> ml_collections.ConfigDict:
  """The run config of a converted torchvision ResNet: configs/finetune.py's 'resnet18' preset
  (or `preset`) with the model set from the weights (a headless backbone), the classifier's
  classes from fc, ImageNet's mean and std (torchvision's) and `image_size` (default 224)."""
  from mim_jax import config_lib
  try:
    c = config_lib.load("finetune", preset or "resnet18", config_dir)
  except FileNotFoundError as e:
    raise ConversionError(str(e)) from None
  if c.model.get("name") != "resnet":
    raise ConversionError(f"--preset={preset!r} of configs/finetune.py is not a ResNet preset: "
                          f"use 'resnet18' or 'resnet18_cifar10'")
  c.model = dataclasses.replace(spec, num_classes=0).model_config()
  if spec.num_classes:
    c.finetune.num_classes = spec.num_classes
  c.input.image_size = int(image_size or 224)
  c.input.mean, c.input.std = (0.485, 0.456, 0.406), (0.229, 0.224, 0.225)
  return c


def convert_checkpoint(path: str, out_dir: str, *, image_size: int = 0, preset: str = "",
                       config_dir: str = "", reader: str = "pure") -> dict:
  """`--arch=torchvision_resnet`: a torchvision ResNet state dict -> a configs/finetune.py
  workdir (the backbone as the encoder with its running statistics, fc as the classifier
  head), loadable by Trainer.from_workdir, config.finetune.pretrained and the evaluators."""
  from mim_jax import convert
  sd = convert.read_checkpoint(path, reader)
  if isinstance(sd, dict) and "state_dict" in sd and isinstance(sd["state_dict"], dict):
    sd = sd["state_dict"]
  variables, spec = torchvision_to_variables(sd)
  params = dict(variables["params"])
  head = {"fc": params.pop("fc")} if "fc" in params else None
  config = make_config(spec, image_size=image_size, preset=preset, config_dir=config_dir)
  tree = {"encoder": params, **({"head": head} if head is not None else {})}
  prov = dict(source=path, arch="torchvision_resnet", spec=dataclasses.asdict(spec))
  return convert.write_workdir(out_dir, config, tree, prov,
                               collections={"batch_stats": {"encoder": variables["batch_stats"]}})
