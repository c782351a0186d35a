"""Checkpoint resume after a real kill, and the non-finite loss stop."""

import json
import os
import signal
import subprocess
import sys
import time

import pytest

from m6jax import experiment
from m6jax.train import trainer as trainer_lib
from tests.conftest import REPO, tiny_config


def _cmd(catalogue, tfds, workdir, epochs):
  return [sys.executable, "-m", "m6jax.main", "--config", os.path.join(REPO, "configs/smoke.py"),
          "--workdir", workdir, f"--config.data.manual_dir={catalogue}",
          f"--config.data.tfds_dir={tfds}", "--config.data.max_image_pixels=500000",
          "--config.data.image_size=16", f"--config.train.epochs={epochs}",
          "--config.train.batch_size=8", "--config.model.text.tfidf_dim=16"]


@pytest.mark.slow
def test_killed_run_resumes_to_the_same_result(tiny_catalogue, tmp_path):
  epochs = 120
  tfds = str(tmp_path / "tfds")
  ref = str(tmp_path / "ref")
  subprocess.run(_cmd(tiny_catalogue, tfds, ref, epochs), check=True, capture_output=True,
                 timeout=600)
  wd = str(tmp_path / "killed")
  latest = os.path.join(wd, "checkpoints", "latest")
  proc = subprocess.Popen(_cmd(tiny_catalogue, tfds, wd, epochs), stdout=subprocess.DEVNULL,
                          stderr=subprocess.DEVNULL, start_new_session=True)
  deadline = time.time() + 300
  while time.time() < deadline:
    steps = [d for d in os.listdir(latest) if d.isdigit()] if os.path.isdir(latest) else []
    if len(steps) >= 2:
      break
    time.sleep(0.05)
  os.killpg(proc.pid, signal.SIGKILL)
  proc.wait()
  assert not os.path.exists(os.path.join(wd, "results.json")), "run finished before the kill"
  r = subprocess.run(_cmd(tiny_catalogue, tfds, wd, epochs), capture_output=True, text=True,
                     timeout=600)
  assert r.returncode == 0, r.stderr[-3000:]
  assert "resumed from epoch" in r.stderr
  a = json.load(open(os.path.join(ref, "results.json")))
  b = json.load(open(os.path.join(wd, "results.json")))
  assert [h["loss"] for h in a["history"]] == [h["loss"] for h in b["history"]]
  assert a["best_val_macro_f1"] == b["best_val_macro_f1"]
  # The selected epoch is part of the checkpointed state: the resumed run keeps it.
  assert a["validation"]["best_epoch"] == b["validation"]["best_epoch"]
  assert a["test"]["bootstrap"] == b["test"]["bootstrap"]
  assert a["test"]["per_seed"] == b["test"]["per_seed"]
  # Same final parameters -> byte-identical ensemble probabilities.
  assert open(os.path.join(ref, "predictions_test.csv")).read() == \
      open(os.path.join(wd, "predictions_test.csv")).read()


def test_nonfinite_loss_stops_with_clear_error(tiny_catalogue, tmp_path):
  cfg = tiny_config(tiny_catalogue, str(tmp_path / "tfds"), **{
      "train.learning_rate": 1e38, "train.warmup_steps": 0, "train.epochs": 6,
      "model.fusion": "image"})
  with pytest.raises(trainer_lib.NonFiniteLoss, match="non-finite loss at epoch"):
    experiment.train_and_evaluate(cfg, str(tmp_path / "run"))
  assert not os.path.exists(tmp_path / "run" / "results.json")
