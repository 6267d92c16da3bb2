"""Grain input pipelines: the checkpointable training loader and one-pass evaluation batches.

A batch's way from the source to the step, one module per stop:

  sources.py    the datasets (embedded, image folders, tfds), splits, hold-outs, subsets;
  records.py    random-access record sources for grain: permuted, subset, decoded or
                header-checked, unreadable records replaced by the next readable one;
  host_crop.py  decode + RandomResizedCrop + flip in the grain workers (training), resize +
                centre crop (evaluation);
  regions.py    ``input.device_resize``: decoded regions packed for a resize on the device;
  pipeline.py   (here) the loaders: grain's sampler, workers and batching, the per-process
                slice of the global batch, checkpointable positions, evaluation batches;
  preprocess.py the step's first op on the device: the in-memory crop + flip, normalisation.

Two modes, chosen by the data config (`sources.is_in_memory`):

* In memory (the embedded set, its clips, image folders with ``in_memory=True``): grain samples record
  indices (shuffled, checkpointable; every process slices its part of each global index
  batch, so batches do not depend on the process count) and the loader gathers the stored
  images, e.g. 32x32 (clips of 'embedded_clips': uint8 [T, 32, 32, 3] each, the batch
  [B, T, 32, 32, 3] under the same 'image' key). Augmentation happens on the device afterwards
  (`augment`, one crop and flip per clip): ``loader.on_device_aug`` is True.
* Streamed video files (``video_csv``, ``video_folder``): grain workers decode one clip per
  video with the config's temporal sampling and crop it once per clip (`video.HostReadClip`),
  so batches are uint8 [B, T, S, S, 3]; evaluation reads each video's central test clip
  (`video.HostEvalClip`). Unreadable videos are skipped and counted in ``'bad'`` as below.
* Streaming (image folders with ``in_memory=False``, TFDS): grain worker processes read,
  decode, RandomResizedCrop (bicubic, antialiased) and flip each record on the host
  (`host_crop`), so batches already have ``image_size``; ``loader.on_device_aug`` is False.
  A record that cannot be read or decoded is replaced by the next readable one (i+1, i+2,
  ...) and the number skipped is reported in the batch's ``'bad'`` field (`records`). With
  ``device_resize`` > 0 the workers stop short of the bicubic resize (`regions`).

Every batch carries ``'image'``, ``'label'``, ``'bad'`` and ``'index'`` (each example's position in
the pretraining split, the same for any process count and epoch: memory banks write there).

Training reads the 'pretrain' split: the training split, or its nested ``data.train_subset``
(see `sources.subset_positions`); `steps_per_epoch` counts that split. `eval_batches` serves
any split: evaluators read 'train' and 'eval', the held-out-loss evaluator also 'pretrain'
(the very images the model was trained on).

Config keys (``input_cfg``): ``data`` (see `sources`, plus ``in_memory``), ``batch_size``
(global), ``image_size``, ``workers``, ``aug`` = {``crop_scale``, ``crop_ratio``, ``hflip``,
``video_crop``, ``num_sample``},
``fast_decode`` (default True; False: full decode, then crop), ``read_threads`` and
``read_buffer`` (streaming: grain's reader threads and prefetch buffer in each worker; default
2 and 16), ``device_resize`` and ``device_resize_budget`` (streaming, default 0: off; the
largest region side, and the packed pixels per image, default half the square).

Repeated augmentation (``aug.num_sample`` = n > 1, SlowFast's AUG.NUM_SAMPLE and VideoMAE's
``--num_sample``): each record read gives n independently augmented examples, side by side
in the batch (their `multiple_samples_collate`), so a batch of ``batch_size`` examples holds
``batch_size / n`` records and an epoch (`steps_per_epoch`) is ``records // (batch_size / n)``
steps. Streamed video decodes the clip once and crops it n times (`video.HostReadClip`);
in-memory data repeats each index n times and the device draws a crop for each copy. Streamed
images have no repeats (a DataConfigError).

grain is imported inside functions so importing this module stays cheap.
"""
from __future__ import annotations

