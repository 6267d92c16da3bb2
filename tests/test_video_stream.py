"""Streamed video files (issue 29): VideoMAE's own temporal sampling and crops against hand
computations of the official loops, and `data.name='video_csv' | 'video_folder'` through the
grain pipeline: clip batches whose frames are the sampled ones, unreadable videos skipped and
counted, the loader's resume, the evaluation view, and a 2-step VideoMAE run on video files."""
import json
import os

import jax
import ml_collections
import numpy as np
import pytest
from PIL import Image

from helpers import frame_numbers as _frame_numbers, losses, write_video as _write
from mim_jax import train
from mim_jax.data import pipeline, sources
from mim_jax.data import video as V

pytestmark = pytest.mark.usefixtures("compilation_cache")


class Draws:
  """An rng whose ``integers(n)`` returns the queued values (each checked to be below n)."""

  def __init__(self, *values):
    self.values = list(values)

  def integers(self, low, high=None):
    low, high = (0, low) if high is None else (low, high)
    v = self.values.pop(0)
    assert low <= v < high, (v, low, high)
    return v


# ----------------------------------------------------------------------------------------------
# VideoMAE's temporal sampling and crops.


def test_videomae_pretrain_indices_hand_worked():
  # 100 frames, 4 x rate 4: the start is any of 0 .. 100 - 16, then 4 apart.
  assert V.videomae_pretrain_indices(100, 4, 4, Draws(0)).tolist() == [0, 4, 8, 12]
  assert V.videomae_pretrain_indices(100, 4, 4, Draws(84)).tolist() == [84, 88, 92, 96]
  with pytest.raises(AssertionError):          # 85 starts would overrun: not a possible draw
    V.videomae_pretrain_indices(100, 4, 4, Draws(85))
  # 10 frames < 16: start 0 (1-based 1); 1 -> 5 -> 9 advance (o + 4 < 10), 13 would not: repeat.
  assert V.videomae_pretrain_indices(10, 4, 4, Draws()).tolist() == [0, 4, 8, 8]
  # 16 frames = T * rate: one start; 13 + 4 = 17 >= 16 stops the last step.
  assert V.videomae_pretrain_indices(16, 4, 4, Draws(0)).tolist() == [0, 4, 8, 12]
  starts = {int(V.videomae_pretrain_indices(20, 4, 4, np.random.default_rng(s))[0])
            for s in range(200)}
  assert starts == set(range(5))


def test_videomae_test_indices_hand_worked():
  # every 4th of 50 frames: 0, 4, ..., 48 (13); two chunks: starts 0 and (13 - 4) / 1 = 9.
  assert V.videomae_test_indices(50, 4, 4, 0, 2).tolist() == [0, 4, 8, 12]
  assert V.videomae_test_indices(50, 4, 4, 1, 2).tolist() == [36, 40, 44, 48]
  # five chunks: step 9 / 4 = 2.25 -> starts int(0, 2.25, 4.5, 6.75, 9).
  assert [V.videomae_test_indices(50, 4, 4, c, 5)[0] for c in range(5)] == [0, 8, 16, 24, 36]
  assert V.videomae_test_indices(50, 4, 4).tolist() == [16, 20, 24, 28]   # one view: central
  assert V.videomae_test_indices(6, 4, 4).tolist() == [0, 4, 4, 4]        # padded with the last
  reader = V.ClipReader(["x"], [0], 4, 4, "videomae", num_clips=2)
  assert reader.indices(50, None, clip_idx=1).tolist() == [36, 40, 44, 48]
  assert reader.indices(100, Draws(3)).tolist() == [3, 7, 11, 15]
  with pytest.raises(sources.DataConfigError, match="data.sampling"):
    V.ClipReader(["x"], [0], 4, 4, "tsn")


