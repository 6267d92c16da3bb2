"""benchmarks/speed.py on the CPU with a ViT-T MAE: the step-only worker and the end-to-end
worker (the same step fed by the real streaming loader) report consistent rows, and the
tables show them."""
import argparse
import importlib.util
import json
import math
import pathlib

import pytest

ROOT = pathlib.Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def speed():
  spec = importlib.util.spec_from_file_location("speed", ROOT / "benchmarks" / "speed.py")
  mod = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(mod)
  return mod


def _results(out: str) -> list[dict]:
  return [json.loads(line[len("RESULT "):]) for line in out.splitlines()
          if line.startswith("RESULT ")]


CASE = {"model": "mae_t", "batch": 4, "image_size": 32, "attn": "xla", "dtype": "float32",
        "depth": 2, "dec_depth": 1}


def test_end_to_end_worker_feeds_the_step_real_jpegs(speed, tmp_path, shared_cifar_dir, capsys):
  root = tmp_path / "jpegs"
  for name in ("airplane", "cat"):
    (root / name).mkdir(parents=True)
    for i in range(6):
      (root / name / f"{i:04d}.jpg").write_bytes((shared_cifar_dir / name / f"{i:04d}.jpg").read_bytes())
  for canvas in (0, 48):
    case = {**CASE, "data": str(root), "workers": 0, "device_resize": canvas}
    speed.worker_e2e(argparse.Namespace(case=json.dumps(case), steps=3, repeats=1))
  row, packed = _results(capsys.readouterr().out)
  assert packed["device_resize"] == 48 and packed["e2e_img_s"] > 0
  assert packed["loss"] == pytest.approx(row["loss"], rel=1e-2)   # the same crops, resized on the device
  assert row["kind"] == "e2e" and row["batch"] == 4 and row["workers"] == 0
  for key in ("step_img_s", "loader_img_s", "e2e_img_s"):
    assert row[key] > 0, key
  assert row["input_bound"] == (row["e2e_img_s"] < 0.95 * row["step_img_s"])
  assert math.isfinite(row["loss"]) and row["loss"] > 0
  text = speed.e2e_table([row, {"kind": "jax"}, packed])
  assert text.count("\n") == 3 and "| ViT-T/16 | 4 | 0 | 0 |" in text and "| ViT-T/16 | 4 | 0 | 48 |" in text
  assert text.rstrip().endswith(("| yes |", "| no |"))


def test_step_worker_row(speed, capsys):
  speed.worker_jax(argparse.Namespace(case=json.dumps(CASE), steps=2, repeats=2, profile="",
                                      dump=""))
  (row,) = _results(capsys.readouterr().out)
  assert row["kind"] == "jax" and row["case"] == CASE
  assert row["img_s"] == pytest.approx(4 / row["step_s"])
  assert row["loss"] > 0 and "temp_gib" in row
  # MAE ViT-T/16 at 32 px: 4 patches, 1 kept; the table's MFU needs a peak, absent here.
  assert speed.train_flops("mae_t", image_size=32) > 0
  assert "| mim_jax | mae | ViT-T/16 | 4 |" in speed.table([row], peak=0.0)
