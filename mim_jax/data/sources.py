"""Where images come from: the embedded CIFAR-10 subset, image folders and TFDS.

Two kinds of source live here:

* In-memory data (`load_in_memory`): every image of a split decoded once into one uint8
  array. Used for small datasets (the embedded set, CIFAR-sized folders); augmentation
  then happens on the device.
* Streaming sources (`ImageFolderSource`, `tfds_source`): random-access sources of encoded
  records ``{'image_bytes': bytes, 'label': int}`` (or an already decoded ``'image'``),
  decoded later inside grain worker processes. Used for ImageNet-sized datasets.

Both kinds split a labelled folder the same way: the 'eval' split is a fixed, seeded
hold-out of ``holdout_per_class`` files per class, 'train' is every other file. A third split,
'pretrain', is what pretraining samples from: 'train', or the nested subset ``train_subset``
of it (data-scaling studies, after Xie et al., "On Data Scaling in Masked Image Modeling",
CVPR 2023). Evaluators keep reading 'train' whole, so a kNN bank or a linear probe sees the
same labelled images whatever fraction the encoder was pretrained on.

Configuration keys read from ``data_cfg`` (an ``ml_collections.ConfigDict`` or a dict):
``name`` ('embedded' | 'embedded_clips' | 'image_folder' | 'tfds' | 'video_csv' |
'video_folder'), ``dir``, ``holdout_per_class``, ``holdout_seed``, ``cache_dir``,
``train_subset`` (0 = all), ``subset_seed``, for TFDS ``tfds_name``, ``train_split``,
``eval_split``, for the embedded clips ``num_frames`` (default 8), and for streamed video files
``csv``, ``eval_csv``, ``num_frames``, ``sampling_rate``, ``sampling`` (`video.clip_source`).

'embedded_clips' is the in-memory video set (`video.embedded_clips`: pan and zoom clips over
the embedded photographs, split as 'embedded'): its ``images`` are clips uint8
[N, num_frames, 32, 32, 3]; everything downstream takes the stored shape as it comes.

`tensorflow_datasets` and PIL are imported inside functions, so importing this module is cheap.
"""
from __future__ import annotations

import concurrent.futures
import dataclasses
import hashlib
import io
import math
import multiprocessing
import os
import pathlib
import threading
from typing import Any, Optional, Sequence

import numpy as np
from absl import logging

IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".bmp", ".webp", ".gif", ".tif", ".tiff")
EMBEDDED_PATH = pathlib.Path(__file__).resolve().parent / "embedded_cifar10.npz"
# 'pretrain' = 'train' or its `train_subset` (see `subset_positions`).
SPLITS = ("train", "eval", "pretrain")

# Files at or above this count are decoded with a process pool (when there is more than one core).
_POOL_MIN_FILES = 4096


class DataError(Exception):
  """Base class of the data errors; each message is one line that names the fix."""


class DataConfigError(DataError, ValueError):
  """The data configuration, or the data it points at, cannot be used."""


class DataNotFoundError(DataError, FileNotFoundError):
  """The configured data does not exist."""


@dataclasses.dataclass
class InMemoryData:
  """A split decoded into memory.

  Attributes:
    images: uint8 [N, H, W, 3] (clips: [N, T, H, W, 3]), read-only.
    labels: int32 [N], read-only.
    class_names: class index -> name.
    num_skipped: files of this split that could not be read or decoded and were left out.
  """
  images: np.ndarray
  labels: np.ndarray
  class_names: list[str]
  num_skipped: int = 0

  def __len__(self) -> int:
    return int(self.labels.shape[0])


def _get(cfg: Any, key: str, default: Any = None) -> Any:
  """`cfg.get(key, default)` for dicts and ConfigDicts, treating '' and None as unset."""
  value = cfg.get(key, default) if hasattr(cfg, "get") else getattr(cfg, key, default)
  return default if value is None or value == "" else value


def _check_split(split: str) -> None:
  if split not in SPLITS:
    raise DataConfigError(f"unknown split {split!r}: use one of {', '.join(SPLITS)}")


# ----------------------------------------------------------------------------------------------
# Hold-out split.


