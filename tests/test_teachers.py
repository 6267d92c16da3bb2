"""Frozen runs after the start: a run records the config of each tokenizer or teacher it reads
(and their own records), and a restore rebuilds them from those records with the weights'
shapes only, so the other workdirs may be deleted. (The runs that resume without their teacher
or tokenizer are in test_feature_mim.py and test_beit.py.)"""
import json
import os
import shutil

import jax
import pytest

from helpers import tiny_config
from mim_jax import methods, teachers


def write_config(workdir, config):
  os.makedirs(workdir, exist_ok=True)
  with open(os.path.join(workdir, "config.json"), "w") as f:
    f.write(config.to_json_best_effort(indent=2))


def shapes(tree):
  return jax.tree.map(lambda x: (tuple(x.shape), str(x.dtype)), tree)


@pytest.fixture
def chain(tmp_path):
  """Config-only workdirs: an MAE teacher T, a VQ-KD tokenizer W distilling T (which recorded
  T when it started) and a BEiT v2 run R that started on W."""
  t, w, r = (str(tmp_path / n) for n in ("mae", "vqkd", "beitv2"))
  mae = tiny_config("mae")
  write_config(t, mae)
  vqkd = tiny_config("vqkd")
  vqkd.tokenizer.update(teacher=t, codebook_size=32, decoder=dict(variant="mu", depth=1))
  write_config(w, vqkd)
  with teachers.frozen_runs(w, restoring=False):
    teachers.run_config(t, "tokenizer.teacher")
  with teachers.frozen_runs(r, restoring=False):
    teachers.run_config(w, "beit.tokenizer")
  return t, w, r, mae, vqkd


def test_a_fresh_start_records_the_config_and_the_frozen_runs_own_records(chain):
  t, w, r, mae, vqkd = chain
  rec = os.path.join(r, "frozen", "beit.tokenizer")
  with open(os.path.join(rec, "config.json")) as f:
    assert json.load(f) == json.loads(vqkd.to_json_best_effort())
  with open(os.path.join(rec, "source.json")) as f:
    assert json.load(f) == {"workdir": os.path.abspath(w), "key": "beit.tokenizer"}
  with open(os.path.join(rec, "frozen", "tokenizer.teacher", "config.json")) as f:
    assert json.load(f) == json.loads(mae.to_json_best_effort())


def test_a_restore_needs_neither_workdir_and_gets_the_weights_shapes(chain):
  t, w, r, mae, vqkd = chain
  # The shapes the tokenizer's own trainer builds, its teacher's encoder included.
  x = jax.ShapeDtypeStruct((2, 32, 32, 3), "float32")
  tok = methods.get(vqkd)
  want_params = shapes(jax.eval_shape(tok.init, jax.random.PRNGKey(0), x))
  want_teacher = shapes(jax.eval_shape(methods.get(mae).init, jax.random.PRNGKey(0), x)["encoder"])
  shutil.rmtree(t)
  shutil.rmtree(w)
  with teachers.frozen_runs(r, restoring=True, record=False):
    run = teachers.load(w, key="beit.tokenizer")
  assert json.loads(run.config.to_json()) == json.loads(vqkd.to_json()) and run.step == -1
  assert teachers.is_abstract(run.params) and teachers.is_abstract(run.method_state)
  assert shapes(run.params) == want_params
  assert shapes(run.method_state["teacher"]) == want_teacher   # from the nested record
  assert run.method.teacher_method().encoder.width == methods.get(mae).encoder.width


def test_without_a_record_a_fresh_start_still_needs_the_frozen_run(chain, tmp_path):
  t, w, r, mae, vqkd = chain
  shutil.rmtree(w)
  for restoring in (False, True):    # a restore with no record falls back to the workdir
    with teachers.frozen_runs(str(tmp_path / "new"), restoring=restoring):
      with pytest.raises(teachers.TeacherError, match="does not exist: train that run first"):
        teachers.run_config(w, "beit.tokenizer")


def test_a_restore_pointed_at_another_frozen_run_keeps_the_recorded_one_and_says_so(chain, tmp_path,
                                                                                 caplog):
  t, w, r, mae, vqkd = chain
  other = str(tmp_path / "other_vqkd")
  with teachers.frozen_runs(r, restoring=True, record=False):
    config = teachers.run_config(other, "beit.tokenizer")
  assert json.loads(config.to_json()) == json.loads(vqkd.to_json())
  assert any("config.beit.tokenizer=" + other in m and os.path.abspath(w) in m
             for m in caplog.messages), caplog.messages
  caplog.clear()
  with teachers.frozen_runs(r, restoring=True, record=False):
    teachers.run_config(w, "beit.tokenizer")
  assert not caplog.messages
