"""Parity of m6jax.evaluate.metrics against sklearn.metrics / numpy / scipy."""

from __future__ import annotations

import json
import math
import re

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from scipy import stats
from sklearn import metrics as skm

from m6jax.evaluate import metrics as M

C = 7
N = 60
NAMES = [f"class_{i}" for i in range(C)]
NAN = float("nan")
ZERO_DIVISIONS = [0.0, 1.0, NAN]
SCENARIOS = ["random", "absent_pred", "absent_label", "absent_both", "all"]


def _data(seed, scenario, n=N):
  """Random labels / preds with chosen classes missing."""
  rng = np.random.default_rng(seed)
  y = rng.integers(0, C, n)
  p = np.where(rng.random(n) < 0.4, y, rng.integers(0, C, n))
  if scenario in ("absent_pred", "all"):
    p[p == 3] = 4  # class 3 has support but is never predicted
  if scenario in ("absent_label", "all"):
    y[y == 5] = 0  # class 5 is predicted but has no support
  if scenario in ("absent_both", "all"):
    y[y == 6] = 1  # class 6 appears nowhere
    p[p == 6] = 2
  return y, p


def _sklearn(y, p, zd):
  labels = list(range(C))
  out = {"confusion_matrix": skm.confusion_matrix(y, p, labels=labels),
         "accuracy": skm.accuracy_score(y, p)}
  pr, rc, f1, sup = skm.precision_recall_fscore_support(
      y, p, labels=labels, average=None, zero_division=zd)
  out.update(precision=pr, recall=rc, f1=f1, support=sup)
  for avg in ("macro", "micro", "weighted"):
    pr, rc, f1, _ = skm.precision_recall_fscore_support(
        y, p, labels=labels, average=avg, zero_division=zd)
    out.update({f"{avg}_precision": pr, f"{avg}_recall": rc,
                f"{avg}_f1": f1})
    # f1_score is a separate sklearn entry point; it must agree too.
    assert _close(f1, skm.f1_score(y, p, labels=labels, average=avg,
                                   zero_division=zd))
  return out


def _close(a, b, tol=1e-6):
  return np.allclose(np.asarray(a, np.float64), np.asarray(b, np.float64),
                     rtol=tol, atol=tol, equal_nan=True)


def _assert_same(ours, ref, tol=1e-6):
  assert set(ours) == set(ref)
  for k in ref:
    np.testing.assert_allclose(np.asarray(ours[k], np.float64),
                               np.asarray(ref[k], np.float64), rtol=tol,
                               atol=tol, equal_nan=True, err_msg=k)


@pytest.mark.parity
@pytest.mark.parametrize("scenario", SCENARIOS)
@pytest.mark.parametrize("zd", ZERO_DIVISIONS, ids=["zd0", "zd1", "zdnan"])
@pytest.mark.parametrize("seed", [0, 1, 2])
def test_parity_with_sklearn(seed, scenario, zd):
  y, p = _data(seed, scenario)
  ours = M.classification_metrics(jnp.asarray(y), jnp.asarray(p), C, zd)
  assert ours["confusion_matrix"].dtype == jnp.int32
  assert ours["confusion_matrix"].shape == (C, C)
  _assert_same(ours, _sklearn(y, p, zd))


def test_nan_zero_division_is_skipped_by_averages():
  y, p = _data(0, "all")
  m = M.classification_metrics(y, p, C, NAN)
  prec = np.asarray(m["precision"])
  assert np.isnan(prec[3]) and np.isnan(prec[6])  # never predicted
  assert not np.isnan(float(m["macro_precision"]))
  assert np.isclose(float(m["macro_precision"]), np.nanmean(prec))


def test_empty_after_mask_gives_zero_division():
  y, p = _data(0, "random")
  mask = np.zeros(N, bool)
  for zd in ZERO_DIVISIONS:
    m = M.classification_metrics(y, p, C, zd, mask=mask)
    assert int(np.asarray(m["confusion_matrix"]).sum()) == 0
    for k in ("precision", "macro_f1", "micro_recall", "weighted_f1",
              "accuracy"):
      assert _close(m[k], np.full(np.shape(m[k]), zd)), k


def test_confusion_matrix_matches_sklearn():
  y, p = _data(3, "all")
  cm = jax.jit(M.confusion_matrix, static_argnums=2)(y, p, C)
  np.testing.assert_array_equal(
      cm, skm.confusion_matrix(y, p, labels=list(range(C))))


