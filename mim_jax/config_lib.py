"""The shared skeleton of every config; `configs/<method>.py` fills in the method's settings.

Every key a run may set is declared here (or in the method's config), and `main.py` locks the
config, so a mistyped `--config.key=value` fails with the list of valid keys.
"""
from __future__ import annotations

import importlib.util
import json
import os
from typing import Optional

import ml_collections

from mim_jax.errors import TrainingError

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)

# The checkout's configs/ folder (beside the package in a source or editable install).
CONFIGS_DIR = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "configs")


def set_path(config, key: str, value) -> None:
  """config.<key> = value for a dotted key ('model.remat'). KeyError(key) when the config has
  no such key, a missing parent included: an override never adds a key. A value of the wrong
  type raises ConfigDict's TypeError."""
  *parents, last = key.split(".")
  node = config
  try:
    for name in parents:
      node = node[name]
    node[last]  # pylint: disable=pointless-statement
  except (KeyError, AttributeError, TypeError):
    raise KeyError(key) from None
  node[last] = value


def parse_value(text: str):
  """A command-line override's value: a Python literal ('64', '1e-3', 'True', '(0.2, 1.0)'),
  else the text itself (a string value)."""
  import ast  # pylint: disable=g-import-not-at-top
  try:
    return ast.literal_eval(text)
  except (ValueError, SyntaxError):
    return text


def load_run_config(workdir: str, overrides: Optional[dict] = None) -> ml_collections.ConfigDict:
  """The config a run in `workdir` was trained with (its config.json), with dotted-key
  `overrides` ({'input.batch_size': 64}); TrainingError for a missing file or unknown key."""
  path = os.path.join(workdir, "config.json")
  if not os.path.exists(path):
    raise TrainingError(f"{path} not found: point at a workdir written by mim_jax.main")
  with open(path) as f:
    config = ml_collections.ConfigDict(json.load(f))
  for key, value in (overrides or {}).items():
    try:
      set_path(config, key, value)
    except KeyError:
      raise TrainingError(f"unknown config key {key!r} in the overrides") from None
  return config


def _config_module(method: str, config_dir: str = ""):
  d = config_dir or CONFIGS_DIR
  path = os.path.join(d, f"{method}.py")
  if not os.path.isfile(path):
    known = sorted(f[:-3] for f in os.listdir(d) if f.endswith(".py")) if os.path.isdir(d) else []
    raise FileNotFoundError(
        f"{path} not found: name one of the configs in {d} ({', '.join(known) or 'none there'}), "
        f"or point config_dir (--config_dir) at a checkout's configs/ folder")
  return config_module(path)


def config_module(path: str):
  """The config file at `path`, executed as a module (its get_config, PRESETS)."""
  name = os.path.splitext(os.path.basename(path))[0]
  spec = importlib.util.spec_from_file_location(f"mim_jax_config_{name}", path)
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)
  return module


def config_names(config_dir: str = "") -> list[str]:
  """The configs in `config_dir` (default: the checkout's configs/), by file name."""
  d = config_dir or CONFIGS_DIR
  return sorted(f[:-3] for f in os.listdir(d) if f.endswith(".py") and not f.startswith("_"))


def presets(method: str, config_dir: str = "") -> tuple[str, ...]:
  """`configs/<method>.py`'s PRESETS ('' is the default preset)."""
  return tuple(getattr(_config_module(method, config_dir), "PRESETS", ("",)))


def load(method: str, preset: str = "", config_dir: str = "") -> ml_collections.ConfigDict:
  """`configs/<method>.py`'s get_config(preset): what `--config=configs/<method>.py:<preset>`
  gives mim_jax.main (tools, benchmarks and converters build their runs from it). A missing
  file is a FileNotFoundError naming the configs there and `config_dir`."""
  return _config_module(method, config_dir).get_config(preset or None)


