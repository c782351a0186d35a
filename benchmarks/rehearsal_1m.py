"""A 10^6-product rehearsal of everything after the embeddings, with time and memory.

Synthetic feature rows stand in for the towers' embeddings: 7 classes, each with
a random mean per modality plus unit Gaussian noise (learnable, not separable),
text D=384 (MiniLM) and image D=1280 (EfficientNet-Lite0), float32. Phases:

  fill      rows made in chunks and written to the feature store
            (m6jax.features.cache.FeatureCache.put_rows), one shard per chunk
  lookup    each split's rows read back by key (FeatureCache.lookup), checked
            against a regenerated sample, put on the device, host copy freed
  train     m6jax.train.trainer.FrozenTrainer of configs/default.py (5 seeds,
            linear head, its batch size and learning rate) for --epochs
  evaluate  the test scores as results.json has them (m6jax.evaluate.results.score:
            per seed, ensemble, percentile bootstrap over the test products)
  predict   every row through the trainer's prediction path, ensemble argmax

Rows are ordered train | validation | test (70 / 15 / 15 %), so a split is one
contiguous range of keys. It prints, per phase, the seconds and the peak RSS of
this process during the phase (psutil, polled every 0.1 s), and the ratio of the
overall peak to the bytes of the feature matrix.

  PYTHONPATH=. .venv/bin/python benchmarks/rehearsal_1m.py --rows 1000000 --epochs 3
"""

from __future__ import annotations

import argparse
import contextlib
import datetime
import json
import os
import platform
import shlex
import sys
import tempfile
import threading
import time

import jax
import numpy as np
import psutil

from configs import default
from m6jax.evaluate import results
from m6jax.features import cache as cache_lib
from m6jax.train import trainer as trainer_lib

DIMS = {"image": 1280, "text": 384}            # Lite0 and MiniLM embedding sizes
CLASSES = 7
SPLITS = (("train", 0.70), ("validation", 0.15), ("test", 0.15))
# Class means' scale per modality: pairwise class distance ~ scale * sqrt(2 D), so
# text alone separates two classes by ~3.9 noise sd and the image by ~2.5 (not separable).
SCALE = {"image": 0.05, "text": 0.14}


class Phases:
  """Seconds and peak RSS (polled) per named phase: `with phases('train'): ...`."""

  def __init__(self, every: float = 0.1):
    self.proc, self.every, self.rows, self._peak = psutil.Process(), every, {}, 0
    self._stop = threading.Event()
    threading.Thread(target=self._poll, daemon=True).start()

  def _poll(self):
    while not self._stop.is_set():
      self._peak = max(self._peak, self.proc.memory_info().rss)
      self._stop.wait(self.every)

  @contextlib.contextmanager
  def __call__(self, name: str):
    self._peak = self.proc.memory_info().rss
    t = time.perf_counter()
    print(f"[{name}] ...", flush=True)
    yield
    self._peak = max(self._peak, self.proc.memory_info().rss)
    self.rows[name] = {"seconds": time.perf_counter() - t, "peak_rss": self._peak}
    print(f"[{name}] {self.rows[name]['seconds']:.1f} s, peak RSS "
          f"{self._peak / 2**30:.2f} GiB", flush=True)

  def close(self):
    self._stop.set()


def split_ranges(n: int) -> dict[str, tuple[int, int]]:
  """{split: (start, stop)}: contiguous row ranges, 70 / 15 / 15 %."""
  out, start = {}, 0
  for i, (name, frac) in enumerate(SPLITS):
    stop = n if i == len(SPLITS) - 1 else start + int(round(n * frac))
    out[name], start = (start, stop), stop
  return out


def keys(start: int, stop: int) -> np.ndarray:
  """(stop - start,) store keys of rows start..stop-1 (sha1 of a row name)."""
  return cache_lib.content_keys(f"rehearsal-{i}" for i in range(start, stop))


def synthetic(start: int, n: int, seed: int = 0) -> tuple[np.ndarray, dict]:
  """Rows start..start+n-1 of a chunk starting at `start`: labels (n,) int32 and
  {modality: (n, D) float32}. The label and noise streams are seeded by (seed, what, start),
  so a chunk's first rows are the same whatever its length."""
  protos = np.random.default_rng(seed)
  means = {m: SCALE[m] * protos.standard_normal((CLASSES, d), np.float32)
           for m, d in DIMS.items()}
  labels = np.random.default_rng([seed, 1, start]).integers(0, CLASSES, n).astype(np.int32)
  rows = {}
  for i, (m, d) in enumerate(DIMS.items()):
    x = np.random.default_rng([seed, 2 + i, start]).standard_normal((n, d), np.float32)
    x += means[m][labels]
    rows[m] = x
  return labels, rows


def fill(stores: dict, n: int, chunk: int) -> np.ndarray:
  """Writes n synthetic rows into the stores, a shard per chunk; returns labels (n,)."""
  labels = np.empty(n, np.int32)
  for start in range(0, n, chunk):
    stop = min(n, start + chunk)
    y, rows = synthetic(start, stop - start)
    labels[start:stop] = y
    k = keys(start, stop)
    for m, store in stores.items():
      store.put_rows(k, rows[m])
    del rows
    print(f"  filled {stop}/{n}", flush=True)
  return labels


