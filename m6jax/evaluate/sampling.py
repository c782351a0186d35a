"""Bounded, deterministic samples of a split's rows for the analyses that do not need
every row (the feasibility study's 2-D projection, Grad-CAM), so their cost stays
flat in catalogue size.

`stratified_sample` keeps each class's share of the rows (largest remainder, so a
class gets floor or ceil of its proportional quota), gives every class at least
min(its count, `min_per_class`) rows, and is a function of (labels, size, seed) only.
"""

from __future__ import annotations

import numpy as np

MIN_PER_CLASS = 5   # rows every class keeps (or all of its rows, when it has fewer)


def _quotas(counts: np.ndarray, size: int, floors: np.ndarray) -> np.ndarray:
  """(C,) class counts -> (C,) rows per class summing to max(size, floors.sum()).

  Classes whose proportional quota falls under their floor get the floor; the rest
  share what is left in proportion to their counts (largest remainder, ties to the
  lower class index), each capped at its count.
  """
  fixed = np.zeros(len(counts), bool)
  alloc = floors.astype(np.int64).copy()
  while True:   # each pass fixes at least one class, or ends
    free = ~fixed
    budget = max(size, int(floors.sum())) - int(alloc[fixed].sum())
    q = np.zeros(len(counts))
    q[free] = budget * counts[free] / max(1, counts[free].sum())
    low, high = free & (q < floors), free & (q > counts)
    if not (low.any() or high.any()):
      break
    alloc[low], alloc[high] = floors[low], counts[high]
    fixed |= low | high
  base = np.floor(q).astype(np.int64)
  left = budget - int(base[free].sum())
  order = [c for c in np.argsort(-(q - base), kind="stable") if free[c]]
  for c in order[:left]:
    base[c] += 1
  alloc[free] = base[free]
  return alloc


def stratified_sample(labels, size: int, seed: int = 0,
                      min_per_class: int = MIN_PER_CLASS) -> np.ndarray:
  """(N,) int labels -> sorted int64 indices of a stratified sample of about `size` rows.

  size >= N: every row (np.arange(N)). Else each class c with n_c rows gets its
  proportional quota size * n_c / N rounded by largest remainder (within one row),
  raised to min(n_c, min_per_class) for small classes (the other classes give up the
  difference, so the sample has max(size, sum of those floors) rows). Rows within a
  class are drawn without replacement by numpy's PCG64 seeded with `seed`.
  """
  labels = np.asarray(labels).reshape(-1)
  n = len(labels)
  if size < 1:
    raise ValueError(f"sample size must be >= 1, got {size}")
  if size >= n:
    return np.arange(n, dtype=np.int64)
  classes, inverse, counts = np.unique(labels, return_inverse=True, return_counts=True)
  floors = np.minimum(counts, min_per_class)
  alloc = _quotas(counts, size, floors)
  rng = np.random.default_rng(seed)
  order = np.argsort(inverse, kind="stable")           # rows grouped by class, stored order
  starts = np.concatenate([[0], np.cumsum(counts)])
  picked = [rng.choice(order[starts[c]:starts[c + 1]], int(alloc[c]), replace=False)
            for c in range(len(classes))]
  return np.sort(np.concatenate(picked)).astype(np.int64)


def balanced_sample(labels, size: int, seed: int = 0, keep=()) -> np.ndarray:
  """(N,) labels -> sorted indices: every index in `keep`, then rows dealt round-robin
  over the classes (each class's rows in a seeded order) until `size` (<= 0 or >= N:
  every row). Balanced, not proportional: for means over few rows (the products given
  words by m6jax.explain.multimodal, whose integrated gradients cost seconds each)."""
  labels = np.asarray(labels).reshape(-1)
  n = len(labels)
  if size <= 0 or size >= n:
    return np.arange(n)
  rng = np.random.default_rng(seed)
  chosen = list(dict.fromkeys(int(i) for i in keep))
  taken = set(chosen)
  pools = [iter(rng.permutation(np.flatnonzero(labels == c))) for c in np.unique(labels)]
  while len(chosen) < size and pools:
    live = []
    for pool in pools:
      if len(chosen) >= size:
        break
      i = next((int(i) for i in pool if int(i) not in taken), None)
      if i is not None:
        chosen.append(i)
        taken.add(i)
        live.append(pool)
    pools = live
  return np.asarray(sorted(chosen))


def describe(rows: int, of: int, seed: int, by: str = "label") -> dict:
  """The results.json record of a sample: {'rows', 'of', 'seed', 'stratified_by'}."""
  return {"rows": int(rows), "of": int(of), "seed": int(seed),
          "stratified_by": by if rows < of else None}


class Subset:
  """Rows `idx` of a random-access source (len, [i]), itself random-access: what
  m6jax.data.pipeline.batches reads, so only those rows are read and decoded."""

  def __init__(self, source, idx):
    self.source, self.idx = source, np.asarray(idx, np.int64)

  def __len__(self) -> int:
    return len(self.idx)

  def __getitem__(self, i):
    return self.source[int(self.idx[i])]


def explain_sample(cfg, strata) -> tuple[np.ndarray, dict]:
  """(N,) class of each product (-1: unknown) -> (sorted indices of the products the
  explanations cover, their `describe` record): a stratified sample of at most
  cfg.explain.sample, seeded by cfg.seed."""
  idx = stratified_sample(strata, cfg.explain.sample, cfg.seed)
  return idx, describe(len(idx), len(strata), cfg.seed)
