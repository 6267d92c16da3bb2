"""One ViT forward pass: `vit.ViT` at other input sizes (iBOT's local crops), with a function
between blocks (PCAE's teacher) and with class-attention blocks (ExtreMA) equals the
computations the methods used to make with their own copies, and now honours the config's
execution options in all of them; no method file builds its own encoder forward."""
import ast
import pathlib
import re

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from helpers import ROOT, tiny_config
from mim_jax import methods
from mim_jax.methods import pcae
from mim_jax.models import vit


class _Scoped(nn.Module):
  """A `vit.Encoder` under the scope name 'encoder', as inside `vit.ViT`, so that drop path
  draws the masks the ViT draws from the same 'dropout' key."""
  encoder: vit.Encoder

  def __call__(self, x, deterministic):
    return self.encoder(x, None, deterministic)


def hand_table(model: vit.ViT, p, height, width):
  """The position table for images of height x width: the model's at its own size, else its
  patch rows resized in float64 numpy by the bicubic matrices (tests/test_ibot.py checks them
  against Keys' kernel) with iBOT's scale factors (out + 0.1) / grid."""
  d, g = model.width, model.grid
  gh, gw = height // model.patch_size, width // model.patch_size
  table = (vit.sincos_2d(d, g, cls_token=True)[None] if model.pos_embed == "sincos"
           else np.asarray(p["pos_embed"]))
  if (gh, gw) == (g, g):
    return table
  mh = vit.torch_bicubic_matrix(g, gh, (gh + 0.1) / g)
  mw = vit.torch_bicubic_matrix(g, gw, (gw + 0.1) / g)
  patches = np.einsum("ij,jkd,lk->ild", mh, np.asarray(table[0, 1:], np.float64).reshape(g, g, d), mw)
  return np.concatenate([table[:, :1], patches.reshape(1, gh * gw, d)], axis=1).astype(np.float32)


def hand_forward(model: vit.ViT, p, table, images, mask=None, rng=None):
  """iBOT's former `IBOT.backbone`: patch embedding, mask token, position table (`table`, from
  `hand_table`), cls token, `vit.Encoder` (drop path from `rng`)."""
  width, depth, heads = vit.variant(model.variant)
  depth = model.depth or depth
  x = vit.PatchEmbed(model.patch_size, width).apply({"params": p["patch_embed"]}, images)
  n, length, _ = x.shape
  if mask is not None:
    w = mask.reshape(n, length, 1).astype(x.dtype)
    x = x * (1 - w) + p["mask_token"] * w
  x = x + table[:, 1:]
  cls = p["cls_token"] + table[:, :1]
  x = jnp.concatenate([jnp.broadcast_to(cls, (n, 1, width)), x], axis=1)
  enc = vit.Encoder(depth, heads, 4.0, model.qkv_bias, model.init_values, model.drop_path,
                    model.init_style, attn_impl=model.attn_impl, attn_pad=model.attn_pad)
  train = rng is not None
  return _Scoped(enc).apply({"params": {"encoder": p["encoder"]}}, x, not train,
                            rngs={"dropout": rng} if train else None)


