"""Grain input pipelines: the checkpointable training loader and one-pass evaluation batches.

Two modes, chosen by the data config (`sources.is_in_memory`):

* In memory (the embedded set, image folders with ``in_memory=True``): grain samples record
  indices (shuffled, checkpointable; every process slices its part of each global index
  batch, so batches do not depend on the process count) and the loader gathers the stored
  images, e.g. 32x32. Augmentation happens on the device afterwards (`augment`):
  ``loader.on_device_aug`` is True.
* Streaming (image folders with ``in_memory=False``, TFDS): grain worker processes read,
  decode, RandomResizedCrop (bicubic, antialiased) and flip each record on the host, so
  batches already have ``image_size``; ``loader.on_device_aug`` is False. A record that
  cannot be read or decoded is replaced by the next readable one (i+1, i+2, ...) and the
  number skipped is reported in the batch's ``'bad'`` field.
  With ``fast_decode`` (the default) decoding and cropping are one step
  (`HeaderCheckedSource` + `HostDecodeRandomResizedCropFlip`): the crop box is drawn from the
  image header's size and a JPEG is decoded at 1/2, 1/4 or 1/8 scale when the box still
  covers ``image_size`` pixels at that scale. There only records whose header cannot be
  read are replaced by the next one; a body that fails to decode is decoded again with
  truncated images allowed (else a grey image is used) and counted in ``'bad'`` too.
  With ``device_resize`` > 0 the workers stop short of the bicubic resize (most of their
  time): they decode the same way and keep the pixels the resize reads (`decode_region`),
  packed one row per device (`PackRegions`); the train step resamples them on the device
  (`augment.unpack_regions`, `augment.resize_regions`), close to the host crop (under half a
  level on average).

Training reads the 'pretrain' split: the training split, or its nested ``data.train_subset``
(see `sources.subset_positions`); `steps_per_epoch` counts that split. `eval_batches` serves
any split: evaluators read 'train' and 'eval', the held-out-loss evaluator also 'pretrain'
(the very images the model was trained on).

Config keys (``input_cfg``): ``data`` (see `sources`, plus ``in_memory``), ``batch_size``
(global), ``image_size``, ``workers``, ``aug`` = {``crop_scale``, ``crop_ratio``, ``hflip``},
``fast_decode`` (default True; False: full decode, then crop), ``read_threads`` and
``read_buffer`` (streaming: grain's reader threads and prefetch buffer in each worker; default
2 and 16), ``device_resize`` and ``device_resize_budget`` (streaming, default 0: off; the
largest region side, and the packed pixels per image, default half the square).

grain is imported inside functions so importing this module stays cheap.
"""
from __future__ import annotations

import io
import math
from typing import Any, Iterator, Optional, Sequence

import numpy as np
from absl import logging

from mim_jax.data import sources
from mim_jax.data.sources import DataConfigError, DataError

_MAX_CONSECUTIVE_BAD = 64
_warned_bad = False


# ----------------------------------------------------------------------------------------------
# Random-access sources (pickled to grain workers: module-level classes, deterministic repr).


class _IndexSource:
  """``source[i] -> i``: in-memory data is gathered by index after batching."""

  def __init__(self, num_records: int, tag: str):
    self._n = int(num_records)
    self._tag = tag

  def __len__(self) -> int:
    return self._n

  def __getitem__(self, index: int) -> int:
    return int(index)

  def __repr__(self) -> str:
    return f"IndexSource(num_records={self._n}, tag={self._tag!r})"


class _Permuted:
  """A fixed seeded permutation of a source's records.

  grain shards the record range contiguously across processes; permuting first makes every
  process's shard a random subset instead of, say, the first classes of a sorted folder.
  """

  def __init__(self, source: Any, seed: int):
    self._source = source
    self._seed = int(seed)
    self._perm = np.random.Generator(np.random.PCG64(self._seed)).permutation(len(source))

  def __len__(self) -> int:
    return len(self._source)

  def __getitem__(self, index: int) -> Any:
    return self._source[int(self._perm[index])]

  def __repr__(self) -> str:
    return f"Permuted({self._source!r}, seed={self._seed})"


class _Subset:
  """The records ``indices`` of a source, in that order."""

  def __init__(self, source: Any, indices: np.ndarray):
    self._source = source
    self._indices = np.asarray(indices, np.int64)

  def __len__(self) -> int:
    return int(self._indices.shape[0])

  def __getitem__(self, index: int) -> Any:
    return self._source[int(self._indices[index])]

  def __repr__(self) -> str:
    return f"Subset({self._source!r}, {len(self)})"


