"""The method interface: what the one trainer needs from a pretraining method.

A method declares
  * its trainable parameters (`init`), a dict with at least an 'encoder' entry, or, for
    models with other Flax collections (BatchNorm's 'batch_stats'), all its variables
    (`init_variables`: {'params': ..., 'batch_stats': {'encoder': ...}}, keyed like params);
  * its extra, non-trainable state (`init_state`): EMA teachers, queues, centres, frozen
    tokenizers ... anything the step carries from one iteration to the next. The non-param
    collections of the trained models live there too, under 'collections' (see
    `variables`), so they reach the loss, the evaluators and the checkpoints with the rest;
  * its loss, a pure function of (params, state, images, rng, step) and of the batch fields it
    reads (`batch_fields`: 'label', 'index', passed as keyword arguments), returning
    (loss, aux). Three entries of aux go back to the state instead of the logs:
      'state_stats'   batch statistics for `update_state` (a centre's batch mean), averaged
                      over gradient-accumulation micro-batches like the loss;
      'state_append'  per-example records (keys to enqueue, features for a memory bank),
                      leading axis the micro-batch, concatenated over micro-batches in batch
                      order and handed to `update_state(..., appended=...)`;
      'collections'   the new values of mutable model collections ({'batch_stats':
                      {'encoder': ...}}, from `apply(..., mutable=[...])`), threaded through
                      the micro-batches in order as PyTorch's running statistics are;
  * its per-step state update after the optimiser step (`update_state`);
  * optionally its own view of the batch (`preprocess`: several augmented views, say) and
    frozen weights loaded from other runs (`external_state`: a tokenizer, a teacher);
  * the features evaluators read (`features`), one entry per encoder worth evaluating;
  * optionally a reconstruction for the picture (`reconstruct`) and a weight-decay mask.

The backbone is `config.model.name`'s (mim_jax.models): `self.encoder`, one forward pass, and
`models.outputs` for the named evaluation outputs. The trainer never branches on the method:
it calls these, jits them, shards their pytrees and checkpoints `state` beside the
parameters. This base class also carries the one small stateful feature every method gets
for free: an optional EMA of the encoder (`config.ema.decay`), evaluated beside the online
encoder.
"""
from __future__ import annotations

from typing import Any, Optional

import jax
import jax.numpy as jnp
import ml_collections

from mim_jax import models, teachers

PyTree = Any


def ema_update(target: PyTree, online: PyTree, decay) -> PyTree:
  """decay * target + (1 - decay) * online, leaf by leaf (EMA teachers and encoders)."""
  return jax.tree.map(lambda t, o: decay * t + (1.0 - decay) * o, target, online)


def cosine_momentum(step, total_steps: int, base: float, final: float = 1.0) -> jax.Array:
  """The BYOL / DINO / iBOT teacher-momentum schedule, per iteration:
  final + (base - final) * (1 + cos(pi * step / total_steps)) / 2."""
  s = jnp.asarray(step, jnp.float32)
  return final + 0.5 * (base - final) * (1.0 + jnp.cos(jnp.pi * s / max(int(total_steps), 1)))


def module_entries(collections: Optional[dict], name: str) -> dict:
  """{collection: tree[name]} of the collections ({'batch_stats': {module: tree}}) that hold
  an entry for module `name`: its non-param Flax variables."""
  return {col: tree[name] for col, tree in (collections or {}).items()
          if isinstance(tree, dict) and name in tree}


def path_names(path) -> tuple[str, ...]:
  return tuple(getattr(k, "key", getattr(k, "name", str(k))) for k in path)


