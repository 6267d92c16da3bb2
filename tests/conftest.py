"""Test set-up: 8 fake CPU devices so sharding tests run anywhere, and XLA's CPU backend at
optimisation level 0.

XLA reads the flags once, when jax first initialises its backends, so they are set here,
before any test imports jax. The tests' models are tiny and run a few steps, so compiling is
most of their time: level 0 skips LLVM's optimisation passes, which halves the compile time of a
train step (9.1 s -> 4.5 s for the mu-width MAE of test_multiprocess_resume) for slower code.
It changes how the same HLO is lowered to machine code, not the computation: that run's losses
came out bit-identical at both levels. Subprocesses the tests start inherit the flag
(helpers.subprocess_env).

XLA's CPU backend also compiles with its legacy elemental emitters rather than the newer fusion
emitters (`--xla_cpu_use_fusion_emitters=false`): the train step of tests/test_contract.py's MAE
compiles in 0.8 s instead of 2.2 s, the tiny MoCo ResNet's in 2.6 s instead of 4.1 s, and runs no
slower. The flag is probed once (a jaxlib without it refuses to start) and left out where unknown.
"""
import os
import subprocess
import sys

os.environ.setdefault("XLA_FLAGS", "")
if "xla_force_host_platform_device_count" not in os.environ["XLA_FLAGS"]:
  os.environ["XLA_FLAGS"] += " --xla_force_host_platform_device_count=8"
if "xla_backend_optimization_level" not in os.environ["XLA_FLAGS"]:
  os.environ["XLA_FLAGS"] += " --xla_backend_optimization_level=0"
os.environ.setdefault("JAX_PLATFORMS", "cpu")
_EMITTERS = "--xla_cpu_use_fusion_emitters=false"
if "xla_cpu_use_fusion_emitters" not in os.environ["XLA_FLAGS"]:   # xdist workers inherit it
  _probe = subprocess.run([sys.executable, "-c", "import jax; jax.devices()"], capture_output=True,
                          env={**os.environ, "XLA_FLAGS": _EMITTERS, "JAX_PLATFORMS": "cpu"})
  if _probe.returncode == 0:
    os.environ["XLA_FLAGS"] += " " + _EMITTERS

import pathlib  # noqa: E402

import pytest  # noqa: E402

SHARED_CIFAR = pathlib.Path(__file__).resolve().parents[1].parent / "shared" / "data" / "cifar10" / "train"


@pytest.fixture(scope="session")
def shared_cifar_dir():
  """The shared CIFAR-10 image folder beside the checkout (present on CI and dev machines)."""
  if not SHARED_CIFAR.is_dir():
    pytest.fail(f"{SHARED_CIFAR} is missing: tests that read real images need ../shared/data/cifar10/train")
  return SHARED_CIFAR


@pytest.fixture(scope="module")
def compilation_cache(tmp_path_factory):
  """A persistent compilation cache for the requesting module: its runs of one config (a resume
  test's three) then compile the train step once. Module-scoped and restored afterwards (a
  session-wide cache once made an xdist worker abort in device_get)."""
  import jax
  from jax.experimental.compilation_cache import compilation_cache as cc
  keys = ("jax_compilation_cache_dir", "jax_persistent_cache_min_compile_time_secs",
          "jax_persistent_cache_min_entry_size_bytes")
  old = {k: getattr(jax.config, k) for k in keys}
  new = (str(tmp_path_factory.mktemp("jax_cache")), 0, 0)
  for k, v in zip(keys, new):
    jax.config.update(k, v)
  cc.reset_cache()
  yield
  for k, v in old.items():
    jax.config.update(k, v)
  cc.reset_cache()
