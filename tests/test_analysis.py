"""mim_jax.analysis: attention statistics and CKA on hand-checkable inputs, and the CLI end to end."""
import json
import math
import os
import shutil

import jax
import numpy as np
import pytest
from PIL import Image

from helpers import tiny_config
from mim_jax import analysis, train
from mim_jax.analysis import attention, cka

# ----------------------------------------------------------------------------- attention maps


def _with_cls(patch_rows, cls_weight=0.0):
  """[B, H, L, L] patch-to-patch attention -> [B, H, 1+L, 1+L]: every patch query gives
  `cls_weight` to the cls key and (1 - cls_weight) x its row to the patches; the cls query
  attends uniformly (it must not count)."""
  b, h, l, _ = patch_rows.shape
  out = np.zeros((b, h, l + 1, l + 1), np.float32)
  out[:, :, 0, :] = 1.0 / (l + 1)
  out[:, :, 1:, 0] = cls_weight
  out[:, :, 1:, 1:] = (1.0 - cls_weight) * patch_rows
  return out


def test_attention_distance_of_identity_attention_is_zero():
  eye = np.broadcast_to(np.eye(9, dtype=np.float32), (2, 3, 9, 9))
  np.testing.assert_array_equal(attention.attention_distance(eye, 3, 4, has_cls=False), np.zeros(3))
  eye_cls = np.broadcast_to(np.eye(10, dtype=np.float32), (2, 3, 10, 10))
  np.testing.assert_array_equal(attention.attention_distance(eye_cls, 3, 4, has_cls=True), np.zeros(3))


def test_attention_distance_of_uniform_attention_on_2x2_grid():
  # Patch 4 px on a 2x2 grid: from any patch, the 4 patch centres lie 0, 4, 4 and 4*sqrt(2)
  # pixels away, so uniform attention gives (0 + 4 + 4 + 4 sqrt 2) / 4 = 2 + sqrt 2.
  uniform = np.full((3, 2, 5, 5), 1.0 / 5, np.float32)   # cls + 4 patches; cls weight dropped
  got = attention.attention_distance(uniform, 2, 4, has_cls=True)
  np.testing.assert_allclose(got, [2 + math.sqrt(2)] * 2, rtol=1e-6)


def test_attention_distance_of_uniform_attention_on_3x3_grid():
  # Sums of grid distances from each patch to all 9: corner 6 + 3 sqrt2 + 2 sqrt5, edge
  # 5 + 2 sqrt2 + 2 sqrt5, centre 4 + 4 sqrt2; 4 corners + 4 edges + 1 centre = 48 + 24 sqrt2
  # + 16 sqrt5 over 81 ordered pairs, times 4 px.
  expected = 4 * (48 + 24 * math.sqrt(2) + 16 * math.sqrt(5)) / 81
  uniform = np.full((1, 1, 9, 9), 1.0 / 9, np.float32)
  got = attention.attention_distance(uniform, (3, 3), 4, has_cls=False)
  np.testing.assert_allclose(got, [expected], rtol=1e-6)
  assert abs(expected - 5.81323) < 1e-4


def test_attention_distance_renormalises_over_patch_keys_per_head():
  # 2x2 grid, patch 4. Head 0 attends to itself, head 1 half to itself and half to its
  # horizontal neighbour (0<->1, 2<->3): 0.5 x 4 px = 2 px. Half of every row goes to the cls
  # key, which the renormalisation removes.
  own = np.eye(4, dtype=np.float32)
  neighbour = own[[1, 0, 3, 2]]
  rows = np.stack([own, 0.5 * own + 0.5 * neighbour])[None]        # [1, 2, 4, 4]
  attn = _with_cls(rows, cls_weight=0.5)
  np.testing.assert_allclose(attention.attention_distance(attn, 2, 4), [0.0, 2.0], atol=1e-6)
  np.testing.assert_allclose(attention.cls_attention_mass_per_image(attn)[0], [0.5, 0.5])


def test_attention_distance_rejects_maps_of_another_grid():
  with pytest.raises(ValueError, match="do not match a 3x3 grid"):
    attention.attention_distance(np.full((1, 1, 5, 5), 0.2, np.float32), 3, 4)


