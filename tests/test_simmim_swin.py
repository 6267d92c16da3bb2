"""SimMIM on a Swin (mim_jax/methods/simmim.py with model.name='swin'), and fine-tuning it.

Checks: the loss equals a hand computation (the encoder's final map through the 1x1 conv, a
pixel shuffle written as index loops, L1 on the masked pixels); the decoder's stride is the
encoder's (a ViT's stays its patch); the mask token replaces masked patch embeddings at patch
resolution; Swin V2's normalised targets against a brute-force neighbourhood loop; the
reconstruction picture; a resumed run continues bit for bit; 8 fake devices give the one-device
step; fine-tuning loads the pretrained Swin at another window size (tables resized) and takes
a step with drop path.
"""
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from helpers import apply_overrides, assert_same_losses, load_config, losses, resumed_losses
from mim_jax import checkpointing, masking, methods, train
from mim_jax.methods import simmim
from mim_jax.models import resnet, swin

pytestmark = pytest.mark.usefixtures("compilation_cache")
KEY = jax.random.PRNGKey(0)


def tiny_swin(**overrides):
  """configs/simmim.py:swin_cifar10 shrunk: embed 8, two stages (16x16 and 8x8 maps, both with
  shifted 4x4 windows), stride 4, on the embedded data."""
  c = load_config("simmim", "swin_cifar10")
  c.model.update(embed_dim=8, depths=(2, 2), num_heads=(2, 4))
  c.input.data.update(name="embedded", dir="", holdout_per_class=100)
  c.input.batch_size = 16
  c.total_steps, c.log_every, c.ckpt_every, c.keep_ckpts = 3, 1, 2, 5
  c.evals = {}
  return apply_overrides(c, overrides)


def images(n=4, seed=0):
  return np.random.default_rng(seed).standard_normal((n, 32, 32, 3)).astype(np.float32)


@pytest.fixture(scope="module")
def method():
  """(the tiny SimMIM-Swin, its initial parameters, its jitted encoder (params, x, mask))."""
  m = methods.get(tiny_swin())
  params = jax.jit(m.init)(KEY, jnp.asarray(images()))
  encode = jax.jit(lambda p, x, mask: m.encoder.apply({"params": p}, x, mask=mask))
  return m, params, encode


def hand_reconstruction(method, params, x, mask):
  """The encoder's final map -> x @ W + b -> PixelShuffle(stride), the shuffle as loops."""
  m, _, encode = method
  feats = np.asarray(encode(params["encoder"], x, mask), np.float64)
  dec = params["decoder"]["conv1x1"]
  y = feats @ np.asarray(dec["kernel"], np.float64) + np.asarray(dec["bias"], np.float64)
  b, h, w, _ = y.shape
  r = m.encoder.stride
  rec = np.zeros((b, h * r, w * r, 3))
  for c in range(3):
    for i in range(r):
      for j in range(r):
        rec[:, i::r, j::r, c] = y[..., c * r * r + i * r + j]
  return rec


def hand_loss(target, rec, mask, patch):
  pix = np.repeat(np.repeat(np.asarray(mask), patch, 1), patch, 2)[..., None].astype(np.float64)
  return np.sum(np.abs(target - rec) * pix) / (pix.sum() + 1e-5) / 3


def brute_norm_targets(x, k):
  """Each pixel over the pixels of its k x k neighbourhood inside the image: mean and unbiased
  variance (clamped at 0), (x - mean) / sqrt(var + 1e-6)."""
  out = np.zeros_like(x, np.float64)
  r = k // 2
  b, h, w, c = x.shape
  for i in range(h):
    for j in range(w):
      win = x[:, max(i - r, 0):i + r + 1, max(j - r, 0):j + r + 1].reshape(b, -1, c)
      mean, var = win.mean(1), np.maximum(win.var(1, ddof=1), 0)
      out[:, i, j] = (x[:, i, j] - mean) / np.sqrt(var + 1e-6)
  return out


# --------------------------------------------------------------------------- the method

