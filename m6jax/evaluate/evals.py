"""The run's evaluations, named in `config.evals` (big_vision's config.evals idea).

Each entry of EVALS is a function of the run `Context` (the trained states in
memory, the data, the config) returning its part of results.json, or {} when it
does not apply to the run (e.g. cross-validation without folds). m6jax.experiment
calls them in the order of `cfg.evals` and writes results.json once, with the
schema `Results` below. Scoring, importance, CV and Grad-CAM all use the same
states: each replica's best-validation parameters, the ones the checkpoint holds.

  test_scores  per-seed / ensemble test scores; report.txt, confusion_matrix.png,
               predictions_test.csv
  curves       training_curves.png (loss and validation scores per epoch)
  importance   the test ensemble's accuracy with each modality zeroed (frozen, fused)
  cv           out-of-fold cross-validation scores (train.folds >= 2)
  feasibility  KMeans ARI + 2-D projection of the frozen embeddings (cfg.feasibility,
               cfg.feasibility_opts: projected sample, MiniBatchKMeans past a size)
  gradcam      Grad-CAM gallery and replica stability (cfg.explain.enabled, image runs)
"""

from __future__ import annotations

import dataclasses
import functools
import logging
import os
from typing import Any, Callable, TypedDict

import jax
import numpy as np

from m6jax import mesh as mesh_lib
from m6jax.evaluate import curves, feasibility, results
from m6jax.explain import run as explain_lib
from m6jax.features import cache, prepare
from m6jax.inference import bundle as bundle_lib
from m6jax.inference import restore
from m6jax.models import fusion
from m6jax.train import folds as folds_lib
from m6jax.train import trainer as trainer_lib

log = logging.getLogger(__name__)


class Results(TypedDict, total=False):
  """results.json, as m6jax.experiment writes it (each part named by who builds it)."""
  # the run (m6jax.experiment.run_record)
  config_name: str
  mode: str
  fusion: str
  seeds: list            # the replicas' seeds, cfg.seed + k
  replicas: int          # R = folds x seeds
  validation: dict       # results.selection: each replica's selected epoch (TrainState)
  best_val_macro_f1: list
  data: dict             # the data report (rows used / skipped)
  history: list          # one record per epoch (Trainer.fit)
  checkpoint_step: Any   # the checkpoint step holding the scored states (None: no checkpoint)
  devices: list
  # test_scores
  classes: list
  split: str             # 'test'
  test: dict             # results.score: per_seed, summary (seed spread), ensemble,
                         # bootstrap (over test products), report, report_per_seed
  modality_weights_mean: dict
  # importance, cv, feasibility, gradcam
  modality_importance: dict
  cross_validation: dict
  feasibility: dict
  gradcam: dict
  explain: dict          # sample (the test products explained: m6jax.evaluate.sampling),
                         # words, modality split, deletion curves (m6jax.explain.multimodal)
  timings: dict          # seconds per phase (setup, train, evaluate, feasibility, explain), total


@dataclasses.dataclass
class Context:
  """What an evaluation sees: the run as trained, in memory."""
  cfg: Any
  workdir: str
  run: prepare.Setup     # data, features and the trainer
  states: Any            # the trained states (leading replica axis)
  history: list
  # (R,) each replica's selected epoch, gathered to the host once (a collective)
  best_epoch: list

  @property
  def labels(self) -> dict:
    return {s: c["label"] for s, c in self.run.cols.items()}

  @property
  def mods(self) -> tuple:
    return fusion.modalities(self.cfg.model.fusion)


def test_scores(ctx: Context) -> dict:
  """Each replica's best parameters on the test split: scores per seed model (with
  folds: its fold ensemble) and of their ensemble, and the files that show them."""
  run, st = ctx.run, ctx.states
  probs, weights = run.trainer.predict(st.best_params, st.best_batch_stats, "test",
                                       with_weights=True)
  probs = run.trainer.seed_models(probs)
  labels = ctx.labels["test"]
  scores = results.score(labels, probs, run.class_names, ctx.cfg.evaluate)
  results.write_outputs(ctx.workdir, scores, run.class_names, run.cols["test"]["uniq_id"],
                        labels, probs)
  return {"classes": list(run.class_names), "split": "test", "test": scores,
          "modality_weights_mean": dict(zip(ctx.mods, np.asarray(weights).mean(
              axis=(0, 1)).tolist()))}


def training_curves(ctx: Context) -> dict:
  """training_curves.png: loss and validation scores per epoch, selected epochs marked."""
  if ctx.history and mesh_lib.is_writer():
    curves.plot_training_curves(
        ctx.history, os.path.join(ctx.workdir, "training_curves.png"),
        [ctx.cfg.seed + k for k in range(ctx.cfg.seeds)], os.path.basename(ctx.workdir),
        ctx.best_epoch, ctx.cfg.train.select_by)
  return {}


