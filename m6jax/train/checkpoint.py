"""The checkpoint of a run: its latest steps, for resume AND for inference.

Layout under a run's workdir::

  <workdir>/checkpoints/latest/<step>/{state,extra,meta,...}   last `keep_latest` steps
  <workdir>/checkpoints/corrupt/<step>-<time>/                  unreadable steps moved aside

One orbax CheckpointManager. The train state carries each replica's own
best-validation parameters (m6jax.train.steps.TrainState.best_*), so the newest step
holds both what resume needs and what results.json scored and predict/explain
serve: saved, scored and served are the same parameters by construction.

Unreadable steps: `restore_latest` (resume) tries the newest step first and
falls back to the newest intact one with a warning (the bad steps are moved to
`corrupt/` before the next save); when no step can be read it raises
CheckpointError naming the folder to delete. Inference reads exactly the step
results.json and the bundle record as scored (`restore_step`): no fallback.

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

import contextlib
import json
import logging
import os
import re
import shutil
import time
from typing import Any

import jax
import numpy as np
import orbax.checkpoint as ocp
from absl import logging as absl_logging

from m6jax import files
from m6jax import mesh as mesh_lib

log = logging.getLogger(__name__)

_FORMAT = 1


def _quiet_orbax(record) -> bool:
  # orbax logs every async save step at INFO through absl; keep its warnings.
  return record.levelno >= logging.WARNING or "orbax" not in record.pathname


absl_logging.get_absl_handler().addFilter(_quiet_orbax)
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


def _describe(error: Exception, step_dir: str) -> str:
  """One line: the error, and the empty files of the step (a common cause)."""
  msg = str(error).strip().splitlines()
  out = f"{type(error).__name__}: {msg[0][:300] if msg else ''}"
  empty = sorted(os.path.relpath(os.path.join(d, f), step_dir)
                 for d, _, files in os.walk(step_dir) for f in files
                 if os.path.getsize(os.path.join(d, f)) == 0)
  return out + (f" (empty files: {', '.join(empty)})" if empty else "")


class CheckpointError(RuntimeError):
  """No step of a checkpoint can be read (or not the step that was asked for)."""


def state_step(states) -> int:
  """The step of a (replicated) train state: what save_latest names its checkpoint."""
  return int(mesh_lib.to_host(states.step)[0])


def _os_error(error: BaseException) -> tuple[int, str] | None:
  """(errno, path) of a disk-full error anywhere in `error`'s chain (orbax wraps
  tensorstore's, which only names them in the text), else None."""
  while error is not None:
    if isinstance(error, OSError) and error.errno in files.DISK_FULL:
      return error.errno, error.filename or ""
    m = re.search(r"os_error_code='?(\d+)", str(error))
    if m and int(m.group(1)) in files.DISK_FULL:
      path = re.findall(r'(?:Failed writing|file): "([^"]+)"', str(error))
      return int(m.group(1)), path[-1] if path else ""
    error = error.__cause__ or error.__context__
  return None


def directory(workdir) -> str:
  """<workdir>/checkpoints, absolute (orbax needs absolute paths)."""
  return os.path.join(os.path.abspath(os.fspath(workdir)), "checkpoints")


