r"""Training speed on one GPU: mim_jax beside the PyTorch reference MAE, in one command.

  python benchmarks/speed.py                      # every case below, one table
  python benchmarks/speed.py --group base         # MAE ViT-B + SimMIM ViT-B + the torch MAE-B
  python benchmarks/speed.py --group large        # MAE ViT-L, ViT-H/14, the torch MAE-L

Each case runs in its own process (a clean device and its own peak-memory count; the
processes share one JAX compilation cache, `JAX_COMPILATION_CACHE_DIR` or a temporary folder,
so a step compiled twice is compiled once) and prints
a `RESULT {json}` line; the parent prints the table: method, model, batch, image size, dtype,
images/s, step time, MFU, peak memory, and mim_jax / reference ratios. The mim_jax rows time
the trainer's own jitted step (`mim_jax.train.build_state_and_step`: augmentation-free
normalisation, loss, gradients, AdamW update, metrics) on device-resident random uint8
images; the reference rows time benchmarks/torch_mae.py (eager and torch.compile).

MFU = analytic model FLOPs per image (3 x the forward matmul FLOPs: patch embedding,
attention projections, attention scores and values, MLPs, decoder; see `train_flops`) x
images/s / the bf16 matmul rate measured in the same run (an 8192^3 product).

`--max-batch` also runs each mim_jax case at the largest batch predicted to fit (from the
compiled step's memory analysis at the base batch), `--profile DIR` writes a jax.profiler
trace of the first mim_jax case and prints its kernel-time summary.

`--data DIR [--workers N] [--device_resize 0,448]` also runs each MAE case end to end
(`worker_e2e`): the same step fed by the real streaming loader on the JPEG folder DIR (e.g.
from benchmarks/make_jpegs.py), once per `input.device_resize` value, and prints a second
table: the step alone, the loader alone, the two together, input-bound or not. The step alone
runs on one loader batch, so with device_resize it includes the device's resize.

`--models mae_b` keeps only those mim_jax models of the groups. `--variant 'NAME: KEY=VALUE;
...'` (repeatable) times each mim_jax case again with config keys or environment variables
set, one row per variant, to try execution options side by side in one run, e.g.
`--variant 'pad64: model.attn_pad=64' --variant 'cudnn_ln: XLA_FLAGS=--xla_gpu_enable_cudnn_layer_norm=true'`.
"""
from __future__ import annotations

import argparse
import json
import os
import pathlib
import re
import subprocess
import sys
import time

ROOT = pathlib.Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

# name -> (method, config preset, variant, patch)
MODELS = {
    "mae_b": ("mae", "imagenet", "base", 16),
    "mae_l": ("mae", "imagenet_large", "large", 16),
    "mae_h": ("mae", "imagenet_large", "huge", 14),
    "simmim_b": ("simmim", "imagenet", "base", 16),
    "simmim_swin_b": ("simmim", "imagenet_swin_b", "base", 4),   # Swin-B, 192 px, window 6
    "mae_t": ("mae", "imagenet", "tiny", 16),   # not in a group: small enough for a CPU run
}
WIDTH_DEPTH = {"tiny": (192, 12), "base": (768, 12), "large": (1024, 24), "huge": (1280, 32)}
# The image size of a model's official pretraining where it is not 224.
IMAGE_SIZE = {"simmim_swin_b": 192}
# Swin variants: (embed dim, depths, window at 192 px) of configs/simmim.py:imagenet_swin_b.
SWIN = {"base": (128, (2, 2, 18, 2), 6)}


# ---------------------------------------------------------------------------------------------
# Analytic FLOPs.

def vit_forward_flops(tokens: int, width: int, depth: int, mlp_ratio: float = 4.0) -> float:
  """Matmul FLOPs of `depth` pre-norm blocks on `tokens` tokens (2 per multiply-add)."""
  n, d = tokens, width
  per_block = 2 * n * d * 3 * d + 2 * n * d * d + 2 * 2 * n * n * d + 2 * 2 * n * d * mlp_ratio * d
  return depth * per_block


