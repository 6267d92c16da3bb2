"""BYOL: the regression loss as deepmind-research byol's loss_fn (two directions summed), the
target (EMA on the cosine tau schedule, its own initialisation, training-mode forward), the
views forwarded one at a time, and the no-predictor switch."""
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from helpers import load_config
from je_helpers import method_and_state, tiny_je_config
from mim_jax.methods import byol


def reference_loss(p1, p2, t1, t2):
  """byol_experiment.loss_fn's repr_loss in numpy."""
  def reg(x, y):
    x = x / np.sqrt(np.maximum((x ** 2).sum(-1, keepdims=True), 1e-12))
    y = y / np.sqrt(np.maximum((y ** 2).sum(-1, keepdims=True), 1e-12))
    return ((x - y) ** 2).sum(-1)
  return np.mean(reg(p1, t2) + reg(p2, t1))


def test_loss_equals_the_official_formula_by_hand():
  rng = np.random.default_rng(0)
  p1, p2, t1, t2 = (rng.normal(size=(5, 6)) for _ in range(4))
  got = float(byol.byol_loss(*map(jnp.asarray, (p1, p2, t1, t2))))
  np.testing.assert_allclose(got, reference_loss(p1, p2, t1, t2), rtol=1e-5)
  cos = lambda a, b: (a * b).sum(-1) / np.linalg.norm(a, axis=-1) / np.linalg.norm(b, axis=-1)  # noqa: E731
  np.testing.assert_allclose(got, np.mean(2 - 2 * cos(p1, t2) + 2 - 2 * cos(p2, t1)), rtol=1e-5)
  # The two directions are summed: orthogonal pairs give 2 + 2, identical ones 0.
  e = np.eye(2)
  assert float(byol.byol_loss(jnp.asarray(e[:1]), jnp.asarray(e[:1]), jnp.asarray(e[1:]),
                              jnp.asarray(e[1:]))) == pytest.approx(4.0)
  assert float(byol.byol_loss(jnp.asarray(e), jnp.asarray(e), jnp.asarray(e),
                              jnp.asarray(e))) == pytest.approx(0.0, abs=1e-6)


def test_no_gradient_into_the_target_projections():
  rng = np.random.default_rng(1)
  p1, p2, t1, t2 = (jnp.asarray(rng.normal(size=(4, 3))) for _ in range(4))
  g = jax.grad(lambda t: byol.byol_loss(p1, p2, t[0], t[1]))((t1, t2))
  assert all(float(jnp.abs(x).max()) == 0.0 for x in g)
  gp = jax.grad(lambda p: byol.byol_loss(p, p2, t1, t2))(p1)
  assert float(jnp.abs(gp).max()) > 0


@pytest.mark.parametrize("predictor", [True, False])
def test_method_loss_pairs_online_predictions_with_target_projections(predictor):
  c = tiny_je_config("byol", **{"byol.predictor": predictor})
  m, params, state, views = method_and_state(c)
  assert ("predictor" in params) == predictor and "predictor" not in state["teacher"]
  rng = jax.random.PRNGKey(0)
  v = m.split_views(views)
  r_on, r_t = jax.random.split(rng)

  @jax.jit
  def run(params, state):
    loss, aux = m.loss(params, state, views, rng, jnp.int32(0))
    (o1, o2), _ = m.embed_views(params, state["collections"], v, heads=tuple(m.heads), rng=r_on)
    (t1, t2), _ = m.teacher_embed_views(state, v, rng=r_t)
    (o,), _ = m.embed_views(params, state["collections"], [jnp.concatenate(v)], heads=tuple(m.heads))
    return loss, aux, o1, o2, t1, t2, o

  loss, aux, o1, o2, t1, t2, o = run(params, state)
  key = "predictor" if predictor else "projector"
  want = reference_loss(*(np.asarray(x) for x in (o1[key], o2[key], t1["projector"], t2["projector"])))
  np.testing.assert_allclose(float(loss), want, rtol=1e-5)
  # Each view is its own forward: one batch of both views gives other BatchNorm statistics.
  assert not np.allclose(np.asarray(o[key][:8]), np.asarray(o1[key]), atol=1e-4)
  # The target runs in training mode: its BatchNorm running statistics move.
  bs = aux["collections"]["batch_stats"]
  for mod in ("teacher_encoder", "teacher_projector", "encoder", "projector"):
    old, new = state["collections"]["batch_stats"][mod], bs[mod]
    assert any(not np.allclose(a, b) for a, b in zip(jax.tree.leaves(old), jax.tree.leaves(new))), mod


