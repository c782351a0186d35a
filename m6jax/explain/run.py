"""Explain a finished run: Grad-CAM gallery and replica stability.

  python -m m6jax.explain.run --workdir runs/default [--csv new.csv --images new/] \\
      [--method gradcam|gradcam++|hirescam] [--n_per_class 3] [--out DIR [--overwrite]]

The CLI never overwrites a run's outputs: it writes gallery.png and
stability.json into --out, by default a new folder
`<workdir>/explain/<YYYYmmdd-HHMMSS>/`, and refuses an --out that already holds
them unless --overwrite; it never touches results.json. The training run
itself (m6jax.experiment) writes `<workdir>/gradcam/`.

The maths is in m6jax.explain.gradcam, the pictures in m6jax.explain.gallery.
"""

from __future__ import annotations

import functools
import json
import logging
import os
import time

import jax
import jax.numpy as jnp
import numpy as np

from m6jax import files, memory
from m6jax import mesh as mesh_lib
from m6jax.data import catalogue, pipeline
from m6jax.evaluate import sampling
from m6jax.explain import gallery as gallery_lib
from m6jax.explain import gradcam, multimodal  # multimodal: words, modality split
from m6jax.inference.restore import restore  # the one call into "rebuild a finished run"
from m6jax.models import fusion, towers

log = logging.getLogger(__name__)

MAPS = ("mean", "replica0")
OUTPUTS = ("gallery.png", "stability.json")


def output_dir(workdir: str, out: str | None = None, overwrite: bool = False) -> str:
  """Where explain writes for the CLI and for new products.

  out None: a new folder `<workdir>/explain/<YYYYmmdd-HHMMSS>[-n]`, created here,
  so two calls never share one. An `out` that already holds gallery.png or
  stability.json raises ValueError unless `overwrite`.
  """
  if out is not None:
    clash = [n for n in OUTPUTS if os.path.exists(os.path.join(out, n))]
    if clash and not overwrite:
      raise ValueError(f"{out} already holds {', '.join(clash)}: choose another output "
                       "folder or pass --overwrite")
    return out
  base = os.path.join(workdir, "explain", time.strftime("%Y%m%d-%H%M%S"))
  os.makedirs(os.path.dirname(base), exist_ok=True)
  path, n = base, 1
  while True:
    try:
      os.mkdir(path)
      return path
    except FileExistsError:
      path, n = f"{base}-{n}", n + 1


def _frozen_head(head, mods):
  """head_apply(params, image_embedding, inputs) -> logits for frozen runs (FusionHead)."""
  def head_apply(params, emb, inputs):
    e = {"image": emb}
    if "text" in mods:
      e["text"] = inputs["text_embedding"]  # held fixed: no gradient flows to it
    return head.apply({"params": params}, e, train=False)["logits"]
  return head_apply


