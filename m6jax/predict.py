"""Predict categories of new products with a trained run.

  python -m m6jax.predict --workdir runs/default --csv new.csv --images new_images/ \\
      --out predictions.csv

One row per usable product: uniq_id, predicted category, one probability
column per category (the mean over the seed replicas). Bad rows are skipped
and listed in `<out>.data_report.txt` (or stop the run with --on_bad_row=fail).
"""

from __future__ import annotations

import csv
import os

import numpy as np
from absl import app, flags, logging

flags.DEFINE_string("workdir", None, "a finished training run")
flags.DEFINE_string("csv", None, "catalogue CSV of the products to classify")
flags.DEFINE_string("images", None, "folder with their images")
flags.DEFINE_string("out", "predictions.csv", "output CSV")
flags.DEFINE_enum("checkpoint", "best", ["best", "latest"], "which saved parameters")
flags.DEFINE_enum("on_bad_row", None, ["skip", "fail"], "default: the run's data.on_bad_row")
FLAGS = flags.FLAGS


def predict(workdir: str, csv_path: str, image_dir: str, out: str, which: str = "best",
            on_bad_row: str | None = None) -> dict:
  """Writes `out`; returns {'probs': (N, C) ensemble, 'uniq_id', 'classes', 'report'}."""
  from m6jax import embed, restore
  from m6jax.data import catalogue, pipeline
  from m6jax.models import fusion

  cfg = restore.load_config(workdir)
  policy = on_bad_row or cfg.data.on_bad_row
  rows, report = catalogue.read_catalogue(
      csv_path, image_dir, dict(cfg.data.columns), cfg.data.label_depth,
      max_image_pixels=cfg.data.max_image_pixels, require_label=False)
  out_dir = os.path.dirname(os.path.abspath(out))
  os.makedirs(out_dir, exist_ok=True)
  report.write(out_dir)
  if report.bad:
    logging.warning("%d of %d rows skipped:\n%s", len(report.bad), report.total_rows,
                    report.summary())
    if policy == "fail":
      raise catalogue.DataError(f"{len(report.bad)} bad row(s) in {csv_path}:\n"
                                + "\n".join(str(b) for b in report.bad))
  if not rows:
    raise catalogue.DataError(f"no usable rows in {csv_path}")

  cfg, run, params, stats = restore.restore(workdir, which)
  mods = fusion.modalities(cfg.model.fusion)
  bs = cfg.data.batch_size
  texts = [r.text for r in rows]

  if cfg.train.mode == "frozen":
    feats = {}
    if "image" in mods:
      from m6jax.models import towers
      tower = towers.image_tower(cfg.model.image.name, cfg.model.image.weights,
                                 cfg.data.image_size, seed=cfg.seed)
      feats["image"] = embed.embed_image_batches(tower, pipeline.row_batches(rows, cfg.data, bs))
    if "text" in mods:
      feats["text"] = run.text_features_for(texts)
    probs, _ = run.trainer.predict_features(params, feats)
    probs = np.asarray(probs)
  else:
    tfidf = run.text_features_for(texts) if run.text_features is not None else None
    if tfidf is not None:
      run.trainer.text_lookup["new"] = dict(zip([r.uniq_id for r in rows], tfidf))
    chunks = []
    for b in pipeline.row_batches(rows, cfg.data, bs):
      pr, _ = run.trainer.predict_batch(params, stats, b, "new")
      chunks.append(np.asarray(pr)[:, b["mask"]])
    probs = np.concatenate(chunks, 1)

  ens = probs.mean(0)
  tmp = out + ".tmp"
  with open(tmp, "w", newline="") as f:
    w = csv.writer(f)
    w.writerow(["uniq_id", "predicted"] + [f"p_{c}" for c in run.class_names])
    for r, p in zip(rows, ens):
      w.writerow([r.uniq_id, run.class_names[int(p.argmax())]] + [f"{v:.6f}" for v in p])
  os.replace(tmp, out)
  logging.info("wrote %d predictions to %s (%d rows skipped)", len(rows), out, len(report.bad))
  return {"probs": ens, "uniq_id": [r.uniq_id for r in rows], "classes": run.class_names,
          "report": report}


def main(argv):
  del argv
  logging.set_verbosity(logging.INFO)
  predict(FLAGS.workdir, FLAGS.csv, FLAGS.images, FLAGS.out, FLAGS.checkpoint, FLAGS.on_bad_row)


if __name__ == "__main__":
  flags.mark_flags_as_required(["workdir", "csv", "images"])
  app.run(main)
