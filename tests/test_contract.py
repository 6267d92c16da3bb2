"""The method contract, over the whole registry: every registered method builds from its
config's default preset (shrunk to a 1-block ViT or a narrow ConvNet), initialises, takes two steps, resumes from
its step-1 checkpoint to the same step-2 loss, bit for bit, and names its model in
`describe()`. A new method added to `mim_jax.methods.REGISTRY` is tested here without a line
of test code; methods that read another run (a tokenizer, a teacher) get a real tiny teacher
run or the fake tokenizer of test_beit. The methods on other backbones than the ViT run the
same check from tests/test_contract_convnets.py.
"""
import functools
import os
import shutil

import jax
import pytest

from helpers import ROOT, load_config, losses, tiny_config
from mim_jax import config_lib, methods, teachers, train

CONFIG_DIR = str(ROOT / "configs")


@functools.lru_cache(maxsize=None)   # each call loads every config: once per method is enough
def config_for(method: str) -> str:
  """The config named like the method, else the first config that trains it."""
  names = config_lib.config_names(CONFIG_DIR)
  if method in names and config_lib.load(method, "", CONFIG_DIR).method == method:
    return method
  return next(n for n in names if config_lib.load(n, "", CONFIG_DIR).method == method)


@pytest.fixture(scope="module")
def teacher_run(tmp_path_factory):
  """A 1-step tiny MAE run: the teacher of teacher-feature MIM and TinyMIM."""
  d = str(tmp_path_factory.mktemp("contract_teacher"))
  c = tiny_config("mae", total_steps=1)
  c.model.depth = 1
  c.evals = {}
  train.train_and_evaluate(c, d, progress=False, devices=jax.devices()[:1])
  return d


def shrink(config_name: str, teacher: str):
  model_name = config_lib.load(config_name, "", CONFIG_DIR).model.get("name")
  if model_name in ("alexnet", "nin", "gpt"):   # the pretext tasks' ConvNets and iGPT's GPT
    c = load_config(config_name)
    if model_name == "gpt":
      c.model.update(depth=1, width=32, num_heads=2)
    else:
      c.model.width = 0.125
    if "colorization" in c:           # the rebalancing prior from 64 images, not the split
      c.colorization.prior_images = 64
    if "igpt" in c:                   # the palette from 64 images, in the test's own cache
      c.igpt.update(palette_images=64, palette_cache=os.path.join(teacher, "igpt_palettes"))
    c.input.batch_size = 8
    c.total_steps, c.ckpt_every, c.log_every, c.keep_ckpts = 2, 1, 1, 3
    c.evals = {}
    return c
  if model_name == "resnet":
    from je_helpers import tiny_je_config   # the joint-embedding methods' tiny ResNet
    c = tiny_je_config(config_name)
    c.input.batch_size = 8
    c.total_steps, c.ckpt_every, c.log_every, c.keep_ckpts = 2, 1, 1, 3
    c.evals = {}
    return c
  c = tiny_config(config_name)
  c.model.depth = 1
  c.input.batch_size = 8
  c.total_steps, c.ckpt_every, c.log_every, c.keep_ckpts = 2, 1, 1, 3
  c.evals = {}
  for section, key, value in (("beit", "tokenizer", "/fake"), ("cae", "tokenizer", "/fake"),
                              ("feature_mim", "teacher", teacher), ("tinymim", "teacher", teacher)):
    if section in c and key in c[section]:
      c[section][key] = value
  for section in ("cae", "pcae", "latent_mim", "deepmim", "videomae"):
    dec = c.get(section, {}).get("decoder") if section in c else None
    if dec is not None and "depth" in dec:
      dec.depth = 1
  if "finetune" in c:
    c.finetune.pretrained = ""
  if "deepmim" in c:                  # one extra decoder, on the first of the 2 blocks
    c.model.depth = 2
    c.deepmim.blocks, c.deepmim.loss_weights = (1,), (1.0, 1.0)
  return c


def methods_on_vit(vit: bool) -> list[str]:
  """The registered methods whose default preset trains a ViT (`vit`), or another backbone
  (ResNet, AlexNet, NIN, GPT: tests/test_contract_convnets.py). Two files, so that pytest-xdist
  (--dist loadfile) runs the two halves of the registry on two workers."""
  return sorted(m for m in methods.REGISTRY
                if (load_config(config_for(m)).model.get("name", "vit") == "vit") == vit)


@pytest.mark.parametrize("method", methods_on_vit(True))
def test_every_method_trains_resumes_and_names_its_model(method, teacher_run, tmp_path,
                                                         monkeypatch, compilation_cache):
  check_contract(method, teacher_run, tmp_path, monkeypatch)


def check_contract(method, teacher_run, tmp_path, monkeypatch):
  from test_beit import fake_run
  real_load = teachers.load
  fake = fake_run()
  monkeypatch.setattr(teachers, "load",
                      lambda path, *a, **k: fake if path == "/fake" else real_load(path, *a, **k))
  c = shrink(config_for(method), teacher_run)
  one = jax.devices()[:1]
  # Two steps with a checkpoint after each; then step 2's checkpoint goes, and the same
  # command resumes from step 1 and recomputes step 2.
  a = str(tmp_path / "run")
  train.train_and_evaluate(c, a, progress=False, devices=one)
  want, want_adv = losses(a), losses(a, "adversary/loss")
  assert sorted(want) == [1, 2] and all(v == v for v in want.values()), want
  if getattr(methods.get(c), "adversary_keys", ()):
    assert sorted(want_adv) == [1, 2], want_adv
  shutil.rmtree(os.path.join(a, "checkpoints", "2"))
  os.remove(os.path.join(a, "metrics.jsonl"))
  train.train_and_evaluate(c, a, progress=False, devices=one)
  got = losses(a)
  assert sorted(got) == [2] and got[2] == want[2], (method, got, want)
  # A discriminator stepped in the same step (context encoder, LCI) resumes exactly too.
  got_adv = losses(a, "adversary/loss")
  assert got_adv == {s: v for s, v in want_adv.items() if s == 2}, (method, got_adv, want_adv)
  d = methods.get(c).describe()
  assert d["method"] == method
  assert d["model"]["name"] == c.model.name == load_config(config_for(method)).model.name