def _rows(cfg, run, mods, csv, images):
  """-> (split name, ids, labels (n,) or None, batches, text features (n, D) or None,
  texts (n,), sample record) of the n products explained: a stratified sample of at
  most cfg.explain.sample of the test split or the new rows (sampling.explain_sample),
  so the cost is flat in catalogue size; only their photos are read.

  run: the run's data side (m6jax.features.prepare.Setup in memory, or a restored
  m6jax.inference.restore.Inference): class_names, cols, builder, feats, and for new
  products text_features / text_features_for.
  """
  bs, size = cfg.data.batch_size, cfg.data.image_size
  if csv is None:
    cols = run.cols["test"]
    idx, sample = sampling.explain_sample(cfg, np.asarray(cols["label"]))
    ids, labels = [cols["uniq_id"][i] for i in idx], np.asarray(cols["label"])[idx]
    texts = [cols["text"][i] for i in idx]
    batches = pipeline.batches(sampling.Subset(run.builder.as_data_source("test"), idx),
                               bs, size)
    text = None
    if cfg.train.mode == "frozen" and "text" in mods:
      # A restored run computes text features on demand: only the sample's.
      text = (run.text_features_for(texts) if hasattr(run, "text_features_for")
              else np.asarray(run.feats["text"]["test"])[idx])
    return "test", ids, labels, batches, text, texts, sample
  rows, report = catalogue.read_catalogue(
      csv, images, dict(cfg.data.columns), cfg.data.label_depth,
      max_image_pixels=cfg.data.max_image_pixels, require_label=False)
  if report.bad:
    log.warning("%d of %d rows skipped:\n%s", len(report.bad), report.total_rows,
                report.summary())
  if not rows:
    raise catalogue.DataError(f"no usable rows in {csv}")
  index = {c: i for i, c in enumerate(run.class_names)}
  idx, sample = sampling.explain_sample(cfg, [index.get(r.category, -1) for r in rows])
  rows = [rows[i] for i in idx]
  ids = [r.uniq_id for r in rows]
  known = [r.category in index for r in rows]
  labels = np.asarray([index[r.category] for r in rows]) if all(known) else None
  # Finetune runs compute a new row's TF-IDF features in model.inputs, row by row.
  text = (run.text_features_for([r.text for r in rows])
          if "text" in mods and cfg.train.mode == "frozen" else None)
  return ("new", ids, labels, pipeline.row_batches(rows, cfg.data, bs), text,
          [r.text for r in rows], sample)


def cam_model(cfg, model, params, stats, mods, split, text):
  """-> (make_logits_fn, replica params, shared, inputs_of(batch, start)).

  model: the run's model side (the trainer in memory, or the restored Inference):
  `head` (frozen) or `model` and `inputs(batch, split)` (finetune), the same
  prediction path (m6jax.train.predictions) either way. Frozen runs: the image
  tower's feature map (one program for every head, ImageTower.feature_map) feeds
  each replica's head, with the product's text embedding held fixed. Finetune
  runs: each replica's whole Classifier.
  """
  bs, size = cfg.data.batch_size, cfg.data.image_size
  if cfg.train.mode == "frozen":
    tower = towers.image_tower(cfg.model.image.name, cfg.model.image.weights, size,
                               seed=cfg.seed)
    head_apply = _frozen_head(model.head, mods)
    feature_map = tower.feature_map
    make = lambda p, _: gradcam.pooled_logits_fn(  # noqa: E731
        tower, functools.partial(head_apply, p))

    def inputs_of(b, start):
      out = {"image": b["image"], "feature_map": feature_map(tower.variables, b["image"])}
      if text is not None:
        t = np.zeros((bs, text.shape[1]), np.float32)
        n = int(b["mask"].sum())
        t[:n] = text[start:start + n]
        out["text_embedding"] = t
      return out
    return make, params, None, inputs_of
  make = lambda v, _: gradcam.classifier_logits_fn(model.model, v)  # noqa: E731
  return (make, {"params": params, "batch_stats": stats}, None,
          lambda b, start: model.inputs(b, split))


