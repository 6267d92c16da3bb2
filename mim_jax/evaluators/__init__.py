"""Evaluators run by the trainer: weighted kNN, linear probe, reconstruction picture.

Usage::

  from mim_jax import evaluators
  ctx = evaluators.EvalContext(encode=..., batches=..., num_classes=10,
                               reconstruct=None, workdir=workdir, step=step)
  results = evaluators.run_all(config.evals, ctx)     # {name: result}
  evaluators.write_results(workdir, results, step)    # merges eval_results.json

or one at a time: ``evaluators.build(name, cfg).run(ctx)``.
"""
import importlib as _importlib
import pkgutil as _pkgutil

# Every module of this package registers its evaluator types when imported: a new evaluator is
# one new file here.
for _mod in _pkgutil.iter_modules(__path__):
  if _mod.name != "common":
    _importlib.import_module(f"{__name__}.{_mod.name}")
from mim_jax.evaluators.common import (
    EvalContext,
    Evaluator,
    RESULTS_FILENAME,
    build,
    extract_features,
    map_padded,
    register,
    registered_types,
    run_all,
    topk_accuracy,
    write_results,
)

__all__ = [
    "EvalContext",
    "Evaluator",
    "RESULTS_FILENAME",
    "build",
    "extract_features",
    "map_padded",
    "register",
    "registered_types",
    "run_all",
    "topk_accuracy",
    "write_results",
]
