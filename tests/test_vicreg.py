"""VICReg: the invariance, variance and covariance terms of facebookresearch/vicreg
main_vicreg.py by hand, over the whole batch; the expander; the views forwarded one at a time;
the coefficients as keys; the official ImageNet recipe and schedule."""
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from helpers import load_config
from je_helpers import method_and_state, tiny_je_config
from mim_jax.methods import barlow_twins as bt
from mim_jax.methods import vicreg
from test_barlow_twins import assert_official_schedule


def ref_terms(x, y):
  """main_vicreg.py VICReg.forward's three terms (one replica holding the global batch)."""
  n, d = x.shape
  sim = np.mean((x - y) ** 2)
  xc, yc = x - x.mean(0), y - y.mean(0)
  std = lambda z: np.sqrt(z.var(0, ddof=1) + 1e-4)   # noqa: E731  torch's var: unbiased
  var = np.mean(np.maximum(1 - std(xc), 0)) / 2 + np.mean(np.maximum(1 - std(yc), 0)) / 2
  def off(z):
    cov = z.T @ z / (n - 1)
    return (np.sum(cov ** 2) - np.sum(np.diag(cov) ** 2)) / d
  return sim, var, off(xc) + off(yc)


def ref_loss(x, y, coeffs=(25.0, 25.0, 1.0)):
  return sum(c * t for c, t in zip(coeffs, ref_terms(x, y)))


def test_each_term_equals_the_official_by_hand():
  rng = np.random.default_rng(0)
  x, y = rng.normal(size=(7, 5)) * 0.5, rng.normal(size=(7, 5)) * 2 + 1
  sim, var, cov = ref_terms(x, y)
  X, Y = jnp.asarray(x), jnp.asarray(y)
  np.testing.assert_allclose(float(vicreg.invariance_loss(X, Y)), sim, rtol=1e-5)
  np.testing.assert_allclose(float(vicreg.variance_loss(X, Y)), var, rtol=1e-5)
  np.testing.assert_allclose(float(vicreg.covariance_loss(X, Y)), cov, rtol=1e-5)
  assert var > 0.1 and cov > 0.1            # x's small spread is penalised; y's is not
  loss, parts = vicreg.vicreg_loss(X, Y, 2.0, 3.0, 5.0)
  np.testing.assert_allclose(float(loss), 2 * sim + 3 * var + 5 * cov, rtol=1e-5)
  np.testing.assert_allclose([float(parts[k]) for k in ("sim_loss", "std_loss", "cov_loss")],
                             [sim, var, cov], rtol=1e-5)
  # By hand: two examples, one dimension: x = (0, 2) has unbiased variance 2, y = (1, 1) none.
  x2, y2 = jnp.asarray([[0.0], [2.0]]), jnp.asarray([[1.0], [1.0]])
  np.testing.assert_allclose(float(vicreg.invariance_loss(x2, y2)), 1.0)
  np.testing.assert_allclose(float(vicreg.variance_loss(x2, y2)),
                             0.0 + (1 - np.sqrt(1e-4)) / 2, rtol=1e-6)
  assert float(vicreg.covariance_loss(x2, y2)) == 0.0      # one dimension: no off-diagonal
  # cov of [[1, 1], [-1, -1]] / (2 - 1): off-diagonal 2 twice, over d = 2: 4 for x.
  x3 = jnp.asarray([[1.0, 1.0], [-1.0, -1.0]])
  np.testing.assert_allclose(float(vicreg.covariance_loss(x3, jnp.zeros((2, 2)))), 4.0)


