"""The ResNet backbone (mim_jax/models/resnet.py) and its torchvision mapping (convert/resnet.py).

The checks: parameter counts equal torchvision's documented ones (and SimCLR's wide ResNet-50s);
the named-output contract; PyTorch BatchNorm semantics (batch statistics, the unbiased running
variance with momentum 0.1, running statistics in evaluation, per-group statistics);
torchvision's initialisation; the name map (torchvision's key list, round trips, one-line
errors); and the converted network's logits and updated running statistics against a float64
NumPy port of torchvision's forward pass (always) and against torchvision itself where torch is
importable (`PYTHONPATH=/tmp/torchsite` locally; CI has no torch).
"""
import math

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import pytest

from mim_jax import models
from mim_jax.convert import resnet as convert
from mim_jax.convert.names import ConversionError
from mim_jax.models import resnet

# torchvision's documented num_params (ResNet{18..152}_Weights.IMAGENET1K_V1.meta).
TORCHVISION_PARAMS = {18: 11_689_512, 34: 21_797_672, 50: 25_557_032, 101: 44_549_160,
                      152: 60_192_808}


def count(tree):
  return sum(int(np.prod(x.shape)) for x in jax.tree.leaves(tree))


def hand_count(depth, width=1, stem="imagenet", num_classes=1000):
  """Parameters of torchvision's ResNet with every channel count times `width`, by hand."""
  blocks = {10: [1, 1, 1, 1], 18: [2, 2, 2, 2], 34: [3, 4, 6, 3], 50: [3, 4, 6, 3], 101: [3, 4, 23, 3],
            152: [3, 8, 36, 3]}[depth]
  bottleneck = depth >= 50
  c0 = int(64 * width)
  n = c0 * 3 * (49 if stem == "imagenet" else 9) + 2 * c0
  cin = c0
  for i, nb in enumerate(blocks):
    p = int(64 * 2 ** i * width)
    cout = 4 * p if bottleneck else p
    for j in range(nb):
      if bottleneck:
        n += cin * p + 2 * p + p * p * 9 + 2 * p + p * cout + 2 * cout
      else:
        n += cin * p * 9 + 2 * p + p * p * 9 + 2 * p
      if j == 0 and (i > 0 or cin != cout):
        n += cin * cout + 2 * cout
      cin = cout
  return n + (cin * num_classes + num_classes if num_classes else 0)


def random_variables(model, image_size=32, seed=0):
  """Variables of `model`'s shapes with random scales, biases and running statistics."""
  shapes = jax.eval_shape(model.init, jax.random.PRNGKey(0),
                          jnp.zeros((1, image_size, image_size, 3)))
  rng = np.random.default_rng(seed)

  def draw(path, s):
    name = path[-1].key
    if name in ("scale", "running_var"):
      return rng.uniform(0.5, 1.5, s.shape).astype(np.float32)
    if name == "kernel" and len(s.shape) == 4:
      fan_out = s.shape[0] * s.shape[1] * s.shape[3]
      return rng.normal(0, math.sqrt(2 / fan_out), s.shape).astype(np.float32)
    return rng.normal(0, 0.1, s.shape).astype(np.float32)
  return jax.tree_util.tree_map_with_path(draw, shapes)


# ---------------------------------------------------------------------------------------------
# Parameter counts.

def test_hand_count_reproduces_torchvisions_documented_counts():
  for depth, n in TORCHVISION_PARAMS.items():
    assert hand_count(depth) == n


@pytest.mark.parametrize("depth", [18, 50])
def test_parameter_count_equals_torchvision(depth):
  assert resnet.param_count(resnet.ResNet(depth=depth, num_classes=1000)) == \
      TORCHVISION_PARAMS[depth]


