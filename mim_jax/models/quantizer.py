"""Vector quantisers for the image tokenizers (mim_jax/methods/tokenizer.py).

Three codebook rules with the nearest-code assignment argmin_k |z - e_k|^2 (ties to the
lowest index, as torch.argmin / tf.argmax) and the straight-through output z + sg(e - z), and
DALL-E's relaxed categorical ('gumbel'):

  * 'straight_through' -- the VQ-VAE paper (van den Oord et al., 2017; sonnet
    `VectorQuantizer`): the codebook is a trained parameter; loss
    w * mean((e - sg z)^2) + beta * mean((sg e - z)^2), w = `codebook_weight` (1; VQGAN's
    default legacy quantizer has w = 0.25, beta = 1).
  * 'ema' -- sonnet `VectorQuantizerEMA` (VQ-VAE paper, appendix A.1): the codebook is method
    state, updated from each batch's per-code counts n_k and sums s_k of assigned encoder
    outputs by sonnet's debiased moving averages (hidden h <- h - (h - x)(1 - decay), average
    h / (1 - decay^t), hidden starting at zero), Laplace-smoothed counts
    N_k = (N_k + eps) / (N + K eps) * N, e_k = S_k / N_k; loss beta * mean((sg e - z)^2).
  * 'norm_ema' -- BEiT v2's `NormEMAVectorQuantizer` (microsoft/unilm beit2/norm_ema_quantizer.py):
    encoder outputs and codes are l2-normalised (the distance is then a cosine), each used code
    moves to l2norm(decay * e_k + (1 - decay) * l2norm(s_k / n_k)), unused codes stay; optional
    k-means initialisation (cosine, 10 iterations, on the first batch); loss
    beta * mean((sg e - z)^2) with beta = 1.
  * 'gumbel' -- the DALL-E dVAE (Ramesh et al., 2021, section 2.1 and appendix A.2; openai/DALL-E
    dall_e/encoder.py, decoder.py): z holds the encoder's logits over the K codes at each
    position, q(z|x) = softmax(logits). Training decodes the gumbel-softmax relaxed sample
    y = softmax((logits + g) / tau), g ~ Gumbel(0, 1), embedded by the codebook [K, D] (the
    decoder's first 1x1 convolution of a one-hot map: y @ E; here without its bias, which the
    decoder's next convolution carries; E ~ N(0, 1/K), DALL-E's init), in the forward and the
    backward pass (no straight-through). Loss beta_t * mean_positions KL(q(z|x) || U(K)) /
    `kl_divisor`, KL = sum_k q_k log(K q_k) = log K - H(q). DALL-E divides its whole loss by
    the number of pixel values (256 x 256 x 3), so that its KL summed over the 32 x 32 grid
    weighs beta / 192; with a reconstruction loss that is a mean over pixel values, the same
    balance is a per-position-mean KL over `kl_divisor` = pixel values per token (p x p x 3 at
    patch p; 192 at DALL-E's 8). Schedules, cosine as in the paper's appendix A.2
    (`cosine_ramp`): tau from `tau_start` to `tau_end` over the first `tau_steps` updates
    (DALL-E: 1 -> 1/16 over 150,000; linear annealing diverged there), beta from 0 to
    `kl_weight` over the first `kl_steps` (DALL-E: 6.6 over 5,000), both constant afterwards;
    `step` is the number of updates done before the current one. Ids (`ids`, the tokens a
    consumer reads) are argmax_k logits: hard and deterministic, no noise (DALL-E section 2.2).
    Dead-code restarts do not apply (`restart_after` is ignored; OpenAI: training with the
    relaxation obviates tricks like dead-code revival) and there is no method state.

The EMA rules update the method state in `Quantizer.update` from batch statistics the loss
returns (`QuantizeOut.stats`): counts and sums PER IMAGE of the loss's batch. The trainer
averages them over gradient-accumulation micro-batches, and `update` multiplies by the global
batch size, so counts, sums and their ratios are those of the whole batch under accumulation
and under any sharding.

Dead-code restarts (`restart_after` > 0, any rule but 'gumbel'; not in the reference codes): a
code unused for `restart_after` consecutive steps is replaced by a random encoder output of the
current batch (one drawn uniformly per code by the loss). For 'ema' its moving averages restart at
count 1 and sum = that vector (OpenAI Jukebox's rule); for 'norm_ema' the vector is
l2-normalised; for 'straight_through' the codebook is a parameter, which only the optimiser
changes, so the state keeps an offset added to it (offset_k = v - e_k at the restart: the
effective code is v, and the gradient keeps moving it afterwards). Under gradient accumulation
the restart vector is the mean of one draw per micro-batch.
"""
from __future__ import annotations

