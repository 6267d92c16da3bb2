"""benchmarks/speed.py on the CPU with a ViT-T MAE: the step-only worker and the end-to-end
worker (the same step fed by the real streaming loader) report consistent rows, and the
tables show them."""
import argparse
import importlib.util
import json
import math
import os
import pathlib
import re

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


def test_profile_summary_names_each_kernels_ops(speed, tmp_path, capsys):
  """summarize_trace attributes trace kernels to the compiled step's HLO ops (fusion
  '%name.7' -> kernel 'name_7'), counts launches per step and merges block numbers."""
  import gzip
  dump = tmp_path / "step.hlo.txt"
  speed.worker_jax(argparse.Namespace(case=json.dumps(CASE), steps=1, repeats=1, profile="",
                                      dump=str(dump)))
  capsys.readouterr()
  ops = speed.hlo_kernel_ops(dump.read_text())
  fusions = {k: v for k, v in ops.items() if "fusion" in k}
  def first(pattern):
    return next(k for k, (path, _) in sorted(fusions.items()) if pattern in path)
  k0 = first("fwd ViT/encoder/block00/norm1/")
  k1 = next(k for k, (path, _) in sorted(fusions.items())
            if path == fusions[k0][0].replace("block00", "block01"))
  kopt = first("fwd optimizer/")
  assert "[" in fusions[kopt][1] and "{" not in fusions[kopt][1]   # the result shape, layout dropped
  # A trace of 5 steps: k0 launched twice a step, k1 and kopt once, one library kernel.
  events = [{"ph": "M", "name": "process_name", "pid": 7, "args": {"name": "/device:GPU:0"}},
            {"ph": "M", "name": "process_name", "pid": 1, "args": {"name": "/host:CPU"}}]
  for name, dur, per_step in ((k0, 30.0, 2), (k1, 20.0, 1), (kopt, 50.0, 1), ("nvjet_gemm", 150.0, 1)):
    events += [{"ph": "X", "pid": 7, "name": name, "dur": dur}] * (5 * per_step)
  # A library kernel carrying its HLO instruction (as GPU traces do for GEMMs): a dot's path.
  kdot = first("bwd MAEDecoder/blocks/block00/mlp/fc1/")
  raw = {re.sub(r"[.\-]", "_", n): n for n in re.findall(r"%([\w.\-]+)\s*=", dump.read_text())}
  events += [{"ph": "X", "pid": 7, "name": "nvjet_gemm2", "dur": 40.0, "args": {"hlo_op": raw[kdot]}}] * 5
  events.append({"ph": "X", "pid": 1, "name": k0, "dur": 1e6})      # host events are not counted
  (tmp_path / "prof").mkdir()
  with gzip.open(tmp_path / "prof" / "perfetto_trace.json.gz", "wt") as f:
    json.dump({"traceEvents": events}, f)
  speed.summarize_trace(str(tmp_path / "prof"), 10, str(tmp_path / "summary.json"), str(dump))
  out = capsys.readouterr().out
  assert "1.6 ms of device time" in out                             # 5 x (60 + 20 + 50 + 150 + 40) us
  line0 = next(line for line in out.splitlines() if f" {k0}  <- " in line)
  assert "0.06 ms/step      2x" in line0 and "fwd ViT/encoder/block00/norm1/" in line0
  summary = json.loads((tmp_path / "summary.json").read_text())
  merged = fusions[k0][0].replace("block00", "block*")
  assert summary["by_path"][merged] == pytest.approx(5 * 60.0 + 5 * 20.0)
  assert summary["launches"]["nvjet_gemm"] == 5 and not summary["name_paths"].get("nvjet_gemm")
  (path2,) = summary["name_paths"]["nvjet_gemm2"]
  assert path2.startswith("bwd MAEDecoder/blocks/block00/mlp/fc1/")
  assert summary["by_path"][fusions[kdot][0].replace("block00", "block*")] >= 5 * 40.0


