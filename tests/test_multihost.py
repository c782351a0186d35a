"""Multi-host JAX for real on one machine: 2 processes on 127.0.0.1 (gloo CPU
collectives), 2 forced host devices each, run the smoke config (frozen mode)
through m6jax.experiment.run on a mesh spanning both, and must give the result
of one process; only process 0 writes (tests/multihost_worker.py records every
write under the workdir)."""

import json
import os
import socket
import sqlite3
import subprocess
import sys

import pytest

from tests.conftest import REPO

TIMEOUT = 600


def _free_port() -> int:
  with socket.socket() as s:
    s.bind(("127.0.0.1", 0))
    return s.getsockname()[1]


def launch(n: int, devices_each: int, argv: list) -> list[str]:
  """Runs `python *argv` as n JAX processes on 127.0.0.1 (devices_each forced host
  devices each); returns their stdouts."""
  port = _free_port()
  procs = []
  for pid in range(n):
    env = dict(os.environ, PYTHONPATH=REPO, HF_HUB_OFFLINE="1",
               XLA_FLAGS=f"--xla_force_host_platform_device_count={devices_each}")
    if n > 1:
      env.update(JAX_COORDINATOR_ADDRESS=f"127.0.0.1:{port}", JAX_NUM_PROCESSES=str(n),
                 JAX_PROCESS_ID=str(pid))
    procs.append(subprocess.Popen([sys.executable, *argv], cwd=REPO, env=env, text=True,
                                  stdout=subprocess.PIPE, stderr=subprocess.PIPE))
  outs = []
  try:
    for p in procs:
      outs.append(p.communicate(timeout=TIMEOUT))
  finally:
    for p in procs:   # a process left waiting in a collective when its peer failed
      if p.poll() is None:
        p.kill()
        p.wait()
  for pid, (p, (_out, err)) in enumerate(zip(procs, outs)):
    assert p.returncode == 0, f"process {pid} of {n} failed:\n{err[-4000:]}"
  return [out for out, _ in outs]


def run_processes(n: int, devices_each: int, mesh: tuple, catalogue: str, tfds: str,
                  workdir: str) -> list[dict]:
  """Launches n worker processes (one JAX process each); returns their RESULT dicts."""
  outs = launch(n, devices_each, ["-m", "tests.multihost_worker", catalogue, tfds, workdir,
                                  str(mesh[0]), str(mesh[1])])
  return [json.loads(out.split("RESULT ", 1)[1]) for out in outs]


@pytest.fixture(scope="module")
def one_process(tiny_catalogue, tmp_path_factory):
  root = tmp_path_factory.mktemp("one")
  return run_processes(1, 1, (1, 1), tiny_catalogue, str(root / "tfds"), str(root / "run"))[0]


def _mlflow_runs(db: str) -> int:
  with sqlite3.connect(db) as con:
    return con.execute("select count(*) from runs").fetchone()[0]


@pytest.mark.slow
@pytest.mark.parametrize("mesh", [(2, 2), (1, 4)], ids=["seed_across", "data_across"])
def test_two_processes_give_the_one_process_result(mesh, one_process, tiny_catalogue,
                                                   tmp_path):
  """(2, 2): each process holds one seed replica; (1, 4): the batch (and the
  gradient all-reduce) spans both processes."""
  workdir = str(tmp_path / "run")
  res = run_processes(2, 2, mesh, tiny_catalogue, str(tmp_path / "tfds"), workdir)
  assert [r["process"] for r in res] == [0, 1]
  assert [r["writer"] for r in res] == [True, False]
  for r in res:
    assert (r["processes"], r["devices"], r["local_devices"]) == (2, 4, 2)
    # Same 2-seed run as one process on one device; only reduction order may differ.
    for key in ("loss", "val_macro_f1"):
      got, want = r[key], one_process[key]
      assert len(got) == len(want) == 3
      assert max(abs(a - b) for ga, wa in zip(got, want) for a, b in zip(ga, wa)) <= 1e-5, key
    for metric in ("accuracy", "macro_f1"):
      assert r["test"][metric]["mean"] == pytest.approx(one_process["test"][metric]["mean"],
                                                        abs=1e-6)
      assert r["ensemble"][metric] == pytest.approx(one_process["ensemble"][metric], abs=1e-6)
  # Only process 0 writes outputs and one MLflow run; each process writes its share of
  # the embeddings to the feature store (tests/test_feature_store.py).
  assert all(w.startswith("cache" + os.sep) for w in res[1]["writes"]), res[1]["writes"]
  for name in ("config.json", "results.json", "metrics.jsonl", "report.txt",
               "predictions_test.csv", "confusion_matrix.png", "tracking.json", "mlflow.db"):
    assert name in res[0]["writes"], name
    assert os.path.isfile(os.path.join(workdir, name)), name
  assert any(w.startswith("cache" + os.sep) for w in res[0]["writes"])
  assert _mlflow_runs(os.path.join(workdir, "mlflow.db")) == 1
  assert os.listdir(os.path.join(workdir, "checkpoints"))
