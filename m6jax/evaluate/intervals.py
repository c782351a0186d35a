"""Uncertainty over test products, and paired tests between two models.

Everything is host-side numpy (plus scipy.stats for the exact tails), vectorised
over a (B, N) matrix of resample indices, drawn in row blocks of about 2^20 indices
(resample_blocks): 2,000 resamples of 126 products are one array operation, and
10^5 test products stay within a few hundred MB:

  bootstrap_ci(accuracy, (labels, preds), resamples=2000, seed=0)
  paired_bootstrap_diff(correct_a, correct_b)        # same products, two models
  mcnemar_exact(correct_a, correct_b)                # exact two-sided p
  nadeau_bengio(scores_a - scores_b, n_train, n_test)  # cross-validated cells

The bootstrap is the percentile bootstrap over products (what is uncertain is
which products happened to land in the test split); the seed spread
(m6jax.evaluate.metrics.seed_stats) is another, usually much smaller, quantity.
"""

from __future__ import annotations

from typing import Callable, Sequence

import numpy as np

LEVEL = 0.95
BLOCK_ELEMENTS = 1 << 20   # resample indices drawn and scored at a time (bootstrap_ci)


def resample_indices(n: int, resamples: int, seed: int) -> np.ndarray:
  """(B, n) int indices drawn with replacement: row b is bootstrap sample b.

  Drawn as `np.random.default_rng(seed).integers(0, n, (B, n))`, the draw
  scipy.stats.bootstrap makes with the same generator."""
  _check(n, resamples)
  return np.random.default_rng(seed).integers(0, n, (resamples, n))


def _check(n: int, resamples: int) -> None:
  if n < 1 or resamples < 1:
    raise ValueError(f"bootstrap needs n >= 1 products and resamples >= 1, got {n}, "
                     f"{resamples}")


