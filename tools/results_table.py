"""Prints the MAE / SimMIM CIFAR-10 table (docs/results/mae_simmim.md) from the workdirs
written by tools/cifar10_table.sh.

  python tools/results_table.py [OUT_DIR] [--out table.md]

Looks for ``<OUT_DIR>/<method>_cifar10`` (pretrained) and ``<method>_cifar10_random`` (random
initialisation) for MAE and SimMIM and hands the ones present to `mim_jax.report`, which
writes the table and the protocol notes (any set of workdirs: python -m mim_jax.report).
"""
import argparse
import os
import sys

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))

from mim_jax import report  # noqa: E402  pylint: disable=g-import-not-at-top

METHODS = ("mae", "simmim")
ENCODERS = (("pretrained", ""), ("random init", "_random"))
METRICS = ("knn/top1", "linear/top1")


def readme_runs(out_dir: str) -> tuple[list[str], list[str]]:
  """The workdirs of tools/cifar10_table.sh found under ``out_dir`` and their row names."""
  workdirs, names = [], []
  for method in METHODS:
    for tag, suffix in ENCODERS:
      workdir = os.path.join(out_dir, f"{method}_cifar10{suffix}")
      if os.path.exists(os.path.join(workdir, report.RESULTS_FILENAME)):
        workdirs.append(workdir)
        names.append(tag)
  return workdirs, names


def main(argv: list[str]) -> int:
  parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
  parser.add_argument("out_dir", nargs="?", default="runs", help="OUT_DIR of cifar10_table.sh")
  parser.add_argument("--out", help="also write the table to this file")
  args = parser.parse_args(argv)
  workdirs, names = readme_runs(args.out_dir)
  if not workdirs:
    print(f"error: no <method>_cifar10[_random]/eval_results.json under {args.out_dir}: run "
          "bash tools/cifar10_table.sh first", file=sys.stderr)
    return 2
  return report.main([*workdirs, "--names", ",".join(names), "--metrics", ",".join(METRICS)]
                     + (["--out", args.out] if args.out else []))


if __name__ == "__main__":
  sys.exit(main(sys.argv[1:]))
