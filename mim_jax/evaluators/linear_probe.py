"""Linear probe on frozen, precomputed features (MAE's recipe, scaled down).

Features of the train and eval splits are extracted once without
augmentation. They are standardised with the train features' mean and
variance (a parameter-free BatchNorm, eps 1e-6, as MAE's
``BatchNorm1d(affine=False)`` head), then a linear layer (weights
truncated-normal std 0.01, bias 0) is trained with softmax cross-entropy.
The learning rate is ``base_lr * batch_size / 256`` with linear warm-up and a
half-cosine decay to 0, stepped per iteration; LARS (momentum 0.9, weight
decay 0 by default) is the default optimiser, SGD with momentum and AdamW the
alternatives. LARS is MAE's (from MoCo v3): for parameters of 2+ dims the
gradient plus ``wd * w`` is scaled by the trust ratio ``0.001 |w| / |g + wd w|``
(1 when either norm is 0), 1-D parameters (the bias) take the plain gradient;
the momentum buffer accumulates these and the step is ``-lr * buffer``, the
learning rate outside the momentum as in PyTorch (``optax.lars`` puts it
inside, which differs while the rate changes, i.e. always with this schedule).
Each epoch visits a seeded permutation of the train set in full batches (the
remainder is dropped, as with ``drop_last=True``); one epoch is one jitted
``lax.scan``, compiled once per shape and recipe.
"""
from __future__ import annotations

import dataclasses
import functools
import logging
from typing import Optional

import jax
import jax.numpy as jnp
import numpy as np
import optax

from mim_jax.evaluators import common

BN_EPS = 1e-6
INIT_STD = 0.01


@dataclasses.dataclass(frozen=True)
class ProbeConfig:
  """Hyper-parameters of one probe fit."""
  optimizer: str = "lars"
  base_lr: float = 0.1
  epochs: int = 90
  warmup_epochs: int = 10
  batch_size: int = 256
  weight_decay: float = 0.0
  momentum: float = 0.9
  trust_coefficient: float = 0.001
  seed: int = 0

  def lr(self, batch_size: Optional[int] = None) -> float:
    """Peak learning rate ``base_lr * batch / 256``."""
    return self.base_lr * (batch_size or self.batch_size) / 256.0


def standardiser(train_x: np.ndarray):
  """Mean and 1/std of the train features (the parameter-free BatchNorm)."""
  x = np.asarray(train_x, np.float64)
  mean = x.mean(axis=0)
  inv_std = 1.0 / np.sqrt(x.var(axis=0) + BN_EPS)
  return mean.astype(np.float32), inv_std.astype(np.float32)


def _decay_mask(params):
  """Weight decay and LARS trust ratio apply to matrices only, not biases."""
  return jax.tree_util.tree_map(lambda p: p.ndim > 1, params)


def mae_lars(learning_rate, weight_decay: float = 0.0, momentum: float = 0.9,
             trust_coefficient: float = 0.001, mask=_decay_mask) -> optax.GradientTransformation:
  """MAE's LARS as an optax chain: on ``mask``-ed (2+ dim) parameters add ``wd * w`` and scale
  by the trust ratio, then ``buf = momentum * buf + update`` and ``w -= lr * buf``."""
  return optax.chain(
      optax.add_decayed_weights(weight_decay, mask=mask),
      optax.masked(optax.scale_by_trust_ratio(trust_coefficient=trust_coefficient), mask),
      optax.trace(decay=momentum, nesterov=False),
      optax.scale_by_learning_rate(learning_rate),
  )


OPTIMIZER_RULES = {
    "lars": "MAE/MoCo-v3 LARS: 2+-dim params g + wd*w scaled by trust ratio "
            "trust_coefficient*|w|/|g + wd*w|, 1-D params (bias) plain g; buf = momentum*buf + u; "
            "w -= lr*buf",
    "sgd": "SGD: 2+-dim params g + wd*w, bias plain g; buf = momentum*buf + u; w -= lr*buf",
    "adamw": "AdamW (b1 0.9, b2 0.999, eps 1e-8), decoupled weight decay on 2+-dim params only",
}


