"""Frozen towers: embeddings of every split in one pass, through the feature cache.

Each tower runs once over the rows of all splits together (one compile per
tower: one batch shape for images, one packed-row shape for texts), and only
over the products that the shared feature cache (m6jax.features.cache) does not
already hold for this tower, weights and preprocessing. Results come back
split by split, in stored order.
"""

from __future__ import annotations

import logging

import jax
import numpy as np
import tensorflow_datasets as tfds
import tqdm

from m6jax import mesh as mesh_lib
from m6jax.data import pipeline
from m6jax.features import cache as cache_lib
from m6jax.models import towers
from m6jax.models.weights import sources as weights_lib

log = logging.getLogger(__name__)

# Part of every cache key: bump when a tower's preprocessing or math changes
# its features beyond float rounding, so old entries are not reused.
FEATURES_VERSION = 2   # 2: sharded store (per-product .npy entries of 1 are never read)


def _weights_id(spec: str, tower: str) -> str:
  """Weight spec -> fingerprint: the sha256 of each file's content (weights_lib.file_digest:
  hashed once per process and file version), so touched-but-equal files still match and
  replaced ones of the same size do not."""
  if weights_lib.is_random(spec):
    return "random"
  path = weights_lib.resolve(spec, tower=tower)
  files = sorted(p for p in path.rglob("*") if p.is_file()) if path.is_dir() else [path]
  parts = [f"{p.relative_to(path) if path.is_dir() else p.name}:{weights_lib.file_digest(p)}"
           for p in files]
  return f"{spec}:" + cache_lib.content_key("|".join(parts))[:16]


def _store(cache_dir, tower: str, **spec) -> cache_lib.FeatureCache:
  return cache_lib.FeatureCache(cache_dir, tower, dict(spec, version=FEATURES_VERSION))


class _Picked:
  """Random-access view of chosen records of several sources: [(source, index)]."""

  def __init__(self, picks):
    self.picks = picks

  def __len__(self):
    return len(self.picks)

  def __getitem__(self, i):
    src, j = self.picks[i]
    return src[j]


def _assemble(keys: dict, feats: dict) -> dict:
  """{split: [key]}, {key: (D,)} -> {split: float32 (N, D)}."""
  dim = len(next(iter(feats.values()))) if feats else 0
  return {s: (np.stack([feats[k] for k in ks]).astype(np.float32) if ks
              else np.zeros((0, dim), np.float32)) for s, ks in keys.items()}


def image_embeddings(cfg, builder, splits, cache_dir=None, seed: int = 0) -> dict:
  """{split: float32 (N, D)} from the frozen image tower, in stored order.

  cache_dir: feature cache root ('' / None: the shared default). Products are
  keyed by the sha1 of their stored JPEG bytes; only cache misses are
  decoded and embedded, all splits in one pass.
  """
  name, spec, size = cfg.model.image.name, cfg.model.image.weights, cfg.data.image_size
  random = weights_lib.is_random(spec)
  store = _store(cache_dir, name, kind="image", weights=_weights_id(spec, name), image_size=size,
                 seed=seed if random else None, dtype="float32")
  keys = {}
  for s in splits:
    raw = builder.as_data_source(s, decoders={"image": tfds.decode.SkipDecoding()})
    keys[s] = [cache_lib.content_key(r["image"]) for r in raw.__getitems__(range(len(raw)))]
  feats = store.get_many({k for ks in keys.values() for k in ks})
  picks, seen = [], set(feats)
  for s in splits:
    src = None
    for i, k in enumerate(keys[s]):
      if k not in seen:
        if src is None:
          src = builder.as_data_source(s)
        picks.append((src, i, k))
        seen.add(k)  # identical photos are embedded once
  n = sum(map(len, keys.values()))
  log.info("%s image features: %d rows, %d from cache, %d distinct photos to embed (%s)",
           name, n, sum(k in feats for ks in keys.values() for k in ks), len(picks), store.dir)
  if picks:
    tower = towers.image_tower(name, spec, size, seed=seed)
    bs = cfg.data.batch_size
    rows = _Picked([(src, i) for src, i, _ in picks])
    # Two reader threads decode and resize the next batches (PIL releases the
    # GIL) while the tower runs: 14.2 vs 14.8 s for the bundled catalogue.
    emb = embed_image_batches(tower, tqdm.tqdm(
        pipeline.batches(rows, bs, size, threads=2), total=pipeline.num_batches(len(rows), bs),
        desc=f"{name} embed", leave=False))
    new = {k: e for (_, _, k), e in zip(picks, emb)}
    if mesh_lib.is_writer():   # the cache is safe to share; one process writes it
      store.put_many(new)
    feats.update(new)
  return _assemble(keys, feats)


