"""Linear centred kernel alignment (CKA; Kornblith et al., ICML 2019) between layers.

    CKA(X, Y) = ||Yc^T Xc||_F^2 / (||Xc^T Xc||_F ||Yc^T Yc||_F)

for X [n, d1] and Y [n, d2] whose rows are the same n examples and Xc, Yc the features with
each column's mean removed. This is the BIASED HSIC estimator with linear kernels
(HSIC = ||Yc^T Xc||_F^2 / (n-1)^2; the (n-1)^2 factors cancel), written in feature space so
the cost is O(n d1 d2) and memory O(d1 d2), never an n x n Gram matrix. CKA is invariant to
orthogonal transforms and isotropic scaling of either side, 1 for Y = X, and near 0 for
independent features when n >> d (the biased estimator gives about sqrt(d1 d2) / n for
independent isotropic features). Computed in float64 with numpy.
"""
from __future__ import annotations

from typing import Optional

import jax
import jax.numpy as jnp
import numpy as np

from mim_jax.models import vit

DEFINITION = ("linear CKA (Kornblith et al. 2019) with the biased HSIC estimator: "
              "||Yc^T Xc||_F^2 / (||Xc^T Xc||_F ||Yc^T Yc||_F), features centred per column "
              "over the n rows, float64")
POOLINGS = {
    "mean": "rows = images; features = mean of the block's patch tokens",
    "cls": "rows = images; features = the block's cls token",
    "tokens": "rows = (image, patch token) pairs, cls token excluded; features = the token",
}


def _centred(x) -> np.ndarray:
  x = np.asarray(x, np.float64)
  if x.ndim != 2:
    raise ValueError(f"CKA needs features [n, d], got shape {x.shape}")
  return x - x.mean(0, keepdims=True)


def _self_norm(xc: np.ndarray) -> float:
  return float(np.linalg.norm(xc.T @ xc))


def _cka_centred(xc, yc, x_norm: float, y_norm: float) -> float:
  denom = x_norm * y_norm
  if denom == 0.0:
    return float("nan")  # a constant representation has no similarity structure
  return float(np.linalg.norm(yc.T @ xc) ** 2 / denom)


def linear_cka(x, y) -> float:
  """Linear CKA in [0, 1] between features x [n, d1] and y [n, d2] of the same n examples
  (nan when one side is constant over the examples)."""
  xc, yc = _centred(x), _centred(y)
  if xc.shape[0] != yc.shape[0]:
    raise ValueError(f"CKA needs the same examples on both sides: {xc.shape[0]} vs {yc.shape[0]} rows")
  return _cka_centred(xc, yc, _self_norm(xc), _self_norm(yc))


def cka_matrix(a, b: Optional[np.ndarray] = None) -> np.ndarray:
  """[La, Lb] CKA between every layer of `a` [n, La, d] and every layer of `b` [n, Lb, d']
  (default: `a` itself, a symmetric matrix with ones on the diagonal)."""
  same = b is None
  layers_a = [_centred(np.asarray(a)[:, i]) for i in range(np.asarray(a).shape[1])]
  layers_b = layers_a if same else [_centred(np.asarray(b)[:, j]) for j in range(np.asarray(b).shape[1])]
  if layers_a[0].shape[0] != layers_b[0].shape[0]:
    raise ValueError(f"CKA needs the same examples on both sides: {layers_a[0].shape[0]} vs "
                     f"{layers_b[0].shape[0]} rows")
  norms_a = [_self_norm(x) for x in layers_a]
  norms_b = norms_a if same else [_self_norm(y) for y in layers_b]
  out = np.zeros((len(layers_a), len(layers_b)))
  for i, (x, nx) in enumerate(zip(layers_a, norms_a)):
    for j, (y, ny) in enumerate(zip(layers_b, norms_b)):
      if same and j < i:
        out[i, j] = out[j, i]
      else:
        out[i, j] = _cka_centred(x, y, nx, ny)
  return out


def pooled_blocks(block_outputs, pooling: str, has_cls: bool = True) -> jax.Array:
  """The blocks' outputs [B, 1+L, D] each (cls first; [B, L, D] without a cls token,
  `has_cls=False`) -> [B, depth, D] pooled ('mean' | 'cls'), or [B, depth, L, D] patch tokens
  ('tokens'), float32."""
  if pooling not in POOLINGS:
    raise ValueError(f"pooling must be one of {sorted(POOLINGS)}, got {pooling!r}")
  if pooling == "tokens":
    return jnp.stack([t[:, int(has_cls):] for t in block_outputs], axis=1).astype(jnp.float32)
  return jnp.stack([vit.pool(t, pooling, has_cls) for t in block_outputs], axis=1).astype(jnp.float32)


def layer_representations(encoder, params, images: jax.Array, pooling: str) -> jax.Array:
  """Every block's output (before the final norm) of a `vit.ViT` on un-masked images, pooled
  as `pooled_blocks` says."""
  _, inter = encoder.apply({"params": params}, images, mutable=["intermediates"])
  return pooled_blocks(inter["intermediates"]["encoder"]["block_outputs"], pooling,
                       encoder.cls_token)


def as_rows(features: np.ndarray) -> np.ndarray:
  """[B, depth, D] -> itself; [B, depth, L, D] (tokens) -> [B*L, depth, D]."""
  f = np.asarray(features)
  if f.ndim == 4:
    b, depth, l, d = f.shape
    return f.transpose(0, 2, 1, 3).reshape(b * l, depth, d)
  return f
