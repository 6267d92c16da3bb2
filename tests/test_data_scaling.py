"""The data-scaling study: nested training subsets, the held-out-loss evaluator and
tools/data_scaling.py (aggregation, figures, resumable sweep)."""
from __future__ import annotations

import ast
import hashlib
import importlib.util
import json
import math
import os
import shutil

import ml_collections
import numpy as np
import pytest

from helpers import ROOT, tiny_config
from mim_jax import evaluators
from mim_jax.data import pipeline, sources
from mim_jax.evaluators import heldout_loss

PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"


def _load_tool():
  spec = importlib.util.spec_from_file_location("data_scaling", ROOT / "tools" / "data_scaling.py")
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)
  return module


ds = _load_tool()


def _hashes(images):
  return {hashlib.sha1(np.ascontiguousarray(im).tobytes()).hexdigest() for im in images}


def _input_cfg(batch_size=128, **data):
  return ml_collections.ConfigDict(dict(
      data={**dict(name="embedded", dir="", holdout_per_class=100, holdout_seed=0,
                   in_memory=True, cache_dir=""), **data},
      batch_size=batch_size, image_size=32, workers=0,
      aug=dict(crop_scale=(0.2, 1.0), crop_ratio=(3 / 4, 4 / 3), hflip=True)))


def _assert_png(path, min_side=100):
  from matplotlib import image
  with open(path, "rb") as f:
    assert f.read(8) == PNG_SIGNATURE
  pixels = image.imread(path)
  assert pixels.ndim == 3 and min(pixels.shape[:2]) >= min_side
  assert pixels[..., :3].std() > 0.01   # not a blank canvas


# ----------------------------------------------------------------------------------------------
# Nested subsets.


def test_subset_size_rule():
  assert sources.subset_size(45000, 0) == 45000
  assert sources.subset_size(45000, 0.1) == 4500
  assert sources.subset_size(45, 0.1) == 5        # 4.5 rounds half up
  assert sources.subset_size(44, 0.1) == 4        # 4.4
  assert sources.subset_size(10, 1) == 10         # 1 and 1.0 are "all", not one image
  assert sources.subset_size(10, 1.0) == 10
  assert sources.subset_size(10, 3) == 3 and sources.subset_size(10, 3.0) == 3
  for bad, fix in ((11, "exceeds the 10"), (2.5, "whole number"), (-0.5, "fraction"),
                   (0.01, "keeps no image"), (math.nan, "fraction")):
    with pytest.raises(sources.DataConfigError, match=fix) as info:
      sources.subset_size(10, bad)
    assert "\n" not in str(info.value)


def test_nested_subsets_are_nested_exact_and_disjoint_from_the_holdout():
  labels = np.repeat(np.arange(4, dtype=np.int32), [50, 47, 52, 51])   # 200 records
  train = sources.split_indices(labels, "train", 5, 3)
  held = set(sources.split_indices(labels, "eval", 5, 3))
  assert train.size == 180 and len(held) == 20
  subsets = {f: sources.split_indices(labels, "pretrain", 5, 3, train_subset=f, subset_seed=7)
             for f in (0.1, 0.2, 0.5, 1.0)}
  assert {f: s.size for f, s in subsets.items()} == {0.1: 18, 0.2: 36, 0.5: 90, 1.0: 180}
  assert set(subsets[0.1]) < set(subsets[0.2]) < set(subsets[0.5]) < set(subsets[1.0])
  assert set(subsets[1.0]) == set(train)
  assert all(not set(s) & held for s in subsets.values())
  # The rule: the first k of one Generator(PCG64(subset_seed)) permutation of the 'train' split.
  perm = np.random.Generator(np.random.PCG64(7)).permutation(180)
  np.testing.assert_array_equal(subsets[0.2], np.sort(train[perm[:36]]))
  count = sources.split_indices(labels, "pretrain", 5, 3, train_subset=25, subset_seed=7)
  np.testing.assert_array_equal(count, np.sort(train[perm[:25]]))
  assert set(subsets[0.1]) < set(count) < set(subsets[0.2])     # counts nest with fractions
  other = sources.split_indices(labels, "pretrain", 5, 3, train_subset=0.1, subset_seed=8)
  assert set(other) != set(subsets[0.1])
  np.testing.assert_array_equal(sources.split_indices(labels, "pretrain", 5, 3), train)


