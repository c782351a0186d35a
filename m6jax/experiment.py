"""One experiment, end to end: features -> train -> the evaluations of cfg.evals -> track.

The entry points (m6jax.main, m6jax.track.sweep) call `run`; it is the one place
that strings the steps together, so a sweep cell and a main job produce the
same outputs. The evaluations (m6jax.evaluate.evals: test scores, curves,
importance, CV, feasibility, Grad-CAM) run in the order `cfg.evals` names them on
the states just trained; results.json (schema: m6jax.evaluate.evals.Results) is
written once, after the last, with each phase's wall time under `timings`.
"""

from __future__ import annotations

import contextlib
import logging
import os
import time

import jax

from m6jax import config as config_lib
from m6jax import files, mesh
from m6jax import workdir as workdir_lib
from m6jax.data import tfds_builder
from m6jax.evaluate import evals, results
from m6jax.features import prepare
from m6jax.inference import bundle
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
      self.add(phase, time.time() - t)

  def add(self, phase: str, seconds: float) -> None:
    self.timings[phase] = self.timings.get(phase, 0.0) + seconds

  def total(self) -> dict:
    return dict(self.timings, total=time.time() - self.t0)


def _locked(workdir: str):
  """The workdir's exclusive lock (held by the primary process of a multi-host run)."""
  return workdir_lib.lock(workdir) if mesh.is_writer() else contextlib.nullcontext()


def train_and_evaluate(cfg, workdir: str, on_epoch=None, stop=None) -> dict:
  """config -> data -> (embeddings) -> K-seed training -> test scores in `workdir`.

  Validates `cfg`, locks `workdir` and resumes its checkpoint only when the run
  fingerprint matches (m6jax.workdir). Returns the results dict also written to
  `workdir/results.json`. on_epoch: optional callback for each epoch's history
  record (tracking). stop: the caller's m6jax.train.preemption.StopFlag (else
  training installs its own SIGTERM/SIGINT handling).
  """
  config_lib.validate(cfg)
  with _locked(workdir):
    _refuse_mismatch(cfg, workdir)
    return _train_and_evaluate(cfg, workdir, on_epoch, _Timer(), stop)


def _refuse_mismatch(cfg, workdir: str) -> None:
  """Raises WorkdirMismatch (config, catalogue or code) before the workdir is written:
  the run's one fingerprint check (the dataset id is computed without building it)."""
  if cfg.train.checkpoint and mesh.is_writer():
    workdir_lib.check(workdir, workdir_lib.fingerprint(cfg, tfds_builder.dataset_id(cfg.data)),
                      record=False, allow_code_change=cfg.train.allow_code_change)


def _train_and_evaluate(cfg, workdir: str, on_epoch, timer: _Timer, stop=None) -> dict:
  """train_and_evaluate of a validated `cfg` in a locked, checked `workdir`."""
  guard = cfg.train.checkpoint and mesh.is_writer()
  if mesh.is_writer():
    files.write_json(os.path.join(workdir, "config.json"), cfg.to_dict())
  with timer("setup"):
    run = prepare.setup(cfg, workdir)
    if mesh.is_writer():
      run.report.write(workdir)
  if guard:
    workdir_lib.check(workdir, workdir_lib.fingerprint(cfg, run.dataset_id()),
                      allow_code_change=cfg.train.allow_code_change)
  if run.report.bad:
    log.warning("%d bad rows skipped; see %s", len(run.report.bad),
                os.path.join(workdir, "data_report.txt"))
  with timer("train"), checkpoint.Checkpoints(workdir, enabled=cfg.train.checkpoint) as ckpt:
    states, history = run.trainer.fit(run.cols["validation"]["label"], ckpt,
                                      on_epoch=on_epoch, stop=stop)
  bundle.save(workdir, run, states)   # what predict/explain/serve need besides the checkpoint
  best_epoch = mesh.to_host(states.best_epoch).tolist()   # a collective: every process
  out: evals.Results = run_record(cfg, run, states, history, best_epoch)
  ctx = evals.Context(cfg, workdir, run, states, history, best_epoch)
  for name in cfg.evals:   # each evaluation adds its part (m6jax.evaluate.evals)
    fn, phase = evals.EVALS[name]
    t = time.time()
    part = fn(ctx)
    if part or phase == "evaluate":   # an analysis that does not apply takes no phase
      timer.add(phase, time.time() - t)
    out.update(part)
  out["timings"] = timer.total()
  if mesh.is_writer():
    files.write_json(os.path.join(workdir, "results.json"), out)
  s = out["test"]["summary"]
  b = out["test"]["bootstrap"]["accuracy"]
  log.info("test accuracy %.4f +- %.4f, macro-F1 %.4f +- %.4f (seed spread, %d seeds); "
           "ensemble accuracy %.4f, 95 %% over test products [%.4f, %.4f] (%.0f s)",
           s["accuracy"]["mean"], s["accuracy"]["std"], s["macro_f1"]["mean"],
           s["macro_f1"]["std"], cfg.seeds, out["test"]["ensemble"]["accuracy"], b["low"],
           b["high"], time.time() - timer.t0)
  return out