def test_variants_set_config_keys_and_environment(speed, capsys, monkeypatch):
  v = speed.parse_variant("pad4: model.attn_pad=4; XLA_FLAGS=--xla_a=true --xla_b=1; model.remat=true")
  assert v == {"variant": "pad4", "overrides": {"model.attn_pad": "4", "model.remat": "true"},
               "env": {"XLA_FLAGS": "--xla_a=true --xla_b=1"}}
  c = speed.case_config({**CASE, **v})
  assert c.model.attn_pad == 4 and c.model.depth == 2 and c.model.remat is True
  speed.set_config_value(c, "model.remat", "False")
  assert c.model.remat is False
  for bad in ("no colon", "x: model.attn_pad", "x: lower=1"):
    with pytest.raises(SystemExit, match="--variant"):
      speed.parse_variant(bad)
  with pytest.raises(SystemExit, match="--variant model.remat=3: "):   # a key's type is kept
    speed.set_config_value(c, "model.remat", "3")
  with pytest.raises(SystemExit, match="unknown config key 'model.atn_pad'"):
    speed.case_config({**CASE, **speed.parse_variant("x: model.atn_pad=4")})
  # The variant's environment reaches the case's process.
  seen = {}
  def fake_run(cmd, env, **_):
    seen.update(env)
    return argparse.Namespace(returncode=0, stdout='RESULT {"kind": "jax"}\n', stderr="")
  monkeypatch.setattr(speed.subprocess, "run", fake_run)
  monkeypatch.setattr(speed, "_CACHE_DIR", [])
  monkeypatch.delenv("JAX_COMPILATION_CACHE_DIR", raising=False)
  speed.spawn("jax", {**CASE, **v}, argparse.Namespace(steps=1, repeats=1))
  assert seen["XLA_FLAGS"] == "--xla_a=true --xla_b=1"
  cache = seen["JAX_COMPILATION_CACHE_DIR"]                # one compile cache for the run's cases
  seen.clear()
  speed.spawn("jax", CASE, argparse.Namespace(steps=1, repeats=1))
  assert seen["JAX_COMPILATION_CACHE_DIR"] == cache and os.path.isdir(cache)
  os.rmdir(cache)
  assert seen.get("XLA_FLAGS") == os.environ.get("XLA_FLAGS")   # the variant's flags stay with it
  # A variant row times the same function: 5 tokens padded once to 8 give the same loss.
  capsys.readouterr()
  for case in (CASE, {**CASE, **v}):
    speed.worker_jax(argparse.Namespace(case=json.dumps(case), steps=1, repeats=1, profile="", dump=""))
  plain, padded = _results(capsys.readouterr().out)
  assert padded["variant"] == "pad4" and padded["loss"] == pytest.approx(plain["loss"], rel=1e-5)
  assert (plain["remat"], plain["attn_pad"]) == (False, -1) and (padded["remat"], padded["attn_pad"]) == (True, 4)
  assert "| mim_jax (pad4) | mae | ViT-T/16 | 4 | 32 | float32 | xla (pad 4) | True |" in speed.table(
      [plain, padded], peak=0.0)


def test_swin_case_counts_the_paper_flops_and_times_a_step(speed, capsys):
  # Swin-B at 224 px, window 7: the paper's 15.4 G multiply-adds (the 1000-way head aside).
  assert speed.swin_forward_flops(224, 128, (2, 2, 18, 2), 7) / 2e9 == pytest.approx(15.43, abs=0.01)
  assert speed.model_label("simmim_swin_b") == "Swin-B"
  case = {"model": "simmim_swin_b", "batch": 2, "image_size": 64, "attn": "xla",
          "dtype": "float32", "overrides": {"model.embed_dim": "8", "model.depths": "(1, 1, 1, 1)",
                                            "model.num_heads": "(1, 1, 1, 1)",
                                            "model.window_size": "2"}}
  speed.worker_jax(argparse.Namespace(case=json.dumps(case), steps=2, repeats=1, profile="",
                                      dump=""))
  (row,) = _results(capsys.readouterr().out)
  assert row["kind"] == "jax" and row["loss"] > 0 and row["img_s"] > 0
  assert "| mim_jax | simmim | Swin-B | 2 | 64 |" in speed.table([row], peak=0.0)
