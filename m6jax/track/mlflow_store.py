"""The MLflow side of tracking: one store's client calls, buffer replay, reading runs.

m6jax.track.tracker decides what is logged; this module is the only one that talks to
MLflow, and it imports mlflow inside functions only (importing it is cheap).
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import time
import warnings

from m6jax import console
from m6jax.files import write_json

log = logging.getLogger(__name__)
# MLflow 3 sends usage telemetry (config.mlflow-telemetry.io) unless told not to:
# runs stay offline. Read when mlflow is first imported, which only this module does.
os.environ.setdefault("MLFLOW_DISABLE_TELEMETRY", "true")

BUFFER = "tracking_buffer.jsonl"   # events the store did not take, for `replay`
STATE = "tracking.json"            # {uri, experiment, run_id, status} of the workdir's run
KIND_TAG = ("mlflow.experimentKind", "custom_model_development")   # MLflow's training view
MAX_PARAM_LEN = 6000               # mlflow's limit on one param value
BATCH = 100                        # mlflow's limit on params per log_batch call


def param_str(v) -> str:
  """A param / tag value as mlflow stores it (JSON for containers, cut to its limit)."""
  s = v if isinstance(v, str) else json.dumps(v, default=str) if isinstance(
      v, (list, tuple, dict)) else str(v)
  return s if len(s) <= MAX_PARAM_LEN else s[:MAX_PARAM_LEN - 20] + "...[truncated]"


def read_json(path):
  """A JSON file's content, or None when it is missing or unreadable."""
  try:
    with open(path) as f:
      return json.load(f)
  except (OSError, ValueError):
    return None


def client(uri: str):
  """An MlflowClient for `uri`; an unreachable server fails in seconds, not minutes."""
  if uri.startswith(("http://", "https://")):
    os.environ.setdefault("MLFLOW_HTTP_REQUEST_MAX_RETRIES", "0")
    os.environ.setdefault("MLFLOW_HTTP_REQUEST_TIMEOUT", "5")
  if uri.startswith("sqlite:///"):
    os.makedirs(os.path.dirname(uri[len("sqlite:///"):]) or ".", exist_ok=True)
  from mlflow.tracking import MlflowClient
  return MlflowClient(tracking_uri=uri)


def dataset_event(data: dict, name: str = "") -> dict | None:
  """results['data'] (the builder's report) -> an MLflow dataset input event.

  The digest is the builder's fingerprint when the report has one, else a hash
  of the report's counts (csv, rows, classes, splits)."""
  if not data or not data.get("csv"):
    return None
  profile = {k: data[k] for k in ("total_rows", "used_rows", "skipped_rows", "class_counts",
                                  "split_counts") if k in data}
  digest = data.get("fingerprint") or hashlib.sha1(json.dumps(
      [data["csv"], profile], sort_keys=True).encode()).hexdigest()
  csv = os.path.abspath(data["csv"])
  return {"event": "input", "name": name or os.path.basename(os.path.dirname(csv)),
          "digest": str(digest)[:36], "uri": csv, "profile": profile}


