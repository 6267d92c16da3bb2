r"""PCAE's compute against MAE at the same encoder, decoder and mask settings.

  python benchmarks/pcae_compute.py                              # default preset, CPU minutes
  python benchmarks/pcae_compute.py --preset imagenet --steps 20 # ViT-B/16, on an accelerator
  python benchmarks/pcae_compute.py --preset imagenet --embedded_data --batch 8 --steps 3
                                                                 # the same without ImageNet

Prints two tables:
  * analytic model FLOPs per training image (matmuls only, 2 per multiply-add, as
    benchmarks/speed.py counts them): MAE = 3 x its forward (encoder on the visible patches,
    decoder on all L + 1 tokens); PCAE = 3 x (student encoder on the visible patches + decoder
    on the visible and the kept teacher tokens) + 1 x the teacher's forward (no backward: it
    runs without gradient on the masked patches, fewer after each drop). The patch embedding
    counts once per forward over all L patches (both official codes embed every patch, then
    gather);
  * the measured step time of both on this machine: the trainer's own jitted step
    (`train.Trainer`: augmentation, loss, gradients, AdamW, the teacher's EMA for PCAE) on the
    preset's data, after a compile step and one warm-up step, mean over `--steps` steps.

The MAE config is configs/mae.py at the same preset with the model, input, mask ratio and
decoder (width, depth, heads) copied from the PCAE config, so the two differ only in the
method. The paper's claim is about GPU days for equal accuracy (fewer epochs as well as cheaper
steps); this measures the per-step part.
"""
from __future__ import annotations

import argparse
import pathlib
import sys
import time

ROOT = pathlib.Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "benchmarks"))

from speed import vit_forward_flops  # noqa: E402


def mae_forward_flops(num_patches: int, patch: int, width: int, depth: int, mask_ratio: float,
                      dec_width: int, dec_depth: int) -> float:
  """MAE's forward matmul FLOPs per image (benchmarks/speed.py's count, any size)."""
  pix = patch * patch * 3
  keep = int(num_patches * (1 - mask_ratio))
  return (2 * num_patches * pix * width                        # patch embedding, every patch
          + vit_forward_flops(keep + 1, width, depth)          # encoder: cls + visible
          + 2 * (keep + 1) * width * dec_width                 # decoder embed
          + vit_forward_flops(num_patches + 1, dec_width, dec_depth)
          + 2 * (num_patches + 1) * dec_width * pix)           # prediction on every token


def pcae_forward_flops(num_patches: int, patch: int, width: int, depth: int, mask_ratio: float,
                       schedule, dec_width: int, dec_depth: int) -> dict:
  """PCAE's forward matmul FLOPs per image: {'student', 'teacher', 'kept'}. `schedule` is
  ((block, keep ratio), ...); the teacher has no cls token, its block i runs on the tokens left
  by the drops after blocks < i."""
  from mim_jax.methods.pcae import token_counts
  pix = patch * patch * 3
  visible = int(num_patches * (1 - mask_ratio))
  masked = num_patches - visible
  counts = token_counts(masked, schedule)
  kept = counts[-1]
  embed = 2 * num_patches * pix * width
  student = (embed + vit_forward_flops(visible + 1, width, depth)
             + 2 * (visible + 1) * width * dec_width
             + vit_forward_flops(visible + 1 + kept, dec_width, dec_depth)
             + 2 * (visible + 1 + kept) * dec_width * width)   # prediction at the encoder's width
  teacher, n = embed, masked
  drops = dict((b, c) for (b, _), c in zip(schedule, counts))
  for i in range(depth):
    teacher += vit_forward_flops(n, width, 1)
    n = drops.get(i, n)
  return {"student": student, "teacher": teacher, "kept": kept}


def train_flops_pair(config) -> dict:
  """{'mae': ..., 'pcae': ..., 'kept': ...}: training FLOPs per image of both methods at the
  settings of a PCAE config."""
  from mim_jax import methods
  m = methods.get(config)
  p, d = config.pcae, config.pcae.decoder
  mae = 3.0 * mae_forward_flops(m.num_patches, m.patch, m.width, m.depth, p.mask_ratio,
                                d.width, d.depth)
  f = pcae_forward_flops(m.num_patches, m.patch, m.width, m.depth, p.mask_ratio, m.schedule,
                         d.width, d.depth)
  return {"mae": mae, "pcae": 3.0 * f["student"] + f["teacher"], "kept": f["kept"],
          "pcae_student": f["student"], "pcae_teacher": f["teacher"]}


