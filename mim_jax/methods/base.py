"""The method interface: what the one trainer needs from a pretraining method.

A method declares
  * its trainable parameters (`init`), a dict with at least an 'encoder' entry;
  * its extra, non-trainable state (`init_state`): EMA teachers, queues, centres, frozen
    tokenizers ... anything the step carries from one iteration to the next;
  * its loss, a pure function of (params, state, images, rng) (`loss`);
  * its per-step state update after the optimiser step (`update_state`), which also receives
    the batch statistics the loss returned in its metrics under 'state_stats' (a centre's
    batch mean, say);
  * optionally its own view of the batch (`preprocess`: several augmented views, say) and
    frozen weights loaded from other runs (`external_state`: a tokenizer, a teacher);
  * the features evaluators read (`features`), one entry per encoder worth evaluating;
  * optionally a reconstruction for the picture (`reconstruct`) and a weight-decay mask.

The trainer never branches on the method: it calls these, jits them, shards their pytrees
and checkpoints `state` beside the parameters. This base class also carries the one small
stateful feature every method gets for free: an optional EMA of the encoder
(`config.ema.decay`), evaluated beside the online encoder.
"""
from __future__ import annotations

from typing import Any, Optional

import jax
import jax.numpy as jnp
import ml_collections

from mim_jax import teachers
from mim_jax.models import vit

PyTree = Any


def ema_update(target: PyTree, online: PyTree, decay) -> PyTree:
  """decay * target + (1 - decay) * online, leaf by leaf (EMA teachers and encoders)."""
  return jax.tree.map(lambda t, o: decay * t + (1.0 - decay) * o, target, online)


def cosine_momentum(step, total_steps: int, base: float, final: float = 1.0) -> jax.Array:
  """The BYOL / DINO / iBOT teacher-momentum schedule, per iteration:
  final + (base - final) * (1 + cos(pi * step / total_steps)) / 2."""
  s = jnp.asarray(step, jnp.float32)
  return final + 0.5 * (base - final) * (1.0 + jnp.cos(jnp.pi * s / max(int(total_steps), 1)))


def path_names(path) -> tuple[str, ...]:
  return tuple(getattr(k, "key", getattr(k, "name", str(k))) for k in path)


