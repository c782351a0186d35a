"""Wall time of the main job, cold, and of a second config on the same catalogue.

Each repeat starts from empty caches: a new $M6JAX_CACHE (converted weights,
feature cache, feasibility studies, compiled XLA programs) and new workdirs;
the built dataset (data/tfds) is reused, as the issue's "cold" allows. It runs

  1. the main job:      python -m m6jax.main --config configs/default.py
  2. a second config:   python -m m6jax.main --config <--second> (same catalogue)

as separate processes and prints, per run, the process wall time (`time`
around the whole process: imports, MLflow, exit) and the phases that
results.json `timings` records, then a markdown table (median over repeats).

  HF_HUB_OFFLINE=1 PYTHONPATH=. .venv/bin/python benchmarks/bench_job.py [--repeats 3]
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import pathlib
import platform
import shlex
import statistics
import subprocess
import sys
import tempfile
import time

ROOT = pathlib.Path(__file__).resolve().parents[1]
PHASES = ("setup", "train", "feasibility", "evaluate", "explain", "total")


def _run(config: str, workdir: str, cache: str) -> dict:
  env = dict(os.environ, M6JAX_CACHE=cache, HF_HUB_OFFLINE="1", M6JAX_NO_DOWNLOAD="1",
             PYTHONPATH=str(ROOT))
  env.pop("M6JAX_FEATURE_CACHE", None)   # the feature cache lives under M6JAX_CACHE
  env.pop("MLFLOW_TRACKING_URI", None)   # the default store, beside the workdir
  t = time.perf_counter()
  proc = subprocess.run([sys.executable, "-m", "m6jax.main", "--config", config,
                         "--workdir", workdir], cwd=ROOT, env=env, capture_output=True,
                        text=True)
  wall = time.perf_counter() - t
  if proc.returncode:
    raise SystemExit(f"{config} failed ({proc.returncode}):\n{proc.stderr[-3000:]}")
  with open(os.path.join(workdir, "results.json")) as f:
    res = json.load(f)
  return {"wall": wall, **{p: res["timings"].get(p) for p in PHASES},
          "accuracy": res["test"]["ensemble"]["accuracy"]}


def main(argv=None):
  p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
  p.add_argument("--repeats", type=int, default=3)
  p.add_argument("--main", default="configs/default.py")
  p.add_argument("--second", default="configs/fusion.py:late")
  args = p.parse_args(argv)
  cmd = " ".join(shlex.quote(a) for a in [os.path.relpath(sys.executable, ROOT)] + sys.argv)
  print(f"$ HF_HUB_OFFLINE=1 PYTHONPATH=. {cmd}\n")
  rows = {"main job, cold": [], "second config": []}
  load = os.getloadavg()[0]
  for rep in range(args.repeats):
    with tempfile.TemporaryDirectory(prefix="m6jax-bench-") as tmp:
      cache = os.path.join(tmp, "cache")
      first = _run(args.main, os.path.join(tmp, "runs", "main"), cache)
      second = _run(args.second, os.path.join(tmp, "runs", "second"), cache)
    rows["main job, cold"].append(first)
    rows["second config"].append(second)
    print(f"repeat {rep}: " + "; ".join(
        f"{name} {r[-1]['wall']:.1f} s wall (" + ", ".join(
            f"{k} {r[-1][k]:.1f}" for k in PHASES if r[-1].get(k) is not None) + ")"
        for name, r in rows.items()), flush=True)

  print(f"\ndate: {datetime.datetime.now().astimezone().isoformat(timespec='seconds')}")
  print(f"machine: {os.cpu_count()} CPU cores, {platform.platform()}; 1-min load average "
        f"{load:.1f} at start, {os.getloadavg()[0]:.1f} at end")
  print(f"runs: main `{args.main}`, second `{args.second}`; {args.repeats} repeat(s), each "
        f"from empty caches; median shown (seconds; wall = the whole process, total = "
        f"results.json's run time without imports, the final MLflow logging and exit)\n")
  cols = ["wall"] + list(PHASES)
  print("| run | " + " | ".join(cols) + " | test accuracy (ensemble) |")
  print("|---|" + "---|" * (len(cols) + 1))
  for name, rs in rows.items():
    med = {k: statistics.median(r[k] for r in rs) if all(r.get(k) is not None for r in rs)
           else None for k in cols}
    span = f" ({min(r['wall'] for r in rs):.1f}-{max(r['wall'] for r in rs):.1f})"
    print(f"| {name} | " + " | ".join(
        ("-" if med[k] is None else f"{med[k]:.1f}") + (span if k == "wall" else "")
        for k in cols) + f" | {rs[0]['accuracy']:.4f} |")


if __name__ == "__main__":
  main()
