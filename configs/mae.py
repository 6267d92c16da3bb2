r"""MAE: Masked Autoencoders Are Scalable Vision Learners (He et al., CVPR 2022).

Presets (`--config=configs/mae.py:<preset>`):

  (none)     The embedded 5,000-image CIFAR-10 subset (4,000 train / 1,000 held out), a narrow
             ViT at 32 px, CPU-sized, as the README's first command (configs/simmim.py).
               python -m mim_jax.main --config=configs/mae.py --workdir=/tmp/mae
  cifar10    The CIFAR-10 image folder with 500 images per class held out for evaluation.
               python -m mim_jax.main --config=configs/mae.py:cifar10 --workdir=/tmp/mae_c10 \
                 --config.input.data.dir=../shared/data/cifar10/train
             A CPU-hour recipe (6 epochs): kNN 41.9 / linear probe 54.1 top-1 on the held-out
             images vs 31.5 / 44.1 at random init (docs/results/mae_simmim.md,
             tools/cifar10_table.sh).
  imagenet   The paper's ViT-B/16 recipe on ImageNet-1k (tfds imagenet2012 through
             tfds.data_source, prepared under config.input.data.dir).
  imagenet_large   Same with ViT-L/16.

Paper settings (facebookresearch/mae, main_pretrain.py + PRETRAIN.md), used by the imagenet
presets: 224 px, patch 16, mask ratio 0.75, norm_pix_loss, decoder 8 blocks x 512 x 16 heads,
AdamW betas (0.9, 0.95), weight decay 0.05 (none on biases and norm scales), base lr 1.5e-4 x
batch/256 with batch 4096, 40 warm-up epochs then half-cycle cosine to 0, 800 epochs,
RandomResizedCrop(scale 0.2-1, bicubic) + horizontal flip, ImageNet mean/std.
Published (PRETRAIN/FINETUNE.md, 1600 epochs): ViT-B/16 83.6 fine-tune, 68.0 linear probe;
ViT-L/16 85.9 fine-tune, 75.8 linear probe.

Deviations: the CPU presets use small models and short schedules (stated below); everything
about the method itself is the official one. The official code's effective batch of 4096 is one
optimiser step here; set config.optim.grad_accum to split it over micro-batches.
"""
from mim_jax import config_lib

# The presets get_config takes ('' = the default, embedded data), for tests and tools.
PRESETS = ('', 'cifar10', 'imagenet', 'imagenet_large')


def get_config(arg=None):
  preset = arg or "default"
  c = config_lib.base_config()
  c.method = "mae"
  c.mae = dict(mask_ratio=0.75, norm_pix_loss=True, decoder=dict(width=512, depth=8, heads=16))
  c.optim.update(name="adamw", base_lr=1.5e-4, lr_batch_divisor=256, b1=0.9, b2=0.95,
                 weight_decay=0.05, schedule="cosine", min_lr=0.0, clip_grad=0.0)
  c.input.aug.crop_scale = (0.2, 1.0)

  if preset == "default":
    c.input.data.update(name="embedded", holdout_per_class=100)
    c.input.batch_size = 128
    c.input.image_size = 32
    c.model.update(variant="tiny", depth=6, patch_size=4)
    c.mae.decoder = dict(width=128, depth=2, heads=4)
    c.optim.base_lr = 1.5e-3           # 1.5e-3 * 128/256 = 7.5e-4 peak: short runs want more
    c.optim.warmup_epochs = 2
    c.total_epochs = 12                # 372 steps: about 5 minutes on 2 CPU cores
    c.ema.enabled = True               # evaluated beside the online encoder
    c.ema.decay = 0.99
    c.log_every = 10
    c.ckpt_every = 200
    c.pooling = "mean"
    c.evals = config_lib.default_evals(probe_epochs=30, probe_optimizer="sgd", pooling="mean")
  elif preset == "cifar10":
    c.input.data.update(name="image_folder", dir="", holdout_per_class=500)
    c.input.batch_size = 256
    c.input.image_size = 32
    c.model.update(variant="tiny", depth=6, patch_size=4)
    c.mae.decoder = dict(width=128, depth=2, heads=4)
    c.optim.base_lr = 1.5e-3
    c.optim.warmup_epochs = 1
    c.total_epochs = 6                 # CPU budget: 1,050 steps, about 30 minutes on 2 cores
    c.ema.enabled = False
    c.log_every = 20
    c.ckpt_every = 500
    c.pooling = "mean"
    c.evals = config_lib.default_evals(probe_epochs=30, probe_optimizer="sgd", pooling="mean")
    c.evals.knn.max_train = c.evals.linear.max_train = 20_000   # CPU budget: a seeded subset
  elif preset in ("imagenet", "imagenet_large"):
    config_lib.imagenet_preset(c, batch_size=4096, total_epochs=800,
                               variant="large" if preset == "imagenet_large" else "base")
    c.optim.warmup_epochs = 40
  else:
    raise ValueError(f"unknown preset {preset!r}: use '', 'cifar10', 'imagenet' or 'imagenet_large'")
  return c
