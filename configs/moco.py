r"""MoCo v1 / v2 (He et al., 2020; Chen et al., 2020), exact to facebookresearch/moco
(main_moco.py, moco/builder.py, moco/loader.py; the CIFAR presets its CIFAR-10 demo,
colab/moco_cifar10_demo.ipynb).

Presets (`--config=configs/moco.py:<preset>`):

  (none)       The embedded 5,000-image CIFAR-10 subset (4,000 train / 1,000 held out), a
               ResNet-18 (CIFAR stem) at a quarter width, the CIFAR demo's recipe, CPU-sized
               (minutes on 2 cores).
                 python -m mim_jax.main --config=configs/moco.py --workdir=/tmp/moco
  cifar10      The CIFAR-10 image folder, 500 images per class held out, a quarter-width
               ResNet-18 (CIFAR stem), the CIFAR demo's recipe for 5 epochs
               (benchmarks/joint_embedding_cpu.py prints its time).
                 python -m mim_jax.main --config=configs/moco.py:cifar10 --workdir=/tmp/moco_c10 \
                   --config.input.data.dir=../shared/data/cifar10/train
  cifar10_full The CIFAR demo (full ResNet-18, CIFAR stem, batch 512, 200 epochs: also lightly's
               benchmark length; kNN k=200, T=0.1 as the demo's monitor), for a GPU.
  imagenet     MoCo v2 (README: --mlp --moco-t 0.2 --aug-plus --cos) on tfds imagenet2012,
               ResNet-50, batch 256 as 8 GPUs of 32 (model.bn_groups=8), 200 epochs.
  imagenet_v1  MoCo v1 (main_moco.py's defaults), otherwise as imagenet.

The official flags are config keys (the v2 ablation switches are overrides):
  --moco-dim moco.dim, --moco-k moco.k, --moco-m moco.momentum, --moco-t moco.temperature,
  --mlp moco.mlp, --aug-plus moco.aug_plus, the demo's --symmetric moco.symmetric, its
  --bn-splits model.bn_groups, --lr optim.base_lr (x batch / 256), --wd optim.weight_decay,
  --schedule optim.milestones_epochs, and --cos optim.schedule='cosine_epoch' (else 'multistep').
  moco.shuffle_bn=False turns shuffling BN off (the paper's ablation).

Official settings:
  * ImageNet v1 (main_moco.py defaults): ResNet-50 whose fc is Linear(2048, 128), K = 65,536,
    m = 0.999, T = 0.07, SGD (momentum 0.9, weight decay 1e-4 on every parameter) lr 0.03 for
    batch 256 on 8 GPUs (here x batch / 256), 200 epochs, lr x 0.1 at epochs 120 and 160, no
    warm-up; augmentation RandomResizedCrop(224, scale 0.2 - 1), RandomGrayscale(0.2),
    ColorJitter(0.4, 0.4, 0.4, 0.4) always, flip; shuffling BN over the 8 GPUs.
  * ImageNet v2: T = 0.2, fc = Linear(2048, 2048) + ReLU + Linear(2048, 128), cosine lr
    (lr x (1 + cos(pi epoch / epochs)) / 2), aug+: RandomResizedCrop(224, 0.2 - 1),
    ColorJitter(0.4, 0.4, 0.4, 0.1) p 0.8, RandomGrayscale(0.2), GaussianBlur(sigma 0.1 - 2)
    p 0.5, flip, the same for both crops.
  * CIFAR-10 demo: ResNet-18 with the CIFAR stem (3x3 conv, no max-pool) and SplitBatchNorm of
    8 splits (= model.bn_groups 8, in both encoders), fc Linear(512, 128), K = 4096, m = 0.99,
    T = 0.1, SGD lr 0.06 for batch 512 (0.03 x batch / 256), weight decay 5e-4, momentum 0.9,
    cosine, 200 epochs, batch 512; RandomResizedCrop(32) (scale 0.08 - 1), flip,
    ColorJitter(0.4, 0.4, 0.4, 0.1) p 0.8, RandomGrayscale(0.2), no blur; the symmetric loss
    (the notebook's table reports both; its row 'Symmetric' is the better, 85.3 kNN at 200
    epochs, and the one these presets follow; the notebook's own args set symmetric=False).

Deviations:
  * The key-encoder update runs after the optimiser step (mim_jax's teacher update) instead
    of at the start of the next forward: the same key encoders at every step.
  * Shuffling BN is emulated on the jitted global batch: one permutation, per-group BatchNorm
    statistics (model.bn_groups consecutive groups), un-permuted keys; the query encoder uses
    the same groups. The running statistics move towards the mean of the groups' statistics
    (the demo's SplitBatchNorm does this; DDP keeps rank 0's, broadcast at each forward).
  * v1's augmentation (moco.aug_plus=False) applies ColorJitter before RandomGrayscale
    (data/views.py's order; main_moco.py applies greyscale first, then jitter); the colour
    ops are torchvision's on PIL levels, the crop bilinear on in-memory data, the blur PIL's
    box-blur approximation (data/views.py). The flip comes right after the crop (it commutes
    with the colour ops).
  * The cosine is set once per epoch as main_moco.py's adjust_learning_rate (optim.schedule
    'cosine_epoch'); the demo counts its epochs from 1, here from 0.
  * The demo's kNN monitor reads the 128-d fc output of the query encoder; mim_jax's kNN and
    linear probe read the pooled encoder features (main_lincls.py's), of both encoders.
  * The queue's initial random keys come from jax.random (seed config.seed), not torch.randn.
  * Gradient accumulation is refused (shuffling BN permutes the whole global batch).
CPU presets: the demo's recipe on a ResNet-18 at width 0.25, batch 128 / 256, 5
epochs, no warm-up; K scaled down to 512 for the embedded subset (4,000 images, 2 steps of
symmetric keys; the demo's 4096 is 8% of its 50,000), 4096 for cifar10 (45,000 images).
"""
from mim_jax import config_lib
from mim_jax.methods.joint_embedding import views_config

