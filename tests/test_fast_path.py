"""The GPU fast path computes the same function as the plain one (issue: speed on one GPU).

The fast path is what the H100 benchmark runs: attention padded to an even length with the
padded keys masked (so cuDNN's fused kernel accepts 197 tokens), gathers whose backward pass is
a gather (`vit.take_rows`) and an exact GELU whose backward recomputes from x
(`vit.gelu_exact`). On CPU the padded attention runs through XLA; everything else is the code
the GPU runs. Each piece and the whole MAE / SimMIM loss and gradients are checked against the
plain formulation (`jnp.take_along_axis`, `nn.gelu`, no padding).
"""
import functools
import re

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from mim_jax import masking, methods
from mim_jax.models import vit
from tests.helpers import tiny_config


def _max_diff(a, b):
  return max(float(jnp.max(jnp.abs(x - y))) for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b)))


@pytest.mark.parametrize("pad", [2, 64])
@pytest.mark.parametrize("with_bias", [False, True])
def test_padded_attention_equals_plain(pad, with_bias):
  ks = jax.random.split(jax.random.PRNGKey(0), 5)
  q, k, v = (jax.random.normal(x, (2, 13, 3, 8)) for x in ks[:3])   # 13 tokens: odd
  bias = jax.random.normal(ks[3], (1, 3, 13, 13)) if with_bias else None
  w = jax.random.normal(ks[4], (2, 13, 3, 8))

  def f(q, k, v, bias, pad):
    return jnp.sum(vit.attention(q, k, v, bias, "xla", pad) * w)

  argnums = (0, 1, 2, 3) if with_bias else (0, 1, 2)
  np.testing.assert_allclose(f(q, k, v, bias, pad), f(q, k, v, bias, 0), rtol=1e-6)
  g_pad = jax.grad(f, argnums)(q, k, v, bias, pad)
  g_plain = jax.grad(f, argnums)(q, k, v, bias, 0)
  assert _max_diff(g_pad, g_plain) < 1e-5


def test_auto_padding_is_even_for_cudnn_only():
  assert vit.attn_pad_multiple("cudnn", -1) == 2
  assert vit.attn_pad_multiple("xla", -1) == 0
  assert vit.attn_pad_multiple(None, -1) == 0
  assert vit.attn_pad_multiple("xla", 64) == 64


def test_take_rows_equals_take_along_axis_with_gradients():
  sm = masking.random_shuffle_mask(jax.random.PRNGKey(1), 3, 16, 0.75)
  x = jax.random.normal(jax.random.PRNGKey(2), (3, 16, 5))
  for ids in (sm.keep_ids, sm.restore_ids):        # part of a permutation, a whole one
    w = jax.random.normal(jax.random.PRNGKey(3), ids.shape + (5,))
    fast = lambda x: jnp.sum(vit.take_rows(x, ids) * w)                          # noqa: E731
    plain = lambda x: jnp.sum(jnp.take_along_axis(x, ids[..., None], axis=1) * w)  # noqa: E731
    assert float(fast(x)) == float(plain(x))
    np.testing.assert_array_equal(jax.jit(jax.grad(fast))(x), jax.grad(plain)(x))


@pytest.mark.parametrize("dtype", [jnp.float32, jnp.bfloat16])
def test_gelu_exact_equals_flax_erf_gelu(dtype):
  x = (jax.random.normal(jax.random.PRNGKey(0), (4096,)) * 3).astype(dtype)
  g = jax.random.normal(jax.random.PRNGKey(1), (4096,)).astype(dtype)
  tol = 1e-6 if dtype == jnp.float32 else 1e-2
  x32 = x.astype(jnp.float32)
  np.testing.assert_allclose(vit.gelu_exact(x).astype(jnp.float32),
                             nn.gelu(x32, approximate=False), atol=tol, rtol=tol)
  fast = jax.vjp(vit.gelu_exact, x)[1](g)[0].astype(jnp.float32)
  plain = jax.vjp(lambda t: nn.gelu(t, approximate=False), x32)[1](g.astype(jnp.float32))[0]
  np.testing.assert_allclose(fast, plain, atol=tol, rtol=tol)


