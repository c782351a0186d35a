"""m6jax.inference.restore: a finished run serves exactly the parameters results.json scored,
rebuilt from its bundle and checkpoint."""

import csv
import json
import os
import shutil
import subprocess
import sys

import jax
import numpy as np
import pytest

from m6jax import experiment, files
from m6jax.evaluate import results
from m6jax.inference import bundle, restore, serve
from m6jax.train import checkpoint
from tests.conftest import REPO, tiny_config


def test_replicas_peaking_at_different_epochs_are_served_as_scored(tiny_catalogue, tmp_path):
  cfg = tiny_config(tiny_catalogue, str(tmp_path / "tfds"),
                    **{"train.epochs": 3, "model.fusion": "late", "seeds": 3,
                       "train.select_by": "macro_f1", "train.checkpoint_every": 1})
  wd = str(tmp_path / "run")
  res = experiment.train_and_evaluate(cfg, wd)
  f1 = np.array([h["val_macro_f1"] for h in res["history"]])   # (epochs, K)
  best_epoch = f1.argmax(0)   # the first maximum: best_* change on strict improvement only
  # The case this test is about: replicas peak at different epochs, one before the last.
  assert len(set(best_epoch.tolist())) > 1 and best_epoch.min() < len(f1) - 1, f1
  np.testing.assert_allclose(res["best_val_macro_f1"], f1.max(0), atol=1e-6)
  assert res["validation"]["best_epoch"] == best_epoch.tolist()   # the state's own epoch

  _, run, params, stats = restore.restore(wd)
  probs = np.asarray(run.predict(params, stats, "test"))
  with open(os.path.join(wd, "predictions_test.csv")) as f:
    saved = list(csv.DictReader(f))
  ids = run.cols["test"]["uniq_id"]
  assert [r["uniq_id"] for r in saved] == list(ids)
  for row, p in zip(saved, probs.mean(0)):
    assert [row[f"p_{c}"] for c in run.class_names] == [f"{v:.6f}" for v in p]
  scores = results.score(run.cols["test"]["label"], probs, run.class_names)
  assert scores["per_seed"] == res["test"]["per_seed"]
  assert scores["ensemble"] == res["test"]["ensemble"]

  # The last epoch's parameters are a different model: serving them would differ.
  _, _, last, last_stats = restore.restore(wd, "latest")
  assert not np.allclose(np.asarray(run.predict(last, last_stats, "test")), probs)

  # K comes from the checkpoint; a bundle that disagrees is from another run.
  other = str(tmp_path / "other")
  shutil.copytree(wd, other)
  # A bundle and a checkpoint of different runs (a restarted workdir) are refused.
  fp_path = os.path.join(other, "checkpoints", "fingerprint.json")
  with open(fp_path) as f:
    fp = json.load(f)
  files.write_json(fp_path, {**fp, "config": {**fp["config"], "train.learning_rate": 0.5}})
  with pytest.raises(bundle.BundleError, match=r"different runs \(train.learning_rate"):
    restore.restore(other)
  files.write_json(fp_path, fp)
  meta_path = os.path.join(other, "bundle", "bundle.json")
  with open(meta_path) as f:
    meta = json.load(f)
  assert meta["num_replicas"] == 3 and probs.shape[0] == 3
  files.write_json(meta_path, dict(meta, num_replicas=2))
  with pytest.raises(bundle.BundleError, match="holds 3 replicas"):
    restore.restore(other)
  files.write_json(meta_path, meta)

  # The scored step is recorded and read, never another one.
  steps = sorted(int(d) for d in os.listdir(os.path.join(wd, "checkpoints", "latest")))
  assert len(steps) == 2 and res["checkpoint_step"] == meta["checkpoint_step"] == steps[-1]
  data = [os.path.join(d, n) for d, _, ns in
          os.walk(os.path.join(other, "checkpoints", "latest", str(steps[-1]), "state"))
          for n in ns if os.path.basename(d) == "d"]
  for p in data:   # the scored step unreadable; the older one intact
    with open(p, "r+b") as f:
      f.truncate(os.path.getsize(p) // 2)
  with pytest.raises(checkpoint.CheckpointError,
                     match=f"scored checkpoint step {steps[-1]}, which cannot be read.*"
                           rf"other step\(s\) \[{steps[0]}\]"):
    restore.restore(other)
  shutil.rmtree(os.path.join(other, "checkpoints", "latest", str(steps[-1])))
  with pytest.raises(checkpoint.CheckpointError,
                     match=rf"scored checkpoint step {steps[-1]}, but .* \[{steps[0]}\]"):
    restore.restore(other)
  with pytest.raises(checkpoint.CheckpointError, match=f"scored checkpoint step {steps[-1]}"):
    with serve.pyfunc_args(other):
      pass
  res_path = os.path.join(other, "results.json")
  files.write_json(res_path, dict(res, checkpoint_step=steps[0]))
  with pytest.raises(bundle.BundleError, match=f"scored checkpoint step {steps[0]}, the bundle "
                     f".* names step {steps[-1]}"):
    restore.restore(other)
  shutil.rmtree(os.path.join(other, "bundle"))
  with pytest.raises(bundle.BundleError, match="no inference bundle"):
    restore.restore(other)


def test_restore_of_a_folder_that_is_not_a_run(tmp_path):
  with pytest.raises(FileNotFoundError, match="is not a training run"):
    restore.restore(str(tmp_path))
  with pytest.raises(ValueError, match="which must be one of"):
    restore.restore(str(tmp_path), "best_mean")


_TRAIN_ON_8_DEVICES = """
import sys
from m6jax import experiment
from tests.conftest import REPO, tiny_config
cfg = tiny_config(sys.argv[1], sys.argv[2], **{"train.epochs": 2, "seeds": 2})
experiment.train_and_evaluate(cfg, sys.argv[3])
"""


@pytest.mark.slow
def test_a_run_trained_on_a_device_mesh_restores_on_one_device(tiny_catalogue, tmp_path):
  wd = str(tmp_path / "run")
  env = dict(os.environ, XLA_FLAGS="--xla_force_host_platform_device_count=8")
  r = subprocess.run([sys.executable, "-c", _TRAIN_ON_8_DEVICES, tiny_catalogue,
                      str(tmp_path / "tfds"), wd], capture_output=True, text=True,
                     timeout=600, cwd=REPO, env=env)
  assert r.returncode == 0, r.stderr[-3000:]
  assert len(jax.devices()) == 1
  _, run, params, stats = restore.restore(wd)
  probs = np.asarray(run.predict(params, stats, "test")).mean(0)
  with open(os.path.join(wd, "predictions_test.csv")) as f:
    saved = list(csv.DictReader(f))
  for row, p in zip(saved, probs):
    np.testing.assert_allclose([float(row[f"p_{c}"]) for c in run.class_names], p, atol=1e-6)
