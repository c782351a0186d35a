"""Predict categories of new products with a trained run.

  python -m m6jax.inference.predict --workdir runs/default --csv new.csv --images new_images/ \\
      --out predictions.csv

Reads the run's inference bundle and checkpoint (m6jax.inference.restore) and the new
products, nothing else: the training catalogue is never touched, and nothing
is written into the run unless --out points there.

Every CSV row gets one output row, in input order: uniq_id, predicted
category, one probability column per category (the ensemble of all replicas
of the checkpoint, as results.json scored it) and a `note`. A fused model
predicts a row whose image is missing or unusable with that embedding zeroed,
i.e. from its text alone (and a row without text from its image), and the note
says so. Only a model trained with model.modality_dropout > 0 has seen such
inputs (the default, 0, has not: m6jax.evaluate.evals.importance measures the
cost). A text-only model never reads images. A row that cannot be predicted (an
unreadable record, or no usable input for the model) keeps its reason in
`note` and empty probabilities. Every noted row is also listed in
`<out>.data_report.txt` / `<out>.data_report.json`; with --on_bad_row=fail any
noted row stops the run before anything is written.
"""

from __future__ import annotations

import csv
import dataclasses
import itertools
import json
import os

import numpy as np
from absl import app, flags, logging

from m6jax import console, files, memory
from m6jax.data import catalogue, images, pipeline, tokenize
from m6jax.explain import multimodal
from m6jax.inference import restore
from m6jax.inference.products import Product, read_csv

FLAGS = flags.FLAGS


def _define_flags():
  # Defined only when run as a script: m6jax.main (which imports this module through
  # m6jax.inference.serve when a tracked run logs its model) owns a flag of the same name.
  flags.DEFINE_string("workdir", None, "a finished training run")
  flags.DEFINE_string("csv", None, "catalogue CSV of the products to classify")
  flags.DEFINE_string("images", None, "folder with their images (models that read images)")
  flags.DEFINE_string("out", "predictions.csv", "output CSV")
  flags.DEFINE_enum("checkpoint", "best", ["best", "latest"], "which saved parameters")
  flags.DEFINE_enum("on_bad_row", None, ["skip", "fail"], "default: the run's data.on_bad_row")
  flags.DEFINE_bool("explain", False, "also write <out>.explain.csv: per-row top words and "
                    "modality shares (m6jax.explain.multimodal)")
  flags.DEFINE_bool("heatmaps", False, "with --explain: a Grad-CAM PNG per row with a photo "
                    "in <out>.heatmaps/ (m6jax.explain.heatmaps), named in a heatmap column")
  flags.mark_flags_as_required(["workdir", "csv"])


@dataclasses.dataclass
class Predictions:
  """One entry per input row, in input order; `probs` rows are NaN where not predicted."""
  classes: list
  products: list
  probs: np.ndarray     # float32 (N, C), the ensemble of the R replicas (Inference.ensemble)
  source: str = ""

  @property
  def uniq_id(self) -> list[str]:
    return [p.uniq_id for p in self.products]

  @property
  def predicted(self) -> list[str]:
    return ["" if np.isnan(q).any() else self.classes[int(q.argmax())] for q in self.probs]

  @property
  def notes(self) -> list[str]:
    return [_note(p) for p in self.products]

  def noted(self) -> list[dict]:
    """The rows with a note: {'row', 'line', 'uniq_id', 'field', 'file', 'reason', 'predicted'}."""
    out = []
    for p, pred in zip(self.products, self.predicted):
      for field, file, reason in p.problems:
        out.append({"row": p.row, "line": p.line, "uniq_id": p.uniq_id, "field": field,
                    "file": file, "reason": reason, "predicted": bool(pred)})
    return out

  def to_frame(self):
    """A pandas DataFrame: uniq_id, predicted, p_<class> (float64; NaN if not predicted), note."""
    import pandas as pd
    data = {"uniq_id": self.uniq_id, "predicted": self.predicted}
    for j, c in enumerate(self.classes):
      data[f"p_{c}"] = self.probs[:, j].astype(np.float64)
    data["note"] = self.notes
    return pd.DataFrame(data)

  def write_csv(self, out: str) -> None:
    """Writes `out` atomically, probabilities with 6 decimals ('' where not predicted)."""

    def write(f):
      w = csv.writer(f)
      w.writerow(["uniq_id", "predicted"] + [f"p_{c}" for c in self.classes] + ["note"])
      for p, pred, q, note in zip(self.products, self.predicted, self.probs, self.notes):
        w.writerow([p.uniq_id, pred] + ([""] * len(q) if not pred else [f"{v:.6f}" for v in q])
                   + [note])

    files.atomic_write(out, write)

  def report(self) -> dict:
    n_pred = sum(1 for x in self.predicted if x)
    return {"csv": self.source, "total_rows": len(self.products), "predicted": n_pred,
            "not_predicted": len(self.products) - n_pred,
            "rows_with_notes": sum(1 for p in self.products if p.problems),
            "noted": self.noted()}

  def summary(self) -> str:
    r = self.report()
    lines = [f"{r['csv']}: {r['total_rows']} rows, {r['predicted']} predicted, "
             f"{r['not_predicted']} not predicted, {r['rows_with_notes']} with a note"]
    for n in r["noted"]:
      where = f" file={n['file']}" if n["file"] else ""
      lines.append(f"  row {n['row']} (line {n['line']}) uniq_id={n['uniq_id'] or '?'} "
                   f"field={n['field']}{where}: {n['reason']}"
                   + ("" if n["predicted"] else " [not predicted]"))
    return "\n".join(lines)

  def write_report(self, out: str) -> None:
    """`<out>.data_report.txt` and `<out>.data_report.json`."""
    files.write_text(out + ".data_report.txt", self.summary() + "\n")
    files.write_text(out + ".data_report.json", json.dumps(self.report(), indent=2))


