"""Pieces shared by the image backbones' Flax modules."""

from __future__ import annotations

import flax.linen as nn
import jax.numpy as jnp


def make_divisible(v: float, divisor: int = 8) -> int:
  """Channel count ``v`` rounded to a multiple of ``divisor``, never more than 10% down.

  Keras/TF ``_make_divisible``, used by MobileNetV2 (alpha) and EfficientNet
  (``round_filters`` of the width-scaled count).
  """
  new = max(divisor, int(v + divisor / 2) // divisor * divisor)
  if new < 0.9 * v:
    new += divisor
  return new


def global_average(feature_map):
  """(B, h, w, c) -> (B, c) float32 mean over h, w: every backbone's 'embedding'."""
  return jnp.mean(feature_map.astype(jnp.float32), axis=(1, 2))


def pooled_outputs(module: nn.Module, x, num_classes: int) -> dict:
  """Final map ``x`` -> {'feature_map', 'embedding' (f32 global average),
  'logits' (f32, if num_classes > 0)}.

  Call from ``module``'s compact ``__call__``: the 'feature_map' perturbation
  and the 'classifier' Dense then belong to ``module``, so variable paths are
  the same as when written inline (checkpoints and optimizer regexes use them).
  """
  fmap = module.perturb("feature_map", x)
  emb = global_average(fmap)
  out = {"feature_map": fmap, "embedding": emb}
  if num_classes > 0:
    out["logits"] = nn.Dense(num_classes, dtype=jnp.float32, name="classifier")(emb)
  return out
