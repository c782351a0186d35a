"""Tracking: a real sqlite MLflow store, metric names, curves, the model seam, an unreachable
server, a store lost mid-run, replay."""

import json
import os
import subprocess
import sys

import ml_collections
import pytest

from m6jax import experiment
from m6jax.evaluate import curves
from m6jax.evaluate import results as results_lib
from m6jax.track import metric_names, mlflow_store
from m6jax.track import tracker as tracker_lib
from tests.conftest import REPO, tiny_config

HTTP_ENV = ("MLFLOW_HTTP_REQUEST_MAX_RETRIES", "MLFLOW_HTTP_REQUEST_TIMEOUT")
RECORD = {"loss": [1.0, 2.0], "grad_norm": [0.5, 0.7], "val_macro_f1": [0.4, 0.6],
          "val_accuracy": [0.5, 0.7], "seconds": 0.1}
KIND = ("mlflow.experimentKind", "custom_model_development")


@pytest.fixture(scope="module")
def tfds_dir(tmp_path_factory):
  return str(tmp_path_factory.mktemp("tfds"))


@pytest.fixture
def http_env():
  """The tracker sets the http retry/timeout env for its process: undo it after the test."""
  saved = {k: os.environ.pop(k, None) for k in HTTP_ENV}
  yield
  for k, v in saved.items():
    os.environ.pop(k, None)
    if v is not None:
      os.environ[k] = v


def _client(uri):
  from mlflow.tracking import MlflowClient
  return MlflowClient(uri)


def _steps(client, run_id, key):
  return sorted(m.step for m in client.get_metric_history(run_id, key))


def _train(cfg, wd, tracker):
  res = experiment.train_and_evaluate(cfg, wd, on_epoch=tracker.log_epoch)
  tracker.log_results(res, wd)
  return res


def test_import_does_not_load_mlflow():
  code = "import sys, m6jax.track.tracker; assert 'mlflow' not in sys.modules, 'mlflow imported'"
  subprocess.run([sys.executable, "-c", code], cwd=REPO, check=True, timeout=60)


# Runs m6jax.main in-process and prints which files were on the stack when mlflow was
# first imported (null: never).
_MLFLOW_PROBE = """
import json, sys, traceback
first = []
class Probe:
  def find_spec(self, name, path=None, target=None):
    if not first and name.split(".")[0] == "mlflow":
      first.append([f.filename for f in traceback.extract_stack()])
sys.meta_path.insert(0, Probe())
from absl import app
from m6jax import main
try:
  app.run(main.main, flags_parser=main.parse_flags)
except SystemExit as e:
  assert not e.code, e.code
print("MLFLOW " + json.dumps(first[0] if first else None))
"""


@pytest.mark.parametrize("track", [False, True])
def test_a_run_imports_mlflow_only_through_tracking(tiny_catalogue, tmp_path, track):
  """experiment.run with tracking off never imports mlflow (nor pandas through serve); with
  tracking on, the first import comes from m6jax.track."""
  script = tmp_path / "probe.py"
  script.write_text(_MLFLOW_PROBE)
  args = [sys.executable, str(script), "--config", os.path.join(REPO, "configs/smoke.py"),
          "--workdir", str(tmp_path / "run"), f"--config.data.manual_dir={tiny_catalogue}",
          f"--config.data.tfds_dir={tmp_path / 'tfds'}", "--config.data.max_image_pixels=500000",
          "--config.data.image_size=16", "--config.train.epochs=1",
          f"--config.track.enabled={track}", "--config.track.log_model=False",
          f"--config.track.uri=sqlite:///{tmp_path / 'mlflow.db'}"]
  r = subprocess.run(args, cwd=REPO, capture_output=True, text=True, timeout=300)
  assert r.returncode == 0, r.stderr[-3000:]
  stack = json.loads(r.stdout.split("MLFLOW ", 1)[1])
  if not track:
    assert stack is None, stack
    return
  ours = [f for f in stack if os.sep + "m6jax" + os.sep in f]
  assert ours and os.path.join("m6jax", "track") in ours[-1], ours