def _note(p: Product) -> str:
  reasons = "; ".join(reason for _, _, reason in p.problems)
  if p.error:
    return f"not predicted: {p.error}"
  if p.missing:
    kept = " and ".join(m for m in ("image", "text") if m not in p.missing)
    return f"{reasons}: {kept} only"
  return reasons


# --- predicting -------------------------------------------------------------------

def _decoded(run, products, idx):
  """Yields (i, uint8 (S, S, 3) image or None) for products[i], i in idx; a failure
  is noted on the product."""
  field = run.bundle.preprocessing["columns"]["image"]
  for i in idx:
    p = products[i]
    if not (p.image or p.image_bytes):
      yield i, None
      continue
    try:
      yield i, pipeline.image_from_file(p.image_bytes or p.image, run.data_cfg)
    except images.ImageError as e:
      p.problems.append((field, p.image, str(e)))
      p.image, p.image_bytes = "", b""
      yield i, None


def _batch(run, group, missing, bs) -> dict:
  """[(i, image or None, text)] of one missing-modality pattern -> a padded batch."""
  n, size = len(group), run.data_cfg.image_size
  b = {"mask": np.arange(bs) < n, "label": np.zeros(bs, np.int32),
       "uniq_id": np.array([str(i) for i, _, _ in group] + [""] * (bs - n), dtype=object),
       "text": np.array([t for _, _, t in group] + [""] * (bs - n), dtype=object)}
  for m in missing:
    b[f"{m}_embedding"] = np.zeros((bs, run.feature_dims[m]), np.float32)
  if "image" in run.mods and "image" not in missing:
    img = np.zeros((bs, size, size, 3), np.uint8)
    img[:n] = np.stack([x for _, x, _ in group])
    b["image"] = img
  return b


def _missing(run, p: Product, has_image: bool) -> tuple:
  out = []
  if "image" in run.mods and not has_image:
    out.append("image")
  if "text" in run.mods and not p.text:
    out.append("text")
  return tuple(out)


def _finish(run, p: Product, has_image: bool) -> bool:
  """Sets p.missing / p.error; True when the row can be predicted."""
  if p.error:
    return False
  p.missing = _missing(run, p, has_image)
  if len(p.missing) == len(run.mods):
    p.error = "no usable input: " + "; ".join(reason for _, _, reason in p.problems)
    return False
  return True


def _head(run, params, feats: dict, n: int) -> np.ndarray:
  """The frozen-mode head on n rows of features -> (K, n, C), the rows padded to
  tokenize.bucket(n): requests of any size reuse a few compiled programs."""
  size = tokenize.bucket(n)
  padded = {m: np.pad(f, ((0, size - n), (0, 0))) for m, f in feats.items()}
  pr, _ = run.predict_features(params, padded)
  return np.asarray(pr)[:, :n]


