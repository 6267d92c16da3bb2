"""The general core: batch fields, appended state updates, model collections (BatchNorm
statistics), optimizer groups, an adversary's own optimiser, and old checkpoints.

The toy methods here are registered for the test only; each is a few lines on a tiny Dense
model, so the trainer's machinery is what is being tested, not a backbone.
"""
import json
import os

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from helpers import tiny_config
from mim_jax import checkpointing, methods, train
from mim_jax.methods.base import Method

QUEUE = 24        # keys the toy queue holds
DIM = 8


def pooled(images):
  """[B, 3]: each image's mean colour (a per-example function, so micro-batches see the same)."""
  return jnp.mean(images.astype(jnp.float32), axis=(1, 2))


class QueueToy(Method):
  """MoCo's queue and InstDisc's memory bank in miniature: the loss returns each example's key
  under 'state_append'; `update_state` enqueues them first-in first-out and writes them into
  a bank at the examples' dataset indices (batch field 'index')."""
  name = "toy_queue"
  batch_fields = ("index",)

  def init(self, rng, images):
    return {"encoder": nn.Dense(DIM).init(rng, pooled(images))["params"]}

  def init_state(self, params):
    return {"queue": jnp.zeros((QUEUE, DIM), jnp.float32), "ptr": jnp.zeros((), jnp.int32),
            "bank": jnp.zeros((self.bank_size, DIM), jnp.float32)}

  @property
  def bank_size(self):
    from mim_jax.data import pipeline
    return pipeline.num_examples(self.config.input, "pretrain")

  def loss(self, params, state, images, rng, step, index=None):
    keys = nn.Dense(DIM).apply({"params": params["encoder"]}, pooled(images))
    # A contrastive-looking loss against the queue, so the queue matters to the gradient.
    loss = jnp.mean(jnp.square(keys)) + jnp.mean(keys @ state["queue"].T)
    return loss, {"state_append": {"keys": jax.lax.stop_gradient(keys), "index": index}}

  def update_state(self, params, state, step, stats=None, appended=None):
    keys, index = appended["keys"], appended["index"]
    n = keys.shape[0]
    ptr = state["ptr"]
    queue = jax.lax.dynamic_update_slice(state["queue"], keys, (ptr, 0))
    return {**state, "queue": queue, "ptr": (ptr + n) % QUEUE,
            "bank": state["bank"].at[index].set(keys)}


class BatchNormToy(Method):
  """A Dense + BatchNorm (train mode) model whose running statistics live in 'batch_stats'."""
  name = "toy_bn"

  class Net(nn.Module):
    @nn.compact
    def __call__(self, x, train):
      x = nn.Dense(DIM, name="dense")(x)
      return nn.BatchNorm(use_running_average=not train, momentum=0.9, name="bn")(x)

  def init_variables(self, rng, images):
    v = self.Net().init(rng, pooled(images), False)
    return {"params": {"encoder": v["params"]}, "batch_stats": {"encoder": v["batch_stats"]}}

  def loss(self, params, state, images, rng, step):
    out, upd = self.Net().apply(self.variables(params, state), pooled(images), True,
                                mutable=["batch_stats"])
    return jnp.mean(jnp.square(out - 1.0)), {"collections": {"batch_stats": {"encoder": upd["batch_stats"]}}}


