r"""MaskFeat: Masked Feature Prediction for Self-Supervised Visual Pre-Training (Wei et al.,
CVPR 2022), the image model with the HOG target.

Presets (`--config=configs/maskfeat.py:<preset>`):

  (none)     The embedded CIFAR-10 subset (100 images per class held out for evaluation), a
             narrow ViT at 32 px, CPU-sized.
               python -m mim_jax.main --config=configs/maskfeat.py --workdir=/tmp/maskfeat
  cifar10    The CIFAR-10 image folder with 500 images per class held out for evaluation.
               python -m mim_jax.main --config=configs/maskfeat.py:cifar10 --workdir=/tmp/maskfeat_c10 \
                 --config.input.data.dir=../shared/data/cifar10/train
             About a CPU half-hour (3 epochs, 4 blocks, as SimMIM's cifar10 preset).
  imagenet   The official ViT-B/16 recipe (facebookresearch/SlowFast
             configs/masked_ssl/in1k_VIT_B_MaskFeat_PT.yaml) on tfds imagenet2012.
  mvit_cifar10
             MaskFeat on a narrow, shallow MViTv2 (models/mvit.py), CIFAR-10 image folder
             as 'cifar10' (batch 256, 3 epochs of the 45,000 training images).
               python -m mim_jax.main --config=configs/maskfeat.py:mvit_cifar10 \
                 --workdir=/tmp/maskfeat_mvit_c10 --config.input.data.dir=../shared/data/cifar10/train
             About 45 minutes on the 2-core CPU (steps measured below).
  imagenet_mvitv2_s
             MaskFeat on MViTv2-S at 224 px (SlowFast's MaskMViT), tfds imagenet2012.
               python -m mim_jax.main --config=configs/maskfeat.py:imagenet_mvitv2_s \
                 --workdir=gs://BUCKET/maskfeat_mvitv2_s
  clips      MaskFeat on video: a narrow video MViTv2 on the embedded clip set (8-frame clips
             of 32 px, configs/videomae.py's CPU data), CPU-sized.
               python -m mim_jax.main --config=configs/maskfeat.py:clips --workdir=/tmp/maskfeat_clips
  k400_mvitv2_s
             SlowFast's Kinetics-400 MaskFeat pretraining of MViTv2-S 16x4 on video files
             (`input.data.csv` = a `path label` list, paths relative to `input.data.dir`).
               python -m mim_jax.main --config=configs/maskfeat.py:k400_mvitv2_s \
                 --workdir=gs://BUCKET/maskfeat_k400 --config.input.data.dir=/data/k400 \
                 --config.input.data.csv=/data/k400/train.csv --config.input.data.eval_csv=/data/k400/val.csv

Official settings (SlowFast: in1k_VIT_B_MaskFeat_PT.yaml, slowfast/models/masked.py,
operators.py HOGLayerC, datasets/imagenet.py, config/defaults.py), used by the imagenet preset:
224 px, patch 16, ViT-B (qkv bias, learned absolute position embedding, cls token, no layer
scale, drop path 0); BEiT block-wise masking at ratio 0.4 of the 14x14 grid (round(78.4) = 78
patches at most, blocks of at least 78 // 5 = 15 patches, aspect 0.3 to 1/0.3); a learnable
mask token; HOG target of the normalised image: 9 orientation bins, 8x8-pixel cells, no
Gaussian window, per-cell L2 normalisation per RGB channel, 2x2 cells x 9 bins x 3 channels
= 108 values per patch; head LayerNorm + Linear on the patch tokens; MSE on the masked
patches. AdamW betas (0.9, 0.999), eps 1e-8, weight decay 0.05 (none on 1-D parameters;
the position embedding, cls and mask tokens are decayed), gradient clipping at global L2
norm 0.02, base lr 2e-4 per 256 images, 30 warm-up epochs from 1e-6 (x batch/256) then cosine
to 1e-6 (x batch/256) at epoch 300. Batch: the yaml as released runs NUM_SHARDS 1 with
TRAIN.BATCH_SIZE 256, which SlowFast counts as the whole batch of one shard (8 GPUs x 32): batch
256 at lr 2e-4. The imagenet preset uses batch 2048 at peak lr 1.6e-3, the same yaml on 8
shards (BASE_LR_SCALE_NUM_SHARDS scales the lr by the shard count), because that is the setting
of the published 300-epoch reproduction (open-mmlab/mmselfsup
maskfeat_vit-base-p16_8xb256-amp-coslr-300e_in1k.py: 8 x 256 images, lr 2e-4 x 8, 83.4);
`--config.input.batch_size=256` gives the yaml as released (the lr follows the batch);
RandomResizedCrop(scale 0.5-1, ratio 3/4-4/3) + horizontal flip, no colour augmentation.
Published: ViT-B/16 84.0 top-1 after fine-tuning at 1600 epochs (projects/maskfeat/README.md);
open-mmlab/mmselfsup's 300-epoch reproduction of this recipe: 83.4.

MViT recipe (imagenet_mvitv2_s). SlowFast releases no image MaskFeat config for an MViT
(its MaskFeat MViT configs are Kinetics video: configs/masked_ssl/k400_MVITv2_S_16x4_MaskFeat_PT
.yaml and _L_); the preset applies that yaml's MViT changes to the image MViTv2-S
(configs/ImageNet/MVITv2_S.yaml of SlowFast, = facebookresearch/mvit configs/MVITv2_S.yaml) and
trains it with the image recipe above (in1k_VIT_B_MaskFeat_PT.yaml: optimiser, schedule,
batch, crop, mask ratio, HOG):
  * MViTv2-S: patch 7x7/4 (pad 3), width 96, 1 head, blocks 1-2-11-2 with width and heads x2
    at blocks 1, 3, 14 (DIM_MUL_IN_ATT True, the image model's), 3x3 q/k/v pooling
    convolutions, adaptive kv stride 4, relative position tables, residual pooling, no
    absolute position embedding, qkv bias, drop path 0 (DROPPATH_RATE 0.0);
  * from the MaskFeat MViT yaml: CLS_EMBED_ON True; the query stride of block 14 set to 1
    ([14, 1, 1, 1] "instead of [14, 1, 2, 2] for 14x14 output"), so the last block predicts
    at a 14x14 grid of stride 16 (MASK.PRETRAIN_DEPTH [15]); HEAD_TYPE separate, PRED_HOG;
  * masks: BEiT blocks on that 14x14 grid (round(196 * 0.4) = 78 at most, blocks >= 15), the
    mask token swapped in at the 56x56 patch grid (the mask upsampled by nearest neighbour);
  * HOG: 9 bins, 8-pixel cells, 2x2 cells per output token: 108 values (as ViT-B/16);
  * the optimiser, schedule and batch of the imagenet preset (2048 at 1.6e-3, see above).
The video yaml's other choices are not applied to the image model (they follow from its
16-frame input): POOL_KV_STRIDE_ADAPTIVE [1, 8, 8] (the image model's [4, 4] kept),
DIM_MUL_IN_ATT False (SlowFast's default there; the image MViTv2's True kept), the separate
space / time position embeddings (unused: USE_ABS_POS False), REL_POS_TEMPORAL. Published:
no image number for MaskFeat on an MViT (the paper's MViT results are Kinetics: MViTv2-S
16x4, 300 epochs of K400 pretraining, 82.2 top-1 after fine-tuning; its image results are
ViT-B / ViT-L).
mvit_cifar10 (a CPU size): 32 px images; the patch embedding a 3x3 convolution of stride 2
(pad 1: a 16x16 patch grid); width 32, heads 1, 2, 4, 8 by stage (head dim 32), blocks 1-1-2-1;
query strides (2, 1, 1): stage 2 pools 16x16 to 8x8 and stages 3 and 4 keep it (the official
MaskFeat MViT keeps its last stage's grid; this one keeps the last two), so the last block
predicts at 8x8, stride 4: the ViT CPU presets' geometry (HOG cells of 2 pixels, 2x2 cells per
token, 108 values; round(64 * 0.4) = 26 masked at most, blocks >= 5); adaptive kv stride 2, so
keys and values sit at the output grid, 8x8 (16x16 in the transition block, whose input is not
yet pooled), as 4 puts them at 14x14 for the official 224 px model; cls token, relative
positions, residual pooling; the learning rate and schedule of the 'cifar10' preset.
Measured on the 2-core CPU (with another training run beside it), steps 2-6 of
Trainer.step at batch 256: 4.96 s per step, the ViT 'cifar10' preset 3.05-3.26 s in runs
alternating with it; the 528 steps take about 44 minutes (compilation, about 30 s, and the
final evaluations come on top). A 1-pixel patch stride with query strides (2, 2, 1) (the official two poolings
to the same 8x8 grid, a 32x32 first stage) costs 2.3x the ViT's forward and backward pass,
over the CPU budget.

Video recipe (k400_mvitv2_s; configs/masked_ssl/k400_MVITv2_S_16x4_MaskFeat_PT.yaml with
SlowFast's defaults): 16 frames at sampling rate 4 (a random clip, 'clip' sampling; the
evaluators' clip the central one, USE_OFFSET_SAMPLING), 224 px,
RandomResizedCrop(scale 0.5-1, ratio 0.75-1.333) + flip on the whole clip, no colour
augmentation; the video MViTv2-S (models/mvit.py: Conv3d patch 3x7x7 / 2x4x4 / 1x3x3, width 96,
1 head, blocks 1-2-11-2, 3x3x3 pooling, adaptive kv stride (1, 8, 8), CLS_EMBED_ON, relative
positions in space and time, residual pooling, DIM_MUL_IN_ATT False (the default the yaml
keeps), no absolute position embedding, drop path 0) with block 14's query stride 1 ("for
14x14 output"); the last block predicts (PRETRAIN_DEPTH [15]); cube masks on the [8, 7, 7]
window at ratio 0.4; HOG of every second frame, 108 values per token; AdamW (0.9, 0.999),
weight decay 0.05 (none on 1-D parameters), gradient clipping at L2 norm 0.02, lr 1e-4
(BASE_LR 1e-4 x NUM_SHARDS 1; TRAIN.BATCH_SIZE 32 is the whole batch) with 10 warm-up epochs
from 1e-6, cosine to 1e-6 at epoch 300. Published (MaskFeat paper, K400): MViTv2-S 16x4 82.2
top-1 after 300 epochs of pretraining and fine-tuning (the fine-tuning recipe,
k400_MVITv2_S_16x4_FT.yaml, is configs/finetune.py:k400_mvitv2_s; the clips preset's is
configs/finetune.py:maskfeat_clips). The clips preset (CPU): 8-frame clips of 32 px, the patch
embedding 3x7x7 / 2x4x4 (4 token frames of 8x8), width 32, blocks 1-1-2-1, query strides (2, 1,
1) to a 4x4 output grid of stride 8 (HOG cells of 4 pixels: 108 values), kv stride 1, mask
window = the output grid (4 x 4 x 4, at most 26 masked), batch 128, 10 epochs of the 4,000
training clips, the image CPU presets' learning rate.

Deviations:
  * the CPU presets scale the HOG geometry to 32-pixel images: patch 4 and 2x2-pixel cells,
    so a patch still holds 2x2 cells and its target still has 108 values (the official
    16-pixel patches with 8-pixel cells); the 8x8 grid gets round(64 * 0.4) = 26 masked
    patches at most, in blocks of at least 26 // 5 = 5;
  * the CPU presets use a narrow ViT with a fixed sin-cos position embedding (learned in the
    official model), a larger learning rate and short schedules, like the MAE / SimMIM CPU
    presets; the default preset also evaluates an EMA of the encoder beside it;
  * the official batch of 2048 is one optimiser step here (set config.optim.grad_accum to
    split it over micro-batches); the official warm-up and cosine are per iteration as here;
  * block masks are drawn on the device by JAX's random numbers (equal to the official
    generator in distribution, not bit for bit); images are resized bilinearly on the device
    (bicubic in the official loader).
"""
from mim_jax import config_lib
from mim_jax.models import mvit

