"""iGPT (Chen, Radford, Child, Wu, Jun, Luan & Sutskever, ICML 2020, "Generative Pretraining
from Pixels"; openai/image-gpt): a GPT over the 9-bit palette sequence of low-resolution images.

  * the palette: 512 k-means centres of the training pixels in [-1, 1] (targets/palette.py),
    computed once before training (`external_state`: a pass over a seeded subset of the
    pretraining images, cached in a .npy keyed by the data and the settings) and kept in the
    method state, so the checkpoint holds it and evaluation reads it;
  * the sequence: the image resized to the model's input resolution, each pixel its nearest
    centre, raster order (utils.color_quantize);
  * 'autoregressive' (igpt.objective): the causal model reads the start-of-sequence vector and
    the sequence shifted by one; cross-entropy of every position's logits against its token,
    averaged over positions and images (model.py `gen_loss`);
  * 'bert': each token masked independently with probability igpt.mask_prob (0.15; model.py
    keeps a token where uniform > bert_mask_prob) by zeroing its token embedding (the official
    has no mask token), bidirectional attention; cross-entropy on the masked positions only,
    averaged per image over its masked positions, then over images (model.py);
  * the picture: the top half of each image given, the bottom half sampled token by token
    (temperature igpt.sample_temperature: 1 as run.py's np.random.choice, 0 greedy; seeded),
    decoded through the palette (run.py `sample`: a full forward per token, no cache).

Evaluation features: the GPT module quantises the evaluators' normalised images itself with
the palette this method adds to its variables ('palette' collection), so kNN, the linear probe
('block:N': block N's normalised output averaged over the sequence, the paper's probe) and the
per-layer probe read the frozen encoder through the ordinary `features` / `layer_features`.
"""
from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import optax

from mim_jax import models
from mim_jax.methods.base import Method, module_entries
from mim_jax.targets import palette as palette_lib

OBJECTIVES = ("autoregressive", "bert")


def ar_loss(logits: jax.Array, tokens: jax.Array) -> jax.Array:
  """The autoregressive loss: mean over images and positions of -log softmax(logits)[token],
  where logits[:, i] were computed from tokens < i (the model's shifted input)."""
  return optax.softmax_cross_entropy_with_integer_labels(logits.astype(jnp.float32), tokens).mean()


def bert_keep_mask(rng: jax.Array, shape, mask_prob: float) -> jax.Array:
  """bool [B, N]: True where a token is kept (uniform > mask_prob, model.py's M), each token
  masked independently with probability mask_prob."""
  return jax.random.uniform(rng, shape) > mask_prob


def bert_loss(logits: jax.Array, tokens: jax.Array, keep: jax.Array) -> jax.Array:
  """Cross-entropy on the masked positions (keep False) only: per image the mean over its
  masked positions, then the mean over images (an image with no masked token counts 0; the
  official divides by zero there)."""
  ce = optax.softmax_cross_entropy_with_integer_labels(logits.astype(jnp.float32), tokens)
  im = (~keep).astype(jnp.float32)
  return jnp.mean(jnp.sum(ce * im, axis=1) / jnp.maximum(jnp.sum(im, axis=1), 1.0))


def sample_token(rng: jax.Array, logits: jax.Array, temperature: float) -> jax.Array:
  """int32 [B]: a draw from softmax(logits / temperature), or the argmax at temperature 0."""
  if temperature <= 0:
    return jnp.argmax(logits, axis=-1).astype(jnp.int32)
  return jax.random.categorical(rng, logits.astype(jnp.float32) / temperature).astype(jnp.int32)


def complete(logits_fn, tokens: jax.Array, given: int, rng: jax.Array, temperature: float = 1.0,
             causal: bool = True) -> jax.Array:
  """tokens [B, N] with positions >= `given` replaced, in raster order, by draws from the
  model: `logits_fn(tokens, keep)` -> logits [B, N, V]. The causal model's logits at i read
  tokens < i only; the BERT model's read the tokens < i with every later position masked
  (keep = position < i). Positions < `given` are returned unchanged."""
  n = tokens.shape[1]
  pos = jnp.arange(n)

  def body(i, carry):
    toks, key = carry
    key, sub = jax.random.split(key)
    keep = None if causal else jnp.broadcast_to(pos[None] < i, toks.shape)
    logit = jax.lax.dynamic_index_in_dim(logits_fn(toks, keep), i, axis=1, keepdims=False)
    return toks.at[:, i].set(sample_token(sub, logit, temperature)), key

  out, _ = jax.lax.fori_loop(given, n, body, (tokens, rng))
  return out


