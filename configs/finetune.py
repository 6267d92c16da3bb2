r"""Fine-tuning a pretrained ViT for classification: MAE's end-to-end recipe (FINETUNE.md).

`config.finetune.pretrained` names a pretraining workdir (configs/mae.py, simmim.py,
latent_mim.py, pcae.py, ... run with the same `model` settings); its latest checkpoint's online encoder
(`pretrained_encoder='ema'` for the EMA one) initialises the ViT. '' = from scratch, the same
ViT at its pretraining initialisation.

Presets (`--config=configs/finetune.py:<preset>`):

  (none)     The embedded CIFAR-10 subset, the ViT of configs/mae.py's default preset (tiny
             width, 6 blocks, 32 px, patch 4); fine-tunes the README's first MAE run:
               python -m mim_jax.main --config=configs/mae.py --workdir=/tmp/mae
               python -m mim_jax.main --config=configs/finetune.py --workdir=/tmp/mae_ft \
                 --config.finetune.pretrained=/tmp/mae
  cifar10    The CIFAR-10 image folder with the same 500-per-class hold-out as the pretraining
             presets (the evaluation images are never trained on), the ViT of the `cifar10`
             presets of configs/mae.py:
               python -m mim_jax.main --config=configs/mae.py:cifar10 --workdir=/tmp/mae_c10 \
                 --config.input.data.dir=../shared/data/cifar10/train
               python -m mim_jax.main --config=configs/finetune.py:cifar10 --workdir=/tmp/mae_c10_ft \
                 --config.finetune.pretrained=/tmp/mae_c10 \
                 --config.input.data.dir=../shared/data/cifar10/train
             and the same ViT from scratch (same recipe, no checkpoint):
               python -m mim_jax.main --config=configs/finetune.py:cifar10 --workdir=/tmp/scratch_c10_ft \
                 --config.input.data.dir=../shared/data/cifar10/train
  swin_cifar10    The narrow Swin of configs/simmim.py:swin_cifar10 (32 px, patch 2, window 4),
             SimMIM's Swin fine-tuning recipe (`swin_preset`) for 3 epochs (525 steps; 4.5-5.1 s
             a step measured on the busy 2-core CPU, so about 40 minutes):
               python -m mim_jax.main --config=configs/simmim.py:swin_cifar10 \
                 --workdir=/tmp/simmim_swin_c10 --config.input.data.dir=../shared/data/cifar10/train
               python -m mim_jax.main --config=configs/finetune.py:swin_cifar10 \
                 --workdir=/tmp/simmim_swin_c10_ft --config.finetune.pretrained=/tmp/simmim_swin_c10 \
                 --config.input.data.dir=../shared/data/cifar10/train
  imagenet_swin_b    SimMIM's Swin-B fine-tuning at 224 px, window 7, 100 epochs, from a
             configs/simmim.py:imagenet_swin_b run (192 px, window 6: its bias tables are
             resized on SimMIM's geometric grid); published 84.0 top-1.
  imagenet_swinv2_b  Swin V2-B at 224 px, window 14, pretrained_window_sizes (12, 12, 12, 6),
             from configs/simmim.py:imagenet_swinv2_b.
  mvit_cifar10    The narrow MViT of configs/maskfeat.py:mvit_cifar10 (same geometry: the
             pretraining's query strides are kept), SlowFast's MaskFeat fine-tuning head
             (USE_MEAN_POOLING: the mean of the last block's patch tokens, then the final
             norm; HEAD_INIT_SCALE 0.001: head std 2e-5), MViT layer ids for the layer decay,
             drop path 0.1, otherwise the 'cifar10' recipe (3 epochs):
               python -m mim_jax.main --config=configs/maskfeat.py:mvit_cifar10 \
                 --workdir=/tmp/maskfeat_mvit_c10 --config.input.data.dir=../shared/data/cifar10/train
               python -m mim_jax.main --config=configs/finetune.py:mvit_cifar10 \
                 --workdir=/tmp/maskfeat_mvit_c10_ft --config.finetune.pretrained=/tmp/maskfeat_mvit_c10 \
                 --config.input.data.dir=../shared/data/cifar10/train
  clips      The embedded clip set (8-frame pan and zoom clips over the embedded photographs),
             the space-time ViT of configs/videomae.py's default preset (no cls token: the head
             reads fc_norm of the mean of all tokens, as VideoMAE's use_mean_pooling), and
             VideoMAE's fine-tuning recipe (MCG-NJU/VideoMAE run_class_finetuning.py defaults:
             AdamW (0.9, 0.999), lr 1e-3 x batch / 256, warm-up from 1e-6 over 5 epochs (one
             here), min_lr 1e-6, layer decay 0.75, weight decay 0.05, drop path 0.1,
             RandAugment rand-m7-n4-mstd0.5-inc1 drawn once per clip, random erasing 0.25 per
             frame, mixup 0.8 / cutmix 1.0 on whole clips, smoothing 0.1); 6 epochs (186 steps):
               python -m mim_jax.main --config=configs/videomae.py --workdir=/tmp/videomae
               python -m mim_jax.main --config=configs/finetune.py:clips --workdir=/tmp/videomae_ft \
                 --config.finetune.pretrained=/tmp/videomae
             Deviations: RandAugment runs after the crop (VideoMAE: on the whole frames before
             it), and the evaluation reads each clip once (the embedded clips are 8 frames).
  kinetics400, ssv2  VideoMAE ViT-B/16 fine-tuning on video files (`input.data.csv` /
             `eval_csv`, VideoMAE's lists), from configs/videomae.py:kinetics400 / ssv2 runs:
             batch 8 x 64 GPUs = 512, lr 1e-3 (K400) / 5e-4 (SSv2) x batch / 256, 100 / 50
             epochs (scripts/*/..._epoch_800/finetune.sh); 16 frames: K400 VideoMAE's
             fine-tuning draw at rate 4 (VideoClsDataset), SSv2 one frame per segment
             (SSVideoClsDataset); RandomResizedCrop (0.08-1, 3/4-4/3) with a flip on K400
             only; test 5 x 3 (K400) / 2 x 3 (SSv2) views, softmax averaged (`test_views`).
             Published top-1: 80.0 (K400), 69.6 (SSv2). Deviations besides the above: the
             crop resizes bicubically with antialiasing (SlowFast's random_resized_crop:
             bilinear), and drop path, RandAugment and erasing run on the device after it.
  maskfeat_clips  The video MViT of configs/maskfeat.py:clips (same geometry) on the embedded
             clips, SlowFast's MaskFeat video fine-tuning (k400_mvitv2_s below) at the 'clips'
             budget: 6 epochs of batch 128 (186 steps), one warm-up epoch, peak lr 6e-4 (the
             yaml's rate, taken at this batch: about the 'clips' preset's 5e-4, so the MaskFeat
             and VideoMAE rows fine-tune alike), one example per clip (the yaml's
             AUG.NUM_SAMPLE 2 would double an epoch's steps: --config.input.aug.num_sample=2):
               python -m mim_jax.main --config=configs/maskfeat.py:clips --workdir=/tmp/maskfeat_clips
               python -m mim_jax.main --config=configs/finetune.py:maskfeat_clips \
                 --workdir=/tmp/maskfeat_clips_ft --config.finetune.pretrained=/tmp/maskfeat_clips
  k400_mvitv2_s   SlowFast's MaskFeat Kinetics-400 fine-tuning of MViTv2-S 16x4
             (configs/masked_ssl/k400_MVITv2_S_16x4_FT.yaml), from a
             configs/maskfeat.py:k400_mvitv2_s run: the video MViTv2-S with block 14's query
             stride put back (POOL_Q_STRIDE [14, 1, 2, 2]; the pretraining's relative position
             tables resized linearly where the strides change them, as checkpoint.py does),
             drop path 0.1, USE_MEAN_POOLING with HEAD_INIT_SCALE 0.001 ('mean' pooling);
             'clip' sampling, 16 frames at rate 4, RandomResizedCrop (0.08-1, 0.75-1.333) +
             flip on the whole clip, RandAugment rand-m7-mstd0.5-inc1 (2 ops), random erasing
             0.25 per frame, mixup 0.8 / cutmix 1.0, smoothing 0.1; repeated augmentation
             (AUG.NUM_SAMPLE 2: TRAIN.BATCH_SIZE 16 clips give 32 examples a step,
             `input.aug.num_sample`); AdamW (0.9, 0.999), lr 6e-4 (BASE_LR x NUM_SHARDS 1, not
             scaled by the batch), 20 warm-up epochs from 1e-6, cosine to 1e-6 at epoch 100,
             weight decay 0.05 (none on 1-D parameters), layer decay 0.75, gradient clipping at
             L2 norm 5.0; test: 10 temporal clips x 1 centre crop with SlowFast's offset
             placement (DATA.USE_OFFSET_SAMPLING, `input.data.use_offset`), softmax averaged.
             Published: 82.2 top-1 (10 x 1 views; projects/maskfeat/README.md).
               python -m mim_jax.main --config=configs/finetune.py:k400_mvitv2_s \
                 --workdir=gs://BUCKET/maskfeat_k400_ft --config.finetune.pretrained=gs://BUCKET/maskfeat_k400 \
                 --config.input.data.dir=/data/k400 --config.input.data.csv=/data/k400/train.csv \
                 --config.input.data.eval_csv=/data/k400/val.csv
             Deviations: the yaml evaluates 1, 3, 4, 5, 7 and 10 temporal clips in turn (one
             here: set input.data.test_views); frames are decoded at their own size (SlowFast:
             short side 320 first) and RandAugment runs on the device after the crop
             (SlowFast: on the decoded frames before it).
  imagenet_base   MAE ViT-B/16 on ImageNet-1k (tfds imagenet2012), the official recipe.
  imagenet_large  MAE ViT-L/16, the official recipe.
               python -m mim_jax.main --config=configs/finetune.py:imagenet_base --workdir=W \
                 --config.finetune.pretrained=PRETRAIN_WORKDIR --config.input.data.dir=TFDS_DIR

Official settings (main_finetune.py, FINETUNE.md, timm 0.3.2 create_transform / Mixup):
AdamW betas (0.9, 0.999), eps 1e-8, weight decay 0.05 (none on 1-D parameters, pos_embed,
cls_token); lr = blr x batch / 256 with batch 1024, blr 5e-4 (ViT-B) / 1e-3 (ViT-L, ViT-H);
layer-wise lr decay 0.65 (B) / 0.75 (L, H): scale decay^(L + 1 - layer id); 5 warm-up epochs
from 0, then half-cycle cosine to min_lr 1e-6 (absolute), per iteration; 100 epochs (B) / 50
(L, H); drop path 0.1 (B) / 0.2 (L) / 0.3 (H); no gradient clipping; global average pooling +
fc_norm; head trunc_normal(std 2e-5), bias 0. Train transform: RandomResizedCrop(224, scale
0.08-1, bicubic) + flip, RandAugment rand-m9-mstd0.5-inc1, Normalize(ImageNet mean/std),
RandomErasing(p 0.25, 'pixel', count 1); Mixup 0.8, CutMix 1.0, prob 1.0, switch 0.5, mode
'batch', label smoothing 0.1, soft-target cross-entropy. Eval: resize 256 (bicubic), centre
crop 224. Published (ImageNet-1k top-1, 1600-epoch pretraining with norm-pix loss):
ViT-B/16 83.6, ViT-L/16 85.9 (ViT-H/14 86.9).

CPU presets (recipe scaled down, everything else as above): blr 1e-3 -- the default of
main_finetune.py and the ViT-L/H value; a 6-block ViT with a short schedule tolerates the
larger rate, where ViT-B's 5e-4 is tuned for 12 blocks and 100 epochs; layer decay 0.75
(0.75^7 = 0.13 at the patch embedding, between ViT-B's 0.65^13 = 0.004 and no decay, for a
model half as deep); drop path 0.1; batch 256 (128 for the embedded set); cifar10: 3 epochs
with half a warm-up epoch (525 steps; 6.6 s a step measured on a busy 2-core machine, so under
an hour), embedded: 6 epochs with one (186 steps). The encoder sees all 64 tokens here, four
times the visible tokens of an MAE pretraining step. min_lr is written per 256 images like the
peak (mim_jax scales both by the batch): 1e-6 x 256 / batch.
A fine-tune run needs the pretraining workdir only at its start: resuming or --mode=eval
restore the fine-tune checkpoint, so they also work with --config.finetune.pretrained=''.

Deviations (see mim_jax/methods/finetune.py and mim_jax/data/finetune_aug.py): augmentation
runs on the device after the trainer's crop (in memory: a bilinear crop; official: bicubic);
RandAugment's geometric ops interpolate bilinearly (timm: bicubic); one mixup lam per global
batch (official: per GPU batch of 32); from scratch the head also starts at N(0, 2e-5) and the
learnable position embedding at the sin-cos table (the official script does so only when it
loads a checkpoint; timm: trunc-normal .02); the 32 px CPU presets evaluate the stored images
without the 0.875 centre crop; bf16 compute on accelerators (official: fp16 autocast).
"""
import os

