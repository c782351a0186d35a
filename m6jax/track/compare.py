"""Compare a sweep's cells: markdown table, bar plot, and the best cell.

  python -m m6jax.track.compare --root runs/ablation [--metric macro_f1] \
      [--out experiments/ablation] [--reference CELL] [--allow-test-ranking]

Scores come from the MLflow store (the runs nested under the sweep's parent
run, found through <root>/tracking.json); cells the store does not have (tracking
off, store down) are read from their results.json. Writes <out>.md, <out>.png
and <out>.json (default out: <root>/comparison).

The best cell is chosen on VALIDATION (mean over seeds of the best-epoch score,
the same numbers training selected epochs with). A cell without validation scores
is refused, named, unless --allow-test-ranking (then the ranking is on test and
the output says so: an optimistic pick). Test scores are shown alongside: the seed
spread, and each cell paired with a reference cell on the same test products
(m6jax.track.paired: accuracy difference with a paired-bootstrap 95 % interval,
McNemar's exact p, "within noise" when the interval contains 0; Nadeau-Bengio
for cross-validated cells).
"""

from __future__ import annotations

import argparse
import json
import logging
import os

from m6jax.evaluate import metrics as metrics_lib
from m6jax.files import write_json, write_text
from m6jax.track import metric_names, paired
from m6jax.track.mlflow_store import STATE, child_runs, read_json

log = logging.getLogger(__name__)
LABEL = {"macro_f1": "macro-F1", "accuracy": "accuracy"}
STATS = ("mean",) + metric_names.STATS


def _row_from_results(cell, res, overrides, source="results.json") -> dict:
  t = res["test"]
  row = {"cell": cell, "overrides": overrides, "source": source, "test": {}, "val": {},
         "n": t["summary"]["accuracy"]["n"], "ensemble": dict(t.get("ensemble", {}))}
  for k, st in t["summary"].items():
    row["test"][k] = {s: st[s] for s in STATS if st.get(s) is not None}
  for k, vals in metric_names.best_val(res).items():
    row["val"][k] = metrics_lib.seed_stats(vals)["mean"]
  return row


def _row_from_run(cell, run, overrides) -> dict | None:
  """A child run's metrics (named as in m6jax.track.tracker) -> a row; None without test scores."""
  m = run["metrics"]
  if "test/accuracy" not in m:
    return None
  row = {"cell": cell, "overrides": overrides, "source": "mlflow", "test": {}, "val": {},
         "n": int(run["params"].get("seeds", 0)), "ensemble": {}, "run_id": run["run_id"]}
  for key, v in m.items():
    parts = key.split("/")
    if parts[0] == "test" and len(parts) == 3 and parts[1] == "ensemble":
      row["ensemble"][parts[2]] = v
    elif parts[0] == "test" and parts[1] in metric_names.TEST_METRICS and (
        len(parts) == 2 or parts[2] in metric_names.STATS):
      row["test"].setdefault(parts[1], {})[parts[2] if len(parts) == 3 else "mean"] = v
    elif parts[0] == "val" and len(parts) == 2 and parts[1].startswith("best_"):
      row["val"][parts[1].removeprefix("best_")] = v
  return row


def row_metrics(row) -> dict:
  """A row -> metrics named as a run's own (test/<m>[/<stat>], test/ensemble/<m>,
  val/best_<m>), for the sweep's parent run."""
  out = {f"test/{k}" + ("" if s == "mean" else f"/{s}"): v
         for k, st in row["test"].items() if k in metric_names.TEST_METRICS for s, v in st.items()}
  out |= {f"test/ensemble/{k}": v for k, v in row["ensemble"].items()
          if k in metric_names.TEST_METRICS}
  return out | {f"val/best_{k}": v for k, v in row["val"].items()}


