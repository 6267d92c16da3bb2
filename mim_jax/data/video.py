"""Video data: temporal sampling, PyAV decoding, clip listings and readers, clip-consistent
spatial augmentation, the embedded synthetic clip set, and the video masks (issue 29).

Everything here is a pure NumPy (masks: JAX) function or a small class; `pipeline` streams
``data.name='video_csv' | 'video_folder'`` through `clip_source`, `HostReadClip` and
`HostEvalClip`. Each piece names the official code it equals, and every deviation:

* temporal sampling: VideoMAE ``kinetics.py`` (`VideoMAE._sample_train_indices`, its
  pretraining draw, and `VideoClsDataset`'s test clips), SlowFast
  ``slowfast/datasets/decoder.py`` (`get_start_end_idx` + `temporal_sampling`) for
  Kinetics-style clips, VideoMAE ``ssv2.py`` (`SSVideoClsDataset.loadvideo_decord`) for
  Something-Something-style segments;
* spatial augmentation: VideoMAE's `GroupMultiScaleCrop` (``transforms.py``); the image host
  path's RandomResizedCrop (`host_crop.sample_crop_box_np`, bicubic) with one box and one flip
  per clip; VideoMAE's validation view; SlowFast's `uniform_crop` multi-view test crops;
* masks: VideoMAE ``masking_generator.py`` `TubeMaskingGenerator` and VideoMAE V2's
  `RunningCellMaskingGenerator`.

Clips are uint8 [T, H, W, 3] (a batch: [N, T, H, W, 3]). `av` (PyAV) is imported inside the
decoding functions, so importing this module needs neither PyAV nor a video.
"""
from __future__ import annotations

import dataclasses
import math
import os
from typing import Any, Optional, Sequence

import numpy as np

from mim_jax.data import sources
from mim_jax.data.host_crop import _resize_box, sample_crop_box_np
from mim_jax.data.sources import DataConfigError, DataError

VIDEO_EXTENSIONS = (".mp4", ".avi", ".webm", ".mkv", ".mov")
SAMPLINGS = ("videomae", "videomae_finetune", "clip", "segment")
VIDEO_SOURCES = ("video_csv", "video_folder")
# Unreadable files in a row before `ClipReader.read` gives up (as records._SkippingSource).
_MAX_CONSECUTIVE_BAD = 64


class VideoDecodeError(DataError):
  """A video file cannot be opened or does not hold the frames asked for."""


# ----------------------------------------------------------------------------------------------
# Temporal sampling.


