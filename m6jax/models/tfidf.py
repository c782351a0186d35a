"""TF-IDF text features: a cheap classic baseline that can feed a dense Flax head."""

from __future__ import annotations

from typing import Sequence

import numpy as np


class TfidfFeatures:
  """sklearn TfidfVectorizer (+ TruncatedSVD to `dim` components when dim is set).

  fit(train_texts) -> self; transform(texts) -> float32 (N, D), D = dim or the
  vocabulary size (<= max_features). Fit only on training texts: vocabulary,
  IDF weights and the SVD basis all come from what fit() is given.
  """

  def __init__(self, ngram_range: tuple[int, int] = (1, 2), max_features: int | None = 20000,
               sublinear_tf: bool = True, dim: int | None = None, min_df: int | float = 1,
               lowercase: bool = True, seed: int = 0):
    from sklearn.feature_extraction.text import TfidfVectorizer
    self.vectorizer = TfidfVectorizer(ngram_range=tuple(ngram_range), max_features=max_features,
                                      sublinear_tf=sublinear_tf, min_df=min_df,
                                      lowercase=lowercase, dtype=np.float32)
    self.dim = dim
    self.seed = seed
    self.svd = None
    self.fitted = False

  def fit(self, texts: Sequence[str]) -> "TfidfFeatures":
    texts = list(texts)
    x = self.vectorizer.fit_transform(texts)
    if self.dim is not None:
      from sklearn.decomposition import TruncatedSVD
      # TruncatedSVD needs n_components < n_features.
      if not 0 < self.dim < x.shape[1]:
        raise ValueError(f"dim={self.dim} must be in (0, {x.shape[1]}): the vocabulary "
                         f"fitted on {len(texts)} texts has {x.shape[1]} terms")
      self.svd = TruncatedSVD(self.dim, random_state=self.seed).fit(x)
    self.fitted = True
    return self

  @property
  def output_dim(self) -> int:
    if not self.fitted:
      raise RuntimeError("TfidfFeatures: call fit(train_texts) first")
    return self.dim if self.svd is not None else len(self.vectorizer.vocabulary_)

  def transform(self, texts: Sequence[str]) -> np.ndarray:
    if not self.fitted:
      raise RuntimeError("TfidfFeatures: call fit(train_texts) before transform")
    x = self.vectorizer.transform(list(texts))
    x = self.svd.transform(x) if self.svd is not None else x.toarray()
    return np.asarray(x, dtype=np.float32)

  def fit_transform(self, texts: Sequence[str]) -> np.ndarray:
    texts = list(texts)
    return self.fit(texts).transform(texts)
