"""MoCo: the InfoNCE of builder.MoCo.forward against a queue by hand, the FIFO queue of
`_dequeue_and_enqueue` across steps and a resume, shuffling BN, the heads, the views and the
queue-size check."""
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from helpers import resumed_losses
from je_helpers import method_and_state, tiny_je_config
from mim_jax import train
from mim_jax.methods import moco


def reference_moco_loss(q, k, queue_dk, t):
  """builder.MoCo.forward + nn.CrossEntropyLoss in numpy: the queue as the official [dim, K]."""
  q = q / np.linalg.norm(q, axis=1, keepdims=True)
  k = k / np.linalg.norm(k, axis=1, keepdims=True)
  l_pos = np.einsum("nc,nc->n", q, k)[:, None]
  l_neg = np.einsum("nc,ck->nk", q, queue_dk)
  logits = np.concatenate([l_pos, l_neg], 1) / t
  logits = logits - logits.max(1, keepdims=True)
  return np.mean(-(logits[:, 0] - np.log(np.exp(logits).sum(1))))


def test_infonce_with_a_queue_equals_the_official_loss_by_hand():
  rng = np.random.default_rng(0)
  q, k = rng.normal(size=(6, 5)), rng.normal(size=(6, 5))
  queue = rng.normal(size=(5, 12))
  queue /= np.linalg.norm(queue, axis=0, keepdims=True)
  got, parts = moco.infonce_with_queue(jnp.asarray(q), jnp.asarray(k), jnp.asarray(queue.T), 0.07)
  np.testing.assert_allclose(float(got), reference_moco_loss(q, k, queue, 0.07), rtol=1e-5)
  # One query, its key and two queued keys: -log(e^(1/t) / (e^(1/t) + e^0 + e^(-1/t))).
  t = 0.5
  got, parts = moco.infonce_with_queue(jnp.asarray([[2.0, 0.0]]), jnp.asarray([[3.0, 0.0]]),
                                       jnp.asarray([[0.0, 1.0], [-1.0, 0.0]]), t)
  want = -np.log(np.exp(1 / t) / (np.exp(1 / t) + 1.0 + np.exp(-1 / t)))
  np.testing.assert_allclose(float(got), want, rtol=1e-6)
  assert float(parts["contrast_acc"]) == 1.0
  # No gradient into the keys or the queue.
  g = jax.grad(lambda k, u: moco.infonce_with_queue(jnp.asarray(q), k, u, 0.2)[0], argnums=(0, 1))(
      jnp.asarray(k), jnp.asarray(queue.T))
  assert all(float(jnp.max(jnp.abs(x))) == 0.0 for x in g)


def test_initial_queue_and_enqueue():
  qu = moco.initial_queue(jax.random.PRNGKey(0), 8, 4)
  np.testing.assert_allclose(np.linalg.norm(qu, axis=1), 1.0, rtol=1e-6)
  keys = jnp.arange(12.0).reshape(3, 4)
  with pytest.raises(ValueError, match="moco.k=8 is not a multiple of the 3 keys"):
    moco.enqueue(qu, jnp.int32(0), keys)
  q2, p = moco.enqueue(qu, jnp.int32(6), keys[:2])
  np.testing.assert_array_equal(q2[6:], keys[:2])
  np.testing.assert_array_equal(q2[:6], qu[:6])
  assert int(p) == 0


