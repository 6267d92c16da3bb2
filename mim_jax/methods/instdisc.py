"""InstDisc: unsupervised feature learning via non-parametric instance discrimination (Wu et
al., CVPR 2018), exact to zhirongw/lemniscate.pytorch.

Every training image is its own class. The encoder's features go through a Linear layer to
`low_dim` (128) and are L2-normalised (models/resnet.py: fc + Normalize); a memory bank holds
one such vector per training image.

  * lib/NCEAverage.py: the bank starts uniform in +-1/sqrt(low_dim / 3); per example, K noise
    indices are drawn uniformly over the N training images (the alias sampler over uniform
    unigrams) and column 0 is the example's own index; out = exp(bank[idx] . v / T) / Z, where
    Z is fixed once, at the first batch, to mean(exp(bank[idx] . v / T)) x N and kept (in the
    method state, checkpointed); no gradient into the bank or Z.
  * lib/NCECriterion.py: loss = -(sum_i log(P_i0 / (P_i0 + K / N + 1e-7)) + sum_{i, j>0}
    log((K / N) / (P_ij + K / N + 1e-7))) / B (`nce_loss`).
  * lib/LinearAverage.py (nce_k = 0): the non-parametric softmax over the whole bank,
    CE(v . bank.T / T, own index) (`nonparametric_softmax_loss`).
  * The bank update after the step (NCEFunction.backward): bank[i] = normalise(m bank[i] +
    (1 - m) v_i), m = 0.5, at the batch's dataset indices (`batch_fields = ('index',)`).
  * objective 'parametric': the paper's parametric-softmax baseline, a learned classifier over
    the N instances (no bias, on the normalised feature): no bank.
  * proximal λ > 0: the paper's proximal regularisation (Sec. 3.4), λ ||v_i - bank[i]||^2
    averaged over the batch, added to the loss; the released code has none (λ = 0).

The loss is a mean over examples and the bank and Z are read, not written, inside the step, so
gradient accumulation equals the full batch (BatchNorm statistics aside: per micro-batch).
"""
from __future__ import annotations

import math

import jax
import jax.numpy as jnp

from mim_jax.methods.joint_embedding import JointEmbedding, collapse_monitor, l2_normalize

NCE_EPS = 1e-7  # lib/NCECriterion.py eps
OBJECTIVES = ("nce", "softmax", "parametric")


def nce_loss(out: jax.Array, n_data: int) -> jax.Array:
  """NCECriterion of out [B, K + 1] (column 0 the data sample, P = exp(s / T) / Z)."""
  k = out.shape[1] - 1
  kp = k / float(n_data)
  ln_pmt = jnp.log(out[:, 0] / (out[:, 0] + kp + NCE_EPS))
  ln_pon = jnp.log(kp / (out[:, 1:] + kp + NCE_EPS))
  return -(jnp.sum(ln_pmt) + jnp.sum(ln_pon)) / out.shape[0]


def nce_scores(v: jax.Array, bank: jax.Array, idx: jax.Array, temperature: float) -> jax.Array:
  """exp(bank[idx] . v / T) [B, K + 1] for features v [B, d] and indices idx [B, K + 1]."""
  w = jax.lax.stop_gradient(bank)[idx]
  return jnp.exp(jnp.einsum("bkd,bd->bk", w, v) / temperature)


def nonparametric_softmax_loss(v: jax.Array, bank: jax.Array, index: jax.Array,
                               temperature: float) -> jax.Array:
  """LinearAverage + CrossEntropyLoss: CE(v . bank.T / T, index), the mean over the batch."""
  logits = v @ jax.lax.stop_gradient(bank).T / temperature
  return -jnp.mean(jnp.take_along_axis(jax.nn.log_softmax(logits, axis=1), index[:, None], 1))