import ml_collections

from mim_jax import config_lib

# The presets get_config takes ('' = the default, embedded data), for tests and tools.
PRESETS = ('', 'cifar10', 'imagenet_base', 'imagenet_large', 'resnet18', 'resnet18_cifar10',
           'swin_cifar10', 'imagenet_swin_b', 'imagenet_swinv2_b', 'mvit_cifar10', 'clips',
           'kinetics400', 'ssv2', 'maskfeat_clips', 'k400_mvitv2_s')


def finetune_settings(num_classes: int) -> ml_collections.ConfigDict:
  """`config.finetune`: the pretrained run, the head and timm's augmentation settings."""
  return ml_collections.ConfigDict(dict(
      pretrained="",                # pretraining workdir; '' = from scratch
      pretrained_encoder="online",  # 'online' | 'ema'
      num_classes=num_classes,
      pooling="mean",               # 'mean' (MAE global_pool + fc_norm) | 'cls'
      learn_pos_embed=True,         # MAE fine-tunes pos_embed (from the sin-cos table)
      proj_layers=0,                # CNNs: keep the pretrained projector's first N layers
                                    # (SimCLR v2 fine-tunes from its first: 1)
      # SimCLR v2's distillation stage: a fine-tuned run (teacher) labels every training
      # image; the student (this run's model) learns its soft targets at `temperature`.
      distill=dict(teacher="",      # the fine-tuned teacher's workdir; '' = plain fine-tuning
                   temperature=0.1,   # paper: 0.1 self-distillation, 1.0 big-to-small
                   alpha=1.0,       # 1: distillation only (the paper's default); < 1 adds
                                    # (1 - alpha) x the labelled images' cross-entropy
                   labeled_subset=0.0,  # the teacher's input.data.train_subset (for alpha < 1)
                   scale_t2=True),  # x T^2, as the official colab's add_kd_loss
      aug=dict(
          rand_augment=True, ra_num_layers=2, ra_magnitude=9.0, ra_magnitude_std=0.5,
          ra_prob=0.5,              # timm 'rand-m9-mstd0.5-inc1'
          reprob=0.25, remode="pixel",
          mixup=0.8, cutmix=1.0, mixup_prob=1.0, mixup_switch_prob=0.5, smoothing=0.1,
      ),
  ))


