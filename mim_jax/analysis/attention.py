"""Attention statistics of a ViT: average attention distance, entropy and head diversity.

The analyses of "Revealing the Dark Secrets of Masked Image Modeling" (Xie et al., CVPR 2023)
and of the ViT paper's attention-distance figure (Dosovitskiy et al., 2021, Fig. 7), as pure
functions of one layer's attention maps `attn` [B, H, N, N] (rows: queries, columns: keys,
each row a probability distribution; cls token first when `has_cls`, then the patches in
row-major grid order, as `mim_jax.models.vit.Attention` sows them).

One convention for every statistic (CLS_RULE): only patch queries and patch keys count; each
query's weights over the patch keys are renormalised to sum to 1 (the cls row and column are
dropped). So a statistic describes where a patch looks among the patches; how much it looks
at the cls token is reported apart (`cls_attention_mass`).

Per-image functions (`*_per_image`) return [B, H] (the mean over the patch queries of one image);
the public functions average those over the images, [H]. Every image has the same number of
queries, so this is also the mean over all (image, query) pairs.
"""
from __future__ import annotations

from typing import Sequence, Union

import jax
import jax.numpy as jnp
import numpy as np

Grid = Union[int, Sequence[int]]

# log(p) is taken of max(p, LOG_EPS) in the KL divergence, so a key whose softmax weight
# underflowed to 0 gives a large finite term instead of inf/nan.
LOG_EPS = 1e-30

CLS_RULE = ("patch queries and patch keys only; each query's weights over the patch keys are "
            "renormalised to sum to 1 (the cls row and column are dropped)")
DEFINITIONS = {
    "attention_distance": (
        "for each image, patch query and head: sum over patch keys of weight x Euclidean distance "
        "between the query and key patch centres in input pixels (grid distance x patch size); "
        "mean over queries and images. Shape [depth, heads], pixels."),
    "attention_entropy": (
        "-sum_k p_k log p_k (nats) of each patch query's attention over the patch keys; mean over "
        "queries and images. Uniform attention over n keys gives log n. Shape [depth, heads]."),
    "head_kl": (
        "for head h: mean over the other heads g of KL(P_h || P_g) = sum_k P_h,k (log P_h,k - "
        "log P_g,k), per patch query, mean over queries and images (nats, log of max(p, 1e-30)). "
        "Shape [depth, heads]."),
    "head_diversity": (
        "mean of head_kl over the heads = mean over ordered head pairs h != g of KL(P_h || P_g), "
        "which equals the mean over unordered pairs of the symmetric 0.5 (KL(h||g) + KL(g||h)); "
        "0 when all heads attend alike. Shape [depth]."),
    "cls_attention_mass": (
        "weight a patch query puts on the cls key (before renormalisation); mean over queries "
        "and images. Shape [depth, heads]."),
}


def _grid_hw(grid: Grid) -> tuple[int, int]:
  if isinstance(grid, (int, np.integer)):
    return int(grid), int(grid)
  gh, gw = (int(g) for g in grid)
  return gh, gw


def pixel_distances(grid: Grid, patch_size: int) -> np.ndarray:
  """[L, L] Euclidean distances in pixels between the centres of the patches of a grid
  (row-major order): patch_size x the distance in grid cells."""
  gh, gw = _grid_hw(grid)
  rows, cols = np.meshgrid(np.arange(gh), np.arange(gw), indexing="ij")
  pos = np.stack([rows.reshape(-1), cols.reshape(-1)], axis=1).astype(np.float64)
  diff = pos[:, None, :] - pos[None, :, :]
  return (float(patch_size) * np.sqrt((diff ** 2).sum(-1))).astype(np.float32)


def patch_attention(attn: jax.Array, has_cls: bool = True) -> jax.Array:
  """[B, H, L, L]: the patch-query rows over the patch keys, renormalised (CLS_RULE)."""
  attn = jnp.asarray(attn, jnp.float32)
  if has_cls:
    attn = attn[:, :, 1:, 1:]
  return attn / jnp.maximum(attn.sum(-1, keepdims=True), 1e-30)


def _check(attn, grid: Grid, has_cls: bool) -> None:
  gh, gw = _grid_hw(grid)
  n = gh * gw + int(has_cls)
  if attn.ndim != 4 or attn.shape[-1] != n or attn.shape[-2] != n:
    raise ValueError(f"attention maps {tuple(attn.shape)} do not match a {gh}x{gw} grid "
                     f"{'with' if has_cls else 'without'} a cls token: expected [B, H, {n}, {n}]")