def bank_update(bank: jax.Array, v: jax.Array, index: jax.Array, momentum: float) -> jax.Array:
  """bank[index] = normalise(m bank[index] + (1 - m) v) (NCEFunction.backward)."""
  new = l2_normalize(bank[index] * momentum + v * (1.0 - momentum))
  return bank.at[index].set(new)


class InstDisc(JointEmbedding):
  name = "instdisc"
  batch_fields = ("index",)
  accumulates_exactly = True

  def __init__(self, config):
    super().__init__(config)
    if str(self.c.objective) not in OBJECTIVES:
      raise ValueError(f"instdisc.objective={self.c.objective!r}: use one of {', '.join(OBJECTIVES)}")
    if int(self.c.views.num_global) != 1:
      raise ValueError("InstDisc sees one view per image: set instdisc.views.num_global=1")

  @property
  def n_data(self) -> int:
    from mim_jax.data import pipeline
    return int(pipeline.num_examples(self.config.input, "pretrain"))

  def head_modules(self):
    heads = {"projector": self.mlp(((int(self.c.low_dim), True, ""),))}
    if str(self.c.objective) == "parametric":
      heads["classifier"] = self.mlp(((self.n_data, False, ""),))
    return heads

  def init_state(self, params):
    state = dict(super().init_state(params))
    if str(self.c.objective) != "parametric":
      d = int(self.c.low_dim)
      stdv = 1.0 / math.sqrt(d / 3)
      key = jax.random.PRNGKey(int(self.config.seed) + 17)
      state["bank"] = jax.random.uniform(key, (self.n_data, d), jnp.float32, -stdv, stdv)
      state["z"] = jnp.float32(-1.0)
    return state

  def loss(self, params, state, images, rng, step, index=None):
    if index is None:
      raise ValueError("InstDisc reads the batch field 'index' (the examples' dataset indices)")
    c = self.c
    view = images["global"][:, 0] if isinstance(images, dict) else images
    (o,), cols = self.embed_views(params, state.get("collections"), [view.astype(jnp.float32)],
                                  heads=("projector",), rng=rng)
    v = l2_normalize(o["projector"])
    obj, t = str(c.objective), float(c.nce_t)
    aux = dict(collapse_monitor(v))
    if obj == "parametric":
      logits = self.heads["classifier"].apply({"params": params["classifier"]}, v)
      loss = -jnp.mean(jnp.take_along_axis(jax.nn.log_softmax(logits, 1), index[:, None], 1))
    elif obj == "softmax":
      loss = nonparametric_softmax_loss(v, state["bank"], index, t)
    else:
      k = int(c.nce_k)
      noise = jax.random.randint(jax.random.fold_in(rng, 7), (v.shape[0], k + 1), 0, self.n_data)
      idx = noise.at[:, 0].set(index)
      out = nce_scores(v, state["bank"], idx, t)
      z_batch = jax.lax.stop_gradient(jnp.mean(out) * self.n_data)
      z = jnp.where(state["z"] < 0, z_batch, state["z"])
      loss = nce_loss(out / z, self.n_data)
      aux["state_stats"] = {"z": z_batch}
      aux["nce_z"] = z
    if obj != "parametric":
      if float(c.proximal) > 0:
        prox = jnp.mean(jnp.sum(jnp.square(v - jax.lax.stop_gradient(state["bank"][index])), 1))
        loss = loss + float(c.proximal) * prox
        aux["proximal"] = prox
      aux["state_append"] = {"v": jax.lax.stop_gradient(v), "index": index}
    if cols:
      aux["collections"] = cols
    return loss, aux

  def update_state(self, params, state, step, stats=None, appended=None):
    state = super().update_state(params, state, step, stats)
    if appended is not None and "bank" in state:
      state = {**state, "bank": bank_update(state["bank"], appended["v"], appended["index"],
                                            float(self.c.nce_m))}
      if stats is not None and "z" in stats:
        state["z"] = jnp.where(state["z"] < 0, stats["z"], state["z"])
    return state
