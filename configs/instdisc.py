r"""InstDisc: non-parametric instance discrimination (Wu et al., CVPR 2018), exact to
zhirongw/lemniscate.pytorch.

Presets (`--config=configs/instdisc.py:<preset>`):

  (none)       The embedded 5,000-image CIFAR-10 subset (4,000 train / 1,000 held out), a
               ResNet-18 (CIFAR stem) at a quarter width, CPU-sized.
                 python -m mim_jax.main --config=configs/instdisc.py --workdir=/tmp/instdisc
  cifar10      The CIFAR-10 image folder, 500 images per class held out, a quarter-width
               ResNet-18 (CIFAR stem), 5 epochs (benchmarks/joint_embedding_cpu.py prints its time).
                 python -m mim_jax.main --config=configs/instdisc.py:cifar10 --workdir=/tmp/instdisc_c10 \
                   --config.input.data.dir=../shared/data/cifar10/train
  cifar10_full The official cifar.py at lightly's benchmark size (full ResNet-18, 200 epochs; the
               official batch 128), for a GPU.
  imagenet     main.py's ResNet-50 recipe on tfds imagenet2012.

Official settings (main.py for ImageNet, cifar.py for CIFAR-10): 128-d L2-normalised output
(Linear + Normalize after the pooled ResNet features; the CIFAR ResNet keeps nn.Conv2d's own
init, U(+-1/sqrt(fan_in)): model.conv_init='torch'; the ImageNet one torchvision's), memory
bank momentum 0.5, NCE with K = 4096 noise samples and Z fixed at the first batch, temperature
0.07 (ImageNet) / 0.1 (CIFAR); SGD momentum 0.9, lr 0.03, weight decay 1e-4 (ImageNet) / 5e-4
(CIFAR) on every parameter (biases and BatchNorm included), batch 256 / 128, 200 epochs, lr x
0.1 at epochs 120 and 160 (ImageNet) / 80, 120 and 160 (CIFAR); one view per image:
RandomResizedCrop(scale 0.2 - 1), RandomGrayscale(0.2), ColorJitter(0.4, 0.4, 0.4, 0.4), flip
(ImageNet; the CIFAR script has no flip and jitters before the greyscale). Evaluation: weighted
kNN k = 200 on the features with sigma = T (evals.knn_200: T = 0.1, the CIFAR setting).

Switches (the paper's Table 1): instdisc.objective 'nce' | 'softmax' (the non-parametric
softmax over the whole bank) | 'parametric' (a learned classifier over the instances);
instdisc.nce_k (m: 1, 10, 512, 4096); instdisc.proximal (λ of the proximal term, paper
Sec. 3.4; 0 in the released code).

Deviations:
  * The ImageNet transform order is grey -> jitter; mim_jax's colour pipeline jitters first
    (both are PIL ops; brightness and contrast commute with the greyscale up to rounding,
    saturation and hue do nothing on a grey image after it, so a grey image can differ).
  * The noise indices are drawn with jax.random (uniform over the N images, as the alias
    sampler over uniform unigrams), the bank's initial draw with jax.random.
  * In-memory data is cropped bilinearly on the device (torchvision: bilinear on PIL).
CPU presets: ResNet-18 at width 0.25, batch 128 / 256, 5 epochs, CIFAR settings
(T = 0.1, wd 5e-4, no flip), lr steps at 60% and 80% of the run; K = 4096 (1,024 on the
4,000-image embedded set).
"""
from mim_jax import config_lib
from mim_jax.methods.joint_embedding import views_config

PRESETS = ('', 'cifar10', 'cifar10_full', 'imagenet')


def get_config(arg=None):
  preset = arg or "default"
  c = config_lib.base_config()
  c.method = "instdisc"
  views = views_config(scale=(0.2, 1.0), jitter=(0.4, 0.4, 0.4, 0.4), jitter_prob=1.0,
                       blur_probs=(0.0, 0.0), solarize_prob=0.0)
  views["num_global"] = 1
  c.instdisc = dict(objective="nce", low_dim=128, nce_k=4096, nce_t=0.07, nce_m=0.5,
                    proximal=0.0, head_init="torch", decay_all=True, views=views)
  c.optim.update(name="sgd", base_lr=0.03, lr_batch_divisor=256, momentum=0.9, weight_decay=1e-4,
                 schedule="multistep", milestones_epochs=(120, 160), gamma=0.1,
                 warmup_epochs=0.0, min_lr=0.0)
  c.total_epochs = 200
  if preset in ("default", "cifar10", "cifar10_full"):
    config_lib.joint_embedding_preset(c, preset, epochs=(5, 5), batch=(128, 256))
    c.instdisc.update(nce_t=0.1)
    c.instdisc.views.hflip = False
    # models/resnet_cifar.py leaves its convolutions at nn.Conv2d's own init.
    c.model.conv_init = "torch"
    c.optim.update(weight_decay=5e-4, warmup_epochs=0.0)
    # cifar.py: lr 0.03 at batch 128 (the divisor keeps it at any batch).
    c.optim.lr_batch_divisor = 128
    if preset == "cifar10_full":
      c.input.batch_size = 128
      # cifar.py's adjust_learning_rate: lr x 0.1 ** ((epoch - 80) // 40) from epoch 80.
      c.optim.milestones_epochs = (80, 120, 160)
    else:
      c.optim.milestones_epochs = (0.6 * c.total_epochs, 0.8 * c.total_epochs)
    if preset == "default":
      c.instdisc.nce_k = 1024
  elif preset == "imagenet":
    config_lib.joint_embedding_imagenet(c, batch_size=256, total_epochs=200)
    c.model.dtype = "float32"
  else:
    raise ValueError(f"unknown preset {preset!r}: use '', 'cifar10', 'cifar10_full' or 'imagenet'")
  return c