class IGPT(Method):
  name = "igpt"
  picture_titles = {"masked": "top half given", "reconstruction": "sampled completion",
                    "header": "the bottom half sampled from the model"}

  def __init__(self, config):
    cfg = config.get("igpt", None)
    if cfg is None:
      raise ValueError("config.igpt is missing: build the config from configs/igpt.py")
    if cfg.objective not in OBJECTIVES:
      raise ValueError(f"config.igpt.objective={cfg.objective!r}: use 'autoregressive' or 'bert'")
    if models.name_of(config.model) != "gpt":
      raise ValueError(f"iGPT trains the GPT backbone: set config.model.name='gpt' (got "
                       f"{models.name_of(config.model)!r}; configs/igpt.py sets it)")
    if not 0.0 < float(cfg.mask_prob) < 1.0:
      raise ValueError(f"config.igpt.mask_prob={cfg.mask_prob!r}: use a probability in (0, 1) "
                       f"(0.15 as the paper)")
    super().__init__(config)
    self.cfg = cfg
    self.causal = cfg.objective == "autoregressive"
    self.mean = tuple(float(v) for v in config.input.mean)
    self.std = tuple(float(v) for v in config.input.std)
    self.resolution = self.encoder.resolution
    self.vocab = self.encoder.vocab

  def encoder_overrides(self) -> dict:
    return {"causal": self.config.igpt.objective == "autoregressive",
            "mean": tuple(self.config.input.mean), "std": tuple(self.config.input.std)}

  # -- the palette ------------------------------------------------------------------------------
  def external_state(self) -> dict:
    """{'palette': float32 [vocab, 3]}: the data's k-means palette (shapes only while a run is
    restored: the checkpoint holds it)."""
    ctx = self.frozen_context
    if ctx is not None and ctx.restoring:
      return {"palette": jax.ShapeDtypeStruct((self.vocab, 3), jnp.float32)}
    c = self.cfg
    centres = palette_lib.compute_palette(
        self.config.input, resolution=self.resolution, k=self.vocab,
        num_images=int(c.palette_images), num_pixels=int(c.palette_pixels),
        iters=int(c.palette_iters), seed=int(c.palette_seed), cache_dir=c.palette_cache or None)
    if ctx is not None and ctx.record and jax.process_index() == 0:
      import os  # pylint: disable=g-import-not-at-top
      os.makedirs(ctx.workdir, exist_ok=True)
      np.save(os.path.join(ctx.workdir, "palette.npy"), centres)
    return {"palette": centres}

  def tokens(self, state, images: jax.Array) -> jax.Array:
    """The palette sequence int32 [B, resolution**2] of normalised images."""
    return palette_lib.image_tokens(images, jax.lax.stop_gradient(state["palette"]),
                                    self.resolution, self.mean, self.std)

  # -- variables: the palette rides with the encoder's ------------------------------------------
  def variables(self, params, state, name: str = "encoder") -> dict:
    out = {"params": params[name], **module_entries((state or {}).get("collections"), name)}
    if name == "encoder" and state is not None and "palette" in state:
      out["palette"] = {"centres": jax.lax.stop_gradient(state["palette"])}
    return out

  def encoder_variables(self, params, state) -> dict:
    out = super().encoder_variables(params, state)
    if state is not None and "palette" in state:
      out = {k: {**v, "palette": {"centres": state["palette"]}} for k, v in out.items()}
    return out

  # -- training -------------------------------------------------------------------------------
  def init(self, rng, images):
    del images   # the sequence's shape is the model's
    dummy = jnp.zeros((2, self.encoder.seq_len), jnp.int32)
    return {"encoder": self.encoder.init(rng, dummy)["params"]}

  def logits(self, params, state, tokens, keep=None) -> jax.Array:
    _, out = self.encoder.apply({"params": params["encoder"]}, tokens, keep=keep, logits=True)
    return out

  def loss(self, params, state, images, rng, step):
    del step
    tokens = self.tokens(state, images)
    if self.causal:
      logits = self.logits(params, state, tokens)
      loss = ar_loss(logits, tokens)
      counted = jnp.ones(tokens.shape, bool)
    else:
      keep = bert_keep_mask(rng, tokens.shape, float(self.cfg.mask_prob))
      logits = self.logits(params, state, tokens, keep)
      loss = bert_loss(logits, tokens, keep)
      counted = ~keep
    hit = (jnp.argmax(logits, -1) == tokens) & counted
    aux = {"accuracy": jnp.sum(hit) / jnp.maximum(jnp.sum(counted), 1),
           "bits_per_token": loss / jnp.log(2.0)}
    if not self.causal:
      aux["masked_fraction"] = jnp.mean(counted.astype(jnp.float32))
    return loss, aux

  # -- the picture ----------------------------------------------------------------------------
  def reconstruct(self, params, state, images, rng):
    """The top half given, the bottom half sampled: {'masked': the given half (the rest grey),
    'reconstruction': the completion}, each decoded through the palette at the input size."""
    tokens = self.tokens(state, images)
    r = self.resolution
    given = (r // 2) * r
    fn = lambda t, keep: self.logits(params, state, t, keep)  # noqa: E731
    done = complete(fn, tokens, given, rng, float(self.cfg.sample_temperature), self.causal)
    centres = state["palette"]
    grey = jnp.where(jnp.arange(r * r)[None] < given, 1.0, 0.0)[..., None]

    def picture(toks, weight=None):
      pix = palette_lib.dequantize(toks, centres)
      if weight is not None:
        pix = pix * weight      # grey (0 in [-1, 1]) where not given
      pix = pix.reshape(toks.shape[0], r, r, 3)
      return self._to_input_size(palette_lib.from_unit_range(pix, self.mean, self.std), images)

    return {"masked": picture(tokens, grey), "reconstruction": picture(done)}

  @staticmethod
  def _to_input_size(x: jax.Array, like: jax.Array) -> jax.Array:
    """Nearest-neighbour upsampling to `like`'s height and width."""
    h, w = like.shape[1:3]
    if x.shape[1:3] == (h, w):
      return x
    if h % x.shape[1] == 0 and w % x.shape[2] == 0:
      return jnp.repeat(jnp.repeat(x, h // x.shape[1], axis=1), w // x.shape[2], axis=2)
    return jax.image.resize(x, (x.shape[0], h, w, x.shape[3]), "nearest")