class Method:
  """Base class; subclasses set `name` and implement `init`, `loss` (and `reconstruct`)."""

  name: str = "base"
  # The batch fields the loss reads besides the images, passed as keyword arguments of the
  # same name: 'label' (int32 [B]) and 'index' (int32 [B]: the example's position in the
  # training split, the same for any process count and epoch).
  batch_fields: tuple[str, ...] = ()
  # Parameter names (last path element) never decayed besides 1-D parameters.
  no_decay_names: tuple[str, ...] = ()
  # Top-level parameter entries of an adversary (a discriminator) trained by its own loss
  # (`adversary_loss`) and optimiser (`adversary_optim_config`) in the same step, before the
  # main loss, which then sees the updated adversary; the main optimiser leaves them alone.
  adversary_keys: tuple[str, ...] = ()
  # The reconstruction picture's words where they are not masked image modelling's
  # (evaluators.reconstruction.TITLES): the 'masked' and 'reconstruction' columns' titles and
  # the 'header' line after the step ({hidden}: the fraction of pixels the 'masked' column
  # changes). The pretext tasks name what they show.
  picture_titles: Optional[dict] = None

  def __init__(self, config: ml_collections.ConfigDict):
    self.config = config
    self.image_size = config.input.image_size
    self.encoder = models.build(config.model, self.image_size, **self.encoder_overrides())
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

  def init_variables(self, rng: jax.Array, images: jax.Array) -> dict:
    """{'params': the trainable tree, <collection>: {module name: ...}}: what the trainer
    initialises. Methods whose models keep other Flax collections (BatchNorm statistics)
    override this instead of `init`."""
    return {"params": self.init(rng, images)}

  def loss(self, params: PyTree, state: PyTree, images: jax.Array, rng: jax.Array,
           step: jax.Array) -> tuple[jax.Array, dict]:
    """Returns (scalar loss, metrics dict of scalars). `images` are normalised, NHWC, float."""
    raise NotImplementedError

  def param_groups(self) -> tuple:
    """The method's optimiser groups, ((regex, spec), ...) as config.optim.param_groups (see
    optim.GROUP_KEYS), after the config's: parameters it freezes, say."""
    return ()

  def adversary_loss(self, params: PyTree, state: PyTree, images: jax.Array, rng: jax.Array,
                     step: jax.Array, **fields) -> tuple[jax.Array, dict]:
    """The adversary's loss (differentiated with respect to params[k], k in adversary_keys)."""
    raise NotImplementedError(f"{self.name} declares adversary_keys but no adversary_loss")

  def adversary_optim_config(self) -> ml_collections.ConfigDict:
    """The adversary's optimiser settings (keys as config.optim)."""
    raise NotImplementedError(f"{self.name} declares adversary_keys but no adversary_optim_config")

  def reconstruct(self, params: PyTree, state: PyTree, images: jax.Array,
                  rng: jax.Array) -> Optional[dict]:
    """{'masked': ..., 'reconstruction': ...} in the normalised image space, or None."""
    return None

  # -- inputs -------------------------------------------------------------------------------
  def train_views(self):
    """The training views the method cuts (a tuple of `data.host_crop.CropSpec`: several
    crops at their sizes and scales), or None for the one crop of config.input.aug. Streamed
    data is then cut on the host from the decoded image, and `preprocess` receives
    {name: uint8 [B, count, size, size, 3]}; in-memory data arrives whole and `preprocess`
    cuts the views on the device."""
    return None

  def init_input(self) -> jax.Array:
    """What `init` is given (shapes only matter): two images at the input size, or two clips
    of `input.data.num_frames` frames for a space-time backbone (`models.takes_clips`)."""
    size = self.image_size
    if models.takes_clips(self.config.model):
      frames = int(self.config.input.data.get("num_frames", 0) or 0)
      return jnp.zeros((2, frames, size, size, 3), jnp.float32)
    return jnp.zeros((2, size, size, 3), jnp.float32)

  def eval_preprocess(self, images: jax.Array, input_cfg) -> jax.Array:
    """uint8 evaluation images -> what `features` reads: resized and normalised, no
    augmentation."""
    from mim_jax.data import preprocess
    return preprocess.preprocess(None, images, input_cfg, False, train=False)

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

  def initial_state(self, variables: dict) -> PyTree:
    """The state the trainer starts from: `init_state(params)`, plus the models' non-param
    collections under 'collections' (and their EMA under 'ema_collections' when the encoder
    has an EMA: timm's ModelEmaV2 averages buffers with the weights)."""
    params = variables["params"]
    state = dict(self.init_state(params))
    collections = {k: v for k, v in variables.items() if k != "params"}
    if collections:
      state["collections"] = collections
      if "ema_encoder" in state:
        ema = {k: {"encoder": jax.tree.map(jnp.copy, t)}
               for k, t in module_entries(collections, "encoder").items()}
        if ema:
          state["ema_collections"] = ema
    return state

  def update_state(self, params: PyTree, state: PyTree, step: jax.Array,
                   stats: Optional[PyTree] = None) -> PyTree:
    """After the optimiser step. Methods whose loss returns 'state_append' take a keyword
    argument `appended` (its records for the whole batch, in batch order)."""
    if self.ema_decay is None:
      return state
    new = {**state, "ema_encoder": ema_update(state["ema_encoder"], params["encoder"], self.ema_decay)}
    if "ema_collections" in state:
      new["ema_collections"] = {
          k: {"encoder": ema_update(v["encoder"], state["collections"][k]["encoder"], self.ema_decay)}
          for k, v in state["ema_collections"].items()}
    return new

  # -- variables ------------------------------------------------------------------------------
  @staticmethod
  def nest(name: str, variables: dict, **params) -> dict:
    """One module's Flax variables ({'params': p, 'batch_stats': s}) as the trainer's tree
    under `name` ({'params': {name: p, **params}, 'batch_stats': {name: s}}): what
    `init_variables` returns for an encoder (of any backbone) plus other parameters (heads)."""
    return {"params": {name: variables["params"], **params},
            **{col: {name: tree} for col, tree in variables.items() if col != "params"}}

  @staticmethod
  def nest_collections(**modules: dict) -> dict:
    """{collection: {name: tree}} of several modules' {collection: tree} (their updated
    collections after a training-mode forward, say), what aux['collections'] carries."""
    out: dict = {}
    for name, variables in modules.items():
      for col, tree in dict(variables or {}).items():
        out.setdefault(col, {})[name] = tree
    return out

  @staticmethod
  def nest_modules(**modules: dict) -> dict:
    """Several modules' Flax variables ({'params': ..., 'batch_stats': ...} each, by name) as
    the trainer's tree: {'params': {name: ...}, <collection>: {name: ...}}, what
    `init_variables` returns for an encoder and heads that keep BatchNorm statistics."""
    return {"params": {}, **Method.nest_collections(**modules)}

  @staticmethod
  def variables(params: PyTree, state: PyTree, name: str = "encoder") -> dict:
    """The Flax variables of the trained module `name`: {'params': params[name]} plus its
    entry of every collection in state['collections'] (BatchNorm's 'batch_stats')."""
    return {"params": params[name], **module_entries((state or {}).get("collections"), name)}

  def features(self, params: PyTree, state: PyTree, images: jax.Array) -> dict[str, jax.Array]:
    """Pooled, frozen-encoder features of un-masked images, for kNN and the linear probe."""
    return {name: self.outputs(v, images)["pooled"]
            for name, v in self.encoder_variables(params, state).items()}

  def outputs(self, variables: dict, images: jax.Array, layers: bool = False,
              pooling: Optional[str] = None) -> dict:
    """The backbone's named evaluation outputs (mim_jax.models.outputs) under `variables`."""
    return models.outputs(self.encoder, variables, images, pooling=pooling or self.pooling,
                          layers=layers)

  def _encoders(self, params: PyTree, state: PyTree) -> dict[str, PyTree]:
    """{name: encoder parameters} of the encoders worth evaluating; methods with a teacher
    add it here."""
    out = {"online": params["encoder"]}
    if self.ema_decay is not None:
      out["ema"] = state["ema_encoder"]
    return out

  def encoder_variables(self, params: PyTree, state: PyTree) -> dict[str, dict]:
    """`_encoders` as Flax variables: the online encoder with its collections, the EMA with
    the EMA of them, any other encoder (a teacher) with its parameters."""
    sources = {"online": "collections", "ema": "ema_collections"}
    return {name: {"params": p, **module_entries((state or {}).get(sources.get(name, "")), "encoder")}
            for name, p in self._encoders(params, state).items()}

  def layer_features(self, params: PyTree, state: PyTree, images: jax.Array,
                     pooling: str) -> dict[str, list]:
    """Every block's (stage's) output pooled, a list of [B, D_i] per encoder: entry i < last is
    block i's output (before a ViT's final norm), the last entry the features `features`
    uses. Widths may differ between entries (CNN stages)."""
    return {name: self.outputs(v, images, layers=True, pooling=pooling)["layers"]
            for name, v in self.encoder_variables(params, state).items()}

  def token_features(self, params: PyTree, state: PyTree, images: jax.Array) -> dict[str, jax.Array]:
    """All final tokens [B, N, D] per encoder (a ViT's cls first), for attentive probes."""
    return {name: self.outputs(v, images)["tokens"]
            for name, v in self.encoder_variables(params, state).items()}

  def decay_mask(self, params: PyTree) -> PyTree:
    """True where weight decay applies: every parameter of 2 or more dims not named in
    `no_decay_names` (1-D parameters are biases, norm scales and layer-scale gammas)."""
    def decays(path, p):
      return p.ndim > 1 and path_names(path)[-1] not in self.no_decay_names
    return jax.tree_util.tree_map_with_path(decays, params)

  def describe(self) -> dict:
    """A JSON-able identity of the model, compared on resume to refuse a foreign checkpoint."""
    model = self.config.model.to_dict()
    model.setdefault("name", models.name_of(self.config.model))
    return {"method": self.name, "model": model, "image_size": self.image_size}
