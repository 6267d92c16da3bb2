"""SimCLR v2's fine-tuning from the projection head's first layer (finetune.proj_layers): the
kept projector layers start from the pretraining run's weights and BatchNorm statistics, sit
between the pooled features and the classifier, and train."""
import jax
import numpy as np
import pytest

from helpers import load_config
from je_helpers import tiny_je_config
from mim_jax import methods, train


@pytest.fixture(scope="module")
def simclr_run(tmp_path_factory):
  d = str(tmp_path_factory.mktemp("simclr_pre"))
  c = tiny_je_config("simclr", total_steps=2, ckpt_every=2)
  c.input.image_size = 32
  train.train_and_evaluate(c, d, progress=False, devices=jax.devices()[:1])
  return d, c


def finetune_config(pre, proj_layers):
  c = load_config("finetune", "resnet18")
  c.model = pre.model
  c.input.batch_size, c.total_steps, c.ckpt_every, c.log_every = 16, 2, 2, 1
  for name in c.evals:
    c.evals[name].enabled = False
  c.finetune.update(pretrained="", proj_layers=proj_layers)
  return c


def test_fine_tunes_from_the_first_projector_layer(simclr_run):
  d, pre = simclr_run
  c = finetune_config(pre, 1)
  c.finetune.pretrained = d
  tr = train.Trainer.create(c, devices=jax.devices()[:1])
  saved = train.Trainer.from_workdir(d, devices=jax.devices()[:1])
  got, want = tr.state["params"]["projector"], saved.state["params"]["projector"]
  assert sorted(got) == ["bn0", "fc0"]                       # the first layer only
  for k in ("fc0", "bn0"):
    for name, v in got[k].items():
      np.testing.assert_array_equal(np.asarray(v), np.asarray(want[k][name]))
  stats = tr.state["method_state"]["collections"]["batch_stats"]["projector"]["bn0"]
  np.testing.assert_array_equal(
      np.asarray(stats["running_var"]),
      np.asarray(saved.state["method_state"]["collections"]["batch_stats"]["projector"]["bn0"]["running_var"]))
  width = want["fc0"]["kernel"].shape[1]
  assert tr.state["params"]["head"]["fc"]["kernel"].shape[0] == width
  before = np.asarray(got["fc0"]["kernel"])
  for _ in range(2):
    tr.state, m = tr.step_fn(tr.state, tr.next_batch())
  assert np.isfinite(float(m["loss"]))
  assert not np.array_equal(np.asarray(tr.state["params"]["projector"]["fc0"]["kernel"]), before)
  feats = tr.method.features(tr.state["params"], tr.state["method_state"],
                             jax.numpy.zeros((2, 32, 32, 3)))
  assert feats["online"].shape == (2, width) and float(feats["online"].min()) >= 0.0   # ReLU


def test_bad_proj_layers_are_one_line_errors(simclr_run):
  d, pre = simclr_run
  c = finetune_config(pre, 3)
  c.finetune.pretrained = d
  with pytest.raises(ValueError, match="proj_layers=3"):
    methods.get(c)
  c = finetune_config(pre, 1)
  with pytest.raises(ValueError, match="needs a CNN backbone and config.finetune.pretrained"):
    methods.get(c)