def pretraining_model(method: str, preset: str, **changes) -> ml_collections.ConfigDict:
  """The model of configs/<method>.py:<preset>, the pretraining a preset fine-tunes (so its
  workdir loads), with the fine-tuning's `changes` (drop path, strides)."""
  model = config_lib.load(method, preset, os.path.dirname(os.path.abspath(__file__))).model
  model.update(changes)
  return model


def classifier_evals(c: ml_collections.ConfigDict) -> ml_collections.ConfigDict:
  """The classifier evaluator only; the frozen-feature evaluators of `default_evals` are present
  (so their keys can be set) but disabled."""
  evals = config_lib.default_evals(probe_epochs=30, probe_optimizer="sgd", pooling="mean")
  for name in evals:
    evals[name].enabled = False
  evals.classifier = ml_collections.ConfigDict(dict(
      type="classifier", enabled=True, batch_size=256, max_eval=0, head="linear"))
  evals.classifier.pooling = c.finetune.get_ref("pooling")   # follows --config.finetune.pooling
  return evals


def resnet_preset(c: ml_collections.ConfigDict, preset: str) -> None:
  """A torchvision ResNet-18 with the CIFAR stem (3x3 conv, no max-pool), trained supervised
  from scratch (or fine-tuned from a ResNet pretraining run) with BatchNorm in training mode:
  the usual CIFAR recipe (SGD momentum 0.9, weight decay 5e-4, lr 0.1 x batch / 256, cosine),
  without RandAugment, random erasing or mixup; RandomResizedCrop(scale 0.35-1) + flip
  stands in for the 4-pixel-padding random crop. The frozen-feature evaluators (kNN, linear
  probe) run beside the classifier, on the globally pooled final feature map."""
  from mim_jax.models import resnet
  c.model = resnet.default_config(depth=18, stem="cifar")
  c.finetune.pooling = "avg"
  c.finetune.aug.update(rand_augment=False, reprob=0.0, mixup=0.0, cutmix=0.0, mixup_prob=0.0,
                        smoothing=0.0)
  c.optim.update(name="sgd", momentum=0.9, nesterov=False, base_lr=0.1, lr_batch_divisor=256,
                 weight_decay=5e-4, schedule="cosine", warmup_epochs=0.0, min_lr=0.0)
  c.optim.layer_decay = 1.0
  c.input.aug.crop_scale = (0.35, 1.0)
  c.input.image_size = 32
  c.pooling = "mean"
  if preset == "resnet18":
    c.input.data.update(name="embedded", holdout_per_class=100)
    c.input.batch_size = 128
    c.total_epochs = 15               # 465 steps
    c.log_every, c.ckpt_every = 10, 200
  else:
    c.input.data.update(name="image_folder", dir="", holdout_per_class=500)
    c.input.batch_size = 256
    c.total_epochs = 30
    c.log_every, c.ckpt_every = 20, 500


