r"""VideoMAE: Masked Autoencoders are Data-Efficient Learners for Self-Supervised Video
Pre-Training (Tong et al., NeurIPS 2022); VideoMAE V2's dual masking (Wang et al., CVPR 2023) as
`--config.videomae.decoder_mask_ratio=0.5`.

Presets (`--config=configs/videomae.py:<preset>`):

  (none)       The embedded clip set (pan and zoom clips of 8 frames over the embedded CIFAR-10
               photographs, 4,000 train / 1,000 held out, the image's class as the label), a
               narrow space-time ViT at 32 px, CPU-sized; kNN and linear probe on mean-pooled
               clip features.
                 python -m mim_jax.main --config=configs/videomae.py --workdir=/tmp/videomae
  kinetics400  The official ViT-B recipe on Kinetics-400, 800 epochs.
  ssv2         The official ViT-B recipe on Something-Something V2, 800 epochs.
               Both stream video files (`input.data.name='video_csv'`: VideoMAE's `path label`
               train list in `input.data.csv`, paths relative to `input.data.dir`; evaluation on
               `input.data.eval_csv`, e.g. its val.csv), decoded with PyAV in grain workers
               (`pip install -e '.[video]'`; unreadable videos are skipped and counted):
                 python -m mim_jax.main --config=configs/videomae.py:kinetics400 \
                   --workdir=/tmp/videomae_k400 --config.input.data.csv=k400/train.csv \
                   --config.input.data.eval_csv=k400/val.csv --config.input.data.dir=k400

Official settings (MCG-NJU/VideoMAE at 14ef8d8), used by the kinetics400 and ssv2 presets:
  * model pretrain_videomae_base_patch16_224 (modeling_pretrain.py:311-325): ViT-B (768 wide,
    12 blocks, 12 heads), patch 16, tubelet 2 (PretrainVisionTransformer default, :203), q and
    v biases (qkv_bias=True in modeling_finetune.py:68-70), LayerNorm eps 1e-6, no layer scale
    (init_values=0.), fixed sinusoid positions (use_learnable_pos_emb=False), decoder 384 wide,
    6 heads (:320-321), depth 4 (scripts: --decoder_depth 4; run_mae_pretraining.py:29);
  * tube masking, ratio 0.9 (scripts: --mask_type tube --mask_ratio 0.9);
  * normalize_target True (run_mae_pretraining.py:44), ImageNet mean / std (datasets.py:11-12,
    engine_for_pretraining.py:39-41);
  * 16 frames (--num_frames 16), sampling rate 4 on Kinetics-400, 2 on SSv2 (--sampling_rate),
    224 px (--input_size default, run_mae_pretraining.py:38);
  * the clip: `kinetics.py` `VideoMAE._sample_train_indices` for both datasets (one segment, no
    temporal jitter: `input.data.sampling='videomae'`), then `GroupMultiScaleCrop(224, [1, .875,
    .75, .66])` (datasets.py:14, transforms.py; one box per clip, PIL bilinear, no flip:
    `input.aug.video_crop='multiscale'`);
  * AdamW (--opt adamw), betas (0.9, 0.95) (--opt_betas), eps 1e-8 (:50), weight decay 0.05
    constant (:58, weight_decay_end = weight_decay, :214-215), no gradient clipping (:54);
  * lr 1.5e-4 x batch / 256 (:64, :193) with batch 32 per GPU x 64 GPUs = 2048 (scripts,
    PRETRAIN.md:67; not 512), min_lr 1e-5 x batch / 256 (:68, :194), warm-up 40 epochs from 0
    (:71; utils.cosine_scheduler is called without start_warmup_value, so --warmup_lr is
    unused, :210-213) then cosine, per iteration;
  * 800 epochs (the scripts pass --epochs 801 to dodge a scheduler crash, PRETRAIN.md:69);
    drop path 0 (:41).
Published (MODEL_ZOO.md, fine-tuned, 16 frames x 5 clips x 3 crops): ViT-B 800 epochs 80.0
top-1 on Kinetics-400; ViT-B 800 epochs 69.6 top-1 on SSv2 (16 x 2 x 3).
VideoMAE V2 (OpenGVLab/VideoMAEv2 scripts/pretrain/vit_b_hybrid_pt.sh): decoder_mask_type
run_cell, decoder_mask_ratio 0.5 (its other settings, hybrid data and lr 1e-3 over 200
epochs, are V2's own recipe and not a preset here).

Deviations: the CPU preset's in-memory clips are cropped on the device, where the
GroupMultiScaleCrop of the streamed presets is not available: one RandomResizedCrop box per
clip with area (0.66^2, 1) and aspect ratio (0.875, 1/0.875), bilinear, no flip. The streamed
presets' temporal draw is the official one on `rng.integers` instead of the global NumPy
generator, and a video that fails to decode is replaced by the next one in the list (counted),
not by a random one. The official warm-up is np.linspace(0, lr, warmup_iters) (the peak one step earlier
than optax's linear ramp). The CPU preset: a ViT-tiny of 4 blocks, patch 4, 8-frame clips,
decoder 96 wide x 2 blocks x 3 heads, batch 128, 10 epochs (310 steps), base lr 1.5e-3, and
kNN / linear probe (VideoMAE itself is judged by fine-tuning).
"""
from mim_jax import config_lib

