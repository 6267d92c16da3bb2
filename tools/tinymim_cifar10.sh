#!/usr/bin/env bash
# TinyMIM's motivating comparison at CIFAR-10 scale (configs/tinymim.py explains it): a ViT-T
# distilled from a larger MAE teacher against the same ViT-T pretrained by MAE directly, on the
# same 500-per-class hold-out and probes; then the table ($OUT/table_tinymim.md).
#   bash tools/tinymim_cifar10.sh          (CIFAR_DIR, OUT_DIR override the paths;
#                                           FINETUNE=1 also fine-tunes both ViT-Ts)
# A run that is already complete is only evaluated again; an interrupted one resumes.
set -eux
D=${CIFAR_DIR:-../shared/data/cifar10/train}
OUT=${OUT_DIR:-runs}
# 1. the teacher: MAE with ViT-S width (384, 6 heads), same depth, patch and schedule as the ViT-T
python -m mim_jax.main --config=configs/mae.py:cifar10 --workdir=$OUT/mae_cifar10_small \
  --config.model.variant=small --config.input.data.dir=$D
# 2. the baseline: the ViT-T by MAE (configs/mae.py:cifar10 as it is)
python -m mim_jax.main --config=configs/mae.py:cifar10 --workdir=$OUT/mae_cifar10 \
  --config.input.data.dir=$D
# 3. the same ViT-T by TinyMIM from 1 (relations of its last block)
python -m mim_jax.main --config=configs/tinymim.py:cifar10 --workdir=$OUT/tinymim_cifar10 \
  --config.tinymim.teacher=$OUT/mae_cifar10_small --config.input.data.dir=$D
RUNS=("$OUT/mae_cifar10_small" "$OUT/mae_cifar10" "$OUT/tinymim_cifar10")
NAMES="teacher: MAE ViT-S,MAE ViT-T,TinyMIM ViT-T (from the MAE ViT-S)"
METRICS=knn/top1,linear/top1
if [ "${FINETUNE:-0}" = 1 ]; then
  for r in mae_cifar10 tinymim_cifar10; do
    python -m mim_jax.main --config=configs/finetune.py:cifar10 --workdir=$OUT/ft_$r \
      --config.finetune.pretrained=$OUT/$r --config.input.data.dir=$D
  done
  RUNS+=("$OUT/ft_mae_cifar10" "$OUT/ft_tinymim_cifar10")
  NAMES="$NAMES,fine-tuned MAE ViT-T,fine-tuned TinyMIM ViT-T"
  METRICS=$METRICS,classifier/top1
fi
python -m mim_jax.report "${RUNS[@]}" --names "$NAMES" --metrics $METRICS \
  --out "$OUT/table_tinymim.md"
