"""Shared pieces of the evaluators: the context, the registry, features, results file.

An evaluator is built from a config entry (``type`` plus options) and run on an
:class:`EvalContext`, which the trainer fills with callables that encode images,
iterate over the data splits and (for masked-image-modelling methods) reconstruct
images. ``run`` returns a JSON-serialisable dict of metrics plus a ``protocol``
dict recording how the numbers were obtained.
"""
from __future__ import annotations

import abc
import dataclasses
import json
import logging
import os
import tempfile
from collections.abc import Mapping
from typing import Any, Callable, Iterable, Optional

import numpy as np

# Called by the trainer: encode(uint8 images [B,S,S,3]) -> {name: features [B,D]}.
EncodeFn = Callable[[np.ndarray], Mapping[str, np.ndarray]]
# batches(split, batch_size, max_examples=None) -> iterable of (uint8 images, int labels), one
# pass; with max_examples, over a fixed seeded subset of that many examples.
BatchesFn = Callable[[str, int], Iterable[tuple[np.ndarray, np.ndarray]]]
# reconstruct(uint8 images, seed) -> {'input', 'masked', 'reconstruction'} uint8.
ReconstructFn = Callable[[np.ndarray, int], Mapping[str, np.ndarray]]

RESULTS_FILENAME = "eval_results.json"


@dataclasses.dataclass
class EvalContext:
  """What an evaluator may use from the trainer.

  Attributes:
    encode: maps uint8 images [B,S,S,3] to named, already pooled feature sets,
      e.g. ``{'online': [B,D], 'ema': [B,D]}``; metrics are computed per name.
    batches: ``batches(split, batch_size, max_examples=None)`` yields
      ``(images_uint8, labels)`` once over ``split`` ('train': the whole training split,
      'pretrain': the images pretraining uses, i.e. its ``train_subset`` when one is set, or
      'eval': the held-out images), or over a
      fixed seeded subset of ``max_examples`` of it.
    num_classes: number of label classes.
    reconstruct: ``reconstruct(images_uint8, seed)`` returns uint8 arrays
      ``{'input', 'masked', 'reconstruction'}`` each [B,S,S,3]; None for
      methods without a pixel reconstruction.
    workdir: directory for files written by evaluators.
    step: training step the evaluation belongs to.
    encode_layers: ``encode_layers(images_uint8, pooling)`` -> {name: list of [B, D_i]} (or a
      stacked [B, depth + 1, D]): every
      block's output pooled ('cls' | 'mean'), before the final norm, then the final-norm
      output (the last entry equals ``encode``'s features for that pooling).
    encode_tokens: ``encode_tokens(images_uint8)`` -> {name: [B, prefix_tokens + L, D]}
      final-norm tokens.
    loss: ``loss(images_uint8, seed)`` -> [B] the method's training loss of each image (no
      augmentation, masks drawn from ``seed``); None for methods without one.
    feature_cache: features extracted during this evaluation round, shared by
      evaluators (kNN and linear probe read the same frozen features); leave it
      at its default and build a fresh context for every round.
  """
  encode: EncodeFn
  batches: BatchesFn
  num_classes: int
  reconstruct: Optional[ReconstructFn] = None
  workdir: str = "."
  step: int = 0
  feature_cache: dict = dataclasses.field(default_factory=dict, repr=False, compare=False)
  encode_layers: Optional[Callable[[np.ndarray, str], Mapping[str, np.ndarray]]] = None
  encode_tokens: Optional[Callable[[np.ndarray], Mapping[str, np.ndarray]]] = None
  loss: Optional[Callable[[np.ndarray, int], np.ndarray]] = None
  # How `encode` pools its features (the method's config.pooling), for the protocols.
  pooling: Optional[str] = None
  # Leading non-spatial tokens of `encode_tokens`' output (a ViT's cls token; 0 without one).
  prefix_tokens: int = 1
  # The multi-view test of streamed video (`input.data.test_views` other than (1, 1)): like
  # `batches`, images uint8 [b, V, T, S, S, 3]; None when every example is one view.
  view_batches: Optional[BatchesFn] = None
  # The reconstruction picture's column titles and header (the method's picture_titles:
  # {'masked', 'reconstruction', 'header'}); None: the masked-image-modelling words.
  picture_titles: Optional[Mapping[str, str]] = None


class Evaluator(abc.ABC):
  """Base class: holds the evaluator's name and its config as a plain dict."""

  def __init__(self, name: str, cfg: Mapping[str, Any]):
    self.name = name
    self.cfg = dict(cfg)

  def option(self, key: str, default: Any = None) -> Any:
    """Returns ``cfg[key]``, or ``default`` when absent or None."""
    value = self.cfg.get(key, None)
    return default if value is None else value

  @abc.abstractmethod
  def run(self, ctx: EvalContext) -> dict:
    """Runs the evaluation; returns metrics and a 'protocol' dict."""


