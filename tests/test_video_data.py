"""Video data layer (mim_jax/data/video.py): temporal sampling, PyAV decoding, listings, the
skipping clip reader, clip-consistent augmentation, synthetic clips and the video masks."""
import os

import jax
import numpy as np
import pytest

from helpers import frame_colour as _colour, frame_numbers as _frame_numbers, write_video as _write
from mim_jax.data import host_crop, sources
from mim_jax.data import video as V


# ----------------------------------------------------------------------------------------------
# Temporal sampling.


def test_clip_indices_test_views_hand_worked():
  # 100 frames, 8 frames at rate 4: clip_size 32, delta 68, three uniform test clips.
  assert V.clip_indices(100, 8, 4, clip_idx=0, num_clips=3).tolist() == [0, 4, 8, 13, 17, 22,
                                                                           26, 31]
  assert V.clip_indices(100, 8, 4, clip_idx=1, num_clips=3).tolist() == [22, 27, 31, 35, 40, 44,
                                                                           49, 53]
  assert V.clip_indices(100, 8, 4, clip_idx=2, num_clips=3).tolist() == [45, 49, 54, 58, 63, 67,
                                                                           71, 76]
  # SlowFast's use_offset variant: one clip is the centre one (start floor(68 / 2) = 34).
  assert V.clip_indices(100, 8, 4, clip_idx=0, num_clips=1,
                        use_offset=True).tolist() == [34, 38, 42, 47, 51, 56, 60, 65]
  # A video shorter than the clip: delta 0, indices clamped to the last frame.
  assert V.clip_indices(10, 8, 4, clip_idx=0).tolist() == [0, 4, 8, 9, 9, 9, 9, 9]
  assert V.clip_indices(1, 4, 2, clip_idx=0).tolist() == [0, 0, 0, 0]


def test_clip_indices_match_official_formula():
  # SlowFast: linspace(start, start + clip_size - 1, T), clamped, truncated. Reference in exact
  # rational arithmetic: torch's float32 linspace lands on the exact integers (e.g. 69/3 = 23),
  # where a float64 np.linspace gives 22.999... and truncates to 22.
  from fractions import Fraction
  rng = np.random.default_rng(0)
  for _ in range(300):
    n, t, r = int(rng.integers(1, 300)), int(rng.integers(1, 17)), int(rng.integers(1, 9))
    k = int(rng.integers(1, 6))
    c = int(rng.integers(k))
    clip_size = t * r
    start = Fraction(max(n - clip_size, 0) * c, k)
    step = Fraction(clip_size - 1, max(t - 1, 1))
    want = [min(int(start + i * step), n - 1) for i in range(t)]
    assert V.clip_indices(n, t, r, clip_idx=c, num_clips=k).tolist() == want, (n, t, r, k, c)
  assert V.clip_indices(70, 10, 6, clip_idx=1, num_clips=3)[3] == 23


def test_clip_indices_training_range():
  starts = []
  for seed in range(200):
    idx = V.clip_indices(100, 8, 4, np.random.default_rng(seed))
    assert idx.shape == (8,) and idx.dtype == np.int64
    assert 0 <= idx[0] <= 68 and idx[-1] <= 99
    assert np.all(np.diff(idx) >= 4) and np.all(np.diff(idx) <= 5)   # 31 / 7 apart, truncated
    starts.append(idx[0])
  assert min(starts) <= 3 and max(starts) >= 64                     # covers [0, delta]
  np.testing.assert_array_equal(V.clip_indices(100, 8, 4, np.random.default_rng(5)),
                                V.clip_indices(100, 8, 4, np.random.default_rng(5)))
  with pytest.raises(sources.DataConfigError, match="rng"):
    V.clip_indices(100, 8, 4)