def test_predictor_switch_uses_the_projections():
  c = tiny_je_config("byol", **{"byol.predictor": False})
  m, *_ = method_and_state(c)
  assert tuple(m.heads) == ("projector",)
  m2, *_ = method_and_state(tiny_je_config("byol"))
  assert tuple(m2.heads) == ("projector", "predictor")


def test_heads_are_the_official_mlp():
  assert byol.head_layers(4096, 256) == ((4096, True, "affine"), (256, False, ""))
  c = load_config("byol", "imagenet")
  assert (c.byol.projector_hidden_dim, c.byol.predictor_hidden_dim, c.byol.output_dim) == (4096, 4096, 256)
  assert c.byol.head_init == "haiku"


def test_tau_schedule_and_target_update():
  c = tiny_je_config("byol", **{"byol.momentum": 0.996, "total_steps": 100})
  m, params, state, _ = method_and_state(c)
  assert m.run_steps()[1] == 100
  official = lambda k: 1 - (1 - 0.996) * (np.cos(np.pi * min(k, 100) / 100) + 1) / 2  # noqa: E731
  for k, want in ((0, 0.996), (50, 0.998), (100, 1.0)):
    assert float(m.momentum(jnp.int32(k))) == pytest.approx(want, abs=1e-7)
    assert float(m.momentum(jnp.int32(k))) == pytest.approx(official(k), abs=1e-7)
  new = m.update_state(params, state, jnp.int32(50))
  t0 = np.asarray(state["teacher"]["projector"]["fc0"]["kernel"])
  o = np.asarray(params["projector"]["fc0"]["kernel"])
  np.testing.assert_allclose(np.asarray(new["teacher"]["projector"]["fc0"]["kernel"]),
                             t0 + (1 - 0.998) * (o - t0), rtol=1e-5, atol=1e-7)


def test_target_is_initialised_independently_or_copied():
  m, params, state, _ = method_and_state(tiny_je_config("byol"))
  k_on = np.asarray(params["projector"]["fc0"]["kernel"])
  k_t = np.asarray(state["teacher"]["projector"]["fc0"]["kernel"])
  assert k_on.shape == k_t.shape and not np.allclose(k_on, k_t)
  _, _, state2, _ = method_and_state(tiny_je_config("byol"))
  np.testing.assert_array_equal(k_t, np.asarray(state2["teacher"]["projector"]["fc0"]["kernel"]))
  m, params, state, _ = method_and_state(tiny_je_config("byol", **{"byol.target_init": "copy"}))
  for a, b in zip(jax.tree.leaves(params["encoder"]), jax.tree.leaves(state["teacher"]["encoder"])):
    np.testing.assert_array_equal(np.asarray(a), np.asarray(b))


def test_bad_switches_are_refused():
  with pytest.raises(ValueError, match="target_init"):
    method_and_state(tiny_je_config("byol", **{"byol.target_init": "random"}))
  with pytest.raises(ValueError, match="momentum"):
    method_and_state(tiny_je_config("byol", **{"byol.momentum": 0.0}))


def test_presets_carry_the_official_and_solo_learn_settings():
  c = load_config("byol", "imagenet")
  assert (c.optim.name, c.optim.base_lr, c.optim.weight_decay, c.optim.warmup_epochs) == ("lars", 0.2, 1.5e-6, 10)
  assert (c.input.batch_size, c.total_epochs, c.byol.momentum, c.byol.momentum_schedule) == (4096, 1000, 0.996, "cosine")
  v = c.byol.views
  assert tuple(v.global_scale) == (0.08, 1.0) and tuple(v.jitter) == (0.4, 0.4, 0.2, 0.1)
  assert tuple(v.blur_probs)[:2] == (1.0, 0.1) and v.solarize_prob == 0.2 and v.gray_prob == 0.2
  c = load_config("byol", "cifar10")
  assert (c.optim.base_lr, c.optim.weight_decay, c.byol.momentum) == (1.0, 1e-5, 0.99)
  assert tuple(c.byol.views.blur_probs) == (0.0, 0.0, 0.0) and c.model.width == 0.25