def test_tracked_run_reads_back_from_sqlite(tiny_catalogue, tfds_dir, tmp_path):
  cfg = tiny_config(tiny_catalogue, tfds_dir, **{"train.epochs": 2})
  wd = str(tmp_path / "runs" / "a")
  with tracker_lib.Tracker(cfg, wd, overrides={"train.epochs": 2}) as t:
    res = _train(cfg, wd, t)
  assert not t.degraded and t.run_id
  # default store: sqlite in the workdir's parent
  uri = tracker_lib.default_uri(str(tmp_path / "runs"))
  assert (tmp_path / "runs" / "mlflow.db").is_file()
  c = _client(uri)
  run = c.get_run(t.run_id)
  assert c.get_experiment(run.info.experiment_id).tags.get(KIND[0]) == KIND[1]
  assert run.info.status == "FINISHED" and run.info.run_name == "a epochs=2"
  p = run.data.params
  assert (p["model.fusion"], p["seeds"], p["train.epochs"], p["model.image.name"]) == (
      "early", "2", "2", "tiny")
  tags = run.data.tags
  assert "train.epochs=2" in tags["mlflow.note.content"] and "smoke" in tags["mlflow.note.content"]
  assert tags["mlflow.source.type"] == "LOCAL" and tags["mlflow.user"]   # mlflow's own context
  assert "cpu" in tags["m6jax.devices"].lower()
  for key in ("train/loss", "train/loss/seed_0", "train/loss/seed_1", "val/macro_f1/seed_1",
              "train/grad_norm", "val/accuracy", "val/macro_f1"):
    assert _steps(c, t.run_id, key) == [0, 1], key
  hist = sorted(c.get_metric_history(t.run_id, "val/macro_f1/seed_1"), key=lambda m: m.step)
  assert [m.value for m in hist] == pytest.approx([h["val_macro_f1"][1] for h in res["history"]])
  saved = json.loads((tmp_path / "runs" / "a" / "results.json").read_text())
  m, test = run.data.metrics, saved["test"]
  for k in ("accuracy", "macro_f1"):
    assert m[f"test/{k}"] == test["summary"][k]["mean"]
    for stat in ("std", "ci95_low", "ci95_high"):
      assert m[f"test/{k}/{stat}"] == test["summary"][k][stat], (k, stat)
    for s, v in zip(saved["seeds"], test["per_seed"][k]):
      assert m[f"test/{k}/seed_{s}"] == v
  assert m["test/ensemble/accuracy"] == test["ensemble"]["accuracy"]
  boot = test["bootstrap"]["accuracy"]
  assert m["test/bootstrap/accuracy"] == boot["point"] == test["ensemble"]["accuracy"]
  assert (m["test/bootstrap/accuracy_low"], m["test/bootstrap/accuracy_high"]) == (
      boot["low"], boot["high"])
  assert m["val/best_macro_f1"] == pytest.approx(sum(saved["best_val_macro_f1"]) / 2)
  assert not any("micro_f1" in k or "n_seeds" in k for k in m)   # == accuracy; a count
  assert all(0.0 <= v <= 1.0 for k, v in m.items()
             if "ci95" in k and "log_loss" not in k)   # scores; a loss is unbounded
  arts = {a.path for a in c.list_artifacts(t.run_id)}
  assert {"results.json", "confusion_matrix.png", "config.json", "report.txt",
          "training_curves.png", "metrics.jsonl"} <= arts
  assert not any(a.startswith("checkpoints") for a in arts)
  assert (tmp_path / "runs" / "a" / "training_curves.png").stat().st_size > 1000
  [ds] = run.inputs.dataset_inputs
  assert json.loads(ds.dataset.profile)["used_rows"] == saved["data"]["used_rows"]
  assert ds.dataset.digest and ds.dataset.name == os.path.basename(tiny_catalogue)
  lines = (tmp_path / "runs" / "a" / "metrics.jsonl").read_text().splitlines()
  assert [json.loads(x)["epoch"] for x in lines] == [0, 1]


