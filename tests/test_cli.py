"""`python -m mim_jax.main` as a user runs it: one-line errors, preemption (multi-process runs:
test_multiprocess_resume.py)."""
import json
import os
import signal
import subprocess
import sys
import time

from helpers import ROOT, subprocess_env

TINY = ["--config.model.variant=mu", "--config.model.depth=2", "--config.input.batch_size=16",
        "--config.evals.knn.max_train=300", "--config.evals.linear.epochs=1",
        "--config.evals.linear.max_train=300", "--config.evals.reconstruction.num_images=2"]


def main(args, devices=1, timeout=240, **kw):
  return subprocess.run([sys.executable, "-m", "mim_jax.main", *args], cwd=ROOT,
                        env=subprocess_env(devices), capture_output=True, text=True, timeout=timeout, **kw)


def last_line(stderr):
  return [l for l in stderr.strip().splitlines() if l.strip()][-1]


def test_unknown_config_key_fails(tmp_path):
  r = main(["--config=configs/mae.py", f"--workdir={tmp_path}", "--config.optim.learning_rate=1"])
  assert r.returncode != 0
  assert "learning_rate" in r.stderr
  assert not os.path.exists(tmp_path / "checkpoints")


def test_missing_data_dir_is_one_line_error(tmp_path):
  r = main(["--config=configs/mae.py:cifar10", f"--workdir={tmp_path}",
            f"--config.input.data.dir={tmp_path}/nowhere", *TINY])
  assert r.returncode == 2, r.stderr[-2000:]
  line = last_line(r.stderr)
  assert line.startswith("error:") and "config.input.data.dir" in line, line
  assert "Traceback" not in r.stderr


def test_batch_not_divisible_by_devices_is_one_line_error(tmp_path):
  r = main(["--config=configs/simmim.py", f"--workdir={tmp_path}", *TINY,
            "--config.input.batch_size=10"], devices=4)
  assert r.returncode == 2, r.stderr[-2000:]
  line = last_line(r.stderr)
  assert "batch_size=10" in line and "multiple of 4" in line, line


def test_sigterm_saves_a_checkpoint_and_the_rerun_resumes(tmp_path):
  args = ["--config=configs/mae.py", f"--workdir={tmp_path}", *TINY, "--config.total_steps=100000",
          "--config.ckpt_every=100000", "--config.log_every=1"]
  p = subprocess.Popen([sys.executable, "-m", "mim_jax.main", *args], cwd=ROOT, env=subprocess_env(),
                       stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
  metrics = tmp_path / "metrics.jsonl"
  deadline = time.time() + 180
  while time.time() < deadline and (not metrics.exists() or len(metrics.read_text().splitlines()) < 3):
    time.sleep(0.5)
  p.send_signal(signal.SIGTERM)
  _, err = p.communicate(timeout=120)
  assert p.returncode == 143, err[-2000:]
  steps = sorted(int(s) for s in os.listdir(tmp_path / "checkpoints"))
  assert len(steps) == 1 and steps[0] >= 3
  assert "preempted: saved step" in err
  # The rerun ends with the kNN evaluation alone (the first-run test covers the default evals).
  r = main(["--config=configs/mae.py", f"--workdir={tmp_path}", *TINY, f"--config.total_steps={steps[0] + 2}",
            "--config.ckpt_every=100000", "--config.log_every=1", "--config.evals.linear.enabled=False",
            "--config.evals.reconstruction.enabled=False"])
  assert r.returncode == 0, r.stderr[-3000:]
  logged = [json.loads(l) for l in metrics.read_text().splitlines()]
  train_steps = [x["step"] for x in logged if "loss" in x]
  assert train_steps[-2:] == [steps[0] + 1, steps[0] + 2]
  assert "eval results:" in r.stdout


DOOR_ERRORS = [
    (["--config=configs/simmim.py", "--config.no_such_key=1"], "the keys of config are"),
    (["--config=configs/simmim.py", "--config.model.nme=1"], "did you mean --config.model.name"),
    (["--config=configs/nosuch.py"], "simmim.py"),                      # the configs that exist
    (["--config=configs/mae.py:no_such_preset"], "'imagenet_large'"),   # the presets
    (["--config=configs/simmim.py", "--config.total_steps=abc"], "total_steps=abc"),
]


def test_door_errors_are_one_line_and_write_nothing(tmp_path):
  """A mistyped key, config path or preset, a bad value, an unwritable workdir: one line that
  names the fix, exit code 2, no workdir created (several cases in one test: each start costs
  an interpreter)."""
  for i, (args, fix) in enumerate(DOOR_ERRORS + [(["--config=configs/simmim.py"], "/proc")]):
    workdir = "/proc/mim_jax_run" if fix == "/proc" else str(tmp_path / f"run{i}")
    r = main([*args, f"--workdir={workdir}"])
    lines = [l for l in (r.stdout + r.stderr).splitlines() if l.strip()]
    assert r.returncode == 2, (args, r.stderr[-2000:])
    assert len(lines) == 1 and lines[0].startswith("error:") and fix in lines[0], (args, lines)
    assert not os.path.exists(workdir), args


def test_a_first_run_is_quiet_and_says_what_it_does(tmp_path):
  """Default output: a header, the progress bar, the evaluation results and where the files
  are, under 40 lines besides the bar; no config dump, no library INFO lines. --verbosity=1
  brings the config back."""
  args = ["--config=configs/simmim.py", f"--workdir={tmp_path}", *TINY, "--config.total_steps=2"]
  r = main(args)
  assert r.returncode == 0, r.stderr[-3000:]
  text = (r.stdout + r.stderr).replace("\r", "\n")
  lines = [l for l in text.splitlines() if l.strip() and "simmim train:" not in l]
  assert len(lines) < 40, "\n".join(lines)
  assert lines[0].startswith("SimMIM (simmim) on ViT-mu, 2 blocks, patch 4, 32 px"), lines[:3]
  assert any(l.startswith("data: embedded: 4,000 training images, 1,000 held out") for l in lines)
  assert "done: step 2" in r.stdout and "eval results:" in r.stdout
  for noise in ("checkpoint_manager", "ckpt_every:", "CheckpointManagerOptions", "I1", "config:"):
    assert noise not in text, noise
  quick = [f"--config.evals.{e}.enabled=False" for e in ("knn", "linear", "reconstruction")]
  r = main(["--verbosity=1", *args[:1], f"--workdir={tmp_path}/v", *args[2:], *quick])
  assert r.returncode == 0 and "config:" in r.stderr and "ckpt_every: 200" in r.stderr
