"""Which modality decided a prediction: two-player Shapley values per product.

The value of a coalition S of {text, image} is the ensemble's probability of
the predicted class (predicted with both) when only the modalities in S are
given; an absent modality's embedding is zeros, the way modality dropout
trained the head and m6jax.inference.predict serves a missing image or text.
With v(TI), v(T), v(I), v(0):

  phi_text  = ((v(T) - v(0)) + (v(TI) - v(I))) / 2
  phi_image = ((v(I) - v(0)) + (v(TI) - v(T))) / 2

and phi_text + phi_image = v(TI) - v(0) exactly (efficiency). A product
predicted from one modality (the other missing, so zeros already) gets the
missing modality's phi = 0. Shares are |phi| / (|phi_text| + |phi_image|).
"""

from __future__ import annotations

import numpy as np

COALITIONS = ("both", "text", "image", "none")


def shapley(v_both, v_text, v_image, v_none) -> dict:
  """Coalition values (N,) -> {'text', 'image'} Shapley values (N,) and their
  shares {'share_text', 'share_image'} (N,) in [0, 1] (NaN where both are 0)."""
  v_both, v_text, v_image, v_none = (np.asarray(v, np.float64)
                                     for v in (v_both, v_text, v_image, v_none))
  phi_t = 0.5 * ((v_text - v_none) + (v_both - v_image))
  phi_i = 0.5 * ((v_image - v_none) + (v_both - v_text))
  tot = np.abs(phi_t) + np.abs(phi_i)
  with np.errstate(invalid="ignore", divide="ignore"):
    share_t = np.where(tot > 0, np.abs(phi_t) / np.where(tot > 0, tot, 1.0), np.nan)
  return {"text": phi_t, "image": phi_i, "share_text": share_t, "share_image": 1.0 - share_t}


def coalition_values(probs_of, feats: dict, targets) -> dict:
  """probs_of({'text': (N, Dt), 'image': (N, Di)}) -> (N, C) ensemble probabilities.

  -> {coalition: (N,) probability of `targets` (N,)} for the four coalitions of
  the two modalities in `feats` (absent = zeros).
  """
  t = np.asarray(targets)
  zero = {m: np.zeros_like(np.asarray(x, np.float32)) for m, x in feats.items()}
  keep = {"both": ("text", "image"), "text": ("text",), "image": ("image",), "none": ()}
  out = {}
  for name, mods in keep.items():
    p = np.asarray(probs_of({m: (feats[m] if m in mods else zero[m]) for m in feats}))
    out[name] = p[np.arange(len(t)), t].astype(np.float64)
  return out


def split(probs_of, feats: dict, targets) -> dict:
  """-> {'values': coalition values, 'shapley': shapley(...)} per product."""
  v = coalition_values(probs_of, feats, targets)
  return {"values": v, "shapley": shapley(v["both"], v["text"], v["image"], v["none"])}


def summary(res: dict) -> dict:
  """Mean Shapley values and shares over products (for results.json)."""
  s = res["shapley"]
  return {"phi_text_mean": float(np.mean(s["text"])), "phi_image_mean": float(np.mean(s["image"])),
          "share_text_mean": float(np.nanmean(s["share_text"])),
          "share_image_mean": float(np.nanmean(s["share_image"])),
          "efficiency_max_abs_error": float(np.max(np.abs(
              s["text"] + s["image"] - (res["values"]["both"] - res["values"]["none"]))))}