from typing import Any, Iterator, Optional, Sequence

import numpy as np

from mim_jax.data import sources, video
from mim_jax.data.host_crop import (CropSpec, HostCenterCrop, HostDecodeRandomResizedCropFlip,
                                    HostMultiCrop, HostRandomResizedCropFlip)
from mim_jax.data.records import DecodedSource, HeaderCheckedSource, _IndexSource, _Permuted, _Subset
from mim_jax.data.regions import HostDecodeRegion, PackRegions
from mim_jax.data.sources import DataConfigError


def _grain(workers: int = 0):
  """Imports grain and registers this module's duck-typed transforms with its ABCs.

  grain's worker processes read absl flags; outside an absl app (tests, notebooks) the flags
  are unparsed, so with ``workers > 0`` they are marked parsed, keeping their defaults.
  """
  import grain  # pylint: disable=g-import-not-at-top
  if workers > 0:
    from absl import flags  # pylint: disable=g-import-not-at-top
    if not flags.FLAGS.is_parsed():
      flags.FLAGS.mark_as_parsed()
  grain.transforms.RandomMap.register(HostRandomResizedCropFlip)
  grain.transforms.RandomMap.register(HostMultiCrop)
  grain.transforms.RandomMap.register(HostDecodeRandomResizedCropFlip)
  grain.transforms.Map.register(HostCenterCrop)
  grain.transforms.RandomMap.register(video.HostReadClip)
  grain.transforms.Map.register(video.HostEvalClip)
  return grain


# ----------------------------------------------------------------------------------------------
# Training loader.


def _get(cfg: Any, key: str, default: Any = None) -> Any:
  return sources._get(cfg, key, default)  # pylint: disable=protected-access


def _process_index_and_count(process_index: Optional[int], process_count: Optional[int]
                             ) -> tuple[int, int]:
  if process_index is None or process_count is None:
    import jax  # pylint: disable=g-import-not-at-top
    process_index = jax.process_index() if process_index is None else process_index
    process_count = jax.process_count() if process_count is None else process_count
  return int(process_index), int(process_count)