def _to_rgb(image: np.ndarray) -> np.ndarray:
  image = np.asarray(image)
  if image.dtype != np.uint8:
    raise ValueError(f"expected uint8 image, got {image.dtype}")
  if image.ndim == 2:
    image = image[:, :, None]
  if image.ndim != 3 or image.shape[0] == 0 or image.shape[1] == 0:
    raise ValueError(f"bad image shape {image.shape}")
  if image.shape[-1] == 1:
    image = np.repeat(image, 3, axis=-1)
  elif image.shape[-1] == 4:
    image = image[..., :3]
  elif image.shape[-1] != 3:
    raise ValueError(f"bad image shape {image.shape}")
  return image


class _SkippingSource:
  """A streaming source's records, read by `_read`; a record `_read` rejects is replaced by the
  next readable record (i+1, i+2, ..., wrapping around), deterministically, and ``'bad'``
  counts the records skipped. More than 64 unreadable records in a row raise `DataError`."""

  def __init__(self, source: Any):
    self._source = source

  def __len__(self) -> int:
    return len(self._source)

  def _read(self, record: dict[str, Any]) -> dict[str, Any]:
    """The element for a readable record (without 'label' and 'bad'); raises if unreadable."""
    raise NotImplementedError

  def __getitem__(self, index: int) -> dict[str, Any]:
    global _warned_bad
    n = len(self._source)
    index = int(index)
    for skipped in range(min(_MAX_CONSECUTIVE_BAD, n)):
      j = (index + skipped) % n
      try:
        record = self._source[j]
        return {**self._read(record), "label": np.int32(record["label"]), "bad": np.int32(skipped),
                "index": np.int32(j)}
      except Exception as e:  # pylint: disable=broad-except
        if not _warned_bad:
          _warned_bad = True
          logging.warning("skipping unreadable record %d of %r (%s: %s); further ones are only "
                          "counted in the batches' 'bad' field", j, self._source,
                          type(e).__name__, str(e).splitlines()[0] if str(e) else "")
    raise DataError(f"{min(_MAX_CONSECUTIVE_BAD, n)} unreadable records in a row from record "
                    f"{index} of {self._source!r}: check the data files")


class DecodedSource(_SkippingSource):
  """Decodes a streaming source's records: ``{'image': uint8 [H,W,3], 'label', 'bad'}``; an
  unreadable or undecodable record is skipped (see `_SkippingSource`)."""

  def _read(self, record: dict[str, Any]) -> dict[str, Any]:
    if "image" in record:
      return {"image": _to_rgb(record["image"])}
    return {"image": sources.decode_image(record["image_bytes"])}

  def __repr__(self) -> str:
    return f"Decoded({self._source!r})"


class HeaderCheckedSource(_SkippingSource):
  """Streaming records checked only as far as their header: the fast path's source.

  ``source[i] -> {'image_bytes': bytes, 'label': int32, 'bad': int32}`` (or ``'image'``
  instead of ``'image_bytes'`` for a source that yields decoded images). The bytes must open
  with PIL and report a size (a header parse, no decode); a record that does not is replaced
  by the next one that does (see `_SkippingSource`). The full decode happens in
  `HostDecodeRandomResizedCropFlip`, which handles a body that fails to decode.
  """

  def _read(self, record: dict[str, Any]) -> dict[str, Any]:
    if "image" in record:
      return {"image": _to_rgb(record["image"])}
    data = record["image_bytes"]
    with _pil().open(io.BytesIO(data)) as im:
      width, height = im.size
    if width <= 0 or height <= 0:
      raise ValueError(f"bad image size {width}x{height}")
    return {"image_bytes": data}

  def __repr__(self) -> str:
    return f"HeaderChecked({self._source!r})"


# ----------------------------------------------------------------------------------------------
# Host-side transforms (registered as grain transforms when a loader is built).


def sample_crop_box_np(rng: np.random.Generator, height: int, width: int,
                       scale: Sequence[float], ratio: Sequence[float]) -> tuple[float, ...]:
  """One RandomResizedCrop box (top, left, h, w), same rule as `augment.sample_crop_boxes`."""
  area = height * width
  log_ratio = (math.log(ratio[0]), math.log(ratio[1]))
  for _ in range(10):
    target = area * rng.uniform(scale[0], scale[1])
    aspect = math.exp(rng.uniform(*log_ratio))
    w = math.sqrt(target * aspect)
    h = math.sqrt(target / aspect)
    if 0 < w <= width and 0 < h <= height:
      return rng.uniform() * (height - h), rng.uniform() * (width - w), h, w
  from mim_jax.data.augment import fallback_crop_size  # jax-free helper, imported lazily
  w, h = fallback_crop_size(height, width, ratio)
  return (height - h) / 2, (width - w) / 2, h, w


