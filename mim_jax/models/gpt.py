"""iGPT's transformer over pixel sequences (Chen et al. 2020), as openai/image-gpt src/model.py.

GPT-2's pre-norm decoder with image-gpt's changes, layer by layer as the official `model`:
  * `norm`: x * rsqrt(mean(x^2) + 1e-5) * g: a gain-only RMS norm (no mean subtraction, no
    bias, despite its docstring), before attention ('ln_1'), before the MLP ('ln_2') and at the
    end ('ln_f');
  * attention without biases: per-head q/k/v projections [heads, head_dim, width] initialised
    N(0, 1/sqrt(width)), the output projection 'c_proj' N(0, 1/sqrt(width * depth)); scores
    scaled by 1/sqrt(head_dim); the causal mask w * b - 1e10 (1 - b) (lower triangle), or none
    (the BERT objective, `causal=False`);
  * MLP 'c_fc' width -> 4 width, gelu2 (x sigmoid(1.702 x)), 'c_proj' 4 width -> width, both
    bias-free, N(0, 0.02);
  * token embedding 'wte' N(0, 0.02), learned position embedding 'wpe' N(0, 0.01), the untied,
    bias-free head 'wtet' initialised to zero (the paper: "zero-initialize all projections
    producing logits");
  * the autoregressive input: a learned start-of-sequence vector 'sos' N(0, 0.02) and the
    sequence shifted right by one (position i sees tokens < i: logits at i predict token i);
    the BERT input: masked positions' token embeddings multiplied by 0 (`keep`), no mask token
    and no 'sos'.

The input is either the palette sequence (int [B, N]) or normalised images [B, H, W, 3], which
the module resizes to `resolution` and quantises with the palette in the variables' 'palette'
collection ({'palette': {'centres': [512, 3]}}, iGPT's k-means palette: the method passes it),
or, without one, `targets.palette.default_palette()` (a uniform 8x8x8 RGB grid), so the
backbone also runs under other methods.

Named outputs: 'tokens' the final-norm sequence [B, N, D], 'pooled' its average over the
sequence (the official classifier's input), 'layers' (with layers=True) every block's output
normalised (the norm without a gain: the paper's probe reads "layer_norm(h^l)") and averaged
over the sequence, then 'pooled'. 'block:N' in the kNN / linear-probe evaluators reads entry N.
"""
from __future__ import annotations

from typing import Optional, Sequence

import flax.linen as nn
import jax
import jax.numpy as jnp
import ml_collections
import numpy as np

from mim_jax.targets import palette as palette_lib

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)

DEFAULTS = dict(name="gpt", depth=24, width=512, num_heads=8, resolution=32,
                vocab=palette_lib.VOCAB, dtype="float32")
EXECUTION_OPTIONS = ("dtype",)
# The paper's sizes (iGPT-S / M / L; L was trained at 32, 48 and 64 px input resolution).
SIZES = {"s": dict(depth=24, width=512, num_heads=8), "m": dict(depth=36, width=1024, num_heads=8),
         "l": dict(depth=48, width=1536, num_heads=16)}


def rms_norm(x: jax.Array, eps: float = 1e-5) -> jax.Array:
  """x * rsqrt(mean(x^2, -1) + eps) in float32: image-gpt's `norm` without its gain."""
  x = x.astype(jnp.float32)
  return x * jax.lax.rsqrt(jnp.mean(jnp.square(x), axis=-1, keepdims=True) + eps)


def gelu2(x: jax.Array) -> jax.Array:
  """x * sigmoid(1.702 x), image-gpt's activation."""
  return x * jax.nn.sigmoid(1.702 * x)


def causal_mask(n: int) -> jax.Array:
  """[n, n] float, 1 where query i may attend key j (j <= i): attention_mask(n, n)."""
  i = jnp.arange(n)[:, None]
  j = jnp.arange(n)[None, :]
  return (i >= j).astype(jnp.float32)


class Norm(nn.Module):
  """image-gpt's norm: rms_norm(x) * g, g initialised to 1."""
  eps: float = 1e-5

  @nn.compact
  def __call__(self, x):
    g = self.param("g", nn.initializers.ones, (x.shape[-1],))
    return rms_norm(x, self.eps) * g


class Conv1D(nn.Module):
  """image-gpt's bias-free `conv1d`: x @ w, w [nx, nf] ~ N(0, stddev)."""
  features: int
  stddev: float = 0.02
  dtype: jnp.dtype = jnp.float32

  @nn.compact
  def __call__(self, x):
    w = self.param("w", nn.initializers.normal(self.stddev), (x.shape[-1], self.features))
    return jnp.dot(x.astype(self.dtype), w.astype(self.dtype))


