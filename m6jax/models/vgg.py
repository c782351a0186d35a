"""VGG16 (keras.applications layout) in Flax Linen, with Keras weight import.

Parameter paths follow Keras layer names: ``block{1..5}_conv{i}``, and with a
head ``fc1``, ``fc2``, ``classifier`` (Keras 'predictions').
"""

from __future__ import annotations

from typing import Any

import flax.linen as nn
import jax.numpy as jnp

from m6jax.models import common
from m6jax.models.weights.keras_h5 import (assign_keras, expected_shapes, head_classes,
                                   read_keras_h5)

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
    out["embedding"] = common.global_average(fmap)
    if self.num_classes > 0:
      h = fmap.reshape(fmap.shape[0], -1)  # NHWC flatten, same order as Keras
      h = nn.relu(nn.Dense(4096, dtype=self.dtype, name="fc1")(h))
      h = nn.relu(nn.Dense(4096, dtype=self.dtype, name="fc2")(h))
      out["logits"] = nn.Dense(self.num_classes, dtype=jnp.float32,
                               name="classifier")(h)
    return out


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
