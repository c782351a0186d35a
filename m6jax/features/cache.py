"""Feature cache shared across workdirs: one file per (tower, product).

Layout under the root (`config.train.cache_dir` when set, else
$M6JAX_FEATURE_CACHE, else `<m6jax cache>/features`, see weights.cache_dir):

  <tower>-<digest>/tower.json                 what the digest stands for (tower name,
                                              weights fingerprint, preprocessing)
  <tower>-<digest>/<ab>/<content hash>.npy    float32 (D,) features of one product, then
                                              a checksum trailer (CHECKSUM_MAGIC + the
                                              sha256 of the .npy bytes before it)

The content hash is the sha1 of what the tower reads for a product (the stored
JPEG bytes, the UTF-8 text), so another experiment on the same catalogue finds
every product, and a changed product misses only itself. Each entry is written
to a temporary file and renamed into place, so runs writing the same entry at
once never leave a torn file. An entry that does not match its checksum
(truncated, corrupted, or written before checksums) counts as a miss: it is
recomputed and rewritten, with one warning per lookup naming how many. A hit
refreshes the entry's mtime, so `clear --older-than` removes what was not used.

  python -m m6jax.features.cache list  [--dir DIR]
  python -m m6jax.features.cache clear [--dir DIR] [--tower NAME] [--older-than 7d]
"""

from __future__ import annotations

import argparse
import hashlib
import io
import json
import logging
import os
import pathlib
import re
import shutil
import time
from typing import Iterable

import numpy as np

from m6jax import files
from m6jax.models.weights import sources as weights_lib

log = logging.getLogger(__name__)

ENV = "M6JAX_FEATURE_CACHE"
_META = "tower.json"
CHECKSUM_MAGIC = b"M6SUM256"   # 8 bytes, then the 32-byte sha256 of the .npy bytes before it
_TRAILER = len(CHECKSUM_MAGIC) + 32


def encode_entry(value: np.ndarray) -> bytes:
  """An array -> .npy bytes followed by the checksum trailer."""
  buf = io.BytesIO()
  np.save(buf, value, allow_pickle=False)
  data = buf.getvalue()
  return data + CHECKSUM_MAGIC + hashlib.sha256(data).digest()


def decode_entry(blob: bytes) -> np.ndarray:
  """encode_entry's bytes -> the array; ValueError when the checksum does not match."""
  data, magic, digest = blob[:-_TRAILER], blob[-_TRAILER:-32], blob[-32:]
  if len(blob) < _TRAILER or magic != CHECKSUM_MAGIC:
    raise ValueError("no checksum trailer (truncated, or written before checksums)")
  if hashlib.sha256(data).digest() != digest:
    raise ValueError("checksum mismatch (corrupted or truncated)")
  return np.load(io.BytesIO(data), allow_pickle=False)


def default_root() -> pathlib.Path:
  """$M6JAX_FEATURE_CACHE, else <m6jax cache ($M6JAX_CACHE or ~/.cache/m6jax)>/features."""
  env = os.environ.get(ENV)
  return pathlib.Path(env).expanduser() if env else weights_lib.cache_dir() / "features"


def content_key(data: bytes | str) -> str:
  """Product content (image bytes or text) -> sha1 hex digest."""
  if isinstance(data, str):
    data = data.encode("utf-8")
  return hashlib.sha1(data).hexdigest()


