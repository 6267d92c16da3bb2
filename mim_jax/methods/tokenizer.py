"""Image tokenizers trained here: VQ-VAE, DALL-E's dVAE, BEiT v2's VQ-KD and PeCo's codebook.

BEiT-style methods predict the discrete codes of a frozen image tokenizer. The DALL-E dVAE's
weights cannot be downloaded, so mim_jax trains its own tokenizers, as a method of their own;
a consumer (BEiT, CAE) reads the finished run with `mim_jax.teachers.load(workdir)` and calls
`Tokenizer.token_ids` (see THE TOKENIZER CONTRACT below).

One method, three recipes (configs/tokenizer.py, configs/vqkd.py, configs/peco.py):

  * VQ-VAE on pixels (van den Oord et al., 2017), exact to sonnet's VQ-VAE: the convolutional
    encoder / decoder of sonnet's `examples/vqvae_example.ipynb` (two 4x4 stride-2 convolutions
    of hidden/2 and hidden channels, a 3x3 convolution, a residual stack of (ReLU, 3x3 conv to
    res_hidden, ReLU, 1x1 conv) blocks and a final ReLU; a 1x1 convolution to the code
    dimension; the decoder mirrors it with 4x4 stride-2 transposed convolutions; sonnet's
    truncated-normal 1/sqrt(fan_in) weights, zero biases), `VectorQuantizerEMA` (decay 0.99,
    epsilon 1e-5, commitment cost 0.25) or `VectorQuantizer` (straight-through codebook).
    The number of stride-2 layers is log2 of the consumer's patch size (2 at patch 4, as in
    sonnet; 4 at patch 16, the first ones with hidden/2 channels), so the token grid is the
    consumer ViT's patch grid. Loss: mean squared error on the normalised pixels + the
    quantiser's loss.
  * dVAE (DALL-E, Ramesh et al., 2021): `config.tokenizer.quantizer='gumbel'` on the same
    networks. The code layer outputs logits over the `codebook_size` codes per position (the
    1x1 convolution at the end of DALL-E's encoder); training decodes the gumbel-softmax relaxed
    sample times the codebook (the 1x1 convolution at the start of DALL-E's decoder), the
    temperature and the KL weight annealed by `config.tokenizer.gumbel` (see
    mim_jax/models/quantizer.py); loss: the pixel loss + beta_t * KL(q(z|x) || uniform) / (p*p*3)
    (DALL-E's beta / 192 at p = 8; the divisor is 1 for teacher targets, whose loss is per
    token). `token_ids` is the logits' argmax. `config.tokenizer.arch='dalle'` swaps in
    DALL-E's encoder (DalleEncoder below; what `python -m mim_jax.convert --arch=dalle` fills
    with OpenAI's released weights). Deviations: the decoder (and, with arch 'conv', the
    encoder) is the sonnet stack above, not DALL-E's bottleneck ResNet (7x7 input
    convolution, max-pooling, nearest-neighbour upsampling, post-gain 1/n_layers^2), and the
    reconstruction term is the tokenizer's mean squared (or L1) error on the normalised pixels,
    not DALL-E's logit-Laplace likelihood (appendix A.3; a decoder with six output maps, mu and
    ln b per channel): its scale against the KL term differs, so the paper's beta = 6.6 is a
    starting point, not a tuned value, here.
  * VQ-KD (BEiT v2; microsoft/unilm beit2/modeling_vqkd.py, norm_ema_quantizer.py): a ViT
    encoder (config.model) on the image, a task layer Linear-Tanh-Linear to a 32-d code, the
    l2-normalised EMA codebook (`norm_ema`, decay 0.99, optional k-means init), a ViT decoder on
    the code map (patch size 1, learned position embedding, its final norm on the patch tokens)
    and a task layer Linear-Tanh-Linear to the teacher's width; loss
    mean over tokens of 1 - cos(prediction, teacher patch token) + mean((sg e - z)^2).
    The teacher is any mim_jax run (its encoder's final-norm patch tokens), e.g. an MAE run.
    `config.tokenizer.official_init` (configs/vqkd.py) redraws every parameter as the
    official VQKD initialises it (`official_vqkd_init`: timm's practically uncut
    trunc-normal .02, the proj/fc2 depth rescale, PyTorch's default patch-embedding conv).
  * PeCo (Dong et al., AAAI 2023): the pixel VQ-VAE with an added perceptual loss, the squared
    distance of a self-supervised ViT's block outputs for the image and its reconstruction,
    averaged over patch tokens and channels and summed over the chosen blocks
    (sum_l 1 / (C_l H_l W_l) |f_l(x) - f_l(x_rec)|^2); the network is a mim_jax run. Its
    pixel loss is VQGAN's, on [-1, 1] images (`config.tokenizer.pixel_space='minus_one_one'`:
    image and reconstruction mapped by x -> 2 (x std + mean) - 1 before the L1; the default
    'normalized' takes the error on the trainer's normalised pixels).

The codebook rules, dead-code restarts and the batch statistics behind the EMA updates are in
mim_jax/models/quantizer.py. Logged: codebook_usage (fraction of the codes used in the batch)
and perplexity (exp of the entropy of the batch's average code assignment; 'gumbel': of the
argmax codes), beside the loss terms ('gumbel' adds kl, the mean KL to uniform per position, and
the schedules' temperature and kl_weight); under gradient accumulation: their mean over the
micro-batches.

THE TOKENIZER CONTRACT (shared with mim_jax/methods/beit.py and cae.py). A Tokenizer has
  * `codebook_size: int`;
  * `image_size: int` (its input resolution) and `token_grid: int` (tokens per side; ids are
    row-major over the grid);
  * `token_ids(params, method_state, images) -> int32 [B, token_grid**2]`, images normalised
    NHWC float at `image_size` with the trainer's ImageNet mean/std; pure and jittable.
`token_ids` reads only params['encoder'], params['to_code'], params['quantizer'] (straight-through
codebooks) and method_state['quantizer'] ('gumbel': the encoder and the code layer only): a
consumer may drop the rest of the state (e.g. a VQ-KD teacher's weights, method_state['teacher'])
with `Tokenizer.frozen_state`.

The trainer's evaluators read `features`: the ViT encoder's pooled tokens (arch 'vit') or the
conv encoder's spatially averaged output (arch 'conv'). The reconstruction picture shows the
token ids as colours (the 'masked' column) and the decoded image (pixel targets) or, for
VQ-KD, each token's code painted with the average patch of that code in the picture's batch.
"""
from __future__ import annotations

