"""Feature store: put + lookup seconds and files, sharded store vs one file per product.

  .venv/bin/python -m benchmarks.bench_feature_store [--rows 10000 100000] [--dim 384]
      [--old-max 100000] [--chunk 10000]
  .venv/bin/python -m benchmarks.bench_feature_store --rss --rows 1000000 --chunk 50000

For each row count N: random float32 (N, D) rows under sha1 keys are
  - sharded, one put: FeatureCache.put_rows of all N (one run's misses), then
    FeatureCache.lookup of all N from a fresh instance (cold indexes);
  - sharded, chunked: put_rows in chunks of --chunk rows (several processes or
    runs; compaction runs past MAX_SHARDS), then lookup;
  - one file per product: the store before the shards (git 844dd6e, its
    encode/decode logic inlined below): one atomic .npy write + sha256 trailer
    per row, then one read + check per row (only N <= --old-max).
Timings are wall seconds on whatever disk the temporary folder is on (page
cache warm: the rows were just written).
"""

from __future__ import annotations

import argparse
import hashlib
import io
import os
import pathlib
import resource
import tempfile
import time

import numpy as np

from m6jax import files
from m6jax.features import cache as cache_lib

_MAGIC = b"M6SUM256"


def _old_put(root: pathlib.Path, keys, rows) -> None:
  """The per-product store of git 844dd6e: <ab>/<key>.npy + sha256 trailer, atomic."""
  for key, value in zip(keys, rows):
    path = root / key[:2] / f"{key}.npy"
    buf = io.BytesIO()
    np.save(buf, np.ascontiguousarray(value, np.float32), allow_pickle=False)
    data = buf.getvalue()
    blob = data + _MAGIC + hashlib.sha256(data).digest()
    path.parent.mkdir(parents=True, exist_ok=True)
    files.atomic_write(path, lambda f, b=blob: f.write(b), binary=True)


def _old_get(root: pathlib.Path, keys) -> dict:
  out = {}
  for key in keys:
    path = root / key[:2] / f"{key}.npy"
    blob = path.read_bytes()
    data, digest = blob[:-40], blob[-32:]
    if hashlib.sha256(data).digest() != digest:
      raise ValueError(path)
    out[key] = np.load(io.BytesIO(data), allow_pickle=False)
    os.utime(path)
  return out


def _count(folder) -> tuple[int, int]:
  paths = [p for p in pathlib.Path(folder).rglob("*") if p.is_file()]
  return len(paths), sum(p.stat().st_size for p in paths)


def _sharded(root, keys, x, chunk) -> dict:
  store = cache_lib.FeatureCache(root, "bench", {"v": 1})
  t0 = time.perf_counter()
  for lo in range(0, len(keys), chunk):
    store.put_rows(keys[lo:lo + chunk], x[lo:lo + chunk])
  t1 = time.perf_counter()
  got, found = cache_lib.FeatureCache(root, "bench", {"v": 1}).lookup(keys)
  t2 = time.perf_counter()
  assert found.all() and np.array_equal(got, x)
  n, size = _count(store.dir)
  return {"put_s": t1 - t0, "lookup_s": t2 - t1, "files": n, "bytes": size}


def _old(root, keys, x) -> dict:
  folder = pathlib.Path(root) / "old"
  t0 = time.perf_counter()
  _old_put(folder, keys, x)
  t1 = time.perf_counter()
  got = _old_get(folder, keys)
  t2 = time.perf_counter()
  assert len(got) == len(keys)
  n, size = _count(folder)
  return {"put_s": t1 - t0, "lookup_s": t2 - t1, "files": n, "bytes": size}


def _lookup_rss(n: int, dim: int, chunk: int) -> None:
  """Peak RSS before and after one lookup of n rows (filled chunk by chunk, so the
  peak before is small): what a lookup holds beyond its (n, dim) result."""
  with tempfile.TemporaryDirectory() as root:
    store = cache_lib.FeatureCache(root, "bench", {"v": 1})
    raw = cache_lib.content_keys(f"product {i}" for i in range(n))
    for lo in range(0, n, chunk):
      store.put_rows(raw[lo:lo + chunk], np.random.default_rng(lo).normal(
          size=(len(raw[lo:lo + chunk]), dim)).astype(np.float32))
    before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    got, found = cache_lib.FeatureCache(root, "bench", {"v": 1}).lookup(raw)
    after = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    assert found.all()
    print(f"lookup of {n} rows x {dim}: peak RSS {before:.0f} MB before, {after:.0f} MB after "
          f"(+{after - before:.0f} MB; the result is {got.nbytes / 2**20:.0f} MB), "
          f"{len(store.shards())} shards")


def main(argv=None) -> None:
  p = argparse.ArgumentParser()
  p.add_argument("--rows", type=int, nargs="+", default=[10_000, 100_000])
  p.add_argument("--dim", type=int, default=384)
  p.add_argument("--chunk", type=int, default=10_000)
  p.add_argument("--old-max", type=int, default=100_000)
  p.add_argument("--rss", action="store_true", help="only the lookup memory of --rows")
  args = p.parse_args(argv)
  if args.rss:
    for n in args.rows:
      _lookup_rss(n, args.dim, args.chunk)
    return
  print("| rows | store | put s | lookup s | put rows/s | lookup rows/s | files | MB |")
  print("|---|---|---|---|---|---|---|---|")
  for n in args.rows:
    keys = [cache_lib.content_key(f"product {i}") for i in range(n)]
    x = np.random.default_rng(0).normal(size=(n, args.dim)).astype(np.float32)
    runs = [("sharded, one put", _sharded, n), (f"sharded, puts of {args.chunk}", _sharded,
                                                 args.chunk)]
    if n <= args.old_max:
      runs.append(("one file per product (844dd6e)", _old, None))
    for name, fn, chunk in runs:
      with tempfile.TemporaryDirectory() as root:
        m = fn(root, keys, x) if chunk is None else fn(root, keys, x, chunk)
      print(f"| {n} | {name} | {m['put_s']:.2f} | {m['lookup_s']:.2f} | "
            f"{n / m['put_s']:,.0f} | {n / m['lookup_s']:,.0f} | {m['files']} | "
            f"{m['bytes'] / 2**20:.0f} |", flush=True)


if __name__ == "__main__":
  main()
