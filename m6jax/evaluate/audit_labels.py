"""Label-issue audit by confident learning (cleanlab) on out-of-fold probabilities.

Products whose given category the model, trained without them, finds unlikely
are ranked as suspects. Nothing is dropped here: a researcher reads
`label_issues.csv` / `label_issues.png` and may list ids in `data.exclude_ids`.

The audit pools train + validation only: the test split never shapes what is
dropped or relabelled (data.exclude_ids refuses test products unless
data.allow_test_exclusion). With `--include-test` the test products are audited
apart (label_issues_test.*), predicted by the fold models trained on train +
validation, which never saw them.
"""

from __future__ import annotations

import csv
import os
import textwrap

import numpy as np
from m6jax import files
from m6jax.data import pipeline, twins

FIELDS = ("rank", "uniq_id", "given_label", "suggested_label", "confidence",
          "given_label_probability", "label_quality", "flagged", "name")


def _normalised(probs) -> np.ndarray:
  probs = np.asarray(probs, np.float64)
  return probs / probs.sum(1, keepdims=True)


def flagged_issues(labels, oof_probs, filter_by: str = "prune_by_noise_rate") -> np.ndarray:
  """(N,) labels, (N, C) out-of-fold probabilities -> indices that cleanlab's
  confident-learning filter flags as label issues (unordered set semantics)."""
  from cleanlab import filter as cl_filter   # optional heavy import: only the audit needs it
  # n_jobs=1: cleanlab's worker pool would fork this multithreaded (JAX) process.
  mask = cl_filter.find_label_issues(np.asarray(labels), _normalised(oof_probs),
                                     filter_by=filter_by, n_jobs=1)
  return np.flatnonzero(mask)


def suspect_rows(labels, oof_probs, class_names, ids, names) -> list[dict]:
  """Products ranked by label quality (cleanlab's self-confidence: the out-of-fold
  probability of the given label), most suspicious first: every product that the
  confident-learning filter flags, and every product whose most likely class is not its
  given one. One dict per product (FIELDS + 'index')."""
  from cleanlab import rank as cl_rank
  labels = np.asarray(labels)
  probs = _normalised(oof_probs)
  quality = cl_rank.get_label_quality_scores(labels, probs, method="self_confidence")
  flagged = set(flagged_issues(labels, probs).tolist())
  keep = flagged | set(np.flatnonzero(probs.argmax(1) != labels).tolist())
  order = [int(i) for i in np.argsort(quality, kind="stable") if int(i) in keep]
  rows = []
  for r, i in enumerate(order):
    sug = int(probs[i].argmax())
    rows.append({"rank": r + 1, "uniq_id": str(ids[i]),
                 "given_label": class_names[labels[i]], "suggested_label": class_names[sug],
                 "confidence": round(float(probs[i, sug]), 4),
                 "given_label_probability": round(float(probs[i, labels[i]]), 4),
                 "label_quality": round(float(quality[i]), 4), "flagged": i in flagged,
                 "name": str(names[i]), "index": i})
  return rows


def write_csv(path: str, rows: list[dict]) -> None:
  """label_issues.csv (m6jax.files: never half-written)."""

  def write(f):
    w = csv.DictWriter(f, FIELDS, extrasaction="ignore")
    w.writeheader()
    w.writerows(rows)

  files.atomic_write(path, write)


