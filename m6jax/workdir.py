"""A run's workdir: an exclusive lock, and the fingerprint that guards resuming.

Lock: `<workdir>/.lock` held with `fcntl.flock` for the whole run, holding the
pid and host of its owner. The kernel drops the lock when the owner dies, so a
lock file left by a dead process is stale: the next run takes it over (and
says so). Re-entrant within one process.

Fingerprint: `<workdir>/checkpoints/fingerprint.json`, beside the checkpoint it
describes: the config minus cosmetic keys (COSMETIC: naming, tracking,
explanations, logging, where files live), the built dataset's id (a hash of the
catalogue and every data setting, m6jax.features.prepare.Setup.dataset_id) and the code
version: a hash of the package's source files (`code_version`), so a run resumed
after the code changed is refused unless the user declares the change harmless
(`train.allow_code_change=True`). A workdir whose checkpoint was trained with
another fingerprint is not resumed: `check` raises WorkdirMismatch naming the
keys that differ. `check` reads before it writes: a refused run leaves the
workdir as it was.
"""

from __future__ import annotations

import contextlib
import fcntl
import functools
import hashlib
import json
import logging
import os
import shutil
import socket
import time

from m6jax import files

log = logging.getLogger(__name__)

LOCK = ".lock"
FINGERPRINT = os.path.join("checkpoints", "fingerprint.json")
# Keys that do not change what is trained (prefixes of dotted config keys).
COSMETIC = ("name", "track", "explain", "feasibility", "feasibility_opts", "evals", "mesh",
            "train.log_every",
            "train.cache_dir", "train.xla_cache_dir", "train.checkpoint", "train.allow_code_change",
            "data.manual_dir",
            "data.tfds_dir", "data.csv", "data.images")
# Outputs a fresh start removes (`--restart`): the checkpoint and what describes it.
RUN_STATE = ("checkpoints", "bundle", "results.json", "metrics.jsonl", "tracking.json",
             "tracking_buffer.jsonl")

_held: dict[str, tuple[int, int]] = {}   # abs workdir -> (fd, depth)


class WorkdirError(RuntimeError):
  """The workdir cannot be used for this run."""


class WorkdirBusy(WorkdirError):
  """Another live process holds the workdir's lock."""


class WorkdirMismatch(WorkdirError):
  """The workdir's checkpoint was trained with another config, dataset or code version."""


def _pid_alive(pid: int) -> bool:
  try:
    os.kill(pid, 0)
  except ProcessLookupError:
    return False
  except PermissionError:
    return True
  return True


@contextlib.contextmanager
def lock(workdir: str):
  """Holds `<workdir>/.lock` exclusively; raises WorkdirBusy naming the owner's pid."""
  path = os.path.abspath(workdir)
  if path in _held:   # re-entrant: experiment.run -> train_and_evaluate
    fd, depth = _held[path]
    _held[path] = (fd, depth + 1)
    try:
      yield
    finally:
      _held[path] = (fd, _held[path][1] - 1)
    return
  os.makedirs(path, exist_ok=True)
  fd = os.open(os.path.join(path, LOCK), os.O_RDWR | os.O_CREAT, 0o644)
  try:
    fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
  except BlockingIOError:
    owner = os.pread(fd, 200, 0).decode(errors="replace").strip() or "unknown"
    os.close(fd)
    raise WorkdirBusy(f"workdir {path} is in use by another run ({owner}); wait for it to "
                      "finish or use another --workdir") from None
  old = os.pread(fd, 200, 0).decode(errors="replace").strip()
  if old:
    info = dict(x.split("=", 1) for x in old.split() if "=" in x)
    pid = int(info.get("pid", "0") or 0)
    dead = info.get("host") != socket.gethostname() or not _pid_alive(pid)
    log.warning("workdir %s: replacing the stale lock of %s%s", path, old,
                " (process not running)" if dead else "")
  os.ftruncate(fd, 0)
  os.pwrite(fd, f"pid={os.getpid()} host={socket.gethostname()} since={int(time.time())}\n"
            .encode(), 0)
  _held[path] = (fd, 1)
  try:
    yield
  finally:
    if _held[path][1] <= 1:
      del _held[path]
      os.ftruncate(fd, 0)   # an empty lock file is not stale
      os.close(fd)          # releases the flock
    else:
      _held[path] = (fd, _held[path][1] - 1)


def _flat(tree, prefix="") -> dict:
  out = {}
  for k, v in tree.items():
    if isinstance(v, dict) and v:
      out.update(_flat(v, f"{prefix}{k}."))
    else:
      out[f"{prefix}{k}"] = v
  return out


