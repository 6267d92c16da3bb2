"""Prints the README's CIFAR-10 table from the workdirs written by tools/cifar10_table.sh.

  python tools/results_table.py runs
"""
import json
import os
import sys


def load(path):
  with open(os.path.join(path, "eval_results.json")) as f:
    return json.load(f)


def main(out):
  rows, protocol = [], None
  for method in ("mae", "simmim"):
    for tag, suffix in (("pretrained", ""), ("random init", "_random")):
      d = os.path.join(out, f"{method}_cifar10{suffix}")
      if not os.path.exists(os.path.join(d, "eval_results.json")):
        continue
      r = load(d)
      cfg = json.load(open(os.path.join(d, "config.json")))
      epochs = cfg["total_epochs"]
      rows.append(f"| {method} | {tag} | {epochs:g} | {r['knn']['online/top1']:.1f} | "
                  f"{r['linear']['online/top1']:.1f} |")
      protocol = protocol or (r["knn"]["protocol"], r["linear"]["protocol"])
  print("| method | encoder | pretraining epochs | kNN top-1 (%) | linear probe top-1 (%) |")
  print("| --- | --- | --- | --- | --- |")
  print("\n".join(rows))
  if protocol:
    print()
    print("kNN protocol:", json.dumps(protocol[0], sort_keys=True))
    print("linear-probe protocol:", json.dumps(protocol[1], sort_keys=True))


if __name__ == "__main__":
  main(sys.argv[1] if len(sys.argv) > 1 else "runs")
