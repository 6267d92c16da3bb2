r"""SimCLR v1 / v2 (Chen et al., 2020), exact to google-research/simclr (tf2/).

Presets (`--config=configs/simclr.py:<preset>`):

  (none)       The embedded 5,000-image CIFAR-10 subset (4,000 train / 1,000 held out), a
               ResNet-18 (CIFAR stem) at a quarter width, CPU-sized (minutes on 2 cores).
                 python -m mim_jax.main --config=configs/simclr.py --workdir=/tmp/simclr
  cifar10      The CIFAR-10 image folder, 500 images per class held out, a quarter-width
               ResNet-18 (CIFAR stem), 5 epochs (benchmarks/joint_embedding_cpu.py prints its time).
                 python -m mim_jax.main --config=configs/simclr.py:cifar10 --workdir=/tmp/simclr_c10 \
                   --config.input.data.dir=../shared/data/cifar10/train
  cifar10_full The official CIFAR-10 command's model and optimiser at lightly's benchmark length
               (full ResNet-18, batch 512, 200 epochs; kNN k=200, T=0.1), for a GPU.
  imagenet     SimCLR v2's ResNet-50 (1x) recipe on tfds imagenet2012.

Official settings (tf2/run.py defaults; README's CIFAR-10 command for the cifar presets):
  * ImageNet (v2): ResNet-50, 3-layer projection head (2048 -> 2048 -> 128, BatchNorm, no
    bias), temperature 0.1, LARS (momentum 0.9, trust coefficient 0.001, weight decay 1e-6;
    biases and BatchNorm excluded from decay and adaptation), lr 0.3 x batch / 256, 10 warm-up
    epochs then cosine to 0, batch 4096, 800 epochs (v1: 2-layer head, 1000 epochs). Crops
    RandomResizedCrop (0.08 - 1, aspect 3/4 - 4/3) + flip, colour distortion strength 1.0
    (ColorJitter 0.8, 0.8, 0.8, 0.2 in random order, p 0.8; grey p 0.2), Gaussian blur p 0.5
    per view (sigma 0.1 - 2.0), global BatchNorm.
  * CIFAR-10: ResNet-18 with the CIFAR stem, batch 512, 1000 epochs, lr 1.0 x batch / 256
    (LARS, linear scaling), weight decay 1e-4, temperature 0.5, colour strength 0.5, no blur.

Switches: simclr.proj_head_mode 'nonlinear' | 'linear' | 'none' (the paper's head study),
simclr.num_proj_layers (v1 2, v2 3), simclr.color_strength s (the jitter is (0.8 s, 0.8 s,
0.8 s, 0.2 s); views.jitter is not read), simclr.temperature, simclr.aug_study (the paper's
augmentation study, Sec. 3 / Fig. 5: '' is the recipe; 'op' or 'op1+op2' with ops crop, color,
rotate, cutout, noise, blur, sobel leaves one branch as the image and gives the other those
operators in order; tools/joint_embedding_tables.py --table simclr_aug runs every single op
and pair).

The study's operators (data/views.py): crop, colour and blur are the recipe's (crop
RandomResizedCrop views.global_scale + flip; colour the jitter of color_strength with p 0.8
then greyscale p 0.2; blur radius U(0.1, 2) always). The paper gives no parameters for the
other four, nor does the official code hold them; mim_jax's choice: rotate 90 / 180 / 270
uniformly; cutout one black square of side U(1/4, 1/2) of the image, centre uniform (clipped
at the borders); noise additive Gaussian, sigma U(0, 25.5) levels per image; Sobel the
gradient magnitude of the luma (3x3 kernels) in all three channels. Both branches start from
the image at the input size (in-memory data as stored, resized if needed; streamed data the
centre square); the paper first takes one random crop for both (ImageNet's sizes differ).

Deviations:
  * The colour ops are torchvision's on PIL levels (data/views.py): brightness, contrast and
    saturation are multiplicative blends as TF's simclrv2 colour path; hue is PIL's 8-bit HSV;
    the blur is PIL's box-blur approximation of a Gaussian of radius sigma (TF: a sampled
    Gaussian kernel of 10% of the image side). In-memory data is cropped bilinearly on the
    device (TF: bicubic crop_and_resize).
  * The ResNet is torchvision's (zero-init residual off, kaiming-normal fan-out convolutions,
    BatchNorm momentum 0.1 = TF's decay 0.9, eps 1e-5); TF's ResNet uses variance-scaling
    initialisers. The head's kernels are N(0, 0.01) as TF's LinearLayer.
  * The total steps are epochs x examples / batch (TF adds 1).
Fine-tuning from the head's first layer (v2's ft_proj_selector=1): configs/finetune.py on the
pretraining run's model, with the projector's first layer kept in front of the classifier:
  python -m mim_jax.main --config=configs/finetune.py:resnet18_cifar10 --workdir=/tmp/simclr_ft \
    --config.input.data.dir=../shared/data/cifar10/train --config.model.width=0.25 \
    --config.finetune.pretrained=/tmp/simclr_c10 --config.finetune.proj_layers=1
v2's semi-supervised stage: fine-tune on a labelled subset (add
--config.input.data.train_subset=0.1 above, workdir /tmp/simclr_ft10), then distil it into a
student on every training image with its soft labels (finetune.distill, no labels used; the
student here the same ResNet without the head, from scratch: self-distillation):
  python -m mim_jax.main --config=configs/finetune.py:resnet18_cifar10 --workdir=/tmp/simclr_kd \
    --config.input.data.dir=../shared/data/cifar10/train --config.model.width=0.25 \
    --config.finetune.distill.teacher=/tmp/simclr_ft10
The teacher's runs (the fine-tune and its pretraining run) must stay where they are while the
student starts.
CPU presets: ResNet-18 at width 0.25, batch 128 / 256, 5 epochs with 1 / 0.5
warm-up epochs, the official CIFAR-10 optimiser, temperature, colour strength and no blur.
"""
from mim_jax import config_lib
from mim_jax.methods.joint_embedding import views_config

