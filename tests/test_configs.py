"""Every experiment config loads, and fine-tuning groups cover each backbone exactly."""

import importlib

import flax.linen as nn
import jax
import jax.numpy as jnp
import pytest

from configs import base
from m6jax import optim
from m6jax.models import fusion, towers

CONFIGS = [("default", None), ("smoke", None), ("text_only", None), ("text_only", "tfidf"),
           ("fusion", "early"), ("fusion", "late"), ("fusion", "gated"),
           ("finetune", None), ("finetune", "tiny")] + [
               ("image_only", b) for b in towers.IMAGE_TOWERS]


@pytest.mark.parametrize("name,arg", CONFIGS)
def test_config_loads(name, arg):
  mod = importlib.import_module(f"configs.{name}")
  cfg = mod.get_config(arg) if arg is not None else mod.get_config()
  assert cfg.model.fusion in fusion.MODES
  assert cfg.train.mode in ("frozen", "finetune")
  assert cfg.seeds >= 1 and cfg.data.image_size > 0


def _families():
  from m6jax.models import efficientnet, mobilenet, resnet, tiny, vgg
  return {"tiny": tiny.TinyCNN(), "vgg16": vgg.VGG16(), "resnet50": resnet.ResNet50(),
          "mobilenetv2": mobilenet.MobileNetV2(),
          "efficientnetb0": efficientnet.EfficientNet(variant="b0"),
          "efficientnet-lite0": efficientnet.EfficientNet(variant="lite0")}


class _Model(nn.Module):
  image: nn.Module

  @nn.compact
  def __call__(self, x):
    emb = self.image(x)["embedding"]
    text = nn.Dense(4, name="text")(emb)
    return fusion.FusionHead("early", 7, 8, name="fusion")({"image": emb, "text": text})


@pytest.mark.parametrize("backbone", list(_families()))
def test_finetune_groups_cover_every_parameter_once(backbone):
  model = _Model(_families()[backbone])
  shapes = jax.eval_shape(lambda: model.init(jax.random.key(0),
                                             jnp.zeros((1, 64, 64, 3))))["params"]
  groups = base.finetune_groups(backbone).to_dict()
  _, members = optim.group_labels(shapes, groups)   # raises on gaps and overlaps
  assert members["head"] and members["image_late"] and members["image_early"]
  first = STEM[backbone]   # the input layer is 'early', never 'late'
  assert any(p.startswith(first) for p in members["image_early"])
  assert not any(p.startswith(first) for p in members["image_late"])


STEM = {"tiny": "image/conv0", "vgg16": "image/block1_conv1", "resnet50": "image/stem/",
        "mobilenetv2": "image/stem_conv", "efficientnetb0": "image/stem/",
        "efficientnet-lite0": "image/stem/"}
