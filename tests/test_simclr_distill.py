"""SimCLR v2's distillation stage (finetune.distill): a fine-tuned teacher's logits as soft
targets at a temperature, against a hand computation; the labelled images' cross-entropy when
alpha < 1; the teacher frozen in the state and restored on resume; one-line errors."""
import os

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from helpers import assert_same_losses, load_config, losses, resumed_losses
from je_helpers import tiny_je_config
from mim_jax import methods, train
from mim_jax.data import sources
from mim_jax.errors import TrainingError

ONE = dict(devices=jax.devices()[:1])


@pytest.fixture(scope="module")
def teacher_run(tmp_path_factory):
  """A 2-step SimCLR run, and a 2-step fine-tune of it from the head's first layer on a
  20% labelled subset: the teacher."""
  pre = str(tmp_path_factory.mktemp("simclr_pre"))
  c = tiny_je_config("simclr", total_steps=2, ckpt_every=2)
  c.input.image_size = 32
  train.train_and_evaluate(c, pre, progress=False, **ONE)
  t = student_config(c.model)
  t.finetune.update(pretrained=pre, proj_layers=1)
  t.input.data.train_subset = 0.2
  teacher = str(tmp_path_factory.mktemp("teacher"))
  train.train_and_evaluate(t, teacher, progress=False, **ONE)
  return teacher, c.model


def student_config(model, **distill):
  c = load_config("finetune", "resnet18")
  c.model = model
  c.input.batch_size, c.total_steps, c.ckpt_every, c.log_every = 16, 4, 2, 1
  for name in c.evals:
    c.evals[name].enabled = False
  c.finetune.distill.update(distill)
  return c


def hand_loss(tr, teacher, batch, tau, alpha, labeled, scale=True):
  m, st = tr.method, tr.state
  x = jnp.asarray(batch["image"])
  images = m.preprocess(jax.random.PRNGKey(0), x, m.config.input, True)
  t_logits = np.asarray(teacher.method.features(teacher.state["params"],
                                                teacher.state["method_state"], images)["logits"], np.float64)
  _, s_logits, _ = m.cnn_classify(st["params"], st["method_state"], images, train=True)
  s = np.asarray(s_logits, np.float64)

  def log_softmax(z):
    z = z - z.max(-1, keepdims=True)
    return z - np.log(np.exp(z).sum(-1, keepdims=True))

  p_t = np.exp(log_softmax(t_logits / tau))
  kd = np.mean(-(p_t * log_softmax(s / tau)).sum(-1)) * (tau ** 2 if scale else 1.0)
  y = np.asarray(batch["label"])
  ce = -log_softmax(s)[np.arange(len(y)), y]
  sup = np.sum(ce * labeled[np.asarray(batch["index"])]) / len(y)
  return alpha * kd + (1 - alpha) * sup, images


@pytest.mark.parametrize("alpha", [1.0, 0.25])
def test_distillation_loss_equals_a_hand_computation(teacher_run, alpha):
  teacher_dir, model = teacher_run
  c = student_config(model, teacher=teacher_dir, temperature=0.5, alpha=alpha,
                     labeled_subset=0.2 if alpha < 1 else 0.0)
  tr = train.Trainer.create(c, **ONE)
  teacher = train.Trainer.from_workdir(teacher_dir, **ONE)
  # the frozen teacher in the state is the teacher run's checkpoint
  for a, b in zip(jax.tree.leaves(tr.state["method_state"]["distill_teacher"]["params"]),
                  jax.tree.leaves(teacher.state["params"])):
    np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
  m = tr.method
  assert m.batch_fields == ("label", "index")
  n = 4000                                       # the embedded set's training split
  labeled = np.zeros(n, bool)
  labeled[sources.subset_positions(n, 0.2, 0)] = True
  if alpha < 1:
    np.testing.assert_array_equal(m.labeled_mask(), labeled)
    assert labeled.sum() == 800
  batch = tr.next_batch()
  want, images = hand_loss(tr, teacher, batch, 0.5, alpha, labeled)
  got, aux = m.loss(tr.state["params"], tr.state["method_state"], images, jax.random.PRNGKey(1),
                    jnp.int32(0), label=jnp.asarray(batch["label"]), index=jnp.asarray(batch["index"]))
  np.testing.assert_allclose(float(got), want, rtol=2e-5)
  assert 0.0 <= float(aux["agree_with_teacher"]) <= 1.0
  if alpha < 1:   # the subset is what the teacher saw: a fifth of the batch on average
    frac = float(aux["labeled_fraction"])
    assert frac == np.mean(labeled[np.asarray(batch["index"])])


def test_distillation_trains_resumes_exactly_and_keeps_the_teacher_frozen(teacher_run, tmp_path):
  teacher_dir, model = teacher_run
  c = student_config(model, teacher=teacher_dir, temperature=1.0)
  full = str(tmp_path / "full")
  train.train_and_evaluate(c, full, progress=False, **ONE)
  expected = losses(full)
  got = resumed_losses(c, str(tmp_path / "resumed"), stop_after=2, **ONE)
  assert_same_losses(expected, got, 4)
  done = train.Trainer.from_workdir(full, **ONE)
  teacher = train.Trainer.from_workdir(teacher_dir, **ONE)
  for a, b in zip(jax.tree.leaves(done.state["method_state"]["distill_teacher"]),
                  jax.tree.leaves({"params": teacher.state["params"],
                                   "state": {"collections": teacher.state["method_state"]["collections"]}})):
    np.testing.assert_array_equal(np.asarray(a), np.asarray(b))


def test_distillation_errors_are_one_line(teacher_run, tmp_path):
  teacher_dir, model = teacher_run
  pre = load_config("simclr")
  with pytest.raises(ValueError, match="labeled_subset"):
    methods.get(student_config(model, teacher=teacher_dir, alpha=0.5))
  with pytest.raises(ValueError, match="temperature"):
    methods.get(student_config(model, teacher=teacher_dir, temperature=0.0))
  with pytest.raises(TrainingError, match="not a mim_jax workdir"):
    methods.get(student_config(model, teacher=str(tmp_path))).distill_run
  wrong = str(tmp_path / "wrong")
  os.makedirs(wrong)
  with open(os.path.join(wrong, "config.json"), "w") as f:
    f.write(pre.to_json())
  with pytest.raises(TrainingError, match="must be a fine-tuned classifier"):
    methods.get(student_config(model, teacher=wrong)).distill_run
