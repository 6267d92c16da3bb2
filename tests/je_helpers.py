"""Tiny configs and checks shared by the joint-embedding methods' tests (test_joint_embedding.py
runs them for every method in JE_METHODS; each method's own file tests its loss by hand)."""
import jax
import jax.numpy as jnp

from helpers import apply_overrides, load_config

# Every joint-embedding method with a config: the shared tests run for each.
JE_METHODS = ("simclr", "moco", "mocov3", "byol", "simsiam", "barlow_twins", "vicreg", "dino",
              "instdisc")


def tiny_je_config(method: str, preset: str = "", **overrides):
  """configs/<method>.py's `preset` (default: the embedded-data one; another preset is put on
  the embedded data) with a ResNet-10 (one BasicBlock per stage, CIFAR stem) at width 0.125
  (8 stem channels), 16 px crops, batch 16, 4 steps, small heads and no evaluators."""
  c = load_config(method, preset)
  if preset:
    c.input.data.update(name="embedded", dir="", holdout_per_class=100)
  if c.model.get("name") == "resnet":
    c.model.depth = 10
  c.model.width = 0.125
  c.input.image_size = 16
  c.input.batch_size = 16
  c.total_steps, c.ckpt_every, c.log_every, c.keep_ckpts = 4, 2, 1, 5
  c.optim.warmup_epochs = 0.0
  for name in c.evals:
    c.evals[name].enabled = False
  shrink_heads(c[c.method])
  return apply_overrides(c, overrides)


def shrink_heads(block) -> None:
  """Every width-like key of a method block (dims, layers) at most 32."""
  for k in list(block.keys()):
    v = block[k]
    if k.endswith("_dim") and isinstance(v, int):
      block[k] = min(v, 32)
    elif k.endswith("layers") and isinstance(v, (list, tuple)) and v and isinstance(v[0], (list, tuple)):
      block[k] = tuple((min(int(w), 32), b, n) for w, b, n in v)


def method_and_state(config, batch: int = 8, seed: int = 0, jit: bool = False):
  """(method, params, method state, preprocessed views of a random uint8 batch); `jit`
  compiles the initialisation and the preprocessing (faster for the larger methods)."""
  from mim_jax import methods
  m = methods.get(config)
  size = config.input.image_size
  rng = jax.random.PRNGKey(seed)
  wrap = jax.jit if jit else (lambda f: f)
  variables = wrap(m.init_variables)(rng, jnp.zeros((2, size, size, 3)))
  state = m.initial_state(variables)
  images = jax.random.randint(jax.random.fold_in(rng, 1), (batch, size, size, 3), 0, 256).astype(jnp.uint8)
  views = wrap(lambda r, x: m.preprocess(r, x, config.input, True))(jax.random.fold_in(rng, 2), images)
  return m, variables["params"], state, views
