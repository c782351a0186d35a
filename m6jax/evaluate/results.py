"""Scoring a trained run and writing its outputs into the workdir.

Outputs contract (other tools rely on it):
  config.json        the full config
  results.json       per-seed accuracy / macro-F1 (and more), their mean, std and
                     95 % CI, the seed-ensemble's scores and per-class report
  report.txt         the ensemble's classification report on the test split
  confusion_matrix.png, predictions_test.csv, data_report.{json,txt}
"""

from __future__ import annotations

import csv
import os

import numpy as np

from m6jax import mesh as mesh_lib
from m6jax.evaluate import metrics as metrics_lib

SCALARS = ("accuracy", "macro_f1", "micro_f1", "weighted_f1", "macro_precision",
           "macro_recall")


def score(labels, probs, class_names) -> dict:
  """labels (N,), probs (K, N, C) -> per-seed, summary and ensemble metrics."""
  labels = np.asarray(labels)
  probs = np.asarray(probs)
  c = len(class_names)
  per = metrics_lib.replica_metrics(labels, probs.argmax(-1), c)
  per_seed = {k: np.asarray(per[k]).tolist() for k in SCALARS}
  ens = metrics_lib.ensemble_metrics(labels, probs, c)
  return {
      "per_seed": per_seed,
      "summary": metrics_lib.seed_summary({k: np.asarray(per[k]) for k in SCALARS}),
      "ensemble": {k: float(ens[k]) for k in SCALARS},
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
  with open(os.path.join(workdir, "report.txt"), "w") as f:
    f.write(report + "\n")
  mean_probs = np.asarray(probs).mean(0)
  with open(os.path.join(workdir, "predictions_test.csv"), "w", newline="") as f:
    w = csv.writer(f)
    w.writerow(["uniq_id", "label", "predicted"] + [f"p_{c}" for c in class_names])
    for uid, y, p in zip(ids, labels, mean_probs):
      w.writerow([uid, class_names[y], class_names[int(p.argmax())]] +
                 [f"{v:.6f}" for v in p])