def collect(root: str, uri: str | None = None) -> tuple[list, str]:
  """Rows (one per cell with scores) and a sentence on where they came from."""
  root = os.path.abspath(root)
  info = read_json(os.path.join(root, "sweep.json")) or {}
  cells = [c["name"] for c in info.get("cells", [])]
  cells += sorted(d for d in os.listdir(root) if d not in cells and
                  os.path.isfile(os.path.join(root, d, "results.json")))
  overrides = {c["name"]: _describe(c) for c in info.get("cells", [])}
  rows, notes = {}, []
  state = read_json(os.path.join(root, STATE)) or {}
  if state.get("run_id"):
    store = uri or state.get("uri")
    try:
      runs = child_runs(store, state["run_id"])
      # The latest finished run of each cell (a cell may have been rerun).
      for run in runs:
        cell = run["tags"].get("m6jax.cell") or run["name"]
        row = _row_from_run(cell, run, overrides.get(cell, run["tags"].get(
            "m6jax.overrides", "")))
        if row is not None and run["status"] == "FINISHED":
          rows[cell] = row
      notes.append(f"{len(rows)} cell(s) from MLflow ({store}, parent run {state['run_id']})")
    except Exception as e:  # noqa: BLE001 - fall back to the files
      log.warning("could not read the MLflow store %s: %s; using results.json files",
                  store, str(e).splitlines()[0] if str(e) else e)
  n_files = 0
  for cell in cells:
    path = os.path.join(root, cell, "results.json")
    if cell not in rows and os.path.isfile(path):
      with open(path) as f:
        rows[cell] = _row_from_results(cell, json.load(f), overrides.get(cell, ""))
      n_files += 1
  if n_files:
    notes.append(f"{n_files} cell(s) from results.json files")
  order = {c: i for i, c in enumerate(cells)}
  return sorted(rows.values(), key=lambda r: order.get(r["cell"], len(order))), \
      "; ".join(notes) or "no cells with results"


def _describe(cell: dict) -> str:
  parts = [cell["base"]] if cell.get("base") else []
  parts += [f"{k}={v}" for k, v in cell.get("overrides", {}).items()]
  return " ".join(parts)


class NoValidationScores(ValueError):
  """Cells lack validation scores, and ranking them on test was not allowed."""


def select(rows: list, metric: str, allow_test_ranking: bool = False) -> tuple[list, str]:
  """Rows sorted best first, and the split that ranked them ('validation' or 'test').

  Ranks on validation; a cell without a validation score raises NoValidationScores
  naming it, unless allow_test_ranking (then every cell is ranked on test)."""
  missing = [r["cell"] for r in rows if metric not in r["val"]]
  if missing and not allow_test_ranking:
    raise NoValidationScores(
        f"cell(s) {missing} have no validation {metric}: ranking on test would let the "
        "test split decide; rerun them, or pass --allow-test-ranking (optimistic)")
  split = "test" if missing else "validation"
  key = (lambda r: r["val"][metric]) if split == "validation" else \
      (lambda r: r["test"][metric]["mean"])
  return sorted(rows, key=key, reverse=True), split


def _pm(st) -> str:
  return f"{st['mean']:.4f} ± {st['std']:.4f}" if st else "–"


def _ci(st, n) -> str:
  """'[lo, hi]', marked with † when fewer than 3 seeds make it unreliable."""
  if st.get("ci95_low") is None or st.get("ci95_high") is None:
    return "–"
  mark = " †" if n < metrics_lib.MIN_SEEDS_FOR_CI else ""
  return f"[{st['ci95_low']:.4f}, {st['ci95_high']:.4f}]{mark}"


