"""Random-access record sources for grain (pickled to its workers: module-level classes with a
deterministic repr), the first stop of a streamed batch.

`_IndexSource` serves in-memory data by index; `_Permuted` (a seeded permutation, so every
process's contiguous shard is a random subset) and `_Subset` reorder or cut any source;
`DecodedSource` and `HeaderCheckedSource` read a streaming source's records, replacing an
unreadable record by the next readable one (`_SkippingSource`) and counting the skips in the
element's ``'bad'``; every element carries its ``'label'`` and ``'index'`` (the record read,
its position in the split).

Next stop: `host_crop` (decode + RandomResizedCrop + flip in the grain workers) or, with
``input.device_resize``, `regions`; then `pipeline` batches them.
"""
from __future__ import annotations

import io
from typing import Any

import numpy as np
from absl import logging

from mim_jax.data import sources
from mim_jax.data.host_crop import _pil
from mim_jax.data.sources import DataError

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
