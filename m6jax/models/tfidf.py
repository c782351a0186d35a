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
    self.options = dict(ngram_range=list(ngram_range), sublinear_tf=bool(sublinear_tf),
                        lowercase=bool(lowercase))
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

  def to_arrays(self) -> tuple[dict, dict]:
    """The fitted state as (options, arrays), no pickle: options is plain JSON;
    arrays are 'terms' (V,) str in column order, 'idf' (V,) and, with an SVD,
    'components' (dim, V)."""
    if not self.fitted:
      raise RuntimeError("TfidfFeatures: call fit(train_texts) first")
    vocab = self.vectorizer.vocabulary_
    arrays = {"terms": np.array(sorted(vocab, key=vocab.get), dtype=str),
              "idf": np.asarray(self.vectorizer.idf_)}
    if self.svd is not None:
      arrays["components"] = np.asarray(self.svd.components_)
    return dict(self.options, dim=self.dim, seed=self.seed), arrays

  @classmethod
  def from_arrays(cls, options: dict, arrays) -> "TfidfFeatures":
    """Inverse of `to_arrays`: transform() gives the fitted object's features bit for bit."""
    feats = cls(ngram_range=tuple(options["ngram_range"]), sublinear_tf=options["sublinear_tf"],
                lowercase=options["lowercase"], dim=options["dim"], seed=options["seed"])
    terms = [str(t) for t in arrays["terms"]]
    feats.vectorizer.set_params(vocabulary={t: i for i, t in enumerate(terms)})
    feats.vectorizer.idf_ = np.asarray(arrays["idf"])
    if "components" in arrays:
      from sklearn.decomposition import TruncatedSVD
      feats.svd = TruncatedSVD(feats.dim, random_state=feats.seed)
      feats.svd.components_ = np.asarray(arrays["components"])
      feats.svd.n_features_in_ = len(terms)
    feats.fitted = True
    return feats

  def fit_transform(self, texts: Sequence[str]) -> np.ndarray:
    texts = list(texts)
    return self.fit(texts).transform(texts)
