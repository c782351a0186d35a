"""Frozen-tower embeddings: one pass over all splits, and the shared feature cache."""

import dataclasses
import json
import os
import pathlib
import shutil
import subprocess
import sys
import threading
import time

os.environ.setdefault("HF_HUB_OFFLINE", "1")  # before transformers is imported

import jax
import numpy as np
import pytest
from conftest import make_catalogue, tiny_config

from m6jax.data import pipeline, tfds_builder, tokenize
from m6jax.features import cache as cache_lib
from m6jax.features import embed, prepare, store_format
from m6jax.models import bert, towers

SPLITS = ("train", "validation", "test")
WORDS = "a alpha beta gamma goods things stuff item product number very sub leaf".split()


@pytest.fixture(scope="module")
def catalogue(tmp_path_factory):
  root = str(tmp_path_factory.mktemp("embed_catalogue"))
  make_catalogue(root, bad=False)
  return root


@pytest.fixture(scope="module")
def tfds_dir(tmp_path_factory):
  return str(tmp_path_factory.mktemp("embed_tfds"))  # built once, shared by the tests


@pytest.fixture(scope="module")
def tiny_bert(tmp_path_factory):
  """A folder with a random 2-layer BERT checkpoint and a 38-word vocabulary."""
  from safetensors.numpy import save_file
  folder = tmp_path_factory.mktemp("tiny_bert")
  config = bert.BertConfig.tiny()
  ids = np.ones((1, 4), np.int32)
  params = jax.jit(bert.BertEncoder(config).init)(jax.random.key(0), ids, ids)["params"]
  state = {}
  for path, (key, transpose) in bert._hf_key_map(config).items():
    v = np.asarray(params[path[0]][path[1]][path[2]])
    state[key] = np.ascontiguousarray(v.T if transpose else v)
  save_file(state, str(folder / "model.safetensors"))
  (folder / "config.json").write_text(
      json.dumps(dataclasses.asdict(config) | {"model_type": "bert"}))
  vocab = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]"] + WORDS + [str(i) for i in range(20)]
  (folder / "vocab.txt").write_text("\n".join(vocab) + "\n")
  (folder / "tokenizer_config.json").write_text(
      json.dumps({"tokenizer_class": "BertTokenizer", "do_lower_case": True}))
  return str(folder)


def _cfg(catalogue, tfds_dir, tiny_bert=None):
  cfg = tiny_config(catalogue, tfds_dir)
  if tiny_bert:
    cfg.model.text.name = "bert"
    cfg.model.text.weights = tiny_bert
    cfg.data.max_text_length = 64  # buckets 32 and 64
  return cfg


def _texts(builder):
  return {s: pipeline.columns(builder.as_data_source(s))["text"] for s in SPLITS}


@pytest.fixture
def counts(monkeypatch):
  """Counts tower builds, embedding calls and embedded rows behind embed.*_embeddings."""
  n = {"image_tower": 0, "text_tower": 0, "image_calls": 0, "image_rows": 0,
       "text_calls": 0, "text_rows": 0}

  def count(module, name, calls, rows=None):
    fn = getattr(module, name)

    def wrapped(*a, **kw):
      n[calls] += 1
      out = fn(*a, **kw)
      if rows:
        n[rows] += len(out)
      return out
    monkeypatch.setattr(module, name, wrapped)

  count(towers, "image_tower", "image_tower")
  count(towers, "text_tower", "text_tower")
  count(embed, "embed_image_batches", "image_calls", "image_rows")
  count(embed, "embed_texts", "text_calls", "text_rows")
  return n


def test_one_pass_equals_per_split(catalogue, tfds_dir, tiny_bert, tmp_path, counts):
  cfg = _cfg(catalogue, tfds_dir, tiny_bert)
  builder, _ = tfds_builder.prepare(cfg.data)
  got = embed.image_embeddings(cfg, builder, SPLITS, str(tmp_path / "c"), seed=cfg.seed)
  texts = _texts(builder)
  got_t, fitted = embed.text_embeddings(cfg, texts, str(tmp_path / "c"))
  assert fitted is None
  # One tower build and one pass each, over every row of every split.
  assert counts["image_tower"] == counts["text_tower"] == 1
  assert counts["image_calls"] == counts["text_calls"] == 1
  n = sum(len(t) for t in texts.values())
  assert counts["image_rows"] == n and counts["text_rows"] == len(set(sum(texts.values(), [])))

  # Reference: the per-split embedding this replaces.
  tower = towers.image_tower(cfg.model.image.name, "none", cfg.data.image_size, seed=cfg.seed)
  ttower = towers.text_tower("bert", tiny_bert)
  for s in SPLITS:
    src = builder.as_data_source(s)
    want = embed.embed_image_batches(tower, pipeline.batches(src, cfg.data.batch_size,
                                                             cfg.data.image_size))
    assert got[s].shape == want.shape and got[s].dtype == np.float32
    np.testing.assert_allclose(got[s], want, rtol=0, atol=1e-5)
    want_t = embed.embed_texts(cfg, ttower, texts[s])
    assert got_t[s].shape == want_t.shape == (len(texts[s]), 32)
    np.testing.assert_allclose(got_t[s], want_t, rtol=0, atol=1e-5)
    print(f"{s}: image max|d| {np.abs(got[s] - want).max():.1e}, "
          f"text max|d| {np.abs(got_t[s] - want_t).max():.1e}")


