"""launch/tpu_pod.sh and launch/slurm.sbatch against fake `gcloud`, `srun`, `scancel` and
`scontrol`: shell scripts first on PATH that append their argv (and the environment a task would
see) to a log as JSON lines. The fake gcloud keeps the slice's state in a file and, for `scp` and
`ssh --worker=all`, copies the file / runs the remote command in one fake home directory per
worker, whose `python3`, `gcsfuse` and `sudo` only record how they were called (`gcsfuse` also
marks its mount point as mounted for the fake `mountpoint`, and `sudo apt-get install gcsfuse`
puts the fake `gcsfuse` into the worker's ~/bin). No training, mount or install runs here.
"""
import json
import os
import pathlib
import shlex
import shutil
import signal
import subprocess
import sys
import time

import pytest

from helpers import ROOT

TPU_SH = ROOT / "launch" / "tpu_pod.sh"
SBATCH = ROOT / "launch" / "slurm.sbatch"
WORKERS = 4   # a v4-32 slice: 16 chips, 4 per host

LOGGER = f"""#!/usr/bin/env bash
# Appends {{"argv": [...], "env": {{...}}}} to $FAKE_LOG.
"{sys.executable}" - "$(basename "$0")" "$@" <<'PY'
import json, os, sys
env = {{k: v for k, v in os.environ.items()
       if k.startswith(("SLURM_", "JAX_", "XLA_")) or k in ("PYTHONUNBUFFERED", "HOME")}}
with open(os.environ["FAKE_LOG"], "a") as f:
  f.write(json.dumps({{"argv": sys.argv[1:], "env": env, "cwd": os.getcwd()}}) + "\\n")
PY
"""

FAKE_GCLOUD = LOGGER + r"""
verb=$4; name=$5
case "$verb" in
  describe)
    if [ -f "$FAKE_STATE/$name" ]; then cat "$FAKE_STATE/$name"; exit 0; fi
    echo "ERROR: (gcloud.compute.tpus.tpu-vm.describe) NOT_FOUND: $name" >&2; exit 1 ;;
  create) echo READY > "$FAKE_STATE/$name" ;;
  delete) rm -f "$FAKE_STATE/$name" ;;
  scp)
    dest=${6#*:}
    for w in $(seq 0 $((FAKE_WORKERS - 1))); do cp "$5" "$FAKE_HOMES/w$w/$dest"; done ;;
  ssh)
    cmd=""; prev=""
    for a in "$@"; do [ "$prev" = "--command" ] && cmd=$a; prev=$a; done
    for w in $(seq 0 $((FAKE_WORKERS - 1))); do
      (cd "$FAKE_HOMES/w$w" && HOME="$FAKE_HOMES/w$w" \
        PATH="$FAKE_HOMES/w$w/bin:$FAKE_WORKER_BIN:$PATH" bash -c "$cmd") || exit 1
    done ;;
esac
"""

# `_record NAME ARGS...` appends one line to the worker's $HOME/calls.log: NAME, the working
# directory and ARGS, separated by \x1f (plain bash: no interpreter start-up per call).
WORKER_RECORD = r"""#!/usr/bin/env bash
prog=$1; shift
(IFS=$'\x1f'; printf '%s\n' "$prog$IFS$PWD${1+$IFS}$*") >> "$HOME/calls.log"
"""

# A worker's python3: records pip installs and the trainer's argv; `-m mim_jax.main` sleeps
# $FAKE_TRAIN_SECONDS (a run still going) before it exits.
FAKE_WORKER_PYTHON = r"""#!/usr/bin/env bash
_record python3 "$@"
if [ "$2" = mim_jax.main ]; then sleep "${FAKE_TRAIN_SECONDS:-0}"; fi
"""

