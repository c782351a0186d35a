"""Training curves of a K-seed run: train loss and validation macro-F1 per epoch.

  plot_training_curves(results["history"], "runs/x/training_curves.png", seeds=[0, 1, 2])

Each seed is a thin line, the mean over seeds a thick one with a mean +- std
band, and each seed's best epoch (the one training selected: the first epoch
with the highest validation macro-F1) is marked on its validation curve.
"""

from __future__ import annotations

from typing import Sequence

import numpy as np

PANELS = (("loss", "train loss"), ("val_macro_f1", "validation macro-F1"))


def series(history: Sequence[dict], key: str) -> tuple[np.ndarray, np.ndarray]:
  """history records -> (epochs (E,), values (E, K)) of one per-seed key."""
  rows = [h for h in history if h.get(key) is not None]
  epochs = np.asarray([int(h["epoch"]) for h in rows])
  values = np.asarray([[float(v) for v in h[key]] for h in rows], np.float64)
  return epochs, values.reshape(len(rows), -1)


def best_epochs(history: Sequence[dict]) -> list[int]:
  """Per seed, the epoch training selected: the first with the highest val macro-F1."""
  epochs, f1 = series(history, "val_macro_f1")
  if not len(epochs):
    return []
  return [int(epochs[i]) for i in np.argmax(f1, axis=0)]   # argmax keeps the first maximum


def best_validation(history: Sequence[dict], select_by: str = "macro_f1") -> dict:
  """Each replica's selected epoch (the first best by `select_by`, as keep_best picks it)
  and its validation scores: {'select_by', 'best_epoch': [R], '<metric>': [R], ...}."""
  if not history:
    return {}
  key = "val_log_loss" if select_by == "log_loss" else "val_macro_f1"
  sign = -1.0 if select_by == "log_loss" else 1.0
  score = sign * np.asarray([h[key] for h in history], np.float64)       # (E, R)
  best = score.argmax(0)
  out = {"select_by": select_by,
         "best_epoch": [int(history[e]["epoch"]) for e in best]}
  for name in ("macro_f1", "accuracy", "log_loss"):
    if f"val_{name}" in history[0]:
      vals = np.asarray([h[f"val_{name}"] for h in history], np.float64)
      out[name] = vals[best, np.arange(vals.shape[1])].tolist()
      out[f"{name}_mean"] = float(np.mean(out[name]))
  return out


def plot_training_curves(history: Sequence[dict], path, seeds: Sequence[int] | None = None,
                         title: str | None = None, best: Sequence[int] | None = None,
                         select_by: str = "macro_f1"):
  """Writes the two-panel PNG at `path` and returns the path.

  history: per-epoch records {'epoch', 'loss': [K], 'val_macro_f1': [K], ...}.
  seeds: the K seed values for the legend (default 0..K-1). best: each replica's
  selected epoch (default `best_epochs(history)`, selection by macro-F1).
  """
  # Figure + Agg canvas instead of pyplot: no global backend switch, thread safe.
  from matplotlib.backends.backend_agg import FigureCanvasAgg
  from matplotlib.figure import Figure

  if not history:
    raise ValueError("no epochs to plot: the history is empty")
  fig = Figure(figsize=(11, 4.2), dpi=110)
  FigureCanvasAgg(fig)
  best = list(best) if best else best_epochs(history)
  for i, (key, label) in enumerate(PANELS):
    ax = fig.add_subplot(1, 2, i + 1)
    epochs, vals = series(history, key)
    k = vals.shape[1]
    names = list(seeds) if seeds is not None and len(seeds) == k else list(range(k))
    colors = [f"C{j % 10}" for j in range(k)]
    for j in range(k):
      ax.plot(epochs, vals[:, j], color=colors[j], lw=0.9, alpha=0.55, label=f"seed {names[j]}")
    mean = vals.mean(1)
    std = vals.std(1, ddof=1) if k > 1 else np.zeros(len(epochs))
    ax.plot(epochs, mean, color="black", lw=2.0, label=f"mean of {k}")
    ax.fill_between(epochs, mean - std, mean + std, color="black", alpha=0.12,
                    label="mean ± std" if k > 1 else None)
    if key == "val_macro_f1" and best:
      row = {int(e): r for r, e in enumerate(epochs)}
      for j, e in enumerate(best):
        ax.plot([e], [vals[row[e], j]], marker="*", ms=12, color=colors[j], mec="black",
                mew=0.6, ls="none",
                label=f"selected epoch (by val {select_by})" if j == 0 else None)
    ax.set_xlabel("epoch")
    ax.set_ylabel(label)
    ax.set_title(label)
    ax.grid(alpha=0.3)
    if len(epochs) < 12:
      ax.set_xticks(epochs)
  fig.axes[1].legend(loc="lower right", fontsize=8, ncol=2 if k > 4 else 1)
  if title:
    fig.suptitle(title)
  fig.tight_layout()
  fig.savefig(path, format="png")
  return path
