"""One-step end-to-end runs of the main entry on the tiny catalogue."""

import json
import os
import subprocess
import sys

import numpy as np
import pytest

from m6jax import experiment
from tests.conftest import BAD, REPO, tiny_config


def test_train_and_evaluate_writes_outputs(tiny_catalogue, tmp_path):
  cfg = tiny_config(tiny_catalogue, str(tmp_path / "tfds"))
  out = experiment.train_and_evaluate(cfg, str(tmp_path / "run"))
  wd = tmp_path / "run"
  for f in ("config.json", "results.json", "report.txt", "confusion_matrix.png",
            "predictions_test.csv", "data_report.json", "data_report.txt"):
    assert (wd / f).is_file(), f
  res = json.loads((wd / "results.json").read_text())
  t = res["test"]
  assert len(t["per_seed"]["accuracy"]) == cfg.seeds
  assert len(t["per_seed"]["macro_f1"]) == cfg.seeds
  for k in ("accuracy", "macro_f1"):
    vals = np.array(t["per_seed"][k])
    assert abs(t["summary"][k]["mean"] - vals.mean()) < 1e-6
    assert abs(t["summary"][k]["std"] - vals.std(ddof=1)) < 1e-6
  assert set(t["report"]) >= set(res["classes"]) | {"macro avg", "weighted avg"}
  assert res["data"]["skipped"] == len(BAD)
  assert out["test"]["summary"]["accuracy"]["n"] == cfg.seeds
  assert set(res["timings"]) == {"setup", "train", "evaluate", "total"}
  assert res["timings"]["total"] >= res["timings"]["train"] > 0


def test_main_cli_with_overrides(tiny_catalogue, tmp_path):
  args = [sys.executable, "-m", "m6jax.main", "--config", os.path.join(REPO, "configs/smoke.py"),
          "--workdir", "run",  # relative on purpose: orbax needs it made absolute
          f"--config.data.manual_dir={tiny_catalogue}",
          f"--config.data.tfds_dir={tmp_path / 'tfds'}",
          "--config.data.max_image_pixels=500000", "--config.data.image_size=16",
          "--config.train.epochs=1", "--config.seeds=3", "--config.model.fusion=late"]
  r = subprocess.run(args, cwd=str(tmp_path), capture_output=True, text=True, timeout=300)
  assert r.returncode == 0, r.stderr[-3000:]
  res = json.loads((tmp_path / "run" / "results.json").read_text())
  assert res["fusion"] == "late" and len(res["test"]["per_seed"]["accuracy"]) == 3
  imp = res["modality_importance"]
  assert set(imp) == {"full", "without_image", "without_text", "drop_image", "drop_text"}
  assert abs(imp["full"] - res["test"]["ensemble"]["accuracy"]) < 1e-6
  cfg = json.loads((tmp_path / "run" / "config.json").read_text())
  assert cfg["seeds"] == 3 and cfg["train"]["epochs"] == 1
  assert "skipped" in r.stderr  # the bad rows are reported, not silently dropped


@pytest.mark.parametrize("override,expect", [
    ("--config.data.nonexistent=1", "data.nonexistent: unknown config key"),
    ("--config.seeds=0", "seeds=0: must be an integer >= 1"),
    ("--config.train.bn=frozen", "train.bn='frozen' was renamed: use 'fixed'"),
])
def test_config_errors_are_one_line_before_any_data_work(tmp_path, override, expect):
  tfds = tmp_path / "tfds"
  r = subprocess.run([sys.executable, "-m", "m6jax.main", "--config",
                      os.path.join(REPO, "configs/smoke.py"), "--workdir", str(tmp_path / "run"),
                      f"--config.data.tfds_dir={tfds}", override],
                     capture_output=True, text=True, timeout=300)
  assert r.returncode == 2, r.stderr[-3000:]
  lines = [x for x in r.stderr.splitlines() if x.strip()]
  assert len(lines) == 1 and expect in lines[0] and "Traceback" not in r.stderr, r.stderr
  assert not tfds.exists() and not (tmp_path / "run").exists()
