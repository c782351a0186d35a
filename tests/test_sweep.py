"""Sweeps: cells, overrides, nested runs, resume after an interruption, compare."""

import json
import os

import pytest

from m6jax.track import compare, sweep, tracker as tracker_lib
from tests.conftest import MAX_PIXELS, REPO


def test_grid_expands_to_named_cells():
  cells = sweep.expand({"name": "s", "base": "configs/smoke.py",
                        "cells": [{"name": "first", "seeds": 1}],
                        "grid": {"model.fusion": ["early", "late"],
                                 "model.image.name": ["tiny", "resnet50"]}})
  assert [c["name"] for c in cells] == [
      "first", "fusion=early__image.name=tiny", "fusion=early__image.name=resnet50",
      "fusion=late__image.name=tiny", "fusion=late__image.name=resnet50"]
  assert cells[2]["overrides"] == {"model.fusion": "early", "model.image.name": "resnet50"}
  # A cell's own base names it when no name is given; names are filesystem-safe.
  [c] = sweep.expand({"name": "s", "cells": [{"base": "configs/image_only.py:resnet50",
                                              "train.learning_rate": 0.01}]})
  assert c["name"] == "image_only-resnet50__learning_rate=0.01"
  with pytest.raises(ValueError, match="both named"):
    sweep.expand({"name": "s", "base": "b", "cells": [{"name": "x"}, {"name": "x"}]})


def test_overrides_are_checked():
  cfg = sweep.load_config("configs/image_only.py:efficientnet-lite1")
  assert cfg.model.image.name == "efficientnet-lite1" and cfg.model.fusion == "image"
  sweep.apply_overrides(cfg, {"train.epochs": 3, "train.learning_rate": 1})
  assert cfg.train.epochs == 3 and cfg.train.learning_rate == 1.0
  with pytest.raises(KeyError, match="model.imgae"):
    sweep.apply_overrides(cfg, {"model.imgae.name": "x"})
  with pytest.raises(KeyError, match="train.epoch=3"):   # a typo is not added as a new key
    sweep.apply_overrides(cfg, {"train.epoch": 3})
  with pytest.raises(TypeError, match="train.epochs='many'"):
    sweep.apply_overrides(cfg, {"train.epochs": "many"})
  # The same mechanism as `--config.a.b=v`: ml_collections' own flattened update.
  ref = sweep.load_config("configs/image_only.py:efficientnet-lite1")
  ref.update_from_flattened_dict({"train.epochs": 3, "train.learning_rate": 1})
  assert cfg.to_dict() == ref.to_dict()


def test_ablation_sweep_file():
  """Every cell of the real sweep file builds its config (overrides checked at load)."""
  s = sweep.load_sweep(os.path.join(REPO, "experiments", "ablation.py"))
  cfgs = {c["name"]: sweep.cell_config(s, c) for c in s["cells"]}
  assert s["name"] == "ablation" and len(cfgs) == len(s["cells"]) >= 8
  got = {n: (c.model.fusion, c.model.text.name if c.model.fusion == "text"
             else c.model.image.name if c.model.fusion == "image" else None, c.seeds)
         for n, c in cfgs.items()}
  assert {n: got[n] for n in ("text_minilm", "text_tfidf", "image_lite0", "image_lite2",
                              "fusion_early", "fusion_late", "fusion_gated")} == {
      "text_minilm": ("text", "minilm", 5), "text_tfidf": ("text", "tfidf", 5),
      "image_lite0": ("image", "efficientnet-lite0", 5),
      "image_lite2": ("image", "efficientnet-lite2", 5),
      "fusion_early": ("early", None, 5), "fusion_late": ("late", None, 5),
      "fusion_gated": ("gated", None, 5)}
  assert all(c.train.cache_dir == "runs/ablation/cache" for c in cfgs.values())


