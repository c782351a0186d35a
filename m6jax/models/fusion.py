"""Fusion heads and the multimodal classifier.

`FusionHead` maps per-modality embeddings {'image': (B, Di), 'text': (B, Dt)}
to class logits. `Classifier` puts the towers in front of it; its parameter
tree has the top-level groups 'image', 'text' and 'fusion', which optimizer
groups select by regex.
"""

from __future__ import annotations

from typing import Any, Callable

import flax.linen as nn
import jax
import jax.numpy as jnp

MODES = ("text", "image", "early", "late", "gated")


def modalities(mode: str) -> tuple[str, ...]:
  """Which embeddings a fusion mode reads."""
  if mode not in MODES:
    raise ValueError(f"unknown fusion mode {mode!r}; choose from {MODES}")
  return (mode,) if mode in ("text", "image") else ("image", "text")


class MLP(nn.Module):
  """[LayerNorm] -> [Dense(hidden) -> ReLU -> Dropout] -> Dense(out)."""
  out: int
  hidden: int = 0
  dropout: float = 0.0
  dtype: Any = jnp.float32
  norm: bool = True

  @nn.compact
  def __call__(self, x, train: bool = False):
    if self.norm:
      x = nn.LayerNorm(dtype=self.dtype, name="norm")(x)
    if self.hidden:
      x = nn.relu(nn.Dense(self.hidden, dtype=self.dtype, name="hidden")(x))
      x = nn.Dropout(self.dropout, deterministic=not train)(x)
    return nn.Dense(self.out, dtype=self.dtype, name="out")(x)


class FusionHead(nn.Module):
  """Embeddings -> {'logits': (B, C), 'weights': (B, M) modality weights}.

  text / image: one modality. early: concat then MLP. late: one MLP per
  modality, logits combined with learned softmax weights. gated: per-example
  softmax gate over projected modalities, then an MLP; the gate values are
  returned so modality importance can be analysed.
  Modality dropout (train only) zeroes one random modality per example with
  probability `modality_dropout`; it needs the 'dropout' rng.
  """
  mode: str
  num_classes: int
  hidden: int = 256
  dropout: float = 0.0
  modality_dropout: float = 0.0
  dtype: Any = jnp.float32

  @nn.compact
  def __call__(self, emb: dict, train: bool = False):
    names = modalities(self.mode)
    xs = [emb[m].astype(self.dtype) for m in names]
    b = xs[0].shape[0]
    if train and self.modality_dropout > 0 and len(xs) > 1:
      key = self.make_rng("dropout")
      k1, k2 = jax.random.split(key)
      drop = jax.random.bernoulli(k1, self.modality_dropout, (b,))
      which = jax.random.randint(k2, (b,), 0, len(xs))
      xs = [jnp.where((drop & (which == i))[:, None], 0.0, x) for i, x in enumerate(xs)]
    mlp = lambda name, norm=True: MLP(self.num_classes, self.hidden, self.dropout, self.dtype,
                                      norm, name=name)
    if len(xs) == 1:
      return {"logits": mlp("head")(xs[0], train), "weights": jnp.ones((b, 1))}
    if self.mode == "early":
      # Normalise each modality on its own so the wider one (1280-d image vs
      # 384-d text) does not dominate the concatenation.
      xs = [nn.LayerNorm(dtype=self.dtype, name=f"norm_{m}")(x) for m, x in zip(names, xs)]
      logits = mlp("head", norm=False)(jnp.concatenate(xs, -1), train)
      return {"logits": logits, "weights": jnp.full((b, len(xs)), 1.0 / len(xs))}
    if self.mode == "late":
      per = jnp.stack([mlp(f"head_{m}")(x, train) for m, x in zip(names, xs)], 1)
      w = jax.nn.softmax(self.param("combine", nn.initializers.zeros, (len(xs),)))
      return {"logits": jnp.einsum("bmc,m->bc", per, w),
              "weights": jnp.broadcast_to(w, (b, len(xs)))}
    # gated
    width = self.hidden or 128
    proj = [nn.Dense(width, dtype=self.dtype, name=f"proj_{m}")(
        nn.LayerNorm(dtype=self.dtype, name=f"norm_{m}")(x)) for m, x in zip(names, xs)]
    gate = jax.nn.softmax(nn.Dense(len(xs), dtype=self.dtype, name="gate")(
        jnp.concatenate(proj, -1)), -1)
    fused = jnp.einsum("bm,bmd->bd", gate, jnp.stack(proj, 1))
    return {"logits": mlp("head")(nn.relu(fused), train), "weights": gate}


class Classifier(nn.Module):
  """Towers + fusion head.

  batch may carry precomputed embeddings ('image_embedding', 'text_embedding',
  frozen mode) or raw inputs ('image' uint8 (B, S, S, 3) and 'input_ids' /
  'attention_mask' (B, L), finetune mode). Returns the head's dict plus the
  embeddings used, and 'image_feature_map' (B, h, w, c) when the image tower
  ran (Grad-CAM, m6jax.explain).
  """
  fusion: FusionHead
  image: nn.Module | None = None
  text: nn.Module | None = None
  image_preprocess: Callable | None = None
  tower_train: bool = True   # False: towers run in inference mode (BN statistics fixed)

  def __call__(self, batch: dict, train: bool = False):
    emb, fmap = {}, None
    for m in modalities(self.fusion.mode):
      if f"{m}_embedding" in batch:
        emb[m] = batch[f"{m}_embedding"]
      elif m == "image":
        x = batch["image"].astype(jnp.float32)
        x = self.image_preprocess(x) if self.image_preprocess else x
        feats = self.image(x, train=train and self.tower_train)
        emb[m], fmap = feats["embedding"], feats["feature_map"]
      else:
        emb[m] = self.text(batch["input_ids"], batch["attention_mask"],
                           train=train and self.tower_train)["embedding"]
    out = dict(self.fusion(emb, train))
    out["embeddings"] = emb
    if fmap is not None:
      out["image_feature_map"] = fmap
    return out
