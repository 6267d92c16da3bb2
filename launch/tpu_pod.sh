#!/usr/bin/env bash
# Pretrain on a Cloud TPU pod slice: create the slice (or reuse it), install mim_jax on every
# worker, start the same `python -m mim_jax.main` on all of them, one log file per worker.
#
#   launch/tpu_pod.sh --project=my-proj --zone=us-central2-b --accelerator_type=v4-32 \
#       --tpu_name=mae-l --workdir=gs://my-bucket/mae_l --config=configs/mae.py:imagenet_large \
#       -- --config.input.data.dir=gs://my-bucket/tfds
#
# Every --name=value also reads from the environment in capitals (PROJECT, ZONE,
# ACCELERATOR_TYPE, TPU_NAME, RUNTIME_VERSION, WORKDIR, CONFIG, GIT_URL, GIT_REF, JAX_SPEC,
# GCSFUSE_FLAGS, SPOT, DRY_RUN); flags win. Flags after `--` go to mim_jax.main unchanged.
#
#   --dry_run (DRY_RUN=1)   print every command instead of running it.
#   --stop                  SIGTERM the run on every worker: it saves a checkpoint and exits
#                           (rerun this script to resume).
#   --git_url=URL [--git_ref=REF]   install from git on each worker; default: a tarball of
#                           this checkout, copied to every worker (uncommitted edits included).
#   --spot                  a Spot slice (cheaper, preemptible; rerun the script after a
#                           preemption: it deletes the PREEMPTED slice, creates a new one and
#                           the run resumes from the workdir's latest checkpoint).
#   --shared_workdir        --workdir is a path on a filesystem already mounted on every worker
#                           (Filestore/NFS): passed to the trainer as it is.
#   --gcsfuse_flags='...'   more options for the gcsfuse mount of a gs:// workdir (see below),
#                           e.g. --gcsfuse_flags='--metadata-cache-ttl-secs=0'.
#
# Rerunning with the same --workdir resumes: mim_jax.main restores the latest checkpoint there.
# The workdir must be shared by all workers (every process writes its shards of each
# checkpoint). The trainer writes it with plain file I/O (metrics.jsonl, TensorBoard, PNGs,
# Orbax checkpoints), so a --workdir=gs://BUCKET/DIR is reached through Cloud Storage FUSE:
# before the trainer starts, one ssh to every worker installs gcsfuse where it is missing (the
# packages.cloud.google.com apt repository), mounts BUCKET at ~/gcs/BUCKET (--implicit-dirs,
# --rename-dir-limit for Orbax's rename of a finished checkpoint; skipped where it is already
# mounted) and the trainer gets --workdir=~/gcs/BUCKET/DIR. The slice's service account needs
# read/write access to the bucket (launch/README.md).
#
# Multi-slice (several slices over the data-centre network), not automated here:
#   * create the slices together as a queued resource:
#       gcloud compute tpus queued-resources create QR --node-count=2 --node-prefix=NAME \
#         --accelerator-type=v5p-128 --runtime-version=... --zone=... --project=...
#     then run the same install / mount / launch commands on every node (NAME-0, NAME-1, ...) with
#     --worker=all; the TPU runtime sets the MEGASCALE_* variables and
#     jax.distributed.initialize() joins all slices into one set of processes.
#   * keep cross-slice traffic data-parallel: in config.mesh the 'fsdp' size must divide the
#     chips of one slice, so that each fsdp group stays inside a slice (jax.devices() lists
#     devices slice by slice; check jax.devices()[i].slice_index). The batch is split over all
#     devices, so config.input.batch_size must divide by the total chip count.
#   * a preemption of any slice stops all of them; rerun to resume as above.
set -euo pipefail

die() { echo "error: $*" >&2; exit 2; }

PROJECT=${PROJECT:-}
ZONE=${ZONE:-}
ACCELERATOR_TYPE=${ACCELERATOR_TYPE:-v4-32}
TPU_NAME=${TPU_NAME:-}
RUNTIME_VERSION=${RUNTIME_VERSION:-tpu-ubuntu2204-base}
WORKDIR=${WORKDIR:-}
CONFIG=${CONFIG:-configs/mae.py:imagenet_large}
GIT_URL=${GIT_URL:-}
GIT_REF=${GIT_REF:-}
JAX_SPEC=${JAX_SPEC:-jax[tpu]}
SPOT=${SPOT:-0}
DRY_RUN=${DRY_RUN:-0}
SHARED_WORKDIR=${SHARED_WORKDIR:-0}
GCSFUSE_FLAGS=${GCSFUSE_FLAGS:-}
ACTION=launch
EXTRA=()