@pytest.fixture(scope="module")
def sweep_env(tiny_catalogue, tmp_path_factory):
  """Writes sweep files for the tiny catalogue (one shared TFDS build)."""
  tmp = tmp_path_factory.mktemp("sweep")
  overrides = {"data.manual_dir": tiny_catalogue, "data.tfds_dir": str(tmp / "tfds"),
               "data.max_image_pixels": MAX_PIXELS, "data.image_size": 16,
               "data.batch_size": 8, "data.columns.name": "product_name",
               "train.batch_size": 8, "train.epochs": 1, "seeds": 2}

  def write(name, **spec):
    path = tmp / f"{name}.py"
    spec = {"name": name, "base": "configs/smoke.py", **spec,
            "overrides": {**overrides, **spec.get("overrides", {})}}
    path.write_text("def get_sweep():\n  return " + repr(spec) + "\n")
    return str(path)
  return tmp, write


@pytest.fixture(scope="module")
def tiny_sweep(sweep_env):
  """A 2-cell sweep, interrupted after its first cell (--only), then rerun."""
  tmp, write = sweep_env
  path = write("tiny", grid={"model.fusion": ["early", "late"]})
  root = tmp / "runs"
  assert sweep.main(["--sweep", path, "--root", str(root), "--only", "fusion=early"]) == 0
  first = root / "tiny" / "fusion=early" / "results.json"
  mtime = first.stat().st_mtime_ns
  assert not (root / "tiny" / "fusion=late").exists()
  status = sweep.run_sweep(path, str(root))
  return {"root": root, "status": status, "first": first, "mtime": mtime}


def test_rerun_finishes_only_missing_cells(tiny_sweep):
  assert tiny_sweep["status"] == {"fusion=early": "skipped", "fusion=late": "done"}
  assert tiny_sweep["first"].stat().st_mtime_ns == tiny_sweep["mtime"]
  late = tiny_sweep["root"] / "tiny" / "fusion=late"
  assert json.loads((late / "results.json").read_text())["fusion"] == "late"


def test_cells_are_nested_runs_of_one_parent(tiny_sweep):
  from mlflow.tracking import MlflowClient
  root = tiny_sweep["root"]
  c = MlflowClient(tracker_lib.default_uri(str(root)))   # the sweep's store: <root>/mlflow.db
  exp = c.get_experiment_by_name("m6jax")
  runs = c.search_runs([exp.experiment_id])
  parents = [r for r in runs if r.data.tags.get("m6jax.role") == "sweep"]
  children = [r for r in runs if r.data.tags.get("m6jax.role") == "cell"]
  assert len(parents) == 1 and len(children) == 2   # the rerun reused the parent
  pid = parents[0].info.run_id
  assert {r.data.tags["mlflow.parentRunId"] for r in children} == {pid}
  assert sorted(r.data.tags["m6jax.cell"] for r in children) == ["fusion=early", "fusion=late"]
  assert all(r.info.status == "FINISHED" for r in runs)
  assert parents[0].data.tags["m6jax.cells_done"] == "2/2"
  assert c.get_experiment(exp.experiment_id).tags["mlflow.experimentKind"] == \
      "custom_model_development"
  assert {r.info.run_name for r in children} == {"fusion=early", "fusion=late"}


def test_sweep_parent_has_comparison_best_cell_and_metrics(tiny_sweep):
  from mlflow.tracking import MlflowClient
  root = tiny_sweep["root"]
  c = MlflowClient(tracker_lib.default_uri(str(root)))
  runs = c.search_runs([c.get_experiment_by_name("m6jax").experiment_id])
  [parent] = [r for r in runs if r.data.tags.get("m6jax.role") == "sweep"]
  best = parent.data.tags["m6jax.best_cell"]
  [child] = [r for r in runs if r.data.tags.get("m6jax.cell") == best]
  assert {"comparison.md", "comparison.png", "comparison.json"} <= {
      a.path for a in c.list_artifacts(parent.info.run_id)}
  pm, cm = parent.data.metrics, child.data.metrics
  for key in ("test/accuracy", "test/macro_f1/std", "test/ensemble/accuracy",
              "val/best_macro_f1"):
    assert pm[key] == pytest.approx(cm[key]), key
  assert all(0.0 <= v <= 1.0 for k, v in pm.items()
             if "ci95" in k and "log_loss" not in k)   # scores; a loss is unbounded
  assert "†" in (root / "tiny" / "comparison.md").read_text()   # 2 seeds: CI flagged


