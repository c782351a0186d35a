"""Keras weight files (.h5 legacy / ImageNet cache, Keras 3 .weights.h5) -> Flax.

The one Keras reader of the image backbones (vgg, resnet, mobilenet,
efficientnet): reading the files, a legacy writer (tests, export back to
Keras), and the table-driven assignment of Keras layers to Flax variables.

Layer names: legacy files store them ('layer_names'); Keras 3 files store each
layer under an automatic group name (snake-case class + per-class counter:
'conv2d', 'conv2d_1', ..) with the layer name in the 'vars' group's 'name'
attribute. Files from Keras 3 versions that did not write that attribute are
matched by order (:func:`rename_auto_names`).
"""

from __future__ import annotations

import pathlib
from collections.abc import Callable, Mapping, Sequence

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np


def _str(v) -> str:
  return v.decode("utf8") if isinstance(v, bytes) else str(v)


def _attr_list(obj, name: str) -> list[str]:
  """h5 string-list attribute; Keras splits big ones into name0, name1, ..."""
  if name in obj.attrs:
    vals = list(obj.attrs[name])
  else:
    vals, i = [], 0
    while f"{name}{i}" in obj.attrs:
      vals.extend(obj.attrs[f"{name}{i}"])
      i += 1
  return [_str(v) for v in vals]


def read_legacy_group(root) -> dict[str, list[np.ndarray]]:
  """Legacy layout (root attr 'layer_names', per layer attr 'weight_names') ->
  {layer name: arrays in 'weight_names' order}; layers without weights left out."""
  out = {}
  for name in _attr_list(root, "layer_names"):
    if name not in root:
      raise ValueError(f"{root.file.filename}: 'layer_names' lists {name!r}, "
                       "the file has no group of that name")
    wn = _attr_list(root[name], "weight_names")
    if wn:
      out[name] = [np.asarray(root[name][w]) for w in wn]
  return out


def layer_vars(group) -> list[np.ndarray]:
  """A Keras 3 layer group's ``vars/0, vars/1, ..`` (empty if it has none)."""
  v = group["vars"] if "vars" in group else {}
  return [np.asarray(v[str(i)]) for i in range(len(v))]


def read_keras_h5(path) -> dict[str, list[np.ndarray]]:
  """Keras weight file -> {layer name: [arrays in Keras layer.weights order]}.

  Reads the Keras 3 ``.weights.h5`` layout (``layers/<group>/vars/<i>``, the
  layer name in the ``vars`` 'name' attribute) and the legacy ``.h5`` layout of
  keras 2 / the cached ImageNet files (root attr 'layer_names', per layer attr
  'weight_names'; also the 'model_weights' group of full-model files). Like
  Keras, legacy weights are taken in 'weight_names' order. Layers without
  weights are left out.
  """
  import h5py
  path = pathlib.Path(path).expanduser()
  if not path.is_file():
    raise FileNotFoundError(f"Keras weight file {path} does not exist")
  out: dict[str, list[np.ndarray]] = {}
  with h5py.File(path, "r") as f:
    root = f["model_weights"] if "model_weights" in f else f
    if _attr_list(root, "layer_names"):  # legacy
      return read_legacy_group(root)
    if "layers" not in f:
      raise ValueError(f"{path}: not a Keras weight file (no 'layer_names' "
                       "attribute, no 'layers' group)")

    def visit(group, key):  # key: the automatic name, used when 'name' is absent
      arrays = layer_vars(group)
      if arrays:
        out[_str(group["vars"].attrs.get("name", key))] = arrays
      if "layers" in group:  # nested models
        for sub in group["layers"]:
          visit(group["layers"][sub], sub)

    for key in f["layers"]:
      visit(f["layers"][key], key)
  return out


_LEGACY_NAMES = {1: ("kernel",), 2: ("kernel", "bias"),
                 4: ("gamma", "beta", "moving_mean", "moving_variance")}


