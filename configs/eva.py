r"""EVA (EVA-01): Exploring the Limits of Masked Visual Representation Learning at Scale
(Fang et al., CVPR 2023), its MIM pre-training.

The method (mim_jax/methods/feature_mim.py, exact to baaivision/EVA `EVA-01/eva/
modeling_pretrain.py`, `engine_for_pretraining.py`, `run_eva_pretraining.py`, `datasets.py`,
`masking_generator.py`): a BEiT-style ViT over all tokens, the masked patch embeddings replaced
by a learnable mask token before the (learned, absolute) position embedding; BEiT's block-wise
masking of 105 of 256 patches (about 40%, min 16 patches per block, aspect 0.3-1/0.3, at most
105: the count may fall short, as in BEiT); a linear head (`lm_head`, trunc-normal .02) on the
final-norm tokens of the masked patches regresses the frozen teacher's patch features (EVA's
CLIP `encode_image` returns the final-norm patch tokens, no cls); loss minus the cosine
similarity, averaged over all masked patches of the batch.

The teacher is any mim_jax run (its workdir): first train one, then this run.

Presets (`--config=configs/eva.py:<preset>`):

  (none)     The embedded 5,000-image CIFAR-10 subset (4,000 train / 1,000 held out), a narrow ViT at
             32 px, CPU-sized (155 steps, about 5 minutes on 2 cores after the teacher's):
               python -m mim_jax.main --config=configs/mae.py --workdir=/tmp/mae
               python -m mim_jax.main --config=configs/eva.py --workdir=/tmp/eva \
                 --config.feature_mim.teacher=/tmp/mae
  cifar10    The CIFAR-10 image folder with 500 images per class held out (about a CPU
             half-hour after the teacher's):
               python -m mim_jax.main --config=configs/mae.py:cifar10 --workdir=/tmp/mae_c10 \
                 --config.input.data.dir=../shared/data/cifar10/train
               python -m mim_jax.main --config=configs/eva.py:cifar10 --workdir=/tmp/eva_c10 \
                 --config.input.data.dir=../shared/data/cifar10/train \
                 --config.feature_mim.teacher=/tmp/mae_c10
  imagenet   The EVA-01 recipe (README "Pre-train EVA on the merged-30M image dataset") at 224
             px, patch 14, on tfds imagenet2012; the teacher is a mim_jax run at 224 px, patch 14
             (--config.feature_mim.teacher=PATH).

Official settings: ViT-g/14 (1408 wide, 40 blocks, 16 heads, MLP 6144), q and v biases,
learned absolute position embedding, no relative position bias, no layer scale, drop path 0.1,
trunc-normal init (proj/fc2 rescaled by 1/sqrt(2 * layer)); 224 px, 105 masked patches; AdamW
lr 1e-3 at batch 4096 (no batch scaling), betas (0.9, 0.98), eps 1e-6, weight decay 0.05 (none on
1-D parameters, pos_embed, cls_token), gradient clipping 3.0, 2 warm-up epochs from 0
(run_eva_pretraining.py passes no start value to utils.cosine_scheduler),
cosine to 1e-5, 150 epochs; RandomResizedCrop(0.2-1, bicubic) + flip, no colour jitter, CLIP's
mean/std for the student. Teacher: OpenAI CLIP ViT-L/14 (768-d). Published: 89.6 top-1 on
ImageNet-1k at 336 px after ImageNet-21k intermediate fine-tuning (EVA-01/eva/README.md).

Deviations: mim_jax has no ViT-g (its MLP ratio is 4), so the imagenet preset uses ViT-H/14
(1280 wide, 32 blocks) with init std .02 (EVA-g: .015); it pre-trains on ImageNet-1k, not on
the merged-30M images; the teacher is a mim_jax ViT (final-norm tokens, its width as the head
width), not CLIP, and converted CLIP weights are not supported. The CPU presets use small
models, 26 of 64 patches masked with blocks of at least 4 patches, no drop path, a batch-scaled
learning rate and short schedules.
"""
from mim_jax import config_lib
from mim_jax.methods import feature_mim

# The presets get_config takes ('' = the default, embedded data), for tests and tools.
PRESETS = ('', 'cifar10', 'imagenet')

CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)
CLIP_STD = (0.26862954, 0.26130258, 0.27577711)


def get_config(arg=None):
  preset = arg or "default"
  c = config_lib.base_config()
  c.method = "feature_mim"
  c.name = "EVA"
  c.feature_mim = feature_mim.default_config()
  c.feature_mim.update(encoder="mask_token", masking="block", num_mask_patches=105,
                       min_mask_patches=16, loss="cosine", loss_on="masked")
  c.feature_mim.decoder = dict(kind="linear", width=0, depth=0, heads=0)
  c.model.update(qkv_bias="qv", init_values=0.0, init_style="beit", pos_embed="learned",
                 rel_pos_bias="none", drop_path=0.1)
  c.optim.update(name="adamw", base_lr=1e-3, lr_batch_divisor=4096, b1=0.9, b2=0.98, eps=1e-6,
                 weight_decay=0.05, clip_grad=3.0, warmup_lr=0.0, min_lr=1e-5, schedule="cosine")
  c.input.aug.crop_scale = (0.2, 1.0)
  c.input.mean, c.input.std = CLIP_MEAN, CLIP_STD

  if preset in ("default", "cifar10"):
    # 155 / 350 steps: all 65 tokens pass the encoder and the teacher.
    config_lib.cpu_preset(c, preset, epochs=(5, 2), pixels=False)
    c.model.update(variant="tiny", depth=6, patch_size=4, drop_path=0.0)
    c.feature_mim.update(num_mask_patches=26, min_mask_patches=4)   # 40% of the 8 x 8 grid
    c.optim.update(base_lr=1.5e-3, lr_batch_divisor=256)
  elif preset == "imagenet":
    config_lib.imagenet_preset(c, batch_size=4096, total_epochs=150, variant="huge")
    c.model.patch_size = 14
    c.input.mean, c.input.std = CLIP_MEAN, CLIP_STD
    c.optim.warmup_epochs = 2
    c.evals.reconstruction.enabled = False
  else:
    raise ValueError(f"unknown preset {preset!r}: use '', 'cifar10' or 'imagenet'")
  return c