# gcsfuse [FLAGS] BUCKET DIR: like the real one, DIR must exist; then DIR counts as mounted for
# the fake mountpoint. A worker with a file ~/mount_fails refuses (a bucket it may not list).
FAKE_GCSFUSE = r"""#!/usr/bin/env bash
_record gcsfuse "$@"
dir=${@: -1}
[ -d "$dir" ] || { echo "gcsfuse: mount point $dir does not exist" >&2; exit 1; }
[ -f "$HOME/mount_fails" ] && { echo "gcsfuse: storage.objects.list denied" >&2; exit 1; }
echo "$dir" >> "$HOME/mounts"
"""

FAKE_MOUNTPOINT = r"""#!/usr/bin/env bash
[ "$1" = -q ] && shift
[ -f "$HOME/mounts" ] && grep -qxF "$1" "$HOME/mounts"
"""

# sudo: records; `tee FILE` writes stdin to ~/root/FILE; `apt-get install ... gcsfuse` installs
# the fake gcsfuse into ~/bin; `env VAR=...` prefixes are skipped.
FAKE_SUDO = r"""#!/usr/bin/env bash
_record sudo "$@"
while [ "$1" = env ] || [[ $1 == *=* ]]; do shift; done
case "$1" in
  tee) mkdir -p "$HOME/root$(dirname "$2")" && cat > "$HOME/root$2" ;;
  apt-get)
    if [ "$2" = install ] && [ "${@: -1}" = gcsfuse ]; then
      mkdir -p "$HOME/bin" && cp "$FAKE_GCSFUSE" "$HOME/bin/gcsfuse"
    fi ;;
esac
"""
FAKE_KEY = "-----BEGIN PGP PUBLIC KEY BLOCK----- fake -----END PGP PUBLIC KEY BLOCK-----"

# srun: logs, then (FAKE_SRUN_WAIT=1) stays up like a training step until SIGTERM reaches it.
FAKE_SRUN = LOGGER + r"""
if [ "${FAKE_SRUN_WAIT:-0}" = 1 ]; then
  trap 'echo "{\"argv\": [\"srun-got-TERM\"]}" >> "$FAKE_LOG"; exit 143' TERM
  echo $$ > "$FAKE_STATE/srun.pid"
  for i in $(seq 600); do sleep 0.1; done
  exit 1
fi
"""

# scancel --signal=TERM JOB: delivers TERM to the job's tasks (here: the fake srun).
FAKE_SCANCEL = LOGGER + r"""
[ -f "$FAKE_STATE/srun.pid" ] && kill -TERM "$(cat "$FAKE_STATE/srun.pid")"
exit 0
"""


def _write(path, text):
  path.write_text(text)
  path.chmod(0o755)


@pytest.fixture
def fakes(tmp_path):
  """PATH with the fakes first; returns (env, log path, state dir, worker homes)."""
  bin_dir, worker_bin = tmp_path / "bin", tmp_path / "worker_bin"
  state, homes = tmp_path / "state", tmp_path / "homes"
  for d in (bin_dir, worker_bin, state, homes):
    d.mkdir()
  for w in range(WORKERS):
    (homes / f"w{w}").mkdir()
  _write(bin_dir / "gcloud", FAKE_GCLOUD)
  _write(bin_dir / "srun", FAKE_SRUN)
  _write(bin_dir / "scancel", FAKE_SCANCEL)
  _write(bin_dir / "scontrol", LOGGER)
  _write(worker_bin / "_record", WORKER_RECORD)
  _write(worker_bin / "python3", FAKE_WORKER_PYTHON)
  _write(worker_bin / "mountpoint", FAKE_MOUNTPOINT)
  _write(worker_bin / "sudo", FAKE_SUDO)
  _write(worker_bin / "curl", f"#!/usr/bin/env bash\necho '{FAKE_KEY}'\n")
  _write(worker_bin / "lsb_release", "#!/usr/bin/env bash\necho jammy\n")
  _write(worker_bin / "apt-get", '#!/usr/bin/env bash\n_record apt-get "$@"; exit 1\n')
  for name in ("fusermount", "fusermount3"):   # nothing mounted there: they fail, as the real do
    _write(worker_bin / name, "#!/usr/bin/env bash\nexit 1\n")
  gcsfuse = tmp_path / "gcsfuse"
  _write(gcsfuse, FAKE_GCSFUSE)
  for w in range(WORKERS):   # installed on every worker unless a test removes it
    (homes / f"w{w}" / "bin").mkdir()
    shutil.copy(gcsfuse, homes / f"w{w}" / "bin" / "gcsfuse")
  log = tmp_path / "calls.jsonl"
  env = {k: v for k, v in os.environ.items()
         if not k.startswith(("SLURM_", "DRY_RUN", "WORKDIR", "GCSFUSE_FLAGS"))}
  env.update(PATH=f"{bin_dir}{os.pathsep}{env['PATH']}", FAKE_LOG=str(log), FAKE_STATE=str(state),
             FAKE_HOMES=str(homes), FAKE_WORKER_BIN=str(worker_bin), FAKE_WORKERS=str(WORKERS),
             FAKE_GCSFUSE=str(gcsfuse), TMPDIR=str(tmp_path))
  return env, log, state, homes


