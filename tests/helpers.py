"""Small configs for fast CPU tests."""
import os
import pathlib
import re

ROOT = pathlib.Path(__file__).resolve().parents[1]


def subprocess_env(devices: int = 1) -> dict:
  """The environment for a `python -m mim_jax.main` subprocess on `devices` fake CPU devices:
  the test session's other XLA flags (conftest.py) kept, mim_jax importable from the checkout."""
  e = dict(os.environ)
  flags = re.sub(r"--xla_force_host_platform_device_count=\S+", "", e.get("XLA_FLAGS", ""))
  e["XLA_FLAGS"] = f"{flags.strip()} --xla_force_host_platform_device_count={devices}".strip()
  e["JAX_PLATFORMS"] = "cpu"
  e["PYTHONPATH"] = str(ROOT) + os.pathsep + e.get("PYTHONPATH", "")
  return e


def load_config(method: str, preset: str = ""):
  from mim_jax import config_lib
  return config_lib.load(method, preset, str(ROOT / "configs"))


def tiny_config(method: str = "mae", **overrides):
  """The method's default (embedded data) config shrunk to a 2-block, 64-wide ViT."""
  c = load_config(method)
  c.model.variant = "mu"
  c.model.depth = 2
  if method == "mae":
    c.mae.decoder = dict(width=32, depth=1, heads=2)
  c.input.batch_size = 16
  c.total_steps = 6
  c.log_every = 1
  c.ckpt_every = 3
  c.keep_ckpts = 5
  c.evals.knn.max_train = 500
  c.evals.knn.max_eval = 200
  c.evals.linear.epochs = 2
  c.evals.linear.max_train = 500
  c.evals.linear.max_eval = 200
  c.evals.reconstruction.num_images = 2
  return apply_overrides(c, overrides)


def tiny_convnet_config(method: str, preset: str = "", block: dict = None, **overrides):
  """configs/<method>.py's `preset` (another preset is put on the embedded data) on its ConvNet
  at width 0.125 (AlexNet: 8 .. 32 channels), 16 px, batch 8, 4 steps with a checkpoint every
  2, no warm-up, no evaluators; `block` updates the method's config block (head widths),
  `overrides` are dotted keys."""
  c = load_config(method, preset)
  if preset:
    c.input.data.update(name="embedded", dir="", holdout_per_class=100)
  c.model.width = 0.125
  c.input.image_size = 16
  c.input.batch_size = 8
  c.total_steps, c.ckpt_every, c.log_every, c.keep_ckpts = 4, 2, 1, 5
  c.optim.warmup_epochs = 0.0
  if block:
    c[c.method].update(block)
  for name in c.evals:
    c.evals[name].enabled = False
  return apply_overrides(c, overrides)


def apply_overrides(c, overrides: dict):
  """c with each dotted key of `overrides` ('optim.grad_accum') set to its value."""
  for k, v in overrides.items():
    node = c
    *path, last = k.split(".")
    for p in path:
      node = node[p]
    node[last] = v
  return c


def losses(workdir, key: str = "loss") -> dict:
  """{step: training loss} (or another logged `key`, e.g. 'adversary/loss') from a run's
  metrics.jsonl."""
  import json
  import os
  with open(os.path.join(workdir, "metrics.jsonl")) as f:
    return {r["step"]: r[key] for r in map(json.loads, f) if key in r}


def train_with_frozen_run(config, workdir, run, **kwargs):
  """train.train_and_evaluate with `teachers.load` returning `run` (a fake tokenizer or
  teacher), for methods whose config names another run's workdir."""
  import pytest
  from mim_jax import teachers, train
  with pytest.MonkeyPatch.context() as mp:
    mp.setattr(teachers, "load", lambda path, *args, **kwargs: run)
    return train.train_and_evaluate(config, workdir, progress=False, **kwargs)


