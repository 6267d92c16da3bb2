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
  swin_cifar10
             A narrow Swin v1 on the CIFAR-10 image folder at 32 px, CPU-sized (below).
               python -m mim_jax.main --config=configs/simmim.py:swin_cifar10 \
                 --workdir=/tmp/simmim_swin_c10 --config.input.data.dir=../shared/data/cifar10/train
             then fine-tune it with configs/finetune.py:swin_cifar10.
  imagenet_swin_b
             The official Swin-B recipe, 800 epochs (microsoft/SimMIM configs/swin_base__800ep/
             simmim_pretrain__swin_base__img192_window6__800ep.yaml) on tfds imagenet2012.
  imagenet_swinv2_b
             The official Swin V2-B recipe (microsoft/Swin-Transformer configs/simmim/
             simmim_pretrain__swinv2_base__img192_window12__800ep.yaml; the SimMIM repository
             has no Swin V2 config).
               python -m mim_jax.main --config=configs/simmim.py:imagenet_swin_b --workdir=W \
                 --config.input.data.dir=TFDS_DIR

Official ViT-B settings: 224 px, patch 16, mask patch 32, mask ratio 0.6 (ceil(49 * 0.6) = 30
masked mask-patches), learnable mask token, encoder with q/v biases, layer scale 0.1, a shared
relative position bias and no absolute position embedding, drop path 0.1; decoder one 1x1 conv
to 16*16*3 channels + pixel shuffle; L1 loss on masked pixels; AdamW betas (0.9, 0.999),
eps 1e-8, weight decay 0.05 (none on biases, norms, pos_embed, cls_token), grad clip 5.0,
base lr 1e-4 x batch/512 with batch 2048, 10 warm-up epochs from 5e-7 x batch/512, multistep
x0.1 at epoch 700 of 800; RandomResizedCrop(scale 0.67-1, ratio 3/4-4/3) + flip.
Published: ViT-B/16 800 epochs, 83.8 top-1 after fine-tuning.

Official Swin-B settings (the same optimiser, schedule, batch 2048 = 16 GPUs x 128, masking and
augmentation): 192 px, Swin-B (embed 128, depths 2-2-18-2, heads 4-8-16-32), patch 4, window 6
(stage 4 is one 6x6 window), drop path 0.0, no absolute position embedding, mask token at the
4 px patch grid (mask patch 32 = the encoder's stride: a 6x6 grid, 22 of 36 masked), decoder a
1x1 conv to 32*32*3 channels + pixel shuffle(32) on the 6x6 final map; weight decay on every
parameter but 1-D ones, biases, absolute_pos_embed and mask_token (the relative position bias
tables are decayed: see mim_jax.models.swin.decays). Published (ImageNet-1k top-1 after
fine-tuning at 224 px, window 7; configs/finetune.py): 84.0 (800 epochs), 83.5 (100 epochs:
base lr 2e-4, warm-up lr 1e-6, min lr 1e-5, cosine, not this preset).
Official Swin V2-B settings: the same, with Swin V2-B at window 12 (stages 3 and 4 single
windows), drop path 0.1, and normalised targets (NORM_TARGET, each pixel normalised over its
47x47 neighbourhood: `simmim.norm_target`). Fine-tuned at 224 px, window 14 with
pretrained_window_sizes (12, 12, 12, 6) (simmim_finetune__swinv2_base__img224_window14__800ep).

swin_cifar10 (a stated choice, CPU-sized): Swin v1, embed 48, depths 2-2-2-2, heads 3-6-12-24
(head dim 16), patch 2, window 4, drop path 0: at 32 px the stages are 16x16 and 8x8 (shifted
4x4 windows), 4x4 and 2x2 (one window each), and the final map 2x2 with stride 16, so the
decoder predicts 16*16*3 pixels per position. Patch 4 would leave a 1x1 final map and a single
shifted stage. Mask patch 8 (a 4x4 grid, 10 of 16 masked), as the ViT CPU presets; 3 epochs
of 45,000 images at batch 256 (525 steps), cosine schedule, half a warm-up epoch, base lr 2e-3
(1e-3 peak), as the ViT cifar10 preset. Measured on the 2-core CPU (5 `Trainer.step` calls
after compilation, batch 256, while another training run shared the machine): 2.6-4.5 s a
step, the ViT cifar10 preset 4.5-7.0 s beside it, so 25-40 minutes for the 525 steps.

Deviations: the CPU presets keep the method but use small models, the ViT ones an absolute
sin-cos position embedding instead of the relative bias at 32 px, a cosine schedule and short
runs; bf16 compute on accelerators (official: fp16 autocast / apex O1).
"""
from mim_jax import config_lib

# The presets get_config takes ('' = the default, embedded data), for tests and tools.
PRESETS = ('', 'cifar10', 'imagenet', 'swin_cifar10', 'imagenet_swin_b', 'imagenet_swinv2_b')


def swin_pooling(c) -> None:
  """A Swin's features are the mean of its final tokens (Swin's avgpool): every evaluator pools
  with 'mean'."""
  c.pooling = "mean"
  for name in c.evals:
    if "pooling" in c.evals[name]:
      c.evals[name].pooling = "mean"


def get_config(arg=None):
  from mim_jax.models import swin  # pylint: disable=g-import-not-at-top
  preset = arg or "default"
  c = config_lib.base_config()
  c.method = "simmim"
  # norm_target: Swin V2's SimMIM normalises each target pixel over its norm_target_patch^2
  # neighbourhood (Swin-Transformer config MODEL.SIMMIM.NORM_TARGET, off by default).
  c.simmim = dict(mask_patch_size=32, mask_ratio=0.6, norm_target=False, norm_target_patch=47)
  c.model.update(qkv_bias="qv", init_values=0.1, init_style="beit", pos_embed="none",
                 rel_pos_bias="shared", drop_path=0.1)
  c.optim.update(name="adamw", base_lr=1e-4, lr_batch_divisor=512, b1=0.9, b2=0.999, eps=1e-8,
                 weight_decay=0.05, clip_grad=5.0, warmup_lr=5e-7, min_lr=5e-6)
  c.input.aug.crop_scale = (0.67, 1.0)
  c.input.aug.crop_ratio = (3.0 / 4.0, 4.0 / 3.0)

  if preset in ("default", "cifar10", "swin_cifar10"):
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
    if preset == "swin_cifar10":
      c.model = swin.default_config(variant="tiny", embed_dim=48, depths=(2, 2, 2, 2),
                                    num_heads=(3, 6, 12, 24), patch_size=2, window_size=4,
                                    drop_path=0.0)
  elif preset == "imagenet":
    config_lib.imagenet_preset(c, batch_size=2048, total_epochs=800, variant="base")
    c.optim.update(schedule="multistep", warmup_epochs=10, milestones_epochs=(700,), gamma=0.1)
  elif preset in ("imagenet_swin_b", "imagenet_swinv2_b"):
    v2 = preset == "imagenet_swinv2_b"
    config_lib.imagenet_preset(c, batch_size=2048, total_epochs=800, variant="base")
    c.input.image_size = 192
    c.model = swin.default_config(variant="base", version=2 if v2 else 1,
                                  window_size=12 if v2 else 6, drop_path=0.1 if v2 else 0.0,
                                  dtype="bfloat16")
    c.simmim.norm_target = v2
    c.optim.update(schedule="multistep", warmup_epochs=10, milestones_epochs=(700,), gamma=0.1)
    swin_pooling(c)
  else:
    raise ValueError(f"unknown preset {preset!r}: use one of {', '.join(map(repr, PRESETS))}")
  return c
