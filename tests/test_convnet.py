"""The pretext-task ConvNets (mim_jax/models/convnet.py): AlexNet with BatchNorm and RotNet's NIN.
Parameter counts against hand counts of the official layers, feature-map sizes, the pooling
ops against NumPy re-derivations of torch's, the split-brain probe dimensions, and the
BatchNorm state of a training pass."""
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from mim_jax import models
from mim_jax.models import convnet


def conv_params(cin, cout, k, bias):
  return cin * cout * k * k + (cout if bias else 0)


def test_alexnet_parameter_counts_equal_the_official_layers_plus_batchnorm():
  for widths in ("torch", "caffe"):
    chans = convnet.ALEXNET_WIDTHS[widths]
    ins = (3,) + chans[:-1]
    want = sum(conv_params(i, o, k, True) + 2 * o
               for i, o, k in zip(ins, chans, convnet.ALEXNET_KERNELS))
    model = models.build(convnet.default_config("alexnet", widths=widths), 224)
    assert convnet.param_count(model, 224) == want
  # torchvision's alexnet().features has 2,469,696 parameters; BatchNorm adds 2 x 1152.
  assert convnet.param_count(models.build(convnet.default_config("alexnet"), 224), 224) == 2_469_696 + 2304


def test_nin_parameter_count_equals_rotnets_four_block_network():
  blocks = [[(3, 192, 5), (192, 160, 1), (160, 96, 1)], [(96, 192, 5), (192, 192, 1), (192, 192, 1)]]
  blocks += [[(192, 192, 3), (192, 192, 1), (192, 192, 1)]] * 2
  want = sum(conv_params(i, o, k, False) + 2 * o for b in blocks for i, o, k in b)
  assert convnet.param_count(models.build(convnet.default_config("nin"), 32), 32) == want


def map_shapes(cfg, size):
  model = models.build(cfg, size)
  x = jnp.zeros((1, size, size, 3))
  def run():
    v = model.init(jax.random.PRNGKey(0), x)
    return model.apply(v, x, mutable=["intermediates"])
  out, inter = jax.eval_shape(run)
  return out.shape, [m.shape[1:3] for m in inter["intermediates"]["layer_outputs"]]


def test_feature_map_sizes_of_the_official_alexnet_the_cifar_variant_and_nin():
  out, maps = map_shapes(convnet.default_config("alexnet"), 224)
  assert maps == [(55, 55), (27, 27), (13, 13), (13, 13), (13, 13)] and out == (1, 6, 6, 256)
  out, maps = map_shapes(convnet.default_config("alexnet", stem="cifar"), 32)
  assert maps == [(32, 32), (16, 16), (8, 8), (8, 8), (8, 8)] and out == (1, 4, 4, 256)
  out, _ = map_shapes(convnet.default_config("alexnet", pool5=False), 224)
  assert out == (1, 13, 13, 256)
  # The jigsaw network's conv1 stride 2 on 64 px tiles.
  _, maps = map_shapes(convnet.default_config("alexnet", widths="caffe", conv1_stride=2), 64)
  assert maps[0] == (29, 29)
  out, maps = map_shapes(convnet.default_config("nin"), 32)
  assert maps == [(16, 16), (8, 8), (8, 8), (8, 8)] and out == (1, 8, 8, 192)


def test_adaptive_average_pool_equals_torchs_bins():
  x = np.random.RandomState(0).randn(2, 7, 5, 3).astype(np.float32)
  s = 3
  want = np.zeros((2, s, s, 3), np.float32)
  for i in range(s):
    for j in range(s):
      r0, r1 = (i * 7) // s, -(-((i + 1) * 7) // s)
      c0, c1 = (j * 5) // s, -(-((j + 1) * 5) // s)
      want[:, i, j] = x[:, r0:r1, c0:c1].mean(axis=(1, 2))
  np.testing.assert_allclose(convnet.adaptive_avg_pool(jnp.asarray(x), s), want, rtol=1e-6)