def test_compare_table_plot_and_best(tiny_sweep, tmp_path, monkeypatch):
  root = tiny_sweep["root"] / "tiny"
  out = compare.compare(str(root), "macro_f1", str(tmp_path / "cmp"))
  assert out["split"] == "validation" and "from MLflow" in out["source"]
  assert {r["source"] for r in out["rows"]} == {"mlflow"}
  vals = {}
  for cell in ("fusion=early", "fusion=late"):
    res = json.loads((root / cell / "results.json").read_text())
    vals[cell] = sum(res["best_val_macro_f1"]) / len(res["best_val_macro_f1"])
  assert out["best"] == max(vals, key=vals.get)
  md = (tmp_path / "cmp.md").read_text()
  assert "fusion=early" in md and "fusion=late" in md and "validation" in md
  assert f"**Best cell: {out['best']}**" in md
  assert (tmp_path / "cmp.png").stat().st_size > 1000
  # The store unreachable (or tracking off): the same answer from results.json files.
  monkeypatch.setenv("MLFLOW_HTTP_REQUEST_MAX_RETRIES", "0")
  monkeypatch.setenv("MLFLOW_HTTP_REQUEST_TIMEOUT", "5")
  files = compare.compare(str(root), "macro_f1", str(tmp_path / "cmp2"),
                          uri="http://127.0.0.1:9")
  assert files["best"] == out["best"] and "results.json" in files["source"]
  mlflow_row = {r["cell"]: r for r in out["rows"]}[out["best"]]
  files_row = {r["cell"]: r for r in files["rows"]}[out["best"]]
  assert mlflow_row["test"]["macro_f1"] == pytest.approx(files_row["test"]["macro_f1"])


def test_compare_pairs_each_cell_with_the_reference_on_the_same_products(tiny_sweep, tmp_path):
  root = tiny_sweep["root"] / "tiny"
  out = compare.compare(str(root), "macro_f1", str(tmp_path / "cmp"), reference="fusion=early")
  assert out["reference"] == "fusion=early"
  rows = {r["cell"]: r for r in out["rows"]}
  assert "paired" not in rows["fusion=early"]
  c = rows["fusion=late"]["paired"]
  res = {n: json.loads((root / n / "results.json").read_text()) for n in rows}
  n_test = len(res["fusion=late"]["test"]["per_seed"]["accuracy"]) and \
      len((root / "fusion=late" / "predictions_test.csv").read_text().splitlines()) - 1
  assert c["products"] == n_test
  acc = {n: r["test"]["ensemble"]["accuracy"] for n, r in res.items()}
  assert c["diff"] == pytest.approx(acc["fusion=late"] - acc["fusion=early"], abs=1e-9)
  assert c["low"] <= c["diff"] <= c["high"] and 0.0 <= c["p_mcnemar"] <= 1.0
  md = (tmp_path / "cmp.md").read_text()
  assert "Paired with the reference `fusion=early`" in md and "McNemar" in md
  # No cell is the default's: nothing is paired, and the table says how to name one.
  plain = compare.compare(str(root), "macro_f1", str(tmp_path / "cmp2"))
  assert plain["reference"] is None and "--reference" in plain["markdown"]


