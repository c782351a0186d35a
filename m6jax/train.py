"""Training: seed replicas as one vmapped, jitted program.

`states = jax.vmap(init)(keys)`; `jax.jit(jax.vmap(train_step))` advances all
K replicas at once. Replica k is seeded with `seed + k`, so with per-seed data
order it matches a solo run with that seed.

Two modes share the epoch loop, validation, best-epoch selection and
checkpoints:
  frozen    heads train on cached tower embeddings (a whole epoch is one
            jitted `lax.scan`);
  finetune  towers and head train end to end on image batches.
"""

from __future__ import annotations

import dataclasses
import logging
import os
import time
from typing import Any

import flax
import jax
import jax.numpy as jnp
import numpy as np
import optax
import tqdm

from m6jax import mesh as mesh_lib
from m6jax import metrics as metrics_lib
from m6jax import optim
from m6jax.models import fusion

log = logging.getLogger(__name__)


@flax.struct.dataclass
class TrainState:
  """One replica's state (a leading K axis on every leaf when vmapped).

  best_* hold the parameters of the epoch with the best validation macro-F1,
  so each replica's selection travels with it through checkpoints.
  """
  step: jax.Array
  params: Any
  batch_stats: Any
  opt_state: Any
  best_params: Any
  best_batch_stats: Any
  best_f1: jax.Array


class NonFiniteLoss(FloatingPointError):
  """The loss became NaN or inf."""


def replica_keys(seed: int, num: int) -> jax.Array:
  """(K,) typed keys; replica k uses `jax.random.key(seed + k)`."""
  return jax.vmap(jax.random.key)(jnp.arange(num) + seed)


def compute_dtype(cfg):
  """cfg.model.dtype -> the towers' and head's compute dtype (params stay float32)."""
  return jnp.dtype(cfg.model.get("dtype", "float32"))


def head_module(cfg, num_classes: int) -> fusion.FusionHead:
  return fusion.head_from_config(cfg.model, num_classes, compute_dtype(cfg))


def loss_fn(logits, labels, mask, num_classes: int, smoothing: float = 0.0):
  """Mean softmax cross-entropy over valid (mask) rows."""
  targets = optax.smooth_labels(jax.nn.one_hot(labels, num_classes), smoothing)
  per = optax.softmax_cross_entropy(logits.astype(jnp.float32), targets)
  mask = mask.astype(per.dtype)
  return jnp.sum(per * mask) / jnp.maximum(mask.sum(), 1.0)


def _new_state(params, batch_stats, tx) -> TrainState:
  return TrainState(jnp.zeros((), jnp.int32), params, batch_stats, tx.init(params),
                    params, batch_stats, jnp.full((), -1.0, jnp.float32))


def _keep_best(state: TrainState, f1) -> TrainState:
  better = f1 > state.best_f1
  pick = lambda new, old: jax.tree.map(lambda a, b: jnp.where(better, a, b), new, old)
  return state.replace(best_params=pick(state.params, state.best_params),
                       best_batch_stats=pick(state.batch_stats, state.best_batch_stats),
                       best_f1=jnp.where(better, f1, state.best_f1))


def _epoch_key(key, epoch, salt):
  return jax.random.fold_in(jax.random.fold_in(key, salt), epoch)