while (($#)); do
  case "$1" in
    --project=*) PROJECT=${1#*=} ;;
    --zone=*) ZONE=${1#*=} ;;
    --accelerator_type=*) ACCELERATOR_TYPE=${1#*=} ;;
    --tpu_name=*) TPU_NAME=${1#*=} ;;
    --runtime_version=*) RUNTIME_VERSION=${1#*=} ;;
    --workdir=*) WORKDIR=${1#*=} ;;
    --config=*) CONFIG=${1#*=} ;;
    --git_url=*) GIT_URL=${1#*=} ;;
    --git_ref=*) GIT_REF=${1#*=} ;;
    --jax_spec=*) JAX_SPEC=${1#*=} ;;
    --spot) SPOT=1 ;;
    --shared_workdir) SHARED_WORKDIR=1 ;;
    --gcsfuse_flags=*) GCSFUSE_FLAGS=${1#*=} ;;
    --dry_run) DRY_RUN=1 ;;
    --stop) ACTION=stop ;;
    --) shift; EXTRA=("$@"); break ;;
    -h|--help) sed -n '2,/^set -euo/p' "$0" | sed '$d; s/^# \{0,1\}//'; exit 0 ;;
    *) die "unknown option $1: see launch/tpu_pod.sh --help (flags for mim_jax.main go after --)" ;;
  esac
  shift
done

[[ -n $PROJECT ]] || die "no project: pass --project=PROJECT_ID (or set PROJECT)"
[[ -n $ZONE ]] || die "no zone: pass --zone=ZONE, e.g. --zone=us-central2-b (or set ZONE)"
[[ -n $TPU_NAME ]] || die "no slice name: pass --tpu_name=NAME (or set TPU_NAME)"
[[ $ACCELERATOR_TYPE =~ ^v[0-9]+[a-z]*-[0-9]+$ ]] ||
  die "--accelerator_type=$ACCELERATOR_TYPE is not a TPU type: use e.g. v4-32, v5p-64, v5litepod-16"
