"""TensorBoard logging (mim_jax/metric_writers.py) and profiling of a run on the embedded data:
the event files hold the same numbers as metrics.jsonl, the evaluations, the reconstruction
grid and parameter histograms; MFU follows its definition; profile_steps writes a trace."""
import glob
import json
import os
import struct

import jax
import numpy as np
import pytest

from helpers import tiny_config
from mim_jax import metric_writers, train


def read_events(workdir):
  """[(tag, step, kind, value)] from every event file under <workdir>/tensorboard, read with
  the TFRecord framing (u64 length, u32 crc, payload, u32 crc) and tensorboardX's protobufs."""
  from tensorboardX.proto import event_pb2
  out = []
  for path in sorted(glob.glob(os.path.join(workdir, metric_writers.TB_DIR, "events.out.tfevents.*"))):
    with open(path, "rb") as f:
      data = f.read()
    pos = 0
    while pos < len(data):
      (n,) = struct.unpack("<Q", data[pos:pos + 8])
      event = event_pb2.Event.FromString(data[pos + 12:pos + 12 + n])
      pos += 12 + n + 4
      for v in event.summary.value:
        kind = v.WhichOneof("value")
        value = {"simple_value": lambda: v.simple_value, "image": lambda: v.image,
                 "histo": lambda: v.histo}[kind]()
        out.append((v.tag, event.step, kind, value))
  return out


@pytest.fixture(scope="module")
def run(tmp_path_factory, compilation_cache):
  wd = str(tmp_path_factory.mktemp("tb"))
  c = tiny_config("mae", total_steps=4, log_every=2, ckpt_every=2)
  c.evals = {"reconstruction": c.evals.reconstruction}
  c.tensorboard.peak_tflops = 1e-3        # 1 GFLOP/s per device: MFU is logged on the CPU
  summary = train.train_and_evaluate(c, wd, progress=False, devices=jax.devices()[:1])
  return c, wd, summary


def test_scalars_equal_the_jsonl_records_and_mfu_follows_its_definition(run):
  c, wd, _ = run
  recs = [json.loads(l) for l in open(os.path.join(wd, "metrics.jsonl"))]
  logged = {r["step"]: r for r in recs if "loss" in r}
  assert sorted(logged) == [2, 4]
  events = read_events(wd)
  scalars = {(t, s): v for t, s, k, v in events if k == "simple_value"}
  for step, r in logged.items():
    for key in ("loss", "lr", "grad_norm", "images_per_sec", "epoch", "mfu"):
      assert scalars[(f"train/{key}", step)] == pytest.approx(r[key], rel=1e-6), (key, step)
  # MFU = FLOPs per step x steps per second / (devices x peak), the FLOPs from XLA's count of
  # the step: here recomputed from a fresh trainer of the same config.
  tr = train.Trainer.create(c, devices=jax.devices()[:1])
  assert tr.flops_per_step() is None        # nothing to count before the first batch
  tr.step()
  flops = tr.flops_per_step()
  # A 2-block 64-wide ViT on 16 images of 8x8 patches: the count is in the expected range of
  # the matmuls alone (6 x params x tokens for forward + backward) and below 10x that.
  n_params = sum(x.size for x in jax.tree.leaves(tr.state["params"]))
  assert 6 * n_params * 16 * 64 * 0.1 < flops < 6 * n_params * 16 * 65 * 10, (flops, n_params)
  r = logged[4]
  want = flops * (r["images_per_sec"] / c.input.batch_size) / 1e9
  assert r["mfu"] == pytest.approx(want, rel=1e-6)


def test_evaluations_reconstruction_grid_and_histograms_are_logged(run):
  c, wd, summary = run
  events = read_events(wd)
  images = [(s, v) for t, s, k, v in events if k == "image" and t == "eval/reconstruction"]
  assert [s for s, _ in images] == [4]
  from PIL import Image
  import io
  got = np.asarray(Image.open(io.BytesIO(images[0][1].encoded_image_string)).convert("RGB"))
  want = np.asarray(Image.open(os.path.join(wd, "reconstruction_4.png")).convert("RGB"))
  np.testing.assert_array_equal(got, want)
  hists = {(t, s): v for t, s, k, v in events if k == "histo"}
  from mim_jax import teachers
  params = teachers.load(wd).params
  leaves = jax.tree_util.tree_flatten_with_path(params)[0]
  assert len(leaves) > 10
  for step in (2, 4):
    for path, leaf in leaves:
      name = "params/" + "/".join(str(p.key) for p in path)
      h = hists[(name, step)]
      assert h.num == leaf.size, name
  # The checkpointed parameters' histogram at the last step has their exact sum and extremes.
  name, leaf = next((("params/" + "/".join(str(p.key) for p in path), leaf) for path, leaf in
                     jax.tree_util.tree_flatten_with_path(params)[0] if leaf.size > 100))
  h = hists[(name, 4)]
  assert h.sum == pytest.approx(float(np.sum(leaf, dtype=np.float64)), rel=1e-4, abs=1e-4)
  assert (h.min, h.max) == pytest.approx((float(leaf.min()), float(leaf.max())), rel=1e-6)
  # No evaluator number is lost: every eval number of the final evaluation is a scalar too.
  scalars = {t for t, s, k, v in events if k == "simple_value" and s == 4}
  assert "eval/reconstruction/protocol/num_images" in scalars


def test_tensorboard_off_writes_no_event_files_and_profile_steps_writes_a_trace(run, tmp_path):
  c = tiny_config("mae", total_steps=4, log_every=1, ckpt_every=100)   # the step `run` compiled
  c.evals = {}
  c.tensorboard.enabled = False
  c.profile_steps = (1, 2)
  train.train_and_evaluate(c, str(tmp_path), progress=False, devices=jax.devices()[:1])
  assert not os.path.exists(tmp_path / metric_writers.TB_DIR)
  traces = glob.glob(str(tmp_path / "profile" / "**" / "*.xplane.pb"), recursive=True)
  assert traces, os.listdir(tmp_path)
  c.profile_steps = (2, 2)
  with pytest.raises(train.TrainingError, match="profile_steps"):
    train.train_and_evaluate(c, str(tmp_path / "bad"), progress=False, devices=jax.devices()[:1])


def test_peak_flops_table_and_override():
  class Dev:
    device_kind = "NVIDIA H100 80GB HBM3"
  assert metric_writers.device_peak_flops(Dev()) == 989e12
  assert metric_writers.device_peak_flops(Dev(), override_tflops=500) == 500e12
  assert metric_writers.device_peak_flops(jax.devices("cpu")[0]) is None
  assert metric_writers.mfu(2e12, 3.0, 2, 1e13) == pytest.approx(0.3)
