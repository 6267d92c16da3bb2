"""The PyTorch reference for benchmarks/speed.py: MAE with the official architecture.

Written for this benchmark after facebookresearch/mae `models_mae.py` (not copied): timm `Block`s
(qkv bias, LayerNorm eps 1e-6, exact GELU; timm's attention calls fused SDPA), timm's
`PatchEmbed` applied to all patches (so the state-dict names are the official ones), fixed 2-D
sin-cos position embeddings, per-sample random masking by argsort of uniform noise, the 8-block
512-wide decoder, norm_pix_loss MSE over the masked patches. Trained as the official script
does, with bf16 autocast instead of its fp16 GradScaler, and AdamW(betas 0.9/0.95, wd 0.05 off
biases and norms) in its fused form.

  python benchmarks/torch_mae.py --variant base --batch 256 [--compile]

prints one `RESULT {json}` line: images/s, step time and peak memory.
"""
from __future__ import annotations

import argparse
import json
import time
from functools import partial

import numpy as np
import torch
import torch.nn as nn
from timm.models.vision_transformer import Block, PatchEmbed

VARIANTS = {"base": (768, 12, 12, 16), "large": (1024, 24, 16, 16), "huge": (1280, 32, 16, 14)}


def sincos_2d(dim: int, grid: int) -> np.ndarray:
  """[1 + grid*grid, dim] embedding, zero row for cls; half the channels per axis (w, then h)."""
  def one_d(d, pos):
    omega = 1.0 / 10000 ** (np.arange(d // 2, dtype=np.float64) / (d / 2.0))
    out = pos.reshape(-1)[:, None].astype(np.float64) * omega[None]
    return np.concatenate([np.sin(out), np.cos(out)], axis=1)
  gw, gh = np.meshgrid(np.arange(grid, dtype=np.float32), np.arange(grid, dtype=np.float32))
  emb = np.concatenate([one_d(dim // 2, gw), one_d(dim // 2, gh)], axis=1)
  return np.concatenate([np.zeros([1, dim]), emb], axis=0).astype(np.float32)


class TorchMAE(nn.Module):

  def __init__(self, variant="base", img=224, dec_dim=512, dec_depth=8, dec_heads=16,
               mask_ratio=0.75, norm_pix=True):
    """`variant`: a name in VARIANTS or a (width, depth, heads, patch) tuple (the tests' tiny
    model)."""
    super().__init__()
    dim, depth, heads, patch = VARIANTS[variant] if isinstance(variant, str) else variant
    self.patch, self.grid, self.mask_ratio, self.norm_pix = patch, img // patch, mask_ratio, norm_pix
    norm = partial(nn.LayerNorm, eps=1e-6)
    self.patch_embed = PatchEmbed(img, patch, 3, dim)      # the official names: patch_embed.proj.*
    self.cls_token = nn.Parameter(torch.zeros(1, 1, dim))
    self.register_buffer("pos_embed", torch.from_numpy(sincos_2d(dim, self.grid))[None])
    self.blocks = nn.ModuleList([Block(dim, heads, 4.0, qkv_bias=True, norm_layer=norm)
                                 for _ in range(depth)])
    self.norm = norm(dim)
    self.decoder_embed = nn.Linear(dim, dec_dim)
    self.mask_token = nn.Parameter(torch.zeros(1, 1, dec_dim))
    self.register_buffer("decoder_pos_embed", torch.from_numpy(sincos_2d(dec_dim, self.grid))[None])
    self.decoder_blocks = nn.ModuleList([Block(dec_dim, dec_heads, 4.0, qkv_bias=True, norm_layer=norm)
                                         for _ in range(dec_depth)])
    self.decoder_norm = norm(dec_dim)
    self.decoder_pred = nn.Linear(dec_dim, patch * patch * 3)
    # Official init: xavier-uniform Linears (and the patch conv seen as a Linear), zero biases,
    # N(0, .02) tokens, unit LayerNorms.
    nn.init.xavier_uniform_(self.patch_embed.proj.weight.view(dim, -1))
    nn.init.normal_(self.cls_token, std=0.02)
    nn.init.normal_(self.mask_token, std=0.02)
    for m in self.modules():
      if isinstance(m, nn.Linear):
        nn.init.xavier_uniform_(m.weight)
        if m.bias is not None:
          nn.init.zeros_(m.bias)
      elif isinstance(m, nn.LayerNorm):
        nn.init.ones_(m.weight)
        nn.init.zeros_(m.bias)

  def patchify(self, imgs):
    n, c, _, _ = imgs.shape
    g, p = self.grid, self.patch
    x = imgs.reshape(n, c, g, p, g, p).permute(0, 2, 4, 3, 5, 1)   # n, h, w, p, q, c
    return x.reshape(n, g * g, p * p * c)

  def forward(self, imgs):
    return self.forward_all(imgs)[0]

  def forward_all(self, imgs, noise=None):
    """-> (loss, latent [N, 1+K, D], pred [N, L, p*p*3], mask [N, L]); `noise` [N, L] fixes the
    masking (the official `random_masking` draws it uniformly)."""
    # Encoder on the visible patches.
    x = self.patch_embed(imgs) + self.pos_embed[:, 1:]
    n, length, d = x.shape
    keep = int(length * (1 - self.mask_ratio))
    if noise is None:
      noise = torch.rand(n, length, device=x.device)
    ids_shuffle = torch.argsort(noise, dim=1)
    ids_restore = torch.argsort(ids_shuffle, dim=1)
    x = torch.gather(x, 1, ids_shuffle[:, :keep, None].expand(-1, -1, d))
    mask = torch.ones(n, length, device=x.device)
    mask[:, :keep] = 0
    mask = torch.gather(mask, 1, ids_restore)
    cls = (self.cls_token + self.pos_embed[:, :1]).expand(n, -1, -1)
    x = torch.cat([cls, x], dim=1)
    for blk in self.blocks:
      x = blk(x)
    latent = x = self.norm(x)
    # Decoder on all patches.
    x = self.decoder_embed(x)
    tokens = torch.cat([x[:, 1:], self.mask_token.expand(n, length - keep, -1)], dim=1)
    tokens = torch.gather(tokens, 1, ids_restore[:, :, None].expand(-1, -1, x.shape[2]))
    x = torch.cat([x[:, :1], tokens], dim=1) + self.decoder_pos_embed
    for blk in self.decoder_blocks:
      x = blk(x)
    pred = self.decoder_pred(self.decoder_norm(x))[:, 1:]
    # Loss.
    target = self.patchify(imgs)
    if self.norm_pix:
      mean = target.mean(dim=-1, keepdim=True)
      var = target.var(dim=-1, keepdim=True)
      target = (target - mean) / (var + 1.0e-6) ** 0.5
    loss = ((pred - target) ** 2).mean(dim=-1)
    return (loss * mask).sum() / mask.sum(), latent, pred, mask


def run(variant: str, batch: int, compile_: bool, steps: int = 20, repeats: int = 3,
        warmup: int = 5) -> dict:
  torch.manual_seed(0)
  torch.backends.cuda.matmul.allow_tf32 = True
  torch.backends.cudnn.allow_tf32 = True
  model = TorchMAE(variant).cuda()
  decay = [p for n, p in model.named_parameters() if p.ndim > 1 and "token" not in n]
  no_decay = [p for n, p in model.named_parameters() if not (p.ndim > 1 and "token" not in n)]
  opt = torch.optim.AdamW([{"params": decay, "weight_decay": 0.05},
                           {"params": no_decay, "weight_decay": 0.0}],
                          lr=1.5e-4, betas=(0.9, 0.95), fused=True)
  fwd = torch.compile(model) if compile_ else model
  gen = torch.Generator(device="cuda").manual_seed(0)
  batches = [torch.randn(batch, 3, 224, 224, device="cuda", generator=gen) for _ in range(2)]

  def step(i):
    with torch.autocast("cuda", dtype=torch.bfloat16):
      loss = fwd(batches[i % 2])
    loss.backward()
    opt.step()
    opt.zero_grad(set_to_none=True)
    return loss

  t0 = time.perf_counter()
  for i in range(warmup):
    loss = step(i)
  torch.cuda.synchronize()
  warm_s = time.perf_counter() - t0
  torch.cuda.reset_peak_memory_stats()
  times = []
  for _ in range(repeats):
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    start.record()
    for i in range(steps):
      loss = step(i)
    end.record()
    torch.cuda.synchronize()
    times.append(start.elapsed_time(end) / 1e3 / steps)
  step_s = float(np.median(times))
  return {"impl": "torch.compile" if compile_ else "torch eager", "method": "mae",
          "variant": variant, "batch": batch, "step_s": step_s, "img_s": batch / step_s,
          "peak_gib": torch.cuda.max_memory_allocated() / 2**30, "warmup_s": warm_s,
          "loss": float(loss), "spread": (max(times) - min(times)) / step_s}


def main():
  ap = argparse.ArgumentParser()
  ap.add_argument("--variant", default="base", choices=sorted(VARIANTS))
  ap.add_argument("--batch", type=int, default=256)
  ap.add_argument("--compile", action="store_true")
  ap.add_argument("--steps", type=int, default=20)
  args = ap.parse_args()
  print("RESULT " + json.dumps(run(args.variant, args.batch, args.compile, args.steps)), flush=True)


if __name__ == "__main__":
  main()
