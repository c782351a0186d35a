"""BERT encoder: shapes, dropout, padding invariance, loader, parity vs torch BertModel."""

import csv
import functools
import os
import pathlib
import re

os.environ.setdefault("HF_HUB_OFFLINE", "1")  # before transformers is imported

import flax
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from m6jax.models import bert

CSV = pathlib.Path(__file__).resolve().parents[1] / "data" / "flipkart" / "products.csv"
SPEC = "pypi:all-minilm-l6-v2"


@functools.cache
def _tiny():
  cfg = bert.BertConfig.tiny()
  model = bert.BertEncoder(cfg)
  ids = jnp.ones((2, 8), jnp.int32)
  # jit everywhere: eager Flax compiles every op separately and is slow on CPU.
  params = jax.jit(model.init)(jax.random.key(0), ids, ids)["params"]
  return cfg, model, params


@functools.cache
def _jitted_apply(model):
  # One jitted function per model (cached), so tests share compilations.
  return jax.jit(model.apply, static_argnames=("train", "num_segments"))


def _apply(model, params, *args, **kw):
  return _jitted_apply(model)({"params": params}, *args, **kw)


def _random_batch(cfg, batch, length, seed=0):
  rng = np.random.default_rng(seed)
  ids = rng.integers(1, cfg.vocab_size, (batch, length)).astype(np.int32)
  lengths = rng.integers(2, length + 1, batch)
  lengths[0] = length
  mask = (np.arange(length)[None, :] < lengths[:, None]).astype(np.int32)
  return ids * mask, mask


def test_tiny_shapes_and_names():
  cfg, model, params = _tiny()
  ids, mask = _random_batch(cfg, 3, 10)
  out = _apply(model, params, ids, mask)
  assert out["token_states"].shape == (3, 10, cfg.hidden_size)
  assert out["embedding"].shape == out["mean_pooled"].shape == (3, cfg.hidden_size)
  np.testing.assert_allclose(np.linalg.norm(out["embedding"], axis=-1), 1.0, rtol=1e-5)
  assert set(params) == {"embeddings", "layer_0", "layer_1"}
  # Optimizer groups pick parameters by regex over '/'-joined paths.
  paths = ["/".join(k) for k in flax.traverse_util.flatten_dict(params)]
  assert any(re.fullmatch("layer_1/query/kernel", p) for p in paths)
  assert all(re.match("(embeddings|layer_[01])/", p) for p in paths)
  unnorm = _apply(bert.BertEncoder(cfg, normalize=False), params, ids, mask)
  np.testing.assert_allclose(unnorm["embedding"], out["mean_pooled"], atol=1e-6)


def test_dropout_only_when_training():
  cfg, model, params = _tiny()
  ids, mask = _random_batch(cfg, 2, 8)
  ev = lambda seed: _apply(model, params, ids, mask, train=False,
                           rngs={"dropout": jax.random.key(seed)})["embedding"]
  np.testing.assert_array_equal(ev(1), ev(2))
  tr = lambda seed: _apply(model, params, ids, mask, train=True,
                           rngs={"dropout": jax.random.key(seed)})["embedding"]
  assert not np.allclose(tr(1), tr(2))
  assert not np.allclose(tr(1), ev(1))
  np.testing.assert_array_equal(tr(3), tr(3))


def test_padding_invariance():
  cfg, model, params = _tiny()
  ids, mask = _random_batch(cfg, 3, 8, seed=1)
  short = _apply(model, params, ids, mask)
  pad = ((0, 0), (0, 16))
  long = _apply(model, params, np.pad(ids, pad), np.pad(mask, pad))
  np.testing.assert_allclose(long["embedding"], short["embedding"], atol=1e-6)
  m = mask.astype(bool)
  np.testing.assert_allclose(np.asarray(long["token_states"])[:, :8][m],
                             np.asarray(short["token_states"])[m], atol=1e-5)


