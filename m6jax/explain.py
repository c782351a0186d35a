"""Grad-CAM for the conv image towers, computed with jax.grad.

  python -m m6jax.explain --workdir runs/image_only [--csv new.csv --images new/] \\
      [--method gradcam|gradcam++|hirescam] [--n_per_class 3]

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

`replica_cams` does the same for all K seed replicas in one jitted call;
`cam_stability` scores how much the replicas agree; `explain_run` rebuilds a
finished run (frozen or finetune) and writes a gallery + stability report.
"""

from __future__ import annotations

import functools
import json
import logging
import os
from typing import Any, Callable

import jax
import jax.numpy as jnp
import numpy as np

log = logging.getLogger(__name__)

METHODS = ("gradcam", "gradcam++", "hirescam")
TARGETS = ("predicted", "true", "ensemble")


# --- core --------------------------------------------------------------------

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


def _image_of(inputs):
  return inputs["image"] if isinstance(inputs, dict) else inputs


def _only_leaf(tree):
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
  out = _finish(_only_leaf(grads), fmap, logits, t, _image_of(images).shape[1:3], method)
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
    x = tower.preprocess(_image_of(inputs).astype(jnp.float32))
    out = tower.module.apply({**tv, "perturbations": perturbations}, x, train=False)
    return head_apply(out["embedding"], inputs), out["feature_map"]
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
  return _finish(_only_leaf(grads), fmap, logits, t, _image_of(inputs).shape[1:3], method)


@functools.lru_cache(maxsize=8)
def _replica_jit(make_logits_fn, method, target_mode):
  return jax.jit(functools.partial(_replica_impl, make_logits_fn, method, target_mode))


