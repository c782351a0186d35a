"""EfficientNet-B0 (Keras layout) and EfficientNet-Lite0/1/2 (TF-Lite builder) in Flax Linen.

One module, ``EfficientNet(variant)``, with variants:
  * 'b0'    -- keras.applications.EfficientNetB0: swish, squeeze-excitation;
  * 'lite0', 'lite1', 'lite2' -- EfficientNet-Lite: ReLU6, no SE, stem (32) and
    head (1280) not scaled, first/last stage repeats not scaled.
All convolutions use TF 'SAME' padding (asymmetric for stride 2: the extra
pixel goes after), which is what both Keras and the lukemelas/TF-Lite
reference do; BatchNorm eps 1e-3, momentum 0.99 (TF convention).

Convolutions go through :mod:`m6jax.models.conv` (``conv_impl``: 'auto' = the
fast depthwise/1x1/stem forms on CPU, lax elsewhere); parameters are those of
``nn.Conv`` either way.

Weight import lives in :mod:`m6jax.models.efficientnet_convert`.

Parameter paths: ``stem/{conv,bn}``, ``block{stage}_{i}/{expand,dw,se,project}``
(stage 1..7, i from 0), ``head/{conv,bn}``, ``classifier``.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Callable
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp

from m6jax.models import common, conv
from m6jax.models.common import make_divisible

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


def variant_config(variant: str) -> Config:
  """The Config of a variant; ValueError naming the known variants."""
  if variant not in CONFIGS:
    raise ValueError(f"unknown EfficientNet variant {variant!r}; known: {VARIANTS}")
  return CONFIGS[variant]


def _round_filters(filters: int, width: float) -> int:
  """TF rounding of width-scaled channel counts (EfficientNet's round_filters)."""
  return make_divisible(filters * width)


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
  cfg = variant_config(variant)
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
  cfg = variant_config(variant)
  return 32 if cfg.lite else _round_filters(32, cfg.width)


def head_features(variant: str) -> int:
  cfg = variant_config(variant)
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
  return preprocess_lite if variant_config(variant).lite else preprocess_b0


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
  conv_impl: str = "auto"

  @nn.compact
  def __call__(self, x, train: bool = False):
    x = nn.Conv(self.features, (self.kernel, self.kernel), (self.stride, self.stride),
                padding="SAME", feature_group_count=self.groups, use_bias=False,
                dtype=self.dtype, conv_general_dilated=conv.conv_fn(self.conv_impl),
                name="conv")(x)
    x = nn.BatchNorm(use_running_average=not train, momentum=_BN_MOMENTUM,
                     epsilon=_BN_EPS, dtype=self.dtype, name="bn")(x)
    return x if self.act is None else self.act(x)


class SqueezeExcite(nn.Module):
  """x * sigmoid(expand(act(reduce(mean_hw(x))))) with 1x1 convs (Keras shapes)."""
  reduced: int
  act: Callable
  dtype: Any = jnp.float32
  conv_impl: str = "auto"

  @nn.compact
  def __call__(self, x):
    fn = conv.conv_fn(self.conv_impl)
    s = jnp.mean(x, axis=(1, 2), keepdims=True)
    s = self.act(nn.Conv(self.reduced, (1, 1), dtype=self.dtype, conv_general_dilated=fn,
                         name="reduce")(s))
    s = nn.Conv(x.shape[-1], (1, 1), dtype=self.dtype, conv_general_dilated=fn,
                name="expand")(s)
    return x * jax.nn.sigmoid(s)


class MBConv(nn.Module):
  """Inverted residual block: [expand 1x1] -> depthwise kxk -> [SE] -> project 1x1."""
  spec: BlockSpec
  act: Callable
  dtype: Any = jnp.float32
  conv_impl: str = "auto"

  @nn.compact
  def __call__(self, inputs, train: bool = False):
    sp = self.spec
    mid = sp.filters_in * sp.expand_ratio
    kw = {"dtype": self.dtype, "conv_impl": self.conv_impl}
    x = inputs
    if sp.expand_ratio != 1:
      x = ConvBN(mid, 1, act=self.act, name="expand", **kw)(x, train)
    x = ConvBN(mid, sp.kernel, sp.stride, groups=mid, act=self.act, name="dw", **kw)(x, train)
    if sp.se_filters:
      x = SqueezeExcite(sp.se_filters, self.act, name="se", **kw)(x)
    x = ConvBN(sp.filters_out, 1, name="project", **kw)(x, train)
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
  'dropout' rng (stochastic depth, classifier dropout). ``conv_impl``: see
  :func:`m6jax.models.conv.resolve`.
  """
  variant: str
  num_classes: int = 0
  dtype: Any = jnp.float32
  drop_connect_rate: float | None = None  # None: the variant's default (0.2)
  conv_impl: str = "auto"

  @nn.compact
  def __call__(self, x, train: bool = False):
    cfg = variant_config(self.variant)
    act = jax.nn.relu6 if cfg.lite else jax.nn.swish
    kw = {"dtype": self.dtype, "conv_impl": self.conv_impl}
    x = jnp.asarray(x, self.dtype)
    x = ConvBN(stem_features(self.variant), 3, 2, act=act, name="stem", **kw)(x, train)
    self.sow("intermediates", "stage0", x)  # stem output
    specs = block_specs(self.variant)
    for i, sp in enumerate(specs):
      if self.drop_connect_rate is not None:
        sp = dataclasses.replace(
            sp, drop_rate=self.drop_connect_rate * i / len(specs))
      x = MBConv(sp, act, name=sp.name, **kw)(x, train)
      if i + 1 == len(specs) or specs[i + 1].stage != sp.stage:
        self.sow("intermediates", f"stage{sp.stage}", x)
    x = ConvBN(head_features(self.variant), 1, act=act, name="head", **kw)(x, train)
    fmap = self.perturb("feature_map", x)
    emb = common.global_average(fmap)
    out = {"feature_map": fmap, "embedding": emb}
    if self.num_classes > 0:
      h = nn.Dropout(cfg.dropout)(emb, deterministic=not train)
      out["logits"] = nn.Dense(self.num_classes, dtype=jnp.float32, name="classifier")(h)
    return out
