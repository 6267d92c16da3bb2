r"""ExtreMA: Extreme Masking for Learning Instance and Distributed Visual Representations
(Wu, Lai, Sun & Lin, TMLR 2023; microsoft/ExtreMA).

Presets (`--config=configs/extrema.py:<preset>`):

  (none)     The embedded 5,000-image CIFAR-10 subset (4,000 train / 1,000 held out), a narrow
             ViT at 32 px, CPU-sized (a few minutes on 2 cores).
               python -m mim_jax.main --config=configs/extrema.py --workdir=/tmp/extrema
  cifar10    The CIFAR-10 image folder with 500 images per class held out for evaluation,
             about a CPU half-hour.
               python -m mim_jax.main --config=configs/extrema.py:cifar10 --workdir=/tmp/extrema_c10 \
                 --config.input.data.dir=../shared/data/cifar10/train
  imagenet   The official ViT-B/16 recipe on ImageNet-1k (README.md's pre-training command).

Official settings (microsoft/ExtreMA README.md command, main.py defaults, lib/builder.py,
vits.py, lib/augment.py), used by the imagenet preset: ViT-B/16 at 224 px with CaiT-style
class attention (no cls token at the input, 2 class-attention blocks with layer scale 0.1,
fixed sin-cos position embedding, qkv bias), student drop path 0.1 (teacher none); mask ratio
0.8 with 5 disjoint masks per image (39 of 196 tokens each); projector 768-4096-4096-256 and
predictor 256-4096-256 with LayerNorm + GELU; BYOL loss (2 - 2 cos), student on colour view 1
only, teacher on colour view 2 (not symmetrised); EMA momentum 0.996 -> 1 by a half cosine per
iteration; AdamW betas (0.9, 0.95), weight decay 0.1 (none on biases, norms, layer-scale gammas
and the cls token), base lr 1.5e-4 x batch/256 with batch 2048, 40 warm-up epochs then a half
cosine to 0, 300 epochs, no gradient clipping; augmentation RandomResizedCrop(scale 0.2-1) +
flip once per image, then two independent RandomApply(ColorJitter(0.4, 0.4, 0.2, 0.1), 0.8) +
RandomGrayscale(0.2) ('--aug-spatialconsistent-color'). Evaluation: the normalised cls token,
of the online encoder and of the teacher (main_lincls.py --eval_momentum).
Published (README, 300 epochs, 80% x 5 masks, colour aug): ViT-B/16 73.3 linear probe, 83.7
fine-tune.

Deviations:
  * In-memory crops are resampled bilinearly from a continuous box (official: torchvision's
    RandomResizedCrop at its default, bilinear, on whole pixels: lib/augment.py); for streaming
    data (the imagenet preset) the host crops and flips with mim_jax's loader, which resamples
    bicubically (antialiased), and the colour views are made on the device.
  * Compute in bfloat16 on accelerators (official: fp16 autocast with a loss scaler).
  * The official mask code hard-codes 196 patches; here L = (image_size / patch)^2.
  * The teacher's EMA runs after the optimiser step with m(t + 1), which gives the same
    teacher at every forward as the official update with m(t) at the start of iteration t.
  * Only the BYOL loss: the official 'infonce' branch refers to an attribute the model never
    sets (`self.local_crops`), so it cannot run.
  * Fine-tuning (configs/finetune.py with --config.finetune.pretrained=THIS_RUN and
    --config.finetune.pooling=mean) loads the patch embedding and plain blocks and drops the
    class-attention head, as the official recipe; unlike it, the fine-tuned ViT keeps its own
    (freshly initialised) cls token at the input, and mean-pools the patch tokens.
  * CPU presets: a small model (ViT-Ti width, 4 blocks, patch 4 at 32 px: 64 patches, so 12
    tokens per 80% mask), 1024-wide heads, momentum 0.99 and short schedules, stated below.
"""
from mim_jax import config_lib

# The presets get_config takes ('' = the default, embedded data), for tests and tools.
PRESETS = ('', 'cifar10', 'imagenet')


def get_config(arg=None):
  preset = arg or "default"
  c = config_lib.base_config()
  c.method = "extrema"
  c.extrema = dict(
      mask_ratio=0.8, num_masks=5, disjoint=True,
      proj_dim=256, mlp_dim=4096,
      ema_momentum=0.996,
      head_norm="layernorm",    # 'batchnorm': BYOL-style heads, a control (not official)
      class_attention_layers=2, layer_scale_init_value=0.1,
      color_aug=True, jitter_prob=0.8, jitter=(0.4, 0.4, 0.2, 0.1), gray_prob=0.2,
  )
  c.model.update(pos_embed="sincos", qkv_bias="qkv", init_values=0.0, drop_path=0.1)
  c.optim.update(name="adamw", base_lr=1.5e-4, lr_batch_divisor=256, b1=0.9, b2=0.95, eps=1e-8,
                 weight_decay=0.1, schedule="cosine", min_lr=0.0, clip_grad=0.0)
  c.input.aug.crop_scale = (0.2, 1.0)
  c.pooling = "cls"

  if preset in ("default", "cifar10"):
    config_lib.cpu_preset(c, preset, epochs=(6, 3), batch=(128, 256), warmup_epochs=(1, 0.5),
                          ckpt_every=(200, 500), pixels=False)
    c.pooling = "cls"                   # the class-attention token is the trained embedding
    for e in c.evals.values():
      if "pooling" in e:
        e.pooling = "cls"
    c.model.update(variant="tiny", depth=4, patch_size=4, drop_path=0.0)
    c.extrema.update(mlp_dim=1024, ema_momentum=0.99)
    # base lr: the official 1.5e-4 x batch / 256. 10x that (this preset until 2026-11-24) was
    # worse at CIFAR-10 scale: 25.9 kNN / 35.5 linear against 31.2 / 41.4 (docs/results/self_distillation.md, ExtreMA).
  elif preset == "imagenet":
    config_lib.imagenet_preset(c, batch_size=2048, variant="base", total_epochs=300)
    c.optim.warmup_epochs = 40
    c.evals.reconstruction.enabled = False
  else:
    raise ValueError(f"unknown preset {preset!r}: use '', 'cifar10' or 'imagenet'")
  return c