def test_image_tower_compiles_once_for_all_splits(catalogue, tfds_dir, tmp_path, monkeypatch):
  cfg = _cfg(catalogue, tfds_dir)
  builder, _ = tfds_builder.prepare(cfg.data)
  traces = []
  build = towers.image_tower

  def image_tower(*a, **kw):
    t = build(*a, **kw)
    pre = t.preprocess
    t.preprocess = lambda x: (traces.append(x.shape), pre(x))[1]  # runs when jit traces
    return t

  monkeypatch.setattr(towers, "image_tower", image_tower)
  embed.image_embeddings(cfg, builder, SPLITS, str(tmp_path / "c"))
  assert traces == [(cfg.data.batch_size, 16, 16, 3)]


def test_second_workdir_hits_cache(catalogue, tfds_dir, tmp_path, monkeypatch, counts):
  """Two runs (different workdirs, shared default cache): the second embeds nothing."""
  monkeypatch.setenv(cache_lib.ENV, str(tmp_path / "shared"))
  cfg = _cfg(catalogue, tfds_dir)
  cfg.model.fusion = "image"
  first = prepare.setup(cfg, str(tmp_path / "run1"))
  assert counts["image_tower"] == 1 and counts["image_rows"] > 0
  rows = counts["image_rows"]
  second = prepare.setup(cfg, str(tmp_path / "run2"))
  assert counts["image_tower"] == 1 and counts["image_rows"] == rows
  for s in SPLITS:
    np.testing.assert_array_equal(first.feats["image"][s], second.feats["image"][s])
  # Embedded or read back, the splits are views of one matrix: every row without a copy.
  for run in (first, second):
    f = run.feats["image"]
    whole = prepare.all_splits(f)
    assert all(np.shares_memory(whole, f[s]) for s in SPLITS)
    np.testing.assert_array_equal(whole, np.concatenate([f[s] for s in SPLITS]))
  assert [r["tower"] for r in cache_lib.summary()] == ["tiny"]
  assert not os.path.exists(tmp_path / "run1" / "cache")
  # train.cache_dir still overrides the shared default.
  cfg.train.cache_dir = str(tmp_path / "own")
  prepare.setup(cfg, str(tmp_path / "run3"))
  assert counts["image_tower"] == 2 and counts["image_rows"] == 2 * rows
  assert [r["entries"] for r in cache_lib.summary(tmp_path / "own")] == [rows]


def test_all_splits_views_without_copy_else_concatenated():
  m = np.arange(20.0, dtype=np.float32).reshape(10, 2)
  views = {"train": m[:6], "validation": m[6:8], "test": m[8:]}
  whole = prepare.all_splits(views)
  assert np.shares_memory(whole, m) and not whole.flags.writeable
  np.testing.assert_array_equal(whole, m)
  # Out of order, or not one array: a concatenation in SPLITS order.
  swapped = {"train": m[:6], "validation": m[8:], "test": m[6:8]}
  got = prepare.all_splits(swapped)
  assert not np.shares_memory(got, m)
  np.testing.assert_array_equal(got, np.concatenate([m[:6], m[8:], m[6:8]]))
  np.testing.assert_array_equal(prepare.all_splits({s: v.copy() for s, v in views.items()}), m)
  labels = {"train": [0, 1], "validation": [2], "test": [3]}
  np.testing.assert_array_equal(prepare.all_splits(labels), [0, 1, 2, 3])


