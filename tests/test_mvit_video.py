"""MViTv2 on clips (issue 29): SlowFast's video MViT (`slowfast/models/video_model_builder.py`
MViT, `attention.py`) as `config.model.num_frames` > 0 of models.mvit. Geometry and size of the
Kinetics MViTv2-S 16x4 against the yaml and the published count, the temporal relative
position term and the 3-D pooling convolution against loop re-derivations of the official
functions, per-frame mask upsampling, and the one-line errors."""
import json

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from mim_jax.models import mvit

# configs/Kinetics/MVITv2_S_16x4.yaml: 16 frames, patch (3, 7, 7) / (2, 4, 4) / (1, 3, 3),
# POOL_KVQ_KERNEL (3, 3, 3), POOL_KV_STRIDE_ADAPTIVE (1, 8, 8), CLS_EMBED_ON, REL_POS_SPATIAL
# and REL_POS_TEMPORAL; the rest as the image MViTv2-S.
K400_S = dict(variant="small", num_frames=16, kv_stride=8, cls_token=True)


def test_kinetics_mvitv2_s_block_plan():
  specs = mvit.from_config(mvit.default_config(**K400_S), 224).specs
  assert all(s.frames == 8 and s.pool_kernel_t == 3 and s.rel_pos_t_size == 15 for s in specs)
  # Query grids: 56 -> 28 -> 14 -> 7 at blocks 1, 3, 14. Key / value stride 8 divided by each
  # query stride on the way, applied to the block's input grid.
  assert [s.grid_q for s in specs] == [56] + [28] * 2 + [14] * 11 + [7] * 2
  assert [s.grid_kv for s in specs] == [7, 14, 7, 14] + [7] * 10 + [14, 7]
  assert [s.rel_pos_size for s in specs] == [111, 55, 55] + [27] * 12 + [13]


def test_kinetics_mvitv2_s_parameter_count():
  """The image MViTv2-S without head (34,101,216, tests/test_mvit.py) plus what the video
  model adds: the Conv3d patch kernel's two extra frames (2 x 7 x 7 x 3 x 96), per block the
  pooling kernels' two extra frames (3 convolutions x 2 x 3 x 3 x head dim 96) and rel_pos_t
  (15 x 96), the cls token (96), less the rel_pos tables that shrink where the key / value
  stride 8 pools to 14 instead of 28 (block 3: 27 rows instead of 55, two tables x 96). With
  a 400-class head: 34.5M, the MViTv2 paper's Kinetics-400 MViTv2-S."""
  model = mvit.from_config(mvit.default_config(**K400_S), 224)
  want = 34_101_216 + 2 * 7 * 7 * 3 * 96 + 16 * (3 * 2 * 9 * 96 + 15 * 96) + 96 - 2 * 28 * 96
  assert mvit.param_count(model) == want == 34_230_144
  assert round((want + 768 * 400 + 400) / 1e6, 1) == 34.5


def test_kinetics_mvitv2_b_32x3_parameter_count_is_the_papers():
  """configs/Kinetics/MVITv2_B_32x3.yaml (32 frames, the image MViTv2-B's blocks 2-3-16-3):
  51.2M with the 400-class head, the MViTv2 paper's Kinetics-400 MViTv2-B."""
  model = mvit.from_config(mvit.default_config(**dict(K400_S, variant="base", num_frames=32)),
                           224)
  assert model.frames == 16
  assert round((mvit.param_count(model) + 768 * 400 + 400) / 1e6, 1) == 51.2


def _official_rel_pos(q, rel_h, rel_w, rel_t, q_shape, k_shape, has_cls):
  """cal_rel_pos_spatial + cal_rel_pos_temporal on a zero attention map, one element at a
  time: q [heads, Nq, D] (cls first when has_cls) -> [heads, Nq, Nk]."""
  def dist(qn, kn, i, j):
    qr, kr = max(kn / qn, 1.0), max(qn / kn, 1.0)
    return int(np.float32(i * qr - j * kr + (kn - 1) * kr))
  (qt, qh, qw), (kt, kh, kw) = q_shape, k_shape
  s = int(has_cls)
  heads = q.shape[0]
  out = np.zeros((heads, s + qt * qh * qw, s + kt * kh * kw), np.float64)
  for h in range(heads):
    for a, (t, y, x) in enumerate(np.ndindex(qt, qh, qw)):
      v = q[h, s + a]
      for b, (t2, y2, x2) in enumerate(np.ndindex(kt, kh, kw)):
        out[h, s + a, s + b] = (v @ rel_h[dist(qh, kh, y, y2)] + v @ rel_w[dist(qw, kw, x, x2)]
                                + v @ rel_t[dist(qt, kt, t, t2)])
  return out


