"""Run by tests/test_mesh.py in a subprocess with 8 forced host devices.

Trains the same K-seed problem on several ('seed', 'data') meshes and prints
JSON: max |difference| to the 1x1 mesh, and the shardings seen.
"""

import json
import os
import sys

os.environ["XLA_FLAGS"] = os.environ.get("XLA_FLAGS", "") + \
    " --xla_force_host_platform_device_count=8"
sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import jax  # noqa: E402
import numpy as np  # noqa: E402

from m6jax import train  # noqa: E402
from tests.conftest import tiny_config  # noqa: E402


def problem(mesh, seeds=8):
  rng = np.random.default_rng(0)
  n, c = 64, 3
  labels = {s: rng.integers(0, c, n).astype(np.int32) for s in ("train", "validation", "test")}
  feats = {s: {"image": rng.normal(size=(n, 6)).astype(np.float32) + labels[s][:, None],
               "text": rng.normal(size=(n, 5)).astype(np.float32)} for s in labels}
  cfg = tiny_config("unused", "unused")
  cfg.seeds, cfg.train.epochs, cfg.train.batch_size = seeds, 3, 16
  cfg.model.hidden = 8
  cfg.mesh.seed, cfg.mesh.data = mesh
  return train.FrozenTrainer(cfg, c, feats, labels), labels


def finetune(mesh, catalogue, tfds):
  from m6jax.data import tfds_builder
  from m6jax.models import towers
  cfg = tiny_config(catalogue, tfds, **{"train.mode": "finetune", "model.fusion": "image",
                                         "seeds": 4, "train.epochs": 1})
  cfg.mesh.seed, cfg.mesh.data = mesh
  builder, _ = tfds_builder.prepare(cfg.data)
  tower = towers.image_tower("tiny", "none", cfg.data.image_size)
  t = train.FinetuneTrainer(cfg, 3, builder, image_tower=tower)
  s = t.init_states()
  s, _ = t.run_epoch(s, 0)
  return t, s


def main():
  out = {"devices": jax.device_count(), "frozen": {}, "finetune": {}}
  ref = None
  for mesh in ((1, 1), (4, 2), (8, 1), (2, 4)):
    trainer, labels = problem(mesh)
    states, _ = trainer.fit(labels["validation"], progress=False)
    probs = np.asarray(trainer.predict(states.best_params, None, "test"))
    leaf = jax.tree.leaves(states.params)[0]
    rec = {"state_spec": str(leaf.sharding.spec), "mesh": dict(trainer.mesh.shape),
           "state_devices": len(leaf.sharding.device_set)}
    if ref is None:
      ref = (probs, jax.tree.map(np.asarray, states.params))
    rec["max_diff_probs"] = float(np.abs(probs - ref[0]).max())
    rec["max_diff_params"] = max(float(np.abs(np.asarray(a) - b).max())
                                 for a, b in zip(jax.tree.leaves(states.params),
                                                 jax.tree.leaves(ref[1])))
    out["frozen"][f"{mesh[0]}x{mesh[1]}"] = rec
  if len(sys.argv) > 2:
    ref = None
    for mesh in ((1, 1), (2, 4), (4, 2)):
      t, s = finetune(mesh, sys.argv[1], sys.argv[2])
      leaf = jax.tree.leaves(s.params)[0]
      p = jax.tree.map(np.asarray, s.params)
      ref = ref or p
      out["finetune"][f"{mesh[0]}x{mesh[1]}"] = {
          "state_spec": str(leaf.sharding.spec),
          "batch_spec": str(t.train_batch_sharding.spec),
          "max_diff_params": max(float(np.abs(a - b).max())
                                 for a, b in zip(jax.tree.leaves(p), jax.tree.leaves(ref)))}
  print("RESULT " + json.dumps(out))


if __name__ == "__main__":
  main()
