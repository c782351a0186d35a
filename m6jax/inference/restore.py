"""Rebuild a trained run for inference from its bundle and checkpoint only.

  cfg, run, params, batch_stats = restore.restore(workdir)

reads `<workdir>/bundle` (m6jax.inference.bundle) and exactly the checkpoint step
the bundle and results.json record as scored (no fallback to another step): it
never builds the dataset, re-embeds the catalogue or reads the training CSV, so
a run keeps predicting the same way when its catalogue changes or moves. The
weight files of the towers inference loads are checked against the fingerprints
recorded at training (BundleError on a mismatch). Parameters carry the leading
replica axis K, read from the checkpoint and checked against the bundle: each
replica's best-validation parameters (`TrainState.best_*`), the ones results.json scored.

`run` is an :class:`Inference`: the model and feature extractors of the run
(m6jax.inference.predict, m6jax.explain.run and m6jax.inference.serve use it),
predicting through m6jax.train.predictions exactly as the trainers do. The run's
own splits (`builder`, `cols`, `predict(params, stats, split)`) are read from the
built dataset the bundle names, and only when asked for.
"""

from __future__ import annotations

import functools
import json
import os

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import orbax.checkpoint as ocp

from m6jax import defaults
from m6jax.data import pipeline
from m6jax.features import embed
from m6jax.inference import bundle as bundle_lib
from m6jax.models import fusion, towers
from m6jax.train import checkpoint, predictions
from m6jax.train import trainer as trainer_lib

WHICH = ("best", "latest")
SPLITS = ("train", "validation", "test")


def load_config(workdir: str) -> ml_collections.ConfigDict:
  """The ConfigDict a run saved in `workdir/config.json` (defaults.saved_config)."""
  path = os.path.join(workdir, "config.json")
  if not os.path.isfile(path):
    raise FileNotFoundError(f"{path} not found: {workdir!r} is not a training run")
  with open(path) as f:
    return defaults.saved_config(json.load(f))


class _PerSplit(dict):
  """{split: value} computed by `fn(split)` on first access."""

  def __init__(self, fn):
    super().__init__()
    self._fn = fn

  def __missing__(self, split):
    self[split] = value = self._fn(split)
    return value


