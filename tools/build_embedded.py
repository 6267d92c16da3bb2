"""Builds mim_jax/data/embedded_cifar10.npz: a seeded per-class subset of an image folder.

  python tools/build_embedded.py --src ../shared/data/cifar10/train \
      --out mim_jax/data/embedded_cifar10.npz --per-class auto --seed 0

The npz (compressed, no pickled objects) holds
  jpeg_bytes   uint8 [total bytes]  the selected files' bytes, concatenated
  offsets      int64 [N + 1]        image i is jpeg_bytes[offsets[i]:offsets[i + 1]]
  labels       int32 [N]            class index (sorted class folder names)
  class_names  unicode [C]
Images are grouped by class, sorted by file name within a class.

For each class, one numpy Generator(seed) permutation (drawn class by class) orders the
class's sorted files; the first --per-class readable files of that order are kept, so a larger
count keeps every file of a smaller one. --per-class auto keeps the largest count <= 500 whose
npz stays under --max-mb.
"""
from __future__ import annotations

import argparse
import io
import os
import sys

import numpy as np
from PIL import Image

EXTENSIONS = (".jpg", ".jpeg", ".png")


def _readable(path: str) -> bool:
  try:
    with Image.open(path) as im:
      im.convert("RGB").load()
    return True
  except Exception:  # pylint: disable=broad-except
    return False


def ordered_files(src: str, seed: int, limit: int) -> tuple[list[str], list[list[str]]]:
  """Class names and, per class, up to ``limit`` readable files in seeded-permutation order."""
  classes = sorted(d for d in os.listdir(src) if os.path.isdir(os.path.join(src, d)))
  if not classes:
    sys.exit(f"error: {src} has no class sub-folders: pass --src a folder of class sub-folders")
  rng = np.random.Generator(np.random.PCG64(seed))
  per_class = []
  for name in classes:
    folder = os.path.join(src, name)
    files = sorted(f for f in os.listdir(folder) if f.lower().endswith(EXTENSIONS))
    chosen = []
    for i in rng.permutation(len(files)):
      if len(chosen) == limit:
        break
      path = os.path.join(folder, files[i])
      if _readable(path):
        chosen.append(path)
    per_class.append(chosen)
  return classes, per_class


def pack(classes: list[str], per_class: list[list[str]], count: int) -> bytes:
  """The compressed npz bytes keeping the first ``count`` files of each class."""
  blobs, labels = [], []
  for label, files in enumerate(per_class):
    if len(files) < count:
      sys.exit(f"error: class {classes[label]} has only {len(files)} readable images, "
               f"fewer than --per-class {count}: lower --per-class")
    for path in sorted(files[:count]):
      with open(path, "rb") as f:
        blobs.append(f.read())
      labels.append(label)
  offsets = np.concatenate([[0], np.cumsum([len(b) for b in blobs])]).astype(np.int64)
  buf = io.BytesIO()
  np.savez_compressed(buf, jpeg_bytes=np.frombuffer(b"".join(blobs), np.uint8), offsets=offsets,
                      labels=np.asarray(labels, np.int32), class_names=np.asarray(classes, np.str_))
  return buf.getvalue()


def main(argv: list[str] | None = None) -> None:
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument("--src", required=True, help="image folder of class sub-folders")
  parser.add_argument("--out", required=True, help="output .npz path")
  parser.add_argument("--per-class", default="auto",
                      help="images per class, or 'auto': the largest count <= 500 under --max-mb")
  parser.add_argument("--seed", type=int, default=0)
  parser.add_argument("--max-mb", type=float, default=4.8, help="size limit in MB (10^6 bytes)")
  args = parser.parse_args(argv)

  limit_bytes = int(args.max_mb * 1e6)
  if args.per_class == "auto":
    classes, per_class = ordered_files(args.src, args.seed, 500)
    lo, hi = 1, min(len(f) for f in per_class)   # the largest count that fits lies in [lo, hi]
    if len(pack(classes, per_class, lo)) > limit_bytes:
      sys.exit(f"error: even 1 image per class exceeds {args.max_mb} MB")
    while lo < hi:
      mid = (lo + hi + 1) // 2
      if len(pack(classes, per_class, mid)) <= limit_bytes:
        lo = mid
      else:
        hi = mid - 1
    count = lo
  else:
    count = int(args.per_class)
    classes, per_class = ordered_files(args.src, args.seed, count)
  data = pack(classes, per_class, count)
  if len(data) > limit_bytes:
    sys.exit(f"error: {count} per class gives {len(data) / 1e6:.2f} MB, over --max-mb "
             f"{args.max_mb}: lower --per-class")
  os.makedirs(os.path.dirname(os.path.abspath(args.out)), exist_ok=True)
  with open(args.out, "wb") as f:
    f.write(data)
  print(f"wrote {args.out}: {count} per class x {len(classes)} classes = "
        f"{count * len(classes)} images, {len(data)} bytes ({len(data) / 1e6:.2f} MB)")


if __name__ == "__main__":
  main()
