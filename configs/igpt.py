r"""iGPT (Chen et al., ICML 2020, "Generative Pretraining from Pixels"), exact to
openai/image-gpt (src/model.py, src/run.py, src/utils.py) where the code exists, the paper
elsewhere.

Presets (`--config=configs/igpt.py:<preset>`):

  (none)       The embedded 5,000-image CIFAR-10 subset, a 4-layer, 128-wide GPT over 16x16
               palette sequences (256 tokens), autoregressive, CPU-sized (minutes on 2 cores).
                 python -m mim_jax.main --config=configs/igpt.py --workdir=/tmp/igpt
  bert         The same with the BERT objective (15% of the tokens masked, bidirectional).
  cifar10      The CIFAR-10 image folder, 500 images per class held out, the same tiny GPT at
               16x16, autoregressive, about an hour on the 2-core CPU.
                 python -m mim_jax.main --config=configs/igpt.py:cifar10 --workdir=/tmp/igpt_c10 \
                   --config.input.data.dir=../shared/data/cifar10/train
  cifar10_bert The cifar10 preset with the BERT objective.
  imagenet     iGPT-S (24 layers, width 512, 8 heads, 76M parameters) at 32x32 on tfds
               imagenet2012: batch 128, 1M iterations, Adam (0.9, 0.95), lr 0.003 warmed up
               for one epoch then cosine to 0, no dropout, no weight decay; bf16 compute.

Official settings (model.py, run.py, utils.py; the paper's section 3 and appendix):
  * the palette: 512 k-means centres of RGB pixels scaled to [-1, 1] (kmeans_centers.npy);
    quantisation to the nearest centre by squared distance (utils.color_quantize); decoding
    rint(127.5 (c + 1)) (run.py sample);
  * the sequence: the image at the input resolution (32x32 for iGPT-S), one palette index per
    pixel, raster order; vocabulary 512; n_ctx = resolution^2;
  * the model: GPT-2 pre-norm blocks with image-gpt's gain-only RMS norm (eps 1e-5), bias-free
    attention with per-head projections (q/k/v N(0, 1/sqrt(width)), c_proj N(0, 1/sqrt(width *
    depth))), the gelu2 MLP of 4x width (bias-free, N(0, 0.02)), 'wte' N(0, 0.02), learned 'wpe'
    N(0, 0.01), the untied head 'wtet' initialised to zero, the final norm 'ln_f';
  * autoregressive: a learned 'sos' vector, the sequence shifted by one, mean cross-entropy over
    all positions; BERT: tokens masked independently with probability 0.15 (uniform >
    bert_mask_prob keeps), masked token embeddings zeroed, no causal mask, the loss per image
    averaged over its masked positions, then over images;
  * the optimiser (paper appendix): Adam beta1 0.9, beta2 0.95, batch 128, 1M iterations, warm-up
    for one epoch, cosine decay to 0, no dropout; the paper tries lr 0.01, 0.003, 0.001, 0.0003
    in turn and keeps the best validation loss per model: 0.003 here (its value per model is not
    published);
  * the linear probe (paper section 3.3/4.2): the average over the sequence of a layer's
    normalised features, best near the middle of the network: `linear` and `knn` read
    'block:N' with N = depth // 2 - 1 (the output of the first half of the blocks);
    `layer_probe` (kNN) scores every block.

Settings of this implementation:
  * igpt.palette_images / palette_pixels / palette_iters / palette_seed: the palette is Lloyd's
    k-means (seeded Forgy start from distinct pixels) of a seeded sample of the pretraining
    images' pixels at the input resolution; cached in <data.cache_dir or ~/.cache/mim_jax>/
    igpt_palettes/<hash>.npy (igpt.palette_cache overrides the folder) and copied to
    <workdir>/palette.npy; the checkpoint holds it (the method state 'palette').
  * igpt.sample_temperature: 1.0 (run.py's sampler), 0 for greedy completions.

Deviations:
  * The official palette was fitted once on ImageNet and is shared by every dataset; here each
    dataset gets its own (CIFAR presets: CIFAR-10's pixels). The official k-means procedure
    (its initialisation, sample, iterations) is not published.
  * The CPU presets are a tiny GPT (4 layers, width 128, 4 heads) at 16x16 from 32 px CIFAR
    images (resized with an antialiased linear filter inside the model), Adam lr 0.003 at
    batch 64 with a 0.5-epoch warm-up; the paper's smallest model is iGPT-S at 32x32.
  * Augmentation: the repo's random resized crop (scale 0.2 - 1) and flip at the input size,
    then the resize to the input resolution; the paper's exact pretraining crops are not in the
    official code (it ships centre-cropped evaluation sets only).
  * Features of a BERT model are computed with no token masked (deterministic features); the
    official `model` draws a BERT mask in every call.
  * The loss reads the GPT directly (it needs the logits), not `models.forward`: iGPT runs on
    its own backbone only (`config.model.name='gpt'`, checked).
"""
from mim_jax import config_lib
from mim_jax.models import gpt

