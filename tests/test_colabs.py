"""The notebooks in colabs/ run end to end and are saved clean.

Each notebook is executed with nbclient in a fresh kernel of this interpreter (one CPU device,
as in Colab), its "parameters" cell rewritten with tiny values (a 2-block ViT-mu, a few dozen
steps), and must finish without an error; the test then checks numbers the notebook wrote
into a temporary folder against counts computed by hand from the configs. A second set of
checks reads the saved files only: no outputs, no execution counts, one tagged parameters
cell, a Colab install cell and a badge in colabs/README.md.
"""
import json
import math
import pathlib
import re
import sys

import nbformat
import numpy as np
import pytest
from nbclient import NotebookClient

from helpers import load_config, subprocess_env

COLABS = pathlib.Path(__file__).resolve().parents[1] / "colabs"
NOTEBOOKS = ("quickstart", "masking", "explore_checkpoint")
KERNEL = "mim_jax_colabs"

# The model every training notebook gets here: the tests' 2-block, 64-wide ViT with a one-block
# decoder (tests/helpers.py tiny_config), batch 32.
TINY = {"model.variant": "mu", "model.depth": 2, "mae.decoder.width": 32, "mae.decoder.depth": 1,
        "mae.decoder.heads": 2, "input.batch_size": 32}
STEPS = 30


@pytest.fixture(scope="module")
def kernel_dir(tmp_path_factory):
  """A kernel spec running this interpreter (not whatever `python` is on PATH) on one CPU
  device (conftest.py's fake 8 devices become 1, its other XLA flags stay), so the notebooks
  see what a Colab CPU runtime has. The kernels share a compilation cache, so a step one notebook compiled is
  not compiled again by the next."""
  root = tmp_path_factory.mktemp("jupyter")
  spec_dir = root / "kernels" / KERNEL
  spec_dir.mkdir(parents=True)
  spec = {
      "argv": [sys.executable, "-m", "ipykernel_launcher", "-f", "{connection_file}"],
      "display_name": "mim_jax tests", "language": "python",
      "env": {"XLA_FLAGS": subprocess_env(devices=1)["XLA_FLAGS"], "JAX_PLATFORMS": "cpu",
              "JAX_COMPILATION_CACHE_DIR": str(root / "jax_cache"),
              "JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS": "0",
              "MPLBACKEND": "module://matplotlib_inline.backend_inline"},
  }
  (spec_dir / "kernel.json").write_text(json.dumps(spec))
  return root


def set_parameters(nb, values: dict) -> None:
  """Rewrites `NAME = ...` lines of the cell tagged "parameters"; every name must be there."""
  cell = next(c for c in nb.cells if "parameters" in c.metadata.get("tags", []))
  source = cell.source
  for name, value in values.items():
    source, count = re.subn(rf"^{name} = .*$", f"{name} = {value!r}", source, flags=re.M)
    assert count == 1, f"parameter {name} not found once in the parameters cell:\n{cell.source}"
  cell.source = source


def execute(name: str, kernel_dir, monkeypatch, **params):
  """Runs colabs/<name>.ipynb in colabs/ with `params`; a failing cell raises
  CellExecutionError with its traceback. Returns the executed notebook."""
  monkeypatch.setenv("JUPYTER_PATH", str(kernel_dir))
  nb = nbformat.read(COLABS / f"{name}.ipynb", as_version=4)
  set_parameters(nb, params)
  NotebookClient(nb, timeout=300, kernel_name=KERNEL,
                 resources={"metadata": {"path": str(COLABS)}}).execute()
  return nb


def images_shown(nb, cell_id: str) -> int:
  """PNG outputs of the cell `cell_id` of an executed notebook."""
  cell = next(c for c in nb.cells if c.get("id") == cell_id)
  return sum("image/png" in o.get("data", {}) for o in cell.outputs)


# ---------------------------------------------------------------------------------------------
# The notebooks, executed.

