"""MViTv2 (mim_jax/models/mvit.py) against facebookresearch/mvit: the per-block geometry of
MViTv2-T / -S at 224 px, parameter counts of the released models, the decomposed relative
position bias and whole blocks against NumPy computations written from the official
definitions, the residual pooling connection, the mask token, the registry contract and the
official layer ids for layer-wise lr decay. torch is not needed."""
import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from mim_jax import models, optim
from mim_jax.models import mvit


def tiny_cfg(**kw):
  """A 2-block MViT at 16 px: a 3x3/2 patch embedding (8x8 grid), widths 8 -> 16."""
  base = dict(embed_dim=8, num_heads=1, stage_blocks=(1, 1), stage_strides=(2,), patch_kernel=3,
              patch_stride=2, patch_padding=1, kv_stride=2, cls_token=True)
  base.update(kw)
  return mvit.default_config(**base)


def init(model, x, **kw):
  """model.init under jit (op-by-op initialisation compiles every primitive on its own)."""
  return jax.jit(lambda k, x: model.init(k, x, **kw))(jax.random.PRNGKey(0), x)


@jax.jit
def _perturb(tree, key):
  leaves, treedef = jax.tree_util.tree_flatten(tree)
  keys = jax.random.split(key, len(leaves))
  return jax.tree_util.tree_unflatten(
      treedef, [p + 0.3 * jax.random.normal(k, p.shape, p.dtype) for p, k in zip(leaves, keys)])


def randomize(tree, seed=0):
  """Every leaf replaced by N(leaf, 0.3^2) draws, so zero biases and unit norms matter."""
  return _perturb(tree, jax.random.PRNGKey(seed))


# ---------------------------------------------------------------------------------------------
# Geometry and size of the official variants (shapes only: jax.eval_shape, nothing allocated).

def _pooling_shapes(name):
  """Per block: (q grid, kv grid, heads, head dim, output tokens, output width) read from the
  shapes of an MViTv2 forward pass at 224 px (batch 1), the pooling convolutions' outputs
  [1, heads, 1 frame, g, g, head dim] captured by flax."""
  model = mvit.from_config(mvit.default_config(variant=name), 224)
  x = jax.ShapeDtypeStruct((1, 224, 224, 3), jnp.float32)
  variables = jax.eval_shape(model.init, jax.random.PRNGKey(0), x)
  _, state = jax.eval_shape(
      lambda v, x: model.apply(v, x, capture_intermediates=True, mutable=["intermediates"]),
      variables, x)
  inter = state["intermediates"]
  out = []
  for i in range(len(model.specs)):
    attn = inter[f"block{i:02d}"]["attn"]
    q, k = attn["pool_q"]["__call__"][0].shape, attn["pool_k"]["__call__"][0].shape
    y = inter[f"block{i:02d}"]["__call__"][0].shape
    assert q[0] == k[0] == q[2] == k[2] == 1 and q[1] == k[1] and q[-1] == k[-1]
    out.append((q[3], k[3], q[1], q[-1], y[1], y[2]))
  assert inter["__call__"][0].shape == (1,) + out[-1][-2:]     # the final norm's output
  return out


# Hand-derived from configs/MVITv2_T.yaml and MVITv2_S.yaml: a 56x56 patch grid; query stride
# 2 at the stage transitions; kv stride 4 divided by every query stride so far, applied to
# the block's input (so 28x28 keys in the first block of stages 2 and 3); widths and heads
# doubled at the transitions (DIM_MUL_IN_ATT: in the transition block itself).
STAGE1 = [(56, 14, 1, 96, 3136, 96)]
STAGE2 = [(28, 28, 2, 96, 784, 192), (28, 14, 2, 96, 784, 192)]
STAGE3_FIRST = (14, 28, 4, 96, 196, 384)
STAGE3 = (14, 14, 4, 96, 196, 384)
STAGE4 = [(7, 14, 8, 96, 49, 768), (7, 7, 8, 96, 49, 768)]


@pytest.mark.parametrize("name,stage3", [("tiny", 5), ("small", 11)])
def test_pooling_attention_shapes_per_stage_at_224(name, stage3):
  expected = STAGE1 + STAGE2 + [STAGE3_FIRST] + [STAGE3] * (stage3 - 1) + STAGE4
  assert _pooling_shapes(name) == expected


def test_block_plan_of_the_large_model_expands_in_the_mlp():
  # configs/test/MVITv2_L_test.yaml: DIM_MUL_IN_ATT False, so the block before a transition
  # widens in its MLP (attention width 144, output 288) and the transition block pools.
  specs = mvit.from_config(mvit.default_config(variant="large"), 224).specs
  assert len(specs) == 48
  assert (specs[1].dim, specs[1].att_dim, specs[1].dim_out, specs[1].heads) == (144, 144, 288, 2)
  assert (specs[2].dim, specs[2].att_dim, specs[2].heads, specs[2].q_stride) == (288, 288, 4, 2)
  assert [s.grid_q for s in (specs[1], specs[2], specs[8], specs[44], specs[47])] == [56, 28, 14, 7, 7]
  assert specs[-1].dim_out == 1152


