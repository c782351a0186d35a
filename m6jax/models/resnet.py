"""ResNet50 (keras.applications v1 layout) in Flax Linen, with Keras weight import.

Keras v1 specifics kept: conv biases everywhere, stride on the first 1x1 conv
of a block, BN eps 1.001e-5 (momentum 0.99), stem = ZeroPadding2D(3) + 7x7/2
'valid' conv, ZeroPadding2D(1) + 3x3/2 max pool.

Parameter paths: ``stem/{conv,bn}``, ``stage{1..4}_block{i}/{conv1,bn1,conv2,
bn2,conv3,bn3[,proj_conv,proj_bn]}`` (Keras conv2..conv5 = stage1..stage4,
block1.. = block0..), ``classifier`` (Keras 'predictions').
"""

from __future__ import annotations

from typing import Any

import flax.linen as nn
import jax.numpy as jnp

from m6jax.models.common import pooled_outputs
from m6jax.models.weights.keras_h5 import load_backbone
from m6jax.models.vgg import preprocess_caffe

FEATURE_DIM = 2048
STAGES = ((64, 3, 1), (128, 4, 2), (256, 6, 2), (512, 3, 2))  # (filters, blocks, stride)
BN_EPS = 1.001e-5
BN_MOMENTUM = 0.99
# BatchNorm uses two-pass variance (use_fast_variance=False) like Keras's
# jnp.var: E[x^2]-E[x]^2 loses digits on small batches in train mode.

preprocess = preprocess_caffe  # RGB 0..255 -> BGR minus ImageNet mean


class ConvBN(nn.Module):
  """Conv (with bias, as Keras) + BatchNorm [+ ReLU]."""
  features: int
  kernel: int
  stride: int = 1
  padding: Any = "SAME"
  relu: bool = True
  dtype: Any = jnp.float32

  @nn.compact
  def __call__(self, x, train: bool = False):
    x = nn.Conv(self.features, (self.kernel, self.kernel), (self.stride, self.stride),
                padding=self.padding, dtype=self.dtype, name="conv")(x)
    x = nn.BatchNorm(use_running_average=not train, momentum=BN_MOMENTUM,
                     epsilon=BN_EPS, use_fast_variance=False,
                     dtype=self.dtype, name="bn")(x)
    return nn.relu(x) if self.relu else x


class Bottleneck(nn.Module):
  """Keras residual_block_v1: 1x1/s -> 3x3 -> 1x1 (4*filters), + shortcut.

  (B, H, W, C) -> (B, H/stride, W/stride, 4*filters).
  """
  filters: int
  stride: int = 1
  conv_shortcut: bool = False
  dtype: Any = jnp.float32

  @nn.compact
  def __call__(self, x, train: bool = False):
    def conv(f, k, s, name):
      # 1x1 convs are 'valid' in Keras; the 3x3 is 'same'.
      return nn.Conv(f, (k, k), (s, s), padding="SAME" if k > 1 else "VALID",
                     dtype=self.dtype, name=name)

    def bn(name):
      return nn.BatchNorm(use_running_average=not train, momentum=BN_MOMENTUM,
                          epsilon=BN_EPS, use_fast_variance=False,
                          dtype=self.dtype, name=name)

    shortcut = x
    if self.conv_shortcut:
      shortcut = bn("proj_bn")(conv(4 * self.filters, 1, self.stride, "proj_conv")(x))
    y = nn.relu(bn("bn1")(conv(self.filters, 1, self.stride, "conv1")(x)))
    y = nn.relu(bn("bn2")(conv(self.filters, 3, 1, "conv2")(y)))
    y = bn("bn3")(conv(4 * self.filters, 1, 1, "conv3")(y))
    return nn.relu(shortcut + y)


class ResNet50(nn.Module):
  """keras.applications.ResNet50.

  Input (B, H, W, 3) caffe-preprocessed. Returns {'feature_map': (B, ~H/32,
  ~W/32, 2048) (= Keras include_top=False output), 'embedding': (B, 2048) f32
  global average (= Keras pooling='avg'), 'stem' (B, ~H/4, ~W/4, 64) after the
  max pool, 'stage1'..'stage3' (256, 512, 1024 channels), and 'logits'
  (B, num_classes) f32 if num_classes > 0}.
  """
  num_classes: int = 0
  dtype: Any = jnp.float32

  @nn.compact
  def __call__(self, x, train: bool = False):
    x = jnp.asarray(x, self.dtype)
    out = {}
    # ZeroPadding2D(3) + 'valid' 7x7/2 conv == explicit symmetric padding 3.
    x = ConvBN(64, 7, 2, padding=((3, 3), (3, 3)), dtype=self.dtype,
               name="stem")(x, train)
    # Keras pads with zeros (not -inf) before the pool; after ReLU that is the
    # same, but keep it literal.
    x = jnp.pad(x, ((0, 0), (1, 1), (1, 1), (0, 0)))
    x = nn.max_pool(x, (3, 3), strides=(2, 2), padding="VALID")
    out["stem"] = x
    for s, (filters, blocks, stride) in enumerate(STAGES, 1):
      for b in range(blocks):
        x = Bottleneck(filters, stride if b == 0 else 1, conv_shortcut=b == 0,
                       dtype=self.dtype, name=f"stage{s}_block{b}")(x, train)
      if s < len(STAGES):
        out[f"stage{s}"] = x
    return {**out, **pooled_outputs(self, x, self.num_classes)}


def keras_table() -> list[tuple[str, tuple[str, ...], str]]:
  """(Keras layer name, Flax module path, kind) for the backbone."""
  t = [("conv1_conv", ("stem", "conv"), "conv"), ("conv1_bn", ("stem", "bn"), "bn")]
  for s, (_, blocks, _) in enumerate(STAGES, 1):
    for b in range(blocks):
      k, f = f"conv{s + 1}_block{b + 1}", f"stage{s}_block{b}"
      parts = [("1", "conv1", "bn1"), ("2", "conv2", "bn2"), ("3", "conv3", "bn3")]
      if b == 0:
        parts.append(("0", "proj_conv", "proj_bn"))
      for kn, cname, bname in parts:
        t.append((f"{k}_{kn}_conv", (f, cname), "conv"))
        t.append((f"{k}_{kn}_bn", (f, bname), "bn"))
  return t


def load_keras(path, num_classes: int | None = 0) -> dict:
  """Keras ResNet50 weight file (.h5 legacy/ImageNet cache or .weights.h5) ->
  {'params', 'batch_stats'} for ``ResNet50(num_classes)``.

  num_classes: 0 -> backbone only (a head in the file is ignored); None -> the
  head if the file has one; N -> the file's N-class 'predictions' head.
  """
  return load_backbone(path, num_classes, keras_table(),
                       lambda n: ResNet50(num_classes=n))