def _loss_and_grads(config, images):
  method = methods.get(config)
  params = method.init(jax.random.PRNGKey(0), images)
  state = method.init_state(params)

  def loss(p):
    return method.loss(p, state, images, jax.random.PRNGKey(1), jnp.zeros((), jnp.int32))[0]

  return jax.jit(jax.value_and_grad(loss))(params)


@functools.lru_cache(maxsize=None)
def _xla_reference(method):
  """The loss and gradients of tiny_config(method) with XLA attention on the images the tests
  below use: the reference of several of them, compiled once."""
  images = jax.random.normal(jax.random.PRNGKey(3), (4, 32, 32, 3))
  return _loss_and_grads(tiny_config(method, **{"model.attn_impl": "xla"}), images)


@pytest.mark.parametrize("method", ["mae", "simmim"])
def test_fast_step_equals_plain_step(method, monkeypatch):
  overrides = {"model.attn_impl": "xla", "model.attn_pad": 2}
  if method == "simmim":   # relative position bias and 65 tokens: the padded-bias path
    overrides.update({"model.pos_embed": "none", "model.rel_pos_bias": "shared"})
  config = tiny_config(method, **overrides)
  images = jax.random.normal(jax.random.PRNGKey(3), (4, 32, 32, 3))
  n_tokens = (32 // config.model.patch_size) ** 2 + 1
  assert n_tokens % 2 == 1                         # so the padding really happens
  fast_loss, fast_grads = _loss_and_grads(config, images)

  monkeypatch.setattr(vit, "take_rows", lambda x, ids: jnp.take_along_axis(x, ids[..., None], axis=1))
  monkeypatch.setattr(vit, "gelu_exact", lambda x: nn.gelu(x, approximate=False))
  config.model.attn_pad = 0
  plain_loss, plain_grads = _loss_and_grads(config, images)

  np.testing.assert_allclose(fast_loss, plain_loss, rtol=1e-6)
  assert _max_diff(fast_grads, plain_grads) < 1e-5
  assert jax.tree.structure(fast_grads) == jax.tree.structure(plain_grads)


def _count_primitive(jaxpr, name):
  """How many equations of primitive `name` run in `jaxpr`, sub-jaxprs (jit, remat) included."""
  count = 0
  for eqn in jaxpr.eqns:
    count += eqn.primitive.name == name
    for param in eqn.params.values():
      for sub in param if isinstance(param, (list, tuple)) else [param]:
        inner = getattr(sub, "jaxpr", sub)
        if hasattr(inner, "eqns"):
          count += _count_primitive(inner, name)
  return count


@pytest.mark.parametrize("remat", [False, True])
@pytest.mark.parametrize("with_bias", [False, True])
def test_encoder_pads_once_and_equals_unpadded(remat, with_bias):
  """vit.Encoder pads the token sequence once (not q, k, v in every block): same outputs,
  gradients and intermediates as no padding, and one pad in the traced forward pass."""
  n, heads = 7, 2
  x = jax.random.normal(jax.random.PRNGKey(1), (2, n, 16))
  bias = jax.random.normal(jax.random.PRNGKey(2), (1, heads, n, n)) if with_bias else None
  w = jax.random.normal(jax.random.PRNGKey(3), (2, n, 16))
  enc0 = vit.Encoder(3, heads, qkv_bias="qv", init_values=0.1, remat=remat, attn_impl="xla", attn_pad=0)
  params = enc0.init(jax.random.PRNGKey(0), x, bias)["params"]
  outs, grads, inters = {}, {}, {}
  for pad in (0, 4):
    enc = enc0.clone(attn_pad=pad)
    f = lambda p, x, b: jnp.sum(enc.apply({"params": p}, x, b) * w)  # noqa: E731
    outs[pad], grads[pad] = jax.jit(jax.value_and_grad(f, argnums=(0, 1, 2) if with_bias else (0, 1)))(
        params, x, bias)
    _, inters[pad] = jax.jit(lambda p, x, b: enc.apply({"params": p}, x, b, mutable=["intermediates"]))(
        params, x, bias)
    if pad:
      jaxpr = jax.make_jaxpr(lambda p, x, b: enc.apply({"params": p}, x, b))(params, x, bias)
      assert _count_primitive(jaxpr.jaxpr, "pad") == (2 if with_bias else 1)  # x (and the bias), once
      assert "[2,8,16]" in str(jaxpr)                          # the blocks run 8 tokens
  np.testing.assert_allclose(outs[4], outs[0], rtol=1e-5)
  assert _max_diff(grads[4], grads[0]) < 1e-5
  for a, b in zip(jax.tree.leaves(inters[4]), jax.tree.leaves(inters[0])):
    assert a.shape == b.shape                                  # block outputs [2, 7, 16], maps [2, 2, 7, 7]
    np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-6)
  assert len(jax.tree.leaves(inters[4])) == 6                  # 3 blocks x (output, attention map)


