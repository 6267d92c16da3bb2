r"""BEiT: BERT Pre-Training of Image Transformers (Bao et al., ICLR 2022).

BEiT needs a tokenizer run first (its ids are the targets); config.beit.tokenizer names that
run's workdir. Presets (`--config=configs/beit.py:<preset>`):

  (none)     The embedded 5,000-image CIFAR-10 subset (4,000 train / 1,000 held out), a narrow
             ViT at 32 px with an 8x8 patch grid, CPU-sized:
               python -m mim_jax.main --config=configs/tokenizer.py --workdir=/tmp/tokenizer
               python -m mim_jax.main --config=configs/beit.py --workdir=/tmp/beit \
                 --config.beit.tokenizer=/tmp/tokenizer
  cifar10    The CIFAR-10 image folder with 500 images per class held out for evaluation:
               python -m mim_jax.main --config=configs/tokenizer.py:cifar10 --workdir=/tmp/tokenizer_c10 \
                 --config.input.data.dir=../shared/data/cifar10/train
               python -m mim_jax.main --config=configs/beit.py:cifar10 --workdir=/tmp/beit_c10 \
                 --config.input.data.dir=../shared/data/cifar10/train --config.beit.tokenizer=/tmp/tokenizer_c10
  imagenet   The official ViT-B/16 ImageNet-1k recipe (beit/README.md, "Pre-training BEiT-base on
             ImageNet-1k") on tfds imagenet2012, with a tokenizer whose token grid is 14x14.

Official settings (microsoft/unilm beit/run_beit_pretraining.py and README.md; the imagenet
preset): 224 px, patch 16, num_mask_patches 75 of 196, min_mask_patches_per_block 16,
max_mask_patches_per_block None (0 here), aspect 0.3 to 1/0.3; ViT-B with q/v biases, layer
scale 0.1, shared relative position bias, no absolute position embedding, drop path 0.1;
lm_head to the tokenizer's codebook (8192 for DALL-E); AdamW betas (0.9, 0.999), eps 1e-8,
weight decay 0.05 constant (none on biases, norms, gammas, cls_token), lr 1.5e-3 at batch 2048
(16 x 128; no batch scaling in BEiT: lr_batch_divisor 2048), 10 warm-up epochs from 0, cosine to
min_lr 1e-5, 800 epochs, grad clip 3.0; ColorJitter(0.4, 0.4, 0.4), flip,
RandomResizedCrop(0.08-1, 3/4-4/3), ImageNet mean/std (--imagenet_default_mean_and_std).
Published (paper, ImageNet-1k, 800 epochs, DALL-E tokenizer): ViT-B/16 83.2 top-1 fine-tuned.

Deviations:
  * the tokenizer is a mim_jax run (configs/tokenizer.py; a DALL-E-style Gumbel dVAE with
    --config.tokenizer.quantizer=gumbel) unless OpenAI's DALL-E encoder is converted with
    `python -m mim_jax.convert --from=torch --arch=dalle` (docs/convert.md); it sees the
    encoder's normalised crop resized bicubically to its own input size (BEiT: the same crop
    resampled from the original image at 112 px with Lanczos, mapped by DALL-E's map_pixels);
  * the crop is resampled bilinearly by the shared pipeline (BEiT: bicubic), and on streaming
    sources the colour jitter runs on the crop rather than on the whole image (only contrast's
    mean luma differs);
  * block masks are drawn with JAX's random numbers: equal in distribution, not in bits;
  * the CPU presets keep the method and its architecture but use small ViTs, the mask budget
    scaled to the 8x8 grid (24 of 64, i.e. 75/196 rounded; blocks of at least 5 = 16 x 64/196),
    a short schedule and mean-pooled features for the probes.
"""
from mim_jax import config_lib

# The presets get_config takes ('' = the default, embedded data), for tests and tools.
PRESETS = ('', 'cifar10', 'imagenet')


def beit_config(preset: str):
  """The BEiT config of `preset`; configs/beitv2.py starts from it."""
  c = config_lib.base_config()
  c.method = "beit"
  c.beit = dict(
      tokenizer="",                       # workdir of a tokenizer run (required)
      num_mask_patches=75,
      min_mask_patches_per_block=16,
      max_mask_patches_per_block=0,       # 0 = None: up to num_mask_patches
      # BEiT v1: at most num_mask_patches; BEiT v2's generator then masks random single
      # patches until exactly num_mask_patches are masked (beit2/masking_generator.py).
      exact_mask_count=False,
      color_jitter=0.4,
      # BEiT v2's cls-token pretraining (configs/beitv2.py); off in BEiT v1.
      cls_pretraining=False, early_layers=9, head_layers=2, shared_lm_head=True,
  )
  c.model.update(qkv_bias="qv", init_values=0.1, init_style="beit", pos_embed="none",
                 rel_pos_bias="shared", drop_path=0.1)
  c.optim.update(name="adamw", base_lr=1.5e-3, lr_batch_divisor=2048, b1=0.9, b2=0.999, eps=1e-8,
                 weight_decay=0.05, schedule="cosine", warmup_lr=0.0, min_lr=1e-5, clip_grad=3.0)
  c.input.aug.crop_scale = (0.08, 1.0)
  c.input.aug.crop_ratio = (3.0 / 4.0, 4.0 / 3.0)

  if preset in ("default", "cifar10"):
    # 186 / 525 steps; BEiT predicts token ids, not pixels.
    config_lib.cpu_preset(c, preset, epochs=(6, 3), pixels=False)
    c.beit.update(num_mask_patches=24, min_mask_patches_per_block=5)
    c.model.update(variant="tiny", depth=6, patch_size=4, drop_path=0.0)
    c.optim.update(lr_batch_divisor=256)   # 1.5e-3 x batch/256: short runs want the larger lr
    if preset == "cifar10":
      c.model.depth = 4                     # CPU budget
  elif preset == "imagenet":
    config_lib.imagenet_preset(c, batch_size=2048, total_epochs=800, variant="base")
    c.optim.warmup_epochs = 10
    # BEiT's cls token is not trained by its loss: probe the mean of the patch tokens.
    c.pooling = "mean"
    c.evals = config_lib.default_evals(probe_epochs=90, pooling="mean")
    c.evals.knn.max_train = 100_000
    c.evals.reconstruction.enabled = False
  else:
    raise ValueError(f"unknown preset {preset!r}: use '', 'cifar10' or 'imagenet'")
  return c


def get_config(arg=None):
  return beit_config(arg or "default")