def holdout_mask(labels: np.ndarray, holdout_per_class: int, holdout_seed: int,
                 class_names: Optional[Sequence[str]] = None,
                 where: str = "the data") -> np.ndarray:
  """Boolean [N] mask of the records in the 'eval' hold-out.

  ``labels`` lists the records in their stored order (for folders: each class's files sorted by
  name). One ``np.random.Generator(PCG64(holdout_seed))`` draws, class by class in class-index
  order, a permutation of that class's records; its first ``holdout_per_class`` entries are
  held out.

  Raises:
    DataConfigError: a class has no more than ``holdout_per_class`` records.
  """
  labels = np.asarray(labels)
  holdout_per_class = int(holdout_per_class)
  if holdout_per_class < 0:
    raise DataConfigError(f"holdout_per_class={holdout_per_class} is negative: "
                          "set --config.input.data.holdout_per_class to 0 or more")
  mask = np.zeros(labels.shape[0], bool)
  num_classes = int(labels.max()) + 1 if labels.size else 0
  rng = np.random.Generator(np.random.PCG64(int(holdout_seed)))
  for c in range(num_classes):
    idx = np.flatnonzero(labels == c)
    if holdout_per_class and idx.size <= holdout_per_class:
      name = class_names[c] if class_names is not None else str(c)
      raise DataConfigError(
          f"class {name!r} of {where} has {idx.size} images, too few for a hold-out of "
          f"{holdout_per_class} per class plus training images: lower "
          "--config.input.data.holdout_per_class or add images")
    perm = rng.permutation(idx.size)
    mask[idx[perm[:holdout_per_class]]] = True
  return mask


def subset_size(num_train: int, train_subset: Any) -> int:
  """How many of ``num_train`` training records ``train_subset`` keeps.

  0 (or unset) keeps all; a value in (0, 1] is a fraction, rounded half up (1 and 1.0 mean
  all); a whole number above 1 is a count of images. Whole numbers and fractions are told
  apart by value, not type, because a float config field turns 5000 into 5000.0.

  Raises:
    DataConfigError: a negative value, a non-whole count, a count above ``num_train``, or a
      fraction that keeps no image.
  """
  value = float(train_subset or 0)
  num_train = int(num_train)
  if value == 0:
    return num_train
  if not math.isfinite(value) or value < 0:
    raise DataConfigError(f"train_subset={train_subset} is not 0 (all), a fraction in (0, 1] or a "
                          "count of images: fix --config.input.data.train_subset")
  if value <= 1:
    size = int(math.floor(value * num_train + 0.5))
    if size < 1:
      raise DataConfigError(f"train_subset={train_subset} keeps no image of the {num_train} "
                            "training images: raise --config.input.data.train_subset")
    return size
  if value != int(value):
    raise DataConfigError(f"train_subset={train_subset} is above 1 but not a whole number of "
                          "images: give a count, or a fraction in (0, 1]")
  if int(value) > num_train:
    raise DataConfigError(f"train_subset={int(value)} exceeds the {num_train} training images: "
                          "lower --config.input.data.train_subset or give a fraction in (0, 1]")
  return int(value)


def subset_positions(num_train: int, train_subset: Any, subset_seed: int = 0) -> np.ndarray:
  """Sorted positions (into the 'train' split) of the records pretraining uses.

  One ``np.random.Generator(PCG64(subset_seed))`` permutation of ``range(num_train)``; the
  subset is its first `subset_size` entries. Subsets of one seed are therefore nested (10% is
  inside 20%, inside 50%, inside all), and being drawn from the 'train' split they never hold
  a held-out image.
  """
  size = subset_size(num_train, train_subset)
  if size == num_train:
    return np.arange(num_train, dtype=np.int64)
  perm = np.random.Generator(np.random.PCG64(int(subset_seed))).permutation(int(num_train))
  return np.sort(perm[:size]).astype(np.int64)


