"""Run by tests/test_mesh.py as `python -m tests.mesh_check` in a subprocess with
8 forced host devices (XLA_FLAGS=--xla_force_host_platform_device_count=8 in its
environment: it must be set before jax starts).

Trains the same K-seed problem on several ('seed', 'data') meshes and prints
JSON: max |difference| to the 1x1 mesh, and the shardings seen.
"""

import json
import re
import sys

import jax
import jax.numpy as jnp
import numpy as np

from m6jax.data import tfds_builder
from m6jax.models import towers
from m6jax.train import trainer as trainer_lib
from m6jax.train.finetune import FinetuneTrainer
from tests.conftest import learnable_features, tiny_config


def problem(mesh, seeds=8):
  feats, labels = learnable_features(64, 3)
  cfg = tiny_config("unused", "unused")
  cfg.seeds, cfg.train.epochs, cfg.train.batch_size = seeds, 3, 16
  cfg.model.hidden = 8
  cfg.mesh.seed, cfg.mesh.data = mesh
  return trainer_lib.FrozenTrainer(cfg, 3, feats, labels), labels


def finetune(mesh, catalogue, tfds, **overrides):
  cfg = tiny_config(catalogue, tfds, **{"train.mode": "finetune", "model.fusion": "image",
                                         "seeds": 4, "train.epochs": 1, **overrides})
  cfg.mesh.seed, cfg.mesh.data = mesh
  builder, _ = tfds_builder.prepare(cfg.data)
  tower = towers.image_tower("tiny", "none", cfg.data.image_size)
  t = FinetuneTrainer(cfg, 3, builder, image_tower=tower)
  s = t.init_states()
  s, _ = t.run_epoch(s, 0)
  return t, s


def grouped_conv(t, states) -> bool:
  """Whether the trainer's step program has a grouped convolution (vmapped kernels)."""
  lead = (t.cfg.seeds,) if t.cfg.train.data_order == "per_seed" else ()
  b, n = t.batch_size, t.cfg.data.image_size

  def sds(shape, dtype):
    return jax.ShapeDtypeStruct(lead + shape, dtype, sharding=t.train_batch_sharding)

  batch = {"image": sds((b, n, n, 3), jnp.uint8), "label": sds((b,), jnp.int32),
           "mask": sds((b,), jnp.bool_)}
  text = t._step.lower(states, batch, t.keys).as_text()
  return any(int(g) > 1 for g in re.findall(r"feature_group_count = (\d+)", text))


def max_leaf_diff(tree, ref) -> float:
  """Largest |a - b| over the leaves of two trees of the same structure."""
  return max(float(np.abs(np.asarray(a) - np.asarray(b)).max())
             for a, b in zip(jax.tree.leaves(tree), jax.tree.leaves(ref)))


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
    rec["max_diff_params"] = max_leaf_diff(states.params, ref[1])
    out["frozen"][f"{mesh[0]}x{mesh[1]}"] = rec
  if len(sys.argv) > 2:
    ref = None
    for mesh in ((1, 1), (2, 4), (4, 2)):
      t, s = finetune(mesh, sys.argv[1], sys.argv[2], **{"train.replica_loop": "vmap"})
      leaf = jax.tree.leaves(s.params)[0]
      p = jax.tree.map(np.asarray, s.params)
      ref = ref or p
      out["finetune"][f"{mesh[0]}x{mesh[1]}"] = {
          "state_spec": str(leaf.sharding.spec),
          "batch_spec": str(t.train_batch_sharding.spec),
          "grouped_conv": grouped_conv(t, s),
          "max_diff_params": max_leaf_diff(p, ref)}
    # lax.map over the replicas each seed group holds (no grouped convolutions),
    # BatchNorm statistics updated: per-seed and shared data order.
    out["finetune_map"] = {}
    for order, meshes in (("per_seed", ((1, 1), (4, 2), (2, 4), (8, 1))),
                          ("shared", ((1, 1), (4, 2)))):
      ref = None
      for mesh in meshes:
        t, s = finetune(mesh, sys.argv[1], sys.argv[2], **{
            "seeds": 8, "train.replica_loop": "map", "train.bn": "update",
            "train.data_order": order})
        p = jax.tree.map(np.asarray, {"params": s.params, "stats": s.batch_stats})
        ref = ref or p
        leaf = jax.tree.leaves(s.params)[0]
        out["finetune_map"][f"{order}:{mesh[0]}x{mesh[1]}"] = {
            "state_spec": str(leaf.sharding.spec),
            "state_devices": len(leaf.sharding.device_set),
            "grouped_conv": grouped_conv(t, s),
            "max_diff_params": max_leaf_diff(p, ref)}
  print("RESULT " + json.dumps(out))


if __name__ == "__main__":
  main()