class FeatureCache:
  """Features of one tower configuration, by product content hash.

  root: cache root ('' or None: default_root()); tower: tower name (readable
  part of the folder name); spec: JSON-able dict of everything else the
  features depend on (weights fingerprint, preprocessing, dtype, version).
  """

  def __init__(self, root, tower: str, spec: dict):
    self.root = pathlib.Path(root).expanduser() if root else default_root()
    self.spec = dict(spec, tower=tower)
    blob = json.dumps(self.spec, sort_keys=True, default=str)
    safe = re.sub(r"[^A-Za-z0-9_.-]", "_", tower)
    self.dir = self.root / f"{safe}-{hashlib.sha1(blob.encode()).hexdigest()[:16]}"

  def _path(self, key: str) -> pathlib.Path:
    return self.dir / key[:2] / f"{key}.npy"

  def get_many(self, keys: Iterable[str]) -> dict[str, np.ndarray]:
    """{key: array} for the keys present and readable; the rest are misses."""
    out, bad = {}, []
    for key in keys:
      path = self._path(key)
      try:
        out[key] = decode_entry(path.read_bytes())
      except FileNotFoundError:
        continue
      except (OSError, ValueError, EOFError) as e:
        bad.append(f"{path}: {e}")   # recomputed and rewritten by the caller
        continue
      try:
        os.utime(path)  # last use, for clear --older-than
      except OSError:
        pass
    if bad:
      log.warning("feature cache %s: %d bad entr%s recomputed (first: %s)", self.dir, len(bad),
                  "y" if len(bad) == 1 else "ies", bad[0])
    return out

  def missing(self, keys: Iterable[str]) -> list[str]:
    """The keys that have no entry (by file presence; nothing is read)."""
    return [k for k in keys if not self._path(k).is_file()]

  def put_many(self, items: dict[str, np.ndarray], dtype=np.float32) -> None:
    """Stores {key: array} as `dtype` (None: as given); safe when other runs write
    the same keys."""
    if not items:
      return
    self.dir.mkdir(parents=True, exist_ok=True)
    meta = self.dir / _META
    if not meta.exists():
      files.write_text(meta, json.dumps(self.spec, indent=2, sort_keys=True, default=str))
    for key, value in items.items():
      path = self._path(key)
      value = np.ascontiguousarray(value, dtype=dtype)
      for attempt in (0, 1):
        try:
          path.parent.mkdir(parents=True, exist_ok=True)
          files.atomic_write(path, lambda f, v=value: f.write(encode_entry(v)), binary=True)
          break
        except FileNotFoundError:  # folder removed by a concurrent `clear`: once more
          if attempt:
            raise


# --- inspection and cleanup -----------------------------------------------------

def _tower_dirs(root: pathlib.Path) -> list[pathlib.Path]:
  if not root.is_dir():
    return []
  return sorted(p for p in root.iterdir()
                if p.is_dir() and ((p / _META).exists() or any(p.glob("??/*.npy"))))


def _entries(tower_dir: pathlib.Path) -> list[pathlib.Path]:
  return [p for p in tower_dir.glob("??/*") if p.is_file()]


def summary(root=None) -> list[dict]:
  """One dict per tower folder: dir, tower, spec, entries, bytes, newest (mtime)."""
  root = pathlib.Path(root).expanduser() if root else default_root()
  out = []
  for d in _tower_dirs(root):
    try:
      spec = json.loads((d / _META).read_text())
    except (OSError, ValueError):
      spec = {}
    files = _entries(d)
    stats = [p.stat() for p in files]
    out.append(dict(dir=str(d), tower=spec.get("tower", d.name.rsplit("-", 1)[0]), spec=spec,
                    entries=sum(p.suffix == ".npy" for p in files),
                    bytes=sum(s.st_size for s in stats),
                    newest=max((s.st_mtime for s in stats), default=None)))
  return out


def clear(root=None, older_than: float | None = None, tower: str | None = None) -> dict:
  """Deletes entries (all, or unused for more than `older_than` seconds) of every
  tower or of the towers named `tower`; empty tower folders go too.

  Returns {'files': n, 'bytes': b} removed.
  """
  root = pathlib.Path(root).expanduser() if root else default_root()
  cutoff = None if older_than is None else time.time() - older_than
  removed = {"files": 0, "bytes": 0}
  for info in summary(root):
    if tower is not None and info["tower"] != tower:
      continue
    d = pathlib.Path(info["dir"])
    for p in _entries(d):
      try:
        st = p.stat()
        if cutoff is None or st.st_mtime < cutoff:
          p.unlink()
          removed["files"] += 1
          removed["bytes"] += st.st_size
      except FileNotFoundError:
        pass  # removed by a concurrent clear
    if not _entries(d):
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
