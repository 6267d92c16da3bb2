"""A run resumes across a change in the number of processes (a preempted job that comes back on a
different slice or node count) and continues exactly where it stopped: one process trains and is
preempted, two processes finish the run, with the losses of an uninterrupted run.

What the code makes exact, and why:
  - The train state is restored into the current mesh's shardings (checkpointing.restore into
    an abstract tree carrying them), so a state saved by 1 process x 2 devices loads on
    2 processes x 1 device and back.
  - The in-memory loader (the default embedded data used here) has every process walk the same
    seeded order of *global* batches and keep its own slice (pipeline.make_train_loader), so the
    global batch of step s, and the saved data position (grain's sampler with shard_count=1),
    are the same for any process count. The losses after a resume then equal an uninterrupted
    run's step for step.
  - The random numbers are folded from the step with jax_threefry_partitionable, so they do not
    depend on the mesh either.
  - Both runs have a 2-device mesh (one process with two devices, two processes with one
    each); only the placement of the all-reduce differs. The losses and gradient norms came out
    bit-identical here; they are compared with rtol=1e-5, and the learning rate (a function of
    the restored step) exactly. Two processes computing steps 3-6 as one process did is also
    the check that a multi-process step equals a one-process step.
  A streaming (tfds / image-folder, in_memory=False) run shards the records per process: its
  data position cannot move to another process count, which is refused with a one-line error
  instead (not run here: it needs a streaming data set).

The "preemption" is the checkpoint an uninterrupted run wrote at step k, copied alone into a
fresh workdir: the same `Checkpointer.save(force=True)` a SIGTERM triggers writes it (the SIGTERM
path itself is test_cli.test_sigterm_saves_a_checkpoint_and_the_rerun_resumes), and the
uninterrupted run's metrics are the reference the resumed runs must reproduce.
"""
import json
import os
import shutil
import socket
import subprocess
import sys

import numpy as np

from helpers import ROOT, subprocess_env

STEPS = 6
COMMON = ["--config=configs/mae.py", "--config.model.variant=mu", "--config.model.depth=2",
          "--config.mae.decoder.width=32", "--config.mae.decoder.depth=1",
          "--config.mae.decoder.heads=2", "--config.input.batch_size=16",
          f"--config.total_steps={STEPS}", "--config.log_every=1", "--config.ckpt_every=2",
          "--config.keep_ckpts=5", "--config.tensorboard.enabled=False",
          "--config.evals.knn.enabled=False", "--config.evals.linear.enabled=False",
          "--config.evals.reconstruction.enabled=False",
          "--verbosity=0"]   # INFO logs on (the quiet default hides them): every process's resume


def _free_port():
  with socket.socket() as s:
    s.bind(("localhost", 0))
    return s.getsockname()[1]


def _run(workdir, processes, devices_per_process):
  """`python -m mim_jax.main` as `processes` local processes (coordinator on localhost, as a
  SLURM or pod launch would give them); returns each process's stderr after asserting rc 0."""
  if processes == 1:
    argvs = [[]]
  else:
    port = _free_port()
    argvs = [[f"--coordinator_address=localhost:{port}", f"--num_processes={processes}",
              f"--process_id={i}"] for i in range(processes)]
  procs = [subprocess.Popen([sys.executable, "-m", "mim_jax.main", *COMMON, f"--workdir={workdir}",
                             *a], cwd=ROOT, env=subprocess_env(devices_per_process), text=True,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE) for a in argvs]
  outs = [p.communicate(timeout=300) for p in procs]
  for i, (p, (_, err)) in enumerate(zip(procs, outs)):
    assert p.returncode == 0, f"process {i} of {processes}:\n{err[-3000:]}"
  return [err for _, err in outs]


def _records(workdir):
  """{step: (loss, grad_norm, lr)} of the training steps in the run's metrics.jsonl."""
  with open(os.path.join(workdir, "metrics.jsonl")) as f:
    return {r["step"]: (r["loss"], r["grad_norm"], r["lr"])
            for r in map(json.loads, f) if "loss" in r}


def _preempted_at(src, step, dst):
  """A workdir holding only `src`'s checkpoint `step` (what a preemption at `step` leaves)."""
  os.makedirs(os.path.join(dst, "checkpoints"))
  shutil.copytree(os.path.join(src, "checkpoints", str(step)),
                  os.path.join(dst, "checkpoints", str(step)))
  return dst


def _data_files(workdir, step):
  return sorted(os.listdir(os.path.join(workdir, "checkpoints", str(step), "data")))


def test_one_process_checkpoint_resumes_on_two_processes(tmp_path):
  # The reference: one process (2 devices) from step 0 to the end, checkpoints at 2, 4, 6.
  ref = str(tmp_path / "ref")
  _run(ref, 1, 2)
  expected = _records(ref)
  assert sorted(expected) == list(range(1, STEPS + 1))
  assert _data_files(ref, 2) == ["commit_success.txt", "process_0-of-1.json"]

  # Preempted at step 2 under one process; the job comes back as two processes x 1 device.
  two = _preempted_at(ref, 2, str(tmp_path / "two"))
  errs = _run(two, 2, 1)
  assert all("resuming from step 2" in e for e in errs), [e[-2000:] for e in errs]
  got = _records(two)
  assert sorted(got) == [3, 4, 5, 6]            # resumed, not restarted
  for s in got:
    assert got[s][2] == expected[s][2], (s, got[s], expected[s])   # lr: a function of the step
    np.testing.assert_allclose(got[s][:2], expected[s][:2], rtol=1e-5, err_msg=f"step {s}")
  # The two processes wrote their own data positions at step 4: the global order, same in both.
  assert _data_files(two, 4) == ["commit_success.txt", "process_0-of-2.json", "process_1-of-2.json"]
  pos = [json.load(open(os.path.join(two, "checkpoints", "4", "data", f)))
         for f in ("process_0-of-2.json", "process_1-of-2.json")]
  assert pos[0] == pos[1] and "shard_count=1" in pos[0]["sampler"]