def test_entropy_of_uniform_attention_is_log_n_and_of_identity_zero():
  uniform = np.full((2, 3, 9, 9), 1.0 / 9, np.float32)
  np.testing.assert_allclose(attention.attention_entropy(uniform, has_cls=False), [math.log(9)] * 3,
                             rtol=1e-6)
  # With a cls token: 10 keys, the 9 patch keys renormalised -> log 9.
  uniform_cls = np.full((2, 3, 10, 10), 0.1, np.float32)
  np.testing.assert_allclose(attention.attention_entropy(uniform_cls), [math.log(9)] * 3, rtol=1e-6)
  eye = np.broadcast_to(np.eye(9, dtype=np.float32), (1, 2, 9, 9))
  np.testing.assert_array_equal(attention.attention_entropy(eye, has_cls=False), [0.0, 0.0])


def test_head_kl_is_zero_for_identical_heads_and_positive_otherwise():
  rng = np.random.default_rng(0)
  logits = rng.normal(size=(2, 1, 5, 5))
  p = np.exp(logits) / np.exp(logits).sum(-1, keepdims=True)
  same = np.repeat(p, 4, axis=1).astype(np.float32)
  np.testing.assert_allclose(attention.head_kl(same), np.zeros(4), atol=1e-6)
  assert abs(float(attention.head_diversity(same))) < 1e-6
  different = same.copy()
  different[:, 2] = np.full((2, 5, 5), 0.2, np.float32)
  kl = np.asarray(attention.head_kl(different))
  assert (kl > 0.01).all(), kl


def test_head_kl_equals_hand_computation_for_two_heads():
  # Every query: head 0 = (0.5, 0.5), head 1 = (0.9, 0.1) over 2 keys (no cls token).
  attn = np.zeros((1, 2, 2, 2), np.float32)
  attn[0, 0] = [0.5, 0.5]
  attn[0, 1] = [0.9, 0.1]
  kl_01 = 0.5 * math.log(0.5 / 0.9) + 0.5 * math.log(0.5 / 0.1)
  kl_10 = 0.9 * math.log(0.9 / 0.5) + 0.1 * math.log(0.1 / 0.5)
  np.testing.assert_allclose(attention.head_kl(attn, has_cls=False), [kl_01, kl_10], rtol=1e-5)
  np.testing.assert_allclose(attention.head_diversity(attn, has_cls=False), (kl_01 + kl_10) / 2,
                             rtol=1e-5)


def test_layer_statistics_stack_layers_and_heads():
  uniform = np.full((3, 2, 5, 5), 0.2, np.float32)
  eye = np.broadcast_to(np.eye(5, dtype=np.float32), (3, 2, 5, 5))
  stats = attention.layer_statistics([uniform, eye], 2, 4)
  assert {k: v.shape for k, v in stats.items()} == {
      k: (3, 2, 2) for k in ("attention_distance", "attention_entropy", "head_kl", "cls_attention_mass")}
  summary = attention.summarize({k: np.asarray(v) for k, v in stats.items()})
  np.testing.assert_allclose(summary["attention_distance"], [[2 + math.sqrt(2)] * 2, [0, 0]], atol=1e-5)
  np.testing.assert_allclose(summary["cls_attention_mass"], [[0.2, 0.2], [0, 0]], atol=1e-7)
  assert summary["head_diversity"].shape == (2,)


# ----------------------------------------------------------------------------- CKA


def test_cka_of_one_dimensional_features_is_squared_correlation():
  # Centred x = (-1, 0, 1), y = (0, -1, 1): correlation 1 / (sqrt2 sqrt2) = 0.5 -> CKA 0.25.
  assert cka.linear_cka([[1.0], [2.0], [3.0]], [[1.0], [0.0], [2.0]]) == pytest.approx(0.25, abs=1e-12)


