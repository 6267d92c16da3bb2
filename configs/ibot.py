r"""iBOT: Image BERT Pre-Training with Online Tokenizer (Zhou et al., ICLR 2022).

Presets (`--config=configs/ibot.py:<preset>`):

  (none)     The embedded 5,000-image CIFAR-10 subset (4,000 train / 1,000 held out), a narrow
             ViT at 32 px with small heads, 2 global crops of 32 px and 2 local crops of 16 px
             (4 x 4 patches of 4 px), CPU-sized (a few minutes on 2 cores).
               python -m mim_jax.main --config=configs/ibot.py --workdir=/tmp/ibot
  cifar10    The CIFAR-10 image folder with 500 images per class held out for evaluation,
             about a CPU half-hour.
               python -m mim_jax.main --config=configs/ibot.py:cifar10 --workdir=/tmp/ibot_c10 \
                 --config.input.data.dir=../shared/data/cifar10/train
  imagenet   The official ViT-S/16 recipe of bytedance/ibot's README (800 epochs, 16 GPUs x 64
             images), on tfds imagenet2012. Published: kNN 75.2, linear 77.9, fine-tune 82.3.

Official settings (bytedance/ibot main_ibot.py defaults + the README's ViT-S/16 command), used by
the imagenet preset: ViT-S/16 (qkv bias, learned position embedding, drop path 0.1 in the
student), heads MLP 384 -> 2048 -> 2048 -> 256 + weight-normalised 8192-way layer shared by cls
and patch tokens (--shared_head true), norm_last_layer false, student temperature 0.1, teacher
temperatures 0.04 -> 0.07 over 30 epochs for cls and patch tokens, centre momentum 0.9 (both),
lambda1 = lambda2 = 1, teacher momentum 0.996 -> 1 (cosine), prediction ratio 0 or U(0.1, 0.5)
per crop (--pred_ratio 0 0.3 --pred_ratio_var 0 0.2), block-wise masks with aspect 0.3 - 1/0.3,
masking from epoch 0; 2 global crops 224 px scale (0.25, 1), 10 local crops 96 px scale
(0.05, 0.25), colour jitter (0.4, 0.4, 0.2, 0.1) p 0.8, grey p 0.2, blur p 1.0 / 0.1 / 0.5 with
radius U(0.1, 2), solarisation p 0.2 on the second global crop; AdamW (0.9, 0.999), lr 5e-4 x
batch / 256 with 10 warm-up epochs then cosine to 1e-6, weight decay 0.04 -> 0.4 (cosine; none
on biases and norms), per-parameter gradient clipping at 3.0, last layer frozen in epoch 1,
batch 1024, 800 epochs.

Deviations:
  * (No longer a deviation: the frozen last layer is an optimiser group frozen until the end
    of the frozen epochs, untouched by weight decay, and its AdamW step count starts when it
    thaws, as PyTorch's skipping of a grad-None parameter does.)
  * Per-parameter clipping and the freeze act on each micro-batch's gradient when
    config.optim.grad_accum > 1 (the official code has no accumulation).
  * Views: for in-memory data the crops come from the stored images on the device,
    RandomResizedCrop bilinear on a continuous box (official: bicubic, whole pixels); for
    streaming data (the imagenet preset) the grain workers cut every global and local crop
    from the decoded image, bicubic, as the official transforms do (IBOT.train_views). The
    colour, grey, blur and solarisation ops equal PIL's (mim_jax/data/views.py) and run on the
    device.
  * The learning-rate warm-up is optax's linear ramp (reaching the peak one step later than
    DINO's np.linspace) and min_lr is given x 256 / batch because config.optim scales it by the
    batch (1e-6 unscaled, as the official).
CPU presets (iBOT costs about ten MAE steps per image: a teacher and a student over all tokens
of every view): small ViT (tiny width, 4 blocks, patch 4), heads 192 -> 512 -> 512 -> 128 ->
1024 prototypes, 2 local crops, no drop path, teacher momentum 0.99 (short runs), base lr 1e-3,
short warm-ups (lr, teacher temperature: 2 epochs in the default preset, none in the 1-epoch
cifar10 one, whose teacher stays at 0.04, the official default teacher_temp; last layer frozen
for a quarter / a tenth of an epoch), blur radius scaled to the 32 px crops (x 32/224),
mean-pooled features for the probes.
"""
from mim_jax import config_lib

# The presets get_config takes ('' = the default, embedded data), for tests and tools.
PRESETS = ('', 'cifar10', 'imagenet')


