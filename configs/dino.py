r"""DINO (Caron et al., ICCV 2021), exact to facebookresearch/dino, on a ViT or a ResNet.

Presets (`--config=configs/dino.py:<preset>`):

  (none)          The embedded 5,000-image CIFAR-10 subset (4,000 train / 1,000 held out), a
                  narrow ViT at 32 px with a small head, 2 global crops of 32 px and 2 local
                  crops of 16 px (4 x 4 patches of 4 px), CPU-sized (minutes on 2 cores).
                    python -m mim_jax.main --config=configs/dino.py --workdir=/tmp/dino
  cifar10         The same ViT on the CIFAR-10 image folder, 500 images per class held out,
                  2 epochs (702 steps at batch 128: 35 images/s, about 45 min on the 2-core
                  CPU machine, 2026-12-07).
                    python -m mim_jax.main --config=configs/dino.py:cifar10 --workdir=/tmp/dino_c10 \
                      --config.input.data.dir=../shared/data/cifar10/train
  cifar10_resnet  DINO's ResNet recipe (below) on a quarter-width ResNet-18 with the CIFAR stem
                  (config_lib.joint_embedding_preset 'cifar10'), 8 epochs (benchmarks/joint_embedding_cpu.py prints its time).
  cifar10_full    DINO's ResNet recipe at lightly's CIFAR-10 benchmark setting (full ResNet-18,
                  CIFAR stem, batch 512, 200 epochs; kNN k=200, T=0.1), for a GPU.
  imagenet        The README's ViT-S/16 command (300 epochs, 16 GPUs x 64 images; published kNN
                  73.3, linear 76.0) on tfds imagenet2012.
  imagenet_resnet The README's ResNet-50 command (SGD, 8 GPUs x 64 images, 100 epochs).

Official settings (main_dino.py defaults, the `dino` block's own defaults here): out_dim 65536,
DINOHead 3 layers (hidden 2048, bottleneck 256, GELU, no BatchNorm), weight-normalised last
layer with g frozen at 1 (norm_last_layer True), student temperature 0.1, teacher
temperature 0.04 (warm-up 0.04 over 0 epochs), centre momentum 0.9, teacher momentum 0.996 ->
1 (cosine, per iteration), drop path 0.1 (student), AdamW (0.9, 0.999), lr 5e-4 x batch / 256
with 10 linear warm-up epochs then cosine to min_lr 1e-6, weight decay 0.04 -> 0.4 (cosine; no
decay on biases and 1-D parameters), per-parameter gradient clipping at 3.0, last layer frozen
during the first epoch, 100 epochs, batch 64 per GPU. Crops (DataAugmentationDINO): 2 global
224 px, scale 0.4 - 1, bicubic, + 8 local 96 px, scale 0.05 - 0.4; flip, colour jitter (0.4,
0.4, 0.2, 0.1) p 0.8, grey p 0.2; blur (radius U(0.1, 2)) p 1.0 / 0.1 / 0.5 (global 1 /
global 2 / local), solarisation p 0.2 on global 2 only. ViT-S/16: qkv bias, learned position
embedding, the [CLS] token after the final norm. Evaluation (eval_knn.py / eval_linear.py,
--checkpoint_key teacher): the teacher's features, kNN k=20, T=0.07; the ViT's linear probe on
the [CLS] of the last 4 blocks (configs/ibot.py `official_evaluation`, shared).
  * imagenet (README "boosting" command): 300 epochs, teacher temperature 0.04 -> 0.07 over
    30 epochs, norm_last_layer False, 16 x 64 = 1024 images.
  * ResNet recipe (imagenet_resnet: the README's "ResNet-50 and other convnets" command, 8 GPUs
    x 64 images, the other arguments at main_dino.py's defaults): SGD (momentum 0.9; no decay
    on biases and 1-D parameters, utils.get_params_groups), lr 0.03 x batch / 256, 10 warm-up
    epochs, cosine to min_lr 1e-6, weight decay 1e-4 constant (--weight_decay_end 1e-4),
    global crops 0.14 - 1, local 0.05 - 0.14, SyncBatchNorm (global statistics), 100 epochs.
    The released 800-epoch ResNet-50's own args.txt was not read here (it may differ);
    use_bn_in_head and LARS are options of this config (dino.use_bn_in_head,
    optim.name='lars').

Switches (config.dino): out_dim, hidden_dim, bottleneck_dim, nlayers, norm_last_layer,
use_bn_in_head, momentum (--momentum_teacher), momentum_schedule ('cosine'), teacher_temp,
warmup_teacher_temp, warmup_teacher_temp_epochs, student_temp, center_momentum,
freeze_last_layer (epochs, may be fractional), clip_grad (0 = off), official_init (the ViT's
init), views (num_local = --local_crops_number, global_scale, local_scale, ...).

Deviations:
  * Views: for in-memory data the crops come from the stored images on the device,
    RandomResizedCrop bilinear on a continuous box (official: bicubic, whole pixels); for
    streaming data (the imagenet presets) the grain workers cut every global and local crop
    from the decoded image, bicubic, as the official transforms do. The colour, grey, blur and
    solarisation ops equal PIL's (mim_jax/data/views.py) and run on the device.
  * The learning-rate warm-up is optax's linear ramp (reaching the peak one step later than
    utils.cosine_scheduler's np.linspace); min_lr is given x 256 / batch because
    config.optim scales it by the batch (the official min_lr is absolute).
  * With optim.name='lars' (an option, not a preset's): optax's LARS applies the learning rate
    before the momentum (mu = 0.9 mu + lr_t u_t); the official utils.LARS accumulates the raw
    update and multiplies by the current lr. The two differ while the learning rate changes.
  * No fp16 loss scaling (use_fp16): the imagenet presets compute in bfloat16.
  * Gradient accumulation is refused (the ResNet's BatchNorm couples the batch; the
    per-parameter clipping would act per micro-batch).
  * The ResNet is torchvision's (mim_jax.models.resnet), BatchNorm momentum 0.1, eps 1e-5.
CPU presets (ViT '' / cifar10, after configs/ibot.py's): small ViT (tiny width, 4 blocks, patch
4), head 192 -> 512 -> 512 -> 128 -> 1024 prototypes, 2 local crops of 16 px, no drop path,
teacher momentum 0.99 (short runs), base lr 1e-3, teacher temperature 0.04 -> 0.07 over 2 / 1
epochs, last layer frozen for a quarter / a tenth of an epoch, blur radius scaled to the
32 px crops (x 32/224), the [CLS] features for the probes, kNN at k=200, T=0.1 beside k=20
(as config_lib.joint_embedding_preset adds). cifar10_resnet: the ResNet recipe
on ResNet-18 x 0.5, batch 256, 8 epochs with 1 warm-up epoch, teacher momentum 0.99,
temperature warm-up 2 epochs, the same small head and crops (local 16 px). cifar10_full: the
ResNet recipe's head and schedules (8 local crops of 16 px, blur scaled to 32 px).
"""
import os

