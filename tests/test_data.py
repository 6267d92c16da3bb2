"""Tests of mim_jax.data: sources, hold-out split, grain loaders, checkpointing, augmentation."""
from __future__ import annotations

import collections
import functools
import hashlib
import io
import shutil

import jax
import ml_collections
import numpy as np
import pytest
from PIL import Image

from mim_jax.data import augment, host_crop, pipeline, records, sources

CLASSES = ("airplane", "cat", "ship")
PER_CLASS = 20
HOLDOUT = 5
CORRUPT = "cat/0999_corrupt.jpg"
EMBEDDED_CLASSES = ["airplane", "automobile", "bird", "cat", "deer", "dog", "frog", "horse",
                    "ship", "truck"]


def _hashes(images: np.ndarray) -> list[str]:
  return [hashlib.sha1(np.ascontiguousarray(im).tobytes()).hexdigest() for im in images]


def _input_cfg(data: dict, *, batch_size: int = 8, image_size: int = 32, workers: int = 0,
               **aug) -> ml_collections.ConfigDict:
  base = dict(name="embedded", dir="", holdout_per_class=100, holdout_seed=0, in_memory=True,
              cache_dir="")
  base.update(data)
  return ml_collections.ConfigDict(dict(
      data=base, batch_size=batch_size, image_size=image_size, workers=workers,
      aug=dict(crop_scale=aug.get("scale", (0.2, 1.0)), crop_ratio=(3 / 4, 4 / 3), hflip=True)))


@pytest.fixture(scope="module")
def small_folder(shared_cifar_dir, tmp_path_factory):
  """3 classes x 20 real CIFAR JPEGs, plus one corrupt .jpg in 'cat'."""
  root = tmp_path_factory.mktemp("small") / "images"
  for name in CLASSES:
    (root / name).mkdir(parents=True)
    for i in range(PER_CLASS):
      shutil.copy(shared_cifar_dir / name / f"{i:04d}.jpg", root / name / f"{i:04d}.jpg")
  (root / CORRUPT).write_bytes(b"\xff\xd8\xff\xe0 this is not a jpeg" * 3)
  return root


@pytest.fixture()
def folder_data(small_folder, tmp_path):
  return dict(name="image_folder", dir=str(small_folder), holdout_per_class=HOLDOUT,
              cache_dir=str(tmp_path / "cache"))


# ----------------------------------------------------------------------------------------------
# Sources.


def test_embedded_set_loads_with_holdout():
  cfg = dict(name="embedded", holdout_per_class=100, holdout_seed=0)
  train = sources.load_in_memory(cfg, "train")
  ev = sources.load_in_memory(cfg, "eval")
  assert train.class_names == EMBEDDED_CLASSES and ev.class_names == EMBEDDED_CLASSES
  assert train.images.shape == (4000, 32, 32, 3) and train.images.dtype == np.uint8
  assert ev.images.shape == (1000, 32, 32, 3)
  assert train.labels.dtype == np.int32
  np.testing.assert_array_equal(np.bincount(train.labels, minlength=10), [400] * 10)
  np.testing.assert_array_equal(np.bincount(ev.labels, minlength=10), [100] * 10)
  assert train.num_skipped == 0 and ev.num_skipped == 0
  assert 20 < train.images.mean() < 235 and train.images.std() > 20   # real pictures
  train_h, eval_h = _hashes(train.images), _hashes(ev.images)
  assert len(set(train_h) | set(eval_h)) == 5000 and not set(train_h) & set(eval_h)
  # Same split on reload; another seed holds out other images.
  assert _hashes(sources.load_in_memory(cfg, "eval").images) == eval_h
  other = sources.load_in_memory(dict(cfg, holdout_seed=1), "eval")
  assert set(_hashes(other.images)) != set(eval_h)
  # The npz really holds JPEG bytes.
  blobs, labels, names = sources.read_embedded()
  assert len(blobs) == 5000 and blobs[0][:2] == b"\xff\xd8" and names == EMBEDDED_CLASSES
  assert sources.EMBEDDED_PATH.stat().st_size <= 5_000_000


