"""End-to-end fine-tuning for classification, MAE's recipe (He et al., 2022; FINETUNE.md).

Exact to facebookresearch/mae `main_finetune.py`, `models_vit.py`, `util/lr_decay.py` and the
timm transforms they call (see `mim_jax.data.finetune_aug` for the augmentation):
  * the pretraining ViT (`config.model`), with drop path `config.model.drop_path` (linearly
    increasing over the blocks, as timm's dpr);
  * head: `pooling='mean'` (MAE's `global_pool=True`, its default): mean of the patch tokens of
    the last block, the encoder's final norm NOT applied (models_vit deletes `norm`), then a
    LayerNorm `fc_norm` (eps 1e-6); `pooling='cls'`: the cls token after the final norm; then a
    linear layer, weight ~ N(0, 2e-5) (timm trunc_normal_(std=2e-5) cuts at +-2 absolute, i.e.
    10^5 std: a plain normal), bias 0;
  * the position embedding is learnable during fine-tuning, initialised to the pretraining's
    fixed 2-D sin-cos table (MAE loads `pos_embed` from the checkpoint into timm's learnable
    parameter); no weight decay on it, on the cls token (timm's no_weight_decay) and on 1-D
    parameters;
  * per batch (timm order): RandAugment 'rand-m9-mstd0.5-inc1' on the [0, 1] crop ->
    normalise -> RandomErasing(0.25, 'pixel') -> Mixup/CutMix (0.8 / 1.0, switch 0.5, prob 1,
    'batch' mode, label smoothing 0.1) -> soft-target cross-entropy;
  * layer-wise lr decay and AdamW: `config.optim` (`mim_jax.optim`).

The trainer hands `loss` images after its RandomResizedCrop + flip, normalised; they are
un-normalised to [0, 1] here for RandAugment (timm applies it to the PIL crop) and
normalised again.

Pretrained weights: `config.finetune.pretrained` = a pretraining workdir (its config.json and
latest checkpoint); its online encoder (or `pretrained_encoder='ema'`) replaces the random
encoder in `init`, after a check that the architecture and every parameter shape match.
'' trains from scratch (the same initialisation as pretraining). Resuming and --mode=eval
restore the fine-tune checkpoint over the initialisation, so they work with '' as well.

SimCLR v2's distillation stage (`config.finetune.distill`, Chen et al. 2020b, Sec. 2.3): with
`distill.teacher` = a fine-tuned run's workdir, the loss is alpha x mean_i sum_y
-P_T(y | x_i; T) log P_S(y | x_i; T) with P(y | x; T) = softmax(logits / T), times T^2 as the
official colab's `add_kd_loss` (scale_t2), plus (1 - alpha) x the cross-entropy of the images
in the teacher's labelled subset (`distill.labeled_subset`, by the batch's dataset indices)
summed over the batch / B: the batch estimate of the paper's sums. The teacher (its
parameters and BatchNorm statistics, frozen in the method state and checkpointed with the run)
runs in evaluation mode on the student's very input, as the colab calls it with
trainable=False. Paper: T = 0.1 for self-distillation, 1.0 big-to-small, alpha = 1 (the
unlabelled images only) unless stated.

A Swin (`model.name='swin'`) is fine-tuned as microsoft/SimMIM `main_finetune.py` does:
the head reads the mean of the final normed tokens (`pooling='avg'`), Linear weight
trunc_normal_(std .02) and bias 0 (Swin's _init_weights); drop path in training (rng
'dropout'); weight decay by the official fine-tuning rule (`swin.decays`); layer-wise lr
decay over the blocks and stages (`swin.layer_ids`, get_swin_layer, through mim_jax.optim's
hook). The pretraining run may use another image size and window size (the official 192 px,
window 6 -> 224 px, window 7): v1 bias tables that differ are resized with
`finetune.table_interp` ('geometric', SimMIM's utils.remap_pretrained_keys_swin, default; or
'bicubic', Swin-Transformer's load_pretrained), an absolute position embedding bicubically;
v2 needs `model.pretrained_window_sizes` set to the pretraining windows.

An MViT (`model.name='mvit'`) is fine-tuned as SlowFast's MaskFeat fine-tuning yamls do with
`pooling='mean'` (USE_MEAN_POOLING: the backbone averages the last block's patch tokens and
applies its final norm; the Linear head starts at HEAD_INIT_SCALE 0.001 of trunc_normal_(.02),
std 2e-5, bias 0), or with 'avg' (SlowFast's default: the mean of the final-norm tokens, head
std .02); the MViT's layer ids for the layer decay and its weight-decay rule (models/mvit.py).

Deviations: the encoder's final norm stays in the parameters (unused with mean pooling, so
its gradient is zero and AdamW leaves it untouched) so the tree matches the pretrained one;
one mixup lam per global batch (per micro-batch with grad_accum) where the official code draws
one per GPU batch; from scratch, the head is also initialised with std 2e-5 (the official
script re-initialises it only when loading a checkpoint) and the position embedding starts at
the sin-cos table (timm: trunc-normal .02).
"""
from __future__ import annotations