class Attention(nn.Module):
  width: int
  num_heads: int
  depth: int
  causal: bool = True
  dtype: jnp.dtype = jnp.float32

  @nn.compact
  def __call__(self, x):
    h, e, f = self.num_heads, self.width // self.num_heads, self.width
    qkv_init = nn.initializers.normal(1.0 / np.sqrt(f))
    wq = self.param("q_proj", qkv_init, (h, e, f))
    wk = self.param("k_proj", qkv_init, (h, e, f))
    wv = self.param("v_proj", qkv_init, (h, e, f))
    wc = self.param("c_proj", nn.initializers.normal(1.0 / np.sqrt(f * self.depth)), (h, e, f))
    dt = self.dtype
    xd = x.astype(dt)
    q, k, v = (jnp.einsum("bsf,hef->bhse", xd, w.astype(dt)) for w in (wq, wk, wv))
    w = jnp.einsum("bhse,bhte->bhst", q, k).astype(jnp.float32) * jax.lax.rsqrt(jnp.float32(e))
    if self.causal:
      b = causal_mask(x.shape[1])[None, None]
      w = w * b - 1e10 * (1.0 - b)
    w = jax.nn.softmax(w, axis=-1)
    a = jnp.einsum("bhst,bhte->bhse", w.astype(dt), v)
    return jnp.einsum("bhse,hef->bsf", a, wc.astype(dt)).astype(jnp.float32)


class Block(nn.Module):
  width: int
  num_heads: int
  depth: int
  causal: bool = True
  dtype: jnp.dtype = jnp.float32

  @nn.compact
  def __call__(self, x):
    x = x + Attention(self.width, self.num_heads, self.depth, self.causal, self.dtype,
                      name="attn")(Norm(name="ln_1")(x))
    hdn = gelu2(Conv1D(4 * self.width, dtype=self.dtype, name="c_fc")(Norm(name="ln_2")(x)))
    return x + Conv1D(self.width, dtype=self.dtype, name="c_proj")(hdn).astype(jnp.float32)


class GPT(nn.Module):
  """The iGPT transformer; `__call__(inputs, train, keep=None, logits=False)` -> the final-norm
  sequence [B, N, D] (and the logits [B, N, vocab] with logits=True). `inputs`: the palette
  sequence int [B, N] or normalised images [B, H, W, 3]; `keep` (BERT): bool [B, N], False
  where a token is masked. Block outputs are sown in 'intermediates'/'blocks'."""
  depth: int = 24
  width: int = 512
  num_heads: int = 8
  resolution: int = 32
  vocab: int = palette_lib.VOCAB
  causal: bool = True
  mean: Sequence[float] = IMAGENET_MEAN
  std: Sequence[float] = IMAGENET_STD
  dtype: jnp.dtype = jnp.float32

  @property
  def seq_len(self) -> int:
    return self.resolution * self.resolution

  def palette(self) -> jax.Array:
    """The palette collection's centres, or the default grid palette."""
    if self.has_variable("palette", "centres"):
      return self.get_variable("palette", "centres")
    return jnp.asarray(palette_lib.default_palette(self.vocab))

  def tokenize(self, images: jax.Array) -> jax.Array:
    return palette_lib.image_tokens(images, jax.lax.stop_gradient(self.palette()),
                                    self.resolution, self.mean, self.std)

  @nn.compact
  def __call__(self, inputs, train: bool = False, keep: Optional[jax.Array] = None,
               logits: bool = False):
    del train    # no dropout: "No dropout is used" (the paper); nothing else differs
    tokens = inputs if jnp.issubdtype(inputs.dtype, jnp.integer) else self.tokenize(inputs)
    b, n = tokens.shape
    if n != self.seq_len:
      raise ValueError(f"a GPT at resolution {self.resolution} reads {self.seq_len} tokens, got "
                       f"{n}; set config.model.resolution")
    wte = self.param("wte", nn.initializers.normal(0.02), (self.vocab, self.width))
    wpe = self.param("wpe", nn.initializers.normal(0.01), (self.seq_len, self.width))
    wtet = self.param("wtet", nn.initializers.zeros, (self.vocab, self.width))
    h = wte[tokens]
    if self.causal:
      sos = self.param("sos", nn.initializers.normal(0.02), (self.width,))
      h = jnp.concatenate([jnp.broadcast_to(sos, (b, 1, self.width)), h[:, :-1]], axis=1)
    elif keep is not None:
      h = h * keep[..., None].astype(h.dtype)
    h = h + wpe[None]
    for i in range(self.depth):
      h = Block(self.width, self.num_heads, self.depth, self.causal, self.dtype, name=f"h{i}")(h)
      self.sow("intermediates", "blocks", h)
    h = Norm(name="ln_f")(h)
    if not logits:
      return h
    out = jnp.einsum("bsd,vd->bsv", h.astype(self.dtype), wtet.astype(self.dtype))
    return h, out.astype(jnp.float32)


