#!/usr/bin/env bash
# The CIFAR-10 runs behind the README table: for each method given (mae, simmim), pretrain with
# the cifar10 preset, then evaluate the same encoder at its random initialisation (0 epochs).
#   bash tools/cifar10_table.sh mae simmim      (CIFAR_DIR, OUT_DIR override the paths)
set -eux
D=${CIFAR_DIR:-../shared/data/cifar10/train}
OUT=${OUT_DIR:-runs}
for m in "$@"; do
  python -m mim_jax.main --config=configs/$m.py:cifar10 --workdir=$OUT/${m}_cifar10 \
    --config.input.data.dir=$D
  python -m mim_jax.main --config=configs/$m.py:cifar10 --workdir=$OUT/${m}_cifar10_random \
    --config.input.data.dir=$D --config.total_epochs=0
done
python tools/results_table.py $OUT
