"""Atomic file writes: the one way m6jax writes a file that someone may read.

A file is written to a unique temporary name beside its destination and
renamed into place, so a reader, a killed run or a concurrent writer never sees
a half-written file.
"""

from __future__ import annotations

import json
import os
import uuid
from typing import Any, Callable

import numpy as np


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
  except BaseException:
    if os.path.exists(tmp):
      os.unlink(tmp)
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