def make_optimizer(cfg: ProbeConfig, steps_per_epoch: int, batch_size: int):
  """The optax transformation and its learning-rate schedule."""
  total = max(1, cfg.epochs * steps_per_epoch)
  warmup = min(cfg.warmup_epochs * steps_per_epoch, total - 1)  # leave at least one decay step
  peak = cfg.lr(batch_size)
  if warmup > 0:
    schedule = optax.warmup_cosine_decay_schedule(0.0, peak, warmup, total, end_value=0.0)
  else:
    schedule = optax.cosine_decay_schedule(peak, total)
  name = cfg.optimizer.lower()
  if name == "lars":
    tx = mae_lars(schedule, cfg.weight_decay, cfg.momentum, cfg.trust_coefficient)
  elif name == "sgd":
    tx = optax.chain(optax.add_decayed_weights(cfg.weight_decay, mask=_decay_mask),
                     optax.sgd(schedule, momentum=cfg.momentum))
  elif name == "adamw":
    tx = optax.adamw(schedule, weight_decay=cfg.weight_decay, mask=_decay_mask)
  else:
    raise ValueError(f"unknown probe optimizer {cfg.optimizer!r}; use lars, sgd or adamw")
  return tx, schedule


def init_params(key: jax.Array, dim: int, num_classes: int) -> dict:
  """Linear layer: truncated-normal (2 std) weights of std 0.01, zero bias."""
  w = INIT_STD * jax.random.truncated_normal(key, -2.0, 2.0, (dim, num_classes), jnp.float32)
  return {"w": w, "b": jnp.zeros((num_classes,), jnp.float32)}


def logits_fn(params: dict, x: jnp.ndarray) -> jnp.ndarray:
  """Linear classifier on already standardised features."""
  return jnp.matmul(x, params["w"], precision=jax.lax.Precision.HIGHEST) + params["b"]


def _loss_fn(p, xb, yb):
  return optax.softmax_cross_entropy_with_integer_labels(logits_fn(p, xb), yb).mean()


@functools.lru_cache(maxsize=16)
def _compiled_epoch(cfg: ProbeConfig, n: int, batch: int, steps: int):
  """``(tx, epoch)``: the optimiser and one jitted epoch (a seeded permutation in full batches,
  one ``lax.scan``); cached so that every fit of the same shape and recipe in a process (the
  online and EMA encoders, the blocks of a per-layer probe) shares one compilation."""
  tx, _ = make_optimizer(cfg, steps, batch)

  @jax.jit
  def epoch(params, opt_state, epoch_key, x, y):  # x, y as arguments, not baked-in constants
    order = jax.random.permutation(epoch_key, n)[: steps * batch].reshape(steps, batch)

    def step(carry, idx):
      p, s = carry
      loss, grads = jax.value_and_grad(_loss_fn)(p, x[idx], y[idx])
      updates, s = tx.update(grads, s, p)
      return (optax.apply_updates(p, updates), s), loss

    (params, opt_state), losses = jax.lax.scan(step, (params, opt_state), order)
    return params, opt_state, losses.mean()

  return tx, epoch


def fit(train_x: np.ndarray, train_y: np.ndarray, num_classes: int, cfg: ProbeConfig):
  """Trains the probe; returns ``(params, (mean, inv_std), info)``.

  ``info`` has the effective batch size, steps per epoch, peak lr and the
  mean loss of the last epoch.
  """
  train_y = np.asarray(train_y, np.int32).reshape(-1)
  n, dim = np.shape(train_x)
  if n == 0:
    raise ValueError("linear probe: empty train set")
  batch = min(int(cfg.batch_size), n)
  steps = n // batch
  mean, inv_std = standardiser(train_x)
  x = jnp.asarray((np.asarray(train_x, np.float32) - mean) * inv_std)
  y = jnp.asarray(train_y)
  tx, epoch = _compiled_epoch(dataclasses.replace(cfg, seed=0), n, batch, steps)  # seed-free
  key = jax.random.PRNGKey(cfg.seed)
  init_key, shuffle_key = jax.random.split(key)
  params = init_params(init_key, dim, num_classes)
  opt_state = tx.init(params)

  last_loss = float("nan")
  for e in range(int(cfg.epochs)):
    params, opt_state, loss = epoch(params, opt_state, jax.random.fold_in(shuffle_key, e), x, y)
    last_loss = float(loss)
  info = {"batch_size": batch, "steps_per_epoch": steps, "lr": cfg.lr(batch),
          "final_train_loss": last_loss}
  return params, (mean, inv_std), info


def predict_scores(params: dict, norm, x: np.ndarray, chunk: int = 8192) -> np.ndarray:
  """Logits [N, C] for raw features ``x`` (standardised with the train stats)."""
  mean, inv_std = norm
  out = []
  for start in range(0, len(x), chunk):
    xb = (np.asarray(x[start:start + chunk], np.float32) - mean) * inv_std
    out.append(np.asarray(logits_fn(params, jnp.asarray(xb))))
  if not out:
    return np.zeros((0, params["b"].shape[0]), np.float32)
  return np.concatenate(out)


