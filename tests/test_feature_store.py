"""The sharded feature store (m6jax.features.cache + store_format): round trips,
concurrent writers, bad shards and rows, compaction, legacy per-file entries,
and embeddings split over 2 JAX processes."""

import json
import logging
import os
import pathlib
import subprocess
import sys
import time

import numpy as np
import pytest

from m6jax.data import tfds_builder
from m6jax.features import cache as cache_lib
from m6jax.features import embed, store_format
from tests.conftest import REPO, tiny_config
from tests.test_multihost import launch

SPLITS = ("train", "validation", "test")


def _keys(n, tag=""):
  return [cache_lib.content_key(f"{tag}{i}") for i in range(n)]


def _rows(n, d=8, seed=0):
  return np.random.default_rng(seed).normal(size=(n, d)).astype(np.float32)


def test_round_trip_matrix_and_dict_forms(tmp_path):
  store = cache_lib.FeatureCache(tmp_path, "t", {"v": 1})
  keys, x = _keys(50), _rows(50)
  assert store.lookup(keys)[0].shape == (50, 0)      # empty store: no width yet
  store.put_rows(keys[:30], x[:30])
  store.put_rows(keys[20:], x[20:])                  # overlaps the first shard
  query = [keys[7], "f" * 40, keys[49], keys[7]]     # a miss, a repeat
  got, found = store.lookup(query)
  assert got.dtype == np.float32 and got.shape == (4, 8)
  np.testing.assert_array_equal(found, [True, False, True, True])
  np.testing.assert_array_equal(got[[0, 2, 3]], x[[7, 49, 7]])
  assert not got[1].any()
  # The raw-digest form of the same keys reads the same rows.
  raw = cache_lib.content_keys(f"{i}" for i in range(50))
  np.testing.assert_array_equal(store.lookup(raw)[0], x)
  # Dict forms: any dtype and row shape, any string key (hashed when not sha1 hex).
  store.put_many({"study.results": np.frombuffer(b"{}", np.uint8),
                  "study.fused": np.ones((3, 2), np.float64)}, dtype=None)
  d = store.get_many(["study.results", "study.fused", keys[3], "absent"])
  assert d["study.results"].tobytes() == b"{}" and d["study.fused"].dtype == np.float64
  np.testing.assert_array_equal(d[keys[3]], x[3])
  assert "absent" not in d
  assert store.missing([keys[0], "0" * 40]) == ["0" * 40]
  assert cache_lib.summary(tmp_path)[0]["entries"] == 52
  with pytest.raises(ValueError, match="2 keys for rows of shape"):
    store.put_rows(keys[:2], x[:3])


_WRITER = """
import sys, numpy as np
from m6jax.features import cache
store = cache.FeatureCache(sys.argv[1], "t", {"v": 1}, max_shards=3)
keys = [cache.content_key(str(i)) for i in range(300)]
x = np.arange(300, dtype=np.float32)[:, None] * np.ones(16, np.float32)
w = int(sys.argv[2])
for r in range(8):   # overlapping slices: every key is written by several processes
  lo = (37 * (r + w)) % 250
  store.put_rows(keys[lo:lo + 50], x[lo:lo + 50])
store.put_rows(keys, x)
"""


def test_concurrent_writers_and_compaction_under_reads(tmp_path, caplog):
  """3 processes put overlapping keys at once (compacting past 3 shards) while this
  one reads: every row read is right, no torn shard is ever seen, all keys end up
  readable and the folder holds few files."""
  root = str(tmp_path / "c")
  env = dict(os.environ, PYTHONPATH=REPO)
  procs = [subprocess.Popen([sys.executable, "-c", _WRITER, root, str(w)], env=env)
           for w in range(3)]
  store = cache_lib.FeatureCache(root, "t", {"v": 1})
  keys, seen = _keys(300), 0
  with caplog.at_level(logging.WARNING):
    while any(p.poll() is None for p in procs):
      got, found = store.lookup(keys)
      assert np.all(got[found] == np.flatnonzero(found)[:, None])
      seen += int(found.sum())
      time.sleep(0.01)
  assert [p.returncode for p in procs] == [0, 0, 0]
  assert "unreadable" not in caplog.text
  got, found = store.lookup(keys)
  assert found.all() and np.all(got == np.arange(300)[:, None])
  assert len(store.shards()) <= 4 and not list(store.dir.glob(".*.tmp"))
  assert cache_lib.summary(root)[0]["entries"] == 300