import os

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from mim_jax import config_lib, models
from mim_jax.checkpointing import CheckpointMismatchError
from mim_jax.errors import TrainingError
from mim_jax.data import finetune_aug
from mim_jax.methods.base import Method, module_entries, path_names
from mim_jax.models import vit


class PretrainedMismatchError(CheckpointMismatchError):
  """The pretrained workdir's encoder does not fit this config's model (main.py prints it as a
  one-line error)."""


class ClassifierHead(nn.Module):
  """MAE's head: fc_norm(mean of patch tokens) or the cls token, then a linear classifier;
  'avg' (CNN and Swin backbones): the global average pool of the last feature map, then the
  linear layer, weight ~ N(0, avg_init_std^2) and bias 0: 0.01 as MoCo's / torchvision-style
  classifiers, 0.02 for a Swin (its _init_weights: timm trunc_normal_(std=.02), bounds +-2);
  'cls' at cls_init_std (MAE's 2e-5; an MViT's official head 0.02);
  'pooled': features the backbone pooled and normed itself ([B, 1, D]: an MViT's 'mean'),
  weight ~ N(0, 2e-5^2)."""
  num_classes: int
  pooling: str = "mean"
  avg_init_std: float = 0.01
  cls_init_std: float = 2e-5
  prefix: int = 1                     # leading cls token(s) 'mean' skips (0: a video ViT)

  @nn.compact
  def __call__(self, tokens):
    """tokens [B, prefix+L, D] (cls first; 'avg': the feature map's positions [B, L, D]) ->
    (features [B, D], logits [B, num_classes]), float32."""
    tokens = tokens.astype(jnp.float32)
    init = nn.initializers.normal(2e-5)
    if self.pooling == "mean":
      feats = vit.layer_norm("fc_norm", jnp.float32)(tokens[:, self.prefix:].mean(axis=1))
    elif self.pooling == "cls":
      feats, init = tokens[:, 0], nn.initializers.normal(self.cls_init_std)
    elif self.pooling == "avg":
      feats, init = tokens.mean(axis=1), nn.initializers.normal(self.avg_init_std)
    elif self.pooling == "pooled":      # features the backbone pooled and normed: [B, 1, D]
      feats = tokens[:, 0]
    else:
      raise ValueError(f"config.finetune.pooling must be 'mean', 'cls' or 'avg' (CNNs), got {self.pooling!r}")
    logits = nn.Dense(self.num_classes, kernel_init=init, bias_init=nn.initializers.zeros,
                      name="fc")(feats)
    return feats, logits


def _skip_final_norm(next_fun, args, kwargs, context):
  """flax interceptor: the ViT's final LayerNorm (Encoder 'norm') becomes the identity, giving
  the last block's output (MAE's global_pool deletes that norm)."""
  module = context.module
  if (context.method_name == "__call__" and isinstance(module, nn.LayerNorm)
      and module.name == "norm" and isinstance(module.parent, vit.Encoder)):
    return args[0]
  return next_fun(*args, **kwargs)


def soft_target_cross_entropy(logits: jax.Array, targets: jax.Array) -> jax.Array:
  """timm SoftTargetCrossEntropy: mean over the batch of sum(-t * log_softmax(logits))."""
  return jnp.mean(jnp.sum(-targets * jax.nn.log_softmax(logits.astype(jnp.float32), axis=-1), axis=-1))