def test_videomae_finetune_indices_hand_worked():
  # 100 frames, 4 x rate 4 = 16: end e in [16, 100), linspace(e - 16, e, 4) clipped to e - 1.
  assert V.videomae_finetune_indices(100, 4, 4, Draws(16)).tolist() == [0, 5, 10, 15]
  assert V.videomae_finetune_indices(100, 4, 4, Draws(99)).tolist() == [83, 88, 93, 98]
  with pytest.raises(AssertionError):
    V.videomae_finetune_indices(100, 4, 4, Draws(100))
  # 10 frames <= 16: linspace(0, 10, 10 // 4 = 2) = [0, 10], padded with 10, clipped to 9.
  assert V.videomae_finetune_indices(10, 4, 4, Draws()).tolist() == [0, 9, 9, 9]
  reader = V.ClipReader(["x"], [0], 4, 4, "videomae_finetune")
  assert reader.indices(100, Draws(16)).tolist() == [0, 5, 10, 15]
  assert reader.indices(50, None).tolist() == V.videomae_test_indices(50, 4, 4).tolist()


def test_videomae_test_views_hand_worked():
  # 13 buffer frames of 32 x 48 (short side = size: no resize); each pixel holds (t, y, x).
  t, y, x = np.meshgrid(np.arange(13), np.arange(32), np.arange(48), indexing="ij")
  buffer = np.stack([t, y, x], -1).astype(np.uint8)
  views = V.videomae_test_views(buffer, 4, 32, num_chunks=5, num_crops=3)
  assert views.shape == (15, 4, 32, 32, 3)
  # chunk starts int(c * (13 - 4) / 4) = 0, 2, 4, 6, 9; crops int(k * (48 - 32) / 2) = 0, 8, 16
  starts = [(tc, xc) for tc in (0, 2, 4, 6, 9) for xc in (0, 8, 16)]
  assert [(int(v[0, 0, 0, 0]), int(v[0, 0, 0, 2])) for v in views] == starts
  np.testing.assert_array_equal(views[4, :, 0, 0, 0], [2, 3, 4, 5])
  np.testing.assert_array_equal(views[:, 0, :, 0, 1], np.tile(np.arange(32), (15, 1)))
  # one view: the central chunk round(9 / 2) = 4 (half to even) and crop round(16 / 2) = 8
  one = V.videomae_test_views(buffer, 4, 32)
  assert one.shape == (1, 4, 32, 32, 3) and (one[0, 0, 0, 0, 0], one[0, 0, 0, 0, 2]) == (4, 8)
  # a tall buffer crops along the height
  tall = V.videomae_test_views(buffer.transpose(0, 2, 1, 3), 4, 32, 1, 3)
  assert [int(v[0, 0, 0, 2]) for v in tall] == [0, 8, 16]     # (x, y swapped) the row offsets


def test_multiscale_crop_box_enumerates_the_official_pairs_and_offsets():
  # A 40 x 60 frame to 32 px: sides int(40 * (1, .875, .75, .66)) = 40, 35, 30, 26; 30 is
  # within 3 of 32 and snaps to it. Pairs (w, h) with scale indices at most 1 apart, in the
  # official order (h outer, w inner):
  pairs = [(40, 40), (35, 40), (40, 35), (35, 35), (32, 35), (35, 32), (32, 32), (26, 32),
           (32, 26), (26, 26)]
  for k, (w, h) in enumerate(pairs):
    ws, hs = (60 - w) // 4, (40 - h) // 4
    offsets = [(0, 0), (4 * ws, 0), (0, 4 * hs), (4 * ws, 4 * hs), (2 * ws, 2 * hs),
               (0, 2 * hs), (4 * ws, 2 * hs), (2 * ws, 4 * hs), (2 * ws, 0),
               (ws, hs), (3 * ws, hs), (ws, 3 * hs), (3 * ws, 3 * hs)]
    for o, (x, y) in enumerate(offsets):
      assert V.multiscale_crop_box(Draws(k, o), 40, 60, 32) == (x, y, w, h)
  with pytest.raises(AssertionError):
    V.multiscale_crop_box(Draws(10, 0), 40, 60, 32)      # 10 pairs, 13 offsets: no more


def test_multiscale_crop_clip_is_one_pil_box_per_clip():
  rng = np.random.default_rng(0)
  clip = rng.integers(0, 256, (3, 40, 60, 3), dtype=np.uint8)
  for seed in range(4):
    got = V.multiscale_crop_clip(clip, 32, np.random.default_rng(seed))
    x, y, w, h = V.multiscale_crop_box(np.random.default_rng(seed), 40, 60, 32)
    want = [np.asarray(Image.fromarray(f).crop((x, y, x + w, y + h))
                       .resize((32, 32), Image.Resampling.BILINEAR)) for f in clip]
    assert got.shape == (3, 32, 32, 3) and got.dtype == np.uint8
    np.testing.assert_array_equal(got, np.stack(want))


