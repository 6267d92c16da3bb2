"""The trainer end to end on the embedded data: learning, resume, sharding, checkpoints, errors."""
import json
import os

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from helpers import tiny_config, resumed_losses, assert_same_losses, losses
from mim_jax import checkpointing, methods, train
from mim_jax.models import vit

# Runs of one config (a resume test's three, the tests below sharing tiny_config('mae')) then
# compile each program once.
pytestmark = pytest.mark.usefixtures("compilation_cache")


def read_metrics(workdir):
  with open(os.path.join(workdir, "metrics.jsonl")) as f:
    return [json.loads(l) for l in f]


def test_loss_falls_on_embedded_data(tmp_path):
  # 40 steps of 64 images, a fifth of an epoch of warm-up: step 40's loss is 0.68 x step 10's.
  c = tiny_config("mae", total_steps=40, log_every=10, ckpt_every=1000)
  c.input.batch_size = 64
  c.optim.warmup_epochs = 0.2
  c.evals = {}
  train.train_and_evaluate(c, str(tmp_path), progress=False)
  ls = losses(str(tmp_path))
  first, last = ls[10], ls[40]
  assert last < 0.85 * first, ls


def test_resumed_run_equals_uninterrupted(tmp_path):
  """A run preempted mid-epoch between checkpoints (step 3 of 6, saved every 2) resumes to the
  uninterrupted losses: the trainer's path, method-agnostic (every method's own resume is
  tests/test_contract.py's)."""
  c = tiny_config("mae", total_steps=6, ckpt_every=2)
  c.evals = {}
  a, b = str(tmp_path / "a"), str(tmp_path / "b")
  train.train_and_evaluate(c, a, progress=False)
  assert_same_losses(losses(a), resumed_losses(c, b, stop_after=3), 6)


def run_steps(c, devices, n=2):
  tr = train.Trainer.create(c, devices=devices)
  out = [float(tr.step()["loss"]) for _ in range(n)]
  return out, jax.device_get(tr.state["params"])


@pytest.mark.parametrize("mesh,rules", [
    ((("data", -1), ("fsdp", 1)), ((".*", "replicate"),)),
    ((("data", 2), ("fsdp", 4)), ((".*", "fsdp"),)),
])
def test_sharded_step_equals_one_device_step(mesh, rules):
  c = tiny_config("mae")
  ref_l, ref_p = run_steps(c, jax.devices()[:1])
  c.mesh, c.sharding_rules = mesh, rules
  l8, p8 = run_steps(c, jax.devices()[:8])
  np.testing.assert_allclose(l8, ref_l, rtol=2e-5)
  jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-6), p8, ref_p)


