"""BEiT: BERT Pre-Training of Image Transformers (Bao et al., ICLR 2022), and BEiT v2's
cls-token pretraining (Peng et al., 2022), on a tokenizer trained with mim_jax.

Exact to microsoft/unilm `beit/modeling_pretrain.py`, `beit/engine_for_pretraining.py`,
`beit/masking_generator.py`, `beit/datasets.py` and, for v2, `beit2/modeling_pretrain.py`
(`VisionTransformerForMaskedImageModelingCLS`) and `beit2/engine_for_pretraining.py`:
  * block-wise masking (`masking.block_mask`: at most `num_mask_patches` patches, rectangles
    of at least `min_mask_patches_per_block`, aspect ratio 0.3 to 1/0.3); v2's generator
    (`beit2/masking_generator.py`, `beit.exact_mask_count`) then masks uniformly drawn single
    patches until exactly `num_mask_patches` are masked;
  * a learnable mask token replaces the embeddings of the masked patches before the encoder,
    which runs over all tokens (BEiT ViT: q and v biases, layer scale, a shared relative
    position bias, no absolute position embedding, drop path; all in config.model);
  * `lm_head` (Linear width -> codebook size) on the final-norm outputs of the masked patches
    only; cross-entropy against the tokenizer's ids of those patches, averaged over all
    masked patches of the batch; the masked-token accuracy is logged (`mlm_acc`);
  * init: trunc-normal std .02 cut at +-std for every Linear / patch-embedding weight, the cls
    and mask tokens and lm_head, zero biases, proj and fc2 of block l divided by sqrt(2 l)
    (`fix_init_weight`; the ViT's init_style='beit');
  * the tokenizer sees the same augmented crop as the encoder (DataAugmentationForBEiT's second
    picture), resized to the tokenizer's input size (and given the tokenizer run's mean / std
    if they differ); its ids are row-major over its token grid, which must equal the encoder's
    patch grid;
  * augmentation: ColorJitter(0.4, 0.4, 0.4) (PIL ImageEnhance brightness / contrast /
    saturation in a random order per image) on the image, then the trainer's
    RandomResizedCrop + flip;
  * v2 (`beit.cls_pretraining`): the final cls token is concatenated with the patch tokens
    after block `early_layers` and fed through `head_layers` extra blocks (their own drop-path
    rates dpr[early_layers + j] of linspace(0, drop_path, max(depth, early + head)), the shared
    relative position bias, PyTorch's default Linear init with proj / fc2 divided by
    sqrt(2 (early_layers + j + 1)): the official code builds them after its `_init_weights`
    pass), the encoder's final norm and lm_head (`shared_lm_head`; otherwise their own norm and
    a trunc-normal head); loss = CE(main) + CE(cls head), logged as loss_1 / loss_2 and
    mlm_acc_1 / mlm_acc_2.
The tokenizer is a frozen mim_jax run (config.beit.tokenizer = its workdir, loaded with
`mim_jax.teachers.load`); its parameters and state travel in this run's method state
(`external_state`), get no gradient and are checkpointed with the run.
"""
from __future__ import annotations

import math
from typing import Optional

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from mim_jax import masking, teachers
from mim_jax.errors import TrainingError
from mim_jax.methods.base import Method
from mim_jax.models import vit

# ---------------------------------------------------------------------------------------------
# The frozen tokenizer: shared by BEiT and CAE.

