"""Atomic file writes: the one way m6jax writes a file that someone may read.

A file is written to a unique temporary name beside its destination and
renamed into place, so a reader, a killed run or a concurrent writer never sees
a half-written file. A full disk (or quota, or file size limit) raises
WriteError: one line naming the file and the OS error; the old file is kept.
"""

from __future__ import annotations

import errno
import json
import os
import uuid
from typing import Any, Callable

import numpy as np

# A full disk, a quota or a file size limit: errors a rerun after freeing space fixes.
DISK_FULL = (errno.ENOSPC, errno.EFBIG, errno.EDQUOT)


class WriteError(OSError):
  """A file could not be written for lack of space; str() is one line naming the path
  and the OS error (and what `note` adds, e.g. what is still intact)."""

  def __init__(self, path: str, error_number: int, note: str = ""):
    super().__init__(error_number, os.strerror(error_number), os.fspath(path))
    name = errno.errorcode.get(error_number, str(error_number))
    self.message = (f"cannot write {os.fspath(path)}: {os.strerror(error_number)} ({name})"
                    + (f"; {note}" if note else ""))

  def __str__(self) -> str:
    return self.message



def atomic_write(path: str | os.PathLike, write: Callable[[Any], None],
                 binary: bool = False) -> None:
  """write(file object) into a temporary file beside `path`, then rename it to `path`."""
  path = os.fspath(path)
  folder, name = os.path.split(path)
  tmp = os.path.join(folder, f".{name}.{os.getpid()}.{uuid.uuid4().hex[:8]}.tmp")
  try:
    with open(tmp, "wb" if binary else "w", **({} if binary else {"newline": "",
                                                                   "encoding": "utf-8"})) as f:
      write(f)
    os.replace(tmp, path)
  except BaseException as e:
    if os.path.exists(tmp):
      os.unlink(tmp)
    if isinstance(e, OSError) and e.errno in DISK_FULL and not isinstance(e, WriteError):
      raise WriteError(path, e.errno, f"the previous {os.path.basename(path)} is unchanged"
                       if os.path.exists(path) else "") from e
    raise


def write_text(path: str | os.PathLike, text: str) -> None:
  atomic_write(path, lambda f: f.write(text))


def _json_default(x):
  if isinstance(x, np.generic):
    return x.item()
  if isinstance(x, np.ndarray):
    return x.tolist()
  return str(x)


def write_json(path: str | os.PathLike, obj) -> None:
  """obj as indented JSON (numpy scalars and arrays converted)."""
  atomic_write(path, lambda f: json.dump(obj, f, indent=2, default=_json_default))