def swin_forward_flops(image_size: int, embed: int, depths: tuple, window: int,
                       patch: int = 4, mlp_ratio: float = 4.0) -> float:
  """Matmul FLOPs of a Swin's forward (2 per multiply-add): the patch embedding, per block
  qkv, attention within windows of window^2 tokens (a window never larger than the map),
  projection and MLP, and each stage's patch merging (4C -> 2C)."""
  side = image_size // patch
  flops = 2 * side * side * patch * patch * 3 * embed
  c = embed
  for i, depth in enumerate(depths):
    n, m = side * side, min(window, side) ** 2
    per_block = 2 * n * c * 3 * c + 2 * 2 * n * m * c + 2 * n * c * c + 2 * 2 * n * mlp_ratio * c * c
    flops += depth * per_block
    if i < len(depths) - 1:
      side //= 2
      flops += 2 * side * side * 4 * c * 2 * c
      c *= 2
  return flops


def train_flops(model: str, image_size: int = 224, mask_ratio: float = 0.75,
                dec_width: int = 512, dec_depth: int = 8) -> float:
  """Model FLOPs of one training image: 3 x forward (the backward pass is twice the forward)."""
  method, _, variant, patch = MODELS[model]
  if model in ("simmim_swin_b",):
    embed, depths, window = SWIN[variant]
    final = embed * 2 ** (len(depths) - 1)
    stride = patch * 2 ** (len(depths) - 1)
    decoder = 2 * (image_size // stride) ** 2 * final * stride * stride * 3   # 1x1 conv
    return 3.0 * (swin_forward_flops(image_size, embed, depths, window, patch) + decoder)
  width, depth = WIDTH_DEPTH[variant]
  length = (image_size // patch) ** 2
  pix = patch * patch * 3
  embed = 2 * length * pix * width            # the patch embedding runs on every patch
  if method == "mae":
    keep = int(length * (1 - mask_ratio))
    fwd = (embed + vit_forward_flops(keep + 1, width, depth)
           + 2 * (keep + 1) * width * dec_width
           + vit_forward_flops(length + 1, dec_width, dec_depth)
           + 2 * (length + 1) * dec_width * pix)
  else:  # simmim: the full sequence, then a 1x1 conv to patch*patch*3 per patch
    fwd = embed + vit_forward_flops(length + 1, width, depth) + 2 * length * width * pix
  return 3.0 * fwd


# ---------------------------------------------------------------------------------------------
# Workers (each run in its own process).

def _result(row: dict) -> None:
  print("RESULT " + json.dumps(row), flush=True)


def worker_peak(_args) -> None:
  """bf16 matmul rate on this device: 8192^3 products on random data, 10 back to back per
  timing (so host dispatch overlaps the device), median of 10 timings."""
  import jax
  import jax.numpy as jnp
  import numpy as np
  n = 8192
  ka, kb = jax.random.split(jax.random.PRNGKey(0))
  a = jax.random.normal(ka, (n, n), jnp.bfloat16)
  b = jax.random.normal(kb, (n, n), jnp.bfloat16)
  f = jax.jit(lambda a, b: a @ b)
  for _ in range(30):                        # warm up (and let the clocks rise)
    out = f(a, b)
  out.block_until_ready()
  times = []
  for _ in range(10):
    t = time.perf_counter()
    outs = [f(a, b) for _ in range(10)]
    jax.block_until_ready(outs)
    times.append((time.perf_counter() - t) / 10)
  _result({"kind": "peak", "tflops": 2 * n**3 / float(np.median(times)) / 1e12,
           "device": jax.devices()[0].device_kind, "jax": jax.__version__})


def load_config(method: str, preset: str):
  from mim_jax import config_lib
  return config_lib.load(method, preset, str(ROOT / "configs"))


def case_config(case: dict):
  method, preset, variant, patch = MODELS[case["model"]]
  c = load_config(method, preset)
  c.model.variant = variant
  c.model.patch_size = patch
  c.input.batch_size = case["batch"]
  c.input.image_size = case.get("image_size", IMAGE_SIZE.get(case["model"], 224))
  c.model.dtype = case.get("dtype", "bfloat16")
  c.model.attn_impl = case.get("attn", "cudnn")
  c.model.attn_pad = int(case.get("attn_pad", -1))
  c.model.remat = bool(case.get("remat", False))
  c.optim.grad_accum = int(case.get("grad_accum", 1))
  if "depth" in case:        # shallower models for CPU runs of the benchmark's code
    c.model.depth = int(case["depth"])
  if "dec_depth" in case:
    c.mae.decoder.depth = int(case["dec_depth"])
  for key, value in case.get("overrides", {}).items():
    set_config_value(c, key, value)
  return c


def set_config_value(config, key: str, text: str) -> None:
  """config[key] = text parsed as a Python literal ('True', '64', '1e-3'; true/false too),
  else as a string; the key must exist (a typo would otherwise time the unchanged step)."""
  from mim_jax import config_lib
  low = text.strip().lower()
  value = low == "true" if low in ("true", "false") else config_lib.parse_value(text)
  try:
    config_lib.set_path(config, key, value)
  except KeyError:
    raise SystemExit(f"speed.py: unknown config key {key!r} in --variant") from None
  except TypeError as e:
    raise SystemExit(f"speed.py: --variant {key}={text}: {e}".splitlines()[0]) from None


def parse_variant(spec: str) -> dict:
  """'NAME: KEY=VALUE; KEY=VALUE' -> a case fragment. A dotted KEY is a config key
  ('model.attn_pad=64'); an upper-case KEY is an environment variable of the case's process
  ('XLA_FLAGS=--xla_gpu_enable_cudnn_layer_norm=true'). Each setting splits at its first '='."""
  name, sep, rest = spec.partition(":")
  if not sep or not name.strip():
    raise SystemExit(f"speed.py: --variant {spec!r}: write 'NAME: KEY=VALUE; ...'")
  overrides, env = {}, {}
  for setting in filter(None, (t.strip() for t in rest.split(";"))):
    key, eq, value = setting.partition("=")
    key = key.strip()
    if not eq or not key:
      raise SystemExit(f"speed.py: --variant {spec!r}: {setting!r} is not KEY=VALUE")
    if "." in key:
      overrides[key] = value.strip()
    elif key.isupper():
      env[key] = value.strip()
    else:
      raise SystemExit(f"speed.py: --variant {spec!r}: {key!r} is neither a dotted config key "
                       "nor an upper-case environment variable")
  return {"variant": name.strip(), "overrides": overrides, "env": env}


def _state_and_step(config):
  """The trainer's initial state, batch sharding and jitted step for `config`, one device."""
  import jax
  from mim_jax import methods, optim, sharding, train
  jax.config.update("jax_threefry_partitionable", True)
  method = methods.get(config)
  mesh = sharding.make_mesh(config.mesh, jax.devices()[:1])
  schedule = optim.make_schedule(config.optim, config.input.batch_size, 1000, 100_000)
  state, _, batch_sh, step = train.build_state_and_step(config, method, mesh, schedule,
                                                        on_device_aug=False, total_steps=100_000)
  return state, batch_sh, step


def _time_steps(step, state, batches, steps: int, repeats: int):
  """Median seconds per step over `repeats` runs of `steps` steps, cycling through `batches`
  (device arrays, or a callable giving the next one); returns (state, metrics, times)."""
  import jax
  times = []
  metrics = None
  for _ in range(repeats):
    t = time.perf_counter()
    for i in range(steps):
      batch = batches() if callable(batches) else batches[i % len(batches)]
      state, metrics = step(state, batch)
    jax.block_until_ready((state, metrics))
    times.append((time.perf_counter() - t) / steps)
  return state, metrics, times


def worker_jax(args) -> None:
  import jax
  import numpy as np
  case = json.loads(args.case)
  config = case_config(case)
  batch = config.input.batch_size
  size = config.input.image_size
  t0 = time.perf_counter()
  state, batch_sh, step = _state_and_step(config)
  rng = np.random.default_rng(0)
  batches = [jax.device_put({"image": rng.integers(0, 256, (batch, size, size, 3), np.uint8)},
                            batch_sh) for _ in range(2)]
  compiled = step.lower(state, batches[0]).compile()
  compile_s = time.perf_counter() - t0
  mem = compiled.memory_analysis()
  state, metrics, _ = _time_steps(compiled, state, batches, 3, 1)
  if args.dump:      # the compiled HLO: summarize_trace names each kernel's ops from it
    pathlib.Path(args.dump).write_text(compiled.as_text())
  if args.profile:
    with jax.profiler.trace(args.profile, create_perfetto_trace=True):
      state, metrics, _ = _time_steps(compiled, state, batches, 5, 1)
  state, metrics, times = _time_steps(compiled, state, batches, args.steps, args.repeats)
  step_s = float(np.median(times))
  stats = jax.devices()[0].memory_stats() or {}
  # The table's remat and padding columns say what ran, a --variant's overrides included.
  row = {"kind": "jax", "impl": "mim_jax", **case, "case": case, "remat": bool(config.model.remat),
         "attn_pad": int(config.model.attn_pad), "step_s": step_s, "img_s": batch / step_s,
         "peak_gib": stats.get("peak_bytes_in_use", 0) / 2**30,
         "limit_gib": stats.get("bytes_limit", 0) / 2**30, "compile_s": compile_s,
         "loss": float(metrics["loss"]), "spread": (max(times) - min(times)) / step_s}
  if mem is not None:
    row.update(temp_gib=mem.temp_size_in_bytes / 2**30, arg_gib=mem.argument_size_in_bytes / 2**30)
  _result(row)


def worker_e2e(args) -> None:
  """The same step fed by the real streaming loader: JPEGs from the image folder
  ``case['data']``, decoded, cropped (RandomResizedCrop 0.2-1, bicubic) and flipped by
  ``case['workers']`` grain processes, moved to the device as the trainer does
  (`sharding.host_to_global`). In one process: the step alone on one loader batch kept on the
  device, the loader alone, and the two together; the run is input-bound when together is
  more than 5% below the step alone."""
  import numpy as np
  from mim_jax import sharding
  from mim_jax.data import pipeline
  case = json.loads(args.case)
  config = case_config(case)
  batch = config.input.batch_size
  with config.unlocked():
    config.input.data = dict(name="image_folder", dir=case["data"], holdout_per_class=0,
                             holdout_seed=0, in_memory=False, cache_dir="")
    config.input.workers = int(case["workers"])
    config.input.fast_decode = True
    config.input.device_resize = int(case.get("device_resize", 0))
  state, batch_sh, step = _state_and_step(config)
  loader = pipeline.make_train_loader(config.input, seed=0, process_index=0, process_count=1)
  put = lambda: sharding.host_to_global(next(loader), batch_sh)  # noqa: E731
  fixed = [put()]
  state, metrics, _ = _time_steps(step, state, fixed, 3, 1)        # compile and warm up
  state, metrics, step_times = _time_steps(step, state, fixed, args.steps, args.repeats)
  for _ in range(config.input.workers + 2):   # drain what the workers buffered meanwhile
    next(loader)
  loader_times = []
  for _ in range(args.repeats):
    t = time.perf_counter()
    for _ in range(args.steps):
      next(loader)
    loader_times.append((time.perf_counter() - t) / args.steps)
  state, metrics, e2e_times = _time_steps(step, state, put, args.steps, args.repeats)
  rates = {name: batch / float(np.median(times)) for name, times in
           (("step_img_s", step_times), ("loader_img_s", loader_times), ("e2e_img_s", e2e_times))}
  _result({"kind": "e2e", "impl": "mim_jax", **case, "case": case, **rates,
           "input_bound": rates["e2e_img_s"] < 0.95 * rates["step_img_s"],
           "loss": float(metrics["loss"])})


def worker_torch(args) -> None:
  sys.path.insert(0, str(ROOT / "benchmarks"))
  import torch_mae
  case = json.loads(args.case)
  row = torch_mae.run(case["variant"], case["batch"], case["compile"], args.steps, args.repeats)
  _result({"kind": "torch", **case, **row})


def worker_attention(_args) -> None:
  """Which sequence lengths cuDNN's fused attention takes, forward and backward."""
  import jax
  import jax.numpy as jnp
  from mim_jax.models import vit
  for n in (50, 64, 197, 256):
    for hd, h in ((64, 12), (32, 16)):
      q = jax.random.normal(jax.random.PRNGKey(0), (8, n, h, hd), jnp.bfloat16)
      for pad in (0, 64):
        f = lambda q: vit.attention(q, q, q, None, "cudnn", pad).astype(jnp.float32).sum()  # noqa
        try:
          jax.block_until_ready(jax.jit(jax.grad(f))(q))
          ok = "ok"
        except Exception as e:  # pylint: disable=broad-except
          ok = f"{type(e).__name__}: {str(e).splitlines()[0][:100]}"
        _result({"kind": "attention", "n": n, "head_dim": hd, "pad": pad, "cudnn_fwd_bwd": ok})


# ---------------------------------------------------------------------------------------------
# Profile summary.

_WRAPPERS = ("jit", "pjit", "jvp", "transpose", "vmap", "remat", "checkpoint", "rematted_computation")


def _op_path(op_name: str) -> str:
  """'fwd MAE/decoder/blocks/block00/norm2/reduce_sum' from an HLO op_name such as
  'jit(step)/jvp(MAE)/decoder/blocks/block00/norm2/reduce_sum' ('bwd' under transpose(...))."""
  op_name = op_name.split(";")[0]
  phase = "bwd" if "transpose(" in op_name else "fwd"
  parts = []
  for i, seg in enumerate(op_name.split("/")):
    while (m := re.fullmatch(r"(\w+)\((.*)\)", seg)) and m.group(1) in _WRAPPERS:
      seg = m.group(2)                # transpose(jvp(MAE)) -> MAE, vmap() -> ''
    if i and seg:                     # the first segment is the jitted function: dropped
      parts.append(seg)
  return f"{phase} {'/'.join(parts)}"


def hlo_kernel_ops(hlo_text: str) -> dict[str, tuple[str, str]]:
  """Kernel name -> (op path, result shape) from a compiled HLO module's text: XLA:GPU names
  a fusion's kernel after the instruction ('%loop_convert_fusion.7' -> 'loop_convert_fusion_7').
  Identical fusions share one kernel, so a kernel launched once per block carries the first
  block's path."""
  out = {}
  pattern = re.compile(r"^\s*(?:ROOT\s+)?%([\w.\-]+)\s*=\s*(\([^=]*?\)|\S+)\s+[\w\-]+\(.*"
                       r'op_name="([^"]*)"')
  for line in hlo_text.splitlines():
    m = pattern.match(line)
    if m:
      name, shape, op_name = m.groups()
      out[re.sub(r"[.\-]", "_", name)] = (_op_path(op_name), re.sub(r"\{[^}]*\}", "", shape))
  return out


def summarize_trace(profile_dir: str, top: int = 30, out_json: str = "", hlo_path: str = "") -> None:
  """Prints device time per kernel name (and per kind) from the perfetto trace, with the
  launches per step and, given the compiled HLO (`hlo_path`), the ops each kernel computes and
  the time per op path (block numbers merged). An event is matched to its HLO instruction by
  its `hlo_op` argument where the trace has one (library kernels such as GEMMs too), else by
  the kernel's name (XLA's own fusions)."""
  import gzip
  from collections import Counter, defaultdict
  paths = sorted(pathlib.Path(profile_dir).rglob("*.trace.json.gz")) + sorted(
      pathlib.Path(profile_dir).rglob("perfetto_trace.json.gz"))
  if not paths:
    print(f"no trace under {profile_dir}")
    return
  with gzip.open(paths[-1]) as f:
    trace = json.load(f)
  ops = hlo_kernel_ops(pathlib.Path(hlo_path).read_text()) if hlo_path and os.path.exists(hlo_path) else {}
  events = trace["traceEvents"] if isinstance(trace, dict) else trace
  pids = {}
  for e in events:
    if e.get("ph") == "M" and e.get("name") == "process_name":
      pids[e["pid"]] = e["args"]["name"]
  gpu_pids = {p for p, name in pids.items() if "/device:GPU" in name or "GPU" in name}
  by_name, by_kind, launches = defaultdict(float), defaultdict(float), defaultdict(int)
  by_path, name_paths = defaultdict(float), defaultdict(Counter)
  total = 0.0
  for e in events:
    if e.get("ph") != "X" or e.get("pid") not in gpu_pids:
      continue
    name, dur = e.get("name", "?"), float(e.get("dur", 0))
    by_name[name] += dur
    launches[name] += 1
    hlo_op = (e.get("args") or {}).get("hlo_op")
    op = ops.get(re.sub(r"[.\-]", "_", hlo_op) if hlo_op else name)
    if op:
      by_path[re.sub(r"block\d+", "block*", op[0])] += dur
      name_paths[name][f"{op[0]} {op[1]}"] += dur
    low = name.lower()
    kind = ("attention" if any(w in low for w in ("fmha", "flash", "cudnn", "attn", "sdpa"))
            else "matmul" if any(w in low for w in ("gemm", "xmma", "cutlass", "nvjet", "dot",
                                                     "matmul", "cublas"))
            else "other kernels (fusions, copies, reductions)")
    by_kind[kind] += dur
    total += dur
  print(f"profile {paths[-1]}: {total / 1e3:.1f} ms of device time over 5 steps")
  for k, v in sorted(by_kind.items(), key=lambda kv: -kv[1]):
    print(f"  {k:22s} {v / 1e3:9.1f} ms  {100 * v / max(total, 1):5.1f}%")
  for k, v in sorted(by_name.items(), key=lambda kv: -kv[1])[:top]:
    where = ""
    if name_paths[k]:
      (first, _), *rest = name_paths[k].most_common()
      where = f"  <- {first}" + (f" (+{len(rest)} other ops)" if rest else "")
    print(f"  {100 * v / max(total, 1):5.1f}%  {v / 5e3:8.2f} ms/step  {launches[k] / 5:5.0f}x  "
          f"{k[:80]}{where}")
  if by_path:
    print("  time per op path (block numbers merged; kernels not found in the HLO left out):")
    for k, v in sorted(by_path.items(), key=lambda kv: -kv[1])[:top]:
      print(f"  {100 * v / max(total, 1):5.1f}%  {v / 5e3:8.2f} ms/step  {k[:150]}")
  if out_json:
    pathlib.Path(out_json).write_text(json.dumps(
        {"total_us": total, "by_kind": by_kind, "by_name": by_name, "launches": launches,
         "name_paths": name_paths, "by_path": by_path}, indent=0))


# ---------------------------------------------------------------------------------------------
# The parent: runs the cases, prints the table.

_CACHE_DIR: list[str] = []


def _compile_cache_dir() -> str:
  """One persistent compilation cache shared by this run's case processes (unless the caller
  set JAX_COMPILATION_CACHE_DIR): a step compiled again, e.g. the end-to-end case's step
  after the step-alone case, is read back instead of compiled (over a minute for MAE-B)."""
  if not _CACHE_DIR:
    import tempfile
    _CACHE_DIR.append(os.environ.get("JAX_COMPILATION_CACHE_DIR") or tempfile.mkdtemp(prefix="speed_jax_cache_"))
  return _CACHE_DIR[0]


def spawn(worker: str, case: dict | None, args, extra: list[str] | None = None) -> list[dict]:
  cmd = [sys.executable, str(pathlib.Path(__file__).resolve()), "--worker", worker,
         "--steps", str(args.steps), "--repeats", str(args.repeats)]
  if case is not None:
    cmd += ["--case", json.dumps(case)]
  cmd += extra or []
  env = dict(os.environ, XLA_PYTHON_CLIENT_MEM_FRACTION=os.environ.get(
      "XLA_PYTHON_CLIENT_MEM_FRACTION", "0.94"), JAX_COMPILATION_CACHE_DIR=_compile_cache_dir(),
      **(case or {}).get("env", {}))
  t = time.perf_counter()
  proc = subprocess.run(cmd, capture_output=True, text=True, env=env, cwd=ROOT)
  rows = [json.loads(line[7:]) for line in proc.stdout.splitlines() if line.startswith("RESULT ")]
  other = [line for line in proc.stdout.splitlines() if not line.startswith("RESULT ")]
  if other:
    print("\n".join(other), flush=True)
  if proc.returncode or not rows:
    err = (proc.stderr.strip().splitlines() or ["?"])
    oom = any("RESOURCE_EXHAUSTED" in l or "out of memory" in l.lower() for l in err)
    msg = "out of memory" if oom else err[-1][:200]
    print(f"  {worker} {case}: failed ({msg})", flush=True)
    if not oom and os.environ.get("BENCH_VERBOSE"):
      print(proc.stderr[-3000:])
    return [{"kind": worker, **(case or {}), "error": msg}]
  for r in rows:
    r["wall_s"] = time.perf_counter() - t
    print("  " + json.dumps(r), flush=True)
  return rows


GROUPS = {
    "base": dict(jax=[("mae_b", 256), ("simmim_b", 256)], torch=[("base", 256)]),
    "large": dict(jax=[("mae_l", 256), ("mae_h", 256)], torch=[("large", 256)]),
    "mae": dict(jax=[("mae_b", 256), ("mae_l", 256)], torch=[("large", 256)]),
    "swin": dict(jax=[("simmim_swin_b", 128)], torch=[]),   # SimMIM's Swin-B, 192 px
}


def model_label(model: str) -> str:
  """'ViT-B/16' for 'mae_b'."""
  _, preset, variant, patch = MODELS[model]
  if "swin" in preset:
    return f"Swin-{variant[0].upper()}"
  return f"ViT-{variant[0].upper()}/{patch}"


def table(rows: list[dict], peak: float) -> str:
  head = ("| impl | method | model | batch | image | dtype | attention | remat | images/s | step ms "
          "| MFU | peak GiB | max batch (pred.) | vs torch eager | vs torch.compile |")
  lines = [head, "|" + "---|" * (head.count("|") - 1)]
  ref = {}
  for r in rows:
    if r.get("kind") == "torch" and "img_s" in r:
      ref[(r["variant"], r["batch"], r["compile"])] = r["img_s"]
  for r in rows:
    if r.get("kind") not in ("jax", "torch"):
      continue
    if r["kind"] == "jax":
      method, _, variant, _ = MODELS[r["model"]]
      impl, dtype, remat = "mim_jax", r.get("dtype", "bfloat16"), r.get("remat", False)
      if r.get("variant"):
        impl += f" ({r['variant']})"
      attn = r.get("attn", "cudnn")
      if r.get("attn_pad", -1) >= 0:
        attn += f" (pad {r['attn_pad']})"
      model_name = r["model"]
    else:
      method, variant = "mae", r["variant"]
      impl, dtype, attn, remat = r["impl"], "bf16 autocast", "SDPA", False
      model_name = {"base": "mae_b", "large": "mae_l", "huge": "mae_h"}[variant]
    model = model_label(model_name)
    size = r.get("image_size", IMAGE_SIZE.get(model_name, 224))
    if "img_s" not in r:
      lines.append(f"| {impl} | {method} | {model} | {r.get('batch')} | {size} | {dtype} | {attn} | "
                   f"{remat} | {r.get('error', 'failed')} | | | | | | |")
      continue
    mfu = train_flops(model_name, size) * r["img_s"] / (peak * 1e12) if peak else float("nan")
    ratios = []
    for compiled in (False, True):
      base = ref.get((variant, r["batch"], compiled))
      ratios.append(f"{r['img_s'] / base:.2f}x" if base and r["kind"] == "jax" and method == "mae" else "")
    lines.append(f"| {impl} | {method} | {model} | {r['batch']} | {size} | {dtype} | {attn} | {remat} | "
                 f"{r['img_s']:,.0f} | {1e3 * r['step_s']:.1f} | {100 * mfu:.1f}% | "
                 f"{r['peak_gib']:.1f} | {r.get('max_batch_pred', '')} | {ratios[0]} | {ratios[1]} |")
  return "\n".join(lines)


def e2e_table(rows: list[dict]) -> str:
  """The end-to-end rows: the step alone, the loader alone and the two together."""
  lines = ["| model | batch | workers | device_resize | step alone img/s | loader alone img/s "
           "| together img/s | input-bound |", "|---|---|---|---|---|---|---|---|"]
  for r in rows:
    if r.get("kind") != "e2e":
      continue
    head = f"| {model_label(r['model'])} | {r.get('batch')} | {r.get('workers')} | " \
           f"{r.get('device_resize', 0)} |"
    if "e2e_img_s" not in r:
      lines.append(f"{head} {r.get('error', 'failed')} | | | |")
      continue
    lines.append(f"{head} {r['step_img_s']:,.0f} | {r['loader_img_s']:,.0f} | "
                 f"{r['e2e_img_s']:,.0f} | {'yes' if r['input_bound'] else 'no'} |")
  return "\n".join(lines)


def main() -> None:
  ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
  ap.add_argument("--group", default="all", choices=["all", *GROUPS])
  ap.add_argument("--attn", default="cudnn", help="comma list of attention impls for mim_jax")
  ap.add_argument("--no-torch", action="store_true")
  ap.add_argument("--no-compile", action="store_true", help="skip torch.compile (eager only)")
  ap.add_argument("--max-batch", action="store_true")
  ap.add_argument("--probe-attention", action="store_true")
  ap.add_argument("--profile", default="", help="trace the first mim_jax case into this folder")
  ap.add_argument("--dump", default="", help="with --profile: write the compiled HLO here "
                  "(default DIR/step.hlo.txt) and the kernel summary beside it (.json)")
  ap.add_argument("--data", default="", help="image folder of JPEGs (benchmarks/make_jpegs.py): "
                  "also time each MAE case fed by the real streaming loader (end to end)")
  ap.add_argument("--workers", type=int, default=os.cpu_count() or 1,
                  help="with --data: grain worker processes (default: all cores)")
  ap.add_argument("--device_resize", default="0",
                  help="with --data: comma list of input.device_resize values to run end to "
                       "end (0: the crop resized by the workers; e.g. 0,448)")
  ap.add_argument("--models", default="", help="comma list: only these mim_jax models of the "
                  f"groups ({', '.join(MODELS)})")
  ap.add_argument("--variant", action="append", default=[],
                  help="'NAME: KEY=VALUE; ...' (repeatable): also time each mim_jax case with "
                       "these config keys (dotted) or environment variables (upper case) set, "
                       "e.g. 'cudnn_ln: XLA_FLAGS=--xla_gpu_enable_cudnn_layer_norm=true'")
  ap.add_argument("--steps", type=int, default=20)
  ap.add_argument("--repeats", type=int, default=3)
  ap.add_argument("--json", default="")
  ap.add_argument("--worker", default="", help=argparse.SUPPRESS)
  ap.add_argument("--case", default="", help=argparse.SUPPRESS)
  args = ap.parse_args()
  if args.worker:
    {"peak": worker_peak, "jax": worker_jax, "e2e": worker_e2e, "torch": worker_torch,
     "attention": worker_attention}[args.worker](args)
    return

  unknown = set(filter(None, args.models.split(","))) - set(MODELS)
  if unknown:
    raise SystemExit(f"speed.py: unknown --models {sorted(unknown)}: use some of {list(MODELS)}")
  variants = [parse_variant(spec) for spec in args.variant]
  for variant in variants:      # unknown config keys and values fail here, before any device time
    from mim_jax.models import vit
    try:
      vit.check_execution_options(case_config({"model": "mae_b", "batch": 8, **variant}).model)
    except ValueError as e:
      raise SystemExit(f"speed.py: --variant {variant['variant']!r}: {e}") from None
  print(f"# benchmarks/speed.py {' '.join(sys.argv[1:])}  ({time.strftime('%Y-%m-%d %H:%M')})", flush=True)
  rows = spawn("peak", None, args)
  peak = rows[0].get("tflops", 0.0)
  print(f"# device {rows[0].get('device')}, jax {rows[0].get('jax')}: bf16 matmul {peak:.0f} TFLOP/s")
  if args.probe_attention:
    rows += spawn("attention", None, args)
  groups = list(GROUPS) if args.group == "all" else [args.group]
  profiled = False
  for g in groups:
    for model, batch in GROUPS[g]["jax"]:
      if args.models and model not in args.models.split(","):
        continue
      for attn in args.attn.split(","):
        case = {"model": model, "batch": batch, "attn": attn, "remat": model == "mae_h"}
        extra = []
        if args.profile and not profiled:
          dump = args.dump or os.path.join(args.profile, "step.hlo.txt")
          os.makedirs(os.path.dirname(os.path.abspath(dump)), exist_ok=True)
          extra, profiled = ["--profile", args.profile, "--dump", dump], True
        got = spawn("jax", case, args, extra)
        if "error" in got[0] and attn == "cudnn" and "memory" not in got[0]["error"]:
          # Fall back to padding the attention to a multiple of 64 (known to train on cuDNN).
          got = spawn("jax", {**case, "attn_pad": 64}, args)
        rows += got
        if extra:
          summarize_trace(args.profile, 40, dump + ".json", dump)
        for variant in variants:
          rows += spawn("jax", {**got[0].get("case", case), **variant}, args)
        r = got[0]
        if "temp_gib" in r:
          # Activations grow with the batch, the state does not: the largest batch predicted
          # to fit in the memory JAX may use, rounded down to a multiple of 64.
          per_image = r["temp_gib"] / r["batch"]
          r["max_batch_pred"] = int((r["limit_gib"] - r["arg_gib"] - 1.0) / per_image) // 64 * 64
          if args.max_batch and r["max_batch_pred"] > r["batch"]:
            rows += spawn("jax", {**r["case"], "batch": r["max_batch_pred"]}, args)
        if args.data and MODELS[model][0] == "mae" and "error" not in r:
          for canvas in args.device_resize.split(","):
            rows += spawn("e2e", {**r["case"], "data": os.path.abspath(args.data),
                                  "workers": args.workers, "device_resize": int(canvas)}, args)
    if not args.no_torch:
      for variant, batch in GROUPS[g]["torch"]:
        for compiled in ([False] if args.no_compile else [False, True]):
          rows += spawn("torch", {"variant": variant, "batch": batch, "compile": compiled}, args)
  print()
  print(table(rows, peak))
  if any(r.get("kind") == "e2e" for r in rows):
    print()
    print(e2e_table(rows))
  if args.json:
    pathlib.Path(args.json).write_text(json.dumps({"peak_tflops": peak, "rows": rows}, indent=1))


if __name__ == "__main__":
  main()