@pytest.mark.parametrize("has_cls", [True, False])
def test_temporal_and_spatial_relative_positions_equal_the_official(has_cls):
  rs = np.random.RandomState(0)
  heads, d, frames, qg, kg = 2, 4, 3, 4, 2
  n = int(has_cls) + frames * qg * qg
  q = rs.randn(1, n, heads, d).astype(np.float32)
  rel_h, rel_w = rs.randn(2 * qg - 1, d), rs.randn(2 * qg - 1, d)
  rel_t = rs.randn(2 * frames - 1, d)
  got = mvit.rel_pos_bias(jnp.asarray(q), jnp.asarray(rel_h), jnp.asarray(rel_w), qg, kg,
                          has_cls, jnp.asarray(rel_t), frames)
  want = _official_rel_pos(q[0].transpose(1, 0, 2), rel_h, rel_w, rel_t, (frames, qg, qg),
                           (frames, kg, kg), has_cls)
  np.testing.assert_allclose(np.asarray(got[0]), want, rtol=1e-4, atol=1e-4)


def test_depthwise_conv3d_equals_torch_conv3d_loops():
  """Conv3d(C, C, (3, 3, 3), stride (1, 2, 2), padding (1, 1, 1), groups=C, bias=False)."""
  rs = np.random.RandomState(1)
  x = rs.randn(2, 4, 7, 7, 3).astype(np.float32)
  kernel = rs.randn(3, 3, 3, 1, 3).astype(np.float32)
  got = np.asarray(mvit.depthwise_conv(jnp.asarray(x), jnp.asarray(kernel), 2))
  xp = np.pad(x, ((0, 0), (1, 1), (1, 1), (1, 1), (0, 0)))
  want = np.zeros((2, 4, 4, 4, 3))
  for b, t, i, j in np.ndindex(2, 4, 4, 4):
    window = xp[b, t:t + 3, 2 * i:2 * i + 3, 2 * j:2 * j + 3]       # [3, 3, 3, C]
    want[b, t, i, j] = (window * kernel[..., 0, :]).sum((0, 1, 2))
  np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-5)


def test_clip_mask_is_upsampled_frame_by_frame():
  mask = jnp.asarray([[1, 0, 0, 1, 0, 0, 1, 1]])           # 2 frames of 2 x 2
  up = np.asarray(mvit.upsample_mask(mask, 4, frames=2)).reshape(2, 4, 4)
  np.testing.assert_array_equal(up[0], np.kron([[1, 0], [0, 1]], np.ones((2, 2))))
  np.testing.assert_array_equal(up[1], np.kron([[0, 0], [1, 1]], np.ones((2, 2))))


TINY = dict(variant="tiny", embed_dim=8, num_heads=1, stage_blocks=(1, 1), stage_strides=(2,),
            patch_kernel=3, patch_stride=2, patch_padding=1, kv_stride=2, num_frames=4,
            cls_token=True)


def test_tiny_video_mvit_forward_and_mask_token():
  model = mvit.from_config(mvit.default_config(**TINY), 16, use_mask_token=True)
  clips = jax.random.normal(jax.random.PRNGKey(0), (2, 4, 16, 16, 3))
  variables = model.init(jax.random.PRNGKey(1), clips)
  enc = variables["params"]
  assert enc["patch_embed"]["proj"]["kernel"].shape == (3, 3, 3, 3, 8)
  assert enc["block00"]["attn"]["pool_q"]["kernel"].shape == (3, 3, 3, 1, 8)
  assert enc["block00"]["attn"]["rel_pos_t"].shape == (3, 8)
  out, _ = mvit.forward(model, variables, clips, train=False, pooling="cls")
  assert out["tokens"].shape == (2, 1 + 2 * 4 * 4, 16) and out["grid"] == (2, 4, 4)
  # Masking every token of the second token frame changes the output; masking none does not.
  none = jnp.zeros((2, 2 * 4 * 4), jnp.int32)
  second = jnp.concatenate([jnp.zeros((2, 16)), jnp.ones((2, 16))], 1).astype(jnp.int32)
  plain, _ = mvit.forward(model, variables, clips, train=False, pooling="cls", mask=none)
  masked, _ = mvit.forward(model, variables, clips, train=False, pooling="cls", mask=second)
  np.testing.assert_allclose(plain["tokens"], out["tokens"], rtol=1e-6, atol=1e-6)
  assert not np.allclose(masked["tokens"], out["tokens"], atol=1e-3)


