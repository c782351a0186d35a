"""Are the explanations faithful? Completeness and deletion curves.

Completeness (integrated gradients): sum(attributions) = f(x) - f(baseline);
the relative error |sum - (f - f0)| / |f - f0| per product, within
TOLERANCE (1 %) at the configured steps.

Deletion: the predicted class's ensemble probability before and after
removing what the explanation ranks highest, against removing as much at
random (same products, one seeded draw each). A faithful explanation drops
the probability more. Text: the top-k words by attribution (k = 1, 3, 5;
all of a product's words when it has fewer) vs k random words. Image: the
top 10 % pixels of the Grad-CAM map vs 10 % random pixels, set to the image's
mean colour. The random pixels ('random') are the top 10 % of a random map
drawn at the Grad-CAM map's own resolution (the feature-map grid) and
upsampled the same way, so both remove smooth regions of the same area;
'random_pixels' scatters them independently, a harsher perturbation for a
convnet (high-frequency noise), reported beside it. Drops are means over
products of p(before) - p(after).
"""

from __future__ import annotations

import numpy as np

TOLERANCE = 0.01
KS = (1, 3, 5)
PIXEL_FRACTION = 0.10


def completeness(items) -> dict:
  """Explained products (m6jax.explain.text.Explained) -> relative errors summary."""
  err = []
  for it in items:
    gap = it.f - it.f_base
    err.append(abs(float(np.sum(it.scores)) - gap) / max(abs(gap), 1e-6))
  err = np.asarray(err)
  return {"max_relative_error": float(err.max()) if len(err) else None,
          "mean_relative_error": float(err.mean()) if len(err) else None,
          "within_1pct": float(np.mean(err <= TOLERANCE)) if len(err) else None}


def _prob(probs, targets):
  probs, t = np.asarray(probs), np.asarray(targets)
  return probs[np.arange(len(t)), t].astype(np.float64)


def text_deletion(explainer, items, probs_of_text, targets, ks=KS, seed: int = 0) -> dict:
  """Text deletion curve.

  explainer.features_without(items, drops) -> text features (N, D);
  probs_of_text(text features (N, D)) -> (N, C) ensemble probabilities (the
  image, if any, held fixed). -> {k: {'attributed', 'random'}} mean drops.
  """
  rng = np.random.default_rng(seed)
  none = [[] for _ in items]
  p0 = _prob(probs_of_text(explainer.features_without(items, none)), targets)
  out = {}
  for k in ks:
    top = [list(np.argsort(-it.scores, kind="stable")[:k]) for it in items]
    rand = [list(rng.choice(len(it.words), min(k, len(it.words)), replace=False))
            for it in items]
    p_top = _prob(probs_of_text(explainer.features_without(items, top)), targets)
    p_rand = _prob(probs_of_text(explainer.features_without(items, rand)), targets)
    out[str(k)] = {"attributed": float(np.mean(p0 - p_top)),
                   "random": float(np.mean(p0 - p_rand))}
  return out


def random_maps(n: int, grid, size, seed: int) -> np.ndarray:
  """(n, H, W) maps: uniform noise on the (h, w) `grid`, bilinearly upsampled to
  `size` (H, W) as Grad-CAM maps are (m6jax.explain.gradcam.upsample)."""
  from m6jax.explain import gradcam
  low = np.random.default_rng(seed).uniform(size=(n,) + tuple(grid)).astype(np.float32)
  return np.asarray(gradcam.upsample(low, tuple(size)))


def delete_pixels(images, maps, fraction: float = PIXEL_FRACTION, seed=None):
  """uint8 (N, H, W, 3), maps (N, H, W) -> copies with the top `fraction` pixels
  of each map (or, with seed set, as many independent random pixels) set to
  the image's mean colour."""
  images = np.asarray(images)
  n, h, w = images.shape[:3]
  m = max(1, int(round(fraction * h * w)))
  out = images.copy()
  rng = None if seed is None else np.random.default_rng(seed)
  for i in range(n):
    if rng is None:
      idx = np.argsort(-np.asarray(maps[i], np.float64).ravel(), kind="stable")[:m]
    else:
      idx = rng.choice(h * w, m, replace=False)
    flat = out[i].reshape(-1, 3)
    flat[idx] = np.round(images[i].reshape(-1, 3).mean(0)).astype(np.uint8)
  return out


def image_deletion(images, maps, probs_of_images, targets, grid,
                   fraction: float = PIXEL_FRACTION, seed: int = 0) -> dict:
  """probs_of_images(uint8 images (N, H, W, 3)) -> (N, C) (the text held fixed);
  grid: (h, w) of the Grad-CAM maps before upsampling.
  -> {'attributed', 'random', 'random_pixels'} mean drops, and 'fraction'."""
  images = np.asarray(images)
  noise = random_maps(len(images), grid, images.shape[1:3], seed)
  p0 = _prob(probs_of_images(images), targets)
  drop = lambda imgs: float(np.mean(p0 - _prob(probs_of_images(imgs), targets)))  # noqa: E731
  return {"attributed": drop(delete_pixels(images, maps, fraction)),
          "random": drop(delete_pixels(images, noise, fraction)),
          "random_pixels": drop(delete_pixels(images, maps, fraction, seed)),
          "fraction": fraction}
