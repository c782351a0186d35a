"""Screenshots of the MLflow UI for a store: a run page, a metric chart and a sweep's parent.

  python experiments/screenshots.py --store runs/mlflow.db [--out experiments/screenshots]

Starts `mlflow ui` on 127.0.0.1 for the store, picks the newest finished training run
and the newest sweep parent run (tag m6jax.role=sweep), and saves PNGs taken with
headless Chromium (`apt-get install chromium`; --chromium to point elsewhere):
  run.png            the run page (overview: description, tags, dataset)
  run_metrics.png    that run's metric charts (train/, val/, test/ sections)
  experiment.png     the experiment page (opens on the training runs: experiment kind tag)
  sweep_parent.png   the sweep's parent run (best cell, metrics)
  sweep_artifacts.png  its comparison artifacts
"""

from __future__ import annotations

import argparse
import os
import shutil
import signal
import socket
import subprocess
import sys
import time
import urllib.request

from mlflow.tracking import MlflowClient

FLAGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-background-networking",
         "--hide-scrollbars", "--window-size=1500,1000", "--virtual-time-budget=20000"]


def _free_port() -> int:
  with socket.socket() as s:
    s.bind(("127.0.0.1", 0))
    return s.getsockname()[1]


def _wait(url: str, timeout: float = 240.0) -> None:
  t0 = time.time()
  while time.time() - t0 < timeout:
    try:
      urllib.request.urlopen(url, timeout=2)
      return
    except OSError:
      time.sleep(1)
  raise TimeoutError(f"mlflow ui did not answer at {url} within {timeout:.0f} s")


def _runs(uri: str):
  """(newest finished training run, newest sweep parent or None), each (experiment id, run)."""
  c = MlflowClient(uri)
  exps = [e.experiment_id for e in c.search_experiments()]
  runs = c.search_runs(exps, "attributes.status = 'FINISHED'",
                       order_by=["attributes.start_time DESC"])
  train = next((r for r in runs if r.data.tags.get("m6jax.role") != "sweep"
                and "test/accuracy" in r.data.metrics), None)
  sweep = next((r for r in runs if r.data.tags.get("m6jax.role") == "sweep"), None)
  if train is None:
    raise SystemExit(f"{uri}: no finished run with test scores to show")
  return train, sweep


def shoot(chromium: str, url: str, path: str) -> None:
  # MLflow 3.17's sidebar switch (GenAI | Model training) decides the view and starts on
  # GenAI in a fresh browser; this query parameter selects the training view.
  url += ("&" if "?" in url else "?") + "workflowType=machine_learning"
  subprocess.run([chromium, *FLAGS, f"--screenshot={path}", url], check=True, timeout=300,
                 capture_output=True)
  print(f"{path}  <-  {url}")


def main(argv=None) -> int:
  p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
  p.add_argument("--store", default="runs/mlflow.db", help="the sqlite store file")
  p.add_argument("--out", default=os.path.join(os.path.dirname(__file__), "screenshots"))
  p.add_argument("--chromium", default=shutil.which("chromium") or "/usr/bin/chromium")
  args = p.parse_args(argv)
  uri = "sqlite:///" + os.path.abspath(args.store)
  train, sweep = _runs(uri)
  os.makedirs(args.out, exist_ok=True)
  port = _free_port()
  base = f"http://127.0.0.1:{port}"
  ui = subprocess.Popen([sys.executable, "-m", "mlflow", "ui", "--backend-store-uri", uri,
                         "--host", "127.0.0.1", "--port", str(port)],
                        stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                        start_new_session=True)   # its workers share the group: stop them all
  try:
    _wait(base + "/health")
    eid, rid = train.info.experiment_id, train.info.run_id
    shoot(args.chromium, f"{base}/#/experiments/{eid}/runs/{rid}",
          os.path.join(args.out, "run.png"))
    shoot(args.chromium, f"{base}/#/experiments/{eid}/runs/{rid}/model-metrics",
          os.path.join(args.out, "run_metrics.png"))
    shoot(args.chromium, f"{base}/#/experiments/{eid}", os.path.join(args.out, "experiment.png"))
    if sweep is not None:
      sid = sweep.info.run_id
      shoot(args.chromium, f"{base}/#/experiments/{sweep.info.experiment_id}/runs/{sid}",
            os.path.join(args.out, "sweep_parent.png"))
      shoot(args.chromium,
            f"{base}/#/experiments/{sweep.info.experiment_id}/runs/{sid}/artifacts",
            os.path.join(args.out, "sweep_artifacts.png"))
  finally:
    os.killpg(ui.pid, signal.SIGTERM)
    try:
      ui.wait(timeout=15)
    except subprocess.TimeoutExpired:   # uvicorn's workers can ignore SIGTERM for a while
      os.killpg(ui.pid, signal.SIGKILL)
      ui.wait()
  return 0


if __name__ == "__main__":
  sys.exit(main())