def test_the_statistics_are_over_the_whole_batch():
  """The variance and covariance of two halves differ from the whole batch's (FullGatherLayer);
  the invariance term is a mean, the same."""
  rng = np.random.default_rng(1)
  x, y = rng.normal(size=(8, 4)), rng.normal(size=(8, 4))
  X, Y = jnp.asarray(x), jnp.asarray(y)
  halves = [ref_terms(x[s], y[s]) for s in (slice(0, 4), slice(4, 8))]
  np.testing.assert_allclose(float(vicreg.invariance_loss(X, Y)), np.mean([h[0] for h in halves]),
                             rtol=1e-5)
  for fn, i in ((vicreg.variance_loss, 1), (vicreg.covariance_loss, 2)):
    whole = float(fn(X, Y))
    np.testing.assert_allclose(whole, ref_terms(x, y)[i], rtol=1e-5)
    assert abs(whole - np.mean([h[i] for h in halves])) > 1e-3


def test_the_loss_reads_the_expander_of_each_view_and_the_coefficients():
  c = tiny_je_config("vicreg", **{"vicreg.sim_coeff": 3.0, "vicreg.std_coeff": 5.0,
                                  "vicreg.cov_coeff": 7.0})
  m, params, state, views = method_and_state(c)
  p = params["expander"]
  assert "bias" in p["fc0"] and "bias" in p["fc1"] and "bias" not in p["fc2"] and "bn2" not in p
  loss, aux = jax.jit(m.loss)(params, state, views, jax.random.PRNGKey(0), jnp.int32(0))
  v1, v2 = m.split_views(views)
  cols = state["collections"]
  embed = jax.jit(lambda c, v: m.embed(params, c, v, heads=("expander",)))
  o1, cols1 = embed(cols, v1)
  o2, cols2 = embed(cols1, v2)
  x, y = np.asarray(o1["expander"]), np.asarray(o2["expander"])
  np.testing.assert_allclose(float(loss), ref_loss(x, y, (3.0, 5.0, 7.0)), rtol=1e-4)
  np.testing.assert_allclose(
      aux["collections"]["batch_stats"]["encoder"]["bn1"]["running_mean"],
      cols2["batch_stats"]["encoder"]["bn1"]["running_mean"], rtol=1e-5, atol=1e-7)
  assert "sim_loss" in aux and "std_loss" in aux and "cov_loss" in aux


def test_imagenet_preset_is_the_official_recipe():
  c = load_config("vicreg", "imagenet")
  v = c.vicreg
  assert tuple(map(tuple, v.expander_layers)) == bt.projector_layers("8192-8192-8192", hidden_bias=True)
  assert (v.sim_coeff, v.std_coeff, v.cov_coeff) == (25.0, 25.0, 1.0)
  assert c.input.batch_size == 2048 and c.total_epochs == 1000 and c.model.depth == 50
  assert c.model.zero_init_residual and c.model.bn_groups == 1
  assert (c.optim.name, c.optim.base_lr, c.optim.weight_decay, c.optim.momentum) == ("lars", 0.2, 1e-6, 0.9)
  assert vicreg.VICReg.param_groups(None) == ()        # one rate for every parameter
  w = v.views
  assert tuple(w.global_scale) == (0.08, 1.0) and tuple(w.jitter) == (0.4, 0.4, 0.2, 0.1)
  assert (w.jitter_prob, w.gray_prob, w.solarize_prob) == (0.8, 0.2, 0.2)
  assert tuple(w.blur_probs[:2]) == (1.0, 0.1)
  assert_official_schedule(c)


@pytest.mark.parametrize("preset", ["", "cifar10"])
def test_cpu_presets_take_solo_learns_cifar_recipe(preset):
  c = load_config("vicreg", preset)
  w = 1024 if preset == "" else 2048
  assert tuple(map(tuple, c.vicreg.expander_layers)) == bt.projector_layers(f"{w}-{w}-{w}", hidden_bias=True)
  assert (c.optim.base_lr, c.optim.weight_decay, c.optim.min_lr) == (0.3, 1e-4, 0.0)
  assert tuple(c.vicreg.views.global_scale) == (0.2, 1.0) and c.vicreg.views.solarize_prob == 0.1
  assert tuple(c.vicreg.views.blur_probs[:2]) == (0.0, 0.0)
