"""TF-IDF baseline features: shapes, dtype, fit only on the texts given."""

import numpy as np
import pytest

from m6jax.models.tfidf import TfidfFeatures

TRAIN = ["cotton shirt for men", "steel watch for women", "wooden door curtain",
         "red cotton saree", "analog watch with steel strap", "eyelet curtain polyester"]
TEST = ["blue cotton kurta", "zebra quokka"]


def test_shapes_and_dtype():
  f = TfidfFeatures().fit(TRAIN)
  x = f.transform(TEST)
  assert x.dtype == np.float32 and x.shape == (2, f.output_dim)
  assert f.output_dim == len(f.vectorizer.vocabulary_)
  assert TfidfFeatures(max_features=5).fit(TRAIN).transform(TEST).shape == (2, 5)
  s = TfidfFeatures(dim=3).fit(TRAIN)
  y = s.transform(TEST)
  assert y.dtype == np.float32 and y.shape == (2, 3) and s.output_dim == 3
  assert TfidfFeatures(dim=3).fit_transform(TRAIN).shape == (len(TRAIN), 3)


def test_fit_only_on_given_texts():
  f = TfidfFeatures(ngram_range=(1, 1)).fit(TRAIN)
  vocab = set(f.vectorizer.vocabulary_)
  assert vocab == {w for t in TRAIN for w in t.split()}
  assert "kurta" not in vocab and "zebra" not in vocab
  x = f.transform(TEST)
  assert np.all(x[1] == 0)  # only unseen words
  before = f.transform(TRAIN)
  f.transform(TEST + ["brand new words everywhere"])  # transform never refits
  np.testing.assert_array_equal(f.transform(TRAIN), before)
  assert set(f.vectorizer.vocabulary_) == vocab


def test_errors():
  with pytest.raises(RuntimeError, match="fit"):
    TfidfFeatures().transform(TEST)
  with pytest.raises(ValueError, match="dim"):
    TfidfFeatures(dim=10_000).fit(TRAIN)
