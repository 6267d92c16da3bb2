"""Context prediction: the pair geometry (gap, jitter, label <-> offset), the green-magenta
projection, colour dropping, the loss by hand (exact resume: test_contract.py)."""
import jax
import jax.numpy as jnp
import numpy as np

from helpers import tiny_convnet_config
from mim_jax import methods
from mim_jax.methods import context_prediction as cp


def test_pair_geometry_gap_jitter_and_labels():
  size, patch, gap, jit = 64, 12, 6, 2
  org, lab = cp.sample_pair_origins(jax.random.PRNGKey(0), 512, size, patch, gap, jit)
  org, lab = np.asarray(org), np.asarray(lab)
  assert set(lab.tolist()) == set(range(8))
  assert org.min() >= 0 and org.max() <= size - patch
  step = patch + gap
  d = org[:, 1] - org[:, 0]                                   # neighbour - centre, (dy, dx)
  want = cp.OFFSETS[lab] * step
  assert np.abs(d - want).max() <= 2 * jit                    # jitter of both patches
  # the label is the sign of the offset, in pos2lbl's layout
  off = cp.OFFSETS[lab]
  np.testing.assert_array_equal(np.sign(d)[off != 0], off[off != 0])
  assert np.abs(d[off == 0]).max() <= 2 * jit
  layout = {(-1, -1): 0, (-1, 0): 1, (-1, 1): 2, (0, -1): 3, (0, 1): 4, (1, -1): 5, (1, 0): 6,
            (1, 1): 7}
  assert all(layout[tuple(o)] == i for i, o in enumerate(cp.OFFSETS.tolist()))
  # along the offset's axis the patches are separated by the gap, less the jitter
  for axis in (0, 1):
    moved = cp.OFFSETS[lab][:, axis] != 0
    sep = np.abs(d[moved, axis]) - patch
    assert sep.min() >= gap - 2 * jit and sep.max() <= gap + 2 * jit
  # without jitter (and inside the image) the centre is exactly one step from the grid start
  org0, lab0 = cp.sample_pair_origins(jax.random.PRNGKey(1), 64, size, patch, gap, 0)
  np.testing.assert_array_equal(np.asarray(org0[:, 1] - org0[:, 0]), cp.OFFSETS[np.asarray(lab0)] * step)


def test_patch_cutting_against_numpy():
  img = np.asarray(jax.random.uniform(jax.random.PRNGKey(0), (2, 20, 20, 3)))
  org = np.array([[[0, 3], [10, 11]], [[5, 5], [1, 0]]], np.int32)
  got = np.asarray(cp.cut_patches(jnp.asarray(img), jnp.asarray(org), 7))
  for b in range(2):
    for n in range(2):
      y, x = org[b, n]
      np.testing.assert_array_equal(got[b, n], img[b, y:y + 7, x:x + 7])


def test_projection_removes_exactly_the_green_magenta_component():
  a = np.array([-1.0, 2.0, -1.0]) / np.sqrt(6)
  x = np.random.default_rng(0).normal(size=(5, 4, 3))
  y = np.asarray(cp.project_out_green_magenta(jnp.asarray(x, jnp.float32)))
  np.testing.assert_allclose(y @ a, 0, atol=1e-5)                         # nothing left along a
  np.testing.assert_allclose(y, x - (x @ a)[..., None] * a, atol=1e-5)     # the rest untouched
  b = cp.projection_matrix()
  np.testing.assert_allclose(b @ b, b, atol=1e-12)                        # a projection


def test_colour_dropping_keeps_one_channel():
  p = jax.random.uniform(jax.random.PRNGKey(0), (6, 2, 8, 8, 3))
  out = np.asarray(cp.drop_colors(jax.random.PRNGKey(1), p, 0.01))
  p = np.asarray(p)
  for b in range(6):
    for n in range(2):
      kept = [c for c in range(3)
              if np.allclose(out[b, n, ..., c], p[b, n, ..., c] - p[b, n, ..., c].mean(), atol=1e-6)]
      assert len(kept) == 1
      std = out[b, n, ..., kept[0]].std()
      for c in set(range(3)) - set(kept):
        assert out[b, n, ..., c].std() < 0.05 * std


def test_loss_by_hand():
  logits = np.random.default_rng(0).normal(size=(3, 8)).astype(np.float32)
  labels = np.array([0, 7, 3])
  lse = np.log(np.exp(logits).sum(1))
  want = np.mean(lse - logits[np.arange(3), labels])
  np.testing.assert_allclose(float(cp.context_loss(jnp.asarray(logits), jnp.asarray(labels))),
                             want, rtol=1e-6)


def tiny(**overrides):
  return tiny_convnet_config("context_prediction", "", dict(
      resize=32, patch=8, gap=4, jitter=1, fc_dim=16, downsample_sizes=(3, 6)), **overrides)


def test_method_trains_with_projection_and_head_statistics():
  c = tiny(**{"context_prediction.color": "project"})
  m = methods.get(c)
  x = jax.random.normal(jax.random.PRNGKey(0), (4, 16, 16, 3))
  v = m.init_variables(jax.random.PRNGKey(1), x[:2])
  state = m.initial_state(v)
  assert "head" in state["collections"]["batch_stats"]
  loss, aux = jax.jit(m.loss)(v["params"], state, x, jax.random.PRNGKey(2), jnp.int32(0))
  assert set(aux["collections"]["batch_stats"]) == {"encoder", "head"}
  np.testing.assert_allclose(float(loss), np.log(8), rtol=0.5)
