r"""TinyMIM: An Empirical Study of Distilling MIM Pre-trained Models (Ren et al., CVPR 2023).

A frozen MIM-pretrained teacher (another run's workdir: an MAE run, or a TinyMIM run for
sequential distillation) is distilled into a smaller ViT through the token relations of its
last block: softmax(q k^T / sqrt(d)) and softmax(v v^T / sqrt(d)) per head, KL(teacher ||
student), the student's last block split into the teacher's head count; both see the
un-masked image (mim_jax/methods/tinymim.py, exact to OliverRensu/TinyMIM `models_tinymim.py`,
`models_teacher.py`, `vit.py`, `engine_pretrain.py`, `main_pretrain.py`, README.md).

Presets (`--config=configs/tinymim.py:<preset>`):

  (none)     The embedded 5,000-image CIFAR-10 subset (4,000 train / 1,000 held out), 32 px,
             CPU-sized (248 steps; a step costs about 3 MAE steps of the same ViT, estimated
             ~10 minutes on 2 idle cores, not timed): first the teacher, then the student:
               python -m mim_jax.main --config=configs/mae.py --workdir=/tmp/mae
               python -m mim_jax.main --config=configs/tinymim.py --workdir=/tmp/tinymim \
                 --config.tinymim.teacher=/tmp/mae
             Sequential distillation (B -> S -> T) is two such runs, the second naming the
             first's workdir as its teacher:
               python -m mim_jax.main --config=configs/tinymim.py --workdir=/tmp/tinymim2 \
                 --config.model.depth=4 --config.tinymim.teacher=/tmp/tinymim
  cifar10    The CIFAR-10 image folder, 500 images per class held out; the student is the ViT of
             configs/mae.py:cifar10 (192 wide, 3 heads, 6 blocks, 32 px, patch 4); 3 epochs
             (525 steps), estimated 30-45 CPU minutes after the teacher's (not timed).
  imagenet         ViT-T/16 student (the official recipe), teacher a 224 px / patch 16 run,
                   e.g. a TinyMIM ViT-S (sequential B -> S -> T, the paper's ViT-T) or an MAE ViT-B.
  imagenet_small   ViT-S/16 student of an MAE ViT-B teacher (relation of its block 12).
  imagenet_base    ViT-B/16 student of an MAE ViT-L teacher (relation of its block 18,
                   the README command).
               python -m mim_jax.main --config=configs/tinymim.py:imagenet_small --workdir=W \
                 --config.tinymim.teacher=MAE_VIT_B_WORKDIR --config.input.data.dir=TFDS_DIR

The CIFAR-10 comparison (the paper's Table 2 motivation: MIM alone helps a tiny ViT little; a
ViT-T distilled from a larger MAE teacher does better). All on the same 500-per-class hold-out:
  # 1. the larger MAE teacher: ViT-S width (384, 6 heads), same depth, patch and schedule
  python -m mim_jax.main --config=configs/mae.py:cifar10 --workdir=/tmp/mae_c10_s \
    --config.model.variant=small --config.input.data.dir=../shared/data/cifar10/train
  # 2. the ViT-T baseline: MAE directly (configs/mae.py:cifar10 as is)
  python -m mim_jax.main --config=configs/mae.py:cifar10 --workdir=/tmp/mae_c10 \
    --config.input.data.dir=../shared/data/cifar10/train
  # 3. the same ViT-T by TinyMIM from the teacher of 1 (kNN and linear probe run at its end)
  python -m mim_jax.main --config=configs/tinymim.py:cifar10 --workdir=/tmp/tinymim_c10 \
    --config.tinymim.teacher=/tmp/mae_c10_s --config.input.data.dir=../shared/data/cifar10/train
  # 4. fine-tune both ViT-Ts with the same recipe (the paper's metric)
  python -m mim_jax.main --config=configs/finetune.py:cifar10 --workdir=/tmp/mae_c10_ft \
    --config.finetune.pretrained=/tmp/mae_c10 --config.input.data.dir=../shared/data/cifar10/train
  python -m mim_jax.main --config=configs/finetune.py:cifar10 --workdir=/tmp/tinymim_c10_ft \
    --config.finetune.pretrained=/tmp/tinymim_c10 --config.input.data.dir=../shared/data/cifar10/train
  (1 and 2 also report kNN / linear probe at their end; compare the `knn` and `linear` lines
  of 2 and 3 in their metrics.jsonl, and the fine-tune accuracies of 4.) A ViT-B-width teacher
  is `--config.model.variant=base` in 1 (then the relation heads are 12).

Official settings (README pretraining command, main_pretrain.py, models_tinymim.py): 224 px,
patch 16; target the Q-K + V-V relations of the teacher's block 12 (ViT-B/S teachers) or 18
(ViT-L), the student's last block with the teacher's head count (`last_heads`); the student
sees the raw image; AdamW betas (0.9, 0.95), weight decay 0.05 (none on biases and norm
scales: timm add_weight_decay), lr = 1.5e-4 x batch / 256 with batch 4096 (128 x 32 GPUs), 15
warm-up epochs then half-cycle cosine to 0 per iteration, 300 epochs, no gradient clipping;
RandomResizedCrop(224, scale 0.2-1, bicubic) + flip shared by both views, ColorJitter(0.4, 0.4,
0.4) on the student's only, ImageNet mean/std; student drop path 0.1.
Published (ImageNet-1k top-1 after fine-tuning, README): TinyMIM ViT-T 75.8 (MAE ViT-T 71.6),
ViT-S 83.0 (MAE 80.6), ViT-B 85.0 (MAE 83.6).

Deviations:
  * the official ViT-T student has 6 heads (192 / 6); mim_jax's 'tiny' has 3 (DeiT / MAE
    ViT-T). Only the student's own attention differs: its relations use the teacher's heads.
  * (No longer deviations: drop path is the official constant 0.1 in every block but the last,
    none there; the student parameters the relation loss does not reach are a frozen optimiser
    group, untouched by weight decay as torch skips parameters without a gradient.)
  * the crops are bilinear on a continuous box (augment.random_resized_crop_flip), rounded to
    8-bit levels before the PIL-exact ColorJitter; the official ones are bicubic.
  * the teacher is a workdir: a mim_jax run, or the official PyTorch MAE weights converted
    once (`python -m mim_jax.convert --from=torch --arch=mae mae_pretrain_vit_base.pth W`,
    docs/convert.md); it sees the shared view in its own run's mean / std.
  * masked-input variants (`input='visible' | 'mask_token'`) are not in the released code; they
    follow the paper's description (see mim_jax/methods/tinymim.py). The 'feature' and 'cls'
    targets follow FD (SwinTransformer/Feature-Distillation), whose recipe the paper's feature
    distillation baseline follows; the 'cls' target applies the same loss to the class token.
  * the official effective batch of 4096 is one optimiser step here (config.optim.grad_accum
    splits it). The CPU presets use small models and short schedules.
"""
from mim_jax import config_lib
from mim_jax.methods import tinymim

