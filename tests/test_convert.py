"""PyTorch weights in and out (mim_jax.convert), without torch.

The checks: name maps round-trip exactly; the pure .pth reader reads a torch-format zip the
test writes itself (its pickle names torch's real globals through stand-ins); a converted
timm state dict gives the features of a NumPy port of timm's ViT forward; the written workdir
loads wherever a pretraining run does; bad input is a one-line error.
"""
import collections
import io
import math
import pickle
import sys
import types
import zipfile

import jax
import ml_dtypes
import numpy as np
import pytest

from helpers import tiny_config
from mim_jax import convert, masking, methods, teachers, train
from mim_jax.convert import names, reader
from mim_jax.methods import finetune, mae
from mim_jax.models import vit

D, DEPTH, HEADS, P, GRID = 64, 2, 2, 4, 4     # the 'mu' ViT: 16 px images in 4 px patches


# ---------------------------------------------------------------------------------------------
# A torch.save zip writer built from stand-ins named as torch's globals.

def _rebuild_tensor_v2(*args):  # stand-in: only its module and name are pickled
  raise AssertionError("never called")


_rebuild_tensor_v2.__module__ = "torch._utils"


def _storage_class(name):
  return type(name, (), {"__module__": "torch", "__qualname__": name})


STORAGES = {np.dtype(np.float32): _storage_class("FloatStorage"),
            np.dtype(np.float16): _storage_class("HalfStorage"),
            np.dtype(ml_dtypes.bfloat16): _storage_class("BFloat16Storage"),
            np.dtype(np.int64): _storage_class("LongStorage")}


class _Storage:
  def __init__(self, key, array):
    self.key, self.array = key, array


class _Tensor:
  """Pickles as torch's Tensor does: _rebuild_tensor_v2(storage, offset, size, stride, ...)."""

  def __init__(self, storage, offset, size, stride):
    self.args = (storage, offset, tuple(size), tuple(stride), False, collections.OrderedDict())

  def __reduce_ex__(self, protocol):
    return _rebuild_tensor_v2, self.args


class _Pickler(pickle.Pickler):
  def persistent_id(self, obj):
    if isinstance(obj, _Storage):
      return ("storage", STORAGES[obj.array.dtype], obj.key, "cpu", obj.array.size)
    return None


def write_torch_zip(path, obj, storages, monkeypatch):
  """Writes `obj` (with _Tensor leaves over `storages`) as torch.save's zip layout."""
  fake = types.ModuleType("torch")
  for cls in STORAGES.values():
    setattr(fake, cls.__qualname__, cls)
  utils = types.ModuleType("torch._utils")
  utils._rebuild_tensor_v2 = _rebuild_tensor_v2
  fake._utils = utils
  monkeypatch.setitem(sys.modules, "torch", fake)
  monkeypatch.setitem(sys.modules, "torch._utils", utils)
  buf = io.BytesIO()
  _Pickler(buf, protocol=2).dump(obj)
  monkeypatch.delitem(sys.modules, "torch")
  monkeypatch.delitem(sys.modules, "torch._utils")
  with zipfile.ZipFile(path, "w", zipfile.ZIP_STORED) as zf:
    zf.writestr("archive/data.pkl", buf.getvalue())
    zf.writestr("archive/byteorder", "little")
    for s in storages:
      zf.writestr(f"archive/data/{s.key}", s.array.tobytes())
    zf.writestr("archive/version", "3\n")


