"""Tracking: a real sqlite MLflow store, an unreachable server, a store lost mid-run, replay."""

import json
import os
import subprocess
import sys
import time

import ml_collections
import pytest

from m6jax import experiment, track
from tests.conftest import REPO, tiny_config

HTTP_ENV = ("MLFLOW_HTTP_REQUEST_MAX_RETRIES", "MLFLOW_HTTP_REQUEST_TIMEOUT")
RECORD = {"loss": [1.0, 2.0], "grad_norm": [0.5, 0.7], "val_macro_f1": [0.4, 0.6],
          "val_accuracy": [0.5, 0.7], "seconds": 0.1}


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
  code = "import sys, m6jax.track; assert 'mlflow' not in sys.modules, 'mlflow imported'"
  subprocess.run([sys.executable, "-c", code], cwd=REPO, check=True, timeout=60)


def test_tracked_run_reads_back_from_sqlite(tiny_catalogue, tfds_dir, tmp_path):
  cfg = tiny_config(tiny_catalogue, tfds_dir, **{"train.epochs": 2})
  wd = str(tmp_path / "runs" / "a")
  with track.Tracker(cfg, wd) as t:
    res = _train(cfg, wd, t)
  assert not t.degraded and t.run_id
  # default store: sqlite in the workdir's parent
  uri = track.default_uri(str(tmp_path / "runs"))
  assert (tmp_path / "runs" / "mlflow.db").is_file()
  c = _client(uri)
  run = c.get_run(t.run_id)
  assert run.info.status == "FINISHED"
  p = run.data.params
  assert (p["model.fusion"], p["seeds"], p["train.epochs"], p["model.image.name"]) == (
      "early", "2", "2", "tiny")
  tags = run.data.tags
  assert tags["m6jax.config_name"] == "smoke" and tags["m6jax.jax_version"]
  assert "cpu" in tags["m6jax.devices"].lower()
  for key in ("loss/seed0", "loss/seed1", "loss/mean", "loss/std", "val_macro_f1/seed1",
              "grad_norm/mean", "val_accuracy/mean"):
    assert _steps(c, t.run_id, key) == [0, 1], key
  hist = sorted(c.get_metric_history(t.run_id, "val_macro_f1/seed1"), key=lambda m: m.step)
  assert [m.value for m in hist] == pytest.approx([h["val_macro_f1"][1] for h in res["history"]])
  saved = json.loads((tmp_path / "runs" / "a" / "results.json").read_text())
  m, test = run.data.metrics, saved["test"]
  for k in ("accuracy", "macro_f1"):
    for stat in ("mean", "std", "ci95_low", "ci95_high"):
      assert m[f"test/{k}/{stat}"] == test["summary"][k][stat], (k, stat)
    for s, v in zip(saved["seeds"], test["per_seed"][k]):
      assert m[f"test/{k}/seed{s}"] == v
  assert m["test/ensemble/accuracy"] == test["ensemble"]["accuracy"]
  assert m["test/n_seeds"] == 2
  assert m["val/best_macro_f1/mean"] == pytest.approx(sum(saved["best_val_macro_f1"]) / 2)
  arts = {a.path for a in c.list_artifacts(t.run_id)}
  assert {"results.json", "confusion_matrix.png", "config.json", "report.txt",
          "checkpoint.txt", "metrics.jsonl"} <= arts
  assert not any(a.startswith("checkpoints") for a in arts)   # a pointer, not the files
  assert (tmp_path / "runs" / "a" / "checkpoint.txt").read_text().strip().endswith(
      os.path.join("a", "checkpoints", "latest"))
  lines = (tmp_path / "runs" / "a" / "metrics.jsonl").read_text().splitlines()
  assert [json.loads(x)["epoch"] for x in lines] == [0, 1]


def test_unreachable_server_buffers_then_replays(tiny_catalogue, tfds_dir, tmp_path, caplog,
                                                 http_env):
  cfg = tiny_config(tiny_catalogue, tfds_dir)
  wd = str(tmp_path / "run")
  t = track.Tracker(cfg, wd, uri="http://127.0.0.1:9")   # closed port on loopback
  t0 = time.time()
  with caplog.at_level("WARNING", logger="m6jax.track"), t:
    assert time.time() - t0 < 20, "an unreachable store must fail fast"
    assert os.environ["MLFLOW_HTTP_REQUEST_MAX_RETRIES"] == "0"
    res = _train(cfg, wd, t)
  assert t.degraded and os.path.isfile(os.path.join(wd, "results.json"))
  warned = [r for r in caplog.records if "tracking unavailable" in r.getMessage()]
  assert len(warned) == 1 and "tracking_buffer.jsonl" in warned[0].getMessage()
  events = [json.loads(x) for x in open(os.path.join(wd, track.BUFFER))]
  assert events[0]["event"] == "start" and events[-1] == {"event": "end", "status": "FINISHED"}
  finals = [e["metrics"] for e in events if e["event"] == "metrics"
            and "test/accuracy/mean" in e["metrics"]]
  assert finals[0]["test/accuracy/mean"] == res["test"]["summary"]["accuracy"]["mean"]

  uri = track.default_uri(str(tmp_path / "store"))
  [(_, run_id)] = track.replay(wd, uri=uri)
  c = _client(uri)
  run = c.get_run(run_id)
  assert run.info.status == "FINISHED"
  assert run.data.metrics["test/macro_f1/mean"] == res["test"]["summary"]["macro_f1"]["mean"]
  assert run.data.params["model.fusion"] == "early"
  assert _steps(c, run_id, "loss/seed1") == [0]
  assert "results.json" in {a.path for a in c.list_artifacts(run_id)}
  assert not os.path.exists(os.path.join(wd, track.BUFFER))   # replayed: not pushed twice