def test_video_errors_are_one_line():
  model = mvit.from_config(mvit.default_config(**TINY), 16)
  with pytest.raises(ValueError, match="config.model.num_frames") as e:
    model.init(jax.random.PRNGKey(0), jnp.zeros((1, 16, 16, 3)))
  assert "\n" not in str(e.value)
  with pytest.raises(ValueError, match="4-frame clips, got 6"):
    model.init(jax.random.PRNGKey(0), jnp.zeros((1, 6, 16, 16, 3)))
  with pytest.raises(ValueError, match="token frames"):
    mvit.from_config(mvit.default_config(**dict(TINY, num_frames=5)), 16)
  with pytest.raises(ValueError, match="num_frames"):
    mvit.check_config(mvit.default_config(**dict(TINY, num_frames=-1)))


def test_maskmvit_names_round_trip_with_slowfast_layouts():
  """convert.mvit.entries for SlowFast's MaskMViT on clips (tools/official_parity.py reads a
  real one through it): Conv3d patch and pooling kernels [O, I, t, h, w], rel_pos_t,
  mask_token, the prediction head's norm and projection in place of norm / head; every
  parameter of MaskFeat's clips preset is named once and the layouts invert bit for bit."""
  from mim_jax import config_lib, methods
  from mim_jax.convert import mvit as convert_mvit
  from mim_jax.convert.names import ConversionError, put_shaped, take_shaped
  c = config_lib.load("maskfeat", "clips")
  m = methods.get(c)
  shapes = jax.eval_shape(m.init, jax.random.PRNGKey(0), jnp.zeros((1, 8, 32, 32, 3)))
  rs = np.random.RandomState(0)
  params = jax.tree.map(lambda s: rs.randn(*s.shape).astype(np.float32), shapes)
  ents = convert_mvit.entries(m.encoder, maskfeat_dim=m.head.out_dim)
  assert len({e.path for e in ents}) == len(ents) == len(jax.tree.leaves(params))
  sd = put_shaped(params, ents)
  assert "norm.weight" not in sd and "head.projection.weight" not in sd
  assert sd["pred_head.transforms.0.0.weight"].shape == (256,)
  assert sd["pred_head.projections.0.weight"].shape == (108, 256)
  assert sd["patch_embed.proj.weight"].shape == (32, 3, 3, 7, 7)          # [O, I, t, h, w]
  assert sd["blocks.1.attn.pool_q.weight"].shape == (32, 1, 3, 3, 3)
  assert sd["blocks.1.attn.rel_pos_t"].shape == (7, 32)                    # 2 x 4 frames - 1
  enc = params["encoder"]
  # torch weight[o, i, t, y, x] is the flax kernel[t, y, x, i, o].
  np.testing.assert_array_equal(sd["patch_embed.proj.weight"][5, 2, 1, 3, 4],
                                enc["patch_embed"]["proj"]["kernel"][1, 3, 4, 2, 5])
  np.testing.assert_array_equal(sd["blocks.1.attn.pool_k.weight"][7, 0, 2, 0, 1],
                                enc["block01"]["attn"]["pool_k"]["kernel"][2, 0, 1, 0, 7])
  back = take_shaped(sd, ents, lacks="lacks", not_ours="ours", misfit="fit")
  jax.tree.map(np.testing.assert_array_equal, back, jax.tree.map(np.asarray, params))
  with pytest.raises(ConversionError, match="blocks.1.attn.rel_pos_t"):
    take_shaped({k: v for k, v in sd.items() if k != "blocks.1.attn.rel_pos_t"}, ents,
                lacks="lacks", not_ours="ours", misfit="fit")


