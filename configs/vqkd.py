r"""VQ-KD: BEiT v2's tokenizer (Peng et al., "BEiT v2: Masked Image Modeling with
Vector-Quantized Visual Tokenizers", 2022), codes trained to reconstruct a teacher's features.

The teacher is any mim_jax run (`--config.tokenizer.teacher=WORKDIR`; its encoder's final-norm
patch tokens are the target), e.g. an MAE run, standing in for BEiT v2's CLIP / DINO teachers
(converted weights work the same way once they sit in a mim_jax workdir). Its patch grid must
equal the tokenizer's; its input is this run's crop, renormalised and resized (bicubic) to the
teacher's resolution when they differ.

Presets (`--config=configs/vqkd.py:<preset>`):

  (none)     The embedded CIFAR-10 subset at 32 px, patch 4, with the README's first MAE run
             as the teacher (about 6 minutes on 2 CPU cores after it):
               python -m mim_jax.main --config=configs/mae.py --workdir=/tmp/mae
               python -m mim_jax.main --config=configs/vqkd.py --workdir=/tmp/vqkd \
                 --config.tokenizer.teacher=/tmp/mae
  cifar10    The CIFAR-10 image folder (500 per class held out) with the cifar10 MAE run as
             the teacher, about half an hour:
               python -m mim_jax.main --config=configs/vqkd.py:cifar10 --workdir=/tmp/vqkd_c10 \
                 --config.input.data.dir=../shared/data/cifar10/train \
                 --config.tokenizer.teacher=/tmp/mae_c10
  imagenet   The official recipe (beit2/TOKENIZER.md, vqkd_encoder_base_decoder_3x768x12):
             ViT-B/16 encoder at 224 px, a 3-block ViT-B decoder, with a mim_jax ViT-B/16
             run at 224 px as the teacher.

Official settings (microsoft/unilm beit2/modeling_vqkd.py, norm_ema_quantizer.py,
run_vqkd_training.py, TOKENIZER.md): encoder ViT-B/16 (q/v biases, learned absolute position
embedding, trunc-normal .02 weights with proj/fc2 rescaled by 1/sqrt(2 layer), no layer scale,
mean-pooling style final norm on the patch tokens); encode task layer Linear(768,768)-Tanh-
Linear(768,32); 8192 codes of 32 dims, l2-normalised, EMA decay 0.99, k-means init (cosine,
10 iterations) on the first batch, no dead-code restarts; decoder ViT-B with patch size 1 on
the 14x14 code map (3 blocks), decode task layer Linear(768,768)-Tanh-Linear(768, teacher
width); loss 1 - cosine(prediction, teacher patch token) averaged over tokens + 1.0 x
mean((sg e - z)^2); AdamW betas (0.9, 0.99), eps 1e-8, weight decay 1e-4 (none on 1-D
parameters, cls tokens, position embeddings, the codebook); lr 5e-5 x batch/128 with batch
512 (64 x 8 GPUs), 10 warm-up epochs from 0, cosine to 1e-5, 100 epochs, no gradient
clipping; RandomResizedCrop(224, scale 0.08-1, bicubic) + horizontal flip.
Published: the CLIP-teacher tokenizer (decoder 3x768x12) uses 97% of its codes; BEiT v2
ViT-B/16 pretrained on it for 300 (1600) epochs fine-tunes to 85.0 (85.5) top-1.

Initialisation (`tokenizer.official_init=True`, mim_jax/methods/tokenizer.py
`official_vqkd_init`), official leaf by leaf (modeling_vqkd.py VQKD.__init__ / _init_weights,
modeling_finetune.py VisionTransformer.__init__ / _init_weights / fix_init_weight): in both
ViTs and both task layers every Linear weight (qkv, proj, fc1, fc2, task fc1/fc2), cls_token
and pos_embed ~ timm's trunc_normal_(std=.02), whose absolute bounds +-2 leave it an uncut
N(0, .02^2); block i's attn.proj and mlp.fc2 weights then divided by sqrt(2 i); Linear biases,
q_bias, v_bias 0; LayerNorms 1 / 0; the patch-embedding convs (encoder 16x16 from 3
channels, decoder 1x1 from the 32-d codes) PyTorch's Conv2d default, weight and bias
U(+-1/sqrt(fan_in)); the codebook zeros until k-means fills it. config.model.init_style
('beit': truncated normals cut at one std, a trunc-normal patch embedding) only sets the
first draw, which official_init replaces in full.

Deviations: the encoder sees the ImageNet-normalised crop (official: pixels scaled to [-1, 1]);
the teacher is a mim_jax run, not CLIP/DINO; the initial values follow the official rules but
come from JAX's random streams, not torch's (same distributions, other numbers); k-means runs
on the whole global batch (official: each GPU's 64 images) and, under gradient accumulation,
once per micro-batch with the mean of the resulting codebooks (re-normalised) as the initial
codes; the per-epoch 'unused code' count is not kept (codebook_usage and perplexity are logged
per step). The CPU presets use small ViTs, 512 codes, a 0.2-1 crop, lr 2e-4 x batch/128 with
one warm-up epoch and short runs.
"""
from mim_jax import config_lib
from mim_jax.methods.tokenizer import default_tokenizer_config