def base_config() -> ml_collections.ConfigDict:
  c = ml_collections.ConfigDict()
  c.method = ""
  # The published name a report shows for the run ('' = the method's, e.g. 'feature_mim' ->
  # 'teacher-feature MIM'); set by configs that share a method file (MILAN, MVP, EVA, ...).
  c.name = ""
  c.seed = 0
  # Length: total_steps wins when > 0, else total_epochs over the training split.
  c.total_epochs = 1.0
  c.total_steps = 0

  c.input = ml_collections.ConfigDict(dict(
      data=dict(
          name="embedded",          # 'embedded' | 'image_folder' | 'tfds'
          dir="",                   # image folder root, or tfds data_dir
          tfds_name="",             # e.g. 'imagenet2012'
          train_split="train",      # tfds split names
          eval_split="validation",
          holdout_per_class=100,    # seeded per-class hold-out used only for evaluation
          holdout_seed=0,
          in_memory=True,           # decode once, augment on the device
          cache_dir="",
          train_subset=0.0,         # 0 = all; (0, 1] = that fraction; a whole number > 1 = that many images
          subset_seed=0,            # the nested subsets' permutation (data-scaling sweeps)
      ),
      batch_size=128,               # global batch of one optimiser step
      image_size=32,
      workers=0,                    # grain worker processes (streaming sources)
      fast_decode=True,             # streaming JPEGs: decode at reduced size when the crop allows
      # Streaming: grain's reader threads and prefetch buffer in each worker. grain's defaults
      # (16, 500) scan the whole buffer on every element; these gave a 2-worker run on local
      # JPEGs 13% more images/s (benchmarks/input_pipeline.py --read; docs/data.md). Raise both for
      # a slow network disk.
      read_threads=2,
      read_buffer=16,
      # Streaming: > 0 moves the bicubic resize of the crop to the device. Workers send the
      # decoded pixels the resize reads (regions up to this many pixels a side; larger ones
      # are resized on the host), packed with a budget of device_resize_budget pixels per
      # image (0: half the square), and the step resamples them (augment.resize_regions).
      device_resize=0,
      device_resize_budget=0,
      # num_sample: repeated augmentation (SlowFast's AUG.NUM_SAMPLE): examples per record read,
      # side by side in the batch (streamed video, in-memory data).
      aug=dict(crop_scale=(0.2, 1.0), crop_ratio=(3.0 / 4.0, 4.0 / 3.0), hflip=True, num_sample=1),
      mean=IMAGENET_MEAN,
      std=IMAGENET_STD,
  ))

  c.model = ml_collections.ConfigDict(dict(
      name="vit",                   # the backbone, mim_jax/models/<name>.py ('vit', 'resnet')
      variant="tiny",
      depth=0,                      # 0 = the variant's depth
      patch_size=4,
      pos_embed="sincos",
      rel_pos_bias="none",
      qkv_bias="qkv",
      init_values=0.0,              # layer scale; 0 = off
      init_style="xavier",
      drop_path=0.0,
      remat=False,
      remat_policy="full",          # what remat keeps: 'full' (block inputs), 'dots_no_batch', 'dots'
      attn_impl="",                 # '' = JAX's choice, 'xla', 'cudnn'
      attn_pad=-1,                  # pad tokens in attention to a multiple; -1: 2 for cudnn
      qkv_proj="fused",             # q, k, v from one product ('fused') or three ('split')
      residual_dtype="float32",     # the blocks' residual stream; 'bfloat16' rounds each add
      layer_norm="flax",            # the blocks' LayerNorms: 'flax' or 'recompute' (less saved)
      dtype="float32",              # compute dtype: 'bfloat16' on accelerators
      param_dtype="float32",
  ))
  c.pooling = "cls"                 # features for evaluators: 'cls' | 'mean'
  c.ema = ml_collections.ConfigDict(dict(enabled=False, decay=0.999))

  c.optim = ml_collections.ConfigDict(dict(
      name="adamw", base_lr=1.5e-4, lr_batch_divisor=256, b1=0.9, b2=0.95, eps=1e-8,
      momentum=0.9, weight_decay=0.05, schedule="cosine", warmup_epochs=0.0, warmup_lr=0.0,
      # 'constant', or 'cosine' from weight_decay to weight_decay_end over the run, per step
      # (DINO / iBOT's cosine_scheduler(weight_decay, weight_decay_end, epochs, niter_per_ep)).
      weight_decay_schedule="constant", weight_decay_end=0.0,
      min_lr=0.0, milestones_epochs=(), gamma=0.1, lr_table=(), nesterov=False, clip_grad=0.0, grad_accum=1,
      # ((regex, spec), ...) on parameter paths, first match wins: spec 'frozen' or a dict of
      # lr_scale, weight_decay, frozen, frozen_until_step, frozen_until_epoch (optim.GROUP_KEYS).
      param_groups=(),
  ))

  c.mesh = (("data", -1), ("fsdp", 1))
  c.sharding_rules = ((".*", "replicate"),)

  c.log_every = 10
  c.ckpt_every = 100
  c.keep_ckpts = 3
  c.eval_every = 0                  # steps between evaluations; 0 = only at the end
  # TensorBoard event files in <workdir>/tensorboard beside metrics.jsonl (mim_jax.metric_writers):
  # scalars at log steps, evaluations, the reconstruction grid, parameter histograms at
  # checkpoints; MFU against peak_tflops per device (0: the device's data-sheet peak if known).
  c.tensorboard = ml_collections.ConfigDict(dict(enabled=True, histograms=True, peak_tflops=0.0))
  c.profile_steps = ()              # (first, last): a jax.profiler trace in <workdir>/profile
  c.evals = ml_collections.ConfigDict()
  return c


