r"""DeepMIM: Deep Supervision for Masked Image Modeling (Ren et al., WACV 2025), on MAE.

Presets (`--config=configs/deepmim.py:<preset>`):

  (none)     The embedded 5,000-image CIFAR-10 subset (4,000 train / 1,000 held out), a narrow
             ViT at 32 px, CPU-sized (a few minutes on 2 cores).
               python -m mim_jax.main --config=configs/deepmim.py --workdir=/tmp/deepmim
  cifar10    The CIFAR-10 image folder with 500 images per class held out for evaluation, about
             a CPU half-hour.
               python -m mim_jax.main --config=configs/deepmim.py:cifar10 --workdir=/tmp/deepmim_c10 \
                 --config.input.data.dir=../shared/data/cifar10/train
  imagenet   The official ViT-B/16 recipe (OliverRensu/DeepMIM README) on tfds imagenet2012.

Official settings (OliverRensu/DeepMIM `models_mae.py`, `engine_pretrain.py`,
`main_pretrain.py`, README): MAE's ViT-B/16 at 224 px, mask ratio 0.75, norm_pix_loss; extra
decoders on the outputs of blocks 6, 8 and 10 (1-based, before the final norm); every decoder,
the main one included, is 512 wide, 4 blocks, 16 heads (`mae_vit_base_patch16_dec512d8b` passes
decoder_depth=4 despite its name); the four losses summed with weight 1; AdamW betas
(0.9, 0.95), weight decay 0.05 (none on biases and norms), base lr 1.5e-4 x batch/256 with
batch 4096, 40 warm-up epochs then cosine, 1600 epochs; RandomResizedCrop(0.2-1, bicubic) +
flip, ImageNet mean/std. Published (paper): DeepMIM on MAE, ViT-B/16, 84.2 top-1 after
fine-tuning (MAE: 83.6); with CLIP targets 85.6.

Keys: deepmim.blocks (1-based block indices feeding the extra decoders), deepmim.loss_weights
(one per block, then the main decoder), deepmim.decoder (the extra decoders' size);
config.mae as in configs/mae.py (mask ratio, norm_pix_loss, the main decoder).

Deviations:
  * the released code is DeepMIM-CLIP (every decoder regresses a frozen CLIP ViT-B/16's 512-d
    tokens with a cosine loss); this is the paper's pixel variant DeepMIM-MAE, whose code is
    not released: MAE's norm-pix MSE on every decoder, with the released decoder sizes;
  * the random resized crop interpolates bilinearly (bicubic officially), as in every preset;
  * the CPU presets keep the method on a narrow 6-block ViT at 32 px with the extra decoders on
    blocks 3, 4 and 5 (the official 6/12, 8/12, 10/12 of the depth) and all decoders 128 wide,
    2 blocks, 4 heads (configs/mae.py's CPU decoder), with short schedules.
"""
from mim_jax import config_lib

# The presets get_config takes ('' = the default, embedded data), for tests and tools.
PRESETS = ('', 'cifar10', 'imagenet')


def get_config(arg=None):
  preset = arg or "default"
  c = config_lib.base_config()
  c.method = "deepmim"
  c.mae = dict(mask_ratio=0.75, norm_pix_loss=True, decoder=dict(width=512, depth=4, heads=16))
  c.deepmim = dict(blocks=(6, 8, 10), loss_weights=(1.0, 1.0, 1.0, 1.0),
                   decoder=dict(width=512, depth=4, heads=16))
  c.optim.update(name="adamw", base_lr=1.5e-4, lr_batch_divisor=256, b1=0.9, b2=0.95,
                 weight_decay=0.05, schedule="cosine", min_lr=0.0, clip_grad=0.0)
  c.input.aug.crop_scale = (0.2, 1.0)

  if preset in ("default", "cifar10"):
    # 248 steps (about 7 minutes on 2 CPU cores) / 525 steps (about 30 minutes).
    config_lib.cpu_preset(c, preset, epochs=(8, 3))
    c.model.update(variant="tiny", depth=6, patch_size=4)
    c.mae.decoder = dict(width=128, depth=2, heads=4)
    c.deepmim.update(blocks=(3, 4, 5), decoder=dict(width=128, depth=2, heads=4))
    c.optim.base_lr = 1.5e-3           # 1.5e-3 x 128/256 = 7.5e-4 peak: short runs want more
    if preset == "default":
      c.ema.enabled = True             # evaluated beside the online encoder
      c.ema.decay = 0.99
  elif preset == "imagenet":
    config_lib.imagenet_preset(c, batch_size=4096, total_epochs=1600, variant="base")
    c.optim.warmup_epochs = 40
  else:
    raise ValueError(f"unknown preset {preset!r}: use '', 'cifar10' or 'imagenet'")
  return c
