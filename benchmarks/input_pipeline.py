"""Throughput of the streaming training input pipeline: JPEG decode + RandomResizedCrop + flip.

Usage: python benchmarks/input_pipeline.py --data DIR [--workers 8,16] [--batches 40] [--json OUT]

Builds the real loader (`mim_jax.data.pipeline.make_train_loader`) on the image folder DIR
(``<DIR>/<class>/<image>``, e.g. written by benchmarks/make_jpegs.py), streaming
(``in_memory=False``), 224 px, MAE's crop scale (0.2, 1.0), batch 256, for each worker count,
each ``--read`` setting (grain's reader threads and buffer) and each ``--modes`` entry: fast
(``input.fast_decode``: reduced-size JPEG decoding), full (full decode, then crop) and region
(``input.device_resize=--canvas``: the workers stop before the resize, which the train step
does; not timed here). Each row: warm-up batches, then ``--batches`` timed batches ->
images/s and ms/batch.
Also times one process decoding + cropping ~300 files held in memory (no grain, no file
reads) in both modes, and reports how often a reduced decode was possible, and the same
work in N plain processes (no grain: the machine's ceiling for the per-image work).
"""
from __future__ import annotations

import argparse
import gc
import io
import json
import os
import pathlib
import platform
import sys
import time

import numpy as np

ROOT = pathlib.Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
  sys.path.insert(0, str(ROOT))

from mim_jax.data import host_crop, pipeline, sources  # noqa: E402  pylint: disable=g-import-not-at-top

SCALE = (0.2, 1.0)
RATIO = (3 / 4, 4 / 3)


def input_config(data_dir: str, *, workers: int, fast_decode: bool, batch_size: int,
                 image_size: int, holdout: int, read_threads: int = 2, read_buffer: int = 16,
                 device_resize: int = 0):
  import ml_collections  # pylint: disable=g-import-not-at-top
  return ml_collections.ConfigDict(dict(
      data=dict(name="image_folder", dir=data_dir, holdout_per_class=holdout, holdout_seed=0,
                in_memory=False, cache_dir=""),
      batch_size=batch_size, image_size=image_size, workers=workers,
      aug=dict(crop_scale=SCALE, crop_ratio=RATIO, hflip=True),
      mean=(0.485, 0.456, 0.406), std=(0.229, 0.224, 0.225), fast_decode=fast_decode,
      read_threads=read_threads, read_buffer=read_buffer, device_resize=device_resize))


def time_loader(cfg, warmup: int, batches: int) -> dict:
  loader = pipeline.make_train_loader(cfg, seed=0, process_index=0, process_count=1)
  start = time.perf_counter()
  for _ in range(warmup):
    batch = next(loader)
  first = time.perf_counter() - start
  bad = host_resized = 0
  start = time.perf_counter()
  for _ in range(batches):
    batch = next(loader)
    bad += int(batch["bad"].sum())
    host_resized += int(batch.get("host_resized", np.zeros(1)).sum())
  seconds = time.perf_counter() - start
  if "offset" in batch:   # device_resize: packed regions, one row per device
    assert batch["box"].shape == (cfg.batch_size, 4) and batch["image"].ndim == 2
  else:
    assert batch["image"].shape == (cfg.batch_size, *loader.image_shape)
  # Stop the worker processes now (grain's iterator has close(); the wrapper does not).
  inner = getattr(loader.grain_iterator, "_iterator", None)
  if hasattr(inner, "close"):
    inner.close()
  del loader, batch, inner
  gc.collect()
  n = batches * cfg.batch_size
  return dict(images_per_s=n / seconds, ms_per_batch=1e3 * seconds / batches,
              warmup_s=first, bad=bad, host_resized_fraction=host_resized / n)


def read_files(data_dir: str, num_files: int) -> list[bytes]:
  listing = sources.list_image_folder(data_dir)
  pick = np.random.default_rng(0).permutation(len(listing.files))[:num_files]
  blobs = []
  for i in pick:
    with open(os.path.join(listing.root, listing.files[i]), "rb") as f:
      blobs.append(f.read())
  return blobs