def get_config(arg=None):
  preset = arg or "default"
  c = config_lib.base_config()
  c.method = "ibot"
  c.ibot = dict(
      out_dim=8192, patch_out_dim=8192, shared_head=True, shared_head_teacher=True,
      norm_last_layer=False, head=dict(hidden_dim=2048, bottleneck_dim=256, nlayers=3),
      student_temp=0.1, warmup_teacher_temp=0.04, teacher_temp=0.07,
      warmup_teacher_patch_temp=0.04, teacher_patch_temp=0.07, warmup_teacher_temp_epochs=30,
      center_momentum=0.9, center_momentum2=0.9, lambda1=1.0, lambda2=1.0,
      momentum_teacher=0.996,
      pred_ratio=(0.0, 0.3), pred_ratio_var=(0.0, 0.2), pred_shape="block",
      pred_aspect_ratio=(0.3, 1 / 0.3), pred_start_epoch=0,
      freeze_last_layer=1.0,          # epochs with the last layer's gradient cancelled
      clip_grad=3.0,                  # per-parameter gradient norm (utils.clip_gradients); 0 = off
      official_init=True,             # iBOT's ViT initialisation (see methods/ibot.py)
      views=dict(num_global=2, num_local=10, local_size=96, global_scale=(0.25, 1.0),
                 local_scale=(0.05, 0.25), ratio=(3 / 4, 4 / 3), hflip=True, jitter_prob=0.8,
                 jitter=(0.4, 0.4, 0.2, 0.1), gray_prob=0.2, blur_probs=(1.0, 0.1, 0.5),
                 blur_radius=(0.1, 2.0), solarize_prob=0.2),
  )
  vit_recipe(c)

  if preset in ("default", "cifar10"):
    # 124 steps (about 2 s each on 2 idle cores) / 351 steps (about 4.5 s each).
    config_lib.cpu_preset(c, preset, epochs=(2, 1), batch=(64, 128), warmup_epochs=(0.25, 0.1),
                          ckpt_every=(100, 200), pixels=False)
    c.model.update(variant="tiny", depth=4, patch_size=4, drop_path=0.0)
    c.ibot.update(out_dim=1024, patch_out_dim=1024, momentum_teacher=0.99,
                  warmup_teacher_temp_epochs=2)
    c.ibot.head = dict(hidden_dim=512, bottleneck_dim=128, nlayers=3)
    c.ibot.views.update(num_local=2, local_size=16,
                        blur_radius=(0.1 * 32 / 224, 2.0 * 32 / 224))
    c.optim.base_lr = 1e-3
    if preset == "default":
      c.optim.min_lr = 1e-6 * 256 / 64
      c.ibot.warmup_teacher_temp_epochs = 2
      c.ibot.freeze_last_layer = 0.25
    else:
      c.optim.min_lr = 1e-6 * 256 / 128
      c.ibot.warmup_teacher_temp_epochs = 1     # one epoch: the teacher stays at 0.04
      c.ibot.freeze_last_layer = 0.1
  elif preset == "imagenet":
    config_lib.imagenet_preset(c, batch_size=1024, variant="small", total_epochs=800)
    c.optim.min_lr = 1e-6 * 256 / 1024                        # 1e-6 after the batch scaling
    c.evals.reconstruction.enabled = False
  else:
    raise ValueError(f"unknown preset {preset!r}: use '', 'cifar10' or 'imagenet'")
  official_evaluation(c)
  return c


def vit_recipe(c) -> None:
  """The ViT and optimiser settings iBOT and DINO share (their main_*.py defaults for ViT-S/16):
  learned position embedding, qkv bias, no layer scale, drop path 0.1; AdamW (0.9, 0.999),
  lr 5e-4 x batch / 256 after 10 warm-up epochs, cosine; weight decay cosine 0.04 -> 0.4;
  the [CLS] token is the image's embedding."""
  c.model.update(pos_embed="learned", qkv_bias="qkv", init_values=0.0, drop_path=0.1)
  c.optim.update(name="adamw", base_lr=5e-4, lr_batch_divisor=256, b1=0.9, b2=0.999, eps=1e-8,
                 weight_decay=0.04, weight_decay_schedule="cosine", weight_decay_end=0.4,
                 schedule="cosine", warmup_epochs=10, clip_grad=0.0)
  c.pooling = "cls"


def official_evaluation(c) -> None:
  """iBOT's protocol (eval_knn.py, eval_linear.py with --checkpoint_key teacher): kNN on the
  [CLS] token after the final norm; the linear probe on the [CLS] tokens of the last 4 blocks,
  each through the final norm, concatenated (--n_last_blocks 4 --avgpool_patchtokens 0, the
  ViT-S setting). Every encoder is evaluated: the teacher's rows are the official numbers."""
  c.pooling = "cls"
  for name in ("knn", "linear", "few_shot", "layer_probe"):
    c.evals[name].pooling = "cls"
  c.evals.linear.update(feature="concat_last:4", pooling="cls_normed")