def _calls(log):
  if not log.exists():
    return []
  return [json.loads(l) for l in log.read_text().splitlines()]


def _gcloud(log, verb):
  head = ["gcloud", "compute", "tpus", "tpu-vm", verb]
  return [c["argv"] for c in _calls(log) if c["argv"][:5] == head]


def _flag(argv, name):
  vals = [a.split("=", 1)[1] for a in argv if a.startswith(name + "=")]
  assert len(vals) == 1, (name, argv)
  return vals[0]


TPU_ARGS = ["--project=proj", "--zone=us-central2-b", "--accelerator_type=v4-32",
            "--tpu_name=mae-l",
            "--workdir=gs://bucket/mae_l", "--config=configs/mae.py:imagenet_large", "--",
            "--config.input.data.dir=gs://bucket/tfds", "--config.optim.grad_accum=2"]
FUSE_FLAGS = ["--implicit-dirs", "--rename-dir-limit=200000"]


def _train_argv(workdir):
  return ["-m", "mim_jax.main", "--config=configs/mae.py:imagenet_large",
          f"--workdir={workdir}", "--distributed", "--config.input.data.dir=gs://bucket/tfds",
          "--config.optim.grad_accum=2"]


def _tpu(env, *args, **extra_env):
  return subprocess.run(["bash", str(TPU_SH), *args], env={**env, **extra_env}, capture_output=True,
                        text=True, timeout=60)


def _worker_calls(homes, w, prog=None):
  """What the worker's fakes recorded, in order: [{"prog", "cwd", "argv"}], of `prog` only."""
  path = homes / f"w{w}" / "calls.log"
  rows = [l.split("\x1f") for l in path.read_text().splitlines()] if path.exists() else []
  calls = [dict(prog=r[0], cwd=r[1], argv=r[2:]) for r in rows]
  return [c for c in calls if prog is None or c["prog"] == prog]


def _trainer_calls(homes, w, n=1):
  """The worker's trainer starts, once `n` of them are there (they start in the background)."""
  deadline = time.time() + 10
  while True:
    train = [c for c in _worker_calls(homes, w, "python3")
             if c["argv"][:2] == ["-m", "mim_jax.main"]]
    if len(train) >= n or time.time() > deadline:
      return train
    time.sleep(0.05)


def _wait_trainers_gone(homes):
  """Until every worker's last trainer has exited and been reaped (this machine's init reaps
  orphans late, and a zombie still passes the launch's `kill -0` check for a live run)."""
  deadline = time.time() + 10
  for w in range(WORKERS):
    pid = (homes / f"w{w}" / "mim_jax_logs" / "run.pid").read_text().strip()
    while pathlib.Path(f"/proc/{pid}").exists() and time.time() < deadline:
      time.sleep(0.05)


def _remote(ssh_argv):
  """The command an `ssh --worker=all --command CMD` runs on the workers."""
  return ssh_argv[ssh_argv.index("--command") + 1]


