r"""MILAN: Masked Image Pretraining on Language Assisted Representation (Hou et al., 2022).

The method (mim_jax/methods/feature_mim.py, exact to zejiangh/MILAN `models_milan.py`,
`main_pretrain.py`, `engine_pretrain.py`, `PRETRAIN.sh`): MAE's encoder on the kept patches;
attentive masking (the kept 25% are drawn without replacement with probability proportional to
the teacher's last-block cls-to-patch attention, averaged over heads); the prompting decoder
(only the mask tokens are updated, attending to the fixed, embedded visible latents); the
target is the frozen teacher's token features for EVERY token (cls, visible and masked); the
loss is the squared distance of the L2-normalised prediction and target, 2 - 2 cos, averaged
over all tokens.

The teacher is any mim_jax run (its workdir): first train one, then this run.

Presets (`--config=configs/milan.py:<preset>`):

  (none)     The embedded 5,000-image CIFAR-10 subset (4,000 train / 1,000 held out), a narrow ViT at
             32 px, CPU-sized (248 steps, about 5 minutes on 2 cores after the teacher's):
               python -m mim_jax.main --config=configs/mae.py --workdir=/tmp/mae
               python -m mim_jax.main --config=configs/milan.py --workdir=/tmp/milan \
                 --config.feature_mim.teacher=/tmp/mae
  cifar10    The CIFAR-10 image folder with 500 images per class held out (about a CPU
             half-hour after the teacher's):
               python -m mim_jax.main --config=configs/mae.py:cifar10 --workdir=/tmp/mae_c10 \
                 --config.input.data.dir=../shared/data/cifar10/train
               python -m mim_jax.main --config=configs/milan.py:cifar10 --workdir=/tmp/milan_c10 \
                 --config.input.data.dir=../shared/data/cifar10/train \
                 --config.feature_mim.teacher=/tmp/mae_c10
  imagenet   The official ViT-B/16 recipe (PRETRAIN.sh) on tfds imagenet2012; the teacher is a
             mim_jax run at 224 px, patch 16 (--config.feature_mim.teacher=PATH).

Official settings (ViT-B/16): 224 px, mask ratio 0.75 (int(196 * 0.25) = 49 kept), attentive
masking, prompting decoder 8 blocks x 512 x 16 heads (qkv bias, LayerNorm eps 1e-6), loss on
all 197 tokens, AdamW betas (0.9, 0.95), weight decay 0.05 (none on 1-D parameters), base lr
1.5e-4 x batch/256 with batch 4096 (256 x 2 accumulation x 8 GPUs), 40 warm-up epochs then
half-cycle cosine to 0, 400 epochs, RandomResizedCrop(0.2-1, bicubic) + flip, ImageNet mean/std.
Published: ViT-B/16 85.4 top-1 after fine-tuning on ImageNet-1k (paper abstract).

Deviations: the teacher is a mim_jax ViT (its final-norm tokens, its width as the head width),
not OpenAI's CLIP ViT-B/16 (512-d projected tokens of `encode_image`); converted CLIP weights are
not supported. The CPU presets use small models and short schedules. The
Gumbel-top-k draw equals torch.multinomial without replacement in distribution, not in bits.
"""
from mim_jax import config_lib
from mim_jax.methods import feature_mim

# The presets get_config takes ('' = the default, embedded data), for tests and tools.
PRESETS = ('', 'cifar10', 'imagenet')


def get_config(arg=None):
  preset = arg or "default"
  c = config_lib.base_config()
  c.method = "feature_mim"
  c.name = "MILAN"
  c.feature_mim = feature_mim.default_config()
  c.optim.update(name="adamw", base_lr=1.5e-4, lr_batch_divisor=256, b1=0.9, b2=0.95,
                 weight_decay=0.05, schedule="cosine", min_lr=0.0, clip_grad=0.0)
  c.input.aug.crop_scale = (0.2, 1.0)

  if preset in ("default", "cifar10"):
    config_lib.cpu_preset(c, preset, epochs=(8, 4), pixels=False)   # 248 / 700 steps
    c.model.update(variant="tiny", depth=6, patch_size=4)
    c.feature_mim.decoder = dict(kind="prompting", width=128, depth=2, heads=4)
    c.optim.base_lr = 1.5e-3           # 1.5e-3 x batch/256: short runs want more
  elif preset == "imagenet":
    config_lib.imagenet_preset(c, batch_size=4096, total_epochs=400, variant="base")
    c.optim.warmup_epochs = 40
    c.evals.reconstruction.enabled = False
  else:
    raise ValueError(f"unknown preset {preset!r}: use '', 'cifar10' or 'imagenet'")
  return c