def plot_suspects(rows: list[dict], images: list, texts: list[str], path: str,
                  columns: int = 4, captions: list[str] | None = None) -> None:
  """A grid of the top suspects: photo, name, given -> suggested label, confidence,
  the words and modality split behind the suggestion (captions[i], when given) and
  the start of the description. images[i] / texts[i] belong to rows[i]."""
  import matplotlib
  matplotlib.use("Agg")
  import matplotlib.pyplot as plt

  n = len(rows)
  if n == 0:
    return
  cols = min(columns, n)
  nrows = -(-n // cols)
  fig, axes = plt.subplots(nrows, cols, figsize=(4.2 * cols, 5.6 * nrows), squeeze=False)
  for ax in axes.flat:
    ax.axis("off")
  captions = captions or [""] * n
  for ax, row, img, text, cap in zip(axes.flat, rows, images, texts, captions):
    if img is not None:
      ax.imshow(img)
    title = "\n".join(textwrap.wrap(f"#{row['rank']} {row['name']}", 34)[:2])
    ax.set_title(f"{title}\ngiven: {row['given_label']}\nsuggested: {row['suggested_label']} "
                 f"({row['confidence']:.2f})", fontsize=10, loc="left")
    body = "\n".join(([cap] if cap else []) +
                     textwrap.wrap(" ".join(str(text).split()[:40]), 44)[:5 - 2 * bool(cap)])
    ax.text(0.0, -0.03, body, transform=ax.transAxes, fontsize=8, va="top", ha="left")
  fig.suptitle("Label-issue suspects (out-of-fold confident learning)", fontsize=13)
  fig.tight_layout(rect=(0, 0, 1, 0.97))   # leave the top strip to the title
  files.atomic_write(path, lambda f: fig.savefig(f, format="png", dpi=110), binary=True)
  plt.close(fig)


def product_names(data_cfg, ids) -> list[str]:
  """The catalogue's product-name column for `ids` ('' where a row cannot be read)."""
  path = os.path.join(data_cfg.manual_dir, data_cfg.csv)
  cols = data_cfg.columns
  names = {}
  with open(path, encoding=data_cfg.get("encoding", "utf-8"), errors="replace",
            newline="") as f:
    for rec in csv.DictReader(f):
      names[str(rec.get(cols.id, "")).strip()] = str(rec.get(cols.name, "")).strip()
  return [names.get(u, "") for u in ids]


def audit_probs(cfg, feats: dict, labels: dict, num_classes: int, num_folds: int = 5,
                include_test: bool = False, groups=None) -> dict:
  """Cross-validated probabilities for the audit (frozen mode, cached embeddings).

  feats: {split: {modality: (N, D)}}, labels: {split: (N,)} for train, validation,
  test. Trains num_folds x cfg.seeds replicas over train + validation pooled, each
  replica's epoch selected by the log-loss on its own fold. Returns {'pool': (labels
  (P,), out-of-fold probs (P, C))} and, with include_test, 'test': (labels, the mean
  of every replica's probabilities (T, C)); test labels are never used for training.
  groups: (P,) twin groups of the pooled rows (m6jax.data.twins), kept in one fold."""
  from m6jax.train import folds, trainer as trainer_lib

  pool = folds.POOL_SPLITS
  pooled = np.concatenate([labels[s] for s in pool])
  plan = folds.fold_plan(folds.stratified_folds(pooled, num_folds, cfg.data.split_seed,
                                                groups), cfg.seeds)
  trainer = trainer_lib.FrozenTrainer(cfg, num_classes, feats,
                                      {s: labels[s] for s in pool}, plan=plan,
                                      pool_splits=pool)
  states, _ = trainer.fit(None, progress=False)
  out = {"pool": (pooled, folds.out_of_fold(trainer.predict(states.best_params, None, "pool"),
                                            plan))}
  if include_test:
    probs = np.asarray(trainer.predict(states.best_params, None, "test"), np.float64)
    out["test"] = (np.asarray(labels["test"]), probs.mean(0))
  return out


def suspect_explanations(workdir: str, rows: list[dict], images: list, texts: list[str]
                         ) -> list[str]:
  """Gallery captions of the shown suspects: the words and the modality split behind
  the *suggested* label, from the run's own (restored, best) model -- what in the
  product speaks for the other category. '' where the run cannot be explained
  (m6jax.explain.multimodal: frozen runs; words need a text tower)."""
  from m6jax.explain import multimodal   # the explain stack loads only for the gallery
  from m6jax.inference import restore
  if not rows:
    return []
  cfg, run, params, _ = restore.restore(workdir, "best")
  size = cfg.data.image_size
  shown = [None if im is None else pipeline.square_image(np.asarray(im), size) for im in images]
  stack = (np.stack(shown) if shown and all(im is not None for im in shown) else None)
  targets = np.asarray([run.class_names.index(r["suggested_label"]) for r in rows])
  res = multimodal.explain_products(cfg, run, params, [str(t) for t in texts], targets,
                                    images=stack)
  return [multimodal.caption(res["items"][j], multimodal.shares(res, j))
          for j in range(len(rows))]


def _report(run, splits, labels, probs, out_dir: str, stem: str, top: int,
            workdir: str | None = None) -> dict:
  """Suspects of `splits` (their rows in order) -> <stem>.csv, <stem>.png; a summary.
  workdir: the run, to caption the gallery with suspect_explanations (None: no words)."""
  ids = [u for s in splits for u in run.cols[s]["uniq_id"]]
  texts = [t for s in splits for t in run.cols[s]["text"]]
  rows = suspect_rows(labels, probs, run.class_names, ids, product_names(run.cfg.data, ids))
  csv_path = os.path.join(out_dir, f"{stem}.csv")
  write_csv(csv_path, rows)
  offsets = np.cumsum([0] + [len(run.cols[s]["label"]) for s in splits])
  sources = {s: run.builder.as_data_source(s) for s in splits}

  def image_of(i):
    k = int(np.searchsorted(offsets, i, side="right") - 1)
    return np.asarray(sources[splits[k]][int(i - offsets[k])]["image"])

  shown = rows[:top]
  images = [image_of(r["index"]) for r in shown]
  shown_texts = [texts[r["index"]] for r in shown]
  captions = (suspect_explanations(workdir, shown, images, shown_texts)
              if workdir is not None else None)
  gallery = os.path.join(out_dir, f"{stem}.png")
  plot_suspects(shown, images, shown_texts, gallery, captions=captions)
  return {"splits": list(splits), "products": int(len(labels)), "suspects": len(rows),
          "flagged": sum(r["flagged"] for r in rows), "csv": csv_path, "gallery": gallery,
          "gallery_captions": captions or [],
          "accuracy": float((np.asarray(probs).argmax(1) == labels).mean()),
          "by_given_label": {c: sum(r["given_label"] == c for r in rows)
                             for c in run.class_names}}


def audit(workdir: str, num_folds: int = 5, top: int = 16, out_dir: str | None = None,
          include_test: bool = False, words: bool = True) -> dict:
  """Out-of-fold probabilities for the train + validation products of a run -> suspects.

  Retrains the run's head (frozen mode, its config and cached embeddings) as
  num_folds x seeds replicas over train + validation pooled (audit_probs), so
  every product is predicted by models that never saw it. Writes label_issues.csv,
  label_issues.png and label_issues.json into out_dir (default: the run's
  workdir); with include_test also label_issues_test.{csv,png}, the test products
  audited apart ('test' in the summary); words: caption the galleries with
  suspect_explanations ('gallery_captions'). Returns the summary: {'suspects',
  'products', 'flagged', 'oof_accuracy', 'csv', 'gallery', 'splits', ...}.
  """
  from m6jax.features import prepare   # the run's own stack
  from m6jax.inference import restore
  from m6jax.train import folds

  cfg = restore.load_config(workdir)
  if cfg.train.mode != "frozen":
    raise ValueError("the label audit retrains the head on cached embeddings: it needs a "
                     f"frozen-mode run, {workdir} is {cfg.train.mode!r}")
  out_dir = out_dir or workdir
  os.makedirs(out_dir, exist_ok=True)
  cfg.unlock()
  cfg.train.folds, cfg.train.select_by, cfg.train.checkpoint = 0, "log_loss", False
  run = prepare.setup(cfg, workdir)
  labels = {s: c["label"] for s, c in run.cols.items()}
  feats = {s: {m: f[s] for m, f in run.feats.items()} for s in prepare.SPLITS}
  # Twins share a fold, as they share a split: one twin must not vouch for the other.
  groups = twins.group_index([u for s in folds.POOL_SPLITS for u in run.cols[s]["uniq_id"]],
                             run.report.twin_groups)
  probs = audit_probs(cfg, feats, labels, len(run.class_names), num_folds, include_test,
                      groups)
  explained = workdir if words else None
  summary = _report(run, folds.POOL_SPLITS, *probs["pool"], out_dir, "label_issues", top,
                    explained)
  summary["oof_accuracy"] = summary.pop("accuracy")
  summary |= {"folds": num_folds, "seeds": cfg.seeds}
  if include_test:
    summary["test"] = _report(run, ("test",), *probs["test"], out_dir, "label_issues_test",
                              top, explained)
  files.write_json(os.path.join(out_dir, "label_issues.json"), summary)
  return summary


def main(argv=None):
  import argparse

  from m6jax import console
  p = argparse.ArgumentParser(prog="python -m m6jax.evaluate.audit_labels", description=(
      "Rank suspected label errors of a frozen-mode run's catalogue by confident learning "
      "on out-of-fold probabilities."))
  p.add_argument("--workdir", required=True, help="a finished frozen-mode run")
  p.add_argument("--folds", type=int, default=5)
  p.add_argument("--top", type=int, default=16, help="suspects shown in label_issues.png")
  p.add_argument("--out", default=None, help="output folder (default: the workdir)")
  p.add_argument("--include-test", action="store_true",
                 help="also audit the test products, apart (label_issues_test.*), with the "
                      "models trained on train + validation")
  p.add_argument("--no-words", action="store_true",
                 help="leave the words and modality split out of the gallery (they cost "
                      "integrated gradients through the text tower per shown suspect)")
  p.add_argument("--verbosity", type=int, default=None,
                 help="show every library's log at this absl level (-1, 0, 1)")
  a = p.parse_args(argv)
  console.setup(a.verbosity)
  s = audit(a.workdir, a.folds, a.top, a.out, a.include_test, words=not a.no_words)
  print(f"{s['suspects']} suspected label issues ({s['flagged']} flagged by confident "
        f"learning) among {s['products']} train + validation products "
        f"(out-of-fold accuracy {s['oof_accuracy']:.3f}): {s['csv']}, {s['gallery']}")
  if "test" in s:
    t = s["test"]
    print(f"test, apart: {t['suspects']} suspects ({t['flagged']} flagged) among "
          f"{t['products']} test products (accuracy {t['accuracy']:.3f}): {t['csv']}")


if __name__ == "__main__":
  main()