def resumed_losses(config, workdir, stop_after: int, train_fn=None, **kwargs) -> dict:
  """Runs `config` in `workdir` preempted after step `stop_after` (it must save that step's
  checkpoint), then runs it again to the end: the resumed run's {step: loss}.
  `train_fn(config, workdir, **kwargs)` defaults to train.train_and_evaluate without a bar."""
  import os
  import pytest
  from mim_jax import train
  if train_fn is None:
    train_fn = lambda c, w, **kw: train.train_and_evaluate(c, w, progress=False, **kw)
  with pytest.raises(train.Preempted):
    train_fn(config, workdir, stop_after=stop_after, **kwargs)
  saved = sorted(int(s) for s in os.listdir(os.path.join(workdir, "checkpoints")) if s.isdigit())
  assert saved and saved[-1] == stop_after, saved
  train_fn(config, workdir, **kwargs)
  return losses(workdir)


def assert_same_losses(expected: dict, got: dict, steps: int) -> None:
  """Both runs logged steps 1..steps, with bit-identical losses."""
  assert sorted(expected) == list(range(1, steps + 1)), sorted(expected)
  assert sorted(got) == list(range(1, steps + 1)), sorted(got)
  for s in range(1, steps + 1):
    assert expected[s] == got[s], (s, expected[s], got[s])


def lab_setup(c, u8, heads=("head",), seed: int = 0):
  """A colourisation method on a uint8 batch: (method, preprocessed x, params with each head's
  fc8 drawn N(0, 1) rather than Caffe's zeros, state with the BatchNorm collections, the rng)."""
  import jax
  import jax.numpy as jnp
  import numpy as np
  from mim_jax import methods
  m = methods.get(c)
  rng = np.random.default_rng(seed)
  x = m.eval_preprocess(jnp.asarray(u8), c.input)
  v = m.init_variables(jax.random.PRNGKey(0), x)
  params = v["params"]
  for head in heads:
    k = params[head]["fc8"]["kernel"]
    params[head]["fc8"]["kernel"] = jnp.asarray(rng.normal(size=k.shape), jnp.float32)
  return m, x, params, {"collections": {k: t for k, t in v.items() if k != "params"}}


def numpy_ab_soft_encoding(ab):
  """(soft targets [..., 313], squared distances [..., 313]) of ab values: the 5 nearest of the
  313 bins weighted by a Gaussian of sigma 5, normalised (colorization's NNEncLayer), in NumPy."""
  import numpy as np
  from mim_jax.targets import ab_bins
  centers = ab_bins.hull_points().astype(np.float64)
  d2 = ((np.asarray(ab, np.float64)[..., None, :] - centers) ** 2).sum(-1)
  soft = np.zeros_like(d2)
  for idx in np.ndindex(d2.shape[:-1]):
    near = np.argsort(d2[idx])[:5]
    g = np.exp(-d2[idx][near] / 50.0)
    soft[idx + (near,)] = g / g.sum()
  return soft, d2


def numpy_log_softmax(z):
  import numpy as np
  z = np.asarray(z, np.float64)
  z = z - z.max(-1, keepdims=True)
  return z - np.log(np.exp(z).sum(-1, keepdims=True))


# ----------------------------------------------------------------------------------------------
# Tiny test videos (PyAV, in the test extra): frame i is a solid colour that encodes i.


def frame_colour(i):
  import numpy as np
  return np.array([i * 8, 255 - i * 8, (i * 37) % 256], np.uint8)


def write_video(path, n, size=32):
  """An mpeg4 file of ``n`` solid frames of ``size`` px, frame i coloured `frame_colour(i)`."""
  import av
  import numpy as np
  with av.open(str(path), "w") as c:
    stream = c.add_stream("mpeg4", rate=10)
    stream.width = stream.height = size
    stream.pix_fmt = "yuv420p"
    for i in range(n):
      frame = np.broadcast_to(frame_colour(i), (size, size, 3)).copy()
      for p in stream.encode(av.VideoFrame.from_ndarray(frame, format="rgb24")):
        c.mux(p)
    for p in stream.encode():
      c.mux(p)


def frame_numbers(clip):
  """The frame number each decoded solid frame of ``clip`` [..., H, W, 3] encodes (nearest
  colour): an int array of the leading shape."""
  import numpy as np
  table = np.stack([frame_colour(i) for i in range(32)]).astype(float)
  means = clip.reshape(clip.shape[:-3] + (-1, 3)).mean(-2)
  return np.argmin(((means[..., None, :] - table) ** 2).sum(-1), axis=-1)