def test_cka_equals_the_gram_matrix_form():
  # Kornblith et al. Eq. 3 with linear kernels: HSIC(K, L) = tr(K H L H) / (n-1)^2, K = X X^T,
  # H = I - 11^T / n; CKA = HSIC(K, L) / sqrt(HSIC(K, K) HSIC(L, L)).
  rng = np.random.default_rng(5)
  x, y = rng.normal(size=(12, 4)), rng.normal(size=(12, 6))
  y[:, :2] += x[:, :2]
  h = np.eye(12) - np.ones((12, 12)) / 12
  hsic = lambda k, l: np.trace(k @ h @ l @ h)  # noqa: E731
  k, l = x @ x.T, y @ y.T
  assert cka.linear_cka(x, y) == pytest.approx(hsic(k, l) / math.sqrt(hsic(k, k) * hsic(l, l)), rel=1e-10)


def test_cka_of_features_with_themselves_is_one():
  x = np.random.default_rng(1).normal(size=(50, 7))
  assert cka.linear_cka(x, x) == pytest.approx(1.0, abs=1e-12)


def test_cka_is_invariant_to_orthogonal_transforms_and_isotropic_scaling():
  rng = np.random.default_rng(2)
  x = rng.normal(size=(60, 6)) @ rng.normal(size=(6, 6))         # correlated columns
  y = np.tanh(x @ rng.normal(size=(6, 9))) + 0.3 * rng.normal(size=(60, 9))
  q, _ = np.linalg.qr(rng.normal(size=(6, 6)))
  base = cka.linear_cka(x, y)
  assert 0.05 < base < 0.99
  assert cka.linear_cka(3.7 * x @ q, y) == pytest.approx(base, abs=1e-12)
  assert cka.linear_cka(x @ q, x) == pytest.approx(1.0, abs=1e-12)
  assert cka.linear_cka(x + 5.0, y) == pytest.approx(base, abs=1e-12)  # centring


def test_cka_of_independent_features_is_small():
  rng = np.random.default_rng(3)
  value = cka.linear_cka(rng.normal(size=(2000, 8)), rng.normal(size=(2000, 12)))
  assert value < 0.03, value   # the biased estimator's floor is about sqrt(8 x 12) / 2000 = 0.005


def test_cka_matrix_matches_pairwise_cka():
  rng = np.random.default_rng(4)
  a = rng.normal(size=(40, 3, 5))
  a[:, 1] = a[:, 0] @ rng.normal(size=(5, 5))
  b = rng.normal(size=(40, 2, 4))
  m = cka.cka_matrix(a)
  np.testing.assert_allclose(np.diag(m), np.ones(3), atol=1e-12)
  np.testing.assert_allclose(m, m.T)
  ab = cka.cka_matrix(a, b)
  assert ab.shape == (3, 2)
  for i in range(3):
    for j in range(2):
      assert ab[i, j] == pytest.approx(cka.linear_cka(a[:, i], b[:, j]), abs=1e-12)
  with pytest.raises(ValueError, match="same examples"):
    cka.linear_cka(np.ones((4, 2)), np.ones((5, 2)))


def test_tokens_become_rows():
  f = np.arange(2 * 3 * 4 * 5).reshape(2, 3, 4, 5)            # [B, depth, L, D]
  rows = cka.as_rows(f)
  assert rows.shape == (8, 3, 5)
  np.testing.assert_array_equal(rows[4 + 2, 1], f[1, 1, 2])    # image 1, token 2, layer 1


# ----------------------------------------------------------------------------- CLI end to end

DEPTH, HEADS = 3, 2   # tiny ViT 'mu' (2 heads) with 3 blocks, so [depth, heads] is not square


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
  """A tiny MAE trained 2 steps, and the same model's random-init run (0 steps, no checkpoint)."""
  root = tmp_path_factory.mktemp("analysis_runs")
  c = tiny_config("mae", total_steps=2, ckpt_every=2, **{"model.depth": DEPTH})
  c.evals = {}
  trained, init = str(root / "trained"), str(root / "init")
  train.train_and_evaluate(c, trained, devices=jax.devices()[:1], progress=False)
  # What `mim_jax.main --config.total_epochs=0` leaves: the config and no checkpoint (the
  # analysis then uses the seeded initialisation, as that run's evaluation did).
  c0 = tiny_config("mae", total_steps=0, total_epochs=0.0, **{"model.depth": DEPTH})
  c0.evals = {}
  os.makedirs(init)
  with open(os.path.join(init, "config.json"), "w") as f:
    f.write(c0.to_json_best_effort(indent=2))
  return trained, init, root


