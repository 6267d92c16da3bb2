r"""Context prediction (Doersch, Gupta & Efros, ICCV 2015), after cdoersch/deepcontext
(mim_jax/methods/context_prediction.py).

Presets (`--config=configs/context_prediction.py:<preset>`):

  (none)     the embedded 5,000-image CIFAR-10 subset, the CIFAR AlexNet (BN) at width 0.5.
               python -m mim_jax.main --config=configs/context_prediction.py --workdir=/tmp/ctx
  cifar10    the CIFAR-10 image folder (500 per class held out), 15 epochs.
               python -m mim_jax.main --config=configs/context_prediction.py:cifar10 \
                 --workdir=/tmp/ctx_c10 --config.input.data.dir=../shared/data/cifar10/train
  imagenet   the paper's patch geometry on tfds imagenet2012 (CaffeNet-width BN AlexNet).

Official settings (train.py, the paper Sec. 3):
  * patches 96 px, gap 48, jitter up to 7 px per axis, 8 relative positions (pos2lbl order);
  * colour dropping (train.py prep_image; the paper's alternative, the projection out of the
    green-magenta axis, is `color='project'`), random downsampling of 1/3 of the patches to as
    little as 100 pixels, per-patch mean removal and RMS normalisation;
  * images resized to 150k-450k pixels (sides ~390-670) and 4 grids per image, all neighbouring
    pairs of each grid in the batch; here one pair per image of the batch;
  * late fusion: CaffeNet per patch (BN on conv3-5 and fc6/fc7 without scale/shift), fc6 4096
    per patch, fc7 4096 on the concatenation, fc8 4096, fc9 8, Xavier init;
  * SGD without momentum, lr 1e-5 on a summed loss, fixed, about 1M iterations of up to 512
    patches.

Here: the BN AlexNet of mim_jax (BN after every conv), the loss averaged over pairs, SGD
momentum 0.9 (the official 'fixed' momentum-free SGD on a summed loss is matched neither in lr
nor in momentum: lr 0.01 x batch / 256, cosine, weight decay 5e-4), one pair per image.

CIFAR scaling: the 32 px image is resized to 64 px (x2), patches 16 px, gap 8, jitter 1 (the
paper's 96 : 48 : 7 scaled by 1/6 and rounded; the 3 x 3 grid of 16 + 8 + 16 + 8 + 16 = 64 px
fills the image, so the jitter is clipped at the borders as train.py clips it); fc_dim 1024;
downsampling to a side among (3, 6, 9, 12, 15) px with probability 1/3 (train.py draws the
area uniformly between 100 and 95^2 pixels; here a side uniformly from the list).
The imagenet preset: pretext_imagenet's 224 px images resized to 400 px (inside the method),
the paper's 96 / 48 / 7.
"""
from mim_jax import config_lib

PRESETS = ("", "cifar10", "imagenet")


def get_config(arg=None):
  preset = arg or "default"
  c = config_lib.base_config()
  c.method = "context_prediction"
  c.context_prediction = dict(resize=400, patch=96, gap=48, jitter=7, color="drop",
                              drop_noise=0.01, downsample_prob=1 / 3,
                              downsample_sizes=(10, 25, 40, 55, 70, 85, 95), fc_dim=4096)
  c.optim.update(name="sgd", base_lr=0.01, lr_batch_divisor=256, momentum=0.9,
                 weight_decay=5e-4, schedule="cosine", warmup_epochs=0.0, min_lr=0.0)
  if preset in ("default", "cifar10"):
    config_lib.pretext_preset(c, preset, epochs=(5, 15), batch=(128, 256))
    c.context_prediction.update(resize=64, patch=16, gap=8, jitter=1, fc_dim=1024,
                                downsample_sizes=(3, 6, 9, 12, 15))
    c.optim.warmup_epochs = {"default": 0.5, "cifar10": 1.0}[preset]
  elif preset == "imagenet":
    config_lib.pretext_imagenet(c, batch_size=256, total_epochs=70)
  else:
    raise ValueError(f"unknown preset {preset!r}: use one of {PRESETS}")
  c.input.aug.update(crop_scale=(1.0, 1.0), crop_ratio=(1.0, 1.0), hflip=False)
  return c
