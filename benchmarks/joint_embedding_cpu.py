r"""How long each joint-embedding (or pretext-task) method's CPU preset takes: the jitted
training step of its `cifar10` preset (model, batch, views and heads as configured) timed on
this machine, and the preset's whole run (steps x step time) estimated from it.

  python benchmarks/joint_embedding_cpu.py [--methods simclr,moco,...] [--preset cifar10] \
      [--steps 4] [--warmup 2]
  python benchmarks/joint_embedding_cpu.py --methods pretext      (the classic pretext tasks)

The batches come from the embedded CIFAR-10 subset (the step's cost does not depend on the
images); the run length is the preset's over the 45,000-image training split of the CIFAR-10
folder. Prints a Markdown table: method, model, batch, steps, seconds per step, estimated
training time (evaluation not included).
"""
from __future__ import annotations

import argparse
import sys
import time

METHODS = ("instdisc", "moco", "mocov3", "simclr", "byol", "simsiam", "barlow_twins", "vicreg",
           "dino")
# The classic pretext tasks' configs (`--methods pretext`).
PRETEXT = ("rotation", "feature_decoupling", "jigsaw", "context_prediction", "colorization",
           "split_brain", "context_encoder", "limited_context", "igpt")
TRAIN_IMAGES = 45_000   # the CIFAR-10 folder minus 500 held-out images per class


def time_step(method: str, preset: str, steps: int, warmup: int) -> dict:
  import jax
  from mim_jax import config_lib, models, optim, train
  c = config_lib.load(method, preset)
  spe = max(1, TRAIN_IMAGES // c.input.batch_size)
  total = optim.total_steps(c, spe)
  c.input.data.update(name="embedded", dir="", holdout_per_class=100)
  for name in c.evals:
    c.evals[name].enabled = False
  tr = train.Trainer.create(c, devices=jax.devices()[:1])
  batches = [tr.next_batch() for _ in range(warmup + steps)]
  for b in batches[:warmup]:
    tr.state, m = tr.step_fn(tr.state, b)
  jax.block_until_ready(m["loss"])
  t0 = time.perf_counter()
  for b in batches[warmup:]:
    tr.state, m = tr.step_fn(tr.state, b)
  jax.block_until_ready(m["loss"])
  sec = (time.perf_counter() - t0) / steps
  return {"method": method, "model": models.summary(c.model, c.input.image_size),
          "batch": c.input.batch_size, "steps": total, "sec": sec, "hours": sec * total / 3600}


def main(argv) -> int:
  p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
  p.add_argument("--methods", default=",".join(METHODS))
  p.add_argument("--preset", default="cifar10")
  p.add_argument("--steps", type=int, default=4)
  p.add_argument("--warmup", type=int, default=2)
  a = p.parse_args(argv)
  print("| method | model | batch | steps | s / step | est. training (h) |")
  print("| --- | --- | --- | --- | --- | --- |")
  names = PRETEXT if a.methods == "pretext" else a.methods.split(",")
  for m in names:
    r = time_step(m, a.preset, a.steps, a.warmup)
    print(f"| {r['method']} | {r['model']} | {r['batch']} | {r['steps']} | {r['sec']:.2f} | "
          f"{r['hours']:.2f} |", flush=True)
  return 0


if __name__ == "__main__":
  sys.exit(main(sys.argv[1:]))
