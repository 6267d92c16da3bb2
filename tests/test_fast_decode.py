"""Tests of the fused decode + RandomResizedCrop + flip (``input.fast_decode``) streaming path."""
from __future__ import annotations

import io

import ml_collections
import numpy as np
import pytest
from PIL import Image, ImageFile

from mim_jax.data import host_crop, pipeline, records, regions, sources

SCALE = (0.2, 1.0)
RATIO = (3 / 4, 4 / 3)


def _photo(shared_cifar_dir, width: int, height: int, name: str = "cat/0001.jpg",
           texture: bool = True) -> np.ndarray:
  """A real CIFAR picture upscaled to width x height, with fine detail added (so that losing
  resolution would show)."""
  with Image.open(shared_cifar_dir / name) as im:
    base = np.asarray(im.convert("RGB").resize((width, height), Image.Resampling.BICUBIC),
                      np.float32)
  if texture:
    yy, xx = np.mgrid[0:height, 0:width]
    base = base + 30 * np.sin(xx * 0.1 + yy * 0.06)[..., None]
  return np.clip(base, 0, 255).astype(np.uint8)


def _encode(image: np.ndarray, fmt: str = "JPEG", **kw) -> bytes:
  buf = io.BytesIO()
  Image.fromarray(image).save(buf, format=fmt, **kw)
  return buf.getvalue()


def _old_path(data: bytes, seed: int, size: int) -> np.ndarray:
  """The full-decode path: DecodedSource's decode, then HostRandomResizedCropFlip."""
  crop = host_crop.HostRandomResizedCropFlip(size, SCALE, RATIO, True)
  element = {"image": sources.decode_image(data), "label": np.int32(0), "bad": np.int32(0)}
  return crop.random_map(element, np.random.default_rng(seed))["image"]


def _fast_path(data: bytes, seed: int, size: int) -> tuple[np.ndarray, int, int]:
  return host_crop.decode_crop_flip(data, np.random.default_rng(seed), size, SCALE, RATIO, True)


def test_reduction_for_box_exact_values():
  r = host_crop.reduction_for_box
  assert r((0, 0, 64, 64), 64) == 1
  assert r((0, 0, 127.9, 900), 64) == 1
  assert r((5, 7, 128, 128), 64) == 2
  assert r((0, 0, 255.99, 300), 64) == 2
  assert r((0, 0, 256, 256), 64) == 4
  assert r((0, 0, 600, 511), 64) == 4
  assert r((0, 0, 512, 512), 64) == 8
  assert r((0, 0, 5000, 4000), 64) == 8
  assert r((10, 20, 448, 500), 224) == 2
  assert r((10, 20, 447.5, 1000), 224) == 1
  assert r((0, 0, 375, 500), 224) == 1   # an ImageNet-sized full crop keeps full resolution


def test_fast_decode_close_to_full_decode_with_reduction(shared_cifar_dir):
  data = _encode(_photo(shared_cifar_dir, 900, 700), quality=90)
  size, diffs, used = 64, [], set()
  for seed in range(30):
    fast, bad, factor = _fast_path(data, seed, size)
    # The reduction is the one the box allows (the box comes from the first rng draws).
    box = host_crop.sample_crop_box_np(np.random.default_rng(seed), 700, 900, SCALE, RATIO)
    assert factor == host_crop.reduction_for_box(box, size) and factor >= 4
    assert bad == 0 and fast.shape == (size, size, 3) and fast.dtype == np.uint8
    diffs.append(np.abs(fast.astype(np.float64) - _old_path(data, seed, size)).mean())
    used.add(factor)
  # Same crop and flip, decoded at 1/4 or 1/8 scale: mean abs difference < 1.5 grey levels per
  # image (measured 0.3 at 1/4 and 0.8 at 1/8 here; the box moved by one reduced pixel gives
  # 7.6 or more). Texture much finer than this (a period of ~4 output pixels) differs by up to
  # ~2.6 at 1/8: libjpeg's scaled IDCT filters differently from PIL's antialiased bicubic.
  assert max(diffs) < 1.5, diffs
  assert used == {4, 8}


