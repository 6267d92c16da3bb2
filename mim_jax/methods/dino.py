"""DINO: self-distillation with no labels (Caron et al., ICCV 2021), exact to
facebookresearch/dino (main_dino.py, vision_transformer.py, utils.py), on a ViT
(config.model.name 'vit') or a torchvision ResNet ('resnet').

DINO and iBOT share their head, centring, schedules and gradient shaping: they are written once,
in methods/ibot.py, and used here.

  * main_dino.py `DINOLoss.forward`: `ibot.dino_loss` (iBOT's cls term): student logits / 0.1
    (student_temp); teacher softmax((t - center) / temp) of the 2 global crops; the mean over
    the (teacher crop q, student crop v != q) pairs of the batch-mean cross-entropy, every
    student crop (global and local) against both teacher crops. `update_center`: center =
    0.9 center + 0.1 x the mean of the teacher's outputs over the GLOBAL batch (all_reduce:
    here the jitted batch, whatever its sharding), after the loss (`update_state`, from the
    loss's 'state_stats').
  * The teacher temperature is per epoch: np.linspace(warmup_teacher_temp, teacher_temp,
    warmup_teacher_temp_epochs), then teacher_temp (`ibot.teacher_temperature`). The teacher
    momentum is per iteration: utils.cosine_scheduler(momentum_teacher, 1, epochs, iters)
    (`JointEmbedding.momentum`, momentum_schedule 'cosine'), the EMA (m t + (1 - m) s over
    every parameter of backbone and head) after the optimiser step.
  * vision_transformer.py `DINOHead`: `ibot.IBOTHead` with patches=False: nlayers Linear
    (in -> hidden 2048 -> ... -> bottleneck 256, trunc-normal .02, bias 0) with GELU between
    them, with BatchNorm1d after each hidden Linear when use_bn (--use_bn_in_head, the ResNet
    recipe), l2-normalised, then the weight-normalised `last_layer` without bias to out_dim
    (PyTorch's default Linear init for v; g = 1, frozen when norm_last_layer). The teacher's
    head copies the student's (state_dict load, then EMA of every parameter, g included).
  * utils.py `MultiCropWrapper`: the backbone runs once per resolution, on the crops of that
    size concatenated (the 2 global crops, then the local crops), and the head once on all
    the features concatenated. With a ResNet its BatchNorm (SyncBatchNorm: global batch
    statistics) thus normalises the global crops together, then the local crops together,
    and the head's BatchNorm all the crops at once; the running statistics move once per
    forward. The teacher (never put in eval mode) forwards the global crops only, with batch
    statistics too; its own running statistics are kept beside the student's in
    state['collections'] as modules 'teacher_encoder' / 'teacher_head' (they are buffers,
    not EMA'd). The student's ViT uses drop path (drop_path_rate 0.1), the teacher's none;
    local crops use the position embedding interpolated as `interpolate_pos_encoding` does
    (inside mim_jax's ViT at the crop's size). The features are the final-norm [CLS] token
    (ViT) or the average-pooled last stage (ResNet, fc = Identity).
  * utils.py `clip_gradients` (each parameter's gradient to norm clip_grad 3.0) and
    `cancel_gradients_last_layer` (no update of `last_layer` during the first
    freeze_last_layer epochs): `ibot.shape_gradients` and the optimiser group frozen until
    then (`ibot.last_layer_groups`), as iBOT.
  * ViT initialisation as vision_transformer.py `VisionTransformer` (`ibot.official_init`,
    config dino.official_init): Linear weights trunc-normal .02, biases 0, LayerNorm 1 / 0,
    cls token and position embedding trunc-normal .02, patch-embedding conv PyTorch's
    default.

Logged under aux/: `collapse_monitor` of the student's head output on the first global crop;
the teacher's per-sample output entropy (`teacher_entropy_cls`), the entropy of its batch-mean
distribution (`teacher_batch_entropy_cls`, low when one prototype wins), KL(teacher ||
student) over the pairs (`kl_cls`), the agreement of teacher crop 0 with student crop 1
(`cls_agreement`), the teacher temperature and momentum.
"""
from __future__ import annotations

from typing import Any, Optional, Sequence

import jax
import jax.numpy as jnp

from mim_jax import models
from mim_jax.methods import ibot
from mim_jax.methods.base import module_entries
from mim_jax.methods.joint_embedding import TEACHER, JointEmbedding, collapse_monitor

PyTree = Any


