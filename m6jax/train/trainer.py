"""The K-replica trainers and their shared epoch loop.

`states = jax.vmap(init)(keys)`; `jax.jit(jax.vmap(step))` advances all K
replicas at once, with the pure per-replica steps of m6jax.train.steps bound by
`functools.partial`. Replica k is seeded with `seed + k`, so with per-seed data
order it matches a solo run with that seed.

Two modes share the epoch loop, validation, best-epoch selection and the
checkpoint:
  frozen    heads train on cached tower embeddings (a whole epoch is one
            jitted `lax.scan`, m6jax.train.steps.scan_epoch);
  finetune  towers and head train end to end on image batches
            (m6jax.train.finetune.FinetuneTrainer, on this epoch loop).
"""

from __future__ import annotations

import functools
import logging
import time

import jax
import jax.numpy as jnp
import numpy as np
import tqdm

from m6jax import console
from m6jax import mesh as mesh_lib
from m6jax.evaluate import metrics as metrics_lib
from m6jax.models import fusion
from m6jax.train import checkpoint, optim, predictions, preemption, steps

log = logging.getLogger(__name__)


class NonFiniteLoss(FloatingPointError):
  """The loss became NaN or inf."""


def compute_dtype(cfg):
  """cfg.model.dtype -> the towers' and head's compute dtype (params stay float32)."""
  return jnp.dtype(cfg.model.dtype)


def head_module(cfg, num_classes: int) -> fusion.FusionHead:
  return fusion.head_from_config(cfg.model, num_classes, compute_dtype(cfg))