PRESETS = ("", "kinetics400", "ssv2")


def get_config(arg=None):
  preset = arg or "default"
  c = config_lib.base_config()
  c.method = "videomae"
  c.videomae = dict(mask_ratio=0.9, normalize_target=True, decoder_mask_ratio=0.0,
                    decoder=dict(width=384, depth=4, heads=6))
  # The space-time ViT: 2-frame tubelets, sinusoid table, no cls token, q and v biases.
  c.model.update(tubelet=2, pos_embed="sinusoid", cls_token=False, qkv_bias="qv")
  c.optim.update(name="adamw", base_lr=1.5e-4, lr_batch_divisor=256, b1=0.9, b2=0.95, eps=1e-8,
                 weight_decay=0.05, schedule="cosine", min_lr=1e-5, warmup_lr=0.0, clip_grad=0.0)
  c.input.aug.update(crop_scale=(0.66 ** 2, 1.0), crop_ratio=(0.875, 1 / 0.875), hflip=False,
                     video_crop="multiscale")   # streamed clips: GroupMultiScaleCrop
  c.pooling = "mean"

  if preset == "default":
    config_lib.cpu_preset(c, "default", epochs=(10, 10), batch=(128, 128), warmup_epochs=(2, 2),
                          log_every=(10, 10), ckpt_every=(200, 200), pixels=False)
    c.input.data.update(name="embedded_clips", num_frames=8)
    c.model.update(variant="tiny", depth=4, patch_size=4)
    c.videomae.decoder = dict(width=96, depth=2, heads=3)   # half the encoder's width, as ViT-B's
    c.optim.base_lr = 1.5e-3            # 1.5e-3 * 128/256 = 7.5e-4 peak: short runs want more
    c.evals.reconstruction.enabled = True   # filmstrips of the official visualisation
  elif preset in ("kinetics400", "ssv2"):
    c.input.data.update(name="video_csv", csv="", eval_csv="", in_memory=False,
                        holdout_per_class=0, num_frames=16, sampling="videomae",
                        sampling_rate=4 if preset == "kinetics400" else 2)
    c.input.image_size = 224
    c.input.batch_size = 2048
    c.input.workers = 16
    c.model.update(variant="base", depth=0, patch_size=16, dtype="bfloat16")
    c.optim.warmup_epochs = 40
    c.total_epochs = 800
    c.log_every = 50
    c.ckpt_every = 2000
    c.evals = config_lib.default_evals(probe_epochs=30, probe_optimizer="sgd", pooling="mean")
    c.evals.reconstruction.enabled = False
  else:
    raise ValueError(f"unknown preset {preset!r}: use '', 'kinetics400' or 'ssv2'")
  return c