def test_holdout_mask_counts_and_order():
  labels = np.repeat(np.arange(4, dtype=np.int32), [7, 9, 8, 12])
  mask = sources.holdout_mask(labels, 3, holdout_seed=5)
  np.testing.assert_array_equal(np.bincount(labels[mask]), [3, 3, 3, 3])
  np.testing.assert_array_equal(mask, sources.holdout_mask(labels, 3, holdout_seed=5))
  train = sources.split_indices(labels, "train", 3, 5)
  ev = sources.split_indices(labels, "eval", 3, 5)
  assert not set(train) & set(ev) and len(train) + len(ev) == labels.size
  # Rule: one Generator(seed) permutes each class's records in class order.
  rng = np.random.Generator(np.random.PCG64(5))
  expect = []
  for c in range(4):
    idx = np.flatnonzero(labels == c)
    expect += list(idx[rng.permutation(idx.size)[:3]])
  np.testing.assert_array_equal(ev, sorted(expect))


def test_image_folder_in_memory_skips_corrupt_and_caches(folder_data, small_folder, tmp_path,
                                                        monkeypatch):
  train = sources.load_in_memory(folder_data, "train")
  ev = sources.load_in_memory(folder_data, "eval")
  assert train.class_names == list(CLASSES)
  assert train.num_skipped + ev.num_skipped == 1
  assert len(train) + len(ev) + 1 == 3 * PER_CLASS + 1
  assert train.images.shape[1:] == (32, 32, 3)
  # Every readable file is in exactly one split, with its decoded pixels and label.
  expected = {}
  for label, name in enumerate(CLASSES):
    for i in range(PER_CLASS):
      with Image.open(small_folder / name / f"{i:04d}.jpg") as im:
        expected[_hashes(np.asarray(im.convert("RGB"))[None])[0]] = label
  got = dict(zip(_hashes(train.images), train.labels)) | dict(zip(_hashes(ev.images), ev.labels))
  assert got == expected
  counts = np.bincount(ev.labels, minlength=3)
  cat = CLASSES.index("cat")
  assert all(counts[c] == HOLDOUT for c in range(3) if c != cat)
  assert counts[cat] == HOLDOUT - ev.num_skipped
  # A second load comes from the cache, without decoding.
  assert len(list((tmp_path / "cache").glob("folder-*.npz"))) == 1
  sources._DECODED.clear()   # forget the in-process copy: read the cache file
  monkeypatch.setattr(sources, "_decode_many", lambda paths: pytest.fail("decoded again"))
  again = sources.load_in_memory(folder_data, "train")
  np.testing.assert_array_equal(again.images, train.images)
  np.testing.assert_array_equal(again.labels, train.labels)
  assert again.num_skipped == train.num_skipped


def _one_line_error(exc_type, fn, *args):
  with pytest.raises(exc_type) as info:
    fn(*args)
  msg = str(info.value)
  assert isinstance(info.value, sources.DataError) and "\n" not in msg
  return msg


def test_parallel_decode_matches_serial(small_folder, monkeypatch):
  listing = sources.list_image_folder(small_folder)
  paths = [str(small_folder / f) for f in listing.files]
  serial = sources._decode_files(paths)
  monkeypatch.setattr(sources, "_POOL_MIN_FILES", 1)
  monkeypatch.setattr(sources.os, "cpu_count", lambda: 2)
  pooled = sources._decode_many(paths)
  assert len(pooled) == len(serial)
  for a, b in zip(serial, pooled):
    assert (isinstance(a, str) and a == b) or np.array_equal(a, b)
  assert sum(isinstance(a, str) for a in pooled) == 1