# Model settings that change what a parameter means; they must equal the pretraining run's.
# A Swin's window size (and v2's pretrained_window_sizes) may differ: its tables are resized.
# Other backbones' model modules declare theirs, and their fine-tuning rules, by these names
# (mim_jax/models/swin.py, mvit.py):
#   FINETUNE_ARCH_KEYS   the config keys that must equal the pretraining run's;
#   FINETUNE_HEAD_STD    the 'avg' (and 'cls') head's weight init std (default 0.01);
#   FINETUNE_POOLINGS    the finetune.pooling values it takes (default ('avg',)): 'avg' and
#       'cls' read the backbone's tokens, any other the features it pools itself;
#   finetune_adapt(loaded, init, finetune_cfg)  the pretrained parameters resized where the
#       fine-tuning model differs (position tables at another image or window size): with it,
#       the image size may differ from the pretraining run's;
#   finetune_decays(names, ndim)  whether an encoder parameter (path below 'encoder') is
#       weight-decayed, the official fine-tuning rule.
_ARCH_KEYS = {"vit": ("variant", "depth", "patch_size", "pos_embed", "rel_pos_bias", "qkv_bias",
                      "tubelet", "cls_token"),
              "resnet": ("depth", "width", "stem")}


def _arch_keys(model_cfg) -> tuple:
  return getattr(models.module_for(model_cfg), "FINETUNE_ARCH_KEYS",
                 _ARCH_KEYS.get(models.name_of(model_cfg), ()))


def _same(a, b) -> bool:
  """Config values equal, a JSON list and a tuple alike (config.json holds lists)."""
  norm = lambda v: tuple(v) if isinstance(v, (list, tuple)) else v  # noqa: E731
  return norm(a) == norm(b)


def _path(path) -> str:
  return "/".join(str(getattr(k, "key", getattr(k, "name", k))) for k in path)


def load_pretrained_encoder(workdir: str, which: str, model_cfg, image_size: int,
                            module: str = "encoder") -> dict:
  """The encoder parameters (numpy) of the latest checkpoint in pretraining `workdir`.

  which: 'online' (state.params.encoder) or 'ema' (state.method_state.ema_encoder). Only that
  subtree is read. Raises PretrainedMismatchError when the run's architecture differs.
  module: another trained module of the run instead of the encoder ('projector': SimCLR v2's
  fine-tuning from the projection head), online only, with its collections.
  """
  import orbax.checkpoint as ocp
  from etils import epath

  from mim_jax import checkpointing
  try:
    pre = config_lib.load_run_config(workdir)
  except TrainingError as e:
    raise PretrainedMismatchError(f"config.finetune.pretrained={workdir!r}: {e}, or set it to '' "
                                  f"to train from scratch") from None
  arch_keys = _arch_keys(model_cfg)
  diffs = [f"model.name: {models.name_of(pre.model)!r} vs {models.name_of(model_cfg)!r}"
           ] if models.name_of(pre.model) != models.name_of(model_cfg) else []
  diffs += [f"model.{k}: {pre.model.get(k)!r} vs {model_cfg.get(k)!r}" for k in arch_keys
            if not _same(pre.model.get(k), model_cfg.get(k))]
  if bool(pre.model.get("init_values", 0.0)) != bool(model_cfg.get("init_values", 0.0)):
    diffs.append("model.init_values (layer scale on/off)")
  if (int(pre.input.image_size) != int(image_size)
      and not hasattr(models.module_for(model_cfg), "finetune_adapt")):
    diffs.append(f"input.image_size: {pre.input.image_size} vs {image_size}")
  if diffs:
    raise PretrainedMismatchError(
        f"{workdir} was pretrained with a different model ({'; '.join(diffs[:3])}): set the "
        f"fine-tune config's model to the pretraining run's")
  ckpt = checkpointing.Checkpointer(workdir, keep=int(pre.get("keep_ckpts", 3)))
  try:
    step = ckpt.latest_step()
    if step is None:
      raise PretrainedMismatchError(f"no checkpoint in {ckpt.directory}: pretrain first, or set "
                                    f"config.finetune.pretrained='' to train from scratch")
    state_dir = os.path.join(ckpt.directory, str(step), "state")
    saved = ocp.PyTreeCheckpointHandler().metadata(epath.Path(state_dir))
    saved = getattr(saved, "tree", saved)
    keys = {"online": ("params", module), "ema": ("method_state", "ema_encoder")}
    if module != "encoder" and which != "online":
      raise PretrainedMismatchError(f"the {module!r} of {workdir} is read from the online "
                                    f"weights: set config.finetune.pretrained_encoder='online'")
    if which not in keys:
      raise PretrainedMismatchError(f"config.finetune.pretrained_encoder={which!r}: use 'online' or 'ema'")
    outer, inner = keys[which]
    sub = saved.get(outer, {}).get(inner) if isinstance(saved.get(outer), dict) else None
    if sub is None:
      raise PretrainedMismatchError(f"{state_dir} has no {which} encoder ({outer}.{inner}): set "
                                    f"config.finetune.pretrained_encoder='online'")
    shapes = lambda t: jax.tree.map(lambda m: jax.ShapeDtypeStruct(m.shape, m.dtype), t)  # noqa: E731
    item = {outer: {inner: shapes(sub)}}
    # The encoder's other collections (BatchNorm statistics), online or EMA.
    mstate = saved.get("method_state", {}) if isinstance(saved.get("method_state"), dict) else {}
    col_key = {"online": "collections", "ema": "ema_collections"}[which]
    cols = module_entries(mstate.get(col_key), module)
    if cols:
      item.setdefault("method_state", {})[col_key] = {c: {module: shapes(t)} for c, t in cols.items()}
    restore_args = jax.tree.map(lambda _: ocp.RestoreArgs(restore_type=np.ndarray), item)
    out = ckpt.manager.restore(step, args=ocp.args.Composite(state=ocp.args.PyTreeRestore(
        item=item, restore_args=restore_args, partial_restore=True)))
  finally:
    ckpt.close()
  params = jax.tree.map(np.asarray, out["state"][outer][inner])
  if not cols:
    return params
  restored = out["state"]["method_state"][col_key]
  return {"params": params, **{c: jax.tree.map(np.asarray, restored[c][module]) for c in cols}}


