"""InstDisc: NCE with its normalising constant Z, the non-parametric softmax, the memory bank
written at the batch's dataset indices, and gradient accumulation equal to the full batch."""
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from helpers import load_config
from je_helpers import method_and_state, tiny_je_config
from mim_jax import train
from mim_jax.methods import instdisc


def reference_nce(scores, n_data):
  """NCECriterion in numpy: scores [B, K+1] = exp(s/T)/Z."""
  k = scores.shape[1] - 1
  kp = k / n_data
  ln_pmt = np.log(scores[:, 0] / (scores[:, 0] + kp + 1e-7))
  ln_pon = np.log(kp / (scores[:, 1:] + kp + 1e-7))
  return -(ln_pmt.sum() + ln_pon.sum()) / len(scores)


def test_nce_loss_and_its_z_by_hand():
  rng = np.random.default_rng(0)
  v = rng.normal(size=(3, 4)); v /= np.linalg.norm(v, axis=1, keepdims=True)
  bank = rng.normal(size=(10, 4)); bank /= np.linalg.norm(bank, axis=1, keepdims=True)
  idx = np.array([[2, 5, 7], [0, 1, 9], [4, 4, 3]])
  out = np.asarray(instdisc.nce_scores(jnp.asarray(v), jnp.asarray(bank), jnp.asarray(idx), 0.1))
  want = np.exp(np.einsum("bkd,bd->bk", bank[idx], v) / 0.1)
  np.testing.assert_allclose(out, want, rtol=1e-5)
  z = want.mean() * 10                     # NCEFunction: Z = out.mean() * outputSize
  got = float(instdisc.nce_loss(jnp.asarray(out / z), 10))
  np.testing.assert_allclose(got, reference_nce(want / z, 10), rtol=1e-5)


def test_nonparametric_softmax_by_hand():
  rng = np.random.default_rng(1)
  v, bank = rng.normal(size=(2, 3)), rng.normal(size=(5, 3))
  index = np.array([4, 1])
  logits = v @ bank.T / 0.07
  logp = logits - np.log(np.exp(logits - logits.max(1, keepdims=True)).sum(1, keepdims=True)) - logits.max(1, keepdims=True)
  want = -np.mean(logp[np.arange(2), index])
  got = float(instdisc.nonparametric_softmax_loss(jnp.asarray(v), jnp.asarray(bank),
                                                  jnp.asarray(index), 0.07))
  np.testing.assert_allclose(got, want, rtol=1e-5)


def test_bank_is_written_at_the_dataset_indices_and_z_is_fixed_at_the_first_step():
  c = tiny_je_config("instdisc", **{"instdisc.nce_k": 16})
  tr = train.Trainer.create(c, devices=jax.devices()[:1])
  bank0 = np.asarray(tr.state["method_state"]["bank"])
  assert float(tr.state["method_state"]["z"]) == -1.0
  stdv = 1 / np.sqrt(32 / 3)       # low_dim shrunk to 32 by tiny_je_config
  assert bank0.shape[1] == 32 and np.abs(bank0).max() <= stdv
  batch = tr.next_batch()
  tr.state, metrics = tr.step_fn(tr.state, batch)
  idx = np.asarray(batch["index"])
  bank1 = np.asarray(tr.state["method_state"]["bank"])
  others = np.setdiff1d(np.arange(len(bank0)), idx)
  np.testing.assert_array_equal(bank1[others], bank0[others])
  assert not np.allclose(bank1[idx], bank0[idx])
  np.testing.assert_allclose(np.linalg.norm(bank1[idx], axis=1), 1.0, rtol=1e-5)
  z1 = float(tr.state["method_state"]["z"])
  assert z1 > 0 and z1 == float(metrics["aux/nce_z"])
  tr.state, _ = tr.step_fn(tr.state, tr.next_batch())
  assert float(tr.state["method_state"]["z"]) == z1          # fixed after the first batch


def test_bank_update_by_hand():
  bank = jnp.asarray([[1.0, 0.0], [0.0, 1.0], [0.6, 0.8]])
  v = jnp.asarray([[0.0, 1.0]])
  got = np.asarray(instdisc.bank_update(bank, v, jnp.asarray([0]), 0.5))
  np.testing.assert_allclose(got[0], np.array([1.0, 1.0]) / np.sqrt(2), rtol=1e-6)
  np.testing.assert_array_equal(got[1:], np.asarray(bank[1:]))


@pytest.mark.parametrize("objective", ["softmax", "parametric"])
def test_other_objectives_train(objective):
  c = tiny_je_config("instdisc", **{"instdisc.objective": objective})
  m, params, state, views = method_and_state(c)
  assert ("bank" in state) == (objective != "parametric")
  assert ("classifier" in params) == (objective == "parametric")
  loss, _ = m.loss(params, state, views, jax.random.PRNGKey(0), jnp.int32(0),
                   index=jnp.arange(8, dtype=jnp.int32))
  np.testing.assert_allclose(float(loss), np.log(m.n_data), rtol=0.3)


def test_gradient_accumulation_equals_the_full_batch():
  """With a BatchNorm-free backbone (a tiny ViT) and the bank only read inside the step, two
  micro-batches take the full batch's step and write the same bank."""
  def cfg(accum):
    c = tiny_je_config("instdisc", **{"instdisc.objective": "softmax", "optim.grad_accum": accum})
    vit = load_config("mae").model
    vit.update(variant="mu", depth=1, patch_size=4)
    c.model = vit
    c.pooling = "mean"
    return c
  out = []
  for accum in (1, 2):
    tr = train.Trainer.create(cfg(accum), devices=jax.devices()[:1])
    losses = []
    for _ in range(2):
      tr.state, m = tr.step_fn(tr.state, tr.next_batch())
      losses.append(float(m["loss"]))
    out.append((losses, np.asarray(tr.state["method_state"]["bank"])))
  np.testing.assert_allclose(out[1][0], out[0][0], rtol=1e-5)
  np.testing.assert_allclose(out[1][1], out[0][1], rtol=1e-5, atol=1e-6)


def test_cifar10_full_follows_cifar_py():
  """cifar.py: batch 128, lr 0.03, wd 5e-4, T 0.1, lr x 0.1 at epochs 80, 120 and 160."""
  c = load_config("instdisc", "cifar10_full")
  assert (c.input.batch_size, c.total_epochs) == (128, 200)
  assert c.optim.base_lr * c.input.batch_size / c.optim.lr_batch_divisor == pytest.approx(0.03)
  assert (c.optim.weight_decay, c.instdisc.nce_t, c.instdisc.nce_k) == (5e-4, 0.1, 4096)
  assert tuple(c.optim.milestones_epochs) == (80, 120, 160)
  assert c.optim.gamma == 0.1
  assert c.model.conv_init == "torch"              # models/resnet_cifar.py: nn.Conv2d's init
  assert load_config("instdisc", "imagenet").model.conv_init == "torchvision"
