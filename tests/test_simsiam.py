"""SimSiam: the negative-cosine loss as facebookresearch/simsiam's main_simsiam.train, the
stop-gradient (and its ablation), the builder's heads, weight decay on every parameter and the
--fix-pred-lr group."""
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from helpers import load_config
from je_helpers import method_and_state, tiny_je_config
from mim_jax.methods import simsiam


def reference_loss(p1, p2, z1, z2):
  """-(CosineSimilarity(p1, z2).mean() + CosineSimilarity(p2, z1).mean()) * 0.5 in numpy."""
  cos = lambda a, b: (a * b).sum(1) / np.maximum(np.linalg.norm(a, axis=1), 1e-8) / \
      np.maximum(np.linalg.norm(b, axis=1), 1e-8)  # noqa: E731
  return -(cos(p1, z2).mean() + cos(p2, z1).mean()) * 0.5


def test_loss_equals_the_official_formula_by_hand():
  rng = np.random.default_rng(0)
  p1, p2, z1, z2 = (rng.normal(size=(6, 5)) for _ in range(4))
  got = float(simsiam.simsiam_loss(*map(jnp.asarray, (p1, p2, z1, z2))))
  np.testing.assert_allclose(got, reference_loss(p1, p2, z1, z2), rtol=1e-5)
  e = jnp.eye(2)
  # p1 = z2 and p2 = -z1: (1 + -1) / 2 -> 0; all aligned: -1.
  assert float(simsiam.simsiam_loss(e[:1], -e[1:], e[1:], e[:1])) == pytest.approx(0.0, abs=1e-6)
  assert float(simsiam.simsiam_loss(e, e, e, e)) == pytest.approx(-1.0)


@pytest.mark.parametrize("stop", [True, False])
def test_gradient_into_the_projections_only_without_stop_gradient(stop):
  rng = np.random.default_rng(1)
  p1, p2, z1, z2 = (jnp.asarray(rng.normal(size=(4, 3))) for _ in range(4))
  gz = jax.grad(lambda z: simsiam.simsiam_loss(p1, p2, z[0], z[1], stop))((z1, z2))
  gmax = max(float(jnp.abs(g).max()) for g in gz)
  assert (gmax == 0.0) == stop, gmax
  gp = jax.grad(lambda p: simsiam.simsiam_loss(p, p2, z1, z2, stop))(p1)
  assert float(jnp.abs(gp).max()) > 0


def test_method_loss_and_the_stop_gradient_switch():
  c = tiny_je_config("simsiam")
  m, params, state, views = method_and_state(c)
  rng = jax.random.PRNGKey(0)
  loss, aux = m.loss(params, state, views, rng, jnp.int32(0))
  (o1, o2), _ = m.embed_views(params, state["collections"], m.split_views(views),
                              heads=("projector", "predictor"), rng=rng)
  want = reference_loss(*(np.asarray(x) for x in (o1["predictor"], o2["predictor"],
                                                 o1["projector"], o2["projector"])))
  np.testing.assert_allclose(float(loss), want, rtol=1e-5)
  assert "collections" in aux and "collapse_std" in aux
  # Without stop-gradient the same forward sends extra gradient into the projector (and the
  # encoder); the predictor's gradient is unchanged.
  m2, *_ = method_and_state(tiny_je_config("simsiam", **{"simsiam.stop_gradient": False}))
  g1 = jax.jit(jax.grad(lambda p: m.loss(p, state, views, rng, jnp.int32(0))[0]))(params)
  g2 = jax.jit(jax.grad(lambda p: m2.loss(p, state, views, rng, jnp.int32(0))[0]))(params)
  for a, b in zip(jax.tree.leaves(g1["predictor"]), jax.tree.leaves(g2["predictor"])):
    np.testing.assert_allclose(np.asarray(a), np.asarray(b), rtol=1e-5, atol=1e-7)
  diff = max(float(jnp.abs(a - b).max()) for a, b in
             zip(jax.tree.leaves(g1["projector"]), jax.tree.leaves(g2["projector"])))
  assert diff > 1e-6


def test_heads_are_the_builders():
  assert simsiam.projector_layers(2048, 2048) == (
      (2048, False, "affine"), (2048, False, "affine"), (2048, False, "plain"))
  assert simsiam.predictor_layers(512, 2048) == ((512, False, "affine"), (2048, True, ""))
  c = tiny_je_config("simsiam", **{"simsiam.proj_hidden_dim": 0})
  m, params, *_ = method_and_state(c)
  width = m.feature_width()
  assert params["projector"]["fc0"]["kernel"].shape == (width, width)
  assert "bias" not in params["projector"]["fc2"] and "bn2" not in params["projector"]
  assert "bias" in params["predictor"]["fc1"] and "bias" not in params["predictor"]["fc0"]


def test_every_parameter_decays_and_fix_pred_lr():
  m, params, *_ = method_and_state(tiny_je_config("simsiam", **{"simsiam.fix_pred_lr": True}))
  assert all(jax.tree.leaves(m.decay_mask(params)))
  assert m.param_groups() == (("^predictor/", {"constant_lr": True}),)
  c = load_config("simsiam", "imagenet")
  assert c.simsiam.fix_pred_lr and c.optim.schedule == "cosine_epoch"
  m, *_ = method_and_state(tiny_je_config("simsiam", **{"simsiam.fix_pred_lr": False}))
  assert m.param_groups() == ()


def test_presets_carry_the_official_and_solo_learn_settings():
  c = load_config("simsiam", "imagenet")
  assert (c.optim.name, c.optim.base_lr, c.optim.momentum, c.optim.weight_decay,
          c.optim.warmup_epochs) == ("sgd", 0.05, 0.9, 1e-4, 0.0)
  assert (c.input.batch_size, c.total_epochs, c.model.zero_init_residual) == (512, 100, True)
  assert (c.simsiam.proj_hidden_dim, c.simsiam.proj_dim, c.simsiam.pred_hidden_dim) == (0, 2048, 512)
  v = c.simsiam.views
  assert tuple(v.global_scale) == (0.2, 1.0) and tuple(v.jitter) == (0.4, 0.4, 0.4, 0.1)
  assert tuple(v.blur_probs)[:2] == (0.5, 0.5) and v.solarize_prob == 0.0
  c = load_config("simsiam", "cifar10")
  assert (c.optim.base_lr, c.optim.weight_decay, c.simsiam.proj_hidden_dim) == (0.5, 1e-5, 2048)
  assert tuple(c.simsiam.views.global_scale) == (0.08, 1.0) and c.model.width == 0.25
