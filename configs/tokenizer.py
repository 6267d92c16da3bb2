r"""VQ-VAE image tokenizer on pixels, for BEiT / CAE (van den Oord et al., NeurIPS 2017).

The DALL-E dVAE that BEiT reads cannot be downloaded; this trains a discrete tokenizer whose
token grid is the consumer ViT's patch grid (config.model.patch_size is the downsampling).
A BEiT / CAE run then names this workdir in its config (see mim_jax/methods/tokenizer.py for
the contract).

Presets (`--config=configs/tokenizer.py:<preset>`):

  (none)     The embedded 5,000-image CIFAR-10 subset (4,000 train / 1,000 held out) at 32 px,
             downsampling 4 (an 8x8 token grid for a patch-4 ViT), CPU-sized (about 5 minutes):
               python -m mim_jax.main --config=configs/tokenizer.py --workdir=/tmp/tokenizer
  cifar10    The CIFAR-10 image folder with 500 images per class held out, same model; about
             half an hour on 2 CPU cores:
               python -m mim_jax.main --config=configs/tokenizer.py:cifar10 --workdir=/tmp/tok_c10 \
                 --config.input.data.dir=../shared/data/cifar10/train
  imagenet   224 px, downsampling 16 (14x14 tokens for ViT-B/16), 8192 codes, tfds
             imagenet2012 (config.input.data.dir).

Official settings (sonnet `examples/vqvae_example.ipynb` + `VectorQuantizerEMA`; the paper):
encoder two 4x4 stride-2 convolutions (hidden/2, hidden channels) + 3x3 convolution + two
residual blocks (ReLU, 3x3 conv to 32 channels, ReLU, 1x1 conv) + ReLU, 1x1 convolution to 64-d
codes; mirrored decoder with 4x4 stride-2 transposed convolutions; 512 codes; EMA codebook
(decay 0.99, epsilon 1e-5, sonnet's debiased averages), commitment cost 0.25; loss = mean
squared reconstruction error + 0.25 x commitment; Adam, lr 3e-4 at batch 32 (sonnet, CIFAR-10),
2e-4 at batch 128 for 250k steps (paper, ImageNet), no weight decay, no schedule; codebook
usage logged as perplexity. Straight-through codebook: --config.tokenizer.quantizer=straight_through
(codebook loss + 0.25 x commitment, sonnet's `VectorQuantizer`).

Deviations: the reconstruction error is not divided by the data variance: on the
ImageNet-normalised pixels used here it is already in units of the per-channel variance
(sonnet divides the [0, 1]-scale error by the data's variance; the two agree within ~25%).
The optimiser is AdamW with weight decay 0 (= Adam), lr = base_lr x batch / 32: sonnet's 3e-4
at batch 32 by default, the paper's 2e-4 at batch 128 in the imagenet preset, 4e-4 at batch 128
in the CPU presets. The trainer's random-resized-crop + flip augmentation is on (sonnet and the
paper: none): scale 0.35-1 on the 32 px presets, BEiT v2's tokenizer crop (0.08-1) at 224 px.
The imagenet preset runs at 224 px with 4 stride-2 layers (the first three with hidden/2
channels), 256 hidden channels everywhere (the paper's 'all 256 hidden units', its residual
blocks included) and BEiT's vocabulary of 8192 codes (paper: 128 px, K = 512). Dead-code
restarts (--config.tokenizer.restart_after=N, see mim_jax/models/quantizer.py) are off, as in
sonnet, except in the CPU presets (N = 20 steps), where 4,000 images leave many codes unused.
"""
from mim_jax import config_lib
from mim_jax.methods.tokenizer import default_tokenizer_config


def get_config(arg=None):
  preset = arg or "default"
  c = config_lib.base_config()
  c.method = "tokenizer"
  c.tokenizer = default_tokenizer_config()
  c.optim.update(name="adamw", base_lr=3e-4, lr_batch_divisor=32, b1=0.9, b2=0.999, eps=1e-8,
                 weight_decay=0.0, schedule="constant", warmup_epochs=0.0, clip_grad=0.0)
  c.pooling = "mean"

  if preset in ("default", "cifar10"):
    c.input.image_size = 32
    c.model.update(variant="tiny", depth=1, patch_size=4)   # only patch_size is read (arch 'conv')
    c.input.aug.crop_scale = (0.35, 1.0)
    c.optim.base_lr = 1e-4         # 1e-4 x 128/32 = 4e-4 peak (sonnet's 3e-4 at batch 32)
    c.tokenizer.restart_after = 20
    c.evals = config_lib.default_evals(probe_epochs=30, probe_optimizer="sgd", pooling="mean")
    c.evals.knn.enabled = c.evals.linear.enabled = False    # a tokenizer: the picture only
    if preset == "default":
      c.input.data.update(name="embedded", holdout_per_class=100)
      c.input.batch_size = 128
      c.total_epochs = 10             # 310 steps
      c.log_every = 10
      c.ckpt_every = 200
    else:
      c.input.data.update(name="image_folder", dir="", holdout_per_class=500)
      c.input.batch_size = 128
      c.total_epochs = 4              # 1,404 steps
      c.log_every = 50
      c.ckpt_every = 500
  elif preset == "imagenet":
    config_lib.imagenet_preset(c, batch_size=128, total_epochs=0, variant="base")
    c.total_steps = 250_000
    c.optim.base_lr = 2e-4 * 32 / 128  # 2e-4 at the paper's batch of 128
    c.input.aug.crop_scale = (0.08, 1.0)
    c.tokenizer.update(codebook_size=8192, code_dim=64,
                       conv=dict(hidden=256, res_hidden=256, res_layers=2))
    c.evals.knn.enabled = c.evals.linear.enabled = False
  else:
    raise ValueError(f"unknown preset {preset!r}: use '', 'cifar10' or 'imagenet'")
  return c