def test_fast_decode_equals_full_decode_without_reduction(shared_cifar_dir):
  small = _encode(_photo(shared_cifar_dir, 300, 240), quality=90)   # box < 2 * 224
  grey = _encode(_photo(shared_cifar_dir, 300, 240)[..., 0], quality=85)
  png = _encode(_photo(shared_cifar_dir, 900, 700), "PNG")          # not a JPEG: full decode
  for data, size in ((small, 224), (grey, 160), (png, 64)):
    for seed in range(8):
      fast, bad, factor = _fast_path(data, seed, size)
      assert factor == 1 and bad == 0
      np.testing.assert_array_equal(fast, _old_path(data, seed, size))


def _folder(root, shared_cifar_dir, per_class: int = 6, size=(160, 120)):
  for c, name in enumerate(("airplane", "cat", "ship")):
    (root / name).mkdir(parents=True, exist_ok=True)
    for i in range(per_class):
      image = _photo(shared_cifar_dir, *size, name=f"{name}/{i:04d}.jpg", texture=False)
      (root / name / f"{i:04d}.jpg").write_bytes(_encode(image, quality=90))
  return root


def _cfg(root, *, batch_size, image_size, fast_decode=True, workers=0, **extra):
  return ml_collections.ConfigDict(dict(
      data=dict(name="image_folder", dir=str(root), holdout_per_class=0, holdout_seed=0,
                in_memory=False, cache_dir=""),
      batch_size=batch_size, image_size=image_size, workers=workers,
      aug=dict(crop_scale=SCALE, crop_ratio=RATIO, hflip=True), fast_decode=fast_decode,
      **extra))


