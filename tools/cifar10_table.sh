#!/usr/bin/env bash
# The CIFAR-10 runs behind the README table (pretrained and random-init for both methods).
set -x
D=${CIFAR_DIR:-../shared/data/cifar10/train}
OUT=${OUT_DIR:-runs}
for m in "$@"; do
  python -m mim_jax.main --config=configs/$m.py:cifar10 --workdir=$OUT/${m}_cifar10 --config.input.data.dir=$D
  python -m mim_jax.main --config=configs/$m.py:cifar10 --workdir=$OUT/${m}_cifar10_random --config.input.data.dir=$D --config.total_epochs=0
done