class TrainLoader:
  """An endless iterator of local training batches with checkpointable state.

  Yields ``{'image': uint8 [local_batch, H, W, 3], 'label': int32 [local_batch],
  'bad': int32 [local_batch], 'index': int32 [local_batch]}``; 'index' is each example's
  position in the pretraining split (the record actually read, after any skip), the same for
  any process count and epoch (memory banks write there). ``get_state()`` / ``set_state(state)`` (bytes) save and
  restore the position; they and ``start_prefetch()`` make the loader usable directly as the
  item of ``grain.checkpoint.CheckpointSave`` / ``CheckpointRestore``.

  Attributes:
    on_device_aug: True when images are the stored ones and must be augmented on the device.
    image_shape: (H, W, 3) of the yielded images ((T, H, W, 3) for clips; {name: (count, S,
      S, 3)} for host views).
    local_batch_size, global_batch_size: per process / over all processes.
    num_records: records of the pretraining split (all processes): the training split or its
      ``data.train_subset``.
    steps_per_epoch: ``num_records // (global_batch_size // num_sample)``.
    class_names: class index -> name (None when unknown).
    num_sample: examples per record read (repeated augmentation; 1: none). The copies of a
      record stand side by side in the batch (rows r*n .. r*n+n-1).
  """

  def __init__(self, data_loader: Any, *, on_device_aug: bool, images: Optional[np.ndarray],
               labels: Optional[np.ndarray], image_shape: tuple[int, int, int],
               local_batch_size: int, global_batch_size: int, num_records: int,
               class_names: Optional[list[str]], index_slice: slice = slice(None),
               num_sample: int = 1):
    self._data_loader = data_loader
    self._index_slice = index_slice
    self._iterator = iter(data_loader)
    self._images = images
    self._labels = labels
    self.on_device_aug = on_device_aug
    self.image_shape = image_shape
    self.local_batch_size = local_batch_size
    self.global_batch_size = global_batch_size
    self.num_records = num_records
    self.num_sample = int(num_sample)
    self.steps_per_epoch = num_records // (global_batch_size // self.num_sample)
    self.class_names = class_names

  def __iter__(self) -> "TrainLoader":
    return self

  def __next__(self) -> dict[str, np.ndarray]:
    batch = next(self._iterator)
    if self._images is None:
      if self.num_sample > 1:   # [records, n, ...] -> [records * n, ...], copies side by side
        batch = {k: v.reshape((-1,) + v.shape[2:]) for k, v in batch.items()}
      out = {"image": batch["image"], "label": batch["label"].astype(np.int32),
             "bad": batch["bad"].astype(np.int32), "index": batch["index"].astype(np.int32)}
      if "offset" in batch:   # input.device_resize: what the step needs to resample the regions
        out.update({k: batch[k] for k in ("offset", "box", "valid", "flip", "host_resized")})
      return out
    index = np.repeat(np.asarray(batch)[self._index_slice], self.num_sample)
    return {"image": self._images[index], "label": self._labels[index],
            "bad": np.zeros(index.shape[0], np.int32), "index": index.astype(np.int32)}

  def get_state(self) -> bytes:
    """The iterator position (grain's JSON state, bytes)."""
    return self._iterator.get_state()

  def set_state(self, state: bytes) -> None:
    """Continues from a position returned by `get_state` (same config and worker count)."""
    self._iterator.set_state(state)

  def start_prefetch(self) -> None:
    """Starts producing batches in the background (no-op without workers)."""
    if hasattr(self._iterator, "start_prefetch"):
      self._iterator.start_prefetch()

  @property
  def grain_iterator(self) -> Any:
    """The underlying ``grain.DataLoaderIterator``."""
    return self._iterator


def _local_batch(input_cfg: Any, process_count: int) -> tuple[int, int]:
  global_batch = int(input_cfg.batch_size)
  if global_batch <= 0 or global_batch % process_count:
    raise DataConfigError(
        f"--config.input.batch_size={global_batch} is not a positive multiple of the "
        f"{process_count} processes: set it to a multiple of {process_count}")
  return global_batch, global_batch // process_count


