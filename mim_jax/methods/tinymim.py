"""TinyMIM: distilling a MIM-pretrained ViT into a smaller one (Ren et al., CVPR 2023).

Exact to OliverRensu/TinyMIM (`models_tinymim.py`, `models_teacher.py`, `vit.py`
`Attention.forward(return_relation=True)`, `engine_pretrain.py`, `main_pretrain.py`):

  * the teacher is frozen and sees the un-masked image; its block `teacher_block` (1-based;
    0 = its last block: the official 12 for ViT-B/S teachers, 18 for ViT-L) gives the target;
  * the student sees the same un-masked crop (the official student view adds
    ColorJitter(0.4, 0.4, 0.4), no hue, after the crop and flip both views share) and its LAST
    block gives the prediction;
  * the target is the token relations of that block's attention: with q, k, v the block's
    qkv projection of its LayerNorm'ed input, split into heads,
        R_qk = softmax(q k^T / sqrt(d)),   R_vv = softmax(v v^T / sqrt(d)),
    d the head width of that model (each model uses its own scale); rows are the N tokens
    (cls first), so relations are [B, heads, N, N] whatever the widths;
  * the loss is KL(R_teacher || R_student) summed over the keys and averaged over batch, heads
    and query tokens (torch KLDivLoss(reduction='none')(R_s.log(), R_t).sum(-1).mean()), for
    Q-K and V-V, added: loss = qk + vv;
  * head-count mismatch: the official student builds its last block with the TEACHER's head
    count (`last_heads`: 12 for ViT-T/S students of a ViT-B teacher, 16 for ViT-B of ViT-L);
    since the qkv projection is D -> 3D whatever the heads, that equals splitting the student's
    q, k, v into the teacher's heads for the relation only, which is what is done here (the
    student's width must divide by the teacher's head count). The student's own forward
    (features, fine-tuning) keeps its own heads.

Q, K and V are not exposed by `models/vit.py`, so they are computed here from the block's
parameters and its input: the block's `norm1` output is captured (flax
`capture_intermediates`, for that one module) and projected with the block's `attn/qkv_kernel`
and bias ('qkv', 'qv' or 'none', as `vit.Attention`) in float32. Only what the loss uses is
computed after jit: the rest of the forward (the student's last MLP and final norm in the
relation target, the teacher's blocks after `teacher_block`) is dead code; like the official
code, those student parameters get no gradient, and as PyTorch's AdamW skips a parameter
whose grad is None, they are a frozen optimiser group (`param_groups`): no update, no weight
decay, their initial values kept.

Alternatives the paper compares (`config.tinymim`), so its tables can be rerun:
  * target 'relation' (above), 'feature' or 'cls': feature distillation as the paper's
    baseline, which follows FD (SwinTransformer/Feature-Distillation `FD.forward`): the
    student's final-norm tokens go through a linear projection to the teacher's width
    (a 1x1 Conv1d there: PyTorch's default init, U(+-1/sqrt(fan_in)) for weight and bias), the
    target is the teacher's tokens whitened by a parameter-free LayerNorm (eps 1e-5), the loss
    SmoothL1(beta 2.0) averaged over tokens and channels. The teacher's tokens are the output
    of `teacher_block`, after the final norm when that is the last block (FD's
    `feat_after_norm`). 'feature' uses every token the student outputs, 'cls' only the class
    token;
  * teacher_block: the relation (or feature) of an intermediate teacher block;
  * input 'raw' (official), 'visible' (the student encoder sees only the kept patches, MAE's
    random masking at `mask_ratio`; relations and features are taken over cls + the kept
    tokens, the teacher's q, k, v / tokens restricted to the same tokens, its relation
    logits re-normalised over them) or 'mask_token' (masked patch embeddings replaced by a
    learnable mask token, SimMIM-style; all tokens). The released code has no masked-input
    path (`engine_pretrain.py` draws a noise it never uses), so these two follow the paper's
    description: the teacher always sees the raw image.

The teacher is another mim_jax run (`config.tinymim.teacher`, its workdir: an MAE run, any
ViT run, or another TinyMIM run for sequential distillation B -> S -> T), read once through
`mim_jax.teachers.load` and carried, frozen, in the method state (`external_state`), so it is
checkpointed with the run and never receives a gradient; its own config builds its encoder.
Its image and patch size must equal the student's (relations are over the same tokens).
"""
from __future__ import annotations