def replica_cams(make_logits_fn: Callable, replica_params, perturbations, images,
                 targets="ensemble", labels=None, method: str = "gradcam", shared=None,
                 details: bool = False):
  """Grad-CAM for all K seed replicas in one jitted call.

  make_logits_fn(params, shared) -> logits_fn (as for grad_cam), for one
  replica's params; replica_params has a leading K axis on every leaf (vmapped);
  `shared` (e.g. frozen tower variables) is passed to every replica unbatched.
  targets: 'ensemble' (argmax of the mean softmax over replicas, default),
  'predicted' (each replica's own argmax), 'true' (labels) or an int array (B,).
  Returns cams (K, B, H, W); with details, {'cams', 'maps' (K, B, h, w),
  'logits' (K, B, C), 'targets' (K, B), 'grads', 'fmap'}. Compiled once per
  (make_logits_fn, method, targets kind) and input shapes: reuse make_logits_fn.
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


def cam_stability(cams) -> dict:
  """Agreement of K replicas' maps (K, B, H, W): mean pairwise Spearman rank
  correlation per image -> {'mean': float, 'per_image': float64 (B,)}.

  Ties get average ranks (ReLU zeros are common). A pair of constant maps
  counts as 1 (both empty), one constant map against a varying one as 0.
  With K < 2 the scores are NaN.
  """
  from scipy import stats
  c = np.asarray(cams, np.float64)
  k, b = c.shape[:2]
  ranks = stats.rankdata(c.reshape(k, b, -1), axis=-1)
  ranks -= ranks.mean(-1, keepdims=True)
  norm = np.sqrt(np.sum(ranks * ranks, -1))  # (K, B); 0 for a constant map
  per, pairs = np.zeros(b), 0
  for i in range(k):
    for j in range(i + 1, k):
      num = np.sum(ranks[i] * ranks[j], -1)
      den = norm[i] * norm[j]
      both_const = (norm[i] == 0) & (norm[j] == 0)
      r = np.where(den > 0, num / np.where(den > 0, den, 1.0), np.where(both_const, 1.0, 0.0))
      per += np.clip(r, -1.0, 1.0)
      pairs += 1
  per = per / pairs if pairs else np.full(b, np.nan)
  return {"mean": float(np.mean(per)) if b else float("nan"), "per_image": per}


# --- pictures ----------------------------------------------------------------

def overlay(image, cam, alpha: float = 0.45):
  """uint8 (H, W, 3) + cam (H, W) in [0, 1] -> uint8 (H, W, 3), jet heat map blended in."""
  from matplotlib import colormaps
  heat = colormaps["jet"](np.clip(np.asarray(cam, np.float64), 0, 1))[..., :3] * 255.0
  out = (1.0 - alpha) * np.asarray(image, np.float64) + alpha * heat
  return np.clip(np.round(out), 0, 255).astype(np.uint8)


def gallery(images, cams, labels, preds, class_names, path: str, per_class: int = 3,
            title: str | None = None, alpha: float = 0.45) -> str:
  """Overlays grouped by class, saved as a PNG at `path`.

  images uint8 (N, H, W, 3), cams (N, H, W), preds (N,). With labels (N,):
  per true class one row of correct predictions and one of wrong ones (up to
  `per_class` each; cell title 'true / pred'). labels None: one row per
  predicted class. Returns path.
  """
  from matplotlib.backends.backend_agg import FigureCanvasAgg
  from matplotlib.figure import Figure
  preds = np.asarray(preds)
  rows = []  # (row label, indices)
  for c, name in enumerate(class_names):
    if labels is None:
      rows.append((f"pred {name}", np.flatnonzero(preds == c)[:per_class]))
      continue
    lab = np.asarray(labels)
    rows.append((f"{name}\ncorrect", np.flatnonzero((lab == c) & (preds == c))[:per_class]))
    rows.append((f"{name}\nwrong", np.flatnonzero((lab == c) & (preds != c))[:per_class]))
  if title:
    import textwrap
    title = textwrap.fill(title, int(14 * per_class + 6))
  title_h = 0.18 * (title.count("\n") + 1) + 0.15 if title else 0.0  # inches
  height = 2.4 * len(rows) + title_h
  fig = Figure(figsize=(2.3 * per_class + 1.2, height))
  FigureCanvasAgg(fig)
  axes = fig.subplots(len(rows), per_class, squeeze=False)
  for r, (row_name, idx) in enumerate(rows):
    for j in range(per_class):
      ax = axes[r, j]
      ax.set_xticks([])
      ax.set_yticks([])
      if j == 0:
        ax.set_ylabel(_short(row_name, 22), fontsize=8)
      if j >= len(idx):
        ax.text(0.5, 0.5, "none" if j == 0 else "", ha="center", va="center", fontsize=8,
                color="0.5", transform=ax.transAxes)
        for s in ax.spines.values():
          s.set_color("0.85")
        continue
      i = int(idx[j])
      ax.imshow(overlay(images[i], cams[i], alpha))
      pred = _short(class_names[int(preds[i])], 18)
      text = (f"pred: {pred}" if labels is None else
              f"true: {_short(class_names[int(labels[i])], 18)}\npred: {pred}")
      ax.set_title(text, fontsize=7,
                   color="black" if labels is None or labels[i] == preds[i] else "firebrick")
  if title:
    fig.suptitle(title, fontsize=8)
  fig.tight_layout(rect=(0, 0, 1, 1 - title_h / height))  # keep the title clear of row 1
  os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
  fig.savefig(path, dpi=80)
  return path


def _short(s: str, n: int) -> str:
  return s if len(s) <= n else s[: n - 1] + "…"


# --- a finished run ----------------------------------------------------------

def _frozen_head(head, mods):
  """head_apply(params, image_embedding, inputs) -> logits for frozen runs (FusionHead)."""
  def head_apply(params, emb, inputs):
    e = {"image": emb}
    if "text" in mods:
      e["text"] = inputs["text_embedding"]  # held fixed: no gradient flows to it
    return head.apply({"params": params}, e, train=False)["logits"]
  return head_apply


def explain_run(workdir: str, n_per_class: int = 3, method: str = "gradcam", csv=None,
                images=None, which: str = "best", maps: str = "mean") -> dict:
  """Grad-CAM gallery and replica stability for a finished run.

  Rebuilds the run like m6jax.predict (m6jax.restore), takes the test
  split (or new products from `csv` + `images`), computes every replica's map
  with the ensemble prediction as target, and writes
  `<workdir>/gradcam/gallery.png` (maps: 'mean' over replicas or 'replica0')
  and `<workdir>/gradcam/stability.json`.
  Returns {'stability': mean over images, 'gallery': path, 'report': path,
  'accuracy': ensemble accuracy (None without labels), 'n': images explained,
  'probs': (n, C) ensemble probabilities, 'uniq_id': their ids}.
  """
  from m6jax import restore
  from m6jax.data import catalogue, pipeline
  from m6jax.models import fusion, towers

  if maps not in ("mean", "replica0"):
    raise ValueError(f"maps must be 'mean' or 'replica0', got {maps!r}")
  cfg = restore.load_config(workdir)
  mods = fusion.modalities(cfg.model.fusion)
  if "image" not in mods:
    raise ValueError(f"run {workdir} has no image tower (fusion {cfg.model.fusion!r})")
  cfg, run, params, stats = restore.restore(workdir, which)
  bs, size = cfg.data.batch_size, cfg.data.image_size

  # Rows: the test split, or new products read as predict reads them.
  if csv is None:
    split = "test"
    ids, labels = run.cols["test"]["uniq_id"], np.asarray(run.cols["test"]["label"])
    batches = pipeline.batches(run.builder.as_data_source("test"), bs, size)
    text = (run.feats["text"]["test"] if cfg.train.mode == "frozen" and "text" in mods
            else None)
  else:
    split = "new"
    rows, report = catalogue.read_catalogue(
        csv, images, dict(cfg.data.columns), cfg.data.label_depth,
        max_image_pixels=cfg.data.max_image_pixels, require_label=False)
    if report.bad:
      log.warning("%d of %d rows skipped:\n%s", len(report.bad), report.total_rows,
                  report.summary())
    if not rows:
      raise catalogue.DataError(f"no usable rows in {csv}")
    ids = [r.uniq_id for r in rows]
    index = {c: i for i, c in enumerate(run.class_names)}
    known = [r.category in index for r in rows]
    labels = np.asarray([index[r.category] for r in rows]) if all(known) else None
    batches = pipeline.row_batches(rows, cfg.data, bs)
    text = None
    if "text" in mods and (cfg.train.mode == "frozen" or run.text_features is not None):
      text = run.text_features_for([r.text for r in rows])
      if cfg.train.mode == "finetune":
        run.trainer.text_lookup["new"] = dict(zip(ids, text))

  if cfg.train.mode == "frozen":
    tower = towers.image_tower(cfg.model.image.name, cfg.model.image.weights, size,
                               seed=cfg.seed)
    head_apply = _frozen_head(run.trainer.head, mods)
    make = lambda p, tv: image_logits_fn(tower, functools.partial(head_apply, p), tv)  # noqa: E731
    replica_params, shared = params, tower.variables
    x0 = tower.preprocess(jnp.zeros((bs, size, size, 3), jnp.float32))
    pert = zero_perturbations(tower.module, tower.variables, x0, train=False)

    def inputs_of(b, start):
      out = {"image": b["image"]}
      if text is not None:
        t = np.zeros((bs, text.shape[1]), np.float32)
        n = int(b["mask"].sum())
        t[:n] = text[start:start + n]
        out["text_embedding"] = t
      return out
  else:
    model = run.trainer.model
    make = lambda v, _: classifier_logits_fn(model, v)  # noqa: E731
    replica_params, shared = {"params": params, "batch_stats": stats}, None
    first = jax.tree.map(lambda a: a[0], replica_params)
    pert = None
    inputs_of = lambda b, start: run.trainer.inputs(b, split)  # noqa: E731

  k = cfg.seeds
  per_image, preds, probs_all = [], [], []
  picks = {}  # (class, correct?) -> [(image, cam)], filled up to n_per_class
  start = 0
  for b in batches:
    inp = inputs_of(b, start)
    if pert is None:
      pert = zero_perturbations(model, first, jax.tree.map(jnp.asarray, inp), train=False)
    out = replica_cams(make, replica_params, pert, inp, targets="ensemble", method=method,
                       shared=shared, details=True)
    m = np.asarray(b["mask"])
    n = int(m.sum())
    cams = np.asarray(out["cams"])[:, m]
    probs = np.asarray(jax.nn.softmax(out["logits"], -1))[:, m].mean(0)
    pr = np.asarray(out["targets"])[0, m]
    per_image.append(cam_stability(cams)["per_image"])
    preds.append(pr)
    probs_all.append(probs)
    shown = normalize(jnp.mean(cams, 0)) if maps == "mean" else cams[0]
    shown = np.asarray(shown)
    for i in range(n):
      row = start + i
      key = (int(pr[i]), True) if labels is None else (
          int(labels[row]), bool(labels[row] == pr[i]))
      bucket = picks.setdefault(key, [])
      if len(bucket) < n_per_class:
        bucket.append((np.asarray(b["image"][m][i]), shown[i], row))
    start += n

  per_image = np.concatenate(per_image)
  preds = np.concatenate(preds)
  acc = None if labels is None else float(np.mean(preds == labels))
  sel = sorted((r for bucket in picks.values() for r in bucket), key=lambda t: t[2])
  out_dir = os.path.join(workdir, "gradcam")
  os.makedirs(out_dir, exist_ok=True)
  which_maps = (f"mean of {k} replicas' maps" if maps == "mean" else f"replica 0 of {k}")
  stab = float(np.mean(per_image)) if len(per_image) else float("nan")
  title = (f"{method} ({which_maps}), target = ensemble prediction; {cfg.model.image.name}, "
           f"{split} split; replica stability (Spearman) {stab:.3f}")
  g = gallery(np.stack([s[0] for s in sel]), np.stack([s[1] for s in sel]),
              None if labels is None else labels[[s[2] for s in sel]],
              preds[[s[2] for s in sel]], run.class_names, os.path.join(out_dir, "gallery.png"),
              per_class=n_per_class, title=title)
  finite = lambda v: None if not np.isfinite(v) else float(v)  # noqa: E731
  rep = {
      "method": method, "target": "ensemble prediction", "maps_in_gallery": maps,
      "replicas": k, "split": split, "image_tower": cfg.model.image.name,
      "mode": cfg.train.mode, "checkpoint": which, "n_images": int(len(per_image)),
      "stability_mean_spearman": finite(stab), "ensemble_accuracy": acc,
      "per_class": {c: finite(np.mean(per_image[(labels if labels is not None else preds) == i]))
                    for i, c in enumerate(run.class_names)
                    if np.any((labels if labels is not None else preds) == i)},
      "per_image": [{"uniq_id": u, "pred": run.class_names[int(p)],
                     "label": None if labels is None else run.class_names[int(labels[j])],
                     "stability": finite(s)}
                    for j, (u, p, s) in enumerate(zip(ids, preds, per_image))],
  }
  rpath = os.path.join(out_dir, "stability.json")
  with open(rpath + ".tmp", "w") as f:
    json.dump(rep, f, indent=1)
  os.replace(rpath + ".tmp", rpath)
  log.info("Grad-CAM (%s) of %d images: replica stability %.4f; gallery %s", method,
           len(per_image), stab, g)
  return {"stability": stab, "gallery": g, "report": rpath, "accuracy": acc,
          "n": int(len(per_image)), "probs": np.concatenate(probs_all), "uniq_id": ids}


# --- CLI -----------------------------------------------------------------------

def _define_flags():
  # Defined only when run as a script: m6jax.predict owns flags of the same names.
  from absl import flags
  flags.DEFINE_string("workdir", None, "a finished training run")
  flags.DEFINE_string("csv", None, "optional catalogue CSV of new products (else the test split)")
  flags.DEFINE_string("images", None, "folder with the new products' images")
  flags.DEFINE_enum("method", "gradcam", list(METHODS), "CAM method")
  flags.DEFINE_integer("n_per_class", 3, "gallery images per class and row")
  flags.DEFINE_enum("maps", "mean", ["mean", "replica0"], "gallery maps")
  flags.DEFINE_enum("checkpoint", "best", ["best", "latest"], "which saved parameters")
  flags.mark_flags_as_required(["workdir"])


def main(argv):
  del argv
  from absl import flags
  from absl import logging as absl_logging
  absl_logging.set_verbosity(absl_logging.INFO)
  f = flags.FLAGS
  if (f.csv is None) != (f.images is None):
    from absl import app
    raise app.UsageError("--csv and --images go together")
  res = explain_run(f.workdir, f.n_per_class, f.method, f.csv, f.images, f.checkpoint, f.maps)
  print(json.dumps({"stability": res["stability"], "gallery": res["gallery"],
                    "report": res["report"], "accuracy": res["accuracy"], "n": res["n"]}))


if __name__ == "__main__":
  from absl import app
  _define_flags()
  app.run(main)
