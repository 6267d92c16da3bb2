"""VideoMAE (Tong et al., NeurIPS 2022), with VideoMAE V2's dual masking (Wang et al., CVPR 2023).

Exact to MCG-NJU/VideoMAE (modeling_pretrain.py, engine_for_pretraining.py,
masking_generator.py) and, for the decoder masking, OpenGVLab/VideoMAEv2
(models/modeling_pretrain.py, engine_for_pretraining.py, dataset/masking_generator.py):

  * clips [B, T, H, W, 3] are cut into tubelet x patch x patch cubes (2 x 16 x 16) by the
    encoder's Conv3d patch embedding, T/2 * h * w tokens in (t, h, w) order, plus the fixed 1-D
    sinusoid table (`vit.sinusoid_table`); no cls token (the space-time ViT of models/vit.py with
    `tubelet`, `cls_token=False`, `pos_embed='sinusoid'`, q and v biases);
  * tube masking: one random spatial mask of exactly int(ratio * h * w) patches per clip,
    repeated over every time slice (`data.video.tube_mask`; 90%);
  * the encoder sees the visible tokens only (`x[~mask]`, position order), ends with its
    LayerNorm; `encoder_to_decoder` (Linear, no bias) maps them to the decoder width;
  * decoder input: [visible + their positions, mask token + the positions it decodes], the
    decoder's own sinusoid table (VideoMAE does not un-shuffle, it shuffles the table; the
    order does not change the attention); blocks; LayerNorm and the head (to
    tubelet * p * p * 3) on the mask-token rows only;
  * target: the clip un-normalised to [0, 1], cut into cubes laid out
    'b c (t p0) (h p1) (w p2) -> b (t h w) (p0 p1 p2) c'; with normalize_target each cube is
    standardised per channel over its t*p*p pixels, (x - mean) / (std + 1e-6) with the unbiased
    std (eps on the std, not the variance), then flattened as (p0 p1 p2 c) (`videomae_target`);
  * loss: MSE over the predicted tokens: the mean over masked tokens of the per-token mean
    (V1's nn.MSELoss on [B, N_mask, C], the same value since every clip masks as many tokens);
  * V2 dual masking (`videomae.decoder_mask_ratio` > 0, 0.5 in V2): VideoMAE V2's
    `RunningCellMaskingGenerator` (`data.video.running_cell_mask`) marks the tokens the decoder
    drops; the decoder gets the encoder's visible tokens and a mask token at EVERY position the
    running cell keeps (`decode_vis = ~decode_mask`, visible positions included), and the loss
    is the per-token MSE averaged over those of them the encoder did not see
    (`cal_loss_mask = bool_masked_pos[~decode_masked_pos]`). With ratio 0, V2 sets the decoder
    mask to the complement of the encoder's, which is VideoMAE V1;
  * init: the encoder's and decoder's Linear layers xavier-uniform with zero biases, LayerNorms
    1 / 0 (their `_init_weights`); the Conv3d patch embedding and `encoder_to_decoder` keep
    PyTorch's default U(+-1/sqrt(fan_in)) (`_init_weights` is never applied to the top module);
    the mask token trunc_normal(std .02) cut at +-.02 (the file's own trunc_normal_, a=-std,
    b=std); weight decay on every >= 2-D parameter but the mask token (optim_factory:
    1-D, '.bias' and the top module's no_weight_decay() names).

`features` (kNN, linear probe) are the encoder's final-norm tokens of the whole clip averaged
(pooling 'mean'; VideoMAE's fine-tuning instead averages the last block's tokens and applies a
fresh `fc_norm`). Deviations: none in the method; the CPU preset's data and augmentation are
described in configs/videomae.py. `reconstruct` draws the official visualisation's picture
(each predicted cube un-normalised with its own statistics).
"""
from __future__ import annotations

import flax.linen as nn
import jax
import jax.numpy as jnp

from mim_jax import models
from mim_jax.data import video
from mim_jax.methods.base import Method
from mim_jax.methods.mae import mae_loss
from mim_jax.models import vit


