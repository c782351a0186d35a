"""Classification metrics for all seed replicas at once.

Everything up to `classification_metrics` is pure jnp: jittable, and
vmappable over a leading replica axis K, e.g.

  jax.vmap(classification_metrics, in_axes=(None, 0, None))(labels, preds, C)

with labels (N,) shared and preds (K, N) (or use `replica_metrics`). The
numbers follow sklearn.metrics.precision_recall_fscore_support with
labels=range(num_classes). Reporting, seed statistics and plotting are host
side (numpy / scipy / matplotlib) and return plain python values.
"""

from __future__ import annotations

import functools
import math
from typing import Mapping, Sequence

import jax
import jax.numpy as jnp
import numpy as np

_AVERAGES = ("macro", "micro", "weighted")
_SCORES = ("precision", "recall", "f1")


def _check_zero_division(zero_division):
  # Traced values are trusted: the same code path serves 0, 1 and nan, which
  # also keeps nan out of jit's static-argument cache (nan != nan would
  # recompile every call).
  try:
    zd = float(zero_division)
  except (TypeError, jax.errors.ConcretizationTypeError):
    return
  if not (zd in (0.0, 1.0) or math.isnan(zd)):
    raise ValueError(f"zero_division must be 0.0, 1.0 or nan, got {zd!r}")


@functools.partial(jax.jit, static_argnames=("num_classes",))
def confusion_matrix(labels, preds, num_classes: int, mask=None):
  """(N,) int labels, (N,) int preds -> (C, C) int32 counts.

  Rows are the true class, columns the predicted class (sklearn order).
  Rows with mask == 0, or a label / prediction outside [0, C), are not
  counted, so -1 works as a padding label.
  """
  labels = jnp.asarray(labels).astype(jnp.int32)
  preds = jnp.asarray(preds).astype(jnp.int32)
  valid = ((labels >= 0) & (labels < num_classes)
           & (preds >= 0) & (preds < num_classes))
  if mask is not None:
    valid &= jnp.asarray(mask).astype(bool)
  # Scatter-add on a flat index keeps memory at O(N + C^2) rather than the
  # O(N C) of a one-hot matmul; invalid rows get an out-of-range index and
  # are dropped. Integer adds are exact and order independent.
  flat = jnp.where(valid, labels * num_classes + preds, num_classes**2)
  cm = jnp.zeros((num_classes**2,), jnp.int32).at[flat].add(1, mode="drop")
  return cm.reshape(num_classes, num_classes)


def _divide(num, den, zero_division):
  """num / den elementwise, zero_division where den == 0 (as sklearn)."""
  zero = den == 0
  return jnp.where(zero, zero_division, num / jnp.where(zero, 1, den))


def _weighted_nanmean(values, weights):
  """sklearn's _nanaverage: drop nan entries; if the remaining weights sum
  to zero fall back to the unweighted mean; nan if everything is nan."""
  ok = ~jnp.isnan(values)
  w = jnp.where(ok, weights, 0).astype(values.dtype)
  wsum = jnp.sum(w)
  weighted = (jnp.sum(jnp.where(ok, values, 0) * w)
              / jnp.where(wsum > 0, wsum, 1))
  return jnp.where(wsum > 0, weighted, jnp.nanmean(values))


def metrics_from_confusion(cm, zero_division=0.0):
  """(C, C) confusion matrix -> metrics dict (see `classification_metrics`)."""
  _check_zero_division(zero_division)
  cm = jnp.asarray(cm)
  fdt = jnp.result_type(float)
  zd = jnp.asarray(zero_division, fdt)
  tp = jnp.diagonal(cm).astype(fdt)
  true_sum = jnp.sum(cm, axis=1)
  pred_sum = jnp.sum(cm, axis=0)
  t, p = true_sum.astype(fdt), pred_sum.astype(fdt)

  out = {
      "precision": _divide(tp, p, zd),
      "recall": _divide(tp, t, zd),
      # sklearn's F1 is 2tp / (2tp + fp + fn), not 2PR / (P + R): a class
      # never predicted but present scores 0 whatever zero_division says.
      "f1": _divide(2 * tp, t + p, zd),
      "support": true_sum.astype(jnp.int32),
  }
  for name in _SCORES:
    out[f"macro_{name}"] = jnp.nanmean(out[name])
    out[f"weighted_{name}"] = _weighted_nanmean(out[name], t)
  tp_all, t_all, p_all = jnp.sum(tp), jnp.sum(t), jnp.sum(p)
  out["micro_precision"] = _divide(tp_all, p_all, zd)
  out["micro_recall"] = _divide(tp_all, t_all, zd)
  out["micro_f1"] = _divide(2 * tp_all, t_all + p_all, zd)
  # Every counted row has its label and prediction in range, so accuracy is
  # micro precision (sklearn's report prints exactly that as "accuracy").
  out["accuracy"] = out["micro_precision"]
  out["confusion_matrix"] = cm.astype(jnp.int32)
  return out


