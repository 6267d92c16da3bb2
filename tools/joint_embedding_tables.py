r"""Reruns the joint-embedding methods' seed tables on CIFAR-10 at CPU scale.

  python tools/joint_embedding_tables.py --table <name>|all --workdir_root runs/je_tables \
    --data ../shared/data/cifar10/train [--steps N] [--batch B] [--dry_run]

Every row is a label and config overrides on top of the method's cifar10 preset (whose
defaults are its recipe), one factor at a time (tools/ablations.py runs them and writes
<root>/<table>.md). The monitored column is aux/collapse_ratio: the per-dimension standard
deviation of the L2-normalised output times sqrt(d) (1 healthy, 0 collapsed). Tables:

  instdisc          InstDisc's Table 1 and 2: parametric softmax, non-parametric softmax, NCE
                    with m = 1 / 10 / 512 / 4096 noise samples
  moco_momentum     MoCo's key-encoder momentum 0 / 0.9 / 0.99 / 0.999 / 0.9999 (0 is expected
                    to fail to learn)
  moco_v2           MoCo v2's MLP head / aug+ / cosine switches (the rows without cosine keep
                    the lr constant: the CPU runs are too short for the official step drops)
  moco_temperature  the temperature sweep with and without the MLP head
  simclr_batch      SimCLR's batch size at equal epochs, as the paper compares them (with
                    --steps N: N x 256 / batch steps a row)
  simclr_head       SimCLR's projection head: none / linear / non-linear
  simclr_aug        SimCLR's augmentation study (Fig. 5): one branch the image, the other
                    each single operator of crop, color, rotate, cutout, noise, blur, sobel and
                    each pair of them (in that order), beside the recipe (both branches crop +
                    colour)
  simsiam_stopgrad  SimSiam without stop-gradient (expected to collapse) beside its recipe
  byol_predictor    BYOL without its predictor beside its recipe

The papers' own numbers (ImageNet, ResNet-50) are not reproduced here: this is a CPU-scale
rerun on a narrow ResNet-18.
"""
from __future__ import annotations

import os
import sys

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from ablations import Row, Table  # noqa: E402  pylint: disable=g-import-not-at-top
import ablations  # noqa: E402  pylint: disable=g-import-not-at-top

MONITOR = ("aux/collapse_ratio", "collapse ratio")


def _table(title: str, method: str, rows: list) -> Table:
  return Table(title, f"configs/{method}.py:cifar10", rows, MONITOR, f"{method}_recipe")


TABLES = {
    "instdisc": _table("InstDisc: objective and noise samples", "instdisc", [
        Row("parametric softmax", {"instdisc.objective": "parametric"}),
        Row("non-parametric softmax", {"instdisc.objective": "softmax"}),
        Row("NCE, m = 1", {"instdisc.nce_k": 1}),
        Row("NCE, m = 10", {"instdisc.nce_k": 10}),
        Row("NCE, m = 512", {"instdisc.nce_k": 512}),
        Row("NCE, m = 4096", {"instdisc.nce_k": 4096}),
    ]),
    "moco_momentum": _table("MoCo: key-encoder momentum", "moco", [
        Row(f"m = {m}", {"moco.momentum": m}) for m in (0.0, 0.9, 0.99, 0.999, 0.9999)
    ]),
    "moco_v2": _table("MoCo v2: MLP head, aug+, cosine", "moco", [
        Row("none (constant lr)", {"moco.mlp": False, "moco.aug_plus": False,
                                   "optim.schedule": "constant"}),
        Row("MLP", {"moco.mlp": True, "moco.aug_plus": False, "optim.schedule": "constant"}),
        Row("aug+", {"moco.mlp": False, "moco.aug_plus": True, "optim.schedule": "constant"}),
        Row("MLP + aug+", {"moco.mlp": True, "moco.aug_plus": True, "optim.schedule": "constant"}),
        Row("MLP + aug+ + cosine", {"moco.mlp": True, "moco.aug_plus": True,
                                    "optim.schedule": "cosine_epoch"}),
    ]),
    "moco_temperature": _table("MoCo: temperature with and without the MLP head", "moco", [
        Row(f"T = {t}{', MLP' if mlp else ''}", {"moco.temperature": t, "moco.mlp": mlp})
        for mlp in (False, True) for t in (0.07, 0.1, 0.2, 0.5)
    ]),
    "simsiam_stopgrad": _table("SimSiam: stop-gradient", "simsiam", [
        Row("with stop-gradient", {"simsiam.stop_gradient": True}),
        Row("without stop-gradient", {"simsiam.stop_gradient": False}),
    ]),
    "byol_predictor": _table("BYOL: predictor", "byol", [
        Row("with predictor", {"byol.predictor": True}),
        Row("without predictor", {"byol.predictor": False}),
    ]),
    "simclr_batch": _table("SimCLR: batch size", "simclr", [
        Row(f"batch {b}", {"input.batch_size": b}) for b in (64, 128, 256, 512)
    ]),
    "simclr_head": _table("SimCLR: projection head", "simclr", [
        Row("no head", {"simclr.proj_head_mode": "none"}),
        Row("linear", {"simclr.proj_head_mode": "linear"}),
        Row("non-linear, 2 layers (v1)", {"simclr.proj_head_mode": "nonlinear",
                                          "simclr.num_proj_layers": 2}),
        Row("non-linear, 3 layers (v2)", {"simclr.proj_head_mode": "nonlinear",
                                          "simclr.num_proj_layers": 3}),
    ]),
}


def _aug_rows() -> list:
  from mim_jax.data.views import STUDY_OPS  # pylint: disable=g-import-not-at-top
  ops = list(STUDY_OPS)
  pairs = [(a,) for a in ops] + [(a, b) for i, a in enumerate(ops) for b in ops[i + 1:]]
  return ([Row("recipe: both branches crop + colour", {"simclr.aug_study": ""})]
          + [Row("one branch: " + " then ".join(p), {"simclr.aug_study": "+".join(p)})
             for p in pairs])


TABLES["simclr_aug"] = _table("SimCLR: augmentations on one branch (the other the image)",
                              "simclr", _aug_rows())


def main(argv: list[str]) -> int:
  return ablations.main(TABLES, argv, __doc__.split("\n\n")[0], "runs/je_tables")


if __name__ == "__main__":
  sys.exit(main(sys.argv[1:]))