import math

import flax.linen as nn
import jax
import jax.numpy as jnp
import ml_collections

from mim_jax import masking
from mim_jax.errors import TrainingError
from mim_jax.methods.base import Method
from mim_jax.models import vit

TARGETS = ("relation", "feature", "cls")
INPUTS = ("raw", "visible", "mask_token")
TEACHER_ENCODERS = ("online", "ema")


def default_config() -> ml_collections.ConfigDict:
  """Every key of `config.tinymim`; the defaults are the paper's best (and official) choice."""
  return ml_collections.ConfigDict(dict(
      teacher="",                  # workdir of the teacher run (MAE, or a TinyMIM run)
      teacher_encoder="online",    # 'online' | 'ema' (the teacher run's EMA encoder)
      target="relation",           # 'relation' | 'feature' | 'cls'
      teacher_block=0,             # 1-based block of the teacher; 0 = its last block
      input="raw",                 # 'raw' | 'visible' | 'mask_token' (the student's input)
      mask_ratio=0.75,             # with a masked input
      student_jitter=(0.4, 0.4, 0.4),   # ColorJitter(brightness, contrast, saturation) of the
                                        # student view; () = the teacher's view
      smooth_l1_beta=2.0,          # feature / cls targets (FD)
  ))


# ---------------------------------------------------------------------------------------------
# Relations, the KL loss, FD's feature loss.

