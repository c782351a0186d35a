"""Both modalities explained together, for a finished run's products.

`explain_products` ties m6jax.explain.text (which words), m6jax.explain.modality
(which modality) and m6jax.explain.faithfulness (are they faithful) to a run
restored with m6jax.inference.restore. Frozen runs (the head sees the towers'
embeddings): the BERT tower is loaded for integrated gradients through
tower + pooling + head; TF-IDF runs with a linear head get exact term
contributions. Used by m6jax.explain.run (the test split, results.json
'explain') and by `m6jax.inference.predict --explain` (per-row columns).
"""

from __future__ import annotations

import csv
import logging
import os

import jax
import numpy as np

from m6jax import files
from m6jax import mesh as mesh_lib
from m6jax.data import pipeline
from m6jax.evaluate import sampling
from m6jax.explain import faithfulness, modality
from m6jax.explain import text as text_lib
from m6jax.features import embed

log = logging.getLogger(__name__)

TOP = 5   # words per product in captions and predict columns


def text_explainer(cfg, run, params):
  """BertText / TfidfText for a frozen run whose head reads text; None (logged) otherwise."""
  if "text" not in run.mods or not cfg.explain.words:
    return None
  if run.mode != "frozen":
    log.warning("text attributions: only frozen runs are explained (this run is %s)", run.mode)
    return None
  ex = cfg.explain
  if run.text_features is not None:
    try:
      return text_lib.TfidfText(run.text_features, run.head, run.mods, params,
                                cfg.model.norm)
    except ValueError as e:
      log.warning("text attributions skipped: %s", e)
      return None
  return text_lib.BertText(run.text_tower, run.head, run.mods, params, cfg.data.max_text_length,
                           ex.ig_steps, ex.ig_baseline)


def probs_fn(run, params):
  """feats {modality: (N, D)} -> (N, C) ensemble probabilities (frozen runs)."""
  return lambda feats: run.ensemble(run.predict_features(params, feats)[0])


def image_embeddings(run, images) -> np.ndarray:
  """uint8 (N, S, S, 3) -> (N, Di) frozen image embeddings, in batches of data.batch_size."""
  bs = run.data_cfg.batch_size
  return embed.embed_image_batches(
      run.image_tower, (pipeline.image_batch(images[s:s + bs], bs)
                        for s in range(0, len(images), bs)))


def caption(item, split=None, n: int = 3) -> str:
  """'words: a, b, c' and 'text 0.82 | image 0.18' lines for a gallery tile."""
  lines = []
  if item is not None and item.words:
    lines.append("words: " + ", ".join(w for w, _ in item.top(n)))
  if split is not None and np.isfinite(split[0]):
    lines.append(f"text {split[0]:.2f} | image {split[1]:.2f}")
  return "\n".join(lines)


def explain_products(cfg, run, params, texts, targets, images=None, maps=None,
                     text_feats=None, image_emb=None, faithful: bool = False) -> dict:
  """Words, modality split and (faithful) faithfulness for N products of a frozen run.

  texts (N,) str; targets (N,) the ensemble's predicted classes; images uint8
  (N, S, S, 3) and maps (N, S, S) Grad-CAM (needed for the image deletion);
  text_feats / image_emb: the run's embeddings when known (else computed).
  -> {'items': [Explained or None], 'modality': modality.split(...) or None,
  'summary': {'text': {...}, 'image': {...}, 'modality': {...}}}.
  """
  mods, probs_of = run.mods, probs_fn(run, params)
  if "image" in mods and image_emb is None and images is not None:
    image_emb = image_embeddings(run, images)
  if "text" in mods and text_feats is None:
    text_feats = run.text_features_for(list(texts))
  feats = {m: v for m, v in (("text", text_feats), ("image", image_emb)) if m in mods}
  out = {"items": [None] * len(texts), "modality": None, "summary": {}}
  if len(mods) == 2:
    out["modality"] = modality.split(probs_of, feats, targets)
    out["summary"]["modality"] = modality.summary(out["modality"])
  explainer = text_explainer(cfg, run, params)
  if explainer is not None:
    out["items"] = explainer.explain(texts, image_emb if "image" in mods else None, targets)
    s = out["summary"]["text"] = {"method": type(explainer).__name__}
    if isinstance(explainer, text_lib.BertText):
      s |= {"steps": cfg.explain.ig_steps, "baseline": cfg.explain.ig_baseline}
    if faithful:
      if isinstance(explainer, text_lib.BertText):
        s["completeness"] = faithfulness.completeness(out["items"])
      with_img = lambda t: probs_of(dict(feats, text=t))  # noqa: E731
      s["deletion"] = faithfulness.text_deletion(explainer, out["items"], with_img, targets,
                                                 seed=cfg.seed)
  if faithful and images is not None and maps is not None and "image" in mods:
    def of_images(imgs):
      return probs_of(dict(feats, image=image_embeddings(run, imgs)))
    tower = run.image_tower
    grid = jax.eval_shape(tower.feature_map, tower.variables, images[:1]).shape[1:3]
    out["summary"]["image"] = {"deletion": faithfulness.image_deletion(
        images, maps, of_images, targets, grid, seed=cfg.seed)}
  return out