def test_in_memory_subset_loader_steps_and_eval_batches():
  full = sources.load_in_memory(_input_cfg().data, "train")
  held = _hashes(sources.load_in_memory(_input_cfg().data, "eval").images)
  assert len(full) == 4000
  # Configs without the key train on everything.
  assert pipeline.steps_per_epoch(_input_cfg()) == 4000 // 128
  assert len(sources.load_in_memory(_input_cfg().data, "pretrain")) == 4000
  cfg = _input_cfg(train_subset=0.25, subset_seed=0)
  sub = sources.load_in_memory(cfg.data, "pretrain")
  assert len(sub) == 1000 and sources.split_size(cfg.data, "pretrain") == 1000
  sub_h = _hashes(sub.images)
  assert sub_h < _hashes(full.images) and not sub_h & held
  assert sub_h < _hashes(sources.load_in_memory(_input_cfg(train_subset=0.5).data,
                                                "pretrain").images)
  assert pipeline.steps_per_epoch(cfg) == 1000 // 128
  loader = pipeline.make_train_loader(cfg, seed=0, process_index=0, process_count=1)
  assert loader.num_records == 1000 and loader.steps_per_epoch == 7
  seen = set()
  for _ in range(8):   # more than an epoch: only subset images ever come
    seen |= _hashes(next(loader)["image"])
  assert seen == sub_h
  # Evaluators: 'pretrain' is the subset, 'train' stays the whole training split.
  got = np.concatenate([x for x, _ in pipeline.eval_batches(cfg, "pretrain", 300)])
  assert _hashes(got) == sub_h and len(got) == 1000
  assert pipeline.num_examples(cfg, "train") == 4000


def test_streaming_subset_source_and_steps(shared_cifar_dir, tmp_path):
  root = tmp_path / "images"
  for name in ("airplane", "cat", "ship"):
    (root / name).mkdir(parents=True)
    for i in range(20):
      shutil.copy(shared_cifar_dir / name / f"{i:04d}.jpg", root / name / f"{i:04d}.jpg")
  data = dict(name="image_folder", dir=str(root), holdout_per_class=5, in_memory=False)

  def files(split, **kw):
    src = sources.image_folder_source(dict(data, **kw), split)
    return {src.path(i) for i in range(len(src))}

  train, held = files("train"), files("eval")
  half, fifth = files("pretrain", train_subset=0.5), files("pretrain", train_subset=0.2)
  assert len(train) == 45 and len(half) == 23 and len(fifth) == 9
  assert fifth < half < train and not half & held
  assert files("pretrain") == train
  cfg = _input_cfg(batch_size=8, **data)
  cfg.data.train_subset = 0.5
  assert pipeline.steps_per_epoch(cfg) == 23 // 8
  loader = pipeline.make_train_loader(cfg, seed=0, process_index=0, process_count=1)
  assert loader.num_records == 23 and loader.steps_per_epoch == 2
  assert sources.split_size(cfg.data, "pretrain") == 23


def test_tfds_pretrain_split_is_a_seeded_prefix_of_the_train_split(monkeypatch):
  class Records:
    class_names = ["a", "b"]

    def __len__(self):
      return 100

    def __getitem__(self, i):
      return {"image_bytes": b"", "label": int(i)}

  monkeypatch.setattr(sources, "tfds_source", lambda *a, **k: Records())
  data = dict(name="tfds", tfds_name="fake", train_subset=0.1, subset_seed=4)
  sub = sources.streaming_source(data, "pretrain")
  expect = np.sort(np.random.Generator(np.random.PCG64(4)).permutation(100)[:10])
  assert [sub[i]["label"] for i in range(len(sub))] == list(expect)
  assert sub.class_names == ["a", "b"] and "train_subset=0.1" in repr(sub)
  assert len(sources.streaming_source(data, "train")) == 100
  assert isinstance(sources.streaming_source(dict(data, train_subset=0), "pretrain"), Records)


# ----------------------------------------------------------------------------------------------
# The held-out-loss evaluator.


