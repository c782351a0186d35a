"""Fused text + image with a chosen head: --config configs/fusion.py:gated

Modes: early (concat, the default job), late (per-modality heads, learned
logit weights), gated (per-example modality gates, reported in results.json).
"""

from configs.base import base_config


def get_config(mode: str = "early"):
  c = base_config()
  c.name = f"fusion_{mode}"
  c.model.fusion = mode
  return c
