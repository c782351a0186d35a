"""Experiment tracking: one writer per run; metrics.jsonl always, MLflow when enabled.

  with Tracker(cfg, workdir, overrides={"seeds": 3}) as t:   # parent_run_id= nests it
    res = experiment.train_and_evaluate(cfg, workdir, on_epoch=t.log_epoch)
    t.log_results(res, workdir)

Store: cfg.track.uri, else $MLFLOW_TRACKING_URI, else sqlite:///<workdir/..>/mlflow.db.
The tracker only records: the files it logs are made by the run's evaluations
(m6jax.evaluate.evals). Nothing here raises into training but a failure to write
metrics.jsonl (a contracted output): a store that is down or lost mid-run turns
the tracker "degraded" and its events go to <workdir>/tracking_buffer.jsonl, which
`python -m m6jax.track.tracker replay WORKDIR` pushes later. mlflow is imported lazily.

Metric names: m6jax.track.metric_names.
"""

from __future__ import annotations

import json
import logging
import os
import time

from m6jax.files import write_json
from m6jax.track import metric_names, mlflow_store
from m6jax.track.mlflow_store import BUFFER, STATE, Store, dataset_event, param_str, read_json

log = logging.getLogger(__name__)

FLUSH_SECONDS = 5.0   # the longest epoch metrics wait before going to the store
ARTIFACTS = ("config.json", "results.json", "report.txt", "confusion_matrix.png",
             "training_curves.png", "feasibility.png", "feasibility.json", "data_report.json",
             "data_report.txt", "predictions_test.csv", "metrics.jsonl", "gradcam")


# ----------------------------------------------------------------- naming


def _section(cfg) -> dict:   # cfg.track as a dict ({} when there is none)
  t = cfg.get("track", None) if hasattr(cfg, "get") else None
  return dict(t.to_dict() if hasattr(t, "to_dict") else t or {})


def default_uri(store_dir: str) -> str:
  return "sqlite:///" + os.path.join(os.path.abspath(store_dir), "mlflow.db")


def resolve_uri(cfg, workdir: str, store_dir: str | None = None) -> str:
  """cfg.track.uri, else $MLFLOW_TRACKING_URI, else sqlite in store_dir (workdir's parent)."""
  uri = _section(cfg).get("uri") or os.environ.get("MLFLOW_TRACKING_URI") or ""
  return uri or default_uri(store_dir or os.path.dirname(os.path.abspath(workdir)))


def flatten(d, prefix: str = "") -> dict:
  """Nested dict / ConfigDict -> {'a.b.c': value}."""
  out = {}
  for k, v in (d.to_dict() if hasattr(d, "to_dict") else d).items():
    if hasattr(v, "to_dict") or isinstance(v, dict):
      out.update(flatten(v, f"{prefix}{k}.") or {f"{prefix}{k}": "{}"})
    else:
      out[f"{prefix}{k}"] = v
  return out


def short_keys(keys) -> dict:
  """Each dotted key -> its shortest dotted suffix that no other key shares."""
  keys = sorted(set(keys))
  out = {}
  for k in keys:
    parts = k.split(".")
    # 'name' alone says nothing: 'image.name=resnet50' does.
    for n in range(1 if parts[-1] != "name" else min(2, len(parts)), len(parts) + 1):
      suf = ".".join(parts[-n:])
      if not any(o != k and (o == suf or o.endswith("." + suf)) for o in keys):
        break
    out[k] = suf
  return out


def make_run_name(workdir: str, overrides: dict | None = None) -> str:
  """The workdir's name plus the config overrides: 'x seeds=3 fusion=gated'."""
  name = os.path.basename(os.path.abspath(workdir))
  short = short_keys(overrides or {})
  for k, v in (overrides or {}).items():
    v = os.path.basename(v.rstrip("/")) if isinstance(v, str) and os.sep in v else v
    name += f" {short[k]}={param_str(v)[:24]}"
  return name[:250]


