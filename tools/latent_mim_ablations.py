r"""Reruns the four ablation tables of Latent MIM (Wei, Gupta, Morgado, ECCV 2024) on CIFAR-10.

  python tools/latent_mim_ablations.py --table target|loss|masking|decoder|all \
    --workdir_root runs/latent_mim --data ../shared/data/cifar10/train [--steps N] [--batch B] \
    [--dry_run]

Every row is a label and config overrides on top of configs/latent_mim.py:cifar10 (whose
defaults are the official recipe: EMA target, PatchDisc, mask ratio 0.9, a gap, the similarity
regulariser, cross-attention decoder with visual cues, MLP projection head, 3 decoder blocks),
changing one factor at a time from that recipe. Each row runs as

  python -m mim_jax.main --config=configs/latent_mim.py:cifar10 --workdir=<root>/<table>_<row> \
    --config.input.data.dir=<data> [--config.total_steps=N] [--config.input.batch_size=B] \
    --config.<key>=<value> ...

Rows that change nothing (their overrides are the recipe's own values: the momentum target,
PatchDisc, ratio 0.9 with gap 1, the cross-attention decoder with visual cues, the MLP head,
3 decoder blocks) are one run, in <root>/recipe, shared by every table. Rows are skipped
when their workdir already holds a finished run (a 'summary' record in
metrics.jsonl), then writes <root>/<table>.md: per row the final average cosine similarity of
the online encoder's patch latents ('Sim', aux/sim of the last logged step: 1.00 means
collapse), kNN top-1 and linear-probe top-1 on the held-out images. `--dry_run` only prints the
commands (and writes the tables of whatever runs exist).

The paper's own numbers (ImageNet, ViT-B) are not reproduced here: this is a CPU-scale rerun.
The gap is in pixels (the official code); at 32 px with 4-pixel patches 1 pixel is the paper's
4/16 of a patch, and 4 pixels the paper's pixel count.
"""
from __future__ import annotations

import os
import sys

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from ablations import Row, Table  # noqa: E402  pylint: disable=g-import-not-at-top
import ablations  # noqa: E402  pylint: disable=g-import-not-at-top

BASE_CONFIG = "configs/latent_mim.py:cifar10"

ROWS = {
    # 1. Target encoder (collapse study).
    "target": [
        Row("naive (shared, gradients through both)", {"latent_mim.target": "naive"}),
        Row("independent encoders", {"latent_mim.target": "independent"}),
        Row("shared + stop-gradient", {"latent_mim.target": "stopgrad"}),
        Row("momentum (EMA) target", {"latent_mim.target": "ema"}),
        Row("frozen random target", {"latent_mim.target": "random"}),
        # PatchDisc and the similarity regulariser both push patch latents apart, so with them
        # even the naive target cannot collapse; these two rows take both away.
        Row("naive, MSE, no regulariser", {"latent_mim.target": "naive", "latent_mim.loss": "mse",
                                           "latent_mim.reg_weight": 0.0}),
        Row("momentum, MSE, no regulariser", {"latent_mim.target": "ema", "latent_mim.loss": "mse",
                                              "latent_mim.reg_weight": 0.0}),
    ],
    # 2. Reconstruction objective on each masked patch's latent.
    "loss": [
        Row("MSE", {"latent_mim.loss": "mse"}),
        Row("L1", {"latent_mim.loss": "l1"}),
        Row("Huber (delta 1)", {"latent_mim.loss": "huber", "latent_mim.huber_delta": 1.0}),
        Row("PatchDisc", {"latent_mim.loss": "patchdisc"}),
    ],
    # 3. Masking and redundancy.
    "masking": [
        Row("ratio 0.75, gap 0", {"latent_mim.mask_ratio": 0.75, "latent_mim.gap": 0}),
        Row("ratio 0.9, gap 0", {"latent_mim.mask_ratio": 0.9, "latent_mim.gap": 0}),
        Row("ratio 0.75, gap 1", {"latent_mim.mask_ratio": 0.75, "latent_mim.gap": 1}),
        Row("ratio 0.9, gap 1", {"latent_mim.mask_ratio": 0.9, "latent_mim.gap": 1}),
        Row("ratio 0.9, gap 4", {"latent_mim.mask_ratio": 0.9, "latent_mim.gap": 4}),
        Row("ratio 0.9, gap 1, no regulariser", {"latent_mim.mask_ratio": 0.9, "latent_mim.gap": 1,
                                                 "latent_mim.reg_weight": 0.0}),
    ],
    # 4. Decoder design.
    "decoder": [
        Row("self-attention, no visual cues", {"latent_mim.decoder.kind": "self",
                                               "latent_mim.visual_cues": False}),
        Row("self-attention, visual cues", {"latent_mim.decoder.kind": "self",
                                            "latent_mim.visual_cues": True}),
        Row("cross-attention, no visual cues", {"latent_mim.decoder.kind": "cross",
                                                "latent_mim.visual_cues": False}),
        Row("cross-attention, visual cues", {"latent_mim.decoder.kind": "cross",
                                             "latent_mim.visual_cues": True}),
        Row("no projection head", {"latent_mim.proj_head": "none"}),
        Row("MLP projection head", {"latent_mim.proj_head": "mlp"}),
        Row("decoder depth 3", {"latent_mim.decoder.depth": 3}),
        Row("decoder depth 8", {"latent_mim.decoder.depth": 8}),
    ],
}
TABLES = {name: Table(f"Latent MIM ablation: {name}", BASE_CONFIG, rows)
          for name, rows in ROWS.items()}


def is_recipe(row: Row) -> bool:
  return ablations.is_recipe(TABLES["target"], row)


def workdir(root: str, table: str, row: Row) -> str:
  return ablations.workdir(root, table, TABLES[table], row)


def main(argv: list[str]) -> int:
  return ablations.main(TABLES, argv, __doc__.split("\n\n")[0], "runs/latent_mim")


if __name__ == "__main__":
  sys.exit(main(sys.argv[1:]))