def default_evals(*, knn_k=20, probe_epochs=90, probe_lr=0.1, probe_optimizer="lars", num_images=8,
                  pooling="cls"):
  """The evaluators of `config.evals`: kNN, linear probe and reconstruction picture on, more off.

  The probe follows MAE's linear-probe recipe (LARS, base lr 0.1 x batch/256, parameter-free
  BatchNorm on the features, 90 epochs). LARS's trust ratio moves the weights by ~1e-3 of
  their norm per step, which needs ImageNet's ~10^5 steps; CPU presets with a few hundred
  probe steps use SGD with momentum instead (probe_optimizer='sgd') and say so in the
  recorded protocol.

  Disabled by default, with CPU-sized options (turn one on with e.g.
  `--config.evals.few_shot.enabled=True`): few-shot ridge regression (1/5/10/25 shots x 5
  seeds), the per-block kNN probe (PNG of accuracy against depth), the attentive probe (a
  learned query cross-attending over the frozen tokens) and the held-out vs training loss.
  """
  return ml_collections.ConfigDict(dict(
      knn=dict(type="knn", enabled=True, k=knn_k, temperature=0.07, batch_size=256, pooling=pooling,
               max_train=0, max_eval=0,   # 0 = the whole split
               feature="final"),          # or 'block:N' (block N's output, pooled with `pooling`)
      linear=dict(type="linear_probe", enabled=True, optimizer=probe_optimizer, base_lr=probe_lr,
                  epochs=probe_epochs, max_train=0, max_eval=0,
                  feature="final",           # or 'block:N', 'concat_last:N' (see knn.py)
                  batch_size=256, warmup_epochs=min(10, probe_epochs // 9), weight_decay=0.0,
                  pooling=pooling, seed=0),
      reconstruction=dict(type="reconstruction", enabled=True, num_images=num_images, seed=0),
      few_shot=dict(type="few_shot", enabled=False, shots=(1, 5, 10, 25), seeds=5,
                    val_per_class=5, batch_size=256, max_train=10_000, max_eval=0,
                    feature="final", pooling=pooling),
      layer_probe=dict(type="layer_probe", enabled=False, classifier="knn", k=knn_k,
                       temperature=0.07, pooling=pooling, batch_size=256, max_train=5_000,
                       max_eval=0,   # classifier='linear': the probe options below, per block
                       optimizer=probe_optimizer, base_lr=probe_lr, epochs=probe_epochs,
                       warmup_epochs=min(10, probe_epochs // 9), probe_batch_size=256),
      attentive_probe=dict(type="attentive_probe", enabled=False, tokens="patches", base_lr=1e-3,
                           epochs=10, warmup_epochs=1, batch_size=256, weight_decay=0.05,
                           num_heads=0, seed=0, max_train=5_000, max_eval=0),
      heldout_loss=dict(type="heldout_loss", enabled=False, num_images=1000, seeds=(0,),
                        max_train=1000),
  ))


def cpu_preset(c: ml_collections.ConfigDict, preset: str, *, epochs: tuple[float, float],
               batch: tuple[int, int] = (128, 256), warmup_epochs: tuple[float, float] = (1, 0.5),
               log_every: tuple[int, int] = (10, 20), ckpt_every: tuple[int, int] = (200, 500),
               pixels: bool = True, probe: bool = True) -> None:
  """The shared part of the CPU-sized presets at 32 px; each pair is (default, cifar10).

  preset 'default': the embedded CIFAR-10 subset, 100 images per class held out.
  preset 'cifar10': an image folder (`config.input.data.dir`), 500 per class held out; kNN and
  linear probe on a seeded 20,000-image subset of the training split (CPU budget).
  Both: 32 px images, mean-pooled features, kNN + SGD linear probe (30 epochs) + the
  reconstruction picture (off when the method predicts no pixels: `pixels=False`); `probe=False`
  turns kNN and the probe off (tokenizers).
  """
  i = {"default": 0, "cifar10": 1}[preset]
  c.input.image_size = 32
  c.pooling = "mean"
  c.evals = default_evals(probe_epochs=30, probe_optimizer="sgd", pooling="mean")
  c.evals.reconstruction.enabled = pixels
  if not probe:
    c.evals.knn.enabled = c.evals.linear.enabled = False
  if i == 0:
    c.input.data.update(name="embedded", holdout_per_class=100)
  else:
    c.input.data.update(name="image_folder", dir="", holdout_per_class=500)
    if probe:
      c.evals.knn.max_train = c.evals.linear.max_train = 20_000
  c.input.batch_size = batch[i]
  if warmup_epochs is not None:
    c.optim.warmup_epochs = warmup_epochs[i]
  c.total_epochs = epochs[i]
  c.log_every = log_every[i]
  c.ckpt_every = ckpt_every[i]


def joint_embedding_preset(c: ml_collections.ConfigDict, preset: str, *,
                           epochs: tuple[float, float] = (5, 5),
                           batch: tuple[int, int] = (128, 256)) -> None:
  """The CPU presets of the joint-embedding methods ('', 'cifar10'; see `cpu_preset`): a
  ResNet-18 with the CIFAR stem (3x3 conv, no max-pool) at width 0.25 (16 stem channels: a
  step of a two-view method at batch 256 takes about 3.4 s on one core of the 2-core CPU,
  benchmarks/joint_embedding_cpu.py), 32 px, mean-pooled, and kNN at k=200, T=0.1 (`knn_200`, the protocol lightly
  and solo-learn publish) beside mim_jax's k=20, T=0.07.
  preset 'cifar10_full': lightly's CIFAR-10 benchmark setting, for a GPU: the full-width
  ResNet-18 (CIFAR stem), batch 512, 200 epochs, the held-out split as 'cifar10'."""
  from mim_jax.models import resnet  # pylint: disable=g-import-not-at-top
  full = preset == "cifar10_full"
  cpu_preset(c, "cifar10" if full else preset, epochs=epochs, batch=batch, pixels=False)
  c.model = resnet.default_config(depth=18, stem="cifar",
                                  width=1.0 if full else 0.25)
  c.pooling = "mean"
  if full:
    c.input.batch_size = 512
    c.total_epochs = 200
    c.log_every, c.ckpt_every = 50, 2000
  knn_200(c)


def joint_embedding_imagenet(c: ml_collections.ConfigDict, *, batch_size: int,
                             total_epochs: int, depth: int = 50) -> None:
  """`imagenet_preset` with a torchvision ResNet (50 by default, bf16 compute) and
  mean-pooled features; kNN at k=200, T=0.1 beside k=20."""
  from mim_jax.models import resnet  # pylint: disable=g-import-not-at-top
  imagenet_preset(c, batch_size=batch_size, variant="base", total_epochs=total_epochs)
  c.model = resnet.default_config(depth=depth, dtype="bfloat16")
  c.pooling = "mean"
  for name in c.evals:
    if "pooling" in c.evals[name]:
      c.evals[name].pooling = "mean"
  c.evals.reconstruction.enabled = False
  knn_200(c)


def pretext_preset(c: ml_collections.ConfigDict, preset: str, *, model: str = "alexnet",
                   epochs: tuple[float, float] = (5, 15), batch: tuple[int, int] = (128, 256),
                   width: float = 0.5, pixels: bool = False) -> None:
  """The CPU presets of the classic pretext tasks ('', 'cifar10'; see `cpu_preset`): the
  CIFAR-sized AlexNet (BN, torch widths, `width` 0.5: 32, 96, 192, 128, 128 channels) or
  RotNet's NIN (`model='nin'`), 32 px, mean-pooled kNN, and the per-layer linear probe of the
  split-brain protocol (`layer_probe`, classifier 'linear': each conv layer pooled to about
  9,216 values, one SGD probe per layer, 30 epochs) on the kNN's training subset."""
  from mim_jax.models import convnet  # pylint: disable=g-import-not-at-top
  cpu_preset(c, preset, epochs=epochs, batch=batch, pixels=pixels)
  c.model = (convnet.default_config("alexnet", stem="cifar", width=width) if model == "alexnet"
             else convnet.default_config("nin", width=width))
  c.pooling = "mean"
  lp = c.evals.layer_probe
  lp.update(enabled=True, classifier="linear", pooling="mean",
            max_train=c.evals.knn.max_train or 0, optimizer="sgd", base_lr=0.1, epochs=30,
            warmup_epochs=3)


def pretext_imagenet(c: ml_collections.ConfigDict, *, batch_size: int, total_epochs: int,
                     widths: str = "caffe") -> None:
  """`imagenet_preset` with the BN AlexNet at 224 px (conv1 11x11 / 4), mean-pooled features and
  the per-layer linear probe (conv1..conv5 pooled to about 9,216 values each)."""
  from mim_jax.models import convnet  # pylint: disable=g-import-not-at-top
  imagenet_preset(c, batch_size=batch_size, variant="base", total_epochs=total_epochs)
  c.model = convnet.default_config("alexnet", widths=widths)
  c.pooling = "mean"
  for name in c.evals:
    if "pooling" in c.evals[name]:
      c.evals[name].pooling = "mean"
  c.evals.reconstruction.enabled = False
  c.evals.layer_probe.update(enabled=True, classifier="linear", max_train=100_000)


def lab_colorization_preset(c: ml_collections.ConfigDict, preset: str,
                            epochs: tuple[float, float]) -> None:
  """What colorization and split-brain share: AdamW at colorization's solver0 betas and decay,
  the AlexNet without pool5 (conv5 keeps its map for the per-pixel head), and the presets:
  '' / 'cifar10' (`pretext_preset` at half width, lr 1e-3 per 128, half an epoch of warm-up)
  or 'imagenet' (CaffeNet widths, batch 80, solver0's fixed lr 3e-5, the colourisation
  pictures on)."""
  c.optim.update(name="adamw", b1=0.9, b2=0.999, eps=1e-8, weight_decay=1e-3,
                 schedule="cosine", warmup_epochs=0.0, warmup_lr=0.0, min_lr=0.0)
  if preset in ("default", "cifar10"):
    pretext_preset(c, preset, model="alexnet", epochs=epochs, batch=(128, 128), width=0.5,
                   pixels=True)
    c.optim.update(base_lr=1e-3, lr_batch_divisor=128, warmup_epochs=0.5)
  elif preset == "imagenet":
    pretext_imagenet(c, batch_size=80, total_epochs=15, widths="caffe")
    c.evals.reconstruction.enabled = True
    c.optim.update(base_lr=3e-5, lr_batch_divisor=80, schedule="constant")
  else:
    raise ValueError(f"unknown preset {preset!r}: use '', 'cifar10' or 'imagenet'")
  c.model.pool5 = False


def knn_200(c: ml_collections.ConfigDict) -> None:
  """Adds `knn_200` to config.evals: the kNN of `knn` at k=200, T=0.1 (InstDisc's protocol as
  lightly's and solo-learn's benchmarks run it)."""
  c.evals.knn_200 = ml_collections.ConfigDict(dict(c.evals.knn.to_dict(), k=200, temperature=0.1))


def imagenet_preset(c: ml_collections.ConfigDict, *, batch_size: int, variant: str,
                    total_epochs: int) -> None:
  """The shared part of the ImageNet-1k presets: tfds imagenet2012 streamed through grain
  workers, 224 px, patch 16, bf16 compute, MAE's linear-probe protocol on the cls token."""
  c.input.data.update(name="tfds", tfds_name="imagenet2012", dir="", in_memory=False,
                      train_split="train", eval_split="validation", holdout_per_class=0)
  c.input.batch_size = batch_size
  c.input.image_size = 224
  c.input.workers = 16
  c.model.update(variant=variant, patch_size=16, dtype="bfloat16")
  c.total_epochs = total_epochs
  c.log_every = 100
  c.ckpt_every = 2000
  c.pooling = "cls"
  c.evals = default_evals(probe_epochs=90, pooling="cls")
  c.evals.knn.max_train = 100_000
