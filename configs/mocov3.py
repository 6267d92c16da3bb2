r"""MoCo v3 (Chen, Xie and He, ICCV 2021), exact to facebookresearch/moco-v3.

Presets (`--config=configs/mocov3.py:<preset>`):

  (none)       The embedded 5,000-image CIFAR-10 subset (4,000 train / 1,000 held out), a
               ResNet-18 (CIFAR stem) at a quarter width, CPU-sized (minutes on 2 cores).
                 python -m mim_jax.main --config=configs/mocov3.py --workdir=/tmp/mocov3
  cifar10      The CIFAR-10 image folder, 500 images per class held out, a quarter-width
               ResNet-18 (CIFAR stem), 5 epochs (benchmarks/joint_embedding_cpu.py prints its time).
                 python -m mim_jax.main --config=configs/mocov3.py:cifar10 --workdir=/tmp/mocov3_c10 \
                   --config.input.data.dir=../shared/data/cifar10/train
  cifar10_full lightly's CIFAR-10 benchmark length (full ResNet-18, batch 512, 200 epochs; kNN
               k=200, T=0.1) with the full-size heads, for a GPU.
  imagenet     The ResNet-50 100-epoch recipe of CONFIG.md on tfds imagenet2012 (published:
               linear 68.9).
  imagenet_vit The ViT-Small recipe of CONFIG.md (300 epochs, batch 4096; published: linear
               73.2). ViT-Base/16 (76.7) is the same command with --config.model.variant=base.

Official settings (main_moco.py defaults, CONFIG.md commands):
  * Heads: dim 256, mlp_dim 4096, Linear without bias + BatchNorm + ReLU. ResNet: projector
    2048 -> 4096 -> 256 + BatchNorm(affine=False), predictor 256 -> 4096 -> 256 (no last BN);
    ViT: projector D -> 4096 -> 4096 -> 256 + BN(affine=False), predictor 256 -> 4096 -> 256 +
    BN(affine=False) (mocov3.heads 'auto' picks the pair of config.model.name). SyncBatchNorm.
  * Momentum encoder 0.99 -> 1 on a half-cosine per iteration (--moco-m-cos in every command).
  * Views (BYOL's): RandomResizedCrop 224 scale (crop_min, 1), ColorJitter (0.4, 0.4, 0.2,
    0.1) p 0.8, grey p 0.2, Gaussian blur sigma 0.1 - 2 p 1.0 / 0.1, solarisation p 0.2 on the
    second view, flip.
  * ResNet-50, 100 epochs: torchvision ResNet-50 (zero_init_residual=True), LARS (momentum
    0.9, trust 0.001, no decay / adaptation on <= 1-D parameters), lr 0.6 x batch / 256, weight
    decay 1e-6, 10 warm-up epochs then half-cosine to 0, batch 4096, T 1.0, crop_min 0.2.
    (300 epochs: lr 0.3; 1000 epochs: lr 0.3, wd 1.5e-6, momentum 0.996.)
  * ViT-S/16 and ViT-B/16: AdamW (0.9, 0.999, eps 1e-8), lr 1.5e-4 x batch / 256, weight
    decay 0.1 on every parameter (mocov3.decay_all), 40 warm-up epochs then cosine to 0, 300
    epochs, batch 4096, T 0.2, crop_min 0.08, --stop-grad-conv1 (the random patch projection
    stays frozen: mocov3.stop_grad_conv1), fixed 2-D sin-cos position embedding, MoCo's ViT
    initialisation (mocov3.vit_init).

Deviations:
  * The sin-cos table is MAE's layout (first half of the channels the column, second half the
    row); vits.py's torch.meshgrid ('ij' indexing) puts the row first: the same table for the
    image transposed. Needs a row-first option in models/vit.py `sincos_2d`.
  * Mixed precision: the official forward runs under torch autocast (float16, GradScaler);
    the ImageNet presets compute in bfloat16, the heads and the loss in float32.
  * optax's LARS multiplies the learning rate into the update before the momentum buffer
    (mu = 0.9 mu + lr g'); moco/optimizer.py accumulates g' and multiplies by the current lr
    (same update at a constant learning rate, slightly different while it changes).
  * The colour ops are torchvision's on PIL levels (data/views.py), the blur PIL's box-blur
    approximation of a Gaussian; in-memory data is cropped bilinearly on the device.
  * The total steps are epochs x examples / batch (the official loader drops the last
    partial batch).
CPU presets: ResNet-18 at width 0.25, batch 128 / 256, 5 epochs with 1 / 0.5
warm-up epochs, mlp_dim 1024 (4096 in cifar10_full), no blur (32 px images), and solo-learn's
CIFAR-10 MoCo v3 settings (scripts/pretrain/cifar/mocov3.yaml: LARS lr 0.3 x batch / 256, wd
1e-6, T 0.2; its LARS eta 0.02 and lr clipping are not reproduced); every cifar preset keeps
crop scale (0.08, 1).
"""
from mim_jax import config_lib
from mim_jax.methods.joint_embedding import views_config