def load_config(method: str, preset: str):
  from mim_jax import config_lib
  return config_lib.load(method, preset, str(ROOT / "configs"))


def matched_configs(preset: str, batch: int = 0, embedded: bool = False):
  """(pcae config, mae config) at the same model, input, mask ratio and decoder."""
  pc = load_config("pcae", preset)
  mc = load_config("mae", preset)
  if batch:
    pc.input.batch_size = batch
  if embedded:     # the step's cost does not depend on the pixels: time without the dataset
    pc.input.data.update(name="embedded", holdout_per_class=100)
  mc.model = pc.model
  mc.input = pc.input
  mc.ema = pc.ema
  mc.optim = pc.optim
  mc.mae.mask_ratio = pc.pcae.mask_ratio
  mc.mae.decoder = dict(width=pc.pcae.decoder.width, depth=pc.pcae.decoder.depth,
                        heads=pc.pcae.decoder.heads)
  for c in (pc, mc):
    c.evals = {}
  return pc, mc


def step_time(config, steps: int) -> float:
  """Mean seconds per trainer step after a compile step and one warm-up step."""
  import jax
  from mim_jax import train
  config.total_steps = steps + 2
  tr = train.Trainer.create(config)
  for _ in range(2):
    jax.block_until_ready(tr.step())
  t0 = time.perf_counter()
  for _ in range(steps):
    metrics = tr.step()
  jax.block_until_ready(metrics)
  return (time.perf_counter() - t0) / steps


def main(argv=None) -> None:
  ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
  ap.add_argument("--preset", default="", help="config preset of both methods ('' = embedded)")
  ap.add_argument("--steps", type=int, default=5, help="timed steps per method")
  ap.add_argument("--batch", type=int, default=0, help="override the preset's batch size")
  ap.add_argument("--no-time", action="store_true", help="FLOPs only")
  ap.add_argument("--embedded_data", action="store_true",
                  help="time on the embedded images (resized to the preset's size) instead of "
                       "the preset's dataset, e.g. ImageNet settings without ImageNet")
  args = ap.parse_args(argv)
  from mim_jax import methods
  pc, mc = matched_configs(args.preset, args.batch, args.embedded_data)
  f = train_flops_pair(pc)
  m, p = pc.model, pc.pcae
  from mim_jax.models import vit
  depth = m.depth or vit.VARIANTS[m.variant.lower()][1]
  print(f"preset {args.preset or 'default'}: ViT-{m.variant}, {depth} blocks, patch "
        f"{m.patch_size} at {pc.input.image_size} px, mask {p.mask_ratio}, decoder "
        f"{p.decoder.width}x{p.decoder.depth}, batch {pc.input.batch_size}")
  print(f"PCAE teacher keeps {f['kept']} tokens (drop schedule {methods.get(pc).schedule})")
  print()
  print(f"{'':8s} {'train GFLOPs/img':>17s} {'ratio to MAE':>13s}")
  print(f"{'MAE':8s} {f['mae'] / 1e9:17.4f} {1.0:13.3f}")
  print(f"{'PCAE':8s} {f['pcae'] / 1e9:17.4f} {f['pcae'] / f['mae']:13.3f}"
        f"   (student+decoder x3 {3 * f['pcae_student'] / 1e9:.4f}, teacher x1 "
        f"{f['pcae_teacher'] / 1e9:.4f})")
  if args.no_time:
    return
  import jax
  t_mae = step_time(mc, args.steps)
  t_pcae = step_time(pc, args.steps)
  b = pc.input.batch_size
  print()
  print(f"measured on {jax.devices()[0].device_kind} ({jax.default_backend()}), {args.steps} steps")
  print(f"{'':8s} {'step s':>9s} {'images/s':>10s} {'ratio to MAE':>13s}")
  print(f"{'MAE':8s} {t_mae:9.4f} {b / t_mae:10.1f} {1.0:13.3f}")
  print(f"{'PCAE':8s} {t_pcae:9.4f} {b / t_pcae:10.1f} {t_pcae / t_mae:13.3f}")


if __name__ == "__main__":
  main()
