"""MobileNetV2 in Flax Linen: keras.applications and torchvision flavours, Keras weight import.

One network (ReLU6, no conv biases, the paper's 7 bottleneck stages), two
flavours (``MobileNetV2(flavour=...)``) that differ only where the two
libraries do:

* 'keras': BN eps 1e-3 / momentum 0.999; strided convs padded with
  ``correct_pad`` (asymmetric for even sizes: the extra pixel goes after)
  then 'valid'; input in [-1, 1] (:func:`preprocess`);
* 'torchvision': BN eps 1e-5 / momentum 0.9 (torch's 0.1); every 3x3 conv
  padded by 1 on each side, strided ones too; input ImageNet mean/std
  normalised (:func:`preprocess_torchvision`). Its weight import (torchvision
  state dicts) is :mod:`m6jax.models.mobilenet_convert`.

Parameter paths: ``stem_conv``, ``stem_bn`` (Keras Conv1/bn_Conv1),
``stage{1..7}_block{i}/{expand,expand_bn,depthwise,depthwise_bn,project,
project_bn}`` (the 7 bottleneck groups of the paper; Keras block_0..block_16),
``head_conv``, ``head_bn`` (Keras Conv_1/Conv_1_bn), ``classifier`` (Keras
'predictions'); the same in both flavours (torchvision's ``features.N`` keys are
mapped in :func:`m6jax.models.mobilenet_convert.torchvision_table`).
"""

from __future__ import annotations

from typing import Any

import flax.linen as nn
import jax.numpy as jnp

from m6jax.models import conv
from m6jax.models.common import make_divisible, pooled_outputs
from m6jax.models.efficientnet import IMAGENET_MEAN, IMAGENET_STD
from m6jax.models.weights.keras_h5 import load_backbone

FEATURE_DIM = 1280
# (expansion, filters, repeats, first stride) per stage, as in Keras/the paper.
STAGES = ((1, 16, 1, 1), (6, 24, 2, 2), (6, 32, 3, 2), (6, 64, 4, 2),
          (6, 96, 3, 1), (6, 160, 3, 2), (6, 320, 1, 1))
BN_EPS = 1e-3
BN_MOMENTUM = 0.999
# flavour -> (BatchNorm epsilon, Flax momentum = 1 - torch momentum).
FLAVOURS = {"keras": (BN_EPS, BN_MOMENTUM), "torchvision": (1e-5, 0.9)}
# Two-pass BatchNorm variance (use_fast_variance=False), as Keras's jnp.var.


def preprocess(images):
  """RGB float 0..255 (B, H, W, 3) -> [-1, 1] (Keras 'tf' mode)."""
  return jnp.asarray(images, jnp.float32) / 127.5 - 1.0


def preprocess_torchvision(images):
  """RGB float 0..255 (B, H, W, 3) -> (x/255 - mean)/std, torchvision's ImageNet transform."""
  x = jnp.asarray(images, jnp.float32) / 255.0
  return ((x - jnp.asarray(IMAGENET_MEAN, jnp.float32))
          / jnp.asarray(IMAGENET_STD, jnp.float32))


def correct_pad(size: tuple[int, int], kernel: int = 3):
  """Keras imagenet_utils.correct_pad: zero padding before a strided 'valid' conv."""
  c = kernel // 2
  return ((c - (1 - size[0] % 2), c), (c - (1 - size[1] % 2), c))


def _flavour(flavour: str) -> tuple[float, float]:
  if flavour not in FLAVOURS:
    raise ValueError(f"unknown MobileNetV2 flavour {flavour!r}; choose from {sorted(FLAVOURS)}")
  return FLAVOURS[flavour]


def _bn(train, dtype, name, flavour="keras"):
  eps, momentum = _flavour(flavour)
  return nn.BatchNorm(use_running_average=not train, momentum=momentum,
                      epsilon=eps, use_fast_variance=False,
                      dtype=dtype, name=name)


def _strided_pad(flavour: str, size: tuple[int, int]):
  """Padding of a stride-2 3x3 conv: Keras's correct_pad, or torch's 1 on each side."""
  return correct_pad(size, 3) if flavour == "keras" else ((1, 1), (1, 1))


class InvertedResidual(nn.Module):
  """Keras _inverted_res_block: [1x1 expand] -> 3x3 depthwise/s -> 1x1 project.

  (B, H, W, Cin) -> (B, ~H/stride, ~W/stride, filters); residual add when
  stride 1 and Cin == filters.
  """
  filters: int
  expansion: int
  stride: int = 1
  dtype: Any = jnp.float32
  conv_impl: str = "auto"
  flavour: str = "keras"

  @nn.compact
  def __call__(self, x, train: bool = False):
    fn = conv.conv_fn(self.conv_impl)
    bn = lambda name: _bn(train, self.dtype, name, self.flavour)
    cin = x.shape[-1]
    y = x
    if self.expansion != 1:
      y = nn.Conv(cin * self.expansion, (1, 1), use_bias=False, dtype=self.dtype,
                  conv_general_dilated=fn, name="expand")(y)
      y = nn.relu6(bn("expand_bn")(y))
    # Stride 1: 'SAME' is 1 on each side, in both flavours.
    pad = "SAME" if self.stride == 1 else _strided_pad(self.flavour, y.shape[1:3])
    y = nn.Conv(y.shape[-1], (3, 3), (self.stride, self.stride), padding=pad,
                feature_group_count=y.shape[-1], use_bias=False, dtype=self.dtype,
                conv_general_dilated=fn, name="depthwise")(y)
    y = nn.relu6(bn("depthwise_bn")(y))
    y = nn.Conv(self.filters, (1, 1), use_bias=False, dtype=self.dtype,
                conv_general_dilated=fn, name="project")(y)
    y = bn("project_bn")(y)
    if self.stride == 1 and cin == self.filters:
      y = x + y
    return y