def _torch_linspace_f32(start: float, end: float, steps: int) -> np.ndarray:
  """``torch.linspace(start, end, steps)`` (float32) as PyTorch's CPU kernel computes it: the
  first half stepped up from ``start``, the second half stepped down from ``end``."""
  start32, end32 = np.float32(start), np.float32(end)
  if steps == 1:
    return np.asarray([start32], np.float32)
  step = np.float32((end32 - start32) / np.float32(steps - 1))
  i = np.arange(steps)
  up = start32 + step * i.astype(np.float32)
  down = end32 - step * (steps - i - 1).astype(np.float32)
  return np.where(i < steps // 2, up, down).astype(np.float32)


def _clip_args(num_video_frames: int, num_frames: int, sampling_rate: int) -> tuple[int, int, int]:
  n, t, rate = int(num_video_frames), int(num_frames), int(sampling_rate)
  if n < 1 or t < 1 or rate < 1:
    raise DataConfigError(f"clip of {t} frames at rate {rate} from a video of {n} frames: "
                          "num_frames, sampling_rate and the video length must be >= 1")
  return n, t, rate


def clip_indices(num_video_frames: int, num_frames: int, sampling_rate: int,
                 rng: Optional[np.random.Generator] = None, clip_idx: int = -1,
                 num_clips: int = 1, use_offset: bool = False) -> np.ndarray:
  """Frame indices of one clip of ``num_frames`` frames, ``sampling_rate`` frames apart.

  Equals SlowFast's `get_start_end_idx` followed by `temporal_sampling`
  (``slowfast/datasets/decoder.py``) for a video already at the target frame rate
  (``fps == target_fps``), so the clip spans ``clip_size = num_frames * sampling_rate`` frames:

  * ``clip_idx == -1`` (training): start uniform in [0, max(n - clip_size, 0)] drawn from
    ``rng`` (SlowFast: Python's ``random.uniform``);
  * ``clip_idx >= 0`` (multi-view test): start ``delta * clip_idx / num_clips``, or with
    ``use_offset`` SlowFast's offset variant (centre for one clip, else
    ``clip_idx * floor(delta / (num_clips - 1))``);
  * then ``num_frames`` points from start to ``start + clip_size - 1`` by torch's float32
    ``linspace`` (reproduced, so the truncation agrees), clamped into [0, n - 1] and truncated
    to int: a video shorter than the clip repeats its last frame.

  Returns:
    int64 [num_frames].
  """
  n, t, _ = _clip_args(num_video_frames, num_frames, sampling_rate)
  clip_size = max(1.0, float(t * int(sampling_rate)))
  delta = max(n - clip_size, 0.0)
  if clip_idx == -1:
    if rng is None:
      raise DataConfigError("clip_idx=-1 (random training clip) needs an rng: pass a "
                            "np.random.Generator, or a clip_idx >= 0 for a test clip")
    start = float(rng.uniform(0.0, delta))
  elif not 0 <= clip_idx < num_clips:
    raise DataConfigError(f"clip_idx={clip_idx} is not in [0, num_clips={num_clips}): pick "
                          "-1 (random) or a test clip index below num_clips")
  elif use_offset:
    start = (math.floor(delta / 2) if num_clips == 1
             else clip_idx * math.floor(delta / (num_clips - 1)))
  else:
    start = delta * clip_idx / num_clips
  index = _torch_linspace_f32(start, start + clip_size - 1, t)
  return np.clip(index, 0, n - 1).astype(np.int64)


def segment_indices(num_video_frames: int, num_segments: int,
                    rng: Optional[np.random.Generator] = None, test_chunk: int = 1) -> np.ndarray:
  """One frame per segment: Something-Something-style sampling.

  Equals VideoMAE's ``ssv2.py`` `SSVideoClsDataset.loadvideo_decord` (TSN sampling; the brief's
  `_get_seq_frames` is SlowFast's differently-rounded version, not this one):

  * training (``rng`` given): the video is cut into ``num_segments`` segments of
    ``n // num_segments`` frames and one frame is drawn uniformly inside each; a video shorter
    than that but longer than ``num_segments`` gets ``num_segments`` sorted uniform draws from
    the whole video, a shorter one frame 0 throughout;
  * test (``rng`` None): with ``tick = n / num_segments`` the official code gathers the segment
    starts ``int(tick * x)`` and middles ``int(tick / 2 + tick * x)``, sorts them and keeps
    every other one from ``chunk_nb`` (its ``test_num_segment = 2`` views): ``test_chunk=1``
    gives the middles (the single-view default), ``test_chunk=0`` the starts.

  Returns:
    int64 [num_segments].
  """
  n, s = int(num_video_frames), int(num_segments)
  if n < 1 or s < 1:
    raise DataConfigError(f"{s} segments from a video of {n} frames: both must be >= 1")
  if rng is None:
    if test_chunk not in (0, 1):
      raise DataConfigError(f"test_chunk={test_chunk}: VideoMAE's SSv2 test views are 0 "
                            "(segment starts) and 1 (segment middles)")
    tick = n / float(s)
    if test_chunk == 1:
      return np.asarray([int(tick / 2.0 + tick * x) for x in range(s)], np.int64)
    return np.asarray([int(tick * x) for x in range(s)], np.int64)
  average = n // s
  if average > 0:
    return np.arange(s, dtype=np.int64) * average + rng.integers(average, size=s)
  if n > s:
    return np.sort(rng.integers(n, size=s)).astype(np.int64)
  return np.zeros(s, np.int64)


def videomae_pretrain_indices(num_video_frames: int, num_frames: int, sampling_rate: int,
                              rng: np.random.Generator) -> np.ndarray:
  """Frame indices of one pretraining clip as VideoMAE draws them.

  Equals ``kinetics.py`` `VideoMAE._sample_train_indices` + `_video_TSN_decord_batch_loader`
  (MCG-NJU/VideoMAE @14ef8d8, :515-556) with the pretraining settings of ``datasets.py``
  (one segment, no temporal jitter), used for Kinetics and SSv2 alike: a 1-based start
  ``o = 1 + U{0, n - T * rate}`` (``o = 1`` when the video is shorter than ``T * rate``), then
  frame ``o - 1`` for each of the ``T`` frames, ``o`` advancing by ``rate`` only while
  ``o + rate < n`` (a short video repeats its last reachable frame). The official draw is
  ``np.random.randint`` on the global generator; here it is ``rng.integers``.

  Returns:
    int64 [num_frames].
  """
  n, t, rate = _clip_args(num_video_frames, num_frames, sampling_rate)
  average = n - t * rate + 1
  offset = 1 + (int(rng.integers(average)) if average > 0 else 0)
  out = []
  for _ in range(t):
    out.append(offset - 1)
    if offset + rate < n:
      offset += rate
  return np.asarray(out, np.int64)


def videomae_test_indices(num_video_frames: int, num_frames: int, sampling_rate: int,
                          chunk: int = 0, num_chunks: int = 1) -> np.ndarray:
  """Frame indices of test clip ``chunk`` of ``num_chunks`` as VideoMAE's multi-view test takes
  them (``kinetics.py`` `VideoClsDataset`, mode 'test': every ``rate``-th frame of the video,
  the last repeated up to ``T``, then ``T`` consecutive ones from
  ``int(chunk * max((len - T) / (num_chunks - 1), 0))``).

  Deviation: with ``num_chunks == 1`` the official step divides by zero; here the one clip is
  the central one, ``round(max(len - T, 0) / 2)`` (the single view the evaluators read).

  Returns:
    int64 [num_frames].
  """
  every = videomae_test_buffer_indices(num_video_frames, num_frames, sampling_rate)
  t = int(num_frames)
  start = _test_start(len(every), t, chunk, num_chunks)
  return every[start:start + t]


def _test_start(length: int, size: int, index: int, count: int) -> int:
  """Start of view ``index`` of ``count`` along an axis of ``length`` (VideoMAE's test:
  ``int(index * (length - size) / (count - 1))``, steps below 0 taken as 0); one view: the
  central one, ``round((length - size) / 2)`` half to even as Python's round (the official
  divides by zero; its validation CenterCrop rounds so)."""
  if not 0 <= index < count:
    raise DataConfigError(f"test view {index} is not in [0, {count})")
  if count == 1:
    return int(round(max(length - size, 0) / 2.0))
  return int(index * max((length - size) / (count - 1), 0.0))


def videomae_finetune_indices(num_video_frames: int, num_frames: int, sampling_rate: int,
                              rng: np.random.Generator) -> np.ndarray:
  """Frame indices of one fine-tuning clip as VideoMAE draws them (``kinetics.py``
  `VideoClsDataset.loadvideo_decord`, modes 'train' and 'validation', one segment): for a video
  longer than ``T * rate``, an end ``e ~ U{T * rate, n - 1}`` and ``T`` points of
  ``np.linspace(e - T * rate, e, T)`` clipped to ``[e - T * rate, e - 1]``, truncated; a
  shorter video takes ``n // rate`` points of ``np.linspace(0, n, n // rate)`` padded with
  ``n`` to ``T``, clipped to ``[0, n - 1]``. The official end is ``np.random.randint`` on the
  global generator; here ``rng.integers``.

  Returns:
    int64 [num_frames].
  """
  n, t, rate = _clip_args(num_video_frames, num_frames, sampling_rate)
  span = t * rate
  if n <= span:
    index = np.linspace(0, n, num=n // rate)
    index = np.concatenate((index, np.ones(t - n // rate) * n))
    return np.clip(index, 0, n - 1).astype(np.int64)
  end = int(rng.integers(span, n))
  index = np.linspace(end - span, end, num=t)
  return np.clip(index, end - span, end - 1).astype(np.int64)


def videomae_test_buffer_indices(num_video_frames: int, num_frames: int,
                                 sampling_rate: int) -> np.ndarray:
  """The frames VideoMAE's test mode decodes (``kinetics.py`` `loadvideo_decord`, mode 'test'):
  every ``rate``-th frame, the last repeated up to ``T``; `videomae_test_views` cuts its views
  from them.

  Returns:
    int64 [max(ceil(n / rate), T)].
  """
  n, t, rate = _clip_args(num_video_frames, num_frames, sampling_rate)
  every = list(range(0, n, rate))
  every += [every[-1]] * (t - len(every))
  return np.asarray(every, np.int64)


# ----------------------------------------------------------------------------------------------
# Decoding (PyAV).


def _av():
  try:
    import av  # pylint: disable=g-import-not-at-top
  except ImportError as e:
    raise DataConfigError("reading videos needs PyAV: pip install 'av>=14,<19' "
                          "(or mim_jax[video])") from e
  return av


def _first_line(e: BaseException) -> str:
  text = str(e).splitlines()
  return f"{type(e).__name__}: {text[0]}" if text else type(e).__name__


def num_frames(path: str | os.PathLike) -> int:
  """Frames in the first video stream of ``path``: the container's count when it has one, else
  counted by decoding.

  Raises:
    VideoDecodeError: the file cannot be opened or has no video stream.
  """
  av = _av()
  try:
    with av.open(os.fspath(path)) as container:
      if not container.streams.video:
        raise VideoDecodeError(f"{path} has no video stream")
      stream = container.streams.video[0]
      count = int(stream.frames) if stream.frames > 0 else sum(1 for _ in container.decode(stream))
  except VideoDecodeError:
    raise
  except Exception as e:  # pylint: disable=broad-except
    raise VideoDecodeError(f"cannot read video {path} ({_first_line(e)})") from e
  if count < 1:
    raise VideoDecodeError(f"video {path} has no frames")
  return count


def decode_frames(path: str | os.PathLike, indices: Sequence[int]) -> np.ndarray:
  """Decodes the frames ``indices`` (any order, repeats allowed) of ``path``'s first video
  stream, from its start (no seeking, so every index is exact).

  Returns:
    uint8 [len(indices), H, W, 3] RGB.

  Raises:
    VideoDecodeError: the file cannot be opened or decoded, or ends before an index
      (a truncated file).
  """
  av = _av()
  indices = np.asarray(indices, np.int64).reshape(-1)
  if indices.size == 0 or indices.min() < 0:
    raise VideoDecodeError(f"bad frame indices {indices.tolist()} for {path}")
  wanted = set(indices.tolist())
  last = int(indices.max())
  got: dict[int, np.ndarray] = {}
  try:
    with av.open(os.fspath(path)) as container:
      if not container.streams.video:
        raise VideoDecodeError(f"{path} has no video stream")
      stream = container.streams.video[0]
      stream.thread_type = "AUTO"
      for i, frame in enumerate(container.decode(stream)):
        if i in wanted:
          got[i] = frame.to_ndarray(format="rgb24")
        if i >= last:
          break
  except VideoDecodeError:
    raise
  except Exception as e:  # pylint: disable=broad-except
    raise VideoDecodeError(f"cannot decode video {path} ({_first_line(e)})") from e
  if last not in got:
    raise VideoDecodeError(f"video {path} ends after {len(got) and max(got) + 1} of the wanted "
                           f"frames (frame {last} asked): the file is truncated or its frame "
                           "count is wrong")
  return np.stack([got[i] for i in indices.tolist()])


# ----------------------------------------------------------------------------------------------
# Listings.


@dataclasses.dataclass(frozen=True)
class VideoListing:
  """Videos and labels: ``paths`` (absolute), ``labels`` int32 [N], ``class_names`` (folder
  listings; a CSV listing names its classes by number)."""
  paths: tuple[str, ...]
  labels: np.ndarray
  class_names: tuple[str, ...]

  def __iter__(self):  # paths, labels = listing
    return iter((list(self.paths), self.labels))


def list_video_csv(csv_path: str | os.PathLike, root: str | os.PathLike = "") -> VideoListing:
  """Reads a Kinetics-style list: one ``path label`` per line, separated by a space (VideoMAE's
  ``train.csv``/``val.csv``/``test.csv``, read there with pandas ``delimiter=' '``, no header)
  or by a comma. A path is taken relative to ``root`` unless absolute; the label is the last
  field, so a path may hold spaces when a comma separates. Blank lines are skipped.

  Raises:
    DataNotFoundError: the list does not exist.
    DataConfigError: a line is not ``path label`` with an integer label, or the list is empty.
  """
  csv_path = sources.require_path(csv_path, "video list", "csv", "a file of 'path label' lines",
                                  is_dir=False)
  root = os.path.expanduser(os.fspath(root)) if root else ""
  paths, labels = [], []
  with open(csv_path, encoding="utf-8") as f:
    for lineno, line in enumerate(f, 1):
      line = line.strip()
      if not line:
        continue
      sep = "," if "," in line else " "
      path, _, label = line.rpartition(sep)
      path = path.strip()
      try:
        label_int = int(label.strip())
      except ValueError:
        label_int = None
      if not path or label_int is None:
        raise DataConfigError(f"line {lineno} of {csv_path} is {line[:80]!r}, not 'path label' "
                              "with an integer label: fix the list given by "
                              "--config.input.data.csv")
      paths.append(os.path.abspath(os.path.join(root, path)) if root else os.path.abspath(path))
      labels.append(label_int)
  if not paths:
    raise DataConfigError(f"video list {csv_path} is empty: set --config.input.data.csv to a "
                          "file of 'path label' lines")
  num_classes = max(labels) + 1
  return VideoListing(tuple(paths), np.asarray(labels, np.int32),
                      tuple(str(c) for c in range(num_classes)))


def list_video_folder(root: str | os.PathLike) -> VideoListing:
  """Lists a folder of class sub-folders of videos (``root/<class>/<video>``, extensions
  `VIDEO_EXTENSIONS`), classes sorted, videos sorted within a class: the layout and order of
  `sources.list_image_folder`, so `sources.split_indices` splits it the same way.

  Raises:
    DataNotFoundError: the folder does not exist.
    DataConfigError: it has no class sub-folders or no videos.
  """
  root = sources.require_path(root, "video folder", "dir", "a folder of class sub-folders")
  classes = sources._class_dirs(root)  # pylint: disable=protected-access
  if not classes:
    raise DataConfigError(f"video folder {root} has no class sub-folders: set "
                          "--config.input.data.dir to a folder laid out as <dir>/<class>/<video>")
  paths, labels = [], []
  for label, name in enumerate(classes):
    names = sources.class_files(root, name, VIDEO_EXTENSIONS)
    paths += [os.path.join(root, name, n) for n in names]
    labels += [label] * len(names)
  if not paths:
    raise DataConfigError(f"no videos ({', '.join(VIDEO_EXTENSIONS)}) found in the class "
                          f"sub-folders of {root}: set --config.input.data.dir to a folder of "
                          "class sub-folders holding videos")
  return VideoListing(tuple(paths), np.asarray(labels, np.int32), tuple(classes))


# ----------------------------------------------------------------------------------------------
# Random-access clip reader.


class ClipReader:
  """Reads one clip per video: ``read(i, rng) -> {'video': uint8 [T,H,W,3], 'label', 'bad',
  'index'}``.

  Temporal sampling (``sampling``): 'videomae' (VideoMAE's pretraining draw,
  `videomae_pretrain_indices`, with an ``rng``; else its test clip ``clip_idx`` of
  ``num_clips``, `videomae_test_indices`), 'videomae_finetune' (its fine-tuning draw,
  `videomae_finetune_indices`; the same test clips), 'clip' (SlowFast, `clip_indices`: ``num_frames``
  frames ``sampling_rate`` apart, random with an ``rng``, else test clip ``clip_idx`` of
  ``num_clips``) or 'segment' (`segment_indices`: ``num_frames`` segments; random with an
  ``rng``, else the segment middles, or with ``num_clips=2`` test clip ``clip_idx`` 0 (the
  segment starts) or 1 (the middles)). ``use_offset`` ('clip' only): SlowFast's
  DATA.USE_OFFSET_SAMPLING test clips (`clip_indices`' ``use_offset``).

  An unreadable, undecodable or truncated video is replaced by the next readable one
  (i+1, i+2, ..., wrapping around) and ``'bad'`` counts the videos skipped: the contract of
  `records._SkippingSource`. More than 64 unreadable videos in a row raise `DataError`.
  """

  def __init__(self, paths: Sequence[str], labels: Sequence[int], num_frames: int,
               sampling_rate: int = 1, sampling: str = "clip", num_clips: int = 1,
               use_offset: bool = False):
    if sampling not in SAMPLINGS:
      raise DataConfigError(f"unknown temporal sampling {sampling!r}: set "
                            "--config.input.data.sampling to 'videomae', 'clip' or 'segment'")
    if len(paths) != len(labels):
      raise DataConfigError(f"{len(paths)} videos but {len(labels)} labels")
    self.paths = [os.fspath(p) for p in paths]
    self.labels = np.asarray(labels, np.int32)
    self.num_frames = int(num_frames)
    self.sampling_rate = int(sampling_rate)
    self.sampling = sampling
    self.num_clips = int(num_clips)
    self.use_offset = bool(use_offset)
    if self.use_offset and sampling != "clip":
      raise DataConfigError(f"input.data.use_offset=True is SlowFast's test-clip placement of "
                            f"'clip' sampling, not {sampling!r}: set it to False")
    if sampling == "segment" and self.num_clips not in (1, 2):
      raise DataConfigError(f"{self.num_clips} test clips of segment sampling: VideoMAE's SSv2 "
                            "test has 1 (segment middles) or 2 (starts, middles)")

  def __len__(self) -> int:
    return len(self.paths)

  def indices(self, video_frames: int, rng: Optional[np.random.Generator],
              clip_idx: int = 0) -> np.ndarray:
    """The frame indices read from a video of ``video_frames`` frames."""
    if self.sampling == "segment":   # test: the segment middles, or chunk clip_idx of two
      return segment_indices(video_frames, self.num_frames, rng,
                             test_chunk=clip_idx if self.num_clips == 2 else 1)
    if self.sampling.startswith("videomae"):
      if rng is None:
        return videomae_test_indices(video_frames, self.num_frames, self.sampling_rate,
                                     clip_idx, self.num_clips)
      draw = (videomae_pretrain_indices if self.sampling == "videomae"
              else videomae_finetune_indices)
      return draw(video_frames, self.num_frames, self.sampling_rate, rng)
    return clip_indices(video_frames, self.num_frames, self.sampling_rate, rng,
                        -1 if rng is not None else clip_idx, self.num_clips, self.use_offset)

  def read(self, i: int, rng: Optional[np.random.Generator] = None,
           clip_idx: int = 0) -> dict[str, Any]:
    """Video ``i``'s clip (drawn with ``rng``, else test clip ``clip_idx``), or the next
    readable video's."""
    return self._read_first_readable(i, lambda n: [self.indices(n, rng, clip_idx)])[0]

  def read_buffer(self, i: int) -> dict[str, Any]:
    """VideoMAE's whole test buffer of video ``i`` (`videomae_test_buffer_indices`), or the
    next readable video's."""
    return self._read_first_readable(i, lambda n: [videomae_test_buffer_indices(
        n, self.num_frames, self.sampling_rate)])[0]

  def read_test_clips(self, i: int) -> list[dict[str, Any]]:
    """Every test clip (``clip_idx`` 0 .. num_clips-1) of video ``i``, or of the next readable
    video: the union of their frames decoded once, so all clips come from one video."""
    return self._read_first_readable(
        i, lambda n: [self.indices(n, None, c) for c in range(self.num_clips)])

  def _read_first_readable(self, i: int, pick) -> list[dict[str, Any]]:
    """``pick(video_frames)`` -> index arrays; decodes them from video ``i`` or the first
    readable video after it, one record per array."""
    n = len(self.paths)
    i = int(i)
    for skipped in range(min(_MAX_CONSECUTIVE_BAD, n)):
      j = (i + skipped) % n
      try:
        wanted = pick(num_frames(self.paths[j]))
        frames = decode_frames(self.paths[j], np.concatenate(wanted))
      except (VideoDecodeError, OSError):
        continue
      clips = np.split(frames, np.cumsum([len(w) for w in wanted])[:-1])
      return [{"video": c, "label": np.int32(self.labels[j]), "bad": np.int32(skipped),
               "index": np.int32(j)} for c in clips]
    raise DataError(f"{min(_MAX_CONSECUTIVE_BAD, n)} unreadable videos in a row from video {i} "
                    f"({self.paths[i % n]}): check the video files")


# ----------------------------------------------------------------------------------------------
# Clip-consistent spatial augmentation.


def random_resized_crop_flip_clip(video: np.ndarray, size: int, scale: Sequence[float],
                                  ratio: Sequence[float], hflip: bool,
                                  rng: np.random.Generator) -> np.ndarray:
  """RandomResizedCrop + horizontal flip with ONE box and ONE flip decision for the whole clip.

  The box is drawn by the image host path's `host_crop.sample_crop_box_np` (torchvision
  RandomResizedCrop's rule, float box) and every frame is resampled from it with the host path's
  bicubic (antialiased PIL) resize; then, when ``hflip``, one ``rng.uniform() < 0.5`` flips
  every frame. The draws are those of `host_crop.crop_flip`, in that order, so a one-frame clip
  equals `crop_flip` of its frame. (VideoMAE's pretraining uses GroupMultiScaleCrop instead and
  its fine-tuning a torchvision-style per-clip RandomResizedCrop: this is the latter.)

  Args:
    video: uint8 [T, H, W, 3].

  Returns:
    uint8 [T, size, size, 3].
  """
  video = np.asarray(video)
  box = sample_crop_box_np(rng, video.shape[1], video.shape[2], scale, ratio)
  out = np.stack([_resize_box(frame, box, int(size)) for frame in video])
  if hflip and rng.uniform() < 0.5:
    out = np.ascontiguousarray(out[:, :, ::-1])
  return out


def _torch_bilinear_weights(in_size: int, out_size: int) -> tuple[np.ndarray, np.ndarray,
                                                                  np.ndarray]:
  """Source rows (lo, hi) and weight of hi for ``F.interpolate(mode='bilinear',
  align_corners=False)`` along one axis."""
  scale = in_size / out_size
  src = np.maximum((np.arange(out_size) + 0.5) * scale - 0.5, 0.0)
  lo = src.astype(np.int64)
  hi = np.minimum(lo + 1, in_size - 1)
  return lo, hi, (src - lo).astype(np.float32)


def short_side_resize(video: np.ndarray, size: int) -> np.ndarray:
  """SlowFast's `random_short_side_scale_jitter` with min = max = ``size``: the short side to
  ``size``, the long side to ``floor(long / short * size)``, torch bilinear
  (``align_corners=False``, no antialias), reproduced in NumPy.

  Returns:
    float32 [T, h, w, 3], not rounded (SlowFast resizes float frames).
  """
  video = np.asarray(video, np.float32)
  height, width = video.shape[1:3]
  if width < height:
    new_w, new_h = size, int(math.floor(height / width * size))
  else:
    new_h, new_w = size, int(math.floor(width / height * size))
  return _bilinear_resize(video, new_h, new_w)


def _bilinear_resize(video: np.ndarray, new_h: int, new_w: int) -> np.ndarray:
  """float32 [T, h, w, C] -> [T, new_h, new_w, C], bilinear at half-pixel centres without
  antialiasing (torch ``align_corners=False``; OpenCV's INTER_LINEAR samples the same points)."""
  video = np.asarray(video, np.float32)
  height, width = video.shape[1:3]
  if (new_h, new_w) == (height, width):
    return video
  y0, y1, wy = _torch_bilinear_weights(height, new_h)
  x0, x1, wx = _torch_bilinear_weights(width, new_w)
  rows = (video[:, y0] * (1 - wy)[None, :, None, None] + video[:, y1] * wy[None, :, None, None])
  return (rows[:, :, x0] * (1 - wx)[None, None, :, None]
          + rows[:, :, x1] * wx[None, None, :, None]).astype(np.float32)


def center_crops_clip(video: np.ndarray, size: int, num_crops: int = 3) -> np.ndarray:
  """SlowFast's multi-view test spatial crops (``NUM_SPATIAL_CROPS``): `short_side_resize` to
  ``size``, then `uniform_crop` with ``spatial_idx`` 0, 1, 2 (left, centre, right of a wide
  clip; top, centre, bottom of a tall one; offsets ``ceil((side - size) / 2)`` for the centre)
  or, for ``num_crops=1``, the centre crop alone.

  Returns:
    float32 [num_crops, T, size, size, 3].
  """
  if num_crops not in (1, 3):
    raise DataConfigError(f"num_crops={num_crops}: SlowFast's uniform crops are 1 (centre) "
                          "or 3 (left/top, centre, right/bottom)")
  frames = short_side_resize(video, int(size))
  height, width = frames.shape[1:3]
  crops = []
  for spatial_idx in ((1,) if num_crops == 1 else (0, 1, 2)):
    y = int(math.ceil((height - size) / 2))
    x = int(math.ceil((width - size) / 2))
    if height > width:
      y = {0: 0, 1: y, 2: height - size}[spatial_idx]
    else:
      x = {0: 0, 1: x, 2: width - size}[spatial_idx]
    crops.append(frames[:, y:y + size, x:x + size])
  return np.stack(crops)


MULTISCALE_SCALES = (1.0, 0.875, 0.75, 0.66)
_MULTISCALE_OFFSETS = ((0, 0), (4, 0), (0, 4), (4, 4), (2, 2), (0, 2), (4, 2), (2, 4), (2, 0),
                       (1, 1), (3, 1), (1, 3), (3, 3))   # (x, y) in quarter steps


def multiscale_crop_box(rng: np.random.Generator, height: int, width: int, size: int,
                        scales: Sequence[float] = MULTISCALE_SCALES,
                        max_distort: int = 1) -> tuple[int, int, int, int]:
  """VideoMAE's pretraining crop box (``transforms.py`` `GroupMultiScaleCrop` with its defaults
  ``max_distort=1, fix_crop=True, more_fix_crop=True``): a side of ``int(short * s)`` for each
  scale (snapped to ``size`` when within 3 pixels), one (width, height) pair of scales at most
  ``max_distort`` apart drawn uniformly (``random.choice`` over the official pair order), then
  one of the 13 fixed offsets (corners, centre, edge centres, quarter points; steps of
  ``(side - crop) // 4``). The two draws are ``rng.integers`` here.

  Returns:
    (left, top, crop_width, crop_height), integer pixels.
  """
  base = min(int(width), int(height))
  sides = [int(base * x) for x in scales]
  snapped = [int(size) if abs(x - int(size)) < 3 else x for x in sides]
  pairs = [(w, h) for i, h in enumerate(snapped) for j, w in enumerate(snapped)
           if abs(i - j) <= max_distort]
  crop_w, crop_h = pairs[int(rng.integers(len(pairs)))]
  w_step, h_step = (int(width) - crop_w) // 4, (int(height) - crop_h) // 4
  qx, qy = _MULTISCALE_OFFSETS[int(rng.integers(len(_MULTISCALE_OFFSETS)))]
  return qx * w_step, qy * h_step, crop_w, crop_h


def multiscale_crop_clip(video: np.ndarray, size: int, rng: np.random.Generator) -> np.ndarray:
  """`multiscale_crop_box` once per clip, every frame cut by PIL's ``crop`` and resized to
  ``size`` x ``size`` by PIL's bilinear ``resize``, as the official transform does (no flip:
  VideoMAE pretrains without one).

  Returns:
    uint8 [T, size, size, 3].
  """
  from PIL import Image  # pylint: disable=g-import-not-at-top
  video = np.asarray(video)
  left, top, w, h = multiscale_crop_box(rng, video.shape[1], video.shape[2], size)
  return np.stack([np.asarray(Image.fromarray(f).crop((left, top, left + w, top + h))
                              .resize((int(size), int(size)), Image.Resampling.BILINEAR))
                   for f in video])


def _videomae_resize(video: np.ndarray, size: int) -> np.ndarray:
  """``video_transforms.Resize(size, 'bilinear')`` of VideoMAE's evaluation: the short side to
  ``size``, the long side ``int(size * long / short)``, unchanged when the short side is
  already ``size``. The resize samples the points OpenCV's INTER_LINEAR samples, in float
  (OpenCV's fixed-point weights can differ by one level once rounded)."""
  height, width = video.shape[1:3]
  if (width <= height and width == size) or (height <= width and height == size):
    return np.asarray(video, np.float32)
  if width < height:
    return _bilinear_resize(video, int(size * height / width), size)
  return _bilinear_resize(video, size, int(size * width / height))


def videomae_test_views(buffer: np.ndarray, num_frames: int, size: int, num_chunks: int = 1,
                        num_crops: int = 1) -> np.ndarray:
  """VideoMAE's multi-view test (``kinetics.py`` `VideoClsDataset`, mode 'test'): the test
  buffer (`videomae_test_buffer_indices` frames) resized (`_videomae_resize`), then for each
  temporal chunk and spatial crop (in that order) ``T`` frames from
  ``int(chunk * (L - T) / (num_chunks - 1))`` and ``size`` pixels along the long side from
  ``int(crop * (long - size) / (num_crops - 1))`` (the whole short side). One chunk or one crop
  is the central one (`_test_start`; the official divides by zero there), so 1 x 1 is the
  validation view: the central clip, centre-cropped as ``CenterCrop``.

  Returns:
    uint8 [num_chunks * num_crops, T, size, size, 3].
  """
  size, t = int(size), int(num_frames)
  frames = _videomae_resize(np.asarray(buffer), size)
  height, width = frames.shape[1:3]
  if height < size or width < size:
    raise DataConfigError(f"a {height}x{width} clip is smaller than the {size}-pixel crop")
  views = []
  for chunk in range(num_chunks):
    t0 = _test_start(frames.shape[0], t, chunk, num_chunks)
    for crop in range(num_crops):
      if height >= width:
        y, x = _test_start(height, size, crop, num_crops), _test_start(width, size, 0, 1)
      else:
        y, x = _test_start(height, size, 0, 1), _test_start(width, size, crop, num_crops)
      views.append(frames[t0:t0 + t, y:y + size, x:x + size])
  return np.clip(np.rint(np.stack(views)), 0, 255).astype(np.uint8)


# ----------------------------------------------------------------------------------------------
# Streaming: a split of a video listing as a grain source, and the grain transforms that decode
# and crop its clips in the workers (wired in by `pipeline`).

VIDEO_CROPS = ("random_resized", "multiscale")


class ClipSource:
  """``source[i] -> i`` over the videos of one split; `reader` (a `ClipReader`) decodes them in
  the grain workers (`HostReadClip`, `HostEvalClip`), skipping unreadable files."""

  def __init__(self, reader: ClipReader, class_names: Sequence[str], tag: str):
    self.reader = reader
    self.class_names = list(class_names)
    self._tag = tag

  def __len__(self) -> int:
    return len(self.reader)

  def __getitem__(self, index: int) -> int:
    index = int(index)
    if not 0 <= index < len(self):
      raise IndexError(f"video {index} out of range [0, {len(self)})")
    return index

  def __repr__(self) -> str:
    # Deterministic: grain compares it when restoring an iterator state.
    return f"ClipSource(num_videos={len(self)}, tag={self._tag!r})"


def clip_source(data_cfg: Any, split: str) -> ClipSource:
  """The videos of ``split`` ('train', 'eval' or 'pretrain') of a streaming video config.

  ``data.name='video_folder'``: ``data.dir`` laid out ``<dir>/<class>/<video>``, split with the
  image folders' seeded per-class hold-out (``holdout_per_class``, ``holdout_seed``) and
  ``train_subset``. ``data.name='video_csv'``: the ``path label`` list ``data.csv`` (paths
  relative to ``data.dir`` when set), split the same way; with ``data.eval_csv`` (Kinetics'
  ``val.csv``) the 'eval' split is that whole list instead of the hold-out. Clip keys:
  ``num_frames`` (16), ``sampling_rate`` (4), ``sampling`` ('videomae', see `ClipReader`);
  ``use_offset`` (False; 'clip' sampling's SlowFast test-clip placement);
  ``test_views`` (temporal clips, spatial crops) is read by `HostEvalClip`.
  """
  import hashlib  # pylint: disable=g-import-not-at-top
  get = sources._get  # pylint: disable=protected-access
  name = get(data_cfg, "name")
  if name == "video_folder":
    listing = list_video_folder(get(data_cfg, "dir"))
    where = os.path.abspath(os.path.expanduser(get(data_cfg, "dir")))
  elif name == "video_csv":
    listing = list_video_csv(get(data_cfg, "csv"), get(data_cfg, "dir", ""))
    where = os.fspath(get(data_cfg, "csv"))
  else:
    raise DataConfigError(f"data.name={name!r} is not a video source: use one of "
                          f"{', '.join(VIDEO_SOURCES)}")
  class_names = listing.class_names
  if split == "eval" and name == "video_csv" and get(data_cfg, "eval_csv", ""):
    listing = list_video_csv(get(data_cfg, "eval_csv"), get(data_cfg, "dir", ""))
    select = np.arange(len(listing.paths))
    where = os.fspath(get(data_cfg, "eval_csv"))
  else:
    select = sources._config_split_indices(  # pylint: disable=protected-access
        data_cfg, listing.labels, split, class_names, where)
  paths = [listing.paths[i] for i in select]
  sampling = get(data_cfg, "sampling", "videomae")
  reader = ClipReader(paths, listing.labels[select], int(get(data_cfg, "num_frames", 16)),
                      int(get(data_cfg, "sampling_rate", 4)), sampling,
                      use_offset=bool(get(data_cfg, "use_offset", False)))
  digest = hashlib.sha1("\n".join(paths).encode()).hexdigest()[:12]
  tag = (f"{name}:{split}:{get(data_cfg, 'holdout_per_class', 0)}:"
         f"{get(data_cfg, 'holdout_seed', 0)}:subset={get(data_cfg, 'train_subset', 0)}:"
         f"{get(data_cfg, 'subset_seed', 0)}:{reader.num_frames}x{reader.sampling_rate}:"
         f"{sampling}:{digest}")
  return ClipSource(reader, class_names, tag)


class HostReadClip:
  """grain RandomMap: a video index -> its training clip, ``{'image': uint8 [T, size, size, 3],
  'label', 'bad', 'index'}``: `ClipReader.read` with the record's rng (temporal draw; an
  unreadable video is replaced by the next readable one and counted in 'bad'), then one crop
  per clip from the same rng: ``crop='multiscale'`` (VideoMAE's pretraining,
  `multiscale_crop_clip`) or 'random_resized' (`random_resized_crop_flip_clip` with
  ``scale``, ``ratio``, ``hflip``). With ``num_sample`` n > 1 (repeated augmentation, SlowFast's
  AUG.NUM_SAMPLE: the clip decoded once, each copy cropped on its own, as `Kinetics.__getitem__`
  does) 'image' is uint8 [n, T, size, size, 3] and 'label', 'bad', 'index' are [n] ('bad' on
  the first copy only, so a skipped video counts once)."""

  def __init__(self, reader: ClipReader, size: int, crop: str, scale: Sequence[float],
               ratio: Sequence[float], hflip: bool, num_sample: int = 1):
    if crop not in VIDEO_CROPS:
      raise DataConfigError(f"unknown video crop {crop!r}: set --config.input.aug.video_crop to "
                            "'random_resized' or 'multiscale'")
    self.reader = reader
    self.size = int(size)
    self.crop = crop
    self.scale = tuple(float(x) for x in scale)
    self.ratio = tuple(float(x) for x in ratio)
    self.hflip = bool(hflip)
    self.num_sample = int(num_sample)

  def _crop(self, video: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    if self.crop == "multiscale":
      return multiscale_crop_clip(video, self.size, rng)
    return random_resized_crop_flip_clip(video, self.size, self.scale, self.ratio, self.hflip,
                                         rng)

  def random_map(self, element: Any, rng: np.random.Generator) -> dict[str, Any]:
    record = self.reader.read(int(element), rng)
    if self.num_sample == 1:
      return {"image": self._crop(record["video"], rng), "label": record["label"],
              "bad": record["bad"], "index": record["index"]}
    n = self.num_sample
    bad = np.zeros(n, np.int32)
    bad[0] = record["bad"]
    return {"image": np.stack([self._crop(record["video"], rng) for _ in range(n)]),
            "label": np.full(n, record["label"], np.int32), "bad": bad,
            "index": np.full(n, record["index"], np.int32)}


class HostEvalClip:
  """grain Map: a video index -> its evaluation clip, ``{'image': uint8 [T, size, size, 3],
  'label'}``. VideoMAE's samplings decode the test buffer once and cut the views from it
  (`videomae_test_views`, as `VideoClsDataset`'s test); 'clip' and 'segment' read each
  temporal test clip of the reader (segment: SSv2's starts and middles) and cut the spatial
  crops as VideoMAE's test does. With ``views=(chunks, crops)`` other than (1, 1), 'image'
  holds every view, chunk-major: uint8 [chunks * crops, T, size, size, 3]."""

  def __init__(self, reader: ClipReader, size: int, views: Sequence[int] = (1, 1)):
    self.size = int(size)
    self.views = (int(views[0]), int(views[1]))
    if min(self.views) < 1:
      raise DataConfigError(f"input.data.test_views={list(self.views)}: use positive counts "
                            "(temporal clips, spatial crops)")
    # The reader's test clips are this test's temporal views.
    self.reader = ClipReader(reader.paths, reader.labels, reader.num_frames,
                             reader.sampling_rate, reader.sampling, num_clips=self.views[0],
                             use_offset=reader.use_offset)
    self.buffered = reader.sampling.startswith("videomae")

  def map(self, element: Any) -> dict[str, Any]:
    chunks, crops = self.views
    t = self.reader.num_frames
    if self.buffered:
      record = self.reader.read_buffer(int(element))
      views = videomae_test_views(record["video"], t, self.size, chunks, crops)
    else:
      records = self.reader.read_test_clips(int(element))
      record = records[0]
      views = np.concatenate([videomae_test_views(r["video"], t, self.size, 1, crops)
                              for r in records])
    return {"image": views[0] if self.views == (1, 1) else views, "label": record["label"]}


def test_views(data_cfg: Any) -> tuple[int, int]:
  """``input.data.test_views`` (temporal chunks, spatial crops) of a streamed video config;
  (1, 1) otherwise."""
  if sources._get(data_cfg, "name") not in VIDEO_SOURCES:  # pylint: disable=protected-access
    return (1, 1)
  views = sources._get(data_cfg, "test_views", (1, 1)) or (1, 1)  # pylint: disable=protected-access
  return int(views[0]), int(views[1])


# ----------------------------------------------------------------------------------------------
# The embedded synthetic clip set.


def _bilinear_views(images: np.ndarray, windows: np.ndarray, size: int) -> np.ndarray:
  """Window ``windows[n, f]`` = (top, left, height, width) of ``images[n]`` (source pixel
  units) resampled to size x size by bilinear interpolation at the output pixel centres (edges
  clamped), for every clip n and frame f at once: images [N, H, W, C], windows [N, F, 4] ->
  float32 [N, F, size, size, C] (tests/test_video_data.py checks it against a one-window loop,
  bit for bit)."""
  img = images.astype(np.float32)
  num, h, w = img.shape[:3]
  top, left, height, width = (windows[..., i:i + 1] for i in range(4))        # [N, F, 1]
  ys = np.clip(top + (np.arange(size) + 0.5) * height / size - 0.5, 0, h - 1)   # [N, F, size]
  xs = np.clip(left + (np.arange(size) + 0.5) * width / size - 0.5, 0, w - 1)
  y0 = np.minimum(np.floor(ys).astype(np.int64), h - 1)
  x0 = np.minimum(np.floor(xs).astype(np.int64), w - 1)
  y1, x1 = np.minimum(y0 + 1, h - 1), np.minimum(x0 + 1, w - 1)
  wy, wx = (ys - y0)[..., :, None, None], (xs - x0)[..., None, :, None]
  flat = img.reshape(num * h * w, img.shape[3])
  base = (np.arange(num) * h * w)[:, None, None, None]

  def at(yy, xx):   # images[n][yy[n, f]][:, xx[n, f]]: [N, F, size, size, C]
    return flat[base + yy[..., :, None] * w + xx[..., None, :]]

  rows0 = at(y0, x0) * (1 - wx) + at(y0, x1) * wx
  rows1 = at(y1, x0) * (1 - wx) + at(y1, x1) * wx
  return rows0 * (1 - wy) + rows1 * wy


def synth_windows(rng: np.random.Generator, height: int, width: int,
                  num_frames: int) -> tuple[str, np.ndarray]:
  """One clip's camera move over a height x width image: ``(kind, windows)``, windows float64
  [num_frames, 4] = (top, left, h, w) in source pixels, square, inside the image.

  * 'pan' (probability 1/2): a window of side ``s * min(H, W)``, s ~ U(0.5, 0.8), slides
    linearly from one point to another, along a direction ~ U(0, 2 pi), covering a fraction
    ~ U(0.5, 1) of the largest move in that direction that keeps it inside;
  * 'zoom': the side goes linearly from s0 to s1 (one of U(0.45, 0.65), the other of
    U(0.85, 1.0); in or out with probability 1/2) around a fixed point kept inside, drawn so
    the largest window fits.
  """
  short = float(min(height, width))
  t = np.linspace(0.0, 1.0, num_frames)
  if rng.uniform() < 0.5:
    side = short * rng.uniform(0.5, 0.8)
    angle = rng.uniform(0.0, 2 * math.pi)
    dy, dx = math.sin(angle), math.cos(angle)
    room_y, room_x = height - side, width - side
    # Longest move along (dy, dx) inside [0, room]^2, starting from the far corner side.
    reach = min(room_y / abs(dy) if abs(dy) > 1e-9 else math.inf,
                room_x / abs(dx) if abs(dx) > 1e-9 else math.inf)
    length = reach * rng.uniform(0.5, 1.0)
    y_start = (room_y - length * dy) / 2 + rng.uniform(-0.5, 0.5) * (room_y - length * abs(dy))
    x_start = (room_x - length * dx) / 2 + rng.uniform(-0.5, 0.5) * (room_x - length * abs(dx))
    tops = np.clip(y_start + t * length * dy, 0, room_y)
    lefts = np.clip(x_start + t * length * dx, 0, room_x)
    sides = np.full(num_frames, side)
    kind = "pan"
  else:
    small, large = rng.uniform(0.45, 0.65) * short, rng.uniform(0.85, 1.0) * short
    s0, s1 = (large, small) if rng.uniform() < 0.5 else (small, large)
    cy = rng.uniform(large / 2, height - large / 2)
    cx = rng.uniform(large / 2, width - large / 2)
    sides = s0 + t * (s1 - s0)
    tops, lefts = cy - sides / 2, cx - sides / 2
    kind = "zoom"
  return kind, np.stack([tops, lefts, sides, sides], axis=1)


def synth_clips(images: np.ndarray, labels: np.ndarray, num_frames: int = 8, size: int = 32,
                seed: int = 0, ids: Optional[np.ndarray] = None,
                return_windows: bool = False) -> tuple[np.ndarray, ...]:
  """Turns photographs into short clips by a camera move over each (`synth_windows`: a pan or a
  zoom, drawn from ``np.random.Generator(PCG64([seed, id]))`` per clip). Every frame is a real
  view of its image, bilinearly resampled to size x size (a window of an upsampled copy).

  Args:
    images: uint8 [N, H, W, 3].
    labels: [N], returned as int32.
    ids: [N] per-clip seed keys (default ``arange(N)``): a clip depends only on its image,
      ``seed`` and its id, not on which other images are in the batch.
    return_windows: also return the float64 [N, num_frames, 4] windows.

  Returns:
    (uint8 [N, num_frames, size, size, 3], int32 [N]) (+ windows).
  """
  images = np.asarray(images)
  ids = np.arange(images.shape[0]) if ids is None else np.asarray(ids)
  clips = np.empty((images.shape[0], num_frames, size, size, 3), np.uint8)
  windows = np.empty((images.shape[0], num_frames, 4))
  for n, (image, key) in enumerate(zip(images, ids)):
    rng = np.random.Generator(np.random.PCG64([int(seed), int(key)]))
    _, windows[n] = synth_windows(rng, image.shape[0], image.shape[1], num_frames)
  for start in range(0, images.shape[0], 16):   # (one image shape: images is one array)
    part = slice(start, start + 16)
    clips[part] = np.clip(np.round(_bilinear_views(images[part], windows[part], size)), 0, 255)
  out = (clips, np.asarray(labels, np.int32))
  return out + (windows,) if return_windows else out


_CLIP_CACHE: dict[tuple, tuple[np.ndarray, np.ndarray]] = {}


# The embedded clip set's frame size and motion seed (`embedded_clips` and the 'embedded_clips'
# data source both make their clips with these).
CLIP_SIZE, CLIP_SEED = 32, 0


def embedded_clip_rows(rows: np.ndarray, num_frames: int, size: int = CLIP_SIZE,
                       seed: int = CLIP_SEED) -> np.ndarray:
  """`synth_clips` of the decodable embedded images at positions ``rows`` (among the decodable
  ones; each clip keyed by its image's position in the set), memoised per process clip by clip:
  a clip is made the first time a split asks for it. uint8 [len(rows), num_frames, size, size, 3]."""
  images, labels, _, ok = sources._decoded_embedded()  # pylint: disable=protected-access
  key = (str(sources.EMBEDDED_PATH), sources.EMBEDDED_PATH.stat().st_mtime_ns, int(num_frames),
         int(size), int(seed))
  if key not in _CLIP_CACHE:
    if len(_CLIP_CACHE) >= 2:
      _CLIP_CACHE.clear()
    _CLIP_CACHE[key] = (np.empty((images.shape[0], int(num_frames), int(size), int(size), 3),
                                 np.uint8), np.zeros(images.shape[0], bool))
  clips, done = _CLIP_CACHE[key]
  missing = rows[~done[rows]]
  if missing.size:
    clips[missing] = synth_clips(images[missing], labels[ok][missing], int(num_frames), int(size),
                                 int(seed), np.flatnonzero(ok)[missing])[0]
    done[missing] = True
  return clips[rows]


def embedded_clips(split: str, holdout_per_class: int = 100, num_frames: int = 8,
                   size: int = CLIP_SIZE, holdout_seed: int = 0, seed: int = CLIP_SEED,
                   train_subset: Any = 0,
                   subset_seed: int = 0) -> tuple[np.ndarray, np.ndarray, list[str]]:
  """The embedded clip set: `synth_clips` of the embedded CIFAR-10 photographs of ``split``,
  split exactly as the embedded image set (`sources.split_indices`, same hold-out and
  ``train_subset`` of 'pretrain'), each clip keyed by its image's position in the embedded set
  (a clip is made once per process and kept).

  Returns:
    (uint8 [N, num_frames, size, size, 3], int32 [N], class names).
  """
  data_cfg = dict(holdout_per_class=holdout_per_class, holdout_seed=holdout_seed,
                  train_subset=train_subset, subset_seed=subset_seed)
  rows, labels, class_names, _ = sources.embedded_rows(data_cfg, split, "the embedded clip set")
  return embedded_clip_rows(rows, num_frames, size, seed), labels, class_names


# ----------------------------------------------------------------------------------------------
# Masks (JAX).


def tube_mask(rng, batch: int, t_grid: int, h: int, w: int, ratio: float):
  """VideoMAE's `TubeMaskingGenerator` (``masking_generator.py``): per sample, one spatial mask
  of exactly ``int(ratio * h * w)`` of the h x w patches (a uniformly random subset: the ranks
  of iid noise; the official code shuffles with NumPy) repeated over all ``t_grid`` time slices.

  Returns:
    bool [batch, t_grid, h, w], True = masked.
  """
  import jax  # pylint: disable=g-import-not-at-top
  import jax.numpy as jnp  # pylint: disable=g-import-not-at-top
  count = int(ratio * h * w)
  noise = jax.random.uniform(rng, (batch, h * w))
  ranks = jnp.argsort(jnp.argsort(noise, axis=1), axis=1)
  spatial = (ranks < count).reshape(batch, 1, h, w)
  return jnp.broadcast_to(spatial, (batch, t_grid, h, w))


def running_cell_mask(batch: int, t_grid: int, h: int, w: int, ratio: float = 0.5, rng=None):
  """VideoMAE V2's decoder masking, `RunningCellMaskingGenerator` (``dataset/masking_generator.py``).

  A 2x2 cell holds ``m = int(4 * ratio)`` masked positions (0 < m < 4) at the front of a queue
  ``[1]*m + [0]*(4-m)``; the cell is read from a pointer ``p`` that advances by one each time
  slice (read before slice 0 too, so slice t uses ``p + t + 1``), and tiled over the h x w grid:
  ``mask[t, i, j] = queue[(2 * (i % 2) + j % 2 + p + t + 1) % 4]``. Every slice has exactly
  ``m * h * w / 4`` masked patches and the pattern cycles with period 4. The official code draws
  ``p`` uniformly from 0..3 per sample: so does ``rng`` here; without one ``p = 0``.

  Returns:
    bool [batch, t_grid, h, w], True = masked (VideoMAE V2 decodes only the False patches).
  """
  import jax  # pylint: disable=g-import-not-at-top
  import jax.numpy as jnp  # pylint: disable=g-import-not-at-top
  m = int(4 * ratio)
  if not 0 < m < 4:
    raise ValueError(f"running-cell mask ratio {ratio} leaves {m} of 4 cell positions masked: "
                     "use a ratio in [0.25, 1)")
  if h % 2 or w % 2:
    raise ValueError(f"running-cell masking tiles 2x2 cells: the patch grid {h}x{w} must be even")
  if rng is None:
    ptr = jnp.zeros((batch,), jnp.int32)
  else:
    ptr = jax.random.randint(rng, (batch,), 0, 4)
  i = jnp.arange(h)[:, None] % 2
  j = jnp.arange(w)[None, :] % 2
  t = jnp.arange(t_grid)[:, None, None]
  pos = (2 * i + j)[None] + t + 1                                     # [t, h, w]
  return ((pos[None] + ptr[:, None, None, None]) % 4) < m