class Trainer:
  """The shared epoch loop. Subclasses define init_states, run_epoch, predict."""

  def __init__(self, cfg, num_classes: int, num_train: int):
    self.cfg = cfg
    self.num_classes = num_classes
    self.batch_size = min(cfg.train.batch_size, num_train)
    self.steps_per_epoch = max(1, num_train // self.batch_size)
    self.total_steps = self.steps_per_epoch * cfg.train.epochs
    mcfg = cfg.get("mesh") or {}
    self.mesh = mesh_lib.make_mesh(cfg.seeds, mcfg.get("seed", 0), mcfg.get("data", 0))
    self.replicas = mesh_lib.replicas(self.mesh)
    self.keys = mesh_lib.put_global(replica_keys(cfg.seed, cfg.seeds), self.replicas)
    self._keep_best = jax.jit(jax.vmap(_keep_best), donate_argnums=(0,),
                              out_shardings=self.replicas)

  def order_keys(self):
    """Keys that fix each replica's data order: its own, or one shared key."""
    if self.cfg.train.data_order == "per_seed":
      return self.keys
    if self.cfg.train.data_order != "shared":
      raise ValueError(f"train.data_order must be per_seed or shared, "
                       f"got {self.cfg.train.data_order!r}")
    return mesh_lib.put_global(jnp.stack([jax.random.key(self.cfg.seed)] * self.cfg.seeds),
                               self.replicas)

  def fit(self, val_labels, checkpoints=None, progress: bool = True, on_epoch=None):
    """Runs the epochs; returns (states with best_* filled, history list).

    on_epoch(record) is called after each epoch with the history record
    (epoch, per-replica loss / grad_norm / val_macro_f1 / val_accuracy lists).

    Resumes from `checkpoints` (m6jax.checkpoint.Checkpoints) when it holds a
    latest step, and saves latest (each epoch) and best (by mean validation
    macro-F1) there.
    """
    cfg = self.cfg
    states = self.init_states()
    history, start = [], 0
    if checkpoints is not None:
      restored = checkpoints.restore_latest(states)
      if restored is not None:
        states, extra = restored
        history, start = extra["history"], extra["epoch"] + 1
        log.info("resumed from epoch %d (step %d)", extra["epoch"], int(states.step[0]))
    bar = tqdm.trange(start, cfg.train.epochs, desc="train", disable=not progress,
                      leave=False, initial=start, total=cfg.train.epochs)
    for epoch in bar:
      t0 = time.time()
      states, stats = self.run_epoch(states, epoch)
      loss = np.asarray(stats["loss"], np.float64)
      if not np.all(np.isfinite(loss)):
        # The bad state is not saved: the latest checkpoint stays the last good epoch.
        saved = "none saved"
        if checkpoints is not None:
          checkpoints.wait()
          if checkpoints.latest_step() is not None:
            saved = f"last good state: {checkpoints.directory}/latest, epoch {epoch - 1}"
        raise NonFiniteLoss(f"non-finite loss at epoch {epoch}: per replica {loss.tolist()} "
                            f"({saved})")
      probs = self.predict(states.params, states.batch_stats, "validation")
      val = metrics_lib.replica_metrics(val_labels, np.asarray(probs).argmax(-1),
                                        self.num_classes)
      val_f1 = np.asarray(val["macro_f1"], np.float64)
      states = self._keep_best(states, jnp.asarray(val_f1, jnp.float32))
      rec = {"epoch": epoch, "loss": loss.tolist(),
             "grad_norm": np.asarray(stats["grad_norm"], np.float64).tolist(),
             "val_macro_f1": val_f1.tolist(),
             "val_accuracy": np.asarray(val["accuracy"], np.float64).tolist(),
             "seconds": time.time() - t0}
      history.append(rec)
      if on_epoch is not None:
        on_epoch(rec)
      bar.set_postfix(loss=f"{loss.mean():.3f}", val_f1=f"{val_f1.mean():.3f}")
      if epoch % max(1, cfg.train.log_every) == 0 or epoch == cfg.train.epochs - 1:
        log.info("epoch %d loss %.4f val macro-F1 %.4f (per seed %s)", epoch, loss.mean(),
                 val_f1.mean(), np.round(val_f1, 4).tolist())
      if checkpoints is not None:
        step = int(states.step[0])
        extra = {"epoch": epoch, "history": history}
        checkpoints.save_latest(step, states, extra)
        checkpoints.save_best(step, states, float(val_f1.mean()), extra)
    if checkpoints is not None:
      checkpoints.wait()
    return states, history


class FrozenTrainer(Trainer):
  """Fusion head on cached embeddings, K seeds at once.

  feats: {split: {'image': (N, Di), 'text': (N, Dt)}} for the modalities the
  head reads; labels: {split: (N,)}.
  """

  def __init__(self, cfg, num_classes: int, feats: dict, labels: dict):
    super().__init__(cfg, num_classes, len(labels["train"]))
    self.head = head_module(cfg, num_classes)
    self.mods = fusion.modalities(cfg.model.fusion)
    # Cached embeddings are small: every device holds all of them.
    rep = mesh_lib.replicated(self.mesh)
    self.feats = {s: mesh_lib.put_global({m: np.asarray(f[m]) for m in self.mods}, rep)
                  for s, f in feats.items()}
    self.labels = {s: mesh_lib.put_global(np.asarray(v), rep) for s, v in labels.items()}
    self.tx = optim.make_optimizer(cfg.train, self.total_steps)
    self._init = jax.jit(jax.vmap(self._init_one), out_shardings=self.replicas)
    self._epoch = jax.jit(
        jax.vmap(self._train_epoch, in_axes=(0, None, None, 0, 0, None), spmd_axis_name="seed"),
        donate_argnums=(0,), out_shardings=(self.replicas, self.replicas))
    self._predict = jax.jit(jax.vmap(self._predict_one, in_axes=(0, None)),
                            out_shardings=self.replicas)

  def _init_one(self, key) -> TrainState:
    dummy = {m: f[:1] for m, f in self.feats["train"].items()}
    params = self.head.init({"params": jax.random.fold_in(key, 0)}, dummy)["params"]
    return _new_state(params, {}, self.tx)

  def init_states(self):
    return self._init(self.keys)

  def _train_epoch(self, state, feats, labels, key, order_key, epoch):
    n = labels.shape[0]
    perm = jax.random.permutation(_epoch_key(order_key, epoch, 1), n)
    idx = perm[: self.steps_per_epoch * self.batch_size].reshape(
        self.steps_per_epoch, self.batch_size)
    drop_key = _epoch_key(key, epoch, 2)

    data_size = self.mesh.shape["data"]

    def step(state, batch_idx):
      emb = {m: feats[m][batch_idx] for m in self.mods}
      y = labels[batch_idx]
      if data_size > 1 and self.batch_size % data_size == 0:
        # Split each replica's batch over the 'data' devices of its seed group.
        emb = jax.lax.with_sharding_constraint(
            emb, jax.sharding.NamedSharding(self.mesh, jax.sharding.PartitionSpec("data")))
      rng = jax.random.fold_in(drop_key, state.step)

      def loss_of(params):
        out = self.head.apply({"params": params}, emb, train=True, rngs={"dropout": rng})
        return loss_fn(out["logits"], y, jnp.ones_like(y, bool), self.num_classes,
                       self.cfg.train.label_smoothing)

      loss, grads = jax.value_and_grad(loss_of)(state.params)
      updates, opt_state = self.tx.update(grads, state.opt_state, state.params)
      state = state.replace(step=state.step + 1, opt_state=opt_state,
                            params=optax.apply_updates(state.params, updates))
      return state, (loss, optax.global_norm(grads))

    state, (losses, gnorms) = jax.lax.scan(step, state, idx)
    return state, {"loss": losses.mean(), "grad_norm": gnorms.mean()}

  def run_epoch(self, states, epoch):
    return self._epoch(states, self.feats["train"], self.labels["train"], self.keys,
                       self.order_keys(), epoch)

  def _predict_one(self, params, feats):
    out = self.head.apply({"params": params}, feats, train=False)
    return jax.nn.softmax(out["logits"]), out["weights"]

  def predict_features(self, params, feats: dict):
    """Embeddings {modality: (N, D)} -> (K, N, C) probabilities, (K, N, M) weights."""
    rep = mesh_lib.replicated(self.mesh)
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
    acc = lambda f: float((np.asarray(self.predict_features(params, f)[0]).mean(0)
                           .argmax(-1) == labels).mean())
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
    from m6jax.data import pipeline
    self.pipeline = pipeline
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
      self.text_lookup = {s: dict(zip(self.pipeline.columns(self.sources[s])["uniq_id"],
                                      np.asarray(text_feats[s]))) for s in self.sources}
    self.model = fusion.Classifier(
        fusion=head_module(cfg, num_classes),
        image=self.image_tower.module if self.image_tower else None,
        text=bert.module if bert else None,
        image_preprocess=self.image_tower.preprocess if self.image_tower else None,
        tower_train=cfg.train.bn == "update")
    shapes = jax.eval_shape(self._init_variables, self.keys[0])
    self.tx = optim.make_optimizer(cfg.train, self.total_steps, shapes["params"])
    log.info("parameter groups:\n%s", optim.describe_groups(
        shapes["params"], dict(cfg.train.get("groups") or {})))
    self._init = jax.jit(jax.vmap(self._init_one), out_shardings=self.replicas)
    per_seed = cfg.train.data_order == "per_seed"
    self.train_batch_sharding = mesh_lib.batch(self.mesh, per_seed)
    self.eval_batch_sharding = mesh_lib.batch(self.mesh, False)
    self._step = jax.jit(self._replicated_step(per_seed), donate_argnums=(0,),
                         out_shardings=(self.replicas, self.replicas))
    self._predict = jax.jit(
        jax.vmap(self._predict_one, in_axes=(0, 0, None), spmd_axis_name="seed"),
        out_shardings=self.replicas)

  # --- model inputs -----------------------------------------------------------
  def inputs(self, batch: dict, split: str) -> dict:
    """A pipeline batch -> the Classifier's input dict (numpy)."""
    out = {"label": batch["label"], "mask": batch["mask"]}
    if self.image_tower is not None:
      out["image"] = batch["image"]
    if self.text_tower is not None:
      from m6jax.data import tokenize
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
    return _new_state(v["params"], v["batch_stats"], self.tx)

  def init_states(self):
    return self._init(self.keys)

  # --- steps ----------------------------------------------------------------
  def _replicated_step(self, per_seed: bool):
    """The K-replica step: `vmap` (default) or `lax.map` (train.replica_loop='map').

    vmap over parameters turns each convolution into a grouped convolution,
    which GPUs run far below dense speed (benchmarks/bench_gpu.md); `lax.map`
    keeps one program and one compile but runs the replicas one after another
    with dense convolutions. 'map' needs the whole replica axis on each device.
    """
    how = self.cfg.train.get("replica_loop", "vmap")
    if how == "vmap":
      return jax.vmap(self._train_step, in_axes=(0, 0 if per_seed else None, 0),
                      spmd_axis_name="seed")
    if how != "map":
      raise ValueError(f"train.replica_loop must be 'vmap' or 'map', got {how!r}")
    if self.mesh.shape["seed"] != 1:
      raise ValueError("train.replica_loop='map' runs replicas in sequence on each device: "
                       "use a mesh with seed=1")

    def step(states, batch, keys):
      if per_seed:
        return jax.lax.map(lambda a: self._train_step(*a), (states, batch, keys))
      return jax.lax.map(lambda a: self._train_step(a[0], batch, a[1]), (states, keys))
    return step

  def _train_step(self, state: TrainState, batch: dict, key):
    rng = jax.random.fold_in(jax.random.fold_in(key, 3), state.step)
    mutable = ["batch_stats"] if self.cfg.train.bn == "update" else []

    def loss_of(params):
      out, upd = self.model.apply({"params": params, "batch_stats": state.batch_stats},
                                  batch, train=True, rngs={"dropout": rng}, mutable=mutable)
      loss = loss_fn(out["logits"], batch["label"], batch["mask"], self.num_classes,
                     self.cfg.train.label_smoothing)
      return loss, upd

    (loss, upd), grads = jax.value_and_grad(loss_of, has_aux=True)(state.params)
    updates, opt_state = self.tx.update(grads, state.opt_state, state.params)
    state = state.replace(step=state.step + 1, opt_state=opt_state,
                          params=optax.apply_updates(state.params, updates),
                          batch_stats=upd.get("batch_stats", state.batch_stats))
    return state, {"loss": loss, "grad_norm": optax.global_norm(grads)}

  def _predict_one(self, params, batch_stats, batch):
    out = self.model.apply({"params": params, "batch_stats": batch_stats}, batch, train=False)
    return jax.nn.softmax(out["logits"]), out["weights"]

  def _shuffle_seed(self, k: int, epoch: int) -> int:
    base = self.cfg.seed + k if self.cfg.train.data_order == "per_seed" else self.cfg.seed
    return (base * 1_000_003 + epoch) % (2**31 - 1)

  def run_epoch(self, states, epoch):
    cfg, p = self.cfg, self.pipeline
    k_iters = cfg.seeds if cfg.train.data_order == "per_seed" else 1
    iters = [p.batches(self.sources["train"], self.batch_size, cfg.data.image_size,
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
    for batch in self.pipeline.batches(self.sources[split], self.cfg.data.batch_size,
                                       self.cfg.data.image_size):
      pr, w = self.predict_batch(params, batch_stats, batch, split)
      probs.append(np.asarray(pr)[:, batch["mask"]])
      weights.append(np.asarray(w)[:, batch["mask"]])
    probs, weights = np.concatenate(probs, 1), np.concatenate(weights, 1)
    return (probs, weights) if with_weights else probs


def _text_features_needed(cfg) -> bool:
  return "text" in fusion.modalities(cfg.model.fusion) and (
      cfg.train.mode == "frozen" or cfg.model.text.name == "tfidf")


@dataclasses.dataclass
class Setup:
  """Everything a run builds before training; `predict` rebuilds it from a workdir."""
  trainer: Trainer
  builder: Any
  report: Any
  class_names: list
  cols: dict            # {split: {'label', 'uniq_id', 'text'}}
  feats: dict           # {modality: {split: (N, D)}} cached embeddings (frozen mode)
  text_features: Any    # the fitted TfidfFeatures, when the text tower is TF-IDF
  cfg: Any = None

  def text_features_for(self, texts) -> np.ndarray:
    """New texts -> (N, D) text features exactly as this run computed them."""
    if self.text_features is not None:   # TF-IDF fit on the training split
      return self.text_features.transform(texts).astype(np.float32)
    from m6jax import embed
    from m6jax.models import towers
    tower = towers.text_tower(self.cfg.model.text.name, self.cfg.model.text.weights)
    return embed.embed_texts(self.cfg, tower, texts)


def restore(workdir: str, which: str = "best"):
  """A finished run -> (cfg, Setup, params, batch_stats).

  which: 'best' (each replica's best-validation parameters) or 'latest'.
  Parameters carry the leading replica axis K.
  """
  from m6jax import checkpoint
  cfg = load_config(workdir)
  run = setup(cfg, workdir)
  with checkpoint.Checkpoints(workdir) as ckpt:
    target = run.trainer.init_states()
    restored = ckpt.restore_best(target) if which == "best" else ckpt.restore_latest(target)
  if restored is None:
    raise FileNotFoundError(f"no {which} checkpoint in {workdir}/checkpoints")
  states, _ = restored
  if which == "best":
    return cfg, run, states.best_params, states.best_batch_stats
  return cfg, run, states.params, states.batch_stats


def load_config(workdir: str):
  """The ConfigDict a run saved in `workdir/config.json`."""
  import json

  import ml_collections
  with open(os.path.join(workdir, "config.json")) as f:
    return ml_collections.ConfigDict(json.load(f))


def setup(cfg, workdir: str) -> Setup:
  """config -> dataset, embeddings (frozen mode) and the trainer for `workdir`."""
  from m6jax import embed
  from m6jax.data import pipeline, tfds_builder
  from m6jax.models import towers

  if cfg.train.mode not in ("frozen", "finetune"):
    raise ValueError(f"train.mode must be 'frozen' or 'finetune', got {cfg.train.mode!r}")
  builder, report = tfds_builder.prepare(cfg.data)
  class_names = tfds_builder.class_names(builder)
  splits = ("train", "validation", "test")
  cols = {s: pipeline.columns(builder.as_data_source(s)) for s in splits}
  for s in splits:
    if not len(cols[s]["label"]):
      raise ValueError(f"split {s!r} is empty; the catalogue is too small for data.split")
  labels = {s: cols[s]["label"] for s in splits}
  cache = cfg.train.get("cache_dir") or os.path.join(workdir, "cache")
  mods = fusion.modalities(cfg.model.fusion)
  feats, text_features = {}, None
  if cfg.train.mode == "frozen" and "image" in mods:
    feats["image"] = embed.image_embeddings(cfg, builder, splits, cache, seed=cfg.seed)
  if _text_features_needed(cfg):
    feats["text"], text_features = embed.text_embeddings(
        cfg, {s: cols[s]["text"] for s in splits}, cache, data_id=builder.data_dir)
  if cfg.train.mode == "frozen":
    trainer = FrozenTrainer(cfg, len(class_names),
                            {s: {m: f[s] for m, f in feats.items()} for s in splits}, labels)
  else:
    dtype = compute_dtype(cfg)
    image_tower = (towers.image_tower(cfg.model.image.name, cfg.model.image.weights,
                                      cfg.data.image_size, dtype=dtype, seed=cfg.seed)
                   if "image" in mods else None)
    text_tower = (towers.text_tower(cfg.model.text.name, cfg.model.text.weights, dtype=dtype)
                  if "text" in mods and cfg.model.text.name != "tfidf" else None)
    trainer = FinetuneTrainer(cfg, len(class_names), builder, image_tower, text_tower,
                              feats.get("text"))
  return Setup(trainer, builder, report, class_names, cols, feats, text_features, cfg)


def train_and_evaluate(cfg, workdir: str, on_epoch=None) -> dict:
  """config -> data -> (embeddings) -> K-seed training -> test scores in `workdir`.

  Returns the results dict also written to `workdir/results.json`.
  on_epoch: optional callback for each epoch's history record (tracking).
  """
  from m6jax import checkpoint, results

  t0 = time.time()
  os.makedirs(workdir, exist_ok=True)
  results.write_json(os.path.join(workdir, "config.json"), cfg.to_dict())
  run = setup(cfg, workdir)
  run.report.write(workdir)
  if run.report.bad:
    log.warning("%d bad rows skipped; see %s", len(run.report.bad),
                os.path.join(workdir, "data_report.txt"))
  t_setup = time.time()
  labels = {s: c["label"] for s, c in run.cols.items()}
  ckpt = checkpoint.Checkpoints(workdir, enabled=cfg.train.checkpoint)
  try:
    states, history = run.trainer.fit(labels["validation"], ckpt, on_epoch=on_epoch)
  finally:
    ckpt.close()
  t_train = time.time()

  mods = fusion.modalities(cfg.model.fusion)
  probs, weights = run.trainer.predict(states.best_params, states.best_batch_stats, "test",
                                       with_weights=True)
  scores = results.score(labels["test"], probs, run.class_names)
  extra = {
      "config_name": cfg.name, "mode": cfg.train.mode, "fusion": cfg.model.fusion,
      "seeds": [cfg.seed + k for k in range(cfg.seeds)],
      "modality_weights_mean": dict(zip(mods, np.asarray(weights).mean(axis=(0, 1)).tolist())),
      "best_val_macro_f1": np.asarray(states.best_f1, np.float64).tolist(),
      "data": run.report.to_dict() | {"skipped": len(run.report.bad)},
      "history": history,
      "timing_s": {"data_and_embeddings": t_setup - t0, "train": t_train - t_setup,
                   "total": time.time() - t0},
      "devices": [str(d) for d in jax.devices()],
  }
  if cfg.train.mode == "frozen" and len(mods) > 1:
    extra["modality_importance"] = run.trainer.modality_importance(states.best_params)
    log.info("modality importance (test, ensemble accuracy): %s",
             {k: round(v, 4) for k, v in extra["modality_importance"].items()})
  if cfg.get("feasibility") and run.feats:
    from m6jax import feasibility
    extra["feasibility"] = feasibility.feasibility_study(
        {m: np.concatenate([f[s] for s in ("train", "validation", "test")])
         for m, f in run.feats.items()},
        np.concatenate([labels[s] for s in ("train", "validation", "test")]),
        run.class_names, workdir, seed=cfg.seed)
  out = results.write_outputs(workdir, scores, run.class_names, run.cols["test"]["uniq_id"],
                              labels["test"], probs, extra)
  s = out["test"]["summary"]
  log.info("test accuracy %.4f +- %.4f, macro-F1 %.4f +- %.4f over %d seeds; "
           "ensemble accuracy %.4f (%.0f s)", s["accuracy"]["mean"], s["accuracy"]["std"],
           s["macro_f1"]["mean"], s["macro_f1"]["std"], cfg.seeds,
           out["test"]["ensemble"]["accuracy"], time.time() - t0)
  return out