def crop_all(blobs: list[bytes], mode: str, image_size: int, seed: int) -> list[int]:
  """Decode + crop + flip every blob (``mode`` 'fast', 'full' or 'decode': the full-size
  decode alone); returns the JPEG reductions used (fast mode)."""
  from PIL import Image  # pylint: disable=g-import-not-at-top
  factors = []
  if mode == "full":
    crop = host_crop.HostRandomResizedCropFlip(image_size, SCALE, RATIO, True)
    for k, data in enumerate(blobs):
      crop.random_map({"image": sources.decode_image(data)}, np.random.default_rng([seed, k]))
  elif mode == "fast":
    for k, data in enumerate(blobs):
      factors.append(host_crop.decode_crop_flip(data, np.random.default_rng([seed, k]),
                                               image_size, SCALE, RATIO, True)[2])
  else:
    for data in blobs:
      with Image.open(io.BytesIO(data)) as im:
        im.load()
  return factors


def time_resize_only(blobs: list[bytes], image_size: int) -> float:
  """ms per image of the fast path's bicubic resize of the crop box alone (Pillow, from
  images decoded and loaded beforehand, no reduction): the part of 'fast' that is not the
  decode."""
  from PIL import Image  # pylint: disable=g-import-not-at-top
  images = []
  for data in blobs:
    with Image.open(io.BytesIO(data)) as im:
      images.append(im.convert("RGB"))
  for rep in range(2):   # the second pass is timed
    start = time.perf_counter()
    for k, im in enumerate(images):
      width, height = im.size
      top, left, h, w = host_crop.sample_crop_box_np(np.random.default_rng([rep, k]), height,
                                                    width, SCALE, RATIO)
      im.resize((image_size, image_size), Image.Resampling.BICUBIC,
                box=(left, top, left + w, top + h))
    seconds = time.perf_counter() - start
  return 1e3 * seconds / len(images)


def time_single_process(blobs: list[bytes], image_size: int) -> dict:
  """Per-image decode + crop + flip in this process, bytes already in memory."""
  out, used = {}, {}
  for rep in range(2):   # the first pass warms caches and imports; the second is timed
    for mode in ("full", "fast", "decode"):
      start = time.perf_counter()
      used[mode] = crop_all(blobs, mode, image_size, rep)
      out[f"{mode}_ms_per_image"] = 1e3 * (time.perf_counter() - start) / len(blobs)
  out["decode_only_ms_per_image"] = out.pop("decode_ms_per_image")
  out["resize_only_ms_per_image"] = time_resize_only(blobs, image_size)
  factors = np.asarray(used["fast"])
  out["reduced_fraction"] = float(np.mean(factors > 1))
  out["reductions"] = {str(f): float(np.mean(factors == f)) for f in (1, 2, 4, 8)}
  out["files"] = len(blobs)
  out["mean_file_kib"] = float(np.mean([len(b) for b in blobs]) / 1024)
  return out


_BLOBS: list[bytes] = []


def _init_blobs(blobs: list[bytes]) -> None:
  global _BLOBS
  _BLOBS = blobs


def _crop_job(job: tuple[str, int, int]) -> int:
  mode, image_size, seed = job
  crop_all(_BLOBS, mode, image_size, seed)
  return len(_BLOBS)


def time_process_pool(blobs: list[bytes], mode: str, processes: int, image_size: int) -> float:
  """Images/s of ``processes`` plain processes each cropping all of ``blobs`` (no grain, no
  batching, no transfer): the machine's ceiling for the per-image work."""
  import multiprocessing  # pylint: disable=g-import-not-at-top
  ctx = multiprocessing.get_context("spawn")
  with ctx.Pool(processes, initializer=_init_blobs, initargs=(blobs,)) as pool:
    pool.map(_crop_job, [(mode, image_size, 1000 + i) for i in range(processes)], chunksize=1)
    start = time.perf_counter()
    done = sum(pool.map(_crop_job, [(mode, image_size, i) for i in range(processes)],
                        chunksize=1))
    return done / (time.perf_counter() - start)


