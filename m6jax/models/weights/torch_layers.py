"""Torch state dicts -> Flax variables, layer by layer: what every torch converter shares.

`TorchLayers(src, origin)` reads named arrays from a state dict (numpy arrays or torch
tensors), checks their shapes against the Flax model's, and collects
{'params', 'batch_stats'}; `unused` names what a converter did not read (the usual
sign of a wrong variant). Used by m6jax.models.efficientnet_convert and
m6jax.models.mobilenet_convert.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import numpy as np


def as_numpy(a) -> np.ndarray:
  """A numpy array or a torch tensor (handed in directly) -> numpy array."""
  if hasattr(a, "detach"):
    a = a.detach().cpu().numpy()
  return np.asarray(a)


def conv_kernel(w: np.ndarray) -> np.ndarray:
  """torch (O, I/groups, kh, kw) -> Flax (kh, kw, I/groups, O)."""
  # Depthwise (C, 1, kh, kw) -> (kh, kw, 1, C) is the same transpose.
  return np.ascontiguousarray(w.transpose(2, 3, 1, 0))


def lookup(tree: Mapping, path: tuple[str, ...]):
  """tree[p0][p1]... for path (p0, p1, ...)."""
  for p in path:
    tree = tree[p]
  return tree


class TorchLayers:
  """Collects converted arrays into {'params', 'batch_stats'} with clear errors."""

  def __init__(self, src: Mapping[str, Any], origin: str):
    self.src, self.origin = src, origin
    self.used: set[str] = set()
    self.variables: dict = {"params": {}, "batch_stats": {}}

  def get(self, key: str, shape: tuple | None = None) -> np.ndarray:
    """src[key] as float32, its shape checked against `shape` (KeyError / ValueError
    naming the origin and the key)."""
    if key not in self.src:
      raise KeyError(f"{self.origin}: missing weight {key!r}")
    a = as_numpy(self.src[key]).astype(np.float32)
    if shape is not None and tuple(a.shape) != tuple(shape):
      raise ValueError(f"{self.origin}: {key!r} has shape {tuple(a.shape)}, "
                       f"expected {tuple(shape)}")
    self.used.add(key)
    return a

  def put(self, collection: str, path: tuple[str, ...], value: np.ndarray):
    d = self.variables[collection]
    for p in path[:-1]:
      d = d.setdefault(p, {})
    d[path[-1]] = value

  def layer(self, params_shapes: dict, tname: str, fpath: tuple[str, ...], kind: str):
    """One torch layer `tname` into the Flax module at `fpath`: 'fc' (Linear), 'bn'
    (BatchNorm: scale, bias, running mean and var) or any conv kind (the kernel, see
    conv_kernel). params_shapes: the model's expected params shapes. Returns the Flax
    kernel shape for convs and fc (callers add what else their kind carries)."""
    if kind == "bn":
      c = lookup(params_shapes, fpath + ("scale",))
      self.put("params", fpath + ("scale",), self.get(tname + ".weight", c))
      self.put("params", fpath + ("bias",), self.get(tname + ".bias", c))
      self.put("batch_stats", fpath + ("mean",), self.get(tname + ".running_mean", c))
      self.put("batch_stats", fpath + ("var",), self.get(tname + ".running_var", c))
      return c
    k = lookup(params_shapes, fpath + ("kernel",))
    if kind == "fc":
      self.put("params", fpath + ("kernel",), self.get(tname + ".weight", k[::-1]).T.copy())
      self.put("params", fpath + ("bias",), self.get(tname + ".bias", (k[1],)))
    else:
      self.put("params", fpath + ("kernel",),
               conv_kernel(self.get(tname + ".weight", (k[3], k[2], k[0], k[1]))))
    return k

  def unused(self, skip=lambda key: False) -> list[str]:
    """Source keys not read (BatchNorm's num_batches_tracked and `skip(key)` aside)."""
    return [k for k in self.src if k not in self.used
            and not k.endswith("num_batches_tracked") and not skip(k)]