def test_tinymim_block_qkv_on_a_padded_encoder():
  from mim_jax.methods import tinymim
  images = jax.random.normal(jax.random.PRNGKey(0), (2, 32, 32, 3))
  plain = vit.ViT("mu", patch_size=8, image_size=32, attn_impl="xla", attn_pad=0)
  params = plain.init(jax.random.PRNGKey(1), images)["params"]
  ref = tinymim.block_qkv(plain, params, images, 1)
  got = tinymim.block_qkv(plain.clone(attn_pad=2), params, images, 1)   # 17 tokens -> 18
  assert got[0][0].shape == ref[0][0].shape == (2, 17, 64)
  for a, b in zip(jax.tree.leaves(got), jax.tree.leaves(ref)):
    np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("method", ["mae", "simmim"])      # qkv biases 'qkv' and 'qv'
def test_split_qkv_projection_equals_fused(method):
  """model.qkv_proj='split' (three products with the kernel's column blocks) computes the
  loss and gradients of the fused [d, 3d] product, with the same parameters."""
  images = jax.random.normal(jax.random.PRNGKey(3), (4, 32, 32, 3))
  fused = tiny_config(method, **{"model.attn_impl": "xla"})
  split = tiny_config(method, **{"model.attn_impl": "xla", "model.qkv_proj": "split"})
  assert split.model.qkv_bias == ("qkv" if method == "mae" else "qv")
  loss_f, grads_f = _xla_reference(method)
  loss_s, grads_s = _loss_and_grads(split, images)
  np.testing.assert_allclose(loss_s, loss_f, rtol=1e-6)
  assert jax.tree.structure(grads_s) == jax.tree.structure(grads_f)
  assert _max_diff(grads_s, grads_f) < 1e-5
  # The split step really runs three products per attention: no [4, N, 3 x 64] activation.
  def qkv_activations(config):
    m = methods.get(config)
    params = m.init(jax.random.PRNGKey(0), images)
    jaxpr = str(jax.make_jaxpr(lambda p: m.loss(p, m.init_state(p), images,
                                                jax.random.PRNGKey(1), 0)[0])(params))
    return len(re.findall(r"f32\[4,\d+,192\]", jaxpr))
  assert qkv_activations(fused) > 0 and qkv_activations(split) == 0
  with pytest.raises(ValueError, match="qkv_proj must be 'fused' or 'split'"):
    vit.Attention(2, qkv_proj="other").init(jax.random.PRNGKey(0), jnp.ones((1, 3, 8)))


