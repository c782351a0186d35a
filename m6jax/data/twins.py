"""Twin products: rows that share a photo or a near-identical description.

Twins in different splits leak: the model is scored on a product whose photo or
text it trained on. `find_twins` joins rows (union-find) that share
  photo  the same image bytes, or the same 64-bit difference hash (dHash) of the
         photo up to its near-tie bits (images.photo_hash): a re-encoded, resized or
         recoloured copy of one picture;
  text   the same normalised name + description, or word-3-shingle Jaccard
         similarity >= TEXT_JACCARD (templated listings that differ in a word or two).
Every step is hashing: exact keys are grouped in a dict, near-identical texts
are found by MinHash with LSH bands and each candidate is checked with the
exact Jaccard similarity, so 10^5 rows cost O(N) (benchmarks/bench_twins.md).

A group's key is its smallest uniq_id; catalogue.stratified_split keeps every
group in one split. `python -m m6jax.data.twins --split-csv split.csv` counts
the twins that straddle a recorded split.
"""

from __future__ import annotations

import argparse
import collections
import csv
import dataclasses
import os
import re
import zlib

import numpy as np

from m6jax.data import catalogue, images

# Part of the dataset's cache key (tfds_builder): a change here rebuilds every dataset.
METHOD = ("twins-v1: bytes + dhash64 (near-tie bits < 4 grey, <= 6 free); word-3 Jaccard "
          ">= 0.9 (MinHash 8x4); group split by blake2b rank")
TEXT_JACCARD = 0.9
_BANDS, _ROWS = 8, 4                      # LSH: P(candidate | J=0.9) = 1 - (1 - J^4)^8 > 0.999
_MAX_REPS = 16                            # exact checks per row and LSH bucket
_WORD = re.compile(r"[^\W_]+")
_U64 = np.uint64


def normalise(text: str) -> list[str]:
  """Lower-cased words (letters and digits) of a text."""
  return _WORD.findall(text.lower())


def shingles(text: str) -> np.ndarray:
  """(S,) sorted unique uint64 hashes of the text's word 3-grams (one shingle of all
  words, or of the raw text, when it has fewer than 3 words)."""
  words = normalise(text)
  if len(words) < 3:
    words = [" ".join(words) or text.strip()]
  h = np.array([zlib.crc32(w.encode()) for w in words], _U64)
  if len(h) >= 3:
    h = (h[:-2] * _U64(0x9E3779B97F4A7C15)) ^ (h[1:-1] * _U64(0xC2B2AE3D27D4EB4F)) ^ h[2:]
  return np.unique(h)


def minhash(sh: list, num: int = _BANDS * _ROWS, seed: int = 0) -> np.ndarray:
  """Shingle arrays of N texts -> (N, num) uint32 MinHash signatures."""
  if not sh:
    return np.zeros((0, num), np.uint32)
  flat = np.concatenate(sh)
  starts = np.cumsum([0] + [len(s) for s in sh[:-1]])
  rng = np.random.default_rng(seed)
  xor = rng.integers(0, 2**63, num, dtype=np.int64).astype(_U64)
  mult = rng.integers(0, 2**63, num, dtype=np.int64).astype(_U64) | _U64(1)
  out = np.empty((len(sh), num), np.uint32)
  for p in range(num):
    out[:, p] = np.minimum.reduceat(((flat ^ xor[p]) * mult[p]) >> _U64(32), starts)
  return out


class _UnionFind:
  def __init__(self, n: int):
    self.parent = list(range(n))

  def find(self, x: int) -> int:
    p = self.parent
    while p[x] != x:
      p[x] = p[p[x]]
      x = p[x]
    return x

  def union(self, a: int, b: int) -> None:
    ra, rb = self.find(a), self.find(b)
    if ra != rb:
      self.parent[max(ra, rb)] = min(ra, rb)


