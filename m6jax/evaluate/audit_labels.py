"""Label-issue audit by confident learning (cleanlab) on out-of-fold probabilities.

Products whose given category the model, trained without them, finds unlikely
are ranked as suspects. Nothing is dropped here: a researcher reads
`label_issues.csv` / `label_issues.png` and may list ids in `data.exclude_ids`.
"""

from __future__ import annotations

import csv
import os
import textwrap

import numpy as np
from m6jax import files

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
                  columns: int = 4) -> None:
  """A grid of the top suspects: photo, name, given -> suggested label, confidence,
  and the start of the description. images[i] / texts[i] belong to rows[i]."""
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
  for ax, row, img, text in zip(axes.flat, rows, images, texts):
    if img is not None:
      ax.imshow(img)
    title = "\n".join(textwrap.wrap(f"#{row['rank']} {row['name']}", 34)[:2])
    ax.set_title(f"{title}\ngiven: {row['given_label']}\nsuggested: {row['suggested_label']} "
                 f"({row['confidence']:.2f})", fontsize=10, loc="left")
    body = "\n".join(textwrap.wrap(" ".join(str(text).split()[:40]), 44)[:5])
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


def audit(workdir: str, num_folds: int = 5, top: int = 16, out_dir: str | None = None) -> dict:
  """Out-of-fold probabilities for every product of the run's catalogue -> suspects.

  Retrains the run's head (frozen mode, its config and cached embeddings) as
  num_folds x seeds replicas over ALL splits pooled, selecting each replica's
  epoch by the log-loss on its own fold, so every product is predicted by models
  that never saw it. Writes label_issues.csv, label_issues.png and
  label_issues.json into out_dir (default: the run's workdir).
  Returns {'suspects': n, 'products': N, 'csv': path, 'gallery': path}.
  """
  from m6jax.features import prepare   # the run's own stack
  from m6jax.train import folds, trainer as trainer_lib
  from m6jax.inference import restore

  cfg = restore.load_config(workdir)
  if cfg.train.mode != "frozen":
    raise ValueError("the label audit retrains the head on cached embeddings: it needs a "
                     f"frozen-mode run, {workdir} is {cfg.train.mode!r}")
  out_dir = out_dir or workdir
  os.makedirs(out_dir, exist_ok=True)
  cfg.unlock()
  cfg.train.folds, cfg.train.select_by, cfg.train.checkpoint = 0, "log_loss", False
  run = prepare.setup(cfg, workdir)
  splits = prepare.SPLITS
  labels = {s: c["label"] for s, c in run.cols.items()}
  pooled = np.concatenate([labels[s] for s in splits])
  plan = folds.fold_plan(folds.stratified_folds(pooled, num_folds, cfg.data.split_seed),
                         cfg.seeds)
  trainer = trainer_lib.FrozenTrainer(cfg, len(run.class_names),
                                {s: {m: f[s] for m, f in run.feats.items()} for s in splits},
                                labels, plan=plan, pool_splits=splits)
  states, _ = trainer.fit(None)
  oof = folds.out_of_fold(trainer.predict(states.best_params, None, "pool"), plan)
  ids = [u for s in splits for u in run.cols[s]["uniq_id"]]
  texts = [t for s in splits for t in run.cols[s]["text"]]
  names = product_names(cfg.data, ids)
  rows = suspect_rows(pooled, oof, run.class_names, ids, names)
  csv_path = os.path.join(out_dir, "label_issues.csv")
  write_csv(csv_path, rows)
  offsets = np.cumsum([0] + [len(labels[s]) for s in splits])
  sources = {s: run.builder.as_data_source(s) for s in splits}

  def image_of(i):
    k = int(np.searchsorted(offsets, i, side="right") - 1)
    return np.asarray(sources[splits[k]][int(i - offsets[k])]["image"])

  shown = rows[:top]
  gallery = os.path.join(out_dir, "label_issues.png")
  plot_suspects(shown, [image_of(r["index"]) for r in shown],
                [texts[r["index"]] for r in shown], gallery)
  summary = {"products": int(len(pooled)), "suspects": len(rows),
             "flagged": sum(r["flagged"] for r in rows), "folds": num_folds,
             "seeds": cfg.seeds, "csv": csv_path, "gallery": gallery,
             "oof_accuracy": float((oof.argmax(1) == pooled).mean()),
             "by_given_label": {c: sum(r["given_label"] == c for r in rows)
                                for c in run.class_names}}
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
  p.add_argument("--verbosity", type=int, default=None,
                 help="show every library's log at this absl level (-1, 0, 1)")
  a = p.parse_args(argv)
  console.setup(a.verbosity)
  s = audit(a.workdir, a.folds, a.top, a.out)
  print(f"{s['suspects']} suspected label issues ({s['flagged']} flagged by confident "
        f"learning) among {s['products']} products "
        f"(out-of-fold accuracy {s['oof_accuracy']:.3f}): {s['csv']}, {s['gallery']}")


if __name__ == "__main__":
  main()