@pytest.mark.parametrize("symmetric", [False, True])
def test_the_method_loss_is_the_official_forward(symmetric):
  """Without shuffling: q from the query encoder + head of view 1, k from the key encoder + head
  of view 2 (and the swapped pair, summed, when symmetric), against the state's queue; the keys
  appended in the order the official code enqueues them."""
  c = tiny_je_config("moco", **{"moco.shuffle_bn": False, "moco.symmetric": symmetric,
                                "moco.temperature": 0.2})
  m, params, state, views = method_and_state(c, batch=16)
  loss, aux = m.loss(params, state, views, jax.random.PRNGKey(0), jnp.int32(0))
  v1, v2 = m.split_views(views)
  emb = lambda p, x: m.embed(p, state["collections"], x, heads=("projector",))[0]["projector"]
  t_cols = {"batch_stats": {"encoder": state["collections"]["batch_stats"]["teacher_encoder"]}}
  key = lambda x: m.embed(state["teacher"], t_cols, x, heads=("projector",))[0]["projector"]
  queue = np.asarray(state["queue"]).T
  q1, k2 = np.asarray(emb(params, v1)), np.asarray(key(v2))
  want = reference_moco_loss(q1, k2, queue, 0.2)
  k2n = k2 / np.linalg.norm(k2, axis=1, keepdims=True)
  if symmetric:
    q2, k1 = np.asarray(emb(params, v2)), np.asarray(key(v1))
    want += reference_moco_loss(q2, k1, queue, 0.2)
    k1n = k1 / np.linalg.norm(k1, axis=1, keepdims=True)
    new = m.update_state(params, state, jnp.int32(0), appended=aux["state_append"])
    np.testing.assert_allclose(new["queue"][:32], np.concatenate([k1n, k2n]), rtol=1e-5, atol=1e-6)
  else:
    np.testing.assert_allclose(aux["state_append"]["keys"], k2n, rtol=1e-5, atol=1e-6)
  np.testing.assert_allclose(float(loss), want, rtol=1e-5)
  # Query and key encoders' running statistics both moved.
  bs = aux["collections"]["batch_stats"]
  for mod in ("encoder", "teacher_encoder"):
    assert not np.allclose(bs[mod]["bn1"]["running_mean"],
                           state["collections"]["batch_stats"][mod]["bn1"]["running_mean"])


def test_queue_is_fifo_across_steps_and_holds_the_batch_keys(compilation_cache):
  """K = 32, batch 16: step 1's keys fill rows 0-15, step 2's rows 16-31 (the pointer wraps to
  0), step 3's replace step 1's; each block equals the keys the loss computed for that step."""
  c = tiny_je_config("moco", **{"moco.k": 32, "moco.symmetric": False})
  tr = train.Trainer.create(c, devices=jax.devices()[:1])
  m = tr.method
  init = np.asarray(tr.state["method_state"]["queue"])

  @jax.jit
  def keys_of(state, batch):   # the step's own rng split and preprocessing
    rng = jax.random.fold_in(state["rng"], state["step"])
    aug_rng, loss_rng = jax.random.split(rng)
    images = m.preprocess(aug_rng, batch["image"], c.input, True)
    return m.loss(state["params"], state["method_state"], images, loss_rng, state["step"])[1][
        "state_append"]["keys"]

  got = []
  for _ in range(3):
    batch = tr.next_batch()
    got.append(np.asarray(keys_of(tr.state, batch)))
    tr.state, _ = tr.step_fn(tr.state, batch)
    ms = jax.device_get(tr.state["method_state"])
    if len(got) == 1:
      np.testing.assert_allclose(ms["queue"][:16], got[0], rtol=1e-5, atol=1e-6)
      np.testing.assert_array_equal(ms["queue"][16:], init[16:])
      assert int(ms["queue_ptr"]) == 16
    elif len(got) == 2:
      np.testing.assert_allclose(ms["queue"], np.concatenate(got), rtol=1e-5, atol=1e-6)
      assert int(ms["queue_ptr"]) == 0
  np.testing.assert_allclose(ms["queue"], np.concatenate([got[2], got[1]]), rtol=1e-5, atol=1e-6)
  assert int(ms["queue_ptr"]) == 16
  assert np.abs(got[2] - got[0]).max() > 1e-3


def test_the_queue_survives_a_resume(tmp_path, compilation_cache):
  # K = 48: rows 16-31 hold step 2's keys, written before the preemption after step 2.
  c = tiny_je_config("moco", **{"moco.k": 48, "moco.symmetric": False})
  a, b = str(tmp_path / "a"), str(tmp_path / "b")
  train.train_and_evaluate(c, a, progress=False, devices=jax.devices()[:1])
  resumed_losses(tiny_je_config("moco", **{"moco.k": 48, "moco.symmetric": False}), b,
                 stop_after=2, devices=jax.devices()[:1])
  sa = jax.device_get(train.Trainer.from_workdir(a, devices=jax.devices()[:1]).state["method_state"])
  sb = jax.device_get(train.Trainer.from_workdir(b, devices=jax.devices()[:1]).state["method_state"])
  assert int(sa["queue_ptr"]) == int(sb["queue_ptr"]) == (4 * 16) % 48
  np.testing.assert_array_equal(sa["queue"], sb["queue"])
  init = np.asarray(moco.initial_queue(jax.random.fold_in(jax.random.PRNGKey(c.seed), 0x30C0), 48,
                                       c.moco.dim))
  assert (np.abs(sa["queue"] - init).max(axis=1) > 0).all()   # every row was overwritten