class _FakeData:
  """Constant images whose value is their id; loss = image value + seed."""

  def __init__(self):
    self.values = {"eval": [0, 1, 2, 3, 4, 5], "pretrain": [10, 20, 30, 40],
                   "train": [100, 200, 300, 400, 500]}
    self.calls = []

  def batches(self, split, batch_size, limit=None):
    values = self.values[split][:limit]
    for i in range(0, len(values), batch_size):
      v = np.asarray(values[i:i + batch_size], np.uint8)
      yield np.broadcast_to(v[:, None, None, None], (len(v), 2, 2, 3)).copy(), np.zeros(len(v))

  def loss(self, images, seed):
    self.calls.append((len(images), seed))
    return images.astype(np.float64).mean(axis=(1, 2, 3)) + seed


def test_heldout_loss_equals_hand_values():
  data = _FakeData()
  ctx = evaluators.EvalContext(encode=None, batches=data.batches, num_classes=2, loss=data.loss)
  cfg = dict(type="heldout_loss", num_images=4, max_train=0, seeds=(0, 2), batch_size=3)
  out = evaluators.build("heldout_loss", cfg).run(ctx)
  # held out: images 0..3 -> mean 1.5, +0 and +2 -> 2.5; trained on ('pretrain', not 'train'):
  # 10..40 -> 25, +0 and +2 -> 26.
  assert out["heldout_loss"] == pytest.approx(2.5) and out["train_loss"] == pytest.approx(26.0)
  assert out["gap"] == pytest.approx(-23.5)
  assert out["per_seed"] == {"heldout_loss": [1.5, 3.5], "train_loss": [25.0, 27.0]}
  p = out["protocol"]
  assert (p["num_heldout"], p["num_train"], p["seeds"]) == (4, 4, [0, 2])
  assert p["train_split"].startswith("pretrain") and p["heldout_split"] == "eval"
  # Batches of 3: 3 + 1 held-out, 3 + 1 training images, each for both seeds.
  assert sorted(data.calls) == sorted([(3, 0), (3, 2), (1, 0), (1, 2)] * 2)


def test_heldout_loss_without_a_method_loss_is_a_one_line_error():
  data = _FakeData()
  ctx = evaluators.EvalContext(encode=None, batches=data.batches, num_classes=2, loss=None)
  with pytest.raises(ValueError, match="enabled=False") as info:
    heldout_loss.HeldoutLossEvaluator("heldout_loss", {}).run(ctx)
  assert "\n" not in str(info.value)


# ----------------------------------------------------------------------------------------------
# tools/data_scaling.py.


def _fake_run(root, name, subset, *, finished=True, steps=30):
  """A run folder as mim_jax.main writes it: resumed once (the second header at step 10)."""
  workdir = os.path.join(root, name)
  os.makedirs(workdir)
  config = {"method": "mae", "total_steps": steps, "total_epochs": 1.0,
            "input": {"batch_size": 128, "image_size": 32,
                      "data": {"name": "embedded", "holdout_per_class": 100, "holdout_seed": 0,
                               "train_subset": subset, "subset_seed": 0}},
            "model": {"variant": "tiny", "depth": 2, "patch_size": 4},
            "optim": {"name": "adamw", "base_lr": 1e-3, "lr_batch_divisor": 256}}
  spe = sources.subset_size(4000, subset) // 128
  gap = 0.3 if subset < 1 else 0.05

  def ev(step):
    return {"heldout_loss/heldout_loss": 1.0 + gap - step / 100, "heldout_loss/train_loss":
            1.0 - step / 100, "heldout_loss/gap": gap, "knn/online/top1": 20.0 + step - 10 * gap}

  records = [{"step": 0, "steps_per_epoch": spe, "total_steps": steps},
             {"step": 10, "loss": 1.5}, {"step": 10, "eval": ev(10)}, {"step": 20, "loss": 9.9},
             {"step": 10, "steps_per_epoch": spe, "total_steps": steps},   # resumed at 10
             {"step": 20, "loss": 1.2}, {"step": 20, "eval": ev(20)}]
  if finished:
    records += [{"step": 30, "loss": 1.0}, {"step": 30, "summary": ev(30)}]
  with open(os.path.join(workdir, "config.json"), "w") as f:
    json.dump(config, f)
  with open(os.path.join(workdir, "metrics.jsonl"), "w") as f:
    f.write("".join(json.dumps(r) + "\n" for r in records) + '{"step": 3')   # cut-off line
  last = 30 if finished else 20
  results = {"knn": {"online/top1": ev(last)["knn/online/top1"], "step": last, "protocol": {
      "type": "knn", "k": 20, "temperature": 0.07, "bank_size": 4000, "num_queries": 1000,
      "pooling": "mean"}}}
  with open(os.path.join(workdir, "eval_results.json"), "w") as f:
    json.dump(results, f)
  return workdir