import dataclasses
import math
from typing import Any, NamedTuple, Optional

import jax
import jax.numpy as jnp

PyTree = Any
KINDS = ("straight_through", "ema", "norm_ema", "gumbel")


def l2norm(x: jax.Array, eps: float = 1e-12) -> jax.Array:
  """x / max(|x|, eps) along the last axis (torch.nn.functional.normalize)."""
  norm = jnp.sqrt(jnp.sum(x * x, axis=-1, keepdims=True))
  return x / jnp.maximum(norm, eps)


def nearest_code(z: jax.Array, codebook: jax.Array) -> jax.Array:
  """z [N, D], codebook [K, D] -> int32 [N]: argmin_k |z|^2 + |e_k|^2 - 2 z.e_k."""
  d = (jnp.sum(z * z, axis=1, keepdims=True) + jnp.sum(codebook * codebook, axis=1)[None]
       - 2.0 * z @ codebook.T)
  return jnp.argmin(d, axis=1).astype(jnp.int32)


def code_counts(ids: jax.Array, num_codes: int) -> jax.Array:
  """How many entries of `ids` (any shape) hold each code: float32 [K]."""
  return jnp.zeros((num_codes,), jnp.float32).at[ids.reshape(-1)].add(1.0)


def code_sums(z: jax.Array, ids: jax.Array, num_codes: int) -> jax.Array:
  """Sum of the rows of z [N, D] assigned to each code: [K, D]."""
  return jax.ops.segment_sum(z, ids, num_segments=num_codes)


def usage(counts: jax.Array) -> jax.Array:
  """Fraction of the codebook used at least once."""
  return jnp.mean((counts > 0).astype(jnp.float32))


def perplexity(counts: jax.Array) -> jax.Array:
  """exp(entropy) of the average code assignment (sonnet / taming: + 1e-10 inside the log)."""
  p = counts / jnp.maximum(jnp.sum(counts), 1e-12)
  return jnp.exp(-jnp.sum(p * jnp.log(p + 1e-10)))


def straight_through(z: jax.Array, q: jax.Array) -> jax.Array:
  """q in the forward pass, identity gradient to z in the backward pass."""
  return z + jax.lax.stop_gradient(q - z)


def vq_losses(z: jax.Array, q: jax.Array) -> tuple[jax.Array, jax.Array]:
  """(codebook loss mean((q - sg z)^2), commitment loss mean((sg q - z)^2))."""
  sg = jax.lax.stop_gradient
  return jnp.mean((q - sg(z)) ** 2), jnp.mean((sg(q) - z) ** 2)


def cosine_ramp(step, start: float, end: float, steps: int) -> jax.Array:
  """The half-cosine from `start` at step 0 to `end` at `steps`, then `end`:
  end + (start - end) (1 + cos(pi min(step, steps) / steps)) / 2 (`end` throughout if steps <= 0).
  DALL-E anneals its temperature, KL weight and step size this way (appendix A.2)."""
  if steps <= 0:
    return jnp.asarray(end, jnp.float32)
  t = jnp.clip(jnp.asarray(step, jnp.float32) / float(steps), 0.0, 1.0)
  return end + (start - end) * 0.5 * (1.0 + jnp.cos(jnp.pi * t))