class Checkpoints:
  """The checkpoint manager of one run (see the module docstring).

  Use as a context manager, or call `close()` so pending async saves finish.
  read_only=True (inference) never creates, cleans up or moves anything.
  """

  def __init__(self, workdir, keep_latest: int = 2, enabled: bool = True,
               read_only: bool = False):
    """workdir: the run directory; steps go to <workdir>/checkpoints/latest."""
    if keep_latest < 1:
      raise ValueError("keep_latest must be >= 1")
    self.enabled = bool(enabled)
    self.read_only = bool(read_only)
    self.is_primary = mesh_lib.is_writer()
    self.keep_latest = keep_latest
    self.directory = directory(workdir)
    self._latest = None
    self._closed = False
    self._saving: int | None = None   # the step of the last save started
    self._bad: dict[int, str] = {}   # unreadable step -> error, moved aside before saving
    if not self.enabled:
      return  # no directories, no managers
    path = os.path.join(self.directory, "latest")
    if read_only and not os.path.isdir(path):
      self.enabled = False
      return
    if not read_only and self.is_primary and os.path.isdir(path):
      # Here, not by orbax: its cleanup runs in the background and is awaited only by a
      # save, so a run that only restores (or lists) would still see the tmp dirs.
      for name in os.listdir(path):
        if ".orbax-checkpoint-tmp" in name:
          shutil.rmtree(os.path.join(path, name), ignore_errors=True)
    self._latest = ocp.CheckpointManager(
        path, item_names=_ITEMS,
        options=ocp.CheckpointManagerOptions(
            preservation_policy=ocp.checkpoint_managers.LatestN(n=keep_latest),
            create=not read_only, read_only=read_only,
            enable_async_checkpointing=True))

  def _on(self) -> bool:
    """False when disabled (callers return None); raises once closed."""
    if self._closed:
      raise RuntimeError("Checkpoints is closed")
    return self.enabled

  # -- saving ---------------------------------------------------------------

  def save_latest(self, step: int, state_pytree, extra: dict | None = None) -> bool | None:
    """Saves (state, extra) as `step`; the oldest beyond keep_latest go.

    Returns True when a save was started (async: call wait()/close() to be sure
    it is on disk), False when the step already exists, None when disabled.
    """
    if not self._on():
      return None
    if self.read_only:
      raise RuntimeError(f"{self.directory} was opened read-only")
    step = int(step)
    mngr = self._latest
    # The previous async save's failure surfaces in whichever orbax call comes next
    # (waiting, listing steps, saving): all of them report a full disk in one line.
    with self._write_errors():
      self._move_bad_steps()
      if step in mngr.all_steps():
        log.warning("checkpoint step %d already in %s; not overwritten", step, mngr.directory)
        return False
      data, impls = _keys_to_data(state_pytree)
      started = mngr.save(
          step, force=True,
          args=ocp.args.Composite(
              state=ocp.args.StandardSave(data),
              extra=ocp.args.JsonSave(_jsonable(extra)),
              meta=ocp.args.JsonSave({"format": _FORMAT, "typed_keys": impls})))
    self._saving = step
    return started

  @contextlib.contextmanager
  def _write_errors(self):
    """A save that failed for lack of space -> files.WriteError: one line naming the
    file, the OS error and the step a rerun resumes from (orbax renames a step into
    place only once complete, so the ones before stay intact)."""
    try:
      yield
    except Exception as e:  # noqa: BLE001 - orbax/tensorstore raise many kinds
      found = _os_error(e)
      if found is None:
        raise
      number, path = found
      m = re.search(r"/(\d+)\.orbax-checkpoint-tmp", path)
      step = int(m.group(1)) if m else self._saving
      # From the folder, not orbax: a manager whose save failed may raise it again.
      folder = os.fspath(self._latest.directory)
      intact = [int(d) for d in os.listdir(folder) if d.isdigit() and int(d) != step]
      raise files.WriteError(
          path or os.path.join(self._latest.directory, str(step)), number,
          f"checkpoint step {step} not saved; "
          + (f"step {max(intact)} in {self._latest.directory} is intact: free space and "
             "rerun the same command to resume from it" if intact else
             "no earlier step: free space and rerun")) from None

  def _move_bad_steps(self) -> None:
    """Moves the steps restore_latest could not read to checkpoints/corrupt/."""
    if not self._bad:
      return
    self._latest.wait_until_finished()
    if self.is_primary:
      for step in sorted(self._bad):
        src = os.path.join(self._latest.directory, str(step))
        if os.path.isdir(src):
          dst = os.path.join(self.directory, "corrupt", f"{step}-{int(time.time())}")
          os.makedirs(os.path.dirname(dst), exist_ok=True)
          shutil.move(src, dst)
          log.warning("moved unreadable checkpoint step %d to %s", step, dst)
    self._bad = {}
    self._latest.reload()

  # -- querying / restoring -------------------------------------------------

  def latest_step(self) -> int | None:
    """Newest step (including one still being written async), or None."""
    if not self._on():
      return None
    with self._write_errors():   # a failed async save may surface here
      return self._latest.latest_step()

  def all_steps(self) -> list[int]:
    """Every kept step, oldest first."""
    if not self._on():
      return []
    with self._write_errors():
      return sorted(self._latest.all_steps())

  def _restore(self, step, target):
    data_target, key_leaves = _target_to_data(target)
    # StandardRestore(target): shapes/dtypes/shardings (and the pytree classes,
    # e.g. flax.struct.dataclass) come from the target tree.
    r = self._latest.restore(step, args=ocp.args.Composite(
        state=ocp.args.StandardRestore(data_target),
        extra=ocp.args.JsonRestore(),
        meta=ocp.args.JsonRestore()))
    meta = r.meta or {}
    if not isinstance(meta, dict) or meta.get("format") != _FORMAT:
      raise ValueError(f"meta: expected format {_FORMAT}, got {meta!r}")
    state = _data_to_keys(r.state, key_leaves, meta.get("typed_keys", {}))
    return state, dict(r.extra or {})

  def restore_latest(self, target_pytree) -> tuple[Any, dict] | None:
    """target (arrays or ShapeDtypeStructs) -> (state like target, extra), or None.

    Reads the newest step; when it cannot be read (truncated or empty files),
    warns and falls back to the newest intact step. Raises CheckpointError,
    naming the folder to delete, when no step can be read.
    """
    if not self._on():
      return None
    self._latest.wait_until_finished()  # a step may still be in flight
    steps = sorted(self._latest.all_steps(), reverse=True)
    errors = {}
    for step in steps:
      try:
        out = self._restore(step, target_pytree)
      except Exception as e:  # noqa: BLE001 - orbax/tensorstore raise many kinds
        errors[step] = _describe(e, os.path.join(self._latest.directory, str(step)))
        log.warning("checkpoint step %d in %s cannot be read (%s); trying an older step",
                    step, self._latest.directory, errors[step])
        continue
      if errors:
        log.warning("resumed from checkpoint step %d: newer step(s) %s unreadable%s", step,
                    sorted(errors), "" if self.read_only else " (moved to corrupt/ on save)")
        if not self.read_only:
          self._bad.update(errors)
      return out
    if not steps:
      return None
    detail = "; ".join(f"step {s}: {e}" for s, e in errors.items())
    raise CheckpointError(f"no readable checkpoint in {self._latest.directory} ({detail}). "
                          f"Delete {self.directory} to train from scratch "
                          "(or run with --restart).")

  def restore_step(self, step: int, target_pytree) -> tuple[Any, dict]:
    """Exactly `step` (the one results.json scored) -> (state like target, extra).

    No fallback: raises CheckpointError naming the wanted step and the steps
    present when it is missing or cannot be read.
    """
    if not self._on():
      raise CheckpointError(f"no checkpoint in {self.directory}: step {step} was scored")
    self._latest.wait_until_finished()
    steps = sorted(self._latest.all_steps())
    if int(step) not in steps:
      raise CheckpointError(
          f"the run scored checkpoint step {step}, but {self._latest.directory} holds "
          f"step(s) {steps or 'none'} (newest {steps[-1] if steps else None}): the checkpoint "
          "moved on or was lost after scoring; rerun the experiment to rescore it")
    try:
      return self._restore(int(step), target_pytree)
    except Exception as e:  # noqa: BLE001 - orbax/tensorstore raise many kinds
      raise CheckpointError(
          f"the run scored checkpoint step {step}, which cannot be read ("
          f"{_describe(e, os.path.join(self._latest.directory, str(step)))}); other step(s) "
          f"{[s for s in steps if s != step] or 'none'} are not what was scored: rerun the "
          "experiment (--restart) to train and score anew") from None

  # -- lifecycle --------------------------------------------------------------

  def wait(self) -> None:
    """Blocks until pending async saves (and deletions) are on disk."""
    if self._closed or self._latest is None:
      return
    with self._write_errors():
      self._latest.wait_until_finished()

  def close(self) -> None:
    """Finishes pending saves and releases orbax's threads; idempotent."""
    if self._closed:
      return
    self._closed = True
    if self._latest is not None:
      with self._write_errors():
        self._latest.close()

  def __enter__(self) -> "Checkpoints":
    return self

  def __exit__(self, exc_type, *exc) -> None:
    if exc_type is None:
      self.close()
      return
    try:   # already failing: the first error is the one to report
      self.close()
    except Exception as e:  # noqa: BLE001
      log.warning("closing %s after an error: %s", self.directory, e)