def test_truncated_and_non_image_files(tmp_path, shared_cifar_dir):
  root = _folder(tmp_path / "images", shared_cifar_dir, per_class=4)
  full = _encode(_photo(shared_cifar_dir, 600, 450), quality=90)
  (root / "cat" / "0100_truncated.jpg").write_bytes(full[:len(full) // 2])
  (root / "cat" / "0101_notes.jpg").write_bytes(b"this is not an image at all" * 4)
  src = sources.image_folder_source(dict(name="image_folder", dir=str(root)), "train")
  index = {src.path(i).rsplit("/", 1)[-1]: i for i in range(len(src))}
  checked = records.HeaderCheckedSource(src)
  # The source keeps the truncated file (its header parses) ...
  trunc = checked[index["0100_truncated.jpg"]]
  assert trunc["bad"] == 0 and trunc["image_bytes"] == full[:len(full) // 2]
  # ... and replaces the non-image by the next record, counting it, as DecodedSource does.
  notes = checked[index["0101_notes.jpg"]]
  nxt = (index["0101_notes.jpg"] + 1) % len(src)
  assert notes["bad"] == 1 and notes["image_bytes"] == src[nxt]["image_bytes"]
  assert notes["index"] == nxt          # the index is the record actually read
  assert records.DecodedSource(src)[index["0101_notes.jpg"]]["bad"] == 1
  # The transform decodes the truncated body with truncated images allowed, marking it bad.
  crop = host_crop.HostDecodeRandomResizedCropFlip(32, SCALE, RATIO, True)
  out = crop.random_map(trunc, np.random.default_rng(0))
  assert out["bad"] == 1 and out["image"].shape == (32, 32, 3) and set(out) == {
      "image", "label", "bad", "index"}
  assert ImageFile.LOAD_TRUNCATED_IMAGES is False   # restored
  ok = crop.random_map(checked[0], np.random.default_rng(0))
  assert ok["bad"] == 0
  # A full epoch through the loader: two bad records, no crash.
  loader = pipeline.make_train_loader(_cfg(root, batch_size=len(src), image_size=32), seed=0,
                                      process_index=0, process_count=1)
  batch = next(loader)
  assert batch["image"].shape == (len(src), 32, 32, 3) and int(batch["bad"].sum()) == 2
  # Each example's 'index' is the record read (a bad record's replacement: the next one), and
  # its label is that record's.
  idx = batch["index"]
  assert idx.dtype == np.int32 and set(idx.tolist()) <= set(range(len(src)))
  np.testing.assert_array_equal(batch["label"], [src[int(i)]["label"] for i in idx])
  assert index["0101_notes.jpg"] not in idx.tolist()


def test_undecodable_body_gives_grey(shared_cifar_dir, monkeypatch):
  data = _encode(_photo(shared_cifar_dir, 300, 240))

  def fail(*args, **kwargs):
    raise OSError("broken")

  monkeypatch.setattr(host_crop, "_crop_opened", fail)
  out, bad, factor = _fast_path(data, 0, 48)
  assert bad == 1 and factor == 1
  np.testing.assert_array_equal(out, np.full((48, 48, 3), 128, np.uint8))
  assert ImageFile.LOAD_TRUNCATED_IMAGES is False
  out, bad, _ = _fast_path(b"not an image", 0, 48)
  assert bad == 1 and (out == 128).all()


def _take(loader, n):
  return [next(loader) for _ in range(n)]


def _same(a, b):
  return all(np.array_equal(x[k], y[k]) for x, y in zip(a, b) for k in ("image", "label", "bad"))


def test_fast_loader_batches_and_state(tmp_path, shared_cifar_dir):
  root = _folder(tmp_path / "images", shared_cifar_dir)
  cfg = _cfg(root, batch_size=6, image_size=32)
  loader = pipeline.make_train_loader(cfg, seed=1, process_index=0, process_count=1)
  assert not loader.on_device_aug and loader.image_shape == (32, 32, 3)
  first = _take(loader, 2)
  for b in first:
    assert b["image"].shape == (6, 32, 32, 3) and b["image"].dtype == np.uint8
    assert b["label"].dtype == np.int32 and b["bad"].dtype == np.int32 and not b["bad"].any()
  state = loader.get_state()
  expect = _take(loader, 3)
  fresh = pipeline.make_train_loader(cfg, seed=1, process_index=0, process_count=1)
  fresh.set_state(state)
  assert _same(_take(fresh, 3), expect)
  # 160x120 files, 32-px crops: some boxes allow 1/2 scale, so the fast loader differs from
  # the full-decode one, but not by much.
  full = pipeline.make_train_loader(_cfg(root, batch_size=6, image_size=32, fast_decode=False),
                                    seed=1, process_index=0, process_count=1)
  both = _take(full, 2)
  assert all(np.array_equal(x["label"], y["label"]) for x, y in zip(first, both))
  diff = np.mean([np.abs(x["image"].astype(np.float64) - y["image"]).mean()
                  for x, y in zip(first, both)])
  assert diff < 3.0


def test_fast_loader_equals_full_loader_on_small_images(shared_cifar_dir, tmp_path):
  """32x32 files and 16-px crops: no reduction is possible, so the batches are identical."""
  root = tmp_path / "images"
  for name in ("airplane", "cat"):
    (root / name).mkdir(parents=True)
    for i in range(8):
      (root / name / f"{i:04d}.jpg").write_bytes(
          (shared_cifar_dir / name / f"{i:04d}.jpg").read_bytes())
  (root / "cat" / "0999_corrupt.jpg").write_bytes(b"\xff\xd8\xff\xe0 this is not a jpeg" * 3)
  batches = {}
  for fast in (True, False):
    loader = pipeline.make_train_loader(_cfg(root, batch_size=17, image_size=16, fast_decode=fast),
                                        seed=0, process_index=0, process_count=1)
    batches[fast] = _take(loader, 2)
  assert _same(batches[True], batches[False])
  assert int(batches[True][0]["bad"].sum()) == 1


def test_read_options_reach_grain_and_keep_the_batches(tmp_path, shared_cifar_dir, monkeypatch):
  """input.read_threads / read_buffer set grain's per-worker reader threads and prefetch
  buffer (default 2 and 16, not grain's 16 and 500); any setting gives the same batches."""
  import grain  # pylint: disable=g-import-not-at-top
  seen = []
  real = grain.DataLoader

  def spy(*args, **kwargs):
    seen.append(kwargs["read_options"])
    return real(*args, **kwargs)

  monkeypatch.setattr(grain, "DataLoader", spy)
  root = _folder(tmp_path / "images", shared_cifar_dir, per_class=5)
  runs = {}
  for read in ((None, None), (0, 0), (1, 2), (16, 500)):
    extra = {} if read[0] is None else dict(read_threads=read[0], read_buffer=read[1])
    loader = pipeline.make_train_loader(_cfg(root, batch_size=7, image_size=24, **extra),
                                        seed=3, process_index=0, process_count=1)
    runs[read] = _take(loader, 3)
    options = seen[-1]
    assert (options.num_threads, options.prefetch_buffer_size) == (
        (2, 16) if read[0] is None else read)
  for read, batches in runs.items():
    assert _same(batches, runs[(None, None)]), read


@pytest.mark.parametrize("mode", ["L", "CMYK"])
def test_non_rgb_jpegs(shared_cifar_dir, mode):
  image = Image.fromarray(_photo(shared_cifar_dir, 900, 700)).convert(mode)
  buf = io.BytesIO()
  image.save(buf, format="JPEG", quality=90)
  out, bad, factor = _fast_path(buf.getvalue(), 3, 64)
  assert out.shape == (64, 64, 3) and bad == 0 and factor > 1
  assert np.abs(out.astype(np.float64) - _old_path(buf.getvalue(), 3, 64)).mean() < 1.5


def test_decoded_records_cropped_like_before():
  """Sources that yield decoded arrays (TFDS with decode=True) are cropped as before."""
  images = np.random.default_rng(0).integers(0, 256, (3, 40, 50, 3), dtype=np.uint8)
  src = [{"image": images[i], "label": i} for i in range(3)]
  fast = host_crop.HostDecodeRandomResizedCropFlip(24, SCALE, RATIO, True)
  old = host_crop.HostRandomResizedCropFlip(24, SCALE, RATIO, True)
  for i in range(3):
    a = fast.random_map(records.HeaderCheckedSource(src)[i], np.random.default_rng(i))
    b = old.random_map(records.DecodedSource(src)[i], np.random.default_rng(i))
    assert set(a) == {"image", "label", "bad", "index"} and a["bad"] == 0 and a["label"] == i
    np.testing.assert_array_equal(a["image"], b["image"])


def test_input_pipeline_benchmark_rows(tmp_path, shared_cifar_dir):
  """benchmarks/input_pipeline.py times one row per (read setting, mode) and writes them."""
  import importlib.util  # pylint: disable=g-import-not-at-top
  import json  # pylint: disable=g-import-not-at-top
  import pathlib  # pylint: disable=g-import-not-at-top
  path = pathlib.Path(__file__).resolve().parents[1] / "benchmarks" / "input_pipeline.py"
  spec = importlib.util.spec_from_file_location("input_pipeline", path)
  mod = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(mod)
  root = _folder(tmp_path / "images", shared_cifar_dir, per_class=5)
  out = tmp_path / "ip.json"
  mod.main(["--data", str(root), "--workers", "0", "--read", "0:0,2:4", "--batch_size", "4",
            "--image_size", "24", "--warmup", "1", "--batches", "2", "--single_files", "6",
            "--ceiling", "0", "--json", str(out)])
  result = json.loads(out.read_text())
  assert [(r["read_threads"], r["read_buffer"], r["mode"]) for r in result["rows"]] == [
      (0, 0, "fast"), (0, 0, "full"), (2, 4, "fast"), (2, 4, "full")]
  assert all(r["images_per_s"] > 0 and r["bad"] == 0 for r in result["rows"])
  assert result["single_process"]["files"] == 6
  with pytest.raises(SystemExit, match="bad --read pair"):
    mod.main(["--data", str(root), "--read", "2-16", "--single_files", "0"])


# -- input.device_resize: regions decoded on the host, resampled on the device -------------------

def _on_device(records, size, canvas):
  """PackRegions -> unpack_regions -> resize_regions, as the loader and the step do."""
  from mim_jax.data import augment  # pylint: disable=g-import-not-at-top
  pack = regions.PackRegions(1, size, canvas, canvas * canvas)
  batch = pack([{**r, "label": np.int32(0)} for r in records])
  unpacked = augment.unpack_regions(batch["image"], batch["offset"], batch["valid"], canvas)
  return np.asarray(augment.resize_regions(unpacked, batch["box"], batch["valid"], batch["flip"],
                                           size))


def test_resize_regions_matches_pillow(shared_cifar_dir):
  from mim_jax.data import augment  # pylint: disable=g-import-not-at-top
  image = _photo(shared_cifar_dir, 150, 110)
  boxes = [(0.0, 0.0, 110.0, 150.0), (10.3, 20.7, 60.2, 75.9), (90.5, 130.2, 19.5, 19.8),
           (3.0, 4.0, 20.0, 24.0)]
  for (top, left, h, w) in boxes:
    ref = np.asarray(Image.fromarray(image).resize(
        (48, 48), Image.Resampling.BICUBIC, box=(left, top, left + w, top + h)), np.float64)
    canvas = np.full((160, 160, 3), 255, np.uint8)
    canvas[:110, :150] = image       # what lies beyond the image must not leak in
    got = np.asarray(augment.resize_regions(
        canvas[None], np.array([[top, left, h, w]], np.float32), np.array([[110, 150]]),
        np.array([False]), 48))[0]
    diff = np.abs(got - ref)
    assert diff.mean() < 0.5 and diff.max() <= 3, (top, left, h, w, diff.mean(), diff.max())
    flipped = np.asarray(augment.resize_regions(
        canvas[None], np.array([[top, left, h, w]], np.float32), np.array([[110, 150]]),
        np.array([True]), 48))[0]
    np.testing.assert_array_equal(flipped, got[:, ::-1])
  # A size x size region whose box is all of it comes back unchanged (the host fallback).
  small = _photo(shared_cifar_dir, 48, 48)
  canvas = np.zeros((64, 64, 3), np.uint8)
  canvas[:48, :48] = small
  same = np.asarray(augment.resize_regions(canvas[None], np.array([[0, 0, 48, 48]], np.float32),
                                           np.array([[48, 48]]), np.array([False]), 48))[0]
  np.testing.assert_array_equal(same, small)


def test_pack_and_unpack_regions_round_trip():
  """Regions of different sizes in 2 device rows come back exactly; over the budget, the
  largest of a group are resized on the host (exactly as region_to_crop) and marked."""
  from mim_jax.data import augment  # pylint: disable=g-import-not-at-top
  rng = np.random.default_rng(0)
  shapes = [(20, 30), (8, 8), (40, 17), (16, 16), (33, 40), (9, 25)]
  records = [regions._region_record(rng.integers(0, 256, (*hw, 3), dtype=np.uint8),  # pylint: disable=protected-access
                                     (1.5, 2.0, hw[0] - 1.5, hw[1] - 2.0), bool(i % 2), 0, False)
             for i, hw in enumerate(shapes)]
  pack = regions.PackRegions(2, 16, 40, 40 * 40)
  batch = pack([{**r, "label": np.int32(i)} for i, r in enumerate(records)])
  assert batch["image"].shape == (2, (3 * 1600 + 1600) * 3) and not batch["host_resized"].any()
  np.testing.assert_array_equal(batch["offset"], [0, 600, 664, 0, 256, 1576])
  np.testing.assert_array_equal(batch["label"], np.arange(6))
  canvases = np.asarray(augment.unpack_regions(batch["image"], batch["offset"], batch["valid"], 40))
  for r, c in zip(records, canvases):
    h, w = r["region"].shape[:2]
    np.testing.assert_array_equal(c[:h, :w], r["region"])
  # A budget of 16 x 16 pixels per image: group 0 holds 600 + 64 + 680 > 768 pixels, so its
  # largest (40 x 17) goes to the host; then 600 + 64 + 256 > 768: the 20 x 30 too. Group 1:
  # 256 + 1320 + 225 > 768, and once the 33 x 40 is resized, 256 + 256 + 225 fits.
  tight = regions.PackRegions(2, 16, 40, 16 * 16)([{**r, "label": np.int32(0)} for r in records])
  np.testing.assert_array_equal(tight["host_resized"], [True, False, True, False, True, False])
  canv = np.asarray(augment.unpack_regions(tight["image"], tight["offset"], tight["valid"], 40))
  for i in (0, 2):
    np.testing.assert_array_equal(canv[i, :16, :16], regions.region_to_crop(records[i], 16))
    assert tight["flip"][i] == False and tuple(tight["box"][i]) == (0, 0, 16, 16)  # noqa: E712


@pytest.mark.parametrize("size_wh,out,canvas", [((900, 700), 64, 256), ((300, 240), 64, 128),
                                                 ((160, 120), 32, 64)])
def test_decode_region_gives_the_fast_path_crop(shared_cifar_dir, size_wh, out, canvas):
  """Same draws as decode_crop_flip (box, reduction, flip): resized on the host the region
  gives its crop (the region holds every pixel the resize reads), on the device the same up
  to rounding; regions too big for the canvas come resized from the host."""
  data = _encode(_photo(shared_cifar_dir, *size_wh), quality=90)
  records, hosts = [], []
  for seed in range(12):
    host, bad, _ = _fast_path(data, seed, out)
    got = regions.decode_region(data, np.random.default_rng(seed), out, SCALE, RATIO, True,
                                 canvas)
    assert bad == got["bad"] == 0 and max(got["region"].shape[:2]) <= canvas
    # Pillow 13's result for a box is not invariant to shifting the image under it: up to
    # one level at some pixels (16% of them for one of these crops).
    diff = np.abs(regions.region_to_crop(got, out).astype(int) - host)
    assert diff.max() <= 1 and diff.mean() < 0.25, seed
    records.append(got)
    hosts.append(host)
  assert sum(not r["host_resized"] for r in records) >= 4
  dev = _on_device(records, out, canvas)
  for r, d, host in zip(records, dev, hosts):
    if r["host_resized"]:
      np.testing.assert_array_equal(d, host)
    else:
      assert np.abs(d - host.astype(np.float64)).mean() < 0.6


@pytest.mark.parametrize("kind", ["rgb", "rgb_small", "grey", "cmyk", "png", "truncated"])
def test_decode_region_simplejpeg_equals_pillow(shared_cifar_dir, monkeypatch, kind):
  """simplejpeg (used where installed) and Pillow give the same region records: same
  pixels at every DCT scale, same draws; CMYK and non-JPEG data go to Pillow."""
  assert regions._simplejpeg() is not None   # pylint: disable=protected-access
  image = Image.fromarray(_photo(shared_cifar_dir, *((120, 90) if kind == "rgb_small" else (900, 700))))
  if kind in ("grey", "cmyk"):
    image = image.convert({"grey": "L", "cmyk": "CMYK"}[kind])
  buf = io.BytesIO()
  image.save(buf, format="PNG" if kind == "png" else "JPEG", quality=90)
  data = buf.getvalue()[:len(buf.getvalue()) // 2] if kind == "truncated" else buf.getvalue()
  direct = regions._region_simplejpeg(  # pylint: disable=protected-access
      regions._simplejpeg(), data, np.random.default_rng(0), 64, SCALE, RATIO, True, 256)  # pylint: disable=protected-access
  runs = {}
  for use in (True, False):
    if not use:
      monkeypatch.setattr(regions, "_SIMPLEJPEG", False)
    runs[use] = [regions.decode_region(data, np.random.default_rng(seed), 64, SCALE, RATIO,
                                        True, 256) for seed in range(8)]
  for a, b in zip(runs[True], runs[False]):
    assert a.keys() == b.keys()
    for key in a:
      np.testing.assert_array_equal(a[key], b[key], err_msg=key)
  if kind != "truncated":   # simplejpeg really did the whole JPEGs, and only those
    assert (direct is None) == (kind in ("cmyk", "png"))
  resized = [bool(r["host_resized"]) for r in runs[True]]
  if kind == "truncated":
    assert all(resized) and all(r["bad"] == 1 for r in runs[True])
  elif kind != "png":   # a PNG is not reduced on decoding: its regions outgrow the canvas
    assert not all(resized)


def test_decode_region_falls_back_on_bad_data(shared_cifar_dir):
  full = _encode(_photo(shared_cifar_dir, 300, 240), quality=90)
  for data in (full[:len(full) // 2], b"not an image"):
    got = regions.decode_region(data, np.random.default_rng(0), 48, SCALE, RATIO, True, 96)
    host, bad, _ = _fast_path(data, 0, 48)
    assert got["host_resized"] and got["bad"] == bad == 1
    np.testing.assert_array_equal(got["region"], host)


def test_device_resize_loader_gives_the_fast_loaders_crops(tmp_path, shared_cifar_dir):
  from mim_jax.data import augment  # pylint: disable=g-import-not-at-top
  root = _folder(tmp_path / "images", shared_cifar_dir)
  fast = _take(pipeline.make_train_loader(_cfg(root, batch_size=6, image_size=32), seed=1,
                                          process_index=0, process_count=1), 2)
  loader = pipeline.make_train_loader(_cfg(root, batch_size=6, image_size=32, device_resize=96),
                                      seed=1, process_index=0, process_count=1, device_groups=2)
  assert loader.image_shape == (32, 32, 3)
  dev = _take(loader, 2)
  for f, d in zip(fast, dev):
    assert d["image"].shape == (2, (3 * 96 * 96 // 2 + 96 * 96) * 3) and d["box"].shape == (6, 4)
    np.testing.assert_array_equal(f["label"], d["label"])
    regions = augment.unpack_regions(d["image"], d["offset"], d["valid"], 96)
    got = np.asarray(augment.resize_regions(regions, d["box"], d["valid"], d["flip"], 32))
    assert np.abs(got - f["image"].astype(np.float64)).mean() < 0.6
  with pytest.raises(sources.DataConfigError, match="device_resize=16 is smaller"):
    pipeline.make_train_loader(_cfg(root, batch_size=6, image_size=32, device_resize=16),
                               seed=1, process_index=0, process_count=1)
