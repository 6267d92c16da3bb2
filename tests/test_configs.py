"""Every preset loads, and the ImageNet presets carry the official settings."""
import jax
import jax.numpy as jnp
import pytest

from helpers import ROOT, load_config
from mim_jax import config_lib, methods, optim

CONFIG_DIR = str(ROOT / "configs")
# Every preset of every config in configs/ (each declares its PRESETS), read from the files.
ALL_PRESETS = [(name, p) for name in config_lib.config_names(CONFIG_DIR)
               for p in config_lib.presets(name, CONFIG_DIR)]


def test_every_config_and_preset_is_found():
  names = config_lib.config_names(CONFIG_DIR)
  assert {"mae", "simmim", "ibot", "tinymim", "finetune"} <= set(names) and len(names) >= 20
  assert all(p[0] == "" for p in [config_lib.presets(n, CONFIG_DIR) for n in names])
  assert len(ALL_PRESETS) >= 3 * len(names)


@pytest.mark.parametrize("config_name,preset", ALL_PRESETS)
def test_presets_build_their_method(config_name, preset):
  c = load_config(config_name, preset)
  m = methods.get(c)
  assert m.name == c.method
  assert c.input.batch_size % 8 == 0


@pytest.mark.parametrize("ft_preset,method,preset,changed", [
    ("swin_cifar10", "simmim", "swin_cifar10", {"drop_path"}),
    ("mvit_cifar10", "maskfeat", "mvit_cifar10", {"drop_path"}),
    ("maskfeat_clips", "maskfeat", "clips", {"drop_path"}),
    ("k400_mvitv2_s", "maskfeat", "k400_mvitv2_s", {"drop_path", "stage_strides"}),
])
def test_finetune_presets_build_the_model_their_pretraining_saved(ft_preset, method, preset,
                                                                    changed):
  """A fine-tuning preset's backbone is its pretraining preset's (so the workdir loads), but
  for the fine-tuning's own settings: drop path 0.1, and k400_mvitv2_s's restored stride."""
  ft = load_config("finetune", ft_preset).model.to_dict()
  pt = load_config(method, preset).model.to_dict()
  assert set(ft) == set(pt)
  assert {k for k in ft if ft[k] != pt[k]} == changed
  assert ft["drop_path"] == 0.1


def test_every_registered_method_has_a_config_and_a_title():
  from mim_jax import report
  used = {load_config(n).method for n in config_lib.config_names(CONFIG_DIR)}
  assert used == set(methods.REGISTRY)
  assert set(methods.TITLES) == set(methods.REGISTRY)
  assert report.METHOD_NAMES is methods.TITLES


def test_unknown_preset_is_an_error():
  with pytest.raises(ValueError, match="unknown preset"):
    load_config("mae", "imagenet22k")


def test_config_lib_load_is_what_main_reads_and_a_missing_config_names_the_others():
  from absl import flags
  from ml_collections import config_flags
  fv = flags.FlagValues()
  config_flags.DEFINE_config_file("config", None, flag_values=fv)
  fv(["prog", f"--config={ROOT / 'configs' / 'simmim.py'}:cifar10"])
  assert config_lib.load("simmim", "cifar10").to_json() == fv.config.to_json()
  with pytest.raises(FileNotFoundError, match=r"simmi\.py not found: name one of .*simmim"):
    config_lib.load("simmi")


def test_set_path_sets_existing_dotted_keys_only():
  c = load_config("mae")
  config_lib.set_path(c, "model.remat", True)
  config_lib.set_path(c, "seed", 3)
  assert c.model.remat is True and c.seed == 3
  for key in ("model.remmat", "modell.remat", "seed.x", "model.remat.x"):
    with pytest.raises(KeyError, match=key.replace(".", r"\.")):
      config_lib.set_path(c, key, 1)
  with pytest.raises(TypeError):
    config_lib.set_path(c, "model.remat_policy", 3)      # ConfigDict keeps a key's type
  assert c.model.remat_policy == "full"
  assert [config_lib.parse_value(t) for t in ("64", "1e-3", "True", "(0.2, 1.0)", "cudnn")] == \
      [64, 1e-3, True, (0.2, 1.0), "cudnn"]


def test_mae_imagenet_is_the_paper_recipe():
  c = load_config("mae", "imagenet")
  assert (c.input.image_size, c.model.patch_size, c.mae.mask_ratio, c.mae.norm_pix_loss) == (224, 16, 0.75, True)
  assert dict(c.mae.decoder) == {"width": 512, "depth": 8, "heads": 16}
  assert (c.optim.b1, c.optim.b2, c.optim.weight_decay, c.optim.warmup_epochs) == (0.9, 0.95, 0.05, 40)
  assert optim.peak_lr(c.optim, c.input.batch_size) == pytest.approx(1.5e-4 * 4096 / 256)
  assert tuple(c.input.aug.crop_scale) == (0.2, 1.0) and c.input.data.tfds_name == "imagenet2012"


def test_mae_large_has_the_official_encoder_size():
  c = load_config("mae", "imagenet_large")
  m = methods.get(c)
  p = jax.eval_shape(m.init, jax.random.PRNGKey(0), jnp.zeros((1, 224, 224, 3)))
  n = sum(x.size for x in jax.tree.leaves(p["encoder"]))
  # patch embed 768*1024+1024, cls 1024, 24 blocks of 12,596,224, final norm 2048; the
  # sin-cos pos_embed is fixed (MAE: requires_grad=False), so not a parameter.
  assert n == 787_456 + 1_024 + 24 * 12_596_224 + 2_048 == 303_099_904


def test_simmim_imagenet_is_the_official_vit_recipe():
  c = load_config("simmim", "imagenet")
  assert (c.simmim.mask_patch_size, c.simmim.mask_ratio) == (32, 0.6)
  assert (c.model.qkv_bias, c.model.init_values, c.model.rel_pos_bias, c.model.pos_embed) == ("qv", 0.1, "shared", "none")
  assert (c.model.drop_path, c.optim.clip_grad, c.optim.b2) == (0.1, 5.0, 0.999)
  assert tuple(c.input.aug.crop_scale) == (0.67, 1.0)
  s = optim.make_schedule(c.optim, 2048, 100, 80_000)
  assert float(s(1000)) == pytest.approx(1e-4 * 4, rel=1e-5)     # after 10 warm-up epochs
  assert float(s(70_000)) == pytest.approx(1e-5 * 4, rel=1e-5)   # x0.1 from epoch 700


def test_warm_up_starts_where_the_official_scripts_start():
  """The official cosine_scheduler calls of VQ-KD (run_vqkd_training.py), EVA
  (run_eva_pretraining.py) and BEiT (which MVP follows) pass no start value: the warm-up starts
  at 0. MaskFeat's yaml starts at WARMUP_START_LR 1e-6, SimMIM's at WARMUP_LR 5e-7."""
  for name in ("vqkd", "eva", "mvp", "beit", "beitv2", "cae", "data2vec"):
    for preset in config_lib.presets(name, CONFIG_DIR):
      assert load_config(name, preset).optim.warmup_lr == 0.0, (name, preset)
  assert load_config("maskfeat", "imagenet").optim.warmup_lr == 1e-6
  assert load_config("simmim", "imagenet").optim.warmup_lr == 5e-7


def test_mvp_augments_as_beit():
  c = load_config("mvp", "imagenet")
  assert c.feature_mim.color_jitter == 0.4 and tuple(c.input.aug.crop_scale) == (0.08, 1.0)
