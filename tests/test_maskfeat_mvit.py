"""MaskFeat on an MViTv2 (SlowFast's MaskMViT): the loss against a hand computation (mask token
at the patch grid, HOG of 2x2 cells per output token, head on the last block's tokens), the
official initialisation, the presets' geometry and recipe, a sharded run equal to one device's
and the fine-tuning hooks."""
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from helpers import apply_overrides, load_config, losses
from mim_jax import methods, train
from test_maskfeat import numpy_patch_targets

pytestmark = pytest.mark.usefixtures("compilation_cache")


def tiny_mvit_config(**overrides):
  """mvit_cifar10 on the embedded data, shrunk: 2 blocks (widths 8 -> 16) at 32 px, a 16x16
  patch grid pooled once to the 8x8 output grid (stride 4, HOG cells of 2 pixels)."""
  c = load_config("maskfeat", "mvit_cifar10")
  c.input.data.update(name="embedded", holdout_per_class=100, dir="")
  c.model.update(embed_dim=8, stage_blocks=(1, 1), stage_strides=(2,))
  c.input.batch_size = 16
  c.total_steps = 6
  c.log_every = 1
  c.ckpt_every = 3
  c.keep_ckpts = 5
  c.evals = {}
  return apply_overrides(c, overrides)


def test_loss_equals_hand_computation(monkeypatch):
  m = methods.get(tiny_mvit_config())
  assert (m.grid, m.patch, m.head.out_dim, m.head.has_cls) == (8, 4, 108, True)
  images = jnp.asarray(np.random.RandomState(2).randn(2, 32, 32, 3).astype(np.float32))
  params = jax.jit(m.init)(jax.random.PRNGKey(0), images)
  params["head"]["proj"]["bias"] = jnp.asarray(np.random.RandomState(3).randn(108), jnp.float32)
  mask = np.zeros((2, 64), np.int32)                  # on the 8x8 output grid
  mask[0, [0, 1, 8, 9, 10, 17]] = 1
  mask[1, 30:45] = 1
  monkeypatch.setattr(m, "make_mask", lambda rng, b: jnp.asarray(mask))
  loss, aux = jax.jit(m.loss)(params, {}, images, jax.random.PRNGKey(1), 0)

  enc = jax.jit(lambda p, x, mask: m.encoder.apply({"params": p}, x, mask=mask))
  tokens = np.asarray(enc(params["encoder"], images, jnp.asarray(mask)))
  assert tokens.shape == (2, 1 + 64, 16)
  w = np.asarray(params["head"]["proj"]["kernel"], np.float64)
  b = np.asarray(params["head"]["proj"]["bias"], np.float64)
  pred = tokens[:, 1:].astype(np.float64) @ w + b                   # cls token dropped
  # HOG of 2-pixel cells, 2x2 cells per stride-4 token, in the official (channel, bin, row,
  # column) order.
  target = np.stack([numpy_patch_targets(np.asarray(images[i]), 4, 9, 2) for i in range(2)])
  rows = [(pred[i, j] - target[i, j]) ** 2 for i in range(2) for j in range(64) if mask[i, j]]
  np.testing.assert_allclose(float(loss), np.mean(np.stack(rows)), rtol=1e-5)
  assert float(aux["mask_ratio"]) == pytest.approx(21 / 128)

  # The mask token enters at the 16x16 patch grid: the 8x8 mask upsampled by nearest
  # neighbour (each output token covers 2x2 patches) gives the same tokens.
  fine = np.stack([np.kron(r.reshape(8, 8), np.ones((2, 2))).reshape(-1) for r in mask])
  np.testing.assert_allclose(np.asarray(enc(params["encoder"], images, jnp.asarray(fine))), tokens,
                             atol=1e-6)
  plain = np.asarray(enc(params["encoder"], images, jnp.zeros((2, 64))))
  assert not np.allclose(plain, tokens)