def test_compaction_keeps_every_key_and_lowers_the_file_count(tmp_path):
  store = cache_lib.FeatureCache(tmp_path, "t", {}, max_shards=4)
  keys, x = _keys(200), _rows(200)
  counts = []
  for lo in range(0, 200, 20):
    store.put_rows(keys[lo:lo + 30], x[lo:lo + 30])   # 10 puts, 10 rows of each shared
    counts.append(len(store.shards()))
  assert max(counts) <= 4 and counts[:4] == [1, 2, 3, 4]
  got, found = store.lookup(keys)
  assert found.all()
  np.testing.assert_array_equal(got, x)
  old = time.time() - 3 * 86400
  for p in store.shards():
    os.utime(p, (old - 10, old - 10))
  os.utime(store.shards()[-1], (old, old))
  assert store.compact(everything=True) >= 2 and len(store.shards()) == 1
  [merged] = store.shards()
  assert os.stat(merged).st_mtime == pytest.approx(old, abs=1e-3)   # last use, not now
  assert len(store_format.read_index(merged).keys) == 200   # each key once
  np.testing.assert_array_equal(store.lookup(keys)[0], x)


def test_a_shard_merged_away_mid_lookup_is_read_from_the_merged_one(tmp_path, monkeypatch):
  store = cache_lib.FeatureCache(tmp_path, "t", {})
  keys, x = _keys(40), _rows(40)
  for lo in range(0, 40, 10):
    store.put_rows(keys[lo:lo + 10], x[lo:lo + 10])
  inner, calls = store_format.read_many, []

  def compact_first(*a):   # another writer merges every shard just before the first read
    if not calls:
      cache_lib.FeatureCache(tmp_path, "t", {}).compact(everything=True)
    calls.append(1)
    return inner(*a)

  monkeypatch.setattr(store_format, "read_many", compact_first)
  got, found = store.lookup(keys)
  assert found.all() and len(store.shards()) == 1
  np.testing.assert_array_equal(got, x)


def test_truncated_or_corrupted_shard_is_a_miss_with_a_warning(tmp_path, caplog):
  store = cache_lib.FeatureCache(tmp_path, "t", {})
  keys, x = _keys(20), _rows(20)
  a = store.put_rows(keys[:10], x[:10])
  b = store.put_rows(keys[10:], x[10:])
  a.write_bytes(a.read_bytes()[:-1])                 # truncated: the whole shard
  blob = bytearray(b.read_bytes())
  blob[-30] ^= 1                                     # a row sum: the whole index
  b.write_bytes(bytes(blob))
  got, found = store.lookup(keys)
  assert not found.any()
  assert "2 unreadable" in caplog.text and a.name in caplog.text and b.name in caplog.text
  assert "expected" in caplog.text and "index checksum mismatch" in caplog.text
  # The caller recomputes and puts them again: readable, the bad shards dropped.
  store.put_rows(keys, x)
  got, found = store.lookup(keys)
  assert found.all() and not a.exists() and not b.exists()
  np.testing.assert_array_equal(got, x)