def test_videomae_validation_view():
  rng = np.random.default_rng(1)
  clip = rng.integers(0, 256, (2, 40, 60, 3), dtype=np.uint8)
  # short side 40 -> 32, long int(32 * 60 / 40) = 48; centre x = round(16 / 2) = 8.
  resized = V._bilinear_resize(clip, 32, 48)
  want = np.clip(np.rint(resized[:, :, 8:40]), 0, 255).astype(np.uint8)
  np.testing.assert_array_equal(V.videomae_test_views(clip, 2, 32)[0], want)
  # already 32 on the short side: no resample; (49 - 32) / 2 = 8.5 rounds half to even: 8
  # (SlowFast's uniform_crop would take ceil, 9).
  wide = rng.integers(0, 256, (2, 32, 49, 3), dtype=np.uint8)
  np.testing.assert_array_equal(V.videomae_test_views(wide, 2, 32)[0], wide[:, :, 8:40])
  tall = rng.integers(0, 256, (1, 51, 32, 3), dtype=np.uint8)   # (51 - 32) / 2 = 9.5 -> 10
  np.testing.assert_array_equal(V.videomae_test_views(tall, 1, 32)[0], tall[:, 10:42])


# ----------------------------------------------------------------------------------------------
# Streamed files: frame i of every test video is a solid colour that encodes i
# (`helpers.write_video`).


def _length(cls, k):
  return 20 + 2 * k + (cls == "b")


@pytest.fixture(scope="module")
def video_dir(tmp_path_factory):
  """Two classes of 4 videos (32 px, 20-27 frames), one of them garbage; a train list, an
  eval list, and a list whose every entry is unreadable."""
  root = tmp_path_factory.mktemp("stream")
  lines = []
  for c in ("a", "b"):
    (root / c).mkdir()
    for k in range(4):
      path = root / c / f"{k}.mp4"
      if (c, k) == ("b", 1):
        path.write_bytes(np.random.default_rng(0).bytes(2000))    # unreadable
      else:
        _write(path, _length(c, k))
      lines.append(f"{c}/{k}.mp4 {0 if c == 'a' else 1}")
  (root / "train.csv").write_text("\n".join(lines[:3] + lines[4:7]) + "\n")
  (root / "val.csv").write_text("\n".join([lines[3], lines[7]]) + "\n")
  (root / "bad.csv").write_text("b/1.mp4 1\nb/1.mp4 0\n")
  return root


def stream_config(root, **data):
  data = dict(dict(name="video_csv", csv=str(root / "train.csv"), eval_csv=str(root / "val.csv"),
                   dir=str(root), holdout_per_class=0, num_frames=4, sampling_rate=2,
                   sampling="videomae"), **data)
  return ml_collections.ConfigDict(dict(
      data=data, batch_size=2, image_size=16, workers=0,
      aug=dict(crop_scale=(0.5, 1.0), crop_ratio=(0.75, 1.33), hflip=True,
               video_crop="multiscale")))