# ---------------------------------------------------------------------------------------------
# The models registry's contract (mim_jax/models/__init__.py).

def default_config(size: str = "s", **kw) -> ml_collections.ConfigDict:
  """`config.model` of iGPT-S / M / L (`size`), updated by `kw`."""
  cfg = ml_collections.ConfigDict(dict(DEFAULTS))
  cfg.update(SIZES[size])
  cfg.update(kw)
  check_config(cfg)
  return cfg


def check_config(model_cfg) -> None:
  """ValueError (one line naming the allowed values) for an unknown key or a bad value."""
  unknown = [k for k in model_cfg.keys() if k not in DEFAULTS]
  if unknown:
    raise ValueError(f"config.model.{unknown[0]}: not a gpt key; use {', '.join(DEFAULTS)}")
  get = lambda k: model_cfg.get(k, DEFAULTS[k])  # noqa: E731
  for key in ("depth", "width", "num_heads", "resolution", "vocab"):
    v = get(key)
    if isinstance(v, bool) or not isinstance(v, int) or v < 1:
      raise ValueError(f"config.model.{key}={v!r}: use a positive whole number")
  if get("width") % get("num_heads"):
    raise ValueError(f"config.model.width={get('width')} is not a multiple of num_heads="
                     f"{get('num_heads')}: use widths divisible by the head count")
  if get("dtype") not in ("float32", "bfloat16", "float16"):
    raise ValueError(f"config.model.dtype={get('dtype')!r}: use 'float32', 'bfloat16' or 'float16'")


def summary(model_cfg, image_size: int) -> str:
  get = lambda k: model_cfg.get(k, DEFAULTS[k])  # noqa: E731
  r = get("resolution")
  return (f"GPT {get('depth')} layers, width {get('width')}, {get('num_heads')} heads, "
          f"{r}x{r} palette sequence ({get('vocab')} colours) from {image_size} px")


def from_config(model_cfg, image_size: int = 32, **overrides) -> GPT:
  """The GPT `config.model` describes; `overrides` (a method's): causal, mean, std."""
  del image_size
  check_config(model_cfg)
  get = lambda k: model_cfg.get(k, DEFAULTS[k])  # noqa: E731
  kw = dict(depth=int(get("depth")), width=int(get("width")), num_heads=int(get("num_heads")),
            resolution=int(get("resolution")), vocab=int(get("vocab")),
            dtype=jnp.dtype(get("dtype")))
  allowed = set(kw) | {"causal", "mean", "std"}
  bad = [k for k in overrides if k not in allowed]
  if bad:
    raise ValueError(f"a gpt has no option {bad[0]!r}; its fields are {', '.join(sorted(allowed))}")
  kw.update(overrides)
  for k in ("mean", "std"):
    if k in kw:
      kw[k] = tuple(float(v) for v in kw[k])
  return GPT(**kw)


def _check_pooling(pooling: str) -> None:
  if pooling not in ("mean", "avg"):
    raise ValueError(f"pooling={pooling!r}: a GPT pools with 'mean' (the average over the "
                     f"sequence, as image-gpt's classifier)")


def _named(model: GPT, h: jax.Array, images: jax.Array) -> dict:
  h = h.astype(jnp.float32)
  stride = max(1, images.shape[1] // model.resolution) if images.ndim == 4 else 1
  return {"tokens": h, "pooled": h.mean(axis=1), "stride": stride,
          "grid": (model.resolution, model.resolution)}


def outputs(model, variables, images, *, pooling: str = "mean", layers: bool = False) -> dict:
  """Evaluation-mode named outputs; with `layers`, each block's output normalised (gain-free
  norm) and averaged over the sequence, then 'pooled'."""
  _check_pooling(pooling)
  if layers:
    h, state = model.apply(variables, images, mutable=["intermediates"])
    blocks = list(state["intermediates"]["blocks"])
  else:
    h = model.apply(variables, images)
  out = _named(model, h, images)
  if layers:
    out["layers"] = [rms_norm(x).mean(axis=1) for x in blocks] + [out["pooled"]]
  return out


def forward(model, variables, images, *, train: bool, rng=None, pooling: str = "mean"):
  """(named outputs, {}): no mutable collections, no dropout."""
  del rng, train
  _check_pooling(pooling)
  return _named(model, model.apply(variables, images), images), {}


def param_count(model: GPT) -> int:
  shapes = jax.eval_shape(lambda: model.init(jax.random.PRNGKey(0),
                                             jnp.zeros((1, model.seq_len), jnp.int32)))
  return sum(int(np.prod(x.shape)) for x in jax.tree.leaves(shapes["params"]))
