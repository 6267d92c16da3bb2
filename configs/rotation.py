r"""RotNet (Gidaris, Singh & Komodakis, ICLR 2018), exact to gidariss/FeatureLearningRotNet.

Presets (`--config=configs/rotation.py:<preset>`):

  (none)    The embedded 5,000-image CIFAR-10 subset, RotNet's NIN (4 blocks) at quarter width,
            EPOCHS_DEFAULT epochs, CPU-sized (minutes on 2 cores).
              python -m mim_jax.main --config=configs/rotation.py --workdir=/tmp/rotnet
  cifar10   The paper's CIFAR-10 setting (config/CIFAR10_RotNet_NIN4blocks.py) shrunk to a CPU
            budget of about an hour on 2 cores: the CIFAR-10 image folder (500 images per
            class held out), NIN with 4 blocks at quarter width (48, 40, 24 channels in block
            1, 48 after; 52 GFLOP per step of 128 images = 512 rotated copies, against 185 at
            half width), EPOCHS_CIFAR epochs instead of 200 with the official step schedule
            scaled to the run (x0.2 at 30%, 60% and 80% of it: epochs 60, 120, 160 of 200).
              python -m mim_jax.main --config=configs/rotation.py:cifar10 --workdir=/tmp/rot_c10 \
                --config.input.data.dir=../shared/data/cifar10/train
  imagenet  config/ImageNet_RotNet_AlexNet.py: the BN AlexNet (torch widths 64, 192, 384, 256,
            256) + its fc block (4096, 4096) and a 4-way Linear, batch 192 images (768 rotated
            copies), 50 epochs, lr 0.01 x0.1 at epochs 15, 30 and 45 (LUT_lr), SGD nesterov
            momentum 0.9, weight decay 5e-4, RandomSizedCrop(224) + flip, ImageNet mean / std.

Official settings (config/CIFAR10_RotNet_NIN4blocks.py, dataloader.py, algorithms/):
  * Each image in its four rotations, the batch 4B, labels 0..3; 4-way cross-entropy.
  * NIN with 4 blocks (use_avg_on_conv3=False), classifier global average pool + Linear(192, 4).
  * SGD, nesterov, momentum 0.9, weight decay 5e-4 on every parameter, batch 128 images, 200
    epochs, lr 0.1 to epoch 60, 0.02 to 120, 0.004 to 160, 0.0008 to 200 (LUT_lr: the lr is
    set at each epoch's start; here optim.schedule 'multistep', gamma 0.2, milestones at the
    epochs' first steps: the same lr at every step). The lr is config.optim.base_lr x batch /
    lr_batch_divisor with the divisor at the preset's batch, so the peak is the official 0.1.
  * CIFAR augmentation: RandomCrop(32, padding=4) + horizontal flip (rotation.crop='pad'),
    mean (125.3, 123.0, 113.9) / 255, std (63.0, 62.1, 66.7) / 255.
  * ImageNet: RandomSizedCrop(224) (scale 0.08 - 1, ratio 3/4 - 4/3) + flip, ImageNet mean /
    std, AlexNet's fc block without biases and with BatchNorm1d.
  * PyTorch's default initialisation of every layer: the official code defines
    NetworkInNetwork.weight_initialization but never calls it. (The backbone here,
    models/convnet.py, initialises convolutions N(0, 2 / (k^2 out)) as that unused function
    does; the heads use PyTorch's defaults.)

Deviations:
  * CPU budget: NIN at width 0.25 and EPOCHS_CIFAR (cifar10) / EPOCHS_DEFAULT (default) epochs,
    the schedule's milestones scaled to the run. The imagenet preset is the official recipe.
  * Evaluation: the paper trains non-linear classifiers (and conv-block classifiers) on each
    NIN block on all of CIFAR-10; here each block's features go through the split-brain
    per-layer linear protocol (`config_lib.pretext_preset`: each block pooled to about 9,216
    values, one SGD linear probe per block, 30 epochs) and a kNN on the pooled last block.
  * The paper's numbers (Table 1: CIFAR-10 accuracy of non-linear classifiers on each conv
    block of RotNet NIN models with 3, 4 and 5 blocks; the 4-block model's second block is the
    best) could not be retrieved verbatim from the reference text available to this
    repository, so they are not quoted here; measured numbers of ours are per-layer LINEAR
    probes on a CPU budget and are not comparable with them one to one.
"""
from mim_jax import config_lib

PRESETS = ("", "cifar10", "imagenet")
EPOCHS_DEFAULT = 10
EPOCHS_CIFAR = 2   # 3.7 s / step alone on the 2-core CPU: 702 steps, 43 min (docs/speed.md)
CIFAR_MEAN = tuple(x / 255.0 for x in (125.3, 123.0, 113.9))
CIFAR_STD = tuple(x / 255.0 for x in (63.0, 62.1, 66.7))


def step_milestones(epochs: float, fractions=(0.3, 0.6, 0.8)) -> tuple:
  """The official schedule's milestones (60, 120, 160 of 200 epochs) scaled to `epochs`."""
  return tuple(round(f * epochs, 3) for f in fractions)


def get_config(arg=None):
  preset = arg or "default"
  c = config_lib.base_config()
  c.method = "rotation"
  c.rotation = dict(head="auto", fc_dim=4096, bn_momentum=0.1, crop="pad")
  c.optim.update(name="sgd", momentum=0.9, nesterov=True, weight_decay=5e-4,
                 schedule="multistep", warmup_epochs=0.0, warmup_lr=0.0, min_lr=0.0)
  if preset in ("default", "cifar10"):
    epochs = EPOCHS_DEFAULT if preset == "default" else EPOCHS_CIFAR
    config_lib.pretext_preset(c, preset, model="nin", epochs=(epochs, epochs), batch=(128, 128),
                              width=0.25)
    c.input.update(mean=CIFAR_MEAN, std=CIFAR_STD)
    c.optim.update(base_lr=0.1, lr_batch_divisor=128, gamma=0.2,
                   milestones_epochs=step_milestones(epochs), warmup_epochs=0.0)
  elif preset == "imagenet":
    config_lib.pretext_imagenet(c, batch_size=192, total_epochs=50, widths="torch")
    c.rotation.crop = "config"
    c.input.aug.update(crop_scale=(0.08, 1.0), crop_ratio=(3.0 / 4.0, 4.0 / 3.0), hflip=True)
    c.optim.update(base_lr=0.01, lr_batch_divisor=192, gamma=0.1,
                   milestones_epochs=(15, 30, 45), warmup_epochs=0.0)
  else:
    raise ValueError(f"unknown preset {preset!r}: use '', 'cifar10' or 'imagenet'")
  return c
