"""Experiment tracking: MLflow runs with a local fallback that never stops training.

The only module that imports mlflow, and only inside functions, so importing
this module is cheap.

  with Tracker(cfg, workdir) as t:        # nested under parent_run_id when given
    res = experiment.train_and_evaluate(cfg, workdir, on_epoch=t.log_epoch)
    t.log_results(res, workdir)

Store: cfg.track.uri, else $MLFLOW_TRACKING_URI, else sqlite:///<workdir/..>/mlflow.db.
Files in the workdir:
  metrics.jsonl          one line per epoch record, always (tracking on, off or down)
  tracking.json          {uri, experiment, run_id, status}: a rerun resumes an unfinished run
  tracking_buffer.jsonl  what the store did not take (store down or gone mid-run);
                         `replay(workdir)` / `python -m m6jax.track replay WORKDIR` pushes it
  checkpoint.txt         where the best checkpoint is (logged instead of the checkpoint)

Metric names: per epoch `loss/seed0`, `loss/mean`, `loss/std` (also grad_norm,
val_macro_f1, val_accuracy; step = epoch); final `test/<metric>/{seedN,mean,std,
ci95_low,ci95_high}`, `test/ensemble/<metric>`, `val/best_{macro_f1,accuracy}/...`.
"""

from __future__ import annotations

import getpass
import json
import logging
import math
import os
import subprocess
import sys
import time

log = logging.getLogger(__name__)

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
BUFFER = "tracking_buffer.jsonl"
STATE = "tracking.json"
EPOCH_KEYS = ("loss", "grad_norm", "val_macro_f1", "val_accuracy")
FINAL_PER_SEED = ("accuracy", "macro_f1")
# MLflow 3 sends usage telemetry (config.mlflow-telemetry.io) unless told not to:
# runs stay offline. Read when mlflow is first imported, which only this module does.
os.environ.setdefault("MLFLOW_DISABLE_TELEMETRY", "true")
ARTIFACTS = ("config.json", "results.json", "report.txt", "confusion_matrix.png",
             "feasibility.png", "feasibility.json", "data_report.json", "data_report.txt",
             "predictions_test.csv", "metrics.jsonl", "checkpoint.txt")
ARTIFACT_DIRS = ("gradcam",)
MAX_PARAM_LEN = 6000      # mlflow's limit on one param value
MAX_KEY_LEN = 250
BATCH = 100               # mlflow's limit on params per log_batch call


# ------------------------------------------------------------------ config


def _section(cfg) -> dict:
  """cfg.track as a dict ({} when the config has none)."""
  if cfg is None:
    return {}
  t = cfg.get("track", None) if hasattr(cfg, "get") else None
  if t is None:
    return {}
  return dict(t.to_dict() if hasattr(t, "to_dict") else t)


def default_uri(store_dir: str) -> str:
  return "sqlite:///" + os.path.join(os.path.abspath(store_dir), "mlflow.db")


def resolve_uri(cfg, workdir: str, store_dir: str | None = None) -> str:
  """cfg.track.uri, else $MLFLOW_TRACKING_URI, else sqlite in store_dir (workdir's parent)."""
  uri = _section(cfg).get("uri") or os.environ.get("MLFLOW_TRACKING_URI") or ""
  if uri:
    return uri
  return default_uri(store_dir or os.path.dirname(os.path.abspath(workdir)))


def flatten(d, prefix: str = "") -> dict:
  """Nested dict / ConfigDict -> {'a.b.c': value}."""
  if hasattr(d, "to_dict"):
    d = d.to_dict()
  out = {}
  for k, v in d.items():
    key = f"{prefix}{k}"
    if hasattr(v, "to_dict") or isinstance(v, dict):
      sub = flatten(v, key + ".")
      out.update(sub if sub else {key: "{}"})
    else:
      out[key] = v
  return out


def _param_str(v) -> str:
  s = v if isinstance(v, str) else json.dumps(v, default=str) if isinstance(
      v, (list, tuple, dict)) else str(v)
  # mlflow rejects longer values; keep the head and say it was cut.
  return s if len(s) <= MAX_PARAM_LEN else s[:MAX_PARAM_LEN - 20] + "...[truncated]"


