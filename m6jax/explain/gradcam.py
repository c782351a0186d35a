"""Grad-CAM for the conv image towers, computed with jax.grad.

Every backbone returns {'feature_map', 'embedding'} and passes the feature map
through `self.perturb('feature_map', ...)`. Applying the model with a zero
'perturbations' collection leaves its outputs unchanged, and the gradient
w.r.t. that collection is the gradient w.r.t. the feature map.

Core: `grad_cam(logits_fn, perturbations, images, targets)` with
`logits_fn(perturbations, images) -> (logits (B, C), feature_map (B, h, w, c))`.
`images` may be an array (B, H, W, 3) or a dict holding it under 'image' plus
other per-example inputs that stay fixed (a text embedding, token ids).
BN runs in inference mode, so examples are independent and one gradient of
the summed target scores gives every example's own gradient.

`replica_cams` does the same for all K seed replicas and a whole batch in one
jitted call; `cam_stability` scores how much the replicas' maps agree.
The run driver and CLI are in m6jax.explain.run, the pictures in m6jax.explain.gallery.
"""

from __future__ import annotations

import functools
import os
from concurrent.futures import ThreadPoolExecutor
from typing import Callable

import jax
import jax.numpy as jnp
import numpy as np

METHODS = ("gradcam", "gradcam++", "hirescam")
TARGETS = ("predicted", "true", "ensemble")


# --- maps --------------------------------------------------------------------

def zero_perturbations(module, variables, *args, **kwargs):
  """The module's 'perturbations' collection as zeros, for inputs like `args`.

  Shapes come from `jax.eval_shape` (nothing is computed); the leaves have
  the batch size of `args`.
  """
  def f(*a):
    _, upd = module.apply(variables, *a, mutable=["perturbations"], **kwargs)
    return upd["perturbations"]
  shapes = jax.eval_shape(f, *args)
  return jax.tree.map(lambda s: jnp.zeros(s.shape, s.dtype), shapes)


def image_of(inputs):
  """The image array (B, H, W, 3) of a model input (an array or a dict with 'image')."""
  return inputs["image"] if isinstance(inputs, dict) else inputs


def only_leaf(tree):
  """The single leaf of a perturbation tree (the image feature map)."""
  leaves = jax.tree.leaves(tree)
  if len(leaves) != 1:
    raise ValueError(f"expected one perturbation (the image feature map), got {len(leaves)}")
  return leaves[0]


def raw_maps(grads, fmap, method: str = "gradcam"):
  """Feature-map gradients and activations (..., h, w, c) -> ReLU'd maps (..., h, w)."""
  g, a = grads.astype(jnp.float32), fmap.astype(jnp.float32)
  if method == "gradcam":
    w = jnp.mean(g, axis=(-3, -2), keepdims=True)
    cam = jnp.sum(w * a, -1)
  elif method == "gradcam++":
    # Closed form of Grad-CAM++ (Chattopadhay et al. 2018, eq. 19) with the
    # exponential's higher derivatives written as powers of the gradient.
    g2, g3 = g * g, g * g * g
    denom = 2.0 * g2 + jnp.sum(a, axis=(-3, -2), keepdims=True) * g3
    alpha = jnp.where(g != 0, g2 / jnp.where(denom != 0, denom, 1.0), 0.0)
    w = jnp.sum(alpha * jax.nn.relu(g), axis=(-3, -2), keepdims=True)
    cam = jnp.sum(w * a, -1)
  elif method == "hirescam":
    cam = jnp.sum(g * a, -1)  # elementwise: no spatial averaging of the gradient
  else:
    raise ValueError(f"unknown CAM method {method!r}; choose from {METHODS}")
  return jax.nn.relu(cam)


def normalize(maps):
  """Per-map min-max to [0, 1] over the last two axes; a constant map becomes 0."""
  lo = jnp.min(maps, axis=(-2, -1), keepdims=True)
  span = jnp.max(maps, axis=(-2, -1), keepdims=True) - lo
  ok = span > 0
  return jnp.where(ok, (maps - lo) / jnp.where(ok, span, 1.0), 0.0)


