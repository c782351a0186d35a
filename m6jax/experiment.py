"""One experiment, end to end: train -> explain -> track.

The entry points (m6jax.main, m6jax.sweep) call `run`; it is the one place
that strings the downstream steps together, so a sweep cell and a main job
produce the same outputs.
"""

from __future__ import annotations

import logging
import os

import jax

log = logging.getLogger(__name__)


def run(cfg, workdir: str, **tracker_kwargs) -> dict:
  """Trains and evaluates `cfg` into `workdir`, adds Grad-CAM (cfg.explain) and
  logs everything to MLflow (cfg.track). Returns the results dict."""
  from m6jax import results as results_lib
  from m6jax import track, train
  from m6jax.models import fusion

  with track.Tracker(cfg, workdir, **tracker_kwargs) as tracker:
    results = train.train_and_evaluate(cfg, workdir, on_epoch=tracker.log_epoch)
    ex = cfg.get("explain") or {}
    if ex.get("enabled") and "image" in fusion.modalities(cfg.model.fusion):
      from m6jax import explain
      out = explain.explain_run(workdir, n_per_class=ex.get("n_per_class", 3),
                                method=ex.get("method", "gradcam"))
      results["gradcam"] = {"method": ex.get("method", "gradcam"),
                            "stability": out["stability"],
                            "gallery": os.path.relpath(out["gallery"], workdir)}
      if jax.process_index() == 0:
        results_lib.write_json(os.path.join(workdir, "results.json"), results)
      log.info("Grad-CAM: replica stability %.3f, gallery %s", out["stability"], out["gallery"])
    tracker.log_results(results, workdir)
  return results