def save_state_dict(path, sd, monkeypatch, wrap=None):
  """Each array its own contiguous storage, as torch.save(model.state_dict()) writes them."""
  storages, tensors = [], collections.OrderedDict()
  for i, (k, v) in enumerate(sd.items()):
    v = np.ascontiguousarray(v)
    s = _Storage(str(i), v.reshape(-1))
    storages.append(s)
    stride = tuple(int(x) // v.itemsize for x in v.strides) if v.ndim else ()
    tensors[k] = _Tensor(s, 0, v.shape, stride)
  write_torch_zip(path, wrap(tensors) if wrap else tensors, storages, monkeypatch)


# ---------------------------------------------------------------------------------------------
# Random timm-named state dicts, written by hand (independent of the name map).

def random_timm_sd(seed=0, qkv="qkv", layer_scale="", pos=True, rel=False, mask=False, head=False):
  rng = np.random.default_rng(seed)
  r = lambda *s: rng.normal(0, 0.3, s).astype(np.float32)  # noqa: E731
  sd = {"patch_embed.proj.weight": r(D, 3, P, P), "patch_embed.proj.bias": r(D),
        "cls_token": r(1, 1, D)}
  if pos:
    sd["pos_embed"] = r(1, GRID * GRID + 1, D)
  if rel:
    sd["rel_pos_bias.relative_position_bias_table"] = r((2 * GRID - 1) ** 2 + 3, HEADS)
  if mask:
    sd["mask_token"] = r(1, 1, D)
  for i in range(DEPTH):
    b = f"blocks.{i}."
    sd.update({b + "norm1.weight": 1 + r(D), b + "norm1.bias": r(D),
               b + "attn.qkv.weight": r(3 * D, D), b + "attn.proj.weight": r(D, D),
               b + "attn.proj.bias": r(D), b + "norm2.weight": 1 + r(D), b + "norm2.bias": r(D),
               b + "mlp.fc1.weight": r(4 * D, D), b + "mlp.fc1.bias": r(4 * D),
               b + "mlp.fc2.weight": r(D, 4 * D), b + "mlp.fc2.bias": r(D)})
    if qkv == "qkv":
      sd[b + "attn.qkv.bias"] = r(3 * D)
    elif qkv == "qv":
      sd[b + "attn.q_bias"], sd[b + "attn.v_bias"] = r(D), r(D)
    if layer_scale == "timm":
      sd[b + "ls1.gamma"], sd[b + "ls2.gamma"] = r(D), r(D)
    elif layer_scale == "beit":
      sd[b + "gamma_1"], sd[b + "gamma_2"] = r(D), r(D)
  sd["norm.weight"], sd["norm.bias"] = 1 + r(D), r(D)
  if head:
    sd["head.weight"], sd["head.bias"] = r(10, D), r(10)
  return sd


def np_timm_forward(sd, images_nchw, heads):
  """timm's VisionTransformer / Beit forward_features in float64 NumPy: conv patch embed,
  cls + position embedding, pre-norm blocks (qkv attention with optional shared relative bias,
  exact-GELU MLP, optional layer scale), final LayerNorm (eps 1e-6)."""
  g = {k: np.asarray(v, np.float64) for k, v in sd.items()}
  erf = np.vectorize(math.erf)

  def ln(x, name):
    m = x.mean(-1, keepdims=True)
    v = ((x - m) ** 2).mean(-1, keepdims=True)
    return (x - m) / np.sqrt(v + 1e-6) * g[name + ".weight"] + g[name + ".bias"]

  x = np.asarray(images_nchw, np.float64)
  b, c, hh, ww = x.shape
  w = g["patch_embed.proj.weight"]
  d, _, p, _ = w.shape
  patches = x.reshape(b, c, hh // p, p, ww // p, p).transpose(0, 2, 4, 1, 3, 5)
  patches = patches.reshape(b, -1, c * p * p)
  x = patches @ w.reshape(d, -1).T + g["patch_embed.proj.bias"]
  x = np.concatenate([np.broadcast_to(g["cls_token"], (b, 1, d)), x], axis=1)
  if "pos_embed" in g:
    x = x + g["pos_embed"]
  n = x.shape[1]
  bias = 0.0
  if "rel_pos_bias.relative_position_bias_table" in g:
    idx = vit.relative_position_index(int(round((n - 1) ** 0.5)))
    table = g["rel_pos_bias.relative_position_bias_table"]
    bias = table[idx.reshape(-1)].reshape(n, n, -1).transpose(2, 0, 1)
  hd = d // heads
  for i in range(len(names.block_indices(sd, "blocks."))):
    t = f"blocks.{i}."
    y = ln(x, t + "norm1")
    qkv_b = g.get(t + "attn.qkv.bias")
    if qkv_b is None and t + "attn.q_bias" in g:
      qkv_b = np.concatenate([g[t + "attn.q_bias"], np.zeros(d), g[t + "attn.v_bias"]])
    qkv = y @ g[t + "attn.qkv.weight"].T + (0.0 if qkv_b is None else qkv_b)
    q, k, v = qkv.reshape(b, n, 3, heads, hd).transpose(2, 0, 3, 1, 4)
    a = q @ k.swapaxes(-1, -2) * hd ** -0.5 + bias
    a = np.exp(a - a.max(-1, keepdims=True))
    a = a / a.sum(-1, keepdims=True)
    y = (a @ v).transpose(0, 2, 1, 3).reshape(b, n, d)
    y = y @ g[t + "attn.proj.weight"].T + g[t + "attn.proj.bias"]
    y = y * g.get(t + "gamma_1", g.get(t + "ls1.gamma", 1.0))
    x = x + y
    y = ln(x, t + "norm2") @ g[t + "mlp.fc1.weight"].T + g[t + "mlp.fc1.bias"]
    y = 0.5 * y * (1 + erf(y / math.sqrt(2)))
    y = y @ g[t + "mlp.fc2.weight"].T + g[t + "mlp.fc2.bias"]
    x = x + y * g.get(t + "gamma_2", g.get(t + "ls2.gamma", 1.0))
  return ln(x, "norm")


def vit_for(spec, **kw):
  return vit.ViT(variant=spec.variant, depth=spec.depth, patch_size=spec.patch,
                 image_size=spec.image_size, pos_embed=spec.pos_embed,
                 rel_pos_bias=spec.rel_pos_bias, qkv_bias=spec.qkv_bias,
                 init_values=0.1 if spec.layer_scale else None,
                 use_mask_token=spec.mask_token, **kw)


def random_tree(tree, seed):
  leaves, treedef = jax.tree_util.tree_flatten(tree)
  rng = np.random.default_rng(seed)
  return jax.tree_util.tree_unflatten(
      treedef, [rng.normal(0, 0.5, x.shape).astype(np.float32) for x in leaves])


def assert_trees_equal(a, b):
  fa, fb = names.flat_paths(a), names.flat_paths(b)
  assert sorted(fa) == sorted(fb)
  for k in fa:
    np.testing.assert_array_equal(np.asarray(fa[k]), np.asarray(fb[k]), err_msg="/".join(k))


# ---------------------------------------------------------------------------------------------
# Round trips of the name maps.

FEATURES = {
    # arch, style, spec switches
    "timm": ("timm_vit", "timm", dict(qkv_bias="qkv", pos_embed="learned")),
    "timm_layer_scale": ("timm_vit", "timm",
                         dict(qkv_bias="qkv", pos_embed="learned", layer_scale=True)),
    "timm_no_bias": ("timm_vit", "timm", dict(qkv_bias="none", pos_embed="learned")),
    "beit": ("beit", "beit", dict(qkv_bias="qv", pos_embed="none", layer_scale=True,
                                  rel_pos_bias="shared", mask_token=True)),
}


@pytest.mark.parametrize("feature", sorted(FEATURES))
def test_encoder_round_trip_through_torch_names_is_exact(feature):
  arch, style, kw = FEATURES[feature]
  spec = names.ViTSpec(D, DEPTH, HEADS, P, GRID, **kw)
  x = np.zeros((1, spec.image_size, spec.image_size, 3), np.float32)
  shapes = jax.eval_shape(lambda r: vit_for(spec).init(r, x)["params"], jax.random.PRNGKey(0))
  params = random_tree(shapes, seed=1)
  sd = convert.mim_to_torch(params, spec, style)
  if kw.get("layer_scale"):
    assert ("blocks.1.gamma_2" if style == "beit" else "blocks.1.ls2.gamma") in sd
  assert sd["blocks.0.attn.qkv.weight"].shape == (3 * D, D)
  assert sd["patch_embed.proj.weight"].shape == (D, 3, P, P)
  if spec.mask_token:
    sd["mask_token"] = np.asarray(params["mask_token"])      # BEiT checkpoints carry it
  back = convert.torch_to_mim(sd, arch)
  assert back.spec == spec
  assert_trees_equal(back.params["encoder"], params)


def test_mae_round_trip_with_decoder_is_exact():
  cfg = convert.load_config("mae")
  cfg.model.update(variant="mu", depth=DEPTH, patch_size=P)
  cfg.input.image_size = GRID * P
  cfg.mae.decoder = dict(width=32, depth=2, heads=2)
  method = mae.MAE(cfg)
  x = np.zeros((2, 16, 16, 3), np.float32)
  params = random_tree(jax.eval_shape(method.init, jax.random.PRNGKey(0), x), seed=2)
  spec = names.ViTSpec(D, DEPTH, HEADS, P, GRID, pos_embed="sincos")
  sd = convert.mae_to_torch(params, spec, decoder_depth=2)
  assert sd["decoder_pos_embed"].shape == (1, 17, 32) and "decoder_blocks.1.mlp.fc2.bias" in sd
  back = convert.torch_to_mim(sd, "mae", decoder_heads=2)
  assert back.spec == spec and back.decoder == dict(width=32, depth=2, heads=2)
  assert_trees_equal(back.params, params)


def test_conv_and_qkv_layouts_are_the_torch_ones():
  """One hand-checked entry each: the patch conv weight [D, C, p, p] and the fused qkv rows."""
  sd = random_timm_sd()
  enc = convert.torch_to_mim(sd, "timm_vit").params["encoder"]
  w = sd["patch_embed.proj.weight"]
  kernel = enc["patch_embed"]["proj"]["kernel"]
  # Row (py * p + px) * 3 + c of the kernel is the conv weight at [:, c, py, px].
  np.testing.assert_array_equal(kernel[(2 * P + 3) * 3 + 1], w[:, 1, 2, 3])
  # Output column j of the qkv kernel is torch row j: q, then k, then v, heads contiguous.
  np.testing.assert_array_equal(enc["encoder"]["block01"]["attn"]["qkv_kernel"][:, D + 5],
                                sd["blocks.1.attn.qkv.weight"][D + 5])


# ---------------------------------------------------------------------------------------------
# The pure .pth reader.

def test_pure_reader_reads_float32_float16_bfloat16_and_strided_offset_views(tmp_path, monkeypatch):
  base = np.arange(24, dtype=np.float32) * 0.5
  half = (np.arange(6, dtype=np.float16) - 2.5)
  bf = np.asarray([1.5, -2.0, 3.25], ml_dtypes.bfloat16)
  s32, s16, sbf = _Storage("0", base), _Storage("1", half), _Storage("7", bf)
  obj = {"model": collections.OrderedDict([
      ("w", _Tensor(s32, 0, (4, 6), (6, 1))),
      ("t", _Tensor(s32, 0, (6, 4), (1, 6))),          # a transposed view of the same storage
      ("s", _Tensor(s32, 7, (2, 3), (6, 2))),          # offset 7, every other column
      ("h", _Tensor(s16, 2, (2, 2), (2, 1))),
      ("b", _Tensor(sbf, 0, (3,), (1,))),
      ("scalar", _Tensor(s32, 5, (), ()))]), "epoch": 3, "note": b"bytes"}
  path = tmp_path / "ck.pth"
  write_torch_zip(path, obj, [s32, s16, sbf], monkeypatch)
  out = reader.read_checkpoint(str(path))
  m = out["model"]
  np.testing.assert_array_equal(m["w"], base.reshape(4, 6))
  np.testing.assert_array_equal(m["t"], base.reshape(4, 6).T)
  np.testing.assert_array_equal(m["s"], np.asarray([[3.5, 4.5, 5.5], [6.5, 7.5, 8.5]], np.float32))
  assert m["h"].dtype == np.float16
  np.testing.assert_array_equal(m["h"], np.asarray([[-0.5, 0.5], [1.5, 2.5]], np.float16))
  assert m["b"].dtype == ml_dtypes.bfloat16 and m["b"].tolist() == [1.5, -2.0, 3.25]
  assert m["scalar"].shape == () and float(m["scalar"]) == 2.5
  assert out["epoch"] == 3 and out["note"] == b"bytes"


class _Evil:
  def __reduce__(self):
    import os
    return os.system, ("echo pwned",)


def test_pure_reader_refuses_other_globals_in_one_line(tmp_path, monkeypatch):
  path = tmp_path / "evil.pth"
  write_torch_zip(path, {"x": _Evil()}, [], monkeypatch)
  with pytest.raises(reader.CheckpointReadError) as e:
    reader.read_checkpoint(str(path))
  msg = str(e.value)
  assert "\n" not in msg and ("posix.system" in msg or "os.system" in msg) and "safetensors" in msg


def test_pure_reader_rejects_a_view_outside_its_storage(tmp_path, monkeypatch):
  s = _Storage("0", np.zeros(4, np.float32))
  path = tmp_path / "bad.pth"
  write_torch_zip(path, {"x": _Tensor(s, 2, (3,), (1,))}, [s], monkeypatch)
  with pytest.raises(reader.CheckpointReadError, match="outside its storage"):
    reader.read_checkpoint(str(path))


# ---------------------------------------------------------------------------------------------
# Features against a NumPy port of timm's forward.

@pytest.mark.parametrize("kind", ["timm", "timm_layer_scale", "beit"])
def test_converted_features_equal_numpy_timm_forward(kind):
  if kind == "beit":
    sd = random_timm_sd(3, qkv="qv", layer_scale="beit", pos=False, rel=True, mask=True)
    arch = "beit"
  else:
    sd = random_timm_sd(3, layer_scale="timm" if kind == "timm_layer_scale" else "", head=True)
    arch = "timm_vit"
  conv = convert.torch_to_mim(sd, arch)
  images = np.random.default_rng(4).normal(size=(2, 16, 16, 3)).astype(np.float32)
  got = vit_for(conv.spec).apply({"params": conv.params["encoder"]}, images)
  want = np_timm_forward(sd, images.transpose(0, 3, 1, 2), HEADS)
  np.testing.assert_allclose(np.asarray(got), want, atol=1e-5, rtol=0)
  if kind == "timm":
    assert conv.ignored == ["head.bias", "head.weight"]


# ---------------------------------------------------------------------------------------------
# The workdir, end to end through the command line.

@pytest.fixture(scope="module")
def converted_run(tmp_path_factory, compilation_cache):
  """A timm-style checkpoint saved as .pth (module 'model' wrapper), converted by the CLI."""
  tmp = tmp_path_factory.mktemp("convert")
  sd = random_timm_sd(5)
  with pytest.MonkeyPatch.context() as mp:
    save_state_dict(tmp / "vit.pth", sd, mp, wrap=lambda t: {"model": t})
  from mim_jax.convert.__main__ import main
  rc = main(["--from=torch", "--arch=timm_vit", str(tmp / "vit.pth"), str(tmp / "run"),
             "--variant=mu", "--patch_size=4", "--image_size=16"])
  assert rc == 0
  return sd, str(tmp / "run"), tmp


def test_workdir_loads_through_teachers_trainer_and_finetune(converted_run):
  sd, workdir, _ = converted_run
  want = convert.torch_to_mim(sd, "timm_vit").params["encoder"]
  run = teachers.load(workdir)
  assert run.config.method == "mae" and run.step == 0
  assert run.config.model.pos_embed == "learned" and run.config.input.image_size == 16
  assert_trees_equal(run.params["encoder"], want)
  tr = train.Trainer.from_workdir(workdir)
  assert_trees_equal(jax.device_get(tr.state["params"]["encoder"]), want)
  ft = finetune.load_pretrained_encoder(workdir, "online", run.config.model, 16)
  assert_trees_equal(ft, want)


def test_converted_weights_are_a_tinymim_teacher(converted_run):
  """TinyMIM reads converted PyTorch weights as its teacher: the frozen state is the converted
  encoder, and a student holding the same weights has zero relation loss."""
  sd, workdir, _ = converted_run
  want = convert.torch_to_mim(sd, "timm_vit").params["encoder"]
  c = tiny_config("tinymim", **{"tinymim.teacher": workdir, "input.image_size": 16})
  tcfg = teachers.load(workdir).config
  c.model.update(tcfg.model.to_dict())
  c.input.mean, c.input.std = tcfg.input.mean, tcfg.input.std   # the same view for both
  m = methods.get(c)
  state = m.external_state()
  assert_trees_equal(jax.device_get(state["teacher"]), want)
  images = np.random.default_rng(3).normal(size=(2, 16, 16, 3)).astype(np.float32)
  loss, aux = m.loss({"encoder": want}, state, images, jax.random.PRNGKey(0), 0)
  assert abs(float(loss)) < 1e-5 and abs(float(aux["vv_loss"])) < 1e-5
  moved = jax.tree.map(lambda a: a * 1.1, want)
  assert float(m.loss({"encoder": moved}, state, images, jax.random.PRNGKey(0), 0)[0]) > 1e-3


def test_export_to_timm_gives_back_the_imported_state_dict(converted_run, capsys):
  sd, workdir, tmp = converted_run
  from mim_jax.convert.__main__ import main
  out = tmp / "vit.safetensors"
  assert main(["--to=timm", workdir, str(out)]) == 0
  printed = capsys.readouterr().out
  assert "timm.create_model('vit_base_patch16_224', pretrained=True" in printed
  assert "embed_dim=64" in printed and "patch_size=4" in printed and "img_size=16" in printed
  back = reader.read_checkpoint(str(out))
  want = {k: v for k, v in sd.items() if not k.startswith("head.")}
  assert sorted(back) == sorted(want)
  for k in want:
    assert back[k].dtype == np.float32
    np.testing.assert_array_equal(back[k], want[k], err_msg=k)


def test_beit_safetensors_becomes_a_simmim_workdir(tmp_path, compilation_cache):
  """A BEiT pretraining state dict (q/v biases, layer scale, shared relative bias, mask token,
  lm_head) read from .safetensors: the workdir is a SimMIM run whose encoder is the checkpoint's."""
  import safetensors.numpy
  sd = random_timm_sd(10, qkv="qv", layer_scale="beit", pos=False, rel=True, mask=True)
  sd["rel_pos_bias.relative_position_index"] = vit.relative_position_index(GRID).astype(np.int64)
  sd["lm_head.weight"], sd["lm_head.bias"] = np.ones((8, D), np.float32), np.zeros(8, np.float32)
  safetensors.numpy.save_file(sd, str(tmp_path / "beit.safetensors"))
  info = convert.convert_torch_checkpoint(str(tmp_path / "beit.safetensors"),
                                          str(tmp_path / "run"), "beit")
  assert info["method"] == "simmim" and info["ignored_keys"] == ["lm_head.bias", "lm_head.weight"]
  assert info["initialised_not_converted"] == ["decoder/conv1x1/bias", "decoder/conv1x1/kernel"]
  run = teachers.load(str(tmp_path / "run"))
  m = run.config.model
  got = (m.qkv_bias, m.rel_pos_bias, m.pos_embed, bool(m.init_values))
  assert got == ("qv", "shared", "none", True)
  assert tuple(run.config.input.mean) == (0.5, 0.5, 0.5)            # BEiT v1's normalisation
  assert_trees_equal(run.params["encoder"], convert.torch_to_mim(sd, "beit").params["encoder"])


def test_dino_and_ibot_checkpoints_unwrap_to_the_chosen_backbone():
  t, s = random_timm_sd(11), random_timm_sd(12)
  ck = {"teacher": {**{f"backbone.{k}": v for k, v in t.items()},
                    "head.mlp.0.weight": np.ones((4, D))},
        "student": {f"module.backbone.{k}": v for k, v in s.items()}, "epoch": 100}
  teacher = convert.unwrap(ck, "dino")
  assert teacher["cls_token"] is t["cls_token"] and "head.mlp.0.weight" in teacher
  assert convert.torch_to_mim(teacher, "dino").ignored == ["head.mlp.0.weight"]
  assert convert.unwrap(ck, "ibot", which="student")["norm.bias"] is s["norm.bias"]
  msg = _one_line_error(convert.unwrap, {"teacher": ck["teacher"]}, "ibot", which="student")
  assert "--which=teacher" in msg


def test_beit_export_names_match_timm_beit():
  spec = names.ViTSpec(D, DEPTH, HEADS, P, GRID, qkv_bias="qv", pos_embed="none", layer_scale=True,
                       rel_pos_bias="shared", mask_token=True)
  conv = convert.torch_to_mim(random_timm_sd(6, qkv="qv", layer_scale="beit", pos=False, rel=True,
                                             mask=True), "beit")
  sd, name, kw = convert.timm_state_dict(conv.params["encoder"], spec)
  assert name == "beit_base_patch16_224" and kw["use_shared_rel_pos_bias"] is True
  assert kw["use_rel_pos_bias"] is False and kw["use_abs_pos_emb"] is False
  assert "mask_token" not in sd and "blocks.0.gamma_1" in sd and "blocks.0.attn.q_bias" in sd
  np.testing.assert_array_equal(sd["rel_pos_bias.relative_position_index"],
                                vit.relative_position_index(GRID))


# ---------------------------------------------------------------------------------------------
# Errors.

def _one_line_error(fn, *args, **kw):
  with pytest.raises((convert.ConversionError, reader.CheckpointReadError)) as e:
    fn(*args, **kw)
  msg = str(e.value)
  assert "\n" not in msg, msg
  return msg


def test_bad_input_is_a_one_line_error_naming_the_keys():
  sd = random_timm_sd(7)
  msg = _one_line_error(convert.unwrap, sd, "vit_base")
  assert "--arch='vit_base'" in msg and "timm_vit" in msg
  msg = _one_line_error(convert.torch_to_mim, random_timm_sd(7, head=True), "mae")
  assert "unused head.bias, head.weight" in msg and "--arch=mae" in msg
  missing = dict(sd)
  del missing["blocks.1.norm2.bias"]
  msg = _one_line_error(convert.torch_to_mim, missing, "timm_vit")
  assert "missing blocks.1.norm2.bias" in msg
  bad = dict(sd, **{"blocks.0.mlp.fc1.weight": sd["blocks.0.mlp.fc1.weight"].T})
  msg = _one_line_error(convert.torch_to_mim, bad, "timm_vit")
  assert "blocks.0.mlp.fc1.weight [64, 256] (expected [256, 64])" in msg
  extra = dict(sd, **{"blocks.0.attn.extra": np.zeros(3, np.float32)})
  msg = _one_line_error(convert.torch_to_mim, extra, "timm_vit")
  assert "unused blocks.0.attn.extra" in msg
  msg = _one_line_error(convert.torch_to_mim, sd, "timm_vit", variant="small")
  assert "--variant=mu" in msg
  msg = _one_line_error(convert.torch_to_mim, sd, "timm_vit", image_size=32)
  assert "--image_size=16" in msg


def test_cli_prints_a_one_line_error_and_exits_1(tmp_path, capsys):
  from mim_jax.convert.__main__ import main
  args = ["--from=torch", "--arch=timm_vit", str(tmp_path / "none.pth"), str(tmp_path / "o")]
  assert main(args) == 1
  err = capsys.readouterr().err.strip()
  assert err.count("\n") == 0 and "does not exist" in err


# ---------------------------------------------------------------------------------------------
# Real timm, when it is installed.

def test_features_equal_real_timm_when_installed(tmp_path):
  try:
    import torch
  except ImportError as e:
    pytest.skip(f"torch not installed: the torch-free checks above cover the layouts ({e})")
  try:
    import timm
  except ImportError as e:
    pytest.skip(f"timm not installed: the torch-free checks above cover the layouts ({e})")
  sd = random_timm_sd(8)
  model = timm.create_model("vit_base_patch16_224", pretrained=False, num_classes=0, embed_dim=D,
                            depth=DEPTH, num_heads=HEADS, patch_size=P, img_size=16)
  model.load_state_dict({k: torch.from_numpy(v) for k, v in sd.items()})
  images = np.random.default_rng(9).normal(size=(2, 16, 16, 3)).astype(np.float32)
  with torch.no_grad():
    want = model.forward_features(torch.from_numpy(images.transpose(0, 3, 1, 2))).numpy()
  conv = convert.torch_to_mim(sd, "timm_vit")
  got = vit_for(conv.spec).apply({"params": conv.params["encoder"]}, images)
  np.testing.assert_allclose(np.asarray(got), want, atol=1e-5)


def test_real_torch_file_and_timm_export_round_trip_when_installed(tmp_path):
  """With torch and timm: a file written by torch.save reads with the pure reader; converted
  through the CLI and exported again, timm.create_model(pretrained_cfg_overlay=file) loads it
  and gives the features of the mim_jax encoder (a ViT, and a BEiT with shared relative bias)."""
  try:
    import torch
    import timm
  except ImportError as e:
    pytest.skip(f"torch/timm not installed: the torch-free checks above cover the layouts ({e})")
  from mim_jax.convert.__main__ import main
  images = np.random.default_rng(3).normal(size=(2, 16, 16, 3)).astype(np.float32)
  x = torch.from_numpy(images.transpose(0, 3, 1, 2))
  for kind, sd in (("vit", random_timm_sd(11)),
                   ("beit", random_timm_sd(12, qkv="qv", layer_scale="beit", pos=False, rel=True))):
    arch = "timm_vit" if kind == "vit" else "beit"
    pth = tmp_path / f"{kind}.pth"
    torch.save({k: torch.from_numpy(v) for k, v in sd.items()}, pth)
    got_sd = reader.read_checkpoint(str(pth))
    assert sorted(got_sd) == sorted(sd)
    for k in sd:
      np.testing.assert_array_equal(got_sd[k], sd[k], err_msg=k)
    run = tmp_path / f"{kind}_run"
    assert main(["--from=torch", f"--arch={arch}", str(pth), str(run), "--image_size=16"]) == 0
    name, kwargs, _ = convert.export_timm(str(run), str(tmp_path / f"{kind}.safetensors"))
    model = timm.create_model(name, pretrained=True, **kwargs,
                              pretrained_cfg_overlay=dict(file=str(tmp_path / f"{kind}.safetensors")))
    model.eval()
    with torch.no_grad():
      want = model.forward_features(x).numpy()
    loaded = teachers.load(str(run))
    got = loaded.method.encoder.apply({"params": loaded.params["encoder"]}, images)
    np.testing.assert_allclose(np.asarray(got), want, atol=1e-4, err_msg=kind)


def test_official_mae_checkpoint_gives_the_torch_reference_outputs_when_installed(tmp_path):
  """With torch and timm: an MAE in the official architecture (benchmarks/torch_mae.py, timm
  Blocks, the official decoder and loss), saved as the official checkpoints are ({'model': sd}),
  converted with the CLI, gives the same latent, decoder predictions and loss for the same mask."""
  try:
    import torch
    import timm  # noqa: F401  (torch_mae builds on timm's Block)
  except ImportError as e:
    pytest.skip(f"torch/timm not installed: the torch-free checks above cover the layouts ({e})")
  import importlib.util
  import pathlib
  from mim_jax.convert.__main__ import main
  from mim_jax.targets import pixels
  path = pathlib.Path(__file__).resolve().parents[1] / "benchmarks" / "torch_mae.py"
  spec = importlib.util.spec_from_file_location("torch_mae", path)
  torch_mae = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(torch_mae)
  torch.manual_seed(0)
  model = torch_mae.TorchMAE((D, DEPTH, HEADS, P), img=GRID * P, dec_dim=32, dec_depth=2,
                             dec_heads=2).eval()
  with torch.no_grad():        # xavier init leaves biases and LayerNorms trivial: perturb them all
    for prm in model.parameters():
      prm.add_(0.1 * torch.randn_like(prm))
  pth = tmp_path / "mae_official.pth"
  torch.save({"model": model.state_dict(), "epoch": 3}, pth)
  images = np.random.default_rng(5).normal(size=(2, GRID * P, GRID * P, 3)).astype(np.float32)
  noise = np.random.default_rng(6).uniform(size=(2, GRID * GRID)).astype(np.float32)
  with torch.no_grad():
    out = model.forward_all(torch.from_numpy(images.transpose(0, 3, 1, 2)), torch.from_numpy(noise))
  want_loss, want_latent, want_pred, want_mask = (t.numpy() for t in out)

  run = tmp_path / "mae_run"
  assert main(["--from=torch", "--arch=mae", str(pth), str(run), f"--image_size={GRID * P}",
               "--decoder_heads=2"]) == 0
  loaded = teachers.load(str(run))
  method, params = loaded.method, loaded.params
  sm = masking.shuffle_mask_from_noise(noise, method.mask_ratio)      # mim_jax's own masking
  np.testing.assert_array_equal(np.asarray(sm.mask), want_mask)
  latent = method.encoder.apply({"params": params["encoder"]}, images, keep_ids=sm.keep_ids)
  pred = method.decoder.apply({"params": params["decoder"]}, latent, sm.restore_ids)
  loss = mae.mae_loss(pred, pixels.pixel_target(images, P, method.norm_pix), sm.mask)
  np.testing.assert_allclose(np.asarray(latent), want_latent, atol=1e-4)
  np.testing.assert_allclose(np.asarray(pred), want_pred, atol=1e-4)
  np.testing.assert_allclose(float(loss), float(want_loss), rtol=1e-5)


# ---------------------------------------------------------------------------------------------
# The command line's Swin and MViT v2 imports (their name maps: tests/test_swin.py, test_mvit.py).

def test_cli_imports_an_official_swin_into_a_workdir(tmp_path, monkeypatch, capsys):
  from mim_jax import train
  from mim_jax.convert import __main__ as cli
  from mim_jax.convert import swin as swin_conv
  from mim_jax.models import swin
  model = swin.from_config(swin.default_config(embed_dim=8, depths=(2, 2), num_heads=(2, 4),
                                               window_size=4, patch_size=2), 32)
  params = jax.tree.map(np.asarray, model.init(jax.random.PRNGKey(3), np.zeros((1, 32, 32, 3)))["params"])
  spec = swin_conv.SwinSpec(1, 8, (2, 2), (2, 4), 2, 4, 32)
  pth = tmp_path / "swin.pth"
  save_state_dict(pth, swin_conv.params_to_torch(params, spec), monkeypatch,
                  wrap=lambda t: {"model": t})
  out = tmp_path / "run"
  assert cli.main(["--from=torch", "--arch=swin", str(pth), str(out)]) == 0
  said = capsys.readouterr().out
  assert "method simmim, Swin v1 embed 8 depths (2, 2) window 4 at 32px" in said
  tr = train.Trainer.from_workdir(str(out), devices=jax.devices()[:1])
  enc = jax.device_get(tr.state["params"]["encoder"])
  assert sorted(enc) == sorted([*params, "mask_token"])      # a SimMIM run: its seeded token
  jax.tree.map(np.testing.assert_array_equal, {k: enc[k] for k in params}, params)
  assert cli.main(["--from=torch", "--arch=swinv2", str(pth), str(tmp_path / "v2")]) == 1
  assert "use --arch=swin" in capsys.readouterr().err
  assert cli.main(["--from=torch", "--arch=mvitv2", "--variant=base", str(pth), str(tmp_path / "m")]) == 1
  assert "--arch=mvitv2 takes no --variant" in capsys.readouterr().err


def test_cli_routes_mvitv2_to_its_converter(tmp_path, monkeypatch):
  from mim_jax.convert import mvit as mvit_conv
  seen = {}
  monkeypatch.setattr(mvit_conv, "convert_checkpoint",
                      lambda path, out, **kw: seen.update(path=path, out=out, **kw) or {})
  convert.convert_torch_checkpoint("in.pth", "OUT", "mvitv2", image_size=224, preset="p")
  assert seen == dict(path="in.pth", out="OUT", image_size=224, preset="p", config_dir="",
                      reader="pure")
