"""VGG16 (keras.applications layout) in Flax Linen, with Keras weight import.

Parameter paths follow Keras layer names: ``block{1..5}_conv{i}``, and with a
head ``fc1``, ``fc2``, ``classifier`` (Keras 'predictions').

Also home of the Keras weight-file reader shared by resnet.py and mobilenet.py
(:func:`read_keras_h5`, :func:`assign_keras`).
"""

from __future__ import annotations

import pathlib
from typing import Any, Mapping, Sequence

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

FEATURE_DIM = 512
# (convs, channels) per block; every block ends with a 2x2 stride-2 max pool.
_BLOCKS = ((2, 64), (2, 128), (3, 256), (3, 512), (3, 512))
_CAFFE_MEAN_BGR = (103.939, 116.779, 123.68)


def preprocess_caffe(images):
  """RGB float 0..255 (B, H, W, 3) -> BGR minus the ImageNet mean (Keras 'caffe')."""
  x = jnp.asarray(images, jnp.float32)[..., ::-1]
  return x - jnp.asarray(_CAFFE_MEAN_BGR, jnp.float32)


preprocess = preprocess_caffe


class VGG16(nn.Module):
  """keras.applications.VGG16.

  Input (B, H, W, 3) caffe-preprocessed. Returns {'feature_map': (B, H/32, W/32,
  512) the block5_pool output (= Keras include_top=False output), 'embedding':
  (B, 512) f32 its global average (= Keras pooling='avg'), 'block3', 'block4'
  (pooled block outputs), 'block5_conv3' (B, H/16, W/16, 512) and, if
  num_classes > 0, 'logits' (B, num_classes) from the Keras head (flatten, fc1,
  fc2, classifier; needs the input size the head was built for, 224 for ImageNet)}.
  """
  num_classes: int = 0
  dtype: Any = jnp.float32

  @nn.compact
  def __call__(self, x, train: bool = False):
    del train  # no BatchNorm / dropout in the Keras VGG16
    x = jnp.asarray(x, self.dtype)
    out = {}
    for b, (n, ch) in enumerate(_BLOCKS, 1):
      for i in range(1, n + 1):
        x = nn.Conv(ch, (3, 3), padding="SAME", dtype=self.dtype,
                    name=f"block{b}_conv{i}")(x)
        x = nn.relu(x)
      if b == 5:
        out["block5_conv3"] = x
      x = nn.max_pool(x, (2, 2), strides=(2, 2), padding="VALID")
      if b in (3, 4):
        out[f"block{b}"] = x
    fmap = self.perturb("feature_map", x)
    out["feature_map"] = fmap
    out["embedding"] = jnp.mean(fmap.astype(jnp.float32), axis=(1, 2))
    if self.num_classes > 0:
      h = fmap.reshape(fmap.shape[0], -1)  # NHWC flatten, same order as Keras
      h = nn.relu(nn.Dense(4096, dtype=self.dtype, name="fc1")(h))
      h = nn.relu(nn.Dense(4096, dtype=self.dtype, name="fc2")(h))
      out["logits"] = nn.Dense(self.num_classes, dtype=jnp.float32,
                               name="classifier")(h)
    return out


# ----------------------------------------------------------------------------
# Keras weight files (shared with resnet.py and mobilenet.py).

def _attr_list(obj, name: str) -> list[str]:
  """h5 string-list attribute; Keras splits big ones into name0, name1, ..."""
  if name in obj.attrs:
    vals = list(obj.attrs[name])
  else:
    vals, i = [], 0
    while f"{name}{i}" in obj.attrs:
      vals.extend(obj.attrs[f"{name}{i}"])
      i += 1
  return [v.decode("utf8") if isinstance(v, bytes) else str(v) for v in vals]


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
    names = _attr_list(root, "layer_names")
    if names:  # legacy
      for name in names:
        wn = _attr_list(root[name], "weight_names")
        if wn:
          out[name] = [np.asarray(root[name][w]) for w in wn]
      return out
    if "layers" not in f:
      raise ValueError(f"{path}: not a Keras weight file (no 'layer_names' "
                       "attribute, no 'layers' group)")

    def visit(group, key):
      if "vars" in group and len(group["vars"]):
        v = group["vars"]
        name = v.attrs.get("name", key)
        name = name.decode("utf8") if isinstance(name, bytes) else str(name)
        out[name] = [np.asarray(v[str(i)]) for i in range(len(v))]
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


def assign_keras(layers: Mapping[str, list], table: Sequence[tuple], expected: Mapping,
                 origin: str, ignore: Sequence[str] = ()) -> dict:
  """Keras arrays -> Flax variables, checked against the model's shapes.

  layers: output of :func:`read_keras_h5`. table: (keras layer name, flax
  module path tuple, kind in KERAS_VARS). expected: the model's variable shapes
  (``jax.eval_shape(model.init, ...)``). Layers of the file that are neither in
  the table nor in ``ignore`` are an error (wrong architecture/width).
  Raises ValueError naming the layer and the shapes.
  """
  params: dict = {}
  stats: dict = {}
  for lname, fpath, kind in table:
    if lname not in layers:
      raise ValueError(
          f"{origin}: Keras layer {lname!r} is missing from the weight file "
          f"({len(layers)} weight layers, e.g. {sorted(layers)[:5]})")
    arrays = layers[lname]
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
      _put(params if coll == "params" else stats, fpath + (leaf,),
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
  extra = sorted(set(layers) - {t[0] for t in table} - set(ignore))
  if extra:
    raise ValueError(f"{origin}: weight file has layers the model does not: "
                     f"{extra[:10]}{' ...' if len(extra) > 10 else ''}")
  out = {"params": params}
  if stats:
    out["batch_stats"] = stats
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


def load_keras(path, num_classes: int | None = 0) -> dict:
  """Keras VGG16 weight file (.h5 legacy/ImageNet cache or .weights.h5) ->
  {'params'} for ``VGG16(num_classes)``.

  num_classes: 0 -> backbone only (a head in the file is ignored); None -> the
  head if the file has one; N -> the file's N-class head (fc1, fc2, predictions).
  """
  origin = str(path)
  layers = read_keras_h5(path)
  n_cls = head_classes(layers, num_classes, origin)
  size = 32
  table = [(f"block{b}_conv{i}", (f"block{b}_conv{i}",), "conv")
           for b, (n, _) in enumerate(_BLOCKS, 1) for i in range(1, n + 1)]
  head = [("fc1", ("fc1",), "dense"), ("fc2", ("fc2",), "dense"),
          ("predictions", ("classifier",), "dense")]
  if n_cls:
    # fc1 sees the flattened (H/32, W/32, 512) map: recover the input size.
    if "fc1" not in layers:
      raise ValueError(f"{origin}: Keras layer 'fc1' is missing from the weight file")
    cells = layers["fc1"][0].shape[0] // 512
    side = int(round(cells ** 0.5))
    if side * side * 512 != layers["fc1"][0].shape[0]:
      raise ValueError(f"{origin}: fc1 kernel {layers['fc1'][0].shape} is not a "
                       "square (h*w*512)-input head")
    size = 32 * side
    table += head
  expected = expected_shapes(VGG16(num_classes=n_cls), size)
  return assign_keras(layers, table, expected, origin,
                      ignore=[t[0] for t in head])