def main(argv=None) -> None:
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument("--data", required=True, help="image folder <DIR>/<class>/<image>")
  parser.add_argument("--workers", default=str(os.cpu_count() or 1),
                      help="comma-separated grain worker counts (default: all cores)")
  parser.add_argument("--modes", default="fast,full",
                      help="fast (fast_decode=True), full (decode, then crop), region "
                           "(device_resize=--canvas: the workers decode, cut and pack the "
                           "regions; the resize is left to the device and not timed here)")
  parser.add_argument("--canvas", type=int, default=448, help="device_resize for mode region")
  parser.add_argument("--read", default="2:16",
                      help="comma-separated read_threads:read_buffer pairs (grain's reader "
                           "threads and prefetch buffer in each worker; grain's own default "
                           "is 16:500)")
  parser.add_argument("--batch_size", type=int, default=256)
  parser.add_argument("--image_size", type=int, default=224)
  parser.add_argument("--warmup", type=int, default=5, help="untimed batches first")
  parser.add_argument("--batches", type=int, default=40, help="timed batches")
  parser.add_argument("--holdout", type=int, default=0, help="holdout_per_class")
  parser.add_argument("--single_files", type=int, default=300,
                      help="files for the single-process timing (0: skip)")
  parser.add_argument("--ceiling", type=int, default=1,
                      help="1: also time the same files in N plain processes (no grain)")
  parser.add_argument("--json", default="", help="write the results here")
  args = parser.parse_args(argv)

  from PIL import Image, features  # pylint: disable=g-import-not-at-top
  info = dict(cpus=os.cpu_count(), python=platform.python_version(), pillow=Image.__version__,
              libjpeg_turbo=bool(features.check_feature("libjpeg_turbo")),
              data=os.path.abspath(args.data),
              records=len(sources.list_image_folder(args.data).files),
              batch_size=args.batch_size, image_size=args.image_size, crop_scale=SCALE,
              warmup=args.warmup, batches=args.batches)
  print(f"{info['records']} records in {info['data']}; {info['cpus']} CPUs, Pillow "
        f"{info['pillow']} (libjpeg-turbo: {info['libjpeg_turbo']})", flush=True)

  single = {}
  blobs = read_files(args.data, args.single_files) if args.single_files > 0 else []
  if blobs:
    single = time_single_process(blobs, args.image_size)
    print(f"single process, {single['files']} files ({single['mean_file_kib']:.1f} KiB mean), "
          f"decode+crop+flip per image: full {single['full_ms_per_image']:.2f} ms, fast "
          f"{single['fast_ms_per_image']:.2f} ms (a full-size decode alone: "
          f"{single['decode_only_ms_per_image']:.2f} ms, the bicubic resize of "
          f"the box alone: {single['resize_only_ms_per_image']:.2f} ms); reduced decode possible for "
          f"{single['reduced_fraction']:.1%} of crops "
          f"({', '.join(f'1/{k}: {v:.1%}' for k, v in single['reductions'].items())})",
          flush=True)

  worker_counts = [int(w) for w in args.workers.split(",") if w.strip()]
  modes = [m.strip() for m in args.modes.split(",") if m.strip()]
  for mode in modes:
    if mode not in ("fast", "full", "region"):
      sys.exit(f"unknown mode {mode!r}: use fast, full and/or region")
  ceiling = []
  if blobs and args.ceiling:
    for workers in worker_counts:
      for mode in (m for m in modes if m != "region"):
        rate = time_process_pool(blobs, mode, workers, args.image_size)
        ceiling.append(dict(mode=mode, processes=workers, images_per_s=rate))
        print(f"no grain, {workers} plain processes, {mode}: {rate:.0f} images/s", flush=True)

  reads = []
  for pair in args.read.split(","):
    threads, _, buffer = pair.strip().partition(":")
    if not (threads.isdigit() and buffer.isdigit()):
      sys.exit(f"bad --read pair {pair!r}: use THREADS:BUFFER, e.g. 2:16")
    reads.append((int(threads), int(buffer)))
  rows = []
  print(f"{'mode':>6} {'workers':>7} {'read':>7} {'images/s':>9} {'ms/batch':>9} {'bad':>4}",
        flush=True)
  for workers in worker_counts:
    for read_threads, read_buffer in reads:
      for mode in modes:
        cfg = input_config(args.data, workers=workers, fast_decode=mode != "full",
                           batch_size=args.batch_size, image_size=args.image_size,
                           holdout=args.holdout, read_threads=read_threads,
                           read_buffer=read_buffer,
                           device_resize=args.canvas if mode == "region" else 0)
        row = dict(mode=mode, workers=workers, read_threads=read_threads,
                   read_buffer=read_buffer, **time_loader(cfg, args.warmup, args.batches))
        rows.append(row)
        read = f"{read_threads}:{read_buffer}"
        print(f"{mode:>6} {workers:>7} {read:>7} {row['images_per_s']:>9.0f} "
              f"{row['ms_per_batch']:>9.1f} {row['bad']:>4}"
              + (f"  ({row['host_resized_fraction']:.1%} resized on the host: region over "
                 f"{args.canvas} px or over the budget)" if mode == "region" else ""),
              flush=True)
  if args.json:
    pathlib.Path(args.json).write_text(json.dumps(dict(
        info=info, single_process=single, no_grain=ceiling, rows=rows), indent=1) + "\n")
    print(f"wrote {args.json}")


if __name__ == "__main__":
  main()