# The presets get_config takes ('' = the default, embedded data), for tests and tools.
PRESETS = ('', 'cifar10', 'imagenet')


def get_config(arg=None):
  preset = arg or "default"
  c = config_lib.base_config()
  c.method = "tokenizer"
  c.name = "VQ-KD"
  c.tokenizer = default_tokenizer_config()
  c.tokenizer.update(arch="vit", codebook_size=8192, code_dim=32, quantizer="norm_ema", beta=1.0,
                     decay=0.99, kmeans_init=True, target="teacher", official_init=True,
                     decoder=dict(variant="base", depth=3))
  c.model.update(qkv_bias="qv", pos_embed="learned", init_style="beit", init_values=0.0,
                 rel_pos_bias="none", drop_path=0.0)
  # min_lr is scaled by batch/lr_batch_divisor like the peak: 1e-5 absolute at the official
  # batch of 512 = 4 x 128. The warm-up starts at 0: run_vqkd_training.py passes no start value
  # to utils.cosine_scheduler.
  c.optim.update(name="adamw", base_lr=5e-5, lr_batch_divisor=128, b1=0.9, b2=0.99, eps=1e-8,
                 weight_decay=1e-4, schedule="cosine", warmup_lr=0.0, min_lr=2.5e-6,
                 clip_grad=0.0)
  c.input.aug.crop_scale = (0.08, 1.0)
  c.pooling = "mean"

  if preset in ("default", "cifar10"):
    c.input.image_size = 32
    c.input.aug.crop_scale = (0.2, 1.0)
    c.model.update(variant="tiny", depth=4, patch_size=4)
    c.tokenizer.update(codebook_size=512, decoder=dict(variant="tiny", depth=1))
    c.optim.update(base_lr=2e-4, warmup_epochs=1, warmup_lr=0.0, min_lr=1e-5)
    c.input.batch_size = 128
    c.evals = config_lib.default_evals(probe_epochs=30, probe_optimizer="sgd", pooling="mean")
    c.evals.knn.enabled = c.evals.linear.enabled = False    # a tokenizer: the picture only
    if preset == "default":
      c.input.data.update(name="embedded", holdout_per_class=100)
      c.total_epochs = 6              # 186 steps
      c.log_every = 10
      c.ckpt_every = 200
    else:
      c.input.data.update(name="image_folder", dir="", holdout_per_class=500)
      c.total_epochs = 2.5            # 878 steps
      c.log_every = 50
      c.ckpt_every = 500
  elif preset == "imagenet":
    config_lib.imagenet_preset(c, batch_size=512, total_epochs=100, variant="base")
    c.optim.warmup_epochs = 10
    c.evals.knn.enabled = c.evals.linear.enabled = False
  else:
    raise ValueError(f"unknown preset {preset!r}: use '', 'cifar10' or 'imagenet'")
  return c
