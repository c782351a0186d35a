"""Bootstrap intervals and paired tests against independent references (scipy, sklearn)."""

import numpy as np
import pytest
from scipy import stats
from sklearn.metrics import f1_score

from m6jax.evaluate import intervals


def _predictions(n=126, c=7, acc=0.8, seed=0):
  rng = np.random.default_rng(seed)
  y = rng.integers(0, c, n)
  p = np.where(rng.random(n) < acc, y, rng.integers(0, c, n))
  return y, p


def test_bootstrap_accuracy_matches_scipy_percentile_bootstrap():
  y, p = _predictions()
  ours = intervals.bootstrap_ci(intervals.accuracy, (y, p), resamples=2000, seed=3)
  ref = stats.bootstrap((y, p), lambda a, b, axis=-1: (a == b).mean(axis), paired=True,
                        vectorized=True, n_resamples=2000, method="percentile",
                        confidence_level=0.95, random_state=np.random.default_rng(3))
  # Same generator, same (B, N) draw, same linear quantiles: equal to rounding.
  assert ours["low"] == pytest.approx(ref.confidence_interval.low, abs=1e-12)
  assert ours["high"] == pytest.approx(ref.confidence_interval.high, abs=1e-12)
  assert ours["point"] == pytest.approx((y == p).mean())
  assert ours["low"] < ours["point"] < ours["high"]
  # 126 products at 0.8: the half width is about 1.96 * sqrt(.8 * .2 / 126) = 0.07.
  assert 0.05 < (ours["high"] - ours["low"]) / 2 < 0.09


def test_bootstrap_macro_f1_matches_a_plain_loop_with_sklearn():
  y, p = _predictions(n=60, c=4, seed=1)
  ours = intervals.bootstrap_ci(lambda a, b: intervals.macro_f1(a, b, 4), (y, p),
                                resamples=2000, seed=5)
  idx = np.random.default_rng(5).integers(0, len(y), (2000, len(y)))
  vals = [f1_score(y[i], p[i], labels=range(4), average="macro", zero_division=0)
          for i in idx]
  np.testing.assert_allclose([ours["low"], ours["high"]], np.quantile(vals, [0.025, 0.975]),
                             atol=1e-12)
  assert ours["point"] == pytest.approx(f1_score(y, p, average="macro"), abs=1e-12)


def test_per_seed_mean_interval_averages_the_seed_models_on_each_resample():
  y, p0 = _predictions(seed=2)
  _, p1 = _predictions(acc=0.6, seed=2)
  out = intervals.classification_intervals(y, np.stack([p0, p1]), 7, resamples=2000, seed=0)
  idx = np.random.default_rng(0).integers(0, len(y), (2000, len(y)))
  vals = ((y[idx] == p0[idx]).mean(1) + (y[idx] == p1[idx]).mean(1)) / 2
  np.testing.assert_allclose([out["accuracy"]["low"], out["accuracy"]["high"]],
                             np.quantile(vals, [0.025, 0.975]), atol=1e-12)
  assert out["accuracy"]["point"] == pytest.approx(((y == p0).mean() + (y == p1).mean()) / 2)
  f1 = np.mean([f1_score(y, q, labels=range(7), average="macro") for q in (p0, p1)])
  assert out["macro_f1"]["point"] == pytest.approx(f1, abs=1e-12)


def test_paired_bootstrap_difference_matches_a_plain_loop():
  y, a = _predictions(seed=4)
  _, b = _predictions(acc=0.7, seed=5)
  ca, cb = a == y, b == y
  out = intervals.paired_bootstrap_diff(ca, cb, resamples=2000, seed=7)
  idx = np.random.default_rng(7).integers(0, len(y), (2000, len(y)))
  diffs = [ca[i].mean() - cb[i].mean() for i in idx]
  np.testing.assert_allclose([out["low"], out["high"]], np.quantile(diffs, [0.025, 0.975]),
                             atol=1e-12)
  assert out["point"] == pytest.approx(ca.mean() - cb.mean())
  # The same model twice: no difference on any resample.
  same = intervals.paired_bootstrap_diff(ca, ca, resamples=2000)
  assert same["low"] == same["high"] == same["point"] == 0.0


@pytest.mark.parametrize("a_only,b_only", [(9, 2), (3, 3), (0, 5), (0, 0), (30, 12)])
def test_mcnemar_exact_matches_scipy_binomtest(a_only, b_only):
  both = 50
  ca = np.array([True] * a_only + [False] * b_only + [True] * both + [False] * 4)
  cb = np.array([False] * a_only + [True] * b_only + [True] * both + [False] * 4)
  out = intervals.mcnemar_exact(ca, cb)
  assert (out["a_only"], out["b_only"]) == (a_only, b_only)
  ref = 1.0 if a_only + b_only == 0 else stats.binomtest(a_only, a_only + b_only, 0.5).pvalue
  assert out["p"] == pytest.approx(ref, rel=1e-9)


