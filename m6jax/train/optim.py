"""Optimizers: parameter groups by regex, per-group learning rates, unfreezing.

A group is chosen by a regex over parameter paths such as
'image/stage4_block0/conv1/kernel'; every parameter must match exactly one
group (checked). Each group gets AdamW with its own schedule:

  lr_g(step) = lr_mult_g * warmup_cosine(step - unfreeze_at_g)   if step >= unfreeze_at_g
             = 0                                                  otherwise

so gradual unfreezing is a schedule, not a recompile. `unfreeze_at` counts
optimizer steps; a group may give `unfreeze_at_epoch` instead (epochs, turned
into steps with the run's steps per epoch, which depends on the data). A group with
lr_mult 0 is frozen for the whole run: `optax.set_to_zero()`, no Adam state.

Adam moments at LR 0: while a group waits to unfreeze, its first and second
moments keep accumulating its gradients (only the step size is 0, and the
decoupled weight decay is scaled by the same LR, so the parameters do not
move). At unfreezing the group starts with warm moment estimates.
"""

from __future__ import annotations

import re

import jax
import jax.numpy as jnp
import optax

DECAY_LEAVES = ("kernel", "embedding")  # no decay on biases, norm scales/offsets


def path_str(path) -> str:
  """A jax key path -> 'fusion/head/out/kernel'."""
  return "/".join(str(getattr(k, "key", getattr(k, "name", getattr(k, "idx", k))))
                  for k in path)


def param_paths(params) -> list[str]:
  return [path_str(p) for p, _ in jax.tree_util.tree_leaves_with_path(params)]


def decay_mask(params):
  """Pytree of bools: True where weight decay applies (kernels, embeddings).

  Works on the partial trees `optax.multi_transform` passes (MaskedNode has
  no leaves, so tree_map leaves it in place).
  """
  return jax.tree_util.tree_map_with_path(
      lambda p, _: path_str(p).rsplit("/", 1)[-1] in DECAY_LEAVES, params)


def schedule(lr: float, total_steps: int, warmup_steps: int,
             start: int = 0) -> optax.Schedule:
  """0 before `start`; then linear warmup to `lr` and cosine decay to 0 at `total_steps`."""
  span = max(1, total_steps - start)
  warmup = max(0, min(warmup_steps, span - 1))
  base = optax.warmup_cosine_decay_schedule(0.0, lr, warmup, max(span, warmup + 1), 0.0)
  if start <= 0:
    return base
  return lambda step: jnp.where(step >= start, base(jnp.maximum(step - start, 0)), 0.0)


def group_labels(params, groups: dict) -> tuple[dict, dict]:
  """Assigns each leaf to the one group whose regex fully matches its path.

  groups: {name: {'regex': str, ...}}. Returns (labels pytree, {group: [paths]}).
  Raises ValueError naming every parameter that matches no group or several.
  """
  compiled = {g: re.compile(spec["regex"]) for g, spec in groups.items()}
  members: dict = {g: [] for g in groups}
  problems = []

  def label(path, _):
    p = path_str(path)
    hits = [g for g, rx in compiled.items() if rx.fullmatch(p)]
    if len(hits) != 1:
      problems.append(f"{p}: matches {hits or 'no group'}")
      return "?"
    members[hits[0]].append(p)
    return hits[0]

  labels = jax.tree_util.tree_map_with_path(label, params)
  if problems:
    raise ValueError("every parameter must fall in exactly one group:\n  "
                     + "\n  ".join(problems[:50]))
  return labels, members


def unfreeze_step(spec, steps_per_epoch: int = 1) -> int:
  """A group's first trained step: `unfreeze_at` steps, or `unfreeze_at_epoch` epochs."""
  spec = dict(spec)
  at, at_epoch = int(spec.get("unfreeze_at", 0)), spec.get("unfreeze_at_epoch", 0)
  if at and at_epoch:
    raise ValueError(f"a group gives both unfreeze_at={at} and unfreeze_at_epoch={at_epoch}")
  return at or round(float(at_epoch) * steps_per_epoch)


def make_optimizer(train_cfg, total_steps: int, params=None,
                   steps_per_epoch: int = 1) -> optax.GradientTransformation:
  """AdamW per group (see module doc). Without `train_cfg.groups`, one group 'all'."""
  groups = dict(train_cfg.get("groups") or {}) or {"all": {"regex": ".*"}}
  txs, labels = {}, None
  for name, spec in groups.items():
    spec = dict(spec)
    mult = float(spec.get("lr_mult", 1.0))
    start = unfreeze_step(spec, steps_per_epoch)
    if mult == 0.0:
      txs[name] = optax.set_to_zero()
      continue
    sched = schedule(train_cfg.learning_rate * mult, total_steps, train_cfg.warmup_steps, start)
    txs[name] = optax.adamw(sched, weight_decay=train_cfg.weight_decay, mask=decay_mask)
  if len(groups) == 1 and params is None:
    return txs[next(iter(groups))]
  if params is None:
    raise ValueError("parameter groups need `params` to label the tree")
  labels, _ = group_labels(params, groups)
  return optax.multi_transform(txs, labels)


def describe_groups(params, groups: dict, steps_per_epoch: int = 1) -> str:
  """One line per group: name, lr_mult, unfreeze_at, leaves, parameter count."""
  if not groups:
    return "one group: all parameters"
  labels, members = group_labels(params, groups)
  sizes = {}
  for lab, x in zip(jax.tree.leaves(labels), jax.tree.leaves(params)):
    sizes[lab] = sizes.get(lab, 0) + x.size
  return "\n".join(
      f"{g:>12}: lr x{dict(s).get('lr_mult', 1.0):g}, from step {unfreeze_step(s, steps_per_epoch)}"
      f", {len(members[g])} tensors, {sizes.get(g, 0):,} params" for g, s in groups.items())