def swin_preset(c: ml_collections.ConfigDict, preset: str) -> None:
  """microsoft/SimMIM's Swin fine-tuning (main_finetune.py, configs/swin_base__800ep/
  simmim_finetune__swin_base__img224_window7__800ep.yaml; Swin V2-B: microsoft/
  Swin-Transformer configs/simmim/simmim_finetune__swinv2_base__img224_window14__800ep.yaml):
  the mean of the final normed tokens into a Linear head (trunc_normal .02); AdamW betas
  (0.9, 0.999), eps 1e-8, weight decay 0.05 (official fine-tuning rule), grad clip 5.0;
  lr 1.25e-3 x batch / 512, warm-up from 2.5e-7 x batch / 512, cosine to 2.5e-7 x batch / 512,
  per iteration; layer decay 0.8 (Swin-B), 0.75 (Swin V2-B) over get_swin_layer's ids; drop
  path 0.1; timm's RandAugment / random erasing / mixup as the ViT presets."""
  from mim_jax.models import swin  # pylint: disable=g-import-not-at-top
  c.finetune.pooling = "avg"
  c.finetune.table_interp = "geometric"     # SimMIM's remap of v1 tables (window 6 -> 7)
  c.optim.update(base_lr=1.25e-3, lr_batch_divisor=512, warmup_lr=2.5e-7, min_lr=2.5e-7,
                 clip_grad=5.0)
  c.pooling = "mean"
  if preset == "swin_cifar10":
    # The Swin of configs/simmim.py:swin_cifar10, so its workdir loads; 100-epoch layer decay
    # 0.9 (configs/swin_base__100ep) for a model of 8 blocks.
    c.model = pretraining_model("simmim", "swin_cifar10", drop_path=0.1)
    c.input.image_size = 32
    c.input.data.update(name="image_folder", dir="", holdout_per_class=500)
    c.input.batch_size = 256
    c.optim.layer_decay = 0.9
    c.optim.warmup_epochs = 0.5
    c.total_epochs = 3                # CPU budget: 525 steps
    c.log_every, c.ckpt_every = 20, 500
  else:
    v2 = preset == "imagenet_swinv2_b"
    config_lib.imagenet_preset(c, batch_size=2048, variant="base", total_epochs=100)
    c.model = swin.default_config(variant="base", version=2 if v2 else 1,
                                  window_size=14 if v2 else 7, drop_path=0.1,
                                  pretrained_window_sizes=(12, 12, 12, 6) if v2 else (),
                                  dtype="bfloat16")
    c.finetune.num_classes = 1000
    c.optim.layer_decay = 0.75 if v2 else 0.8
    c.optim.warmup_epochs = 20
    c.pooling = "mean"


