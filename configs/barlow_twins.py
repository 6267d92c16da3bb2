r"""Barlow Twins (Zbontar et al., 2021), exact to facebookresearch/barlowtwins (main.py).

Presets (`--config=configs/barlow_twins.py:<preset>`):

  (none)       The embedded 5,000-image CIFAR-10 subset (4,000 train / 1,000 held out), a
               ResNet-18 (CIFAR stem) at a quarter width, a 1024-1024-1024 projector,
               CPU-sized (minutes on 2 cores).
                 python -m mim_jax.main --config=configs/barlow_twins.py --workdir=/tmp/barlow
  cifar10      The CIFAR-10 image folder, 500 images per class held out, a quarter-width
               ResNet-18 (CIFAR stem), solo-learn's 2048-2048-2048 projector, 5 epochs
               (benchmarks/joint_embedding_cpu.py prints its time).
                 python -m mim_jax.main --config=configs/barlow_twins.py:cifar10 \
                   --workdir=/tmp/barlow_c10 --config.input.data.dir=../shared/data/cifar10/train
  cifar10_full solo-learn's CIFAR-10 recipe on lightly's benchmark length (full ResNet-18 with
               the CIFAR stem, batch 512, 200 epochs; kNN k=200, T=0.1), for a GPU.
  imagenet     The official ResNet-50 recipe on tfds imagenet2012 (batch 2048, 1000 epochs).

Official settings (main.py's argument defaults, README command `python main.py /imagenet`):
  * ResNet-50 (torchvision, zero_init_residual=True, SyncBatchNorm), projector 8192-8192-8192
    ((Linear without bias, BatchNorm1d, ReLU) x 2, Linear without bias), BatchNorm1d without
    affine of each embedding, lambd 0.0051.
  * LARS (momentum 0.9, eta 0.001; biases and BatchNorm parameters, the 1-D ones, excluded
    from weight decay and trust ratio), weight decay 1e-6 (the paper says 1.5e-6; the code's
    default, used here, is 1e-6), learning rates 0.2 (weights) and 0.0048 (biases and
    BatchNorm) x batch / 256, 10 warm-up epochs from 0 then a cosine to 0.001 x the peak
    (adjust_learning_rate: base q + 0.001 base (1 - q)), batch 2048, 1000 epochs, 16 V100s.
  * Transform: RandomResizedCrop 224 (scale 0.08 - 1, bicubic), flip, ColorJitter (0.4, 0.4,
    0.2, 0.1) p 0.8, greyscale p 0.2, Gaussian blur (sigma 0.1 - 2) p 1.0 / 0.1, solarisation
    p 0.0 / 0.2 on the first / second view: `views_config()`'s defaults.

Keys: barlow_twins.projector_layers ((width, bias, bn), ...; `barlow_twins.projector_layers`
builds them from the official string), lambd, lr_biases (the 1-D parameters' base rate, per 256
like optim.base_lr, as a parameter group with lr_scale lr_biases / base_lr; equal rates: no
group), scale_loss (multiplies the optimised loss, solo-learn's knob; aux/barlow_loss is the
unscaled loss), views.

Deviations:
  * The official gradient is 1/16 of the gradient of its loss: the cross-correlation is summed
    over the 16 GPUs with torch.distributed.all_reduce, which passes no gradient to the other
    replicas, and DDP averages (not sums) the replicas' gradients (barlowtwins issue #8). The
    'imagenet' preset reproduces that with scale_loss = 1/16 (the logged loss is then 1/16 of
    the official's; aux/barlow_loss is the official value); under LARS this changes only the
    balance of gradient and weight decay for the weights and the biases' effective rate. Set
    scale_loss=1 for the gradient of the loss itself (what the other presets use, up to
    solo-learn's 0.1).
  * float32 (imagenet: bfloat16 encoder) instead of torch.cuda.amp fp16 autocast; the
    cross-correlation matmul at full float32 precision.
  * optax's LARS applies the learning rate before the momentum (mu = 0.9 mu + lr u, p -= mu);
    the official after (mu = 0.9 mu + u, p -= lr mu): the same at a constant rate, slightly
    different while the rate moves (warm-up, cosine).
  * The views' crops are bilinear on the device for in-memory data (bicubic on the host for
    streamed data, as the official); the colour ops are PIL's (data/views.py).
  * BatchNorm1d(affine=False)'s running statistics are not kept (never read by the official).
CPU / CIFAR presets (scripts/pretrain/cifar/barlow.yaml of vturrisi/solo-learn, with
augmentations/asymmetric.yaml): LARS lr 0.3 x batch / 256, weight decay 1e-4, the same rate for
biases and BatchNorm (solo-learn has one rate), scale_loss 0.1, lambd 0.0051, projector 2048
wide (1024 in the default preset, for the CPU), warm-up then cosine to 0; crops 0.08 - 1, jitter
(0.4, 0.4, 0.2, 0.1) p 0.8, grey 0.2, no blur, solarisation 0 / 0.2. Not reproduced there:
solo-learn's LARS eta 0.02 with clip_lr (each layer's rate min(0.02 |p| / |g|, lr)) - mim_jax's
LARS has the official eta 0.001 and no clipping; the 3e-5 warm-up start (0 here); solo-learn's
projector Linears with biases (the official's, without, here). Epochs and warm-up as SimCLR's CPU
presets (5 epochs, 1 / 0.5 warm-up epochs, batch 128 / 256); cifar10_full: 10 warm-up
epochs (solo-learn's default).
"""
from mim_jax import config_lib
from mim_jax.methods.barlow_twins import projector_layers
from mim_jax.methods.joint_embedding import views_config

PRESETS = ('', 'cifar10', 'cifar10_full', 'imagenet')


def get_config(arg=None):
  preset = arg or "default"
  c = config_lib.base_config()
  c.method = "barlow_twins"
  c.barlow_twins = dict(projector_layers=projector_layers("8192-8192-8192"), lambd=0.0051,
                        lr_biases=0.0048, scale_loss=1.0, views=views_config())
  c.optim.update(name="lars", base_lr=0.2, lr_batch_divisor=256, momentum=0.9, weight_decay=1e-6,
                 schedule="cosine", warmup_epochs=10, min_lr=0.2 * 0.001)
  if preset in ("default", "cifar10", "cifar10_full"):
    config_lib.joint_embedding_preset(c, preset, epochs=(5, 5), batch=(128, 256))
    width = 1024 if preset == "default" else 2048
    c.barlow_twins.update(projector_layers=projector_layers(f"{width}-{width}-{width}"),
                          lr_biases=0.3, scale_loss=0.1)
    c.barlow_twins.views = views_config(blur_probs=(0.0, 0.0), solarize_prob=0.2)
    c.optim.update(base_lr=0.3, weight_decay=1e-4, min_lr=0.0)
    c.optim.warmup_epochs = {"default": 1.0, "cifar10": 0.5}.get(preset, 10.0)
  elif preset == "imagenet":
    config_lib.joint_embedding_imagenet(c, batch_size=2048, total_epochs=1000)
    c.model.zero_init_residual = True
    c.barlow_twins.scale_loss = 1.0 / 16
  else:
    raise ValueError(f"unknown preset {preset!r}: use '', 'cifar10', 'cifar10_full' or 'imagenet'")
  return c