def test_fsdp_really_shards_parameters():
  c = tiny_config("mae", mesh=(("data", 2), ("fsdp", 4)), sharding_rules=((".*", "fsdp"),))
  tr = train.Trainer.create(c, devices=jax.devices()[:8])
  k = tr.state["params"]["encoder"]["encoder"]["block00"]["mlp"]["fc1"]["kernel"]
  assert k.sharding.spec == jax.sharding.PartitionSpec(None, "fsdp")
  assert k.addressable_shards[0].data.shape == (64, 256 // 4)


def test_checkpoint_from_8_devices_restores_on_1(tmp_path):
  c = tiny_config("mae", total_steps=2, ckpt_every=2, mesh=(("data", 2), ("fsdp", 4)),
                  sharding_rules=((".*", "fsdp"),))
  c.evals = {}
  train.train_and_evaluate(c, str(tmp_path), devices=jax.devices()[:8], progress=False)
  ck = checkpointing.Checkpointer(str(tmp_path), keep=2)
  tr8 = train.Trainer.create(c, devices=jax.devices()[:8])
  tr8.restore(ck, 2, with_data=False)
  saved = jax.device_get(tr8.state)
  c1 = tiny_config("mae", total_steps=2)
  tr1 = train.Trainer.create(c1, devices=jax.devices()[:1])
  tr1.restore(ck, 2, with_data=False)
  ck.close()
  got = tr1.state
  leaf = got["params"]["encoder"]["encoder"]["block00"]["mlp"]["fc1"]["kernel"]
  assert len(leaf.sharding.device_set) == 1
  jax.tree.map(np.testing.assert_array_equal, jax.device_get(got), saved)
  assert int(got["step"]) == 2


def test_foreign_checkpoint_is_a_clear_error(tmp_path):
  c = tiny_config("mae", total_steps=2, ckpt_every=2)
  c.evals = {}
  train.train_and_evaluate(c, str(tmp_path), progress=False)
  other = tiny_config("mae", total_steps=4)
  other.model.depth = 3
  other.evals = {}
  with pytest.raises(checkpointing.CheckpointMismatchError, match="different model.*depth"):
    train.train_and_evaluate(other, str(tmp_path), progress=False)


def test_checkpoint_resumes_across_execution_settings(tmp_path):
  # Attention implementation, its padding, the qkv products, the LayerNorm's backward, remat,
  # compute and residual dtypes change how the model is computed, not its parameters: a run resumes (and evaluates) across them,
  # including from a checkpoint written before such a key existed.
  c = tiny_config("mae", total_steps=2, ckpt_every=2)
  c.evals = {}
  del c.model["attn_pad"]
  del c.model["qkv_proj"]
  del c.model["residual_dtype"]
  del c.model["layer_norm"]
  del c.model["remat_policy"]
  train.train_and_evaluate(c, str(tmp_path), progress=False)
  other = tiny_config("mae", total_steps=4, ckpt_every=2)
  other.evals = {}
  other.model.update(attn_impl="xla", attn_pad=2, remat=True, qkv_proj="split",
                     residual_dtype="bfloat16", layer_norm="recompute", remat_policy="dots_no_batch")
  summary = train.train_and_evaluate(other, str(tmp_path), progress=False)
  assert summary["step"] == 4


def test_nan_loss_stops_and_keeps_last_good_checkpoint(tmp_path, monkeypatch):
  c = tiny_config("mae", total_steps=8, ckpt_every=2, log_every=4)
  c.evals = {}
  cls = type(methods.get(c))
  orig = cls.loss

  def poisoned(self, params, state, images, rng, step):
    loss, aux = orig(self, params, state, images, rng, step)
    return jnp.where(step >= 3, jnp.nan, loss), aux

  monkeypatch.setattr(cls, "loss", poisoned)
  with pytest.raises(train.TrainingError, match="loss is nan at step 4.*last good checkpoint: step 2"):
    train.train_and_evaluate(c, str(tmp_path), progress=False)
  assert sorted(os.listdir(tmp_path / "checkpoints")) == ["2"]


def test_ema_state_follows_the_online_encoder():
  c = tiny_config("mae")
  c.ema.enabled, c.ema.decay = True, 0.9
  m = methods.get(c)
  p = m.init(jax.random.PRNGKey(0), jnp.zeros((2, 32, 32, 3)))
  s = m.init_state(p)
  moved = jax.tree.map(lambda x: x + 1.0, p)
  s2 = m.update_state(moved, s, jnp.asarray(0))
  jax.tree.map(lambda e, x: np.testing.assert_allclose(e, x + 0.1, rtol=1e-6, atol=1e-6),
               s2["ema_encoder"], p["encoder"])
  feats = m.features(moved, s2, jnp.zeros((2, 32, 32, 3)))
  assert set(feats) == {"online", "ema"}


def test_train_writes_metrics_checkpoint_picture_and_eval_results(tmp_path):
  c = tiny_config("simmim", total_steps=4, ckpt_every=4, log_every=2)
  c.ema.enabled = True
  summary = train.train_and_evaluate(c, str(tmp_path), progress=False)
  recs = [r for r in read_metrics(str(tmp_path)) if "loss" in r]
  assert [r["step"] for r in recs] == [2, 4]
  assert all(k in recs[0] for k in ("lr", "images_per_sec", "grad_norm"))
  assert os.listdir(tmp_path / "checkpoints") == ["4"]
  assert (tmp_path / "reconstruction.png").is_file()
  res = json.loads((tmp_path / "eval_results.json").read_text())
  assert res["knn"]["protocol"]["k"] == 20 and res["knn"]["protocol"]["temperature"] == 0.07
  assert {"online/top1", "ema/top1"} <= set(res["knn"])
  assert "optimizer" in json.dumps(res["linear"]["protocol"])
  assert summary["eval"]["knn/online/top1"] == res["knn"]["online/top1"]
  # --mode=eval on the same workdir reproduces the numbers from the checkpoint
  again = train.evaluate_only(c, str(tmp_path))
  assert again["eval"]["knn/online/top1"] == res["knn"]["online/top1"]


def test_gradient_accumulation_equals_the_full_batch_step(monkeypatch):
  """With a deterministic loss, k micro-batches give the full batch's loss and update."""
  c = tiny_config("mae")
  cls = type(methods.get(c))

  def det_loss(self, params, state, images, rng, step):
    tokens = self.encoder.apply({"params": params["encoder"]}, images)
    return jnp.mean(tokens ** 2) + 0.0 * sum(jnp.sum(x) for x in jax.tree.leaves(params["decoder"])), {}

  monkeypatch.setattr(cls, "loss", det_loss)
  c.model.drop_path = 0.0
  l1, p1 = run_steps(c, jax.devices()[:1], n=2)
  c.optim.grad_accum = 4
  l4, p4 = run_steps(c, jax.devices()[:1], n=2)
  np.testing.assert_allclose(l4, l1, rtol=1e-5)
  jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-6), p4, p1)


