"""Frozen towers: embeddings of every split in one pass, through the feature cache.

Each tower runs once over the rows of all splits together (one compile per
tower: one batch shape for images, one packed-row shape for texts), and only
over the products that the shared feature store (m6jax.features.cache) does not
already hold for this tower, weights and preprocessing. Features move as (N, D)
matrices keyed by (N,) 'S20' content digests (store.lookup / put_rows), never as
per-product dicts. With several JAX processes each embeds a contiguous share of
the misses and writes its own shard; after a barrier every process reads all
rows from the store (on a filesystem all processes share), so every process and
the store end with the features of a one-process run. Within a process each
image batch is split over the local devices (local_batch_sharding). Results
come back split by split, in stored order.
"""

from __future__ import annotations

import logging

import jax
import numpy as np
import tensorflow_datasets as tfds
import tqdm
from jax.sharding import Mesh, NamedSharding

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
  """Random-access view of chosen records of several sources: record i is
  sources[which[i]][local[i]] (sources made on first use)."""

  def __init__(self, make_source, which: np.ndarray, local: np.ndarray):
    self.make_source, self.which, self.local, self.sources = make_source, which, local, {}

  def __len__(self):
    return len(self.which)

  def __getitem__(self, i):
    w = int(self.which[i])
    if w not in self.sources:
      self.sources[w] = self.make_source(w)
    return self.sources[w][int(self.local[i])]


def _fill(store, keys: np.ndarray, embed_rows, write: bool, what: str) -> np.ndarray:
  """Features float32 (N, D) of content keys (N,) 'S20': the store's rows, and the
  misses (each distinct key once, in stored order) embedded by embed_rows(positions
  (M,)) -> (M, D) and written to the store when `write`.

  With several JAX processes and `write`, each process embeds its contiguous share
  of the misses and writes its own shard; after a barrier every process reads all
  rows back from the store, which is the gather: the store must be on a filesystem
  that every process sees.
  """
  feats, found = store.lookup(keys)
  miss = np.flatnonzero(~found)
  todo = miss[np.sort(np.unique(keys[miss], return_index=True)[1])]
  split = write and jax.process_count() > 1
  share = np.array_split(todo, jax.process_count())[jax.process_index()] if split else todo
  log.info("%s features: %d rows, %d from the store, %d distinct to embed%s (%s)", what,
           len(keys), int(found.sum()), len(todo),
           f", {len(share)} by this process" if split else "", store.dir)
  if split:   # every process has read the store before any share is written
    mesh_lib.barrier("features looked up")
  new = embed_rows(share) if len(share) else None
  if new is not None and write:
    store.put_rows(keys[share], new)
  if split:
    mesh_lib.barrier("features written")
    feats, found = store.lookup(keys)
    if not found.all():
      raise RuntimeError(f"feature store {store.dir}: {int((~found).sum())} rows missing after "
                         "every process wrote its share; it must be on a filesystem that "
                         "every process sees")
    return feats
  if len(todo):
    if feats.shape[1] != new.shape[1]:   # nothing was found: no width yet
      feats = np.zeros((len(keys), new.shape[1]), np.float32)
    done = keys[todo]
    order = np.argsort(done)
    feats[miss] = new[order[np.searchsorted(done[order], keys[miss])]]
  return feats


KEY_CHUNK = 4096   # stored photos read at a time to hash them


def image_embeddings(cfg, builder, splits, cache_dir=None, seed: int = 0) -> dict:
  """{split: float32 (N, D)} from the frozen image tower, in stored order (views of
  one (sum N, D) matrix).

  cache_dir: feature store root ('' / None: the shared default). Products are
  keyed by the sha1 of their stored JPEG bytes (read KEY_CHUNK at a time); only
  store misses are decoded and embedded, all splits in one pass, split over
  processes as _fill says.
  """
  name, spec, size = cfg.model.image.name, cfg.model.image.weights, cfg.data.image_size
  random = weights_lib.is_random(spec)
  store = _store(cache_dir, name, kind="image", weights=_weights_id(spec, name), image_size=size,
                 seed=seed if random else None, dtype="float32")
  keys, bounds = [np.zeros(0, "S20")], [0]
  for s in splits:
    raw = builder.as_data_source(s, decoders={"image": tfds.decode.SkipDecoding()})
    for lo in range(0, len(raw), KEY_CHUNK):
      recs = raw.__getitems__(range(lo, min(lo + KEY_CHUNK, len(raw))))
      keys.append(cache_lib.content_keys(r["image"] for r in recs))
    bounds.append(bounds[-1] + len(raw))
  keys, bounds = np.concatenate(keys), np.asarray(bounds)

  def embed_rows(pos):
    which = np.searchsorted(bounds, pos, side="right") - 1
    rows = _Picked(lambda w: builder.as_data_source(splits[w]), which, pos - bounds[which])
    tower = towers.image_tower(name, spec, size, seed=seed)
    bs = cfg.data.batch_size
    # Two reader threads decode and resize the next batches (PIL releases the
    # GIL) while the tower runs: 14.2 vs 14.8 s for the bundled catalogue.
    return embed_image_batches(tower, tqdm.tqdm(
        pipeline.batches(rows, bs, size, threads=2), total=pipeline.num_batches(len(rows), bs),
        desc=f"{name} embed", leave=False), n=len(rows))

  feats = _fill(store, keys, embed_rows, True, f"{name} image")
  return {s: feats[bounds[i]:bounds[i + 1]] for i, s in enumerate(splits)}