def test_nadeau_bengio_against_a_hand_computation():
  d = np.array([0.02, -0.01, 0.03, 0.0, 0.015])
  n_train, n_test = 571, 143
  out = intervals.nadeau_bengio(d, n_train, n_test)
  j, mean, s2 = 5, d.mean(), d.var(ddof=1)
  se = np.sqrt((1 / j + n_test / n_train) * s2)
  t = mean / se
  assert out["t"] == pytest.approx(t, rel=1e-12)
  assert out["p"] == pytest.approx(2 * stats.t.sf(abs(t), 4), rel=1e-12)
  half = stats.t.ppf(0.975, 4) * se
  assert (out["low"], out["high"]) == pytest.approx((mean - half, mean + half), rel=1e-12)
  # The correction widens the naive interval (s / sqrt(J)) of overlapping training sets.
  naive = stats.ttest_1samp(d, 0.0).pvalue
  assert out["p"] > naive
  assert intervals.nadeau_bengio([0.0, 0.0, 0.0], 10, 5)["p"] == 1.0


def test_bad_input_is_refused():
  with pytest.raises(ValueError, match="differ in length"):
    intervals.bootstrap_ci(intervals.accuracy, (np.zeros(3), np.zeros(4)))
  with pytest.raises(ValueError, match=">= 2 splits"):
    intervals.nadeau_bengio([0.1], 10, 5)


def test_results_json_test_block_has_the_bootstrap_over_products():
  from m6jax.evaluate import results
  y, _ = _predictions(n=126, c=7)
  rng = np.random.default_rng(0)
  probs = rng.dirichlet(np.ones(7), (3, 126)) + 2.0 * np.eye(7)[y] * (rng.random((3, 126, 1))
                                                                      < 0.8)
  probs /= probs.sum(-1, keepdims=True)
  sc = results.score(y, probs, [f"c{i}" for i in range(7)],
                     {"bootstrap_resamples": 2000, "bootstrap_seed": 1})
  b = sc["bootstrap"]
  assert (b["resamples"], b["seed"], b["level"]) == (2000, 1, 0.95)
  for k in ("accuracy", "macro_f1"):
    assert set(b[k]) == {"point", "low", "high"}
    assert b[k]["point"] == pytest.approx(sc["ensemble"][k], abs=1e-6)
    assert b[k]["low"] < b[k]["point"] < b[k]["high"]       # a non-zero width
    seed_mean = sc["summary"][k]["mean"]
    assert b["per_seed_mean"][k]["point"] == pytest.approx(seed_mean, abs=1e-6)


def test_bootstrap_in_blocks_equals_one_draw(monkeypatch):
  """Blocks of resample rows (bounded memory at 10^5+ products) draw the same (B, N)
  indices, so the interval is the one of the whole (B, N) draw."""
  y, p = _predictions(n=101, seed=6)
  whole = np.random.default_rng(4).integers(0, 101, (300, 101))
  blocks = np.concatenate(list(intervals.resample_blocks(101, 300, 4, block_elements=707)))
  np.testing.assert_array_equal(blocks, whole)   # 7 rows a block, last one shorter
  monkeypatch.setattr(intervals, "BLOCK_ELEMENTS", 707)
  ours = intervals.bootstrap_ci(lambda a, b: intervals.macro_f1(a, b, 7), (y, p), 300, 4)
  vals = intervals.macro_f1(y[whole], p[whole], 7)
  np.testing.assert_allclose([ours["low"], ours["high"]], np.quantile(vals, [0.025, 0.975]),
                             atol=0)


def test_macro_f1_counts_match_sklearn_on_broadcast_shapes():
  """(B, 1, N) labels against (B, K, N) predictions, some outside [0, C) (a padding -1,
  an unknown class): per (b, k) sklearn's macro-F1 over labels=range(C)."""
  rng = np.random.default_rng(0)
  y, p = rng.integers(0, 7, (3, 1, 50)), rng.integers(-1, 8, (3, 4, 50))
  ref = [[f1_score(y[i, 0], p[i, j], labels=range(7), average="macro", zero_division=0)
          for j in range(4)] for i in range(3)]
  np.testing.assert_allclose(intervals.macro_f1(y, p, 7), ref, atol=1e-12)
