"""The default experiment on catalogues K x the bundled one, cold: time, memory, store files.

For each size K (--times 1 10 50) it generates (or reuses) a catalogue with
benchmarks/make_catalogue.py, all products distinct, then runs

  python -m m6jax.main --config configs/default.py --workdir <tmp>/run \
      --config.data.manual_dir=<catalogue> --config.data.tfds_dir=<tmp>/tfds \
      --config.train.cache_dir=<tmp>/features [extra overrides]

in a subprocess with a fresh dataset folder and a fresh feature store (so the
dataset is built and every product embedded in the run); converted weights and
compiled XLA programs stay in the usual m6jax cache (fixed costs, not per product).
It reports results.json `timings` per phase, setup ms/product, the peak RSS of
the process tree (sum over the process and its children, polled every
0.2 s with psutil) and the number of files in the feature store.

  HF_HUB_OFFLINE=1 PYTHONPATH=. .venv/bin/python benchmarks/bench_scale.py --times 1 10 50
  ... --times 1 --fraction 0.1 -- --config.explain.enabled=False   # a smoke run
"""

from __future__ import annotations

import argparse
import csv
import datetime
import json
import os
import pathlib
import platform
import shlex
import subprocess
import sys
import tempfile
import threading
import time

import psutil

from benchmarks import make_catalogue
from m6jax import defaults

ROOT = pathlib.Path(__file__).resolve().parents[1]
PHASES = ("setup", "train", "feasibility", "evaluate", "explain", "total")


def catalogue(root: str, times: int, fraction: float) -> tuple[str, int]:
  """The generated catalogue folder for (times, fraction), made unless complete."""
  out = os.path.join(root, f"cat-x{times}-f{fraction:g}")
  path = os.path.join(out, "products.csv")
  if not os.path.exists(path):    # the CSV is renamed into place last: present = complete
    make_catalogue.generate(defaults.base_config().data.manual_dir, out, times,
                            fraction=fraction,
                            progress=lambda s: print("  " + s, file=sys.stderr, flush=True))
  with open(path, newline="", encoding="utf-8") as f:
    n = sum(1 for _ in csv.reader(f)) - 1
  return out, n


class PeakRSS:
  """Polls the summed RSS of a process and its descendants; .peak in bytes."""

  def __init__(self, pid: int, every: float = 0.2):
    self.proc, self.every, self.peak = psutil.Process(pid), every, 0
    self._done = threading.Event()
    self._thread = threading.Thread(target=self._poll, daemon=True)
    self._thread.start()

  def _poll(self):
    while not self._done.is_set():
      try:
        procs = [self.proc] + self.proc.children(recursive=True)
        total = 0
        for p in procs:
          try:
            total += p.memory_info().rss
          except psutil.Error:
            pass
        self.peak = max(self.peak, total)
      except psutil.Error:
        return
      self._done.wait(self.every)

  def stop(self) -> int:
    self._done.set()
    self._thread.join()
    return self.peak


def count_files(root: str) -> int:
  return sum(len(fs) for _, _, fs in os.walk(root))


def run(config: str, cat: str, tmp: str, extra: list[str]) -> dict:
  """One cold run of `config` on catalogue `cat`; its timings, peak RSS, store files."""
  env = dict(os.environ, HF_HUB_OFFLINE="1", M6JAX_NO_DOWNLOAD="1", PYTHONPATH=str(ROOT))
  env.pop("M6JAX_FEATURE_CACHE", None)
  env.pop("MLFLOW_TRACKING_URI", None)     # the default store, beside the workdir
  store, workdir = os.path.join(tmp, "features"), os.path.join(tmp, "run")
  cmd = [sys.executable, "-m", "m6jax.main", "--config", config, "--workdir", workdir,
         f"--config.data.manual_dir={cat}", f"--config.data.tfds_dir={tmp}/tfds",
         f"--config.train.cache_dir={store}", *extra]
  t = time.perf_counter()
  with open(os.path.join(tmp, "log.txt"), "w") as log:
    proc = subprocess.Popen(cmd, cwd=ROOT, env=env, stdout=log, stderr=subprocess.STDOUT)
    rss = PeakRSS(proc.pid)
    rc = proc.wait()
    peak = rss.stop()
  wall = time.perf_counter() - t
  if rc:
    tail = pathlib.Path(tmp, "log.txt").read_text()[-3000:]
    raise SystemExit(f"{shlex.join(cmd)} failed ({rc}):\n{tail}")
  with open(os.path.join(workdir, "results.json")) as f:
    res = json.load(f)
  return {"wall": wall, "timings": res["timings"], "peak_rss": peak,
          "store_files": count_files(store), "accuracy": res["test"]["ensemble"]["accuracy"],
          "command": shlex.join(cmd)}


def main(argv=None):
  p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
  p.add_argument("--times", type=int, nargs="+", default=[1, 10, 50])
  p.add_argument("--fraction", type=float, default=1.0,
                 help="each catalogue copies only this fraction of the bundled rows (smoke)")
  p.add_argument("--config", default="configs/default.py")
  p.add_argument("--root", default="", help="where catalogues are kept ('' = a temp dir)")
  p.add_argument("--json", default="", help="also write the rows here")
  p.add_argument("extra", nargs="*", help="after --: more --config.* overrides")
  args = p.parse_args(argv)
  cmd = shlex.join([os.path.relpath(sys.executable, ROOT)] + sys.argv)
  print(f"$ HF_HUB_OFFLINE=1 PYTHONPATH=. {cmd}\n", flush=True)
  load = os.getloadavg()[0]
  rows = []
  with tempfile.TemporaryDirectory(prefix="m6jax-scale-") as tmp_root:
    root = args.root or tmp_root
    for k in args.times:
      cat, n = catalogue(root, k, args.fraction)
      with tempfile.TemporaryDirectory(prefix=f"x{k}-", dir=tmp_root) as tmp:
        r = run(args.config, cat, tmp, args.extra)
      r.update(times=k, products=n)
      rows.append(r)
      print(f"x{k} ({n} products): {r['wall']:.1f} s wall, " + ", ".join(
          f"{ph} {r['timings'][ph]:.1f}" for ph in PHASES if ph in r["timings"])
          + f"; peak RSS {r['peak_rss'] / 2**30:.2f} GiB; {r['store_files']} store files"
          + f"\n  {r['command']}", flush=True)
  print(f"\ndate: {datetime.datetime.now().astimezone().isoformat(timespec='seconds')}")
  print(f"machine: {os.cpu_count()} CPU cores, {platform.platform()}; 1-min load average "
        f"{load:.1f} at start, {os.getloadavg()[0]:.1f} at end\n")
  print("| catalogue | products | wall s | " + " | ".join(f"{ph} s" for ph in PHASES)
        + " | setup ms/product | peak RSS GiB | store files | test acc (ens.) |")
  print("|---|---|---|" + "---|" * len(PHASES) + "---|---|---|---|")
  for r in rows:
    t = r["timings"]
    print(f"| {r['times']}x | {r['products']} | {r['wall']:.1f} | " + " | ".join(
        f"{t[ph]:.1f}" if ph in t else "-" for ph in PHASES)
        + f" | {1000 * t.get('setup', float('nan')) / r['products']:.1f}"
        + f" | {r['peak_rss'] / 2**30:.2f} | {r['store_files']} | {r['accuracy']:.4f} |")
  if args.json:
    with open(args.json, "w") as f:
      json.dump(rows, f, indent=1)


if __name__ == "__main__":
  main()