def clips_preset(c: ml_collections.ConfigDict, preset: str) -> None:
  """VideoMAE's fine-tuning recipe (run_class_finetuning.py defaults and scripts) on the
  embedded clips with the ViT of configs/videomae.py's default preset ('clips'), or on
  Kinetics-400 / SSv2 video files with ViT-B ('kinetics400', 'ssv2')."""
  c.model.update(tubelet=2, pos_embed="sinusoid", cls_token=False, qkv_bias="qv")
  c.finetune.learn_pos_embed = False   # VideoMAE fine-tunes with the fixed sinusoid table
  c.finetune.aug.update(ra_num_layers=4, ra_magnitude=7.0)    # --aa rand-m7-n4-mstd0.5-inc1
  # lr, min_lr and warmup_lr are all scaled by batch / 256 (run_class_finetuning.py:406-408).
  c.optim.update(base_lr=1e-3, layer_decay=0.75, warmup_epochs=5, warmup_lr=1e-6, min_lr=1e-6)
  if preset == "clips":
    c.input.data.update(name="embedded_clips", holdout_per_class=100, num_frames=8)
    c.input.image_size = 32
    c.input.batch_size = 128
    c.model.update(variant="tiny", depth=4, patch_size=4)
    c.optim.warmup_epochs = 1
    c.total_epochs = 6                  # 186 steps
    c.log_every = 10
    c.ckpt_every = 200
    return
  k400 = preset == "kinetics400"
  c.input.data.update(name="video_csv", csv="", eval_csv="", in_memory=False, holdout_per_class=0,
                      num_frames=16, sampling_rate=4,
                      sampling="videomae_finetune" if k400 else "segment",
                      test_views=(5, 3) if k400 else (2, 3))
  c.input.aug.update(crop_scale=(0.08, 1.0), crop_ratio=(0.75, 1.3333), hflip=k400,
                     video_crop="random_resized")
  c.input.image_size = 224
  c.input.batch_size = 512              # 8 per GPU x 64 GPUs (scripts)
  c.input.workers = 16
  c.model.update(variant="base", depth=0, patch_size=16, dtype="bfloat16")
  c.finetune.num_classes = 400 if k400 else 174
  c.optim.base_lr = 1e-3 if k400 else 5e-4
  c.total_epochs = 100 if k400 else 50
  c.log_every = 50
  c.ckpt_every = 2000