def test_streamed_clips_are_the_sampled_frames_and_skip_unreadable_videos(video_dir):
  cfg = stream_config(video_dir)
  assert not sources.is_in_memory(cfg.data)
  assert pipeline.num_examples(cfg, "pretrain") == 6 and pipeline.num_examples(cfg, "eval") == 2
  assert pipeline.num_classes(cfg) == 2 and pipeline.steps_per_epoch(cfg) == 3
  loader = pipeline.make_train_loader(cfg, seed=0, process_index=0, process_count=1)
  assert not loader.on_device_aug and loader.image_shape == (4, 16, 16, 3)
  batches = [next(loader) for _ in range(6)]       # two epochs
  reader = sources.streaming_source(cfg.data, "pretrain").reader
  bad = 0
  for b in batches:
    assert b["image"].shape == (2, 4, 16, 16, 3) and b["image"].dtype == np.uint8
    frames = _frame_numbers(b["image"])
    assert np.all(np.diff(frames, axis=1) == 2), frames          # sampling_rate 2
    for i, f, label in zip(b["index"], frames, b["label"]):
      n = _length(os.path.basename(os.path.dirname(reader.paths[i])),
                  int(os.path.basename(reader.paths[i])[0]))
      assert 0 <= f[0] <= n - 8 and label == reader.labels[i]
    bad += int(b["bad"].sum())
  # the garbage video (position 4 of the train list) is read as the next one, once an epoch
  assert bad == 2 and 4 not in np.concatenate([b["index"] for b in batches])
  # resume: a fresh loader set to the state after batch 2 gives batches 3.. again
  again = pipeline.make_train_loader(cfg, seed=0, process_index=0, process_count=1)
  for _ in range(2):
    next(again)
  state = again.get_state()
  resumed = pipeline.make_train_loader(cfg, seed=0, process_index=0, process_count=1)
  resumed.set_state(state)
  for want in batches[2:4]:
    got = next(resumed)
    for k in ("image", "label", "bad", "index"):
      np.testing.assert_array_equal(got[k], want[k])


def test_streamed_eval_reads_the_central_test_clip(video_dir):
  cfg = stream_config(video_dir)
  (x, y), = list(pipeline.eval_batches(cfg, "eval", 4))
  assert x.shape == (2, 4, 16, 16, 3) and y.tolist() == [0, 1]
  # a/3.mp4 has 26 frames, b/3.mp4 27: every 2nd -> 13 / 14, central 4 from 4 / 5.
  np.testing.assert_array_equal(_frame_numbers(x), [[8, 10, 12, 14], [10, 12, 14, 16]])
  # video_folder: the image folders' hold-out, the garbage file listed and skipped on reading
  folder = stream_config(video_dir, name="video_folder", holdout_per_class=1)
  assert pipeline.num_examples(folder, "eval") == 2 and pipeline.num_examples(folder, "train") == 6
  xs = np.concatenate([b[0] for b in pipeline.eval_batches(folder, "train", 4)])
  assert xs.shape == (6, 4, 16, 16, 3)


def test_multi_view_test_batches(video_dir):
  cfg = stream_config(video_dir, test_views=(2, 3))
  (x, y), = list(pipeline.eval_batches(cfg, "eval", 4, views=True))
  assert x.shape == (2, 6, 4, 16, 16, 3) and y.tolist() == [0, 1]
  # buffers of 13 / 14 frames (every 2nd of 26 / 27): chunk starts 0 and 9 / 10
  frames = _frame_numbers(x)[:, ::3]                     # the first crop of each chunk
  np.testing.assert_array_equal(frames, [[[0, 2, 4, 6], [18, 20, 22, 24]],
                                         [[0, 2, 4, 6], [20, 22, 24, 26]]])
  (x1, _), = list(pipeline.eval_batches(cfg, "eval", 4))  # the single central view as before
  assert x1.shape == (2, 4, 16, 16, 3)
  # SSv2's segment sampling: its 2 test clips are the segment starts and middles
  seg = stream_config(video_dir, sampling="segment", test_views=(2, 1))
  (xs, _), = list(pipeline.eval_batches(seg, "eval", 4, views=True))
  np.testing.assert_array_equal(_frame_numbers(xs)[0], [V.segment_indices(26, 4, None, c)
                                                         for c in (0, 1)])
  with pytest.raises(sources.DataConfigError, match="streamed video"):
    next(pipeline.eval_batches(ml_collections.ConfigDict(dict(data=dict(name="embedded"),
                                                              image_size=32)), "eval", 4,
                               views=True))


