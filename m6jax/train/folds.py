"""k-fold cross-validation plans: which rows each replica trains, selects and is scored on.

Folds (and repeats of the whole k-fold partition) are array axes next to seeds:
replica i = (repeat * k + fold) * num_seeds + seed_index is scored on its fold
(`val_mask`) and trains on the pooled rows outside it, so one vmapped program
trains all repeat x fold x seed replicas and every pooled row is out-of-fold for
exactly the replicas of its own fold in each repeat. `cv_plan` also holds out an
inner validation slice of each replica's training rows (`select_mask`) to pick
its epoch, so the scored fold never decides anything; each repeat is a different
seeded partition, group-aware when twin groups are given (no twin straddles a fold).
"""

from __future__ import annotations

import dataclasses

import numpy as np

# Cross-validation pools these splits; the test split is only ever scored.
POOL_SPLITS = ("train", "validation")


def stratified_folds(labels, k: int, seed=0, groups=None) -> np.ndarray:
  """(N,) int labels -> (N,) fold ids in [0, k), stratified by class.

  Each class's rows are shuffled (seeded: an int or a sequence of ints) and dealt
  round-robin, starting where the previous class stopped, so fold sizes differ by
  at most one and every class is spread over the folds as evenly as its count allows.
  groups: (N,) group ids (m6jax.data.twins); rows of one group share a fold. A group
  counts for its most common label; per class, groups (largest first, seeded order
  among equals) each go to the fold with the fewest rows of that class, then of all.
  """
  labels = np.asarray(labels)
  if k < 2:
    raise ValueError(f"k-fold cross-validation needs k >= 2 folds, got {k}")
  if len(labels) < k:
    raise ValueError(f"{len(labels)} rows cannot be split into {k} folds")
  rng = np.random.default_rng(seed)
  if groups is not None:
    return _group_folds(labels, np.asarray(groups), k, rng)
  fold = np.empty(len(labels), np.int32)
  start = 0
  for c in np.unique(labels):
    rows = rng.permutation(np.flatnonzero(labels == c))
    fold[rows] = (start + np.arange(len(rows))) % k
    start = (start + len(rows)) % k
  return fold


def _group_folds(labels, groups, k: int, rng) -> np.ndarray:
  """stratified_folds with whole groups: see there."""
  _, gid = np.unique(groups, return_inverse=True)
  size = np.bincount(gid)
  # Majority label of each group (ties: the smallest label).
  votes = np.zeros((len(size), int(labels.max()) + 1), np.int64)
  np.add.at(votes, (gid, labels), 1)
  glabel = votes.argmax(1)
  fold_of_group = np.empty(len(size), np.int32)
  total = np.zeros(k, np.int64)
  for c in np.unique(glabel):
    gs = rng.permutation(np.flatnonzero(glabel == c))
    gs = gs[np.argsort(-size[gs], kind="stable")]
    per_class = np.zeros(k, np.int64)
    for g in gs:
      f = int(np.lexsort((total, per_class))[0])
      fold_of_group[g] = f
      per_class[f] += size[g]
      total[f] += size[g]
  return fold_of_group[gid]


@dataclasses.dataclass(frozen=True)
class ReplicaPlan:
  """Rows of a pooled set that each of R = repeats x folds x seeds replicas uses.

  fold_of_replica: (R,) fold id (-1 = no folds: train on the train split).
  seed_of_replica: (R,) seed offset k (the replica's key is seed + k).
  train_idx: (R, T) row indices of each replica's training rows, padded with
    -1 (replicas differ in size by a few rows).
  val_mask: (R, N) True on each replica's scored (out-of-fold) rows.
  select_mask: (R, N) True on the rows that pick each replica's epoch; None: the
    scored fold itself (fold_plan; optimistic for the out-of-fold scores).
  repeat_of_replica: (R,) which k-fold partition (None: all 0).
  """
  fold_of_replica: np.ndarray
  seed_of_replica: np.ndarray
  train_idx: np.ndarray
  val_mask: np.ndarray
  select_mask: np.ndarray | None = None
  repeat_of_replica: np.ndarray | None = None

  def __post_init__(self):
    if self.select_mask is None:
      object.__setattr__(self, "select_mask", self.val_mask)
    if self.repeat_of_replica is None:
      object.__setattr__(self, "repeat_of_replica", np.zeros_like(self.fold_of_replica))

  @property
  def num_replicas(self) -> int:
    return len(self.seed_of_replica)

  @property
  def min_train(self) -> int:
    return int((self.train_idx >= 0).sum(1).min())

  @property
  def num_folds(self) -> int:
    return int(self.fold_of_replica.max()) + 1

  @property
  def num_repeats(self) -> int:
    return int(self.repeat_of_replica.max()) + 1

  @property
  def models_per_seed(self) -> int:
    """Fold models per seed (folds x repeats): replica i is model i // seeds of seed
    i % seeds, so (R, ...) reshaped to (models_per_seed, seeds, ...) groups each seed's."""
    return self.num_replicas // (int(self.seed_of_replica.max()) + 1)

  def take(self, replicas) -> "ReplicaPlan":
    """The plan of some replicas only (e.g. one, for a solo run)."""
    idx = np.asarray(replicas)
    return ReplicaPlan(*(np.asarray(getattr(self, f.name))[idx]
                         for f in dataclasses.fields(self)))