@pytest.mark.parametrize("pos_embed", ["learned", "sincos"])
def test_other_input_sizes_interpolate_the_position_table(pos_embed):
  model = vit.ViT("mu", depth=2, patch_size=4, image_size=32, pos_embed=pos_embed,
                  use_mask_token=True, drop_path=0.2)
  x32 = jax.random.normal(jax.random.PRNGKey(1), (3, 32, 32, 3))
  p = model.init(jax.random.PRNGKey(0), x32)["params"]
  if pos_embed == "learned":
    p = dict(p, mask_token=p["mask_token"] + 0.3)
  apply = jax.jit(lambda p, x, mask, rng: model.apply(
      {"params": p}, x, mask=mask, deterministic=rng is None, rngs=None if rng is None else {"dropout": rng}))
  ref = jax.jit(lambda p, table, x, mask, rng: hand_forward(model, p, table, x, mask, rng))
  mask = (jax.random.uniform(jax.random.PRNGKey(2), (3, 64)) < 0.4).astype(jnp.int32)
  # The native size: the table as it is, the same arithmetic bit for bit.
  np.testing.assert_array_equal(apply(p, x32, mask, None),
                                ref(p, hand_table(model, p, 32, 32), x32, mask, None))
  # Other sizes (square: iBOT's local crops; not square), with a mask and with drop path.
  rng = jax.random.PRNGKey(3)
  for h, w in ((16, 16), (24, 40), (48, 48)):
    x = jax.random.normal(jax.random.PRNGKey(h + w), (3, h, w, 3))
    m = (jax.random.uniform(jax.random.PRNGKey(4), (3, (h // 4) * (w // 4))) < 0.4).astype(jnp.int32)
    got = apply(p, x, m, rng)
    assert got.shape == (3, 1 + (h // 4) * (w // 4), 64)
    table = hand_table(model, p, h, w)
    full = hand_table(model, p, 32, 32)
    np.testing.assert_allclose(vit.interpolate_pos_embed(jnp.asarray(full), 8, h // 4, w // 4), table,
                               rtol=1e-5, atol=1e-6)
    # float32 (the ViT) against float64 (numpy) interpolation, through two blocks
    np.testing.assert_allclose(got, ref(p, table, x, m, rng), rtol=1e-4, atol=1e-4)
    assert float(jnp.max(jnp.abs(got - apply(p, x, m, None)))) > 1e-3    # drop path did run
  with pytest.raises(ValueError, match="not divisible by the patch size"):
    model.apply({"params": p}, jnp.zeros((1, 30, 32, 3)))


def test_shared_relative_position_bias_exists_at_its_image_size_only():
  model = vit.ViT("mu", depth=1, patch_size=4, image_size=16, pos_embed="none", rel_pos_bias="shared")
  p = model.init(jax.random.PRNGKey(0), jnp.zeros((1, 16, 16, 3)))
  with pytest.raises(ValueError, match=r"built for image_size=16: got 8x8 images \(resize them\)"):
    model.apply(p, jnp.zeros((1, 8, 8, 3)))


def test_ibot_uses_the_vit_for_every_view():
  m = methods.get(tiny_config("ibot"))
  params = m.init(jax.random.PRNGKey(0), jnp.zeros((2, 32, 32, 3)))
  state = m.init_state(params)
  images = {"global": jax.random.normal(jax.random.PRNGKey(1), (2, 2, 32, 32, 3)),
            "local": jax.random.normal(jax.random.PRNGKey(2), (2, 2, 16, 16, 3))}
  calls = []
  apply = m.encoder.apply

  def counting(variables, x, *args, **kwargs):
    calls.append((x.shape[1:3], "mask" in kwargs, kwargs.get("deterministic", True)))
    return apply(variables, x, *args, **kwargs)

  object.__setattr__(m.encoder, "apply", counting)
  try:
    jax.eval_shape(lambda p, s: m.loss(p, s, images, jax.random.PRNGKey(3), 0)[0], params, state)
  finally:
    object.__delattr__(m.encoder, "apply")
  # the teacher's global views, the student's masked global views, its local views (drop path)
  assert calls == [((32, 32), False, True), ((32, 32), True, False), ((16, 16), False, False)]


# ---------------------------------------------------------------------------------------------
# PCAE's teacher: the ViT with its drops between blocks.

def test_pcae_teacher_is_the_vit_with_drops_between_blocks_and_pads_inside_attention():
  c = tiny_config("pcae", **{"model.attn_impl": "xla", "model.attn_pad": 0})
  c.pcae.update(drop_schedule=((0, 0.375), (1, 0.5)))         # 48 -> 18 -> 9 tokens
  m = methods.get(c)
  images = jax.random.normal(jax.random.PRNGKey(0), (2, 32, 32, 3))
  tparams = m.init(jax.random.PRNGKey(1), images)["encoder"]
  _, masked = m.split(jax.random.PRNGKey(2), 2)
  got, ids = jax.jit(m.teacher_forward)(tparams, images, masked)
  assert got.shape == (2, 9, 64) and ids.shape == (2, 9)
  # By hand: patch + position embedding, the masked patches, block, drop, block, drop, norm.
  x = vit.PatchEmbed(4, 64).apply({"params": tparams["patch_embed"]}, images)
  x = vit.take_rows(x + vit.sincos_2d(64, 8)[None], masked)
  want_ids = masked
  for i, keep in enumerate((0.375, 0.5)):
    x = vit.Block(2, layer_id=i + 1).apply({"params": tparams["encoder"][f"block{i:02d}"]}, x)
    x, want_ids = pcae.keep_distinctive(x, want_ids, keep)
  want = vit.layer_norm("norm", jnp.float32).apply({"params": tparams["encoder"]["norm"]}, x)
  np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-5)
  np.testing.assert_array_equal(ids, want_ids)
  # With a hook the attention pads inside each block (attn_pad 4: block 1's 18 tokens -> 20),
  # not once before the blocks for the first length: the same tokens, in the same order.
  m2 = methods.get(tiny_config("pcae", **{"model.attn_impl": "xla", "model.attn_pad": 4},
                               **{"pcae.drop_schedule": ((0, 0.375), (1, 0.5))}))
  got2, ids2 = jax.jit(m2.teacher_forward)(tparams, images, masked)
  np.testing.assert_allclose(got2, got, rtol=1e-5, atol=1e-5)
  np.testing.assert_array_equal(ids2, ids)
  jaxpr = str(jax.make_jaxpr(m2.teacher_forward)(tparams, images, masked))
  assert "f32[2,48,64]" in jaxpr and "f32[2,18,64]" in jaxpr and "f32[2,9,64]" in jaxpr
  assert "f32[2,20,2,32]" in jaxpr and "f32[2,20,64]" not in jaxpr   # q, k, v padded, not x


def test_between_blocks_hook_sees_every_block_and_forbids_a_relative_bias():
  model = vit.ViT("mu", depth=3, patch_size=4, image_size=16)
  x = jax.random.normal(jax.random.PRNGKey(0), (2, 16, 16, 3))
  p = model.init(jax.random.PRNGKey(1), x)
  seen = []

  def hook(i, h, ids):
    seen.append((i, h.shape, ids.shape))
    return h, ids

  out, ids = model.apply(p, x, between_blocks=hook)
  np.testing.assert_array_equal(out, model.apply(p, x))
  np.testing.assert_array_equal(ids, np.broadcast_to(np.arange(16), (2, 16)))
  assert seen == [(i, (2, 17, 64), (2, 16)) for i in range(3)]     # cls first, ids of x[:, 1:]
  enc = vit.Encoder(1, 2)
  h = jnp.zeros((1, 5, 8))
  with pytest.raises(ValueError, match="cannot be combined with a relative position bias"):
    enc.init(jax.random.PRNGKey(0), h, jnp.zeros((1, 2, 5, 5)), True, lambda i, x, ids: (x, ids), None)


# ---------------------------------------------------------------------------------------------
# ExtreMA: the ViT with class-attention blocks.

def test_extrema_encoder_is_the_vit_with_class_attention_blocks():
  m = methods.get(tiny_config("extrema"))
  e = m.encoder
  assert type(e) is vit.ViT
  assert (e.class_attention_layers, e.ca_init_values, e.patch_bias_init) == (2, 0.1, "torch")
  x = jax.random.normal(jax.random.PRNGKey(0), (2, 32, 32, 3))
  p = m.init(jax.random.PRNGKey(1), x)["encoder"]
  assert set(p) == {"patch_embed", "cls_token", "encoder", "ca_block00", "ca_block01", "norm"}
  assert set(p["encoder"]) == {"block00", "block01"}
  bound = 1 / np.sqrt(4 * 4 * 3)                               # Conv2d's default bias init
  b = np.asarray(p["patch_embed"]["proj"]["bias"])
  assert np.abs(b).max() <= bound and np.abs(b).max() > 0.5 * bound
  with pytest.raises(ValueError, match="with_cls=True"):
    e.apply({"params": p}, x, with_cls=False)
  # Layer outputs (models.outputs): the plain blocks carry no cls token, so they are mean-pooled.
  out = vit.outputs(e, {"params": p}, x, pooling="cls", layers=True)
  _, inter = e.apply({"params": p}, x, mutable=["intermediates"])
  first = inter["intermediates"]["encoder"]["block_outputs"][0]
  np.testing.assert_allclose(out["layers"][0], first.mean(1), rtol=1e-6)
  np.testing.assert_array_equal(out["layers"][-1], out["pooled"])


# ---------------------------------------------------------------------------------------------
# The execution options reach every former copy.

def _remat_policies(jaxpr):
  """The policy of every rematerialised call in `jaxpr` (sub-jaxprs included)."""
  found = []
  for eqn in jaxpr.eqns:
    if eqn.primitive.name in ("checkpoint", "remat", "remat2"):
      found.append(eqn.params["policy"])
    for param in eqn.params.values():
      for sub in param if isinstance(param, (list, tuple)) else [param]:
        inner = getattr(sub, "jaxpr", sub)
        if hasattr(inner, "eqns"):
          found += _remat_policies(inner)
  return found


def _traced(method, value=True, **overrides):
  """(jaxpr of the former copies' computation, its value or None) for tiny configs with
  `overrides`: iBOT's loss (teacher, masked student and 16 px local views), PCAE's teacher,
  ExtreMA's loss (student masked copies, teacher)."""
  c = tiny_config(method, **{"model.attn_impl": "xla", **overrides})
  m = methods.get(c)
  images = jax.random.normal(jax.random.PRNGKey(1), (2, 32, 32, 3))
  params = m.init(jax.random.PRNGKey(0), images)
  if method == "pcae":
    _, masked = m.split(jax.random.PRNGKey(2), 2)
    f = lambda p: m.teacher_forward(p["encoder"], images, masked)[0]    # noqa: E731
  else:
    state = m.init_state(params)
    if method == "ibot":
      images = {"global": jax.random.normal(jax.random.PRNGKey(1), (2, 2, 32, 32, 3)),
                "local": jax.random.normal(jax.random.PRNGKey(2), (2, 2, 16, 16, 3))}
    f = lambda p: m.loss(p, state, images, jax.random.PRNGKey(3), 0)[0]  # noqa: E731
  return jax.make_jaxpr(f)(params), jax.jit(f)(params) if value else None


# ViT forwards traced per method, and the LayerNorms of one (2 blocks x 2, the final norm;
# ExtreMA's 2 class-attention blocks x 2 besides).
FORWARDS = {"ibot": (3, 5), "pcae": (1, 5), "extrema": (2, 9)}


@pytest.mark.parametrize("method", sorted(FORWARDS))
def test_execution_options_reach_the_former_copies(method):
  forwards, norms = FORWARDS[method]
  base_jaxpr, base = _traced(method)
  split_jaxpr, split = _traced(method, **{"model.qkv_proj": "split"})
  # qkv_proj='split': three products, no fused [N, T, 3 x 64] activation anywhere (before, the
  # copies computed the fused one whatever the config said); the same function.
  fused_qkv = re.compile(r"f32\[\d+,(\d+),192\]")
  lengths = set(fused_qkv.findall(str(base_jaxpr)))
  assert lengths >= ({"65", "17"} if method == "ibot" else {"48"} if method == "pcae" else {"64", "12"})
  assert not fused_qkv.findall(str(split_jaxpr))
  np.testing.assert_allclose(split, base, rtol=1e-5, atol=1e-6)
  # layer_norm='recompute': every LayerNorm of every forward is the custom-VJP one.
  assert str(base_jaxpr).count("name=layer_norm_recompute") == 0
  ln_jaxpr, _ = _traced(method, False, **{"model.layer_norm": "recompute"})
  assert str(ln_jaxpr).count("name=layer_norm_recompute") == forwards * norms
  # remat with remat_policy: every block of every forward is rematerialised with that policy.
  remat_jaxpr, _ = _traced(method, False, **{"model.remat": True, "model.remat_policy": "dots"})
  assert _remat_policies(base_jaxpr.jaxpr) == []
  assert _remat_policies(remat_jaxpr.jaxpr) == [jax.checkpoint_policies.dots_saveable] * (forwards * 2)
  # residual_dtype='bfloat16' (compute in float32): the blocks' stream of every forward is the
  # only bfloat16 there is (it was float32 in the copies).
  bf16_jaxpr, _ = _traced(method, False, **{"model.residual_dtype": "bfloat16"})
  assert "bf16[" not in str(base_jaxpr)
  streams = {"ibot": ["4,65,64", "4,17,64"], "pcae": ["2,48,64"], "extrema": ["10,12,64", "2,64,64"]}
  for shape in streams[method]:
    assert f"bf16[{shape}]" in str(bf16_jaxpr), shape


# ---------------------------------------------------------------------------------------------
# No method builds its own encoder forward.

ENCODER_PARTS = {"PatchEmbed", "Encoder", "Block", "Attention", "ClassAttention",
                 "ClassAttentionBlock", "RelativePositionBias"}


def _vit_part_calls(path):
  """(enclosing class name or None, vit.<part>) for every call of a ViT building block."""
  tree = ast.parse(pathlib.Path(path).read_text())
  found = []

  def visit(node, cls):
    for child in ast.iter_child_nodes(node):
      inner = child.name if isinstance(child, ast.ClassDef) else cls
      f = getattr(child, "func", None) if isinstance(child, ast.Call) else None
      if (isinstance(f, ast.Attribute) and isinstance(f.value, ast.Name) and f.value.id == "vit"
          and f.attr in ENCODER_PARTS):
        found.append((cls, f.attr))
      visit(child, inner)

  visit(tree, None)
  return found


@pytest.mark.parametrize("name", ["ibot", "pcae", "extrema"])
def test_no_method_file_defines_its_own_vit_forward(name):
  """iBOT, PCAE and ExtreMA run their encoders (students, teachers, local crops, masked
  copies) through `self.encoder` (`vit.ViT`); ViT blocks are built only inside decoders."""
  path = ROOT / "mim_jax" / "methods" / f"{name}.py"
  calls = _vit_part_calls(path)
  assert all(cls is not None and cls.endswith("Decoder") for cls, _ in calls), calls
  source = path.read_text()
  for copy in ("def backbone", "def interpolate_pos_embed", "def torch_bicubic_matrix",
               "class ExtremaViT", "class ClassAttention", "def _block"):
    assert copy not in source, copy
  # The check sees what it looks for: MAE's decoder builds vit.Encoder inside MAEDecoder.
  assert ("MAEDecoder", "Encoder") in _vit_part_calls(ROOT / "mim_jax" / "methods" / "mae.py")