def test_cifar_stem_and_width_counts():
  # The CIFAR stem swaps conv1's 7x7 for a 3x3: 11,689,512 - 64*3*(49-9) = 11,681,832.
  assert resnet.param_count(resnet.ResNet(depth=18, stem="cifar", num_classes=1000)) == 11_681_832
  assert resnet.param_count(resnet.ResNet(depth=18, stem="cifar", num_classes=10)) == \
      hand_count(18, stem="cifar", num_classes=10)
  # depth 10 (the tests' tiny ResNet): resnet18's stem and stages with one block each
  assert resnet.param_count(resnet.ResNet(depth=10, stem="cifar", width=0.125)) == \
      hand_count(10, width=0.125, stem="cifar", num_classes=0)
  r50x2 = resnet.param_count(resnet.ResNet(depth=50, width=2))
  assert r50x2 == hand_count(50, width=2, num_classes=0)
  assert round(r50x2 / 1e6) == 94          # SimCLR, Table 8 (headless): ResNet-50 (2x) 94M
  assert resnet.param_count(resnet.ResNet(depth=34, width=0.5, num_classes=100)) == \
      hand_count(34, width=0.5, num_classes=100)


# ---------------------------------------------------------------------------------------------
# The output contract.

@pytest.mark.parametrize("depth,stem,size", [(18, "imagenet", 64), (50, "cifar", 32)])
def test_outputs_contract(depth, stem, size):
  model = resnet.ResNet(depth=depth, width=0.25, stem=stem, num_classes=7)
  variables = random_variables(model, size)
  x = jnp.asarray(np.random.default_rng(1).normal(size=(2, size, size, 3)), jnp.float32)
  out = jax.jit(lambda v, x: resnet.outputs(model, v, x, pooling="mean", layers=True))(variables, x)
  stride = 32 if stem == "imagenet" else 8
  exp = 1 if depth == 18 else 4
  c = 128 * exp
  assert out["stride"] == stride == model.stride
  assert out["grid"] == (size // stride, size // stride)
  assert out["tokens"].shape == (2, (size // stride) ** 2, c)
  assert out["pooled"].shape == (2, c) and out["pooled"].dtype == jnp.float32
  assert [v.shape[1] for v in out["layers"]] == [16 * exp, 32 * exp, 64 * exp, 128 * exp]
  np.testing.assert_array_equal(out["layers"][-1], out["pooled"])
  np.testing.assert_allclose(out["pooled"], out["tokens"].mean(1), rtol=1e-6, atol=1e-6)
  # 'pooled' is the pre-logits feature of the model with a head: fc applied to it = the logits.
  logits = model.apply(variables, x)
  fc = variables["params"]["fc"]
  np.testing.assert_allclose(logits, out["pooled"] @ fc["kernel"] + fc["bias"], rtol=1e-5, atol=1e-5)
  # The registry's outputs is this one; without layers the same pooled features.
  plain = models.outputs(model, variables, x, pooling="avg")
  assert "layers" not in plain
  np.testing.assert_allclose(plain["pooled"], out["pooled"], rtol=1e-5,      # eager vs jit
                             atol=1e-6 * np.abs(out["pooled"]).max())
  with pytest.raises(ValueError, match="'mean'"):
    resnet.outputs(model, variables, x, pooling="cls")


def test_stage_widths_and_headless_feature_map():
  assert resnet.ResNet(depth=18).stage_widths == (64, 128, 256, 512)
  assert resnet.ResNet(depth=50).stage_widths == (256, 512, 1024, 2048)
  assert resnet.ResNet(depth=50, width=2).stage_widths == (512, 1024, 2048, 4096)
  model = resnet.ResNet(depth=18, width=0.25)            # num_classes=0: the feature map
  v = random_variables(model, 64)
  x = jnp.asarray(np.random.default_rng(0).normal(size=(2, 64, 64, 3)), jnp.float32)
  y = model.apply(v, x)
  assert y.shape == (2, 2, 2, 128) and y.dtype == jnp.float32
  # bfloat16 compute: float32 output and running statistics, within bfloat16 rounding.
  m16 = resnet.ResNet(depth=18, width=0.25, dtype=jnp.bfloat16)
  y16, state = jax.jit(lambda v, x: m16.apply(v, x, train=True, mutable=["batch_stats"]))(v, x)
  y32, state32 = jax.jit(lambda v, x: model.apply(v, x, train=True, mutable=["batch_stats"]))(v, x)
  assert y16.dtype == jnp.float32
  assert {a.dtype for a in jax.tree.leaves(state)} == {jnp.dtype(jnp.float32)}
  assert np.abs(y16 - y32).max() < 0.05 * np.abs(y32).max()


def test_config_registry_and_errors():
  cfg = resnet.default_config(depth=18, stem="cifar", width=0.5)
  model = models.build(cfg, 32)
  assert isinstance(model, resnet.ResNet)
  assert (model.depth, model.stem, model.width, model.num_classes) == (18, "cifar", 0.5, 0)
  assert models.execution_keys(cfg) == ("model.dtype",)
  assert models.build(cfg, 32, num_classes=10).num_classes == 10
  cases = [({"depth": 20}, "depth=20: use one of 10, 18, 34, 50, 101, 152"),
           ({"stem": "tiny"}, "stem='tiny': use 'imagenet' or 'cifar'"),
           ({"width": 0}, "width=0"), ({"width": 0.3}, "64 \\* width"),
           ({"bn_groups": 0}, "bn_groups=0: use an integer >= 1"),
           ({"conv_init": "xavier"}, "conv_init='xavier': use 'torchvision'"),
           ({"variant": "base"}, "model.variant: not a ResNet key; use name, depth")]
  for kw, msg in cases:
    bad = ml_collections.ConfigDict({**resnet.DEFAULTS, **kw})
    with pytest.raises(ValueError, match=msg) as e:
      models.check_config(bad)
    assert "\n" not in str(e.value)
    with pytest.raises(ValueError, match=msg):
      resnet.from_config(bad, 32)
  with pytest.raises(ValueError, match="no option 'use_mask_token'"):
    resnet.from_config(cfg, 32, use_mask_token=True)


# ---------------------------------------------------------------------------------------------
# BatchNorm.

def _np_bn_train(x, scale, bias, eps=1e-5):
  x = x.astype(np.float64)
  mean = x.mean((0, 1, 2))
  var = x.var((0, 1, 2))
  return (x - mean) / np.sqrt(var + eps) * scale + bias, mean, x.var((0, 1, 2), ddof=1)


def test_batchnorm_train_update_and_eval_are_torchs():
  rng = np.random.default_rng(0)
  x = rng.normal(2.0, 3.0, (4, 3, 2, 5)).astype(np.float32)
  bn = resnet.BatchNorm()
  v = bn.init(jax.random.PRNGKey(0), x)
  np.testing.assert_array_equal(v["params"]["scale"], np.ones(5))
  np.testing.assert_array_equal(v["batch_stats"]["running_var"], np.ones(5))   # init: no update
  np.testing.assert_array_equal(v["batch_stats"]["running_mean"], np.zeros(5))
  scale, bias = rng.uniform(0.5, 2, 5).astype(np.float32), rng.normal(size=5).astype(np.float32)
  rm, rv = rng.normal(size=5).astype(np.float32), rng.uniform(0.5, 2, 5).astype(np.float32)
  v = {"params": {"scale": scale, "bias": bias},
       "batch_stats": {"running_mean": rm, "running_var": rv}}
  y, state = bn.apply(v, x, train=True, mutable=["batch_stats"])
  want, mean, var_unbiased = _np_bn_train(x, scale, bias)
  np.testing.assert_allclose(y, want, rtol=1e-5, atol=1e-5)
  # torch: running = 0.9 * running + 0.1 * batch, with the unbiased (n = 4*3*2 = 24) variance.
  np.testing.assert_allclose(state["batch_stats"]["running_mean"], 0.9 * rm + 0.1 * mean,
                             rtol=1e-6, atol=1e-6)
  np.testing.assert_allclose(state["batch_stats"]["running_var"], 0.9 * rv + 0.1 * var_unbiased,
                             rtol=1e-6, atol=1e-6)
  assert not np.allclose(var_unbiased, x.var((0, 1, 2)))          # the distinction is real
  # Evaluation mode: the running statistics, nothing updated.
  y_eval = bn.apply(v, x)
  np.testing.assert_allclose(y_eval, (x - rm) / np.sqrt(rv + 1e-5) * scale + bias,
                             rtol=1e-5, atol=1e-5)
  with pytest.raises(Exception):                    # train mode needs a mutable batch_stats
    bn.apply(v, x, train=True)
  # bfloat16 compute: float32 statistics, bfloat16 output.
  y16, s16 = resnet.BatchNorm(dtype=jnp.bfloat16).apply(v, x, train=True, mutable=["batch_stats"])
  assert y16.dtype == jnp.bfloat16 and s16["batch_stats"]["running_var"].dtype == jnp.float32
  np.testing.assert_allclose(s16["batch_stats"]["running_var"], state["batch_stats"]["running_var"],
                             rtol=1e-6)


def test_batchnorm_groups_normalise_each_group_alone():
  rng = np.random.default_rng(1)
  x = np.concatenate([rng.normal(0, 1, (3, 2, 2, 4)), rng.normal(5, 2, (3, 2, 2, 4))]).astype(np.float32)
  bn = resnet.BatchNorm(groups=2)
  v = bn.init(jax.random.PRNGKey(0), x)
  y, state = bn.apply(v, x, train=True, mutable=["batch_stats"])
  halves = [_np_bn_train(x[:3], 1.0, 0.0), _np_bn_train(x[3:], 1.0, 0.0)]
  np.testing.assert_allclose(y, np.concatenate([h[0] for h in halves]), rtol=1e-5, atol=1e-5)
  np.testing.assert_allclose(state["batch_stats"]["running_mean"],
                             0.1 * (halves[0][1] + halves[1][1]) / 2, rtol=1e-5, atol=1e-6)
  np.testing.assert_allclose(state["batch_stats"]["running_var"],
                             0.9 + 0.1 * (halves[0][2] + halves[1][2]) / 2, rtol=1e-5)
  with pytest.raises(ValueError, match="groups=4 does not divide the batch of 6") as e:
    resnet.BatchNorm(groups=4).apply(v, x, train=True, mutable=["batch_stats"])
  assert "\n" not in str(e.value)


def test_batchnorm_statistics_are_global_under_a_sharded_jit():
  from jax.sharding import Mesh, NamedSharding, PartitionSpec as P
  mesh = Mesh(np.array(jax.devices()[:2]), ("data",))
  rng = np.random.default_rng(2)
  x = np.concatenate([rng.normal(0, 1, (4, 2, 2, 3)), rng.normal(3, 1, (4, 2, 2, 3))]).astype(np.float32)
  xs = jax.device_put(x, NamedSharding(mesh, P("data")))
  for groups in (1, 2):
    bn = resnet.BatchNorm(groups=groups)
    v = bn.init(jax.random.PRNGKey(0), x)
    f = jax.jit(lambda v, x: bn.apply(v, x, train=True, mutable=["batch_stats"]))
    y, _ = f(v, xs)
    if groups == 1:
      want = _np_bn_train(x, 1.0, 0.0)[0]                      # the global batch (SyncBN)
    else:
      want = np.concatenate([_np_bn_train(x[:4], 1.0, 0.0)[0], _np_bn_train(x[4:], 1.0, 0.0)[0]])
    np.testing.assert_allclose(y, want, rtol=1e-5, atol=1e-5)


# ---------------------------------------------------------------------------------------------
# Initialisation.

def test_torchvision_initialisation():
  model = resnet.ResNet(depth=18, num_classes=1000, zero_init_residual=True)
  v = jax.jit(model.init)(jax.random.PRNGKey(0), jnp.zeros((1, 32, 32, 3)))
  p = v["params"]
  k = np.asarray(p["layer4"]["block1"]["conv2"]["kernel"])               # 3x3, 512 -> 512
  assert abs(k.std() / math.sqrt(2 / (512 * 9)) - 1) < 0.01 and abs(k.mean()) < 1e-4
  k = np.asarray(p["conv1"]["kernel"])                                   # fan_out 64*49
  assert abs(k.std() / math.sqrt(2 / (64 * 49)) - 1) < 0.05
  assert np.abs(k).max() > 3 * k.std()                                   # not truncated
  bound = 1 / math.sqrt(512)
  for w in (p["fc"]["kernel"], p["fc"]["bias"]):
    w = np.asarray(w)
    assert np.abs(w).max() <= bound and np.abs(w).max() > 0.99 * bound
  assert abs(np.asarray(p["fc"]["kernel"]).std() / (bound / math.sqrt(3)) - 1) < 0.01
  for i in range(1, 5):
    for j in range(2):
      blk = p[f"layer{i}"][f"block{j}"]
      np.testing.assert_array_equal(blk["bn2"]["scale"], 0)              # zero_init_residual
      np.testing.assert_array_equal(blk["bn1"]["scale"], 1)
      np.testing.assert_array_equal(blk["bn1"]["bias"], 0)
  np.testing.assert_array_equal(v["batch_stats"]["layer1"]["block0"]["bn1"]["running_var"], 1)
  p50 = jax.eval_shape(resnet.ResNet(depth=50, zero_init_residual=True).init,
                       jax.random.PRNGKey(0), jnp.zeros((1, 32, 32, 3)))["params"]
  assert set(p50["layer1"]["block0"]) == {"conv1", "bn1", "conv2", "bn2", "conv3", "bn3",
                                          "downsample_conv", "downsample_bn"}
  assert "downsample_conv" not in p50["layer1"]["block1"]


def test_torch_conv_initialisation():
  """conv_init='torch': every convolution U(+-1/sqrt(kh * kw * in)), as nn.Conv2d draws it when
  nothing re-initialises it (lemniscate.pytorch's CIFAR ResNet); the rest as torchvision's."""
  cfg = resnet.default_config(depth=18, stem="cifar", width=0.5, conv_init="torch")
  v = jax.jit(models.build(cfg, 32).init)(jax.random.PRNGKey(0), jnp.zeros((1, 32, 32, 3)))
  p = v["params"]
  for k, fan_in in ((p["conv1"]["kernel"], 3 * 9),
                    (p["layer4"]["block1"]["conv2"]["kernel"], 256 * 9),
                    (p["layer2"]["block0"]["downsample_conv"]["kernel"], 32)):
    k, bound = np.asarray(k), 1 / math.sqrt(fan_in)
    assert np.abs(k).max() <= bound and np.abs(k).max() > 0.95 * bound
    assert abs(k.std() / (bound / math.sqrt(3)) - 1) < 0.06
  np.testing.assert_array_equal(p["layer1"]["block0"]["bn2"]["scale"], 1)
  plain = models.build(resnet.default_config(depth=18, stem="cifar", width=0.5), 32)
  default = jax.eval_shape(plain.init, jax.random.PRNGKey(0), jnp.zeros((1, 32, 32, 3)))
  assert jax.tree.map(lambda a: a.shape, default) == jax.tree.map(lambda a: a.shape, v)


# ---------------------------------------------------------------------------------------------
# The torchvision name map, without torch.

def torchvision_keys(blocks, bottleneck, fc=True):
  """torchvision's ResNet state_dict keys, in its order, written by rule."""
  bn = lambda p: [f"{p}.weight", f"{p}.bias", f"{p}.running_mean", f"{p}.running_var",  # noqa: E731
                  f"{p}.num_batches_tracked"]
  keys = ["conv1.weight"] + bn("bn1")
  for i, n in enumerate(blocks, 1):
    for j in range(n):
      for c in ((1, 2, 3) if bottleneck else (1, 2)):
        keys += [f"layer{i}.{j}.conv{c}.weight"] + bn(f"layer{i}.{j}.bn{c}")
      if j == 0 and (i > 1 or bottleneck):
        keys += [f"layer{i}.0.downsample.0.weight"] + bn(f"layer{i}.0.downsample.1")
  return keys + (["fc.weight", "fc.bias"] if fc else [])


def test_name_map_keys_layouts_and_round_trip():
  model = resnet.ResNet(depth=18, num_classes=10)
  v = random_variables(model)
  sd = convert.variables_to_torchvision(v)
  assert list(sd) == torchvision_keys([2, 2, 2, 2], False) and len(sd) == 122
  assert sd["conv1.weight"].shape == (64, 3, 7, 7) and sd["fc.weight"].shape == (10, 512)
  np.testing.assert_array_equal(sd["layer2.0.conv1.weight"],
                                np.transpose(v["params"]["layer2"]["block0"]["conv1"]["kernel"], (3, 2, 0, 1)))
  np.testing.assert_array_equal(sd["layer3.0.downsample.1.running_var"],
                                v["batch_stats"]["layer3"]["block0"]["downsample_bn"]["running_var"])
  np.testing.assert_array_equal(sd["fc.weight"], v["params"]["fc"]["kernel"].T)
  back, spec = convert.torchvision_to_variables(sd)
  assert spec == convert.ResNetSpec(depth=18, width=1, num_classes=10, stem="imagenet")
  jax.tree.map(np.testing.assert_array_equal, back, jax.tree.map(np.asarray, v))
  m50 = resnet.ResNet(depth=50, width=0.25, stem="cifar")
  v50 = random_variables(m50)
  sd50 = convert.variables_to_torchvision(v50, num_batches_tracked=False)
  assert list(sd50) == [k for k in torchvision_keys([3, 4, 6, 3], True, fc=False)
                        if not k.endswith("num_batches_tracked")]
  back50, spec50 = convert.torchvision_to_variables(sd50)
  assert spec50 == convert.ResNetSpec(depth=50, width=0.25, num_classes=0, stem="cifar")
  assert spec50.build() == m50 and resnet.from_config(spec50.model_config()) == m50
  jax.tree.map(np.testing.assert_array_equal, back50, jax.tree.map(np.asarray, v50))


def test_conversion_errors_are_one_line():
  sd = convert.variables_to_torchvision(random_variables(resnet.ResNet(depth=18, width=0.25)))
  cases = []
  missing = dict(sd)
  del missing["layer2.0.bn1.running_var"]
  cases.append((missing, "lacks layer2.0.bn1.running_var"))
  cases.append(({**sd, "head.weight": np.zeros(3)}, "not torchvision ResNet-18's: head.weight"))
  cases.append(({"module." + k: x for k, x in sd.items()}, "prefix 'module.': strip it"))
  wide = dict(sd)
  wide["layer1.0.conv1.weight"] = np.zeros((32, 16, 3, 3), np.float32)
  cases.append((wide, r"layer1.0.conv1.weight \[32, 16, 3, 3\] \(expected \[16, 16, 3, 3\]\)"))
  short = {k: x for k, x in sd.items() if not k.startswith("layer4.1.")}
  cases.append((short, r"basic blocks per stage \[2, 2, 2, 1\] are no torchvision ResNet's"))
  for bad, msg in cases:
    with pytest.raises(ConversionError, match=msg) as e:
      convert.torchvision_to_variables(bad)
    assert "\n" not in str(e.value)


# ---------------------------------------------------------------------------------------------
# The converted network against a float64 NumPy port of torchvision's forward (no torch).

def _np_conv(x, w, stride):
  p = (w.shape[2] - 1) // 2
  x = np.pad(x, ((0, 0), (0, 0), (p, p), (p, p)))
  k = w.shape[2]
  oh, ow = (x.shape[2] - k) // stride + 1, (x.shape[3] - k) // stride + 1
  cols = np.stack([x[:, :, i:i + stride * oh:stride, j:j + stride * ow:stride]
                   for i in range(k) for j in range(k)], axis=2)
  return np.einsum("nckhw,ock->nohw", cols, w.reshape(w.shape[0], w.shape[1], k * k))


def _np_maxpool(x):
  x = np.pad(x, ((0, 0), (0, 0), (1, 1), (1, 1)), constant_values=-np.inf)
  oh, ow = (x.shape[2] - 3) // 2 + 1, (x.shape[3] - 3) // 2 + 1
  return np.max([x[:, :, i:i + 2 * oh:2, j:j + 2 * ow:2] for i in range(3) for j in range(3)], 0)


def np_torchvision_forward(sd, x, train):
  """torchvision ResNet.forward in NCHW, float64, on a torchvision state dict; returns (logits,
  the running statistics after the forward)."""
  sd = {k: np.asarray(v, np.float64) for k, v in sd.items()}
  stats = {}

  def bn(x, p):
    if train:
      mean, var = x.mean((0, 2, 3)), x.var((0, 2, 3))
      n = x.size // x.shape[1]
      stats[p + ".running_mean"] = 0.9 * sd[p + ".running_mean"] + 0.1 * mean
      stats[p + ".running_var"] = 0.9 * sd[p + ".running_var"] + 0.1 * var * n / (n - 1)
    else:
      mean, var = sd[p + ".running_mean"], sd[p + ".running_var"]
    r = lambda a: a[None, :, None, None]  # noqa: E731
    return (x - r(mean)) / np.sqrt(r(var) + 1e-5) * r(sd[p + ".weight"]) + r(sd[p + ".bias"])

  relu = lambda a: np.maximum(a, 0)  # noqa: E731
  cifar = sd["conv1.weight"].shape[2] == 3
  x = relu(bn(_np_conv(x, sd["conv1.weight"], 1 if cifar else 2), "bn1"))
  if not cifar:
    x = _np_maxpool(x)
  bottleneck = "layer1.0.conv3.weight" in sd
  for i in range(1, 5):
    j = 0
    while f"layer{i}.{j}.conv1.weight" in sd:
      t, s = f"layer{i}.{j}.", 2 if i > 1 and j == 0 else 1
      if bottleneck:
        y = relu(bn(_np_conv(x, sd[t + "conv1.weight"], 1), t + "bn1"))
        y = relu(bn(_np_conv(y, sd[t + "conv2.weight"], s), t + "bn2"))
        y = bn(_np_conv(y, sd[t + "conv3.weight"], 1), t + "bn3")
      else:
        y = relu(bn(_np_conv(x, sd[t + "conv1.weight"], s), t + "bn1"))
        y = bn(_np_conv(y, sd[t + "conv2.weight"], 1), t + "bn2")
      if t + "downsample.0.weight" in sd:
        x = bn(_np_conv(x, sd[t + "downsample.0.weight"], s), t + "downsample.1")
      x = relu(y + x)
      j += 1
  return x.mean((2, 3)) @ sd["fc.weight"].T + sd["fc.bias"], stats


@pytest.mark.parametrize("depth,stem,size", [(18, "imagenet", 64), (50, "imagenet", 64),
                                             (18, "cifar", 16)])
def test_converted_model_equals_numpy_torchvision(depth, stem, size):
  """float64 (x64): logits and updated running statistics equal to 1e-9 in evaluation and
  training mode; float32: evaluation logits to 1e-4.

  Training-mode BatchNorm over few values per channel is ill-conditioned: with 2 images of
  32 px, layer4 of a ResNet-50 normalises 2 values per channel (1x1 maps), and the rounding
  of one float32 forward reaches O(1) in the logits (1e-8 even in float64), so the images
  here leave layer4 2x2 maps (8 values per channel; float64 then agrees to 1e-12)."""
  sd = convert.variables_to_torchvision(
      random_variables(resnet.ResNet(depth=depth, width=0.25, stem=stem, num_classes=5), seed=3))
  v, spec = convert.torchvision_to_variables(sd)
  x = np.random.default_rng(4).normal(size=(2, 3, size, size))
  xj = x.transpose(0, 2, 3, 1)
  model = spec.build()
  want, _ = np_torchvision_forward(sd, x, train=False)
  got = jax.jit(model.apply)(v, jnp.asarray(xj, jnp.float32))
  assert got.dtype == jnp.float32
  np.testing.assert_allclose(got, want, rtol=1e-4, atol=1e-4)
  with jax.enable_x64(True):
    model = spec.build(dtype=jnp.float64, param_dtype=jnp.float64)
    v64 = jax.tree.map(lambda a: jnp.asarray(a, jnp.float64), v)
    f = jax.jit(lambda v, x, train: model.apply(v, x, train=train, mutable=["batch_stats"]),
                static_argnums=2)
    for train in (False, True):
      want, want_stats = np_torchvision_forward(sd, x, train)
      logits, state = f(v64, jnp.asarray(xj), train)
      assert logits.dtype == jnp.float64
      np.testing.assert_allclose(logits, want, rtol=1e-9, atol=1e-9)
      if train:
        new = convert.variables_to_torchvision({"params": v["params"], **state}, dtype=np.float64)
        assert set(want_stats) == {k for k in new if k.endswith(("running_mean", "running_var"))}
        for k, s in want_stats.items():
          np.testing.assert_allclose(new[k], s, rtol=1e-9, atol=1e-9, err_msg=k)
      else:
        jax.tree.map(np.testing.assert_array_equal, state["batch_stats"], v64["batch_stats"])


# ---------------------------------------------------------------------------------------------
# Against torchvision itself (skipped without torch).

def _randomised_torchvision(model, seed):
  import torch
  g = torch.Generator().manual_seed(seed)
  with torch.no_grad():
    for m in model.modules():
      if isinstance(m, torch.nn.BatchNorm2d):
        m.weight.copy_(torch.rand(m.weight.shape, generator=g) + 0.5)
        m.bias.copy_(torch.randn(m.bias.shape, generator=g) * 0.1)
        m.running_mean.copy_(torch.randn(m.running_mean.shape, generator=g) * 0.1)
        m.running_var.copy_(torch.rand(m.running_var.shape, generator=g) + 0.5)
  return model


@pytest.mark.parametrize("arch,stem,size", [("resnet18", "imagenet", 64),
                                            ("resnet50", "imagenet", 64),
                                            ("resnet18", "cifar", 32)])
def test_equals_torchvision(arch, stem, size):
  """float32 logits to 1e-4 in evaluation and training mode, the running statistics after one
  training forward to 1e-5, torchvision's key list, strict loading of the reverse map (64 px
  for the ResNet-50: see test_converted_model_equals_numpy_torchvision on why not 32)."""
  torch = pytest.importorskip("torch")
  torchvision = pytest.importorskip("torchvision")
  torch.manual_seed(0)
  tm = getattr(torchvision.models, arch)(num_classes=10)
  if stem == "cifar":      # solo-learn / SimCLR CIFAR: 3x3/1 conv1, no max-pool
    tm.conv1 = torch.nn.Conv2d(3, 64, 3, 1, 1, bias=False)
    tm.maxpool = torch.nn.Identity()
  tm = _randomised_torchvision(tm, 1)
  sd = {k: t.numpy().copy() for k, t in tm.state_dict().items()}
  v, spec = convert.torchvision_to_variables(sd)
  assert spec == convert.ResNetSpec(int(arch[6:]), 1, 10, stem)
  model = spec.build()
  if stem == "imagenet":
    assert resnet.param_count(model) == sum(p.numel() for p in tm.parameters())
  # The reverse map gives torchvision's keys and loads strictly.
  back = convert.variables_to_torchvision(v)
  assert list(back) == list(sd)
  tm.load_state_dict({k: torch.from_numpy(np.asarray(a)) for k, a in back.items()}, strict=True)
  x = np.random.default_rng(0).normal(size=(2, 3, size, size)).astype(np.float32)
  xj = jnp.asarray(x.transpose(0, 2, 3, 1))
  tm.eval()
  with torch.no_grad():
    want = tm(torch.from_numpy(x)).numpy()
  f = jax.jit(lambda v, x, train: model.apply(v, x, train=train, mutable=["batch_stats"]),
              static_argnums=2)
  got, _ = f(v, xj, False)
  np.testing.assert_allclose(got, want, rtol=1e-4, atol=1e-4)
  # Training-mode BatchNorm on 2 images amplifies float32 rounding through the ResNet-50's 53
  # layers: torch's and JAX's running statistics each differ from a float64 NumPy forward by
  # ~1.5e-4 relative (measured: torch 1.6e-4, JAX 1.3e-4; ResNet-18 < 2e-6; logits 1e-4), so
  # the two float32 runs are compared to 2e-4 there.
  tol = 1e-5 if arch == "resnet18" else 2e-4
  tm.train()
  with torch.no_grad():
    want_train = tm(torch.from_numpy(x)).numpy()
  got_train, state = f(v, xj, True)
  np.testing.assert_allclose(got_train, want_train, rtol=max(tol, 1e-4), atol=max(tol, 1e-4))
  new = convert.variables_to_torchvision({"params": v["params"], **state})
  for k, t in tm.state_dict().items():
    if k.endswith(("running_mean", "running_var")):
      np.testing.assert_allclose(new[k], t.numpy(), rtol=tol, atol=tol, err_msg=k)
