"""What the joint-embedding methods share (SimCLR, MoCo, BYOL, SimSiam, Barlow Twins, VICReg).

Each of those methods is its own file with its loss as a pure function; this module holds the
parts they have in common, written once:

  * `MLP`: the projector / predictor / expander heads, a stack of Linear layers with optional
    BatchNorm (torch semantics, `models.resnet.BatchNorm`: batch statistics in training,
    PyTorch's running statistics, per-group statistics with `bn_groups`) and ReLU between
    layers. Each official head is a `layers` spec ((width, bias, bn), ...), bn one of '' (none),
    'affine' (BatchNorm1d), 'scale' (TF's center=False: SimCLR's last layer), 'plain' (affine=
    False: SimSiam, MoCo v3);
  * `JointEmbedding`: the two-view method base on any backbone of `mim_jax.models`
    (`config.model.name`): the views (`data.views`, the DINO / BYOL colour pipeline with
    per-view blur and solarisation probabilities), the variables of the encoder and the heads
    with their BatchNorm statistics in state['collections'], the training forward of a view
    through encoder and heads (`embed`), an optional momentum copy of encoder and projector
    (the teacher: MoCo's key encoder, BYOL's target) with its own statistics, and the
    evaluation features of both;
  * `collapse_monitor`: the per-dimension standard deviation of the L2-normalised output
    (SimSiam's collapse measure: 1/sqrt(d) for a healthy spread, 0 when every output is the
    same), logged by every method as aux/collapse_std and aux/collapse_ratio (std x sqrt(d):
    1 healthy, 0 collapsed) with aux/collapsed = 1 when the ratio is under 0.05.

Views are forwarded one at a time (their BatchNorm statistics per view, the running statistics
updated after each, as the official PyTorch and Haiku code do) unless the method concatenates
them (SimCLR's one forward over the 2N views).
"""
from __future__ import annotations

import math
from typing import Any, Optional, Sequence

import flax.linen as nn
import jax
import jax.numpy as jnp
import ml_collections

from mim_jax import models
from mim_jax.methods.base import Method, cosine_momentum, ema_update, module_entries
from mim_jax.models import resnet, vit

PyTree = Any

BN_KINDS = ("", "affine", "scale", "plain")
INITS = ("torch", "normal_0.01", "haiku")

# The teacher's model statistics are state['collections'][col][TEACHER + module].
TEACHER = "teacher_"

# Under this std x sqrt(d) of the normalised outputs the run is flagged as collapsed.
COLLAPSE_RATIO = 0.05


def l2_normalize(x: jax.Array, axis: int = -1, eps: float = 1e-12) -> jax.Array:
  """torch.nn.functional.normalize / tf.math.l2_normalize: x / max(||x||, eps), float32."""
  x = x.astype(jnp.float32)
  return x / jnp.maximum(jnp.sqrt(jnp.sum(jnp.square(x), axis=axis, keepdims=True)), eps)


def collapse_monitor(z: jax.Array) -> dict:
  """{'collapse_std': mean over dimensions of the batch standard deviation of the
  L2-normalised outputs z [B, d], 'collapse_ratio': that x sqrt(d), 'collapsed': 1. when the
  ratio is under COLLAPSE_RATIO}; no gradient."""
  z = jax.lax.stop_gradient(l2_normalize(z))
  std = jnp.mean(jnp.std(z, axis=0))
  ratio = std * math.sqrt(z.shape[-1])
  return {"collapse_std": std, "collapse_ratio": ratio,
          "collapsed": (ratio < COLLAPSE_RATIO).astype(jnp.float32)}


def _kernel_init(kind: str, fan_in: int):
  if kind == "torch":          # nn.Linear's default: U(+-1/sqrt(fan_in)), the bias alike
    return vit.torch_default_uniform(fan_in), vit.torch_default_uniform(fan_in)
  if kind == "normal_0.01":    # google-research/simclr's LinearLayer: N(0, 0.01), bias 0
    return nn.initializers.normal(0.01), nn.initializers.zeros
  if kind == "haiku":          # hk.Linear: truncated normal (+-2 std) std 1/sqrt(fan_in), bias 0
    return nn.initializers.truncated_normal(1.0 / math.sqrt(fan_in)), nn.initializers.zeros
  raise ValueError(f"MLP init {kind!r}: use one of {', '.join(INITS)}")