def write_keras_h5_legacy(path, layers: Mapping[str, Sequence[np.ndarray]],
                          layer_names: Sequence[str] | None = None) -> None:
  """{layer name: [arrays in Keras order]} -> a legacy keras-2 weights ``.h5``.

  The layout of the cached ImageNet files: root attrs 'layer_names',
  'backend', 'keras_version'; per layer a group with attr 'weight_names'
  ('<layer>/kernel:0', ...) and datasets at those relative paths. For tests
  and for exporting back to Keras (``model.load_weights`` reads it).
  """
  import h5py
  names = list(layer_names if layer_names is not None else layers)
  with h5py.File(path, "w") as f:
    f.attrs["layer_names"] = [n.encode("utf8") for n in names]
    f.attrs["backend"] = b"tensorflow"
    f.attrs["keras_version"] = b"2.2.4"
    for name in names:
      g = f.create_group(name)
      arrays = list(layers.get(name, []))
      short = _LEGACY_NAMES.get(len(arrays), [f"w{i}" for i in range(len(arrays))])
      wn = [f"{name}/{s}:0" for s in short]
      g.attrs["weight_names"] = [w.encode("utf8") for w in wn]
      for w, a in zip(wn, arrays):
        g.create_dataset(w, data=np.asarray(a))


# Keras variable order per layer kind (layer.weights; legacy files use the
# same order: trainable then non-trainable).
KERAS_VARS = {
    "conv": ("kernel", "bias"),
    "conv_nobias": ("kernel",),
    "dw": ("kernel",),
    "dense": ("kernel", "bias"),
    "bn": ("gamma", "beta", "moving_mean", "moving_variance"),
}


def _get(tree: Mapping, path: Sequence[str]):
  for p in path:
    tree = tree[p]
  return tree


def _put(tree: dict, path: Sequence[str], value):
  for p in path[:-1]:
    tree = tree.setdefault(p, {})
  tree[path[-1]] = value


def assign_layer(variables: dict, arrays: Sequence[np.ndarray], lname: str,
                 fpath: tuple[str, ...], kind: str, expected: Mapping,
                 origin: str) -> None:
  """One Keras layer's arrays -> ``variables`` ({'params', 'batch_stats'}) at
  ``fpath``, checked against the model's shapes (see :func:`assign_keras`)."""
  want = KERAS_VARS[kind]
  if len(arrays) != len(want):
    raise ValueError(
        f"{origin}: Keras layer {lname!r} has {len(arrays)} weights "
        f"{[a.shape for a in arrays]}, expected {len(want)} {list(want)}")
  src = dict(zip(want, arrays))

  def take(wname, target, coll, leaf):
    shape = tuple(_get(expected[coll], fpath + (leaf,)).shape)
    a = src[wname]
    if tuple(a.shape) != tuple(target):
      raise ValueError(
          f"{origin}: Keras layer {lname!r} weight {wname!r} has shape "
          f"{tuple(a.shape)}, the model expects {tuple(target)}")
    if kind == "dw":  # (h, w, C, 1) -> grouped-conv kernel (h, w, 1, C)
      a = a.reshape(shape)
    _put(variables.setdefault(coll, {}), fpath + (leaf,),
         np.ascontiguousarray(a, dtype=np.float32))

  try:
    if kind == "bn":
      n = tuple(_get(expected["params"], fpath + ("scale",)).shape)
      take("gamma", n, "params", "scale")
      take("beta", n, "params", "bias")
      take("moving_mean", n, "batch_stats", "mean")
      take("moving_variance", n, "batch_stats", "var")
    else:
      k = tuple(_get(expected["params"], fpath + ("kernel",)).shape)
      if kind == "dw":  # depth multiplier 1 (all keras.applications models)
        take("kernel", (k[0], k[1], k[3], 1), "params", "kernel")
      else:
        take("kernel", k, "params", "kernel")
      if "bias" in want:
        take("bias", (k[-1],), "params", "bias")
  except KeyError as e:
    raise ValueError(f"{origin}: the model has no variable for Keras layer "
                     f"{lname!r} at {'/'.join(fpath)} ({e})") from None


