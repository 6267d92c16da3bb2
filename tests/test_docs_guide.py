"""docs/adding_a_method.md works as written: its method file, config file and model file run
through the one trainer, registered by the one-line entries the guide shows."""
import re
import sys

import jax
import ml_collections
import numpy as np
import pytest

from helpers import ROOT
from mim_jax import config_lib, methods, models, train

GUIDE = ROOT / "docs" / "adding_a_method.md"


def guide_files() -> dict:
  """{path: code} of the guide's blocks marked <!-- file: path -->."""
  text = GUIDE.read_text()
  found = re.findall(r"<!-- file: (\S+) -->\n```python\n(.*?)```", text, re.S)
  return dict(found)


def registry_lines() -> list:
  return re.findall(r'^    "(\w+)": "([\w.:]+)",$', GUIDE.read_text(), re.M)


@pytest.fixture(scope="module")
def guide(tmp_path_factory):
  d = tmp_path_factory.mktemp("guide")
  (d / "configs").mkdir()
  files = guide_files()
  assert set(files) == {"mim_jax/methods/rotation_example.py", "configs/rotation_example.py",
                        "mim_jax/models/convnet_example.py"}
  for path, code in files.items():
    name = path.rsplit("/", 1)[-1]
    (d / ("configs" if path.startswith("configs") else ".") / name).write_text(code)
  sys.path.insert(0, str(d))
  yield d
  sys.path.remove(str(d))
  for mod in ("rotation_example", "convnet_example"):
    sys.modules.pop(mod, None)


@pytest.fixture
def registered(guide, monkeypatch):
  lines = dict(registry_lines())
  # The guide's one-line entries name the modules and the class its files define.
  assert lines == {"rotation_example": "mim_jax.methods.rotation_example:RotationExample",
                   "convnet_example": "mim_jax.models.convnet_example"}
  monkeypatch.setitem(methods.REGISTRY, "rotation_example", "rotation_example:RotationExample")
  monkeypatch.setitem(models.REGISTRY, "convnet_example", "convnet_example")
  return guide


def load(guide, preset=""):
  c = config_lib.load("rotation_example", preset, str(guide / "configs"))
  c.input.batch_size = 16
  c.evals = {}
  return c


def two_steps(c):
  tr = train.Trainer.create(c, devices=jax.devices()[:1])
  before = jax.device_get(tr.state)
  ms = [tr.step() for _ in range(2)]
  return tr, before, [float(m["loss"]) for m in ms], ms


def test_the_rotation_method_trains_on_a_vit(registered):
  c = load(registered)
  c.model.depth = 1
  tr, _, losses, ms = two_steps(c)
  assert all(np.isfinite(losses)) and abs(losses[0] - np.log(4)) < 0.5
  assert 0.0 <= float(ms[-1]["aux/accuracy"]) <= 1.0
  assert tr.method.describe()["model"]["name"] == "vit"
  assert "collections" not in tr.state["method_state"]


def test_the_same_method_runs_on_a_resnet_with_its_batch_statistics(registered):
  c = load(registered, "resnet")
  c.model.width = 0.25
  tr, before, losses, _ = two_steps(c)
  assert all(np.isfinite(losses))
  bs0 = before["method_state"]["collections"]["batch_stats"]["encoder"]["bn1"]["running_mean"]
  bs = jax.device_get(tr.state["method_state"]["collections"]["batch_stats"]["encoder"]["bn1"]["running_mean"])
  assert np.abs(bs - bs0).max() > 0


def test_a_new_backbone_is_one_model_file(registered):
  c = load(registered)
  c.model = ml_collections.ConfigDict(dict(name="convnet_example", width=8, depth=2, dtype="float32"))
  tr, before, losses, _ = two_steps(c)
  assert all(np.isfinite(losses))
  assert "bn0" in before["method_state"]["collections"]["batch_stats"]["encoder"]
  feats = tr.method.features(tr.state["params"], tr.state["method_state"],
                             np.zeros((2, 32, 32, 3), np.float32))["online"]
  assert feats.shape == (2, 16)
  with pytest.raises(train.TrainingError, match="not a convnet_example key"):
    bad = load(registered)
    bad.model = ml_collections.ConfigDict(dict(name="convnet_example", widht=8))
    train.Trainer.create(bad, devices=jax.devices()[:1])
