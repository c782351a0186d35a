"""Twin grouping and the group split at catalogue scale: seconds and peak memory.

Synthetic catalogues of N rows (7 classes): templated texts of 60 words, of which
10 % are near-copies of another row (one or two words changed) and 2 % exact
copies; photo keys are random, with 3 % shared bytes and 3 % shared dHashes (the
image decode itself is read_catalogue's, timed in bench_hostile_build.md).
Prints a markdown table: find_twins seconds, stratified_split seconds, groups
found, peak RSS.

  PYTHONPATH=$PWD python benchmarks/bench_twins.py --rows 1000 10000 100000
"""

from __future__ import annotations

import argparse
import resource
import time

import numpy as np

from m6jax.data import catalogue, twins


def synthetic_rows(n: int, seed: int = 0) -> list:
  rng = np.random.default_rng(seed)
  vocab = np.array([f"w{i}" for i in range(20000)])
  texts = [list(rng.choice(vocab, 60)) for _ in range(n)]
  for i in rng.choice(n, n // 10, replace=False):          # near-copies
    src = int(rng.integers(n))
    texts[i] = list(texts[src])
    for _ in range(int(rng.integers(1, 3))):
      texts[i][int(rng.integers(60))] = f"x{rng.integers(10**9)}"
  for i in rng.choice(n, n // 50, replace=False):           # exact copies
    texts[i] = list(texts[int(rng.integers(n))])
  digests = [f"{rng.integers(1 << 62):x}" for _ in range(n)]
  hashes = [f"{rng.integers(1 << 62):016x}" for _ in range(n)]
  for i in rng.choice(n, 3 * n // 100, replace=False):
    digests[i] = digests[int(rng.integers(n))]
  for i in rng.choice(n, 3 * n // 100, replace=False):
    hashes[i] = hashes[int(rng.integers(n))]
  return [catalogue.Row(i + 2, f"{i:08d}", " ".join(t), f"class{i % 7}", "",
                        photo=(d, h)) for i, (t, d, h) in enumerate(zip(texts, digests, hashes))]


def main() -> None:
  p = argparse.ArgumentParser()
  p.add_argument("--rows", type=int, nargs="+", default=[1000, 10000, 100000])
  a = p.parse_args()
  print("| rows | find_twins s | stratified_split s | twin groups (rows) | peak RSS MB |")
  print("|---|---|---|---|---|")
  for n in a.rows:
    rows = synthetic_rows(n)
    t0 = time.perf_counter()
    found = twins.find_twins(rows)
    t1 = time.perf_counter()
    catalogue.stratified_split(rows, dict(train=0.7, validation=0.15, test=0.15), 0,
                               found.key_of)
    t2 = time.perf_counter()
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    print(f"| {n} | {t1 - t0:.1f} | {t2 - t1:.1f} | {len(found.groups)} "
          f"({sum(len(g['ids']) for g in found.groups)}) | {peak:.0f} |")


if __name__ == "__main__":
  main()