import math

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from mim_jax.methods.base import Method, path_names
from mim_jax.models import quantizer as vq
from mim_jax.models import vit
from mim_jax.targets import pixels


def fan_in_trunc_normal(key, shape, dtype=jnp.float32):
  """sonnet's default conv weights: truncated normal (cut at 2 std, not rescaled) with
  std 1/sqrt(fan_in), fan_in = kernel height x width x input channels (`shape[:-1]`)."""
  std = 1.0 / math.sqrt(float(np.prod(shape[:-1])))
  # Drawn flat and reshaped: the same numbers, and XLA:CPU compiles the 4-D draw ~7x slower.
  flat = jax.random.truncated_normal(key, -2.0, 2.0, (int(np.prod(shape)),), dtype)
  return std * flat.reshape(shape)


def _conv(features, kernel, stride=1, dtype=jnp.float32, name=None):
  return nn.Conv(features, (kernel, kernel), (stride, stride), padding="SAME", dtype=dtype,
                 kernel_init=fan_in_trunc_normal, name=name)


class ResidualStack(nn.Module):
  """sonnet ResidualStack: h += conv1x1(relu(conv3x3(relu(h)))) per layer, then relu."""
  hidden: int
  res_hidden: int
  layers: int
  dtype: jnp.dtype = jnp.float32

  @nn.compact
  def __call__(self, h):
    for i in range(self.layers):
      r = _conv(self.res_hidden, 3, dtype=self.dtype, name=f"res3x3_{i}")(nn.relu(h))
      h = h + _conv(self.hidden, 1, dtype=self.dtype, name=f"res1x1_{i}")(nn.relu(r))
    return nn.relu(h)


class ConvEncoder(nn.Module):
  """sonnet's VQ-VAE encoder with `num_down` stride-2 4x4 convolutions: [B,H,W,3] -> [B,h,w,hidden]."""
  hidden: int
  res_hidden: int
  res_layers: int
  num_down: int
  dtype: jnp.dtype = jnp.float32

  @nn.compact
  def __call__(self, x):
    h = x.astype(self.dtype)
    for i in range(self.num_down):
      ch = self.hidden if i == self.num_down - 1 else self.hidden // 2
      h = nn.relu(_conv(ch, 4, 2, self.dtype, name=f"enc_down{i}")(h))
    h = nn.relu(_conv(self.hidden, 3, dtype=self.dtype, name="enc_3x3")(h))
    return ResidualStack(self.hidden, self.res_hidden, self.res_layers, self.dtype, name="residual")(h)


class DalleEncoderBlock(nn.Module):
  """DALL-E's encoder block (openai/DALL-E dall_e/encoder.py EncoderBlock): id_path (a 1x1
  convolution when the width changes) + post_gain x res_path, res_path = (ReLU, 3x3 conv to
  out/4, ReLU, 3x3, ReLU, 3x3, ReLU, 1x1 conv to out), post_gain = 1 / n_layers**2."""
  out: int
  n_layers: int
  dtype: jnp.dtype = jnp.float32

  @nn.compact
  def __call__(self, x):
    hid = self.out // 4
    ident = x if x.shape[-1] == self.out else _conv(self.out, 1, dtype=self.dtype, name="id_path")(x)
    h = x
    for i, (width, kernel) in enumerate([(hid, 3), (hid, 3), (hid, 3), (self.out, 1)], 1):
      h = _conv(width, kernel, dtype=self.dtype, name=f"conv_{i}")(nn.relu(h))
    return ident + h * (1.0 / self.n_layers ** 2)


