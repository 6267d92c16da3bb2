#!/usr/bin/env bash
# The CIFAR-10 runs behind the tables of docs/results/: for each method given (mae, simmim), pretrain with
# the cifar10 preset, then evaluate the same encoder at its random initialisation (0 epochs),
# then write the table with its protocol notes (python -m mim_jax.report) to $OUT/table.md.
#   bash tools/cifar10_table.sh mae simmim      (CIFAR_DIR, OUT_DIR override the paths;
#                                               METRICS the table's columns)
# METHOD:PRESET picks another preset of the method's config (the workdir is METHOD_PRESET), and
# FINETUNE=1 also fine-tunes with configs/finetune.py:PRESET (METHOD:PRESET:FT_PRESET: that
# preset instead) from the pretrained encoder and from scratch, and adds the fine-tuned
# accuracy to the table; the hierarchical backbones, and the embedded clip set's video rows:
#   FINETUNE=1 bash tools/cifar10_table.sh simmim:swin_cifar10 maskfeat:mvit_cifar10
#   FINETUNE=1 bash tools/cifar10_table.sh videomae:default:clips maskfeat:clips:maskfeat_clips
# The pretext tasks' per-layer table (conv1..conv5 linear probes, then the global pool):
#   METRICS=knn/top1,layer_probe/top1_block0,layer_probe/top1_block1,layer_probe/top1_block2,\
#   layer_probe/top1_block3,layer_probe/top1_block4,layer_probe/top1_block5 \
#     bash tools/cifar10_table.sh rotation jigsaw
set -eux
D=${CIFAR_DIR:-../shared/data/cifar10/train}
OUT=${OUT_DIR:-runs}
METRICS=${METRICS:-knn/top1,linear/top1}
WORKDIRS=()
NAMES=()
for arg in "$@"; do
  IFS=: read -r m p ft <<< "$arg"
  p=${p:-cifar10}
  ft=${ft:-$p}
  run=$OUT/${m}_${p}
  python -m mim_jax.main --config=configs/$m.py:$p --workdir=$run --config.input.data.dir=$D
  python -m mim_jax.main --config=configs/$m.py:$p --workdir=${run}_random \
    --config.input.data.dir=$D --config.total_epochs=0
  name=$m
  if [ "$p" != cifar10 ]; then name="$m $p"; fi
  WORKDIRS+=("$run" "${run}_random")
  NAMES+=("$name" "$name (random init)")
  if [ "${FINETUNE:-0}" = 1 ]; then      # from the pretrained encoder, and from scratch
    python -m mim_jax.main --config=configs/finetune.py:$ft --workdir=${run}_ft \
      --config.input.data.dir=$D --config.finetune.pretrained=$run
    python -m mim_jax.main --config=configs/finetune.py:$ft --workdir=${run}_random_ft \
      --config.input.data.dir=$D
    WORKDIRS+=("${run}_ft" "${run}_random_ft")
    NAMES+=("$name fine-tuned" "$name (random init) fine-tuned")
  fi
done
if [ "${FINETUNE:-0}" = 1 ]; then METRICS=$METRICS,classifier/top1; fi
python -m mim_jax.report "${WORKDIRS[@]}" --names "$(IFS=,; echo "${NAMES[*]}")" \
  --metrics "$METRICS" --out "$OUT/table.md"