def test_views_state_stats_and_external_state_hooks(monkeypatch):
  """A method's own views (a dict), batch statistics for its state update (mean over
  micro-batches under accumulation, kept out of the metrics) and frozen external arrays
  (placed after init, carried unchanged)."""
  c = tiny_config("mae")
  cls = type(methods.get(c))
  frozen = {"w": np.arange(6, dtype=np.float32).reshape(2, 3)}

  def preprocess(self, rng, images, input_cfg, on_device_aug):
    x = images.astype(jnp.float32) / 255.0
    return {"a": x, "b": 1.0 - x}

  def det_loss(self, params, state, images, rng, step):
    tokens = self.encoder.apply({"params": params["encoder"]}, images["a"] - images["b"])
    z = 0.0 * sum(jnp.sum(x) for x in jax.tree.leaves(params["decoder"]))
    return jnp.mean(tokens ** 2) + z, {"state_stats": {"mean": jnp.mean(images["a"])},
                                       "seen": jnp.sum(state["frozen"]["w"])}

  def update_state(self, params, state, step, stats=None):
    return {**state, "last_mean": stats["mean"]}

  monkeypatch.setattr(cls, "preprocess", preprocess)
  monkeypatch.setattr(cls, "loss", det_loss)
  monkeypatch.setattr(cls, "update_state", update_state)
  monkeypatch.setattr(cls, "init_state", lambda self, params: {"last_mean": jnp.zeros(())})
  monkeypatch.setattr(cls, "external_state", lambda self: {"frozen": frozen})
  out = {}
  for accum in (1, 4):
    c.optim.grad_accum = accum
    tr = train.Trainer.create(c, devices=jax.devices()[:1])
    batch = tr.next_batch()
    tr.state, metrics = tr.step_fn(tr.state, batch)
    assert "aux/state_stats" not in metrics and float(metrics["aux/seen"]) == 15.0
    ms = jax.device_get(tr.state["method_state"])
    np.testing.assert_array_equal(ms["frozen"]["w"], frozen["w"])
    want = np.mean(np.asarray(jax.device_get(batch["image"]), np.float64) / 255.0)
    np.testing.assert_allclose(ms["last_mean"], want, rtol=1e-5)
    out[accum] = float(metrics["loss"])
  np.testing.assert_allclose(out[4], out[1], rtol=1e-5)