class _Maps:
  """Every replica's maps of a stream of batches, with the ensemble prediction as target:
  per-image stability, predictions, probabilities and the gallery's picks."""

  def __init__(self, model, cam, labels, method: str, maps: str, n_per_class: int,
               keep: bool = True):
    self.make, self.params, self.shared, self.inputs_of = cam
    self.model, self.labels, self.method = model, labels, method
    self.maps, self.n_per_class = maps, n_per_class
    self.pert = None
    self.per_image, self.preds, self.probs = [], [], []
    self.picks = {}   # (class, correct?) -> [(image, cam, row)], up to n_per_class
    self.keep = keep  # (images, shown maps) of every batch (of the sample), for the
    self.kept = []    # word/modality explanations
    self.t_stab = 0.0

  def dispatch(self, b, start):
    inp = self.inputs_of(b, start)
    if self.pert is None and "feature_map" in inp:   # frozen: zeros like the feature map
      self.pert = jnp.zeros(inp["feature_map"].shape, inp["feature_map"].dtype)
    elif self.pert is None:  # finetune: the Classifier's perturbations, for this batch shape
      first = jax.tree.map(lambda a: a[0], self.params)
      self.pert = gradcam.zero_perturbations(self.model.model, first,
                                             jax.tree.map(jnp.asarray, inp), train=False)
    return gradcam.replica_cams(self.make, self.params, self.pert, inp, targets="ensemble",
                                method=self.method, shared=self.shared, details=True)

  def consume(self, b, start, out):
    m = np.asarray(b["mask"])
    cams = np.asarray(out["cams"])[:, m]  # waits for this batch's device work
    ts = time.perf_counter()
    self.per_image.append(gradcam.cam_stability(cams)["per_image"])
    self.t_stab += time.perf_counter() - ts
    pr = np.asarray(out["targets"])[0, m]
    self.preds.append(pr)
    self.probs.append(np.asarray(out["probs"])[m])
    shown = np.asarray(out["mean_cams"])[m] if self.maps == "mean" else cams[0]
    imgs = np.asarray(b["image"])[m]
    if self.keep:
      self.kept.append((imgs, shown))
    labels = self.labels
    for i in range(int(m.sum())):
      row = start + i
      key = (int(pr[i]), True) if labels is None else (
          int(labels[row]), bool(labels[row] == pr[i]))
      bucket = self.picks.setdefault(key, [])
      if len(bucket) < self.n_per_class:
        bucket.append((imgs[i], shown[i], row))

  def run(self, batches) -> None:
    """Batch i+1 is dispatched before batch i's host work (stability, picks), so
    the two overlap: JAX returns before the device has finished."""
    def numbered():   # (batch, its first row)
      start = 0
      for b in batches:
        yield b, start
        start += int(np.asarray(b["mask"]).sum())

    pipeline.overlapped(numbered(), lambda bs: self.dispatch(*bs),
                        lambda bs, out: self.consume(*bs, out))
    self.per_image = np.concatenate(self.per_image)
    self.preds = np.concatenate(self.preds)
    self.probs = np.concatenate(self.probs)


def _draw_gallery(cfg, class_names, mp: _Maps, labels, path, title, captions=None) -> None:
  """gallery.png of the picked images (correct and wrong per class), by row order."""
  preds = mp.preds
  by = labels if labels is not None else preds
  counts = {c: (int(np.sum((by == c) & (preds == c))), int(np.sum((by == c) & (preds != c))))
            for c in range(len(class_names))}
  sel = sorted((r for bucket in mp.picks.values() for r in bucket), key=lambda t: t[2])
  rows = [s[2] for s in sel]
  gallery_lib.gallery(
      np.stack([s[0] for s in sel]), np.stack([s[1] for s in sel]),
      None if labels is None else labels[rows], preds[rows], class_names,
      path, per_class=mp.n_per_class, title=title, probs=mp.probs[rows, preds[rows]],
      counts=counts, captions=None if captions is None else [captions[r] for r in rows])


def _report(cfg, class_names, mp: _Maps, ids, labels, split, which, timings) -> dict:
  """stability.json: the method, per-class and per-image replica stability."""
  finite = lambda v: None if not np.isfinite(v) else float(v)  # noqa: E731
  per_image, preds = mp.per_image, mp.preds
  by = labels if labels is not None else preds
  stab = float(np.mean(per_image)) if len(per_image) else float("nan")
  return {
      "method": mp.method, "target": "ensemble prediction", "maps_in_gallery": mp.maps,
      "replicas": cfg.seeds, "split": split, "image_tower": cfg.model.image.name,
      "mode": cfg.train.mode, "checkpoint": which, "n_images": int(len(per_image)),
      "stability_mean_spearman": finite(stab),
      "ensemble_accuracy": None if labels is None else float(np.mean(preds == labels)),
      "per_class": {c: finite(np.mean(per_image[by == i]))
                    for i, c in enumerate(class_names) if np.any(by == i)},
      # seconds; 'stability' is host time inside 'gradcam' (overlapped with the maps)
      "timings": timings,
      "per_image": [{"uniq_id": u, "pred": class_names[int(p)],
                     "label": None if labels is None else class_names[int(labels[j])],
                     "stability": finite(s)}
                    for j, (u, p, s) in enumerate(zip(ids, preds, per_image))],
  }