def split_indices(labels: np.ndarray, split: str, holdout_per_class: int, holdout_seed: int,
                  class_names: Optional[Sequence[str]] = None,
                  where: str = "the data", train_subset: Any = 0,
                  subset_seed: int = 0) -> np.ndarray:
  """Sorted int64 indices of the records in ``split`` ('train', 'eval' or 'pretrain'); see
  `holdout_mask` and, for 'pretrain' (``train_subset`` of 'train'), `subset_positions`."""
  _check_split(split)
  mask = holdout_mask(labels, holdout_per_class, holdout_seed, class_names, where)
  if split == "eval":
    return np.flatnonzero(mask)
  train = np.flatnonzero(~mask)
  if split == "pretrain":
    train = train[subset_positions(train.size, train_subset, subset_seed)]
  return train


def _subset_args(data_cfg: Any) -> dict[str, Any]:
  """The pretraining-subset keys of ``data_cfg`` (absent keys: no subset)."""
  return dict(train_subset=_get(data_cfg, "train_subset", 0),
              subset_seed=int(_get(data_cfg, "subset_seed", 0)))


def has_subset(data_cfg: Any) -> bool:
  """Whether ``data_cfg`` restricts pretraining to a subset ('pretrain' != 'train')."""
  return float(_get(data_cfg, "train_subset", 0) or 0) != 0


def _config_split_indices(data_cfg: Any, labels: np.ndarray, split: str,
                          class_names: Optional[Sequence[str]], where: str) -> np.ndarray:
  """`split_indices` with the hold-out and subset settings of ``data_cfg``."""
  return split_indices(labels, split, _get(data_cfg, "holdout_per_class", 0),
                       _get(data_cfg, "holdout_seed", 0), class_names, where,
                       **_subset_args(data_cfg))


def split_size(data_cfg: Any, split: str) -> int:
  """Records listed in ``split`` without decoding anything (unreadable files included)."""
  _check_split(split)
  name = _get(data_cfg, "name", "embedded")
  if name in ("embedded", "embedded_clips"):
    with np.load(EMBEDDED_PATH, allow_pickle=False) as z:
      labels = z["labels"].astype(np.int32)
    return int(_config_split_indices(data_cfg, labels, split, None, "the embedded set").size)
  if name == "image_folder":
    listing = list_image_folder(_get(data_cfg, "dir"))
    return int(_config_split_indices(data_cfg, listing.labels, split, listing.class_names,
                                     listing.root).size)
  return len(streaming_source(data_cfg, split))


# ----------------------------------------------------------------------------------------------
# Image folders.


@dataclasses.dataclass(frozen=True)
class FolderListing:
  """The files of an image folder ``root/<class>/<file>``.

  Attributes:
    root: absolute folder path.
    files: paths relative to ``root``, grouped by class (classes sorted), sorted within a class.
    labels: int32 [N] class index of each file.
    class_names: sorted class sub-folder names.
    fingerprint: hex digest of the root and the file names.
  """
  root: str
  files: tuple[str, ...]
  labels: np.ndarray
  class_names: tuple[str, ...]
  fingerprint: str


_LISTINGS: dict[str, tuple[tuple[int, ...], FolderListing]] = {}


def _class_dirs(root: str) -> list[str]:
  with os.scandir(root) as it:
    return sorted(e.name for e in it if e.is_dir() and not e.name.startswith("."))


def class_files(root: str, cls: str, extensions: Sequence[str]) -> list[str]:
  """The sorted file names with one of `extensions` (lower case) in `root/cls`, no hidden files."""
  with os.scandir(os.path.join(root, cls)) as it:
    return sorted(e.name for e in it if not e.name.startswith(".")
                  and e.name.lower().endswith(tuple(extensions)) and e.is_file())


def require_path(path: Any, what: str, key: str, expect: str, is_dir: bool = True) -> str:
  """The absolute path of `path`, else a one-line DataNotFoundError naming the config key to
  set: 'no <what> given' / '<what> <path> does not exist: set --config.input.data.<key> to
  <expect>'."""
  if not path:
    raise DataNotFoundError(f"no {what} given: set --config.input.data.{key} to {expect}")
  p = os.path.abspath(os.path.expanduser(os.fspath(path)))
  if not (os.path.isdir(p) if is_dir else os.path.isfile(p)):
    raise DataNotFoundError(f"{what} {p} does not exist: set --config.input.data.{key} to {expect}")
  return p