class DalleEncoder(nn.Module):
  """DALL-E's dVAE encoder up to its output convolution (dall_e/encoder.py Encoder): a 7x7
  convolution to `hidden`, then `num_down + 1` groups of `blocks` blocks of widths hidden x
  1, 2, 4, 8 ..., a 2x2 max-pool after every group but the last, and the output's ReLU:
  [B,H,W,3] -> [B,H/2^n,W/2^n,hidden*2^n]. DALL-E: hidden 256, 2 blocks per group, n = 3."""
  hidden: int
  blocks: int
  num_down: int
  dtype: jnp.dtype = jnp.float32

  @nn.compact
  def __call__(self, x):
    n_layers = (self.num_down + 1) * self.blocks
    h = _conv(self.hidden, 7, dtype=self.dtype, name="input")(x.astype(self.dtype))
    for g in range(self.num_down + 1):
      for b in range(self.blocks):
        h = DalleEncoderBlock(self.hidden * 2 ** g, n_layers, self.dtype,
                              name=f"group_{g + 1}_block_{b + 1}")(h)
      if g < self.num_down:
        h = nn.max_pool(h, (2, 2), strides=(2, 2))
    return nn.relu(h)


class ConvDecoder(nn.Module):
  """sonnet's VQ-VAE decoder: codes [B, L, D] on a g x g grid -> image [B, g*2^n, g*2^n, 3]."""
  hidden: int
  res_hidden: int
  res_layers: int
  num_down: int
  dtype: jnp.dtype = jnp.float32

  @nn.compact
  def __call__(self, codes):
    b, n, d = codes.shape
    g = int(round(n ** 0.5))
    h = _conv(self.hidden, 3, dtype=self.dtype, name="dec_3x3")(codes.reshape(b, g, g, d).astype(self.dtype))
    h = ResidualStack(self.hidden, self.res_hidden, self.res_layers, self.dtype, name="residual")(h)
    for i in range(self.num_down):
      last = i == self.num_down - 1
      h = nn.ConvTranspose(3 if last else self.hidden // 2, (4, 4), (2, 2), padding="SAME",
                           dtype=self.dtype, kernel_init=fan_in_trunc_normal, name=f"dec_up{i}")(h)
      if not last:
        h = nn.relu(h)
    return h.astype(jnp.float32)


class TaskLayer(nn.Module):
  """VQ-KD's encode/decode task layer: Linear(hidden) - Tanh - Linear(out), weights
  trunc_normal(std .02) (timm's bounds are +-2 absolute: no cut in practice), zero biases."""
  hidden: int
  out_dim: int

  @nn.compact
  def __call__(self, x):
    init = nn.initializers.normal(0.02)
    x = nn.Dense(self.hidden, kernel_init=init, name="fc1")(x.astype(jnp.float32))
    return nn.Dense(self.out_dim, kernel_init=init, name="fc2")(jnp.tanh(x))


class CodeDecoder(nn.Module):
  """VQ-KD's decoder: a ViT with patch size 1 over the g x g code map, then a task layer on
  its (final-norm) patch tokens: codes [B, L, D] -> [B, L, out_dim]."""
  backbone: nn.Module       # a vit.ViT with patch_size 1 and image_size g
  out_dim: int

  @nn.compact
  def __call__(self, codes):
    b, n, d = codes.shape
    g = int(round(n ** 0.5))
    tokens = self.backbone(codes.reshape(b, g, g, d))
    return TaskLayer(self.backbone.width, self.out_dim, name="task")(tokens[:, 1:])


# ---------------------------------------------------------------------------------------------
# VQ-KD's official initialisation (config.tokenizer.official_init).

# timm's trunc_normal_(std=.02), what beit2's modeling_vqkd.py and modeling_finetune.py import
# (bounds +-2 absolute: in practice an uncut N(0, .02^2); see vit.timm_trunc_normal).
_timm_trunc02 = vit.timm_trunc_normal(0.02)


# Folded into the init key for the redraw, so that the key split of `Tokenizer.init` (and with
# it every other tokenizer's numbers) stays as it is.
_OFFICIAL_INIT_SALT = 0x0FF1C1A1