def _fake_results(k=2):
  """results.json as train writes it, with every analysis, for k seeds."""
  hist = [{"epoch": e, "loss": [1.0 / (e + 1)] * k, "grad_norm": [0.1] * k,
           "val_macro_f1": [0.5 + 0.1 * e * (i % 2) for i in range(k)],
           "val_accuracy": [0.6 + 0.01 * e] * k, "seconds": 0.1} for e in range(3)]
  per = {"accuracy": [0.3, 0.9][:k] + [0.6] * (k - 2), "macro_f1": [0.2, 0.8][:k] + [0.5] * (k - 2)}
  from m6jax.evaluate import metrics
  summary = {n: metrics.seed_stats(v) for n, v in per.items()}
  # The epochs training selected (TrainState.best_epoch), as results.selection records them.
  sel = results_lib.selection(hist, [0, 2] + [1] * (k - 2), "macro_f1")
  return {"seeds": list(range(k)), "history": hist, "devices": ["TFRT_CPU_0"],
          "validation": sel, "best_val_macro_f1": sel["macro_f1"],
          "test": {"per_seed": per, "summary": summary,
                   "ensemble": {"accuracy": 0.7, "macro_f1": 0.6, "micro_f1": 0.7},
                   "bootstrap": {"accuracy": {"point": 0.7, "low": 0.62, "high": 0.78},
                                 "macro_f1": {"point": 0.6, "low": 0.5, "high": 0.7},
                                 "per_seed_mean": {"accuracy": {"point": 0.6, "low": 0.55,
                                                                "high": 0.66}},
                                 "resamples": 2000, "seed": 0, "level": 0.95}},
          "feasibility": {"text": {"ari": 0.4, "nmi": 0.5, "cluster_sizes": [1, 2]},
                          "fused": {"ari": 0.6, "nmi": 0.7}, "plot": "feasibility.png"},
          "gradcam": {"method": "gradcam", "stability": 0.8, "gallery": "gradcam/gallery.png"},
          "modality_importance": {"full": 0.7, "without_text": 0.4, "drop_text": 0.3},
          "data": {"csv": "/data/shop/products.csv", "total_rows": 9, "used_rows": 8,
                   "skipped_rows": 1, "class_counts": {"a": 8}},
          "timing_s": {"train": 1.5}}


def test_final_metrics_follow_the_naming_scheme():
  m = metric_names.final_metrics(_fake_results())
  assert m["test/accuracy"] == pytest.approx(0.6) and m["test/accuracy/seed_1"] == 0.9
  # Two seeds far apart: the t interval would leave [0, 1]; it is clipped.
  assert (m["test/accuracy/ci95_low"], m["test/accuracy/ci95_high"]) == (0.0, 1.0)
  assert m["test/ensemble/accuracy"] == 0.7 and "test/ensemble/micro_f1" not in m
  assert (m["test/bootstrap/accuracy"], m["test/bootstrap/accuracy_low"],
          m["test/bootstrap/accuracy_high"]) == (0.7, 0.62, 0.78)
  assert m["test/bootstrap/macro_f1_high"] == 0.7
  assert m["test/bootstrap/per_seed_mean/accuracy_low"] == 0.55
  assert m["val/best_macro_f1/seed_1"] == pytest.approx(0.7)
  assert m["val/best_accuracy/seed_1"] == pytest.approx(0.62)   # at seed 1's best epoch (2)
  assert m["val/best_accuracy/seed_0"] == pytest.approx(0.60)   # the state's epoch 0
  assert (m["feasibility/text/ari"], m["feasibility/fused/nmi"]) == (0.4, 0.7)
  assert m["gradcam/stability"] == 0.8
  assert (m["importance/text/drop"], m["importance/text/without"]) == (0.3, 0.4)
  assert m["time/train_s"] == 1.5
  assert not any("micro_f1" in k or "cluster" in k or "rows" in k for k in m)
  assert set(k.split("/")[0] for k in m) == {"test", "val", "feasibility", "gradcam",
                                              "importance", "time"}
  one = metric_names.final_metrics(dict(_fake_results(), test={"summary": {
      "accuracy": {"mean": 0.5, "std": 0.0, "ci95_low": None, "ci95_high": None, "n": 1}}}))
  assert "test/accuracy/ci95_low" not in one   # one seed: no interval, not a fake one


def test_results_analysis_curves_and_dataset_in_store(tmp_path, capsys):
  wd = tmp_path / "runs" / "fake"
  cfg = ml_collections.ConfigDict({"name": "fake", "seed": 0, "seeds": 2})
  res = _fake_results()
  with tracker_lib.Tracker(cfg, str(wd)) as t:
    for rec in res["history"]:
      t.log_epoch(rec)
    # The run's curves evaluation draws it (m6jax.evaluate.evals); the tracker records it.
    curves.plot_training_curves(res["history"], wd / "training_curves.png")
    t.log_results(res)
  c = _client(t.uri)
  run = c.get_run(t.run_id)
  m = run.data.metrics
  assert {"feasibility/text/ari", "feasibility/fused/nmi", "gradcam/stability",
          "importance/text/drop"} <= set(m)
  assert _steps(c, t.run_id, "val/macro_f1/seed_1") == [0, 1, 2]
  assert run.data.tags["m6jax.data.used_rows"] == "8"
  [ds] = run.inputs.dataset_inputs
  assert ds.dataset.name == "shop" and "products.csv" in ds.dataset.source
  assert "training_curves.png" in {a.path for a in c.list_artifacts(t.run_id)}
  out = capsys.readouterr().out.strip().splitlines()[-1]
  assert str(wd) in out and t.run_id in out and t.uri in out and "mlflow ui" in out