def load(stores: dict, n: int, chunk: int) -> dict:
  """{split: {modality: (rows, D) device array}} read back by key; the host copy of
  each (split, modality) is freed before the next, so the host never holds more
  than one of them beside the device arrays."""
  feats = {}
  for split, (start, stop) in split_ranges(n).items():
    k = keys(start, stop)
    feats[split] = {}
    for m, store in stores.items():
      rows, found = store.lookup(k)
      if not found.all():
        raise SystemExit(f"{split}/{m}: {int((~found).sum())} rows not found in {store.dir}")
      # A sample read back equals what was written (the chunk holding `start`).
      first = start - start % chunk
      want = synthetic(first, start - first + 100)[1][m][start - first:]
      np.testing.assert_array_equal(rows[:100], want)
      feats[split][m] = jax.device_put(rows)
      feats[split][m].block_until_ready()
      del rows
  return feats


def store_files(root: str) -> tuple[int, int]:
  """(files, bytes) under the store root."""
  paths = [os.path.join(d, f) for d, _, fs in os.walk(root) for f in fs]
  return len(paths), sum(os.path.getsize(p) for p in paths)


def rehearse(n: int, epochs: int, chunk: int, store_root: str) -> dict:
  phases = Phases()
  stores = {m: cache_lib.FeatureCache(store_root, f"rehearsal-{m}", {"dim": d})
            for m, d in DIMS.items()}
  with phases("fill"):
    all_labels = fill(stores, n, chunk)
  ranges = split_ranges(n)
  labels = {s: all_labels[a:b] for s, (a, b) in ranges.items()}
  with phases("lookup"):
    feats = load(stores, n, chunk)
  cfg = default.get_config()
  cfg.train.epochs = epochs
  cfg.train.checkpoint = False
  with phases("train"):
    trainer = trainer_lib.FrozenTrainer(cfg, CLASSES, feats, labels)
    del feats   # the trainer holds the device arrays
    states, history = trainer.fit(labels["validation"], None, progress=False)
  with phases("evaluate"):
    probs = trainer.seed_models(trainer.predict(states.best_params, None, "test"))
    scores = results.score(labels["test"], probs, [f"c{i}" for i in range(CLASSES)],
                           cfg.evaluate)
  with phases("predict"):
    pred = np.concatenate([trainer.ensemble(trainer.predict(states.best_params, None, s))
                           .argmax(-1) for s in ranges])
  phases.close()
  files, size = store_files(store_root)
  return {"rows": n, "epochs": epochs, "phases": phases.rows,
          "feature_bytes": n * sum(DIMS.values()) * 4,
          "peak_rss": max(r["peak_rss"] for r in phases.rows.values()),
          "epoch_seconds": [h["seconds"] for h in history],
          "val_log_loss": [float(np.mean(h["val_log_loss"])) for h in history],
          "test_accuracy": scores["ensemble"]["accuracy"],
          "test_bootstrap": scores["bootstrap"]["accuracy"],
          "predict_accuracy": float((pred == all_labels).mean()),
          "store_files": files, "store_bytes": size}


def main(argv=None):
  p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
  p.add_argument("--rows", type=int, default=1_000_000)
  p.add_argument("--epochs", type=int, default=3)
  p.add_argument("--chunk", type=int, default=100_000, help="rows per fill chunk / shard")
  p.add_argument("--store", default="", help="store root ('' = a temp dir, removed)")
  p.add_argument("--json", default="")
  args = p.parse_args(argv)
  print("$ PYTHONPATH=. " + shlex.join([os.path.relpath(sys.executable)] + sys.argv), flush=True)
  load_avg = os.getloadavg()[0]
  with tempfile.TemporaryDirectory(prefix="m6jax-1m-") as tmp:
    out = rehearse(args.rows, args.epochs, args.chunk, args.store or tmp)
  gib = 2**30
  print(f"\ndate: {datetime.datetime.now().astimezone().isoformat(timespec='seconds')}; "
        f"{os.cpu_count()} CPU cores, {psutil.virtual_memory().total / gib:.0f} GiB, "
        f"{platform.platform()}; load {load_avg:.1f} at start, {os.getloadavg()[0]:.1f} at end")
  print(f"{out['rows']} rows x {sum(DIMS.values())} float32 = feature matrix "
        f"{out['feature_bytes'] / gib:.2f} GiB; store: {out['store_files']} files, "
        f"{out['store_bytes'] / gib:.2f} GiB\n")
  print("| phase | seconds | peak RSS GiB |\n|---|---|---|")
  for name, r in out["phases"].items():
    print(f"| {name} | {r['seconds']:.1f} | {r['peak_rss'] / gib:.2f} |")
  ep = out["epoch_seconds"]
  b = out["test_bootstrap"]
  print(f"\npeak RSS {out['peak_rss'] / gib:.2f} GiB = "
        f"{out['peak_rss'] / out['feature_bytes']:.2f} x the feature matrix; seconds per "
        f"epoch (train + validation) {', '.join(f'{s:.1f}' for s in ep)} (the first compiles)")
  print(f"validation log-loss per epoch {', '.join(f'{v:.4f}' for v in out['val_log_loss'])}; "
        f"test accuracy (ensemble) {out['test_accuracy']:.4f} [{b['low']:.4f}, {b['high']:.4f}]; "
        f"predict over all rows: accuracy {out['predict_accuracy']:.4f}")
  if args.json:
    with open(args.json, "w") as f:
      json.dump(out, f, indent=1)


if __name__ == "__main__":
  main()