def test_aggregation_and_curves_on_fake_runs(tmp_path):
  big = _fake_run(tmp_path, "mae_subset1", 1.0)
  small = _fake_run(tmp_path, "mae_subset0.25", 0.25)
  half = _fake_run(tmp_path, "mae_subset0.5", 0.5, finished=False)
  summary = ds.write_outputs(str(tmp_path), [big, half, small], recon=False)
  with open(tmp_path / ds.JSON_NAME) as f:
    saved = json.load(f)
  assert saved == json.loads(json.dumps(summary))
  runs = saved["runs"]
  assert [r["name"] for r in runs] == ["mae_subset0.25", "mae_subset0.5", "mae_subset1"]
  assert [r["train_images"] for r in runs] == [1000, 2000, 4000]
  assert [r["train_fraction"] for r in runs] == [0.25, 0.5, 1.0]
  assert [r["steps_per_epoch"] for r in runs] == [7, 15, 31]
  assert [r["finished"] for r in runs] == [True, False, True]
  assert runs[0]["epochs"] == pytest.approx(30 / 7)
  # The resumed run's re-logged step 20 replaces the stale one; the cut-off line is ignored.
  assert runs[0]["train_log"] == {"step": [10, 20, 30], "loss": [1.5, 1.2, 1.0]}
  assert runs[0]["evals"]["step"] == [10, 20, 30]
  assert runs[0]["evals"]["heldout_loss"] == pytest.approx([1.2, 1.1, 1.0])
  assert runs[0]["evals"]["linear_accuracy"] == [None, None, None]
  assert runs[0]["final"]["gap"] == pytest.approx(0.3)
  assert runs[2]["final"]["accuracy"] == pytest.approx(49.5)
  _assert_png(tmp_path / ds.PNG_NAME)
  table = (tmp_path / ds.TABLE_NAME).read_text()
  assert table.count("| mae_subset") == 3 and "25% of the training images" in table


def test_sweep_command_skips_finished_runs_and_checks_the_config(tmp_path, monkeypatch):
  root = tmp_path / "sweep"
  _fake_run(root, "mae_subset1", 1.0)   # finished: skipped
  launched = {}

  def fake_launch(commands, parallel):
    launched.update(commands)
    for workdir, cmd in commands.items():   # "train" it: a finished fake run
      subset = float(next(c for c in cmd if "train_subset=" in c).split("=")[1])
      _fake_run(root, os.path.basename(workdir), subset)
    return {w: 0 for w in commands}

  config = ds.load_config("mae", "")
  with pytest.raises(ds.SweepError, match="config_lib.py") as info:   # a config without keys
    missing = ml_collections.ConfigDict(config.to_dict())
    if "train_subset" in missing.input.data:
      del missing.input.data["train_subset"]
    ds.check_config(missing, "mae", "", False)
  assert "\n" not in str(info.value)
  monkeypatch.setattr(ds, "launch", fake_launch)
  argv = ["--method", "mae", "--preset", "", "--fractions", "0.25,1", "--steps", "30",
          "--eval_every", "10", "--workdir_root", str(root), "--no_reconstructions",
          "--extra", "--config.seed=3"]
  assert ds.main(argv) == 0
  (workdir, cmd), = launched.items()
  assert os.path.basename(workdir) == "mae_subset0.25"
  assert cmd[1:3] == ["-m", "mim_jax.main"]
  # The fraction goes as its image count (the same nested subset; an int or a float config
  # field takes it): 0.25 of the 4000 embedded training images.
  for flag in ("--config.input.data.train_subset=1000", "--config.total_steps=30",
               "--config.eval_every=10", "--config.ckpt_every=10",
               "--config.evals.heldout_loss.enabled=True", "--config.evals.linear.enabled=False",
               "--config.seed=3"):
    assert flag in cmd
  # The warm-up keeps its length in steps: 2 epochs of the whole split = 2 x (4000 // 128) = 62
  # steps = 62 / 7 epochs of the 1000-image subset (7 steps per epoch).
  warmup = float(cmd[-1].split("=")[1])
  assert cmd[-1].startswith("--config.optim.warmup_epochs=") and round(warmup * 7) == 62
  assert [r["name"] for r in json.loads((root / ds.JSON_NAME).read_text())["runs"]] == \
      ["mae_subset0.25", "mae_subset1"]
  # Nothing left to do the second time; a workdir of other settings is an error.
  launched.clear()
  assert ds.main(argv) == 0 and launched == {}
  assert ds.main([*argv[:7], "60", *argv[8:]]) == 2