def _resize_box(image: np.ndarray, box: Sequence[float], size: int) -> np.ndarray:
  """Resamples ``box`` = (top, left, h, w) of ``image`` to size x size, bicubic (antialiased)."""
  from PIL import Image  # pylint: disable=g-import-not-at-top
  top, left, h, w = box
  pil = Image.fromarray(image)
  out = pil.resize((size, size), Image.Resampling.BICUBIC, box=(left, top, left + w, top + h))
  return np.asarray(out, dtype=np.uint8)


class HostRandomResizedCropFlip:
  """grain RandomMap: RandomResizedCrop (bicubic) to ``size`` and a random horizontal flip."""

  def __init__(self, size: int, scale: Sequence[float], ratio: Sequence[float], hflip: bool):
    self.size = int(size)
    self.scale = tuple(float(s) for s in scale)
    self.ratio = tuple(float(r) for r in ratio)
    self.hflip = bool(hflip)

  def random_map(self, element: dict[str, Any], rng: np.random.Generator) -> dict[str, Any]:
    image = element["image"]
    box = sample_crop_box_np(rng, image.shape[0], image.shape[1], self.scale, self.ratio)
    out = _resize_box(image, box, self.size)
    if self.hflip and rng.uniform() < 0.5:
      out = np.ascontiguousarray(out[:, ::-1])
    return {**element, "image": out}


_JPEG_REDUCTIONS = (8, 4, 2)


def reduction_for_box(box: Sequence[float], size: int) -> int:
  """The largest JPEG DCT scale reduction (8, 4, 2, else 1) that keeps ``box`` = (top, left,
  h, w), in full-resolution pixels, at least ``size`` pixels on both sides once reduced."""
  side = min(float(box[2]), float(box[3]))
  for factor in _JPEG_REDUCTIONS:
    if side >= factor * size:
      return factor
  return 1


_PIL_IMAGE = None


def _pil():
  """``PIL.Image``, imported once per process (this module stays cheap to import)."""
  global _PIL_IMAGE
  if _PIL_IMAGE is None:
    from PIL import Image  # pylint: disable=g-import-not-at-top
    _PIL_IMAGE = Image
  return _PIL_IMAGE