_REGISTRY: dict[str, type] = {}


def register(type_name: str):
  """Class decorator registering an evaluator class under ``cfg.type``."""

  def wrap(cls):
    _REGISTRY[type_name] = cls
    return cls

  return wrap


def registered_types() -> list[str]:
  """The evaluator types known to :func:`build`."""
  return sorted(_REGISTRY)


def cfg_to_dict(cfg: Any) -> dict:
  """Turns a ConfigDict / FrozenConfigDict / Mapping into a plain dict."""
  if cfg is None:
    return {}
  if hasattr(cfg, "to_dict"):
    return dict(cfg.to_dict())
  if isinstance(cfg, Mapping):
    return dict(cfg)
  raise TypeError(f"evaluator config must be a mapping, got {type(cfg).__name__}")


def build(name: str, cfg: Any) -> Evaluator:
  """Builds the evaluator named ``name`` from its config entry.

  ``cfg['type']`` selects the evaluator ('knn', 'linear_probe',
  'reconstruction'); when absent, ``name`` itself is tried as the type.
  """
  options = cfg_to_dict(cfg)
  type_name = options.get("type") or name
  if type_name not in _REGISTRY:
    raise ValueError(f"evaluator {name!r}: unknown type {type_name!r}; known: {registered_types()}")
  return _REGISTRY[type_name](name, options)


def is_enabled(cfg: Any) -> bool:
  """False only when the entry sets ``enabled`` to a false value."""
  options = cfg_to_dict(cfg)
  return bool(options.get("enabled", True))


def run_all(evals_cfg: Any, ctx: EvalContext) -> dict:
  """Runs every enabled entry of ``config.evals`` (name -> cfg) in order.

  Returns ``{name: result}``; entries with ``enabled=False`` are skipped.
  """
  results = {}
  for name, cfg in cfg_to_dict(evals_cfg).items():
    if not is_enabled(cfg):
      logging.info("evaluator %s disabled, skipped", name)
      continue
    logging.info("running evaluator %s at step %d", name, ctx.step)
    results[name] = build(name, cfg).run(ctx)
  return results


def to_jsonable(value: Any) -> Any:
  """Converts numpy / jax scalars and arrays inside ``value`` to python types."""
  if isinstance(value, Mapping):
    return {str(k): to_jsonable(v) for k, v in value.items()}
  if isinstance(value, (list, tuple)):
    return [to_jsonable(v) for v in value]
  if isinstance(value, (str, bool, int, float)) or value is None:
    return value
  if isinstance(value, np.generic):
    return value.item()
  if hasattr(value, "shape") and hasattr(value, "dtype"):  # np / jax arrays
    arr = np.asarray(value)
    return arr.item() if arr.ndim == 0 else arr.tolist()
  return str(value)


def write_results(workdir: str, results: Mapping[str, Mapping[str, Any]], step: int) -> str:
  """Merges ``results`` into ``<workdir>/eval_results.json`` atomically.

  The file maps evaluator name -> its latest result plus ``"step"``. Entries
  of evaluators absent from ``results`` are kept; present ones are replaced.
  The new content goes to a temporary file in ``workdir`` that is then renamed
  over the old one. Returns the file's path.
  """
  os.makedirs(workdir, exist_ok=True)
  path = os.path.join(workdir, RESULTS_FILENAME)
  merged: dict = {}
  if os.path.exists(path):
    try:
      with open(path) as f:
        merged = json.load(f)
      if not isinstance(merged, dict):
        raise ValueError("top level is not an object")
    except (OSError, ValueError) as e:
      logging.warning("%s unreadable (%s): starting it afresh", path, e)
      merged = {}
  for name, result in results.items():
    entry = to_jsonable(dict(result))
    entry["step"] = int(step)
    merged[str(name)] = entry
  fd, tmp = tempfile.mkstemp(prefix=".eval_results.", suffix=".tmp", dir=workdir)
  try:
    with os.fdopen(fd, "w") as f:
      json.dump(merged, f, indent=2, sort_keys=True, allow_nan=True)
      f.write("\n")
      f.flush()
      os.fsync(f.fileno())
    os.replace(tmp, path)
  except BaseException:
    if os.path.exists(tmp):
      os.remove(tmp)
    raise
  return path


def take_images(ctx: EvalContext, split: str, count: int, batch_size: Optional[int] = None):
  """``count`` (images, labels) of ``split`` (the source's fixed seeded subset of that size, so
  they span the classes), fewer if it is shorter."""
  images, labels, have = [], [], 0
  for x, y in ctx.batches(split, batch_size or count, count):
    x = np.asarray(x)
    images.append(x[: count - have])
    labels.append(np.asarray(y)[: count - have])
    have += len(images[-1])
    if have >= count:
      break
  if not images:
    raise ValueError(f"split {split!r} yielded no images")
  return np.concatenate(images), np.concatenate(labels)


