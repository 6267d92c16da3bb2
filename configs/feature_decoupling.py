r"""FeatureDecoupling (Feng, Xu & Tao, CVPR 2019), exact to philiptheother/FeatureDecoupling.

Presets (`--config=configs/feature_decoupling.py:<preset>`):

  (none)    The embedded 5,000-image CIFAR-10 subset, the CIFAR-sized BN AlexNet
            (`config_lib.pretext_preset`: torch widths at 0.5, 5x5 stride-1 conv1, pool5 4x4)
            with the fc block at 2048 (4096 x the width), CPU-sized.
              python -m mim_jax.main --config=configs/feature_decoupling.py --workdir=/tmp/fd
  cifar10   The CIFAR-10 image folder (500 images per class held out), the same network,
            EPOCHS_CIFAR epochs (about an hour on 2 cores: 174 GFLOP per step of 128 images =
            512 rotated copies; the four copies make it ~4x a one-view method's step).
              python -m mim_jax.main --config=configs/feature_decoupling.py:cifar10 \
                --workdir=/tmp/fd_c10 --config.input.data.dir=../shared/data/cifar10/train
  imagenet  config/ImageNet_Decoupling_AlexNet.py: BN AlexNet (torch widths 64, 192, 384, 256,
            256) + fc block 4096 split 2048 / 2048, batch 192 images (768 rotated copies),
            RandomResizedCrop(224) + flip, 245 epochs.

Official settings (config/ImageNet_Decoupling_AlexNet.py, algorithms/DecouplingModel.py):
  * Four rotations of every image; feature = AlexNet fc7 (4096, after BatchNorm1d + ReLU),
    split: [:2048] -> Linear(2048, 4) rotation classifier, [2048:] rotation-irrelevant.
  * Losses, weights lambda_loss = {cls 1, mse 1, nce 1}: per-copy cross-entropy / 4B (PU
    weighted from epoch 210 with w = 1 - p^2 on rotated copies, gama = 2); MSELoss of each
    copy's irrelevant half to the detached mean of its image's four; NCE (K = 4096, T = 0.07,
    bank momentum 0.5, Z fixed at the first batch) of Linear(2048, 128) + L2 normalisation of
    the four copies' mean, bank of one vector per training image.
  * SGD nesterov, momentum 0.9, weight decay 5e-4 on every parameter, every network
    (feature, classifier, norm) on the same LUT_lr: 0.01 to epoch 90, 1e-3 to 130, 1e-4 to
    190, 1e-5 to 210, 1e-4 to 230, 1e-5 to 245.
  * PyTorch's default initialisation of the heads (U(+-1/sqrt(fan_in)), biases too).

Deviations:
  * The PU probabilities (prob.dat) come from a model the official repository does not ship;
    `feature_decoupling.pu_prob_path` reads such a file (4 probabilities per training image,
    dataset order); left empty (every preset) the rotation loss is unweighted throughout.
  * CIFAR presets (no official CIFAR recipe): the CIFAR-sized AlexNet at width 0.5, the fc
    block at 2048 (split 1024 / 1024), batch 128, the official lr table (optim.schedule
    'table') with its epochs at the same fractions of the run and the PU phase
    at 210 / 245 of it, RandomCrop(32, padding 4) + flip and the CIFAR mean / std as RotNet's
    CIFAR recipe.
"""
from mim_jax import config_lib

PRESETS = ("", "cifar10", "imagenet")
EPOCHS_DEFAULT = 10
EPOCHS_CIFAR = 2   # 3.7 s / step alone on the 2-core CPU: 702 steps, 43 min (docs/speed.md)
CIFAR_MEAN = tuple(x / 255.0 for x in (125.3, 123.0, 113.9))
CIFAR_STD = tuple(x / 255.0 for x in (63.0, 62.1, 66.7))
OFFICIAL_EPOCHS = 245
# DecouplingModel's LUT_lr for ImageNet: (until epoch, lr); it rises again in the PU phase.
OFFICIAL_LR_TABLE = ((90, 0.01), (130, 1e-3), (190, 1e-4), (210, 1e-5), (230, 1e-4), (245, 1e-5))
OFFICIAL_PU_START = 210


def get_config(arg=None):
  preset = arg or "default"
  c = config_lib.base_config()
  c.method = "feature_decoupling"
  c.feature_decoupling = dict(
      fc_dim=4096, low_dim=128, nce_k=4096, nce_t=0.07, nce_m=0.5, gamma=2.0,
      pu_prob_path="", pu_start_epoch=float(OFFICIAL_PU_START), bn_momentum=0.1, crop="pad",
      lambda_loss=dict(cls=1.0, mse=1.0, nce=1.0))
  c.optim.update(name="sgd", momentum=0.9, nesterov=True, weight_decay=5e-4,
                 schedule="table", warmup_epochs=0.0, warmup_lr=0.0, min_lr=0.0)
  if preset in ("default", "cifar10"):
    epochs = EPOCHS_DEFAULT if preset == "default" else EPOCHS_CIFAR
    config_lib.pretext_preset(c, preset, model="alexnet", epochs=(epochs, epochs),
                              batch=(128, 128), width=0.5)
    c.feature_decoupling.fc_dim = 2048
    c.input.update(mean=CIFAR_MEAN, std=CIFAR_STD)
    frac = epochs / OFFICIAL_EPOCHS
    c.optim.update(base_lr=0.01, lr_batch_divisor=128, warmup_epochs=0.0,
                   lr_table=tuple((round(e * frac, 3), lr) for e, lr in OFFICIAL_LR_TABLE))
    c.feature_decoupling.pu_start_epoch = round(OFFICIAL_PU_START * frac, 3)
  elif preset == "imagenet":
    config_lib.pretext_imagenet(c, batch_size=192, total_epochs=OFFICIAL_EPOCHS, widths="torch")
    c.feature_decoupling.crop = "config"
    c.input.aug.update(crop_scale=(0.08, 1.0), crop_ratio=(3.0 / 4.0, 4.0 / 3.0), hflip=True)
    c.optim.update(base_lr=0.01, lr_batch_divisor=192, warmup_epochs=0.0,
                   lr_table=OFFICIAL_LR_TABLE)
  else:
    raise ValueError(f"unknown preset {preset!r}: use '', 'cifar10' or 'imagenet'")
  return c