from mim_jax import config_lib
from mim_jax.methods.joint_embedding import views_config

PRESETS = ('', 'cifar10', 'cifar10_resnet', 'cifar10_full', 'imagenet', 'imagenet_resnet')

_BLUR_32 = (0.1 * 32 / 224, 2.0 * 32 / 224)


def _ibot_config():
  """configs/ibot.py as a module (DINO and iBOT share their ViT recipe and evaluation)."""
  return config_lib.config_module(os.path.join(os.path.dirname(os.path.abspath(__file__)), "ibot.py"))


def _official_evaluation(c) -> None:
  """configs/ibot.py `official_evaluation` (iBOT's protocol is DINO's eval_knn / eval_linear)."""
  _ibot_config().official_evaluation(c)


def resnet_recipe(c, *, warmup_epochs: float = 10) -> None:
  """The README's ResNet-50 command (see the docstring) on config `c`."""
  c.optim.update(name="sgd", base_lr=0.03, lr_batch_divisor=256, momentum=0.9, weight_decay=1e-4,
                 weight_decay_schedule="constant", weight_decay_end=1e-4, schedule="cosine",
                 warmup_epochs=warmup_epochs, clip_grad=0.0,
                 min_lr=1e-6 * 256 / c.input.batch_size)      # 1e-6 after the batch scaling
  c.dino.views.update(global_scale=(0.14, 1.0), local_scale=(0.05, 0.14))