def test_bad_folders_give_one_line_errors(tmp_path, small_folder):
  missing = dict(name="image_folder", dir=str(tmp_path / "nope"), holdout_per_class=0,
                 cache_dir=str(tmp_path / "c"))
  msg = _one_line_error(FileNotFoundError, sources.load_in_memory, missing, "train")
  assert "does not exist: set --config.input.data.dir to a folder of class sub-folders" in msg
  (tmp_path / "empty").mkdir()
  msg = _one_line_error(ValueError, sources.load_in_memory,
                        dict(missing, dir=str(tmp_path / "empty")), "train")
  assert "no class sub-folders" in msg and "--config.input.data.dir" in msg
  (tmp_path / "noimg" / "a").mkdir(parents=True)
  (tmp_path / "noimg" / "a" / "notes.txt").write_text("x")
  msg = _one_line_error(ValueError, sources.load_in_memory,
                        dict(missing, dir=str(tmp_path / "noimg")), "train")
  assert "no images" in msg
  msg = _one_line_error(ValueError, sources.load_in_memory,
                        dict(missing, dir=str(small_folder), holdout_per_class=PER_CLASS), "eval")
  assert "too few" in msg and "holdout_per_class" in msg
  # Images of different sizes cannot be stacked in memory.
  (tmp_path / "mixed" / "a").mkdir(parents=True)
  Image.new("RGB", (8, 8)).save(tmp_path / "mixed" / "a" / "x.png")
  Image.new("RGB", (9, 8)).save(tmp_path / "mixed" / "a" / "y.png")
  msg = _one_line_error(ValueError, sources.load_in_memory,
                        dict(missing, dir=str(tmp_path / "mixed")), "train")
  assert "differ in size" in msg and "in_memory=False" in msg


def test_loader_config_errors(folder_data):
  cfg = _input_cfg({}, batch_size=9)
  make = functools.partial(pipeline.make_train_loader, seed=0, process_index=0, process_count=2)
  msg = _one_line_error(ValueError, make, cfg)
  assert "--config.input.batch_size=9" in msg and "multiple of 2" in msg
  with pytest.raises(sources.DataError, match="fewer than one batch"):
    pipeline.make_train_loader(_input_cfg(folder_data, batch_size=64), seed=0, process_index=0,
                               process_count=1)


def test_image_folder_source_and_decoded_fallback(folder_data):
  src = sources.image_folder_source(folder_data, "train")
  ev = sources.image_folder_source(folder_data, "eval")
  assert len(src) + len(ev) == 3 * PER_CLASS + 1
  paths = {src.path(i) for i in range(len(src))}
  assert not paths & {ev.path(i) for i in range(len(ev))}
  # Same hold-out as the in-memory loader: its eval images are the files of `ev`.
  mem = sources.load_in_memory(folder_data, "eval")
  expect = []
  for i in range(len(ev)):
    try:
      expect.append(sources.decode_image(ev[i]["image_bytes"]))
    except Exception:  # pylint: disable=broad-except
      pass
  assert _hashes(np.stack(expect)) == _hashes(mem.images)
  # A corrupt record is replaced by the next readable one and counted.
  both = [s for s in (src, ev) if any(s.path(i).endswith(CORRUPT) for i in range(len(s)))][0]
  bad = [i for i in range(len(both)) if both.path(i).endswith(CORRUPT)][0]
  dec = records.DecodedSource(both)
  rec = dec[bad]
  assert rec["bad"] == 1
  nxt = (bad + 1) % len(both)
  np.testing.assert_array_equal(rec["image"], sources.decode_image(both[nxt]["image_bytes"]))
  assert dec[nxt]["bad"] == 0


# ----------------------------------------------------------------------------------------------
# Training loader.


def _take(loader, n):
  return [next(loader) for _ in range(n)]


def _same(a, b):
  return all(np.array_equal(x[k], y[k]) for x, y in zip(a, b) for k in ("image", "label", "bad"))


def test_train_loader_in_memory_epochs_and_determinism():
  cfg = _input_cfg({}, batch_size=1000)
  loader = pipeline.make_train_loader(cfg, seed=3, process_index=0, process_count=1)
  assert loader.on_device_aug and loader.steps_per_epoch == 4 and loader.image_shape == (32, 32, 3)
  epochs = _take(loader, 8)
  b = epochs[0]
  assert b["image"].shape == (1000, 32, 32, 3) and b["image"].dtype == np.uint8
  assert b["label"].dtype == np.int32 and b["bad"].dtype == np.int32 and not b["bad"].any()
  train = sources.load_in_memory(cfg.data, "train")
  everything = collections.Counter(_hashes(train.images))
  first = collections.Counter(h for x in epochs[:4] for h in _hashes(x["image"]))
  second = collections.Counter(h for x in epochs[4:] for h in _hashes(x["image"]))
  assert first == everything and second == everything             # each epoch: every record once
  assert not np.array_equal(epochs[0]["label"], epochs[4]["label"])  # epochs are reshuffled
  same = pipeline.make_train_loader(cfg, seed=3, process_index=0, process_count=1)
  assert _same(_take(same, 3), epochs[:3])
  other = pipeline.make_train_loader(cfg, seed=4, process_index=0, process_count=1)
  assert not np.array_equal(next(other)["label"], epochs[0]["label"])