def upsample(maps, size):
  """(..., h, w) -> (..., H, W), bilinear (half-pixel centres)."""
  return jax.image.resize(maps, maps.shape[:-2] + tuple(size), "bilinear")


def _resolve_targets(targets, logits, labels):
  """targets spec + logits (..., B, C) -> int32 (..., B) (constant w.r.t. the grad)."""
  logits = jax.lax.stop_gradient(logits)
  batch = logits.shape[:-1]
  if isinstance(targets, str):
    if targets == "predicted":
      return jnp.argmax(logits, -1).astype(jnp.int32)
    if targets == "ensemble":  # mean softmax over the leading replica axis
      t = jnp.argmax(jnp.mean(jax.nn.softmax(logits, -1), 0), -1).astype(jnp.int32)
      return jnp.broadcast_to(t, batch)
    if targets == "true":
      if labels is None:
        raise ValueError("targets='true' needs labels")
      return jnp.broadcast_to(jnp.asarray(labels, jnp.int32), batch)
    raise ValueError(f"unknown targets {targets!r}; choose from {TARGETS} or an int array")
  return jnp.broadcast_to(jnp.asarray(targets, jnp.int32), batch)


def _finish(grads, fmap, logits, targets, size, method):
  low = raw_maps(grads, fmap, method)
  return {"cams": normalize(upsample(low, size)), "maps": normalize(low),
          "logits": logits, "targets": targets, "grads": grads, "fmap": fmap}


def grad_cam(logits_fn: Callable, perturbations, images, targets="predicted",
             labels=None, method: str = "gradcam", details: bool = False):
  """Grad-CAM maps for a batch.

  logits_fn(perturbations, images) -> (logits (B, C), feature_map (B, h, w, c)).
  targets: 'predicted' (argmax), 'true' (needs `labels` (B,)) or an int array (B,).
  Returns cams float32 (B, H, W) in [0, 1] at the input size; with details, a
  dict {'cams', 'maps' (B, h, w) normalised before upsampling, 'logits',
  'targets', 'grads' and 'fmap' (B, h, w, c)}.
  """
  if isinstance(targets, str) and targets == "ensemble":
    raise ValueError("targets='ensemble' needs replicas: use replica_cams")

  def score(p):
    logits, fmap = logits_fn(p, images)
    logits = logits.astype(jnp.float32)
    t = _resolve_targets(targets, logits, labels)
    s = jnp.sum(jnp.take_along_axis(logits, t[:, None], -1))
    return s, (logits, fmap, t)

  grads, (logits, fmap, t) = jax.grad(score, has_aux=True)(perturbations)
  out = _finish(only_leaf(grads), fmap, logits, t, image_of(images).shape[1:3], method)
  return out if details else out["cams"]


# --- model adapters ----------------------------------------------------------

def image_logits_fn(tower, head_apply: Callable, variables=None) -> Callable:
  """logits_fn for an ImageTower whose embedding feeds a head.

  head_apply(image_embedding (B, D), inputs) -> logits (B, C); `inputs` is what
  grad_cam got as images (a dict can carry fixed per-example context, e.g. the
  product's text embedding in frozen fusion runs). `variables` overrides
  tower.variables (pass them as a traced argument to keep them out of the
  compiled program as constants).
  """
  tv = tower.variables if variables is None else variables

  def logits_fn(perturbations, inputs):
    x = tower.preprocess(image_of(inputs).astype(jnp.float32))
    out = tower.module.apply({**tv, "perturbations": perturbations}, x, train=False)
    return head_apply(out["embedding"], inputs), out["feature_map"]
  return logits_fn