def test_multi_clip_test_reads_every_clip_from_one_video(monkeypatch):
  """A video whose later test clip fails to decode is skipped as a whole: every temporal view
  comes from the next readable video (one decode of the clips' union), never a mix."""
  decoded = []

  def fake_decode(path, indices):
    decoded.append((path, list(indices)))
    if path == "v0" and max(indices) >= 20:            # v0 is truncated after frame 19
      raise V.VideoDecodeError("truncated")
    value = 100 * int(path[1]) + np.asarray(indices, np.uint8)
    return np.broadcast_to(value[:, None, None, None], (len(indices), 8, 8, 3)).astype(np.uint8)

  monkeypatch.setattr(V, "num_frames", lambda path: 40)
  monkeypatch.setattr(V, "decode_frames", fake_decode)
  reader = V.ClipReader(["v0", "v1"], [3, 5], 4, sampling="segment")
  test = V.HostEvalClip(reader, 8, views=(2, 1))
  clips = test.map(0)
  want = [100 + V.segment_indices(40, 4, None, c) for c in (0, 1)]
  np.testing.assert_array_equal(clips["image"][:, :, 0, 0, 0], want)
  assert clips["label"] == 5
  assert [p for p, _ in decoded] == ["v0", "v1"]      # one decode per video tried
  records = test.reader.read_test_clips(0)
  assert [(int(r["index"]), int(r["bad"])) for r in records] == [(1, 1), (1, 1)]


def test_classifier_averages_the_softmax_of_the_views():
  from mim_jax.evaluators import classifier
  logits = np.log(np.array([[0.7, 0.2, 0.1], [0.1, 0.3, 0.6],     # example 0, views 0 / 1
                            [0.2, 0.2, 0.6], [0.3, 0.3, 0.4]]))
  out = classifier.view_log_probs(lambda im: {"logits": logits}, np.zeros((2, 2, 1)))
  np.testing.assert_allclose(np.exp(out["logits"]), [[0.4, 0.25, 0.35], [0.25, 0.25, 0.5]])
  assert out["views"].tolist() == [2, 2]


def test_streamed_video_errors_are_one_line(video_dir):
  cfg = stream_config(video_dir, csv="")
  with pytest.raises(sources.DataNotFoundError, match="--config.input.data.csv"):
    pipeline.make_train_loader(cfg, seed=0, process_index=0, process_count=1)
  cfg = stream_config(video_dir, csv=str(video_dir / "bad.csv"))
  loader = pipeline.make_train_loader(cfg, seed=0, process_index=0, process_count=1)
  with pytest.raises(sources.DataError, match="unreadable videos in a row"):
    next(loader)
  cfg = stream_config(video_dir)
  cfg.aug.video_crop = "tenfold"
  with pytest.raises(sources.DataConfigError, match="aug.video_crop"):
    pipeline.make_train_loader(cfg, seed=0, process_index=0, process_count=1)


def test_videomae_trains_two_steps_on_video_files(video_dir, tmp_path):
  from mim_jax import config_lib
  from helpers import tiny_config
  c = tiny_config("videomae", total_steps=2, ckpt_every=2)
  c.input = config_lib.base_config().input
  c.input.update(stream_config(video_dir).to_dict())
  c.input.data.update(num_frames=4, in_memory=False)
  c.input.image_size = 8
  c.model.depth = 1
  c.videomae.decoder = dict(width=16, depth=0, heads=2)
  c.evals.linear.enabled = False
  c.evals.knn.update(k=1)
  train.train_and_evaluate(c, str(tmp_path), progress=False, devices=jax.devices()[:1])
  ls = losses(str(tmp_path))
  assert sorted(ls) == [1, 2] and all(np.isfinite(v) for v in ls.values())
  with open(tmp_path / "eval_results.json") as f:
    knn = json.load(f)["knn"]
  assert knn["step"] == 2 and knn["protocol"]["num_queries"] == 2


def test_finetune_on_video_files_reports_the_multi_view_test(video_dir, tmp_path):
  from helpers import load_config
  c = load_config("finetune", "kinetics400")
  c.input.update(batch_size=2, image_size=8, workers=0)
  c.input.data.update(csv=str(video_dir / "train.csv"), eval_csv=str(video_dir / "val.csv"),
                      dir=str(video_dir), num_frames=4, sampling_rate=2, test_views=(2, 3))
  c.model.update(variant="mu", depth=1, patch_size=4, dtype="float32")
  c.finetune.num_classes = 2
  c.total_steps, c.log_every, c.ckpt_every = 1, 1, 1
  train.train_and_evaluate(c, str(tmp_path), progress=False, devices=jax.devices()[:1])
  with open(tmp_path / "eval_results.json") as f:
    res = json.load(f)["classifier"]
  assert res["protocol"]["views_per_example"] == 6 and res["protocol"]["num_images"] == 2
  assert "softmax averaged" in res["protocol"]["prediction"] and 0 <= res["top1"] <= 100