def test_changed_product_reembeds_only_that_row(catalogue, tfds_dir, tiny_bert, tmp_path,
                                                counts):
  cfg = _cfg(catalogue, tfds_dir, tiny_bert)
  c = str(tmp_path / "c")
  builder, _ = tfds_builder.prepare(cfg.data)
  before = embed.image_embeddings(cfg, builder, SPLITS, c)
  before_t, _ = embed.text_embeddings(cfg, _texts(builder), c)
  n0 = dict(counts)

  # A copy of the catalogue with one photo and one description changed.
  changed = str(tmp_path / "changed")
  shutil.copytree(catalogue, changed)
  import csv
  with open(os.path.join(changed, "products.csv")) as f:
    rows = list(csv.reader(f))
  rows[1][3] = "gamma stuff number 7 very very new"
  img_row = rows[5]
  with open(os.path.join(changed, "products.csv"), "w", newline="") as f:
    csv.writer(f).writerows(rows)
  from PIL import Image
  Image.new("RGB", (40, 30), (255, 255, 255)).save(os.path.join(changed, "images", img_row[5]))
  cfg2 = _cfg(changed, str(tmp_path / "tfds2"), tiny_bert)
  builder2, _ = tfds_builder.prepare(cfg2.data)
  after = embed.image_embeddings(cfg2, builder2, SPLITS, c)
  after_t, _ = embed.text_embeddings(cfg2, _texts(builder2), c)
  assert counts["image_rows"] - n0["image_rows"] == 1
  assert counts["text_rows"] - n0["text_rows"] == 1

  def by_id(b, feats):
    return {u: f for s in SPLITS
            for u, f in zip(pipeline.columns(b.as_data_source(s))["uniq_id"], feats[s])}

  old, new = by_id(builder, before), by_id(builder2, after)
  old_t, new_t = by_id(builder, before_t), by_id(builder2, after_t)
  assert old.keys() == new.keys()
  for u in old:
    assert np.array_equal(old[u], new[u]) == (u != img_row[0]), u
    assert np.array_equal(old_t[u], new_t[u]) == (u != rows[1][0]), u
  # The re-embedded row is what a cold computation gives.
  fresh = embed.image_embeddings(cfg2, builder2, SPLITS, str(tmp_path / "cold"))
  np.testing.assert_allclose(by_id(builder2, fresh)[img_row[0]], new[img_row[0]], atol=1e-5)


def test_weights_change_means_new_tower_key(tmp_path):
  w = tmp_path / "w.bin"
  w.write_bytes(b"x" * 10)
  a = embed._weights_id(str(w), "tiny")
  assert embed._weights_id(str(w), "tiny") == a
  os.utime(w, ns=(0, 123))   # touched, same content: the same weights
  assert embed._weights_id(str(w), "tiny") == a
  w.write_bytes(b"y" * 10)   # same size, other content: other weights
  os.utime(w, ns=(0, 123))   # even with the old mtime
  assert embed._weights_id(str(w), "tiny") != a
  assert embed._weights_id("none", "tiny") == "random"
  kw = dict(kind="image", image_size=16)
  dirs = {embed._store(tmp_path, "tiny", weights=x, **kw).dir for x in ("a", "b")}
  assert len(dirs) == 2
  assert embed._store(tmp_path, "tiny", weights="a", **kw).dir != embed._store(
      tmp_path, "tiny", weights="a", kind="image", image_size=32).dir


def test_threads_share_one_cache(catalogue, tfds_dir, tiny_bert, tmp_path):
  cfg = _cfg(catalogue, tfds_dir, tiny_bert)
  builder, _ = tfds_builder.prepare(cfg.data)
  texts = _texts(builder)
  c = str(tmp_path / "c")
  out, errors = [None, None], []

  def run(i):
    try:
      out[i] = (embed.image_embeddings(cfg, builder, SPLITS, c),
                embed.text_embeddings(cfg, texts, c)[0])
    except Exception as e:  # noqa: BLE001 - reported below
      errors.append(e)

  threads = [threading.Thread(target=run, args=(i,)) for i in range(2)]
  for t in threads:
    t.start()
  for t in threads:
    t.join()
  assert not errors
  again = (embed.image_embeddings(cfg, builder, SPLITS, c),
           embed.text_embeddings(cfg, texts, c)[0])
  for i in (0, 1):
    for s in SPLITS:
      np.testing.assert_allclose(out[i][0][s], again[0][s], atol=1e-5)
      np.testing.assert_allclose(out[i][1][s], again[1][s], atol=1e-5)
  assert not list((tmp_path / "c").rglob("*.tmp"))


_WRITER = """
import sys, numpy as np
from m6jax.features import cache
store = cache.FeatureCache(sys.argv[1], "t", {"v": 1})
keys = [cache.content_key(str(i)) for i in range(200)]
for r in range(5):
  store.put_many({k: np.full(64, i, np.float32) for i, k in enumerate(keys)})
"""