class TokenizerTargets:
  """Mixin for methods whose targets are a frozen tokenizer's ids (BEiT, CAE).

  The subclass calls `setup_tokenizer` in __init__. A named run is read there, outside any
  jax trace (the trainer first calls `init` under jax.eval_shape); with no path the method
  still builds (config checks, notebooks) and the one-line error comes when the tokenizer is
  first needed.
  """

  tokenizer_key: str = ""
  tokenizer_path: str = ""
  tokenizer_recipe: str = "configs/tokenizer.py"
  token_grid: int = 0
  _frozen: Optional[teachers.FrozenRun] = None

  def setup_tokenizer(self, key: str, path: str, grid: int, recipe: str = "configs/tokenizer.py") -> None:
    """`key`: the config key naming the run (e.g. 'beit.tokenizer'); `grid`: the patch grid
    the tokenizer's token grid must equal; `recipe`: the config that trains one (for errors)."""
    self.tokenizer_key, self.tokenizer_path, self.token_grid = key, path, grid
    self.tokenizer_recipe = recipe
    if path:
      self.tokenizer  # noqa: B018  (read and check it now)

  def _tokenizer_error(self, why: str):
    return TrainingError(
        f"config.{self.tokenizer_key}={self.tokenizer_path!r}: {why}; train a tokenizer with "
        f"`python -m mim_jax.main --config={self.tokenizer_recipe} --workdir=DIR` and pass "
        f"--config.{self.tokenizer_key}=DIR")

  @property
  def tokenizer(self) -> teachers.FrozenRun:
    if self._frozen is None:
      try:
        with teachers.entered(self.frozen_context):
          run = teachers.load(self.tokenizer_path, key=self.tokenizer_key)
      except (teachers.TeacherError, TrainingError, OSError, ValueError) as e:
        raise self._tokenizer_error(str(e).rstrip(".")) from None
      tok = run.method
      missing = [a for a in ("codebook_size", "image_size", "token_grid", "token_ids")
                 if not hasattr(tok, a)]
      if missing:
        raise self._tokenizer_error(
            f"that run (method {getattr(tok, 'name', type(tok).__name__)!r}) is not a tokenizer "
            f"(it lacks {', '.join(missing)})")
      if int(tok.token_grid) != self.token_grid:
        raise self._tokenizer_error(
            f"its token grid is {tok.token_grid}x{tok.token_grid} but this model's patch grid is "
            f"{self.token_grid}x{self.token_grid} (config.input.image_size / config.model.patch_size); "
            f"use a tokenizer with {self.token_grid} tokens per side or change the patch size")
      self._frozen = run
    return self._frozen

  @property
  def codebook_size(self) -> int:
    return int(self.tokenizer.method.codebook_size)

  def external_state(self) -> dict:
    run = self.tokenizer
    state = run.method_state
    if hasattr(run.method, "frozen_state"):
      # Only what token_ids reads (drops e.g. a VQ-KD teacher's weights).
      state = run.method.frozen_state(state)
    return {"tokenizer": {"params": teachers.host(run.params), "state": teachers.host(state)}}

  def token_ids(self, state, images: jax.Array) -> jax.Array:
    """The frozen tokenizer's ids [B, grid**2] (int32, row-major) of normalised `images`,
    re-normalised with the tokenizer run's mean / std and resized (bicubic) to its input size
    where they differ."""
    run = self.tokenizer
    tok = run.method
    size = int(tok.image_size)
    src = self.config.input
    dst = getattr(run.config, "input", None)
    if dst is not None and (tuple(src.mean) != tuple(dst.mean) or tuple(src.std) != tuple(dst.std)):
      # The tokenizer was trained with another normalisation: give it its own.
      f32 = lambda v: jnp.asarray(v, jnp.float32)  # noqa: E731
      images = (images * f32(src.std) + f32(src.mean) - f32(dst.mean)) / f32(dst.std)
    if images.shape[1] != size or images.shape[2] != size:
      images = jax.image.resize(images, (images.shape[0], size, size, images.shape[3]), "bicubic")
    frozen = jax.lax.stop_gradient(state["tokenizer"])
    return tok.token_ids(frozen["params"], frozen["state"], images).astype(jnp.int32)


