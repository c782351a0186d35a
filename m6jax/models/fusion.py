"""Fusion heads and the multimodal classifier.

`FusionHead` maps per-modality embeddings {'image': (B, Di), 'text': (B, Dt)}
to class logits. `Classifier` puts the towers in front of it; its parameter
tree has the top-level groups 'image', 'text' and 'fusion', which optimizer
groups select by regex.

Modality balance is part of every multimodal head: each embedding is first
normalised on its own (`norm`), then scaled by its modality weight
(`modality_weights`, fixed or learned). Why it matters: LayerNorm gives every
feature unit scale, so a modality's vector length grows as sqrt(D) and the
1280-d image embedding would carry ~77 % of the energy entering an early-fusion
head next to a 384-d text embedding; 'l2' makes each modality unit length, so
the weights alone decide the balance.
"""

from __future__ import annotations

from typing import Any, Callable

import flax.linen as nn
import jax
import jax.numpy as jnp

MODES = ("text", "image", "early", "late", "gated")
NORMS = ("none", "layernorm", "l2", "layernorm_unit")


def modalities(mode: str) -> tuple[str, ...]:
  """Which embeddings a fusion mode reads, in the order the head uses them."""
  if mode not in MODES:
    raise ValueError(f"unknown fusion mode {mode!r}; choose from {MODES}")
  return (mode,) if mode in ("text", "image") else ("image", "text")


def l2_normalize(x, eps: float = 1e-6):
  """(B, D) -> rows of unit length (an all-zero row, a dropped modality, stays zero)."""
  return x * jax.lax.rsqrt(jnp.maximum(jnp.sum(jnp.square(x), -1, keepdims=True), eps * eps))


