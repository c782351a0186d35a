"""Tiny and fast: random tiny towers, 2 seeds, 2 epochs. For tests and first runs."""

from configs.base import base_config


def get_config():
  c = base_config()
  c.name = "smoke"
  c.model.image.name = "tiny"
  c.model.image.weights = "none"
  c.model.text.name = "tfidf"
  c.model.text.weights = "none"
  c.model.text.tfidf_dim = 16
  c.model.hidden = 32
  c.data.image_size = 32
  c.train.epochs = 2
  c.train.batch_size = 8
  c.seeds = 2
  c.feasibility = False
  c.explain.enabled = False
  return c