@pytest.mark.parametrize("pooling", ["mean", "cls"])
def test_packed_rows_equal_texts_alone(pooling):
  """Several texts in one row give each text's own embedding and token states:
  no attention across texts, positions restarting per text."""
  from m6jax.data import tokenize
  cfg, _, params = _tiny()
  model = bert.BertEncoder(cfg, pooling=pooling)
  rng = np.random.default_rng(3)
  lengths = [9, 3, 12, 5, 2, 7, 4]
  texts = [rng.integers(1, cfg.vocab_size, n).astype(np.int32) for n in lengths]
  batches = tokenize.packed_batches(texts, 2, 4, row_length=16)
  assert sum((b[0] >= 0).sum() for b in batches) == len(texts)
  assert max((b[0] >= 0).sum(1).max() for b in batches) >= 2   # rows really are shared
  for index, ids, seg, pos in batches:
    out = _apply(model, params, ids, seg, position_ids=pos, num_segments=4)
    assert out["embedding"].shape == (ids.shape[0], 4, cfg.hidden_size)
    for r, s in zip(*np.nonzero(index >= 0)):
      t = texts[index[r, s]]
      alone = _apply(model, params, t[None], np.ones((1, len(t)), np.int32))
      np.testing.assert_allclose(out["embedding"][r, s], alone["embedding"][0], atol=1e-6)
      np.testing.assert_allclose(out["mean_pooled"][r, s], alone["mean_pooled"][0], atol=1e-6)
      np.testing.assert_allclose(np.asarray(out["token_states"])[r][seg[r] == s + 1],
                                 alone["token_states"][0], atol=1e-5)
    # Unused segments are zeros, not NaN.
    assert np.all(np.asarray(out["embedding"])[index < 0] == 0)


def test_packed_rows_need_positions():
  cfg, model, params = _tiny()
  ids, mask = _random_batch(cfg, 2, 8)
  with pytest.raises(ValueError, match="position_ids"):
    _apply(model, params, ids, mask, num_segments=2)


def test_config_from_json(tmp_path):
  (tmp_path / "config.json").write_text(
      '{"hidden_size": 32, "num_hidden_layers": 2, "num_attention_heads": 4, '
      '"intermediate_size": 64, "vocab_size": 128, "model_type": "bert", '
      '"hidden_act": "gelu", "max_position_embeddings": 64}')
  cfg = bert.BertConfig.from_json(tmp_path)
  assert cfg == bert.BertConfig.from_json(tmp_path / "config.json")
  assert cfg.hidden_size == 32 and cfg.num_hidden_layers == 2


def _to_hf_state(params, prefix=""):
  """Inverse of the loader: our params -> HF-style numpy state dict."""
  cfg = bert.BertConfig.tiny()
  state = {}
  for path, (key, transpose) in bert._hf_key_map(cfg).items():
    v = np.asarray(params[path[0]][path[1]][path[2]])
    state[prefix + key] = np.ascontiguousarray(v.T if transpose else v)
  return state


def _write_checkpoint(folder, state):
  from safetensors.numpy import save_file
  cfg = bert.BertConfig.tiny()
  folder.mkdir(parents=True, exist_ok=True)
  import dataclasses
  import json
  (folder / "config.json").write_text(json.dumps(dataclasses.asdict(cfg)))
  save_file(state, str(folder / "model.safetensors"))


@pytest.mark.parametrize("prefix", ["", "bert."])
def test_loader_roundtrip(tmp_path, prefix):
  cfg, _, params = _tiny()
  state = _to_hf_state(params, prefix)
  state[prefix + "pooler.dense.weight"] = np.zeros((32, 32), np.float32)  # ignored
  state[prefix + "embeddings.position_ids"] = np.arange(64)[None]          # ignored
  _write_checkpoint(tmp_path / "ckpt", state)
  cfg2, loaded = bert.load_bert(tmp_path / "ckpt")
  assert cfg2 == cfg
  flat, flat2 = (flax.traverse_util.flatten_dict(p) for p in (params, loaded))
  assert flat.keys() == flat2.keys()
  for k in flat:
    np.testing.assert_array_equal(flat[k], flat2[k])


def test_loader_errors(tmp_path):
  _, _, params = _tiny()
  state = _to_hf_state(params)
  del state["encoder.layer.1.attention.self.key.bias"]
  _write_checkpoint(tmp_path / "missing", state)
  with pytest.raises(KeyError, match=r"encoder\.layer\.1\.attention\.self\.key\.bias"):
    bert.load_bert(tmp_path / "missing")
  state = _to_hf_state(params)
  state["encoder.layer.0.intermediate.dense.weight"] = np.zeros((64, 31), np.float32)
  _write_checkpoint(tmp_path / "shape", state)
  with pytest.raises(ValueError, match=r"intermediate\.dense\.weight.*\(64, 31\)"):
    bert.load_bert(tmp_path / "shape")


