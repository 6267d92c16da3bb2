r"""Split-brain autoencoder (Zhang, Isola & Efros, CVPR 2017; richzhang/splitbrainauto).

Presets (`--config=configs/split_brain.py:<preset>`):

  (none)    The embedded CIFAR-10 subset, the CIFAR AlexNet (BN) at half width split into two
            quarter-width halves, pool5 off (conv5 at 8x8 for 32 px), CPU-sized.
              python -m mim_jax.main --config=configs/split_brain.py --workdir=/tmp/splitbrain
  cifar10   The CIFAR-10 image folder, 500 images per class held out, 10 epochs (0.76 s per
            step alone on the 2-core CPU: 3,510 steps, 44 min; docs/speed.md), kNN and the
            per-layer linear probe on the concatenated halves.
              python -m mim_jax.main --config=configs/split_brain.py:cifar10 \
                --workdir=/tmp/sb_c10 --config.input.data.dir=../shared/data/cifar10/train
  imagenet  CaffeNet widths at 224 px split in two, for a GPU.

What the official repository holds: only the deploy networks (models/deploy.prototxt,
deploy_lab.prototxt: CaffeNet on Lab input, data_lab = (L - 50, a, b), conv1..conv5 and
fc6 / fc7 as convolutions) and the released weights; no training prototxt or solver. The
settings below are the paper's (Sec. 3-4) and colorization's training code, which the paper
builds on:
  * Each layer's channels split into two disjoint halves: here two backbone instances at half
    `config.model.width` (params 'encoder_l' and 'encoder_ab', each with its own BatchNorm
    statistics), so conv1..conv5 of the two halves together have the full network's widths.
  * L -> ab: classification over colorization's 313 ab bins (targets soft-encoded to the 5
    nearest bins, sigma 5: mim_jax.targets.ab_bins), no class rebalancing.
  * ab -> L: classification over `l_bins` = 100 quantised L values (one-hot of floor(L); the
    count is from the paper as recalled here, not from an official file: check it).
  * Loss: the sum of the two cross-entropies, each the mean over batch and positions
    (Caffe SoftmaxCrossEntropyLoss with normalize: True).
  * Each half's head: colorization's AlexNet head (fc6 6x6 dilation 2, fc7 1x1, BatchNorm and
    ReLU; fc8 1x1 to the bins) at half of `fc_dim` (4096 for the full network).
  * The representation: the halves concatenated layer by layer; the per-layer probe pools the
    concatenated conv layer as one (about 9,216 values), as the split-brain protocol does.

Deviations:
  * L - 50 replicated to the backbone's 3 input channels for the L half, (a, b, 0) for the ab
    half (the official halves have 1- and 2-channel conv1s; equivalent up to initialisation).
  * Backbone initialisation and BatchNorm as the registry's AlexNet; AdamW with a cosine
    schedule; the repository's default random-resized crops and flips at 32 px.
  * CPU presets: fc6 / fc7 at 256 channels in all (128 per half).
"""
from mim_jax import config_lib

PRESETS = ("", "cifar10", "imagenet")


def get_config(arg=None):
  preset = arg or "default"
  c = config_lib.base_config()
  c.method = "split_brain"
  c.split_brain = dict(neighbors=5, sigma=5.0, l_bins=100, fc_dim=4096, bn_momentum=0.1,
                       temperature=0.38)
  config_lib.lab_colorization_preset(c, preset, epochs=(10, 10))
  if preset != "imagenet":
    c.split_brain.fc_dim = 256
  return c