# The released models' sizes with the 1000-class head (timm's model cards for the official
# checkpoints: 24.2M, 34.9M, 51.5M, 218.0M; mvitv2_small's float32 safetensors is 140 MB).
# The paper's Table 1 lists 34.5M for S, 51.2M for B and 217.6M for L; the code and the
# checkpoints it released have the counts below.
RELEASED_PARAMS = {"tiny": 24_173_320, "small": 34_870_216, "base": 51_472_744,
                   "large": 217_992_952}


@pytest.mark.parametrize("name", sorted(RELEASED_PARAMS))
def test_parameter_counts_equal_the_released_models(name):
  model = mvit.from_config(mvit.default_config(variant=name), 224)
  head = model.num_features * 1000 + 1000
  assert mvit.param_count(model) + head == RELEASED_PARAMS[name]
  assert round((mvit.param_count(model) + head) / 1e6, 1) == {"tiny": 24.2, "small": 34.9,
                                                               "base": 51.5, "large": 218.0}[name]


# ---------------------------------------------------------------------------------------------
# The decomposed relative position bias.

# cal_rel_pos_spatial's index tables, by hand: dist(i, j) = i * max(k/q, 1) - j * max(q/k, 1)
# + (k - 1) * max(q/k, 1).
# q 4, k 2: i - 2 j + 2.   q 2, k 4: 2 i - j + 3.   q 3, k 3: i - j + 2.
HAND_DIST = {
    (4, 2): np.array([[2, 0], [3, 1], [4, 2], [5, 3]]),
    (2, 4): np.array([[3, 2, 1, 0], [5, 4, 3, 2]]),
    (3, 3): np.array([[2, 1, 0], [3, 2, 1], [4, 3, 2]]),
}


@pytest.mark.parametrize("qk", sorted(HAND_DIST))
def test_rel_pos_distances_scale_between_query_and_key_sizes(qk):
  np.testing.assert_array_equal(mvit.rel_pos_distances(*qk), HAND_DIST[qk])


@pytest.mark.parametrize("qk,has_cls", [((4, 2), True), ((2, 4), False), ((3, 3), True)])
def test_rel_pos_bias_equals_a_numpy_loop(qk, has_cls):
  qg, kg = qk
  heads, d = 2, 3
  rows = 2 * max(qg, kg) - 1
  rs = np.random.RandomState(qg * 10 + kg)
  s = 1 if has_cls else 0
  q = rs.randn(2, s + qg * qg, heads, d).astype(np.float32)
  rh = rs.randn(rows, d).astype(np.float32)
  rw = rs.randn(rows, d).astype(np.float32)
  got = np.asarray(mvit.rel_pos_bias(jnp.asarray(q), jnp.asarray(rh), jnp.asarray(rw), qg, kg, has_cls))
  dist = HAND_DIST[qk]
  ref = np.zeros((2, heads, s + qg * qg, s + kg * kg))
  for b in range(2):
    for h in range(heads):
      for qy in range(qg):
        for qx in range(qg):
          for ky in range(kg):
            for kx in range(kg):
              v = q[b, s + qy * qg + qx, h]
              ref[b, h, s + qy * qg + qx, s + ky * kg + kx] = (v @ rh[dist[qy, ky]]
                                                               + v @ rw[dist[qx, kx]])
  np.testing.assert_allclose(got, ref, rtol=1e-5, atol=1e-5)
  if has_cls:                            # nothing for the cls row and column
    assert np.all(got[:, :, 0] == 0) and np.all(got[:, :, :, 0] == 0)


# ---------------------------------------------------------------------------------------------
# Whole blocks against NumPy, from attention.py's definitions.

def np_ln(x, p):
  mu = x.mean(-1, keepdims=True)
  var = ((x - mu) ** 2).mean(-1, keepdims=True)
  return (x - mu) / np.sqrt(var + 1e-6) * p["scale"] + p["bias"]


def np_dwconv(img, w, stride):
  """Conv2d(groups=C, padding k // 2, no bias) of one [H, W, C] map, w [k, k, 1, C]."""
  k = w.shape[0]
  p = k // 2
  x = np.pad(img, ((p, p), (p, p), (0, 0)))
  g = (img.shape[0] + 2 * p - k) // stride + 1
  out = np.zeros((g, g, img.shape[-1]))
  for i in range(g):
    for j in range(g):
      out[i, j] = np.einsum("abc,abc->c", x[i * stride:i * stride + k, j * stride:j * stride + k],
                            w[:, :, 0])
  return out


def np_maxpool(img, stride):
  """MaxPool2d(stride + 1, stride, padding (stride + 1) // 2), -inf padding."""
  k, p = stride + 1, (stride + 1) // 2
  x = np.pad(img, ((p, p), (p, p), (0, 0)), constant_values=-np.inf)
  g = (img.shape[0] + 2 * p - k) // stride + 1
  return np.array([[x[i * stride:i * stride + k, j * stride:j * stride + k].max((0, 1))
                    for j in range(g)] for i in range(g)])


def np_gelu(x):
  return 0.5 * x * (1 + np.vectorize(math.erf)(x / math.sqrt(2)))


