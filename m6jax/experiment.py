"""One experiment, end to end: features -> train -> evaluate -> feasibility -> explain -> track.

The entry points (m6jax.main, m6jax.track.sweep) call `run`; it is the one place
that strings the steps together, so a sweep cell and a main job produce the
same outputs. results.json records each phase's wall time under `timings`.
"""

from __future__ import annotations

import contextlib
import logging
import os
import time

import jax
import numpy as np

from m6jax import config as config_lib
from m6jax import files, mesh
from m6jax import workdir as workdir_lib
from m6jax.evaluate import feasibility, results
from m6jax.explain import run as explain_lib
from m6jax.features import cache, prepare
from m6jax.inference import bundle, serve
from m6jax.models import fusion
from m6jax.models.weights import sources as weights_lib
from m6jax.track import tracker as tracker_lib
from m6jax.train import checkpoint

log = logging.getLogger(__name__)


class _Timer:
  """Wall time per phase: `with timer('train'): ...` -> timer.timings['train']."""

  def __init__(self):
    self.t0 = time.time()
    self.timings: dict[str, float] = {}

  @contextlib.contextmanager
  def __call__(self, phase: str):
    t = time.time()
    try:
      yield
    finally:
      self.timings[phase] = self.timings.get(phase, 0.0) + time.time() - t

  def total(self) -> dict:
    return dict(self.timings, total=time.time() - self.t0)


def _locked(workdir: str):
  """The workdir's exclusive lock (held by the primary process of a multi-host run)."""
  return workdir_lib.lock(workdir) if mesh.is_writer() else contextlib.nullcontext()


def train_and_evaluate(cfg, workdir: str, on_epoch=None) -> dict:
  """config -> data -> (embeddings) -> K-seed training -> test scores in `workdir`.

  Validates `cfg`, locks `workdir` and resumes its checkpoint only when the run
  fingerprint matches (m6jax.workdir). Returns the results dict also written to
  `workdir/results.json`. on_epoch: optional callback for each epoch's history
  record (tracking).
  """
  config_lib.validate(cfg)
  with _locked(workdir):
    return _train_and_evaluate(cfg, workdir, on_epoch, _Timer())


def _train_and_evaluate(cfg, workdir: str, on_epoch, timer: _Timer) -> dict:
  guard = cfg.train.checkpoint and mesh.is_writer()
  if guard:   # config and code first: refuse before any data work
    workdir_lib.check(workdir, workdir_lib.fingerprint(cfg), record=False)
  if mesh.is_writer():
    files.write_json(os.path.join(workdir, "config.json"), cfg.to_dict())
  with timer("setup"):
    run = prepare.setup(cfg, workdir)
    if mesh.is_writer():
      run.report.write(workdir)
  if guard:
    workdir_lib.check(workdir, workdir_lib.fingerprint(cfg, run.dataset_id()))
  if run.report.bad:
    log.warning("%d bad rows skipped; see %s", len(run.report.bad),
                os.path.join(workdir, "data_report.txt"))
  labels = {s: c["label"] for s, c in run.cols.items()}
  with timer("train"), checkpoint.Checkpoints(workdir, enabled=cfg.train.checkpoint) as ckpt:
    states, history = run.trainer.fit(labels["validation"], ckpt, on_epoch=on_epoch)
  bundle.save(workdir, run, states)   # what predict/explain/serve need besides the checkpoint

  mods = fusion.modalities(cfg.model.fusion)
  with timer("evaluate"):
    # Each replica's best-validation parameters: the ones the checkpoint holds.
    probs, weights = run.trainer.predict(states.best_params, states.best_batch_stats, "test",
                                         with_weights=True)
    # One model per seed (with folds: that seed's fold ensemble), scored per seed.
    probs = run.trainer.seed_models(probs)
    scores = results.score(labels["test"], probs, run.class_names)
    extra = {
        "config_name": cfg.name, "mode": cfg.train.mode, "fusion": cfg.model.fusion,
        "seeds": [cfg.seed + k for k in range(cfg.seeds)],
        "replicas": run.trainer.num_replicas,
        "modality_weights_mean": dict(zip(mods,
                                          np.asarray(weights).mean(axis=(0, 1)).tolist())),
        "validation": best_validation(history, cfg.train.get("select_by", "macro_f1")),
        "best_val_macro_f1": best_validation(history).get("macro_f1", []),
        "data": run.report.to_dict() | {"skipped": len(run.report.bad)},
        "history": history,
        "devices": [str(d) for d in jax.devices()],
    }
    if getattr(run.trainer, "plan", None) is not None:
      extra["cross_validation"] = run.trainer.out_of_fold_scores(states.best_params)
      log.info("cross-validation (%d folds x %d seeds, out-of-fold): %s", cfg.train.folds,
               cfg.seeds, {k: round(v, 4) for k, v in extra["cross_validation"].items()
                           if isinstance(v, float)})
    if cfg.train.mode == "frozen" and len(mods) > 1:
      extra["modality_importance"] = run.trainer.modality_importance(states.best_params)
      log.info("modality importance (test, ensemble accuracy): %s",
               {k: round(v, 4) for k, v in extra["modality_importance"].items()})
  if cfg.get("feasibility") and run.feats and mesh.is_writer():
    with timer("feasibility"):
      extra["feasibility"] = feasibility.feasibility_study(
          {m: np.concatenate([f[s] for s in prepare.SPLITS]) for m, f in run.feats.items()},
          np.concatenate([labels[s] for s in prepare.SPLITS]),
          run.class_names, workdir, seed=cfg.seed,
          cache_dir=cfg.train.get("cache_dir") or cache.default_root())
  with timer("evaluate"):
    extra["timings"] = timer.total()
    out = results.write_outputs(workdir, scores, run.class_names, run.cols["test"]["uniq_id"],
                                labels["test"], probs, extra)
  s = out["test"]["summary"]
  log.info("test accuracy %.4f +- %.4f, macro-F1 %.4f +- %.4f over %d seeds; "
           "ensemble accuracy %.4f (%.0f s)", s["accuracy"]["mean"], s["accuracy"]["std"],
           s["macro_f1"]["mean"], s["macro_f1"]["std"], cfg.seeds,
           out["test"]["ensemble"]["accuracy"], time.time() - timer.t0)
  return out


