"""The main job: text + image fused, pretrained towers frozen, 5 seeds.

MiniLM sentence embeddings + EfficientNet-Lite0 image embeddings, each scaled to
unit length, image weighted 0.5, one linear softmax head (m6jax/defaults.py),
best epoch per seed by validation log-loss. experiments/ablation.md has the
comparison that picked it.
"""

from configs.base import base_config


def get_config():
  c = base_config()
  c.name = "default"
  return c