class AdversaryToy(Method):
  """A generator ('encoder') and a discriminator ('disc'), the discriminator stepped first
  on its own loss and optimiser, the generator then on a loss that reads the new one."""
  name = "toy_adversary"
  adversary_keys = ("disc",)

  def init(self, rng, images):
    r1, r2 = jax.random.split(rng)
    return {"encoder": {"w": jax.random.normal(r1, (3, 3))},
            "disc": {"v": jax.random.normal(r2, (3,))}}

  def loss(self, params, state, images, rng, step):
    fake = pooled(images) @ params["encoder"]["w"]
    return -jnp.mean(jnp.tanh(fake @ params["disc"]["v"])), {}

  def adversary_loss(self, params, state, images, rng, step):
    real = pooled(images)
    fake = jax.lax.stop_gradient(real @ params["encoder"]["w"])
    v = params["disc"]["v"]
    return jnp.mean(jnp.tanh(fake @ v)) - jnp.mean(jnp.tanh(real @ v)), {"real": jnp.mean(real @ v)}

  def adversary_optim_config(self):
    c = self.config.optim.copy_and_resolve_references()
    c.update(name="sgd", momentum=0.0, base_lr=0.5, lr_batch_divisor=c.lr_batch_divisor,
             weight_decay=0.0, warmup_epochs=0.0, schedule="constant")
    return c


@pytest.fixture
def toys(monkeypatch):
  for cls in (QueueToy, BatchNormToy, AdversaryToy):
    monkeypatch.setitem(methods.REGISTRY, cls.name, f"test_core:{cls.__name__}")


def toy_config(method, **overrides):
  c = tiny_config("mae", **overrides)
  c.method = method
  c.evals.knn.enabled = c.evals.linear.enabled = c.evals.reconstruction.enabled = False
  return c


def run_steps(config, steps, devices=None):
  tr = train.Trainer.create(config, devices=devices)
  batches = []
  for _ in range(steps):
    batch = tr.next_batch()
    batches.append(jax.device_get(batch))
    tr.state, _ = tr.step_fn(tr.state, batch)
  return tr, batches


# -- batch fields and appended records ---------------------------------------------------------

def test_every_batch_carries_the_examples_index_in_its_split(toys):
  from mim_jax.data import sources
  c = toy_config("toy_queue")
  tr = train.Trainer.create(c)
  data = sources.load_in_memory(c.input.data, "pretrain")
  seen = []
  for _ in range(3):
    b = next(tr.loader)
    np.testing.assert_array_equal(b["image"], data.images[b["index"]])
    np.testing.assert_array_equal(b["label"], data.labels[b["index"]])
    seen.append(b["index"])
  seen = np.concatenate(seen)
  assert len(set(seen.tolist())) == len(seen)        # one epoch: no index twice


def test_a_method_that_reads_a_missing_field_is_a_one_line_error():
  class Needs(QueueToy):
    batch_fields = ("depth_map",)
  with pytest.raises(train.TrainingError, match="depth_map.*does not give"):
    train.batch_fields(Needs(toy_config("toy_queue")), {"image": 0, "label": 0, "index": 0})


def test_gradient_accumulation_appends_keys_in_batch_order(toys):
  """A queue and a memory bank filled by a 4-micro-batch step equal the full-batch step's."""
  full, batches = run_steps(toy_config("toy_queue"), 2, jax.devices()[:1])
  accum, _ = run_steps(toy_config("toy_queue", **{"optim.grad_accum": 4}), 2, jax.devices()[:1])
  s_full, s_acc = jax.device_get(full.state), jax.device_get(accum.state)
  b = batches[0]["index"].shape[0]
  assert int(s_full["method_state"]["ptr"]) == int(s_acc["method_state"]["ptr"]) == 2 * b % QUEUE
  np.testing.assert_allclose(s_acc["method_state"]["queue"], s_full["method_state"]["queue"],
                             rtol=1e-6, atol=1e-6)
  np.testing.assert_allclose(s_acc["method_state"]["bank"], s_full["method_state"]["bank"],
                             rtol=1e-6, atol=1e-6)
  written = np.flatnonzero(np.abs(s_full["method_state"]["bank"]).sum(1))
  np.testing.assert_array_equal(np.sort(written),
                                np.sort(np.concatenate([x["index"] for x in batches])))
  for a, f in zip(jax.tree.leaves(s_acc["params"]), jax.tree.leaves(s_full["params"])):
    np.testing.assert_allclose(a, f, rtol=1e-5, atol=1e-6)


