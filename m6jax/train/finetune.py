"""Fine-tuning: towers + head trained end to end, K replicas at once.

The image batches come from the grain pipeline; the epoch loop, validation,
selection and checkpointing are m6jax.train.trainer.Trainer's.
"""

from __future__ import annotations

import functools
import logging

import jax
import jax.numpy as jnp
import numpy as np
import tqdm

from m6jax import mesh as mesh_lib
from m6jax.data import pipeline, tokenize
from m6jax.models import fusion
from m6jax.train import optim, predictions, steps
from m6jax.train.trainer import Trainer, head_module

log = logging.getLogger(__name__)


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
        shapes["params"], dict(cfg.train.groups), self.steps_per_epoch))
    self._init = jax.jit(jax.vmap(self._init_one), out_shardings=self.replicas)
    per_seed = cfg.train.data_order == "per_seed"
    self.train_batch_sharding = mesh_lib.batch_sharding(self.mesh, per_seed)
    self.eval_batch_sharding = mesh_lib.batch_sharding(self.mesh, False)
    self._step = jax.jit(self._replicated_step(per_seed), donate_argnums=(0,),
                         out_shardings=(self.replicas, self.outputs))
    self._predict = predictions.replica_predict(self.model.apply, frozen=False,
                                                out_shardings=self.outputs,
                                                spmd_axis_name="seed")

  # --- model inputs -----------------------------------------------------------
  def inputs(self, batch: dict, split: str) -> dict:
    """A pipeline batch -> the Classifier's input dict (numpy; m6jax.train.predictions)."""
    tok = None
    if self.text_tower is not None:
      tok = functools.partial(tokenize.tokenize, self.text_tower.tokenizer,
                              max_length=self.cfg.data.max_text_length)
    return predictions.inputs(
        batch, self.mods, tokenize=tok,
        text_rows=lambda b: predictions.lookup_rows(self.text_lookup[split], b, split))

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
    loop = mesh_lib.resolve_replica_loop(self.cfg.train.replica_loop)
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
    probs, weights = predictions.over_batches(
        lambda b: self.predict_batch(params, batch_stats, b, split),
        pipeline.batches(self.sources[split], self.cfg.data.batch_size,
                         self.cfg.data.image_size))
    return (probs, weights) if with_weights else probs