def test_killed_cell_resumes_its_checkpoint_and_run(sweep_env, monkeypatch):
  from mlflow.tracking import MlflowClient
  from m6jax import experiment
  tmp, write = sweep_env
  path = write("killed", cells=[{"model.fusion": "late"}],
               overrides={"train.epochs": 2, "train.checkpoint_every": 1})
  root = tmp / "runs_killed"
  real = experiment._train_and_evaluate   # what experiment.run calls inside its tracker

  def killed_in_epoch_1(cfg, workdir, on_epoch, timer, stop=None):
    def cb(rec):
      if rec["epoch"] == 1:
        raise KeyboardInterrupt   # Ctrl-C after epoch 0 was logged and checkpointed
      on_epoch(rec)
    return real(cfg, workdir, cb, timer, stop)
  monkeypatch.setattr(experiment, "_train_and_evaluate", killed_in_epoch_1)
  with pytest.raises(KeyboardInterrupt):
    sweep.run_sweep(path, str(root))
  monkeypatch.setattr(experiment, "_train_and_evaluate", real)
  cell = root / "killed" / "fusion=late"
  assert not (cell / "results.json").exists() and (cell / "checkpoints" / "latest").is_dir()
  run_id = json.loads((cell / tracker_lib.STATE).read_text())["run_id"]
  c = MlflowClient(tracker_lib.default_uri(str(root)))
  assert c.get_run(run_id).info.status == "KILLED"

  assert sweep.run_sweep(path, str(root)) == {"fusion=late": "done"}
  # same run, continued
  assert json.loads((cell / tracker_lib.STATE).read_text())["run_id"] == run_id
  assert sorted(m.step for m in c.get_metric_history(run_id, "train/loss/seed_0")) == [0, 1]
  assert c.get_run(run_id).info.status == "FINISHED"
  epochs = [json.loads(x)["epoch"] for x in (cell / "metrics.jsonl").read_text().splitlines()]
  assert epochs == [0, 1]   # epoch 0 was not trained again: resumed from its checkpoint


def test_a_stop_ends_the_sweep_inside_and_between_cells(sweep_env, monkeypatch):
  import signal
  from m6jax import experiment
  from m6jax.train import preemption
  tmp, write = sweep_env
  path = write("stopped", grid={"model.fusion": ["early", "late", "gated"]},
               overrides={"train.epochs": 3, "train.checkpoint_every": 10})
  root = tmp / "runs_stopped"
  real_run, real_train = experiment.run, experiment._train_and_evaluate   # run calls it

  def stop_after_first(cfg, workdir, **kw):   # a signal while cell 1 is being scored
    out = real_run(cfg, workdir, **kw)
    kw["stop"].request(signal.SIGTERM)
    return out
  monkeypatch.setattr(experiment, "run", stop_after_first)
  with pytest.raises(preemption.Preempted, match="sweep stopped stopped by SIGTERM: 1/3 "
                     "cells have results") as e:
    sweep.run_sweep(path, str(root))
  assert e.value.status == {"fusion=early": "done", "fusion=late": "not started (stopped)",
                            "fusion=gated": "not started (stopped)"}
  assert not (root / "stopped" / "fusion=late").exists()

  def stop_in_epoch_0(cfg, workdir, on_epoch, timer, stop=None):   # a signal during training
    def cb(rec):
      on_epoch(rec)
      if rec["epoch"] == 0:
        stop.request(signal.SIGINT)
    return real_train(cfg, workdir, cb, timer, stop)
  monkeypatch.setattr(experiment, "run", real_run)
  monkeypatch.setattr(experiment, "_train_and_evaluate", stop_in_epoch_0)
  with pytest.raises(preemption.Preempted, match="by SIGINT: 1/3") as e:
    sweep.run_sweep(path, str(root))
  assert e.value.exit_code == 128 + signal.SIGINT
  assert e.value.status["fusion=early"] == "skipped"
  assert e.value.status["fusion=late"].startswith("stopped: stopped by SIGINT after epoch 0")
  assert e.value.status["fusion=gated"] == "not started (stopped)"
  late = root / "stopped" / "fusion=late"
  assert not (late / "results.json").exists() and (late / "checkpoints" / "latest").is_dir()

  monkeypatch.setattr(experiment, "_train_and_evaluate", real_train)
  assert sweep.run_sweep(path, str(root)) == {"fusion=early": "skipped", "fusion=late": "done",
                                              "fusion=gated": "done"}
  epochs = [json.loads(x)["epoch"] for x in (late / "metrics.jsonl").read_text().splitlines()]
  assert epochs == [0, 1, 2]   # epoch 0 was saved at the stop and not trained again