def test_tpu_dry_run_prints_every_command_and_runs_none(fakes):
  env, log, _, homes = fakes
  r = _tpu(env, "--dry_run", *TPU_ARGS)
  assert r.returncode == 0, r.stderr
  assert _calls(log) == [], "a dry run called gcloud"
  lines = [l for l in r.stdout.splitlines() if l.startswith("+ gcloud")]
  verbs = [l.split()[5] for l in lines]
  assert verbs == ["describe", "create", "scp", "ssh", "ssh", "ssh"], lines
  assert "--accelerator-type=v4-32" in lines[1] and "--version=tpu-ubuntu2204-base" in lines[1]
  assert all("--zone=us-central2-b" in l and "--project=proj" in l for l in lines)
  assert all("--worker=all" in l for l in lines[2:])
  # The printed lines are shell words: the gcsfuse mount, then the trainer on the mounted path.
  mount, launch = (_remote(shlex.split(l)[1:]) for l in lines[4:])
  assert 'gcsfuse --implicit-dirs --rename-dir-limit=200000 bucket "$HOME"/gcs/bucket' in mount
  assert "mim_jax.main" in launch and '--workdir="$HOME"/gcs/bucket/mae_l ' in launch
  assert "--workdir=gs://" not in launch
  assert not any((homes / f"w{w}" / "calls.log").exists() for w in range(WORKERS))


def test_tpu_launch_creates_installs_and_starts_the_same_command_on_every_worker(fakes):
  env, log, state, homes = fakes
  r = _tpu(env, *TPU_ARGS)
  assert r.returncode == 0, r.stderr
  creates = _gcloud(log, "create")
  assert len(creates) == 1
  assert creates[0][5] == "mae-l" and _flag(creates[0], "--accelerator-type") == "v4-32"
  assert (state / "mae-l").read_text().strip() == "READY"
  for verb in ("scp", "ssh"):
    for a in _gcloud(log, verb):
      assert "--worker=all" in a and _flag(a, "--zone") == "us-central2-b", a
  # Every worker got the checkout (its config files included), installed it, mounted the bucket
  # at ~/gcs/bucket, and started the same trainer command from the checkout, in the background,
  # logging to its own file, with the workdir on the mount.
  for w in range(WORKERS):
    home = homes / f"w{w}"
    copied = home / "mim_jax" / "configs" / "mae.py"
    assert copied.read_bytes() == (ROOT / "configs" / "mae.py").read_bytes()
    train = _trainer_calls(homes, w)
    calls = _worker_calls(homes, w)
    assert [c["prog"] for c in calls] == ["python3", "gcsfuse", "python3"], calls
    assert calls[0]["argv"][:3] == ["-m", "pip", "install"]
    assert calls[0]["argv"][-1] == f"{home}/mim_jax"
    assert calls[1]["argv"] == FUSE_FLAGS + ["bucket", f"{home}/gcs/bucket"]
    assert [c["argv"] for c in train] == [_train_argv(f"{home}/gcs/bucket/mae_l")], train
    assert train[0]["cwd"] == f"{home}/mim_jax"
    logs = list((home / "mim_jax_logs").glob("train-*.log"))
    assert len(logs) == 1 and (home / "mim_jax_logs" / "run.pid").exists()
  assert "gcloud compute tpus tpu-vm delete mae-l --zone=us-central2-b --project=proj" in r.stdout
  assert "tail -f ~/mim_jax_logs/train-*.log" in r.stdout
  assert "gcloud storage cat gs://bucket/mae_l/metrics.jsonl" in r.stdout