# --- parity against transformers.BertModel (torch CPU) ------------------------

def _product_texts():
  with open(CSV, newline="", encoding="utf-8") as f:
    rows = list(csv.DictReader(f))
  # Longest and shortest descriptions plus a few ordinary ones.
  by_len = sorted(rows, key=lambda r: len(r["description"]))
  picked = [by_len[-1], by_len[0], rows[0], rows[100], by_len[len(by_len) // 2]]
  texts = [r["product_name"] + " " + r["description"] for r in picked]
  return texts + [rows[200]["product_name"], rows[300]["product_name"]]


@pytest.fixture(scope="module")
def minilm():
  from m6jax.data import tokenize
  from m6jax.models.weights import sources as weights_lib
  torch = pytest.importorskip("torch")
  from transformers import BertModel
  folder = weights_lib.resolve(SPEC)
  cfg, params = bert.load_pretrained(SPEC)
  tok = tokenize.load_tokenizer(folder)
  ref = BertModel.from_pretrained(str(folder), attn_implementation="eager",
                                  add_pooling_layer=False).eval()
  torch.set_num_threads(2)
  return cfg, params, tok, ref


def _torch_reference(ref, ids, mask):
  import torch
  with torch.no_grad():
    m = torch.tensor(mask, dtype=torch.long)
    h = ref(input_ids=torch.tensor(ids, dtype=torch.long), attention_mask=m).last_hidden_state
    mf = m[..., None].float()
    # sentence-transformers Pooling(mean) + Normalize, by hand.
    mean = (h * mf).sum(1) / mf.sum(1).clamp(min=1e-9)
    emb = torch.nn.functional.normalize(mean, p=2, dim=1)
  return h.numpy(), emb.numpy()


@pytest.mark.parity
@pytest.mark.parametrize("pad_to", [128, None])
def test_parity_with_torch_bert(minilm, pad_to):
  from m6jax.data import tokenize
  cfg, params, tok, ref = minilm
  texts = _product_texts()
  if pad_to is None:  # short texts of mixed lengths, padded only to the longest
    enc = tok([texts[1]] + texts[-2:], truncation=True, max_length=128, padding="longest", return_tensors="np")
    ids, mask = enc["input_ids"].astype(np.int32), enc["attention_mask"].astype(np.int32)
  else:
    enc = tokenize.tokenize(tok, texts, max_length=128)
    ids, mask = enc["input_ids"], enc["attention_mask"]
    assert mask[0].sum() == 128 and mask[-1].sum() < 32  # truncated and padded rows
  model = bert.BertEncoder(cfg)
  out = jax.jit(lambda p, i, m: model.apply({"params": p}, i, m))(params, ids, mask)
  h_ref, emb_ref = _torch_reference(ref, ids, mask)
  m = mask.astype(bool)
  d_tok = np.abs(np.asarray(out["token_states"]) - h_ref)[m].max()
  d_emb = np.abs(np.asarray(out["embedding"]) - emb_ref).max()
  print(f"pad_to={pad_to} shape={ids.shape}: max|d| token_states={d_tok:.2e} embedding={d_emb:.2e}")
  assert d_tok <= 1e-4
  assert d_emb <= 1e-5


@pytest.mark.parity
def test_parity_embed_texts(minilm):
  """Packed embed_texts == torch on each text alone (order kept)."""
  from m6jax.data import tokenize
  cfg, params, tok, ref = minilm
  texts = _product_texts()
  fn = bert.make_embed_fn(bert.BertEncoder(cfg), params, segments_per_row=4)
  lengths = [len(x) for x in tok(texts, truncation=True, max_length=128)["input_ids"]]
  rows = tokenize.pack_rows(lengths, 128, 4)
  assert len(rows) < len(texts)   # some rows hold several texts
  got = tokenize.embed_texts(fn, tok, texts, batch_size=2, max_length=128)
  want = []
  for t in texts:
    enc = tok([t], truncation=True, max_length=128, return_tensors="np")
    want.append(_torch_reference(ref, enc["input_ids"], enc["attention_mask"])[1][0])
  d = np.abs(got - np.stack(want)).max()
  print(f"embed_texts vs torch per-text: max|d|={d:.2e}")
  assert d <= 1e-5