class Method:
  """Base class; subclasses set `name` and implement `init`, `loss` (and `reconstruct`)."""

  name: str = "base"
  # True for methods whose loss needs the batch's labels (fine-tuning): the trainer then calls
  # loss(..., labels=int32 [B]).
  uses_labels: bool = False
  # Parameter names (last path element) never decayed besides 1-D parameters.
  no_decay_names: tuple[str, ...] = ()

  def __init__(self, config: ml_collections.ConfigDict):
    self.config = config
    self.image_size = config.input.image_size
    self.encoder = vit.vit_from_config(config.model, self.image_size,
                                       **self.encoder_overrides())
    self.pooling = config.get("pooling", "cls")
    ema = config.get("ema", None)
    self.ema_decay = float(ema.decay) if ema is not None and ema.get("enabled", False) else None
    # Frozen runs (tokenizers, teachers) are read in the context the method was built in
    # (teachers.frozen_runs), also when a property reads them later.
    self.frozen_context = teachers.current_context()

  def run_steps(self) -> tuple[int, int]:
    """(steps per epoch, total steps) of the run this config describes, for schedules that
    are per epoch or per iteration in the official code (teacher momentum, temperatures)."""
    if getattr(self, "_run_steps", None) is None:
      from mim_jax import optim
      from mim_jax.data import pipeline
      spe = max(1, pipeline.steps_per_epoch(self.config.input))
      self._run_steps = (spe, max(1, optim.total_steps(self.config, spe)))
    return self._run_steps

  # -- what subclasses provide --------------------------------------------------------------
  def encoder_overrides(self) -> dict:
    return {}

  def init(self, rng: jax.Array, images: jax.Array) -> PyTree:
    raise NotImplementedError

  def loss(self, params: PyTree, state: PyTree, images: jax.Array, rng: jax.Array,
           step: jax.Array) -> tuple[jax.Array, dict]:
    """Returns (scalar loss, metrics dict of scalars). `images` are normalised, NHWC, float."""
    raise NotImplementedError

  def reconstruct(self, params: PyTree, state: PyTree, images: jax.Array,
                  rng: jax.Array) -> Optional[dict]:
    """{'masked': ..., 'reconstruction': ...} in the normalised image space, or None."""
    return None

  # -- defaults -----------------------------------------------------------------------------
  def preprocess(self, rng: jax.Array, images: jax.Array, input_cfg, on_device_aug: bool) -> PyTree:
    """uint8 batch [B, H, W, 3] -> what `loss` receives as `images`: by default one augmented,
    normalised view (`data.preprocess.preprocess`); multi-view methods return a dict of views."""
    from mim_jax.data import preprocess
    return preprocess.preprocess(rng, images, input_cfg, on_device_aug)

  def external_state(self) -> dict:
    """Frozen arrays read from outside (another run's checkpoint), merged into the method state
    after initialisation and checkpointed with it: {name: pytree of host arrays}."""
    return {}

  def init_state(self, params: PyTree) -> PyTree:
    state = {}
    if self.ema_decay is not None:
      state["ema_encoder"] = jax.tree.map(jnp.copy, params["encoder"])
    return state

  def update_state(self, params: PyTree, state: PyTree, step: jax.Array,
                   stats: Optional[PyTree] = None) -> PyTree:
    if self.ema_decay is None:
      return state
    return {**state, "ema_encoder": ema_update(state["ema_encoder"], params["encoder"], self.ema_decay)}

  def features(self, params: PyTree, state: PyTree, images: jax.Array) -> dict[str, jax.Array]:
    """Pooled, frozen-encoder features of un-masked images, for kNN and the linear probe."""
    return {name: self.encode(p, images) for name, p in self._encoders(params, state).items()}

  def encode(self, encoder_params: PyTree, images: jax.Array) -> jax.Array:
    tokens = self.encoder.apply({"params": encoder_params}, images)
    return vit.pool(tokens, self.pooling).astype(jnp.float32)

  def _encoders(self, params: PyTree, state: PyTree) -> dict[str, PyTree]:
    out = {"online": params["encoder"]}
    if self.ema_decay is not None:
      out["ema"] = state["ema_encoder"]
    return out

  def layer_features(self, params: PyTree, state: PyTree, images: jax.Array,
                     pooling: str) -> dict[str, jax.Array]:
    """Every block's output pooled ('cls' | 'mean'), [B, depth + 1, D] per encoder: entry i < depth
    is block i's output (before the final norm), the last entry the final-norm output that
    `features` uses."""
    out = {}
    for name, p in self._encoders(params, state).items():
      tokens, inter = self.encoder.apply({"params": p}, images, mutable=["intermediates"])
      blocks = list(inter["intermediates"]["encoder"]["block_outputs"]) + [tokens]
      out[name] = jnp.stack([vit.pool(t, pooling) for t in blocks], axis=1).astype(jnp.float32)
    return out

  def token_features(self, params: PyTree, state: PyTree, images: jax.Array) -> dict[str, jax.Array]:
    """All final-norm tokens [B, 1 + L, D] per encoder (cls first), for attentive probes."""
    return {name: self.encoder.apply({"params": p}, images).astype(jnp.float32)
            for name, p in self._encoders(params, state).items()}

  def decay_mask(self, params: PyTree) -> PyTree:
    """True where weight decay applies: every parameter of 2 or more dims not named in
    `no_decay_names` (1-D parameters are biases, norm scales and layer-scale gammas)."""
    def decays(path, p):
      return p.ndim > 1 and path_names(path)[-1] not in self.no_decay_names
    return jax.tree_util.tree_map_with_path(decays, params)

  def describe(self) -> dict:
    """A JSON-able identity of the model, compared on resume to refuse a foreign checkpoint."""
    return {"method": self.name, "model": self.config.model.to_dict(),
            "image_size": self.image_size}