def list_image_folder(directory: str | os.PathLike) -> FolderListing:
  """Lists an image folder of class sub-folders (one level, image extensions only).

  Listings are memoised per process and refreshed when the folder or a class folder changes
  (their modification times), so repeated calls on ImageNet-sized folders are cheap.

  Raises:
    DataNotFoundError: the folder does not exist.
    DataConfigError: it has no class sub-folders or no images.
  """
  root = require_path(directory, "image folder", "dir", "a folder of class sub-folders")
  classes = _class_dirs(root)
  stamp = tuple([os.stat(root).st_mtime_ns]
                + [os.stat(os.path.join(root, c)).st_mtime_ns for c in classes])
  if root in _LISTINGS and _LISTINGS[root][0] == stamp:
    return _LISTINGS[root][1]
  if not classes:
    raise DataConfigError(f"image folder {root} has no class sub-folders: set "
                          "--config.input.data.dir to a folder laid out as <dir>/<class>/<image>")
  files, labels = [], []
  digest = hashlib.sha1(root.encode())
  for label, name in enumerate(classes):
    for n in class_files(root, name, IMAGE_EXTENSIONS):
      rel = f"{name}/{n}"
      files.append(rel)
      labels.append(label)
      digest.update(f"{rel}\n".encode())
  if not files:
    raise DataConfigError(f"no images ({', '.join(IMAGE_EXTENSIONS)}) found in the class "
                          f"sub-folders of {root}: set --config.input.data.dir to a folder of "
                          "class sub-folders holding images")
  listing = FolderListing(root=root, files=tuple(files), labels=np.asarray(labels, np.int32),
                          class_names=tuple(classes), fingerprint=digest.hexdigest())
  _LISTINGS[root] = (stamp, listing)
  return listing


def _content_key(listing: FolderListing) -> str:
  """Digest of the listing plus every file's size and modification time (the cache key)."""
  digest = hashlib.sha1(listing.fingerprint.encode())
  for rel in listing.files:
    st = os.stat(os.path.join(listing.root, rel))
    digest.update(f"{st.st_size}:{st.st_mtime_ns}\n".encode())
  return digest.hexdigest()


def decode_image(data: bytes) -> np.ndarray:
  """Decodes encoded image bytes to uint8 [H, W, 3] RGB (raises on unreadable data)."""
  from PIL import Image  # pylint: disable=g-import-not-at-top
  with Image.open(io.BytesIO(data)) as im:
    return np.asarray(im.convert("RGB"), dtype=np.uint8)


def _decode_files(paths: Sequence[str]) -> list[Any]:
  """Decodes files; an unreadable one gives its error message (a str) instead of an array."""
  out = []
  for p in paths:
    try:
      with open(p, "rb") as f:
        out.append(decode_image(f.read()))
    except Exception as e:  # pylint: disable=broad-except
      out.append(f"{type(e).__name__}: {e}".splitlines()[0] if str(e) else type(e).__name__)
  return out