def embed_image_batches(tower, batches) -> np.ndarray:
  """Frozen image tower over batches {'image': uint8 (B, S, S, 3), 'mask'} -> (N, D).

  The tower's feature-map program (ImageTower.feature_map, the one Grad-CAM
  runs too) pooled by a second small one, so a run compiles the tower once;
  a batch is dispatched before the previous result is copied back, so
  building the next batch overlaps with compute.
  """
  pool = jax.jit(tower.pool)

  def embed(variables, images):
    return pool(tower.feature_map(variables, images))

  chunks, pending = [], None
  for b in batches:
    out = embed(tower.variables, b["image"])
    if pending is not None:
      chunks.append(np.asarray(pending[0])[pending[1]])
    pending = (out, np.asarray(b["mask"], bool))
  if pending is not None:
    chunks.append(np.asarray(pending[0])[pending[1]])
  if not chunks:
    raise ValueError("embed_image_batches: no batches")
  return np.concatenate(chunks).astype(np.float32)


def text_embeddings(cfg, texts: dict, cache_dir=None, tower=None):
  """({split: float32 (N, D)}, fitted TfidfFeatures or None) from the text tower.

  `texts` is {split: list[str]}. TF-IDF is fit on the 'train' texts only and
  never cached (it depends on the whole training split, and is fast). BERT
  features come from bert_features: the texts of all splits that the cache
  misses are embedded in one packed pass (tower: as for bert_features); the
  cache is keyed by content.
  """
  if cfg.model.text.name == "tfidf":
    from m6jax.models import tfidf
    feats = tfidf.TfidfFeatures(dim=cfg.model.text.tfidf_dim, seed=cfg.seed).fit(texts["train"])
    return {s: feats.transform(t).astype(np.float32) for s, t in texts.items()}, feats
  splits = list(texts)
  every = [t for s in splits for t in texts[s]]
  emb = bert_features(cfg, every, cache_dir, tower=tower)
  bounds = np.cumsum([0] + [len(texts[s]) for s in splits])
  return {s: emb[bounds[i]:bounds[i + 1]] for i, s in enumerate(splits)}, None


def _text_cache(cfg, cache_dir) -> cache_lib.FeatureCache:
  name, spec = cfg.model.text.name, cfg.model.text.weights
  return _store(cache_dir, name, kind="text", weights=_weights_id(spec, name),
                max_text_length=cfg.data.max_text_length, dtype="float32")


def text_cache_misses(cfg, texts, cache_dir=None) -> int:
  """How many distinct `texts` the feature cache lacks (nothing is read)."""
  cache = _text_cache(cfg, cache_dir)
  return len(cache.missing({cache_lib.content_key(t) for t in texts}))


def bert_features(cfg, texts, cache_dir=None, tower=None, store: bool = True) -> np.ndarray:
  """BERT text features (N, D) float32 of `texts`, through the feature cache.

  Keyed by the sha1 of each text (and the tower, weights and max_text_length),
  so a text a run already embedded is read back exactly as that run used it;
  the misses (each distinct text once) are embedded in one packed pass with
  `tower` (a callable returning the TextTower; default: load the configured
  one) and stored when `store` (inference passes store=False, so serving new
  products does not grow the shared cache).
  """
  name, spec = cfg.model.text.name, cfg.model.text.weights
  cache = _text_cache(cfg, cache_dir)
  keys = [cache_lib.content_key(t) for t in texts]
  feats = cache.get_many(set(keys))
  todo = {}
  for k, t in zip(keys, texts):
    if k not in feats:
      todo.setdefault(k, t)  # identical texts are embedded once
  log.info("%s text features: %d texts, %d from cache, %d distinct texts to embed (%s)",
           name, len(keys), sum(k in feats for k in keys), len(todo), cache.dir)
  if todo:
    loaded = tower() if tower is not None else towers.text_tower(name, spec)
    new = dict(zip(todo, embed_texts(cfg, loaded, list(todo.values()))))
    if store and mesh_lib.is_writer():   # the cache is safe to share; one process writes it
      cache.put_many(new)
    feats.update(new)
  if not keys:
    return np.zeros((0, 0), np.float32)
  return np.stack([feats[k] for k in keys]).astype(np.float32)


def embed_texts(cfg, tower, texts) -> np.ndarray:
  """Frozen BERT tower over a list of texts -> float32 (N, D).

  Several texts share each row of a batch (tokenize.packed_batches), so
  padding stays small and one call compiles one shape.
  """
  from m6jax.data import tokenize

  # Parameters are an argument of the jitted function (TextTower.embed_fn), not
  # constants baked into the compiled program.
  bs = cfg.data.batch_size
  return np.asarray(tokenize.embed_texts(tower.embed_fn, tower.tokenizer, list(texts), bs,
                                         cfg.data.max_text_length), np.float32)