def merge_pretrained(init: dict, loaded: dict, workdir: str) -> dict:
  """`init` (this model's encoder params) with every entry replaced by `loaded`'s.

  Entries only `init` has: a learnable `pos_embed` (kept at its sin-cos initial value when
  the pretrained position embedding was fixed). Entries only `loaded` has: a `mask_token`
  (SimMIM-style encoders; unused when fine-tuning). An ExtreMA encoder (its class-attention
  head: `ca_blockNN`, the `cls_token` they pool with and their final `norm`) gives only its
  patch embedding and plain blocks, as ExtreMA's fine-tuning model does (which then mean-pools
  the patch tokens; here the ViT's cls token and final norm stay at their initial values:
  use `config.finetune.pooling='mean'`). Anything else, or a shape that differs, is a
  PretrainedMismatchError.
  """
  flat_init = {_path(p): v for p, v in jax.tree_util.tree_flatten_with_path(init)[0]}
  flat_loaded = {_path(p): v for p, v in jax.tree_util.tree_flatten_with_path(loaded)[0]}
  optional = {"pos_embed"}
  if any(k.startswith("ca_block") for k in flat_loaded):
    flat_loaded = {k: v for k, v in flat_loaded.items()
                   if not k.startswith(("ca_block", "norm/")) and k != "cls_token"}
    optional |= {k for k in flat_init if k == "cls_token" or k.startswith("encoder/norm/")}
  missing = sorted(set(flat_init) - set(flat_loaded) - optional)
  extra = sorted(set(flat_loaded) - set(flat_init) - {"mask_token"})
  shapes = [f"{k} {tuple(flat_loaded[k].shape)} vs {tuple(flat_init[k].shape)}"
            for k in sorted(set(flat_init) & set(flat_loaded))
            if tuple(flat_loaded[k].shape) != tuple(flat_init[k].shape)]
  if missing or extra or shapes:
    what = (shapes + [f"missing {k}" for k in missing] + [f"unexpected {k}" for k in extra])[:3]
    raise PretrainedMismatchError(f"the encoder in {workdir} does not fit this model "
                                  f"({'; '.join(what)}): use the pretraining run's config.model")

  # The values arrive through a host callback at run time, not as constants baked into the
  # jitted init (a ViT-L would be a 1.2 GB constant).
  leaves, treedef = jax.tree_util.tree_flatten_with_path(init)
  keys = [_path(p) for p, _ in leaves if _path(p) in flat_loaded]
  shapes = [jax.ShapeDtypeStruct(flat_init[k].shape, flat_init[k].dtype) for k in keys]
  values = jax.pure_callback(
      lambda: [np.asarray(flat_loaded[k], s.dtype) for k, s in zip(keys, shapes)], shapes)
  by_key = dict(zip(keys, values))
  return jax.tree_util.tree_unflatten(treedef, [by_key.get(_path(p), v) for p, v in leaves])