def test_repeated_augmentation_crops_one_decoded_clip_several_times(video_dir):
  """aug.num_sample = 2 (SlowFast's AUG.NUM_SAMPLE): each video read gives two examples side by
  side, the same frames cropped on their own; an epoch counts videos, so it has half the
  steps of batch 4 without repeats; a skipped video counts once."""
  video = np.arange(4 * 32 * 32 * 3, dtype=np.uint32).reshape(4, 32, 32, 3) % 251

  class Fixed:
    num_frames = 4

    def read(self, i, rng):
      return {"video": video.astype(np.uint8), "label": np.int32(1), "bad": np.int32(2),
              "index": np.int32(i)}

  crop = V.HostReadClip(Fixed(), 16, "random_resized", (0.2, 1.0), (0.75, 1.33), True,
                        num_sample=2)
  out = crop.random_map(5, np.random.default_rng(7))
  rng = np.random.default_rng(7)
  want = [V.random_resized_crop_flip_clip(video.astype(np.uint8), 16, (0.2, 1.0), (0.75, 1.33),
                                          True, rng) for _ in range(2)]
  np.testing.assert_array_equal(out["image"], np.stack(want))
  assert not np.array_equal(want[0], want[1])                  # two crops, not one copied
  assert out["label"].tolist() == [1, 1] and out["index"].tolist() == [5, 5]
  assert out["bad"].tolist() == [2, 0]

  cfg = stream_config(video_dir)
  cfg.batch_size = 4
  cfg.aug.num_sample = 2
  assert pipeline.steps_per_epoch(cfg) == 3                    # 6 videos, 2 a batch
  loader = pipeline.make_train_loader(cfg, seed=0, process_index=0, process_count=1)
  assert loader.steps_per_epoch == 3
  batches = [next(loader) for _ in range(3)]                  # one epoch
  for b in batches:
    assert b["image"].shape == (4, 4, 16, 16, 3)
    assert b["index"][0::2].tolist() == b["index"][1::2].tolist()
    assert b["label"][0::2].tolist() == b["label"][1::2].tolist()
    np.testing.assert_array_equal(_frame_numbers(b["image"][0::2]),
                                  _frame_numbers(b["image"][1::2]))   # one temporal draw
  assert sorted(np.concatenate([b["index"][0::2] for b in batches]).tolist()) == [0, 1, 2, 3, 5, 5]
  assert sum(int(b["bad"].sum()) for b in batches) == 1       # the garbage video, once
  cfg.aug.num_sample = 3
  with pytest.raises(sources.DataConfigError, match="aug.num_sample=3"):
    pipeline.make_train_loader(cfg, seed=0, process_index=0, process_count=1)


def test_offset_sampling_places_slowfasts_test_clips(video_dir):
  """input.data.use_offset (SlowFast's DATA.USE_OFFSET_SAMPLING, MaskFeat's fine-tuning yamls):
  'clip' sampling's test clips start at clip_idx * floor(delta / (clips - 1)), one clip at the
  centre; without it at delta * clip_idx / clips. a/3.mp4: 26 frames, 4 at rate 2: delta 18."""
  def frames(**data):
    cfg = stream_config(video_dir, sampling="clip", **data)
    (x, _), = list(pipeline.eval_batches(cfg, "eval", 4, views="test_views" in data))
    return _frame_numbers(x)[0].tolist()

  assert frames(use_offset=True, test_views=(2, 1)) == [[0, 2, 4, 7], [18, 20, 22, 25]]
  assert frames(test_views=(2, 1)) == [[0, 2, 4, 7], [9, 11, 13, 16]]
  assert frames(use_offset=True) == [9, 11, 13, 16]          # one clip: the centre
  assert frames() == [0, 2, 4, 7]
  with pytest.raises(sources.DataConfigError, match="use_offset"):
    pipeline.make_train_loader(stream_config(video_dir, use_offset=True), seed=0,
                               process_index=0, process_count=1)