PRESETS = ("", "bert", "cifar10", "cifar10_bert", "imagenet")


def probe_middle(c, depth: int) -> None:
  """kNN and the linear probe on block depth // 2 - 1 (the middle of the network); the per-block
  kNN probe on every block."""
  middle = f"block:{max(depth // 2 - 1, 0)}"
  c.evals.knn.feature = middle
  c.evals.linear.feature = middle
  c.evals.layer_probe.update(enabled=True, classifier="knn", pooling="mean",
                             max_train=c.evals.knn.max_train or 5_000)


def get_config(arg=None):
  preset = arg or "default"
  c = config_lib.base_config()
  c.method = "igpt"
  c.igpt = dict(objective="autoregressive", mask_prob=0.15, sample_temperature=1.0,
                palette_images=0, palette_pixels=200_000, palette_iters=30, palette_seed=0,
                palette_cache="")
  c.optim.update(name="adamw", base_lr=0.003, lr_batch_divisor=128, b1=0.9, b2=0.95, eps=1e-8,
                 weight_decay=0.0, schedule="cosine", warmup_lr=0.0, min_lr=0.0, clip_grad=0.0)
  base = preset.replace("_bert", "") if preset != "bert" else "default"
  if base in ("default", "cifar10"):
    config_lib.cpu_preset(c, base, epochs=(5, 2), batch=(64, 64), warmup_epochs=(0.5, 0.5),
                          pixels=True)
    c.model = gpt.default_config("s", depth=4, width=128, num_heads=4, resolution=16)
    c.optim.lr_batch_divisor = 64          # lr 0.003 at batch 64
    c.igpt.palette_images = 0 if base == "default" else 10_000
    c.igpt.palette_pixels = 50_000 if base == "default" else 200_000
    c.evals.reconstruction.num_images = 8
  elif base == "imagenet":
    config_lib.imagenet_preset(c, batch_size=128, variant="base", total_epochs=0)
    c.model = gpt.default_config("s", resolution=32, dtype="bfloat16")
    c.input.image_size = 32
    c.total_epochs = 0
    c.total_steps = 1_000_000
    c.optim.warmup_epochs = 1.0
    c.pooling = "mean"
    for name in c.evals:
      if "pooling" in c.evals[name]:
        c.evals[name].pooling = "mean"
    c.igpt.palette_images = 50_000
    c.igpt.palette_pixels = 1_000_000
    c.evals.reconstruction.num_images = 8
  else:
    raise ValueError(f"unknown preset {preset!r}: use '', 'bert', 'cifar10', 'cifar10_bert' or "
                     f"'imagenet'")
  if preset in ("bert", "cifar10_bert"):
    c.igpt.objective = "bert"
  probe_middle(c, c.model.depth)
  return c