def explain(cfg, run, model, params, stats, out_dir: str, *, n_per_class: int = 3,
            method: str = "gradcam", csv=None, images=None, which: str = "best",
            maps: str = "mean", t0: float | None = None, words_model=None) -> dict:
  """Grad-CAM gallery and replica stability of a run's states into `out_dir`.

  run / model: the run's data and model sides (`_rows`, `cam_model`): a
  m6jax.features.prepare.Setup and its trainer (the states just trained, as the
  experiment scores them), or a restored Inference twice. params / stats: the
  replicas' parameters (K, ...) (host or single-device arrays). Takes a stratified
  sample of at most cfg.explain.sample products of the test split (or of the new
  products from `csv` + `images`), computes every replica's map with
  the ensemble prediction as target, and writes `<out_dir>/gallery.png` (maps:
  'mean' over replicas or 'replica0') and `<out_dir>/stability.json`.
  Returns {'stability': mean over images, 'gallery': path, 'report': path,
  'accuracy': ensemble accuracy (None without labels), 'n': images explained,
  'probs': (n, C) ensemble probabilities, 'uniq_id': their ids,
  'timings': {phase: seconds}, 'explain': words, modality split and deletion curves
  (m6jax.explain.multimodal) or None, 'sample': {'rows', 'of', 'seed', 'stratified_by'}
  (m6jax.evaluate.sampling)}. words_model: the restored Inference that gives
  the towers for the word/modality explanations (None: none computed).
  """
  if maps not in MAPS:
    raise ValueError(f"maps must be one of {MAPS}, got {maps!r}")
  if method not in gradcam.METHODS:
    raise ValueError(f"unknown CAM method {method!r}; choose from {gradcam.METHODS}")
  t0 = time.perf_counter() if t0 is None else t0
  mods = fusion.modalities(cfg.model.fusion)
  if "image" not in mods:
    raise ValueError(f"the run has no image tower (fusion {cfg.model.fusion!r})")
  split, ids, labels, batches, text, texts, sample = _rows(cfg, run, mods, csv, images)
  cam = cam_model(cfg, model, params, stats, mods, split, text)
  t_restore = time.perf_counter()
  mp = _Maps(model, cam, labels, method, maps, n_per_class, keep=words_model is not None)
  mp.run(batches)
  t_maps = time.perf_counter()
  stab = float(np.mean(mp.per_image)) if len(mp.per_image) else float("nan")
  k = cfg.seeds
  which_maps = f"mean of {k} replicas' maps" if maps == "mean" else f"replica 0 of {k}"
  title = (f"{method} ({which_maps}), target = ensemble prediction; {cfg.model.image.name}, "
           f"{split} split ({sample['rows']} of {sample['of']} products); "
           f"replica stability (Spearman) {stab:.3f}")
  expl, caps = None, None
  if words_model is not None:
    os.makedirs(out_dir, exist_ok=True)
    expl, caps = multimodal.explain_split(
        cfg, words_model, params, split, ids, labels, mp.preds,
        np.concatenate([k[0] for k in mp.kept]), np.concatenate([k[1] for k in mp.kept]),
        text, out_dir, keep=[r[2] for bucket in mp.picks.values() for r in bucket],
        texts=texts)
  t_words = time.perf_counter()
  g = os.path.join(out_dir, "gallery.png")
  if mesh_lib.is_writer():   # every process computes the maps; one writes them
    os.makedirs(out_dir, exist_ok=True)
    _draw_gallery(cfg, run.class_names, mp, labels, g, title, caps)
  t_gallery = time.perf_counter()
  timings = {"restore": t_restore - t0, "gradcam": t_maps - t_restore,
             "stability": mp.t_stab, "words": t_words - t_maps, "gallery": t_gallery - t_words,
             "total": t_gallery - t0}
  rep = _report(cfg, run.class_names, mp, ids, labels, split, which, timings)
  rep["sample"] = sample
  rpath = os.path.join(out_dir, "stability.json")
  if mesh_lib.is_writer():
    files.write_json(rpath, rep)
  log.info("Grad-CAM (%s) of %d images: replica stability %.4f; gallery %s (%.1f s)", method,
           len(mp.per_image), stab, g, timings["total"])
  return {"stability": stab, "gallery": g, "report": rpath, "accuracy": rep["ensemble_accuracy"],
          "n": int(len(mp.per_image)), "probs": mp.probs, "uniq_id": ids, "timings": timings,
          "explain": expl, "sample": sample}


