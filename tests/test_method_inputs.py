"""Inputs declared by the method: its training views are cut on the host from the decoded
image for streamed data (`Method.train_views`, `host_crop.HostMultiCrop`), on the device for
in-memory data; its evaluation preprocessing and init input are its own."""
import jax
import jax.numpy as jnp
import numpy as np
from PIL import Image

from helpers import tiny_config
from mim_jax import methods, train
from mim_jax.data import augment, host_crop, pipeline, views
from test_fast_decode import _cfg, _folder

SPECS = (host_crop.CropSpec("global", 2, 32, (0.4, 1.0)), host_crop.CropSpec("local", 3, 16, (0.05, 0.4)))


def test_host_multi_crop_cuts_each_view_from_the_whole_decoded_image(shared_cifar_dir):
  """Each view is PIL's bicubic resize of its own box of the full image (then a flip), drawn in
  order from the element's generator: the same crops a by-hand loop makes."""
  image = np.asarray(Image.open(shared_cifar_dir / "cat/0002.jpg").convert("RGB").resize((160, 120)))
  out = host_crop.HostMultiCrop(SPECS).random_map({"image": image, "label": 3, "index": 7},
                                                   np.random.default_rng(5))
  assert set(out["image"]) == {"global", "local"} and out["label"] == 3 and out["index"] == 7
  assert out["image"]["global"].shape == (2, 32, 32, 3) and out["image"]["local"].shape == (3, 16, 16, 3)
  rng = np.random.default_rng(5)
  for spec in SPECS:
    for k in range(spec.count):
      top, left, h, w = host_crop.sample_crop_box_np(rng, 120, 160, spec.scale, spec.ratio)
      want = np.asarray(Image.fromarray(image).resize(
          (spec.size, spec.size), Image.Resampling.BICUBIC, box=(left, top, left + w, top + h)))
      if rng.uniform() < 0.5:
        want = want[:, ::-1]
      np.testing.assert_array_equal(out["image"][spec.name][k], want)


def test_streamed_batches_carry_the_declared_views(tmp_path, shared_cifar_dir):
  root = _folder(tmp_path / "images", shared_cifar_dir, per_class=4)
  loader = pipeline.make_train_loader(_cfg(root, batch_size=6, image_size=32), seed=0,
                                      process_index=0, process_count=1, views=SPECS)
  batch = next(loader)
  assert batch["image"]["global"].shape == (6, 2, 32, 32, 3)
  assert batch["image"]["local"].shape == (6, 3, 16, 16, 3)
  assert batch["image"]["global"].dtype == np.uint8 and batch["index"].shape == (6,)
  assert loader.image_shape == {"global": (2, 32, 32, 3), "local": (3, 16, 16, 3)}


def test_host_crops_get_only_the_colour_ops():
  """With every colour op off, the views made from host crops are the crops, normalised: no
  second crop on the device; with them on, the draws equal the device path's for the same
  crops (the same keys per view group)."""
  rng = np.random.default_rng(0)
  crops = {"global": jnp.asarray(rng.integers(0, 256, (4, 2, 16, 16, 3)), jnp.uint8),
           "local": jnp.asarray(rng.integers(0, 256, (4, 3, 8, 8, 3)), jnp.uint8)}
  off = dict(global_size=16, local_size=8, num_global=2, num_local=3, jitter_prob=0.0,
             gray_prob=0.0, blur_probs=(0.0, 0.0, 0.0), solarize_prob=0.0)
  out = views.multi_crop(jax.random.PRNGKey(1), None, crops=crops, **off)
  for name in ("global", "local"):
    np.testing.assert_allclose(out[name], augment.normalize(crops[name].astype(jnp.float32)),
                               rtol=1e-6, atol=1e-6)
  on = views.multi_crop(jax.random.PRNGKey(1), None, crops=crops, global_size=16, local_size=8,
                        num_global=2, num_local=3)
  assert not np.allclose(on["global"], out["global"])


def test_ibot_declares_its_views_and_trains_on_streamed_data(tmp_path, shared_cifar_dir):
  root = _folder(tmp_path / "images", shared_cifar_dir, per_class=4)
  c = tiny_config("ibot")
  c.ibot.update(out_dim=48, patch_out_dim=48)
  c.ibot.head = dict(hidden_dim=32, bottleneck_dim=16, nlayers=3)
  c.ibot.views.update(num_local=2, local_size=16)
  c.model.depth = 1
  c.input.data.update(name="image_folder", dir=str(root), in_memory=False, holdout_per_class=0)
  c.input.batch_size = 8
  m = methods.get(c)
  specs = m.train_views()
  assert [(s.name, s.count, s.size) for s in specs] == [("global", 2, 32), ("local", 2, 16)]
  tr = train.Trainer.create(c, devices=jax.devices()[:1])
  assert not tr.on_device_aug
  batch = next(tr.loader)
  assert batch["image"]["global"].shape == (8, 2, 32, 32, 3)
  loss = float(tr.step()["loss"])
  assert np.isfinite(loss)


def test_eval_preprocessing_and_init_input_are_the_methods():
  m = methods.get(tiny_config("mae"))
  assert m.init_input().shape == (2, 32, 32, 3)
  x = np.full((2, 32, 32, 3), 255, np.uint8)
  np.testing.assert_allclose(m.eval_preprocess(x, m.config.input)[0, 0, 0],
                             (1.0 - np.asarray(m.config.input.mean)) / np.asarray(m.config.input.std),
                             rtol=1e-6)