def gumbel_softmax(logits: jax.Array, noise: jax.Array, tau) -> jax.Array:
  """The relaxed one-hot sample softmax((logits + noise) / tau) over the last axis; with
  noise ~ Gumbel(0, 1) it tends to one_hot(argmax(logits + noise)) as tau -> 0."""
  return jax.nn.softmax((logits + noise) / tau, axis=-1)


def kl_to_uniform(logits: jax.Array) -> jax.Array:
  """KL(softmax(logits) || uniform over the K codes) along the last axis:
  sum_k q_k (log q_k + log K) = log K - entropy(q), in nats."""
  logq = jax.nn.log_softmax(logits.astype(jnp.float32), axis=-1)
  return jnp.sum(jnp.exp(logq) * (logq + math.log(logits.shape[-1])), axis=-1)


def kmeans(rng: jax.Array, samples: jax.Array, num_clusters: int, iters: int = 10,
           cosine: bool = True) -> jax.Array:
  """BEiT v2's `kmeans`: means start at distinct random samples (with replacement when there
  are fewer samples than clusters); each iteration assigns every sample to the most similar
  mean (dot product if `cosine`, else negative squared distance), moves each mean to its
  samples' average (l2-normalised if `cosine`) and keeps the means that got no sample."""
  n = samples.shape[0]
  if n >= num_clusters:
    idx = jax.random.permutation(rng, n)[:num_clusters]
  else:
    idx = jax.random.randint(rng, (num_clusters,), 0, n)
  means = samples[idx]

  def step(_, means):
    if cosine:
      sim = samples @ means.T
    else:
      sim = -(jnp.sum(samples ** 2, 1, keepdims=True) + jnp.sum(means ** 2, 1)[None]
              - 2.0 * samples @ means.T)
    buckets = jnp.argmax(sim, axis=1)
    bins = code_counts(buckets, num_clusters)
    new = code_sums(samples, buckets, num_clusters) / jnp.maximum(bins, 1.0)[:, None]
    if cosine:
      new = l2norm(new)
    return jnp.where((bins == 0)[:, None], means, new)

  return jax.lax.fori_loop(0, iters, step, means)


def sonnet_uniform(key, shape, dtype=jnp.float32):
  """sonnet's VarianceScaling(distribution='uniform') on its [D, K] embeddings (fan_in = D):
  U(-sqrt(3 / D), sqrt(3 / D)); stored here as [K, D]."""
  limit = math.sqrt(3.0 / shape[-1])
  return jax.random.uniform(key, shape, dtype, -limit, limit)


class QuantizeOut(NamedTuple):
  quantized: jax.Array      # straight-through output, the shape of z ('gumbel': y @ E, [..., D])
  ids: jax.Array            # int32, z's shape without the last axis
  loss: jax.Array           # the quantiser's loss terms (see the module docstring)
  stats: dict               # batch statistics for `Quantizer.update` ({} if none needed)
  metrics: dict             # codebook_usage, perplexity