def pooled_logits_fn(tower, head_apply: Callable) -> Callable:
  """logits_fn for a frozen tower's precomputed feature map (ImageTower.feature_map).

  inputs is a dict with 'feature_map' (B, h, w, c) and 'image' (for the map
  size), plus whatever head_apply(image_embedding, inputs) reads. The
  perturbation is an array added to the feature map, the point where the
  tower's own 'feature_map' perturbation sits, and tower.pool gives the
  embedding exactly as the tower does: the gradient is the one
  image_logits_fn gives, without running the tower again.
  """
  def logits_fn(perturbation, inputs):
    fmap = inputs["feature_map"] + perturbation
    return head_apply(tower.pool(fmap), inputs), fmap
  return logits_fn


def classifier_logits_fn(model, variables) -> Callable:
  """logits_fn for a finetune-mode fusion.Classifier; inputs is its batch dict."""
  def logits_fn(perturbations, batch):
    out = model.apply({**variables, "perturbations": perturbations}, batch, train=False)
    return out["logits"], out["image_feature_map"]
  return logits_fn


# --- replicas ----------------------------------------------------------------

def _replica_impl(make_logits_fn, method, target_mode, replica_params, shared, perturbations,
                  inputs, targets, labels):
  k = jax.tree.leaves(replica_params)[0].shape[0]
  # One perturbation per replica: replica k's score depends only on its own
  # copy, so a single grad of the summed scores yields every replica's gradient.
  pk = jax.tree.map(lambda z: jnp.broadcast_to(z, (k,) + z.shape), perturbations)

  def score(pk):
    def one(params, p):
      logits, fmap = make_logits_fn(params, shared)(p, inputs)
      return logits.astype(jnp.float32), fmap
    logits, fmap = jax.vmap(one)(replica_params, pk)
    t = _resolve_targets(target_mode if targets is None else targets, logits, labels)
    s = jnp.sum(jnp.take_along_axis(logits, t[..., None], -1))
    return s, (logits, fmap, t)

  grads, (logits, fmap, t) = jax.grad(score, has_aux=True)(pk)
  out = _finish(only_leaf(grads), fmap, logits, t, image_of(inputs).shape[1:3], method)
  # What a run reports, computed in the same program: the replicas' mean
  # softmax and their mean map (renormalised), so no eager op compiles later.
  out["probs"] = jnp.mean(jax.nn.softmax(logits, -1), 0)
  out["mean_cams"] = normalize(jnp.mean(out["cams"], 0))
  return out


@functools.lru_cache(maxsize=8)
def _replica_jit(make_logits_fn, method, target_mode):
  return jax.jit(functools.partial(_replica_impl, make_logits_fn, method, target_mode))


def replica_cams(make_logits_fn: Callable, replica_params, perturbations, images,
                 targets="ensemble", labels=None, method: str = "gradcam", shared=None,
                 details: bool = False):
  """Grad-CAM for all K seed replicas and the whole batch in one jitted call.

  make_logits_fn(params, shared) -> logits_fn (as for grad_cam), for one
  replica's params; replica_params has a leading K axis on every leaf (vmapped);
  `shared` (e.g. frozen tower variables) is passed to every replica unbatched.
  targets: 'ensemble' (argmax of the mean softmax over replicas, default),
  'predicted' (each replica's own argmax), 'true' (labels) or an int array (B,).
  Returns cams (K, B, H, W); with details, {'cams', 'maps' (K, B, h, w),
  'logits' (K, B, C), 'targets' (K, B), 'grads', 'fmap', 'probs' (B, C) mean
  softmax over replicas, 'mean_cams' (B, H, W) normalised mean of the cams}.
  Compiled once per (make_logits_fn, method, targets kind) and input shapes:
  reuse make_logits_fn and pad batches to one size. The result is returned
  before it is computed (JAX dispatch is asynchronous), so host work on the
  previous batch overlaps with this one.
  """
  if method not in METHODS:
    raise ValueError(f"unknown CAM method {method!r}; choose from {METHODS}")
  mode, arr = (targets, None) if isinstance(targets, str) else ("given", targets)
  if mode not in TARGETS + ("given",):
    raise ValueError(f"unknown targets {targets!r}; choose from {TARGETS} or an int array")
  if mode == "true" and labels is None:
    raise ValueError("targets='true' needs labels")
  out = _replica_jit(make_logits_fn, method, mode)(
      replica_params, shared, perturbations, images,
      None if arr is None else jnp.asarray(arr, jnp.int32),
      None if labels is None else jnp.asarray(labels, jnp.int32))
  return out if details else out["cams"]


