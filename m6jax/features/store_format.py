"""The feature store's shard file: many rows of one dtype and row shape, by 20-byte key.

  offset 0        MAGIC (8 bytes), header length (uint32 LE), header JSON
                  {dtype, shape (of one row), rows}, padded with spaces to HEADER bytes
  HEADER          rows: (rows, *shape) of dtype, C order
  after the rows  keys: (rows, 20) raw bytes (sha1 of the content)
                  row sums: (rows, 8) blake2b-8 of each row's bytes
                  INDEX_MAGIC (8) + blake2b-16 of header + keys + row sums

A reader reads the header and the index (keys + row sums: 28 bytes a row) and
then only the rows it needs, each checked against its row sum. A file whose
size, header or index checksum does not match is unreadable as a whole
(ShardError); a row that does not match its sum is a bad row. Shards are
written once, to a temporary name renamed into place (m6jax.files), and never
changed.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import os
import struct
from typing import Iterable, Iterator

import numpy as np

MAGIC = b"M6SHARD1"
INDEX_MAGIC = b"M6SHIDX1"
HEADER = 256          # rows start here (aligned for memory maps)
KEY = 20              # sha1 digest bytes
SUM = 8               # blake2b digest bytes of one row
_TRAILER = len(INDEX_MAGIC) + 16
CHUNK_BYTES = 64 << 20   # rows copied / checked at a time when streaming


class ShardError(ValueError):
  """A shard file that cannot be used (truncated, corrupted, not a shard)."""


@dataclasses.dataclass(frozen=True)
class Index:
  """What a reader needs of one shard: keys (rows,) 'S20', sums (rows,) 'S8'."""
  path: str
  dtype: np.dtype
  shape: tuple
  keys: np.ndarray
  sums: np.ndarray

  @property
  def rows(self) -> int:
    return len(self.keys)

  @property
  def row_bytes(self) -> int:
    return int(self.dtype.itemsize * np.prod(self.shape, dtype=np.int64))


def key_bytes(keys) -> np.ndarray:
  """Keys -> (N,) 'S20': an 'S20' array as is; sha1 hex strings decoded; any other
  string (e.g. feasibility's '<hash>.results') by the sha1 of its UTF-8."""
  if isinstance(keys, np.ndarray) and keys.dtype == np.dtype(f"S{KEY}"):
    return keys
  keys = list(keys)
  if all(isinstance(k, str) and len(k) == 40 for k in keys):
    try:
      return np.frombuffer(bytes.fromhex("".join(keys)), f"S{KEY}").copy()
    except ValueError:
      pass
  out = []
  for k in keys:
    try:
      b = bytes.fromhex(k) if len(k) == 40 else b""
    except ValueError:
      b = b""
    out.append(b or hashlib.sha1(k.encode("utf-8")).digest())
  return np.frombuffer(b"".join(out), f"S{KEY}").copy() if out else np.zeros(0, "S20")


def row_sums(rows: np.ndarray) -> np.ndarray:
  """(n, ...) C-contiguous rows -> (n,) 'S8' blake2b digests of each row's bytes."""
  flat = rows.reshape(len(rows), -1).view(np.uint8) if rows.size else rows
  return np.frombuffer(b"".join(hashlib.blake2b(r, digest_size=SUM).digest() for r in flat),
                       f"S{SUM}") if len(rows) else np.zeros(0, f"S{SUM}")


def _header(dtype: np.dtype, shape: tuple, rows: int) -> bytes:
  meta = json.dumps({"dtype": dtype.str, "shape": list(shape), "rows": rows}).encode()
  blob = MAGIC + struct.pack("<I", len(meta)) + meta
  if len(blob) > HEADER:
    raise ValueError(f"shard header too long ({len(blob)} bytes): row shape {shape}")
  return blob.ljust(HEADER, b" ")


def write(f, dtype, shape: tuple, chunks: Iterable[tuple]) -> int:
  """Writes a shard to the binary file `f` (seekable, at offset 0) from chunks of
  (keys (n,) 'S20', rows (n, *shape), sums (n,) 'S8' or None: computed).

  Returns the row count.
  """
  dtype = np.dtype(dtype)
  f.write(_header(dtype, shape, 0))   # rewritten below, once the row count is known
  keys, sums = [], []
  for k, r, s in chunks:
    r = np.ascontiguousarray(r, dtype)
    if r.shape[1:] != tuple(shape) or len(k) != len(r):
      raise ValueError(f"shard rows {r.shape} / {len(k)} keys: expected (n, *{tuple(shape)})")
    f.write(memoryview(r.reshape(-1).view(np.uint8)))
    keys.append(np.asarray(k, f"S{KEY}"))
    sums.append(row_sums(r) if s is None else np.asarray(s, f"S{SUM}"))
  keys = np.concatenate(keys) if keys else np.zeros(0, f"S{KEY}")
  sums = np.concatenate(sums) if sums else np.zeros(0, f"S{SUM}")
  head = _header(dtype, shape, len(keys))
  index = keys.tobytes() + sums.tobytes()
  f.write(index + INDEX_MAGIC + hashlib.blake2b(head + index, digest_size=16).digest())
  f.seek(0)
  f.write(head)
  return len(keys)


def read_index(path: str | os.PathLike) -> Index:
  """The header and keys of a shard; ShardError when they do not check out
  (FileNotFoundError when it is gone)."""
  path = os.fspath(path)
  with open(path, "rb") as f:
    size = os.fstat(f.fileno()).st_size
    head = f.read(HEADER)
    if len(head) < HEADER or head[:8] != MAGIC:
      raise ShardError(f"{path}: not a feature shard (truncated or foreign header)")
    (n_meta,) = struct.unpack("<I", head[8:12])
    try:
      meta = json.loads(head[12:12 + n_meta])
      dtype, shape, rows = np.dtype(meta["dtype"]), tuple(meta["shape"]), int(meta["rows"])
    except (ValueError, KeyError, TypeError) as e:
      raise ShardError(f"{path}: bad shard header ({e})") from None
    row_bytes = dtype.itemsize * int(np.prod(shape, dtype=np.int64))
    start = HEADER + rows * row_bytes
    want = start + rows * (KEY + SUM) + _TRAILER
    if size != want:
      raise ShardError(f"{path}: {size} bytes, expected {want} (truncated or torn)")
    f.seek(start)
    tail = f.read(want - start)
  index, magic, digest = tail[:-_TRAILER], tail[-_TRAILER:-16], tail[-16:]
  if magic != INDEX_MAGIC or hashlib.blake2b(head + index, digest_size=16).digest() != digest:
    raise ShardError(f"{path}: index checksum mismatch (corrupted)")
  keys = np.frombuffer(index, f"S{KEY}", rows)
  sums = np.frombuffer(index, f"S{SUM}", rows, offset=rows * KEY)
  return Index(path, dtype, shape, keys, sums)


def read_rows(index: Index, rows: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
  """Rows `rows` (sorted int array) of a shard -> (values (m, *shape), ok (m,) bool:
  the row matches its checksum). FileNotFoundError when the shard is gone."""
  rows = np.asarray(rows, np.int64)
  if not len(rows):
    return np.zeros((0, *index.shape), index.dtype), np.zeros(0, bool)
  mm = np.memmap(index.path, index.dtype, "r", offset=HEADER, shape=(index.rows, *index.shape))
  try:
    values = np.array(mm[rows])
  finally:
    del mm
  return values, row_sums(values) == index.sums[rows]


def stream_rows(index: Index, keep: np.ndarray | None = None) -> Iterator[tuple]:
  """Chunks (keys, rows, sums) of a shard's good rows (and only `keep` (rows,) bool
  ones), a few MB at a time: a compaction's input."""
  step = max(1, CHUNK_BYTES // max(1, index.row_bytes))
  for lo in range(0, index.rows, step):
    sel = np.arange(lo, min(lo + step, index.rows))
    if keep is not None:
      sel = sel[keep[sel]]
    values, ok = read_rows(index, sel)
    yield index.keys[sel][ok], values[ok], index.sums[sel][ok]


def read_many(index: Index, rows: np.ndarray) -> Iterator[tuple]:
  """Rows `rows` (any order, repeats allowed) of a shard, CHUNK_BYTES at a time:
  (which: positions in `rows` whose row matches its checksum, their values,
  how many distinct rows of the chunk did not)."""
  urows, inv = np.unique(rows, return_inverse=True)
  step = max(1, CHUNK_BYTES // max(1, index.row_bytes))
  for lo in range(0, len(urows), step):
    values, ok = read_rows(index, urows[lo:lo + step])
    which = np.flatnonzero((inv >= lo) & (inv < lo + step))
    j = inv[which] - lo
    yield which[ok[j]], values[j[ok[j]]], int((~ok).sum())


def sorted_keys(indexes: list) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
  """Shard indexes -> (every key sorted (M,) 'S20', its shard number (M,), its row (M,));
  among equal keys, the earlier shard in `indexes` comes first."""
  keys = np.concatenate([ix.keys for ix in indexes]) if indexes else np.zeros(0, f"S{KEY}")
  sid = np.repeat(np.arange(len(indexes), dtype=np.int32), [ix.rows for ix in indexes])
  row = (np.concatenate([np.arange(ix.rows) for ix in indexes]) if indexes
         else np.zeros(0, np.int64))
  order = np.argsort(keys, kind="stable")
  return keys[order], sid[order], row[order]


def merged_rows(indexes: list) -> tuple[Iterator[tuple], int]:
  """(chunks for `write` of the good rows of several shards, each key once: its copy
  in the earliest shard of `indexes`; how many keys)."""
  keys = np.concatenate([ix.keys for ix in indexes])
  keep = np.zeros(len(keys), bool)
  keep[np.unique(keys, return_index=True)[1]] = True
  bounds = np.cumsum([0] + [ix.rows for ix in indexes])
  chunks = (c for i, ix in enumerate(indexes)
            for c in stream_rows(ix, keep[bounds[i]:bounds[i + 1]]))
  return chunks, int(keep.sum())