def run_record(cfg, run, states, history: list, best_epoch: list) -> dict:
  """results.json's description of the run (m6jax.evaluate.evals.Results); best_epoch
  (R,) each replica's selected epoch (TrainState.best_epoch on the host)."""
  validation = results.selection(history, best_epoch, cfg.train.select_by)
  return {
      "config_name": cfg.name, "mode": cfg.train.mode, "fusion": cfg.model.fusion,
      "seeds": [cfg.seed + k for k in range(cfg.seeds)],
      "replicas": run.trainer.num_replicas,
      "validation": validation,
      "best_val_macro_f1": validation.get("macro_f1", []),   # older readers
      "data": run.report.to_dict() | {"skipped": len(run.report.bad)},
      "history": history,
      # The step holding the scored parameters; predict/explain/serve read exactly it.
      "checkpoint_step": checkpoint.state_step(states) if cfg.train.checkpoint else None,
      "devices": [str(d) for d in jax.devices()],
  }


def use_xla_cache(cfg) -> None:
  """Keeps compiled XLA programs in cfg.train.xla_cache_dir across runs (unless
  this process already chose a cache): another experiment on the same catalogue
  (another head, a sweep cell) then loads its train, predict and Grad-CAM
  programs instead of compiling them. XLA keys each entry by the program, the
  jax version and the device, so an entry is only used where it applies."""
  path = cfg.train.xla_cache_dir
  if path == "none" or jax.config.jax_compilation_cache_dir is not None:
    return
  jax.config.update("jax_compilation_cache_dir", path or str(weights_lib.cache_dir() / "xla"))
  # Every program: the small ones add up (the default job compiles ~30).
  jax.config.update("jax_persistent_cache_min_compile_time_secs", 0.0)


def run(cfg, workdir: str, restart: bool = False, stop=None, **tracker_kwargs) -> dict:
  """Trains and evaluates `cfg` into `workdir`, adds Grad-CAM (cfg.explain) and
  logs everything to MLflow (cfg.track). Returns the results dict.

  The run's one config validation (a ConfigError before anything else, even
  before multi-host JAX starts) and its one fingerprint check.
  restart: discard the workdir's checkpoint, results and tracking state first
  (a fresh run, also in a new MLflow run). stop: see train_and_evaluate; a
  stop ends training at an epoch boundary with preemption.Preempted.
  """
  config_lib.validate(cfg)
  mesh.initialize_distributed(cfg.mesh)
  use_xla_cache(cfg)
  with _locked(workdir):
    if restart and mesh.is_writer():
      workdir_lib.clear(workdir)
    elif not restart:   # refuse before a tracking run is opened
      _refuse_mismatch(cfg, workdir)
    with tracker_lib.Tracker(cfg, workdir, **tracker_kwargs) as tracker:
      res = _train_and_evaluate(cfg, workdir, tracker.log_epoch, _Timer(), stop)
      tracker.log_results(res, workdir)
      if cfg.track.enabled and cfg.track.log_model and cfg.train.checkpoint:
        # All processes (orbax syncs them). The served model: bundle + the checkpoint
        # results.json scored. serve imports mlflow: only a tracked run loads it.
        from m6jax.inference import serve
        serve.log_to(tracker, workdir)
  mesh.barrier("run_end")   # the others wait for the writer, not jax's 5-min shutdown barrier
  return res