def official_vqkd_init(rng: jax.Array, params: dict) -> dict:
  """Redraws an arch='vit' tokenizer's parameters as BEiT v2's VQKD initialises them.

  microsoft/unilm beit2/modeling_vqkd.py `VQKD.__init__` builds the encoder and the decoder
  as modeling_finetune.py's `VisionTransformer` (num_classes 0: no head, so init_scale acts on
  nothing; init_values 0: no layer scale; no relative position bias) and applies
  `VQKD._init_weights` to the two task layers. `VisionTransformer.__init__` draws pos_embed
  and cls_token with timm's trunc_normal_(std=.02), applies `_init_weights` (Linear weights
  trunc_normal_(std=.02), Linear biases 0, LayerNorm weight 1 and bias 0) and then
  `fix_init_weight` (block i's attn.proj and mlp.fc2 weights divided by sqrt(2 i), i from 1).
  Neither of the two touches the Conv2d patch embeddings (the encoder's p x p conv from 3
  channels, the decoder's 1x1 conv from the code dimension): they keep PyTorch's default,
  kaiming_uniform_(a=sqrt(5)) for the weight and the bias alike U(+-1/sqrt(fan_in)), with
  fan_in = p p C_in. Hence, leaf by leaf, in both ViTs and both task layers:
    patch_embed/proj kernel and bias      U(+-1/sqrt(fan_in))
    cls_token, pos_embed, every kernel    N(0, .02^2), cut at +-2 (timm): qkv, proj, fc1, fc2
                                          and the task layers' fc1, fc2
    blockNN attn/proj, mlp/fc2 kernels    that, divided by sqrt(2 (NN + 1))
    Linear biases, q_bias, v_bias         0 (q_bias, v_bias are torch.zeros parameters)
    LayerNorm scale, bias                 1, 0 (norm1, norm2 and the final norm)
    gamma_1, gamma_2, rel_pos_bias        kept (init_values x ones and zeros, as the official)
    quantizer                             kept ('norm_ema' has its codebook in the state)
  A parameter no rule names is a ValueError. Every draw of the ViTs' 'beit' init style (cut
  at +-1 std, a trunc-normal patch embedding) is replaced."""
  leaves, treedef = jax.tree_util.tree_flatten_with_path(params)
  named = [(path_names(path), x) for path, x in leaves]
  fan_in = {n[:-1]: x.shape[0] for n, x in named if "patch_embed" in n and n[-1] == "kernel"}
  out = []
  for i, (names, x) in enumerate(named):
    key = jax.random.fold_in(rng, i)
    leaf = names[-1]
    kept = names[0] == "quantizer" or leaf in ("gamma_1", "gamma_2") or "rel_pos_bias" in names
    if kept:
      pass
    elif "patch_embed" in names:
      x = vit.torch_default_uniform(fan_in[names[:-1]])(key, x.shape, x.dtype)
    elif leaf in ("cls_token", "pos_embed", "kernel", "qkv_kernel"):
      x = _timm_trunc02(key, x.shape, x.dtype)
      rescaled = names[-3:-1] in (("attn", "proj"), ("mlp", "fc2"))
      if rescaled and len(names) >= 4 and names[-4].startswith("block"):    # fix_init_weight
        x = x / math.sqrt(2.0 * (int(names[-4][len("block"):]) + 1))
    elif leaf in ("bias", "q_bias", "v_bias", "qkv_bias"):
      x = jnp.zeros_like(x)
    elif leaf == "scale":
      x = jnp.ones_like(x)
    else:
      raise ValueError(f"official_vqkd_init has no rule for the parameter {'/'.join(names)}")
    out.append(x)
  return jax.tree_util.tree_unflatten(treedef, out)


def _palette(num_codes: int) -> np.ndarray:
  """A fixed colour in [0.1, 0.9]^3 per code, for the token-map picture."""
  return np.random.RandomState(0).uniform(0.1, 0.9, (num_codes, 3)).astype(np.float32)