def test_quickstart(kernel_dir, monkeypatch, tmp_path):
  workdir = tmp_path / "quickstart"
  nb = execute("quickstart", kernel_dir, monkeypatch, STEPS=STEPS, WORKDIR=str(workdir),
               OVERRIDES=TINY, NUM_IMAGES=3, KNN_MAX_TRAIN=1000)
  out = json.loads((workdir / "quickstart.json").read_text())
  assert out["steps"] == STEPS and len(out["losses"]) == STEPS
  losses = np.asarray(out["losses"])
  assert np.all(np.isfinite(losses))
  assert losses[-5:].mean() < losses[:5].mean() - 0.05, losses      # it learned something
  shapes = out["reconstruction_shapes"]
  assert shapes == {k: [3, 32, 32, 3] for k in ("input", "masked", "reconstruction")}, shapes
  # MAE keeps int(64 * 0.25) = 16 of the 8 x 8 patches of every image: 48 / 64 masked.
  assert out["masked_fraction"] == [0.75] * 3
  assert out["visible_pasted"] is True
  knn = out["knn"]
  for name in ("online", "ema"):
    assert 0.0 <= knn[f"{name}/top1"] <= knn[f"{name}/top5"] <= 100.0
  assert knn["online/top1"] > 10.0                                     # above chance (10 classes)
  assert knn["protocol"]["bank_size"] == 1000 and knn["protocol"]["num_queries"] == 1000
  assert images_shown(nb, "loss-plot") == 1 and images_shown(nb, "reconstruct") == 1
  assert (workdir / "loss.png").stat().st_size > 0
  assert (workdir / "reconstructions.png").stat().st_size > 0


def test_masking(kernel_dir, monkeypatch, tmp_path):
  nb = execute("masking", kernel_dir, monkeypatch, OUT=str(tmp_path))
  masks = json.loads((tmp_path / "masks.json").read_text())
  assert all(m["patches"] == 64 and m["ratio"] == m["masked"] / 64 for m in masks.values())
  # Exact counts, by hand from the configs (32 px images, 4 px patches: 8 x 8 = 64 patches).
  assert load_config("mae").mae.mask_ratio == 0.75
  assert masks["mae_random"]["masked"] == 64 - int(64 * 0.25) == 48
  assert masks["milan_attentive"]["masked"] == 48
  s = load_config("simmim").simmim
  assert (s.mask_patch_size, s.mask_ratio) == (8, 0.6)
  assert masks["simmim"]["masked"] == math.ceil(16 * 0.6) * 4 == 40     # 10 of 4 x 4 8-px cells
  assert masks["cae_block_exact"]["masked"] == load_config("cae").cae.num_mask_patches == 32
  lm = load_config("latent_mim").latent_mim
  assert masks["latent_mim_gap_grid"]["masked"] == round(64 * lm.mask_ratio) == 58
  ex = load_config("extrema").extrema
  kept = int(64 * (1 - ex.mask_ratio))                                  # 12 visible per copy
  assert masks["extrema_disjoint"]["masked"] == 64 - kept
  assert masks["extrema_disjoint"]["visible_union"] == ex.num_masks * kept == 60
  # BEiT's generator stops at its budget or when a round adds nothing: never above the budget.
  assert load_config("maskfeat").maskfeat.mask_ratio == 0.4
  budgets = {"beit_block": load_config("beit").beit.num_mask_patches,
             "data2vec_block": load_config("data2vec").data2vec.num_mask_patches,
             "maskfeat_block": 26}                                      # round(64 * 0.4)
  assert budgets["beit_block"] == 24 and budgets["data2vec_block"] == 38
  for name, budget in budgets.items():
    assert masks[name]["budget"] == budget and 0 < masks[name]["masked"] <= budget, name
  assert 0 < masks["ibot_block"]["masked"] <= 0.5 * 64                  # ratio 0 or U(0.1, 0.5)
  assert images_shown(nb, "draw") == 1 and (tmp_path / "masks.png").stat().st_size > 0