@pytest.mark.parametrize("method", ["mae", "simmim"])
def test_bfloat16_residual_stream(method):
  """model.residual_dtype='bfloat16' carries the blocks' residual stream (encoder and MAE
  decoder) in bfloat16: the same parameters and, up to that rounding, the same loss."""
  images = jax.random.normal(jax.random.PRNGKey(3), (4, 32, 32, 3))
  kw = {"model.attn_impl": "xla", "model.dtype": "bfloat16"}
  f32 = tiny_config(method, **kw)
  bf16 = tiny_config(method, **kw, **{"model.residual_dtype": "bfloat16"})
  loss_32, grads_32 = _loss_and_grads(f32, images)
  loss_16, grads_16 = _loss_and_grads(bf16, images)
  assert jax.tree.structure(grads_16) == jax.tree.structure(grads_32)
  np.testing.assert_allclose(loss_16, loss_32, rtol=2e-3)   # 1e-4 and 3e-5 here
  assert loss_16 != loss_32                                  # the stream really is rounded
  m = methods.get(bf16)
  params = m.init(jax.random.PRNGKey(0), images)
  _, inter = m.encoder.apply({"params": params["encoder"]}, images, mutable=["intermediates"])
  blocks = inter["intermediates"]["encoder"]["block_outputs"]
  assert len(blocks) == 2 and all(b.dtype == jnp.bfloat16 for b in blocks)
  assert m.encoder.apply({"params": params["encoder"]}, images).dtype == jnp.float32  # final norm
  if method == "mae":
    sm = masking.random_shuffle_mask(jax.random.PRNGKey(1), 4, m.num_patches, m.mask_ratio)
    latent = m.encoder.apply({"params": params["encoder"]}, images, keep_ids=sm.keep_ids)
    _, inter = m.decoder.apply({"params": params["decoder"]}, latent, sm.restore_ids,
                               mutable=["intermediates"])
    (out,) = inter["intermediates"]["blocks"]["block_outputs"]
    assert out.dtype == jnp.bfloat16


@pytest.mark.parametrize("dtype", [jnp.float32, jnp.bfloat16])
def test_recompute_layer_norm_equals_flax(dtype):
  """vit.layer_norm(impl='recompute') is nn.LayerNorm's function (forward bit for bit, with
  constant and zero rows) and gradients, and keeps one array of x's size for the backward
  pass where autodiff of nn.LayerNorm keeps three."""
  from jax._src.ad_checkpoint import saved_residuals
  x = (jax.random.normal(jax.random.PRNGKey(0), (3, 7, 16)) * 3 + 1).astype(dtype)
  x = x.at[0, 0].set(2.5).at[0, 1].set(0.0)                 # a constant row, a zero row
  w = jax.random.normal(jax.random.PRNGKey(3), x.shape)
  outs, grads, kept = {}, {}, {}
  for impl in ("flax", "recompute", "reference"):
    ln = vit.layer_norm("norm", jnp.float32, impl="flax" if impl == "reference" else impl)
    params = ln.init(jax.random.PRNGKey(1), x)
    params = jax.tree.map(lambda t: t + 0.1 * jax.random.normal(jax.random.PRNGKey(2), t.shape), params)
    f = lambda p, x: jnp.sum(ln.apply(p, x) * w)  # noqa: E731
    xi = x.astype(jnp.float32) if impl == "reference" else x    # the float32 gradient
    outs[impl] = ln.apply(params, xi)
    grads[impl] = jax.grad(f, argnums=(0, 1))(params, xi)
    kept[impl] = sum(r[0].shape == x.shape for r in saved_residuals(f, params, xi))
  assert outs["recompute"].dtype == outs["flax"].dtype == jnp.float32
  np.testing.assert_array_equal(outs["recompute"], outs["flax"])
  assert jax.tree.structure(grads["recompute"]) == jax.tree.structure(grads["flax"])
  errors = {}
  for impl in ("flax", "recompute"):
    for a, b in zip(jax.tree.leaves(grads[impl]), jax.tree.leaves(grads["reference"])):
      assert a.dtype == (b.dtype if a.shape != x.shape else dtype)
    dx, ref = np.asarray(grads[impl][1], np.float32), np.asarray(grads["reference"][1])
    errors[impl] = float(np.max(np.abs(dx - ref))) / float(np.max(np.abs(ref)))  # the constant
    # row's rstd is 1000 (var 0, eps 1e-6), so its gradient is large: errors relative to the max
    np.testing.assert_allclose(jax.tree.leaves(grads[impl][0]), jax.tree.leaves(grads["reference"][0]),
                               rtol=1e-5, atol=1e-5)
  if dtype == jnp.float32:
    assert errors["recompute"] < 1e-6 and errors["flax"] < 1e-6
  else:
    # One rounding of the float32 gradient to bfloat16. Autodiff of nn.LayerNorm rounds the
    # direct and the statistics' paths to bfloat16 apart and sums them (largest error 0.40% of
    # the largest gradient here); the custom VJP sums in float32 and rounds once (0.28%).
    ref = np.asarray(grads["reference"][1])
    np.testing.assert_allclose(np.asarray(grads["recompute"][1], np.float32), ref,
                               rtol=2 ** -8, atol=1e-6 * np.max(np.abs(ref)))
    assert errors["recompute"] < errors["flax"]
  assert kept["flax"] - kept["recompute"] == 2                 # 3 arrays -> 1 (x itself)
  with pytest.raises(ValueError, match="'flax' or 'recompute'"):
    vit.layer_norm("norm", jnp.float32, impl="other")