def maskfeat_video_preset(c: ml_collections.ConfigDict, preset: str) -> None:
  """SlowFast's MaskFeat video fine-tuning (configs/masked_ssl/k400_MVITv2_S_16x4_FT.yaml) on
  Kinetics-400 ('k400_mvitv2_s') or at the embedded clips' CPU budget ('maskfeat_clips')."""
  c.finetune.pooling = "mean"             # USE_MEAN_POOLING, HEAD_INIT_SCALE 0.001
  c.finetune.aug.update(ra_num_layers=2, ra_magnitude=7.0)    # AA_TYPE rand-m7-mstd0.5-inc1
  c.optim.update(base_lr=6e-4, layer_decay=0.75, warmup_lr=1e-6, min_lr=1e-6, clip_grad=5.0)
  c.pooling = "mean"
  if preset == "maskfeat_clips":          # the MViT of configs/maskfeat.py:clips
    c.model = pretraining_model("maskfeat", "clips", drop_path=0.1)
    c.input.data.update(name="embedded_clips", holdout_per_class=100, num_frames=8)
    c.input.image_size = 32
    c.input.batch_size = 128
    c.optim.update(lr_batch_divisor=128, warmup_epochs=1)
    c.total_epochs = 6                    # 186 steps
    c.log_every, c.ckpt_every = 10, 200
    return
  # The pretraining's MViTv2-S with block 14's query stride restored (MASK.PRETRAIN_DEPTH off).
  c.model = pretraining_model("maskfeat", "k400_mvitv2_s", stage_strides=(2, 2, 2),
                              drop_path=0.1)
  c.input.data.update(name="video_csv", csv="", eval_csv="", in_memory=False, holdout_per_class=0,
                      num_frames=16, sampling="clip", sampling_rate=4, use_offset=True,
                      test_views=(10, 1))
  c.input.aug.update(crop_scale=(0.08, 1.0), crop_ratio=(0.75, 1.3333), hflip=True,
                     video_crop="random_resized", num_sample=2)
  c.input.update(image_size=224, batch_size=32, workers=16)   # 16 clips x NUM_SAMPLE 2
  c.finetune.num_classes = 400
  c.optim.update(lr_batch_divisor=32, warmup_epochs=20)
  c.total_epochs = 100
  c.log_every, c.ckpt_every = 50, 2000


