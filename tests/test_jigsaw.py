"""Jigsaw (+ Jigsaw++, damaged jigsaw): the maximal-Hamming permutation set against a brute
force, tile cutting and normalisation against NumPy, the loss by hand, Jigsaw++'s occlusion,
(exact resume: test_contract.py)."""
import itertools

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from helpers import tiny_convnet_config
from mim_jax import methods
from mim_jax.data import permutations as P
from mim_jax.methods import jigsaw


# -- the permutation set -----------------------------------------------------------------------

def brute_force_greedy(count, seed, n=9, min_distance=1):
  """Algorithm 1 as select_permutations.py writes it: delete the chosen row, first argmax of
  the mean Hamming distance to the chosen set over the remaining rows."""
  cands = np.array(list(itertools.permutations(range(n))))
  j = np.random.RandomState(seed).randint(len(cands))
  chosen = []
  for _ in range(count):
    chosen.append(cands[j])
    cands = np.delete(cands, j, axis=0)
    if len(chosen) == count:
      break
    d = np.stack([(cands != c).sum(1) for c in chosen])          # [|P|, remaining]
    if min_distance > 1:
      cands = cands[d.min(0) >= min_distance]
      d = np.stack([(cands != c).sum(1) for c in chosen])
    j = int(d.mean(0).argmax())
  return np.array(chosen)


def test_greedy_selection_equals_the_brute_force_algorithm():
  # 6 tiles (720 permutations) keep the brute force quick; the same code runs for 9.
  for seed in (0, 3):
    np.testing.assert_array_equal(P.maximal_hamming_permutations(40, seed, n=6),
                                  brute_force_greedy(40, seed, n=6))
    np.testing.assert_array_equal(P.jigsaw_pp_permutations(30, seed, 3, n=6),
                                  brute_force_greedy(30, seed, n=6, min_distance=3))


def test_the_1000_set_distinct_deterministic_and_its_hamming_statistics():
  p = P.maximal_hamming_permutations(1000, 0)
  assert p.shape == (1000, 9)
  assert len({tuple(r) for r in p}) == 1000
  assert all(sorted(r) == list(range(9)) for r in p)
  # the statistics against a brute-force pairwise computation
  d = np.array([[int(np.sum(a != b)) for b in p[:60]] for a in p[:60]])
  sub = P.set_statistics(p[:60])
  iu = np.triu_indices(60, 1)
  assert sub["min_hamming"] == d[iu].min() and sub["mean_hamming"] == pytest.approx(d[iu].mean())
  stats = P.set_statistics(p)
  print("1000 permutations:", stats)
  assert stats["min_hamming"] == 2
  assert stats["mean_hamming"] == pytest.approx(8.008, abs=1e-3)   # the slide: 8.00
  P.maximal_hamming_permutations.cache_clear()
  np.testing.assert_array_equal(P.maximal_hamming_permutations(1000, 0), p)
  assert not np.array_equal(P.maximal_hamming_permutations(1000, 1), p)


def test_the_jigsaw_pp_set_has_minimum_distance_3():
  q = P.jigsaw_pp_permutations(701, 0, 3)
  stats = P.set_statistics(q)
  assert stats == {"count": 701, "min_hamming": 3, "mean_hamming": stats["mean_hamming"]}
  assert len({tuple(r) for r in q}) == 701


# -- the puzzle --------------------------------------------------------------------------------

def test_tile_cutting_against_numpy():
  rng = jax.random.PRNGKey(0)
  img = np.asarray(jax.random.uniform(rng, (3, 40, 40, 3)))
  org = jigsaw.sample_tile_origins(jax.random.PRNGKey(1), 3, 40, 36, 12, 10, channel_jitter=1)
  org = np.asarray(org)
  got = np.asarray(jigsaw.cut_tiles(jnp.asarray(img), jnp.asarray(org), 10))
  want = np.zeros((3, 9, 10, 10, 3), np.float32)
  for b in range(3):
    for n in range(9):
      for c in range(3):
        y, x = org[b, n, c]
        want[b, n, :, :, c] = img[b, y:y + 10, x:x + 10, c]
  np.testing.assert_array_equal(got, want)
  # geometry: each tile's (un-jittered) corner lies in its cell of the window
  org0 = np.asarray(jigsaw.sample_tile_origins(jax.random.PRNGKey(2), 64, 40, 36, 12, 10))
  assert (org0[:, :, 0] == org0[:, :, 1]).all()                     # no jitter: same corner
  assert org0.min() >= 0 and org0.max() <= 30
  # tile n's corner = window + cell(n) * 12 + offset in 0..2: against tile 0's, -2..2
  offs = org0[:, :, 0] - org0[:, :1, 0] - np.array([[divmod(n, 3)[0] * 12, divmod(n, 3)[1] * 12]
                                                     for n in range(9)])[None]
  assert offs.min() >= -2 and offs.max() <= 2 and len(np.unique(offs)) == 5