class Tokenizer(Method):
  name = "tokenizer"
  # VQ-KD's no_weight_decay (pos_embed, cls_token of both ViTs, the codebook) + 1-D parameters.
  no_decay_names = ("pos_embed", "cls_token", "codebook")

  def __init__(self, config):
    super().__init__(config)
    t = config.tokenizer
    self.t = t
    self.arch = t.arch
    self.patch = int(config.model.patch_size)
    self.token_grid = self.image_size // self.patch
    self.num_tokens = self.token_grid ** 2
    self.codebook_size = int(t.codebook_size)
    self.code_dim = int(t.code_dim)
    self.target = t.target
    self.pixel_loss = t.pixel_loss
    self.perceptual_weight = float(t.perceptual_weight)
    self.perceptual_layers = tuple(int(l) for l in t.perceptual_layers)
    self.batch_size = int(config.input.batch_size)
    self.quantizer = vq.Quantizer(
        kind=t.quantizer, codebook_size=self.codebook_size, dim=self.code_dim, beta=float(t.beta),
        codebook_weight=float(t.codebook_weight),
        decay=float(t.decay), epsilon=float(t.epsilon), kmeans_init=bool(t.kmeans_init),
        kmeans_iters=int(t.kmeans_iters), restart_after=int(t.restart_after),
        init_seed=int(config.seed), **self.gumbel_settings(t))
    if self.target not in ("pixels", "teacher"):
      raise ValueError(f"unknown tokenizer target {self.target!r}: set config.tokenizer.target "
                       f"to 'pixels' or 'teacher'")
    if self.pixel_loss not in ("mse", "l1"):
      raise ValueError(f"unknown pixel loss {self.pixel_loss!r}: set config.tokenizer.pixel_loss "
                       f"to 'mse' or 'l1'")
    self.pixel_space = t.get("pixel_space", "normalized")
    if self.pixel_space not in ("normalized", "minus_one_one"):
      raise ValueError(f"unknown pixel space {self.pixel_space!r}: set config.tokenizer.pixel_space "
                       f"to 'normalized' or 'minus_one_one'")
    self.use_official_init = bool(t.get("official_init", False))
    if self.use_official_init and t.arch != "vit":
      raise ValueError("config.tokenizer.official_init is VQ-KD's ViT initialisation: set "
                       "config.tokenizer.arch='vit' or config.tokenizer.official_init=False")
    if self.target == "teacher" and self.perceptual_weight:
      raise ValueError("a perceptual loss needs pixel targets: set config.tokenizer.perceptual_weight=0 "
                       "or config.tokenizer.target='pixels'")
    if self.perceptual_weight and not self.perceptual_layers:
      raise ValueError("config.tokenizer.perceptual_weight > 0 needs the teacher blocks in "
                       "config.tokenizer.perceptual_layers (1-based), e.g. (3, 6, 9, 12)")
    m = config.model
    dtype = jnp.dtype(m.get("dtype", "float32"))
    if self.arch in ("conv", "dalle"):
      num_down = int(round(math.log2(self.patch)))
      if 2 ** num_down != self.patch or num_down < 1:
        raise ValueError(f"the {self.arch} tokenizer downsamples by powers of 2: "
                         f"config.model.patch_size={self.patch} must be 2, 4, 8, 16 ...")
      c = t.conv
      if self.arch == "conv":
        self.conv_encoder = ConvEncoder(int(c.hidden), int(c.res_hidden), int(c.res_layers), num_down, dtype)
      else:
        d = t.get("dalle", None)
        if d is None:
          raise ValueError("arch='dalle' needs config.tokenizer.dalle: build config.tokenizer from "
                           "mim_jax.methods.tokenizer.default_tokenizer_config()")
        self.conv_encoder = DalleEncoder(int(d.hidden), int(d.blocks_per_group), num_down, dtype)
      self.to_code = nn.Conv(self.quantizer.logit_dim, (1, 1), kernel_init=fan_in_trunc_normal,
                             dtype=dtype)
      if self.target == "teacher":
        raise ValueError("teacher targets need the ViT decoder: set config.tokenizer.arch='vit'")
      self._decoder = ConvDecoder(int(c.hidden), int(c.res_hidden), int(c.res_layers), num_down, dtype)
    elif self.arch == "vit":
      self.to_code = TaskLayer(self.encoder.width, self.quantizer.logit_dim)
      self._decoder = None     # built lazily: its output width may be the teacher's
    else:
      raise ValueError(f"unknown tokenizer arch {self.arch!r}: set config.tokenizer.arch to 'conv', "
                       f"'dalle' or 'vit'")
    self._teacher_method = None

  def gumbel_settings(self, t) -> dict:
    """The 'gumbel' quantiser's schedules (config.tokenizer.gumbel) and its KL divisor: the
    target values per token (p x p x 3 pixel values; 1 for teacher targets, whose loss is a
    mean over tokens already)."""
    g = t.get("gumbel", None)
    if g is None:
      if t.quantizer == "gumbel":
        raise ValueError("quantizer='gumbel' needs config.tokenizer.gumbel: build config.tokenizer "
                         "from mim_jax.methods.tokenizer.default_tokenizer_config()")
      return {}
    divisor = self.patch * self.patch * 3 if t.target == "pixels" else 1
    return dict(tau_start=float(g.tau_start), tau_end=float(g.tau_end), tau_steps=int(g.tau_steps),
                kl_weight=float(g.kl_weight), kl_steps=int(g.kl_steps), kl_divisor=float(divisor))

  # -- the teacher (VQ-KD targets, PeCo's perceptual network) -------------------------------
  @property
  def needs_teacher(self) -> bool:
    return self.target == "teacher" or self.perceptual_weight > 0

  def teacher_method(self):
    """The teacher run's Method (its modules), read from its config.json once."""
    if self._teacher_method is None:
      from mim_jax import methods, teachers
      with teachers.entered(self.frozen_context):
        try:
          config = teachers.run_config(self.t.teacher, "tokenizer.teacher")
        except teachers.TeacherError:
          raise teachers.TeacherError(
              f"the tokenizer's teacher run {self.t.teacher!r} does not exist: train one (e.g. "
              f"configs/mae.py) and set --config.tokenizer.teacher=/path/to/its/workdir") from None
        self._teacher_method = methods.get(config)
    return self._teacher_method

  def external_state(self) -> dict:
    if not self.needs_teacher:
      return {}
    from mim_jax import teachers
    self.teacher_method()   # the clear error for a missing path
    with teachers.entered(self.frozen_context):
      run = teachers.load(self.t.teacher, key="tokenizer.teacher")
    self._teacher_method = run.method
    which = self.t.teacher_encoder
    if which == "online":
      enc = run.params["encoder"]
    elif which == "ema":
      if "ema_encoder" not in run.method_state:
        raise teachers.TeacherError(f"{self.t.teacher} has no EMA encoder: set "
                                    f"config.tokenizer.teacher_encoder='online'")
      enc = run.method_state["ema_encoder"]
    else:
      raise ValueError(f"config.tokenizer.teacher_encoder must be 'online' or 'ema', got {which!r}")
    return {"teacher": enc}

  def teacher_input(self, images: jax.Array) -> jax.Array:
    """This run's normalised images in the teacher's normalisation and resolution (bicubic)."""
    tm = self.teacher_method()
    src, dst = self.config.input, tm.config.input
    x = images
    if tuple(src.mean) != tuple(dst.mean) or tuple(src.std) != tuple(dst.std):
      s_mean, s_std = jnp.asarray(src.mean, jnp.float32), jnp.asarray(src.std, jnp.float32)
      d_mean, d_std = jnp.asarray(dst.mean, jnp.float32), jnp.asarray(dst.std, jnp.float32)
      x = (x * s_std + s_mean - d_mean) / d_std
    if tm.image_size != self.image_size:
      x = jax.image.resize(x, (x.shape[0], tm.image_size, tm.image_size, x.shape[3]), "bicubic")
    return x

  def teacher_tokens(self, state, images: jax.Array) -> jax.Array:
    """The teacher encoder's final-norm patch tokens [B, L, C] (VQ-KD's regression target)."""
    tm = self.teacher_method()
    tokens = tm.encoder.apply({"params": state["teacher"]}, self.teacher_input(images))
    if tokens.shape[1] - 1 != self.num_tokens:
      raise ValueError(f"the teacher has {tokens.shape[1] - 1} patch tokens, the tokenizer "
                       f"{self.num_tokens}: give both the same patch grid (config.model.patch_size, "
                       f"config.input.image_size) or another teacher run")
    return tokens[:, 1:].astype(jnp.float32)

  def teacher_blocks(self, state, images: jax.Array) -> list:
    """The teacher's block outputs [B, 1+L, C] (before the final norm), one per block."""
    tm = self.teacher_method()
    _, inter = tm.encoder.apply({"params": state["teacher"]}, self.teacher_input(images),
                                mutable=["intermediates"])
    return list(inter["intermediates"]["encoder"]["block_outputs"])

  def perceptual_loss(self, state, images: jax.Array, rec: jax.Array) -> jax.Array:
    """sum over the chosen blocks l of mean over patch tokens and channels of
    (f_l(x) - f_l(x_rec))^2; the teacher runs once over [x; x_rec]."""
    b = images.shape[0]
    blocks = self.teacher_blocks(state, jnp.concatenate([jax.lax.stop_gradient(images), rec]))
    for l in self.perceptual_layers:
      if not 1 <= l <= len(blocks):
        raise ValueError(f"config.tokenizer.perceptual_layers names block {l}; the teacher has "
                         f"blocks 1..{len(blocks)}")
    total = 0.0
    for l in self.perceptual_layers:
      f = blocks[l - 1][:, 1:].astype(jnp.float32)
      total = total + jnp.mean((jax.lax.stop_gradient(f[:b]) - f[b:]) ** 2)
    return total

  # -- the networks -------------------------------------------------------------------------
  @property
  def out_dim(self) -> int:
    if self.target == "teacher":
      return self.teacher_method().encoder.width
    return self.patch * self.patch * 3

  @property
  def decoder_vit(self) -> vit.ViT:
    d = self.t.decoder
    return vit.vit_from_config(self.config.model, self.token_grid, variant=d.variant,
                               depth=int(d.depth), patch_size=1, drop_path=0.0)

  @property
  def decoder(self):
    if self._decoder is None:
      self._decoder = CodeDecoder(self.decoder_vit, self.out_dim)
    return self._decoder

  def backbone(self, encoder_params, images: jax.Array) -> jax.Array:
    """The encoder's output before the code layer: [B, L, width] (ViT patch tokens) or
    [B, g, g, hidden] (conv)."""
    if self.arch != "vit":
      return self.conv_encoder.apply({"params": encoder_params}, images)
    return self.encoder.apply({"params": encoder_params}, images)[:, 1:]

  def codes(self, params, images: jax.Array) -> jax.Array:
    """Pre-quantisation codes z [B, L, code_dim] (row-major over the token grid); for
    'gumbel' the logits over the codes [B, L, codebook_size]."""
    h = self.backbone(params["encoder"], images.astype(jnp.float32))
    z = self.to_code.apply({"params": params["to_code"]}, h).astype(jnp.float32)
    return z.reshape(z.shape[0], -1, self.quantizer.logit_dim)

  def decode(self, params, codes: jax.Array) -> jax.Array:
    """Quantised codes [B, L, code_dim] -> image [B, H, W, 3] (pixel targets) or predicted
    teacher tokens [B, L, C]."""
    out = self.decoder.apply({"params": params["decoder"]}, codes)
    if self.arch == "vit" and self.target == "pixels":
      out = pixels.unpatchify(out, self.patch)
    return out.astype(jnp.float32)

  def init(self, rng, images):
    r_enc, r_code, r_q, r_dec = jax.random.split(rng, 4)
    images = images.astype(jnp.float32)
    if self.arch != "vit":
      enc = self.conv_encoder.init(r_enc, images)["params"]
    else:
      enc = self.encoder.init(r_enc, images)["params"]
    h = self.backbone(enc, images)
    params = {"encoder": enc, "to_code": self.to_code.init(r_code, h)["params"]}
    qp = self.quantizer.init_params(r_q)
    if qp:
      params["quantizer"] = qp
    codes = jnp.zeros((images.shape[0], self.num_tokens, self.code_dim), jnp.float32)
    params["decoder"] = self.decoder.init(r_dec, codes)["params"]
    if self.use_official_init:
      params = official_vqkd_init(jax.random.fold_in(rng, _OFFICIAL_INIT_SALT), params)
    return params

  def init_state(self, params):
    return {**super().init_state(params), "quantizer": self.quantizer.init_state(params.get("quantizer", {}))}

  def update_state(self, params, state, step, stats=None):
    state = super().update_state(params, state, step, stats)
    q = self.quantizer.update(params.get("quantizer", {}), state["quantizer"], stats, self.batch_size)
    return {**state, "quantizer": q}

  # -- the loss -----------------------------------------------------------------------------
  def forward(self, params, state, images, rng, step=None):
    """(quantiser output, decoded output); `step` (updates done) drives the 'gumbel'
    schedules, and None there decodes the argmax codes (the other rules ignore it)."""
    z = self.codes(params, images)
    qo = self.quantizer(params.get("quantizer", {}), state["quantizer"], z, rng, step=step)
    return qo, self.decode(params, qo.quantized)

  def loss(self, params, state, images, rng, step):
    images = images.astype(jnp.float32)
    qo, out = self.forward(params, state, images, rng, step)
    metrics = {"vq_loss": qo.loss, **qo.metrics}
    if self.target == "teacher":
      target = jax.lax.stop_gradient(self.teacher_tokens(state, images))
      rec_loss = jnp.mean(1.0 - jnp.sum(vq.l2norm(out) * vq.l2norm(target), axis=-1))
      total = rec_loss + qo.loss
    else:
      diff = out - images
      if self.pixel_space == "minus_one_one":
        # Both images on VQGAN's [-1, 1] scale, x11 = 2 (x std + mean) - 1: their difference
        # is the normalised one times 2 std, per channel.
        diff = diff * (2.0 * jnp.asarray(self.config.input.std, jnp.float32))
      rec_loss = jnp.mean(diff * diff) if self.pixel_loss == "mse" else jnp.mean(jnp.abs(diff))
      total = rec_loss + qo.loss
      if self.perceptual_weight:
        p = self.perceptual_loss(state, images, out)
        metrics["perceptual_loss"] = p
        total = total + self.perceptual_weight * p
    metrics["rec_loss"] = rec_loss
    if qo.stats:
      metrics["state_stats"] = qo.stats
    return total, metrics

  # -- the contract and the evaluators ------------------------------------------------------
  def token_ids(self, params, method_state, images: jax.Array) -> jax.Array:
    """int32 [B, token_grid**2]: each token's nearest code, or for 'gumbel' the argmax of its
    logits (row-major over the grid)."""
    z = self.codes(params, images)
    return self.quantizer.ids(params.get("quantizer", {}), method_state["quantizer"], z)

  @staticmethod
  def frozen_state(method_state) -> dict:
    """The part of the method state `token_ids` reads (drops a teacher, EMA encoders)."""
    return {"quantizer": method_state["quantizer"]}

  def features(self, params, state, images):
    if self.arch == "vit":
      return super().features(params, state, images)
    h = self.backbone(params["encoder"], images.astype(jnp.float32))
    return {"online": jnp.mean(h, axis=(1, 2)).astype(jnp.float32)}

  def layer_features(self, params, state, images, pooling):
    if self.arch != "vit":
      raise ValueError(f"the {self.arch} tokenizer has no ViT blocks: disable config.evals.layer_probe "
                       "(or use config.tokenizer.arch='vit')")
    return super().layer_features(params, state, images, pooling)

  def token_features(self, params, state, images):
    if self.arch != "vit":
      raise ValueError(f"the {self.arch} tokenizer has no ViT tokens: disable config.evals.attentive_probe "
                       "(or use config.tokenizer.arch='vit')")
    return super().token_features(params, state, images)

  def reconstruct(self, params, state, images, rng):
    images = images.astype(jnp.float32)
    p, g = self.patch, self.token_grid
    qo, out = self.forward(params, state, images, rng)
    ids = qo.ids.reshape(images.shape[0], -1)
    mean = jnp.asarray(self.config.input.mean, jnp.float32)
    std = jnp.asarray(self.config.input.std, jnp.float32)
    colours = (jnp.asarray(_palette(self.codebook_size))[ids] - mean) / std      # [B, L, 3]
    token_map = pixels.unpatchify(jnp.tile(colours, (1, 1, p * p)), p)
    if self.target == "pixels":
      rec = out
    else:
      patches = pixels.patchify(images, p).reshape(-1, p * p * 3)
      flat = ids.reshape(-1)
      sums = vq.code_sums(patches, flat, self.codebook_size)
      counts = vq.code_counts(flat, self.codebook_size)
      avg = sums / jnp.maximum(counts, 1.0)[:, None]
      rec = pixels.unpatchify(avg[flat].reshape(images.shape[0], g * g, -1), p)
    return {"masked": token_map, "reconstruction": rec}

  def describe(self) -> dict:
    t = self.t
    arch = {k: t[k] for k in ("arch", "codebook_size", "code_dim", "quantizer", "target")}
    if self.arch != "vit":
      arch["conv"] = t.conv.to_dict()
    if self.arch == "dalle":
      arch["dalle"] = t.dalle.to_dict()
    else:
      arch["decoder"] = t.decoder.to_dict()
    return {**super().describe(), "tokenizer": arch}


