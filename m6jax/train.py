"""The K-replica trainers and their shared epoch loop.

`states = jax.vmap(init)(keys)`; `jax.jit(jax.vmap(step))` advances all K
replicas at once, with the pure per-replica steps of m6jax.steps bound by
`functools.partial`. Replica k is seeded with `seed + k`, so with per-seed data
order it matches a solo run with that seed.

Two modes share the epoch loop, validation, best-epoch selection and the
checkpoint:
  frozen    heads train on cached tower embeddings (a whole epoch is one
            jitted `lax.scan`, m6jax.steps.scan_epoch);
  finetune  towers and head train end to end on image batches.
"""

from __future__ import annotations

import functools
import logging
import time

import jax
import jax.numpy as jnp
import numpy as np
import tqdm

from m6jax import folds, optim, steps
from m6jax import mesh as mesh_lib
from m6jax import metrics as metrics_lib
from m6jax.data import pipeline, tokenize
from m6jax.models import fusion

log = logging.getLogger(__name__)


class NonFiniteLoss(FloatingPointError):
  """The loss became NaN or inf."""


def compute_dtype(cfg):
  """cfg.model.dtype -> the towers' and head's compute dtype (params stay float32)."""
  return jnp.dtype(cfg.model.get("dtype", "float32"))


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
    mcfg = cfg.get("mesh") or {}
    self.mesh = mesh_lib.make_mesh(self.num_replicas, mcfg.get("seed", 0), mcfg.get("data", 0))
    self.replicas = mesh_lib.replica_sharding(self.mesh)
    # Metrics and predictions: on every device, so every process can read them.
    self.outputs = mesh_lib.replicated_sharding(self.mesh)
    self.keys = mesh_lib.put_global(
        jax.vmap(jax.random.key)(jnp.asarray(cfg.seed + self.seed_offsets)), self.replicas)
    self._keep_best = jax.jit(jax.vmap(steps.keep_best), donate_argnums=(0,),
                              out_shardings=self.replicas)

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
    """(K, N, C) replica probabilities -> (S, N, C), one per seed's model (see FrozenTrainer)."""
    return np.asarray(probs)

  def validate(self, states, val_labels) -> dict:
    """Per-replica validation scores {'macro_f1', 'accuracy', 'log_loss'}: (K,) each."""
    probs = np.asarray(self.predict(states.params, states.batch_stats, "validation"))
    return validation_scores(probs, val_labels, self.num_classes)

  def fit(self, val_labels, checkpoints=None, progress: bool = True, on_epoch=None):
    """Runs the epochs; returns (states with best_* filled, history list).

    on_epoch(record) is called after each epoch with the history record
    (epoch, per-replica loss / grad_norm / val_macro_f1 / val_accuracy lists).

    Resumes from `checkpoints` (m6jax.checkpoint.Checkpoints) when it holds a
    step, and saves the state there after every epoch (best_* included).
    """
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
      score = -val["log_loss"] if cfg.train.get("select_by") == "log_loss" else val_f1
      states = self._keep_best(states, jnp.asarray(score, jnp.float32))
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
      if epoch % max(1, cfg.train.log_every) == 0 or epoch == cfg.train.epochs - 1:
        log.info("epoch %d loss %.4f val macro-F1 %.4f (per seed %s)", epoch, loss.mean(),
                 val_f1.mean(), np.round(val_f1, 4).tolist())
      every = max(1, cfg.train.get("checkpoint_every", 1))
      if checkpoints is not None and ((epoch + 1) % every == 0 or epoch == cfg.train.epochs - 1):
        checkpoints.save_latest(int(mesh_lib.to_host(states.step)[0]), states,
                                {"epoch": epoch, "history": history})
        saved_epoch = epoch
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

  Cross-validation (`plan`, m6jax.folds.ReplicaPlan over the rows of
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
    self.head = head_module(cfg, num_classes)
    self.mods = fusion.modalities(cfg.model.fusion)
    # Cached embeddings are small: every device holds all of them.
    rep = mesh_lib.replicated_sharding(self.mesh)
    self.feats = {s: mesh_lib.put_global({m: np.asarray(f[m]) for m in self.mods}, rep)
                  for s, f in feats.items()}
    self.labels = {s: mesh_lib.put_global(np.asarray(v), rep) for s, v in labels.items()}
    self.rows = (None if plan is None
                 else mesh_lib.put_global(np.asarray(plan.train_idx), self.replicas))
    self.tx = self.make_optimizer()
    step = functools.partial(steps.train_step, apply_fn=self.head.apply, tx=self.tx,
                             num_classes=num_classes, smoothing=cfg.train.label_smoothing)
    epoch = functools.partial(steps.scan_epoch, step_fn=step, steps=self.steps_per_epoch,
                              batch_size=self.batch_size, constrain=self._constrain)
    predict = functools.partial(steps.predict_step, apply_fn=self.head.apply)
    self._init = jax.jit(jax.vmap(self._init_one), out_shardings=self.replicas)
    self._epoch = jax.jit(
        self._replicate(epoch, in_axes=(0, None, 0, 0, None, None if plan is None else 0)),
        donate_argnums=(0,), out_shardings=(self.replicas, self.outputs))
    self._predict = jax.jit(jax.vmap(lambda p, f: predict(p, None, f), in_axes=(0, None)),
                            out_shardings=self.outputs)

  def validate(self, states, val_labels) -> dict:
    """Per-replica validation scores; with folds, each replica on its own fold."""
    if self.plan is None:
      return super().validate(states, val_labels)
    probs = np.asarray(self.predict(states.params, None, "pool"))
    return validation_scores(probs, self.labels["pool"], self.num_classes, self.plan.val_mask)

  def out_of_fold_scores(self, params) -> dict:
    """Cross-validation scores of the pooled rows, each predicted by the replicas that did
    not train on it: {'folds', 'rows', 'accuracy', 'macro_f1', 'log_loss'}."""
    oof = folds.out_of_fold(self.predict(params, None, "pool"), self.plan)
    labels = np.asarray(self.labels["pool"])
    sc = validation_scores(oof[None], labels, self.num_classes)
    return {"folds": int(self.plan.fold_of_replica.max()) + 1, "rows": int(len(labels)),
            "accuracy": float(sc["accuracy"][0]), "macro_f1": float(sc["macro_f1"][0]),
            "log_loss": float(sc["log_loss"][0])}

  def seed_models(self, probs):
    """(R, N, C) replica probabilities -> (S, N, C): with folds, each seed's model is the
    mean of its fold replicas (a fold ensemble); without, the replicas themselves."""
    probs = np.asarray(probs)
    if self.plan is None:
      return probs
    folds = int(self.plan.fold_of_replica.max()) + 1
    return probs.reshape(folds, -1, *probs.shape[1:]).mean(0)

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

  def modality_importance(self, params, split="test") -> dict:
    """Accuracy of the seed ensemble with each modality's embedding zeroed (what
    modality dropout trains the head to cope with): {'full': acc, 'without_<m>': acc,
    'drop_<m>': full - without}."""
    labels = np.asarray(self.labels[split])

    def acc(f):
      probs = np.asarray(self.predict_features(params, f)[0])
      return float((probs.mean(0).argmax(-1) == labels).mean())

    feats = {m: np.asarray(v) for m, v in self.feats[split].items()}
    out = {"full": acc(feats)}
    for m in self.mods:
      out[f"without_{m}"] = acc(dict(feats, **{m: np.zeros_like(feats[m])}))
      out[f"drop_{m}"] = out["full"] - out[f"without_{m}"]
    return out


class FinetuneTrainer(Trainer):
  """Towers + head trained end to end on image (and token) batches, K seeds at once.

  builder: the TFDS builder (splits are read through grain); image_tower /
  text_tower from m6jax.models.towers (text_tower None, or a TF-IDF tower whose
  cached features arrive in `text_feats` {split: (N, D)} keyed by row order).
  """

  def __init__(self, cfg, num_classes: int, builder, image_tower=None, text_tower=None,
               text_feats: dict | None = None):
    self.sources = {s: builder.as_data_source(s) for s in ("train", "validation", "test")}
    super().__init__(cfg, num_classes, len(self.sources["train"]))
    self.mods = fusion.modalities(cfg.model.fusion)
    self.image_tower = image_tower if "image" in self.mods else None
    bert = text_tower if "text" in self.mods and text_tower and text_tower.module else None
    self.text_tower = bert
    self.text_lookup = None
    if "text" in self.mods and bert is None:
      if text_feats is None:
        raise ValueError("fusion uses text: give a BERT text tower or cached text features")
      self.text_lookup = {s: dict(zip(pipeline.columns(self.sources[s])["uniq_id"],
                                      np.asarray(text_feats[s]))) for s in self.sources}
    self.model = fusion.Classifier(
        fusion=head_module(cfg, num_classes),
        image=self.image_tower.module if self.image_tower else None,
        text=bert.module if bert else None,
        image_preprocess=self.image_tower.preprocess if self.image_tower else None,
        tower_train=cfg.train.bn == "update")
    shapes = jax.eval_shape(self._init_variables, self.keys[0])
    self.tx = self.make_optimizer(shapes["params"])
    log.info("parameter groups:\n%s", optim.describe_groups(
        shapes["params"], dict(cfg.train.get("groups") or {}), self.steps_per_epoch))
    self._init = jax.jit(jax.vmap(self._init_one), out_shardings=self.replicas)
    per_seed = cfg.train.data_order == "per_seed"
    self.train_batch_sharding = mesh_lib.batch_sharding(self.mesh, per_seed)
    self.eval_batch_sharding = mesh_lib.batch_sharding(self.mesh, False)
    self._step = jax.jit(self._replicated_step(per_seed), donate_argnums=(0,),
                         out_shardings=(self.replicas, self.outputs))
    predict = functools.partial(steps.predict_step, apply_fn=self.model.apply)
    self._predict = jax.jit(jax.vmap(predict, in_axes=(0, 0, None), spmd_axis_name="seed"),
                            out_shardings=self.outputs)

  # --- model inputs -----------------------------------------------------------
  def inputs(self, batch: dict, split: str) -> dict:
    """A pipeline batch -> the Classifier's input dict (numpy)."""
    out = {"label": batch["label"], "mask": batch["mask"]}
    if self.image_tower is not None:
      out["image"] = batch["image"]
    if self.text_tower is not None:
      toks = tokenize.tokenize(self.text_tower.tokenizer, [str(t) for t in batch["text"]],
                               self.cfg.data.max_text_length)
      out["input_ids"], out["attention_mask"] = toks["input_ids"], toks["attention_mask"]
    elif self.text_lookup is not None:
      table = self.text_lookup[split]
      dim = len(next(iter(table.values())))
      out["text_embedding"] = np.stack([table.get(u, np.zeros(dim, np.float32))
                                        for u in batch["uniq_id"]]).astype(np.float32)
    return out

  def _dummy(self):
    b = {"label": jnp.zeros((1,), jnp.int32), "mask": jnp.ones((1,), bool)}
    s = self.cfg.data.image_size
    if self.image_tower is not None:
      b["image"] = jnp.zeros((1, s, s, 3), jnp.uint8)
    if self.text_tower is not None:
      b["input_ids"] = jnp.zeros((1, 8), jnp.int32)
      b["attention_mask"] = jnp.ones((1, 8), jnp.int32)
    elif self.text_lookup is not None:
      dim = len(next(iter(self.text_lookup["train"].values())))
      b["text_embedding"] = jnp.zeros((1, dim), jnp.float32)
    return b

  # --- init -----------------------------------------------------------------
  def _init_variables(self, key):
    v = self.model.init({"params": jax.random.fold_in(key, 0),
                         "dropout": jax.random.fold_in(key, 1)}, self._dummy(), train=False)
    params, stats = dict(v["params"]), dict(v.get("batch_stats", {}))
    # Pretrained towers are the same for every replica; only the head differs.
    if self.image_tower is not None and self.image_tower.variables.get("params"):
      params["image"] = self.image_tower.variables["params"]
      if "batch_stats" in self.image_tower.variables:
        stats["image"] = self.image_tower.variables["batch_stats"]
    if self.text_tower is not None:
      params["text"] = self.text_tower.params["params"]
    params = jax.tree.map(lambda x: jnp.asarray(x, jnp.float32), params)
    stats = jax.tree.map(lambda x: jnp.asarray(x, jnp.float32), stats)
    return {"params": params, "batch_stats": stats}

  def _init_one(self, key):
    v = self._init_variables(key)
    return steps.new_state(v["params"], v["batch_stats"], self.tx)

  def init_states(self):
    return self._init(self.keys)

  # --- steps ----------------------------------------------------------------
  def _train_step(self, state: steps.TrainState, batch: dict, key):
    """One replica's step; its dropout key is derived from the replica key and step."""
    rng = jax.random.fold_in(jax.random.fold_in(key, 3), state.step)
    return steps.train_step(state, batch, rng, apply_fn=self.model.apply, tx=self.tx,
                            num_classes=self.num_classes,
                            smoothing=self.cfg.train.label_smoothing,
                            update_batch_stats=self.cfg.train.bn == "update")

  def _replicated_step(self, per_seed: bool):
    """The K-replica step: `vmap` or `lax.map` (train.replica_loop; 'auto' picks per backend).

    vmap over parameters turns each convolution into a grouped convolution,
    which GPUs run far below dense speed (benchmarks/bench_gpu.md); `lax.map`
    keeps one program and one compile but runs replicas one after another with
    dense convolutions. On a mesh, 'map' runs inside `shard_map` over 'seed'
    only: each seed group maps over the K/S replicas it holds, while 'data'
    stays automatic (the batch split over it, gradients and BatchNorm
    statistics global as in the vmap program).
    """
    loop = mesh_lib.resolve_replica_loop(self.cfg.train.get("replica_loop", "auto"))
    if loop == "vmap":
      return jax.vmap(self._train_step, in_axes=(0, 0 if per_seed else None, 0),
                      spmd_axis_name="seed")

    def step(states, batch, keys):
      if per_seed:
        return jax.lax.map(lambda a: self._train_step(*a), (states, batch, keys))
      return jax.lax.map(lambda a: self._train_step(a[0], batch, a[1]), (states, keys))

    if self.mesh.shape["seed"] == 1:
      return step
    rep = jax.sharding.PartitionSpec("seed")
    return jax.shard_map(step, mesh=self.mesh, axis_names=frozenset({"seed"}),
                         in_specs=(rep, rep if per_seed else jax.sharding.PartitionSpec(), rep),
                         out_specs=(rep, rep))

  def _shuffle_seed(self, k: int, epoch: int) -> int:
    base = self.cfg.seed + k if self.cfg.train.data_order == "per_seed" else self.cfg.seed
    return (base * 1_000_003 + epoch) % (2**31 - 1)

  def run_epoch(self, states, epoch):
    cfg = self.cfg
    k_iters = cfg.seeds if cfg.train.data_order == "per_seed" else 1
    iters = [pipeline.batches(self.sources["train"], self.batch_size, cfg.data.image_size,
                              shuffle_seed=self._shuffle_seed(k, epoch),
                              augment_seed=(self._shuffle_seed(k, epoch) + 7 if cfg.data.augment
                                            else None), drop_remainder=True)
             for k in range(k_iters)]
    losses, gnorms = [], []
    for _ in tqdm.trange(self.steps_per_epoch, desc=f"epoch {epoch}", leave=False,
                         disable=self.steps_per_epoch < 5):
      batch = [self.inputs(next(it), "train") for it in iters]
      batch = (jax.tree.map(lambda *xs: np.stack(xs), *batch) if k_iters > 1 else batch[0])
      batch = mesh_lib.put_global(batch, self.train_batch_sharding)
      states, m = self._step(states, batch, self.keys)
      losses.append(m["loss"])
      gnorms.append(m["grad_norm"])
    return states, {"loss": jnp.stack(losses).mean(0), "grad_norm": jnp.stack(gnorms).mean(0)}

  def predict_batch(self, params, batch_stats, batch: dict, split: str):
    """A pipeline batch -> (K, B, C) probabilities, (K, B, M) modality weights."""
    return self._predict(params, batch_stats,
                         mesh_lib.put_global(self.inputs(batch, split), self.eval_batch_sharding))

  def predict(self, params, batch_stats, split, with_weights=False):
    """(K, N, C) probabilities (and (K, N, M) modality weights) for a split."""
    probs, weights = [], []
    for batch in pipeline.batches(self.sources[split], self.cfg.data.batch_size,
                                  self.cfg.data.image_size):
      pr, w = self.predict_batch(params, batch_stats, batch, split)
      probs.append(np.asarray(pr)[:, batch["mask"]])
      weights.append(np.asarray(w)[:, batch["mask"]])
    probs, weights = np.concatenate(probs, 1), np.concatenate(weights, 1)
    return (probs, weights) if with_weights else probs
