r"""CAE: Context Autoencoder for Self-Supervised Representation Learning (Chen et al., IJCV 2023).

CAE needs a tokenizer run first (its ids are the decoder's targets); config.cae.tokenizer names
that run's workdir. Presets (`--config=configs/cae.py:<preset>`):

  (none)     The embedded 5,000-image CIFAR-10 subset (4,000 train / 1,000 held out), a narrow
             ViT at 32 px with an 8x8 patch grid, CPU-sized:
               python -m mim_jax.main --config=configs/tokenizer.py --workdir=/tmp/tokenizer
               python -m mim_jax.main --config=configs/cae.py --workdir=/tmp/cae \
                 --config.cae.tokenizer=/tmp/tokenizer
  cifar10    The CIFAR-10 image folder with 500 images per class held out for evaluation:
               python -m mim_jax.main --config=configs/tokenizer.py:cifar10 --workdir=/tmp/tokenizer_c10 \
                 --config.input.data.dir=../shared/data/cifar10/train
               python -m mim_jax.main --config=configs/cae.py:cifar10 --workdir=/tmp/cae_c10 \
                 --config.input.data.dir=../shared/data/cifar10/train --config.cae.tokenizer=/tmp/tokenizer_c10
  imagenet   The official CAE-base 800-epoch recipe (scripts/cae_base_800e.sh) on tfds
             imagenet2012, with a tokenizer whose token grid is 14x14.

Official settings (lxtGH/CAE scripts/cae_base_800e.sh, tools/run_pretraining.py defaults):
224 px, patch 16, block masking of exactly 98 of 196 patches (min 16 per block, max None);
ViT-B encoder with q/v biases, layer scale 0.1, fixed sin-cos position embedding, drop path
0.1; regressor depth 4 and decoder depth 4 at the encoder's width (768) and heads (12), their
layer scale 0.1; head to the codebook (8192 for DALL-E); alignment MSE weight 2 against a
teacher copy of the encoder (base_momentum 0); AdamW betas (0.9, 0.999) (opt_betas None: torch's
default), eps 1e-8, weight decay 0.05 on every parameter of 2 or more dims, lr 1.5e-3 at batch
2048 (32 x 64; no batch scaling: lr_batch_divisor 2048), 20 warm-up epochs from 0, cosine to
min_lr 1e-5, 800 epochs, grad clip 3.0; RandomResizedCrop(0.08-1) + flip, no colour jitter,
ImageNet mean/std. Linear probe on the cls token (run_linear.py --use_cls).
Published (lxtGH/CAE README, ImageNet-1k, 800 epochs, DALL-E tokenizer): CAE-base 68.9 linear,
75.9 attentive probe, 83.8 fine-tuned top-1.

Deviations:
  * the tokenizer is a mim_jax run (configs/tokenizer.py), not OpenAI's DALL-E dVAE; it sees the
    encoder's normalised crop resized bicubically to its own input size (CAE: the same crop
    resampled from the original image at 112 px with Lanczos, mapped by map_pixels);
  * crops are resampled bilinearly by the shared pipeline (CAE: bicubic);
  * masks use JAX's random numbers (equal in distribution, not in bits);
  * the sin-cos table: CAE's lists (row, column) frequencies where MAE's, which mim_jax's ViT
    uses for the encoder and here for the regressor too, lists (column, row); the two differ by
    a fixed permutation of the residual-stream channels, under which the model and its
    initialisation are invariant: no change to the method;
  * the CPU presets keep the method and its architecture but use small ViTs (regressor and
    decoder at the encoder's width and heads, as the official base), the mask budget scaled to
    the 8x8 grid (32 of 64, the official half; blocks of at least 5 = 16 x 64/196), a short
    schedule and mean-pooled features for the probes.
"""
from mim_jax import config_lib

# The presets get_config takes ('' = the default, embedded data), for tests and tools.
PRESETS = ('', 'cifar10', 'imagenet')


def get_config(arg=None):
  preset = arg or "default"
  c = config_lib.base_config()
  c.method = "cae"
  c.cae = dict(
      tokenizer="",                       # workdir of a tokenizer run (required)
      num_mask_patches=98,
      min_mask_patches_per_block=16,
      max_mask_patches_per_block=0,       # 0 = None: up to num_mask_patches
      align_loss_weight=2.0,
      base_momentum=0.0,                  # teacher = m * teacher + (1 - m) * encoder
      # Regressor + decoder; width / heads 0 = the encoder's (the official base recipe).
      decoder=dict(width=0, heads=0, regressor_depth=4, depth=4, layer_scale=0.1),
  )
  c.model.update(qkv_bias="qv", init_values=0.1, init_style="xavier", pos_embed="sincos",
                 rel_pos_bias="none", drop_path=0.1)
  c.optim.update(name="adamw", base_lr=1.5e-3, lr_batch_divisor=2048, b1=0.9, b2=0.999, eps=1e-8,
                 weight_decay=0.05, schedule="cosine", warmup_lr=0.0, min_lr=1e-5, clip_grad=3.0)
  c.input.aug.crop_scale = (0.08, 1.0)
  c.input.aug.crop_ratio = (3.0 / 4.0, 4.0 / 3.0)

  if preset in ("default", "cifar10"):
    # 186 / 525 steps; CAE predicts token ids, not pixels.
    config_lib.cpu_preset(c, preset, epochs=(6, 3), pixels=False)
    c.cae.update(num_mask_patches=32, min_mask_patches_per_block=5)
    c.model.update(variant="tiny", depth=6, patch_size=4, drop_path=0.0)
    c.optim.update(lr_batch_divisor=256)   # 1.5e-3 x batch/256: short runs want the larger lr
    if preset == "cifar10":
      c.model.depth = 4                     # CPU budget
      c.cae.decoder.update(regressor_depth=2, depth=2)
  elif preset == "imagenet":
    config_lib.imagenet_preset(c, batch_size=2048, total_epochs=800, variant="base")
    c.optim.warmup_epochs = 20
    c.evals.reconstruction.enabled = False
  else:
    raise ValueError(f"unknown preset {preset!r}: use '', 'cifar10' or 'imagenet'")
  return c
