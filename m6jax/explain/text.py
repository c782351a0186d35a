"""Which words drove a prediction: integrated gradients through the BERT tower,
exact per-term contributions for TF-IDF features with a linear head.

BERT (frozen mode): the score of a product is the replicas' mean logit of the
target class, f(e) = mean_k head_k(image embedding, BertEncoder(e))[target],
with e the (B, L, H) word embeddings (position and token-type embeddings are
added inside the encoder, as always). Integrated gradients (Sundararajan et al.
2017) from a baseline e' (every word piece's embedding replaced by the [PAD]
embedding, or by zeros; [CLS]/[SEP] kept) integrate the gradient along
e' + a (e - e') with Gauss-Legendre nodes on [0, 1] (as Captum's default
method), so sum(attributions) = f(e) - f(e') up to the quadrature error
(`completeness`). The encoder reads e through `word_embeddings_from`, which
intercepts the word-embedding lookup: the model code run is the tower's own.
One jitted program per (batch, length) shape takes all replicas' heads
(vmapped) and scans over the steps.

TF-IDF: with a linear head the text part of a logit is v . f / ||f|| ('l2'
norm) or v . f ('none'), f = P t the (SVD of the) TF-IDF vector t, so term j
contributes t_j (P^T v)_j / ||f||: the contributions add up exactly to
logit(text, image) - logit(no text, image).

Word level: BERT word pieces ('##' continuations) are merged into words by
summing their scores, and a word's occurrences into one score (as TF-IDF
counts a term once per text); a TF-IDF bigram's contribution is split evenly
between its two words.
"""

from __future__ import annotations

import contextlib
import dataclasses
import logging

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import tqdm

log = logging.getLogger(__name__)

BASELINES = ("pad", "zero")
BUCKET = 64    # token rows are padded to a multiple of this: few compiled shapes


# --- integrated gradients ------------------------------------------------------------

def gauss_legendre(steps: int) -> tuple[np.ndarray, np.ndarray]:
  """-> (alphas (S,), weights (S,)): Gauss-Legendre nodes and weights on [0, 1]
  (Captum's 'gausslegendre': alphas = (1 + x) / 2, weights = w / 2)."""
  if steps < 1:
    raise ValueError(f"integrated gradients needs steps >= 1, got {steps}")
  x, w = np.polynomial.legendre.leggauss(steps)
  return (0.5 * (1.0 + x)).astype(np.float32), (0.5 * w).astype(np.float32)


def integrated_gradients(score, x, baseline, steps: int):
  """score(z (B, ...)) -> (B,) with examples independent; x, baseline (B, ...).

  -> (attributions (B, ...), score(x) (B,), score(baseline) (B,)). A scan over
  the steps keeps one batch of gradients alive at a time.
  """
  alphas, weights = gauss_legendre(steps)
  grad = jax.grad(lambda z: jnp.sum(score(z)))
  delta = x - baseline

  def body(total, aw):
    a, w = aw
    return total + w * grad(baseline + a * delta), None

  total, _ = jax.lax.scan(body, jnp.zeros_like(x), (jnp.asarray(alphas), jnp.asarray(weights)))
  return delta * total, score(x), score(baseline)


@contextlib.contextmanager
def word_embeddings_from(embeds):
  """Inside, a BertEncoder's word-embedding lookup returns `embeds` (B, L, H)
  instead of looking its ids up (the ids then only give the shape)."""
  def hook(next_fun, args, kwargs, ctx):
    if (ctx.method_name == "__call__" and isinstance(ctx.module, nn.Embed)
        and ctx.module.name == "word_embeddings"):
      return embeds.astype(ctx.module.dtype or embeds.dtype)
    return next_fun(*args, **kwargs)
  with nn.intercept_methods(hook):
    yield


def sentence_embedding(module, params, embeds, mask):
  """BertEncoder 'embedding' (B, H) of word embeddings (B, L, H) and mask (B, L)."""
  with word_embeddings_from(embeds):
    return module.apply({"params": params}, jnp.zeros(mask.shape, jnp.int32), mask)["embedding"]