def modality_importance(trainer, params, split: str = "test") -> dict:
  """Accuracy of the seed ensemble with each modality's embedding zeroed (as predict
  treats a missing input; model.modality_dropout trains for it): {'full': acc, 'without_<m>': acc,
  'drop_<m>': full - without}. trainer: a m6jax.train.trainer.FrozenTrainer."""
  labels = np.asarray(trainer.labels[split])

  def acc(f):
    probs = trainer.ensemble(trainer.predict_features(params, f)[0])
    return float((probs.argmax(-1) == labels).mean())

  feats = {m: np.asarray(v) for m, v in trainer.feats[split].items()}
  out = {"full": acc(feats)}
  for m in trainer.mods:
    out[f"without_{m}"] = acc(dict(feats, **{m: np.zeros_like(feats[m])}))
    out[f"drop_{m}"] = out["full"] - out[f"without_{m}"]
  return out


def importance(ctx: Context) -> dict:
  if ctx.cfg.train.mode != "frozen" or len(ctx.mods) < 2:
    return {}
  imp = modality_importance(ctx.run.trainer, ctx.states.best_params)
  log.info("modality importance (test, ensemble accuracy): %s",
           {k: round(v, 4) for k, v in imp.items()})
  return {"modality_importance": imp}


def out_of_fold_scores(trainer, params) -> dict:
  """Cross-validation scores of the pooled rows, each predicted by the replicas that did
  not train on it, per repeat, as mean and std over repeats, and per fold model
  ('per_fold_accuracy', 'fold_rows': [repeats * folds], for a corrected t-test)
  (m6jax.train.folds.cv_scores). trainer: a FrozenTrainer with a fold plan."""
  return folds_lib.cv_scores(trainer.predict(params, None, "pool"),
                             np.asarray(trainer.labels["pool"]), trainer.plan,
                             functools.partial(trainer_lib.validation_scores,
                                               num_classes=trainer.num_classes))


def cross_validation(ctx: Context) -> dict:
  if getattr(ctx.run.trainer, "plan", None) is None:
    return {}
  cv = out_of_fold_scores(ctx.run.trainer, ctx.states.best_params)
  log.info("cross-validation (%d folds x %d repeats x %d seeds, out-of-fold): %s",
           ctx.cfg.train.folds, ctx.cfg.train.repeats, ctx.cfg.seeds,
           {k: round(v, 4) for k, v in cv.items() if isinstance(v, float)})
  return {"cross_validation": cv}


def feasibility_eval(ctx: Context) -> dict:
  cfg, run = ctx.cfg, ctx.run
  if not (cfg.feasibility and run.feats and mesh_lib.is_writer()):
    return {}
  labels, opts = ctx.labels, cfg.feasibility_opts
  return {"feasibility": feasibility.feasibility_study(
      # every split's rows: the one feature matrix the splits are views of, not a copy
      {m: prepare.all_splits(f) for m, f in run.feats.items()}, prepare.all_splits(labels),
      run.class_names, ctx.workdir, seed=cfg.seed,
      cache_dir=cfg.train.cache_dir or cache.default_root(), tsne_max=opts.tsne_max,
      kmeans_minibatch_from=opts.kmeans_minibatch_from,
      kmeans_batch_size=opts.kmeans_batch_size)}


def gradcam(ctx: Context) -> dict:
  """Grad-CAM of the states just scored (every process computes the maps; one writes)."""
  cfg = ctx.cfg
  if not (cfg.explain.enabled and "image" in ctx.mods):
    return {}
  host = lambda tree: jax.tree.map(mesh_lib.to_host, tree)  # noqa: E731
  ex = cfg.explain
  # The word/modality explanations read the towers through the run's bundle (saved
  # before the evaluations); the parameters are still the in-memory states scored.
  words = (restore.Inference(bundle_lib.load(bundle_lib.directory(ctx.workdir)))
           if ex.words else None)
  out = explain_lib.explain(cfg, ctx.run, ctx.run.trainer, host(ctx.states.best_params),
                            host(ctx.states.best_batch_stats) or {},
                            os.path.join(ctx.workdir, "gradcam"),
                            n_per_class=ex.n_per_class, method=ex.method, words_model=words)
  part = {"gradcam": {"method": ex.method, "stability": out["stability"],
                      "gallery": os.path.relpath(out["gallery"], ctx.workdir),
                      "timings": out["timings"]},
          # the test products explained: a stratified sample (m6jax.evaluate.sampling)
          "explain": {"sample": out["sample"]}}
  if out.get("explain"):   # words, modality split, deletion curves (m6jax.explain.multimodal)
    part["explain"].update(out["explain"])
  return part


# name -> (function of the Context, the timings phase it counts under)
EVALS: dict[str, tuple[Callable[[Context], dict], str]] = {
    "test_scores": (test_scores, "evaluate"),
    "curves": (training_curves, "evaluate"),
    "importance": (importance, "evaluate"),
    "cv": (cross_validation, "evaluate"),
    "feasibility": (feasibility_eval, "feasibility"),
    "gradcam": (gradcam, "explain"),
}
