"""Data: sources (embedded CIFAR-10 subset, image folders, TFDS), grain pipelines, augmentation.

Importing this package is cheap: grain, tensorflow_datasets and PIL load inside the functions
that need them, and `augment` (which imports JAX) loads on first use of ``mim_jax.data.augment``.
"""
from __future__ import annotations

import importlib
from typing import Any

from mim_jax.data.pipeline import (
    TrainLoader,
    checkpoint_args_restore,
    checkpoint_args_save,
    eval_batches,
    make_train_loader,
    num_classes,
    num_examples,
    steps_per_epoch,
)
from mim_jax.data.sources import (
    DataConfigError,
    DataError,
    DataNotFoundError,
    ImageFolderSource,
    InMemoryData,
    load_in_memory,
    tfds_source,
)

__all__ = [
    "DataConfigError", "DataError", "DataNotFoundError", "ImageFolderSource", "InMemoryData",
    "TrainLoader", "augment", "checkpoint_args_restore", "checkpoint_args_save", "eval_batches",
    "load_in_memory", "make_train_loader", "num_classes", "num_examples", "steps_per_epoch",
    "tfds_source",
]


def __getattr__(name: str) -> Any:
  if name == "augment":
    return importlib.import_module("mim_jax.data.augment")
  raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