def test_schedule_flags_keep_warmup_and_milestones_in_steps():
  config = ds.load_config("simmim", "")   # embedded data: 4000 training images, batch 128
  config.optim.update(schedule="multistep", warmup_epochs=1.0, milestones_epochs=(3.0, 5.0))
  flags = ds.schedule_flags(config, 0.5)   # 2000 images: 15 steps per epoch instead of 31
  assert [f.split("=")[0] for f in flags] == ["--config.optim.warmup_epochs",
                                               "--config.optim.milestones_epochs"]
  assert float(flags[0].split("=")[1]) == pytest.approx(31 / 15)
  assert ast.literal_eval(flags[1].split("=")[1]) == pytest.approx((3 * 31 / 15, 5 * 31 / 15))
  # Runs get the subset as a count (the same nested subset), the whole split as 0 (all).
  assert [ds.subset_value(config, f) for f in (0.25, 0.5, 1.0, 3000)] == [1000, 2000, 0, 3000]
  ds.apply_overrides(config, ["--config.input.batch_size=4000"])
  with pytest.raises(ds.SweepError, match="keeps 2000 images, fewer than one batch of 4000"):
    ds.schedule_flags(config, 0.5)
  with pytest.raises(ds.SweepError, match="no key 'optim.warmup'"):
    ds.apply_overrides(config, ["--config.optim.warmup=3"])


def test_tiny_run_with_subset_heldout_loss_and_reconstruction_figure(tmp_path):
  """The one real run: 2 steps on a quarter of the embedded training split, the held-out loss
  evaluated by the trainer, then the sweep's outputs including the reconstruction figure."""
  import jax
  from mim_jax import train
  one_device = jax.devices()[:1]   # compiles faster than the 8 fake devices
  workdir = str(tmp_path / "mae_subset0.25")
  c = tiny_config("mae", total_steps=2)
  c.input.data.train_subset = 1000   # a count: a quarter of the 4000 training images
  c.evals = dict(heldout_loss=dict(type="heldout_loss", num_images=32, max_train=24, seeds=(0,),
                                   batch_size=16))
  train.train_and_evaluate(c, workdir, progress=False, devices=one_device)
  with open(os.path.join(workdir, "eval_results.json")) as f:
    result = json.load(f)["heldout_loss"]
  assert result["protocol"]["num_heldout"] == 32 and result["protocol"]["num_train"] == 24
  assert math.isfinite(result["heldout_loss"]) and result["heldout_loss"] > 0
  assert result["gap"] == pytest.approx(result["heldout_loss"] - result["train_loss"])
  summary = ds.write_outputs(str(tmp_path), [workdir], recon_images=2, devices=one_device)
  run, = summary["runs"]
  assert run["steps_per_epoch"] == 1000 // 16 and run["train_images"] == 1000
  assert run["evals"]["step"] == [2] and run["finished"]
  assert run["final"]["heldout_loss"] == pytest.approx(result["heldout_loss"])
  _assert_png(summary["figure"])
  _assert_png(summary["reconstructions"])
