"""`predict --explain --heatmaps`: one Grad-CAM heat-map PNG per predicted row with a photo.

The maps are the ensemble's, for the class the run predicted (targets='ensemble':
the argmax of the replicas' mean softmax, the prediction path's own), computed by
m6jax.explain.run.cam_model on the restored run -- the same program the run's
gallery uses -- in batches of data.batch_size. Frozen runs (as the rest of
`predict --explain`): the text embedding is held fixed, zeros where the row has
no text (as the prediction read it).
"""

from __future__ import annotations

import os

import jax.numpy as jnp
import numpy as np
from PIL import Image

from m6jax import files
from m6jax.data import pipeline
from m6jax.explain import gallery, gradcam
from m6jax.explain.run import cam_model


def file_name(product) -> str:
  """'<row>-<uniq_id>.png', the id reduced to safe characters (ids are user data)."""
  safe = "".join(c if c.isalnum() or c in "-_." else "_" for c in str(product.uniq_id))[:80]
  return f"{product.row}-{safe}.png"


def _batches(run, rows, products, bs: int):
  for s in range(0, len(rows), bs):
    chunk = rows[s:s + bs]
    yield chunk, pipeline.image_batch(
        [pipeline.image_from_file(products[i].image_bytes or products[i].image, run.data_cfg)
         for i in chunk], bs)


def write_heatmaps(run, params, products, probs, folder: str) -> dict[int, str]:
  """Rows predicted with a photo -> `<folder>/<row>-<id>.png` (photo with the ensemble's
  Grad-CAM map blended in); returns {row index: path}. probs (N, C), NaN where a row
  was not predicted."""
  if run.mode != "frozen":
    raise ValueError("predict --explain explains frozen runs (this run is finetune)")
  if "image" not in run.mods:
    return {}
  rows = [i for i, p in enumerate(products) if not np.isnan(probs[i]).any()
          and "image" not in p.missing and (p.image or p.image_bytes)]
  if not rows:
    return {}
  cfg, bs = run.cfg, run.data_cfg.batch_size
  text = None
  if "text" in run.mods:
    text = np.zeros((len(rows), run.feature_dims["text"]), np.float32)
    has = [j for j, i in enumerate(rows) if products[i].text]
    if has:
      text[has] = run.text_features_for([products[rows[j]].text for j in has])
  make, replica_params, shared, inputs_of = cam_model(cfg, run, params, None, run.mods, "new",
                                                      text)
  os.makedirs(folder, exist_ok=True)
  out, start, pert = {}, 0, None
  for chunk, b in _batches(run, rows, products, bs):
    inp = inputs_of(b, start)
    if pert is None:
      pert = jnp.zeros(inp["feature_map"].shape, inp["feature_map"].dtype)
    res = gradcam.replica_cams(make, replica_params, pert, inp, targets="ensemble",
                               shared=shared, details=True)
    cams = np.asarray(res["mean_cams"])
    for j, i in enumerate(chunk):
      path = os.path.join(folder, file_name(products[i]))
      picture = Image.fromarray(gallery.overlay(b["image"][j], cams[j]))
      files.atomic_write(path, lambda f, im=picture: im.save(f, format="PNG"), binary=True)
      out[i] = path
    start += len(chunk)
  return out
