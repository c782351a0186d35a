"""Latency of the served model through the real server: p50/p95 for 1, 8 and 210 rows.

Starts `mlflow models serve --env-manager local` on 127.0.0.1 (the venv's bin/ on
PATH, as ./launch.sh serve does) for a logged model, waits for /ping, sends one
warm-up request per size, then `--repeats` timed requests per size (the whole
HTTP round trip, JSON encode/decode included) and prints a markdown table.

Rows are products of the bundled catalogue with their text changed (a suffix),
so text features are computed as for unseen products, not read from the
feature cache; photos are named as files of the catalogue's image folder, which
the server is given as its image folder (M6JAX_SERVE_IMAGES; servers older than
that option read the `images` request param).

  HF_HUB_OFFLINE=1 PYTHONPATH=. .venv/bin/python benchmarks/bench_serve.py \\
      --model-uri models:/m-... --tracking-uri sqlite:///runs/mlflow.db [--repeats 20]
"""

from __future__ import annotations

import argparse
import csv
import datetime
import json
import os
import platform
import shlex
import signal
import socket
import statistics
import subprocess
import sys
import time
import urllib.error
import urllib.request

CATALOGUE = "/work/shared/data/flipkart"
SIZES = (1, 8, 210)
COLUMNS = ("uniq_id", "product_name", "description", "image")


def _free_port() -> int:
  with socket.socket() as s:
    s.bind(("127.0.0.1", 0))
    return s.getsockname()[1]


def _rows(catalogue: str, n: int) -> list[dict]:
  with open(os.path.join(catalogue, "products.csv"), encoding="utf-8") as f:
    rows = list(csv.DictReader(f))[-n:]
  return [{c: r[c] for c in COLUMNS} | {"description": r["description"] + " (new listing)"}
          for r in rows]


def _post(port: int, body: bytes, timeout: float = 600) -> tuple[int, bytes]:
  req = urllib.request.Request(f"http://127.0.0.1:{port}/invocations", data=body,
                               headers={"Content-Type": "application/json"})
  try:
    with urllib.request.urlopen(req, timeout=timeout) as r:
      return r.status, r.read()
  except urllib.error.HTTPError as e:
    return e.code, e.read()


def _wait(port: int, proc, limit: float = 300) -> float:
  t = time.perf_counter()
  while time.perf_counter() - t < limit:
    if proc.poll() is not None:
      raise SystemExit(f"the server exited ({proc.returncode})")
    try:
      with urllib.request.urlopen(f"http://127.0.0.1:{port}/ping", timeout=2):
        return time.perf_counter() - t
    except OSError:
      time.sleep(0.5)
  raise SystemExit(f"no answer on port {port} after {limit} s")


def main(argv=None):
  p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
  p.add_argument("--model-uri", required=True)
  p.add_argument("--tracking-uri", required=True)
  p.add_argument("--repeats", type=int, default=20)
  p.add_argument("--catalogue", default=CATALOGUE)
  p.add_argument("--label", default="", help="a name for this server in the table")
  args = p.parse_args(argv)
  cmd = " ".join(shlex.quote(a) for a in [os.path.relpath(sys.executable)] + sys.argv)
  images = os.path.join(args.catalogue, "images")
  port = _free_port()
  bindir = os.path.dirname(sys.executable)
  env = dict(os.environ, PATH=bindir + os.pathsep + os.environ.get("PATH", ""),
             MLFLOW_TRACKING_URI=args.tracking_uri, M6JAX_SERVE_IMAGES=images,
             HF_HUB_OFFLINE="1", MLFLOW_DISABLE_TELEMETRY="true")
  log = open(os.path.join(os.environ.get("TMPDIR", "/tmp"), f"bench_serve_{port}.log"), "w")
  proc = subprocess.Popen([os.path.join(bindir, "mlflow"), "models", "serve", "-m",
                           args.model_uri, "--env-manager", "local", "-h", "127.0.0.1",
                           "-p", str(port), "-w", "1"], env=env, stdout=log,
                          stderr=subprocess.STDOUT, start_new_session=True)
  rows = _rows(args.catalogue, max(SIZES))
  table = {}
  try:
    ready = _wait(port, proc)
    for n in SIZES:
      body = json.dumps({"dataframe_records": rows[:n], "params": {"images": images}}).encode()
      t = time.perf_counter()
      status, out = _post(port, body)
      first = time.perf_counter() - t
      if status != 200:
        raise SystemExit(f"{n} rows: HTTP {status}: {out[:2000]!r}")
      got = json.loads(out)["predictions"]
      assert len(got) == n, (n, len(got))
      times = []
      for _ in range(args.repeats):
        t = time.perf_counter()
        status, _ = _post(port, body)
        times.append(time.perf_counter() - t)
        assert status == 200
      times.sort()
      table[n] = (first, statistics.median(times),
                  times[min(len(times) - 1, int(round(0.95 * (len(times) - 1))))])
      print(f"{n} rows: first {first:.3f} s, p50 {table[n][1]:.3f} s, p95 {table[n][2]:.3f} s",
            flush=True)
  finally:
    os.killpg(proc.pid, signal.SIGTERM)
    proc.wait(30)
    log.close()
  print(f"\n$ {cmd}\n")
  print(f"date: {datetime.datetime.now(datetime.timezone.utc).isoformat(timespec='seconds')}")
  print(f"machine: {os.cpu_count()} CPU cores, {platform.platform()}; 1-min load average "
        f"{os.getloadavg()[0]:.1f} at end; server ready {ready:.1f} s after start\n")
  label = args.label or args.model_uri
  print("| server | rows | first request (s) | p50 (s) | p95 (s) |")
  print("|---|---|---|---|---|")
  for n, (first, p50, p95) in table.items():
    print(f"| {label} | {n} | {first:.3f} | {p50:.3f} | {p95:.3f} |")


if __name__ == "__main__":
  main()