PRESETS = ('', 'cifar10', 'cifar10_full', 'imagenet', 'imagenet_vit')


def get_config(arg=None):
  preset = arg or "default"
  c = config_lib.base_config()
  c.method = "mocov3"
  c.mocov3 = dict(
      dim=256, mlp_dim=4096,
      temperature=1.0,                # --moco-t (ResNet 1.0, ViT 0.2)
      momentum=0.99, momentum_schedule="cosine",
      heads="auto",                   # 'resnet' | 'vit' | 'auto' (config.model.name's)
      stop_grad_conv1=True,           # ViT only: frozen random patch projection
      vit_init=True,                  # ViT only: vits.py's initialisation
      head_init="torch",
      decay_all=False,                # True: decay every parameter (torch AdamW, the ViT recipe)
      views=views_config(scale=(0.2, 1.0)))
  c.optim.update(name="lars", base_lr=0.6, lr_batch_divisor=256, momentum=0.9, weight_decay=1e-6,
                 schedule="cosine", warmup_epochs=10, min_lr=0.0)
  if preset in ("default", "cifar10", "cifar10_full"):
    config_lib.joint_embedding_preset(c, preset, epochs=(5, 5), batch=(128, 256))
    c.model.zero_init_residual = True
    c.mocov3.update(temperature=0.2, mlp_dim=4096 if preset == "cifar10_full" else 1024)
    c.mocov3.views.global_scale = (0.08, 1.0)
    c.mocov3.views.blur_probs = (0.0, 0.0, 0.0)
    c.optim.update(base_lr=0.3, weight_decay=1e-6)
    if preset != "cifar10_full":
      c.optim.warmup_epochs = 1.0 if preset == "default" else 0.5
  elif preset == "imagenet":
    config_lib.joint_embedding_imagenet(c, batch_size=4096, total_epochs=100)
    c.model.zero_init_residual = True
  elif preset == "imagenet_vit":
    config_lib.imagenet_preset(c, batch_size=4096, variant="small", total_epochs=300)
    c.model.update(pos_embed="sincos", qkv_bias="qkv", init_values=0.0, drop_path=0.0)
    # vits.py's vit_small has 12 heads of 32 channels (DeiT's / MAE's ViT-S: 6 of 64); vit_base
    # 12 as mim_jax's 'base'.
    c.model.num_heads = 12
    c.evals.reconstruction.enabled = False
    config_lib.knn_200(c)
    c.mocov3.update(temperature=0.2, stop_grad_conv1=True, decay_all=True)
    c.mocov3.views.global_scale = (0.08, 1.0)
    c.optim.update(name="adamw", base_lr=1.5e-4, b1=0.9, b2=0.999, eps=1e-8, weight_decay=0.1,
                   warmup_epochs=40)
  else:
    raise ValueError(f"unknown preset {preset!r}: use '', 'cifar10', 'cifar10_full', 'imagenet' "
                     f"or 'imagenet_vit'")
  return c