@dataclasses.dataclass(frozen=True)
class Quantizer:
  """A codebook of `codebook_size` codes of `dim` channels, updated by rule `kind`."""
  kind: str
  codebook_size: int
  dim: int
  beta: float = 0.25              # commitment cost
  codebook_weight: float = 1.0    # 'straight_through': weight of the codebook loss
  decay: float = 0.99             # 'ema', 'norm_ema'
  epsilon: float = 1e-5           # 'ema': Laplace smoothing of the counts
  kmeans_init: bool = False       # 'norm_ema'
  kmeans_iters: int = 10
  restart_after: int = 0          # dead-code restarts; 0 = off ('gumbel': ignored)
  init_seed: int = 0              # the state's initial codebook (init_state has no rng)
  tau_start: float = 1.0          # 'gumbel': relaxation temperature at step 0 ...
  tau_end: float = 1.0 / 16       # ... annealed (cosine) to this ...
  tau_steps: int = 150_000        # ... over this many updates (DALL-E's values)
  kl_weight: float = 6.6          # 'gumbel': final KL weight beta (DALL-E), from 0 ...
  kl_steps: int = 5_000           # ... over this many updates (cosine)
  kl_divisor: float = 1.0         # 'gumbel': the KL term is divided by this (module docstring)

  def __post_init__(self):
    if self.kind not in KINDS:
      raise ValueError(f"unknown quantizer {self.kind!r}: set config.tokenizer.quantizer to one of {KINDS}")
    if self.kmeans_init and self.kind != "norm_ema":
      raise ValueError("k-means initialisation is BEiT v2's, for quantizer='norm_ema': set "
                       "config.tokenizer.kmeans_init=False")
    if self.kind == "gumbel":
      if not (self.tau_start > 0 and self.tau_end > 0):
        raise ValueError(f"the gumbel-softmax temperature must stay positive: set "
                         f"config.tokenizer.gumbel.tau_start and .tau_end > 0 (got "
                         f"{self.tau_start}, {self.tau_end}; DALL-E: 1 and 1/16)")
      if self.kl_weight < 0:
        raise ValueError(f"config.tokenizer.gumbel.kl_weight must be >= 0 (DALL-E: 6.6), got "
                         f"{self.kl_weight}")
      if self.kl_divisor <= 0:
        raise ValueError(f"Quantizer(kl_divisor={self.kl_divisor}): pass the (positive) number "
                         f"of target values per token")

  @property
  def normalized(self) -> bool:
    return self.kind == "norm_ema"

  @property
  def restarts(self) -> int:
    """Steps before a dead code restarts (0: never; always 0 for 'gumbel')."""
    return 0 if self.kind == "gumbel" else self.restart_after

  @property
  def logit_dim(self) -> int:
    """Channels of the encoder output this quantiser reads: K logits ('gumbel') or D."""
    return self.codebook_size if self.kind == "gumbel" else self.dim

  def temperature(self, step) -> jax.Array:
    """'gumbel': the relaxation temperature for the update after `step` updates."""
    return cosine_ramp(step, self.tau_start, self.tau_end, self.tau_steps)

  def kl_weight_at(self, step) -> jax.Array:
    """'gumbel': the KL weight beta for the update after `step` updates (0 at step 0)."""
    return cosine_ramp(step, 0.0, self.kl_weight, self.kl_steps)

  # -- parameters and state -----------------------------------------------------------------
  def init_params(self, rng: jax.Array) -> dict:
    if self.kind == "straight_through":
      return {"codebook": sonnet_uniform(rng, (self.codebook_size, self.dim))}
    if self.kind == "gumbel":     # DALL-E's Conv2d init of the 1x1 conv from K channels
      k = self.codebook_size
      return {"codebook": jax.random.normal(rng, (k, self.dim), jnp.float32) / math.sqrt(k)}
    return {}

  def init_state(self, params: dict) -> dict:
    k, d = self.codebook_size, self.dim
    key = jax.random.fold_in(jax.random.PRNGKey(self.init_seed), 0x0C0DE)
    state = {}
    if self.kind == "ema":
      state.update(codebook=sonnet_uniform(key, (k, d)), ema_count=jnp.zeros((k,), jnp.float32),
                   ema_sum=jnp.zeros((k, d), jnp.float32), ema_steps=jnp.zeros((), jnp.int32))
    elif self.kind == "norm_ema":
      # BEiT v2: l2norm(randn) without k-means; zeros (filled by k-means) with it.
      cb = jnp.zeros((k, d)) if self.kmeans_init else l2norm(jax.random.normal(key, (k, d)))
      state.update(codebook=cb, initted=jnp.asarray(not self.kmeans_init))
    elif self.restarts:
      state["codebook_offset"] = jnp.zeros((k, d), jnp.float32)
    if self.restarts:
      state["unused_steps"] = jnp.zeros((k,), jnp.int32)
    return state

  def codebook(self, params: dict, state: dict) -> jax.Array:
    """The codes in use [K, D]."""
    if self.kind == "gumbel":
      return params["codebook"]
    if self.kind == "straight_through":
      cb = params["codebook"]
      return cb + state["codebook_offset"] if "codebook_offset" in state else cb
    return state["codebook"]

  # -- the forward pass ---------------------------------------------------------------------
  def prepare(self, z: jax.Array) -> jax.Array:
    """The vectors that get quantised: float32, l2-normalised for 'norm_ema'."""
    z = z.astype(jnp.float32)
    return l2norm(z) if self.normalized else z

  def ids(self, params: dict, state: dict, z: jax.Array) -> jax.Array:
    """Code ids of z [..., D] (no statistics, no k-means): int32 [...]; for 'gumbel', z are
    logits [..., K] and the ids their argmax (ties to the lowest index)."""
    if self.kind == "gumbel":
      return jnp.argmax(self.prepare(z), axis=-1).astype(jnp.int32)
    flat = self.prepare(z).reshape(-1, self.dim)
    return nearest_code(flat, self.codebook(params, state)).reshape(z.shape[:-1])

  def __call__(self, params: dict, state: dict, z: jax.Array, rng: jax.Array,
               num_images: Optional[int] = None, step=None) -> QuantizeOut:
    """Quantises z [B, ..., D]; `num_images` (default B) is what the statistics are per.
    'gumbel' reads logits [B, ..., K] and the number of updates done, `step` (its schedules);
    with step=None it decodes the argmax codes, without noise (pictures, evaluation)."""
    if self.kind == "gumbel":
      return self._relaxed(params, z, rng, step)
    z = self.prepare(z)
    flat = z.reshape(-1, self.dim)
    num_images = z.shape[0] if num_images is None else num_images
    r_init, r_restart = jax.random.split(rng)
    cb = self.codebook(params, state)
    if self.kmeans_init:
      cb = jax.lax.cond(state["initted"], lambda: cb,
                        lambda: kmeans(r_init, jax.lax.stop_gradient(flat), self.codebook_size,
                                       self.kmeans_iters, cosine=True))
    ids = nearest_code(jax.lax.stop_gradient(flat), jax.lax.stop_gradient(cb))
    q = cb[ids]
    codebook_loss, commitment = vq_losses(flat, q)
    if self.kind == "straight_through":
      loss = self.codebook_weight * codebook_loss + self.beta * commitment
    else:
      loss = self.beta * commitment
    counts = code_counts(ids, self.codebook_size)
    stats = {}
    sg_flat = jax.lax.stop_gradient(flat)
    if self.kind != "straight_through":
      stats["counts"] = counts / num_images
      stats["sums"] = code_sums(sg_flat, ids, self.codebook_size) / num_images
    if self.kmeans_init:
      stats["init_codebook"] = jax.lax.stop_gradient(cb)
    if self.restarts:
      stats.setdefault("counts", counts / num_images)
      pick = jax.random.randint(r_restart, (self.codebook_size,), 0, flat.shape[0])
      stats["candidates"] = sg_flat[pick]
    out = straight_through(flat, q).reshape(z.shape)
    metrics = {"codebook_usage": usage(counts), "perplexity": perplexity(counts)}
    return QuantizeOut(out, ids.reshape(z.shape[:-1]), loss, stats, metrics)

  def _relaxed(self, params: dict, logits: jax.Array, rng: jax.Array, step) -> QuantizeOut:
    """'gumbel': the embedded relaxed sample (noise jax.random.gumbel(rng, logits.shape)) and
    beta_t * mean KL(q || U) / kl_divisor; hard one-hot codes when step is None."""
    logits = self.prepare(logits)
    if logits.shape[-1] != self.codebook_size:
      raise ValueError(f"the gumbel quantiser reads {self.codebook_size} logits per position, "
                       f"got {logits.shape[-1]}: the encoder's code layer must output "
                       f"config.tokenizer.codebook_size channels")
    ids = jnp.argmax(logits, axis=-1).astype(jnp.int32)
    cb = params["codebook"]
    if step is None:
      tau, beta = jnp.float32(0.0), jnp.float32(self.kl_weight)
      sample = jax.nn.one_hot(ids, self.codebook_size, dtype=jnp.float32)
    else:
      tau, beta = self.temperature(step), self.kl_weight_at(step)
      sample = gumbel_softmax(logits, jax.random.gumbel(rng, logits.shape, jnp.float32), tau)
    out = jnp.einsum("...k,kd->...d", sample, cb)
    kl = jnp.mean(kl_to_uniform(logits))
    loss = beta * kl / self.kl_divisor
    counts = code_counts(ids, self.codebook_size)
    metrics = {"codebook_usage": usage(counts), "perplexity": perplexity(counts), "kl": kl,
               "temperature": tau, "kl_weight": beta}
    return QuantizeOut(out, ids, loss, {}, metrics)

  # -- the state update ---------------------------------------------------------------------
  def update(self, params: dict, state: dict, stats: Optional[dict], batch_size: int) -> dict:
    """The state after one optimiser step, from the batch statistics of `__call__` (averaged
    over micro-batches) and the global batch size; `params` are the updated parameters."""
    if not stats:
      return state
    state = dict(state)
    counts = stats["counts"] * batch_size
    if self.kind == "ema":
      one_minus = 1.0 - self.decay
      t = state["ema_steps"] + 1
      hidden_n = state["ema_count"] - (state["ema_count"] - counts) * one_minus
      hidden_s = state["ema_sum"] - (state["ema_sum"] - stats["sums"] * batch_size) * one_minus
      debias = 1.0 - jnp.power(jnp.float32(self.decay), t.astype(jnp.float32))
      avg_n, avg_s = hidden_n / debias, hidden_s / debias
      n = jnp.sum(avg_n)
      smoothed = (avg_n + self.epsilon) / (n + self.codebook_size * self.epsilon) * n
      state.update(codebook=avg_s / smoothed[:, None], ema_count=hidden_n, ema_sum=hidden_s,
                   ema_steps=t)
    elif self.kind == "norm_ema":
      base = state["codebook"]
      if self.kmeans_init:
        base = jnp.where(state["initted"], base, l2norm(stats["init_codebook"]))
      unused = counts == 0
      mean = l2norm(stats["sums"] / jnp.where(unused, 1.0, counts)[:, None])
      target = jnp.where(unused[:, None], base, mean)
      state.update(codebook=l2norm(self.decay * base + (1.0 - self.decay) * target),
                   initted=jnp.ones_like(state["initted"]))
    if self.restarts:
      state = self._restart(params, state, counts, stats["candidates"])
    return state

  def _restart(self, params: dict, state: dict, counts: jax.Array, candidates: jax.Array) -> dict:
    unused = jnp.where(counts > 0, 0, state["unused_steps"] + 1)
    dead = unused >= self.restarts
    col = dead[:, None]
    if self.kind == "ema":
      debias = 1.0 - jnp.power(jnp.float32(self.decay), state["ema_steps"].astype(jnp.float32))
      state["codebook"] = jnp.where(col, candidates, state["codebook"])
      state["ema_count"] = jnp.where(dead, debias, state["ema_count"])
      state["ema_sum"] = jnp.where(col, candidates * debias, state["ema_sum"])
    elif self.kind == "norm_ema":
      state["codebook"] = jnp.where(col, l2norm(candidates), state["codebook"])
    else:
      state["codebook_offset"] = jnp.where(col, candidates - params["codebook"],
                                           state["codebook_offset"])
    state["unused_steps"] = jnp.where(dead, 0, unused).astype(jnp.int32)
    return state
