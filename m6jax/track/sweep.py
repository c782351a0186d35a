"""Sweeps: one `train_and_evaluate` (all seeds, one vmapped program) per cell,
tracked as nested MLflow runs under one parent run, resumable.

  python -m m6jax.track.sweep --sweep experiments/ablation.py [--root runs] [--only CELL]

A sweep file defines `get_sweep()` returning a dict:
  name       outputs go to <root>/<name>/<cell>/
  base       config spec: 'configs/default.py' or 'configs/image_only.py:efficientnet-lite1'
             (the part after ':' is get_config's argument)
  overrides  optional {dotted key: value} for every cell
  cells      [{dotted key: value, ...}]; a cell may also give its own 'base' and a
             'name' (else the name is made from its base and overrides)
  grid       optional {dotted key: [values, ...]}: the product, appended to cells

A cell whose workdir has results.json is skipped ("skipped: done"); an
interrupted one resumes from its own checkpoints (train.py does that).
SIGTERM / Ctrl-C stop the sweep cleanly (m6jax.train.preemption): inside a
cell, training stops at the next epoch boundary with its state saved; between
cells, no further cell starts. The sweep then exits with 128 + the signal
number after one line saying how to resume (rerun the same command).
"""

from __future__ import annotations

import argparse
import importlib.util
import itertools
import json
import logging
import os
import re
import sys

from m6jax import console, experiment, mesh
from m6jax.files import write_json
from m6jax.track import compare
from m6jax.track import tracker as tracker_lib
from m6jax.train import preemption

log = logging.getLogger(__name__)
REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
SPECIAL = ("name", "base")   # cell keys that are not config overrides


def _resolve(path: str) -> str:
  """A path as given (cwd) or relative to the repo root."""
  if os.path.exists(path) or os.path.isabs(path):
    return path
  alt = os.path.join(REPO, path)
  return alt if os.path.exists(alt) else path


def _load_module(path: str, name: str):
  spec = importlib.util.spec_from_file_location(name, _resolve(path))
  if spec is None:
    raise FileNotFoundError(path)
  mod = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(mod)
  return mod


def load_config(spec: str):
  """'configs/x.py' or 'configs/x.py:arg' -> the ConfigDict get_config(arg) returns."""
  path, _, arg = spec.partition(":")
  mod = _load_module(path, "m6jax_sweep_config_" + re.sub(r"\W", "_", path))
  return mod.get_config(arg) if arg else mod.get_config()


def apply_overrides(cfg, overrides: dict):
  """Sets dotted keys with ml_collections' own update_from_flattened_dict on the locked
  config (as `--config.a.b=v` does): an unknown key or a wrong type raises, naming it."""
  cfg.lock()
  for key, value in overrides.items():
    try:
      cfg.update_from_flattened_dict({key: value})
    except (KeyError, AttributeError, TypeError, ValueError) as e:
      raise type(e)(f"config override {key}={value!r} (config {cfg.get('name', '')!r}): "
                    f"{e}") from e
  return cfg


def _safe(v, keep: str = "") -> str:
  """A value as a file name part: letters, digits, '.', '_', '-' (and `keep`)."""
  s = v if isinstance(v, str) else json.dumps(v)
  return re.sub(rf"[^A-Za-z0-9._{re.escape(keep)}-]+", "_", s).strip("_") or "_"


def _base_label(spec: str) -> str:
  path, _, arg = spec.partition(":")
  stem = os.path.splitext(os.path.basename(path))[0]
  return _safe(f"{stem}-{arg}" if arg else stem)


def expand(sweep: dict) -> list:
  """Sweep dict -> [{'name', 'base', 'overrides'}] with unique, filesystem-safe names."""
  for k in ("name", "base"):
    if not sweep.get(k) and not (k == "base" and all(
        "base" in c for c in sweep.get("cells", []))):
      raise ValueError(f"sweep needs a {k!r}")
  raw = [dict(c) for c in sweep.get("cells", [])]
  grid = sweep.get("grid") or {}
  if grid:
    keys = list(grid)
    raw += [dict(zip(keys, vals)) for vals in itertools.product(*(grid[k] for k in keys))]
  if not raw:
    raise ValueError("sweep has no cells (give 'cells' or 'grid')")
  short = tracker_lib.short_keys(k for c in raw for k in c if k not in SPECIAL)
  cells, seen = [], set()
  for c in raw:
    overrides = {k: v for k, v in c.items() if k not in SPECIAL}
    name = c.get("name")
    if not name:
      parts = [_base_label(c["base"])] if "base" in c else []
      parts += [f"{short[k]}={_safe(v)}" for k, v in overrides.items()]
      name = "__".join(parts) or "base"
    name = _safe(name, keep="=")
    if name in seen:
      raise ValueError(f"two cells are both named {name!r}")
    seen.add(name)
    cells.append({"name": name, "base": c.get("base", sweep.get("base")),
                  "overrides": overrides})
  return cells