def test_store_lost_mid_run_loses_nothing(tmp_path, caplog):
  cfg = ml_collections.ConfigDict({"name": "fake", "seed": 0, "seeds": 2})
  wd = str(tmp_path / "runs" / "r")
  t = track.Tracker(cfg, wd).start()
  t.log_epoch(dict(RECORD, epoch=0))

  def down(*a, **k):
    raise ConnectionError("server went away")
  t._store.client.log_batch = down
  t._store.client.set_terminated = down
  with caplog.at_level("WARNING", logger="m6jax.track"):
    t.log_epoch(dict(RECORD, epoch=1))
    t.log_epoch(dict(RECORD, epoch=2))
    t.end("FINISHED")
  assert t.degraded
  assert sum("tracking unavailable" in r.getMessage() for r in caplog.records) == 1
  c = _client(t.uri)
  assert c.get_run(t.run_id).info.status == "RUNNING"
  assert _steps(c, t.run_id, "loss/seed0") == [0]
  # The store is back: replay continues the same run without duplicating epoch 0.
  [(_, run_id)] = track.replay(wd)
  assert run_id == t.run_id
  assert _steps(c, run_id, "loss/seed0") == [0, 1, 2]
  assert _steps(c, run_id, "loss/mean") == [0, 1, 2]
  assert c.get_run(run_id).info.status == "FINISHED"


def test_status_and_resume_of_unfinished_runs(tmp_path):
  cfg = ml_collections.ConfigDict({"name": "fake", "seed": 0})
  wd = str(tmp_path / "runs" / "r")
  with pytest.raises(ValueError):
    with track.Tracker(cfg, wd) as t1:
      raise ValueError("boom")
  c = _client(t1.uri)
  assert c.get_run(t1.run_id).info.status == "FAILED"
  with pytest.raises(KeyboardInterrupt):
    with track.Tracker(cfg, wd) as t2:
      raise KeyboardInterrupt
  assert t2.run_id == t1.run_id   # an unfinished run is continued, not duplicated
  assert c.get_run(t1.run_id).info.status == "KILLED"
  with track.Tracker(cfg, wd) as t3:
    pass
  assert t3.run_id == t1.run_id and c.get_run(t1.run_id).info.status == "FINISHED"
  with track.Tracker(cfg, wd) as t4:
    pass
  assert t4.run_id != t1.run_id   # a finished run is not reopened


def test_disabled_is_a_noop_but_keeps_metrics_jsonl(tmp_path):
  cfg = ml_collections.ConfigDict({"name": "off", "track": {"enabled": False}})
  wd = tmp_path / "runs" / "r"
  with track.Tracker(cfg, str(wd)) as t:
    t.log_epoch(dict(RECORD, epoch=0))
    t.log_results({"test": {}}, str(wd))
  assert t.run_id is None and not (tmp_path / "runs" / "mlflow.db").exists()
  assert not (wd / track.BUFFER).exists() and not (wd / track.STATE).exists()
  assert len((wd / "metrics.jsonl").read_text().splitlines()) == 1


def test_uri_precedence_and_long_params(tmp_path, monkeypatch):
  cfg = ml_collections.ConfigDict({"track": {"uri": ""}, "note": "x" * 10000})
  monkeypatch.setenv("MLFLOW_TRACKING_URI", "")
  assert track.resolve_uri(cfg, str(tmp_path / "runs" / "a")) == \
      f"sqlite:///{tmp_path / 'runs' / 'mlflow.db'}"
  monkeypatch.setenv("MLFLOW_TRACKING_URI", "http://example:5000")
  assert track.resolve_uri(cfg, "w") == "http://example:5000"
  cfg.track.uri = "sqlite:////x/y.db"
  assert track.resolve_uri(cfg, "w") == "sqlite:////x/y.db"
  flat = track.flatten(cfg)
  assert len(track._param_str(flat["note"])) <= track.MAX_PARAM_LEN


def test_continued_run_does_not_log_an_epoch_twice(tmp_path):
  """Killed after logging epoch 1 but before checkpointing it: the rerun repeats epoch 1."""
  cfg = ml_collections.ConfigDict({"name": "fake", "seed": 0})
  wd = str(tmp_path / "runs" / "r")
  with pytest.raises(KeyboardInterrupt):
    with track.Tracker(cfg, wd) as t1:
      t1.log_epoch(dict(RECORD, epoch=0))
      t1.log_epoch(dict(RECORD, epoch=1))
      raise KeyboardInterrupt
  with track.Tracker(cfg, wd) as t2:
    t2.log_epoch(dict(RECORD, epoch=1))
    t2.log_epoch(dict(RECORD, epoch=2))
  assert t2.run_id == t1.run_id
  assert _steps(_client(t1.uri), t1.run_id, "loss/mean") == [0, 1, 2]


def test_attach_adds_later_outputs(tmp_path):
  wd = tmp_path / "runs" / "r"
  with track.Tracker(ml_collections.ConfigDict({"name": "fake"}), str(wd)) as t:
    pass
  (wd / "gradcam").mkdir()
  (wd / "gradcam" / "gallery.png").write_bytes(b"png")
  assert track.attach(str(wd), "gradcam", "missing.txt")
  assert [a.path for a in _client(t.uri).list_artifacts(t.run_id, "gradcam")] == [
      "gradcam/gallery.png"]
