"""One JAX process of tests/test_multihost.py (run as `python -m tests.multihost_worker`).

  python -m tests.multihost_worker CATALOGUE TFDS_DIR WORKDIR MESH_SEED MESH_DATA

The launcher sets XLA_FLAGS (forced host devices) and, for a multi-process run,
JAX_COORDINATOR_ADDRESS / JAX_NUM_PROCESSES / JAX_PROCESS_ID, which
m6jax.mesh.initialize_distributed reads. The smoke config (frozen mode, tiny
towers, MLflow into WORKDIR/mlflow.db) runs through m6jax.experiment.run, as
m6jax.main does. Prints `RESULT {json}`: the process's view of the run and
every file it created or changed under WORKDIR outside checkpoints/ (seen by
an audit hook, so np.savez, matplotlib, sqlite and os.replace count too).
"""

import json
import os
import sys

import jax
import numpy as np

from m6jax import experiment
from m6jax import mesh as mesh_lib
from tests.conftest import tiny_config

# Audit events that create or change files: (event, index of the path argument).
_WRITE_EVENTS = {"os.rename": 1, "os.replace": 1, "os.remove": 0, "os.mkdir": 0,
                 "shutil.rmtree": 0, "sqlite3.connect": 0}


def watch_writes(root: str) -> list:
  """Records every path under `root` opened for writing (or renamed, made, removed)."""
  root = os.path.abspath(root)
  seen = []

  def hook(event, args):
    path = None
    if event == "open" and args and isinstance(args[0], (str, bytes, os.PathLike)):
      mode, flags = args[1], args[2]
      writing = (isinstance(mode, str) and any(c in mode for c in "wax+")) or (
          isinstance(flags, int) and flags & (os.O_WRONLY | os.O_RDWR | os.O_CREAT))
      path = args[0] if writing else None
    elif event in _WRITE_EVENTS and len(args) > _WRITE_EVENTS[event]:
      path = args[_WRITE_EVENTS[event]]
    if path is None or not isinstance(path, (str, os.PathLike)):
      return
    path = os.path.abspath(os.fspath(path))
    if event == "os.mkdir" and os.path.isdir(path):   # os.makedirs(exist_ok=True) of a dir
      return
    rel = os.path.relpath(path, root)
    # The workdir itself may be made by any process (orbax makes it for checkpoints/).
    if not rel.startswith("..") and rel != "." and rel.split(os.sep)[0] != "checkpoints":
      seen.append(rel)

  sys.addaudithook(hook)
  return seen


def main():
  catalogue, tfds_dir, workdir, seed, data = sys.argv[1:6]
  cfg = tiny_config(catalogue, tfds_dir)
  cfg.train.epochs = 3
  cfg.mesh.seed, cfg.mesh.data = int(seed), int(data)
  cfg.track.uri = "sqlite:///" + os.path.join(os.path.abspath(workdir), "mlflow.db")
  cfg.train.cache_dir = os.path.join(os.path.abspath(workdir), "cache")   # not ~/.cache
  mesh_lib.initialize_distributed(cfg.mesh)
  writes = watch_writes(workdir)
  res = experiment.run(cfg, workdir)
  out = {"process": jax.process_index(), "processes": jax.process_count(),
         "devices": jax.device_count(), "local_devices": jax.local_device_count(),
         "writer": mesh_lib.is_writer(),
         "loss": np.asarray([h["loss"] for h in res["history"]]).tolist(),
         "val_macro_f1": np.asarray([h["val_macro_f1"] for h in res["history"]]).tolist(),
         "test": res["test"]["summary"], "ensemble": res["test"]["ensemble"],
         "writes": sorted(set(writes))}
  print("RESULT " + json.dumps(out, default=float), flush=True)


if __name__ == "__main__":
  main()