def test_segment_indices():
  # Test view: tick = 30 / 8 = 3.75; middles int(1.875 + 3.75 x), starts int(3.75 x).
  assert V.segment_indices(30, 8).tolist() == [1, 5, 9, 13, 16, 20, 24, 28]
  assert V.segment_indices(30, 8, test_chunk=0).tolist() == [0, 3, 7, 11, 15, 18, 22, 26]
  # The official construction: starts and middles sorted, every other one from chunk_nb.
  for n in (3, 8, 17, 30, 101):
    tick = n / 8.0
    both = sorted([int(tick / 2.0 + tick * x) for x in range(8)]
                  + [int(tick * x) for x in range(8)])
    for chunk in (0, 1):
      assert V.segment_indices(n, 8, test_chunk=chunk).tolist() == both[chunk::2]
  # Training: one uniform frame in each of the 8 segments of 30 // 8 = 3 frames.
  seen = np.zeros((8, 3), bool)
  for seed in range(50):
    idx = V.segment_indices(30, 8, np.random.default_rng(seed))
    offset = idx - 3 * np.arange(8)
    assert np.all((offset >= 0) & (offset < 3))
    seen[np.arange(8), offset] = True
  assert seen.all()
  assert V.segment_indices(10, 8, np.random.default_rng(0)).tolist() == list(range(8))
  assert V.segment_indices(5, 8, np.random.default_rng(0)).tolist() == [0] * 8


# ----------------------------------------------------------------------------------------------
# Tiny videos: frame i is a solid colour that encodes i.