def local_batch_sharding(batch_size: int) -> NamedSharding | None:
  """Batches split over this process's devices (the 'data' axis of a 1 x local-devices
  mesh: no other process takes part), or None with one device or a batch size
  they do not divide. Each device then runs the same program on its part."""
  devices = jax.local_devices()
  if len(devices) < 2 or batch_size % len(devices):
    return None
  mesh = Mesh(np.asarray(devices).reshape(1, -1), mesh_lib.AXES)
  return mesh_lib.batch_sharding(mesh, per_seed=False)


def embed_image_batches(tower, batches, n: int | None = None) -> np.ndarray:
  """Frozen image tower over batches {'image': uint8 (B, S, S, 3), 'mask'} -> (N, D).

  n: the number of rows the batches hold, when known: each batch's rows are then
  copied into one (n, D) output as they arrive (no list of parts to concatenate).

  The tower's feature-map program (ImageTower.feature_map, the one Grad-CAM
  runs too) pooled by a second small one, so a run compiles the tower once;
  a batch is dispatched before the previous result is copied back, so
  building the next batch overlaps with compute. With several local devices a
  batch is split over them (local_batch_sharding).
  """
  pool = jax.jit(tower.pool)

  def embed(variables, images):
    return pool(tower.feature_map(variables, images))

  chunks, variables, spread = [], tower.variables, False
  out, done = None, 0

  def dispatch(b):
    nonlocal spread, variables
    if spread is False:   # the first batch's size decides (later ones are padded to it)
      spread = local_batch_sharding(len(b["image"]))
      if spread:
        variables = jax.device_put(variables, mesh_lib.replicated_sharding(spread.mesh))
    return embed(variables, jax.device_put(b["image"], spread) if spread else b["image"])

  def keep(b, emb):
    nonlocal out, done
    rows = np.asarray(emb, np.float32)[np.asarray(b["mask"], bool)]
    if n is None:
      chunks.append(rows)
      return
    if out is None:
      out = np.zeros((n, rows.shape[1]), np.float32)
    out[done:done + len(rows)] = rows
    done += len(rows)

  if not pipeline.overlapped(batches, dispatch, keep):
    raise ValueError("embed_image_batches: no batches")
  if n is None:
    return np.concatenate(chunks)
  if done != n:
    raise ValueError(f"embed_image_batches: the batches held {done} rows, not n={n}")
  return out


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
  """How many distinct `texts` the feature store lacks (only its indexes are read)."""
  cache = _text_cache(cfg, cache_dir)
  return len(np.unique(cache.missing(cache_lib.content_keys(texts))))


def bert_features(cfg, texts, cache_dir=None, tower=None, store: bool = True) -> np.ndarray:
  """BERT text features (N, D) float32 of `texts`, through the feature store.

  Keyed by the sha1 of each text (and the tower, weights and max_text_length),
  so a text a run already embedded is read back exactly as that run used it;
  the misses (each distinct text once) are embedded in one packed pass with
  `tower` (a callable returning the TextTower; default: load the configured
  one), split over processes as _fill says, and stored when `store` (inference
  passes store=False, so serving new products does not grow the shared store;
  each process then embeds all its misses).
  """
  name, spec = cfg.model.text.name, cfg.model.text.weights
  texts = list(texts)
  if not texts:
    return np.zeros((0, 0), np.float32)

  def embed_rows(pos):
    loaded = tower() if tower is not None else towers.text_tower(name, spec)
    return embed_texts(cfg, loaded, [texts[i] for i in pos])

  return _fill(_text_cache(cfg, cache_dir), cache_lib.content_keys(texts), embed_rows, store,
               f"{name} text")


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