def _git_tags() -> dict:
  def git(*args):
    return subprocess.run(["git", "-C", REPO, *args], capture_output=True, text=True,
                          timeout=10, check=True).stdout.strip()
  try:
    tags = {"mlflow.source.git.commit": git("rev-parse", "HEAD")}
    tags["m6jax.git_dirty"] = str(bool(git("status", "--porcelain", "--untracked-files=no")))
    return tags
  except Exception:  # noqa: BLE001 - no git, not a repo: just no tag
    return {}


def _runtime_tags() -> dict:
  tags = {"mlflow.source.name": os.path.basename(sys.argv[0] or "python"),
          "m6jax.host": os.uname().nodename}
  try:
    tags["mlflow.user"] = getpass.getuser()
  except Exception:  # noqa: BLE001
    pass
  try:
    import jax
    tags["m6jax.jax_version"] = jax.__version__
    tags["m6jax.devices"] = _param_str([str(d) for d in jax.devices()])
  except Exception:  # noqa: BLE001
    pass
  return tags | _git_tags()


# ------------------------------------------------------------------- store


def _quick_http(uri: str) -> None:
  """An unreachable server must fail in seconds, not after minutes of retries."""
  if uri.startswith(("http://", "https://")):
    os.environ.setdefault("MLFLOW_HTTP_REQUEST_MAX_RETRIES", "0")
    os.environ.setdefault("MLFLOW_HTTP_REQUEST_TIMEOUT", "5")


class _Store:
  """Applies tracking events to one MLflow store (all calls may raise)."""

  def __init__(self, uri: str):
    _quick_http(uri)
    if uri.startswith("sqlite:///"):
      os.makedirs(os.path.dirname(uri[len("sqlite:///"):]) or ".", exist_ok=True)
    from mlflow.tracking import MlflowClient
    self.uri = uri
    self.client = MlflowClient(tracking_uri=uri)
    self.resumed = False    # did start() continue an existing run

  def experiment_id(self, name: str) -> str:
    exp = self.client.get_experiment_by_name(name)
    if exp is not None:
      return exp.experiment_id
    location = None
    if self.uri.startswith("sqlite:///"):
      # Otherwise mlflow puts artifacts in ./mlruns of whatever the cwd is.
      import pathlib
      root = os.path.dirname(os.path.abspath(self.uri[len("sqlite:///"):]))
      location = pathlib.Path(root, "mlartifacts", name).as_uri()
    return self.client.create_experiment(name, artifact_location=location)

  def get_run(self, run_id):
    if not run_id:
      return None
    try:
      return self.client.get_run(run_id)
    except Exception as e:  # noqa: BLE001
      if "RESOURCE_DOES_NOT_EXIST" in str(getattr(e, "error_code", "")) or "not found" in str(
          e).lower():
        return None
      raise

  def start(self, ev: dict, resume: str = "unfinished") -> str:
    """Creates (or continues ev['run_id']) a run; logs ev's params and tags."""
    eid = self.experiment_id(ev["experiment"])
    run = self.get_run(ev.get("run_id"))
    if run is not None and (resume == "always" or run.info.status != "FINISHED"):
      run_id = run.info.run_id
      self.client.update_run(run_id, status="RUNNING")
      have, self.resumed = run.data.params, True
    else:
      tags = dict(ev.get("tags") or {})
      if ev.get("parent_run_id"):
        tags["mlflow.parentRunId"] = ev["parent_run_id"]
      run_id = self.client.create_run(eid, run_name=ev.get("run_name"), tags=tags).info.run_id
      have, self.resumed = {}, False
    ev["run_id"] = run_id
    self.log(run_id, params=ev.get("params") or {}, tags=ev.get("tags") or {}, have=have)
    if ev.get("parent_run_id"):
      self.client.set_tag(run_id, "mlflow.parentRunId", ev["parent_run_id"])
    return run_id

  def log(self, run_id, params=None, tags=None, metrics=None, step=0, timestamp=None,
          have=None, dedup=False):
    from mlflow.entities import Metric, Param, RunTag
    params = {k[:MAX_KEY_LEN]: _param_str(v) for k, v in (params or {}).items()}
    if have:
      changed = sorted(k for k, v in params.items() if k in have and have[k] != v)
      if changed:  # params are immutable in mlflow: keep the first, say so
        log.warning("run %s: params changed since it started, kept the old values: %s",
                    run_id, changed)
      params = {k: v for k, v in params.items() if k not in have}
    ps = [Param(k, v) for k, v in params.items()]
    ts = [RunTag(k, _param_str(v)) for k, v in (tags or {}).items()]
    ms = []
    ms_time = int(timestamp if timestamp is not None else time.time() * 1000)
    for k, v in (metrics or {}).items():
      if dedup and any(m.step == step for m in self._history(run_id, k)):
        continue
      ms.append(Metric(k, float(v), ms_time, int(step)))
    for i in range(0, max(len(ps), len(ts), len(ms)), BATCH):
      self.client.log_batch(run_id, metrics=ms[i:i + BATCH], params=ps[i:i + BATCH],
                            tags=ts[i:i + BATCH])

  def _history(self, run_id, key):
    return self.client.get_metric_history(run_id, key)

  def artifacts(self, run_id, paths):
    for path, dest in paths:
      if os.path.isdir(path):
        self.client.log_artifacts(run_id, path, dest or os.path.basename(path))
      elif os.path.isfile(path):
        self.client.log_artifact(run_id, path, dest)

  def end(self, run_id, status):
    self.client.set_terminated(run_id, status)


