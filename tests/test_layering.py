"""The arrows point downward: configs -> methods -> trainer -> models / data / evaluators.

Nothing below the trainer imports it, at module level or inside a function (the circular
imports that `train.preprocess`, `train.TrainingError` and `train.load_run_config` once made).
"""
import ast
import pathlib
import subprocess
import sys

from helpers import ROOT, subprocess_env

PACKAGE = ROOT / "mim_jax"
BELOW_THE_TRAINER = ("methods", "models", "data", "evaluators", "targets", "masking.py",
                     "optim.py", "sharding.py", "teachers.py", "errors.py", "config_lib.py",
                     "checkpointing.py")


def imported_modules(path: pathlib.Path) -> set[str]:
  """Every module an `import` or `from ... import` anywhere in the file names (function
  bodies included), as dotted names; `from mim_jax import train` gives 'mim_jax.train'."""
  out = set()
  for node in ast.walk(ast.parse(path.read_text())):
    if isinstance(node, ast.Import):
      out.update(a.name for a in node.names)
    elif isinstance(node, ast.ImportFrom) and node.module:
      out.add(node.module)
      out.update(f"{node.module}.{a.name}" for a in node.names)
  return out


def files_below_the_trainer():
  for name in BELOW_THE_TRAINER:
    p = PACKAGE / name
    yield from (sorted(p.rglob("*.py")) if p.is_dir() else [p])


def test_nothing_below_the_trainer_imports_it():
  files = list(files_below_the_trainer())
  assert len(files) > 40      # the methods, models, data and evaluators are all read
  offenders = [str(f.relative_to(ROOT)) for f in files if "mim_jax.train" in imported_modules(f)]
  assert not offenders, f"these import mim_jax.train: {offenders}"


def test_the_check_sees_an_import_inside_a_function(tmp_path):
  p = tmp_path / "m.py"
  p.write_text("def f():\n  from mim_jax import train\n  return train\n")
  assert "mim_jax.train" in imported_modules(p)


def test_building_every_method_leaves_the_trainer_unimported():
  code = ("import sys\n"
          "from mim_jax import methods\n"
          "import importlib\n"
          "for spec in methods.REGISTRY.values():\n"
          "  importlib.import_module(spec.split(':')[0])\n"
          "import mim_jax.evaluators, mim_jax.data.pipeline\n"
          "print('mim_jax.train' in sys.modules)\n")
  out = subprocess.run([sys.executable, "-c", code], env=subprocess_env(), capture_output=True,
                       text=True, check=True)
  assert out.stdout.strip() == "False", out.stdout + out.stderr