def test_corrupt_image_in_folder_is_skipped_and_counted(tmp_path, shared_cifar_dir):
  import shutil
  root = tmp_path / "data"
  for cls_name in ("airplane", "cat"):
    (root / cls_name).mkdir(parents=True)
    for f in sorted((shared_cifar_dir / cls_name).iterdir())[:30]:
      shutil.copy(f, root / cls_name / f.name)
  (root / "cat" / "9999.jpg").write_bytes(b"not a jpeg at all")
  c = tiny_config("simmim", total_steps=2, ckpt_every=2)
  c.input.data.update(name="image_folder", dir=str(root), holdout_per_class=5,
                      cache_dir=str(tmp_path / "cache"))
  c.evals = {}
  summary = train.train_and_evaluate(c, str(tmp_path / "w"), progress=False)
  first = read_metrics(str(tmp_path / "w"))[0]
  assert first["data/skipped_at_load"] == 1 and summary["bad_images"] == 1


def test_device_resize_step_equals_host_resize_step(tmp_path, shared_cifar_dir):
  """input.device_resize: the step resamples host-decoded regions (sharded over 2 devices)
  and trains on the crops the host path would give, up to rounding: same losses to 1e-3."""
  import shutil
  root = tmp_path / "data"
  for cls_name in ("airplane", "cat"):
    (root / cls_name).mkdir(parents=True)
    for f in sorted((shared_cifar_dir / cls_name).iterdir())[:12]:
      shutil.copy(f, root / cls_name / f.name)
  got = {}
  for canvas in (0, 48):
    c = tiny_config("mae")
    c.input.data.update(name="image_folder", dir=str(root), holdout_per_class=0, in_memory=False)
    c.input.update(batch_size=8, device_resize=canvas)
    tr = train.Trainer.create(c, devices=jax.devices()[:2])
    got[canvas] = [float(tr.step()["loss"]) for _ in range(3)]
    # The packed regions went to the step: one row per device.
    assert ("offset" in tr._batch_spec) == bool(canvas)  # pylint: disable=protected-access
    if canvas:
      assert tr._batch_spec["image"].shape[0] == 2  # pylint: disable=protected-access
  np.testing.assert_allclose(got[48], got[0], rtol=1e-3)


@pytest.mark.parametrize("key, value", [("qkv_proj", "splitt"), ("layer_norm", "fast"),
                                        ("remat_policy", "dots_saveable"), ("attn_impl", "flash"),
                                        ("residual_dtype", "float16")])
def test_unknown_execution_option_is_a_one_line_error(tmp_path, key, value):
  c = tiny_config("mae")
  c.model[key] = value
  with pytest.raises(train.TrainingError, match=rf"^config\.model\.{key}='{value}': use one of '") as e:
    train.train_and_evaluate(c, str(tmp_path), progress=False)
  assert "\n" not in str(e.value)
  assert not [f for _, _, files in os.walk(tmp_path) for f in files]   # nothing built, no file written


def test_execution_options_accept_their_defaults_and_jax_choice():
  c = tiny_config("mae")
  for impl in ("", None, "xla", "cudnn"):        # '' and None both leave the choice to JAX
    c.model.attn_impl = impl
    vit.check_execution_options(c.model)
  # Every execution option is one a checkpoint resumes across.
  assert {f"model.{k}" for k in vit.EXECUTION_OPTIONS} == set(checkpointing.EXECUTION_KEYS)
  assert set(vit.EXECUTION_OPTIONS) <= set(c.model)