def best_validation(history: list, select_by: str = "macro_f1") -> dict:
  """Each replica's selected epoch (the first best by `select_by`, as keep_best picks it)
  and its validation scores: {'select_by', 'best_epoch': [R], '<metric>': [R], ...}."""
  if not history:
    return {}
  key = "val_log_loss" if select_by == "log_loss" else "val_macro_f1"
  sign = -1.0 if select_by == "log_loss" else 1.0
  score = sign * np.asarray([h[key] for h in history], np.float64)       # (E, R)
  best = score.argmax(0)
  out = {"select_by": select_by,
         "best_epoch": [int(history[e]["epoch"]) for e in best]}
  for name in ("macro_f1", "accuracy", "log_loss"):
    if f"val_{name}" in history[0]:
      vals = np.asarray([h[f"val_{name}"] for h in history], np.float64)
      out[name] = vals[best, np.arange(vals.shape[1])].tolist()
      out[f"{name}_mean"] = float(np.mean(out[name]))
  return out


def _explain(cfg, workdir: str, results_dict: dict) -> None:
  """Grad-CAM gallery and stability of the finished run into results_dict['gradcam']."""
  ex = cfg.explain
  out = explain_lib.explain_run(workdir, n_per_class=ex.n_per_class, method=ex.method)
  results_dict["gradcam"] = {"method": ex.method, "stability": out["stability"],
                             "gallery": os.path.relpath(out["gallery"], workdir),
                             "timings": out["timings"]}
  if out.get("explain"):   # words, modality split, deletion curves (m6jax.explain.multimodal)
    results_dict["explain"] = out["explain"]
  log.info("Grad-CAM: replica stability %.3f, gallery %s", out["stability"], out["gallery"])


def use_xla_cache(cfg) -> None:
  """Keeps compiled XLA programs in cfg.train.xla_cache_dir across runs (unless
  this process already chose a cache): another experiment on the same catalogue
  (another head, a sweep cell) then loads its train, predict and Grad-CAM
  programs instead of compiling them. XLA keys each entry by the program, the
  jax version and the device, so an entry is only used where it applies."""
  path = cfg.train.get("xla_cache_dir", "")
  if path == "none" or jax.config.jax_compilation_cache_dir is not None:
    return
  jax.config.update("jax_compilation_cache_dir", path or str(weights_lib.cache_dir() / "xla"))
  # Every program: the small ones add up (the default job compiles ~30).
  jax.config.update("jax_persistent_cache_min_compile_time_secs", 0.0)


def run(cfg, workdir: str, restart: bool = False, **tracker_kwargs) -> dict:
  """Trains and evaluates `cfg` into `workdir`, adds Grad-CAM (cfg.explain) and
  logs everything to MLflow (cfg.track). Returns the results dict.

  restart: discard the workdir's checkpoint, results and tracking state first
  (a fresh run, also in a new MLflow run).
  """
  config_lib.validate(cfg)
  use_xla_cache(cfg)
  t0 = time.time()
  with _locked(workdir):
    if mesh.is_writer():
      if restart:
        workdir_lib.clear(workdir)
      elif cfg.train.checkpoint:   # refuse before a tracking run is opened
        workdir_lib.check(workdir, workdir_lib.fingerprint(cfg), record=False)
    with tracker_lib.Tracker(cfg, workdir, **tracker_kwargs) as tracker:
      res = train_and_evaluate(cfg, workdir, on_epoch=tracker.log_epoch)
      if cfg.explain.enabled and "image" in fusion.modalities(cfg.model.fusion):
        t = time.time()
        _explain(cfg, workdir, res)
        res["timings"] = dict(res["timings"], explain=time.time() - t, total=time.time() - t0)
        if mesh.is_writer():
          files.write_json(os.path.join(workdir, "results.json"), res)
      tracker.log_results(res, workdir)
      if cfg.track.log_model and cfg.train.checkpoint:   # all: orbax syncs processes
        # The served model: bundle + the checkpoint results.json scored (m6jax.inference.serve).
        serve.log_to(tracker, workdir)
  mesh.barrier("run_end")   # the others wait for the writer, not jax's 5-min shutdown barrier
  return res