def get_config(arg=None):
  preset = arg or "default"
  c = config_lib.base_config()
  c.method = "finetune"
  c.finetune = finetune_settings(num_classes=10)
  c.optim.update(name="adamw", base_lr=1e-3, lr_batch_divisor=256, b1=0.9, b2=0.999, eps=1e-8,
                 weight_decay=0.05, schedule="cosine", warmup_lr=0.0, clip_grad=0.0)
  c.optim.layer_decay = 0.75
  c.input.aug.crop_scale = (0.08, 1.0)
  c.input.aug.crop_ratio = (3.0 / 4.0, 4.0 / 3.0)
  c.model.drop_path = 0.1
  c.ema.enabled = False
  c.pooling = "mean"

  if preset in ("default", "cifar10", "mvit_cifar10"):
    # The ViT of configs/mae.py's CPU presets, so their workdirs load.
    c.input.image_size = 32
    c.model.update(variant="tiny", depth=6, patch_size=4)
    if preset == "mvit_cifar10":        # the MViT of configs/maskfeat.py:mvit_cifar10
      c.model = pretraining_model("maskfeat", "mvit_cifar10", drop_path=0.1)
      c.finetune.pooling = "mean"
    if preset == "default":
      c.input.data.update(name="embedded", holdout_per_class=100)
      c.input.batch_size = 128
      c.optim.warmup_epochs = 1
      c.total_epochs = 6                # 186 steps
      c.log_every = 10
      c.ckpt_every = 200
    else:                               # 'cifar10', 'mvit_cifar10'
      c.input.data.update(name="image_folder", dir="", holdout_per_class=500)
      c.input.batch_size = 256
      c.optim.warmup_epochs = 0.5
      c.total_epochs = 3                # CPU budget: 525 steps
      c.log_every = 20
      c.ckpt_every = 500
    c.optim.min_lr = 1e-6 * 256 / c.input.batch_size
  elif preset in ("clips", "kinetics400", "ssv2"):
    clips_preset(c, preset)
  elif preset in ("maskfeat_clips", "k400_mvitv2_s"):
    maskfeat_video_preset(c, preset)
  elif preset in ("resnet18", "resnet18_cifar10"):
    resnet_preset(c, preset)
  elif preset in ("swin_cifar10", "imagenet_swin_b", "imagenet_swinv2_b"):
    swin_preset(c, preset)
  elif preset in ("imagenet_base", "imagenet_large"):
    large = preset == "imagenet_large"
    config_lib.imagenet_preset(c, batch_size=1024, variant="large" if large else "base",
                               total_epochs=50 if large else 100)
    c.finetune.num_classes = 1000
    c.optim.base_lr = 1e-3 if large else 5e-4
    c.optim.layer_decay = 0.75 if large else 0.65
    c.optim.warmup_epochs = 5
    c.optim.min_lr = 1e-6 * 256 / c.input.batch_size    # 1e-6 absolute at batch 1024
    c.model.drop_path = 0.2 if large else 0.1
    c.pooling = "mean"
  else:
    raise ValueError(f"unknown preset {preset!r}: use one of {', '.join(map(repr, PRESETS))}")
  c.evals = classifier_evals(c)
  if preset.startswith("resnet18"):      # kNN and the linear probe on the pooled features too
    c.evals.knn.enabled = c.evals.linear.enabled = True
    if preset == "resnet18_cifar10":
      c.evals.knn.max_train = c.evals.linear.max_train = 20_000
  return c
