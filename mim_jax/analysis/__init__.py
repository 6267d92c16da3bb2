"""Analyses that explain masked image modelling, after "Revealing the Dark Secrets of Masked
Image Modeling" (Xie et al., CVPR 2023) and the ViT paper's attention-distance figure.

  attention.py  average attention distance, attention entropy and KL divergence between heads,
                per layer and head, from the attention maps the ViT sows as intermediates
  cka.py        linear CKA (Kornblith et al. 2019) between the layers of one or two encoders
  plots.py      the figures (matplotlib Agg, imported lazily)
  __main__.py   the command line: python -m mim_jax.analysis {attention,cka} --workdir W ...

The statistics are pure functions of arrays (see the tests); `main(argv)` runs the command
line in-process and returns its exit code.
"""
from mim_jax.analysis.attention import (
    attention_distance,
    attention_entropy,
    head_diversity,
    head_kl,
    pixel_distances,
)
from mim_jax.analysis.cka import cka_matrix, linear_cka


def main(argv=None) -> int:
  """`python -m mim_jax.analysis` in-process: returns the exit code (2 after `error: ...`)."""
  from mim_jax.analysis.__main__ import main as cli_main
  return cli_main(argv)


__all__ = [
    "attention_distance",
    "attention_entropy",
    "cka_matrix",
    "head_diversity",
    "head_kl",
    "linear_cka",
    "main",
    "pixel_distances",
]