def test_tpu_gcsfuse_is_installed_where_missing_and_every_worker_mounts_before_any_trainer(fakes):
  env, log, _, homes = fakes
  for w in (1, 3):
    (homes / f"w{w}" / "bin" / "gcsfuse").unlink()
  r = _tpu(env, "--gcsfuse_flags=--metadata-cache-ttl-secs=0 --temp-dir=/mnt/disk", *TPU_ARGS)
  assert r.returncode == 0, r.stderr
  # One ssh mounts all workers, after the install and before the launch.
  ssh = [_remote(a) for a in _gcloud(log, "ssh")]
  assert ["gcsfuse" in c for c in ssh] == [False, True, False]
  key = "/usr/share/keyrings/cloud.google.asc"
  for w in range(WORKERS):
    home = homes / f"w{w}"
    sudo = [c["argv"] for c in _worker_calls(homes, w, "sudo")]
    if w in (1, 3):   # Google's apt repository for this release, signed by its key, then gcsfuse
      assert sudo == [["tee", key], ["tee", "/etc/apt/sources.list.d/gcsfuse.list"],
                      ["apt-get", "update", "-q"],
                      ["env", "DEBIAN_FRONTEND=noninteractive", "apt-get", "install", "-y", "-q",
                       "-o", "DPkg::Lock::Timeout=600", "gcsfuse"]]
      assert (home / "root" / key[1:]).read_text() == FAKE_KEY + "\n"
      assert ((home / "root/etc/apt/sources.list.d/gcsfuse.list").read_text() ==
              f"deb [signed-by={key}] https://packages.cloud.google.com/apt gcsfuse-jammy main\n")
    else:
      assert sudo == []
    (mount,) = [c["argv"] for c in _worker_calls(homes, w, "gcsfuse")]
    assert mount == FUSE_FLAGS + ["--metadata-cache-ttl-secs=0", "--temp-dir=/mnt/disk", "bucket",
                                  f"{home}/gcs/bucket"]
    assert len(_trainer_calls(homes, w)) == 1
  assert r.stdout.count("installing gcsfuse") == 2


def test_tpu_a_failed_mount_starts_no_trainer(fakes):
  env, log, _, homes = fakes
  (homes / "w2" / "mount_fails").touch()
  r = _tpu(env, *TPU_ARGS)
  assert r.returncode != 0 and "storage.objects.list denied" in r.stderr
  assert len(_gcloud(log, "ssh")) == 2        # install, mount: the launch never ran
  assert not any(_trainer_calls(homes, w, n=0) for w in range(WORKERS))


def test_tpu_rerun_reuses_the_slice_and_mount_and_resumes_the_same_workdir(fakes):
  env, log, _, homes = fakes
  assert _tpu(env, *TPU_ARGS).returncode == 0
  first = _gcloud(log, "ssh")
  for w in range(WORKERS):
    _trainer_calls(homes, w)
  _wait_trainers_gone(homes)
  r = _tpu(env, *TPU_ARGS)
  assert r.returncode == 0, r.stderr
  assert "reusing slice mae-l (READY)" in r.stdout
  assert len(_gcloud(log, "create")) == 1            # created once, by the first run
  assert _gcloud(log, "ssh")[-2:] == first[-2:]      # the same mount and trainer commands
  assert r.stdout.count("gs://bucket is already mounted") == WORKERS
  for w in range(WORKERS):
    assert len(_worker_calls(homes, w, "gcsfuse")) == 1       # mounted by the first run only
    home = homes / f"w{w}"
    assert ([c["argv"] for c in _trainer_calls(homes, w, n=2)] ==
            [_train_argv(f"{home}/gcs/bucket/mae_l")] * 2)


def test_tpu_shared_workdir_is_passed_as_is_and_nothing_is_mounted(fakes):
  env, log, _, homes = fakes
  args = [a if not a.startswith("--workdir=") else "--workdir=/mnt/nfs/mae l" for a in TPU_ARGS]
  r = _tpu(env, "--shared_workdir", *args)
  assert r.returncode == 0, r.stderr
  assert len(_gcloud(log, "ssh")) == 2 and not any("gcsfuse" in _remote(a)
                                                   for a in _gcloud(log, "ssh"))
  for w in range(WORKERS):
    assert _worker_calls(homes, w, "gcsfuse") == [] and _worker_calls(homes, w, "sudo") == []
    assert [c["argv"] for c in _trainer_calls(homes, w)] == [_train_argv("/mnt/nfs/mae l")]
  assert "tail /mnt/nfs/mae l/metrics.jsonl" in r.stdout