@functools.partial(jax.jit, static_argnames=("num_classes",))
def _classification_metrics(labels, preds, num_classes, zero_division, mask):
  cm = confusion_matrix(labels, preds, num_classes, mask)
  return metrics_from_confusion(cm, zero_division)


def classification_metrics(labels, preds, num_classes: int,
                           zero_division=0.0, mask=None):
  """(N,) labels, (N,) preds -> dict of metrics.

  Keys: 'accuracy', 'precision'/'recall'/'f1'/'support' (C,),
  '{macro,micro,weighted}_{precision,recall,f1}' scalars and
  'confusion_matrix' (C, C). zero_division (0.0, 1.0 or nan) is what a 0/0
  ratio becomes; nan entries are skipped by the macro/weighted averages, as
  in sklearn. mask (N,) drops padding rows (see `confusion_matrix`).
  """
  _check_zero_division(zero_division)
  return _classification_metrics(labels, preds, num_classes, zero_division,
                                 mask)


def replica_metrics(labels, preds, num_classes: int, zero_division=0.0,
                    mask=None):
  """`classification_metrics` over replicas: preds (K, N); labels and mask
  either (N,) shared or (K, N). Every output gains a leading K axis."""
  _check_zero_division(zero_division)
  preds = jnp.asarray(preds)
  labels = jnp.asarray(labels)
  lab_axis = 0 if labels.ndim == 2 else None
  mask_axis = None if mask is None or jnp.ndim(mask) == 1 else 0
  fn = lambda l, p, m: classification_metrics(l, p, num_classes,
                                              zero_division, m)
  return jax.vmap(fn, in_axes=(lab_axis, 0, mask_axis))(labels, preds, mask)


def ensemble_probs(probs):
  """(K, N, C) replica probabilities -> (N, C) mean over replicas."""
  return jnp.mean(jnp.asarray(probs), axis=0)


def ensemble_metrics(labels, probs, num_classes: int, zero_division=0.0,
                     mask=None):
  """Metrics of the argmax of `ensemble_probs(probs)`; probs (K, N, C)."""
  preds = jnp.argmax(ensemble_probs(probs), axis=-1)
  return classification_metrics(labels, preds, num_classes, zero_division,
                                mask)


# ----------------------------------------------------------------- reports


def _per_class_rows(metrics, class_names):
  p, r, f, s = (np.asarray(metrics[k])
                for k in ("precision", "recall", "f1", "support"))
  if p.ndim != 1:
    raise ValueError("expected one replica's metrics (per-class arrays of "
                     f"shape (C,)), got shape {p.shape}; index a replica or "
                     "use seed_summary")
  if len(class_names) != p.shape[0]:
    raise ValueError(f"{len(class_names)} class names for {p.shape[0]} "
                     "classes")
  return [(str(n), float(p[i]), float(r[i]), float(f[i]), int(s[i]))
          for i, n in enumerate(class_names)]


def _avg(metrics, kind):
  return [float(np.asarray(metrics[f"{kind}_{s}"])) for s in _SCORES]


def report_dict(metrics: Mapping, class_names: Sequence[str]) -> dict:
  """Metrics of one replica -> sklearn classification_report(
  output_dict=True) structure, python floats throughout."""
  rows = _per_class_rows(metrics, class_names)
  headers = ("precision", "recall", "f1-score", "support")
  out = {name: dict(zip(headers, (p, r, f, float(s))))
         for name, p, r, f, s in rows}
  total = float(sum(row[4] for row in rows))
  out["accuracy"] = float(np.asarray(metrics["accuracy"]))
  for kind in ("macro", "weighted"):
    out[f"{kind} avg"] = dict(zip(headers, (*_avg(metrics, kind), total)))
  return out


def classification_report(metrics: Mapping, class_names: Sequence[str],
                          digits: int = 4) -> str:
  """Metrics of one replica -> text table laid out like sklearn's
  classification_report (same column widths and rows)."""
  rows = _per_class_rows(metrics, class_names)
  headers = ("precision", "recall", "f1-score", "support")
  width = max(max((len(n) for n, *_ in rows), default=0),
              len("weighted avg"), digits)
  report = ("{:>{width}s} " + " {:>9}" * 4).format("", *headers, width=width)
  report += "\n\n"
  row_fmt = "{:>{width}s} " + " {:>9.{digits}f}" * 3 + " {:>9}\n"
  for row in rows:
    report += row_fmt.format(*row, width=width, digits=digits)
  report += "\n"
  total = sum(row[4] for row in rows)
  acc_fmt = ("{:>{width}s} " + " {:>9.{digits}}" * 2 + " {:>9.{digits}f}"
             + " {:>9}\n")
  report += acc_fmt.format("accuracy", "", "",
                           float(np.asarray(metrics["accuracy"])), total,
                           width=width, digits=digits)
  for kind in ("macro", "weighted"):
    report += row_fmt.format(f"{kind} avg", *_avg(metrics, kind), total,
                             width=width, digits=digits)
  return report