class Store:
  """Applies tracking events to one MLflow store (every call may raise)."""

  def __init__(self, uri: str):
    self.uri = uri
    self.client = client(uri)
    self.resumed = False    # did start() continue an existing run
    self.experiment_ids = {}

  def experiment_id(self, name: str) -> str:
    exp = self.client.get_experiment_by_name(name)
    if exp is None:
      location = None
      if self.uri.startswith("sqlite:///"):
        # Otherwise mlflow puts artifacts in ./mlruns of whatever the cwd is.
        import pathlib
        root = os.path.dirname(os.path.abspath(self.uri[len("sqlite:///"):]))
        location = pathlib.Path(root, "mlartifacts", name).as_uri()
      return self.client.create_experiment(name, artifact_location=location,
                                           tags=dict([KIND_TAG]))
    if exp.tags.get(KIND_TAG[0]) != KIND_TAG[1]:
      self.client.set_experiment_tag(exp.experiment_id, *KIND_TAG)
    return exp.experiment_id

  def get_run(self, run_id):
    try:
      return self.client.get_run(run_id) if run_id else None
    except Exception as e:  # noqa: BLE001
      if "RESOURCE_DOES_NOT_EXIST" in str(getattr(e, "error_code", "")):
        return None
      raise

  def start(self, ev: dict, resume: str = "unfinished") -> str:
    """Creates (or continues ev['run_id']) a run; logs ev's params and tags."""
    eid = self.experiment_id(ev["experiment"])
    self.experiment_ids[ev["experiment"]] = eid
    run = self.get_run(ev.get("run_id"))
    tags = {k: param_str(v) for k, v in (ev.get("tags") or {}).items()}
    if ev.get("parent_run_id"):
      tags["mlflow.parentRunId"] = ev["parent_run_id"]
    self.resumed = run is not None and (resume == "always" or run.info.status != "FINISHED")
    if self.resumed:
      run_id = run.info.run_id
      self.client.update_run(run_id, status="RUNNING")
    else:
      run_id = self.client.create_run(eid, run_name=ev.get("run_name"), tags=tags).info.run_id
    have = run.data.params if self.resumed else {}
    params = {k: param_str(v) for k, v in (ev.get("params") or {}).items()}
    changed = sorted(k for k, v in params.items() if k in have and have[k] != v)
    if changed:  # params are immutable in mlflow: keep the first, say so
      log.warning("run %s: params changed since it started, kept the old values: %s",
                  run_id, changed)
    self.log(run_id, params={k: v for k, v in params.items() if k not in have}, tags=tags)
    return run_id

  def log(self, run_id, params=None, tags=None, metrics=None, step=0, timestamp=None,
          dedup=False):
    from mlflow.entities import Metric, Param, RunTag
    ps = [Param(k, param_str(v)) for k, v in (params or {}).items()]
    ts = [RunTag(k, param_str(v)) for k, v in (tags or {}).items()]
    ms_time = int(timestamp if timestamp is not None else time.time() * 1000)
    ms = [Metric(k, float(v), ms_time, int(step)) for k, v in (metrics or {}).items()
          if not (dedup and step in self.steps(run_id, k))]
    for i in range(0, max(len(ps), len(ts), len(ms)), BATCH):
      self.client.log_batch(run_id, metrics=ms[i:i + BATCH], params=ps[i:i + BATCH],
                            tags=ts[i:i + BATCH])

  def log_steps(self, run_id, events) -> None:
    """Metrics events {'metrics', 'step', 'timestamp'} of several steps, in as
    few log_batch calls as MLflow allows."""
    from mlflow.entities import Metric
    ms = [Metric(k, float(v), int(ev.get("timestamp") or time.time() * 1000), int(ev["step"]))
          for ev in events for k, v in ev["metrics"].items()]
    for i in range(0, len(ms), BATCH):
      self.client.log_batch(run_id, metrics=ms[i:i + BATCH])

  def steps(self, run_id, key) -> set:
    return {m.step for m in self.client.get_metric_history(run_id, key)}

  def artifacts(self, run_id, paths):
    for path in paths:
      if os.path.isdir(path):
        self.client.log_artifacts(run_id, path, os.path.basename(path))
      elif os.path.isfile(path):
        self.client.log_artifact(run_id, path)

  def log_input(self, run_id, ev):
    from mlflow.data.dataset_source_registry import resolve_dataset_source
    from mlflow.data.meta_dataset import MetaDataset
    from mlflow.entities import Dataset, DatasetInput, InputTag
    with warnings.catch_warnings():   # a local path matches two equivalent source kinds
      warnings.simplefilter("ignore")
      source = resolve_dataset_source(ev["uri"])
    d = MetaDataset(source, name=ev["name"], digest=ev["digest"])._to_mlflow_entity()
    d = Dataset(d.name, d.digest, d.source_type, d.source, d.schema,
                profile=json.dumps(ev["profile"]))
    self.client.log_inputs(run_id, [DatasetInput(d, [InputTag("mlflow.data.context",
                                                              "train/validation/test")])])

  def apply(self, run_id, ev):
    kind = ev["event"]
    if kind == "metrics":
      self.log(run_id, metrics=ev["metrics"], step=ev["step"], timestamp=ev.get("timestamp"),
               dedup=ev.get("dedup", False))
    elif kind == "tags":
      self.log(run_id, tags=ev["tags"])
    elif kind == "artifacts":
      self.artifacts(run_id, ev["paths"])
    elif kind == "input":
      self.log_input(run_id, ev)
    elif kind == "end":
      self.client.set_terminated(run_id, ev["status"])



  def log_pyfunc(self, run_id, python_model, name="model", **save_kwargs) -> str:
    """Logs a pyfunc PythonModel as an MLflow (3) logged model of `run_id`; its URI."""
    import mlflow
    from mlflow.tracking._tracking_service.utils import _use_tracking_uri
    if console.quiet():   # importing mlflow reset its loggers' levels
      console.quiet_libraries()
    # Model.log is pyfunc.log_model with an explicit run: no fluent active run to manage.
    # It files the model under the *active* experiment (else "0", whose artifacts go to
    # ./mlruns): point it at the run's own for this call.
    run = self.client.get_run(run_id)
    latest = list(getattr(run.data, "_metric_objs", []))   # each metric's newest entry
    step = max((m.step for m in latest), default=0)         # the last epoch
    saved = os.environ.get("MLFLOW_EXPERIMENT_ID")
    os.environ["MLFLOW_EXPERIMENT_ID"] = run.info.experiment_id
    try:
      with _use_tracking_uri(self.uri):
        # step: mlflow links the run's metrics of that step to the model (its page
        # shows them); the final scores, logged at step 0, are linked below.
        info = mlflow.models.Model.log(artifact_path=None, name=name, flavor=mlflow.pyfunc,
                                       python_model=python_model, run_id=run_id, step=step,
                                       **save_kwargs)
    finally:
      if saved is None:
        os.environ.pop("MLFLOW_EXPERIMENT_ID", None)
      else:
        os.environ["MLFLOW_EXPERIMENT_ID"] = saved
    self.link_metrics(run_id, info.model_id, [m for m in latest if m.step != step])
    return info.model_uri

  def link_metrics(self, run_id, model_id, metrics) -> None:
    """Links metric entries (mlflow Metric) of `run_id` to the logged model `model_id`."""
    from mlflow.entities import Metric
    linked = [Metric(m.key, m.value, m.timestamp, m.step, run_id=run_id, model_id=model_id)
              for m in metrics]
    for i in range(0, len(linked), 1000):   # log_batch takes at most 1000 metrics
      self.client.log_batch(run_id, metrics=linked[i:i + 1000])


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
      if os.path.isdir(sub) and name not in ("checkpoints", "gradcam", "cache"):
        done += replay(sub, uri, recursive)
  return done