def baseline_embeddings(word_table, ids, special, kind: str):
  """(V, H) table, ids (B, L) -> baseline (B, L, H): word pieces become the
  [PAD] embedding ('pad', id 0 = the BERT vocabulary's [PAD]) or zeros
  ('zero'); special tokens (`special` (B, L) bool) keep theirs."""
  if kind not in BASELINES:
    raise ValueError(f"explain.ig_baseline must be one of {BASELINES}, got {kind!r}")
  x = word_table[ids]
  fill = word_table[0] if kind == "pad" else jnp.zeros_like(word_table[0])
  return jnp.where(special[..., None], x, fill)


def make_bert_ig(module, head, mods, steps: int, baseline: str):
  """-> jitted fn(tower_params, head_params (K, ...), ids, mask, special (B, L),
  image_embedding (B, Di) or None, target (B,)) -> {'tokens' (B, L) attributions
  summed over the hidden axis, 'f' (B,), 'f_base' (B,)}: the mean over the K
  replicas of the target class's logit (head: FusionHead; mods: its modalities)."""
  if baseline not in BASELINES:
    raise ValueError(f"explain.ig_baseline must be one of {BASELINES}, got {baseline!r}")

  @jax.jit
  def run(tower_params, head_params, ids, mask, special, image_emb, target):
    table = tower_params["embeddings"]["word_embeddings"]["embedding"]

    def score(e):
      text = sentence_embedding(module, tower_params, e, mask)

      def one(p):
        emb = {"text": text}
        if "image" in mods:
          emb["image"] = image_emb
        return head.apply({"params": p}, emb, train=False)["logits"].astype(jnp.float32)
      logits = jax.vmap(one)(head_params)                             # (K, B, C)
      return jnp.mean(jnp.take_along_axis(logits, target[None, :, None], -1)[..., 0], 0)

    x = table[ids]
    base = baseline_embeddings(table, ids, special, baseline)
    attr, f, f0 = integrated_gradients(score, x, base, steps)
    return {"tokens": jnp.sum(attr, -1), "f": f, "f_base": f0}
  return run


# --- words -----------------------------------------------------------------------------

def merge_word_pieces(tokens, scores, special=()) -> tuple[list[str], np.ndarray, list[list[int]]]:
  """Word pieces -> words: a '##' piece continues the word before it.

  tokens: (L,) strings, scores (L,), special: tokens to leave out ([CLS]...).
  -> (words, word scores (W,) = sums of their pieces' scores, token positions of
  each word).
  """
  words, sums, where = [], [], []
  for i, (t, s) in enumerate(zip(tokens, scores)):
    if t in special:
      continue
    if t.startswith("##") and words and where[-1][-1] == i - 1:
      words[-1] += t[2:]
      sums[-1] += float(s)
      where[-1].append(i)
    else:
      words.append(t[2:] if t.startswith("##") else t)
      sums.append(float(s))
      where.append([i])
  return words, np.asarray(sums, np.float64), where


def group_words(words, scores, where) -> tuple[list[str], np.ndarray, list[list[int]]]:
  """Occurrences -> distinct words (first-seen order): a word's score is the sum
  over its occurrences, its positions their union (deleting it removes all)."""
  index, out_w, out_s, out_p = {}, [], [], []
  for w, s, p in zip(words, scores, where):
    if w not in index:
      index[w] = len(out_w)
      out_w.append(w)
      out_s.append(0.0)
      out_p.append([])
    out_s[index[w]] += float(s)
    out_p[index[w]].extend(p)
  return out_w, np.asarray(out_s, np.float64), out_p


@dataclasses.dataclass
class Explained:
  """One product's word attributions."""
  words: list            # W words
  scores: np.ndarray     # (W,) contribution of each to the target score
  f: float               # target score (mean target logit) with the text
  f_base: float          # ... at the baseline (BERT) / without text (TF-IDF)
  units: list            # per word, what deletion removes: token positions / word tokens
  pieces: object = None  # BERT: the token ids (L,); TF-IDF: the word tokens of the text

  def top(self, n: int = 5, readable: bool = True) -> list[tuple[str, float]]:
    """The n highest-scoring words; readable: only words with a letter (what a reader
    is shown: punctuation and bare numbers are scored, and deleted by the deletion
    curves, but left out of captions and predict columns)."""
    order = [int(i) for i in np.argsort(-self.scores, kind="stable")
             if not readable or is_readable(self.words[i])]
    return [(self.words[i], float(self.scores[i])) for i in order[:n]]