def test_official_init_is_slowfasts():
  m = methods.get(tiny_mvit_config())
  p = jax.jit(m.init)(jax.random.PRNGKey(0), jnp.zeros((2, 32, 32, 3)))
  e = p["encoder"]
  b1 = e["block01"]
  for bias in (b1["attn"]["qkv"]["bias"], b1["attn"]["proj"]["bias"], b1["mlp"]["fc1"]["bias"],
               b1["proj"]["bias"], b1["norm1"]["bias"], b1["attn"]["norm_k"]["bias"]):
    np.testing.assert_array_equal(bias, np.float32(0.02))          # MViT._init_weights
  np.testing.assert_array_equal(b1["attn"]["norm_q"]["scale"], 1.0)
  np.testing.assert_array_equal(e["norm"]["bias"], 0.0)             # the head's LayerNorm
  np.testing.assert_array_equal(p["head"]["proj"]["bias"], 0.0)
  # Linear and Conv weights, the pooling convolutions included (Conv3d in SlowFast), N(0, .02).
  pools = np.concatenate([np.ravel(e[f"block{i:02d}"]["attn"][f"pool_{n}"]["kernel"])
                          for i in range(2) for n in "qkv"])
  assert np.std(pools) == pytest.approx(0.02, rel=0.15)              # was U(+-1/3)
  kernels = np.concatenate([np.ravel(b1["attn"]["qkv"]["kernel"]), np.ravel(b1["mlp"]["fc1"]["kernel"]),
                            np.ravel(p["head"]["proj"]["kernel"]), np.ravel(e["patch_embed"]["proj"]["kernel"])])
  assert np.std(kernels) == pytest.approx(0.02, rel=0.05)
  bound = 1 / np.sqrt(3 * 3 * 3)                       # the patch Conv2d's default bias
  pb = np.asarray(e["patch_embed"]["proj"]["bias"])
  assert np.abs(pb).max() <= bound and np.abs(pb).max() > bound / 2
  assert np.std(np.asarray(e["mask_token"])) == pytest.approx(0.02, rel=0.6)


def test_presets_predict_at_the_official_geometry():
  m = methods.get(load_config("maskfeat", "imagenet_mvitv2_s"))
  enc = m.encoder
  assert (len(enc.specs), enc.embed_dim, enc.cls_token, enc.dim_mul_in_att) == (16, 96, True, True)
  assert [s.q_stride for s in enc.specs] == [1, 2, 1, 2] + [1] * 12          # [14, 1, 1, 1]
  assert [s.grid_q for s in enc.specs][-3:] == [14, 14, 14] and enc.specs[-1].dim_out == 768
  # The 14x14 feature grid of stride 16: 78 masked at most in blocks >= 15, 2x2 HOG cells.
  assert (m.grid, m.patch, m.num_masking, m.min_block, m.head.out_dim) == (14, 16, 78, 15, 108)
  assert m.target(jnp.zeros((1, 224, 224, 3))).shape == (1, 196, 108)
  m = methods.get(load_config("maskfeat", "mvit_cifar10"))
  assert (m.grid, m.patch, m.num_masking, m.min_block, m.head.out_dim) == (8, 4, 26, 5, 108)
  assert [(s.grid_q, s.grid_kv) for s in m.encoder.specs] == [(16, 8), (8, 16), (8, 8), (8, 8), (8, 8)]


def test_imagenet_mvitv2_s_recipe_and_weight_decay():
  c = load_config("maskfeat", "imagenet_mvitv2_s")
  vit_c = load_config("maskfeat", "imagenet")
  assert c.optim.to_dict() == vit_c.optim.to_dict()                  # the image recipe
  assert (c.total_epochs, c.input.batch_size, c.input.image_size) == (300, 2048, 224)
  assert tuple(c.input.aug.crop_scale) == (0.5, 1.0) and c.maskfeat.to_dict() == vit_c.maskfeat.to_dict()
  assert (c.model.name, c.model.dtype, c.model.drop_path, c.pooling) == ("mvit", "bfloat16", 0.0, "cls")
  m = methods.get(c)
  shapes = jax.eval_shape(m.init, jax.random.PRNGKey(0), jnp.zeros((1, 224, 224, 3)))
  dm = m.decay_mask(shapes)
  e = dm["encoder"]
  # ZERO_WD_1D_PARAM with ZERO_DECAY_POS_CLS False: 2-D and larger decayed (cls and mask tokens,
  # relative position tables, pooling kernels), 1-D not.
  assert e["cls_token"] and e["mask_token"] and e["block00"]["attn"]["rel_pos_h"]
  assert e["block00"]["attn"]["pool_q"]["kernel"] and e["block01"]["proj"]["kernel"]
  assert not e["block00"]["attn"]["qkv"]["bias"] and not e["block00"]["attn"]["norm_q"]["scale"]
  assert dm["head"]["proj"]["kernel"] and not dm["head"]["proj"]["bias"]