def test_jit_with_traced_zero_division():
  y, p = _data(4, "all")
  fn = jax.jit(lambda a, b, zd: M.classification_metrics(a, b, C, zd))
  for zd in ZERO_DIVISIONS:
    _assert_same(fn(y, p, zd), _sklearn(y, p, zd))


def test_rejects_bad_zero_division():
  y, p = _data(0, "random")
  with pytest.raises(ValueError):
    M.classification_metrics(y, p, C, 0.5)


@pytest.mark.parametrize("zd", ZERO_DIVISIONS, ids=["zd0", "zd1", "zdnan"])
def test_vmap_over_replicas_equals_loop(zd):
  k = 4
  y, _ = _data(10, "random")
  preds = np.stack([_data(20 + i, "all")[1] for i in range(k)])
  preds[1][preds[1] == 2] = 1  # vary which classes are absent per replica

  shared = M.replica_metrics(y, preds, C, zd)
  vmapped = jax.jit(jax.vmap(
      lambda a, b: M.classification_metrics(a, b, C, zd),
      in_axes=(None, 0)))(y, preds)
  labels_k = np.stack([y] * k)
  per_label = M.replica_metrics(labels_k, preds, C, zd)
  for i in range(k):
    loop = M.classification_metrics(y, preds[i], C, zd)
    ref = _sklearn(y, preds[i], zd)
    for batched in (shared, vmapped, per_label):
      one = {key: v[i] for key, v in batched.items()}
      _assert_same(one, loop)
      _assert_same(one, ref)
  assert shared["macro_f1"].shape == (k,)
  assert shared["f1"].shape == (k, C)
  assert shared["confusion_matrix"].shape == (k, C, C)


def test_mask_excludes_rows():
  y, p = _data(5, "random")
  rng = np.random.default_rng(0)
  mask = rng.random(N) < 0.7
  # Garbage in the masked rows must not leak in, even out-of-range ids.
  y_pad = np.where(mask, y, 99)
  p_pad = np.where(mask, p, -3)
  for zd in ZERO_DIVISIONS:
    ours = M.classification_metrics(y_pad, p_pad, C, zd, mask=mask)
    _assert_same(ours, _sklearn(y[mask], p[mask], zd))
  # Padding label -1 is dropped without a mask as well.
  ours = M.classification_metrics(np.where(mask, y, -1), p, C)
  _assert_same(ours, _sklearn(y[mask], p[mask], 0.0))
  # Per-replica masks under vmap.
  masks = np.stack([mask, ~mask])
  batched = M.replica_metrics(y, np.stack([p, p]), C, mask=masks)
  for i in range(2):
    ref = _sklearn(y[masks[i]], p[masks[i]], 0.0)
    _assert_same({k: v[i] for k, v in batched.items()}, ref)


_NUM = re.compile(r"^-?\d+(\.\d+)?$|^nan$")


@pytest.mark.parametrize("scenario,zd,digits", [
    ("random", 0.0, 4), ("all", 1.0, 4), ("all", NAN, 2), ("absent_pred",
                                                           0.0, 3)])
def test_report_matches_sklearn(scenario, zd, digits):
  y, p = _data(7, scenario)
  m = M.classification_metrics(y, p, C, zd)
  ours = M.classification_report(m, NAMES, digits=digits)
  ref = skm.classification_report(y, p, labels=list(range(C)),
                                  target_names=NAMES, digits=digits,
                                  zero_division=zd)
  # Same layout line by line; numbers may differ by one unit in the last
  # digit because jnp computes in float32 and sklearn in float64.
  ours_lines, ref_lines = ours.splitlines(), ref.splitlines()
  assert len(ours_lines) == len(ref_lines)
  for a, b in zip(ours_lines, ref_lines):
    assert len(a) == len(b), (a, b)
    ta, tb = a.split(), b.split()
    assert len(ta) == len(tb)
    for x, z in zip(ta, tb):
      if _NUM.match(z):
        assert _close(float(x), float(z), tol=1.01 * 10**-digits), (a, b)
      else:
        assert x == z

  ours_d = M.report_dict(m, NAMES)
  ref_d = skm.classification_report(y, p, labels=list(range(C)),
                                    target_names=NAMES, output_dict=True,
                                    zero_division=zd)
  assert list(ours_d) == list(ref_d)
  for key, val in ref_d.items():
    if isinstance(val, dict):
      assert list(ours_d[key]) == list(val)
      for sub, v in val.items():
        assert type(ours_d[key][sub]) is float
        assert _close(ours_d[key][sub], v), (key, sub)
    else:
      assert type(ours_d[key]) is float and _close(ours_d[key], val)
  json.dumps(ours_d)


