r"""MVP: Multimodality-guided Visual Pre-training (Wei et al., ECCV 2022, arXiv 2203.05175).

MVP is BEiT with the dVAE tokenizer replaced by the image encoder of CLIP: the masked image goes
through a BEiT ViT (mask token in place of the masked patch embeddings, all tokens), and a linear
head on the outputs of the masked patches regresses the frozen teacher's patch features. The
method is mim_jax/methods/feature_mim.py with encoder 'mask_token', BEiT block-wise masking
(`masking.block_mask`: 75 of 196 patches, about 40%, blocks of at least 16 patches) and the
minus-cosine-similarity loss averaged over the masked patches.

No official code was released. The BEiT parts are exact to microsoft/unilm `beit/`
(`modeling_pretrain.py`, `masking_generator.py`, `run_beit_pretraining.py` and the README's
ViT-B pre-training command); MVP's own parts come from the paper: CLIP's patch features as the
targets of the masked patches and ViT-B/16 for 300 epochs (abstract). The loss, minus the
cosine similarity of prediction and target (as EVA-01 uses for the same regression), is from
memory of the paper's Sec. 3, which could not be re-read when this file was written: check it
there before quoting numbers. Other settings are BEiT-base's (MVP is built on BEiT).

The teacher is any mim_jax run (its workdir): first train one, then this run.

Presets (`--config=configs/mvp.py:<preset>`):

  (none)     The embedded 5,000-image CIFAR-10 subset (4,000 train / 1,000 held out), a narrow ViT at
             32 px, CPU-sized (155 steps, about 5 minutes on 2 cores after the teacher's):
               python -m mim_jax.main --config=configs/mae.py --workdir=/tmp/mae
               python -m mim_jax.main --config=configs/mvp.py --workdir=/tmp/mvp \
                 --config.feature_mim.teacher=/tmp/mae
  cifar10    The CIFAR-10 image folder with 500 images per class held out (about a CPU
             half-hour after the teacher's):
               python -m mim_jax.main --config=configs/mae.py:cifar10 --workdir=/tmp/mae_c10 \
                 --config.input.data.dir=../shared/data/cifar10/train
               python -m mim_jax.main --config=configs/mvp.py:cifar10 --workdir=/tmp/mvp_c10 \
                 --config.input.data.dir=../shared/data/cifar10/train \
                 --config.feature_mim.teacher=/tmp/mae_c10
  imagenet   ViT-B/16 at 224 px on tfds imagenet2012, 300 epochs; the teacher is a mim_jax run
             at 224 px, patch 16 (--config.feature_mim.teacher=PATH).

Settings (BEiT-base's beyond the above): ViT-B/16 with q and v biases, layer
scale 0.1, a shared relative position bias, no absolute position embedding, drop path 0.1,
trunc-normal init (proj/fc2 rescaled by 1/sqrt(2 * layer)); 75 masked patches; AdamW lr 1.5e-3
at batch 2048, betas (0.9, 0.999), eps 1e-8, weight decay 0.05 (none on 1-D parameters,
pos_embed, cls_token), gradient clipping 3.0, 10 warm-up epochs from 0 (BEiT's
cosine_scheduler without a start value), cosine to 1e-5; ColorJitter(0.4, 0.4, 0.4) on the
image, flip, RandomResizedCrop(scale 0.08-1); ImageNet mean/std. Teacher: OpenAI CLIP ViT-B/16. Published: 52.4 mIoU on ADE20K after
ViT-B/16 pre-training for 300 epochs (paper abstract).

Deviations: the crop is bilinear on a continuous box (BEiT: bicubic, whole pixels). The teacher is a mim_jax ViT
(final-norm tokens, its width as the head width), not CLIP; converted CLIP weights are not
supported. The CPU presets use small models, 26 of 64 patches masked with blocks of at least 4
patches, no drop path, a batch-scaled learning rate and short schedules.
"""
from mim_jax import config_lib
from mim_jax.methods import feature_mim

# The presets get_config takes ('' = the default, embedded data), for tests and tools.
PRESETS = ('', 'cifar10', 'imagenet')


def get_config(arg=None):
  preset = arg or "default"
  c = config_lib.base_config()
  c.method = "feature_mim"
  c.name = "MVP"
  c.feature_mim = feature_mim.default_config()
  c.feature_mim.update(encoder="mask_token", masking="block", num_mask_patches=75,
                       min_mask_patches=16, loss="cosine", loss_on="masked")
  c.feature_mim.decoder = dict(kind="linear", width=0, depth=0, heads=0)
  c.model.update(qkv_bias="qv", init_values=0.1, init_style="beit", pos_embed="none",
                 rel_pos_bias="shared", drop_path=0.1)
  c.optim.update(name="adamw", base_lr=1.5e-3, lr_batch_divisor=2048, b1=0.9, b2=0.999, eps=1e-8,
                 weight_decay=0.05, clip_grad=3.0, warmup_lr=0.0, min_lr=1e-5, schedule="cosine")
  # BEiT's DataAugmentationForBEiT: ColorJitter(0.4, 0.4, 0.4) on the image, flip,
  # RandomResizedCrop(scale 0.08-1).
  c.feature_mim.color_jitter = 0.4
  c.input.aug.crop_scale = (0.08, 1.0)

  if preset in ("default", "cifar10"):
    # 155 / 350 steps: all 65 tokens pass the encoder and the teacher.
    config_lib.cpu_preset(c, preset, epochs=(5, 2), pixels=False)
    c.model.update(variant="tiny", depth=6, patch_size=4, drop_path=0.0)
    c.feature_mim.update(num_mask_patches=26, min_mask_patches=4)   # 40% of the 8 x 8 grid
    c.optim.update(base_lr=1.5e-3, lr_batch_divisor=256)
  elif preset == "imagenet":
    config_lib.imagenet_preset(c, batch_size=2048, total_epochs=300, variant="base")
    c.optim.warmup_epochs = 10
    c.evals.reconstruction.enabled = False
  else:
    raise ValueError(f"unknown preset {preset!r}: use '', 'cifar10' or 'imagenet'")
  return c