# ----------------------------------------------------------------- tracker


def _read_json(path):
  try:
    with open(path) as f:
      return json.load(f)
  except (OSError, ValueError):
    return None


def _write_json(path, obj):
  tmp = path + ".tmp"
  with open(tmp, "w") as f:
    json.dump(obj, f, indent=2)
  os.replace(tmp, path)


def _seed_stats(vals):
  m = sum(vals) / len(vals)
  var = sum((v - m) ** 2 for v in vals) / (len(vals) - 1) if len(vals) > 1 else 0.0
  return m, math.sqrt(var)


class Tracker:
  """One tracked run (context manager); every method is safe to call and never raises.

  cfg: the run's ConfigDict (or a dict); its `track` section ({enabled, uri,
  experiment}) is read with defaults. parent_run_id nests the run (sweeps).
  uri / store_dir override the store and the default store's folder.
  resume: continue the run recorded in workdir/tracking.json when it is
  'unfinished' (default), 'always', or 'never'.
  """

  def __init__(self, cfg, workdir, parent_run_id=None, run_name=None, *, uri=None,
               store_dir=None, tags=None, resume="unfinished", parent_workdir=None):
    sec = _section(cfg)
    self.cfg = cfg
    self.workdir = os.path.abspath(workdir)
    self.enabled = bool(sec.get("enabled", True))
    self.uri = uri or resolve_uri(cfg, workdir, store_dir)
    self.experiment = sec.get("experiment") or "m6jax"
    self.parent_run_id = parent_run_id
    self.parent_workdir = parent_workdir and os.path.abspath(parent_workdir)
    self.run_name = run_name or (cfg.get("name") if hasattr(cfg, "get") else None) or \
        os.path.basename(self.workdir)
    self.tags = dict(tags or {})
    self.resume = resume
    self.seed0 = int(cfg.get("seed", 0)) if hasattr(cfg, "get") else 0
    self.run_id = None
    self.status = None
    self.degraded = False
    self._store = None
    self._journal = []
    self._logged_steps = set()   # epochs a continued run already has

  @property
  def buffer_path(self):
    return os.path.join(self.workdir, BUFFER)

  # --- context manager ---------------------------------------------------------
  def __enter__(self):
    self.start()
    return self

  def __exit__(self, exc_type, exc, tb):
    if exc_type is None:
      self.end("FINISHED")
    else:
      self.end("KILLED" if issubclass(exc_type, (KeyboardInterrupt, SystemExit)) else "FAILED")
    return False

  # --- events ------------------------------------------------------------------
  def start(self):
    os.makedirs(self.workdir, exist_ok=True)
    if not self.enabled:
      return self
    prev = _read_json(os.path.join(self.workdir, STATE)) or {}
    resume_id = prev.get("run_id") if (self.resume != "never" and prev.get("uri") == self.uri
                                       and prev.get("experiment") == self.experiment) else None
    params = flatten(self.cfg) if self.cfg is not None else {}
    params = {k: v for k, v in params.items() if not k.startswith("track.")}
    tags = _runtime_tags() | {"m6jax.workdir": self.workdir} | self.tags
    if hasattr(self.cfg, "get") and self.cfg.get("name"):
      tags["m6jax.config_name"] = str(self.cfg.get("name"))
    if self.parent_workdir:
      tags["m6jax.parent_workdir"] = self.parent_workdir
    self._emit({"event": "start", "uri": self.uri, "experiment": self.experiment,
                "run_id": resume_id, "run_name": self.run_name, "resume": self.resume,
                "parent_run_id": self.parent_run_id, "parent_workdir": self.parent_workdir,
                "workdir": self.workdir, "tags": tags, "params": params})
    return self

  def log_epoch(self, record: dict):
    """on_epoch callback: metrics.jsonl line + per-seed / mean / std metrics at step=epoch."""
    try:
      with open(os.path.join(self.workdir, "metrics.jsonl"), "a") as f:
        f.write(json.dumps(record, default=float) + "\n")
      if not self.enabled:
        return
      metrics = {}
      for key in EPOCH_KEYS:
        vals = [float(v) for v in record.get(key) or ()]
        if not vals:
          continue
        for k, v in enumerate(vals):
          metrics[f"{key}/seed{self.seed0 + k}"] = v
        metrics[f"{key}/mean"], metrics[f"{key}/std"] = _seed_stats(vals)
      if "seconds" in record:
        metrics["epoch_seconds"] = float(record["seconds"])
      self._emit({"event": "metrics", "metrics": metrics, "step": int(record["epoch"]),
                  "timestamp": int(time.time() * 1000), "epoch": True})
    except Exception as e:  # noqa: BLE001 - tracking must never stop training
      log.warning("tracking: could not log epoch: %s", e)

  def log_results(self, results: dict, workdir: str | None = None):
    """Final metrics (results.json's numbers) and the run's output files as artifacts."""
    if not self.enabled:
      return
    try:
      workdir = os.path.abspath(workdir or self.workdir)
      self._emit({"event": "metrics", "metrics": final_metrics(results), "step": 0,
                  "timestamp": int(time.time() * 1000)})
      best = os.path.join(workdir, "checkpoints", "latest")
      with open(os.path.join(workdir, "checkpoint.txt"), "w") as f:
        f.write(best + "\n")
      paths = [[os.path.join(workdir, a), None] for a in ARTIFACTS
               if os.path.isfile(os.path.join(workdir, a))]
      paths += [[os.path.join(workdir, d), d] for d in ARTIFACT_DIRS
                if os.path.isdir(os.path.join(workdir, d))]
      self._emit({"event": "artifacts", "paths": paths})
    except Exception as e:  # noqa: BLE001
      log.warning("tracking: could not log results: %s", e)

  def set_tags(self, tags: dict):
    if self.enabled:
      self._emit({"event": "tags", "tags": {k: str(v) for k, v in tags.items()}})

  def end(self, status: str = "FINISHED"):
    """FINISHED, FAILED or KILLED. Safe to call twice (the first wins)."""
    if self.status is not None:
      return
    self.status = status
    if not self.enabled:
      return
    self._emit({"event": "end", "status": status})
    if self.degraded:
      log.warning("tracking: %s holds this run's tracking events; push them with "
                  "`python -m m6jax.track replay %s`", self.buffer_path, self.workdir)

  # --- plumbing ----------------------------------------------------------------
  def _emit(self, ev):
    self._journal.append(ev)
    if not self.degraded:
      try:
        self._apply(ev)
        return
      except Exception as e:  # noqa: BLE001 - store down, gone, or refusing
        self._degrade(e)
        return
    self._buffer([ev])

  def _apply(self, ev):
    kind = ev["event"]
    if kind == "start":
      self._store = _Store(self.uri)
      self.run_id = self._store.start(ev, self.resume)
      if self._store.resumed:
        # Killed between logging an epoch and checkpointing it: that epoch runs again.
        self._logged_steps = {m.step for m in self._store._history(self.run_id, "loss/mean")}
      self._save_state("RUNNING")
      return
    if self._store is None or self.run_id is None:
      raise RuntimeError("no run was started")
    if kind == "metrics":
      if ev.get("epoch") and ev["step"] in self._logged_steps:
        return
      self._store.log(self.run_id, metrics=ev["metrics"], step=ev["step"],
                      timestamp=ev.get("timestamp"))
    elif kind == "tags":
      self._store.log(self.run_id, tags=ev["tags"])
    elif kind == "artifacts":
      self._store.artifacts(self.run_id, ev["paths"])
    elif kind == "end":
      self._store.end(self.run_id, ev["status"])
      self._save_state(ev["status"])

  def _degrade(self, err):
    self.degraded = True
    msg = str(err).splitlines()[0] if str(err) else type(err).__name__
    if len(msg) > 300:  # the cause ("Connection refused") is at the end of mlflow's messages
      msg = msg[:150] + " ... " + msg[-140:]
    log.warning("tracking unavailable: %s; buffering to %s", msg, self.buffer_path)
    # The whole run so far goes to the buffer, so a replay into any store is complete;
    # the start event carries the run id (if one was made) to continue it instead.
    self._buffer(self._journal)

  def _buffer(self, events):
    try:
      with open(self.buffer_path, "a") as f:
        for ev in events:
          f.write(json.dumps(ev, default=str) + "\n")
    except Exception as e:  # noqa: BLE001
      log.warning("tracking: could not write %s: %s", self.buffer_path, e)

  def _save_state(self, status):
    _write_json(os.path.join(self.workdir, STATE),
                {"uri": self.uri, "experiment": self.experiment, "run_id": self.run_id,
                 "parent_run_id": self.parent_run_id, "status": status})