class Inference:
  """A trained run's model for inference, rebuilt from its bundle.

  Frozen mode: `text_features_for` / `image_features_for` give the tower
  embeddings, `predict_features(params, feats)` the head's output. Finetune
  mode: `predict_batch(params, batch_stats, batch, split)` runs towers + head on
  a pipeline batch. Both return (K, N, C) probabilities and (K, N, M) modality
  weights. A batch may carry `<modality>_embedding` arrays in place of the raw
  input: zeros there stand for a missing modality (m6jax.inference.predict).
  """

  def __init__(self, bundle: bundle_lib.Bundle):
    self.bundle = bundle
    self.cfg = cfg = bundle.config
    self.class_names = bundle.class_names
    self.mods = bundle.modalities
    self.mode = bundle.meta["mode"]
    self.num_replicas = bundle.num_replicas
    self.data_cfg = bundle.data_config()
    self.feature_dims = {m: t["feature_dim"] for m, t in bundle.meta["towers"].items()}
    self.text_features = bundle.text_features()       # fitted TF-IDF, or None
    self.folds = bundle.folds                         # replicas per seed model
    self.head = trainer_lib.head_module(cfg, len(self.class_names))
    self.model = None
    if self.mode == "frozen":
      self._predict = predictions.replica_predict(self.head.apply, frozen=True)
    else:
      dtype = trainer_lib.compute_dtype(cfg)
      image = None
      if "image" in self.mods:
        # The module only: its parameters (and BatchNorm statistics) are in the checkpoint.
        image = towers.image_tower(cfg.model.image.name, "none", self.data_cfg.image_size,
                                   dtype=dtype, seed=cfg.seed)
      bert = self.text_tower if "text" in self.mods and self.text_features is None else None
      self.model = fusion.Classifier(
          fusion=self.head, image=image.module if image else None,
          text=bert.module if bert else None,
          image_preprocess=image.preprocess if image else None,
          tower_train=cfg.train.bn == "update")
      self._predict = predictions.replica_predict(self.model.apply, frozen=False)

  # --- towers (built on first use) ---------------------------------------------
  @functools.cached_property
  def image_tower(self) -> towers.ImageTower:
    """The frozen image tower with its (verified) weights."""
    c = self.cfg.model.image
    return towers.image_tower(c.name, c.weights, self.data_cfg.image_size, seed=self.cfg.seed)

  @functools.cached_property
  def text_tower(self) -> towers.TextTower:
    """The BERT text tower with its (verified) weights and tokenizer."""
    c = self.cfg.model.text
    # Frozen embeddings were computed in float32 (m6jax.features.embed); finetune uses model.dtype.
    dtype = trainer_lib.compute_dtype(self.cfg) if self.mode == "finetune" else jnp.float32
    return towers.text_tower(c.name, c.weights, dtype=dtype)

  # --- features -------------------------------------------------------------------
  def text_features_for(self, texts) -> np.ndarray:
    """Texts -> float32 (N, D) text features exactly as the run computed them."""
    if self.text_features is not None:   # TF-IDF fitted on the training split
      return self.text_features.transform(list(texts)).astype(np.float32)
    # Texts the run embedded come back from the shared feature cache exactly
    # as training used them (the key covers tower, weights and max length);
    # only the others are embedded, and not stored.
    return embed.bert_features(self.cfg, list(texts), self.cfg.train.cache_dir or None,
                               tower=lambda: self.text_tower, store=False)

  def image_features_for(self, batches) -> np.ndarray:
    """Batches {'image': uint8 (B, S, S, 3), 'mask'} -> float32 (N, Di) (frozen tower)."""
    return embed.embed_image_batches(self.image_tower, batches)

  # --- prediction -----------------------------------------------------------------
  def ensemble(self, probs) -> np.ndarray:
    """(R, N, C) replica probabilities -> (N, C), as results.json scored them
    (m6jax.train.predictions.ensemble: fold ensembles first, then the seeds)."""
    return predictions.ensemble(probs, self.folds)

  def predict_features(self, params, feats: dict):
    """Embeddings {modality: (N, D)} -> (K, N, C) probabilities, (K, N, M) weights."""
    return self._predict(params, {m: np.asarray(feats[m], np.float32) for m in self.mods})

  def inputs(self, batch: dict, split: str = "new") -> dict:
    """A pipeline batch -> the Classifier's input dict (finetune mode), as the trainer
    builds it (m6jax.train.predictions.inputs); TF-IDF text features are computed
    row by row, so every split gets each row's own."""
    tok = None
    if "text" in self.mods and self.text_features is None:
      from m6jax.data import tokenize
      tok = functools.partial(tokenize.tokenize, self.text_tower.tokenizer,
                              max_length=self.cfg.data.max_text_length)
    return predictions.inputs(
        batch, self.mods, tokenize=tok,
        text_rows=lambda b: self.text_features_for([str(t) for t in b["text"]]))

  def predict_batch(self, params, batch_stats, batch: dict, split: str = "new"):
    """A pipeline batch -> (K, B, C) probabilities, (K, B, M) modality weights (finetune)."""
    return self._predict(params, batch_stats or {}, self.inputs(batch, split))

  # --- the run's own splits (from the built dataset, on demand) --------------------
  @functools.cached_property
  def builder(self):
    """The run's built dataset (read-only); BundleError when it is gone."""
    import tensorflow_datasets as tfds
    path = self.bundle.meta["dataset"]["dir"]
    if not os.path.isfile(os.path.join(path, "dataset_info.json")):
      raise bundle_lib.BundleError(f"the run's built dataset {path} is gone: its own splits "
                                   "cannot be read (new products need only the bundle)")
    return tfds.builder_from_directory(path)

  @functools.cached_property
  def cols(self) -> dict:
    """{split: {'label', 'uniq_id', 'text'}} of the run's dataset."""
    from m6jax.data import tfds_builder  # tensorflow_datasets: only for the run's splits
    return _PerSplit(lambda s: pipeline.columns(tfds_builder.metadata_source(self.builder, s)))

  @functools.cached_property
  def feats(self) -> dict:
    """{'text': {split: (N, D)}} text features of the run's splits, computed on demand."""
    if "text" not in self.mods:
      return {}
    return {"text": _PerSplit(lambda s: self.text_features_for(self.cols[s]["text"]))}

  def predict(self, params, batch_stats, split: str, with_weights: bool = False):
    """(K, N, C) probabilities (and (K, N, M) modality weights) for a split of the run."""
    bs, size = self.data_cfg.batch_size, self.data_cfg.image_size
    src = self.builder.as_data_source(split)
    if self.mode == "frozen":
      feats = {}
      if "image" in self.mods:
        feats["image"] = self.image_features_for(pipeline.batches(src, bs, size))
      if "text" in self.mods:
        feats["text"] = self.feats["text"][split]
      probs, weights = self.predict_features(params, feats)
    else:
      probs, weights = predictions.over_batches(
          lambda b: self.predict_batch(params, batch_stats, b, split),
          pipeline.batches(src, bs, size))
    return (probs, weights) if with_weights else probs


