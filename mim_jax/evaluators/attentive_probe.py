"""Attentive probe: a learned query pools the frozen tokens by cross-attention, then a linear head.

Used by MIM papers whose patch tokens carry more than their cls token (CAE,
AIM, V-JEPA evaluate this way). Architecture (:class:`AttentivePooler`), for
frozen final-norm tokens ``t`` [B, L, D] from ``ctx.encode_tokens`` (the patch
tokens by default, ``tokens='all'`` adds the cls token):

1. ``x = LayerNorm(t)`` (learned scale and bias, eps 1e-6);
2. one learned query ``q0`` [D] (trunc-normal std 0.02); ``h`` heads of width
   ``D / h``: ``q = q0 Wq``, ``k = x Wk``, ``v = x Wv`` (with biases),
   ``a = softmax(q k^T / sqrt(D / h))`` over the L tokens per head,
   ``z = concat_h(a v) Wo`` [B, D];
3. ``logits = Dense(LayerNorm(z))`` (head weights trunc-normal std 0.01, bias 0).

No residual or MLP after the attention (the query is a constant, a residual
would only add a bias before the norm). Projections are trunc-normal std 0.02,
zero bias. Recipe: AdamW (b1 0.9, b2 0.999, eps 1e-8), peak lr
``base_lr * batch / 256`` (base 1e-3) after ``warmup_epochs`` of linear warm-up,
half-cosine to 0 per step, weight decay 0.05 on the matrices only (not biases,
norms or the query), batch 256, 90 epochs, softmax cross-entropy, no
augmentation (tokens are extracted once from unaugmented images). Tokens are
kept on the host as float16 ([N, L, D], a seeded ``max_train`` subset) and each
shuffled batch is cast to float32 on the way in.
"""
from __future__ import annotations

import dataclasses
import functools
import logging
import math

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax

from mim_jax.evaluators import common

TOKEN_SETS = ("patches", "all")


class AttentivePooler(nn.Module):
  """Cross-attention pooling with one learned query, then a linear classifier."""
  num_classes: int
  num_heads: int

  @nn.compact
  def __call__(self, tokens: jax.Array) -> jax.Array:
    b, length, dim = tokens.shape
    if dim % self.num_heads:
      raise ValueError(f"attentive probe: width {dim} is not divisible by num_heads "
                       f"{self.num_heads}; set num_heads to a divisor of {dim}")
    head_dim = dim // self.num_heads
    dense = lambda name: nn.Dense(dim, kernel_init=nn.initializers.truncated_normal(0.02),  # noqa: E731
                                  name=name)
    x = nn.LayerNorm(epsilon=1e-6, name="token_norm")(tokens)
    query = self.param("query", nn.initializers.truncated_normal(0.02), (1, dim))
    q = dense("q")(query).reshape(self.num_heads, head_dim)
    k = dense("k")(x).reshape(b, length, self.num_heads, head_dim)
    v = dense("v")(x).reshape(b, length, self.num_heads, head_dim)
    logits = jnp.einsum("hc,blhc->bhl", q, k, precision=jax.lax.Precision.HIGHEST)
    attn = jax.nn.softmax(logits / math.sqrt(head_dim), axis=-1)
    z = jnp.einsum("bhl,blhc->bhc", attn, v, precision=jax.lax.Precision.HIGHEST).reshape(b, dim)
    z = nn.LayerNorm(epsilon=1e-6, name="out_norm")(dense("proj")(z))
    return nn.Dense(self.num_classes, kernel_init=nn.initializers.truncated_normal(0.01),
                    name="head")(z)