# The presets get_config takes ('' = the default, embedded data), for tests and tools.
PRESETS = ('', 'cifar10', 'imagenet', 'mvit_cifar10', 'imagenet_mvitv2_s', 'clips',
           'k400_mvitv2_s')


def get_config(arg=None):
  preset = arg or "default"
  c = config_lib.base_config()
  c.method = "maskfeat"
  # mask_window: clips only, the cube mask's (frames, h, w) grid (AUG.MASK_WINDOW_SIZE);
  # () = the MViT's output grid.
  c.maskfeat = dict(mask_ratio=0.4, hog_bins=9, hog_cell=8, official_init=True, mask_window=())
  c.model.update(qkv_bias="qkv", init_values=0.0, pos_embed="learned", rel_pos_bias="none",
                 drop_path=0.0)
  c.optim.update(name="adamw", base_lr=2e-4, lr_batch_divisor=256, b1=0.9, b2=0.999, eps=1e-8,
                 weight_decay=0.05, schedule="cosine", warmup_lr=1e-6, min_lr=1e-6, clip_grad=0.02)
  c.input.aug.crop_scale = (0.5, 1.0)
  c.input.aug.crop_ratio = (3.0 / 4.0, 4.0 / 3.0)

  if preset in ("default", "cifar10"):
    # 186 / 525 steps. MaskFeat predicts HOG, not pixels: no reconstruction to picture.
    config_lib.cpu_preset(c, preset, epochs=(6, 3), pixels=False)
    c.maskfeat.hog_cell = 2               # patch 4 = 2x2 cells of 2x2 pixels: 108 values
    c.model.update(variant="tiny", depth=6, patch_size=4, pos_embed="sincos")
    c.optim.update(base_lr=2e-3, warmup_lr=0.0, min_lr=0.0)   # 2e-3 x 128/256 = 1e-3 peak
    if preset == "default":
      c.ema.enabled = True
      c.ema.decay = 0.99
    else:
      c.model.depth = 4                   # CPU budget
  elif preset == "imagenet":
    config_lib.imagenet_preset(c, batch_size=2048, total_epochs=300, variant="base")
    c.optim.warmup_epochs = 30
    c.evals.reconstruction.enabled = False
  elif preset == "mvit_cifar10":
    config_lib.cpu_preset(c, "cifar10", epochs=(6, 3), pixels=False)
    c.maskfeat.hog_cell = 2               # stride-4 output tokens = 2x2 cells of 2x2 pixels
    c.model = mvit.default_config(variant="small", embed_dim=32, num_heads=1,
                                  stage_blocks=(1, 1, 2, 1), stage_strides=(2, 1, 1),
                                  patch_kernel=3, patch_stride=2, patch_padding=1, kv_stride=2,
                                  cls_token=True)
    c.optim.update(base_lr=2e-3, warmup_lr=0.0, min_lr=0.0)   # as the 'cifar10' preset
  elif preset == "imagenet_mvitv2_s":
    config_lib.imagenet_preset(c, batch_size=2048, total_epochs=300, variant="base")
    c.optim.warmup_epochs = 30
    c.evals.reconstruction.enabled = False
    c.model = mvit.default_config(variant="small", stage_strides=(2, 2, 1), cls_token=True,
                                  drop_path=0.0, dtype="bfloat16")
  elif preset == "clips":
    config_lib.cpu_preset(c, "default", epochs=(10, 10), batch=(128, 128), warmup_epochs=(2, 2),
                          log_every=(10, 10), ckpt_every=(200, 200), pixels=False)
    c.input.data.update(name="embedded_clips", num_frames=8)
    c.maskfeat.hog_cell = 4               # stride-8 output tokens = 2x2 cells of 4x4 pixels
    c.model = mvit.default_config(variant="small", embed_dim=32, num_heads=1,
                                  stage_blocks=(1, 1, 2, 1), stage_strides=(2, 1, 1),
                                  kv_stride=1, cls_token=True, dim_mul_in_att=False,
                                  num_frames=8)
    c.optim.update(base_lr=2e-3, warmup_lr=0.0, min_lr=0.0)   # as the image CPU presets
  elif preset == "k400_mvitv2_s":
    c.input.data.update(name="video_csv", csv="", eval_csv="", in_memory=False,
                        holdout_per_class=0, num_frames=16, sampling="clip", sampling_rate=4,
                        use_offset=True)   # DATA.USE_OFFSET_SAMPLING: the centre clip to evaluate
    c.input.aug.video_crop = "random_resized"
    c.input.update(image_size=224, batch_size=32, workers=16)
    c.model = mvit.default_config(variant="small", stage_strides=(2, 2, 1), kv_stride=8,
                                  cls_token=True, dim_mul_in_att=False, drop_path=0.0,
                                  num_frames=16, dtype="bfloat16")
    c.maskfeat.mask_window = (8, 7, 7)
    c.optim.update(base_lr=1e-4, lr_batch_divisor=32, warmup_epochs=10)   # lr 1e-4 at 32 clips
    c.total_epochs = 300
    c.log_every, c.ckpt_every = 50, 2000
    c.pooling = "mean"
    c.evals = config_lib.default_evals(probe_epochs=30, probe_optimizer="sgd", pooling="mean")
    c.evals.reconstruction.enabled = False
  else:
    raise ValueError(f"unknown preset {preset!r}: use one of {', '.join(map(repr, PRESETS))}")
  return c
