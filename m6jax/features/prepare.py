"""config -> dataset -> towers -> features -> a ready trainer (`setup`).

What a run builds before training, and what a finished run is rebuilt from
(m6jax.inference.restore): the TFDS dataset of the catalogue, its columns, the cached
tower embeddings (frozen mode) or the towers themselves (finetune mode), the
fitted TF-IDF features, and the trainer that owns the model.
"""

from __future__ import annotations

import dataclasses
import os
from concurrent.futures import ThreadPoolExecutor
from typing import Any

import numpy as np

from m6jax.data import pipeline, tfds_builder, twins
from m6jax.features import embed
from m6jax.models import fusion, towers
from m6jax.train import finetune, folds
from m6jax.train import trainer as trainer_lib

SPLITS = ("train", "validation", "test")


@dataclasses.dataclass
class Setup:
  """Everything a run builds before training; m6jax.inference.restore rebuilds it from a workdir."""
  trainer: trainer_lib.Trainer
  builder: Any
  report: Any
  class_names: list
  cols: dict            # {split: {'label', 'uniq_id', 'text'}}
  feats: dict           # {modality: {split: (N, D)}} cached embeddings (frozen mode)
  text_features: Any    # the fitted TfidfFeatures, when the text tower is TF-IDF
  cfg: Any = None

  def dataset_id(self) -> str:
    """The built dataset's name and version: a hash of everything it was built from."""
    return "/".join(os.path.normpath(self.builder.data_dir).split(os.sep)[-2:])


def all_splits(by_split: dict) -> np.ndarray:
  """{split: (n_s, ...)} -> (sum n_s, ...) in SPLITS order: when the splits are
  consecutive views of one array (as embed's features are), a read-only view of
  them (no copy), else their concatenation."""
  parts = [np.asarray(by_split[s]) for s in SPLITS]
  first, owner = parts[0], parts[0].base
  row = first.strides[0] if first.ndim else 0
  ends = np.cumsum([0] + [len(p) for p in parts])
  if owner is not None and first.ndim and all(
      p.base is owner and p.flags.c_contiguous and p.dtype == first.dtype
      and p.shape[1:] == first.shape[1:]
      and p.__array_interface__["data"][0] == first.__array_interface__["data"][0] + row * lo
      for p, lo in zip(parts, ends)):
    # Every part lies inside `owner`, one after the other: so does their union.
    return np.lib.stride_tricks.as_strided(first, (int(ends[-1]),) + first.shape[1:],
                                           writeable=False)
  return np.concatenate(parts)


def text_features_needed(cfg) -> bool:
  """Whether the run uses cached text features (frozen mode, or a TF-IDF text tower)."""
  return "text" in fusion.modalities(cfg.model.fusion) and (
      cfg.train.mode == "frozen" or cfg.model.text.name == "tfidf")


def setup(cfg, workdir: str) -> Setup:
  """config -> dataset, embeddings (frozen mode) and the trainer for `workdir`."""
  builder, report = tfds_builder.prepare(cfg.data)
  class_names = tfds_builder.class_names(builder)
  cols = {s: pipeline.columns(tfds_builder.metadata_source(builder, s)) for s in SPLITS}
  for s in SPLITS:
    if not len(cols[s]["label"]):
      raise ValueError(f"split {s!r} is empty; the catalogue is too small for data.split")
  labels = {s: cols[s]["label"] for s in SPLITS}
  # None: the shared feature cache (m6jax.features.cache)
  cache = cfg.train.cache_dir or None
  mods = fusion.modalities(cfg.model.fusion)
  feats, text_features = {}, None
  texts = {s: cols[s]["text"] for s in SPLITS}
  with ThreadPoolExecutor(1) as loader:
    text_tower = None
    if (text_features_needed(cfg) and cfg.model.text.name != "tfidf" and
        embed.text_cache_misses(cfg, [t for s in SPLITS for t in texts[s]], cache)):
      # Loading the BERT tower (transformers, tokenizer, weights: ~3 s of
      # single-threaded Python) overlaps the image embedding.
      text_tower = loader.submit(towers.text_tower, cfg.model.text.name,
                                 cfg.model.text.weights).result
    if cfg.train.mode == "frozen" and "image" in mods:
      feats["image"] = embed.image_embeddings(cfg, builder, SPLITS, cache, seed=cfg.seed)
    if text_features_needed(cfg):
      feats["text"], text_features = embed.text_embeddings(
          cfg, texts, cache, tower=text_tower)
  if cfg.train.mode == "frozen":
    plan = None
    if cfg.train.folds >= 2:
      pooled = np.concatenate([labels[s] for s in folds.POOL_SPLITS])
      # Twins (the dataset's report) share a fold, as they share a split.
      groups = twins.group_index([u for s in folds.POOL_SPLITS for u in cols[s]["uniq_id"]],
                                 report.twin_groups)
      plan = folds.cv_plan(pooled, cfg.train.folds, cfg.seeds, cfg.data.split_seed,
                           cfg.train.repeats, groups)
    trainer = trainer_lib.FrozenTrainer(cfg, len(class_names),
                                  {s: {m: f[s] for m, f in feats.items()} for s in SPLITS},
                                  labels, plan=plan)
  else:
    dtype = trainer_lib.compute_dtype(cfg)
    image_tower = (towers.image_tower(cfg.model.image.name, cfg.model.image.weights,
                                      cfg.data.image_size, dtype=dtype, seed=cfg.seed)
                   if "image" in mods else None)
    text_tower = (towers.text_tower(cfg.model.text.name, cfg.model.text.weights, dtype=dtype)
                  if "text" in mods and cfg.model.text.name != "tfidf" else None)
    trainer = finetune.FinetuneTrainer(cfg, len(class_names), builder, image_tower, text_tower,
                                    feats.get("text"))
  return Setup(trainer, builder, report, class_names, cols, feats, text_features, cfg)
