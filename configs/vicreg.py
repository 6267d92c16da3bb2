r"""VICReg (Bardes, Ponce and LeCun, 2022), exact to facebookresearch/vicreg (main_vicreg.py,
augmentations.py).

Presets (`--config=configs/vicreg.py:<preset>`):

  (none)       The embedded 5,000-image CIFAR-10 subset (4,000 train / 1,000 held out), a
               ResNet-18 (CIFAR stem) at a quarter width, a 1024-1024-1024 expander,
               CPU-sized (minutes on 2 cores).
                 python -m mim_jax.main --config=configs/vicreg.py --workdir=/tmp/vicreg
  cifar10      The CIFAR-10 image folder, 500 images per class held out, a quarter-width
               ResNet-18 (CIFAR stem), solo-learn's 2048-2048-2048 expander, 5 epochs
               (benchmarks/joint_embedding_cpu.py prints its time).
                 python -m mim_jax.main --config=configs/vicreg.py:cifar10 \
                   --workdir=/tmp/vicreg_c10 --config.input.data.dir=../shared/data/cifar10/train
  cifar10_full solo-learn's CIFAR-10 recipe on lightly's benchmark length (full ResNet-18 with
               the CIFAR stem, batch 512, 200 epochs; kNN k=200, T=0.1), for a GPU.
  imagenet     The official ResNet-50 recipe on tfds imagenet2012 (batch 2048, 1000 epochs).

Official settings (main_vicreg.py's defaults and the README's 1000-epoch command:
`--epochs 1000 --batch-size 2048 --base-lr 0.2`, 32 GPUs):
  * ResNet-50 (zero_init_residual=True, SyncBatchNorm), expander 8192-8192-8192 ((Linear with
    bias, BatchNorm1d, ReLU) x 2, Linear without bias); sim_coeff 25, std_coeff 25, cov_coeff 1.
  * LARS (momentum 0.9, eta 0.001; 1-D parameters excluded from weight decay and trust ratio),
    one rate for all parameters: base_lr 0.2 x batch / 256, weight decay 1e-6, 10 warm-up
    epochs from 0 then a cosine to 0.001 x the peak (adjust_learning_rate).
  * TrainTransform: RandomResizedCrop 224 (0.08 - 1, bicubic), flip, ColorJitter (0.4, 0.4,
    0.2, 0.1) p 0.8, greyscale p 0.2, Gaussian blur (sigma 0.1 - 2) p 1.0 / 0.1, solarisation
    p 0.0 / 0.2: `views_config()`'s defaults.

Keys: vicreg.expander_layers ((width, bias, bn), ...; `barlow_twins.projector_layers(spec,
hidden_bias=True)` builds them from the official string), sim_coeff, std_coeff, cov_coeff,
views.

Deviations:
  * float32 (imagenet: bfloat16 encoder) instead of fp16 autocast; the covariance matmul at
    full float32 precision.
  * optax's LARS applies the learning rate before the momentum (mu = 0.9 mu + lr u, p -= mu),
    the official after (mu = 0.9 mu + u, p -= lr mu): the same at a constant rate.
  * The views' crops are bilinear on the device for in-memory data (bicubic on the host for
    streamed data); the colour ops are PIL's (data/views.py).
CPU / CIFAR presets (scripts/pretrain/cifar/vicreg.yaml of vturrisi/solo-learn): LARS lr 0.3 x
batch / 256, weight decay 1e-4, coefficients 25 / 25 / 1, expander 2048 wide (1024 in the
default preset, for the CPU), warm-up then cosine to 0; crops 0.2 - 1, jitter (0.4, 0.4, 0.2,
0.1) p 0.8, grey 0.2, no blur, solarisation p 0.1. Not reproduced there: solo-learn's
solarisation of both views (here the second view only: data/views.py solarises the second),
its LARS eta 0.02 with clip_lr (mim_jax's LARS: eta 0.001, no clipping), its 3e-5 warm-up start,
its expander's last Linear with a bias and its variance term without the official's / 2 (the
official loss is kept). Epochs and warm-up as SimCLR's CPU presets (5 epochs, 1 / 0.5
warm-up epochs, batch 128 / 256); cifar10_full: 10 warm-up epochs (solo-learn's default).
"""
from mim_jax import config_lib
from mim_jax.methods.barlow_twins import projector_layers
from mim_jax.methods.joint_embedding import views_config

PRESETS = ('', 'cifar10', 'cifar10_full', 'imagenet')


def get_config(arg=None):
  preset = arg or "default"
  c = config_lib.base_config()
  c.method = "vicreg"
  c.vicreg = dict(expander_layers=projector_layers("8192-8192-8192", hidden_bias=True),
                  sim_coeff=25.0, std_coeff=25.0, cov_coeff=1.0, views=views_config())
  c.optim.update(name="lars", base_lr=0.2, lr_batch_divisor=256, momentum=0.9, weight_decay=1e-6,
                 schedule="cosine", warmup_epochs=10, min_lr=0.2 * 0.001)
  if preset in ("default", "cifar10", "cifar10_full"):
    config_lib.joint_embedding_preset(c, preset, epochs=(5, 5), batch=(128, 256))
    width = 1024 if preset == "default" else 2048
    c.vicreg.expander_layers = projector_layers(f"{width}-{width}-{width}", hidden_bias=True)
    c.vicreg.views = views_config(scale=(0.2, 1.0), blur_probs=(0.0, 0.0), solarize_prob=0.1)
    c.optim.update(base_lr=0.3, weight_decay=1e-4, min_lr=0.0)
    c.optim.warmup_epochs = {"default": 1.0, "cifar10": 0.5}.get(preset, 10.0)
  elif preset == "imagenet":
    config_lib.joint_embedding_imagenet(c, batch_size=2048, total_epochs=1000)
    c.model.zero_init_residual = True
  else:
    raise ValueError(f"unknown preset {preset!r}: use '', 'cifar10', 'cifar10_full' or 'imagenet'")
  return c