def test_loss_equals_hand_computation(method):
  m, params, _ = method
  assert m.decoder.stride == m.encoder.stride == 4
  x = images()
  assert params["decoder"]["conv1x1"]["kernel"].shape == (16, 4 * 4 * 3)
  rng = jax.random.PRNGKey(3)
  loss, aux = jax.jit(m.loss)(params, {}, jnp.asarray(x), rng, 0)
  mask = masking.simmim_mask(jax.random.split(rng)[0], 4, 32, 8, 2, 0.6)
  assert mask.shape == (4, 16, 16) and int(mask.sum()) == 4 * 10 * 16     # 10 of 16 patches
  want = hand_loss(x, hand_reconstruction(method, params, x, mask), mask, 2)
  np.testing.assert_allclose(float(loss), want, rtol=1e-5)
  assert float(aux["mask_ratio"]) == pytest.approx(10 / 16)


def test_decoder_stride_is_the_encoders_and_errors():
  assert methods.get(load_config("simmim", "swin_cifar10")).decoder.stride == 16
  assert methods.get(load_config("simmim", "imagenet_swin_b")).decoder.stride == 32
  assert methods.get(load_config("simmim", "cifar10")).decoder.stride == 4      # ViT: its patch
  c = load_config("simmim", "swin_cifar10")
  c.model = resnet.default_config(depth=18)
  with pytest.raises(ValueError, match="'vit' or 'swin'") as e:
    methods.get(c)
  assert "\n" not in str(e.value)
  with pytest.raises(ValueError, match="odd size"):
    methods.get(tiny_swin(**{"simmim.norm_target": True, "simmim.norm_target_patch": 4}))


def test_mask_token_replaces_masked_patch_embeddings(method):
  m, params, encode = method
  x = images()
  everything = jnp.ones((4, 16, 16))
  a, b = encode(params["encoder"], x, everything), encode(params["encoder"], images(seed=1),
                                                          everything)
  np.testing.assert_array_equal(a, b)          # every embedding is the token: images unseen
  assert not np.allclose(encode(params["encoder"], x, jnp.zeros((4, 16, 16))),
                         encode(params["encoder"], images(seed=1), jnp.zeros((4, 16, 16))))
  one = jnp.zeros((4, 16, 16)).at[:, 3, 5].set(1)    # one 2 px patch: its embedding only
  changed = np.asarray(encode(params["encoder"], x, one) != encode(params["encoder"], x,
                                                                   jnp.zeros((4, 16, 16))))
  assert changed.any()
  assert params["encoder"]["mask_token"].shape == (1, 1, 8)


def test_norm_targets_and_their_loss(method):
  x = images(2)[:, :6, :7, :2].astype(np.float64)
  for k in (3, 5):
    np.testing.assert_allclose(simmim.norm_targets(jnp.asarray(x, jnp.float32), k),
                               brute_norm_targets(x, k), rtol=1e-4, atol=1e-4)
  m = methods.get(tiny_swin(**{"simmim.norm_target": True, "simmim.norm_target_patch": 5}))
  params = method[1]          # the same parameters: only the targets differ
  x = images()
  rng = jax.random.PRNGKey(4)
  loss, _ = jax.jit(m.loss)(params, {}, jnp.asarray(x), rng, 0)
  mask = masking.simmim_mask(jax.random.split(rng)[0], 4, 32, 8, 2, 0.6)
  rec = hand_reconstruction(method, params, x, mask)
  np.testing.assert_allclose(float(loss), hand_loss(brute_norm_targets(x, 5), rec, mask, 2),
                             rtol=1e-4)
  # The picture shows the prediction on the image's scale: rec * sqrt(var + 1e-6) + mean.
  out = jax.jit(m.reconstruct)(params, {}, jnp.asarray(x), rng)
  pix = np.repeat(np.repeat(np.asarray(mask), 2, 1), 2, 2).astype(bool)
  mean, var = (np.asarray(t) for t in simmim.local_stats(jnp.asarray(x), 5))
  want = rec * np.sqrt(var + 1e-6) + mean
  np.testing.assert_allclose(np.asarray(out["reconstruction"])[pix], want[pix], rtol=1e-4,
                             atol=1e-4)
  np.testing.assert_array_equal(np.asarray(out["reconstruction"])[~pix], x[~pix])


