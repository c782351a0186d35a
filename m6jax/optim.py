"""Optimizers: schedules and weight-decay masks over parameter paths."""

from __future__ import annotations

import flax.traverse_util
import jax
import optax


def path_str(path) -> str:
  """A key path -> 'fusion/head/out/kernel'."""
  return "/".join(str(getattr(k, "key", getattr(k, "name", k))) for k in path)


def decay_mask(params):
  """True for leaves that get weight decay: kernels, not biases or norm scales."""
  flat = flax.traverse_util.flatten_dict(params)
  return flax.traverse_util.unflatten_dict(
      {k: k[-1] in ("kernel", "embedding") for k in flat})


def schedule(lr: float, total_steps: int, warmup_steps: int) -> optax.Schedule:
  """Linear warmup to `lr`, then cosine decay to 0 at `total_steps`."""
  warmup = max(0, min(warmup_steps, total_steps - 1))
  return optax.warmup_cosine_decay_schedule(
      0.0, lr, warmup, max(total_steps, warmup + 1), end_value=0.0)


def make_optimizer(train_cfg, total_steps: int) -> optax.GradientTransformation:
  """AdamW with warmup + cosine and no decay on biases and norms."""
  return optax.adamw(schedule(train_cfg.learning_rate, total_steps, train_cfg.warmup_steps),
                     weight_decay=train_cfg.weight_decay, mask=decay_mask)