def attention_distance_per_image(attn, grid: Grid, patch_size: int, has_cls: bool = True) -> jax.Array:
  """[B, H] mean attention distance (pixels) over the patch queries of each image."""
  _check(attn, grid, has_cls)
  p = patch_attention(attn, has_cls)
  d = jnp.asarray(pixel_distances(grid, patch_size))
  return jnp.einsum("bhqk,qk->bhq", p, d).mean(-1)


def attention_distance(attn, grid: Grid, patch_size: int, has_cls: bool = True) -> jax.Array:
  """[H] average attention distance in pixels of each head (see DEFINITIONS)."""
  return attention_distance_per_image(attn, grid, patch_size, has_cls).mean(0)


def attention_entropy_per_image(attn, has_cls: bool = True) -> jax.Array:
  """[B, H] mean entropy (nats) of the patch queries' attention over the patch keys."""
  p = patch_attention(attn, has_cls)
  return -jax.scipy.special.xlogy(p, p).sum(-1).mean(-1)


def attention_entropy(attn, has_cls: bool = True) -> jax.Array:
  """[H] mean attention entropy of each head in nats (see DEFINITIONS)."""
  return attention_entropy_per_image(attn, has_cls).mean(0)


def head_kl_per_image(attn, has_cls: bool = True) -> jax.Array:
  """[B, H]: for head h the mean over heads g != h of KL(P_h || P_g), averaged over the patch
  queries of each image (0 for a single head)."""
  p = patch_attention(attn, has_cls)
  heads = p.shape[1]
  logp = jnp.log(jnp.maximum(p, LOG_EPS))
  self_term = (p * logp).sum(-1)                            # [B, H, Q] = -entropy
  cross = jnp.einsum("bhqk,bgqk->bhgq", p, logp)            # sum_k P_h log P_g
  kl = self_term[:, :, None, :] - cross                     # [B, H, G, Q], 0 on the diagonal
  off_diag = 1.0 - jnp.eye(heads, dtype=kl.dtype)
  per_head = jnp.einsum("bhgq,hg->bhq", kl, off_diag) / max(heads - 1, 1)
  return per_head.mean(-1)


def head_kl(attn, has_cls: bool = True) -> jax.Array:
  """[H] mean KL divergence of each head's attention from the other heads' (see DEFINITIONS)."""
  return head_kl_per_image(attn, has_cls).mean(0)


def head_diversity(attn, has_cls: bool = True) -> jax.Array:
  """Scalar: mean pairwise KL divergence between the heads' attention distributions."""
  return head_kl(attn, has_cls).mean()


def cls_attention_mass_per_image(attn) -> jax.Array:
  """[B, H] mean weight the patch queries put on the cls key."""
  return jnp.asarray(attn, jnp.float32)[:, :, 1:, 0].mean(-1)


def layer_statistics(attn_maps: Sequence[jax.Array], grid: Grid, patch_size: int) -> dict:
  """Per-image statistics of every layer: {name: [B, depth, H]} from the maps of each block
  (cls token first). Traceable, so a jitted forward returns these instead of the maps."""
  per_layer = []
  for a in attn_maps:
    per_layer.append(dict(
        attention_distance=attention_distance_per_image(a, grid, patch_size, True),
        attention_entropy=attention_entropy_per_image(a, True),
        head_kl=head_kl_per_image(a, True),
        cls_attention_mass=cls_attention_mass_per_image(a)))
  return {k: jnp.stack([s[k] for s in per_layer], axis=1) for k in per_layer[0]}


def attention_maps(encoder_intermediates: dict) -> list[jax.Array]:
  """The attention maps [B, H, N, N] of every block, in order, from a `vit.ViT`'s
  intermediates (`inter['intermediates']['encoder']`)."""
  blocks = sorted(k for k in encoder_intermediates if k.startswith("block") and k != "block_outputs")
  return [encoder_intermediates[b]["attn"]["attention"][0] for b in blocks]


def encoder_attention_maps(encoder, params, images: jax.Array) -> list[jax.Array]:
  """The attention maps [B, H, N, N] of every block of a `vit.ViT` on un-masked images."""
  _, inter = encoder.apply({"params": params}, images, mutable=["intermediates"])
  return attention_maps(inter["intermediates"]["encoder"])


def summarize(per_image: dict) -> dict:
  """Means over the images of `layer_statistics` outputs (numpy [N, depth, H] each):
  {name: [depth, H]} plus head_diversity [depth]."""
  out = {k: np.asarray(v, np.float64).mean(0) for k, v in per_image.items()}
  out["head_diversity"] = out["head_kl"].mean(-1)
  return out