@pytest.mark.parametrize("groups", [1, 4])
def test_shuffling_bn(groups):
  """With one BatchNorm group the permutation cannot change the keys (they come back in the
  images' order); with 4 groups it changes the statistics each key is normalised with, and the
  keys equal the grouped forward of the permuted batch, un-permuted."""
  c = tiny_je_config("moco", **{"model.bn_groups": groups})
  m, params, state, views = method_and_state(c, batch=16)
  x = m.split_views(views)[1]
  rng = jax.random.PRNGKey(7)
  perm = jax.random.permutation(rng, 16)
  assert np.any(np.asarray(perm) != np.arange(16))
  plain, _ = m.shuffled_keys(state, x, None)
  shuffled, cols = m.shuffled_keys(state, x, rng)
  (o,), _ = m.teacher_embed_views(state, [x[perm]])
  by_hand = np.asarray(o["projector"])[np.argsort(np.asarray(perm))]
  by_hand /= np.linalg.norm(by_hand, axis=1, keepdims=True)
  np.testing.assert_allclose(shuffled, by_hand, rtol=1e-5, atol=1e-6)
  diff = float(jnp.max(jnp.abs(shuffled - plain)))
  if groups == 1:
    assert diff < 1e-5, diff
  else:
    assert diff > 1e-3, diff
    off = tiny_je_config("moco", **{"model.bn_groups": groups, "moco.shuffle_bn": False})
    l_on = m.loss(params, state, views, rng, jnp.int32(0))[0]
    m_off, *_ = method_and_state(off, batch=16)
    l_off = m_off.loss(params, state, views, rng, jnp.int32(0))[0]
    assert c.moco.shuffle_bn and abs(float(l_on) - float(l_off)) > 1e-4
  assert "teacher_encoder" in cols["batch_stats"]


def test_heads_views_teacher_and_decay():
  c = tiny_je_config("moco", **{"moco.mlp": True, "moco.aug_plus": False, "moco.momentum": 0.9})
  m, params, state, views = method_and_state(c)
  p = params["projector"]
  assert p["fc0"]["kernel"].shape == (64, 64) and p["fc1"]["kernel"].shape == (64, 128)
  assert "bias" in p["fc0"] and "bias" in p["fc1"] and "bn0" not in p
  assert moco.head_layers(False, 2048, 128) == ((128, True, ""),)
  v = m.views_cfg()
  assert tuple(v.jitter) == (0.4, 0.4, 0.4, 0.4) and v.jitter_prob == 1.0
  assert max(v.blur_probs) == 0.0 and v.solarize_prob == 0.0 and v.gray_prob == 0.2
  plus = method_and_state(tiny_je_config("moco", **{"moco.aug_plus": True}))[0].views_cfg()
  assert tuple(plus.jitter) == (0.4, 0.4, 0.4, 0.1) and plus.jitter_prob == 0.8
  # The key encoder is encoder + head, moved by momentum 0.9 towards the new parameters.
  new_params = jax.tree.map(lambda x: x + 1.0, params)
  s = m.update_state(new_params, state, jnp.int32(0))
  np.testing.assert_allclose(s["teacher"]["projector"]["fc1"]["kernel"],
                             state["teacher"]["projector"]["fc1"]["kernel"] + 0.1, rtol=1e-5, atol=1e-6)
  assert set(s["teacher"]) == {"encoder", "projector"}
  assert all(jax.tree.leaves(m.decay_mask(params)))   # torch SGD decays every parameter


def test_queue_size_not_a_multiple_of_the_batch_is_a_one_line_error():
  c = tiny_je_config("moco", **{"moco.k": 100, "moco.symmetric": False})
  with pytest.raises(ValueError, match=r"moco.k=100 is not a multiple of the 16 keys") as e:
    method_and_state(c)
  assert "\n" not in str(e.value)
  c = tiny_je_config("moco", **{"moco.k": 48, "moco.symmetric": True})
  with pytest.raises(ValueError, match="multiple of 32"):
    method_and_state(c)
