"""Checkpoints of a run: "latest" (for resume) and "best" (by a metric), kept apart.

Layout under a run's workdir::

  <workdir>/checkpoints/latest/<step>/{state,extra,meta,...}   last `keep_latest` steps
  <workdir>/checkpoints/best/<step>/{state,extra,meta,...}     top `keep_best` by metric

Two separate orbax CheckpointManagers in two directories: one manager with
`best_fn` deletes the newest step when it is not among the best, so "resume
from where we stopped" and "the best model so far" cannot share one.

Each step directory holds three orbax items:
  * `state`: the train-state pytree (orbax StandardSave, tensorstore/OCDBT).
    Typed PRNG key leaves (dtype `key<impl>`) are stored as their raw
    `jax.random.key_data` (uint32, with the impl's trailing key dims, e.g.
    (..., 2) for threefry2x32) and wrapped back with
    `jax.random.wrap_key_data` on restore, so the format does not depend on
    orbax's own (version-dependent) key support.
  * `extra`: a small JSON dict (JsonSave) -- epoch, history, data position.
    numpy scalars/arrays in it are converted to Python numbers/lists first.
  * `meta`: JSON `{"format": 1, "typed_keys": {<keypath>: <impl name>}}`, the
    leaves that were typed keys and their impl (e.g. "threefry2x32").

Atomicity: orbax writes a step into `<step>.orbax-checkpoint-tmp-<n>` and
renames it to `<step>` only after everything (and `commit_success.txt`) is
written; step discovery ignores the tmp names, so a killed process never
leaves a step that `restore_latest` would pick. Leftover tmp dirs are
removed when a `Checkpoints` is constructed.

Multi-host: every process must construct `Checkpoints(enabled=True)` and call
the same save/restore methods with the same steps -- orbax coordinates the
processes itself (each writes its own array shards; process 0 writes the
JSON/metadata and finalizes). Do NOT pass `enabled=is_primary`: that would
deadlock orbax's barriers / drop non-primary shards. `enabled=False` is for
runs with checkpointing switched off (or all processes at once); `is_primary`
is exposed for side effects outside orbax (logging, reports).
"""

from __future__ import annotations

import json
import logging
import math
import os
from typing import Any

import jax
import numpy as np
import orbax.checkpoint as ocp

log = logging.getLogger(__name__)

_FORMAT = 1
_METRIC = "metric"


def _quiet_orbax(record) -> bool:
  # orbax logs every async save step at INFO through absl; keep its warnings.
  return record.levelno >= logging.WARNING or "orbax" not in record.pathname


try:
  from absl import logging as absl_logging
  absl_logging.get_absl_handler().addFilter(_quiet_orbax)
except ImportError:  # absl is an orbax dependency; this is belt and braces
  pass
_ITEMS = ("state", "extra", "meta")


def _is_typed_key(x) -> bool:
  dt = getattr(x, "dtype", None)
  return dt is not None and jax.dtypes.issubdtype(dt, jax.dtypes.prng_key)


def _keys_to_data(tree) -> tuple[Any, dict[str, str]]:
  """Pytree -> (same pytree with typed keys as uint32 key_data, {keypath: impl})."""
  impls = {}

  def conv(path, x):
    if _is_typed_key(x):
      impls[jax.tree_util.keystr(path)] = str(jax.random.key_impl(x))
      return jax.random.key_data(x)
    return x

  return jax.tree_util.tree_map_with_path(conv, tree), impls


def _abstract_key_data(x):
  """Abstract typed-key leaf -> ShapeDtypeStruct of its key_data (sharding kept)."""
  sds = jax.eval_shape(jax.random.key_data, jax.ShapeDtypeStruct(x.shape, x.dtype))
  sharding = getattr(x, "sharding", None)
  if isinstance(sharding, jax.sharding.NamedSharding):
    # The trailing key-data dims are not split: replicate them.
    extra = sds.ndim - len(x.shape)
    spec = tuple(sharding.spec) + (None,) * (len(x.shape) - len(sharding.spec) + extra)
    sharding = jax.sharding.NamedSharding(sharding.mesh, jax.sharding.PartitionSpec(*spec))
  elif not isinstance(sharding, jax.sharding.SingleDeviceSharding):
    sharding = None
  return jax.ShapeDtypeStruct(sds.shape, sds.dtype, sharding=sharding)