# ------------------------------------------------------------ seed summary


MIN_SEEDS_FOR_CI = 3   # below this the t interval is too wide to say much


def seed_stats(values, bounds=(0.0, 1.0)) -> dict:
  """(K, ...) per-replica values -> {mean, std, ci95_low, ci95_high, n, ci95_reliable}.

  The one seed-statistics helper. std uses ddof=1 (0 when K == 1); the 95 %
  interval is mean +- t_{0.975, K-1} * std / sqrt(K), clipped to `bounds`
  (default [0, 1], for scores; None for unbounded values such as a loss). With
  K == 1 there is no interval: ci95_low / ci95_high are None. ci95_reliable is
  False when K < MIN_SEEDS_FOR_CI. Scalars per replica give python floats;
  trailing axes give nested lists of the same shape.
  """
  from scipy import stats  # Lazy: scipy.stats is slow to import.

  v = np.asarray(values, dtype=np.float64)
  if v.ndim == 0:
    v = v[None]
  n = v.shape[0]
  if n == 0:
    raise ValueError("seed_stats needs at least one value")
  mean = v.mean(axis=0)
  if n == 1:
    std = np.zeros_like(mean)
    lo = hi = None
  else:
    std = v.std(axis=0, ddof=1)
    half = stats.t.ppf(0.975, df=n - 1) * std / np.sqrt(n)
    lo, hi = mean - half, mean + half
    if bounds is not None:
      lo, hi = np.clip(lo, *bounds).tolist(), np.clip(hi, *bounds).tolist()
    else:
      lo, hi = lo.tolist(), hi.tolist()
  return {"mean": mean.tolist(), "std": std.tolist(), "ci95_low": lo, "ci95_high": hi,
          "n": int(n), "ci95_reliable": n >= MIN_SEEDS_FOR_CI}


def seed_summary(per_replica_metrics: Mapping, bounds=(0.0, 1.0)) -> dict:
  """{name: (K,) array} -> {name: seed_stats}, JSON-serialisable.

  Entries that are not one scalar per replica (per-class (K, C) arrays,
  confusion matrices) are skipped; call `seed_stats` on them directly.
  bounds: see `seed_stats` (the classification scores here lie in [0, 1]).
  """
  return {name: seed_stats(v, bounds) for name, v in per_replica_metrics.items()
          if np.ndim(v) == 1}


# ---------------------------------------------------------------- plotting


def plot_confusion_matrix(cm, class_names: Sequence[str], path,
                          normalize: bool = True, title: str | None = None):
  """Save a (C, C) confusion matrix heat map as a PNG at `path`.

  Colour is the row-normalised rate (recall per true class) when normalize,
  raw counts otherwise; cells carry the counts (and rate) while C is small
  enough for text to fit.
  """
  # Figure + Agg canvas instead of pyplot: no global backend switch and no
  # figure registry, so this is safe inside training scripts and threads.
  from matplotlib.backends.backend_agg import FigureCanvasAgg
  from matplotlib.figure import Figure

  cm = np.asarray(cm)
  c = cm.shape[0]
  if len(class_names) != c:
    raise ValueError(f"{len(class_names)} class names for {c} classes")
  rows = cm.sum(axis=1, keepdims=True)
  # Classes absent from the labels have an all-zero row; show 0, not nan.
  rate = cm / np.where(rows == 0, 1, rows)
  shown = rate if normalize else cm

  size = min(max(6.0, 0.45 * c + 2.5), 40.0)
  fig = Figure(figsize=(size + 1.0, size), dpi=100)
  FigureCanvasAgg(fig)
  ax = fig.add_subplot()
  im = ax.imshow(shown, cmap="Blues", vmin=0,
                 vmax=1 if normalize else max(int(cm.max()), 1))
  fig.colorbar(im, ax=ax, fraction=0.046, pad=0.04,
               label="fraction of true class" if normalize else "count")
  ticks = np.arange(c)
  ax.set_xticks(ticks)
  ax.set_yticks(ticks)
  ax.set_xticklabels(class_names, rotation=45, ha="right",
                     rotation_mode="anchor")
  ax.set_yticklabels(class_names)
  ax.set_xlabel("predicted")
  ax.set_ylabel("true")
  if title:
    ax.set_title(title)

  if c <= 30:  # Beyond this the digits overlap and only add clutter.
    fontsize = 9 if c <= 12 else 6
    thresh = (1.0 if normalize else shown.max()) / 2
    for i in range(c):
      for j in range(c):
        text = (f"{cm[i, j]}\n{rate[i, j]:.2f}" if normalize
                else f"{cm[i, j]}")
        ax.text(j, i, text, ha="center", va="center", fontsize=fontsize,
                color="white" if shown[i, j] > thresh else "black")
  fig.tight_layout()
  fig.savefig(path, format="png")
  return path