def get_config(arg=None):
  preset = arg or "default"
  c = config_lib.base_config()
  c.method = "dino"
  c.dino = dict(
      out_dim=65536, hidden_dim=2048, bottleneck_dim=256, nlayers=3, norm_last_layer=True,
      use_bn_in_head=False, bn_groups=1,
      momentum=0.996, momentum_schedule="cosine",        # --momentum_teacher, cosine to 1
      warmup_teacher_temp=0.04, teacher_temp=0.04, warmup_teacher_temp_epochs=0,
      student_temp=0.1, center_momentum=0.9,
      freeze_last_layer=1.0,          # epochs with the last layer frozen
      clip_grad=3.0,                  # per-parameter gradient norm (utils.clip_gradients); 0 = off
      official_init=True,             # DINO's ViT initialisation (ibot.official_init)
      views=views_config(scale=(0.4, 1.0), num_local=8, local_size=96, local_scale=(0.05, 0.4),
                         local_blur_prob=0.5),
  )
  _ibot_config().vit_recipe(c)        # the same ViT and AdamW settings as iBOT's

  if preset in ("default", "cifar10"):
    config_lib.cpu_preset(c, preset, epochs=(2, 2), batch=(64, 128), warmup_epochs=(0.25, 0.1),
                          ckpt_every=(100, 200), pixels=False)
    c.model.update(variant="tiny", depth=4, patch_size=4, drop_path=0.0)
    _small_head(c)
    c.dino.update(momentum=0.99, teacher_temp=0.07,
                  warmup_teacher_temp_epochs=2 if preset == "default" else 1,
                  freeze_last_layer=0.25 if preset == "default" else 0.1)
    c.optim.base_lr = 1e-3
    c.optim.min_lr = 1e-6 * 256 / c.input.batch_size
    _official_evaluation(c)
    config_lib.knn_200(c)               # the joint-embedding presets' k=200, T=0.1 kNN too
  elif preset == "cifar10_resnet":
    config_lib.joint_embedding_preset(c, "cifar10", epochs=(8, 8), batch=(256, 256))
    resnet_recipe(c, warmup_epochs=1)
    _small_head(c)
    c.dino.update(momentum=0.99, freeze_last_layer=0.1)
  elif preset == "cifar10_full":
    config_lib.joint_embedding_preset(c, "cifar10_full")
    resnet_recipe(c)
    c.dino.views.update(local_size=16, blur_radius=_BLUR_32)
  elif preset == "imagenet":
    config_lib.imagenet_preset(c, batch_size=1024, variant="small", total_epochs=300)
    c.optim.min_lr = 1e-6 * 256 / 1024                        # 1e-6 after the batch scaling
    c.dino.update(teacher_temp=0.07, warmup_teacher_temp_epochs=30, norm_last_layer=False)
    c.evals.reconstruction.enabled = False
    _official_evaluation(c)
  elif preset == "imagenet_resnet":
    config_lib.joint_embedding_imagenet(c, batch_size=512, total_epochs=100, depth=50)
    resnet_recipe(c)
  else:
    raise ValueError(f"unknown preset {preset!r}: use one of {', '.join(map(repr, PRESETS))}")
  return c


def _small_head(c) -> None:
  """The CPU presets' head and crops: 1024 prototypes, 512-wide, bottleneck 128, 2 local crops
  of 16 px, blur radius scaled to 32 px."""
  c.dino.update(out_dim=1024, hidden_dim=512, bottleneck_dim=128)
  c.dino.views.update(num_local=2, local_size=16, blur_radius=_BLUR_32)
