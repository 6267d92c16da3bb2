r"""SimSiam (Chen & He, 2021), exact to facebookresearch/simsiam.

Presets (`--config=configs/simsiam.py:<preset>`):

  (none)       The embedded 5,000-image CIFAR-10 subset, a ResNet-18 (CIFAR stem) at a quarter
               width, CPU-sized (minutes on 2 cores).
                 python -m mim_jax.main --config=configs/simsiam.py --workdir=/tmp/simsiam
  cifar10      The CIFAR-10 image folder, 500 images per class held out, a quarter-width
               ResNet-18 (CIFAR stem), 5 epochs (benchmarks/joint_embedding_cpu.py prints its time).
                 python -m mim_jax.main --config=configs/simsiam.py:cifar10 --workdir=/tmp/ss_c10 \
                   --config.input.data.dir=../shared/data/cifar10/train
  cifar10_full solo-learn's CIFAR-10 recipe at lightly's benchmark length (full ResNet-18,
               batch 512, 200 epochs; kNN k=200, T=0.1), for a GPU.
  imagenet     The official 100-epoch ResNet-50 recipe (README command) on tfds imagenet2012.

Official settings (main_simsiam.py defaults, the README's pre-training command):
  * ResNet-50 (zero_init_residual=True), projector 2048-2048-2048 (BatchNorm, the last
    affine-free), predictor 2048 -> 512 -> 2048, SyncBatchNorm (mim_jax's BatchNorm is global
    over the devices by default), each view forwarded on its own.
  * SGD momentum 0.9, weight decay 1e-4 on every parameter, lr 0.05 x batch / 256, no
    warm-up, cosine to 0 set once per EPOCH (adjust_learning_rate), --fix-pred-lr (the
    predictor's lr stays at the initial lr), batch 512, 100 epochs.
  * MoCo v2's augmentation for both views: RandomResizedCrop 0.2 - 1, ColorJitter (0.4, 0.4,
    0.4, 0.1) p 0.8, grey p 0.2, Gaussian blur (sigma 0.1 - 2) p 0.5, flip; no solarisation.

Switches: simsiam.stop_gradient (False: the paper's collapse ablation), simsiam.fix_pred_lr,
simsiam.proj_hidden_dim (0: the encoder's width, as the official), proj_dim, pred_hidden_dim.

CPU and CIFAR presets: solo-learn's scripts/pretrain/cifar/simsiam.yaml (ResNet-18, projector
2048-2048-2048, predictor 512, SGD lr 0.5 x batch / 256, momentum 0.9 (solo/args/pretrain.py
default), weight decay 1e-5 on every parameter, warmup_cosine with 10 warm-up epochs, the
predictor's lr static; augmentations/symmetric_weak.yaml: crop 0.08 - 1, jitter (0.4, 0.4, 0.4,
0.1) p 0.8, grey 0.2, blur p 0.5, no solarisation); here ResNet-18 at width 0.25, batch
128 / 256, 5 epochs with 1 / 0.5 warm-up epochs (cifar10_full: batch 512, 200 epochs, 10
warm-up epochs). zero_init_residual=True as the official builder in every preset.

The imagenet preset's cosine is set once per epoch (optim.schedule 'cosine_epoch', lr_e =
init_lr (1 + cos(pi e / epochs)) / 2) and fix_pred_lr is the optimiser group 'constant_lr' on
the predictor (the peak lr at every step). The CIFAR presets follow solo-learn: a per-step
warm-up cosine, the predictor's lr static.

Deviations:
  * The official projector's last Linear has a frozen bias; here none (the affine-free
    BatchNorm after it removes any constant shift: identical outputs and gradients).
  * The colour ops are torchvision's on PIL levels (data/views.py); the blur is PIL's box-blur
    approximation of a Gaussian. solo-learn's warm-up starts at 3e-5, here at 0.
"""
from mim_jax import config_lib
from mim_jax.methods.joint_embedding import views_config

PRESETS = ('', 'cifar10', 'cifar10_full', 'imagenet')


def get_config(arg=None):
  preset = arg or "default"
  c = config_lib.base_config()
  c.method = "simsiam"
  c.simsiam = dict(proj_hidden_dim=0, proj_dim=2048, pred_hidden_dim=512, stop_gradient=True,
                   fix_pred_lr=True, head_init="torch", decay_all=True, bn_groups=1,
                   views=views_config(scale=(0.2, 1.0), jitter=(0.4, 0.4, 0.4, 0.1),
                                      blur_probs=(0.5, 0.5), solarize_prob=0.0))
  c.optim.update(name="sgd", base_lr=0.05, lr_batch_divisor=256, momentum=0.9,
                 weight_decay=1e-4, schedule="cosine", warmup_epochs=0.0, warmup_lr=0.0,
                 min_lr=0.0)
  if preset in ("default", "cifar10", "cifar10_full"):
    config_lib.joint_embedding_preset(c, preset, epochs=(5, 5), batch=(128, 256))
    c.simsiam.proj_hidden_dim = 2048
    c.simsiam.views.global_scale = (0.08, 1.0)
    c.optim.update(base_lr=0.5, weight_decay=1e-5)
    c.optim.warmup_epochs = {"default": 1.0, "cifar10": 0.5}.get(preset, 10.0)
  elif preset == "imagenet":
    config_lib.joint_embedding_imagenet(c, batch_size=512, total_epochs=100)
    c.optim.schedule = "cosine_epoch"
  else:
    raise ValueError(f"unknown preset {preset!r}: use '', 'cifar10', 'cifar10_full' or 'imagenet'")
  c.model.zero_init_residual = True
  return c