PRESETS = ('', 'cifar10', 'cifar10_full', 'imagenet')


def get_config(arg=None):
  preset = arg or "default"
  c = config_lib.base_config()
  c.method = "simclr"
  c.simclr = dict(temperature=0.1, proj_head_mode="nonlinear", num_proj_layers=3,
                  proj_out_dim=128, head_init="normal_0.01", color_strength=1.0,
                  aug_study="",      # the augmentation study: 'crop+color' etc. ('' = recipe)
                  # views.jitter is (0.8 s, 0.8 s, 0.8 s, 0.2 s) of color_strength s.
                  views=views_config(blur_probs=(0.5, 0.5), solarize_prob=0.0))
  c.optim.update(name="lars", base_lr=0.3, lr_batch_divisor=256, momentum=0.9, weight_decay=1e-6,
                 schedule="cosine", warmup_epochs=10, min_lr=0.0)
  if preset in ("default", "cifar10", "cifar10_full"):
    config_lib.joint_embedding_preset(c, preset, epochs=(5, 5), batch=(128, 256))
    c.simclr.update(temperature=0.5, color_strength=0.5)
    c.simclr.views.blur_probs = (0.0, 0.0, 0.0)
    c.optim.update(base_lr=1.0, weight_decay=1e-4)
    if preset != "cifar10_full":
      c.optim.warmup_epochs = 1.0 if preset == "default" else 0.5
  elif preset == "imagenet":
    config_lib.joint_embedding_imagenet(c, batch_size=4096, total_epochs=800)
  else:
    raise ValueError(f"unknown preset {preset!r}: use '', 'cifar10', 'cifar10_full' or 'imagenet'")
  return c