def markdown(rows, split, metric, title, source) -> str:
  lab = LABEL.get(metric, metric)
  lines = [f"# {title}", "",
           f"Cells ranked by **{split} {lab}**" +
           (" (mean over seeds of each seed's best-epoch validation score)"
            if split == "validation" else
            " (--allow-test-ranking: not every cell has validation scores; optimistic)") +
           f". Scores: {source}.", "",
           f"| rank | cell | overrides | seeds | val {lab} | test accuracy (mean ± std) | "
           f"test macro-F1 (mean ± std) | test {lab} seed spread (95 % t) | "
           "ensemble accuracy |",
           "|---:|---|---|---:|---:|---:|---:|---|---:|"]
  for i, r in enumerate(rows, 1):
    ci = r["test"].get(metric, {})
    val = r["val"].get(metric)
    lines.append(
        f"| {i} | {r['cell']} | {r['overrides'] or '–'} | {r['n']} | "
        f"{'–' if val is None else f'{val:.4f}'} | {_pm(r['test'].get('accuracy'))} | "
        f"{_pm(r['test'].get('macro_f1'))} | "
        f"{_ci(ci, r['n'])} | "
        f"{r['ensemble'].get('accuracy', float('nan')):.4f} |")
  if rows:
    lines += ["", best_sentence(rows[0], split, metric)]
  if any(r["n"] < metrics_lib.MIN_SEEDS_FOR_CI for r in rows):
    lines += ["", f"† fewer than {metrics_lib.MIN_SEEDS_FOR_CI} seeds: the t interval "
              "(clipped to [0, 1]) says little."]
  lines += ["", "The seed spread is how much retraining moves a score; how much another "
            "draw of test products would move it is in the paired comparison below."]
  return "\n".join(lines) + "\n"


def paired_markdown(rows, reference) -> str:
  """The cells vs the reference, on the same test products."""
  if reference is None:
    return ("\n## Paired with a reference\n\nNo reference cell (none named "
            f"{paired.DEFAULT_NAME!r} or plain {paired.DEFAULT_BASE}; pass --reference).\n")
  lines = ["", f"## Paired with the reference `{reference}`", "",
           "Same test products, ensemble predictions: Δ = cell accuracy − reference "
           "accuracy, paired-bootstrap 95 % interval over the products, McNemar's exact p "
           "on the products exactly one of the two gets right; *within noise* when the "
           "interval contains 0. Cross-validated cells: Nadeau–Bengio corrected "
           "resampled t-test on the per-fold out-of-fold accuracies.", "",
           "| cell | products | Δ accuracy | 95 % interval | McNemar p | verdict | "
           "CV Δ (folds) | CV p (corrected t) |",
           "|---|---:|---:|---|---:|---|---:|---:|"]
  for r in rows:
    c = r.get("paired")
    if c is None:
      continue
    if "error" in c:
      lines.append(f"| {r['cell']} | – | – | – | – | not paired: {c['error']} | – | – |")
      continue
    cv = c.get("cv")
    lines.append(
        f"| {r['cell']} | {c['products']} | {c['diff']:+.4f} | "
        f"[{c['low']:+.4f}, {c['high']:+.4f}] | {c['p_mcnemar']:.3g} | "
        f"{paired.noise_words(c)} | {'–' if not cv else format(cv['mean'], '+.4f')} | "
        f"{'–' if not cv else format(cv['p'], '.3g')} |")
  return "\n".join(lines) + "\n"


def best_sentence(r, split, metric) -> str:
  lab = LABEL.get(metric, metric)
  t = r["test"].get(metric, {})
  chosen = (f"selected on the validation split ({lab} {r['val'][metric]:.4f})"
            if split == "validation" else
            f"selected on the TEST split ({lab}): no validation scores, so this pick is "
            f"optimistic")
  return (f"**Best cell: {r['cell']}** — {chosen}; test {lab} {_pm(t)} "
          f"(95 % CI {_ci(t, r['n'])}, {r['n']} seeds), "
          f"ensemble accuracy {r['ensemble'].get('accuracy', float('nan')):.4f}.")


def plot(rows, split, metric, path, title):
  """Bars: test mean ± std per cell (best first); dots: the validation means."""
  from matplotlib.backends.backend_agg import FigureCanvasAgg
  from matplotlib.figure import Figure
  lab = LABEL.get(metric, metric)
  fig = Figure(figsize=(max(5, 0.8 * len(rows) + 2), 4.5))
  FigureCanvasAgg(fig)
  ax = fig.add_subplot()
  x = list(range(len(rows)))
  means = [r["test"][metric]["mean"] for r in rows]
  stds = [r["test"][metric]["std"] for r in rows]
  colors = ["tab:orange" if i == 0 else "tab:blue" for i in x]
  ax.bar(x, means, yerr=stds, capsize=4, color=colors, label=f"test {lab} (mean ± std)")
  vals = [(i, r["val"][metric]) for i, r in zip(x, rows) if metric in r["val"]]
  if vals:
    ax.plot(*zip(*vals), "kD", ms=5, label=f"validation {lab} (mean)")
  ax.set_xticks(x, [r["cell"] for r in rows], rotation=30, ha="right")
  lo = min(m - s for m, s in zip(means, stds)) if rows else 0
  ax.set_ylim(max(0.0, lo - 0.05), min(1.0, max(m + s for m, s in zip(means, stds)) + 0.05)
              if rows else 1.0)
  ax.set_ylabel(lab)
  ax.set_title(f"{title}: best = {rows[0]['cell']} (by {split})" if rows else title)
  ax.legend(loc="best", fontsize=8)
  ax.grid(axis="y", alpha=0.3)
  fig.savefig(path, dpi=100, bbox_inches="tight")