def _cosmetic(key: str) -> bool:
  return any(key == c or key.startswith(c + ".") for c in COSMETIC)


@functools.cache
def code_version(package_dir: str = os.path.dirname(os.path.abspath(__file__))) -> str:
  """'src-<16 hex>': sha256 over every `*.py` under the package (relative path and
  content, sorted by path). Computed once per process: what this process runs."""
  h = hashlib.sha256()
  for root, dirs, names in os.walk(package_dir):
    dirs[:] = sorted(d for d in dirs if d != "__pycache__" and not d.startswith("."))
    for name in sorted(n for n in names if n.endswith(".py")):
      path = os.path.join(root, name)
      rel = os.path.relpath(path, package_dir).replace(os.sep, "/")
      with open(path, "rb") as f:
        data = f.read()
      h.update(f"{rel}\0{len(data)}\0".encode())
      h.update(data)
  return "src-" + h.hexdigest()[:16]


def fingerprint(cfg, dataset_id: str | None = None) -> dict:
  """{'config': {dotted key: value} minus COSMETIC, 'dataset': id, 'code': code_version()}."""
  flat = _flat(json.loads(json.dumps(cfg.to_dict(), default=str)))
  return {"config": {k: v for k, v in sorted(flat.items()) if not _cosmetic(k)},
          "dataset": dataset_id, "code": code_version()}


def differences(old: dict, new: dict) -> list[str]:
  """'key: old -> new' for every differing config key, the dataset and the code version."""
  out = []
  oc, nc = old.get("config", {}), new.get("config", {})
  for k in sorted(set(oc) | set(nc)):
    if oc.get(k, "<absent>") != nc.get(k, "<absent>"):
      out.append(f"{k}: {oc.get(k, '<absent>')!r} -> {nc.get(k, '<absent>')!r}")
  for k in ("dataset", "code"):
    if None not in (old.get(k), new.get(k)) and old.get(k) != new.get(k):
      out.append(f"{k}: {old.get(k)!r} -> {new.get(k)!r}")
  return out


def _has_checkpoint(workdir: str) -> bool:
  latest = os.path.join(workdir, "checkpoints", "latest")
  return os.path.isdir(latest) and any(n.isdigit() for n in os.listdir(latest))


def check(workdir: str, fp: dict, record: bool = True, allow_code_change: bool = False) -> None:
  """Refuses to resume a checkpoint trained with another fingerprint; records `fp`.

  A `fp` without a dataset id (before the dataset is built) checks config and
  code only; record=False leaves the workdir untouched (a refusal always does).
  Without a checkpoint there is nothing to resume: `fp` is (re)written. With one
  and no fingerprint (a run from before fingerprints) it warns and records `fp`.
  allow_code_change: a differing code version alone is accepted with a warning
  (`train.allow_code_change`: the user declares the change harmless).
  """
  path = os.path.join(workdir, FINGERPRINT)
  old = None
  if os.path.isfile(path):
    try:
      with open(path) as f:
        old = json.load(f)
    except (OSError, ValueError) as e:
      raise WorkdirError(f"{path} is unreadable ({e}); delete {os.path.dirname(path)} "
                         "or rerun with --restart") from None
  if old is not None and _has_checkpoint(workdir):
    diff = differences(old, fp)
    code = [d for d in diff if d.startswith("code: ")]
    if code and allow_code_change and len(code) == len(diff):
      log.warning("workdir %s: resuming a checkpoint trained by other code (%s): "
                  "train.allow_code_change=True", workdir, code[0])
    elif diff:
      hint = (" (the m6jax source changed since the checkpoint was written; if the change "
              "cannot affect training, --config.train.allow_code_change=True resumes anyway)"
              if code else "")
      raise WorkdirMismatch(
          f"workdir {workdir} holds a checkpoint of a different run ({'; '.join(diff)}){hint}. "
          "Rerun with --restart to discard it and train from scratch, or use a new --workdir.")
  elif old is None and _has_checkpoint(workdir) and record:
    log.warning("workdir %s: checkpoint without a fingerprint (an older run); resuming it "
                "unchecked", workdir)
  if record and old != fp:
    os.makedirs(os.path.dirname(path), exist_ok=True)
    files.write_json(path, fp)


def clear(workdir: str) -> None:
  """A fresh start in `workdir`: removes the checkpoint and the outputs describing it."""
  for name in RUN_STATE:
    p = os.path.join(workdir, name)
    if os.path.isdir(p):
      shutil.rmtree(p)
    elif os.path.exists(p):
      os.remove(p)
  log.info("workdir %s: restarted (removed %s)", workdir, ", ".join(RUN_STATE))
