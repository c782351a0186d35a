"""k-fold cross-validation plans: which rows each replica trains and validates on.

Folds are an array axis next to seeds: replica r = fold * num_seeds + seed_index
trains on every pooled row outside its fold and validates on its fold, so one
vmapped program trains all fold x seed replicas and every pooled row is
out-of-fold for exactly the replicas of its own fold.
"""

from __future__ import annotations

import dataclasses

import numpy as np

# Cross-validation pools these splits; the test split is only ever scored.
POOL_SPLITS = ("train", "validation")


def stratified_folds(labels, k: int, seed: int = 0) -> np.ndarray:
  """(N,) int labels -> (N,) fold ids in [0, k), stratified by class.

  Each class's rows are shuffled (seeded) and dealt round-robin, starting where
  the previous class stopped, so fold sizes differ by at most one and every
  class is spread over the folds as evenly as its count allows.
  """
  labels = np.asarray(labels)
  if k < 2:
    raise ValueError(f"k-fold cross-validation needs k >= 2 folds, got {k}")
  if len(labels) < k:
    raise ValueError(f"{len(labels)} rows cannot be split into {k} folds")
  rng = np.random.default_rng(seed)
  fold = np.empty(len(labels), np.int32)
  start = 0
  for c in np.unique(labels):
    rows = rng.permutation(np.flatnonzero(labels == c))
    fold[rows] = (start + np.arange(len(rows))) % k
    start = (start + len(rows)) % k
  return fold


@dataclasses.dataclass(frozen=True)
class ReplicaPlan:
  """Rows of a pooled set that each of R = folds x seeds replicas uses.

  fold_of_replica: (R,) fold id (-1 = no folds: train on the train split).
  seed_of_replica: (R,) seed offset k (the replica's key is seed + k).
  train_idx: (R, T) row indices of each replica's training rows, padded with
    -1 (folds differ in size by at most one row).
  val_mask: (R, N) True on each replica's validation rows.
  """
  fold_of_replica: np.ndarray
  seed_of_replica: np.ndarray
  train_idx: np.ndarray
  val_mask: np.ndarray

  @property
  def num_replicas(self) -> int:
    return len(self.seed_of_replica)

  @property
  def min_train(self) -> int:
    return int((self.train_idx >= 0).sum(1).min())


def fold_plan(fold_ids, num_seeds: int) -> ReplicaPlan:
  """(N,) fold ids -> the plan of folds x seeds replicas (fold-major)."""
  fold_ids = np.asarray(fold_ids)
  k = int(fold_ids.max()) + 1
  tmax = max(int((fold_ids != f).sum()) for f in range(k))
  train_idx = np.full((k * num_seeds, tmax), -1, np.int32)
  val_mask = np.zeros((k * num_seeds, len(fold_ids)), bool)
  for f in range(k):
    rows = np.flatnonzero(fold_ids != f)
    for s in range(num_seeds):
      train_idx[f * num_seeds + s, :len(rows)] = rows
      val_mask[f * num_seeds + s] = fold_ids == f
  return ReplicaPlan(np.repeat(np.arange(k), num_seeds).astype(np.int32),
                     np.tile(np.arange(num_seeds), k).astype(np.int32), train_idx, val_mask)


def out_of_fold(probs, plan: ReplicaPlan) -> np.ndarray:
  """(R, N, C) replica probabilities on the pooled rows -> (N, C) out-of-fold
  probabilities: each row averaged over the replicas that did not train on it."""
  probs = np.asarray(probs, np.float64)
  w = plan.val_mask.astype(np.float64)[:, :, None]
  counts = w.sum(0)
  if np.any(counts == 0):
    raise ValueError("some rows are in no replica's validation fold")
  return (probs * w).sum(0) / counts