def split_heads(x: jax.Array, heads: int) -> jax.Array:
  """[B, N, D] -> [B, heads, N, D / heads]."""
  b, n, d = x.shape
  if d % heads:
    raise ValueError(f"width {d} is not divisible by {heads} relation heads")
  return x.reshape(b, n, heads, d // heads).transpose(0, 2, 1, 3)


def relation_logits(a: jax.Array, b: jax.Array, heads: int) -> jax.Array:
  """a, b [B, N, D] -> (a_h b_h^T) / sqrt(D / heads), [B, heads, N, N], float32."""
  a, b = split_heads(a.astype(jnp.float32), heads), split_heads(b.astype(jnp.float32), heads)
  return jnp.einsum("bhqd,bhkd->bhqk", a, b) / math.sqrt(a.shape[-1])


def relation_kl(teacher_logits: jax.Array, student_logits: jax.Array) -> jax.Array:
  """KL(softmax(t) || softmax(s)) over the last axis, summed there and averaged over the rest
  (torch KLDivLoss(reduction='none')(p_s.log(), p_t).sum(-1).mean(); 0 log 0 = 0)."""
  lt = jax.nn.log_softmax(teacher_logits.astype(jnp.float32), axis=-1)
  ls = jax.nn.log_softmax(student_logits.astype(jnp.float32), axis=-1)
  pt = jnp.exp(lt)
  return jnp.mean(jnp.sum(jnp.where(pt > 0, pt * (lt - ls), 0.0), axis=-1))


def whiten(x: jax.Array, eps: float = 1e-5) -> jax.Array:
  """Parameter-free LayerNorm over the channels (torch LayerNorm(elementwise_affine=False))."""
  x = x.astype(jnp.float32)
  mu = jnp.mean(x, axis=-1, keepdims=True)
  var = jnp.mean(jnp.square(x - mu), axis=-1, keepdims=True)
  return (x - mu) * jax.lax.rsqrt(var + eps)


def smooth_l1(pred: jax.Array, target: jax.Array, beta: float) -> jax.Array:
  """torch smooth_l1_loss(beta), averaged over every element."""
  d = jnp.abs(pred.astype(jnp.float32) - target.astype(jnp.float32))
  return jnp.mean(jnp.where(d < beta, 0.5 * d * d / beta, d - 0.5 * beta))


def qkv_from_params(y: jax.Array, attn_params, qkv_bias: str):
  """The attention's q, k, v [B, N, D] each (float32) from its normalised input y [B, N, D] and
  its parameters, as `vit.Attention` computes them."""
  w = jnp.asarray(attn_params["qkv_kernel"], jnp.float32)
  qkv = jnp.einsum("bnd,de->bne", y.astype(jnp.float32), w)
  d = y.shape[-1]
  if qkv_bias == "qkv":
    qkv = qkv + jnp.asarray(attn_params["qkv_bias"], jnp.float32)
  elif qkv_bias == "qv":
    qb, vb = (jnp.asarray(attn_params[k], jnp.float32) for k in ("q_bias", "v_bias"))
    qkv = qkv + jnp.concatenate([qb, jnp.zeros((d,), jnp.float32), vb])
  return qkv[..., :d], qkv[..., d:2 * d], qkv[..., 2 * d:]


def block_qkv(encoder: vit.ViT, params, images, block: int, **kw):
  """(q, k, v) of the encoder's block `block` (0-based), and the encoder's output tokens.

  The block's `norm1` output is captured from the forward pass and projected with the block's
  qkv parameters."""
  name = f"block{block:02d}"

  def wanted(mdl, method_name):
    return (method_name == "__call__" and mdl.name == "norm1" and mdl.parent is not None
            and mdl.parent.name == name)

  tokens, inter = encoder.apply({"params": params}, images, capture_intermediates=wanted,
                                mutable=["intermediates"], **kw)
  # The encoder may run a padded sequence (vit.Encoder pads once for cuDNN's attention).
  y = inter["intermediates"]["encoder"][name]["norm1"]["__call__"][0][:, :tokens.shape[1]]
  q, k, v = qkv_from_params(y, params["encoder"][name]["attn"], encoder.qkv_bias)
  return (q, k, v), tokens, inter["intermediates"]["encoder"].get("block_outputs")


def _error(msg):
  return TrainingError(msg)


def _choice(value, options, key):
  if value not in options:
    raise ValueError(f"config.tinymim.{key} must be one of {options}, got {value!r}")
  return value


class TinyMIM(Method):
  name = "tinymim"

  def __init__(self, config):
    super().__init__(config)
    c = config.tinymim
    self.target = _choice(c.target, TARGETS, "target")
    self.input = _choice(c.input, INPUTS, "input")
    self.teacher_which = _choice(c.teacher_encoder, TEACHER_ENCODERS, "teacher_encoder")
    self.mask_ratio = float(c.mask_ratio)
    self.beta = float(c.smooth_l1_beta)
    self.jitter = tuple(float(j) for j in c.student_jitter)
    if self.jitter and len(self.jitter) != 3:
      raise ValueError(f"config.tinymim.student_jitter is (brightness, contrast, saturation) or (), "
                       f"got {self.jitter}")
    self.patch = config.model.patch_size
    self.num_patches = (self.image_size // self.patch) ** 2
    self._teacher = None

  def encoder_overrides(self):
    # models_tinymim.py: drop_path in every block but the last (none there), not timm's ramp.
    return {"use_mask_token": self.config.tinymim.input == "mask_token",
            "drop_path_rule": "constant_but_last"}

  def param_groups(self):
    """The relation target reaches the student's last block only through its norm1 and qkv
    projection: the block's attn/proj, layer scales, norm2 and MLP and the encoder's final
    norm get no gradient, so PyTorch's AdamW skips them (grad is None) and they keep their
    initialisation. Here they are a frozen group: no update and no weight decay."""
    if self.target != "relation":
      return ()
    last = f"block{self.student_depth - 1:02d}"
    return ((rf"^encoder/encoder/({last}/(attn/proj/|mlp/|norm2/|gamma_[12]$)|norm/)", "frozen"),)

  # -- the teacher ----------------------------------------------------------------------------
  @property
  def teacher_path(self) -> str:
    return self.config.tinymim.teacher

  @property
  def teacher(self):
    """(teacher config, teacher ViT module), from the teacher run's config.json, read once."""
    if self._teacher is None:
      from mim_jax import teachers
      with teachers.entered(self.frozen_context):
        tcfg, enc = teachers.read_teacher_config(self.teacher_path, "tinymim.teacher",
                                                 self.image_size, self.patch)
      depth = enc.depth or vit.variant(enc.variant)[1]
      block = int(self.config.tinymim.teacher_block) or depth
      if not 1 <= block <= depth:
        raise _error(f"config.tinymim.teacher_block={block}: the teacher has {depth} blocks "
                     f"(1..{depth}, 0 = the last)")
      self._teacher = (tcfg, enc, block - 1, depth)
    return self._teacher

  @property
  def teacher_dim(self) -> int:
    return self.teacher[1].width

  @property
  def teacher_heads(self) -> int:
    return vit.variant(self.teacher[1].variant)[2]

  @property
  def relation_heads(self) -> int:
    """The student's last block is split into the teacher's heads (official `last_heads`)."""
    heads, width = self.teacher_heads, self.encoder.width
    if width % heads:
      raise _error(f"the student's width {width} does not split into the teacher's {heads} heads "
                   f"(TinyMIM compares relations head by head): pick a student variant whose width "
                   f"divides by {heads}")
    return heads

  @property
  def student_depth(self) -> int:
    return self.encoder.depth or vit.variant(self.encoder.variant)[1]

  def external_state(self):
    from mim_jax import teachers
    self.teacher  # noqa: B018 (checks the grid and the block before the checkpoint is read)
    with teachers.entered(self.frozen_context):
      return {"teacher": teachers.load_teacher_encoder(self.teacher_path, "tinymim.teacher",
                                                      self.teacher_which)}

  def teacher_norm(self):
    tcfg = self.teacher[0]
    return tuple(tcfg.input.mean), tuple(tcfg.input.std)

  def _to_teacher_input(self, images):
    """The student's normalised view in the teacher run's normalisation."""
    from mim_jax import teachers
    return teachers.renormalize(images, self.config, self.teacher[0])

  # -- views ----------------------------------------------------------------------------------
  def preprocess(self, rng, images, input_cfg, on_device_aug):
    """One crop + flip for both (8-bit levels, as PIL holds them), then the student's own
    ColorJitter; each view normalised with its run's mean and std (main_pretrain.py
    `TwoCropsTransform`)."""
    from mim_jax.data import augment, preprocess
    crop_rng, jit_rng = jax.random.split(rng)
    x = jnp.clip(jnp.round(preprocess.crop_or_resize(crop_rng, images, input_cfg, on_device_aug)), 0, 255)
    s = self.student_jitter(jit_rng, x) if self.jitter else x
    mt, st = self.teacher_norm()
    return {"student": augment.normalize(s, input_cfg.mean, input_cfg.std),
            "teacher": augment.normalize(x, mt, st)}

  def student_jitter(self, rng, x):
    """torchvision ColorJitter(b, c, s) (hue None, skipped) on levels: per image, factors
    ~ U(max(0, 1 - j), 1 + j) applied in a random order (PIL's ImageEnhance blends)."""
    from mim_jax.data import views
    return views.color_jitter(rng, x, *self.jitter, 0.0)

  # -- the student ----------------------------------------------------------------------------
  @property
  def head(self) -> nn.Module:
    """FD's projection of the student's tokens to the teacher's width (feature / cls)."""
    m = self.config.model
    init = vit.torch_default_uniform(self.encoder.width)
    return nn.Dense(self.teacher_dim, dtype=jnp.dtype(m.get("dtype", "float32")),
                    param_dtype=jnp.dtype(m.get("param_dtype", "float32")),
                    kernel_init=init, bias_init=init)

  def make_mask(self, rng, batch: int) -> masking.ShuffleMask:
    return masking.random_shuffle_mask(rng, batch, self.num_patches, self.mask_ratio)

  def _input_kw(self, sm):
    if self.input == "visible":
      return {"keep_ids": sm.keep_ids}
    if self.input == "mask_token":
      return {"mask": sm.mask}
    return {}

  def init(self, rng, images):
    r1, r2, r3 = jax.random.split(rng, 3)
    sm = self.make_mask(r3, images.shape[0])
    enc = self.encoder.init(r1, images, **self._input_kw(sm))["params"]
    params = {"encoder": enc}
    if self.target != "relation":
      tokens = self.encoder.apply({"params": enc}, images, **self._input_kw(sm))
      params["head"] = self.head.init(r2, tokens)["params"]
    return params

  def token_ids(self, sm, batch):
    """[B, N'] ids of the tokens the student outputs among the teacher's 1 + L (cls first)."""
    if self.input != "visible":
      return None
    return jnp.concatenate([jnp.zeros((batch, 1), jnp.int32), 1 + sm.keep_ids.astype(jnp.int32)], axis=1)

  def teacher_targets(self, teacher_params, images, ids=None):
    """The teacher's targets on its view `images`, restricted to the tokens `ids` [B, N'] when
    given: ('relation', (q, k, v)) or ('tokens', [B, N', D_t] whitened). No gradient."""
    _, enc, block, depth = self.teacher
    if self.target == "relation":
      (q, k, v), _, _ = block_qkv(enc, teacher_params, images, block)
      out = (q, k, v)
      if ids is not None:
        out = tuple(vit.take_rows(t, ids) for t in out)
      return jax.tree.map(jax.lax.stop_gradient, out)
    if block == depth - 1:
      tokens = enc.apply({"params": teacher_params}, images)
    else:
      _, inter = enc.apply({"params": teacher_params}, images, mutable=["intermediates"])
      tokens = inter["intermediates"]["encoder"]["block_outputs"][block]
    if ids is not None:
      tokens = vit.take_rows(tokens, ids)
    return jax.lax.stop_gradient(whiten(tokens))

  def objective(self, params, teacher_target, images, sm, rng, train=True):
    """(loss, metrics) of the student on `images` against the teacher's target."""
    kw = dict(self._input_kw(sm), deterministic=not train,
              rngs={"dropout": rng} if train else None)
    if self.target == "relation":
      (q, k, v), _, _ = block_qkv(self.encoder, params["encoder"], images, self.student_depth - 1, **kw)
      tq, tk, tv = teacher_target
      h_t, h_s = self.teacher_heads, self.relation_heads
      qk = relation_kl(relation_logits(tq, tk, h_t), relation_logits(q, k, h_s))
      vv = relation_kl(relation_logits(tv, tv, h_t), relation_logits(v, v, h_s))
      return qk + vv, {"qk_loss": qk, "vv_loss": vv}
    tokens = self.encoder.apply({"params": params["encoder"]}, images, **kw)
    pred = self.head.apply({"params": params["head"]}, tokens)
    if self.target == "cls":
      pred, teacher_target = pred[:, :1], teacher_target[:, :1]
    return smooth_l1(pred, teacher_target, self.beta), {}

  def loss(self, params, state, images, rng, step):
    if isinstance(images, dict):
      student, teacher_view = images["student"], images["teacher"]
    else:
      student = images.astype(jnp.float32)
      teacher_view = self._to_teacher_input(student)
    mrng, drng = jax.random.split(rng)
    b = student.shape[0]
    sm = self.make_mask(mrng, b) if self.input != "raw" else None
    target = self.teacher_targets(state["teacher"], teacher_view, self.token_ids(sm, b))
    loss, metrics = self.objective(params, target, student, sm, drng)
    if sm is not None:
      metrics["mask_ratio"] = jnp.mean(sm.mask)
    return loss, metrics
