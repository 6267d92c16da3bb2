r"""Jigsaw puzzles (Noroozi & Favaro, ECCV 2016), with Jigsaw++ (Noroozi et al., CVPR 2018) and
the damaged jigsaw (Kim et al., WACV 2018) as switches (mim_jax/methods/jigsaw.py).

Presets (`--config=configs/jigsaw.py:<preset>`):

  (none)             the embedded 5,000-image CIFAR-10 subset, the CIFAR AlexNet (BN) at width
                     0.5, CPU-sized.
                       python -m mim_jax.main --config=configs/jigsaw.py --workdir=/tmp/jigsaw
  cifar10            the CIFAR-10 image folder (500 per class held out), 4 epochs (3.9 s
                     per step alone on the 2-core CPU: 700 steps, 46 min; docs/speed.md).
                       python -m mim_jax.main --config=configs/jigsaw.py:cifar10 \
                         --workdir=/tmp/jigsaw_c10 --config.input.data.dir=../shared/data/cifar10/train
  cifar10_plus_plus  cifar10 with Jigsaw++ (up to two occluding tiles, 701 permutations at
                     minimum Hamming distance 3, 70% grey images).
  cifar10_damaged    cifar10 with the damaged jigsaw (L-only tiles, one tile removed,
                     permutation + inpainting + colorization losses).
  imagenet           the paper's setting on tfds imagenet2012 (CaffeNet-width BN AlexNet).

Official settings (the paper, Sec. 3 and 4; bbrattoli/JigsawPuzzlePytorch):
  * image resized to 256, a random 225 x 225 window, 3 x 3 cells of 75, a 64 x 64 tile at a
    random offset in each cell; each tile normalised by its own mean and std; colour channels
    jittered spatially by up to 2 px; grey images 30% of the time (the port's loader);
  * 1,000 permutations by the greedy maximal-average-Hamming Algorithm 1 (here seed 0:
    average Hamming distance 8.008, minimum 2; the port's permutations_1000.npy: 8.005, 2);
  * the context-free network: AlexNet per tile with shared weights (conv1 stride 2 on the
    64 px tiles), fc6 1024 per tile, fc7 4096 over the 9 concatenated, fc8 over the 1,000
    permutations, dropout 0.5 after fc6 and fc7, cross-entropy;
  * SGD momentum 0.9, weight decay 5e-4, batch 256, lr 0.01 (the paper) dropped 10x every 20
    epochs over 70 (the port's adjust_learning_rate).
  Jigsaw++: 0, 1 or 2 tiles from another image, 701 permutations at Hamming distance >= 3,
  grey images 70% of the time.

CIFAR scaling (32 px images): the image is resized bilinearly to 64 px (x2: the pretext then
samples the image twice as finely as the evaluation, as the paper's conv1 stride 2 on tiles
against stride 4 on whole images does), a 57 px window (0.89 of the side; the paper 225 / 256
= 0.88), 19 px cells and 16 px tiles (the paper 64 / 75 = 0.85; offsets 0..3), channel jitter
1 px (2 x 16 / 64 rounded up); fc6 512, fc7 2048 (half the official widths, as the backbone's
channels); lr 0.01 x batch / 256 with cosine decay and a short warm-up instead of the step
schedule (a run of a few epochs).

The imagenet preset: pretext_imagenet's 224 px input is resized to 256 inside the method
(jigsaw.resize=256) before the 225 px window; the input crop is the whole image (crop scale
1, no flip) as the official loader, which has no random resized crop.

Deviations: BatchNorm AlexNet (the paper's is LRN CaffeNet; Jigsaw++ adds BN) with one set of
BatchNorm statistics over all 9 x B tiles; the Linear layers have PyTorch's default init; the
damaged jigsaw's decoders, colorization loss and loss weights are not from the paper (its text
was not available; see the method's docstring).
"""
from mim_jax import config_lib

PRESETS = ("", "cifar10", "cifar10_plus_plus", "cifar10_damaged", "imagenet")


def get_config(arg=None):
  preset = arg or "default"
  c = config_lib.base_config()
  c.method = "jigsaw"
  c.jigsaw = dict(
      num_permutations=1000, perm_seed=0,
      resize=256, grid=225, cell=75, tile=64, channel_jitter=2, gray_prob=0.3,
      tile_conv1_stride=2, fc6_dim=1024, fc7_dim=4096, dropout=0.5,
      plus_plus=False, max_occluded=2, pp_num_permutations=701, pp_min_distance=3,
      damaged=dict(enabled=False, remove_tile=True, decolor=True, jigsaw_weight=1.0,
                   inpaint_weight=1.0, color_weight=1.0))
  c.optim.update(name="sgd", base_lr=0.01, lr_batch_divisor=256, momentum=0.9,
                 weight_decay=5e-4, schedule="cosine", warmup_epochs=0.0, min_lr=0.0)
  base = "cifar10" if preset.startswith("cifar10") else preset
  if base in ("default", "cifar10"):
    config_lib.pretext_preset(c, base, epochs=(5, 4), batch=(128, 256))
    c.jigsaw.update(resize=64, grid=57, cell=19, tile=16, channel_jitter=1, fc6_dim=512,
                    fc7_dim=2048)
    c.optim.warmup_epochs = {"default": 0.5, "cifar10": 1.0}[base]
    c.evals.reconstruction.enabled = True
    if preset == "cifar10_plus_plus":
      c.jigsaw.update(plus_plus=True, gray_prob=0.7)
    elif preset == "cifar10_damaged":
      c.jigsaw.damaged.enabled = True
    elif preset not in ("default", "cifar10"):
      raise ValueError(f"unknown preset {preset!r}: use one of {PRESETS}")
  elif preset == "imagenet":
    config_lib.pretext_imagenet(c, batch_size=256, total_epochs=70)
    c.optim.update(schedule="multistep", milestones_epochs=(20, 40, 60), gamma=0.1)
    c.evals.reconstruction.enabled = True
  else:
    raise ValueError(f"unknown preset {preset!r}: use one of {PRESETS}")
  c.input.aug.update(crop_scale=(1.0, 1.0), crop_ratio=(1.0, 1.0), hflip=False)
  return c
