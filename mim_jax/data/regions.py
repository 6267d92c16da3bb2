"""``input.device_resize``: the grain workers stop short of the bicubic resize (most of their
time). They decode as the fast path does and keep the pixels the resize reads
(`decode_region`), packed one row per device (`PackRegions`); the train step resamples them on
the device (`augment.unpack_regions`, `augment.resize_regions`), close to the host crop (under
half a level on average).
"""
from __future__ import annotations

import io
import math
from typing import Any, Sequence

import numpy as np

from mim_jax.data.host_crop import (HostDecodeRandomResizedCropFlip, HostRandomResizedCropFlip,
                                    _draft_for_box, _pil, decode_crop_flip, reduction_for_box,
                                    sample_crop_box_np)
from mim_jax.data.sources import DataConfigError

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
      if key in records[0]:       # 'index' from the loader's sources (absent in bare records)
        out[key] = np.stack([r[key] for r in records])
    edges = np.stack([r["edges"] for r in records])
    out["box"] = np.concatenate([edges[:, :2], edges[:, 2:] - edges[:, :2]], 1).astype(np.float32)
    return out