def videomae_target(images: jax.Array, mean, std, tubelet: int, patch: int,
                    normalize: bool) -> jax.Array:
  """VideoMAE's regression target of every cube: normalised clips [B, T, H, W, 3] ->
  float32 [B, T/t * h * w, t * p * p * 3] (tokens in (t, h, w) order, values in (p0 p1 p2 c)
  order), as engine_for_pretraining.py builds `videos_patch` (see the module docstring)."""
  x = to_cubes(_unnormalise(images, mean, std), tubelet, patch)
  if normalize:
    mu, sd = cube_stats(x)
    x = (x - mu) / sd
  return x.reshape(x.shape[:2] + (-1,))


def _unnormalise(images, mean, std):
  return images.astype(jnp.float32) * jnp.asarray(std, jnp.float32) + jnp.asarray(mean, jnp.float32)


def to_cubes(clips: jax.Array, tubelet: int, patch: int) -> jax.Array:
  """[B, T, H, W, C] -> [B, L, t*p*p, C]: cubes in (t, h, w) order, pixels (p0 p1 p2)."""
  b, tt, hh, ww, c = clips.shape
  t, p = tubelet, patch
  x = clips.reshape(b, tt // t, t, hh // p, p, ww // p, p, c).transpose(0, 1, 3, 5, 2, 4, 6, 7)
  return x.reshape(b, (tt // t) * (hh // p) * (ww // p), t * p * p, c)


def from_cubes(cubes: jax.Array, shape, tubelet: int, patch: int) -> jax.Array:
  """The inverse of `to_cubes` for clips of ``shape`` [B, T, H, W, C]."""
  b, tt, hh, ww, c = shape
  t, p = tubelet, patch
  x = cubes.reshape(b, tt // t, hh // p, ww // p, t, p, p, c).transpose(0, 1, 4, 2, 5, 3, 6, 7)
  return x.reshape(shape)


def cube_stats(cubes: jax.Array):
  """Per-cube, per-channel mean and unbiased std + 1e-6 over the cube's pixels (axis -2)."""
  return (cubes.mean(axis=-2, keepdims=True),
          jnp.sqrt(cubes.var(axis=-2, ddof=1, keepdims=True)) + 1e-6)


def token_ids(mask: jax.Array, count: int) -> jax.Array:
  """The positions where the bool mask [B, L] is False, ascending, when each row has exactly
  `count` of them: int32 [B, count] (the order of `x[~mask]`); the True ones follow them."""
  return jnp.argsort(mask.astype(jnp.int32), axis=1, stable=True)[:, :count].astype(jnp.int32)


class VideoMAEDecoder(nn.Module):
  """`encoder_to_decoder`, the mask token, the decoder's sinusoid table, blocks, norm and head
  (parameters: encoder_to_decoder, mask_token, blocks/blockNN, norm, head)."""
  num_tokens: int
  out_dim: int
  width: int = 384
  depth: int = 4
  heads: int = 6
  qkv_bias: str = "qv"
  drop_path: float = 0.0
  remat: bool = False
  attn_impl: str | None = None
  attn_pad: int = -1
  dtype: jnp.dtype = jnp.float32
  param_dtype: jnp.dtype = jnp.float32
  qkv_proj: str = "fused"
  residual_dtype: jnp.dtype = jnp.float32
  ln_impl: str = "flax"
  remat_policy: str = "full"

  @nn.compact
  def __call__(self, latent, keep_ids, decode_ids, deterministic=True):
    """latent [B, K, D_enc] (the encoder's tokens at keep_ids [B, K]); decode_ids [B, M] the
    positions the mask tokens take -> predictions [B, M, out_dim] float32."""
    x = nn.Dense(self.width, use_bias=False, dtype=self.dtype, param_dtype=self.param_dtype,
                 kernel_init=vit.torch_default_uniform(latent.shape[-1]),
                 name="encoder_to_decoder")(latent).astype(jnp.float32)
    mask_token = self.param("mask_token", vit.trunc_normal(0.02, cutoff=1.0), (1, 1, self.width),
                            self.param_dtype).astype(jnp.float32)
    pos = jnp.asarray(vit.sinusoid_table(self.num_tokens, self.width))
    x = jnp.concatenate([x + pos[keep_ids], mask_token + pos[decode_ids]], axis=1)
    x = vit.Encoder(self.depth, self.heads, qkv_bias=self.qkv_bias, drop_path=self.drop_path,
                    remat=self.remat, attn_impl=self.attn_impl, final_norm=False,
                    dtype=self.dtype, param_dtype=self.param_dtype, attn_pad=self.attn_pad,
                    qkv_proj=self.qkv_proj, ln_impl=self.ln_impl,
                    remat_policy=self.remat_policy, name="blocks")(
                        x.astype(self.residual_dtype), None, deterministic)
    x = vit.layer_norm("norm", self.param_dtype, impl=self.ln_impl)(x[:, -decode_ids.shape[1]:])
    x = nn.Dense(self.out_dim, dtype=self.dtype, param_dtype=self.param_dtype,
                 kernel_init=vit.xavier_uniform, name="head")(x)
    return x.astype(jnp.float32)


class VideoMAE(Method):
  name = "videomae"
  # optim_factory.get_parameter_groups: no decay on 1-D parameters, biases and the top
  # module's no_weight_decay() names, of which only 'mask_token' exists in a VideoMAE.
  no_decay_names = ("mask_token",)

  def __init__(self, config):
    super().__init__(config)
    c, m = config.videomae, config.model
    if models.name_of(m) != "vit" or int(m.get("tubelet", 0) or 0) < 1:
      raise ValueError("VideoMAE runs on the space-time ViT: set config.model.name='vit' and "
                       "config.model.tubelet (2 in VideoMAE)")
    if m.get("cls_token", True):
      raise ValueError("VideoMAE's encoder has no cls token: set config.model.cls_token=False")
    self.tubelet = int(m.tubelet)
    self.patch = int(m.patch_size)
    self.num_frames = int(config.input.data.get("num_frames", 0) or 0)
    if self.num_frames < 1 or self.num_frames % self.tubelet:
      raise ValueError(f"config.input.data.num_frames={self.num_frames} must be a positive "
                       f"multiple of config.model.tubelet={self.tubelet}")
    if self.image_size % self.patch:
      raise ValueError(f"config.input.image_size={self.image_size} is not a multiple of "
                       f"config.model.patch_size={self.patch}")
    self.t_grid = self.num_frames // self.tubelet
    self.grid = self.image_size // self.patch
    self.num_tokens = self.t_grid * self.grid ** 2
    self.mask_ratio = float(c.mask_ratio)
    per_slice = int(self.mask_ratio * self.grid ** 2)           # TubeMaskingGenerator's count
    if not 0 < per_slice < self.grid ** 2:
      raise ValueError(f"config.videomae.mask_ratio={self.mask_ratio} masks {per_slice} of the "
                       f"{self.grid ** 2} patches of a frame: use a ratio that masks some, not all")
    self.num_visible = self.t_grid * (self.grid ** 2 - per_slice)
    self.decoder_mask_ratio = float(c.get("decoder_mask_ratio", 0.0))
    if self.decoder_mask_ratio > 0:
      cell_masked = int(4 * self.decoder_mask_ratio)           # RunningCellMaskingGenerator
      if not 0 < cell_masked < 4 or self.grid % 2:
        raise ValueError(f"config.videomae.decoder_mask_ratio={self.decoder_mask_ratio} on a "
                         f"{self.grid}x{self.grid} patch grid: the running cell needs a ratio in "
                         "[0.25, 1) and an even grid (or 0: no decoder masking)")
      self.num_decoded = self.num_tokens * (4 - cell_masked) // 4
    else:
      self.num_decoded = self.num_tokens - self.num_visible
    self.normalize_target = bool(c.normalize_target)
    d = c.decoder
    self.decoder = VideoMAEDecoder(
        self.num_tokens, self.tubelet * self.patch ** 2 * 3, int(d.width), int(d.depth),
        int(d.heads), m.get("qkv_bias", "qkv"), float(m.get("drop_path", 0.0)),
        **vit.execution_options(m))

  def encoder_overrides(self) -> dict:
    # The Conv3d patch embedding keeps PyTorch's default init (kernel and bias).
    return {"patch_kernel_init": "torch", "patch_bias_init": "torch"}

  def masks(self, rng: jax.Array, batch: int) -> tuple[jax.Array, jax.Array, jax.Array]:
    """(mask bool [B, L] True = hidden from the encoder, keep_ids [B, K] the visible
    positions ascending, decode_ids [B, M] the positions the decoder predicts ascending)."""
    k_tube, k_cell = jax.random.split(rng)
    mask = video.tube_mask(k_tube, batch, self.t_grid, self.grid, self.grid, self.mask_ratio)
    mask = mask.reshape(batch, self.num_tokens)
    keep_ids = token_ids(mask, self.num_visible)
    if self.decoder_mask_ratio > 0:
      cell = video.running_cell_mask(batch, self.t_grid, self.grid, self.grid,
                                     self.decoder_mask_ratio, rng=k_cell)
      decode_ids = token_ids(cell.reshape(batch, self.num_tokens), self.num_decoded)
    else:
      decode_ids = token_ids(~mask, self.num_decoded)
    return mask, keep_ids, decode_ids

  def init(self, rng, images):
    r_enc, r_dec, r_mask = jax.random.split(rng, 3)
    enc = self.encoder.init(r_enc, images)["params"]
    _, keep_ids, decode_ids = self.masks(r_mask, images.shape[0])
    latent = self.encoder.apply({"params": enc}, images, keep_ids=keep_ids)
    dec = self.decoder.init(r_dec, latent, keep_ids, decode_ids)["params"]
    return {"encoder": enc, "decoder": dec}

  def forward(self, params, images, rng, train: bool = True):
    """(predictions [B, M, t*p*p*3], mask [B, L], decode_ids [B, M])."""
    k_mask, k_enc, k_dec = jax.random.split(rng, 3)
    mask, keep_ids, decode_ids = self.masks(k_mask, images.shape[0])
    drop = train and float(self.config.model.get("drop_path", 0.0)) > 0
    latent = self.encoder.apply({"params": params["encoder"]}, images, keep_ids=keep_ids,
                                deterministic=not drop, rngs={"dropout": k_enc} if drop else None)
    pred = self.decoder.apply({"params": params["decoder"]}, latent, keep_ids, decode_ids,
                              deterministic=not drop, rngs={"dropout": k_dec} if drop else None)
    return pred, mask, decode_ids

  def loss(self, params, state, images, rng, step):
    pred, mask, decode_ids = self.forward(params, images, rng)
    target = videomae_target(images, self.config.input.mean, self.config.input.std,
                             self.tubelet, self.patch, self.normalize_target)
    target = jnp.take_along_axis(target, decode_ids[..., None], axis=1)
    weight = jnp.take_along_axis(mask, decode_ids, axis=1).astype(jnp.float32)
    loss = mae_loss(pred, target, weight)
    return loss, {"mask_ratio": jnp.mean(mask.astype(jnp.float32)),
                  "decoded_masked": jnp.mean(weight)}

  def reconstruct(self, params, state, images, rng):
    """The clips with the predicted cubes pasted in, as VideoMAE's ``run_videomae_vis.py``
    draws them: with the normalised target, each predicted cube is mapped back with that
    cube's own mean and std (the official picture does so; they are not what the model saw);
    the masked clips black out the cubes hidden from the encoder. Returned normalised like
    the input ([B, T, H, W, 3])."""
    mean, std = self.config.input.mean, self.config.input.std
    pred, mask, decode_ids = self.forward(params, images, rng, train=False)
    cubes = to_cubes(_unnormalise(images, mean, std), self.tubelet, self.patch)
    mu, sd = cube_stats(cubes)
    shown = (cubes - mu) / sd if self.normalize_target else cubes
    pred = pred.reshape(pred.shape[:2] + cubes.shape[2:])
    # paste the predictions at the decoded positions the encoder did not see
    hidden = jnp.take_along_axis(mask, decode_ids, axis=1)[..., None, None]
    rows = jnp.arange(cubes.shape[0])[:, None]
    rec = shown.at[rows, decode_ids].set(
        jnp.where(hidden, pred, jnp.take_along_axis(shown, decode_ids[..., None, None], axis=1)))
    if self.normalize_target:
      rec = rec * sd + mu
    keep = (~mask)[..., None, None].astype(jnp.float32)
    renorm = lambda x: ((from_cubes(x, images.shape, self.tubelet, self.patch)   # noqa: E731
                         - jnp.asarray(mean, jnp.float32)) / jnp.asarray(std, jnp.float32))
    return {"masked": renorm(cubes * keep), "reconstruction": renorm(rec)}

  def describe(self) -> dict:
    return {**super().describe(), "num_frames": self.num_frames}