def cross_entropy(logits: jax.Array, labels: jax.Array, weights: jax.Array):
  """Mean over the weighted tokens of -log softmax(logits)[label], and the top-1 accuracy.
  logits [..., V] (cast to float32), labels [...] int, weights [...] in {0, 1}."""
  logits = logits.astype(jnp.float32)
  picked = jnp.take_along_axis(logits, labels[..., None], axis=-1)[..., 0]
  ce = jax.nn.logsumexp(logits, axis=-1) - picked
  total = jnp.maximum(jnp.sum(weights), 1.0)
  acc = (jnp.argmax(logits, axis=-1) == labels).astype(jnp.float32)
  return jnp.sum(ce * weights) / total, jnp.sum(acc * weights) / total


# ---------------------------------------------------------------------------------------------
# BEiT v2's cls-token pretraining head.

class ClsPretrainHead(nn.Module):
  """`cls_pt_layers` of BEiT v2: blocks over [final cls token, patch tokens after block
  `early_layers`], returning the un-normalised tokens [B, 1+L, D]."""
  num_heads: int
  early_layers: int
  drop_paths: tuple
  qkv_bias: str = "qv"
  init_values: Optional[float] = None
  attn_impl: Optional[str] = None
  attn_pad: int = -1
  dtype: jnp.dtype = jnp.float32
  param_dtype: jnp.dtype = jnp.float32

  @nn.compact
  def __call__(self, x, bias=None, deterministic=True):
    for j, rate in enumerate(self.drop_paths):
      x = vit.Block(self.num_heads, 4.0, self.qkv_bias, self.init_values, float(rate), "beit",
                    self.early_layers + j + 1, self.attn_impl, self.attn_pad, self.dtype,
                    self.param_dtype, name=f"block{j:02d}")(x, bias, deterministic)
    return x


def torch_default_block(rng: jax.Array, block: dict, layer_id: int) -> dict:
  """A vit.Block's parameters re-drawn with PyTorch's default nn.Linear init (weights and
  biases U(+-1/sqrt(fan_in))), q/v biases, norms and layer scale kept, then proj and fc2
  weights divided by sqrt(2 layer_id) (BEiT v2's `fix_init_cls_pt_weight`)."""
  keys = iter(jax.random.split(rng, 7))

  def uniform(like, fan_in):
    return vit.torch_default_uniform(fan_in)(next(keys), like.shape, like.dtype)

  attn, mlp = dict(block["attn"]), dict(block["mlp"])
  d = attn["qkv_kernel"].shape[0]
  hidden = mlp["fc1"]["kernel"].shape[1]
  scale = 1.0 / math.sqrt(2.0 * layer_id)
  attn["qkv_kernel"] = uniform(attn["qkv_kernel"], d)
  attn["proj"] = {"kernel": uniform(attn["proj"]["kernel"], d) * scale,
                  "bias": uniform(attn["proj"]["bias"], d)}
  mlp["fc1"] = {"kernel": uniform(mlp["fc1"]["kernel"], d), "bias": uniform(mlp["fc1"]["bias"], d)}
  mlp["fc2"] = {"kernel": uniform(mlp["fc2"]["kernel"], hidden) * scale,
                "bias": uniform(mlp["fc2"]["bias"], hidden)}
  return {**block, "attn": attn, "mlp": mlp}


# ---------------------------------------------------------------------------------------------

