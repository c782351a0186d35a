"""Feature store shared across workdirs: a few shard files per tower, by content key.

Layout under the root (`config.train.cache_dir` when set, else
$M6JAX_FEATURE_CACHE, else `<m6jax cache>/features`, see weights.cache_dir):

  <tower>-<digest>/tower.json                 what the digest stands for (tower name,
                                              weights fingerprint, preprocessing, version)
  <tower>-<digest>/shard-<ns>-<uuid>.m6s      rows of many products: keys, rows, per-row
                                              checksums (m6jax.features.store_format)
  <tower>-<digest>/<ab>/<content hash>.npy    legacy one-file-per-product entries (before
                                              FEATURES_VERSION 2): never read; `list`
                                              shows them, `clear` removes them

The key is the sha1 of what the tower reads for a product (JPEG bytes, UTF-8
text): another experiment on the same catalogue finds every product, a changed
product misses only itself. Each put writes ONE new shard (temporary name, then
rename): concurrent writers (runs, threads, the processes of a multi-host run,
which must share the filesystem) never collide; readers see only whole shards.
Past MAX_SHARDS shards a writer merges the smallest (tiered) and deletes them; a
reader that finds a shard gone lists again. Of a key in several shards the
newest copy wins. An unreadable shard or a row failing its checksum is a miss
(recomputed by the caller; one warning per lookup). A hit refreshes its shard's
mtime, for `clear --older-than`.

  python -m m6jax.features.cache list  [--dir DIR]
  python -m m6jax.features.cache clear [--dir DIR] [--tower NAME] [--older-than 7d]
"""

from __future__ import annotations

import argparse
import contextlib
import hashlib
import json
import logging
import os
import pathlib
import re
import shutil
import time
import uuid
from typing import Iterable

import numpy as np

from m6jax import files
from m6jax.features import store_format as fmt
from m6jax.models.weights import sources as weights_lib

log = logging.getLogger(__name__)

ENV = "M6JAX_FEATURE_CACHE"
_META = "tower.json"
EXT = ".m6s"
MAX_SHARDS = 16        # a put that leaves more shards than this merges the smallest
_LOCK = ".compact.lock"
_STALE_LOCK_S = 600    # a compaction lock older than this was left by a killed writer


def default_root() -> pathlib.Path:
  """$M6JAX_FEATURE_CACHE, else <m6jax cache ($M6JAX_CACHE or ~/.cache/m6jax)>/features."""
  env = os.environ.get(ENV)
  return pathlib.Path(env).expanduser() if env else weights_lib.cache_dir() / "features"


def content_key(data: bytes | str) -> str:
  """Product content (image bytes or text) -> sha1 hex digest."""
  if isinstance(data, str):
    data = data.encode("utf-8")
  return hashlib.sha1(data).hexdigest()


def content_keys(items: Iterable[bytes | str]) -> np.ndarray:
  """Product contents -> (N,) 'S20' raw sha1 digests (the store's key form)."""
  digests = b"".join(hashlib.sha1(x.encode("utf-8") if isinstance(x, str) else x).digest()
                     for x in items)
  return np.frombuffer(digests, f"S{fmt.KEY}")



