"""Training: seed replicas as one vmapped, jitted program.

`states = jax.vmap(init)(keys)`; `jax.jit(jax.vmap(train_epoch))` advances
all K replicas at once. Replica k is seeded with `seed + k`, so it matches a
solo run with that seed.
"""

from __future__ import annotations

import logging
from typing import Any

import flax
import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax
import tqdm

from m6jax import metrics as metrics_lib
from m6jax import optim
from m6jax.models import fusion

log = logging.getLogger(__name__)


@flax.struct.dataclass
class TrainState:
  step: jax.Array
  params: Any
  opt_state: Any


class NonFiniteLoss(FloatingPointError):
  """The loss became NaN or inf."""


def replica_keys(seed: int, num: int) -> jax.Array:
  """(K,) typed keys; replica k uses `jax.random.key(seed + k)`."""
  return jax.vmap(jax.random.key)(jnp.arange(num) + seed)


def head_module(cfg, num_classes: int) -> fusion.FusionHead:
  m = cfg.model
  return fusion.FusionHead(mode=m.fusion, num_classes=num_classes, hidden=m.hidden,
                           dropout=m.dropout, modality_dropout=m.modality_dropout)


def loss_fn(logits, labels, mask, num_classes: int, smoothing: float = 0.0):
  """Mean softmax cross-entropy over valid (mask) rows."""
  targets = optax.smooth_labels(jax.nn.one_hot(labels, num_classes), smoothing)
  per = optax.softmax_cross_entropy(logits, targets)
  mask = mask.astype(per.dtype)
  return jnp.sum(per * mask) / jnp.maximum(mask.sum(), 1.0)


