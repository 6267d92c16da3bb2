r"""Limited-context inpainting + rotation + warping (Jenni, Jin & Favaro, CVPR 2020), after the
official sjenni/LCI (run_stl10.py, models/TCNet.py, models/lci_nets.py, train/TrainerSSL.py).

Presets (`--config=configs/limited_context.py:<preset>`):

  (none)     The embedded 5,000-image CIFAR-10 subset, the CIFAR AlexNet (BN, width 0.5, no
             pool5 as the official classifier), CPU-sized.
               python -m mim_jax.main --config=configs/limited_context.py --workdir=/tmp/lci
  cifar10    The CIFAR-10 image folder (500 per class held out), the same network, 1 epoch
             (3.7 s per step alone on the 2-core CPU: 703 steps, 43 min; docs/speed.md).
               python -m mim_jax.main --config=configs/limited_context.py:cifar10 \
                 --workdir=/tmp/lci_c10 --config.input.data.dir=../shared/data/cifar10/train
  imagenet   tfds imagenet2012 with the CaffeNet-width BN AlexNet; the official STL-10
             geometry scaled to 224 px (no official ImageNet recipe was released); for a GPU.

Official settings (run_stl10.py on STL-10: images randomly cropped to 80 px and flipped, in
[-1, 1]):
  * six classes: untransformed (half the batch as is, half with the inpainter's auto-encoded
    patch pasted), LCI, the untransformed images rotated by 90 / 180 / 270, warped; batch 64
    gives 6 x 64 classifier inputs.
  * LCI: a 48 px patch at a random position (shift in [-dx + 1, dx - 1], dx = (80 - 48) / 2),
    its centre 42 px erased (a 3 px border of context) and filled with 0.1 N(0, 1); the
    inpainter (lci_nets.patch_inpainter, 4 layers, depth ae_dim 48) inpaints it and auto-encodes
    the real patch; both are pasted back.
  * warping: sparse_image_warp with 16 random control points moved uniformly by up to
    80 / 16 = 5 px (a thin-plate spline).
  * classes 0, 1 and 5 are rotated by U(-0.07 pi, 0.07 pi) (the first half of each) and
    cropped to 64 px at a random shift (random_crop_rot).
  * the classifier: AlexNet (BN, no pool5, SAME padding) + fc 4096, 4096 (BN) + fc to 6; AdamW
    lr 3e-4, beta1 0.5, beta2 0.99, decoupled weight decay 1e-4 (x the same cosine as the lr;
    here optax's adamw weight_decay 1e-4 / 3e-4 = 1/3, which optax multiplies by the lr),
    cosine decay over the run to 1e-3 of the peak, 200 epochs.
  * inpainter loss: -mean D(inpainted) + 50 MSE(border) + 50 MSE(auto-encoded) - the
    classifier's CE; patch discriminator (spectral norm, 3 layers at 4 inpainter layers)
    hinge loss; both Adam lr 2e-4, beta1 0.5, the discriminator at d_lr_mult 4 x lr.

CPU presets (32 px CIFAR-10, the geometry scaled by 0.4 from 80 px and rounded to what the
networks need): classifier crop 28 (shift +-1), LCI patch 20 with a 16 px erased centre (a 2 px
border; the official 3 px x 0.4 = 1.2 px), 3 inpainter layers (2 stride-2 levels: 20 -> 5 ->
20) and so a 2-layer patch discriminator, warp magnitude 32 / 16 = 2 px with 16 points;
fc_dim 512 (the conv5 map is 7 x 7); batch 64 (x 6 classifier inputs), 3 / 1 epochs.

Deviations:
  * The trainer steps the adversary (inpainter + discriminator) first, then the classifier on
    transformations made by the updated inpainter; the official applies all three gradients
    computed in one forward pass. The inpainter's running statistics move in the adversary's
    pass only, the classifier's in the main pass only.
  * The classifier's BN scale and offset are exempt from weight decay as the official, and so
    are its biases here (the official decays biases).
  * Rotation about the image centre with bilinear sampling and zeros outside
    (contrib.image.rotate); the spline is solved in float32 as tf's, its gradient is not used.
  * Spectral norm: flax's SpectralNorm (one power iteration per call, u stored in
    'batch_stats' and updated by the real pass only as update_collection None / 'NO_OPS'); the
    power iteration's u and v are held by stop_gradient (tf's sn_ops differentiates through
    them); u starts from N(0, 1) instead of a truncated normal.
  * limited_context.warp=False drops class 5 (the paper's ablations without warping).
"""
from mim_jax import config_lib

PRESETS = ("", "cifar10", "imagenet")


def get_config(arg=None):
  preset = arg or "default"
  c = config_lib.base_config()
  c.method = "limited_context"
  c.limited_context = dict(
      crop_size=64, lci_crop=48, lci_patch=42, inpainter_layers=4, ae_dim=48, disc_depth=64,
      rot_max=0.07, warp=True, warp_factor=16.0, warp_points=16, ae_weight=50.0, fc_dim=4096,
      adv_lr=2e-4, d_lr_mult=4.0)
  c.optim.update(name="adamw", base_lr=3e-4, b1=0.5, b2=0.99, eps=1e-8, weight_decay=1e-4 / 3e-4,
                 schedule="cosine", warmup_epochs=0.0, warmup_lr=0.0, min_lr=3e-7)
  if preset in ("default", "cifar10"):
    config_lib.pretext_preset(c, preset, epochs=(3, 1), batch=(64, 64), pixels=True)
    c.model.pool5 = False
    c.optim.warmup_epochs = 0.0
    c.limited_context.update(crop_size=28, lci_crop=20, lci_patch=16, inpainter_layers=3,
                             fc_dim=512)
  elif preset == "imagenet":
    config_lib.pretext_imagenet(c, batch_size=64, total_epochs=100)
    c.model.pool5 = False
    c.evals.reconstruction.enabled = True
    # the STL-10 geometry at 224 / 80 = 2.8 x: classifier crop 176 (64 x 2.8 = 179 rounded to
    # a multiple of 8), LCI patch 128 with a 3 x 2.8 = 8 px border (112 erased), 5 inpainter
    # layers (128 -> 8).
    c.limited_context.update(crop_size=176, lci_crop=128, lci_patch=112, inpainter_layers=5)
  else:
    raise ValueError(f"unknown preset {preset!r}: use '', 'cifar10' or 'imagenet'")
  c.optim.lr_batch_divisor = c.input.batch_size
  return c