def np_block(x, p, sp, has_cls, in_att, residual_pooling=True):
  """MultiScaleBlock.forward for x [B, N, dim] (float64)."""
  s = 1 if has_cls else 0
  b = x.shape[0]
  h, d = sp.heads, sp.att_dim // sp.heads
  a = p["attn"]
  xn = np_ln(x, p["norm1"])
  qkv = (xn @ a["qkv"]["kernel"] + a["qkv"]["bias"]).reshape(b, -1, 3, h, d)

  def pool(t, name, stride, g_out):        # t [N, d] of one image and head
    img = t[s:].reshape(sp.grid_in, sp.grid_in, d)
    out = np_dwconv(img, a[f"pool_{name}"]["kernel"], stride).reshape(g_out * g_out, d)
    return np_ln(np.concatenate([t[:s], out]), a[f"norm_{name}"])

  heads_out = np.zeros((b, s + sp.grid_q ** 2, h, d))
  for i in range(b):
    for j in range(h):
      q = pool(qkv[i, :, 0, j], "q", sp.q_stride, sp.grid_q)
      k = pool(qkv[i, :, 1, j], "k", sp.kv_stride, sp.grid_kv)
      v = pool(qkv[i, :, 2, j], "v", sp.kv_stride, sp.grid_kv)
      logits = q @ k.T / math.sqrt(d)
      qr, kr = max(sp.grid_kv / sp.grid_q, 1.0), max(sp.grid_q / sp.grid_kv, 1.0)
      for qi in range(sp.grid_q ** 2):
        for ki in range(sp.grid_kv ** 2):
          dh = int(qi // sp.grid_q * qr - ki // sp.grid_kv * kr + (sp.grid_kv - 1) * kr)
          dw = int(qi % sp.grid_q * qr - ki % sp.grid_kv * kr + (sp.grid_kv - 1) * kr)
          logits[s + qi, s + ki] += q[s + qi] @ a["rel_pos_h"][dh] + q[s + qi] @ a["rel_pos_w"][dw]
      attn = np.exp(logits - logits.max(-1, keepdims=True))
      out = (attn / attn.sum(-1, keepdims=True)) @ v
      if residual_pooling:
        out[s:] += q[s:]                   # the cls token gets no residual
      heads_out[i, :, j] = out
  y = heads_out.reshape(b, -1, sp.att_dim) @ a["proj"]["kernel"] + a["proj"]["bias"]
  skip = x
  if in_att and sp.dim != sp.dim_out:
    skip = xn @ p["proj"]["kernel"] + p["proj"]["bias"]
  if sp.q_stride > 1:
    pooled = [np_maxpool(skip[i, s:].reshape(sp.grid_in, sp.grid_in, -1), sp.q_stride)
              for i in range(b)]
    skip = np.concatenate([skip[:, :s], np.stack(pooled).reshape(b, sp.grid_q ** 2, -1)], 1)
  x = skip + y
  xn2 = np_ln(x, p["norm2"])
  mlp = np_gelu(xn2 @ p["mlp"]["fc1"]["kernel"] + p["mlp"]["fc1"]["bias"])
  mlp = mlp @ p["mlp"]["fc2"]["kernel"] + p["mlp"]["fc2"]["bias"]
  if not in_att and sp.dim != sp.dim_out:
    x = xn2 @ p["proj"]["kernel"] + p["proj"]["bias"]
  return x + mlp


# (block of the 2-block plan at 16 px, DIM_MUL_IN_ATT, cls token, residual pooling) and the
# block's (q grid, kv grid, q stride, width in, width out).
BLOCK_CASES = [
    ((0, True, True, True), (8, 4, 1, 8, 8)),      # 4x4 keys under 8x8 queries, width kept
    ((1, True, True, True), (4, 8, 2, 8, 16)),     # transition: q pooled, keys 8x8, 8 -> 16
    ((0, False, True, True), (8, 4, 1, 8, 16)),    # widening in the MLP (DIM_MUL_IN_ATT False)
    ((1, True, False, False), (4, 8, 2, 8, 16)),   # no cls token, no residual pooling
]


@pytest.mark.parametrize("case,geometry", BLOCK_CASES)
def test_block_equals_the_numpy_definition(case, geometry):
  index, in_att, has_cls, residual_pooling = case
  sp = mvit.plan(16, 8, 1, (1, 1), (2,), 3, 2, 1, 3, 2, in_att)[index]
  assert (sp.grid_q, sp.grid_kv, sp.q_stride, sp.dim, sp.dim_out) == geometry
  block = mvit.MultiScaleBlock(sp, has_cls=has_cls, residual_pooling=residual_pooling,
                               dim_mul_in_att=in_att)
  n = (1 if has_cls else 0) + sp.grid_in ** 2
  x = np.random.RandomState(index).randn(2, n, sp.dim).astype(np.float32)
  params = randomize(init(block, jnp.asarray(x))["params"], seed=index + 1)
  got = np.asarray(jax.jit(block.apply)({"params": params}, jnp.asarray(x)))
  ref = np_block(x.astype(np.float64), jax.tree.map(lambda t: np.asarray(t, np.float64), params),
                 sp, has_cls, in_att, residual_pooling)
  assert got.shape == ref.shape == (2, n - sp.grid_in ** 2 + sp.grid_q ** 2, sp.dim_out)
  np.testing.assert_allclose(got, ref, rtol=2e-4, atol=2e-4)


def test_residual_pooling_connection_is_on_by_default():
  # What it computes (the pooled q added at the spatial tokens, not at the cls token) is
  # checked against NumPy by the block tests above, with and without it.
  assert mvit.from_config(mvit.default_config(), 224).residual_pooling
  assert all(mvit.from_config(mvit.default_config(variant=v), 224).residual_pooling
             for v in mvit.VARIANTS)


# ---------------------------------------------------------------------------------------------
# The model.

def test_upsample_mask_is_torch_nearest():
  mask = jnp.asarray([[1, 0, 0, 1]])                  # 2x2
  up = np.asarray(mvit.upsample_mask(mask, 4)).reshape(4, 4)
  np.testing.assert_array_equal(up, np.kron(np.array([[1, 0], [0, 1]]), np.ones((2, 2))))
  # A non-integer ratio: source floor(i * 3 / 4) = 0, 0, 1, 2.
  up = np.asarray(mvit.upsample_mask(jnp.asarray([[1, 0, 0, 0, 0, 0, 0, 0, 1]]), 4)).reshape(4, 4)
  np.testing.assert_array_equal(up, [[1, 1, 0, 0], [1, 1, 0, 0], [0, 0, 0, 0], [0, 0, 0, 1]])


def test_mask_token_replaces_patch_embeddings_before_the_blocks():
  m = mvit.from_config(tiny_cfg(), 16, use_mask_token=True)
  rs = np.random.RandomState(1)
  a, b = (jnp.asarray(rs.randn(2, 16, 16, 3), jnp.float32) for _ in range(2))
  v = init(m, a)
  assert v["params"]["mask_token"].shape == (1, 1, 8)
  coarse = np.array([[1, 0, 0, 1], [0, 1, 1, 0]])      # 2x2 masks
  fine = np.stack([np.kron(c.reshape(2, 2), np.ones((4, 4))).reshape(-1) for c in coarse])

  @jax.jit
  def outs(v, a, b):
    everything = jnp.ones((2, 4))
    return (m.apply(v, a, mask=everything), m.apply(v, b, mask=everything),
            m.apply(v, a, mask=jnp.zeros((2, 4))), m.apply(v, a),
            m.apply(v, a, mask=jnp.asarray(coarse)), m.apply(v, a, mask=jnp.asarray(fine)))

  all_a, all_b, none, plain, on_coarse, on_fine = outs(v, a, b)
  # Every patch replaced: the output no longer depends on the image.
  np.testing.assert_allclose(all_a, all_b, atol=1e-6)
  np.testing.assert_allclose(none, plain, atol=1e-6)
  # A mask on a coarser grid equals its nearest-neighbour upsampling on the 8x8 patch grid.
  np.testing.assert_allclose(on_coarse, on_fine, atol=1e-6)
  assert not np.allclose(on_coarse, plain, atol=1e-3)


def test_outputs_contract_and_pooling():
  m = models.build(tiny_cfg(), 16)
  x = jnp.asarray(np.random.RandomState(2).randn(2, 16, 16, 3), jnp.float32)
  v = init(m, x)

  def arrays(o, cols=None):
    """The array outputs (jit returns arrays only); 'stride' and 'grid' checked while tracing."""
    assert (o["stride"], o["grid"], cols or {}) == (4, (4, 4), {})
    return {k: o[k] for k in ("tokens", "pooled", "layers") if k in o}

  out, mean, fwd = jax.jit(lambda v, x: (
      arrays(models.outputs(m, v, x, pooling="cls", layers=True)),
      arrays(models.outputs(m, v, x, pooling="mean")),
      arrays(*models.forward(m, v, x, train=False, pooling="cls"))))(v, x)
  assert out["tokens"].shape == (2, 1 + 16, 16)
  np.testing.assert_array_equal(out["pooled"], out["tokens"][:, 0])
  assert [t.shape for t in out["layers"]] == [(2, 8), (2, 16)]
  np.testing.assert_array_equal(out["layers"][-1], out["pooled"])
  np.testing.assert_allclose(mean["pooled"], out["tokens"][:, 1:].mean(1), rtol=1e-5, atol=1e-6)
  np.testing.assert_allclose(fwd["tokens"], out["tokens"], rtol=1e-6, atol=1e-6)
  no_cls = models.build(tiny_cfg(cls_token=False), 16)
  with pytest.raises(ValueError, match="pooling='mean'"):       # raised before the pass
    models.outputs(no_cls, v, x, pooling="cls")
  # The standard model: stride 32, a 7x7 grid at 224 px.
  std = mvit.from_config(mvit.default_config(variant="tiny"), 224)
  assert (std.stride, std.grid) == (32, 7)


def test_drop_path_in_training_only():
  m = mvit.from_config(tiny_cfg(drop_path=0.5), 16)
  x = jnp.asarray(np.random.RandomState(3).randn(4, 16, 16, 3), jnp.float32)
  v = init(m, x)
  run = jax.jit(lambda v, x, key: (m.apply(v, x), m.apply(v, x, train=True, rngs={"dropout": key})))
  plain, a = run(v, x, jax.random.PRNGKey(1))
  _, b = run(v, x, jax.random.PRNGKey(2))
  assert not np.allclose(a, b) and not np.allclose(a, plain)
  with pytest.raises(Exception, match="dropout"):
    jax.eval_shape(lambda v, x: m.apply(v, x, train=True), v, x)
  # The finetune CNN call (train=True, features_only=True, no mutable collection) works.
  out, cols = jax.eval_shape(lambda v, x: mvit.from_config(tiny_cfg(), 16).apply(
      v, x, train=True, features_only=True, mutable=[]), v, x)
  assert out.shape == (4, 17, 16) and cols == {}



def test_mean_pooling_is_slowfasts_use_mean_pooling_and_finetunes():
  """pooled='mean' (SlowFast MViT.forward, USE_MEAN_POOLING): the last block's patch tokens
  averaged (cls dropped), then the final norm; the finetune method reads it through
  finetune.pooling='mean' with the head at HEAD_INIT_SCALE 0.001 (std 2e-5, bias 0)."""
  from helpers import load_config
  from mim_jax import methods
  m = mvit.from_config(tiny_cfg(), 16)
  x = jnp.asarray(np.random.RandomState(5).randn(2, 16, 16, 3), jnp.float32)
  v = init(m, x)
  got = m.apply(v, x, pooled="mean")
  _, inter = m.apply(v, x, mutable=["intermediates"])
  last = np.asarray(inter["intermediates"]["block_outputs"][-1], np.float64)
  u = last[:, 1:].mean(axis=1)
  n = v["params"]["norm"]
  want = (u - u.mean(-1, keepdims=True)) / np.sqrt(u.var(-1, keepdims=True) + 1e-6) * n["scale"] + n["bias"]
  assert got.shape == (2, 16)
  np.testing.assert_allclose(np.asarray(got), want, rtol=1e-5, atol=1e-5)
  with pytest.raises(ValueError, match="pooled="):
    m.apply(v, x, pooled="max")
  c = load_config("finetune", "resnet18")
  c.model = tiny_cfg()
  c.input.image_size = 16
  c.finetune.pooling = "mean"
  ft = methods.get(c)
  fv = ft.init_variables(jax.random.PRNGKey(0), x)
  head = fv["params"]["head"]["fc"]
  assert 1e-5 < float(np.std(np.asarray(head["kernel"]))) < 3e-5 and not np.any(head["bias"])
  feats, logits, _ = ft.cnn_classify(fv["params"], {}, x)
  enc = {"params": fv["params"]["encoder"]}
  np.testing.assert_allclose(np.asarray(feats), np.asarray(m.apply(enc, x, pooled="mean")), rtol=1e-6)
  np.testing.assert_allclose(np.asarray(logits), np.asarray(feats) @ np.asarray(head["kernel"]),
                             rtol=1e-5, atol=1e-9)
  c.finetune.pooling = "max"
  with pytest.raises(ValueError, match="'avg' or 'cls' or 'mean'"):
    methods.get(c)


def test_cls_pooling_reads_the_final_norm_cls_token():
  """finetune.pooling='cls' on an MViT (both official forwards with CLS_EMBED_ON and no
  USE_MEAN_POOLING: norm, then x[:, 0]): the features are the encoder's first final-norm
  token, the head at the official trunc_normal_(std=.02); without a cls token it is refused."""
  from helpers import load_config
  from mim_jax import methods
  m = mvit.from_config(tiny_cfg(), 16)
  x = jnp.asarray(np.random.RandomState(6).randn(2, 16, 16, 3), jnp.float32)
  c = load_config("finetune", "resnet18")
  c.model = tiny_cfg()
  c.input.image_size = 16
  c.finetune.pooling = "cls"
  ft = methods.get(c)
  fv = ft.init_variables(jax.random.PRNGKey(0), x)
  head = fv["params"]["head"]["fc"]
  assert 0.01 < float(np.std(np.asarray(head["kernel"]))) < 0.03 and not np.any(head["bias"])
  feats, logits, _ = ft.cnn_classify(fv["params"], {}, x)
  tokens = m.apply({"params": fv["params"]["encoder"]}, x)
  np.testing.assert_allclose(np.asarray(feats), np.asarray(tokens[:, 0]), rtol=1e-6)
  assert not np.allclose(np.asarray(feats), np.asarray(tokens[:, 1]))
  np.testing.assert_allclose(np.asarray(logits), np.asarray(feats) @ np.asarray(head["kernel"]),
                             rtol=1e-5, atol=1e-6)
  c.model = tiny_cfg(cls_token=False)
  with pytest.raises(ValueError, match="model.cls_token=True"):
    methods.get(c)

def test_official_initialisation():
  m = mvit.from_config(tiny_cfg(embed_dim=64, abs_pos=True, patch_kernel=7, patch_padding=3), 16)
  p = init(m, jnp.zeros((1, 16, 16, 3)))["params"]
  b0 = p["block00"]
  normal = np.concatenate([np.ravel(b0["attn"]["qkv"]["kernel"]), np.ravel(b0["mlp"]["fc1"]["kernel"]),
                           np.ravel(b0["attn"]["rel_pos_h"]), np.ravel(p["pos_embed"])])
  assert np.std(normal) == pytest.approx(0.02, rel=0.03) and np.abs(normal).max() > 0.07
  for bias in (b0["attn"]["qkv"]["bias"], b0["mlp"]["fc2"]["bias"], b0["norm1"]["bias"]):
    np.testing.assert_array_equal(bias, 0.0)
  np.testing.assert_array_equal(b0["attn"]["norm_q"]["scale"], 1.0)
  # Convolutions keep PyTorch's default U(+-1/sqrt(fan_in)).
  pool = np.asarray(b0["attn"]["pool_q"]["kernel"])
  assert pool.shape == (3, 3, 1, 64) and 0.3 < np.abs(pool).max() <= 1 / 3
  patch = np.asarray(p["patch_embed"]["proj"]["kernel"])
  bound = 1 / math.sqrt(3 * 7 * 7)
  assert patch.shape == (7, 7, 3, 64) and 0.9 * bound < np.abs(patch).max() <= bound


def test_config_errors_name_the_fix():
  with pytest.raises(ValueError, match="not an MViT key"):
    mvit.default_config(patch_size=16)
  cfg = mvit.default_config()
  cfg.patch_size = 16
  with pytest.raises(ValueError, match="not an MViT key"):
    mvit.check_config(cfg)
  bad = [dict(variant="huge"), dict(stage_strides=(2, 2)), dict(pool_kernel=2),
         dict(stage_blocks=(1, 0, 2, 1)), dict(drop_path=1.0), dict(attn_impl="flash"),
         dict(cls_token=1)]
  for kw in bad:
    with pytest.raises(ValueError, match="config.model"):
      mvit.check_config(mvit.default_config(**kw))
  with pytest.raises(ValueError, match="image_size=200"):
    mvit.from_config(mvit.default_config(), 200)           # a 50x50 grid: stride 4 fails
  with pytest.raises(ValueError, match="no option"):
    mvit.from_config(mvit.default_config(), 224, patch_size=16)
  m = mvit.from_config(tiny_cfg(), 16)
  with pytest.raises(ValueError, match="16px"):
    m.init(jax.random.PRNGKey(0), jnp.zeros((1, 32, 32, 3)))
  assert models.execution_keys(tiny_cfg()) == ("model.dtype", "model.attn_impl", "model.remat")
  assert models.summary(mvit.default_config(variant="s"), 224) == \
      "MViTv2-small, 16 blocks (1-2-11-2), width 96, 224 px"


def test_remat_and_bfloat16_compute_the_same_function():
  x = jnp.asarray(np.random.RandomState(4).randn(2, 16, 16, 3), jnp.float32)
  ref, remat, bf = (mvit.from_config(tiny_cfg(**kw), 16)
                    for kw in ({}, dict(remat=True), dict(dtype="bfloat16")))
  v = init(ref, x)
  a, b, c = jax.jit(lambda v, x: (ref.apply(v, x), remat.apply(v, x), bf.apply(v, x)))(v, x)
  np.testing.assert_allclose(b, a, rtol=1e-6, atol=1e-6)
  assert c.dtype == jnp.float32
  np.testing.assert_allclose(c, a, atol=0.1)


def test_layer_ids_follow_get_ld_param_groups():
  m = mvit.from_config(tiny_cfg(abs_pos=True), 16, use_mask_token=True)
  shapes = jax.eval_shape(m.init, jax.random.PRNGKey(0), jnp.zeros((1, 16, 16, 3)))["params"]
  tree = {"encoder": shapes, "head": {"proj": {"kernel": 0}}}
  ids, top = mvit.layer_ids(tree)
  e = ids["encoder"]
  # cls_token, mask_token, pos_embed, patch_embed: 0; blocks.i: i + 1; the rest: DEPTH + 1.
  assert top == 3
  assert e["cls_token"] == e["mask_token"] == e["pos_embed"] == 0
  assert set(jax.tree.leaves(e["patch_embed"])) == {0}
  assert set(jax.tree.leaves(e["block00"])) == {1} and set(jax.tree.leaves(e["block01"])) == {2}
  assert set(jax.tree.leaves(e["norm"])) == {3} and ids["head"]["proj"]["kernel"] == 3
  assert jax.tree.structure(ids) == jax.tree.structure(tree)
  # Other backbones' trees are not claimed (the optim hook then applies their own rule).
  from mim_jax.models import vit
  vit_tree = jax.eval_shape(vit.ViT(variant="mu", depth=2, patch_size=4, image_size=16).init,
                            jax.random.PRNGKey(0), jnp.zeros((1, 16, 16, 3)))["params"]
  assert mvit.layer_ids({"encoder": vit_tree}) is None
  assert mvit.layer_ids({"head": {"kernel": 0}}) is None


def test_layer_decay_factors_through_the_optim_hook():
  cfg = tiny_cfg()
  m = mvit.from_config(cfg, 16)
  shapes = jax.eval_shape(m.init, jax.random.PRNGKey(0), jnp.zeros((1, 16, 16, 3)))["params"]
  tree = {"encoder": shapes, "head": {"proj": {"kernel": 0}}}
  factors = optim.layer_decay_factors(tree, 0.75, cfg)      # LAYER_DECAY ** (DEPTH + 1 - id)
  assert factors["encoder"]["cls_token"] == pytest.approx(0.75 ** 3)
  assert factors["encoder"]["block01"]["attn"]["qkv"]["kernel"] == pytest.approx(0.75)
  assert factors["head"]["proj"]["kernel"] == 1.0


# ---------------------------------------------------------------------------------------------
# Official state dicts (mim_jax/convert/mvit.py), without torch.

def official_state_dict(rs, classes=5):
  """A facebookresearch/mvit state dict, written out by hand, of the 2-block tiny_cfg MViT at
  16 px (cls token, 3x3/2 patch embedding, widths 8 -> 16, heads 1 -> 2), torch layouts."""
  shapes = {"cls_token": (1, 1, 8), "patch_embed.proj.weight": (8, 3, 3, 3),
            "patch_embed.proj.bias": (8,)}
  # block 0: width 8, 1 head of 8; q 8x8 (stride 1), kv 4x4 (stride 2): tables 2 * 8 - 1.
  # block 1: 8 -> 16 in the attention, 2 heads of 8; q 4x4, kv 8x8 (stride 1): 2 * 8 - 1.
  for i, (dim, out, hd) in enumerate([(8, 8, 8), (8, 16, 8)]):
    t = f"blocks.{i}"
    shapes.update({f"{t}.norm1.weight": (dim,), f"{t}.norm1.bias": (dim,),
                   f"{t}.attn.qkv.weight": (3 * out, dim), f"{t}.attn.qkv.bias": (3 * out,),
                   f"{t}.attn.proj.weight": (out, out), f"{t}.attn.proj.bias": (out,),
                   f"{t}.attn.rel_pos_h": (15, hd), f"{t}.attn.rel_pos_w": (15, hd),
                   f"{t}.norm2.weight": (out,), f"{t}.norm2.bias": (out,),
                   f"{t}.mlp.fc1.weight": (4 * out, out), f"{t}.mlp.fc1.bias": (4 * out,),
                   f"{t}.mlp.fc2.weight": (out, 4 * out), f"{t}.mlp.fc2.bias": (out,)})
    for n in "qkv":
      shapes.update({f"{t}.attn.pool_{n}.weight": (hd, 1, 3, 3), f"{t}.attn.norm_{n}.weight": (hd,),
                     f"{t}.attn.norm_{n}.bias": (hd,)})
  shapes.update({"blocks.1.proj.weight": (16, 8), "blocks.1.proj.bias": (16,),
                 "norm.weight": (16,), "norm.bias": (16,),
                 "head.projection.weight": (classes, 16), "head.projection.bias": (classes,)})
  return {k: rs.randn(*s).astype(np.float32) for k, s in shapes.items()}


def test_official_state_dict_converts_and_computes_the_official_layers():
  from mim_jax.convert import mvit as convert_mvit
  from mim_jax.convert.names import ConversionError
  rs = np.random.RandomState(5)
  sd = official_state_dict(rs)
  params, cfg, classes = convert_mvit.official_to_params(sd, image_size=16, patch_stride=2,
                                                         patch_padding=1, kv_stride=2)
  assert classes == 5 and cfg.to_dict() == tiny_cfg(dim_mul_in_att=True).to_dict()
  model = mvit.from_config(cfg, 16)
  enc = params["encoder"]
  shapes = jax.eval_shape(model.init, jax.random.PRNGKey(0), jnp.zeros((1, 16, 16, 3)))["params"]
  assert jax.tree.structure(shapes) == jax.tree.structure(enc)
  assert jax.tree.map(lambda a: a.shape, shapes) == jax.tree.map(lambda a: a.shape, enc)
  np.testing.assert_array_equal(params["head"]["fc"]["kernel"], sd["head.projection.weight"].T)
  # The layers, computed from the torch-layout weights by the torch definitions: the patch
  # Conv2d (padding 1, stride 2), norm1 and qkv Linear, and the q pooling Conv2d (groups=C).
  x = rs.randn(1, 16, 16, 3).astype(np.float32)
  _, inter = jax.jit(lambda p, x: model.apply({"params": p}, x, capture_intermediates=True,
                                             mutable=["intermediates"]))(enc, jnp.asarray(x))
  inter = inter["intermediates"]
  w, b = sd["patch_embed.proj.weight"], sd["patch_embed.proj.bias"]
  xp = np.pad(x[0].transpose(2, 0, 1), ((0, 0), (1, 1), (1, 1)))
  patch = np.array([[np.einsum("oikl,ikl->o", w, xp[:, 2 * r:2 * r + 3, 2 * c:2 * c + 3]) + b
                     for c in range(8)] for r in range(8)])           # [8, 8, C]
  np.testing.assert_allclose(inter["patch_embed"]["__call__"][0][0], patch.reshape(64, 8),
                             rtol=1e-5, atol=1e-5)
  tokens = np.concatenate([sd["cls_token"][0], patch.reshape(64, 8)])
  xn = np_ln(tokens, {"scale": sd["blocks.0.norm1.weight"], "bias": sd["blocks.0.norm1.bias"]})
  qkv = xn @ sd["blocks.0.attn.qkv.weight"].T + sd["blocks.0.attn.qkv.bias"]
  np.testing.assert_allclose(inter["block00"]["attn"]["qkv"]["__call__"][0][0], qkv, rtol=1e-4,
                             atol=1e-4)
  q = qkv[1:, :8].reshape(8, 8, 8)                                    # spatial q, one head
  pw = sd["blocks.0.attn.pool_q.weight"]                              # [C, 1, 3, 3]
  qp = np.pad(q, ((1, 1), (1, 1), (0, 0)))
  pooled = np.array([[np.einsum("ckl,klc->c", pw[:, 0], qp[r:r + 3, c:c + 3]) for c in range(8)]
                     for r in range(8)])
  np.testing.assert_allclose(inter["block00"]["attn"]["pool_q"]["__call__"][0][0, 0, 0], pooled,
                             rtol=1e-4, atol=1e-4)
  # Back to the official names and layouts, bit for bit.
  back = convert_mvit.params_to_official(params, cfg, 16)
  assert sorted(back) == sorted(sd)
  for k in sd:
    np.testing.assert_array_equal(back[k], sd[k])
  # SlowFast's Conv3d pooling kernels and the checkpoint wrapper.
  sd5 = {k: (v[:, :, None] if "pool_" in k else v) for k, v in sd.items()}
  unwrapped = convert_mvit.unwrap({"model_state": {f"module.{k}": v for k, v in sd5.items()}})
  np.testing.assert_array_equal(unwrapped["blocks.1.attn.pool_v.weight"], sd["blocks.1.attn.pool_v.weight"])
  # Errors name the keys: a missing key, an extra one, tables that do not fit the geometry.
  geometry = dict(image_size=16, patch_stride=2, patch_padding=1, kv_stride=2)
  with pytest.raises(ConversionError, match="blocks.1.attn.rel_pos_w"):
    convert_mvit.official_to_params({k: v for k, v in sd.items() if k != "blocks.1.attn.rel_pos_w"},
                                    **geometry)
  with pytest.raises(ConversionError, match="decoder.weight"):
    convert_mvit.official_to_params({**sd, "decoder.weight": np.zeros(3)}, **geometry)
  with pytest.raises(ConversionError, match="rel_pos"):
    convert_mvit.official_to_params(sd, image_size=16, patch_stride=2, patch_padding=1, kv_stride=4)


def test_adapt_pretrained_resizes_rel_pos_tables_as_slowfast_loads_them():
  # torch's F.interpolate(mode='linear', align_corners=False), by hand: 3 rows -> 5 rows reads
  # sources (i + 0.5) * 3/5 - 0.5 = -0.2 (clamped to 0), 0.4, 1.0, 1.6, 2.2 (neighbour clamped).
  t = np.array([[0.0], [10.0], [20.0]])
  np.testing.assert_allclose(mvit.torch_linear_resize(t, 5)[:, 0], [0, 4, 10, 16, 20], atol=1e-5)
  # Query strides of pretraining (2, 2, 1: MaskFeat) -> fine-tuning (2, 2, 2) at 32 px: the
  # tables of stage 4's second block shrink from 2 * 4 - 1 = 7 to 2 * 2 - 1 = 3 rows (its first
  # block reads 4x4 keys either way: 7 rows, as block 14 of MViTv2-S at 224 px keeps 27).
  kw = dict(embed_dim=8, num_heads=1, stage_blocks=(1, 1, 1, 2), patch_kernel=3, patch_stride=2,
            patch_padding=1)
  pre = mvit.from_config(mvit.default_config(stage_strides=(2, 2, 1), **kw), 32)
  ft = mvit.from_config(mvit.default_config(stage_strides=(2, 2, 2), **kw), 32)
  x = jnp.zeros((1, 32, 32, 3))
  rs = np.random.RandomState(6)
  loaded = jax.tree.map(lambda a: rs.randn(*a.shape).astype(np.float32),
                        jax.eval_shape(pre.init, jax.random.PRNGKey(0), x)["params"])
  target = jax.eval_shape(ft.init, jax.random.PRNGKey(0), x)["params"]
  out = mvit.adapt_pretrained(loaded, target)
  assert jax.tree.map(np.shape, out) == jax.tree.map(lambda a: a.shape, target)
  src = loaded["block04"]["attn"]["rel_pos_h"]
  assert src.shape == (7, 8) and out["block04"]["attn"]["rel_pos_h"].shape == (3, 8)
  np.testing.assert_allclose(out["block04"]["attn"]["rel_pos_h"], mvit.torch_linear_resize(src, 3))
  np.testing.assert_array_equal(out["block03"]["attn"]["rel_pos_w"], loaded["block03"]["attn"]["rel_pos_w"])