def test_processes_write_same_entries(tmp_path):
  root = str(tmp_path / "c")
  env = dict(os.environ, PYTHONPATH=os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
  procs = [subprocess.Popen([sys.executable, "-c", _WRITER, root], env=env) for _ in range(2)]
  store = cache_lib.FeatureCache(root, "t", {"v": 1})
  keys = [cache_lib.content_key(str(i)) for i in range(200)]
  seen = 0
  while any(p.poll() is None for p in procs):  # read while both write
    for k, v in store.get_many(keys).items():
      assert v.shape == (64,) and np.all(v == keys.index(k)), k
      seen += 1
    time.sleep(0.01)
  assert [p.returncode for p in procs] == [0, 0]
  got = store.get_many(keys)
  assert len(got) == 200 and all(np.all(got[k] == i) for i, k in enumerate(keys))
  assert not list((tmp_path / "c").rglob("*.tmp"))


def test_bad_entries_are_misses_with_a_warning(tmp_path, caplog):
  """A torn shard (whole file) and a row failing its checksum are misses, with one
  warning naming the file; a rewrite (a newer shard) reads back."""
  store = cache_lib.FeatureCache(tmp_path, "t", {})
  keys = [cache_lib.content_key(str(i)) for i in range(5)]
  torn = store.put_rows(keys[:2], np.stack([np.full(16, i) for i in range(2)]))
  flipped = store.put_rows(keys[2:], np.stack([np.full(16, i) for i in range(2, 5)]))
  torn.write_bytes(torn.read_bytes()[:-10])
  blob = bytearray(flipped.read_bytes())
  blob[store_format.HEADER + 64 + 3] ^= 0x40         # row 1 (keys[3]), one bit of one float
  flipped.write_bytes(bytes(blob))
  got = store.get_many(keys + ["0000"])
  assert sorted(got) == sorted([keys[2], keys[4]]) and np.all(got[keys[4]] == 4)
  assert "2 unreadable" in caplog.text and torn.name in caplog.text
  assert "1 row(s) not matching their checksum" in caplog.text
  # Rewritten entries read back (the newest copy wins); the torn shard is dropped.
  store.put_many({k: np.full(16, i) for i, k in enumerate(keys)})
  assert sorted(store.get_many(keys)) == sorted(keys)
  assert not torn.exists()


def test_corrupted_entry_is_recomputed(catalogue, tfds_dir, tmp_path, counts):
  cfg = _cfg(catalogue, tfds_dir)
  builder, _ = tfds_builder.prepare(cfg.data)
  root = str(tmp_path / "c")
  first = embed.image_embeddings(cfg, builder, SPLITS, root)
  rows = counts["image_rows"]
  [shard] = pathlib.Path(root).rglob("shard-*" + cache_lib.EXT)
  blob = bytearray(shard.read_bytes())
  blob[store_format.HEADER + 3] ^= 0x40              # first row's first float
  shard.write_bytes(bytes(blob))
  again = embed.image_embeddings(cfg, builder, SPLITS, root)
  assert counts["image_rows"] == rows + 1            # that product alone re-embedded
  for s in SPLITS:
    np.testing.assert_array_equal(first[s], again[s])


def test_cli_lists_and_clears(tmp_path, capsys):
  root = tmp_path / "c"
  a = cache_lib.FeatureCache(root, "minilm", {"weights": "w1", "max_text_length": 128})
  b = cache_lib.FeatureCache(root, "tiny", {"weights": "random", "image_size": 16})
  a.put_many({cache_lib.content_key(f"t{i}"): np.ones(8) for i in range(3)})
  b.put_many({cache_lib.content_key(f"i{i}"): np.ones(4) for i in range(2)})
  assert cache_lib.main(["list", "--dir", str(root)]) == 0
  out = capsys.readouterr().out
  assert "minilm" in out and "tiny" in out and "max_text_length=128" in out
  assert "2 tower(s), 5 entries" in out
  # Entries unused for two days go with --older-than 1d; fresh ones stay.
  old = time.time() - 2 * 86400
  a.put_many({cache_lib.content_key("t9"): np.ones(8)})   # a second shard of minilm
  for p in a.shards()[1:]:                                # the first one, unused for 2 days
    os.utime(p, (old, old))
  cache_lib.main(["clear", "--dir", str(root), "--older-than", "1d"])
  assert "removed 1 file(s)" in capsys.readouterr().out
  assert {r["tower"]: r["entries"] for r in cache_lib.summary(root)} == {"minilm": 1, "tiny": 2}
  cache_lib.main(["clear", "--dir", str(root), "--tower", "tiny"])
  assert [r["tower"] for r in cache_lib.summary(root)] == ["minilm"]
  env = dict(os.environ, PYTHONPATH=os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
  done = subprocess.run([sys.executable, "-m", "m6jax.features.cache", "clear", "--dir", str(root)],
                        env=env, capture_output=True, text=True, check=True)
  assert "removed 1 file(s)" in done.stdout
  assert cache_lib.summary(root) == []
  with pytest.raises(ValueError, match="bad age"):
    cache_lib.parse_age("soon")
  assert cache_lib.parse_age("12h") == 12 * 3600


def test_tokenizer_of_tiny_bert(tiny_bert):
  tok = tokenize.load_tokenizer(tiny_bert)
  assert tok(["alpha item 3 zebra"])["input_ids"][0][1:-1] == [
      tok.convert_tokens_to_ids(w) for w in ("alpha", "item", "3", "[UNK]")]
