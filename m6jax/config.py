"""Config validation, once, at startup: every error names its key and the allowed values.

`validate(cfg)` runs before any data work (m6jax.main, m6jax.experiment) and
raises ConfigError with ONE line per problem, e.g.

  train.bn='frozen' was renamed: use 'fixed' (allowed: fixed, update)
  seeds=0: must be an integer >= 1
  data.nonexistent: unknown key (known in data: augment, batch_size, ...)

Known keys are those of m6jax.defaults.base_config(); `train.groups` holds free
group names whose entries are checked here.
"""

from __future__ import annotations

import codecs
import re

from m6jax import defaults
from m6jax.evaluate import evals
from m6jax.explain import gradcam
from m6jax.models import fusion, towers


class ConfigError(ValueError):
  """A config value or key is not valid; the message names the key."""


CHOICES = {
    "model.fusion": fusion.MODES,
    "model.norm": fusion.NORMS,
    "model.dtype": ("float32", "bfloat16"),
    "model.image.name": towers.IMAGE_TOWERS,
    "model.text.name": towers.TEXT_TOWERS,
    "train.mode": ("frozen", "finetune"),
    "train.bn": ("fixed", "update"),
    "train.data_order": ("per_seed", "shared"),
    "train.replica_loop": ("auto", "vmap", "map"),
    "train.select_by": ("log_loss", "macro_f1"),
    "data.on_bad_row": ("skip", "fail"),
    "data.rare_classes": ("drop", "fail"),
    "explain.method": gradcam.METHODS,
    "explain.ig_baseline": ("pad", "zero"),   # m6jax.explain.text.BASELINES
}
# (key, old value) -> new value, for values whose meaning was renamed.
RENAMED = {("train.bn", "frozen"): "fixed"}
MIN = {   # key -> smallest allowed value
    "seeds": 1, "seed": 0, "train.epochs": 1, "train.batch_size": 1, "data.batch_size": 1,
    "data.image_size": 1, "data.store_size": 1, "data.max_text_length": 1,
    "data.label_depth": 1, "data.max_image_pixels": 1, "data.max_image_side": 1,
    "data.min_class_count": 0, "data.split_seed": 0, "train.repeats": 1,
    "train.log_every": 1, "train.checkpoint_every": 1, "train.warmup_steps": 0, "model.hidden": 0,
    "model.text.tfidf_dim": 1, "explain.n_per_class": 1, "mesh.seed": 0, "mesh.data": 0,
    "evaluate.bootstrap_resamples": 2000, "evaluate.bootstrap_seed": 0,
    "explain.ig_steps": 1, "explain.words_max": 0, "explain.sample": 1,
    "feasibility_opts.tsne_max": 2, "feasibility_opts.kmeans_minibatch_from": 1,
    "feasibility_opts.kmeans_batch_size": 1,
}
UNIT = ("model.dropout", "model.modality_dropout", "train.label_smoothing")   # in [0, 1)
GROUP_KEYS = ("regex", "lr_mult", "unfreeze_at", "unfreeze_at_epoch")
FREE = defaults.FREE


def _get(cfg, key: str):
  node = cfg
  for part in key.split("."):
    node = node[part]
  return node


def _flat_keys(node, prefix="") -> dict:
  """{dotted key: value} of a ConfigDict/dict tree (free dicts kept whole)."""
  out = {}
  for k in node.keys():
    key = f"{prefix}{k}"
    v = node[k]
    if hasattr(v, "keys") and key not in FREE:
      out.update(_flat_keys(v, key + "."))
    else:
      out[key] = v
  return out


def _unknown_keys(cfg) -> list[str]:
  known = _flat_keys(defaults.base_config())
  errors = []
  for key in _flat_keys(cfg):
    if key not in known:
      section = key.rpartition(".")[0]
      siblings = sorted(k.rpartition(".")[2] for k in known if k.rpartition(".")[0] == section)
      where = f"in {section}" if section else "at the top level"
      errors.append(f"{key}: unknown key (known {where}: {', '.join(siblings)})")
  return errors


