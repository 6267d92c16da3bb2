r"""Context encoders (Pathak et al., CVPR 2016), after the official pathak22/context-encoder
(train.lua, train_random.lua) and the paper.

Presets (`--config=configs/context_encoder.py:<preset>`):

  (none)     The embedded 5,000-image CIFAR-10 subset, the CIFAR AlexNet (BN, width 0.5) to
             pool5 (4 x 4), central-region masks, CPU-sized.
               python -m mim_jax.main --config=configs/context_encoder.py --workdir=/tmp/ce
  cifar10    The CIFAR-10 image folder (500 per class held out), the same network, 8 epochs
             (1.8 s per step alone on the 2-core CPU: 1,400 steps, 41 min; docs/speed.md).
               python -m mim_jax.main --config=configs/context_encoder.py:cifar10 \
                 --workdir=/tmp/ce_c10 --config.input.data.dir=../shared/data/cifar10/train
  imagenet   tfds imagenet2012, the CaffeNet-width BN AlexNet at 128 px (train.lua's fineSize),
             central region, batch 64 (train.lua), 100 epochs; for a GPU.
  Masks: --config.context_encoder.mask=central|block|region (any preset).

Official settings (train.lua; the README's training command: overlapPred=4 wtl2=0.999
nBottleneck=4000 fineSize=128):
  * central region: the centre quarter (fineSize/4 .. 3 fineSize/4); the input erases it
    shrunk by overlapPred=4 px a side (filled with the mean pixel 2 * (117, 104, 123) / 255 - 1
    in channels 1, 2, 3 as train.lua writes it), the generator predicts the whole quarter and
    the L2 weight is overlapL2Weight 10 x wtl2 on the 4 px overlap border, wtl2 inside.
    Here `overlap` defaults to 4 px x image_size / 128 (1 px at 32 px).
  * random region (train_random.lua): a uniform noise pattern at resolution res=0.06, resized
    bicubically and thresholded at density 0.25, a fineSize window kept when its area is
    20-30%; one mask for the whole batch; the generator predicts the whole image. `region_res`
    defaults to 0.06 x 128 / image_size (the official blob size relative to the image).
  * random block: the paper's Sec. 3.3 only ("a number of smaller possibly overlapping masks,
    covering up to 1/4 of the image"); no official code. Here `block_count` (8) squares of
    side `block_sides` (1/8 .. 1/4 of the image), each kept while the union stays within 1/4.
  * loss: (1 - wtl2) BCE(D(G(x)), 1) + MSE weighted by wtl2Matrix, wtl2 = 0.999 (rec_weight)
    and adv_weight 0.001 = 1 - wtl2; the discriminator BCE(D(x), 1) + BCE(D(G(x)), 0).
  * netD: 4x4 stride-2 convolutions, LeakyReLU(0.2), BatchNorm after all but the first, down
    to 4 x 4, a 4x4 convolution to one output (ndf 64); weights N(0, 0.02), BatchNorm scale
    N(1, 0.02); every convolution bias zeroed before each forward (here: no biases).
  * optimisers: the discriminator Adam lr 2e-4, beta1 0.5; the generator (encoder +
    bottleneck + decoder) Adam at 10 x lr = 2e-3 because 0 < wtl2 < 1 ("LR of Gen is 10 times
    Adv"), beta1 0.5; constant learning rates, no weight decay; batch 64.

Deviations:
  * The encoder is the registry backbone (AlexNet to pool5 as the paper's Sec. 3.1, here with
    BatchNorm and its own initialisation) instead of train.lua's DCGAN-style netE; the
    bottleneck is the paper's channel-wise fully connected layer (a bias per unit, lecun-normal
    init, dropout 0.5 as Sec. 5.2) + 1x1 convolution, followed by train.lua's BatchNorm +
    LeakyReLU(0.2); the decoder is train.lua's (BN + ReLU transposed convolutions, ngf 64
    doubling back from the output) with as many stride-2 layers as double the pool5 map to the
    target (resized bilinearly when that is not a power of two: at 128 px, 3 x 3 -> 96 -> 64).
  * The trainer steps the discriminator first, then the generator against the updated
    discriminator; train.lua's fGx reuses netD.output from before the discriminator's step.
  * train_random.lua crops one fixed 10000 x 10000 pattern; here each step draws fresh
    pattern windows (16 candidates, the first within 20-30%, else the closest to 25%).
  * The paper's feature-learning AlexNet was trained with the L2 loss only ("we did not manage
    to make the adversarial loss converge with AlexNet"), lr 1e-3 (central) / 1e-4 (random
    region): context_encoder.adv_weight=0 gives that run (no discriminator at all).
  * CPU presets: Adam lr as train.lua, batch 128 / 256, 20 / 8 epochs (lr_batch_divisor =
    batch: the learning rates are absolute), ngf = ndf = 32.
"""
from mim_jax import config_lib

PRESETS = ("", "cifar10", "imagenet")


def get_config(arg=None):
  preset = arg or "default"
  c = config_lib.base_config()
  c.method = "context_encoder"
  c.context_encoder = dict(
      mask="central", overlap=None, overlap_weight=10.0, rec_weight=0.999, adv_weight=0.001,
      context_weight=0.0, region_res=None, region_density=0.25, region_area=(0.20, 0.30),
      region_tries=16, block_count=8, block_sides=(0.125, 0.25), block_max_fraction=0.25,
      ngf=64, ndf=64, dropout=0.5, d_lr=2e-4, d_beta1=0.5)
  c.optim.update(name="adamw", base_lr=2e-3, b1=0.5, b2=0.999, eps=1e-8, weight_decay=0.0,
                 schedule="constant", warmup_epochs=0.0, warmup_lr=0.0, min_lr=0.0)
  if preset in ("default", "cifar10"):
    config_lib.pretext_preset(c, preset, epochs=(20, 8), batch=(128, 256), pixels=True)
    c.optim.warmup_epochs = 0.0
    c.context_encoder.update(ngf=32, ndf=32)
  elif preset == "imagenet":
    config_lib.pretext_imagenet(c, batch_size=64, total_epochs=100)
    c.input.image_size = 128
    c.evals.reconstruction.enabled = True
  else:
    raise ValueError(f"unknown preset {preset!r}: use '', 'cifar10' or 'imagenet'")
  c.optim.lr_batch_divisor = c.input.batch_size
  return c