def test_appended_keys_are_the_batch_keys_in_order(toys):
  """One step from a known state: the queue's first rows are exactly the keys of the batch,
  computed by hand, in the batch's order (gradient accumulation of 2 micro-batches)."""
  c = toy_config("toy_queue", **{"optim.grad_accum": 2})
  tr = train.Trainer.create(c, devices=jax.devices()[:1])
  p0 = jax.device_get(tr.state["params"])
  batch = tr.next_batch()
  from mim_jax.data import preprocess
  step_rng = jax.random.fold_in(tr.state["rng"], 0)
  aug_rng, _ = jax.random.split(step_rng)
  images = preprocess.preprocess(aug_rng, batch["image"], c.input, tr.on_device_aug)
  want = nn.Dense(DIM).apply({"params": p0["encoder"]}, pooled(images))
  tr.state, _ = tr.step_fn(tr.state, batch)
  ms = jax.device_get(tr.state["method_state"])
  n = want.shape[0]
  np.testing.assert_allclose(ms["queue"][:n], np.asarray(want), rtol=1e-5, atol=1e-6)
  np.testing.assert_allclose(ms["bank"][np.asarray(batch["index"])], np.asarray(want), rtol=1e-5,
                             atol=1e-6)


# -- model collections --------------------------------------------------------------------------

def test_batch_statistics_follow_the_micro_batches_in_order(toys):
  """BatchNorm running statistics after a step of 2 micro-batches equal two sequential
  updates (PyTorch's behaviour under gradient accumulation), and the full-batch step's one."""
  for accum in (1, 2):
    c = toy_config("toy_bn", **{"optim.grad_accum": accum})
    tr = train.Trainer.create(c, devices=jax.devices()[:1])
    s0 = jax.device_get(tr.state)
    batch = tr.next_batch()
    from mim_jax.data import preprocess
    aug_rng, _ = jax.random.split(jax.random.fold_in(tr.state["rng"], 0))
    x = pooled(preprocess.preprocess(aug_rng, batch["image"], c.input, tr.on_device_aug))
    h = nn.Dense(DIM).apply({"params": s0["params"]["encoder"]["dense"]}, x)
    mean = s0["method_state"]["collections"]["batch_stats"]["encoder"]["bn"]["mean"]
    for part in np.split(np.asarray(h), accum):
      mean = 0.9 * mean + 0.1 * part.mean(0)
    tr.state, _ = tr.step_fn(tr.state, batch)
    got = jax.device_get(tr.state["method_state"]["collections"]["batch_stats"]["encoder"]["bn"]["mean"])
    np.testing.assert_allclose(got, mean, rtol=1e-5, atol=1e-6)
    assert np.abs(got).max() > 1e-3     # it moved


def test_batch_statistics_resume_exactly_and_reach_the_evaluation(toys, tmp_path, monkeypatch):
  from helpers import resumed_losses, losses
  c = toy_config("toy_bn")
  c.total_steps, c.ckpt_every = 4, 2
  a, b = str(tmp_path / "a"), str(tmp_path / "b")
  train.train_and_evaluate(c, a, progress=False)
  got = resumed_losses(c, b, stop_after=2)
  assert got == losses(a)
  sa = train.Trainer.from_workdir(a).state
  sb = train.Trainer.from_workdir(b).state
  for x, y in zip(jax.tree.leaves(jax.device_get(sa)), jax.tree.leaves(jax.device_get(sb))):
    np.testing.assert_array_equal(x, y)
  tr = train.Trainer.from_workdir(a)
  v = tr.method.encoder_variables(tr.state["params"], tr.state["method_state"])["online"]
  assert set(v) == {"params", "batch_stats"}
  np.testing.assert_array_equal(v["batch_stats"]["bn"]["mean"],
                                sa["method_state"]["collections"]["batch_stats"]["encoder"]["bn"]["mean"])


# -- optimizer groups ---------------------------------------------------------------------------