def final_metrics(results: dict) -> dict:
  """results.json -> flat {name: value} of the final scores."""
  out = {}
  test = results.get("test", {})
  seeds = results.get("seeds") or list(range(len(test.get("per_seed", {}).get("accuracy", []))))
  for k in FINAL_PER_SEED:
    for s, v in zip(seeds, test.get("per_seed", {}).get(k, [])):
      out[f"test/{k}/seed{s}"] = v
  for k, st in test.get("summary", {}).items():
    for stat in ("mean", "std", "ci95_low", "ci95_high"):
      if isinstance(st.get(stat), (int, float)):
        out[f"test/{k}/{stat}"] = st[stat]
    out["test/n_seeds"] = st.get("n", len(seeds))
  for k, v in test.get("ensemble", {}).items():
    if isinstance(v, (int, float)):
      out[f"test/ensemble/{k}"] = v
  for name, vals in best_val(results).items():
    for s, v in zip(seeds, vals):
      out[f"val/best_{name}/seed{s}"] = v
    out[f"val/best_{name}/mean"], out[f"val/best_{name}/std"] = _seed_stats(vals)
  for k, v in (results.get("timings") or results.get("timing_s") or {}).items():
    out[f"time/{k}_s"] = v
  return {k: float(v) for k, v in out.items()}