def shares(res: dict, i: int) -> tuple[float, float]:
  """(text share, image share) of product i, NaN when the run is single-modality."""
  if res["modality"] is None:
    return float("nan"), float("nan")
  s = res["modality"]["shapley"]
  return float(s["share_text"][i]), float(s["share_image"][i])


def per_product(res: dict, ids, labels, preds, class_names) -> list[dict]:
  """One JSON-able record per product: top words, Shapley values and shares."""
  out = []
  for i, u in enumerate(ids):
    it = res["items"][i]
    rec = {"uniq_id": str(u), "pred": class_names[int(preds[i])],
           "label": None if labels is None else class_names[int(labels[i])],
           "top_words": [] if it is None else [[w, round(s, 5)] for w, s in it.top(TOP)]}
    if res["modality"] is not None:
      sh = res["modality"]["shapley"]
      rec |= {"phi_text": float(sh["text"][i]), "phi_image": float(sh["image"][i]),
              "values": {k: float(v[i]) for k, v in res["modality"]["values"].items()}}
    out.append(rec)
  return out


def write_predict_explanations(cfg, run, params, products, probs, path: str,
                               heatmaps: dict | None = None) -> str:
  """`predict --explain`: one CSV row per input row (same order) with uniq_id,
  predicted, top_words ('word:score; ...'), phi_text, phi_image, share_text,
  share_image, explained_from ('text+image', 'text', 'image' or '' when not
  predicted), and with heatmaps ({row index: PNG path}, m6jax.explain.heatmaps) a
  heatmap column. Rows predicted from one modality have the other's phi 0."""
  if run.mode != "frozen":
    raise ValueError("predict --explain explains frozen runs (this run is finetune)")
  ok = [i for i, q in enumerate(probs) if not np.isnan(q).any()]
  rows = {i: {} for i in ok}
  if ok:
    targets = np.asarray([int(np.argmax(probs[i])) for i in ok])
    feats = {}
    if "text" in run.mods:
      feats["text"] = np.zeros((len(ok), run.feature_dims["text"]), np.float32)
      has = [j for j, i in enumerate(ok) if products[i].text]
      if has:
        feats["text"][has] = run.text_features_for([products[ok[j]].text for j in has])
    if "image" in run.mods:
      feats["image"] = np.zeros((len(ok), run.feature_dims["image"]), np.float32)
      has = [j for j, i in enumerate(ok) if products[i].image]
      if has:
        imgs = np.stack([pipeline.image_from_file(products[ok[j]].image, run.data_cfg)
                         for j in has])
        feats["image"][has] = image_embeddings(run, imgs)
    res = {"items": [None] * len(ok), "modality": None}
    if len(run.mods) == 2:
      res["modality"] = modality.split(probs_fn(run, params), feats, targets)
    ex = text_explainer(cfg, run, params)
    has = [j for j, i in enumerate(ok) if products[i].text]
    if ex is not None and has:
      got = ex.explain([products[ok[j]].text for j in has],
                       feats["image"][has] if "image" in feats else None, targets[has])
      for j, it in zip(has, got):
        res["items"][j] = it
    for j, i in enumerate(ok):
      it = res["items"][j]
      st, si = shares(res, j)
      sh = res["modality"]["shapley"] if res["modality"] is not None else None
      used = [m for m in ("text", "image") if m in run.mods and m not in products[i].missing]
      rows[i] = {"top_words": "" if it is None else "; ".join(f"{w}:{s:.4f}"
                                                              for w, s in it.top(TOP)),
                 "phi_text": "" if sh is None else f"{sh['text'][j]:.6f}",
                 "phi_image": "" if sh is None else f"{sh['image'][j]:.6f}",
                 "share_text": "" if not np.isfinite(st) else f"{st:.4f}",
                 "share_image": "" if not np.isfinite(si) else f"{si:.4f}",
                 "explained_from": "+".join(used)}
  cols = ["uniq_id", "predicted", "top_words", "phi_text", "phi_image", "share_text",
          "share_image", "explained_from"] + ([] if heatmaps is None else ["heatmap"])
  for i, png in (heatmaps or {}).items():
    rows.setdefault(i, {})["heatmap"] = png

  def write(f):
    w = csv.writer(f)
    w.writerow(cols)
    for i, p in enumerate(products):
      r = rows.get(i, {})
      pred = run.class_names[int(np.argmax(probs[i]))] if i in rows else ""
      w.writerow([p.uniq_id, pred] + [r.get(c, "") for c in cols[2:]])

  files.atomic_write(path, write)
  return path