class BEiT(TokenizerTargets, Method):
  name = "beit"
  # VisionTransformerForMaskedImageModeling.no_weight_decay(): {'pos_embed', 'cls_token'}
  # besides 1-D parameters (the mask token and the relative position bias table are decayed).
  no_decay_names = ("pos_embed", "cls_token")

  def __init__(self, config):
    super().__init__(config)
    c = config.beit
    m = config.model
    self.patch = int(m.patch_size)
    self.grid = self.image_size // self.patch
    self.num_patches = self.grid ** 2
    self.num_mask = int(c.num_mask_patches)
    if not 0 < self.num_mask <= self.num_patches:
      raise ValueError(f"config.beit.num_mask_patches={self.num_mask} must be in 1..{self.num_patches}")
    self.min_per_block = int(c.min_mask_patches_per_block)
    self.max_per_block = int(c.max_mask_patches_per_block) or None     # 0 = None (official)
    self.exact_count = bool(c.get("exact_mask_count", False))         # BEiT v2
    self.jitter = float(c.color_jitter)
    self.cls_pt = bool(c.cls_pretraining)
    self.dtype = jnp.dtype(m.get("dtype", "float32"))
    self.param_dtype = jnp.dtype(m.get("param_dtype", "float32"))
    width, depth, heads = vit.variant(m.variant)
    self.width, self.depth, self.heads = width, m.get("depth", 0) or depth, heads
    self.early = int(c.early_layers)
    self.shared_head = bool(c.shared_lm_head)
    if self.cls_pt:
      if not 1 <= self.early <= self.depth:
        raise ValueError(f"config.beit.early_layers={self.early} must be in 1..{self.depth} (model depth)")
      n = int(c.head_layers)
      rates = np.linspace(0.0, float(m.get("drop_path", 0.0)), max(self.depth, self.early + n))
      rates = tuple(float(r) for r in rates[self.early:self.early + n])
      self.cls_head = ClsPretrainHead(heads, self.early, rates,
                                      m.get("qkv_bias", "qkv"), m.get("init_values", 0.0) or None,
                                      m.get("attn_impl", "") or None, m.get("attn_pad", -1),
                                      self.dtype, self.param_dtype)
    self.setup_tokenizer("beit.tokenizer", c.tokenizer, self.grid,
                         "configs/vqkd.py" if self.cls_pt else "configs/tokenizer.py")

  def encoder_overrides(self):
    return {"use_mask_token": True}

  def describe(self) -> dict:
    c = self.config.beit
    head = {k: c[k] for k in ("cls_pretraining", "early_layers", "head_layers", "shared_lm_head")}
    return {**super().describe(), "beit": head if self.cls_pt else {"cls_pretraining": False}}

  def _lm_head(self, name="lm_head"):
    return nn.Dense(self.codebook_size, dtype=self.dtype, param_dtype=self.param_dtype,
                    kernel_init=vit.trunc_normal(0.02, cutoff=1.0), name=name)

  def _norm(self):
    return vit.layer_norm("norm", self.param_dtype)

  def make_mask(self, rng, batch):
    """[B, L] int32 block-wise mask (1 = masked): at most num_mask_patches per image (BEiT's
    generator); with beit.exact_mask_count (BEiT v2's) the blocks are then filled up with
    uniformly drawn single patches to exactly num_mask_patches."""
    mask = masking.block_mask(rng, batch, self.grid, self.grid, self.num_mask, self.min_per_block,
                              self.max_per_block)
    if self.exact_count:
      mask = masking.fill_to_count(jax.random.fold_in(rng, 1), mask, self.num_mask)
    return mask

  # -- parameters ---------------------------------------------------------------------------
  def init(self, rng, images):
    self.tokenizer  # noqa: B018  (first: a missing tokenizer fails before any work)
    r_enc, r_head, r_cls, r_redraw, r_cls_head = jax.random.split(rng, 5)
    params = {"encoder": self.encoder.init(r_enc, images)["params"]}
    token = jnp.zeros((1, 1, self.width), jnp.float32)
    params["lm_head"] = self._lm_head().init(r_head, token)["params"]
    if self.cls_pt:
      tokens = jnp.zeros((1, self.num_patches + 1, self.width), jnp.float32)
      head = self.cls_head.init(r_cls, tokens, self._bias(params))["params"]
      keys = jax.random.split(r_redraw, len(head))
      params["cls_head"] = {name: torch_default_block(k, head[name], self.early + j + 1)
                            for j, (name, k) in enumerate(zip(sorted(head), keys))}
      if not self.shared_head:
        params["cls_norm"] = self._norm().init(r_cls, token)["params"]
        params["cls_lm_head"] = self._lm_head("cls_lm_head").init(r_cls_head, token)["params"]
    return params

  def _bias(self, params):
    """The encoder's shared relative position bias [1, heads, 1+L, 1+L] (None without one)."""
    if self.config.model.get("rel_pos_bias", "none") != "shared":
      return None
    rpb = vit.RelativePositionBias(self.grid, self.heads, self.param_dtype)
    return rpb.apply({"params": params["encoder"]["rel_pos_bias"]})

  # -- the loss -----------------------------------------------------------------------------
  def preprocess(self, rng, images, input_cfg, on_device_aug):
    from mim_jax.data import preprocess, views
    if self.jitter > 0:
      # DataAugmentationForBEiT jitters the whole image (ColorJitter(s, s, s): hue off), then
      # flips and crops it.
      k_jit, rng = jax.random.split(rng)
      images = views.color_jitter(k_jit, images, self.jitter, self.jitter, self.jitter, 0.0)
    return preprocess.preprocess(rng, images, input_cfg, on_device_aug)

  def logits(self, params, images, mask, rng, train):
    """Logits of the masked patches: ([B, M, V] main, [B, M, V] cls head or None), the patch
    indices they belong to [B, M] and their weights [B, M] (0 = padding), M = num_mask_patches.

    The mask has at most M ones per row; the masked patches come first (in patch order), so
    a fixed M keeps the shapes static and the padding rows get weight 0.
    """
    k_enc, k_head = jax.random.split(rng) if train else (None, None)
    rngs = {"dropout": k_enc} if train else None
    order = jnp.argsort(1 - mask, axis=1, stable=True)[:, :self.num_mask]
    weights = jnp.take_along_axis(mask, order, axis=1).astype(jnp.float32)
    enc = {"params": params["encoder"]}
    if not self.cls_pt:
      tokens = self.encoder.apply(enc, images, mask=mask, deterministic=not train, rngs=rngs)
      x = vit.take_rows(tokens[:, 1:], order)
      return (self._lm_head().apply({"params": params["lm_head"]}, x), None), order, weights
    # The block outputs before the final norm; the attention maps also collected as
    # intermediates are unused and removed by XLA.
    tokens, inter = self.encoder.apply(enc, images, mask=mask, deterministic=not train, rngs=rngs,
                                       mutable=["intermediates"])
    blocks = inter["intermediates"]["encoder"]["block_outputs"]
    x = vit.take_rows(tokens[:, 1:], order)
    main = self._lm_head().apply({"params": params["lm_head"]}, x)
    y = jnp.concatenate([blocks[-1][:, :1], blocks[self.early - 1][:, 1:]], axis=1)
    y = self.cls_head.apply({"params": params["cls_head"]}, y, self._bias(params),
                            deterministic=not train, rngs={"dropout": k_head} if train else None)
    if self.shared_head:
      norm, head = params["encoder"]["encoder"]["norm"], params["lm_head"]
    else:
      norm, head = params["cls_norm"], params["cls_lm_head"]
    y = vit.take_rows(self._norm().apply({"params": norm}, y)[:, 1:], order)
    cls = self._lm_head().apply({"params": head}, y)
    return (main, cls), order, weights

  def loss(self, params, state, images, rng, step):
    images = images.astype(jnp.float32)
    k_mask, k_drop = jax.random.split(rng)
    mask = self.make_mask(k_mask, images.shape[0])
    labels_all = self.token_ids(state, images)
    (main, cls), order, w = self.logits(params, images, mask, k_drop, train=True)
    labels = jnp.take_along_axis(labels_all, order, axis=1)
    loss, acc = cross_entropy(main, labels, w)
    metrics = {"mask_ratio": jnp.mean(mask.astype(jnp.float32))}
    if cls is None:
      return loss, {**metrics, "mlm_acc": acc}
    loss_2, acc_2 = cross_entropy(cls, labels, w)
    return loss + loss_2, {**metrics, "loss_1": loss, "loss_2": loss_2, "mlm_acc_1": acc,
                           "mlm_acc_2": acc_2}