def test_per_tile_normalisation_and_permutation():
  t = np.random.default_rng(0).normal(size=(2, 9, 5, 5, 3)).astype(np.float32) * 3 + 1
  t[0, 4] = 0.25                                                    # a flat tile
  got = np.asarray(jigsaw.normalize_tiles(jnp.asarray(t)))
  m = t.mean(axis=(2, 3), keepdims=True)
  s = t.std(axis=(2, 3), keepdims=True, ddof=1)
  s[s == 0] = 1
  np.testing.assert_allclose(got, (t - m) / s, rtol=1e-5, atol=1e-6)
  perms = jnp.asarray(P.maximal_hamming_permutations(1000, 0))
  labels = jnp.asarray([5, 999])
  out = np.asarray(jigsaw.permute_tiles(jnp.asarray(t), perms, labels))
  for b in range(2):
    for pos in range(9):
      np.testing.assert_array_equal(out[b, pos], t[b, int(perms[labels[b], pos])])


def test_assemble_puts_tiles_where_the_permutation_says():
  tiles = jnp.arange(9, dtype=jnp.float32)[None, :, None, None, None] * jnp.ones((1, 9, 2, 2, 1))
  pos = jnp.asarray([[8, 7, 6, 5, 4, 3, 2, 1, 0]])
  canvas = np.asarray(jigsaw.assemble(tiles, pos))[0, ::2, ::2, 0]
  np.testing.assert_array_equal(canvas, np.arange(9)[::-1].reshape(3, 3))


def test_jigsaw_pp_replaces_at_most_two_tiles_with_another_images():
  b = 16
  tiles = jnp.broadcast_to(jnp.arange(b, dtype=jnp.float32)[:, None, None, None, None] * 10 +
                           jnp.arange(9, dtype=jnp.float32)[None, :, None, None, None],
                           (b, 9, 2, 2, 3))
  counts = []
  for s in range(20):
    out, occ = jigsaw.occlude_tiles(jax.random.PRNGKey(s), tiles, 2)
    out, occ = np.asarray(out), np.asarray(occ)
    src, pos = np.divmod(out[..., 0, 0, 0], 10)
    np.testing.assert_array_equal(pos, np.tile(np.arange(9), (b, 1)))   # same grid position
    other = src != np.arange(b)[:, None]
    np.testing.assert_array_equal(other, occ)
    assert (occ.sum(1) <= 2).all()
    for i in range(b):                                           # one other image per puzzle
      assert len(set(src[i][occ[i]])) <= 1
    counts += list(occ.sum(1))
  assert set(counts) == {0, 1, 2}


def test_loss_is_the_cross_entropy_by_hand():
  logits = jnp.asarray([[1.0, 2.0, 0.5], [0.0, -1.0, 3.0]])
  labels = jnp.asarray([1, 0])
  x = np.asarray(logits)
  lse = np.log(np.exp(x).sum(1))
  want = np.mean(lse - x[np.arange(2), [1, 0]])
  np.testing.assert_allclose(float(jigsaw.jigsaw_loss(logits, labels)), want, rtol=1e-6)


# -- the method --------------------------------------------------------------------------------

def tiny(preset="", **overrides):
  return tiny_convnet_config("jigsaw", preset, dict(
      fc6_dim=16, fc7_dim=32, num_permutations=24, pp_num_permutations=24, resize=32, grid=27,
      cell=9, tile=8), **overrides)


@pytest.mark.parametrize("preset", ["cifar10_plus_plus", "cifar10_damaged"])
def test_method_loss_matches_its_parts(preset):
  c = tiny(preset)
  m = methods.get(c)
  x = jax.random.normal(jax.random.PRNGKey(0), (4, 16, 16, 3))
  v = m.init_variables(jax.random.PRNGKey(1), x[:2])
  state = m.initial_state(v)
  loss, aux = jax.jit(m.loss)(v["params"], state, x, jax.random.PRNGKey(2), jnp.int32(0))
  if preset == "cifar10_damaged":
    want = float(aux["jigsaw_ce"]) + float(aux["inpaint_l2"]) + float(aux["color_l2"])
    p = m.puzzle(jax.random.split(jax.random.PRNGKey(2))[0], x)
    removed = np.asarray(p["removed"])
    shown = m.perms[np.asarray(p["labels"])]
    for i in range(4):       # the removed tile is blank at the position showing it
      slot = int(np.where(shown[i] == removed[i])[0][0])
      assert float(jnp.abs(p["tiles"][i, slot]).max()) == 0.0
      # L-only: the three channels of every tile are equal
      np.testing.assert_allclose(np.asarray(p["tiles"][i, ..., 0]), np.asarray(p["tiles"][i, ..., 2]))
  else:
    want = float(aux["jigsaw_ce"])
    assert 0.0 <= float(aux["occluded_tiles"]) <= 2.0
  np.testing.assert_allclose(float(loss), want, rtol=1e-5)
  assert "collections" in aux
  pic = jax.jit(m.reconstruct)(v["params"], state, x, jax.random.PRNGKey(3))
  assert pic["masked"].shape == pic["reconstruction"].shape == x.shape


def test_the_trainers_picture_names_the_puzzle(tmp_path):
  """The trainer hands the method's picture words to the evaluator: jigsaw's picture titles
  its columns 'shuffled tiles' and 'predicted order', not a masked input."""
  from mim_jax import evaluators, train
  tr = train.Trainer.create(tiny("cifar10"), devices=jax.devices()[:1])
  ctx = tr.eval_context(str(tmp_path), 0)
  result = evaluators.build("rec", {"type": "reconstruction", "num_images": 2}).run(ctx)
  titles = result["protocol"]["titles"]
  assert (titles["masked"], titles["reconstruction"]) == ("shuffled tiles", "predicted order")
  assert titles["header"] == jigsaw.Jigsaw.picture_titles["header"]
