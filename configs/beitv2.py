r"""BEiT v2: Masked Image Modeling with Vector-Quantized Visual Tokenizers (Peng et al., 2022).

BEiT-style pretraining (method "beit", mim_jax/methods/beit.py) on the codes of a VQ-KD
tokenizer, plus v2's cls-token pretraining head. Train the tokenizer first
(configs/vqkd.py) and name its workdir in config.beit.tokenizer. Presets
(`--config=configs/beitv2.py:<preset>`):

  (none)     The embedded 5,000-image CIFAR-10 subset (4,000 train / 1,000 held out), a narrow ViT at
             32 px, CPU-sized:
               python -m mim_jax.main --config=configs/vqkd.py --workdir=/tmp/vqkd
               python -m mim_jax.main --config=configs/beitv2.py --workdir=/tmp/beitv2 \
                 --config.beit.tokenizer=/tmp/vqkd
  cifar10    The CIFAR-10 image folder with 500 images per class held out:
               python -m mim_jax.main --config=configs/vqkd.py:cifar10 --workdir=/tmp/vqkd_c10 \
                 --config.input.data.dir=../shared/data/cifar10/train
               python -m mim_jax.main --config=configs/beitv2.py:cifar10 --workdir=/tmp/beitv2_c10 \
                 --config.input.data.dir=../shared/data/cifar10/train --config.beit.tokenizer=/tmp/vqkd_c10
  imagenet   The official ViT-B/16 1600-epoch recipe (beit2/PRETRAINING.md, base size) on tfds
             imagenet2012, with a VQ-KD tokenizer whose token grid is 14x14.

Official settings (microsoft/unilm beit2/PRETRAINING.md and run_beitv2_pretraining.py): model
beit_base_patch16_224_8k_vocab_cls_pt with shared_lm_head True, early_layers 9, head_layers 2;
num_mask_patches 75 exactly (beit2/masking_generator.py fills the blocks up with random single
patches), min 16 per block, max None; the tokenizer's input 224 px bicubic from the
same crop (second_input_size 224); min_crop_scale 0.2; ColorJitter(0.4, 0.4, 0.4) and flip;
batch 2048 (16 x 128), lr 1.5e-3 (no batch scaling), 10 warm-up epochs from 0, cosine to
min_lr 1e-5, 1600 epochs, grad clip 3.0, drop path 0.1, layer scale 0.1, AdamW betas
(0.9, 0.999), eps 1e-8, weight decay 0.05, ImageNet mean/std. (PRETRAINING.md: for the
300-epoch schedule use --config.optim.b2=0.98 --config.model.drop_path=0.0
--config.total_epochs=300.) Loss: CE of lm_head on the masked patches + CE of the cls head's
patch outputs through the shared norm and lm_head.
Published (beit2/README.md, ImageNet-1k, 1600 epochs, VQ-KD from CLIP ViT-B/16): ViT-B/16 85.5
top-1 fine-tuned.

Deviations: those of configs/beit.py (a mim_jax tokenizer instead of the released VQ-KD, which
was distilled from a CLIP teacher; bilinear crops; JAX's random numbers for the masks), and on
the CPU presets small ViTs with early_layers scaled to the depth (4 of 6, 3 of 4 blocks; the
official 9 of 12), the 8x8-grid mask budget of configs/beit.py and short schedules.
"""
import importlib.util
import pathlib

# The presets get_config takes ('' = the default, embedded data), for tests and tools.
PRESETS = ('', 'cifar10', 'imagenet')


def _beit():
  path = pathlib.Path(__file__).resolve().parent / "beit.py"
  spec = importlib.util.spec_from_file_location("configs_beit", path)
  mod = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(mod)
  return mod


def get_config(arg=None):
  preset = arg or "default"
  c = _beit().beit_config(preset)
  c.name = "BEiT v2"
  c.beit.update(cls_pretraining=True, early_layers=9, head_layers=2, shared_lm_head=True,
                exact_mask_count=True)
  c.input.aug.crop_scale = (0.2, 1.0)
  if preset == "default":
    c.beit.early_layers = 4                 # of 6 blocks
  elif preset == "cifar10":
    c.beit.early_layers = 3                 # of 4 blocks
  elif preset == "imagenet":
    c.total_epochs = 1600
    c.pooling = "cls"                       # v2's cls token is trained by the cls head
    for name in ("knn", "linear", "few_shot", "layer_probe"):
      c.evals[name].pooling = "cls"
  return c
