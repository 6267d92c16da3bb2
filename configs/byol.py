r"""BYOL (Grill et al., 2020), exact to deepmind/deepmind-research byol/.

Presets (`--config=configs/byol.py:<preset>`):

  (none)       The embedded 5,000-image CIFAR-10 subset, a ResNet-18 (CIFAR stem) at a quarter
               width, CPU-sized (minutes on 2 cores).
                 python -m mim_jax.main --config=configs/byol.py --workdir=/tmp/byol
  cifar10      The CIFAR-10 image folder, 500 images per class held out, a quarter-width
               ResNet-18 (CIFAR stem), 5 epochs (benchmarks/joint_embedding_cpu.py prints its time).
                 python -m mim_jax.main --config=configs/byol.py:cifar10 --workdir=/tmp/byol_c10 \
                   --config.input.data.dir=../shared/data/cifar10/train
  cifar10_full solo-learn's CIFAR-10 recipe at lightly's benchmark length (full ResNet-18,
               batch 512, 200 epochs; kNN k=200, T=0.1), for a GPU.
  imagenet     The official 1000-epoch ResNet-50 recipe on tfds imagenet2012.

Official settings (configs/byol.py at 1000 epochs, byol_experiment.py, utils/augmentations.py):
  * ResNet-50, projector and predictor MLP(4096, BatchNorm, ReLU, 256) with a biased first
    and an unbiased second Linear (haiku init), BatchNorm decay 0.9 / eps 1e-5 with
    cross-replica statistics; each view forwarded on its own; the target forward in training
    mode.
  * Target EMA base 0.996 on the cosine schedule to 1 (the presets of the official config:
    40 epochs 0.97, 100 / 300: 0.99, 1000: 0.996).
  * LARS (momentum 0.9, eta 1e-3, weight decay 1.5e-6; biases and normalisation excluded from
    decay and adaptation: `exclude_bias_and_norm`), lr 0.2 x batch / 256 (40 / 100 epochs:
    0.45, wd 1e-6; 300: 0.3, 1e-6), 10 warm-up epochs from 0 then cosine to 0, batch 4096,
    1000 epochs.
  * Views (augment_config): RandomResizedCrop 0.08 - 1 + flip, colour jitter (0.4, 0.4, 0.2,
    0.1) p 0.8 in random order, grey p 0.2, Gaussian blur p 1.0 on view 1 and 0.1 on view 2,
    solarisation p 0 / 0.2: `views_config()`'s defaults.

Switches: byol.predictor (False: no predictor, the loss on the online projections, the paper's
ablation), byol.momentum (the base tau), byol.momentum_schedule ('cosine' official,
'constant'), byol.target_init ('independent' official, 'copy').

CPU and CIFAR presets: solo-learn's scripts/pretrain/cifar/byol.yaml (ResNet-18, LARS lr 1.0 x
batch / 256, momentum 0.9, eta 0.02 with clip_lr, weight decay 1e-5, biases and norms
excluded, warmup_cosine with 10 warm-up epochs, tau 0.99 -> 1, the heads 4096 / 256 / 4096,
augmentations/asymmetric.yaml: crop 0.08 - 1, jitter (0.4, 0.4, 0.2, 0.1) p 0.8, grey 0.2, no
blur, solarisation 0 / 0.2); here ResNet-18 at width 0.25, batch 128 / 256, 5
epochs with 1 / 0.5 warm-up epochs (cifar10_full: batch 512, 200 epochs, 10 warm-up epochs).

Deviations:
  * The ResNet is torchvision's (mim_jax.models.resnet): the official haiku ResNet pads with
    'SAME' (asymmetric at stride 2) and initialises convolutions with haiku's fan-in truncated
    normal; its bottleneck blocks zero-initialise the last BatchNorm scale, which is
    config.model.zero_init_residual=True in the imagenet preset. The BatchNorm running
    statistics use PyTorch's unbiased variance without haiku's zero-debiasing (they only
    matter for evaluation).
  * optax's LARS applies the learning rate before the momentum (mu = 0.9 mu + lr_t u_t); the
    official multiplies the momentum buffer by the current lr (mu = 0.9 mu + u_t, step lr_t
    mu). The two differ while the learning rate changes (warm-up and decay).
  * The CIFAR presets use mim_jax's LARS trust coefficient 1e-3 without clipping (solo-learn:
    eta 0.02, clip_lr=True); config.optim has no key for either (optim.py change needed).
    solo-learn's warm-up starts at 3e-5, here at 0.
  * The online linear classifier trained beside BYOL (on stop-gradient features, so it does
    not change the representation) is not built: mim_jax evaluates with kNN and a linear probe.
  * The colour ops are torchvision's on PIL levels (data/views.py); the official ones are
    TF-style float ops (augmentations.py), blur with a sampled kernel of 10% of the side.
"""
from mim_jax import config_lib
from mim_jax.methods.joint_embedding import views_config

PRESETS = ('', 'cifar10', 'cifar10_full', 'imagenet')


def get_config(arg=None):
  preset = arg or "default"
  c = config_lib.base_config()
  c.method = "byol"
  c.byol = dict(projector_hidden_dim=4096, predictor_hidden_dim=4096, output_dim=256,
                predictor=True, head_init="haiku", momentum=0.996, momentum_schedule="cosine",
                target_init="independent", bn_groups=1,
                views=views_config())
  c.optim.update(name="lars", base_lr=0.2, lr_batch_divisor=256, momentum=0.9,
                 weight_decay=1.5e-6, schedule="cosine", warmup_epochs=10, warmup_lr=0.0,
                 min_lr=0.0)
  if preset in ("default", "cifar10", "cifar10_full"):
    config_lib.joint_embedding_preset(c, preset, epochs=(5, 5), batch=(128, 256))
    c.byol.momentum = 0.99
    c.byol.views.blur_probs = (0.0, 0.0, 0.0)
    c.optim.update(base_lr=1.0, weight_decay=1e-5)
    c.optim.warmup_epochs = {"default": 1.0, "cifar10": 0.5}.get(preset, 10.0)
  elif preset == "imagenet":
    config_lib.joint_embedding_imagenet(c, batch_size=4096, total_epochs=1000)
    c.model.zero_init_residual = True
  else:
    raise ValueError(f"unknown preset {preset!r}: use '', 'cifar10', 'cifar10_full' or 'imagenet'")
  return c