class ModalityNorm(nn.Module):
  """One modality's normalisation, (B, D) -> (B, D).

  none: as is. layernorm: per-example LayerNorm (each unit ~unit scale, so the
  squared length is ~D). l2: unit length. layernorm_unit: LayerNorm divided by
  sqrt(D), so the expected squared length is 1 whatever D is.
  """
  kind: str = "l2"
  dtype: Any = jnp.float32

  @nn.compact
  def __call__(self, x):
    if self.kind == "none":
      return x
    if self.kind == "l2":
      return l2_normalize(x)
    if self.kind in ("layernorm", "layernorm_unit"):
      y = nn.LayerNorm(dtype=self.dtype, name="ln")(x)
      return y / jnp.sqrt(x.shape[-1]).astype(y.dtype) if self.kind == "layernorm_unit" else y
    raise ValueError(f"unknown modality norm {self.kind!r}; choose from {NORMS}")


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
  """Embeddings -> {'logits': (B, C), 'weights': (B, M) measured modality shares}.

  text / image: one modality (normalised by `norm`, then an MLP).
  early: each modality normalised and scaled by its weight, concatenated, MLP;
    'weights' is each modality's share of the squared length entering the MLP.
  late: one MLP per normalised modality; logits combined with the modality
    weights (normalised to sum 1; learned as a softmax when `learn_weights`);
    'weights' are those combination weights.
  gated: per-example softmax gate over the projected, weighted modalities,
    then an MLP; 'weights' are the gate values.

  modality_weights: one positive weight per modality in `modalities(mode)`
    order (image, text); () = all 1. learn_weights: the weights become
    trainable (a learned log-scale initialised at the given weights).
  Modality dropout (train only) zeroes one random modality per example with
  probability `modality_dropout`; it needs the 'dropout' rng.
  """
  mode: str
  num_classes: int
  hidden: int = 256
  dropout: float = 0.0
  modality_dropout: float = 0.0
  dtype: Any = jnp.float32
  norm: str = "l2"
  modality_weights: tuple = ()
  learn_weights: bool = False

  def _weights(self, names) -> jax.Array:
    """(M,) positive modality weights, fixed or learned."""
    given = tuple(float(v) for v in (self.modality_weights or (1.0,) * len(names)))
    if len(given) != len(names) or min(given) <= 0:
      raise ValueError(f"modality_weights must be {len(names)} positive numbers for "
                       f"{names}, got {self.modality_weights}")
    init = jnp.asarray(given, jnp.float32)
    if not self.learn_weights:
      return init
    log_scale = self.param("log_modality_weights", nn.initializers.zeros, (len(names),))
    return init * jnp.exp(log_scale)

  @nn.compact
  def __call__(self, emb: dict, train: bool = False):
    if self.norm not in NORMS:
      raise ValueError(f"unknown modality norm {self.norm!r}; choose from {NORMS}")
    names = modalities(self.mode)
    xs = [emb[m].astype(self.dtype) for m in names]
    b = xs[0].shape[0]
    if train and self.modality_dropout > 0 and len(xs) > 1:
      key = self.make_rng("dropout")
      k1, k2 = jax.random.split(key)
      drop = jax.random.bernoulli(k1, self.modality_dropout, (b,))
      which = jax.random.randint(k2, (b,), 0, len(xs))
      xs = [jnp.where((drop & (which == i))[:, None], 0.0, x) for i, x in enumerate(xs)]
    xs = [ModalityNorm(self.norm, self.dtype, name=f"norm_{m}")(x) for m, x in zip(names, xs)]
    mlp = lambda name: MLP(self.num_classes, self.hidden, self.dropout, self.dtype, False,
                           name=name)
    if len(xs) == 1:
      return {"logits": mlp("head")(xs[0], train), "weights": jnp.ones((b, 1))}
    w = self._weights(names)
    if self.mode == "early":
      xs = [x * w[i].astype(x.dtype) for i, x in enumerate(xs)]
      energy = jnp.stack([jnp.sum(jnp.square(x.astype(jnp.float32)), -1) for x in xs], 1)
      share = energy / jnp.maximum(energy.sum(1, keepdims=True), 1e-12)
      return {"logits": mlp("head")(jnp.concatenate(xs, -1), train), "weights": share}
    if self.mode == "late":
      per = jnp.stack([mlp(f"head_{m}")(x, train) for m, x in zip(names, xs)], 1)
      mix = (jax.nn.softmax(jnp.log(w)) if self.learn_weights else w / w.sum())
      return {"logits": jnp.einsum("bmc,m->bc", per, mix.astype(per.dtype)),
              "weights": jnp.broadcast_to(mix, (b, len(xs)))}
    # gated
    width = self.hidden or 128
    proj = [nn.Dense(width, dtype=self.dtype, name=f"proj_{m}")(x * w[i].astype(x.dtype))
            for i, (m, x) in enumerate(zip(names, xs))]
    gate = jax.nn.softmax(nn.Dense(len(xs), dtype=self.dtype, name="gate")(
        jnp.concatenate(proj, -1)), -1)
    fused = jnp.einsum("bm,bmd->bd", gate, jnp.stack(proj, 1))
    return {"logits": mlp("head")(nn.relu(fused), train), "weights": gate}


def head_from_config(model_cfg, num_classes: int, dtype=jnp.float32) -> FusionHead:
  """The FusionHead a `config.model` section describes."""
  m = model_cfg
  names = modalities(m.fusion)
  given = dict(m.get("modality_weights") or {})
  unknown = sorted(set(given) - {"image", "text"})
  if unknown:
    raise ValueError(f"model.modality_weights: unknown modality {unknown}; use image, text")
  weights = tuple(float(given.get(n, 1.0)) for n in names) if len(names) > 1 else ()
  return FusionHead(mode=m.fusion, num_classes=num_classes, hidden=m.hidden,
                    dropout=m.dropout, modality_dropout=m.modality_dropout, dtype=dtype,
                    norm=m.get("norm", "l2"), modality_weights=weights,
                    learn_weights=bool(m.get("learn_modality_weights", False)))


class Classifier(nn.Module):
  """Towers + fusion head.

  batch may carry precomputed embeddings ('image_embedding', 'text_embedding',
  frozen mode) or raw inputs ('image' uint8 (B, S, S, 3) and 'input_ids' /
  'attention_mask' (B, L), finetune mode). Returns the head's dict plus the
  embeddings used, and 'image_feature_map' (B, h, w, c) when the image tower
  ran (Grad-CAM, m6jax.explain.run).
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