def test_sharded_run_learns_and_equals_one_device(tmp_path):
  # One run on 8 fake devices (data 2 x fsdp 4, parameters sharded), whose loss must fall, and
  # the run on one device, which must give the same losses up to float summation order. (Exact
  # resume is backbone-agnostic: tests/test_contract.py; test_multiprocess_resume.py restores a
  # checkpoint onto another device layout.)
  c = tiny_mvit_config(total_steps=8, ckpt_every=4, mesh=(("data", 2), ("fsdp", 4)),
                       sharding_rules=((".*", "fsdp"),))
  c.optim.update(base_lr=5e-3, warmup_epochs=0.1)
  eight = jax.devices()[:8]
  a, one = str(tmp_path / "a"), str(tmp_path / "one")
  train.train_and_evaluate(c, a, devices=eight, progress=False)
  la = losses(a)
  assert np.mean([la[7], la[8]]) < 0.98 * np.mean([la[1], la[2]]), la
  c.mesh, c.sharding_rules = (("data", -1), ("fsdp", 1)), ((".*", "replicate"),)
  train.train_and_evaluate(c, one, devices=jax.devices()[:1], progress=False)
  l1 = losses(one)
  assert sorted(l1) == list(range(1, 9))
  np.testing.assert_allclose([l1[s] for s in range(1, 9)], [la[s] for s in range(1, 9)], rtol=1e-4)


def test_finetunes_a_maskfeat_mvit_run_by_the_official_rules(tmp_path):
  """configs/finetune.py on a MaskFeat-MViT run, through the backbone's fine-tuning hooks: the
  pretrained encoder loads (its relative position tables resized for another image size), the head starts at N(0, .02^2), the cls token and tables are
  weight-decayed (1-D parameters are not), drop path draws from the rng, and it trains."""
  from mim_jax.models import mvit
  pre = tiny_mvit_config(total_steps=2, ckpt_every=2)
  pre_dir = str(tmp_path / "pre")
  train.train_and_evaluate(pre, pre_dir, devices=jax.devices()[:1], progress=False)
  c = load_config("finetune", "resnet18")          # embedded data, the CNN recipe's optimiser
  c.model = pre.model.copy_and_resolve_references()
  c.model.update(drop_path=0.1)
  c.input.update(image_size=16, batch_size=16)     # another size: the tables are resized
  c.total_steps, c.ckpt_every, c.log_every = 2, 2, 1
  for name in c.evals:
    c.evals[name].enabled = False
  c.finetune.pretrained = pre_dir
  tr = train.Trainer.create(c, devices=jax.devices()[:1])
  saved = train.Trainer.from_workdir(pre_dir, devices=jax.devices()[:1])
  got, want = tr.state["params"]["encoder"], saved.state["params"]["encoder"]
  np.testing.assert_array_equal(got["patch_embed"]["proj"]["kernel"], want["patch_embed"]["proj"]["kernel"])
  np.testing.assert_array_equal(got["cls_token"], want["cls_token"])
  tables = [(v.shape, w.shape) for (k, v), w in zip(jax.tree_util.tree_flatten_with_path(got)[0],
                                                    jax.tree.leaves(want))
            if k[-1].key in ("rel_pos_h", "rel_pos_w")]
  assert any(a != b for a, b in tables)            # resized (merging would refuse a mismatch)
  std = float(np.std(np.asarray(tr.state["params"]["head"]["fc"]["kernel"])))
  assert 0.012 < std < 0.03 and mvit.FINETUNE_HEAD_STD == 0.02
  mask = tr.method.decay_mask(tr.state["params"])
  assert mask["encoder"]["cls_token"] and not mask["encoder"]["norm"]["scale"]
  before = np.asarray(got["block00"]["attn"]["qkv"]["kernel"])
  for _ in range(2):
    tr.state, m = tr.step_fn(tr.state, tr.next_batch())
  assert np.isfinite(float(m["loss"]))
  assert not np.array_equal(np.asarray(tr.state["params"]["encoder"]["block00"]["attn"]["qkv"]["kernel"]), before)
