"""A ResNet through the one trainer: a ResNet-18 with BatchNorm trains (configs/finetune.py's
'resnet18' preset), checkpoints, resumes exactly and is evaluated by kNN and the linear probe;
a torchvision state dict becomes a workdir (`--arch=torchvision_resnet`) whose logits are the
model's."""
import json
import os

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from helpers import assert_same_losses, load_config, losses, resumed_losses
from mim_jax import train
from mim_jax.convert import resnet as resnet_conv
from mim_jax.models import resnet


def small_resnet18(**overrides):
  """configs/finetune.py:resnet18 with a quarter of the widths (same 18 layers), few steps."""
  c = load_config("finetune", "resnet18")
  c.model.width = 0.25
  c.input.batch_size = 16
  c.total_steps, c.ckpt_every, c.log_every = 4, 2, 1
  for name in ("knn", "linear", "classifier"):
    c.evals[name].max_eval = 200
  c.evals.knn.max_train = c.evals.linear.max_train = 400
  c.evals.linear.epochs = 2
  c.evals.layer_probe.update(enabled=True, pooling="mean", max_train=400, max_eval=200)
  for k, v in overrides.items():
    c[k] = v
  return c


@pytest.fixture(scope="module")
def trained(tmp_path_factory, compilation_cache):
  d = str(tmp_path_factory.mktemp("rn18"))
  summary = train.train_and_evaluate(small_resnet18(), d, progress=False, devices=jax.devices()[:1])
  return d, summary


def test_resnet18_trains_with_batchnorm_and_is_evaluated_by_knn_and_the_probe(trained):
  d, summary = trained
  la = losses(d)
  assert sorted(la) == [1, 2, 3, 4] and all(np.isfinite(list(la.values())))
  with open(os.path.join(d, "eval_results.json")) as f:
    res = json.load(f)
  for ev in ("knn", "linear", "classifier", "layer_probe"):
    assert ev in res, sorted(res)
  # The layer probe reads every stage (widths 16, 32, 64 at width 0.25) and the pooled output.
  blocks = sorted(k for k in res["layer_probe"] if k.startswith("online/top1_block"))
  assert blocks == [f"online/top1_block{i}" for i in range(4)], blocks
  assert 0.0 <= res["knn"]["online/top1"] <= 100.0 and res["linear"]["online/top1"] >= 0.0
  assert summary["eval"]["knn/online/top1"] == res["knn"]["online/top1"]
  tr = train.Trainer.from_workdir(d, devices=jax.devices()[:1])
  assert tr.method.describe()["model"]["name"] == "resnet"
  ms = jax.device_get(tr.state["method_state"])
  init = train.Trainer.create(small_resnet18(), devices=jax.devices()[:1])
  ms0 = jax.device_get(init.state["method_state"])
  bn0 = ms0["collections"]["batch_stats"]["encoder"]["bn1"]
  bn = ms["collections"]["batch_stats"]["encoder"]["bn1"]
  np.testing.assert_array_equal(bn0["running_mean"], 0.0)
  assert np.abs(bn["running_mean"]).max() > 1e-3            # four training-mode steps moved it
  # The evaluation reads the running statistics: features equal an eval-mode apply with them.
  x = jnp.asarray(np.random.default_rng(0).normal(size=(4, 32, 32, 3)), jnp.float32)
  got = tr.method.features(tr.state["params"], tr.state["method_state"], x)["online"]
  v = {"params": tr.state["params"]["encoder"], "batch_stats": ms["collections"]["batch_stats"]["encoder"]}
  fmap = tr.method.encoder.apply(v, x, train=False, features_only=True)
  np.testing.assert_allclose(got, fmap.mean(axis=(1, 2)), rtol=1e-5, atol=1e-6)


def test_resnet18_resumes_exactly(trained, tmp_path):
  d, _ = trained
  got = resumed_losses(small_resnet18(), str(tmp_path / "b"), stop_after=2, devices=jax.devices()[:1])
  assert_same_losses(losses(d), got, 4)


def test_a_resnet_pretraining_workdir_is_fine_tuned_with_its_statistics(trained, tmp_path):
  """config.finetune.pretrained reads the encoder's parameters and its BatchNorm statistics."""
  d, _ = trained
  c = small_resnet18()
  c.finetune.pretrained = d
  tr = train.Trainer.create(c, devices=jax.devices()[:1])
  done = train.Trainer.from_workdir(d, devices=jax.devices()[:1])
  for a, b in zip(jax.tree.leaves(jax.device_get(tr.state["params"]["encoder"])),
                  jax.tree.leaves(jax.device_get(done.state["params"]["encoder"]))):
    np.testing.assert_array_equal(a, b)
  for a, b in zip(jax.tree.leaves(jax.device_get(tr.state["method_state"]["collections"])),
                  jax.tree.leaves(jax.device_get(done.state["method_state"]["collections"]))):
    np.testing.assert_array_equal(a, b)