def test_reconstruction_picture_keeps_the_visible_pixels(method):
  m, params, _ = method
  x = images()
  rng = jax.random.PRNGKey(5)
  out = jax.tree.map(np.asarray, jax.jit(m.reconstruct)(params, {}, jnp.asarray(x), rng))
  mask = masking.simmim_mask(jax.random.split(rng)[0], 4, 32, 8, 2, 0.6)
  pix = np.repeat(np.repeat(np.asarray(mask), 2, 1), 2, 2).astype(bool)
  rec = hand_reconstruction(method, params, x, mask)
  np.testing.assert_allclose(out["reconstruction"][pix], rec[pix], rtol=1e-4, atol=1e-5)
  np.testing.assert_array_equal(out["reconstruction"][~pix], x[~pix])
  assert not out["masked"][pix].any() and np.array_equal(out["masked"][~pix], x[~pix])


# --------------------------------------------------------------------------- training runs

@pytest.fixture(scope="module")
def pretrained(tmp_path_factory):
  """An uninterrupted 3-step tiny SimMIM-Swin run (with the reconstruction picture)."""
  d = str(tmp_path_factory.mktemp("simmim_swin"))
  c = tiny_swin()
  c.evals = {"reconstruction": dict(type="reconstruction", enabled=True, num_images=2, seed=0)}
  train.train_and_evaluate(c, d, progress=False, devices=jax.devices()[:1])
  return d


def test_resumed_run_equals_uninterrupted(pretrained, tmp_path):
  import os
  assert os.path.isfile(os.path.join(pretrained, "reconstruction.png"))
  got = resumed_losses(tiny_swin(), str(tmp_path), stop_after=2, devices=jax.devices()[:1])
  assert_same_losses(losses(pretrained), got, 3)


def test_sharded_step_equals_one_device_step(pretrained):
  # Two steps on 8 fake devices against the one-device run's logged losses and its step-2
  # checkpoint (restored into the 8-device trainer after its own steps).
  tr = train.Trainer.create(tiny_swin(mesh=(("data", -1), ("fsdp", 1))), devices=jax.devices()[:8])
  l8 = [float(tr.step()["loss"]) for _ in range(2)]
  p8 = jax.device_get(tr.state["params"])
  ref = losses(pretrained)
  np.testing.assert_allclose(l8, [ref[1], ref[2]], rtol=2e-5)
  ckpt = checkpointing.Checkpointer(pretrained, keep=5)
  tr.restore(ckpt, 2, with_data=False)
  ckpt.close()
  jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-6), p8,
               jax.device_get(tr.state["params"]))


def test_finetune_loads_the_run_at_another_window_and_steps(pretrained):
  ft = load_config("finetune", "swin_cifar10")
  ft.model.update(embed_dim=8, depths=(2, 2), num_heads=(2, 4), window_size=8)
  ft.finetune.pretrained = pretrained
  m = methods.get(ft)
  x = jnp.asarray(images(8))
  variables = jax.jit(m.init_variables)(KEY, x)
  got = variables["params"]["encoder"]
  saved = m.pretrained_encoder_params()
  assert "mask_token" in saved and "mask_token" not in got
  np.testing.assert_array_equal(got["layers_1"]["blocks_1"]["mlp"]["fc2"]["kernel"],
                                saved["layers_1"]["blocks_1"]["mlp"]["fc2"]["kernel"])
  t = got["layers_0"]["blocks_0"]["attn"]["relative_position_bias_table"]
  assert t.shape == (15 * 15, 2)      # window 4 -> 8: SimMIM's geometric resize
  np.testing.assert_allclose(t, swin.interpolate_bias_table(
      saved["layers_0"]["blocks_0"]["attn"]["relative_position_bias_table"], 8, "geometric"),
      rtol=1e-6)
  # Training draws drop path (model.drop_path 0.1) from the rng the loss passes; evaluation none.
  params = variables["params"]
  logits = jax.jit(lambda p, r: m.cnn_classify(p, {}, x, train=True, rng=r)[1])
  a, b = logits(params, jax.random.PRNGKey(1)), logits(params, jax.random.PRNGKey(2))
  assert not np.allclose(a, b) and np.array_equal(a, logits(params, jax.random.PRNGKey(1)))
  ft.model.patch_size = 4
  with pytest.raises(Exception, match="patch_size"):
    methods.get(ft).init_variables(KEY, x)
