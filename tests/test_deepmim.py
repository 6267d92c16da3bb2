"""DeepMIM: the summed loss against a hand computation from the intermediate block outputs,
gradients through the extra decoders, the official recipe and learning on the embedded data."""
import json
import os

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from helpers import load_config, tiny_config
from mim_jax import masking, methods, train


def small_config(blocks=(1, 2), weights=(0.5, 2.0, 1.0)):
  c = tiny_config("deepmim")
  c.model.depth = 3
  c.mae.decoder = dict(width=32, depth=1, heads=2)
  c.deepmim.update(blocks=blocks, loss_weights=weights, decoder=dict(width=32, depth=1, heads=2))
  c.evals = {}
  return c


def setup(c, batch=2):
  m = methods.get(c)
  k1, k2 = jax.random.split(jax.random.PRNGKey(0))
  images = jax.random.normal(k1, (batch, 32, 32, 3))
  return m, images, jax.jit(m.init)(k2, images)


def np_norm_pix_target(images, p):
  """MAE's patchify (rows ordered p, p, C) and per-patch standardisation, unbiased variance."""
  b, h, w, ch = images.shape
  x = images.reshape(b, h // p, p, w // p, p, ch).transpose(0, 1, 3, 2, 4, 5).reshape(b, -1, p * p * ch)
  mean = x.mean(-1, keepdims=True)
  var = x.var(-1, ddof=1, keepdims=True)
  return (x - mean) / np.sqrt(var + 1e-6)


def test_loss_is_the_weighted_sum_of_mae_losses_from_the_intermediate_blocks():
  c = small_config()
  m, images, params = setup(c)
  rng = jax.random.PRNGKey(7)
  loss, aux = jax.jit(lambda p, x, r: m.loss(p, {}, x, r, 0))(params, images, rng)

  # By hand: MAE's mask from the same key, the encoder's block outputs (BEFORE its final norm)
  # into the extra decoders, its final-norm output into the main decoder.
  sm = masking.random_shuffle_mask(rng, 2, 64, 0.75)
  enc = lambda p, x, k: m.encoder.apply({"params": p}, x, keep_ids=k, mutable=["intermediates"])  # noqa: E731
  latent, inter = jax.jit(enc)(params["encoder"], images, sm.keep_ids)
  outs = inter["intermediates"]["encoder"]["block_outputs"]
  assert len(outs) == 3 and outs[0].shape == (2, 1 + 16, 64)
  aux_params = params["aux_decoders"]
  assert set(aux_params) == {"block1", "block2"}
  dec = jax.jit(lambda p, x, r: m.decoder.apply({"params": p}, x, r))   # same architecture
  preds = [dec(aux_params["block1"], outs[0], sm.restore_ids),
           dec(aux_params["block2"], outs[1], sm.restore_ids),
           dec(params["decoder"], latent, sm.restore_ids)]
  target = np_norm_pix_target(np.asarray(images, np.float64), 4)
  mask = np.asarray(sm.mask, np.float64)
  assert mask.sum() == 2 * 48
  per = [((np.asarray(p, np.float64) - target) ** 2).mean(-1) for p in preds]
  each = [(e * mask).sum() / mask.sum() for e in per]
  want = 0.5 * each[0] + 2.0 * each[1] + 1.0 * each[2]
  np.testing.assert_allclose(float(loss), want, rtol=2e-5)
  np.testing.assert_allclose([float(aux["loss_block1"]), float(aux["loss_block2"]),
                              float(aux["loss_final"])], each, rtol=2e-5)


def test_each_decoder_trains_itself_and_the_blocks_below_its_input():
  # The gradient of each decoder's loss (one backward pass each): the block-1 decoder reaches
  # encoder block 1 and its own weights, never the later blocks, the final norm or the other
  # decoders; the block-2 decoder reaches blocks 1-2; the main decoder everything but them.
  c = small_config()
  m, images, params = setup(c)

  def each(p):
    _, aux = m.loss(p, {}, images, jax.random.PRNGKey(3), 0)
    return jnp.stack([aux["loss_block1"], aux["loss_block2"], aux["loss_final"]])

  jac = jax.jit(jax.jacrev(each))(params)
  reach = lambda t, i: float(sum(jnp.sum(jnp.abs(x[i])) for x in jax.tree.leaves(t))) > 0  # noqa: E731
  enc = jac["encoder"]["encoder"]
  parts = {"patch_embed": jac["encoder"]["patch_embed"], "block00": enc["block00"],
           "block01": enc["block01"], "block02": enc["block02"], "norm": enc["norm"],
           "dec1": jac["aux_decoders"]["block1"], "dec2": jac["aux_decoders"]["block2"],
           "main": jac["decoder"]}
  got = [{k for k, t in parts.items() if reach(t, i)} for i in range(3)]
  assert got[0] == {"patch_embed", "block00", "dec1"}
  assert got[1] == {"patch_embed", "block00", "block01", "dec2"}
  assert got[2] == {"patch_embed", "block00", "block01", "block02", "norm", "main"}


def test_bad_block_settings_name_the_fix():
  with pytest.raises(ValueError, match="loss_weights needs 3"):
    methods.get(small_config(weights=(1.0, 1.0)))
  with pytest.raises(ValueError, match="below the depth 3"):
    methods.get(small_config(blocks=(1, 3)))


def test_imagenet_preset_is_the_official_recipe():
  c = load_config("deepmim", "imagenet")
  assert tuple(c.deepmim.blocks) == (6, 8, 10) and tuple(c.deepmim.loss_weights) == (1, 1, 1, 1)
  assert dict(c.deepmim.decoder) == dict(c.mae.decoder) == {"width": 512, "depth": 4, "heads": 16}
  assert (c.mae.mask_ratio, c.mae.norm_pix_loss, c.input.image_size, c.model.patch_size) == (0.75, True, 224, 16)
  assert (c.optim.b2, c.optim.weight_decay, c.optim.warmup_epochs, c.total_epochs) == (0.95, 0.05, 40, 1600)
  assert c.input.batch_size == 4096 and c.optim.base_lr == 1.5e-4
  m = methods.get(c)
  p = jax.eval_shape(m.init, jax.random.PRNGKey(0), jnp.zeros((1, 224, 224, 3)))
  assert set(p["aux_decoders"]) == {"block6", "block8", "block10"}
  sizes = [sum(x.size for x in jax.tree.leaves(t)) for t in
           (p["decoder"], *p["aux_decoders"].values())]
  assert len(set(sizes)) == 1     # four identical decoders


def test_loss_falls_on_embedded_data(tmp_path):
  c = small_config(blocks=(1,), weights=(1.0, 1.0))
  c.model.depth = 2
  c.total_steps, c.ckpt_every, c.log_every = 6, 1000, 1
  c.optim.update(base_lr=3e-3, lr_batch_divisor=c.input.batch_size, warmup_epochs=0.0)
  train.train_and_evaluate(c, str(tmp_path), devices=jax.devices()[:1], progress=False)
  with open(os.path.join(tmp_path, "metrics.jsonl")) as f:
    recs = {r["step"]: r for r in map(json.loads, f) if "loss" in r}
  assert recs[6]["loss"] < 0.85 * recs[1]["loss"], {s: r["loss"] for s, r in recs.items()}
  assert recs[6]["aux/loss_block1"] < recs[1]["aux/loss_block1"]