def test_training_curves_png(tmp_path):
  import matplotlib.image
  hist = _fake_results(k=3)["history"]
  path = curves.plot_training_curves(hist, tmp_path / "c.png", seeds=[5, 6, 7])
  img = matplotlib.image.imread(path)
  assert img.shape[1] > 1000 and img.std() > 0
  with pytest.raises(ValueError, match="empty"):
    curves.plot_training_curves([], tmp_path / "x.png")


def test_run_name_and_description():
  assert tracker_lib.make_run_name("runs/x") == "x"
  name = tracker_lib.make_run_name("runs/x/", {"seeds": 3, "model.fusion": "gated",
                                          "model.image.name": "resnet50",
                                          "data.manual_dir": "/long/path/to/shop"})
  assert name == "x seeds=3 fusion=gated image.name=resnet50 manual_dir=shop"
  from configs import default
  d = tracker_lib.describe(default.get_config(), "runs/x", {"seeds": 3})
  assert "early fusion" in d and "`seeds=3`" in d and "runs/x" in d


def test_log_pyfunc_seam(tmp_path):
  import mlflow.pyfunc
  import pandas as pd

  class Double(mlflow.pyfunc.PythonModel):
    def predict(self, context, model_input, params=None):
      return model_input["x"] * 2

  cfg = ml_collections.ConfigDict({"name": "m"})
  with tracker_lib.Tracker(cfg, str(tmp_path / "runs" / "m")) as t:
    for epoch, loss in enumerate([2.0, 1.0, 0.5]):
      t.log_epoch({"epoch": epoch, "loss": [loss]})
    t.log_metrics({"test/accuracy": 0.9})   # a final score, step 0
    uri = t.log_pyfunc(Double(), pip_requirements=[])
  assert uri.startswith("models:/")
  # The URI is saved with the run and printed in its summary.
  with open(tmp_path / "runs" / "m" / "tracking.json") as f:
    assert json.load(f)["model_uri"] == uri
  assert uri in t.summary()
  # The model's page shows the last epoch's metrics and the final scores.
  linked = {m.key: (m.step, m.value) for m in _client(t.uri).get_logged_model(
      uri.split("/")[-1]).metrics}
  assert linked["train/loss"] == (2, 0.5) and linked["test/accuracy"] == (0, 0.9)
  from mlflow.tracking._tracking_service.utils import _use_tracking_uri
  with _use_tracking_uri(t.uri):
    model = mlflow.pyfunc.load_model(uri)
  assert model.predict(pd.DataFrame({"x": [1, 4]})).tolist() == [2, 8]
  run = _client(t.uri).get_run(t.run_id)
  [out] = run.outputs.model_outputs
  assert uri.endswith(out.model_id)
  # Filed under the run's experiment and store, not MLflow's default "0" in ./mlruns.
  model = _client(t.uri).get_logged_model(out.model_id)
  assert model.experiment_id == run.info.experiment_id
  assert str(tmp_path / "runs" / "mlartifacts") in model.artifact_location
  off = tracker_lib.Tracker(ml_collections.ConfigDict({"track": {"enabled": False}}), str(tmp_path))
  assert off.log_pyfunc(Double()) is None


