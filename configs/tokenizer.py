r"""VQ-VAE image tokenizer on pixels, for BEiT / CAE (van den Oord et al., NeurIPS 2017), or
DALL-E's Gumbel-softmax dVAE (Ramesh et al., ICML 2021) with --config.tokenizer.quantizer=gumbel.

The DALL-E dVAE that BEiT reads cannot be downloaded here (a user who has its encoder.pkl
converts it with `python -m mim_jax.convert --from=torch --arch=dalle`, docs/convert.md, into
this config with --config.tokenizer.arch=dalle, DALL-E's encoder network); this trains a
discrete tokenizer whose token grid is the consumer ViT's patch grid (config.model.patch_size
is the downsampling).
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

DALL-E dVAE: add --config.tokenizer.quantizer=gumbel to any preset, e.g.
    python -m mim_jax.main --config=configs/tokenizer.py --workdir=/tmp/dvae \
      --config.tokenizer.quantizer=gumbel
and give the run to BEiT / CAE as any tokenizer (its tokens are the argmax of the encoder's
logits). The code layer then outputs `codebook_size` logits per token; training decodes the
gumbel-softmax relaxed sample embedded by the codebook (DALL-E's 1x1 convolution at the start of
the decoder, code_dim channels) and adds beta_t x KL(q(z|x) || uniform), per token, divided by
the pixel values per token (p x p x 3: DALL-E divides its loss by 256 x 256 x 3, so its KL
weight becomes beta / 192 at p = 8). Schedules, config.tokenizer.gumbel, cosine (appendix A.2):
  tau_start, tau_end, tau_steps   relaxation temperature 1 -> 1/16 over the first 150,000 updates
                                  (paper; the imagenet preset)
  kl_weight, kl_steps             KL weight beta 0 -> 6.6 over the first 5,000 updates (paper)
The CPU presets shorten both to their runs: tau over the first 150 (default) / 700 (cifar10)
updates, beta over the first 5 / 25 (the paper's 1:30 ratio); restart_after is ignored.
Measured (default preset, 310 steps, ~9 min on 2 shared cores): training reconstruction MSE
1.14 -> 0.33, KL 0.7 nats, perplexity ~45 of 512 codes; on 100 held-out images the MSE is 0.46
with the relaxed sample and 0.61 decoding the argmax codes (the relaxation gap has not closed
in 160 steps at tau = 1/16; the pictures are blurry and nearly grey).
Deviations from DALL-E: sonnet's VQ-VAE encoder / decoder (above) instead of DALL-E's bottleneck
ResNets, K = 512 (8192 at imagenet) with code_dim-wide embeddings (DALL-E: 8192 codes, 128);
the pixel loss is the mean squared error on normalised pixels, not the logit-Laplace
likelihood (its scale against the KL term differs, so beta = 6.6 is the paper's value, not one
tuned here); Adam at a constant step size (DALL-E: AdamW, weight decay 1e-4, step size cosine
1e-4 -> 1.25e-6 over 1.2M updates, parameter EMA 0.999) and the augmentation above.
"""
from mim_jax import config_lib
from mim_jax.methods.tokenizer import default_tokenizer_config

# The presets get_config takes ('' = the default, embedded data), for tests and tools.
PRESETS = ('', 'cifar10', 'imagenet')


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
    spans = (150, 5) if preset == "default" else (700, 25)      # of 310 / 1,404 steps
    c.tokenizer.gumbel.update(tau_steps=spans[0], kl_steps=spans[1])
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
