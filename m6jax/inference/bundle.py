"""The inference bundle of a run: everything prediction needs besides the parameters.

Saved at the end of training (m6jax.experiment) into `<workdir>/bundle/`:

  bundle.json         format, class names, number of replicas R (and of folds), mode, fusion config
                      (`model`), preprocessing (image size, store size, text length, CSV
                      columns and text fields, image decoding limits), towers (name, weights
                      spec, embedding size, fingerprint of the resolved weight files), text
                      features, the dataset it was trained on, the run fingerprint
                      (m6jax.workdir), the checkpoint step the run scored
                      (`checkpoint_step`: predict, explain and serve read exactly that
                      step) and the full run config
  text_features.npz   the fitted TF-IDF vocabulary, idf and SVD components (TF-IDF text
                      tower only), plain arrays: no pickle

m6jax.inference.restore rebuilds the model from this folder and the checkpoint only: the
training catalogue is never read again. The folder is written into a temporary
sibling and renamed into place, so a reader sees the old bundle or the new one,
never a half-written one.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import os
import pathlib
import shutil

import jax
import ml_collections
import numpy as np

from m6jax import defaults, files
from m6jax import mesh as mesh_lib
from m6jax import workdir as workdir_lib
from m6jax.data import images
from m6jax.models import fusion
from m6jax.models.weights import sources as weights_lib
from m6jax.train import checkpoint

log = logging.getLogger(__name__)

FORMAT = 1
DIRNAME = "bundle"
META = "bundle.json"
TEXT_ARRAYS = "text_features.npz"
# The catalogue text of a product: these column roles, stripped, non-empty ones
# joined by a space (as m6jax.data.catalogue.read_catalogue builds Row.text).
TEXT_FIELDS = ("name", "description")


class BundleError(RuntimeError):
  """A missing or unusable inference bundle, or weights that differ from training."""


def directory(workdir: str) -> str:
  """<workdir>/bundle."""
  return os.path.join(os.fspath(workdir), DIRNAME)


# --- weights fingerprints -----------------------------------------------------

def _weight_files(path: pathlib.Path) -> dict[str, pathlib.Path]:
  """{name: file} of a weights file, or of every file under a weights folder
  (hidden files and __pycache__ left out)."""
  if path.is_file():
    return {path.name: path}
  return {str(p.relative_to(path)): p for p in sorted(path.rglob("*"))
          if p.is_file() and not any(part.startswith(".") or part == "__pycache__"
                                     for part in p.relative_to(path).parts)}


def weights_fingerprint(spec: str, tower: str) -> dict:
  """{'random': True} for random init, else {'path': resolved path, 'files':
  {name: {'size', 'sha256'}}} of the files the weight spec resolves to."""
  if weights_lib.is_random(spec):
    return {"random": True}
  path = weights_lib.resolve(spec, tower=tower)
  files = {name: {"size": p.stat().st_size, "sha256": weights_lib.file_digest(p)}
           for name, p in _weight_files(path).items()}
  return {"path": str(path), "files": files}


def verify_weights(role: str, tower: dict) -> None:
  """Raises BundleError when the weight files `tower` (a bundle.json tower
  entry) resolves to here differ from the ones recorded at training."""
  want = tower["fingerprint"]
  if want.get("random"):
    return
  try:
    got = weights_fingerprint(tower["weights"], tower["name"])
  except Exception as e:  # noqa: BLE001 - resolve raises many kinds (missing package, ...)
    raise BundleError(f"{role} tower {tower['name']!r}: weights {tower['weights']!r} "
                      f"cannot be found here ({type(e).__name__}: {e}); the run was trained "
                      f"with {want.get('path')}") from None
  diffs = []
  for name in sorted(set(want["files"]) | set(got["files"])):
    w, g = want["files"].get(name), got["files"].get(name)
    if w is None:
      diffs.append(f"{name}: not in the trained weights")
    elif g is None:
      diffs.append(f"{name}: missing")
    elif w != g:
      diffs.append(f"{name}: size {g['size']} sha256 {g['sha256'][:12]} (trained with size "
                   f"{w['size']} sha256 {w['sha256'][:12]})")
  if diffs:
    raise BundleError(
        f"{role} tower {tower['name']!r}: weights {tower['weights']!r} resolve to "
        f"{got['path']}, which differs from the weights the run was trained with "
        f"({want.get('path')}): " + "; ".join(diffs)
        + ". Install the same weights, or retrain.")


# --- saving -------------------------------------------------------------------

def _feature_dims(run) -> dict:
  """{modality: embedding size} entering the fusion head."""
  dims = {m: int(np.asarray(f["train"]).shape[1]) for m, f in run.feats.items()}
  trainer = run.trainer
  if "image" not in dims and getattr(trainer, "image_tower", None) is not None:
    dims["image"] = int(trainer.image_tower.feature_dim)
  if "text" not in dims and getattr(trainer, "text_tower", None) is not None:
    dims["text"] = int(trainer.text_tower.feature_dim)
  return dims


def _preprocessing(data_cfg) -> dict:
  limits = images.Limits.from_config(data_cfg)
  return {
      "image_size": int(data_cfg.image_size), "store_size": int(data_cfg.store_size),
      "max_text_length": int(data_cfg.max_text_length),
      "batch_size": int(data_cfg.batch_size),
      "columns": dict(data_cfg.columns), "text_fields": list(TEXT_FIELDS),
      "label_depth": int(data_cfg.label_depth),
      "encoding": data_cfg.get("encoding", "utf-8"),
      "max_image_pixels": limits.max_pixels, "max_image_side": limits.max_side,
      "on_bad_row": data_cfg.on_bad_row,
  }


def save(workdir: str, run, states) -> str | None:
  """Writes `<workdir>/bundle` for a trained run.

  run: the m6jax.features.prepare.Setup the run trained with; states: the trained
  states (the leading axis of `best_params` is the number of replicas K).
  Only process 0 writes; returns the folder (None on other processes).
  """
  cfg = run.cfg
  # Every process: reading the step of a state sharded over processes is a collective.
  step = checkpoint.state_step(states) if cfg.train.checkpoint else None
  if not mesh_lib.is_writer():
    return None
  mods = fusion.modalities(cfg.model.fusion)
  num_replicas = int(jax.tree.leaves(states.best_params)[0].shape[0])
  folds = run.trainer.folds   # cross-validation: fold models (x repeats) per seed
  dims = _feature_dims(run)
  towers = {}
  for m in mods:
    tc = cfg.model[m]
    towers[m] = {"name": tc.name, "weights": tc.weights, "feature_dim": dims.get(m),
                 "fingerprint": ({"random": True} if tc.name == "tfidf"
                                 else weights_fingerprint(tc.weights, tc.name))}
  arrays = {}
  text = None
  if run.text_features is not None:
    options, arrays = run.text_features.to_arrays()
    text = {"kind": "tfidf", "options": options, "arrays": TEXT_ARRAYS}
  meta = {
      "format": FORMAT, "class_names": list(run.class_names), "num_replicas": num_replicas,
      "folds": folds,
      "mode": cfg.train.mode, "seed": int(cfg.seed), "model": cfg.model.to_dict(),
      "preprocessing": _preprocessing(cfg.data), "towers": towers, "text_features": text,
      "dataset": {"id": run.dataset_id(), "dir": os.path.abspath(run.builder.data_dir)},
      # As checkpoints/fingerprint.json of the same run: restore refuses a mix of runs.
      "run_fingerprint": workdir_lib.fingerprint(cfg, run.dataset_id()),
      # The checkpoint step holding these parameters, the one results.json scored:
      # inference reads exactly this step (None: checkpointing was off).
      "checkpoint_step": step,
      "config": cfg.to_dict(),
  }
  final = directory(workdir)
  tmp = f"{final}.tmp-{os.getpid()}"
  shutil.rmtree(tmp, ignore_errors=True)
  os.makedirs(tmp)
  if arrays:
    np.savez(os.path.join(tmp, TEXT_ARRAYS), **arrays)
  files.write_json(os.path.join(tmp, META), meta)
  old = f"{final}.old-{os.getpid()}"
  if os.path.isdir(final):
    os.replace(final, old)
  os.replace(tmp, final)
  shutil.rmtree(old, ignore_errors=True)
  log.info("inference bundle: %s", final)
  return final


# --- loading ------------------------------------------------------------------

@dataclasses.dataclass
class Bundle:
  """A loaded bundle folder; `meta` is bundle.json."""
  path: str
  meta: dict

  @property
  def config(self) -> ml_collections.ConfigDict:
    """The run's full config (knobs added since it was saved: their defaults)."""
    return defaults.saved_config(self.meta["config"])

  @property
  def class_names(self) -> list[str]:
    return list(self.meta["class_names"])

  @property
  def num_replicas(self) -> int:
    return int(self.meta["num_replicas"])

  @property
  def checkpoint_step(self) -> int | None:
    """The checkpoint step the run scored (None: a bundle from before steps were recorded)."""
    step = self.meta.get("checkpoint_step")
    return None if step is None else int(step)

  @property
  def folds(self) -> int:
    """Fold models per seed (folds x repeats): replica r is fold model r // seeds of seed
    r % seeds (1: no cross-validation)."""
    return int(self.meta.get("folds", 1))

  @property
  def modalities(self) -> tuple[str, ...]:
    return fusion.modalities(self.meta["model"]["fusion"])

  @property
  def preprocessing(self) -> dict:
    return dict(self.meta["preprocessing"])

  def data_config(self) -> ml_collections.ConfigDict:
    """The preprocessing as a data-config section (what m6jax.data.pipeline reads)."""
    return ml_collections.ConfigDict(self.preprocessing)

  def text_features(self):
    """The fitted TfidfFeatures, or None when the text tower is not TF-IDF."""
    text = self.meta.get("text_features")
    if not text:
      return None
    from m6jax.models import tfidf
    with np.load(os.path.join(self.path, text["arrays"]), allow_pickle=False) as z:
      return tfidf.TfidfFeatures.from_arrays(text["options"], {k: z[k] for k in z.files})

  def verify_run(self, run_dir: str) -> None:
    """Raises BundleError when `<run_dir>/checkpoints/fingerprint.json` exists and
    describes another run (a restarted workdir that has not finished training)."""
    path = os.path.join(run_dir, workdir_lib.FINGERPRINT)
    want = self.meta.get("run_fingerprint")
    if want is None or not os.path.isfile(path):
      return
    with open(path) as f:
      got = json.load(f)
    diff = workdir_lib.differences(want, got)
    if diff:
      raise BundleError(f"the bundle {self.path} and the checkpoint in {run_dir} are from "
                        f"different runs ({'; '.join(diff)}): was the workdir restarted "
                        "without finishing training?")

  def with_weights(self, specs: dict) -> "Bundle":
    """A copy whose towers {modality: weight spec} read their weights from elsewhere
    (a logged model's own copy); verify_weights still checks them against training."""
    meta = json.loads(json.dumps(self.meta))
    for m, spec in specs.items():
      meta["towers"][m]["weights"] = spec
      meta["config"]["model"][m]["weights"] = spec
    return Bundle(self.path, meta)

  def verify_weights(self, roles=None) -> None:
    """Checks the weight files of the towers `roles` (default: all) against training."""
    for role, tower in self.meta["towers"].items():
      if roles is None or role in roles:
        verify_weights(role, tower)


def load(path: str) -> Bundle:
  """A bundle folder -> Bundle; raises BundleError naming what is wrong."""
  meta_path = os.path.join(path, META)
  if not os.path.isfile(meta_path):
    raise BundleError(f"no inference bundle: {meta_path} not found (runs trained before "
                      "bundles existed, or not yet trained to the end, have none: retrain)")
  try:
    with open(meta_path) as f:
      meta = json.load(f)
  except (OSError, ValueError) as e:
    raise BundleError(f"{meta_path} cannot be read: {e}") from None
  if not isinstance(meta, dict) or meta.get("format") != FORMAT:
    raise BundleError(f"{meta_path}: expected bundle format {FORMAT}, "
                      f"got {meta.get('format') if isinstance(meta, dict) else meta!r}")
  return Bundle(os.path.abspath(path), meta)
