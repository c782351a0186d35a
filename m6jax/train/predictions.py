"""The one prediction path: model inputs -> per-replica probabilities -> the ensemble.

The trainers (m6jax.train.trainer, m6jax.train.finetune) and a restored run
(m6jax.inference.restore.Inference) both predict through these functions, so
what is scored, explained (m6jax.explain.run) and served (m6jax.inference.predict,
m6jax.inference.serve) is computed the same way:

  inputs(batch, mods, ...)          a pipeline batch -> the model's input dict
  replica_predict(apply_fn, ...)    jitted (params[, batch_stats], inputs) -> (K, B, C), (K, B, M)
                                    (frozen, with `chunk`: in fixed windows of rows, InWindows)
  over_batches(predict_batch, ...)  a split's batches -> (K, N, C), (K, N, M) (padding dropped)
  seed_models / ensemble            (R, N, C) replicas -> (S, N, C) per seed -> (N, C)
"""

from __future__ import annotations

import dataclasses
import functools
from typing import Callable

import jax
import numpy as np

from m6jax.train import steps

# Rows per prediction window of a frozen head (m6jax.train.trainer): bounds the head's
# temporaries (normalised, concatenated embeddings) at 10^6 products; smaller splits
# run whole, as before.
PREDICT_ROWS = 16384


class UnknownProduct(KeyError):
  """A row whose uniq_id has no cached text features."""

  def __str__(self):
    return str(self.args[0])


def lookup_rows(table: dict, batch: dict, split: str) -> np.ndarray:
  """{uniq_id: (D,) features} -> float32 (B, D) of a batch's rows (padding rows,
  `mask` False, are zeros). An id the table lacks is an error: zeros would silently
  stand for its text."""
  dim = len(next(iter(table.values())))
  real = [(u, bool(k)) for u, k in zip(batch["uniq_id"], batch["mask"])]
  missing = [u for u, k in real if k and u not in table]
  if missing:
    raise UnknownProduct(f"split {split!r}: no cached text features for uniq_id(s) "
                         f"{missing[:5]}{' ...' if len(missing) > 5 else ''}")
  return np.stack([np.asarray(table[u], np.float32) if k else np.zeros(dim, np.float32)
                   for u, k in real])


def inputs(batch: dict, mods, *, tokenize: Callable | None = None,
           text_rows: Callable | None = None) -> dict:
  """A pipeline batch -> the Classifier's input dict (numpy).

  Per modality: a `<m>_embedding` (B, D) array in the batch is used as is (zeros
  stand for a missing modality); else the image is `batch['image']` and the text
  is tokens (`tokenize(texts)` -> {'input_ids', 'attention_mask'}, a BERT tower)
  or cached features (`text_rows(batch)` -> (B, D)).
  """
  out = {"label": batch["label"], "mask": batch["mask"]}
  for m in mods:
    if f"{m}_embedding" in batch:
      out[f"{m}_embedding"] = np.asarray(batch[f"{m}_embedding"], np.float32)
    elif m == "image":
      out["image"] = batch["image"]
    elif tokenize is not None:
      toks = tokenize([str(t) for t in batch["text"]])
      out["input_ids"], out["attention_mask"] = toks["input_ids"], toks["attention_mask"]
    else:
      out["text_embedding"] = np.asarray(text_rows(batch), np.float32)
  return out


def replica_predict(apply_fn: Callable, frozen: bool, out_shardings=None,
                    spmd_axis_name: str | None = None, chunk: int | None = None):
  """The jitted K-replica prediction of `steps.predict_step`.

  frozen: (params (K, ...), embeddings {m: (N, D)}) -> (K, N, C) probabilities,
  (K, N, M) modality weights; else (params, batch_stats, inputs) (finetune).
  chunk (frozen): past that many rows the head runs on windows of `chunk` rows
  (`InWindows`), so its temporaries stay O(chunk), not O(N), and the result is numpy.
  """
  predict = functools.partial(steps.predict_step, apply_fn=apply_fn)
  if frozen:
    fn = jax.vmap(lambda p, f: predict(p, None, f), in_axes=(0, None))
  else:
    fn = jax.vmap(predict, in_axes=(0, 0, None), spmd_axis_name=spmd_axis_name)
  jit = functools.partial(jax.jit, out_shardings=out_shardings) if out_shardings else jax.jit
  whole = jit(fn)
  if not (frozen and chunk):
    return whole
  window = jit(lambda p, f, start: fn(p, {m: jax.lax.dynamic_slice_in_dim(x, start, chunk)
                                          for m, x in f.items()}))
  return InWindows(whole, window, chunk)


@dataclasses.dataclass(frozen=True)
class InWindows:
  """(params, feats {m: (N, D)}) -> the (K, N, ...) outputs of whole(params, feats),
  computed past `chunk` rows as window(params, feats, start) over rows [start, start +
  chunk): one compiled shape per N, the last window moved back to end at row N (its
  overlap dropped), numpy results. Up to `chunk` rows: whole, unchanged."""
  whole: Callable
  window: Callable
  chunk: int

  def __call__(self, params, feats: dict):
    n = len(next(iter(feats.values())))
    if n <= self.chunk:
      return self.whole(params, feats)
    parts = []
    for start in range(0, n, self.chunk):
      at = min(start, n - self.chunk)
      parts.append([np.asarray(o)[:, start - at:] for o in self.window(params, feats, at)])
    return tuple(np.concatenate(p, 1) for p in zip(*parts))

  def _cache_size(self) -> int:
    """Compiled programs held (as a jitted function's `_cache_size`)."""
    return self.whole._cache_size() + self.window._cache_size()


def over_batches(predict_batch: Callable, batches):
  """predict_batch(batch) -> ((K, B, C), (K, B, M)) over padded batches -> (K, N, C)
  probabilities and (K, N, M) weights of the real rows (`batch['mask']`), in order."""
  probs, weights = [], []
  for batch in batches:
    pr, w = predict_batch(batch)
    probs.append(np.asarray(pr)[:, batch["mask"]])
    weights.append(np.asarray(w)[:, batch["mask"]])
  return np.concatenate(probs, 1), np.concatenate(weights, 1)


def seed_models(probs, folds: int = 1) -> np.ndarray:
  """(R, N, C) replica probabilities -> (S, N, C), one per seed's model: with
  cross-validation (R = folds x seeds, fold-major) the mean of the seed's fold
  replicas (a fold ensemble); without, the replicas themselves."""
  probs = np.asarray(probs)
  if folds <= 1:
    return probs
  return probs.reshape(folds, -1, *probs.shape[1:]).mean(0)


def ensemble(probs, folds: int = 1) -> np.ndarray:
  """(R, N, C) replica probabilities -> (N, C), as results.json scores the ensemble:
  each seed's fold ensemble first, then the mean over seeds."""
  return seed_models(probs, folds).mean(0)