class MobileNetV2(nn.Module):
  """keras.applications.MobileNetV2(alpha), or torchvision's mobilenet_v2(width_mult=alpha)
  with ``flavour='torchvision'``.

  Input (B, H, W, 3) preprocessed for the flavour (:func:`preprocess`,
  :func:`preprocess_torchvision`). Returns {'feature_map': (B, ~H/32, ~W/32,
  1280) after Conv_1 + BN + ReLU6 (= Keras include_top=False output),
  'embedding': (B, 1280) f32 global average (= Keras pooling='avg'),
  'stem', 'stage1'..'stage7' (stage outputs, 16..320 channels at alpha 1),
  and 'logits' (B, num_classes) f32 if num_classes > 0}. ``conv_impl``: see
  :func:`m6jax.models.conv.resolve`.
  """
  num_classes: int = 0
  dtype: Any = jnp.float32
  alpha: float = 1.0
  conv_impl: str = "auto"
  flavour: str = "keras"

  @nn.compact
  def __call__(self, x, train: bool = False):
    fn = conv.conv_fn(self.conv_impl)
    _flavour(self.flavour)  # a clear error for an unknown flavour
    x = jnp.asarray(x, self.dtype)
    out = {}
    # Keras: padding='same' stride 2 (== correct_pad + 'valid'); torch: 1 each side.
    pad = "SAME" if self.flavour == "keras" else _strided_pad(self.flavour, x.shape[1:3])
    x = nn.Conv(make_divisible(32 * self.alpha), (3, 3), (2, 2), padding=pad,
                use_bias=False, dtype=self.dtype, conv_general_dilated=fn,
                name="stem_conv")(x)
    x = nn.relu6(_bn(train, self.dtype, "stem_bn", self.flavour)(x))
    out["stem"] = x
    for s, (t, c, n, stride) in enumerate(STAGES, 1):
      # Keras rounds int(c * alpha), torchvision c * alpha: the same widths at
      # alpha 1 (torchvision's only ImageNet weights).
      filters = make_divisible(int(c * self.alpha))
      for b in range(n):
        x = InvertedResidual(filters, t, stride if b == 0 else 1, dtype=self.dtype,
                             conv_impl=self.conv_impl, flavour=self.flavour,
                             name=f"stage{s}_block{b}")(x, train)
      out[f"stage{s}"] = x
    last = make_divisible(1280 * self.alpha) if self.alpha > 1.0 else 1280
    x = nn.Conv(last, (1, 1), use_bias=False, dtype=self.dtype, conv_general_dilated=fn,
                name="head_conv")(x)
    x = nn.relu6(_bn(train, self.dtype, "head_bn", self.flavour)(x))
    return {**out, **pooled_outputs(self, x, self.num_classes)}


def keras_table() -> list[tuple[str, tuple[str, ...], str]]:
  """(Keras layer name, Flax module path, kind) for the backbone."""
  t = [("Conv1", ("stem_conv",), "conv_nobias"), ("bn_Conv1", ("stem_bn",), "bn")]
  block_id = 0
  for s, (t_exp, _, n, _) in enumerate(STAGES, 1):
    for b in range(n):
      f = f"stage{s}_block{b}"
      k = f"block_{block_id}_" if block_id else "expanded_conv_"
      if t_exp != 1:
        t += [(f"{k}expand", (f, "expand"), "conv_nobias"),
              (f"{k}expand_BN", (f, "expand_bn"), "bn")]
      t += [(f"{k}depthwise", (f, "depthwise"), "dw"),
            (f"{k}depthwise_BN", (f, "depthwise_bn"), "bn"),
            (f"{k}project", (f, "project"), "conv_nobias"),
            (f"{k}project_BN", (f, "project_bn"), "bn")]
      block_id += 1
  t += [("Conv_1", ("head_conv",), "conv_nobias"), ("Conv_1_bn", ("head_bn",), "bn")]
  return t


def load_keras(path, num_classes: int | None = 0, alpha: float = 1.0) -> dict:
  """Keras MobileNetV2 weight file (.h5 legacy/ImageNet cache or .weights.h5)
  -> {'params', 'batch_stats'} for ``MobileNetV2(num_classes, alpha=alpha)``.

  num_classes: 0 -> backbone only (a head in the file is ignored); None -> the
  head if the file has one; N -> the file's N-class 'predictions' head.
  """
  return load_backbone(path, num_classes, keras_table(),
                       lambda n: MobileNetV2(num_classes=n, alpha=alpha))