class FrozenTrainer:
  """Trains a fusion head on cached embeddings for K seeds at once.

  Args:
    cfg: the run config (model.*, train.*, seeds, seed).
    num_classes: C.
    feature_dims: {'image': Di, 'text': Dt} for the modalities the head reads.
    num_train: number of training examples (fixes the steps per epoch).
  """

  def __init__(self, cfg, num_classes: int, feature_dims: dict, num_train: int):
    self.cfg = cfg
    self.num_classes = num_classes
    self.head = head_module(cfg, num_classes)
    self.mods = fusion.modalities(cfg.model.fusion)
    self.dims = {m: feature_dims[m] for m in self.mods}
    self.batch_size = min(cfg.train.batch_size, num_train)
    self.steps_per_epoch = max(1, num_train // self.batch_size)
    self.total_steps = self.steps_per_epoch * cfg.train.epochs
    self.tx = optim.make_optimizer(cfg.train, self.total_steps)
    self.init = jax.jit(jax.vmap(self._init))
    self.train_epoch = jax.jit(jax.vmap(self._train_epoch, in_axes=(0, None, None, 0, None)),
                               donate_argnums=(0,))
    self.predict = jax.jit(jax.vmap(self._predict, in_axes=(0, None)))

  def _init(self, key) -> TrainState:
    dummy = {m: jnp.zeros((1, d), jnp.float32) for m, d in self.dims.items()}
    params = self.head.init({"params": jax.random.fold_in(key, 0)}, dummy)["params"]
    return TrainState(jnp.zeros((), jnp.int32), params, self.tx.init(params))

  def _train_epoch(self, state: TrainState, feats: dict, labels, key, epoch):
    """One epoch for one replica: permutation from `key` (or the shared key), scanned steps."""
    n = labels.shape[0]
    order_key = key if self.cfg.train.data_order == "per_seed" else jax.random.key(
        self.cfg.seed)
    perm = jax.random.permutation(jax.random.fold_in(jax.random.fold_in(order_key, 1), epoch), n)
    idx = perm[: self.steps_per_epoch * self.batch_size].reshape(
        self.steps_per_epoch, self.batch_size)
    drop_key = jax.random.fold_in(jax.random.fold_in(key, 2), epoch)

    def step(state, batch_idx):
      emb = {m: feats[m][batch_idx] for m in self.mods}
      y = labels[batch_idx]
      rng = jax.random.fold_in(drop_key, state.step)

      def loss_of(params):
        out = self.head.apply({"params": params}, emb, train=True, rngs={"dropout": rng})
        return loss_fn(out["logits"], y, jnp.ones_like(y, bool), self.num_classes,
                       self.cfg.train.label_smoothing)

      loss, grads = jax.value_and_grad(loss_of)(state.params)
      updates, opt_state = self.tx.update(grads, state.opt_state, state.params)
      params = optax.apply_updates(state.params, updates)
      return TrainState(state.step + 1, params, opt_state), (loss, optax.global_norm(grads))

    state, (losses, gnorms) = jax.lax.scan(step, state, idx)
    return state, {"loss": losses.mean(), "grad_norm": gnorms.mean()}

  def _predict(self, params, feats: dict):
    out = self.head.apply({"params": params}, {m: feats[m] for m in self.mods}, train=False)
    return jax.nn.softmax(out["logits"]), out["weights"]

  def fit(self, train: dict, val: dict, progress: bool = True):
    """Trains all replicas; keeps each replica's parameters from its best
    validation macro-F1 epoch (selection on validation, never on test).

    train / val: {'image': (N, Di), 'text': (N, Dt), 'label': (N,)}.
    Returns (best_params with a leading K axis, history list of dicts).
    """
    cfg = self.cfg
    keys = replica_keys(cfg.seed, cfg.seeds)
    states = self.init(keys)
    feats = {m: jnp.asarray(train[m]) for m in self.mods}
    labels = jnp.asarray(train["label"])
    vfeats = {m: jnp.asarray(val[m]) for m in self.mods}
    vlabels = np.asarray(val["label"])
    best = jax.tree.map(jnp.copy, states.params)
    best_f1 = np.full((cfg.seeds,), -1.0)
    history = []
    bar = tqdm.trange(cfg.train.epochs, desc="train", disable=not progress, leave=False)
    for epoch in bar:
      states, stats = self.train_epoch(states, feats, labels, keys, epoch)
      loss = np.asarray(stats["loss"])
      if not np.all(np.isfinite(loss)):
        raise NonFiniteLoss(f"non-finite loss at epoch {epoch}: per replica {loss}")
      probs, _ = self.predict(states.params, vfeats)
      val_f1 = np.asarray(batched_metrics(vlabels, np.asarray(probs).argmax(-1),
                                          self.num_classes)["macro_f1"])
      better = val_f1 > best_f1
      best_f1 = np.where(better, val_f1, best_f1)
      sel = jnp.asarray(better)
      best = jax.tree.map(lambda b, p: jnp.where(sel.reshape((-1,) + (1,) * (p.ndim - 1)), p, b),
                          best, states.params)
      rec = {"epoch": epoch, "loss": loss.tolist(), "grad_norm":
             np.asarray(stats["grad_norm"]).tolist(), "val_macro_f1": val_f1.tolist()}
      history.append(rec)
      bar.set_postfix(loss=f"{loss.mean():.3f}", val_f1=f"{val_f1.mean():.3f}")
      if epoch % max(1, cfg.train.log_every) == 0 or epoch == cfg.train.epochs - 1:
        log.info("epoch %d loss %.4f val macro-F1 %.4f (per seed %s)", epoch, loss.mean(),
                 val_f1.mean(), np.round(val_f1, 4).tolist())
    return best, history


def batched_metrics(labels, preds, num_classes: int) -> dict:
  """labels (N,), preds (K, N) -> metrics dict with a leading K axis."""
  return metrics_lib.replica_metrics(labels, preds, num_classes)


def _split_arrays(feats: dict, cols: dict, split: str) -> dict:
  out = {m: f[split] for m, f in feats.items()}
  out["label"] = cols[split]["label"]
  return out


def train_and_evaluate(cfg, workdir: str) -> dict:
  """config -> data -> embeddings -> K-seed training -> test scores in `workdir`.

  Returns the results dict also written to `workdir/results.json`.
  """
  import os
  import time

  from m6jax import embed, results
  from m6jax.data import pipeline, tfds_builder

  t0 = time.time()
  os.makedirs(workdir, exist_ok=True)
  results.write_json(os.path.join(workdir, "config.json"), cfg.to_dict())
  if cfg.train.mode != "frozen":
    raise NotImplementedError(f"train.mode={cfg.train.mode!r}: only 'frozen' is built so far")

  builder, report = tfds_builder.prepare(cfg.data)
  report.write(workdir)
  if report.bad:
    log.warning("%d bad rows skipped; see %s", len(report.bad),
                os.path.join(workdir, "data_report.txt"))
  class_names = tfds_builder.class_names(builder)
  splits = ("train", "validation", "test")
  cols = {s: pipeline.columns(builder.as_data_source(s)) for s in splits}
  for s in splits:
    if not len(cols[s]["label"]):
      raise ValueError(f"split {s!r} is empty; the catalogue is too small for data.split")
  t_data = time.time()

  cache = os.path.join(workdir, "cache")
  feats = {}
  mods = fusion.modalities(cfg.model.fusion)
  if "image" in mods:
    feats["image"] = embed.image_embeddings(cfg, builder, splits, cache, seed=cfg.seed)
  if "text" in mods:
    feats["text"] = embed.text_embeddings(cfg, {s: cols[s]["text"] for s in splits}, cache,
                                          data_id=builder.data_dir)
  t_embed = time.time()

  dims = {m: f["train"].shape[1] for m, f in feats.items()}
  trainer = FrozenTrainer(cfg, len(class_names), dims, len(cols["train"]["label"]))
  params, history = trainer.fit(_split_arrays(feats, cols, "train"),
                                _split_arrays(feats, cols, "validation"))
  t_train = time.time()

  test = _split_arrays(feats, cols, "test")
  probs, weights = trainer.predict(params, {m: jnp.asarray(test[m]) for m in mods})
  scores = results.score(test["label"], probs, class_names)
  extra = {
      "config_name": cfg.name, "seeds": [cfg.seed + k for k in range(cfg.seeds)],
      "fusion": cfg.model.fusion, "modality_weights_mean": dict(zip(
          mods, np.asarray(weights).mean(axis=(0, 1)).tolist())),
      "data": report.to_dict() | {"skipped": len(report.bad)},
      "history": history,
      "timing_s": {"data": t_data - t0, "embeddings": t_embed - t_data,
                   "train": t_train - t_embed, "total": time.time() - t0},
      "devices": [str(d) for d in jax.devices()],
  }
  out = results.write_outputs(workdir, scores, class_names, cols["test"]["uniq_id"],
                              test["label"], probs, extra)
  s = out["test"]["summary"]
  log.info("test accuracy %.4f +- %.4f, macro-F1 %.4f +- %.4f over %d seeds; ensemble acc %.4f",
           s["accuracy"]["mean"], s["accuracy"]["std"], s["macro_f1"]["mean"],
           s["macro_f1"]["std"], cfg.seeds, out["test"]["ensemble"]["accuracy"])
  return out