if [[ $ACTION == launch ]]; then
  [[ -n $WORKDIR ]] || die "no workdir: pass --workdir=gs://BUCKET/DIR (or set WORKDIR)"
  if [[ $WORKDIR != gs://* && $SHARED_WORKDIR != 1 ]]; then
    die "--workdir=$WORKDIR is not shared by the workers: use gs://BUCKET/DIR (or add" \
        "--shared_workdir if it is on a filesystem mounted on every worker)"
  fi
fi

# A gs:// workdir: the bucket is mounted on every worker at ~/gcs/BUCKET (step 3) and the
# trainer writes to the mounted directory. DIR may be empty (the bucket's root).
BUCKET="" GCS_DIR=""
if [[ $ACTION == launch && $WORKDIR == gs://* ]]; then
  gcs=${WORKDIR#gs://}
  BUCKET=${gcs%%/*}
  [[ $gcs == */* ]] && GCS_DIR=${gcs#*/}
  while [[ $GCS_DIR == */ ]]; do GCS_DIR=${GCS_DIR%/}; done
  [[ $BUCKET =~ ^[a-z0-9][a-z0-9._-]{1,220}[a-z0-9]$ ]] ||
    die "--workdir=$WORKDIR does not name a bucket (3-222 of a-z 0-9 . _ -):" \
        "use --workdir=gs://BUCKET/DIR"
fi

# Every gcloud call goes through here: printed (always) and run (unless --dry_run).
run() {
  printf '+'; printf ' %q' "$@"; printf '\n'
  if [[ $DRY_RUN != 1 ]]; then "$@"; fi
}
TPU=(compute tpus tpu-vm)
WHERE=(--zone="$ZONE" --project="$PROJECT")

# On each worker: its log and pid files (the worker's home directory).
LOG_DIR='$HOME/mim_jax_logs'
PID_FILE='$HOME/mim_jax_logs/run.pid'

if [[ $ACTION == stop ]]; then
  stop="if [ -f $PID_FILE ] && kill -0 \$(cat $PID_FILE) 2>/dev/null; then"
  stop+=" kill -TERM \$(cat $PID_FILE);"
  stop+=" echo \"\$(hostname): SIGTERM sent, the run saves a checkpoint and exits\";"
  stop+=" else echo \"\$(hostname): no run going\"; fi"
  run gcloud "${TPU[@]}" ssh "$TPU_NAME" "${WHERE[@]}" --worker=all --command "$stop"
  exit 0
fi

# 1. The slice: reuse it when it is there and usable, else create it.
state=""
if [[ $DRY_RUN == 1 ]]; then
  run gcloud "${TPU[@]}" describe "$TPU_NAME" "${WHERE[@]}" --format='value(state)'
  echo "# dry run: the create below runs only when the describe above finds no slice"
else
  printf '+ gcloud %s describe %q --zone=%q --project=%q\n' "${TPU[*]}" "$TPU_NAME" "$ZONE" "$PROJECT"
  state=$(gcloud "${TPU[@]}" describe "$TPU_NAME" "${WHERE[@]}" --format='value(state)' 2>/dev/null) || state=""
fi
case "$state" in
  READY|CREATING|STARTING|RESTARTING|REPAIRING)
    echo "reusing slice $TPU_NAME ($state)" ;;
  PREEMPTED|TERMINATED|STOPPED|STOPPING)
    echo "slice $TPU_NAME is $state: deleting it and creating a new one"
    run gcloud "${TPU[@]}" delete "$TPU_NAME" "${WHERE[@]}" --quiet
    state="" ;;
  "") ;;
  *) die "slice $TPU_NAME is in state $state: wait, or delete it with gcloud ${TPU[*]} delete $TPU_NAME --zone=$ZONE --project=$PROJECT" ;;
esac
if [[ -z $state ]]; then
  create=(gcloud "${TPU[@]}" create "$TPU_NAME" "${WHERE[@]}" --accelerator-type="$ACCELERATOR_TYPE"
          --version="$RUNTIME_VERSION")
  [[ $SPOT == 1 ]] && create+=(--spot)
  run "${create[@]}"
fi

# 2. mim_jax on every worker, in ~/mim_jax (the config files are read from there).
if [[ -n $GIT_URL ]]; then
  url=$(printf %q "$GIT_URL"); ref=${GIT_REF:+$(printf %q "$GIT_REF")}
  fetch="if [ -d \$HOME/mim_jax/.git ]; then"
  fetch+=" git -C \$HOME/mim_jax fetch -q $url $ref && git -C \$HOME/mim_jax checkout -q FETCH_HEAD;"
  fetch+=" else git clone -q $url \$HOME/mim_jax${ref:+ && git -C \$HOME/mim_jax checkout -q $ref}; fi"
else
  repo=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
  tarball=${TMPDIR:-/tmp}/mim_jax-$TPU_NAME.tar.gz
  run tar -czf "$tarball" -C "$repo" --exclude=./.git --exclude=./runs --exclude='*.egg-info' \
    --exclude=__pycache__ .
  run gcloud "${TPU[@]}" scp "$tarball" "$TPU_NAME:mim_jax.tar.gz" "${WHERE[@]}" --worker=all
  fetch="rm -rf \$HOME/mim_jax && mkdir -p \$HOME/mim_jax && tar -xzf \$HOME/mim_jax.tar.gz -C \$HOME/mim_jax"
fi
run gcloud "${TPU[@]}" ssh "$TPU_NAME" "${WHERE[@]}" --worker=all --command \
  "set -e; $fetch; python3 -m pip install -q $(printf %q "$JAX_SPEC") -e \$HOME/mim_jax"

# 3. A gs:// workdir: gcsfuse on every worker (installed from Google's apt repository, as the
#    Cloud Storage FUSE install guide does it, when the worker has none), the bucket mounted at
#    ~/gcs/BUCKET unless it already is (a rerun). All workers are mounted before any trainer
#    starts: one failed mount stops the launch here. Orbax finishes a checkpoint by renaming
#    its temporary directory, which gcsfuse allows on a flat bucket only below
#    --rename-dir-limit descendants (a hierarchical-namespace bucket renames atomically).
workdir_q=$(printf %q "$WORKDIR")
if [[ -n $BUCKET ]]; then
  mnt_q="\"\$HOME\"/gcs/$(printf %q "$BUCKET")"
  workdir_q=$mnt_q${GCS_DIR:+/$(printf %q "$GCS_DIR")}
  read -ra fuse_extra <<< "$GCSFUSE_FLAGS"
  fuse_q="--implicit-dirs --rename-dir-limit=200000"
  ((${#fuse_extra[@]})) && fuse_q+=$(printf ' %q' "${fuse_extra[@]}")
  key=/usr/share/keyrings/cloud.google.asc apt_url=https://packages.cloud.google.com/apt
  mount="set -e -o pipefail; if ! command -v gcsfuse > /dev/null 2>&1; then"
  mount+=" echo \"\$(hostname): installing gcsfuse\";"
  mount+=" curl -fsSL $apt_url/doc/apt-key.gpg | sudo tee $key > /dev/null;"
  mount+=" echo \"deb [signed-by=$key] $apt_url gcsfuse-\$(lsb_release -c -s) main\""
  mount+=" | sudo tee /etc/apt/sources.list.d/gcsfuse.list > /dev/null;"
  mount+=" sudo apt-get update -q; sudo env DEBIAN_FRONTEND=noninteractive"
  mount+=" apt-get install -y -q -o DPkg::Lock::Timeout=600 gcsfuse; fi;"
  mount+=" if mountpoint -q $mnt_q; then echo \"\$(hostname): gs://$BUCKET is already mounted\";"
  mount+=" else { fusermount -uz $mnt_q || fusermount3 -uz $mnt_q; } 2> /dev/null || true;"
  mount+=" mkdir -p $mnt_q; gcsfuse $fuse_q $(printf %q "$BUCKET") $mnt_q; fi"
  run gcloud "${TPU[@]}" ssh "$TPU_NAME" "${WHERE[@]}" --worker=all --command "$mount"
fi

# 4. The same command on every worker, in the background, one log per worker. A run still
#    going on a worker is left alone (the launch fails there): stop it first with --stop.
train_q=" python3 -m mim_jax.main $(printf %q "--config=$CONFIG") --workdir=$workdir_q"
train_q+=" --distributed"
((${#EXTRA[@]})) && train_q+=$(printf ' %q' "${EXTRA[@]}")
launch="set -e; mkdir -p $LOG_DIR;"
launch+=" if [ -f $PID_FILE ] && kill -0 \$(cat $PID_FILE) 2>/dev/null; then"
launch+=" echo \"\$(hostname): a run is still going (pid \$(cat $PID_FILE)):"
launch+=" stop it with launch/tpu_pod.sh --stop\" >&2; exit 1; fi;"
launch+=" cd \$HOME/mim_jax;"
launch+=" nohup$train_q > $LOG_DIR/train-\$(hostname).log 2>&1 < /dev/null & echo \$! > $PID_FILE"
run gcloud "${TPU[@]}" ssh "$TPU_NAME" "${WHERE[@]}" --worker=all --command "$launch"

where_s="--zone=$ZONE --project=$PROJECT"
if [[ -n $BUCKET ]]; then
  metrics="gcloud storage cat ${WORKDIR%/}/metrics.jsonl | tail   (tensorboard --logdir $WORKDIR)"
else
  metrics="tail $WORKDIR/metrics.jsonl on a worker"
fi
[[ $DRY_RUN == 1 ]] && echo $'\n(dry run: nothing was created, copied or started)'
cat <<EOF

Started on every worker of $TPU_NAME ($ACCELERATOR_TYPE): $CONFIG -> $WORKDIR${BUCKET:+
  (the trainer writes through the gcsfuse mount ~/gcs/$BUCKET${GCS_DIR:+/$GCS_DIR} on each worker)}
  follow worker 0:    gcloud ${TPU[*]} ssh $TPU_NAME $where_s --worker=0 --command='tail -f ~/mim_jax_logs/train-*.log'
  all workers' tails: gcloud ${TPU[*]} ssh $TPU_NAME $where_s --worker=all --command='tail -n 3 ~/mim_jax_logs/train-*.log'
  metrics:            $metrics
  stop (saves):       $0 --stop --project=$PROJECT --zone=$ZONE --tpu_name=$TPU_NAME
  resume:             rerun this command (same --workdir)
  delete the slice:   gcloud ${TPU[*]} delete $TPU_NAME $where_s --quiet
EOF
