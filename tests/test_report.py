"""Tests of mim_jax.report: the Markdown results table from run folders."""
from __future__ import annotations

import json
import os

import pytest

from mim_jax import report

KNN_PROTOCOL = {"type": "knn", "k": 20, "temperature": 0.07, "bank_size": 20000,
                "bank_split": "train", "num_queries": 5000, "query_split": "eval",
                "pooling": "mean", "weighting": "exp(cos_sim / T), summed per class"}
LINEAR_PROTOCOL = {"type": "linear_probe", "optimizer": "sgd", "lr": 0.1, "base_lr": 0.1,
                   "epochs": 30, "warmup_epochs": 3, "batch_size": 256, "weight_decay": 0.0,
                   "pooling": "mean", "num_train": 20000, "num_eval": 5000}
HELDOUT_PROTOCOL = {"type": "heldout_loss", "seeds": [0, 1], "num_heldout": 1000,
                    "num_train": 1000, "heldout_split": "eval", "train_split": "pretrain"}


def _config(method, depth, base_lr, divisor, **data):
  return {"method": method, "total_epochs": 6.0, "total_steps": 0,
          "input": {"batch_size": 256, "image_size": 32,
                    "data": {"name": "image_folder", "dir": "/data/c10", "holdout_per_class": 500,
                             "holdout_seed": 0, **data}},
          "model": {"variant": "tiny", "depth": depth, "patch_size": 4},
          "optim": {"name": "adamw", "base_lr": base_lr, "lr_batch_divisor": divisor}}


def _write_run(root, name, config, results, steps_per_epoch=None):
  workdir = os.path.join(root, name)
  os.makedirs(workdir)
  with open(os.path.join(workdir, "config.json"), "w") as f:
    json.dump(config, f)
  with open(os.path.join(workdir, "eval_results.json"), "w") as f:
    json.dump(results, f)
  if steps_per_epoch:
    with open(os.path.join(workdir, "metrics.jsonl"), "w") as f:
      f.write(json.dumps({"step": 0, "steps_per_epoch": steps_per_epoch}) + "\n")
      f.write(json.dumps({"step": 20, "loss": 1.5}) + "\n")
  return workdir


@pytest.fixture()
def two_runs(tmp_path):
  """An MAE run (online + EMA, kNN, probe, held-out loss, 10% subset) and a SimMIM run at its
  initialisation (online only, a kNN with a smaller bank, no probe)."""
  mae = _write_run(tmp_path, "mae_run", _config("mae", 6, 1.5e-3, 256, train_subset=0.1,
                                                subset_seed=0), {
      "knn": {"online/top1": 41.94, "online/top5": 88.28, "ema/top1": 40.06, "ema/top5": 87.0,
              "protocol": KNN_PROTOCOL, "step": 1050},
      "linear": {"online/top1": 54.1, "online/top5": 94.3, "online/train_top1": 57.11,
                 "online/train_loss": 1.2179, "ema/top1": 53.26, "protocol": LINEAR_PROTOCOL,
                 "step": 1050},
      "heldout_loss": {"heldout_loss": 0.41234, "train_loss": 0.40012, "gap": 0.01222,
                       "per_seed": {"heldout_loss": [0.4, 0.42]}, "protocol": HELDOUT_PROTOCOL,
                       "step": 1050},
      "reconstruction": {"path": "x.png", "protocol": {"type": "reconstruction"}, "step": 1050},
  }, steps_per_epoch=175)
  simmim = _write_run(tmp_path, "simmim_run", _config("simmim", 0, 2e-3, 512), {
      "knn": {"online/top1": 25.52, "online/top5": 75.0,
              "protocol": dict(KNN_PROTOCOL, bank_size=4000), "step": 0},
  })
  return mae, simmim


EXPECTED = """\
| run | method | model | pretraining | encoder | kNN top-1 (%) | linear probe top-1 (%) [5] | held-out loss [6] |
| --- | --- | --- | --- | --- | --- | --- | --- |
| MAE 10% | MAE | ViT-tiny, 6 blocks, patch 4, 32 px | 1050 steps (6 epochs), 10% of the training images [1] | online | 41.9 [3] | 54.1 | 0.4123 |
| MAE 10% | MAE | ViT-tiny, 6 blocks, patch 4, 32 px | 1050 steps (6 epochs), 10% of the training images [1] | ema | 40.1 [3] | 53.3 | - |
| SimMIM init | SimMIM | ViT-tiny, 12 blocks, patch 4, 32 px | 0 steps (random init) [2] | online | 25.5 [4] | - | - |

[1] pretraining: image folder /data/c10, 500 images per class held out (seed 0), pretrained on a nested subset: 10% of the rest (seed 0), batch 256, adamw peak lr 0.0015
[2] pretraining: image folder /data/c10, 500 images per class held out (seed 0), batch 256, adamw peak lr 0.001
[3] kNN: k=20, T=0.07, cosine, bank=20000 train images, pooling=mean, split=eval (5000 held-out)
[4] kNN: k=20, T=0.07, cosine, bank=4000 train images, pooling=mean, split=eval (5000 held-out)
[5] linear probe: sgd, lr 0.1 (base 0.1), 30 epochs (3 warm-up), batch 256, wd 0, BatchNorm on frozen features, pooling=mean, fit on 20000 train images, split=eval (5000 held-out)
[6] held-out loss: the method's loss per image, no augmentation, mask seeds 0/1; 1000 held-out images vs 1000 of the images pretraining used
"""


