"""Jigsaw puzzles (Noroozi & Favaro, ECCV 2016), Jigsaw++ (Noroozi et al., CVPR 2018) and the
damaged jigsaw (Kim, Cho, Yoo & Kweon, WACV 2018) as switches of one method.

The puzzle (the paper's Sec. 3.3 and bbrattoli/JigsawPuzzlePytorch's
Dataset/JigsawImageLoader.py):
  * the image (in [0, 1]) is turned grey with probability `gray_prob` (the port: 0.3;
    Jigsaw++: 0.7), resized to `resize` px (0: as it comes), a `grid` x `grid` window is cut
    at a uniformly random position, divided into 3 x 3 cells of `cell` px and in each cell a
    `tile` x `tile` tile is cut at a uniformly random offset (`sample_tile_origins`,
    `cut_tiles`). The paper: 256 px image, 225 window, 75 cells, 64 tiles. Each colour channel
    of a tile is cut `channel_jitter` px (uniform in [-j, j] per axis) away from the tile's
    position (the paper's spatial colour-channel jitter against chromatic aberration, 2 px);
  * each tile is normalised by its own per-channel mean and (unbiased) standard deviation, a
    zero standard deviation counted as 1 (`normalize_tiles`, the loader's Normalize per tile);
  * a class k of the permutation set is drawn uniformly; position t receives tile perm_k[t]
    (`permute_tiles`, the loader's `tiles[self.permutations[order][t]]`); the label is k.
The permutation set: `data.permutations.maximal_hamming_permutations` (Algorithm 1, 1,000
permutations, average Hamming distance 8.008 and minimum 2 for seed 0; the port's released
permutations_1000.npy: 8.005 and 2).

The context-free network (JigsawNetwork.py `Network`): the backbone (config.model; the
official AlexNet has conv1 stride 2 on its 64 px tiles, here `tile_conv1_stride` on the
'imagenet' stem, evaluation keeping config.model's stride 4 as the paper's transfer) runs on
every tile with shared weights (one forward over the 9B tiles: BatchNorm statistics over all of
them); per tile fc6 = Linear(flattened pool5, 1024) + ReLU + Dropout(0.5); the nine fc6 outputs
concatenated in position order; fc7 = Linear(9 x 1024, 4096) + ReLU + Dropout(0.5); fc8 =
Linear(4096, number of permutations); cross-entropy over the permutation index (`JigsawHead`,
`jigsaw_loss`). Linear layers have PyTorch's default init (the port's weights_init is
commented out).

Jigsaw++ (`plus_plus`, the paper's Sec. 4): a random number of tiles, 0, 1 or 2
(`max_occluded`) uniformly, at random grid positions, are replaced by tiles of another image
(`occlude_tiles`) before the shuffle; the permutation set has a minimum Hamming distance of 3
(`data.permutations.jigsaw_pp_permutations`, 701 permutations) so that the seven or more
remaining tiles determine the class. Unspecified by the paper and chosen here: the other image
is another image of the batch (a uniformly random other index), the replacing tile is that
image's tile at the same grid position, and the set is built by the greedy rule restricted to
distance >= 3 (average distance 8.011 for seed 0; the paper reports its set's average as .86
of 9 positions, without saying how it was selected).

Damaged jigsaw (`damaged.enabled`, Kim et al.): the tiles are given without colour (the L of
Lab, `targets.lab.rgb_to_lab`, replicated to three channels before the per-tile normalisation)
and with one tile removed (all zeros after normalisation, at a uniformly random grid position);
the network solves the permutation (cross-entropy), inpaints the missing tile (L2 on its RGB in
the normalised image space, from fc7) and colorizes the present tiles (L2 on ab / 110, from
each tile's fc6). The total loss is jigsaw_weight x CE + inpaint_weight x L2 + color_weight x
L2. THE PAPER'S TEXT WAS NOT AVAILABLE WHILE THIS WAS WRITTEN: its decoders (here one Linear
layer each), its colorization loss (here an L2 regression of ab, not Zhang et al.'s 313-bin
classification), any adversarial term of its inpainting and its loss weights (here 1, 1, 1)
are not from the paper; the sub-tasks can be switched off one by one (`remove_tile`, `decolor`,
weights 0).

`reconstruct` (the evaluator's picture): 'masked' is the shuffled puzzle laid out on the 3 x 3
grid (the raw tiles, not normalised, so people see the image), 'reconstruction' the same tiles
put back where the predicted permutation says they belong; both resized to the input size.
"""
from __future__ import annotations

