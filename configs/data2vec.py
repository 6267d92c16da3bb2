r"""data2vec (vision): a General Framework for Self-supervised Learning in Speech, Vision and
Language (Baevski et al., ICML 2022).

Presets (`--config=configs/data2vec.py:<preset>`):

  (none)     The embedded 5,000-image CIFAR-10 subset (4,000 train / 1,000 held out), a narrow
             ViT at 32 px, CPU-sized (a few minutes on 2 cores).
               python -m mim_jax.main --config=configs/data2vec.py --workdir=/tmp/data2vec
  cifar10    The CIFAR-10 image folder with 500 images per class held out for evaluation, about
             a CPU half-hour.
               python -m mim_jax.main --config=configs/data2vec.py:cifar10 --workdir=/tmp/d2v_c10 \
                 --config.input.data.dir=../shared/data/cifar10/train
  imagenet   The official ViT-B/16 recipe on tfds imagenet2012 (data2vec_vision README,
             "VIT-B Pretraining").

Official ViT-B settings (facebookresearch/data2vec_vision `beit/README.md` command, with the
defaults of `beit/run_cyclical.py`, `engine_for_cyclical.py`, `modeling_cyclical.py`,
`datasets.py`): 224 px, patch 16, BEiT encoder (q/v biases, shared relative position bias, no
absolute position embedding, layer scale 1e-4, drop path 0.25, trunc-normal .02 init with
proj/fc2 rescaled by 1/sqrt(2 * layer)); block-wise masks of at most 120 of the 196 patches
(blocks of >= 16 patches, up to 196, aspect 0.3 - 3.33); targets = the average of the top 6
block outputs (target_layers [6..11], layer_results 'end'), each layer-normed without affine
(target_layer_norm_last, on by default), the average layer-normed again
(--post_target_layer_norm); linear head D -> D; smooth L1 with beta 2 (--l1_beta=2.0), mean
over the masked tokens and channels (--loss_scale -1: no extra factor); EMA decay 0.9998 from
the first update (--ema_start_at 0, so --ema_decay_init 0.999 never applies); AdamW betas
(0.9, 0.999), eps 1e-8, weight decay 0.05 (none on 1-D parameters, pos_embed, cls_token), grad
clip 3.0, lr 2e-3 at batch 16 x 128 = 2048 (not rescaled by batch in the official script: here
base_lr 2e-3 with lr_batch_divisor 2048), 10 warm-up epochs from 0 (run_cyclical does not pass
its --warmup_lr to utils.cosine_scheduler), cosine to 1e-5, 800 epochs; ColorJitter(0.4, 0.4, 0.4) + flip + RandomResizedCrop(0.08-1, bicubic), ImageNet
mean/std. Published: ViT-B/16 800 epochs, 84.2 top-1 after fine-tuning (data2vec paper,
Table 1).

fairseq's port (`examples/data2vec/models/data2vec_vision.py`, config `base_imagenet_d2v1.yaml`)
names the same options differently and differs in a few settings: EMA 0.999 annealed to 0.9998
over the whole run, no per-layer norm (layer_norm_target_layer off, layer_norm_targets on),
75 masked patches, the loss summed over channels and scaled by 1/sqrt(D) (its loss_scale None),
300 epochs at lr 5e-4. Its names are used here:
  data2vec.ema_decay -> ema_end_decay over ema_anneal_end_step updates (0: ema_end_decay
  from the start), average_top_k_layers, *_norm_target_layer (per block), *_norm_targets (of
  the average), loss_beta (0 = squared error), loss_scale (> 0 a factor on the channel sum,
  0 = 1/sqrt(D), -1 = 1/D i.e. data2vec_vision's mean over channels).

Deviations:
  * attention dropout (--attn_drop_rate 0.05) is not implemented in mim_jax's ViT;
  * the random resized crop interpolates bilinearly (the official one bicubically), as in
    every mim_jax preset; with a streaming source (in_memory=False) the host crops before the
    colour jitter, so contrast uses the crop's mean luma instead of the whole image's;
  * post-average instance norm runs before the post-average layer norm (data2vec_vision's
    order; fairseq applies layer norm first); batch norm statistics are over the global batch
    (the official code's over each GPU's batch);
  * masks are BEiT's generator drawn with JAX's random numbers (same distribution, other bits);
  * the CPU presets keep the method but use a narrow ViT at 32 px (8 x 8 patches) with a sin-cos
    position embedding instead of the relative bias, layer scale 0.1 instead of 1e-4, no drop
    path, 38 of 64 patches masked (60%, the paper's ratio) in blocks of >= 5 patches (16/196 of
    the image), the top half of the blocks as targets, a faster EMA (0.99 -> 0.999) and a
    higher learning rate for runs of a few hundred steps.
"""
from mim_jax import config_lib