def test_train_loader_shards_processes():
  cfg = _input_cfg({}, batch_size=400)
  train = sources.load_in_memory(cfg.data, "train")
  seen = []
  for p in range(2):
    loader = pipeline.make_train_loader(cfg, seed=0, process_index=p, process_count=2)
    assert loader.local_batch_size == 200
    seen.append(collections.Counter(h for b in _take(loader, 10) for h in _hashes(b["image"])))
  assert not set(seen[0]) & set(seen[1])
  assert seen[0] + seen[1] == collections.Counter(_hashes(train.images))


def test_train_loader_state_restores():
  cfg = _input_cfg({}, batch_size=64)
  loader = pipeline.make_train_loader(cfg, seed=1, process_index=0, process_count=1)
  _take(loader, 5)
  state = loader.get_state()
  expect = _take(loader, 4)
  fresh = pipeline.make_train_loader(cfg, seed=1, process_index=0, process_count=1)
  fresh.set_state(state)
  assert _same(_take(fresh, 4), expect)


def test_loader_state_in_orbax_checkpoint_manager(tmp_path):
  ocp = pytest.importorskip("orbax.checkpoint")
  cfg = _input_cfg({}, batch_size=64)
  loader = pipeline.make_train_loader(cfg, seed=2, process_index=0, process_count=1)
  _take(loader, 7)   # mid-epoch
  manager = ocp.CheckpointManager(tmp_path / "ckpt", item_names=("data", "meta"),
                                  options=ocp.CheckpointManagerOptions(create=True))
  manager.save(7, args=ocp.args.Composite(data=pipeline.checkpoint_args_save(loader),
                                          meta=ocp.args.JsonSave({"step": 7})))
  manager.wait_until_finished()
  expect = _take(loader, 3)
  fresh = pipeline.make_train_loader(cfg, seed=2, process_index=0, process_count=1)
  restored = manager.restore(7, args=ocp.args.Composite(
      data=pipeline.checkpoint_args_restore(fresh), meta=ocp.args.JsonRestore()))
  assert restored["meta"] == {"step": 7}
  assert _same(_take(fresh, 3), expect)
  manager.close()


def test_streaming_image_folder_loader_counts_corrupt(folder_data):
  data = dict(folder_data, in_memory=False)
  src = sources.image_folder_source(data, "train")
  n_corrupt = sum(src.path(i).endswith(CORRUPT) for i in range(len(src)))
  assert n_corrupt == 1   # with this seed the corrupt file falls in 'train'
  # One batch is one epoch, so it visits the corrupt record exactly once.
  cfg = _input_cfg(data, batch_size=len(src), image_size=16)
  loader = pipeline.make_train_loader(cfg, seed=0, process_index=0, process_count=1)
  assert not loader.on_device_aug and loader.image_shape == (16, 16, 3)
  batches = _take(loader, 4)
  for b in batches:
    assert b["image"].shape == (len(src), 16, 16, 3) and b["image"].dtype == np.uint8
    assert b["label"].dtype == np.int32 and set(b["label"]) <= {0, 1, 2}
    assert int(b["bad"].sum()) == 1 and b["bad"].max() == 1
  assert not np.array_equal(batches[0]["image"], batches[1]["image"])
  again = pipeline.make_train_loader(cfg, seed=0, process_index=0, process_count=1)
  assert _same(_take(again, 3), batches[:3])   # per-record augmentation is seeded
  state = again.get_state()
  rest = _take(again, 2)
  again.set_state(state)
  assert _same(_take(again, 2), rest)
  # Evaluation: center crops of the hold-out, fixed order, last batch smaller.
  ev = list(pipeline.eval_batches(cfg, "eval", 4))
  n_eval = pipeline.num_examples(cfg, "eval")
  assert pipeline.num_classes(cfg) == 3
  assert sum(len(y) for _, y in ev) == n_eval == 3 * HOLDOUT
  assert ev[0][0].shape == (4, 16, 16, 3) and ev[-1][0].shape[0] == n_eval - 4 * (len(ev) - 1)
  again2 = list(pipeline.eval_batches(cfg, "eval", 4))
  assert all(np.array_equal(a[0], b[0]) for a, b in zip(ev, again2))