def test_table_from_two_workdirs_matches_expected_markdown(two_runs):
  # Default columns: the held-out top-1s and the held-out loss; the kNN protocols differ
  # between the runs (bank 20000 vs 4000), so kNN cells carry their note, other columns have
  # one protocol and carry it in the header; the held-out loss (no encoder) is in the online row.
  got = report.report(list(two_runs), names=["MAE 10%", "SimMIM init"])
  assert got == EXPECTED


def test_cli_metrics_option_order_and_out_file(two_runs, tmp_path, capsys):
  out = tmp_path / "table.md"
  code = report.main([*two_runs, "--metrics", "heldout_loss/gap,knn/top5", "--out", str(out)])
  printed = capsys.readouterr().out
  assert code == 0 and out.read_text() == printed
  lines = printed.splitlines()
  assert lines[0] == ("| run | method | model | pretraining | encoder | "
                      "loss gap (held-out - train) [3] | kNN top-5 (%) |")
  # Rows named after the folders; gap has four decimals, top-5 one.
  assert lines[2].startswith("| mae_run | MAE |") and lines[2].endswith("| 0.0122 | 88.3 [4] |")
  assert lines[3].endswith("| ema | - | 87.0 [4] |")
  assert lines[4].endswith("| online | - | 75.0 [5] |")
  # Notes are numbered in order of use (data, then column by column); identical protocols
  # appear once: one kNN note per bank size.
  assert sum("bank=20000" in line for line in lines) == 1


def test_all_metrics_lists_every_number_in_a_stable_order(two_runs):
  runs = report.load_runs(list(two_runs))
  assert report.all_metrics(runs) == [
      "knn/top1", "knn/top5", "linear/top1", "linear/top5", "linear/train_loss",
      "linear/train_top1", "heldout_loss/gap", "heldout_loss/heldout_loss",
      "heldout_loss/train_loss"]
  assert report.all_metrics(runs[::-1]) == report.all_metrics(runs)


def test_errors_are_one_line_and_name_the_fix(two_runs, tmp_path, capsys):
  with pytest.raises(report.ReportError, match="choose from knn/top1"):
    report.report(list(two_runs), metrics=["knn/top3"])
  with pytest.raises(report.ReportError, match="one name per workdir"):
    report.report(list(two_runs), names=["only one"])
  empty = tmp_path / "empty"
  empty.mkdir()
  assert report.main([str(empty)]) == 2
  err = capsys.readouterr().err
  assert err.count("\n") == 1 and "--mode=eval" in err


def test_fine_tuning_runs_are_labelled_as_such():
  ft = _config("finetune", 6, 1e-3, 256)
  assert report.data_note(ft).startswith("fine-tuning: image folder /data/c10")
  assert report.data_note(_config("mae", 6, 1e-3, 256)).startswith("pretraining: ")


def test_pretraining_label_counts_epochs_in_the_singular_for_one():
  def run(step):
    return report.Run("r", "/x", {"knn": {"top1": 1.0, "step": step}}, {}, 175)
  assert report.pretraining_label(run(175)) == "175 steps (1 epoch)"
  assert report.pretraining_label(run(350)) == "350 steps (2 epochs)"
  assert report.pretraining_label(run(0)) == "0 steps (random init)"


def test_method_column_names_the_paper_where_configs_share_a_method_file():
  from mim_jax import config_lib
  labels = {m: report.method_label(config_lib.load(m, "cifar10").to_dict())
            for m in ("milan", "mvp", "eva", "vqkd", "peco", "beitv2", "beit", "mae")}
  assert labels == {"milan": "MILAN", "mvp": "MVP", "eva": "EVA", "vqkd": "VQ-KD",
                    "peco": "PeCo tokenizer", "beitv2": "BEiT v2", "beit": "BEiT", "mae": "MAE"}
  # A run written before configs had a name (no 'name' key) keeps the method's label.
  assert report.method_label(_config("feature_mim", 6, 1e-3, 256)) == "teacher-feature MIM"