# The presets get_config takes ('' = the default, embedded data), for tests and tools.
PRESETS = ('', 'cifar10', 'imagenet')


def get_config(arg=None):
  preset = arg or "default"
  c = config_lib.base_config()
  c.method = "data2vec"
  c.data2vec = dict(
      num_mask_patches=120, min_mask_patches_per_block=16,
      max_mask_patches_per_block=196,          # 0 = num_mask_patches
      average_top_k_layers=6,
      layer_results="end",                     # block outputs (the only point exposed)
      batch_norm_target_layer=False, instance_norm_target_layer=False,
      layer_norm_target_layer=True,
      instance_norm_targets=False, layer_norm_targets=True,
      loss_beta=2.0, loss_scale=-1.0,
      ema_decay=0.999, ema_end_decay=0.9998, ema_anneal_end_step=0,
      color_jitter=0.4,                        # 0 = off
  )
  c.model.update(qkv_bias="qv", init_values=1e-4, init_style="beit", pos_embed="none",
                 rel_pos_bias="shared", drop_path=0.25)
  c.optim.update(name="adamw", base_lr=2e-3, lr_batch_divisor=2048, b1=0.9, b2=0.999, eps=1e-8,
                 weight_decay=0.05, clip_grad=3.0, warmup_lr=0.0, min_lr=1e-5, schedule="cosine")
  c.input.aug.crop_scale = (0.08, 1.0)
  c.input.aug.crop_ratio = (3.0 / 4.0, 4.0 / 3.0)
  c.ema.enabled = False                        # the teacher is the EMA encoder ('ema' features)

  if preset in ("default", "cifar10"):
    # 186 steps (about 8 minutes on 2 CPU cores) / 525 steps (about 30 minutes); data2vec
    # predicts features, not pixels.
    config_lib.cpu_preset(c, preset, epochs=(6, 3), pixels=False)
    c.model.update(variant="tiny", depth=6, patch_size=4, drop_path=0.0, init_values=0.1,
                   pos_embed="sincos", rel_pos_bias="none")
    c.data2vec.update(num_mask_patches=38, min_mask_patches_per_block=5,
                      max_mask_patches_per_block=0, average_top_k_layers=3,
                      ema_decay=0.99, ema_end_decay=0.999)
    c.optim.update(base_lr=1.6e-2)             # 1.6e-2 x 128 / 2048 = 1e-3 peak at batch 128
    if preset == "default":
      c.data2vec.ema_anneal_end_step = 186
    else:
      c.model.depth = 4                        # CPU budget
      c.data2vec.average_top_k_layers = 2
      c.data2vec.ema_anneal_end_step = 525
  elif preset == "imagenet":
    config_lib.imagenet_preset(c, batch_size=2048, total_epochs=800, variant="base")
    c.optim.warmup_epochs = 10
    c.evals.reconstruction.enabled = False
  else:
    raise ValueError(f"unknown preset {preset!r}: use '', 'cifar10' or 'imagenet'")
  return c