def test_explore_checkpoint(kernel_dir, monkeypatch, tmp_path):
  workdir = tmp_path / "run"
  overrides = dict(TINY, **{"evals.knn.max_train": 500, "evals.knn.max_eval": 200,
                            "evals.reconstruction.num_images": 2})
  nb = execute("explore_checkpoint", kernel_dir, monkeypatch, WORKDIR=str(workdir),
               TRAIN_STEPS=STEPS, OVERRIDES=overrides, NUM_IMAGES=64, IMAGE_INDEX=5,
               NUM_NEIGHBOURS=4)
  # The notebook trained the run itself (the folder had no checkpoint), then loaded it.
  assert (workdir / "checkpoints" / str(STEPS)).is_dir()
  assert "knn" in json.loads((workdir / "eval_results.json").read_text())
  out = json.loads((workdir / "analysis" / "explore_checkpoint.json").read_text())
  assert out["step"] == STEPS
  cls_maps = np.asarray(out["cls_attention"])                          # [depth, heads, 8, 8]
  assert cls_maps.shape == (2, 2, 8, 8)
  assert np.all(cls_maps >= 0) and np.all(cls_maps.sum((-1, -2)) <= 1 + 1e-5)
  distance = np.asarray(out["attention_distance"])                     # [depth, heads], pixels
  assert distance.shape == (2, 2)
  assert np.all(distance > 0) and np.all(distance < 4 * 7 * math.sqrt(2))
  ratios = np.asarray(out["pca_explained"])
  assert ratios.shape == (3,) and np.all(np.diff(ratios) <= 0) and 0 < ratios.sum() <= 1 + 1e-6
  assert out["pca_shape"] == [8, 8, 3]
  nn = out["neighbours"]
  assert len(nn["index"]) == 4 and 5 not in nn["index"] and nn["query"] == 5
  sims = np.asarray(nn["similarity"])
  assert np.all(np.diff(sims) <= 0) and np.all(sims <= 1 + 1e-5)
  for cell in ("attention-maps", "attention-distance", "pca", "neighbours"):
    assert images_shown(nb, cell) == 1, cell


# ---------------------------------------------------------------------------------------------
# The saved files.

@pytest.mark.parametrize("name", NOTEBOOKS)
def test_saved_notebook_is_clean(name):
  nb = nbformat.read(COLABS / f"{name}.ipynb", as_version=4)
  nbformat.validate(nb)
  for cell in nb.cells:
    if cell.cell_type == "code":
      assert cell.outputs == [] and cell.execution_count is None, \
          f"{name}.ipynb cell {cell.id} has outputs: clear them before committing"
  tagged = [c for c in nb.cells if "parameters" in c.metadata.get("tags", [])]
  assert len(tagged) == 1 and tagged[0].cell_type == "code", f"{name}: tag one cell 'parameters'"
  assert re.search(r"^[A-Z_]+ = ", tagged[0].source, flags=re.M)
  install = next(c for c in nb.cells if c.cell_type == "code")
  assert "google.colab" in install.source and "pip" in install.source
  # The same badge (whatever account the repository is published under) opens the notebook,
  # in the notebook, colabs/README.md and the top-level README.
  found = re.search(rf"https://colab\.research\.google\.com/github/[^/\s]+/mim_jax/blob/main/colabs/"
                    rf"{name}\.ipynb", nb.cells[0].source)
  assert found, f"{name}.ipynb: no Open-in-Colab badge in its first cell"
  assert found.group(0) in (COLABS / "README.md").read_text()
  assert found.group(0) in (COLABS.parent / "README.md").read_text()


def test_every_notebook_is_tested():
  assert sorted(p.stem for p in COLABS.glob("*.ipynb")) == sorted(NOTEBOOKS)
