"""PNG figures of the analyses (matplotlib's Agg canvas, no pyplot state, imported lazily)."""
from __future__ import annotations

from typing import Sequence

import numpy as np

COLOURS = ("tab:blue", "tab:orange", "tab:green", "tab:red")

# (result key, panel title, y label) of the attention figure.
ATTENTION_PANELS = (
    ("attention_distance", "average attention distance", "distance (pixels)"),
    ("attention_entropy", "attention entropy", "entropy (nats)"),
    ("head_kl", "KL divergence between heads", "mean KL to the other heads (nats)"),
)


def _figure(width: float, height: float):
  from matplotlib.backends.backend_agg import FigureCanvasAgg
  from matplotlib.figure import Figure
  fig = Figure(figsize=(width, height), dpi=100, layout="constrained")
  FigureCanvasAgg(fig)
  return fig


def plot_attention(models: Sequence[dict], path: str) -> str:
  """One panel per statistic; x = layer (1..depth), y = value, one dot per head, a line through
  the per-layer means; each model (dicts with 'label' and [depth, heads] lists) in its colour,
  shifted sideways a little so the dots do not hide each other."""
  fig = _figure(5.0 * len(ATTENTION_PANELS), 4.2)
  axes = fig.subplots(1, len(ATTENTION_PANELS))
  shift = 0.12
  for ax, (key, title, ylabel) in zip(axes, ATTENTION_PANELS):
    for m, model in enumerate(models):
      values = np.asarray(model[key], np.float64)              # [depth, heads]
      depth, heads = values.shape
      x = np.arange(1, depth + 1) + shift * (m - (len(models) - 1) / 2)
      colour = COLOURS[m % len(COLOURS)]
      ax.scatter(np.repeat(x, heads), values.reshape(-1), s=14, color=colour, alpha=0.8,
                 label=model["label"])
      ax.plot(x, values.mean(1), color=colour, alpha=0.4, linewidth=1)
    ax.set_title(title)
    ax.set_xlabel("layer")
    ax.set_ylabel(ylabel)
    ax.set_xticks(np.arange(1, np.asarray(models[0][key]).shape[0] + 1))
    ax.grid(alpha=0.3)
  axes[0].legend(fontsize=8)
  fig.savefig(path)
  return path


def plot_cka(matrices: Sequence[tuple[str, np.ndarray, str, str]], path: str) -> str:
  """Heatmaps of CKA matrices, each (title, [La, Lb], y-axis label, x-axis label); layers
  numbered from 1, colour scale fixed to [0, 1], values written in the cells up to 12 layers."""
  fig = _figure(4.6 * len(matrices), 4.2)
  axes = np.atleast_1d(fig.subplots(1, len(matrices)))
  image = None
  for ax, (title, mat, ylabel, xlabel) in zip(axes, matrices):
    mat = np.asarray(mat, np.float64)
    image = ax.imshow(mat, vmin=0.0, vmax=1.0, cmap="magma", origin="lower",
                      extent=(0.5, mat.shape[1] + 0.5, 0.5, mat.shape[0] + 0.5), aspect="auto")
    if max(mat.shape) <= 12:  # small matrices: the numbers too (0.97 and 1.0 look alike)
      for (i, j), v in np.ndenumerate(mat):
        ax.text(j + 1, i + 1, f"{v:.2f}", ha="center", va="center", fontsize=7,
                color="black" if v > 0.6 else "white")
    ax.set_title(title, fontsize=10)
    ax.set_xlabel(xlabel)
    ax.set_ylabel(ylabel)
    ax.set_xticks(np.arange(1, mat.shape[1] + 1))
    ax.set_yticks(np.arange(1, mat.shape[0] + 1))
  fig.colorbar(image, ax=list(axes), shrink=0.85, label="linear CKA")
  fig.savefig(path)
  return path