def explain_split(cfg, run, params, split: str, ids, labels, preds, images, maps,
                  text_feats, out_dir: str, keep=(), texts=None):
  """m6jax.explain.run's hook: words, modality split and faithfulness of the
  test split of a frozen two-tower-or-text run, after its Grad-CAM pass.

  images uint8 (N, S, S, 3), maps (N, S, S) the gallery's Grad-CAM maps, preds
  (N,) ensemble predictions, text_feats (N, Dt) the run's text embeddings or
  None; keep: rows that must be explained (the gallery's), the rest sampled up to
  cfg.explain.words_max (m6jax.evaluate.sampling.balanced_sample); texts (N,) the
  products' texts (None: the whole test split's, from run.cols). Writes
  `<out_dir>/explanations.json` (per product) and returns (results.json 'explain'
  entry, gallery captions (N,), '' for a product not explained); (None, None) when
  the run or split is not explained (finetune runs, new products).
  """
  if run.mode != "frozen" or split != "test":
    log.info("word/modality explanations: frozen runs' test split only (mode %s, split %s)",
             run.mode, split)
    return None, None
  idx = sampling.balanced_sample(preds, cfg.explain.words_max, cfg.seed, keep=keep)
  texts = [str(t) for t in np.asarray(run.cols["test"]["text"] if texts is None else texts,
                                      object)[idx]]
  res = explain_products(cfg, run, params, texts, np.asarray(preds)[idx],
                         images=np.asarray(images)[idx], maps=np.asarray(maps)[idx],
                         text_feats=None if text_feats is None else np.asarray(text_feats)[idx],
                         faithful=True)
  caps = [""] * len(ids)
  for j, i in enumerate(idx):
    caps[i] = caption(res["items"][j], shares(res, j))
  res["summary"]["products"] = {"explained": int(len(idx)), "of": int(len(ids)),
                                "sample": "gallery images + seeded, by predicted class"}
  if mesh_lib.is_writer():
    sub = lambda a: None if a is None else np.asarray(a)[idx]  # noqa: E731
    files.write_json(os.path.join(out_dir, "explanations.json"),
                     {"summary": res["summary"],
                      "products": per_product(res, sub(ids), sub(labels), sub(preds),
                                              run.class_names)})
  s = res["summary"]
  text_del = (s.get("text") or {}).get("deletion") or {}
  img_del = (s.get("image") or {}).get("deletion") or {}
  log.info("explanations of %d of %d products; probability drop when deleting the top-k "
           "words (attributed / random): %s; top 10 %% Grad-CAM pixels: %s",
           len(idx), len(ids),
           ", ".join(f"k={k} {d['attributed']:.3f}/{d['random']:.3f}"
                     for k, d in text_del.items()) or "-",
           f"{img_del['attributed']:.3f} / random regions {img_del['random']:.3f}"
           if img_del else "-")
  return s, caps
