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

FIELDS = ("rank", "uniq_id", "given_label", "suggested_label", "confidence",
          "given_label_probability", "label_quality", "name")


def find_suspects(labels, oof_probs, filter_by: str = "prune_by_noise_rate") -> np.ndarray:
  """(N,) labels, (N, C) out-of-fold probabilities -> indices of label issues,
  most suspicious first (cleanlab's confident-learning filter, ranked by
  self-confidence: the probability of the given label)."""
  from cleanlab import filter as cl_filter   # optional heavy import: only the audit needs it
  probs = np.asarray(oof_probs, np.float64)
  probs = probs / probs.sum(1, keepdims=True)
  return np.asarray(cl_filter.find_label_issues(
      np.asarray(labels), probs, filter_by=filter_by,
      return_indices_ranked_by="self_confidence"), np.int64)


def suspect_rows(labels, oof_probs, class_names, ids, names) -> list[dict]:
  """One dict per suspect (FIELDS), in rank order."""
  from cleanlab import rank as cl_rank
  labels = np.asarray(labels)
  probs = np.asarray(oof_probs, np.float64)
  probs = probs / probs.sum(1, keepdims=True)
  quality = cl_rank.get_label_quality_scores(labels, probs)
  rows = []
  for r, i in enumerate(find_suspects(labels, probs)):
    sug = int(probs[i].argmax())
    rows.append({"rank": r + 1, "uniq_id": str(ids[i]),
                 "given_label": class_names[labels[i]], "suggested_label": class_names[sug],
                 "confidence": round(float(probs[i, sug]), 4),
                 "given_label_probability": round(float(probs[i, labels[i]]), 4),
                 "label_quality": round(float(quality[i]), 4), "name": str(names[i]),
                 "index": int(i)})
  return rows


def write_csv(path: str, rows: list[dict]) -> None:
  """label_issues.csv, written to a temporary file and renamed (never half-written)."""
  tmp = path + ".tmp"
  with open(tmp, "w", newline="", encoding="utf-8") as f:
    w = csv.DictWriter(f, FIELDS, extrasaction="ignore")
    w.writeheader()
    w.writerows(rows)
  os.replace(tmp, path)


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
  fig.tight_layout()
  tmp = path + ".tmp.png"
  fig.savefig(tmp, dpi=110)
  plt.close(fig)
  os.replace(tmp, path)