def test_unreachable_server_buffers_then_replays(tiny_catalogue, tfds_dir, tmp_path, caplog,
                                                 http_env):
  cfg = tiny_config(tiny_catalogue, tfds_dir)
  wd = str(tmp_path / "run")
  t = tracker_lib.Tracker(cfg, wd, uri="http://127.0.0.1:9")   # closed port on loopback
  with caplog.at_level("WARNING", logger="m6jax.track.tracker"), t:
    # Fails fast because nothing is retried and a request waits 5 s at most (asserted
    # as the settings that make it so, not as a wall-clock time).
    assert os.environ["MLFLOW_HTTP_REQUEST_MAX_RETRIES"] == "0"
    assert os.environ["MLFLOW_HTTP_REQUEST_TIMEOUT"] == "5"
    res = _train(cfg, wd, t)
  assert t.degraded and os.path.isfile(os.path.join(wd, "results.json"))
  warned = [r for r in caplog.records if "tracking unavailable" in r.getMessage()]
  assert len(warned) == 1 and "tracking_buffer.jsonl" in warned[0].getMessage()
  events = [json.loads(x) for x in open(os.path.join(wd, tracker_lib.BUFFER))]
  assert events[0]["event"] == "start" and events[-1] == {"event": "end", "status": "FINISHED"}
  finals = [e["metrics"] for e in events if e["event"] == "metrics"
            and "test/accuracy" in e["metrics"]]
  assert finals[0]["test/accuracy"] == res["test"]["summary"]["accuracy"]["mean"]

  uri = tracker_lib.default_uri(str(tmp_path / "store"))
  [(_, run_id)] = mlflow_store.replay(wd, uri=uri)
  c = _client(uri)
  run = c.get_run(run_id)
  assert run.info.status == "FINISHED"
  assert run.data.metrics["test/macro_f1"] == res["test"]["summary"]["macro_f1"]["mean"]
  assert run.data.params["model.fusion"] == "early"
  assert c.get_experiment(run.info.experiment_id).tags.get(KIND[0]) == KIND[1]
  assert _steps(c, run_id, "train/loss/seed_1") == [0]
  assert len(run.inputs.dataset_inputs) == 1
  assert "results.json" in {a.path for a in c.list_artifacts(run_id)}
  assert not os.path.exists(os.path.join(wd, tracker_lib.BUFFER))   # replayed: not pushed twice


def test_epoch_metrics_wait_and_go_in_one_write(tmp_path, monkeypatch):
  cfg = ml_collections.ConfigDict({"name": "fake", "seed": 0, "seeds": 2})
  wd = str(tmp_path / "runs" / "r")
  t = tracker_lib.Tracker(cfg, wd).start()
  calls = []
  real = t._store.client.log_batch
  monkeypatch.setattr(t._store.client, "log_batch",
                      lambda *a, **k: calls.append(len(k.get("metrics") or [])) or real(*a, **k))
  for e in range(5):
    t.log_epoch(dict(RECORD, epoch=e))
  c = _client(t.uri)
  assert calls == [] and _steps(c, t.run_id, "train/loss") == []   # waiting
  with open(os.path.join(wd, "metrics.jsonl")) as f:                 # ... but on disk
    assert len(f.readlines()) == 5
  t.log_metrics({"test/accuracy": 0.5})          # another event sends them first
  assert len(calls) == 2 and calls[0] == 5 * len(metric_names.epoch_metrics(RECORD, [0, 1]))
  assert _steps(c, t.run_id, "train/loss") == [0, 1, 2, 3, 4]
  monkeypatch.setattr(tracker_lib, "FLUSH_SECONDS", 0.0)   # the time limit sends them too
  t.log_epoch(dict(RECORD, epoch=5))
  assert _steps(c, t.run_id, "train/loss") == [0, 1, 2, 3, 4, 5]
  t.log_epoch(dict(RECORD, epoch=6))
  monkeypatch.setattr(tracker_lib, "FLUSH_SECONDS", 1e9)
  t.log_epoch(dict(RECORD, epoch=7))
  t.end("FINISHED")                              # ... and so does the end of the run
  assert _steps(c, t.run_id, "train/loss") == list(range(8))


def test_store_lost_mid_run_loses_nothing(tmp_path, caplog, monkeypatch):
  monkeypatch.setattr(tracker_lib, "FLUSH_SECONDS", 0.0)   # every epoch goes to the store at once
  cfg = ml_collections.ConfigDict({"name": "fake", "seed": 0, "seeds": 2})
  wd = str(tmp_path / "runs" / "r")
  t = tracker_lib.Tracker(cfg, wd).start()
  t.log_epoch(dict(RECORD, epoch=0))

  def down(*a, **k):
    raise ConnectionError("server went away")
  t._store.client.log_batch = down
  t._store.client.set_terminated = down
  with caplog.at_level("WARNING", logger="m6jax.track.tracker"):
    t.log_epoch(dict(RECORD, epoch=1))
    t.log_epoch(dict(RECORD, epoch=2))
    t.end("FINISHED")
  assert t.degraded
  assert sum("tracking unavailable" in r.getMessage() for r in caplog.records) == 1
  c = _client(t.uri)
  assert c.get_run(t.run_id).info.status == "RUNNING"
  assert _steps(c, t.run_id, "train/loss/seed_0") == [0]
  # The store is back: replay continues the same run without duplicating epoch 0.
  [(_, run_id)] = mlflow_store.replay(wd)
  assert run_id == t.run_id
  assert _steps(c, run_id, "train/loss/seed_0") == [0, 1, 2]
  assert _steps(c, run_id, "train/loss") == [0, 1, 2]
  assert c.get_run(run_id).info.status == "FINISHED"