def test_a_frozen_group_is_untouched_by_weight_decay_and_keeps_no_state():
  c = tiny_config("mae", **{"optim.weight_decay": 0.5, "optim.param_groups": (("decoder/pred", "frozen"),)})
  tr, _ = run_steps(c, 3, jax.devices()[:1])
  init = train.Trainer.create(c, devices=jax.devices()[:1]).state["params"]
  p, p0 = jax.device_get(tr.state["params"]), jax.device_get(init)
  np.testing.assert_array_equal(p["decoder"]["pred"]["kernel"], p0["decoder"]["pred"]["kernel"])
  np.testing.assert_array_equal(p["decoder"]["pred"]["bias"], p0["decoder"]["pred"]["bias"])
  assert not np.array_equal(p["decoder"]["embed"]["kernel"], p0["decoder"]["embed"]["kernel"])
  # Without the group the same kernel moves (decay alone would shrink it).
  c2 = tiny_config("mae", **{"optim.weight_decay": 0.5})
  tr2, _ = run_steps(c2, 3, jax.devices()[:1])
  assert not np.array_equal(jax.device_get(tr2.state["params"])["decoder"]["pred"]["kernel"],
                            p0["decoder"]["pred"]["kernel"])


def test_a_group_frozen_until_a_step_starts_adam_afresh_at_the_global_lr():
  """iBOT / DINO's frozen last layer: untouched before step 2; at step 2 (0-based) its first
  Adam update is lr * sign(g) (bias correction counted from the unfreezing, as PyTorch's state
  starts at the first gradient), not the 0.62 x that a global step count of 3 would give."""
  c = tiny_config("mae", **{"optim.weight_decay": 0.0, "optim.warmup_epochs": 0.0,
                            "optim.param_groups": (("decoder/pred", {"frozen_until_step": 2}),)})
  tr = train.Trainer.create(c, devices=jax.devices()[:1])
  k0 = np.asarray(jax.device_get(tr.state["params"])["decoder"]["pred"]["kernel"])
  lrs = []
  for i in range(3):
    if i == 2:
      before = np.asarray(jax.device_get(tr.state["params"])["decoder"]["pred"]["kernel"])
      np.testing.assert_array_equal(before, k0)
    lrs.append(float(tr.step()["lr"]))
  after = np.asarray(jax.device_get(tr.state["params"])["decoder"]["pred"]["kernel"])
  delta = np.abs(after - k0)
  big = delta > 0.5 * lrs[2]            # elements whose gradient is not ~eps
  assert big.mean() > 0.9
  np.testing.assert_allclose(delta[big], lrs[2], rtol=2e-3)


def test_group_lr_scale_and_weight_decay():
  """A group with lr_scale 0 and no decay stays put; one with decay 0.5 and lr_scale 1 moves as
  the default group does."""
  c = tiny_config("mae", **{"optim.weight_decay": 0.5, "optim.param_groups": (
      ("decoder/pred", {"lr_scale": 0.0}), ("decoder/embed", {"weight_decay": 0.5}))})
  tr, _ = run_steps(c, 2, jax.devices()[:1])
  ref, _ = run_steps(tiny_config("mae", **{"optim.weight_decay": 0.5}), 2, jax.devices()[:1])
  init = jax.device_get(train.Trainer.create(c, devices=jax.devices()[:1]).state["params"])
  p, r = jax.device_get(tr.state["params"]), jax.device_get(ref.state["params"])
  np.testing.assert_array_equal(p["decoder"]["pred"]["kernel"], init["decoder"]["pred"]["kernel"])
  np.testing.assert_allclose(p["decoder"]["embed"]["kernel"], r["decoder"]["embed"]["kernel"],
                             rtol=1e-5, atol=1e-7)


def test_bad_groups_are_one_line_errors(tmp_path):
  for groups, match in (((("x", {"lr": 1.0}),), "unknown keys"), ((("(", "frozen"),), "bad regex"),
                        (("x",), "regex, spec")):
    c = tiny_config("mae", **{"optim.param_groups": groups})
    with pytest.raises(train.TrainingError, match=match):
      train.Trainer.create(c)


