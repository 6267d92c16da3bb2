r"""SimMIM: a Simple Framework for Masked Image Modeling (Xie et al., CVPR 2022).

Presets (`--config=configs/simmim.py:<preset>`):

  (none)     The embedded 5,000-image CIFAR-10 subset (4,000 train / 1,000 held out), a narrow
             ViT at 32 px, CPU-sized: the README's first command.
               python -m mim_jax.main --config=configs/simmim.py --workdir=/tmp/simmim
  cifar10    The CIFAR-10 image folder with 500 images per class held out for evaluation.
               python -m mim_jax.main --config=configs/simmim.py:cifar10 --workdir=/tmp/simmim_c10 \
                 --config.input.data.dir=../shared/data/cifar10/train
             A CPU-hour recipe (3 epochs, 4 blocks): kNN 28.0 / linear probe 37.0 top-1 on the
             held-out images vs 25.5 / 31.0 at random init (docs/results/mae_simmim.md).
  imagenet   The official ViT-B/16 recipe (configs/vit_base__800ep/
             simmim_pretrain__vit_base__img224__800ep.yaml) on tfds imagenet2012.

Official ViT-B settings: 224 px, patch 16, mask patch 32, mask ratio 0.6 (ceil(49 * 0.6) = 30
masked mask-patches), learnable mask token, encoder with q/v biases, layer scale 0.1, a shared
relative position bias and no absolute position embedding, drop path 0.1; decoder one 1x1 conv
to 16*16*3 channels + pixel shuffle; L1 loss on masked pixels; AdamW betas (0.9, 0.999),
eps 1e-8, weight decay 0.05 (none on biases, norms, pos_embed, cls_token), grad clip 5.0,
base lr 1e-4 x batch/512 with batch 2048, 10 warm-up epochs from 5e-7 x batch/512, multistep
x0.1 at epoch 700 of 800; RandomResizedCrop(scale 0.67-1, ratio 3/4-4/3) + flip.
Published: ViT-B/16 800 epochs, 83.8 top-1 after fine-tuning. The Swin backbones of the paper
are not in mim_jax yet.

Deviations: the CPU presets keep the method but use small ViTs, an absolute sin-cos position
embedding instead of the relative bias at 32 px, a cosine schedule and short runs.
"""
from mim_jax import config_lib

# The presets get_config takes ('' = the default, embedded data), for tests and tools.
PRESETS = ('', 'cifar10', 'imagenet')


def get_config(arg=None):
  preset = arg or "default"
  c = config_lib.base_config()
  c.method = "simmim"
  c.simmim = dict(mask_patch_size=32, mask_ratio=0.6)
  c.model.update(qkv_bias="qv", init_values=0.1, init_style="beit", pos_embed="none",
                 rel_pos_bias="shared", drop_path=0.1)
  c.optim.update(name="adamw", base_lr=1e-4, lr_batch_divisor=512, b1=0.9, b2=0.999, eps=1e-8,
                 weight_decay=0.05, clip_grad=5.0, warmup_lr=5e-7, min_lr=5e-6)
  c.input.aug.crop_scale = (0.67, 1.0)
  c.input.aug.crop_ratio = (3.0 / 4.0, 4.0 / 3.0)

  if preset in ("default", "cifar10"):
    c.input.image_size = 32
    c.simmim.mask_patch_size = 8          # a 4x4 grid of mask patches, 10 of 16 masked
    c.model.update(variant="tiny", depth=6, patch_size=4, drop_path=0.0,
                   pos_embed="sincos", rel_pos_bias="none")
    c.optim.update(schedule="cosine", base_lr=2e-3)   # 2e-3 x 256/512 = 1e-3 peak
    c.pooling = "mean"
    c.evals = config_lib.default_evals(probe_epochs=30, probe_optimizer="sgd", pooling="mean")
    if preset == "default":
      c.input.data.update(name="embedded", holdout_per_class=100)
      c.input.batch_size = 128
      c.optim.warmup_epochs = 1
      c.total_epochs = 6                  # 186 steps: about 6 minutes on 2 CPU cores
      c.ema.enabled = True
      c.ema.decay = 0.99
      c.log_every = 10
      c.ckpt_every = 200
    else:
      c.input.data.update(name="image_folder", dir="", holdout_per_class=500)
      c.input.batch_size = 256
      c.model.depth = 4                   # CPU budget
      c.optim.warmup_epochs = 0.5
      c.total_epochs = 3                  # CPU budget: 525 steps, about 25 minutes on 2 cores
      c.evals.knn.max_train = c.evals.linear.max_train = 20_000   # CPU budget: a seeded subset
      c.log_every = 20
      c.ckpt_every = 500
  elif preset == "imagenet":
    config_lib.imagenet_preset(c, batch_size=2048, total_epochs=800, variant="base")
    c.optim.update(schedule="multistep", warmup_epochs=10, milestones_epochs=(700,), gamma=0.1)
  else:
    raise ValueError(f"unknown preset {preset!r}: use '', 'cifar10' or 'imagenet'")
  return c
