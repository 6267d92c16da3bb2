r"""PeCo: Perceptual Codebook for BERT Pre-training of Vision Transformers (Dong et al., AAAI
2023): a VQ tokenizer trained with an added perceptual loss on a self-supervised network's
features.

The perceptual network is any mim_jax run (`--config.tokenizer.teacher=WORKDIR`; VGG weights
cannot be downloaded, and the paper itself finds a self-supervised ViT works as well): the
loss compares its block outputs (`config.tokenizer.perceptual_layers`, 1-based) for the image
and its reconstruction. It receives this run's normalised images and reconstructions,
renormalised and resized (bicubic) to its own input when they differ; it is frozen (method
state, no gradient) but the gradient flows through it to the reconstruction.

Presets (`--config=configs/peco.py:<preset>`):

  (none)     The embedded CIFAR-10 subset at 32 px, downsampling 4, with the README's first
             MAE run (6 blocks) as the perceptual network, blocks 2, 4, 6 (about 7 minutes
             on 2 CPU cores after it; the perceptual network's forward and backward pass
             over image and reconstruction make a step 4x a VQ-VAE step):
               python -m mim_jax.main --config=configs/mae.py --workdir=/tmp/mae
               python -m mim_jax.main --config=configs/peco.py --workdir=/tmp/peco \
                 --config.tokenizer.teacher=/tmp/mae
  cifar10    The CIFAR-10 image folder (500 per class held out), the cifar10 MAE run as the
             perceptual network, about half an hour:
               python -m mim_jax.main --config=configs/peco.py:cifar10 --workdir=/tmp/peco_c10 \
                 --config.input.data.dir=../shared/data/cifar10/train \
                 --config.tokenizer.teacher=/tmp/mae_c10
  imagenet   224 px, downsampling 16 (14x14 tokens), 8192 codes, a ViT-B/16 mim_jax run as
             the perceptual network with the paper's blocks 3, 6, 9, 12.

Settings from the paper (arXiv 2111.12710): a VQ-VAE (VQGAN-style) tokenizer whose loss adds
to the pixel and vector-quantisation terms the perceptual term
sum_l 1/(C_l H_l W_l) |f_l(x) - f_l(x_rec)|^2 over the 3rd, 6th, 9th and 12th blocks of a
self-supervised ViT-B (MoCo v3 in the paper), 8192 codes, 16x downsampling for ViT-B/16.
PeCo's tokenizer training code is not public (microsoft/PeCo released weights; no copy could
be read here), so what the paper leaves open follows VQGAN (CompVis/taming-transformers:
vqperceptual.py, quantize.py, configs/imagenet_vqgan.yaml): L1 pixel loss, perceptual weight
1.0, the pixel term on VQGAN's [-1, 1] images (taming/data/base.py scales the pixels by
x / 127.5 - 1; vqperceptual.py VQLPIPSWithDiscriminator.forward takes the mean of
|inputs - reconstructions| on them): `tokenizer.pixel_space='minus_one_one'` maps the
normalised image and its reconstruction by x -> 2 (x std + mean) - 1 before the L1, i.e. the
loss is mean |2 std (x_rec - x)| (the error on the ImageNet-normalised pixels is 1/(2 std),
about 2.2, times that, and would outweigh the perceptual and quantiser terms), a
straight-through codebook with VQGAN's quantizer loss as it trains it (taming's
VectorQuantizer2 with its default legacy=True: mean((sg e - z)^2) + 0.25 x mean((e - sg z)^2),
the 0.25 on the codebook term), codebook weight 1.0, 256-d codes, Adam betas (0.5, 0.9),
lr 4.5e-6 x batch, constant. Published: BEiT with PeCo tokens, ViT-B/16 800 epochs, 84.5 top-1
after fine-tuning.

Deviations: no adversarial (PatchGAN) loss; the encoder sees, and the decoder writes, the
ImageNet-normalised pixels (VQGAN's: [-1, 1]; only the pixel loss is on that scale); the
encoder/decoder is sonnet's VQ-VAE conv stack (mim_jax/methods/tokenizer.py: 4x4 stride-2
convolutions + residual blocks; hidden 256 at 224 px) rather than VQGAN's deeper one with
GroupNorm and attention; the codebook starts U(+-sqrt(3/D)) (sonnet) rather than taming's
U(+-1/K); the perceptual network is a mim_jax run and its block outputs are compared before the
final norm, over patch tokens only; the imagenet preset's batch 128 and 100 epochs are this
repository's choice (the paper's are not known here); the CPU presets use 512 codes of 64 dims,
dead-code restarts after 20 unused steps and short runs.
"""
from mim_jax import config_lib
from mim_jax.methods.tokenizer import default_tokenizer_config

# The presets get_config takes ('' = the default, embedded data), for tests and tools.
PRESETS = ('', 'cifar10', 'imagenet')


def get_config(arg=None):
  preset = arg or "default"
  c = config_lib.base_config()
  c.method = "tokenizer"
  c.name = "PeCo tokenizer"
  c.tokenizer = default_tokenizer_config()
  c.tokenizer.update(arch="conv", codebook_size=8192, code_dim=256, quantizer="straight_through",
                     beta=1.0, codebook_weight=0.25, pixel_loss="l1", pixel_space="minus_one_one",
                     perceptual_weight=1.0,
                     perceptual_layers=(3, 6, 9, 12), conv=dict(hidden=256, res_hidden=256, res_layers=2))
  c.optim.update(name="adamw", base_lr=4.5e-6, lr_batch_divisor=1, b1=0.5, b2=0.9, eps=1e-8,
                 weight_decay=0.0, schedule="constant", warmup_epochs=0.0, clip_grad=0.0)
  c.input.aug.crop_scale = (0.08, 1.0)
  c.pooling = "mean"

  if preset in ("default", "cifar10"):
    c.input.image_size = 32
    c.input.aug.crop_scale = (0.35, 1.0)
    c.model.update(variant="tiny", depth=1, patch_size=4)   # only patch_size is read (arch 'conv')
    c.tokenizer.update(codebook_size=512, code_dim=64, perceptual_layers=(2, 4, 6), restart_after=20,
                       conv=dict(hidden=128, res_hidden=32, res_layers=2))
    c.input.batch_size = 128
    c.evals = config_lib.default_evals(probe_epochs=30, probe_optimizer="sgd", pooling="mean")
    c.evals.knn.enabled = c.evals.linear.enabled = False    # a tokenizer: the picture only
    if preset == "default":
      c.input.data.update(name="embedded", holdout_per_class=100)
      c.total_epochs = 3              # 93 steps
      c.log_every = 10
      c.ckpt_every = 200
    else:
      c.input.data.update(name="image_folder", dir="", holdout_per_class=500)
      c.total_epochs = 1              # 351 steps
      c.log_every = 50
      c.ckpt_every = 500
  elif preset == "imagenet":
    config_lib.imagenet_preset(c, batch_size=128, total_epochs=100, variant="base")
    c.evals.knn.enabled = c.evals.linear.enabled = False
  else:
    raise ValueError(f"unknown preset {preset!r}: use '', 'cifar10' or 'imagenet'")
  return c