class FeatureCache:
  """Features of one tower configuration, by product content key.

  root: store root ('' or None: default_root()); tower: tower name (readable
  part of the folder name); spec: JSON-able dict of everything else the
  features depend on (weights fingerprint, preprocessing, dtype, version).
  Keys: sha1 hex strings or an (N,) 'S20' array of raw digests (key_bytes).
  """

  def __init__(self, root, tower: str, spec: dict, max_shards: int = MAX_SHARDS):
    self.root = pathlib.Path(root).expanduser() if root else default_root()
    self.spec = dict(spec, tower=tower)
    blob = json.dumps(self.spec, sort_keys=True, default=str)
    safe = re.sub(r"[^A-Za-z0-9_.-]", "_", tower)
    self.dir = self.root / f"{safe}-{hashlib.sha1(blob.encode()).hexdigest()[:16]}"
    self.max_shards = max_shards
    self._indexes = {}    # shard file name -> fmt.Index, or the reason it is unreadable
    self._merged = None   # (shard paths, sorted keys, shard number, row) of the last listing

  # --- reading ---------------------------------------------------------------

  def shards(self) -> list[pathlib.Path]:
    """The shard files, newest first."""
    try:
      names = [n for n in os.listdir(self.dir) if n.startswith("shard-") and n.endswith(EXT)]
    except FileNotFoundError:
      return []
    return [self.dir / n for n in sorted(names, reverse=True)]

  def _index(self) -> tuple[list, list]:
    """([fmt.Index] of the readable shards, newest first; [(path, why)] of the others).
    Indexes are kept by file name: a shard never changes once written."""
    good, bad, kept = [], [], {}
    for p in self.shards():
      got = self._indexes.get(p.name)
      if got is None:
        try:
          got = fmt.read_index(p)
        except FileNotFoundError:
          continue   # merged away since the listing
        except fmt.ShardError as e:
          got = str(e)
        except OSError as e:   # maybe passing: not remembered
          bad.append((p, str(e)))
          continue
      kept[p.name] = got
      if isinstance(got, fmt.Index):
        good.append(got)
      else:
        bad.append((p, got))
    self._indexes = kept
    return good, bad

  def _locate(self, kb: np.ndarray, good: list) -> tuple:
    """Keys (N,) 'S20' -> (shard number (N,), row (N,), found (N,) bool) in `good`;
    of a key in several shards, the newest copy."""
    names = tuple(ix.path for ix in good)
    if self._merged is None or self._merged[0] != names:
      self._merged = (names, *fmt.sorted_keys(good))
    _, keys, sid, row = self._merged
    if not len(keys):
      return np.zeros(len(kb), np.int32), np.zeros(len(kb), int), np.zeros(len(kb), bool)
    at = np.minimum(np.searchsorted(keys, kb), len(keys) - 1)
    return sid[at], row[at], keys[at] == kb

  def _fetch(self, kb: np.ndarray, deliver) -> np.ndarray:
    """Reads the stored rows of keys `kb` (N,) 'S20', calling deliver(index, positions
    (m,), values (m, *shape)) a chunk at a time; returns found (N,) bool."""
    found, problems, todo = np.zeros(len(kb), bool), [], np.arange(len(kb))
    for attempt in (0, 1):
      good, bad = self._index()
      problems += [f"{p}: {why}" for p, why in bad] if not attempt else []
      sid, row, hit = self._locate(kb[todo], good)
      todo, sid, row = todo[hit], sid[hit], row[hit]
      lost = []
      for s in np.unique(sid):
        ix, sel = good[s], sid == s
        pos = todo[sel]
        try:
          for which, values, n_bad in fmt.read_many(ix, row[sel]):
            deliver(ix, pos[which], values)
            found[pos[which]] = True
            if n_bad:
              problems.append(f"{ix.path}: {n_bad} row(s) not matching their checksum")
        except FileNotFoundError:
          lost.append(pos[~found[pos]])   # merged into a newer shard meanwhile: list again
          continue
        with contextlib.suppress(OSError):
          os.utime(ix.path)   # last use, for clear --older-than
      if not lost:
        break
      todo = np.concatenate(lost)
    if problems:
      log.warning("feature cache %s: %d unreadable shard(s)/row group(s) ignored, their rows "
                  "are recomputed: %s", self.dir, len(problems), "; ".join(problems[:3]))
    return found

  def lookup(self, keys, dtype=np.float32) -> tuple[np.ndarray, np.ndarray]:
    """Keys (N) -> (features (N, D) `dtype`, found (N,) bool); rows not found are 0.
    D is 0 when nothing is found. Holds the result and the shard indexes only."""
    kb = fmt.key_bytes(keys)
    out = []

    def deliver(ix, pos, values):
      if not out:
        if len(ix.shape) != 1:
          raise ValueError(f"{ix.path}: rows of shape {ix.shape}, lookup wants (D,) rows")
        out.append(np.zeros((len(kb), ix.shape[0]), dtype))
      elif ix.shape != out[0].shape[1:]:
        raise ValueError(f"{ix.path}: rows of shape {ix.shape}, other shards hold "
                         f"{out[0].shape[1:]}")
      out[0][pos] = values

    found = self._fetch(kb, deliver)
    return (out[0] if out else np.zeros((len(kb), 0), dtype)), found

  def get_many(self, keys: Iterable[str]) -> dict[str, np.ndarray]:
    """{key: array (stored dtype and shape)} for the keys present and readable; the
    rest are misses. For a few keys; lookup is the form for many."""
    keys = list(keys)
    out = {}

    def deliver(_ix, pos, values):
      out.update((keys[p], v) for p, v in zip(pos, values))

    self._fetch(fmt.key_bytes(keys), deliver)
    return out

  def missing(self, keys):
    """The keys that no readable shard lists (only indexes are read)."""
    kb = fmt.key_bytes(keys)
    _, _, hit = self._locate(kb, self._index()[0])
    if isinstance(keys, np.ndarray):
      return keys[~hit]
    return [k for k, h in zip(keys, hit) if not h]

  # --- writing ---------------------------------------------------------------

  def put_rows(self, keys, rows, dtype=np.float32) -> pathlib.Path | None:
    """Stores rows (N, ...) under keys (N) as `dtype` (None: as given) in one new shard
    (returned; None when N is 0); safe when other runs and processes write at once."""
    kb = fmt.key_bytes(keys)
    rows = np.asarray(rows) if dtype is None else np.asarray(rows, dtype)
    if rows.ndim < 1 or len(rows) != len(kb):
      raise ValueError(f"put_rows: {len(kb)} keys for rows of shape {rows.shape}")
    if not len(kb):
      return None
    _, first = np.unique(kb, return_index=True)
    if len(first) < len(kb):   # the same content twice in one put: once
      first.sort()
      kb, rows = kb[first], rows[first]
    path = self._new_shard(lambda f: fmt.write(f, rows.dtype, rows.shape[1:], [(kb, rows, None)]))
    if len(self.shards()) > self.max_shards or any(
        isinstance(v, str) for v in self._indexes.values()):   # also drops unreadable shards
      self.compact()
    return path

  def put_many(self, items: dict[str, np.ndarray], dtype=np.float32) -> None:
    """Stores {key: array} as `dtype` (None: as given): one shard per (dtype, shape)."""
    groups = {}
    for key, value in items.items():
      value = np.asarray(value) if dtype is None else np.asarray(value, dtype)
      groups.setdefault((value.dtype.str, value.shape), []).append((key, value))
    for group in groups.values():
      self.put_rows([k for k, _ in group], np.stack([v for _, v in group]), dtype=None)

  def _new_shard(self, write) -> pathlib.Path:
    """write(file) into a new shard file, renamed into place (tower.json first)."""
    path = self.dir / f"shard-{time.time_ns():020d}-{uuid.uuid4().hex[:12]}{EXT}"
    for attempt in (0, 1):
      try:
        self.dir.mkdir(parents=True, exist_ok=True)
        if not (self.dir / _META).exists():
          files.write_text(self.dir / _META,
                           json.dumps(self.spec, indent=2, sort_keys=True, default=str))
        files.atomic_write(path, write, binary=True)
        return path
      except FileNotFoundError:  # folder removed by a concurrent `clear`: once more
        if attempt:
          raise
    return path

  def compact(self, everything: bool = False) -> int:
    """Merges shards of one row format into one new shard (the smallest ones, so that
    MAX_SHARDS // 2 are left, or `everything`), keeping each key once, then deletes
    them; unreadable shards are deleted. Returns how many shards were merged (0 when
    another writer holds the folder's compaction lock)."""
    lock = self.dir / _LOCK
    try:
      os.close(os.open(lock, os.O_CREAT | os.O_EXCL | os.O_WRONLY))
    except FileExistsError:
      with contextlib.suppress(FileNotFoundError):   # left by a killed writer: unlocked
        if time.time() - lock.stat().st_mtime > _STALE_LOCK_S:
          lock.unlink()
      return 0
    except FileNotFoundError:
      return 0
    try:
      return self._merge(everything)
    finally:
      lock.unlink(missing_ok=True)

  def _merge(self, everything: bool) -> int:
    good, bad = self._index()
    for p, why in bad:
      if p.exists() and p.name in self._indexes:   # a checksum failure, not an OS error
        log.warning("feature cache: deleting unreadable shard %s (%s)", p, why)
        p.unlink(missing_ok=True)
    groups = {}
    for ix in good:
      groups.setdefault((ix.dtype.str, ix.shape), []).append(ix)
    group = max(groups.values(), key=len, default=[])
    take = sorted(group, key=lambda ix: ix.rows)
    if not everything:
      take = take[:len(good) - self.max_shards // 2 + 1]
    if len(take) < 2:
      return 0
    take.sort(key=lambda ix: ix.path, reverse=True)   # newest first: its copy of a key stays
    chunks, kept = fmt.merged_rows(take)
    try:
      newest = max(os.stat(ix.path).st_mtime for ix in take)
      path = self._new_shard(lambda f: fmt.write(f, take[0].dtype, take[0].shape, chunks))
    except FileNotFoundError:   # a source removed by a concurrent clear or compaction
      return 0
    os.utime(path, (newest, newest))   # last use of the rows, not the merge time
    for ix in take:
      pathlib.Path(ix.path).unlink(missing_ok=True)
    log.info("feature cache %s: merged %d shards (%d rows) into %s", self.dir, len(take),
             kept, path.name)
    return len(take)


# --- inspection and cleanup -----------------------------------------------------

def _tower_dirs(root: pathlib.Path) -> list[pathlib.Path]:
  if not root.is_dir():
    return []
  return sorted(p for p in root.iterdir() if p.is_dir() and (
      (p / _META).exists() or any(p.glob(f"shard-*{EXT}")) or any(p.glob("??/*.npy"))))


def _entries(tower_dir: pathlib.Path) -> tuple[list, list]:
  """(shard files, legacy per-product files) of a tower folder."""
  return (list(tower_dir.glob(f"shard-*{EXT}")),
          [p for p in tower_dir.glob("??/*") if p.is_file()])


def summary(root=None) -> list[dict]:
  """One dict per tower folder: dir, tower, spec, entries (distinct keys in readable
  shards), shards, bad_shards, legacy (per-product files), bytes, newest (mtime)."""
  root = pathlib.Path(root).expanduser() if root else default_root()
  out = []
  for d in _tower_dirs(root):
    try:
      spec = json.loads((d / _META).read_text())
    except (OSError, ValueError):
      spec = {}
    shards, legacy = _entries(d)
    keys, bad, stats = [], 0, []
    for p in shards + legacy:
      try:
        stats.append(p.stat())
        if p.suffix == EXT:
          keys.append(fmt.read_index(p).keys)
      except FileNotFoundError:
        continue
      except (fmt.ShardError, OSError):
        bad += 1
    out.append(dict(dir=str(d), tower=spec.get("tower", d.name.rsplit("-", 1)[0]), spec=spec,
                    entries=len(np.unique(np.concatenate(keys))) if keys else 0,
                    shards=len(shards), bad_shards=bad,
                    legacy=sum(p.suffix == ".npy" for p in legacy),
                    bytes=sum(s.st_size for s in stats),
                    newest=max((s.st_mtime for s in stats), default=None)))
  return out


def clear(root=None, older_than: float | None = None, tower: str | None = None) -> dict:
  """Deletes shards and legacy entries (all, or unused for more than `older_than`
  seconds) of every tower or of the towers named `tower`; empty tower folders go too.

  Returns {'files': n, 'bytes': b} removed.
  """
  root = pathlib.Path(root).expanduser() if root else default_root()
  cutoff = None if older_than is None else time.time() - older_than
  removed = {"files": 0, "bytes": 0}
  for info in summary(root):
    if tower is not None and info["tower"] != tower:
      continue
    d = pathlib.Path(info["dir"])
    shards, legacy = _entries(d)
    for p in shards + legacy:
      try:
        st = p.stat()
        if cutoff is None or st.st_mtime < cutoff:
          p.unlink()
          removed["files"] += 1
          removed["bytes"] += st.st_size
      except FileNotFoundError:
        pass  # removed by a concurrent clear or merged by a writer
    if not any(_entries(d)):
      shutil.rmtree(d, ignore_errors=True)
  return removed


_UNITS = {"s": 1, "m": 60, "h": 3600, "d": 86400, "w": 7 * 86400}


def parse_age(text: str) -> float:
  """'90s', '30m', '12h', '7d', '2w' (or plain seconds) -> seconds."""
  m = re.fullmatch(r"\s*(\d+(?:\.\d*)?)\s*([smhdw]?)\s*", text)
  if not m:
    raise ValueError(f"bad age {text!r}: use e.g. 90s, 30m, 12h, 7d, 2w")
  return float(m.group(1)) * _UNITS[m.group(2) or "s"]


def _size(n: float) -> str:
  for unit in ("B", "KB", "MB", "GB"):
    if n < 1024 or unit == "GB":
      return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
    n /= 1024
  return f"{n:.1f} GB"


def main(argv=None) -> int:
  p = argparse.ArgumentParser(prog="python -m m6jax.features.cache",
                              description="Inspect or clear the shared feature cache.")
  sub = p.add_subparsers(dest="cmd", required=True)
  ls = sub.add_parser("list", help="towers, entries and size")
  cl = sub.add_parser("clear", help="delete entries")
  for q in (ls, cl):
    q.add_argument("--dir", default="", help=f"cache root (default: ${ENV} or "
                   "<$M6JAX_CACHE or ~/.cache/m6jax>/features)")
  cl.add_argument("--older-than", default=None, type=parse_age,
                  help="only entries unused for longer than this (e.g. 7d, 12h)")
  cl.add_argument("--tower", default=None, help="only this tower name (e.g. minilm)")
  args = p.parse_args(argv)
  root = pathlib.Path(args.dir).expanduser() if args.dir else default_root()
  if args.cmd == "list":
    rows = summary(root)
    print(f"feature cache: {root}")
    if not rows:
      print("(empty)")
    for r in rows:
      s = r["spec"]
      detail = ", ".join(f"{k}={s[k]}" for k in sorted(s) if k not in ("tower", "weights"))
      when = (time.strftime("%Y-%m-%d %H:%M", time.localtime(r["newest"]))
              if r["newest"] else "-")
      print(f"{r['tower']:<20} {r['entries']:>7} entries {_size(r['bytes']):>10}  "
            f"last used {when}  {pathlib.Path(r['dir']).name}")
      extra = "".join([f", {r['bad_shards']} unreadable" if r["bad_shards"] else "",
                       f", {r['legacy']} legacy per-product files (never read; clear "
                       "removes them)" if r["legacy"] else ""])
      print(f"  {r['shards']} shard(s){extra}")
      print(f"  weights={s.get('weights', '?')}  {detail}")
    total = sum(r["bytes"] for r in rows)
    print(f"total: {len(rows)} tower(s), {sum(r['entries'] for r in rows)} entries, "
          f"{_size(total)}")
  else:
    out = clear(root, args.older_than, args.tower)
    print(f"removed {out['files']} file(s), {_size(out['bytes'])} from {root}")
  return 0


if __name__ == "__main__":
  raise SystemExit(main())
