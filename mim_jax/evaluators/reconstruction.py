"""Reconstruction picture for masked-image-modelling methods.

Takes the first ``num_images`` eval images, asks the method for its masked
input and reconstruction, and saves a PNG grid (clips: each cell a filmstrip of the clip's
frames, left to right): one row per image, columns
input | masked input | reconstruction, each image upscaled by an integer factor with
nearest-neighbour (so every source pixel becomes a ``scale x scale`` block),
cells separated and framed by ``separator`` pixels of ``separator_value``.

Above the grid a white header band of ``header`` pixels (in the result's protocol) holds
two lines of text: the step and the fraction of pixels the masking hid (pixels where the
masked picture differs from the input), then each column's title centred over it; a method
that is not masked image modelling names its own columns and header line
(``ctx.picture_titles``: jigsaw's shuffled tiles and predicted order, colorization's grey
input and colours).

Layout (used by the tests): with cell size ``h*scale x w*scale``, separator width ``sep``
and header height ``hd``, cell (row r, column c) has its top-left corner at
``(y, x) = (hd + sep + r*(h*scale + sep), sep + c*(w*scale + sep))``; the picture is
``hd + sep + n*(h*scale + sep)`` high and ``sep + 3*(w*scale + sep)`` wide.
"""
from __future__ import annotations

import math
import os
import shutil

import numpy as np
from PIL import Image

from mim_jax.evaluators import common

COLUMNS = ("input", "masked", "reconstruction")


def upscale_factor(size: int, min_size: int) -> int:
  """Smallest integer factor that makes ``size`` at least ``min_size`` (>= 1)."""
  return max(1, math.ceil(min_size / max(1, size)))


def make_grid(columns: list[np.ndarray], scale: int, separator: int = 2,
              separator_value: int = 255) -> np.ndarray:
  """Grid uint8 [H, W, 3] of ``columns`` (each uint8 [n, h, w, 3]), row per image."""
  n, h, w = columns[0].shape[:3]
  for c in columns:
    if c.shape[:3] != (n, h, w):
      raise ValueError(f"column shapes differ: {[c.shape for c in columns]}")
  ch, cw = h * scale, w * scale
  grid = np.full((separator + n * (ch + separator), separator + len(columns) * (cw + separator), 3),
                 separator_value, np.uint8)
  for c, images in enumerate(columns):
    images = np.asarray(images)
    if images.ndim == 3:
      images = images[..., None]
    if images.shape[-1] == 1:
      images = np.repeat(images, 3, axis=-1)
    big = np.repeat(np.repeat(images.astype(np.uint8), scale, axis=1), scale, axis=2)
    x = separator + c * (cw + separator)
    for r in range(n):
      y = separator + r * (ch + separator)
      grid[y:y + ch, x:x + cw] = big[r, ..., :3]
  return grid


def filmstrip(clips: np.ndarray) -> np.ndarray:
  """Clips [n, T, h, w, C] -> [n, h, T * w, C]: each clip's frames side by side."""
  n, t, h, w, c = clips.shape
  return np.ascontiguousarray(np.asarray(clips).transpose(0, 2, 1, 3, 4).reshape(n, h, t * w, c))


TITLES = {"input": "input", "masked": "masked input", "reconstruction": "reconstruction",
          "header": "{hidden:.0%} of the pixels masked"}
LINE = 14    # header line height, px (PIL's default bitmap font is 11 px tall)


def masked_fraction(inputs: np.ndarray, masked: np.ndarray) -> float:
  """Fraction of pixels where the masked picture differs from the input (any channel)."""
  return float(np.mean(np.any(np.asarray(inputs) != np.asarray(masked), axis=-1)))


def add_header(grid: np.ndarray, title: str, column_titles: list[str], cell_width: int,
               separator: int) -> np.ndarray:
  """`grid` below a white band: `title` on the first line, each column's title centred over
  its column on the second."""
  from PIL import ImageDraw, ImageFont
  width = grid.shape[1]
  band = Image.new("RGB", (width, 2 * LINE), (255, 255, 255))
  draw = ImageDraw.Draw(band)
  font = ImageFont.load_default()
  draw.text((separator, 1), title, fill=(0, 0, 0), font=font)
  for c, text in enumerate(column_titles):
    x0 = separator + c * (cell_width + separator)
    tw = draw.textlength(text, font=font)
    draw.text((x0 + max(0, (cell_width - tw) / 2), LINE + 1), text, fill=(0, 0, 0), font=font)
  return np.concatenate([np.asarray(band, np.uint8), grid], axis=0)


@common.register("reconstruction")
class ReconstructionEvaluator(common.Evaluator):
  """Saves ``reconstruction_<step>.png`` and ``reconstruction.png`` in the workdir.

  Options: ``num_images`` (8), ``seed`` (0, passed to ``ctx.reconstruct``),
  ``min_size`` (96: upscale factor makes each cell at least this tall/wide),
  ``scale`` (explicit factor, overrides ``min_size``), ``separator`` (2 px),
  ``separator_value`` (255, white).
  """

  def run(self, ctx: common.EvalContext) -> dict:
    if ctx.reconstruct is None:
      return {"skipped": "method has no reconstruction"}
    num_images = int(self.option("num_images", 8))
    seed = int(self.option("seed", 0))
    images, _ = common.take_images(ctx, "eval", num_images)
    out = ctx.reconstruct(images, seed)
    missing = [c for c in COLUMNS if c not in out]
    if missing:
      raise ValueError(f"reconstruct() result lacks {missing}")
    columns = [np.asarray(out[c]) for c in COLUMNS]
    for name, col in zip(COLUMNS, columns):
      if col.dtype != np.uint8:
        raise ValueError(f"reconstruct()[{name!r}] has dtype {col.dtype}; expected uint8")
    frames = columns[0].shape[1] if columns[0].ndim == 5 else 0
    if frames:       # clips: each cell is a filmstrip of the clip's frames, left to right
      columns = [filmstrip(c) for c in columns]
    h, w = columns[0].shape[1:3]
    scale = int(self.option("scale", 0)) or upscale_factor(min(h, w), int(self.option("min_size", 96)))
    separator = int(self.option("separator", 2))
    grid = make_grid(columns, scale, separator, int(self.option("separator_value", 255)))
    hidden = masked_fraction(columns[0], columns[1])
    titles = {**TITLES, **(ctx.picture_titles or {})}
    grid = add_header(grid, f"step {int(ctx.step)}: " + titles["header"].format(hidden=hidden),
                      [titles[c] for c in COLUMNS], w * scale, separator)
    os.makedirs(ctx.workdir, exist_ok=True)
    path = os.path.join(ctx.workdir, f"reconstruction_{int(ctx.step)}.png")
    Image.fromarray(grid).save(path)
    latest = os.path.join(ctx.workdir, "reconstruction.png")
    tmp = latest + ".tmp"
    shutil.copyfile(path, tmp)
    os.replace(tmp, latest)
    return {
        "path": path,
        "latest_path": latest,
        "protocol": {
            "num_images": int(len(images)),
            "seed": seed,
            "split": "eval",
            "columns": list(COLUMNS),
            "scale": scale,
            "separator": separator,
            "header": 2 * LINE,
            "masked_fraction": hidden,
            "titles": titles,
            **({"frames_per_cell": int(frames)} if frames else {}),
        },
    }