def compare(root: str, metric: str = "macro_f1", out: str | None = None,
            uri: str | None = None, reference: str | None = None,
            allow_test_ranking: bool = False, resamples: int = 2000, seed: int = 0) -> dict:
  """Writes <out>.md/.png/.json; returns {'best', 'split', 'rows', 'reference',
  'markdown', paths}. Each row other than the reference's gets 'paired'
  (m6jax.track.paired.compare_cells)."""
  rows, source = collect(root, uri)
  if not rows:
    raise FileNotFoundError(f"{root}: no cell has results (MLflow or results.json)")
  missing = [r["cell"] for r in rows if metric not in r["test"]]
  if missing:
    raise KeyError(f"metric {metric!r} missing for cells {missing}")
  rows, split = select(rows, metric, allow_test_ranking)
  names = [r["cell"] for r in rows]
  info = read_json(os.path.join(root, "sweep.json")) or {}
  ref = paired.reference_cell(info.get("cells", []), names, reference)
  if ref is not None:
    res = {n: read_json(os.path.join(root, n, "results.json")) for n in names}
    comps = paired.compare_cells(root, names, ref, resamples, seed, res)
    for r in rows:
      if r["cell"] in comps:
        r["paired"] = comps[r["cell"]]
  title = f"Sweep {os.path.basename(os.path.abspath(root))}"
  out = out or os.path.join(root, "comparison")
  os.makedirs(os.path.dirname(os.path.abspath(out)), exist_ok=True)
  md = markdown(rows, split, metric, title, source) + paired_markdown(rows, ref)
  write_text(out + ".md", md)
  plot(rows, split, metric, out + ".png", title)
  summary = {"best": rows[0]["cell"], "split": split, "metric": metric, "source": source,
             "reference": ref, "rows": rows}
  write_json(out + ".json", summary)
  return summary | {"markdown": md, "paths": [out + ".md", out + ".png", out + ".json"]}


def main(argv=None):
  p = argparse.ArgumentParser(prog="python -m m6jax.track.compare",
                              description=__doc__.split("\n")[0])
  p.add_argument("--root", required=True, help="the sweep folder, e.g. runs/ablation")
  p.add_argument("--metric", default="macro_f1", help="macro_f1 | accuracy | any test metric")
  p.add_argument("--out", default=None, help="output path prefix (default <root>/comparison)")
  p.add_argument("--uri", default=None, help="tracking store (default: the sweep's)")
  p.add_argument("--reference", default=None,
                 help=f"the cell others are paired with (default: {paired.DEFAULT_NAME}, or "
                      f"the plain {paired.DEFAULT_BASE} cell)")
  p.add_argument("--allow-test-ranking", action="store_true",
                 help="rank on test when a cell has no validation scores (optimistic)")
  p.add_argument("--resamples", type=int, default=2000, help="bootstrap resamples")
  p.add_argument("--seed", type=int, default=0, help="bootstrap seed")
  args = p.parse_args(argv)
  logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
  try:
    res = compare(args.root, args.metric, args.out, args.uri, args.reference,
                  args.allow_test_ranking, args.resamples, args.seed)
  except ValueError as e:   # no validation scores, an unknown --reference: named
    p.error(str(e))
  print(res["markdown"])
  print("wrote " + ", ".join(res["paths"]))


if __name__ == "__main__":
  main()
