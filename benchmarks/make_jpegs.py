"""Writes a folder of ImageNet-like JPEGs made from real photographs, for input-pipeline benchmarks.

Usage: python benchmarks/make_jpegs.py --out /tmp/jpegs [--num 10000] [--seed 0] [--workers 16]
       [--src DIR]

Layout: ``<out>/<class>/<n>.jpg`` (``--classes`` class folders, default 10), as read by
``data.name='image_folder'``. Each file is a random crop (40-100% of the area, aspect 3/4..4/3)
of a random source photograph, resized to an ImageNet-train-like size (most 500x375, 375x500,
500x333 or 500x500; ~12% larger, long side 600-1200; ~8% smaller, long side 200-400), randomly
mirrored, with a small brightness / colour-balance jitter, saved as baseline JPEG quality 90
with 4:2:0 chroma subsampling.

Photos: the colour photographs bundled with scikit-image (``skimage.data``, imported only
here; those that cannot be loaded offline are skipped), or with ``--src DIR`` every image file
under DIR. At least 3 photos are needed.
"""
from __future__ import annotations

import argparse
import multiprocessing
import os
import pathlib
import sys
import time

import numpy as np

# skimage.data loaders tried, in order; each returns one colour image (or a tuple whose first
# items are images, e.g. the stereo pair).
SKIMAGE_PHOTOS = ("astronaut", "chelsea", "coffee", "rocket", "hubble_deep_field",
                  "immunohistochemistry", "stereo_motorcycle", "retina", "motorcycle_left",
                  "motorcycle_right", "skin")
IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".bmp", ".webp", ".tif", ".tiff")
MIN_PHOTOS = 3


def _as_rgb(image) -> np.ndarray | None:
  """uint8 [H, W, 3] from an RGB(A) array, or None for grey / odd images."""
  image = np.asarray(image)
  if image.ndim != 3 or image.shape[-1] not in (3, 4) or min(image.shape[:2]) < 64:
    return None
  image = image[..., :3]
  if image.dtype != np.uint8:
    hi = 1.0 if image.dtype.kind == "f" and image.max() <= 1.0 else 255.0
    image = np.clip(image.astype(np.float64) / hi * 255.0 + 0.5, 0, 255).astype(np.uint8)
  return np.ascontiguousarray(image)


def load_skimage_photos() -> list[tuple[str, np.ndarray]]:
  try:
    from skimage import data as skdata  # pylint: disable=g-import-not-at-top
  except ImportError as e:
    sys.exit(f"make_jpegs: scikit-image is not installed ({e}): install it, or pass --src DIR "
             "with photographs")
  photos = []
  for name in SKIMAGE_PHOTOS:
    fn = getattr(skdata, name, None)
    if fn is None:
      continue
    try:
      loaded = fn()
    except Exception as e:  # pylint: disable=broad-except  (e.g. needs a download)
      print(f"  skip skimage.data.{name}: {type(e).__name__}: {str(e)[:80]}")
      continue
    items = loaded if isinstance(loaded, tuple) else (loaded,)
    for k, item in enumerate(items[:2]):
      rgb = _as_rgb(item)
      if rgb is not None:
        photos.append((f"{name}{'' if len(items) == 1 else k}", rgb))
  return photos


def load_folder_photos(src: str) -> list[tuple[str, np.ndarray]]:
  from PIL import Image  # pylint: disable=g-import-not-at-top
  photos = []
  for path in sorted(pathlib.Path(src).rglob("*")):
    if path.suffix.lower() not in IMAGE_EXTENSIONS or not path.is_file():
      continue
    try:
      with Image.open(path) as im:
        rgb = _as_rgb(np.asarray(im.convert("RGB")))
    except Exception as e:  # pylint: disable=broad-except
      print(f"  skip {path}: {type(e).__name__}: {e}")
      continue
    if rgb is not None:
      photos.append((str(path.relative_to(src)), rgb))
  return photos


def sample_size(rng: np.random.Generator) -> tuple[int, int]:
  """(width, height) following roughly ImageNet train's size distribution."""
  u = rng.uniform()
  if u < 0.80:      # the common 500-px long side
    long_side = 500
    aspect = rng.choice([4 / 3, 3 / 2, 1.0, 1.25, 16 / 9], p=[0.55, 0.25, 0.08, 0.06, 0.06])
  elif u < 0.92:    # larger ones
    long_side = int(rng.uniform(600, 1200))
    aspect = rng.choice([4 / 3, 3 / 2, 1.0], p=[0.6, 0.3, 0.1])
  else:             # a few small ones
    long_side = int(rng.uniform(200, 400))
    aspect = rng.choice([4 / 3, 3 / 2, 1.0], p=[0.6, 0.3, 0.1])
  short_side = max(int(round(long_side / aspect)), 32)
  if rng.uniform() < 0.75:   # landscape
    return long_side, short_side
  return short_side, long_side


_PHOTOS: list[tuple[str, np.ndarray]] = []