def best_val(results: dict) -> dict:
  """Per-seed validation scores of the selected (best macro-F1) epoch:
  {'macro_f1': [K], 'accuracy': [K]} (accuracy only when the history has it)."""
  out = {}
  if results.get("best_val_macro_f1"):
    out["macro_f1"] = [float(v) for v in results["best_val_macro_f1"]]
  hist = results.get("history") or []
  if hist and all("val_accuracy" in h for h in hist):
    k = len(hist[0]["val_macro_f1"])
    acc = []
    for i in range(k):
      # train keeps the first epoch with the highest F1 (strict >)
      best = max(range(len(hist)), key=lambda e: (hist[e]["val_macro_f1"][i], -e))
      acc.append(float(hist[best]["val_accuracy"][i]))
    out["accuracy"] = acc
  return out


# ------------------------------------------------------------------ replay


def replay(workdir: str, uri: str | None = None, recursive: bool = True) -> list:
  """Pushes <workdir>/tracking_buffer.jsonl (and, recursively, those of its sweep
  cells, parents first) into a store: `uri`, else the one the run was aimed at.

  Continues the buffered run where the target store has it (metrics already
  there are not duplicated), else creates it. Returns [(workdir, run_id)].
  A replayed buffer is renamed to tracking_buffer.replayed.jsonl.
  """
  workdir = os.path.abspath(workdir)
  done = []
  buf = os.path.join(workdir, BUFFER)
  if os.path.isfile(buf):
    done.append((workdir, _replay_one(workdir, buf, uri)))
  if recursive:
    for name in sorted(os.listdir(workdir)):
      sub = os.path.join(workdir, name)
      if os.path.isdir(sub) and name not in ("checkpoints", "gradcam"):
        done += replay(sub, uri, recursive)
  return done