@pytest.mark.parametrize("method", ["mae", "simmim"])
def test_recompute_layer_norm_step_equals_flax(method):
  images = jax.random.normal(jax.random.PRNGKey(3), (4, 32, 32, 3))
  recompute = tiny_config(method, **{"model.attn_impl": "xla", "model.layer_norm": "recompute"})
  loss_f, grads_f = _xla_reference(method)
  loss_r, grads_r = _loss_and_grads(recompute, images)
  np.testing.assert_allclose(loss_r, loss_f, rtol=1e-6)
  assert jax.tree.structure(grads_r) == jax.tree.structure(grads_f)
  assert _max_diff(grads_r, grads_f) < 1e-5


def test_remat_policies_keep_more_and_compute_the_same():
  """model.remat_policy: every policy gives the un-rematerialised outputs and gradients;
  'full' keeps the least for the backward pass, 'dots_no_batch' adds the projection and MLP
  matmul outputs, 'dots' every matmul's."""
  from jax._src.ad_checkpoint import saved_residuals
  x = jax.random.normal(jax.random.PRNGKey(1), (2, 6, 16))
  w = jax.random.normal(jax.random.PRNGKey(3), (2, 6, 16))
  plain = vit.Encoder(2, 2, attn_impl="xla", dtype=jnp.bfloat16)
  params = plain.init(jax.random.PRNGKey(0), x)["params"]
  results, kept = {}, {}
  for policy in (None, "full", "dots_no_batch", "dots"):
    enc = plain if policy is None else plain.clone(remat=True, remat_policy=policy)
    f = lambda p, x: jnp.sum(enc.apply({"params": p}, x) * w)  # noqa: E731
    results[policy] = jax.jit(jax.value_and_grad(f, argnums=(0, 1)))(params, x)
    kept[policy] = sum(r[0].size for r in saved_residuals(f, params, x) if r[0].ndim >= 3)
  for policy in ("full", "dots_no_batch", "dots"):
    np.testing.assert_allclose(results[policy][0], results[None][0], rtol=1e-6)
    assert _max_diff(results[policy][1], results[None][1]) < 1e-6
  assert kept["full"] < kept["dots_no_batch"] < kept["dots"] <= kept[None]
  with pytest.raises(ValueError, match="remat_policy must be one of"):
    plain.clone(remat=True, remat_policy="some").init(jax.random.PRNGKey(0), x)