def test_report_rejects_batched_metrics():
  y, p = _data(0, "random")
  batched = M.replica_metrics(y, np.stack([p, p]), C)
  with pytest.raises(ValueError):
    M.classification_report(batched, NAMES)


@pytest.mark.parametrize("k", [1, 2, 5])
def test_seed_stats(k):
  rng = np.random.default_rng(k)
  # Per-replica metrics arrive as float32 jax arrays; compare against the
  # same float32 values in float64 so the check is exact to 1e-6. Values near
  # 0.5 keep the interval inside [0, 1], so no clipping here.
  v32 = jnp.asarray(0.45 + 0.1 * rng.random(k), jnp.float32)
  v = np.asarray(v32, np.float64)
  s = M.seed_stats(v32)
  assert s["n"] == k and s["ci95_reliable"] == (k >= 3)
  assert math.isclose(s["mean"], v.mean(), rel_tol=1e-6)
  if k == 1:
    assert s["std"] == 0.0
    assert s["ci95_low"] is None and s["ci95_high"] is None  # no interval from one seed
  else:
    assert math.isclose(s["std"], v.std(ddof=1), rel_tol=1e-6)
    lo, hi = stats.t.interval(0.95, k - 1, loc=v.mean(), scale=stats.sem(v))
    assert 0 < lo and hi < 1
    assert math.isclose(s["ci95_low"], lo, rel_tol=1e-6)
    assert math.isclose(s["ci95_high"], hi, rel_tol=1e-6)
  json.dumps(s)


def test_seed_stats_ci_is_clipped_and_flagged():
  # The case: two seeds far apart give a t interval beyond 1 (and below 0).
  v = [0.30, 0.90]
  lo, hi = stats.t.interval(0.95, 1, loc=np.mean(v), scale=stats.sem(v))
  assert lo < 0 and hi > 1
  s = M.seed_stats(v)
  assert (s["ci95_low"], s["ci95_high"]) == (0.0, 1.0)
  assert s["ci95_reliable"] is False
  # Unbounded values (a loss) keep the raw interval.
  raw = M.seed_stats(v, bounds=None)
  assert math.isclose(raw["ci95_low"], lo) and math.isclose(raw["ci95_high"], hi)
  # Per-class (K, C) values are clipped elementwise; three seeds are reliable.
  s3 = M.seed_stats([[0.0, 1.0], [0.5, 1.0], [1.0, 0.2]])
  assert s3["ci95_reliable"] is True
  assert all(0.0 <= x <= 1.0 for x in s3["ci95_low"] + s3["ci95_high"])


def test_seed_summary():
  y, _ = _data(0, "random")
  preds = np.stack([_data(30 + i, "random")[1] for i in range(3)])
  batched = M.replica_metrics(y, preds, C)
  summary = M.seed_summary(batched)
  # Only one-scalar-per-replica entries are summarised.
  assert "macro_f1" in summary and "accuracy" in summary
  assert "f1" not in summary and "confusion_matrix" not in summary
  acc = np.asarray(batched["accuracy"], np.float64)
  assert math.isclose(summary["accuracy"]["mean"], acc.mean(), rel_tol=1e-6)
  assert math.isclose(summary["accuracy"]["std"], acc.std(ddof=1),
                      rel_tol=1e-6)
  json.loads(json.dumps(summary))


def test_ensemble():
  rng = np.random.default_rng(0)
  k = 3
  y, _ = _data(0, "random")
  logits = rng.normal(size=(k, N, C))
  probs = np.exp(logits) / np.exp(logits).sum(-1, keepdims=True)
  ens = M.ensemble_probs(jnp.asarray(probs))
  assert ens.shape == (N, C)
  np.testing.assert_allclose(ens, probs.mean(0), rtol=1e-6, atol=1e-7)
  m = M.ensemble_metrics(y, probs, C)
  _assert_same(m, _sklearn(y, probs.mean(0).argmax(-1), 0.0))


@pytest.mark.parametrize("normalize", [True, False])
def test_plot_confusion_matrix(tmp_path, normalize):
  import matplotlib.image

  y, p = _data(0, "all")  # has an all-zero row (class 6)
  cm = M.confusion_matrix(y, p, C)
  path = tmp_path / "cm.png"
  M.plot_confusion_matrix(cm, NAMES, path, normalize=normalize, title="t")
  with open(path, "rb") as f:
    assert f.read(8) == b"\x89PNG\r\n\x1a\n"
  img = matplotlib.image.imread(path)
  assert img.ndim == 3 and img.shape[0] > 100 and img.shape[1] > 100
  assert img.std() > 0  # not a blank canvas