def random_torchvision_resnet18(num_classes=10, seed=0, width=0.25):
  """A torchvision-named ResNet-18 state dict (every width scaled, as SimCLR's) with random
  weights and running statistics."""
  model = resnet.ResNet(depth=18, num_classes=num_classes, width=width)
  v = jax.device_get(model.init(jax.random.PRNGKey(seed), jnp.zeros((1, 32, 32, 3)), train=False))
  rng = np.random.default_rng(seed)
  v = {"params": v["params"],
       "batch_stats": jax.tree.map(lambda s: np.abs(s + rng.normal(size=s.shape) * 0.3 + 0.05)
                                   .astype(np.float32), v["batch_stats"])}
  v["params"] = jax.tree.map(lambda p: (p + rng.normal(size=p.shape) * 0.01).astype(np.float32),
                             v["params"])
  return model, v, resnet_conv.variables_to_torchvision(v)


def test_torchvision_state_dict_converts_to_a_workdir_with_the_same_logits(tmp_path):
  import safetensors.numpy
  from mim_jax.convert import __main__ as cli
  model, v, sd = random_torchvision_resnet18()
  path = str(tmp_path / "rn18.safetensors")
  safetensors.numpy.save_file({k: np.ascontiguousarray(a) for k, a in sd.items()}, path)
  out = str(tmp_path / "run")
  assert cli.main(["--from=torch", "--arch=torchvision_resnet", path, out, "--image_size=32"]) == 0
  with open(os.path.join(out, "convert.json")) as f:
    info = json.load(f)
  assert info["spec"]["depth"] == 18 and info["spec"]["num_classes"] == 10
  assert info["spec"]["width"] == 0.25
  assert info["initialised_not_converted"] == []
  tr = train.Trainer.from_workdir(out, devices=jax.devices()[:1])
  x = jnp.asarray(np.random.default_rng(1).normal(size=(3, 32, 32, 3)), jnp.float32)
  got = tr.method.features(tr.state["params"], tr.state["method_state"], x)["logits"]
  want = model.apply(v, x, train=False)
  np.testing.assert_allclose(got, want, rtol=1e-4, atol=1e-4)
  assert cli.main(["--from=torch", "--arch=torchvision_resnet", path, str(tmp_path / "x"),
                   "--variant=base"]) == 1     # a one-line error, nothing written


def test_converted_logits_equal_torchvision(tmp_path):
  torch = pytest.importorskip("torch")
  torchvision = pytest.importorskip("torchvision")
  net = torchvision.models.resnet18(num_classes=10).eval()
  g = torch.Generator().manual_seed(0)
  with torch.no_grad():
    for m in net.modules():
      if isinstance(m, torch.nn.BatchNorm2d):
        m.running_mean.normal_(0, 0.2, generator=g)
        m.running_var.uniform_(0.5, 1.5, generator=g)
        m.weight.uniform_(0.5, 1.5, generator=g)
        m.bias.normal_(0, 0.1, generator=g)
  path = str(tmp_path / "tv.pth")
  torch.save(net.state_dict(), path)
  out = str(tmp_path / "run")
  from mim_jax import convert
  convert.convert_torch_checkpoint(path, out, "torchvision_resnet", image_size=64)
  tr = train.Trainer.from_workdir(out, devices=jax.devices()[:1])
  x = np.random.default_rng(2).normal(size=(2, 64, 64, 3)).astype(np.float32)
  got = tr.method.features(tr.state["params"], tr.state["method_state"], jnp.asarray(x))["logits"]
  with torch.no_grad():
    want = net(torch.from_numpy(x.transpose(0, 3, 1, 2).copy())).numpy()
  np.testing.assert_allclose(np.asarray(got), want, rtol=1e-4, atol=1e-4)


def test_a_resnet_run_as_a_frozen_teacher_has_its_batch_statistics(trained):
  """teachers.encoder_variables gives a frozen ResNet run's encoder with its running
  statistics: its evaluation-mode features are the run's own."""
  from mim_jax import teachers
  d, _ = trained
  run = teachers.load(d)
  v = teachers.encoder_variables(run)
  assert set(v) == {"params", "batch_stats"}
  tr = train.Trainer.from_workdir(d, devices=jax.devices()[:1])
  x = jnp.asarray(np.random.default_rng(3).normal(size=(2, 32, 32, 3)), jnp.float32)
  want = tr.method.features(tr.state["params"], tr.state["method_state"], x)["online"]
  got = run.method.outputs(v, x)["pooled"]
  np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-6)