def explain_run(workdir: str, n_per_class: int = 3, method: str = "gradcam", csv=None,
                images=None, which: str = "best", maps: str = "mean",
                out_dir: str | None = None) -> dict:
  """`explain` of a finished run, rebuilt from its bundle and checkpoint like
  m6jax.inference.predict. out_dir None: `<workdir>/gradcam` for the test split
  (the run's own outputs), a new folder (`output_dir`) for new products."""
  if maps not in MAPS:
    raise ValueError(f"maps must be one of {MAPS}, got {maps!r}")
  if method not in gradcam.METHODS:
    raise ValueError(f"unknown CAM method {method!r}; choose from {gradcam.METHODS}")
  t0 = time.perf_counter()
  cfg, run, params, stats = restore(workdir, which)
  if "image" not in fusion.modalities(cfg.model.fusion):
    raise ValueError(f"run {workdir} has no image tower (fusion {cfg.model.fusion!r})")
  if out_dir is None:
    out_dir = os.path.join(workdir, "gradcam") if csv is None else output_dir(workdir)
  return explain(cfg, run, run, params, stats, out_dir, n_per_class=n_per_class,
                 method=method, csv=csv, images=images, which=which, maps=maps, t0=t0,
                 words_model=run if cfg.explain.words else None)


# --- CLI -----------------------------------------------------------------------

def _define_flags():
  # Defined only when run as a script: m6jax.inference.predict owns flags of the same names.
  from absl import flags
  flags.DEFINE_string("workdir", None, "a finished training run")
  flags.DEFINE_string("csv", None, "optional catalogue CSV of new products (else the test split)")
  flags.DEFINE_string("images", None, "folder with the new products' images")
  flags.DEFINE_enum("method", "gradcam", list(gradcam.METHODS), "CAM method")
  flags.DEFINE_integer("n_per_class", 3, "gallery images per class, correct and wrong each")
  flags.DEFINE_enum("maps", "mean", list(MAPS), "gallery maps")
  flags.DEFINE_enum("checkpoint", "best", ["best", "latest"], "which saved parameters")
  flags.DEFINE_string("out", None, "output folder (default: a new <workdir>/explain/<time>/)")
  flags.DEFINE_bool("overwrite", False, "allow replacing gallery.png / stability.json in --out")
  flags.mark_flags_as_required(["workdir"])


def main(argv):
  del argv
  from absl import app, flags
  from absl import logging as absl_logging
  memory.return_large_frees_to_os()
  absl_logging.set_verbosity(absl_logging.INFO)
  f = flags.FLAGS
  if (f.csv is None) != (f.images is None):
    raise app.UsageError("--csv and --images go together")
  try:
    out = output_dir(f.workdir, f.out, f.overwrite)
  except ValueError as e:
    raise app.UsageError(str(e)) from None
  res = explain_run(f.workdir, f.n_per_class, f.method, f.csv, f.images, f.checkpoint, f.maps,
                    out_dir=out)
  print(json.dumps({"stability": res["stability"], "gallery": res["gallery"],
                    "report": res["report"], "accuracy": res["accuracy"], "n": res["n"],
                    "timings": res["timings"]}))


if __name__ == "__main__":
  from absl import app
  _define_flags()
  app.run(main)
