"""Paired comparisons of sweep cells with a reference cell, on the same test products.

Each finished cell's workdir holds predictions_test.csv (the ensemble's
prediction per test product, m6jax.evaluate.results); two cells are paired by
product id, so the comparison sees only how the two models differ on the
products both were scored on:

  * the accuracy difference (cell - reference) with a paired-bootstrap 95 %
    interval over those products (m6jax.evaluate.intervals),
  * McNemar's exact p on the products exactly one of the two gets right,
  * "within noise" when the interval contains 0;

and, for cross-validated cells whose results carry per-fold out-of-fold
accuracies over the same folds, the Nadeau-Bengio corrected resampled t-test.
"""

from __future__ import annotations

import csv
import os

import numpy as np

from m6jax.evaluate import intervals

DEFAULT_BASE = "configs/default.py"
DEFAULT_NAME = "fusion_early"
PREDICTIONS = "predictions_test.csv"


def reference_cell(cells: list[dict], names: list[str], reference: str | None = None):
  """The reference cell's name: `reference` when given (it must be one of `names`), else
  the cell named DEFAULT_NAME, else the one cell on DEFAULT_BASE without overrides;
  None when there is none. cells: sweep.json's [{'name', 'base', 'overrides'}]."""
  if reference:
    if reference not in names:
      raise ValueError(f"reference cell {reference!r} has no results; cells: {names}")
    return reference
  if DEFAULT_NAME in names:
    return DEFAULT_NAME
  plain = [c["name"] for c in cells if c["name"] in names and not c.get("overrides")
           and os.path.normpath(c.get("base") or "") == os.path.normpath(DEFAULT_BASE)]
  return plain[0] if len(plain) == 1 else None


def read_predictions(workdir: str) -> dict:
  """<workdir>/predictions_test.csv -> {uniq_id: (label, predicted)}."""
  path = os.path.join(workdir, PREDICTIONS)
  with open(path, newline="", encoding="utf-8") as f:
    rows = list(csv.DictReader(f))
  missing = {"uniq_id", "label", "predicted"} - set(rows[0] if rows else {})
  if missing:
    raise ValueError(f"{path}: no column(s) {sorted(missing)}")
  return {r["uniq_id"]: (r["label"], r["predicted"]) for r in rows}


def paired_correct(ref: dict, cell: dict, where: str = "") -> tuple[np.ndarray, np.ndarray]:
  """Two {uniq_id: (label, predicted)} -> (N,) correctness of each on the products both
  have, in one order. A product labelled differently in the two is refused."""
  ids = sorted(set(ref) & set(cell))
  if not ids:
    raise ValueError(f"{where}: no test product in common with the reference")
  bad = [u for u in ids if ref[u][0] != cell[u][0]]
  if bad:
    raise ValueError(f"{where}: {len(bad)} product(s) labelled differently than in the "
                     f"reference, e.g. {bad[:3]}")
  return (np.array([ref[u][0] == ref[u][1] for u in ids]),
          np.array([cell[u][0] == cell[u][1] for u in ids]))


def compare_predictions(ref_dir: str, cell_dir: str, resamples: int = 2000,
                        seed: int = 0) -> dict:
  """Cell vs reference on their common test products: {'products', 'products_ref',
  'products_cell', 'diff', 'low', 'high', 'p_mcnemar', 'cell_only', 'ref_only',
  'within_noise'} (diff = cell accuracy - reference accuracy)."""
  ref, cell = read_predictions(ref_dir), read_predictions(cell_dir)
  c_ref, c_cell = paired_correct(ref, cell, cell_dir)
  ci = intervals.paired_bootstrap_diff(c_cell, c_ref, resamples, seed)
  mc = intervals.mcnemar_exact(c_cell, c_ref)
  return {"products": int(len(c_ref)), "products_ref": len(ref), "products_cell": len(cell),
          "diff": ci["point"], "low": ci["low"], "high": ci["high"],
          "p_mcnemar": mc["p"], "cell_only": mc["a_only"], "ref_only": mc["b_only"],
          "within_noise": bool(ci["low"] <= 0.0 <= ci["high"])}


def compare_folds(ref_cv: dict | None, cell_cv: dict | None) -> dict | None:
  """Corrected resampled t-test (Nadeau-Bengio) of two cross-validated cells' per-fold
  out-of-fold accuracies (results.json 'cross_validation'); None unless both have them
  over folds of the same sizes (the same partition of the same rows)."""
  keys = ("per_fold_accuracy", "fold_rows")
  if not ref_cv or not cell_cv or not all(k in ref_cv and k in cell_cv for k in keys):
    return None
  if ref_cv["fold_rows"] != cell_cv["fold_rows"] or ref_cv["rows"] != cell_cv["rows"]:
    return None
  d = np.asarray(cell_cv["per_fold_accuracy"]) - np.asarray(ref_cv["per_fold_accuracy"])
  n_test = float(np.mean(cell_cv["fold_rows"]))
  out = intervals.nadeau_bengio(d, cell_cv["rows"] - n_test, n_test)
  return out | {"within_noise": bool(out["low"] <= 0.0 <= out["high"])}


def compare_cells(root: str, names: list[str], reference: str, resamples: int = 2000,
                  seed: int = 0, results: dict | None = None) -> dict:
  """{cell: comparison with `reference`} for every other cell of `root` that has
  predictions ({'error': why} where it cannot be paired); a comparison also has 'cv'
  (compare_folds) when results ({cell: results.json dict}) allow it: against the
  reference's cross-validation, or (a reference without folds) against the cell
  '<reference>_folds<K>' of the same K when there is one."""
  results = results or {}
  out = {}
  for name in names:
    if name == reference:
      continue
    try:
      out[name] = compare_predictions(os.path.join(root, reference), os.path.join(root, name),
                                      resamples, seed)
    except (OSError, ValueError) as e:
      out[name] = {"error": str(e)}
      continue
    cell_cv = (results.get(name) or {}).get("cross_validation")
    ref_name = _cv_reference(results, reference, cell_cv)
    cv = None if ref_name in (None, name) else compare_folds(
        results[ref_name]["cross_validation"], cell_cv)
    if cv is not None:
      out[name]["cv"] = cv | {"reference": ref_name}
  return out


def _cv_reference(results: dict, reference: str, cell_cv: dict | None) -> str | None:
  """The cell a cross-validated cell's folds are compared with (None: none)."""
  if not cell_cv:
    return None
  for name in (reference, f"{reference}_folds{cell_cv.get('folds')}"):
    if (results.get(name) or {}).get("cross_validation"):
      return name
  return None


def noise_words(c: dict) -> str:
  """'within noise' / 'better' / 'worse' for a comparison (its interval vs 0)."""
  if "error" in c:
    return "not paired"
  if c["within_noise"]:
    return "within noise"
  return "better" if c["diff"] > 0 else "worse"
