"""The ViT: parameter counts of the paper models, position embeddings, dtypes, remat."""
import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from mim_jax.models import vit


def count(tree):
  return sum(int(np.prod(x.shape)) for x in jax.tree.leaves(tree))


def test_mae_vit_base_16_has_the_official_parameter_count():
  # timm ViT-B/16 without head is 85,798,656 with a learned pos_embed (197*768 = 151,296);
  # MAE's pos_embed is a fixed buffer, so 85,647,360 trainable parameters.
  m = vit.ViT("base", patch_size=16, image_size=224)
  shapes = jax.eval_shape(m.init, jax.random.PRNGKey(0), jnp.zeros((1, 224, 224, 3)))
  assert count(shapes) == 85_647_360


def test_simmim_vit_base_parameter_layout():
  m = vit.ViT("base", patch_size=16, image_size=224, pos_embed="none", rel_pos_bias="shared",
              qkv_bias="qv", init_values=0.1, init_style="beit", use_mask_token=True)
  shapes = jax.eval_shape(m.init, jax.random.PRNGKey(0), jnp.zeros((1, 224, 224, 3)))["params"]
  assert shapes["rel_pos_bias"]["table"].shape == ((2 * 14 - 1) ** 2 + 3, 12)
  blk = shapes["encoder"]["block00"]
  assert "qkv_bias" not in blk["attn"] and blk["attn"]["q_bias"].shape == (768,)
  assert blk["gamma_1"].shape == (768,)
  assert shapes["mask_token"].shape == (1, 1, 768)


def test_sincos_matches_formula():
  d, g = 8, 3
  emb = vit.sincos_2d(d, g, cls_token=True)
  assert emb.shape == (1 + g * g, d)
  np.testing.assert_array_equal(emb[0], 0)
  omega = 1.0 / 10000 ** (np.arange(d // 4) / (d / 4))
  for i in range(g):       # row (h)
    for j in range(g):     # column (w)
      e = emb[1 + i * g + j]
      expect = np.concatenate([np.sin(j * omega), np.cos(j * omega), np.sin(i * omega), np.cos(i * omega)])
      np.testing.assert_allclose(e, expect, rtol=1e-6, atol=1e-7)


def test_relative_position_index_is_translation_invariant_with_cls_entries():
  g = 3
  idx = vit.relative_position_index(g)
  num = (2 * g - 1) ** 2 + 3
  assert idx[0, 0] == num - 1 and idx[0, 1] == num - 3 and idx[1, 0] == num - 2
  pos = [(i, j) for i in range(g) for j in range(g)]
  seen = {}
  for a, (ia, ja) in enumerate(pos):
    for b, (ib, jb) in enumerate(pos):
      key = (ia - ib, ja - jb)
      assert seen.setdefault(key, idx[1 + a, 1 + b]) == idx[1 + a, 1 + b]
  assert len(set(seen.values())) == (2 * g - 1) ** 2


def test_beit_init_rescales_proj_and_fc2_by_depth():
  m = vit.ViT("mu", depth=3, patch_size=4, image_size=8, init_style="beit")
  p = m.init(jax.random.PRNGKey(0), jnp.zeros((1, 8, 8, 3)))["params"]["encoder"]
  # N(0, .02) cut at +-.02 like SimMIM's encoder (std 0.5396 * .02), then / sqrt(2 * layer)
  trunc_std = 0.02 * 0.5396
  for i in range(3):
    w = np.asarray(p[f"block{i:02d}"]["mlp"]["fc2"]["kernel"]) * math.sqrt(2 * (i + 1))
    assert np.max(np.abs(w)) <= 0.02 + 1e-7
    assert abs(float(np.std(w)) - trunc_std) < 0.1 * trunc_std
    fc1 = np.asarray(p[f"block{i:02d}"]["mlp"]["fc1"]["kernel"])
    assert np.max(np.abs(fc1)) <= 0.02 + 1e-7 and abs(float(np.std(fc1)) - trunc_std) < 0.1 * trunc_std


def test_bf16_compute_close_to_fp32_and_params_stay_fp32():
  x = jax.random.normal(jax.random.PRNGKey(1), (2, 16, 16, 3))
  m32 = vit.ViT("mu", patch_size=4, image_size=16)
  m16 = vit.ViT("mu", patch_size=4, image_size=16, dtype=jnp.bfloat16)
  p = m32.init(jax.random.PRNGKey(0), x)
  assert all(l.dtype == jnp.float32 for l in jax.tree.leaves(m16.init(jax.random.PRNGKey(0), x)))
  a, b = m32.apply(p, x), m16.apply(p, x)
  assert float(jnp.max(jnp.abs(a - b))) < 0.1
  assert float(jnp.max(jnp.abs(a - b))) > 0  # bf16 really ran


def test_remat_gives_same_values_and_grads():
  x = jax.random.normal(jax.random.PRNGKey(1), (2, 16, 16, 3))
  m = vit.ViT("mu", patch_size=4, image_size=16)
  mr = vit.ViT("mu", patch_size=4, image_size=16, remat=True)
  p = m.init(jax.random.PRNGKey(0), x)
  f = lambda mod: jax.value_and_grad(lambda q: jnp.sum(mod.apply(q, x) ** 2))(p)  # noqa: E731
  (v1, g1), (v2, g2) = f(m), f(mr)
  np.testing.assert_allclose(v1, v2, rtol=1e-6)
  jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-6), g1, g2)