def resample_blocks(n: int, resamples: int, seed: int, block_elements: int | None = None):
  """resample_indices(n, resamples, seed) in consecutive row blocks of about
  `block_elements` (None: BLOCK_ELEMENTS) indices, so memory stays bounded at 10^5-10^6
  products: the generator is drawn block after block, which yields the same (B, n) rows."""
  _check(n, resamples)
  rng = np.random.default_rng(seed)
  rows = max(1, (block_elements or BLOCK_ELEMENTS) // n)
  for start in range(0, resamples, rows):
    yield rng.integers(0, n, (min(rows, resamples - start), n))


def accuracy(labels, preds) -> np.ndarray:
  """(..., N) labels and predictions -> (...) accuracy."""
  return (np.asarray(labels) == np.asarray(preds)).mean(-1)


def macro_f1(labels, preds, num_classes: int) -> np.ndarray:
  """(..., N) labels and predictions -> (...) macro-F1 over classes 0..C-1, as
  m6jax.evaluate.metrics (sklearn, labels=range(C), zero_division=0): a class absent
  from both labels and predictions of a sample counts as F1 0."""
  labels, preds, c = np.asarray(labels), np.asarray(preds), num_classes

  def counts(x):
    """(..., N) class ids -> (..., C) counts of the ids in [0, C): one bincount over
    row-offset ids, O(rows N) rather than a (..., N, C) one-hot."""
    rows = int(np.prod(x.shape[:-1]))
    offset = (np.arange(rows) * c).reshape(*x.shape[:-1], 1)
    flat = np.where((x >= 0) & (x < c), x + offset, rows * c).ravel()
    return np.bincount(flat, minlength=rows * c + 1)[:-1].reshape(*x.shape[:-1], c)

  tp = counts(np.where(labels == preds, labels, -1))   # broadcast: (..., N)
  den = counts(labels) + counts(preds)                 # labels counted before broadcasting
  f1 = np.where(den > 0, 2 * tp / np.maximum(den, 1), 0.0)
  return f1.mean(-1)


def bootstrap_ci(statistic: Callable, data: Sequence, resamples: int = 2000, seed: int = 0,
                 level: float = LEVEL) -> dict:
  """Percentile bootstrap interval of `statistic` over the rows of `data`.

  data: arrays with the same leading axis N (the products), resampled together.
  statistic(*arrays) takes arrays with a leading sample axis, (B, N, ...), and
  returns (B,) values; the point estimate is statistic on the data itself.
  Returns {'point', 'low', 'high', 'resamples', 'seed', 'level'}: low / high are the
  (1 - level) / 2 and (1 + level) / 2 quantiles (linear interpolation) of the B values.
  """
  data = [np.asarray(a) for a in data]
  n = len(data[0])
  if any(len(a) != n for a in data):
    raise ValueError(f"bootstrap data differ in length: {[len(a) for a in data]}")
  values = np.concatenate([np.asarray(statistic(*(a[idx] for a in data)), np.float64)
                           for idx in resample_blocks(n, resamples, seed)])
  point = float(np.asarray(statistic(*(a[None] for a in data)), np.float64).reshape(-1)[0])
  alpha = (1.0 - level) / 2
  low, high = np.quantile(values, [alpha, 1.0 - alpha])
  return {"point": point, "low": float(low), "high": float(high),
          "resamples": int(resamples), "seed": int(seed), "level": float(level)}


def classification_intervals(labels, preds, num_classes: int, resamples: int = 2000,
                             seed: int = 0, level: float = LEVEL) -> dict:
  """(N,) labels, (N,) or (K, N) predictions -> {'accuracy': ci, 'macro_f1': ci}.

  With (K, N) predictions (K seed models) the statistic is the mean over the K
  models of each one's score on the same resampled products."""
  preds = np.asarray(preds)
  cols = preds.T if preds.ndim == 2 else preds     # products first: (N,) or (N, K)

  def per_model(fn):
    if preds.ndim == 1:
      return lambda y, p: fn(y, p)
    return lambda y, p: fn(y[..., None, :], np.swapaxes(p, -1, -2)).mean(-1)

  args = dict(resamples=resamples, seed=seed, level=level)
  return {"accuracy": bootstrap_ci(per_model(accuracy), (labels, cols), **args),
          "macro_f1": bootstrap_ci(per_model(lambda y, p: macro_f1(y, p, num_classes)),
                                   (labels, cols), **args)}


def paired_bootstrap_diff(correct_a, correct_b, resamples: int = 2000, seed: int = 0,
                          level: float = LEVEL) -> dict:
  """(N,) per-product correctness of models a and b on the SAME products -> the
  accuracy difference a - b with a percentile interval from resampling products
  (both models on each resample): bootstrap_ci's dict."""
  a, b = np.asarray(correct_a, np.float64), np.asarray(correct_b, np.float64)
  if a.shape != b.shape or a.ndim != 1:
    raise ValueError(f"paired scores need two (N,) arrays, got {a.shape} and {b.shape}")
  return bootstrap_ci(lambda x, y: x.mean(-1) - y.mean(-1), (a, b), resamples, seed, level)


def mcnemar_exact(correct_a, correct_b) -> dict:
  """Exact McNemar test on paired correctness: {'a_only', 'b_only', 'p'}.

  a_only: products a gets right and b wrong; b_only: the reverse. Under the null
  (equal accuracy) a_only ~ Binomial(a_only + b_only, 1/2); p is the two-sided
  exact tail (scipy.stats.binomtest's), 1.0 when the models never disagree."""
  from scipy import stats  # lazy: slow to import

  a, b = np.asarray(correct_a, bool), np.asarray(correct_b, bool)
  if a.shape != b.shape:
    raise ValueError(f"paired scores differ in shape: {a.shape} vs {b.shape}")
  n01, n10 = int((a & ~b).sum()), int((~a & b).sum())
  n = n01 + n10
  p = 1.0 if n == 0 else float(min(1.0, 2.0 * stats.binom.cdf(min(n01, n10), n, 0.5)))
  return {"a_only": n01, "b_only": n10, "p": p}


def nadeau_bengio(diffs, n_train: int, n_test: int, level: float = LEVEL) -> dict:
  """Corrected resampled t-test (Nadeau & Bengio 2003) on J per-split differences.

  diffs: (J,) score differences a - b, one per train/test split (e.g. per fold);
  n_train / n_test: rows trained / scored in one split. The variance of the mean is
  (1/J + n_test/n_train) * s^2 instead of s^2 / J, for the overlap of training sets.
  Returns {'mean', 't', 'p', 'df', 'low', 'high', 'splits'} (two-sided p, interval at
  `level`). When every difference is equal there is no spread: t is None and p is 1
  when they are 0, else 0."""
  from scipy import stats

  d = np.asarray(diffs, np.float64)
  j = len(d)
  if j < 2:
    raise ValueError(f"the corrected t-test needs >= 2 splits, got {j}")
  mean, var = float(d.mean()), float(d.var(ddof=1))
  se = np.sqrt((1.0 / j + n_test / n_train) * var)
  if se > 0:
    t = float(mean / se)
    p = float(2 * stats.t.sf(abs(t), j - 1))
  else:
    t, p = None, 1.0 if mean == 0 else 0.0
  half = float(stats.t.ppf(0.5 + level / 2, j - 1) * se)
  return {"mean": mean, "t": t, "p": p, "df": j - 1, "low": mean - half,
          "high": mean + half, "splits": j}
