"""Jigsaw permutation sets: Noroozi & Favaro's greedy maximal-Hamming-distance selection.

Algorithm 1 of "Unsupervised Learning of Visual Representations by Solving Jigsaw Puzzles"
(ECCV 2016), as bbrattoli/JigsawPuzzlePytorch's select_permutations.py runs it with
--selection max:

  P_bar <- all 9! permutations of (0..8), in lexicographic order (itertools.permutations)
  j     <- uniform index into P_bar                         (here: np.random.RandomState(seed))
  repeat N times:
    P     <- P + [P_bar_j];  P_bar <- P_bar without P_bar_j
    D_k   <- sum over p in P of Hamming(p, P_bar_k)          (the port: the mean, same argmax)
    j     <- argmax_k D_k                                    (the first maximum on ties)

Hamming(p, q) is the number of the 9 positions where p and q differ. Removing a row and
taking the first argmax over the rest equals masking the chosen rows and taking the first
argmax over the full, unchanged order, which is what `maximal_hamming_permutations` does
(the running sum D is kept and one row added per step: O(N 9!) work, about a second for
N = 1000). Deterministic for a seed.

`jigsaw_pp_permutations`: Jigsaw++ (Noroozi, Vinjimoor, Favaro & Pirsiavash, CVPR 2018,
Sec. 4 "The Jigsaw++ task") keeps the classes unambiguous when up to two tiles are occluded by
requiring a minimum Hamming distance of 3 between any two permutations of the set (with at
most two tiles unknown, the seven others then determine the permutation); the paper's set has
701 permutations. It does not say how the set is built beyond "we remove similar
permutations"; here the greedy rule above runs with every candidate closer than
`min_distance` to a chosen permutation excluded, until `count` are chosen.
"""
from __future__ import annotations

import functools
import itertools

import numpy as np

NUM_TILES = 9


@functools.lru_cache(maxsize=1)
def all_permutations(n: int = NUM_TILES) -> np.ndarray:
  """int8 [n!, n]: every permutation of range(n), in itertools (lexicographic) order."""
  return np.array(list(itertools.permutations(range(n))), np.int8)


def hamming(p: np.ndarray, q: np.ndarray) -> np.ndarray:
  """Number of positions where p [..., n] and q [..., n] differ (broadcast)."""
  return np.sum(np.asarray(p) != np.asarray(q), axis=-1)


def _greedy(count: int, seed: int, min_distance: int, n: int) -> np.ndarray:
  cands = all_permutations(n)
  total = len(cands)
  if not 1 <= count <= total:
    raise ValueError(f"permutation count {count}: use 1 .. {total} (the permutations of {n} tiles)")
  cols = [np.ascontiguousarray(cands[:, i]) for i in range(n)]
  score = np.zeros(total, np.int64)          # sum of Hamming distances to the chosen set
  allowed = np.ones(total, bool)
  chosen = []
  j = int(np.random.RandomState(seed).randint(total))
  for _ in range(count):
    chosen.append(j)
    allowed[j] = False
    same = np.zeros(total, np.int8)
    for i in range(n):
      same += cols[i] == cands[j, i]
    dist = n - same
    score += dist
    if min_distance > 1:
      allowed &= dist >= min_distance
    if len(chosen) == count:
      break
    if not allowed.any():
      raise ValueError(f"only {len(chosen)} permutations of {n} tiles lie at Hamming distance "
                       f">= {min_distance} from each other this way; ask for fewer")
    j = int(np.argmax(np.where(allowed, score, -1)))
  return cands[np.array(chosen)].astype(np.int32)


@functools.lru_cache(maxsize=8)
def maximal_hamming_permutations(count: int = 1000, seed: int = 0,
                                 n: int = NUM_TILES) -> np.ndarray:
  """int32 [count, n]: Algorithm 1's maximal-average-Hamming set (module docstring); row k is
  class k. Cached per (count, seed, n); treat the result as read-only."""
  return _greedy(int(count), int(seed), 1, int(n))


@functools.lru_cache(maxsize=8)
def jigsaw_pp_permutations(count: int = 701, seed: int = 0, min_distance: int = 3,
                           n: int = NUM_TILES) -> np.ndarray:
  """int32 [count, n]: Algorithm 1 restricted to candidates at Hamming distance >=
  `min_distance` from every chosen permutation (Jigsaw++'s set, module docstring)."""
  return _greedy(int(count), int(seed), int(min_distance), int(n))


def set_statistics(perms: np.ndarray) -> dict:
  """{'count', 'min_hamming', 'mean_hamming'} over all distinct pairs of the set (the
  average Hamming distance the papers report, in positions out of n)."""
  perms = np.asarray(perms)
  d = hamming(perms[:, None, :], perms[None, :, :])
  iu = np.triu_indices(len(perms), k=1)
  pairs = d[iu]
  return {"count": int(len(perms)), "min_hamming": int(pairs.min()) if len(pairs) else 0,
          "mean_hamming": float(pairs.mean()) if len(pairs) else 0.0}