def test_average_pool_counts_the_zero_padding_as_torch():
  x = np.arange(16, dtype=np.float32).reshape(1, 4, 4, 1)
  y = np.asarray(convnet.avg_pool_include_pad(jnp.asarray(x)))
  assert y.shape == (1, 2, 2, 1)
  assert y[0, 0, 0, 0] == pytest.approx((0 + 1 + 4 + 5) / 9)      # corner: 4 values / 9
  assert y[0, 1, 1, 0] == pytest.approx(x[0, 1:4, 1:4, 0].sum() / 9)


def test_probe_features_have_the_split_brain_dimensions():
  # Zhang et al. (2017) pool CaffeNet's conv1..conv5 to 9600, 9216, 9600, 9600, 9216 values.
  model = models.build(convnet.default_config("alexnet", widths="caffe"), 224)
  x = jnp.zeros((1, 224, 224, 3))
  def run():
    v = model.init(jax.random.PRNGKey(0), x)
    return models.outputs(model, v, x, pooling="mean", layers=True)["layers"]
  dims = [s.shape[-1] for s in jax.eval_shape(run)]
  assert dims == [9600, 9216, 9600, 9600, 9216, 256]


def test_a_training_pass_updates_the_running_statistics_and_evaluation_reads_them():
  cfg = convnet.default_config("alexnet", stem="cifar", width=0.125)
  model = models.build(cfg, 16)
  x = jax.random.normal(jax.random.PRNGKey(1), (4, 16, 16, 3)) * 3 + 1
  v = model.init(jax.random.PRNGKey(0), x)
  out, new = models.forward(model, v, x, train=True, pooling="mean")
  # conv1 (5x5, padding 2, bias) by hand; torch's running mean after one step: 0.1 x batch mean.
  p = v["params"]["conv1"]["conv"]
  pre = jax.lax.conv_general_dilated(x, p["kernel"], (1, 1), ((2, 2), (2, 2)),
                                     dimension_numbers=("NHWC", "HWIO", "NHWC")) + p["bias"]
  np.testing.assert_allclose(new["batch_stats"]["conv1"]["bn"]["running_mean"],
                             0.1 * np.asarray(pre).mean((0, 1, 2)), rtol=1e-4, atol=1e-6)
  ev, none = models.forward(model, {**v, **new}, x, train=False, pooling="mean")
  assert none == {} and ev["pooled"].shape == (4, 32) and out["grid"] == (2, 2)
  assert not np.allclose(ev["pooled"], out["pooled"])   # running vs batch statistics


def test_bad_keys_and_values_are_one_line_errors():
  with pytest.raises(ValueError, match="not a alexnet key"):
    convnet.check_config({"name": "alexnet", "depth": 5})
  with pytest.raises(ValueError, match="'torch' or 'caffe'"):
    convnet.default_config("alexnet", widths="vgg")
  with pytest.raises(ValueError, match="use 3, 4 or 5"):
    convnet.default_config("nin", num_stages=7)
  with pytest.raises(ValueError, match="positive whole number"):
    convnet.default_config("alexnet", width=0.3)


def test_initialisation_is_torchs_default_as_rotnet_runs():
  model = models.build(convnet.default_config("alexnet", stem="cifar", width=0.5), 32)
  p = model.init(jax.random.PRNGKey(0), jnp.zeros((1, 32, 32, 3)))["params"]
  k, b = p["conv2"]["conv"]["kernel"], p["conv2"]["conv"]["bias"]
  bound = 1 / np.sqrt(32 * 5 * 5)                 # fan_in of conv2: 32 channels x 5 x 5
  for w in (k, b):
    assert np.abs(w).max() <= bound and np.abs(w).max() > 0.95 * bound
  assert np.all(p["conv2"]["bn"]["scale"] == 1) and np.all(p["conv2"]["bn"]["bias"] == 0)