def _evaluator_protocols(tmp_path):
  """The protocols the few-shot and classifier evaluators write, run on fake features (three
  seeds: three chosen penalties per shot count)."""
  import numpy as np
  from mim_jax import evaluators
  from tests.test_eval_protocols import FakeEncoder, _clusters
  rng = np.random.default_rng(0)
  y = rng.integers(0, 4, 600)
  feats = _clusters(rng, y, 4, 6, spread=2.0)[:, None, :]
  logits = np.eye(4)[y][:, None, :] + rng.normal(size=(600, 1, 4))
  data = FakeEncoder(y[:400], y[400:], layers={"online": feats, "logits": logits})
  ctx = data.ctx(4, tmp_path, step=121)
  few = evaluators.build("few_shot", {"type": "few_shot", "seeds": 3, "max_train": 300}).run(ctx)
  cls = evaluators.build("classifier", {"type": "classifier"}).run(ctx)
  return few["protocol"], cls["protocol"]


def test_notes_state_the_protocol_in_a_line_or_two_and_leave_diagnostics_in_the_file(tmp_path):
  few, cls = _evaluator_protocols(tmp_path)
  assert len(few["chosen_l2"]["online"]["10shot"]) == 3   # the diagnostics the file keeps
  note = report.describe_protocol("few_shot", few)
  assert note == (f"few-shot: ridge regression on frozen features (pooling={few['pooling']}), "
                  "1/5/10/25 shots x 3 seeds from 300 train images, penalty chosen per seed on a "
                  "held-out train minival (5 per class); mean and std over seeds, split=eval "
                  "(200 held-out)")
  assert report.describe_protocol("classifier", cls) == (
      f"classifier: arg-max of the fine-tuned linear head (pooling={cls['pooling']}) at step "
      "121, eval preprocessing, no augmentation, split=eval (200 held-out)")
  # Two runs whose seeds chose different penalties share one note (in the column header).
  runs = []
  for name, chosen in (("a", [1.0, 2.0, 4.0]), ("b", [1024.0, 0.5, 0.25])):
    protocol = dict(few, chosen_l2={"online": {"10shot": chosen}})
    runs.append(_write_run(tmp_path, name, _config("mae", 6, 1.5e-3, 256), {
        "few_shot": {"online/top1_10shot": 28.1, "protocol": protocol, "step": 1050}}))
  table = report.report(runs, metrics=["few_shot/top1_10shot"])
  assert "few_shot top1_10shot (%) [2]" in table.splitlines()[0]
  notes = [line for line in table.splitlines() if line.startswith("[")]
  assert len(notes) == 2 and notes[1] == "[2] " + note
  assert "chosen_l2" not in table and "1024" not in table
  assert max(len(line) for line in notes) <= 250


def test_a_protocol_without_a_hand_written_note_lists_its_short_fields():
  protocol = {"type": "new_probe", "k": 5, "splits": [1, 2], "per_seed": {"a": [1.0, 2.0]},
              "recipe": "a free-text description far longer than forty characters, kept in "
                        "the results file"}
  assert report.describe_protocol("np", protocol) == (
      "new_probe: k=5, splits=1/2 (+ 2 more fields in eval_results.json)")
  assert report.describe_protocol("np", {"type": "new_probe", "k": 5}) == "new_probe: k=5"
  assert report.describe_protocol("np", None) == "np: protocol not recorded"
  # A known type whose layout changed falls back to the fields instead of failing.
  assert (report.describe_protocol("few_shot", {"type": "few_shot", "seeds": 2})
          == "few_shot: seeds=2")


def test_a_teacher_is_a_row_named_as_such():
  """Methods with a momentum teacher (iBOT, ExtreMA, PCAE, data2vec) report it in its own row."""
  from mim_jax import report
  metrics = report.run_metrics({"knn": {"online/top1": 30.0, "teacher/top1": 33.0,
                                        "protocol": {}}})
  assert metrics == {("online", "knn/top1"): 30.0, ("teacher", "knn/top1"): 33.0}
  assert report._encoders(metrics) == ["online", "teacher"]


def test_the_model_column_names_convnets_and_gpt_from_their_config():
  assert report.model_label({"model": {"name": "nin", "num_stages": 4, "width": 0.25},
                             "input": {"image_size": 32}}) == "NIN, 4 blocks, width 0.25, 32 px"
  assert report.model_label({"model": {"name": "alexnet", "widths": "caffe", "width": 1.0}}) == \
      "AlexNet (BN, caffe widths), width 1"
  assert report.model_label({"model": {"name": "resnet", "depth": 18, "width": 0.25}}) == \
      "ResNet-18, width 0.25"
  assert report.model_label({"model": {"name": "gpt", "depth": 4, "width": 128}}) == \
      "GPT, 4 layers, width 128"
  assert report.model_label({"model": {"variant": "tiny", "depth": 4, "patch_size": 4}}) == \
      "ViT-tiny, 4 blocks, patch 4"