def photo_variants(phash: str) -> list[int]:
  """images.photo_hash string -> its 64-bit hashes with every setting of its near-tie
  bits (at most 2^HASH_UNSTABLE_BITS); [] for ''."""
  if not phash:
    return []
  bits, _, near = phash.partition("/")
  out = [int(bits, 16)]
  for pos in (int(p) for p in near.split(",") if p):
    out += [v ^ (1 << (63 - pos)) for v in out]
  return out


def _join_photo_hashes(uf: _UnionFind, hashes: list, tags: list) -> None:
  """Joins rows whose photo hashes agree outside their near-tie bits: every variant of
  every hash is sorted once, rows with an equal variant are joined."""
  keys, owner = [], []
  for i, h in enumerate(hashes):
    v = photo_variants(h)
    keys += v
    owner += [i] * len(v)
  if not keys:
    return
  keys, owner = np.asarray(keys, np.uint64), np.asarray(owner)
  order = np.lexsort((owner, keys))
  keys, owner = keys[order], owner[order]
  for j in np.flatnonzero((keys[1:] == keys[:-1]) & (owner[1:] != owner[:-1])):
    uf.union(int(owner[j]), int(owner[j + 1]))
    tags.append((int(owner[j + 1]), "photo"))


def _jaccard(a: np.ndarray, b: np.ndarray) -> float:
  inter = np.intersect1d(a, b, assume_unique=True).size
  return inter / (a.size + b.size - inter)


def _join_equal(uf: _UnionFind, keys, tags: list, reason: str) -> None:
  """Joins the rows with equal non-empty keys (one pass over a dict)."""
  first: dict = {}
  for i, k in enumerate(keys):
    if not k:
      continue
    if k in first:
      uf.union(first[k], i)
      tags.append((i, reason))
    else:
      first[k] = i


def _join_similar_texts(uf: _UnionFind, texts: list, tags: list, threshold: float) -> None:
  """Joins texts with word-3-shingle Jaccard >= threshold. Rows that share an LSH
  bucket (one MinHash band) are candidates; each row is checked exactly against the
  first _MAX_REPS rows of its bucket (every pair of a bucket of up to _MAX_REPS + 1)."""
  sh = [shingles(t) for t in texts]
  sig = minhash(sh)
  for b in range(_BANDS):
    band = np.ascontiguousarray(sig[:, b * _ROWS:(b + 1) * _ROWS]).view(np.dtype((np.void, 16)))
    _, inverse, counts = np.unique(band.ravel(), return_inverse=True, return_counts=True)
    order = np.argsort(inverse, kind="stable")
    for members in np.split(order, np.cumsum(counts)[:-1]):
      if len(members) < 2:
        continue
      reps: list = []
      for m in members.tolist():
        for r in reps:
          if uf.find(m) != uf.find(r) and _jaccard(sh[m], sh[r]) >= threshold:
            uf.union(m, r)
            tags.append((m, "text"))
        if len(reps) < _MAX_REPS:
          reps.append(m)


@dataclasses.dataclass
class Twins:
  """key_of: {uniq_id: group key (the group's smallest uniq_id)} for every row;
  groups: the merged groups (>= 2 rows), each {'key', 'ids', 'reasons', 'categories'}."""
  key_of: dict
  groups: list

  def group_ids(self, uniq_ids) -> np.ndarray:
    """(N,) int group index of each uniq_id (unknown ids: a group of their own)."""
    index: dict = {}
    return np.asarray([index.setdefault(self.key_of.get(u, "\0" + u), len(index))
                       for u in uniq_ids], np.int64)


def group_index(uniq_ids, twin_groups: list) -> np.ndarray:
  """(N,) int group of each uniq_id from a report's twin groups (others: their own)."""
  return Twins({u: g["key"] for g in twin_groups for u in g["ids"]}, twin_groups).group_ids(
      uniq_ids)


