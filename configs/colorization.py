r"""Colorization as a pretext task (Zhang, Isola & Efros, ECCV 2016; richzhang/colorization).

Presets (`--config=configs/colorization.py:<preset>`):

  (none)    The embedded CIFAR-10 subset, the CIFAR AlexNet (BN) at half width with pool5 off
            (conv5 at 8x8 for 32 px: the official quarter-resolution ab map), CPU-sized.
              python -m mim_jax.main --config=configs/colorization.py --workdir=/tmp/color
  cifar10   The CIFAR-10 image folder, 500 images per class held out, 6 epochs (1.15 s per
            step alone on the 2-core CPU: 2,106 steps, 40 min; docs/speed.md), kNN and the
            per-layer linear probe (conv1..conv5 pooled to about 9,216 values each).
              python -m mim_jax.main --config=configs/colorization.py:cifar10 \
                --workdir=/tmp/color_c10 --config.input.data.dir=../shared/data/cifar10/train
  imagenet  The official AlexNet recipe (train_alexnet/) on tfds imagenet2012, for a GPU.

Official settings (resources/caffe_traininglayers.py, train_alexnet/train_val.prototxt and
solver0.prototxt, models/colorization_train_val_v2.prototxt; the paper, Sec. 2):
  * Lab as skimage.color.rgb2lab (sRGB, D65): `mim_jax.targets.lab`, jnp. The input is
    data_l = L - 50; the target is the ab map subsampled (every 4th pixel for the VGG
    colorizer, every 8th for the AlexNet one) at the prediction map's resolution.
  * Q = 313 ab bins of the 10-unit grid (resources/pts_in_hull.npy, embedded in
    `mim_jax.targets.ab_bins`; our gamut computation gives 309 of them and no others).
  * Soft-encoding to the 5 nearest bins with a Gaussian of sigma 5, normalised (the paper; the
    official NNEncLayer uses 10 neighbours: colorization.neighbors).
  * Class rebalancing (PriorBoostLayer / PriorFactor): the weight of a position is that of the
    argmax of its soft encoding (its closest bin), w proportional to 1 / ((1 - lam) p~ + lam / Q)
    with lam = 0.5 (the official gamma), normalised so E_p~[w] = 1; p~ is the empirical bin
    distribution of the training pixels smoothed with a Gaussian of sigma 5 (the paper's
    Eq. 4). Times the NonGrayMaskLayer (0 for images whose sampled |a|, |b| never exceed 5).
    The weights scale the gradient only (ClassRebalanceMultLayer): here they multiply the
    per-position cross-entropy, a stop-gradient constant, which gives the same gradient.
  * Loss: SoftmaxCrossEntropyLoss with normalize: True, the mean over batch and positions.
  * AlexNet head (train_alexnet/train_val.prototxt): fc6 a 6x6 convolution of dilation 2,
    fc7 1x1, 4096 channels each, Caffe BatchNorm (affine-free) and ReLU, N(0, 0.005) weights
    and bias 1; fc8 a 1x1 convolution to 313 (zero-initialised: Caffe's default filler).
  * Annealed mean (the paper's Eq. 5), T = 0.38, for the pictures (reconstruction evaluator:
    originals | grey input | colorization).
  * Solver (solver0.prototxt): Adam lr 3e-5, momentum 0.9 / 0.999, weight decay 1e-3, fixed lr,
    batch 80 of 180 px random crops with mirroring, 240k iterations (the lr lowered by hand
    later, per the file's comments).

The class-rebalancing weights are computed before training from ONE pass over the pretraining
split (central crops at the input size, `pipeline.eval_batches(input, 'pretrain', ...)`, all
its images or the first colorization.prior_images of a seeded subset), cached as
<workdir>/colorization_prior_<key>.npy (the bin counts; the key hashes the data config, the
image size and prior_images), and carried in the method state ('rebalance', checkpointed: a
resumed run reads them from its checkpoint).

Deviations:
  * The backbone sees L - 50 replicated to its 3 input channels (the registry backbones take
    RGB-shaped input); the official AlexNet has a 1-channel conv1. A replicated input is a
    1-channel convolution with the sum of the 3 kernels.
  * The backbone's own initialisation and BatchNorm (affine, torch's momentum 0.1); the
    official conv layers start from Kraehenbuehl et al.'s data-dependent rescaling, and Caffe's
    BatchNorm is affine-free with a 0.999 moving average.
  * The ab target is sampled at the prediction map's own positions (pixel floor(i H / h)),
    rather than the official fixed stride 8 with the logits resized to it.
  * Random-resized crops (scale 0.2 - 1) and flips of the repository's default augmentation at
    32 px; AdamW (decoupled decay) instead of Caffe's Adam with L2 decay; cosine schedule.
  * CPU presets: fc6 / fc7 at 256 channels (4096 is most of the compute on an 8x8 map).
"""
from mim_jax import config_lib

PRESETS = ("", "cifar10", "imagenet")


def get_config(arg=None):
  preset = arg or "default"
  c = config_lib.base_config()
  c.method = "colorization"
  c.colorization = dict(neighbors=5, sigma=5.0, lam=0.5, prior_sigma=5.0, rebalance=True,
                        gray_threshold=5.0, temperature=0.38, prior_images=0, fc_dim=4096,
                        bn_momentum=0.1)
  config_lib.lab_colorization_preset(c, preset, epochs=(10, 6))
  if preset == "imagenet":
    c.colorization.prior_images = 100_000
  else:
    c.colorization.fc_dim = 256
  return c