def num_sample(input_cfg: Any, process_count: int = 1) -> int:
  """``input.aug.num_sample`` (default 1), checked: a whole number >= 1 dividing each
  process's batch."""
  n = _get(_get(input_cfg, "aug", {}) or {}, "num_sample", 1)
  batch = int(input_cfg.batch_size)
  if not isinstance(n, int) or n < 1 or (batch // max(int(process_count), 1)) % n:
    raise DataConfigError(f"--config.input.aug.num_sample={n!r}: use a whole number >= 1 that "
                          f"divides the batch of each of the {process_count} processes "
                          f"({batch // max(int(process_count), 1)})")
  return n


def _aug(input_cfg: Any) -> tuple[tuple[float, float], tuple[float, float], bool, str]:
  """(crop scale, crop ratio, hflip, video crop) of ``input.aug``, with their defaults."""
  aug = _get(input_cfg, "aug", {}) or {}
  scale = tuple(_get(aug, "crop_scale", (0.2, 1.0)))
  ratio = tuple(_get(aug, "crop_ratio", (3 / 4, 4 / 3)))
  return (scale, ratio, bool(_get(aug, "hflip", True)),
          str(_get(aug, "video_crop", "random_resized")))


def make_train_loader(input_cfg: Any, *, seed: int, process_index: Optional[int] = None,
                      process_count: Optional[int] = None, device_groups: int = 1,
                      views: Optional[Sequence[CropSpec]] = None) -> TrainLoader:
  """Builds this process's endless, shuffled training loader.

  Args:
    input_cfg: the ``input`` config (see the module docstring).
    seed: shuffling seed (and, when streaming, the per-record augmentation seed).
    process_index, process_count: this process's data shard; default: JAX's.
    device_groups: with ``input.device_resize``, the devices this process feeds (the packed
      regions come in one row per device).
    views: the training views a method declares (`Method.train_views`): streamed data then
      yields ``'image'`` as {name: uint8 [local_batch, count, size, size, 3]}, each view cut
      from the decoded image on the host (`HostMultiCrop`); in-memory data ignores them (the
      method cuts its views on the device from the stored images).

  Raises:
    DataError: bad batch size, data smaller than one batch, or bad data (one-line message).
  """
  workers = int(_get(input_cfg, "workers", 0))
  grain = _grain(workers)
  process_index, process_count = _process_index_and_count(process_index, process_count)
  global_batch, local_batch = _local_batch(input_cfg, process_count)
  repeats = num_sample(input_cfg, process_count)
  global_records, local_records = global_batch // repeats, local_batch // repeats
  data_cfg = input_cfg.data
  seed = int(seed) % (2**31)
  in_memory = sources.is_in_memory(data_cfg)

  images = labels = class_names = None
  num_skipped = 0
  if in_memory:
    data = sources.load_in_memory(data_cfg, "pretrain")
    images, labels, class_names = data.images, data.labels, data.class_names
    num_skipped = int(data.num_skipped)
    tag = f"{_get(data_cfg, 'name')}:train"   # unchanged without a subset: old states restore
    if sources.has_subset(data_cfg):
      tag += (f":subset={_get(data_cfg, 'train_subset', 0)}"
              f":seed={_get(data_cfg, 'subset_seed', 0)}")
    source = _Permuted(_IndexSource(len(data), tag), seed)
    image_shape = tuple(images.shape[1:])
    # Every process walks the same global order of index batches and keeps its own slice of
    # each (indices are cheap): the global batch of step s is then the same for any number of
    # processes, so a 2-process run equals a 1-process run.
    operations = [grain.transforms.Batch(global_records, drop_remainder=True)]
    read_options = grain.ReadOptions(num_threads=0, prefetch_buffer_size=0)
  else:
    raw = sources.streaming_source(data_cfg, "pretrain")
    class_names = getattr(raw, "class_names", None)
    size = int(input_cfg.image_size)
    image_shape = (size, size, 3)
    scale, ratio, hflip, video_crop = _aug(input_cfg)
    batch_fn = None
    canvas = int(_get(input_cfg, "device_resize", 0))
    if isinstance(raw, video.ClipSource):
      if views or canvas:
        raise DataConfigError("streamed video gives one clip per record, cut on the host: this "
                              "method's several views and input.device_resize are image-only "
                              "(set --config.input.device_resize=0; train it on images)")
      source = _Permuted(raw, seed)
      crop = video.HostReadClip(raw.reader, size, video_crop, scale, ratio, hflip, repeats)
      image_shape = (raw.reader.num_frames, size, size, 3)
    elif repeats > 1:
      raise DataConfigError(f"--config.input.aug.num_sample={repeats}: repeated augmentation "
                            "is for streamed video and in-memory data, not streamed images: "
                            "set it to 1")
    elif views:
      if canvas:
        raise DataConfigError("input.device_resize resamples one crop per image; this method "
                              "declares several views (cut on the host): set "
                              "--config.input.device_resize=0")
      source = _Permuted(DecodedSource(raw), seed)
      crop = HostMultiCrop(tuple(views))
      image_shape = {v.name: (int(v.count), int(v.size), int(v.size), 3) for v in views}
    elif canvas:
      if canvas < size:
        raise DataConfigError(f"input.device_resize={canvas} is smaller than input.image_size="
                              f"{size}: use 0 (off) or a canvas of at least {size} pixels")
      source = _Permuted(HeaderCheckedSource(raw), seed)
      crop = HostDecodeRegion(size, scale, ratio, hflip, canvas)
      budget = int(_get(input_cfg, "device_resize_budget", 0)) or canvas * canvas // 2
      batch_fn = PackRegions(int(device_groups), size, canvas, max(budget, size * size))
    elif bool(_get(input_cfg, "fast_decode", True)):
      source = _Permuted(HeaderCheckedSource(raw), seed)
      crop = HostDecodeRandomResizedCropFlip(size, scale, ratio, hflip)
    else:
      source = _Permuted(DecodedSource(raw), seed)
      crop = HostRandomResizedCropFlip(size, scale, ratio, hflip)
    operations = [crop, grain.transforms.Batch(local_records, drop_remainder=True,
                                               batch_fn=batch_fn)]
    read_options = grain.ReadOptions(num_threads=int(_get(input_cfg, "read_threads", 2)),
                                     prefetch_buffer_size=int(_get(input_cfg, "read_buffer", 16)))

  num_records = len(source)
  if num_records // process_count < local_records:
    raise DataConfigError(
        f"the training split has {num_records} records, fewer than one batch of {global_records} "
        f"({local_records} on each of {process_count} processes): lower --config.input.batch_size "
        "or use more data (a larger --config.input.data.train_subset, if set)")
  if in_memory:
    shard = grain.sharding.ShardOptions(0, 1, drop_remainder=True)
  else:
    shard = grain.sharding.ShardOptions(process_index, process_count, drop_remainder=True)
  sampler = grain.samplers.IndexSampler(num_records, shard_options=shard, shuffle=True,
                                        seed=seed, num_epochs=None)
  loader = grain.DataLoader(data_source=source, sampler=sampler, operations=operations,
                            worker_count=workers, shard_options=shard,
                            read_options=read_options)
  train_loader = TrainLoader(loader, on_device_aug=in_memory, images=images, labels=labels,
                     image_shape=image_shape, local_batch_size=local_batch,
                     global_batch_size=global_batch, num_records=num_records,
                     class_names=class_names, num_sample=repeats,
                     index_slice=slice(process_index * local_records,
                                       (process_index + 1) * local_records))
  train_loader.num_skipped = num_skipped  # unreadable files skipped while decoding (in memory)
  return train_loader


def checkpoint_args_save(loader_iterator: Any) -> Any:
  """``grain.checkpoint.CheckpointSave`` for a `TrainLoader` (or a grain iterator); use it as
  one item of ``orbax.checkpoint.args.Composite``."""
  return _grain().checkpoint.CheckpointSave(loader_iterator)


def checkpoint_args_restore(loader_iterator: Any) -> Any:
  """``grain.checkpoint.CheckpointRestore``: restores the saved position into
  ``loader_iterator`` in place."""
  return _grain().checkpoint.CheckpointRestore(loader_iterator)


# ----------------------------------------------------------------------------------------------
# Evaluation and sizes.


def _resize_images(images: np.ndarray, size: int) -> np.ndarray:
  """Resizes a batch of uint8 images [B, H, W, 3] (or clips [B, T, H, W, 3], frame by frame)
  to size x size (bicubic); unchanged if already that size."""
  if images.shape[-3] == size and images.shape[-2] == size:
    return images
  from PIL import Image  # pylint: disable=g-import-not-at-top
  frames = images.reshape((-1,) + images.shape[-3:])
  out = np.stack([np.asarray(Image.fromarray(im).resize((size, size), Image.Resampling.BICUBIC))
                  for im in frames])
  return out.reshape(images.shape[:-3] + out.shape[1:])


def _eval_indices(num_records: int, max_examples: Optional[int]) -> np.ndarray:
  """All records, or a fixed seeded subset of ``max_examples`` of them kept in stored order
  (so a subset of a class-sorted split still spans the classes)."""
  if max_examples is None or max_examples >= num_records:
    return np.arange(num_records)
  rng = np.random.Generator(np.random.PCG64(0))
  return np.sort(rng.permutation(num_records)[:max(int(max_examples), 0)])


def eval_batches(input_cfg: Any, split: str, batch_size: int,
                 max_examples: Optional[int] = None,
                 views: bool = False) -> Iterator[tuple[np.ndarray, np.ndarray]]:
  """Yields ``(images uint8 [b, S, S, 3] (clips: [b, T, S, S, 3]), labels int32 [b])`` once
  over ``split`` ('train', 'eval' or 'pretrain') in a fixed order; the last batch may be smaller.
  S = ``input_cfg.image_size``. With ``max_examples``, a fixed seeded subset of that many
  records (in stored order) is used.

  In memory: the stored images, resized to S when their size differs (no crop). Streaming:
  shorter side resized to S / 0.875, then the central S x S (unreadable records are replaced
  by the next readable one). Streamed video: each video's central test clip (`video.HostEvalClip`);
  with ``views``, all of ``input.data.test_views`` (VideoMAE's multi-view test): images
  uint8 [b, V, T, S, S, 3].
  """
  batch_size = int(batch_size)
  if batch_size <= 0:
    raise DataConfigError(f"eval batch size {batch_size} must be positive")
  size = int(input_cfg.image_size)
  data_cfg = input_cfg.data
  if sources.is_in_memory(data_cfg):
    if views:
      raise DataConfigError("the multi-view test reads streamed video (input.data.name="
                            "'video_csv' or 'video_folder'), not in-memory data")
    data = sources.load_in_memory(data_cfg, split)
    index = _eval_indices(len(data), max_examples)
    for start in range(0, index.shape[0], batch_size):
      rows = index[start:start + batch_size]
      yield _resize_images(data.images[rows], size), data.labels[rows]
    return

  workers = int(_get(input_cfg, "workers", 0))
  grain = _grain(workers)
  source: Any = sources.streaming_source(data_cfg, split)
  view: Any = HostCenterCrop(size)
  if isinstance(source, video.ClipSource):   # reads the index it is given
    view = video.HostEvalClip(source.reader, size,
                              video.test_views(data_cfg) if views else (1, 1))
  elif views:
    raise DataConfigError("the multi-view test reads streamed video (input.data.name="
                          "'video_csv' or 'video_folder')")
  if max_examples is not None:
    source = _Subset(source, _eval_indices(len(source), max_examples))
  if not isinstance(view, video.HostEvalClip):
    source = DecodedSource(source)
  if len(source) == 0:
    return
  shard = grain.sharding.ShardOptions(0, 1, drop_remainder=False)
  sampler = grain.samplers.IndexSampler(len(source), shard_options=shard, shuffle=False,
                                        num_epochs=1)
  loader = grain.DataLoader(
      data_source=source, sampler=sampler, shard_options=shard,
      operations=[view, grain.transforms.Batch(batch_size, drop_remainder=False)],
      worker_count=workers)
  for batch in loader:
    yield batch["image"], batch["label"].astype(np.int32)


def num_examples(input_cfg: Any, split: str) -> int:
  """Number of records in ``split`` (in memory: the readable images)."""
  data_cfg = input_cfg.data
  if sources.is_in_memory(data_cfg):
    return len(sources.load_in_memory(data_cfg, split))
  return len(sources.streaming_source(data_cfg, split))


def num_classes(input_cfg: Any) -> int:
  """Number of classes of the dataset (from its class folders / TFDS label feature)."""
  data_cfg = input_cfg.data
  if sources.is_in_memory(data_cfg):
    return len(sources.load_in_memory(data_cfg, "train").class_names)
  names = getattr(sources.streaming_source(data_cfg, "train"), "class_names", None)
  if not names:
    raise DataConfigError(f"the dataset of --config.input.data.name={_get(data_cfg, 'name')!r} "
                          "has no class names: use a labelled dataset")
  return len(names)


def steps_per_epoch(input_cfg: Any) -> int:
  """Optimiser steps in one epoch: pretraining records ('pretrain': the training split or its
  ``train_subset``) // records per global batch (the batch size / ``aug.num_sample``)."""
  return num_examples(input_cfg, "pretrain") // (int(input_cfg.batch_size)
                                                 // num_sample(input_cfg))