def _decode_many(paths: Sequence[str]) -> list[Any]:
  """`_decode_files`, with a pool of spawned processes for many files on a multi-core host."""
  cores = os.cpu_count() or 1
  if len(paths) < _POOL_MIN_FILES or cores < 2:
    return _decode_files(paths)
  workers = min(cores, 16)
  chunk = max(256, len(paths) // (workers * 8))
  chunks = [paths[i:i + chunk] for i in range(0, len(paths), chunk)]
  # spawn, not fork: the parent may already run JAX's threads.
  ctx = multiprocessing.get_context("spawn")
  with concurrent.futures.ProcessPoolExecutor(workers, mp_context=ctx) as pool:
    out = []
    for part in pool.map(_decode_files, chunks):
      out.extend(part)
  return out


def _cache_dir(data_cfg: Any) -> pathlib.Path:
  return pathlib.Path(os.path.expanduser(_get(data_cfg, "cache_dir", "~/.cache/mim_jax")))


def _log_skipped(where: str, files: Sequence[str], errors: Sequence[str]) -> None:
  if files:
    logging.warning("skipped %d unreadable image file(s) in %s, e.g. %s (%s)",
                    len(files), where, files[0], errors[0])


def _decode_folder(listing: FolderListing, cache_dir: pathlib.Path) -> dict[str, np.ndarray]:
  """Decodes every file of ``listing`` once; cached as ``<cache_dir>/folder-<key>.npz``, keyed
  by the folder path, the file names and the files' sizes and modification times.

  Returns arrays ``images`` [M,H,W,3] and ``file_index`` [M] (the readable files' indices in
  ``listing.files``), plus ``bad_index`` (the unreadable ones).
  """
  key = _content_key(listing)
  memo = _DECODED.get(listing.root)
  if memo is not None and memo[0] == key:
    return memo[1]
  cache = cache_dir / f"folder-{key[:20]}.npz"
  if cache.is_file():
    try:
      with np.load(cache, allow_pickle=False) as z:
        out = {k: z[k] for k in ("images", "file_index", "bad_index")}
      _remember(listing.root, key, out)
      return out
    except Exception as e:  # pylint: disable=broad-except
      logging.warning("ignoring unreadable decode cache %s (%s)", cache, e)
  logging.info("decoding %d images of %s (cached afterwards in %s)", len(listing.files),
               listing.root, cache)
  decoded = _decode_many([os.path.join(listing.root, f) for f in listing.files])
  good = [i for i, d in enumerate(decoded) if isinstance(d, np.ndarray)]
  bad = [i for i, d in enumerate(decoded) if not isinstance(d, np.ndarray)]
  _log_skipped(listing.root, [listing.files[i] for i in bad], [decoded[i] for i in bad])
  if not good:
    raise DataConfigError(f"none of the {len(decoded)} image files in {listing.root} could be "
                          "decoded: set --config.input.data.dir to a folder of readable images")
  shape = decoded[good[0]].shape
  for i in good:
    if decoded[i].shape != shape:
      raise DataConfigError(
          f"images in {listing.root} differ in size ({shape[1]}x{shape[0]} for "
          f"{listing.files[good[0]]}, {decoded[i].shape[1]}x{decoded[i].shape[0]} for "
          f"{listing.files[i]}): resize them to one size, or stream them with "
          "--config.input.data.in_memory=False")
  out = dict(images=np.stack([decoded[i] for i in good]),
             file_index=np.asarray(good, np.int64), bad_index=np.asarray(bad, np.int64))
  try:
    cache_dir.mkdir(parents=True, exist_ok=True)
    tmp = cache.with_name(f"{cache.stem}.{os.getpid()}.{threading.get_ident()}.tmp.npz")
    np.savez(tmp, **out)
    os.replace(tmp, cache)
  except OSError as e:
    logging.warning("could not write the decode cache %s (%s); decoding again next time", cache, e)
  _remember(listing.root, key, out)
  return out


# The last decoded folder, per process: loaders, eval and size queries share one copy.
_DECODED: dict[str, tuple[str, dict[str, np.ndarray]]] = {}


def _remember(root: str, key: str, decoded: dict[str, np.ndarray]) -> None:
  _readonly(*decoded.values())
  _DECODED.clear()
  _DECODED[root] = (key, decoded)


def _readonly(*arrays: np.ndarray) -> None:
  for a in arrays:
    a.flags.writeable = False


def _load_image_folder(data_cfg: Any, split: str) -> InMemoryData:
  listing = list_image_folder(_get(data_cfg, "dir"))
  select = _config_split_indices(data_cfg, listing.labels, split, listing.class_names,
                                 listing.root)
  decoded = _decode_folder(listing, _cache_dir(data_cfg))
  in_split = np.zeros(len(listing.files), bool)
  in_split[select] = True
  rows = np.flatnonzero(in_split[decoded["file_index"]])
  images = decoded["images"][rows]
  labels = listing.labels[decoded["file_index"][rows]].astype(np.int32)
  num_skipped = int(in_split[decoded["bad_index"]].sum())
  _readonly(images, labels)
  return InMemoryData(images, labels, list(listing.class_names), num_skipped)


# ----------------------------------------------------------------------------------------------
# The embedded CIFAR-10 subset.


def read_embedded(path: str | os.PathLike = EMBEDDED_PATH
                  ) -> tuple[list[bytes], np.ndarray, list[str]]:
  """Reads the embedded npz: (encoded JPEGs, int32 labels, class names), in stored order."""
  with np.load(path, allow_pickle=False) as z:
    data, offsets = z["jpeg_bytes"], z["offsets"]
    labels = z["labels"].astype(np.int32)
    class_names = [str(c) for c in z["class_names"]]
  blobs = [data[offsets[i]:offsets[i + 1]].tobytes() for i in range(len(labels))]
  return blobs, labels, class_names


_EMBEDDED_CACHE: dict[tuple[str, int], tuple[np.ndarray, np.ndarray, list[str], np.ndarray]] = {}


def _decoded_embedded() -> tuple[np.ndarray, np.ndarray, list[str], np.ndarray]:
  """Decoded embedded set, memoised per process: (images, labels, class names, ok mask)."""
  if not EMBEDDED_PATH.is_file():
    raise DataNotFoundError(f"{EMBEDDED_PATH} is missing: reinstall mim_jax, or rebuild it with "
                            "tools/build_embedded.py")
  key = (str(EMBEDDED_PATH), EMBEDDED_PATH.stat().st_mtime_ns)
  if key not in _EMBEDDED_CACHE:
    blobs, labels, class_names = read_embedded(EMBEDDED_PATH)
    decoded = []
    for b in blobs:
      try:
        decoded.append(decode_image(b))
      except Exception:  # pylint: disable=broad-except
        decoded.append(None)
    ok = np.asarray([d is not None for d in decoded])
    images = np.stack([d for d in decoded if d is not None])
    _readonly(images, labels)
    _EMBEDDED_CACHE.clear()
    _EMBEDDED_CACHE[key] = (images, labels, class_names, ok)
  return _EMBEDDED_CACHE[key]


def embedded_rows(data_cfg: Any, split: str,
                  where: str = "the embedded set") -> tuple[np.ndarray, np.ndarray, list[str], int]:
  """``split`` of the embedded set (the hold-out and subset settings of ``data_cfg``): (its
  positions among the decodable images, their labels, the class names, the number of the
  split's images that could not be decoded and are left out)."""
  _, labels, class_names, ok = _decoded_embedded()
  select = _config_split_indices(data_cfg, labels, split, class_names, where)
  in_split = np.zeros(labels.shape[0], bool)
  in_split[select] = True
  rows = np.flatnonzero(in_split[ok])
  return rows, labels[ok][rows], list(class_names), int((in_split & ~ok).sum())


def _load_embedded(data_cfg: Any, split: str) -> InMemoryData:
  rows, labels, class_names, skipped = embedded_rows(data_cfg, split)
  images = _decoded_embedded()[0][rows]
  _readonly(images, labels)
  return InMemoryData(images, labels, class_names, skipped)


def _load_embedded_clips(data_cfg: Any, split: str) -> InMemoryData:
  from mim_jax.data import video  # pylint: disable=g-import-not-at-top  (video imports this module)
  num_frames = int(_get(data_cfg, "num_frames", 8))
  if num_frames < 1:
    raise DataConfigError(f"input.data.num_frames={num_frames}: set it to the clip length, >= 1")
  rows, labels, class_names, skipped = embedded_rows(data_cfg, split, "the embedded clip set")
  clips = video.embedded_clip_rows(rows, num_frames)
  _readonly(clips, labels)
  return InMemoryData(clips, labels, class_names, skipped)


def load_in_memory(data_cfg: Any, split: str) -> InMemoryData:
  """Decodes a whole split into memory.

  Args:
    data_cfg: ``name`` 'embedded', 'embedded_clips' or 'image_folder'; ``dir`` (image_folder);
      ``holdout_per_class``, ``holdout_seed``; optional ``cache_dir`` (default ~/.cache/mim_jax),
      where a decoded image folder is cached so that the next load is fast.
    split: 'train', 'eval' or 'pretrain' (``train_subset`` of 'train').

  Raises:
    DataError: with a one-line message naming the fix.
  """
  _check_split(split)
  name = _get(data_cfg, "name", "embedded")
  if name == "embedded":
    return _load_embedded(data_cfg, split)
  if name == "embedded_clips":
    return _load_embedded_clips(data_cfg, split)
  if name == "image_folder":
    return _load_image_folder(data_cfg, split)
  raise DataConfigError(f"data source {name!r} cannot be loaded into memory: set "
                        "--config.input.data.name to 'embedded', 'embedded_clips' or "
                        "'image_folder', or stream it with --config.input.data.in_memory=False")


# ----------------------------------------------------------------------------------------------
# Streaming sources (random access, decoded later in grain workers).


class ImageFolderSource:
  """Random-access source over image files: ``source[i] -> {'image_bytes', 'label'}``.

  Stores the relative paths as one bytes blob plus offsets, so pickling it to grain worker
  processes stays cheap for ImageNet-sized folders.
  """

  def __init__(self, root: str, files: Sequence[str], labels: np.ndarray,
               class_names: Sequence[str], tag: str = ""):
    encoded = [f.encode() for f in files]
    self.root = root
    self.class_names = list(class_names)
    self._blob = b"".join(encoded)
    self._offsets = np.concatenate([[0], np.cumsum([len(e) for e in encoded])]).astype(np.int64)
    self._labels = np.asarray(labels, np.int32)
    self._tag = tag

  def __len__(self) -> int:
    return int(self._labels.shape[0])

  def path(self, index: int) -> str:
    """Absolute path of record ``index``."""
    rel = self._blob[self._offsets[index]:self._offsets[index + 1]].decode()
    return os.path.join(self.root, rel)

  def __getitem__(self, index: int) -> dict[str, Any]:
    index = int(index)
    if not 0 <= index < len(self):
      raise IndexError(f"record {index} out of range [0, {len(self)})")
    with open(self.path(index), "rb") as f:
      return {"image_bytes": f.read(), "label": int(self._labels[index])}

  def __repr__(self) -> str:
    # Deterministic: grain compares it when restoring an iterator state.
    return f"ImageFolderSource(root={self.root!r}, num_records={len(self)}, tag={self._tag!r})"


def image_folder_source(data_cfg: Any, split: str) -> ImageFolderSource:
  """The streaming source of ``split`` of the image folder ``data_cfg.dir`` (same hold-out)."""
  listing = list_image_folder(_get(data_cfg, "dir"))
  select = _config_split_indices(data_cfg, listing.labels, split, listing.class_names,
                                 listing.root)
  if split == "pretrain" and not has_subset(data_cfg):
    split = "train"   # the same records, and the same repr as before subsets existed
  tag = f"{split}:{_get(data_cfg, 'holdout_per_class', 0)}:{_get(data_cfg, 'holdout_seed', 0)}"
  if split == "pretrain":
    tag += f":subset={_get(data_cfg, 'train_subset', 0)}:{_get(data_cfg, 'subset_seed', 0)}"
  return ImageFolderSource(listing.root, [listing.files[i] for i in select],
                           listing.labels[select], listing.class_names,
                           tag=f"{tag}:{listing.fingerprint[:12]}")


class TfdsSource:
  """Wraps a ``tfds.data_source`` and normalises its records.

  Records become ``{'image_bytes': bytes, 'label': int}`` when images are left encoded
  (``decode=False``, the default: TFDS's ``SkipDecoding``), else ``{'image': uint8 [H,W,C],
  'label': int}``. A record without a label gets -1.
  """

  def __init__(self, source: Any, name: str, split: str, data_dir: Optional[str], decode: bool):
    self._source = source
    self._desc = (f"TfdsSource(name={name!r}, split={split!r}, data_dir={data_dir!r}, "
                  f"decode={decode})")
    self.class_names: Optional[list[str]] = None
    try:
      self.class_names = list(source.dataset_info.features["label"].names)
    except (AttributeError, KeyError, TypeError):
      pass

  def __len__(self) -> int:
    return len(self._source)

  def __getitem__(self, index: int) -> dict[str, Any]:
    record = self._source[int(index)]
    image = record["image"]
    label = int(np.asarray(record.get("label", -1)))
    if isinstance(image, (bytes, np.bytes_)):
      return {"image_bytes": bytes(image), "label": label}
    return {"image": np.asarray(image), "label": label}

  def __repr__(self) -> str:
    return self._desc


def tfds_source(name: str, split: str, data_dir: Optional[str] = None, *,
                decode: bool = False) -> TfdsSource:
  """A random-access TFDS source (array_record files; TensorFlow is not needed).

  Args:
    name: TFDS builder name, e.g. 'imagenet2012'.
    split: TFDS split name, e.g. 'train' or 'validation[:1000]'.
    data_dir: TFDS data directory (None = TFDS's default).
    decode: decode images in TFDS (True) or hand the encoded bytes on (False, cheaper: the
      pipeline decodes them in its workers and can skip corrupt ones).
  """
  import tensorflow_datasets as tfds  # pylint: disable=g-import-not-at-top
  decoders = None if decode else {"image": tfds.decode.SkipDecoding()}
  try:
    source = tfds.data_source(name, split=split, data_dir=data_dir or None, decoders=decoders,
                              download=False)
  except Exception as e:  # pylint: disable=broad-except
    first = (str(e).strip().splitlines() or [type(e).__name__])[0][:200]
    raise DataNotFoundError(
        f"TFDS dataset {name!r} split {split!r} could not be opened ({first}): prepare it in "
        "array_record format and set --config.input.data.dir to its TFDS data_dir") from e
  return TfdsSource(source, name, split, data_dir, decode)


class SubsetSource:
  """Records ``positions`` (sorted) of a random-access source: a TFDS 'pretrain' subset."""

  def __init__(self, source: Any, positions: np.ndarray, desc: str):
    self._source = source
    self._positions = np.asarray(positions, np.int64)
    self._desc = desc
    self.class_names = getattr(source, "class_names", None)

  def __len__(self) -> int:
    return int(self._positions.shape[0])

  def __getitem__(self, index: int) -> Any:
    return self._source[int(self._positions[int(index)])]

  def __repr__(self) -> str:
    return f"SubsetSource({self._source!r}, {len(self)}, {self._desc})"


def streaming_source(data_cfg: Any, split: str, *, decode: bool = False) -> Any:
  """The random-access source of ``split`` for a streaming config (image_folder, tfds, or the
  videos of video_csv / video_folder: `video.clip_source`)."""
  _check_split(split)
  name = _get(data_cfg, "name", "embedded")
  if name == "image_folder":
    return image_folder_source(data_cfg, split)
  if name == "tfds" and split == "pretrain":
    train = streaming_source(data_cfg, "train", decode=decode)
    if not has_subset(data_cfg):
      return train
    args = _subset_args(data_cfg)
    return SubsetSource(train, subset_positions(len(train), **args),
                        f"train_subset={args['train_subset']}, subset_seed={args['subset_seed']}")
  if name == "tfds":
    tfds_name = _get(data_cfg, "tfds_name")
    if not tfds_name:
      raise DataConfigError("data.name='tfds' needs a dataset name: set "
                            "--config.input.data.tfds_name, e.g. imagenet2012")
    tfds_split = _get(data_cfg, "train_split" if split == "train" else "eval_split",
                      "train" if split == "train" else "validation")
    return tfds_source(tfds_name, tfds_split, _get(data_cfg, "dir"), decode=decode)
  if name in ("video_csv", "video_folder"):
    from mim_jax.data import video  # pylint: disable=g-import-not-at-top  (video imports sources)
    return video.clip_source(data_cfg, split)
  raise DataConfigError(f"data source {name!r} cannot be streamed: set "
                        "--config.input.data.name to 'image_folder', 'tfds', 'video_csv' or "
                        "'video_folder', or use "
                        "--config.input.data.in_memory=True")


def is_in_memory(data_cfg: Any) -> bool:
  """Whether ``data_cfg`` selects in-memory data (embedded, or an image folder with in_memory)."""
  name = _get(data_cfg, "name", "embedded")
  if name in ("embedded", "embedded_clips"):
    return True
  if name in ("tfds", "video_csv", "video_folder"):
    return False
  return bool(_get(data_cfg, "in_memory", True))