def test_tpu_preempted_slice_is_recreated_and_a_live_run_is_not_doubled(fakes):
  env, log, state, homes = fakes
  (state / "mae-l").write_text("PREEMPTED\n")
  r = _tpu(env, "--spot", *TPU_ARGS, FAKE_TRAIN_SECONDS="20")
  assert r.returncode == 0, r.stderr
  verbs = [a[4] for a in _gcloud(log, "delete") + _gcloud(log, "create")]
  assert verbs == ["delete", "create"] and "--spot" in _gcloud(log, "create")[0]
  # The trainers are still running: a second launch refuses instead of starting a second one.
  r = _tpu(env, *TPU_ARGS)
  assert r.returncode != 0
  assert "a run is still going" in r.stderr and "--stop" in r.stderr
  # --stop sends SIGTERM to each worker's trainer (which then saves a checkpoint).
  r = _tpu(env, "--stop", *TPU_ARGS[:4])
  assert r.returncode == 0, r.stderr
  assert r.stdout.count("SIGTERM sent") == WORKERS


@pytest.mark.parametrize("args, fix", [
    (["--accelerator_type=v4"], "use e.g. v4-32"),
    (["--workdir=/tmp/run"], "use gs://BUCKET/DIR"),
    (["--workdir="], "pass --workdir=gs://BUCKET/DIR"),
    (["--workdir=gs://"], "use --workdir=gs://BUCKET/DIR"),
    (["--workdir=gs://My_Bucket/run"], "use --workdir=gs://BUCKET/DIR"),
    (["--tpu_name="], "pass --tpu_name=NAME"),
    (["--bogus=1"], "flags for mim_jax.main go after --"),
])
def test_tpu_bad_input_is_one_line_error(fakes, args, fix):
  env, log, _, _ = fakes
  r = _tpu(env, *TPU_ARGS[:6], *args)
  assert r.returncode == 2
  assert r.stderr.count("\n") == 1 and r.stderr.startswith("error:") and fix in r.stderr, r.stderr
  assert _calls(log) == []


# ---------------------------------------------------------------------------------------------
# SLURM

def _slurm_env(env, tmp_path, **kw):
  e = dict(env, SLURM_JOB_ID="4242", SLURM_JOB_NUM_NODES="2", SLURM_GPUS_ON_NODE="4",
           SLURM_SUBMIT_DIR=str(ROOT), WORKDIR=str(tmp_path / "run"),
           CONFIG="configs/mae.py:imagenet_large")
  e.update(kw)
  return e


def _srun_calls(log):
  return [c for c in _calls(log) if c["argv"][0] == "srun"]


def test_sbatch_header_asks_for_requeue_and_an_early_warning():
  head = [l for l in SBATCH.read_text().splitlines() if l.startswith("#SBATCH")]
  assert "#SBATCH --requeue" in head
  assert any(l.startswith("#SBATCH --signal=B:USR1@") for l in head)
  nodes = int(next(l for l in head if "--nodes=" in l).split("=")[1])
  gpus = int(next(l for l in head if "--gpus-per-node=" in l).split("=")[1])
  tasks = int(next(l for l in head if "--ntasks-per-node=" in l).split("=")[1])
  assert tasks == gpus and nodes >= 1   # one process per GPU by default


@pytest.mark.parametrize("per, tasks_per_node, device_ids",
                         [("gpu", 4, None), ("node", 1, "0,1,2,3")])