def _replay_one(workdir, buf, uri):
  with open(buf) as f:
    events = [json.loads(line) for line in f if line.strip()]
  starts = [e for e in events if e["event"] == "start"]
  if not starts:
    raise ValueError(f"{buf}: no start event")
  target = uri or starts[0]["uri"]
  store = Store(target)
  start = dict(starts[0], run_id=next((s["run_id"] for s in starts if s.get("run_id")), None))
  if start.get("parent_run_id") and store.get_run(start["parent_run_id"]) is None:
    start["parent_run_id"] = None
  if not start.get("parent_run_id") and start.get("parent_workdir"):
    # The sweep parent was buffered too and replayed first: its state has the new id.
    st = read_json(os.path.join(start["parent_workdir"], STATE)) or {}
    start["parent_run_id"] = st.get("run_id") if st.get("uri") == target else None
  run_id = store.start(start, resume="always")
  for ev in events:
    if ev["event"] != "start":
      # A continued run may hold some metrics already (the store went away mid-run).
      store.apply(run_id, dict(ev, dedup=store.resumed))
  last = next((e["status"] for e in reversed(events) if e["event"] == "end"), "RUNNING")
  write_json(os.path.join(workdir, STATE),
             {"uri": target, "experiment": start["experiment"], "run_id": run_id,
              "status": last, "replayed_from": buf})
  os.replace(buf, os.path.join(workdir, "tracking_buffer.replayed.jsonl"))
  log.info("replayed %d events from %s into run %s (%s)", len(events), buf, run_id, target)
  return run_id


# ------------------------------------------------------------------ reading


def child_runs(uri: str, parent_run_id: str) -> list:
  """The runs nested under a parent: [{run_id, status, name, tags, params, metrics}]."""
  c = client(uri)
  parent = c.get_run(parent_run_id)
  runs, token = [], None
  while True:
    page = c.search_runs([parent.info.experiment_id],
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
  p = argparse.ArgumentParser(prog="python -m m6jax.track.tracker",
                              description="push buffered tracking events into a store")
  sub = p.add_subparsers(dest="cmd", required=True)
  r = sub.add_parser("replay", help="replay WORKDIR's tracking_buffer.jsonl (and its cells')")
  r.add_argument("workdir")
  r.add_argument("--uri", default=None, help="target store (default: the one buffered)")
  args = p.parse_args(argv)
  logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
  for wd, run_id in replay(args.workdir, args.uri):
    print(f"{wd} -> run {run_id}")