# The presets get_config takes ('' = the default, embedded data), for tests and tools.
PRESETS = ('', 'cifar10', 'imagenet', 'imagenet_small', 'imagenet_base')


def get_config(arg=None):
  preset = arg or "default"
  c = config_lib.base_config()
  c.method = "tinymim"
  c.tinymim = tinymim.default_config()
  c.optim.update(name="adamw", base_lr=1.5e-4, lr_batch_divisor=256, b1=0.9, b2=0.95,
                 weight_decay=0.05, schedule="cosine", min_lr=0.0, clip_grad=0.0)
  c.input.aug.crop_scale = (0.2, 1.0)

  if preset in ("default", "cifar10"):
    config_lib.cpu_preset(c, preset, epochs=(8, 3), pixels=False)   # 248 / 525 steps
    c.model.update(variant="tiny", depth=6, patch_size=4)
    c.optim.base_lr = 1.5e-3           # 1.5e-3 x batch/256: short runs want more (as configs/mae.py)
  elif preset in ("imagenet", "imagenet_small", "imagenet_base"):
    variant = {"imagenet": "tiny", "imagenet_small": "small", "imagenet_base": "base"}[preset]
    config_lib.imagenet_preset(c, batch_size=4096, total_epochs=300, variant=variant)
    c.optim.warmup_epochs = 15
    c.model.drop_path = 0.1
    c.evals.reconstruction.enabled = False
    if preset == "imagenet_base":
      c.tinymim.teacher_block = 18     # an MAE ViT-L teacher (models_teacher.mae_vit_large)
  else:
    raise ValueError(f"unknown preset {preset!r}: use '', 'cifar10', 'imagenet', "
                     f"'imagenet_small' or 'imagenet_base'")
  return c
