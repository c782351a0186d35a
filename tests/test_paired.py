"""Paired comparisons of cells on the same test products; compare never ranks on test."""

import csv

import numpy as np
import pytest
from scipy import stats

from m6jax.track import compare, paired, sweep


def _write(workdir, rows):
  workdir.mkdir(parents=True, exist_ok=True)
  with open(workdir / "predictions_test.csv", "w", newline="") as f:
    w = csv.writer(f)
    w.writerow(["uniq_id", "label", "predicted", "p_a"])
    w.writerows([[u, y, p, "0.5"] for u, y, p in rows])


def test_cells_are_paired_by_product_id(tmp_path):
  rng = np.random.default_rng(0)
  ids = [f"id{i}" for i in range(80)]
  y = rng.choice(["a", "b", "c"], 80)
  ref = np.where(rng.random(80) < 0.9, y, "c")
  cell = np.where(rng.random(80) < 0.7, y, "a")
  _write(tmp_path / "ref", zip(ids, y, ref))
  # Another order, and one product the reference was not scored on: left out.
  order = rng.permutation(80)
  _write(tmp_path / "cell", [(ids[i], y[i], cell[i]) for i in order] + [("extra", "a", "b")])
  out = paired.compare_predictions(str(tmp_path / "ref"), str(tmp_path / "cell"),
                                   resamples=2000, seed=0)
  cr, cc = ref == y, cell == y
  assert out["products"] == 80 and out["products_cell"] == 81
  assert out["diff"] == pytest.approx(cc.mean() - cr.mean())
  assert out["low"] < out["diff"] < out["high"]
  assert (out["cell_only"], out["ref_only"]) == (int((cc & ~cr).sum()), int((~cc & cr).sum()))
  n = out["cell_only"] + out["ref_only"]
  assert out["p_mcnemar"] == pytest.approx(stats.binomtest(out["cell_only"], n).pvalue)
  assert out["within_noise"] == (out["low"] <= 0 <= out["high"])


def test_a_product_labelled_differently_is_refused(tmp_path):
  _write(tmp_path / "ref", [("x", "a", "a"), ("y", "b", "b")])
  _write(tmp_path / "cell", [("x", "a", "a"), ("y", "a", "a")])
  with pytest.raises(ValueError, match="labelled differently"):
    paired.compare_predictions(str(tmp_path / "ref"), str(tmp_path / "cell"))


def test_cross_validated_cells_get_the_corrected_t_test():
  ref = {"folds": 5, "rows": 714, "fold_rows": [143, 143, 143, 143, 142],
         "per_fold_accuracy": [0.93, 0.95, 0.94, 0.92, 0.96]}
  cell = dict(ref, per_fold_accuracy=[0.95, 0.95, 0.96, 0.93, 0.97])
  out = paired.compare_folds(ref, cell)
  d = np.subtract(cell["per_fold_accuracy"], ref["per_fold_accuracy"])
  n_test = np.mean(ref["fold_rows"])
  se = np.sqrt((1 / 5 + n_test / (714 - n_test)) * d.var(ddof=1))
  assert out["t"] == pytest.approx(d.mean() / se)
  assert out["p"] == pytest.approx(2 * stats.t.sf(abs(d.mean() / se), 4))
  # Other folds (another partition): no pairing.
  assert paired.compare_folds(ref, dict(cell, fold_rows=[150, 140, 140, 142, 142])) is None
  assert paired.compare_folds(ref, None) is None


def test_reference_cell_default_and_named():
  cells = [{"name": "text", "base": "configs/text_only.py:minilm", "overrides": {}},
           {"name": "plain", "base": "configs/default.py", "overrides": {}},
           {"name": "tuned", "base": "configs/default.py", "overrides": {"model.hidden": 8}}]
  names = [c["name"] for c in cells]
  assert paired.reference_cell(cells, names) == "plain"
  assert paired.reference_cell(cells, names + ["fusion_early"]) == "fusion_early"
  assert paired.reference_cell(cells, names, "text") == "text"
  assert paired.reference_cell(cells[:1], names[:1]) is None
  with pytest.raises(ValueError, match="nope"):
    paired.reference_cell(cells, names, "nope")


def _row(cell, val=None):
  return {"cell": cell, "val": {} if val is None else {"macro_f1": val},
          "test": {"macro_f1": {"mean": 0.9 if cell == "b" else 0.5}}}


def test_compare_refuses_to_rank_on_test_unless_asked():
  rows = [_row("a", 0.8), _row("b")]
  with pytest.raises(compare.NoValidationScores, match=r"\['b'\].*--allow-test-ranking"):
    compare.select(rows, "macro_f1")
  ranked, split = compare.select(rows, "macro_f1", allow_test_ranking=True)
  assert split == "test" and ranked[0]["cell"] == "b"
  ranked, split = compare.select([_row("a", 0.8), _row("b", 0.7)], "macro_f1")
  assert split == "validation" and ranked[0]["cell"] == "a"


class _Parent:
  uri = None

  def __init__(self):
    self.tags, self.artifacts = {}, []

  def set_tags(self, tags):
    self.tags.update(tags)

  def log_artifacts(self, paths):
    self.artifacts += paths

  def log_metrics(self, metrics):
    pass


def test_sweep_never_tags_a_best_cell_from_test(monkeypatch, tmp_path):
  parent = _Parent()

  def refuse(*a, **k):
    raise compare.NoValidationScores("cell(s) ['b'] have no validation macro_f1")
  monkeypatch.setattr(compare, "compare", refuse)
  assert sweep.log_comparison(parent, str(tmp_path)) is None
  assert "m6jax.best_cell" not in parent.tags
  # Even a comparison ranked on test (asked for elsewhere) is not tagged.
  monkeypatch.setattr(compare, "compare", lambda *a, **k: {
      "split": "test", "rows": [{"cell": "b", "overrides": ""}], "paths": []})
  sweep.log_comparison(parent, str(tmp_path))
  assert "m6jax.best_cell" not in parent.tags