def _check_groups(groups) -> list[str]:
  errors = []
  for name in groups.keys():
    spec = dict(groups[name])
    key = f"train.groups.{name}"
    extra = sorted(set(spec) - set(GROUP_KEYS))
    if extra:
      errors.append(f"{key}: unknown field(s) {extra} (allowed: {', '.join(GROUP_KEYS)})")
    if "regex" not in spec:
      errors.append(f"{key}: needs a 'regex'")
    else:
      try:
        re.compile(spec["regex"])
      except re.error as e:
        errors.append(f"{key}.regex={spec['regex']!r}: not a regular expression ({e})")
    if float(spec.get("lr_mult", 1.0)) < 0:
      errors.append(f"{key}.lr_mult={spec['lr_mult']}: must be >= 0")
    if spec.get("unfreeze_at", 0) and spec.get("unfreeze_at_epoch", 0):
      errors.append(f"{key}: give unfreeze_at (steps) or unfreeze_at_epoch, not both")
  return errors


def problems(cfg) -> list[str]:
  """Every problem of `cfg`, one line each (empty when valid)."""
  errors = _unknown_keys(cfg)
  if errors:
    return errors   # the value checks below assume the known structure
  for key, allowed in CHOICES.items():
    v = _get(cfg, key)
    if (key, v) in RENAMED:
      errors.append(f"{key}={v!r} was renamed: use {RENAMED[key, v]!r} "
                    f"(allowed: {', '.join(allowed)})")
    elif v not in allowed:
      errors.append(f"{key}={v!r}: must be one of {', '.join(allowed)}")
  for key, low in MIN.items():
    v = _get(cfg, key)
    if isinstance(v, bool) or not isinstance(v, int) or v < low:
      errors.append(f"{key}={v!r}: must be an integer >= {low}")
  for key in UNIT:
    v = _get(cfg, key)
    if not isinstance(v, (int, float)) or not 0 <= v < 1:
      errors.append(f"{key}={v!r}: must be a number in [0, 1)")
  for m, w in dict(cfg.model.modality_weights).items():
    if isinstance(w, bool) or not isinstance(w, (int, float)) or not w > 0:
      errors.append(f"model.modality_weights.{m}={w!r}: must be a number > 0")
  try:
    codecs.lookup(cfg.data.encoding)
  except (LookupError, TypeError):
    errors.append(f"data.encoding={cfg.data.encoding!r}: not a codec Python knows")
  if not cfg.train.learning_rate > 0:
    errors.append(f"train.learning_rate={cfg.train.learning_rate!r}: must be > 0")
  split = dict(cfg.data.split)
  if sorted(split) != ["test", "train", "validation"] or min(split.values()) <= 0 or \
     abs(sum(split.values()) - 1) > 1e-6:
    errors.append(f"data.split={split}: needs train, validation and test fractions > 0 "
                  "summing to 1")
  folds = cfg.train.folds
  if isinstance(folds, bool) or not isinstance(folds, int) or folds < 0 or folds == 1:
    errors.append(f"train.folds={folds!r}: must be 0 (no cross-validation) or an integer >= 2")
  elif folds and cfg.train.mode != "frozen":
    errors.append(f"train.folds={folds}: cross-validation needs train.mode='frozen'")
  repeats = cfg.train.repeats
  if isinstance(repeats, int) and repeats > 1 and not folds:
    errors.append(f"train.repeats={cfg.train.repeats!r}: repeats need train.folds >= 2")
  errors += _check_groups(cfg.train.groups)
  names = list(cfg.evals) if isinstance(cfg.evals, (list, tuple)) else [cfg.evals]
  unknown = [n for n in names if n not in evals.EVALS]
  if unknown or "test_scores" not in names or len(set(names)) != len(names):
    errors.append(f"evals={tuple(names)!r}: a list of distinct names from "
                  f"{', '.join(evals.EVALS)}, with test_scores")
  return errors


def validate(cfg) -> None:
  """Raises ConfigError listing every problem of `cfg` (one line each)."""
  errors = problems(cfg)
  if errors:
    raise ConfigError("; ".join(errors) if len(errors) == 1 else
                      f"{len(errors)} config errors: " + "; ".join(errors))