def _png_ok(path):
  with open(path, "rb") as f:
    assert f.read(8) == b"\x89PNG\r\n\x1a\n"
  with Image.open(path) as im:
    im.verify()
  with Image.open(path) as im:
    assert im.size[0] > 200 and im.size[1] > 200


def test_cli_both_analyses_of_trained_run_against_random_init(runs, capsys):
  trained, init, root = runs
  out = str(root / "out")
  rc = analysis.main(["all", "--workdir", trained, "--workdir2", init, "--num_images", "24",
                      "--batch_size", "16", "--pooling", "tokens", "--out", out])
  assert rc == 0, capsys.readouterr().err
  for name in ("attention", "cka_tokens"):
    _png_ok(os.path.join(out, f"{name}.png"))
  with open(os.path.join(out, "attention.json")) as f:
    att = json.load(f)
  with open(os.path.join(out, "cka_tokens.json")) as f:
    sim = json.load(f)

  for res in (att, sim):
    assert res["step"] == 2 and [m["step"] for m in res["models"]] == [2, 0]
    trained_model, init_model = res["models"]
    assert trained_model["checkpoint"].endswith(os.path.join("checkpoints", "2"))
    assert init_model["checkpoint"].startswith("none")          # the 0-step run: its init
    proto = res["protocol"]
    assert proto["num_images"] == 24 and proto["split"] == "eval" and proto["checkpoint_steps"] == [2, 0]

  assert att["analysis"] == "attention" and "renormalised" in att["protocol"]["cls_token"]
  assert set(att["protocol"]["definitions"]) >= {"attention_distance", "attention_entropy", "head_kl",
                                                 "head_diversity"}
  for m in att["models"]:
    assert (m["depth"], m["heads"], m["grid"], m["patch_size"]) == (DEPTH, HEADS, 8, 4)
    for key in ("attention_distance", "attention_entropy", "head_kl", "cls_attention_mass"):
      assert np.asarray(m[key]).shape == (DEPTH, HEADS), key
    assert np.asarray(m["head_diversity"]).shape == (DEPTH,)
    # 32-px images, patch 4: an 8x8 grid, so 0 < distance < its diagonal, entropy <= log 64.
    d, e = np.asarray(m["attention_distance"]), np.asarray(m["attention_entropy"])
    assert ((d > 0) & (d < attention.pixel_distances(8, 4).max())).all()
    assert ((e > 0) & (e <= math.log(64) + 1e-5)).all()
    np.testing.assert_allclose(m["head_diversity"], np.asarray(m["head_kl"]).mean(1), rtol=1e-6)

  assert sim["analysis"] == "cka" and sim["pooling"] == "tokens"
  assert sim["protocol"]["rows"] == 24 * 64                    # (image, patch) pairs
  for m in sim["models"]:
    mat = np.asarray(m["cka"])
    assert mat.shape == (DEPTH, DEPTH)
    np.testing.assert_allclose(np.diag(mat), 1.0, atol=1e-9)
    np.testing.assert_allclose(mat, mat.T, atol=1e-12)
  between = np.asarray(sim["between"])
  assert between.shape == (DEPTH, DEPTH) and ((between > 0) & (between < 1)).all()


def test_cli_errors_are_one_line_with_exit_code_2(runs, tmp_path, capsys):
  trained, _, _ = runs
  empty = tmp_path / "empty"
  empty.mkdir()
  assert analysis.main(["attention", "--workdir", str(empty)]) == 2
  err = capsys.readouterr().err.strip()
  assert err.startswith("error: ") and "config.json not found" in err and "\n" not in err
  assert not (empty / "checkpoints").exists()
  # A config that trains 2 steps but no checkpoint: not a random-init run.
  shutil.copy(os.path.join(trained, "config.json"), empty / "config.json")
  assert analysis.main(["cka", "--workdir", str(empty)]) == 2
  err = capsys.readouterr().err.strip()
  assert err.startswith("error: no checkpoint in") and "\n" not in err
  assert analysis.main(["all", "--workdir", trained, "--step", "7"]) == 2
  assert capsys.readouterr().err.strip() == (
      f"error: no checkpoint at step 7 in {trained}/checkpoints: use one of [2]")
