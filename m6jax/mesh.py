"""The ('seed', 'data') device mesh and the shardings of states and batches.

Seed replicas are spread over the 'seed' axis; a batch is split over 'data';
parameters are replicated within a seed group. The same train step runs on
one device (a 1x1 mesh) and on many.
"""

from __future__ import annotations

import itertools
import logging
import math
import os

import jax
import numpy as np
from jax.experimental import multihost_utils
from jax.sharding import Mesh, NamedSharding
from jax.sharding import PartitionSpec as P

log = logging.getLogger(__name__)
AXES = ("seed", "data")
REPLICA_LOOPS = ("auto", "vmap", "map")
_BARRIERS = itertools.count()


def is_writer() -> bool:
  """Whether this process writes the run's outputs (files, plots, tracking): process 0.

  Every process computes the same results; one writes them, so a shared workdir
  gets one config.json / results.json / MLflow run, not one per host.
  """
  return jax.process_index() == 0


def barrier(name: str, timeout_s: int = 3600) -> None:
  """Waits until every process reaches this point (no-op with one process).

  The coordination service's barrier, not a device collective: CPU (gloo)
  collectives give up when a peer is more than 30 s late to a new communicator,
  which one process doing the writing (MLflow start, plots) easily is.
  """
  if jax.process_count() == 1:
    return
  # orbax's public barrier: the distributed client's wait_at_barrier (jax has no
  # public accessor of the client). Only multi-process runs load it here.
  from orbax.checkpoint import multihost
  # Every process passes the same sequence of barriers, so the counter agrees.
  multihost.get_barrier_sync_fn()(key=f"m6jax:{name}:{next(_BARRIERS)}",
                                  timeout_ms=timeout_s * 1000)


def resolve_replica_loop(choice: str, backend: str | None = None) -> str:
  """train.replica_loop -> 'vmap' or 'map'.

  'auto' picks `vmap` on CPU (one batched program; grouped convolutions are not
  slower there) and `lax.map` on GPU/TPU, where vmapped CNN parameters become
  grouped convolutions that run ~3.4x below dense speed (benchmarks/bench_gpu.md).
  """
  if choice not in REPLICA_LOOPS:
    raise ValueError(f"train.replica_loop={choice!r}: expected one of {REPLICA_LOOPS}")
  if choice != "auto":
    return choice
  return "vmap" if (backend or jax.default_backend()) == "cpu" else "map"


def initialize_distributed(mesh_cfg=None) -> None:
  """Starts multi-host JAX when asked (config or the usual environment).

  mesh_cfg.distributed: True forces it; False skips; None (default) starts it
  when JAX_COORDINATOR_ADDRESS is set. The process count and this process's id
  come from JAX_NUM_PROCESSES / JAX_PROCESS_ID when set (e.g. several processes
  on one machine, tests/test_multihost.py), else jax detects them from the
  cluster (SLURM, Cloud TPU, ...). CPU devices talk over gloo collectives.
  """
  want = None if mesh_cfg is None else mesh_cfg.get("distributed")
  if want is False or (want is None and not os.environ.get("JAX_COORDINATOR_ADDRESS")):
    return
  if jax.distributed.is_initialized():
    return
  env = {k: int(os.environ[v]) for k, v in (("num_processes", "JAX_NUM_PROCESSES"),
                                            ("process_id", "JAX_PROCESS_ID")) if v in os.environ}
  jax.config.update("jax_cpu_collectives_implementation", "gloo")
  jax.distributed.initialize(**env)
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
  barrier("make_mesh")   # programs on this mesh run collectives: start them together
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

  def put(x):
    if isinstance(x, jax.Array) and jax.dtypes.issubdtype(x.dtype, jax.dtypes.prng_key):
      # Typed keys have no numpy form: move their raw data, re-wrap on device.
      return jax.random.wrap_key_data(put(jax.random.key_data(x)), impl=jax.random.key_impl(x))
    host = np.asarray(x)
    return jax.make_array_from_callback(host.shape, sharding, lambda idx: host[idx])

  return jax.tree.map(put, tree)


def to_host(x) -> np.ndarray:
  """A jax array -> numpy, also one whose shards live in several processes
  (gathered: a collective, so every process must call it)."""
  if isinstance(x, jax.Array) and not (x.is_fully_addressable or x.is_fully_replicated):
    return np.asarray(multihost_utils.process_allgather(x, tiled=True))
  return np.asarray(x)
