"""Frozen towers: embeddings of every split, computed once and cached.

The cache file name is a hash of what the embeddings depend on (tower,
weights, preprocessing, dataset), so a changed input never reuses stale data.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os

import jax
import jax.numpy as jnp
import numpy as np
import tqdm

from m6jax import weights as weights_lib
from m6jax.data import pipeline
from m6jax.models import towers

log = logging.getLogger(__name__)


def _weights_id(spec: str, tower: str) -> str:
  if weights_lib.is_random(spec):
    return "random"
  path = weights_lib.resolve(spec, tower=tower)
  st = path.stat()
  return f"{spec}:{path}:{st.st_size}:{int(st.st_mtime)}"


def _cached(cache_dir: str | None, key: dict, compute):
  """Loads {split: array} from `cache_dir` when `key` matches, else computes and saves."""
  if not cache_dir:
    return compute()
  digest = hashlib.sha1(json.dumps(key, sort_keys=True).encode()).hexdigest()[:16]
  path = os.path.join(cache_dir, f"{key['tower']}-{digest}.npz")
  if os.path.isfile(path):
    log.info("embeddings from cache %s", path)
    with np.load(path) as z:
      return {k: z[k] for k in z.files}
  out = compute()
  os.makedirs(cache_dir, exist_ok=True)
  tmp = path + ".tmp.npz"
  np.savez(tmp, **out)
  os.replace(tmp, path)  # a killed run never leaves a half-written cache
  return out


def image_embeddings(cfg, builder, splits, cache_dir=None, seed: int = 0) -> dict:
  """{split: float32 (N, D)} from the frozen image tower, in stored order."""
  name, spec, size = cfg.model.image.name, cfg.model.image.weights, cfg.data.image_size
  key = dict(tower=name, weights=_weights_id(spec, name), size=size, data=builder.data_dir,
             seed=seed if weights_lib.is_random(spec) else None)

  def compute():
    tower = towers.image_tower(name, spec, size, seed=seed)

    bs = cfg.data.batch_size
    out = {}
    for split in splits:
      src = builder.as_data_source(split)
      out[split] = embed_image_batches(
          tower, tqdm.tqdm(pipeline.batches(src, bs, size),
                           total=pipeline.num_batches(len(src), bs),
                           desc=f"{name} {split}", leave=False))
    return out

  return _cached(cache_dir, key, compute)


def embed_image_batches(tower, batches) -> np.ndarray:
  """Frozen image tower over batches {'image': uint8 (B, S, S, 3), 'mask'} -> (N, D)."""

  @jax.jit
  def embed(variables, images):
    x = tower.preprocess(images.astype(jnp.float32))
    return tower.module.apply(variables, x, train=False)["embedding"]

  chunks = [np.asarray(embed(tower.variables, b["image"]))[b["mask"]] for b in batches]
  return np.concatenate(chunks).astype(np.float32)


def text_embeddings(cfg, texts: dict, cache_dir=None, data_id: str = ""):
  """({split: float32 (N, D)}, fitted TfidfFeatures or None) from the text tower.

  `texts` is {split: list[str]}; TF-IDF is fit on the 'train' texts only.
  """
  name, spec = cfg.model.text.name, cfg.model.text.weights
  if name == "tfidf":
    from m6jax.models import tfidf
    feats = tfidf.TfidfFeatures(dim=cfg.model.text.tfidf_dim, seed=cfg.seed).fit(texts["train"])
    return {s: feats.transform(t).astype(np.float32) for s, t in texts.items()}, feats
  key = dict(tower=name, weights=_weights_id(spec, name), max_len=cfg.data.max_text_length,
             data=data_id, splits=sorted(texts))

  def compute():
    tower = towers.text_tower(name, spec)
    return {s: embed_texts(cfg, tower, t) for s, t in texts.items()}

  return _cached(cache_dir, key, compute), None


def embed_texts(cfg, tower, texts) -> np.ndarray:
  """Frozen BERT tower over a list of texts -> float32 (N, D), length-bucketed."""
  from m6jax.data import tokenize

  @jax.jit
  def apply(input_ids, attention_mask):
    return tower.module.apply(tower.params, input_ids, attention_mask, train=False)["embedding"]

  return np.asarray(tokenize.embed_texts(apply, tower.tokenizer, texts, cfg.data.batch_size,
                                         cfg.data.max_text_length), np.float32)