@pytest.fixture(scope="module")
def videos(tmp_path_factory):
  root = tmp_path_factory.mktemp("videos")
  (root / "a").mkdir()
  (root / "b").mkdir()
  good0, good1 = root / "a" / "0.mp4", root / "b" / "3.avi"
  _write(good0, 20)
  _write(good1, 24)
  data = good0.read_bytes()
  trunc = root / "a" / "1_trunc.mp4"
  trunc.write_bytes(data[:len(data) // 2])
  data = good1.read_bytes()
  trunc_avi = root / "a" / "2_trunc.avi"
  trunc_avi.write_bytes(data[:len(data) // 2])
  garbage = root / "b" / "2_garbage.webm"
  garbage.write_bytes(np.random.default_rng(0).bytes(3000))
  (root / "b" / "notes.txt").write_text("not a video")
  return dict(root=root, good0=str(good0), good1=str(good1), trunc=str(trunc),
              trunc_avi=str(trunc_avi), garbage=str(garbage))


def test_decode_frames_and_num_frames(videos):
  assert V.num_frames(videos["good0"]) == 20
  assert V.num_frames(videos["good1"]) == 24
  idx = [0, 5, 19, 5, 7]
  clip = V.decode_frames(videos["good0"], idx)
  assert clip.shape == (5, 32, 32, 3) and clip.dtype == np.uint8
  want = np.stack([np.broadcast_to(_colour(i), (32, 32, 3)) for i in idx]).astype(int)
  assert np.abs(clip.astype(int) - want).max() <= 8                 # codec tolerance
  assert _frame_numbers(V.decode_frames(videos["good1"], range(24))).tolist() == list(range(24))
  for bad in ("trunc", "garbage"):
    with pytest.raises(V.VideoDecodeError, match=os.path.basename(videos[bad])):
      V.decode_frames(videos[bad], [0])
  with pytest.raises(V.VideoDecodeError, match="ends after"):
    V.decode_frames(videos["good0"], [20])


def test_clip_reader_skips_unreadable_files(videos):
  paths = [videos["good0"], videos["trunc"], videos["garbage"], videos["trunc_avi"],
           videos["good1"]]
  reader = V.ClipReader(paths, [0, 1, 2, 3, 4], num_frames=4, sampling_rate=2)
  assert len(reader) == 5
  out = reader.read(0, np.random.default_rng(0))
  assert out["video"].shape == (4, 32, 32, 3) and int(out["bad"]) == 0 and int(out["label"]) == 0
  want = V.clip_indices(20, 4, 2, np.random.default_rng(0))
  assert _frame_numbers(out["video"]).tolist() == want.tolist()
  out = reader.read(1, np.random.default_rng(0))                    # trunc, garbage, trunc_avi
  assert int(out["bad"]) == 3 and int(out["index"]) == 4 and int(out["label"]) == 4
  # Test view (no rng): clip 0 of 1 = linspace(0, 7, 4) truncated.
  assert _frame_numbers(reader.read(4)["video"]).tolist() == [0, 2, 4, 7]
  seg = V.ClipReader(paths, [0] * 5, num_frames=4, sampling="segment")
  assert _frame_numbers(seg.read(4)["video"]).tolist() == V.segment_indices(24, 4).tolist()
  with pytest.raises(sources.DataError, match="unreadable videos in a row"):
    V.ClipReader([videos["garbage"], videos["trunc"]], [0, 0], 4, 1).read(0)


def test_listings_and_errors(videos, tmp_path):
  listing = V.list_video_folder(videos["root"])
  names = [os.path.relpath(p, videos["root"]) for p in listing.paths]
  assert names == ["a/0.mp4", "a/1_trunc.mp4", "a/2_trunc.avi", "b/2_garbage.webm", "b/3.avi"]
  assert listing.labels.tolist() == [0, 0, 0, 1, 1] and listing.class_names == ("a", "b")
  # The image sets' hold-out applies unchanged.
  assert sources.split_indices(listing.labels, "eval", 1, 0).size == 2

  csv = tmp_path / "train.csv"
  csv.write_text(f"a/0.mp4 3\n\n{videos['good1']},1\nsub dir/x y.mp4,2\n")
  paths, labels = V.list_video_csv(csv, root=videos["root"])
  assert paths == [videos["good0"], videos["good1"],
                   os.path.join(str(videos["root"]), "sub dir/x y.mp4")]
  assert labels.tolist() == [3, 1, 2]

  for call, key in ((lambda: V.list_video_folder(tmp_path / "missing"), "config.input.data.dir"),
                    (lambda: V.list_video_csv(tmp_path / "missing.csv"), "config.input.data.csv"),
                    (lambda: V.list_video_csv(""), "config.input.data.csv")):
    with pytest.raises(sources.DataNotFoundError, match=key) as e:
      call()
    assert "\n" not in str(e.value)
  (tmp_path / "bad.csv").write_text("a/0.mp4 cat\n")
  with pytest.raises(sources.DataConfigError, match="line 1"):
    V.list_video_csv(tmp_path / "bad.csv")
  (tmp_path / "empty" / "c").mkdir(parents=True)
  with pytest.raises(sources.DataConfigError, match="no videos"):
    V.list_video_folder(tmp_path / "empty")


# ----------------------------------------------------------------------------------------------
# Spatial augmentation.


def test_random_resized_crop_flip_is_one_box_per_clip():
  rng = np.random.default_rng(0)
  clip = rng.integers(0, 256, (4, 24, 40, 3), dtype=np.uint8)
  flips = set()
  for seed in range(8):
    out = V.random_resized_crop_flip_clip(clip, 16, (0.2, 1.0), (3 / 4, 4 / 3), True,
                                          np.random.default_rng(seed))
    assert out.shape == (4, 16, 16, 3) and out.dtype == np.uint8
    for t in range(4):   # every frame: the same crop and flip of its own frame as an image
      np.testing.assert_array_equal(
          out[t], host_crop.crop_flip(clip[t], np.random.default_rng(seed), 16, (0.2, 1.0),
                                      (3 / 4, 4 / 3), True))
    # Which flip was drawn: the draws after the box.
    r = np.random.default_rng(seed)
    host_crop.sample_crop_box_np(r, 24, 40, (0.2, 1.0), (3 / 4, 4 / 3))
    flips.add(r.uniform() < 0.5)
  assert flips == {True, False}
  static = np.repeat(clip[:1], 3, axis=0)
  out = V.random_resized_crop_flip_clip(static, 16, (0.08, 1.0), (3 / 4, 4 / 3), True,
                                        np.random.default_rng(3))
  assert all(np.array_equal(out[0], f) for f in out)


def test_center_crops_clip():
  rng = np.random.default_rng(0)
  wide = rng.integers(0, 256, (2, 20, 40, 3), dtype=np.uint8)
  # Halving with torch bilinear (align_corners=False) averages 2x2 blocks.
  half = wide.astype(np.float32).reshape(2, 10, 2, 20, 2, 3).mean((2, 4))
  np.testing.assert_allclose(V.short_side_resize(wide, 10), half, atol=1e-4)
  crops = V.center_crops_clip(wide, 10)
  assert crops.shape == (3, 2, 10, 10, 3) and crops.dtype == np.float32
  for k, x in enumerate((0, 5, 10)):                        # left, centre, right
    np.testing.assert_allclose(crops[k], half[:, :, x:x + 10], atol=1e-4)
  tall = rng.integers(0, 256, (1, 15, 10, 3), dtype=np.uint8)
  crops = V.center_crops_clip(tall, 10)                     # short side already 10: no resize
  for k, y in enumerate((0, 3, 5)):                         # top, centre (ceil(5 / 2)), bottom
    np.testing.assert_array_equal(crops[k], tall[:, y:y + 10].astype(np.float32))
  np.testing.assert_array_equal(V.center_crops_clip(tall, 10, num_crops=1)[0], crops[1])


# ----------------------------------------------------------------------------------------------
# Synthetic clips.


def _corr(a, b):
  a, b = a.astype(float).ravel(), b.astype(float).ravel()
  return np.corrcoef(a, b)[0, 1]


def test_synth_clips():
  from PIL import Image
  images, labels, _, _ = sources._decoded_embedded()
  images, labels = images[:24], labels[:24]
  clips, out_labels, windows = V.synth_clips(images, labels, num_frames=6, size=32, seed=1,
                                             return_windows=True)
  assert clips.shape == (24, 6, 32, 32, 3) and clips.dtype == np.uint8
  np.testing.assert_array_equal(out_labels, labels)
  np.testing.assert_array_equal(clips, V.synth_clips(images, labels, 6, 32, seed=1)[0])
  assert not np.array_equal(clips, V.synth_clips(images, labels, 6, 32, seed=2)[0])
  # A clip depends on its image, seed and id only.
  np.testing.assert_array_equal(V.synth_clips(images[5:7], labels[5:7], 6, 32, 1,
                                              ids=np.arange(5, 7))[0], clips[5:7])
  # Windows stay inside the image; the camera moves.
  top, left, h, w = np.moveaxis(windows, -1, 0)
  assert np.all(top >= -1e-6) and np.all(left >= -1e-6)
  assert np.all(top + h <= 32 + 1e-6) and np.all(left + w <= 32 + 1e-6)
  motion = np.abs(clips[:, 0].astype(int) - clips[:, -1].astype(int)).mean((1, 2, 3))
  assert np.all(motion > 2)
  # Frame 0 is that window of the photograph (checked against PIL's bilinear resize).
  for n in range(24):
    t0, l0, h0, w0 = windows[n, 0]
    ref = np.asarray(Image.fromarray(images[n]).resize(
        (32, 32), Image.Resampling.BILINEAR, box=(l0, t0, l0 + w0, t0 + h0)))
    assert _corr(clips[n, 0], ref) > 0.9
    assert _corr(clips[n, 0], ref) > _corr(clips[n, 0], images[(n + 1) % 24]) + 0.1
  # A full window is the image itself.
  np.testing.assert_allclose(bilinear_view(images[0], 0, 0, 32, 32, 32), images[0])


def test_embedded_clips_split_like_the_images():
  clips, labels, names = V.embedded_clips("eval", holdout_per_class=2, num_frames=4, size=16)
  assert clips.shape == (20, 4, 16, 16, 3) and len(names) == 10
  _, all_labels, _, _ = sources._decoded_embedded()
  eval_idx = sources.split_indices(all_labels, "eval", 2, 0)
  np.testing.assert_array_equal(labels, all_labels[eval_idx])
  np.testing.assert_array_equal(np.bincount(labels), [2] * 10)


def bilinear_view(image, top, left, height, width, size):
  """One window of one image, written plainly: the reference of the library's batched
  `_bilinear_views` (bilinear at the output pixel centres, edges clamped; float32)."""
  img = image.astype(np.float32)
  h, w = img.shape[:2]
  ys = np.clip(top + (np.arange(size) + 0.5) * height / size - 0.5, 0, h - 1)
  xs = np.clip(left + (np.arange(size) + 0.5) * width / size - 0.5, 0, w - 1)
  y0 = np.minimum(np.floor(ys).astype(np.int64), h - 1)
  x0 = np.minimum(np.floor(xs).astype(np.int64), w - 1)
  y1, x1 = np.minimum(y0 + 1, h - 1), np.minimum(x0 + 1, w - 1)
  wy, wx = (ys - y0)[:, None, None], (xs - x0)[None, :, None]
  rows0 = img[y0][:, x0] * (1 - wx) + img[y0][:, x1] * wx
  rows1 = img[y1][:, x0] * (1 - wx) + img[y1][:, x1] * wx
  return rows0 * (1 - wy) + rows1 * wy


def test_clips_of_a_clip_set_are_the_frame_by_frame_views():
  """synth_clips resamples all frames of many clips at once: the same arithmetic as
  `bilinear_view` frame by frame, bit for bit."""
  images, labels, _, _ = sources._decoded_embedded()
  clips, _, windows = V.synth_clips(images[:20], labels[:20], 5, 24, seed=3, return_windows=True)
  for n in range(20):
    for f, (top, left, h, w) in enumerate(windows[n]):
      want = np.clip(np.round(bilinear_view(images[n], top, left, h, w, 24)), 0, 255)
      np.testing.assert_array_equal(clips[n, f], want)


def test_embedded_clips_through_the_pipeline():
  """data.name='embedded_clips' is an in-memory source: the split sizes, labels and hold-out of
  'embedded', training batches and evaluation batches of uint8 clips [B, T, 32, 32, 3]."""
  import ml_collections
  from mim_jax.data import pipeline
  data = dict(name="embedded_clips", holdout_per_class=2, num_frames=4, train_subset=100)
  cfg = ml_collections.ConfigDict(dict(data=data, batch_size=8, image_size=32, workers=0))
  images = sources.load_in_memory(dict(data, name="embedded"), "eval")
  clips = sources.load_in_memory(data, "eval")
  assert clips.images.shape == (20, 4, 32, 32, 3) and not clips.images.flags.writeable
  np.testing.assert_array_equal(clips.labels, images.labels)
  assert sources.split_size(data, "pretrain") == 100 == len(sources.load_in_memory(data, "pretrain"))
  assert sources.is_in_memory(data) and len(clips.class_names) == 10
  loader = pipeline.make_train_loader(cfg, seed=0, process_index=0, process_count=1)
  batch = next(loader)
  assert loader.on_device_aug and loader.image_shape == (4, 32, 32, 3)
  assert batch["image"].shape == (8, 4, 32, 32, 3) and batch["image"].dtype == np.uint8
  pretrain = sources.load_in_memory(data, "pretrain")
  np.testing.assert_array_equal(batch["image"], pretrain.images[batch["index"]])
  x, y = next(pipeline.eval_batches(cfg, "eval", 16))
  np.testing.assert_array_equal(x, clips.images[:16])
  cfg.image_size = 16                     # evaluation resizes every frame
  x16, _ = next(pipeline.eval_batches(cfg, "eval", 16))
  assert x16.shape == (16, 4, 16, 16, 3)
  np.testing.assert_array_equal(x16[:, 2], pipeline._resize_images(clips.images[:16, 2], 16))
  with pytest.raises(sources.DataConfigError, match="cannot be loaded into memory"):
    sources.load_in_memory(dict(name="video_csv", csv="x.csv"), "train")


# ----------------------------------------------------------------------------------------------
# Masks.


def test_tube_mask():
  mask = np.asarray(V.tube_mask(jax.random.PRNGKey(0), 3, 8, 14, 14, 0.9))
  assert mask.shape == (3, 8, 14, 14) and mask.dtype == bool
  np.testing.assert_array_equal(mask.sum((2, 3)), np.full((3, 8), int(0.9 * 196)))
  assert np.all(mask == mask[:, :1])                       # the same spatial mask over time
  assert not np.array_equal(mask[0], mask[1])
  assert np.asarray(V.tube_mask(jax.random.PRNGKey(0), 1, 2, 4, 4, 0.75)).sum() == 2 * 12


def _official_running_cell_maps(frames, h, w, ratio):
  """The four mask maps of VideoMAE V2's generator, built step by step: a queue of m ones then
  4 - m zeros read from a pointer that starts at p and advances before each frame."""
  m = int(4 * ratio)
  queue = np.array([1] * m + [0] * (4 - m))
  maps = []
  for p in range(4):
    ptr, per_frame = p, []
    for _ in range(frames):
      ptr += 1
      unit = queue[(np.arange(4) + ptr) % 4].reshape(2, 2)
      per_frame.append(np.tile(unit, (h // 2, w // 2)))
    maps.append(np.stack(per_frame))
  return np.stack(maps).astype(bool)


@pytest.mark.parametrize("ratio", [0.25, 0.5, 0.75])
def test_running_cell_mask(ratio):
  maps = _official_running_cell_maps(8, 6, 4, ratio)
  mask = np.asarray(V.running_cell_mask(2, 8, 6, 4, ratio))
  np.testing.assert_array_equal(mask, np.stack([maps[0]] * 2))
  m = int(4 * ratio)
  np.testing.assert_array_equal(mask.sum((2, 3)), np.full((2, 8), m * 6))
  np.testing.assert_array_equal(mask[:, 4:], mask[:, :4])  # cycles with period 4
  assert not np.array_equal(mask[:, 0], mask[:, 1])
  drawn = np.asarray(V.running_cell_mask(32, 8, 6, 4, ratio, rng=jax.random.PRNGKey(1)))
  which = [[np.array_equal(d, mp) for mp in maps].index(True) for d in drawn]
  assert set(which) == {0, 1, 2, 3}
  with pytest.raises(ValueError, match="even"):
    V.running_cell_mask(1, 2, 5, 4, 0.5)


def test_repeated_augmentation_of_in_memory_clips(tmp_path):
  """aug.num_sample = 2 on in-memory data: each sampled index twice, side by side (the device
  crops each copy on its own); an epoch counts records; streamed images refuse it."""
  import ml_collections
  from mim_jax.data import pipeline
  data = dict(name="embedded_clips", holdout_per_class=2, num_frames=4, train_subset=100)
  cfg = ml_collections.ConfigDict(dict(data=data, batch_size=8, image_size=32, workers=0,
                                       aug=dict(num_sample=2)))
  assert pipeline.steps_per_epoch(cfg) == 25
  loader = pipeline.make_train_loader(cfg, seed=0, process_index=0, process_count=1)
  assert loader.steps_per_epoch == 25
  seen = []
  for _ in range(25):
    batch = next(loader)
    assert batch["image"].shape == (8, 4, 32, 32, 3)
    assert batch["index"][0::2].tolist() == batch["index"][1::2].tolist()
    np.testing.assert_array_equal(batch["image"][0::2], batch["image"][1::2])
    seen += batch["index"][0::2].tolist()
  assert sorted(seen) == list(range(100))                      # one epoch: every record once
  # two processes: each keeps its half of the global batch's records, copies together
  halves = [next(pipeline.make_train_loader(cfg, seed=0, process_index=p, process_count=2))
            for p in (0, 1)]
  first = next(pipeline.make_train_loader(cfg, seed=0, process_index=0, process_count=1))
  np.testing.assert_array_equal(np.concatenate([h["index"] for h in halves]), first["index"])
  from PIL import Image
  for c in ("a", "b"):
    (tmp_path / c).mkdir()
    for k in range(6):
      Image.new("RGB", (8, 8), (40 * k, 0, 0)).save(tmp_path / c / f"{k}.png")
  streamed = ml_collections.ConfigDict(dict(
      data=dict(name="image_folder", dir=str(tmp_path), in_memory=False, holdout_per_class=1),
      batch_size=4, image_size=8, workers=0, aug=dict(num_sample=2)))
  with pytest.raises(sources.DataConfigError, match="not streamed images: set it to 1"):
    pipeline.make_train_loader(streamed, seed=0, process_index=0, process_count=1)
  streamed.aug.num_sample = 1
  assert next(pipeline.make_train_loader(streamed, seed=0, process_index=0,
                                         process_count=1))["image"].shape == (4, 8, 8, 3)