@common.register("linear_probe")
class LinearProbeEvaluator(common.Evaluator):
  """Linear-probe top-1/top-5 on eval and top-1 on train (percent) per feature set.

  Options: ``optimizer`` ('lars' | 'sgd' | 'adamw'), ``base_lr`` (0.1, scaled
  by batch/256), ``epochs`` (90), ``warmup_epochs`` (10), ``batch_size``
  (256), ``weight_decay`` (0), ``momentum`` (0.9, lars/sgd),
  ``trust_coefficient`` (0.001, lars), ``seed`` (0),
  ``feature_batch_size`` (extraction batch, default ``batch_size``),
  ``max_train`` / ``max_eval`` (caps, None = all), ``pooling`` (recorded when the context
  does not say how its features are pooled; `Trainer.eval_context` does).
  """

  def probe_config(self) -> ProbeConfig:
    """The fit's hyper-parameters from the evaluator's options."""
    d = ProbeConfig()
    return ProbeConfig(
        optimizer=str(self.option("optimizer", d.optimizer)),
        base_lr=float(self.option("base_lr", d.base_lr)),
        epochs=int(self.option("epochs", d.epochs)),
        warmup_epochs=int(self.option("warmup_epochs", d.warmup_epochs)),
        batch_size=int(self.option("batch_size", d.batch_size)),
        weight_decay=float(self.option("weight_decay", d.weight_decay)),
        momentum=float(self.option("momentum", d.momentum)),
        trust_coefficient=float(self.option("trust_coefficient", d.trust_coefficient)),
        seed=int(self.option("seed", d.seed)),
    )

  def run(self, ctx: common.EvalContext) -> dict:
    pcfg = self.probe_config()
    if pcfg.optimizer.lower() not in OPTIMIZER_RULES:  # before the (slow) feature extraction
      raise ValueError(f"unknown probe optimizer {pcfg.optimizer!r}; use lars, sgd or adamw")
    feature_batch = int(self.option("feature_batch_size", pcfg.batch_size))
    feature = str(self.option("feature", "final"))
    pooling = self.option("pooling", "cls")
    from mim_jax.evaluators import knn  # pylint: disable=g-import-not-at-top
    train, train_y = knn.select_features(ctx, "train", feature_batch,
                                         self.option("max_train", None), feature, pooling)
    evals, eval_y = knn.select_features(ctx, "eval", feature_batch,
                                        self.option("max_eval", None), feature, pooling)
    result, info = {}, {}
    for name in sorted(train):
      params, norm, info = fit(train[name], train_y, ctx.num_classes, pcfg)
      acc = common.topk_accuracy(predict_scores(params, norm, evals[name]), eval_y, ks=(1, 5))
      train_acc = common.topk_accuracy(predict_scores(params, norm, train[name]), train_y, ks=(1,))
      result[f"{name}/top1"] = acc[1]
      result[f"{name}/top5"] = acc[5]
      result[f"{name}/train_top1"] = train_acc[1]
      result[f"{name}/train_loss"] = info["final_train_loss"]
      logging.info("%s %s: probe top1 %.2f top5 %.2f train_top1 %.2f", self.name, name,
                   acc[1], acc[5], train_acc[1])
    result["protocol"] = {
        "type": "linear_probe",
        "optimizer": pcfg.optimizer,
        "base_lr": pcfg.base_lr,
        "lr": pcfg.lr(info.get("batch_size", pcfg.batch_size)),
        "lr_schedule": "linear warmup then half-cosine to 0, per step",
        "epochs": pcfg.epochs,
        "warmup_epochs": pcfg.warmup_epochs,
        "batch_size": int(info.get("batch_size", pcfg.batch_size)),
        "steps_per_epoch": int(info.get("steps_per_epoch", 0)),
        "weight_decay": pcfg.weight_decay,
        "momentum": pcfg.momentum if pcfg.optimizer.lower() in ("lars", "sgd") else None,
        "trust_coefficient": pcfg.trust_coefficient if pcfg.optimizer.lower() == "lars" else None,
        "optimizer_rule": OPTIMIZER_RULES[pcfg.optimizer.lower()],
        "seed": pcfg.seed,
        "init": "trunc_normal(std=0.01) weights, zero bias",
        "feature_normalisation": f"parameter-free BatchNorm (train mean/std, eps {BN_EPS:g})",
        "feature": feature,
        # 'final' features come pooled by the method (ctx.pooling); block features by the option.
        "pooling": pooling if feature != "final" else (ctx.pooling or pooling),
        "augmentation": "none (features precomputed)",
        "num_train": int(len(train_y)),
        "num_eval": int(len(eval_y)),
        "top5_classes": min(5, int(ctx.num_classes)),
    }
    return result