class MLP(nn.Module):
  """Linear layers `layers` = ((width, bias, bn), ...) with ReLU after every layer but the
  last; bn as BN_KINDS, applied after the layer's Linear (before the ReLU)."""
  layers: Sequence[tuple]
  weight_init: str = "torch"
  bn_groups: int = 1
  bn_momentum: float = 0.1
  bn_eps: float = 1e-5
  dtype: Any = jnp.float32

  @nn.compact
  def __call__(self, x: jax.Array, train: bool = False) -> jax.Array:
    h = x.astype(jnp.float32)
    for i, (width, bias, bn) in enumerate(self.layers):
      if bn not in BN_KINDS:
        raise ValueError(f"MLP layer {i}: bn={bn!r}, use one of {BN_KINDS}")
      k_init, b_init = _kernel_init(self.weight_init, h.shape[-1])
      h = nn.Dense(int(width), use_bias=bool(bias), kernel_init=k_init, bias_init=b_init,
                   dtype=self.dtype, name=f"fc{i}")(h)
      if bn:
        h = resnet.BatchNorm(momentum=self.bn_momentum, epsilon=self.bn_eps,
                             groups=self.bn_groups, use_scale=bn in ("affine", "scale"),
                             use_bias=bn == "affine", name=f"bn{i}")(h, train)
      if i < len(self.layers) - 1:
        h = nn.relu(h)
    return h.astype(jnp.float32)


def mlp_layers(spec) -> tuple:
  """A config's ((width, bias, bn), ...) as a tuple of tuples (ConfigDicts hold lists)."""
  return tuple((int(w), bool(b), str(n)) for w, b, n in spec)


def views_config(*, scale=(0.08, 1.0), jitter=(0.4, 0.4, 0.2, 0.1), jitter_prob=0.8,
                 gray_prob=0.2, blur_probs=(1.0, 0.1), blur_radius=(0.1, 2.0),
                 solarize_prob=0.2, num_local=0, local_size=96,
                 local_scale=(0.05, 0.4), local_blur_prob=0.5) -> dict:
  """A method's `views` block (`data.views.views_from_config`): two crops at the input size
  with crop `scale`, flip, colour jitter `jitter` (brightness, contrast, saturation, hue) with
  probability `jitter_prob`, greyscale, Gaussian blur with probability blur_probs[0] on the
  first view and blur_probs[1] on the second, solarisation on the second with
  `solarize_prob`: BYOL's asymmetric pair by default; MoCo v2 / SimSiam / SimCLR set both blur
  probabilities alike and no solarisation."""
  return dict(num_global=2, num_local=int(num_local), local_size=int(local_size),
              global_scale=tuple(scale), local_scale=tuple(local_scale), ratio=(3 / 4, 4 / 3),
              hflip=True, jitter_prob=float(jitter_prob), jitter=tuple(jitter),
              gray_prob=float(gray_prob),
              blur_probs=(float(blur_probs[0]), float(blur_probs[1]), float(local_blur_prob)),
              blur_radius=tuple(blur_radius), solarize_prob=float(solarize_prob))