class Trainer:
  """The shared epoch loop. Subclasses define init_states, run_epoch, predict.

  Every state leaf carries the leading replica axis K (`cfg.seeds`), split over
  the mesh's 'seed' axis (mesh.replica_sharding).
  """

  def __init__(self, cfg, num_classes: int, num_train: int, seed_offsets=None):
    self.cfg = cfg
    self.num_classes = num_classes
    self.batch_size = min(cfg.train.batch_size, num_train)
    self.steps_per_epoch = max(1, num_train // self.batch_size)
    self.total_steps = self.steps_per_epoch * cfg.train.epochs
    # Replica r is seeded with seed + seed_offsets[r] (0..K-1 without folds).
    self.seed_offsets = np.asarray(np.arange(cfg.seeds) if seed_offsets is None
                                   else seed_offsets, np.int32)
    self.num_replicas = len(self.seed_offsets)
    self.folds = 1   # replicas per seed model (cross-validation: its fold ensemble)
    self.mesh = mesh_lib.make_mesh(self.num_replicas, cfg.mesh.seed, cfg.mesh.data)
    self.replicas = mesh_lib.replica_sharding(self.mesh)
    # Metrics and predictions: on every device, so every process can read them.
    self.outputs = mesh_lib.replicated_sharding(self.mesh)
    self.keys = mesh_lib.put_global(
        jax.vmap(jax.random.key)(jnp.asarray(cfg.seed + self.seed_offsets)), self.replicas)
    self._keep_best = jax.jit(jax.vmap(steps.keep_best, in_axes=(0, 0, None)),
                              donate_argnums=(0,), out_shardings=self.replicas)

  def make_optimizer(self, params=None):
    """The run's optimizer; group schedules given in epochs become steps here."""
    return optim.make_optimizer(self.cfg.train, self.total_steps, params,
                                steps_per_epoch=self.steps_per_epoch)

  def order_keys(self):
    """Keys that fix each replica's data order: its own, or one shared key."""
    if self.cfg.train.data_order == "per_seed":
      return self.keys
    return mesh_lib.put_global(jnp.stack([jax.random.key(self.cfg.seed)] * self.num_replicas),
                               self.replicas)

  def seed_models(self, probs):
    """(R, N, C) replica probabilities -> (S, N, C), one per seed's model (with folds:
    its fold ensemble; m6jax.train.predictions.seed_models)."""
    return predictions.seed_models(probs, self.folds)

  def ensemble(self, probs):
    """(R, N, C) replica probabilities -> (N, C), the run's ensemble."""
    return predictions.ensemble(probs, self.folds)

  def validate(self, states, val_labels) -> dict:
    """Per-replica validation scores {'macro_f1', 'accuracy', 'log_loss'}: (K,) each."""
    probs = np.asarray(self.predict(states.params, states.batch_stats, "validation"))
    return validation_scores(probs, val_labels, self.num_classes)

  def fit(self, val_labels, checkpoints=None, progress: bool = True, on_epoch=None,
          stop=None):
    """Runs the epochs; returns (states with best_* filled, history list).

    on_epoch(record) is called after each epoch with the history record
    (epoch, per-replica loss / grad_norm / val_macro_f1 / val_accuracy lists).

    Resumes from `checkpoints` (m6jax.train.checkpoint.Checkpoints) when it holds a
    step, and saves the state there every `checkpoint_every` epochs (best_* included).
    SIGTERM / SIGINT (or `stop`, a m6jax.train.preemption.StopFlag, set by the
    caller's handler) stop the loop at the next epoch boundary: the state is
    saved and preemption.Preempted raised.
    """
    with preemption.handle_signals(stop) as stop:
      return self._fit(val_labels, checkpoints, progress, on_epoch, stop)

  def _stop(self, stop, checkpoints, states, epoch, history, saved_epoch):
    """Saves the state of `epoch` (when not saved yet) and raises Preempted."""
    saved, enabled = None, checkpoints is not None and checkpoints.enabled
    if enabled:
      if epoch is not None and saved_epoch != epoch:
        checkpoints.save_latest(checkpoint.state_step(states), states,
                                {"epoch": epoch, "history": history})
      checkpoints.wait()
      if checkpoints.latest_step() is not None:
        saved = f"{checkpoints.directory} (step {checkpoints.latest_step()})"
    msg = preemption.stopped_message(stop, epoch, saved, enabled)
    log.warning("%s", msg)
    raise preemption.Preempted(msg, stop.signum)

  def _fit(self, val_labels, checkpoints, progress, on_epoch, stop):
    cfg = self.cfg
    states = self.init_states()
    history, start, saved_epoch = [], 0, None
    if checkpoints is not None:
      restored = checkpoints.restore_latest(states)
      if restored is not None:
        states, extra = restored
        history, start, saved_epoch = extra["history"], extra["epoch"] + 1, extra["epoch"]
        log.info("resumed from epoch %d (step %d)", extra["epoch"],
                 int(mesh_lib.to_host(states.step)[0]))
    bar = tqdm.trange(start, cfg.train.epochs, desc="train", disable=not progress,
                      leave=False, initial=start, total=cfg.train.epochs)
    for epoch in bar:
      if epoch == start and preemption.requested_anywhere(stop):   # asked before the loop
        self._stop(stop, checkpoints, states, saved_epoch, history, saved_epoch)
      t0 = time.time()
      states, stats = self.run_epoch(states, epoch)
      loss = np.asarray(stats["loss"], np.float64)
      if not np.all(np.isfinite(loss)):
        # The bad state is not saved: the checkpoint stays the last saved good epoch.
        saved = "none saved"
        if checkpoints is not None:
          checkpoints.wait()
          if checkpoints.latest_step() is not None:
            saved = f"last good state: {checkpoints.directory}, epoch {saved_epoch}"
        raise NonFiniteLoss(f"non-finite loss at epoch {epoch}: per replica {loss.tolist()} "
                            f"({saved})")
      val = self.validate(states, val_labels)
      val_f1 = val["macro_f1"]
      score = -val["log_loss"] if cfg.train.select_by == "log_loss" else val_f1
      states = self._keep_best(states, jnp.asarray(score, jnp.float32), epoch)
      rec = {"epoch": epoch, "loss": loss.tolist(),
             "grad_norm": np.asarray(stats["grad_norm"], np.float64).tolist(),
             "val_macro_f1": val_f1.tolist(),
             "val_accuracy": val["accuracy"].tolist(),
             "val_log_loss": val["log_loss"].tolist(),
             "seconds": time.time() - t0}
      history.append(rec)
      if on_epoch is not None:
        on_epoch(rec)
      bar.set_postfix(loss=f"{loss.mean():.3f}", val_f1=f"{val_f1.mean():.3f}")
      # A quiet console has the bar's loss / val_f1: the last epoch's line is enough.
      periodic = epoch % max(1, cfg.train.log_every) == 0 and not (progress and console.quiet())
      if periodic or epoch == cfg.train.epochs - 1:
        if epoch == cfg.train.epochs - 1:
          bar.close()   # the last line goes below the bar, not into its frame
        log.info("epoch %d loss %.4f val macro-F1 %.4f (per seed %s)", epoch, loss.mean(),
                 val_f1.mean(), np.round(val_f1, 4).tolist())
      every = cfg.train.checkpoint_every
      if checkpoints is not None and ((epoch + 1) % every == 0 or epoch == cfg.train.epochs - 1):
        checkpoints.save_latest(checkpoint.state_step(states), states,
                                {"epoch": epoch, "history": history})
        saved_epoch = epoch
      if preemption.requested_anywhere(stop):
        self._stop(stop, checkpoints, states, epoch, history, saved_epoch)
    if checkpoints is not None:
      checkpoints.wait()
    return states, history


def validation_scores(probs, labels, num_classes: int, mask=None) -> dict:
  """(K, N, C) probabilities, (N,) labels [, (K, N) mask] -> {'macro_f1', 'accuracy',
  'log_loss'}, each (K,) float64 (log-loss: mean negative log-probability of the label)."""
  probs = np.asarray(probs, np.float64)
  labels = np.asarray(labels)
  m = metrics_lib.replica_metrics(labels, probs.argmax(-1), num_classes,
                                  mask=None if mask is None else np.asarray(mask))
  nll = -np.log(np.clip(np.take_along_axis(probs, labels[None, :, None], -1)[..., 0], 1e-12,
                        None))
  w = np.ones(nll.shape) if mask is None else np.asarray(mask, np.float64)
  return {"macro_f1": np.asarray(m["macro_f1"], np.float64),
          "accuracy": np.asarray(m["accuracy"], np.float64),
          "log_loss": (nll * w).sum(1) / np.maximum(w.sum(1), 1.0)}


class FrozenTrainer(Trainer):
  """Fusion head on cached embeddings, K seeds (x folds) at once.

  feats: {split: {'image': (N, Di), 'text': (N, Dt)}} for the modalities the
  head reads; labels: {split: (N,)}.

  Cross-validation (`plan`, m6jax.train.folds.ReplicaPlan over the rows of
  `pool_splits` concatenated, split 'pool'): replica r = fold * seeds + seed
  trains on the pooled rows outside its fold and validates on its fold, so
  folds are one more array axis next to seeds: R = folds x seeds replicas in
  one compiled program.

  The epoch is `steps.scan_epoch` vmapped over the replica axis (`_replicate`);
  everything a replica needs per epoch (state, key, order key, its rows) is an
  argument.
  """

  def __init__(self, cfg, num_classes: int, feats: dict, labels: dict, plan=None,
               pool_splits: tuple = ("train", "validation")):
    self.plan = plan
    feats, labels = dict(feats), dict(labels)
    if plan is not None:
      feats["pool"] = {m: np.concatenate([np.asarray(feats[s][m]) for s in pool_splits])
                       for m in feats[pool_splits[0]]}
      labels["pool"] = np.concatenate([np.asarray(labels[s]) for s in pool_splits])
      if plan.val_mask.shape[1] != len(labels["pool"]):
        raise ValueError(f"the fold plan covers {plan.val_mask.shape[1]} rows, the pooled "
                         f"splits {pool_splits} have {len(labels['pool'])}")
    super().__init__(cfg, num_classes,
                     plan.min_train if plan is not None else len(labels["train"]),
                     None if plan is None else plan.seed_of_replica)
    if plan is not None:
      self.folds = plan.models_per_seed   # fold models (x repeats) per seed
    self.head = head_module(cfg, num_classes)
    self.mods = fusion.modalities(cfg.model.fusion)
    # Cached embeddings are small: every device holds all of them.
    rep = mesh_lib.replicated_sharding(self.mesh)
    # Device arrays are taken as they are (no host copy: a 10^6-row caller puts each
    # split on the device and frees its numpy form: benchmarks/rehearsal_1m.py).
    self.feats = {s: mesh_lib.put_global({m: f[m] if isinstance(f[m], jax.Array)
                                          else np.asarray(f[m]) for m in self.mods}, rep)
                  for s, f in feats.items()}
    self.labels = {s: mesh_lib.put_global(np.asarray(v), rep) for s, v in labels.items()}
    self.rows = (None if plan is None
                 else mesh_lib.put_global(np.asarray(plan.train_idx), self.replicas))
    self.tx = self.make_optimizer()
    step = functools.partial(steps.train_step, apply_fn=self.head.apply, tx=self.tx,
                             num_classes=num_classes, smoothing=cfg.train.label_smoothing)
    epoch = functools.partial(steps.scan_epoch, step_fn=step, steps=self.steps_per_epoch,
                              batch_size=self.batch_size, constrain=self._constrain)
    self._init = jax.jit(jax.vmap(self._init_one), out_shardings=self.replicas)
    self._epoch = jax.jit(
        self._replicate(epoch, in_axes=(0, None, 0, 0, None, None if plan is None else 0)),
        donate_argnums=(0,), out_shardings=(self.replicas, self.outputs))
    self._predict = predictions.replica_predict(self.head.apply, frozen=True,
                                                out_shardings=self.outputs,
                                                chunk=predictions.PREDICT_ROWS)

  def validate(self, states, val_labels) -> dict:
    """Per-replica validation scores; with folds, each replica on its selection rows
    (cv_plan: an inner slice of its training rows, never its scored fold)."""
    if self.plan is None:
      return super().validate(states, val_labels)
    probs = np.asarray(self.predict(states.params, None, "pool"))
    return validation_scores(probs, self.labels["pool"], self.num_classes,
                             self.plan.select_mask)

  @staticmethod
  def _replicate(fn, in_axes):
    """fn of one replica -> fn of K replicas (leading axis, split over mesh 'seed')."""
    return jax.vmap(fn, in_axes=in_axes, spmd_axis_name="seed")

  def _constrain(self, batch: dict) -> dict:
    """Splits each replica's embedding batch over the 'data' devices of its seed group."""
    data_size = self.mesh.shape["data"]
    if data_size == 1 or self.batch_size % data_size:
      return batch
    spec = jax.sharding.NamedSharding(self.mesh, jax.sharding.PartitionSpec("data"))
    emb = jax.lax.with_sharding_constraint({m: batch[m] for m in self.mods}, spec)
    return dict(batch, **emb)

  def _init_one(self, key) -> steps.TrainState:
    dummy = {m: f[:1] for m, f in next(iter(self.feats.values())).items()}
    params = self.head.init({"params": jax.random.fold_in(key, 0)}, dummy)["params"]
    return steps.new_state(params, {}, self.tx)

  def init_states(self):
    return self._init(self.keys)

  def run_epoch(self, states, epoch):
    split = "train" if self.plan is None else "pool"
    data = dict(self.feats[split], label=self.labels[split])
    return self._epoch(states, data, self.keys, self.order_keys(), epoch, self.rows)

  def predict_features(self, params, feats: dict):
    """Embeddings {modality: (N, D)} -> (K, N, C) probabilities, (K, N, M) weights."""
    rep = mesh_lib.replicated_sharding(self.mesh)
    return self._predict(params, mesh_lib.put_global(
        {m: np.asarray(feats[m], np.float32) for m in self.mods}, rep))

  def predict(self, params, batch_stats, split, with_weights=False):
    """(K, N, C) probabilities (and (K, N, M) modality weights) for a split."""
    probs, weights = self._predict(params, self.feats[split])
    return (probs, weights) if with_weights else probs