def test_status_and_resume_of_unfinished_runs(tmp_path):
  cfg = ml_collections.ConfigDict({"name": "fake", "seed": 0})
  wd = str(tmp_path / "runs" / "r")
  with pytest.raises(ValueError):
    with tracker_lib.Tracker(cfg, wd) as t1:
      raise ValueError("boom")
  c = _client(t1.uri)
  assert c.get_run(t1.run_id).info.status == "FAILED"
  with pytest.raises(KeyboardInterrupt):
    with tracker_lib.Tracker(cfg, wd) as t2:
      raise KeyboardInterrupt
  assert t2.run_id == t1.run_id   # an unfinished run is continued, not duplicated
  assert c.get_run(t1.run_id).info.status == "KILLED"
  with tracker_lib.Tracker(cfg, wd) as t3:
    pass
  assert t3.run_id == t1.run_id and c.get_run(t1.run_id).info.status == "FINISHED"
  with tracker_lib.Tracker(cfg, wd) as t4:
    pass
  assert t4.run_id != t1.run_id   # a finished run is not reopened


def test_disabled_is_a_noop_but_keeps_metrics_jsonl(tmp_path):
  cfg = ml_collections.ConfigDict({"name": "off", "track": {"enabled": False}})
  wd = tmp_path / "runs" / "r"
  with tracker_lib.Tracker(cfg, str(wd)) as t:
    t.log_epoch(dict(RECORD, epoch=0))
    t.log_results({"test": {}}, str(wd))
  assert t.run_id is None and not (tmp_path / "runs" / "mlflow.db").exists()
  assert not (wd / tracker_lib.BUFFER).exists() and not (wd / tracker_lib.STATE).exists()
  assert len((wd / "metrics.jsonl").read_text().splitlines()) == 1


def test_uri_precedence_and_long_params(tmp_path, monkeypatch):
  cfg = ml_collections.ConfigDict({"track": {"uri": ""}, "note": "x" * 10000})
  monkeypatch.setenv("MLFLOW_TRACKING_URI", "")
  assert tracker_lib.resolve_uri(cfg, str(tmp_path / "runs" / "a")) == \
      f"sqlite:///{tmp_path / 'runs' / 'mlflow.db'}"
  monkeypatch.setenv("MLFLOW_TRACKING_URI", "http://example:5000")
  assert tracker_lib.resolve_uri(cfg, "w") == "http://example:5000"
  cfg.track.uri = "sqlite:////x/y.db"
  assert tracker_lib.resolve_uri(cfg, "w") == "sqlite:////x/y.db"
  flat = tracker_lib.flatten(cfg)
  assert len(mlflow_store.param_str(flat["note"])) <= mlflow_store.MAX_PARAM_LEN


def test_continued_run_does_not_log_an_epoch_twice(tmp_path):
  """Killed after logging epoch 1 but before checkpointing it: the rerun repeats epoch 1."""
  cfg = ml_collections.ConfigDict({"name": "fake", "seed": 0})
  wd = str(tmp_path / "runs" / "r")
  with pytest.raises(KeyboardInterrupt):
    with tracker_lib.Tracker(cfg, wd) as t1:
      t1.log_epoch(dict(RECORD, epoch=0))
      t1.log_epoch(dict(RECORD, epoch=1))
      raise KeyboardInterrupt
  with tracker_lib.Tracker(cfg, wd) as t2:
    t2.log_epoch(dict(RECORD, epoch=1))
    t2.log_epoch(dict(RECORD, epoch=2))
  assert t2.run_id == t1.run_id
  assert _steps(_client(t1.uri), t1.run_id, "train/loss") == [0, 1, 2]