def _init(photos: list[tuple[str, np.ndarray]]) -> None:
  global _PHOTOS
  _PHOTOS = photos


def make_one(job: tuple[int, int, str, float]) -> tuple[int, int, int]:
  """Writes image ``index``; returns (width, height, file bytes)."""
  from PIL import Image  # pylint: disable=g-import-not-at-top
  index, seed, path, noise = job
  rng = np.random.default_rng([seed, index])
  _, photo = _PHOTOS[int(rng.integers(len(_PHOTOS)))]
  out_w, out_h = sample_size(rng)
  # Random crop: 40-100% of the area, aspect near the output's (within 3/4..4/3).
  ph, pw = photo.shape[:2]
  aspect = float(np.clip(out_w / out_h * np.exp(rng.uniform(-0.1, 0.1)), 3 / 4, 4 / 3))
  area = ph * pw * rng.uniform(0.4, 1.0)
  cw = min(pw, max(16, int(round(np.sqrt(area * aspect)))))
  ch = min(ph, max(16, int(round(np.sqrt(area / aspect)))))
  top = int(rng.integers(ph - ch + 1))
  left = int(rng.integers(pw - cw + 1))
  im = Image.fromarray(photo).resize((out_w, out_h), Image.Resampling.LANCZOS,
                                     box=(left, top, left + cw, top + ch))
  pixels = np.asarray(im, dtype=np.float32)
  if rng.uniform() < 0.5:
    pixels = pixels[:, ::-1]
  gain = rng.uniform(0.88, 1.12) * rng.uniform(0.95, 1.05, size=3)   # brightness, colour balance
  pixels = pixels * gain + rng.uniform(-8, 8)
  if noise > 0:   # sensor-like grain: more detail to encode, as in photos not upscaled
    pixels = pixels + rng.normal(0.0, noise, pixels.shape[:2] + (1,))
  pixels = np.clip(pixels, 0, 255).astype(np.uint8)
  pathlib.Path(path).parent.mkdir(parents=True, exist_ok=True)
  Image.fromarray(pixels).save(path, format="JPEG", quality=90, subsampling=2, optimize=False,
                               progressive=False)
  return out_w, out_h, os.path.getsize(path)


def main(argv=None) -> None:
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument("--out", required=True, help="output folder (<out>/<class>/<n>.jpg)")
  parser.add_argument("--num", type=int, default=10000, help="number of images")
  parser.add_argument("--classes", type=int, default=10, help="number of class folders")
  parser.add_argument("--seed", type=int, default=0)
  parser.add_argument("--workers", type=int, default=os.cpu_count() or 1,
                      help="processes (default: all cores)")
  parser.add_argument("--src", default="",
                      help="folder of photographs to use instead of skimage.data's")
  parser.add_argument("--noise", type=float, default=0.0,
                      help="std of added grey-level noise (0: none); crops of the small "
                           "skimage photos are upscaled, so their files are smaller than "
                           "ImageNet's (~110 KB mean), and noise brings the size up")
  args = parser.parse_args(argv)

  photos = load_folder_photos(args.src) if args.src else load_skimage_photos()
  if len(photos) < MIN_PHOTOS:
    sys.exit(f"make_jpegs: only {len(photos)} usable colour photo(s) "
             f"({', '.join(n for n, _ in photos) or 'none'}); need at least {MIN_PHOTOS}: "
             + ("add images to --src" if args.src else "install scikit-image's data, or pass "
                "--src DIR with photographs"))
  print(f"{len(photos)} source photos: " + ", ".join(f"{n} {p.shape[1]}x{p.shape[0]}"
                                                       for n, p in photos))
  out = pathlib.Path(args.out)
  width = max(2, len(str(args.classes - 1)))
  jobs = [(i, args.seed, str(out / f"c{i % args.classes:0{width}d}" / f"{i:06d}.jpg"),
           args.noise) for i in range(args.num)]
  start = time.perf_counter()
  if args.workers > 1:
    ctx = multiprocessing.get_context("fork" if sys.platform == "linux" else "spawn")
    with ctx.Pool(args.workers, initializer=_init, initargs=(photos,)) as pool:
      stats = pool.map(make_one, jobs, chunksize=max(1, len(jobs) // (args.workers * 16)))
  else:
    _init(photos)
    stats = [make_one(j) for j in jobs]
  seconds = time.perf_counter() - start
  s = np.asarray(stats, np.float64).reshape(-1, 3)
  long_side = s[:, :2].max(axis=1)
  print(f"wrote {len(stats)} JPEGs to {out} in {seconds:.1f}s: mean {s[:, 0].mean():.0f}x"
        f"{s[:, 1].mean():.0f} px, mean file {s[:, 2].mean() / 1024:.1f} KiB; long side "
        f"<500: {np.mean(long_side < 500):.1%}, =500: {np.mean(long_side == 500):.1%}, "
        f">500: {np.mean(long_side > 500):.1%}")


if __name__ == "__main__":
  main()