class FineTune(Method):
  name = "finetune"
  batch_fields = ("label",)
  # timm VisionTransformer.no_weight_decay(): {'pos_embed', 'cls_token'} (+ 1-D parameters).
  no_decay_names = ("pos_embed", "cls_token")

  def __init__(self, config):
    super().__init__(config)
    f = config.finetune
    self.num_classes = int(f.num_classes)
    self.head_pooling = str(f.pooling)
    # A ViT as MAE fine-tunes it; any other backbone (a ResNet, a Swin) through its feature
    # map, a ResNet's BatchNorm statistics updated in training mode and read at evaluation.
    self.is_vit = models.name_of(config.model) == "vit"
    self.backbone = models.module_for(config.model)
    allowed = (("mean", "cls") if self.is_vit
               else tuple(getattr(self.backbone, "FINETUNE_POOLINGS", ("avg",))))
    if self.head_pooling not in allowed:
      raise ValueError(f"config.finetune.pooling must be {' or '.join(map(repr, allowed))} for "
                       f"model.name={models.name_of(config.model)!r}, got {self.head_pooling!r}")
    if self.head_pooling == "cls" and not models.prefix_tokens(config.model):
      raise ValueError("config.finetune.pooling='cls' reads the cls token: set "
                       "config.model.cls_token=True or use another pooling")
    # A backbone's own pooling other than 'avg' or 'cls' (an MViT's 'mean'): it returns the
    # pooled, normed features and the head is only the classifier.
    self.backbone_pools = not self.is_vit and self.head_pooling not in ("avg", "cls")
    head_std = getattr(self.backbone, "FINETUNE_HEAD_STD", 0.01)
    self.head = ClassifierHead(self.num_classes,
                              "pooled" if self.backbone_pools else self.head_pooling,
                              avg_init_std=head_std,
                              cls_init_std=2e-5 if self.is_vit else head_std,
                              prefix=models.prefix_tokens(config.model))
    self.pretrained = str(f.get("pretrained", "") or "")
    self.pretrained_encoder = str(f.get("pretrained_encoder", "online"))
    self.aug = f.aug
    self.mean = tuple(config.input.mean)
    self.std = tuple(config.input.std)
    self._loaded = None                 # the pretrained encoder, read once (numpy)
    # SimCLR v2 fine-tunes from the projection head's first layer (ft_proj_selector): the
    # first proj_layers layers of the pretraining run's projector (each with its ReLU) stay
    # between the pooled features and the classifier, initialised from that run.
    self.proj_layers = int(f.get("proj_layers", 0) or 0)
    self.proj = self._projector() if self.proj_layers else None
    # SimCLR v2's distillation stage: a fine-tuned run's logits as soft targets.
    d = f.get("distill", None)
    self.distill_teacher = str((d or {}).get("teacher", "") or "")
    if self.distill_teacher:
      self.kd_temperature = float(d.temperature)
      self.kd_alpha = float(d.alpha)
      self.kd_scale = bool(d.get("scale_t2", True))
      self.kd_labeled = d.get("labeled_subset", 0)
      if self.kd_temperature <= 0 or not 0.0 <= self.kd_alpha <= 1.0:
        raise ValueError(f"config.finetune.distill: temperature {self.kd_temperature} must be "
                         f"> 0 and alpha {self.kd_alpha} in [0, 1] (1: distillation only)")
      if self.kd_alpha < 1.0 and not float(self.kd_labeled or 0):
        raise ValueError("config.finetune.distill.alpha < 1 weights the labelled images' "
                         "cross-entropy: set config.finetune.distill.labeled_subset to the "
                         "teacher's --config.input.data.train_subset")
      self.batch_fields = ("label", "index")
      self._teacher_run = None

  def _projector(self):
    """The first proj_layers layers of the pretraining run's `projector` head."""
    if self.is_vit or not self.pretrained:
      raise ValueError("config.finetune.proj_layers > 0 needs a CNN backbone and "
                       "config.finetune.pretrained (a run with a projector head, e.g. SimCLR)")
    from mim_jax import methods  # pylint: disable=g-import-not-at-top
    try:
      pre = methods.get(config_lib.load_run_config(self.pretrained))
      head = pre.heads["projector"]
    except (TrainingError, AttributeError, KeyError):
      raise ValueError(f"config.finetune.proj_layers: {self.pretrained} has no projector head "
                       f"to fine-tune from: set config.finetune.proj_layers=0") from None
    if self.proj_layers >= len(head.layers):
      raise ValueError(f"config.finetune.proj_layers={self.proj_layers}: the projector of "
                       f"{self.pretrained} has {len(head.layers)} layers; keep fewer (its "
                       f"output layer is the contrastive embedding)")
    return head.clone(layers=tuple(head.layers[:self.proj_layers]), parent=None)

  def encoder_overrides(self):
    # MAE fine-tunes the position embedding: a learnable table initialised to the sin-cos one.
    if not models.name_of(self.config.model) == "vit":
      return {}
    if self.config.model.get("pos_embed", "sincos") == "sincos" and self.config.finetune.get("learn_pos_embed", True):
      return {"pos_embed": "learned"}
    return {}

  # -- SimCLR v2's distillation --------------------------------------------------------------
  @property
  def distill_run(self):
    """(config, method) of the fine-tuned teacher run (its config.json; no checkpoint read)."""
    if self._teacher_run is None:
      from mim_jax import methods, teachers  # pylint: disable=g-import-not-at-top
      key = "finetune.distill.teacher"
      with teachers.entered(self.frozen_context):
        try:
          tcfg = teachers.run_config(self.distill_teacher, key)
        except teachers.TeacherError:
          raise TrainingError(f"config.{key}={self.distill_teacher!r} is not a mim_jax workdir: "
                              f"fine-tune a teacher first (configs/finetune.py) and name its "
                              f"workdir") from None
        if tcfg.method != "finetune" or int(tcfg.finetune.num_classes) != self.num_classes:
          raise TrainingError(f"config.{key}: {self.distill_teacher} is a {tcfg.method!r} run; "
                              f"the teacher must be a fine-tuned classifier (configs/finetune.py) "
                              f"with {self.num_classes} classes")
        if int(tcfg.input.image_size) != self.image_size:
          raise TrainingError(f"config.{key}: the teacher classifies {tcfg.input.image_size}px "
                              f"images, this run {self.image_size}px: set "
                              f"--config.input.image_size={tcfg.input.image_size}")
        self._teacher_run = (tcfg, methods.get(tcfg))
    return self._teacher_run

  def external_state(self):
    if not self.distill_teacher:
      return {}
    from mim_jax import teachers  # pylint: disable=g-import-not-at-top
    self.distill_run  # noqa: B018 (the checks above before the checkpoint is read)
    with teachers.entered(self.frozen_context):
      try:
        run = teachers.load(self.distill_teacher, key="finetune.distill.teacher")
      except teachers.TeacherError as e:
        raise TrainingError(f"config.finetune.distill.teacher: {e}") from None
    keep = {k: v for k, v in (run.method_state or {}).items() if k == "collections"}
    return {"distill_teacher": {"params": run.params, "state": keep}}

  def labeled_mask(self) -> np.ndarray:
    """bool [training images]: the teacher's labelled subset (`sources.subset_positions` of
    the training split with distill.labeled_subset and the data's subset_seed)."""
    from mim_jax.data import pipeline, sources  # pylint: disable=g-import-not-at-top
    n = int(pipeline.num_examples(self.config.input, "pretrain"))
    mask = np.zeros(n, bool)
    mask[sources.subset_positions(n, self.kd_labeled,
                                  int(self.config.input.data.get("subset_seed", 0)))] = True
    return mask

  def distill_loss(self, logits, images, state, targets, index):
    """SimCLR v2 (Sec. 2.3): alpha x mean_i CE(softmax(teacher_i / T), softmax(student_i / T))
    (times T^2 with scale_t2, as the official colab's add_kd_loss) + (1 - alpha) x the
    labelled images' cross-entropy summed over the batch / B; the teacher in evaluation mode
    on the student's very input."""
    from mim_jax import teachers  # pylint: disable=g-import-not-at-top
    tcfg, tmethod = self.distill_run
    t = state["distill_teacher"]
    t_logits = tmethod.features(t["params"], t["state"],
                                teachers.renormalize(images, self.config, tcfg))["logits"]
    t_logits = jax.lax.stop_gradient(t_logits.astype(jnp.float32))
    tau = self.kd_temperature
    s_logp = jax.nn.log_softmax(logits.astype(jnp.float32) / tau, axis=-1)
    kd = jnp.mean(jnp.sum(-jax.nn.softmax(t_logits / tau, axis=-1) * s_logp, axis=-1))
    if self.kd_scale:
      kd = kd * tau * tau
    aux = {"distill": kd,
           "agree_with_teacher": jnp.mean((jnp.argmax(logits, -1) == jnp.argmax(t_logits, -1))
                                          .astype(jnp.float32))}
    if self.kd_alpha == 1.0:
      return kd, aux
    labeled = jnp.asarray(self.labeled_mask())[index].astype(jnp.float32)
    ce = jnp.sum(-targets * jax.nn.log_softmax(logits.astype(jnp.float32), axis=-1), axis=-1)
    sup = jnp.sum(ce * labeled) / ce.shape[0]
    aux.update(supervised=sup, labeled_fraction=jnp.mean(labeled))
    return self.kd_alpha * kd + (1.0 - self.kd_alpha) * sup, aux

  # -- parameters -----------------------------------------------------------------------------
  def pretrained_encoder_params(self) -> dict:
    """The pretrained encoder (numpy), read from the workdir once."""
    if self._loaded is None:
      self._loaded = load_pretrained_encoder(self.pretrained, self.pretrained_encoder,
                                             self.config.model, self.image_size)
    return self._loaded

  def init_variables(self, rng, images):
    if self.is_vit:
      return {"params": self.init(rng, images)}
    loaded = self.pretrained_encoder_params() if self.pretrained else None   # fails early
    r_enc, r_head = jax.random.split(rng)
    enc = dict(self.encoder.init(r_enc, images))
    if loaded is not None:
      loaded = loaded if "params" in loaded else {"params": loaded}
      if hasattr(self.backbone, "finetune_adapt"):
        loaded = {**loaded, "params": self.backbone.finetune_adapt(loaded["params"], enc["params"],
                                                                   self.config.finetune)}
      enc = {col: merge_pretrained(tree, loaded.get(col, {}), self.pretrained)
             for col, tree in enc.items()}
    fmap = jax.eval_shape(lambda: self.encoder.apply(enc, images, features_only=True))
    width = fmap.shape[-1]
    out = self.nest("encoder", enc)
    if self.proj is not None:
      proj = dict(self.proj.init(r_head, jnp.zeros((2, width), jnp.float32)))
      loaded = load_pretrained_encoder(self.pretrained, "online", self.config.model,
                                       self.image_size, module="projector")
      loaded = loaded if "params" in loaded else {"params": loaded}
      for col, tree in proj.items():
        kept = {k: v for k, v in loaded.get(col, {}).items() if k in tree}
        out.setdefault(col, {})["projector"] = merge_pretrained(tree, kept, self.pretrained)
      width = self.proj.layers[-1][0]
    tokens = jnp.zeros((1, 1, width), jnp.float32)
    out["params"]["head"] = self.head.init(r_head, tokens)["params"]
    return out

  def init(self, rng, images):
    loaded = self.pretrained_encoder_params() if self.pretrained else None   # fails early
    r_enc, r_head = jax.random.split(rng)
    enc = self.encoder.init(r_enc, images)["params"]
    if "pos_embed" in enc and self.config.model.get("pos_embed", "sincos") == "sincos":
      grid = self.image_size // self.config.model.patch_size
      table = vit.sincos_2d(self.encoder.width, grid, cls_token=True)[None]
      enc = {**enc, "pos_embed": jnp.asarray(table, enc["pos_embed"].dtype)}
    if loaded is not None:
      enc = merge_pretrained(enc, loaded, self.pretrained)
    n = (self.image_size // self.config.model.patch_size) ** 2
    tokens = jnp.zeros((1, n + 1, self.encoder.width), jnp.float32)
    return {"encoder": enc, "head": self.head.init(r_head, tokens)["params"]}

  # -- forward --------------------------------------------------------------------------------
  def encoder_tokens(self, encoder_params, images, train: bool = False, rng=None):
    """Tokens the head reads: the last block's output (mean pooling, no final norm) or the
    final-norm tokens (cls pooling)."""
    kw = dict(deterministic=not train, rngs={"dropout": rng} if train else None)
    if self.head_pooling == "mean":
      with nn.intercept_methods(_skip_final_norm):
        return self.encoder.apply({"params": encoder_params}, images, **kw)
    return self.encoder.apply({"params": encoder_params}, images, **kw)

  def cnn_classify(self, params, state, images, train: bool = False, rng=None):
    """A CNN (or Swin) backbone: (features [B, C], logits, the updated collections when
    `train`); `rng` drives a Swin's drop path in training."""
    v = self.variables(params, state)
    kw = {"pooled": self.head_pooling} if self.backbone_pools else {}
    if train:
      fmap, new = self.encoder.apply(v, images, train=True, features_only=True,
                                     mutable=[c for c in v if c != "params"],
                                     rngs={"dropout": rng} if rng is not None else None, **kw)
      new = self.nest_collections(encoder=new)
    else:
      fmap, new = self.encoder.apply(v, images, train=False, features_only=True, **kw), None
    tokens = fmap.reshape(fmap.shape[0], -1, fmap.shape[-1])
    if self.proj is not None:
      pv = self.variables(params, state, "projector")
      mutable = [c for c in pv if c != "params"] if train else []
      if mutable:
        x, upd = self.proj.apply(pv, tokens.mean(axis=1), train=True, mutable=mutable)
        new = {**(new or {}), **{c: {**(new or {}).get(c, {}), "projector": t} for c, t in upd.items()}}
      else:
        x = self.proj.apply(pv, tokens.mean(axis=1), train=False)
      tokens = nn.relu(x)[:, None, :]
    feats, logits = self.head.apply({"params": params["head"]}, tokens)
    return feats, logits, new

  def classify(self, params, images, train: bool = False, rng=None):
    tokens = self.encoder_tokens(params["encoder"], images, train, rng)
    return self.head.apply({"params": params["head"]}, tokens)

  def augment(self, rng, images, labels):
    """RandAugment -> normalise -> random erasing -> mixup/cutmix, on normalised crops."""
    a = self.aug
    k_ra, k_re, k_mix = jax.random.split(rng, 3)
    mean = jnp.asarray(self.mean, jnp.float32)
    std = jnp.asarray(self.std, jnp.float32)
    x = images.astype(jnp.float32)
    if a.rand_augment:
      x01 = jnp.clip(x * std + mean, 0.0, 1.0)
      x01 = finetune_aug.rand_augment(
          k_ra, x01, num_layers=int(a.ra_num_layers), magnitude=float(a.ra_magnitude),
          magnitude_std=float(a.ra_magnitude_std), prob=float(a.ra_prob),
          fill=finetune_aug.img_mean_fill(self.mean))
      x = (x01 - mean) / std
    if a.reprob > 0:
      x = finetune_aug.random_erasing(k_re, x, prob=float(a.reprob), mode=str(a.remode))
    return finetune_aug.mixup_cutmix(k_mix, x, labels, self.num_classes,
                                     mixup_alpha=float(a.mixup), cutmix_alpha=float(a.cutmix),
                                     prob=float(a.mixup_prob), switch_prob=float(a.mixup_switch_prob),
                                     smoothing=float(a.smoothing))

  def loss(self, params, state, images, rng, step, label=None, index=None):
    if label is None:
      raise ValueError("the finetune method needs labels: the trainer passes them as it reads "
                       "batch_fields ('label',)")
    labels = label
    k_aug, k_drop = jax.random.split(rng)
    x, targets, aux = self.augment(k_aug, images, labels)
    if self.is_vit:
      _, logits = self.classify(params, x, train=True, rng=k_drop)
    else:
      _, logits, new = self.cnn_classify(params, state, x, train=True, rng=k_drop)
      if new:
        aux = {**aux, "collections": new}
    if self.distill_teacher:
      loss, extra = self.distill_loss(logits, x, state, targets, index)
      aux = {**aux, **extra}
    else:
      loss = soft_target_cross_entropy(logits, targets)
    acc = jnp.mean((jnp.argmax(logits, -1) == jnp.argmax(targets, -1)).astype(jnp.float32))
    return loss, {**aux, "top1_vs_major_target": acc}

  # -- evaluation -----------------------------------------------------------------------------
  def features(self, params, state, images):
    """{'online': the head's input features [B, D], 'logits': [B, num_classes]} (no
    augmentation); the 'classifier' evaluator reads 'logits'."""
    if self.is_vit:
      feats, logits = self.classify(params, images)
    else:
      feats, logits, _ = self.cnn_classify(params, state, images)
    return {"online": feats.astype(jnp.float32), "logits": logits.astype(jnp.float32)}

  def decay_mask(self, params):
    """The encoder of a backbone with its own official fine-tuning rule (`finetune_decays`:
    a Swin's, an MViT's) by that rule; anything else (and other backbones) the base rule."""
    rule = getattr(self.backbone, "finetune_decays", None)
    if rule is None:
      return super().decay_mask(params)

    def decays(path, p):
      names = path_names(path)
      if names[0] == "encoder":
        return rule(names[1:], p.ndim)
      return p.ndim > 1 and names[-1] not in self.no_decay_names
    return jax.tree_util.tree_map_with_path(decays, params)

  def describe(self) -> dict:
    return {**super().describe(), "num_classes": self.num_classes, "pooling": self.head_pooling}