from typing import Optional

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax

from mim_jax import models
from mim_jax.data import permutations as perm_lib
from mim_jax.methods.base import Method
from mim_jax.methods.rotation import torch_dense

GRAY_WEIGHTS = (0.299, 0.587, 0.114)     # PIL's convert('L'), the port's greyscale


# ---------------------------------------------------------------------------------------------
# The puzzle as pure functions.

def check_geometry(size: int, grid: int, cell: int, tile: int, jitter: int = 0) -> None:
  """ValueError naming the fix when the window, cells and tiles do not fit."""
  if grid != 3 * cell:
    raise ValueError(f"jigsaw.grid={grid} must be 3 x jigsaw.cell ({3 * cell})")
  if not 0 < tile <= cell:
    raise ValueError(f"jigsaw.tile={tile}: use 1 .. jigsaw.cell ({cell})")
  if grid > size:
    raise ValueError(f"jigsaw.grid={grid} exceeds the {size} px image: lower jigsaw.cell or "
                     f"raise jigsaw.resize")
  if jitter < 0:
    raise ValueError(f"jigsaw.channel_jitter={jitter}: use a count of pixels >= 0")


def sample_tile_origins(rng: jax.Array, batch: int, size: int, grid: int, cell: int,
                        tile: int, channel_jitter: int = 0) -> jax.Array:
  """int32 [batch, 9, 3, 2]: the (y, x) top-left corner of each tile's colour channel in a
  `size` px image. A `grid` window at a uniform position; in the window's 3 x 3 cells (row-major,
  position n = 3 r + c) each tile at a uniform offset in [0, cell - tile]; each channel moved by
  a uniform [-j, j] per axis and clipped into the image."""
  check_geometry(size, grid, cell, tile, channel_jitter)
  k_win, k_off, k_jit = jax.random.split(rng, 3)
  win = jax.random.randint(k_win, (batch, 1, 1, 2), 0, size - grid + 1)
  off = jax.random.randint(k_off, (batch, 9, 1, 2), 0, cell - tile + 1)
  n = jnp.arange(9)
  cells = jnp.stack([n // 3, n % 3], -1)[None, :, None, :] * cell
  origin = win + cells + off
  if channel_jitter:
    origin = origin + jax.random.randint(k_jit, (batch, 9, 3, 2), -channel_jitter,
                                         channel_jitter + 1)
  origin = jnp.broadcast_to(origin, (batch, 9, 3, 2))
  return jnp.clip(origin, 0, size - tile).astype(jnp.int32)


def cut_tiles(images: jax.Array, origins: jax.Array, tile: int) -> jax.Array:
  """images [B, H, W, C], origins int [B, N, C, 2] (per channel (y, x)) -> tiles
  [B, N, tile, tile, C]: tiles[b, n, i, j, c] = images[b, y + i, x + j, c]."""
  b, n, c = origins.shape[:3]
  ar = jnp.arange(tile)
  ys = origins[..., 0][..., None] + ar          # [B, N, C, T]
  xs = origins[..., 1][..., None] + ar
  bi = jnp.arange(b)[:, None, None, None, None]
  ci = jnp.arange(c)[None, None, :, None, None]
  out = images[bi, ys[..., :, None], xs[..., None, :], ci]     # [B, N, C, T, T]
  return jnp.moveaxis(out, 2, -1)


def normalize_tiles(tiles: jax.Array) -> jax.Array:
  """Each tile [..., T, T, C] minus its per-channel mean over pixels, divided by its unbiased
  per-channel standard deviation (torch's .std), a zero deviation replaced by 1."""
  t = tiles.astype(jnp.float32)
  mean = t.mean(axis=(-3, -2), keepdims=True)
  n = t.shape[-3] * t.shape[-2]
  var = jnp.sum(jnp.square(t - mean), axis=(-3, -2), keepdims=True) / max(n - 1, 1)
  std = jnp.sqrt(var)
  return (t - mean) / jnp.where(std == 0, 1.0, std)


def to_gray(images01: jax.Array) -> jax.Array:
  """[..., 3] in [0, 1] -> the same shape, every channel L = 0.299 R + 0.587 G + 0.114 B."""
  y = images01 @ jnp.asarray(GRAY_WEIGHTS, images01.dtype)
  return jnp.repeat(y[..., None], 3, axis=-1)


def permute_tiles(tiles: jax.Array, perms: jax.Array, labels: jax.Array) -> jax.Array:
  """tiles [B, 9, ...], perms int [K, 9], labels int [B] -> out[b, t] = tiles[b, perms[labels[b],
  t]] (position t of the puzzle shows tile perms[k][t])."""
  idx = perms[labels]                                  # [B, 9]
  return jnp.take_along_axis(tiles, idx.reshape(idx.shape + (1,) * (tiles.ndim - 2)), axis=1)


def occlude_tiles(rng: jax.Array, tiles: jax.Array, max_occluded: int = 2):
  """Jigsaw++: per image, k ~ U{0..max_occluded} grid positions (a uniform random subset)
  take the tile at the same position of another image of the batch (a uniform other index).
  Returns (tiles, occluded bool [B, 9])."""
  b = tiles.shape[0]
  if b < 2:
    raise ValueError("jigsaw.plus_plus replaces tiles with another image's: use a batch of at "
                     "least 2 images per device")
  k_n, k_pos, k_src = jax.random.split(rng, 3)
  count = jax.random.randint(k_n, (b,), 0, max_occluded + 1)
  rank = jnp.argsort(jax.random.uniform(k_pos, (b, 9)), axis=1).argsort(axis=1)
  occluded = rank < count[:, None]                    # the first `count` of a random order
  src = (jnp.arange(b) + jax.random.randint(k_src, (b,), 1, b)) % b
  other = tiles[src]
  mask = occluded.reshape(occluded.shape + (1,) * (tiles.ndim - 2))
  return jnp.where(mask, other, tiles), occluded


def jigsaw_loss(logits: jax.Array, labels: jax.Array) -> jax.Array:
  """Mean cross-entropy over the permutation classes (nn.CrossEntropyLoss)."""
  return optax.softmax_cross_entropy_with_integer_labels(logits.astype(jnp.float32),
                                                         labels).mean()


def assemble(tiles: jax.Array, positions: jax.Array) -> jax.Array:
  """tiles [B, 9, T, T, C] placed on a 3 x 3 canvas [B, 3T, 3T, C], tile t at grid position
  positions[b, t] (row-major)."""
  b, _, t, _, c = tiles.shape
  inv = jnp.argsort(positions, axis=1)                 # which tile lands at each position
  placed = jnp.take_along_axis(tiles, inv[:, :, None, None, None], axis=1)
  return placed.reshape(b, 3, 3, t, t, c).transpose(0, 1, 3, 2, 4, 5).reshape(b, 3 * t, 3 * t, c)


# ---------------------------------------------------------------------------------------------
# The heads.

class JigsawHead(nn.Module):
  """JigsawNetwork.py's fc6 (per tile) / fc7 / classifier; with `inpaint` and `colorize` the
  damaged-jigsaw decoders (one Linear each: fc7 -> the missing tile's pixels, fc6 -> each
  tile's ab)."""
  num_classes: int
  fc6_dim: int = 1024
  fc7_dim: int = 4096
  dropout: float = 0.5
  tile: int = 64
  inpaint: bool = False
  colorize: bool = False

  @nn.compact
  def __call__(self, fmaps: jax.Array, train: bool = False) -> dict:
    b, n = fmaps.shape[:2]
    x = fmaps.reshape(b, n, -1).astype(jnp.float32)
    h6 = nn.relu(torch_dense(self.fc6_dim, x.shape[-1], "fc6")(x))            # [B, 9, fc6]
    x = nn.Dropout(self.dropout, deterministic=not train)(h6)
    x = x.reshape(b, n * self.fc6_dim)
    h7 = nn.relu(torch_dense(self.fc7_dim, x.shape[-1], "fc7")(x))
    x = nn.Dropout(self.dropout, deterministic=not train)(h7)
    out = {"logits": torch_dense(self.num_classes, self.fc7_dim, "fc8")(x)}
    t = self.tile
    if self.inpaint:
      out["inpaint"] = torch_dense(t * t * 3, self.fc7_dim, "inpaint")(h7).reshape(b, t, t, 3)
    if self.colorize:
      out["ab"] = torch_dense(t * t * 2, self.fc6_dim, "colorize")(h6).reshape(b, n, t, t, 2)
    return out


# ---------------------------------------------------------------------------------------------
# The method.

class Jigsaw(Method):
  name = "jigsaw"
  picture_titles = {"masked": "shuffled tiles", "reconstruction": "predicted order",
                    "header": "the tiles shuffled, then put back by the prediction"}

  def __init__(self, config):
    super().__init__(config)
    c = self.c = config.jigsaw
    self.resize = int(c.resize) or self.image_size
    self.grid, self.cell, self.tile = int(c.grid), int(c.cell), int(c.tile)
    self.jitter = int(c.channel_jitter)
    check_geometry(self.resize, self.grid, self.cell, self.tile, self.jitter)
    self.plus_plus = bool(c.plus_plus)
    d = c.damaged
    self.damaged = bool(d.enabled)
    self.decolor = self.damaged and bool(d.decolor)
    self.remove = self.damaged and bool(d.remove_tile)
    if self.plus_plus:
      if int(c.max_occluded) not in (0, 1, 2):
        raise ValueError(f"jigsaw.max_occluded={c.max_occluded}: Jigsaw++ occludes 0, 1 or 2 "
                         f"tiles (the min Hamming distance 3 keeps the classes unique)")
      perms = perm_lib.jigsaw_pp_permutations(int(c.pp_num_permutations), int(c.perm_seed),
                                              int(c.pp_min_distance))
    else:
      perms = perm_lib.maximal_hamming_permutations(int(c.num_permutations), int(c.perm_seed))
    self.perms = np.asarray(perms, np.int32)
    self.perm_stats = perm_lib.set_statistics(self.perms)
    print(f"jigsaw: {self.perm_stats['count']} permutations, average Hamming distance "
          f"{self.perm_stats['mean_hamming']:.3f}, minimum {self.perm_stats['min_hamming']}")
    self.mean = jnp.asarray(config.input.mean, jnp.float32)
    self.std = jnp.asarray(config.input.std, jnp.float32)
    overrides = {}
    name = models.name_of(config.model)
    if name == "alexnet" and config.model.get("stem", "imagenet") == "imagenet" \
        and int(c.tile_conv1_stride) > 0:
      overrides["conv1_stride"] = int(c.tile_conv1_stride)
    self.tile_encoder = (models.build(config.model, self.tile, **overrides) if overrides
                         else self.encoder)
    self.head = JigsawHead(num_classes=len(self.perms), fc6_dim=int(c.fc6_dim),
                           fc7_dim=int(c.fc7_dim), dropout=float(c.dropout), tile=self.tile,
                           inpaint=self.remove and float(d.inpaint_weight) > 0,
                           colorize=self.decolor and float(d.color_weight) > 0)

  # -- the puzzle ---------------------------------------------------------------------------
  def puzzle(self, rng: jax.Array, images: jax.Array, labels: Optional[jax.Array] = None,
             train: bool = True) -> dict:
    """Normalised images [B, S, S, 3] -> {'tiles': network input [B, 9, T, T, 3] (shuffled,
    normalised per tile), 'labels', 'raw': the shuffled tiles in [0, 1], 'rgb': the unshuffled
    tiles in [0, 1] (before decolouring), 'removed': the removed tile's grid position}."""
    c = self.c
    b = images.shape[0]
    ks = jax.random.split(rng, 6)
    x = jnp.clip(images.astype(jnp.float32) * self.std + self.mean, 0.0, 1.0)
    if train and float(c.gray_prob) > 0 and not self.decolor:
      gray = jax.random.uniform(ks[0], (b, 1, 1, 1)) < float(c.gray_prob)
      x = jnp.where(gray, to_gray(x), x)
    if self.resize != x.shape[1]:
      x = jax.image.resize(x, (b, self.resize, self.resize, 3), "bilinear")
    origins = sample_tile_origins(ks[1], b, self.resize, self.grid, self.cell, self.tile,
                                  self.jitter if train else 0)
    tiles = cut_tiles(x, origins, self.tile)                      # [B, 9, T, T, 3] in [0, 1]
    out = {}
    if self.plus_plus and train:
      tiles, out["occluded"] = occlude_tiles(ks[2], tiles, int(c.max_occluded))
    out["rgb"] = tiles
    net = tiles
    if self.decolor:
      from mim_jax.targets import lab   # pylint: disable=g-import-not-at-top
      lab_tiles = lab.rgb_to_lab(tiles)
      out["ab"] = lab_tiles[..., 1:] / 110.0
      net = jnp.repeat(lab_tiles[..., :1], 3, axis=-1)
    net = normalize_tiles(net)
    if self.remove:
      removed = jax.random.randint(ks[3], (b,), 0, 9)
      keep = (jnp.arange(9)[None, :] != removed[:, None])[:, :, None, None, None]
      net = net * keep
      out["removed"] = removed
    if labels is None:
      labels = jax.random.randint(ks[4], (b,), 0, len(self.perms))
    perms = jnp.asarray(self.perms)
    out.update(tiles=permute_tiles(net, perms, labels), labels=labels,
               raw=permute_tiles(tiles, perms, labels))
    return out

  # -- variables ----------------------------------------------------------------------------
  def _tile_maps(self, variables, tiles, train: bool):
    b = tiles.shape[0]
    flat = tiles.reshape((b * 9,) + tiles.shape[2:])
    if train:
      out, new = models.forward(self.tile_encoder, variables, flat, train=True,
                                pooling=self.pooling)
    else:
      out = models.outputs(self.tile_encoder, variables, flat, pooling=self.pooling)
      new = {}
    h, w = out["grid"]
    fmap = out["tokens"].reshape(b, 9, h, w, -1)
    return fmap, new

  def init_variables(self, rng, images):
    k_enc, k_head = jax.random.split(rng)
    enc = dict(self.encoder.init(k_enc, images))
    tiles = jnp.zeros((1, 9, self.tile, self.tile, 3), jnp.float32)
    fmap = jax.eval_shape(lambda: self._tile_maps(enc, tiles, False)[0])
    head = self.head.init(k_head, jnp.zeros(fmap.shape, jnp.float32))["params"]
    return self.nest("encoder", enc, head=head)

  # -- loss ---------------------------------------------------------------------------------
  def forward(self, params, state, tiles, rng, train=True):
    variables = self.variables(params, state)
    fmap, new = self._tile_maps(variables, tiles, train)
    out = self.head.apply({"params": params["head"]}, fmap, train=train,
                          rngs={"dropout": rng} if train else None)
    return out, new

  def loss(self, params, state, images, rng, step):
    k_puz, k_drop = jax.random.split(rng)
    p = self.puzzle(k_puz, images)
    out, new = self.forward(params, state, p["tiles"], k_drop)
    ce = jigsaw_loss(out["logits"], p["labels"])
    acc = jnp.mean(jnp.argmax(out["logits"], -1) == p["labels"])
    aux = {"jigsaw_ce": ce, "accuracy": acc}
    total = ce
    if self.damaged:
      d = self.c.damaged
      total = float(d.jigsaw_weight) * ce
      if "inpaint" in out:
        b = images.shape[0]
        missing = p["rgb"][jnp.arange(b), p["removed"]]
        target = (missing - self.mean) / self.std
        inp = jnp.mean(jnp.square(out["inpaint"] - target))
        total = total + float(d.inpaint_weight) * inp
        aux["inpaint_l2"] = inp
      if "ab" in out:
        ab_target = permute_tiles(p["ab"], jnp.asarray(self.perms), p["labels"])
        present = jnp.ones(ab_target.shape[:2])
        if self.remove:
          # the removed tile sits at the puzzle position t with perms[label][t] == removed
          shown = jnp.asarray(self.perms)[p["labels"]]
          present = (shown != p["removed"][:, None]).astype(jnp.float32)
        err = jnp.mean(jnp.square(out["ab"] - ab_target), axis=(2, 3, 4))
        col = jnp.sum(err * present) / jnp.sum(present)
        total = total + float(d.color_weight) * col
        aux["color_l2"] = col
    if self.plus_plus:
      aux["occluded_tiles"] = jnp.mean(jnp.sum(p["occluded"], axis=1).astype(jnp.float32))
    if new:
      aux["collections"] = {col: {"encoder": t} for col, t in new.items()}
    return total, aux

  # -- picture ------------------------------------------------------------------------------
  def reconstruct(self, params, state, images, rng):
    """{'masked': the shuffled tiles on the 3 x 3 grid, 'reconstruction': the same tiles where
    the predicted permutation puts them}, normalised, at the input size."""
    images = images.astype(jnp.float32)
    b, s = images.shape[0], images.shape[1]
    p = self.puzzle(rng, images, train=False)
    out, _ = self.forward(params, state, p["tiles"], None, train=False)
    pred = jnp.argmax(out["logits"], -1)
    raw = p["raw"]
    if self.remove:   # show the removed tile as grey
      shown = jnp.asarray(self.perms)[p["labels"]]
      gone = (shown == p["removed"][:, None])[:, :, None, None, None]
      raw = jnp.where(gone, 0.5, raw)
    ident = jnp.broadcast_to(jnp.arange(9), (b, 9))
    shuffled = assemble(raw, ident)
    solved = assemble(raw, jnp.asarray(self.perms)[pred])

    def picture(x):
      x = jax.image.resize(x, (b, s, s, 3), "bilinear")
      return (x - self.mean) / self.std
    return {"masked": picture(shuffled), "reconstruction": picture(solved)}