class JointEmbedding(Method):
  """The two-view base. Subclasses set `name`, `heads` (module name -> MLP, applied in that
  order, each to the previous one's output), `teacher_heads` (the heads the momentum teacher
  copies; () for none) and write `loss` with `embed`.

  config.<name> keys read here: views (`views_config`), momentum (the teacher's EMA rate; 0
  or absent: no teacher), momentum_schedule ('constant' | 'cosine': BYOL's 1 - (1 - m)(cos(pi
  k / K) + 1) / 2 per step), head_init (INITS), bn_groups (the heads' BatchNorm groups;
  config.model.bn_groups is the encoder's)."""

  name = "joint_embedding"
  # Views in one forward (SimCLR: BatchNorm over all 2N views) instead of one at a time.
  concat_views: bool = False
  # Heads the teacher mirrors; () = no head (the key encoder is the encoder alone).
  teacher_heads: tuple[str, ...] = ()
  # Whether gradient accumulation equals the full-batch step. Losses that couple the batch
  # (in-batch negatives, cross-correlations, batch statistics) refuse grad_accum > 1.
  accumulates_exactly: bool = False

  def __init__(self, config: ml_collections.ConfigDict):
    super().__init__(config)
    self.c = config[self.name]
    self.model_name = models.name_of(config.model)
    if self.model_name == "resnet" and self.pooling != "mean":
      raise ValueError(f"config.pooling={self.pooling!r}: a ResNet pools with 'mean'")
    self.momentum_base = float(self.c.get("momentum", 0.0) or 0.0)
    if int(config.optim.get("grad_accum", 1)) > 1 and not self.accumulates_exactly:
      raise ValueError(f"{self.name}'s loss couples the examples of the batch (negatives, "
                       f"statistics): set config.optim.grad_accum=1 and lower the batch or "
                       f"use more devices")

  # -- heads ----------------------------------------------------------------------------------
  def head_modules(self) -> dict[str, nn.Module]:
    """{name: module} in the order they apply (projector, then predictor)."""
    raise NotImplementedError

  def feature_width(self) -> int:
    """The width of the encoder's pooled features (the projector's input)."""
    x = jnp.zeros((1, self.image_size, self.image_size, 3), jnp.float32)
    v = jax.eval_shape(lambda: self.encoder.init(jax.random.PRNGKey(0), x))
    out = jax.eval_shape(lambda v: models.outputs(self.encoder, v, x, pooling=self.pooling), v)
    return int(out["pooled"].shape[-1])

  def mlp(self, spec, **kw) -> MLP:
    c = self.c
    return MLP(layers=mlp_layers(spec), weight_init=str(c.get("head_init", "torch")),
               bn_groups=int(c.get("bn_groups", 1)), **kw)

  @property
  def heads(self) -> dict[str, nn.Module]:
    if getattr(self, "_heads", None) is None:
      self._heads = self.head_modules()
    return self._heads

  # -- variables ------------------------------------------------------------------------------
  def init_variables(self, rng, images):
    keys = jax.random.split(rng, len(self.heads) + 1)
    enc = dict(self.encoder.init(keys[0], images))
    feats = jax.eval_shape(lambda: models.outputs(self.encoder, enc, images,
                                                  pooling=self.pooling)["pooled"])
    x = jnp.zeros((2, feats.shape[-1]), jnp.float32)
    heads = {}
    for k, (name, head) in zip(keys[1:], self.heads.items()):
      heads[name] = head.init(k, x)
      x = jnp.zeros((2, head.layers[-1][0]), jnp.float32)
    return self.nest_modules(encoder=enc, **heads)

  def teacher_names(self) -> tuple[str, ...]:
    return ("encoder",) + tuple(self.teacher_heads)

  def has_teacher(self) -> bool:
    """Whether the method keeps a teacher (an EMA copy of the encoder and teacher_heads): with
    a momentum > 0; MoCo always (its key encoder at momentum 0 copies the query encoder)."""
    return self.momentum_base > 0

  def init_state(self, params):
    state = dict(super().init_state(params))
    if self.has_teacher():
      state["teacher"] = {n: jax.tree.map(jnp.copy, params[n]) for n in self.teacher_names()}
    return state

  def initial_state(self, variables):
    """The base state; a teacher's model statistics (BatchNorm's) are kept beside the online
    ones in state['collections'], as modules 'teacher_<name>', so that the trainer threads
    and checkpoints them the same way."""
    state = super().initial_state(variables)
    if "teacher" in state and "collections" in state:
      state["collections"] = {
          col: {**tree, **{TEACHER + n: jax.tree.map(jnp.copy, tree[n])
                           for n in self.teacher_names() if n in tree}}
          for col, tree in state["collections"].items()}
    return state

  def momentum(self, step) -> jax.Array:
    """The teacher's EMA rate at `step`: constant, or BYOL's cosine from `momentum` to 1."""
    if str(self.c.get("momentum_schedule", "constant")) == "cosine":
      return cosine_momentum(step, self.run_steps()[1], self.momentum_base)
    return jnp.float32(self.momentum_base)

  def update_state(self, params, state, step, stats=None, **kw):
    state = super().update_state(params, state, step, stats)
    if "teacher" in state:
      m = self.momentum(step)
      online = {n: params[n] for n in self.teacher_names()}
      state = {**state, "teacher": ema_update(state["teacher"], online, m)}
    return state

  def decay_mask(self, params):
    """The base mask (no decay on 1-D parameters: LARS methods exclude biases and BatchNorm),
    or every parameter with config.<name>.decay_all (PyTorch SGD's weight_decay, as the
    official MoCo v1/v2, SimSiam and InstDisc apply it)."""
    if bool(self.c.get("decay_all", False)):
      return jax.tree.map(lambda _: True, params)
    return super().decay_mask(params)

  # -- forward --------------------------------------------------------------------------------
  def embed(self, params: PyTree, collections: Optional[dict], images: jax.Array, *,
            heads: Sequence[str], train: bool = True, rng=None) -> tuple[dict, dict]:
    """One training-mode forward of `images` through the encoder and then `heads` in order.
    Returns ({'pooled': encoder features, <head>: its output, ...}, the updated collections
    {col: {module: tree}}). `params`/`collections` are the online ones or the teacher's."""
    collections = collections or {}
    enc_vars = {"params": params["encoder"], **module_entries(collections, "encoder")}
    out, new_enc = models.forward(self.encoder, enc_vars, images, train=train, rng=rng,
                                  pooling=self.pooling)
    new = {col: {**collections.get(col, {}), "encoder": t} for col, t in new_enc.items()}
    x = out["pooled"]
    result = {"pooled": x}
    for name in heads:
      head = self.heads[name]
      v = {"params": params[name], **module_entries(collections, name)}
      mutable = [col for col in v if col != "params"] if train else []
      if mutable:
        x, upd = head.apply(v, x, train=True, mutable=mutable)
        for col, t in upd.items():
          new.setdefault(col, dict(collections.get(col, {})))[name] = t
      else:
        x = head.apply(v, x, train=train)
      result[name] = x
    return result, new

  def embed_views(self, params, collections, views: Sequence[jax.Array], *, heads, rng=None):
    """`embed` of each view in turn, the statistics threaded from one view to the next (or of
    all views in one forward when `concat_views`). Returns ([outputs per view], collections)."""
    if self.concat_views:
      n = views[0].shape[0]
      out, cols = self.embed(params, collections, jnp.concatenate(views, 0), heads=heads, rng=rng)
      return [jax.tree.map(lambda t: t[i * n:(i + 1) * n], out) for i in range(len(views))], cols
    outs = []
    for i, v in enumerate(views):
      r = None if rng is None else jax.random.fold_in(rng, i)
      o, new = self.embed(params, collections, v, heads=heads, rng=r)
      collections = {**(collections or {}), **{c: {**(collections or {}).get(c, {}), **t}
                                               for c, t in new.items()}}
      outs.append(o)
    return outs, collections

  def teacher_embed_views(self, state, views, *, rng=None):
    """The momentum teacher's forward of each view (training-mode BatchNorm, as the official
    key encoders and targets), no gradient. Returns ([outputs per view], its updated
    collections as 'teacher_<name>' modules, for aux['collections'])."""
    teacher = jax.lax.stop_gradient(state["teacher"])
    cols = {col: {n[len(TEACHER):]: t for n, t in tree.items() if n.startswith(TEACHER)}
            for col, tree in (state.get("collections") or {}).items()}
    outs, new = self.embed_views(teacher, cols, views, heads=self.teacher_heads, rng=rng)
    new = {col: {TEACHER + n: t for n, t in tree.items()} for col, tree in new.items()}
    return jax.lax.stop_gradient(outs), jax.lax.stop_gradient(new)

  @staticmethod
  def split_views(images) -> list[jax.Array]:
    """The preprocessed views ({'global': [B, V, S, S, 3]}; a plain [B, S, S, 3] batch, as the
    evaluators' loss hands, is used as both views) as a list of [B, S, S, 3]."""
    if not isinstance(images, dict):
      return [images, images]
    g = images["global"].astype(jnp.float32)
    return [g[:, i] for i in range(g.shape[1])]

  @staticmethod
  def merged(*collections: Optional[dict]) -> dict:
    """{col: {module: tree}} of several forwards' updated collections, for aux['collections']."""
    out = {}
    for cols in collections:
      for col, tree in (cols or {}).items():
        out.setdefault(col, {}).update(tree)
    return out

  # -- inputs ---------------------------------------------------------------------------------
  def views_cfg(self):
    """The `views` block the views are cut and coloured with (config.<name>.views)."""
    return self.c.views

  def train_views(self):
    from mim_jax.data import views
    return views.crop_specs(self.views_cfg(), self.config.input)

  def preprocess(self, rng, images, input_cfg, on_device_aug):
    from mim_jax.data import views
    return views.views_from_config(rng, images, self.views_cfg(), input_cfg)

  # -- evaluation -----------------------------------------------------------------------------
  def _encoders(self, params, state):
    out = super()._encoders(params, state)
    if "teacher" in (state or {}):
      out["teacher"] = state["teacher"]["encoder"]
    return out

  def encoder_variables(self, params, state):
    out = super().encoder_variables(params, state)
    if "teacher" in out:
      out["teacher"] = {**out["teacher"],
                        **module_entries((state or {}).get("collections"), TEACHER + "encoder")}
    return out