def predict_products(run, params, batch_stats, products: list[Product]) -> np.ndarray:
  """Products -> float32 (N, C) ensemble probabilities (NaN rows where not predicted).

  Images are decoded batch by batch (memory stays bounded); the rows with a
  full input are batched in input order as the run batched its own splits.
  """
  n, c, bs = len(products), len(run.class_names), run.data_cfg.batch_size
  probs = np.full((n, c), np.nan, np.float32)
  todo = [i for i, p in enumerate(products) if not p.error]
  stream = _decoded(run, products, todo)
  if run.mode == "frozen":
    got = {}                              # i -> image embedding row
    if "image" in run.mods:
      order = []

      def batches():
        group = []
        for i, img in stream:
          if img is not None:
            group.append((i, img, ""))
          if len(group) == bs:
            order.extend(i for i, _, _ in group)
            yield _batch(run, group, (), bs)
            group = []
        if group:   # a partial batch: rounded up (bucket), not to bs
          order.extend(i for i, _, _ in group)
          yield _batch(run, group, (), tokenize.bucket(len(group), bs))

      gen = batches()
      first = next(gen, None)
      if first is not None:   # else no row has a usable image
        got = dict(zip(order, run.image_features_for(itertools.chain([first], gen))))
    ok = [i for i in todo if _finish(run, products[i], i in got)]
    if not ok:
      return probs
    feats = {}
    for m in run.mods:
      feats[m] = np.zeros((len(ok), run.feature_dims[m]), np.float32)
    if "image" in run.mods:
      for j, i in enumerate(ok):
        if i in got:
          feats["image"][j] = got[i]
    if "text" in run.mods:
      with_text = [j for j, i in enumerate(ok) if products[i].text]
      if with_text:
        feats["text"][with_text] = run.text_features_for([products[ok[j]].text
                                                          for j in with_text])
    probs[ok] = run.ensemble(_head(run, params, feats, len(ok)))
    return probs

  groups: dict[tuple, list] = {}

  def flush(missing):
    group = groups.pop(missing)
    size = tokenize.bucket(len(group), bs)
    pr, _ = run.predict_batch(params, batch_stats, _batch(run, group, missing, size),
                              "predict")
    probs[[i for i, _, _ in group]] = run.ensemble(np.asarray(pr)[:, :len(group)])

  for i, img in stream:
    p = products[i]
    if not _finish(run, p, img is not None):
      continue
    groups.setdefault(p.missing, []).append((i, img, p.text))
    if len(groups[p.missing]) == bs:
      flush(p.missing)
  for missing in list(groups):
    flush(missing)
  return probs


def predict(workdir: str, csv_path: str, image_dir: str | None, out: str,
            which: str = "best", on_bad_row: str | None = None,
            explain: bool | str = False) -> Predictions:
  """Writes `out` (and `<out>.data_report.{txt,json}`, with explain `<out>.explain.csv`,
  with explain='heatmaps' also `<out>.heatmaps/<row>-<id>.png`); returns the Predictions."""
  _, run, params, stats = restore.restore(workdir, which)
  if "image" in run.mods and image_dir is None:
    raise catalogue.DataError(f"the model of {workdir} reads images: give their folder "
                              "(--images)")
  policy = on_bad_row or run.bundle.preprocessing["on_bad_row"]
  products = read_csv(run, csv_path, image_dir)
  res = Predictions(run.class_names, products,
                    predict_products(run, params, stats, products), source=csv_path)
  noted = res.noted()
  if noted and policy == "fail":
    raise catalogue.DataError(f"{len(noted)} problem(s) in {csv_path} (on_bad_row=fail):\n"
                              + res.summary())
  os.makedirs(os.path.dirname(os.path.abspath(out)), exist_ok=True)
  res.write_report(out)
  res.write_csv(out)
  if explain:
    maps = None
    if explain == "heatmaps":
      from m6jax.explain import heatmaps  # optional: the Grad-CAM stack and matplotlib
      maps = heatmaps.write_heatmaps(run, params, products, res.probs, out + ".heatmaps")
    multimodal.write_predict_explanations(run.cfg, run, params, products, res.probs,
                                          out + ".explain.csv", maps)
  if noted:
    logging.warning("%s", res.summary())
  r = res.report()
  logging.info("wrote %d predictions to %s (%d rows not predicted, %d with a note; see "
               "%s.data_report.txt)", r["predicted"], out, r["not_predicted"],
               r["rows_with_notes"], out)
  return res


def main(argv):
  del argv
  memory.return_large_frees_to_os()
  console.setup(FLAGS.verbosity if FLAGS["verbosity"].present else None)
  predict(FLAGS.workdir, FLAGS.csv, FLAGS.images, FLAGS.out, FLAGS.checkpoint, FLAGS.on_bad_row,
          "heatmaps" if FLAGS.explain and FLAGS.heatmaps else FLAGS.explain)


if __name__ == "__main__":
  _define_flags()
  app.run(main)
