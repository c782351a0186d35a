"""Scoring a trained run and writing its outputs into the workdir.

Outputs contract (other tools rely on it):
  config.json        the full config
  results.json       per-seed accuracy / macro-F1 (and more), their mean, std and
                     95 % t interval over seeds (`summary`: the SEED SPREAD, how much
                     retraining moves the score), the seed-ensemble's scores and
                     per-class report, and `test.bootstrap`: percentile-bootstrap 95 %
                     intervals over TEST PRODUCTS (how much another draw of test
                     products would move it) for the ensemble and the per-seed mean
  predictions_test.csv  the ensemble's prediction per test product (uniq_id, label,
                     predicted, p_<class>): what m6jax.track.compare pairs cells on
  report.txt         the ensemble's classification report on the test split
  confusion_matrix.png, predictions_test.csv, data_report.{json,txt}
"""

from __future__ import annotations

import csv
import os

import numpy as np

from m6jax import files
from m6jax import mesh as mesh_lib
from m6jax.evaluate import intervals
from m6jax.evaluate import metrics as metrics_lib

SCALARS = ("accuracy", "macro_f1", "micro_f1", "weighted_f1", "macro_precision",
           "macro_recall")
VAL_METRICS = ("macro_f1", "accuracy", "log_loss")


def selection(history: list, best_epoch, select_by: str) -> dict:
  """Each replica's selected epoch as training kept it (TrainState.best_epoch, (R,),
  -1 = never selected) and its validation scores read from the history at that epoch:
  {'select_by', 'best_epoch': [R], '<metric>': [R], '<metric>_mean'} (metric: macro_f1,
  accuracy, log_loss; None for a replica never selected). No rule is applied here."""
  best = [int(e) for e in np.asarray(best_epoch).reshape(-1)]
  if not history:
    return {}
  rows = {int(h["epoch"]): h for h in history}
  missing = sorted({e for e in best if e >= 0 and e not in rows})
  if missing:
    raise ValueError(f"selected epoch(s) {missing} are not in the training history "
                     f"(epochs {min(rows)}..{max(rows)})")
  out = {"select_by": select_by, "best_epoch": best}
  for name in VAL_METRICS:
    if f"val_{name}" not in history[0]:
      continue
    out[name] = [float(rows[e][f"val_{name}"][r]) if e >= 0 else None
                 for r, e in enumerate(best)]
    vals = [v for v in out[name] if v is not None]
    out[f"{name}_mean"] = float(np.mean(vals)) if vals else None
  return out


def bootstrap(labels, probs, num_classes: int, resamples: int = 2000, seed: int = 0) -> dict:
  """labels (N,), probs (K, N, C) -> results.json's `test.bootstrap`:
  {'accuracy': {point, low, high}, 'macro_f1': {...}} of the seed ensemble,
  'per_seed_mean': the same for the mean over the K seed models, and 'resamples',
  'seed', 'level', 'over'. Every statistic sees the same resampled products."""
  labels, probs = np.asarray(labels), np.asarray(probs)
  ens_pred = np.asarray(metrics_lib.ensemble_probs(probs)).argmax(-1)
  args = dict(resamples=resamples, seed=seed, level=intervals.LEVEL)

  def trim(cis):
    return {k: {f: ci[f] for f in ("point", "low", "high")} for k, ci in cis.items()}

  out = trim(intervals.classification_intervals(labels, ens_pred, num_classes, **args))
  out["per_seed_mean"] = trim(intervals.classification_intervals(
      labels, probs.argmax(-1), num_classes, **args))
  return out | {"resamples": int(resamples), "seed": int(seed), "level": intervals.LEVEL,
                "over": "test products (percentile bootstrap)"}


def score(labels, probs, class_names, evaluate_cfg=None) -> dict:
  """labels (N,), probs (K, N, C) -> per-seed, summary (seed spread), ensemble metrics and
  the bootstrap over products (evaluate_cfg: cfg.evaluate, its resamples and seed)."""
  labels = np.asarray(labels)
  probs = np.asarray(probs)
  c = len(class_names)
  per = metrics_lib.replica_metrics(labels, probs.argmax(-1), c)
  per_seed = {k: np.asarray(per[k]).tolist() for k in SCALARS}
  ens = metrics_lib.ensemble_metrics(labels, probs, c)
  ev = evaluate_cfg or {}
  return {
      "per_seed": per_seed,
      "summary": metrics_lib.seed_summary({k: np.asarray(per[k]) for k in SCALARS}),
      "ensemble": {k: float(ens[k]) for k in SCALARS},
      "bootstrap": bootstrap(labels, probs, c, int(ev.get("bootstrap_resamples", 2000)),
                             int(ev.get("bootstrap_seed", 0))),
      "report": metrics_lib.report_dict(ens, class_names),
      "report_per_seed": [metrics_lib.report_dict(
          {k: np.asarray(v)[i] for k, v in per.items()}, class_names)
          for i in range(probs.shape[0])],
      "_ensemble_metrics": ens,
  }


def write_outputs(workdir: str, scores: dict, class_names, ids, labels, probs) -> None:
  """Writes report.txt, confusion_matrix.png, predictions_test.csv of the test scores
  (`score`; its private ensemble metrics are taken out of `scores` here). results.json
  is written once, by m6jax.experiment."""
  ens = scores.pop("_ensemble_metrics")
  if not mesh_lib.is_writer():
    return
  metrics_lib.plot_confusion_matrix(np.asarray(ens["confusion_matrix"]), class_names,
                                    os.path.join(workdir, "confusion_matrix.png"),
                                    title="test, seed ensemble")
  report = metrics_lib.classification_report(ens, class_names)
  files.write_text(os.path.join(workdir, "report.txt"), report + "\n")
  mean_probs = np.asarray(probs).mean(0)

  def write_predictions(f):
    w = csv.writer(f)
    w.writerow(["uniq_id", "label", "predicted"] + [f"p_{c}" for c in class_names])
    for uid, y, p in zip(ids, labels, mean_probs):
      w.writerow([uid, class_names[y], class_names[int(p.argmax())]] +
                 [f"{v:.6f}" for v in p])

  files.atomic_write(os.path.join(workdir, "predictions_test.csv"), write_predictions)
