"""Host-side crops in the grain workers: decode + RandomResizedCrop (bicubic, antialiased) +
flip for training, resize + centre crop for evaluation.

`HostRandomResizedCropFlip` crops decoded images (`records.DecodedSource`). The fast path
`HostDecodeRandomResizedCropFlip` (``input.fast_decode``, the default) decodes and crops in one
step from `records.HeaderCheckedSource` elements: the crop box is drawn from the image
header's size and a JPEG is decoded at 1/2, 1/4 or 1/8 scale when the box still covers
``image_size`` pixels at that scale (`decode_crop_flip`). A body that fails to decode is decoded
again with truncated images allowed (else a grey image is used) and counted in ``'bad'``.
`HostCenterCrop` is the evaluation transform (shorter side to size / 0.875, centre crop).
"""
from __future__ import annotations

import dataclasses
import io
import math
from typing import Any, Sequence

import numpy as np

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
    return {**element, "image": crop_flip(element["image"], rng, self.size, self.scale,
                                          self.ratio, self.hflip)}


def crop_flip(image: np.ndarray, rng: np.random.Generator, size: int, scale: Sequence[float],
              ratio: Sequence[float], hflip: bool) -> np.ndarray:
  """One RandomResizedCrop (`sample_crop_box_np`, bicubic) of a decoded image to size x size,
  then a horizontal flip with probability 1/2 when `hflip`: the draws in that order."""
  out = _resize_box(image, sample_crop_box_np(rng, image.shape[0], image.shape[1], scale, ratio),
                    size)
  if hflip and rng.uniform() < 0.5:
    out = np.ascontiguousarray(out[:, ::-1])
  return out


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


class HostDecodeRandomResizedCropFlip(HostRandomResizedCropFlip):
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

  def random_map(self, element: dict[str, Any], rng: np.random.Generator) -> dict[str, Any]:
    if "image_bytes" not in element:   # already decoded: same attributes, same transform
      return super().random_map(element, rng)
    out, bad, _ = decode_crop_flip(element["image_bytes"], rng, self.size, self.scale,
                                   self.ratio, self.hflip)
    return {"image": out, "label": element["label"], "bad": np.int32(element["bad"] + bad),
            "index": element["index"]}


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


@dataclasses.dataclass(frozen=True)
class CropSpec:
  """One group of training views a method declares (`Method.train_views`): `count`
  RandomResizedCrops of `size` pixels, area fraction ~ U(scale), log aspect ratio ~
  U(log ratio), each flipped with probability 1/2 when `hflip`. iBOT's 'global' and 'local'
  crops, say. Streamed data gets them cut on the host from the decoded image
  (`HostMultiCrop`); in-memory data on the device by the method's `preprocess`."""
  name: str
  count: int
  size: int
  scale: tuple = (0.08, 1.0)
  ratio: tuple = (3 / 4, 4 / 3)
  hflip: bool = True


class HostMultiCrop:
  """grain RandomMap: every view a method declares (a tuple of `CropSpec`), each an
  independent RandomResizedCrop (bicubic, antialiased, on the full decoded image) + flip:
  ``{'image': {name: uint8 [count, size, size, 3]}, 'label', 'bad', 'index'}``. Takes
  `records.DecodedSource` elements (the image decoded once for all its views)."""

  def __init__(self, specs: Sequence[CropSpec]):
    self.specs = tuple(specs)

  def random_map(self, element: dict[str, Any], rng: np.random.Generator) -> dict[str, Any]:
    image = element["image"]
    views = {spec.name: np.stack([crop_flip(image, rng, spec.size, spec.scale, spec.ratio,
                                            spec.hflip) for _ in range(spec.count)])
             for spec in self.specs}
    return {**element, "image": views}