def test_cli_converts_a_video_maskmvit_checkpoint(tmp_path):
  """`python -m mim_jax.convert --from=torch --arch=mvitv2` on a SlowFast MaskMViT state dict
  (e.g. the released k400_MVIT_S_MaskFeat_PT_epoch_00300.pyth): the clip length from rel_pos_t,
  the Conv3d kernels' time extents, MaskFeat's kept last-stage grid (query strides 2, 2, 1) and
  the video kv stride 8 read as defaults, a configs/maskfeat.py workdir whose parameters are
  the checkpoint's."""
  import safetensors.numpy
  from mim_jax import config_lib, methods, train
  from mim_jax.convert import mvit as convert_mvit
  from mim_jax.convert import __main__ as cli
  from mim_jax.convert.names import put_shaped
  c = config_lib.load("maskfeat", "clips")
  c.model.update(embed_dim=8, stage_strides=(2, 2, 1), kv_stride=8)
  c.maskfeat.update(hog_cell=8, mask_window=(4, 2, 2))     # output grid 2x2, stride 16
  m = methods.get(c)
  shapes = jax.eval_shape(m.init, jax.random.PRNGKey(0), jnp.zeros((1, 8, 32, 32, 3)))
  rs = np.random.RandomState(1)
  params = jax.tree.map(lambda s: rs.randn(*s.shape).astype(np.float32), shapes)
  sd = put_shaped(params, convert_mvit.entries(m.encoder, maskfeat_dim=108))
  assert convert_mvit.is_video(sd) and convert_mvit.maskfeat_dim(sd) == 108
  path = tmp_path / "maskfeat_k400.safetensors"
  safetensors.numpy.save_file(sd, str(path))
  out = tmp_path / "run"
  assert cli.main(["--from=torch", "--arch=mvitv2", "--image_size=32", "--preset=clips",
                   str(path), str(out)]) == 0
  info = json.loads((out / "convert.json").read_text())
  assert info["method"] == "maskfeat" and info["initialised_not_converted"] == []
  spec = info["spec"]
  assert (spec["num_frames"], spec["patch_kernel_t"], spec["pool_kernel_t"], spec["kv_stride"],
          tuple(spec["stage_strides"]), spec["rel_pos_temporal"]) == (8, 3, 3, 8, (2, 2, 1), True)
  tr = train.Trainer.from_workdir(str(out), devices=jax.devices()[:1])
  jax.tree.map(np.testing.assert_array_equal, jax.device_get(tr.state["params"]), params)
  back = convert_mvit.params_to_official(jax.device_get(tr.state["params"]), tr.config.model, 32)
  assert sorted(back) == sorted(sd)
  # Other geometry is passed explicitly: the clips preset's own MViT (strides 2, 1, 1, kv 1).
  own = methods.get(config_lib.load("maskfeat", "clips"))
  own_shapes = jax.eval_shape(own.init, jax.random.PRNGKey(0), jnp.zeros((1, 8, 32, 32, 3)))
  own_sd = put_shaped(jax.tree.map(lambda s: np.zeros(s.shape, np.float32), own_shapes),
                      convert_mvit.entries(own.encoder, maskfeat_dim=108))
  _, cfg, _ = convert_mvit.official_to_params(own_sd, image_size=32, stage_strides=(2, 1, 1),
                                              kv_stride=1)
  want = config_lib.load("maskfeat", "clips").model
  for k in ("embed_dim", "num_heads", "stage_blocks", "stage_strides", "kv_stride", "num_frames",
            "patch_kernel_t", "pool_kernel_t", "dim_mul_in_att", "cls_token", "patch_kernel"):
    assert np.array_equal(cfg[k], want[k]), k


def test_video_conversion_configs():
  """A video classifier converts into configs/finetune.py:k400_mvitv2_s, its head on the
  final-norm cls token as SlowFast's supervised MViTv2_S_16x4 forward reads it (CLS_EMBED_ON,
  no USE_MEAN_POOLING), built on the embedded clips when the preset reads files; an image MViT
  keeps the default preset and 'avg' without a cls token, 'cls' with one (mvit's forward)."""
  from mim_jax.convert import mvit as convert_mvit
  video = mvit.default_config(**K400_S)
  c = convert_mvit.make_config(video, 400)
  assert (c.method, c.input.data.name, c.finetune.pooling, c.finetune.num_classes) == (
      "finetune", "video_csv", "cls", 400)
  no_cls = convert_mvit.make_config(mvit.default_config(**dict(K400_S, cls_token=False)), 400)
  assert no_cls.finetune.pooling == "avg"
  b = convert_mvit.build_config(c)
  assert (b.input.data.name, b.input.data.num_frames, b.input.batch_size) == (
      "embedded_clips", 16, jax.device_count())
  assert c.input.data.name == "video_csv"                       # the written config unchanged
  image = convert_mvit.make_config(mvit.default_config(variant="small"), 1000)
  assert (image.finetune.pooling, image.input.data.name) == ("avg", "embedded")
  with_cls = convert_mvit.make_config(mvit.default_config(variant="small", cls_token=True), 1000)
  assert with_cls.finetune.pooling == "cls"
  assert convert_mvit.build_config(image) is None
  pt = mvit.default_config(**dict(K400_S, stage_strides=(2, 2, 1)))   # MaskFeat's 14x14 output
  mf = convert_mvit.make_config(pt, 0, maskfeat=108)
  assert (mf.method, mf.input.data.name, mf.maskfeat.hog_cell) == ("maskfeat", "video_csv", 8)
  assert tuple(mf.maskfeat.mask_window) == ()      # the output grid: [8, 7, 7] here, as the yaml
