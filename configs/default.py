"""The main job: text + image fused, pretrained towers frozen, 5 seeds."""

from configs.base import base_config


def get_config():
  c = base_config()
  c.name = "default"
  return c