def fold_plan(fold_ids, num_seeds: int) -> ReplicaPlan:
  """(N,) fold ids -> the plan of folds x seeds replicas (fold-major), each
  selecting its epoch on its own scored fold (the label audit's plan)."""
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


def repeated_folds(labels, k: int, repeats: int = 1, seed: int = 0,
                   groups=None) -> np.ndarray:
  """(N,) labels -> (repeats, N) fold ids: repeat 0 is stratified_folds(seed), repeat
  r > 0 draws its own partition from the seed sequence (seed, r)."""
  return np.stack([stratified_folds(labels, k, seed if r == 0 else (seed, r), groups)
                   for r in range(repeats)])


def cv_plan(labels, k: int, num_seeds: int, seed: int = 0, repeats: int = 1,
            groups=None) -> ReplicaPlan:
  """Repeated k-fold plan with inner validation: (N,) pooled labels -> R = repeats x
  k x num_seeds replicas. Replica (repeat r, fold f) is scored on fold f of partition
  r; its epoch is picked on an inner slice of its training rows (fold 0 of a
  stratified, group-aware k-fold of those rows, seeded by (seed, r, f, 1)); it
  trains on the rest. groups: (N,) twin-group ids or None."""
  labels = np.asarray(labels)
  n = len(labels)
  groups = None if groups is None else np.asarray(groups)
  fold_ids = repeated_folds(labels, k, repeats, seed, groups)
  parts = []                                 # (train rows, inner rows, scored mask)
  for r in range(repeats):
    for f in range(k):
      outside = np.flatnonzero(fold_ids[r] != f)
      inner = stratified_folds(labels[outside], k, (seed, r, f, 1),
                               None if groups is None else groups[outside]) == 0
      parts.append((outside[~inner], outside[inner], fold_ids[r] == f))
  tmax = max(len(p[0]) for p in parts)
  size = repeats * k * num_seeds
  train_idx = np.full((size, tmax), -1, np.int32)
  val_mask = np.zeros((size, n), bool)
  select_mask = np.zeros((size, n), bool)
  for m, (train, inner, scored) in enumerate(parts):
    for s in range(num_seeds):
      train_idx[m * num_seeds + s, :len(train)] = train
      select_mask[m * num_seeds + s, inner] = True
      val_mask[m * num_seeds + s] = scored
  model = np.repeat(np.arange(repeats * k), num_seeds)
  return ReplicaPlan((model % k).astype(np.int32),
                     np.tile(np.arange(num_seeds), repeats * k).astype(np.int32),
                     train_idx, val_mask, select_mask, (model // k).astype(np.int32))


def out_of_fold(probs, plan: ReplicaPlan, repeat: int | None = None) -> np.ndarray:
  """(R, N, C) replica probabilities on the pooled rows -> (N, C) out-of-fold
  probabilities: each row averaged over the replicas (of `repeat`, or of every
  repeat when None) that were scored on it, i.e. did not train on it."""
  probs = np.asarray(probs, np.float64)
  w = plan.val_mask.astype(np.float64)
  if repeat is not None:
    w = w * (plan.repeat_of_replica == repeat)[:, None]
  w = w[:, :, None]
  counts = w.sum(0)
  if np.any(counts == 0):
    raise ValueError("some rows are in no replica's validation fold")
  return (probs * w).sum(0) / counts


def cv_scores(probs, labels, plan: ReplicaPlan, score) -> dict:
  """Out-of-fold scores of each repeat, as mean and std over repeats.

  probs: (R, N, C) replica probabilities on the pooled rows; labels: (N,);
  score(probs (M, N, C), labels, mask=(M, N) or None) -> {metric: (M,)} (e.g.
  trainer.validation_scores). Returns {'folds', 'repeats', 'rows', '<metric>' (mean
  over repeats), '<metric>_std' (over repeats, ddof=1; 0 for one repeat),
  'per_repeat': {metric: [repeats]}, 'per_fold': {metric: [[folds] x repeats]},
  'per_fold_accuracy', 'fold_rows': [repeats * folds] (the same, flat, with each fold
  model's scored row count)} (per fold: each fold's seed ensemble on its own rows, for
  the corrected resampled t-test of m6jax.track.paired).
  """
  labels = np.asarray(labels)
  k, reps = plan.num_folds, plan.num_repeats
  oof = np.stack([out_of_fold(probs, plan, r) for r in range(reps)])      # (reps, N, C)
  per_repeat = score(oof, labels)
  probs = np.asarray(probs, np.float64)
  model = plan.repeat_of_replica * k + plan.fold_of_replica               # (R,)
  ens = np.stack([probs[model == m].mean(0) for m in range(reps * k)])    # (reps*k, N, C)
  masks = np.stack([plan.val_mask[model == m][0] for m in range(reps * k)])
  per_fold = score(ens, labels, mask=masks)
  out = {"folds": k, "repeats": reps, "rows": int(len(labels))}
  for name, v in per_repeat.items():
    v = np.asarray(v, np.float64)
    out[name] = float(v.mean())
    out[f"{name}_std"] = float(v.std(ddof=1)) if reps > 1 else 0.0
  out["per_repeat"] = {name: np.asarray(v).tolist() for name, v in per_repeat.items()}
  out["per_fold"] = {name: np.asarray(v).reshape(reps, k).tolist()
                     for name, v in per_fold.items()}
  out["per_fold_accuracy"] = np.asarray(per_fold["accuracy"], np.float64).tolist()
  out["fold_rows"] = masks.sum(1).astype(int).tolist()
  return out