def _target_to_data(target) -> tuple[Any, dict[str, Any]]:
  """Restore target -> (target with key leaves as key_data targets, {keypath: target leaf})."""
  key_leaves = {}

  def conv(path, x):
    if not _is_typed_key(x):
      return x
    key_leaves[jax.tree_util.keystr(path)] = x
    if isinstance(x, jax.Array):
      # Concrete key array: its key_data carries the matching sharding.
      return jax.random.key_data(x)
    return _abstract_key_data(x)

  return jax.tree_util.tree_map_with_path(conv, target), key_leaves


def _data_to_keys(restored, key_leaves: dict[str, Any], saved_impls: dict[str, str]):
  """Wraps the restored key_data leaves back into typed keys (impl from the target)."""

  def conv(path, x):
    p = jax.tree_util.keystr(path)
    if p not in key_leaves:
      return x
    t = key_leaves[p]
    impl = str(jax.random.key_impl(t)) if isinstance(t, jax.Array) else saved_impls.get(p)
    if impl is None:
      raise ValueError(f"checkpoint has no key impl for {p}; restore with a concrete key target")
    if p in saved_impls and saved_impls[p] != impl:
      raise ValueError(f"{p}: checkpoint keys are {saved_impls[p]}, target wants {impl}")
    return jax.random.wrap_key_data(x, impl=impl)

  return jax.tree_util.tree_map_with_path(conv, restored)


def _jsonable(extra: dict | None) -> dict:
  """`extra` -> a plain-JSON dict (numpy scalars/arrays become numbers/lists)."""

  def default(o):
    if isinstance(o, (np.generic, np.ndarray, jax.Array)):
      return np.asarray(o).tolist()
    raise TypeError(f"extra: {type(o).__name__} is not JSON serialisable")

  return json.loads(json.dumps(dict(extra or {}), default=default))