def load_sweep(path: str) -> dict:
  """Reads a sweep file -> {'name', 'base', 'overrides', 'cells': expanded}."""
  mod = _load_module(path, "m6jax_sweep_" + re.sub(r"\W", "_", path))
  sweep = dict(mod.get_sweep())
  sweep["name"] = _safe(sweep.get("name") or os.path.splitext(os.path.basename(path))[0])
  sweep["cells"] = expand(sweep)
  sweep["grid"] = None
  sweep["overrides"] = dict(sweep.get("overrides") or {})
  sweep["file"] = os.path.abspath(_resolve(path))
  return sweep


def cell_config(sweep: dict, cell: dict):
  cfg = load_config(cell["base"])
  apply_overrides(cfg, sweep["overrides"])
  return apply_overrides(cfg, cell["overrides"])


def run_sweep(path: str, root: str = "runs", only=None, uri: str | None = None,
              stop=None) -> dict:
  """Runs the sweep's missing cells; returns {cell: 'done' | 'skipped' | 'failed: ...'}.

  The store defaults to sqlite:///<root>/mlflow.db (what `./launch.sh ui` shows). The
  parent run gets the comparison (table, plot, JSON), the best cell and its metrics.
  stop: a m6jax.train.preemption.StopFlag (else SIGTERM/SIGINT set one); once set,
  the running cell stops at an epoch boundary, no other starts, and
  preemption.Preempted is raised after the parent run is updated.
  """
  sweep = load_sweep(path)
  names = [c["name"] for c in sweep["cells"]]
  only = list(only or [])
  unknown = [o for o in only if o not in names]
  if unknown:
    raise ValueError(f"--only {unknown}: not cells of this sweep; cells: {names}")
  sweep_dir = os.path.join(os.path.abspath(root), sweep["name"])
  os.makedirs(sweep_dir, exist_ok=True)
  if mesh.is_writer():
    write_json(os.path.join(sweep_dir, "sweep.json"),
               {k: sweep[k] for k in ("name", "base", "overrides", "cells", "file")})
  # Configs first: a bad override fails the sweep before hours of training.
  cfgs = {c["name"]: cell_config(sweep, c) for c in sweep["cells"]}
  store_dir = os.path.abspath(root)
  parent_cfg = {"name": sweep["name"], "track": tracker_lib._section(cfgs[names[0]]),
                "sweep": {"file": sweep["file"], "base": sweep["base"],
                          "overrides": sweep["overrides"], "cells": names}}
  about = (f"Sweep **{sweep['name']}** ({sweep['file']}): {len(names)} cells over "
           f"`{sweep['base']}`; the comparison table, plot and best cell are this run's "
           f"artifacts, the best cell's scores its metrics.")
  status = {}
  with preemption.handle_signals(stop) as stop, tracker_lib.Tracker(
      parent_cfg, sweep_dir, run_name=sweep["name"], uri=uri, store_dir=store_dir,
      resume="always", description=about,
      tags={"m6jax.role": "sweep", "m6jax.track.sweep": sweep["name"]}) as parent:
    for cell in sweep["cells"]:
      name, cfg = cell["name"], cfgs[cell["name"]]
      if only and name not in only:
        continue
      if stop.requested:   # between cells: start no other
        status[name] = "not started (stopped)"
        continue
      workdir = os.path.join(sweep_dir, name)
      if os.path.isfile(os.path.join(workdir, "results.json")):
        log.info("cell %s: skipped: done (%s/results.json)", name, workdir)
        status[name] = "skipped"
        continue
      log.info("cell %s: training (%s %s)", name, cell["base"], cell["overrides"])
      tags = {"m6jax.role": "cell", "m6jax.track.sweep": sweep["name"], "m6jax.cell": name,
              "m6jax.base": cell["base"], "m6jax.overrides": cell["overrides"]}
      try:
        experiment.run(cfg, workdir, parent_run_id=parent.run_id, run_name=name, uri=uri,
                       store_dir=store_dir, tags=tags, parent_workdir=sweep_dir,
                       overrides=sweep["overrides"] | cell["overrides"], stop=stop)
        status[name] = "done"
      except preemption.Preempted as e:   # inside the cell: its state is saved
        status[name] = f"stopped: {e}"
      except Exception as e:  # noqa: BLE001 - one bad cell should not sink the others
        log.exception("cell %s failed", name)
        status[name] = f"failed: {type(e).__name__}: {e}"
    n_done = sum(os.path.isfile(os.path.join(sweep_dir, n, "results.json")) for n in names)
    parent.set_tags({"m6jax.cells_done": f"{n_done}/{len(names)}"})
    if n_done:
      log_comparison(parent, sweep_dir, uri)
    if stop.requested:   # inside the block: the parent run ends KILLED
      e = preemption.Preempted(
          f"sweep {sweep['name']} stopped by {stop.name}: {n_done}/{len(names)} cells have "
          f"results in {sweep_dir}; rerun the same command to resume (finished cells are "
          "skipped, a stopped cell resumes from its checkpoint)", stop.signum)
      e.status = status
      raise e
  log.info("sweep %s: %d/%d cells have results (%s)", sweep["name"], n_done, len(names),
           sweep_dir)
  return status