def test_keep_ids_selects_tokens_and_mask_token_replaces():
  x = jax.random.normal(jax.random.PRNGKey(1), (2, 16, 16, 3))
  m = vit.ViT("mu", patch_size=4, image_size=16, use_mask_token=True)
  p = m.init(jax.random.PRNGKey(0), x)
  keep = jnp.asarray([[0, 5, 9], [15, 1, 2]])
  assert m.apply(p, x, keep_ids=keep).shape == (2, 4, 64)
  full = jnp.ones((2, 16))
  # all patches masked: the images no longer matter
  y1 = m.apply(p, x, mask=full)
  y2 = m.apply(p, x * 3 + 1, mask=full)
  np.testing.assert_allclose(y1, y2, rtol=1e-5, atol=1e-5)


def test_unknown_variant_and_bad_pooling_errors():
  with pytest.raises(ValueError, match="unknown ViT variant"):
    vit.variant("gigantic")
  with pytest.raises(ValueError, match="pooling"):
    vit.pool(jnp.zeros((1, 2, 3)), "max")


def test_intermediates_give_attention_maps_and_block_outputs():
  m = vit.ViT("mu", depth=2, patch_size=4, image_size=16, rel_pos_bias="shared", pos_embed="none")
  x = jax.random.normal(jax.random.PRNGKey(0), (2, 16, 16, 3))
  p = m.init(jax.random.PRNGKey(1), x)
  out, inter = m.apply(p, x, mutable=["intermediates"])
  np.testing.assert_array_equal(out, m.apply(p, x))          # asking changes nothing
  enc = inter["intermediates"]["encoder"]
  assert len(enc["block_outputs"]) == 2 and enc["block_outputs"][1].shape == (2, 17, 64)
  att = enc["block00"]["attn"]["attention"][0]
  assert att.shape == (2, 2, 17, 17)
  np.testing.assert_allclose(att.sum(-1), 1.0, rtol=1e-5)


def test_sown_attention_maps_are_the_ones_the_layer_applies():
  a = vit.Attention(num_heads=2, qkv_bias="qkv")
  y = jax.random.normal(jax.random.PRNGKey(0), (2, 5, 8))
  pa = a.init(jax.random.PRNGKey(1), y)
  out, inter = a.apply(pa, y, mutable=["intermediates"])
  probs = inter["intermediates"]["attention"][0]
  w = pa["params"]
  v = (y @ w["qkv_kernel"] + w["qkv_bias"])[..., 16:].reshape(2, 5, 2, 4)
  o = jnp.einsum("bhqk,bkhd->bqhd", probs, v).reshape(2, 5, 8)
  o = o @ w["proj"]["kernel"] + w["proj"]["bias"]
  np.testing.assert_allclose(out, o, rtol=1e-5, atol=1e-5)


def test_timm_trunc_normal_has_no_weight_at_its_far_bound():
  """timm's trunc_normal_(std=.02) is in practice N(0, .02^2) (bounds +-2 absolute, 100 std out).
  jax.random.truncated_normal between such bounds puts its lowest uniform draw on the bound
  (a -2.0 weight, 100 std out, about once in 2^23 draws: this key and size hit one); the
  clipped normal does not."""
  key, n = jax.random.PRNGKey(0), 20_000_000
  flawed = jax.random.truncated_normal(key, -100.0, 100.0, (n,))
  assert float(jnp.min(flawed)) < -99.0
  x = vit.timm_trunc_normal(0.02)(key, (n,))
  assert float(jnp.max(jnp.abs(x))) < 0.15 and abs(float(jnp.std(x)) - 0.02) < 1e-4
