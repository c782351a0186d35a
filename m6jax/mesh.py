"""The ('seed', 'data') device mesh and the shardings of states and batches.

Seed replicas are spread over the 'seed' axis; a batch is split over 'data';
parameters are replicated within a seed group. The same train step runs on
one device (a 1x1 mesh) and on many.
"""

from __future__ import annotations

import logging
import math
import os

import jax
import numpy as np
from jax.sharding import Mesh, NamedSharding
from jax.sharding import PartitionSpec as P

log = logging.getLogger(__name__)
AXES = ("seed", "data")


def initialize_distributed(mesh_cfg=None) -> None:
  """Starts multi-host JAX when asked (config or the usual environment).

  mesh_cfg.distributed: True forces it; False skips; None (default) starts it
  when JAX_COORDINATOR_ADDRESS is set (jax reads the process id/count from the
  environment or the cluster: SLURM, Cloud TPU, ...).
  """
  want = None if mesh_cfg is None else mesh_cfg.get("distributed")
  if want is False or (want is None and not os.environ.get("JAX_COORDINATOR_ADDRESS")):
    return
  if jax.distributed.is_initialized():
    return
  jax.distributed.initialize()
  log.info("process %d of %d, %d local / %d global devices", jax.process_index(),
           jax.process_count(), jax.local_device_count(), jax.device_count())


def mesh_shape(num_replicas: int, num_devices: int, seed: int = 0, data: int = 0
               ) -> tuple[int, int]:
  """(seed, data) sizes. 0 = inferred: as many seed groups as divide both the
  replica count and the device count, the rest of the devices on 'data'."""
  if seed and data:
    pass
  elif seed:
    data = num_devices // seed
  elif data:
    seed = num_devices // data
  else:
    seed = math.gcd(num_replicas, num_devices)
    data = num_devices // seed
  if seed * data != num_devices:
    raise ValueError(f"mesh {seed}x{data} does not use the {num_devices} devices")
  if num_replicas % seed:
    raise ValueError(f"{num_replicas} seed replicas do not split over a 'seed' axis of {seed}")
  return seed, data


def make_mesh(num_replicas: int, seed: int = 0, data: int = 0, devices=None) -> Mesh:
  """A ('seed', 'data') mesh over `devices` (default: all; with both sizes
  given, the first seed * data of them, e.g. 1x1 for a single-device run)."""
  devices = list(jax.devices() if devices is None else devices)
  if seed and data:
    if seed * data > len(devices):
      raise ValueError(f"mesh {seed}x{data} needs {seed * data} devices, "
                       f"{len(devices)} available")
    devices = devices[: seed * data]
  s, d = mesh_shape(num_replicas, len(devices), seed, data)
  return Mesh(np.asarray(devices).reshape(s, d), AXES)


def replica_sharding(mesh: Mesh) -> NamedSharding:
  """Leaves with a leading replica axis K (states, keys, per-replica outputs):
  split over 'seed', replicated over 'data'."""
  return NamedSharding(mesh, P("seed"))


def replicated_sharding(mesh: Mesh) -> NamedSharding:
  """Leaves every device holds whole (cached embeddings, labels)."""
  return NamedSharding(mesh, P())


def batch_sharding(mesh: Mesh, per_seed: bool) -> NamedSharding:
  """Batch leaves: (K, B, ...) per-seed -> P('seed', 'data'); shared (B, ...) -> P('data')."""
  return NamedSharding(mesh, P("seed", "data") if per_seed else P("data"))


def put_global(tree, sharding: NamedSharding):
  """Host arrays -> global jax arrays with `sharding`.

  Single process: a device_put. Multi-process: every process passes the same
  global array (the data pipeline is deterministic), and each keeps its part.
  """
  if jax.process_count() == 1:
    return jax.device_put(tree, sharding)
  return jax.tree.map(
      lambda x: jax.make_array_from_callback(np.shape(x), sharding, lambda idx: np.asarray(x)[idx]),
      tree)