def cap(limit) -> Optional[int]:
  """Configs use 0 (or None) for "no cap"."""
  return None if limit is None or int(limit) <= 0 else int(limit)


def extract_outputs(ctx: EvalContext, split: str, batch_size: int, limit,
                    kind: tuple, encode: Callable[[np.ndarray], Mapping[str, np.ndarray]],
                    dtype=np.float32) -> tuple[dict[str, np.ndarray], np.ndarray]:
  """One pass over ``split`` (at most ``limit`` images) through ``encode``.

  Like `extract_features` for any encoder output ``{name: [B, ...]}``
  (every block's pooled output, all tokens): the outputs are cast to ``dtype``
  batch by batch (float16 keeps token banks small) and cached in
  ``ctx.feature_cache`` under ``kind`` (e.g. ``('layers', 'cls')``), the split,
  the batch size and the cap. Returns ``({name: [N, ...]}, int32 labels [N])``.
  """
  limit = cap(limit)
  key = (*kind, split, int(batch_size), limit)
  if key in ctx.feature_cache:
    return ctx.feature_cache[key]
  chunks: dict[str, list[np.ndarray]] = {}
  labels: list[np.ndarray] = []
  have = 0
  for images, y in ctx.batches(split, int(batch_size), limit):
    y = np.asarray(y).reshape(-1)
    take = len(y) if limit is None else min(len(y), limit - have)
    if take <= 0:
      break
    outs = encode(np.asarray(images)[:take])
    if not isinstance(outs, Mapping):
      outs = {"features": outs}
    for name, out in outs.items():
      out = np.asarray(out, dtype=dtype)
      if out.shape[0] != take:
        raise ValueError(f"{kind[0]} encoder output {name!r} has {out.shape[0]} rows for {take} images")
      chunks.setdefault(name, []).append(out)
    labels.append(y[:take].astype(np.int32))
    have += take
    if limit is not None and have >= limit:
      break
  if not labels:
    raise ValueError(f"split {split!r} yielded no batches")
  result = ({name: np.concatenate(c) for name, c in chunks.items()}, np.concatenate(labels))
  ctx.feature_cache[key] = result
  return result


def extract_features(ctx: EvalContext, split: str, batch_size: int,
                     limit: Optional[int] = None) -> tuple[dict[str, np.ndarray], np.ndarray]:
  """Encodes one pass over ``split`` (at most ``limit`` images) with ``ctx.encode``.

  Features are frozen and unaugmented (the split is read as given). Returns
  ``({name: float32 [N,D]}, int32 labels [N])``. Results are cached in
  ``ctx.feature_cache`` so evaluators of one round share the extraction. The source picks
  which ``limit`` images (a seeded subset covering every class), so a capped bank is never
  just the first classes of a sorted folder.
  """
  feats, labels = extract_outputs(ctx, split, batch_size, limit, (), ctx.encode)
  for name, f in feats.items():
    if f.ndim != 2:
      raise ValueError(f"encode()[{name!r}] has shape {f.shape[1:]} per image; expected [D]")
  return feats, labels


def map_padded(fn: Callable[[np.ndarray], Any], x: np.ndarray, batch: int) -> Any:
  """``fn`` over ``x`` in batches of exactly ``batch`` rows (the last one zero-padded, so one
  compiled shape serves every call); returns the pytree of its outputs cut to the real rows and
  concatenated on the host."""
  import jax  # pylint: disable=g-import-not-at-top
  outs = []
  for start in range(0, len(x), batch):
    chunk = np.asarray(x[start:start + batch])
    n = len(chunk)
    if n < batch:
      chunk = np.concatenate([chunk, np.zeros((batch - n,) + chunk.shape[1:], chunk.dtype)])
    outs.append(jax.tree.map(lambda a, n=n: np.asarray(a)[:n], fn(chunk)))
  return jax.tree.map(lambda *a: np.concatenate(a), *outs)


def topk_accuracy(scores: np.ndarray, labels: np.ndarray, ks=(1, 5)) -> dict[int, float]:
  """Percent of rows whose label is among the ``k`` highest scores.

  ``k`` larger than the number of classes counts every class (100%). Ties are
  broken towards the lower class index, as ``argmax`` does.
  """
  scores = np.asarray(scores)
  labels = np.asarray(labels).reshape(-1)
  order = np.argsort(-scores, axis=1, kind="stable")
  out = {}
  for k in ks:
    kk = min(int(k), scores.shape[1])
    hit = (order[:, :kk] == labels[:, None]).any(axis=1)
    out[k] = float(100.0 * hit.mean()) if len(labels) else float("nan")
  return out