def find_twins(rows, text_threshold: float = TEXT_JACCARD) -> Twins:
  """Catalogue rows (uniq_id, text, image_path, category; `photo` = (digest, dhash)
  when read_catalogue computed it) -> Twins. Deterministic in the rows' content,
  independent of their order."""
  rows = sorted(rows, key=lambda r: r.uniq_id)
  photos = [r.photo or photo_keys(r.image_path) for r in rows]
  uf = _UnionFind(len(rows))
  tags: list = []
  _join_equal(uf, [p[0] for p in photos], tags, "photo")
  _join_photo_hashes(uf, [p[1] for p in photos], tags)
  _join_equal(uf, [" ".join(normalise(r.text)) or r.text.strip() for r in rows], tags, "text")
  _join_similar_texts(uf, [r.text for r in rows], tags, text_threshold)
  members = collections.defaultdict(list)
  for i in range(len(rows)):
    members[uf.find(i)].append(i)
  reasons = collections.defaultdict(set)
  for i, why in tags:
    reasons[uf.find(i)].add(why)
  key_of, groups = {}, []
  for root, idx in members.items():
    key = rows[idx[0]].uniq_id                      # rows are sorted: the smallest id
    for i in idx:
      key_of[rows[i].uniq_id] = key
    if len(idx) > 1:
      groups.append({"key": key, "ids": [rows[i].uniq_id for i in idx],
                     "reasons": sorted(reasons[root]),
                     "categories": dict(collections.Counter(rows[i].category for i in idx))})
  groups.sort(key=lambda g: g["key"])
  return Twins(key_of, groups)


def photo_keys(path: str) -> tuple[str, str]:
  """(bytes digest, dHash) of an image file; ('', '') when it cannot be read."""
  try:
    return images.file_digest(path), images.photo_hash(
        images.load_image(path, images.Limits(), short_side=64))
  except (OSError, ValueError):
    return "", ""


def straddling(twins: Twins, split_of: dict, scored: str = "test") -> dict:
  """Products of split `scored` with a twin in another split, by reason:
  {'photo': n, 'text': n, 'any': n, 'ids': [...]} (a product counts under each
  reason of its group)."""
  out = {"photo": 0, "text": 0, "any": 0, "ids": []}
  for g in twins.groups:
    where = {u: split_of.get(u) for u in g["ids"]}
    if len({s for s in where.values() if s}) < 2:
      continue
    for u, s in where.items():
      if s == scored:
        out["any"] += 1
        out["ids"].append(u)
        for why in g["reasons"]:
          out[why] += 1
  return out


def main(argv=None) -> None:
  p = argparse.ArgumentParser(description=(
      "Count the products of one split with a photo or description twin in another "
      "split (twins found as m6jax.data.twins does)."))
  p.add_argument("--catalogue", default=os.path.join("data", "flipkart"),
                 help="folder with products.csv and images/")
  p.add_argument("--split-csv", required=True, help="a split.csv (uniq_id, split, ...)")
  p.add_argument("--scored", default="test")
  a = p.parse_args(argv)
  cols = dict(id="uniq_id", name="product_name", description="description",
              category_tree="product_category_tree", image="image")
  rows, _ = catalogue.read_catalogue(os.path.join(a.catalogue, "products.csv"),
                                     os.path.join(a.catalogue, "images"), cols)
  with open(a.split_csv, newline="") as f:
    split_of = {r["uniq_id"]: r["split"] for r in csv.DictReader(f)}
  rows = [r for r in rows if r.uniq_id in split_of]
  if not rows:
    raise SystemExit(f"{a.split_csv}: none of its uniq_ids is a usable row of {a.catalogue}")
  twins = find_twins(rows)
  s = straddling(twins, split_of, a.scored)
  print(f"{len(rows)} products, {len(twins.groups)} twin groups "
        f"({sum(len(g['ids']) for g in twins.groups)} products); {a.scored} products with a "
        f"twin in another split: {s['any']} (photo {s['photo']}, text {s['text']})")


if __name__ == "__main__":
  main()
