"""The explanations cover a bounded, deterministic, stratified sample of the test split,
and only the sample's photos are read (m6jax.evaluate.sampling, m6jax.explain.run._rows)."""

import types

import numpy as np

from configs import smoke
from m6jax import defaults
from m6jax.evaluate import sampling
from m6jax.explain import run as explain_lib

N, CLASSES, DIM = 10_000, 7, 3


def _labels(seed=0):
  # Skewed classes: 4,000 rows down to 2 rows.
  counts = [4000, 3000, 1500, 900, 450, 148, 2]
  return np.random.default_rng(seed).permutation(np.repeat(np.arange(CLASSES), counts))


def test_explain_sample_is_bounded_stratified_and_deterministic():
  cfg, y = smoke.get_config(), _labels()
  idx, rec = sampling.explain_sample(cfg, y)
  assert len(idx) == cfg.explain.sample == 256
  assert rec == {"rows": 256, "of": N, "seed": cfg.seed, "stratified_by": "label"}
  got = np.bincount(y[idx], minlength=CLASSES)
  assert got.min() >= 2 and got[-1] == 2                 # every class, the tiny one whole
  np.testing.assert_array_equal(idx, sampling.explain_sample(cfg, y)[0])
  cfg.seed = 1
  assert not np.array_equal(idx, sampling.explain_sample(cfg, y)[0])
  # A run saved before the knob existed gets its default (defaults.saved_config).
  saved = cfg.to_dict()
  del saved["explain"]["sample"]
  assert len(sampling.explain_sample(defaults.saved_config(saved), y)[0]) == 256


class _Source:
  """A test split of N tiny records that logs which rows are read."""

  def __init__(self, labels):
    self.labels, self.read = labels, []

  def __len__(self):
    return len(self.labels)

  def __getitem__(self, i):
    self.read.append(i)
    return {"image": np.full((4, 4, 3), i % 251, np.uint8), "text": f"product {i}",
            "label": self.labels[i], "uniq_id": f"u{i}"}


def test_rows_read_only_the_sample_in_configured_batches():
  cfg, y = smoke.get_config(), _labels()
  cfg.data.image_size, cfg.explain.sample = 4, 40
  source = _Source(y)
  feats = np.random.default_rng(0).normal(size=(N, DIM)).astype(np.float32)
  run = types.SimpleNamespace(
      cols={"test": {"label": y, "uniq_id": [f"u{i}" for i in range(N)],
                     "text": [f"product {i}" for i in range(N)]}},
      builder=types.SimpleNamespace(as_data_source=lambda split: source),
      feats={"text": {"test": feats}})
  split, ids, labels, batches, text, texts, rec = explain_lib._rows(
      cfg, run, ("image", "text"), None, None)
  idx = sampling.explain_sample(cfg, y)[0]
  assert split == "test" and rec["rows"] == len(idx) == 40 and rec["of"] == N
  assert ids == [f"u{i}" for i in idx] and texts == [f"product {i}" for i in idx]
  np.testing.assert_array_equal(labels, y[idx])
  np.testing.assert_array_equal(text, feats[idx])
  assert source.read == []                                # nothing read before streaming
  got = list(batches)
  bs = cfg.data.batch_size
  assert all(b["image"].shape == (bs, 4, 4, 3) for b in got)
  assert len(got) == -(-40 // bs)
  assert sorted(source.read) == sorted(idx.tolist())      # each sampled photo once, no other
  streamed = [u for b in got for u, m in zip(b["uniq_id"], b["mask"]) if m]
  assert streamed == ids                                  # in the order the maps expect



def test_balanced_sample_keeps_the_given_rows_and_deals_the_rest_over_the_classes():
  y = _labels()
  keep = [0, 1, 2]
  idx = sampling.balanced_sample(y, 40, seed=0, keep=keep)
  assert len(idx) == 40 and set(keep) <= set(idx.tolist())
  rest = np.bincount(y[np.setdiff1d(idx, keep)], minlength=CLASSES)
  # 37 rows over 7 classes, round-robin: the 2-row class gives what it has (less any
  # kept rows of it), the others 5 or 6 each, whatever their size.
  assert rest[-1] <= 2 and rest[:-1].min() >= 5 and rest[:-1].max() <= 7
  np.testing.assert_array_equal(idx, sampling.balanced_sample(y, 40, seed=0, keep=keep))
  assert not np.array_equal(idx, sampling.balanced_sample(y, 40, seed=1, keep=keep))
  np.testing.assert_array_equal(sampling.balanced_sample(y, 0), np.arange(N))
