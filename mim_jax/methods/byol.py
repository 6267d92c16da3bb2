"""BYOL: Bootstrap Your Own Latent (Grill et al., NeurIPS 2020), exact to
deepmind/deepmind-research byol/.

  * utils/networks.py `MLP` (projector and predictor): hk.Linear(hidden, with_bias=True) ->
    hk.BatchNorm (scale and offset, decay 0.9, eps 1e-5, cross-replica statistics) -> ReLU ->
    hk.Linear(out, with_bias=False); haiku's Linear init (truncated normal, std
    1/sqrt(fan_in), bias 0): head_init 'haiku'. Projector 4096 -> 256, predictor 4096 -> 256.
  * byol_experiment.py `_forward`: each view goes through encoder, projector and predictor in
    its own call (`apply_once_fn(view1)`, then view2), so BatchNorm normalises each view by
    its own (global) batch statistics; `loss_fn` runs the target network with
    is_training=True too (batch statistics, its own running statistics in target_state).
  * `loss_fn`: repr_loss = mean over the batch of regression_loss(p1, sg(z'2)) +
    regression_loss(p2, sg(z'1)), the two directions SUMMED (each 2 - 2 cos, so the loss is in
    [0, 8]); helpers.regression_loss normalises with x * rsqrt(max(sum x^2, 1e-12)):
    `regression_loss`, `byol_loss`.
  * `_update_fn`: the target (encoder + projector: the target's predictor is never used) moves
    as target + (1 - tau)(online - target) after the optimiser step with
    schedules.target_ema: tau = 1 - (1 - base_ema)(cos(pi k / K) + 1) / 2, k the step before
    it is incremented (momentum_schedule 'cosine' of the base).
  * `_make_initial_state`: online and target are initialised from DIFFERENT random keys
    (target_init 'independent'; 'copy' starts the target as a copy of the online network, as
    most PyTorch re-implementations).
  * byol.predictor=False: BYOL without the predictor (the paper's ablation): the loss compares
    the online projections with the target's.
"""
from __future__ import annotations

import jax
import jax.numpy as jnp

from mim_jax.methods.joint_embedding import JointEmbedding, collapse_monitor

TARGET_INITS = ("independent", "copy")
# Folded into PRNGKey(config.seed) for the independently initialised target.
TARGET_INIT_KEY = 0xB701


def byol_normalize(x: jax.Array, eps: float = 1e-12) -> jax.Array:
  """helpers.l2_normalize: x * rsqrt(max(sum(x^2), eps)) along the last axis, float32."""
  x = x.astype(jnp.float32)
  return x * jax.lax.rsqrt(jnp.maximum(jnp.sum(jnp.square(x), axis=-1, keepdims=True), eps))


def regression_loss(x: jax.Array, y: jax.Array) -> jax.Array:
  """helpers.regression_loss: ||x/|x| - y/|y|||^2 per example (= 2 - 2 cos(x, y)), [B]."""
  return jnp.sum(jnp.square(byol_normalize(x) - byol_normalize(y)), axis=-1)


def byol_loss(p1: jax.Array, p2: jax.Array, t1: jax.Array, t2: jax.Array) -> jax.Array:
  """byol_experiment.loss_fn's repr_loss: mean_i [regression_loss(p1_i, sg t2_i) +
  regression_loss(p2_i, sg t1_i)], p the online predictions of views 1 and 2, t the target
  projections."""
  t1, t2 = jax.lax.stop_gradient(t1), jax.lax.stop_gradient(t2)
  return jnp.mean(regression_loss(p1, t2) + regression_loss(p2, t1))


def head_layers(hidden: int, out: int) -> tuple:
  """networks.MLP as `joint_embedding.MLP` layers: Linear+bias, BN, ReLU, Linear no bias."""
  return ((int(hidden), True, "affine"), (int(out), False, ""))


class BYOL(JointEmbedding):
  name = "byol"
  teacher_heads = ("projector",)

  def __init__(self, config):
    super().__init__(config)
    if self.momentum_base <= 0:
      raise ValueError(f"byol.momentum={self.momentum_base}: BYOL's target needs a momentum in "
                       f"(0, 1] (official 0.996)")
    if str(self.c.get("target_init", "independent")) not in TARGET_INITS:
      raise ValueError(f"byol.target_init={self.c.target_init!r}: use one of {TARGET_INITS}")

  @property
  def use_predictor(self) -> bool:
    return bool(self.c.get("predictor", True))

  def head_modules(self):
    c = self.c
    heads = {"projector": self.mlp(head_layers(c.projector_hidden_dim, c.output_dim))}
    if self.use_predictor:
      heads["predictor"] = self.mlp(head_layers(c.predictor_hidden_dim, c.output_dim))
    return heads

  def initial_state(self, variables):
    """The base state; with target_init 'independent' the target's parameters come from their
    own initialisation (byol_experiment._make_initial_state's rng_target)."""
    state = super().initial_state(variables)
    if str(self.c.get("target_init", "independent")) == "independent":
      key = jax.random.fold_in(jax.random.PRNGKey(int(self.config.get("seed", 0))), TARGET_INIT_KEY)
      other = self.init_variables(key, self.init_input())["params"]
      state["teacher"] = {n: other[n] for n in self.teacher_names()}
    return state

  def loss(self, params, state, images, rng, step):
    views = self.split_views(images)
    r_online, r_target = jax.random.split(rng)
    heads = tuple(self.heads)
    (o1, o2), cols = self.embed_views(params, state.get("collections"), views, heads=heads,
                                      rng=r_online)
    (t1, t2), tcols = self.teacher_embed_views(state, views, rng=r_target)
    key = "predictor" if self.use_predictor else "projector"
    loss = byol_loss(o1[key], o2[key], t1["projector"], t2["projector"])
    aux = {**collapse_monitor(o1["projector"]), "tau": self.momentum(step)}
    cols = self.merged(cols, tcols)
    if cols:
      aux["collections"] = cols
    return loss, aux
