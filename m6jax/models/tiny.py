"""A tiny CNN with the backbone interface, for tests and smoke runs."""

from __future__ import annotations

import flax.linen as nn
import jax.numpy as jnp

from m6jax.models import common

FEATURE_DIM = 32


def preprocess(images):
  """RGB float 0..255, (B, H, W, 3) -> [-1, 1]."""
  return images / 127.5 - 1.0


class TinyCNN(nn.Module):
  """Two strided conv + BN + ReLU layers.

  Input (B, H, W, 3) preprocessed; returns {'feature_map': (B, H/4, W/4, 32),
  'embedding': (B, 32)}.
  """
  width: int = FEATURE_DIM
  dtype: jnp.dtype = jnp.float32

  @nn.compact
  def __call__(self, x, train: bool = False):
    x = x.astype(self.dtype)
    for i, ch in enumerate((self.width // 2, self.width)):
      x = nn.Conv(ch, (3, 3), strides=(2, 2), use_bias=False, dtype=self.dtype,
                  name=f"conv{i}")(x)
      x = nn.BatchNorm(use_running_average=not train, dtype=self.dtype,
                       name=f"bn{i}")(x)
      x = nn.relu(x)
    fmap = self.perturb("feature_map", x)
    return {"feature_map": fmap, "embedding": common.global_average(fmap)}