PRESETS = ('', 'cifar10', 'cifar10_full', 'imagenet', 'imagenet_v1')


def get_config(arg=None):
  preset = arg or "default"
  c = config_lib.base_config()
  c.method = "moco"
  # main_moco.py's defaults (v1) with aug+ written in the views block (moco.aug_plus picks it).
  c.moco = dict(dim=128, k=65536, momentum=0.999, momentum_schedule="constant",
                temperature=0.07, mlp=False, aug_plus=False, symmetric=False, shuffle_bn=True,
                head_init="torch", decay_all=True,
                views=views_config(scale=(0.2, 1.0), jitter=(0.4, 0.4, 0.4, 0.1),
                                   blur_probs=(0.5, 0.5), solarize_prob=0.0))
  c.optim.update(name="sgd", base_lr=0.03, lr_batch_divisor=256, momentum=0.9, weight_decay=1e-4,
                 schedule="multistep", milestones_epochs=(120, 160), gamma=0.1,
                 warmup_epochs=0.0, min_lr=0.0)
  if preset in ("default", "cifar10", "cifar10_full"):
    config_lib.joint_embedding_preset(c, preset, epochs=(5, 5), batch=(128, 256))
    # The CIFAR-10 demo: its augmentation (aug+ without blur, crop scale 0.08 - 1), 8 BN
    # splits, K 4096, m 0.99, T 0.1, wd 5e-4, cosine, symmetric loss.
    c.model.bn_groups = 8
    c.moco.update(k={"default": 512}.get(preset, 4096), momentum=0.99, temperature=0.1,
                  aug_plus=True, symmetric=True)
    c.moco.views.global_scale = (0.08, 1.0)
    c.moco.views.blur_probs = (0.0, 0.0, 0.0)
    c.optim.update(weight_decay=5e-4, schedule="cosine_epoch", milestones_epochs=(), warmup_epochs=0.0)
  elif preset in ("imagenet", "imagenet_v1"):
    config_lib.joint_embedding_imagenet(c, batch_size=256, total_epochs=200)
    c.model.bn_groups = 8     # the official 8 GPUs: per-GPU BatchNorm, shuffled across them
    if preset == "imagenet":  # v2: --mlp --moco-t 0.2 --aug-plus --cos
      c.moco.update(mlp=True, temperature=0.2, aug_plus=True)
      c.optim.update(schedule="cosine_epoch", milestones_epochs=())
  else:
    raise ValueError(f"unknown preset {preset!r}: use '', 'cifar10', 'cifar10_full', 'imagenet' "
                     f"or 'imagenet_v1'")
  return c
