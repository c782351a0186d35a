"""One JAX process of tests/test_feature_store.py's 2-process embedding test.

  python -m tests.embed_worker CATALOGUE TFDS_DIR STORE OUT_PREFIX

Embeds the tiny catalogue's photos with the smoke config's random tower through
the feature store at STORE (m6jax.features.embed.image_embeddings: this
process's share of the misses, then every row read back), saves the features
to OUT_PREFIX<process>.npz and prints `RESULT {json}` with how many rows this
process embedded and over how many local devices its batches were split
(0: one device).
"""

import json
import sys

import jax
import numpy as np

from m6jax import mesh as mesh_lib
from m6jax.data import tfds_builder
from m6jax.features import embed
from tests.conftest import tiny_config

SPLITS = ("train", "validation", "test")


def main():
  catalogue, tfds_dir, store, out = sys.argv[1:5]
  cfg = tiny_config(catalogue, tfds_dir)
  mesh_lib.initialize_distributed(cfg.mesh)
  builder, _ = tfds_builder.prepare(cfg.data)   # built by the test before
  rows, inner = [], embed.embed_image_batches

  def counted(*a, **kw):
    x = inner(*a, **kw)
    rows.append(len(x))
    return x

  spread, inner_spread = [], embed.local_batch_sharding

  def recorded(batch_size):
    sharding = inner_spread(batch_size)
    spread.append(0 if sharding is None else len(sharding.device_set))
    return sharding

  # This process only: module attributes, looked up at call time.
  embed.embed_image_batches, embed.local_batch_sharding = counted, recorded
  feats = embed.image_embeddings(cfg, builder, SPLITS, store, seed=cfg.seed)
  np.savez(f"{out}{jax.process_index()}.npz", **feats)
  print("RESULT " + json.dumps({"process": jax.process_index(),
                                "processes": jax.process_count(), "embedded": sum(rows),
                                "spread": spread}),
        flush=True)


if __name__ == "__main__":
  main()