class Checkpoints:
  """The "latest" + "best" checkpoint managers of one run (see the module docstring).

  Use as a context manager, or call `close()` so pending async saves finish.
  """

  def __init__(self, workdir, keep_latest: int = 2, keep_best: int = 1,
               best_mode: str = "max", enabled: bool = True):
    """workdir: the run directory; checkpoints go to <workdir>/checkpoints/{latest,best}."""
    if best_mode not in ("max", "min"):
      raise ValueError(f"best_mode must be 'max' or 'min', got {best_mode!r}")
    if keep_latest < 1 or keep_best < 1:
      raise ValueError("keep_latest and keep_best must be >= 1")
    self.enabled = bool(enabled)
    self.is_primary = jax.process_index() == 0
    self.keep_latest, self.keep_best, self.best_mode = keep_latest, keep_best, best_mode
    # orbax needs absolute paths (relative workdirs are common on the CLI).
    self.directory = os.path.join(os.path.abspath(os.fspath(workdir)), "checkpoints")
    self._latest = self._best = None
    self._closed = False
    self._best_metrics: dict[int, float] = {}
    if not self.enabled:
      return  # no directories, no managers
    common = dict(create=True, cleanup_tmp_directories=True, enable_async_checkpointing=True)
    self._latest = ocp.CheckpointManager(
        os.path.join(self.directory, "latest"), item_names=_ITEMS,
        options=ocp.CheckpointManagerOptions(
            preservation_policy=ocp.checkpoint_managers.LatestN(n=keep_latest), **common))
    best_fn = lambda m: m[_METRIC]  # noqa: E731
    self._best = ocp.CheckpointManager(
        os.path.join(self.directory, "best"), item_names=_ITEMS,
        options=ocp.CheckpointManagerOptions(
            # best_fn/best_mode make best_step() rank by metric; BestN does the deleting.
            best_fn=best_fn, best_mode=best_mode,
            preservation_policy=ocp.checkpoint_managers.BestN(
                get_metric_fn=best_fn, reverse=(best_mode == "min"), n=keep_best,
                keep_checkpoints_without_metrics=False),
            **common))
    # Our own copy of the kept metrics: orbax reads them from disk, where an
    # in-flight async save is still under a tmp name.
    for s in self._best.all_steps():
      m = self._best.metrics(s)
      if m is not None and _METRIC in m:
        self._best_metrics[s] = float(m[_METRIC])

  def _on(self) -> bool:
    """False when disabled (callers return None); raises once closed."""
    if self._closed:
      raise RuntimeError("Checkpoints is closed")
    return self.enabled

  # -- saving ---------------------------------------------------------------

  def _save(self, mngr, step: int, state, extra, metrics=None) -> bool:
    step = int(step)
    if step in mngr.all_steps():
      log.warning("checkpoint step %d already in %s; not overwritten", step, mngr.directory)
      return False
    data, impls = _keys_to_data(state)
    return mngr.save(
        step, force=True, metrics=metrics,
        args=ocp.args.Composite(
            state=ocp.args.StandardSave(data),
            extra=ocp.args.JsonSave(_jsonable(extra)),
            meta=ocp.args.JsonSave({"format": _FORMAT, "typed_keys": impls})))

  def save_latest(self, step: int, state_pytree, extra: dict | None = None) -> bool | None:
    """Saves (state, extra) as `step` of "latest"; the oldest beyond keep_latest go.

    Returns True when a save was started (async: call wait()/close() to be sure
    it is on disk), False when the step already exists, None when disabled.
    """
    if not self._on():
      return None
    return self._save(self._latest, step, state_pytree, extra)

  def _better(self, a: float, b: float) -> bool:
    return a > b if self.best_mode == "max" else a < b

  def _kept(self, metrics: dict[int, float]) -> list[int]:
    """The steps orbax's BestN keeps (same stable sort, so ties resolve alike)."""
    order = sorted(sorted(metrics), key=metrics.get, reverse=(self.best_mode == "min"))
    return order[-self.keep_best:]

  def save_best(self, step: int, state_pytree, metric: float,
                extra: dict | None = None) -> bool | None:
    """Saves to "best" only if `metric` enters the top keep_best (strictly; NaN never).

    Returns True if saved, False if not good enough (or step exists), None when disabled.
    """
    if not self._on():
      return None
    metric = float(metric)
    if math.isnan(metric):
      return False
    if len(self._best_metrics) >= self.keep_best:
      worst = self._best_metrics[self._kept(self._best_metrics)[0]]
      if not self._better(metric, worst):
        return False  # skip the write instead of writing then deleting it
    saved = self._save(self._best, step, state_pytree, extra, metrics={_METRIC: metric})
    if saved:
      self._best_metrics[int(step)] = metric
      kept = set(self._kept(self._best_metrics))
      self._best_metrics = {s: m for s, m in self._best_metrics.items() if s in kept}
    return saved

  # -- querying / restoring -------------------------------------------------

  def latest_step(self) -> int | None:
    """Newest step in "latest" (including one still being written async), or None."""
    return self._latest.latest_step() if self._on() else None

  def best_step(self) -> int | None:
    """Step with the best metric in "best", or None."""
    return self._best.best_step() if self._on() else None

  def best_metric(self) -> float | None:
    """Metric of best_step(), or None."""
    s = self.best_step()
    return None if s is None else self._best_metrics.get(s)

  def _restore(self, mngr, step, target):
    if step is None:
      return None
    mngr.wait_until_finished()  # the step may still be in flight
    data_target, key_leaves = _target_to_data(target)
    # StandardRestore(target): shapes/dtypes/shardings (and the pytree classes,
    # e.g. flax.struct.dataclass) come from the target tree.
    r = mngr.restore(step, args=ocp.args.Composite(
        state=ocp.args.StandardRestore(data_target),
        extra=ocp.args.JsonRestore(),
        meta=ocp.args.JsonRestore()))
    meta = r.meta or {}
    state = _data_to_keys(r.state, key_leaves, meta.get("typed_keys", {}))
    return state, dict(r.extra or {})

  def restore_latest(self, target_pytree) -> tuple[Any, dict] | None:
    """target (arrays or ShapeDtypeStructs) -> (state like target, extra) of latest_step(), or None."""
    if not self._on():
      return None
    return self._restore(self._latest, self._latest.latest_step(), target_pytree)

  def restore_best(self, target_pytree) -> tuple[Any, dict] | None:
    """target -> (state like target, extra) of best_step(), or None."""
    if not self._on():
      return None
    return self._restore(self._best, self._best.best_step(), target_pytree)

  # -- lifecycle --------------------------------------------------------------

  def wait(self) -> None:
    """Blocks until pending async saves (and deletions) are on disk."""
    if self._closed:
      return
    for m in (self._latest, self._best):
      if m is not None:
        m.wait_until_finished()

  def close(self) -> None:
    """Finishes pending saves and releases orbax's threads; idempotent."""
    if self._closed:
      return
    for m in (self._latest, self._best):
      if m is not None:
        m.close()
    self._closed = True

  def __enter__(self) -> "Checkpoints":
    return self

  def __exit__(self, *exc) -> None:
    self.close()