@dataclasses.dataclass(frozen=True)
class AttentiveConfig:
  """Hyper-parameters of one attentive-probe fit."""
  base_lr: float = 1e-3
  epochs: int = 90
  warmup_epochs: int = 5
  batch_size: int = 256
  weight_decay: float = 0.05
  num_heads: int = 0  # 0 = max(1, D // 64)
  seed: int = 0

  def lr(self, batch_size: int) -> float:
    return self.base_lr * batch_size / 256.0

  def heads(self, dim: int) -> int:
    return self.num_heads if self.num_heads > 0 else max(1, dim // 64)


def _decay_mask(params):
  """Weight decay on the projection and head matrices; not on biases, norms or the query."""
  def decays(path, p):
    return p.ndim > 1 and getattr(path[-1], "key", None) != "query"
  return jax.tree_util.tree_map_with_path(decays, params)


@functools.lru_cache(maxsize=8)
def _compiled(cfg: AttentiveConfig, num_classes: int, n: int, token_shape: tuple):
  """``(model, batch, steps, init, train_step, apply)`` for one fit; cached so that the feature
  sets of one round (same shapes and recipe) share the compiled functions."""
  dim = token_shape[-1]
  batch = min(int(cfg.batch_size), n)
  steps = n // batch
  total = max(1, cfg.epochs * steps)
  warmup = min(cfg.warmup_epochs * steps, total - 1)
  peak = cfg.lr(batch)
  schedule = (optax.warmup_cosine_decay_schedule(0.0, peak, warmup, total, end_value=0.0)
              if warmup > 0 else optax.cosine_decay_schedule(peak, total))
  tx = optax.adamw(schedule, b1=0.9, b2=0.999, eps=1e-8, weight_decay=cfg.weight_decay,
                   mask=_decay_mask)
  model = AttentivePooler(num_classes=num_classes, num_heads=cfg.heads(dim))

  @jax.jit
  def train_step(params, opt_state, x, y):
    def loss_fn(p):
      logits = model.apply({"params": p}, x.astype(jnp.float32))
      return optax.softmax_cross_entropy_with_integer_labels(logits, y).mean()
    loss, grads = jax.value_and_grad(loss_fn)(params)
    updates, opt_state = tx.update(grads, opt_state, params)
    return optax.apply_updates(params, updates), opt_state, loss

  apply = jax.jit(lambda p, x: model.apply({"params": p}, x.astype(jnp.float32)))
  init = jax.jit(lambda key: tx_init(model.init(key, jnp.zeros((1,) + token_shape))["params"]))
  tx_init = lambda params: (params, tx.init(params))  # noqa: E731
  return model, batch, steps, init, train_step, apply


def fit(tokens: np.ndarray, labels: np.ndarray, num_classes: int, cfg: AttentiveConfig):
  """Trains the pooler on ``tokens`` [N, L, D] (any float dtype, kept on the host).

  Returns ``(predict, params, info)``: ``predict(tokens)`` gives the logits [N, C];
  ``info`` has the batch size, steps per epoch, peak lr, heads and the last epoch's
  mean loss.
  """
  labels = np.asarray(labels, np.int32).reshape(-1)
  n = tokens.shape[0]
  if n == 0:
    raise ValueError("attentive probe: empty train set")
  model, batch, steps, init, train_step, apply = _compiled(cfg, int(num_classes), n,
                                                           tuple(tokens.shape[1:]))
  params, opt_state = init(jax.random.PRNGKey(cfg.seed))
  shuffle = np.random.default_rng(cfg.seed)
  last_loss = float("nan")
  for _ in range(int(cfg.epochs)):
    order = shuffle.permutation(n)
    losses = []
    for s in range(steps):
      idx = np.sort(order[s * batch:(s + 1) * batch])  # sorted: faster gathers from the host array
      params, opt_state, loss = train_step(params, opt_state, jnp.asarray(tokens[idx]),
                                           jnp.asarray(labels[idx]))
      losses.append(loss)
    last_loss = float(np.mean(jax.device_get(losses)))

  def predict(x: np.ndarray) -> np.ndarray:
    """Logits [N, C] of tokens [N, L, D], ``batch`` images at a time (one compiled shape)."""
    if not len(x):
      return np.zeros((0, int(num_classes)), np.float32)
    return common.map_padded(lambda chunk: apply(params, jnp.asarray(chunk)), x, batch)

  info = {"batch_size": batch, "steps_per_epoch": steps, "lr": cfg.lr(batch),
          "num_heads": model.num_heads, "final_train_loss": last_loss}
  return predict, params, info


def select_tokens(tokens: np.ndarray, which: str, prefix: int = 1) -> np.ndarray:
  """The patch tokens (``'patches'``: drop the ``prefix`` leading tokens, a ViT's cls token;
  none for an encoder without one) or all of them."""
  return tokens[:, prefix:] if which == "patches" else tokens


def extract_tokens(ctx: common.EvalContext, split: str, batch_size: int, limit):
  """``({name: float16 [N, 1 + L, D]}, labels)`` of ``split`` from ``ctx.encode_tokens``."""
  if ctx.encode_tokens is None:
    raise ValueError("attentive probe needs ctx.encode_tokens; build the EvalContext with it "
                     "(Trainer.eval_context does)")
  return common.extract_outputs(ctx, split, batch_size, limit, ("tokens",), ctx.encode_tokens,
                             dtype=np.float16)


@common.register("attentive_probe")
class AttentiveProbeEvaluator(common.Evaluator):
  """Attentive-probe top-1/top-5 (percent) per feature set; see the module docstring.

  Options: ``tokens`` ('patches' | 'all'), ``base_lr`` (1e-3, scaled by
  batch/256), ``epochs`` (90), ``warmup_epochs`` (5), ``batch_size`` (256),
  ``weight_decay`` (0.05), ``num_heads`` (0 = D // 64), ``seed`` (0),
  ``feature_batch_size`` (extraction, default ``batch_size``), ``max_train``
  (seeded train subset, None/0 = all: mind the memory, N x L x D float16) and
  ``max_eval`` (None/0 = all).
  """

  def config(self) -> AttentiveConfig:
    d = AttentiveConfig()
    return AttentiveConfig(
        base_lr=float(self.option("base_lr", d.base_lr)),
        epochs=int(self.option("epochs", d.epochs)),
        warmup_epochs=int(self.option("warmup_epochs", d.warmup_epochs)),
        batch_size=int(self.option("batch_size", d.batch_size)),
        weight_decay=float(self.option("weight_decay", d.weight_decay)),
        num_heads=int(self.option("num_heads", d.num_heads)),
        seed=int(self.option("seed", d.seed)))

  def run(self, ctx: common.EvalContext) -> dict:
    cfg = self.config()
    which = str(self.option("tokens", "patches"))
    if which not in TOKEN_SETS:
      raise ValueError(f"attentive_probe: tokens {which!r}; use one of {TOKEN_SETS}")
    feature_batch = int(self.option("feature_batch_size", cfg.batch_size))
    train, train_y = extract_tokens(ctx, "train", feature_batch, self.option("max_train"))
    evals, eval_y = extract_tokens(ctx, "eval", feature_batch, self.option("max_eval"))
    result, info = {}, {}
    for name in sorted(train):
      predict, _, info = fit(select_tokens(train[name], which, ctx.prefix_tokens), train_y, ctx.num_classes, cfg)
      scores = predict(select_tokens(evals[name], which, ctx.prefix_tokens))
      acc = common.topk_accuracy(scores, eval_y, ks=(1, 5))
      result[f"{name}/top1"] = acc[1]
      result[f"{name}/top5"] = acc[5]
      result[f"{name}/train_loss"] = info["final_train_loss"]
      logging.info("%s %s: attentive probe top1 %.2f top5 %.2f", self.name, name, acc[1], acc[5])
    num_tokens = next(iter(train.values())).shape[1] - (1 if which == "patches" else 0)
    result["protocol"] = {
        "type": "attentive_probe",
        "architecture": "LayerNorm(tokens) -> 1 learned query, multi-head cross-attention "
                        "(q/k/v/out projections) -> LayerNorm -> linear",
        "tokens": which,
        "num_tokens": int(num_tokens),
        "num_heads": info.get("num_heads"),
        "optimizer": "adamw (b1 0.9, b2 0.999, eps 1e-8), weight decay on matrices only",
        "base_lr": cfg.base_lr,
        "lr": info.get("lr"),
        "lr_schedule": "linear warmup then half-cosine to 0, per step",
        "epochs": cfg.epochs,
        "warmup_epochs": cfg.warmup_epochs,
        "batch_size": info.get("batch_size"),
        "weight_decay": cfg.weight_decay,
        "seed": cfg.seed,
        "token_storage": "float16 on the host, float32 in the probe",
        "augmentation": "none (tokens precomputed)",
        "num_train": int(len(train_y)),
        "num_eval": int(len(eval_y)),
        "max_train": common.cap(self.option("max_train")),
        "top5_classes": min(5, int(ctx.num_classes)),
    }
    return result