def default_tokenizer_config() -> dict:
  """Every key of `config.tokenizer` (configs/tokenizer.py, vqkd.py and peco.py start here)."""
  return dict(
      arch="conv",                  # 'conv' (sonnet VQ-VAE stack) | 'dalle' (DALL-E's encoder,
                                    # the conv decoder) | 'vit' (VQ-KD's ViTs)
      codebook_size=512,
      code_dim=64,
      quantizer="ema",              # 'ema' | 'norm_ema' | 'straight_through' | 'gumbel' (dVAE)
      beta=0.25,                    # commitment cost
      codebook_weight=1.0,          # 'straight_through': weight of the codebook loss
      decay=0.99,                   # EMA codebooks
      epsilon=1e-5,                 # 'ema': Laplace smoothing of the code counts
      kmeans_init=False,            # 'norm_ema': BEiT v2's k-means on the first batch
      kmeans_iters=10,
      restart_after=0,              # restart codes unused for this many steps; 0 = never
      # 'gumbel' (DALL-E dVAE, appendix A.2; cosine schedules over updates): temperature
      # 1 -> 1/16 over the first 150,000, KL weight 0 -> 6.6 over the first 5,000.
      gumbel=dict(tau_start=1.0, tau_end=1.0 / 16, tau_steps=150_000, kl_weight=6.6,
                  kl_steps=5_000),
      target="pixels",              # 'pixels' | 'teacher' (VQ-KD)
      pixel_loss="mse",             # 'mse' | 'l1'
      pixel_space="normalized",     # the pixel loss's scale: 'normalized' (the trainer's mean /
                                    # std) | 'minus_one_one' (VQGAN's [-1, 1]: PeCo)
      official_init=False,          # arch 'vit': BEiT v2's VQKD init (official_vqkd_init)
      perceptual_weight=0.0,        # PeCo's perceptual loss (needs a teacher)
      perceptual_layers=(),         # the teacher's blocks, 1-based
      teacher="",                   # workdir of a mim_jax run (VQ-KD target, PeCo features)
      teacher_encoder="online",     # 'online' | 'ema' encoder of that run
      conv=dict(hidden=128, res_hidden=32, res_layers=2),
      dalle=dict(hidden=256, blocks_per_group=2),   # arch 'dalle': DALL-E's n_hid, n_blk_per_group
      decoder=dict(variant="base", depth=1),   # arch 'vit': the decoder ViT
  )
