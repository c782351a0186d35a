"""experiments/ablation.md + ablation.png from a finished ablation sweep (runs/ablation/*).

  python experiments/ablation_report.py --root runs/ablation --out experiments/ablation \
      [--reference fusion_early]

Cells are ranked by their selection signal, never by test: validation log-loss
(mean over seeds at each seed's selected epoch, 126 validation products) for
the cells without folds, and the out-of-fold log-loss over train+validation
(714 products) for the 5-fold cells. Test columns are only reported, each cell
paired with the reference cell (default fusion_early, the default config) on the
same test products: accuracy difference with a paired-bootstrap 95 % interval,
McNemar's exact p and a "within noise" verdict (m6jax.track.paired); the 5-fold
cells also against the reference's 5-fold cell with the Nadeau-Bengio corrected
resampled t-test on the per-fold out-of-fold accuracies.
"""

from __future__ import annotations

import argparse
import glob
import json
import os

import numpy as np

from m6jax.track import paired


def load(root: str, reference: str | None = paired.DEFAULT_NAME) -> list[dict]:
  """One row per cell with results.json; 'paired' holds its comparison with `reference`
  (None for the reference itself, or when there is no reference cell)."""
  rows, results = [], {}
  for path in sorted(glob.glob(os.path.join(root, "*", "results.json"))):
    with open(path) as f:
      r = json.load(f)
    results[os.path.basename(os.path.dirname(path))] = r
    t, v = r["test"], r.get("validation", {})
    imp = r.get("modality_importance") or {}
    rows.append({
        "cell": os.path.basename(os.path.dirname(path)),
        "fusion": r.get("fusion"),
        "seeds": len(r.get("seeds", [])),
        "replicas": r.get("replicas", len(r.get("seeds", []))),
        "select_by": v.get("select_by", "macro_f1"),
        "val_log_loss": v.get("log_loss_mean"),
        "val_accuracy": v.get("accuracy_mean"),
        "cv": r.get("cross_validation"),
        "test_acc": t["summary"]["accuracy"]["mean"],
        "test_acc_std": t["summary"]["accuracy"]["std"],
        "test_f1": t["summary"]["macro_f1"]["mean"],
        "ensemble_acc": t["ensemble"]["accuracy"],
        "without_image": imp.get("without_image"),
        "without_text": imp.get("without_text"),
        "weights": r.get("modality_weights_mean"),
    })
  names = [r["cell"] for r in rows]
  comps = (paired.compare_cells(root, names, reference, results=results)
           if reference in names else {})
  for r in rows:
    r["paired"] = comps.get(r["cell"])
  return rows


def _vs_ref(c) -> str:
  """' Δ [low, high] | p | verdict' cells of a row's paired comparison."""
  if not c or "error" in c:
    return "— | — | " + ("reference" if c is None else "not paired")
  return (f"{c['diff']:+.4f} [{c['low']:+.4f}, {c['high']:+.4f}] | {c['p_mcnemar']:.3g} | "
          f"{paired.noise_words(c)}")


def _f(x, nd=4):
  return "—" if x is None else f"{x:.{nd}f}"


def markdown(rows: list[dict]) -> str:
  split = [r for r in rows if not r["cv"]]
  cv = [r for r in rows if r["cv"]]
  split.sort(key=lambda r: r["val_log_loss"])
  cv.sort(key=lambda r: r["cv"]["log_loss"])
  out = ["| rank | cell | selected by | val log-loss | val accuracy | test accuracy (mean ± std) "
         "| test macro-F1 | ensemble accuracy | ensemble without image / without text "
         "| energy share image | Δ ensemble test accuracy vs reference [paired 95 %] "
         "| McNemar p | |",
         "|---:|---|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---|"]
  for i, r in enumerate(split, 1):
    wo = (f"{_f(r['without_image'])} / {_f(r['without_text'])}"
          if r["without_image"] is not None else "—")
    share = (r["weights"] or {}).get("image") if r["fusion"] == "early" else None
    out.append(f"| {i} | {r['cell']} | {r['select_by']} | {_f(r['val_log_loss'])} | "
               f"{_f(r['val_accuracy'])} | {r['test_acc']:.4f} ± {r['test_acc_std']:.4f} | "
               f"{r['test_f1']:.4f} | {r['ensemble_acc']:.4f} | {wo} | {_f(share, 2)} | "
               f"{_vs_ref(r['paired'])} |")
  out += ["", "Cross-validated cells (5 folds x 5 seeds = 25 replicas in one program; each "
          "seed's model is its 5-fold ensemble):", "",
          "| rank | cell | out-of-fold log-loss | out-of-fold accuracy | out-of-fold macro-F1 "
          "| test accuracy (mean ± std) | ensemble accuracy | ensemble without image / without "
          "text | Δ out-of-fold accuracy vs reference's folds (corrected t) | p |",
          "|---:|---|---:|---:|---:|---:|---:|---:|---:|---:|"]
  for i, r in enumerate(cv, 1):
    wo = (f"{_f(r['without_image'])} / {_f(r['without_text'])}"
          if r["without_image"] is not None else "—")
    out.append(f"| {i} | {r['cell']} | {r['cv']['log_loss']:.4f} | {r['cv']['accuracy']:.4f} | "
               f"{r['cv']['macro_f1']:.4f} | {r['test_acc']:.4f} ± {r['test_acc_std']:.4f} | "
               f"{r['ensemble_acc']:.4f} | {wo} | {_nb(r['paired'])} |")
  return "\n".join(out)


def _nb(c) -> str:
  cv = (c or {}).get("cv")
  if not cv:
    return "— | —"
  return f"{cv['mean']:+.4f} [{cv['low']:+.4f}, {cv['high']:+.4f}] | {cv['p']:.3g}"


def plot(rows: list[dict], path: str) -> None:
  import matplotlib
  matplotlib.use("Agg")
  import matplotlib.pyplot as plt

  rows = sorted(rows, key=lambda r: (r["cv"] is not None, r["val_log_loss"]
                                     if not r["cv"] else r["cv"]["log_loss"]))
  fig, ax = plt.subplots(figsize=(10, 0.42 * len(rows) + 1.2))
  y = np.arange(len(rows))[::-1]
  ax.barh(y, [r["test_acc"] for r in rows], xerr=[r["test_acc_std"] for r in rows],
          color=["C2" if r["fusion"] in ("early", "late", "gated") else "C0" for r in rows],
          alpha=0.7, label="test accuracy, mean ± std over seeds")
  ax.plot([r["ensemble_acc"] for r in rows], y, "k|", ms=14, mew=2, label="ensemble")
  ax.set_yticks(y, [r["cell"] for r in rows], fontsize=10)
  ax.set_xlim(0.75, 1.0)
  ax.set_xlabel("test accuracy (126 products); cells ordered by their validation signal")
  ax.legend(loc="lower right", fontsize=9)
  ax.grid(axis="x", alpha=0.3)
  fig.tight_layout()
  fig.savefig(path, dpi=110)
  plt.close(fig)


def main():
  p = argparse.ArgumentParser()
  p.add_argument("--root", default="runs/ablation")
  p.add_argument("--out", default="experiments/ablation")
  p.add_argument("--reference", default=paired.DEFAULT_NAME,
                 help="the cell every other is paired with on the same test products")
  a = p.parse_args()
  rows = load(a.root, a.reference)
  table = markdown(rows)
  with open(a.out + ".json", "w") as f:
    json.dump(rows, f, indent=2)
  plot(rows, a.out + ".png")
  print(table)
  return table


if __name__ == "__main__":
  main()