def log_comparison(parent, sweep_dir: str, uri: str | None = None, metric: str = "macro_f1"):
  """Writes <sweep_dir>/comparison.{md,png,json} and logs them, the best cell (tags)
  and the best cell's scores (metrics) to the sweep's parent run. The best cell is
  chosen on validation only: with a cell lacking validation scores nothing is
  compared or tagged (the warning names the cells)."""
  try:
    res = compare.compare(sweep_dir, metric, uri=uri or parent.uri)
  except Exception as e:  # noqa: BLE001 - the cells are done; the summary is extra
    log.warning("sweep %s: no comparison: %s", sweep_dir, e)
    return None
  parent.log_artifacts(res["paths"])
  if res["split"] != "validation":   # never: compare refuses test ranking by default
    log.warning("sweep %s: no best cell tagged: the ranking was not on validation", sweep_dir)
    return res
  best = res["rows"][0]
  parent.set_tags({"m6jax.best_cell": best["cell"], "m6jax.best_by": f"{res['split']} {metric}",
                   "m6jax.best_overrides": best["overrides"]})
  parent.log_metrics(compare.row_metrics(best))
  return res


def main(argv=None):
  p = argparse.ArgumentParser(prog="python -m m6jax.track.sweep",
                              description=__doc__.split("\n")[0])
  p.add_argument("--sweep", required=True, help="sweep file (experiments/*.py)")
  p.add_argument("--root", default="runs", help="outputs: <root>/<sweep name>/<cell>")
  p.add_argument("--only", action="append", default=[], metavar="CELL",
                 help="run only this cell (repeatable)")
  p.add_argument("--uri", default=None, help="tracking store (default: sqlite in --root)")
  p.add_argument("--list", action="store_true", help="print the cells and exit")
  p.add_argument("--verbosity", type=int, default=None,
                 help="show every library's log at this absl level (-1, 0, 1)")
  args = p.parse_args(argv)
  console.setup(args.verbosity)   # m6jax's lines; orbax's per-save chatter off
  os.environ.setdefault("HF_HUB_OFFLINE", "1")
  if args.list:
    for c in load_sweep(args.sweep)["cells"]:
      print(f"{c['name']}\t{c['base']}\t{json.dumps(c['overrides'])}")
    return 0
  try:
    status = run_sweep(args.sweep, args.root, args.only, args.uri)
  except preemption.Preempted as e:
    print(f"m6jax.track.sweep: {e}", file=sys.stderr)
    return e.exit_code
  for name, s in status.items():
    print(f"{name}: {s}")
  return 1 if any(s.startswith("failed") for s in status.values()) else 0


if __name__ == "__main__":
  sys.exit(main())