def test_legacy_per_file_entries_are_ignored_listed_and_cleared(tmp_path, capsys):
  store = cache_lib.FeatureCache(tmp_path, "t", {"v": 1})
  keys = _keys(3)
  for k in keys:   # the one-file-per-product layout of FEATURES_VERSION 1
    (store.dir / k[:2]).mkdir(parents=True, exist_ok=True)
    np.save(store.dir / k[:2] / f"{k}.npy", np.ones(4, np.float32))
  assert not store.lookup(keys)[1].any() and store.get_many(keys) == {}
  store.put_rows(keys[:1], np.zeros((1, 4)))
  [info] = cache_lib.summary(tmp_path)
  assert (info["entries"], info["shards"], info["legacy"]) == (1, 1, 3)
  cache_lib.main(["list", "--dir", str(tmp_path)])
  assert "3 legacy per-product files" in capsys.readouterr().out
  # --older-than goes by mtime for legacy files too; then everything goes.
  old = time.time() - 2 * 86400
  for p in store.dir.glob("??/*.npy"):
    os.utime(p, (old, old))
  assert cache_lib.clear(tmp_path, older_than=86400) == {"files": 3, "bytes": 3 * 144}
  assert cache_lib.summary(tmp_path)[0]["legacy"] == 0
  assert cache_lib.clear(tmp_path, tower="other")["files"] == 0
  assert cache_lib.clear(tmp_path, tower="t")["files"] == 1
  assert not store.dir.exists()


@pytest.mark.slow
def test_two_processes_embed_what_one_process_does(tiny_catalogue, tmp_path):
  """2 JAX processes on 127.0.0.1 split the misses (each embeds about half and writes
  its own shard) and both return the features of one process; the stores agree.
  Then one process with 2 forced host devices splits each batch over them."""
  cfg = tiny_config(tiny_catalogue, str(tmp_path / "tfds"))
  builder, _ = tfds_builder.prepare(cfg.data)
  one = embed.image_embeddings(cfg, builder, SPLITS, str(tmp_path / "one"), seed=cfg.seed)
  two_root = str(tmp_path / "two")
  outs = launch(2, 1, ["-m", "tests.embed_worker", tiny_catalogue, str(tmp_path / "tfds"),
                       two_root, str(tmp_path / "feats")])
  res = [json.loads(o.split("RESULT ", 1)[1]) for o in outs]
  print("rows embedded by each process:", [r["embedded"] for r in res])
  n = sum(len(one[s]) for s in SPLITS)
  assert [r["processes"] for r in res] == [2, 2]
  distinct = cache_lib.summary(tmp_path / "one")[0]["entries"]
  assert sum(r["embedded"] for r in res) == distinct and all(r["embedded"] for r in res)
  for pid in (0, 1):
    got = np.load(tmp_path / f"feats{pid}.npz")
    for s in SPLITS:
      assert got[s].shape == one[s].shape
      np.testing.assert_allclose(got[s], one[s], rtol=0, atol=1e-6)
  a, b = (cache_lib.FeatureCache(r, "x", {}) for r in (tmp_path / "one", two_root))
  a.dir, b.dir = (pathlib.Path(cache_lib.summary(r)[0]["dir"]) for r in (a.root, b.root))
  assert a.dir.name == b.dir.name and len(b.shards()) == 2   # one shard per process
  keys = np.concatenate([store_format.read_index(p).keys for p in a.shards()])
  ra, fa = a.lookup(keys)
  rb, fb = b.lookup(keys)
  assert fa.all() and fb.all() and len(keys) == distinct <= n
  np.testing.assert_allclose(rb, ra, rtol=0, atol=1e-6)
  assert [r["spread"] for r in res] == [[0], [0]]   # one device each

  # One process with 2 local devices: each batch is split over both ('data' axis).
  [out] = launch(1, 2, ["-m", "tests.embed_worker", tiny_catalogue, str(tmp_path / "tfds"),
                        str(tmp_path / "spread"), str(tmp_path / "spread")])
  r = json.loads(out.split("RESULT ", 1)[1])
  assert r["spread"] == [2] and r["embedded"] == distinct
  got = np.load(tmp_path / "spread0.npz")
  for s in SPLITS:
    np.testing.assert_allclose(got[s], one[s], rtol=0, atol=1e-5)
