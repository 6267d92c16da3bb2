#!/usr/bin/env bash
# The CIFAR-10 runs behind the tables of docs/results/: for each method given (mae, simmim), pretrain with
# the cifar10 preset, then evaluate the same encoder at its random initialisation (0 epochs),
# then write the table with its protocol notes (python -m mim_jax.report) to $OUT/table.md.
#   bash tools/cifar10_table.sh mae simmim      (CIFAR_DIR, OUT_DIR override the paths;
#                                               METRICS the table's columns)
# The pretext tasks' per-layer table (conv1..conv5 linear probes, then the global pool):
#   METRICS=knn/top1,layer_probe/top1_block0,layer_probe/top1_block1,layer_probe/top1_block2,\
#   layer_probe/top1_block3,layer_probe/top1_block4,layer_probe/top1_block5 \
#     bash tools/cifar10_table.sh rotation jigsaw
set -eux
D=${CIFAR_DIR:-../shared/data/cifar10/train}
OUT=${OUT_DIR:-runs}
WORKDIRS=()
NAMES=()
for m in "$@"; do
  python -m mim_jax.main --config=configs/$m.py:cifar10 --workdir=$OUT/${m}_cifar10 \
    --config.input.data.dir=$D
  python -m mim_jax.main --config=configs/$m.py:cifar10 --workdir=$OUT/${m}_cifar10_random \
    --config.input.data.dir=$D --config.total_epochs=0
  WORKDIRS+=("$OUT/${m}_cifar10" "$OUT/${m}_cifar10_random")
  NAMES+=("pretrained" "random init")
done
python -m mim_jax.report "${WORKDIRS[@]}" --names "$(IFS=,; echo "${NAMES[*]}")" \
  --metrics "${METRICS:-knn/top1,linear/top1}" --out "$OUT/table.md"
