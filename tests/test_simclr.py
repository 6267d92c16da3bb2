"""SimCLR: NT-Xent as google-research/simclr's add_contrastive_loss over the global batch, the
projection head's layers, and the colour-strength knob."""
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from je_helpers import method_and_state, tiny_je_config
from mim_jax.methods import simclr


def reference_nt_xent(z1, z2, t):
  """objective.add_contrastive_loss on one replica, in numpy."""
  h1 = z1 / np.linalg.norm(z1, axis=1, keepdims=True)
  h2 = z2 / np.linalg.norm(z2, axis=1, keepdims=True)
  n = len(h1)
  def ce(logits):
    logits = logits - logits.max(1, keepdims=True)
    return -(logits[np.arange(n), np.arange(n)] - np.log(np.exp(logits).sum(1)))
  aa = h1 @ h1.T / t - np.eye(n) * 1e9
  bb = h2 @ h2.T / t - np.eye(n) * 1e9
  la = ce(np.concatenate([h1 @ h2.T / t, aa], 1))
  lb = ce(np.concatenate([h2 @ h1.T / t, bb], 1))
  return np.mean(la + lb)


def test_nt_xent_equals_the_official_loss_by_hand():
  rng = np.random.default_rng(0)
  z1, z2 = rng.normal(size=(6, 5)), rng.normal(size=(6, 5))
  got, parts = simclr.nt_xent(jnp.asarray(z1), jnp.asarray(z2), 0.5)
  np.testing.assert_allclose(float(got), reference_nt_xent(z1, z2, 0.5), rtol=1e-5)
  # Two examples: each view's one negative is the other image's two views.
  a = np.array([[1.0, 0.0], [0.0, 1.0]])
  t = 1.0
  la = -np.log(np.e / (np.e + np.e ** 0 + np.e ** 0))
  np.testing.assert_allclose(float(simclr.nt_xent(jnp.asarray(a), jnp.asarray(a), t)[0]), 2 * la,
                             rtol=1e-6)


def test_negatives_come_from_the_whole_batch():
  """Splitting the batch in two halves (two replicas without the cross-replica concat) gives a
  different loss: the jitted loss sees every example as a negative."""
  rng = np.random.default_rng(1)
  z1, z2 = rng.normal(size=(8, 4)), rng.normal(size=(8, 4))
  whole = float(simclr.nt_xent(jnp.asarray(z1), jnp.asarray(z2), 0.2)[0])
  halves = np.mean([reference_nt_xent(z1[s], z2[s], 0.2) for s in (slice(0, 4), slice(4, 8))])
  np.testing.assert_allclose(whole, reference_nt_xent(z1, z2, 0.2), rtol=1e-5)
  assert abs(whole - halves) > 1e-3


def test_projection_head_layers():
  assert simclr.projection_layers("nonlinear", 3, 512, 128) == (
      (512, False, "affine"), (512, False, "affine"), (128, False, "scale"))
  assert simclr.projection_layers("nonlinear", 2, 64, 16) == ((64, False, "affine"), (16, False, "scale"))
  assert simclr.projection_layers("linear", 3, 64, 16) == ((16, False, "scale"),)
  assert simclr.projection_layers("none", 3, 64, 16) == ()
  with pytest.raises(ValueError, match="proj_head_mode"):
    simclr.projection_layers("mlp", 3, 64, 16)


@pytest.mark.parametrize("mode", ["none", "linear", "nonlinear"])
def test_the_loss_reads_the_last_head_and_the_views_are_one_forward(mode):
  c = tiny_je_config("simclr", **{"simclr.proj_head_mode": mode})
  m, params, state, views = method_and_state(c)
  assert (mode == "none") == ("projector" not in params)
  loss, aux = m.loss(params, state, views, jax.random.PRNGKey(0), jnp.int32(0))
  v1, v2 = m.split_views(views)
  (o,), _ = m.embed_views(params, state["collections"], [jnp.concatenate([v1, v2])],
                          heads=tuple(m.heads))
  z = o[tuple(m.heads)[-1] if m.heads else "pooled"]
  np.testing.assert_allclose(float(loss), reference_nt_xent(np.asarray(z[:8]), np.asarray(z[8:]), 0.5),
                             rtol=1e-4)
  # One forward over 2N views: the encoder's running mean moved once.
  rm0 = state["collections"]["batch_stats"]["encoder"]["bn1"]["running_mean"]
  rm1 = aux["collections"]["batch_stats"]["encoder"]["bn1"]["running_mean"]
  assert not np.allclose(rm0, rm1)


def test_color_strength_sets_the_jitter():
  c = tiny_je_config("simclr", **{"simclr.color_strength": 0.5})
  m, *_ = method_and_state(c)
  np.testing.assert_allclose(m.views_cfg().jitter, (0.4, 0.4, 0.4, 0.1))
  assert c.simclr.views.blur_probs == (0.0, 0.0, 0.0)


def test_grad_accum_is_refused_with_the_fix():
  c = tiny_je_config("simclr", **{"optim.grad_accum": 2})
  with pytest.raises(ValueError, match="grad_accum=1"):
    method_and_state(c)