def _draft_for_box(im: Any, box: Sequence[float], size: int) -> tuple[float, float, int]:
  """Sets the opened, not yet loaded PIL image ``im`` to decode at the largest JPEG scale
  reduction that `reduction_for_box` allows for ``box``.

  Returns (sx, sy, reduction): decoded pixels per full-size pixel on each axis.
  """
  width, height = im.size
  factor = reduction_for_box(box, size) if im.format == "JPEG" else 1
  if factor == 1:
    return 1.0, 1.0, 1
  # draft() picks the largest scale whose output is at least the requested size; asking for
  # floor(full / factor) makes that scale exactly `factor`. It returns the full image's
  # extent in reduced pixels, (0, 0, W / scale, H / scale): libjpeg rounds the reduced size
  # up and pads the last partial block, so the box maps by 1 / scale, not by reduced / full
  # size (which would stretch it by up to scale / W).
  drafted = im.draft("RGB", (max(width // factor, 1), max(height // factor, 1)))
  if drafted is None:
    return 1.0, 1.0, 1
  sx, sy = drafted[1][2] / width, drafted[1][3] / height
  return sx, sy, int(round(1 / sx))


def _crop_opened(im: Any, box: Sequence[float], size: int) -> tuple[Any, int]:
  """Decodes the opened, not yet loaded PIL image ``im`` (at a reduced JPEG scale when
  ``box`` allows) and resamples ``box`` to size x size like `_resize_box`.

  Returns (the size x size RGB PIL image, the reduction used).
  """
  top, left, h, w = box
  sx, sy, factor = _draft_for_box(im, box, size)
  im.load()
  rgb = im if im.mode == "RGB" else im.convert("RGB")
  out = rgb.resize((size, size), _pil().Resampling.BICUBIC,
                   box=(left * sx, top * sy, (left + w) * sx, (top + h) * sy))
  return out, factor


def _crop_truncated(data: bytes, box: Sequence[float], size: int) -> tuple[Any, int]:
  """`_crop_opened` on a fresh open of ``data`` with PIL's LOAD_TRUNCATED_IMAGES set for the
  duration of this call only."""
  from PIL import ImageFile  # pylint: disable=g-import-not-at-top
  previous = ImageFile.LOAD_TRUNCATED_IMAGES
  ImageFile.LOAD_TRUNCATED_IMAGES = True
  try:
    with _pil().open(io.BytesIO(data)) as im:
      return _crop_opened(im, box, size)
  finally:
    ImageFile.LOAD_TRUNCATED_IMAGES = previous


def decode_crop_flip(data: bytes, rng: np.random.Generator, size: int, scale: Sequence[float],
                     ratio: Sequence[float], hflip: bool) -> tuple[np.ndarray, int, int]:
  """RandomResizedCrop + flip of encoded image bytes, with reduced-size JPEG decoding.

  The box comes from `sample_crop_box_np` on the header's full (H, W), then the flip from one
  more ``rng.uniform()``: the same draws as `HostRandomResizedCropFlip` on the fully decoded
  image, so without a reduction the output is identical to it.

  Returns:
    (uint8 [size, size, 3], bad, reduction). ``bad`` is 1 when the body did not decode
    cleanly: it is then decoded again with truncated images allowed or, failing that (or when
    not even the header opens), the output is uniform mid-grey (128). ``reduction`` is the
    JPEG scale divisor used (1: full size).
  """
  image_mod = _pil()
  bad, factor = 0, 1
  out = None
  try:
    im = image_mod.open(io.BytesIO(data))
  except Exception:  # pylint: disable=broad-except
    bad = 1
  else:
    with im:
      width, height = im.size
      box = sample_crop_box_np(rng, height, width, scale, ratio)
      try:
        out, factor = _crop_opened(im, box, size)
      except Exception:  # pylint: disable=broad-except
        bad = 1
    if out is None:
      try:
        out, factor = _crop_truncated(data, box, size)
      except Exception:  # pylint: disable=broad-except
        factor = 1
  flip = hflip and rng.uniform() < 0.5
  if out is None:
    return np.full((size, size, 3), 128, np.uint8), bad, factor
  if flip:   # in PIL: a numpy copy of a reversed 3-byte-pixel view is several times slower
    out = out.transpose(image_mod.Transpose.FLIP_LEFT_RIGHT)
  return np.asarray(out, dtype=np.uint8), bad, factor


class HostDecodeRandomResizedCropFlip:
  """grain RandomMap: decode + RandomResizedCrop (bicubic) + random flip in one step.

  Takes `HeaderCheckedSource` elements. Encoded images go through `decode_crop_flip`: the
  crop box is drawn on the header's size and JPEGs are decoded at the largest DCT scale
  (1/2, 1/4, 1/8) at which the box is still at least ``size`` pixels on both sides, so no
  resolution the output needs is dropped; other formats are decoded fully. Without a
  reduction the output equals `DecodedSource` + `HostRandomResizedCropFlip` exactly.
  Elements already decoded (``'image'``) are cropped like `HostRandomResizedCropFlip`.

  Bad records: the source already skipped records whose header does not parse. A body that
  then fails to decode (e.g. a truncated file) is decoded again with PIL's
  ``ImageFile.LOAD_TRUNCATED_IMAGES`` set for that call only (the missing part is filled by
  PIL), and if that fails too the output is a uniform mid-grey (128) image; either way the
  element's ``'bad'`` gets one more (1 when no record was skipped before it).
  """

  def __init__(self, size: int, scale: Sequence[float], ratio: Sequence[float], hflip: bool):
    self.size = int(size)
    self.scale = tuple(float(s) for s in scale)
    self.ratio = tuple(float(r) for r in ratio)
    self.hflip = bool(hflip)

  def random_map(self, element: dict[str, Any], rng: np.random.Generator) -> dict[str, Any]:
    if "image_bytes" not in element:   # already decoded: same attributes, same transform
      return HostRandomResizedCropFlip.random_map(self, element, rng)  # type: ignore[arg-type]
    out, bad, _ = decode_crop_flip(element["image_bytes"], rng, self.size, self.scale,
                                   self.ratio, self.hflip)
    return {"image": out, "label": element["label"], "bad": np.int32(element["bad"] + bad),
            "index": element["index"]}


_BICUBIC_SUPPORT = 2.0


def _region_record(region: np.ndarray, edges, flip: bool, bad: int, host_resized: bool
                   ) -> dict[str, Any]:
  # The box as edges (top, left, bottom, right), float64 (see decode_region).
  return {"region": region, "edges": np.asarray(edges, np.float64),
          "valid": np.array(region.shape[:2], np.int32), "flip": np.bool_(flip),
          "bad": np.int32(bad), "host_resized": np.bool_(host_resized)}


_SIMPLEJPEG: Any = None


def _simplejpeg() -> Any:
  """The ``simplejpeg`` module, or None where it is not installed (then Pillow decodes)."""
  global _SIMPLEJPEG
  if _SIMPLEJPEG is None:
    try:
      import simplejpeg  # pylint: disable=g-import-not-at-top
      _SIMPLEJPEG = simplejpeg
    except ImportError:
      _SIMPLEJPEG = False
  return _SIMPLEJPEG or None


def _region_bounds(box, sx: float, sy: float, full_h: int, full_w: int, size: int):
  """The box in decoded pixels (edges, computed as `_crop_opened` does) and the rows and
  columns [y0, y1) x [x0, x1) the bicubic resize reads for it, clipped to the image."""
  top, left, h, w = box
  top, left, bottom, right = top * sy, left * sx, (top + h) * sy, (left + w) * sx
  reach_y = _BICUBIC_SUPPORT * max((bottom - top) / size, 1.0)
  reach_x = _BICUBIC_SUPPORT * max((right - left) / size, 1.0)
  y0, x0 = max(math.floor(top - reach_y), 0), max(math.floor(left - reach_x), 0)
  y1 = min(math.ceil(bottom + reach_y) + 1, full_h)
  x1 = min(math.ceil(right + reach_x) + 1, full_w)
  # Pillow reads a resize box as float32: shifting the float32 edges by whole pixels keeps
  # them exact, so region_to_crop resizes the box _crop_opened does.
  edges = np.asarray([top, left, bottom, right], np.float32).astype(np.float64)
  return edges - np.array([y0, x0, y0, x0], np.float64), (y0, y1, x0, x1)


_TOO_BIG = "too big"


def _region_simplejpeg(sj: Any, data: bytes, rng: np.random.Generator, size: int, scale, ratio,
                       hflip: bool, canvas: int) -> Any:
  """`decode_region`'s work with simplejpeg (libjpeg-turbo's own API: the same pixels as
  Pillow, decoded and cut faster), for YCbCr and grey JPEGs; None otherwise."""
  if not sj.is_jpeg(data):
    return None
  height, width, colorspace, _ = sj.decode_jpeg_header(data)
  if colorspace not in ("YCbCr", "Gray"):
    return None    # CMYK and YCCK: Pillow converts them differently
  box = sample_crop_box_np(rng, height, width, scale, ratio)
  flip = bool(hflip and rng.uniform() < 0.5)
  factor = reduction_for_box(box, size)
  # DCT scaling by 1/factor, as `_draft_for_box`: libjpeg rounds the reduced size up.
  full_h, full_w = -(-height // factor), -(-width // factor)
  edges, (y0, y1, x0, x1) = _region_bounds(box, 1 / factor, 1 / factor, full_h, full_w, size)
  if y1 - y0 > canvas or x1 - x0 > canvas:
    return _TOO_BIG
  image = sj.decode_jpeg(data, "RGB", min_height=full_h, min_width=full_w)
  if image.shape[:2] != (full_h, full_w):
    raise ValueError(f"simplejpeg decoded {image.shape[:2]}, not {(full_h, full_w)}")
  return _region_record(np.ascontiguousarray(image[y0:y1, x0:x1]), edges, flip, 0, False)


def _region_pil(data: bytes, rng: np.random.Generator, size: int, scale, ratio, hflip: bool,
                canvas: int) -> Any:
  """`decode_region`'s work with Pillow (any format)."""
  with _pil().open(io.BytesIO(data)) as im:
    width, height = im.size
    box = sample_crop_box_np(rng, height, width, scale, ratio)
    flip = bool(hflip and rng.uniform() < 0.5)
    sx, sy, _ = _draft_for_box(im, box, size)
    edges, (y0, y1, x0, x1) = _region_bounds(box, sx, sy, im.size[1], im.size[0], size)
    if y1 - y0 > canvas or x1 - x0 > canvas:
      return _TOO_BIG
    im.load()
    rgb = im if im.mode == "RGB" else im.convert("RGB")
    region = np.asarray(rgb.crop((x0, y0, x1, y1)), dtype=np.uint8)
    return _region_record(region, edges, flip, 0, False)


def decode_region(data: bytes, rng: np.random.Generator, size: int, scale: Sequence[float],
                  ratio: Sequence[float], hflip: bool, canvas: int) -> dict[str, Any]:
  """The host half of ``input.device_resize``: decode, draw the crop box and the flip as
  `decode_crop_flip` does (same draws, same reduced-size JPEG decoding), but instead of
  resampling here, keep the pixels the bicubic resize reads: the box plus the kernel's reach,
  clipped to the image. `augment.resize_regions` resamples it on the device, `region_to_crop`
  on the host; both give `decode_crop_flip`'s output up to rounding. JPEGs are decoded with
  simplejpeg where it is installed (the same pixels as Pillow), else with Pillow.

  When that region is larger than ``canvas`` on a side, or the image does not open and load
  cleanly, the element is `decode_crop_flip`'s own output (resized and flipped here, with its
  bad-record handling) as a ``size`` x ``size`` region whose box is all of it, which the
  resize passes through unchanged.

  Returns a dict: ``region`` uint8 [h, w, 3], ``edges`` float64 (top, left, bottom, right) of
  the box inside the region, ``valid`` int32 (h, w), ``flip`` bool, ``bad`` int32,
  ``host_resized``.
  """
  state = rng.bit_generator.state
  record = None
  sj = _simplejpeg()
  if sj is not None:
    try:
      record = _region_simplejpeg(sj, data, rng, size, scale, ratio, hflip, canvas)
    except Exception:  # pylint: disable=broad-except
      record = None
  if record is None:
    rng.bit_generator.state = state
    try:
      record = _region_pil(data, rng, size, scale, ratio, hflip, canvas)
    except Exception:  # pylint: disable=broad-except
      record = None
  if isinstance(record, dict):
    return record
  rng.bit_generator.state = state
  out, bad, _ = decode_crop_flip(data, rng, size, scale, ratio, hflip)
  return _region_record(out, (0, 0, size, size), False, bad, True)


def region_to_crop(record: dict[str, Any], size: int) -> np.ndarray:
  """The host resize of a `decode_region` record: Pillow's bicubic resize of its box, then
  its flip, uint8 [size, size, 3]. That is `decode_crop_flip`'s output for the same draws up
  to one level at some pixels: Pillow's result for a box changes slightly when the image
  under it is shifted by whole pixels (seen with Pillow 13)."""
  image_mod = _pil()
  top, left, bottom, right = (float(v) for v in record["edges"])
  out = image_mod.fromarray(record["region"]).resize(
      (size, size), image_mod.Resampling.BICUBIC, box=(left, top, right, bottom))
  if record["flip"]:
    out = out.transpose(image_mod.Transpose.FLIP_LEFT_RIGHT)
  return np.asarray(out, dtype=np.uint8)


class HostDecodeRegion(HostDecodeRandomResizedCropFlip):
  """grain RandomMap for ``input.device_resize``: `decode_region` of `HeaderCheckedSource`
  elements (the record plus ``'label'``), batched by `PackRegions`."""

  def __init__(self, size: int, scale: Sequence[float], ratio: Sequence[float], hflip: bool,
               canvas: int):
    super().__init__(size, scale, ratio, hflip)
    self.canvas = int(canvas)

  def random_map(self, element: dict[str, Any], rng: np.random.Generator) -> dict[str, Any]:
    if "image_bytes" not in element:   # already decoded: resized here, passed through there
      done = HostRandomResizedCropFlip.random_map(self, element, rng)  # type: ignore[arg-type]
      out = _region_record(done["image"], (0, 0, self.size, self.size), False, 0, True)
    else:
      out = decode_region(element["image_bytes"], rng, self.size, self.scale, self.ratio,
                          self.hflip, self.canvas)
    return {**out, "label": element["label"], "bad": np.int32(element["bad"] + out["bad"]),
            "index": element["index"]}


class PackRegions:
  """grain batch_fn for ``input.device_resize``: packs the batch's regions, whose sizes
  differ, into ``groups`` fixed-size uint8 rows (one per local device, each holding its
  consecutive share of the batch), so a batch costs about the regions' own bytes.

  Each row holds ``budget`` pixels per image plus ``canvas`` pixels of slack (the device reads
  whole ``canvas``-wide rows, `augment.unpack_regions`). When a group's regions exceed the
  row, its largest are resized here (`region_to_crop`) to ``size`` x ``size`` until they
  fit; they are then marked ``host_resized``.

  Output: ``image`` uint8 [groups, row], ``offset`` int32 [B] (each region's start in its
  row, in pixels), ``box`` float32 [B, 4] (top, left, height, width) in its region,
  ``valid``, ``flip``, ``host_resized``, ``bad``, ``label``.
  """

  def __init__(self, groups: int, size: int, canvas: int, budget: int):
    self.groups, self.size, self.canvas, self.budget = int(groups), int(size), int(canvas), int(budget)

  def __call__(self, elements: Sequence[dict[str, Any]]) -> dict[str, np.ndarray]:
    n = len(elements)
    if n % self.groups:
      raise DataConfigError(f"a batch of {n} does not split over {self.groups} devices")
    per = n // self.groups
    records = [dict(e) for e in elements]
    row = per * self.budget + self.canvas * self.canvas
    image = np.zeros((self.groups, row * 3), np.uint8)
    offset = np.zeros(n, np.int32)
    for g in range(self.groups):
      members = range(g * per, (g + 1) * per)
      pixels = {i: records[i]["region"].shape[0] * records[i]["region"].shape[1] for i in members}
      total = sum(pixels.values())
      for i in sorted(members, key=lambda i: -pixels[i]):
        if total <= per * self.budget:
          break
        crop = region_to_crop(records[i], self.size)
        records[i].update(_region_record(crop, (0, 0, self.size, self.size), False,
                                         int(records[i]["bad"]), True))
        total += self.size * self.size - pixels[i]
      pos = 0
      for i in members:
        flat = records[i]["region"].reshape(-1)
        image[g, pos * 3:pos * 3 + flat.size] = flat
        offset[i] = pos
        pos += flat.size // 3
    out = {"image": image, "offset": offset}
    for key in ("valid", "flip", "host_resized", "bad", "label", "index"):
      out[key] = np.stack([r[key] for r in records])
    edges = np.stack([r["edges"] for r in records])
    out["box"] = np.concatenate([edges[:, :2], edges[:, 2:] - edges[:, :2]], 1).astype(np.float32)
    return out


def center_crop_box(height: int, width: int, size: int, crop_fraction: float = 0.875
                    ) -> tuple[float, float, float, float]:
  """Box (top, left, h, w) equal to resizing the shorter side to ``size / crop_fraction`` and
  center-cropping ``size`` pixels, expressed in the original image's pixels."""
  side = min(height, width) * crop_fraction
  return (height - side) / 2, (width - side) / 2, side, side


class HostCenterCrop:
  """grain Map: resize shorter side to ``size / 0.875``, center crop ``size`` (one resample)."""

  def __init__(self, size: int, crop_fraction: float = 0.875):
    self.size = int(size)
    self.crop_fraction = float(crop_fraction)

  def map(self, element: dict[str, Any]) -> dict[str, Any]:
    image = element["image"]
    box = center_crop_box(image.shape[0], image.shape[1], self.size, self.crop_fraction)
    return {**element, "image": _resize_box(image, box, self.size)}


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
  grain.transforms.RandomMap.register(HostDecodeRandomResizedCropFlip)
  grain.transforms.Map.register(HostCenterCrop)
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
    image_shape: (H, W, 3) of the yielded images.
    local_batch_size, global_batch_size: per process / over all processes.
    num_records: records of the pretraining split (all processes): the training split or its
      ``data.train_subset``.
    steps_per_epoch: ``num_records // global_batch_size``.
    class_names: class index -> name (None when unknown).
  """

  def __init__(self, data_loader: Any, *, on_device_aug: bool, images: Optional[np.ndarray],
               labels: Optional[np.ndarray], image_shape: tuple[int, int, int],
               local_batch_size: int, global_batch_size: int, num_records: int,
               class_names: Optional[list[str]], index_slice: slice = slice(None)):
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
    self.steps_per_epoch = num_records // global_batch_size
    self.class_names = class_names

  def __iter__(self) -> "TrainLoader":
    return self

  def __next__(self) -> dict[str, np.ndarray]:
    batch = next(self._iterator)
    if self._images is None:
      out = {"image": batch["image"], "label": batch["label"].astype(np.int32),
             "bad": batch["bad"].astype(np.int32), "index": batch["index"].astype(np.int32)}
      if "offset" in batch:   # input.device_resize: what the step needs to resample the regions
        out.update({k: batch[k] for k in ("offset", "box", "valid", "flip", "host_resized")})
      return out
    index = np.asarray(batch)[self._index_slice]
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


def _aug(input_cfg: Any) -> tuple[tuple[float, float], tuple[float, float], bool]:
  aug = _get(input_cfg, "aug", {}) or {}
  scale = tuple(_get(aug, "crop_scale", (0.2, 1.0)))
  ratio = tuple(_get(aug, "crop_ratio", (3 / 4, 4 / 3)))
  return scale, ratio, bool(_get(aug, "hflip", True))


def make_train_loader(input_cfg: Any, *, seed: int, process_index: Optional[int] = None,
                      process_count: Optional[int] = None, device_groups: int = 1) -> TrainLoader:
  """Builds this process's endless, shuffled training loader.

  Args:
    input_cfg: the ``input`` config (see the module docstring).
    seed: shuffling seed (and, when streaming, the per-record augmentation seed).
    process_index, process_count: this process's data shard; default: JAX's.
    device_groups: with ``input.device_resize``, the devices this process feeds (the packed
      regions come in one row per device).

  Raises:
    DataError: bad batch size, data smaller than one batch, or bad data (one-line message).
  """
  workers = int(_get(input_cfg, "workers", 0))
  grain = _grain(workers)
  process_index, process_count = _process_index_and_count(process_index, process_count)
  global_batch, local_batch = _local_batch(input_cfg, process_count)
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
    operations = [grain.transforms.Batch(global_batch, drop_remainder=True)]
    read_options = grain.ReadOptions(num_threads=0, prefetch_buffer_size=0)
  else:
    raw = sources.streaming_source(data_cfg, "pretrain")
    class_names = getattr(raw, "class_names", None)
    size = int(input_cfg.image_size)
    image_shape = (size, size, 3)
    scale, ratio, hflip = _aug(input_cfg)
    batch_fn = None
    canvas = int(_get(input_cfg, "device_resize", 0))
    if canvas:
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
    operations = [crop, grain.transforms.Batch(local_batch, drop_remainder=True,
                                               batch_fn=batch_fn)]
    read_options = grain.ReadOptions(num_threads=int(_get(input_cfg, "read_threads", 2)),
                                     prefetch_buffer_size=int(_get(input_cfg, "read_buffer", 16)))

  num_records = len(source)
  if num_records // process_count < local_batch:
    raise DataConfigError(
        f"the training split has {num_records} records, fewer than one batch of {global_batch} "
        f"({local_batch} on each of {process_count} processes): lower --config.input.batch_size "
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
                     class_names=class_names,
                     index_slice=slice(process_index * local_batch, (process_index + 1) * local_batch))
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
  """Resizes a batch of uint8 images to size x size (bicubic); unchanged if already that size."""
  if images.shape[1] == size and images.shape[2] == size:
    return images
  from PIL import Image  # pylint: disable=g-import-not-at-top
  return np.stack([np.asarray(Image.fromarray(im).resize((size, size), Image.Resampling.BICUBIC))
                   for im in images])


def _eval_indices(num_records: int, max_examples: Optional[int]) -> np.ndarray:
  """All records, or a fixed seeded subset of ``max_examples`` of them kept in stored order
  (so a subset of a class-sorted split still spans the classes)."""
  if max_examples is None or max_examples >= num_records:
    return np.arange(num_records)
  rng = np.random.Generator(np.random.PCG64(0))
  return np.sort(rng.permutation(num_records)[:max(int(max_examples), 0)])


def eval_batches(input_cfg: Any, split: str, batch_size: int,
                 max_examples: Optional[int] = None) -> Iterator[tuple[np.ndarray, np.ndarray]]:
  """Yields ``(images uint8 [b, S, S, 3], labels int32 [b])`` once over ``split`` ('train',
  'eval' or 'pretrain') in a fixed order; the last batch may be smaller.
  S = ``input_cfg.image_size``. With ``max_examples``, a fixed seeded subset of that many
  records (in stored order) is used.

  In memory: the stored images, resized to S when their size differs (no crop). Streaming:
  shorter side resized to S / 0.875, then the central S x S (unreadable records are replaced
  by the next readable one).
  """
  batch_size = int(batch_size)
  if batch_size <= 0:
    raise DataConfigError(f"eval batch size {batch_size} must be positive")
  size = int(input_cfg.image_size)
  data_cfg = input_cfg.data
  if sources.is_in_memory(data_cfg):
    data = sources.load_in_memory(data_cfg, split)
    index = _eval_indices(len(data), max_examples)
    for start in range(0, index.shape[0], batch_size):
      rows = index[start:start + batch_size]
      yield _resize_images(data.images[rows], size), data.labels[rows]
    return

  workers = int(_get(input_cfg, "workers", 0))
  grain = _grain(workers)
  source: Any = sources.streaming_source(data_cfg, split)
  if max_examples is not None:
    source = _Subset(source, _eval_indices(len(source), max_examples))
  source = DecodedSource(source)
  if len(source) == 0:
    return
  shard = grain.sharding.ShardOptions(0, 1, drop_remainder=False)
  sampler = grain.samplers.IndexSampler(len(source), shard_options=shard, shuffle=False,
                                        num_epochs=1)
  loader = grain.DataLoader(
      data_source=source, sampler=sampler, shard_options=shard,
      operations=[HostCenterCrop(size), grain.transforms.Batch(batch_size, drop_remainder=False)],
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
  ``train_subset``) // global batch size."""
  return num_examples(input_cfg, "pretrain") // int(input_cfg.batch_size)