# -- an adversary -------------------------------------------------------------------------------

def test_the_adversary_steps_first_and_the_main_loss_sees_it(toys):
  c = toy_config("toy_adversary", **{"optim.name": "sgd", "optim.momentum": 0.0,
                                     "optim.weight_decay": 0.0, "optim.warmup_epochs": 0.0,
                                     "optim.schedule": "constant"})
  tr = train.Trainer.create(c, devices=jax.devices()[:1])
  m = tr.method
  p0 = jax.device_get(tr.state["params"])
  batch = tr.next_batch()
  from mim_jax.data import preprocess
  step_rng = jax.random.fold_in(tr.state["rng"], 0)
  aug_rng, _ = jax.random.split(step_rng)
  x = preprocess.preprocess(aug_rng, batch["image"], c.input, tr.on_device_aug)
  adv_lr = 0.5 * c.input.batch_size / c.optim.lr_batch_divisor
  g_disc = jax.grad(lambda d: m.adversary_loss({**p0, "disc": d}, {}, x, None, 0)[0])(p0["disc"])
  disc1 = jax.tree.map(lambda a, g: a - adv_lr * g, p0["disc"], g_disc)
  lr = float(c.optim.base_lr) * c.input.batch_size / c.optim.lr_batch_divisor
  g_enc = jax.grad(lambda e: m.loss({"encoder": e, "disc": disc1}, {}, x, None, 0)[0])(p0["encoder"])
  enc1 = jax.tree.map(lambda a, g: a - lr * g, p0["encoder"], g_enc)
  tr.state, metrics = tr.step_fn(tr.state, batch)
  p1 = jax.device_get(tr.state["params"])
  np.testing.assert_allclose(p1["disc"]["v"], disc1["v"], rtol=1e-5, atol=1e-7)
  np.testing.assert_allclose(p1["encoder"]["w"], enc1["w"], rtol=1e-5, atol=1e-7)
  assert "adversary/loss" in metrics and "adversary/real" in metrics
  assert not np.allclose(p1["disc"]["v"], p0["disc"]["v"])


# -- checkpoints from before the general core ---------------------------------------------------

def test_a_checkpoint_without_model_name_restores(tmp_path):
  """Workdirs written before config.model.name existed hold a ViT and restore as one; another
  model name is refused in one line."""
  c = tiny_config("mae", total_steps=2, ckpt_every=2)
  c.evals.knn.enabled = c.evals.linear.enabled = c.evals.reconstruction.enabled = False
  w = str(tmp_path / "run")
  train.train_and_evaluate(c, w, progress=False)
  meta_dir = os.path.join(w, "checkpoints", "2", "meta")
  meta_file = [os.path.join(meta_dir, f) for f in os.listdir(meta_dir) if f != "commit_success.txt"][0]
  with open(meta_file) as f:
    meta = json.load(f)
  del meta["model"]["model"]["name"]
  with open(meta_file, "w") as f:
    json.dump(meta, f)
  tr = train.Trainer.from_workdir(w)
  assert int(tr.state["step"]) == 2
  ckpt = checkpointing.Checkpointer(w, keep=3)
  other = dict(tr.method.describe())
  other["model"] = {**other["model"], "name": "resnet"}
  with pytest.raises(checkpointing.CheckpointMismatchError, match="model.name"):
    ckpt.check_meta(2, {"model": other})
  ckpt.close()


def test_optax_multi_transform_is_not_used_without_groups():
  """No groups: the optimiser is the plain one (the default runs' numbers do not move)."""
  from mim_jax import optim
  c = tiny_config("mae")
  tx = optim.make_optimizer(c.optim, optax.constant_schedule(1e-3), {"a": True}, 10)
  assert not isinstance(tx.init({"a": jnp.ones(2)}), optax.MultiTransformState)