def view_major(views: jax.Array) -> jax.Array:
  """[B, N, S, S, 3] -> [N B, S, S, 3], crop-major (torch.cat of the N crops' batches)."""
  b, n = views.shape[:2]
  return jnp.swapaxes(views, 0, 1).reshape((n * b,) + views.shape[2:])


class DINO(JointEmbedding):
  """config.dino keys: out_dim, hidden_dim, bottleneck_dim, nlayers, norm_last_layer,
  use_bn_in_head, momentum (momentum_teacher) with momentum_schedule 'cosine',
  warmup_teacher_temp, teacher_temp, warmup_teacher_temp_epochs, student_temp,
  center_momentum, freeze_last_layer (epochs), clip_grad (per parameter; 0 = off),
  official_init (ViT), views (`joint_embedding.views_config`: the multi-crop)."""

  name = "dino"
  teacher_heads = ("head",)

  def __init__(self, config):
    super().__init__(config)
    c = self.c
    if self.momentum_base <= 0:
      raise ValueError("DINO's teacher is an EMA of the student: set config.dino.momentum "
                       "(momentum_teacher, 0.996) > 0")
    v = c.views
    if int(v.num_global) < 1 or int(v.num_global) + int(v.num_local) < 2:
      raise ValueError("DINO needs the global crops the teacher sees and two crops or more: "
                       "set dino.views.num_global=2")
    self.vit = self.model_name == "vit"
    if self.vit:
      if config.model.get("rel_pos_bias", "none") != "none":
        raise ValueError("DINO's ViT has an absolute position embedding: set "
                         "config.model.rel_pos_bias='none'")
      patch = int(config.model.patch_size)
      if int(v.num_local) and int(v.local_size) % patch:
        raise ValueError(f"dino.views.local_size={int(v.local_size)} must be a multiple of the "
                         f"patch size {patch}")
    # The features the head reads: the final-norm [CLS] token, or the ResNet's average pool.
    self.train_pooling = "cls" if self.vit else "mean"
    self.head = ibot.IBOTHead(
        out_dim=int(c.out_dim), patch_out_dim=int(c.out_dim), hidden_dim=int(c.hidden_dim),
        bottleneck_dim=int(c.bottleneck_dim), nlayers=int(c.nlayers),
        norm_last_layer=bool(c.norm_last_layer), use_bn=bool(c.use_bn_in_head),
        bn_groups=int(c.get("bn_groups", 1)), dtype=jnp.dtype(config.model.get("dtype", "float32")))

  def head_modules(self):
    return {"head": self.head}

  # -- schedules ------------------------------------------------------------------------------
  def epoch(self, step) -> jax.Array:
    return jnp.asarray(step, jnp.int32) // self.run_steps()[0]

  def teacher_temp(self, step) -> jax.Array:
    """DINOLoss.teacher_temp_schedule[epoch]."""
    c = self.c
    return ibot.teacher_temperature(self.epoch(step).astype(jnp.float32),
                                    float(c.warmup_teacher_temp), float(c.teacher_temp),
                                    int(c.warmup_teacher_temp_epochs))

  def freeze_steps(self) -> int:
    return ibot.freeze_steps(self.c.freeze_last_layer, self.run_steps()[0])

  def param_groups(self):
    """cancel_gradients_last_layer: head/last_layer frozen for freeze_last_layer epochs."""
    return ibot.last_layer_groups(self.freeze_steps())

  # -- variables ------------------------------------------------------------------------------
  def init_variables(self, rng, images):
    k_enc, k_head, k_init = jax.random.split(rng, 3)
    enc = dict(self.encoder.init(k_enc, images))
    if self.vit and bool(self.c.get("official_init", True)):
      enc["params"] = ibot.official_init(k_init, enc["params"])
    feats = jax.eval_shape(lambda: models.outputs(self.encoder, enc, images,
                                                  pooling=self.train_pooling)["pooled"])
    head = self.head.init(k_head, jnp.zeros((2, feats.shape[-1]), jnp.float32), patches=False)
    return self.nest_modules(encoder=enc, head=head)

  def init_state(self, params):
    return {**super().init_state(params),
            "center": jnp.zeros((1, int(self.c.out_dim)), jnp.float32)}

  def update_state(self, params, state, step, stats=None, **kw):
    """The teacher's EMA (JointEmbedding), then DINOLoss.update_center."""
    state = super().update_state(params, state, step, stats)
    if stats is not None:
      m = float(self.c.center_momentum)
      state = {**state, "center": state["center"] * m + stats["center"] * (1 - m)}
    return state

  # -- forward --------------------------------------------------------------------------------
  def multi_crop_forward(self, params: PyTree, collections: Optional[dict],
                         groups: Sequence[jax.Array], *, backbone_train: bool,
                         rng=None) -> tuple[jax.Array, dict]:
    """utils.MultiCropWrapper.forward: the backbone on each group of same-size crops
    (crop-major [N B, S, S, 3]) in turn, the head once on the concatenated features, both in
    training mode (the head's BatchNorm with batch statistics). Returns (logits [sum N B,
    out_dim], the updated collections {col: {module: tree}}: only the modules that moved)."""
    cols = dict(collections or {})
    updated: dict = {}

    def record(name, new):
      for col, tree in new.items():
        cols[col] = {**cols.get(col, {}), name: tree}
        updated.setdefault(col, {})[name] = tree

    feats = []
    for i, x in enumerate(groups):
      r = None if rng is None else jax.random.fold_in(rng, i)
      enc_vars = {"params": params["encoder"], **module_entries(cols, "encoder")}
      out, new = models.forward(self.encoder, enc_vars, x, train=backbone_train, rng=r,
                                pooling=self.train_pooling)
      record("encoder", new)
      feats.append(out["pooled"])
    h = jnp.concatenate(feats, axis=0)
    v = {"params": params["head"], **module_entries(cols, "head")}
    mutable = [col for col in v if col != "params"]
    if mutable:
      (logits, _), new = self.head.apply(v, h, patches=False, train=True, mutable=mutable)
      record("head", new)
    else:
      logits, _ = self.head.apply(v, h, patches=False, train=True)
    return logits, updated

  def loss(self, params, state, images, rng, step):
    c = self.c
    if not isinstance(images, dict):   # one plain view (evaluators): both global crops
      images = {"global": jnp.stack([images, images], axis=1)}
    glob = images["global"].astype(jnp.float32)
    b, g = glob.shape[:2]
    groups = [view_major(glob)]
    if "local" in images and images["local"].shape[1]:
      groups.append(view_major(images["local"].astype(jnp.float32)))
    keep_last = (jnp.asarray(step) >= self.freeze_steps()).astype(jnp.float32)
    params = ibot.shape_gradients(params, keep_last, float(c.clip_grad))

    # Teacher: the global crops only, no drop path, BatchNorm with batch statistics.
    cols = state.get("collections") or {}
    t_cols = {col: {n[len(TEACHER):]: t for n, t in tree.items() if n.startswith(TEACHER)}
              for col, tree in cols.items()}
    teacher = jax.lax.stop_gradient(state["teacher"])
    t_out, t_new = self.multi_crop_forward(teacher, t_cols, groups[:1], backbone_train=not self.vit)
    t_out = jax.lax.stop_gradient(t_out)
    t_new = jax.lax.stop_gradient({col: {TEACHER + n: t for n, t in tree.items()}
                                   for col, tree in t_new.items()})
    # Student: every crop, drop path in its ViT.
    s_cols = {col: {n: t for n, t in tree.items() if not n.startswith(TEACHER)}
              for col, tree in cols.items()}
    s_out, s_new = self.multi_crop_forward(params, s_cols, groups, backbone_train=True, rng=rng)

    temp = self.teacher_temp(step)
    s_cls = s_out.reshape((-1, b) + s_out.shape[1:])            # [V, B, K], crop-major
    t_cls = t_out.reshape((g, b) + t_out.shape[1:])             # [G, B, K]
    loss, parts = ibot.dino_loss(s_cls, t_cls, state["center"], temp, float(c.student_temp))
    t = parts["teacher_probs"]
    h = ibot.entropy(t)
    agree = jnp.mean(jnp.argmax(t[0], -1) == jnp.argmax(parts["student_log_probs"][1], -1))
    aux = {
        "teacher_entropy_cls": h,
        "teacher_batch_entropy_cls": ibot.entropy(jnp.mean(t.reshape(g * b, -1), axis=0)),
        "kl_cls": loss - h,
        "cls_agreement": agree.astype(jnp.float32),
        "teacher_temp": temp, "momentum": self.momentum(step),
        **collapse_monitor(s_cls[0]),
        "state_stats": {"center": jnp.mean(t_out, axis=0, keepdims=True)},
    }
    new = self.merged(s_new, t_new)
    if new:
      aux["collections"] = new
    return loss, aux