def assign_keras(layers: Mapping[str, list], table: Sequence[tuple], expected: Mapping,
                 origin: str, ignore: Sequence[str] = ()) -> dict:
  """Keras arrays -> Flax variables, checked against the model's shapes.

  layers: output of :func:`read_keras_h5`. table: (keras layer name, flax
  module path tuple, kind in KERAS_VARS). expected: the model's variable shapes
  (``jax.eval_shape(model.init, ...)``). Layers of the file that are neither in
  the table nor in ``ignore`` are an error (wrong architecture/width).
  Raises ValueError naming the layer and the shapes.
  """
  out: dict = {"params": {}}
  for lname, fpath, kind in table:
    if lname not in layers:
      raise ValueError(
          f"{origin}: Keras layer {lname!r} is missing from the weight file "
          f"({len(layers)} weight layers, e.g. {sorted(layers)[:5]})")
    assign_layer(out, layers[lname], lname, fpath, kind, expected, origin)
  extra = sorted(set(layers) - {t[0] for t in table} - set(ignore))
  if extra:
    raise ValueError(f"{origin}: weight file has layers the model does not: "
                     f"{extra[:10]}{' ...' if len(extra) > 10 else ''}")
  return out


# Keras 3 automatic group name (snake-case class) per layer kind.
_KERAS3_CLASS = {"conv_nobias": "conv2d", "conv": "conv2d", "dw": "depthwise_conv2d",
                 "bn": "batch_normalization", "dense": "dense"}


def rename_auto_names(layers: Mapping[str, list], table: Sequence[tuple]) -> dict:
  """Keras 3 file without layer names -> keyed by the table's layer names.

  Each table row's automatic name is its class name plus the count of earlier
  rows of the same class ('conv2d', 'conv2d_1', ..), as Keras numbers the
  groups over ``model.layers``. Valid when the table lists the layers of those
  classes in ``model.layers`` order: true for single-chain models (VGG16,
  MobileNetV2, EfficientNetB0, whose SE branch rejoins before project_conv);
  tested for MobileNetV2 and EfficientNetB0. Entries not renamed keep their key.
  """
  counts: dict[str, int] = {}
  out = dict(layers)
  for lname, _, kind in table:
    base = _KERAS3_CLASS[kind]
    n = counts.get(base, 0)
    counts[base] = n + 1
    auto = base if n == 0 else f"{base}_{n}"
    if auto in out:
      out[lname] = out.pop(auto)
  return out


def expected_shapes(model: nn.Module, size: int) -> dict:
  """Variable shapes of `model` for a (1, size, size, 3) input, no compute."""
  x = jax.ShapeDtypeStruct((1, size, size, 3), jnp.float32)
  return jax.eval_shape(lambda x: model.init(jax.random.key(0), x), x)


def head_classes(layers: Mapping[str, list], num_classes: int | None,
                 origin: str, name: str = "predictions") -> int:
  """Resolves num_classes: None -> as in the file (0 without a head);
  0 -> ignore any head; N -> the file must hold an N-class head."""
  have = layers[name][0].shape[-1] if name in layers else 0
  if num_classes is None:
    return have
  if num_classes > 0 and have != num_classes:
    raise ValueError(f"{origin}: asked for a {num_classes}-class head, the file "
                     + (f"has {have} classes" if have else
                        f"has no {name!r} layer (a notop file)"))
  return num_classes


def load_backbone(path, num_classes: int | None, table: Sequence[tuple],
                  make_model: Callable[[int], nn.Module], ignore: Sequence[str] = ()) -> dict:
  """Keras weight file -> variables for ``make_model(n_classes)``: the backbone
  ``table`` plus, per :func:`head_classes`, the 'predictions' head as
  'classifier' (a head in the file is otherwise ignored). Layers of the file in
  ``ignore`` (e.g. preprocessing layers with weights) are skipped."""
  origin = str(path)
  layers = read_keras_h5(path)
  head = [("predictions", ("classifier",), "dense")]
  if table and not any(t[0] in layers for t in table):  # Keras 3 file without names
    layers = rename_auto_names(layers, list(table) + head)
  n_cls = head_classes(layers, num_classes, origin)
  table = list(table) + (head if n_cls else [])
  expected = expected_shapes(make_model(n_cls), 32)
  return assign_keras(layers, table, expected, origin,
                      ignore=[h[0] for h in head] + list(ignore))
