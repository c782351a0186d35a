"""K seed replicas as one vmapped program vs a Python loop of K solo runs.

  python benchmarks/bench_seeds.py [--k 8]

1. Fusion heads on frozen embeddings (the default job's training): the
   default config's head (early fusion, 256 hidden) on embeddings of the
   default towers' shapes (588 train / 126 val rows, 1280-d image + 384-d
   text, random but fixed), 30 epochs. Wall time from trainer construction to
   trained states, compiles included: one FrozenTrainer with seeds=K vs K
   trainers with seeds=1 (each compiles, as K separate runs would).
2. A fine-tuned CNN train step (ResNet50, 64 px, batch 8, AdamW): the K
   replicas vmapped in one jitted step vs K solo steps, compile included
   (benchmarks/bench_gpu.py's step).
"""

import argparse
import os
import sys
import time


import jax  # noqa: E402
import numpy as np  # noqa: E402


def heads(k: int, epochs: int):
  from configs.default import get_config
  from m6jax.train import trainer as trainer_lib
  rng = np.random.default_rng(0)
  n = {"train": 588, "validation": 126, "test": 126}
  labels = {s: rng.integers(0, 7, m).astype(np.int32) for s, m in n.items()}
  feats = {s: {"image": rng.normal(size=(m, 1280)).astype(np.float32),
               "text": rng.normal(size=(m, 384)).astype(np.float32)} for s, m in n.items()}

  def fit(seeds, seed):
    cfg = get_config()
    cfg.seeds, cfg.seed, cfg.train.epochs = seeds, seed, epochs
    t = trainer_lib.FrozenTrainer(cfg, 7, feats, labels)
    states, _ = t.fit(labels["validation"], progress=False)
    jax.block_until_ready(states)

  t0 = time.perf_counter()
  fit(k, 0)
  vmapped = time.perf_counter() - t0
  t0 = time.perf_counter()
  for s in range(k):
    fit(1, s)
  loop = time.perf_counter() - t0
  return vmapped, loop


def cnn(k: int, steps: int):
  import jax.numpy as jnp
  from bench_gpu import bench
  t0 = time.perf_counter()
  v = bench("resnet50", k, 8, 64, jnp.float32, steps, "vmap")
  vm = time.perf_counter() - t0
  t0 = time.perf_counter()
  lp = bench("resnet50", k, 8, 64, jnp.float32, steps, "loop")
  lo = time.perf_counter() - t0
  return vm, lo, v, lp


def main():
  ap = argparse.ArgumentParser()
  ap.add_argument("--k", type=int, default=8)
  ap.add_argument("--epochs", type=int, default=30)
  ap.add_argument("--steps", type=int, default=3)
  a = ap.parse_args()
  print(f"$ python benchmarks/bench_seeds.py {' '.join(sys.argv[1:])}")
  print(f"{jax.devices()[0].device_kind} x{jax.device_count()}, {os.cpu_count()} CPU cores, "
        f"jax {jax.__version__}, K={a.k}\n")
  vm, lo = heads(a.k, a.epochs)
  print("| workload | K vmapped (s) | loop of K solo (s) | loop / vmapped |")
  print("|---|---|---|---|")
  print(f"| fusion heads, {a.epochs} epochs, compile included | {vm:.1f} | {lo:.1f} | "
        f"{lo / vm:.2f}x |", flush=True)
  vm, lo, v, lp = cnn(a.k, a.steps)
  print(f"| ResNet50 fine-tune, compile + {3 + a.steps} steps | {vm:.1f} | {lo:.1f} | "
        f"{lo / vm:.2f}x |")
  print(f"| ResNet50 fine-tune, steady step only | {v['step_ms'] / 1e3:.2f} | "
        f"{lp['step_ms'] / 1e3:.2f} | {lp['step_ms'] / v['step_ms']:.2f}x |")


if __name__ == "__main__":
  main()