def _replay_one(workdir, buf, uri):
  with open(buf) as f:
    events = [json.loads(line) for line in f if line.strip()]
  starts = [e for e in events if e["event"] == "start"]
  if not starts:
    raise ValueError(f"{buf}: no start event")
  target = uri or starts[0]["uri"]
  store = _Store(target)
  run_id = None
  for ev in events:
    kind = ev["event"]
    if kind == "start":
      if run_id is None:
        ev = dict(ev, run_id=next((s["run_id"] for s in starts if s.get("run_id")), None))
        if ev.get("parent_run_id") and store.get_run(ev["parent_run_id"]) is None:
          ev["parent_run_id"] = None
        if not ev.get("parent_run_id") and ev.get("parent_workdir"):
          st = _read_json(os.path.join(ev["parent_workdir"], STATE)) or {}
          ev["parent_run_id"] = st.get("run_id") if st.get("uri") == target else None
        run_id = store.start(ev, resume="always")
        _relink_children(store, ev["experiment"], workdir, run_id)
      else:
        store.log(run_id, tags=ev.get("tags"), params=ev.get("params"),
                  have=store.client.get_run(run_id).data.params)
    elif kind == "metrics":
      # A continued run may hold some of these already (store went away mid-run).
      store.log(run_id, metrics=ev["metrics"], step=ev["step"], timestamp=ev.get("timestamp"),
                dedup=store.resumed)
    elif kind == "tags":
      store.log(run_id, tags=ev["tags"])
    elif kind == "artifacts":
      store.artifacts(run_id, ev["paths"])
    elif kind == "end":
      store.end(run_id, ev["status"])
  last = next((e["status"] for e in reversed(events) if e["event"] == "end"), "RUNNING")
  _write_json(os.path.join(workdir, STATE),
              {"uri": target, "experiment": starts[0]["experiment"], "run_id": run_id,
               "status": last, "replayed_from": buf})
  os.replace(buf, os.path.join(workdir, "tracking_buffer.replayed.jsonl"))
  log.info("replayed %d events from %s into run %s (%s)", len(events), buf, run_id, target)
  return run_id


def _relink_children(store, experiment, workdir, run_id):
  """Nests runs that were tracked while their parent (this sweep) was not."""
  eid = store.experiment_id(experiment)
  for run in store.client.search_runs([eid], f"tags.`m6jax.parent_workdir` = '{workdir}'"):
    if not run.data.tags.get("mlflow.parentRunId"):
      store.client.set_tag(run.info.run_id, "mlflow.parentRunId", run_id)


def attach(workdir: str, *names: str) -> bool:
  """Adds files/folders of a finished workdir (e.g. 'gradcam' after m6jax.explain) to
  the run recorded in its tracking.json. Never raises; False when not attached."""
  workdir = os.path.abspath(workdir)
  st = _read_json(os.path.join(workdir, STATE)) or {}
  paths = [[os.path.join(workdir, n), n if os.path.isdir(os.path.join(workdir, n)) else None]
           for n in names if os.path.exists(os.path.join(workdir, n))]
  if not st.get("run_id") or not paths:
    return False
  try:
    _Store(st["uri"]).artifacts(st["run_id"], paths)
    return True
  except Exception as e:  # noqa: BLE001
    log.warning("tracking: could not attach %s to run %s: %s", names, st["run_id"], e)
    return False


# ------------------------------------------------------------------ reading


def child_runs(uri: str, parent_run_id: str) -> list:
  """The runs nested under a parent: [{run_id, status, name, tags, params, metrics}]."""
  _quick_http(uri)
  from mlflow.tracking import MlflowClient
  # The client's search_runs is mlflow.search_runs without its process-global tracking URI.
  client = MlflowClient(tracking_uri=uri)
  parent = client.get_run(parent_run_id)
  runs, token = [], None
  while True:
    page = client.search_runs([parent.info.experiment_id],
                              f"tags.mlflow.parentRunId = '{parent_run_id}'",
                              order_by=["attributes.start_time ASC"], page_token=token)
    runs += list(page)
    token = page.token
    if not token:
      break
  return [{"run_id": r.info.run_id, "status": r.info.status, "name": r.info.run_name,
           "tags": dict(r.data.tags), "params": dict(r.data.params),
           "metrics": dict(r.data.metrics)} for r in runs]


def main(argv=None):
  import argparse
  p = argparse.ArgumentParser(prog="python -m m6jax.track",
                              description="push buffered tracking events into a store")
  sub = p.add_subparsers(dest="cmd", required=True)
  r = sub.add_parser("replay", help="replay WORKDIR's tracking_buffer.jsonl (and its cells')")
  r.add_argument("workdir")
  r.add_argument("--uri", default=None, help="target store (default: the one buffered)")
  args = p.parse_args(argv)
  logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
  for wd, run_id in replay(args.workdir, args.uri):
    print(f"{wd} -> run {run_id}")


if __name__ == "__main__":
  main()