# --- replica agreement ---------------------------------------------------------

def average_ranks(x) -> np.ndarray:
  """Ranks 1..P along the last axis, ties averaged (as scipy.stats.rankdata).

  x (..., P) float -> float64 (..., P). Compared as float32 (Grad-CAM maps
  are float32). One argsort of every row gives the order; a run of equal
  sorted values (a tie) spans sorted positions first..last and gets the
  rank (first + last) / 2 + 1, exact in float32 for P < 2**23.
  """
  x = np.asarray(x, np.float32)
  shape = x.shape
  x = x.reshape(-1, shape[-1]) + np.float32(0.0)  # -0.0 -> +0.0
  if np.isnan(x).any():
    raise ValueError("average_ranks: NaN in the maps")
  n, p = x.shape
  order = np.argsort(x, axis=-1, kind="stable")
  value = np.take_along_axis(x, order, -1)
  pos = np.arange(p, dtype=np.int32)
  starts = np.ones((n, p), bool)
  starts[:, 1:] = value[:, 1:] != value[:, :-1]
  ends = np.ones((n, p), bool)
  ends[:, :-1] = starts[:, 1:]
  first = np.maximum.accumulate(np.where(starts, pos, 0), axis=-1)
  # The last position of each run, found the same way on the reversed rows.
  last = (p - 1) - np.maximum.accumulate(np.where(ends[:, ::-1], pos, 0), axis=-1)[:, ::-1]
  rank = (first + last).astype(np.float32) * np.float32(0.5) + np.float32(1.0)
  out = np.empty((n, p), np.float32)
  np.put_along_axis(out, order, rank, -1)
  return out.astype(np.float64).reshape(shape)


def cam_stability(cams) -> dict:
  """Agreement of K replicas' maps (K, B, H, W): mean pairwise Spearman rank
  correlation per image -> {'mean': float, 'per_image': float64 (B,)}.

  Spearman = Pearson correlation of average ranks (ties get average ranks;
  ReLU zeros are common); all K x K correlations of an image come from one
  matrix product of its centred, unit-norm rank vectors. A pair of constant
  maps counts as 1 (both empty), one constant map against a varying one as 0.
  With K < 2 the scores are NaN.
  """
  c = np.asarray(cams)
  k, b = c.shape[:2]
  if k < 2 or b == 0:
    per = np.full(b, np.nan)
    return {"mean": float(np.mean(per)) if b else float("nan"), "per_image": per}
  # Images are independent: numpy's sorts release the GIL, so threads over
  # groups of images use every core (2x on 2 cores).
  groups = np.array_split(np.arange(b), min(os.cpu_count() or 1, b))
  with ThreadPoolExecutor(len(groups)) as pool:
    per = np.concatenate(list(pool.map(lambda g: _spearman_per_image(c[:, g]), groups)))
  return {"mean": float(np.mean(per)), "per_image": per}


def _spearman_per_image(c) -> np.ndarray:
  """(K, B, H, W) maps, K >= 2 -> (B,) mean pairwise Spearman correlation (cam_stability)."""
  k, b = c.shape[:2]
  r = average_ranks(c.reshape(k, b, -1)).transpose(1, 0, 2)  # (B, K, P)
  r -= r.mean(-1, keepdims=True)
  norm = np.sqrt(np.einsum("bkp,bkp->bk", r, r))  # (B, K); 0 for a constant map
  u = r / np.where(norm > 0, norm, 1.0)[..., None]
  corr = np.clip(u @ u.transpose(0, 2, 1), -1.0, 1.0)  # (B, K, K)
  const = norm == 0
  corr = np.where(const[:, :, None] & const[:, None, :], 1.0, corr)  # both empty: agree
  i, j = np.triu_indices(k, 1)
  return corr[:, i, j].mean(-1)