def test_slurm_srun_runs_one_process_per_gpu_or_node(fakes, tmp_path, per, tasks_per_node,
                                                     device_ids):
  env, log, _, _ = fakes
  r = subprocess.run(["bash", str(SBATCH), f"--per={per}", "--config.optim.grad_accum=2"],
                     env=_slurm_env(env, tmp_path, COORDINATOR_PORT="23456"), capture_output=True,
                     text=True, timeout=60)
  assert r.returncode == 0, r.stderr
  (call,) = _srun_calls(log)
  argv = call["argv"]
  assert _flag(argv, "--nodes") == "2"
  assert _flag(argv, "--ntasks") == str(2 * tasks_per_node)
  assert _flag(argv, "--ntasks-per-node") == str(tasks_per_node)
  i = argv.index("-m")
  assert argv[i - 1] == "python" and argv[i + 1] == "mim_jax.main"
  assert _flag(argv, "--config") == "configs/mae.py:imagenet_large"
  assert _flag(argv, "--workdir") == str(tmp_path / "run")
  assert argv[-1] == "--config.optim.grad_accum=2"
  if device_ids is None:    # jax picks GPU SLURM_LOCALID for each of the 4 processes per node
    assert not any(a.startswith("--local_device_ids") for a in argv)
  else:                     # the one process per node drives all four
    assert _flag(argv, "--local_device_ids") == device_ids
  # What the tasks inherit: the job's id (jax derives the coordinator port from it), the
  # port override, and the submit directory as the working directory (configs/ resolve).
  assert call["env"]["SLURM_JOB_ID"] == "4242" and call["env"]["JAX_COORDINATOR_PORT"] == "23456"
  assert call["cwd"] == str(ROOT)


def test_slurm_dry_run_prints_srun_outside_a_job(fakes, tmp_path):
  env, log, _, _ = fakes
  e = dict(env, WORKDIR=str(tmp_path / "run"), NODES="4", GPUS_PER_NODE="8")
  r = subprocess.run(["bash", str(SBATCH), "--dry_run"], env=e, capture_output=True, text=True,
                     timeout=60)
  assert r.returncode == 0, r.stderr
  assert _calls(log) == []
  (line,) = [l for l in r.stdout.splitlines() if l.startswith("+ srun")]
  assert "--ntasks=32" in line and "--ntasks-per-node=8" in line and "--nodes=4" in line
  # Outside a job without --dry_run: a one-line error that says what to do.
  r = subprocess.run(["bash", str(SBATCH)], env=e, capture_output=True, text=True, timeout=60)
  assert r.returncode == 2 and r.stderr.count("\n") == 1 and "submit with sbatch" in r.stderr


def test_slurm_requeued_job_reruns_the_same_command(fakes, tmp_path):
  env, log, _, _ = fakes
  for restart in ("0", "1"):
    e = _slurm_env(env, tmp_path, SLURM_RESTART_COUNT=restart)
    r = subprocess.run(["bash", str(SBATCH)], env=e, capture_output=True, text=True, timeout=60)
    assert r.returncode == 0, r.stderr
    assert f"restart {restart}" in r.stdout
  first, second = _srun_calls(log)
  assert first["argv"] == second["argv"]        # same workdir: the trainer resumes there


@pytest.mark.parametrize("sig, requeue", [(signal.SIGUSR1, True), (signal.SIGTERM, False)])
def test_slurm_signal_makes_the_trainers_save_and_usr1_requeues(fakes, tmp_path, sig, requeue):
  env, log, state, _ = fakes
  p = subprocess.Popen(["bash", str(SBATCH)], env=_slurm_env(env, tmp_path, FAKE_SRUN_WAIT="1"),
                       stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
  deadline = time.time() + 20
  while not (state / "srun.pid").exists() and time.time() < deadline:
    time.sleep(0.05)
  assert (state / "srun.pid").exists(), "srun never started"
  p.send_signal(sig)
  _, err = p.communicate(timeout=30)
  assert p.returncode == 143, err       # the step's exit code: the trainers' preemption exit
  names = [c["argv"] for c in _calls(log)]
  assert names[0][0] == "srun"
  assert ["scancel", "--signal=TERM", "4242"] in names
  assert ["srun-got-TERM"] in names
  assert (["scontrol", "requeue", "4242"] in names) == requeue
  if requeue:   # requeued only after the trainers exited (their checkpoint is written)
    assert names.index(["scontrol", "requeue", "4242"]) > names.index(["srun-got-TERM"])