def is_readable(word: str) -> bool:
  """A word a reader is shown among the top words: it has at least one letter."""
  return any(ch.isalpha() for ch in word)


def _batched(n: int, size: int):
  for s in range(0, n, size):
    yield np.arange(s, min(n, s + size))


class BertText:
  """Integrated gradients and word deletion for a frozen BERT text tower."""

  def __init__(self, tower, head, mods, head_params, max_length: int, steps: int,
               baseline: str, batch_size: int = 8):
    self.tower, self.head, self.mods = tower, head, tuple(mods)
    self.head_params, self.max_length, self.bs = head_params, max_length, batch_size
    self.special_ids = set(int(i) for i in tower.tokenizer.all_special_ids)
    self.special_tokens = set(tower.tokenizer.all_special_tokens)
    self._ig = make_bert_ig(tower.module, head, self.mods, steps, baseline)
    module = tower.module
    self._embed = jax.jit(lambda p, ids, m: module.apply({"params": p}, ids, m)["embedding"])

  def _pad(self, seqs):
    """Token id lists -> ids, mask (B', L) with B' = self.bs, L a multiple of BUCKET."""
    length = max(len(s) for s in seqs)
    length = min(-(-length // BUCKET) * BUCKET, max(self.max_length, length))
    ids = np.zeros((self.bs, length), np.int32)
    mask = np.zeros((self.bs, length), np.int32)
    for i, s in enumerate(seqs):
      ids[i, :len(s)], mask[i, :len(s)] = s, 1
    return ids, mask

  def tokenize(self, texts) -> list[list[int]]:
    return self.tower.tokenizer(list(texts), truncation=True,
                                max_length=self.max_length)["input_ids"]

  def explain(self, texts, image_emb, targets) -> list[Explained]:
    """texts (N,), image_emb (N, Di) or None, targets (N,) -> one Explained each."""
    seqs = self.tokenize(texts)
    order = np.argsort([len(s) for s in seqs], kind="stable")  # similar lengths share a batch
    out = [None] * len(seqs)
    tp = self.tower.params["params"]
    batches = list(_batched(len(seqs), self.bs))
    for idx in tqdm.tqdm(batches, desc="integrated gradients", unit="batch", leave=False):
      rows = order[idx]
      ids, mask = self._pad([seqs[r] for r in rows])
      special = np.isin(ids, list(self.special_ids)) | (mask == 0)
      tgt = np.zeros(self.bs, np.int32)
      tgt[:len(rows)] = np.asarray(targets)[rows]
      img = None
      if image_emb is not None:
        img = np.zeros((self.bs, image_emb.shape[1]), np.float32)
        img[:len(rows)] = image_emb[rows]
      res = jax.device_get(self._ig(tp, self.head_params, ids, mask, special, img, tgt))
      for j, r in enumerate(rows):
        n = len(seqs[r])
        toks = self.tower.tokenizer.convert_ids_to_tokens(seqs[r])
        words, scores, where = group_words(*merge_word_pieces(toks, res["tokens"][j, :n],
                                                              self.special_tokens))
        out[r] = Explained(words, scores, float(res["f"][j]), float(res["f_base"][j]),
                           where, np.asarray(seqs[r]))
    return out

  def features_without(self, items: list[Explained], drops: list) -> np.ndarray:
    """Text features (N, D) of each product with the words `drops[i]` (word
    indices into items[i].words) removed: their word pieces are cut from the
    token sequence."""
    seqs = []
    for it, drop in zip(items, drops):
      cut = {p for w in drop for p in it.units[w]}
      seqs.append([t for p, t in enumerate(it.pieces) if p not in cut])
    order = np.argsort([len(s) for s in seqs], kind="stable")
    out = np.zeros((len(seqs), self.tower.feature_dim), np.float32)
    for idx in _batched(len(seqs), self.bs):
      rows = order[idx]
      ids, mask = self._pad([seqs[r] for r in rows])
      out[rows] = np.asarray(self._embed(self.tower.params["params"], ids, mask))[:len(rows)]
    return out


def word_tokens(features, text: str) -> list[str]:
  """The words a fitted TfidfFeatures sees in `text` (its preprocessor and tokenizer)."""
  v = features.vectorizer
  return v.build_tokenizer()(v.build_preprocessor()(text))


class TfidfText:
  """Exact per-term contributions for TF-IDF features and a linear head."""

  def __init__(self, features, head, mods, head_params, norm: str):
    if head.hidden or head.mode == "gated" or norm not in ("l2", "none"):
      raise ValueError("exact TF-IDF contributions need a linear head (model.hidden=0, "
                       "fusion text/early/late) with model.norm 'l2' or 'none'; got "
                       f"hidden={head.hidden}, fusion={head.mode!r}, norm={norm!r}")
    self.features, self.head, self.mods = features, head, tuple(mods)
    self.head_params, self.norm = head_params, norm
    self.terms = [str(t) for t in features.to_arrays()[1]["terms"]]
    comp = features.svd.components_ if features.svd is not None else None
    self.components = None if comp is None else np.asarray(comp, np.float32)  # (D, V)

    def directions(params, text, image, target):
      """-> v (K, B, D): the linear map from the (normalised) text features to the target logit."""
      def h(f, p):
        emb = {"text": f}
        if "image" in mods:
          emb["image"] = image
        lg = head.apply({"params": p}, emb, train=False)["logits"]
        lg0 = head.apply({"params": p}, dict(emb, text=jnp.zeros_like(f)), train=False)["logits"]
        d = jnp.take_along_axis(lg - lg0, target[:, None], -1)[:, 0]
        scale = jnp.linalg.norm(f, axis=-1) if norm == "l2" else 1.0
        return jnp.sum(d * scale), (lg, lg0)   # v . f: linear in f, its gradient is v
      return jax.vmap(jax.grad(h, has_aux=True), in_axes=(None, 0))(text, params)
    self._directions = jax.jit(directions)

  def explain(self, texts, image_emb, targets) -> list[Explained]:
    texts = list(texts)
    t = self.features.vectorizer.transform(texts).astype(np.float32)       # (N, V) sparse
    f = self.features.transform(texts)                                      # (N, D)
    img = None if image_emb is None else np.asarray(image_emb, np.float32)
    v, (lg, lg0) = jax.device_get(self._directions(self.head_params, f, img,
                                                   np.asarray(targets, np.int32)))
    v = v.mean(0)                                                           # replicas' mean
    tgt = np.asarray(targets)
    f_x = np.take_along_axis(lg, tgt[None, :, None], -1)[..., 0].mean(0)
    f_0 = np.take_along_axis(lg0, tgt[None, :, None], -1)[..., 0].mean(0)
    out = []
    for i, text in enumerate(texts):
      row = t[i].tocoo()
      cols, vals = row.col, row.data
      dirs = v[i] @ self.components[:, cols] if self.components is not None else v[i][cols]
      scale = 1.0 / max(np.linalg.norm(f[i]), 1e-6) if self.norm == "l2" else 1.0
      contrib = vals * dirs * scale                                         # per term
      toks = word_tokens(self.features, text)
      uniq = list(dict.fromkeys(toks))
      pos = {w: j for j, w in enumerate(uniq)}
      scores = np.zeros(len(uniq), np.float64)
      for c, s in zip(cols, contrib):
        parts = self.terms[c].split(" ")
        for p in parts:
          if p in pos:
            scores[pos[p]] += float(s) / len(parts)
      out.append(Explained(uniq, scores, float(f_x[i]), float(f_0[i]),
                           [[w] for w in uniq], toks))
    return out

  def features_without(self, items: list[Explained], drops: list) -> np.ndarray:
    """Text features (N, D) with every occurrence of the dropped words removed."""
    texts = []
    for it, drop in zip(items, drops):
      gone = {it.words[w] for w in drop}
      texts.append(" ".join(t for t in it.pieces if t not in gone))
    return self.features.transform(texts)