def describe(cfg, workdir: str, overrides: dict | None = None) -> str:
  """The run description (markdown) MLflow shows on the run page."""
  def g(*path):
    return _get(cfg, path)
  lines = [f"**{g('name') or 'run'}** config: {g('model', 'fusion')} fusion, "
           f"text `{g('model', 'text', 'name')}`, image `{g('model', 'image', 'name')}`, "
           f"train.mode={g('train', 'mode')}, {g('seeds')} seeds x {g('train', 'epochs')} "
           f"epochs."]
  if overrides:
    lines.append("Overrides: " + ", ".join(f"`{k}={param_str(v)}`" for k, v in overrides.items()))
  lines.append(f"Workdir: `{os.path.abspath(workdir)}`")
  return "\n\n".join(lines)


def _get(cfg, path):
  for p in path:
    cfg = cfg.get(p) if hasattr(cfg, "get") else None
  return cfg


# ----------------------------------------------------------------- tracker


class Tracker:
  """One tracked run (context manager); no method raises into training.

  cfg: the run's ConfigDict (or a dict); its `track` section ({enabled, uri,
  experiment}) is read with defaults. parent_run_id nests the run (sweeps).
  run_name: default `make_run_name(workdir, overrides)`; overrides: the config
  overrides given (named in the run name and description). uri / store_dir
  override the store and the default store's folder. resume: continue the run
  in workdir/tracking.json when it is 'unfinished' (default), 'always' or 'never'.
  """

  def __init__(self, cfg, workdir, parent_run_id=None, run_name=None, *, uri=None,
               store_dir=None, tags=None, resume="unfinished", parent_workdir=None,
               overrides=None, description=None):
    sec = _section(cfg)
    self.cfg, self.workdir = cfg, os.path.abspath(workdir)
    from m6jax import mesh as mesh_lib  # jax: only runs that track import it
    self.writer = mesh_lib.is_writer()   # other processes of a multi-host run log nothing
    self.enabled = bool(sec.get("enabled", True)) and self.writer
    self.uri = uri or resolve_uri(cfg, workdir, store_dir)
    self.experiment = sec.get("experiment") or "m6jax"
    self.parent_run_id = parent_run_id
    self.parent_workdir = parent_workdir and os.path.abspath(parent_workdir)
    self.overrides = dict(overrides or {})
    self.run_name = run_name or make_run_name(workdir, self.overrides)
    self.description = description or describe(cfg, workdir, self.overrides)
    self.tags = dict(tags or {})
    self.resume = resume
    seed0, k = int(_get(cfg, ("seed",)) or 0), int(_get(cfg, ("seeds",)) or 1)
    self.seeds = [seed0 + i for i in range(k)]
    self.run_id = self.status = self._store = self.model_uri = None
    self.degraded = False
    self._journal = []
    self._logged_steps = set()   # epochs a continued run already has
    self._pending = []           # epoch metrics not yet sent (see _queue)
    self._last_flush = time.monotonic()

  @property
  def buffer_path(self):
    return os.path.join(self.workdir, BUFFER)

  def __enter__(self):
    return self.start()

  def __exit__(self, exc_type, exc, tb):
    self.end("FINISHED" if exc_type is None else "KILLED" if issubclass(
        exc_type, (KeyboardInterrupt, SystemExit)) else "FAILED")
    return False

  # --- the writer interface ----------------------------------------------------
  def start(self):
    os.makedirs(self.workdir, exist_ok=True)
    if not self.enabled:
      return self
    try:
      from mlflow.tracking.context.registry import resolve_tags  # git, user, source
      prev = read_json(os.path.join(self.workdir, STATE)) or {}
      same = prev.get("uri") == self.uri and prev.get("experiment") == self.experiment
      params = {k: v for k, v in flatten(self.cfg or {}).items() if not k.startswith("track.")}
      tags = resolve_tags(self.tags | {"mlflow.note.content": self.description,
                                       "m6jax.workdir": self.workdir})
      if self.parent_workdir:
        tags["m6jax.parent_workdir"] = self.parent_workdir
      self._emit({"event": "start", "uri": self.uri, "experiment": self.experiment,
                  "run_id": prev.get("run_id") if same and self.resume != "never" else None,
                  "run_name": self.run_name, "parent_run_id": self.parent_run_id,
                  "parent_workdir": self.parent_workdir, "tags": tags, "params": params})
    except Exception as e:  # noqa: BLE001 - tracking must never stop training
      log.warning("tracking: could not start: %s", e)
    return self

  def log_epoch(self, record: dict):
    """on_epoch callback: a metrics.jsonl line, and per-seed / mean metrics at step=epoch."""
    if not self.writer:
      return
    # metrics.jsonl is a contracted output: failing to write it fails the run.
    with open(os.path.join(self.workdir, "metrics.jsonl"), "a") as f:
      f.write(json.dumps(record, default=float) + "\n")
    try:
      if self.enabled and int(record["epoch"]) not in self._logged_steps:
        self._queue({"event": "metrics", "metrics": metric_names.epoch_metrics(record, self.seeds),
                     "step": int(record["epoch"]), "timestamp": int(time.time() * 1000)})
    except Exception as e:  # noqa: BLE001
      log.warning("tracking: could not log epoch: %s", e)

  def log_metrics(self, metrics: dict, step: int = 0):
    if self.enabled:
      self._emit({"event": "metrics", "metrics": {k: float(v) for k, v in metrics.items()},
                  "step": int(step), "timestamp": int(time.time() * 1000)})

  def log_artifacts(self, paths):
    """Files and folders (a folder keeps its name in the run's artifacts)."""
    paths = [os.path.abspath(p) for p in paths if os.path.exists(p)]
    if self.enabled and paths:
      self._emit({"event": "artifacts", "paths": paths})

  def set_tags(self, tags: dict):
    if self.enabled:
      self._emit({"event": "tags", "tags": {k: param_str(v) for k, v in tags.items()}})

  def log_results(self, results: dict, workdir: str | None = None):
    """Final metrics, the dataset input and the run's files (made by its evaluations,
    m6jax.evaluate.evals: the tracker only records)."""
    workdir = os.path.abspath(workdir or self.workdir)
    if not self.enabled:
      return
    try:
      self.log_metrics(metric_names.final_metrics(results))
      ev = dataset_event(results.get("data") or {})
      if ev:
        self._emit(ev)
      data = results.get("data") or {}
      self.set_tags({f"m6jax.data.{k}": data[k] for k in ("used_rows", "skipped_rows")
                     if k in data} | ({"m6jax.devices": results["devices"]}
                                      if results.get("devices") else {}))
      self.log_artifacts([os.path.join(workdir, a) for a in ARTIFACTS])
    except Exception as e:  # noqa: BLE001
      log.warning("tracking: could not log results: %s", e)

  def log_pyfunc(self, python_model, name: str = "model", **save_kwargs):
    """Logs an mlflow.pyfunc.PythonModel as this run's MLflow model; returns its
    'models:/<id>' URI (None when tracking is off or the store is unavailable).

    save_kwargs go to mlflow.pyfunc.save_model (artifacts, input_example,
    signature, pip_requirements, code_paths, ...). Not buffered: a model is
    logged only while the store answers.
    """
    if self.enabled:
      self._flush()
    if not self.enabled or self.degraded or self.run_id is None:
      log.warning("tracking: model %r not logged (tracking off or store unavailable)", name)
      return None
    try:
      self.model_uri = self._store.log_pyfunc(self.run_id, python_model, name, **save_kwargs)
      return self.model_uri
    except Exception as e:  # noqa: BLE001
      log.warning("tracking: could not log model %r: %s", name, e)
      return None

  def end(self, status: str = "FINISHED"):
    """FINISHED, FAILED or KILLED; prints where everything is. The first call wins."""
    if self.status is not None:
      return
    self.status = status
    if self.enabled:
      self._emit({"event": "end", "status": status})
    print(self.summary(), flush=True)

  def summary(self) -> str:
    """One line: where the results, the MLflow run and its UI are."""
    line = f"[m6jax] {self.status or 'RUNNING'}: results in {self.workdir}"
    if not self.enabled:
      return line + "; tracking off (metrics.jsonl only)"
    if self.degraded or self.run_id is None:
      return (line + f"; MLflow unavailable, events kept in {self.buffer_path}: "
              f"push them with `python -m m6jax.track.tracker replay {self.workdir}`")
    ui = ("./launch.sh ui" if self.uri == default_uri("runs") else
          f"mlflow ui --backend-store-uri {self.uri}")
    eid = self._store.experiment_ids.get(self.experiment, "0")
    # workflowType: MLflow 3.17's UI opens on its GenAI view unless told otherwise.
    page = f"#/experiments/{eid}/runs/{self.run_id}?workflowType=machine_learning"
    model = (f"\n[m6jax] model {self.model_uri}: serve it with `./launch.sh serve "
             f"{self.workdir}`" if self.model_uri else "")
    return line + (f"; MLflow run {self.run_id} in {self.uri}; browse with `{ui}`, "
                   f"then http://127.0.0.1:5000/{page}") + model

  # --- plumbing ----------------------------------------------------------------
  def _queue(self, ev):
    """An epoch's metrics event, sent with the others of the last FLUSH_SECONDS
    in one store write: one sqlite transaction per epoch was a third of the
    default job's training phase. Any other event, the model and the end of
    the run send what waits first; metrics.jsonl has every epoch at once."""
    self._pending.append(ev)
    if time.monotonic() - self._last_flush >= FLUSH_SECONDS:
      self._flush()

  def _flush(self):
    events, self._pending = self._pending, []
    self._last_flush = time.monotonic()
    if events:
      self._emit(events)

  def _emit(self, ev):
    """Sends one event (dict), or a list of metrics events as one write."""
    if isinstance(ev, dict):
      self._flush()   # what waits goes first, so the store sees events in order
    events = ev if isinstance(ev, list) else [ev]
    self._journal.extend(events)
    if self.degraded:
      return self._buffer(events)
    try:
      if isinstance(ev, list):
        if self._store is None or self.run_id is None:
          raise RuntimeError("no run was started")
        self._store.log_steps(self.run_id, events)
      else:
        self._apply(ev)
    except Exception as e:  # noqa: BLE001 - store down, gone, or refusing
      self.degraded = True
      msg = str(e).splitlines()[0] if str(e) else type(e).__name__
      if len(msg) > 300:  # the cause ("Connection refused") is at the end of mlflow's messages
        msg = msg[:150] + " ... " + msg[-140:]
      log.warning("tracking unavailable: %s; buffering to %s", msg, self.buffer_path)
      # The whole run so far goes to the buffer, so a replay into any store is complete;
      # the start event carries the run id (if one was made) to continue it instead.
      self._buffer(self._journal)

  def _apply(self, ev):
    if ev["event"] == "start":
      self._store = Store(self.uri)
      self.run_id = self._store.start(ev, self.resume)
      if self._store.resumed:
        # Killed between logging an epoch and checkpointing it: that epoch runs again.
        self._logged_steps = self._store.steps(self.run_id, metric_names.EPOCH_KEYS["loss"])
      ev["run_id"] = self.run_id
    elif self._store is None or self.run_id is None:
      raise RuntimeError("no run was started")
    else:
      self._store.apply(self.run_id, ev)
    if ev["event"] in ("start", "end"):
      self._save_state(ev.get("status", "RUNNING"))

  def _buffer(self, events):
    try:
      with open(self.buffer_path, "a") as f:
        f.writelines(json.dumps(ev, default=str) + "\n" for ev in events)
    except Exception as e:  # noqa: BLE001
      log.warning("tracking: could not write %s: %s", self.buffer_path, e)

  def _save_state(self, status):
    write_json(os.path.join(self.workdir, STATE),
               {"uri": self.uri, "experiment": self.experiment, "run_id": self.run_id,
                "parent_run_id": self.parent_run_id, "status": status}
               | ({"model_uri": self.model_uri} if self.model_uri else {}))


if __name__ == "__main__":   # python -m m6jax.track.tracker replay WORKDIR [--uri URI]
  mlflow_store.main()