def _saved_tree(ckpt: checkpoint.Checkpoints, step: int | None = None):
  """The saved state's tree (nested dicts) as ShapeDtypeStructs on this process's
  first device, from `step` or else the newest step whose metadata reads; None
  when none does.

  A checkpoint saved on another device topology (a mesh of 8 devices, say)
  restores onto this machine with this target.
  """
  device = jax.sharding.SingleDeviceSharding(jax.local_devices()[0])
  for s in [step] if step is not None else reversed(ckpt.all_steps()):
    path = os.path.join(ckpt.directory, "latest", str(s), "state")
    try:
      tree = ocp.StandardCheckpointer().metadata(path).item_metadata.tree
    except Exception:  # noqa: BLE001 - unreadable step: restore_latest reports it
      continue
    return jax.tree.map(lambda m: jax.ShapeDtypeStruct(m.shape, m.dtype, sharding=device), tree)
  return None


def load(bundle_dir: str, run_dir: str, which: str = "best", weights: dict | None = None):
  """Bundle folder + run folder holding `checkpoints/` -> (Inference, params, batch_stats).

  which: 'best' (each replica's best-validation parameters, what results.json
  scored) or 'latest' (the parameters after the last trained epoch).
  weights: {modality: weight spec} read instead of the bundle's (Bundle.with_weights).
  """
  if which not in WHICH:
    raise ValueError(f"which must be one of {WHICH}, got {which!r}")
  b = bundle_lib.load(bundle_dir)
  if weights:
    b = b.with_weights(weights)
  b.verify_run(run_dir)
  # The towers whose weight files inference reads: frozen towers, and the BERT
  # tokenizer/weights (finetune keeps the trained tower parameters in the checkpoint).
  used = [m for m, t in b.meta["towers"].items()
          if t["name"] != "tfidf" and (b.meta["mode"] == "frozen" or m == "text")]
  b.verify_weights(used)
  step = b.checkpoint_step   # what results.json scored; None: a bundle from before steps
  with checkpoint.Checkpoints(run_dir, read_only=True) as ckpt:
    if step is None:
      restored = ckpt.restore_latest(_saved_tree(ckpt))
    else:
      restored = ckpt.restore_step(step, _saved_tree(ckpt, step))
  if restored is None:
    raise FileNotFoundError(f"no checkpoint in {checkpoint.directory(run_dir)}")
  state = restored[0]
  params = state["best_params" if which == "best" else "params"]
  stats = state["best_batch_stats" if which == "best" else "batch_stats"] or {}
  k = int(jax.tree.leaves(params)[0].shape[0])
  if k != b.num_replicas:
    raise bundle_lib.BundleError(
        f"{checkpoint.directory(run_dir)} holds {k} replicas, the bundle {bundle_dir} "
        f"{b.num_replicas}: they are from different runs")
  return Inference(b), params, stats


def _check_scored_step(workdir: str) -> None:
  """BundleError when results.json and the bundle name different scored steps."""
  path = os.path.join(workdir, "results.json")
  if not os.path.isfile(path):
    return
  with open(path) as f:
    scored = json.load(f).get("checkpoint_step")
  bundled = bundle_lib.load(bundle_lib.directory(workdir)).checkpoint_step
  if None not in (scored, bundled) and scored != bundled:
    raise bundle_lib.BundleError(
        f"{path} scored checkpoint step {scored}, the bundle {bundle_lib.directory(workdir)} "
        f"names step {bundled}: the run was not finished consistently; rerun it to rescore")


def restore(workdir: str, which: str = "best"):
  """A finished run -> (cfg, Inference, params, batch_stats); see the module docstring."""
  if which not in WHICH:
    raise ValueError(f"which must be one of {WHICH}, got {which!r}")
  if not os.path.isdir(bundle_lib.directory(workdir)):
    load_config(workdir)   # names a folder that is not a run at all
  _check_scored_step(workdir)
  run, params, stats = load(bundle_lib.directory(workdir), workdir, which)
  return run.cfg, run, params, stats