def test_streaming_loader_with_worker_processes(folder_data):
  cfg = _input_cfg(dict(folder_data, in_memory=False), batch_size=4, image_size=8, workers=2)
  loader = pipeline.make_train_loader(cfg, seed=0, process_index=0, process_count=1)
  batches = _take(loader, 3)
  assert all(b["image"].shape == (4, 8, 8, 3) for b in batches)


def test_eval_batches_in_memory(folder_data):
  cfg = _input_cfg(folder_data, image_size=32)
  ev = sources.load_in_memory(folder_data, "eval")
  got = list(pipeline.eval_batches(cfg, "eval", 4))
  assert [len(y) for _, y in got] == [4] * (len(ev) // 4) + ([len(ev) % 4] if len(ev) % 4 else [])
  np.testing.assert_array_equal(np.concatenate([x for x, _ in got]), ev.images)
  np.testing.assert_array_equal(np.concatenate([y for _, y in got]), ev.labels)
  big = list(pipeline.eval_batches(_input_cfg(folder_data, image_size=48), "eval", 8,
                                   max_examples=10))
  assert [x.shape for x, _ in big] == [(8, 48, 48, 3), (2, 48, 48, 3)]
  assert len(set(np.concatenate([y for _, y in big]))) > 1   # a subset spans the classes
  assert pipeline.num_examples(cfg, "eval") == len(ev)
  assert pipeline.num_classes(cfg) == 3
  assert pipeline.num_classes(_input_cfg({})) == 10
  assert pipeline.steps_per_epoch(_input_cfg(folder_data, batch_size=8)) == \
      len(sources.load_in_memory(folder_data, "train")) // 8


# ----------------------------------------------------------------------------------------------
# TFDS (mocked: no TensorFlow, no download).


@pytest.fixture()
def pil_image_encoder(monkeypatch):
  """TFDS's mock encodes images with TensorFlow; encode them with PIL instead."""
  from tensorflow_datasets.core.features import image_feature

  def encode(self, array):
    buf = io.BytesIO()
    Image.fromarray(array[..., 0] if array.shape[-1] == 1 else array).save(
        buf, format=self.encoding_format.upper())
    return buf.getvalue()

  monkeypatch.setattr(image_feature._ImageEncoder, "_encode_image", encode)


def test_tfds_source_and_loader(pil_image_encoder):
  tfds = pytest.importorskip("tensorflow_datasets")
  with tfds.testing.mock_data(num_examples=24, policy=tfds.testing.MockPolicy.USE_CODE):
    encoded = sources.tfds_source("imagenet2012", "train")
    decoded = sources.tfds_source("imagenet2012", "train", decode=True)
    assert len(encoded) == 24
    rec, ref = encoded[5], decoded[5]
    assert isinstance(rec["image_bytes"], bytes) and rec["label"] == ref["label"]
    assert 0 <= rec["label"] < 1000
    assert sources.decode_image(rec["image_bytes"]).shape == ref["image"].shape
    assert ref["image"].dtype == np.uint8

    cfg = _input_cfg(dict(name="tfds", tfds_name="imagenet2012", in_memory=False),
                     batch_size=6, image_size=16)
    loader = pipeline.make_train_loader(cfg, seed=0, process_index=0, process_count=1)
    assert not loader.on_device_aug and loader.steps_per_epoch == 4
    assert pipeline.num_classes(cfg) == 1000 and encoded.class_names[0] == "n01440764"
    batches = _take(loader, 4)
    labels = sorted(int(label) for b in batches for label in b["label"])
    assert labels == sorted(int(encoded[i]["label"]) for i in range(24))
    assert all(b["image"].shape == (6, 16, 16, 3) and not b["bad"].any() for b in batches)
    ev = list(pipeline.eval_batches(cfg, "eval", 10))
    assert [x.shape for x, _ in ev] == [(10, 16, 16, 3)] * 2 + [(4, 16, 16, 3)]


# ----------------------------------------------------------------------------------------------
# On-device augmentation.


def _images(b=4, h=32, w=32, seed=0):
  return np.random.default_rng(seed).integers(0, 256, (b, h, w, 3), dtype=np.uint8)


def test_crop_flip_identity_and_mirror():
  x = _images()
  full = functools.partial(augment.random_resized_crop_flip, out_size=32, scale=(1, 1),
                           ratio=(1, 1))
  same = jax.jit(functools.partial(full, hflip=False))(jax.random.key(0), x)
  assert same.dtype == np.float32
  np.testing.assert_allclose(np.asarray(same), x, atol=1e-3)
  flip = np.array([True, False, True, False])
  mirrored = augment.apply_hflip(np.asarray(same), flip)
  np.testing.assert_array_equal(np.asarray(mirrored)[0], x[0, :, ::-1].astype(np.float32))
  np.testing.assert_array_equal(np.asarray(mirrored)[1], x[1].astype(np.float32))
  # With hflip=True and a full-image crop, every output is the input or its mirror, both occur.
  out = np.asarray(jax.jit(functools.partial(full, hflip=True))(jax.random.key(1), _images(64)))
  x64 = _images(64)
  is_same = np.all(np.abs(out - x64) < 1e-3, axis=(1, 2, 3))
  is_flip = np.all(np.abs(out - x64[:, :, ::-1]) < 1e-3, axis=(1, 2, 3))
  assert np.all(is_same | is_flip) and is_same.any() and is_flip.any()


def test_crop_boxes_inside_and_area_in_scale():
  for (h, w), scale, ratio in [((32, 32), (0.2, 1.0), (3 / 4, 4 / 3)),
                               ((24, 40), (0.08, 1.0), (3 / 4, 4 / 3)),
                               ((32, 32), (0.3, 0.6), (0.5, 2.0))]:
    boxes = np.asarray(augment.sample_crop_boxes(jax.random.key(7), 20000, h, w, scale=scale,
                                                 ratio=ratio))
    top, left, bh, bw = boxes.T
    assert (top >= 0).all() and (left >= 0).all()
    assert (top + bh <= h + 1e-4).all() and (left + bw <= w + 1e-4).all()
    frac = bh * bw / (h * w)
    assert (frac >= scale[0] - 1e-5).all() and (frac <= scale[1] + 1e-5).all()
    aspect = bw / bh
    assert (aspect >= ratio[0] - 1e-4).all() and (aspect <= ratio[1] + 1e-4).all()
    assert frac.std() > 0.05 and left.std() > 0.5   # really random
  # The host (numpy) sampler follows the same rule.
  rng = np.random.default_rng(0)
  for _ in range(500):
    top, left, bh, bw = host_crop.sample_crop_box_np(rng, 24, 40, (0.2, 1.0), (3 / 4, 4 / 3))
    assert top >= 0 and left >= 0 and top + bh <= 24 + 1e-6 and left + bw <= 40 + 1e-6
    assert 0.2 - 1e-6 <= bh * bw / 960 <= 1.0


def test_crop_flip_rng_jit_and_normalize():
  x = _images(8)
  fn = jax.jit(lambda k, im: augment.random_resized_crop_flip(k, im, out_size=16))
  a, b = fn(jax.random.key(0), x), fn(jax.random.key(0), x)
  c = fn(jax.random.key(1), x)
  assert a.shape == (8, 16, 16, 3)
  np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
  assert not np.allclose(np.asarray(a), np.asarray(c))
  assert float(a.min()) >= -1e-3 and float(a.max()) <= 255 + 1e-3
  n = augment.normalize(np.full((1, 2, 2, 3), 255, np.uint8))
  np.testing.assert_allclose(np.asarray(n)[0, 0, 0],
                             (1 - np.array(augment.IMAGENET_MEAN)) / np.array(augment.IMAGENET_STD),
                             rtol=1e-6)
